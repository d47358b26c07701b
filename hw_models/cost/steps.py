"""Whole training steps: the K-FAC step of a workload on a digital and a hybrid machine, the
break-even condition number and parameter sweeps, built on the per-layer costs of
:mod:`hw_models.cost.layers`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hw_models.cost.layers import (
    ADAM_BYTES_PER_PARAM,
    SWEEP_AXES,
    THERMO_METHODS,
    Cost,
    KFACSchedule,
    ThermoCapacityError,
    check_accuracy,
    digital_layer_cost,
    gemm_time,
    thermo_layer_cost,
)
from hw_models.devices import DigitalDevice, ThermoDevice
from hw_models.validation import check_choice, check_number, check_positive

# --------------------------------------------------------------------------------------------
# Whole training steps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """Everything a projection needs besides the workload: devices, accuracy, schedule.

    ``nongemm_factor`` scales the GEMM-model time of forward+backward to account for everything
    that is not a layer GEMM (norms, activations, softmax, data movement); 1.5 means a third of
    the pass is non-GEMM work [assumption].
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

    def __post_init__(self) -> None:
        if not isinstance(self.digital, DigitalDevice):
            raise ValueError(f"digital={self.digital!r} must be a DigitalDevice")
        if not isinstance(self.thermo, ThermoDevice):
            raise ValueError(f"thermo={self.thermo!r} must be a ThermoDevice")
        check_accuracy(self.kappa, self.eps, self.bits)
        check_choice("method", self.method, THERMO_METHODS)
        check_number("nongemm_factor", self.nongemm_factor, low=1.0)

    def replace(self, **changes: Any) -> Scenario:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary of the assumptions."""
        return {"digital": self.digital.name, "thermo": self.thermo.to_dict(), "kappa": self.kappa,
                "eps": self.eps, "bits": self.bits, "method": self.method,
                "factor_every": self.schedule.factor_every, "inverse_every": self.schedule.inverse_every,
                "digital_method": self.schedule.digital_method, "precision": self.schedule.precision,
                "nongemm_factor": self.nongemm_factor, "resident": self.resident}


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


@dataclass(frozen=True)
class StepCost:
    """A whole training step: Adam, digital K-FAC and thermodynamic K-FAC (hybrid and thermo-only).

    ``thermo_kfac_s`` puts each layer on whichever side is cheaper (the hybrid machine a
    cost-aware solver policy builds); ``thermo_only_kfac_s`` puts every layer that fits on the
    analog device.
    """

    workload: str
    batch: int
    fwd_bwd_s: float
    optimizer_s: float
    layers: tuple[LayerComparison, ...]
    power_w: float

    @property
    def adam_s(self) -> float:
        return self.fwd_bwd_s + self.optimizer_s

    @property
    def digital_kfac_s(self) -> float:
        return self.adam_s + sum(layer.digital.seconds for layer in self.layers)

    @property
    def thermo_kfac_s(self) -> float:
        return self.adam_s + sum(layer.hybrid_seconds for layer in self.layers)

    @property
    def thermo_only_kfac_s(self) -> float:
        return self.adam_s + sum(layer.thermo_or_digital_seconds for layer in self.layers)

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
        for layer in self.layers:
            total += layer.thermo.joules if layer.cheaper == "thermo" else layer.digital.joules
        return total

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
            "layers_on_thermo": sum(layer.cheaper == "thermo" for layer in self.layers),
            "layers_not_fitting": sum(layer.thermo is None for layer in self.layers),
            "layers": len(self.layers),
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
        thermo: Cost | None = thermo_layer_cost(
            d_in, d_out, batch, kappa=scenario.kappa, eps=scenario.eps, device=scenario.thermo,
            host=scenario.digital, bits=scenario.bits, method=scenario.method, positions=positions,
            bias=bias, schedule=scenario.schedule, resident=scenario.resident)
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
                    layers, device.power_w)


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
    for _ in range(40):
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
    return [float(v) for v in (1e9, 3e9, 1e10, 3e10, 1e11, 3e11, 1e12)]


def sweep(axis: str, values: Sequence[float] | None, scenario: Scenario, *, workload: Any = None,
          width: int = 1024, batch: int = 1024) -> list[dict[str, Any]]:
    """Speed-up of thermodynamic over digital K-FAC along one axis.

    ``width``: one square layer of width x (``batch`` rows, one position), curvature work only.
    ``kappa`` / ``bits`` / ``bandwidth`` (bits per second): the whole step of ``workload`` if
    given (``thermo_s`` thermo-only, plus the hybrid), else the square layer of size ``width``.
    Points where nothing fits the device have ``thermo_s`` and ``speedup`` set to None.
    """
    check_choice("sweep", axis, SWEEP_AXES)
    values = list(values) if values is not None else default_sweep_values(axis)
    if not values:
        raise ValueError("a sweep needs at least one value")
    points = []
    for x in values:
        check_positive(axis, x)
        scen, n = scenario, width
        if axis == "width":
            n = check_positive("width", x, integer=True)
        elif axis == "kappa":
            scen = scenario.replace(kappa=float(x))
        elif axis == "bits":
            scen = scenario.replace(bits=check_number("bits", x, low=1, high=32, integer=True))
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
