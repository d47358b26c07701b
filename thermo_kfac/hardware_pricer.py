"""Predicted curvature seconds per training step of the all-digital and the hybrid machine
(:class:`HardwarePricer`): an analog layer's hybrid time is its factor statistics plus exactly what
its solver reported (prepare amortized, apply every step); nothing here prices hardware except
through :mod:`hw_models` (:mod:`hw_models.layer_cost` for the solver work)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from hw_models import pricing
from hw_models.cost import KFACSchedule
from hw_models.devices import DigitalDevice, ThermoDevice
from thermo_kfac.layer_pricing import price_digital_layer, price_layer
from thermo_kfac.solver_spec import is_analog
from thermo_kfac.solvers.base import KFACSolver

__all__ = ["HardwarePricer", "PricingPolicy"]


class PricingPolicy(Protocol):
    """What the pricer reads of a :class:`~thermo_kfac.policy.SolverPolicy`."""

    hardware: ThermoDevice
    digital: DigitalDevice
    kappa: float
    eps: float


class HardwarePricer:
    """Predicted curvature seconds per training step of the all-digital and the hybrid machine.

    Per layer, both machines pay the factor statistics (two GEMMs per factor update on the
    digital preset). The all-digital machine adds the layer's digital solver work
    (:func:`~thermo_kfac.layer_pricing.price_layer`: decompositions amortized over
    ``inverse_every``, preconditioning GEMMs every step). The hybrid machine adds, for an analog
    layer, exactly what its solver reported: ``prepare / inverse_every + apply`` (before the first
    report: :func:`price_layer` with the solver's settings at the policy's nominal ``kappa``).
    Model prices depend only on sizes, rows and settings, so they are cached.
    """

    def __init__(self, policy: PricingPolicy, schedule: KFACSchedule) -> None:
        self.policy = policy
        self.schedule = schedule
        self._rows: dict[str, int] = {}
        self._cache: dict[tuple, tuple[float, float]] = {}  # (statistics, digital solver work)
        self._analog: dict[tuple, float | None] = {}  # model price of an analog layer, until it reports
        self._reported: dict[str, list[float | None]] = {}

    def observe_rows(self, rows: Mapping[str, int]) -> None:
        """Rows of statistics per layer in a factor-update step (batch times positions)."""
        for name, count in rows.items():
            if count > 0:
                self._rows[name] = int(count)

    def observe_reports(self, reports: Mapping[str, Any]) -> None:
        """Solver reports of one step (``"<layer>/prepare"``, ``"<layer>/apply"``)."""
        for key, report in reports.items():
            name, _, kind = key.rpartition("/")
            seconds = getattr(report, "hardware_time_s", None)
            slot = self._reported.setdefault(name, [None, None])
            if kind == "prepare" and seconds is not None:
                slot[0] = float(seconds)
            elif kind == "apply":
                slot[1] = None if seconds is None else float(seconds)

    def layer_cost(self, name: str, solver: KFACSolver, n_a: int, n_g: int, has_bias: bool
                   ) -> tuple[float, float]:
        """``(all-digital seconds, hybrid seconds)`` per step of one layer."""
        rows = self._rows.get(name, 1)
        analog = is_analog(solver)
        settings = solver.pricing_settings()
        # the digital side depends on the method and the shapes only (an analog solver's settings
        # carry per-call values such as its input scales: keying on them missed every step)
        digital_key = (rows, settings["digital_method"], n_a, n_g)
        if digital_key not in self._cache:
            self._cache[digital_key] = self._model_costs(settings, n_a, n_g, rows)
        statistics, digital_s = self._cache[digital_key]
        if not analog:
            return statistics + digital_s, statistics + digital_s
        prepared, applied = self._reported.get(name, [None, None])
        if prepared is not None or applied is not None:
            analog_s = (prepared or 0.0) / self.schedule.inverse_every + (applied or 0.0)
        else:  # no report yet (or a solver that reports none): the model price of its settings
            key = (name, rows, tuple(sorted((k, str(v)) for k, v in settings.items())))
            if key not in self._analog:
                self._analog[key] = price_layer(
                    settings, settings["digital_method"], n_a, n_g, hardware=self.policy.hardware,
                    digital=self.policy.digital, kappa=self.policy.kappa, eps=self.policy.eps,
                    inverse_every=self.schedule.inverse_every, oversize="block",
                    precision=self.schedule.precision)[0]
            analog_s = self._analog[key] or 0.0
        return statistics + digital_s, statistics + analog_s

    def _model_costs(self, settings: Mapping[str, Any], n_a: int, n_g: int, rows: int
                     ) -> tuple[float, float]:
        host, prec = self.policy.digital, self.schedule.precision
        statistics = (pricing.gemm_time(n_a, rows, n_a, host, prec)
                      + pricing.gemm_time(n_g, rows, n_g, host, prec)) / self.schedule.factor_every
        digital_s = price_digital_layer(settings["digital_method"], n_a, n_g, digital=host,
                                        inverse_every=self.schedule.inverse_every, precision=prec)
        return statistics, digital_s
