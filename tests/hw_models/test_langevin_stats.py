"""Statistical tests of the simulator against the closed-form laws (fixed seeds).

Tolerances come from the laws themselves: with ``m`` independent columns (iid estimates), a
per-mode sample mean has standard error ``sqrt(var / m)`` and a sample variance has relative
standard error ``sqrt(2 / (m - 1))``; we allow 4-4.5 standard errors (or chi-square quantiles at
1e-4) so a correct simulator fails with probability below ~1e-3 over the whole file, while
errors of a few standard errors are caught. The closed forms are checked independently (by
quadrature and brute-force sums) in ``test_langevin_laws.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import hw_models as hm
from hw_models.langevin import laws

from .conftest import spd

BACKENDS = ["torch", "numba"]


def _eig(A):
    lam, Q = np.linalg.eigh(A)
    return lam, Q


def _columns(A, b, m, config, x0=None):
    B = np.repeat(b[:, None], m, axis=1)
    X0 = None if x0 is None else np.repeat(x0[:, None], m, axis=1)
    return hm.solve(A, B, config, x0=X0)


def _law(result, lam, kappa0, u0):
    """Per-mode (mean, variance) of the estimator the result used, from the closed forms."""
    d = result.diagnostics
    if d["integrator"] == "analytic":
        w, var = laws.od_time_average(lam, d["burn_in"], d["averaging_time"], kappa0)
    else:
        dt, n = d["dt"], result.n_samples
        n_burn = d["n_steps"] - n
        if d["integrator"] == "euler":
            a, s = laws.euler_ar(lam, dt, kappa0)
            ab = a**n_burn
        else:
            a, s = np.exp(-lam * dt), kappa0 / lam
            ab = np.exp(-lam * n_burn * dt)
        w, var = laws.discrete_average(a, s, ab, n)
    return w * u0, var


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("integrator", ["euler", "exact", "analytic"])
def test_time_average_mean_and_variance(problem5, integrator, backend):
    A, b, lam = problem5
    kappa0, m = 0.05, 3000
    cfg = hm.AnalogConfig(analog_time=20.0, burn_in=4.0, kappa0=kappa0, integrator=integrator,
                          backend=backend, seed=11)
    res = _columns(A, b, m, cfg)
    lam_t, Q = _eig(A)
    xstar = np.linalg.solve(A, b)
    U = Q.T @ (res.x - xstar[:, None])  # eigenbasis errors, one column per estimate
    mean_law, var_law = _law(res, lam_t, kappa0, Q.T @ (0 - xstar))
    # mean: chi-square over the 5 independent modes
    z2 = np.sum((U.mean(axis=1) - mean_law) ** 2 / (var_law / m))
    assert z2 < stats.chi2.ppf(1 - 1e-4, df=5)
    # the burn-in is short here (lambda_min t0 = 2), so the bias is visible and predicted
    assert np.abs(mean_law).max() > 10 * np.sqrt(var_law.max() / m)
    ratio = U.var(axis=1, ddof=1) / var_law
    np.testing.assert_array_less(np.abs(ratio - 1), 4.5 * np.sqrt(2 / (m - 1)))
    assert res.diagnostics["predicted_mse"] == pytest.approx(m * var_law.sum(), rel=1e-9)


@pytest.mark.parametrize("integrator,backend", [("euler", "torch"), ("exact", "numba"),
                                                ("analytic", "torch")])
def test_mse_follows_error_law_over_time(problem5, integrator, backend):
    """E||xbar - x*||^2 = 2 kappa0 tr(A^-2) / T within 20%, and the exact law within 4 sigma."""
    A, b, lam = problem5
    kappa0, m = 0.02, 2000
    lam_t, Q = _eig(A)
    xstar = np.linalg.solve(A, b)
    for i, T in enumerate([25.0, 100.0, 400.0]):
        cfg = hm.AnalogConfig(analog_time=T, burn_in=30.0, kappa0=kappa0, integrator=integrator,
                              backend=backend, seed=100 + i)
        res = _columns(A, b, m, cfg)
        err2 = np.sum((res.x - xstar[:, None]) ** 2, axis=0)
        mse = err2.mean()
        law = hm.solve_error_law(lam, T, kappa0)
        mean_law, var_law = _law(res, lam_t, kappa0, Q.T @ (0 - xstar))
        exact = var_law.sum() + np.sum(mean_law**2)
        sigma = np.sqrt(2 * np.sum(var_law**2) / m)  # sd of the mean of m weighted chi-squares
        assert abs(mse / law - 1) < 0.2
        assert abs(mse - exact) < 4 * sigma
        assert res.diagnostics["error_law_mse"] == pytest.approx(m * law, rel=1e-9)  # all m columns


def test_burn_in_bias_decays_like_exp_lambda_min(problem5):
    A, b, lam = problem5
    lam_t, Q = _eig(A)
    xstar = np.linalg.solve(A, b)
    v_min = Q[:, 0]
    x0 = xstar + 5.0 * v_min  # warm start displaced along the slowest mode only
    kappa0, m, dt = 0.01, 1000, 0.02
    burns = np.array([0.0, 2.0, 4.0, 6.0, 8.0])
    proj = []
    for i, t0 in enumerate(burns):
        cfg = hm.AnalogConfig(analog_time=1.0, burn_in=float(t0), dt=dt, kappa0=kappa0,
                              integrator="euler", seed=200 + i)
        res = _columns(A, b, m, cfg, x0=x0)
        p = v_min @ (res.x - xstar[:, None])
        mean_law, var_law = _law(res, lam_t, kappa0, Q.T @ (x0 - xstar))
        assert abs(p.mean() - mean_law[0]) < 4 * np.sqrt(var_law[0] / m)
        proj.append(p.mean())
    slope = np.polyfit(burns, np.log(proj), 1)[0]
    rate = -np.log(1 - lam_t[0] * dt) / dt  # Euler's per-step contraction, = lambda_min (1 + 0.5%)
    assert slope == pytest.approx(-rate, rel=0.03)
    assert slope == pytest.approx(-lam_t[0], rel=0.03)


def test_integrators_agree_in_distribution(problem5):
    """Euler (small dt), exact and analytic: two-sample KS per eigenmode."""
    A, b, _ = problem5
    lam_t, Q = _eig(A)
    xstar = np.linalg.solve(A, b)
    m = 3000
    samples = {}
    for i, integrator in enumerate(["euler", "exact", "analytic"]):
        cfg = hm.AnalogConfig(analog_time=10.0, burn_in=10.0, dt=0.01, kappa0=0.05,
                              integrator=integrator, seed=300 + i)
        samples[integrator] = Q.T @ (_columns(A, b, m, cfg).x - xstar[:, None])
    for a, c in [("euler", "exact"), ("euler", "analytic"), ("exact", "analytic")]:
        for mode in range(5):
            p = stats.ks_2samp(samples[a][mode], samples[c][mode]).pvalue
            assert p > 1e-4, (a, c, mode, p)


def _inverse_entry_variances(a, s, n, kappa0):
    """Variance of each entry of the eigenbasis error of C_hat / kappa0 (Gaussian samples)."""
    W = np.outer(s, s) * laws.ar_mean_factor(np.outer(a, a), n) / kappa0**2
    W[np.diag_indices_from(W)] *= 2.0
    return W


@pytest.mark.parametrize("integrator,backend", [("exact", "torch"), ("analytic", "numba"),
                                                ("euler", "torch"), ("euler", "numba")])
def test_inverse_estimates_kappa0_inverse(problem5, integrator, backend):
    A, _, lam = problem5
    k, kappa0 = 48, 0.3
    dt = 0.02 if integrator == "euler" else "auto"
    cfg = hm.AnalogConfig(analog_time=300.0, burn_in=20.0, dt=dt, kappa0=kappa0,
                          integrator=integrator, backend=backend, seed=17)
    res = hm.inverse(np.repeat(A[None], k, axis=0), cfg)
    assert res.x.shape == (k, 5, 5)
    lam_t, Q = _eig(A)
    n = res.n_samples
    if integrator == "euler":
        a, s = laws.euler_ar(lam_t, res.diagnostics["dt"], kappa0)
    else:
        a, s = np.exp(-lam_t * res.diagnostics["dt"]), kappa0 / lam_t
    target = Q @ np.diag(s / kappa0) @ Q.T  # the chain's stationary covariance / kappa0
    W = _inverse_entry_variances(a, s, n, kappa0)
    pred = W.sum()
    assert np.mean(res.diagnostics["predicted_mse"]) == pytest.approx(pred, rel=1e-9)
    err = np.einsum("ij,kjl,lm->kim", Q.T, res.x - target, Q)  # eigenbasis errors
    mse = np.mean(np.sum(err**2, axis=(1, 2)))
    # Var of ||E||_F^2: diagonal entries 2 w^2, each off-diagonal pair (counted twice) 8 w^2
    iu = np.triu_indices(5, 1)
    var_f = 2 * np.sum(np.diag(W) ** 2) + 8 * np.sum(W[iu] ** 2)
    assert abs(mse - pred) < 4 * np.sqrt(var_f / k)
    # and the average over systems converges to the target (no bias beyond the law)
    mean_err = np.sum(np.mean(err, axis=0) ** 2)
    dof = pred**2 / (np.sum(np.diag(W) ** 2) + 2 * np.sum(W[iu] ** 2))
    assert mean_err < pred / k * stats.chi2.ppf(1 - 1e-4, dof) / dof
    if integrator == "euler":
        # Euler's stationary covariance is kappa0 A^-1 up to its O(dt) bias, as predicted
        bias = np.linalg.norm(target - np.linalg.inv(A))
        assert bias == pytest.approx(np.mean(res.diagnostics["discretization_bias"]), rel=1e-9)
        assert bias < 0.02 * np.linalg.norm(np.linalg.inv(A))


@pytest.mark.parametrize("integrator", ["euler", "exact", "analytic"])
def test_underdamped_mse_follows_friction_law(problem5, integrator):
    """Underdamped: E||xbar - x*||^2 -> 2 gamma kappa0 tr(A^-2) / T."""
    A, b, lam = problem5
    kappa0, m, friction, T = 0.02, 2000, 2.0, 200.0
    cfg = hm.AnalogConfig(analog_time=T, burn_in=30.0, kappa0=kappa0, integrator=integrator,
                          dynamics="underdamped", friction=friction, mass=1.0, seed=400)
    res = _columns(A, b, m, cfg)
    xstar = np.linalg.solve(A, b)
    mse = np.mean(np.sum((res.x - xstar[:, None]) ** 2, axis=0))
    law = hm.solve_error_law(lam, T, kappa0, friction=friction)
    assert abs(mse / law - 1) < 0.2
    if integrator == "analytic":
        _, var = laws.ud_time_average(np.sort(lam), 30.0, T, kappa0, 1.0, friction)
        assert abs(mse - var.sum()) < 4 * np.sqrt(2 * np.sum(var**2) / m)


def test_underdamped_inverse_estimates_kappa0_inverse(problem5):
    A, _, _ = problem5
    k = 32
    cfg = hm.AnalogConfig(analog_time=400.0, burn_in=30.0, kappa0=0.2, integrator="exact",
                          dynamics="underdamped", friction=1.5, mass=0.7, seed=5)
    res = hm.inverse(np.repeat(A[None], k, axis=0), cfg)
    target = np.linalg.inv(A)
    mean = res.x.mean(axis=0)
    se = res.x.std(axis=0, ddof=1) / np.sqrt(k)
    # per-entry t statistics with k - 1 dof; 15 distinct entries
    t = np.abs(mean - target)[np.triu_indices(5)] / se[np.triu_indices(5)]
    assert t.max() < stats.t.ppf(1 - 1e-4, df=k - 1)


def test_quantized_couplings_converge_to_quantized_solution(problem5):
    A, b, _ = problem5
    bits = 4
    step = np.abs(A).max() / (2 ** (bits - 1) - 1)
    A_q = np.round(A / step) * step  # the programmed matrix, computed independently
    x_q = np.linalg.solve(A_q, b)
    xstar = np.linalg.solve(A, b)
    kappa0, m = 0.01, 400
    for integrator in ["euler", "analytic"]:
        cfg = hm.AnalogConfig(analog_time=200.0, burn_in=40.0, kappa0=kappa0,
                              integrator=integrator, seed=9,
                              noise=hm.NoiseConfig(coupling_bits=bits))
        res = _columns(A, b, m, cfg)
        lam_q, Q_q = np.linalg.eigh(A_q)
        _, var = laws.od_time_average(lam_q, 40.0, 200.0, kappa0)
        dev = Q_q.T @ (res.x.mean(axis=1) - x_q)
        assert np.sum(dev**2 / (var / m)) < stats.chi2.ppf(1 - 1e-4, df=5)
        assert np.linalg.norm(x_q - xstar) > 20 * np.sqrt(var.sum() / m)
        assert res.diagnostics["systematic_error"] == pytest.approx(
            np.linalg.norm(x_q - xstar) / np.linalg.norm(xstar), rel=1e-6)


def test_rounding_ensemble_reduces_error():
    """Averaging independently (stochastically) rounded copies cuts the systematic error.

    With unbiased rounding the first-order error of each copy is zero-mean, so the error of a
    c-copy average is about sqrt(e1^2 / c + e2^2) with e2 = O(eps^2): 16 copies should cut the
    RMS error about 4x while the thermal error stays negligible (kappa0 = 1e-6).
    """
    n = 16
    A = spd(np.linspace(0.3, 3.0, n), seed=4)
    b = np.random.default_rng(5).standard_normal(n)
    xstar = np.linalg.solve(A, b)
    errs = {1: [], 16: []}
    for seed in range(12):
        for copies in errs:
            cfg = hm.AnalogConfig(analog_time=1000.0, burn_in=100.0, kappa0=1e-6,
                                  integrator="analytic", seed=seed,
                                  noise=hm.NoiseConfig(coupling_bits=6, rounding="stochastic",
                                                       mitigation_copies=copies))
            res = hm.solve(A, b, cfg)
            errs[copies].append(np.sum((res.x - xstar) ** 2))
            assert res.analog_time == pytest.approx(1100.0 * copies)
    rms1, rms16 = np.sqrt(np.mean(errs[1])), np.sqrt(np.mean(errs[16]))
    assert rms16 < 0.4 * rms1


@pytest.mark.parametrize("dynamics", ["overdamped", "underdamped"])
@pytest.mark.parametrize("integrator", ["euler", "exact"])
def test_numba_and_torch_agree(problem5, integrator, dynamics):
    A, b, _ = problem5
    lam_t, Q = _eig(A)
    xstar = np.linalg.solve(A, b)
    m = 2000
    out = {}
    for i, backend in enumerate(BACKENDS):
        cfg = hm.AnalogConfig(analog_time=10.0, burn_in=5.0, kappa0=0.05, integrator=integrator,
                              dynamics=dynamics, backend=backend, seed=500 + i)
        out[backend] = Q.T @ (_columns(A, b, m, cfg).x - xstar[:, None])
    for mode in range(5):
        assert stats.ks_2samp(out["torch"][mode], out["numba"][mode]).pvalue > 1e-4


@pytest.mark.parametrize("integrator", ["euler", "exact"])
def test_numba_and_torch_agree_on_inverse_with_readout(problem5, integrator):
    A, _, _ = problem5
    k = 32
    noise = hm.NoiseConfig(output_bits=5, read_noise=0.05)
    est = {}
    for i, backend in enumerate(BACKENDS):
        cfg = hm.AnalogConfig(analog_time=100.0, burn_in=20.0, kappa0=0.5, integrator=integrator,
                              backend=backend, seed=600 + i, noise=noise)
        est[backend] = hm.inverse(np.repeat(A[None], k, axis=0), cfg).x
    diff = est["torch"].mean(axis=0) - est["numba"].mean(axis=0)
    se = np.sqrt((est["torch"].var(axis=0, ddof=1) + est["numba"].var(axis=0, ddof=1)) / k)
    iu = np.triu_indices(5)
    assert np.max(np.abs(diff[iu]) / se[iu]) < stats.t.ppf(1 - 1e-4, df=k - 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_noise_biases_inverse_by_delta_squared_over_kappa0(problem5, backend):
    """Read noise delta on every sample adds exactly delta^2 / kappa0 to the inverse's diagonal."""
    A, _, _ = problem5
    k, kappa0, delta = 32, 0.2, 0.2
    cfg = hm.AnalogConfig(analog_time=200.0, burn_in=20.0, kappa0=kappa0, integrator="exact",
                          backend=backend, seed=7, noise=hm.NoiseConfig(read_noise=delta))
    est = hm.inverse(np.repeat(A[None], k, axis=0), cfg).x
    shift = np.trace(est - np.linalg.inv(A), axis1=1, axis2=2) / 5  # per system
    expected = delta**2 / kappa0
    assert abs(shift.mean() - expected) < 4.5 * shift.std(ddof=1) / np.sqrt(k)
    assert expected > 8 * shift.std(ddof=1) / np.sqrt(k)  # the effect is resolved


def test_nonsymmetric_euler_solve_converges():
    rng = np.random.default_rng(3)
    A = spd([1.0, 1.5, 2.0, 2.5], seed=3) + 0.3 * (lambda M: M - M.T)(rng.standard_normal((4, 4)))
    b = rng.standard_normal(4)
    m = 1000
    res = _columns(A, b, m, hm.AnalogConfig(analog_time=50.0, burn_in=20.0, kappa0=0.02, seed=1))
    err = res.x.mean(axis=1) - np.linalg.solve(A, b)
    # per-column error variance ~ 2 kappa0 tr(A^-1 A^-T)/T (integrated autocovariance)
    Ainv = np.linalg.inv(A)
    var_tot = 2 * 0.02 * np.trace(Ainv @ Ainv.T) / 50.0
    assert np.sum(err**2) < 5 * var_tot / m
    assert res.diagnostics["error_law_mse"] is None
