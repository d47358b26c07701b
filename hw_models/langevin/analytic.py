"""The analytic integrator's draw, shared by the general simulator and the cached fast path of a
programmed matrix (one code path: the two agree bitwise when they use the same random draws).

Per eigenmode the time average after a burn-in is Gaussian with the mean weight ``w`` and variance
of :func:`hw_models.langevin.laws.od_time_average`; the state at the end of the run is drawn
jointly with it (:func:`hw_models.langevin.laws.od_end_state`), so a caller can continue the
next run from the device's own end state.

**Rails.** With ``NoiseConfig.state_range`` the state saturates at ``+-R``, which the Gaussian law
does not model. Before drawing, :func:`draw` checks the trajectory: the mean path
``x* + Q exp(-Lambda t) d`` (``d = Q^T x0 - u*``) at ``t = 0`` and :data:`RAIL_TIMES` (a
geometric grid up to the run's end) plus ``RAIL_SIGMAS`` standard deviations per coordinate
(the largest over the run, at its end:
``sum_k Q_ik^2 kappa0/lam_k (1 - exp(-2 lam_k s))``). When that reaches ``R`` the law is not valid and
:func:`draw` returns ``None``: the caller then runs the clipping integrator of
:mod:`hw_models.langevin.clipping` on the columns at risk instead (``range_fallback`` in the
diagnostics). A run whose bound ``|x*| + |Q| |d|`` (valid at every time) plus the margin stays
inside passes at once; otherwise :func:`hw_models.langevin.clipping.columns_at_risk` bounds the
mean path per mode on every interval between the check times (conservative: an excursion between
check points is caught); only a thermal excursion beyond 4 sigma is not (one that brief moves the
time average by little). Callers that want the fast law
keep the state well inside the rails by scaling their input (the thermodynamic solver does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hw_models.langevin import clipping, laws

#: Thermal standard deviations added to the mean path in the rail check.
RAIL_SIGMAS = 4.0
#: Times (tau) at which the rail check samples the mean path (besides 0; capped at the run's
#: end): the slowest and fastest modes' excursions peak between 1/lambda_max = 1 and the end.
RAIL_TIMES = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)


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
    rail_times: tuple[float, ...] = ()  # where the rail check samples the mean path


def make_law(lam: np.ndarray, Q: torch.Tensor, burn_in: float, window: float, kappa0: float,
             rails: bool) -> Law:
    """The :class:`Law` of the programmed spectrum ``lam`` ``(K, n)`` with eigenvectors ``Q``."""
    w, var = laws.od_time_average(lam, burn_in, window, kappa0)
    decay, var_end, cov = laws.od_end_state(lam, burn_in, window, kappa0)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(var > 0, cov / var, 0.0)
    end_sd = np.sqrt(np.maximum(var_end - gain * cov, 0.0))
    opts = {"dtype": Q.dtype, "device": Q.device}

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x, **opts).unsqueeze(-1)

    coord_sd = None
    times: tuple[float, ...] = ()
    if rails:
        # the state's variance grows monotonically from a given start, so its largest value over
        # the run is the end's: sum_k Q_ik^2 kappa0/lam_k (1 - exp(-2 lam_k s)) for coordinate i
        coord_sd = torch.sqrt((Q * Q) @ t(var_end))
        end = burn_in + window
        times = tuple(sorted({0.0, *(min(v, end) for v in RAIL_TIMES), end}))
    return Law(lam=t(lam), w=t(w), sd=t(np.sqrt(var)), decay=t(decay), gain=t(gain),
               end_sd=t(end_sd), var_sum=float(np.mean(np.sum(var, axis=1))), coord_sd=coord_sd,
               rail_times=times)


def within_rails(law: Law, Q: torch.Tensor, ustar: torch.Tensor, d: torch.Tensor,
                 state_range: float) -> bool:
    """Whether the run stays inside ``+-state_range`` (module docs): the mean path
    ``x* + Q exp(-Lambda t) d`` over the whole run (bounded between the check times
    :data:`RAIL_TIMES` and the run's end) plus ``RAIL_SIGMAS`` standard deviations per coordinate
    (their largest over the run)."""
    assert law.coord_sd is not None
    margin = RAIL_SIGMAS * law.coord_sd
    # Bounds over the whole run first (one or two products, where the screen below takes one per
    # check time). Since 0 < exp(-lam t) <= 1 and Q is orthogonal, every coordinate of
    # x(t) - x* = Q exp(-Lambda t) d is at most ||d|| (the column's 2-norm) and at most (|Q| |d|)_i,
    # so a run inside either bound cannot leave the rails between check times either.
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
    """One analytic draw: the time averages and (if asked) end states, ``(K, n, m)`` in x-space,
    and the bias of the mean path in the eigenbasis (``w d``) for the error prediction."""

    mean: torch.Tensor
    eigen: torch.Tensor  # the time averages in the eigenbasis
    end: torch.Tensor | None
    bias2: torch.Tensor  # (K,) squared norm of E[xbar] - x*
    xstar2: torch.Tensor  # (K,) squared norm of x* (of the loaded input)
    resid2: torch.Tensor  # (K,) expected squared residual ||P xbar - b||^2 (bias and variance)
    b2: torch.Tensor  # (K,) squared norm of the loaded input


def draw(law: Law, Q: torch.Tensor, B_hw: torch.Tensor, normal: Callable[[tuple[int, ...]],
         torch.Tensor], *, x0: torch.Tensor | None = None, x0_eigen: torch.Tensor | None = None,
         x0_rhs_scale: float | None = None, want_end: bool = False,
         state_range: float | None = None) -> Draw | None:
    """Draw the time average (and end state) for the loaded inputs ``B_hw`` ``(K, n, m)``.

    The start is ``x0`` (``(K, n, m)``, x-space), or ``x0_eigen`` (eigenbasis), or
    ``x0_rhs_scale * B_hw``, or 0. ``normal(shape)`` draws the thermal noise (the end state's
    conditional noise second). Returns ``None`` when ``state_range`` may be exceeded (module docs).
    """
    Qt = Q.transpose(1, 2)
    QtB = Qt @ B_hw
    ustar = QtB / law.lam
    if x0_eigen is not None:
        d = x0_eigen.to(ustar.dtype) - ustar
    elif x0_rhs_scale is not None:
        d = QtB.mul_(x0_rhs_scale).sub_(ustar)
    elif x0 is not None and bool(x0.count_nonzero()):
        d = (Qt @ x0).sub_(ustar)
    else:
        d = -ustar
    if state_range is not None and not within_rails(law, Q, ustar, d, state_range):
        return None
    bias = law.w * d
    noise = law.sd * normal(tuple(ustar.shape))
    U = ustar + bias + noise
    end = None
    if want_end:
        U_end = ustar + law.decay * d + law.gain * noise + law.end_sd * normal(tuple(ustar.shape))
        end = Q @ U_end
    m = ustar.shape[-1]
    lam2 = law.lam.square()
    resid2 = (lam2 * bias.square()).sum(dim=(1, 2)) + m * (lam2 * law.sd.square()).sum(dim=(1, 2))
    return Draw(mean=Q @ U, eigen=U, end=end, bias2=bias.square().sum(dim=(1, 2)),
                xstar2=ustar.square().sum(dim=(1, 2)), resid2=resid2,
                b2=(ustar * law.lam).square().sum(dim=(1, 2)))
