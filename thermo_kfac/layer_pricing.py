"""Per-step solver work of one K-FAC layer, priced by :mod:`hw_models.pricing`, and the ``auto`` solver.

:func:`price_layer` is the one place the library turns a layer (factor sizes, an analog solver's
:meth:`~thermo_kfac.solvers.KFACSolver.pricing_settings`, optionally the measured damped-factor
spectra) into predicted seconds per training step on the analog and on the digital side. It prices
only the solver work: programming or inverting the factors (amortized over ``inverse_every``)
and applying them every step; the factor statistics cost the same on both machines and are left
out of the comparison.

:class:`AutoSolver` is what the ``"auto"`` rule of :class:`thermo_kfac.policy.SolverPolicy` puts
on a layer: it holds the analog and the digital solver and, at every inverse update, prices both
from the layer's measured damped-factor spectra (the analog side at the window the error law
needs for the policy's ``eps`` on those spectra, with the analog solver's start, bits, copies and
kappa0), then prepares whichever serves the layer. Hysteresis keeps it from flapping: it
switches only when the other side is cheaper by ``margin`` (relative) at ``patience``
consecutive updates, or at once when the analog side cannot hold the factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hw_models import pricing
from hw_models.devices import DigitalDevice, ThermoDevice
from hw_models.units import format_seconds
from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverReport


def price_digital_layer(digital_method: str, n_a: int, n_g: int, *, digital: DigitalDevice,
                        inverse_every: int = 1, precision: str = "fp32") -> float:
    """Digital solver work per step of one layer: one ``digital_method`` decomposition per factor
    and update (amortized), and the preconditioning GEMMs every step (two pairs for eigh)."""
    check_positive("inverse_every", inverse_every, integer=True)
    pair = (pricing.gemm_time(n_g, n_g, n_a, digital, precision)
            + pricing.gemm_time(n_g, n_a, n_a, digital, precision))
    decomposition = sum(pricing.price_digital(digital_method, n, device=digital, precision=precision).seconds
                        for n in (n_a, n_g))
    return decomposition / inverse_every + pair * (2 if digital_method == "eigh" else 1)


def price_layer(settings: Mapping[str, Any], digital_method: str, n_a: int, n_g: int, *,
                hardware: ThermoDevice, digital: DigitalDevice,
                spectra: Mapping[str, pricing.SpectrumSummary] | None = None, kappa: float = 100.0,
                eps: float = 0.1, inverse_every: int = 1, oversize: str | None = None,
                precision: str = "fp32", accuracy: str = "window") -> tuple[float | None, float]:
    """``(analog seconds or None when a factor does not fit, digital seconds)`` per step.

    Analog: the solver's ``method`` (``"solve"``: program both factors per update, two resident
    solves per step with the gradient's columns; ``"inverse"``: sample both inverses per update,
    two host GEMMs per step) at its ``analog_time``/``burn_in``/``start`` (``accuracy="window"``;
    a solver that states no window is priced at the target ``eps``) or at the window the error law
    needs for ``eps`` on these spectra (``accuracy="eps"``: what ``auto`` compares, so a worse
    conditioned layer costs more analog time; an unreachable target counts as not fitting), on
    the solver's own device object (``settings["thermo_device"]``: what it simulates, overrides
    included; ``hardware`` for a solver that states none), on
    ``spectra`` (``{"A", "G"}``; default the
    geometric model at ``kappa``). Digital: one ``digital_method`` decomposition per factor and
    update, and the preconditioning GEMMs (two pairs for eigh). ``oversize`` overrides the
    device's rule for factors larger than its cells (:func:`hw_models.pricing.fit_blocks`).
    """
    check_positive("inverse_every", inverse_every, integer=True)
    check_choice("accuracy", accuracy, ("window", "eps"))
    pair = (pricing.gemm_time(n_g, n_g, n_a, digital, precision)
            + pricing.gemm_time(n_g, n_a, n_a, digital, precision))
    digital_s = price_digital_layer(digital_method, n_a, n_g, digital=digital,
                                    inverse_every=inverse_every, precision=precision)
    spectra = spectra or {}
    spec = {"A": spectra.get("A") or pricing.SpectrumSummary.from_kappa(n_a, kappa),
            "G": spectra.get("G") or pricing.SpectrumSummary.from_kappa(n_g, kappa)}
    window = (settings.get("analog_time") or None) if accuracy == "window" else None
    # the solver's own device object (what it simulates) when it states one, else the policy's
    device = settings.get("thermo_device") or hardware
    common = dict(window_tau=window, target_eps=None if window else eps,
                  burn_in_tau=settings.get("burn_in") if window else None,
                  copies=int(settings.get("copies") or 1), oversize=oversize)
    try:
        if settings.get("method", "inverse") == "inverse":
            jobs = [pricing.price(pricing.AnalogJob("inverse", n, spectrum=spec[k], **common), device,
                                  digital) for k, n in (("A", n_a), ("G", n_g))]
            if accuracy == "eps" and not all(p.info["reachable"] for p in jobs):
                return None, digital_s
            return sum(p.seconds for p in jobs) / inverse_every + pair, digital_s
        start = str(settings.get("start") or "zero")
        prepare = sum(pricing.price_program(n, device, oversize=oversize).seconds
                      for n in (n_a, n_g))
        jobs = [pricing.price(pricing.AnalogJob("solve", n, m, spectrum=spec[k], start=start,
                                                resident=True, **common), device)
                for k, n, m in (("G", n_g, n_a), ("A", n_a, n_g))]
        if accuracy == "eps" and not all(p.info["reachable"] for p in jobs):
            return None, digital_s
        return prepare / inverse_every + sum(p.seconds for p in jobs), digital_s
    except pricing.ThermoCapacityError:
        return None, digital_s


def damped_spectra(A: torch.Tensor, G: torch.Tensor, damping: Damping) -> dict[str, pricing.SpectrumSummary]:
    """The measured spectra of the damped factors ``A + lam_A I`` and ``G + lam_G I``."""
    lam_a, lam_g = damping.split(A, G)
    out = {}
    for key, F, lam in (("A", A, lam_a), ("G", G, lam_g)):
        M = 0.5 * (F + F.T).double() + lam * torch.eye(F.shape[0], dtype=torch.float64, device=F.device)
        out[key] = pricing.SpectrumSummary.from_eigenvalues(
            torch.linalg.eigvalsh(M).clamp_min(1e-300).cpu().numpy())
    return out


class AutoSolver(KFACSolver):
    """The ``auto`` rule's per-layer solver: analog or digital, decided at each inverse update
    from the layer's measured spectra (module docs). Not registered: the policy builds it.

    Attributes: ``choice`` (``"analog"``/``"digital"``), ``decision`` (the last update's measured
    kappa of A and G, predicted analog and digital seconds per step, the choice and whether it
    switched), ``switches`` (how often it changed sides).
    """

    name = "auto"

    def __init__(self, analog: KFACSolver, digital: KFACSolver, *, hardware: ThermoDevice,
                 host: DigitalDevice, n_a: int, n_g: int, initial: str = "analog", eps: float = 0.1,
                 inverse_every: int = 1, margin: float = 0.2, patience: int = 2) -> None:
        super().__init__()
        if initial not in ("analog", "digital"):
            raise ValueError(f"initial={initial!r} is not valid; choose 'analog' or 'digital'")
        self.solvers = {"analog": analog, "digital": digital}
        self.hardware, self.host = hardware, host
        self.n_a, self.n_g, self.eps = int(n_a), int(n_g), float(eps)
        self.inverse_every = check_positive("inverse_every", inverse_every, integer=True)
        self.margin = check_number("auto_margin", margin, low=0.0, high=1.0, high_inclusive=False)
        self.patience = check_positive("auto_patience", patience, integer=True)
        self.choice = initial
        self.streak = 0  # consecutive updates at which the other side was cheaper by the margin
        self.switches = 0
        self.decision: dict[str, Any] = {}

    @property
    def current(self) -> KFACSolver:
        """The solver serving the layer now."""
        return self.solvers[self.choice]

    @property
    def analog(self) -> bool:  # type: ignore[override]
        return self.choice == "analog"

    @property
    def digital_method(self) -> str:  # type: ignore[override]
        return self.solvers["digital"].digital_method

    def pricing_settings(self) -> dict[str, Any]:
        return self.current.pricing_settings()

    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        spectra = damped_spectra(A, G, damping)
        analog, digital = self.solvers["analog"], self.solvers["digital"]
        thermo_s, digital_s = price_layer(analog.pricing_settings(), digital.digital_method, self.n_a,
                                          self.n_g, hardware=self.hardware, digital=self.host,
                                          spectra=spectra, eps=self.eps, inverse_every=self.inverse_every,
                                          accuracy="eps")
        if self.choice == "analog":
            better = thermo_s is None or digital_s < thermo_s * (1.0 - self.margin)
        else:
            better = thermo_s is not None and thermo_s < digital_s * (1.0 - self.margin)
        self.streak = self.streak + 1 if better else 0
        switched = better and (self.streak >= self.patience or thermo_s is None)
        if switched:
            self.choice = "digital" if self.choice == "analog" else "analog"
            self.streak, self.switches = 0, self.switches + 1
        self.decision = {"kappa": [spectra["A"].kappa, spectra["G"].kappa], "thermo_s": thermo_s,
                         "digital_s": digital_s, "choice": self.choice, "switched": switched,
                         "streak": self.streak}
        for solver in self.solvers.values():
            solver.layer_index = self.layer_index
        self.current.prepare(A, G, damping)
        self.last_report = self._report()

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        out = self.current.apply(grad)
        self.last_report = self._report()
        return out

    def _report(self) -> SolverReport:
        report = self.current.last_report
        if report is None:  # e.g. a digital solver that reports nothing: the decision still shows
            return SolverReport(info={"auto": dict(self.decision)})
        return SolverReport(hardware_time_s=report.hardware_time_s, energy_j=report.energy_j,
                            info={**report.info, "auto": dict(self.decision)})

    @property
    def ready(self) -> bool:
        return self.current.ready

    def state_dict(self) -> dict[str, Any]:
        inner = self.current.state_dict()
        if not inner:
            return {}
        return {"choice": self.choice, "streak": self.streak, "switches": self.switches,
                "decision": dict(self.decision), "inner": inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.choice, self.streak = str(state["choice"]), int(state["streak"])
        self.switches, self.decision = int(state.get("switches", 0)), dict(state.get("decision") or {})
        self.current.load_state_dict(state["inner"])

    def describe(self) -> str:
        """One line for the assignment table: measured kappa, predicted times, the choice."""
        d = self.decision
        if not d:
            return f"auto: {self.choice} (no update yet)"
        thermo = (f"cannot serve (eps {self.eps:g} out of reach)" if d["thermo_s"] is None
                  else format_seconds(d["thermo_s"]))
        return (f"auto: kappa A {d['kappa'][0]:.3g}, G {d['kappa'][1]:.3g}; analog {thermo}, digital "
                f"{format_seconds(d['digital_s'])} per step -> {d['choice']}"
                + (" (switched)" if d["switched"] else ""))

