"""Digital solvers: eigendecomposition and Cholesky factorization of the damped factors.

Both keep explicit inverses of the damped factors after :meth:`prepare`, so applying the
preconditioner costs two matrix products per layer and step (the cheapest form; the
factorization cost is amortized over ``inverse_update_every`` steps).
"""

from __future__ import annotations

from typing import Any

import torch

from thermo_kfac.gram import gram
from thermo_kfac.solvers.base import Damping, KFACSolver, register_solver


class _ExplicitInverseSolver(KFACSolver):
    """Applies stored inverses: ``G_inv @ grad @ A_inv``."""

    def __init__(self) -> None:
        super().__init__()
        self.A_inv: torch.Tensor | None = None
        self.G_inv: torch.Tensor | None = None

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        assert self.A_inv is not None and self.G_inv is not None, "prepare() has not run"
        return self.G_inv @ grad @ self.A_inv

    def state_dict(self) -> dict[str, Any]:
        if self.A_inv is None:
            return {}
        return {"A_inv": self.A_inv, "G_inv": self.G_inv}


@register_solver
class EighSolver(_ExplicitInverseSolver):
    """Eigendecomposition of each factor.

    With ``exact_damping=False`` (default) it inverts the factored damping of :class:`Damping`;
    with ``exact_damping=True`` it applies ``(kron(G, A) + lambda I)^-1`` exactly in the
    eigenbases (four matrix products per step instead of two). Eigenvalues below zero
    (round-off on singular factors) are clipped to zero.
    """

    name = "eigh"

    def __init__(self, exact_damping: bool = False) -> None:
        super().__init__()
        if not isinstance(exact_damping, bool):
            raise ValueError(f"exact_damping={exact_damping!r} must be True or False")
        self.exact_damping = exact_damping
        self.scale: torch.Tensor | None = None  # exact damping: 1 / (dG dA^T + lambda)

    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        dA, QA = robust_eigh(A)
        dG, QG = robust_eigh(G)
        dA, dG = dA.clamp_min(0), dG.clamp_min(0)
        if self.exact_damping:
            # Keep the eigenbases in the A_inv/G_inv slots; apply() rotates in and out.
            self.A_inv, self.G_inv = QA, QG
            self.scale = 1.0 / (torch.outer(dG, dA) + damping.value)
            return
        lam_a, lam_g = damping.split(A, G)
        # Q diag(1/(d + lam)) Q^T = B B^T with B = Q diag((d + lam)^-1/2): a symmetric product
        self.A_inv = gram((QA * (dA + lam_a).rsqrt()).T)
        self.G_inv = gram((QG * (dG + lam_g).rsqrt()).T)

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.exact_damping:
            return super().apply(grad)
        QA, QG = self.A_inv, self.G_inv
        assert QA is not None and QG is not None and self.scale is not None, "prepare() has not run"
        return QG @ ((QG.T @ grad @ QA) * self.scale) @ QA.T

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state and self.exact_damping:
            state["scale"] = self.scale
        return state


def robust_eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh that retries in float64 when LAPACK's float32 divide-and-conquer fails to converge
    (it does on factors with many repeated eigenvalues, e.g. from dead ReLU units)."""
    try:
        return torch.linalg.eigh(M)
    except torch.linalg.LinAlgError:
        vals, vecs = torch.linalg.eigh(M.double())
        return vals.to(M.dtype), vecs.to(M.dtype)


@register_solver
class CholeskySolver(_ExplicitInverseSolver):
    """Cholesky factorization of each damped factor (about 3x fewer FLOPs than eigh).

    Only the factored damping is possible. A factor that is not positive definite in its
    precision (zero damping on a singular factor) is retried in float64 with a small jitter.
    """

    name = "cholesky"
    digital_method = "cholesky"

    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        lam_a, lam_g = damping.split(A, G)
        self.A_inv = _damped_inverse(A, lam_a)
        self.G_inv = _damped_inverse(G, lam_g)


def _damped_inverse(M: torch.Tensor, lam: float) -> torch.Tensor:
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    L, info = torch.linalg.cholesky_ex(M + lam * eye)
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    jitter = lam + 1e-10 * float(M.diagonal().abs().max().clamp_min(1.0))
    L64 = torch.linalg.cholesky(M.double() + jitter * eye.double())
    return torch.cholesky_inverse(L64).to(M.dtype)
