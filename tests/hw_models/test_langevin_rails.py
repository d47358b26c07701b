"""Device fidelity of the simulator: the rails (state_range) in every integrator, the end state of a
run, the per-cell mismatch pattern, and fast path == general path over the converter grid."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import hw_models as hm
from hw_models import noise
from hw_models.langevin import laws, program, solve_programmed

from .conftest import spd


def _spd_t(lam, seed=0) -> torch.Tensor:
    return torch.as_tensor(spd(lam, seed=seed))


@pytest.mark.parametrize("integrator", ["euler", "exact", "analytic"])
def test_state_saturates_at_the_rails_in_every_integrator(integrator):
    """x* = 3 per coordinate, rails at 1: the state (and so its time average) is held at the rail;
    without rails the average reaches x*."""
    A = torch.eye(4, dtype=torch.float64) * 0.5
    b = torch.full((4, 2), 1.5, dtype=torch.float64)  # x* = b / 0.5 = 3
    base = dict(analog_time=40.0, burn_in=10.0, kappa0=1e-4, integrator=integrator, seed=1)
    free = hm.solve(A, b, hm.AnalogConfig(**base))
    railed = hm.solve(A, b, hm.AnalogConfig(**base, noise=hm.NoiseConfig(state_range=1.0)))
    assert float(free.x.min()) > 2.5
    assert float(railed.x.abs().max()) <= 1.0 + 1e-12
    assert float(railed.x.min()) > 0.95  # pinned at the rail
    d = railed.diagnostics
    assert d["state_range"] == 1.0 and d["saturated_fraction"] > 0.5
    if integrator == "analytic":  # the Gaussian law is invalid: the clipping integrator ran
        assert d["range_fallback"] and d["integrator_used"] == "exact"
    assert free.diagnostics["saturated_fraction"] == 0.0


def test_analytic_law_is_kept_inside_the_rails():
    """Far from the rails the check passes and the result is bit-for-bit the rail-free one."""
    A = _spd_t([0.2, 0.5, 1.0])
    b = torch.tensor([[0.3], [-0.2], [0.1]], dtype=torch.float64)
    cfg = hm.AnalogConfig(integrator="analytic", analog_time=30.0, kappa0=1e-3, seed=4)
    prog = program(A, cfg)
    free = solve_programmed(prog, b, cfg)
    railed_cfg = cfg.replace(noise=hm.NoiseConfig(state_range=50.0))
    railed = solve_programmed(program(A, railed_cfg), b, railed_cfg)
    assert torch.equal(free.x, railed.x)
    assert not railed.diagnostics["range_fallback"]


def test_end_state_matches_an_euler_reference_jointly_with_the_average():
    """The analytic end state: its mean, variance and covariance with the time average against
    many fine-step Euler runs (independent columns of one solve)."""
    lam = 0.3
    A = torch.tensor([[lam]], dtype=torch.float64)
    m = 4000
    B = torch.full((1, m), 0.6, dtype=torch.float64)  # x* = 2
    x0 = torch.full((1, m), -1.0, dtype=torch.float64)
    kw = dict(analog_time=3.0, burn_in=1.0, kappa0=0.05)
    cfg = hm.AnalogConfig(integrator="analytic", seed=2, **kw)
    fast = solve_programmed(program(A, cfg), B, cfg, x0, end_state=True)
    ref = hm.solve(A, B, hm.AnalogConfig(integrator="euler", dt=0.002, seed=3, **kw), x0,
                   end_state=True)
    for res in (fast, ref):
        assert res.end_state is not None
    decay, var_end, cov = laws.od_end_state(np.array([lam]), 1.0, 3.0, 0.05)
    mean_end = 2.0 + float(decay[0]) * (-1.0 - 2.0)
    for res in (fast, ref):
        e, a = res.end_state[0], res.x[0]
        assert float(e.mean()) == pytest.approx(mean_end, abs=4 * math.sqrt(var_end[0] / m) + 0.01)
        assert float(e.var()) == pytest.approx(float(var_end[0]), rel=0.1)
        c = float(((e - e.mean()) * (a - a.mean())).mean())
        assert c == pytest.approx(float(cov[0]), rel=0.15)


def test_mismatch_pattern_is_one_fixed_array_per_device_sliced_by_placement():
    big = noise.mismatch_pattern((16, 16), 7, unit=1)
    block = noise.mismatch_pattern((8, 8), 7, unit=1, cell_offset=3)
    assert torch.equal(block, big[3:11, 3:11])  # the cells, not the matrix size, fix the error
    assert torch.equal(big, big.T)
    other_unit = noise.mismatch_pattern((16, 16), 7, unit=2)
    other_device = noise.mismatch_pattern((16, 16), 8, unit=1)
    assert not torch.equal(big, other_unit) and not torch.equal(big, other_device)
    stack = noise.mismatch_pattern((2, 16, 16), 7, unit=1)  # system s on unit 1 + s
    assert torch.equal(stack[0], big) and torch.equal(stack[1], other_unit)
    sample = noise.mismatch_pattern((300, 300), 1, symmetric=False).numpy().ravel()
    assert abs(sample.mean()) < 0.01 and abs(sample.std() - 1.0) < 0.01
    assert abs(float(np.mean(sample**4)) - 3.0) < 0.1  # Gaussian, not uniform


def test_placement_reaches_the_programmed_couplings():
    A = _spd_t([0.5, 1.0, 2.0, 3.0])
    def prog(unit, offset):
        cfg = hm.AnalogConfig(noise=hm.NoiseConfig(mismatch_std=0.05, unit=unit, cell_offset=offset,
                                                   device_seed=3))
        return program(A, cfg).A_hw[0]
    eps = noise.mismatch_pattern((4, 4), 3, unit=1, cell_offset=2)
    torch.testing.assert_close(prog(1, 2), A * (1 + 0.05 * eps), rtol=0, atol=1e-15)
    assert torch.equal(prog(1, 2), prog(1, 2))
    assert not torch.equal(prog(0, 0), prog(1, 0)) and not torch.equal(prog(1, 0), prog(1, 2))


def test_load_state_quantizes_over_the_rails():
    X = torch.tensor([[0.1, -3.7], [2.49, 9.0]], dtype=torch.float64)
    out, clipped = noise.load_state(X, hm.NoiseConfig(input_bits=3, state_range=4.0))
    step = 4.0 / 3  # 3 bits: levels -3..3 over +-4
    expected = torch.clamp(torch.round(X / step), -3, 3) * step
    assert torch.equal(out, expected) and clipped == 1
    assert torch.equal(noise.load_state(X, hm.NoiseConfig())[0], X)


_GRID = [p for p in itertools.product(
    [None, 6],  # DAC/ADC bits
    ["nearest", "stochastic"],
    [0.0, 1e-3],  # read noise
    ["zero", "x0"],  # start
    [1, 2],  # copies
    [None, 40.0],  # rails
) if not (p[4] > 1 and p[1] == "nearest" and p[0] is not None)]  # copies need stochastic rounding


@pytest.mark.parametrize("bits, rounding, read, start, copies, rails", _GRID)
def test_fast_path_equals_general_path_bitwise(bits, rounding, read, start, copies, rails):
    """The same seed gives the same draws on both paths: equal bit for bit (x, end state, and the
    diagnostics they share), for every converter and warm-start setting."""
    A = _spd_t([0.1, 0.4, 0.9, 1.0, 0.6], seed=3)
    gen = torch.Generator().manual_seed(5)
    B = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x0 = torch.randn(5, 3, generator=gen, dtype=torch.float64) if start == "x0" else None
    nz = hm.NoiseConfig(input_bits=bits, output_bits=bits, coupling_bits=bits, rounding=rounding,
                        read_noise=read or None, mitigation_copies=copies, state_range=rails)
    cfg = hm.AnalogConfig(integrator="analytic", analog_time=6.0, burn_in=1.0, kappa0=1e-3, seed=9,
                          noise=nz)
    prog = program(A, cfg)
    fast = solve_programmed(prog, B, cfg, x0, end_state=True)
    general = solve_programmed(prog, B, cfg, x0, end_state=True, path="general")
    assert fast.state is not None and general.state is None  # each path ran
    assert torch.equal(fast.x, general.x)
    assert torch.equal(fast.end_state, general.end_state)
    for key in ("predicted_rel_error", "predicted_bias", "clipped_inputs", "clipped_outputs",
                "input_error", "saturated_fraction", "range_fallback"):
        assert fast.diagnostics.get(key) == general.diagnostics.get(key), key


def test_fast_path_equals_general_path_when_the_rails_are_reached():
    A = _spd_t([0.1, 0.4, 1.0], seed=1)
    B = torch.tensor([[1.0, -0.5], [0.8, 0.2], [-0.9, 1.0]], dtype=torch.float64)
    cfg = hm.AnalogConfig(integrator="analytic", analog_time=5.0, burn_in=1.0, kappa0=1e-3, seed=2,
                          noise=hm.NoiseConfig(state_range=2.0, input_bits=8))
    prog = program(A, cfg)
    fast = solve_programmed(prog, B, cfg)
    general = solve_programmed(prog, B, cfg, path="general")
    assert fast.diagnostics["range_fallback"] and general.diagnostics["range_fallback"]
    assert torch.equal(fast.x, general.x)
    assert float(fast.x.abs().max()) <= 2.0
