"""Latency and energy of K-FAC's curvature work on digital and thermodynamic hardware.

Cheap, pure functions of ``(n_in, n_out, batch, kappa, eps, bits, devices)`` that a solver or a
solver policy can call every training step. Every function returns a :class:`Cost`: seconds and
joules *per training step* (periodic work is amortized), with a per-component breakdown.

Digital K-FAC, per layer (factors ``A``: ``n_a = n_in + bias``, ``G``: ``n_g = n_out``; ``R``
positions per example, so ``rows = batch * R`` rows of statistics):

- factor accumulation every ``factor_every`` steps: two GEMMs, ``2 rows n_a^2`` and ``2 rows n_g^2``;
- decomposition every ``inverse_every`` steps: ``eigh`` (or Cholesky, or explicit inverse) of both
  factors, timed by the device's :class:`~hw_models.devices.OpModel`;
- preconditioning every step: ``G^-1 V A^-1``, four GEMMs with eigenvectors, two with inverses or
  Cholesky factors (two triangular solves cost one GEMM).

Thermodynamic K-FAC, per layer: factor accumulation stays digital; the linear algebra moves to the
analog device. Each analog job costs (time in units of tau = RC):

- transfer: ``n(n+1)/2`` couplings at ``dac_bits`` over the link (plus right-hand sides);
- programming: ``n`` rows at ``program_row_s`` each;
- settling (burn-in): ``kappa ln(1/eps)`` tau, the time for ``exp(-A t)`` to shrink the initial
  error ``||x0 - x*|| = ||x*||`` (cold start) by ``eps`` when ``lambda_max(A) = 1``;
- averaging: the error laws of thermo.md 2.1 [D], with ``lambda_max(A) = 1`` so ``A^-1 <= kappa``:

  * solve ``A x = b``: ``E||xbar - x*||^2 = 2 tr(A^-2) / (beta t) <= 2 n kappa^2 kappa0 / t``
    with ``kappa0 = 1/beta`` in units of ``||x*||^2``. Asking for ``eps`` relative error gives
    ``t_avg = 2 kappa0 n kappa^2 / eps^2`` tau (= ``n kappa^2 / eps^2`` tau at kappa0 = 0.5);
  * inverse by sampling ``beta <x x^T>``: the slowest mode decorrelates in ``kappa`` tau, so
    ``N_eff = t / kappa``; a Gaussian sample covariance has relative Frobenius error
    ``sqrt((tr(S)^2 + tr(S^2)) / (N ||S||_F^2)) <= sqrt((n + 1)/N)``, hence
    ``t_avg = (n + 1) kappa / eps^2`` tau, independent of the noise level;
- read-out: results at ``adc_bits`` over the link (or, for a device without on-chip accumulators,
  every covariance sample, one per ``kappa`` tau, plus the host's outer products).

Method ``"inverse"`` (the paper's method 1) inverts ``A`` and ``G`` every ``inverse_every`` steps
and leaves two GEMMs per step on the host. Method ``"solve"`` (method 2) solves
``(G + lam) X = V`` (``n_a`` right-hand sides) then ``(A + lam) Y^T = X^T`` (``n_g`` right-hand
sides) every step: ``O(n^2 kappa^2)`` per layer. Columns and sampling chains spread over the
device's ``units``. Transfers do not overlap analog work, and digital and analog work do not
overlap each other (both conservative).

Systems larger than the device's ``cells`` follow its ``oversize`` policy: ``"refuse"`` raises
:class:`ThermoCapacityError` (the step model then keeps that layer digital), ``"block"`` prices
``ceil(n/cells)`` independent diagonal blocks, a block-diagonal approximation flagged by
``info["approximate"]``.

``info["error_floor"]`` is the first-order error that ``dac_bits``-bit couplings alone cause,
``kappa * ||dA||_2`` with random rounding of step ``2^(1-bits)`` on a ``[-1, 1]`` scale
(``||dA||_2 ~ 2 sqrt(n) * step/sqrt(12)``): targets below it are not reachable by averaging longer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hw_models.devices import PRECISIONS, DigitalDevice, ThermoDevice
from hw_models.validation import check_choice, check_number, check_positive

THERMO_METHODS = ("inverse", "solve", "best")
DIGITAL_METHODS = ("eigh", "cholesky", "inverse")
SWEEP_AXES = ("width", "kappa", "bits", "bandwidth")

#: Bytes moved per parameter by one fused Adam update in fp32: read p, g, m, v; write p, m, v.
ADAM_BYTES_PER_PARAM = 28.0


class ThermoCapacityError(ValueError):
    """A system does not fit the thermodynamic device and its ``oversize`` policy is ``"refuse"``."""


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


@dataclass(frozen=True)
class Cost:
    """Seconds and joules per training step, with per-component breakdowns and notes."""

    seconds: float
    joules: float
    breakdown_s: dict[str, float] = field(default_factory=dict)
    breakdown_j: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"seconds": self.seconds, "joules": self.joules, "breakdown_s": dict(self.breakdown_s),
                "breakdown_j": dict(self.breakdown_j), "info": dict(self.info)}


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


def gemm_time(m: float, k: float, n: float, device: DigitalDevice, precision: str = "fp32") -> float:
    """Seconds for an ``(m x k) @ (k x n)`` product; efficiency is taken at ``min(m, k, n)``."""
    for name, value in (("m", m), ("k", k), ("n", n)):
        check_positive(name, value)
    return device.gemm.time(2.0 * m * k * n, min(m, k, n), device.peak(precision))


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
    decomposition = device.op_time(method, n_a, prec) + device.op_time(method, n_g, prec)
    ledger.add("decomposition", decomposition, decomposition * device.power_w, 1.0 / schedule.inverse_every)
    pair = gemm_time(n_g, n_g, n_a, device, prec) + gemm_time(n_g, n_a, n_a, device, prec)
    apply = pair * (2 if method == "eigh" else 1)
    ledger.add("preconditioning", apply, apply * device.power_w)
    return ledger.cost(device=device.name, method=method, factor_sizes=(n_a, n_g))


# --------------------------------------------------------------------------------------------
# Thermodynamic primitives
# --------------------------------------------------------------------------------------------


def _check_accuracy(kappa: float, eps: float, bits: int | None) -> None:
    check_number("kappa", kappa, low=1.0)
    check_number("eps", eps, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    if bits is not None:
        check_number("bits", bits, low=1, high=32, integer=True)


def _blocks(n: int, device: ThermoDevice) -> tuple[int, int]:
    """``(number of blocks, block size)`` for a system of size ``n`` under the oversize policy."""
    if n <= device.cells:
        return 1, n
    if device.oversize == "refuse":
        raise ThermoCapacityError(
            f"a system of size n={n} exceeds the {device.cells} cells of thermodynamic device "
            f"{device.name!r} (oversize='refuse'); valid choices: use a device with more cells, "
            f"or oversize='block' (block-diagonal approximation)")
    count = math.ceil(n / device.cells)
    return count, math.ceil(n / count)


def error_floor(n: int, kappa: float, bits: int) -> float:
    """Relative error that ``bits``-bit couplings alone cause in a size-``n`` solve (module docs)."""
    check_positive("n", n, integer=True)
    check_number("kappa", kappa, low=1.0)
    check_number("bits", bits, low=1, high=32, integer=True)
    return kappa * math.sqrt(n / 3.0) * 2.0 ** (1 - bits)


def settling_time_tau(kappa: float, eps: float) -> float:
    """Burn-in, in units of tau: ``kappa ln(1/eps)``."""
    _check_accuracy(kappa, eps, None)
    return kappa * math.log(1.0 / eps)


def solve_averaging_time_tau(n: int, kappa: float, eps: float, kappa0: float) -> float:
    """Averaging time of one solve, in tau: ``2 kappa0 n kappa^2 / eps^2`` (module docs)."""
    check_positive("n", n, integer=True)
    _check_accuracy(kappa, eps, None)
    check_positive("kappa0", kappa0)
    return 2.0 * kappa0 * n * kappa**2 / eps**2


def inverse_averaging_time_tau(n: int, kappa: float, eps: float) -> float:
    """Sampling time of one inverse, in tau: ``(n + 1) kappa / eps^2`` (module docs)."""
    check_positive("n", n, integer=True)
    _check_accuracy(kappa, eps, None)
    return (n + 1.0) * kappa / eps**2


def _io_joules(device: ThermoDevice, values: float, bits: int) -> float:
    """Energy to move ``values`` numbers of ``bits`` over the link and through a converter."""
    return values * bits * device.io_energy_per_bit_j + values * device.converter_fom_j * 2.0**bits


def _load_couplings(ledger: _Ledger, device: ThermoDevice, blocks: int, size: int, dac: int) -> float:
    """Add the transfer and programming of ``blocks`` blocks of ``size x size`` symmetric couplings;
    return the number of coupling values sent."""
    couplings = blocks * size * (size + 1) / 2.0
    bits_in = couplings * dac
    ledger.add("transfer", device.link_latency_s + bits_in / device.io_bandwidth_bps,
               _io_joules(device, couplings, dac))
    ledger.add("programming", math.ceil(blocks / device.units) * size * device.program_row_s)
    return couplings


def _active_power(device: ThermoDevice, size: int) -> float:
    """Power drawn by one running block of ``size`` cells and its couplings."""
    return size * device.power_per_cell_w + size * (size + 1) / 2.0 * device.power_per_coupling_w


def _parallel(jobs: int, units: int) -> tuple[int, float]:
    """``(sequential rounds, speed-up of each job's averaging)`` for ``jobs`` on ``units``.

    More units than jobs run extra independent chains of the same job (their averages combine).
    """
    if jobs >= units:
        return math.ceil(jobs / units), 1.0
    return 1, float(units // jobs)


def thermo_solve_cost(n: int, n_rhs: int, *, kappa: float, eps: float, device: ThermoDevice,
                      bits: int | None = None, resident: bool = False,
                      settle_tau: float | None = None, average_tau: float | None = None) -> Cost:
    """Solve ``A X = B`` for ``n_rhs`` right-hand sides of size ``n`` on the analog device.

    ``resident=True`` means the couplings are already programmed (no transfer or programming).
    The columns run one per unit at a time, each needing its own settling and averaging.
    ``settle_tau``/``average_tau`` (tau, per column) replace the laws' settling and averaging
    times when the run's times are known (e.g. from a simulation).
    """
    check_positive("n", n, integer=True)
    check_positive("n_rhs", n_rhs, integer=True)
    _check_accuracy(kappa, eps, bits)
    dac = bits or device.dac_bits
    adc = bits or device.adc_bits
    blocks, size = _blocks(n, device)
    bw, tau = device.io_bandwidth_bps, device.tau_s
    ledger = _Ledger()
    if not resident:
        _load_couplings(ledger, device, blocks, size, dac)
    rhs_values = float(n) * n_rhs
    ledger.add("transfer", device.link_latency_s + rhs_values * dac / bw, _io_joules(device, rhs_values, dac))
    jobs = blocks * n_rhs
    rounds, chains = _parallel(jobs, device.units)
    if settle_tau is not None:
        check_positive("settle_tau", settle_tau, allow_zero=True)
    if average_tau is not None:
        check_positive("average_tau", average_tau, allow_zero=True)
    settle = (settling_time_tau(kappa, eps) if settle_tau is None else settle_tau) * tau
    average = (solve_averaging_time_tau(size, kappa, eps, device.noise_kappa0) if average_tau is None
               else average_tau) * tau
    power = _active_power(device, size)
    ledger.add("settling", rounds * settle, jobs * chains * settle * power)
    ledger.add("averaging", rounds * average / chains, jobs * average * power)
    ledger.add("readout", device.link_latency_s + rhs_values * adc / bw, _io_joules(device, rhs_values, adc))
    floor = error_floor(size, kappa, dac)
    return ledger.cost(device=device.name, op="solve", blocks=blocks, block_size=size,
                       approximate=blocks > 1, rounds=rounds, error_floor=floor, reachable=eps >= floor)


def thermo_program_cost(n: int, *, device: ThermoDevice, bits: int | None = None) -> Cost:
    """Transfer and programming of an ``n x n`` symmetric matrix's couplings (no solve).

    What a solver that keeps the couplings resident between right-hand sides pays once per
    matrix; its solves are then priced with ``thermo_solve_cost(..., resident=True)``.
    """
    check_positive("n", n, integer=True)
    if bits is not None:
        check_number("bits", bits, low=1, high=32, integer=True)
    blocks, size = _blocks(n, device)
    ledger = _Ledger()
    _load_couplings(ledger, device, blocks, size, bits or device.dac_bits)
    return ledger.cost(device=device.name, op="program", blocks=blocks, block_size=size)


def thermo_inverse_cost(n: int, *, kappa: float, eps: float, device: ThermoDevice,
                        bits: int | None = None, host: DigitalDevice | None = None) -> Cost:
    """Invert an ``n x n`` SPD matrix by sampling ``beta <x x^T>`` on the analog device.

    Without on-chip accumulators every sample (one per ``kappa`` tau) streams to the host, which
    forms the outer products; ``host`` then prices that work (required in that case).
    """
    check_positive("n", n, integer=True)
    _check_accuracy(kappa, eps, bits)
    dac = bits or device.dac_bits
    adc = bits or device.adc_bits
    blocks, size = _blocks(n, device)
    bw, tau = device.io_bandwidth_bps, device.tau_s
    ledger = _Ledger()
    couplings = _load_couplings(ledger, device, blocks, size, dac)
    rounds, chains = _parallel(blocks, device.units)
    settle = settling_time_tau(kappa, eps) * tau
    average_work = inverse_averaging_time_tau(size, kappa, eps) * tau  # unit-seconds per block
    power = _active_power(device, size)
    ledger.add("settling", rounds * settle, blocks * chains * settle * power)
    ledger.add("averaging", rounds * average_work / chains, blocks * average_work * power)
    samples = (size + 1.0) / eps**2  # per block: N_eff samples, one per kappa tau
    if device.onchip_accumulators:
        out_values = couplings
        macs = blocks * samples * size * (size + 1) / 2.0
        ledger.add("averaging", 0.0, macs * device.mac_energy_j)
        ledger.add("readout", device.link_latency_s + out_values * adc / bw,
                   _io_joules(device, out_values, adc))
    else:
        if host is None:
            raise ValueError(f"thermodynamic device {device.name!r} has no on-chip accumulators, so "
                             "inversion needs host=<DigitalDevice> to price the host's outer products")
        out_values = blocks * samples * size
        host_s = blocks * gemm_time(size, samples, size, host)
        ledger.add("readout", device.link_latency_s + out_values * adc / bw + host_s,
                   _io_joules(device, out_values, adc) + host_s * host.power_w)
    floor = error_floor(size, kappa, dac)
    return ledger.cost(device=device.name, op="inverse", blocks=blocks, block_size=size,
                       approximate=blocks > 1, rounds=rounds, error_floor=floor, reachable=eps >= floor)


def thermo_layer_cost(n_in: int, n_out: int, batch: int, *, kappa: float, eps: float,
                      device: ThermoDevice, host: DigitalDevice, bits: int | None = None,
                      method: str = "inverse", positions: float = 1.0, bias: bool = True,
                      schedule: KFACSchedule | None = None, resident: bool = False) -> Cost:
    """Per-step K-FAC curvature work of one layer with the linear algebra on the analog device.

    ``method``: ``"inverse"`` (invert both factors every ``inverse_every`` steps, two host GEMMs
    per step), ``"solve"`` (two matrix-right-hand-side solves every step) or ``"best"`` (the
    cheaper of the two). ``resident`` (solve only): the factors stay programmed between inverse
    updates, so their transfer and programming are amortized. Raises :class:`ThermoCapacityError`
    when a factor exceeds the device and its policy is ``"refuse"``.
    """
    check_choice("method", method, THERMO_METHODS)
    schedule = schedule or KFACSchedule()
    _check_accuracy(kappa, eps, bits)
    if method == "best":
        options = [thermo_layer_cost(n_in, n_out, batch, kappa=kappa, eps=eps, device=device, host=host,
                                     bits=bits, method=m, positions=positions, bias=bias,
                                     schedule=schedule, resident=resident) for m in ("inverse", "solve")]
        return min(options, key=lambda c: c.seconds)
    n_a, n_g, rows = _layer_dims(n_in, n_out, batch, positions, bias)
    ledger = _Ledger()
    _factor_accumulation(ledger, n_a, n_g, rows, host, schedule)
    parts: list[Cost]
    if method == "inverse":
        parts = [thermo_inverse_cost(n, kappa=kappa, eps=eps, device=device, bits=bits, host=host)
                 for n in (n_a, n_g)]
        for part in parts:
            ledger.merge(part, 1.0 / schedule.inverse_every)
        apply = (gemm_time(n_g, n_g, n_a, host, schedule.precision)
                 + gemm_time(n_g, n_a, n_a, host, schedule.precision))
        ledger.add("preconditioning", apply, apply * host.power_w)
    else:
        parts = []
        for n, n_rhs in ((n_g, n_a), (n_a, n_g)):
            fresh = thermo_solve_cost(n, n_rhs, kappa=kappa, eps=eps, device=device, bits=bits)
            if resident:
                kept = thermo_solve_cost(n, n_rhs, kappa=kappa, eps=eps, device=device, bits=bits,
                                         resident=True)
                ledger.merge(kept)
                for key in fresh.breakdown_s:
                    extra_s = fresh.breakdown_s[key] - kept.breakdown_s.get(key, 0.0)
                    extra_j = fresh.breakdown_j[key] - kept.breakdown_j.get(key, 0.0)
                    ledger.add(key, extra_s, extra_j, 1.0 / schedule.inverse_every)
            else:
                ledger.merge(fresh)
            parts.append(fresh)
    return ledger.cost(device=device.name, host=host.name, method=method, factor_sizes=(n_a, n_g),
                       approximate=any(p.info["approximate"] for p in parts),
                       error_floor=max(p.info["error_floor"] for p in parts),
                       reachable=all(p.info["reachable"] for p in parts))


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
        _check_accuracy(self.kappa, self.eps, self.bits)
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
