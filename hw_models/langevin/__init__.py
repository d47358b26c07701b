"""Langevin / Ornstein-Uhlenbeck simulator of an analog thermodynamic processor.

``solve(A, B, config)`` time-averages the device state to estimate ``A^-1 B``;
``inverse(A, config)`` estimates ``A^-1`` from the sample covariance. See ``docs/simulator.md``.
"""

from hw_models.langevin.config import AnalogConfig
from hw_models.langevin.estimators import AnalogResult, ProgrammedMatrix, inverse, program, solve
from hw_models.langevin.laws import inverse_error_law, solve_error_law

__all__ = ["AnalogConfig", "AnalogResult", "ProgrammedMatrix", "inverse", "inverse_error_law",
           "program", "solve", "solve_error_law"]
