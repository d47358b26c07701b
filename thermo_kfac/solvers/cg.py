"""CG-FAC (Y. Chen, arXiv 2101.00218): conjugate gradients on the damped Kronecker system.

Solves ``(G + lam_G I) X (A + lam_A I) = V`` for the gradient matrix ``V`` of shape
``(d_out, d_in)`` with (optionally Jacobi-preconditioned) conjugate gradients in the Frobenius
inner product. The operator ``X -> G_d X A_d`` is symmetric positive definite; the Kronecker product
is never formed and nothing is factorized. Each solve starts from the previous step's solution
(warm start), which is kept in :meth:`state_dict` so a resumed run is bitwise identical.

Two operators:

* ``"cg"`` (:class:`CGSolver`): products with the damped EMA factors given to ``prepare``, two
  matrix products per iteration, ``O(d_out d_in (d_out + d_in))``.
* ``"cg-matrix-free"`` (:class:`MatrixFreeCGSolver`, also what ``"cg"`` with
  ``matrix_free=True`` constructs): products from the current batch's rows ``a`` (N x d_in) and
  ``g`` (N x d_out) without forming ``A = a^T a`` or ``G = g^T g``:
  ``G_d X A_d = g^T (g Z) + lam_G Z`` with ``Z = (X a^T) a + lam_A X``, ``4 N d_out d_in`` per
  iteration (with zero damping, ``g^T ((g X) a^T) a`` through an ``N x N`` matrix when that is
  cheaper). It solves with the *current batch's* factors (like ``factor_decay=0``), damping split
  from the batch traces ``tr A = ||a||_F^2``, ``tr G = ||g||_F^2`` exactly as
  :meth:`Damping.split` would split it for those factors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hw_models.validation import check_number, check_positive
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverReport, register_solver

Operator = Callable[[torch.Tensor], torch.Tensor]


def conjugate_gradients(op: Operator, V: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 100,
                        x0: torch.Tensor | None = None,
                        inv_diag: torch.Tensor | None = None) -> tuple[torch.Tensor, int, float]:
    """Solve ``op(X) = V`` (``op`` symmetric positive definite in the Frobenius inner product).

    ``inv_diag`` is an optional elementwise (Jacobi) preconditioner. Stops when
    ``||V - op(X)||_F <= tol ||V||_F`` or after ``max_iter`` iterations. Returns
    ``(X, iterations, relative residual)``.
    """
    X = torch.zeros_like(V) if x0 is None else x0.clone()
    b_norm = float(V.norm())
    if b_norm == 0:
        return torch.zeros_like(V), 0, 0.0
    R = V - op(X) if x0 is not None else V.clone()
    Z = R * inv_diag if inv_diag is not None else R
    P = Z.clone()
    rz = (R * Z).sum()
    res = float(R.norm()) / b_norm
    it = 0
    while res > tol and it < max_iter:
        OP = op(P)
        alpha = rz / (P * OP).sum()
        X.add_(alpha * P)
        R.sub_(alpha * OP)
        Z = R * inv_diag if inv_diag is not None else R
        rz_new = (R * Z).sum()
        P = Z + (rz_new / rz) * P
        rz = rz_new
        it += 1
        res = float(R.norm()) / b_norm
    return X, it, res


def kronecker_cg(G: torch.Tensor, A: torch.Tensor, V: torch.Tensor, *, tol: float = 1e-4,
                 max_iter: int = 100, x0: torch.Tensor | None = None,
                 jacobi: bool = True) -> tuple[torch.Tensor, int, float]:
    """Solve ``G X A = V`` (``G``, ``A`` symmetric positive definite) by conjugate gradients.

    Stops when ``||V - G X A||_F <= tol ||V||_F`` or after ``max_iter`` iterations. Returns
    ``(X, iterations, relative residual)``.
    """
    # Jacobi preconditioner: the diagonal of kron(G, A) is outer(diag G, diag A).
    inv_diag = 1.0 / torch.outer(G.diagonal(), A.diagonal()) if jacobi else None
    return conjugate_gradients(lambda X: G @ X @ A, V, tol=tol, max_iter=max_iter, x0=x0,
                               inv_diag=inv_diag)


def batch_kronecker_operator(g_rows: torch.Tensor, a_rows: torch.Tensor, lam_g: float,
                             lam_a: float) -> Operator:
    """``X -> (g^T g + lam_g I) X (a^T a + lam_a I)`` without forming ``g^T g`` or ``a^T a``.

    With damping: ``4 N d_out d_in`` flops per product (right side then left side). Without damping
    (``lam_g = lam_a = 0``) the ``N x N`` association ``g^T ((g X) a^T) a`` costs
    ``2 N d_out d_in + N^2 (d_in + d_out)`` and is used when that is smaller.
    """
    n, d_out = g_rows.shape
    d_in = a_rows.shape[1]
    if lam_g == 0 and lam_a == 0 and n * (d_in + d_out) < 2 * d_out * d_in:
        return lambda X: g_rows.T @ (((g_rows @ X) @ a_rows.T) @ a_rows)

    def op(X: torch.Tensor) -> torch.Tensor:
        Z = (X @ a_rows.T) @ a_rows
        if lam_a:
            Z = Z + lam_a * X
        Y = g_rows.T @ (g_rows @ Z)
        return Y + lam_g * Z if lam_g else Y

    return op


class CGSolver(KFACSolver):
    """Conjugate gradients on the damped Kronecker system, warm-started from the last solution.

    Args:
        tol: relative residual ``||V - G_d X A_d|| / ||V||`` at which to stop.
        max_iter: iteration cap per solve.
        jacobi: precondition CG with the diagonal of the damped Kronecker product.
        warm_start: start each solve from the previous solution (when the shape matches).
        matrix_free: ``True`` builds a :class:`MatrixFreeCGSolver` (products from the current
            batch's rows instead of the EMA factors); ``CGSolver(matrix_free=True)`` returns one.
    """

    name = "cg"

    def __new__(cls, *args: Any, **kwargs: Any) -> CGSolver:
        # uses_batch_statistics is a class attribute, so the matrix-free variant is a subclass;
        # "cg" with matrix_free=True constructs it (the registry calls cls(**options)).
        if cls is CGSolver and kwargs.get("matrix_free") is True:
            cls = MatrixFreeCGSolver
        return super().__new__(cls)

    def __init__(self, tol: float = 1e-4, max_iter: int = 100, jacobi: bool = True,
                 warm_start: bool = True, *, matrix_free: bool = False) -> None:
        super().__init__()
        self.tol = check_number("tol", tol, low=0, high=1, low_inclusive=False)
        self.max_iter = check_positive("max_iter", max_iter, integer=True)
        for key, value in (("jacobi", jacobi), ("warm_start", warm_start),
                           ("matrix_free", matrix_free)):
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r} must be True or False")
        if matrix_free is not self.uses_batch_statistics:
            raise ValueError(f"matrix_free={matrix_free} does not match solver {self.name!r}; use "
                             "'cg' (matrix_free=False/True) or 'cg-matrix-free'")
        self.jacobi = jacobi
        self.warm_start = warm_start
        self.A_damped: torch.Tensor | None = None
        self.G_damped: torch.Tensor | None = None
        self.X_prev: torch.Tensor | None = None

    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        lam_a, lam_g = damping.split(A, G)
        # Copies: the preconditioner updates its EMA factors in place between updates.
        self.A_damped = A + lam_a * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        self.G_damped = G + lam_g * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        self.last_report = None

    def _solve(self, grad: torch.Tensor, x0: torch.Tensor | None) -> tuple[torch.Tensor, int, float]:
        assert self.A_damped is not None and self.G_damped is not None, "prepare() has not run"
        return kronecker_cg(self.G_damped, self.A_damped, grad, tol=self.tol,
                            max_iter=self.max_iter, x0=x0, jacobi=self.jacobi)

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        x0 = self.X_prev if (self.warm_start and self.X_prev is not None
                             and self.X_prev.shape == grad.shape) else None
        X, iters, res = self._solve(grad, x0)
        if self.warm_start:
            self.X_prev = X
        self.last_report = SolverReport(info={"cg_iterations": iters, "relative_residual": res,
                                              "converged": res <= self.tol,
                                              "warm_started": x0 is not None})
        return X.clone() if self.warm_start else X

    def state_dict(self) -> dict[str, Any]:
        if self.A_damped is None:
            return {}
        state: dict[str, Any] = {"A_damped": self.A_damped, "G_damped": self.G_damped}
        if self.X_prev is not None:
            state["X_prev"] = self.X_prev
        return state


class MatrixFreeCGSolver(CGSolver):
    """CG with products from the current batch's rows ``a``, ``g`` (no factor is formed or kept).

    ``prepare`` only records the damping (the EMA factors it receives are ignored); every step the
    preconditioner passes the batch rows through :meth:`observe_batch` and :meth:`apply` solves
    ``(g^T g + lam_G I) X (a^T a + lam_A I) = V``. Same options as :class:`CGSolver`
    (``matrix_free`` must be ``True``).
    """

    name = "cg-matrix-free"
    uses_batch_statistics = True

    def __init__(self, tol: float = 1e-4, max_iter: int = 100, jacobi: bool = True,
                 warm_start: bool = True, *, matrix_free: bool = True) -> None:
        super().__init__(tol, max_iter, jacobi, warm_start, matrix_free=matrix_free)
        self.damping_value: float | None = None
        self.pi_damping = False
        self._a_rows: torch.Tensor | None = None
        self._g_rows: torch.Tensor | None = None

    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        self.damping_value = damping.value
        self.pi_damping = damping.pi_damping
        self.last_report = None

    def observe_batch(self, a_rows: torch.Tensor, g_rows: torch.Tensor) -> None:
        self._a_rows, self._g_rows = a_rows, g_rows

    def damping_split(self, a_rows: torch.Tensor, g_rows: torch.Tensor) -> tuple[float, float]:
        """``(lam_A, lam_G)`` that :meth:`Damping.split` gives for ``a^T a`` and ``g^T g``."""
        assert self.damping_value is not None, "prepare() has not run"
        # Damping.split only reads the mean diagonal; pass it as 1x1 matrices.
        mean_a = (a_rows.square().sum() / a_rows.shape[1]).reshape(1, 1)
        mean_g = (g_rows.square().sum() / g_rows.shape[1]).reshape(1, 1)
        return Damping(self.damping_value, self.pi_damping).split(mean_a, mean_g)

    def _solve(self, grad: torch.Tensor, x0: torch.Tensor | None) -> tuple[torch.Tensor, int, float]:
        a, g = self._a_rows, self._g_rows
        if a is None or g is None:
            raise RuntimeError("cg-matrix-free: no batch rows for this step (observe_batch was not "
                               "called; the layer's hooks did not fire in training mode)")
        self._a_rows = self._g_rows = None  # never reuse a stale batch
        lam_a, lam_g = self.damping_split(a, g)
        op = batch_kronecker_operator(g, a, lam_g, lam_a)
        inv_diag = None
        if self.jacobi:
            inv_diag = 1.0 / torch.outer(g.square().sum(0) + lam_g, a.square().sum(0) + lam_a)
        return conjugate_gradients(op, grad, tol=self.tol, max_iter=self.max_iter, x0=x0,
                                   inv_diag=inv_diag)

    def state_dict(self) -> dict[str, Any]:
        if self.damping_value is None:
            return {}
        state: dict[str, Any] = {"damping_value": self.damping_value,
                                 "pi_damping": self.pi_damping}
        if self.X_prev is not None:
            state["X_prev"] = self.X_prev
        return state


register_solver(CGSolver)
register_solver(MatrixFreeCGSolver)

__all__ = ["CGSolver", "MatrixFreeCGSolver", "batch_kronecker_operator", "conjugate_gradients",
           "kronecker_cg"]
