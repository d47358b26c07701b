"""The feasibility law: can the device represent a matrix as a positive definite programmed matrix?

Programming perturbs the normalised matrix ``P`` (``lambda_max <= 1``) by ``dP``: coupling
quantization (each coupling rounded to a step ``Delta``: error variance ``Delta^2/12`` to nearest,
``Delta^2/6`` stochastic) and static mismatch (``sigma^2 P_ij^2`` proportional, ``sigma^2``
absolute). Rounding to nearest is deterministic: the host knows every value it sends, so the
law forms that error matrix and takes its norm (:func:`perturbation_norm`). The random parts are
treated as independent entry errors: a symmetric random matrix whose spectral norm is close to
the semicircle edge ``2 sqrt(max_i sum_j var_ij)`` plus a correction for the largest single entry,
``max std_ij sqrt(2 ln n)`` (Bandeira & van Handel, Ann. Probab. 2016, give this form as a bound
up to constants). By Weyl's inequality the programmed matrix keeps
``lambda_min(P + dP) >= lambda_min(P) - ||dP||``, so a matrix is **feasible with margin m** when
``lambda_min(P) >= m ||dP||``: the smallest eigenvalue the device can represent is ``m ||dP||``.

Where the step is set: the coupling DACs' full scale is ``coupling_range`` (or, with
``coupling_range=None``, the matrix's abs-max); a device with ``diagonal_resistors`` programs the
diagonal separately (exact, or ``diagonal_bits`` over its own abs-max) and ranges its coupling
DACs over the off-diagonal abs-max (at most ``coupling_range``). Why the exact rounding term: on
a fixed range, when most entries lie below half a step, or when many entries repeat one value (the
constant border pixels of an image data set give a block of equal entries), the rounding errors
are coherent: they follow the matrix itself, and their norm is many times the independent-entry
estimate (measured: 0.38 against 0.03 at n = 785). :attr:`Feasibility.coherent` flags the first
regime. :func:`perturbation_model` (for a caller with summary statistics only, no matrix at hand:
:func:`hw_models.layer_cost.model_feasibility`) has only the independent-entry estimate and is
optimistic there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from hw_models import noise as hw_noise
from hw_models.validation import check_positive

#: Default margin: a programmed matrix must keep lambda_min >= this many predicted ||dP||.
DEFAULT_MARGIN = 2.0


def rounding_variance(step: float, rounding: str) -> float:
    """Variance of one rounding error of size ``step`` (nearest ``/12``, stochastic ``/6``)."""
    return step**2 / (6.0 if rounding == "stochastic" else 12.0)


def coupling_steps(P: torch.Tensor, noise: Any) -> tuple[float, float]:
    """``(off-diagonal step, diagonal step)`` the device programs ``P`` with (0: exact)."""
    levels = None if noise.coupling_bits is None else float(2 ** (noise.coupling_bits - 1) - 1)
    if noise.diagonal_resistors:
        off = P - torch.diag(torch.diagonal(P))
        span = float(off.abs().max()) if off.numel() else 0.0
        if noise.coupling_range is not None:
            span = min(span, float(noise.coupling_range))
        step = 0.0 if levels is None else span / levels
        if noise.diagonal_bits is None:
            return step, 0.0
        dspan = float(torch.diagonal(P).abs().max())
        return step, dspan / float(2 ** (noise.diagonal_bits - 1) - 1)
    if levels is None:
        return 0.0, 0.0
    span = float(noise.coupling_range) if noise.coupling_range is not None else float(P.abs().max())
    return span / levels, span / levels


@dataclass(frozen=True)
class Feasibility:
    """The law's verdict on one matrix.

    ``lambda_min``: of the intended normalised matrix; ``perturbation``: the predicted ``||dP||``;
    ``smallest``: the smallest representable eigenvalue, ``margin * perturbation``;
    ``feasible``: ``lambda_min >= smallest``; ``step``: the off-diagonal coupling step;
    ``coherent``: most entries lie below half a step (the law is optimistic there, module docs).
    """

    lambda_min: float
    perturbation: float
    margin: float
    step: float
    coherent: bool

    @property
    def smallest(self) -> float:
        return self.margin * self.perturbation

    @property
    def feasible(self) -> bool:
        return self.lambda_min >= self.smallest

    def reason(self) -> str:
        """One sentence: why the device can or cannot program the matrix."""
        verdict = "feasible" if self.feasible else "not representable"
        return (f"{verdict}: lambda_min {self.lambda_min:.3g} vs {self.margin:g} x predicted "
                f"||dP|| {self.perturbation:.3g} (coupling step {self.step:.3g}"
                + (", coherent rounding: law optimistic)" if self.coherent else ")"))

    def to_dict(self) -> dict[str, Any]:
        return {"lambda_min": self.lambda_min, "perturbation": self.perturbation,
                "margin": self.margin, "smallest": self.smallest, "feasible": self.feasible,
                "step": self.step, "coherent": self.coherent}


def spectral_norm(E: torch.Tensor, iterations: int = 30, seed: int = 0) -> float:
    """``||E||_2`` of a symmetric ``E`` by power iteration (``O(n^2)`` per iteration), times 1.05:
    power iteration approaches the norm from below."""
    gen = torch.Generator(device=E.device).manual_seed(seed)
    v = torch.randn(E.shape[0], generator=gen, dtype=E.dtype, device=E.device)
    norm = 0.0
    for _ in range(iterations):
        w = E @ v
        norm = float(w.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return 0.0 if norm == 0.0 else float("inf")
        v = w / norm
    return 1.05 * norm


def perturbation_norm(P: torch.Tensor, noise: Any) -> tuple[float, float, bool]:
    """``(predicted ||dP||, off-diagonal step, coherent)`` for programming ``P`` (module docs).

    Rounding to nearest is deterministic and known to the host that sends the couplings, so its
    error matrix is formed exactly and its norm taken (power iteration, ``O(n^2)`` a step): this
    covers the coherent regime. Stochastic rounding and mismatch are random: their part is the
    semicircle estimate from the entry variances. The two add (triangle inequality)."""
    P = P.double()
    n = P.shape[0]
    step, dstep = coupling_steps(P, noise)
    sigma = float(noise.mismatch_std or 0.0)
    var = torch.zeros_like(P)
    quantized = step > 0 or dstep > 0
    exact = 0.0
    if quantized and noise.rounding == "nearest":
        rounded, _ = hw_noise.program_couplings(P[None], dataclasses.replace(noise, mismatch_std=None))
        exact = spectral_norm(rounded[0] - P)
    elif quantized:
        var.fill_(rounding_variance(step, noise.rounding))
        var.diagonal().fill_(rounding_variance(dstep, noise.rounding))
    if sigma:
        var = var + (sigma**2 if noise.mismatch_kind == "absolute" else sigma**2 * P**2)
    rows, top = float(var.sum(dim=1).max()), float(var.max())
    random = 2.0 * math.sqrt(rows) + math.sqrt(top) * math.sqrt(2.0 * math.log(max(n, 2)))
    coherent = False
    if step > 0 and n > 1:
        off = (P - torch.diag(torch.diagonal(P))).abs()
        coherent = float((off < 0.5 * step).float().mean()) > 0.5 * (n - 1) / n
    return exact + random, step, coherent


def feasibility(P: torch.Tensor, noise: Any, lambda_min: float,
                margin: float = DEFAULT_MARGIN) -> Feasibility:
    """The feasibility of programming the normalised ``P`` whose smallest eigenvalue is
    ``lambda_min`` (known to the caller: a damped factor's is the damping over the scale)."""
    check_positive("margin", margin)
    norm, step, coherent = perturbation_norm(P, noise)
    return Feasibility(float(lambda_min), norm, float(margin), step, coherent)


def perturbation_model(n: int, noise: Any, *, max_coupling: float = 1.0,
                       row_norm2: float = 1.0, max_diagonal: float = 1.0) -> float:
    """Predicted ``||dP||`` from summary statistics only (pricing, where the matrix is unknown):
    ``max_coupling`` the off-diagonal abs-max, ``max_diagonal`` the diagonal's, ``row_norm2`` the
    largest squared row norm of ``P`` (at most 1 when ``lambda_max <= 1``)."""
    check_positive("n", n, integer=True)
    levels = None if noise.coupling_bits is None else float(2 ** (noise.coupling_bits - 1) - 1)
    if levels is None:
        step = dstep = 0.0
    elif noise.diagonal_resistors:
        span = max_coupling if noise.coupling_range is None else min(max_coupling, noise.coupling_range)
        step = span / levels
        dlevels = None if noise.diagonal_bits is None else float(2 ** (noise.diagonal_bits - 1) - 1)
        dstep = 0.0 if dlevels is None else max_diagonal / dlevels
    else:
        span = noise.coupling_range if noise.coupling_range is not None else max(max_coupling, max_diagonal)
        step = dstep = span / levels
    v, dv = rounding_variance(step, noise.rounding), rounding_variance(dstep, noise.rounding)
    sigma = float(noise.mismatch_std or 0.0)
    mism = sigma**2 * (n if noise.mismatch_kind == "absolute" else row_norm2)
    rows = (n - 1) * v + dv + mism
    top = max(v, dv) + sigma**2 * (1.0 if noise.mismatch_kind == "absolute" else max_diagonal**2)
    return 2.0 * math.sqrt(rows) + math.sqrt(top) * math.sqrt(2.0 * math.log(max(n, 2)))
