"""Per-layer fidelity of thermodynamic K-FAC with the realistic default device (issue 15).

Trains the README main job's thermo run (digits MLP, ``kfac:solver=thermo`` with every default:
the ``chip`` preset's converters, rails, mismatch and read noise, 10 epochs) once, with
``track_exact=True`` (an exact digital solve per call for the comparison; it draws no random
numbers, so the trajectory is the one of the plain run), and prints JSON: per layer the median
over the apply calls of the relative error to the exact damped solve, the predicted error (bias,
variance and static error of the one error law), the input scale and the bits/SNR given up to
ranging, the saturated fraction and range fallbacks, and the maxima over all reports of
``programmed_lambda_max`` and ``max_coupling``; plus the final train loss and the fallbacks.

    python benchmarks/thermo_fidelity.py [--epochs 10 | --quick] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch

from thermo_kfac.data import load_dataset
from thermo_kfac.experiments.training.options import parse_optimizer_spec, resolve_options
from thermo_kfac.experiments.training.run import TrainingRun


def measure(epochs: float, spec_text: str) -> dict[str, Any]:
    """Train the run and collect its per-layer solver reports."""
    data = load_dataset("digits", seed=0)
    spec = parse_optimizer_spec(spec_text)
    steps = int(round(epochs * data.steps_per_epoch(256)))
    run = TrainingRun(data, "mlp", {}, spec, resolve_options(spec), loss="cross_entropy", steps=steps,
                      batch_size=256, seed=0, eval_every=steps, device=torch.device("cpu"))
    layers: dict[str, dict[str, list]] = {}
    lam_max, coupling = 0.0, 0.0
    while not run.done:
        run.step()
        reports = run.preconditioner.last_report.get("solver_reports", {})
        for key, report in reports.items():
            name, kind = key.rsplit("/", 1)
            info = report.info
            lam_max = max([lam_max, *info.get("programmed_lambda_max", [])])
            coupling = max([coupling, *info.get("max_coupling", [])])
            if kind != "apply":
                continue
            rows = layers.setdefault(name, {k: [] for k in (
                "rel_error_to_exact", "predicted_error", "input_scale_G", "input_scale_A",
                "bits_lost", "saturated_fraction", "range_fallbacks")})
            rows["rel_error_to_exact"].append(info.get("rel_error_to_exact"))
            rows["predicted_error"].append(info.get("predicted_error"))
            rows["input_scale_G"].append(info["input_scale"][0])
            rows["input_scale_A"].append(info["input_scale"][1])
            rows["bits_lost"].append(max(info["bits_lost_to_ranging"]))
            rows["saturated_fraction"].append(max(info["saturated_fraction"]))
            rows["range_fallbacks"].append(sum(bool(v) for v in info["range_fallback"]))
    table = {}
    for name, rows in layers.items():
        def med(key: str, rows: dict[str, list] = rows) -> float | None:
            vals = [v for v in rows[key] if v is not None]
            return statistics.median(vals) if vals else None
        table[name] = {"rel_error_to_exact": med("rel_error_to_exact"),
                       "predicted_error": med("predicted_error"),
                       "input_scale_G": med("input_scale_G"), "input_scale_A": med("input_scale_A"),
                       "bits_lost_to_ranging": med("bits_lost"),
                       "max_saturated_fraction": max(rows["saturated_fraction"]),
                       "range_fallbacks": sum(rows["range_fallbacks"]), "calls": len(rows["bits_lost"])}
    result = run.result()
    return {"spec": spec_text, "steps": steps, "final_train_loss": result["final_train_loss"],
            "fallbacks": sum(run.preconditioner.fallbacks().values()),
            "max_programmed_lambda_max": lam_max, "max_coupling": coupling, "layers": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="1 epoch (a smoke run)")
    parser.add_argument("--spec", default="kfac:solver=thermo,track_exact=true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = measure(1.0 if args.quick else args.epochs, args.spec)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
