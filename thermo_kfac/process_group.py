"""What the library needs to know about a ``torch.distributed`` process group, and nothing more.

The queries (:func:`is_distributed`, :func:`rank`, :func:`world_size`, :func:`is_main_process`),
:func:`unwrap` (the module inside ``DistributedDataParallel``) and :func:`check_resume` (whether a
checkpoint can continue at a world size). How K-FAC spreads its work over the ranks is a strategy
built by :mod:`thermo_kfac.distributed` and passed in (``KFACPreconditioner(distributed=...)``);
the library itself never imports that package.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

__all__ = ["check_resume", "is_distributed", "is_main_process", "rank", "unwrap", "world_size"]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the rank that prints and writes results."""
    return rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (so names lack ``module.``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def check_resume(state: dict[str, Any], world_size: int) -> None:
    """Raise if a checkpoint cannot continue at ``world_size``: only per-rank Monte-Carlo label
    streams (``fisher_type="mc"``) tie a K-FAC state to the world size it was saved at."""
    saved = state.get("distributed") or {}
    generators = saved.get("generators")
    if generators is not None and len(generators) != world_size:
        raise ValueError(
            f"this K-FAC checkpoint was saved at world size {len(generators)} with per-rank "
            f"Monte-Carlo label streams (fisher_type='mc'); they cannot continue at world size "
            f"{world_size}. Resume at world size {len(generators)}, or delete "
            "state['distributed']['generators'] to start fresh streams (seed + rank)")
