"""Blocked symmetric Gram products (thermo_kfac.gram) against plain float64 products."""

from __future__ import annotations

import pytest
import torch

from thermo_kfac.gram import gram, gram_flops


@pytest.mark.parametrize("d", [1, 7, 64, 300])
@pytest.mark.parametrize("block", [1, 5, 64, 1000])
@pytest.mark.parametrize("append_ones", [False, True])
def test_equals_the_plain_product(d: int, block: int, append_ones: bool) -> None:
    gen = torch.Generator().manual_seed(d + block)
    x = torch.randn(50, d, generator=gen, dtype=torch.float64)
    rows = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1) if append_ones else x
    got = gram(x, append_ones=append_ones, block=block, min_blocked=1)
    torch.testing.assert_close(got, rows.T @ rows, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.T)  # mirrored: exactly symmetric
    plain = gram(x, append_ones=append_ones, min_blocked=10**6)
    torch.testing.assert_close(plain, rows.T @ rows, rtol=1e-12, atol=1e-12)


def test_strided_input_is_read_in_place_and_float32_accuracy() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(40, 900, generator=gen)
    x = base[:, ::2]  # non-contiguous columns
    got = gram(x, append_ones=True, block=100, min_blocked=1)
    ref = torch.cat([x.double(), torch.ones(40, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(got.double(), ref.T @ ref, rtol=1e-5, atol=1e-4)
    assert got.dtype == torch.float32


def test_flop_count_of_the_upper_block_triangle() -> None:
    # 4 blocks of 256 out of 1024 columns: (4 + 3 + 2 + 1) / 16 of the square's block products
    assert gram_flops(10, 1024, blocked=True, block=256) == pytest.approx(
        2 * 10 * 1024 * 1024 * 10 / 16)
    assert gram_flops(10, 1024, blocked=False) == 2 * 10 * 1024 * 1024


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="2-d"):
        gram(torch.zeros(3))
    with pytest.raises(ValueError, match="block"):
        gram(torch.zeros(3, 3), block=0)


def test_preconditioner_factors_unchanged_by_the_blocked_product() -> None:
    # a layer wide enough for the blocked path: A and G equal the plain products of the rows
    from torch import nn

    from thermo_kfac import KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(600, 520), nn.Tanh(), nn.Linear(520, 3)).double()
    precond = KFACPreconditioner(model, factor_decay=0.0, factor_dtype=torch.float64)
    x = torch.randn(64, 600, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    out = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        out["a"] = inputs[0].detach()
        output.register_hook(lambda g: out.update(g=g.detach()))

    model[0].register_forward_hook(hook)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    precond.step()
    A, G = precond.factors()["0"]
    rows = torch.cat([out["a"], torch.ones(64, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(A, rows.T @ rows / 64, rtol=1e-12, atol=1e-14)
    g = out["g"]  # gradients of the mean loss; the empirical factor weighs them by the batch size
    torch.testing.assert_close(G, 64 * g.T @ g, rtol=1e-10, atol=1e-14)
