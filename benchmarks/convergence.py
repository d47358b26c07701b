"""Time for K-FAC to reach Adam's final training loss, on the digits MLP and a digits auto-encoder.

Each workload runs ``thermo_kfac.experiments.training.compare`` (same initialization, same
batches) for Adam and K-FAC, ``--repeats`` times with different seeds; the target is Adam's final
training loss of that repeat. Reported per workload: Adam's wall time, K-FAC's wall time to the
target, their ratio (median/min/max over repeats) and the steps each needed.

Workloads (settings chosen by sweeps on these tasks; see the README's benchmark section):
- ``digits-mlp``: MLP 64-128-128-10 (ReLU), batch 256, 30 epochs; Adam lr 3e-3; K-FAC with the
  CLI defaults (SGD momentum 0.9 base, lr 0.3, damping 0.1, KL clip 1e-3, factors every 10 steps,
  inverses every 50).
- ``digits-autoencoder``: 64-256-128-64-16-64-128-256-64 (tanh, linear code), MSE, full batch
  (1437 examples), 300 steps; Adam lr 1e-2; K-FAC damping 1e-2, KL clip 1e-2, factors every 5
  steps, inverses every 20.

    python benchmarks/convergence.py [--quick] [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import warnings

import torch

from thermo_kfac.experiments.bench import target
from thermo_kfac.experiments.training import compare

from _report import emit

WORKLOADS = {
    "digits-mlp": {
        "model": "mlp", "model_options": {"widths": (128, 128), "activation": "relu"},
        "batch_size": 256, "epochs": 30, "loss": None,
        "optimizers": ["adam:lr=3e-3", "kfac"],
    },
    "digits-autoencoder": {
        "model": "autoencoder",
        "model_options": {"widths": (256, 128, 64, 16), "activation": "tanh"},
        "batch_size": 1437, "steps": 300, "loss": "mse",
        "optimizers": ["adam:lr=1e-2", "kfac:damping=1e-2,kl_clip=1e-2,factor_update_every=5,"
                       "inverse_update_every=20"],
    },
}


def run_workload(name: str, spec: dict, seed: int, scale: float) -> dict:
    kwargs = {"steps": max(10, int(spec["steps"] * scale))} if "steps" in spec else \
        {"epochs": spec["epochs"] * scale}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compare("digits", spec["model"], spec["optimizers"], seed=seed,
                         batch_size=spec["batch_size"], loss=spec["loss"],
                         model_options=spec["model_options"], eval_every=1, **kwargs)
    adam, kfac = result["runs"]
    return {
        "seed": seed,
        "target_loss": result["target_loss"],
        "adam_wall_s": adam["wall_time_s"],
        "adam_steps": adam["steps"],
        "kfac_final_train_loss": kfac["final_train_loss"],
        "kfac_time_to_target_s": kfac["time_to_target_s"],
        "kfac_steps_to_target": kfac["steps_to_target"],
        "kfac_wall_s": kfac["wall_time_s"],
        "kfac_mean_step_over_adam": kfac["mean_step_time_s"] / adam["mean_step_time_s"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="seeds per workload (>= 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the core count; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, a third of the training, "
                        "1 thread (these models are tiny: on a shared host two threads spin-wait)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    scale = 1.0
    if args.quick:
        args.repeats, scale = 1, 1 / 3
    if args.threads is None:
        args.threads = 1 if args.quick else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads)
    result: dict = {
        "benchmark": "convergence",
        "machine": {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "workloads": {},
    }
    for name, spec in WORKLOADS.items():
        repeats = [run_workload(name, spec, seed, scale) for seed in range(args.repeats)]
        ratios = [r["kfac_time_to_target_s"] / r["adam_wall_s"]
                  if r["kfac_time_to_target_s"] is not None else float("inf") for r in repeats]
        result["workloads"][name] = {
            "settings": {k: v for k, v in spec.items()},
            "repeats": repeats,
            "kfac_time_to_adam_final_over_adam_time": {
                "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
            "target_at_most_0.5_met": statistics.median(ratios) <= 0.5,
        }
    result["targets"] = {
        f"{name}_kfac_time_to_adam_final_over_adam": target(
            w["kfac_time_to_adam_final_over_adam_time"]["median"], "<=", 0.5,
            f"median over {args.repeats} seed(s); inf = K-FAC never reached Adam's final loss")
        for name, w in result["workloads"].items()}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
