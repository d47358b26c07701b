"""Non-ideality models in hw_models.noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hw_models as hm
from hw_models import noise

from .conftest import spd


def test_quantize_nearest_hand_computed():
    x = torch.tensor([0.1, -0.45, 1.0, 0.6], dtype=torch.float64)
    q = noise.quantize(x, 3)  # levels -3..3, step = 1/3
    expected = torch.tensor([0.0, -1 / 3, 1.0, 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(q.values, expected)
    assert float(q.step) == pytest.approx(1 / 3)
    assert q.n_clipped == 0


def test_quantize_levels_error_and_groups():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0])
    for bits in (2, 4, 8):
        q = noise.quantize(x, bits, dims=(0,))  # one range per column
        levels = 2 ** (bits - 1) - 1
        step = x.abs().amax(dim=0) / levels
        torch.testing.assert_close(q.step.reshape(-1), step)
        k = q.values / step
        torch.testing.assert_close(k, torch.round(k))  # on the grid
        assert k.abs().max() <= levels + 1e-9
        assert ((q.values - x).abs() <= step / 2 + 1e-12).all()  # nearest: at most half a step
        for j in range(4):
            assert len(torch.unique(q.values[:, j])) <= 2**bits - 1


def test_fixed_bound_clips_and_counts():
    x = torch.tensor([0.5, 1.5, -2.0, 0.9, -1.0])
    q = noise.quantize(x, 4, bound=1.0)
    assert q.n_clipped == 2
    assert q.values.abs().max() == pytest.approx(1.0)
    assert float(q.values[1]) == pytest.approx(1.0) and float(q.values[2]) == pytest.approx(-1.0)


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 0.3, dtype=torch.float64)
    x[0] = 1.0  # abs-max = 1 so the step is 1/7 and 0.3 = 2.1 steps
    g = torch.Generator().manual_seed(1)
    q = noise.quantize(x, 4, rounding="stochastic", generator=g).values[1:]
    step = 1 / 7
    p = 0.1  # rounds up to 3 steps with probability 0.1
    assert set(np.round(q.unique().numpy() / step).astype(int)) == {2, 3}
    se = step * math.sqrt(p * (1 - p) / q.numel())
    assert abs(float(q.mean()) - 0.3) < 4.5 * se


def test_couplings_stay_symmetric_and_count_pairs():
    A = torch.as_tensor(spd([0.5, 1.0, 2.0, 4.0], seed=2))
    g = torch.Generator().manual_seed(0)
    q = noise.quantize_couplings(A, 3, rounding="stochastic", generator=g)
    torch.testing.assert_close(q.values, q.values.T, rtol=0, atol=0)
    q2 = noise.quantize_couplings(A, 3, bound=0.5)
    clipped_upper = int(torch.triu(A.abs() > 0.5).sum())
    assert q2.n_clipped == clipped_upper


def test_mismatch_is_fixed_per_device_and_has_the_requested_size():
    A = torch.ones(2, 60, 60, dtype=torch.float64)
    a1 = noise.apply_mismatch(A, 0.1, "proportional", device_seed=3)
    a2 = noise.apply_mismatch(A, 0.1, "proportional", device_seed=3)
    a3 = noise.apply_mismatch(A, 0.1, "proportional", device_seed=4)
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    assert not torch.equal(a1, a3)
    torch.testing.assert_close(a1, a1.transpose(-1, -2), rtol=0, atol=0)
    eps = (a1 - 1.0) / 0.1
    iu = torch.triu_indices(60, 60)
    sample = eps[:, iu[0], iu[1]].reshape(-1)  # 3660 independent errors
    assert abs(float(sample.std()) - 1) < 4.5 * math.sqrt(1 / (2 * sample.numel()))
    zero = noise.apply_mismatch(torch.zeros(3, 3), 0.2, "proportional")
    assert torch.count_nonzero(zero) == 0  # proportional errors scale with the coupling
    absolute = noise.apply_mismatch(torch.zeros(3, 3, dtype=torch.float64), 0.2, "absolute")
    assert torch.count_nonzero(absolute) == 9


def test_read_out_adds_noise_then_adc():
    X = torch.zeros(4, 10_000, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    Y, clipped = noise.read_out(X, hm.NoiseConfig(read_noise=0.3), generator=g)
    assert abs(float(Y.std()) - 0.3) < 4.5 * 0.3 / math.sqrt(2 * Y.numel())
    assert clipped == 0
    Y2, clipped2 = noise.read_out(X + 2.0, hm.NoiseConfig(output_bits=4, output_range=1.0))
    assert clipped2 == X.numel()
    torch.testing.assert_close(Y2, torch.ones_like(X))


def test_thermal_kappa0():
    assert noise.thermal_kappa0(300.0, 1e-9, 1.0) == pytest.approx(1.380649e-23 * 300 / 1e-9)
    assert noise.thermal_kappa0(300.0, 1e-9, 0.1) == pytest.approx(4.1419e-10, rel=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"coupling_bits": 1}, "coupling_bits=1"),
    ({"input_bits": 0}, "input_bits=0"),
    ({"output_bits": 2.5}, "output_bits=2.5"),
    ({"rounding": "up"}, "rounding='up'"),
    ({"mismatch_std": -0.1}, "mismatch_std=-0.1"),
    ({"mismatch_kind": "relative"}, "mismatch_kind='relative'"),
    ({"read_noise": float("nan")}, "read_noise=nan"),
    ({"mitigation_copies": 0}, "mitigation_copies=0"),
    ({"coupling_range": 0.0}, "coupling_range=0.0"),
    ({"coupling_bits": 4, "mitigation_copies": 4}, "rounding='stochastic'"),
])
def test_noise_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        hm.NoiseConfig(**kwargs)


def test_noise_config_ideal_flags():
    assert hm.NoiseConfig().ideal
    assert not hm.NoiseConfig(output_bits=8).ideal
    assert hm.NoiseConfig(mismatch_std=0.01).programs_couplings
    assert not hm.NoiseConfig(input_bits=8).programs_couplings


def test_solve_applies_dac_and_adc_and_reports_clipping(problem5):
    A, b, _ = problem5
    cfg = hm.AnalogConfig(analog_time=20.0, integrator="analytic", seed=0,
                          noise=hm.NoiseConfig(input_bits=4, input_range=0.5, output_bits=5))
    res = hm.solve(A, b, cfg)
    assert res.diagnostics["clipped_inputs"] == int(np.sum(np.abs(b) > 0.5))
    step = np.abs(res.x).max() / 15  # abs-max ADC range per read-out column
    np.testing.assert_allclose(res.x / step, np.round(res.x / step), atol=1e-9)
    # the DAC changed the system: the estimate follows the clipped, quantized drive
    levels = 7
    b_q = np.clip(np.round(b / (0.5 / levels)), -levels, levels) * (0.5 / levels)
    x_q = np.linalg.solve(A, b_q)
    assert res.diagnostics["systematic_error"] == pytest.approx(
        np.linalg.norm(x_q - np.linalg.solve(A, b)) / np.linalg.norm(np.linalg.solve(A, b)))


def test_mismatch_in_solve_is_static_per_device(problem5):
    A, b, _ = problem5
    def run(device_seed, seed):
        cfg = hm.AnalogConfig(analog_time=5e4, burn_in=50.0, kappa0=1e-8, integrator="analytic",
                              seed=seed, noise=hm.NoiseConfig(mismatch_std=0.05,
                                                              device_seed=device_seed))
        return hm.solve(A, b, cfg).x
    # tiny thermal noise: the estimate is the mismatched device's solution, whatever the run seed
    np.testing.assert_allclose(run(1, 0), run(1, 1), rtol=1e-4, atol=1e-6)
    assert np.linalg.norm(run(1, 0) - run(2, 0)) > 1e-3
    eps = noise.mismatch_pattern((1, 5, 5), 1).numpy()[0]
    np.testing.assert_allclose(run(1, 0), np.linalg.solve(A * (1 + 0.05 * eps), b), rtol=1e-4,
                               atol=1e-6)


def test_programmed_matrix_not_positive_definite_is_reported():
    A = np.diag([1e-3, 1.0, 2.0])
    cfg = hm.AnalogConfig(noise=hm.NoiseConfig(mismatch_std=0.5, mismatch_kind="absolute",
                                               device_seed=0))
    with pytest.raises(ValueError, match=r"programmed matrix .* not positive definite: "
                                         r"lambda_min = -"):
        hm.solve(A, np.ones(3), cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_abs_max_nearest_quantize_stays_on_the_levels(dtype):
    """With an abs-max range and nearest rounding the quantizer skips its clamp: the rounded
    ratios never leave [-levels, levels], so it equals the clamped textbook formula exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 200, generator=g, dtype=dtype) * torch.logspace(-30, 30, 200, dtype=dtype)
    x[:, 7] = 0.0
    for bits in (2, 3, 8, 12, 16):
        levels = float(2 ** (bits - 1) - 1)
        q = noise.quantize(x, bits, dims=(0,))
        span = x.abs().amax(dim=0, keepdim=True)
        step = span / levels
        ref = (x / torch.where(step > 0, step, 1.0)).round().clamp(-levels, levels) * step
        assert torch.equal(q.values, ref)
