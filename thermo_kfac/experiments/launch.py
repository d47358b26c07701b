"""Launching data-parallel runs: torchrun/SLURM environment, relaunch through torchrun, the
``distributed`` command-line options and the batch helpers the training loop uses.

The library side (config, placement, communication, the K-FAC glue) is :mod:`thermo_kfac.distributed`;
this module is the experiments' entry into it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hw_models.validation import check_positive
from thermo_kfac.distributed import (
    ASSIGNMENT_RULES,
    FUSIONS,
    PLACEMENT_MODES,
    DistributedConfig,
    is_distributed,
    rank,
    world_size,
)

__all__ = ["add_arguments", "child_start_method", "config_from_args", "free_port", "global_mean",
           "init_from_environment", "is_loopback", "launch_cli", "launch_environment",
           "loopback_interface", "relaunch_with_torchrun", "shard", "wrap_model"]


def free_port() -> int:
    """A TCP port that is free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) names this machine's loopback interface."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_interface() -> str | None:
    """The name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS), or None."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)


def _loopback_store(launch: dict[str, int], address: str, port: int) -> dist.TCPStore:
    """The process group's key-value store for a launch on this machine, listening on loopback only.

    torch's own ``env://`` store (started by rank 0) listens on every interface whatever
    ``MASTER_ADDR`` says; handing it a socket already bound to 127.0.0.1 keeps it local."""
    from torch.distributed.constants import default_pg_timeout

    # "localhost" may resolve to ::1 first: one literal address for the server and its clients
    address = "127.0.0.1" if address.strip().lower() == "localhost" else address.strip("[]")
    fd = None
    if launch["rank"] == 0:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        server = socket.create_server((address, port), family=family, backlog=128)
        fd = server.detach()  # the store owns the listening socket from now on
    return dist.TCPStore(address, port, launch["world_size"], is_master=launch["rank"] == 0,
                         timeout=default_pg_timeout, wait_for_workers=False, master_listen_fd=fd)


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

    A loopback ``MASTER_ADDR`` (127.0.0.1, ``localhost``: a launch on this machine, as
    :func:`relaunch_with_torchrun` makes) keeps every socket on loopback: rank 0's store is bound
    to it and gloo/NCCL use the loopback interface (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``,
    unless set). Otherwise the group is joined as torch does by default (``env://``).
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
    backend = "nccl" if cuda else "gloo"
    address = os.environ["MASTER_ADDR"]
    # torchrun's shared agent store: the ranks are its clients (torch's env:// handles that)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if not is_loopback(address) or agent_store:
        dist.init_process_group(backend, rank=launch["rank"], world_size=launch["world_size"])
        return launch
    interface = loopback_interface()
    if interface is not None:  # gloo binds to the hostname's address, NCCL to a non-loopback NIC
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    store = _loopback_store(launch, address, int(os.environ["MASTER_PORT"]))
    dist.init_process_group(backend, store=store, rank=launch["rank"], world_size=launch["world_size"])
    return launch


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored afterwards."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def relaunch_with_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m thermo_kfac.cli <argv>`` in ``nproc`` processes through torchrun's launcher
    (``torch.distributed.launcher``) and return the exit code: 0, or 1 when a rank failed
    (torchrun then stops the others).

    Nothing listens beyond loopback: the launcher's c10d rendezvous keeps its store in a private
    temporary file (``store_type=file``) instead of a TCP server on every interface, it shares no
    TCP store with the ranks (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), and the ranks get
    ``MASTER_ADDR=127.0.0.1``, so :func:`init_from_environment` binds their store to loopback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_positive("nproc", nproc, integer=True)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"thermo-kfac-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="", rdzv_configs={"store_type": "file"},
                          local_addr="127.0.0.1", max_restarts=0)
    try:
        with _environment(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"):
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
    group.add_argument("--overlap-backward", action="store_true",
                       help="all-reduce each layer's factor statistics during the backward pass "
                            "(empirical Fisher only)")
    group.add_argument("--fusion", default="dynamic", choices=FUSIONS,
                       help="with --overlap-backward: dynamic fusion buckets planned from the profiled "
                            "backward (default) or one all-reduce per layer")


def config_from_args(args: Any) -> DistributedConfig | None:
    """The :class:`DistributedConfig` of the ``distributed`` options (:func:`add_arguments`), for
    ``KFACPreconditioner(distributed=DistributedKFAC(config_from_args(args)))``: None outside a
    process group of more than one rank (so a single process runs undistributed).
    Call it after the process group is joined, i.e. inside :func:`launch_cli`'s ``run``."""
    if not is_distributed():
        return None
    return DistributedConfig(placement=args.placement, assignment=args.assignment,
                             analog_units_per_rank=args.analog_units_per_rank,
                             defer_factor_reduction=args.defer_factor_reduction,
                             overlap_backward=getattr(args, "overlap_backward", False),
                             fusion=getattr(args, "fusion", "dynamic"))


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
