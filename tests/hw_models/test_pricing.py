"""The pricing API: windows that meet a target eps when simulated, spectra, jobs, the oversize rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

import hw_models as hm
from hw_models.pricing import (
    AnalogJob,
    SpectrumSummary,
    ThermoCapacityError,
    fit_blocks,
    price,
    price_digital,
    price_program,
)
from tests.hw_models.conftest import spd

# a quiet-enough device whose thermal noise matters at these sizes (kappa0 of the board preset)
DEVICE = hm.thermo_device("chip").replace(kappa0=1e-2)


def _full_scale_columns(n: int, m: int, seed: int) -> np.ndarray:
    B = np.random.default_rng(seed).standard_normal((n, m))
    return B / np.abs(B).max(axis=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(6))
def test_priced_window_gives_the_target_eps_when_simulated(case):
    """price() picks burn-in + window for a target eps from the law and the RHS model; simulating
    that schedule (analytic integrator, ideal converters, the input scaled as pricing scales it)
    on random full-scale right-hand sides gives eps within 0.8-1.25."""
    rng = np.random.default_rng(case)
    n = int(rng.integers(8, 200))
    kappa = float(math.exp(rng.uniform(math.log(2), math.log(1e3))))
    lam = np.geomspace(1.0 / kappa, 1.0, n)
    A = spd(lam, seed=case)
    spectrum = SpectrumSummary.from_matrix(A)
    assert spectrum.kappa == pytest.approx(kappa, rel=1e-6)
    for eps in (0.05, 0.2):
        job = AnalogJob("solve", n, 256, spectrum=spectrum, target_eps=eps)
        priced = price(job, DEVICE.ideal())
        assert priced.predicted_rel_error == pytest.approx(eps, rel=1e-2)
        scale = priced.info["input_scale"]
        B = _full_scale_columns(n, 256, seed=10 + case) * scale
        cfg = DEVICE.ideal().analog_config(analog_time=priced.window_tau, burn_in=priced.burn_in_tau,
                                   dtype="float64", seed=case)
        res = hm.solve(A, B, cfg)
        X = np.linalg.solve(A, B)
        measured = math.sqrt(np.sum((res.x - X) ** 2) / np.sum(X**2))
        assert 0.8 <= measured / eps <= 1.25, (n, kappa, eps, measured)


def test_spectrum_summary_constructors_agree():
    lam = np.geomspace(0.02, 3.0, 50)
    A = spd(lam, seed=3)
    from_matrix = SpectrumSummary.from_matrix(A)
    from_eig = SpectrumSummary.from_eigenvalues(lam)
    assert from_matrix.kappa == pytest.approx(150.0, rel=1e-8)
    assert from_matrix.trace_inv_sq == pytest.approx(float(np.sum((lam / 3.0) ** -2)), rel=1e-8)
    assert from_matrix.effective_rank == pytest.approx(float(np.sum(lam / 3.0)), rel=1e-8)
    assert from_eig.trace_inv_sq == pytest.approx(from_matrix.trace_inv_sq, rel=1e-8)
    model = SpectrumSummary.from_kappa(50, 150.0)
    assert model.kappa == pytest.approx(150.0) and model.n == 50
    worst = SpectrumSummary.from_kappa(50, 150.0, shape="worst")
    assert worst.trace_inv_sq == pytest.approx(49 * 150.0**2 + 1)
    # large spectra are sketched, tr(P^-2) kept exactly
    big = SpectrumSummary.from_eigenvalues(np.geomspace(1e-3, 1.0, 5000))
    assert len(big.modes) == 64 and sum(big.weights) == pytest.approx(5000)
    lam_n, w = big.normalized_modes()
    assert float(np.sum(w / lam_n**2)) == pytest.approx(big.trace_inv_sq, rel=1e-9)
    again = SpectrumSummary.from_dict(big.to_dict(modes=True))
    assert again == big
    rebuilt = SpectrumSummary.from_dict(big.to_dict())
    assert rebuilt.kappa == pytest.approx(big.kappa) and rebuilt.n == 5000


def test_fixed_window_reports_accuracy_and_breakdown_adds_up():
    spec = SpectrumSummary.from_kappa(300, 50.0)
    short = price(AnalogJob("solve", 300, 10, spectrum=spec, window_tau=5.0), "chip")
    long = price(AnalogJob("solve", 300, 10, spectrum=spec, window_tau=500.0, burn_in_tau=200.0), "chip")
    assert long.predicted_rel_error < short.predicted_rel_error
    assert short.window_tau == 5.0 and short.burn_in_tau == 0.0
    for p in (short, long):
        assert set(p.breakdown_s) == {"transfer", "programming", "burn_in", "averaging", "readout"}
        assert p.seconds == pytest.approx(sum(p.breakdown_s.values()))
        assert p.joules == pytest.approx(sum(p.breakdown_j.values()))
    # tau converts analog time into seconds: averaging = rounds x window x tau
    rounds = long.info["rounds"]
    assert long.breakdown_s["averaging"] == pytest.approx(rounds * 500.0 * hm.thermo_device("chip").tau_s)


def test_resident_reload_copies_and_units():
    spec = SpectrumSummary.from_kappa(200, 20.0)
    job = AnalogJob("solve", 200, 8, spectrum=spec, window_tau=50.0)
    fresh, kept = price(job, "chip"), price(job.replace(resident=True), "chip")
    assert "programming" not in kept.breakdown_s and kept.seconds < fresh.seconds
    reloaded = price(job.replace(reload_state=True), "chip")
    assert reloaded.breakdown_s["transfer"] > fresh.breakdown_s["transfer"]
    two = price(job.replace(copies=2), "chip")
    assert two.analog_time_tau == pytest.approx(2 * fresh.analog_time_tau)
    assert two.error["variance"] == pytest.approx(fresh.error["variance"] / math.sqrt(2), rel=1e-6)
    one_unit = price(job.replace(units=1), "chip")
    assert one_unit.breakdown_s["averaging"] == pytest.approx(4 * fresh.breakdown_s["averaging"])


def test_the_one_oversize_rule():
    small = hm.thermo_device("chip").replace(cells=256)
    assert fit_blocks(256, small) == (1, 256)
    with pytest.raises(ThermoCapacityError, match="n=1000.*256 cells.*oversize='block'"):
        fit_blocks(1000, small)
    assert fit_blocks(1000, small, "block") == (4, 250)
    priced = price(AnalogJob("inverse", 1000, kappa=10.0, target_eps=0.2, oversize="block"), small)
    assert priced.info["approximate"] and priced.info["blocks"] == 4
    assert price_program(1000, small, oversize="block").info["block_size"] == 250


def test_digital_prices_follow_the_device_model():
    h100 = hm.digital_device("h100")
    eigh = price_digital("eigh", 1024, device="h100")
    assert eigh.seconds == pytest.approx(h100.op_time("eigh", 1024))
    assert eigh.predicted_rel_error == 0.0 and eigh.joules == pytest.approx(eigh.seconds * h100.power_w)
    solve = price_digital("solve", 1024, 64, device=h100)
    assert solve.seconds > h100.op_time("cholesky", 1024)
    with pytest.raises(ValueError, match="'eigh', 'cholesky', 'inverse', 'gemm', 'solve'|'gemm'"):
        price_digital("qr", 10)


def test_job_validation_names_values():
    with pytest.raises(ValueError, match="exactly one of window_tau and target_eps"):
        AnalogJob("solve", 10)
    with pytest.raises(ValueError, match="op"):
        AnalogJob("multiply", 10, window_tau=1.0)
    with pytest.raises(ValueError, match="start"):
        AnalogJob("inverse", 10, window_tau=1.0, start="gradient")
    with pytest.raises(ValueError, match="host="):
        price(AnalogJob("inverse", 20, kappa=10.0, target_eps=0.2), "board")


def test_presets_state_kappa0_and_map_to_the_simulator():
    for name in hm.THERMO_PRESETS:
        dev = hm.thermo_device(name)
        cfg = dev.analog_config(analog_time=10.0)
        assert cfg.kappa0 == dev.kappa0 and cfg.noise is dev.noise  # the preset IS the configuration
        assert cfg.noise.input_range == 1.0 and cfg.noise.output_range == dev.noise.state_range
        assert dev.ideal().analog_config(analog_time=1.0).noise.ideal
        assert not hasattr(dev, "noise_kappa0")
