"""``solve`` and ``inverse``: run the simulated device and return the estimate with diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hw_models import noise as hw_noise
from hw_models.langevin import laws
from hw_models.langevin.config import AnalogConfig
from hw_models.langevin.problem import Array, Problem, _check_finite, prepare


@dataclass(frozen=True)
class AnalogResult:
    """What one analog solve returns.

    Attributes:
        x: the estimate (``A^-1 B`` for :func:`solve`, ``A^-1`` for :func:`inverse`), in the
            input's shape and array kind (numpy in, numpy out; torch in, torch out).
        analog_time: simulated device time in tau: (burn-in + averaging window) x copies.
        n_samples: state samples averaged per column and copy (0 for the analytic solve, whose
            estimate is the continuous-time average).
        diagnostics: a dict; see ``docs/simulator.md`` for the keys.
        state: for a :func:`solve` of a :class:`ProgrammedMatrix` on the analytic fast path, the
            estimate before read-out in the eigenbasis of the programmed matrix, ``(copies, n, m)``
            (pass it back as ``x0_eigen`` to continue from it); ``None`` otherwise.
    """

    x: Array
    analog_time: float
    n_samples: int
    diagnostics: dict[str, Any]
    state: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# backends behind one interface


class _TorchBackend:
    name = "torch"

    def __init__(self, key: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(key % 2**63)

    def normal(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=like.dtype, device=like.device)

    def euler_mean(self, A, B, X0, **kw) -> torch.Tensor:
        from hw_models.langevin import torch_backend

        return torch_backend.euler_mean(A, B, X0, generator=self.generator, **kw)

    def euler_second_moment(self, A, x0, **kw) -> tuple[torch.Tensor, int]:
        from hw_models.langevin import torch_backend

        return torch_backend.euler_second_moment(A, x0, generator=self.generator, **kw)

    def eig_mean(self, coef, coef_burn, U0, **kw) -> torch.Tensor:
        from hw_models.langevin import torch_backend

        return torch_backend.eig_mean(coef, coef_burn, U0, generator=self.generator, **kw)

    def eig_second_moment(self, coef, coef_burn, u0, Q, **kw) -> tuple[torch.Tensor, int]:
        from hw_models.langevin import torch_backend

        return torch_backend.eig_second_moment(coef, coef_burn, u0, Q, generator=self.generator,
                                               **kw)


_BLAS_CONTROLLER: Any = None


def _single_threaded_blas() -> Any:
    """Context limiting the BLAS that numba calls (scipy's OpenBLAS) to one thread.

    Each numba thread runs its own GEMMs; a multi-threaded BLAS inside numba's OpenMP region
    would oversubscribe the cores (OpenBLAS even warns it may hang), and its busy-waiting
    workers would steal the cores from numba's threads. scipy's BLAS is loaded first so that the
    limit covers it (threadpoolctl only sees libraries already loaded).
    """
    global _BLAS_CONTROLLER
    try:
        import scipy.linalg.cython_blas  # noqa: F401 - loads the library numba's np.dot calls
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - both come with scipy / scikit-learn
        import contextlib

        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


class _NumbaBackend:
    """Adapter: canonical torch CPU tensors <-> the numba kernels' numpy layouts."""

    name = "numba"

    def __init__(self, key: int, device: torch.device) -> None:
        from hw_models.langevin import numba_backend

        self.nb = numba_backend
        self.key = key
        self.calls = 0

    def _streams(self, n: int) -> np.ndarray:
        self.calls += 1
        return self.nb.make_streams(self.key * 1_000_003 + self.calls, n)

    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.nb.ZIG_X, self.nb.ZIG_R, self.nb.ZIG_F

    def normal(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        out = np.empty((rows, shape[-1]), dtype=np.float64)
        self.nb.fill_normal(out, self._streams(rows), *self._tables())
        return torch.from_numpy(out.reshape(shape)).to(like.dtype)

    @staticmethod
    def _readout_args(readout: hw_noise.NoiseConfig | None) -> tuple[float, float, float, bool]:
        if readout is None:
            return 0.0, 0.0, 0.0, False
        levels = 0.0 if readout.output_bits is None else float(2 ** (readout.output_bits - 1) - 1)
        return (float(readout.read_noise or 0.0), levels, float(readout.output_range or 0.0),
                readout.rounding == "stochastic")

    def euler_mean(self, A, B, X0, *, dt, kappa0, n_burn, n_avg, underdamped, mass,
                   friction) -> torch.Tensor:
        k, n, m = B.shape
        sigma = math.sqrt(2.0 * kappa0 * dt * (friction if underdamped else 1.0))
        At = np.ascontiguousarray(A.numpy().transpose(0, 2, 1))
        Bt = np.ascontiguousarray(B.numpy().transpose(0, 2, 1))
        X0t = np.ascontiguousarray(X0.numpy().transpose(0, 2, 1))
        out = np.empty_like(Bt)
        threads = self.nb.numba.get_num_threads()
        # enough (system, column-block) tasks to keep every thread busy
        per_system = max(1, -(-2 * threads // k))
        block = max(1, -(-m // per_system))
        with _single_threaded_blas():
            self.nb.euler_mean(At, Bt, X0t, dt, sigma, 1.0 - dt * friction / mass, dt / mass,
                               underdamped, n_burn, n_avg, block, self._streams(k * m),
                               *self._tables(), out)
        return torch.from_numpy(out.transpose(0, 2, 1).copy())

    def euler_second_moment(self, A, x0, *, dt, kappa0, n_burn, n_avg, underdamped, mass,
                            friction, readout) -> tuple[torch.Tensor, int]:
        k, n, _ = x0.shape
        sigma = math.sqrt(2.0 * kappa0 * dt * (friction if underdamped else 1.0))
        out = np.empty((k, n, n), dtype=x0.numpy().dtype)
        clipped = np.zeros(k, dtype=np.int64)
        with _single_threaded_blas():
            self.nb.euler_second_moment(
                A.numpy(), np.ascontiguousarray(x0.numpy()[:, :, 0]), dt, sigma,
                1.0 - dt * friction / mass, dt / mass, underdamped, n_burn, n_avg, 256,
                *self._readout_args(readout), self._streams(k), *self._tables(), out, clipped)
        return torch.from_numpy(out), int(clipped.sum())

    def eig_mean(self, coef, coef_burn, U0, *, n_avg, underdamped) -> torch.Tensor:
        k, n, m = U0.shape
        U0t = np.ascontiguousarray(U0.numpy().transpose(0, 2, 1))
        out = np.empty_like(U0t)
        self.nb.eig_mean(np.ascontiguousarray(coef), np.ascontiguousarray(coef_burn), U0t, n_avg,
                         underdamped, self._streams(k * m), *self._tables(), out)
        return torch.from_numpy(out.transpose(0, 2, 1).copy())

    def eig_second_moment(self, coef, coef_burn, u0, Q, *, n_avg, underdamped,
                          readout) -> tuple[torch.Tensor, int]:
        k, n, _ = u0.shape
        dtype = u0.numpy().dtype
        out = np.empty((k, n, n), dtype=dtype)
        clipped = np.zeros(k, dtype=np.int64)
        rotate = readout is not None
        with _single_threaded_blas():
            self.nb.eig_second_moment(
                np.ascontiguousarray(coef), np.ascontiguousarray(coef_burn),
                np.ascontiguousarray(u0.numpy()[:, :, 0]), np.ascontiguousarray(Q.numpy()),
                rotate, n_avg, underdamped, 256, *self._readout_args(readout), self._streams(k),
                *self._tables(), out, clipped)
        S = torch.from_numpy(out)
        if not rotate:
            S = Q @ S @ Q.transpose(1, 2)
        return S, int(clipped.sum())


# ---------------------------------------------------------------------------------------------
# one run


@dataclass
class _Spectrum:
    lam: np.ndarray  # (K, n) float64 eigenvalues of the programmed matrices (real parts if non-sym)
    Q: torch.Tensor | None  # (K, n, n) eigenvectors, when computed
    symmetric: bool
    euler_bound: float  # largest stable Euler step over all systems


def _seed(config: AnalogConfig) -> int:
    if config.seed is not None:
        return int(config.seed)
    return int(np.random.SeedSequence().entropy % 2**63)


def _per_system(values: np.ndarray, batched: bool) -> Any:
    values = np.asarray(values, dtype=np.float64)
    return values if batched else float(values[0])


class _Run:
    def __init__(self, config: AnalogConfig, prob: Problem, estimator: str) -> None:
        self.cfg = config
        self.prob = prob
        self.estimator = estimator
        self.copies = config.noise.mitigation_copies
        self.seed = _seed(config)
        key_dyn, key_noise = np.random.SeedSequence(self.seed).generate_state(2, dtype=np.uint64)
        device = prob.A.device
        if config.backend == "numba" and device.type != "cpu":
            raise ValueError(f"backend='numba' runs on the CPU, but the input is on {device}; use "
                             "backend='torch' or move the input to the CPU")
        backend_cls = _NumbaBackend if config.backend == "numba" else _TorchBackend
        self.backend = backend_cls(int(key_dyn), device)
        self.noise_gen = torch.Generator(device=device)
        self.noise_gen.manual_seed(int(key_noise) % 2**63)
        self.diag: dict[str, Any] = {
            "seed": self.seed, "estimator": estimator, "integrator": config.integrator,
            "dynamics": config.dynamics, "backend": config.backend, "device": str(device),
            "dtype": str(prob.A.dtype).replace("torch.", ""), "copies": self.copies,
            "clipped_couplings": 0, "clipped_inputs": 0, "clipped_outputs": 0,
        }

    # -- hardware -----------------------------------------------------------------------------

    def check_ideal_pd(self) -> None:
        """Positive definiteness of the user's A when the programmed matrix differs from it."""
        A = self.prob.A
        if self.prob.symmetric:
            _, info = torch.linalg.cholesky_ex(A)
            if bool((info > 0).any()):
                lam = torch.linalg.eigvalsh(A.double()).cpu().numpy()
                self._raise_not_pd(lam, programmed=False)
        else:
            mu = torch.linalg.eigvals(A.double()).real.cpu().numpy()
            if (mu <= 0).any():
                self._raise_not_stable(mu)

    def program(self, programmed: ProgrammedMatrix | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noise = self.cfg.noise
        c = self.copies
        if programmed is not None:  # couplings already on the device: only the inputs load
            A_hw, info = programmed.A_hw, {"clipped": programmed.clipped, "step": programmed.step}
        else:
            if noise.programs_couplings:
                self.check_ideal_pd()
            A_hw, info = hw_noise.program_couplings(self.prob.A, noise, copies=c,
                                                    generator=self.noise_gen)
        B_hw, clipped_in = hw_noise.load_inputs(self.prob.B, noise, copies=c,
                                                generator=self.noise_gen)
        X0 = self.prob.X0.repeat(c, 1, 1) if c > 1 else self.prob.X0
        self.diag["clipped_couplings"] = info["clipped"]
        self.diag["clipped_inputs"] = clipped_in
        if info["step"] is not None:
            self.diag["coupling_step"] = _per_system(info["step"].cpu().numpy(), self.batched)
        return A_hw.contiguous(), B_hw.contiguous(), X0.contiguous()

    @property
    def batched(self) -> bool:
        return self.prob.batched

    def _raise_not_pd(self, lam: np.ndarray, programmed: bool) -> None:
        lam = np.asarray(lam).reshape(-1, lam.shape[-1])
        mins = lam.min(axis=1)
        idx = int(np.argmin(mins))
        k = self.prob.k
        where = ""
        if k > 1 or programmed and self.copies > 1:
            where = f" (system {idx % k}" + (f", copy {idx // k})" if self.copies > 1 and programmed
                                             else ")")
        if programmed:
            raise ValueError(
                f"the programmed matrix (after coupling quantization/mismatch) is not positive "
                f"definite: lambda_min = {mins[idx]:.4g}{where}; the dynamics need all eigenvalues "
                "> 0: use more coupling_bits, a smaller mismatch_std, or more damping")
        raise ValueError(f"A is not positive definite: lambda_min = {mins[idx]:.4g}{where}; the "
                         "Langevin dynamics need all eigenvalues > 0 (add damping)")

    def _raise_not_stable(self, mu_real: np.ndarray) -> None:
        raise ValueError(
            f"A has an eigenvalue with real part {float(mu_real.min()):.4g} <= 0; the dynamics "
            "dx = -(A x - b) dt need all eigenvalues of A to have positive real parts")

    def spectrum(self, A_hw: torch.Tensor, vectors: bool) -> _Spectrum:
        cfg = self.cfg
        programmed = cfg.noise.programs_couplings
        if not self.prob.symmetric:
            mu = torch.linalg.eigvals(A_hw.double()).cpu().numpy()
            if (mu.real <= 0).any():
                if programmed:
                    raise ValueError(
                        "the programmed matrix (after coupling quantization/mismatch) has an "
                        f"eigenvalue with real part {float(mu.real.min()):.4g} <= 0; use more "
                        "coupling_bits or a smaller mismatch_std")
                self._raise_not_stable(mu.real)
            bound = float(np.min(2.0 * mu.real / np.abs(mu) ** 2))
            return _Spectrum(lam=mu.real, Q=None, symmetric=False, euler_bound=bound)
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
            self._raise_not_pd(lam, programmed)
        lam_max = float(lam[:, -1].max())
        if cfg.dynamics == "overdamped":
            bound = 2.0 / lam_max
        else:
            bound = laws.ud_stable_dt(lam_max, cfg.mass, cfg.friction)
        return _Spectrum(lam=lam, Q=Q, symmetric=True, euler_bound=bound)

    # -- schedule -----------------------------------------------------------------------------

    def base_dt(self, spec: _Spectrum) -> float:
        cfg = self.cfg
        if cfg.dt == "auto":
            return (0.1 if cfg.integrator == "euler" else 0.5) * spec.euler_bound
        dt = float(cfg.dt)
        if cfg.integrator == "euler" and dt >= spec.euler_bound:
            if cfg.dynamics == "overdamped":
                if spec.symmetric:
                    lam_max = float(spec.lam[:, -1].max())
                    rule = f"2/lambda_max = {spec.euler_bound:.4g} (lambda_max = {lam_max:.4g})"
                else:
                    rule = f"min 2 Re(mu)/|mu|^2 = {spec.euler_bound:.4g} over the eigenvalues mu of A"
            else:
                rule = (f"4M/(gamma + sqrt(gamma^2 + 4 lambda_max M)) = {spec.euler_bound:.4g} "
                        f"(lambda_max = {float(spec.lam[:, -1].max()):.4g})")
            raise ValueError(f"dt={dt} is unstable for Euler-Maruyama: it must be < {rule}; use a "
                             "smaller dt or dt='auto'")
        return dt

    def schedule(self, window: float, dt0: float) -> tuple[float, int, int]:
        """``(dt, n_burn, n_avg)``; ``dt='auto'`` divides the window exactly."""
        if self.cfg.dt == "auto":
            n_avg = max(1, math.ceil(window / dt0 - 1e-9))
            dt = window / n_avg
            n_burn = math.ceil(self.cfg.burn_in / dt - 1e-9)
        else:
            dt = dt0
            n_avg = max(1, round(window / dt))
            n_burn = round(self.cfg.burn_in / dt)
        return dt, n_burn, n_avg

    def target_window(self, spec: _Spectrum, A_hw: torch.Tensor, B_hw: torch.Tensor,
                      dt0: float) -> float:
        """Averaging window that meets ``target_error`` by the error law (capped by analog_time)."""
        cfg = self.cfg
        eps = cfg.target_error
        lam = spec.lam
        if self.estimator == "solve":
            if not spec.symmetric:
                raise ValueError("target_error needs a symmetric A (the error law uses its "
                                 "eigenvalues); give analog_time instead")
            X = torch.linalg.solve(A_hw.double(), B_hw.double())
            norm2 = (X * X).sum(dim=(1, 2)).cpu().numpy()
            if (norm2 <= 0).any():
                raise ValueError("target_error is relative to ||A^-1 B||, which is 0 here (B = 0); "
                                 "give analog_time instead")
            gamma = cfg.friction if cfg.dynamics == "underdamped" else 1.0
            m = B_hw.shape[2]
            need = 2.0 * gamma * cfg.kappa0 * m * np.sum(lam**-2.0, axis=1) / (eps**2 * norm2)
            T = float(need.max())
        else:
            if cfg.dynamics != "overdamped":
                raise ValueError("target_error for inverse supports dynamics='overdamped' only; "
                                 "give analog_time instead")
            need = []
            for row in lam:
                a, s = self._ar(row, dt0)
                rate = laws.inverse_error_rate(a, s, cfg.kappa0)  # MSE ~ rate / N
                need.append(rate / (eps**2 * np.sum(row**-2.0)) * dt0)
            T = float(max(need))
        self.diag["required_analog_time"] = T
        if cfg.analog_time is not None and T > cfg.analog_time:
            self.diag["target_met"] = False
            return float(cfg.analog_time)
        self.diag["target_met"] = True
        return max(T, dt0)

    def _ar(self, lam: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
        if self.cfg.integrator == "euler":
            return laws.euler_ar(lam, dt, self.cfg.kappa0)
        a, std = laws.od_transition(lam, dt, self.cfg.kappa0)
        return a, self.cfg.kappa0 / lam

    # -- coefficient tables for the eigenbasis kernels ------------------------------------------

    def mode_coefficients(self, lam: np.ndarray, h: float) -> np.ndarray:
        cfg = self.cfg
        if cfg.dynamics == "overdamped":
            a, std = laws.od_transition(lam, h, cfg.kappa0)
            return np.stack([a, std], axis=-1)
        Phi, L = laws.ud_transition(lam, h, cfg.kappa0, cfg.mass, cfg.friction)
        return np.concatenate([Phi.reshape(*lam.shape, 4), L], axis=-1)

    def kw(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"kappa0": cfg.kappa0, "underdamped": cfg.dynamics == "underdamped",
                "mass": cfg.mass, "friction": cfg.friction}


def _mode_mean_var_sum(values: np.ndarray, k: int, copies: int) -> np.ndarray:
    """Per-copy sums ``(copies*k,)`` -> per-system value of the copy average ``(k,)``."""
    return values.reshape(copies, k).mean(axis=0) / copies


# ---------------------------------------------------------------------------------------------
# public API


#: NoiseConfig fields that shape the programmed couplings (must match between program and solve).
_COUPLING_FIELDS = ("coupling_bits", "rounding", "mismatch_std", "mismatch_kind", "coupling_range",
                    "device_seed", "mitigation_copies")


@dataclass(frozen=True)
class ProgrammedMatrix:
    """A symmetric matrix programmed into the simulated device once, reused by many solves.

    Made by :func:`program`; pass it to :func:`solve` in place of ``A``. A real device keeps its
    couplings between right-hand sides, so quantization (including stochastic rounding, one draw
    per copy) and mismatch are applied once here, and the spectrum of the programmed matrix (which
    the simulator needs for ``dt="auto"`` and the eigenbasis integrators) is computed once.

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
    spectrum: _Spectrum
    coupling_error: float
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def analytic_coefficients(self, burn_in: float, window: float, kappa0: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(lam, w, sd, var sum)`` of the analytic time average: ``(k*copies, n, 1)`` tensors and the
        per-system sum of the mode variances (mean over copies); cached per (burn-in, window, kappa0)."""
        key = (float(burn_in), float(window), float(kappa0))
        hit = self._cache.get(key)
        if hit is None:
            lam = self.spectrum.lam
            w, var = laws.od_time_average(lam, burn_in, window, kappa0)
            opts = {"dtype": self.A_hw.dtype, "device": self.A_hw.device}
            hit = (torch.as_tensor(lam, **opts).unsqueeze(-1), torch.as_tensor(w, **opts).unsqueeze(-1),
                   torch.as_tensor(np.sqrt(var), **opts).unsqueeze(-1),
                   float(np.mean(np.sum(var, axis=1))))
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    @property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of the programmed matrices, ``(k * copies, n)`` ascending (float64)."""
        return self.spectrum.lam


def program(A: Array, config: AnalogConfig | None = None) -> ProgrammedMatrix:
    """Program the symmetric positive definite ``A`` (``(n, n)`` or ``(k, n, n)``) into the device.

    Applies coupling quantization and mismatch of ``config.noise`` (stochastic rounding draws from
    ``config.seed``) and computes the programmed spectrum. :func:`solve` then accepts the result
    instead of ``A`` for any number of right-hand sides (with the same coupling settings), skipping
    the per-call programming and ``O(n^3)`` eigendecomposition.
    """
    cfg = _config(config)
    prob = prepare(A, None, None, device=_compute_device(cfg, A), dtype=cfg.dtype,
                   require_symmetric=True, why="program (the programmed system is cached in its "
                   "eigenbasis)", vector_x0=True)
    run = _Run(cfg, prob, "program")
    A_hw, _, _ = run.program()
    spec = run.spectrum(A_hw, vectors=True)
    copies = cfg.noise.mitigation_copies
    diff = torch.linalg.matrix_norm(A_hw - prob.A.repeat(copies, 1, 1))
    error = float((diff / torch.linalg.matrix_norm(prob.A).repeat(copies).clamp_min(1e-300)).mean())
    step = None
    if "coupling_step" in run.diag:
        step = torch.as_tensor(run.diag["coupling_step"], dtype=torch.float64).reshape(-1)
    return ProgrammedMatrix(A=prob.A, A_hw=A_hw, noise=cfg.noise, batched=prob.batched,
                            clipped=int(run.diag["clipped_couplings"]), step=step, spectrum=spec,
                            coupling_error=error)


def _check_programmed(prog: ProgrammedMatrix, cfg: AnalogConfig) -> None:
    if prog.noise is cfg.noise:  # the usual case: programmed with this very config
        return
    for name in _COUPLING_FIELDS:
        if getattr(prog.noise, name) != getattr(cfg.noise, name):
            raise ValueError(f"the ProgrammedMatrix was programmed with {name}="
                             f"{getattr(prog.noise, name)!r} but config.noise has {name}="
                             f"{getattr(cfg.noise, name)!r}; program it again with this config")


def _config(config: AnalogConfig | None) -> AnalogConfig:
    if config is None:
        return AnalogConfig()
    if not isinstance(config, AnalogConfig):
        raise ValueError(f"config={config!r} must be a hw_models.AnalogConfig")
    return config


def _symmetry_reason(cfg: AnalogConfig, estimator: str) -> tuple[bool, str]:
    if estimator == "inverse":
        return True, "inverse (the stationary covariance is kappa0 A^-1 only for symmetric A)"
    if cfg.integrator != "euler":
        return True, f"integrator={cfg.integrator!r} (it diagonalises A with eigh)"
    if cfg.dynamics != "overdamped":
        return True, "dynamics='underdamped'"
    return False, ""


def solve(A: Array, B: Array, config: AnalogConfig | None = None, x0: Array | None = None, *,
          seed: int | None = None, x0_eigen: torch.Tensor | None = None,
          x0_rhs_scale: float | None = None, rhs_absmax: torch.Tensor | None = None) -> AnalogResult:
    """Estimate ``A^-1 B`` as the time average of the simulated device after a burn-in.

    Args:
        A: ``(n, n)`` or a batch ``(k, n, n)``; symmetric positive definite (the overdamped
            Euler-Maruyama solve also accepts non-symmetric ``A`` with positive-real-part
            eigenvalues). Or a :class:`ProgrammedMatrix` from :func:`program` (couplings kept
            from that call; faster for repeated solves).
        B: ``(n,)``, ``(n, m)`` (``m`` independent columns), or ``(k, n)``/``(k, n, m)`` batched.
        config: :class:`AnalogConfig` (default: ``AnalogConfig()``).
        x0: warm start with ``B``'s shape (default 0), e.g. the previous solution.
        seed: overrides ``config.seed`` (cheaper than ``config.replace(seed=...)`` per call).
        x0_eigen: start state in the eigenbasis of a :class:`ProgrammedMatrix` (e.g. a previous
            result's ``state``, rescaled per column), instead of ``x0``; analytic fast path only.
        x0_rhs_scale: start from ``x0_rhs_scale * b`` as loaded by the DAC (the right-hand side
            itself), instead of ``x0``; analytic fast path only.
        rhs_absmax: the exact per-column abs-max of an ``(n, m)`` ``B``, shape ``(m,)``, when the
            caller has it (e.g. it scaled the columns to full scale): the DAC then skips its range
            scan. A hint for the analytic fast path; other paths ignore it.

    Returns:
        :class:`AnalogResult` with ``x`` shaped like ``B``.
    """
    cfg = _config(config)
    programmed = A if isinstance(A, ProgrammedMatrix) else None
    if programmed is not None:
        _check_programmed(programmed, cfg)
        if _fast_path(programmed, B, x0, cfg):
            return _solve_programmed_analytic(programmed, B, x0, cfg,
                                              _seed(cfg) if seed is None else int(seed),
                                              x0_eigen=x0_eigen, x0_rhs_scale=x0_rhs_scale,
                                              rhs_absmax=rhs_absmax)
        A = programmed.A if programmed.batched else programmed.A[0]
    if x0_eigen is not None or x0_rhs_scale is not None:
        raise ValueError("x0_eigen/x0_rhs_scale need a ProgrammedMatrix, integrator='analytic', "
                         "overdamped dynamics, backend='torch' and a torch (n, m) right-hand side; "
                         "give x0 instead")
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    need_sym, why = _symmetry_reason(cfg, "solve")
    prob = prepare(A, B, x0, device=_compute_device(cfg, A), dtype=cfg.dtype,
                   require_symmetric=need_sym, why=why, trusted_A=programmed is not None)
    run = _Run(cfg, prob, "solve")
    A_hw, B_hw, X0 = run.program(programmed)
    analytic = cfg.integrator == "analytic"
    if programmed is not None:
        spec = programmed.spectrum
        if spec.Q is not None and spec.Q.dtype != B_hw.dtype:
            raise ValueError(f"the ProgrammedMatrix has dtype {spec.Q.dtype} but this solve runs in "
                             f"{B_hw.dtype}; program A in the dtype of B (or set config.dtype)")
    else:
        spec = run.spectrum(A_hw, vectors=cfg.integrator != "euler")
    dt0 = run.base_dt(spec)
    window = cfg.analog_time if cfg.target_error is None else run.target_window(spec, A_hw, B_hw,
                                                                                 dt0)
    k, c = prob.k, run.copies
    lam = spec.lam
    underdamped = cfg.dynamics == "underdamped"
    gamma = cfg.friction if underdamped else 1.0
    m = prob.m

    if analytic:
        dt, n_burn, n_avg = None, 0, 0
        burn = cfg.burn_in
        Xbar, var = _analytic_mean(run, spec, A_hw, B_hw, X0, window)
        mode_var = var
    else:
        dt, n_burn, n_avg = run.schedule(window, dt0)
        burn, window = n_burn * dt, n_avg * dt
        if cfg.integrator == "euler":
            Xbar = run.backend.euler_mean(A_hw, B_hw, X0, dt=dt, n_burn=n_burn, n_avg=n_avg,
                                          **run.kw())
            mode_var = None
            if spec.symmetric and not underdamped:
                a, s = laws.euler_ar(lam, dt, cfg.kappa0)
                mode_var = laws.discrete_average(a, s, a**n_burn, n_avg)[1]
        else:
            Xbar = _exact_mean(run, spec, B_hw, X0, dt, n_burn, n_avg)
            mode_var = None
            if not underdamped:
                a, _ = laws.od_transition(lam, dt, cfg.kappa0)
                ab, _ = laws.od_transition(lam, burn, cfg.kappa0)
                mode_var = laws.discrete_average(a, cfg.kappa0 / lam, ab, n_avg)[1]

    Xbar, clipped_out = hw_noise.read_out(Xbar, cfg.noise, dims=(1,), generator=run.noise_gen)
    run.diag["clipped_outputs"] = clipped_out
    X = hw_noise.average_copies(Xbar, c)

    d = run.diag
    d.update(dt=dt, n_steps=n_burn + n_avg, burn_in=burn, averaging_time=window)
    batched = run.batched
    d["lambda_min"] = _per_system(lam[:, 0].reshape(c, k).min(axis=0), batched)
    d["lambda_max"] = _per_system(lam[:, -1].reshape(c, k).max(axis=0), batched)
    d["condition_number"] = _per_system(
        lam[:, -1].reshape(c, k).max(axis=0) / lam[:, 0].reshape(c, k).min(axis=0), batched)
    if spec.symmetric:
        law = 2.0 * gamma * cfg.kappa0 * m * np.sum(lam**-2.0, axis=1) / window
        d["error_law_mse"] = _per_system(_mode_mean_var_sum(law, k, c), batched)
    else:
        d["error_law_mse"] = None
    d["predicted_mse"] = (None if mode_var is None else _per_system(
        _mode_mean_var_sum(m * np.sum(mode_var, axis=1), k, c), batched))
    if cfg.target_error is not None:
        d["target_error"] = cfg.target_error
    if programmed is not None:
        # No O(n^3) reference solves per call: the programming error was measured once, the
        # DAC error is O(n m).
        d["coupling_error"] = programmed.coupling_error
        if cfg.noise.input_bits is not None:
            num = torch.linalg.vector_norm(B_hw - prob.B.repeat(c, 1, 1), dim=(1, 2))
            den = torch.linalg.vector_norm(prob.B, dim=(1, 2)).repeat(c).clamp_min(1e-300)
            d["input_error"] = _per_system(_mode_mean_var_sum((num / den).cpu().numpy(), k, c) * c,
                                           batched)
    elif cfg.noise.programs_couplings or cfg.noise.input_bits is not None:
        X_hw = hw_noise.average_copies(torch.linalg.solve(A_hw.double(), B_hw.double()), c)
        X_id = torch.linalg.solve(prob.A.double(), prob.B.double())
        num = torch.linalg.vector_norm(X_hw - X_id, dim=(1, 2))
        den = torch.linalg.vector_norm(X_id, dim=(1, 2)).clamp_min(1e-300)
        d["systematic_error"] = _per_system((num / den).cpu().numpy(), batched)
    total_time = (burn + window) * c
    return AnalogResult(x=prob.restore(X), analog_time=float(total_time), n_samples=int(n_avg),
                        diagnostics=d)


def _fast_path(prog: ProgrammedMatrix, B: Array, x0: Array | None, cfg: AnalogConfig) -> bool:
    """Whether :func:`_solve_programmed_analytic` handles this call (the common K-FAC case)."""
    return (cfg.integrator == "analytic" and cfg.dynamics == "overdamped" and cfg.backend == "torch"
            and cfg.target_error is None and not prog.batched and isinstance(B, torch.Tensor)
            and B.ndim == 2 and B.dtype == prog.A_hw.dtype and B.device == prog.A_hw.device
            and B.shape[0] == prog.A.shape[-1] and B.shape[1] > 0
            and (cfg.device is None or cfg.device == prog.A_hw.device)
            and (cfg.dtype is None or cfg.dtype == prog.A_hw.dtype)
            and (x0 is None or (isinstance(x0, torch.Tensor) and x0.shape == B.shape)))


def _solve_programmed_analytic(prog: ProgrammedMatrix, B: torch.Tensor, x0: torch.Tensor | None,
                               cfg: AnalogConfig, seed: int, x0_eigen: torch.Tensor | None = None,
                               x0_rhs_scale: float | None = None,
                               rhs_absmax: torch.Tensor | None = None) -> AnalogResult:
    """The analytic solve of a programmed ``(n, n)`` matrix for a torch ``(n, m)`` right-hand side.

    The same model as the general path (DAC, the time average drawn from its exact Gaussian law,
    read noise and ADC, copies averaged), with the per-matrix quantities cached on ``prog`` and
    no per-call re-validation, so a call costs a few ``O(n^2 m)`` products.
    """
    # one reduction each; the detailed scan (which counts the bad entries) only on failure
    if not math.isfinite(float(B.sum())):
        _check_finite("B", B)
    if x0 is not None and not math.isfinite(float(x0.sum())):
        _check_finite("x0", x0)
    noise = cfg.noise
    c = noise.mitigation_copies
    window = float(cfg.analog_time)
    # one generator per programmed matrix and device, reseeded: the same stream as a fresh one
    gen = prog._cache.get(("generator", B.device))
    if gen is None:
        gen = prog._cache[("generator", B.device)] = torch.Generator(device=B.device)
    gen.manual_seed(seed % 2**63)
    span = None if rhs_absmax is None else rhs_absmax.reshape(1, 1, -1)
    B_hw, clipped_in = hw_noise.load_inputs(B.unsqueeze(0), noise, copies=c, generator=gen,
                                            col_absmax=span)
    lam, w, sd, var_sum = prog.analytic_coefficients(cfg.burn_in, window, cfg.kappa0)
    Q = prog.spectrum.Q
    Qt = Q.transpose(1, 2)
    QtB = Qt @ B_hw
    U = QtB / lam  # u* = Lambda^-1 Q^T b per mode
    if x0_rhs_scale is not None:  # mean = u* + w (s Q^T b - u*): no extra product
        U.add_(QtB.mul_(x0_rhs_scale).sub_(U).mul_(w))
    elif x0_eigen is not None:
        if x0_eigen.shape[-2:] != B.shape:
            raise ValueError(f"x0_eigen has shape {tuple(x0_eigen.shape)}; expected (..., "
                             f"{B.shape[0]}, {B.shape[1]})")
        U.add_((x0_eigen - U).mul_(w))
    elif x0 is None:
        U.mul_(1.0 - w)  # mean = u* + w (0 - u*)
    else:
        U.add_((Qt @ x0).sub_(U).mul_(w))  # mean = u* + w (Q^T x0 - u*)
    U.addcmul_(sd, torch.randn(U.shape, generator=gen, dtype=U.dtype, device=U.device))
    Xbar, clipped_out = hw_noise.read_out(Q @ U, noise, dims=(1,), generator=gen)
    X = hw_noise.average_copies(Xbar, c)[0]
    m = B.shape[1]
    key = ("diagnostics", B.device, B.dtype, cfg.burn_in, window, cfg.kappa0, m)
    base = prog._cache.get(key)
    if base is None:  # everything but the seed and clip counts is fixed per matrix and setting
        lam_np = prog.spectrum.lam
        inv_sq_sum = float(np.mean(np.sum(lam_np**-2.0, axis=1)))
        base = {
            "seed": None, "estimator": "solve", "integrator": "analytic", "dynamics": "overdamped",
            "backend": "torch", "device": str(B.device), "dtype": str(B.dtype).replace("torch.", ""),
            "copies": c, "clipped_couplings": prog.clipped, "clipped_inputs": 0,
            "clipped_outputs": 0, "dt": None, "n_steps": 0, "burn_in": cfg.burn_in,
            "averaging_time": window, "lambda_min": float(lam_np[:, 0].min()),
            "lambda_max": float(lam_np[:, -1].max()),
            "condition_number": float(lam_np[:, -1].max() / lam_np[:, 0].min()),
            "error_law_mse": 2.0 * cfg.kappa0 * m * inv_sq_sum / window / c,
            "predicted_mse": m * var_sum / c,
            "coupling_error": prog.coupling_error,
        }
        if prog.step is not None:
            base["coupling_step"] = float(prog.step[0])
        if len(prog._cache) > 16:
            prog._cache.clear()
        prog._cache[key] = base
    d = dict(base)
    d["seed"], d["clipped_inputs"], d["clipped_outputs"] = seed, clipped_in, clipped_out
    return AnalogResult(x=X, analog_time=float((cfg.burn_in + window) * c), n_samples=0,
                        diagnostics=d, state=U)


def inverse(A: Array, config: AnalogConfig | None = None, x0: Array | None = None
            ) -> AnalogResult:
    """Estimate ``A^-1`` as the second moment of the device's samples divided by ``kappa0``.

    The drive is ``b = 0`` so the stationary law is ``N(0, kappa0 A^-1)``; the estimate is
    ``(1 / (kappa0 N)) sum_t x_t x_t^T`` over the ``N`` samples (spacing ``dt``) after the burn-in.
    The ``"analytic"`` integrator samples the chain exactly in the eigenbasis, like ``"exact"``
    (the second moment of a trajectory has no closed-form law to draw from). ``x0`` (``(n,)``
    or ``(k, n)``, default 0) is the initial state.
    """
    cfg = _config(config)
    if cfg.kappa0 <= 0:
        raise ValueError(f"kappa0={cfg.kappa0} must be > 0 for inverse (the estimate divides the "
                         "sample covariance by kappa0)")
    _, why = _symmetry_reason(cfg, "inverse")
    prob = prepare(A, None, x0, device=_compute_device(cfg, A), dtype=cfg.dtype,
                   require_symmetric=True, why=why, vector_x0=True)
    run = _Run(cfg, prob, "inverse")
    A_hw, _, X0 = run.program()
    spec = run.spectrum(A_hw, vectors=cfg.integrator != "euler")
    dt0 = run.base_dt(spec)
    window = cfg.analog_time if cfg.target_error is None else run.target_window(spec, A_hw, None,
                                                                                 dt0)
    dt, n_burn, n_avg = run.schedule(window, dt0)
    burn, window = n_burn * dt, n_avg * dt
    k, c = prob.k, run.copies
    lam = spec.lam
    readout = None if (cfg.noise.output_bits is None and not cfg.noise.read_noise) else cfg.noise
    if cfg.integrator == "euler":
        S, clipped = run.backend.euler_second_moment(A_hw, X0, dt=dt, n_burn=n_burn, n_avg=n_avg,
                                                     readout=readout, **run.kw())
    else:
        Q = spec.Q
        u0 = Q.transpose(1, 2) @ X0
        coef = run.mode_coefficients(lam, dt)
        coef_b = run.mode_coefficients(lam, burn)
        S, clipped = run.backend.eig_second_moment(
            coef, coef_b, u0, Q, n_avg=n_avg, underdamped=cfg.dynamics == "underdamped",
            readout=readout)
    S = S / (n_avg * cfg.kappa0)
    run.diag["clipped_outputs"] = clipped
    X = hw_noise.average_copies(S, c)

    d = run.diag
    batched = run.batched
    d.update(dt=dt, n_steps=n_burn + n_avg, burn_in=burn, averaging_time=window)
    d["lambda_min"] = _per_system(lam[:, 0].reshape(c, k).min(axis=0), batched)
    d["lambda_max"] = _per_system(lam[:, -1].reshape(c, k).max(axis=0), batched)
    d["condition_number"] = _per_system(
        lam[:, -1].reshape(c, k).max(axis=0) / lam[:, 0].reshape(c, k).min(axis=0), batched)
    if cfg.dynamics == "overdamped":
        pred = np.array([laws.inverse_error_law(*run._ar(row, dt), n_avg, cfg.kappa0)
                         for row in lam])
        d["predicted_mse"] = _per_system(_mode_mean_var_sum(pred, k, c), batched)
        if cfg.integrator == "euler":
            bias = np.sqrt(np.sum((dt / (2.0 - lam * dt)) ** 2, axis=1))
            d["discretization_bias"] = _per_system(bias.reshape(c, k).mean(axis=0), batched)
    else:
        d["predicted_mse"] = None
    if cfg.target_error is not None:
        d["target_error"] = cfg.target_error
    if cfg.noise.programs_couplings:
        inv_hw = hw_noise.average_copies(torch.linalg.inv(A_hw.double()), c)
        inv_id = torch.linalg.inv(prob.A.double())
        num = torch.linalg.matrix_norm(inv_hw - inv_id)
        d["systematic_error"] = _per_system((num / torch.linalg.matrix_norm(inv_id)).cpu().numpy(),
                                            batched)
    return AnalogResult(x=prob.restore(X), analog_time=float((burn + window) * c),
                        n_samples=int(n_avg), diagnostics=d)


# ---------------------------------------------------------------------------------------------
# helpers


def _compute_device(cfg: AnalogConfig, A: Array) -> torch.device | None:
    if cfg.device is not None:
        return cfg.device
    if cfg.backend == "numba":
        return torch.device("cpu") if not isinstance(A, torch.Tensor) else A.device
    return None


def _eigen_rhs(spec: _Spectrum, B_hw: torch.Tensor, X0: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(Q, u*, Q^T x0 - u*)``: eigenvectors and ``u* = Lambda^-1 Q^T b``; the last is ``None``
    for a zero start (it is then ``-u*``)."""
    Q = spec.Q
    lam = torch.as_tensor(spec.lam, dtype=B_hw.dtype, device=B_hw.device).unsqueeze(-1)
    Qt = Q.transpose(1, 2)
    ustar = (Qt @ B_hw).div_(lam)
    U0 = None if not bool(X0.count_nonzero()) else (Qt @ X0).sub_(ustar)
    return Q, ustar, U0


def _exact_mean(run: _Run, spec: _Spectrum, B_hw: torch.Tensor, X0: torch.Tensor, dt: float,
                n_burn: int, n_avg: int) -> torch.Tensor:
    Q, ustar, U0 = _eigen_rhs(spec, B_hw, X0)
    U0 = -ustar if U0 is None else U0
    coef = run.mode_coefficients(spec.lam, dt)
    coef_b = run.mode_coefficients(spec.lam, n_burn * dt)
    Ubar = run.backend.eig_mean(coef, coef_b, U0.contiguous(), n_avg=n_avg,
                                underdamped=run.cfg.dynamics == "underdamped")
    return Q @ (ustar + Ubar.to(Q.device))


def _analytic_mean(run: _Run, spec: _Spectrum, A_hw: torch.Tensor, B_hw: torch.Tensor,
                   X0: torch.Tensor, window: float) -> tuple[torch.Tensor, np.ndarray]:
    """Draw the continuous-time average from its exact Gaussian law, mode by mode."""
    cfg = run.cfg
    Q, ustar, U0 = _eigen_rhs(spec, B_hw, X0)
    if cfg.dynamics == "overdamped":
        w, var = laws.od_time_average(spec.lam, cfg.burn_in, window, cfg.kappa0)
    else:
        wv, var = laws.ud_time_average(spec.lam, cfg.burn_in, window, cfg.kappa0, cfg.mass,
                                       cfg.friction)
        w = wv[..., 0]  # the momentum starts at 0
    opts = {"dtype": B_hw.dtype, "device": B_hw.device}
    sd_t = torch.as_tensor(np.sqrt(var), **opts).unsqueeze(-1)
    Z = run.backend.normal(tuple(ustar.shape), ustar).to(B_hw.device)
    if U0 is None:  # mean = u* + w (0 - u*) = (1 - w) u*
        U = ustar.mul_(torch.as_tensor(1.0 - w, **opts).unsqueeze(-1))
    else:
        U = ustar.add_(U0.mul_(torch.as_tensor(w, **opts).unsqueeze(-1)))
    return Q @ U.addcmul_(sd_t, Z), var
