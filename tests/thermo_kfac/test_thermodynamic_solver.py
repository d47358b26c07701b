"""ThermodynamicSolver against independent references: EighSolver, exact solves and the error laws."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hw_models as hm
from hw_models.langevin import AnalogConfig, program
from hw_models.langevin import solve as analog_solve
from hw_models.langevin.laws import od_transition
from hw_models.noise import NoiseConfig
from thermo_kfac import KFACPreconditioner
from thermo_kfac.solvers.base import Damping
from thermo_kfac.solvers.digital import EighSolver
from thermo_kfac.solvers.thermodynamic import ThermodynamicSolver


def _factors(seed: int = 0, d_in: int = 6, d_out: int = 4):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, d_in, generator=g, dtype=torch.float64)
    gg = torch.randn(64, d_out, generator=g, dtype=torch.float64)
    grad = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return a.T @ a / 64, gg.T @ gg / 64, grad


def _reference(A, G, grad, damping):
    eigh = EighSolver()
    eigh.prepare(A, G, damping)
    return eigh.apply(grad)


def _damped(A, G, damping):
    lam_a, lam_g = damping.split(A, G)
    return (A + lam_a * torch.eye(A.shape[0], dtype=A.dtype),
            G + lam_g * torch.eye(G.shape[0], dtype=G.dtype))


def test_solve_matches_eigh_within_error_law():
    A, G, grad = _factors()
    damping = Damping(0.1)
    A_d, G_d = _damped(A, G, damping)
    T, kappa0 = 4000.0, 1e-6
    solver = ThermodynamicSolver(method="solve", analog_time=T, burn_in=500.0, kappa0=kappa0,
                                 warm_start="zero", seed=3, ideal=True)
    solver.prepare(A, G, damping)
    out = solver.apply(grad)
    ref = _reference(A, G, grad, damping)
    # Error law (TLA; docs/thermodynamic_kfac.md): a column b enters the device as b / r with
    # r = max|b| and P = M / c, so in original units its squared error is
    # (r / c)^2 * 2 kappa0 tr(P^-2) / T. The first solve's error is propagated through
    # (A + lam_A I)^-1 (2-norm bound); the second solve adds its own. Burn-in bias is e^-50.
    c_g, c_a = solver.factors["G"].c, solver.factors["A"].c
    Y = torch.linalg.solve(G_d, grad)
    law_g = hm.solve_error_law(torch.linalg.eigvalsh(G_d / c_g).numpy(), T, kappa0)
    law_a = hm.solve_error_law(torch.linalg.eigvalsh(A_d / c_a).numpy(), T, kappa0)
    mse1 = float((grad.abs().amax(dim=0) / c_g).pow(2).sum()) * law_g
    mse2 = float((Y.T.abs().amax(dim=0) / c_a).pow(2).sum()) * law_a
    inv_a_norm = float(torch.linalg.matrix_norm(torch.linalg.inv(A_d), ord=2))
    expected = mse1 * inv_a_norm**2 + mse2
    err2 = float((out - ref).pow(2).sum())
    assert expected > 0 and math.sqrt(expected) < 0.05 * float(ref.norm())  # not vacuous
    assert err2 < 25.0 * expected  # 5x the predicted RMS
    report = solver.last_report
    assert report.hardware_time_s > 0 and report.energy_j > 0
    assert report.info["analog_time"] == pytest.approx(2 * (T + 500.0))
    assert report.info["relative_residual"] < 0.05


def test_inverse_matches_eigh_within_error_law():
    A, G, grad = _factors(1)
    damping = Damping(0.1)
    A_d, G_d = _damped(A, G, damping)
    kappa0 = 1e-3
    solver = ThermodynamicSolver(method="inverse", analog_time=3000.0, burn_in=200.0,
                                 kappa0=kappa0, integrator="exact", seed=1)
    solver.prepare(A, G, damping)
    report = solver.last_report
    out = solver.apply(grad)
    ref = _reference(A, G, grad, damping)
    errs = []
    for i, (key, M) in enumerate((("A", A_d), ("G", G_d))):  # prepare() inverts A first, then G
        c = solver.factors[key].c
        lam = torch.linalg.eigvalsh(M / c).numpy()
        dt, n_samples = report.info["dt"][i], report.info["n_samples_each"][i]
        assert dt == pytest.approx(1.0 / lam.max(), rel=1e-2)  # "auto": ~0.5 x 2/lambda_max
        a, _ = od_transition(lam, dt, kappa0)
        law = hm.inverse_error_law(a, kappa0 / lam, n_samples, kappa0)  # ||P^-1 error||_F^2
        errs.append(math.sqrt(law) / c)
    err_a, err_g = errs
    G_inv, A_inv = torch.linalg.inv(G_d), torch.linalg.inv(A_d)
    bound = (err_g * float(torch.linalg.matrix_norm(grad @ A_inv, ord=2))
             + err_a * float(torch.linalg.matrix_norm(G_inv @ grad, ord=2)))
    assert bound < 0.3 * float(ref.norm())
    assert float((out - ref).norm()) < 4.0 * bound
    assert report.hardware_time_s > 0


def test_quantization_error_halves_per_bit():
    """Coupling/DAC/ADC rounding: relative error ~ kappa * 2^-bits (error floor of the cost model),
    so log2(error) falls by about one per extra bit; no thermal noise, converged time average."""
    A, G, grad = _factors(2, d_in=12, d_out=8)
    damping = Damping(0.05)
    ref = _reference(A, G, grad, damping)
    bits = [6, 8, 10, 12]
    errors = []
    for b in bits:
        solver = ThermodynamicSolver(analog_time=1e6, burn_in=1e6, kappa0=0.0, bits=b,
                                     warm_start="zero", seed=0)
        solver.prepare(A, G, damping)
        errors.append(float((solver.apply(grad) - ref).norm() / ref.norm()))
    slope = np.polyfit(bits, np.log2(errors), 1)[0]
    assert -1.4 < slope < -0.6, (errors, slope)
    # the level: first-order perturbation of (G_d, A_d) by uniform rounding of step max|P|/L,
    # L = 2^(b-1) - 1, gives a relative error of order kappa * sqrt(n) * step
    A_d, G_d = _damped(A, G, damping)
    kappa = max(float(torch.linalg.cond(M)) for M in (A_d, G_d))
    floor = kappa * math.sqrt(12 / 3.0) * 2.0 ** (1 - bits[0])
    assert errors[0] < floor


def test_warm_start_gradient_interpolates_sgd_to_natural_gradient():
    A, G, grad = _factors(4)
    damping = Damping(0.1)
    cosines = []
    for t in (0.0, 1.0, 5.0, 50.0):
        solver = ThermodynamicSolver(analog_time=t, burn_in=0.0, kappa0=0.0, warm_start="gradient",
                                     track_exact=True, seed=0, ideal=True)
        solver.prepare(A, G, damping)
        out = solver.apply(grad)
        if t == 0.0:
            assert torch.equal(out, grad)  # no dynamics: the gradient itself (SGD)
        cosines.append(solver.last_report.info["cosine_to_exact"])
    # TNGD eq. 19: each mode moves monotonically from the gradient towards F^-1 grad
    assert all(b > a for a, b in zip(cosines, cosines[1:], strict=False)), cosines
    assert cosines[-1] > 0.999 and cosines[0] < 0.99


def test_track_exact_reports_match_eigh():
    A, G, grad = _factors(5)
    damping = Damping(0.1)
    solver = ThermodynamicSolver(bits=8, track_exact=True, seed=2)
    solver.prepare(A, G, damping)
    out = solver.apply(grad)
    ref = _reference(A, G, grad, damping)
    info = solver.last_report.info
    assert info["rel_error_to_exact"] == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-9)
    cos = float((out * ref).sum() / (out.norm() * ref.norm()))
    assert info["cosine_to_exact"] == pytest.approx(cos, rel=1e-9)
    A_d, G_d = _damped(A, G, damping)
    residual = float((G_d @ out @ A_d - grad).norm() / grad.norm())
    assert info["relative_residual"] == pytest.approx(residual, rel=1e-9)


def test_programmed_fast_path_equals_general_path():
    """Without thermal noise the cached analytic path and the general simulator agree exactly."""
    A, _, _ = _factors(6, d_in=10)
    M = A + 0.1 * torch.eye(10, dtype=A.dtype)
    B = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=A.dtype)
    x0 = torch.randn(10, 3, generator=torch.Generator().manual_seed(1), dtype=A.dtype)
    cfg = AnalogConfig(integrator="analytic", analog_time=7.0, burn_in=2.0, kappa0=0.0, seed=0,
                       noise=NoiseConfig(coupling_bits=6, input_bits=6, output_bits=6))
    fast = analog_solve(program(M, cfg), B, cfg, x0=x0)
    general = analog_solve(M, B, cfg, x0=x0)
    assert fast.state is not None
    torch.testing.assert_close(fast.x, general.x, rtol=1e-10, atol=1e-12)
    # continuing from the returned eigenbasis state equals starting from its rotation
    Q = torch.linalg.eigh(program(M, cfg).A_hw)[1]
    again = analog_solve(program(M, cfg), B, cfg, x0_eigen=fast.state)
    via_x = analog_solve(program(M, cfg), B, cfg, x0=(Q @ fast.state)[0])
    torch.testing.assert_close(again.x, via_x.x, rtol=1e-8, atol=1e-10)


def test_programmed_solve_depends_only_on_its_seed():
    """The analytic fast path reuses one generator per programmed matrix: a call's draws (stochastic
    DAC/ADC rounding, thermal noise, read noise) depend on its seed only, not on earlier calls."""
    A, _, _ = _factors(6, d_in=10)
    M = A + 0.1 * torch.eye(10, dtype=A.dtype)
    B = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=A.dtype)
    cfg = AnalogConfig(integrator="analytic", analog_time=7.0, burn_in=2.0, kappa0=1e-2, seed=0,
                       noise=NoiseConfig(coupling_bits=6, input_bits=6, output_bits=6, read_noise=1e-3,
                                         rounding="stochastic", mitigation_copies=2))
    fresh = analog_solve(program(M, cfg), B, cfg, seed=11)
    prog = program(M, cfg)
    first = analog_solve(prog, B, cfg, seed=11)
    analog_solve(prog, 2.0 * B, cfg, seed=12)  # advances any shared stream
    again = analog_solve(prog, B, cfg, seed=11)
    other = analog_solve(prog, B, cfg, seed=12)
    assert torch.equal(fresh.x, first.x) and torch.equal(first.x, again.x)
    assert torch.equal(first.state, again.state)
    assert not torch.equal(first.x, other.x)


def test_known_column_range_skips_the_scan_only():
    """``rhs_absmax`` (the solver's full-scale columns) gives bit-for-bit the DAC's own range scan."""
    A, _, _ = _factors(6, d_in=10)
    M = A + 0.1 * torch.eye(10, dtype=A.dtype)
    B = torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=A.dtype)
    B[:, 2] = 0.0  # a column that is not sent
    r = B.abs().amax(dim=0)
    Bn = B / torch.where(r > 0, r, 1.0)
    for rounding in ("nearest", "stochastic"):
        cfg = AnalogConfig(integrator="analytic", analog_time=7.0, burn_in=2.0, kappa0=1e-2, seed=3,
                           noise=NoiseConfig(coupling_bits=6, input_bits=5, output_bits=6,
                                             rounding=rounding))
        prog = program(M, cfg)
        scanned = analog_solve(prog, Bn, cfg)
        hinted = analog_solve(prog, Bn, cfg, rhs_absmax=(r > 0).to(Bn.dtype))
        assert torch.equal(scanned.x, hinted.x)
        assert scanned.diagnostics == hinted.diagnostics


def test_state_dict_resume_is_identical():
    A, G, grad = _factors(3)
    damping = Damping(0.1)
    solver = ThermodynamicSolver(method="solve", analog_time=50.0, bits=8, seed=5)
    solver.prepare(A, G, damping)
    solver.apply(grad)
    resumed = ThermodynamicSolver(method="solve", analog_time=50.0, bits=8, seed=5)
    resumed.load_state_dict(copy.deepcopy(solver.state_dict()))
    assert torch.equal(solver.apply(grad), resumed.apply(grad))


def _train_mlp(solver, options, steps=15, fallback="eigh"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    precond = KFACPreconditioner(model, solver=solver, damping=0.1, inverse_update_every=2,
                                 solver_options=options, fallback_solver=fallback)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        precond.accumulate_curvature(out)
        loss = F.cross_entropy(out, y)
        loss.backward()
        precond.step()
        opt.step()
        losses.append(loss.item())
    return losses, precond


@functools.cache
def _digital_losses() -> tuple[float, ...]:
    return tuple(_train_mlp("eigh", {})[0])


@pytest.mark.parametrize("options", [
    {},  # the defaults: method solve, analytic, 50 tau
    {"method": "solve", "analog_time": 50, "kappa0": 1e-2, "bits": 8, "integrator": "sde"},
    {"method": "inverse", "analog_time": 500, "kappa0": 1e-2, "bits": 8, "integrator": "exact"},
])
def test_kfac_training_with_thermo_solver(options):
    losses, precond = _train_mlp("thermo", {"bits": 8, **options} if not options else options)
    digital = _digital_losses()
    assert losses[-1] < 0.9 * losses[0]
    assert abs(losses[-1] - digital[-1]) < 0.05 * digital[-1]
    hw = precond.last_report["hardware_time_s"]  # the last step (14) also re-prepared the factors
    assert isinstance(hw, float) and hw > 0
    assert sum(precond.fallbacks().values()) == 0


class _NaNOnSecondLayer(ThermodynamicSolver):
    """Injected fault: the layer with index 1 returns NaN on every other apply."""

    def apply(self, grad):
        out = super().apply(grad)
        if self.layer_index == 1 and self.applies % 2 == 0:
            return torch.full_like(out, float("nan"))
        return out


def test_fallback_on_injected_nan_keeps_training_finite():
    with pytest.warns(RuntimeWarning, match="fallback"):
        losses, precond = _train_mlp(_NaNOnSecondLayer(bits=8, seed=1), None, steps=12)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0]
    counts = list(precond.fallbacks().values())
    assert counts[0] == 0 and counts[1] == 6  # steps 2, 4, ..., 12 of the second layer


def test_unprogrammable_device_falls_back():
    """2-bit couplings make an ill-conditioned factor indefinite at every deflation depth:
    prepare raises SolverFailure naming the depth tried, so the preconditioner's fallback solver
    serves every step (counted) and training goes on."""
    with pytest.warns(RuntimeWarning, match="cannot be programmed .deflation depth"):
        losses, precond = _train_mlp("thermo", {"coupling_bits": 2, "diagonal_resistors": False}, steps=6)
    assert all(math.isfinite(v) for v in losses)
    assert sum(precond.fallbacks().values()) > 0
    assert sum(precond.skipped_updates().values()) > 0


@pytest.mark.parametrize("options, needle", [
    ({"method": "magic"}, "'magic'"),
    ({"integrator": "rk4"}, "'rk4'"),
    ({"bits": 0}, "bits=0"),
    ({"analog_time": -1.0}, "-1.0"),
    ({"method": "inverse", "analog_time": 0.0}, "analog_time=0.0"),
    ({"device": "quantum"}, "'quantum'"),
    ({"backend": "jax"}, "'jax'"),
    ({"method": "inverse", "kappa0": 0.0}, "kappa0=0.0"),
    ({"warm_start": "hot"}, "'hot'"),
    ({"method": "inverse", "warm_start": "gradient"}, "warm_start='gradient'"),
    ({"track_exact": "yes"}, "track_exact='yes'"),
    ({"mismatch_kind": "odd"}, "'odd'"),
    ({"dynamics": "wobbly"}, "'wobbly'"),
    ({"colour": 3}, "'colour'"),
    ({"target_error": -0.1}, "target_error=-0.1"),
    ({"target_error": 1.5}, "target_error=1.5"),
    ({"deflate": -2}, "deflate=-2"),
    ({"deflate": "some"}, "deflate='some'"),
    ({"method": "inverse", "analog_time": "auto"}, "analog_time='auto' needs method='solve'"),
    ({"method": "inverse", "deflate": 4}, "deflate=4 needs method='solve'"),
    ({"analog_time": "long"}, "analog_time='long'"),
    ({"max_analog_time": 0.0}, "max_analog_time=0.0"),
])
def test_bad_options_raise(options, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        ThermodynamicSolver(**options)


def test_every_simulator_option_reaches_the_simulator():
    A, G, grad = _factors(7)
    damping = Damping(0.1)
    solver = ThermodynamicSolver(integrator="exact", backend="torch", coupling_bits=10, input_bits=9,
                                 output_bits=9, rounding="stochastic", mismatch_std=1e-3,
                                 mismatch_kind="absolute", read_noise=1e-4, mitigation_copies=2,
                                 device_seed=4, device="chip", dynamics="underdamped", mass=1.0,
                                 friction=2.0, seed=9, analog_time=50.0)
    solver.prepare(A, G, damping)
    solver.apply(grad)
    cfg = solver.config
    assert (cfg.integrator, cfg.dynamics, cfg.friction) == ("exact", "underdamped", 2.0)
    chip = hm.thermo_device("chip")  # the preset's ranges stay: only the given options change
    assert cfg.noise == NoiseConfig(coupling_bits=10, input_bits=9, output_bits=9,
                                    rounding="stochastic", mismatch_std=1e-3,
                                    mismatch_kind="absolute", read_noise=1e-4,
                                    mitigation_copies=2, device_seed=4,
                                    coupling_range=chip.noise.coupling_range, input_range=1.0,
                                    output_range=chip.noise.state_range,
                                    state_range=chip.noise.state_range, diagonal_resistors=True)
    info = solver.last_report.info
    # two solves, two copies; the exact integrator rounds the times to whole steps
    assert info["analog_time"] == pytest.approx(2 * 2 * (50.0 + 10.0), rel=0.05)
    assert all(e is not None and e > 0 for e in info["coupling_error"])


def test_bad_option_via_preconditioner():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="'magic'"):
        KFACPreconditioner(model, solver="thermo", solver_options={"method": "magic"})
