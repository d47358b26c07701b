"""The finite-time error law of one analog solve or inverse: the ONE law simulator and pricing share.

Convention (docs/hardware_model.md, "One convention"): ``P`` is the lambda_max-normalised
programmed matrix (eigenvalues ``0 < lam_k <= 1``), time is in tau of ``P``, the right-hand side
``b`` is in DAC full-scale units, and the dynamics are ``dx = -(P x - b) dt + sqrt(2 kappa0) dW``.
``eps`` is the relative error of the returned result.

Modes may be grouped: ``lam`` holds distinct eigenvalues and ``weights`` how many eigenvalues each
stands for (a quantile sketch of a large spectrum); sums below run over ``k`` with weight ``m_k``.

**Solve** (time average over ``[t0, t0 + T]`` after a burn-in ``t0``), per mode ``u = q_k^T(x-x*)``
(:func:`hw_models.langevin.laws.od_time_average`)::

    E[ubar_k]   = w_k u0_k,         w_k = exp(-lam t0) (1 - exp(-lam T)) / (lam T)
    Var[ubar_k] = v_k = 2 kappa0 / (lam^3 T^2) [lam T - g - exp(-2 lam t0) g^2 / 2],  g = 1 - exp(-lam T)

    eps^2 = (sum_k m_k w_k^2 E[u0_k^2]  +  sum_k m_k v_k / copies) / E||x*||^2      (bias + variance)

with ``x*_k = beta_k / lam_k`` (``beta = Q^T b``). The start sets ``u0``: ``"zero"`` ``u0 = -x*``;
``"gradient"`` (``x0 = g b``, TNGD) ``u0_k = beta_k (g - 1/lam_k)``; ``"previous"`` (a warm start
at relative distance ``d`` from ``x*``, spread like ``x*``) ``u0_k^2 = d^2 x*_k^2``; ``"stationary"``
(continuing a converged solve of the same system) ``u0 = 0``. An explicit ``b`` and ``x0`` (in the
eigenbasis) give the exact value for that right-hand side.

Without an explicit ``b`` the **RHS model** is: components independent in the eigenbasis with
``E beta_k^2 = rms^2 lam_k^alpha / mean_k(lam^alpha)`` (``rms``: root-mean-square entry of ``b`` in
full-scale units; ``alpha = 0`` isotropic, ``alpha = 1`` a gradient distributed like the factor
itself, ``E g g^T ~ P``). A column at the DAC's full scale (abs-max 1) of a Gaussian vector has
``rms ~ 1 / E[max_i |z_i|]`` (:func:`full_scale_rms`, the default).

Large ``t0`` and ``T`` give the asymptotic ``E||xbar - x*||^2 = 2 kappa0 tr(P^-2) / T``
(:func:`hw_models.langevin.laws.solve_error_law`); with the isotropic model the relative
variance is then ``2 kappa0 / (rms^2 T)``, independent of the spectrum, and the spectrum enters
through the bias (slow modes relax in ``kappa`` tau).

**Inverse** (``b = 0``, estimate ``S = (1/(kappa0 N)) sum_j x_j x_j^T`` over ``N = T/h`` samples at
spacing ``h`` after ``t0``), relative Frobenius error ``||S - P^-1||_F / ||P^-1||_F``::

    variance: sum_ij m_i m_j s_i s_j r(a_i a_j, N) + sum_i m_i s_i^2 r(a_i^2, N),  s = 1/lam, a = exp(-lam h)
    bias (zero start): B_k = -(1/lam_k) exp(-2 lam t0) c (1 - c^N) / (N (1 - c)),  c = exp(-2 lam h)
    eps^2 = (variance + sum_k m_k B_k^2) / sum_k m_k lam_k^-2

``r(a, N)`` is the AR(1) mean factor of :func:`hw_models.langevin.laws.ar_mean_factor`; the
variance uses stationary samples (the burn-in's effect on it is neglected: it only lowers it).
It does not depend on ``kappa0``. ``"stationary"`` start: no bias.

**Inversion**: :func:`solve_window` / :func:`inverse_window` return the burn-in and window that
reach a target ``eps`` with the least total time ``t0 + T`` (or, with a fixed burn-in, the window),
found on a log grid and refined by bisection (``eps`` decreases in both).

**Static errors** (first order, converters and device; added in quadrature by
:func:`static_solve_error`): input DAC ``sigma_in^2 tr(P^-2) / E||x*||^2``; coupling rounding
``sigma_c^2 tr(P^-2)``; proportional mismatch ``mu^2 tr(P^2) tr(P^-2) / n^2``; read noise and ADC
``n (sigma_r^2 + sigma_out^2) / E||x*||^2`` with ``sigma = step / sqrt(12)`` of each converter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from hw_models.langevin import laws
from hw_models.validation import check_bits, check_choice, check_number, check_positive

SOLVE_STARTS = ("zero", "gradient", "previous", "stationary")
INVERSE_STARTS = ("zero", "stationary")


@dataclass(frozen=True)
class ErrorPrediction:
    """Predicted relative error of one analog result, with its parts (all relative, not squared).

    ``rel_error = sqrt(bias^2 + variance^2 + static^2)``; ``thermal = sqrt(bias^2 + variance^2)``.
    """

    rel_error: float
    bias: float
    variance: float
    static: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def thermal(self) -> float:
        return math.hypot(self.bias, self.variance)

    def to_dict(self) -> dict[str, Any]:
        return {"rel_error": self.rel_error, "bias": self.bias, "variance": self.variance,
                "static": self.static, **self.info}


def full_scale_rms(n: int) -> float:
    """RMS entry of a length-``n`` Gaussian vector scaled to abs-max 1: ``1 / E[max_i |z_i|]``.

    The expected largest of ``n`` absolute standard normals is taken from Blom's plotting position,
    ``Phi^-1((1 + (n - 0.375) / (n + 0.25)) / 2)`` (within a few per cent for ``n >= 8``).
    """
    check_positive("n", n, integer=True)
    p = (n - 0.375) / (n + 0.25)
    return 1.0 / NormalDist().inv_cdf(0.5 * (1.0 + p))


def _modes(lam: Any, weights: Any | None) -> tuple[np.ndarray, np.ndarray]:
    lam = np.asarray(lam, dtype=np.float64).reshape(-1)
    if lam.size == 0 or not np.all(np.isfinite(lam)) or lam.min() <= 0:
        raise ValueError("eigenvalues must be finite and > 0 (a positive definite matrix); got "
                         f"min {lam.min() if lam.size else 'none'}")
    if lam.max() > 1.0 + 1e-6:
        raise ValueError(f"eigenvalues must be lambda_max-normalised (<= 1); got max {lam.max():.6g}")
    if weights is None:
        return lam, np.ones_like(lam)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if weights.shape != lam.shape or np.any(weights <= 0):
        raise ValueError("weights must be > 0 and match the eigenvalues one to one")
    return lam, weights


def rhs_power(lam: np.ndarray, weights: np.ndarray, rms: float, alignment: float) -> np.ndarray:
    """``E beta_k^2`` of the RHS model: ``rms^2 lam^alpha / mean(lam^alpha)`` (module docs)."""
    shape = lam**alignment
    return rms**2 * shape * weights.sum() / float(np.sum(weights * shape))


def solve_error(lam: Any, *, window: float, burn_in: float, kappa0: float, weights: Any | None = None,
                rhs: Any | None = None, x0: Any | None = None, start: str = "zero",
                rhs_rms: float | None = None, rhs_alignment: float = 0.0, gradient_scale: float = 1.0,
                warm_distance: float = 1.0, copies: int = 1) -> ErrorPrediction:
    """Relative RMS error ``sqrt(E||xbar - x*||^2) / ||x*||`` of one analog solve (module docs).

    Args:
        lam: eigenvalues of the normalised ``P`` (``<= 1``), or representative values with
            ``weights`` (multiplicities).
        window, burn_in: averaging window ``T`` and burn-in ``t0`` in tau.
        kappa0: thermal noise in the simulator's convention.
        rhs: an explicit right-hand side in the eigenbasis, ``beta = Q^T b`` (``(n,)`` or ``(n, m)``,
            full-scale units); ``None``: the RHS model with ``rhs_rms`` (default
            :func:`full_scale_rms`) and ``rhs_alignment``.
        x0: explicit start in the eigenbasis ``Q^T x0`` (with ``rhs``); overrides ``start``.
        start: ``"zero"``, ``"gradient"`` (``x0 = gradient_scale * b``), ``"previous"`` (relative
            distance ``warm_distance``) or ``"stationary"``.
        copies: independent copies averaged (rounding-ensemble mitigation): variance / copies.
    """
    lam, m = _modes(lam, weights)
    check_positive("window", window)
    check_positive("burn_in", burn_in, allow_zero=True)
    check_positive("kappa0", kappa0, allow_zero=True)
    check_choice("start", start, SOLVE_STARTS)
    check_positive("copies", copies, integer=True)
    w, var = laws.od_time_average(lam, burn_in, window, kappa0)
    if rhs is not None:
        if weights is not None:
            raise ValueError("an explicit rhs needs the full spectrum (no weights)")
        beta = np.asarray(rhs, dtype=np.float64)
        beta = beta.reshape(lam.size, -1)
        cols = beta.shape[1]
        xstar = beta / lam[:, None]
        if x0 is not None:
            u0 = np.asarray(x0, dtype=np.float64).reshape(lam.size, -1) - xstar
        elif start == "zero":
            u0 = -xstar
        elif start == "gradient":
            u0 = beta * (gradient_scale - 1.0 / lam[:, None])
        elif start == "previous":
            u0 = warm_distance * xstar
        else:
            u0 = np.zeros_like(xstar)
        ref = float(np.sum(xstar**2))
        bias2 = float(np.sum((w[:, None] * u0) ** 2))
        var_total = cols * float(np.sum(var)) / copies
    else:
        rms = full_scale_rms(int(round(m.sum()))) if rhs_rms is None else rhs_rms
        check_positive("rhs_rms", rms)
        power = rhs_power(lam, m, rms, rhs_alignment)
        xs2 = power / lam**2
        if start == "zero":
            u02 = xs2
        elif start == "gradient":
            u02 = power * (gradient_scale - 1.0 / lam) ** 2
        elif start == "previous":
            u02 = warm_distance**2 * xs2
        else:
            u02 = np.zeros_like(xs2)
        ref = float(np.sum(m * xs2))
        bias2 = float(np.sum(m * w**2 * u02))
        var_total = float(np.sum(m * var)) / copies
    if ref <= 0:
        raise ValueError("the solution x* is 0 (right-hand side 0): a relative error is undefined")
    bias, variance = math.sqrt(bias2 / ref), math.sqrt(var_total / ref)
    return ErrorPrediction(math.hypot(bias, variance), bias, variance,
                           info={"solution_norm2": ref, "window": window, "burn_in": burn_in})


def inverse_error(lam: Any, *, window: float, burn_in: float, weights: Any | None = None,
                  sample_interval: float = 1.0, start: str = "zero",
                  copies: int = 1) -> ErrorPrediction:
    """Relative Frobenius error of the sampled inverse ``S ~ P^-1`` (module docs)."""
    lam, m = _modes(lam, weights)
    check_positive("window", window)
    check_positive("burn_in", burn_in, allow_zero=True)
    check_positive("sample_interval", sample_interval)
    check_choice("start", start, INVERSE_STARTS)
    n_samples = max(1, int(math.floor(window / sample_interval + 1e-9)))
    var, bias2 = _inverse_terms(lam, m, np.array([burn_in]), np.array([n_samples]), sample_interval,
                                start)
    ref = float(np.sum(m / lam**2))
    bias = math.sqrt(float(bias2[0, 0]) / ref)
    variance = math.sqrt(float(var[0]) / copies / ref)
    return ErrorPrediction(math.hypot(bias, variance), bias, variance,
                           info={"n_samples": n_samples, "window": window, "burn_in": burn_in,
                                 "sample_interval": sample_interval})


def _inverse_terms(lam: np.ndarray, m: np.ndarray, burn: np.ndarray, n_samples: np.ndarray, h: float,
                   start: str) -> tuple[np.ndarray, np.ndarray]:
    """Variance (per N, shape ``(len(N),)``) and squared bias (shape ``(len(burn), len(N))``)."""
    s = 1.0 / lam
    a = np.exp(-lam * h)
    N = n_samples.astype(np.float64)
    rho = np.outer(a, a)
    ms = m * s
    chunk = max(1, 2_000_000 // rho.size)  # bound the (N, modes, modes) temporary
    cross = np.concatenate([
        np.einsum("i,j,kij->k", ms, ms, laws.ar_mean_factor(rho[None], N[k:k + chunk, None, None]))
        for k in range(0, N.size, chunk)])
    diag = np.einsum("i,ki->k", m * s * s, laws.ar_mean_factor((a * a)[None, :], N[:, None]))
    var = cross + diag
    if start == "stationary":
        return var, np.zeros((burn.size, N.size))
    c = np.exp(-2.0 * lam * h)
    one_minus = 1.0 - c
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        geo = np.where(one_minus[None, :] < 1e-12, 1.0,
                       c[None, :] * -np.expm1(N[:, None] * np.log(c)[None, :])
                       / (N[:, None] * one_minus[None, :]))
    decay = np.exp(-2.0 * lam[None, :] * burn[:, None])  # (B, modes)
    bias_k = s[None, None, :] * decay[:, None, :] * geo[None, :, :]  # (B, N, modes)
    return var, np.einsum("bnk,k->bn", bias_k**2, m)


def static_solve_error(lam: Any, *, weights: Any | None = None, solution_norm2: float,
                       input_bits: int | None = None, coupling_bits: int | None = None,
                       output_bits: int | None = None, mismatch: float = 0.0, read_noise: float = 0.0,
                       coupling_range: float = 1.0, output_range: float = 1.0,
                       input_range: float = 1.0, rounding: str = "nearest") -> float:
    """First-order relative error of a solve caused by converters and device (module docs).

    ``solution_norm2`` is ``E||x*||^2`` per column in full-scale units (from :func:`solve_error`'s
    ``info``). ``rounding``: ``"nearest"`` (error variance ``step^2/12``) or ``"stochastic"``
    (``step^2/6``: unbiased, but twice the variance). Returns the relative error (not squared).
    """
    lam, m = _modes(lam, weights)
    check_positive("solution_norm2", solution_norm2)
    n = float(m.sum())
    tr_inv2 = float(np.sum(m / lam**2))
    tr2 = float(np.sum(m * lam**2))
    total = 0.0
    if input_bits is not None:
        total += _step_var(input_bits, input_range, rounding) * tr_inv2 / solution_norm2
    if coupling_bits is not None:
        total += _step_var(coupling_bits, coupling_range, rounding) * tr_inv2
    total += mismatch**2 * tr2 * tr_inv2 / n**2
    out = read_noise**2 + (_step_var(output_bits, output_range, rounding) if output_bits is not None
                           else 0.0)
    total += n * out / solution_norm2
    return math.sqrt(total)


def static_inverse_error(lam: Any, *, weights: Any | None = None, kappa0: float,
                         coupling_bits: int | None = None, mismatch: float = 0.0,
                         read_noise: float = 0.0, coupling_range: float = 1.0,
                         rounding: str = "nearest") -> float:
    """First-order relative Frobenius error of a sampled inverse from couplings and read noise.

    Coupling rounding and mismatch perturb ``P^-1`` by ``P^-1 dP P^-1``; read noise adds
    ``read_noise^2 / kappa0`` to every diagonal entry of the estimate (a bias).
    """
    lam, m = _modes(lam, weights)
    check_positive("kappa0", kappa0)
    n = float(m.sum())
    tr_inv2 = float(np.sum(m / lam**2))
    tr2 = float(np.sum(m * lam**2))
    total = mismatch**2 * tr2 * tr_inv2 / n**2
    if coupling_bits is not None:
        total += _step_var(coupling_bits, coupling_range, rounding) * tr_inv2
    total += n * (read_noise**2 / kappa0) ** 2 / tr_inv2
    return math.sqrt(total)


def _step_var(bits: int, span: float, rounding: str = "nearest") -> float:
    """Variance of one rounding error: ``step^2/12`` to nearest; ``step^2/6`` stochastic (the
    error ``f step`` w.p. ``1-f``, ``(f-1) step`` w.p. ``f`` has variance ``f(1-f) step^2``,
    whose mean over a uniform fraction ``f`` is ``step^2/6``)."""
    check_bits("bits", bits)
    check_choice("rounding", rounding, ("nearest", "stochastic"))
    return (span / (2 ** (bits - 1) - 1)) ** 2 / (6.0 if rounding == "stochastic" else 12.0)


def coupling_span(noise: Any, max_coupling: float | None) -> float:
    """The coupling DACs' full scale for a matrix whose off-diagonal abs-max is ``max_coupling``
    (``None``: unknown): ``coupling_range``, or with ``diagonal_resistors`` the off-diagonal
    abs-max capped by it (the range itself when the abs-max is unknown: conservative)."""
    cap = 1.0 if noise.coupling_range is None else float(noise.coupling_range)
    if noise.diagonal_resistors and max_coupling is not None:
        return min(float(max_coupling), cap) or cap
    return cap


def static_solve_error_of(noise: Any, lam: Any, *, weights: Any | None = None,
                          solution_norm2: float, max_coupling: float | None = None) -> float:
    """:func:`static_solve_error` of a device's converters (a :class:`hw_models.NoiseConfig`, read
    field by field: the one translation from a device to the law). ``lam`` is the
    lambda_max-normalised programmed spectrum; ``max_coupling`` its off-diagonal abs-max when
    known (it sets the coupling step of a device with ``diagonal_resistors``)."""
    return static_solve_error(
        lam, weights=weights, solution_norm2=solution_norm2, input_bits=noise.input_bits,
        coupling_bits=noise.coupling_bits, output_bits=noise.output_bits,
        mismatch=noise.mismatch_std or 0.0, read_noise=noise.read_noise or 0.0,
        coupling_range=coupling_span(noise, max_coupling), output_range=noise.output_range or 1.0,
        input_range=noise.input_range or 1.0, rounding=noise.rounding)


def static_inverse_error_of(noise: Any, lam: Any, *, weights: Any | None = None, kappa0: float,
                            max_coupling: float | None = None) -> float:
    """:func:`static_inverse_error` of a device's converters (see :func:`static_solve_error_of`)."""
    return static_inverse_error(
        lam, weights=weights, kappa0=kappa0, coupling_bits=noise.coupling_bits,
        mismatch=noise.mismatch_std or 0.0, read_noise=noise.read_noise or 0.0,
        coupling_range=coupling_span(noise, max_coupling), rounding=noise.rounding)


# ---------------------------------------------------------------------------------------------
# inversion: the window for a target eps


def _solve_grid(lam: np.ndarray, m: np.ndarray, u02: np.ndarray, ref: float, kappa0: float,
                burn: np.ndarray, window: np.ndarray, copies: int) -> np.ndarray:
    """Relative error squared on a (burn-in, window) grid for the RHS-model solve."""
    # laws.od_time_average broadcasts: burn-ins x windows x modes in one call
    w, var = laws.od_time_average(lam[None, None, :], burn[:, None, None], window[None, :, None], kappa0)
    total = np.sum(m * (w**2 * u02 + np.maximum(var, 0.0) / copies), axis=-1)
    return total / ref


@dataclass(frozen=True)
class Window:
    """Burn-in and averaging window (tau) that reach ``target`` (``reachable`` False: they do not;
    then ``window`` is the largest searched and ``predicted`` what it gives)."""

    burn_in: float
    window: float
    predicted: float
    target: float
    reachable: bool

    @property
    def total(self) -> float:
        return self.burn_in + self.window


_T_GRID = np.logspace(-3, 12, 121)


def _pick(err2: np.ndarray, burn: np.ndarray, target: float,
          refine: Any) -> tuple[float, float, float, bool]:
    ok = err2 <= target**2
    if not ok.any():
        b, t = np.unravel_index(np.argmin(err2[:, -1]), (err2.shape[0], 1))
        return float(burn[b]), float(_T_GRID[-1]), math.sqrt(float(err2[b, -1])), False
    first = np.where(ok.any(axis=1), ok.argmax(axis=1), -1)
    totals = np.where(first >= 0, burn + _T_GRID[np.maximum(first, 0)], np.inf)
    b = int(np.argmin(totals))
    j = int(first[b])
    lo = _T_GRID[j - 1] if j > 0 else _T_GRID[0] * 1e-3
    hi = _T_GRID[j]
    for _ in range(50):  # bisection in log T for this burn-in
        mid = math.sqrt(lo * hi)
        if refine(float(burn[b]), mid) <= target:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-6:
            break
    T = float(hi)
    t0 = float(burn[b])
    if b > 0:  # then the least burn-in that still meets the target at this window
        lo_b, hi_b = float(burn[b - 1]), t0
        for _ in range(40):
            mid = 0.5 * (lo_b + hi_b)
            if refine(mid, T) <= target:
                hi_b = mid
            else:
                lo_b = mid
        t0 = hi_b
    return t0, T, refine(t0, T), True


def _burn_grid(lam: np.ndarray, target: float, burn_in: float | None) -> np.ndarray:
    if burn_in is not None:
        check_positive("burn_in", burn_in, allow_zero=True)
        return np.array([float(burn_in)])
    slow = 1.0 / float(lam.min())
    top = max(slow * (math.log(1.0 / min(target, 0.5)) + 3.0), 10.0)
    return np.concatenate([[0.0], np.logspace(-2, math.log10(top), 30)])


def solve_window(target: float, lam: Any, *, kappa0: float, weights: Any | None = None,
                 burn_in: float | None = None, start: str = "zero", rhs_rms: float | None = None,
                 rhs_alignment: float = 0.0, gradient_scale: float = 1.0, warm_distance: float = 1.0,
                 copies: int = 1) -> Window:
    """Burn-in and window of a solve whose thermal error (RHS model) is ``target``.

    ``burn_in=None`` chooses the burn-in too (least ``t0 + T``); a number fixes it.
    """
    check_number("target", target, low=0.0, low_inclusive=False)
    lam, m = _modes(lam, weights)
    check_choice("start", start, SOLVE_STARTS)
    rms = full_scale_rms(int(round(m.sum()))) if rhs_rms is None else rhs_rms
    power = rhs_power(lam, m, rms, rhs_alignment)
    xs2 = power / lam**2
    u02 = {"zero": xs2, "gradient": power * (gradient_scale - 1.0 / lam) ** 2,
           "previous": warm_distance**2 * xs2, "stationary": np.zeros_like(xs2)}[start]
    ref = float(np.sum(m * xs2))
    burn = _burn_grid(lam, target, burn_in)
    err2 = _solve_grid(lam, m, u02, ref, kappa0, burn, _T_GRID, copies)

    def refine(t0: float, T: float) -> float:
        return math.sqrt(float(_solve_grid(lam, m, u02, ref, kappa0, np.array([t0]), np.array([T]),
                                           copies)[0, 0]))

    t0, T, pred, ok = _pick(err2, burn, target, refine)
    return Window(t0, T, pred, target, ok)


def inverse_window(target: float, lam: Any, *, weights: Any | None = None, burn_in: float | None = None,
                   sample_interval: float = 1.0, start: str = "zero", copies: int = 1) -> Window:
    """Burn-in and sampling window of an inverse whose thermal error is ``target``."""
    check_number("target", target, low=0.0, low_inclusive=False)
    lam, m = _modes(lam, weights)
    check_positive("sample_interval", sample_interval)
    check_choice("start", start, INVERSE_STARTS)
    ref = float(np.sum(m / lam**2))
    burn = _burn_grid(lam, target, burn_in)
    grid = np.maximum(1, np.floor(_T_GRID / sample_interval)).astype(np.int64)
    var, bias2 = _inverse_terms(lam, m, burn, grid, sample_interval, start)
    err2 = (var[None, :] / copies + bias2) / ref

    def refine(t0: float, T: float) -> float:
        return inverse_error(lam, window=T, burn_in=t0, weights=m, sample_interval=sample_interval,
                             start=start, copies=copies).rel_error

    t0, T, pred, ok = _pick(err2, burn, target, refine)
    T = max(T, sample_interval)
    return Window(t0, T, pred, target, ok)
