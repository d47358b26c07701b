"""SINGD / IKFAC: first-order equivalence with damped K-FAC, bfloat16 training, state, memory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermo_kfac.singd import SINGD
from thermo_kfac.structures import STRUCTURES


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _batch(i, n=32, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(1000 + i)
    return scale * torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _ikfac_vs_kfac(beta1, steps=40, lam=0.1):
    """Relative distance of K K^T, C C^T and the preconditioned gradient from damping-in-EMA K-FAC,
    computed independently from the layer inputs/output gradients (retain_grad), with lr = 0."""
    model = _mlp()
    opt = SINGD(model, lr=0.0, momentum=0.0, damping=lam, alpha1=0.0, beta1=beta1, T=1,
                kfac_like=True, structure="dense")
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    S_A, S_G = eye(7), eye(8)  # first layer's A (with bias) and G
    for i in range(steps):
        x, y = _batch(i)
        opt.zero_grad()
        h = model[0](x)
        h.retain_grad()
        F.cross_entropy(model[2](model[1](h)), y).backward()
        a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        U = a.T @ a / len(x)
        G = len(x) * h.grad.T @ h.grad
        S_A = (1 - beta1) * S_A + beta1 * (U + lam * eye(7))
        S_G = (1 - beta1) * S_G + beta1 * (G + lam * eye(8))
        grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
        opt.step()
    K, C = opt.factor_roots("0")
    KKt, CCt = K.to_dense() @ K.to_dense().T, C.to_dense() @ C.to_dense().T
    ref_A, ref_G = torch.linalg.inv(S_A), torch.linalg.inv(S_G)
    nat_ref = ref_G @ grad @ ref_A
    nat = opt.preconditioned_gradient(opt.layers[0])

    def rel(x, r):
        return float((x - r).norm() / r.norm())

    moved = rel(eye(7), ref_A)
    return rel(KKt, ref_A), rel(CCt, ref_G), rel(nat, nat_ref), moved


def test_ikfac_tracks_damped_kfac_to_first_order():
    err_a, err_g, err_nat, moved = _ikfac_vs_kfac(beta1=0.02)
    assert moved > 0.5  # the K-FAC inverse moved far from its initial value I
    assert err_a < 0.05 * moved and err_g < 0.05 and err_nat < 0.05
    # the discrepancy is second order per step: halving beta1 (and doubling steps) halves it
    err_a2, err_g2, err_nat2, moved2 = _ikfac_vs_kfac(beta1=0.01, steps=80)
    assert abs(moved2 - moved) < 0.1 * moved
    assert err_a2 < 0.65 * err_a and err_nat2 < 0.65 * err_nat


def _teacher_data(n_batches=40, n=64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 4, generator=g)
    data = []
    for _ in range(n_batches):
        x = torch.randn(n, 10, generator=g)
        data.append((x.to(dtype), (x @ W).argmax(1)))
    return data


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_bfloat16_singd_trains_without_nan(structure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)).to(torch.bfloat16)
    opts = {"block": {"block_size": 8}, "hierarchical": {"k1": 4, "k2": 4}, "lowrank": {"rank": 4}}
    opt = SINGD(model, lr=0.05, momentum=0.9, damping=1e-3, T=2, beta1=0.01, alpha1=0.5,
                structure=structure, structure_options=opts.get(structure), dtype=torch.bfloat16)
    data = _teacher_data(n_batches=30)
    losses = []
    for _epoch in range(2):
        for x, y in data:
            opt.zero_grad()
            loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    K, C = opt.factor_roots("0")
    assert K.dtype == torch.bfloat16 and C.dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(K.to_dense()).all() and torch.isfinite(C.to_dense()).all()
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    # K must have actually changed (the preconditioner is not the identity)
    assert not torch.equal(K.to_dense(), torch.eye(11, dtype=torch.bfloat16))


def test_kfac_needs_upcasting_in_bfloat16():
    A = torch.eye(4, dtype=torch.bfloat16) * 2
    with pytest.raises(RuntimeError):
        torch.linalg.eigh(A)
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(A)


def test_singd_update_trains_float32_and_resumes_bitwise():
    def make():
        model = _mlp(dtype=torch.float32)
        return model, SINGD(model, lr=0.05, T=2, beta1=0.05, structure="hierarchical",
                            structure_options={"k1": 2, "k2": 2})

    def run(model, opt, steps):
        for i in steps:
            x, y = _batch(i, dtype=torch.float32)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    model, opt = make()
    run(model, opt, range(5))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    run(model, opt, range(5, 10))
    final = [p.clone() for p in model.parameters()]
    model2, opt2 = make()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    run(model2, opt2, range(5, 10))
    assert all(torch.equal(a, b) for a, b in zip(final, model2.parameters(), strict=True))


def test_memory_per_layer_and_validation():
    model = nn.Sequential(nn.Linear(99, 50), nn.ReLU(), nn.Linear(50, 10))
    dense = SINGD(model, structure="dense", dtype=torch.bfloat16).memory_per_layer()
    assert dense["0"]["K"] == 100 * 100 * 2 and dense["0"]["total"] == 2 * 2 * (100**2 + 50**2)
    diag = SINGD(model, structure="diagonal", dtype=torch.bfloat16).memory_per_layer()
    assert diag["0"]["total"] == 2 * 2 * (100 + 50)
    for bad in ({"structure": "banded"}, {"lr": -1.0}, {"T": 0}, {"kfac_like": 1},
                {"structure": "block", "structure_options": {"block_size": 0}}, {"dtype": torch.int8}):
        with pytest.raises(ValueError):
            SINGD(model, **bad)
