"""The assignment table: which solver serves each layer and why (:class:`LayerAssignment`), and
its terminal rendering (:func:`format_assignment`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from thermo_kfac.solver_spec import SolverSpec
from thermo_kfac.solvers.auto import AutoSolver
from thermo_kfac.solvers.base import KFACSolver

__all__ = ["LayerAssignment", "format_assignment"]


@dataclass(frozen=True)
class LayerAssignment:
    """The solver chosen for one layer and why."""

    layer: str
    module_type: str
    factor_sizes: tuple[int, int]  # (n_A incl. bias column, n_G)
    spec: SolverSpec
    reason: str
    label: str = ""  # the spec as chosen, before the policy's presets were filled in

    @property
    def solver(self) -> str:
        return self.spec.name

    @property
    def text(self) -> str:
        return self.label or self.spec.text

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "type": self.module_type, "factor_sizes": list(self.factor_sizes),
                "solver": self.solver, "spec": self.text, "reason": self.reason}


def format_assignment(assignments: Iterable[LayerAssignment],
                      solvers: Mapping[str, KFACSolver] | None = None) -> str:
    """A small terminal table: layer, type, factor sizes, solver spec, reason.

    With ``solvers`` (``{layer: solver}``, e.g. from ``precond.layer_table``), an ``auto`` layer's
    row shows its latest decision: measured kappa of A and G, predicted analog and digital seconds
    per step and the current choice.
    """
    rows = [["layer", "type", "A x G", "solver", "why"]]
    for a in assignments:
        solver = (solvers or {}).get(a.layer)
        text, why = a.text, a.reason
        if isinstance(solver, AutoSolver):
            text, why = solver.current.name, solver.describe()
        rows.append([a.layer, a.module_type, f"{a.factor_sizes[0]} x {a.factor_sizes[1]}", text, why])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
