"""The device side of the thermo solver: a factor as programmed (:class:`DeviceFactor`), the
``lambda_max`` estimate of its scaling, input ranging against the rails, the end states the
device's units hold between calls (one set per unit, lost to another factor placed there:
:func:`shares_unit`) and the DAC reload of the others, and the predicted error.
(See ``docs/thermodynamic_kfac.md``; :mod:`thermo_kfac.solvers.thermodynamic` uses these.)"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hw_models.langevin import ProgrammedMatrix, error_model
from hw_models.noise import NoiseConfig, load_state
from hw_models.pricing import RANGE_TARGET

#: lambda_max estimate: Lanczos' top Ritz value plus its residual bound, times this safety factor
LAMBDA_SAFETY = 1.01
#: the solver aims the largest state value at pricing's RANGE_TARGET fraction of state_range (input
#: ranging, one rule for both), and trusts the previous call's peak up to this margin
RANGE_MARGIN = 1.5
#: power iterations of the feasibility law's rounding-error norm (host work per prepare)
FEASIBILITY_ITERATIONS = 30


@dataclass
class DeviceFactor:
    """One damped factor as the device sees it: ``M = c D^-1 P D^-1`` (``D = diag(d)``), its
    programmed state, and what the device keeps between calls (held end states, ranging)."""

    M: torch.Tensor  # damped, symmetrised factor (for residuals and the exact reference)
    P: torch.Tensor  # programmed (scaled) matrix
    c: float  # lambda_max estimate of D M D
    d: torch.Tensor | None  # Jacobi scaling vector diag(M)^-1/2, or None
    seed: int  # seed of the programming (stochastic rounding)
    prog: ProgrammedMatrix | None = None  # cached device state; rebuilt from (P, seed) on resume
    chol: torch.Tensor | None = None  # Cholesky factor of M (track_exact)
    held: torch.Tensor | None = None  # end states the device units hold (device units, (n, h))
    held_cols: torch.Tensor | None = None  # and which right-hand-side columns they belong to
    held_r: torch.Tensor | None = None  # and those columns' input scale r/s when they were held
    peak: float | None = None  # last read-out peak |y| per unit input scale (input ranging)
    scale: float = 1.0  # last input scale s
    defl: Any = None  # the deflated top modes (thermo_kfac.solvers.deflation.Deflated) or None
    lambda_min: float = 0.0  # smallest eigenvalue of P (the damping over the scale)
    max_coupling: float | None = None  # off-diagonal abs-max of P (sets a ranged coupling step)
    inv_rms: float | None = None  # rms of the damped factor's inverse eigenvalues (error propagation)
    feasibility: Any = None  # the feasibility law's verdict on P (hw_models.langevin.feasibility)
    window: float | None = None  # analog_time="auto": this factor's window and burn-in (tau)
    burn_in: float | None = None
    cfg: Any = None  # the placed configuration with that window (cached)

    @property
    def k(self) -> int:
        """Deflation depth (0: the device solves the whole factor)."""
        return 0 if self.defl is None else self.defl.k

    def state(self) -> dict[str, Any]:
        """What a resume needs (the programmed state and the spectra are rebuilt from it)."""
        defl = None if self.defl is None else {"U": self.defl.U, "L": self.defl.L, "lam": self.defl.lam,
                                                "residual": self.defl.residual}
        return {"M": self.M, "P": self.P, "c": self.c, "d": self.d, "seed": self.seed,
                "held": self.held, "held_cols": self.held_cols, "held_r": self.held_r, "peak": self.peak,
                "scale": self.scale, "defl": defl, "lambda_min": self.lambda_min,
                "window": self.window, "burn_in": self.burn_in, "max_coupling": self.max_coupling}




def lambda_max_estimate(S: torch.Tensor, iterations: int, seed: int = 0) -> float:
    """Upper estimate of the largest eigenvalue of the symmetric PSD ``S`` (at least tiny).

    Lanczos (full reorthogonalisation, ``min(iterations, n)`` steps) from a RANDOM start (seeded):
    a fixed start such as the all-ones vector can be an exact eigenvector of a small eigenvalue
    (cross-entropy output layers have ``G 1 = 0``), which would return that eigenvalue. The top
    Ritz value ``theta`` never exceeds ``lambda_max``; the estimate is ``(theta + rho)`` times
    :data:`LAMBDA_SAFETY`, ``rho = beta_k |y_k|`` the residual norm of the top Ritz pair (an
    eigenvalue lies within ``rho`` of ``theta``; with ``n`` steps the Krylov space is complete and
    ``rho = 0``), so the programmed matrix has ``lambda_max <= 1`` up to programming errors.
    """
    n = S.shape[0]
    if n == 0:
        return 1.0
    k = min(int(iterations), n)
    gen = torch.Generator(device=S.device).manual_seed(int(seed) % 2**63)
    Sd = S.double()
    v = torch.randn(n, generator=gen, dtype=torch.float64, device=S.device)
    v = v / v.norm()
    V = torch.zeros((k, n), dtype=torch.float64, device=S.device)
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(k):
        V[j] = v
        w = Sd @ v
        a = float(v @ w)
        alpha.append(a)
        w = w - V[: j + 1].T @ (V[: j + 1] @ w)  # full reorthogonalisation (twice is enough)
        w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        b = float(w.norm())
        if not math.isfinite(b) or b <= 1e-12 * max(abs(a), 1e-300):
            beta.append(0.0)  # invariant subspace: the Ritz values are exact eigenvalues
            break
        beta.append(b)
        v = w / b
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    off = torch.tensor(beta[: len(alpha) - 1], dtype=torch.float64)
    T = T + torch.diag(off, 1) + torch.diag(off, -1)
    theta, Y = torch.linalg.eigh(T)
    top = float(theta[-1])
    rho = 0.0 if len(alpha) == n else beta[len(alpha) - 1] * abs(float(Y[-1, -1]))
    est = top + rho
    return est * LAMBDA_SAFETY if est > 0 and math.isfinite(est) else 1.0


def inverse_rms(f: DeviceFactor) -> float | None:
    """``sqrt(mean 1/mu^2)`` over the damped factor's eigenvalues ``mu``, from the programmed
    spectrum (``c lambda_P``; the ``k`` deflated modes count at ``L + lam`` instead of the damping).
    ``None`` with Jacobi scaling (the programmed spectrum is then not the factor's). Cached on the
    factor (computed on first use, also after a resume)."""
    if f.inv_rms is not None or f.d is not None or f.prog is None:
        return f.inv_rms
    mu = np.sort(np.asarray(f.prog.eigenvalues[0], dtype=np.float64)) * f.c
    total = float(np.sum(mu**-2.0))
    if f.defl is not None and f.k:
        total += float(((f.defl.L.double() + f.defl.lam) ** -2.0).sum()) - float(np.sum(mu[: f.k] ** -2.0))
    f.inv_rms = math.sqrt(max(total, 0.0) / mu.size)
    return f.inv_rms


def layer_setup_info(factors: dict[str, DeviceFactor]) -> dict[str, Any]:
    """A prepare's per-factor ``[G, A]`` setup keys: deflation depth, condition numbers before and
    after deflation (damped factor, programmed remainder), the feasibility verdict, the leak and
    the window and burn-in of the solves (``None``: the fixed ``analog_time``)."""
    out: dict[str, list[Any]] = {"deflate": [], "kappa_before": [], "kappa_after": [],
                                 "feasibility": [], "deflation_residual": [], "window": [],
                                 "burn_in": []}
    for key in ("G", "A"):
        f = factors[key]
        lam = f.defl.lam if f.defl is not None else None
        top = float(f.defl.L[0]) + lam if f.defl is not None and f.k else None
        after = 1.0 / f.lambda_min if f.lambda_min > 0 else float("inf")
        out["deflate"].append(f.k)
        out["kappa_after"].append(after)
        out["kappa_before"].append(top / lam if top is not None and lam else after)
        out["feasibility"].append(None if f.feasibility is None else f.feasibility.to_dict())
        out["deflation_residual"].append(None if f.defl is None else f.defl.residual)
        out["window"].append(f.window)
        out["burn_in"].append(f.burn_in)
    return out


def combined(values: list[Any]) -> float | None:
    """The two solves' relative errors combined in quadrature (``None`` if either is unknown)."""
    if any(v is None for v in values):
        return None
    return float(math.hypot(*values))


def input_scale(f: DeviceFactor, lam: np.ndarray, n: int, rails: float | None) -> float:
    """The input scale ``s <= 1`` of a solve: ``RANGE_TARGET * rails / peak``, ``peak`` the last
    read-out peak per unit input times ``RANGE_MARGIN``, or before any read-out the Gaussian
    estimate from the programmed spectrum ``lam`` (as :func:`hw_models.pricing.input_scale`)."""
    if rails is None:
        return 1.0
    if f.peak is not None:
        peak = RANGE_MARGIN * f.peak
    else:
        rms = error_model.full_scale_rms(n)
        peak = rms * math.sqrt(float((lam**-2.0).mean())) * math.sqrt(2.0 * math.log(2.0 * max(n, 2)))
    return min(1.0, RANGE_TARGET * rails / peak) if peak > 0 else 1.0


def shares_unit(layer_index: int, key: str, layers: Iterable[int], units: int,
                fixed_unit: int | None = None) -> bool:
    """Whether another analog factor is placed on the unit of factor ``key`` (``"G"``/``"A"``) of
    layer ``layer_index``: G of layer ``i`` sits on unit ``2i mod units``, A on ``2i+1`` (or all
    on ``fixed_unit``); ``layers`` are the analog layers' indices. The layers apply in turn every
    step, so such a unit holds another factor's state whenever this one comes back to it: only a
    factor alone on its unit continues from its own end state (one set per unit)."""
    def unit(layer: int, k: str) -> int:
        return fixed_unit if fixed_unit is not None else (2 * layer + (k == "A")) % units

    own = unit(layer_index, key)
    return any(unit(j, k) == own for j in {*layers, layer_index} for k in "GA"
               if (j, k) != (layer_index, key))


def carry_over(old: dict[str, DeviceFactor], new: dict[str, DeviceFactor]) -> None:
    """A new prepare's factors keep the ranging of the ``old`` ones of the same shape, and their
    held end states only at the same scale ``c`` (a rescaled factor's are in stale units)."""
    for key, f in new.items():
        prev = old.get(key)
        if prev is None or prev.P.shape != f.P.shape:
            continue
        if prev.c == f.c:
            f.held, f.held_cols, f.held_r = prev.held, prev.held_cols, prev.held_r
        f.peak, f.scale = prev.peak, prev.scale


def reload_start(f: DeviceFactor, x0n: torch.Tensor, resend: torch.Tensor, noise: NoiseConfig,
                 seed: int, r_eff: torch.Tensor | None = None, held: bool = True) -> tuple[torch.Tensor, int]:
    """The "previous" start as the device has it: the columns whose end state the factor's unit
    still holds (``held``: no other factor ran there since, :func:`shares_unit`) continue from
    it; every other column in
    ``resend`` is re-sent by the host through the DAC (quantized over the rails, stochastic
    rounding drawn from ``seed``), the rest start from 0. Returns the start and the number of
    values re-sent."""
    gen = torch.Generator(device=x0n.device).manual_seed(int(seed))
    start, _ = load_state(x0n, noise, generator=gen)
    resend = resend.clone()
    if held and f.held is not None and f.held_cols is not None and f.held.shape[0] == start.shape[0] \
            and int(f.held_cols.max()) < start.shape[1]:
        held = f.held.to(start.dtype)
        if f.held_r is not None and r_eff is not None:  # into this call's units: x r_then / r_now
            held = held * (f.held_r.to(start.dtype) / r_eff[f.held_cols].to(start.dtype))
        start[:, f.held_cols] = held
        resend[f.held_cols] = False
    return start, int(resend.sum()) * start.shape[0]


def end_columns(f: DeviceFactor, m: int, units: int = 1) -> torch.Tensor:
    """The columns of an ``m``-column call whose end states the factor's units hold afterwards
    (a factor is placed on one unit, which holds one: ``units=1``): the last round, the device
    running the held columns first, then the rest in order; only their end states are simulated."""
    held = [] if f.held_cols is None else [int(j) for j in f.held_cols if int(j) < m]
    taken = set(held)
    order = held + [j for j in range(m) if j not in taken]
    return torch.tensor(order[-min(units, m):], dtype=torch.long, device=f.P.device)


def hold_end_states(f: DeviceFactor, end: torch.Tensor, cols: torch.Tensor,
                    r_eff: torch.Tensor | None = None) -> None:
    """Keep the end states ``end`` ``(n, len(cols))`` of the columns ``cols`` (:func:`end_columns`)
    and those columns' input scales."""
    f.held_cols, f.held = cols, end.clone()
    f.held_r = None if r_eff is None else r_eff[cols].clone()


def predicted_error(lam: np.ndarray, dg: dict[str, Any], n: NoiseConfig,
                    max_coupling: float | None = None) -> tuple[float | None, float | None]:
    """Predicted relative error and relative residual of one solve: the simulator's bias and
    variance (exact for its input and start; diagnostics ``dg``) and, in quadrature, the static
    converter/device error of the one error law (:func:`error_model.static_solve_error`, on the
    programmed spectrum ``lam`` capped at 1, the law's normalisation)."""
    thermal = dg.get("predicted_rel_error")
    if thermal is None:
        return None, None
    top = max(1.0, float(lam.max()))
    ref = float(dg.get("solution_norm2") or 0.0) or 1.0
    static = error_model.static_solve_error_of(n, lam / top, solution_norm2=ref,
                                               max_coupling=max_coupling)
    return math.hypot(float(thermal), static), math.hypot(float(dg["predicted_residual"]), static)


def _float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def result_info(method: str, results: list[Any]) -> dict[str, Any]:
    """The simulator results' diagnostics of one prepare/apply, as the report's ``info`` keys."""
    diags = [r.diagnostics for r in results]
    return {
        "method": method,
        "analog_time": float(sum(r.analog_time for r in results)),
        "n_samples": int(sum(int(r.n_samples) for r in results)),
        "n_samples_each": [int(r.n_samples) for r in results],
        "dt": [_float(d.get("dt"), float("nan")) for d in diags],
        "condition_number": [_float(d.get("condition_number"), float("nan")) for d in diags],
        "error_law_mse": [d.get("error_law_mse") for d in diags],
        "predicted_mse": [d.get("predicted_mse") for d in diags],
        "predicted_bias": [d.get("predicted_bias") for d in diags],
        "coupling_error": [d.get("coupling_error", d.get("systematic_error")) for d in diags],
        "input_error": [d.get("input_error") for d in diags],
        "clipped": int(sum(int(d.get(k) or 0) for d in diags
                           for k in ("clipped_couplings", "clipped_inputs", "clipped_outputs"))),
        "seeds": [d.get("seed") for d in diags],
    }
