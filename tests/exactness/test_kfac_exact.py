"""K-FAC factors against curvature computed independently with torch.func (float64).

References are built from Jacobians of the model output w.r.t. each layer's ``[W | b]`` (row-major)
and the Hessian of the loss w.r.t. the outputs, both by autograd, never from the preconditioner.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from thermo_kfac import KFACPreconditioner


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _loss_fn(loss: str, reduction: str):
    if loss == "mse":
        return lambda out, y: F.mse_loss(out, y, reduction=reduction)
    if loss == "bce":
        return lambda out, y: F.binary_cross_entropy_with_logits(out, y, reduction=reduction)
    return lambda out, y: F.cross_entropy(out, y, reduction=reduction)


def _layer_jacobian(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """d vec(output) / d vec_rowmajor([W | b]) of one Linear layer: (out_numel, d_out*(d_in+1))."""
    params = dict(model.named_parameters())
    w_name, b_name = f"{layer}.weight", f"{layer}.bias"

    def f(w, b):
        return functional_call(model, {**params, w_name: w, b_name: b}, (x,)).reshape(-1)

    jw, jb = jacrev(f, argnums=(0, 1))(params[w_name], params[b_name])
    d_out = params[w_name].shape[0]
    jw = jw.reshape(-1, d_out, params[w_name][0].numel())
    return torch.cat([jw, jb.reshape(-1, d_out, 1)], dim=2).reshape(jw.shape[0], -1)


def _exact_ggn_block(model, layer, x, y, loss_fn) -> torch.Tensor:
    out = model(x).detach()
    J = _layer_jacobian(model, layer, x)
    H = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ H @ J


def _deep_linear(dims, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)])


def _kfac_factors(model, x, y, loss, reduction, fisher_type, **kw):
    precond = KFACPreconditioner(model, loss=loss, reduction=reduction, fisher_type=fisher_type,
                                 factor_decay=0.0, factor_dtype=torch.float64, **kw)
    model.zero_grad()
    out = model(x)
    precond.accumulate_curvature(out)
    _loss_fn(loss, reduction)(out, y).backward()
    precond.step()
    return precond.factors()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("leading", [(), (3,)], ids=["NxD", "NxRxD"])
def test_type2_equals_exact_ggn_on_deep_linear_mse(reduction, leading):
    dims = [5, 4, 3, 2]
    model = _deep_linear(dims)
    torch.manual_seed(1)
    x = torch.randn(6, *leading, dims[0])
    y = torch.randn(6, *leading, dims[-1])
    factors = _kfac_factors(model, x, y, "mse", reduction, "type2")
    assert set(factors) == {"0", "1", "2"}
    for layer, (A, G) in factors.items():
        exact = _exact_ggn_block(model, layer, x, y, _loss_fn("mse", reduction))
        torch.testing.assert_close(torch.kron(G, A), exact, rtol=1e-10, atol=1e-12)
        # the test discriminates: the transposed ordering or a scaled G would not match
        assert not torch.allclose(torch.kron(A, G), exact, rtol=1e-3)
        assert not torch.allclose(torch.kron(2 * G, A), exact, rtol=1e-3)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_type2_equals_exact_ggn_single_example(loss):
    """For one example K-FAC's block is exact for any network; type2 must equal the GGN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(1, 4)
    y = torch.tensor([2]) if loss == "cross_entropy" else torch.rand(1, 3)
    factors = _kfac_factors(model, x, y, loss, "mean", "type2")
    for layer, (A, G) in factors.items():
        exact = _exact_ggn_block(model, layer, x, y, _loss_fn(loss, "mean"))
        torch.testing.assert_close(torch.kron(G, A), exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_empirical_single_example_equals_exact_empirical_fisher(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(1, 4)
    if loss == "cross_entropy":
        y = torch.tensor([1])
    elif loss == "mse":
        y = torch.randn(1, 3)
    else:
        y = torch.rand(1, 3)
    factors = _kfac_factors(model, x, y, loss, "mean", "empirical")
    # L = c * l with l the per-example negative log-likelihood; EF of L = c * grad(l) grad(l)^T
    c = 1.0 if loss == "cross_entropy" else 1.0 / 3
    for layer, (A, G) in factors.items():
        mod = dict(model.named_modules())[layer]
        model.zero_grad()
        (_loss_fn(loss, "mean")(model(x), y) / c).backward()
        grad_l = torch.cat([mod.weight.grad, mod.bias.grad[:, None]], dim=1).reshape(-1)
        exact = c * torch.outer(grad_l, grad_l)
        torch.testing.assert_close(torch.kron(G, A), exact, rtol=1e-10, atol=1e-12)


def test_mc_fisher_converges_to_exact_fisher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(1, 3)
    y = torch.tensor([0])
    exact = _exact_ggn_block(model, "2", x, y, _loss_fn("cross_entropy", "mean"))
    errors = {}
    for samples in (16, 256, 4096):
        A, G = _kfac_factors(model, x, y, "cross_entropy", "mean", "mc",
                             mc_samples=samples, seed=3)["2"]
        errors[samples] = float((torch.kron(G, A) - exact).norm() / exact.norm())
    # Monte Carlo: the error falls like samples^-1/2; allow generous slack per 16x step (4x ideal)
    assert errors[4096] < 0.08
    assert errors[4096] < errors[256] < errors[16]


def test_mc_fisher_unbiased_for_a_batch():
    """For N > 1 the MC estimate's mean equals the type2 (exact-GGN) G factor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
    x = torch.randn(8, 3)
    y = torch.randint(0, 4, (8,))
    _, G_exact = _kfac_factors(model, x, y, "cross_entropy", "mean", "type2")["0"]
    _, G_mc = _kfac_factors(model, x, y, "cross_entropy", "mean", "mc", mc_samples=3000, seed=1)["0"]
    assert float((G_mc - G_exact).norm() / G_exact.norm()) < 0.06


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv2d_factors_equal_unfold_linear(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(4, 2, 7, 7)
    y = torch.randint(0, 5, (4,))
    h_out = conv(x).shape[-1]
    head_in = 3 * h_out * h_out

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv
            self.head = nn.Linear(head_in, 5)

        def forward(self, inp):
            return self.head(torch.tanh(self.conv(inp)).flatten(1))

    class UnfoldNet(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.lin = nn.Linear(2 * 9, 3)
            self.lin.weight.data.copy_(conv.weight.data.reshape(3, -1))
            self.lin.bias.data.copy_(conv.bias.data)
            self.head = head

        def forward(self, inp):
            patches = F.unfold(inp, 3, dilation=dilation, padding=padding, stride=stride)
            s = self.lin(patches.transpose(1, 2))  # (N, L, C_out)
            s = s.transpose(1, 2).reshape(inp.shape[0], 3, h_out, h_out)
            return self.head(torch.tanh(s).flatten(1))

    conv_net = ConvNet()
    unfold_net = UnfoldNet(conv_net.head)
    for fisher in ("empirical", "type2"):
        A_c, G_c = _kfac_factors(conv_net, x, y, "cross_entropy", "mean", fisher)["conv"]
        A_l, G_l = _kfac_factors(unfold_net, x, y, "cross_entropy", "mean", fisher)["lin"]
        torch.testing.assert_close(A_c, A_l, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(G_c, G_l, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver,options", [("eigh", {}), ("cholesky", {}),
                                            ("eigh", {"exact_damping": True})])
@pytest.mark.parametrize("pi_damping", [False, True])
def test_preconditioned_gradient_equals_dense_kronecker_solve(solver, options, pi_damping):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    damping = 0.05
    precond = KFACPreconditioner(model, damping=damping, pi_damping=pi_damping, solver=solver,
                                 solver_options=options, factor_decay=0.0,
                                 factor_dtype=torch.float64)
    F.cross_entropy(model(x), y).backward()
    raw = {n: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone()
           for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    precond.step()
    for name, (A, G) in precond.factors().items():
        m = dict(model.named_modules())[name]
        if options.get("exact_damping"):
            if pi_damping:
                continue  # exact damping ignores the split, nothing new to check
            K = torch.kron(G, A) + damping * torch.eye(A.shape[0] * G.shape[0])
        else:
            # independent computation of the factored damping
            pi = (torch.trace(A) / A.shape[0] / (torch.trace(G) / G.shape[0])).sqrt() \
                if pi_damping else torch.tensor(1.0)
            gamma = damping ** 0.5
            K = torch.kron(G + gamma / pi * torch.eye(G.shape[0]),
                           A + gamma * pi * torch.eye(A.shape[0]))
        expected = torch.linalg.solve(K, raw[name].reshape(-1)).reshape(raw[name].shape)
        got = torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
