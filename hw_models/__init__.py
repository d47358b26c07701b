"""hw_models: physics and cost models of analog thermodynamic and digital linear-algebra hardware.

This package knows nothing about neural networks; ``thermo_kfac`` builds on it.

- :func:`solve` / :func:`inverse` simulate a thermodynamic processor (Langevin dynamics) that
  estimates ``A^-1 B`` / ``A^-1``; :func:`program` programs a matrix once and
  :func:`solve_programmed` reuses it; :class:`AnalogConfig` sets how it runs and
  :class:`NoiseConfig` which hardware non-idealities it has (``hw_models.noise``).
- :mod:`hw_models.devices` (digital and thermodynamic device presets, in the simulator's
  convention), :mod:`hw_models.langevin.error_model` (the finite-time error law),
  :mod:`hw_models.pricing` (the one place that prices an analog job or a digital operation:
  :func:`price`, :func:`price_digital`), :mod:`hw_models.cost` (per K-FAC layer and step),
  :mod:`hw_models.projection` (paper scenario, maps, traces), :mod:`hw_models.workloads`
  (layer-shape tables) and :mod:`hw_models.calibration` (host timing fits) predict what the
  hardware would cost.
"""

from hw_models.cost import (
    Cost,
    break_even_kappa,
    digital_layer_cost,
    step_cost,
    sweep,
    thermo_layer_cost,
)
from hw_models.devices import (
    DIGITAL_PRESETS,
    THERMO_PRESETS,
    DigitalDevice,
    ThermoDevice,
    digital_device,
    thermo_device,
)
from hw_models.langevin import (
    AnalogConfig,
    AnalogResult,
    ProgrammedMatrix,
    inverse,
    inverse_error_law,
    program,
    solve,
    solve_error_law,
    solve_programmed,
)
from hw_models.noise import NoiseConfig
from hw_models.pricing import AnalogJob, Price, SpectrumSummary, price, price_digital
from hw_models.workloads import workload

__version__ = "0.1.0"

__all__ = [
    "DIGITAL_PRESETS",
    "THERMO_PRESETS",
    "AnalogConfig",
    "AnalogJob",
    "AnalogResult",
    "Cost",
    "DigitalDevice",
    "NoiseConfig",
    "ProgrammedMatrix",
    "Price",
    "SpectrumSummary",
    "ThermoDevice",
    "__version__",
    "break_even_kappa",
    "digital_device",
    "digital_layer_cost",
    "inverse",
    "inverse_error_law",
    "program",
    "price",
    "price_digital",
    "solve",
    "solve_error_law",
    "solve_programmed",
    "step_cost",
    "sweep",
    "thermo_device",
    "thermo_layer_cost",
    "workload",
]
