"""How the thermodynamic solver prices itself: every hardware time it reports comes from
:mod:`hw_models.pricing`.

:class:`ThermoPricing` is a plain object that
:class:`~thermo_kfac.solvers.thermodynamic.ThermodynamicSolver` owns (``solver.pricing``): built
from the solver's device, host, analog configuration and settings, it keeps its own state (the
programmed spectra and the price cache) and is handed the solver's factors per call. The
spectrum of each programmed factor is summarised once per prepare, each job
(programming, a resident solve with ``n_rhs`` columns, an inverse) is priced once per prepare at
the simulated window, burn-in and start, and on the calls that measure accuracy the error law is
evaluated on the call's actual right-hand sides (:func:`hw_models.pricing.solve_call_error`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from hw_models import pricing
from hw_models.devices import DigitalDevice, ThermoDevice
from hw_models.langevin.config import AnalogConfig
from hw_models.layer_cost import MIN_WINDOW, SOLVE_SHARES, law_window

__all__ = ["MIN_WINDOW", "PRICED_OPTIONS", "ThermoPricing"]

#: The solver options its pricing reads (``ThermoPricing(settings=...)``).
PRICED_OPTIONS = ("method", "warm_start", "auto_window", "analog_time", "ideal", "max_analog_time",
                  "target_error", "digital_method", "overlap", "deflate", "max_deflate", "feasibility_margin")

Factors = Mapping[str, Any]  # the solver's programmed factors by key ("A", "G")


class ThermoPricing:
    """The pricing the thermodynamic solver owns (module docs).

    Args:
        device, host, config: what the solver simulates and prices on (fixed at construction).
        settings: the solver's pricing-relevant options (``method``, ``warm_start``,
            ``auto_window``, ``analog_time``, ``max_analog_time``, ``target_error``, ``ideal``,
            ``digital_method``, ``overlap``, ``deflate``, ``max_deflate``, ``feasibility_margin``).
        program: ``program(factor, key)``, the solver's programming of a factor (a spectrum is
            rebuilt from it after a state load).
    """

    def __init__(self, device: ThermoDevice, host: DigitalDevice, config: AnalogConfig, *,
                 settings: Mapping[str, Any], program: Callable[[Any, str], Any]) -> None:
        self.device, self.host, self.config, self.noise = device, host, config, device.noise
        self.options = dict(settings)
        self.method, self.warm_start = self.options["method"], self.options["warm_start"]
        self.auto_window = bool(self.options["auto_window"])
        self.max_analog_time = float(self.options["max_analog_time"])
        self.target_error = float(self.options["target_error"])
        self.program = program
        #: the programmed spectra of the last prepare and its priced jobs (pure functions of those
        #: and the device, so priced once per prepare)
        self.spectra: dict[str, pricing.SpectrumSummary] = {}
        self.prices: dict[tuple, pricing.Price] = {}

    def reset(self, spectra: bool = False) -> None:
        """Forget the priced jobs (a new prepare), and with ``spectra`` the spectra (a state load)."""
        self.prices = {}
        if spectra:
            self.spectra = {}

    @property
    def start(self) -> str:
        """The pricing law's start for this solver's warm start (``"previous"`` is priced at
        the model's warm distance 1, i.e. as far from ``x*`` as a zero start)."""
        return "zero" if self.method == "inverse" else self.warm_start

    def host_cost(self, n: int, vectors: float) -> pricing.Cost:
        """Digital host work of the scaling: ``vectors`` passes over an ``n x n`` matrix (GEMV-like)."""
        seconds = pricing.gemm_time(n, n, max(vectors, 1.0), self.host)
        return pricing.Cost(seconds, seconds * self.host.power_w, {"host_scaling": seconds},
                            {"host_scaling": seconds * self.host.power_w})

    def converters(self) -> dict[str, Any]:
        """The converters and device non-idealities simulated (the report's ``converters``)."""
        n = self.noise
        return {"ideal": self.options["ideal"], "coupling_bits": n.coupling_bits, "input_bits": n.input_bits,
                "output_bits": n.output_bits, "coupling_range": n.coupling_range,
                "input_range": n.input_range, "output_range": n.output_range,
                "state_range": n.state_range, "mismatch": n.mismatch_std or 0.0,
                "read_noise": n.read_noise or 0.0, "kappa0": self.config.kappa0}

    def settings(self, factors: Factors) -> dict[str, Any]:
        """What the cost model needs (the solver's :meth:`KFACSolver.pricing_settings`).

        The simulated converters (``converters()``: the same values the simulator runs with),
        ``ideal``, the last input scale per factor (``input_scale``: ``[G, A]``, 1 before any
        call) and the warm-start reload: ``warm_start``, ``held_states`` (end states the device
        keeps per factor: one per unit) and ``reload_bits`` (the DAC a re-sent state goes
        through; each call's ``reloaded_values`` are in its report).
        """
        o = self.options
        scales = [factors[k].scale if k in factors else 1.0 for k in ("G", "A")]
        out = {"digital_method": o["digital_method"], "method": self.method,
               "analog_time": None if self.auto_window else o["analog_time"],
               "burn_in": self.config.burn_in,
               "kappa0": self.device.kappa0, "copies": self.noise.mitigation_copies,
               "device": self.device.name, "thermo_device": self.device, "host": self.host.name,
               "ideal": o["ideal"],
               "input_scale": scales, "warm_start": self.warm_start,
               "held_states": self.device.units, "reload_bits": self.noise.input_bits,
               "start": self.start, "overlap": o["overlap"],
               "deflate": o["deflate"], "target_error": self.target_error,
               "max_deflate": o["max_deflate"], "max_analog_time": self.max_analog_time,
               "feasibility_margin": o["feasibility_margin"]}
        out["converters"] = self.converters()
        return out

    def plan(self, f: Any, key: str, n_rhs: int) -> bool:
        """The error law's window (and burn-in) for ``target_error`` on factor ``key``'s programmed
        spectrum (:func:`hw_models.layer_cost.law_window`: each solve gets ``target_error /
        SOLVE_SHARES``, at least ``MIN_WINDOW``, capped at ``max_analog_time``); with
        ``analog_time="auto"`` the factor's solves use it.
        Returns whether the law meets the target within the longest window allowed: the cap, or a
        fixed ``analog_time`` (``deflate="auto"`` goes deeper when it does not)."""
        window, burn_in, reachable = law_window(
            f.P.shape[0], n_rhs, spectrum=self.spectra[key], device=self.device, host=self.host,
            target=self.target_error / SOLVE_SHARES, start=self.start, copies=self.noise.mitigation_copies,
            max_window=self.max_analog_time, fixed=None if self.auto_window else self.options["analog_time"],
            input_scale=f.scale if f.peak is not None else None)
        if self.auto_window:
            f.window, f.burn_in = window, burn_in
        return reachable

    def gemm_cost(self, shapes: list[tuple[int, int, int]]) -> pricing.Cost:
        """Host GEMMs of the deflation (``(m, k, n)`` shapes), priced on the host preset."""
        return pricing.price_host_gemms(shapes, self.host)

    def window(self, factors: Factors, key: str) -> tuple[float, float]:
        """``(window, burn-in)`` of factor ``key``'s solves (its own with ``analog_time="auto"``)."""
        f = factors.get(key)
        if f is not None and f.window is not None:
            return float(f.window), float(f.burn_in)
        return float(self.config.analog_time), float(self.config.burn_in)

    def price(self, factors: Factors, key: str, op: str, n_rhs: int) -> pricing.Price:
        """One analog job on factor ``key`` priced by :func:`hw_models.pricing.price` with the
        programmed spectrum and the simulated window: once per prepare (the job is fixed)."""
        cache = (key, op, n_rhs)
        if cache not in self.prices:
            spectrum = self.spectrum(factors, key)
            window, burn_in = self.window(factors, key)
            job = pricing.AnalogJob(op, spectrum.n, n_rhs if op == "solve" else 1, spectrum=spectrum,
                                    window_tau=window, burn_in_tau=burn_in,
                                    start=self.start, resident=op == "solve",
                                    copies=self.noise.mitigation_copies, oversize="block",
                                    input_scale=self.job_scale(factors, key, op))
            self.prices[cache] = pricing.price(job, self.device, self.host)
        return self.prices[cache]

    def job_scale(self, factors: Factors, key: str, op: str) -> float | None:
        """The input scale the simulated solve of factor ``key`` used (``None``: not yet known,
        or an inverse: pricing's own rule, the one the solver's first call follows)."""
        f = factors.get(key)
        return None if op != "solve" or f is None or f.peak is None else float(f.scale)

    def spectrum(self, factors: Factors, key: str) -> pricing.SpectrumSummary:
        """The programmed spectrum of factor ``key`` (rebuilt after a state load)."""
        if key not in self.spectra:
            f = factors[key]
            spectrum = (pricing.SpectrumSummary.from_matrix(f.P) if self.method == "inverse"
                        else pricing.SpectrumSummary.from_eigenvalues(self.program(f, key).eigenvalues[0]))
            self.spectra[key] = dataclasses.replace(spectrum, max_coupling=f.max_coupling)
        return self.spectra[key]

    def reload_cost(self, factors: Factors, key: str, n_rhs: int, values: int) -> pricing.Cost:
        """The DAC reload of ``values`` warm-start values re-sent this call (the solver's
        ``reloaded_values``): the share ``values / (n n_rhs)`` of the transfer that
        :class:`hw_models.pricing.AnalogJob`'s ``reload_state`` adds for a full reload."""
        cache = (key, "reload", n_rhs)
        if cache not in self.prices:
            spectrum = self.spectrum(factors, key)
            window, burn_in = self.window(factors, key)
            job = pricing.AnalogJob("solve", spectrum.n, n_rhs, spectrum=spectrum,
                                    window_tau=window, burn_in_tau=burn_in,
                                    start=self.start, resident=True, copies=self.noise.mitigation_copies,
                                    oversize="block", reload_state=True,
                                    input_scale=self.job_scale(factors, key, "solve"))
            self.prices[cache] = pricing.price(job, self.device, self.host)
        full, base = self.prices[cache], self.price(factors, key, "solve", n_rhs)
        share = values / (self.spectrum(factors, key).n * n_rhs)
        seconds = max(full.breakdown_s.get("transfer", 0.0) - base.breakdown_s.get("transfer", 0.0), 0.0)
        joules = max(full.breakdown_j.get("transfer", 0.0) - base.breakdown_j.get("transfer", 0.0), 0.0)
        return pricing.Cost(seconds * share, joules * share, {"reload": seconds * share},
                            {"reload": joules * share})

    def call_error(self, f: Any, res: Any, Rn: torch.Tensor, r: torch.Tensor,
                    x0n: torch.Tensor | None, rhs_scale: float | None) -> float | None:
        """The law's error of this call from its actual inputs and start (``x0n``, device units,
        after the reload; eigenbasis of the programmed matrix); ``None`` when the simulator kept
        no single eigenbasis."""
        Q, lam = f.prog.spectrum.Q, f.prog.eigenvalues
        if Q is None or lam.shape[0] != 1:
            return None
        Qt = Q[0].to(Rn.dtype).T
        beta = Qt @ Rn
        x0 = rhs_scale * beta if rhs_scale is not None else None if x0n is None else Qt @ x0n
        win, burn = ((float(f.window), float(f.burn_in)) if f.window is not None
                     else (float(self.config.analog_time), float(self.config.burn_in)))
        try:
            window = float(res.diagnostics.get("averaging_time") or win)
        except (TypeError, ValueError):
            window = win
        return pricing.solve_call_error(
            lam[0], beta.double().cpu().numpy(), None if x0 is None else x0.double().cpu().numpy(),
            window=window or win, burn_in=burn,
            kappa0=self.config.kappa0, column_scale=r.double().cpu().numpy(),
            copies=self.noise.mitigation_copies)

    def info(self, factors: Factors, jobs: list[tuple[str, str, int]] = (),
                      measured: list[float | None] | None = None,
                      amplification: float = 1.0) -> dict[str, Any]:
        """``info["pricing"]``: the damped factors' spectra (the programmed spectrum times the
        scale ``c``), each job's settings, price and the law's error (the trace's source)."""
        spectra = {k: dataclasses.replace(s, lambda_min=s.lambda_min * factors[k].c,
                                          lambda_max=s.lambda_max * factors[k].c).to_dict()
                   for k, s in self.spectra.items() if k in factors}
        solves = []
        for i, (key, op, m) in enumerate(jobs):
            p = self.price(factors, key, op, m)
            actual = measured[i] if measured is not None and i < len(measured) else None
            thermal = p.error["thermal"] if actual is None else actual
            window, burn_in = self.window(factors, key)
            solves.append({"factor": key, "op": op, "n": self.spectrum(factors, key).n, "n_rhs": m,
                           "analog_time": window, "burn_in": burn_in, "start": self.start,
                           "resident": op == "solve",
                           "hardware_time_s": p.seconds,
                           "predicted_rel_error": math.hypot(thermal, p.error["static"]),
                           "converters": p.info["converters"], "kappa0": p.info["device_kappa0"],
                           "prediction": "actual_rhs" if actual is not None else "rhs_model"})
        # The second solve sees the first one's output: the first error reaches the result through
        # the second factor's inverse, which amplifies that (white, across the second factor's
        # index) error against the signal by ``amplification`` = ||Y|| rms(1/mu_2) / ||X||
        # (apply() measures it: the signal sits in the top modes the inverse shrinks most).
        # Inverses: plain quadrature.
        errors = [s["predicted_rel_error"] for s in solves]
        if len(errors) == 2 and solves[0]["op"] == "solve":
            errors[0] *= amplification
        total = math.hypot(*errors) if solves else None
        return {"device": self.device.name, "spectra": spectra, "solves": solves,
                "predicted_rel_error": total}
