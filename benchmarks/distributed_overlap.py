"""Factor statistics reduced during the backward pass vs factors reduced after it (2 gloo ranks, CPU),
and the cost model's distributed step for the same choices at cluster scale.

Two ranks train an MLP 784-1024-1024-1024-10 (``--quick``: 64-256-256-10) with K-FAC on halves of
a global batch of 512 (factors every step, inverses every 10 steps, eigh) in three modes,
interleaved round by round: ``overlap`` (``DistributedConfig(overlap_backward=True)``, dynamic
fusion buckets), ``overlap-layer`` (the same, one all-reduce per layer) and ``after_backward``.
Reported: mean and median step time (forward, backward, ``precond.step``, SGD step) per mode, the
bytes each mode sent for factors or statistics per step, and the overlap counters (share of the
backward-launched reductions, and of their bytes, already complete when ``step()`` began;
collectives; the planned buckets; the fitted all-reduce ``alpha``/``beta``; time blocked waiting).

``cost_model``: :func:`hw_models.cost.distributed_step` for ResNet-50 and ViT-B/16 (per-rank batch
32, H100, factors every step) on 8 and 64 ranks over the ``ib100`` network: the step time, exposed
communication and overlap fraction of ``after_backward`` and of ``overlap`` with per-layer and
dynamic buckets.

    python benchmarks/distributed_overlap.py [--quick] [--rounds 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from thermo_kfac import KFACPreconditioner
from thermo_kfac import distributed as kd
from thermo_kfac.experiments import launch

from _report import emit

STEPS_PER_BLOCK = 10


MODES = ("overlap", "overlap-layer", "after_backward")


def _setup(widths: list[int], mode: str) -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    precond = KFACPreconditioner(model, loss="cross_entropy", optimizer=opt, factor_update_every=1,
                                 inverse_update_every=STEPS_PER_BLOCK,
                                 distributed=kd.DistributedKFAC(kd.DistributedConfig(
                                     overlap_backward=mode != "after_backward",
                                     fusion="layer" if mode == "overlap-layer" else "dynamic")))
    return model, opt, precond


def _worker(rank: int, world: int, port: int, out: str, widths: list[int], rounds: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        runs = {mode: _setup(widths, mode) for mode in MODES}
        times: dict[str, list[float]] = {mode: [] for mode in runs}
        gen = torch.Generator().manual_seed(0)
        for _ in range(rounds):
            for mode, (model, opt, precond) in runs.items():
                for _ in range(STEPS_PER_BLOCK):
                    x = torch.randn(512, widths[0], generator=gen)
                    y = torch.randint(0, widths[-1], (512,), generator=gen)
                    x, y = launch.shard(x, y)
                    dist.barrier()
                    start = time.perf_counter()
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    precond.step()
                    opt.step()
                    times[mode].append(time.perf_counter() - start)
        steps = rounds * STEPS_PER_BLOCK
        result = {}
        for mode, (_, _, precond) in runs.items():
            report = precond.last_report["distributed"]
            sent = {k: v / steps for k, v in report["bytes"].items() if k in ("factors", "factor_statistics")}
            result[mode] = {"step_ms_mean": 1e3 * statistics.mean(times[mode]),
                            "step_ms_median": 1e3 * statistics.median(times[mode]),
                            "factor_bytes_per_step": sent, "overlap": report.get("overlap")}
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _cost_model() -> list[dict[str, Any]]:
    from hw_models.cost import KFACSchedule, Scenario, distributed_step
    from hw_models.devices import digital_device, thermo_device
    from hw_models.workloads import workload

    scenario = Scenario(digital_device("h100"), thermo_device("chip"),
                        schedule=KFACSchedule(factor_every=1, inverse_every=10))
    rows = []
    for name in ("resnet50", "vit-b16"):
        work = workload(name, batch=32)
        for ranks in (8, 64):
            for mode, fusion in (("after_backward", "fixed"), ("overlap", "layer"), ("overlap", "dynamic")):
                rows.append(distributed_step(work, scenario, world_size=ranks, net="ib100", mode=mode,
                                             fusion=fusion).summary())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    widths = [64, 256, 256, 10] if args.quick else [784, 1024, 1024, 1024, 10]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.pt")
        mp.start_processes(_worker, args=(2, launch.free_port(), out, widths, args.rounds), nprocs=2,
                           join=True, start_method=launch.child_start_method())
        result = torch.load(out, weights_only=False)
    emit({"script": "benchmarks/distributed_overlap.py" + (" --quick" if args.quick else ""),
          "world_size": 2, "backend": "gloo", "widths": widths, "global_batch": 512,
          "steps": args.rounds * STEPS_PER_BLOCK, "python": sys.version.split()[0], "results": result,
          "cost_model": _cost_model()},
         args.out)


if __name__ == "__main__":
    main()
