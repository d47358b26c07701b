"""Public API of the simulator: shapes, array kinds, determinism, configuration and errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import hw_models as hm

from .conftest import spd

FAST = {"analog_time": 5.0, "burn_in": 1.0, "kappa0": 0.05}
INTEGRATORS = ["euler", "exact", "analytic"]


def test_public_api_exports():
    for name in ("AnalogConfig", "NoiseConfig", "AnalogResult", "solve", "inverse", "__version__"):
        assert hasattr(hm, name)
    res = hm.solve(np.eye(2), np.ones(2), hm.AnalogConfig(**FAST, seed=0))
    assert isinstance(res, hm.AnalogResult)
    assert {"x", "analog_time", "n_samples", "diagnostics"} <= set(vars(res))


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("integrator", INTEGRATORS)
def test_shapes_for_every_rhs_layout(problem5, integrator, backend):
    A, b, _ = problem5
    cfg = hm.AnalogConfig(**FAST, integrator=integrator, backend=backend, seed=0)
    Ab = np.stack([A, 2 * A, A + np.eye(5)])
    cases = [(A, b, (5,)), (A, np.ones((5, 3)), (5, 3)), (Ab, np.ones((3, 5)), (3, 5)),
             (Ab, np.ones((3, 5, 2)), (3, 5, 2))]
    for AA, BB, shape in cases:
        res = hm.solve(AA, BB, cfg)
        assert isinstance(res.x, np.ndarray) and res.x.shape == shape
    inv = hm.inverse(Ab, cfg)
    assert inv.x.shape == (3, 5, 5)
    np.testing.assert_allclose(inv.x, np.swapaxes(inv.x, 1, 2), rtol=1e-12, atol=1e-12)


def test_batched_systems_are_solved_independently(problem5):
    A, b, _ = problem5
    Ab = np.stack([A, 3 * A])
    Bb = np.stack([b, b])
    cfg = hm.AnalogConfig(analog_time=2000.0, burn_in=30.0, kappa0=1e-4, integrator="exact",
                          seed=1)
    res = hm.solve(Ab, Bb, cfg)
    x = np.linalg.solve(A, b)
    np.testing.assert_allclose(res.x[0], x, atol=5e-3)
    np.testing.assert_allclose(res.x[1], x / 3, atol=5e-3)
    lam = np.linalg.eigvalsh(A)
    np.testing.assert_allclose(res.diagnostics["lambda_min"], [lam[0], 3 * lam[0]])


def test_numpy_in_numpy_out_torch_in_torch_out(problem5):
    A, b, _ = problem5
    cfg = hm.AnalogConfig(**FAST, seed=0)
    r_np = hm.solve(A, b, cfg)
    assert isinstance(r_np.x, np.ndarray) and r_np.x.dtype == np.float64
    r_t = hm.solve(torch.as_tensor(A), torch.as_tensor(b), cfg)
    assert isinstance(r_t.x, torch.Tensor) and r_t.x.dtype == torch.float64
    np.testing.assert_array_equal(r_t.x.numpy(), r_np.x)  # same seed, same backend
    r32 = hm.solve(torch.as_tensor(A, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                   cfg)
    assert r32.x.dtype == torch.float32 and r32.diagnostics["dtype"] == "float32"
    r_np32 = hm.solve(A.astype(np.float32), b.astype(np.float32), cfg.replace(backend="numba"))
    assert r_np32.x.dtype == np.float32
    r64 = hm.solve(A.astype(np.float32), b.astype(np.float32), cfg.replace(dtype="float64"))
    assert r64.x.dtype == np.float64
    inv = hm.inverse(torch.as_tensor(A), cfg)
    assert isinstance(inv.x, torch.Tensor) and inv.x.shape == (5, 5)


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("integrator", INTEGRATORS)
def test_same_seed_same_result_different_seed_different(problem5, integrator, backend):
    A, b, _ = problem5
    cfg = hm.AnalogConfig(**FAST, integrator=integrator, backend=backend, seed=42)
    B = np.repeat(b[:, None], 3, axis=1)
    np.testing.assert_array_equal(hm.solve(A, B, cfg).x, hm.solve(A, B, cfg).x)
    assert not np.array_equal(hm.solve(A, B, cfg).x, hm.solve(A, B, cfg.replace(seed=43)).x)
    np.testing.assert_array_equal(hm.inverse(A, cfg).x, hm.inverse(A, cfg).x)


def test_unseeded_runs_report_their_seed(problem5):
    A, b, _ = problem5
    cfg = hm.AnalogConfig(**FAST)
    r1, r2 = hm.solve(A, b, cfg), hm.solve(A, b, cfg)
    assert r1.diagnostics["seed"] != r2.diagnostics["seed"]
    again = hm.solve(A, b, cfg.replace(seed=r1.diagnostics["seed"]))
    np.testing.assert_array_equal(again.x, r1.x)


def test_time_accounting(problem5):
    A, b, _ = problem5
    res = hm.solve(A, b, hm.AnalogConfig(analog_time=10.0, burn_in=2.0, dt=0.1, seed=0))
    assert res.n_samples == 100 and res.diagnostics["n_steps"] == 120
    assert res.analog_time == pytest.approx(12.0)
    auto = hm.solve(A, b, hm.AnalogConfig(analog_time=10.0, burn_in=2.0, seed=0))
    lam_max = np.linalg.eigvalsh(A)[-1]
    assert auto.diagnostics["dt"] <= 0.2 / lam_max + 1e-12  # auto: 0.1 x the 2/lambda_max bound
    assert auto.diagnostics["averaging_time"] == pytest.approx(10.0)
    ana = hm.solve(A, b, hm.AnalogConfig(analog_time=10.0, burn_in=2.0, integrator="analytic"))
    assert ana.n_samples == 0 and ana.analog_time == pytest.approx(12.0)
    assert ana.diagnostics["dt"] is None


def test_warm_start_removes_the_burn_in_bias(problem5):
    A, b, _ = problem5
    xstar = np.linalg.solve(A, b)
    m = 500
    B = np.repeat(b[:, None], m, axis=1)
    cfg = hm.AnalogConfig(analog_time=2.0, burn_in=0.0, kappa0=0.01, integrator="analytic", seed=3)
    cold = hm.solve(A, B, cfg).x.mean(axis=1)
    warm = hm.solve(A, B, cfg, x0=np.repeat(xstar[:, None], m, axis=1)).x.mean(axis=1)
    # started at the solution the time average is unbiased: error ~ sqrt(var/m) ~ 0.01
    assert np.linalg.norm(warm - xstar) < 0.05
    assert np.linalg.norm(cold - xstar) > 0.2


@pytest.mark.parametrize("integrator", ["euler", "analytic"])
def test_target_error_sets_the_window(problem5, integrator):
    A, b, lam = problem5
    xstar = np.linalg.solve(A, b)
    m, eps = 400, 0.05
    cfg = hm.AnalogConfig(analog_time=None, target_error=eps, burn_in=40.0, kappa0=0.05,
                          integrator=integrator, seed=5)
    res = hm.solve(A, np.repeat(b[:, None], m, axis=1), cfg)
    T = res.diagnostics["averaging_time"]
    assert T == pytest.approx(2 * 0.05 * np.sum(lam**-2.0) / (eps**2 * xstar @ xstar), rel=1e-3)
    rel = np.sqrt(np.mean(np.sum((res.x - xstar[:, None]) ** 2, axis=0))) / np.linalg.norm(xstar)
    assert rel == pytest.approx(eps, rel=0.2)
    assert res.diagnostics["target_met"]
    capped = hm.solve(A, b, cfg.replace(analog_time=1.0))
    assert not capped.diagnostics["target_met"] and capped.diagnostics["averaging_time"] <= 1.0 + 1e-9


def test_target_error_for_inverse(problem5):
    A, _, _ = problem5
    k, eps = 24, 0.1
    cfg = hm.AnalogConfig(analog_time=None, target_error=eps, burn_in=30.0, kappa0=0.1,
                          integrator="exact", seed=6)
    res = hm.inverse(np.repeat(A[None], k, axis=0), cfg)
    Ainv = np.linalg.inv(A)
    rel = np.sqrt(np.mean(np.sum((res.x - Ainv) ** 2, axis=(1, 2)))) / np.linalg.norm(Ainv)
    assert rel == pytest.approx(eps, rel=0.25)


# ---------------------------------------------------------------------------------------------
# bad input


def _err(match):
    return pytest.raises(ValueError, match=re.escape(match))


def test_bad_shapes():
    with _err("A has shape (3, 4)"):
        hm.solve(np.ones((3, 4)), np.ones(3))
    with _err("A has shape (3,)"):
        hm.solve(np.ones(3), np.ones(3))
    with _err("B has shape (4,), which does not match A of shape (3, 3)"):
        hm.solve(np.eye(3), np.ones(4))
    with _err("B has shape (2, 3)"):
        hm.solve(np.stack([np.eye(3)] * 3), np.ones((2, 3)))
    with _err("x0 has shape (3,); it must have shape (3, 2)"):
        hm.solve(np.eye(3), np.ones((3, 2)), x0=np.zeros(3))
    with _err("A has shape (0, 0)"):
        hm.solve(np.zeros((0, 0)), np.zeros(0))
    with _err("mix numpy arrays and torch tensors"):
        hm.solve(np.eye(2), torch.ones(2))
    with _err("complex"):
        hm.solve(np.eye(2, dtype=complex), np.ones(2))


def test_bad_values():
    with _err("A contains 1 NaN/Inf value(s)"):
        hm.solve(np.array([[1.0, 0], [0, np.inf]]), np.ones(2))
    with _err("A contains 2 NaN/Inf value(s)"):
        hm.inverse(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with _err("B contains 1 NaN/Inf"):
        hm.solve(np.eye(2), np.array([1.0, np.nan]))


def test_not_positive_definite_reports_lambda_min():
    A = np.diag([2.0, -0.5, 1.0])
    with _err("A is not positive definite: lambda_min = -0.5"):
        hm.solve(A, np.ones(3), hm.AnalogConfig(integrator="exact"))
    with _err("lambda_min = -0.5 (system 1)"):
        hm.inverse(np.stack([np.eye(3), A]))


def test_non_symmetric_where_symmetry_is_required():
    A = np.array([[2.0, 0.5], [0.0, 2.0]])
    for cfg in [hm.AnalogConfig(integrator="exact"), hm.AnalogConfig(integrator="analytic"),
                hm.AnalogConfig(dynamics="underdamped")]:
        with _err("A must be symmetric for"):
            hm.solve(A, np.ones(2), cfg)
    with _err("max|A - A^T| = 0.5"):
        hm.inverse(A)
    unstable = np.array([[-1.0, 3.0], [-3.0, 0.5]])  # eigenvalues -0.25 +- 2.99i
    with _err("A has an eigenvalue with real part -0.25 <= 0"):
        hm.solve(unstable, np.ones(2))


def test_unstable_dt_names_the_bound(problem5):
    A, b, _ = problem5
    lam_max = np.linalg.eigvalsh(A)[-1]
    with _err(f"dt=0.7 is unstable for Euler-Maruyama: it must be < 2/lambda_max = "
              f"{2 / lam_max:.4g} (lambda_max = {lam_max:.4g})"):
        hm.solve(A, b, hm.AnalogConfig(dt=0.7))
    bound = 4 / (1 + np.sqrt(1 + 4 * lam_max))  # underdamped, mass = friction = 1
    with _err(f"dt=0.9 is unstable for Euler-Maruyama: it must be < 4M/(gamma + sqrt(gamma^2 + "
              f"4 lambda_max M)) = {bound:.4g}"):
        hm.inverse(A, hm.AnalogConfig(dt=0.9, dynamics="underdamped"))
    hm.solve(A, b, hm.AnalogConfig(dt=0.7, integrator="exact", **FAST))  # exact: any step


@pytest.mark.parametrize("kwargs,match", [
    ({"analog_time": 0.0}, "analog_time=0.0 is out of range"),
    ({"analog_time": -1.0}, "analog_time=-1.0"),
    ({"analog_time": None}, "analog_time=None is only allowed with target_error"),
    ({"burn_in": -0.1}, "burn_in=-0.1"),
    ({"dt": 0.0}, "dt=0.0"),
    ({"dt": "fast"}, "dt='fast' is not valid; choose one of: 'auto'"),
    ({"kappa0": -1.0}, "kappa0=-1.0"),
    ({"integrator": "rk4"}, "integrator='rk4' is not valid; choose one of: 'euler', 'exact'"),
    ({"dynamics": "inertial"}, "dynamics='inertial'"),
    ({"backend": "jax"}, "backend='jax'"),
    ({"dtype": "float16"}, "dtype='float16' is not valid"),
    ({"mass": 0.0}, "mass=0.0"),
    ({"friction": -1.0}, "friction=-1.0"),
    ({"target_error": 0.0}, "target_error=0.0"),
    ({"seed": -3}, "seed=-3"),
    ({"noise": {"coupling_bits": 4}}, "must be a hw_models.NoiseConfig"),
    ({"device": "tpu"}, "device='tpu'"),
])
def test_config_validation(kwargs, match):
    with _err(match):
        hm.AnalogConfig(**kwargs)


def test_cuda_and_numba_combinations_are_rejected():
    if not torch.cuda.is_available():
        with _err("needs CUDA"):
            hm.AnalogConfig(device="cuda")
    else:
        with _err("backend='numba' runs on the CPU only"):
            hm.AnalogConfig(device="cuda", backend="numba")


def test_inverse_needs_positive_kappa0():
    with _err("kappa0=0.0 must be > 0 for inverse"):
        hm.inverse(np.eye(2), hm.AnalogConfig(kappa0=0.0))
    # a noiseless device still solves (deterministic gradient flow)
    res = hm.solve(np.eye(2) * 2, np.ones(2), hm.AnalogConfig(kappa0=0.0, analog_time=200.0,
                                                             burn_in=20.0))
    np.testing.assert_allclose(res.x, 0.5, rtol=1e-2)


def test_bits_below_two_rejected_in_solve():
    with _err("coupling_bits=1 is out of range"):
        hm.solve(np.eye(2), np.ones(2), hm.AnalogConfig(noise=hm.NoiseConfig(coupling_bits=1)))


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("integrator", INTEGRATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_runs_reproduces_and_agrees_with_cpu(integrator, dtype):
    A = torch.as_tensor(spd([0.5, 1.0, 2.0, 3.0], seed=1), dtype=dtype)
    b = torch.ones(4, dtype=dtype)
    m = 4000
    B = b[:, None].repeat(1, m)
    cfg = hm.AnalogConfig(analog_time=20.0, burn_in=20.0, kappa0=0.05, integrator=integrator,
                          seed=1)
    gpu = hm.solve(A.cuda(), B.cuda(), cfg)
    assert gpu.x.is_cuda and gpu.x.dtype == dtype
    torch.testing.assert_close(gpu.x, hm.solve(A.cuda(), B.cuda(), cfg).x, rtol=0, atol=0)
    cpu = hm.solve(A, B, cfg.replace(seed=2)).x
    g = gpu.x.cpu().double()
    diff = g.mean(dim=1) - cpu.double().mean(dim=1)
    se = torch.sqrt((g.var(dim=1) + cpu.double().var(dim=1)) / m)
    assert (diff.abs() / se).max() < 4.5
    inv = hm.inverse(A.cuda(), cfg.replace(analog_time=200.0))
    assert inv.x.is_cuda
    on_cuda = hm.solve(A, B, cfg.replace(device="cuda"))
    assert not on_cuda.x.is_cuda and on_cuda.diagnostics["device"].startswith("cuda")
