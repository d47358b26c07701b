"""Latency and energy of K-FAC's curvature work on digital and thermodynamic hardware.

Cheap, pure functions of ``(n_in, n_out, batch, kappa, eps, bits, devices)`` that a solver or a
solver policy can call every training step. Every function returns a :class:`Cost`: seconds and
joules *per training step* (periodic work is amortized), with a per-component breakdown.

Digital K-FAC, per layer (factors ``A``: ``n_a = n_in + bias``, ``G``: ``n_g = n_out``; ``R``
positions per example, so ``rows = batch * R`` rows of statistics):

- factor accumulation every ``factor_every`` steps: two GEMMs, ``2 rows n_a^2`` and ``2 rows n_g^2``;
- decomposition every ``inverse_every`` steps: ``eigh`` (or Cholesky, or explicit inverse) of both
  factors, timed by the device's :class:`~hw_models.devices.OpModel`;
- preconditioning every step: ``G^-1 V A^-1``, four GEMMs with eigenvectors, two with inverses or
  Cholesky factors (two triangular solves cost one GEMM).

Thermodynamic K-FAC, per layer: factor accumulation stays digital; the linear algebra moves to the
analog device. Each analog job costs (time in units of tau = RC):

- transfer: ``n(n+1)/2`` couplings at ``dac_bits`` over the link (plus right-hand sides);
- programming: ``n`` rows at ``program_row_s`` each;
- settling (burn-in): ``kappa ln(1/eps)`` tau, the time for ``exp(-A t)`` to shrink the initial
  error ``||x0 - x*|| = ||x*||`` (cold start) by ``eps`` when ``lambda_max(A) = 1``;
- averaging: the error laws of thermo.md 2.1 [D], with ``lambda_max(A) = 1`` so ``A^-1 <= kappa``:

  * solve ``A x = b``: ``E||xbar - x*||^2 = 2 tr(A^-2) / (beta t) <= 2 n kappa^2 kappa0 / t``
    with ``kappa0 = 1/beta`` in units of ``||x*||^2``. Asking for ``eps`` relative error gives
    ``t_avg = 2 kappa0 n kappa^2 / eps^2`` tau (= ``n kappa^2 / eps^2`` tau at kappa0 = 0.5);
  * inverse by sampling ``beta <x x^T>``: the slowest mode decorrelates in ``kappa`` tau, so
    ``N_eff = t / kappa``; a Gaussian sample covariance has relative Frobenius error
    ``sqrt((tr(S)^2 + tr(S^2)) / (N ||S||_F^2)) <= sqrt((n + 1)/N)``, hence
    ``t_avg = (n + 1) kappa / eps^2`` tau, independent of the noise level;
- read-out: results at ``adc_bits`` over the link (or, for a device without on-chip accumulators,
  every covariance sample, one per ``kappa`` tau, plus the host's outer products).

Method ``"inverse"`` (the paper's method 1) inverts ``A`` and ``G`` every ``inverse_every`` steps
and leaves two GEMMs per step on the host. Method ``"solve"`` (method 2) solves
``(G + lam) X = V`` (``n_a`` right-hand sides) then ``(A + lam) Y^T = X^T`` (``n_g`` right-hand
sides) every step: ``O(n^2 kappa^2)`` per layer. Columns and sampling chains spread over the
device's ``units``. Transfers do not overlap analog work, and digital and analog work do not
overlap each other (both conservative).

Systems larger than the device's ``cells`` follow its ``oversize`` policy: ``"refuse"`` raises
:class:`ThermoCapacityError` (the step model then keeps that layer digital), ``"block"`` prices
``ceil(n/cells)`` independent diagonal blocks, a block-diagonal approximation flagged by
``info["approximate"]``.

``info["error_floor"]`` is the first-order error that ``dac_bits``-bit couplings alone cause,
``kappa * ||dA||_2`` with random rounding of step ``2^(1-bits)`` on a ``[-1, 1]`` scale
(``||dA||_2 ~ 2 sqrt(n) * step/sqrt(12)``): targets below it are not reachable by averaging longer.

Modules: :mod:`hw_models.cost.layers` (per-layer digital and thermodynamic costs) and
:mod:`hw_models.cost.steps` (whole training steps, break-even, sweeps); every public name is
importable from ``hw_models.cost``.
"""

from hw_models.cost.layers import (
    ADAM_BYTES_PER_PARAM,
    DIGITAL_METHODS,
    SWEEP_AXES,
    THERMO_METHODS,
    Cost,
    KFACSchedule,
    ThermoCapacityError,
    check_accuracy,
    digital_layer_cost,
    error_floor,
    gemm_time,
    inverse_averaging_time_tau,
    settling_time_tau,
    solve_averaging_time_tau,
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

__all__ = [
    "ADAM_BYTES_PER_PARAM",
    "Cost",
    "DIGITAL_METHODS",
    "KFACSchedule",
    "LayerComparison",
    "SWEEP_AXES",
    "Scenario",
    "StepCost",
    "THERMO_METHODS",
    "ThermoCapacityError",
    "break_even_kappa",
    "check_accuracy",
    "compare_layer",
    "default_sweep_values",
    "digital_layer_cost",
    "error_floor",
    "forward_backward_time",
    "gemm_time",
    "inverse_averaging_time_tau",
    "settling_time_tau",
    "solve_averaging_time_tau",
    "step_cost",
    "sweep",
    "thermo_inverse_cost",
    "thermo_layer_cost",
    "thermo_program_cost",
    "thermo_solve_cost",
]
