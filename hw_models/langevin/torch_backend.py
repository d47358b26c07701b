"""Time stepping with torch (CPU or CUDA, float32 or float64).

Every function works on canonical batched tensors (``A``: ``(k, n, n)``, states ``(k, n, m)``)
already on the compute device, and draws all randomness from one ``torch.Generator``.

Performance notes: the Euler-Maruyama state is kept in units of the noise scale ``sigma`` so a
step ``X' = (I - dt A) X + dt b/sigma + Z`` is one ``mm``/``bmm`` into a preallocated buffer, an
in-place Gaussian fill and two in-place adds, plus the running sum -- no allocations. (A plain
``beta=0`` GEMM followed by an add measured faster than ``addmm_`` into the noise buffer.)
Eigenbasis chains draw their noise in blocks and fold the noise scale into the block, so one
step is one ``addcmul_``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from hw_models.noise import NoiseConfig, read_out

_BLOCK_ELEMENTS = 1 << 20


def _block_len(per_step: int, total: int) -> int:
    return int(max(1, min(total, 4096, _BLOCK_ELEMENTS // max(per_step, 1))))


#: Draws of at least this many values on the CPU are split in two halves, each from its own
#: generator (the second seeded from the first), filled concurrently: torch's CPU normal fill is
#: serial and costs about a quarter of an n x n x n product at K-FAC sizes. The split does not
#: depend on the thread count, so a seed gives the same values on any machine.
SPLIT_DRAW = 1 << 17
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """One helper thread per process (made again in a forked child, whose copy has no thread)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="normal"))
    return _POOL[1]


def normal(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device,
           generator: torch.Generator) -> torch.Tensor:
    """Standard normal samples (a large CPU draw in two seeded halves, see :data:`SPLIT_DRAW`)."""
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel < SPLIT_DRAW:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    second = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    out = torch.empty(shape, dtype=dtype, device=device)
    flat, half = out.view(-1), numel // 2
    if torch.get_num_threads() >= 2:
        job = _pool().submit(flat[half:].normal_, generator=second)
        flat[:half].normal_(generator=generator)
        job.result()
    else:
        flat[half:].normal_(generator=second)
        flat[:half].normal_(generator=generator)
    return out


def _noise_sigma(kappa0: float, dt: float, underdamped: bool, friction: float) -> float:
    return math.sqrt(2.0 * kappa0 * dt * (friction if underdamped else 1.0))


def euler_mean(A: torch.Tensor, B: torch.Tensor, X0: torch.Tensor, *, dt: float, kappa0: float,
               n_burn: int, n_avg: int, underdamped: bool, mass: float, friction: float,
               generator: torch.Generator, state_range: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Time average of Euler-Maruyama samples ``t = n_burn+1 .. n_burn+n_avg``; ``(k, n, m)``.

    Returns ``(mean, end state, clipped)``: with ``state_range`` the state is clipped to
    ``+-state_range`` after every step (the rails) and ``clipped`` counts the clipped values.
    """
    k, n, m = B.shape
    sigma = _noise_sigma(kappa0, dt, underdamped, friction)
    scale = sigma if sigma > 0 else 1.0
    has_b = bool(B.count_nonzero())
    if k == 1:  # plain GEMM is faster than a batch of one
        A, B, X0 = A[0], B[0], X0[0]
        mm = torch.mm
    else:
        mm = torch.bmm
    C = B * (dt / scale)
    X = X0 / scale
    S = torch.zeros_like(X)
    N = torch.empty_like(X)
    Y = torch.empty_like(X)
    rail = None if state_range is None else state_range / scale
    clipped = torch.zeros((), dtype=torch.int64, device=X.device)  # no per-step host sync
    if not underdamped:
        P = torch.eye(n, dtype=A.dtype, device=A.device) - dt * A
        for t in range(n_burn + n_avg):
            # X' = (I - dt A) X + dt b / sigma + z, with a beta=0 GEMM (faster than addmm_ into
            # the noise buffer) and two in-place adds
            mm(P, X, out=Y)
            if sigma > 0:
                Y.add_(N.normal_(generator=generator))
            if has_b:
                Y.add_(C)
            if rail is not None:
                clipped += (Y.abs() > rail).sum()
                Y.clamp_(-rail, rail)
            X, Y = Y, X
            if t >= n_burn:
                S.add_(X)
    else:
        c1 = 1.0 - dt * friction / mass
        Pm = torch.zeros_like(X)
        for t in range(n_burn + n_avg):
            mm(A, X, out=Y)  # p' = c1 p - dt (A x - b) + noise;  x' = x + dt p' / M
            Pm.mul_(c1).sub_(Y, alpha=dt)
            if sigma > 0:
                Pm.add_(N.normal_(generator=generator))
            if has_b:
                Pm.add_(C)
            X.add_(Pm, alpha=dt / mass)
            if rail is not None:  # the position saturates; the momentum is not railed
                clipped += (X.abs() > rail).sum()
                X.clamp_(-rail, rail)
            if t >= n_burn:
                S.add_(X)
    S.mul_(scale / n_avg)
    return S.reshape(k, n, m), (X * scale).reshape(k, n, m), int(clipped)


def eig_mean_clipped(coef: np.ndarray, Q: torch.Tensor, ustar: torch.Tensor, U0: torch.Tensor, *,
                     n_burn: int, n_avg: int, state_range: float | None,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact overdamped transitions stepped through the burn-in and the window, the state rotated
    to x-space and clipped to ``+-state_range`` after every step.

    ``coef`` ``(k, n, 2)`` is ``(a, std)`` of one step; ``U0`` the centred start ``Q^T x0 - u*``.
    Returns ``(mean of the x samples, end state, clipped count)`` (all ``(k, n, m)``).
    """
    a, s = _coef(coef, U0)
    Qt = Q.transpose(1, 2)
    U = U0.clone()
    S = torch.zeros_like(U)
    X = Q @ (ustar + U)
    clipped = torch.zeros((), dtype=torch.int64, device=U.device)
    for t in range(n_burn + n_avg):
        U = torch.randn(U.shape, generator=generator, dtype=U.dtype, device=U.device).mul_(s) \
            .addcmul_(a, U)
        X = Q @ (ustar + U)
        if state_range is not None:
            clipped += (X.abs() > state_range).sum()
            X.clamp_(-state_range, state_range)
            U = (Qt @ X).sub_(ustar)
        if t >= n_burn:
            S.add_(X)
    return S / n_avg, X, int(clipped)


def _accumulate(S: torch.Tensor, Y: torch.Tensor, readout: NoiseConfig | None, scale: float,
                generator: torch.Generator) -> int:
    """``S += R R^T`` for the samples ``Y`` ``(k, n, L)`` after the read-out; returns clip count."""
    clipped = 0
    if readout is not None:
        Y, clipped = read_out(Y * scale, readout, dims=(1,), generator=generator)
    S.baddbmm_(Y, Y.transpose(1, 2))
    return clipped


def euler_second_moment(A: torch.Tensor, x0: torch.Tensor, *, dt: float, kappa0: float,
                        n_burn: int, n_avg: int, underdamped: bool, mass: float, friction: float,
                        readout: NoiseConfig | None,
                        generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """``sum_t x_t x_t^T`` over one Euler-Maruyama chain per system (``b = 0``), ``(k, n, n)``.

    With ``readout`` each sample goes through read noise and the ADC before it is accumulated.
    Returns the sum (not yet divided by ``n_avg``) and the number of clipped read-outs.
    """
    k, n, _ = x0.shape
    sigma = _noise_sigma(kappa0, dt, underdamped, friction)
    scale = sigma if sigma > 0 else 1.0
    L = _block_len(k * n, n_burn + n_avg)
    Nb = torch.empty((L, k, n, 1), dtype=A.dtype, device=A.device)
    Xs = torch.empty_like(Nb) if underdamped else Nb
    S = torch.zeros((k, n, n), dtype=A.dtype, device=A.device)
    x = x0 / scale
    p = torch.zeros_like(x)
    c1 = 1.0 - dt * friction / mass
    P = torch.eye(n, dtype=A.dtype, device=A.device) - dt * A
    clipped = 0
    done = 0
    total = n_burn + n_avg
    while done < total:
        # blocks never straddle the end of the burn-in, so a block is either kept or discarded
        Lb = min(L, n_burn - done) if done < n_burn else min(L, total - done)
        if sigma > 0:
            Nb[:Lb].normal_(generator=generator)
        else:
            Nb[:Lb].zero_()
        for t in range(Lb):
            if underdamped:
                p = Nb[t].add_(p, alpha=c1).baddbmm_(A, x, alpha=-dt)
                x = torch.add(x, p, alpha=dt / mass, out=Xs[t])
            else:
                x = Nb[t].baddbmm_(P, x)
        # the next block overwrites the buffers that x and p alias
        x = x.clone()
        p = p.clone()
        if done >= n_burn:
            Y = Xs[:Lb].reshape(Lb, k, n).permute(1, 2, 0)
            clipped += _accumulate(S, Y, readout, scale, generator)
        done += Lb
    if readout is None:
        S.mul_(scale * scale)
    return S, clipped


def _coef(coef: np.ndarray, like: torch.Tensor) -> list[torch.Tensor]:
    t = torch.as_tensor(coef, dtype=like.dtype, device=like.device)
    return [t[..., i : i + 1] for i in range(t.shape[-1])]


def eig_mean(coef: np.ndarray, coef_burn: np.ndarray, U0: torch.Tensor, *, n_avg: int,
             underdamped: bool, generator: torch.Generator) -> torch.Tensor:
    """Mean of ``n_avg`` exact eigenmode samples after an exact burn-in jump; ``(k, n, m)``.

    ``coef`` is ``(k, n, 2)`` = ``(a, std)`` (overdamped) or ``(k, n, 7)`` =
    ``(f11, f12, f21, f22, l11, l21, l22)`` (underdamped, momentum starting at 0); ``U0`` is the
    centred initial state ``Q^T x0 - u*``.
    """
    shape = tuple(U0.shape)
    L = _block_len(int(np.prod(shape)), n_avg)
    opts = {"dtype": U0.dtype, "device": U0.device}
    S = torch.zeros_like(U0)
    if not underdamped:
        a, s = _coef(coef, U0)
        ab, sb = _coef(coef_burn, U0)
        U = ab * U0 + sb * torch.randn(shape, generator=generator, **opts)
        Z = torch.empty((L, *shape), **opts)
        done = 0
        while done < n_avg:
            Lb = min(L, n_avg - done)
            Zb = Z[:Lb]
            Zb.normal_(generator=generator).mul_(s)
            for t in range(Lb):
                U = Zb[t].addcmul_(a, U)  # u' = a u + std z
            S.add_(Zb.sum(dim=0))
            U = U.clone()
            done += Lb
        return S / n_avg
    f11, f12, f21, f22, l11, l21, l22 = _coef(coef, U0)
    g11, g12, g21, g22, m11, m21, m22 = _coef(coef_burn, U0)
    z1 = torch.randn(shape, generator=generator, **opts)
    z2 = torch.randn(shape, generator=generator, **opts)
    U = g11 * U0 + m11 * z1
    P = g21 * U0 + m21 * z1 + m22 * z2
    Z1 = torch.empty((L, *shape), **opts)
    Z2 = torch.empty((L, *shape), **opts)
    done = 0
    while done < n_avg:
        Lb = min(L, n_avg - done)
        Z1[:Lb].normal_(generator=generator)
        Z2[:Lb].normal_(generator=generator)
        Z2[:Lb].mul_(l22).addcmul_(l21, Z1[:Lb])
        Z1[:Lb].mul_(l11)
        for t in range(Lb):
            U_new = Z1[t].addcmul_(f11, U).addcmul_(f12, P)
            P = Z2[t].addcmul_(f21, U).addcmul_(f22, P)
            U = U_new
        S.add_(Z1[:Lb].sum(dim=0))
        U, P = U.clone(), P.clone()
        done += Lb
    return S / n_avg


def eig_second_moment(coef: np.ndarray, coef_burn: np.ndarray, u0: torch.Tensor, Q: torch.Tensor,
                      *, n_avg: int, underdamped: bool, readout: NoiseConfig | None,
                      generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """``sum_t x_t x_t^T`` of one exact chain per system, simulated in the eigenbasis.

    ``u0`` is ``(k, n, 1)`` in the eigenbasis. Without read-out non-idealities the sum is formed
    in the eigenbasis and rotated once (``Q S Q^T``); with them, each block of samples is rotated
    to ``x = Q u`` and read out first. Returns the sum and the clip count.
    """
    k, n, _ = u0.shape
    opts = {"dtype": u0.dtype, "device": u0.device}
    L = _block_len(k * n, n_avg)
    S = torch.zeros((k, n, n), **opts)
    clipped = 0
    if not underdamped:
        a, s = _coef(coef, u0)
        ab, sb = _coef(coef_burn, u0)
        U = ab * u0 + sb * torch.randn(u0.shape, generator=generator, **opts)
    else:
        f11, f12, f21, f22, l11, l21, l22 = _coef(coef, u0)
        g11, g12, g21, g22, m11, m21, m22 = _coef(coef_burn, u0)
        z1 = torch.randn(u0.shape, generator=generator, **opts)
        z2 = torch.randn(u0.shape, generator=generator, **opts)
        U = g11 * u0 + m11 * z1
        P = g21 * u0 + m21 * z1 + m22 * z2
        Z2 = torch.empty((L, k, n, 1), **opts)
    Z = torch.empty((L, k, n, 1), **opts)
    done = 0
    while done < n_avg:
        Lb = min(L, n_avg - done)
        Zb = Z[:Lb]
        Zb.normal_(generator=generator)
        if not underdamped:
            Zb.mul_(s)
            for t in range(Lb):
                U = Zb[t].addcmul_(a, U)
        else:
            Z2b = Z2[:Lb]
            Z2b.normal_(generator=generator).mul_(l22).addcmul_(l21, Zb)
            Zb.mul_(l11)
            for t in range(Lb):
                U_new = Zb[t].addcmul_(f11, U).addcmul_(f12, P)
                P = Z2b[t].addcmul_(f21, U).addcmul_(f22, P)
                U = U_new
            P = P.clone()
        U = U.clone()
        Y = Zb.reshape(Lb, k, n).permute(1, 2, 0)
        if readout is not None:
            clipped += _accumulate(S, torch.bmm(Q, Y), readout, 1.0, generator)
        else:
            S.baddbmm_(Y, Y.transpose(1, 2))
        done += Lb
    if readout is None:
        S = Q @ S @ Q.transpose(1, 2)
    return S, clipped
