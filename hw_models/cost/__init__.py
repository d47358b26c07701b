"""K-FAC's curvature work per layer and per training step on digital and thermodynamic hardware.

The step model: pure functions of ``(n_in, n_out, batch, spectra or kappa, eps or window, devices)``
returning a :class:`~hw_models.pricing.Cost` (seconds and joules *per training step*; periodic work
amortized) with a per-component breakdown. Every analog job and digital decomposition inside is
priced by :mod:`hw_models.pricing` (the one implementation); this module only composes them.

Digital K-FAC, per layer (factors ``A``: ``n_a = n_in + bias``, ``G``: ``n_g = n_out``; ``R``
positions per example, so ``rows = batch * R`` rows of statistics):

- factor accumulation every ``factor_every`` steps: two GEMMs, ``2 rows n_a^2`` and ``2 rows n_g^2``;
- decomposition every ``inverse_every`` steps: ``eigh`` (or Cholesky, or explicit inverse) of both
  factors;
- preconditioning every step: ``G^-1 V A^-1``, four GEMMs with eigenvectors, two with inverses or
  Cholesky factors.

Thermodynamic K-FAC, per layer: factor accumulation stays digital. Method ``"inverse"`` (the seed
paper's method 1) inverts both damped factors by sampling every ``inverse_every`` steps and leaves
two host GEMMs per step; method ``"solve"`` (method 2) solves ``(G + lam) X = V`` (``n_a`` columns)
then ``(A + lam) Y^T = X^T`` (``n_g`` columns) every step. Each analog job's time and accuracy come
from :func:`hw_models.pricing.price`: the window for the target ``eps`` (or a fixed window, with the
accuracy reported) from the finite-time error law of :mod:`hw_models.langevin.error_model`, for
the layer's factor spectra (measured :class:`~hw_models.pricing.SpectrumSummary`, or the geometric
model at the scenario's ``kappa``).

Breakdown components on the analog side are ``transfer``, ``programming``, ``burn_in``,
``averaging`` and ``readout`` (:data:`ANALOG_COMPONENTS`); ``factor_accumulation`` and
``preconditioning`` run on the host. Systems larger than the device follow the oversize rule of
:func:`hw_models.pricing.fit_blocks`.

Modules: :mod:`hw_models.cost.layers` (per-layer digital and thermodynamic costs) and
:mod:`hw_models.cost.steps` (whole training steps, break-even, sweeps),
:mod:`hw_models.cost.distributed` (data-parallel step: all-reduce model, dynamic tensor fusion,
statistics reduced during the backward pass); every public name is importable from ``hw_models.cost``.
"""

from hw_models.cost.distributed import (
    NETWORKS,
    DistributedStep,
    Network,
    backward_timeline,
    distributed_step,
    fixed_buckets,
    fusion_plan,
    network,
    pipeline,
)
from hw_models.cost.layers import (
    ADAM_BYTES_PER_PARAM,
    ANALOG_COMPONENTS,
    DIGITAL_METHODS,
    SWEEP_AXES,
    THERMO_METHODS,
    KFACSchedule,
    check_accuracy,
    digital_layer_cost,
    error_floor,
    thermo_inverse_cost,
    thermo_layer_cost,
    thermo_program_cost,
    thermo_solve_cost,
)
from hw_models.cost.steps import (
    LayerComparison,
    Scenario,
    StepCost,
    break_even_kappa,
    compare_layer,
    default_sweep_values,
    forward_backward_time,
    step_cost,
    sweep,
)
from hw_models.pricing import Cost, Price, ThermoCapacityError, gemm_time

__all__ = [
    "ADAM_BYTES_PER_PARAM",
    "ANALOG_COMPONENTS",
    "Cost",
    "DIGITAL_METHODS",
    "KFACSchedule",
    "DistributedStep",
    "LayerComparison",
    "NETWORKS",
    "Network",
    "Price",
    "SWEEP_AXES",
    "Scenario",
    "StepCost",
    "THERMO_METHODS",
    "ThermoCapacityError",
    "backward_timeline",
    "break_even_kappa",
    "check_accuracy",
    "compare_layer",
    "default_sweep_values",
    "digital_layer_cost",
    "distributed_step",
    "error_floor",
    "fixed_buckets",
    "forward_backward_time",
    "fusion_plan",
    "gemm_time",
    "network",
    "pipeline",
    "step_cost",
    "sweep",
    "thermo_inverse_cost",
    "thermo_layer_cost",
    "thermo_program_cost",
    "thermo_solve_cost",
]
