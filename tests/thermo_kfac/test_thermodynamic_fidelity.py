"""The thermo solver simulates the device it prices: preset converters and rails by default, input
ranging, a lambda_max estimate a null-space start cannot fool, physical warm starts, the predicted
error with its bias, and the one failure channel (SolverFailure -> the digital fallback)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hw_models as hm
from thermo_kfac import KFACPreconditioner
from thermo_kfac.solvers.base import Damping, SolverFailure
from thermo_kfac.solvers.thermodynamic import LAMBDA_SAFETY, ThermodynamicSolver, lambda_max_estimate


def _spd(eigs, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.tensor(eigs, dtype=torch.float64)) @ Q.T


def _cross_entropy_G(n_classes=6, rows=400, seed=0) -> torch.Tensor:
    """The output layer's G of a cross-entropy loss: rows p - y sum to 0, so G 1 = 0."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(rows, n_classes, generator=g, dtype=torch.float64), dim=1)
    y = F.one_hot(torch.randint(0, n_classes, (rows,), generator=g), n_classes).double()
    e = p - y
    return e.T @ e / rows


def test_default_simulates_the_preset_and_pricing_sees_the_same_settings():
    chip = hm.thermo_device("chip")
    solver = ThermodynamicSolver()
    # one device object: the simulator's configuration IS the preset's
    assert solver.device == chip and solver.config.noise == chip.noise
    assert (chip.noise.coupling_bits, chip.noise.input_bits, chip.noise.output_bits) == (10, 12, 12)
    assert chip.noise.state_range == 8.0 and chip.noise.mismatch_std == 2e-3
    assert solver.config.kappa0 == chip.kappa0
    A, G = _spd([1.0, 0.5, 0.2, 0.1]), _spd([2.0, 1.0, 0.3], seed=1)
    solver.prepare(A, G, Damping(0.01))
    solver.apply(torch.randn(3, 4, dtype=torch.float64))
    settings = solver.pricing_settings()
    assert solver.last_report.info["converters"] == settings["converters"]
    assert settings["converters"]["coupling_bits"] == chip.noise.coupling_bits and not settings["ideal"]
    assert settings["thermo_device"] == chip and settings["kappa0"] == chip.kappa0
    ideal = ThermodynamicSolver(ideal=True)
    assert ideal.noise.ideal and ideal.noise.state_range is None
    assert ideal.config.kappa0 == chip.kappa0  # thermal noise is physics, not a converter
    override = ThermodynamicSolver(bits=6, device="board")
    assert override.noise.coupling_bits == 6 and override.noise.input_bits == 6
    assert override.noise.state_range == hm.thermo_device("board").noise.state_range
    assert override.device == hm.thermo_device("board", bits=6)


def test_lambda_max_is_not_fooled_by_a_null_space_start():
    G = _cross_entropy_G() + 0.1 * torch.eye(6, dtype=torch.float64)
    ones = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(G @ ones, 0.1 * ones)  # the trap: 1 is an eigenvector (0.1)
    true = float(torch.linalg.eigvalsh(G)[-1])
    assert true > 0.3
    for seed in range(5):
        est = lambda_max_estimate(G, 20, seed)
        assert true <= est <= true * LAMBDA_SAFETY * 1.001
    # a larger factor with fewer Krylov steps than its size still bounds lambda_max
    big = _spd(torch.linspace(0.01, 1.0, 80).tolist(), seed=3)
    assert 1.0 <= lambda_max_estimate(big, 20, 1) <= 1.03


def test_programmed_couplings_stay_in_range_for_a_cross_entropy_output_layer():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 9, generator=g, dtype=torch.float64)
    A = a.T @ a / 300
    solver = ThermodynamicSolver()
    solver.prepare(A, _cross_entropy_G(), Damping(0.01))
    info = solver.last_report.info
    assert max(info["programmed_lambda_max"]) <= 1.02
    assert max(info["max_coupling"]) <= 1.0
    assert min(info["programmed_lambda_max"]) >= 0.95  # the time base is not wasted either


def test_input_ranging_keeps_the_state_inside_the_rails():
    """A slow factor: at full scale the solution peaks far beyond the rails. The solver scales the
    input down (reported, with the SNR given up) and the simulator never saturates; with wide rails
    it keeps the full scale."""
    A = _spd([1.0, 0.3, 0.05, 0.01, 0.005], seed=2)
    G = _spd([1.0, 0.8], seed=3)
    grad = torch.randn(2, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    # deflate=0: the whole slow factor on the device (deflation would remove the slow premise)
    solver = ThermodynamicSolver(track_exact=True, seed=1, analog_time=2000.0, burn_in=200.0,
                                 deflate=0)
    solver.prepare(A, G, Damping(1e-6))
    for _ in range(3):
        solver.apply(grad + 0.01 * torch.randn(2, 5, dtype=torch.float64))
    info = solver.last_report.info
    s_g, s_a = info["input_scale"]
    assert s_a < 0.2  # A's solution: x* ~ 1/lambda_min ~ 200 x full scale vs rails at 8
    assert info["snr_lost_db"][1] == pytest.approx(-20 * math.log10(s_a))
    assert info["bits_lost_to_ranging"][1] == pytest.approx(-math.log2(s_a))
    assert info["saturated_fraction"] == [0.0, 0.0] and info["range_fallback"] == [False, False]
    assert solver.pricing_settings()["input_scale"] == [s_g, s_a]
    assert info["rel_error_to_exact"] < 0.1
    wide = ThermodynamicSolver(track_exact=True, seed=1, analog_time=2000.0, burn_in=200.0,
                               state_range=1e5, output_range=1e5, deflate=0)
    wide.prepare(A, G, Damping(1e-6))
    wide.apply(grad)
    assert wide.last_report.info["input_scale"] == [1.0, 1.0]


def test_previous_warm_start_continues_held_end_states_and_reloads_the_rest():
    """A factor is placed on one unit, which holds the end state of the last column it ran: that
    column continues from the device's own state; every other column is re-sent through the DAC
    (counted for pricing)."""
    A, G = _spd([1.0, 0.4, 0.2, 0.1, 0.05, 0.3], seed=5), _spd([1.0, 0.5, 0.25, 0.6, 0.2], seed=6)
    grad = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solver = ThermodynamicSolver(analog_time=2.0, burn_in=0.0, seed=3)
    solver.prepare(A, G, Damping(0.01))
    solver.apply(grad)
    assert solver.last_report.info["reloaded_values"] == [0, 0]  # the first call starts from 0
    units = hm.thermo_device("chip").units
    fG, fA = solver.factors["G"], solver.factors["A"]
    assert fG.held_cols.tolist() == [5] and fA.held_cols.tolist() == [4]
    assert fG.held.shape == (5, 1) and fA.held.shape == (6, 1)
    forgetful = copy.deepcopy(solver)  # the same device, but its units were reset
    for f in forgetful.factors.values():
        f.held = f.held_cols = None
    out = solver.apply(grad)
    out_reset = forgetful.apply(grad)
    assert solver.last_report.info["reloaded_values"] == [5 * (6 - 1), 6 * (5 - 1)]
    assert forgetful.last_report.info["reloaded_values"] == [5 * 6, 6 * 5]
    assert not torch.allclose(out, out_reset)  # the held columns started elsewhere
    settings = solver.pricing_settings()
    assert settings["held_states"] == units and settings["reload_bits"] == solver.noise.input_bits


def test_predicted_error_includes_the_burn_in_bias():
    """A short window from zero: the error is mostly bias, which the prediction now contains."""
    A, G = _spd([1.0, 0.2, 0.05, 0.02], seed=7), _spd([1.0, 0.3, 0.1], seed=8)
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    solver = ThermodynamicSolver(ideal=True, warm_start="zero", analog_time=5.0, burn_in=1.0,
                                 kappa0=1e-6, track_exact=True, residual_every=1)
    solver.prepare(A, G, Damping(1e-4))
    solver.apply(grad)
    info = solver.last_report.info
    measured = info["rel_error_to_exact"]
    assert measured > 0.2  # a real bias to predict
    assert info["predicted_error"] == pytest.approx(measured, rel=0.25)
    # kappa0 = 1e-6: the variance is negligible, so without the bias the prediction would be ~0
    assert all(b > 0.1 for b in info["predicted_bias"])
    assert 0.5 < info["residual_ratio"] < 2.0


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _step(model, precond, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    model.zero_grad()
    out = model(x)
    precond.accumulate_curvature(out)
    F.cross_entropy(out, y).backward()
    precond.step()


def test_failed_inverse_programming_is_served_by_the_counted_fallback():
    """method='inverse' whose programming fails: every step's gradient is the fallback's (eigh),
    counted in fallbacks(); before the channel, the layer went silently unpreconditioned."""
    model, ref_model = _net(), _net()
    precond = KFACPreconditioner(model, solver="thermo", damping=0.1, fallback_solver="eigh",
                                 solver_options={"method": "inverse", "mismatch_std": 5.0,
                                                 "mismatch_kind": "absolute"})
    reference = KFACPreconditioner(ref_model, solver="eigh", damping=0.1)
    with pytest.warns(RuntimeWarning, match="inverting factor"):
        for step in range(3):
            _step(model, precond, step)
            _step(ref_model, reference, step)
            for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad)
    assert precond.fallbacks() == {name: 3 for name in precond.fallbacks()}


def test_apply_failure_is_served_by_the_fallback_or_raised_without_one():
    model, ref_model = _net(), _net()
    options = {"ideal": True, "residual_every": 1, "residual_limit": 1e-9}  # always "too inaccurate"
    precond = KFACPreconditioner(model, solver="thermo", damping=0.1, fallback_solver="eigh",
                                 solver_options=options)
    reference = KFACPreconditioner(ref_model, solver="eigh", damping=0.1)
    with pytest.warns(RuntimeWarning, match="residual_limit"):
        for step in range(2):
            _step(model, precond, step)
            _step(ref_model, reference, step)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert all(v == 2 for v in precond.fallbacks().values())
    bare = KFACPreconditioner(_net(), solver="thermo", damping=0.1, fallback_solver=None,
                              solver_options=options)
    with pytest.raises(SolverFailure, match="residual_limit"):
        _step(bare.model, bare, 0)


def test_non_finite_gradient_raises_the_failure():
    solver = ThermodynamicSolver()
    solver.prepare(_spd([1.0, 0.5]), _spd([1.0, 0.3]), Damping(0.1))
    with pytest.raises(SolverFailure, match="non-finite"):
        solver.apply(torch.full((2, 2), float("nan"), dtype=torch.float64))


def test_a_column_not_sent_returns_exactly_zero_with_ranging():
    """A dead input feature (zero gradient column) is not sent to the device: its solution is 0,
    also when the input scale s < 1 (before the fix it returned thermal noise / s, which the
    slow A factor then amplified)."""
    A = _spd([1.0, 0.3, 0.05, 0.01, 0.005], seed=2)
    G = _spd([1.0, 0.8, 0.5], seed=3)
    grad = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grad[:, 1] = 0.0
    solver = ThermodynamicSolver(seed=2)
    solver.prepare(A, G, Damping(1e-6))
    for _ in range(3):
        solver.apply(grad)
    assert solver.last_report.info["input_scale"][1] < 1.0
    Y_dead = solver.Y_prev[:, 1]
    assert torch.equal(Y_dead, torch.zeros_like(Y_dead))
