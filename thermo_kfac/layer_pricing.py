"""Per-step solver work of one K-FAC layer from a solver's settings, priced by
:mod:`hw_models.layer_cost` (the one layer-cost builder).

:func:`price_layer` turns a layer (factor sizes, an analog solver's
:meth:`~thermo_kfac.solvers.KFACSolver.pricing_settings`, optionally the measured damped-factor
spectra) into predicted seconds per training step on the analog and on the digital side. It prices
only the solver work: programming or inverting the factors (amortized over ``inverse_every``)
and applying them every step; the factor statistics cost the same on both machines and are left
out of the comparison. ``auto`` (:class:`thermo_kfac.solvers.auto.AutoSolver`, re-exported here)
decides with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hw_models import layer_cost, pricing
from hw_models.defaults import DEFAULT_EPS, DEFAULT_KAPPA
from hw_models.devices import DigitalDevice, ThermoDevice
from hw_models.layer_cost import FeasibilityCheck
from hw_models.validation import check_choice

if TYPE_CHECKING:
    from thermo_kfac.solvers.base import Damping

__all__ = ["AutoSolver", "damped_spectra",  # noqa: F822 (AutoSolver: module __getattr__)
           "damped_eigenvalues", "plan_layer", "price_digital_layer", "price_layer"]


def price_digital_layer(digital_method: str, n_a: int, n_g: int, *, digital: DigitalDevice,
                        inverse_every: int = 1, precision: str = "fp32") -> float:
    """Digital solver work per step of one layer (:func:`hw_models.layer_cost.digital_layer_seconds`)."""
    return layer_cost.digital_layer_seconds(digital_method, n_a, n_g, host=digital,
                                            inverse_every=inverse_every, precision=precision)


def price_layer(settings: Mapping[str, Any], digital_method: str, n_a: int, n_g: int,
                **options: Any) -> tuple[float | None, float]:
    """``(analog seconds or None when the analog side cannot serve, digital seconds)`` per step:
    :func:`plan_layer`'s seconds (the same keywords)."""
    plan, digital_s = plan_layer(settings, digital_method, n_a, n_g, **options)
    return plan.seconds, digital_s


def plan_layer(settings: Mapping[str, Any], digital_method: str, n_a: int, n_g: int, *,
               hardware: ThermoDevice, digital: DigitalDevice,
               spectra: Mapping[str, pricing.SpectrumSummary] | None = None,
               kappa: float = DEFAULT_KAPPA, eps: float = DEFAULT_EPS, inverse_every: int = 1,
               oversize: str | None = None, precision: str = "fp32", accuracy: str = "window",
               eigenvalues: Mapping[str, Any] | None = None, lam: Mapping[str, float] | None = None,
               feasible: FeasibilityCheck | None = None) -> tuple[layer_cost.AnalogPlan, float]:
    """``(the analog side's plan, digital seconds)`` per step: the plan's ``seconds`` (None when
    the analog side cannot serve, ``reason`` says why), deflation ``depths`` and ``windows``.

    Analog (:func:`hw_models.layer_cost.analog_layer_seconds`): the solver's ``method`` at its
    ``analog_time``/``burn_in``/``start`` (``accuracy="window"``; a solver that states no window
    is priced at the target ``eps``), or at what the solver would run for ``eps``
    (``accuracy="eps"``, what ``auto`` compares; an unreachable target cannot serve): a solver
    with ``deflate`` in its settings is priced by its own rule -- the feasibility law, the
    deflation depth and host GEMMs, the law's window for its ``target_error`` --, with
    ``eigenvalues``/``lam``/``feasible`` from the measured factors when given. The device is
    the solver's own (``settings["thermo_device"]``: what it simulates, overrides included;
    ``hardware`` for a solver that states none); ``spectra`` (``{"A", "G"}``) default to the
    geometric model at ``kappa``. ``oversize`` overrides the device's rule for factors larger
    than its cells. Digital: :func:`price_digital_layer`.
    """
    check_choice("accuracy", accuracy, ("window", "eps"))
    digital_s = price_digital_layer(digital_method, n_a, n_g, digital=digital,
                                    inverse_every=inverse_every, precision=precision)
    spectra = spectra or {}
    spec = {"A": spectra.get("A") or pricing.SpectrumSummary.from_kappa(n_a, kappa),
            "G": spectra.get("G") or pricing.SpectrumSummary.from_kappa(n_g, kappa)}
    window = (settings.get("analog_time") or None) if accuracy == "window" else None
    method = settings.get("method", "inverse")
    deflate = settings.get("deflate") if accuracy == "eps" and method == "solve" else None
    plan = layer_cost.analog_layer_seconds(
        n_a, n_g, device=settings.get("thermo_device") or hardware, host=digital, spectra=spec,
        method=method, eps=float(settings.get("target_error") or eps) if deflate is not None else eps,
        window=window, burn_in=settings.get("burn_in") if window else None,
        start=str(settings.get("start") or "zero"), copies=int(settings.get("copies") or 1),
        oversize=oversize, inverse_every=inverse_every, precision=precision,
        require_reachable=accuracy == "eps", deflate=deflate,
        max_deflate=int(settings.get("max_deflate", 128)),
        max_window=float(settings.get("max_analog_time", 200.0)),
        eigenvalues=eigenvalues, lam=lam, feasible=feasible)
    return plan, digital_s


def damped_eigenvalues(A: torch.Tensor, G: torch.Tensor, damping: Damping) -> dict[str, np.ndarray]:
    """The eigenvalues (ascending, float64) of the damped factors ``A + lam_A I`` and ``G + lam_G I``."""
    lam_a, lam_g = damping.split(A, G)
    out = {}
    for key, F, lam in (("A", A, lam_a), ("G", G, lam_g)):
        M = 0.5 * (F + F.T).double() + lam * torch.eye(F.shape[0], dtype=torch.float64, device=F.device)
        out[key] = torch.linalg.eigvalsh(M).clamp_min(1e-300).cpu().numpy()
    return out


def damped_spectra(A: torch.Tensor, G: torch.Tensor, damping: Damping,
                   eigenvalues: Mapping[str, np.ndarray] | None = None) -> dict[str, pricing.SpectrumSummary]:
    """The measured spectra of the damped factors ``A + lam_A I`` and ``G + lam_G I`` (from their
    :func:`damped_eigenvalues` when given)."""
    eigenvalues = eigenvalues or damped_eigenvalues(A, G, damping)
    return {k: pricing.SpectrumSummary.from_eigenvalues(eigenvalues[k]) for k in ("A", "G")}


def __getattr__(name: str) -> Any:
    # AutoSolver lives beside the other solvers; imported lazily here so that old import paths keep
    # working without a module-level import back into the solvers package
    if name == "AutoSolver":
        from thermo_kfac.solvers.auto import AutoSolver

        return AutoSolver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
