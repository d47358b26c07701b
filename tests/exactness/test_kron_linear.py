"""KronLinear (weight A (x) B) and its K-FAC factors against the exact GGN blocks from torch.func.

The layer computes ``P = A X`` (A at the n2 columns of X) and then ``Y = P B^T`` (B at the m1 rows
of P). With an MSE loss on ``Y`` and type-2 factors:

* the B block is exact (the loss is elementwise on B's outputs, so the positions do not couple);
* the A block couples its positions through ``B^T B``: exact when ``B^T B = beta I`` (B with
  orthogonal columns of equal norm), not otherwise.

References: Jacobians of the model output w.r.t. the row-major factor and the Hessian of the loss
w.r.t. the outputs, both by autograd (float64); never the preconditioner.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from thermo_kfac import KFACPreconditioner
from thermo_kfac.models import KronLinear


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _exact_ggn(model: nn.Module, param: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = dict(model.named_parameters())

    def f(w):
        return functional_call(model, {**params, param: w}, (x,)).reshape(-1)

    J = jacrev(f)(params[param].detach()).reshape(-1, params[param].numel())
    out = model(x).detach()
    H = hessian(lambda o: F.mse_loss(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ H @ J


def _factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    precond = KFACPreconditioner(model, loss="mse", fisher_type="type2", factor_decay=0.0,
                                 factor_dtype=torch.float64)
    out = model(x)
    precond.accumulate_curvature(out)
    F.mse_loss(out, y).backward()
    precond.step()
    return precond.factors()


def _model(orthogonal_b: bool) -> nn.Sequential:
    torch.manual_seed(0)
    kron = KronLinear((3, 2), (4, 3))  # 6 -> 12 features
    if orthogonal_b:
        q, _ = torch.linalg.qr(torch.randn(4, 3))
        with torch.no_grad():
            kron.B.copy_(1.7 * q)  # B^T B = 1.7^2 I
    return nn.Sequential(nn.Linear(5, 6), kron)


def test_forward_equals_the_dense_kronecker_weight_and_gradients_match():
    torch.manual_seed(1)
    layer = KronLinear((3, 2), (4, 5))
    x = torch.randn(7, 2, 10)  # leading dims are kept
    dense = torch.kron(layer.A, layer.B)
    torch.testing.assert_close(layer(x), F.linear(x, dense, layer.bias))
    torch.testing.assert_close(layer.dense_weight(), dense)
    # grad of the factors = the chain rule through the dense weight, by autograd
    layer(x).square().sum().backward()
    A, B = layer.A.detach().requires_grad_(), layer.B.detach().requires_grad_()
    F.linear(x, torch.kron(A, B), layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.A.grad, A.grad)
    torch.testing.assert_close(layer.B.grad, B.grad)


def test_kronecker_adapter_starts_at_the_frozen_base_and_is_registered():
    torch.manual_seed(2)
    base = nn.Linear(6, 12)
    model = nn.Sequential(KronLinear((3, 2), (4, 3), base=base, scale=0.5), nn.Tanh(), nn.Linear(12, 2))
    x = torch.randn(4, 6)
    torch.testing.assert_close(model[0](x), base(x))  # B = 0 at the start
    assert not base.weight.requires_grad and not base.bias.requires_grad
    precond = KFACPreconditioner(model, loss="mse")
    assert sorted(precond.layers) == ["0.A", "0.B", "2"]  # the frozen base is not registered
    assert KFACPreconditioner(model, loss="mse", skip=[r"^0$"]).layers == ["2"]  # skip= applies
    with torch.no_grad():
        model[0].B.normal_()
    torch.testing.assert_close(model[0](x), base(x) + 0.5 * F.linear(x, torch.kron(model[0].A, model[0].B)))
    with pytest.raises(ValueError, match="does not match"):
        KronLinear((3, 2), (4, 3), base=nn.Linear(5, 12))
    with pytest.raises(ValueError, match="a_shape"):
        KronLinear((3,), (4, 3))


@pytest.mark.parametrize("orthogonal_b", [True, False])
def test_kron_linear_factors_equal_the_exact_ggn_blocks_where_exact(orthogonal_b):
    model = _model(orthogonal_b)
    torch.manual_seed(3)
    x, y = torch.randn(6, 5), torch.randn(6, 12)
    factors = _factors(model, x, y)
    assert set(factors) == {"0", "1.A", "1.B"}
    for layer in ("1.B", "1.A"):  # "0", the Linear before, is covered by the deep-linear tests
        A, G = factors[layer]
        exact = _exact_ggn(model, layer, x, y)
        if layer == "1.A" and not orthogonal_b:
            # B^T B != beta I couples A's positions: K-FAC-expand is an approximation here
            assert not torch.allclose(torch.kron(G, A), exact, rtol=1e-3)
            continue
        torch.testing.assert_close(torch.kron(G, A), exact, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(torch.kron(A, G), exact, rtol=1e-3)  # the test discriminates


def test_kfac_trains_a_kron_linear_model():
    torch.manual_seed(4)
    teacher = torch.kron(torch.randn(3, 2), torch.randn(4, 3))  # reachable by A (x) B
    model = nn.Sequential(KronLinear((3, 2), (4, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = KFACPreconditioner(model, loss="mse", optimizer=opt, damping=1e-2, inverse_update_every=5)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x = torch.randn(32, 6, generator=gen)
        opt.zero_grad()
        loss = F.mse_loss(model(x), x @ teacher.T)
        loss.backward()
        precond.step()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
