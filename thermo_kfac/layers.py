"""The public per-layer seam of :class:`~thermo_kfac.KFACPreconditioner`.

``precond.layer_table`` is a :class:`LayerTable`: the registered layers in registration order,
each a :class:`LayerState` (its adapter, Kronecker factors, solver and counters). Code that builds
on the preconditioner (distributed K-FAC, experiments, tests) reads and changes layers through
it and through the preconditioner's public methods, never through private attributes.

What others may do with it:

* read everything (``table[name]``, iteration, :meth:`LayerTable.factors`, the counters);
* replace a solver (:meth:`LayerTable.replace_solver`), load solver states into the existing
  solvers, average the factors ``A``/``G`` in place, drop stale fallbacks
  (:meth:`LayerTable.drop_fallbacks`).

The statistics fields (``a_sum``, ``a_rows``, ``g_sum``, ``a_batch``, ``g_batch``) belong to the
capture of the current step and are written only by the preconditioner's hooks.

:class:`StepHooks` is the other half of the seam: the points of ``step()``, ``state_dict()`` and
``load_state_dict()`` at which an extension (:class:`thermo_kfac.distributed.DistributedKFAC`)
takes part. Its methods do nothing by default, so a single-process preconditioner runs the same
code path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from thermo_kfac.capture import LayerAdapter
from thermo_kfac.solvers.base import KFACSolver

if TYPE_CHECKING:
    from thermo_kfac.preconditioner import KFACPreconditioner


@dataclass
class LayerState:
    """Everything the preconditioner tracks for one registered layer.

    Attributes:
        adapter: turns the layer's inputs, output gradients and parameter gradients into
            matrices (:mod:`thermo_kfac.capture`).
        solver: prepared from the damped factors, applied to the gradient matrix every step.
        A, G: the EMA Kronecker factors (``None`` before the first factor update).
        a_sum, a_rows, g_sum: statistics of the current step (capture only).
        a_batch, g_batch: raw rows of the current step, kept only for solvers with
            ``uses_batch_statistics`` (capture only).
        fired_forward, fired_backward: whether the hooks fired (checked after the first step).
        skipped_updates: factor updates skipped for NaN/Inf statistics, plus failed prepares.
        fallback: the fallback solver, prepared lazily on the first fallback after a factor update.
        fallbacks: steps whose preconditioned gradient came from the fallback solver.
        prepare_failed: the last ``prepare()`` raised: the fallback serves until the next one.
        last_fallback_step: the last step (``precond.steps`` then) that fell back.
        prepare_warned: the failed-prepare warning was issued (once per layer).
        handles: removable hook handles of the layer.
    """

    adapter: LayerAdapter
    solver: KFACSolver
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    a_sum: torch.Tensor | None = None
    a_rows: int = 0
    g_sum: torch.Tensor | None = None
    a_batch: list[torch.Tensor] = field(default_factory=list)
    g_batch: list[torch.Tensor] = field(default_factory=list)
    fired_forward: bool = False
    fired_backward: bool = False
    skipped_updates: int = 0
    fallback: KFACSolver | None = None
    fallbacks: int = 0
    prepare_failed: bool = False
    last_fallback_step: int = -1
    prepare_warned: bool = False
    handles: list[Any] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        """The device of the layer's weight (where its factors and solver state live)."""
        return self.adapter.weight.device

    @property
    def has_factors(self) -> bool:
        """Whether both Kronecker factors have been computed."""
        return self.A is not None and self.G is not None

    def reset_statistics(self) -> None:
        """Forget the current step's accumulated statistics."""
        self.a_sum = self.g_sum = None
        self.a_rows = 0


class PreconditionedGradient(NamedTuple):
    """One layer's result of :meth:`KFACPreconditioner.precondition_layers`."""

    state: LayerState
    grad: torch.Tensor
    result: torch.Tensor


class LayerTable(Mapping[str, LayerState]):
    """Ordered ``{layer name: LayerState}`` of a preconditioner (module docs); a read-only mapping
    plus the few changes others may make."""

    def __init__(self) -> None:
        self._states: dict[str, LayerState] = {}

    def __getitem__(self, name: str) -> LayerState:
        try:
            return self._states[name]
        except KeyError:
            raise KeyError(f"no registered layer named {name!r}; layers: {list(self._states)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def add(self, name: str, state: LayerState) -> None:
        """Register a layer (the preconditioner's registration; names are unique)."""
        if name in self._states:
            raise ValueError(f"a layer named {name!r} is already registered; choose another name")
        self._states[name] = state

    def solver_for(self, name: str) -> KFACSolver:
        """The solver of layer ``name``."""
        return self[name].solver

    def replace_solver(self, name: str, solver: KFACSolver) -> None:
        """Give layer ``name`` a new solver (keeping its ``layer_index``); its fallback is dropped."""
        state = self[name]
        solver.layer_index = state.solver.layer_index
        state.solver = solver
        state.fallback = None

    def drop_fallbacks(self) -> None:
        """Forget every prepared fallback solver (stale after new factors)."""
        for state in self._states.values():
            state.fallback = None

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (A, G)}`` of the layers whose factors have been computed."""
        return {name: (s.A, s.G) for name, s in self._states.items() if s.A is not None}

    def factor_tensors(self) -> list[torch.Tensor]:
        """``[A, G, A, G, ...]`` of the layers with both factors, in layer order (in-place use)."""
        return [m for s in self._states.values() if s.has_factors for m in (s.A, s.G)]

    def fallbacks(self) -> dict[str, int]:
        """Fallback steps per layer."""
        return {name: s.fallbacks for name, s in self._states.items()}

    def skipped_updates(self) -> dict[str, int]:
        """Skipped factor updates per layer."""
        return {name: s.skipped_updates for name, s in self._states.items()}

    @property
    def uses_batch_statistics(self) -> bool:
        """Whether any layer's solver works from the current batch's rows."""
        return any(s.solver.uses_batch_statistics for s in self._states.values())

    @property
    def device(self) -> torch.device:
        """The device of the first layer's weight."""
        return next(iter(self._states.values())).device


class StepHooks:
    """Where an extension takes part in a preconditioner's step and state (module docs).

    The defaults are those of a single process: every layer is solved here, nothing is shared.
    """

    rank: int = 0
    world_size: int = 1

    def owns(self, name: str) -> bool:
        """Whether this process prepares layer ``name``'s solver."""
        return True

    def begin_step(self, precond: KFACPreconditioner) -> None:
        """Start of ``step()``, before any factor update."""

    def factors_updated(self, precond: KFACPreconditioner, inverse_update: bool) -> None:
        """After a factor update (``inverse_update``: the solvers are prepared next)."""

    def before_inverse_update(self, precond: KFACPreconditioner) -> None:
        """Before the owned solvers are prepared."""

    def after_inverse_update(self, precond: KFACPreconditioner) -> None:
        """After the owned solvers were prepared."""

    def precondition(self, precond: KFACPreconditioner, reports: dict[str, Any]
                     ) -> list[PreconditionedGradient]:
        """The preconditioned gradients to write into ``.grad``."""
        return precond.precondition_layers(reports)

    def report(self) -> dict[str, Any] | None:
        """Extra entry ``last_report["distributed"]`` (None: no entry)."""
        return None

    def prepare_state_dict(self, precond: KFACPreconditioner) -> None:
        """Before ``state_dict()`` reads the layers."""

    def finish_state_dict(self, precond: KFACPreconditioner, state: dict[str, Any]) -> None:
        """After ``state_dict()`` built ``state`` (may add entries)."""

    def after_load(self, precond: KFACPreconditioner, state: dict[str, Any]) -> None:
        """After ``load_state_dict(state)`` restored the layers."""
