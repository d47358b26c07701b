"""Programming the device: the couplings (quantization, mismatch), the programmed spectrum, and
:class:`ProgrammedMatrix`, a matrix programmed once and reused by many solves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hw_models import noise as hw_noise
from hw_models.langevin import laws
from hw_models.langevin.backends import draw_seed, noise_generator
from hw_models.langevin.config import AnalogConfig, as_config, compute_device
from hw_models.langevin.problem import Array, prepare

#: NoiseConfig fields that shape the programmed couplings (must match between program and solve).
COUPLING_FIELDS = ("coupling_bits", "rounding", "mismatch_std", "mismatch_kind", "coupling_range",
                   "device_seed", "mitigation_copies", "unit", "cell_offset", "diagonal_resistors",
                   "diagonal_bits")

#: Entries a ProgrammedMatrix keeps per setting before its cache is emptied (bounds memory when
#: a caller sweeps many settings over one matrix).
_CACHE_SIZE = 16


@dataclass
class Spectrum:
    """The spectrum of the programmed matrices, as the schedule and the integrators need it."""

    lam: np.ndarray  # (K, n) float64 eigenvalues of the programmed matrices (real parts if non-sym)
    Q: torch.Tensor | None  # (K, n, n) eigenvectors, when computed
    symmetric: bool
    euler_bound: float  # largest stable Euler step over all systems


def raise_not_pd(lam: np.ndarray, programmed: bool, k: int, copies: int) -> None:
    """The error for a matrix with an eigenvalue <= 0, naming the system (and copy)."""
    lam = np.asarray(lam).reshape(-1, lam.shape[-1])
    mins = lam.min(axis=1)
    idx = int(np.argmin(mins))
    where = ""
    if k > 1 or programmed and copies > 1:
        where = f" (system {idx % k}" + (f", copy {idx // k})" if copies > 1 and programmed
                                         else ")")
    if programmed:
        raise ValueError(
            f"the programmed matrix (after coupling quantization/mismatch) is not positive "
            f"definite: lambda_min = {mins[idx]:.4g}{where}; the dynamics need all eigenvalues "
            "> 0: use more coupling_bits, a smaller mismatch_std, or more damping")
    raise ValueError(f"A is not positive definite: lambda_min = {mins[idx]:.4g}{where}; the "
                     "Langevin dynamics need all eigenvalues > 0 (add damping)")


def _raise_not_stable(mu_real: np.ndarray) -> None:
    raise ValueError(
        f"A has an eigenvalue with real part {float(mu_real.min()):.4g} <= 0; the dynamics "
        "dx = -(A x - b) dt need all eigenvalues of A to have positive real parts")


def check_ideal_pd(A: torch.Tensor, symmetric: bool, k: int, copies: int) -> None:
    """Positive definiteness (stability) of the user's A when the programmed matrix differs."""
    if symmetric:
        _, info = torch.linalg.cholesky_ex(A)
        if bool((info > 0).any()):
            lam = torch.linalg.eigvalsh(A.double()).cpu().numpy()
            raise_not_pd(lam, False, k, copies)
    else:
        mu = torch.linalg.eigvals(A.double()).real.cpu().numpy()
        if (mu <= 0).any():
            _raise_not_stable(mu)


def program_couplings(A: torch.Tensor, cfg: AnalogConfig, *, symmetric: bool, k: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(A_hw, info)``: the couplings as programmed (``(k * copies, n, n)``) with the clip count
    and quantization step of :func:`hw_models.noise.program_couplings`."""
    if cfg.noise.programs_couplings:
        check_ideal_pd(A, symmetric, k, cfg.noise.mitigation_copies)
    return hw_noise.program_couplings(A, cfg.noise, copies=cfg.noise.mitigation_copies,
                                      generator=generator)


def compute_spectrum(A_hw: torch.Tensor, cfg: AnalogConfig, *, symmetric: bool, vectors: bool,
                     k: int) -> Spectrum:
    """Eigenvalues (and with ``vectors`` eigenvectors) of the programmed matrices; raises when the
    dynamics would not be stable."""
    programmed = cfg.noise.programs_couplings
    copies = cfg.noise.mitigation_copies
    if not symmetric:
        mu = torch.linalg.eigvals(A_hw.double()).cpu().numpy()
        if (mu.real <= 0).any():
            if programmed:
                raise ValueError(
                    "the programmed matrix (after coupling quantization/mismatch) has an "
                    f"eigenvalue with real part {float(mu.real.min()):.4g} <= 0; use more "
                    "coupling_bits or a smaller mismatch_std")
            _raise_not_stable(mu.real)
        bound = float(np.min(2.0 * mu.real / np.abs(mu) ** 2))
        return Spectrum(lam=mu.real, Q=None, symmetric=False, euler_bound=bound)
    Q = None
    try:
        if vectors:
            lam_t, Q = torch.linalg.eigh(A_hw)
        else:
            lam_t = torch.linalg.eigvalsh(A_hw)
    except RuntimeError:  # float32 LAPACK can fail to converge; retry in float64
        if vectors:
            lam_t, Q = torch.linalg.eigh(A_hw.double())
            Q = Q.to(A_hw.dtype)
        else:
            lam_t = torch.linalg.eigvalsh(A_hw.double())
    lam = lam_t.double().cpu().numpy()
    if (lam[:, 0] <= 0).any():
        raise_not_pd(lam, programmed, k, copies)
    lam_max = float(lam[:, -1].max())
    if cfg.dynamics == "overdamped":
        bound = 2.0 / lam_max
    else:
        bound = laws.ud_stable_dt(lam_max, cfg.mass, cfg.friction)
    return Spectrum(lam=lam, Q=Q, symmetric=True, euler_bound=bound)


@dataclass(frozen=True)
class ProgrammedMatrix:
    """A symmetric matrix programmed into the simulated device once, reused by many solves.

    Made by :func:`program`; pass it to :func:`~hw_models.langevin.solve_programmed` (or
    :func:`~hw_models.langevin.solve` in place of ``A``). A real device keeps its couplings
    between right-hand sides, so quantization (including stochastic rounding, one draw per copy)
    and mismatch are applied once here, and the spectrum of the programmed matrix (which the
    simulator needs for ``dt="auto"`` and the eigenbasis integrators) is computed once.

    Attributes:
        A: the ideal matrix, canonical ``(k, n, n)``.
        A_hw: the programmed matrices ``(k * copies, n, n)`` (copy-major).
        noise: the :class:`NoiseConfig` it was programmed with.
        batched: whether the user gave a batch ``(k, n, n)``.
        clipped: coupling values clipped by a fixed ``coupling_range``.
        step: quantization step per system (``None`` without coupling quantization).
        spectrum: eigenvalues and eigenvectors of ``A_hw``.
        coupling_error: ``||A_hw - A||_F / ||A||_F`` averaged over copies (0 when ideal).
    """

    A: torch.Tensor
    A_hw: torch.Tensor
    noise: hw_noise.NoiseConfig
    batched: bool
    clipped: int
    step: torch.Tensor | None
    spectrum: Spectrum
    coupling_error: float
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def memo(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per ``key`` for this matrix (per-setting quantities that
        only depend on the programmed spectrum); a bounded cache."""
        hit = self._cache.get(key)
        if hit is None:
            hit = build()
            if len(self._cache) > _CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def generator(self, device: torch.device) -> torch.Generator:
        """One torch generator per device kept with this matrix, for solves that reseed it every
        call (the same stream as a fresh generator, without creating one per call)."""
        key = ("generator", device)
        gen = self._cache.get(key)
        if gen is None:
            gen = self._cache[key] = torch.Generator(device=device)
        return gen

    def streams(self, seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """The two random streams of a run seeded with ``seed`` (the dynamics' and the
        non-idealities', as :func:`hw_models.langevin.backends.make_streams` derives them), on two
        generators kept with this matrix and reseeded (no generator made per call)."""
        key_dyn, key_noise = np.random.SeedSequence(int(seed)).generate_state(2, dtype=np.uint64)
        dyn = self.generator(device)
        key = ("noise-generator", device)
        gen = self._cache.get(key)
        if gen is None:
            gen = self._cache[key] = torch.Generator(device=device)
        dyn.manual_seed(int(key_dyn) % 2**63)
        gen.manual_seed(int(key_noise) % 2**63)
        return dyn, gen

    def analytic_coefficients(self, burn_in: float, window: float, kappa0: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(lam, w, sd, var sum)`` of the analytic time average: ``(k*copies, n, 1)`` tensors and the
        per-system sum of the mode variances (mean over copies); cached per (burn-in, window, kappa0)."""
        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
            lam = self.spectrum.lam
            w, var = laws.od_time_average(lam, burn_in, window, kappa0)
            opts = {"dtype": self.A_hw.dtype, "device": self.A_hw.device}
            return (torch.as_tensor(lam, **opts).unsqueeze(-1),
                    torch.as_tensor(w, **opts).unsqueeze(-1),
                    torch.as_tensor(np.sqrt(var), **opts).unsqueeze(-1),
                    float(np.mean(np.sum(var, axis=1))))

        return self.memo((float(burn_in), float(window), float(kappa0)), build)

    @property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of the programmed matrices, ``(k * copies, n)`` ascending (float64)."""
        return self.spectrum.lam

    def check_config(self, cfg: AnalogConfig) -> None:
        """Raise if ``cfg.noise`` would program different couplings than this matrix has."""
        if self.noise is cfg.noise:  # the usual case: programmed with this very config
            return
        for name in COUPLING_FIELDS:
            if getattr(self.noise, name) != getattr(cfg.noise, name):
                raise ValueError(f"the ProgrammedMatrix was programmed with {name}="
                                 f"{getattr(self.noise, name)!r} but config.noise has {name}="
                                 f"{getattr(cfg.noise, name)!r}; program it again with this config")


def program(A: Array, config: AnalogConfig | None = None) -> ProgrammedMatrix:
    """Program the symmetric positive definite ``A`` (``(n, n)`` or ``(k, n, n)``) into the device.

    Applies coupling quantization and mismatch of ``config.noise`` (stochastic rounding draws from
    ``config.seed``) and computes the programmed spectrum. :func:`solve` then accepts the result
    instead of ``A`` for any number of right-hand sides (with the same coupling settings), skipping
    the per-call programming and ``O(n^3)`` eigendecomposition.
    """
    cfg = as_config(config)
    prob = prepare(A, None, None, device=compute_device(cfg, A), dtype=cfg.dtype,
                   require_symmetric=True, why="program (the programmed system is cached in its "
                   "eigenbasis)", vector_x0=True)
    if cfg.backend == "numba" and prob.A.device.type != "cpu":
        raise ValueError(f"backend='numba' runs on the CPU, but the input is on {prob.A.device}; "
                         "use backend='torch' or move the input to the CPU")
    gen = noise_generator(draw_seed(cfg.seed), prob.A.device)
    A_hw, info = program_couplings(prob.A, cfg, symmetric=prob.symmetric, k=prob.k, generator=gen)
    A_hw = A_hw.contiguous()
    spec = compute_spectrum(A_hw, cfg, symmetric=prob.symmetric, vectors=True, k=prob.k)
    copies = cfg.noise.mitigation_copies
    diff = torch.linalg.matrix_norm(A_hw - prob.A.repeat(copies, 1, 1))
    error = float((diff / torch.linalg.matrix_norm(prob.A).repeat(copies).clamp_min(1e-300)).mean())
    step = None
    if info["step"] is not None:
        step = torch.as_tensor(info["step"].cpu().numpy(), dtype=torch.float64).reshape(-1)
    return ProgrammedMatrix(A=prob.A, A_hw=A_hw, noise=cfg.noise, batched=prob.batched,
                            clipped=int(info["clipped"]), step=step, spectrum=spec,
                            coupling_error=error)
