"""thermo_kfac.chain: J v of chain models against torch.func, and which models are chains."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jvp

from thermo_kfac import KFAC, quadratic
from thermo_kfac.chain import chain_jvp, linear_chain
from thermo_kfac.models import MLP, AutoEncoder, SmallCNN


def _chains() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 3, bias=False))
    frozen[0].bias.requires_grad_(False)
    return {
        "tanh": nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)),
        "relu+identity": nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Identity(), nn.Linear(7, 3)),
        "sigmoid, no bias, frozen bias": frozen,
        "mlp with flatten": MLP(12, 3, widths=(8, 6), activation="relu"),
        "nested autoencoder": AutoEncoder(5, widths=(4, 2), activation="sigmoid"),
    }


def _inputs(name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = (9, 3, 4) if name == "mlp with flatten" else (9, 5)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", list(_chains()))
def test_chain_jvp_equals_torch_func(name: str) -> None:
    model = _chains()[name].double()
    links = linear_chain(model)
    assert links is not None
    x = _inputs(name)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(2)
    tangents = {n: torch.randn(3, *params[n].shape, generator=gen, dtype=torch.float64) for n in names}
    out, jv = chain_jvp(links, x, tangents)
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)
    for i in range(3):
        def f(*ps: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(model, {**params, **dict(zip(names, ps, strict=True))},
                                              (x,))
        _, ref = jvp(f, tuple(params[n].detach() for n in names),
                     tuple(tangents[n][i] for n in names))
        torch.testing.assert_close(jv[i], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "mse"])
def test_kfac_fast_path_products_equal_the_torch_func_path(loss: str) -> None:
    model = MLP(5, 3, widths=(7,), activation="tanh").double()
    x = _inputs("tanh")
    opt = KFAC(model, loss=loss, curvature_examples=6)
    assert opt.chain is not None
    gen = torch.Generator().manual_seed(3)
    vectors = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in opt.params]
               for _ in range(2)]
    run = quadratic.forward_function(model, model, x, None)
    fast = opt.curvature_products(run, torch.zeros(9), vectors)
    sub = quadratic.forward_function(model, model, x[:6], None)  # curvature_examples=6
    slow = quadratic.curvature_products(sub, opt._names, opt.params, loss, vectors)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-14)
    opt.chain = None  # forced torch.func path: the same numbers
    torch.testing.assert_close(opt.curvature_products(run, torch.zeros(9), vectors), slow,
                               rtol=1e-12, atol=1e-14)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + x


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.a(y)


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


@pytest.mark.parametrize("model", [
    _Residual(), _TwoInputs(), SmallCNN((1, 8, 8), 3, channels=(2,), hidden=4),
    nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2)),
    nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)),
], ids=["residual", "two inputs", "cnn", "dropout", "gelu"])
def test_models_that_are_not_chains_use_torch_func(model: nn.Module) -> None:
    assert linear_chain(model) is None
    assert KFAC(model, loss="mse").chain is None


def test_a_trained_parameter_outside_the_linear_layers_disables_the_chain() -> None:
    model = _Unused()
    assert linear_chain(model) is not None  # the graph is a chain, but `scale` is trained
    assert KFAC(model, loss="mse").chain is None
