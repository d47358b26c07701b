"""How the thermodynamic solver prices itself: every hardware time it reports comes from
:mod:`hw_models.pricing`.

:class:`ThermoPricing` is a mixin of :class:`~thermo_kfac.solvers.thermodynamic.ThermodynamicSolver`
(it uses that solver's ``config``, ``noise``, ``device``, ``host``, ``factors``, ``spectra`` and
price cache): the spectrum of each programmed factor is summarised once per prepare, each job
(programming, a resident solve with ``n_rhs`` columns, an inverse) is priced once per prepare at
the simulated window, burn-in and start, and on the calls that measure accuracy the error law is
evaluated on the call's actual right-hand sides (:func:`hw_models.pricing.solve_call_error`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from hw_models import pricing

#: The shortest window analog_time="auto" picks (tau of the normalised programmed matrix).
MIN_WINDOW = 1.0


class ThermoPricing:
    """Pricing methods of the thermodynamic solver (module docs)."""

    @property
    def _start(self) -> str:
        """The pricing law's start for this solver's warm start (``"previous"`` is priced at
        the model's warm distance 1, i.e. as far from ``x*`` as a zero start)."""
        return "zero" if self.method == "inverse" else self.warm_start

    def _host_cost(self, n: int, vectors: float) -> pricing.Cost:
        """Digital host work of the scaling: ``vectors`` passes over an ``n x n`` matrix (GEMV-like)."""
        seconds = pricing.gemm_time(n, n, max(vectors, 1.0), self.host)
        return pricing.Cost(seconds, seconds * self.host.power_w, {"host_scaling": seconds},
                            {"host_scaling": seconds * self.host.power_w})

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
        out = {"digital_method": self.digital_method, "method": self.method,
               "analog_time": None if self.auto_window else self.analog_time,
               "burn_in": self.config.burn_in,
               "kappa0": self.device.kappa0, "copies": self.noise.mitigation_copies,
               "device": self.device.name, "thermo_device": self.device, "host": self.host.name,
               "ideal": self.ideal,
               "input_scale": scales, "warm_start": self.warm_start,
               "held_states": self.device.units, "reload_bits": self.noise.input_bits,
               "start": self._start, "overlap": self.overlap,
               "deflate": self.deflate, "target_error": self.target_error}
        out["converters"] = self.converters()
        return out

    def _choose_window(self, f: Any, key: str, n_rhs: int) -> bool:
        """The error law's window (and burn-in) for ``target_error`` on factor ``key``'s programmed
        spectrum (each solve gets ``target_error / 2``: the first solve's error reaches the result
        through the second factor's inverse, and the two are not independent -- measured on seeded
        spectra, a ``sqrt 2`` split overshot the target by 30 %),
        capped at ``max_analog_time``; with ``analog_time="auto"`` the factor's solves use it.
        Returns whether the law meets the target within the longest window allowed: the cap, or a
        fixed ``analog_time`` (``deflate="auto"`` goes deeper when it does not)."""
        job = pricing.AnalogJob("solve", f.P.shape[0], n_rhs, spectrum=self.spectra[key],
                                target_eps=self.target_error / 2.0, start=self._start,
                                resident=True, copies=self.noise.mitigation_copies, oversize="block",
                                input_scale=f.scale if f.peak is not None else None)
        price = pricing.price(job, self.device, self.host)
        if self.auto_window:
            # at least one tau of averaging: the law may prefer a single read-out after a long
            # burn-in, but a read-out integrates over the fastest mode's time constant, and the
            # clipping integrator (the rail fallback) steps at that scale
            f.window = min(max(price.window_tau, MIN_WINDOW), self.max_analog_time)
            f.burn_in = min(price.burn_in_tau, self.max_analog_time)
        longest = self.max_analog_time if self.auto_window else max(self.analog_time, 1.0)
        return bool(price.info["reachable"]) and price.window_tau <= longest * (1 + 1e-9)

    def _gemm_cost(self, shapes: list[tuple[int, int, int]]) -> pricing.Cost:
        """Host GEMMs of the deflation (``(m, k, n)`` shapes), priced on the host preset."""
        return pricing.price_host_gemms(shapes, self.host)

    def _window(self, key: str) -> tuple[float, float]:
        """``(window, burn-in)`` of factor ``key``'s solves (its own with ``analog_time="auto"``)."""
        f = self.factors.get(key)
        if f is not None and f.window is not None:
            return float(f.window), float(f.burn_in)
        return float(self.config.analog_time), float(self.config.burn_in)

    def _price(self, key: str, op: str, n_rhs: int) -> pricing.Price:
        """One analog job on factor ``key`` priced by :func:`hw_models.pricing.price` with the
        programmed spectrum and the simulated window: once per prepare (the job is fixed)."""
        cache = (key, op, n_rhs)
        if cache not in self._prices:
            spectrum = self._spectrum(key)
            job = pricing.AnalogJob(op, spectrum.n, n_rhs if op == "solve" else 1, spectrum=spectrum,
                                    window_tau=self._window(key)[0], burn_in_tau=self._window(key)[1],
                                    start=self._start, resident=op == "solve",
                                    copies=self.noise.mitigation_copies, oversize="block",
                                    input_scale=self._job_scale(key, op))
            self._prices[cache] = pricing.price(job, self.device, self.host)
        return self._prices[cache]

    def _job_scale(self, key: str, op: str) -> float | None:
        """The input scale the simulated solve of factor ``key`` used (``None``: not yet known,
        or an inverse: pricing's own rule, the one the solver's first call follows)."""
        f = self.factors.get(key)
        return None if op != "solve" or f is None or f.peak is None else float(f.scale)

    def _spectrum(self, key: str) -> pricing.SpectrumSummary:
        """The programmed spectrum of factor ``key`` (rebuilt after a state load)."""
        if key not in self.spectra:
            f = self.factors[key]
            spectrum = (pricing.SpectrumSummary.from_matrix(f.P) if self.method == "inverse"
                        else pricing.SpectrumSummary.from_eigenvalues(self._program(f, key).eigenvalues[0]))
            self.spectra[key] = dataclasses.replace(spectrum, max_coupling=f.max_coupling)
        return self.spectra[key]

    def _reload_cost(self, key: str, n_rhs: int, values: int) -> pricing.Cost:
        """The DAC reload of ``values`` warm-start values re-sent this call (the solver's
        ``reloaded_values``): the share ``values / (n n_rhs)`` of the transfer that
        :class:`hw_models.pricing.AnalogJob`'s ``reload_state`` adds for a full reload."""
        cache = (key, "reload", n_rhs)
        if cache not in self._prices:
            spectrum = self._spectrum(key)
            job = pricing.AnalogJob("solve", spectrum.n, n_rhs, spectrum=spectrum,
                                    window_tau=self._window(key)[0], burn_in_tau=self._window(key)[1],
                                    start=self._start, resident=True, copies=self.noise.mitigation_copies,
                                    oversize="block", reload_state=True,
                                    input_scale=self._job_scale(key, "solve"))
            self._prices[cache] = pricing.price(job, self.device, self.host)
        full, base = self._prices[cache], self._price(key, "solve", n_rhs)
        share = values / (self._spectrum(key).n * n_rhs)
        seconds = max(full.breakdown_s.get("transfer", 0.0) - base.breakdown_s.get("transfer", 0.0), 0.0)
        joules = max(full.breakdown_j.get("transfer", 0.0) - base.breakdown_j.get("transfer", 0.0), 0.0)
        return pricing.Cost(seconds * share, joules * share, {"reload": seconds * share},
                            {"reload": joules * share})

    def _call_error(self, f: Any, res: Any, Rn: torch.Tensor, r: torch.Tensor,
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

    def _pricing_info(self, factors: dict[str, Any], jobs: list[tuple[str, str, int]] = (),
                      measured: list[float | None] | None = None,
                      amplification: float = 1.0) -> dict[str, Any]:
        """``info["pricing"]``: the damped factors' spectra (the programmed spectrum times the
        scale ``c``), each job's settings, price and the law's error (the trace's source)."""
        spectra = {k: dataclasses.replace(s, lambda_min=s.lambda_min * factors[k].c,
                                          lambda_max=s.lambda_max * factors[k].c).to_dict()
                   for k, s in self.spectra.items() if k in factors}
        solves = []
        for i, (key, op, m) in enumerate(jobs):
            p = self._price(key, op, m)
            actual = measured[i] if measured is not None and i < len(measured) else None
            thermal = p.error["thermal"] if actual is None else actual
            solves.append({"factor": key, "op": op, "n": self._spectrum(key).n, "n_rhs": m,
                           "analog_time": self._window(key)[0], "burn_in": self._window(key)[1],
                           "start": self._start, "resident": op == "solve",
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
