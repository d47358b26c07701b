"""CG-FAC (Y. Chen, arXiv 2101.00218): conjugate gradients on the damped Kronecker system.

Solves ``(G + lam_G I) X (A + lam_A I) = V`` for the gradient matrix ``V`` of shape
``(d_out, d_in)`` with (optionally Jacobi-preconditioned) conjugate gradients in the Frobenius
inner product. The operator ``X -> G_d X A_d`` is symmetric positive definite and is applied with
two matrix products per iteration (``O(d_out d_in (d_out + d_in))``); the Kronecker product is never
formed and nothing is factorized. Each solve starts from the previous step's solution (warm start),
which is kept in :meth:`state_dict` so a resumed run is bitwise identical.

The matrix-free variant from the current batch's ``a`` and ``g`` (without factors) is not
implemented: it needs the per-batch activations, which the preconditioner's capture does not pass
to solvers.
"""

from __future__ import annotations

from typing import Any

import torch

from hw_models.validation import check_number, check_positive
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverReport, register_solver


def kronecker_cg(G: torch.Tensor, A: torch.Tensor, V: torch.Tensor, *, tol: float = 1e-4,
                 max_iter: int = 100, x0: torch.Tensor | None = None,
                 jacobi: bool = True) -> tuple[torch.Tensor, int, float]:
    """Solve ``G X A = V`` (``G``, ``A`` symmetric positive definite) by conjugate gradients.

    Stops when ``||V - G X A||_F <= tol ||V||_F`` or after ``max_iter`` iterations. Returns
    ``(X, iterations, relative residual)``.
    """
    X = torch.zeros_like(V) if x0 is None else x0.clone()
    b_norm = float(V.norm())
    if b_norm == 0:
        return torch.zeros_like(V), 0, 0.0
    R = V - G @ X @ A if x0 is not None else V.clone()
    # Jacobi preconditioner: the diagonal of kron(G, A) is outer(diag G, diag A).
    inv_diag = 1.0 / torch.outer(G.diagonal(), A.diagonal()) if jacobi else None
    Z = R * inv_diag if inv_diag is not None else R
    P = Z.clone()
    rz = (R * Z).sum()
    res = float(R.norm()) / b_norm
    it = 0
    while res > tol and it < max_iter:
        GPA = G @ P @ A
        alpha = rz / (P * GPA).sum()
        X.add_(alpha * P)
        R.sub_(alpha * GPA)
        Z = R * inv_diag if inv_diag is not None else R
        rz_new = (R * Z).sum()
        P = Z + (rz_new / rz) * P
        rz = rz_new
        it += 1
        res = float(R.norm()) / b_norm
    return X, it, res


@register_solver
class CGSolver(KFACSolver):
    """Conjugate gradients on the damped Kronecker system, warm-started from the last solution.

    Args:
        tol: relative residual ``||V - G_d X A_d|| / ||V||`` at which to stop.
        max_iter: iteration cap per solve.
        jacobi: precondition CG with the diagonal of the damped Kronecker product.
        warm_start: start each solve from the previous solution (when the shape matches).
        matrix_free: only ``False`` is supported (see the module docstring).
    """

    name = "cg"

    def __init__(self, tol: float = 1e-4, max_iter: int = 100, jacobi: bool = True,
                 warm_start: bool = True, matrix_free: bool = False) -> None:
        super().__init__()
        self.tol = check_number("tol", tol, low=0, high=1, low_inclusive=False)
        self.max_iter = check_positive("max_iter", max_iter, integer=True)
        for key, value in (("jacobi", jacobi), ("warm_start", warm_start),
                           ("matrix_free", matrix_free)):
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r} must be True or False")
        if matrix_free:
            raise ValueError("matrix_free=True (products from the current batch's a and g) is not "
                             "implemented; use matrix_free=False (products with the factors)")
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

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        assert self.A_damped is not None and self.G_damped is not None, "prepare() has not run"
        x0 = self.X_prev if (self.warm_start and self.X_prev is not None
                             and self.X_prev.shape == grad.shape) else None
        X, iters, res = kronecker_cg(self.G_damped, self.A_damped, grad, tol=self.tol,
                                     max_iter=self.max_iter, x0=x0, jacobi=self.jacobi)
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
