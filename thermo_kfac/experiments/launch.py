"""Launching data-parallel runs: torchrun/SLURM environment, relaunch through torchrun, the
``distributed`` command-line options and the batch helpers the training loop uses.

The library side (config, placement, communication, the K-FAC glue) is :mod:`thermo_kfac.distributed`;
this module is the experiments' entry into it.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hw_models.validation import check_positive
from thermo_kfac.distributed import (
    ASSIGNMENT_RULES,
    PLACEMENT_MODES,
    DistributedConfig,
    is_distributed,
    rank,
    world_size,
)

__all__ = ["add_arguments", "child_start_method", "config_from_args", "free_port", "global_mean",
           "init_from_environment", "launch_cli", "launch_environment", "relaunch_with_torchrun",
           "shard", "wrap_model"]


def free_port() -> int:
    """A TCP port that is free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_start_method() -> str:
    """How to start local worker processes: ``"fork"`` where it is safe, else ``"spawn"``.

    Forked children inherit the imported torch (a fresh interpreter spends seconds importing it).
    With a CUDA build of torch, autograd starts device threads at the first backward in the
    parent, after which torch refuses to run backward in a forked child; those builds spawn.
    """
    return "fork" if torch.version.cuda is None and not torch.cuda.is_available() else "spawn"


def launch_environment() -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``)
    or SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``); None outside a launcher."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0))}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return {"rank": int(env["SLURM_PROCID"]), "world_size": int(env["SLURM_NTASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", 0))}
    return None


def init_from_environment(device: str = "cpu") -> dict[str, int] | None:
    """Join the process group described by the launcher's environment (gloo on CPU, nccl on CUDA).

    Returns the launch environment (None when not launched by torchrun/SLURM). Under SLURM
    ``MASTER_ADDR`` defaults to ``SLURM_LAUNCH_NODE_IPADDR`` and ``MASTER_PORT`` to 29500.
    """
    launch = launch_environment()
    if launch is None or launch["world_size"] <= 1:
        return launch
    if dist.is_initialized():
        return launch
    if "MASTER_ADDR" not in os.environ:
        address = os.environ.get("SLURM_LAUNCH_NODE_IPADDR")
        if address is None:
            raise ValueError("MASTER_ADDR is not set: export MASTER_ADDR=<host of rank 0> (and "
                             "MASTER_PORT) for a SLURM launch, or start with torchrun")
        os.environ["MASTER_ADDR"] = address
    os.environ.setdefault("MASTER_PORT", "29500")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(launch["local_rank"])
    dist.init_process_group("nccl" if cuda else "gloo", rank=launch["rank"],
                            world_size=launch["world_size"])
    return launch


def relaunch_with_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m thermo_kfac.cli <argv>`` in ``nproc`` processes through torchrun's launcher
    (``torch.distributed.launcher``, a c10d rendezvous on a free local port) and return the exit
    code: 0, or 1 when a rank failed (torchrun then stops the others)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_positive("nproc", nproc, integer=True)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"thermo-kfac-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "thermo_kfac.cli", *argv)
    except ChildFailedError as err:
        print(f"thermo-kfac: a rank failed: {err.format_msg()}", file=sys.stderr)
        return 1
    return 0


def global_mean(value: float) -> float:
    """The average of a per-rank number over all ranks (the number itself without a group)."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    if not is_distributed():
        return x, y
    r, p = rank(), world_size()
    if len(x) < p:
        raise ValueError(f"a batch of {len(x)} examples cannot be split over {p} ranks; use "
                         f"--batch-size >= {p}")
    return torch.tensor_split(x, p)[r], torch.tensor_split(y, p)[r]


def wrap_model(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group of more than one rank, else ``model``."""
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def add_arguments(parser: Any) -> None:
    """The ``distributed`` option group of ``thermo-kfac train``."""
    group = parser.add_argument_group(
        "distributed", "data-parallel training (torchrun on this machine, or an external torchrun/"
                       "SLURM launch: RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    group.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="processes on this machine; N > 1 relaunches through torchrun (gloo on "
                            "CPU, nccl with --device cuda); ignored under an external launcher")
    group.add_argument("--placement", default="comm_opt", choices=PLACEMENT_MODES,
                       help="comm_opt: owners broadcast solver states; mem_opt: owners broadcast "
                            "preconditioned gradients (default comm_opt)")
    group.add_argument("--assignment", default="balanced", choices=ASSIGNMENT_RULES,
                       help="layer-to-rank rule: balanced (LPT on predicted solve times) or round_robin")
    group.add_argument("--analog-units-per-rank", type=int, default=0, metavar="K",
                       help="thermodynamic units per rank priced by the placement cost model (default 0)")
    group.add_argument("--defer-factor-reduction", action="store_true",
                       help="all-reduce the factors only on inverse-update steps")


def config_from_args(args: Any) -> DistributedConfig | None:
    """The :class:`DistributedConfig` of the ``distributed`` options (:func:`add_arguments`), for
    ``KFACPreconditioner(distributed=DistributedKFAC(config_from_args(args)))``: None outside a
    process group of more than one rank (so a single process runs undistributed).
    Call it after the process group is joined, i.e. inside :func:`launch_cli`'s ``run``."""
    if not is_distributed():
        return None
    return DistributedConfig(placement=args.placement, assignment=args.assignment,
                             analog_units_per_rank=args.analog_units_per_rank,
                             defer_factor_reduction=args.defer_factor_reduction)


def launch_cli(args: Any, run: Any) -> int:
    """Run ``run()`` (a CLI command) as one rank of a process group, or relaunch it with torchrun.

    Outside a launcher, ``--nproc N > 1`` starts ``N`` copies of the same command through torchrun;
    inside one (torchrun or SLURM) this process joins the group, uses ``cuda:LOCAL_RANK`` for a
    CUDA ``--device`` and leaves the group when ``run`` returns. ``run`` passes
    :func:`config_from_args` to the preconditioner (there is no process-wide default config).
    """
    nproc = check_positive("--nproc", args.nproc, integer=True)
    launch = launch_environment()
    if launch is None or launch["world_size"] <= 1:
        if nproc > 1:
            return relaunch_with_torchrun(nproc, args.argv)
        return int(run() or 0)
    init_from_environment(args.device)
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{launch['local_rank']}"
    try:
        return int(run() or 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
