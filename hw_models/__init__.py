"""hw_models: physics and cost models of analog thermodynamic and digital linear-algebra hardware.

This package knows nothing about neural networks; ``thermo_kfac`` builds on it.
"""

__version__ = "0.1.0"
