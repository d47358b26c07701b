"""Per-layer latency and energy of K-FAC's curvature work: digital layer costs and the thermodynamic
solve/program/inverse jobs and layer costs, each analog job priced by :mod:`hw_models.pricing`
(the model is described in :mod:`hw_models.cost`)."""

from __future__ import annotations

from dataclasses import dataclass

from hw_models.devices import PRECISIONS, DigitalDevice, ThermoDevice
from hw_models.langevin import error_model
from hw_models.layer_cost import (
    DIGITAL_METHODS,
    analog_layer_ledger,
    decomposition_seconds,
    preconditioning_seconds,
)
from hw_models.pricing import (
    AnalogJob,
    Cost,
    Ledger,
    Price,
    SpectrumSummary,
    gemm_time,
    price,
    price_program,
)
from hw_models.validation import check_bits, check_choice, check_number, check_positive

THERMO_METHODS = ("inverse", "solve", "best")
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


# --------------------------------------------------------------------------------------------
# Digital primitives
# --------------------------------------------------------------------------------------------


def _layer_dims(n_in: int, n_out: int, batch: int, positions: float, bias: bool) -> tuple[int, int, float]:
    check_positive("n_in", n_in, integer=True)
    check_positive("n_out", n_out, integer=True)
    check_positive("batch", batch, integer=True)
    check_positive("positions", positions)
    if not isinstance(bias, bool):
        raise ValueError(f"bias={bias!r} must be True or False")
    return n_in + int(bias), n_out, batch * float(positions)


def _factor_accumulation(ledger: Ledger, n_a: int, n_g: int, rows: float, host: DigitalDevice,
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
    ledger = Ledger()
    _factor_accumulation(ledger, n_a, n_g, rows, device, schedule)
    method, prec = schedule.digital_method, schedule.precision
    decomposition = decomposition_seconds(method, (n_a, n_g), device, prec)
    ledger.add("decomposition", decomposition, decomposition * device.power_w, 1.0 / schedule.inverse_every)
    apply = preconditioning_seconds(method, n_a, n_g, device, prec)
    ledger.add("preconditioning", apply, apply * device.power_w)
    return ledger.cost(device=device.name, method=method, factor_sizes=(n_a, n_g))


# --------------------------------------------------------------------------------------------
# Thermodynamic primitives: thin callers of hw_models.pricing (the one implementation)
# --------------------------------------------------------------------------------------------


def check_accuracy(kappa: float, eps: float, bits: int | None) -> None:
    check_number("kappa", kappa, low=1.0)
    check_number("eps", eps, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    if bits is not None:
        check_bits("bits", bits)


def error_floor(n: int, kappa: float, bits: int) -> float:
    """Relative error that ``bits``-bit couplings alone cause in a size-``n`` solve, for the
    geometric model spectrum of condition number ``kappa``
    (:func:`hw_models.langevin.error_model.static_solve_error`'s coupling term)."""
    check_positive("n", n, integer=True)
    check_number("kappa", kappa, low=1.0)
    check_bits("bits", bits)
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
    check_accuracy(kappa, eps, bits)
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
    check_accuracy(kappa, eps, bits)
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
    check_accuracy(kappa, eps, bits)
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
    ledger = Ledger()
    _factor_accumulation(ledger, n_a, n_g, rows, host, schedule)
    analog, parts = analog_layer_ledger(n_a, n_g, device=device, host=host,
                                        spectra={"A": spec_a, "G": spec_g}, method=method, eps=eps,
                                        window=window_tau, burn_in=burn_in_tau, start=start, bits=bits,
                                        resident=resident, inverse_every=schedule.inverse_every,
                                        precision=schedule.precision)
    for key, seconds in analog.s.items():
        ledger.add(key, seconds, analog.j[key])
    errors = [p.predicted_rel_error or 0.0 for p in parts]
    return ledger.cost(device=device.name, host=host.name, method=method, factor_sizes=(n_a, n_g),
                       approximate=any(p.info["approximate"] for p in parts),
                       error_floor=max(p.info["error_floor"] for p in parts),
                       reachable=all(p.info["reachable"] for p in parts),
                       predicted_rel_error=max(errors),
                       kappa_measured=(spec_a.kappa, spec_g.kappa),
                       window_tau=[p.window_tau for p in parts], burn_in_tau=[p.burn_in_tau for p in parts])
