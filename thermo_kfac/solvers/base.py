"""The protocol every per-layer Kronecker solver implements, and the solver registry.

K-FAC approximates a layer's curvature block by ``kron(G, A)`` acting on the row-major
flattened gradient matrix ``V`` of shape ``(d_out, d_in)``; the damped system
``kron(G + lam_G I, A + lam_A I) vec(X) = vec(V)`` has the solution
``X = (G + lam_G I)^-1 V (A + lam_A I)^-1``. A solver gets the factors every
``inverse_update_every`` steps (:meth:`KFACSolver.prepare`) and applies the inverse to the
gradient every step (:meth:`KFACSolver.apply`).

Solvers that model hardware (the thermodynamic solver, for instance) report the predicted
hardware time and energy of each call in :attr:`KFACSolver.last_report`.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from hw_models.validation import check_positive


@dataclass(frozen=True)
class Damping:
    """Damping of one layer's Kronecker block.

    ``value`` is the Tikhonov damping ``lambda`` of the full block. Solvers use the factored form
    ``(A + pi*sqrt(lambda) I) kron (G + sqrt(lambda)/pi I)``; ``pi`` is 1 unless ``pi_damping`` is
    on, in which case it balances the factors' average eigenvalues (Martens & Grosse 2015, sec 6.3):
    ``pi = sqrt((tr A / dim A) / (tr G / dim G))``. Solvers that can apply the exact damping
    ``kron(G, A) + lambda I`` (eigh with ``exact_damping=True``) use ``value`` directly.
    """

    value: float
    pi_damping: bool = False

    def __post_init__(self) -> None:
        check_positive("damping", self.value, allow_zero=True)

    def split(self, A: torch.Tensor, G: torch.Tensor) -> tuple[float, float]:
        """Return ``(lam_A, lam_G)`` for the factored damping of ``A`` and ``G``."""
        gamma = math.sqrt(self.value)
        pi = 1.0
        if self.pi_damping:
            tr_a = float(torch.diagonal(A).mean())
            tr_g = float(torch.diagonal(G).mean())
            # A factor can be all zero (a dead layer); fall back to pi = 1 rather than divide by 0.
            if tr_a > 0 and tr_g > 0 and math.isfinite(tr_a) and math.isfinite(tr_g):
                pi = math.sqrt(tr_a / tr_g)
        return pi * gamma, gamma / pi


class SolverFailure(RuntimeError):
    """THE failure channel of the solver protocol: :meth:`KFACSolver.prepare` or
    :meth:`KFACSolver.apply` raises it when the solver cannot serve the layer (an analog device
    that cannot represent a factor, a non-finite input, a failed accuracy check).

    The preconditioner always turns it into its digital fallback for that layer: from
    ``prepare`` until the next successful prepare, from ``apply`` for that step; each step served
    by the fallback is counted in ``fallbacks()``. A solver that raised in ``prepare`` keeps its
    previous preparation.
    """


@dataclass
class SolverReport:
    """What one solver call cost on the hardware it models.

    ``hardware_time_s``/``energy_j`` are predictions of the modelled device (``None`` for purely
    digital solvers, whose cost is the measured wall time). ``info`` carries solver specifics
    (iterations, analog time, saturation counts, ...).
    """

    hardware_time_s: float | None = None
    energy_j: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


class KFACSolver(ABC):
    """One layer's solver for the damped Kronecker system.

    Subclasses set :attr:`name`, implement :meth:`prepare` and :meth:`apply`, and store what they
    need for :meth:`apply` in tensors returned by :meth:`state_dict` (so a resumed run applies
    exactly the same inverse as an uninterrupted one).
    """

    name: ClassVar[str] = "base"
    #: Whether the solver runs on the (simulated) analog device: the policy prices such layers on
    #: the thermodynamic preset and counts their fallbacks.
    analog: ClassVar[bool] = False
    #: The digital operation the solver is priced as (or, for an analog solver, stands in for) by
    #: the cost model: ``"eigh"`` (also the upper bound used for the randomized and CG solvers),
    #: ``"cholesky"`` or ``"inverse"``. :func:`digital_method_of` resolves it from a name.
    digital_method: ClassVar[str] = "eigh"
    #: Constructor options that take a cost-model preset, mapped to which preset the policy fills
    #: in when the spec leaves them out: ``"thermo"`` (the thermodynamic device) or ``"digital"``.
    preset_options: ClassVar[dict[str, str]] = {}
    #: Solvers that work from the current batch (e.g. matrix-free CG) set this; the
    #: preconditioner then captures every step and calls :meth:`observe_batch` before :meth:`apply`.
    uses_batch_statistics: ClassVar[bool] = False
    #: The keyword options the constructor takes, declared so that callers (the noise study's
    #: ``--sweep`` keys) read them instead of inspecting the signature; empty: not declared.
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.last_report: SolverReport | None = None
        #: Position of the layer this copy serves (set by the preconditioner), so that solvers
        #: drawing random numbers give every layer its own stream from one ``seed``.
        self.layer_index = 0
        #: State the solvers of one preconditioner share (set by the preconditioner; a solver used
        #: alone keeps its own): e.g. the thermo device's units, which the layers time-share.
        self.shared: dict[str, Any] = {}

    def observe_batch(self, a_rows: torch.Tensor, g_rows: torch.Tensor) -> None:
        """The current step's rows, scaled so that ``a_rows.T @ a_rows`` and ``g_rows.T @ g_rows``
        are this batch's A and G factors (bias column included). Only called when
        :attr:`uses_batch_statistics` is true."""
        return None  # most solvers only need the EMA factors given to prepare()

    @abstractmethod
    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        """Factorize or otherwise precompute from the factors ``A`` (d_in) and ``G`` (d_out).

        Raises :class:`SolverFailure` when the solver cannot serve the layer."""

    @abstractmethod
    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        """Return ``(G + lam_G I)^-1 grad (A + lam_A I)^-1`` for ``grad`` of shape (d_out, d_in).

        Raises :class:`SolverFailure` when the result would be unusable."""

    @property
    def ready(self) -> bool:
        """Whether :meth:`prepare` has run (or state was loaded)."""
        return bool(self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """Tensors and values needed by :meth:`apply`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for key, value in state.items():
            setattr(self, key, value)

    def pricing_settings(self) -> dict[str, Any]:
        """What the cost model needs to price this solver's layer.

        Always ``digital_method``; an analog solver adds ``method`` (``"solve"`` or
        ``"inverse"``: how the analog device is used) and ``bits`` (converter bits, ``None`` for
        ideal converters), and may add its run settings (``analog_time``, ``burn_in``,
        ``kappa0``, ``copies``, the ``device``/``host`` preset names) and what it simulates:
        ``ideal``, ``converters`` (the converter bits, ranges, rails, mismatch and read noise the
        simulator runs with), ``input_scale`` and the warm-start reload (``warm_start``,
        ``held_states``, ``reload_bits``; each call's ``reloaded_values`` are in its report).
        ``thermo_device`` (the device object it simulates) is what it is priced on; a solver that
        deflates adds ``deflate``, ``max_deflate``, ``target_error``, ``max_analog_time`` and
        ``feasibility_margin``, and :mod:`hw_models.layer_cost` prices it by its own rule.
        """
        return {"digital_method": self.digital_method}


SolverFactory = Callable[[], KFACSolver]
_REGISTRY: dict[str, type[KFACSolver]] = {}


def register_solver(cls: type[KFACSolver]) -> type[KFACSolver]:
    """Class decorator: make ``cls`` available by ``cls.name`` in :func:`make_solver`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a solver named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_solvers() -> list[str]:
    """Names accepted by ``KFACPreconditioner(solver=...)``."""
    return sorted(_REGISTRY)


def registered_solver(name: str) -> type[KFACSolver] | None:
    """The solver class registered as ``name``, or ``None`` (e.g. a per-layer rule's name)."""
    return _REGISTRY.get(name)


def digital_method_of(solver: Any) -> str:
    """The :attr:`KFACSolver.digital_method` of ``solver``.

    ``solver`` is a solver class or instance, a registered name, or a spec with a ``name``
    (:class:`thermo_kfac.policy.SolverSpec`); anything else (``None``, a per-layer rule or
    policy) gets the base default, ``"eigh"``.
    """
    if isinstance(solver, KFACSolver) or (isinstance(solver, type) and issubclass(solver, KFACSolver)):
        return solver.digital_method
    name = solver if isinstance(solver, str) else getattr(solver, "name", None)
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    return (cls or KFACSolver).digital_method


def solver_factory(solver: str | KFACSolver | type[KFACSolver],
                   options: dict[str, Any] | None = None) -> SolverFactory:
    """Turn a solver name, class or prototype instance into a factory of per-layer solvers."""
    options = dict(options or {})
    if isinstance(solver, str):
        if solver not in _REGISTRY:
            raise ValueError(f"solver={solver!r} is not valid; choose one of: "
                             f"{', '.join(available_solvers())}")
        cls = _REGISTRY[solver]
        _check_options(cls, options)
        return lambda: cls(**options)
    if isinstance(solver, type) and issubclass(solver, KFACSolver):
        _check_options(solver, options)
        return lambda: solver(**options)
    if isinstance(solver, KFACSolver):
        if options:
            raise ValueError("solver_options cannot be combined with a solver instance; "
                             "configure the instance instead")
        # Each layer needs its own state, so the given instance serves as a prototype.
        return lambda: copy.deepcopy(solver)
    raise ValueError(f"solver={solver!r} must be a solver name ({', '.join(available_solvers())}), "
                     "a KFACSolver subclass or instance")


def _check_options(cls: type[KFACSolver], options: dict[str, Any]) -> None:
    try:
        cls(**options)
    except TypeError as err:
        raise ValueError(f"invalid solver_options {options!r} for solver {cls.name!r}: {err}") from None
