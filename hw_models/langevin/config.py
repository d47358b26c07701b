"""Configuration of one analog solve, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from hw_models.noise import NoiseConfig
from hw_models.validation import check_choice, check_dtype, check_number, check_positive

INTEGRATORS = ("euler", "exact", "analytic")
DYNAMICS = ("overdamped", "underdamped")
BACKENDS = ("torch", "numba")


@dataclass(frozen=True)
class AnalogConfig:
    """How the simulated thermodynamic processor runs (times in tau, the device's RC constant).

    The dynamics are ``dx = -(A x - b) dt + sqrt(2 kappa0) dW`` (overdamped) or
    ``dx = p/M dt, dp = -(A x - b) dt - gamma p/M dt + sqrt(2 gamma kappa0) dW`` (underdamped).

    Attributes:
        analog_time: averaging window after the burn-in (> 0). With ``target_error`` it is the
            upper limit of the window (``None``: no limit).
        burn_in: discarded time before averaging starts (>= 0).
        dt: step (> 0), or ``"auto"``: 0.1 of the Euler stability bound for ``"euler"`` (0.2 /
            lambda_max overdamped), 0.5 of it for ``"exact"`` and the inverse in ``"analytic"``.
        kappa0: thermal noise level ``1/beta`` (>= 0; ``inverse`` needs > 0).
        integrator: ``"euler"`` (Euler-Maruyama), ``"exact"`` (exact Gaussian transitions in the
            eigenbasis) or ``"analytic"`` (the estimator drawn from its exact law).
        dynamics: ``"overdamped"`` or ``"underdamped"`` (with ``mass`` and ``friction``).
        backend: ``"torch"`` (CPU or CUDA) or ``"numba"`` (CPU).
        device: torch device for the torch backend; ``None`` follows the input (CPU for numpy).
        dtype: ``"float32"``/``"float64"`` (or the torch dtype); ``None`` follows the input.
        seed: seed of all simulated randomness; ``None`` draws a fresh one (reported in the
            result's diagnostics).
        noise: hardware non-idealities (:class:`hw_models.NoiseConfig`; default ideal).
        mass, friction: underdamped mass ``M`` and friction ``gamma`` (> 0).
        target_error: if set, the averaging window is chosen from the error law so that the
            relative RMS error ``sqrt(E||X - X*||_F**2) / ||X*||_F`` is about this value
            (``solve``), or the relative Frobenius error of the inverse (``inverse``).
    """

    analog_time: float | None = 100.0
    burn_in: float = 10.0
    dt: float | str = "auto"
    kappa0: float = 0.01
    integrator: str = "euler"
    dynamics: str = "overdamped"
    backend: str = "torch"
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    seed: int | None = None
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    mass: float = 1.0
    friction: float = 1.0
    target_error: float | None = None

    def __post_init__(self) -> None:
        if self.analog_time is None:
            if self.target_error is None:
                raise ValueError("analog_time=None is only allowed with target_error set; give an "
                                 "averaging window > 0 (in tau) or a target_error")
        else:
            check_positive("analog_time", self.analog_time)
        check_positive("burn_in", self.burn_in, allow_zero=True)
        if isinstance(self.dt, str):
            check_choice("dt", self.dt, ("auto",))
        else:
            check_positive("dt", self.dt)
        check_positive("kappa0", self.kappa0, allow_zero=True)
        check_choice("integrator", self.integrator, INTEGRATORS)
        check_choice("dynamics", self.dynamics, DYNAMICS)
        check_choice("backend", self.backend, BACKENDS)
        check_positive("mass", self.mass)
        check_positive("friction", self.friction)
        if self.target_error is not None:
            check_positive("target_error", self.target_error)
        if self.seed is not None:
            check_number("seed", self.seed, low=0, integer=True)
        if not isinstance(self.noise, NoiseConfig):
            raise ValueError(f"noise={self.noise!r} must be a hw_models.NoiseConfig")
        object.__setattr__(self, "dtype", _normalize_dtype(self.dtype))
        object.__setattr__(self, "device", _normalize_device(self.device))
        if self.backend == "numba" and self.device is not None and self.device.type != "cpu":
            raise ValueError(f"backend='numba' runs on the CPU only, but device={str(self.device)!r};"
                             " use backend='torch' for GPUs")

    def replace(self, **changes: Any) -> AnalogConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _normalize_dtype(dtype: Any) -> torch.dtype | None:
    return None if dtype is None else check_dtype("dtype", dtype)


def _normalize_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} needs CUDA, but torch.cuda.is_available() is False; "
                         "use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def as_config(config: AnalogConfig | None) -> AnalogConfig:
    """``config``, or the default ``AnalogConfig()`` for ``None``."""
    if config is None:
        return AnalogConfig()
    if not isinstance(config, AnalogConfig):
        raise ValueError(f"config={config!r} must be a hw_models.AnalogConfig")
    return config


def compute_device(cfg: AnalogConfig, A: Any) -> torch.device | None:
    """Where a run computes: ``cfg.device``, the CPU for numba, else ``None`` (follow the input)."""
    if cfg.device is not None:
        return cfg.device
    if cfg.backend == "numba":
        return torch.device("cpu") if not isinstance(A, torch.Tensor) else A.device
    return None
