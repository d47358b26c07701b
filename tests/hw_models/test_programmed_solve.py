"""The public programmed-matrix solve: the cached analytic path and the general simulator model
the same device, report the same diagnostics keys, and follow the seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hw_models as hm
from hw_models.langevin import solve_programmed

from .conftest import spd

LAM = np.linspace(0.2, 1.0, 8)


def _system(m: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.as_tensor(spd(LAM, seed=3))
    B = torch.as_tensor(np.random.default_rng(4).standard_normal((8, m)))
    return A, B


def _config(**kw) -> hm.AnalogConfig:
    opts = {"integrator": "analytic", "analog_time": 30.0, "burn_in": 5.0, "kappa0": 1e-3, "seed": 0}
    opts.update(kw)
    return hm.AnalogConfig(**opts)


def test_public_names_are_exported():
    import hw_models.langevin as lv

    assert hm.solve_programmed is lv.solve_programmed is solve_programmed
    assert hm.program is lv.program and hm.ProgrammedMatrix is lv.ProgrammedMatrix


def test_same_seed_is_bitwise_identical_and_seeds_differ():
    A, B = _system()
    cfg = _config(noise=hm.NoiseConfig(input_bits=6, output_bits=6, rounding="stochastic"))
    prog = hm.program(A, cfg)
    first = solve_programmed(prog, B, cfg, seed=5)
    second = solve_programmed(hm.program(A, cfg), B, cfg, seed=5)
    other = solve_programmed(prog, B, cfg, seed=6)
    assert first.state is not None  # the analytic path ran
    assert torch.equal(first.x, second.x) and torch.equal(first.state, second.state)
    assert not torch.equal(first.x, other.x)
    # hw_models.solve with a programmed matrix is the same call
    assert torch.equal(hm.solve(prog, B, cfg, seed=5).x, first.x)


def test_analytic_path_agrees_with_the_general_path_within_the_error_law():
    """Both paths estimate A_hw^-1 B (couplings quantized) with the predicted thermal error."""
    A, B = _system(m=4)
    # burn-in 60 tau: the start-up transient (lambda_min = 0.2) is gone, only the variance is left
    cfg = _config(burn_in=60.0, noise=hm.NoiseConfig(coupling_bits=8))
    prog = hm.program(A, cfg)
    exact = torch.linalg.solve(prog.A_hw[0], B)
    errs = {"analytic": [], "general": []}
    for seed in range(30):
        fast = solve_programmed(prog, B, cfg, seed=seed)
        assert fast.state is not None
        errs["analytic"].append(float(((fast.x - exact) ** 2).sum()))
        # a vector right-hand side takes the general simulator (same integrator, same device)
        total = 0.0
        for j in range(B.shape[1]):
            general = solve_programmed(prog, B[:, j], cfg, seed=100 * seed + j)
            assert general.state is None
            total += float(((general.x - exact[:, j]) ** 2).sum())
        errs["general"].append(total)
    predicted = fast.diagnostics["predicted_mse"]  # for all 4 columns
    assert predicted == pytest.approx(4 * general.diagnostics["predicted_mse"], rel=1e-12)
    for name, values in errs.items():  # mean of 30 chi-square-like draws: within 40 %
        assert np.mean(values) == pytest.approx(predicted, rel=0.4), name


def test_without_noise_both_paths_agree_to_rounding():
    A, B = _system()
    cfg = _config(kappa0=0.0, noise=hm.NoiseConfig(coupling_bits=6, input_bits=6, output_bits=6))
    prog = hm.program(A, cfg)
    fast = solve_programmed(prog, B, cfg)
    for j in range(B.shape[1]):
        general = solve_programmed(prog, B[:, j], cfg)
        torch.testing.assert_close(fast.x[:, j], general.x, rtol=1e-10, atol=1e-12)


def test_both_paths_report_the_same_diagnostics():
    A, B = _system()
    cfg = _config(noise=hm.NoiseConfig(coupling_bits=8, input_bits=6, output_bits=8))
    prog = hm.program(A, cfg)
    B = B[:, :1]  # one column: the general path gets it as a vector
    fast = solve_programmed(prog, B, cfg, seed=1).diagnostics
    general = solve_programmed(prog, B[:, 0], cfg, seed=1).diagnostics
    assert list(fast) == list(general)  # same keys, same order
    assert "input_error" in fast and "coupling_step" in fast
    for key in ("lambda_min", "lambda_max", "condition_number", "error_law_mse", "predicted_mse",
                "coupling_error", "coupling_step", "averaging_time", "burn_in", "copies"):
        assert fast[key] == pytest.approx(general[key], rel=1e-12), key
    # nearest rounding: the DAC error is deterministic; check it against a direct computation
    step = np.abs(B.numpy()).max(axis=0) / (2**5 - 1)
    loaded = np.round(B.numpy() / step) * step
    direct = np.linalg.norm(loaded - B.numpy()) / np.linalg.norm(B.numpy())
    assert fast["input_error"] == pytest.approx(direct, rel=1e-9)
    assert general["input_error"] == pytest.approx(direct, rel=1e-9)


def test_warm_starts_fall_back_to_x0_on_the_general_path():
    A, B = _system()
    cfg = _config(kappa0=0.0, analog_time=0.5, burn_in=0.0)  # short: the start still matters
    prog = hm.program(A, cfg)
    B = B[:, :1]
    b = B[:, 0]  # a vector right-hand side takes the general path
    scaled = solve_programmed(prog, b, cfg, x0_rhs_scale=0.5)
    explicit = solve_programmed(prog, b, cfg, x0=0.5 * b)
    assert scaled.state is None and torch.equal(scaled.x, explicit.x)
    # ... and the analytic path's start at the loaded input agrees (ideal DAC)
    fast = solve_programmed(prog, B, cfg, x0_rhs_scale=0.5)
    torch.testing.assert_close(fast.x[:, 0], explicit.x, rtol=1e-10, atol=1e-12)
    # an eigenbasis state: the general path starts from it rotated back
    state = fast.state
    Q = torch.linalg.eigh(prog.A_hw)[1]
    from_state = solve_programmed(prog, b, cfg, x0_eigen=state)
    via_x = solve_programmed(prog, b, cfg, x0=(Q @ state)[0, :, 0])
    torch.testing.assert_close(from_state.x, via_x.x, rtol=1e-10, atol=1e-12)
    # a given x0 wins over the hint on the general path
    given = solve_programmed(prog, b, cfg, x0=torch.zeros_like(b), x0_rhs_scale=0.5)
    zero = solve_programmed(prog, b, cfg)
    assert torch.equal(given.x, zero.x)


def test_warm_start_hints_need_a_programmed_matrix():
    A, B = _system()
    with pytest.raises(ValueError, match="ProgrammedMatrix"):
        hm.solve(A, B, _config(), x0_rhs_scale=1.0)
