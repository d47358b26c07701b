"""Thermodynamic K-FAC solver: the damped Kronecker factors handled by the simulated analog device.

``ThermodynamicSolver`` (registered as ``"thermo"``) runs each layer's linear algebra on the
Langevin simulator of :mod:`hw_models` and reports what the modelled hardware would cost. It
simulates ONE device object (``solver.device``, a :class:`hw_models.ThermoDevice` whose ``noise``
is the simulator's configuration and whose ``kappa0`` is its thermal noise); every option that
changes the device yields a new device object, and that object is simulated and priced. The full
guide (options, deflation, feasibility, windows, scaling, ranging, warm starts, error laws,
reports, failures) is ``docs/thermodynamic_kfac.md``; in short:

- ``method="solve"`` (default, "Method 2" of the seed paper): :meth:`prepare` deflates each damped
  factor's top modes digitally (``deflate``, :mod:`~thermo_kfac.solvers.deflation`; ``"auto"``
  picks the smallest depth the feasibility law of :mod:`hw_models.langevin.feasibility` accepts),
  scales the remainder to ``lambda_max <= 1`` and programs it once; :meth:`apply` runs two analog
  solves, one per damped factor, the worse-conditioned first (``solve_order``), with the gradient's
  columns as right-hand sides (ranged to the DAC's full scale and to the rails), each from the
  ``warm_start`` state, over ``analog_time`` tau (``"auto"``: the window the error law needs for
  ``target_error`` on the programmed spectrum, chosen at every prepare).
- ``method="inverse"`` ("Method 1"): :meth:`prepare` inverts each damped factor by covariance
  sampling; :meth:`apply` multiplies digitally.

Every report is priced by :mod:`hw_models.pricing` on the programmed spectra and the simulated
windows (programming in ``prepare``, resident solves, reloads and all host work -- scaling,
deflation, projections -- in ``apply``). Failures raise
:class:`~thermo_kfac.solvers.base.SolverFailure` (the preconditioner's fallback serves).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from hw_models import pricing
from hw_models.devices import NOISE_FIELDS, digital_device, thermo_device
from hw_models.langevin import AnalogConfig, ProgrammedMatrix, program, solve_programmed
from hw_models.langevin import inverse as analog_inverse
from hw_models.langevin.feasibility import DEFAULT_MARGIN, feasibility
from hw_models.layer_cost import DEFAULT_DIGITAL, DEFAULT_THERMO, preconditioning_seconds
from hw_models.noise import abs_max, read_out
from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverFailure, SolverReport, register_solver
from thermo_kfac.solvers.deflation import Deflated, apply_gemms, auto_depths, deflate, prepare_gemms
from thermo_kfac.solvers.thermo_device import (
    FEASIBILITY_ITERATIONS,
    LAMBDA_SAFETY,
    DeviceFactor,
    carry_over,
    combined,
    end_columns,
    hold_end_states,
    input_scale,
    inverse_rms,
    lambda_max_estimate,
    layer_setup_info,
    predicted_error,
    reload_start,
    result_info,
    shares_unit,
)
from thermo_kfac.solvers.thermo_pricing import PRICED_OPTIONS, ThermoPricing

__all__ = ["LAMBDA_SAFETY", "ThermodynamicSolver", "lambda_max_estimate"]

METHODS = ("inverse", "solve")
INTEGRATORS = ("euler", "exact", "analytic", "sde")
WARM_STARTS = ("auto", "previous", "gradient", "zero")


@register_solver
class ThermodynamicSolver(KFACSolver):
    """K-FAC solver backed by the thermodynamic-processor simulator (see the module docs).

    Options (:attr:`option_names`, the keys of the CLI's ``kfac:solver=thermo,key=value`` specs)
    are described, with their defaults, in the options table of ``docs/thermodynamic_kfac.md``.
    ``device``, ``ideal``, ``bits``, ``kappa0`` and every :class:`hw_models.NoiseConfig` field
    change the device (:attr:`device` is the result); the others set how it runs. Factor ``G`` of
    layer ``i`` sits on unit ``2 i mod units``, ``A`` on ``(2 i + 1) mod units``.
    """

    name = "thermo"
    analog = True
    digital_method = "eigh"  # the all-digital alternative it is compared with
    preset_options = {"device": "thermo", "host": "digital"}
    # the constructor's keywords and the noise fields it takes through **noise
    option_names = ("method", "analog_time", "burn_in", "kappa0", "dt", "integrator", "backend", "bits",
                    "device", "host", "seed", "warm_start", "track_exact", "jacobi", "power_iterations",
                    "dynamics", "mass", "friction", "residual_every", "ideal", "residual_limit", "overlap",
                    "deflate", "max_deflate", "target_error", "max_analog_time", "feasibility_margin",
                    *NOISE_FIELDS)

    def __init__(self, method: str = "solve", analog_time: float | str | None = None, burn_in: float = 10.0,
                 kappa0: float | None = None, dt: float | str = "auto",
                 integrator: str = "analytic", backend: str = "torch", bits: int | None = None,
                 device: str = DEFAULT_THERMO, host: str = DEFAULT_DIGITAL, seed: int = 0,
                 warm_start: str = "auto", track_exact: bool = False, jacobi: bool = False,
                 power_iterations: int = 20, dynamics: str = "overdamped", mass: float = 1.0,
                 friction: float = 1.0, residual_every: int = 10, ideal: bool = False,
                 residual_limit: float | None = None, overlap: bool = False,
                 deflate: int | str = "auto", max_deflate: int = 128, target_error: float = 0.1,
                 max_analog_time: float = 200.0, feasibility_margin: float = DEFAULT_MARGIN,
                 **noise: Any) -> None:
        super().__init__()
        self.method = check_choice("method", method, METHODS)
        check_choice("integrator", integrator, INTEGRATORS)
        check_choice("warm_start", warm_start, WARM_STARTS)
        unknown = sorted(set(noise) - set(NOISE_FIELDS))
        if unknown:
            raise ValueError(f"unknown thermo solver option(s) {', '.join(map(repr, unknown))}; valid "
                             f"noise options: {', '.join(NOISE_FIELDS)}")
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.target_error = check_number("target_error", target_error, low=0.0, high=1.0,
                                         low_inclusive=False, high_inclusive=False)
        self.max_analog_time = check_positive("max_analog_time", max_analog_time)
        self.feasibility_margin = check_positive("feasibility_margin", feasibility_margin)
        self.max_deflate = check_number("max_deflate", max_deflate, low=0, integer=True)
        if deflate != "auto":
            check_number("deflate", deflate, low=0, integer=True)
            if self.method == "inverse" and deflate:
                raise ValueError(f"deflate={deflate!r} needs method='solve' (a sampled inverse has "
                                 "no right-hand side to split); use deflate=0")
        self.deflate = 0 if self.method == "inverse" else deflate
        if analog_time is None:  # the method's default: the law's window, or 50 tau of sampling
            analog_time = "auto" if self.method == "solve" else 50.0
        self.auto_window = analog_time == "auto"
        # "auto": zero under the law's window (priced exactly, nothing reloaded), else the previous
        self.warm_start = ("zero" if self.auto_window else "previous") if warm_start == "auto" else warm_start
        if self.auto_window:
            if self.method == "inverse":
                raise ValueError("analog_time='auto' needs method='solve' (the window comes from "
                                 "the solve error law); give the inverse a number of tau")
            analog_time = 50.0  # the first call's window until the law has a programmed spectrum
        elif isinstance(analog_time, str):
            raise ValueError(f"analog_time={analog_time!r} must be a number of tau (>= 0) or 'auto'")
        check_positive("analog_time", analog_time, allow_zero=True)
        if self.method == "inverse" and not analog_time > 0:
            raise ValueError(f"analog_time={analog_time!r} must be > 0 for method='inverse' "
                             "(covariance sampling needs samples)")
        if self.method == "inverse" and warm_start == "gradient":
            raise ValueError("warm_start='gradient' needs method='solve' (the inverse samples a "
                             "covariance from rest; there is no right-hand side to start from)")
        for name, value in (("track_exact", track_exact), ("jacobi", jacobi), ("ideal", ideal),
                            ("overlap", overlap)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be True or False")
        self.track_exact, self.jacobi, self.ideal = track_exact, jacobi, ideal
        if overlap and self.method != "solve":
            raise ValueError(f"overlap=True needs method='solve'; got method={self.method!r}")
        self.overlap = overlap
        self.X_stale: torch.Tensor | None = None  # overlap: the solve that the next apply() returns
        self.power_iterations = check_number("power_iterations", power_iterations, low=1, high=10_000,
                                             integer=True)
        self.residual_every = check_number("residual_every", residual_every, low=0, integer=True)
        self.residual_limit = None if residual_limit is None else check_positive(
            "residual_limit", residual_limit)
        self.applies = 0  # apply() calls since construction (residual schedule)
        self.residual: float | None = None  # last measured relative residual
        self.residual_apply: int | None = None  # and the apply() call it was measured in
        self.analog_time = float(analog_time)
        self._placement = {key: noise.pop(key) for key in ("unit", "cell_offset") if key in noise}
        base = thermo_device(device)
        base = base.ideal() if ideal else base
        changes: dict[str, Any] = dict(noise)
        if bits is not None:
            changes["bits"] = bits
        if kappa0 is not None:
            changes["kappa0"] = kappa0
        #: THE device: simulated (its noise and kappa0 configure the simulator) and priced
        self.device = base.replace(**changes) if changes else base
        self.host = digital_device(host)
        # AnalogConfig validates the rest; its analog_time must be > 0, so 0 is kept separately.
        self.config = self.device.analog_config(
            analog_time=self.analog_time or 1.0, burn_in=burn_in, dt=dt,
            integrator="euler" if integrator == "sde" else integrator, backend=backend, seed=self.seed,
            dynamics=dynamics, mass=mass, friction=friction)
        self.noise = self.device.noise
        if self.method == "inverse" and not self.device.kappa0 > 0:
            raise ValueError(f"kappa0={self.device.kappa0!r} must be > 0 for method='inverse' "
                             "(covariance sampling)")
        # State used by apply()
        self.calls = 0
        self.A_inv: torch.Tensor | None = None  # method "inverse"
        self.G_inv: torch.Tensor | None = None
        self.factors: dict[str, DeviceFactor] = {}  # method "solve": "A" and "G"
        self.X_prev: torch.Tensor | None = None  # warm starts: the host's read-out, host units
        self.Y_prev: torch.Tensor | None = None
        self._configs: dict[str, AnalogConfig] = {}  # per factor: its placement on the device
        self.depths: dict[str, int] = {}  # per factor: the deflation depth of the last prepare
        self.solve_order = ("G", "A")  # which factor apply() solves first (prepare() chooses)
        self._order_prev = "G"  # the order Y_prev (the first solve's output) was made in
        self.pricing = ThermoPricing(self.device, self.host, self.config, program=self._program,
                                     settings={k: getattr(self, k) for k in PRICED_OPTIONS})
        self._measured: list[float | None] | None = None  # apply(): the law per call, actual RHS

    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        """Scale and program (``solve``) or invert (``inverse``) the damped factors.

        Raises :class:`SolverFailure` when the device cannot represent a factor (e.g. too few
        coupling bits make it indefinite); the previous preparation is then kept.
        """
        lam_a, lam_g = damping.split(A, G)
        self.pricing.reset()
        if self.method == "solve":
            factors = {"A": self._setup(A, lam_a, "A", G.shape[0]),
                       "G": self._setup(G, lam_g, "G", A.shape[0])}
            # host: the lambda_max estimate, Jacobi, and the law's rounding-error norm (quantized
            # couplings only), then the deflation's products
            law = FEASIBILITY_ITERATIONS if self.noise.programs_couplings else 0
            vectors = self.power_iterations + (2 if self.jacobi else 0) + law
            costs = [self.pricing.host_cost(f.P.shape[0], vectors) for f in factors.values()]
            costs += [self.pricing.gemm_cost(prepare_gemms(f.P.shape[0], f.k)) for f in factors.values()]
            kappas = []
            for f in factors.values():
                lam = f.prog.eigenvalues
                kappas.append(float(lam[:, -1].max() / lam[:, 0].min()))
                costs.append(pricing.price_program(f.P.shape[0], self.device, oversize="block"))
            carry_over(self.factors, factors)  # ranging; held end states only at the same c
            self.factors = factors
            info = {"method": "solve", "programmed": True, "condition_number": kappas,
                    "scale": [f.c for f in factors.values()],
                    "seeds": [f.seed for f in factors.values()]}
            info.update(layer_setup_info(factors))
            kappa = dict(zip("GA", info["kappa_before"], strict=True))
            self.solve_order = ("A", "G") if kappa["A"] > kappa["G"] else ("G", "A")
            info["solve_order"] = "".join(self.solve_order)
            info.update(self._programming_info(factors))
            info["pricing"] = self.pricing.info(factors)
            self.last_report = _report(costs, info)
            return
        factors = {"A": self._factor(A, lam_a), "G": self._factor(G, lam_g)}
        costs = [self.pricing.host_cost(f.P.shape[0], self.power_iterations + (2 if self.jacobi else 0))
                 for f in factors.values()]
        results, inverses = [], []
        for key, f in factors.items():
            try:
                res = analog_inverse(f.P, self._config(key))
            except ValueError as err:
                raise SolverFailure(f"thermo solver (layer {self.layer_index}): inverting factor "
                                    f"{key} failed: {err}") from err
            inv = res.x / f.c
            if f.d is not None:
                inv = f.d[:, None] * inv * f.d[None, :]
            inverses.append(inv)
            results.append(res)
            self.pricing.spectra[key] = pricing.SpectrumSummary.from_matrix(f.P)
            costs.append(self.pricing.price(factors, key, "inverse", 1))
        self.A_inv, self.G_inv = inverses
        self.factors = factors  # for the residual and the exact reference
        info = result_info("inverse", results)
        info["pricing"] = self.pricing.info(factors, [("A", "inverse", 1), ("G", "inverse", 1)])
        self.last_report = _report(costs, info)

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        """Two analog solves (``solve``) or two digital products (``inverse``); see the module docs.

        Raises :class:`SolverFailure` for a non-finite gradient or a failed residual check.
        """
        if not math.isfinite(float(grad.sum())):
            raise SolverFailure(f"thermo solver (layer {self.layer_index}): non-finite gradient")
        if self.method == "inverse":
            assert self.A_inv is not None and self.G_inv is not None, "prepare() has not run"
            X = self.G_inv @ grad @ self.A_inv
            info = {"method": "inverse", "digital_apply": True}
            info.update(self._accuracy(grad, X, None))
            n_g, n_a = grad.shape
            seconds = preconditioning_seconds("inverse", n_a, n_g, self.host)  # the two host GEMMs
            self.last_report = _report([pricing.Cost(seconds, seconds * self.host.power_w,
                                                     {"preconditioning": seconds},
                                                     {"preconditioning": seconds * self.host.power_w})],
                                       info)
            return X
        assert self.factors, "prepare() has not run"
        fG, fA = self.factors["G"], self.factors["A"]
        # the law with the actual right-hand sides costs two O(n^2 m) products: only on the calls
        # that measure accuracy (the residual schedule, or every call with track_exact)
        self._measured = [] if self.track_exact or (
            self.residual_every > 0 and self.applies % self.residual_every == 0) else None
        # the worse-conditioned factor first: the first solve's error reaches the result through
        # the second factor's inverse, harmless when that one is well conditioned
        first, second = self.solve_order
        R1 = grad if first == "G" else grad.T
        y_prev = self.Y_prev if self.Y_prev is not None and self.Y_prev.shape == R1.shape \
            and self._order_prev == first else None
        x0_1 = {"previous": y_prev, "gradient": R1, "zero": None}[self.warm_start]
        res1, Y, run1 = self._solve(self.factors[first], first, R1, x0_1)
        R2 = Y.T
        x_prev = None if self.X_prev is None else (self.X_prev.T if second == "A" else self.X_prev)
        x0_2 = {"previous": x_prev, "gradient": R2, "zero": None}[self.warm_start]
        res2, X2, run2 = self._solve(self.factors[second], second, R2, x0_2)
        X = (X2.T if second == "A" else X2).contiguous()
        self.Y_prev, self.X_prev, self._order_prev = Y, X, first
        n_g, n_a = fG.P.shape[0], fA.P.shape[0]
        m_g, m_a = grad.shape[1], grad.shape[0]
        costs = [self.pricing.host_cost(n_g, 2 * m_g / n_g), self.pricing.host_cost(n_a, 2 * m_a / n_a),
                 self.pricing.gemm_cost(apply_gemms(n_g, fG.k, m_g) + apply_gemms(n_a, fA.k, m_a))]
        columns = {"G": m_g, "A": m_a}
        jobs = [(first, "solve", columns[first]), (second, "solve", columns[second])]
        if self.analog_time > 0:
            costs += [self.pricing.price(self.factors, key, op, m) for key, op, m in jobs]
            costs += [self.pricing.reload_cost(self.factors, key, m, run["reloaded_values"])
                      for (key, _, m), run in zip(jobs, (run1, run2), strict=True)
                      if run["reloaded_values"]]
        (res_g, run_g), (res_a, run_a) = ((res1, run1), (res2, run2))[:: 1 if first == "G" else -1]
        info = result_info("solve", [r for r in (res_g, res_a) if r is not None])
        info["warm_start"], info["solve_order"] = self.warm_start, first + second
        for key in run_g:
            info[key] = [run_g[key], run_a[key]]
        info.update(self._programming_info(self.factors))
        info["predicted_error"] = combined(info["predicted_rel_error"])
        info["predicted_relative_residual"] = combined(info["predicted_residual"])
        x_norm, inv_rms = float(X.norm()), inverse_rms(self.factors[second])
        amp = float(Y.norm()) * inv_rms / x_norm if inv_rms and x_norm > 0 else 1.0
        info["error_amplification"] = amp
        info["pricing"] = self.pricing.info(self.factors, jobs if self.analog_time > 0 else [],
                                             self._measured, amplification=amp)
        if self.overlap:  # return the previous call's solve; this one is used next time
            fresh, X = X, (X if self.X_stale is None else self.X_stale)
            info["staleness_steps"] = 0 if self.X_stale is None else 1
            self.X_stale = fresh
        info.update(self._accuracy(grad, X, info["predicted_relative_residual"]))
        self.last_report = _report(costs, info)
        return X

    def state_dict(self) -> dict[str, Any]:
        if self.method == "inverse":
            if self.A_inv is None:
                return {}
            return {"A_inv": self.A_inv, "G_inv": self.G_inv, "calls": self.calls}
        if not self.factors:
            return {}
        return {"factors": {k: f.state() for k, f in self.factors.items()}, "X_prev": self.X_prev,
                "Y_prev": self.Y_prev, "calls": self.calls, "X_stale": self.X_stale,
                "solve_order": self.solve_order, "_order_prev": self._order_prev, "applies": self.applies}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        factors = state.pop("factors", None)
        self.pricing.reset(spectra=True)
        if factors is not None:  # programmed lazily from (P, seed): bit-identical to the original
            self.factors = {k: DeviceFactor(**{**v, "defl": None if v.get("defl") is None
                                                 else Deflated(**v["defl"])})
                            for k, v in factors.items()}
        super().load_state_dict(state)

    def pricing_settings(self) -> dict[str, Any]:  # what the cost model needs: ThermoPricing.settings
        return self.pricing.settings(self.factors)

    # ---------------------------------------------------------------------------- internals
    def _config(self, key: str | None = None) -> AnalogConfig:
        """This call's configuration: a fresh seed from (seed, layer index, call counter), and the
        placement of factor ``key`` on the device."""
        cfg = self._placed(key) if key is not None else self.config
        return cfg.replace(seed=self._next_seed())

    def _placed(self, key: str) -> AnalogConfig:
        """The configuration of factor ``key`` (``"G"``/``"A"``) at its place on the device."""
        if key not in self._configs:
            slot = 2 * self.layer_index + (0 if key == "G" else 1)
            unit = self._placement.get("unit", slot % self.device.units)
            offset = self._placement.get("cell_offset", 0)
            noise = dataclasses.replace(self.noise, unit=unit, cell_offset=offset)
            self._configs[key] = self.config.replace(noise=noise)
        return self._configs[key]

    def _next_seed(self) -> int:
        # hash() of a tuple of ints is deterministic across processes (no hash randomization)
        seed = hash((self.seed, self.layer_index, self.calls)) % (2**62)
        self.calls += 1
        return seed

    def _factor(self, F: torch.Tensor, lam: float) -> DeviceFactor:
        """Damp, symmetrise and scale one factor (method ``inverse``: no deflation)."""
        M = 0.5 * (F + F.T) + lam * torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
        return self._scaled(M, M, lam, None)

    def _setup(self, F: torch.Tensor, lam: float, key: str, n_rhs: int) -> DeviceFactor:
        """Deflate, scale and program one damped factor (``method="solve"``). ``deflate="auto"``
        keeps the first depth (:func:`~thermo_kfac.solvers.deflation.auto_depths`) the feasibility
        law accepts, that programs positive definite and whose law window fits; the last depth is
        tried whatever the law says. Raises :class:`SolverFailure` with the law's reason."""
        Fs = 0.5 * (F + F.T)
        n = Fs.shape[0]
        if self.deflate == "auto":
            depths = auto_depths(n, self.max_deflate, self.depths.get(key, 0))
        elif self.deflate >= n:
            raise ValueError(f"deflate={self.deflate} must be smaller than the factor size n={n} "
                             f"(factor {key} of layer {self.layer_index})")
        else:
            depths = [self.deflate]
        eye = torch.eye(n, dtype=F.dtype, device=F.device)
        reason = ""
        for i, k in enumerate(depths):
            last = i == len(depths) - 1
            defl, S = deflate(Fs, k, lam, self._next_seed())
            f = self._scaled(Fs + lam * eye, S, lam, defl)
            f.feasibility = feasibility(f.P, self._placed(key).noise, f.lambda_min, self.feasibility_margin)
            reason = f"deflation depth {k}: {f.feasibility.reason()}"
            if not (f.feasibility.feasible or last):
                continue
            try:
                self._program(f, key)
            except ValueError as err:  # not positive definite after programming
                reason = f"deflation depth {k}: {err}"
                if last:
                    raise SolverFailure(f"thermo solver (layer {self.layer_index}): factor {key} "
                                        f"cannot be programmed ({reason})") from err
                continue
            self.pricing.spectra[key] = dataclasses.replace(
                pricing.SpectrumSummary.from_eigenvalues(f.prog.eigenvalues[0]),
                max_coupling=f.max_coupling)
            reachable = (self.auto_window or self.deflate == "auto") and self.pricing.plan(f, key, n_rhs)
            if reachable or last or self.deflate != "auto":
                self.depths[key] = k
                return f
        raise SolverFailure(f"thermo solver (layer {self.layer_index}): factor {key}: {reason}")

    def _scaled(self, M: torch.Tensor, S: torch.Tensor, lam: float, defl: Any) -> DeviceFactor:
        """``S`` (the damped remainder) optionally Jacobi-scaled and divided by its lambda_max
        estimate: the matrix to program. ``M`` is the full damped factor."""
        d = None
        if self.jacobi:
            diag = torch.diagonal(S)
            floor = float(diag.abs().max()) * 1e-12 or 1.0
            d = diag.clamp_min(floor).rsqrt()
            S = d[:, None] * S * d[None, :]
        seed = self._next_seed()
        c = lambda_max_estimate(S, self.power_iterations, seed)
        floor = lam * (float(d.min()) ** 2 if d is not None else 1.0)
        P = S / c
        off = float((P - torch.diag(torch.diagonal(P))).abs().max()) if P.shape[0] > 1 else 0.0
        return DeviceFactor(M=M, P=P, c=c, d=d, seed=seed, defl=defl, lambda_min=floor / c,
                            max_coupling=off)

    def _program(self, f: DeviceFactor, key: str) -> ProgrammedMatrix:
        if f.prog is None:
            f.prog = program(f.P, self._placed(key).replace(seed=f.seed))
        return f.prog

    def _programming_info(self, factors: dict[str, DeviceFactor]) -> dict[str, Any]:
        """``programmed_lambda_max`` and ``max_coupling`` per factor ``[G, A]``, and the
        converters simulated."""
        out: dict[str, Any] = {"programmed_lambda_max": [], "max_coupling": []}
        for f in (factors["G"], factors["A"]):
            if f.prog is None:
                continue
            out["programmed_lambda_max"].append(float(f.prog.eigenvalues[:, -1].max()))
            out["max_coupling"].append(float(f.prog.A_hw.abs().amax()))
        out["converters"] = self.pricing.converters()
        return out

    def _solve(self, f: DeviceFactor, key: str, B: torch.Tensor, x0: torch.Tensor | None):
        """``M^-1 B`` (columns of B) on the device; ``(result, X, ranging info)``.

        Each column is divided by its abs-max ``r_j`` (the DAC full scale) and multiplied by the
        input scale ``s`` that keeps the state inside the rails: ``s = min(1, RANGE_TARGET *
        state_range / peak)`` with ``peak`` the previous call's read-out peak per unit input
        (times ``RANGE_MARGIN``), or before any call the Gaussian estimate of
        :func:`hw_models.pricing.input_scale` from the programmed spectrum. ``x0`` is the warm
        start in host units (``"previous"``: the host's read-out of the previous call).
        """
        if f.defl is not None:  # the host solves the deflated modes; the device the remainder
            C, B = f.defl.split(B)
            x0 = None if x0 is None else f.defl.project(x0)
            res, X, run = self._solve_remainder(f, key, B, x0)
            return res, f.defl.combine(C, X), run
        return self._solve_remainder(f, key, B, x0)

    def _solve_remainder(self, f: DeviceFactor, key: str, B: torch.Tensor, x0: torch.Tensor | None):
        R = B if f.d is None else f.d[:, None] * B
        r = abs_max(R, (0,)).squeeze(0)  # column abs-max
        # An all-zero column (e.g. a dead input feature) is not sent: its solution is exactly 0,
        # whereas a device run would return pure thermal noise for it.
        sent = r > 0
        safe_r = torch.where(sent, r, 1.0)
        prog = self._program(f, key)
        scale = input_scale(f, prog.eigenvalues[0], R.shape[0], self.noise.state_range)
        r_eff = safe_r / scale  # the input entering the device is s * R / r
        Rn = R / r_eff
        run: dict[str, Any] = {"input_scale": scale, "snr_lost_db": -20.0 * math.log10(scale),
                               "bits_lost_to_ranging": -math.log2(scale), "reloaded_values": 0,
                               "saturated_fraction": 0.0, "range_fallback": False,
                               "predicted_rel_error": None, "predicted_residual": None,
                               "zero_started_columns": 0}
        if self.analog_time == 0 and self.noise.output_bits is None and not self.noise.read_noise:
            start_x = B if self.warm_start == "gradient" else x0
            return None, torch.zeros_like(B) if start_x is None else start_x.clone(), run
        # the start in device units
        x0n = None if x0 is None else (x0 if f.d is None else x0 / f.d[:, None]) * (f.c / r_eff)
        cfg = self._factor_config(f, key)
        if self.analog_time == 0:  # no dynamics: read the initial state out through the ADC
            Yn = torch.zeros_like(Rn) if x0n is None else x0n
            Yn, _ = read_out(Yn, self.noise, dims=(0,), generator=torch.Generator(
                device=Yn.device).manual_seed(self._next_seed()))
            res = None
        else:
            rhs_scale = None
            if self.warm_start == "previous" and x0n is not None:
                rails = self.noise.state_range
                if rails is not None:
                    # a previous solution that lies beyond the range target in this call's units
                    # (its column's input scale changed a lot) is no useful start: such columns
                    # start from 0 instead of being re-sent (counted)
                    far = abs_max(x0n, (0,)).squeeze(0) > pricing.RANGE_TARGET * rails
                    run["zero_started_columns"] = int(far.sum())
                    x0n = torch.where(far, 0.0, x0n)
                else:
                    far = torch.zeros(x0n.shape[1], dtype=torch.bool, device=x0n.device)
                x0n, run["reloaded_values"] = reload_start(f, x0n, ~far, self.noise, self._next_seed(),
                                                           r_eff, self._holds(f))
            elif self.warm_start == "gradient" and f.d is None:
                rhs_scale, x0n = f.c, None  # x0n = c Rn: the loaded input itself, no product
            cols = end_columns(f, Rn.shape[1]) if self.warm_start == "previous" else None
            res = solve_programmed(prog, Rn, cfg, x0n, seed=self._next_seed(), x0_rhs_scale=rhs_scale,
                                   rhs_absmax=torch.where(sent, scale, 0.0).to(Rn.dtype),
                                   end_state=cols is not None, end_cols=cols,
                                   input_error=self._measured is not None)
            Yn = res.x
            if self._measured is not None:  # the law on this call's actual inputs and start
                self._measured.append(self.pricing.call_error(f, res, Rn, torch.where(sent, r_eff, 0.0),
                                                       x0n, rhs_scale))
            dg = res.diagnostics
            err, resid = predicted_error(prog.eigenvalues[0], dg, self.noise, f.max_coupling)
            run.update(saturated_fraction=dg["saturated_fraction"],
                       range_fallback=dg["range_fallback"], predicted_rel_error=err,
                       predicted_residual=resid)
            if res.end_state is not None:
                hold_end_states(f, res.end_state, cols, r_eff)
            peak = float(abs_max(Yn)) / scale
            f.peak = peak if math.isfinite(peak) and peak > 0 else f.peak
        f.scale = scale
        r_out = torch.where(sent, r_eff, 0.0)  # a column not sent has the solution 0 exactly
        X = Yn * (r_out / f.c)  # a new tensor: the simulator's result keeps its device units
        return res, (X if f.d is None else f.d[:, None] * X), run

    def _factor_config(self, f: DeviceFactor, key: str) -> AnalogConfig:
        """Factor ``key``'s placed configuration with its own window (``analog_time="auto"``)."""
        if f.cfg is None:
            cfg = self._placed(key)
            f.cfg = cfg if f.window is None else cfg.replace(analog_time=f.window, burn_in=f.burn_in)
        return f.cfg

    def _holds(self, f: DeviceFactor) -> bool:
        """Whether ``f``'s unit still holds its end state at its next solve (no other analog
        factor of the preconditioner's layers is placed there; ``shared["analog_layers"]``)."""
        return not shares_unit(self.layer_index, "G" if self.factors.get("G") is f else "A",
                               self.shared.get("analog_layers", ()), self.device.units,
                               self._placement.get("unit"))

    def _accuracy(self, grad: torch.Tensor, X: torch.Tensor,
                  predicted: float | None) -> dict[str, Any]:
        """Relative residual of the damped Kronecker system, checked against the ``predicted`` one
        (``residual_limit``); with track_exact, the exact comparison."""
        out: dict[str, Any] = {}
        self.applies += 1
        due = self.residual_every > 0 and (self.applies - 1) % self.residual_every == 0
        if self.factors and (due or self.track_exact):
            # two O(n^2 m) products, so only every residual_every-th call (or with track_exact)
            fG, fA = self.factors["G"], self.factors["A"]
            g_norm = float(grad.norm())
            residual = fG.M @ X @ fA.M - grad
            self.residual = float(residual.norm()) / g_norm if g_norm > 0 else 0.0
            self.residual_apply = self.applies
        if self.residual is not None:
            out["relative_residual"] = self.residual
            out["residual_age"] = self.applies - (self.residual_apply or self.applies)
            if predicted is not None and predicted > 0:
                out["residual_ratio"] = self.residual / predicted
                fresh = out["residual_age"] == 0
                if self.residual_limit is not None and fresh \
                        and out["residual_ratio"] > self.residual_limit:
                    raise SolverFailure(
                        f"thermo solver (layer {self.layer_index}): relative residual "
                        f"{self.residual:.3g} is {out['residual_ratio']:.3g}x the predicted "
                        f"{predicted:.3g} (residual_limit={self.residual_limit})")
        if self.track_exact and self.factors:
            fG, fA = self.factors["G"], self.factors["A"]
            for f in (fG, fA):
                if f.chol is None:
                    f.chol = torch.linalg.cholesky(f.M.double())
            exact = torch.cholesky_solve(grad.double(), fG.chol)
            exact = torch.cholesky_solve(exact.T.contiguous(), fA.chol).T
            Xd = X.double()
            den = float(exact.norm())
            dot = float((Xd * exact).sum())
            out["cosine_to_exact"] = dot / (float(Xd.norm()) * den) if den > 0 and float(Xd.norm()) > 0 \
                else float("nan")
            out["rel_error_to_exact"] = float((Xd - exact).norm()) / den if den > 0 else float("nan")
        return out


def _report(costs: list[pricing.Cost], info: dict[str, Any]) -> SolverReport:
    breakdown: dict[str, float] = {}
    for c in costs:
        for key, value in c.breakdown_s.items():
            breakdown[key] = breakdown.get(key, 0.0) + value
    info["hardware_breakdown_s"] = breakdown
    return SolverReport(hardware_time_s=float(sum(c.seconds for c in costs)),
                        energy_j=float(sum(c.joules for c in costs)), info=info)
