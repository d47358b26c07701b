"""hw_models: physics and cost models of analog thermodynamic and digital linear-algebra hardware.

This package knows nothing about neural networks; ``thermo_kfac`` builds on it.

- :func:`solve` / :func:`inverse` simulate a thermodynamic processor (Langevin dynamics) that
  estimates ``A^-1 B`` / ``A^-1``; :class:`AnalogConfig` sets how it runs and
  :class:`NoiseConfig` which hardware non-idealities it has (``hw_models.noise``).
"""

from hw_models.langevin import (
    AnalogConfig,
    AnalogResult,
    inverse,
    inverse_error_law,
    solve,
    solve_error_law,
)
from hw_models.noise import NoiseConfig

__version__ = "0.1.0"

__all__ = [
    "AnalogConfig",
    "AnalogResult",
    "NoiseConfig",
    "__version__",
    "inverse",
    "inverse_error_law",
    "solve",
    "solve_error_law",
]
