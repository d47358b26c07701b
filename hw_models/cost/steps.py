"""Whole training steps: the K-FAC step of a workload on a digital and a hybrid machine, the
break-even condition number and parameter sweeps, built on the per-layer costs of
:mod:`hw_models.cost.layers`."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hw_models.cost.layers import (
    ADAM_BYTES_PER_PARAM,
    ANALOG_COMPONENTS,
    SWEEP_AXES,
    THERMO_METHODS,
    KFACSchedule,
    check_accuracy,
    digital_layer_cost,
    thermo_layer_cost,
)
from hw_models.defaults import DEFAULT_EPS, DEFAULT_KAPPA
from hw_models.devices import PRECISIONS, DigitalDevice, ThermoDevice
from hw_models.pricing import (
    Cost,
    SpectrumSummary,
    ThermoCapacityError,
    gemm_time,
)
from hw_models.validation import check_bits, check_choice, check_number, check_positive


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
    kappa: float = DEFAULT_KAPPA
    eps: float = DEFAULT_EPS
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
        check_accuracy(self.kappa, self.eps, self.bits)
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
            scen = scenario.replace(bits=check_bits("bits", x))
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
            square = SquareLayer(int(n))
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
class SquareLayer:
    """A square ``d_in x d_in`` linear layer: the layer of width sweeps and break-even maps."""

    d_in: int
    name: str = "square"
    kind: str = "linear"
    positions: float = 1.0
    bias: bool = False

    @property
    def d_out(self) -> int:
        return self.d_in

