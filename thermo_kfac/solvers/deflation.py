"""Digital deflation of a damped factor's top modes, so that the device solves a well-conditioned
remainder (the thermodynamic solver's ``deflate`` option; ``docs/thermodynamic_kfac.md``).

With ``k`` approximate top eigenpairs ``U, L`` of the (undamped, symmetric) factor ``F``
(:func:`~thermo_kfac.solvers.randomized.top_eigenpairs`: a randomized range and Rayleigh-Ritz,
``O(n^2 k)``), and the projector ``Pc = I - U U^T``::

    (F + lam I)^-1 b  ~  U (L + lam)^-1 U^T b  +  Pc (R + lam I)^-1 Pc b,     R = Pc F Pc

The host applies the first term; the device solves the remainder system ``R + lam I``, whose
eigenvalues are ``lam`` on ``span(U)`` and ``lambda_i(F) + lam`` (``i > k``) on its complement, so its
condition number falls from ``(lambda_1 + lam) / lam`` to ``(lambda_{k+1} + lam) / lam``. The
device's input is projected (``Pc b``: nothing excites the ``span(U)`` modes) and so is its output
(``Pc y``: their thermal noise is removed). With exact eigenvectors the formula is exact. With Ritz
vectors it is the exact solution of the block-diagonal part of ``F + lam I`` in the basis
``[U, Pc]``: the coupling it drops, ``r = F U - U L`` (the Ritz residual), is the **leak**; it is
reported per factor (``deflation_residual``: ``max_i ||r_i|| / lam``) and its effect on the solve is
part of the measured error (``track_exact``). Two power iterations keep the leak below 1e-3 of the
solution on the 784-512-512-10 workload's factors.

Host work (priced like any host work): the eigenpairs and the remainder once per prepare, and
three ``n x k x m`` products per solve (``U^T b``, ``U c``, the output projection).
"""

from __future__ import annotations

__all__ = ["AUTO_DEPTHS", "OVERSAMPLE", "POWER_ITERATIONS", "Deflated", "apply_gemms", "auto_depths",
           "deflate", "prepare_gemms"]

from dataclasses import dataclass

import torch

from hw_models import pricing
from hw_models.layer_cost import AUTO_DEPTHS, auto_depths
from thermo_kfac.solvers.randomized import top_eigenpairs

#: Oversampling and power iterations of the eigenpair sketch (stated with its host GEMMs in
#: :mod:`hw_models.pricing`; the depths ``deflate="auto"`` tries are :data:`AUTO_DEPTHS`).
OVERSAMPLE = pricing.DEFLATION_OVERSAMPLE
POWER_ITERATIONS = pricing.DEFLATION_POWER_ITERATIONS


@dataclass
class Deflated:
    """The top modes a factor's solve handles digitally: ``U`` ``(n, k)``, ``L`` ``(k,)``, ``lam``."""

    U: torch.Tensor
    L: torch.Tensor
    lam: float
    residual: float  # max_i ||F u_i - l_i u_i|| / lam (the leak's size)

    @property
    def k(self) -> int:
        return int(self.L.numel())

    def split(self, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U^T B, Pc B)``: the deflated coefficients and the remainder's right-hand side."""
        C = self.U.T @ B
        return C, torch.addmm(B, self.U, C, alpha=-1.0)

    def project(self, X: torch.Tensor) -> torch.Tensor:
        """``Pc X``: the complement part of a (device) solution."""
        return X - self.U @ (self.U.T @ X)

    def combine(self, C: torch.Tensor, X_rem: torch.Tensor) -> torch.Tensor:
        """``U (L + lam)^-1 C + Pc X_rem``: the full solution."""
        # X_rem + U ((L + lam)^-1 C - U^T X_rem): one product with U instead of two, no temporary
        coef = (C / (self.L + self.lam)[:, None]).sub_(self.U.T @ X_rem)
        return torch.addmm(X_rem, self.U, coef)


def deflate(F: torch.Tensor, k: int, lam: float, seed: int) -> tuple[Deflated | None, torch.Tensor]:
    """``(deflated modes or None for k=0, remainder R + lam I)`` of the symmetric factor ``F``."""
    n = F.shape[0]
    eye = torch.eye(n, dtype=F.dtype, device=F.device)
    if k == 0:
        return None, F + lam * eye
    gen = torch.Generator(device=F.device).manual_seed(int(seed) % 2**63)
    L, U = top_eigenpairs(F, k, OVERSAMPLE, POWER_ITERATIONS, gen)
    FU = F @ U
    UtFU = U.T @ FU
    # Pc F Pc = F - U (FU)^T - FU U^T + U (U^T F U) U^T, symmetrised against rounding
    R = F - U @ FU.T - FU @ U.T + U @ UtFU @ U.T
    R = 0.5 * (R + R.T)
    residual = float((FU - U * L).norm(dim=0).max()) / lam if lam > 0 else float("inf")
    return Deflated(U=U, L=L, lam=float(lam), residual=residual), R + lam * eye


def prepare_gemms(n: int, k: int) -> list[tuple[int, int, int]]:
    """The host GEMM shapes of one factor's deflation (:func:`hw_models.pricing.deflation_gemms`
    with this module's sketch settings)."""
    return pricing.deflation_gemms(n, k, oversample=OVERSAMPLE, power_iterations=POWER_ITERATIONS)


def apply_gemms(n: int, k: int, m: int) -> list[tuple[int, int, int]]:
    """The GEMM shapes deflation adds to one solve with ``m`` right-hand sides."""
    return pricing.deflation_gemms(n, k, m)
