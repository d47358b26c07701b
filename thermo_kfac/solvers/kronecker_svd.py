"""Kronecker-product SVD curvature (Koroko et al., arXiv 2201.10285): KPSVD, deflation and
KFAC-corrected, with the two-term damped inverse by simultaneous diagonalization.

Notation (as in :mod:`thermo_kfac.solvers.base`): the curvature block of a layer's row-major
flattened gradient matrix ``V`` (``d_out x d_in``) is approximated by ``kron(G, A)``, which acts as
``V -> G V A``. For per-example (or per-row) inputs ``a`` and output gradients ``g`` the Fisher
block is

    F = sum_n sum_k vec(V_nk) vec(V_nk)^T,    V_nk = sum_r g_{k,n,r} a_{n,r}^T,

where ``r`` runs over the rows of one example (``rows_per_example``; 1 for a plain Linear layer)
and ``k`` over the backward passes per example (1 for the empirical Fisher, ``mc_samples`` for
the Monte-Carlo Fisher, the number of outputs for the exact GGN). The rearrangement ``R`` maps
``kron(G, A)`` to the rank-one matrix ``vec(A) vec(G)^T`` and preserves the Frobenius norm, so

    argmin_{A, G} ||F - kron(G, A)||_F = leading singular pair of R(F)      (Van Loan & Pitsianis)

and the best sum of ``r`` Kronecker products is the rank-``r`` truncated SVD of ``R(F)``. ``R(F)``
(``d_in^2 x d_out^2``) is never formed: its products with a ``d_out x d_out`` matrix ``W`` and with a
``d_in x d_in`` matrix ``U`` are

    R(F) vec(W)   = vec( sum_{n,k} a_n^T (g_nk W g_nk^T) a_n )        (a_n: R x d_in, g_nk: R x d_out)
    R(F)^T vec(U) = vec( sum_{n,k} g_nk^T (a_n U a_n^T) g_nk ),

``O(K N R (d_in^2 + d_out^2) + K N R^2 (d_in + d_out))`` per product, and the singular pairs come
from warm-started subspace (block power) iteration with Rayleigh-Ritz extraction.

The three curvatures:

* ``"kpsvd"``: ``kron(G1, A1)``, the best single Kronecker product (its error is never above
  K-FAC's, which is one particular Kronecker product).
* ``"deflation"``: ``kron(G1, A1) + kron(G2, A2)``, the two leading singular pairs (the second is
  the leading pair of the deflated ``R(F) - vec(A1) vec(G1)^T``); its error is never above KPSVD's.
* ``"kfac_corrected"``: K-FAC's ``kron(G, A)`` plus the best Kronecker product of the residual
  ``F - kron(G, A)``; never worse than K-FAC (not guaranteed, though usual, to beat KPSVD).

The damped two-term system ``((G1 + lam_G I) kron (A1 + lam_A I) + kron(G2, A2)) vec(X) = vec(V)``
(the damping is factored as in K-FAC, see :class:`Damping`: a Tikhonov ``lambda I`` on top of two
Kronecker terms makes three, which no pair of bases diagonalizes) is solved by simultaneous
diagonalization: with ``K1^T (A1 + lam_A I) K1 = I``, ``K1^T A2 K1 = diag(s1)`` and likewise
``K2, s2`` for ``G``,

    X = K2 [ (K2^T V K1) / (1 + s2 s1^T) ] K1^T.

The approximation of a PSD matrix by two Kronecker terms can be indefinite; the generalized
eigenvalues ``1 + s2_i s1_j`` are therefore floored at ``eigenvalue_floor`` (a step is at most
``1 / eigenvalue_floor`` times K-FAC's in any direction), and the clamped count is reported.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverFactory, SolverReport, solver_factory
from thermo_kfac.solvers.digital import robust_eigh

#: Curvature variants of ``KFACPreconditioner(curvature=...)``.
CURVATURES = ("kfac", "kpsvd", "deflation", "kfac_corrected")
KRONECKER_SVD_CURVATURES = CURVATURES[1:]


# ----------------------------------------------------------------------- matrix-free R(F) products
def _shape_rows(a: torch.Tensor, g: torch.Tensor,
                rows_per_example: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` as ``(N, R, d_in)`` and ``g`` as ``(K, N, R, d_out)``, checking that they pair up."""
    if a.dim() != 2:
        raise ValueError(f"a must be a (rows, d_in) matrix, got shape {tuple(a.shape)}")
    if g.dim() == 2:
        g = g.unsqueeze(0)
    if g.dim() != 3:
        raise ValueError(f"g must be (rows, d_out) or (passes, rows, d_out), got shape {tuple(g.shape)}")
    rows = a.shape[0]
    if g.shape[1] != rows:
        raise ValueError(f"g has {g.shape[1]} rows per pass but a has {rows}; every output-gradient "
                         "row must pair with one input row")
    check_positive("rows_per_example", rows_per_example, integer=True)
    if rows % rows_per_example:
        raise ValueError(f"rows_per_example={rows_per_example} does not divide the {rows} rows")
    n = rows // rows_per_example
    return (a.reshape(n, rows_per_example, a.shape[1]),
            g.reshape(g.shape[0], n, rows_per_example, g.shape[2]))


def split_passes(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Reshape stacked output-gradient rows ``g`` (``K * rows`` of them, pass-major, as the
    preconditioner collects them for MC / type-2 Fishers) into ``(K, rows, d_out)``."""
    rows = a.shape[0]
    if rows == 0 or g.shape[0] % rows:
        raise ValueError(
            f"cannot pair {g.shape[0]} output-gradient rows with {rows} input rows: Kronecker-SVD "
            "curvature needs the same rows for every backward pass (a layer called once per forward)")
    return g.reshape(g.shape[0] // rows, rows, g.shape[1])


def rearranged_matvec(a: torch.Tensor, g: torch.Tensor, W: torch.Tensor,
                      rows_per_example: int = 1) -> torch.Tensor:
    """``R(F) vec(W)`` for a batch ``W`` of ``d_out x d_out`` matrices: ``(b, d_in, d_in)``."""
    a3, g4 = _shape_rows(a, g, rows_per_example)
    k, n, r, d_out = g4.shape
    b = W.shape[0]
    g_flat = g4.reshape(k * n * r, d_out)
    gw = g_flat @ W  # (b, K N R, d_out); two-operand products only (3-operand einsum is slow)
    if r == 1:
        # c_bn = sum_k g_nk^T W_b g_nk, then sum_n c_bn a_n a_n^T
        coeff = (gw * g_flat).sum(-1).reshape(b, k, n).sum(1)
        a2 = a3.reshape(n, -1)
        return a2.T @ (coeff.unsqueeze(-1) * a2)
    inner = torch.einsum("bknrp,knsp->bnrs", gw.reshape(b, k, n, r, d_out), g4)  # R x R, summed over k
    t = inner @ a3  # (b, N, R, d_in)
    return a3.reshape(n * r, -1).T @ t.reshape(b, n * r, -1)


def rearranged_rmatvec(a: torch.Tensor, g: torch.Tensor, U: torch.Tensor,
                       rows_per_example: int = 1) -> torch.Tensor:
    """``R(F)^T vec(U)`` for a batch ``U`` of ``d_in x d_in`` matrices: ``(b, d_out, d_out)``."""
    a3, g4 = _shape_rows(a, g, rows_per_example)
    k, n, r, d_out = g4.shape
    b = U.shape[0]
    g_flat = g4.reshape(k * n * r, d_out)
    if r == 1:
        a2 = a3.reshape(n, -1)
        coeff = ((a2 @ U) * a2).sum(-1)  # (b, N): a_n^T U_b a_n
        return g_flat.T @ (coeff.repeat(1, k).unsqueeze(-1) * g_flat)  # pass-major rows
    au = a3 @ U.unsqueeze(1)  # (b, N, R, d_in)
    inner = au @ a3.transpose(1, 2)  # (b, N, R, R)
    t = inner.unsqueeze(1) @ g4.unsqueeze(0)  # (b, K, N, R, d_out)
    return g_flat.T @ t.reshape(b, k * n * r, d_out)


def rearrange(F: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """The explicit rearrangement ``R(F)`` (``d_in^2 x d_out^2``) of a block in ``kron(G, A)``
    order, so that ``rearrange(kron(G, A)) = vec(A) vec(G)^T`` (for tests and small cases)."""
    return F.reshape(d_out, d_in, d_out, d_in).permute(1, 3, 0, 2).reshape(d_in * d_in, d_out * d_out)


# --------------------------------------------------------------------------------- power SVD
@dataclass
class KroneckerSVD:
    """Result of :func:`kronecker_svd`: ``F ~ sum_k kron(G_k, A_k)``.

    ``terms`` are ``(A_k, G_k)`` with ``||A_k||_F = ||G_k||_F = sqrt(sigma_k)`` and ``tr A_k >= 0``;
    ``basis`` is the final right (G-side) block, for warm starts.
    """

    terms: list[tuple[torch.Tensor, torch.Tensor]]
    singular_values: torch.Tensor
    iterations: int
    converged: bool
    residual: float
    basis: torch.Tensor


def _orthonormal_rows(X: torch.Tensor) -> torch.Tensor:
    """Orthonormalize the flattened rows of ``X`` (``b x d x d``)."""
    b = X.shape[0]
    Q, _ = torch.linalg.qr(X.reshape(b, -1).T)
    return Q.T.reshape(X.shape)


def _symmetric_noise(b: int, d: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    X = torch.randn(b, d, d, generator=generator, dtype=like.dtype, device="cpu").to(like.device)
    return X + X.transpose(1, 2)


def kronecker_svd(a: torch.Tensor, g: torch.Tensor, rank: int = 1, *, rows_per_example: int = 1,
                  subtract: tuple[torch.Tensor, torch.Tensor] | None = None,
                  init: torch.Tensor | None = None, tol: float = 1e-6, max_iter: int = 200,
                  oversample: int = 2, generator: torch.Generator | None = None) -> KroneckerSVD:
    """Leading ``rank`` Kronecker terms of the Fisher block defined by rows ``a``, ``g`` (see the
    module docstring), by block power iteration on ``R(F)``, never forming ``F``.

    Args:
        a: ``(rows, d_in)`` inputs (bias column included if any).
        g: ``(rows, d_out)`` or ``(passes, rows, d_out)`` output gradients.
        rank: number of Kronecker terms.
        rows_per_example: consecutive rows forming one example (weight sharing; 1 = every row is
            an example, which for shared weights drops the cross-position terms as K-FAC-expand does).
        subtract: ``(A0, G0)``: decompose ``F - kron(G0, A0)`` instead (KFAC-corrected).
        init: warm start, a ``(b, d_out, d_out)`` block from a previous :attr:`KroneckerSVD.basis`.
        tol: stop when every kept triplet has ``||R(F) v - sigma u|| <= tol * sigma`` (at least
            ``64 eps`` of the dtype), or when the residual stalls for 10 iterations.
        max_iter: iteration cap.
        oversample: extra block vectors (speeds up convergence of the kept ones).
        generator: random stream for the starting block.
    """
    check_positive("rank", rank, integer=True)
    check_positive("oversample", oversample, integer=True, allow_zero=True)
    check_number("tol", tol, low=0, low_inclusive=False)
    check_positive("max_iter", max_iter, integer=True)
    d_in, d_out = a.shape[1], g.shape[-1]
    b = min(rank + oversample, d_out * d_out, d_in * d_in)
    requested, rank = rank, min(rank, b)  # R(F) has at most b singular values; pad with zeros

    def matvec(W: torch.Tensor) -> torch.Tensor:
        out = rearranged_matvec(a, g, W, rows_per_example)
        if subtract is not None:
            A0, G0 = subtract
            out = out - A0.unsqueeze(0) * (W * G0).sum(dim=(1, 2)).reshape(-1, 1, 1)
        return out

    def rmatvec(U: torch.Tensor) -> torch.Tensor:
        out = rearranged_rmatvec(a, g, U, rows_per_example)
        if subtract is not None:
            A0, G0 = subtract
            out = out - G0.unsqueeze(0) * (U * A0).sum(dim=(1, 2)).reshape(-1, 1, 1)
        return out

    start = _symmetric_noise(b, d_out, g, generator)
    if init is not None and init.shape[1:] == (d_out, d_out):
        k = min(b, init.shape[0])
        start[:k] = init[:k].to(start.dtype)
    V = _orthonormal_rows(start)
    # Round-off floors the residual near a few hundred ulps (float32: ~1e-5); asking for less
    # would only spin to max_iter.
    tol = max(tol, 64 * torch.finfo(a.dtype).eps)
    U = S = None
    residual = best = math.inf
    stalled = iterations = 0
    while iterations < max_iter:
        iterations += 1
        Y = matvec(V)
        if U is not None:
            scale = S[:rank].clamp_min(torch.finfo(S.dtype).tiny)
            err = (Y[:rank] - S[:rank].reshape(-1, 1, 1) * U[:rank]).flatten(1).norm(dim=1) / scale
            residual = float(err.max())
            if residual <= tol or float(S[0]) == 0.0:
                break
            # Stop when round-off stalls the residual (10 iterations without a 10% gain).
            stalled = stalled + 1 if residual > 0.9 * best else 0
            best = min(best, residual)
            if stalled >= 10:
                break
        Q = _orthonormal_rows(Y)
        Z = rmatvec(Q)  # R^T Q; R ~ Q (Z)^T on the block, whose SVD gives the Ritz triplets
        P, S, Wt = torch.linalg.svd(Z.reshape(b, -1).T, full_matrices=False)
        U = torch.einsum("cb,cij->bij", Wt.T, Q)  # left singular vectors, in the A space
        V = P.T.reshape(b, d_out, d_out)
    assert U is not None and S is not None
    terms = []
    for k in range(rank):
        A_k, G_k = U[k], V[k]
        A_k, G_k = 0.5 * (A_k + A_k.T), 0.5 * (G_k + G_k.T)
        if float(A_k.diagonal().sum()) < 0:  # the pair's sign is arbitrary; make A1 PSD-like
            A_k, G_k = -A_k, -G_k
        root = abs(float(S[k])) ** 0.5
        terms.append((root * A_k, root * G_k))
    terms += [(a.new_zeros(d_in, d_in), a.new_zeros(d_out, d_out))] * (requested - rank)
    values = torch.cat([S[:rank], S.new_zeros(requested - rank)])
    return KroneckerSVD(terms=terms, singular_values=values, iterations=iterations,
                        converged=residual <= tol or float(S[0]) == 0.0, residual=residual,
                        basis=V.clone())


# ------------------------------------------------------------------- simultaneous diagonalization
@dataclass
class TwoTermInverse:
    """``((A1 + lam_A I) kron (G1 + lam_G I) + A2 kron G2)^-1`` in simultaneously diagonalizing bases.

    ``K_A^T (A1 + lam_A) K_A = I``, ``K_A^T A2 K_A = diag(s_A)`` (likewise for G); ``scale`` is
    ``1 / max(1 + s_G s_A^T, floor)``. Apply with :meth:`apply`.
    """

    K_A: torch.Tensor
    K_G: torch.Tensor
    scale: torch.Tensor
    clamped: int

    @classmethod
    def build(cls, A1: torch.Tensor, G1: torch.Tensor, lam_a: float, lam_g: float,
              A2: torch.Tensor | None = None, G2: torch.Tensor | None = None,
              eigenvalue_floor: float = 0.1) -> TwoTermInverse:
        K_A, s_A = _pencil_basis(A1, lam_a, A2)
        K_G, s_G = _pencil_basis(G1, lam_g, G2)
        denom = 1.0 + torch.outer(s_G, s_A)
        clamped = int((denom < eigenvalue_floor).sum())
        return cls(K_A, K_G, 1.0 / denom.clamp_min(eigenvalue_floor), clamped)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return self.K_G @ ((self.K_G.T @ V @ self.K_A) * self.scale) @ self.K_A.T


def _pencil_basis(M1: torch.Tensor, lam: float,
                  M2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``K`` with ``K^T (M1 + lam I) K = I`` and ``K^T M2 K = diag(s)`` (``s = 0`` without ``M2``)."""
    vals, vecs = robust_eigh(0.5 * (M1 + M1.T))
    vals = vals.clamp_min(0) + lam
    # With zero damping a singular M1 has no inverse; keep the solve finite (pseudo-inverse-like).
    vals = vals.clamp_min(float(vals.max()) * torch.finfo(vals.dtype).eps + torch.finfo(vals.dtype).tiny)
    P = vecs / vals.sqrt()  # P^T (M1 + lam I) P = I
    if M2 is None:
        return P, torch.zeros(M1.shape[0], dtype=M1.dtype, device=M1.device)
    inner = P.T @ M2 @ P
    s, E = robust_eigh(0.5 * (inner + inner.T))
    return P @ E, s


# -------------------------------------------------------------------------------- the solver
class KroneckerSVDSolver(KFACSolver):
    """Per-layer solver for the Kronecker-SVD curvatures (``"kpsvd"``, ``"deflation"``,
    ``"kfac_corrected"``), built by ``KFACPreconditioner(curvature=...)``.

    Every ``update_every``-th call of :meth:`observe_batch` (the preconditioner passes
    ``factor_update_every``) computes the current batch's Kronecker terms by warm-started power SVD
    and folds them into exponential moving averages with ``decay`` (the preconditioner's
    ``factor_decay``): ``A_k <- decay A_k + (1 - decay) A_k^batch``, likewise ``G_k``, after fixing
    each batch term's arbitrary sign to agree with the average (``<A_k^batch, A_k> >= 0``). As in
    K-FAC, the average of the factors stands for the average of their products. ``prepare`` (every
    ``inverse_update_every`` steps) stores the damping, and for ``kfac_corrected`` the K-FAC EMA
    factors it receives (the first term); the inverse is rebuilt from the averaged terms on the
    next observed batch, which the preconditioner feeds before :meth:`apply` in the same step.

    Rows are paired per row: each row of ``a_rows`` is one example for the Fisher (exact for
    Linear layers on ``(N, d_in)`` inputs; for weight sharing it drops the cross-position terms,
    the same assumption as K-FAC-expand/KFC). For ``fisher_type="mc"``/``"type2"`` the stacked
    output-gradient rows of the several backward passes are summed per row (``S_i = sum_k g_ki
    g_ki^T``); rows that do not pair up raise ``ValueError``.

    Args:
        curvature: ``"kpsvd"``, ``"deflation"`` or ``"kfac_corrected"``.
        decay: EMA decay of the Kronecker terms in [0, 1).
        update_every: compute new terms every this many observed batches.
        tol, max_iter, oversample: power-SVD stopping rule, cap and extra block vectors.
        eigenvalue_floor: floor of the generalized eigenvalues ``1 + s_G s_A`` of the two-term
            solve, in (0, 1].
        inner_solver: for ``"kpsvd"`` only: a solver (name, class or instance) to which the single
            term ``(A1, G1)`` is handed (e.g. ``"thermodynamic"``); default: the eigenbasis solve.
        inner_options: options of ``inner_solver``.
        seed: seed of the starting blocks (combined with the layer index).
    """

    name = "kronecker_svd"
    uses_batch_statistics = True

    def __init__(self, curvature: str = "kpsvd", *, decay: float = 0.95, update_every: int = 1,
                 tol: float = 1e-6, max_iter: int = 200, oversample: int = 2,
                 eigenvalue_floor: float = 0.1,
                 inner_solver: str | KFACSolver | type[KFACSolver] | None = None,
                 inner_options: dict[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.curvature = check_choice("curvature", curvature, KRONECKER_SVD_CURVATURES)
        self.decay = check_number("decay", decay, low=0.0, high=1.0, high_inclusive=False)
        self.update_every = check_positive("update_every", update_every, integer=True)
        self.tol = check_number("tol", tol, low=0, low_inclusive=False)
        self.max_iter = check_positive("max_iter", max_iter, integer=True)
        self.oversample = check_positive("oversample", oversample, integer=True, allow_zero=True)
        self.eigenvalue_floor = check_number("eigenvalue_floor", eigenvalue_floor, low=0, high=1,
                                             low_inclusive=False)
        self.seed = check_number("seed", seed, integer=True)
        if inner_solver is not None and self.curvature != "kpsvd":
            raise ValueError(f"inner_solver={inner_solver!r} only applies to curvature='kpsvd'; "
                             f"{self.curvature!r} has two terms, solved by simultaneous diagonalization")
        self._make_inner: SolverFactory | None = (
            None if inner_solver is None else solver_factory(inner_solver, inner_options))
        self.inner: KFACSolver | None = None if self._make_inner is None else self._make_inner()
        if self.inner is not None and self.inner.uses_batch_statistics:
            raise ValueError(f"inner_solver={inner_solver!r} works from batch rows itself; choose a "
                             "solver that takes factors (eigh, cholesky, cg, thermodynamic, ...)")
        self.rank = 1 if self.curvature != "deflation" else 2
        # EMA terms: kpsvd [(A1, G1)], deflation [(A1, G1), (A2, G2)], kfac_corrected [(A2, G2)]
        self.terms: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.basis: torch.Tensor | None = None  # warm start of the power SVD
        self.batches_seen = 0
        self.damping: Damping | None = None
        self.kfac_A: torch.Tensor | None = None
        self.kfac_G: torch.Tensor | None = None
        self.pending = False
        self.inverse: TwoTermInverse | None = None
        self._svd_info: dict[str, Any] = {}

    # protocol ---------------------------------------------------------------------------------
    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        self.damping = damping
        if self.curvature == "kfac_corrected":
            # Copies: the preconditioner updates its EMA factors in place between updates.
            self.kfac_A, self.kfac_G = A.clone(), G.clone()
        self.pending = True
        self.last_report = None

    def observe_batch(self, a_rows: torch.Tensor, g_rows: torch.Tensor) -> None:
        """Update the averaged terms from this batch (when due) and rebuild a pending inverse."""
        if self.batches_seen % self.update_every == 0:
            self._update_terms(a_rows, g_rows)
        self.batches_seen += 1
        if self.pending and self.terms:
            self._rebuild()

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            result = self.inner.apply(grad)
            self.last_report = self.inner.last_report
            return result
        assert self.inverse is not None, "prepare() and observe_batch() have not run"
        self.last_report = SolverReport(info=dict(self._svd_info))
        return self.inverse.apply(grad)

    @property
    def ready(self) -> bool:
        return self.inverse is not None or (self.inner is not None and self.inner.ready
                                            and bool(self.terms))

    # internals ----------------------------------------------------------------------------------
    def _update_terms(self, a_rows: torch.Tensor, g_rows: torch.Tensor) -> None:
        rows = a_rows.shape[0]
        if rows == 0:
            return
        if not bool(torch.isfinite(a_rows.sum() + g_rows.sum())):
            # Keep the averages clean; the preconditioner counts and warns about the same batch.
            self._svd_info["skipped_nonfinite"] = self._svd_info.get("skipped_nonfinite", 0) + 1
            return
        g = split_passes(a_rows, g_rows)
        # The preconditioner scales a_rows by 1/sqrt(rows) so that a^T a is the factor A; the
        # per-row Fisher is sum_i S_i kron a_i a_i^T of the unscaled rows.
        a = a_rows * math.sqrt(rows)
        subtract = None
        if self.curvature == "kfac_corrected":
            subtract = (a_rows.T @ a_rows, torch.einsum("kno,knp->op", g, g))
        generator = torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.layer_index * 7919 + self.batches_seen)
        result = kronecker_svd(a, g, self.rank, subtract=subtract, init=self.basis, tol=self.tol,
                               max_iter=self.max_iter, oversample=self.oversample,
                               generator=generator)
        self.basis = result.basis
        self._svd_info = {"power_iterations": result.iterations, "converged": result.converged,
                          "power_residual": result.residual,
                          "singular_values": [float(s) for s in result.singular_values]}
        if not self.terms or self.decay == 0.0:
            self.terms = [(A.clone(), G.clone()) for A, G in result.terms]
            return
        new_terms = []
        for (A_old, G_old), (A_new, G_new) in zip(self.terms, result.terms, strict=True):
            if float((A_old * A_new).sum()) < 0:
                A_new, G_new = -A_new, -G_new
            new_terms.append((A_old.lerp(A_new, 1 - self.decay), G_old.lerp(G_new, 1 - self.decay)))
        self.terms = new_terms

    def _first_and_second(self) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                         tuple[torch.Tensor, torch.Tensor] | None]:
        if self.curvature == "kpsvd":
            return self.terms[0], None
        if self.curvature == "deflation":
            return self.terms[0], self.terms[1]
        if self.kfac_A is None or self.kfac_G is None:
            raise RuntimeError("kfac_corrected: prepare() has not received the K-FAC factors")
        return (self.kfac_A, self.kfac_G), self.terms[0]

    def _rebuild(self) -> None:
        assert self.damping is not None
        (A1, G1), second = self._first_and_second()
        self.pending = False
        if self.inner is not None:
            self.inner.prepare(A1, G1, self.damping)
            return
        lam_a, lam_g = self.damping.split(A1, G1)
        A2, G2 = second if second is not None else (None, None)
        try:
            self.inverse = TwoTermInverse.build(A1, G1, lam_a, lam_g, A2, G2, self.eigenvalue_floor)
        except (RuntimeError, torch.linalg.LinAlgError) as err:
            if self.inverse is None:
                raise
            warnings.warn(f"Kronecker-SVD solver (layer {self.layer_index}): rebuilding the inverse "
                          f"failed ({err}); keeping the previous one", RuntimeWarning, stacklevel=2)
            return
        self._svd_info["clamped_eigenvalues"] = self.inverse.clamped

    def approximation(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The current (undamped) curvature ``sum_k kron(G_k, A_k)`` as ``[(A_k, G_k)]``."""
        if not self.terms:
            return []
        first, second = self._first_and_second()
        return [first] + ([second] if second is not None else [])

    # state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.ready:
            return {}
        state: dict[str, Any] = {
            "terms": [t for pair in self.terms for t in pair], "basis": self.basis,
            "batches_seen": self.batches_seen, "pending": self.pending,
            "damping": None if self.damping is None else (self.damping.value, self.damping.pi_damping),
            "kfac_A": self.kfac_A, "kfac_G": self.kfac_G,
        }
        if self.inverse is not None:
            state.update(K_A=self.inverse.K_A, K_G=self.inverse.K_G, scale=self.inverse.scale,
                         clamped=self.inverse.clamped)
        if self.inner is not None:
            state["inner"] = self.inner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        flat = list(state["terms"])
        self.terms = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        self.basis = state["basis"]
        self.batches_seen = int(state["batches_seen"])
        self.pending = bool(state["pending"])
        damping = state["damping"]
        self.damping = None if damping is None else Damping(float(damping[0]), bool(damping[1]))
        self.kfac_A, self.kfac_G = state["kfac_A"], state["kfac_G"]
        if "K_A" in state:
            self.inverse = TwoTermInverse(state["K_A"], state["K_G"], state["scale"],
                                          int(state["clamped"]))
        if self.inner is not None and "inner" in state:
            self.inner.load_state_dict(state["inner"])


def curvature_solver_factory(curvature: str, solver: Any, solver_options: dict[str, Any] | None, *,
                             decay: float, update_every: int) -> SolverFactory:
    """Per-layer factory of :class:`KroneckerSVDSolver` for ``KFACPreconditioner(curvature=...)``.

    ``solver`` must be the default ``"eigh"`` (the curvature brings its own solve; for
    ``"kpsvd"`` another back end goes in ``solver_options={"inner_solver": ...}``);
    ``solver_options`` are :class:`KroneckerSVDSolver` options. ``decay``/``update_every`` come
    from the preconditioner's ``factor_decay``/``factor_update_every``.
    """
    check_choice("curvature", curvature, KRONECKER_SVD_CURVATURES)
    if not (isinstance(solver, str) and solver == "eigh"):
        raise ValueError(f"solver={solver!r} cannot be combined with curvature={curvature!r}: the "
                         "Kronecker-SVD curvatures solve by simultaneous diagonalization; leave "
                         "solver='eigh' (for 'kpsvd', pass solver_options={'inner_solver': ...})")
    options = dict(solver_options or {})
    for key, source in (("decay", "factor_decay"), ("update_every", "factor_update_every"),
                        ("curvature", "curvature")):
        if key in options:
            raise ValueError(f"solver_options key {key!r} is set by KFACPreconditioner({source}=...)")
    try:
        KroneckerSVDSolver(curvature, decay=decay, update_every=update_every, **options)
    except TypeError as err:
        raise ValueError(f"invalid solver_options {options!r} for curvature {curvature!r}: {err}") from None
    return lambda: KroneckerSVDSolver(curvature, decay=decay, update_every=update_every, **options)


__all__ = ["CURVATURES", "KroneckerSVD", "KroneckerSVDSolver", "TwoTermInverse", "curvature_solver_factory",
           "kronecker_svd", "rearrange", "rearranged_matvec", "rearranged_rmatvec", "split_passes"]
