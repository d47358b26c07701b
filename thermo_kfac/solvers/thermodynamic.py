"""Thermodynamic K-FAC solver: the damped Kronecker factors handled by the simulated analog device.

``ThermodynamicSolver`` (registered as ``"thermo"``) runs each layer's linear algebra on the
Langevin simulator of :mod:`hw_models` and reports what the modelled hardware would cost. By
default it simulates the device preset it is priced on (``device``: converters, rails, mismatch,
read noise, ``kappa0`` from :meth:`hw_models.ThermoDevice.noise_config`); ``ideal=True`` gives
the idealised device. The full guide (options, scaling, ranging, warm starts, error laws,
reports, failures) is ``docs/thermodynamic_kfac.md``.

- ``method="solve"`` (default; "Method 2" of the seed paper): :meth:`prepare` programs the two
  damped factors into the device once (:func:`hw_models.langevin.program`: coupling quantization
  and mismatch happen there, and the couplings stay resident); :meth:`apply` runs two analog solves
  with the gradient matrix as right-hand side, ``(G + lam_G I) Y = grad`` then
  ``(A + lam_A I) X^T = Y^T``, each started from the ``warm_start`` state.
- ``method="inverse"`` ("Method 1"): :meth:`prepare` inverts each damped factor by covariance
  sampling (:func:`hw_models.inverse`); :meth:`apply` multiplies digitally,
  ``G_inv @ grad @ A_inv``. Its relative error is about ``sqrt(n kappa / T)`` (``T`` the sampling
  time in tau), so it needs ``T >> n kappa``: far more analog time than a solve.

**Scaling** (all digital, ``O(n^2)`` per factor and ``O(n m)`` per right-hand side, priced in the
report as host work). Each damped factor ``M`` is symmetrised, optionally Jacobi-scaled
(``jacobi=True``: ``D M D`` with ``D = diag(M)^-1/2``) and divided by ``c``, an upper estimate of
its largest eigenvalue (:func:`lambda_max_estimate`: Lanczos from a random start), so the
programmed matrix ``P`` has ``lambda_max <= ~1`` (couplings inside ``coupling_range``) and
``analog_time`` counts relaxation times of the fastest mode (the slowest mode relaxes in
``kappa`` tau). Every right-hand-side column is divided by its abs-max ``r_j`` (the DAC's full
scale) and multiplied by the input scale ``s <= 1`` that keeps the state inside the rails
(:meth:`ThermodynamicSolver._solve`). The device returns ``Y ~ P^-1 B_n`` and the result is
mapped back as ``M^-1 B = D Y diag(r / s) / c``. Warm starts are converted into these device
units.

**Warm start** (method ``solve``): ``"previous"`` continues from where the device is: the end
states its units hold (one per unit) for those columns, the host's previous read-out re-sent
through the DAC for the others (counted in ``reloaded_values``), ``"gradient"`` from the
right-hand side itself
(TNGD, Donatella et al. 2024, eq. 19: ``analog_time=0`` returns the gradient unchanged -- SGD -- and
``analog_time -> infinity`` the natural gradient), ``"zero"`` from 0. ``analog_time=0`` runs no
dynamics: the initial state is read out through the ADC model.

**Reports**: after every :meth:`prepare`/:meth:`apply`, :attr:`last_report` holds the predicted
hardware time and energy from :mod:`hw_models.pricing` on the ``device`` preset (programming is
charged in ``prepare``, solves with resident couplings in ``apply``), priced with the spectrum of
the matrix actually programmed (one :class:`~hw_models.pricing.SpectrumSummary` per factor and
prepare) and the simulated window, burn-in and start; ``info["pricing"]`` carries those spectra,
each solve's settings and the law's ``predicted_rel_error`` (from the actual right-hand sides on
the calls that measure accuracy, else from the RHS model). In ``info`` also the
per-layer accuracy: ``relative_residual`` ``||(G+lam_G) X (A+lam_A) - grad|| / ||grad||``, the
programmed condition numbers, the simulator's predicted thermal error and systematic (coupling and
DAC) error, clip counts, seeds; with ``track_exact=True`` also ``cosine_to_exact`` and
``rel_error_to_exact`` against the exact damped solve computed digitally; the ranging, rails,
programmed spectrum and predicted error (with bias) keys of ``docs/thermodynamic_kfac.md``.
Failures raise :class:`~thermo_kfac.solvers.base.SolverFailure`. Pricing uses the device as
simulated (its ``kappa0``, coupling bits, ``ideal``); an inverse is priced at its simulated
sampling window, and each solve's DAC reload of ``reloaded_values`` is charged per call.

**Overlap** (``overlap=True``, method ``solve``): the device's solve for the gradient of step
``t`` runs while step ``t+1`` computes, so :meth:`apply` returns the previous call's solve (the
first call, having none, returns its own); ``info["staleness_steps"]`` says which, and with
``track_exact`` the error to the exact solve of the CURRENT gradient measures what staleness costs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hw_models import pricing
from hw_models.devices import digital_device, thermo_device
from hw_models.langevin import AnalogConfig, ProgrammedMatrix, program, solve_programmed
from hw_models.langevin import inverse as analog_inverse
from hw_models.noise import NoiseConfig, abs_max, read_out
from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverFailure, SolverReport, register_solver
from thermo_kfac.solvers.thermo_device import (
    LAMBDA_SAFETY,
    RANGE_TARGET,
    DeviceFactor,
    combined,
    hold_end_states,
    input_scale,
    lambda_max_estimate,
    predicted_error,
    reload_start,
    result_info,
)
from thermo_kfac.solvers.thermo_pricing import ThermoPricing

__all__ = ["LAMBDA_SAFETY", "ThermodynamicSolver", "lambda_max_estimate"]

METHODS = ("inverse", "solve")
INTEGRATORS = ("euler", "exact", "analytic", "sde")
WARM_STARTS = ("previous", "gradient", "zero")
_NOISE_FIELDS = ("coupling_bits", "input_bits", "output_bits", "rounding", "mismatch_std",
                 "mismatch_kind", "read_noise", "mitigation_copies", "coupling_range",
                 "input_range", "output_range", "device_seed", "state_range", "unit", "cell_offset")


@register_solver
class ThermodynamicSolver(ThermoPricing, KFACSolver):
    """K-FAC solver backed by the thermodynamic-processor simulator (see the module docs).

    Options (the same keys as the CLI's ``kfac:solver=thermo,key=value`` specs):

    - ``device`` (thermodynamic preset, default ``"chip"``): the device SIMULATED and priced. By
      default its converters and non-idealities are simulated as the preset states them
      (:meth:`hw_models.ThermoDevice.noise_config`: coupling/DAC/ADC bits, coupling range, the
      rails ``state_range``, mismatch, read noise) with its thermal noise ``kappa0``.
      ``ideal=True``: converters, rails, mismatch and read noise off (thermal noise stays).
      Explicit options below override single settings.
    - ``method``: ``"solve"`` (default) or ``"inverse"``.
    - ``analog_time`` (tau, default 50; ``0`` allowed for ``solve``: no dynamics), ``burn_in``
      (tau, default 10), ``kappa0`` (default: the preset's), ``dt`` (``"auto"`` or a step).
    - ``integrator``: ``"analytic"`` (default: the time average drawn from its exact Gaussian law;
      a run that could reach the rails runs the clipping ``"exact"`` integrator instead),
      ``"exact"``, ``"euler"``/``"sde"`` (Euler-Maruyama).
    - ``dynamics`` (``"overdamped"``/``"underdamped"``), ``mass``, ``friction``; ``backend``.
    - ``bits`` (shorthand for coupling, input and output bits; ``*_bits`` override it) and every
      other :class:`hw_models.NoiseConfig` field (``rounding``, ``mismatch_std``,
      ``mismatch_kind``, ``read_noise``, ``mitigation_copies``, ``*_range``, ``state_range``,
      ``device_seed``, ``unit``/``cell_offset``: the placement, default by layer, see below).
    - ``warm_start``: ``"previous"`` (default), ``"gradient"`` or ``"zero"`` (method ``solve``).
    - ``jacobi`` (default False): digital diagonal scaling before programming.
    - ``power_iterations`` (default 20): Lanczos steps of the ``lambda_max`` estimate
      (:func:`lambda_max_estimate`).
    - ``residual_every`` (default 10; 0: never): measure the relative residual every this many
      :meth:`apply` calls; ``residual_limit`` (default None): a measured relative residual above
      this many times the predicted one (bias, variance and static error) raises
      :class:`~thermo_kfac.solvers.base.SolverFailure` (the preconditioner's fallback serves).
    - ``track_exact`` (default False): also solve exactly and report
      ``cosine_to_exact``/``rel_error_to_exact``.
    - ``host`` (digital preset for host-side work, default ``"h100"``), ``seed`` (combined with
      the layer index and a call counter that is kept in the state dict).
    - ``overlap`` (default False; method ``solve``): apply the previous step's solve (module docs).

    Placement (mismatch): factor ``G`` of layer ``i`` is slot ``2 i``, ``A`` slot ``2 i + 1``;
    slot ``j`` sits on unit ``j mod units`` at ``cell_offset`` 0 unless ``unit``/``cell_offset``
    are given. Factors sharing a unit time-share its cells, so they see the same cell errors.
    """

    name = "thermo"
    analog = True
    digital_method = "eigh"  # the all-digital alternative it is compared with
    preset_options = {"device": "thermo", "host": "digital"}
    # the constructor's keywords and the noise fields it takes through **noise
    option_names = ("method", "analog_time", "burn_in", "kappa0", "dt", "integrator", "backend", "bits",
                    "device", "host", "seed", "warm_start", "track_exact", "jacobi", "power_iterations",
                    "dynamics", "mass", "friction", "residual_every", "ideal", "residual_limit", "overlap",
                    *_NOISE_FIELDS)

    def __init__(self, method: str = "solve", analog_time: float = 50.0, burn_in: float = 10.0,
                 kappa0: float | None = None, dt: float | str = "auto",
                 integrator: str = "analytic", backend: str = "torch", bits: int | None = None,
                 device: str = "chip", host: str = "h100", seed: int = 0,
                 warm_start: str = "previous", track_exact: bool = False, jacobi: bool = False,
                 power_iterations: int = 20, dynamics: str = "overdamped", mass: float = 1.0,
                 friction: float = 1.0, residual_every: int = 10, ideal: bool = False,
                 residual_limit: float | None = None, overlap: bool = False,
                 **noise: Any) -> None:
        super().__init__()
        self.method = check_choice("method", method, METHODS)
        check_choice("integrator", integrator, INTEGRATORS)
        self.warm_start = check_choice("warm_start", warm_start, WARM_STARTS)
        unknown = sorted(set(noise) - set(_NOISE_FIELDS))
        if unknown:
            raise ValueError(f"unknown thermo solver option(s) {', '.join(map(repr, unknown))}; valid "
                             f"noise options: {', '.join(_NOISE_FIELDS)}")
        if bits is not None:
            check_number("bits", bits, low=2, high=32, integer=True)
            for key in ("coupling_bits", "input_bits", "output_bits"):
                noise.setdefault(key, bits)
        self.seed = check_number("seed", seed, low=0, integer=True)
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
        self.device = thermo_device(device)
        self.host = digital_device(host)
        self._placement = {key: noise.pop(key) for key in ("unit", "cell_offset") if key in noise}
        if self.method == "inverse" and not ideal:
            # covariance sampling has no input to range: the rails bound the samples themselves
            noise.setdefault("state_range", None)
        # THE mapping from the preset to the simulator (the same one pricing uses)
        self.noise = self.device.noise_config(ideal=ideal, **noise)
        kappa0 = self.device.kappa0 if kappa0 is None else kappa0
        # AnalogConfig validates the rest; its analog_time must be > 0, so 0 is kept separately.
        self.config = AnalogConfig(analog_time=self.analog_time or 1.0, burn_in=burn_in, dt=dt,
                                   kappa0=kappa0,
                                   integrator="euler" if integrator == "sde" else integrator,
                                   backend=backend, seed=self.seed, noise=self.noise,
                                   dynamics=dynamics, mass=mass, friction=friction)
        if self.method == "inverse" and not kappa0 > 0:
            raise ValueError(f"kappa0={kappa0!r} must be > 0 for method='inverse' (covariance sampling)")
        self.bits = self.noise.coupling_bits
        # State used by apply()
        self.calls = 0
        self.A_inv: torch.Tensor | None = None  # method "inverse"
        self.G_inv: torch.Tensor | None = None
        self.factors: dict[str, DeviceFactor] = {}  # method "solve": "A" and "G"
        self.X_prev: torch.Tensor | None = None  # warm starts: the host's read-out, host units
        self.Y_prev: torch.Tensor | None = None
        self._configs: dict[str, AnalogConfig] = {}  # per factor: its placement on the device
        # pricing: the device as simulated (this solver's kappa0), the programmed spectra of the
        # last prepare and its priced jobs (pure functions of those, so priced once per prepare)
        # (a noiseless simulation, kappa0=0, is priced at a negligible kappa0: presets need > 0)
        self._priced_device = self.device.replace(kappa0=max(self.config.kappa0, 1e-30))
        self.spectra: dict[str, pricing.SpectrumSummary] = {}
        self._prices: dict[tuple, pricing.Price] = {}
        self._measured: list[float | None] | None = None  # apply(): the law per call, actual RHS

    # ----------------------------------------------------------------------------- protocol
    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        """Scale and program (``solve``) or invert (``inverse``) the damped factors.

        Raises :class:`SolverFailure` when the device cannot represent a factor (e.g. too few
        coupling bits make it indefinite); the previous preparation is then kept.
        """
        lam_a, lam_g = damping.split(A, G)
        factors = {"A": self._factor(A, lam_a), "G": self._factor(G, lam_g)}
        self._prices = {}
        costs = [self._host_cost(f.P.shape[0], self.power_iterations + (2 if self.jacobi else 0))
                 for f in factors.values()]
        if self.method == "solve":
            kappas = []
            for key, f in factors.items():
                try:
                    self._program(f, key)
                except ValueError as err:  # e.g. too few coupling bits: not positive definite
                    raise SolverFailure(f"thermo solver (layer {self.layer_index}): programming "
                                        f"factor {key} failed: {err}") from err
                lam = f.prog.eigenvalues
                kappas.append(float(lam[:, -1].max() / lam[:, 0].min()))
                self.spectra[key] = pricing.SpectrumSummary.from_eigenvalues(lam[0])
                costs.append(pricing.price_program(f.P.shape[0], self._priced_device, bits=self.bits,
                                                   oversize="block"))
            old = self.factors
            for key, f in factors.items():  # the device keeps its end states across updates
                if key in old and old[key].P.shape == f.P.shape:
                    f.held, f.held_cols = old[key].held, old[key].held_cols
                    f.peak, f.scale = old[key].peak, old[key].scale
            self.factors = factors
            info = {"method": "solve", "programmed": True, "condition_number": kappas,
                    "scale": [f.c for f in factors.values()],
                    "seeds": [f.seed for f in factors.values()]}
            info.update(self._programming_info(factors))
            info["pricing"] = self._pricing_info(factors)
            self.last_report = _report(costs, info)
            return
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
            self.spectra[key] = pricing.SpectrumSummary.from_matrix(f.P)
            costs.append(self._price(key, "inverse", 1))
        self.A_inv, self.G_inv = inverses
        self.factors = factors  # for the residual and the exact reference
        info = result_info("inverse", results)
        info["pricing"] = self._pricing_info(factors, [("A", "inverse", 1), ("G", "inverse", 1)])
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
            seconds = (pricing.gemm_time(n_g, n_g, n_a, self.host)
                       + pricing.gemm_time(n_g, n_a, n_a, self.host))  # the two host GEMMs
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
        x0_g = {"previous": self.Y_prev, "gradient": grad, "zero": None}[self.warm_start]
        res_g, Y, run_g = self._solve(fG, "G", grad, x0_g)
        x0_a = {"previous": None if self.X_prev is None else self.X_prev.T, "gradient": Y.T,
                "zero": None}[self.warm_start]
        res_a, Xt, run_a = self._solve(fA, "A", Y.T, x0_a)
        X = Xt.T.contiguous()
        self.Y_prev, self.X_prev = Y, X
        n_g, n_a = fG.P.shape[0], fA.P.shape[0]
        costs = [self._host_cost(n_g, 2 * grad.shape[1] / n_g), self._host_cost(n_a, 2 * grad.shape[0] / n_a)]
        jobs = [("G", "solve", grad.shape[1]), ("A", "solve", grad.shape[0])]
        if self.analog_time > 0:
            costs += [self._price(key, op, m) for key, op, m in jobs]
            costs += [self._reload_cost(key, m, run["reloaded_values"])
                      for (key, _, m), run in zip(jobs, (run_g, run_a), strict=True)
                      if run["reloaded_values"]]
        info = result_info("solve", [r for r in (res_g, res_a) if r is not None])
        info["warm_start"] = self.warm_start
        for key in run_g:
            info[key] = [run_g[key], run_a[key]]
        info.update(self._programming_info(self.factors))
        info["predicted_error"] = combined(info["predicted_rel_error"])
        info["predicted_relative_residual"] = combined(info["predicted_residual"])
        info["pricing"] = self._pricing_info(self.factors, jobs if self.analog_time > 0 else [],
                                             self._measured)
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
                "Y_prev": self.Y_prev, "calls": self.calls, "X_stale": self.X_stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        factors = state.pop("factors", None)
        self.spectra, self._prices = {}, {}
        if factors is not None:  # programmed lazily from (P, seed): bit-identical to the original
            self.factors = {k: DeviceFactor(**v) for k, v in factors.items()}
        super().load_state_dict(state)

    def converters(self) -> dict[str, Any]:
        """The converters and device non-idealities simulated (the report's ``converters``)."""
        n = self.noise
        return {"ideal": self.ideal, "coupling_bits": n.coupling_bits, "input_bits": n.input_bits,
                "output_bits": n.output_bits, "coupling_range": n.coupling_range,
                "input_range": n.input_range, "output_range": n.output_range,
                "state_range": n.state_range, "mismatch": n.mismatch_std or 0.0,
                "read_noise": n.read_noise or 0.0, "kappa0": self.config.kappa0}

    def pricing_settings(self) -> dict[str, Any]:
        """What the cost model needs (see :meth:`KFACSolver.pricing_settings`).

        The simulated converters (``converters()``: the same values the simulator runs with),
        ``ideal``, the last input scale per factor (``input_scale``: ``[G, A]``, 1 before any
        call) and the warm-start reload: ``warm_start``, ``held_states`` (end states the device
        keeps per factor: one per unit) and ``reload_bits`` (the DAC a re-sent state goes
        through; each call's ``reloaded_values`` are in its report).
        """
        scales = [self.factors[k].scale if k in self.factors else 1.0 for k in ("G", "A")]
        out = {"digital_method": self.digital_method, "method": self.method, "bits": self.bits,
               "analog_time": self.analog_time, "burn_in": self.config.burn_in,
               "kappa0": self.config.kappa0, "copies": self.noise.mitigation_copies,
               "device": self.device.name, "host": self.host.name, "ideal": self.ideal,
               "input_scale": scales, "warm_start": self.warm_start,
               "held_states": self.device.units, "reload_bits": self.noise.input_bits,
               "start": self._start, "overlap": self.overlap}
        out["converters"] = self.converters()
        return out

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
            noise = NoiseConfig(**{**self.noise.__dict__, "unit": unit, "cell_offset": offset})
            self._configs[key] = self.config.replace(noise=noise)
        return self._configs[key]

    def _next_seed(self) -> int:
        # hash() of a tuple of ints is deterministic across processes (no hash randomization)
        seed = hash((self.seed, self.layer_index, self.calls)) % (2**62)
        self.calls += 1
        return seed

    def _factor(self, F: torch.Tensor, lam: float) -> DeviceFactor:
        """Damp, symmetrise and scale one factor (module docs, "Scaling")."""
        n = F.shape[0]
        M = 0.5 * (F + F.T) + lam * torch.eye(n, dtype=F.dtype, device=F.device)
        d = None
        S = M
        if self.jacobi:
            diag = torch.diagonal(M)
            floor = float(diag.abs().max()) * 1e-12 or 1.0
            d = diag.clamp_min(floor).rsqrt()
            S = d[:, None] * M * d[None, :]
        seed = self._next_seed()
        c = lambda_max_estimate(S, self.power_iterations, seed)
        return DeviceFactor(M=M, P=S / c, c=c, d=d, seed=seed)

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
        out["converters"] = self.converters()
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
        R = B if f.d is None else f.d[:, None] * B
        r = abs_max(R, (0,)).squeeze(0)  # column abs-max
        # An all-zero column (e.g. a dead input feature) is not sent: its solution is exactly 0,
        # whereas a device run would return pure thermal noise for it.
        sent = r > 0
        safe_r = torch.where(sent, r, 1.0)
        prog = self._program(f, key)
        scale = self._input_scale(f, prog, R.shape[0])
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
        cfg = self._placed(key)
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
                    far = abs_max(x0n, (0,)).squeeze(0) > RANGE_TARGET * rails
                    run["zero_started_columns"] = int(far.sum())
                    x0n = torch.where(far, 0.0, x0n)
                else:
                    far = torch.zeros(x0n.shape[1], dtype=torch.bool, device=x0n.device)
                x0n, run["reloaded_values"] = self._reload(f, x0n, ~far)
            elif self.warm_start == "gradient" and f.d is None:
                rhs_scale, x0n = f.c, None  # x0n = c Rn: the loaded input itself, no product
            res = solve_programmed(prog, Rn, cfg, x0n, seed=self._next_seed(), x0_rhs_scale=rhs_scale,
                                   rhs_absmax=torch.where(sent, scale, 0.0).to(Rn.dtype),
                                   end_state=self.warm_start == "previous")
            Yn = res.x
            if self._measured is not None:  # the law on this call's actual inputs and start
                self._measured.append(self._call_error(f, res, Rn, torch.where(sent, r_eff, 0.0),
                                                       x0n, rhs_scale))
            dg = res.diagnostics
            err, resid = self._predicted_error(prog, dg)
            run.update(saturated_fraction=dg["saturated_fraction"],
                       range_fallback=dg["range_fallback"], predicted_rel_error=err,
                       predicted_residual=resid)
            if res.end_state is not None:
                self._hold(f, res.end_state)
            peak = float(abs_max(Yn)) / scale
            f.peak = peak if math.isfinite(peak) and peak > 0 else f.peak
        f.scale = scale
        r_out = torch.where(sent, r_eff, 0.0)  # a column not sent has the solution 0 exactly
        X = Yn.mul_(r_out / f.c) if res is not None else Yn * (r_out / f.c)
        return res, (X if f.d is None else f.d[:, None] * X), run

    def _input_scale(self, f: DeviceFactor, prog: ProgrammedMatrix, n: int) -> float:
        return input_scale(f, prog.eigenvalues[0], n, self.noise.state_range)

    def _reload(self, f: DeviceFactor, x0n: torch.Tensor, resend: torch.Tensor
                ) -> tuple[torch.Tensor, int]:
        return reload_start(f, x0n, resend, self.noise, self._next_seed())

    def _hold(self, f: DeviceFactor, end: torch.Tensor) -> None:
        hold_end_states(f, end, self.device.units)

    def _predicted_error(self, prog: ProgrammedMatrix, dg: dict[str, Any]
                         ) -> tuple[float | None, float | None]:
        return predicted_error(prog.eigenvalues[0], dg, self.noise)

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
