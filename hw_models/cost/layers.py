"""Per-layer latency and energy of K-FAC's curvature work: digital primitives and layer costs,
thermodynamic solve/program/inverse jobs and layer costs (the model is described in
:mod:`hw_models.cost`)."""

from __future__ import annotations

import math
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


def check_accuracy(kappa: float, eps: float, bits: int | None) -> None:
    """Raise a ValueError for a condition number < 1, an accuracy outside (0, 1) or bad bits."""
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
    check_accuracy(kappa, eps, None)
    return kappa * math.log(1.0 / eps)


def solve_averaging_time_tau(n: int, kappa: float, eps: float, kappa0: float) -> float:
    """Averaging time of one solve, in tau: ``2 kappa0 n kappa^2 / eps^2`` (module docs)."""
    check_positive("n", n, integer=True)
    check_accuracy(kappa, eps, None)
    check_positive("kappa0", kappa0)
    return 2.0 * kappa0 * n * kappa**2 / eps**2


def inverse_averaging_time_tau(n: int, kappa: float, eps: float) -> float:
    """Sampling time of one inverse, in tau: ``(n + 1) kappa / eps^2`` (module docs)."""
    check_positive("n", n, integer=True)
    check_accuracy(kappa, eps, None)
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
    check_accuracy(kappa, eps, bits)
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
    check_accuracy(kappa, eps, bits)
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
    check_accuracy(kappa, eps, bits)
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
