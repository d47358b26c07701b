"""The one place a K-FAC layer's per-step solver cost is built, for every caller.

A layer with damped factors ``A`` (``n_a x n_a``, bias column included) and ``G`` (``n_g x n_g``)
pays, per inverse update, one decomposition (or one programming, one sampled inverse, one
deflation) per factor, and, per training step, the preconditioning of its ``n_g x n_a`` gradient.
The method costs are stated here once:

- **digital** (:data:`APPLY_PAIRS`): ``eigh``, ``cholesky`` or ``inverse`` of each factor
  (:func:`hw_models.pricing.price_digital`), then GEMM pairs ``(n_g n_g n_a, n_g n_a n_a)`` per
  step: two pairs for ``eigh`` (into the eigenbasis and back), one for a Cholesky solve or an
  explicit inverse (:func:`digital_layer_seconds`);
- **analog solve** (the thermodynamic solver's default): program both factors per update, two
  resident solves per step with the gradient's columns (``G`` with ``n_a``, ``A`` with ``n_g``);
- **analog inverse**: sample both inverses per update, then one host GEMM pair per step
  (:func:`analog_layer_seconds`).

Callers: the solvers' reports and the policy (``thermo_kfac.layer_pricing``), ``auto``
(``thermo_kfac.solvers.auto``), the hardware pricer, distributed placement, trace projection
(:func:`hw_models.projection.price_trace`) and the step model (:mod:`hw_models.cost.layers`).

With ``deflate`` set (what the thermodynamic solver's ``deflate`` / ``analog_time="auto"`` do),
:func:`analog_layer_seconds` prices a solve exactly as that solver picks its settings: for each
factor the first depth of :data:`AUTO_DEPTHS` the **feasibility law**
(:mod:`hw_models.langevin.feasibility`) accepts and whose law window for
``target / SOLVE_SHARES`` fits ``max_window``; the device then solves the deflated remainder
(eigenvalues ``lam`` on the deflated modes, the rest unchanged) at that window, and the host pays
the deflation's GEMMs (:func:`hw_models.pricing.deflation_gemms`). A factor no depth can serve
makes the layer digital, with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hw_models import pricing
from hw_models.defaults import DEFAULT_DIGITAL, DEFAULT_EPS, DEFAULT_KAPPA, DEFAULT_THERMO
from hw_models.devices import DigitalDevice, ThermoDevice
from hw_models.langevin.feasibility import DEFAULT_MARGIN, perturbation_model
from hw_models.spectrum import SpectrumSummary
from hw_models.validation import check_choice, check_positive

__all__ = ["ANALOG_METHODS", "APPLY_PAIRS", "AUTO_DEPTHS", "DEFAULT_DIGITAL", "DEFAULT_EPS",
           "DEFAULT_KAPPA", "DEFAULT_THERMO", "DIGITAL_METHODS", "MIN_WINDOW", "SOLVE_SHARES", "AnalogPlan",
           "FeasibilityCheck", "analog_factor_seconds", "analog_layer_ledger", "analog_layer_seconds",
           "auto_depths", "decomposition_seconds", "deflated_spectrum", "deflation_host_seconds",
           "digital_layer_seconds", "law_window", "model_feasibility", "preconditioning_seconds"]

#: Preconditioning GEMM pairs per step of each digital method (eigh: into the eigenbasis and back).
APPLY_PAIRS = {"eigh": 2, "cholesky": 1, "inverse": 1}
DIGITAL_METHODS = tuple(APPLY_PAIRS)
ANALOG_METHODS = ("solve", "inverse")

#: Deflation depths ``deflate="auto"`` tries, in order (each capped by ``max_deflate``).
AUTO_DEPTHS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
#: The two solves of an apply share the target: each gets ``target / SOLVE_SHARES`` (the first
#: solve's error reaches the result through the second factor's inverse and the two are not
#: independent; a ``sqrt 2`` split overshot the target by 30 % on seeded spectra).
SOLVE_SHARES = 2.0
#: The shortest window ``analog_time="auto"`` picks (tau of the normalised programmed matrix): a
#: read-out integrates over the fastest mode's time constant.
MIN_WINDOW = 1.0

#: ``feasible(key, k) -> (feasible, reason, max_coupling)``: the feasibility law on factor ``key``
#: (``"A"``/``"G"``) deflated by ``k`` modes.
FeasibilityCheck = Callable[[str, int], tuple[bool, str, float | None]]


def preconditioning_seconds(method: str, n_a: int, n_g: int, host: DigitalDevice,
                            precision: str = "fp32") -> float:
    """Seconds per step of preconditioning an ``n_g x n_a`` gradient by ``method``'s GEMM pairs."""
    check_choice("digital_method", method, DIGITAL_METHODS)
    pair = (pricing.gemm_time(n_g, n_g, n_a, host, precision)
            + pricing.gemm_time(n_g, n_a, n_a, host, precision))
    return APPLY_PAIRS[method] * pair


def decomposition_seconds(method: str, sizes: Iterable[int], host: DigitalDevice,
                          precision: str = "fp32") -> float:
    """Seconds of one ``method`` decomposition of each factor of the given ``sizes`` (once per
    inverse update)."""
    check_choice("digital_method", method, DIGITAL_METHODS)
    return sum(pricing.price_digital(method, n, device=host, precision=precision).seconds for n in sizes)


def analog_factor_seconds(n: int, n_rhs: int, *, device: ThermoDevice, host: DigitalDevice,
                          method: str, spectrum: SpectrumSummary, eps: float = DEFAULT_EPS) -> float | None:
    """One inverse update's analog work on one factor of size ``n`` at the target ``eps``
    (``None``: it does not fit): ``"solve"`` programs it and runs one resident solve with
    ``n_rhs`` columns; ``"inverse"`` samples its inverse."""
    check_choice("method", method, ANALOG_METHODS)
    try:
        if method == "inverse":
            return pricing.price(pricing.AnalogJob("inverse", n, spectrum=spectrum, target_eps=eps),
                                 device, host).seconds
        job = pricing.AnalogJob("solve", n, n_rhs, spectrum=spectrum, target_eps=eps, resident=True)
        return pricing.price_program(n, device).seconds + pricing.price(job, device, host).seconds
    except pricing.ThermoCapacityError:
        return None


def digital_layer_seconds(method: str, n_a: int, n_g: int, *, host: DigitalDevice,
                          inverse_every: int = 1, precision: str = "fp32") -> float:
    """Digital solver work per step: decompositions amortized over ``inverse_every``, then the
    preconditioning GEMMs."""
    check_positive("inverse_every", inverse_every, integer=True)
    return (decomposition_seconds(method, (n_a, n_g), host, precision) / inverse_every
            + preconditioning_seconds(method, n_a, n_g, host, precision))


def deflation_host_seconds(n: int, k: int, n_rhs: int, host: DigitalDevice) -> tuple[float, float]:
    """``(per inverse update, per solve)`` host seconds of deflating ``k`` top modes of a size-``n``
    factor whose solves have ``n_rhs`` columns (:func:`hw_models.pricing.deflation_gemms`)."""
    return (pricing.price_host_gemms(pricing.deflation_gemms(n, k), host).seconds,
            pricing.price_host_gemms(pricing.deflation_gemms(n, k, n_rhs), host).seconds)


def auto_depths(n: int, max_deflate: int, start: int = 0) -> list[int]:
    """The depths ``deflate="auto"`` tries for a size-``n`` factor, from the one before ``start``
    (a factor that needed ``k`` last time rarely needs much less)."""
    depths = [k for k in AUTO_DEPTHS if k <= min(max_deflate, n - 1)]
    if start in depths:
        depths = depths[max(depths.index(start) - 1, 0):]
    return depths


def deflated_spectrum(eigenvalues: Any, k: int, lam: float) -> SpectrumSummary:
    """The spectrum the device sees after deflating the top ``k`` modes of a damped factor with
    eigenvalues ``eigenvalues`` and damping ``lam``: ``lam`` on the deflated modes, the rest kept."""
    mu = np.sort(np.asarray(eigenvalues, dtype=np.float64).reshape(-1))
    if k > 0:
        mu = mu.copy()
        mu[mu.size - k:] = lam
    return SpectrumSummary.from_eigenvalues(mu)


def law_window(n: int, n_rhs: int, *, spectrum: SpectrumSummary, device: ThermoDevice,
               host: DigitalDevice, target: float, start: str = "zero", copies: int = 1,
               max_window: float = 200.0, fixed: float | None = None,
               input_scale: float | None = None) -> tuple[float, float, bool]:
    """``(window, burn-in, reachable)`` of one resident solve whose target is ``target`` (each of
    a layer's two solves gets ``target_error / SOLVE_SHARES``): the error law's window, at least
    :data:`MIN_WINDOW` (a read-out integrates over the fastest mode's time constant, and the
    clipping integrator steps at that scale) and at most ``max_window``. ``reachable``: the law
    meets the target within the longest window allowed, ``max_window`` or a ``fixed`` window
    (at least one tau)."""
    job = pricing.AnalogJob("solve", n, n_rhs, spectrum=spectrum, target_eps=target, start=start,
                            resident=True, copies=int(copies), oversize="block", input_scale=input_scale)
    law = pricing.price(job, device, host)
    longest = max_window if fixed is None else max(fixed, 1.0)
    reachable = bool(law.info["reachable"]) and law.window_tau <= longest * (1 + 1e-9)
    return (min(max(law.window_tau, MIN_WINDOW), max_window), min(law.burn_in_tau, max_window), reachable)


def model_feasibility(device: ThermoDevice, eigenvalues: Mapping[str, Any], lam: Mapping[str, float],
                      margin: float = DEFAULT_MARGIN) -> FeasibilityCheck:
    """The feasibility law from spectra only (no matrix at hand): the predicted ``||dP||`` of
    :func:`~hw_models.langevin.feasibility.perturbation_model` (off-diagonal abs-max taken as 1,
    the pessimistic end) against the deflated remainder's normalised ``lambda_min``."""

    def check(key: str, k: int) -> tuple[bool, str, float | None]:
        mu = np.sort(np.asarray(eigenvalues[key], dtype=np.float64))
        top = max(float(mu[mu.size - k - 1]), lam[key])
        smallest = lam[key] / top
        norm = perturbation_model(mu.size, device.noise)
        ok = smallest >= margin * norm
        verdict = "feasible" if ok else "not representable"
        return ok, (f"{verdict}: lambda_min {smallest:.3g} vs {margin:g} x predicted ||dP|| "
                    f"{norm:.3g} (model)"), None

    return check


@dataclass(frozen=True)
class AnalogPlan:
    """What a thermodynamic solve of one layer would run: per factor the deflation depth, the
    window and burn-in, and the priced jobs; ``seconds`` per step (``None``: the analog side
    cannot serve the layer, ``reason`` says why)."""

    seconds: float | None
    reason: str = ""
    depths: dict[str, int] = field(default_factory=dict)
    windows: dict[str, float] = field(default_factory=dict)
    host_s: float = 0.0  # the deflation's host GEMMs per step (amortized prepare included)


def analog_layer_ledger(n_a: int, n_g: int, *, device: ThermoDevice, host: DigitalDevice,
                        spectra: Mapping[str, SpectrumSummary], method: str = "solve",
                        eps: float = DEFAULT_EPS, window: float | None = None, burn_in: float | None = None,
                        start: str = "zero", bits: int | None = None, copies: int = 1,
                        oversize: str | None = None, resident: bool = True, inverse_every: int = 1,
                        precision: str = "fp32") -> tuple[pricing.Ledger, list[pricing.Price]]:
    """Per-step seconds and joules by component of one layer's analog solver work, and the priced
    jobs (per factor: ``A, G`` for an inverse, ``G, A`` for solves).

    ``"inverse"``: both inverses sampled once per update (amortized over ``inverse_every``), one
    host GEMM pair per step. ``"solve"``: two solves per step (``G`` with ``n_a`` columns, ``A``
    with ``n_g``); ``resident`` keeps the couplings programmed between updates, so their transfer
    and programming are amortized, else every solve pays them. The window is ``window`` (``None``:
    the law's for ``eps``) with ``burn_in`` (``None``: the law's). Raises
    :class:`~hw_models.pricing.ThermoCapacityError` for a factor the device refuses.
    """
    check_choice("method", method, ANALOG_METHODS)
    check_positive("inverse_every", inverse_every, integer=True)
    common = dict(window_tau=window, target_eps=None if window is not None else eps, burn_in_tau=burn_in,
                  bits=bits, copies=int(copies), oversize=oversize)
    sizes, columns = {"A": n_a, "G": n_g}, {"A": n_g, "G": n_a}
    ledger = pricing.Ledger()
    parts: list[pricing.Price] = []
    if method == "inverse":
        parts = [pricing.price(pricing.AnalogJob("inverse", sizes[k], spectrum=spectra[k], **common),
                               device, host) for k in ("A", "G")]
        for part in parts:
            ledger.merge(part, 1.0 / inverse_every)
        apply = preconditioning_seconds("inverse", n_a, n_g, host, precision)
        ledger.add("preconditioning", apply, apply * host.power_w)
        return ledger, parts
    for k in ("G", "A"):
        job = pricing.AnalogJob("solve", sizes[k], columns[k], spectrum=spectra[k], start=start, **common)
        fresh = pricing.price(job, device)
        if resident:
            kept = pricing.price(job.replace(resident=True), device)
            ledger.merge(kept)
            for key in fresh.breakdown_s:  # what a fresh programming adds, once per update
                extra_s = fresh.breakdown_s[key] - kept.breakdown_s.get(key, 0.0)
                extra_j = fresh.breakdown_j[key] - kept.breakdown_j.get(key, 0.0)
                ledger.add(key, extra_s, extra_j, 1.0 / inverse_every)
        else:
            ledger.merge(fresh)
        parts.append(fresh)
    return ledger, parts


def analog_layer_seconds(n_a: int, n_g: int, *, device: ThermoDevice, host: DigitalDevice,
                         spectra: Mapping[str, SpectrumSummary], method: str = "solve",
                         eps: float = DEFAULT_EPS, window: float | None = None,
                         burn_in: float | None = None, start: str = "zero", copies: int = 1,
                         oversize: str | None = None, inverse_every: int = 1, precision: str = "fp32",
                         require_reachable: bool = False, deflate: int | str | None = None,
                         max_deflate: int = 128, max_window: float = 200.0,
                         eigenvalues: Mapping[str, Any] | None = None,
                         lam: Mapping[str, float] | None = None,
                         feasible: FeasibilityCheck | None = None) -> AnalogPlan:
    """Analog solver work per step of one layer (module docs).

    ``method="inverse"``: both inverses sampled per update, one host GEMM pair per step;
    ``"solve"``: both factors programmed per update, two resident solves per step. The window is
    ``window`` (with ``burn_in``) or, when ``None``, the one the error law needs for ``eps`` on
    ``spectra`` (``{"A", "G"}``); ``require_reachable`` makes an unreachable target "cannot serve".
    ``deflate`` (solve only; an int or ``"auto"``) prices the thermodynamic solver's own rule:
    ``eigenvalues`` and ``lam`` (per factor, the damped eigenvalues and the damping) give the
    deflated remainders, ``feasible`` the feasibility law (default :func:`model_feasibility`).
    A factor larger than the device under ``"refuse"`` cannot serve.
    """
    check_choice("method", method, ANALOG_METHODS)
    try:
        if method == "inverse" or deflate is None:
            ledger, jobs = analog_layer_ledger(n_a, n_g, device=device, host=host, spectra=spectra,
                                               method=method, eps=eps, window=window, burn_in=burn_in,
                                               start=start, copies=copies, oversize=oversize,
                                               inverse_every=inverse_every, precision=precision)
            if require_reachable and not all(p.info["reachable"] for p in jobs):
                return AnalogPlan(None, f"eps {eps:g} out of reach")
            return AnalogPlan(ledger.cost().seconds)
        prepare = sum(pricing.price_program(n, device, oversize=oversize).seconds for n in (n_a, n_g))
    except pricing.ThermoCapacityError as err:
        return AnalogPlan(None, str(err))
    return _deflated_solve(n_a, n_g, device=device, host=host, spectra=spectra, eps=eps, window=window,
                           burn_in=burn_in, start=start, copies=copies, inverse_every=inverse_every,
                           deflate=deflate, max_deflate=max_deflate, max_window=max_window,
                           eigenvalues=eigenvalues, lam=lam, feasible=feasible, prepare=prepare)


def _deflated_solve(n_a: int, n_g: int, *, device: ThermoDevice, host: DigitalDevice,
                    spectra: Mapping[str, SpectrumSummary], eps: float, window: float | None,
                    burn_in: float | None, start: str, copies: int, inverse_every: int,
                    deflate: int | str, max_deflate: int, max_window: float,
                    eigenvalues: Mapping[str, Any] | None, lam: Mapping[str, float] | None,
                    feasible: FeasibilityCheck | None, prepare: float) -> AnalogPlan:
    sizes, columns = {"A": n_a, "G": n_g}, {"A": n_g, "G": n_a}
    if eigenvalues is None:  # the summaries' normalised modes stand for the eigenvalues
        eigenvalues = {k: np.repeat(np.asarray(s.normalized_modes()[0]) * s.lambda_max,
                                    np.maximum(np.rint(s.normalized_modes()[1]), 1).astype(int))
                       for k, s in spectra.items()}
    lam = lam or {k: float(s.lambda_min) for k, s in spectra.items()}
    feasible = feasible or model_feasibility(device, eigenvalues, lam)
    target = eps / SOLVE_SHARES
    seconds, host_s = prepare / inverse_every, 0.0
    depths: dict[str, int] = {}
    windows: dict[str, float] = {}
    for key in ("G", "A"):
        n, m = sizes[key], columns[key]
        tries = auto_depths(n, max_deflate) if deflate == "auto" else [int(deflate)]
        chosen, reason = None, ""
        for k in tries:
            ok, why, max_coupling = feasible(key, k)
            reason = f"factor {key}, deflation depth {k}: {why}"
            if not ok:
                continue
            spectrum = deflated_spectrum(eigenvalues[key], k, lam[key])
            if max_coupling is not None:
                spectrum = dataclasses.replace(spectrum, max_coupling=max_coupling)
            law_win, law_burn, reachable = law_window(n, m, spectrum=spectrum, device=device, host=host,
                                                      target=target, start=start, copies=copies,
                                                      max_window=max_window, fixed=window)
            if not reachable:
                reason = (f"factor {key}, deflation depth {k}: eps {target:g} out of reach within "
                          f"{max_window if window is None else max(window, 1.0):g} tau")
                continue
            win, burn = (law_win, law_burn) if window is None else (window, burn_in or 0.0)
            job = pricing.AnalogJob("solve", n, m, spectrum=spectrum, window_tau=win, burn_in_tau=burn,
                                    start=start, resident=True, copies=copies, oversize="block")
            chosen = (k, win, pricing.price(job, device, host).seconds)
            break
        if chosen is None:
            return AnalogPlan(None, f"no deflation depth serves: {reason}", depths, windows)
        k, win, solve_s = chosen
        depths[key], windows[key] = k, win
        per_update, per_solve = deflation_host_seconds(n, k, m, host)
        gemms = per_update / inverse_every + per_solve
        host_s += gemms
        seconds += solve_s + gemms
    return AnalogPlan(seconds, "", depths, windows, host_s)
