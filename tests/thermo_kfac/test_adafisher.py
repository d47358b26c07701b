"""AdaFisher: factor diagonals against K-FAC's factors, the update in closed form, the norm-layer
rule against per-example autograd gradients, state round trip, training, argument checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermo_kfac import AdaFisher, KFACPreconditioner
from thermo_kfac.adafisher import min_max_normalize
from thermo_kfac.data import load_dataset

D64 = torch.float64


def _batch(i, n=16, shape=(5,), classes=3):
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, *shape, generator=gen, dtype=D64), torch.randint(0, classes, (n,), generator=gen)


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).to(D64)


def test_factor_diagonals_equal_diagonals_of_kfac_factors():
    """With raw statistics (no normalisation, EMA weight 1 on the new batch), H_D and S_D are the
    diagonals of KFACPreconditioner's A and G computed on the same batch (Conv2d and Linear)."""
    model = _conv_net()
    opt = AdaFisher(model, lr=0.0, gamma=0.0, normalize=False, update_every=1)
    kfac = KFACPreconditioner(model, factor_decay=0.0, factor_update_every=1, inverse_update_every=1,
                              factor_dtype=D64)
    x, y = _batch(0, shape=(2, 5, 5))
    F.cross_entropy(model(x), y).backward()
    opt.step()  # lr = 0: parameters and gradients untouched
    kfac.step()
    ours, ref = opt.factors(), kfac.factors()
    assert set(ours) == set(ref) == {"0", "3", "5"}
    for name, (A, G) in ref.items():
        H, S = ours[name]
        torch.testing.assert_close(H, torch.diagonal(A), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(S, torch.diagonal(G), rtol=1e-12, atol=1e-14)


def test_update_matches_closed_form_over_two_steps():
    """Two steps of a Linear(3, 2) layer, reference-code EMA, min-max normalisation, bias correction
    and momentum, all recomputed by hand from the inputs and the output gradients."""
    torch.manual_seed(1)
    layer = nn.Linear(3, 2).to(D64)
    lr, beta, lam, (g1, g2) = 0.05, 0.8, 1e-3, (0.92, 0.008)
    opt = AdaFisher(layer, lr=lr, beta=beta, damping=lam, gamma=(g1, g2), update_every=1)
    theta = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).clone()
    H, S, m = torch.ones(4, dtype=D64), torch.ones(2, dtype=D64), torch.zeros(2, 4, dtype=D64)
    for t in (1, 2):
        x, y = _batch(t, n=8, shape=(3,), classes=2)
        opt.zero_grad()
        out = layer(x)
        out.retain_grad()
        F.cross_entropy(out, y).backward()
        a = torch.cat([x, torch.ones(8, 1, dtype=D64)], 1)
        h_new, s_new = (a ** 2).mean(0), 8 * (out.grad ** 2).sum(0)
        H = (1 - g1) * H + g2 * (h_new - h_new.min()) / (h_new.max() - h_new.min() + 1e-12)
        S = (1 - g1) * S + g2 * (s_new - s_new.min()) / (s_new.max() - s_new.min() + 1e-12)
        grad = out.grad.T @ a  # [dW | db]
        m = beta * m + (1 - beta) * grad
        theta = theta - lr / (1 - beta ** t) * m / (S[:, None] * H[None, :] + lam)
        opt.step()
        got = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
        torch.testing.assert_close(got, theta, rtol=1e-12, atol=1e-14)


def test_min_max_normalize_maps_to_unit_interval():
    x = torch.tensor([3.0, 5.0, 4.0], dtype=D64)
    torch.testing.assert_close(min_max_normalize(x), torch.tensor([0.0, 1.0, 0.5], dtype=D64))


def test_layernorm_rule_equals_per_example_empirical_fisher():
    """LayerNorm: F = mean over examples of the squared per-example gradients (autograd, one example
    at a time), scaled as for a batch-mean loss."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(D64)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    opt = AdaFisher(model, lr=0.0, gamma=0.0, normalize=False, update_every=1)
    x, y = _batch(3, n=10)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    per_example = []
    for n in range(len(x)):
        gw, gb = torch.autograd.grad(F.cross_entropy(model(x[n:n + 1]), y[n:n + 1]),
                                     [model[1].weight, model[1].bias])
        per_example.append(torch.cat([gw, gb]))
    ref = (torch.stack(per_example) ** 2).mean(0)
    torch.testing.assert_close(opt.norm_fisher()["1"], ref, rtol=1e-10, atol=1e-14)
    assert opt.layers == ["0", "1", "3"]


def test_batchnorm_rule_from_batch_normalised_inputs():
    """BatchNorm2d: example n's share of the weight gradient is sum_positions g * x_hat (x_hat from
    torch's own batch_norm); the shares add up to autograd's gradient and F = N sum_n share^2."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 3)).to(D64)
    opt = AdaFisher(model, lr=0.0, gamma=0.0, normalize=False, update_every=1)
    x, y = _batch(4, n=6, shape=(2, 5, 5))
    conv_out = model[0](x)
    bn_out = model[1](conv_out)
    bn_out.retain_grad()
    F.cross_entropy(model[4](model[3](model[2](bn_out))), y).backward()
    opt.step()
    x_hat = F.batch_norm(conv_out.detach(), None, None, training=True, eps=model[1].eps)
    u = (bn_out.grad * x_hat).sum((2, 3))
    v = bn_out.grad.sum((2, 3))
    torch.testing.assert_close(u.sum(0), model[1].weight.grad)
    torch.testing.assert_close(v.sum(0), model[1].bias.grad)
    ref = 6 * torch.cat([(u ** 2).sum(0), (v ** 2).sum(0)])
    torch.testing.assert_close(opt.norm_fisher()["1"], ref, rtol=1e-10, atol=1e-14)


def test_other_parameters_get_bias_corrected_momentum():
    """A parameter outside the supported layers (here an Embedding) moves by lr * m_hat."""
    torch.manual_seed(4)
    emb, head = nn.Embedding(7, 4).to(D64), nn.Linear(4, 3).to(D64)
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = AdaFisher(model, lr=0.1, beta=0.9, update_every=1)
    assert opt.layers == ["head"]
    idx, y = torch.tensor([1, 3, 3, 6]), torch.tensor([0, 2, 1, 0])
    before = emb.weight.detach().clone()
    F.cross_entropy(head(emb(idx)), y).backward()
    grad = emb.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(emb.weight.detach(), before - 0.1 * grad)  # m_hat = grad at t = 1


def test_preconditioner_mode_divides_gradient_by_fisher():
    model = _conv_net()
    af = AdaFisher(model, update_every=1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch(5, shape=(2, 5, 5))
    F.cross_entropy(model(x), y).backward()
    raw = {p: p.grad.clone() for p in model.parameters()}
    af.precondition()
    fisher = af.fisher_diagonals()
    assert len(fisher) == len(list(model.parameters()))
    for p in model.parameters():
        torch.testing.assert_close(p.grad, raw[p] / fisher[p])
    sgd.step()
    assert af.steps == 1


def _train_steps(model, opt, steps, start):
    for i in range(start, start + steps):
        x, y = _batch(i, shape=(2, 5, 5))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_state_dict_round_trip_continues_bitwise():
    model = _conv_net()
    opt = AdaFisher(model, lr=1e-2, update_every=2, weight_decay=1e-3, decoupled_weight_decay=True)
    _train_steps(model, opt, 3, 0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train_steps(model, opt, 4, 3)
    model2 = _conv_net()
    model2.load_state_dict(saved_model)
    opt2 = AdaFisher(model2, lr=1e-2, update_every=2, weight_decay=1e-3, decoupled_weight_decay=True)
    opt2.load_state_dict(saved_opt)
    _train_steps(model2, opt2, 4, 3)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    for name, (H, S) in opt.factors().items():
        assert torch.equal(H, opt2.factors()[name][0]) and torch.equal(S, opt2.factors()[name][1])


def _digits_losses(make_opt, steps=30, mode="optimizer"):
    torch.manual_seed(0)
    data = load_dataset("digits")
    x, y = data.x_train.flatten(1), data.y_train
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt, base = make_opt(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        start = float(F.cross_entropy(model(x), y))
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        if base is None:
            opt.step()
        else:
            opt.precondition()
            base.step()
    with torch.no_grad():
        return start, float(F.cross_entropy(model(x), y))


def test_trains_digits_mlp_with_paper_defaults():
    start, end = _digits_losses(lambda m: (AdaFisher(m), None), steps=40)
    assert end < 0.5 * start, (start, end)


def test_preconditioner_mode_trains_digits_with_sgd():
    def make(m):
        af = AdaFisher(m, update_every=1)
        # SGD momentum sums gradients (no 1 - beta factor): lr 1e-4 matches AdaFisher lr 1e-3
        return af, torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
    start, end = _digits_losses(make)
    assert end < 0.5 * start, (start, end)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": -1.0}, "lr=-1.0"),
    ({"beta": 1.0}, "beta=1.0"),
    ({"gamma": 1.0}, "gamma=1.0"),
    ({"gamma": (0.0, 0.5)}, r"gamma\[0\]=0.0"),
    ({"gamma": (0.5, 0.5, 0.5)}, "gamma="),
    ({"damping": 0.0}, "damping=0.0 is out of range"),
    ({"update_every": 0}, "update_every=0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ({"normalize": "yes"}, "normalize='yes'"),
    ({"skip": "("}, "skip="),
])
def test_bad_hyperparameters_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaFisher(nn.Linear(3, 2), **kwargs)


def test_bad_model_and_silent_layers_are_reported():
    with pytest.raises(ValueError, match="torch.nn.Module"):
        AdaFisher("not a model")

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return F.linear(x, self.lin.weight, self.lin.bias)  # bypasses the layer's hooks

    model = Functional()
    opt = AdaFisher(model)
    F.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    with pytest.raises(RuntimeError, match="'lin'.*skip"):
        opt.step()
    AdaFisher(model, skip="lin").step()  # skipped: F = 1, no error


def test_training_specs_build_adafisher_and_eva():
    from thermo_kfac import Eva
    from thermo_kfac.experiments.training import (
        build_optimizer,
        compare,
        parse_optimizer_spec,
        resolve_options,
    )

    spec = parse_optimizer_spec("adafisher:lr=2e-3,update_every=1,gamma1=0.5,decoupled_weight_decay=true")
    options = resolve_options(spec, {"damping": 0.01, "solver": "eigh"})  # solver: kfac only, ignored
    opt, precond = build_optimizer(spec, nn.Linear(3, 2), options, "cross_entropy")
    assert isinstance(opt, AdaFisher) and precond is None
    assert (opt.defaults["lr"], opt.update_every, opt.damping) == (2e-3, 1, 0.01)
    assert (opt.gamma_keep, opt.gamma_new, opt.decoupled_weight_decay) == (0.5, 0.008, True)
    spec = parse_optimizer_spec("eva:kl_clip=none,stat_decay=0.9")
    opt, _ = build_optimizer(spec, nn.Linear(3, 2), resolve_options(spec), "cross_entropy")
    assert isinstance(opt, Eva) and opt.kl_clip is None and opt.stat_decay == 0.9 and opt.damping == 0.03
    with pytest.raises(ValueError, match="gamma1=0.0"):
        parse_optimizer_spec("adafisher:gamma1=0")
    with pytest.raises(ValueError, match="eva has no option 'beta'"):
        parse_optimizer_spec("eva:beta=0.9")
    data = load_dataset("digits", max_train=128)
    results = compare(data, "mlp", ["adafisher:update_every=1", "eva"], steps=3, batch_size=32)
    assert [r["steps"] for r in results["runs"]] == [3, 3]
    assert all(not r["diverged"] for r in results["runs"])
