"""The diagnostics dict of an analog result: one builder for every path (``docs/simulator.md``
lists the keys). The general simulator and the cached analytic path of a programmed matrix both
assemble their dict here, so they report the same keys computed the same way."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hw_models.langevin.config import AnalogConfig


def per_system(values: np.ndarray, batched: bool) -> Any:
    """A per-system array for a batch, its one value as a float otherwise."""
    values = np.asarray(values, dtype=np.float64)
    return values if batched else float(values[0])


def copy_mean(values: np.ndarray, k: int, copies: int) -> np.ndarray:
    """Per-copy values ``(copies*k,)`` -> per-system mean over the copies ``(k,)``."""
    values = np.asarray(values, dtype=np.float64)
    if copies == 1:  # the common case: no reduction (numpy's mean costs microseconds per call)
        return values.reshape(k)
    return values.reshape(copies, k).mean(axis=0)


def header(cfg: AnalogConfig, *, seed: int | None, estimator: str, device: torch.device,
           dtype: torch.dtype, copies: int) -> dict[str, Any]:
    """How the run was made, and zeroed clip counters (the first keys of every dict)."""
    return {"seed": seed, "estimator": estimator, "integrator": cfg.integrator,
            "dynamics": cfg.dynamics, "backend": cfg.backend, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "copies": copies,
            "clipped_couplings": 0, "clipped_inputs": 0, "clipped_outputs": 0}


def spectral(lam: np.ndarray, k: int, copies: int, batched: bool) -> dict[str, Any]:
    """``lambda_min``/``lambda_max``/``condition_number`` of the programmed matrices (over copies)."""
    lo = lam[:, 0].reshape(copies, k).min(axis=0)
    hi = lam[:, -1].reshape(copies, k).max(axis=0)
    return {"lambda_min": per_system(lo, batched), "lambda_max": per_system(hi, batched),
            "condition_number": per_system(hi / lo, batched)}


def solve_laws(cfg: AnalogConfig, lam: np.ndarray, *, symmetric: bool, k: int, copies: int,
               batched: bool, m: int, window: float, mode_var_sum: np.ndarray | None
               ) -> dict[str, Any]:
    """The spectral keys and the two error predictions of a solve.

    ``error_law_mse`` is the continuous-time law ``2 gamma kappa0 m sum(lambda^-2) / T`` (symmetric
    ``A`` only); ``predicted_mse`` the exact variance of the estimator from ``mode_var_sum``, the
    per-copy sums of the mode variances ``(copies*k,)`` (``None`` where no law is known). Both are
    for the copy average (divided by ``copies``).
    """
    d = spectral(lam, k, copies, batched)
    if symmetric:
        gamma = cfg.friction if cfg.dynamics == "underdamped" else 1.0
        inv_sq = copy_mean(np.sum(lam**-2.0, axis=1), k, copies)
        d["error_law_mse"] = per_system(2.0 * gamma * cfg.kappa0 * m * inv_sq / window / copies,
                                        batched)
    else:
        d["error_law_mse"] = None
    d["predicted_mse"] = (None if mode_var_sum is None else per_system(
        m * copy_mean(mode_var_sum, k, copies) / copies, batched))
    return d


def relative_input_error(B_hw: torch.Tensor, B: torch.Tensor, k: int, copies: int,
                         batched: bool) -> Any:
    """``||B_hw - B|| / ||B||`` of the DAC-loaded inputs ``(copies*k, n, m)``, mean over copies."""
    num = torch.linalg.vector_norm(B_hw - (B.repeat(copies, 1, 1) if copies > 1 else B), dim=(1, 2))
    den = torch.linalg.vector_norm(B, dim=(1, 2)).repeat(copies).clamp_min(1e-300)
    return per_system(copy_mean((num / den).cpu().numpy(), k, copies), batched)


def rails(state_range: float | None, saturated: int, samples: int, fallback: bool,
          integrator: str) -> dict[str, Any]:
    """The rail keys: ``state_range``, ``saturated_fraction`` (clipped state values over all
    simulated state values), ``range_fallback`` (the analytic law was replaced by the clipping
    integrator) and ``integrator_used``."""
    return {"state_range": state_range,
            "saturated_fraction": float(saturated) / max(int(samples), 1),
            "range_fallback": bool(fallback), "integrator_used": integrator}


def assemble(head: dict[str, Any], *, clipped: tuple[int, int, int], coupling_step: Any = None,
             target: dict[str, Any] | None = None, dt: float | None, n_steps: int, burn_in: float,
             window: float, laws: dict[str, Any], rails: dict[str, Any] | None = None,
             target_error: float | None = None,
             coupling_error: float | None = None, input_error: Any = None,
             systematic_error: Any = None) -> dict[str, Any]:
    """Assemble the diagnostics of a solve or an inverse in the documented key order.

    ``head`` from :func:`header`; ``laws`` from :func:`solve_laws` (an inverse: :func:`spectral`
    and its own predictions); ``clipped`` the (couplings, inputs, outputs) clip counts;
    ``target`` the ``required_analog_time``/``target_met`` pair of a ``target_error`` run;
    ``rails`` from :func:`rails` (solves).
    Optional keys appear only when given: ``coupling_step``, ``target_error``,
    ``coupling_error`` (a programmed matrix), ``input_error`` (DAC quantization on a programmed
    matrix), ``systematic_error`` (the general path with a non-ideal device).
    """
    d = dict(head)
    d["clipped_couplings"], d["clipped_inputs"], d["clipped_outputs"] = clipped
    if coupling_step is not None:
        d["coupling_step"] = coupling_step
    if target is not None:
        d.update(target)
    d.update(dt=dt, n_steps=n_steps, burn_in=burn_in, averaging_time=window)
    d.update(laws)
    if rails is not None:
        d.update(rails)
    if target_error is not None:
        d["target_error"] = target_error
    if coupling_error is not None:
        d["coupling_error"] = coupling_error
    if input_error is not None:
        d["input_error"] = input_error
    if systematic_error is not None:
        d["systematic_error"] = systematic_error
    return d
