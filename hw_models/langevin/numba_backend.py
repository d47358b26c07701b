"""Time stepping with numba (CPU, parallel over systems and right-hand-side columns).

Randomness: every independent chain (a system's column, or a system's single chain for the
inverse) owns a xoshiro256+ stream seeded by splitmix64 from ``(key, stream index)``, and
draws normals with a 256-layer ziggurat. Results therefore depend on the seed only, not on the
number of threads or on scheduling. numba's own ``np.random`` is not used: its per-thread
states make parallel results depend on scheduling, and Box-Muller costs a log, a sqrt and a
sin/cos per pair where the ziggurat needs one 64-bit draw and a compare ~99% of the time.

Kernels are compiled with ``cache=True`` (numba falls back to its user cache directory when the
package directory is not writable) and specialise on the array dtype (float32 or float64).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# ---------------------------------------------------------------------------------------------
# random streams

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        z = x.copy()
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return x, z ^ (z >> np.uint64(31))


def make_streams(key: int, n_streams: int) -> np.ndarray:
    """``(n_streams, 4)`` xoshiro256+ states for streams ``0..n_streams-1`` of ``key``."""
    with np.errstate(over="ignore"):
        x = np.full(n_streams, np.uint64(key % 2**64), dtype=np.uint64)
        x = x * _MIX2 + np.arange(n_streams, dtype=np.uint64) * _MIX1
    state = np.empty((n_streams, 4), dtype=np.uint64)
    for i in range(4):
        x, state[:, i] = _splitmix(x)
    state[np.all(state == 0, axis=1), 0] = np.uint64(1)  # the all-zero state is forbidden
    return state


def _ziggurat_tables(layers: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer edges ``x`` (``x[0]`` is the base width, ``x[1] = r``, ``x[layers] = 0``), ratios
    ``x[i+1]/x[i]`` and densities ``f(x[i]) = exp(-x[i]**2/2)`` of the half-normal ziggurat."""

    def build(r: float) -> tuple[np.ndarray, float]:
        f = math.exp(-0.5 * r * r)
        v = r * f + math.sqrt(math.pi / 2.0) * math.erfc(r / math.sqrt(2.0))
        x = np.zeros(layers + 1)
        x[0], x[1] = v / f, r
        for i in range(1, layers - 1):
            arg = math.exp(-0.5 * x[i] ** 2) + v / x[i]
            if arg >= 1.0:
                return x, math.inf  # r too small: the layers reach the top too early
            x[i + 1] = math.sqrt(-2.0 * math.log(arg))
        return x, math.exp(-0.5 * x[layers - 1] ** 2) + v / x[layers - 1] - 1.0

    lo, hi = 2.0, 5.0  # residual is +inf/positive for small r and negative for large r
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if build(mid)[1] > 0:
            lo = mid
        else:
            hi = mid
    x, _ = build(hi)
    x[layers] = 0.0
    ratio = x[1:] / x[:-1]
    dens = np.exp(-0.5 * x**2)
    return x, ratio, dens


ZIG_X, ZIG_R, ZIG_F = _ziggurat_tables()
_U53 = 1.0 / 9007199254740992.0  # 2**-53


@njit(cache=True, inline="always")
def _next(s0, s1, s2, s3):
    result = s0 + s3
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = (s3 << np.uint64(45)) | (s3 >> np.uint64(19))
    return result, s0, s1, s2, s3


@njit(cache=True, inline="always")
def _uniform(s0, s1, s2, s3):
    r, s0, s1, s2, s3 = _next(s0, s1, s2, s3)
    return np.float64(r >> np.uint64(11)) * _U53, s0, s1, s2, s3


@njit(cache=True, inline="always")
def _normal(s0, s1, s2, s3, zx, zr, zf):
    while True:
        r, s0, s1, s2, s3 = _next(s0, s1, s2, s3)
        i = np.int64(r & np.uint64(255))
        negative = (r >> np.uint64(8)) & np.uint64(1)
        u = np.float64(r >> np.uint64(11)) * _U53
        x = u * zx[i]
        if u < zr[i]:  # inside the rectangle that lies wholly under the density
            return (-x if negative else x), s0, s1, s2, s3
        if i == 0:  # tail beyond r (Marsaglia 1964)
            rr = zx[1]
            while True:
                u1, s0, s1, s2, s3 = _uniform(s0, s1, s2, s3)
                u2, s0, s1, s2, s3 = _uniform(s0, s1, s2, s3)
                e1 = -math.log(1.0 - u1) / rr
                e2 = -math.log(1.0 - u2)
                if e2 + e2 > e1 * e1:
                    break
            x = rr + e1
            return (-x if negative else x), s0, s1, s2, s3
        v, s0, s1, s2, s3 = _uniform(s0, s1, s2, s3)
        if zf[i] + v * (zf[i + 1] - zf[i]) < math.exp(-0.5 * x * x):  # wedge
            return (-x if negative else x), s0, s1, s2, s3


@njit(cache=True)
def _fill(buf, st, zx, zr, zf):
    """Fill the 1-D ``buf`` with standard normals from the stream state ``st`` (uint64[4]).

    The only place ``_normal`` is inlined: kernels call this once per step, which keeps their
    compile time short while the generator itself stays inlined and register-resident.
    """
    s0, s1, s2, s3 = st[0], st[1], st[2], st[3]
    for j in range(buf.shape[0]):
        z, s0, s1, s2, s3 = _normal(s0, s1, s2, s3, zx, zr, zf)
        buf[j] = z
    st[0], st[1], st[2], st[3] = s0, s1, s2, s3


@njit(cache=True, parallel=True)
def fill_normal(out, states, zx, zr, zf):
    """Fill row ``i`` of the 2-D ``out`` from stream ``i``."""
    for i in prange(out.shape[0]):
        _fill(out[i], states[i], zx, zr, zf)


# ---------------------------------------------------------------------------------------------
# read-out (read noise + ADC) of one sample vector, in place


@njit(cache=True)
def _read_out(v, tmp, read_noise, levels, bound, stochastic, st, zx, zr, zf):
    """Read noise then ADC on ``v`` in place; ``levels = 0``: no ADC; ``bound <= 0``: abs-max
    range. ``tmp`` is scratch of ``v``'s length. Returns the number of clipped values."""
    n = v.shape[0]
    clipped = 0
    if read_noise > 0.0:
        _fill(tmp, st, zx, zr, zf)
        for r in range(n):
            v[r] += read_noise * tmp[r]
    if levels > 0.0:
        span = bound
        if bound <= 0.0:
            span = 0.0
            for r in range(n):
                span = max(span, abs(v[r]))
        else:
            for r in range(n):
                if abs(v[r]) > bound:
                    clipped += 1
        if span > 0.0:
            step = span / levels
            s0, s1, s2, s3 = st[0], st[1], st[2], st[3]
            for r in range(n):
                q = v[r] / step
                if stochastic:
                    u, s0, s1, s2, s3 = _uniform(s0, s1, s2, s3)
                    q = math.floor(q + u)
                else:
                    q = np.rint(q)
                q = min(max(q, -levels), levels)
                v[r] = q * step
            st[0], st[1], st[2], st[3] = s0, s1, s2, s3
    return clipped


# ---------------------------------------------------------------------------------------------
# Euler-Maruyama


@njit(cache=True, fastmath=True)
def _euler_block(At, Bt, X, j0, stream0, dt, sigma, c1, dt_m, underdamped, n_burn, n_avg, states,
                 zx, zr, zf, out):
    """Euler-Maruyama for the columns ``j0 .. j0 + len(X)`` of one system, all steps.

    ``At`` is ``A^T`` (``n x n``), ``X`` the block's initial states (``mb x n``, one row per
    column, modified), ``Bt``/``out`` the system's ``(m, n)`` drive and mean. The product
    ``Y = X A^T`` is one BLAS GEMM per step (the caller limits BLAS to one thread: measured
    ~16x faster than explicit loops even for 32 x 32 blocks). Column ``j`` draws from stream
    ``stream0 + j - j0``.
    """
    mb, n = X.shape
    P = np.zeros_like(X)
    Y = np.empty_like(X)
    S = np.zeros_like(X)
    z = np.empty(n)
    for step in range(n_burn + n_avg):
        np.dot(X, At, Y)
        keep = step >= n_burn
        for j in range(mb):
            _fill(z, states[stream0 + j], zx, zr, zf)
            for r in range(n):
                g = Y[j, r] - Bt[j0 + j, r]
                if underdamped:
                    P[j, r] = c1 * P[j, r] - dt * g + sigma * z[r]
                    X[j, r] += dt_m * P[j, r]
                else:
                    X[j, r] += sigma * z[r] - dt * g
            if keep:
                for r in range(n):
                    S[j, r] += X[j, r]
    for j in range(mb):
        for r in range(n):
            out[j0 + j, r] = S[j, r] / n_avg


@njit(cache=True, parallel=True)
def euler_mean(At, Bt, X0t, dt, sigma, c1, dt_m, underdamped, n_burn, n_avg, block, states, zx,
               zr, zf, out):
    """Time average of Euler-Maruyama chains, one task per (system, block of columns).

    ``At`` is ``(k, n, n)`` = ``A^T`` per system; ``Bt``/``X0t``/``out`` are ``(k, m, n)``. Blocks
    evolve independently through all steps, so there is no synchronisation per step. Column
    ``j`` of system ``i`` uses stream ``i*m + j`` whatever the blocking, so the result does not
    depend on ``block`` or on the number of threads (up to BLAS rounding).
    """
    k, m, n = Bt.shape
    n_blocks = (m + block - 1) // block
    for task in prange(k * n_blocks):
        i = task // n_blocks
        j0 = (task % n_blocks) * block
        j1 = min(m, j0 + block)
        _euler_block(At[i], Bt[i], X0t[i, j0:j1].copy(), j0, i * m + j0, dt, sigma, c1, dt_m,
                     underdamped, n_burn, n_avg, states, zx, zr, zf, out[i])


@njit(cache=True)
def _accumulate_block(S, block, count):
    """``S += block[:count]^T block[:count]`` (``block`` is ``(L, n)``, one sample per row)."""
    rows = block[:count]
    S += np.dot(rows.T, rows)


@njit(cache=True, fastmath=True)
def _euler_moment_chain(A, i, x, dt, sigma, c1, dt_m, underdamped, n_burn, n_avg, block_len,
                        read_noise, levels, bound, stochastic, st, zx, zr, zf, S):
    """One Euler chain (``b = 0``) of system ``i``; ``S += sum x x^T``; returns clipped count.

    The mat-vec is a BLAS gemv and the samples are accumulated a block at a time with one GEMM
    (the caller limits BLAS to one thread per numba thread).
    """
    n = x.shape[0]
    Ai = A[i]
    p = np.zeros_like(x)
    g = np.empty_like(x)
    z = np.empty(n)
    block = np.empty((block_len, n), dtype=S.dtype)
    fill = 0
    n_clip = 0
    for step in range(n_burn + n_avg):
        np.dot(Ai, x, g)
        _fill(z, st, zx, zr, zf)
        if underdamped:
            for r in range(n):
                p[r] = c1 * p[r] - dt * g[r] + sigma * z[r]
                x[r] += dt_m * p[r]
        else:
            for r in range(n):
                x[r] += sigma * z[r] - dt * g[r]
        if step >= n_burn:
            v = block[fill]
            for r in range(n):
                v[r] = x[r]
            n_clip += _read_out(v, z, read_noise, levels, bound, stochastic, st, zx, zr, zf)
            fill += 1
            if fill == block_len or step == n_burn + n_avg - 1:
                _accumulate_block(S, block, fill)
                fill = 0
    return n_clip


@njit(cache=True, parallel=True)
def euler_second_moment(A, x0, dt, sigma, c1, dt_m, underdamped, n_burn, n_avg, block_len,
                        read_noise, levels, bound, stochastic, states, zx, zr, zf, out, clipped):
    """``sum_t x_t x_t^T`` of one Euler chain per system (``b = 0``); ``out`` is ``(k, n, n)``.

    Samples go through the read-out (``levels = 0``: no ADC; ``bound <= 0``: abs-max range),
    are buffered ``block_len`` at a time and accumulated block-wise. Stream ``i`` per system.
    """
    for i in prange(x0.shape[0]):
        out[i] = 0.0
        clipped[i] = _euler_moment_chain(A, i, x0[i].copy(), dt, sigma, c1, dt_m, underdamped,
                                         n_burn, n_avg, block_len, read_noise, levels, bound,
                                         stochastic, states[i], zx, zr, zf, out[i])


# ---------------------------------------------------------------------------------------------
# exact transitions in the eigenbasis


@njit(cache=True)
def _eig_step(coef, i, u, p, z, z2, underdamped):
    """One exact step of every mode of system ``i``; ``z``/``z2`` hold fresh normals."""
    n = u.shape[0]
    if underdamped:
        for r in range(n):
            uo = u[r]
            po = p[r]
            u[r] = coef[i, r, 0] * uo + coef[i, r, 1] * po + coef[i, r, 4] * z[r]
            p[r] = coef[i, r, 2] * uo + coef[i, r, 3] * po + coef[i, r, 5] * z[r] + \
                coef[i, r, 6] * z2[r]
    else:
        for r in range(n):
            u[r] = coef[i, r, 0] * u[r] + coef[i, r, 1] * z[r]


@njit(cache=True, fastmath=True)
def _eig_mean_chain(coef, coef_burn, i, u, n_avg, underdamped, st, zx, zr, zf, out):
    n = u.shape[0]
    p = np.zeros(n)
    z = np.empty(n)
    z2 = np.empty(n)
    acc = np.zeros(n)
    _fill(z, st, zx, zr, zf)
    if underdamped:
        _fill(z2, st, zx, zr, zf)
    _eig_step(coef_burn, i, u, p, z, z2, underdamped)
    for _ in range(n_avg):
        _fill(z, st, zx, zr, zf)
        if underdamped:
            _fill(z2, st, zx, zr, zf)
        _eig_step(coef, i, u, p, z, z2, underdamped)
        for r in range(n):
            acc[r] += u[r]
    for r in range(n):
        out[r] = acc[r] / n_avg


@njit(cache=True, parallel=True)
def eig_mean(coef, coef_burn, U0t, n_avg, underdamped, states, zx, zr, zf, out):
    """Mean of ``n_avg`` exact eigenmode samples after an exact burn-in jump.

    ``coef``: ``(k, n, 2)`` = ``(a, std)`` or ``(k, n, 7)`` = ``(f11, f12, f21, f22, l11, l21,
    l22)``; ``U0t``/``out``: ``(k, m, n)``; stream ``i*m + j``.
    """
    k, m, n = U0t.shape
    for task in prange(k * m):
        i = task // m
        j = task % m
        _eig_mean_chain(coef, coef_burn, i, U0t[i, j].astype(np.float64), n_avg, underdamped,
                        states[task], zx, zr, zf, out[i, j])


@njit(cache=True, fastmath=True)
def _eig_moment_chain(coef, coef_burn, i, u, Q, rotate, n_avg, underdamped, block_len,
                      read_noise, levels, bound, stochastic, st, zx, zr, zf, S):
    n = u.shape[0]
    p = np.zeros(n)
    z = np.empty(n)
    z2 = np.empty(n)
    uc = np.empty(n, dtype=S.dtype)
    block = np.empty((block_len, n), dtype=S.dtype)
    Qi = Q[i]
    fill = 0
    n_clip = 0
    _fill(z, st, zx, zr, zf)
    if underdamped:
        _fill(z2, st, zx, zr, zf)
    _eig_step(coef_burn, i, u, p, z, z2, underdamped)
    for step in range(n_avg):
        _fill(z, st, zx, zr, zf)
        if underdamped:
            _fill(z2, st, zx, zr, zf)
        _eig_step(coef, i, u, p, z, z2, underdamped)
        v = block[fill]
        if rotate:
            for r in range(n):
                uc[r] = u[r]
            np.dot(Qi, uc, v)
            n_clip += _read_out(v, z, read_noise, levels, bound, stochastic, st, zx, zr, zf)
        else:
            for r in range(n):
                v[r] = u[r]
        fill += 1
        if fill == block_len or step == n_avg - 1:
            _accumulate_block(S, block, fill)
            fill = 0
    return n_clip


@njit(cache=True, parallel=True)
def eig_second_moment(coef, coef_burn, u0, Q, rotate, n_avg, underdamped, block_len, read_noise,
                      levels, bound, stochastic, states, zx, zr, zf, out, clipped):
    """``sum_t x_t x_t^T`` of one exact chain per system, simulated in the eigenbasis.

    With ``rotate`` each sample is rotated to ``x = Q u`` and read out before accumulation;
    otherwise the eigenbasis sum is returned (the caller rotates it once). Stream ``i``.
    """
    for i in prange(u0.shape[0]):
        out[i] = 0.0
        clipped[i] = _eig_moment_chain(coef, coef_burn, i, u0[i].astype(np.float64), Q, rotate,
                                       n_avg, underdamped, block_len, read_noise, levels, bound,
                                       stochastic, states[i], zx, zr, zf, out[i])

