"""Solver specs: a registered solver name (or a per-layer rule) with options, as the policy,
the preconditioner's ``solver=`` and the command line's solver maps give them.

A spec is written typed (``SolverSpec("thermo", {"bits": 8})``), as on the command line
(``"eigh"``, ``"thermo:bits=8,analog_time=20"``, read by :mod:`thermo_kfac.grammar`), as a dict
(``{"solver": "thermo", "bits": 8}``), or as a :class:`~thermo_kfac.solvers.KFACSolver` subclass or
prototype instance; :data:`RULES` are the names resolved per layer by
:class:`thermo_kfac.policy.SolverPolicy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from thermo_kfac.grammar import format_spec, parse_spec
from thermo_kfac.solvers.base import (
    KFACSolver,
    SolverFactory,
    available_solvers,
    registered_solver,
    solver_factory,
)

__all__ = ["RULES", "SolverSpec", "is_analog"]

#: Spec names that are rules resolved per layer rather than solvers.
RULES = ("auto", "fits")


@dataclass(frozen=True)
class SolverSpec:
    """One solver spec: a registered name (or rule) with options, or a solver class/instance."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    solver: KFACSolver | type[KFACSolver] | None = None

    @classmethod
    def parse(cls, value: Any, options: Mapping[str, Any] | None = None) -> SolverSpec:
        """Read ``"name[:key=value,...]"``, a dict ``{"solver": name, key: value}``, a solver
        class or instance, or a :class:`SolverSpec`; ``options`` are merged in (spec wins)."""
        extra = dict(options or {})
        if isinstance(value, SolverSpec):
            spec = value
        elif isinstance(value, KFACSolver) or (isinstance(value, type) and issubclass(value, KFACSolver)):
            spec = SolverSpec(value.name, {}, value)
        elif isinstance(value, Mapping):
            opts = {str(k).replace("-", "_"): v for k, v in value.items()}
            name = opts.pop("solver", opts.pop("name", None))
            if not isinstance(name, str):
                raise ValueError(f"solver spec {dict(value)!r} needs a 'solver' key naming the solver "
                                 f"({', '.join(_valid_names())})")
            spec = SolverSpec(name.strip(), opts)
        elif isinstance(value, str) and value.strip():
            spec = SolverSpec(*parse_spec(value, f"solver spec {value!r}: "))
        else:
            raise ValueError(f"solver spec {value!r} is not valid; use a solver name "
                             f"({', '.join(_valid_names())}) with optional ':key=value,...', a dict "
                             "{'solver': name, ...}, or a KFACSolver subclass or instance")
        if spec.solver is None and spec.name not in RULES and spec.name not in available_solvers():
            raise ValueError(f"solver={spec.name!r} is not valid; choose one of: "
                             f"{', '.join(_valid_names())}")
        if extra:
            if spec.solver is not None and isinstance(spec.solver, KFACSolver):
                raise ValueError("solver_options cannot be combined with a solver instance; "
                                 "configure the instance instead")
            spec = SolverSpec(spec.name, {**extra, **spec.options}, spec.solver)
        return spec

    @property
    def is_rule(self) -> bool:
        return self.solver is None and self.name in RULES

    @property
    def text(self) -> str:
        """The spec as written on the command line (``thermo:bits=8``)."""
        return format_spec(self.name, self.options)

    def factory(self) -> SolverFactory:
        """Per-layer solver factory (validates the options); rules have none."""
        if self.is_rule:
            raise ValueError(f"solver rule {self.name!r} is resolved per layer by a SolverPolicy")
        return solver_factory(self.solver if self.solver is not None else self.name,
                              self.options or None)

    def solver_class(self) -> type[KFACSolver] | None:
        if isinstance(self.solver, KFACSolver):
            return type(self.solver)
        if isinstance(self.solver, type):
            return self.solver
        return registered_solver(self.name)


def _valid_names() -> list[str]:
    return [*available_solvers(), *RULES]


def is_analog(solver: KFACSolver) -> bool:
    """Whether ``solver`` runs on the (simulated) thermodynamic device (:attr:`KFACSolver.analog`)."""
    return solver.analog
