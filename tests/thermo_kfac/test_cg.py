"""CG solver: reaches its tolerance, equals the dense Kronecker solve, warm start, reports."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from thermo_kfac import KFACPreconditioner
from thermo_kfac.solvers import Damping, solver_factory
from thermo_kfac.solvers.cg import (
    CGSolver,
    MatrixFreeCGSolver,
    batch_kronecker_operator,
    kronecker_cg,
)


def _spd(n: int, seed: int, kappa: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    vals = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), n, dtype=torch.float64)
    return (Q * vals) @ Q.T


def _dense_kron_solve(A, G, V, lam_a, lam_g):
    """Solve kron(G_d, A_d) vec(X) = vec(V) (row-major vec) with the full Kronecker matrix."""
    Ad = A + lam_a * torch.eye(A.shape[0], dtype=A.dtype)
    Gd = G + lam_g * torch.eye(G.shape[0], dtype=G.dtype)
    x = torch.linalg.solve(torch.kron(Gd, Ad), V.reshape(-1))
    return x.reshape(V.shape)


@pytest.mark.parametrize("jacobi", [True, False])
def test_cg_reaches_tolerance_and_equals_dense_kronecker_solve(jacobi):
    A, G = _spd(9, 0), _spd(7, 1)
    V = torch.randn(7, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    damping = Damping(1e-3)
    lam_a, lam_g = damping.split(A, G)
    expected = _dense_kron_solve(A, G, V, lam_a, lam_g)
    for tol in (1e-4, 1e-10):
        solver = CGSolver(tol=tol, max_iter=500, jacobi=jacobi)
        solver.prepare(A, G, damping)
        X = solver.apply(V)
        info = solver.last_report.info
        assert info["converged"] and 0 < info["cg_iterations"] <= 500
        # independent residual check
        Ad = A + lam_a * torch.eye(9, dtype=A.dtype)
        Gd = G + lam_g * torch.eye(7, dtype=G.dtype)
        assert float((V - Gd @ X @ Ad).norm() / V.norm()) <= tol * 1.0001
    assert torch.allclose(X, expected, rtol=1e-7, atol=1e-8)


def test_warm_start_saves_iterations_and_cap_is_respected():
    A, G = _spd(30, 3, kappa=1e3), _spd(20, 4, kappa=1e3)
    g = torch.Generator().manual_seed(5)
    V = torch.randn(20, 30, generator=g, dtype=torch.float64)
    solver = CGSolver(tol=1e-8, max_iter=1000)
    solver.prepare(A, G, Damping(1e-4))
    solver.apply(V)
    cold = solver.last_report.info["cg_iterations"]
    solver.apply(V + 1e-3 * torch.randn(20, 30, generator=g, dtype=torch.float64))
    warm = solver.last_report.info
    assert warm["warm_started"] and warm["converged"] and warm["cg_iterations"] < cold
    capped = CGSolver(tol=1e-12, max_iter=3)
    capped.prepare(A, G, Damping(1e-4))
    capped.apply(V)
    assert capped.last_report.info["cg_iterations"] == 3 and not capped.last_report.info["converged"]


def test_kronecker_cg_zero_rhs():
    X, it, res = kronecker_cg(torch.eye(3), torch.eye(4), torch.zeros(3, 4))
    assert it == 0 and res == 0.0 and not X.any()


def test_options_are_validated():
    for bad in ({"tol": 0}, {"tol": 2.0}, {"max_iter": 0}, {"jacobi": "yes"},
                {"matrix_free": "yes"}):
        with pytest.raises(ValueError):
            solver_factory("cg", bad)


def test_preconditioner_with_cg_matches_cholesky_and_resumes_bitwise():
    def make(solver, options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        pre = KFACPreconditioner(model, optimizer=opt, solver=solver, solver_options=options,
                                 inverse_update_every=2, factor_dtype=torch.float64)
        return model, opt, pre

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g))
            for _ in range(6)]

    def run(model, pre, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            opt.step()

    ref = make("cholesky", {})
    run(ref[0], ref[2], ref[1], data)
    model, opt, pre = make("cg", {"tol": 1e-12, "max_iter": 1000})
    run(model, pre, opt, data[:3])
    saved = copy.deepcopy((model.state_dict(), pre.state_dict(), opt.state_dict()))
    run(model, pre, opt, data[3:])
    final = [p.clone() for p in model.parameters()]
    for a, b in zip(final, ref[0].parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    pre.remove_hooks()
    model.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(model.parameters(), lr=0.05)
    opt2.load_state_dict(saved[2])
    pre2 = KFACPreconditioner(model, optimizer=opt2, solver="cg", inverse_update_every=2,
                              solver_options={"tol": 1e-12, "max_iter": 1000},
                              factor_dtype=torch.float64)
    pre2.load_state_dict(saved[1])
    run(model, pre2, opt2, data[3:])
    assert all(torch.equal(a, b) for a, b in zip(final, model.parameters(), strict=True))


def test_matrix_free_construction_and_registry():
    for solver in (solver_factory("cg", {"matrix_free": True})(), CGSolver(matrix_free=True),
                   solver_factory("cg-matrix-free", {"tol": 1e-6})()):
        assert type(solver) is MatrixFreeCGSolver and solver.uses_batch_statistics
        assert type(copy.deepcopy(solver)) is MatrixFreeCGSolver
    assert type(CGSolver()) is CGSolver and not CGSolver.uses_batch_statistics
    with pytest.raises(ValueError):
        solver_factory("cg-matrix-free", {"matrix_free": False})


@pytest.mark.parametrize("lam", [(0.3, 0.2), (0.0, 0.0)])
def test_batch_operator_equals_dense_product(lam):
    g = torch.Generator().manual_seed(0)
    for n in (3, 40):  # both associations (N x N and row-sequential) when undamped
        a, gr = (torch.randn(n, 6, generator=g, dtype=torch.float64),
                 torch.randn(n, 5, generator=g, dtype=torch.float64))
        X = torch.randn(5, 6, generator=g, dtype=torch.float64)
        lam_g, lam_a = lam
        dense = (gr.T @ gr + lam_g * torch.eye(5, dtype=torch.float64)) @ X @ (
            a.T @ a + lam_a * torch.eye(6, dtype=torch.float64))
        assert torch.allclose(batch_kronecker_operator(gr, a, lam_g, lam_a)(X), dense)


@pytest.mark.parametrize("pi_damping", [False, True])
def test_matrix_free_in_preconditioner_equals_dense_batch_solve(pi_damping):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    pre = KFACPreconditioner(model, solver="cg", factor_decay=0.0, damping=1e-2,
                             pi_damping=pi_damping, inverse_update_every=3, factor_update_every=1,
                             solver_options={"matrix_free": True, "tol": 1e-12, "max_iter": 500},
                             factor_dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(12, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (12,), generator=g)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw = {i: torch.cat([model[i].weight.grad, model[i].bias.grad[:, None]], 1).clone()
               for i in (0, 2)}
        pre.step()
        factors = pre.factors()  # factor_decay=0: this batch's A and G
        for i in (0, 2):
            A, G = factors[str(i)]
            lam_a, lam_g = pre.damping.split(A, G)
            expected = _dense_kron_solve(A, G, raw[i], lam_a, lam_g)
            got = torch.cat([model[i].weight.grad, model[i].bias.grad[:, None]], 1)
            assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10), (step, i)
            info = pre.last_report["solver_reports"][f"{i}/apply"].info
            assert info["converged"] and info["cg_iterations"] >= 1
            assert info["warm_started"] == (step > 0)
    state = pre.state_dict()["layers"]["0"]["solver"]
    assert set(state) == {"damping_value", "pi_damping", "X_prev"}


def test_matrix_free_without_batch_rows_raises():
    solver = MatrixFreeCGSolver()
    solver.prepare(torch.eye(3), torch.eye(2), Damping(1e-3))
    solver.observe_batch(torch.randn(4, 3), torch.randn(4, 2))
    solver.apply(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="observe_batch"):
        solver.apply(torch.randn(2, 3))  # rows are used once
