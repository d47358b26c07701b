"""The torchrun launcher of ``thermo-kfac train`` (temporary shim on this branch).

The launcher functions still live in :mod:`thermo_kfac.distributed`; this module re-exports them
under their future home so that the training commands import them from one place, and adds
:func:`config_from_args`, which turns the CLI's distributed options into the
:class:`~thermo_kfac.distributed.DistributedConfig` passed to each preconditioner (instead of a
mutable module default).
"""

from __future__ import annotations

from typing import Any

from thermo_kfac.distributed import (
    DistributedConfig,
    add_arguments,
    child_start_method,
    free_port,
    global_mean,
    init_from_environment,
    launch_cli,
    launch_environment,
    relaunch_with_torchrun,
    shard,
    wrap_model,
)

__all__ = ["add_arguments", "child_start_method", "config_from_args", "free_port", "global_mean",
           "init_from_environment", "launch_cli", "launch_environment", "relaunch_with_torchrun", "shard",
           "wrap_model"]


def config_from_args(args: Any) -> DistributedConfig | None:
    """The :class:`DistributedConfig` set by the options of :func:`add_arguments` (``--placement``,
    ``--assignment``, ``--analog-units-per-rank``, ``--defer-factor-reduction``); None when the
    parsed ``args`` have no distributed options (a command without them)."""
    if not hasattr(args, "placement"):
        return None
    return DistributedConfig(placement=args.placement, assignment=args.assignment,
                             analog_units_per_rank=args.analog_units_per_rank,
                             defer_factor_reduction=args.defer_factor_reduction)
