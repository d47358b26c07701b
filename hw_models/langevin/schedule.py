"""The time schedule of a run: the step ``dt``, burn-in and averaging steps, the window that meets
a ``target_error``, and the per-mode transition coefficients the eigenbasis kernels step with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hw_models.langevin import laws
from hw_models.langevin.config import AnalogConfig
from hw_models.langevin.programmed import Spectrum


def base_dt(cfg: AnalogConfig, spec: Spectrum) -> float:
    """The step before the window is divided: ``dt="auto"`` is a fraction of the Euler bound; a
    given ``dt`` is checked against it for Euler-Maruyama."""
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


def steps(cfg: AnalogConfig, window: float, dt0: float) -> tuple[float, int, int]:
    """``(dt, n_burn, n_avg)``; ``dt='auto'`` divides the window exactly."""
    if cfg.dt == "auto":
        n_avg = max(1, math.ceil(window / dt0 - 1e-9))
        dt = window / n_avg
        n_burn = math.ceil(cfg.burn_in / dt - 1e-9)
    else:
        dt = dt0
        n_avg = max(1, round(window / dt))
        n_burn = round(cfg.burn_in / dt)
    return dt, n_burn, n_avg


@dataclass(frozen=True)
class Target:
    """The averaging window chosen for a ``target_error``."""

    window: float  # the window to run (capped by analog_time)
    required: float  # the window the error law asks for
    met: bool  # whether the cap left it at least ``required``


def target_window(cfg: AnalogConfig, estimator: str, spec: Spectrum, A_hw: torch.Tensor,
                  B_hw: torch.Tensor | None, dt0: float) -> Target:
    """Averaging window that meets ``target_error`` by the error law (capped by analog_time)."""
    eps = cfg.target_error
    lam = spec.lam
    if estimator == "solve":
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
            a, s = ar_coefficients(cfg, row, dt0)
            rate = laws.inverse_error_rate(a, s, cfg.kappa0)  # MSE ~ rate / N
            need.append(rate / (eps**2 * np.sum(row**-2.0)) * dt0)
        T = float(max(need))
    if cfg.analog_time is not None and T > cfg.analog_time:
        return Target(window=float(cfg.analog_time), required=T, met=False)
    return Target(window=max(T, dt0), required=T, met=True)


def ar_coefficients(cfg: AnalogConfig, lam: np.ndarray, dt: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """AR(1) coefficient and stationary variance of the sampled overdamped modes."""
    if cfg.integrator == "euler":
        return laws.euler_ar(lam, dt, cfg.kappa0)
    a, _ = laws.od_transition(lam, dt, cfg.kappa0)
    return a, cfg.kappa0 / lam


def mode_coefficients(cfg: AnalogConfig, lam: np.ndarray, h: float) -> np.ndarray:
    """Per-mode exact transition over ``h``: ``(a, std)`` overdamped, ``(Phi, L)`` underdamped."""
    if cfg.dynamics == "overdamped":
        a, std = laws.od_transition(lam, h, cfg.kappa0)
        return np.stack([a, std], axis=-1)
    Phi, L = laws.ud_transition(lam, h, cfg.kappa0, cfg.mass, cfg.friction)
    return np.concatenate([Phi.reshape(*lam.shape, 4), L], axis=-1)


def dynamics_options(cfg: AnalogConfig) -> dict[str, Any]:
    """The keyword arguments the Euler kernels take from the config."""
    return {"kappa0": cfg.kappa0, "underdamped": cfg.dynamics == "underdamped",
            "mass": cfg.mass, "friction": cfg.friction}
