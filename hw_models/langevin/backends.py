"""The simulation backends behind one interface, and the BLAS thread limit numba needs.

``TorchBackend`` runs the torch kernels (any device) on a torch generator; ``NumbaBackend``
adapts canonical torch CPU tensors to the numba kernels' numpy layouts and counter-based
streams. :func:`make_backend` picks one by ``AnalogConfig.backend``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from hw_models import noise as hw_noise


class TorchBackend:
    """Runs the kernels of :mod:`hw_models.langevin.torch_backend` on one torch generator."""

    name = "torch"

    def __init__(self, key: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(key % 2**63)

    def normal(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        from hw_models.langevin import torch_backend

        return torch_backend.normal(shape, dtype=like.dtype, device=like.device, generator=self.generator)

    def euler_mean(self, A, B, X0, **kw) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        from hw_models.langevin import torch_backend

        return torch_backend.euler_mean(A, B, X0, generator=self.generator, **kw)

    def eig_mean_clipped(self, coef, Q, ustar, U0, **kw) -> tuple[torch.Tensor, torch.Tensor, int]:
        from hw_models.langevin import torch_backend

        return torch_backend.eig_mean_clipped(coef, Q, ustar, U0, generator=self.generator, **kw)

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


def single_threaded_blas() -> Any:
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


class NumbaBackend:
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

    def _torch(self) -> TorchBackend:
        """The torch kernels on a stream of this backend's key (for what the numba kernels lack:
        the rails and the end state)."""
        return TorchBackend(self.key * 1_000_003 + self.calls + 1, torch.device("cpu"))

    def eig_mean_clipped(self, coef, Q, ustar, U0, **kw) -> tuple[torch.Tensor, torch.Tensor, int]:
        self.calls += 1
        return self._torch().eig_mean_clipped(coef, Q, ustar, U0, **kw)

    def euler_mean(self, A, B, X0, *, dt, kappa0, n_burn, n_avg, underdamped, mass,
                   friction, state_range=None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        import numba

        if state_range is not None:  # the numba kernel has no rails: the torch kernel has
            self.calls += 1
            return self._torch().euler_mean(A, B, X0, dt=dt, kappa0=kappa0, n_burn=n_burn,
                                            n_avg=n_avg, underdamped=underdamped, mass=mass,
                                            friction=friction, state_range=state_range)

        k, n, m = B.shape
        sigma = math.sqrt(2.0 * kappa0 * dt * (friction if underdamped else 1.0))
        At = np.ascontiguousarray(A.numpy().transpose(0, 2, 1))
        Bt = np.ascontiguousarray(B.numpy().transpose(0, 2, 1))
        X0t = np.ascontiguousarray(X0.numpy().transpose(0, 2, 1))
        out = np.empty_like(Bt)
        threads = numba.get_num_threads()
        # enough (system, column-block) tasks to keep every thread busy
        per_system = max(1, -(-2 * threads // k))
        block = max(1, -(-m // per_system))
        with single_threaded_blas():
            self.nb.euler_mean(At, Bt, X0t, dt, sigma, 1.0 - dt * friction / mass, dt / mass,
                               underdamped, n_burn, n_avg, block, self._streams(k * m),
                               *self._tables(), out)
        return torch.from_numpy(out.transpose(0, 2, 1).copy()), None, 0

    def euler_second_moment(self, A, x0, *, dt, kappa0, n_burn, n_avg, underdamped, mass,
                            friction, readout) -> tuple[torch.Tensor, int]:
        k, n, _ = x0.shape
        sigma = math.sqrt(2.0 * kappa0 * dt * (friction if underdamped else 1.0))
        out = np.empty((k, n, n), dtype=x0.numpy().dtype)
        clipped = np.zeros(k, dtype=np.int64)
        with single_threaded_blas():
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
        with single_threaded_blas():
            self.nb.eig_second_moment(
                np.ascontiguousarray(coef), np.ascontiguousarray(coef_burn),
                np.ascontiguousarray(u0.numpy()[:, :, 0]), np.ascontiguousarray(Q.numpy()),
                rotate, n_avg, underdamped, 256, *self._readout_args(readout), self._streams(k),
                *self._tables(), out, clipped)
        S = torch.from_numpy(out)
        if not rotate:
            S = Q @ S @ Q.transpose(1, 2)
        return S, int(clipped.sum())


def make_backend(name: str, key: int, device: torch.device) -> TorchBackend | NumbaBackend:
    """The backend ``name`` (``"torch"``/``"numba"``) seeded with ``key`` for tensors on ``device``."""
    if name == "numba":
        if device.type != "cpu":
            raise ValueError(f"backend='numba' runs on the CPU, but the input is on {device}; use "
                             "backend='torch' or move the input to the CPU")
        return NumbaBackend(key, device)
    return TorchBackend(key, device)


def draw_seed(seed: int | None) -> int:
    """``seed``, or a fresh one from the OS entropy when it is ``None``."""
    if seed is not None:
        return int(seed)
    return int(np.random.SeedSequence().entropy % 2**63)


def make_streams(seed: int, backend: str, device: torch.device
                 ) -> tuple[TorchBackend | NumbaBackend, torch.Generator]:
    """The two independent random streams of one run, both derived from ``seed``: the dynamics'
    (inside the backend) and the hardware non-idealities' (a torch generator on ``device``)."""
    key_dyn, _ = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    sim = make_backend(backend, int(key_dyn), device)
    return sim, noise_generator(seed, device)


def noise_generator(seed: int, device: torch.device) -> torch.Generator:
    """The hardware non-idealities' stream of a run seeded with ``seed`` (see :func:`make_streams`)."""
    _, key_noise = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(key_noise) % 2**63)
    return gen
