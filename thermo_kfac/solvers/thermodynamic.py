"""Thermodynamic K-FAC solver: the damped Kronecker factors handled by the simulated analog device.

``ThermodynamicSolver`` (registered as ``"thermo"``) runs each layer's linear algebra on the
Langevin simulator of :mod:`hw_models` and reports what the modelled hardware would cost. The
full guide (options, scaling, error laws, reports) is ``docs/thermodynamic_kfac.md``.

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
(``jacobi=True``: ``D M D`` with ``D = diag(M)^-1/2``) and divided by ``c``, an estimate of its
largest eigenvalue by ``power_iterations`` steps of the power method, so the programmed matrix
``P`` has ``lambda_max ~ 1`` and ``analog_time`` counts relaxation times of the fastest mode (the
slowest mode relaxes in ``kappa`` tau). Every right-hand-side column is divided by its abs-max
``r_j``, so it enters the device at the DAC's full scale (what the converter's range management
does) and the thermal noise ``kappa0`` is measured against a unit signal. The device returns
``Y ~ P^-1 B_n`` and the result is mapped back as ``M^-1 B = D Y diag(r) / c``. Warm starts are
converted into these device units.

**Warm start** (method ``solve``): ``"previous"`` starts each solve from the previous call's
solution (the device is not reset between calls), ``"gradient"`` from the right-hand side itself
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
``rel_error_to_exact`` against the exact damped solve computed digitally. An inverse is priced
at its simulated sampling window.

**Overlap** (``overlap=True``, method ``solve``): the device's solve for the gradient of step
``t`` runs while step ``t+1`` computes, so :meth:`apply` returns the previous call's solve (the
first call, having none, returns its own); ``info["staleness_steps"]`` says which, and with
``track_exact`` the error to the exact solve of the CURRENT gradient measures what staleness costs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from hw_models import pricing
from hw_models.devices import digital_device, thermo_device
from hw_models.langevin import AnalogConfig, ProgrammedMatrix, program, solve_programmed
from hw_models.langevin import inverse as analog_inverse
from hw_models.noise import NoiseConfig, abs_max, read_out
from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverReport, register_solver
from thermo_kfac.solvers.thermo_pricing import ThermoPricing

METHODS = ("inverse", "solve")
INTEGRATORS = ("euler", "exact", "analytic", "sde")
WARM_STARTS = ("previous", "gradient", "zero")
_NOISE_FIELDS = ("coupling_bits", "input_bits", "output_bits", "rounding", "mismatch_std",
                 "mismatch_kind", "read_noise", "mitigation_copies", "coupling_range",
                 "input_range", "output_range", "device_seed")


@dataclass
class _Factor:
    """One damped factor as the device sees it: ``M = c D^-1 P D^-1`` (``D = diag(d)``)."""

    M: torch.Tensor  # damped, symmetrised factor (for residuals and the exact reference)
    P: torch.Tensor  # programmed (scaled) matrix
    c: float  # lambda_max estimate of D M D
    d: torch.Tensor | None  # Jacobi scaling vector diag(M)^-1/2, or None
    seed: int  # seed of the programming (stochastic rounding)
    prog: ProgrammedMatrix | None = None  # cached device state; rebuilt from (P, seed) on resume
    chol: torch.Tensor | None = None  # Cholesky factor of M (track_exact)
    U: torch.Tensor | None = None  # last device estimate in P's eigenbasis (analytic path)
    r: torch.Tensor | None = None  # and its per-column input scales

    def state(self) -> dict[str, Any]:
        return {"M": self.M, "P": self.P, "c": self.c, "d": self.d, "seed": self.seed, "U": self.U,
                "r": self.r}


@register_solver
class ThermodynamicSolver(ThermoPricing, KFACSolver):
    """K-FAC solver backed by the thermodynamic-processor simulator (see the module docs).

    Options (the same keys as the CLI's ``kfac:solver=thermo,key=value`` specs):

    - ``method``: ``"solve"`` (default) or ``"inverse"``.
    - ``analog_time`` (tau, default 50; ``0`` allowed for ``solve``: no dynamics), ``burn_in``
      (tau, default 10), ``kappa0`` (thermal noise, default 1e-2), ``dt`` (``"auto"`` or a step).
    - ``integrator``: ``"analytic"`` (default: the time average drawn from its exact Gaussian law),
      ``"exact"`` (exact transitions in the eigenbasis), ``"euler"``/``"sde"`` (Euler-Maruyama).
    - ``dynamics`` (``"overdamped"``/``"underdamped"``), ``mass``, ``friction``; ``backend``
      (``"torch"``/``"numba"``).
    - ``bits`` (shorthand for coupling, input and output bits; ``*_bits`` override it) and every
      other :class:`hw_models.NoiseConfig` field (``rounding``, ``mismatch_std``,
      ``mismatch_kind``, ``read_noise``, ``mitigation_copies``, ``*_range``, ``device_seed``).
    - ``warm_start``: ``"previous"`` (default), ``"gradient"`` or ``"zero"`` (method ``solve``).
    - ``jacobi`` (default False): digital diagonal scaling before programming.
    - ``power_iterations`` (default 20): power-method steps of the ``lambda_max`` estimate.
    - ``residual_every`` (default 10; 0: never): measure the relative residual every this many
      :meth:`apply` calls (two ``O(n^2 m)`` products); reports carry the latest value and its age.
    - ``track_exact`` (default False): also solve exactly (digitally) and report
      ``cosine_to_exact``/``rel_error_to_exact``.
    - ``device`` (thermodynamic cost preset, default ``"chip"``), ``host`` (digital preset for
      host-side work, default ``"h100"``), ``seed`` (combined with the layer index and a call
      counter that is kept in the state dict).
    - ``overlap`` (default False; method ``solve``): apply the previous step's solve (module docs).
    """

    name = "thermo"
    analog = True
    digital_method = "eigh"  # the all-digital alternative it is compared with
    preset_options = {"device": "thermo", "host": "digital"}

    def __init__(self, method: str = "solve", analog_time: float = 50.0, burn_in: float = 10.0,
                 kappa0: float = 1e-2, dt: float | str = "auto", integrator: str = "analytic",
                 backend: str = "torch", bits: int | None = None, device: str = "chip",
                 host: str = "h100", seed: int = 0, warm_start: str = "previous",
                 track_exact: bool = False, jacobi: bool = False, power_iterations: int = 20,
                 dynamics: str = "overdamped", mass: float = 1.0, friction: float = 1.0,
                 residual_every: int = 10, overlap: bool = False, **noise: Any) -> None:
        super().__init__()
        self.method = check_choice("method", method, METHODS)
        check_choice("integrator", integrator, INTEGRATORS)
        self.warm_start = check_choice("warm_start", warm_start, WARM_STARTS)
        unknown = sorted(set(noise) - set(_NOISE_FIELDS))
        if unknown:
            raise ValueError(f"unknown thermo solver option(s) {', '.join(map(repr, unknown))}; valid "
                             f"noise options: {', '.join(_NOISE_FIELDS)}")
        if bits is not None:
            check_number("bits", bits, low=1, high=32, integer=True)
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
        for name, value in (("track_exact", track_exact), ("jacobi", jacobi), ("overlap", overlap)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be True or False")
        self.track_exact, self.jacobi = track_exact, jacobi
        if overlap and self.method != "solve":
            raise ValueError(f"overlap=True needs method='solve'; got method={self.method!r}")
        self.overlap = overlap
        self.X_stale: torch.Tensor | None = None  # overlap: the solve that the next apply() returns
        self.power_iterations = check_number("power_iterations", power_iterations, low=1, high=10_000,
                                             integer=True)
        self.residual_every = check_number("residual_every", residual_every, low=0, integer=True)
        self.applies = 0  # apply() calls since construction (residual schedule)
        self.residual: float | None = None  # last measured relative residual
        self.residual_apply: int | None = None  # and the apply() call it was measured in
        self.analog_time = float(analog_time)
        self.noise = NoiseConfig(**noise)
        # AnalogConfig validates the rest; its analog_time must be > 0, so 0 is kept separately.
        self.config = AnalogConfig(analog_time=self.analog_time or 1.0, burn_in=burn_in, dt=dt,
                                   kappa0=kappa0,
                                   integrator="euler" if integrator == "sde" else integrator,
                                   backend=backend, seed=self.seed, noise=self.noise,
                                   dynamics=dynamics, mass=mass, friction=friction)
        if self.method == "inverse" and not kappa0 > 0:
            raise ValueError(f"kappa0={kappa0!r} must be > 0 for method='inverse' (covariance sampling)")
        self.device = thermo_device(device)
        self.host = digital_device(host)
        self.bits = self.noise.coupling_bits
        # State used by apply()
        self.calls = 0
        self.A_inv: torch.Tensor | None = None  # method "inverse"
        self.G_inv: torch.Tensor | None = None
        self.factors: dict[str, _Factor] = {}  # method "solve": "A" and "G"
        self.X_prev: torch.Tensor | None = None  # warm starts, in unnormalised units
        self.Y_prev: torch.Tensor | None = None
        self.failure: str | None = None  # set when the device could not be programmed
        self._warned = False
        # pricing: the device as simulated (this solver's kappa0), the programmed spectra of the
        # last prepare and its priced jobs (pure functions of those, so priced once per prepare)
        # (a noiseless simulation, kappa0=0, is priced at a negligible kappa0: presets need > 0)
        self._priced_device = self.device.replace(kappa0=max(self.config.kappa0, 1e-30))
        self.spectra: dict[str, pricing.SpectrumSummary] = {}
        self._prices: dict[tuple, pricing.Price] = {}
        self._measured: list[float | None] | None = None  # apply(): the law per call, actual RHS

    # ----------------------------------------------------------------------------- protocol
    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        lam_a, lam_g = damping.split(A, G)
        self.failure = None
        factors = {"A": self._factor(A, lam_a), "G": self._factor(G, lam_g)}
        self._prices = {}
        costs = [self._host_cost(f.P.shape[0], self.power_iterations + (2 if self.jacobi else 0))
                 for f in factors.values()]
        if self.method == "solve":
            self.factors = factors
            kappas = []
            for key, f in factors.items():
                try:
                    self._program(f)
                except ValueError as err:  # e.g. too few coupling bits: not positive definite
                    self._fail(f"programming factor {key} failed: {err}")
                    kappas.append(float("nan"))
                    continue
                lam = f.prog.eigenvalues
                kappas.append(float(lam[:, -1].max() / lam[:, 0].min()))
                self.spectra[key] = pricing.SpectrumSummary.from_eigenvalues(lam[0])
                costs.append(pricing.price_program(f.P.shape[0], self.device, bits=self.bits,
                                                   oversize="block"))
            self.last_report = _report(costs, {"method": "solve", "programmed": self.failure is None,
                                               "condition_number": kappas,
                                               "scale": [f.c for f in factors.values()],
                                               "seeds": [f.seed for f in factors.values()],
                                               "failure": self.failure,
                                               "pricing": self._pricing_info(factors)})
            return
        results, inverses = [], []
        for key, f in factors.items():
            try:
                res = analog_inverse(f.P, self._config())
            except ValueError as err:
                self._fail(f"inverting factor {key} failed: {err}")
                self.A_inv = self.G_inv = None
                self.last_report = _report(costs, {"method": "inverse", "failure": self.failure})
                return
            inv = res.x / f.c
            if f.d is not None:
                inv = f.d[:, None] * inv * f.d[None, :]
            inverses.append(inv)
            results.append(res)
            self.spectra[key] = pricing.SpectrumSummary.from_matrix(f.P)
            costs.append(self._price(key, "inverse", 1))
        self.A_inv, self.G_inv = inverses
        self.factors = factors  # for the residual and the exact reference
        info = _result_info("inverse", results)
        info["pricing"] = self._pricing_info(factors, [("A", "inverse", 1), ("G", "inverse", 1)])
        self.last_report = _report(costs, info)

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        if self.failure is not None or not math.isfinite(float(grad.sum())):
            # an unusable device or input: NaN lets the preconditioner's fallback take over
            self.last_report = SolverReport(info={"method": self.method, "failure": self.failure
                                                  or "non-finite gradient"})
            return torch.full_like(grad, float("nan"))
        if self.method == "inverse":
            assert self.A_inv is not None and self.G_inv is not None, "prepare() has not run"
            X = self.G_inv @ grad @ self.A_inv
            info = {"method": "inverse", "digital_apply": True}
            info.update(self._accuracy(grad, X))
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
        res_g, Y = self._solve(fG, grad, x0_g, self.warm_start)
        x0_a = {"previous": None if self.X_prev is None else self.X_prev.T, "gradient": Y.T,
                "zero": None}[self.warm_start]
        res_a, Xt = self._solve(fA, Y.T, x0_a, self.warm_start)
        X = Xt.T.contiguous()
        self.Y_prev, self.X_prev = Y, X
        n_g, n_a = fG.P.shape[0], fA.P.shape[0]
        costs = [self._host_cost(n_g, 2 * grad.shape[1] / n_g), self._host_cost(n_a, 2 * grad.shape[0] / n_a)]
        jobs = [("G", "solve", grad.shape[1]), ("A", "solve", grad.shape[0])]
        if self.analog_time > 0:
            costs += [self._price(key, op, m) for key, op, m in jobs]
        info = _result_info("solve", [r for r in (res_g, res_a) if r is not None])
        info["warm_start"] = self.warm_start
        info["pricing"] = self._pricing_info(self.factors, jobs if self.analog_time > 0 else [],
                                             self._measured)
        if self.overlap:  # return the previous call's solve; this one is used next time
            fresh, X = X, (X if self.X_stale is None else self.X_stale)
            info["staleness_steps"] = 0 if self.X_stale is None else 1
            self.X_stale = fresh
        info.update(self._accuracy(grad, X))
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
            self.factors = {k: _Factor(**v) for k, v in factors.items()}
        super().load_state_dict(state)

    def pricing_settings(self) -> dict[str, Any]:
        """What the cost model needs (see :meth:`KFACSolver.pricing_settings`)."""
        return {"digital_method": self.digital_method, "method": self.method, "bits": self.bits,
                "analog_time": self.analog_time, "burn_in": self.config.burn_in,
                "kappa0": self.config.kappa0, "copies": self.noise.mitigation_copies,
                "device": self.device.name, "host": self.host.name, "start": self._start,
                "ideal": self._ideal, "overlap": self.overlap}

    # ---------------------------------------------------------------------------- internals
    def _config(self) -> AnalogConfig:
        """This call's configuration: a fresh seed from (seed, layer index, call counter)."""
        return self.config.replace(seed=self._next_seed())

    def _next_seed(self) -> int:
        # hash() of a tuple of ints is deterministic across processes (no hash randomization)
        seed = hash((self.seed, self.layer_index, self.calls)) % (2**62)
        self.calls += 1
        return seed

    def _factor(self, F: torch.Tensor, lam: float) -> _Factor:
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
        c = _lambda_max(S, self.power_iterations)
        return _Factor(M=M, P=S / c, c=c, d=d, seed=self._next_seed())

    def _program(self, f: _Factor) -> ProgrammedMatrix:
        if f.prog is None:
            f.prog = program(f.P, self.config.replace(seed=f.seed))
        return f.prog

    def _fail(self, message: str) -> None:
        self.failure = message
        if not self._warned:
            warnings.warn(f"thermo solver (layer {self.layer_index}): {message}; apply() returns NaN "
                          "so the preconditioner's fallback solver is used", RuntimeWarning, stacklevel=4)
            self._warned = True

    def _solve(self, f: _Factor, B: torch.Tensor, x0: torch.Tensor | None, start: str):
        """``M^-1 B`` (columns of B) on the device, in device units (module docs); ``(result, X)``.

        ``start`` is the warm start: ``"previous"`` (``x0`` is the previous solution),
        ``"gradient"`` (``x0`` is ``B``) or ``"zero"``.
        """
        R = B if f.d is None else f.d[:, None] * B
        r = abs_max(R, (0,)).squeeze(0)  # column abs-max
        # An all-zero column (e.g. a dead input feature) is not sent: its solution is exactly 0,
        # whereas a device run would return pure thermal noise for it.
        sent = r > 0
        safe_r = torch.where(sent, r, 1.0)
        Rn = R / safe_r
        if self.analog_time == 0 and self.noise.output_bits is None and not self.noise.read_noise:
            # no dynamics and an ideal read-out: the initial state itself, without rescaling error
            start_x = B if start == "gradient" else x0
            return None, torch.zeros_like(B) if start_x is None else start_x.clone()
        # the start in device units (the simulator's general path uses it; see the hints below)
        x0n = None if x0 is None else (x0 if f.d is None else x0 / f.d[:, None]) * (f.c / safe_r)
        if self.analog_time == 0:  # no dynamics: read the initial state out through the ADC
            Yn = torch.zeros_like(Rn) if x0n is None else x0n
            Yn, _ = read_out(Yn, self.noise, dims=(0,), generator=torch.Generator(
                device=Yn.device).manual_seed(self._next_seed()))
            res = None
        else:
            # Warm-start hints for the simulator's cached analytic path (other paths start from
            # x0n): "gradient" starts at the loaded input (x0n = c Rn), "previous" continues from
            # the device's pre-read-out state, rescaled to this call's column scales
            # (x0n = Yn_prev r_prev / r; the Jacobi scaling cancels).
            rhs_scale = f.c if start == "gradient" and f.d is None else None
            state = None
            if start == "previous" and f.U is not None and f.r is not None \
                    and f.U.shape[-1] == B.shape[1]:
                state = f.U * torch.where(sent, f.r / safe_r, 0.0)
            # Rn's column abs-max is exactly 1 (r / r), or 0 for a column not sent
            res = solve_programmed(self._program(f), Rn, self.config, x0n, seed=self._next_seed(),
                                   x0_eigen=state, x0_rhs_scale=rhs_scale,
                                   rhs_absmax=sent.to(Rn.dtype))
            Yn = res.x
            if self._measured is not None:
                self._measured.append(self._call_error(f, res, Rn, r, state, x0n, rhs_scale))
            f.U, f.r = res.state, r
        X = Yn.mul_(r / f.c) if res is not None else Yn * (r / f.c)
        return res, (X if f.d is None else f.d[:, None] * X)

    def _accuracy(self, grad: torch.Tensor, X: torch.Tensor) -> dict[str, Any]:
        """Relative residual of the damped Kronecker system; with track_exact, the exact comparison."""
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


def _lambda_max(S: torch.Tensor, iterations: int) -> float:
    """Power-method estimate of the largest eigenvalue of the SPD ``S`` (at least tiny)."""
    v = torch.ones(S.shape[0], dtype=S.dtype, device=S.device)  # K-FAC factors: near the top
    est = 0.0
    for _ in range(iterations):
        w = S @ v
        norm = float(w.norm())
        if not norm > 0 or not math.isfinite(norm):
            break
        est = float(v @ w) / float(v @ v)
        v = w / norm
    # the Rayleigh quotient underestimates lambda_max; the simulator's dt follows the programmed
    # spectrum, so a slight excess above 1 costs nothing but a faster mode
    return est if est > 0 and math.isfinite(est) else 1.0


def _float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _result_info(method: str, results: list[Any]) -> dict[str, Any]:
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
        "coupling_error": [d.get("coupling_error", d.get("systematic_error")) for d in diags],
        "input_error": [d.get("input_error") for d in diags],
        "clipped": int(sum(int(d.get(k) or 0) for d in diags
                           for k in ("clipped_couplings", "clipped_inputs", "clipped_outputs"))),
        "seeds": [d.get("seed") for d in diags],
    }


def _report(costs: list[pricing.Cost], info: dict[str, Any]) -> SolverReport:
    breakdown: dict[str, float] = {}
    for c in costs:
        for key, value in c.breakdown_s.items():
            breakdown[key] = breakdown.get(key, 0.0) + value
    info["hardware_breakdown_s"] = breakdown
    return SolverReport(hardware_time_s=float(sum(c.seconds for c in costs)),
                        energy_j=float(sum(c.joules for c in costs)), info=info)
