"""KLD-WRM against the paper's closed forms, computed independently: factors from the layer inputs and
output gradients (retain_grad), dense Kronecker matrices and torch.linalg.solve (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermo_kfac.kld_wrm import KLDWRM, two_term_basis, two_term_solve

D = torch.float64


def _batch(i: int, n: int = 24):
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(n, 5, generator=g, dtype=D)
    return x, torch.randn(n, 3, generator=g, dtype=D)


def _run(variant: str, steps: int = 6, lrs=(0.2, 0.2, 0.1, 0.1, 0.05, 0.05), rho=0.8, gamma=0.05,
         momentum=0.0, kl_clip=None):
    """Train a Linear(5, 3) with MSE; return per step (lr, grad [W|b], A_bar_d, G_bar_d, A_loc, G_loc,
    taken step [dW|db]) with the factors computed here from the captured tensors."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(D)
    opt = KLDWRM(model, lr=lrs[0], variant=variant, stat_decay=rho, damping=gamma, kl_clip=kl_clip,
                 momentum=momentum)
    A_bar = G_bar = None
    root = math.sqrt(gamma)
    records = []
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[k]
        x, y = _batch(k)
        opt.zero_grad()
        x_in = x.clone().requires_grad_(False)
        out = model(x_in)
        out.retain_grad()
        F.mse_loss(out, y).backward()
        a = torch.cat([x, torch.ones(len(x), 1, dtype=D)], 1)
        A_loc, G_loc = a.T @ a / len(x), len(x) * out.grad.T @ out.grad
        A_bar = A_loc if A_bar is None else rho * A_bar + (1 - rho) * A_loc
        G_bar = G_loc if G_bar is None else rho * G_bar + (1 - rho) * G_loc
        grad = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
        before = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
        opt.step()
        after = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
        records.append({"lr": lrs[k], "g": grad, "A": A_bar + root * torch.eye(6, dtype=D),
                        "G": G_bar + root * torch.eye(3, dtype=D), "A_loc": A_loc, "G_loc": G_loc,
                        "s": after - before})
    return opt, records


def _kron_solve(M: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``X`` with ``M vec_r(X) = vec_r(V)`` for a dense ``M``."""
    return torch.linalg.solve(M, V.reshape(-1)).reshape(V.shape)


def test_so_kld_wrm_steps_are_the_papers_gradient_difference_closed_form():
    opt, rec = _run("so")
    factors = opt.factors("")
    torch.testing.assert_close(factors["A_bar"] + math.sqrt(0.05) * torch.eye(6, dtype=D), rec[-1]["A"])
    for k, r in enumerate(rec):
        M = torch.kron(r["G"], r["A"])
        rhs = r["g"] if k == 0 else r["g"] - 0.8 * (rec[k - 1]["lr"] / r["lr"]) * rec[k - 1]["g"]
        expected = -r["lr"] * _kron_solve(M, rhs)
        torch.testing.assert_close(r["s"], expected, rtol=1e-9, atol=1e-12)
        if k:
            kfac = -r["lr"] * _kron_solve(M, r["g"])
            assert (r["s"] - kfac).norm() > 0.1 * kfac.norm()  # not plain K-FAC


def test_q_kld_wrm_steps_are_the_quadratic_model_closed_form():
    _, rec = _run("q")
    for k, r in enumerate(rec):
        M = torch.kron(r["G"], r["A"]) + r["lr"] * torch.kron(r["G_loc"], r["A_loc"])
        rhs = r["lr"] * r["g"]
        if k:
            p = rec[k - 1]
            F_prev_s = p["G_loc"] @ p["s"] @ p["A_loc"]
            rhs = rhs - 0.8 * p["lr"] * (p["g"] + F_prev_s)
        torch.testing.assert_close(r["s"], -_kron_solve(M, rhs), rtol=1e-9, atol=1e-12)


def test_kfac_variant_is_ea_kfac_and_the_wake_tracks_clipped_momentum_steps():
    _, rec = _run("kfac", kl_clip=None)
    for r in rec:
        torch.testing.assert_close(r["s"], -r["lr"] * _kron_solve(torch.kron(r["G"], r["A"]), r["g"]))
    # with the KL clip and momentum, the wake is the rho-weighted curvature of the steps taken
    opt, rec = _run("so", momentum=0.5, kl_clip=1e-4)
    assert opt.last_kl_scale < 1.0  # the clip was active
    wake = torch.zeros(3, 6, dtype=D)
    for r in rec:
        wake = 0.8 * wake + r["G"] @ r["s"] @ r["A"]
    torch.testing.assert_close(opt.wake(""), wake, rtol=1e-9, atol=1e-12)


def test_two_term_solve_inverts_a_sum_of_two_kronecker_products():
    g = torch.Generator().manual_seed(0)

    def spd(n, shift):
        X = torch.randn(n, n, generator=g, dtype=D)
        return X @ X.T + shift * torch.eye(n, dtype=D)

    A_bar, G_bar, A_loc, G_loc = spd(4, 1.0), spd(3, 1.0), spd(4, 0.0), spd(3, 0.0)
    V = torch.randn(3, 4, generator=g, dtype=D)
    K_A, s_A = two_term_basis(A_bar, A_loc)
    K_G, s_G = two_term_basis(G_bar, G_loc)
    X = two_term_solve(V, K_G, s_G, K_A, s_A, 0.7)
    M = torch.kron(G_bar, A_bar) + 0.7 * torch.kron(G_loc, A_loc)
    torch.testing.assert_close(X, _kron_solve(M, V), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", ["so", "q", "qe"])
def test_kld_wrm_trains_a_small_classifier(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = KLDWRM(model, lr=6.0, variant=variant, damping=0.1, momentum=0.5)  # lr = 1 / lambda
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 4, generator=g)
    losses = []
    for _ in range(60):
        x = torch.randn(64, 10, generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), (x @ W).argmax(1))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_bad_arguments_are_named():
    model = nn.Linear(3, 2)
    for kwargs, match in (({"variant": "qx"}, "variant"), ({"stat_decay": 1.0}, "stat_decay"),
                          ({"lr": 0.0}, "lr"), ({"update_every": 0}, "update_every")):
        with pytest.raises(ValueError, match=match):
            KLDWRM(model, **kwargs)
    with pytest.raises(ValueError, match="no nn.Linear"):
        KLDWRM(nn.Sequential(nn.ReLU()))


def test_compare_runs_kld_wrm_kfac_and_adam_on_digits(tmp_path, monkeypatch, capsys):
    import json

    from thermo_kfac import cli
    from thermo_kfac.experiments.training import parse_optimizer_spec, resolve_options

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["thermo_kfac.experiments.training"])
    spec = parse_optimizer_spec("kld-wrm:kld_variant=q,lr=3")
    options = resolve_options(spec)
    assert options["kld_variant"] == "q" and options["lr"] == 3.0 and options["stat_decay"] == 0.95
    with pytest.raises(ValueError, match="kld_variant='qx' is not valid"):
        parse_optimizer_spec("kld-wrm:kld_variant=qx")
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--model", "mlp", "--dataset", "digits", "--optimizers", "kld-wrm", "kfac",
                     "adam", "kld-wrm:kld_variant=q", "--steps", "8", "--out", str(out),
                     "--no-progress"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["kld-wrm", "kfac", "adam", "kld-wrm:kld_variant=q"]
    for run in runs[::3]:
        assert math.isfinite(run["final_train_loss"])
        assert run["final_train_loss"] < run["history"][0]["train_loss"]  # it trains
    capsys.readouterr()


@pytest.mark.slow  # 785-wide factors decomposed every KLD-WRM step: ~20 s of CPU
def test_compare_runs_kld_wrm_kfac_and_adam_at_realistic_width(tmp_path, monkeypatch, capsys):
    # the realistic-width workload: digits28 (28x28), MLP 784-512-512-10, batch 512
    import json

    from thermo_kfac import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["thermo_kfac.experiments.training"])
    out = tmp_path / "width"
    assert cli.main(["compare", "--model", "mlp", "--dataset", "digits28", "--widths", "512,512",
                     "--batch-size", "512", "--optimizers", "kld-wrm", "kfac", "adam", "--steps", "2",
                     "--out", str(out), "--no-progress"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["kld-wrm", "kfac", "adam"]
    for run in runs:
        assert math.isfinite(run["final_train_loss"])
        assert run["final_train_loss"] < run["history"][0]["train_loss"]  # it trains
    capsys.readouterr()


@pytest.mark.parametrize("variant", ["so", "q", "qe"])
def test_state_dict_resumes_bitwise(variant):
    import copy

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
        return model, KLDWRM(model, lr=2.0, variant=variant, momentum=0.5, update_every=2, qe_models=2,
                             qe_steps=2, qe_output="gaussian")

    def run(model, opt, steps):
        for i in steps:
            x, y = _batch(i)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    model, opt = make()
    run(model, opt, range(5))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    run(model, opt, range(5, 9))
    model2, opt2 = make()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    run(model2, opt2, range(5, 9))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))
    other = KLDWRM(nn.Linear(5, 3).to(D), variant=variant)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(saved[1])


def test_qe_inner_iteration_is_sgd_on_the_exact_kl_sub_problem():
    """Step 2 of QE (two stored models) = the Q step, then one SGD step on
    g_k^T s + s^T F_k s / 2 + W / (2 lr), W = rho KL_sym(model 0) + (1 - rho) KL_sym(model 1)."""
    from torch.func import functional_call

    lr, rho, factor = 0.5, 0.8, 0.3

    def make(variant):
        torch.manual_seed(0)
        model = nn.Linear(5, 3).to(D)
        return model, KLDWRM(model, lr=lr, variant=variant, stat_decay=rho, kl_clip=None, qe_models=2,
                             qe_steps=1, qe_lr_factor=factor, qe_clip=None)

    (m_qe, opt_qe), (m_q, opt_q) = make("qe"), make("q")
    snapshots = []
    for k in range(3):
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(k), dtype=D)
        y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(50 + k))
        for model, opt in ((m_qe, opt_qe), (m_q, opt_q)):
            opt.zero_grad()
            out = model(x)
            out.retain_grad()
            F.cross_entropy(out, y).backward()
            if model is m_qe:
                theta_k = {n: p.detach().clone() for n, p in model.named_parameters()}
                g_k = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
                a = torch.cat([x, torch.ones(16, 1, dtype=D)], 1)
                A_loc, G_loc = a.T @ a / 16, 16 * out.grad.T @ out.grad
            opt.step()
        if k < 2:  # QE needs two stored models: steps 0 and 1 are Q steps
            torch.testing.assert_close(m_qe.weight, m_q.weight, rtol=0, atol=0)
            snapshots.append({n: p.detach().clone() for n, p in m_qe.named_parameters()})
    theta_q = {n: p.detach().clone() for n, p in m_q.named_parameters()}
    params = {n: p.clone().requires_grad_(True) for n, p in theta_q.items()}

    def sym_kl(o, t):
        lp, lq = torch.log_softmax(o, 1), torch.log_softmax(t, 1)
        return (0.5 * (lp.exp() - lq.exp()) * (lp - lq)).sum(1).mean()

    out = functional_call(m_q, params, (x,))
    with torch.no_grad():
        t0, t1 = (functional_call(m_q, snap, (x,)) for snap in snapshots)
    wake = rho * sym_kl(out, t0) + (1 - rho) * sym_kl(out, t1)
    gw, gb = torch.autograd.grad(wake / (2 * lr), [params["weight"], params["bias"]])
    s_mat = torch.cat([theta_q["weight"] - theta_k["weight"],
                       (theta_q["bias"] - theta_k["bias"])[:, None]], 1)
    total = g_k + G_loc @ s_mat @ A_loc + torch.cat([gw, gb[:, None]], 1)
    expected = torch.cat([theta_q["weight"], theta_q["bias"][:, None]], 1) - factor * lr * total
    got = torch.cat([m_qe.weight, m_qe.bias[:, None]], 1).detach()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert (got - torch.cat([theta_q["weight"], theta_q["bias"][:, None]], 1)).norm() > 1e-6
    # the wake follows the extra displacement
    moved = got - torch.cat([theta_q["weight"], theta_q["bias"][:, None]], 1)
    torch.testing.assert_close(opt_qe.wake(""), opt_q.wake("") + opt_q.curvature_product("", moved))
