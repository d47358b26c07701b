"""The one place that prices hardware: analog solve/inverse jobs and digital operations.

Everything that needs a hardware time, energy or predicted accuracy (the step model of
:mod:`hw_models.cost`, projections, the thermodynamic solver's report, the solver policy,
distributed placement) asks :func:`price` or :func:`price_digital`.

Convention (docs/hardware_model.md, "One convention"): an analog job programs the
lambda_max-normalised matrix ``P`` (time unit tau of ``P``; seconds = tau x ``device.tau_s``), loads
right-hand sides at the DAC full scale, and its accuracy is the finite-time law of
:mod:`hw_models.langevin.error_model` with the device's ``kappa0``.

A job's time (per block of ``size <= cells``; columns and blocks spread over the ``units``)::

    transfer     couplings n(n+1)/2 x coupling_bits + inputs n m x input_bits (+ reloaded state) over the link
    programming  size x program_row_s per round of blocks
    burn_in      rounds x burn-in x copies x tau
    averaging    rounds x window x copies x tau
    readout      results x output_bits over the link (an inverse without on-chip accumulators streams
                 every sample and the host forms the outer products)

Every converter width, range and non-ideality is read from the device's ``noise`` (the
:class:`~hw_models.noise.NoiseConfig` the simulator runs); an exact converter (``None``) moves
32-bit words and adds no error. ``AnalogJob.bits`` is the shorthand of
:meth:`ThermoDevice.replace`'s ``bits`` (all three converters), applied to the device.

Spare units run extra chains of the same job; their averages combine, dividing the variance
(not the bias). The **state range**: ``x*`` grows like ``P^-1 b``, so a solve scales its input down
by ``s = min(1, RANGE_TARGET state_range / (rms(x*) sqrt(2 ln 2n)))`` to keep the integrators in
range (:func:`input_scale`, the rule the thermodynamic solver uses before it has measured a peak;
a job that knows its scale passes ``input_scale``); the thermal error is priced at that reduced
signal. An inverse tunes its noise source so that the
slowest mode fills a quarter of the state range, ``kappa0_inv = (state_range/4)^2 lambda_min``;
its thermal error does not depend on ``kappa0``.

Systems larger than ``cells`` follow the oversize rule (:func:`fit_blocks`, the only copy):
``"refuse"`` raises :class:`ThermoCapacityError`, ``"block"`` solves ``ceil(n/cells)`` diagonal
blocks (an approximation, flagged ``approximate``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hw_models.defaults import DEFAULT_DIGITAL
from hw_models.devices import (
    OPS,
    OVERSIZE_POLICIES,
    PRECISIONS,
    DigitalDevice,
    ThermoDevice,
    digital_device,
    thermo_device,
)
from hw_models.langevin import error_model, laws
from hw_models.spectrum import MAX_MODES, SKETCH_GROUPS, SPECTRUM_SHAPES, SpectrumSummary  # noqa: F401 (re-exported)
from hw_models.validation import check_bits, check_choice, check_number, check_positive

ANALOG_OPS = ("solve", "inverse")
#: Rails an inverse's noise source is tuned against on a device without rails (``state_range``
#: None): the chip preset's 8 full-scale units.
INVERSE_RAILS = 8.0
DIGITAL_OPS = (*OPS, "solve")


#: Calls of :func:`price`, :func:`price_program` and :func:`price_digital` since the last
#: :func:`reset_pricing_calls` (benchmarks/codesign.py counts pricing calls per training step).
_CALLS: collections.Counter[str] = collections.Counter()


def pricing_calls() -> dict[str, int]:
    """How often each pricing function ran since the last :func:`reset_pricing_calls`."""
    return dict(_CALLS)


def reset_pricing_calls() -> None:
    """Set the pricing call counters to zero."""
    _CALLS.clear()


class ThermoCapacityError(ValueError):
    """A system does not fit the thermodynamic device and its ``oversize`` policy is ``"refuse"``."""


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """Seconds and joules, with per-component breakdowns and notes."""

    seconds: float
    joules: float
    breakdown_s: dict[str, float] = field(default_factory=dict)
    breakdown_j: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"seconds": self.seconds, "joules": self.joules, "breakdown_s": dict(self.breakdown_s),
                "breakdown_j": dict(self.breakdown_j), "info": dict(self.info)}


@dataclass(frozen=True)
class Price(Cost):
    """A priced job: a :class:`Cost` plus the accuracy the job delivers.

    ``predicted_rel_error``: the law's relative error of the returned result (``None`` when not
    applicable); ``error``: its parts (``bias``, ``variance``, ``static``); ``window_tau`` and
    ``burn_in_tau``: the analog schedule per column (tau), ``analog_time_tau`` the device time of
    one column job including copies.
    """

    predicted_rel_error: float | None = None
    error: dict[str, float] = field(default_factory=dict)
    window_tau: float = 0.0
    burn_in_tau: float = 0.0
    analog_time_tau: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(predicted_rel_error=self.predicted_rel_error, error=dict(self.error),
                   window_tau=self.window_tau, burn_in_tau=self.burn_in_tau,
                   analog_time_tau=self.analog_time_tau)
        return out


class Ledger:
    """Accumulates seconds and joules per component (the breakdown of a :class:`Cost`)."""

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
# Jobs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalogJob:
    """One analog job on the thermodynamic device.

    Attributes:
        op: ``"solve"`` (``P X = B`` with ``n_rhs`` columns) or ``"inverse"`` (``P^-1`` by sampling).
        n: system size.
        n_rhs: right-hand-side columns (solve).
        spectrum: the damped factor's :class:`SpectrumSummary`; ``None`` uses
            ``SpectrumSummary.from_kappa(n, kappa)``.
        kappa: condition number when no spectrum is given (default 100).
        window_tau / target_eps: exactly one: a fixed averaging window (tau; the accuracy is then
            reported from the law) or a target relative error (the window, and the burn-in unless
            given, come from the law).
        burn_in_tau: burn-in (tau); ``None``: chosen with a target, 0 with a fixed window.
        start: ``"zero"``, ``"gradient"``, ``"previous"`` (``warm_distance`` from ``x*``) or
            ``"stationary"`` (see :mod:`hw_models.langevin.error_model`).
        rhs_rms / rhs_alignment: the RHS model (default: a full-scale Gaussian column, isotropic).
        bits: the device's coupling, input and output bits together (``ThermoDevice.replace(bits=)``).
        input_scale: the input scale ``s`` the solve used (default: :func:`input_scale`'s rule).
        resident: the couplings are already programmed (no transfer or programming).
        reload_state: the warm state is written back to the device first (``n x n_rhs`` values).
        copies: rounding-ensemble copies run one after another (variance / copies).
        units: solver units this job may use (default: all of the device's).
        oversize: overrides the device's oversize policy (``"refuse"``/``"block"``).
        sample_interval_tau: spacing of the samples of an inverse (tau).
    """

    op: str
    n: int
    n_rhs: int = 1
    spectrum: SpectrumSummary | None = None
    kappa: float | None = None
    window_tau: float | None = None
    target_eps: float | None = None
    burn_in_tau: float | None = None
    start: str = "zero"
    warm_distance: float = 1.0
    rhs_rms: float | None = None
    rhs_alignment: float = 0.0
    bits: int | None = None
    resident: bool = False
    reload_state: bool = False
    copies: int = 1
    units: int | None = None
    oversize: str | None = None
    sample_interval_tau: float = 1.0
    input_scale: float | None = None

    def __post_init__(self) -> None:
        check_choice("op", self.op, ANALOG_OPS)
        check_positive("n", self.n, integer=True)
        check_positive("n_rhs", self.n_rhs, integer=True)
        if (self.window_tau is None) == (self.target_eps is None):
            raise ValueError(f"an AnalogJob needs exactly one of window_tau and target_eps; got "
                             f"window_tau={self.window_tau!r}, target_eps={self.target_eps!r}")
        if self.window_tau is not None:
            check_positive("window_tau", self.window_tau)
        if self.target_eps is not None:
            check_number("eps", self.target_eps, low=0.0, high=1.0, low_inclusive=False,
                         high_inclusive=False)
        if self.burn_in_tau is not None:
            check_positive("burn_in_tau", self.burn_in_tau, allow_zero=True)
        if self.kappa is not None:
            check_number("kappa", self.kappa, low=1.0)
        if self.spectrum is not None and not isinstance(self.spectrum, SpectrumSummary):
            raise ValueError(f"spectrum={self.spectrum!r} must be a SpectrumSummary")
        starts = error_model.SOLVE_STARTS if self.op == "solve" else error_model.INVERSE_STARTS
        check_choice("start", self.start, starts)
        if self.bits is not None:
            check_bits("bits", self.bits)
        check_positive("copies", self.copies, integer=True)
        if self.units is not None:
            check_positive("units", self.units, integer=True)
        if self.oversize is not None:
            check_choice("oversize", self.oversize, OVERSIZE_POLICIES)
        check_positive("sample_interval_tau", self.sample_interval_tau)
        check_positive("warm_distance", self.warm_distance, allow_zero=True)
        if self.input_scale is not None:
            check_number("input_scale", self.input_scale, low=0.0, high=1.0, low_inclusive=False)

    def replace(self, **changes: Any) -> AnalogJob:
        return dataclasses.replace(self, **changes)

    @property
    def spectrum_summary(self) -> SpectrumSummary:
        if self.spectrum is not None:
            return self.spectrum
        return SpectrumSummary.from_kappa(self.n, 100.0 if self.kappa is None else self.kappa)


def fit_blocks(n: int, device: ThermoDevice, oversize: str | None = None) -> tuple[int, int]:
    """``(blocks, block size)`` of a size-``n`` system on ``device``: THE oversize rule.

    ``oversize`` overrides the device's policy. ``"refuse"`` raises :class:`ThermoCapacityError`
    for ``n > cells``; ``"block"`` splits into ``ceil(n/cells)`` near-equal diagonal blocks.
    """
    check_positive("n", n, integer=True)
    policy = device.oversize if oversize is None else oversize
    check_choice("oversize", policy, OVERSIZE_POLICIES)
    if n <= device.cells:
        return 1, n
    if policy == "refuse":
        raise ThermoCapacityError(
            f"a system of size n={n} exceeds the {device.cells} cells of thermodynamic device "
            f"{device.name!r} (oversize='refuse'); valid choices: use a device with more cells, "
            f"or oversize='block' (block-diagonal approximation)")
    count = math.ceil(n / device.cells)
    return count, math.ceil(n / count)


def fits(n: int, device: ThermoDevice | str) -> bool:
    """Whether a size-``n`` system fits one unit of ``device`` without blocking."""
    return check_positive("n", n, integer=True) <= thermo_device(device).cells


def _parallel(jobs: int, units: int) -> tuple[int, int]:
    """``(sequential rounds, extra chains per job)``: more units than jobs run extra chains."""
    if jobs >= units:
        return math.ceil(jobs / units), 1
    return 1, units // jobs


def _io_joules(device: ThermoDevice, values: float, bits: int) -> float:
    return values * bits * device.io_energy_per_bit_j + values * device.converter_fom_j * 2.0**bits


def _active_power(device: ThermoDevice, size: int) -> float:
    return size * device.power_per_cell_w + size * (size + 1) / 2.0 * device.power_per_coupling_w


#: Input ranging: a solve aims its largest state value at this fraction of ``state_range``.
RANGE_TARGET = 0.5


def input_scale(spectrum: SpectrumSummary, device: ThermoDevice, rhs_rms: float | None = None,
                rhs_alignment: float = 0.0) -> float:
    """Factor ``s <= 1`` a solve scales its full-scale input by so that the largest entry of
    ``x*`` (Gaussian estimate: ``rms(x*) sqrt(2 ln 2n)``) sits at ``RANGE_TARGET * state_range``;
    1 for a device without rails. THE rule: the thermodynamic solver's first call uses it too."""
    rails = device.noise.state_range
    if rails is None:
        return 1.0
    lam, w = spectrum.normalized_modes()
    rms = error_model.full_scale_rms(spectrum.n) if rhs_rms is None else rhs_rms
    power = error_model.rhs_power(lam, w, rms, rhs_alignment)
    x_rms = math.sqrt(float(np.sum(w * power / lam**2)) / float(np.sum(w)))
    peak = x_rms * math.sqrt(2.0 * math.log(2.0 * max(spectrum.n, 2)))
    return min(1.0, RANGE_TARGET * rails / peak) if peak > 0 else 1.0


def job_device(job: AnalogJob, device: ThermoDevice | str) -> ThermoDevice:
    """The device a job runs on: ``device`` with the job's ``bits`` shorthand applied."""
    device = thermo_device(device)
    return device.replace(bits=job.bits) if job.bits is not None else device


@functools.lru_cache(maxsize=4096)
def _accuracy(job: AnalogJob, device: ThermoDevice, size: int, chains: int) -> tuple[float, float, dict]:
    """``(burn-in, window, error parts)`` of one column job of ``size`` (cached: pure)."""
    spec = job.spectrum_summary.resized(size)
    lam, w = spec.normalized_modes()
    copies = job.copies * chains
    noise = device.noise
    parts: dict[str, Any] = {}
    if job.op == "solve":
        s = job.input_scale if job.input_scale is not None else input_scale(
            spec, device, job.rhs_rms, job.rhs_alignment)
        rms = (error_model.full_scale_rms(size) if job.rhs_rms is None else job.rhs_rms) * s
        common = dict(weights=w, start=job.start, rhs_rms=rms, rhs_alignment=job.rhs_alignment,
                      warm_distance=job.warm_distance, copies=copies)
        ref = error_model.solve_error(lam, window=1.0, burn_in=0.0, kappa0=device.kappa0,
                                      **common).info["solution_norm2"]
        static = error_model.static_solve_error_of(noise, lam, weights=w, solution_norm2=ref,
                                                   max_coupling=spec.max_coupling)
        parts.update(input_scale=s, kappa0=device.kappa0)
        if job.window_tau is not None:
            burn, window = float(job.burn_in_tau or 0.0), float(job.window_tau)
            reachable = True
        else:
            target, reachable = _thermal_target(job.target_eps, static)
            win = error_model.solve_window(target, lam, kappa0=device.kappa0, burn_in=job.burn_in_tau,
                                           **common)
            burn, window, reachable = win.burn_in, win.window, reachable and win.reachable
        pred = error_model.solve_error(lam, window=window, burn_in=burn, kappa0=device.kappa0, **common)
    else:
        # the inverse's variance sums over mode pairs: price it on a 64-group sketch (exact tr(P^-2))
        lam, w = _coarse(lam, w, SKETCH_GROUPS)
        rails = noise.state_range if noise.state_range is not None else INVERSE_RAILS
        kappa0 = (rails / 4.0) ** 2 * float(lam.min())
        static = error_model.static_inverse_error_of(noise, lam, weights=w, kappa0=kappa0,
                                                     max_coupling=job.spectrum_summary.max_coupling)
        common = dict(weights=w, sample_interval=job.sample_interval_tau, start=job.start, copies=copies)
        parts.update(kappa0=kappa0)
        if job.window_tau is not None:
            burn, window = float(job.burn_in_tau or 0.0), float(job.window_tau)
            reachable = True
        else:
            target, reachable = _thermal_target(job.target_eps, static)
            win = error_model.inverse_window(target, lam, burn_in=job.burn_in_tau, **common)
            burn, window, reachable = win.burn_in, win.window, reachable and win.reachable
        pred = error_model.inverse_error(lam, window=window, burn_in=burn, **common)
    total = math.hypot(pred.rel_error, static)
    if job.target_eps is not None:
        reachable = reachable and total <= job.target_eps * (1 + 1e-6)
    parts.update(bias=pred.bias, variance=pred.variance, static=static, thermal=pred.rel_error,
                 rel_error=total, reachable=reachable)
    return burn, window, parts


def _coarse(lam: np.ndarray, w: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``groups`` modes: consecutive equal-weight groups, each ``mean(lam^-2)^(-1/2)``."""
    if lam.size <= groups:
        return lam, w
    order = np.argsort(lam)
    lam, w = lam[order], w[order]
    edges = np.searchsorted(np.cumsum(w), np.linspace(0, w.sum(), groups + 1)[1:-1], side="left")
    parts = [(lp, wp) for lp, wp in zip(np.split(lam, edges), np.split(w, edges), strict=True) if lp.size]
    reps = np.array([float(np.sum(wp * lp**-2.0) / np.sum(wp)) ** -0.5 for lp, wp in parts])
    return reps, np.array([float(np.sum(wp)) for _, wp in parts])


def _thermal_target(eps: float, static: float) -> tuple[float, bool]:
    """The thermal share of a target once the static error is spent (quadrature)."""
    if static < 0.99 * eps:
        return math.sqrt(eps**2 - static**2), True
    return 0.1 * eps, False


def price(job: AnalogJob, device: ThermoDevice | str, host: DigitalDevice | str | None = None) -> Price:
    """Seconds, joules, breakdown and predicted accuracy of one analog job on ``device``.

    ``host`` prices the outer products of an inverse on a device without on-chip accumulators
    (required there). Raises :class:`ThermoCapacityError` when the system does not fit and the
    oversize policy is ``"refuse"``.
    """
    if not isinstance(job, AnalogJob):
        raise ValueError(f"job={job!r} must be an AnalogJob")
    _CALLS["price"] += 1
    device = job_device(job, device)
    host_dev = digital_device(host) if host is not None else None
    blocks, size = fit_blocks(job.n, device, job.oversize)
    units = min(job.units or device.units, device.units)
    cbits, dac, adc = (device.link_bits(c) for c in ("coupling", "input", "output"))
    bw, tau = device.io_bandwidth_bps, device.tau_s
    jobs = blocks * (job.n_rhs if job.op == "solve" else 1)
    rounds, chains = _parallel(jobs, units)
    burn, window, parts = _accuracy(job, device, size, chains)
    ledger = Ledger()
    couplings = blocks * size * (size + 1) / 2.0
    if not job.resident:
        ledger.add("transfer", device.link_latency_s + couplings * cbits / bw,
                   _io_joules(device, couplings, cbits))
        ledger.add("programming", math.ceil(blocks / units) * size * device.program_row_s)
    power = _active_power(device, size)
    column_tau = (burn + window) * job.copies
    ledger.add("burn_in", rounds * burn * job.copies * tau, jobs * chains * burn * job.copies * tau * power)
    ledger.add("averaging", rounds * window * job.copies * tau,
               jobs * chains * window * job.copies * tau * power)
    if job.op == "solve":
        values = float(job.n) * job.n_rhs
        loads = values * (2 if job.reload_state else 1)
        ledger.add("transfer", device.link_latency_s + loads * dac / bw, _io_joules(device, loads, dac))
        ledger.add("readout", device.link_latency_s + values * adc / bw, _io_joules(device, values, adc))
    else:
        samples = max(1.0, math.floor(window / job.sample_interval_tau)) * job.copies * chains
        if device.onchip_accumulators:
            ledger.add("averaging", 0.0, blocks * samples * size * (size + 1) / 2.0 * device.mac_energy_j)
            ledger.add("readout", device.link_latency_s + couplings * adc / bw,
                       _io_joules(device, couplings, adc))
        else:
            if host_dev is None:
                raise ValueError(f"thermodynamic device {device.name!r} has no on-chip accumulators, so "
                                 "inversion needs host=<DigitalDevice> to price the host's outer products")
            values = blocks * samples * size
            host_s = blocks * gemm_time(size, samples, size, host_dev)
            ledger.add("readout", device.link_latency_s + values * adc / bw + host_s,
                       _io_joules(device, values, adc) + host_s * host_dev.power_w)
    error = {k: float(parts[k]) for k in ("bias", "variance", "static", "thermal")}
    info = {"device": device.name, "converters": dataclasses.asdict(device.noise),
            "device_kappa0": device.kappa0,
            "op": job.op, "blocks": blocks, "block_size": size,
            "approximate": blocks > 1, "rounds": rounds, "chains": chains,
            "reachable": bool(parts["reachable"]), "error_floor": float(parts["static"]),
            "kappa": job.spectrum_summary.kappa, "kappa0": float(parts["kappa0"]),
            "predicted_rel_error": float(parts["rel_error"])}
    if "input_scale" in parts:
        info["input_scale"] = float(parts["input_scale"])
    return Price(sum(ledger.s.values()), sum(ledger.j.values()), dict(ledger.s), dict(ledger.j), info,
                 predicted_rel_error=float(parts["rel_error"]), error=error, window_tau=float(window),
                 burn_in_tau=float(burn), analog_time_tau=float(column_tau))


def price_program(n: int, device: ThermoDevice | str, *, bits: int | None = None,
                  oversize: str | None = None) -> Price:
    """Transfer and programming of an ``n x n`` symmetric matrix's couplings (no solve): what a
    solver keeping couplings resident pays once per matrix."""
    device = thermo_device(device) if bits is None else thermo_device(device).replace(bits=bits)
    _CALLS["price_program"] += 1
    blocks, size = fit_blocks(n, device, oversize)
    cbits = device.link_bits("coupling")
    couplings = blocks * size * (size + 1) / 2.0
    ledger = Ledger()
    ledger.add("transfer", device.link_latency_s + couplings * cbits / device.io_bandwidth_bps,
               _io_joules(device, couplings, cbits))
    ledger.add("programming", math.ceil(blocks / device.units) * size * device.program_row_s)
    return Price(sum(ledger.s.values()), sum(ledger.j.values()), dict(ledger.s), dict(ledger.j),
                 {"device": device.name, "op": "program", "blocks": blocks, "block_size": size,
                  "approximate": blocks > 1})


def solve_call_error(eigenvalues: Any, rhs: Any, x0: Any | None = None, *, window: float,
                     burn_in: float, kappa0: float, column_scale: Any | None = None,
                     copies: int = 1) -> float:
    """The law's relative error of one solve whose right-hand sides are KNOWN (not the RHS model).

    ``eigenvalues``: the programmed (lambda_max-normalised) matrix's ``(n,)``; ``rhs`` and ``x0``:
    the loaded inputs and the start in its eigenbasis, ``(n, m)`` in full-scale units (``x0=None``:
    zero start). ``column_scale``: the factor each column is multiplied by when mapped back
    (the abs-max a column was divided by to load it at full scale), so the error is the relative
    Frobenius error of the returned matrix: bias ``w (x0 - x*)`` and variance per column, both
    scaled by the column's factor squared. The thermal part only (static errors: :func:`price`).
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    beta = np.asarray(rhs, dtype=np.float64).reshape(lam.size, -1)
    check_positive("window", window)
    check_positive("copies", copies, integer=True)
    scale2 = (np.ones(beta.shape[1]) if column_scale is None
              else np.asarray(column_scale, dtype=np.float64).reshape(-1) ** 2)
    w, var = laws.od_time_average(lam, burn_in, window, kappa0)
    xstar = beta / lam[:, None]
    u0 = -xstar if x0 is None else np.asarray(x0, dtype=np.float64).reshape(beta.shape) - xstar
    ref = float(np.sum(xstar**2 * scale2))
    if ref <= 0:
        return 0.0
    bias2 = float(np.sum((w[:, None] * u0) ** 2 * scale2))
    var_total = float(np.sum(var)) * float(np.sum(scale2)) / copies
    return math.sqrt((bias2 + var_total) / ref)


# --------------------------------------------------------------------------------------------
# Digital
# --------------------------------------------------------------------------------------------


def gemm_time(m: float, k: float, n: float, device: DigitalDevice, precision: str = "fp32") -> float:
    """Seconds for an ``(m x k) @ (k x n)`` product; efficiency is taken at ``min(m, k, n)``."""
    for name, value in (("m", m), ("k", k), ("n", n)):
        check_positive(name, value)
    return device.gemm.time(2.0 * m * k * n, min(m, k, n), device.peak(precision))


#: The deflation's eigenpair sketch: oversampling and power iterations (what its host GEMMs cost).
DEFLATION_OVERSAMPLE = 8
DEFLATION_POWER_ITERATIONS = 2


def deflation_gemms(n: int, k: int, n_rhs: int | None = None, *, oversample: int = DEFLATION_OVERSAMPLE,
                    power_iterations: int = DEFLATION_POWER_ITERATIONS) -> list[tuple[int, int, int]]:
    """The host's ``(m, k, n)`` GEMM shapes of deflating ``k`` top modes of a size-``n`` factor:
    once per inverse update (``n_rhs=None``: randomized range, power iterations, Rayleigh-Ritz,
    the remainder) or per solve with ``n_rhs`` columns (the split: ``U^T B`` and ``B - U C``; the
    combination with the output's projection: ``U^T X`` and ``X + U (...)``, as
    ``thermo_kfac.solvers.deflation.Deflated`` computes them)."""
    if k <= 0:
        return []
    if n_rhs is not None:
        return [(k, n, n_rhs), (n, k, n_rhs), (k, n, n_rhs), (n, k, n_rhs)]
    w = min(k + oversample, n)
    shapes = [(n, n, w)] * (1 + power_iterations) + [(n, n, w), (w, n, w)]
    return shapes + [(n, n, k), (k, n, k), (n, k, n), (n, k, n), (n, k, k)]


def price_host_gemms(shapes: list[tuple[int, int, int]], host: DigitalDevice | str,
                     component: str = "host_deflation", precision: str = "fp32") -> Cost:
    """Seconds and joules of GEMMs of the given ``(m, k, n)`` shapes on ``host`` (one component)."""
    dev = digital_device(host)
    seconds = sum(gemm_time(m, k, n, dev, precision) for m, k, n in shapes)
    return Cost(seconds, seconds * dev.power_w, {component: seconds}, {component: seconds * dev.power_w})


def price_digital(op: str, n: int, n_rhs: int = 1, device: DigitalDevice | str = DEFAULT_DIGITAL, *,
                  precision: str = "fp32") -> Price:
    """One digital operation on an ``n x n`` operand.

    ``op``: ``"eigh"``, ``"cholesky"``, ``"inverse"``, ``"gemm"`` (``n x n`` times ``n x n_rhs``) or
    ``"solve"`` (Cholesky, then two triangular solves with ``n_rhs`` columns, priced as one GEMM).
    Digital results are exact to rounding: ``predicted_rel_error`` is 0.
    """
    check_choice("op", op, DIGITAL_OPS)
    check_positive("n", n, integer=True)
    check_positive("n_rhs", n_rhs, integer=True)
    check_choice("precision", precision, PRECISIONS)
    _CALLS["price_digital"] += 1
    dev = digital_device(device)
    if op == "gemm":
        seconds = gemm_time(n, n, n_rhs, dev, precision)
    elif op == "solve":
        seconds = dev.op_time("cholesky", n, precision) + gemm_time(n, n, n_rhs, dev, precision)
    else:
        seconds = dev.op_time(op, n, precision)
    return Price(seconds, seconds * dev.power_w, {"compute": seconds}, {"compute": seconds * dev.power_w},
                 {"device": dev.name, "op": op, "precision": precision}, predicted_rel_error=0.0)
