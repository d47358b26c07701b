"""The estimators: ``solve`` (time average, ``A^-1 B``), ``solve_programmed`` (the same on a
:class:`ProgrammedMatrix`, with a cached analytic path) and ``inverse`` (second moment,
``A^-1``). They run the simulated device and return the estimate with diagnostics."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hw_models import noise as hw_noise
from hw_models.langevin import analytic, clipping, diagnostics, laws, schedule, torch_backend
from hw_models.langevin.backends import draw_seed, make_streams
from hw_models.langevin.config import AnalogConfig, as_config, compute_device
from hw_models.langevin.problem import Array, Problem, check_finite, prepare
from hw_models.langevin.programmed import (
    ProgrammedMatrix,
    Spectrum,
    compute_spectrum,
    program,
    program_couplings,
)
from hw_models.validation import check_choice

# ``program`` and ``ProgrammedMatrix`` live in :mod:`hw_models.langevin.programmed`; they stay
# importable from here, where they were defined before the package was split.
__all__ = ["AnalogResult", "ProgrammedMatrix", "inverse", "program", "solve", "solve_programmed"]


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
        state: for a solve of a :class:`ProgrammedMatrix` on the analytic fast path, the
            estimate before read-out in the eigenbasis of the programmed matrix, ``(copies, n, m)``
            (pass it back as ``x0_eigen`` to continue from it); ``None`` otherwise.
        end_state: with ``end_state=True``, the device state (before read-out) at the end of the
            run, shaped like ``x`` (copies averaged); ``None`` otherwise, and for the numba
            kernels and the rail-free exact integrator, which keep none.
    """

    x: Array
    analog_time: float
    n_samples: int
    diagnostics: dict[str, Any]
    state: torch.Tensor | None = None
    end_state: Array | None = None


class _Run:
    """One general-path run: the config, the problem, its random streams and what it loaded."""

    def __init__(self, config: AnalogConfig, prob: Problem, estimator: str) -> None:
        self.cfg = config
        self.prob = prob
        self.copies = config.noise.mitigation_copies
        self.seed = draw_seed(config.seed)
        device = prob.A.device
        self.backend, self.noise_gen = make_streams(self.seed, config.backend, device)
        self.head = diagnostics.header(config, seed=self.seed, estimator=estimator, device=device,
                                       dtype=prob.A.dtype, copies=self.copies)
        self.clipped_couplings = self.clipped_inputs = 0
        self.coupling_step: Any = None

    def load(self, programmed: ProgrammedMatrix | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Program the couplings (unless already programmed) and load the inputs through the DAC:
        ``(A_hw, B_hw, X0)``, copy-major ``(copies * k, n, .)``."""
        c = self.copies
        if programmed is not None:  # couplings already on the device: only the inputs load
            A_hw, clipped, step = programmed.A_hw, programmed.clipped, programmed.step
        else:
            A_hw, info = program_couplings(self.prob.A, self.cfg, symmetric=self.prob.symmetric,
                                           k=self.prob.k, generator=self.noise_gen)
            clipped, step = info["clipped"], info["step"]
        B_hw, self.clipped_inputs = hw_noise.load_inputs(self.prob.B, self.cfg.noise, copies=c,
                                                         generator=self.noise_gen)
        X0 = self.prob.X0.repeat(c, 1, 1) if c > 1 else self.prob.X0
        self.clipped_couplings = clipped
        if step is not None:
            self.coupling_step = diagnostics.per_system(step.cpu().numpy(), self.prob.batched)
        return A_hw.contiguous(), B_hw.contiguous(), X0.contiguous()

    def spectrum(self, A_hw: torch.Tensor, vectors: bool) -> Spectrum:
        return compute_spectrum(A_hw, self.cfg, symmetric=self.prob.symmetric, vectors=vectors,
                                k=self.prob.k)

    def window(self, spec: Spectrum, A_hw: torch.Tensor, B_hw: torch.Tensor | None, dt0: float,
               estimator: str) -> tuple[float, dict[str, Any] | None]:
        """The averaging window and, for a ``target_error`` run, its diagnostics."""
        cfg = self.cfg
        if cfg.target_error is None:
            return cfg.analog_time, None
        target = schedule.target_window(cfg, estimator, spec, A_hw, B_hw, dt0)
        return target.window, {"required_analog_time": target.required, "target_met": target.met}

    def diagnostics(self, *, clipped_outputs: int, **kw: Any) -> dict[str, Any]:
        return diagnostics.assemble(
            self.head, clipped=(self.clipped_couplings, self.clipped_inputs, clipped_outputs),
            coupling_step=self.coupling_step, target_error=self.cfg.target_error, **kw)


def _symmetry_reason(cfg: AnalogConfig, estimator: str) -> tuple[bool, str]:
    if estimator == "inverse":
        return True, "inverse (the stationary covariance is kappa0 A^-1 only for symmetric A)"
    if cfg.integrator != "euler":
        return True, f"integrator={cfg.integrator!r} (it diagonalises A with eigh)"
    if cfg.dynamics != "overdamped":
        return True, "dynamics='underdamped'"
    return False, ""


def solve(A: Array | ProgrammedMatrix, B: Array, config: AnalogConfig | None = None,
          x0: Array | None = None, *, seed: int | None = None,
          x0_eigen: torch.Tensor | None = None, x0_rhs_scale: float | None = None,
          rhs_absmax: torch.Tensor | None = None, end_state: bool = False) -> AnalogResult:
    """Estimate ``A^-1 B`` as the time average of the simulated device after a burn-in.

    Args:
        A: ``(n, n)`` or a batch ``(k, n, n)``; symmetric positive definite (the overdamped
            Euler-Maruyama solve also accepts non-symmetric ``A`` with positive-real-part
            eigenvalues). Or a :class:`ProgrammedMatrix` from :func:`program`: the call is then
            :func:`solve_programmed` (couplings kept from that call; faster for repeated solves).
        B: ``(n,)``, ``(n, m)`` (``m`` independent columns), or ``(k, n)``/``(k, n, m)`` batched.
        config: :class:`AnalogConfig` (default: ``AnalogConfig()``).
        x0: warm start with ``B``'s shape (default 0), e.g. the previous solution.
        seed: overrides ``config.seed`` (cheaper than ``config.replace(seed=...)`` per call).
        x0_eigen, x0_rhs_scale, rhs_absmax: warm starts and a hint for a
            :class:`ProgrammedMatrix`; see :func:`solve_programmed`.
        end_state: also return the device state at the end of the run (``end_state`` of the
            result), from which a following run can continue.

    Returns:
        :class:`AnalogResult` with ``x`` shaped like ``B``.
    """
    if isinstance(A, ProgrammedMatrix):
        return solve_programmed(A, B, config, x0, seed=seed, x0_eigen=x0_eigen,
                                x0_rhs_scale=x0_rhs_scale, rhs_absmax=rhs_absmax,
                                end_state=end_state)
    if x0_eigen is not None or x0_rhs_scale is not None:
        raise ValueError("x0_eigen/x0_rhs_scale start from a programmed device state: they need "
                         "a ProgrammedMatrix (hw_models.langevin.program); give x0 instead")
    return _solve_general(A, B, as_config(config), x0, seed, None, end_state)


def solve_programmed(prog: ProgrammedMatrix, B: Array, config: AnalogConfig | None = None,
                     x0: Array | None = None, *, seed: int | None = None,
                     x0_eigen: torch.Tensor | None = None, x0_rhs_scale: float | None = None,
                     rhs_absmax: torch.Tensor | None = None, end_state: bool = False,
                     end_cols: torch.Tensor | None = None, input_error: bool = True,
                     path: str = "auto") -> AnalogResult:
    """Estimate ``A^-1 B`` on the matrix ``prog`` programmed by :func:`program`.

    The couplings, their clip counts and the programmed spectrum come from ``prog``; only the
    inputs are loaded (DAC) per call. The common K-FAC case (``integrator="analytic"``,
    overdamped, the torch backend, an ``(n, m)`` torch ``B`` in ``prog``'s dtype and device, no
    ``target_error``) runs a cached analytic path costing a few ``O(n^2 m)`` products; every other
    call runs the general simulator. Both model the same device and return the same diagnostics
    keys; both draw the analytic law with one function (:mod:`hw_models.langevin.analytic`), so
    with the same seed they agree bitwise. When the rails (``noise.state_range``) may be reached
    the analytic law does not hold and either path runs the clipping ``"exact"`` integrator.

    Args:
        prog: the programmed matrix; ``config.noise`` must have its coupling settings.
        B, config, x0, seed: as for :func:`solve`.
        x0_eigen: start from this state in the eigenbasis of ``prog`` (e.g. a previous result's
            ``state``, rescaled per column); the analytic path continues from it instead of ``x0``.
            Elsewhere ``x0`` is the start, or when ``x0`` is ``None`` the state rotated back and
            averaged over the copies.
        x0_rhs_scale: start from ``x0_rhs_scale * B``; the analytic path starts from the
            DAC-loaded ``B`` times it (no extra product). Elsewhere ``x0`` is the start, or when
            ``x0`` is ``None`` ``x0_rhs_scale * B``. Give ``x0`` as well to fix the other paths'
            start exactly.
        rhs_absmax: the exact per-column abs-max of an ``(n, m)`` ``B``, shape ``(m,)``, when the
            caller has it (e.g. it scaled the columns to full scale): the analytic path's DAC then
            skips its range scan. A hint; other paths ignore it.
        end_state: also return the state at the end of the run (see :func:`solve`).
        end_cols: with ``end_state``, only these columns' end states (a ``(n, len(end_cols))``
            ``end_state``; the analytic path then computes and draws no others).
        input_error: measure the DAC's relative error (``diagnostics["input_error"]``, an extra
            pass over the inputs); a caller that reads it only now and then turns it off.
        path: ``"auto"`` (the fast path where it applies) or ``"general"`` (always the general
            simulator: for validating one against the other).

    Returns:
        :class:`AnalogResult` with ``x`` shaped like ``B`` (and ``state`` on the analytic path).
    """
    cfg = as_config(config)
    prog.check_config(cfg)
    check_choice("path", path, ("auto", "general"))
    if path == "auto" and _fast_path(prog, B, x0, cfg):
        seed = draw_seed(cfg.seed) if seed is None else int(seed)
        res = _solve_analytic(prog, B, x0, cfg, seed, x0_eigen=x0_eigen, x0_rhs_scale=x0_rhs_scale,
                              rhs_absmax=rhs_absmax, end_state=end_state, end_cols=end_cols,
                              input_error=input_error)
        if res is not None:
            return res
    if x0 is None and x0_rhs_scale is not None:
        x0 = B * x0_rhs_scale
    elif x0 is None and x0_eigen is not None:
        Q = prog.spectrum.Q
        k = prog.A.shape[0]
        X = (Q @ x0_eigen.to(Q.dtype)).reshape(-1, k, *x0_eigen.shape[-2:]).mean(dim=0)
        if X.numel() != int(np.prod(B.shape)):
            raise ValueError(f"x0_eigen has shape {tuple(x0_eigen.shape)}, which does not match "
                             f"B of shape {tuple(B.shape)}")
        X = X.reshape(tuple(B.shape))
        x0 = X if isinstance(B, torch.Tensor) else X.cpu().numpy()
    A = prog.A if prog.batched else prog.A[0]
    res = _solve_general(A, B, cfg, x0, seed, prog, end_state)
    if end_cols is not None and res.end_state is not None:  # the general path draws them all
        end = res.end_state
        cols = end_cols.to(end.device) if isinstance(end, torch.Tensor) else end_cols.cpu().numpy()
        res = dataclasses.replace(res, end_state=end[..., cols])
    return res


def _fast_path(prog: ProgrammedMatrix, B: Array, x0: Array | None, cfg: AnalogConfig) -> bool:
    """Whether :func:`_solve_analytic` handles this call (the common K-FAC case)."""
    return (cfg.integrator == "analytic" and cfg.dynamics == "overdamped" and cfg.backend == "torch"
            and cfg.target_error is None and not prog.batched and isinstance(B, torch.Tensor)
            and B.ndim == 2 and B.dtype == prog.A_hw.dtype and B.device == prog.A_hw.device
            and B.shape[0] == prog.A.shape[-1] and B.shape[1] > 0
            and (cfg.device is None or cfg.device == prog.A_hw.device)
            and (cfg.dtype is None or cfg.dtype == prog.A_hw.dtype)
            and (x0 is None or (isinstance(x0, torch.Tensor) and x0.shape == B.shape)))


def _solve_general(A: Array, B: Array, cfg: AnalogConfig, x0: Array | None, seed: int | None,
                   programmed: ProgrammedMatrix | None, end_state: bool = False) -> AnalogResult:
    """The general simulator: every integrator, dynamics, backend, batch and ``target_error``."""
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    need_sym, why = _symmetry_reason(cfg, "solve")
    prob = prepare(A, B, x0, device=compute_device(cfg, A), dtype=cfg.dtype,
                   require_symmetric=need_sym, why=why, trusted_A=programmed is not None)
    run = _Run(cfg, prob, "solve")
    A_hw, B_hw, X0 = run.load(programmed)
    rails = cfg.noise.state_range
    if programmed is not None:
        spec = programmed.spectrum
        if spec.Q is not None and spec.Q.dtype != B_hw.dtype:
            raise ValueError(f"the ProgrammedMatrix has dtype {spec.Q.dtype} but this solve runs in "
                             f"{B_hw.dtype}; program A in the dtype of B (or set config.dtype)")
    else:
        spec = run.spectrum(A_hw, vectors=cfg.integrator != "euler")
    dt0 = schedule.base_dt(cfg, spec)
    window, target = run.window(spec, A_hw, B_hw, dt0, "solve")
    k, c = prob.k, run.copies
    lam = spec.lam
    underdamped = cfg.dynamics == "underdamped"
    integrator = cfg.integrator
    if rails is not None and underdamped and integrator != "euler":
        integrator = "euler"  # the rails are modelled by the Euler kernel for underdamped dynamics
    end = None
    saturated = 0
    fallback = read_drawn = False
    clip = None
    pred: dict[str, Any] = {}
    if integrator == "analytic":
        dt, n_burn, n_avg = None, 0, 0
        burn = cfg.burn_in
        if underdamped:
            Xbar, mode_var = _underdamped_mean(run, spec, B_hw, X0, window)
        else:
            law = _law(programmed, spec, cfg, window, rails is not None, A_hw)
            drawn = analytic.draw(law, spec.Q, B_hw, lambda shape: run.backend.normal(shape, B_hw),
                                  x0=X0, want_end=end_state, state_range=rails,
                                  read_sd=float(cfg.noise.read_noise or 0.0))
            if drawn is None:  # the Gaussian law would cross the rails: the clipping integrator
                fallback = True
                integrator = "exact"
            else:
                Xbar, end, read_drawn = drawn.mean, drawn.end, drawn.read_noise_drawn
                mode_var = laws.od_time_average(lam, burn, window, cfg.kappa0)[1]
                pred = _predicted(drawn, law.var_sum, c)
    if integrator != "analytic":
        dt, n_burn, n_avg = schedule.steps(cfg, window, dt0)
        mode_var = None
        if rails is not None and integrator == "exact":  # the clipping integrator, its own step
            clip = _rail_run(run, spec, A_hw, B_hw, X0, window, rails, law if fallback else None)
            Xbar, end, saturated = clip.mean, clip.end, clip.saturated
            dt, n_burn, n_avg, burn = clip.dt, clip.n_burn, clip.n_avg, cfg.burn_in  # both exact
        else:
            burn, window = n_burn * dt, n_avg * dt
        if integrator == "euler":
            Xbar, end, saturated = run.backend.euler_mean(
                A_hw, B_hw, X0, dt=dt, n_burn=n_burn, n_avg=n_avg, state_range=rails,
                **schedule.dynamics_options(cfg))
            if spec.symmetric and not underdamped:
                a, s = laws.euler_ar(lam, dt, cfg.kappa0)
                mode_var = laws.discrete_average(a, s, a**n_burn, n_avg)[1]
        elif rails is None:
            Xbar, end = _exact_mean(run, spec, B_hw, X0, dt, n_burn, n_avg)
            if not underdamped:
                a, _ = laws.od_transition(lam, dt, cfg.kappa0)
                ab, _ = laws.od_transition(lam, burn, cfg.kappa0)
                mode_var = laws.discrete_average(a, cfg.kappa0 / lam, ab, n_avg)[1]

    Xbar, clipped_out = hw_noise.read_out(Xbar, cfg.noise, dims=(1,), generator=run.noise_gen,
                                          noise=not read_drawn)
    X = hw_noise.average_copies(Xbar, c)

    errors: dict[str, Any] = {}
    if programmed is not None:
        # No O(n^3) reference solves per call: the programming error was measured once, the
        # DAC error is O(n m).
        errors["coupling_error"] = programmed.coupling_error
        if cfg.noise.input_bits is not None:
            errors["input_error"] = diagnostics.relative_input_error(B_hw, prob.B, k, c,
                                                                     prob.batched)
    elif cfg.noise.programs_couplings or cfg.noise.input_bits is not None:
        X_hw = hw_noise.average_copies(torch.linalg.solve(A_hw.double(), B_hw.double()), c)
        X_id = torch.linalg.solve(prob.A.double(), prob.B.double())
        num = torch.linalg.vector_norm(X_hw - X_id, dim=(1, 2))
        den = torch.linalg.vector_norm(X_id, dim=(1, 2)).clamp_min(1e-300)
        errors["systematic_error"] = diagnostics.per_system((num / den).cpu().numpy(),
                                                             prob.batched)
    law_d = diagnostics.solve_laws(
        cfg, lam, symmetric=spec.symmetric, k=k, copies=c, batched=prob.batched, m=prob.m,
        window=window, mode_var_sum=None if mode_var is None else np.sum(mode_var, axis=1))
    law_d.update({key: diagnostics.per_system(v, prob.batched) for key, v in pred.items()})
    rails_d = diagnostics.rails(rails, saturated, (n_burn + n_avg) * int(Xbar.numel()), fallback,
                                integrator)
    if clip is not None:  # the clipping integrator's step against its rule, and the columns it ran
        rails_d.update(rail_step_error=clip.step_error, rail_step_tolerance=clip.tolerance,
                       rail_step_ok=clip.step_ok, clipped_columns=clip.columns)
    d = run.diagnostics(clipped_outputs=clipped_out, target=target, dt=dt,
                        n_steps=n_burn + n_avg, burn_in=burn, window=window, laws=law_d,
                        rails=rails_d, **errors)
    end_x = None
    if end is not None:
        end_x = prob.restore(hw_noise.average_copies(end, c))
    return AnalogResult(x=prob.restore(X), analog_time=float((burn + window) * c),
                        n_samples=int(n_avg), diagnostics=d, end_state=end_x)


def _law(programmed: ProgrammedMatrix | None, spec: Spectrum, cfg: AnalogConfig, window: float,
         rails: bool, A_hw: torch.Tensor | None = None) -> analytic.Law:
    """The analytic law of this setting (cached on a programmed matrix); ``A_hw``, the programmed
    matrices, gives the rail check its log-norm bound."""
    def build() -> analytic.Law:
        return analytic.make_law(spec.lam, spec.Q, cfg.burn_in, window, cfg.kappa0, rails,
                                 A=A_hw if rails else None)

    if programmed is None:
        return build()
    return programmed.memo(("law", float(cfg.burn_in), float(window), float(cfg.kappa0), rails),
                           build)


def _predicted(drawn: analytic.Draw, var_sum: float, copies: int) -> dict[str, np.ndarray]:
    """Relative bias and variance of this very solve (exact for its input and start; copies
    averaged: bias over copies, variance / copies), per system."""
    k = drawn.bias2.shape[0] // copies
    # one transfer for the four per-system sums
    sums = torch.stack([drawn.bias2, drawn.xstar2, drawn.resid2, drawn.b2]).double().cpu().numpy()
    bias2, ref, resid2, b2 = (diagnostics.copy_mean(row, k, copies) for row in sums)
    m = drawn.mean.shape[-1]
    var = np.full(k, m * var_sum / copies)
    ref = np.maximum(ref, 1e-300)
    bias, std = np.sqrt(bias2 / ref), np.sqrt(var / ref)
    b2 = np.maximum(b2, 1e-300)
    return {"predicted_bias": bias, "predicted_variance": std,
            "predicted_rel_error": np.hypot(bias, std), "predicted_residual": np.sqrt(resid2 / b2),
            "solution_norm2": ref / max(m, 1)}


def _solve_analytic(prog: ProgrammedMatrix, B: torch.Tensor, x0: torch.Tensor | None,
                    cfg: AnalogConfig, seed: int, x0_eigen: torch.Tensor | None = None,
                    x0_rhs_scale: float | None = None, rhs_absmax: torch.Tensor | None = None,
                    end_state: bool = False, end_cols: torch.Tensor | None = None,
                    input_error: bool = True) -> AnalogResult | None:
    """The analytic solve of a programmed ``(n, n)`` matrix for a torch ``(n, m)`` right-hand side.

    The same model as the general path (DAC, :func:`analytic.draw`, read noise and ADC, copies
    averaged) on the same two random streams, with the per-matrix quantities cached on ``prog``
    and no per-call re-validation, so a call costs a few ``O(n^2 m)`` products. ``None`` when
    the rails may be reached (the caller then runs the general path's clipping integrator).
    """
    # one reduction each; the detailed scan (which counts the bad entries) only on failure
    if not math.isfinite(float(B.sum())):
        check_finite("B", B)
    if x0 is not None and x0_eigen is None and x0_rhs_scale is None \
            and not math.isfinite(float(x0.sum())):  # x0 is only used without a hint
        check_finite("x0", x0)
    if x0_eigen is not None and x0_eigen.shape[-2:] != B.shape:
        raise ValueError(f"x0_eigen has shape {tuple(x0_eigen.shape)}; expected (..., "
                         f"{B.shape[0]}, {B.shape[1]})")
    noise = cfg.noise
    c = noise.mitigation_copies
    window = float(cfg.analog_time)
    dyn, gen = prog.streams(seed, B.device)  # the general path's two streams for this seed
    span = None if rhs_absmax is None else rhs_absmax.reshape(1, 1, -1)
    B_hw, clipped_in = hw_noise.load_inputs(B.unsqueeze(0), noise, copies=c, generator=gen,
                                            col_absmax=span)
    Q = prog.spectrum.Q
    law = _law(prog, prog.spectrum, cfg, window, noise.state_range is not None, prog.A_hw)
    X0 = None
    if x0 is not None and x0_eigen is None and x0_rhs_scale is None:
        X0 = x0.unsqueeze(0).repeat(c, 1, 1) if c > 1 else x0.unsqueeze(0)
    drawn = analytic.draw(law, Q, B_hw, lambda shape: torch_backend.normal(
        shape, generator=dyn, dtype=B_hw.dtype, device=B_hw.device), x0=X0, x0_eigen=x0_eigen,
        x0_rhs_scale=x0_rhs_scale, want_end=end_state, end_cols=end_cols,
        state_range=noise.state_range, read_sd=float(noise.read_noise or 0.0))
    if drawn is None:
        return None
    Xbar, clipped_out = hw_noise.read_out(drawn.mean, noise, dims=(1,), generator=gen,
                                          noise=not drawn.read_noise_drawn, inplace=True)
    X = hw_noise.average_copies(Xbar, c)[0]
    m = B.shape[1]
    k = prog.A.shape[0]

    def spectral_laws() -> dict[str, Any]:  # fixed per matrix and setting: computed once
        var = laws.od_time_average(prog.spectrum.lam, cfg.burn_in, window, cfg.kappa0)[1]
        return diagnostics.solve_laws(cfg, prog.spectrum.lam, symmetric=True, k=k, copies=c,
                                      batched=False, m=m, window=window,
                                      mode_var_sum=np.sum(var, axis=1))

    law_d = dict(prog.memo(("solve_laws", cfg.burn_in, window, cfg.kappa0, m), spectral_laws))
    law_d.update({key: float(v[0]) for key, v in _predicted(drawn, law.var_sum, c).items()})
    head = diagnostics.header(cfg, seed=seed, estimator="solve", device=B.device, dtype=B.dtype,
                              copies=c)
    d = diagnostics.assemble(
        head, clipped=(prog.clipped, clipped_in, clipped_out),
        coupling_step=None if prog.step is None else diagnostics.per_system(prog.step.numpy(),
                                                                             False),
        dt=None, n_steps=0, burn_in=cfg.burn_in, window=window, laws=law_d,
        rails=diagnostics.rails(noise.state_range, 0, 1, False, "analytic"),
        coupling_error=prog.coupling_error,
        input_error=None if noise.input_bits is None or not input_error
        else diagnostics.relative_input_error(B_hw, B.unsqueeze(0), k, c, False))
    end_x = None if drawn.end is None else hw_noise.average_copies(drawn.end, c)[0]
    return AnalogResult(x=X, analog_time=float((cfg.burn_in + window) * c), n_samples=0,
                        diagnostics=d, state=drawn.eigen, end_state=end_x)


def inverse(A: Array, config: AnalogConfig | None = None, x0: Array | None = None
            ) -> AnalogResult:
    """Estimate ``A^-1`` as the second moment of the device's samples divided by ``kappa0``.

    The drive is ``b = 0`` so the stationary law is ``N(0, kappa0 A^-1)``; the estimate is
    ``(1 / (kappa0 N)) sum_t x_t x_t^T`` over the ``N`` samples (spacing ``dt``) after the burn-in.
    The ``"analytic"`` integrator samples the chain exactly in the eigenbasis, like ``"exact"``
    (the second moment of a trajectory has no closed-form law to draw from). ``x0`` (``(n,)``
    or ``(k, n)``, default 0) is the initial state.
    """
    cfg = as_config(config)
    if cfg.kappa0 <= 0:
        raise ValueError(f"kappa0={cfg.kappa0} must be > 0 for inverse (the estimate divides the "
                         "sample covariance by kappa0)")
    _, why = _symmetry_reason(cfg, "inverse")
    prob = prepare(A, None, x0, device=compute_device(cfg, A), dtype=cfg.dtype,
                   require_symmetric=True, why=why, vector_x0=True)
    run = _Run(cfg, prob, "inverse")
    A_hw, _, X0 = run.load()
    spec = run.spectrum(A_hw, vectors=cfg.integrator != "euler")
    dt0 = schedule.base_dt(cfg, spec)
    window, target = run.window(spec, A_hw, None, dt0, "inverse")
    dt, n_burn, n_avg = schedule.steps(cfg, window, dt0)
    burn, window = n_burn * dt, n_avg * dt
    k, c = prob.k, run.copies
    lam = spec.lam
    readout = None if (cfg.noise.output_bits is None and not cfg.noise.read_noise) else cfg.noise
    if cfg.integrator == "euler":
        S, clipped = run.backend.euler_second_moment(A_hw, X0, dt=dt, n_burn=n_burn, n_avg=n_avg,
                                                     readout=readout,
                                                     **schedule.dynamics_options(cfg))
    else:
        Q = spec.Q
        u0 = Q.transpose(1, 2) @ X0
        coef = schedule.mode_coefficients(cfg, lam, dt)
        coef_b = schedule.mode_coefficients(cfg, lam, burn)
        S, clipped = run.backend.eig_second_moment(
            coef, coef_b, u0, Q, n_avg=n_avg, underdamped=cfg.dynamics == "underdamped",
            readout=readout)
    S = S / (n_avg * cfg.kappa0)
    X = hw_noise.average_copies(S, c)

    batched = prob.batched
    law = diagnostics.spectral(lam, k, c, batched)
    if cfg.dynamics == "overdamped":
        pred = np.array([laws.inverse_error_law(*schedule.ar_coefficients(cfg, row, dt), n_avg,
                                                cfg.kappa0) for row in lam])
        law["predicted_mse"] = diagnostics.per_system(diagnostics.copy_mean(pred, k, c) / c,
                                                      batched)
        if cfg.integrator == "euler":
            bias = np.sqrt(np.sum((dt / (2.0 - lam * dt)) ** 2, axis=1))
            law["discretization_bias"] = diagnostics.per_system(
                diagnostics.copy_mean(bias, k, c), batched)
    else:
        law["predicted_mse"] = None
    systematic = None
    if cfg.noise.programs_couplings:
        inv_hw = hw_noise.average_copies(torch.linalg.inv(A_hw.double()), c)
        inv_id = torch.linalg.inv(prob.A.double())
        num = torch.linalg.matrix_norm(inv_hw - inv_id)
        systematic = diagnostics.per_system(
            (num / torch.linalg.matrix_norm(inv_id)).cpu().numpy(), batched)
    d = run.diagnostics(clipped_outputs=clipped, target=target, dt=dt, n_steps=n_burn + n_avg,
                        burn_in=burn, window=window, laws=law, systematic_error=systematic)
    return AnalogResult(x=prob.restore(X), analog_time=float((burn + window) * c),
                        n_samples=int(n_avg), diagnostics=d)


# ---------------------------------------------------------------------------------------------
# eigenbasis means of the general path


def _eigen_rhs(spec: Spectrum, B_hw: torch.Tensor, X0: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(Q, u*, Q^T x0 - u*)``: eigenvectors and ``u* = Lambda^-1 Q^T b``; the last is ``None``
    for a zero start (it is then ``-u*``)."""
    Q = spec.Q
    lam = torch.as_tensor(spec.lam, dtype=B_hw.dtype, device=B_hw.device).unsqueeze(-1)
    Qt = Q.transpose(1, 2)
    ustar = (Qt @ B_hw).div_(lam)
    U0 = None if not bool(X0.count_nonzero()) else (Qt @ X0).sub_(ustar)
    return Q, ustar, U0


def _rail_run(run: _Run, spec: Spectrum, A_hw: torch.Tensor, B_hw: torch.Tensor, X0: torch.Tensor,
              window: float, rails: float, law: analytic.Law | None) -> clipping.ClippedRun:
    """The clipping integrator (:mod:`hw_models.langevin.clipping`, step chosen for the rails
    unless ``dt`` is given). As the analytic law's fallback (``law``) it runs only the columns that
    may reach the rails; the others take the law's draw."""
    cfg = run.cfg
    Q, ustar, U0 = _eigen_rhs(spec, B_hw, X0)
    U0 = -ustar if U0 is None else U0
    if law is None:
        var = laws.od_time_average(spec.lam, cfg.burn_in, window, cfg.kappa0)[1]
        var_sum = float(np.mean(np.sum(var, axis=1)))
        risk = torch.ones(ustar.shape[-1], dtype=torch.bool, device=ustar.device)
    else:
        var_sum = law.var_sum
        assert law.coord_sd is not None
        risk = clipping.columns_at_risk(law.lam, Q, ustar, U0, analytic.RAIL_SIGMAS * law.coord_sd,
                                        rails, cfg.burn_in + window)
    cols = risk.nonzero().squeeze(1)

    def normal(shape: tuple[int, ...]) -> torch.Tensor:
        return run.backend.normal(shape, B_hw)

    clip = clipping.run_clipped(spec.lam, Q, A_hw, ustar[..., cols], U0[..., cols], kappa0=cfg.kappa0,
                                burn_in=cfg.burn_in, window=window, state_range=rails, normal=normal,
                                var_sum=var_sum, dt=None if cfg.dt == "auto" else float(cfg.dt))
    if law is not None and not bool(risk.all()):  # the law's draw for the columns clear of the rails
        safe = (~risk).nonzero().squeeze(1)
        drawn = analytic.draw(law, Q, B_hw[..., safe], normal, x0_eigen=ustar[..., safe] + U0[..., safe],
                              want_end=True)
        assert drawn is not None and drawn.end is not None
        mean, end = torch.empty_like(ustar), torch.empty_like(ustar)
        mean[..., cols], end[..., cols] = clip.mean, clip.end
        mean[..., safe], end[..., safe] = drawn.mean, drawn.end
        clip.mean, clip.end = mean, end
    return clip


def _exact_mean(run: _Run, spec: Spectrum, B_hw: torch.Tensor, X0: torch.Tensor, dt: float,
                n_burn: int, n_avg: int) -> tuple[torch.Tensor, None]:
    """Exact transitions in the eigenbasis (no rails); the kernels keep no end state."""
    Q, ustar, U0 = _eigen_rhs(spec, B_hw, X0)
    U0 = -ustar if U0 is None else U0
    coef = schedule.mode_coefficients(run.cfg, spec.lam, dt)
    coef_b = schedule.mode_coefficients(run.cfg, spec.lam, n_burn * dt)
    Ubar = run.backend.eig_mean(coef, coef_b, U0.contiguous(), n_avg=n_avg,
                                underdamped=run.cfg.dynamics == "underdamped")
    return Q @ (ustar + Ubar.to(Q.device)), None


def _underdamped_mean(run: _Run, spec: Spectrum, B_hw: torch.Tensor, X0: torch.Tensor,
                      window: float) -> tuple[torch.Tensor, np.ndarray]:
    """Draw the underdamped continuous-time average from its exact Gaussian law, mode by mode."""
    cfg = run.cfg
    Q, ustar, U0 = _eigen_rhs(spec, B_hw, X0)
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
