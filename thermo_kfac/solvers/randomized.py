"""Randomized low-rank K-FAC solvers (Puiu, arXiv 2206.15397): RS-KFAC and SRE-KFAC.

The exponentially averaged factors of K-FAC have a fast-decaying spectrum, so each factor ``M`` is
replaced by a rank-``r`` eigen-approximation ``U diag(d) U^T`` found by a randomized sketch with
``r + oversample`` columns and ``power_iters`` power iterations. The damped inverse is applied
without forming a dense inverse::

    (U diag(d) U^T + l I)^-1 V = U [(d + l)^-1 - 1/l] U^T V + V / l

which costs ``O(d_out d_in r)`` per step instead of the ``O(d^3)`` eigendecomposition per update.

* ``"rsvd"``: randomized SVD. Range finder ``Q`` of ``M`` (power iterations with ``M M^T``,
  re-orthonormalized), then the SVD of the small ``Q^T M``; keeps the top right singular vectors.
* ``"sre"``: symmetric randomized eigendecomposition. Gaussian sketch, ``power_iters``
  applications of ``M`` (re-orthonormalized), QR, ``eigh(Q^T M Q)``, keep the top ``r``.

With ``relative_damping=True`` the damping of each factor is the paper's ``lambda' = lambda *
max(d)`` (``lambda`` = :attr:`Damping.value`); otherwise it is the factored split of
:class:`~thermo_kfac.solvers.base.Damping` as for the exact solvers. A factor whose dimension is at
most ``rank`` is decomposed exactly with ``eigh``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hw_models.validation import check_number, check_positive
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverReport, register_solver


def spectrum_decay(factor: torch.Tensor, fraction: float = 1e-3) -> int:
    """Number of eigenvalues of the symmetric ``factor`` above ``fraction`` times the largest."""
    check_number("fraction", fraction, low=0, high=1)
    vals = torch.linalg.eigvalsh(factor.double())
    top = float(vals[-1])
    if top <= 0:
        return 0
    return int((vals > fraction * top).sum())


class _LowRankSolver(KFACSolver):
    """Shared machinery: low-rank eigen-approximation of each factor and the damped apply."""

    def __init__(self, rank: int = 128, oversample: int = 10, power_iters: int = 3,
                 relative_damping: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.rank = check_positive("rank", rank, integer=True)
        self.oversample = check_number("oversample", oversample, low=0, integer=True)
        self.power_iters = check_number("power_iters", power_iters, low=0, integer=True)
        if not isinstance(relative_damping, bool):
            raise ValueError(f"relative_damping={relative_damping!r} must be True or False")
        self.relative_damping = relative_damping
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.n_prepared = 0
        # apply() state per factor: basis U, coefficients of U U^T, scalar coefficient of I.
        self.U_A: torch.Tensor | None = None
        self.coef_A: torch.Tensor | None = None
        self.c_A: torch.Tensor | None = None
        self.U_G: torch.Tensor | None = None
        self.coef_G: torch.Tensor | None = None
        self.c_G: torch.Tensor | None = None

    def _sketch(self, M: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(d, U)``: ``k`` approximate top eigenpairs of the PSD matrix ``M``, descending."""
        raise NotImplementedError

    def _decompose(self, M: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, bool]:
        n = M.shape[0]
        if self.rank >= n:
            vals, vecs = torch.linalg.eigh(M if M.dtype == torch.float64 else M.double())
            return vals.to(M.dtype).clamp_min(0), vecs.to(M.dtype), True
        d, U = self._sketch(M, self.rank, gen)
        return d.clamp_min(0), U, False

    def _coefficients(self, d: torch.Tensor, lam: float, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.relative_damping:
            lam = lam * float(d.max()) if d.numel() else 0.0
        if full:
            if lam <= 0 and float(d.min()) <= 0:
                raise RuntimeError("singular factor with zero damping cannot be inverted")
            return 1.0 / (d + lam), torch.zeros((), dtype=d.dtype, device=d.device)
        if lam <= 0:
            raise RuntimeError("the low-rank inverse needs a positive damping (lambda' > 0)")
        return 1.0 / (d + lam) - 1.0 / lam, torch.tensor(1.0 / lam, dtype=d.dtype, device=d.device)

    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        stream = hash((self.seed, self.layer_index, self.n_prepared)) % (2**62)  # one per layer & call
        gen = torch.Generator(device=A.device).manual_seed(stream)
        lam_a, lam_g = damping.split(A, G)
        if self.relative_damping:
            lam_a = lam_g = damping.value
        dA, UA, full_a = self._decompose(A, gen)
        dG, UG, full_g = self._decompose(G, gen)
        coef_A, c_A = self._coefficients(dA, lam_a, full_a)
        coef_G, c_G = self._coefficients(dG, lam_g, full_g)
        self.U_A, self.coef_A, self.c_A = UA, coef_A, c_A
        self.U_G, self.coef_G, self.c_G = UG, coef_G, c_G
        self.n_prepared += 1
        self.last_report = SolverReport(info={"rank_A": int(dA.numel()), "rank_G": int(dG.numel()),
                                              "exact_A": full_a, "exact_G": full_g})

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        assert self.U_A is not None and self.U_G is not None, "prepare() has not run"
        # left: (G_r + l_G I)^-1 grad
        X = self.U_G @ (self.coef_G[:, None] * (self.U_G.T @ grad)) + self.c_G * grad
        # right: X (A_r + l_A I)^-1
        return ((X @ self.U_A) * self.coef_A) @ self.U_A.T + self.c_A * X

    def state_dict(self) -> dict[str, Any]:
        if self.U_A is None:
            return {}
        return {"U_A": self.U_A, "coef_A": self.coef_A, "c_A": self.c_A, "U_G": self.U_G,
                "coef_G": self.coef_G, "c_G": self.c_G, "n_prepared": self.n_prepared}


def range_finder(M: torch.Tensor, k: int, power_iters: int, gen: torch.Generator,
                  symmetric_power: bool) -> torch.Tensor:
    """Orthonormal ``(n, k)`` basis approximating the range of ``M`` (Halko et al. 2011, alg. 4.4).

    Between power iterations the basis is only LU-normalized (:func:`_lu_normalize`); the final
    basis is orthonormalized by shifted Cholesky-QR (:func:`orthonormalize`), whose work is
    matrix products and one small factorization, rather than Householder QR. Profiled at
    n = 2048, k = 138 on 2 threads: LAPACK's QR took 40 % of the sketch's time, far above its
    FLOPs, because its many small parallel regions wait on each other (on a busy host a 138 x 138
    Cholesky took 16 ms with 2 threads and 0.1-1 ms with one). The small factorizations therefore
    run on one thread (:func:`single_thread`); the large products keep all threads.
    """
    omega = torch.randn(M.shape[1], k, generator=gen, dtype=M.dtype, device=M.device)
    Y = M @ omega
    for _ in range(power_iters):
        # Between power iterations the basis need only be well conditioned, not orthonormal:
        # LU with partial pivoting (Y U^-1 = P L, entries of L at most 1), as scikit-learn's
        # range finder does; 4-5x cheaper here than the orthonormalization, which is done once,
        # on the last product (n = 2048, k = 138: 3 ms against 16 ms).
        Q = _lu_normalize(Y)
        if not symmetric_power:  # subspace iteration with M M^T (general rSVD)
            Q = _lu_normalize(M.T @ Q)
        Y = M @ Q
    return orthonormalize(Y)


def _lu_normalize(Y: torch.Tensor) -> torch.Tensor:
    """``P L`` of ``Y = P L U`` (LU with partial pivoting): the span of ``Y``, well conditioned.
    Falls back to :func:`orthonormalize` when ``U`` is singular (rank-deficient ``Y``)."""
    LU, _, info = torch.linalg.lu_factor_ex(Y)
    U = LU[: Y.shape[1]].triu()
    if int(info) != 0 or not bool(torch.isfinite(U.diagonal()).all()):
        return orthonormalize(Y)
    return torch.linalg.solve_triangular(U, Y, upper=True, left=False)


def orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of the tall ``Y`` (same shape and dtype) by shifted
    Cholesky-QR2 (Fukaya et al., SIAM J. Sci. Comput. 2020): ``R = chol(Y^T Y + s I)``,
    ``Q = Y R^-1``, twice (three times for a very ill-conditioned ``Y``), in float64. The shift ``s`` (about
    ``11 (m k + k^2) u ||Y||^2``) keeps the Cholesky factorization defined for a rank-deficient
    ``Y``; the second pass restores orthogonality to working precision. Falls back to Householder
    QR if a factorization still fails."""
    with single_thread():  # small, latency-bound work: see range_finder
        Y64 = Y.double()
        m, k = Y64.shape
        gram = Y64.T @ Y64
        scale = float(gram.diagonal().sum())  # ||Y||_F^2
        if scale == 0.0 or not math.isfinite(scale):
            return torch.linalg.qr(Y).Q
        shift = 11 * (m * k + k * (k + 1)) * torch.finfo(torch.float64).eps * scale
        gram.diagonal().add_(shift)
        Q = Y64
        eye = torch.eye(k, dtype=torch.float64, device=Y.device)
        for passes in range(1, 4):
            L, info = torch.linalg.cholesky_ex(gram)
            if int(info) != 0:
                return torch.linalg.qr(Y).Q
            Q = torch.linalg.solve_triangular(L, Q.T, upper=False).T  # Q L^-T
            gram = Q.T @ Q
            # two passes suffice unless Y is very ill-conditioned (cond > ~1e6): then a third
            if passes >= 2 and float((gram - eye).abs().max()) <= 10 * k * torch.finfo(torch.float64).eps:
                break
        return Q.to(Y.dtype)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed (small) LAPACK calls on one intra-op thread, then restore the count."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@register_solver
class RandomizedSVDSolver(_LowRankSolver):
    """RS-KFAC: rank-``rank`` randomized SVD of each factor (sketch ``rank + oversample``)."""

    name = "rsvd"

    def _sketch(self, M: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        width = min(k + self.oversample, M.shape[0])
        Q = range_finder(M, width, self.power_iters, gen, symmetric_power=False)
        B = Q.T @ M
        with single_thread():  # a (k, n) SVD: small factorizations, see range_finder
            _, S, Vh = torch.linalg.svd(B, full_matrices=False)
        return S[:k], Vh[:k].T.contiguous()


@register_solver
class SymmetricRandomizedEighSolver(_LowRankSolver):
    """SRE-KFAC: symmetric randomized eigendecomposition of each factor."""

    name = "sre"

    def _sketch(self, M: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return top_eigenpairs(M, k, self.oversample, self.power_iters, gen)


def top_eigenpairs(M: torch.Tensor, k: int, oversample: int, power_iters: int, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, vectors)``: ``k`` approximate top eigenpairs of the symmetric PSD ``M``, descending
    (Rayleigh-Ritz on a randomized range with ``k + oversample`` columns and ``power_iters`` power
    iterations; used by SRE-KFAC and by the thermodynamic solver's deflation)."""
    width = min(k + oversample, M.shape[0])
    Q = range_finder(M, width, power_iters, gen, symmetric_power=True)
    T = Q.T @ M @ Q
    with single_thread():
        vals, vecs = torch.linalg.eigh((T + T.T) / 2)
    vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
    return vals, Q @ vecs
