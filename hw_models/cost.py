"""K-FAC's curvature work per layer and per training step on digital and thermodynamic hardware.

The step model: pure functions of ``(n_in, n_out, batch, spectra or kappa, eps or window, devices)``
returning a :class:`~hw_models.pricing.Cost` (seconds and joules *per training step*; periodic work
amortized) with a per-component breakdown. Every analog job and digital decomposition inside is
priced by :mod:`hw_models.pricing` (the one implementation); this module only composes them.

Digital K-FAC, per layer (factors ``A``: ``n_a = n_in + bias``, ``G``: ``n_g = n_out``; ``R``
positions per example, so ``rows = batch * R`` rows of statistics):

- factor accumulation every ``factor_every`` steps: two GEMMs, ``2 rows n_a^2`` and ``2 rows n_g^2``;
- decomposition every ``inverse_every`` steps: ``eigh`` (or Cholesky, or explicit inverse) of both
  factors;
- preconditioning every step: ``G^-1 V A^-1``, four GEMMs with eigenvectors, two with inverses or
  Cholesky factors.

Thermodynamic K-FAC, per layer: factor accumulation stays digital. Method ``"inverse"`` (the seed
paper's method 1) inverts both damped factors by sampling every ``inverse_every`` steps and leaves
two host GEMMs per step; method ``"solve"`` (method 2) solves ``(G + lam) X = V`` (``n_a`` columns)
then ``(A + lam) Y^T = X^T`` (``n_g`` columns) every step. Each analog job's time and accuracy come
from :func:`hw_models.pricing.price`: the window for the target ``eps`` (or a fixed window, with the
accuracy reported) from the finite-time error law of :mod:`hw_models.langevin.error_model`, for
the layer's factor spectra (measured :class:`~hw_models.pricing.SpectrumSummary`, or the geometric
model at the scenario's ``kappa``).

Breakdown components on the analog side are ``transfer``, ``programming``, ``burn_in``,
``averaging`` and ``readout`` (:data:`ANALOG_COMPONENTS`); ``factor_accumulation`` and
``preconditioning`` run on the host. Systems larger than the device follow the oversize rule of
:func:`hw_models.pricing.fit_blocks`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hw_models.devices import PRECISIONS, DigitalDevice, ThermoDevice
from hw_models.langevin import error_model
from hw_models.pricing import (
    AnalogJob,
    Cost,
    Price,
    SpectrumSummary,
    ThermoCapacityError,
    gemm_time,
    price,
    price_digital,
    price_program,
)
from hw_models.validation import check_choice, check_number, check_positive

THERMO_METHODS = ("inverse", "solve", "best")
DIGITAL_METHODS = ("eigh", "cholesky", "inverse")
SWEEP_AXES = ("width", "kappa", "bits", "bandwidth", "eps", "tau", "units", "inverse_every", "precision")

#: Bytes moved per parameter by one fused Adam update in fp32: read p, g, m, v; write p, m, v.
ADAM_BYTES_PER_PARAM = 28.0


@dataclass(frozen=True)
class KFACSchedule:
    """How often K-FAC does its periodic work, and how the digital baseline does it."""

    factor_every: int = 1
    inverse_every: int = 10
    digital_method: str = "eigh"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_positive("factor_every", self.factor_every, integer=True)
        check_positive("inverse_every", self.inverse_every, integer=True)
        check_choice("digital_method", self.digital_method, DIGITAL_METHODS)
        check_choice("precision", self.precision, PRECISIONS)


class _Ledger:
    """Accumulates seconds and joules per component."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.j: dict[str, float] = {}

    def add(self, component: str, seconds: float = 0.0, joules: float = 0.0, scale: float = 1.0) -> None:
        self.s[component] = self.s.get(component, 0.0) + seconds * scale
        self.j[component] = self.j.get(component, 0.0) + joules * scale

    def merge(self, cost: Cost, scale: float = 1.0, prefix: str = "") -> None:
        for key, value in cost.breakdown_s.items():
            self.add(prefix + key, value, cost.breakdown_j.get(key, 0.0), scale)

    def cost(self, **info: Any) -> Cost:
        return Cost(sum(self.s.values()), sum(self.j.values()), dict(self.s), dict(self.j), info)


# --------------------------------------------------------------------------------------------
# Digital primitives
# --------------------------------------------------------------------------------------------


def digital_op_time(op: str, n: float, device: DigitalDevice, precision: str = "fp32") -> float:
    """Seconds for one ``op`` (``gemm``, ``cholesky``, ``eigh``, ``inverse``) on an ``n x n`` operand."""
    return device.op_time(op, n, precision)


def _layer_dims(n_in: int, n_out: int, batch: int, positions: float, bias: bool) -> tuple[int, int, float]:
    check_positive("n_in", n_in, integer=True)
    check_positive("n_out", n_out, integer=True)
    check_positive("batch", batch, integer=True)
    check_positive("positions", positions)
    if not isinstance(bias, bool):
        raise ValueError(f"bias={bias!r} must be True or False")
    return n_in + int(bias), n_out, batch * float(positions)


def _factor_accumulation(ledger: _Ledger, n_a: int, n_g: int, rows: float, host: DigitalDevice,
                         schedule: KFACSchedule) -> None:
    seconds = (gemm_time(n_a, rows, n_a, host, schedule.precision)
               + gemm_time(n_g, rows, n_g, host, schedule.precision))
    ledger.add("factor_accumulation", seconds, seconds * host.power_w, 1.0 / schedule.factor_every)


def digital_layer_cost(n_in: int, n_out: int, batch: int, *, device: DigitalDevice,
                       positions: float = 1.0, bias: bool = True,
                       schedule: KFACSchedule | None = None) -> Cost:
    """Per-step K-FAC curvature work of one layer on a digital device (forward/backward excluded).

    Components: ``factor_accumulation``, ``decomposition`` (amortized over ``inverse_every``) and
    ``preconditioning``.
    """
    schedule = schedule or KFACSchedule()
    n_a, n_g, rows = _layer_dims(n_in, n_out, batch, positions, bias)
    ledger = _Ledger()
    _factor_accumulation(ledger, n_a, n_g, rows, device, schedule)
    method, prec = schedule.digital_method, schedule.precision
    decomposition = (price_digital(method, n_a, device=device, precision=prec).seconds
                     + price_digital(method, n_g, device=device, precision=prec).seconds)
    ledger.add("decomposition", decomposition, decomposition * device.power_w, 1.0 / schedule.inverse_every)
    pair = gemm_time(n_g, n_g, n_a, device, prec) + gemm_time(n_g, n_a, n_a, device, prec)
    apply = pair * (2 if method == "eigh" else 1)
    ledger.add("preconditioning", apply, apply * device.power_w)
    return ledger.cost(device=device.name, method=method, factor_sizes=(n_a, n_g))


# --------------------------------------------------------------------------------------------
# Thermodynamic primitives: thin callers of hw_models.pricing (the one implementation)
# --------------------------------------------------------------------------------------------


def _check_accuracy(kappa: float, eps: float, bits: int | None) -> None:
    check_number("kappa", kappa, low=1.0)
    check_number("eps", eps, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    if bits is not None:
        check_number("bits", bits, low=1, high=32, integer=True)


def error_floor(n: int, kappa: float, bits: int) -> float:
    """Relative error that ``bits``-bit couplings alone cause in a size-``n`` solve, for the
    geometric model spectrum of condition number ``kappa``
    (:func:`hw_models.langevin.error_model.static_solve_error`'s coupling term)."""
    check_positive("n", n, integer=True)
    check_number("kappa", kappa, low=1.0)
    check_number("bits", bits, low=2, high=32, integer=True)
    lam, w = SpectrumSummary.from_kappa(n, kappa).normalized_modes()
    return error_model.static_solve_error(lam, weights=w, solution_norm2=1.0, coupling_bits=bits)


def _spectrum(n: int, kappa: float, spectrum: SpectrumSummary | None) -> SpectrumSummary:
    return spectrum if spectrum is not None else SpectrumSummary.from_kappa(n, kappa)


def thermo_solve_cost(n: int, n_rhs: int, *, kappa: float, eps: float, device: ThermoDevice,
                      bits: int | None = None, resident: bool = False,
                      settle_tau: float | None = None, average_tau: float | None = None,
                      spectrum: SpectrumSummary | None = None, start: str = "zero") -> Price:
    """Solve ``P X = B`` for ``n_rhs`` columns on the analog device (:func:`hw_models.pricing.price`).

    Without ``average_tau`` the window (and, unless ``settle_tau`` is given, the burn-in) is the
    one the error law needs for ``eps``; with it, that window is priced and ``eps`` only sets the
    ``reachable`` flag. ``spectrum`` replaces the geometric model spectrum of condition ``kappa``.
    """
    _check_accuracy(kappa, eps, bits)
    job = AnalogJob("solve", n, n_rhs, spectrum=_spectrum(n, kappa, spectrum),
                    window_tau=average_tau, target_eps=None if average_tau is not None else eps,
                    burn_in_tau=settle_tau, bits=bits, resident=resident, start=start)
    return price(job, device)


def thermo_program_cost(n: int, *, device: ThermoDevice, bits: int | None = None) -> Price:
    """Transfer and programming of an ``n x n`` matrix's couplings (see pricing.price_program)."""
    return price_program(n, device, bits=bits)


def thermo_inverse_cost(n: int, *, kappa: float, eps: float, device: ThermoDevice,
                        bits: int | None = None, host: DigitalDevice | None = None,
                        spectrum: SpectrumSummary | None = None,
                        average_tau: float | None = None, settle_tau: float | None = None) -> Price:
    """Invert an ``n x n`` SPD matrix by sampling on the analog device (:func:`hw_models.pricing.price`).

    Without on-chip accumulators every sample streams to the host, which forms the outer
    products; ``host`` then prices that work (required in that case).
    """
    _check_accuracy(kappa, eps, bits)
    job = AnalogJob("inverse", n, spectrum=_spectrum(n, kappa, spectrum), window_tau=average_tau,
                    target_eps=None if average_tau is not None else eps, burn_in_tau=settle_tau,
                    bits=bits)
    return price(job, device, host)


#: Breakdown components of a thermodynamic layer cost that run on the analog device (the rest
#: -- factor accumulation, preconditioning GEMMs -- runs on the host).
ANALOG_COMPONENTS = ("transfer", "programming", "burn_in", "averaging", "readout")


def thermo_layer_cost(n_in: int, n_out: int, batch: int, *, kappa: float, eps: float,
                      device: ThermoDevice, host: DigitalDevice, bits: int | None = None,
                      method: str = "inverse", positions: float = 1.0, bias: bool = True,
                      schedule: KFACSchedule | None = None, resident: bool = False,
                      spectra: tuple[SpectrumSummary, SpectrumSummary] | None = None,
                      window_tau: float | None = None, burn_in_tau: float | None = None,
                      start: str = "zero") -> Cost:
    """Per-step K-FAC curvature work of one layer with the linear algebra on the analog device.

    ``method``: ``"inverse"`` (invert both factors every ``inverse_every`` steps, two host GEMMs
    per step), ``"solve"`` (two matrix-right-hand-side solves every step) or ``"best"`` (the
    cheaper of the two). ``resident`` (solve only): the factors stay programmed between inverse
    updates, so their transfer and programming are amortized. ``spectra``: the damped factors'
    ``(A, G)`` spectra (default: the geometric model at ``kappa``). ``window_tau``: a fixed
    averaging window per job (its accuracy is reported in ``info["predicted_rel_error"]``) instead
    of the target ``eps``; ``burn_in_tau`` a fixed burn-in; ``start`` the solves' warm start.
    Raises :class:`ThermoCapacityError` when a factor exceeds the device and its policy is
    ``"refuse"``.
    """
    check_choice("method", method, THERMO_METHODS)
    schedule = schedule or KFACSchedule()
    _check_accuracy(kappa, eps, bits)
    options = dict(kappa=kappa, eps=eps, device=device, host=host, bits=bits, positions=positions,
                   bias=bias, schedule=schedule, resident=resident, spectra=spectra,
                   window_tau=window_tau, burn_in_tau=burn_in_tau, start=start)
    if method == "best":
        costs = [thermo_layer_cost(n_in, n_out, batch, method=m, **options)  # type: ignore[arg-type]
                 for m in ("inverse", "solve")]
        return min(costs, key=lambda c: c.seconds)
    n_a, n_g, rows = _layer_dims(n_in, n_out, batch, positions, bias)
    spec_a, spec_g = spectra if spectra is not None else (SpectrumSummary.from_kappa(n_a, kappa),
                                                          SpectrumSummary.from_kappa(n_g, kappa))
    ledger = _Ledger()
    _factor_accumulation(ledger, n_a, n_g, rows, host, schedule)
    target = None if window_tau is not None else eps
    parts: list[Price]
    if method == "inverse":
        parts = [price(AnalogJob("inverse", n, spectrum=spec, window_tau=window_tau, target_eps=target,
                                 burn_in_tau=burn_in_tau, bits=bits), device, host)
                 for n, spec in ((n_a, spec_a), (n_g, spec_g))]
        for part in parts:
            ledger.merge(part, 1.0 / schedule.inverse_every)
        apply = (gemm_time(n_g, n_g, n_a, host, schedule.precision)
                 + gemm_time(n_g, n_a, n_a, host, schedule.precision))
        ledger.add("preconditioning", apply, apply * host.power_w)
    else:
        parts = []
        for n, n_rhs, spec in ((n_g, n_a, spec_g), (n_a, n_g, spec_a)):
            job = AnalogJob("solve", n, n_rhs, spectrum=spec, window_tau=window_tau, target_eps=target,
                            burn_in_tau=burn_in_tau, bits=bits, start=start)
            fresh = price(job, device)
            if resident:
                kept = price(job.replace(resident=True), device)
                ledger.merge(kept)
                for key in fresh.breakdown_s:
                    extra_s = fresh.breakdown_s[key] - kept.breakdown_s.get(key, 0.0)
                    extra_j = fresh.breakdown_j[key] - kept.breakdown_j.get(key, 0.0)
                    ledger.add(key, extra_s, extra_j, 1.0 / schedule.inverse_every)
            else:
                ledger.merge(fresh)
            parts.append(fresh)
    errors = [p.predicted_rel_error or 0.0 for p in parts]
    return ledger.cost(device=device.name, host=host.name, method=method, factor_sizes=(n_a, n_g),
                       approximate=any(p.info["approximate"] for p in parts),
                       error_floor=max(p.info["error_floor"] for p in parts),
                       reachable=all(p.info["reachable"] for p in parts),
                       predicted_rel_error=max(errors),
                       kappa_measured=(spec_a.kappa, spec_g.kappa),
                       window_tau=[p.window_tau for p in parts], burn_in_tau=[p.burn_in_tau for p in parts])


# --------------------------------------------------------------------------------------------
# Whole training steps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """Everything a projection needs besides the workload: devices, accuracy, schedule.

    ``nongemm_factor`` scales the GEMM-model time of forward+backward to account for everything
    that is not a layer GEMM (norms, activations, softmax, data movement); 1.5 means a third of
    the pass is non-GEMM work [assumption].

    Analog schedule: ``analog_time`` (tau) fixes every job's averaging window (TNGD's ``t = k tau``;
    the accuracy is then reported from the law, not assumed) instead of the target ``eps``;
    ``burn_in`` fixes the burn-in; ``start`` is the solves' warm start. ``overlap``: the analog
    work of step t runs while step t+1 computes (the step takes the longer of the two);
    ``devices``: thermodynamic devices sharing the layers (the paper's "many solvers").
    Spectra: each factor gets the ``spectrum_shape`` model spectrum at condition number
    ``kappa_of(n)`` (a callable of the factor size, e.g. fitted to a run's trace) or ``kappa``.
    """

    digital: DigitalDevice
    thermo: ThermoDevice
    kappa: float = 100.0
    eps: float = 0.1
    bits: int | None = None
    method: str = "best"
    schedule: KFACSchedule = KFACSchedule()
    nongemm_factor: float = 1.5
    resident: bool = False
    analog_time: float | None = None
    burn_in: float | None = None
    start: str = "zero"
    overlap: bool = False
    devices: int = 1
    spectrum_shape: str = "geometric"
    kappa_of: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.digital, DigitalDevice):
            raise ValueError(f"digital={self.digital!r} must be a DigitalDevice")
        if not isinstance(self.thermo, ThermoDevice):
            raise ValueError(f"thermo={self.thermo!r} must be a ThermoDevice")
        _check_accuracy(self.kappa, self.eps, self.bits)
        check_choice("method", self.method, THERMO_METHODS)
        check_number("nongemm_factor", self.nongemm_factor, low=1.0)
        if self.analog_time is not None:
            check_positive("analog_time", self.analog_time)
        if self.burn_in is not None:
            check_positive("burn_in", self.burn_in, allow_zero=True)
        check_choice("start", self.start, ("zero", "gradient", "previous", "stationary"))
        check_positive("devices", self.devices, integer=True)
        check_choice("spectrum_shape", self.spectrum_shape, ("geometric", "worst"))
        if self.kappa_of is not None and not callable(self.kappa_of):
            raise ValueError(f"kappa_of={self.kappa_of!r} must be a callable of the factor size")

    def replace(self, **changes: Any) -> Scenario:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary of the assumptions."""
        return {"digital": self.digital.name, "thermo": self.thermo.to_dict(), "kappa": self.kappa,
                "eps": self.eps, "bits": self.bits, "method": self.method,
                "factor_every": self.schedule.factor_every, "inverse_every": self.schedule.inverse_every,
                "digital_method": self.schedule.digital_method, "precision": self.schedule.precision,
                "nongemm_factor": self.nongemm_factor, "resident": self.resident,
                "analog_time": self.analog_time, "burn_in": self.burn_in, "start": self.start,
                "overlap": self.overlap, "devices": self.devices,
                "spectrum_shape": self.spectrum_shape,
                "kappa_of": getattr(self.kappa_of, "description", None) if self.kappa_of else None}

    def factor_spectrum(self, n: int) -> SpectrumSummary:
        """The model spectrum of a size-``n`` damped factor under this scenario."""
        kappa = float(self.kappa_of(n)) if self.kappa_of is not None else self.kappa
        return SpectrumSummary.from_kappa(n, max(kappa, 1.0), shape=self.spectrum_shape)


@dataclass(frozen=True)
class LayerComparison:
    """One layer's per-step curvature cost on each side; ``thermo`` is None when it does not fit."""

    name: str
    kind: str
    n_in: int
    n_out: int
    positions: float
    bias: bool
    digital: Cost
    thermo: Cost | None
    note: str = ""

    @property
    def cheaper(self) -> str:
        """``"thermo"`` if the analog device is strictly faster for this layer, else ``"digital"``."""
        if self.thermo is not None and self.thermo.seconds < self.digital.seconds:
            return "thermo"
        return "digital"

    @property
    def hybrid_seconds(self) -> float:
        return min(self.digital.seconds, self.thermo.seconds) if self.thermo else self.digital.seconds

    @property
    def thermo_or_digital_seconds(self) -> float:
        """Thermodynamic time where the layer fits, digital time where it does not."""
        return self.thermo.seconds if self.thermo else self.digital.seconds

    @property
    def analog_seconds(self) -> float:
        """The part of the thermodynamic cost that occupies the analog device (0 if it does not fit)."""
        if self.thermo is None:
            return 0.0
        return sum(self.thermo.breakdown_s.get(k, 0.0) for k in ANALOG_COMPONENTS)

    @property
    def host_seconds(self) -> float:
        """The part of the thermodynamic cost that stays on the digital host."""
        return (self.thermo.seconds - self.analog_seconds) if self.thermo else self.digital.seconds


@dataclass(frozen=True)
class StepCost:
    """A whole training step: Adam, digital K-FAC and thermodynamic K-FAC (hybrid and thermo-only).

    Host time ``D = adam + sum(host parts of analog layers) + sum(digital layers)``; analog time
    ``A`` = the makespan of the analog layers over ``devices`` (``max(largest, total/devices)``).
    Without ``overlap`` the step takes ``D + A``; with it ``max(D, A)`` (the analog work of step
    t runs during step t+1). ``thermo_kfac_s`` is the hybrid a cost-aware policy builds (layers
    moved to the analog side greedily while the step gets shorter; without overlap and with one
    device that is each layer on its cheaper side); ``thermo_only_kfac_s`` puts every layer that
    fits on the analog device. The *update-only* figures leave forward+backward out (how the seed
    paper profiles the K-FAC update).
    """

    workload: str
    batch: int
    fwd_bwd_s: float
    optimizer_s: float
    layers: tuple[LayerComparison, ...]
    power_w: float
    overlap: bool = False
    devices: int = 1

    def _total(self, on_thermo: Sequence[bool]) -> float:
        parts, analog = [], []
        for layer, analog_side in zip(self.layers, on_thermo, strict=True):
            if analog_side:
                parts.append(layer.host_seconds)
                analog.append(layer.analog_seconds)
            else:
                parts.append(layer.digital.seconds)
        host = self.adam_s + sum(parts)  # summed as digital_kfac_s is: all-digital equals it exactly
        busy = max(max(analog, default=0.0), sum(analog) / self.devices)
        return max(host, busy) if self.overlap else host + busy

    @functools.cached_property
    def assignment(self) -> tuple[bool, ...]:
        """Which layers the hybrid runs on the analog device (greedy, see the class docs)."""
        chosen = [False] * len(self.layers)
        best = self._total(chosen)
        while True:
            move, move_total = None, best
            for i, layer in enumerate(self.layers):
                if chosen[i] or layer.thermo is None:
                    continue
                chosen[i] = True
                total = self._total(chosen)
                chosen[i] = False
                if total < move_total * (1 - 1e-12):
                    move, move_total = i, total
            if move is None:
                return tuple(chosen)
            chosen[move] = True
            best = move_total

    @property
    def adam_s(self) -> float:
        return self.fwd_bwd_s + self.optimizer_s

    @property
    def digital_kfac_s(self) -> float:
        return self.adam_s + sum(layer.digital.seconds for layer in self.layers)

    @property
    def thermo_kfac_s(self) -> float:
        return self._total(self.assignment)

    @property
    def thermo_only_kfac_s(self) -> float:
        return self._total([layer.thermo is not None for layer in self.layers])

    @property
    def speedup_vs_digital_kfac(self) -> float:
        return self.digital_kfac_s / self.thermo_kfac_s

    @property
    def adam_j(self) -> float:
        return self.adam_s * self.power_w

    @property
    def digital_kfac_j(self) -> float:
        return self.adam_j + sum(layer.digital.joules for layer in self.layers)

    @property
    def thermo_kfac_j(self) -> float:
        total = self.adam_j
        for layer, analog_side in zip(self.layers, self.assignment, strict=True):
            total += layer.thermo.joules if analog_side and layer.thermo else layer.digital.joules
        return total

    def update_only(self) -> dict[str, float]:
        """Optimizer-update-only times (forward+backward excluded) and their ratios."""
        adam = self.optimizer_s
        digital = self.digital_kfac_s - self.fwd_bwd_s
        thermo = self.thermo_kfac_s - self.fwd_bwd_s
        only = self.thermo_only_kfac_s - self.fwd_bwd_s
        return {"adam_update_s": adam, "digital_kfac_update_s": digital, "thermo_kfac_update_s": thermo,
                "thermo_only_kfac_update_s": only,
                "update_speedup_vs_digital_kfac": digital / thermo if thermo > 0 else math.inf,
                "update_speedup_thermo_only": digital / only if only > 0 else math.inf,
                "digital_update_overhead_vs_adam": digital / adam,
                "thermo_update_overhead_vs_adam": thermo / adam}

    def summary(self) -> dict[str, Any]:
        """The headline numbers (seconds, joules, ratios) as a JSON-ready dict."""
        return {
            "adam_s": self.adam_s, "digital_kfac_s": self.digital_kfac_s,
            "thermo_kfac_s": self.thermo_kfac_s, "speedup_vs_digital_kfac": self.speedup_vs_digital_kfac,
            "thermo_only_kfac_s": self.thermo_only_kfac_s,
            "speedup_thermo_only": self.digital_kfac_s / self.thermo_only_kfac_s,
            "fwd_bwd_s": self.fwd_bwd_s, "optimizer_s": self.optimizer_s,
            "digital_overhead_vs_adam": self.digital_kfac_s / self.adam_s,
            "thermo_overhead_vs_adam": self.thermo_kfac_s / self.adam_s,
            "adam_j": self.adam_j, "digital_kfac_j": self.digital_kfac_j, "thermo_kfac_j": self.thermo_kfac_j,
            "layers_on_thermo": sum(self.assignment),
            "layers_not_fitting": sum(layer.thermo is None for layer in self.layers),
            "layers": len(self.layers), "overlap": self.overlap, "devices": self.devices,
            **self.update_only(),
        }


def _layer_fields(layer: Any) -> tuple[str, str, int, int, float, bool]:
    """Accept any object with the :class:`hw_models.workloads.LayerShape` attributes."""
    return (str(layer.name), str(getattr(layer, "kind", "linear")), int(layer.d_in), int(layer.d_out),
            float(getattr(layer, "positions", 1.0)), bool(getattr(layer, "bias", True)))


def compare_layer(layer: Any, batch: int, scenario: Scenario) -> LayerComparison:
    """Digital vs thermodynamic per-step cost of one layer (a ``LayerShape``-like object)."""
    name, kind, d_in, d_out, positions, bias = _layer_fields(layer)
    digital = digital_layer_cost(d_in, d_out, batch, device=scenario.digital, positions=positions,
                                 bias=bias, schedule=scenario.schedule)
    try:
        n_a = d_in + int(bias)
        spectra = (scenario.factor_spectrum(n_a), scenario.factor_spectrum(d_out))
        thermo: Cost | None = thermo_layer_cost(
            d_in, d_out, batch, kappa=scenario.kappa, eps=scenario.eps, device=scenario.thermo,
            host=scenario.digital, bits=scenario.bits, method=scenario.method, positions=positions,
            bias=bias, schedule=scenario.schedule, resident=scenario.resident, spectra=spectra,
            window_tau=scenario.analog_time, burn_in_tau=scenario.burn_in, start=scenario.start)
        note = ""
    except ThermoCapacityError:
        thermo = None
        note = f"factor > {scenario.thermo.cells} cells: stays digital"
    return LayerComparison(name, kind, d_in, d_out, positions, bias, digital, thermo, note)


def forward_backward_time(workload: Any, scenario: Scenario) -> float:
    """GEMM-model time of forward + backward (three GEMMs per layer, plus ``extra_forward_flops``)."""
    device, precision = scenario.digital, scenario.schedule.precision
    total = 0.0
    for layer in workload.layers:
        _, _, d_in, d_out, positions, _ = _layer_fields(layer)
        rows = max(1.0, workload.batch * positions)
        total += 3.0 * gemm_time(rows, d_in, d_out, device, precision)
    extra = 3.0 * float(getattr(workload, "extra_forward_flops", 0.0)) * workload.batch
    if extra > 0:
        total += extra / (device.gemm.eff_max * device.peak(precision))
    return total * scenario.nongemm_factor


def step_cost(workload: Any, scenario: Scenario) -> StepCost:
    """Per-step time and energy of Adam, digital K-FAC and thermodynamic K-FAC for ``workload``.

    ``workload`` is a :class:`hw_models.workloads.Workload` (or anything with ``name``, ``batch``,
    ``layers`` and optionally ``extra_forward_flops``).
    """
    check_positive("batch", workload.batch, integer=True)
    if not workload.layers:
        raise ValueError(f"workload {workload.name!r} has no layers to precondition")
    layers = tuple(compare_layer(layer, workload.batch, scenario) for layer in workload.layers)
    params = sum(c.n_in * c.n_out + (c.n_out if c.bias else 0) for c in layers)
    device = scenario.digital
    optimizer = device.launch_latency_s + ADAM_BYTES_PER_PARAM * params / device.mem_bandwidth
    return StepCost(workload.name, workload.batch, forward_backward_time(workload, scenario), optimizer,
                    layers, device.power_w, overlap=scenario.overlap, devices=scenario.devices)


def break_even_kappa(workload: Any, scenario: Scenario, *, low: float = 1.0,
                     high: float = 1e8) -> float | None:
    """Largest kappa at which thermo-only K-FAC is at least as fast as digital K-FAC (bisection in
    log kappa), or None if it is slower even at ``kappa = low``; ``high`` if faster throughout."""

    def gain(kappa: float) -> float:
        step = step_cost(workload, scenario.replace(kappa=kappa))
        return step.digital_kfac_s - step.thermo_only_kfac_s

    if gain(low) < 0:
        return None
    if gain(high) >= 0:
        return high
    lo, hi = math.log(low), math.log(high)
    for _ in range(20):  # 2^-20 of ln(1e8): kappa to 2e-5 relative
        mid = 0.5 * (lo + hi)
        if gain(math.exp(mid)) >= 0:
            lo = mid
        else:
            hi = mid
    return math.exp(lo)


def default_sweep_values(axis: str) -> list[float]:
    """The x values a sweep uses when none are given."""
    check_choice("sweep", axis, SWEEP_AXES)
    if axis == "width":
        return [float(2**k) for k in range(6, 15)]
    if axis == "kappa":
        return [float(10 ** (k / 2)) for k in range(0, 11)]
    if axis == "bits":
        return [float(b) for b in range(4, 17, 2)]
    if axis == "eps":
        return [0.01, 0.03, 0.1, 0.3]
    if axis == "tau":
        return [1e-9, 1e-8, 1e-7, 1e-6, 1e-5]
    if axis == "units":
        return [1.0, 2.0, 4.0, 16.0, 64.0]
    if axis == "inverse_every":
        return [1.0, 3.0, 10.0, 30.0, 100.0]
    if axis == "precision":
        return [float(i) for i in range(len(PRECISIONS))]
    return [float(v) for v in (1e9, 3e9, 1e10, 3e10, 1e11, 3e11, 1e12)]


def sweep(axis: str, values: Sequence[float] | None, scenario: Scenario, *, workload: Any = None,
          width: int = 1024, batch: int = 1024) -> list[dict[str, Any]]:
    """Speed-up of thermodynamic over digital K-FAC along one axis.

    ``width``: one square layer of width x (``batch`` rows, one position), curvature work only.
    ``kappa`` / ``bits`` / ``bandwidth`` (bits per second) / ``eps`` / ``tau`` (seconds) /
    ``units`` / ``inverse_every`` / ``precision`` (x = index into ``fp32, tf32, bf16, fp64``): the
    whole step of ``workload`` if given (``thermo_s`` thermo-only, plus the hybrid), else the
    square layer of size ``width``.
    Points where nothing fits the device have ``thermo_s`` and ``speedup`` set to None.
    """
    check_choice("sweep", axis, SWEEP_AXES)
    values = list(values) if values is not None else default_sweep_values(axis)
    if not values:
        raise ValueError("a sweep needs at least one value")
    points = []
    for x in values:
        if axis != "precision":
            check_positive(axis, x)
        scen, n = scenario, width
        if axis == "width":
            n = check_positive("width", x, integer=True)
        elif axis == "kappa":
            scen = scenario.replace(kappa=float(x))
        elif axis == "bits":
            scen = scenario.replace(bits=check_number("bits", x, low=1, high=32, integer=True))
        elif axis == "eps":
            scen = scenario.replace(eps=float(x), analog_time=None, burn_in=None)
        elif axis == "tau":
            scen = scenario.replace(thermo=scenario.thermo.replace(tau_s=float(x)))
        elif axis == "units":
            scen = scenario.replace(thermo=scenario.thermo.replace(
                units=check_positive("units", x, integer=True)))
        elif axis == "inverse_every":
            scen = scenario.replace(schedule=dataclasses.replace(
                scenario.schedule, inverse_every=check_positive("inverse_every", x, integer=True)))
        elif axis == "precision":
            index = check_number("precision index", x, low=0, high=len(PRECISIONS) - 1, integer=True)
            scen = scenario.replace(schedule=dataclasses.replace(scenario.schedule,
                                                                 precision=PRECISIONS[index]))
        else:
            scen = scenario.replace(thermo=scenario.thermo.replace(io_bandwidth_bps=float(x)))
        if axis != "width" and workload is not None:
            step = step_cost(workload, scen)
            digital_s, thermo_s, hybrid_s = step.digital_kfac_s, step.thermo_only_kfac_s, step.thermo_kfac_s
            fits = any(layer.thermo is not None for layer in step.layers)
        else:
            square = _Square(int(n))
            layer = compare_layer(square, batch, scen)
            digital_s = layer.digital.seconds
            thermo_s = layer.thermo.seconds if layer.thermo else None
            hybrid_s = layer.hybrid_seconds
            fits = layer.thermo is not None
        points.append({
            "x": float(x), "digital_s": digital_s, "thermo_s": thermo_s if fits else None,
            "speedup": digital_s / thermo_s if fits and thermo_s else None,
            "hybrid_s": hybrid_s, "hybrid_speedup": digital_s / hybrid_s,
        })
    return points


@dataclass(frozen=True)
class _Square:
    d_in: int
    name: str = "square"
    kind: str = "linear"
    positions: float = 1.0
    bias: bool = False

    @property
    def d_out(self) -> int:
        return self.d_in
