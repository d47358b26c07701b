"""Closed-form laws of hw_models.langevin.laws against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import dblquad, quad
from scipy.linalg import expm

from hw_models.langevin import laws


def _ud_drift(lam, mass, friction):
    return np.array([[0.0, 1.0 / mass], [-lam, -friction / mass]])


@pytest.mark.parametrize("lam,t0,T", [(0.7, 0.3, 2.5), (2.0, 0.0, 0.4), (0.1, 5.0, 30.0)])
def test_overdamped_time_average_matches_quadrature(lam, t0, T):
    kappa0 = 0.2
    w, var = laws.od_time_average(np.array([lam]), t0, T, kappa0)

    # covariance of the OU path started from a fixed point, integrated numerically
    def cov(t, u):
        return kappa0 / lam * math.exp(-lam * abs(t - u)) * (1 - math.exp(-2 * lam * min(t, u)))

    num = dblquad(lambda u, t: cov(t, u), t0, t0 + T, t0, t0 + T)[0] / T**2
    mean = quad(lambda t: math.exp(-lam * t), t0, t0 + T)[0] / T
    assert var[0] == pytest.approx(num, rel=1e-6)
    assert w[0] == pytest.approx(mean, rel=1e-9)


def test_overdamped_time_average_small_window_limit():
    # lam T -> 0: the average of sqrt(2 kappa0) W over [0, T] has variance 2 kappa0 T / 3
    _, var = laws.od_time_average(np.array([1e-7, 1e-5]), 0.0, 1.0, 1.0)
    np.testing.assert_allclose(var, 2.0 / 3.0, rtol=1e-4)


@pytest.mark.parametrize("friction", [0.4, 5.0, 2.0 * math.sqrt(0.7 * 1.3)])  # under/over/critical
def test_underdamped_expm_and_transition(friction):
    lam, mass, h, kappa0 = 0.7, 1.3, 1.7, 0.3
    F = _ud_drift(lam, mass, friction)
    np.testing.assert_allclose(laws.ud_expm(np.array([lam]), h, mass, friction)[0], expm(F * h),
                               atol=1e-13)
    Phi, L = laws.ud_transition(np.array([lam]), h, kappa0, mass, friction)
    # transition covariance = int_0^h e^{Fs} G G^T e^{F^T s} ds, G G^T = diag(0, 2 gamma kappa0)
    GG = np.diag([0.0, 2.0 * friction * kappa0])
    C = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            C[i, j] = quad(lambda s, i=i, j=j: (expm(F * s) @ GG @ expm(F * s).T)[i, j], 0, h)[0]
    l11, l21, l22 = L[0]
    LL = np.array([[l11, 0.0], [l21, l22]])
    np.testing.assert_allclose(LL @ LL.T, C, rtol=1e-6, atol=1e-12)


def test_underdamped_time_average_matches_quadrature():
    lam, mass, friction, kappa0, t0, T = 0.7, 1.3, 0.4, 0.2, 0.3, 2.5
    F = _ud_drift(lam, mass, friction)
    mu, V = np.linalg.eig(F)  # expm by diagonalisation, independent of the code's closed form
    Vinv = np.linalg.inv(V)

    def E(t):
        return ((V * np.exp(mu * t)) @ Vinv).real

    S = np.diag([kappa0 / lam, kappa0 * mass])

    def cov(t, u):  # Cov(u(t), u(u)) for t <= u of the u component, from a fixed point at 0
        Pt = S - E(t) @ S @ E(t).T
        return (E(u - t) @ Pt)[0, 0]

    # symmetric integrand: twice the integral over t <= u, where it is smooth
    num = 2 * dblquad(lambda u, t: cov(t, u), t0, t0 + T, lambda t: t, t0 + T)[0] / T**2
    w, var = laws.ud_time_average(np.array([lam]), t0, T, kappa0, mass, friction)
    z0 = np.array([1.0, 0.5])
    mean = quad(lambda t: (E(t) @ z0)[0], t0, t0 + T)[0] / T
    assert var[0] == pytest.approx(num, rel=1e-6)
    assert w[0] @ z0 == pytest.approx(mean, rel=1e-9)


def test_underdamped_long_window_follows_friction_law():
    # E||xbar - x*||^2 -> 2 gamma kappa0 / (lam^2 T) per mode
    lam = np.array([0.5, 2.0])
    _, var = laws.ud_time_average(lam, 50.0, 1e5, 0.1, 1.0, 3.0)
    np.testing.assert_allclose(var, 2 * 3.0 * 0.1 / (lam**2 * 1e5), rtol=1e-3)


def _ar_cov(a, s, n):
    idx = np.arange(n)
    return s * a ** np.abs(idx[:, None] - idx[None, :])


@pytest.mark.parametrize("a", [0.9, 0.3, -0.5])
def test_discrete_average_matches_brute_force(a):
    s, ab, n = 2.0, 0.6, 40
    w, var = laws.discrete_average(np.array([a]), np.array([s]), np.array([ab]), n)
    # brute force: u_b = ab u0 + noise (var s (1 - ab^2)), then u_t = a u_{t-1} + noise
    # Cov(u_t, u_r) = a^{|t-r|} [s - a^{t+r} (s - var_b)] for t, r = 1..n after u_b
    t = np.arange(1, n + 1)
    var_b = s * (1 - ab**2)
    C = s * a ** np.abs(t[:, None] - t[None, :]) - (s - var_b) * a ** (t[:, None] + t[None, :])
    assert var[0] == pytest.approx(C.sum() / n**2, rel=1e-10)
    assert w[0] == pytest.approx(ab * np.mean(a**t), rel=1e-12)


def test_inverse_error_law_matches_brute_force():
    # Gaussian samples: Var(S_ij) = (1/N^2) sum_{t,r} [C_ii C_jj + C_ij^2](t - r) in the eigenbasis
    a = np.array([0.8, 0.3, 0.95])
    s = np.array([1.5, 0.4, 2.0])
    n, kappa0 = 30, 0.5
    total = 0.0
    for i in range(3):
        for j in range(3):
            Ci, Cj = _ar_cov(a[i], s[i], n), _ar_cov(a[j], s[j], n)
            v = (Ci * Cj).sum() / n**2
            if i == j:
                v *= 2.0  # + C_ij^2 term, nonzero only on the diagonal
            total += v
    assert laws.inverse_error_law(a, s, n, kappa0) == pytest.approx(total / kappa0**2, rel=1e-10)


def test_euler_ar_stationary_variance():
    lam, dt, kappa0 = np.array([0.5, 3.0]), 0.3, 0.2
    a, s = laws.euler_ar(lam, dt, kappa0)
    # AR(1) x' = a x + sqrt(2 kappa0 dt) z has stationary variance 2 kappa0 dt / (1 - a^2)
    np.testing.assert_allclose(s, 2 * kappa0 * dt / (1 - (1 - lam * dt) ** 2))


@pytest.mark.parametrize("friction,mass", [(1.0, 1.0), (0.1, 2.0), (5.0, 0.5)])
def test_underdamped_euler_stability_bound(friction, mass):
    lam = 3.0
    bound = laws.ud_stable_dt(lam, mass, friction)

    def radius(h):  # semi-implicit update matrix acting on (x, p)
        c1 = 1 - h * friction / mass
        M = np.array([[1 - h * h * lam / mass, h / mass * c1], [-h * lam, c1]])
        return np.max(np.abs(np.linalg.eigvals(M)))

    assert radius(0.999 * bound) < 1.0
    assert radius(1.001 * bound) > 1.0


def test_solve_error_law_value():
    lam = np.array([1.0, 2.0])
    assert laws.solve_error_law(lam, 10.0, 0.5) == pytest.approx(2 * 0.5 * (1 + 0.25) / 10)


def test_inverse_error_rate_is_the_large_n_limit():
    a = np.array([0.8, 0.3, -0.2])
    s = np.array([1.5, 0.4, 2.0])
    n = 10**7
    assert laws.inverse_error_rate(a, s, 0.5) == pytest.approx(
        n * laws.inverse_error_law(a, s, n, 0.5), rel=1e-5)
