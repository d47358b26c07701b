"""The ``auto`` solver: analog or digital per layer, re-decided at every inverse update.

:class:`AutoSolver` is what the ``"auto"`` rule of :class:`thermo_kfac.policy.SolverPolicy` puts
on a layer: it holds the analog and the digital solver and, at every inverse update, prices both
from the layer's measured damped factors (:func:`thermo_kfac.layer_pricing.price_layer`, built by
:mod:`hw_models.layer_cost`): a thermodynamic solver that deflates is priced by its own rule --
the feasibility law on each deflated remainder (:func:`measured_law`), the first depth it accepts
whose law window for the solver's ``target_error`` fits, that depth's host GEMMs --, so a layer no
depth can serve is priced "cannot serve" and goes digital with that reason. It then prepares
whichever serves the layer. Hysteresis keeps it from flapping: it switches only when the other
side is cheaper by ``margin`` (relative) at ``patience`` consecutive updates, or at once when the
analog side cannot serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hw_models.defaults import DEFAULT_EPS
from hw_models.devices import DigitalDevice, ThermoDevice
from hw_models.langevin.feasibility import DEFAULT_MARGIN, feasibility
from hw_models.units import format_seconds
from hw_models.validation import check_number, check_positive
from thermo_kfac.layer_pricing import damped_eigenvalues, damped_spectra, plan_layer
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverReport
from thermo_kfac.solvers.deflation import deflate


def measured_law(A: torch.Tensor, G: torch.Tensor, damping: Damping, settings: Mapping[str, Any],
                 hardware: ThermoDevice, eigenvalues: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The measured inputs of a deflating thermodynamic solver's pricing rule: each damped
    factor's eigenvalues (``eigenvalues``: :func:`~thermo_kfac.layer_pricing.damped_eigenvalues`,
    computed when not given), its damping, and the feasibility law on its deflated remainder
    (``feasible(key, k)``: deflated as the solver deflates, normalised by the remainder's largest
    eigenvalue, the law of :mod:`hw_models.langevin.feasibility` on the solver's device)."""
    lam_a, lam_g = damping.split(A, G)
    device = settings.get("thermo_device") or hardware
    margin = float(settings.get("feasibility_margin") or DEFAULT_MARGIN)
    factors = {"A": 0.5 * (A + A.T).double(), "G": 0.5 * (G + G.T).double()}
    lam = {"A": float(lam_a), "G": float(lam_g)}
    eigenvalues = dict(eigenvalues) if eigenvalues is not None else damped_eigenvalues(A, G, damping)

    def feasible(key: str, k: int) -> tuple[bool, str, float | None]:
        F, n = factors[key], factors[key].shape[0]
        _, S = deflate(F, k, lam[key], seed=k)
        mu = eigenvalues[key]
        c = max(float(mu[n - k - 1]), lam[key])  # the remainder's largest eigenvalue
        P = S / c
        off = float((P - torch.diag(torch.diagonal(P))).abs().max()) if n > 1 else 0.0
        verdict = feasibility(P, device.noise, lam[key] / c, margin)
        return verdict.feasible, verdict.reason(), off

    return {"eigenvalues": eigenvalues, "lam": lam, "feasible": feasible}


class AutoSolver(KFACSolver):
    """The ``auto`` rule's per-layer solver: analog or digital, decided at each inverse update
    from the layer's measured spectra (module docs). Not registered: the policy builds it.

    Attributes: ``choice`` (``"analog"``/``"digital"``), ``decision`` (the last update's measured
    kappa of A and G, predicted analog and digital seconds per step, the choice and whether it
    switched), ``switches`` (how often it changed sides).
    """

    name = "auto"

    def __init__(self, analog: KFACSolver, digital: KFACSolver, *, hardware: ThermoDevice,
                 host: DigitalDevice, n_a: int, n_g: int, initial: str = "analog", eps: float = DEFAULT_EPS,
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
        eigenvalues = damped_eigenvalues(A, G, damping)
        spectra = damped_spectra(A, G, damping, eigenvalues)
        analog, digital = self.solvers["analog"], self.solvers["digital"]
        settings = analog.pricing_settings()
        law: dict[str, Any] = {}
        if settings.get("method") == "solve" and settings.get("deflate") is not None:
            law = measured_law(A, G, damping, settings, self.hardware, eigenvalues)
        plan, digital_s = plan_layer(settings, digital.digital_method, self.n_a, self.n_g,
                                     hardware=self.hardware, digital=self.host, spectra=spectra,
                                     eps=self.eps, inverse_every=self.inverse_every, accuracy="eps", **law)
        thermo_s = plan.seconds
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
                         "streak": self.streak, "reason": plan.reason, "depths": dict(plan.depths),
                         "windows": dict(plan.windows)}
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
        thermo = (f"cannot serve ({d.get('reason') or f'eps {self.eps:g} out of reach'})"
                  if d["thermo_s"] is None
                  else format_seconds(d["thermo_s"]))
        return (f"auto: kappa A {d['kappa'][0]:.3g}, G {d['kappa'][1]:.3g}; analog {thermo}, digital "
                f"{format_seconds(d['digital_s'])} per step -> {d['choice']}"
                + (" (switched)" if d["switched"] else ""))

