"""thermo_kfac.KFAC: the quadratic-model step against a dense GGN, the damping rule, the frozen
optimizer against preconditioner + SGD momentum, exact resume, solvers and distributed mode."""

from __future__ import annotations

import copy
import io
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from thermo_kfac import KFAC, KFACPreconditioner
from thermo_kfac import distributed as kd
from thermo_kfac.experiments import launch
from thermo_kfac.optimizer import lm_damping_update, reduction_ratio

LOSS_FNS = {"cross_entropy": F.cross_entropy, "bce": F.binary_cross_entropy_with_logits,
            "mse": F.mse_loss}


def _net(out: int = 3, hidden: int = 7, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, hidden), act(), nn.Linear(hidden, out)).double()


def _data(loss: str, n: int = 24, seed: int = 1, out: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        return x, torch.randint(0, out, (n,), generator=gen)
    if loss == "bce":
        return x, torch.rand(n, out, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, out, generator=gen, dtype=torch.float64)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _dense_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``J^T H J`` of the mean loss, J the Jacobian of the outputs in the flat parameters.

    Computed in eval mode (the same function for these nets), so the preconditioner's hooks
    record nothing."""
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = _flat([p.detach() for p in model.parameters()])

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            params[name] = flat[start:start + size].reshape(shape)
            start += size
        return functional_call(model, params, (x,)).reshape(-1)

    out = outputs(theta).detach()
    J = jacrev(outputs)(theta)
    out_shape = model(x).shape
    H = hessian(lambda o: LOSS_FNS[loss](o.reshape(out_shape), y))(out)
    model.train()
    return J.T @ H @ J


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    model.eval()  # hooks silent
    model.zero_grad()
    LOSS_FNS[loss](model(x), y).backward()
    g = _flat([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    model.train()
    return g


def _params(model: nn.Module) -> torch.Tensor:
    return _flat([p.detach().clone() for p in model.parameters()])


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "mse"])
@pytest.mark.parametrize("lr,momentum", [(None, None), (0.3, None), (None, 0.5)])
def test_quadratic_model_step_is_the_minimiser_of_the_dense_quadratic(loss: str, lr: Any,
                                                                       momentum: Any) -> None:
    model = _net()
    x, y = _data(loss)
    opt = KFAC(model, loss=loss, lr=lr, momentum=momentum, damping=0.05, adapt_damping=False,
               weight_decay=1e-3, factor_dtype=torch.float64, inverse_update_every=1,
               max_momentum=None)  # unconstrained: the plain 2x2 minimiser
    eta, lam = 1e-3, 0.05
    theta0 = _params(model)
    opt.step(x, y)
    theta1 = _params(model)
    delta0 = theta1 - theta0
    # reference quantities at theta1, before the second step
    g = _grad(model, x, y, loss) + eta * theta1
    C = _dense_ggn(model, x, y, loss) + (lam + eta) * torch.eye(theta1.numel(), dtype=torch.float64)
    opt.step(x, y)
    theta2 = _params(model)
    direction = -_flat([p.grad for p in model.parameters()])  # .grad keeps F_kfac^-1 g
    V = torch.stack([direction, delta0], dim=1)
    M, b = V.T @ C @ V, V.T @ g
    if lr is None and momentum is None:
        coef = torch.linalg.solve(M, -b)
    elif lr is None:
        coef = torch.tensor([-(b[0] + momentum * M[0, 1]) / M[0, 0], momentum], dtype=torch.float64)
    else:
        coef = torch.tensor([lr, -(b[1] + lr * M[1, 0]) / M[1, 1]], dtype=torch.float64)
    # the reference minimiser is a stationary point of the quadratic along the free directions
    torch.testing.assert_close(theta2 - theta1, V @ coef, rtol=1e-8, atol=1e-12)
    assert opt.last_report["alpha"] == pytest.approx(float(coef[0]), rel=1e-8)
    assert opt.last_report["mu"] == pytest.approx(float(coef[1]), rel=1e-8, abs=1e-12)
    # and it really is the minimum of M over the span: a perturbation only increases it
    def model_value(c: torch.Tensor) -> float:
        d = V @ c
        return float(g @ d + 0.5 * d @ C @ d)
    base = model_value(coef)
    for dc in ([1e-3, 0.0], [0.0, 1e-3], [-1e-3, 1e-3]):
        assert model_value(coef + torch.tensor(dc, dtype=torch.float64)) > base or lr or momentum


@pytest.mark.parametrize("lr", [None, 0.3])
def test_adapted_momentum_is_constrained_to_its_bounds(lr: Any) -> None:
    # KKT conditions of min M(alpha, mu) subject to 0 <= mu <= max_momentum, checked on the dense
    # quadratic: dM/dalpha = 0 (alpha free), and dM/dmu >= 0 at mu = 0, <= 0 at the upper bound,
    # = 0 inside
    model = _net()
    x, y = _data("cross_entropy")
    opt = KFAC(model, loss="cross_entropy", lr=lr, damping=0.05, adapt_damping=False,
               factor_dtype=torch.float64, inverse_update_every=1, max_momentum=0.5)
    seen = set()
    for _ in range(6):
        theta0 = _params(model)
        prev = None if opt.previous_update is None else _flat(opt.previous_update)
        g = _grad(model, x, y, "cross_entropy")
        C = _dense_ggn(model, x, y, "cross_entropy") + 0.05 * torch.eye(theta0.numel(),
                                                                         dtype=torch.float64)
        opt.step(x, y)
        if prev is None:
            continue
        direction = -_flat([p.grad for p in model.parameters()])
        alpha, mu = opt.last_report["alpha"], opt.last_report["mu"]
        torch.testing.assert_close(_params(model) - theta0, alpha * direction + mu * prev,
                                   rtol=1e-8, atol=1e-12)
        step = alpha * direction + mu * prev
        d_alpha = float(direction @ (g + C @ step))
        d_mu = float(prev @ (g + C @ step))
        scale = float(direction.abs().sum() * g.abs().sum())
        if lr is None:
            assert abs(d_alpha) <= 1e-9 * scale
        assert 0.0 <= mu <= 0.5
        if mu == 0.0:
            assert d_mu >= -1e-9 * scale
            seen.add("low")
        elif mu == 0.5:
            assert d_mu <= 1e-9 * scale
            seen.add("high")
        else:
            assert abs(d_mu) <= 1e-9 * scale
            seen.add("inside")
    assert seen & {"low", "high"}  # the case exercises a bound


def test_first_step_uses_the_preconditioned_gradient_alone() -> None:
    model = _net()
    x, y = _data("cross_entropy")
    opt = KFAC(model, loss="cross_entropy", damping=0.1, adapt_damping=False,
               factor_dtype=torch.float64)
    theta0 = _params(model)
    g = _grad(model, x, y, "cross_entropy")
    C = _dense_ggn(model, x, y, "cross_entropy") + 0.1 * torch.eye(theta0.numel(), dtype=torch.float64)
    opt.step(x, y)
    direction = -_flat([p.grad for p in model.parameters()])
    alpha = -float(g @ direction) / float(direction @ C @ direction)
    torch.testing.assert_close(_params(model) - theta0, alpha * direction, rtol=1e-8, atol=1e-12)
    assert opt.last_report["mu"] == 0.0


def test_curvature_products_match_the_dense_ggn() -> None:
    model = _net()
    x, y = _data("bce")
    opt = KFAC(model, loss="bce")
    gen = torch.Generator().manual_seed(5)
    vectors = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
               for _ in range(3)]
    got = opt.curvature_products(lambda params=None: functional_call(model, params, (x,)), y, vectors)
    V = torch.stack([_flat(v) for v in vectors], dim=1)
    torch.testing.assert_close(got, V.T @ _dense_ggn(model, x, y, "bce") @ V, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- damping rule
def test_lm_rule_and_reduction_ratio() -> None:
    omega = 0.95 ** 5
    assert lm_damping_update(1.0, 0.9, omega, 1e-8, 1e8) == pytest.approx(omega)
    assert lm_damping_update(1.0, 0.1, omega, 1e-8, 1e8) == pytest.approx(1 / omega)
    assert lm_damping_update(1.0, 0.5, omega, 1e-8, 1e8) == 1.0
    assert lm_damping_update(1.0, float("nan"), omega, 1e-8, 1e8) == pytest.approx(1 / omega)
    assert lm_damping_update(1e-8, 0.9, omega, 1e-8, 1e8) == 1e-8  # bounded below
    assert lm_damping_update(1e8, -3.0, omega, 1e-8, 1e8) == 1e8  # and above
    assert reduction_ratio(-1.0, -2.0) == 0.5
    assert reduction_ratio(0.1, 0.0) == float("-inf")


def _rho_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
                   opt: KFAC) -> tuple[float, float, float]:
    """(actual change, predicted change from the dense GGN, damping before) of one step."""
    theta0 = _params(model)
    g = _grad(model, x, y, loss)
    C = _dense_ggn(model, x, y, loss)
    with torch.no_grad():
        h0 = float(LOSS_FNS[loss](model(x), y))
    damping = opt.damping
    opt.step(x, y)
    delta = _params(model) - theta0
    with torch.no_grad():
        h1 = float(LOSS_FNS[loss](model(x), y))
    return h1 - h0, float(g @ delta + 0.5 * delta @ C @ delta), damping


def test_damping_shrinks_when_the_model_is_exact() -> None:
    # linear model + MSE: the objective is exactly quadratic and C its Hessian, so rho = 1
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = _data("mse")
    opt = KFAC(model, loss="mse", damping=1.0, damping_adaptation_every=1,
               factor_dtype=torch.float64)
    for _ in range(3):
        actual, predicted, before = _rho_reference(model, x, y, "mse", opt)
        assert actual / predicted == pytest.approx(1.0, rel=1e-9)
        assert opt.last_report["rho"] == pytest.approx(actual / predicted, rel=1e-7)
        assert opt.damping == pytest.approx(before * opt.omega, rel=1e-12)


def test_damping_grows_when_the_model_overestimates_the_decrease() -> None:
    # A ReLU net and a fixed step of 1.9 times the model's optimal length along the first K-FAC
    # direction: the quadratic model still predicts a decrease (any step below 2x the optimum
    # does), but the real loss rises, so rho < 1/4.
    loss = "cross_entropy"
    x, y = _data(loss)
    twin = _net(act=nn.ReLU)
    precond = KFACPreconditioner(twin, loss=loss, damping=1e-3, factor_dtype=torch.float64)
    F.cross_entropy(twin(x), y).backward()
    precond.step()
    direction = -_flat([p.grad for p in twin.parameters()])
    model = _net(act=nn.ReLU)
    g, C = _grad(model, x, y, loss), _dense_ggn(model, x, y, loss)
    best = -float(g @ direction) / float(direction @ C @ direction)
    opt = KFAC(model, loss=loss, lr=1.9 * best, momentum=0.0, damping=1e-3,
               damping_adaptation_every=1, factor_dtype=torch.float64, fisher_type="empirical")
    actual, predicted, before = _rho_reference(model, x, y, loss, opt)
    assert predicted < 0 and actual / predicted < 0.25
    assert opt.last_report["rho"] == pytest.approx(actual / predicted, rel=1e-7)
    assert opt.damping == pytest.approx(before / opt.omega, rel=1e-12)


def test_damping_grows_when_a_fixed_step_is_predicted_to_increase_the_loss() -> None:
    # a far too large fixed step: the model predicts an increase; rho is defined as -inf then
    model = _net(act=nn.Sigmoid)
    x, y = _data("cross_entropy")
    opt = KFAC(model, loss="cross_entropy", lr=50.0, momentum=0.0, damping=1e-3,
               damping_adaptation_every=1, factor_dtype=torch.float64)
    actual, predicted, before = _rho_reference(model, x, y, "cross_entropy", opt)
    assert predicted > 0
    assert opt.last_report["rho"] == reduction_ratio(actual, predicted) == float("-inf")
    assert opt.damping == pytest.approx(before / opt.omega, rel=1e-12)


def test_damping_adapts_only_every_t1_steps() -> None:
    model = _net()
    x, y = _data("cross_entropy")
    opt = KFAC(model, loss="cross_entropy", damping=1.0, damping_adaptation_every=3)
    rhos = []
    for _ in range(6):
        opt.step(x, y)
        rhos.append(opt.last_report["rho"])
    assert [r is not None for r in rhos] == [False, False, True, False, False, True]


def test_guard_scales_a_step_predicted_to_fall_below_zero_loss() -> None:
    # One confidently wrong example (logit -12 for target 1): the cross-entropy's curvature there
    # is ~e^-12 while the gradient is ~1, so the quadratic model's minimiser predicts a decrease
    # of ~e^12/2, far more than the loss (~12) that could be lost. The step is scaled so the
    # predicted decrease is the loss, and the damping grows by 1/omega.
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-4.0, -2.0]]))
    x = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    y = torch.ones(1, 1, dtype=torch.float64)
    opt = KFAC(model, loss="bce", damping=1e-8, factor_dtype=torch.float64)
    theta0, g, C = _params(model), _grad(model, x, y, "bce"), _dense_ggn(model, x, y, "bce")
    with torch.no_grad():
        h0 = float(F.binary_cross_entropy_with_logits(model(x), y))
    opt.step(x, y)
    report = opt.last_report
    update = _params(model) - theta0
    direction = update / report["alpha"]  # the preconditioned direction Delta
    # unguarded minimiser along Delta (first step: no momentum), and its predicted change
    alpha_star = -float(g @ direction) / float(direction @ C @ direction + 1e-8 * direction @ direction)
    change_star = alpha_star * float(g @ direction) + 0.5 * alpha_star**2 * float(direction @ C @ direction)
    assert -change_star > 100 * h0
    # scaled so that the first-order decrease -g^T delta is the loss h0
    assert report["alpha"] == pytest.approx(h0 / -float(g @ direction), rel=1e-8)
    assert report["alpha"] < alpha_star
    assert opt.guarded_steps == 1 and report["guarded"] is True
    assert -h0 <= report["predicted_change"] < 0
    assert opt.damping == pytest.approx(min(1e-8 / opt.omega, opt.max_damping), rel=1e-12)
    # fixed step sizes are the user's: never guarded
    model.weight.data.copy_(torch.tensor([[-4.0, -2.0]]))
    fixed = KFAC(model, loss="bce", lr=1.0, momentum=0.0, damping=1e-8, factor_dtype=torch.float64)
    fixed.step(x, y)
    assert fixed.guarded_steps == 0 and fixed.last_report["guarded"] is False


def test_float64_loss_keeps_the_gradient_of_a_fitted_float32_model() -> None:
    # margin 30: in float32 softmax rounds the true class to p = 1, so the float32 loss is 0 and
    # the true-class component of dL/dlogits (p - 1 = -e^-30) is lost; loss_dtype=float64 keeps it
    torch.manual_seed(0)
    x = torch.eye(2)
    y = torch.tensor([0, 1])

    def fitted() -> nn.Module:
        model = nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[15.0, -15.0], [-15.0, 15.0]]))
            model.bias.zero_()
        return model

    reference = float(F.cross_entropy(fitted()(x).double(), y))
    assert reference == pytest.approx(math.exp(-30), rel=1e-6)

    def output_grads(loss_dtype: Any) -> tuple[float, torch.Tensor]:
        model, seen = fitted(), []

        def forward() -> torch.Tensor:
            out = model(x)
            if out.requires_grad:  # the step's own forward (not the curvature products')
                out.register_hook(seen.append)
            return out

        opt = KFAC(model, loss="cross_entropy", loss_dtype=loss_dtype, lr=1.0, momentum=0.0)
        loss = float(opt.step(forward=forward, targets=y))
        return loss, seen[0]

    loss32, grad32 = output_grads(None)
    assert loss32 == 0.0 and float(grad32[0, 0]) == 0.0 and float(grad32[1, 1]) == 0.0
    loss64, grad64 = output_grads(torch.float64)
    assert grad64.dtype == torch.float32  # cast back at the outputs
    assert loss64 == pytest.approx(reference, rel=1e-6)
    # dL/dlogit of the true class: (p - 1) / n = -e^-30 / 2, kept in float32's range
    assert float(grad64[0, 0]) == pytest.approx(-math.exp(-30) / 2, rel=1e-5)
    assert float(grad64[1, 1]) == pytest.approx(-math.exp(-30) / 2, rel=1e-5)


# ---------------------------------------------------------------------- frozen = SGD momentum
def test_frozen_adaptation_equals_preconditioner_with_sgd_momentum() -> None:
    x, y = _data("cross_entropy", n=32)
    common = dict(loss="cross_entropy", factor_dtype=torch.float64, inverse_update_every=3,
                  factor_decay=0.9, factor_update_every=1, fisher_type="mc")
    model_a = _net()
    opt_a = KFAC(model_a, lr=0.2, momentum=0.9, damping=0.03, adapt_damping=False, **common)
    model_b = _net()
    sgd = torch.optim.SGD(model_b.parameters(), lr=0.2, momentum=0.9)
    precond = KFACPreconditioner(model_b, damping=0.03, kl_clip=None, **common)
    gen = torch.Generator().manual_seed(3)
    for _ in range(12):
        idx = torch.randint(0, 32, (16,), generator=gen)
        opt_a.step(x[idx], y[idx])
        sgd.zero_grad()
        out = model_b(x[idx])
        precond.accumulate_curvature(out)  # Monte-Carlo Fisher, same seed: the same labels
        F.cross_entropy(out, y[idx]).backward()
        precond.step()
        sgd.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
    assert opt_a.last_report["rho"] is None  # no extra forward when nothing adapts


# ----------------------------------------------------------------------------- resume
def _run(model: nn.Module, opt: KFAC, xs: torch.Tensor, ys: torch.Tensor, start: int, stop: int) -> None:
    for step in range(start, stop):
        opt.step(xs[step], ys[step])


@pytest.mark.parametrize("options", [dict(fisher_type="mc"), dict(weight_decay=1e-3, solver="sre",
                                                                  solver_options={"rank": 2})])
def test_state_dict_resumes_bitwise(options: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(7)
    xs = torch.randn(12, 16, 5, generator=gen, dtype=torch.float64)
    ys = torch.randint(0, 3, (12, 16), generator=gen)
    kw = dict(loss="cross_entropy", damping_adaptation_every=2, inverse_update_every=4,
              factor_dtype=torch.float64, **options)
    model = _net()
    opt = KFAC(model, **kw)
    _run(model, opt, xs, ys, 0, 12)

    first = _net()
    opt1 = KFAC(first, **kw)
    _run(first, opt1, xs, ys, 0, 5)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    _run(first, opt1, xs, ys, 5, 7)  # the saved state must not alias the live one
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = _net(hidden=7)
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # anything: load must overwrite it
    resumed.load_state_dict(saved["model"])
    opt2 = KFAC(resumed, **kw)
    opt2.load_state_dict(saved["opt"])
    _run(resumed, opt2, xs, ys, 5, 12)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt2.damping == opt.damping and opt2.steps == opt.steps == 12


# ----------------------------------------------------------------------------- solvers
@pytest.mark.parametrize("solver,solver_options,extra", [
    ("eigh", None, {}),
    ("cholesky", None, {}),
    ("rsvd", {"rank": 3}, {}),
    ("sre", {"rank": 3}, {}),
    ("cg", None, {}),
    ("thermo", {"analog_time": 20.0, "burn_in": 5.0, "seed": 3}, {}),
    ("eigh", None, {"solver_map": {"0": "cholesky", "2": "thermo:analog_time=20,burn_in=5"}}),
])
def test_every_solver_trains(solver: str, solver_options: Any, extra: dict[str, Any]) -> None:
    model = _net(hidden=6)
    x, y = _data("cross_entropy", n=48)
    opt = KFAC(model, loss="cross_entropy", solver=solver, solver_options=solver_options,
               inverse_update_every=2, preconditioner_options=extra)
    first = float(opt.step(x, y))
    for _ in range(25):
        last = float(opt.step(x, y))
    assert last < 0.5 * first
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_thermo_solver_step_uses_the_analog_preconditioned_gradient() -> None:
    model = _net(hidden=6)
    x, y = _data("cross_entropy", n=48)
    opt = KFAC(model, loss="cross_entropy", solver="thermo", adapt_damping=False,
               solver_options={"analog_time": 20.0, "burn_in": 5.0, "seed": 3})
    for _ in range(3):
        theta0 = _params(model)
        opt.step(x, y)
        assert opt.preconditioner.last_report["hardware_time_s"] is not None
        # the update lies in the span of the solver's direction and the previous update
        assert opt.last_report["alpha"] > 0
        assert torch.isfinite(_params(model) - theta0).all()


# ----------------------------------------------------------------------------- API
def test_closure_and_tuple_forms_equal_the_tensor_form() -> None:
    x, y = _data("mse")
    runs = []
    for form in ("tensor", "tuple", "dict", "closure"):
        model = _net()
        opt = KFAC(model, loss="mse", damping_adaptation_every=2, curvature_examples=None)
        for _ in range(4):
            if form == "tensor":
                opt.step(x, y)
            elif form == "tuple":
                opt.step((x,), y)
            elif form == "dict":
                opt.step({"input": x}, y)
            else:
                opt.step(forward=lambda m=model: m(x), targets=y)
        runs.append(_params(model))
    # tensor and tuple inputs of this chain model take thermo_kfac.chain's J v, dict and closure
    # torch.func's: the same products up to rounding
    assert torch.equal(runs[0], runs[1])
    for other in runs[2:]:
        torch.testing.assert_close(runs[0], other, rtol=1e-12, atol=1e-14)


def test_curvature_examples_uses_the_first_examples() -> None:
    x, y = _data("cross_entropy", n=40)
    model = _net()
    opt = KFAC(model, loss="cross_entropy", damping=0.1, adapt_damping=False, curvature_examples=10,
               factor_dtype=torch.float64)
    theta0 = _params(model)
    g = _grad(model, x, y, "cross_entropy")
    C = _dense_ggn(model, x[:10], y[:10], "cross_entropy") + 0.1 * torch.eye(theta0.numel(),
                                                                              dtype=torch.float64)
    opt.step(x, y)
    direction = -_flat([p.grad for p in model.parameters()])
    alpha = -float(g @ direction) / float(direction @ C @ direction)
    assert opt.last_report["alpha"] == pytest.approx(alpha, rel=1e-8)


def test_bad_arguments() -> None:
    model = _net()
    with pytest.raises(ValueError, match="loss"):
        KFAC(model, loss="hinge")
    with pytest.raises(ValueError, match="kl_clip"):
        KFAC(model, preconditioner_options={"kl_clip": 1e-3})
    with pytest.raises(ValueError, match="max_damping"):
        KFAC(model, min_damping=1.0, max_damping=0.1)
    with pytest.raises(ValueError, match="momentum"):
        KFAC(model, momentum=1.5)
    opt = KFAC(model)
    x, y = _data("cross_entropy")
    with pytest.raises(ValueError, match="targets"):
        opt.step(x)
    with pytest.raises(ValueError, match="either"):
        opt.step(x, y, forward=lambda: model(x))


def test_exported_and_documented() -> None:
    import thermo_kfac

    assert thermo_kfac.KFAC is KFAC
    doc = (Path(__file__).parents[2] / "docs" / "kfac_optimizer.md").read_text()
    assert "KFAC(" in doc and "forward=" in doc


# ----------------------------------------------------------------------------- distributed
def _dist_train(steps: int) -> list[torch.Tensor]:
    model = _net()
    trained = nn.parallel.DistributedDataParallel(model) if kd.is_distributed() else model
    # empirical Fisher: with "mc" every rank draws its own labels, unlike one process
    opt = KFAC(trained, loss="cross_entropy", damping_adaptation_every=2, inverse_update_every=2,
               factor_dtype=torch.float64, fisher_type="empirical", factor_update_every=1,
               preconditioner_options={"distributed": kd.DistributedKFAC() if kd.is_distributed()
                                       else False})
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.step(*launch.shard(x, y))
    return [p.detach().clone() for p in model.parameters()] + [torch.tensor(opt.damping)]


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _dist_train(6)
        if rank == 0:
            torch.save(result, out)
    finally:
        tdist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    reference = _dist_train(6)
    out = tmp_path / "world2.pt"
    mp.start_processes(_dist_worker, args=(2, launch.free_port(), str(out)), nprocs=2, join=True,
                       start_method=launch.child_start_method())
    got = torch.load(out, weights_only=False)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_state_dict_is_a_copy() -> None:
    model = _net()
    x, y = _data("cross_entropy")
    opt = KFAC(model)
    opt.step(x, y)
    state = copy.deepcopy(opt.state_dict())
    opt.step(x, y)
    assert not all(torch.equal(a, b) for a, b in zip(state["previous_update"], opt.previous_update,
                                                     strict=True))
