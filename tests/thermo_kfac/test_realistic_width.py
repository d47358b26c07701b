"""Thermodynamic K-FAC at realistic widths (issue 21): deflation of the top modes, the
feasibility law, the diagonal resistors and windows from the error law, each against an
independent reference (exact digital solves, the programmed matrix's eigenvalues)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hw_models as hm
from hw_models.langevin.feasibility import feasibility, perturbation_model
from hw_models.noise import program_couplings
from thermo_kfac.solvers import ThermodynamicSolver
from thermo_kfac.solvers.base import Damping, SolverFailure
from thermo_kfac.solvers.deflation import deflate


def _factor(n: int, kappa: float, seed: int, top: int = 3) -> torch.Tensor:
    """A PSD factor whose ``top`` leading eigenvalues stand far above a geometric bulk (the shape
    of K-FAC input factors: the mean direction first), largest/smallest-nonzero ratio ``kappa``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -math.log10(kappa), n, dtype=torch.float64)
    if top:
        lam[:top] = torch.linspace(50.0, 20.0, top, dtype=torch.float64)
    return (Q * lam) @ Q.T


@pytest.mark.parametrize("n, kappa, k", [(64, 1e2, 4), (200, 1e3, 8), (512, 1e4, 16)])
def test_deflated_solve_equals_the_exact_damped_solve(n, kappa, k):
    F = _factor(n, kappa, seed=n, top=k)  # k modes stand out, as the mean direction does
    lam = 0.05
    M = F + lam * torch.eye(n, dtype=F.dtype)
    B = torch.randn(n, 8, generator=torch.Generator().manual_seed(1), dtype=F.dtype)
    exact = torch.linalg.solve(M, B)
    modes, S = deflate(F, k, lam, seed=0)
    C, B_rem = modes.split(B)
    X = modes.combine(C, torch.linalg.solve(S, B_rem))
    leak = float((X - exact).norm() / exact.norm())
    # the dropped coupling (Ritz residual) is tiny with two power iterations at a spectral gap
    assert leak < 1e-3, leak
    assert modes.residual < 0.05  # max ||F u - l u|| / lam
    # the remainder is better conditioned: lambda_{k+1} + lam over lam
    ev = torch.linalg.eigvalsh(S)
    full = torch.linalg.eigvalsh(M)
    assert float(ev[-1] / ev[0]) < 0.1 * float(full[-1] / full[0])
    assert float(ev[0]) == pytest.approx(lam, rel=1e-6)


def test_deflated_device_solve_is_predicted_by_the_law():
    """The thermo solver on a deflated factor: its measured error to the exact damped solve is
    what the per-call law predicts (within 25 %) on 5 seeded gradients."""
    n = 256
    A = _factor(n, 1e3, seed=3).float()
    G = _factor(24, 10.0, seed=4, top=0).float()
    solver = ThermodynamicSolver(track_exact=True, seed=2, deflate=8, analog_time=30.0)
    solver.prepare(A, G, Damping(0.01))
    ratios = []
    for i in range(5):
        grad = torch.randn(24, n, generator=torch.Generator().manual_seed(10 + i))
        solver.apply(grad)
        info = solver.last_report.info
        ratios.append(info["pricing"]["predicted_rel_error"] / info["rel_error_to_exact"])
    assert 0.75 <= float(np.median(ratios)) <= 1.25, ratios
    assert solver.factors["A"].k == 8 and solver.factors["G"].k == 8


def test_feasibility_law_predicts_indefiniteness():
    """A case built to fail (tiny lambda_min on 8-bit fixed-range couplings) is declared
    infeasible and programs indefinite; one built to pass is feasible and programs definite."""
    n = 128
    noise = hm.NoiseConfig(coupling_bits=8, coupling_range=1.0, mismatch_std=2e-3)
    for lam_min, expect in ((1e-3, False), (0.5, True)):
        F = _factor(n, 1e3, seed=5, top=0)
        F = F / torch.linalg.eigvalsh(F)[-1]
        P = (1 - lam_min) * F + lam_min * torch.eye(n, dtype=F.dtype)  # eigenvalues in [lam_min, 1]
        verdict = feasibility(P, noise, lam_min)
        programmed, _ = program_couplings(P[None], noise)
        definite = float(torch.linalg.eigvalsh(programmed[0])[0]) > 0
        assert verdict.feasible is expect and definite is expect, verdict.reason()
        # the law's perturbation bounds the real one (Weyl): no false "feasible"
        real = float(torch.linalg.matrix_norm(programmed[0] - P, 2))
        assert real <= verdict.perturbation


def test_the_model_law_matches_the_matrix_law_for_unstructured_matrices():
    n = 200
    noise = hm.NoiseConfig(coupling_bits=10, coupling_range=1.0, mismatch_std=2e-3, rounding="stochastic")
    F = _factor(n, 1e2, seed=6, top=0)
    P = F / torch.linalg.eigvalsh(F)[-1]
    from hw_models.langevin.feasibility import perturbation_norm

    matrix_law, _, _ = perturbation_norm(P, noise)
    rows = float((P**2).sum(1).max())
    model = perturbation_model(n, noise, max_coupling=float(P.abs().max()), row_norm2=rows,
                               max_diagonal=float(P.diagonal().max()))
    assert model == pytest.approx(matrix_law, rel=0.05)


def test_diagonal_resistors_program_what_the_coupling_array_cannot():
    """A wide factor of small entries (the activations' mean direction removed): on a 10-bit
    fixed-range coupling array it programs indefinite; with the diagonal on its own resistors the
    couplings range over the off-diagonal entries and it programs definite."""
    n = 400
    F = _factor(n, 1e3, seed=7, top=0)
    lam = 1e-2
    P = F / torch.linalg.eigvalsh(F)[-1] * (1 - lam) + lam * torch.eye(n, dtype=F.dtype)
    plain = hm.thermo_device("chip", diagonal_resistors=False).noise
    resistors = hm.thermo_device("chip").noise
    assert resistors.diagonal_resistors
    lows = {}
    for name, noise in (("plain", plain), ("resistors", resistors)):
        programmed, _ = program_couplings(P[None], noise)
        lows[name] = float(torch.linalg.eigvalsh(programmed[0])[0])
        assert feasibility(P, noise, lam).feasible is (name == "resistors")
    assert lows["plain"] <= 0 < lows["resistors"]


@pytest.mark.parametrize("seed", range(10))
def test_auto_window_meets_its_target(seed):
    """analog_time='auto' picks each factor's window from the law; the measured error of a solve
    with the gradient's columns meets target_error (ideal converters, thermal noise and finite
    time only: what the window controls)."""
    rng = np.random.default_rng(seed)
    n_a, n_g = int(rng.integers(16, 96)), int(rng.integers(8, 48))
    A = _factor(n_a, float(10 ** rng.uniform(1, 3)), seed=100 + seed, top=0).float()
    G = _factor(n_g, float(10 ** rng.uniform(0.5, 2)), seed=200 + seed, top=0).float()
    target = 0.1
    solver = ThermodynamicSolver(track_exact=True, seed=seed, target_error=target, ideal=True,
                                 warm_start="zero")
    solver.prepare(A, G, Damping(0.05))
    assert all(solver.factors[k].window is not None for k in "GA")
    errors = []
    for i in range(3):
        grad = torch.randn(n_g, n_a, generator=torch.Generator().manual_seed(seed * 10 + i))
        solver.apply(grad)
        errors.append(solver.last_report.info["rel_error_to_exact"])
    assert float(np.median(errors)) <= 1.25 * target, errors


def test_a_factor_no_depth_can_serve_fails_with_the_reason():
    A = _factor(64, 1e3, seed=8).float()
    G = _factor(16, 10.0, seed=9, top=0).float()
    solver = ThermodynamicSolver(coupling_bits=2, diagonal_resistors=False, max_deflate=4)
    with pytest.raises(SolverFailure, match="deflation depth 4"):
        solver.prepare(A, G, Damping(1e-3))


def test_deflate_larger_than_the_factor_is_refused():
    A = _factor(16, 10.0, seed=10, top=0).float()
    solver = ThermodynamicSolver(deflate=40)
    with pytest.raises(ValueError, match="deflate=40 must be smaller than the factor size n=16"):
        solver.prepare(A, A, Damping(0.1))


def test_trace_prices_the_deflation_host_work():
    """project --trace adds the host's deflation (per update, and per solve) to the hybrid side:
    the difference with and without the recorded depths is the GEMMs of the sketch, the
    remainder and the projections, priced by hand here."""
    import copy

    from hw_models import pricing
    from hw_models.projection import price_trace
    from thermo_kfac import KFACPreconditioner
    from thermo_kfac.trace import TraceRecorder

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    precond = KFACPreconditioner(model, optimizer=opt, solver="thermo", factor_update_every=1,
                                 inverse_update_every=3, solver_options={"deflate": 2})
    recorder = TraceRecorder(precond)
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        opt.step()
        recorder.observe()
    trace = recorder.to_dict()
    assert all(u["deflate"] == {"G": 2, "A": 2} for u in trace["updates"])
    bare = copy.deepcopy(trace)
    for u in bare["updates"]:
        del u["deflate"]
    host = hm.digital_device("h100")
    with_host = price_trace(trace, thermo="chip", digital="h100")
    without = price_trace(bare, thermo="chip", digital="h100")
    expected = 0.0
    for u in trace["updates"]:
        n_a, n_g = u["factor_sizes"]
        applies = max(max((s.get("calls", 1) for s in u["solves"]), default=1), u["steps_until_next"])
        for n, m in ((n_a, n_g), (n_g, n_a)):
            w = min(2 + 8, n)
            once = [(n, n, w)] * 3 + [(n, n, w), (w, n, w), (n, n, 2), (2, n, 2), (n, 2, n), (n, 2, n),
                                      (n, 2, 2)]
            per_solve = [(2, n, m), (n, 2, m), (2, n, m), (n, 2, m)]
            expected += sum(pricing.gemm_time(*s, host) for s in once)
            expected += applies * sum(pricing.gemm_time(*s, host) for s in per_solve)
    steps = trace["steps"]
    extra = with_host["step"]["thermo_kfac_solver_s"] - without["step"]["thermo_kfac_solver_s"]
    assert extra == pytest.approx(expected / steps, rel=1e-9)


def test_a_deflated_solver_resumes_bit_identically():
    """The deflated modes, windows and scales travel in the state dict: a solver rebuilt from it
    returns exactly what the original returns for the next gradient."""
    A = _factor(96, 1e3, seed=11).float()
    G = _factor(16, 10.0, seed=12, top=0).float()
    grads = [torch.randn(16, 96, generator=torch.Generator().manual_seed(20 + i)) for i in range(3)]
    solver = ThermodynamicSolver(seed=4)
    solver.prepare(A, G, Damping(1e-3))
    assert solver.factors["A"].k > 0 and solver.factors["A"].window is not None
    solver.apply(grads[0])
    clone = ThermodynamicSolver(seed=4)
    clone.load_state_dict(solver.state_dict())
    for grad in grads[1:]:
        assert torch.equal(solver.apply(grad), clone.apply(grad))
        assert [f.k for f in clone.factors.values()] == [f.k for f in solver.factors.values()]


def test_held_end_states_are_converted_to_the_current_calls_units():
    """Issue 28: a held end state is in the units of the call that left it (its columns' r / s);
    the next call, whose input scale differs, must continue from the same host-unit state."""
    from thermo_kfac.solvers.thermo_device import DeviceFactor, end_columns, hold_end_states, reload_start

    n, m = 6, 5
    f = DeviceFactor(M=torch.eye(n), P=torch.eye(n), c=1.0, d=None, seed=0)
    host = torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    r_then = torch.linspace(1.0, 2.0, m, dtype=torch.float64)
    cols = end_columns(f, m, units=2)  # two of the five columns
    hold_end_states(f, (host / r_then)[:, cols], cols, r_eff=r_then)  # device units of that call
    r_now = torch.linspace(0.5, 4.0, m, dtype=torch.float64)
    noise = hm.NoiseConfig()  # an ideal DAC: the reload adds nothing
    start, _ = reload_start(f, torch.zeros(n, m, dtype=torch.float64), torch.ones(m, dtype=torch.bool),
                            noise, seed=0, r_eff=r_now)
    cols = f.held_cols
    assert torch.allclose(start[:, cols] * r_now[cols], host[:, cols])  # the same host-unit state
