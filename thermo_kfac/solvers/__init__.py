"""Per-layer solvers for K-FAC's damped Kronecker systems (see :mod:`thermo_kfac.solvers.base`)."""

from thermo_kfac.solvers.auto import AutoSolver
from thermo_kfac.solvers.base import (
    Damping,
    KFACSolver,
    SolverFailure,
    SolverReport,
    available_solvers,
    digital_method_of,
    register_solver,
    registered_solver,
    solver_factory,
)
from thermo_kfac.solvers.cg import CGSolver
from thermo_kfac.solvers.digital import CholeskySolver, EighSolver
from thermo_kfac.solvers.kronecker_svd import KroneckerSVDSolver, kronecker_svd
from thermo_kfac.solvers.randomized import (
    RandomizedSVDSolver,
    SymmetricRandomizedEighSolver,
    spectrum_decay,
)
from thermo_kfac.solvers.thermodynamic import ThermodynamicSolver

__all__ = [
    "AutoSolver",
    "CGSolver",
    "CholeskySolver",
    "Damping",
    "EighSolver",
    "KFACSolver",
    "KroneckerSVDSolver",
    "RandomizedSVDSolver",
    "SolverFailure",
    "SolverReport",
    "SymmetricRandomizedEighSolver",
    "ThermodynamicSolver",
    "available_solvers",
    "digital_method_of",
    "kronecker_svd",
    "register_solver",
    "registered_solver",
    "solver_factory",
    "spectrum_decay",
]
