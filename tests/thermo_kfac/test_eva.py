"""Eva: Sherman-Morrison against a dense solve, Kronecker vectors against the captured activations,
the KL-clipped step in closed form, preconditioner mode, state round trip, training, checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermo_kfac import Eva
from thermo_kfac.data import load_dataset
from thermo_kfac.eva import eva_precondition

D64 = torch.float64


def _dense_reference(grad, a, g, damping):
    """Solve (kron(g g^T, a a^T) + damping I) vec(X) = vec(grad) for row-major vec."""
    M = torch.kron(torch.outer(g, g), torch.outer(a, a)) + damping * torch.eye(grad.numel(), dtype=D64)
    return torch.linalg.solve(M, grad.reshape(-1)).reshape(grad.shape)


@pytest.mark.parametrize(("d_out", "d_in", "damping", "scale"),
                         [(3, 4, 0.03, 1.0), (5, 2, 1e-3, 10.0), (1, 6, 0.5, 0.1), (4, 4, 1e-4, 3.0)])
def test_sherman_morrison_equals_dense_damped_inverse(d_out, d_in, damping, scale):
    gen = torch.Generator().manual_seed(d_out * 10 + d_in)
    a = scale * torch.randn(d_in, generator=gen, dtype=D64)
    g = scale * torch.randn(d_out, generator=gen, dtype=D64)
    grad = torch.randn(d_out, d_in, generator=gen, dtype=D64)
    ours = eva_precondition(grad, a, g, damping)
    ref = _dense_reference(grad, a, g, damping)
    # the dense solve itself is accurate to about cond(M) * eps, cond(M) = 1 + |a|^2 |g|^2 / damping
    cond = 1 + float(a @ a * (g @ g)) / damping
    assert float((ours - ref).norm() / ref.norm()) < 1e-14 * cond + 1e-13
    M = torch.kron(torch.outer(g, g), torch.outer(a, a)) + damping * torch.eye(grad.numel(), dtype=D64)
    x = ours.reshape(-1)
    scale_of_terms = torch.linalg.matrix_norm(M, 2) * x.norm() + grad.norm()
    backward_error = (M @ x - grad.reshape(-1)).norm() / scale_of_terms
    assert float(backward_error) < 1e-14


def _batch(i, n=12, shape=(5,), classes=3):
    gen = torch.Generator().manual_seed(200 + i)
    return torch.randn(n, *shape, generator=gen, dtype=D64), torch.randint(0, classes, (n,), generator=gen)


def test_vectors_are_batch_means_with_ema():
    """a_bar / g_bar of a Conv2d and a Linear layer from the unfolded inputs and retained output
    gradients, over two steps of the EMA."""
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(2, 3, 3, padding=1).to(D64), nn.Linear(3 * 4 * 4, 3).to(D64)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin)
    xi = 0.7
    opt = Eva(model, lr=0.0, stat_decay=xi)
    ref_a, ref_g = {}, {}
    for t in range(2):
        x, y = _batch(t, shape=(2, 4, 4))
        opt.zero_grad()
        c = conv(x)
        c.retain_grad()
        hidden = model[2](model[1](c))
        out = lin(hidden)
        out.retain_grad()
        F.cross_entropy(out, y).backward()
        n = len(x)
        patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
        new = {"0": (torch.cat([patches.mean(0), torch.ones(1, dtype=D64)]),
                     n * c.grad.permute(0, 2, 3, 1).reshape(-1, 3).mean(0)),
               "3": (torch.cat([hidden.mean(0), torch.ones(1, dtype=D64)]).detach(), n * out.grad.mean(0))}
        for name, (a_new, g_new) in new.items():
            ref_a[name] = a_new if t == 0 else xi * ref_a[name] + (1 - xi) * a_new
            ref_g[name] = g_new if t == 0 else xi * ref_g[name] + (1 - xi) * g_new
        opt.step()
    for name, (a_bar, g_bar) in opt.vectors().items():
        torch.testing.assert_close(a_bar, ref_a[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_bar, ref_g[name], rtol=1e-12, atol=1e-14)


def _mlp(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(D64)


def _kl_clipped_reference(model, x, y, lr, damping, kappa):
    """Preconditioned, KL-clipped gradients per layer by dense solves (vectors of this batch)."""
    h0 = model[0](x)
    h0.retain_grad()
    h1 = model[1](h0)
    out = model[2](h1)
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    n = len(x)
    ones = torch.ones(1, dtype=D64)
    vecs = [(torch.cat([x.mean(0), ones]), n * h0.grad.mean(0)),
            (torch.cat([h1.detach().mean(0), ones]), n * out.grad.mean(0))]
    grads = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for m in (model[0], model[2])]
    precs = [_dense_reference(gr, a, g, damping) for gr, (a, g) in zip(grads, vecs, strict=True)]
    vg = sum(float((p * gr).sum()) for p, gr in zip(precs, grads, strict=True)) * lr ** 2
    nu = min(1.0, math.sqrt(kappa / vg))
    return [nu * p for p in precs], nu


def test_step_equals_kl_clipped_dense_preconditioned_sgd():
    model = _mlp()
    ref_model = copy.deepcopy(model)
    lr, damping, kappa = 0.3, 0.03, 1e-4
    opt = Eva(model, lr=lr, momentum=0.0, damping=damping, kl_clip=kappa)
    x, y = _batch(0)
    updates, nu = _kl_clipped_reference(ref_model, x, y, lr, damping, kappa)
    assert nu < 1.0  # the clip is active in this case
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.last_kl_scale == pytest.approx(nu, rel=1e-10)
    for idx, upd in zip((0, 2), updates, strict=True):
        ref = torch.cat([ref_model[idx].weight, ref_model[idx].bias[:, None]], 1).detach() - lr * upd
        got = torch.cat([model[idx].weight, model[idx].bias[:, None]], 1).detach()
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)


def test_preconditioner_mode_uses_the_given_optimizers_lr():
    model = _mlp()
    ref_model = copy.deepcopy(model)
    lr, kappa = 0.5, 1e-4
    eva = Eva(model, lr=123.0, damping=0.03, kl_clip=kappa)  # its own lr is not used here
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = _batch(1)
    updates, nu = _kl_clipped_reference(ref_model, x, y, lr, 0.03, kappa)
    F.cross_entropy(model(x), y).backward()
    assert eva.precondition(optimizer=sgd) == pytest.approx(nu, rel=1e-10)
    for idx, upd in zip((0, 2), updates, strict=True):
        got = torch.cat([model[idx].weight.grad, model[idx].bias.grad[:, None]], 1)
        torch.testing.assert_close(got, upd, rtol=1e-10, atol=1e-13)


def _train(model, opt, start, steps):
    for i in range(start, start + steps):
        x, y = _batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_state_dict_round_trip_continues_bitwise():
    model = _mlp()
    kwargs = {"lr": 0.1, "update_every": 2, "weight_decay": 1e-3, "stat_samples": 8}
    opt = Eva(model, **kwargs)
    _train(model, opt, 0, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, 4)
    model2 = _mlp()
    model2.load_state_dict(saved_model)
    opt2 = Eva(model2, **kwargs)
    opt2.load_state_dict(saved_opt)
    _train(model2, opt2, 3, 4)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="eva"):
        opt2.load_state_dict(torch.optim.SGD(model2.parameters(), lr=1.0).state_dict())


def test_trains_digits_mlp_with_paper_defaults():
    torch.manual_seed(0)
    data = load_dataset("digits")
    x, y = data.x_train.flatten(1), data.y_train
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = Eva(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        start = float(F.cross_entropy(model(x), y))
    for _ in range(30):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        end = float(F.cross_entropy(model(x), y))
    assert end < 0.5 * start, (start, end)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": -0.1}, "lr=-0.1"),
    ({"momentum": 1.0}, "momentum=1.0"),
    ({"damping": 0.0}, "damping=0.0"),
    ({"kl_clip": 0.0}, "kl_clip=0.0"),
    ({"stat_decay": 1.0}, "stat_decay=1.0"),
    ({"update_every": 0}, "update_every=0"),
    ({"stat_samples": 0}, "stat_samples=0"),
    ({"batch_averaged": 1}, "batch_averaged=1"),
])
def test_bad_hyperparameters_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Eva(nn.Linear(3, 2), **kwargs)


def test_bad_models_and_arguments():
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        Eva(nn.Sequential(nn.Tanh(), nn.LayerNorm(3)))
    with pytest.raises(ValueError, match="no nn.Linear"):
        Eva(nn.Linear(3, 2), skip=["Linear"])
    with pytest.raises(ValueError, match="damping=0"):
        eva_precondition(torch.ones(2, 2), torch.ones(2), torch.ones(2), 0.0)
    eva = Eva(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        eva.precondition(optimizer="sgd")
