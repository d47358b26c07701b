"""Distributed K-FAC on 2 processes (gloo, CPU) and the placement simulator on 64 ranks.

Part 1, measured: two ranks train the MNIST auto-encoder (784-1000-500-250-30-...-784, batch
1000; ``--quick``: the digits-sized 64-256-128-32-...-64, batch 200; DDP, global batch split in
halves) with data-parallel SGD and with K-FAC in each placement mode
(``comm_opt``, ``mem_opt``, and ``comm_opt`` with deferred factor reduction). Modes are interleaved
round by round; each block covers one whole inverse-update cycle, so the amortized factor and
inverse work is included. Reported: mean step time per mode, its ratio to SGD, and the payload
bytes per step that the K-FAC communication layer sent (factors as upper triangles, solver
states, preconditioned gradients, metadata); DDP's own gradient all-reduce is the same for all
modes and not counted.

Part 2, modelled: the placement simulator's solve-phase makespan for ResNet-50's 2L factor
inversions on 64 ranks (H100 eigh times from hw_models), balanced (LPT) vs round-robin.

    python benchmarks/distributed.py [--quick] [--rounds 2] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from thermo_kfac import KFACPreconditioner
from thermo_kfac import distributed as kd
from thermo_kfac.experiments import launch
from thermo_kfac.experiments.placement import simulate
from thermo_kfac.models import AutoEncoder

from _report import emit

MODES = {
    "sgd": None,
    "kfac_comm_opt": dict(placement="comm_opt"),
    "kfac_mem_opt": dict(placement="mem_opt"),
    "kfac_comm_opt_deferred": dict(placement="comm_opt", defer_factor_reduction=True),
}


def _autoencoder(config: dict) -> nn.Module:
    return AutoEncoder(config["input"], tuple(config["widths"]), "sigmoid")


def _make(mode: str, config: dict, seed: int = 0):
    batch, factor_every, inverse_every = config["batch"], config["factor_every"], config["inverse_every"]
    torch.manual_seed(seed)
    model = _autoencoder(config)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    precond = None
    if MODES[mode] is not None:
        precond = KFACPreconditioner(ddp, loss="bce", damping=1e-2, kl_clip=1e-3, optimizer=opt,
                                     factor_update_every=factor_every, inverse_update_every=inverse_every,
                                     distributed=kd.DistributedKFAC(kd.DistributedConfig(**MODES[mode])))
    g = torch.Generator().manual_seed(seed)
    x_global = torch.rand(batch, config["input"], generator=g)
    x, _ = launch.shard(x_global, x_global)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        loss = F.binary_cross_entropy_with_logits(ddp(x), x)
        loss.backward()
        if precond is not None:
            precond.step()
        opt.step()

    return step, precond


def _worker(rank: int, world: int, port: int, out: str, args: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    launch.init_from_environment("cpu")  # gloo, every socket on loopback
    try:
        runs = {m: _make(m, args) for m in MODES}
        block = args["inverse_every"]  # one whole inverse-update cycle per timing block
        for step, _ in runs.values():  # warm-up: allocator, LAPACK, gloo connections
            step()
        times: dict[str, list[float]] = {m: [] for m in MODES}
        bytes_before = {m: dict(p.last_report["distributed"]["bytes"]) if p else {}
                        for m, (_, p) in runs.items()}
        for _ in range(args["rounds"]):
            for mode, (step, _) in runs.items():
                dist.barrier()
                start = time.perf_counter()
                for _ in range(block):
                    step()
                dist.barrier()
                times[mode].append((time.perf_counter() - start) / block)
        steps = args["rounds"] * block
        per_step = {}
        for mode, (_, precond) in runs.items():
            after = precond.last_report["distributed"]["bytes"] if precond else {}
            per_step[mode] = {k: (v - bytes_before[mode].get(k, 0)) / steps for k, v in after.items()}
        owned = [None] * world
        dist.all_gather_object(owned, runs["kfac_comm_opt"][1].last_report["distributed"]["owned_layers"])
        if rank == 0:
            with open(out, "w") as fh:
                json.dump({"times": times, "bytes_per_step": per_step, "owned_layers": owned}, fh)
    finally:
        dist.destroy_process_group()


def _factor_bytes(dims: list[tuple[int, int]], triangle: bool) -> int:
    sizes = [n for i, o in dims for n in (i + 1, o)]
    return 4 * sum(n * (n + 1) // 2 if triangle else n * n for n in sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="digits-sized auto-encoder 64-256-128-32-..-64, batch 200, short cycles")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = (dict(input=64, widths=[256, 128, 32], batch=200, factor_every=5, inverse_every=10,
                   rounds=args.rounds or 2) if args.quick
              else dict(input=784, widths=[1000, 500, 250, 30], batch=1000, factor_every=10,
                        inverse_every=100, rounds=args.rounds or 2))
    world = 2
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        mp.start_processes(_worker, args=(world, launch.free_port(), out, config), nprocs=world, join=True,
                           start_method=launch.child_start_method())
        with open(out) as fh:
            measured = json.load(fh)

    medians = {m: statistics.median(t) for m, t in measured["times"].items()}
    dims = [(m.in_features, m.out_features) for m in _autoencoder(config).modules()
            if isinstance(m, nn.Linear)]
    factor_updates_per_step = 1 / config["factor_every"]
    triangle = _factor_bytes(dims, True)
    full = _factor_bytes(dims, False)
    comm_bytes = measured["bytes_per_step"]["kfac_comm_opt"]
    deferred_bytes = measured["bytes_per_step"]["kfac_comm_opt_deferred"]
    sim = simulate(["resnet50"], [64], [0])["rows"][0]

    targets = {
        "placement_resnet50_64_balanced_over_round_robin": {
            "value": sim["balanced_s"] / sim["round_robin_s"], "target": "< 1.0",
            "met": sim["balanced_s"] < sim["round_robin_s"],
            "note": "solve-phase makespan ratio, 108 factor inversions on 64 ranks (SPD-KFAC's direction)"},
        "factor_bytes_vs_full_matrices": {
            "value": comm_bytes["factors"] / (full * factor_updates_per_step), "target": "<= 0.51",
            "met": comm_bytes["factors"] <= 0.51 * full * factor_updates_per_step,
            "note": "all-reduced factor payload per step over sending full n x n factors"},
        "deferred_factor_bytes_ratio": {
            "value": deferred_bytes["factors"] / comm_bytes["factors"],
            "target": f"== {config['factor_every'] / config['inverse_every']:g}",
            "met": abs(deferred_bytes["factors"] / comm_bytes["factors"]
                       - config["factor_every"] / config["inverse_every"]) < 1e-9,
            "note": "deferred reduction: one all-reduce per inverse update instead of per factor update"},
    }
    report = {
        "benchmark": "distributed",
        "quick": args.quick,
        "world_size": world,
        "backend": f"gloo (CPU), {launch.child_start_method()}-started processes, 1 thread each",
        "config": config,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "torch": torch.__version__},
        "step_time_s": medians,
        "step_time_ratio_to_sgd": {m: medians[m] / medians["sgd"] for m in medians},
        "step_times_all_rounds_s": measured["times"],
        "kfac_bytes_per_step": measured["bytes_per_step"],
        "factor_bytes_expected_per_update": {"upper_triangles": triangle, "full_matrices": full},
        "owned_layers_comm_opt": measured["owned_layers"],
        "placement_resnet50_64_ranks": sim,
        "targets": targets,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
