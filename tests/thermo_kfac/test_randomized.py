"""Randomized low-rank solvers (rsvd, sre) against the exact eigh solver and a dense solve."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from thermo_kfac import KFACPreconditioner
from thermo_kfac.solvers import Damping, EighSolver, solver_factory
from thermo_kfac.solvers.randomized import (
    RandomizedSVDSolver,
    SymmetricRandomizedEighSolver,
    spectrum_decay,
)

SOLVERS = [RandomizedSVDSolver, SymmetricRandomizedEighSolver]


def _decaying_factor(n: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    """SPD matrix with eigenvalues decay**i (a random orthogonal basis)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    vals = decay ** torch.arange(n, dtype=torch.float64)
    return (Q * vals) @ Q.T


def _dense_reference(A, G, V, lam_a, lam_g):
    """(G + lam_g I)^-1 V (A + lam_a I)^-1 by two dense solves (independent of any solver)."""
    Ad = A + lam_a * torch.eye(A.shape[0], dtype=A.dtype)
    Gd = G + lam_g * torch.eye(G.shape[0], dtype=G.dtype)
    return torch.linalg.solve(Ad, torch.linalg.solve(Gd, V).T).T


@pytest.mark.parametrize("cls", SOLVERS)
def test_error_shrinks_to_zero_as_rank_reaches_full(cls):
    A, G = _decaying_factor(40, 0, 0.8), _decaying_factor(30, 1, 0.8)
    V = torch.randn(30, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    damping = Damping(1e-4)
    lam_a, lam_g = damping.split(A, G)
    exact = _dense_reference(A, G, V, lam_a, lam_g)
    eigh = EighSolver()
    eigh.prepare(A, G, damping)
    assert torch.allclose(eigh.apply(V), exact, rtol=1e-8, atol=1e-8)
    errors = []
    for rank in (4, 12, 24, 50):
        solver = cls(rank=rank, oversample=5, power_iters=2)
        solver.prepare(A, G, damping)
        errors.append(float((solver.apply(V) - exact).norm() / exact.norm()))
    assert errors[0] > 1e-2  # truncation genuinely matters at low rank
    assert errors[0] > errors[1] > errors[2]
    assert errors[3] < 1e-9  # rank >= dim: exact eigh fall back


@pytest.mark.parametrize("cls", SOLVERS)
def test_low_rank_apply_equals_dense_inverse_of_truncated_factor(cls):
    # An exactly rank-5 factor: the sketch captures it, so the result equals the dense inverse of
    # the (low-rank + damping) matrix, not only approximately.
    g = torch.Generator().manual_seed(3)
    X = torch.randn(50, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(20, 5, generator=g, dtype=torch.float64)
    A, G = X @ X.T, Y @ Y.T
    V = torch.randn(20, 50, generator=g, dtype=torch.float64)
    damping = Damping(1e-2)
    solver = cls(rank=5, oversample=4, power_iters=1)
    solver.prepare(A, G, damping)
    lam_a, lam_g = damping.split(A, G)
    expected = _dense_reference(A, G, V, lam_a, lam_g)
    assert torch.allclose(solver.apply(V), expected, rtol=1e-7, atol=1e-9)


def test_relative_damping_scales_with_largest_eigenvalue():
    A, G = 7.0 * _decaying_factor(16, 5), 3.0 * _decaying_factor(12, 6)
    V = torch.randn(12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solver = SymmetricRandomizedEighSolver(rank=16, relative_damping=True)  # exact branch
    solver.prepare(A, G, Damping(0.1))
    expected = _dense_reference(A, G, V, 0.1 * 7.0, 0.1 * 3.0)  # largest eigenvalues are 7 and 3
    assert torch.allclose(solver.apply(V), expected, rtol=1e-10)


def test_spectrum_decay_counts_eigenvalues():
    A = _decaying_factor(30, 0, decay=0.5)  # eigenvalues 0.5**i: above 1e-3 for i <= 9
    assert spectrum_decay(A, 1e-3) == 10
    assert spectrum_decay(A, 0.3) == 2
    assert spectrum_decay(torch.zeros(4, 4)) == 0


def test_options_are_validated_and_registered():
    for bad in ({"rank": 0}, {"oversample": -1}, {"power_iters": 1.5}, {"relative_damping": 1},
                {"bogus": 1}):
        with pytest.raises(ValueError):
            solver_factory("sre", bad)
    assert isinstance(solver_factory("rsvd", {"rank": 8})(), RandomizedSVDSolver)


def test_preconditioner_with_sre_trains_and_resumes_bitwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 5))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(6)]

    def run(model, precond, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
            opt.step()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, optimizer=opt, solver="sre", inverse_update_every=2,
                                 solver_options={"rank": 8, "power_iters": 2})
    run(model, precond, opt, data[:3])
    saved = copy.deepcopy((model.state_dict(), precond.state_dict(), opt.state_dict()))
    run(model, precond, opt, data[3:])
    final = [p.clone() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in final)

    model.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    opt2.load_state_dict(saved[2])
    precond.remove_hooks()
    precond2 = KFACPreconditioner(model, optimizer=opt2, solver="sre", inverse_update_every=2,
                                  solver_options={"rank": 8, "power_iters": 2})
    precond2.load_state_dict(saved[1])
    run(model, precond2, opt2, data[3:])
    assert all(torch.equal(a, b) for a, b in zip(final, model.parameters(), strict=True))
