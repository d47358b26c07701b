"""K-FAC for the recurrent layer (weight sharing over time) against independent references: the GGN
block from torch.func where the Kronecker block is exact (one step of a linear RNN), the expand
statistics over time steps computed here otherwise, nn.RNN's forward, and training on digits read
row by row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from thermo_kfac import KFACPreconditioner
from thermo_kfac.data import load_dataset
from thermo_kfac.models import RecurrentLayer, build_model


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class _Wrap(nn.Module):
    def __init__(self, rnn: RecurrentLayer, h0: torch.Tensor | None) -> None:
        super().__init__()
        self.rnn, self.h0 = rnn, h0

    def forward(self, x):
        return self.rnn(x, self.h0).flatten(1)


def _ggn(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GGN block of the row-major ``[W | b]`` made of the named parameters (MSE, mean)."""
    params = dict(model.named_parameters())

    def f(*ws):
        return functional_call(model, {**params, **dict(zip(names, ws, strict=True))}, (x,)).reshape(-1)

    jac = jacrev(f, argnums=tuple(range(len(names))))(*(params[n].detach() for n in names))
    d_out = params[names[0]].shape[0]
    J = torch.cat([j.reshape(-1, d_out, params[n][0].numel() if params[n].dim() > 1 else 1)
                   for j, n in zip(jac, names, strict=True)], dim=2).reshape(len(jac[0]), -1)
    out = model(x).detach()
    H = hessian(lambda o: F.mse_loss(o.reshape(out.shape), y))(out.reshape(-1))
    return J.T @ H @ J


def _factors(model, x, y, fisher_type="type2"):
    precond = KFACPreconditioner(model, loss="mse", fisher_type=fisher_type, factor_decay=0.0,
                                 factor_dtype=torch.float64)
    out = model(x)
    precond.accumulate_curvature(out)
    F.mse_loss(out, y).backward()
    precond.step()
    return precond.factors()


def test_forward_equals_torch_rnn():
    torch.manual_seed(0)
    ours = RecurrentLayer(3, 5)
    ref = nn.RNN(3, 5, batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(ours.weight_ih)
        ref.weight_hh_l0.copy_(ours.weight_hh)
        ref.bias_ih_l0.copy_(ours.bias)
        ref.bias_hh_l0.zero_()
    x, h0 = torch.randn(4, 6, 3), torch.randn(4, 5)
    torch.testing.assert_close(ours(x, h0), ref(x, h0[None])[0])
    torch.testing.assert_close(ours(x), ref(x)[0])


def test_one_step_of_a_linear_rnn_is_exact():
    torch.manual_seed(1)
    rnn = RecurrentLayer(3, 4, nonlinearity="linear")
    model = _Wrap(rnn, torch.randn(6, 4))
    x, y = torch.randn(6, 1, 3), torch.randn(6, 4)
    factors = _factors(model, x, y)
    assert set(factors) == {"rnn.ih", "rnn.hh"}
    for layer, names in (("rnn.ih", ["rnn.weight_ih", "rnn.bias"]), ("rnn.hh", ["rnn.weight_hh"])):
        A, G = factors[layer]
        exact = _ggn(model, names, x, y)
        torch.testing.assert_close(torch.kron(G, A), exact, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(torch.kron(A, G), exact, rtol=1e-3)


def test_one_step_of_a_kronecker_recurrent_weight_against_the_ggn():
    # KP-compressed cell, W_hh = A (x) B applied once to a given h0 (linear, MSE on the output):
    # B's block is exact; A's couples its positions through B^T B, exact when B^T B = beta I
    torch.manual_seed(3)
    rnn = RecurrentLayer(3, 4, nonlinearity="linear", kron=((2, 2), (2, 2)))
    model = _Wrap(rnn, torch.randn(7, 4))
    x, y = torch.randn(7, 1, 3), torch.randn(7, 4)
    for orthogonal in (True, False):
        with torch.no_grad():
            rnn.hh.B.copy_(torch.tensor([[1.5, -0.9], [0.9, 1.5]]) if orthogonal else torch.randn(2, 2))
        factors = _factors(model, x, y)
        A, G = factors["rnn.hh.B"]
        torch.testing.assert_close(torch.kron(G, A), _ggn(model, ["rnn.hh.B"], x, y), rtol=1e-10, atol=1e-12)
        A, G = factors["rnn.hh.A"]
        exact = _ggn(model, ["rnn.hh.A"], x, y)
        if orthogonal:
            torch.testing.assert_close(torch.kron(G, A), exact, rtol=1e-10, atol=1e-12)
        else:
            assert not torch.allclose(torch.kron(G, A), exact, rtol=1e-3)


def test_several_steps_use_every_time_step_as_a_position_and_are_not_exact():
    torch.manual_seed(2)
    rnn = RecurrentLayer(3, 4, nonlinearity="tanh")
    model = _Wrap(rnn, None)
    n, steps = 5, 4
    x, y = torch.randn(n, steps, 3), torch.randn(n, steps * 4)
    factors = _factors(model, x, y, fisher_type="empirical")
    # independent expand statistics: inputs [x_t, 1] over all (n, t); h_{t-1} for t >= 2 (h0 = 0)
    h = rnn(x).detach()
    a_ih = torch.cat([x.reshape(-1, 3), torch.ones(n * steps, 1)], 1)
    a_hh = h[:, :-1].reshape(-1, 4)
    torch.testing.assert_close(factors["rnn.ih"][0], a_ih.T @ a_ih / len(a_ih))
    torch.testing.assert_close(factors["rnn.hh"][0], a_hh.T @ a_hh / len(a_hh))
    # G of W_ih: the pre-activation gradients of every step, per-example scaled (mean loss: c = numel)
    pre = torch.zeros(n, steps, 4, requires_grad=True)
    hs, hprev = [], None
    for t in range(steps):
        recurrence = 0 if hprev is None else hprev @ rnn.weight_hh.T
        z = x[:, t] @ rnn.weight_ih.T + rnn.bias + recurrence + pre[:, t]
        hprev = torch.tanh(z)
        hs.append(hprev)
    F.mse_loss(torch.stack(hs, 1).flatten(1), y).backward()
    g = pre.grad.reshape(-1, 4)
    torch.testing.assert_close(factors["rnn.ih"][1], y.numel() * g.T @ g)
    # over several steps the recurrence couples the positions: no longer the exact GGN
    lin = _Wrap(RecurrentLayer(3, 4, nonlinearity="linear"), None)
    fl = _factors(lin, x, y)
    A, G = fl["rnn.ih"]
    assert not torch.allclose(torch.kron(G, A), _ggn(lin, ["rnn.weight_ih", "rnn.bias"], x, y), rtol=1e-2)


def test_kronecker_recurrent_weight_registers_its_factors():
    rnn = RecurrentLayer(6, 16, kron=((4, 4), (4, 4)))
    precond = KFACPreconditioner(nn.Sequential(rnn), loss="mse")
    assert sorted(precond.layers) == ["0.hh.A", "0.hh.B", "0.ih"]
    x = torch.randn(2, 3, 6)
    out = rnn(x)
    # the recurrence with the dense A (x) B
    h, states = None, []
    for t in range(3):
        z = x[:, t] @ rnn.weight_ih.T + rnn.bias + (0 if h is None else h @ rnn.hh.dense_weight().T)
        h = torch.tanh(z)
        states.append(h)
    torch.testing.assert_close(out, torch.stack(states, 1))
    with pytest.raises(ValueError, match="kron="):
        RecurrentLayer(6, 16, kron=((4, 4), (2, 4)))


@pytest.mark.parametrize("kron", [False, True])
def test_kfac_trains_the_row_by_row_digits_rnn(kron):
    torch.set_default_dtype(torch.float32)
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("rnn", data, hidden=16 if kron else 32, kron=kron)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    precond = KFACPreconditioner(model, loss="cross_entropy", optimizer=opt, damping=0.1, kl_clip=1e-3,
                                 factor_update_every=5, inverse_update_every=10)
    expected = {"rnn.ih", "head"} | ({"rnn.hh.A", "rnn.hh.B"} if kron else {"rnn.hh"})
    assert set(precond.layers) == expected
    gen = torch.Generator().manual_seed(0)

    def loss_on(idx):
        return F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])

    probe = torch.arange(512)
    with torch.no_grad():
        before = float(loss_on(probe))
    for _ in range(80):
        idx = torch.randint(0, len(data.x_train), (64,), generator=gen)
        opt.zero_grad()
        loss_on(idx).backward()
        precond.step()
        opt.step()
    with torch.no_grad():
        after = float(loss_on(probe))
    assert after < 0.5 * before, (before, after)
