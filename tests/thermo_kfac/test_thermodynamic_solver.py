"""ThermodynamicSolver against independent references: EighSolver and the simulator's error laws."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hw_models as hm
from hw_models.langevin.laws import od_transition
from thermo_kfac import KFACPreconditioner
from thermo_kfac.solvers.base import Damping
from thermo_kfac.solvers.digital import EighSolver
from thermo_kfac.solvers.thermodynamic import ThermodynamicSolver, _scale


def _factors(seed: int = 0, d_in: int = 6, d_out: int = 4):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, d_in, generator=g, dtype=torch.float64)
    gg = torch.randn(64, d_out, generator=g, dtype=torch.float64)
    grad = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return a.T @ a / 64, gg.T @ gg / 64, grad


def _reference(A, G, grad, damping):
    eigh = EighSolver()
    eigh.prepare(A, G, damping)
    return eigh.apply(grad)


def _spectrum(M: torch.Tensor) -> np.ndarray:
    return torch.linalg.eigvalsh(M / _scale(M)).numpy()


def test_solve_matches_eigh_within_error_law():
    A, G, grad = _factors()
    damping = Damping(0.1)
    lam_a, lam_g = damping.split(A, G)
    A_d, G_d = A + lam_a * torch.eye(6, dtype=A.dtype), G + lam_g * torch.eye(4, dtype=G.dtype)
    T, kappa0 = 4000.0, 1e-6
    solver = ThermodynamicSolver(method="solve", analog_time=T, burn_in=500.0, kappa0=kappa0,
                                 integrator="analytic", seed=3)
    solver.prepare(A, G, damping)
    out = solver.apply(grad)
    ref = _reference(A, G, grad, damping)
    # Expected squared error: first solve (per column law, in original units), propagated through
    # (A + lam_A I)^-1, plus the second solve's own error.
    Y = torch.linalg.solve(G_d, grad)
    s1, c_g, c_a = float(grad.norm()), _scale(G_d), _scale(A_d)
    s2 = float(Y.norm())
    mse1 = (s1 / c_g) ** 2 * grad.shape[1] * hm.solve_error_law(_spectrum(G_d), T, kappa0)
    mse2 = (s2 / c_a) ** 2 * grad.shape[0] * hm.solve_error_law(_spectrum(A_d), T, kappa0)
    inv_a_norm = float(torch.linalg.matrix_norm(torch.linalg.inv(A_d), ord=2))
    expected = mse1 * inv_a_norm**2 + mse2
    err2 = float((out - ref).pow(2).sum())
    assert expected > 0 and math.sqrt(expected) < 0.05 * float(ref.norm())  # not vacuous
    assert err2 < 25.0 * expected
    assert solver.last_report.hardware_time_s > 0 and solver.last_report.energy_j > 0
    assert solver.last_report.info["analog_time"] > 0


def test_inverse_matches_eigh_within_error_law():
    A, G, grad = _factors(1)
    damping = Damping(0.1)
    lam_a, lam_g = damping.split(A, G)
    A_d, G_d = A + lam_a * torch.eye(6, dtype=A.dtype), G + lam_g * torch.eye(4, dtype=G.dtype)
    kappa0 = 1e-3
    solver = ThermodynamicSolver(method="inverse", analog_time=3000.0, burn_in=200.0,
                                 kappa0=kappa0, integrator="exact", seed=1)
    solver.prepare(A, G, damping)
    report = solver.last_report
    out = solver.apply(grad)
    ref = _reference(A, G, grad, damping)
    errs = []
    for i, M in enumerate((A_d, G_d)):  # prepare() inverts A first, then G
        lam = _spectrum(M)
        dt, n_samples = report.info["dt"][i], report.info["n_samples_each"][i]
        assert dt == pytest.approx(1.0 / lam.max(), rel=1e-2)  # "auto": ~0.5 x 2/lambda_max
        a, _ = od_transition(lam, dt, kappa0)
        law = hm.inverse_error_law(a, kappa0 / lam, n_samples, kappa0)  # ||P^-1 error||_F^2
        errs.append(math.sqrt(law) / _scale(M))
    err_a, err_g = errs
    G_inv, A_inv = torch.linalg.inv(G_d), torch.linalg.inv(A_d)
    bound = (err_g * float(torch.linalg.matrix_norm(grad @ A_inv, ord=2))
             + err_a * float(torch.linalg.matrix_norm(G_inv @ grad, ord=2)))
    assert bound < 0.3 * float(ref.norm())
    assert float((out - ref).norm()) < 4.0 * bound
    assert report.hardware_time_s > 0


def test_few_bits_worse_than_many():
    A, G, grad = _factors(2)
    damping = Damping(0.1)
    ref = _reference(A, G, grad, damping)
    errors = {}
    for bits in (4, 12):
        solver = ThermodynamicSolver(method="solve", analog_time=2000.0, burn_in=500.0,
                                     kappa0=1e-6, integrator="analytic", bits=bits, seed=0)
        solver.prepare(A, G, damping)
        errors[bits] = float((solver.apply(grad) - ref).norm() / ref.norm())
    assert errors[4] > 3 * errors[12]


def test_state_dict_resume_is_identical():
    A, G, grad = _factors(3)
    damping = Damping(0.1)
    solver = ThermodynamicSolver(method="solve", analog_time=50.0, integrator="analytic", seed=5)
    solver.prepare(A, G, damping)
    solver.apply(grad)
    resumed = ThermodynamicSolver(method="solve", analog_time=50.0, integrator="analytic", seed=5)
    resumed.load_state_dict(copy.deepcopy(solver.state_dict()))
    assert torch.equal(solver.apply(grad), resumed.apply(grad))


def _train_mlp(solver, options, steps=15):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    precond = KFACPreconditioner(model, solver=solver, damping=0.1, inverse_update_every=2,
                                 solver_options=options)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        precond.accumulate_curvature(out)
        loss = F.cross_entropy(out, y)
        loss.backward()
        precond.step()
        opt.step()
        losses.append(loss.item())
    return losses, precond


@pytest.mark.parametrize("options", [
    {"method": "solve", "analog_time": 50, "kappa0": 1e-2, "bits": 8, "integrator": "analytic"},
    {"method": "inverse", "analog_time": 50, "kappa0": 1e-2, "bits": 8, "integrator": "exact"},
])
def test_kfac_training_with_thermo_solver(options):
    losses, precond = _train_mlp("thermo", options)
    digital, _ = _train_mlp("eigh", {})
    assert losses[-1] < 0.9 * losses[0]
    assert abs(losses[-1] - digital[-1]) < 0.05 * digital[-1]
    hw = precond.last_report["hardware_time_s"]  # the last step (14) also re-prepared the factors
    assert isinstance(hw, float) and hw > 0


@pytest.mark.parametrize("options, needle", [
    ({"method": "magic"}, "'magic'"),
    ({"integrator": "rk4"}, "'rk4'"),
    ({"bits": 0}, "bits=0"),
    ({"analog_time": -1.0}, "-1.0"),
    ({"device": "quantum"}, "'quantum'"),
    ({"backend": "jax"}, "'jax'"),
    ({"method": "inverse", "kappa0": 0.0}, "kappa0=0.0"),
    ({"colour": 3}, "'colour'"),
])
def test_bad_options_raise(options, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        ThermodynamicSolver(**options)


def test_bad_option_via_preconditioner():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="'magic'"):
        KFACPreconditioner(model, solver="thermo", solver_options={"method": "magic"})
