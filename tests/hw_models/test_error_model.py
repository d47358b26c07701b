"""The finite-time error law (hw_models.langevin.error_model) against simulated solves and inverses.

20 random SPD spectra (kappa 2..1e3, n 8..256, seeded) are solved by the simulator with the
``analytic`` and the ``exact`` integrators, many independent noise draws per right-hand side; the
measured mean squared error must equal the law's prediction within the sampling tolerance, in
bias-dominated (short burn-in, cold start) and variance-dominated settings. The sampling
tolerance is 4 standard errors of the measured mean (from the spread of the draws) plus, for the
``exact`` integrator, 12.5 % for its discrete sampling (samples every ``dt = 0.25`` tau weigh a
mode by ``~ 1 - lam dt / 2`` relative to the continuous average the law describes: up to 12.5 %
for the fastest modes). The exact integrator runs only the cases with ``n (t0 + T) <= 1e5``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import hw_models as hm
from hw_models.langevin import error_model as em
from tests.hw_models.conftest import spd

DRAWS = 48  # independent noise draws of one right-hand side (columns of one solve)


def _spectra(count: int = 20, seed: int = 14) -> list[tuple[int, float, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(round(math.exp(rng.uniform(math.log(8), math.log(256)))))
        kappa = float(math.exp(rng.uniform(math.log(2), math.log(1e3))))
        inner = np.exp(rng.uniform(-math.log(kappa), 0.0, size=n - 2))
        lam = np.sort(np.concatenate([[1.0 / kappa], inner, [1.0]]))
        out.append((n, kappa, lam))
    return out


SPECTRA = _spectra()


def _measure(A, lam, Q, b, config):
    """Mean squared error over DRAWS noise draws of one right-hand side, its standard error, and
    the law's prediction."""
    B = np.repeat(b[:, None], DRAWS, axis=1)
    res = hm.solve(A, B, config)
    xs = np.linalg.solve(A, b)
    sq = np.sum((res.x - xs[:, None]) ** 2, axis=0) / np.sum(xs**2)
    d = res.diagnostics  # the burn-in and window as simulated (a fixed dt rounds them to steps)
    law = em.solve_error(lam, window=d["averaging_time"], burn_in=d["burn_in"], kappa0=config.kappa0,
                         rhs=Q.T @ b)
    return float(sq.mean()), float(sq.std(ddof=1) / math.sqrt(DRAWS)), law


@pytest.mark.slow
@pytest.mark.parametrize("integrator", ["analytic", "exact"])
def test_law_matches_simulated_solves_on_20_spectra(integrator):
    rng = np.random.default_rng(7)
    ratios = []
    for i, (n, kappa, lam) in enumerate(SPECTRA):
        A = spd(lam, seed=i)
        Q = np.linalg.eigh(A)[1]
        lam_sorted = np.linalg.eigvalsh(A)
        b = rng.standard_normal(n)
        b /= np.abs(b).max()  # a full-scale column
        # bias-dominated (cold start, short burn-in) and variance-dominated settings
        for burn, window, kappa0 in ((0.2 * kappa, 2.0 * kappa, 1e-4), (3.0 * kappa, 4.0 * kappa, 1e-2)):
            if integrator == "exact":  # keep the step count small: only the cheaper half of the spectra
                if n * (burn + window) > 1e5:
                    continue
            # exact: samples every 0.25 tau (the law is the continuous average; the sum of samples
            # weighs a mode by lam dt / (exp(lam dt) - 1) ~ 1 - lam dt / 2 relative to it)
            cfg = hm.AnalogConfig(analog_time=window, burn_in=burn, kappa0=kappa0, integrator=integrator,
                                  dtype="float64", seed=100 + i,
                                  dt=0.25 if integrator == "exact" else "auto")
            mse, se, law = _measure(A, lam_sorted, Q, b, cfg)
            predicted = law.rel_error**2
            slack = 4.0 * se / predicted + (0.125 if integrator == "exact" else 0.0)
            assert abs(mse / predicted - 1.0) <= slack, (i, n, kappa, burn, window, mse, predicted, se)
            ratios.append(math.sqrt(mse / predicted))
    assert len(ratios) >= (20 if integrator == "analytic" else 10)
    assert 0.8 <= float(np.median(ratios)) <= 1.25


def test_both_error_terms_are_exercised():
    n, kappa, lam = SPECTRA[0]
    short = em.solve_error(lam, window=2 * kappa, burn_in=0.2 * kappa, kappa0=1e-4)
    long = em.solve_error(lam, window=4 * kappa, burn_in=3 * kappa, kappa0=1e-2)
    assert short.bias > 3 * short.variance
    assert long.variance > long.bias


def test_limits_of_the_law():
    lam = np.geomspace(0.01, 1.0, 40)
    T = 1e6
    # asymptotic variance: 2 kappa0 tr(P^-2)/T over ||x*||^2 = rms^2 tr(P^-2): 2 kappa0 / (rms^2 T)
    pred = em.solve_error(lam, window=T, burn_in=1e4, kappa0=0.01, rhs_rms=0.5)
    assert pred.variance**2 == pytest.approx(2 * 0.01 / (0.25 * T), rel=1e-3)
    assert pred.bias < 1e-6
    # no noise, zero window limit: the cold-start bias is exp(-lam t0) per mode
    pred = em.solve_error(np.array([0.5]), window=1e-9, burn_in=2.0, kappa0=0.0, rhs=np.array([1.0]))
    assert pred.rel_error == pytest.approx(math.exp(-1.0), rel=1e-6)
    # a converged (stationary) start has no bias
    assert em.solve_error(lam, window=10, burn_in=0, kappa0=0.01, start="stationary").bias == 0.0
    # TNGD: starting from the gradient, t=0 returns the gradient: error ||b - x*|| / ||x*||
    b = np.array([1.0, 1.0])
    l2 = np.array([0.5, 1.0])
    pred = em.solve_error(l2, window=1e-9, burn_in=0.0, kappa0=0.0, rhs=b, start="gradient")
    xs = b / l2
    assert pred.rel_error == pytest.approx(np.linalg.norm(b - xs) / np.linalg.norm(xs), rel=1e-6)


def test_window_inversion_hits_the_target():
    lam = np.geomspace(1e-2, 1.0, 64)
    for eps in (0.03, 0.1, 0.3):
        win = em.solve_window(eps, lam, kappa0=1e-2)
        assert win.reachable
        got = em.solve_error(lam, window=win.window, burn_in=win.burn_in, kappa0=1e-2).rel_error
        assert got == pytest.approx(eps, rel=1e-3)
        # least total time: a little less of either misses the target
        assert em.solve_error(lam, window=win.window * 0.97, burn_in=win.burn_in,
                              kappa0=1e-2).rel_error > eps
        inv = em.inverse_window(eps, lam)
        assert em.inverse_error(lam, window=inv.window, burn_in=inv.burn_in).rel_error <= eps * 1.001


@pytest.mark.slow
def test_inverse_law_matches_simulated_sampling():
    rng = np.random.default_rng(3)
    ratios = []
    for i in range(4):
        n = int(rng.integers(8, 40))
        kappa = float(math.exp(rng.uniform(math.log(2), math.log(100))))
        lam = np.geomspace(1.0 / kappa, 1.0, n)
        A = spd(lam, seed=50 + i)
        exact = np.linalg.inv(A)
        for burn in (0.0, 2.0 * kappa):  # a cold start (bias) and a burnt-in one
            win = em.inverse_window(0.3, lam, burn_in=burn)
            errs = []
            for seed in range(6):
                cfg = hm.AnalogConfig(analog_time=win.window, burn_in=burn, kappa0=1e-2,
                                      integrator="exact", dt=1.0, dtype="float64", seed=seed)
                errs.append(np.sum((hm.inverse(A, cfg).x - exact) ** 2) / np.sum(exact**2))
            ratios.append(math.sqrt(np.mean(errs)) / 0.3)
    assert all(0.8 <= r <= 1.25 for r in ratios), ratios


def test_static_terms_shrink_with_bits_and_vanish_when_ideal():
    lam = np.geomspace(1e-2, 1.0, 100)
    coarse = em.static_solve_error(lam, solution_norm2=10.0, coupling_bits=6, input_bits=6, output_bits=6)
    fine = em.static_solve_error(lam, solution_norm2=10.0, coupling_bits=14, input_bits=14, output_bits=14)
    assert fine < coarse / 100
    assert em.static_solve_error(lam, solution_norm2=10.0) == 0.0


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="lambda_max-normalised"):
        em.solve_error([0.5, 2.0], window=1, burn_in=0, kappa0=0.1)
    with pytest.raises(ValueError, match="start"):
        em.solve_error([0.5], window=1, burn_in=0, kappa0=0.1, start="warm")
    with pytest.raises(ValueError, match="window"):
        em.inverse_error([0.5], window=0, burn_in=0)
