"""Equal wall-clock budgets: ``kfac-adaptive`` (thermo_kfac.KFAC, defaults) against Adam tuned over
lr in {1e-3, 3e-3, 1e-2}, on the digits MLP and the digits auto-encoder.

Per workload and seed, every run starts from the same initialization and sees the same batches.
The runs advance round robin, one step each (so load changes on the shared machine hit all of
them alike), each with its own clock that counts only its steps; a run stops when its clock passes
the largest budget. The full training loss (all training examples, not timed; computed in float64 from the
model's float32 outputs, since float32 rounds the losses of well-fitted examples to 0) is evaluated every
``--eval-every`` seconds of a run's clock and at its end; the loss *at* a budget is the last
evaluation within it. Reported per budget and seed: the final training loss of kfac-adaptive and
of the best Adam learning rate (best = lowest loss at that budget, chosen per seed: Adam is tuned
with hindsight), whether K-FAC is lower, and the steps (and seconds) K-FAC needed to reach the
best Adam's loss at that budget against Adam's steps.

Workloads:
- ``digits-mlp``: MLP 64-128-128-10 (ReLU), cross-entropy, batch 256.
- ``digits-autoencoder``: 64-256-128-64-16-64-128-256-64 (tanh, linear code), MSE, full batch
  (1437 examples).

``--plain-kfac`` adds the earlier comparison of the plain preconditioner (``kfac`` spec, SGD
momentum base, settings from sweeps: CLI defaults on the MLP; damping 1e-2, KL clip 1e-2, factors
every 5 steps, inverses every 20 on the auto-encoder, 300 full-batch steps) against Adam (lr 3e-3
MLP, 1e-2 auto-encoder) run by ``thermo_kfac.experiments.training.compare``: K-FAC's wall time to
Adam's final training loss over Adam's time (``plain_kfac``).

    python benchmarks/convergence.py [--quick] [--seeds 3] [--budgets 10 30] [--plain-kfac]
                                     [--out result.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from thermo_kfac import KFAC
from thermo_kfac.data import load_dataset
from thermo_kfac.experiments.bench import target
from thermo_kfac.models import build_model

from _report import emit

ADAM_LRS = (1e-3, 3e-3, 1e-2)
WORKLOADS: dict[str, dict[str, Any]] = {
    "digits-mlp": {"task": None, "model": "mlp",
                   "model_options": {"widths": (128, 128), "activation": "relu"},
                   "batch_size": 256, "loss": "cross_entropy"},
    "digits-autoencoder": {"task": "autoencoder", "model": "autoencoder",
                           "model_options": {"widths": (256, 128, 64, 16), "activation": "tanh"},
                           "batch_size": 1437, "loss": "mse"},
}
LOSS_FNS = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
PLAIN_WORKLOADS: dict[str, dict[str, Any]] = {
    "digits-mlp": {"model": "mlp", "model_options": {"widths": (128, 128), "activation": "relu"},
                   "batch_size": 256, "epochs": 30, "loss": None,
                   "optimizers": ["adam:lr=3e-3", "kfac"]},
    "digits-autoencoder": {
        "model": "autoencoder", "model_options": {"widths": (256, 128, 64, 16), "activation": "tanh"},
        "batch_size": 1437, "steps": 300, "loss": "mse",
        "optimizers": ["adam:lr=1e-2", "kfac:damping=1e-2,kl_clip=1e-2,factor_update_every=5,"
                       "inverse_update_every=20"]},
}


def plain_kfac(name: str, spec: dict[str, Any], seed: int, scale: float) -> dict[str, Any]:
    """The plain preconditioner's time to Adam's final training loss (one seed)."""
    import warnings

    from thermo_kfac.experiments.training import compare

    kwargs = {"steps": max(10, int(spec["steps"] * scale))} if "steps" in spec else \
        {"epochs": spec["epochs"] * scale}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compare("digits", spec["model"], spec["optimizers"], seed=seed,
                         batch_size=spec["batch_size"], loss=spec["loss"],
                         model_options=spec["model_options"], eval_every=1, **kwargs)
    adam, kfac = result["runs"]
    ratio = (kfac["time_to_target_s"] / adam["wall_time_s"]
             if kfac["time_to_target_s"] is not None else float("inf"))
    return {"seed": seed, "target_loss": result["target_loss"], "adam_wall_s": adam["wall_time_s"],
            "kfac_time_to_target_s": kfac["time_to_target_s"],
            "kfac_steps_to_target": kfac["steps_to_target"], "adam_steps": adam["steps"],
            "kfac_time_to_adam_final_over_adam_time": ratio}


class Run:
    """One optimizer's run: a step function, its own clock and its loss curve."""

    def __init__(self, label: str, data: Any, spec: dict[str, Any], seed: int, kfac_options: Any):
        torch.manual_seed(seed)
        self.label = label
        self.model = build_model(spec["model"], data, **spec["model_options"])
        self.loss_fn = LOSS_FNS[spec["loss"]]
        self.stream = data.stream(spec["batch_size"], seed=seed)
        self.x_all, self.y_all = data.x_train, data.y_train
        if label.startswith("adam"):
            lr = float(label.split("=")[1])
            opt = torch.optim.Adam(self.model.parameters(), lr=lr)

            def step(x: torch.Tensor, y: torch.Tensor) -> float:
                opt.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
                opt.step()
                return float(loss.detach())
        else:
            self.kfac = KFAC(self.model, loss=spec["loss"], **(kfac_options or {}))

            def step(x: torch.Tensor, y: torch.Tensor) -> float:
                return float(self.kfac.step(x, y))
        self.step_fn = step
        self.clock = 0.0
        self.steps = 0
        self.curve: list[tuple[float, int, float]] = [(0.0, 0, self.evaluate())]
        self.next_eval = 0.0

    @torch.no_grad()
    def evaluate(self) -> float:
        # float64 loss from the float32 outputs: the float32 cross-entropy rounds the losses of
        # well-fitted examples to 0 (both optimizers go below 1e-8 on the MLP)
        y = self.y_all.double() if self.y_all.is_floating_point() else self.y_all
        return float(self.loss_fn(self.model(self.x_all).double(), y))

    def advance(self, eval_every: float) -> None:
        _, x, y = next(self.stream)
        start = time.perf_counter()
        value = self.step_fn(x, y)
        self.clock += time.perf_counter() - start
        self.steps += 1
        if self.clock >= self.next_eval or value != value:
            self.curve.append((self.clock, self.steps, self.evaluate()))
            self.next_eval = self.clock + eval_every

    def loss_at(self, budget: float) -> tuple[float, int]:
        """(training loss, steps) at the last evaluation within ``budget`` seconds."""
        within = [c for c in self.curve if c[0] <= budget]
        return within[-1][2], within[-1][1]

    def first_reaching(self, value: float, budget: float) -> tuple[float, int] | None:
        for clock, steps, loss in self.curve:
            if clock <= budget and loss <= value:
                return clock, steps
        return None


def run_seed(name: str, spec: dict[str, Any], seed: int, budgets: list[float], eval_every: float,
             kfac_options: Any) -> dict[str, Any]:
    data = load_dataset("digits", task=spec["task"]) if spec["task"] else load_dataset("digits")
    labels = [f"adam:lr={lr:g}" for lr in ADAM_LRS] + ["kfac-adaptive"]
    runs = [Run(label, data, spec, seed, kfac_options) for label in labels]
    for run in runs:  # warm-up on a throwaway copy: allocator, thread pools, LAPACK
        warm = Run(run.label, data, spec, seed, kfac_options)
        for _ in range(3):
            warm.advance(1e9)
    horizon = max(budgets)
    while any(r.clock < horizon for r in runs):
        for run in runs:
            if run.clock < horizon:
                run.advance(eval_every)
    for run in runs:
        run.curve.append((run.clock, run.steps, run.evaluate()))
    kfac = runs[-1]
    out: dict[str, Any] = {"seed": seed, "budgets": {}}
    for budget in budgets:
        adam = {r.label: r.loss_at(budget) for r in runs[:-1]}
        best = min(adam, key=lambda k: adam[k][0])
        best_loss, adam_steps = adam[best]
        kfac_loss, kfac_steps = kfac.loss_at(budget)
        reach = kfac.first_reaching(best_loss, budget)
        out["budgets"][str(budget)] = {
            "adam_losses": {k: v[0] for k, v in adam.items()}, "best_adam": best,
            "best_adam_loss": best_loss, "best_adam_steps": adam_steps,
            "kfac_loss": kfac_loss, "kfac_steps": kfac_steps,
            "kfac_lower": kfac_loss < best_loss,
            "kfac_seconds_to_best_adam_loss": None if reach is None else reach[0],
            "kfac_steps_to_best_adam_loss": None if reach is None else reach[1],
        }
    out["mean_step_s"] = {r.label: r.clock / max(r.steps, 1) for r in runs}
    out["kfac_final_damping"] = kfac.kfac.damping
    out["curves"] = {r.label: r.curve for r in runs}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per workload (>= 1)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[10.0, 30.0],
                        help="wall-clock budgets in seconds of each run's own step time")
    parser.add_argument("--eval-every", type=float, default=0.25,
                        help="seconds of a run's clock between full training-loss evaluations")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1; these models are tiny, and on a shared "
                        "host two threads spin-wait)")
    parser.add_argument("--kfac", default="", help="k=v,... KFAC options (default: none, the "
                        "defaults; for exploring only)")
    parser.add_argument("--plain-kfac", action="store_true", help="also the plain preconditioner's "
                        "time to Adam's final loss (the earlier version of this benchmark)")
    parser.add_argument("--quick", action="store_true", help="1 seed, budgets 2 s and 5 s")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.budgets = 1, [2.0, 5.0]
    if args.seeds < 1 or min(args.budgets) <= 0:
        parser.error("--seeds must be >= 1 and budgets > 0")
    torch.set_num_threads(args.threads or 1)
    from thermo_kfac.experiments.training.options import parse_adaptive_options

    kfac_options = parse_adaptive_options(args.kfac)
    budgets = sorted(args.budgets)
    result: dict[str, Any] = {
        "benchmark": "convergence",
        "command": "python benchmarks/convergence.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "load_average": os.getloadavg(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "adam_lrs": list(ADAM_LRS), "kfac_options": kfac_options or "defaults",
        "budgets_s": budgets, "workloads": {},
    }
    targets = {}
    for name in args.workloads:
        spec = WORKLOADS[name]
        seeds = [run_seed(name, spec, seed, budgets, args.eval_every, kfac_options)
                 for seed in range(args.seeds)]
        summary = {}
        for budget in budgets:
            rows = [s["budgets"][str(budget)] for s in seeds]
            wins = sum(r["kfac_lower"] for r in rows)
            summary[str(budget)] = {
                "kfac_lower_on_seeds": f"{wins}/{len(rows)}",
                "kfac_loss_over_best_adam": statistics.median(r["kfac_loss"] / r["best_adam_loss"]
                                                              for r in rows),
                "kfac_steps_to_best_adam_loss": [r["kfac_steps_to_best_adam_loss"] for r in rows],
                "best_adam_steps": [r["best_adam_steps"] for r in rows],
            }
            targets[f"{name}_{budget:g}s_kfac_lower_than_tuned_adam_seeds"] = target(
                wins, ">=", len(rows), f"seeds (of {len(rows)}) on which kfac-adaptive (defaults) "
                "ends below the best Adam lr at this budget")
        result["workloads"][name] = {"settings": {k: v for k, v in spec.items()},
                                     "summary": summary, "seeds": seeds}
    if args.plain_kfac:
        scale = 1 / 3 if args.quick else 1.0
        result["plain_kfac"] = {}
        for name in args.workloads:
            rows = [plain_kfac(name, PLAIN_WORKLOADS[name], seed, scale) for seed in range(args.seeds)]
            ratios = [r["kfac_time_to_adam_final_over_adam_time"] for r in rows]
            result["plain_kfac"][name] = {"settings": PLAIN_WORKLOADS[name], "repeats": rows,
                                          "median_ratio": statistics.median(ratios)}
            targets[f"{name}_plain_kfac_time_to_adam_final_over_adam"] = target(
                statistics.median(ratios), "<=", 0.5,
                f"median over {args.seeds} seed(s); inf = K-FAC never reached Adam's final loss")
    result["targets"] = targets
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
