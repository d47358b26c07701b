"""Thermodynamic K-FAC at realistic width: the 784-512-512-10 MLP on the embedded 28x28 images.

The workload of docs/thermodynamic_kfac.md ("Realistic width"): ``digits28`` (the scikit-learn
digits at MNIST's shape and statistics, no download), MLP 784-512-512-10 (ReLU, cross-entropy),
batch 512, the library's K-FAC defaults (``KFACPreconditioner(model, optimizer=opt)``) under SGD
lr 0.3 momentum 0.9, against Adam (lr 1e-3). In one process, interleaved step by step (A B C D A
B C D ...), so load on the host hits every run alike:

- ``adam``;
- ``kfac`` (digital K-FAC, ``solver="eigh"``);
- ``thermo`` (``solver="thermo"``, every default: chip preset, ``deflate="auto"``,
  ``analog_time="auto"``): timed;
- ``thermo+exact`` (the same with ``track_exact=True``: the measured error of every solve against
  the exact damped solve; not timed, it pays for the exact reference).

It prints one JSON object: final training loss (whole training set, float64) and test accuracy of
each run, the thermo runs' fallbacks per layer update, the median step times and the thermo/eigh
ratio, and the per-layer table of the last inverse update of ``thermo+exact`` (deflation depth,
condition numbers before/after deflation, feasibility, windows, predicted vs measured error,
bits lost to ranging) plus the median predicted/measured error ratio over every solve of the run.
``--trace PATH`` writes that run's ``trace.json`` (``thermo-kfac project --trace PATH`` prices it).

    python benchmarks/realistic_width.py [--steps 150] [--quick] [--out result.json] [--trace trace.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from thermo_kfac import KFACPreconditioner
from thermo_kfac.data import load_dataset
from thermo_kfac.models import build_model
from thermo_kfac.trace import TraceRecorder

from _report import emit

RUNS = ("adam", "kfac", "thermo", "thermo+exact")


def _build(name: str, data, seed: int):
    torch.manual_seed(seed)
    model = build_model("mlp", data, widths=(512, 512))
    if name == "adam":
        return model, torch.optim.Adam(model.parameters(), lr=1e-3), None
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    solver = "eigh" if name == "kfac" else "thermo"
    options = {"track_exact": True} if name == "thermo+exact" else {}
    return model, opt, KFACPreconditioner(model, optimizer=opt, solver=solver, solver_options=options)


@torch.no_grad()
def _evaluate(model, data) -> tuple[float, float]:
    train = float(F.cross_entropy(model(data.x_train).double(), data.y_train))
    accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    return train, accuracy


def _layer_table(precond: KFACPreconditioner) -> list[dict]:
    """The last inverse update of every layer of a thermo run (prepare) and its last solve."""
    rows = []
    for name, state in precond.layer_table.items():
        solver = state.solver
        prepared = getattr(solver, "last_prepare_info", None) or {}
        info = solver.last_report.info if solver.last_report is not None else {}
        rows.append({
            "layer": name, "n_A": state.adapter.d_in, "n_G": state.adapter.d_out,
            "solve_order": info.get("solve_order"),
            "deflate_G_A": prepared.get("deflate"), "kappa_before_G_A": prepared.get("kappa_before"),
            "kappa_after_G_A": prepared.get("kappa_after"), "window_G_A": prepared.get("window"),
            "burn_in_G_A": prepared.get("burn_in"),
            "feasible_G_A": [f and f["feasible"] for f in prepared.get("feasibility", [])],
            "deflation_residual_G_A": prepared.get("deflation_residual"),
            "bits_lost_to_ranging_G_A": info.get("bits_lost_to_ranging"),
            "predicted_rel_error": (info.get("pricing") or {}).get("predicted_rel_error"),
            "rel_error_to_exact": info.get("rel_error_to_exact"),
            "fallbacks": int(state.fallbacks),
        })
    return rows


def _spread(ratios: list[float]) -> dict:
    """Median, 10th and 90th percentiles and count of the predicted/measured error ratios."""
    deciles = statistics.quantiles(ratios, n=10) if len(ratios) > 10 else [None] * 9
    return {"median": statistics.median(ratios) if ratios else None, "p10": deciles[0],
            "p90": deciles[-1], "solves": len(ratios)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="12 steps (a smoke run; figures not comparable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--trace", default=None, help="write the thermo+exact run's trace.json here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 12)
    torch.set_num_threads(args.threads)
    data = load_dataset("digits28", seed=args.seed)
    runs = {name: _build(name, data, args.seed) for name in RUNS}
    recorder = TraceRecorder(runs["thermo+exact"][2], run={"workload": "digits28 mlp 784-512-512-10"})
    streams = {name: data.stream(512, seed=args.seed) for name in RUNS}
    times: dict[str, list[float]] = {name: [] for name in RUNS}
    prepare_infos: dict[str, dict[str, dict]] = {"thermo": {}, "thermo+exact": {}}
    ratios: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(args.steps):
            for name in RUNS:
                model, opt, precond = runs[name]
                _, x, y = next(streams[name])
                start = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                if precond is not None:
                    precond.step()
                opt.step()
                times[name].append(time.perf_counter() - start)
                if name.startswith("thermo"):
                    reports = precond.last_report.get("solver_reports") or {}
                    for key, report in reports.items():
                        layer, _, kind = key.rpartition("/")
                        if kind == "prepare" and report is not None:
                            prepare_infos[name][layer] = report.info
                        if name == "thermo+exact" and kind == "apply" and report is not None:
                            measured = report.info.get("rel_error_to_exact")
                            predicted = (report.info.get("pricing") or {}).get("predicted_rel_error")
                            if measured and predicted and math.isfinite(measured) and measured > 0:
                                ratios.append(predicted / measured)
            recorder.observe()
    for name in ("thermo", "thermo+exact"):  # the table's prepare keys of the last update
        for layer, state in runs[name][2].layer_table.items():
            state.solver.last_prepare_info = prepare_infos[name].get(layer, {})
    results = {}
    warm = min(10, args.steps // 5)
    for name, (model, _opt, precond) in runs.items():
        loss, accuracy = _evaluate(model, data)
        entry = {"final_train_loss": loss, "test_accuracy": accuracy,
                 "median_step_ms": 1e3 * statistics.median(times[name][warm:]),
                 "min_step_ms": 1e3 * min(times[name][warm:]), "max_step_ms": 1e3 * max(times[name][warm:])}
        if precond is not None:
            updates = args.steps * len(precond.layer_table)
            fallbacks = sum(precond.fallbacks().values())
            entry.update(fallbacks=fallbacks, layer_steps=updates, fallback_fraction=fallbacks / updates)
        results[name] = entry
    thermo, kfac, adam = results["thermo"], results["kfac"], results["adam"]
    report = {
        "benchmark": "realistic_width", "workload": "digits28, MLP 784-512-512-10, batch 512",
        "steps": args.steps, "seed": args.seed,
        "machine": {"cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "runs": results,
        "ratios": {"thermo_step_over_eigh_step": thermo["median_step_ms"] / kfac["median_step_ms"],
                   "thermo_loss_over_kfac_loss": thermo["final_train_loss"] / kfac["final_train_loss"],
                   "thermo_loss_over_adam_loss": thermo["final_train_loss"] / adam["final_train_loss"]},
        "targets": {"fallbacks_at_most": 0.05, "loss_ratio_to_kfac_at_most": 1.5,
                    "step_ratio_to_eigh_at_most": 2.5, "predicted_over_measured_median": [0.7, 1.4]},
        "predicted_over_measured": _spread(ratios),
        "layers": _layer_table(runs["thermo+exact"][2]),
        "warnings": sorted({str(w.message)[:200] for w in caught}),
    }
    if args.trace:
        with open(args.trace, "w") as handle:
            json.dump(recorder.to_dict(), handle, default=str)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
