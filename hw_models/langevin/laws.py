"""Closed-form statistics of the Langevin dynamics, per eigenmode (numpy, float64).

With ``A = Q diag(lam) Q^T`` and ``u = Q^T (x - x*)`` every eigenmode is independent.

Overdamped, ``du = -lam u dt + sqrt(2 kappa0) dW``: a scalar Ornstein-Uhlenbeck process with
stationary variance ``s = kappa0 / lam``. Its exact transition over ``h`` is
``u' = a u + sqrt(s (1 - a**2)) z`` with ``a = exp(-lam h)``.

Time average over ``[t0, t0 + T]`` given ``u(0) = u0`` (derived in ``docs/simulator.md``)::

    E[ubar]   = u0 * exp(-lam t0) * (1 - exp(-lam T)) / (lam T)
    Var[ubar] = 2 kappa0 / (lam**3 T**2) * [lam T - g - exp(-2 lam t0) g**2 / 2],
                g = 1 - exp(-lam T)

Large ``t0`` and ``T`` give ``2 kappa0 / (lam**2 T)``; summed over modes this is the error law
``E||xbar - x*||**2 ~= 2 kappa0 tr(A^-2) / T``.

Underdamped (mass ``M``, friction ``gamma``), per mode ``z = (u, p)``, ``dz = F z dt + noise`` with
``F = [[0, 1/M], [-lam, -gamma/M]]``, noise only on ``p`` with intensity ``2 gamma kappa0``, and
stationary covariance ``S = diag(kappa0/lam, kappa0 M)``. The exact transition is
``Phi = expm(F h)`` with covariance ``S - Phi S Phi^T``; the time average uses
``ell = e1^T F^-1 (expm(F T) - I)`` and ``V = 2 e1^T (F^-2 (expm(F T) - I) - T F^-1) S e1``::

    E[ubar] = ell Phi(t0) z0 / T,   Var[ubar] = (V - (ell Phi(t0)) S (ell Phi(t0))^T) / T**2.

Discrete estimators (``N`` samples at spacing ``h`` of a stationary AR(1) sequence with
coefficient ``a`` and variance ``s``) use ``Var[mean] = s * r(a, N)`` with
``r(a, N) = [(1 + a)/(1 - a) - 2 a (1 - a**N) / (N (1 - a)**2)] / N``.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# overdamped


def od_transition(lam: np.ndarray, h: float, kappa0: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact one-step coefficient ``a = exp(-lam h)`` and noise std ``sqrt(s (1 - a**2))``."""
    lam = np.asarray(lam, dtype=np.float64)
    a = np.exp(-lam * h)
    std = np.sqrt(kappa0 / lam * -np.expm1(-2.0 * lam * h))
    return a, std


def od_time_average(lam: np.ndarray, burn_in: float | np.ndarray, window: float | np.ndarray,
                    kappa0: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean weight ``w`` (``E[ubar] = w u0``) and variance of the continuous time average
    (``burn_in``/``window`` may be arrays broadcasting against ``lam``)."""
    lam = np.asarray(lam, dtype=np.float64)
    a = lam * window
    g = -np.expm1(-a)
    w = np.exp(-lam * burn_in) * g / a
    # h(a) = a - g - g**2/2 cancels catastrophically for small a; use its series there
    series = a**3 / 3.0 - a**4 / 4.0 + 7.0 * a**5 / 60.0
    with np.errstate(invalid="ignore", over="ignore"):
        direct = a - g - 0.5 * g * g
    h = np.where(a < 1e-3, series, direct)
    one_minus_e = -np.expm1(-2.0 * lam * burn_in)
    var = 2.0 * kappa0 / (lam**3 * window**2) * (h + 0.5 * one_minus_e * g * g)
    return w, np.maximum(var, 0.0)


def od_end_state(lam: np.ndarray, burn_in: float, window: float,
                 kappa0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The state at the end ``s = t0 + T`` of a time-averaged run, jointly with the average.

    Returns ``(decay, var_end, cov)``: ``E[u(s)] = decay u0`` with ``decay = exp(-lam s)``,
    ``Var[u(s)] = kappa0 / lam (1 - exp(-2 lam s))`` and the covariance with the time average
    ``Cov[ubar, u(s)] = kappa0 / (lam**2 T) [g - exp(-lam (s + t0)) + exp(-2 lam s)]``,
    ``g = 1 - exp(-lam T)`` (from ``Cov[u(t), u(s)] = kappa0/lam e^{-lam(s-t)} (1 - e^{-2 lam t})``,
    ``t <= s``, integrated over the window; derived in ``docs/simulator.md``).
    """
    lam = np.asarray(lam, dtype=np.float64)
    s = burn_in + window
    decay = np.exp(-lam * s)
    var_end = kappa0 / lam * -np.expm1(-2.0 * lam * s)
    g = -np.expm1(-lam * window)
    cov = kappa0 / (lam**2 * window) * (g - np.exp(-lam * (s + burn_in)) + np.exp(-2.0 * lam * s))
    return decay, np.maximum(var_end, 0.0), cov


def euler_ar(lam: np.ndarray, dt: float, kappa0: float) -> tuple[np.ndarray, np.ndarray]:
    """AR(1) coefficient ``1 - lam dt`` and stationary variance of Euler-Maruyama samples."""
    lam = np.asarray(lam, dtype=np.float64)
    a = 1.0 - lam * dt
    s = 2.0 * kappa0 / (lam * (2.0 - lam * dt))
    return a, s


def ar_mean_factor(a: np.ndarray, n: int) -> np.ndarray:
    """``r(a, N)``: variance of the mean of ``N`` stationary AR(1) samples, in units of ``s``."""
    a = np.asarray(a, dtype=np.float64)
    one_minus = 1.0 - a
    with np.errstate(divide="ignore", invalid="ignore"):
        r = ((1.0 + a) / one_minus - 2.0 * a * (1.0 - a**n) / (n * one_minus**2)) / n
    return np.where(np.abs(one_minus) < 1e-12, 1.0, r)


def discrete_average(a: np.ndarray, s: np.ndarray, a_burn: np.ndarray,
                     n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean weight and variance of ``(1/N) sum_{t=1..N} u_t`` for an AR(1) chain.

    The chain starts (after the burn-in) from ``u_b = a_burn u0 + noise`` with variance
    ``s (1 - a_burn**2)``, then ``u_t = a u_{t-1} + noise``.
    """
    a = np.asarray(a, dtype=np.float64)
    one_minus = 1.0 - a
    with np.errstate(divide="ignore", invalid="ignore"):
        geo = np.where(np.abs(one_minus) < 1e-12, 1.0, a * (1.0 - a**n) / (n * one_minus))
    w = a_burn * geo
    var = s * ar_mean_factor(a, n) - s * (a_burn * geo) ** 2
    return w, np.maximum(var, 0.0)


# ---------------------------------------------------------------------------------------------
# underdamped


def _drift(lam: np.ndarray, mass: float, friction: float) -> np.ndarray:
    lam = np.asarray(lam, dtype=np.float64)
    F = np.zeros(lam.shape + (2, 2))
    F[..., 0, 1] = 1.0 / mass
    F[..., 1, 0] = -lam
    F[..., 1, 1] = -friction / mass
    return F


def ud_expm(lam: np.ndarray, h: float, mass: float, friction: float) -> np.ndarray:
    """``expm(F h)`` per mode, in closed form (Cayley-Hamilton for 2x2 matrices)."""
    F = _drift(lam, mass, friction)
    half_tr = -friction / (2.0 * mass)
    det = np.asarray(lam, dtype=np.float64) / mass
    s = np.sqrt((half_tr**2 - det).astype(np.complex128))
    e_plus = np.exp((half_tr + s) * h)
    e_minus = np.exp((half_tr - s) * h)
    cosh_part = 0.5 * (e_plus + e_minus)
    small = np.abs(s * h) < 1e-6
    safe_s = np.where(small, 1.0, s)
    sinh_part = np.where(small, h * np.exp(half_tr * h) * (1.0 + (s * h) ** 2 / 6.0),
                         0.5 * (e_plus - e_minus) / safe_s)
    c = cosh_part.real[..., None, None]
    d = sinh_part.real[..., None, None]
    eye = np.eye(2)
    return c * eye + d * (F - half_tr * eye)


def ud_stationary(lam: np.ndarray, kappa0: float, mass: float) -> np.ndarray:
    """Stationary covariance ``diag(kappa0/lam, kappa0 M)`` per mode."""
    lam = np.asarray(lam, dtype=np.float64)
    S = np.zeros(lam.shape + (2, 2))
    S[..., 0, 0] = kappa0 / lam
    S[..., 1, 1] = kappa0 * mass
    return S


def ud_transition(lam: np.ndarray, h: float, kappa0: float, mass: float,
                  friction: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact transition ``Phi`` and the Cholesky factor ``(l11, l21, l22)`` of its noise."""
    Phi = ud_expm(lam, h, mass, friction)
    S = ud_stationary(lam, kappa0, mass)
    C = S - Phi @ S @ np.swapaxes(Phi, -1, -2)
    l11 = np.sqrt(np.maximum(C[..., 0, 0], 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        l21 = np.where(l11 > 0, C[..., 1, 0] / np.where(l11 > 0, l11, 1.0), 0.0)
    l22 = np.sqrt(np.maximum(C[..., 1, 1] - l21**2, 0.0))
    return Phi, np.stack([l11, l21, l22], axis=-1)


def ud_time_average(lam: np.ndarray, burn_in: float, window: float, kappa0: float, mass: float,
                    friction: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(w_u, w_p)`` (``E[ubar] = w_u u0 + w_p p0``) and variance of the time average."""
    F = _drift(lam, mass, friction)
    Finv = np.linalg.inv(F)
    E = ud_expm(lam, window, mass, friction)
    eye = np.eye(2)
    S = ud_stationary(lam, kappa0, mass)
    integral = Finv @ (E - eye)  # int_0^T expm(F s) ds
    ell = integral[..., 0, :]
    weighted = Finv @ integral - window * Finv  # int_0^T (T - s) expm(F s) ds
    V = 2.0 * (weighted @ S)[..., 0, 0]
    Phi_b = ud_expm(lam, burn_in, mass, friction)
    ellb = np.einsum("...i,...ij->...j", ell, Phi_b)
    var = (V - np.einsum("...i,...ij,...j->...", ellb, S, ellb)) / window**2
    return ellb / window, np.maximum(var, 0.0)


def ud_stable_dt(lam_max: float, mass: float, friction: float) -> float:
    """Largest stable step of the semi-implicit Euler scheme (for ``p`` then ``x``)."""
    return 4.0 * mass / (friction + np.sqrt(friction**2 + 4.0 * lam_max * mass))


# ---------------------------------------------------------------------------------------------
# error laws


def solve_error_law(lam: np.ndarray, window: float, kappa0: float, friction: float = 1.0) -> float:
    """Asymptotic ``E||xbar - x*||**2 = 2 gamma kappa0 tr(A^-2) / T`` for one right-hand side.

    ``gamma = friction`` for underdamped dynamics; it is 1 for overdamped dynamics.
    """
    lam = np.asarray(lam, dtype=np.float64)
    return float(2.0 * friction * kappa0 * np.sum(lam**-2.0) / window)


def inverse_error_rate(a: np.ndarray, s: np.ndarray, kappa0: float) -> float:
    """Large-``N`` limit of ``N * inverse_error_law(a, s, N, kappa0)`` (``r -> (1+a)/(1-a)/N``)."""
    a = np.asarray(a, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    rho = np.outer(a, a)
    cross = np.einsum("i,j,ij->", s, s, (1.0 + rho) / (1.0 - rho))
    diag = np.sum(s * s * (1.0 + a * a) / (1.0 - a * a))
    return float((cross + diag) / kappa0**2)


def inverse_error_law(a: np.ndarray, s: np.ndarray, n_samples: int, kappa0: float) -> float:
    """``E||C_hat / kappa0 - C / kappa0||_F**2`` of the raw second moment of ``N`` samples.

    ``a`` and ``s`` are the per-mode AR(1) coefficients and stationary variances of the sampled
    chain (see :func:`od_transition`, :func:`euler_ar`); the samples are stationary, and ``C`` is
    their stationary covariance. With ``r`` from :func:`ar_mean_factor`::

        sum_{i,j} s_i s_j r(a_i a_j, N) + sum_i s_i**2 r(a_i**2, N)
    """
    a = np.asarray(a, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    cross = np.einsum("i,j,ij->", s, s, ar_mean_factor(np.outer(a, a), n_samples))
    diag = np.sum(s * s * ar_mean_factor(a * a, n_samples))
    return float((cross + diag) / kappa0**2)
