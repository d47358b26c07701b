"""Structured matrices: projections are idempotent, products equal their dense equivalents."""

from __future__ import annotations

import pytest
import torch

from thermo_kfac.structures import STRUCTURES, get_structure

DIM = 23
CASES = [("dense", {}), ("diagonal", {}), ("block", {"block_size": 5}), ("block", {"block_size": 40}),
         ("hierarchical", {"k1": 4, "k2": 3}), ("hierarchical", {"k1": 20, "k2": 10}),
         ("toeplitz", {}), ("lowrank", {"rank": 4})]
IDS = [f"{n}-{o}" for n, o in CASES]


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _support(name, opts, dim=DIM):
    """Boolean support of the structure built by hand from its definition (not from the code)."""
    i = torch.arange(dim)[:, None]
    j = torch.arange(dim)[None, :]
    if name == "dense":
        return torch.ones(dim, dim, dtype=torch.bool)
    if name == "diagonal":
        return i == j
    if name == "block":
        k = min(opts["block_size"], dim)
        nb = dim // k
        bi = torch.where(i < nb * k, i // k, nb)
        bj = torch.where(j < nb * k, j // k, nb)
        return bi == bj
    if name == "hierarchical":
        k1 = min(opts["k1"], dim)
        k2 = min(opts["k2"], dim - k1)
        top = (i < k1) & (j >= i - i)  # whole first k1 rows
        corner = (i >= dim - k2) & (j >= dim - k2)
        middle = (i >= k1) & (i < dim - k2) & ((j == i) | (j >= dim - k2))
        return top | corner | middle
    if name == "toeplitz":
        return i >= j
    if name == "lowrank":
        r = opts["rank"]
        return ((i < r) & (j < r)) | ((i >= r) & ((j < r) | (j == i)))
    raise AssertionError(name)


def _random_member(name, opts, seed):
    X = _rand(DIM, DIM, seed=seed)
    if name == "toeplitz":  # a random Toeplitz matrix: constant along diagonals
        c = _rand(DIM, seed=seed + 100)
        lag = torch.arange(DIM)[:, None] - torch.arange(DIM)[None, :]
        return torch.where(lag >= 0, c[lag.clamp_min(0)], 0.0)
    return X * _support(name, opts)


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_projection_is_idempotent_and_orthogonal(name, opts):
    cls = get_structure(name)
    X = _rand(DIM, DIM, seed=1)
    P = cls.project(X, **opts)
    P2 = cls.project(P.to_dense(), **opts)
    assert torch.allclose(P2.to_dense(), P.to_dense(), atol=1e-12)
    # zero outside the support; orthogonal: residual is orthogonal to a random member
    assert not P.to_dense()[~_support(name, opts)].any()
    member = _random_member(name, opts, seed=2)
    assert abs(float(((X - P.to_dense()) * member).sum())) < 1e-9
    # projecting a member returns it unchanged
    assert torch.allclose(cls.project(member, **opts).to_dense(), member, atol=1e-12)


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_products_equal_dense(name, opts):
    cls = get_structure(name)
    K1 = cls.project(_random_member(name, opts, 3), **opts)
    K2 = cls.project(_random_member(name, opts, 4), **opts)
    D1, D2 = _random_member(name, opts, 3), _random_member(name, opts, 4)
    M = _rand(DIM, 7, seed=5)
    N = _rand(6, DIM, seed=6)
    assert torch.allclose(K1.matmul(M), D1 @ M, atol=1e-12)
    assert torch.allclose(K1.matmul(M, transpose=True), D1.T @ M, atol=1e-12)
    assert torch.allclose(K1.rmatmul(N), N @ D1, atol=1e-12)
    assert torch.allclose(K1.rmatmul(N, transpose=True), N @ D1.T, atol=1e-12)
    prod = K1.compose(K2)
    assert type(prod) is cls
    assert torch.allclose(prod.to_dense(), D1 @ D2, atol=1e-10)  # closed under products
    assert torch.allclose(K1.trace(), D1.trace())
    assert torch.allclose(K1.frob_sq(), (D1 * D1).sum())
    assert torch.allclose(K1.add(K2, -0.5).add_identity(2.0).to_dense(),
                          D1 - 0.5 * D2 + 2 * torch.eye(DIM, dtype=D1.dtype), atol=1e-12)
    eye = cls.identity(DIM, torch.float64, **opts).to_dense()
    assert torch.equal(eye, torch.eye(DIM, dtype=torch.float64))


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_pi_hat_keeps_symmetric_mass_and_inner(name, opts):
    cls = get_structure(name)
    Y = _rand(40, DIM, seed=7)
    S = Y.T @ Y
    P = cls.from_symmetric(S, **opts)
    sym = (P.to_dense() + P.to_dense().T) / 2
    supp = _support(name, opts)
    closure = supp | supp.T
    if name == "toeplitz":  # diagonals are averaged: compare the diagonal means
        assert torch.allclose(sym.diagonal(-3).mean(), S.diagonal(-3).mean())
    else:
        assert torch.allclose(sym[closure], S[closure], atol=1e-10)
    assert torch.allclose(cls.from_inner(Y, **opts).to_dense(), P.to_dense(), atol=1e-10)
    assert torch.allclose(cls.from_symmetric(P.to_dense() + P.to_dense().T, **opts).to_dense(),
                          cls.from_symmetric(2 * sym, **opts).to_dense())


def test_memory_footprints():
    d = 1000
    counts = {n: get_structure(n).zeros(d, torch.bfloat16).numel() for n in STRUCTURES}
    assert counts["dense"] == d * d
    assert counts["diagonal"] == d
    assert counts["toeplitz"] == d
    assert counts["block"] == (d // 30) * 900 + (d % 30) ** 2
    assert counts["hierarchical"] == 15 * d + 15 * (d - 15) + (d - 30)  # rows, last cols, diagonal
    assert counts["lowrank"] == 16 * d + (d - 16)
    assert get_structure("dense").zeros(d, torch.bfloat16).nbytes() == 2 * d * d


def test_bfloat16_ops_stay_bfloat16_and_bad_options_raise():
    for name in STRUCTURES:
        K = get_structure(name).identity(12, torch.bfloat16)
        M = torch.randn(12, 3).to(torch.bfloat16)
        assert K.matmul(M).dtype == torch.bfloat16
        assert K.compose(K).dtype == torch.bfloat16
        assert get_structure(name).from_inner(M.T.contiguous()).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        get_structure("banded")
    with pytest.raises(ValueError):
        get_structure("block").zeros(4, block_size=0)
    with pytest.raises(ValueError):
        get_structure("diagonal").zeros(4, rank=2)
