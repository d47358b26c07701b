"""Langevin / Ornstein-Uhlenbeck simulator of an analog thermodynamic processor.

``solve(A, B, config)`` time-averages the device state to estimate ``A^-1 B``;
``inverse(A, config)`` estimates ``A^-1`` from the sample covariance; ``program(A, config)``
programs a matrix once and ``solve_programmed(prog, B, config)`` reuses it. See
``docs/simulator.md`` (it has the module map).
"""

from hw_models.langevin.config import AnalogConfig
from hw_models.langevin.estimators import AnalogResult, inverse, solve, solve_programmed
from hw_models.langevin.laws import inverse_error_law, solve_error_law
from hw_models.langevin.programmed import ProgrammedMatrix, program

__all__ = ["AnalogConfig", "AnalogResult", "ProgrammedMatrix", "inverse", "inverse_error_law",
           "program", "solve", "solve_error_law", "solve_programmed"]
