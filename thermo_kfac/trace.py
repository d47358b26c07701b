"""The run trace (``trace.json``, schema ``thermo-kfac-trace/1``, docs/hardware_model.md section 10).

:class:`TraceRecorder` follows a :class:`~thermo_kfac.KFACPreconditioner` step by step through
its public surface only (``layer_table``, ``damping``, ``policy``, ``last_report``) and builds
one record per layer and inverse update: factor sizes, the spectrum summary of each damped
factor, the solver and its pricing settings, every analog solve the layer ran until the next
update (window, burn-in, start, calls, the law's ``predicted_rel_error`` and, with
``track_exact``, the measured ``rel_error_to_exact``), the solver's reported hardware times,
fallbacks and, for ``auto`` layers, the decision. ``thermo-kfac project --trace`` prices it.

Spectra: an analog solver reports the spectrum it programmed (scaled back to the damped factor's
units); for a digital layer the recorder takes ``eigvalsh`` of the damped factors at each update
(layers with a factor wider than ``max_spectrum_width`` are recorded with the geometric model at
``kappa`` of their diagonal instead, marked ``shape: "diagonal-estimate"``).
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

import torch

from hw_models.pricing import SpectrumSummary
from thermo_kfac.layer_pricing import damped_spectra

if TYPE_CHECKING:
    from thermo_kfac.preconditioner import KFACPreconditioner

TRACE_FORMAT = "thermo-kfac-trace/1"


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(values)) if values else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "to_dict"):  # a device object
        return _jsonable(value.to_dict())
    return str(value)


class TraceRecorder:
    """Builds ``trace.json`` from a preconditioner's steps (module docs).

    Call :meth:`observe` after every ``precond.step()``; :meth:`to_dict` returns the trace.
    """

    def __init__(self, precond: KFACPreconditioner, *, run: dict[str, Any] | None = None,
                 max_spectrum_width: int = 4096) -> None:
        self.precond = precond
        self.run = dict(run or {})
        self.max_spectrum_width = int(max_spectrum_width)
        self.updates: list[dict[str, Any]] = []
        self._open: dict[str, dict[str, Any]] = {}
        self.steps = 0
        self.hardware_s = 0.0  # sum of every solver report's hardware time
        self.predicted_hybrid_s = 0.0  # the preconditioner's predicted times, summed over steps
        self.predicted_digital_s = 0.0

    # ------------------------------------------------------------------------------ recording
    def observe(self) -> None:
        """Record the step the preconditioner just took (reads its ``last_report``)."""
        report = self.precond.last_report
        if not report:
            return
        step = int(report["step"]) - 1
        self.steps += 1
        reports = report.get("solver_reports") or {}
        self.hardware_s += sum(r.hardware_time_s for r in reports.values() if r.hardware_time_s is not None)
        self.predicted_hybrid_s += float(report.get("predicted_hybrid_s") or 0.0)
        self.predicted_digital_s += float(report.get("predicted_digital_s") or 0.0)
        for name, state in self.precond.layer_table.items():
            prepared = reports.get(f"{name}/prepare")
            if report.get("inverse_update") and state.has_factors and (prepared is not None
                                                                          or not state.solver.analog):
                self._close(name)
                self._open[name] = self._new_entry(step, name, state, prepared)
            entry = self._open.get(name)
            if entry is None:
                continue
            entry["steps_until_next"] += 1
            entry["fallbacks"] = int(state.fallbacks) - entry["_fallbacks0"]
            applied = reports.get(f"{name}/apply")
            if applied is not None:
                self._add_apply(entry, applied)

    def _new_entry(self, step: int, name: str, state: Any, prepared: Any) -> dict[str, Any]:
        info = prepared.info if prepared is not None else {}
        pricing_info = info.get("pricing") or {}
        spectra = pricing_info.get("spectra") or {}
        if set(spectra) != {"A", "G"}:
            spectra = {k: s.to_dict() for k, s in self._measure(state).items()}
        solver = state.solver
        current = getattr(solver, "current", solver)  # an auto layer: the solver serving it
        entry: dict[str, Any] = {
            "step": step, "layer": name,
            "factor_sizes": [int(state.adapter.d_in), int(state.adapter.d_out)],
            "factors": spectra, "solver": current.name, "settings": _jsonable(solver.pricing_settings()),
            "solves": [], "steps_until_next": 0, "fallbacks": 0, "_fallbacks0": int(state.fallbacks),
            "hardware_time_s": {"prepare": None if prepared is None else prepared.hardware_time_s,
                                "apply": 0.0},
            "_calls": {}, "_pred": [], "_exact": [],
        }
        if "auto" in info:
            entry["auto"] = _jsonable(info["auto"])
        if info.get("deflate") is not None:  # the thermo solver's depths per factor ([G, A])
            entry["deflate"] = dict(zip(("G", "A"), (int(k) for k in info["deflate"]), strict=True))
        for solve in pricing_info.get("solves", []):  # method "inverse": sampled in prepare
            self._add_solve(entry, solve)
        return entry

    def _measure(self, state: Any) -> dict[str, SpectrumSummary]:
        A, G = state.A, state.G
        if max(A.shape[0], G.shape[0]) <= self.max_spectrum_width:
            return damped_spectra(A, G, self.precond.damping)
        lam_a, lam_g = self.precond.damping.split(A, G)
        out = {}
        for key, F, lam in (("A", A, lam_a), ("G", G, lam_g)):
            d = torch.diagonal(F).double() + lam
            kappa = max(1.0, float(d.max() / d.min().clamp_min(1e-300)))
            model = SpectrumSummary.from_kappa(F.shape[0], kappa)
            out[key] = SpectrumSummary(model.n, float(d.min()), float(d.max()), model.trace_inv_sq,
                                       model.effective_rank, "diagonal-estimate", model.modes, model.weights)
        return out

    def _add_solve(self, entry: dict[str, Any], solve: dict[str, Any]) -> None:
        key = (solve["factor"], solve["op"], int(solve["n_rhs"]))
        acc = entry["_calls"].setdefault(key, {**{k: solve[k] for k in (
            "factor", "op", "n", "n_rhs", "analog_time", "burn_in", "start", "resident")},
            "calls": 0, "_pred": [], "_actual": [], "hardware_time_s": solve.get("hardware_time_s")})
        acc["calls"] += 1
        (acc["_actual"] if solve.get("prediction") == "actual_rhs" else acc["_pred"]).append(
            solve.get("predicted_rel_error"))

    def _add_apply(self, entry: dict[str, Any], applied: Any) -> None:
        info = applied.info or {}
        if applied.hardware_time_s is not None:
            entry["hardware_time_s"]["apply"] += float(applied.hardware_time_s)
        pricing_info = info.get("pricing") or {}
        for solve in pricing_info.get("solves", []):
            self._add_solve(entry, solve)
        actual = [s for s in pricing_info.get("solves", []) if s.get("prediction") == "actual_rhs"]
        if pricing_info.get("predicted_rel_error") is not None:
            entry["_pred"].append((bool(actual), pricing_info["predicted_rel_error"],
                                   info.get("rel_error_to_exact")))
        elif info.get("rel_error_to_exact") is not None:
            entry["_pred"].append((False, None, info["rel_error_to_exact"]))

    def _close(self, name: str) -> None:
        entry = self._open.pop(name, None)
        if entry is None:
            return
        entry.pop("_fallbacks0", None)
        calls = entry.pop("_calls")
        records = entry.pop("_pred")
        entry.pop("_exact")
        exact = _median([r[2] for r in records if r[2] is not None])
        preferred = [r for r in records if r[0]] or records
        entry["predicted_rel_error"] = _median([r[1] for r in preferred if r[1] is not None])
        entry["rel_error_to_exact"] = exact
        # the law against the measurement, call by call (calls that have both)
        ratios = [r[1] / r[2] for r in preferred if r[1] is not None and r[2]]
        entry["predicted_over_exact"] = _median(ratios)
        for acc in calls.values():
            values = acc.pop("_actual") or acc.pop("_pred")
            acc.pop("_pred", None)
            acc.pop("_actual", None)
            acc["predicted_rel_error"] = _median(values)
            acc["rel_error_to_exact"] = exact  # measured for the whole preconditioned gradient
            entry["solves"].append(acc)
        self.updates.append(entry)

    # -------------------------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """The trace; call it once, at the end of the run (it closes the open updates)."""
        for name in list(self._open):
            self._close(name)
        policy = self.precond.policy
        steps = max(self.steps, 1)
        updates = sorted(self.updates, key=lambda u: (u["step"], u["layer"]))
        return _jsonable({
            "format": TRACE_FORMAT, "run": self.run, "steps": steps,
            "inverse_every": self.precond.inverse_update_every, "device": policy.hardware.name,
            "host": policy.digital.name, "updates": updates,
            "totals": {"solver_hardware_s_per_step": self.hardware_s / steps,
                       "predicted_hybrid_s_per_step": self.predicted_hybrid_s / steps,
                       "predicted_digital_s_per_step": self.predicted_digital_s / steps},
        })
