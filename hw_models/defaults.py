"""The defaults every pricing caller shares, stated once: the thermodynamic and digital presets,
the nominal condition number of a damped K-FAC factor, and the target relative error of an
analog solve (the policy, placement, the step model, the solvers and the command line read them)."""

from __future__ import annotations

__all__ = ["DEFAULT_DIGITAL", "DEFAULT_EPS", "DEFAULT_KAPPA", "DEFAULT_THERMO"]

DEFAULT_THERMO = "chip"
DEFAULT_DIGITAL = "h100"
DEFAULT_KAPPA = 100.0
DEFAULT_EPS = 0.1
