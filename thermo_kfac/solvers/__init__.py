"""Per-layer solvers for K-FAC's damped Kronecker systems (see :mod:`thermo_kfac.solvers.base`)."""

from thermo_kfac.solvers.base import (
    Damping,
    KFACSolver,
    SolverReport,
    available_solvers,
    register_solver,
    solver_factory,
)
from thermo_kfac.solvers.digital import CholeskySolver, EighSolver

__all__ = [
    "CholeskySolver",
    "Damping",
    "EighSolver",
    "KFACSolver",
    "SolverReport",
    "available_solvers",
    "register_solver",
    "solver_factory",
]
