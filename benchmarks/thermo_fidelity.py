"""Per-layer fidelity of thermodynamic K-FAC with the realistic default device: is the error law's
prediction the error the simulated device makes?

Two workloads, each with ``track_exact=True`` (an exact digital solve per call for the comparison;
it draws no random numbers, so the trajectory is the one of the plain run) and every other thermo
default (the ``chip`` preset's converters, rails, mismatch and read noise, ``deflate="auto"``,
``analog_time="auto"``):

- ``digits``: the README main job's thermo run (digits MLP, ``kfac:solver=thermo``);
- ``digits28``: the realistic-width workload of ``benchmarks/realistic_width.py`` (MLP
  784-512-512-10 on ``digits28``, batch 512, SGD lr 0.3 momentum 0.9, the library's K-FAC
  defaults).

Per layer update the ratio predicted/measured is the law's predicted relative error of the whole
preconditioned update (``info["pricing"]["predicted_rel_error"]``: both solves with the actual
inputs and starts, the static converter/device part, the first solve's error propagated through
the second factor's inverse) over the measured ``rel_error_to_exact``. The targets: median ratio
within 0.8-1.25 and 90 % of layer updates within 0.67-1.5, per workload. It prints JSON: per
workload and layer the medians of measured and predicted error, the ratio's median and band
fraction, input scale, bits lost to ranging, saturated fraction and range fallbacks, and the
pass/fail of the targets.

    python benchmarks/thermo_fidelity.py [--steps 60 | --quick] [--workloads digits,digits28] [--out F]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from typing import Any

import torch
import torch.nn.functional as F

from thermo_kfac import KFACPreconditioner
from thermo_kfac.data import load_dataset
from thermo_kfac.experiments.training.options import parse_optimizer_spec, resolve_options
from thermo_kfac.experiments.training.run import TrainingRun
from thermo_kfac.models import build_model

from _report import emit

WORKLOADS = ("digits", "digits28")
#: the issue's targets: median ratio band and the band 90 % of layer updates must fall in
MEDIAN_BAND = (0.8, 1.25)
UPDATE_BAND = (0.67, 1.5)
UPDATE_SHARE = 0.9


class _Rows:
    """The per-layer rows of one workload's apply reports."""

    def __init__(self) -> None:
        self.layers: dict[str, dict[str, list]] = {}
        self.lam_max = 0.0
        self.coupling = 0.0

    def observe(self, reports: dict[str, Any]) -> None:
        for key, report in reports.items():
            if report is None:
                continue
            name, _, kind = key.rpartition("/")
            info = report.info
            self.lam_max = max([self.lam_max, *info.get("programmed_lambda_max", [])])
            self.coupling = max([self.coupling, *info.get("max_coupling", [])])
            if kind != "apply":
                continue
            rows = self.layers.setdefault(name, {k: [] for k in (
                "measured", "predicted", "ratio", "input_scale_G", "input_scale_A", "bits_lost",
                "saturated_fraction", "range_fallbacks")})
            measured = info.get("rel_error_to_exact")
            predicted = (info.get("pricing") or {}).get("predicted_rel_error")
            rows["measured"].append(measured)
            rows["predicted"].append(predicted)
            if measured and predicted and math.isfinite(measured) and measured > 0:
                rows["ratio"].append(predicted / measured)
            rows["input_scale_G"].append(info["input_scale"][0])
            rows["input_scale_A"].append(info["input_scale"][1])
            rows["bits_lost"].append(max(info["bits_lost_to_ranging"]))
            rows["saturated_fraction"].append(max(info["saturated_fraction"]))
            rows["range_fallbacks"].append(sum(bool(v) for v in info["range_fallback"]))

    def summary(self) -> dict[str, Any]:
        table = {}
        ratios: list[float] = []
        for name, rows in self.layers.items():
            def med(key: str, rows: dict[str, list] = rows) -> float | None:
                vals = [v for v in rows[key] if v is not None]
                return statistics.median(vals) if vals else None
            ratios += rows["ratio"]
            table[name] = {"measured_error": med("measured"), "predicted_error": med("predicted"),
                           "ratio_median": med("ratio"), "ratio_in_band": _share(rows["ratio"]),
                           "ratio_min": min(rows["ratio"], default=None),
                           "ratio_max": max(rows["ratio"], default=None),
                           "input_scale_G": med("input_scale_G"), "input_scale_A": med("input_scale_A"),
                           "bits_lost_to_ranging": med("bits_lost"),
                           "max_saturated_fraction": max(rows["saturated_fraction"]),
                           "range_fallbacks": sum(rows["range_fallbacks"]),
                           "calls": len(rows["bits_lost"])}
        median = statistics.median(ratios) if ratios else None
        share = _share(ratios)
        return {"ratio_median": median, "ratio_in_band": share, "layer_updates": len(ratios),
                "median_ok": median is not None and MEDIAN_BAND[0] <= median <= MEDIAN_BAND[1],
                "band_ok": share is not None and share >= UPDATE_SHARE,
                "max_programmed_lambda_max": self.lam_max, "max_coupling": self.coupling,
                "layers": table}


def _share(ratios: list[float]) -> float | None:
    """Fraction of the ratios inside :data:`UPDATE_BAND`."""
    if not ratios:
        return None
    return sum(UPDATE_BAND[0] <= r <= UPDATE_BAND[1] for r in ratios) / len(ratios)


def measure_digits(steps: int, spec_text: str) -> dict[str, Any]:
    """The README main job's thermo run (``spec_text``) for ``steps`` steps."""
    data = load_dataset("digits", seed=0)
    spec = parse_optimizer_spec(spec_text)
    run = TrainingRun(data, "mlp", {}, spec, resolve_options(spec), loss="cross_entropy", steps=steps,
                      batch_size=256, seed=0, eval_every=steps, device=torch.device("cpu"))
    rows = _Rows()
    while not run.done:
        run.step()
        rows.observe(run.preconditioner.last_report.get("solver_reports", {}))
    result = run.result()
    return {"workload": "digits MLP (README main job)", "spec": spec_text, "steps": steps,
            "final_train_loss": result["final_train_loss"],
            "fallbacks": sum(run.preconditioner.fallbacks().values()), **rows.summary()}


def measure_digits28(steps: int, seed: int = 0) -> dict[str, Any]:
    """The realistic-width workload (``benchmarks/realistic_width.py``'s ``thermo+exact`` run)."""
    data = load_dataset("digits28", seed=seed)
    torch.manual_seed(seed)
    model = build_model("mlp", data, widths=(512, 512))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    precond = KFACPreconditioner(model, optimizer=opt, solver="thermo",
                                 solver_options={"track_exact": True})
    stream = data.stream(512, seed=seed)
    rows = _Rows()
    loss = float("nan")
    for _ in range(steps):
        _, x, y = next(stream)
        opt.zero_grad(set_to_none=True)
        out = F.cross_entropy(model(x), y)
        out.backward()
        precond.step()
        opt.step()
        loss = float(out)
        rows.observe(precond.last_report.get("solver_reports") or {})
    return {"workload": "digits28, MLP 784-512-512-10, batch 512", "steps": steps,
            "last_batch_loss": loss, "fallbacks": sum(precond.fallbacks().values()), **rows.summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per workload")
    parser.add_argument("--quick", action="store_true", help="6 steps per workload (a smoke run)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--spec", default="kfac:solver=thermo,track_exact=true",
                        help="the digits workload's optimizer spec")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 6)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    report: dict[str, Any] = {"benchmark": "thermo_fidelity", "targets": {
        "ratio_median_within": list(MEDIAN_BAND), "ratio_band": list(UPDATE_BAND),
        "share_in_band_at_least": UPDATE_SHARE}, "workloads": {}}
    for name in names:
        report["workloads"][name] = (measure_digits(args.steps, args.spec) if name == "digits"
                                     else measure_digits28(args.steps))
    report["all_ok"] = all(w["median_ok"] and w["band_ok"] for w in report["workloads"].values())
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
