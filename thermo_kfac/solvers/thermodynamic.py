"""Thermodynamic K-FAC solver: the damped Kronecker factors handled by the simulated analog device.

``ThermodynamicSolver`` (registered as ``"thermo"``) runs each layer's linear algebra on the
Langevin simulator of :mod:`hw_models` and reports what the modelled hardware would cost:

- ``method="inverse"``: :meth:`prepare` inverts each damped factor ``A + lam_A I`` and
  ``G + lam_G I`` by covariance sampling (:func:`hw_models.inverse`); :meth:`apply` multiplies
  digitally, ``G_inv @ grad @ A_inv``.
- ``method="solve"``: :meth:`prepare` stores the damped factors; :meth:`apply` does two analog
  solves with the gradient matrix as right-hand side, ``(G + lam_G I) Y = grad`` then
  ``(A + lam_A I) X^T = Y^T``, each warm-started from the previous call's solution.

Damping is folded into the programmed matrix. **Scale handling**: the OU simulator's accuracy
depends on the matrix scale (the stationary variance is ``kappa0 / lambda``, and ``dt="auto"``
follows ``lambda_max``). Each damped factor ``M`` is therefore divided by ``c = max_i sum_j |M_ij|``
(Gershgorin's bound on ``lambda_max``, so the programmed spectrum lies in ``(0, 1]`` and
``analog_time`` is measured in units of the fastest mode's relaxation time), and each right-hand
side by its Frobenius norm ``s``. The device then computes ``P^-1 (B/s)`` with ``P = M / c``, and
the result is mapped back as ``M^-1 B = (s / c) P^-1 (B/s)``; an inverse as ``M^-1 = P^-1 / c``.
Warm starts are converted into the normalised units of the current call.

After every :meth:`prepare`/:meth:`apply` :attr:`last_report` holds the predicted hardware time
and energy from :mod:`hw_models.cost` (``thermo_inverse_cost``/``thermo_solve_cost`` on the
``device`` preset). The cost model is parametrised by a target accuracy ``eps``; it is chosen so
that the model's averaging time equals the simulated ``analog_time`` (in tau), i.e.
``eps = sqrt((n + 1) kappa / T)`` for an inverse and ``eps = sqrt(2 kappa0_dev n kappa^2 / T)``
for a solve, clamped to ``[1e-6, 0.999]``; ``kappa`` is the programmed matrix's condition number.
A digital ``apply`` (method ``inverse``) reports no hardware time.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hw_models.cost import thermo_inverse_cost, thermo_solve_cost
from hw_models.devices import digital_device, thermo_device
from hw_models.langevin import AnalogConfig
from hw_models.langevin import inverse as analog_inverse
from hw_models.langevin import solve as analog_solve
from hw_models.noise import NoiseConfig
from hw_models.validation import check_choice, check_number
from thermo_kfac.solvers.base import Damping, KFACSolver, SolverReport, register_solver

METHODS = ("inverse", "solve")
INTEGRATORS = ("euler", "exact", "analytic", "sde")
_NOISE_FIELDS = ("coupling_bits", "input_bits", "output_bits", "rounding", "mismatch_std",
                 "mismatch_kind", "read_noise", "mitigation_copies", "coupling_range",
                 "input_range", "output_range", "device_seed")


@register_solver
class ThermodynamicSolver(KFACSolver):
    """K-FAC solver backed by the thermodynamic-processor simulator (module docs).

    Options: ``method`` (``"inverse"``/``"solve"``), ``analog_time``, ``burn_in``, ``kappa0``,
    ``dt``, ``integrator`` (``"euler"``, alias ``"sde"``, ``"exact"``, ``"analytic"``),
    ``backend`` (``"torch"``/``"numba"``), ``bits`` (shorthand for coupling, input and output
    bits; individual ``*_bits`` override it), every other :class:`hw_models.NoiseConfig` field,
    ``device`` (thermodynamic cost-model preset, default ``"chip"``), ``host`` (digital preset
    that prices host-side work of an inverse on devices without on-chip accumulators) and
    ``seed`` (each call uses ``seed`` combined with the layer index and a call counter, kept in
    the state dict).
    """

    name = "thermo"

    def __init__(self, method: str = "inverse", analog_time: float = 50.0, burn_in: float = 10.0,
                 kappa0: float = 1e-2, dt: float | str = "auto", integrator: str = "euler",
                 backend: str = "torch", bits: int | None = None, device: str = "chip",
                 host: str = "h100", seed: int = 0, **noise: Any) -> None:
        super().__init__()
        self.method = check_choice("method", method, METHODS)
        check_choice("integrator", integrator, INTEGRATORS)
        unknown = sorted(set(noise) - set(_NOISE_FIELDS))
        if unknown:
            raise ValueError(f"unknown thermo solver option(s) {', '.join(map(repr, unknown))}; valid "
                             f"noise options: {', '.join(_NOISE_FIELDS)}")
        if bits is not None:
            check_number("bits", bits, low=1, high=32, integer=True)
            for key in ("coupling_bits", "input_bits", "output_bits"):
                noise.setdefault(key, bits)
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.noise = NoiseConfig(**noise)
        self.config = AnalogConfig(analog_time=analog_time, burn_in=burn_in, dt=dt, kappa0=kappa0,
                                   integrator="euler" if integrator == "sde" else integrator,
                                   backend=backend, seed=self.seed, noise=self.noise)
        if self.method == "inverse" and not kappa0 > 0:
            raise ValueError(f"kappa0={kappa0!r} must be > 0 for method='inverse' (covariance sampling)")
        self.device = thermo_device(device)
        self.host = digital_device(host)
        self.bits = self.noise.coupling_bits
        # State used by apply()
        self.calls = 0
        self.A_inv: torch.Tensor | None = None
        self.G_inv: torch.Tensor | None = None
        self.A_d: torch.Tensor | None = None  # damped factors (method "solve")
        self.G_d: torch.Tensor | None = None
        self.X_prev: torch.Tensor | None = None  # warm starts, in unnormalised units
        self.Y_prev: torch.Tensor | None = None

    # ----------------------------------------------------------------------------- protocol
    def prepare(self, A: torch.Tensor, G: torch.Tensor, damping: Damping) -> None:
        lam_a, lam_g = damping.split(A, G)
        A_d = A + lam_a * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        G_d = G + lam_g * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        if self.method == "solve":
            self.A_d, self.G_d = A_d, G_d
            self.last_report = SolverReport(hardware_time_s=0.0, energy_j=0.0,
                                            info={"method": "solve", "stored": True})
            return
        results, costs = [], []
        inverses = []
        for M in (A_d, G_d):
            c = _scale(M)
            res = analog_inverse(M / c, self._config())
            inverses.append(res.x / c)
            results.append(res)
            costs.append(self._cost("inverse", M.shape[0], 1, res))
        self.A_inv, self.G_inv = inverses
        self.last_report = _report("inverse", results, costs)

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        if self.method == "inverse":
            assert self.A_inv is not None and self.G_inv is not None, "prepare() has not run"
            self.last_report = SolverReport(info={"method": "inverse", "digital_apply": True})
            return self.G_inv @ grad @ self.A_inv
        assert self.A_d is not None and self.G_d is not None, "prepare() has not run"
        res_g, Y = self._solve(self.G_d, grad, self.Y_prev)
        res_a, Xt = self._solve(self.A_d, Y.T, None if self.X_prev is None else self.X_prev.T)
        X = Xt.T.contiguous()
        self.Y_prev, self.X_prev = Y, X
        costs = [self._cost("solve", self.G_d.shape[0], grad.shape[1], res_g),
                 self._cost("solve", self.A_d.shape[0], grad.shape[0], res_a)]
        self.last_report = _report("solve", [res_g, res_a], costs)
        return X

    def state_dict(self) -> dict[str, Any]:
        if self.method == "inverse":
            if self.A_inv is None:
                return {}
            return {"A_inv": self.A_inv, "G_inv": self.G_inv, "calls": self.calls}
        if self.A_d is None:
            return {}
        return {"A_d": self.A_d, "G_d": self.G_d, "X_prev": self.X_prev, "Y_prev": self.Y_prev,
                "calls": self.calls}

    # ---------------------------------------------------------------------------- internals
    def _config(self) -> AnalogConfig:
        """This call's configuration: a fresh seed from (seed, call counter)."""
        # hash() of a tuple of ints is deterministic across processes (no hash randomization)
        seed = hash((self.seed, self.layer_index, self.calls)) % (2**62)
        self.calls += 1
        return self.config.replace(seed=seed)

    def _solve(self, M: torch.Tensor, B: torch.Tensor, prev: torch.Tensor | None):
        """Solve ``M X = B`` (columns of B) on the device, in normalised units (module docs)."""
        c = _scale(M)
        s = float(torch.linalg.norm(B))
        cfg = self._config()
        if s == 0.0 or not math.isfinite(s):
            s = 1.0
        x0 = None
        if prev is not None and prev.shape == B.shape:
            x0 = prev * (c / s)
        res = analog_solve(M / c, B / s, cfg, x0=x0)
        return res, res.x * (s / c)

    def _cost(self, op: str, n: int, n_rhs: int, res: Any):
        kappa = _float(res.diagnostics.get("condition_number"), 1.0)
        kappa = max(kappa, 1.0) if math.isfinite(kappa) else 1.0
        window = float(res.diagnostics.get("averaging_time") or self.config.analog_time)
        if op == "inverse":
            eps = math.sqrt((n + 1.0) * kappa / window)
        else:
            eps = math.sqrt(2.0 * self.device.noise_kappa0 * n * kappa**2 / window)
        eps = min(max(eps, 1e-6), 0.999)
        dev = self.device if n <= self.device.cells else thermo_device(self.device, oversize="block")
        if op == "inverse":
            return thermo_inverse_cost(n, kappa=kappa, eps=eps, device=dev, bits=self.bits,
                                       host=self.host)
        return thermo_solve_cost(n, n_rhs, kappa=kappa, eps=eps, device=dev, bits=self.bits)


def _scale(M: torch.Tensor) -> float:
    """Gershgorin upper bound of ``lambda_max``: the largest absolute row sum (at least tiny)."""
    c = float(M.abs().sum(dim=1).max())
    return c if c > 0 and math.isfinite(c) else 1.0


def _float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _report(method: str, results: list[Any], costs: list[Any]) -> SolverReport:
    diags = [r.diagnostics for r in results]
    info = {
        "method": method,
        "analog_time": float(sum(r.analog_time for r in results)),
        "n_samples": int(sum(int(r.n_samples) for r in results)),
        "n_samples_each": [int(r.n_samples) for r in results],
        "dt": [_float(d.get("dt"), float("nan")) for d in diags],
        "condition_number": [_float(d.get("condition_number"), float("nan")) for d in diags],
        "error_law_mse": [d.get("error_law_mse") for d in diags],
        "clipped": int(sum(int(d.get(k) or 0) for d in diags
                           for k in ("clipped_couplings", "clipped_inputs", "clipped_outputs"))),
        "seeds": [d.get("seed") for d in diags],
    }
    return SolverReport(hardware_time_s=float(sum(c.seconds for c in costs)),
                        energy_j=float(sum(c.joules for c in costs)), info=info)
