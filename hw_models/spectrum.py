"""Spectrum summaries of damped factors: what pricing and the error law need of a spectrum.

:class:`SpectrumSummary` (re-exported by :mod:`hw_models.pricing`, its home for callers) keeps
``lambda_min``, ``lambda_max``, ``tr(P^-2)``, the effective rank and the normalised eigenvalues
(all of them up to :data:`MAX_MODES`, else a quantile sketch of :data:`SKETCH_GROUPS` groups).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from hw_models.validation import check_choice, check_number, check_positive

SPECTRUM_SHAPES = ("geometric", "worst", "measured")
#: Spectra up to this size keep every eigenvalue; larger ones a quantile sketch of 64 groups.
MAX_MODES = 256
SKETCH_GROUPS = 64




@dataclass(frozen=True)
class SpectrumSummary:
    """What pricing needs of a damped factor's spectrum.

    ``lambda_min``/``lambda_max`` are of the matrix as given (unnormalised); ``trace_inv_sq`` is
    ``tr(P^-2)`` and ``effective_rank`` ``tr(P) = tr(M)/lambda_max`` of the normalised ``P``.
    ``modes``/``weights``: normalised eigenvalues (all of them up to :data:`MAX_MODES`, else a
    sketch of equal-count groups, each represented by ``mean(lam^-2)^(-1/2)`` so ``tr(P^-2)`` is
    exact) and how many eigenvalues each stands for. ``shape`` says where they came from.
    """

    n: int
    lambda_min: float
    lambda_max: float
    trace_inv_sq: float
    effective_rank: float
    shape: str = "measured"
    modes: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()
    max_coupling: float | None = None  # off-diagonal abs-max of the normalised P, when known

    @property
    def kappa(self) -> float:
        return self.lambda_max / self.lambda_min

    @classmethod
    def from_eigenvalues(cls, eigenvalues: Any, *, shape: str = "measured") -> SpectrumSummary:
        """From all eigenvalues of a symmetric positive definite matrix."""
        lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).reshape(-1))
        if lam.size == 0 or not np.all(np.isfinite(lam)) or lam[0] <= 0:
            raise ValueError("a spectrum needs finite eigenvalues > 0 (a positive definite matrix); "
                             f"got min {lam[0] if lam.size else 'none'}")
        top = float(lam[-1])
        p = lam / top
        if p.size <= MAX_MODES:
            modes, weights = p, np.ones_like(p)
        else:
            groups = np.array_split(p, SKETCH_GROUPS)
            modes = np.array([float(np.mean(g**-2.0)) ** -0.5 for g in groups])
            weights = np.array([float(g.size) for g in groups])
        return cls(n=int(lam.size), lambda_min=float(lam[0]), lambda_max=top,
                   trace_inv_sq=float(np.sum(p**-2.0)), effective_rank=float(np.sum(p)), shape=shape,
                   modes=tuple(float(v) for v in modes), weights=tuple(float(v) for v in weights))

    @classmethod
    def from_matrix(cls, matrix: Any) -> SpectrumSummary:
        """From a symmetric positive definite matrix (numpy or torch), by ``eigvalsh`` in float64."""
        try:
            import torch

            if isinstance(matrix, torch.Tensor):
                matrix = matrix.detach().to("cpu", torch.float64).numpy()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        M = np.asarray(matrix, dtype=np.float64)
        if M.ndim != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"a spectrum needs a square matrix; got shape {M.shape}")
        return cls.from_eigenvalues(np.linalg.eigvalsh(0.5 * (M + M.T)))

    @classmethod
    def from_kappa(cls, n: int, kappa: float, *, shape: str = "geometric") -> SpectrumSummary:
        """A model spectrum of size ``n`` and condition number ``kappa`` (``lambda_max = 1``).

        ``"geometric"`` (default): eigenvalues log-uniform between ``1/kappa`` and 1,
        ``lam_i = kappa^(-i/(n-1))`` -- a spread-out spectrum like those of damped K-FAC factors.
        ``"worst"``: one eigenvalue 1, the rest ``1/kappa`` (the bound ``tr(P^-2) <= n kappa^2``).
        """
        check_positive("n", n, integer=True)
        check_number("kappa", kappa, low=1.0)
        check_choice("shape", shape, ("geometric", "worst"))
        return _model_spectrum(int(n), float(kappa), shape)

    def resized(self, n: int) -> SpectrumSummary:
        """The same normalised spectrum shape for a system of size ``n`` (a diagonal block)."""
        if n == self.n:
            return self
        scale = n / self.n
        lam, w = self.normalized_modes()
        return dataclasses.replace(self, n=int(n), trace_inv_sq=self.trace_inv_sq * scale,
                                   effective_rank=self.effective_rank * scale,
                                   weights=tuple(float(v) for v in w * scale))

    def normalized_modes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lam, weights)`` of the lambda_max-normalised ``P`` for the error model."""
        if not self.modes:
            model = _model_spectrum(self.n, self.kappa, "geometric")
            return np.asarray(model.modes), np.asarray(model.weights)
        return np.asarray(self.modes), np.asarray(self.weights)

    def to_dict(self, *, modes: bool = False) -> dict[str, Any]:
        """JSON-ready dict (trace.json's ``spectrum``); ``modes=True`` keeps the eigenvalue sketch."""
        out: dict[str, Any] = {"n": self.n, "lambda_min": self.lambda_min, "lambda_max": self.lambda_max,
                               "kappa": self.kappa, "trace_inv_sq": self.trace_inv_sq,
                               "effective_rank": self.effective_rank, "shape": self.shape}
        if modes:
            out["modes"], out["weights"] = list(self.modes), list(self.weights)
        if self.max_coupling is not None:
            out["max_coupling"] = self.max_coupling
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectrumSummary:
        """Inverse of :meth:`to_dict`. Without ``modes`` the normalised eigenvalues are the
        geometric model at the stored ``kappa`` (the stored ``trace_inv_sq`` is kept as reported)."""
        try:
            n = int(data["n"])
            lo, hi = float(data["lambda_min"]), float(data["lambda_max"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"a spectrum summary needs n, lambda_min, lambda_max: {err}") from None
        if not (0 < lo <= hi) or n < 1:
            raise ValueError(f"invalid spectrum summary: n={n}, lambda_min={lo}, lambda_max={hi}")
        if data.get("modes"):
            modes = tuple(float(v) for v in data["modes"])
            weights = tuple(float(v) for v in data.get("weights") or [1.0] * len(modes))
        else:
            model = _model_spectrum(n, hi / lo, "geometric")
            modes, weights = model.modes, model.weights
        tr = float(data.get("trace_inv_sq") or sum(w / m**2 for m, w in zip(modes, weights, strict=True)))
        rank = float(data.get("effective_rank") or sum(w * m for m, w in zip(modes, weights, strict=True)))
        return cls(n=n, lambda_min=lo, lambda_max=hi, trace_inv_sq=tr, effective_rank=rank,
                   shape=str(data.get("shape", "measured")), modes=modes, weights=weights)


@functools.lru_cache(maxsize=512)
def _model_spectrum(n: int, kappa: float, shape: str) -> SpectrumSummary:
    if shape == "worst":
        lam = np.full(n, 1.0 / kappa)
        lam[-1] = 1.0
    else:
        lam = kappa ** -(np.arange(n)[::-1] / max(n - 1, 1)) if n > 1 else np.ones(1)
    return SpectrumSummary.from_eigenvalues(lam, shape=shape)
