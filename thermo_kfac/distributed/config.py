"""Configuration of distributed K-FAC.

A :class:`DistributedConfig` configures the strategy
(``KFACPreconditioner(distributed=DistributedKFAC(config))``); there is no mutable process-wide
default. The process-group queries live in :mod:`thermo_kfac.process_group`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hw_models.cost import NETWORKS
from hw_models.defaults import DEFAULT_DIGITAL, DEFAULT_EPS, DEFAULT_KAPPA, DEFAULT_THERMO
from hw_models.devices import digital_device, thermo_device
from hw_models.validation import check_choice, check_number, check_positive

PLACEMENT_MODES = ("comm_opt", "mem_opt")
ASSIGNMENT_RULES = ("balanced", "round_robin")
FUSIONS = ("dynamic", "layer")


@dataclass(frozen=True)
class DistributedConfig:
    """How K-FAC spreads its work over the ranks of a process group (module docs).

    Args:
        placement: ``"comm_opt"`` (owners broadcast solver states) or ``"mem_opt"`` (owners
            broadcast preconditioned gradients).
        assignment: ``"balanced"`` (LPT on predicted solve times) or ``"round_robin"``.
        analog_units_per_rank: thermodynamic solver units attached to each rank, priced as extra
            machines by the cost model (the code that runs is the configured solver).
        defer_factor_reduction: all-reduce the factors only on inverse-update steps.
        overlap_backward: all-reduce each layer's step statistics during the backward pass, as soon
            as they are complete, instead of the factors after it (:mod:`.overlap`; empirical
            Fisher only).
        fusion: with ``overlap_backward``, how the per-layer reductions are fused: ``"dynamic"``
            (buckets planned from the profiled backward timing and the all-reduce cost model,
            SPD-KFAC's dynamic tensor fusion) or ``"layer"`` (one all-reduce per layer).
        fusion_network: the all-reduce cost model of the dynamic plan: ``"measured"`` (fitted to
            timed all-reduces on the group) or a ``hw_models.cost.NETWORKS`` preset.
        average_gradients: average all parameter gradients across ranks in ``step()``; ``None``
            means "unless the model is wrapped in DistributedDataParallel".
        bucket_mb: size of one fused all-reduce/broadcast buffer, in MiB.
        digital, thermo: cost-model presets pricing a solve (``hw_models.devices``).
        kappa, eps: condition number and accuracy assumed for analog solve times.
        group: the process group (``None``: the default group).
    """

    placement: str = "comm_opt"
    assignment: str = "balanced"
    analog_units_per_rank: int = 0
    defer_factor_reduction: bool = False
    overlap_backward: bool = False
    fusion: str = "dynamic"
    fusion_network: str = "measured"
    average_gradients: bool | None = None
    bucket_mb: float = 25.0
    digital: str = DEFAULT_DIGITAL
    thermo: str = DEFAULT_THERMO
    kappa: float = DEFAULT_KAPPA
    eps: float = DEFAULT_EPS
    group: Any = None

    def __post_init__(self) -> None:
        check_choice("placement", self.placement, PLACEMENT_MODES)
        check_choice("assignment", self.assignment, ASSIGNMENT_RULES)
        check_choice("fusion", self.fusion, FUSIONS)
        check_choice("fusion_network", self.fusion_network, ("measured", *NETWORKS))
        check_positive("analog_units_per_rank", self.analog_units_per_rank, integer=True, allow_zero=True)
        for name in ("defer_factor_reduction", "overlap_backward"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.average_gradients is not None and not isinstance(self.average_gradients, bool):
            raise ValueError(f"average_gradients={self.average_gradients!r} must be True, False or None")
        check_positive("bucket_mb", self.bucket_mb)
        digital_device(self.digital)
        thermo_device(self.thermo)
        check_number("kappa", self.kappa, low=1.0)
        check_number("eps", self.eps, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
