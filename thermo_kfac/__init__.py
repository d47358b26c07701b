"""thermo_kfac: K-FAC preconditioning for PyTorch with switchable (digital or analog) solvers."""

from thermo_kfac.adafisher import AdaFisher
from thermo_kfac.eva import Eva
from thermo_kfac.kld_wrm import KLDWRM
from thermo_kfac.optimizer import KFAC
from thermo_kfac.preconditioner import KFACPreconditioner
from thermo_kfac.singd import SINGD
from thermo_kfac.solvers import Damping, KFACSolver, SolverReport, available_solvers, register_solver

__all__ = [
    "AdaFisher",
    "Damping",
    "Eva",
    "KFAC",
    "KFACPreconditioner",
    "KFACSolver",
    "KLDWRM",
    "SINGD",
    "SolverReport",
    "available_solvers",
    "register_solver",
]
__version__ = "0.1.0"
