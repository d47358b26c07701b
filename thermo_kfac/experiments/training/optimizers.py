"""The optimizer factory: a resolved optimizer spec -> a torch optimizer (and K-FAC's preconditioner)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hw_models.defaults import DEFAULT_DIGITAL, DEFAULT_THERMO
from thermo_kfac.distributed import DistributedConfig, DistributedKFAC, is_distributed
from thermo_kfac.experiments.training.options import (
    ADAPTIVE,
    FACTOR_DTYPES,
    OptimizerSpec,
    parse_adaptive_options,
)
from thermo_kfac.grammar import parse_solver_map

__all__ = ["build_optimizer"]


def _base_optimizer(name: str, params: Any, options: dict[str, Any]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=options["lr"], momentum=options["momentum"],
                               weight_decay=options["weight_decay"])
    return torch.optim.Adam(params, lr=options["lr"], betas=(options["beta1"], options["beta2"]),
                            eps=options["eps"], weight_decay=options["weight_decay"])


def _curvature_optimizer(name: str, model: nn.Module, options: dict[str, Any]) -> torch.optim.Optimizer:
    """AdaFisher or Eva, which capture their own statistics and apply their own step."""
    from thermo_kfac import AdaFisher, Eva

    if name == "adafisher":
        return AdaFisher(model, lr=options["lr"], beta=options["beta"],
                         gamma=(options["gamma1"], options["gamma2"]), damping=options["damping"],
                         update_every=options["update_every"], weight_decay=options["weight_decay"],
                         decoupled_weight_decay=options["decoupled_weight_decay"])
    return Eva(model, lr=options["lr"], momentum=options["momentum"], weight_decay=options["weight_decay"],
               damping=options["damping"], kl_clip=options["kl_clip"], stat_decay=options["stat_decay"],
               update_every=options["update_every"])


def _strategy(config: DistributedConfig | None) -> DistributedKFAC | None:
    """K-FAC's distribution strategy: inside a process group of more than one rank, ``config``
    (None: ``DistributedConfig()``); outside one, none."""
    return DistributedKFAC(config or DistributedConfig()) if is_distributed() else None


def build_optimizer(spec: OptimizerSpec, model: nn.Module, options: dict[str, Any], loss: str,
                    seed: int = 0, *, distributed: DistributedConfig | None = None
                    ) -> tuple[torch.optim.Optimizer, Any]:
    """``(torch optimizer, KFACPreconditioner or None)`` for one run with the resolved ``options``;
    for ``kfac-adaptive`` ``(thermo_kfac.KFAC, its preconditioner)`` (a step is ``opt.train_step(x, y)``).

    ``distributed``: how K-FAC spreads its work when a process group of more than one rank is
    running (the CLI's ``--placement`` ...; None: ``DistributedConfig()``); without a group it is
    ignored. The preconditioner receives it as a :class:`~thermo_kfac.distributed.DistributedKFAC`.
    """
    if spec.name in ("adafisher", "eva"):
        return _curvature_optimizer(spec.name, model, options), None
    if spec.name == "kld-wrm":
        from thermo_kfac.kld_wrm import KLDWRM

        keys = ("lr", "stat_decay", "damping", "kl_clip", "momentum", "weight_decay", "update_every")
        return KLDWRM(model, variant=options["kld_variant"], **{k: options[k] for k in keys}), None
    if spec.name == ADAPTIVE:  # thermo_kfac.KFAC: forward, backward and update in its train_step
        from thermo_kfac import KFAC

        values = {k: v for k, v in options.items() if k != "solver_options"}
        kwargs = parse_adaptive_options({**values, **options.get("solver_options", {})})
        preconditioner = {"seed": seed, "distributed": _strategy(distributed)}
        kfac = KFAC(model, loss=loss, preconditioner_options=preconditioner, **kwargs)
        return kfac, kfac.preconditioner
    if spec.name != "kfac":
        return _base_optimizer(spec.name, model.parameters(), options), None
    from thermo_kfac import KFACPreconditioner
    from thermo_kfac.policy import SolverPolicy

    opt = _base_optimizer(options["base"], model.parameters(), options)
    curvature = options.get("curvature", "kfac")
    if curvature != "kfac" and options.get("solver_map"):
        raise ValueError(f"solver_map cannot be combined with curvature={curvature!r}: the "
                         "Kronecker-SVD curvatures use their own solver on every layer")
    rules = parse_solver_map(options["solver_map"]) if options.get("solver_map") else ()
    policy = SolverPolicy(rules=rules, hardware=options.get("hardware", DEFAULT_THERMO),
                          digital=options.get("digital", DEFAULT_DIGITAL))
    precond = KFACPreconditioner(
        model, loss=loss, reduction="mean", fisher_type=options["fisher_type"],
        damping=options["damping"], pi_damping=options["pi_damping"],
        factor_decay=options["factor_decay"], factor_update_every=options["factor_update_every"],
        inverse_update_every=options["inverse_update_every"], solver=options["solver"],
        solver_options=options.get("solver_options"), kl_clip=options["kl_clip"], optimizer=opt,
        factor_dtype=FACTOR_DTYPES[options["factor_dtype"]], seed=seed,
        # the Kronecker-SVD curvatures bring their own solver: no per-layer map for them
        solver_map=policy if curvature == "kfac" else None,
        kfac_approx=options.get("kfac_approx", "expand"), curvature=curvature,
        distributed=_strategy(distributed))
    return opt, precond
