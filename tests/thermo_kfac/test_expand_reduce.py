"""K-FAC-expand and K-FAC-reduce (Eschenhagen et al., NeurIPS 2023) against the exact GGN.

For deep linear networks with weight sharing and MSE, expand is exact in the expand setting (a
loss term per position) and reduce is exact in the reduce setting (a loss on the per-example mean
over positions). The exact GGN block ``2 c J^T J`` of ``[W | b]`` (row-major) comes from autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from thermo_kfac import KFACPreconditioner
from thermo_kfac.capture import Conv2dAdapter

DT = torch.float64


class ChannelsLast(nn.Module):
    """Expand setting for a conv net: MSE's feature dim is the last one, so output (N, H, W, C)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).permute(0, 2, 3, 1)


class MeanOverPositions(nn.Module):
    """Reduce setting: the per-example output is the mean over the R positions."""

    def __init__(self, net: nn.Module, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.net, self.dims = net, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=self.dims)


def _exact_ggn_blocks(model: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """``2 c J^T J`` per layer for ``mse_loss(model(x), y)`` (mean over all c^-1 elements)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = model(x)
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    c = 1.0 / out.numel()
    blocks = {}
    for name in layers:
        jw = jac[f"{name}.weight"].reshape(out.numel(), params[f"{name}.weight"].shape[0], -1)
        jb = jac[f"{name}.bias"].reshape(out.numel(), -1, 1)
        j = torch.cat([jw, jb], dim=2).reshape(out.numel(), -1)  # row-major [W | b]
        blocks[name] = 2.0 * c * j.T @ j
    return blocks


def _kfac_blocks(model: nn.Module, x: torch.Tensor, approx: str) -> dict[str, torch.Tensor]:
    precond = KFACPreconditioner(model, loss="mse", fisher_type="type2", factor_decay=0.0,
                                 factor_dtype=DT, kfac_approx=approx)
    out = model(x)
    precond.accumulate_curvature(out)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    precond.step()
    precond.remove_hooks()
    return {name: torch.kron(G, A) for name, (A, G) in precond.factors().items()}


def _deep_linear(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)).to(DT)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("setting", ["expand", "reduce"])
def test_deep_linear_network_flavour_is_exact_in_its_own_setting(setting):
    net = _deep_linear(0)
    model = net if setting == "expand" else MeanOverPositions(net, (1,))
    x = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=DT)  # N=4, R=3
    prefix = "" if setting == "expand" else "net."
    layers = [f"{prefix}{i}" for i in range(3)]
    exact = _exact_ggn_blocks(model, x, layers)
    matching = _kfac_blocks(model, x, setting)
    other = _kfac_blocks(model, x, "reduce" if setting == "expand" else "expand")
    for name in layers:
        torch.testing.assert_close(matching[name], exact[name], rtol=1e-9, atol=1e-12)
        # the other flavour is a genuinely different (inexact) approximation here
        assert _rel(other[name], exact[name]) > 1e-2, name


def test_flavours_coincide_without_weight_sharing():
    """R = 1 (plain (N, d) inputs): expand and reduce are the same K-FAC."""
    model = _deep_linear(2)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    expand, reduce = _kfac_blocks(model, x, "expand"), _kfac_blocks(model, x, "reduce")
    for name in expand:
        torch.testing.assert_close(expand[name], reduce[name])


@pytest.mark.parametrize("setting", ["expand", "reduce"])
def test_linear_conv_network_flavour_is_exact_in_its_own_setting(setting):
    """Conv2d (stride 2, padding, dilation) followed by a 1x1 conv: positions are the shared dim."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1),
                        nn.Conv2d(3, 2, 1)).to(DT)
    model = ChannelsLast(net) if setting == "expand" else MeanOverPositions(net, (2, 3))
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(5), dtype=DT)
    prefix = "net."
    layers = [f"{prefix}0", f"{prefix}1"]
    exact = _exact_ggn_blocks(model, x, layers)
    matching = _kfac_blocks(model, x, setting)
    other = _kfac_blocks(model, x, "reduce" if setting == "expand" else "expand")
    for name in layers:
        torch.testing.assert_close(matching[name], exact[name], rtol=1e-9, atol=1e-12)
        assert _rel(other[name], exact[name]) > 1e-2, name


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), (3, 1, 2)])
def test_averaged_patches_equal_the_mean_of_unfolded_patches(stride, padding, dilation):
    conv = nn.Conv2d(2, 3, (3, 2), stride=stride, padding=padding, dilation=dilation).to(DT)
    x = torch.randn(4, 2, 9, 8, generator=torch.Generator().manual_seed(6), dtype=DT)
    reduce = Conv2dAdapter("c", conv, "reduce").input_rows(x)
    expand = Conv2dAdapter("c", conv, "expand").input_rows(x)
    expected = expand.reshape(4, -1, expand.shape[1]).mean(dim=1)
    torch.testing.assert_close(reduce, expected)


def test_approx_per_layer_overrides_the_global_flavour():
    model = _deep_linear(7)
    x = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(8), dtype=DT)
    mixed = KFACPreconditioner(model, loss="mse", factor_decay=0.0, factor_dtype=DT,
                               kfac_approx="expand", approx_per_layer={r"^2$": "reduce"})
    assert [s.adapter.approx for s in mixed.layer_table.values()] == ["expand", "expand", "reduce"]
    out = model(x)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    mixed.step()
    mixed.remove_hooks()
    a_last = mixed.factors()["2"][0]
    h = model[1](model[0](x)).detach()
    hbar = torch.cat([h.mean(dim=1), torch.ones(4, 1, dtype=DT)], dim=1)
    torch.testing.assert_close(a_last, hbar.T @ hbar / 4)  # reduce: per-example means, 1/N


def test_bad_flavour_names_are_rejected():
    model = _deep_linear(0)
    with pytest.raises(ValueError, match="kfac_approx"):
        KFACPreconditioner(model, kfac_approx="mean")
    with pytest.raises(ValueError, match="approx_per_layer"):
        KFACPreconditioner(model, approx_per_layer={"0": "sum"})
