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
capture of the current step and are written only by the preconditioner's hooks, except that a
distributed ``on_statistics`` callback may average ``a_sum`` and ``g_sum`` across ranks in place
before the factor update (:mod:`thermo_kfac.distributed.overlap`).

:class:`StepHooks` is the other half of the seam: the points of ``step()``, ``state_dict()`` and
``load_state_dict()`` at which an extension (:class:`thermo_kfac.distributed.DistributedKFAC`)
takes part. Its methods do nothing by default, so a single-process preconditioner runs the same
code path. An extension is built outside the preconditioner and passed in as a
:class:`DistributionStrategy` (``KFACPreconditioner(distributed=strategy)``), which the
preconditioner attaches once its layers are registered; it sees the preconditioner only as the
:class:`Preconditioner` protocol below, so the library never imports its extensions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from thermo_kfac.capture import LayerAdapter
from thermo_kfac.gram import gram
from thermo_kfac.process_group import is_distributed
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverFailure

# errors of a solver's prepare() that leave training running: the protocol's SolverFailure (a
# RuntimeError: an analog device that cannot represent the factor), and the linear algebra
# failures and ValueErrors a digital solver may raise
PREPARE_ERRORS = (SolverFailure, RuntimeError, torch.linalg.LinAlgError, ValueError)


@dataclass
class LayerState:
    """Everything the preconditioner tracks for one registered layer.

    Attributes:
        adapter: turns the layer's inputs, output gradients and parameter gradients into
            matrices (:mod:`thermo_kfac.capture`).
        solver: prepared from the damped factors, applied to the gradient matrix every step.
        A, G: the EMA Kronecker factors (``None`` before the first factor update).
        a_sum, a_rows, g_sum, g_weight: statistics of the current step (capture only); the
            factors' new terms are ``a_sum / a_rows`` and ``g_weight * g_sum``.
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
        step_calls, step_grads: calls of the layer captured in this factor step, and output
            gradients received for them; when equal, ``on_statistics`` callbacks are told (the
            step's statistics are complete: distributed reduction overlapped with the backward).
    """

    adapter: LayerAdapter
    solver: KFACSolver
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    a_sum: torch.Tensor | None = None
    a_rows: int = 0
    g_sum: torch.Tensor | None = None
    g_weight: float = 1.0
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
    step_calls: int = 0
    step_grads: int = 0
    on_statistics: list[Callable[[LayerState], None]] = field(default_factory=list)

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
        self.a_rows = self.step_calls = self.step_grads = 0

    # ------------------------------------------------------- capture (the preconditioner's hooks)
    def add_inputs(self, a: torch.Tensor, dtype: torch.dtype, factor_step: bool) -> None:
        """Accumulate one call's inputs: raw rows for batch-statistics solvers, and on factor
        steps ``rows^T rows`` and the row count (N R for expand, N for reduce), in ``dtype``."""
        # Factors are computed in factor_dtype, never in an autocast dtype.
        with torch.autocast(a.device.type, enabled=False):
            if self.solver.uses_batch_statistics:
                self.a_batch.append(self.adapter.input_rows(a).to(dtype))
            if factor_step:
                if a.is_floating_point():
                    a = a.to(dtype)
                contribution, n_rows = self.adapter.input_statistic(a)
                contribution = contribution.to(dtype)
                # out of place: the hooks may run under a torch.func transform (no in-place ops)
                self.a_sum = contribution if self.a_sum is None else self.a_sum + contribution
                self.a_rows += n_rows
                self.step_calls += 1
        self.fired_forward = True

    def add_output_grads(self, g: torch.Tensor, weight: float, dtype: torch.dtype,
                         factor_step: bool) -> None:
        """Accumulate one call's output gradients, each row's outer product weighted by ``weight``."""
        with torch.autocast(g.device.type, enabled=False):
            rows = self.adapter.output_rows(g).to(dtype)
            if self.solver.uses_batch_statistics:
                self.g_batch.append(rows * math.sqrt(weight))
            if factor_step:
                contribution = gram(rows)
                # the weight is applied in the EMA update (one pass fewer over the factor); a
                # second call of the layer in the step is added relative to the first's weight
                if self.g_sum is None or self.g_weight == 0:  # weight 0 contributed nothing
                    self.g_sum, self.g_weight = contribution, weight
                else:
                    self.g_sum = self.g_sum + contribution * (weight / self.g_weight)
                self.step_grads += 1
        self.fired_backward = True
        if factor_step and self.step_grads == self.step_calls:
            for callback in self.on_statistics:
                callback(self)

    def update_factors(self, decay: float) -> bool:
        """Fold the step's statistics into the EMA factors and reset them. Returns False when the
        statistics were non-finite: the update is skipped and counted in ``skipped_updates``."""
        finite = True
        if self.a_sum is not None and self.g_sum is not None and self.a_rows != 0:
            a_scale, g_scale = 1.0 / self.a_rows, self.g_weight
            # Both sums are Gram matrices X^T X: a NaN/Inf anywhere in X reaches the diagonal
            # (x_i x_i), and finite diagonals bound the rest (Cauchy-Schwarz), so the diagonals
            # decide, at O(d) instead of a pass over the d^2 entries.
            finite = bool(torch.isfinite(self.a_sum.diagonal().sum() + self.g_sum.diagonal().sum()))
            if not finite:
                self.skipped_updates += 1
            elif self.A is None or decay == 0.0:
                self.A, self.G = self.a_sum.mul_(a_scale), self.g_sum.mul_(g_scale)
            else:
                # decay * A + (1 - decay) * scale * sum, in place: no temporary factor
                self.A.mul_(decay).add_(self.a_sum, alpha=(1 - decay) * a_scale)
                self.G.mul_(decay).add_(self.g_sum, alpha=(1 - decay) * g_scale)
        self.reset_statistics()
        return finite

    def observe_batch(self) -> None:
        """Hand the step's raw rows to a batch-statistics solver (and forget them)."""
        a_batch, g_batch = self.a_batch, self.g_batch
        self.a_batch, self.g_batch = [], []
        if a_batch and g_batch:
            a_rows = torch.cat(a_batch)
            self.solver.observe_batch(a_rows / math.sqrt(a_rows.shape[0]), torch.cat(g_batch))

    # ------------------------------------------------------------------------------- solving
    def prepare(self, damping: Damping, can_fall_back: bool) -> Exception | None:
        """Prepare the solver from the damped factors. On one of :data:`PREPARE_ERRORS` the
        previous preparation stays, the failure is counted in ``skipped_updates`` and, if
        ``can_fall_back``, the fallback serves until the next prepare; the error is returned."""
        self.fallback = None  # stale: re-prepared from the new factors if it is needed again
        try:
            self.solver.prepare(self.A, self.G, damping)
            self.prepare_failed = False
        except PREPARE_ERRORS as err:
            self.skipped_updates += 1
            self.prepare_failed = can_fall_back
            return err
        return None

    def relative_residual(self, rhs: torch.Tensor, result: torch.Tensor, damping: Damping) -> float:
        """``||(G + lam_G I) X (A + lam_A I) - V|| / ||V||`` of ``X = result`` for ``V = rhs``."""
        assert self.A is not None and self.G is not None
        lam_a, lam_g = damping.split(self.A, self.G)
        left = self.G @ result + lam_g * result
        residual = left @ self.A + lam_a * left
        return float((residual - rhs).norm() / rhs.norm().clamp_min(1e-30))

    def fall_back(self, name: str, rhs: torch.Tensor, make_fallback: Callable[[], KFACSolver] | None,
                  damping: Damping, step: int, *, warn: bool = True,
                  reason: str | None = None) -> torch.Tensor:
        """:meth:`apply_fallback`, warning (once per layer, with the failure's ``reason``) that the
        solver's result was unusable."""
        if self.fallbacks == 0 and warn:
            why = f" ({reason})" if reason else ""
            warnings.warn(f"K-FAC: solver {type(self.solver).__name__} gave an unusable result on "
                          f"layer {name!r}{why}; using the fallback solver (counted in fallbacks(); "
                          "warned once per layer)", RuntimeWarning, stacklevel=7)
        assert make_fallback is not None, "no fallback solver configured"
        return self.apply_fallback(rhs, make_fallback, damping, step)

    def apply_fallback(self, rhs: torch.Tensor, make_fallback: Callable[[], KFACSolver],
                       damping: Damping, step: int) -> torch.Tensor:
        """Solve with the fallback solver (prepared lazily from the factors), counted at ``step``."""
        self.fallbacks += 1
        self.last_fallback_step = step
        if self.fallback is None:
            assert self.A is not None and self.G is not None
            self.fallback = make_fallback()
            self.fallback.prepare(self.A, self.G, damping)
        return self.fallback.apply(rhs)

    # --------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Factors, solver states and counters of the layer."""
        return {"A": self.A, "G": self.G, "solver": self.solver.state_dict(),
                "skipped_updates": self.skipped_updates, "fallbacks": self.fallbacks,
                "prepare_failed": self.prepare_failed,
                "fallback": None if self.fallback is None else self.fallback.state_dict()}

    def load_state_dict(self, saved: dict[str, Any],
                        make_fallback: Callable[[], KFACSolver] | None) -> None:
        """Restore :meth:`state_dict` (copies); the layer counts as having fired its hooks."""
        self.A, self.G = _clone(saved["A"]), _clone(saved["G"])
        self.solver.load_state_dict({k: _clone(v) for k, v in saved["solver"].items()})
        self.skipped_updates = int(saved["skipped_updates"])
        self.fallbacks = int(saved.get("fallbacks", 0))
        self.prepare_failed = bool(saved.get("prepare_failed", False))
        self.fallback = None
        if saved.get("fallback") and make_fallback is not None:
            self.fallback = make_fallback()
            self.fallback.load_state_dict({k: _clone(v) for k, v in saved["fallback"].items()})
        # A resumed run has already passed its first step.
        self.fired_forward = self.fired_backward = True


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


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
        #: what the layers' solvers share (``KFACSolver.shared``): ``"analog_layers"``, the indices
        #: of the layers on the analog device (their factors time-share its units)
        self.shared: dict[str, Any] = {}

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
        state.solver.shared = self.shared
        analog = self.shared.setdefault("analog_layers", [])
        if state.solver.analog and state.solver.layer_index not in analog:
            analog.append(state.solver.layer_index)  # the layers placed on the analog device's units
        self._states[name] = state

    def owner_of(self, param: torch.Tensor) -> str | None:
        """The registered layer one of whose parameters is ``param`` (None if none)."""
        for name, state in self._states.items():
            if any(p is param for p in state.adapter.parameters()):
                return name
        return None

    def tied_state(self, first: str, name: str, adapter: LayerAdapter) -> LayerState:
        """The state of ``first`` for layer ``name`` that uses the same weight in the same way
        (module type, shapes, bias, flavour): both calls are positions of one weight-sharing
        layer, so their statistics go into the same factors. Any other tie is refused."""
        state = self._states.get(first)
        other = None if state is None else state.adapter
        same = (other is not None and type(other) is type(adapter)
                and other.weight is adapter.weight and other.bias is adapter.bias
                and type(other.module) is type(adapter.module)
                and other.approx == adapter.approx)
        if state is None or not same:
            raise ValueError(
                f"K-FAC: layers {first!r} and {name!r} share the parameter {name}.weight (weight "
                "tying) but use it differently (module type, orientation, bias or K-FAC flavour), "
                "so no Kronecker factorization covers both uses. Fix: skip=[" + repr(name) + "] "
                f"(or {first!r}) to precondition the weight with the other layer's factors only, "
                "or skip both to leave it to the optimizer")
        return state

    def check_fired(self, hint: str) -> None:
        """Raise if a layer's hooks did not fire (after the first step), naming it and ``hint``."""
        silent = {n: "no forward" if not s.fired_forward else "no backward"
                  for n, s in self._states.items() if not (s.fired_forward and s.fired_backward)}
        if silent:
            detail = ", ".join(f"{n!r} ({why})" for n, why in silent.items())
            raise RuntimeError(
                f"K-FAC: the hooks of registered layer(s) {detail} never fired during the first "
                f"step. If a layer is unused or applied functionally, exclude it with "
                f"skip=[...]; otherwise {hint}. Registered layers: {list(self._states)}")

    def check_names(self, saved: Iterable[str]) -> None:
        """Raise unless ``saved`` names exactly the registered layers (resuming a checkpoint)."""
        if set(saved) != set(self._states):
            raise ValueError(f"state_dict layers {sorted(saved)} do not match the registered "
                             f"layers {sorted(self._states)}")

    def skip_curvature_update(self) -> None:
        """Drop this step's statistics of every layer, counting a skipped update for each."""
        for state in self._states.values():
            state.skipped_updates += 1
            state.reset_statistics()
            state.fired_backward = True  # skipped on purpose, not a hook problem

    def solver_for(self, name: str) -> KFACSolver:
        """The solver of layer ``name``."""
        return self[name].solver

    def replace_solver(self, name: str, solver: KFACSolver) -> None:
        """Give layer ``name`` a new solver (keeping its ``layer_index``); its fallback is dropped."""
        state = self[name]
        solver.layer_index = state.solver.layer_index
        solver.shared = state.solver.shared
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

    def begin_step(self, precond: Preconditioner) -> None:
        """Start of ``step()``, before any factor update."""

    def factors_updated(self, precond: Preconditioner, inverse_update: bool) -> None:
        """After a factor update (``inverse_update``: the solvers are prepared next)."""

    def before_inverse_update(self, precond: Preconditioner) -> None:
        """Before the owned solvers are prepared."""

    def after_inverse_update(self, precond: Preconditioner) -> None:
        """After the owned solvers were prepared."""

    def precondition(self, precond: Preconditioner, reports: dict[str, Any]
                     ) -> list[PreconditionedGradient]:
        """The preconditioned gradients to write into ``.grad``."""
        return precond.precondition_layers(reports)

    def report(self) -> dict[str, Any] | None:
        """Extra entry ``last_report["distributed"]`` (None: no entry)."""
        return None

    def prepare_state_dict(self, precond: Preconditioner) -> None:
        """Before ``state_dict()`` reads the layers."""

    def finish_state_dict(self, precond: Preconditioner, state: dict[str, Any]) -> None:
        """After ``state_dict()`` built ``state`` (may add entries)."""

    def after_load(self, precond: Preconditioner, state: dict[str, Any]) -> None:
        """After ``load_state_dict(state)`` restored the layers."""


class Preconditioner(Protocol):
    """What an extension may use of a :class:`~thermo_kfac.KFACPreconditioner` (its public seam)."""

    model: nn.Module  # as given (possibly wrapped in DistributedDataParallel)
    solver_spec: Any  # the ``solver=`` argument as given

    @property
    def layer_table(self) -> LayerTable: ...

    def precondition_layers(self, reports: dict[str, Any], names: set[str] | None = None
                            ) -> list[PreconditionedGradient]: ...

    def new_solver(self, name: str | None = None) -> KFACSolver: ...

    def rng_state(self) -> torch.Tensor | None: ...

    def set_rng_state(self, state: torch.Tensor) -> None: ...


class DistributionStrategy(Protocol):
    """How a preconditioner spreads its work over processes, built outside and passed in as
    ``KFACPreconditioner(distributed=strategy)`` (e.g.
    :class:`thermo_kfac.distributed.DistributedKFAC`)."""

    def attach(self, precond: Preconditioner) -> StepHooks:
        """Bind to ``precond`` once its layers are registered; the returned hooks take part in
        its steps and state (called once, from the preconditioner's constructor)."""
        ...


def attach_strategy(distributed: DistributionStrategy | bool | None, precond: Preconditioner) -> StepHooks:
    """The hooks of ``KFACPreconditioner(distributed=...)``: ``None`` (refused inside a process group
    of more than one rank, whose ranks' factors would silently differ) and ``False`` give the
    single-process :class:`StepHooks`; a strategy is attached to ``precond``."""
    if distributed is None and is_distributed():
        raise ValueError("a process group of more than one rank is initialized: pass distributed="
                         "thermo_kfac.distributed.DistributedKFAC(config) to share the K-FAC work across "
                         "ranks, or distributed=False to precondition every rank on its own")
    if distributed is None or distributed is False:
        return StepHooks()
    if not callable(getattr(distributed, "attach", None)):
        raise ValueError(f"distributed={distributed!r} must be None, False or a distribution strategy "
                         "with attach(precond), e.g. thermo_kfac.distributed.DistributedKFAC(config)")
    return distributed.attach(precond)
