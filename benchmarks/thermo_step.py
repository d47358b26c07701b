"""Simulation throughput: the wall time of a thermodynamic K-FAC step against a digital one.

Three workloads, each trained in one process with its runs interleaved step by step (A B C D A B
C D ...), so load on the host hits every run alike:

- ``digits``: the README main job's model (the MLP on the 8x8 digits, batch 256);
- ``width512``: the realistic-width workload, MLP 784-512-512-10 on ``digits28``, batch 512;
- ``width1024``: one 1024-wide hidden layer, MLP 784-1024-10 on ``digits28``, batch 512.

Runs per workload (SGD lr 0.3 momentum 0.9 under the library's K-FAC defaults):
``eigh`` (digital K-FAC), ``thermo`` (``solver="thermo"``, every default: chip preset, deflation,
law windows), ``thermo_ideal`` (``ideal=True``) and ``thermo_exact`` (``integrator="exact"``,
the clipping integrator the analytic law falls back to). Reported per run: the median step time
(forward, backward, ``precondition.step()``, optimizer; the median leaves out the rare inverse
updates) and the mean (which includes them), the ratio of each to ``eigh``'s, and the thermo
runs' fallbacks and rail fallbacks. ``targets``: the issue's ratios (README job <= 2x, realistic
width <= 1.5x, medians).

    python benchmarks/thermo_step.py [--quick] [--steps 60] [--threads 2] [--out result.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from thermo_kfac import KFACPreconditioner
from thermo_kfac.data import load_dataset
from thermo_kfac.experiments.bench import target
from thermo_kfac.models import build_model

from _report import emit

WORKLOADS = {  # name: (dataset, hidden widths (None: the model's default), batch)
    "digits": ("digits", None, 256),
    "width512": ("digits28", (512, 512), 512),
    "width1024": ("digits28", (1024,), 512),
}
RUNS = {
    "eigh": ("eigh", {}),
    "thermo": ("thermo", {}),
    "thermo_ideal": ("thermo", {"ideal": True}),
    "thermo_exact": ("thermo", {"integrator": "exact"}),
}


def _run(data, widths, solver: str, options: dict, seed: int):
    torch.manual_seed(seed)
    model = build_model("mlp", data, **({} if widths is None else {"widths": widths}))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    return model, opt, KFACPreconditioner(model, optimizer=opt, solver=solver, solver_options=options)


def _rail_fallbacks(precond: KFACPreconditioner) -> int:
    count = 0
    for state in precond.layer_table.values():
        report = state.solver.last_report
        info = {} if report is None else report.info
        count += sum(bool(v) for v in info.get("range_fallback", []) or [])
    return count


def measure(name: str, steps: int, seed: int = 0) -> dict:
    """One workload: every run stepped ``steps`` times, interleaved."""
    dataset, widths, batch = WORKLOADS[name]
    data = load_dataset(dataset)
    runs = {key: _run(data, widths, solver, options, seed) for key, (solver, options) in RUNS.items()}
    times: dict[str, list[float]] = {key: [] for key in runs}
    rails = dict.fromkeys(runs, 0)
    gen = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=gen)
        x, y = data.x_train[idx], data.y_train[idx]
        for key, (model, opt, precond) in runs.items():
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            precond.step()
            opt.step()
            times[key].append(time.perf_counter() - start)
            rails[key] += _rail_fallbacks(precond)
    skip = min(3, steps - 1)  # the first steps build caches
    out: dict = {"dataset": dataset, "widths": widths, "batch": batch, "steps": steps, "runs": {}}
    base_med = statistics.median(times["eigh"][skip:])
    base_mean = statistics.fmean(times["eigh"][skip:])
    for key, (_, _, precond) in runs.items():
        med, mean = statistics.median(times[key][skip:]), statistics.fmean(times[key][skip:])
        out["runs"][key] = {"median_ms": 1e3 * med, "mean_ms": 1e3 * mean,
                            "median_ratio_to_eigh": med / base_med, "mean_ratio_to_eigh": mean / base_mean,
                            "fallbacks": int(sum(precond.fallbacks().values())),
                            "rail_fallbacks": rails[key]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=60, help="steps per run (default 60)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 12 if args.quick else args.steps
    report: dict = {"benchmark": "thermo_step", "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "quick": args.quick,
                    "workloads": {}}
    for name in args.workloads:
        report["workloads"][name] = measure(name, steps)
        print(f"[thermo_step] {name} done", file=sys.stderr, flush=True)
    runs = report["workloads"]
    report["targets"] = {}
    if "digits" in runs:
        report["targets"]["readme_job_thermo_over_eigh"] = target(
            runs["digits"]["runs"]["thermo"]["median_ratio_to_eigh"], "<=", 2.0, "median step")
    if "width512" in runs:
        report["targets"]["width512_thermo_over_eigh"] = target(
            runs["width512"]["runs"]["thermo"]["median_ratio_to_eigh"], "<=", 1.5, "median step")
        report["targets"]["width512_no_fallbacks"] = target(
            runs["width512"]["runs"]["thermo"]["fallbacks"], "<=", 0, "layer updates served digitally")
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
