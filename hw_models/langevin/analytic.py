"""The analytic integrator's draw, shared by the general simulator and the cached fast path of a
programmed matrix (one code path: the two agree bitwise when they use the same random draws).

Per eigenmode the time average after a burn-in is Gaussian with the mean weight ``w`` and variance
of :func:`hw_models.langevin.laws.od_time_average`; the state at the end of the run is drawn
jointly with it (:func:`hw_models.langevin.laws.od_end_state`), so a caller can continue the
next run from the device's own end state.

**Rails.** With ``NoiseConfig.state_range`` the state saturates at ``+-R``, which the Gaussian law
does not model. Before drawing, :func:`draw` checks that the mean path
``x(t) = x* + Q exp(-Lambda t) d`` (``d = Q^T x0 - u*``) plus ``RAIL_SIGMAS`` thermal standard
deviations per coordinate (the largest over the run: the end's,
``sum_k Q_ik^2 kappa0/lam_k (1 - exp(-2 lam_k s))``) stays inside; when it cannot show that, the law
is not valid and :func:`draw` returns ``None``: the caller then runs the clipping integrator of
:mod:`hw_models.langevin.clipping` on the columns at risk instead (``range_fallback`` in the
diagnostics). The checks, cheapest first, each a bound valid at EVERY time (no excursion between
check points escapes them; only a thermal excursion beyond 4 sigma is not caught, and one that
brief moves the time average by little):

0. the log-norm bound (no product): with ``rate = min_i (2 P_ii - sum_j |P_ij|) > 0`` (a
   diagonally dominant programmed matrix, e.g. a well-conditioned G factor),
   ``||exp(-P t)||_inf <= exp(-rate t)``, so ``|x_i(t)| <= ||x0||_inf + ||b||_inf / rate``;
1. the midpoint bound (:func:`midpoint_peak`): every ``exp(-lam_k t)`` lies in ``(0, 1]``, i.e.
   ``1/2 + delta_k`` with ``|delta_k| <= 1/2``, so
   ``|x_i(t)| <= |x* + x0|_i / 2 + (|Q| |d|)_i / 2``: two products, computed in bfloat16 where the
   hardware multiplies it fast (:func:`low_precision_dtype`), with the rounding of the operands and
   the result added to the bound, so the screen never passes a run the exact bound would fail;
2. ``|x*| + ||d||`` and ``|x*| + |Q| |d|`` in the working precision (``0 < exp(-lam t) <= 1`` and
   the rows of ``Q`` have unit norm);
3. :func:`hw_models.langevin.clipping.columns_at_risk`: the mean path bounded per mode on every
   interval between the check times :data:`RAIL_TIMES` and the run's end.

Callers that want the fast law keep the state well inside the rails by scaling their input (the
thermodynamic solver does), and the midpoint bound then passes almost always.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hw_models.langevin import clipping, laws

#: Thermal standard deviations added to the mean path in the rail check.
RAIL_SIGMAS = 4.0
#: Times (tau) at which the last rail check samples the mean path (besides 0; capped at the run's
#: end): the slowest and fastest modes' excursions peak between 1/lambda_max = 1 and the end.
RAIL_TIMES = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)
#: Unit roundoff of bfloat16 (8 significant bits): the rounding allowance of the screen products.
BF16_ROUNDOFF = 2.0**-8
#: Smallest size whose rail screen runs in bfloat16: below it the products are too small for the
#: faster multiply to pay for the conversions.
LOW_PRECISION_MIN = 256


@functools.cache
def low_precision_dtype(device_type: str) -> torch.dtype | None:
    """``torch.bfloat16`` on a CPU whose bfloat16 products are fast and accumulate in float32 (AMX
    or AVX-512 bf16 instructions), else ``None`` (the rail screen then runs in the working
    precision: GPUs, other CPUs). Read from the CPU's feature flags, not timed: deterministic."""
    if device_type != "cpu":  # GPU products are fast in float32, and may reduce in bfloat16
        return None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & flags else None
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class Law:
    """Per-mode coefficients of one (matrix, burn-in, window, kappa0) setting, as tensors
    ``(K, n, 1)`` (``K`` = systems x copies), and what the rail check needs."""

    lam: torch.Tensor
    w: torch.Tensor
    sd: torch.Tensor
    decay: torch.Tensor  # end state: E[u(s)] = decay u0
    gain: torch.Tensor  # Cov[ubar, u(s)] / Var[ubar]
    end_sd: torch.Tensor  # conditional std of u(s) given ubar
    var_sum: float  # per-system sum of the mode variances (mean over copies)
    coord_sd: torch.Tensor | None  # (K, n, 1) largest std per coordinate over the run (rails)
    rail_times: tuple[float, ...] = ()  # where the last rail check samples the mean path
    lam2: torch.Tensor | None = None  # lam^2 (K, n): the diagnostics' weights
    w2: torch.Tensor | None = None  # w^2 (K, n)
    resid_var: torch.Tensor | None = None  # (K,) sum_k lam_k^2 sd_k^2 (the variance's residual)
    screen_Q: torch.Tensor | None = None  # Q and |Q| in the screen's precision (rails)
    screen_absQ: torch.Tensor | None = None
    one_minus_w: torch.Tensor | None = None  # 1 - w (K, n, 1)
    rate: torch.Tensor | None = None  # (K,) CPU min_i (2 P_ii - sum_j |P_ij|), None unless all > 0


def make_law(lam: np.ndarray, Q: torch.Tensor, burn_in: float, window: float, kappa0: float,
             rails: bool, A: torch.Tensor | None = None) -> Law:
    """The :class:`Law` of the programmed spectrum ``lam`` ``(K, n)`` with eigenvectors ``Q``
    (``A``: the programmed matrices, for the rail check's log-norm bound)."""
    w, var = laws.od_time_average(lam, burn_in, window, kappa0)
    decay, var_end, cov = laws.od_end_state(lam, burn_in, window, kappa0)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(var > 0, cov / var, 0.0)
    end_sd = np.sqrt(np.maximum(var_end - gain * cov, 0.0))
    opts = {"dtype": Q.dtype, "device": Q.device}

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x, **opts).unsqueeze(-1)

    coord_sd = screen_Q = screen_absQ = rate = None
    times: tuple[float, ...] = ()
    if rails:
        # the state's variance grows monotonically from a given start, so its largest value over
        # the run is the end's: sum_k Q_ik^2 kappa0/lam_k (1 - exp(-2 lam_k s)) for coordinate i
        coord_sd = torch.sqrt((Q * Q) @ t(var_end))
        end = burn_in + window
        times = tuple(sorted({0.0, *(min(v, end) for v in RAIL_TIMES), end}))
        low = low_precision_dtype(Q.device.type) if Q.shape[-1] >= LOW_PRECISION_MIN else None
        screen_Q = (Q if low is None else Q.to(low)).contiguous()
        screen_absQ = screen_Q.abs().contiguous()
        if A is not None:  # 2 P_ii - sum_j |P_ij| = P_ii - sum_{j != i} |P_ij| for P_ii > 0
            Ad = A.double()
            rate = (2.0 * torch.diagonal(Ad, dim1=-2, dim2=-1) - Ad.abs().sum(dim=-1)).amin(dim=-1).cpu()
            rate = rate if bool((rate > 0).all()) else None  # the bound needs every system dominant
    lam2 = lam**2
    return Law(lam=t(lam), w=t(w), sd=t(np.sqrt(var)), decay=t(decay), gain=t(gain),
               end_sd=t(end_sd), var_sum=float(np.mean(np.sum(var, axis=1))), coord_sd=coord_sd,
               rail_times=times, lam2=torch.as_tensor(lam2, **opts),
               w2=torch.as_tensor(w**2, **opts),
               resid_var=torch.as_tensor(np.sum(lam2 * var, axis=1), **opts),
               screen_Q=screen_Q, screen_absQ=screen_absQ, one_minus_w=t(1.0 - w),
               rate=rate)


def midpoint_peak(law: Law, ustar: torch.Tensor, d: torch.Tensor | None) -> float:
    """An upper bound of ``max |x_i(t)|`` over coordinates, columns and times plus the thermal
    margin (module docs, check 1): ``|Q (u* + d/2)|_i + (|Q| |d|)_i / 2`` (``d = None``: a zero
    start, ``d = -u*``, where it is ``|x*|_i / 2 + (|Q| |u*|)_i / 2``), computed with the law's
    screen matrices, every rounding of the screen's precision added."""
    assert law.screen_Q is not None and law.screen_absQ is not None and law.coord_sd is not None
    Qs, absQ = law.screen_Q, law.screen_absQ
    u = BF16_ROUNDOFF if Qs.dtype != ustar.dtype else float(torch.finfo(ustar.dtype).eps)
    acc = ustar.shape[-2] * float(torch.finfo(torch.float32).eps)  # float32 accumulation
    margin = RAIL_SIGMAS * float(law.coord_sd.amax())
    # Rounding allowances: each operand rounded once (u), the product accumulated (acc, relative to
    # |Q| |v|) and rounded (u); |Q| |v| is itself bounded by the |Q| product over (1 - 2u - acc).
    if d is None:  # a zero start: both products of u*, in place on one rounded copy
        v = ustar.to(Qs.dtype, copy=True)  # a copy even in the working precision: |.| in place
        a = (Qs @ v).abs_()
        b = absQ @ v.abs_()
        ca = 0.5 / (1.0 - u)
        cb = (0.5 + 0.5 * (2.01 * u + acc)) / (1.0 - 3.0 * u - acc)
        # the two scalings and the sum in the screen's precision: three more roundings
        return float(b.mul_(cb).add_(a, alpha=ca).amax()) * (1.0 + u) ** 3 + margin
    mid = ustar + 0.5 * d
    a = (Qs @ mid.to(Qs.dtype)).to(ustar.dtype).abs_()
    b = (absQ @ d.abs().to(Qs.dtype)).to(ustar.dtype)
    slack = torch.linalg.vector_norm(mid, dim=-2, keepdim=True).mul_(2.01 * u + acc)
    a.div_(1.0 - u).add_(slack)
    return float(a.add_(b, alpha=0.5 / (1.0 - 3.0 * u - acc)).amax()) + margin


def log_norm_peak(law: Law, b_max: torch.Tensor, x0_max: torch.Tensor | None) -> float | None:
    """Check 0 of the module docs: ``max_i |x_i(t)|`` over the run is at most
    ``||x0||_inf + ||b||_inf / rate`` per system (plus the thermal margin) when every programmed
    matrix has ``rate > 0``; ``None`` otherwise. ``b_max``, ``x0_max``: ``(K,)`` abs-maxima."""
    if law.rate is None or law.coord_sd is None:
        return None
    peak = b_max.double().cpu() / law.rate
    if x0_max is not None:
        peak = peak + x0_max.double().cpu()
    return float(peak.max()) + RAIL_SIGMAS * float(law.coord_sd.amax())


def within_rails(law: Law, Q: torch.Tensor, ustar: torch.Tensor, d: torch.Tensor | None,
                 state_range: float, b_max: torch.Tensor | None = None,
                 x0_max: torch.Tensor | None = None) -> bool:
    """Whether the run stays inside ``+-state_range`` (module docs: the checks in turn).
    ``d = None`` is a zero start (``d = -u*``); ``b_max`` (and for a start other than zero
    ``x0_max``), ``(K,)``, enable the log-norm bound."""
    assert law.coord_sd is not None
    if b_max is not None and (d is None or x0_max is not None):
        peak = log_norm_peak(law, b_max, x0_max)
        if peak is not None and peak <= state_range:
            return True
    if midpoint_peak(law, ustar, d) <= state_range:
        return True
    if d is None:
        d = -ustar
    margin = RAIL_SIGMAS * law.coord_sd
    # Since 0 < exp(-lam t) <= 1 and Q is orthogonal, every coordinate of
    # x(t) - x* = Q exp(-Lambda t) d is at most ||d|| (the column's 2-norm) and at most (|Q| |d|)_i
    xstar = (Q @ ustar).abs_().add_(margin)
    if float((xstar + d.norm(dim=-2, keepdim=True)).amax()) <= state_range:
        return True
    if float(xstar.add_(Q.abs() @ d.abs()).amax()) <= state_range:
        return True
    # between check points too: the mean path bounded per mode on every interval (clipping module)
    end = law.rail_times[-1] if law.rail_times else 0.0
    return not bool(clipping.columns_at_risk(law.lam, Q, ustar, d, margin, state_range, end).any())


@dataclass
class Draw:
    """One analytic draw: the time averages and (if asked) end states, ``(K, n, m)`` in x-space
    (end states: ``(K, n, len(end_cols))`` when only some columns were asked for), and the bias of
    the mean path in the eigenbasis (``w d``) for the error prediction."""

    mean: torch.Tensor
    eigen: torch.Tensor  # the time averages in the eigenbasis
    end: torch.Tensor | None
    bias2: torch.Tensor  # (K,) squared norm of E[xbar] - x*
    xstar2: torch.Tensor  # (K,) squared norm of x* (of the loaded input)
    resid2: torch.Tensor  # (K,) expected squared residual ||P xbar - b||^2 (bias and variance)
    b2: torch.Tensor  # (K,) squared norm of the loaded input
    read_noise_drawn: bool = False  # the read-out's noise is in ``mean`` already (``read_sd``)


def draw(law: Law, Q: torch.Tensor, B_hw: torch.Tensor, normal: Callable[[tuple[int, ...]],
         torch.Tensor], *, x0: torch.Tensor | None = None, x0_eigen: torch.Tensor | None = None,
         x0_rhs_scale: float | None = None, want_end: bool = False,
         end_cols: torch.Tensor | None = None, state_range: float | None = None,
         read_sd: float = 0.0) -> Draw | None:
    """Draw the time average (and end state) for the loaded inputs ``B_hw`` ``(K, n, m)``.

    The start is ``x0`` (``(K, n, m)``, x-space), or ``x0_eigen`` (eigenbasis), or
    ``x0_rhs_scale * B_hw``, or 0. ``normal(shape)`` draws the thermal noise (the end state's
    conditional noise second). ``end_cols``: the columns whose end state is wanted (default all;
    the others' end states are neither computed nor drawn). ``read_sd``: the read-out's noise
    (std per value); without ``want_end`` it is drawn with the thermal noise, since isotropic noise
    ``read_sd * xi`` added to ``Q U`` is ``Q (read_sd * xi')`` with ``xi' = Q^T xi`` isotropic too:
    each mode's variance grows by ``read_sd**2`` and no second draw is needed
    (``Draw.read_noise_drawn``). Returns ``None`` when ``state_range`` may be exceeded (module
    docs).
    """
    ustar = (Q.transpose(1, 2) @ B_hw).div_(law.lam)
    d: torch.Tensor | None  # None: a zero start, d = -u* (never materialised)
    if x0_eigen is not None:
        d = x0_eigen.to(ustar.dtype) - ustar
    elif x0_rhs_scale is not None:  # x0 = g B: Q^T x0 = g lam u*
        d = ustar * (law.lam * x0_rhs_scale - 1.0)
    elif x0 is not None and bool(x0.count_nonzero()):
        d = (Q.transpose(1, 2) @ x0).sub_(ustar)
    else:
        d = None
    if state_range is not None:
        b_max = x0_max = None
        if law.rate is not None:  # the log-norm bound applies: the loaded input's (and start's) peaks
            b_max = torch.maximum(B_hw.amax(dim=(-2, -1)), B_hw.amin(dim=(-2, -1)).neg())
            if x0 is not None and d is not None and x0_eigen is None and x0_rhs_scale is None:
                x0_max = torch.maximum(x0.amax(dim=(-2, -1)), x0.amin(dim=(-2, -1)).neg())
            elif x0_rhs_scale is not None:
                x0_max = b_max * abs(x0_rhs_scale)
        if not within_rails(law, Q, ustar, d, state_range, b_max=b_max, x0_max=x0_max):
            return None
    fold = read_sd > 0 and not want_end
    noise = normal(tuple(ustar.shape)).mul_(law.sd.square().add(read_sd**2).sqrt_() if fold else law.sd)
    cols = None if end_cols is None else end_cols.to(ustar.device)
    end_noise = None
    if want_end:
        end_noise = noise if cols is None else noise[..., cols]
        end_noise = end_noise.clone()
    # the time average U = u* + w d + noise, in place on the noise
    if d is None:
        assert law.one_minus_w is not None
        U = noise.addcmul_(ustar, law.one_minus_w)
    else:
        U = noise.add_(ustar).addcmul_(law.w, d)
    end = None
    if want_end:
        assert end_noise is not None
        u_c = ustar if cols is None else ustar[..., cols]
        d_c = -u_c if d is None else (d if cols is None else d[..., cols])
        U_end = u_c + law.decay * d_c + law.gain * end_noise \
            + law.end_sd * normal(tuple(u_c.shape))
        end = Q @ U_end
    # the diagnostics from per-mode sums over the columns (one pass each)
    u2 = torch.linalg.vector_norm(ustar, dim=-1).square_()
    d2 = u2 if d is None else torch.linalg.vector_norm(d, dim=-1).square_()
    m = ustar.shape[-1]
    assert law.lam2 is not None and law.w2 is not None and law.resid_var is not None
    bias2 = (law.w2 * d2).sum(dim=-1)
    resid2 = (law.lam2 * law.w2 * d2).sum(dim=-1) + m * law.resid_var
    return Draw(mean=Q @ U, eigen=U, end=end, bias2=bias2, xstar2=u2.sum(dim=-1), resid2=resid2,
                b2=(law.lam2 * u2).sum(dim=-1), read_noise_drawn=fold)
