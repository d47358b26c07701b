"""Scaling of a study over workers: the same 8 training runs on a Dask LocalCluster of 1 and 2 workers.

Each task is a short digits run (``training.compare`` with one K-FAC spec, a fixed number of
steps, its own seed) in a worker with 1 thread, as ``noise-study --workers N`` runs them. Both
clusters are started and warmed (one untimed task per worker: imports, allocator, first-call
costs) before timing; then the 8-task study runs on the 1-worker and the 2-worker cluster in
turn (A B A B ...), ``--rounds`` times. Reported: the wall time of each study, the speed-up
(1 worker / 2 workers; goal >= 1.7 on 2 cores), whether both gave the same losses, and the
engine's per-task overhead: the wall time per no-op task on the 1-worker cluster (submission,
scheduling, result transfer, the driver's bookkeeping), also as a fraction of a one-minute task
(goal < 5%), next to the same figure for the serial executor. Diagnostics that do not depend on
the load: four 1-second sleeps on the 2-worker cluster (about 2 s when both workers run tasks at
once) and the cores each study got (task CPU seconds / study wall seconds).

The machine is shared: the load average before and after is in the output; read the speed-up
with it (other processes on the 2 cores take time from the 2-worker study first).

    python benchmarks/study_scaling.py [--tasks 8] [--steps 200] [--rounds 2] [--out result.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

# benchmarks/distributed.py would shadow Dask's ``distributed`` package for this script and for
# the workers it spawns (they inherit sys.path and re-import this file): drop the script's folder
# from sys.path; main() imports _report from it explicitly.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

from thermo_kfac.experiments import executors, training  # noqa: E402
from thermo_kfac.experiments.bench import target  # noqa: E402


def digits_run(seed: int, steps: int) -> dict:
    """One study task: a digits MLP trained with K-FAC for ``steps`` steps from ``seed``."""
    cpu = time.process_time()
    result = training.compare("digits", "mlp", ["kfac"], steps=steps, seed=seed, eval_every=steps,
                              progress=False)
    run = result["runs"][0]
    return {"seed": seed, "final_train_loss": run["final_train_loss"], "train_wall_s": run["wall_time_s"],
            "cpu_s": time.process_time() - cpu}


def noop(i: int) -> int:
    return i


def sleeper(seconds: float) -> int:
    """Waits without using the CPU: shows the engine's concurrency whatever the machine's load."""
    time.sleep(seconds)
    return os.getpid()


def study(executor: executors.Executor, tasks: list[executors.Task]) -> tuple[float, dict]:
    start = time.perf_counter()
    results = {r.key: r for r in executor.map(tasks)}
    wall = time.perf_counter() - start
    failed = [k for k, r in results.items() if not r.ok]
    if failed:
        raise RuntimeError(f"tasks failed: {[(k, results[k].error) for k in failed]}")
    return wall, {k: r.value for k, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="training steps per task")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--noop-tasks", type=int, default=50)
    parser.add_argument("--order", choices=["12", "21"], default="12",
                        help="which cluster runs first in each round (alternate to see drift)")
    parser.add_argument("--backend", choices=["dask", "processes"], default=None,
                        help="engine (default: dask when installed, else a process pool)")
    parser.add_argument("--quick", action="store_true", help="--steps 60 --rounds 1 --noop-tasks 20")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.noop_tasks = 60, 1, 20
    backend = args.backend or ("dask" if executors.dask_available() else "processes")
    sys.path.insert(0, HERE)
    from _report import emit

    sys.path.remove(HERE)

    load_before = os.getloadavg()
    tasks = [executors.Task(f"seed={s}", digits_run, {"seed": s, "steps": args.steps})
             for s in range(args.tasks)]
    warm = [executors.Task(f"warm{i}", digits_run, {"seed": 100 + i, "steps": 5}) for i in range(2)]
    start = time.perf_counter()
    one = executors.make_executor(1, threads=1, backend=backend)  # plain workers=1 means serial
    two = executors.make_executor(2, threads=1, backend=backend)
    startup_s = time.perf_counter() - start
    walls: dict[str, list[float]] = {"1": [], "2": []}
    cores_used: dict[str, list[float]] = {"1": [], "2": []}
    values: dict[str, dict] = {}
    try:
        list(one.map(warm[:1]))
        list(two.map(warm))
        for _ in range(args.rounds):
            pairs = [("1", one), ("2", two)]
            for name, executor in (pairs if args.order == "12" else pairs[::-1]):
                wall, values[name] = study(executor, tasks)
                walls[name].append(wall)
                cores_used[name].append(sum(v["cpu_s"] for v in values[name].values()) / wall)
        sleepers = [executors.Task(f"s{i}", sleeper, {"seconds": 1.0}) for i in range(4)]
        start = time.perf_counter()
        pids = [r.value for r in two.map(sleepers)]
        sleep_wall_s = time.perf_counter() - start
        noops = [executors.Task(f"n{i}", noop, {"i": i}) for i in range(args.noop_tasks)]
        list(one.map(noops[:5]))  # warm
        start = time.perf_counter()
        list(one.map(noops))
        overhead_s = (time.perf_counter() - start) / len(noops)
    finally:
        one.close()
        two.close()
    torch.set_num_threads(1)
    serial = executors.SerialExecutor(threads=1)
    start = time.perf_counter()
    list(serial.map(noops))
    serial_overhead_s = (time.perf_counter() - start) / len(noops)

    median = {k: statistics.median(v) for k, v in walls.items()}
    task_train_s = statistics.mean(v["train_wall_s"] for v in values["1"].values())
    report = {
        "benchmark": "study_scaling",
        "machine": {"cores": executors.available_cores(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_average_before": load_before,
                    "load_average_after": os.getloadavg(), "shared": True},
        "inputs": {"tasks": args.tasks, "steps": args.steps, "rounds": args.rounds,
                   "threads_per_worker": 1, "task": "training.compare digits mlp kfac",
                   "noop_tasks": args.noop_tasks, "order": args.order},
        "engine": two.describe(),
        "cluster_startup_s": startup_s,
        "study_wall_s": walls,
        "median_study_wall_s": median,
        "mean_task_training_wall_s": task_train_s,
        "speedup_2_vs_1_workers": median["1"] / median["2"],
        "speedup_goal": 1.7,
        "four_1s_sleeps_on_2_workers_wall_s": sleep_wall_s,
        "four_1s_sleeps_worker_processes": len(set(pids)),
        # task CPU seconds / study wall seconds: how many cores the study got (at most 1 or 2)
        "cores_used": cores_used,
        "identical_results_1_vs_2_workers": all(
            values["1"][k]["final_train_loss"] == v["final_train_loss"] for k, v in values["2"].items()),
        "overhead_per_task_s": overhead_s,
        "overhead_fraction_of_60s_task": overhead_s / 60.0,
        "overhead_goal_fraction": 0.05,
        "serial_overhead_per_task_s": serial_overhead_s,
        "targets": {
            "speedup_2_vs_1_workers": target(median["1"] / median["2"], ">=", 1.7,
                                             f"8 digits K-FAC runs, 1 thread a worker; load average "
                                             f"{load_before[0]:.1f} before on {executors.available_cores()} "
                                             "cores (a shared machine lowers it)"),
            "overhead_fraction_of_60s_task": target(overhead_s / 60.0, "<", 0.05,
                                                    "engine time per no-op task / 60 s"),
        },
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
