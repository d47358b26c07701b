"""The rails: which columns of a solve may reach them, and the clipping integrator that runs those.

**Rail check** (:func:`columns_at_risk`). The mean path of a column is
``x(t) = x* + Q exp(-Lambda t) d`` (``d = Q^T x0 - u*``). On an interval ``[a, b]`` every mode's
factor ``exp(-lam_k t)`` lies between ``e_b = exp(-lam_k b)`` and ``e_a = exp(-lam_k a)``, so the
mode's term is ``d_k`` times the centre ``(e_a + e_b)/2`` plus at most ``|d_k| (e_a - e_b)/2``;
through ``Q`` (interval arithmetic in centre-radius form, exact for a linear map of a box)::

    max_{t in [a, b]} |x_i(t)| <= |x* + Q (d (e_a + e_b)/2)|_i + (|Q| (|d| (e_a - e_b)/2))_i

a bound valid at EVERY time of the interval. The run is checked on ``[0, end]`` split at a
geometric grid (:data:`GRID_PER_DECADE`). The centre term is the mean of the path's values at the
interval's ends (one product per check time, as a point check costs), and the radius term is at
most ``||d (e_a - e_b)/2||`` (the rows of ``Q`` have unit norm): no product. Only an interval
this cannot clear gets the exact radius (a product, for its columns only), and is then bisected
until the bound clears it, the mean path itself at an end point reaches the rail (the column is
at risk), or :data:`MAX_DEPTH` bisections leave it undecided (at risk: the check is
conservative). The thermal margin is ``RAIL_SIGMAS`` of the coordinate's largest standard
deviation over the run (the caller's).

**Clipping integrator** (:func:`clipped_mean`). Exact transitions of the overdamped modes over a
step ``h``, the state rotated to x-space and clipped to ``+-R`` after every step, the time average
by the trapezoid rule over the step states. A clipped coordinate left the rail during the step and
pushed the others through the couplings; that push is taken back to first order (the others get
``+ h/2 P (x - clip(x))``, the clipped excess growing linearly over the step), so what remains of
the step error is second order in ``h``. The step is chosen for the rails (:func:`run_clipped`):
a companion chain steps ``2h`` on the same Brownian path (its noise is the two fine steps'
combined), and the difference of the two averages over 3 (second order) estimates the fine
chain's error; from ``h = START_STEP / lambda_max`` the step shrinks until that estimate is below
``RAIL_STEP_FACTOR`` thermal standard deviations of the time average (the norm per column, and at
least ``REL_FLOOR ||x*||``). Runs are bounded to :data:`MAX_WORK` multiply-adds (the step is then
coarsened and ``step_ok`` is False). Every column is stepped at once (batched products), with the
noise of :data:`NOISE_BLOCK` steps drawn in one call; the rail fallback runs only the columns
:func:`columns_at_risk` names.

``saturated`` counts the time the drift holds a coordinate on a rail: per clipped (or railed)
coordinate and step, the share of the noise-free step from its start to beyond the rail (all of
it from the rail when the drift points outward). Without noise this is the time on the rail; a
thermal touch counts only its drift's share, so the fraction does not grow as the step shrinks
(an Euler run's count of clipped steps does: under noise it scales with the square root of its
step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hw_models.langevin import laws

#: bisections of a check interval before a column is declared at risk (undecided: conservative)
MAX_DEPTH = 24
#: the check grid: 0, then this many geometric points per decade up to the run's end
GRID_PER_DECADE = 2
#: the step error allowed in the time average, in thermal standard deviations of it
RAIL_STEP_FACTOR = 0.5
#: ... and at least this fraction of the solution's norm (a noiseless run has no thermal scale)
REL_FLOOR = 1e-4
#: the first step tried, in 1/lambda_max
START_STEP = 0.5
#: at most this many multiply-adds per clipped run (n^2 columns per step, two products)
MAX_WORK = 4e10
#: steps whose noise is drawn in one call
NOISE_BLOCK = 256


def _grid(end: float, lam_max: float) -> list[float]:
    """Check times: 0, then geometric from a quarter of the fastest mode's time to ``end``."""
    if end <= 0:
        return [0.0]
    start = min(0.25 / max(lam_max, 1e-300), end)
    count = max(1, int(math.ceil(GRID_PER_DECADE * math.log10(end / start))))
    return [0.0, *np.geomspace(start, end, count + 1).tolist()]


def columns_at_risk(lam: torch.Tensor, Q: torch.Tensor, ustar: torch.Tensor, d: torch.Tensor,
                    margin: torch.Tensor, state_range: float, end: float) -> torch.Tensor:
    """Columns whose mean path plus ``margin`` may reach ``+-state_range`` at some time in
    ``[0, end]`` (module docs); ``(m,)`` bool over the columns of ``(K, n, m)`` eigenbasis
    ``ustar`` and ``d`` (``lam``: ``(K, n, 1)``, ``margin``: ``(K, n, 1)``)."""
    m = ustar.shape[-1]
    limit = state_range - margin
    risk = torch.zeros(m, dtype=torch.bool, device=ustar.device)
    if bool((limit <= 0).any()):
        return ~risk
    xs = Q @ ustar

    def point(t: float, cols: torch.Tensor) -> torch.Tensor:
        x = xs[..., cols] + Q @ (d[..., cols] * torch.exp(-lam * t))
        return (x.abs() > limit).flatten(0, 1).any(dim=0)

    # First pass, one product per check time: ``z = max_i (|x_i(t)| - limit_i)`` per column at the
    # check times; on an interval the box's centre is the mean of its end values (the path is
    # linear in the exponentials), so its excess is at most max(z_a, z_b), and the radius is at
    # most ||d (e_a - e_b)/2|| (Q's rows have unit norm): a vector product, no matrix one. The
    # intervals this cannot clear go to the exact bound (bisected) below, for their columns only.
    d2 = d.square()
    stack = []
    prev: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for t in _grid(end, float(lam.max())):
        e = torch.exp(-lam * t)
        z = torch.baddbmm(xs, Q, d * e).abs_().sub_(limit).amax(dim=-2)  # (K, m)
        risk |= (z > 0).any(dim=0)
        if prev is not None:
            t0, z0, e0 = prev
            rad = (0.5 * (e0 - e)).square_().transpose(1, 2).bmm(d2).sqrt_().squeeze(1)  # (K, m)
            bad = (torch.maximum(z0, z).add_(rad) > 0).any(dim=0) & ~risk
            if bool(bad.any()):
                stack.append((t0, t, bad.nonzero().squeeze(1), 0))
        prev = (t, z, e)
    Qa = Q.abs() if stack else Q
    while stack:
        a, b, cols, depth = stack.pop()
        cols = cols[~risk[cols]]
        if cols.numel() == 0:
            continue
        ea, eb = torch.exp(-lam * a), torch.exp(-lam * b)
        bound = (xs[..., cols] + Q @ (d[..., cols] * (0.5 * (ea + eb)))).abs_() \
            .add_(Qa @ (d[..., cols].abs() * (0.5 * (ea - eb))))
        bad = (bound > limit).flatten(0, 1).any(dim=0)
        if not bool(bad.any()):
            continue
        cols = cols[bad]
        hit = point(a, cols) | point(b, cols)
        risk[cols[hit]] = True
        cols = cols[~hit]
        if cols.numel() == 0:
            continue
        if depth >= MAX_DEPTH:
            risk[cols] = True
            continue
        mid = 0.5 * (a + b) if a <= 0 else math.sqrt(a * b)
        stack += [(a, mid, cols, depth + 1), (mid, b, cols, depth + 1)]
    return risk


@dataclass
class ClippedRun:
    """The clipping integrator's result: the time average and end state ``(K, n, m)`` (x-space),
    the state values spent on a rail, the step and step counts, the step error estimate (largest
    over the columns, norm of the average) against its tolerance, and whether the step met it
    (``False``: :data:`MAX_WORK` stopped the refinement, or a fixed step missed it)."""

    mean: torch.Tensor
    end: torch.Tensor
    saturated: float
    dt: float
    n_burn: int
    n_avg: int
    step_error: float
    tolerance: float
    step_ok: bool
    columns: int = 0  # the columns it ran (set by a caller that ran only some)


def _even(x: float) -> int:
    return 2 * max(1, math.ceil(x / 2.0 - 1e-9))


def steps_for(h: float, burn_in: float, window: float, per_step: float) -> tuple[float, int, int, bool]:
    """``(dt, n_burn, n_avg, within budget)``: the window and the burn-in each divided into an even
    number of steps of at most ``h`` (``dt``: the window's); coarsened to
    :data:`MAX_WORK` multiply-adds at ``per_step`` each (the companion's steps count half)."""
    budget = max(int(MAX_WORK // (1.5 * per_step)), 4)
    ok = True
    while True:
        n_avg = _even(window / h)
        n_burn = _even(burn_in / h) if burn_in > 0 else 0
        if n_burn + n_avg <= budget or n_avg <= 2:
            return window / n_avg, n_burn, n_avg, ok
        ok = False
        h *= 1.25


def run_clipped(lam: np.ndarray, Q: torch.Tensor, P: torch.Tensor, ustar: torch.Tensor,
                U0: torch.Tensor, *, kappa0: float, burn_in: float, window: float, state_range: float,
                normal: Callable[[tuple[int, ...]], torch.Tensor], var_sum: float,
                dt: float | None = None) -> ClippedRun:
    """The clipping integrator with its step chosen for the rails (module docs): ``dt`` fixed,
    or (``None``) from ``START_STEP / lambda_max`` refined until the step error estimate of every
    column is below the tolerance ``RAIL_STEP_FACTOR sqrt(var_sum)`` (the time average's thermal
    standard deviation; ``var_sum`` the sum of its mode variances per column)."""
    K, n, m = ustar.shape
    per_step = 2.0 * K * n * n * max(m, 1)
    xs_norm = float((Q @ ustar).norm(dim=1).amax()) if m else 0.0
    tol = max(RAIL_STEP_FACTOR * math.sqrt(max(var_sum, 0.0)), REL_FLOOR * xs_norm)
    lam_max = float(np.max(lam))
    h = START_STEP / max(lam_max, 1e-300) if dt is None else float(dt)
    while True:
        if dt is None:
            step, n_burn, n_avg, ok = steps_for(h, burn_in, window, per_step)
        else:
            n_avg = _even(window / h)
            step = window / n_avg
            n_burn, ok = (_even(burn_in / h) if burn_in > 0 else 0), True
        mean, end, sat, coarse = clipped_mean(lam, Q, P, ustar, U0, kappa0=kappa0, burn_in=burn_in,
                                              window=window, n_burn=n_burn, n_avg=n_avg,
                                              state_range=state_range, normal=normal, companion=True)
        # a second-order scheme: the fine chain's error is about a third of the difference
        err = float((mean - coarse).norm(dim=1).amax()) / 3.0 if m else 0.0
        if err <= tol or not ok or dt is not None:
            return ClippedRun(mean, end, sat, step, n_burn, n_avg, err, tol, err <= tol, m)
        h = step * min(0.7, max(0.125, 0.9 * math.sqrt(tol / err)))


class _Chain:
    """One clipped chain of the integrator (its state, average and rail time)."""

    def __init__(self, Q: torch.Tensor, P: torch.Tensor, ustar: torch.Tensor, U0: torch.Tensor,
                 R: float) -> None:
        self.Q, self.Qt, self.P, self.ustar, self.R = Q, Q.transpose(1, 2), P, ustar, R
        self.X = (Q @ (ustar + U0)).clamp_(-R, R)
        self.U = (self.Qt @ self.X).sub_(ustar)
        self.S = torch.zeros_like(self.X)
        self.pinned = torch.zeros(self.X.shape, dtype=torch.bool, device=self.X.device)
        self.saturated = torch.zeros((), dtype=self.X.dtype, device=self.X.device)

    def step(self, a: torch.Tensor, noise: torch.Tensor, h: float, average: bool) -> None:
        """One exact transition over ``h``, ``U' = a U + noise``, then the rails (module docs)."""
        R, prev, drift = self.R, self.X, a * self.U
        self.U = noise.add(drift)
        X = self.Q @ (self.ustar + self.U)
        over = X.abs() > R
        if bool(over.any()):
            Xc = X.clamp(-R, R)
            excess = X - Xc
            # the time the drift held the coordinate on the rail this step: the share of the
            # noise-free path from the step's start to beyond the rail (all of it from the rail)
            e = ((self.Q @ (self.ustar + drift)).abs_() - R).clamp_min_(0.0)
            gap = (R - prev.abs()).clamp_min_(0.0)
            share = e / (gap + e).clamp_min_(1e-300)
            self.saturated += share[over | self.pinned].sum()
            # the clipped excess grew over the step and pushed the free coordinates through the
            # couplings: take that push back (first order: a linearly growing excess)
            X = torch.where(over, Xc, (self.P @ excess).mul_(0.5 * h).add_(Xc)).clamp_(-R, R)
            self.U = (self.Qt @ X).sub_(self.ustar)
            self.pinned = over
        elif bool(self.pinned.any()):
            self.pinned = over
        if average:  # trapezoid: half the states at the step's two ends
            self.S.add_(prev).add_(X)
        self.X = X


def clipped_mean(lam: np.ndarray, Q: torch.Tensor, P: torch.Tensor, ustar: torch.Tensor,
                 U0: torch.Tensor, *, kappa0: float, burn_in: float, window: float, n_burn: int,
                 n_avg: int, state_range: float, normal: Callable[[tuple[int, ...]], torch.Tensor],
                 companion: bool = False) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """Run the clipping integrator (module docs) from the centred start ``U0 = Q^T x0 - u*``.

    ``lam`` ``(K, n)`` and ``Q`` ``(K, n, n)`` are the spectrum of the programmed ``P``
    ``(K, n, n)``; ``ustar``, ``U0`` ``(K, n, m)``. The burn-in runs ``n_burn`` steps of
    ``burn_in / n_burn``, the average covers ``n_avg`` steps of ``window / n_avg`` (trapezoid
    rule): both exactly their length. With ``companion`` (``n_burn`` and ``n_avg`` even) a second
    chain steps ``2 dt`` on the same Brownian path (its noise is the two fine steps' combined),
    whose average's distance to this one estimates the step error. Returns ``(time average, end
    state, saturated, companion average or None)``, x-space; ``saturated`` is the number of state
    values (coordinate x step) the drift held on a rail, counting a step's share (module docs).
    """
    if companion and (n_burn % 2 or n_avg % 2):
        raise ValueError(f"a companion chain needs even step counts; got n_burn={n_burn}, n_avg={n_avg}")
    opts = {"dtype": U0.dtype, "device": U0.device}
    R = float(state_range)
    fine = _Chain(Q, P, ustar, U0, R)
    coarse = _Chain(Q, P, ustar, U0, R) if companion else None
    for steps, length, average in ((n_burn, burn_in, False), (n_avg, window, True)):
        if steps <= 0:
            continue
        h = length / steps
        a_np, s_np = laws.od_transition(lam, h, kappa0)
        a = torch.as_tensor(a_np, **opts).unsqueeze(-1)
        s = torch.as_tensor(s_np, **opts).unsqueeze(-1)
        a2 = a * a
        done = 0
        while done < steps:
            block = min(NOISE_BLOCK, steps - done)
            Z = normal((block, *U0.shape)).to(**opts).mul_(s)
            for j in range(block):
                fine.step(a, Z[j], h, average)
                if coarse is not None and (done + j) % 2 == 1:  # U(t+2h) = a^2 U + a z_1 + z_2
                    coarse.step(a2, Z[j - 1].mul(a).add_(Z[j]), 2.0 * h, average)
            done += block
    other = None if coarse is None else coarse.S.mul_(1.0 / n_avg)
    return fine.S.mul_(0.5 / n_avg), fine.X, float(fine.saturated), other
