"""Behaviour of KFACPreconditioner: schedule, EMA, clipping, checkpoints, errors, robustness."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermo_kfac import KFACPreconditioner, KFACSolver, SolverReport
from thermo_kfac.solvers import EighSolver


def _mlp(seed: int = 0, inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 3))


def _batch(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model, precond, opt, steps, start=0):
    for i in range(start, start + steps):
        x, y = _batch(i)
        opt.zero_grad()
        out = model(x)
        precond.accumulate_curvature(out)
        F.cross_entropy(out, y).backward()
        precond.step()
        opt.step()


def test_registers_linear_and_conv_and_leaves_others():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    precond = KFACPreconditioner(model)
    assert precond.layers == ["0", "3"]
    skipped = KFACPreconditioner(model, skip=["Conv2d"])
    assert skipped.layers == ["3"]


def test_ema_of_factors_and_update_schedule():
    model = _mlp()
    calls = {"prepare": 0}

    class CountingSolver(EighSolver):
        def prepare(self, A, G, damping):
            calls["prepare"] += 1
            super().prepare(A, G, damping)

    precond = KFACPreconditioner(model, solver=CountingSolver, factor_decay=0.75,
                                 factor_update_every=2, inverse_update_every=3,
                                 factor_dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model is fixed
    # with a fixed model, the A factor of layer 0 is the input covariance of each batch
    covs = []
    for i in range(5):
        x, _ = _batch(i)
        xb = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        covs.append(xb.T @ xb / len(x))
    _train(model, precond, opt, 5)
    # factor updates at steps 0, 2, 4; EMA starts from the first batch's statistics
    expected = covs[0]
    for i in (2, 4):
        expected = 0.75 * expected + 0.25 * covs[i]
    torch.testing.assert_close(precond.factors()["0"][0], expected)
    assert calls["prepare"] == 2 * 2  # inverse updates at steps 0 and 3, two layers


def test_kl_clip_reads_optimizer_lr():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    precond = KFACPreconditioner(model, kl_clip=1e-4, optimizer=opt, damping=1e-2)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    raw = {n: (m.weight.grad.clone(), m.bias.grad.clone()) for n, m in model.named_modules()
           if isinstance(m, nn.Linear)}
    reference = KFACPreconditioner(_mlp(), damping=1e-2)  # same weights, no clipping
    ref_model = reference.model
    F.cross_entropy(ref_model(x), y).backward()
    reference.step()
    vg = sum(float((m.weight.grad * raw[n][0]).sum() + (m.bias.grad * raw[n][1]).sum())
             for n, m in ref_model.named_modules() if isinstance(m, nn.Linear)) * 0.5 ** 2
    nu = min(1.0, math.sqrt(1e-4 / vg))
    assert nu < 1.0  # the case is chosen so that clipping is active
    precond.step()
    assert precond.last_report["kl_scale"] == pytest.approx(nu)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            torch.testing.assert_close(m.weight.grad, nu * dict(ref_model.named_modules())[n].weight.grad)
    # a later lr change in the optimizer is seen
    opt.param_groups[0]["lr"] = 0.05
    F.cross_entropy(model(x), y).backward()
    precond.step()
    assert precond.last_report["kl_scale"] > nu


def test_state_dict_resume_is_bitwise_identical():
    def fresh():
        model = _mlp(seed=1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        precond = KFACPreconditioner(model, fisher_type="mc", factor_decay=0.9,
                                     inverse_update_every=3, kl_clip=1e-3, optimizer=opt, seed=7)
        return model, opt, precond

    model, opt, precond = fresh()
    _train(model, precond, opt, 10)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, opt, precond = fresh()
    _train(model, precond, opt, 5)
    saved = copy.deepcopy({"m": model.state_dict(), "o": opt.state_dict(), "p": precond.state_dict()})
    model, opt, precond = fresh()
    model.load_state_dict(saved["m"])
    opt.load_state_dict(saved["o"])
    precond.load_state_dict(saved["p"])
    _train(model, precond, opt, 5, start=5)
    for a, b in zip(uninterrupted, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_other_layers():
    sd = KFACPreconditioner(_mlp()).state_dict()
    other = KFACPreconditioner(nn.Sequential(nn.Linear(6, 3)))
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(sd)


def test_layer_whose_hooks_never_fire_is_named():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(6, 3)
            self.unused = nn.Linear(6, 3)

        def forward(self, x):
            return self.used(x)

    model = Model()
    precond = KFACPreconditioner(model)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="'unused'.*skip"):
        precond.step()
    ok = KFACPreconditioner(model, skip=["^unused$"])
    F.cross_entropy(model(x), y).backward()
    ok.step()


def test_inplace_activation_gives_preactivation_gradients():
    x, y = _batch()
    results = []
    for inplace in (False, True):
        model = _mlp(inplace=inplace)
        precond = KFACPreconditioner(model, factor_decay=0.0)
        F.cross_entropy(model(x), y).backward()
        precond.step()
        results.append(precond.factors()["0"][1])
    torch.testing.assert_close(results[0], results[1])


def test_nonfinite_statistics_skip_update_and_warn():
    model = _mlp()
    precond = KFACPreconditioner(model, factor_decay=0.5, factor_update_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _train(model, precond, opt, 1)
    before = precond.factors()["0"][0].clone()
    x, y = _batch(3)
    x[0, 0] = float("nan")
    out = model(x)
    F.cross_entropy(out, y).backward()
    with pytest.warns(RuntimeWarning, match="layer '0'"):
        precond.step()
    assert torch.equal(precond.factors()["0"][0], before)
    assert precond.skipped_updates()["0"] == 1
    opt.zero_grad()
    _train(model, precond, opt, 2, start=5)  # training continues
    assert torch.isfinite(precond.factors()["0"][0]).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"damping": -1.0}, "damping=-1.0"),
        ({"factor_decay": 1.0}, r"factor_decay=1.0.*\[0.0, 1.0\)"),
        ({"factor_update_every": 0}, "factor_update_every=0"),
        ({"inverse_update_every": 2.5}, "inverse_update_every=2.5"),
        ({"loss": "hinge"}, "loss='hinge'.*cross_entropy"),
        ({"fisher_type": "true"}, "fisher_type='true'.*type2"),
        ({"reduction": "none"}, "reduction='none'"),
        ({"solver": "magic"}, "solver='magic'.*eigh"),
        ({"solver_options": {"rank": 3}}, "invalid solver_options"),
        ({"kl_clip": 1e-3}, "optimizer="),
        ({"factor_dtype": torch.float16}, "factor_dtype"),
        ({"skip": ["("]}, "regular expression"),
    ],
)
def test_invalid_configuration_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KFACPreconditioner(_mlp(), **kwargs)


def test_grouped_conv_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2.*skip"):
        KFACPreconditioner(model)
    assert KFACPreconditioner(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(),
                                            nn.LazyLinear(2)), skip=["Conv2d"])


def test_factors_in_float64_under_bfloat16_autocast():
    model = _mlp()
    precond = KFACPreconditioner(model, factor_dtype=torch.float64)
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    precond.step()
    A, G = precond.factors()["2"]
    assert A.dtype == G.dtype == torch.float64
    assert model[2].weight.grad.dtype == torch.float32


def test_solver_reports_are_aggregated():
    class Reporting(EighSolver):
        def prepare(self, A, G, damping):
            super().prepare(A, G, damping)
            self.last_report = SolverReport(hardware_time_s=1e-3 * A.shape[0], energy_j=1.0)

        def apply(self, grad):
            self.last_report = SolverReport(hardware_time_s=1e-6)
            return super().apply(grad)

    model = _mlp()
    precond = KFACPreconditioner(model, solver=Reporting())
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    precond.step()
    # prepare reports: 7e-3 (A of layer 0 is 6+1) + 9e-3 (8+1); apply: 2 layers x 1e-6
    assert precond.last_report["hardware_time_s"] == pytest.approx(16e-3 + 2e-6)
    assert precond.last_report["energy_j"] == pytest.approx(2.0)
    assert isinstance(precond.layer_table["0"].solver, KFACSolver)


def test_multihead_attention_projections_are_registered_unless_skipped():
    model = nn.Sequential(nn.Linear(4, 8))
    model.attn = nn.MultiheadAttention(8, 2)
    precond = KFACPreconditioner(model)
    assert precond.layers == ["0", "attn.in_proj", "attn.out_proj"]
    precond.remove_hooks()
    assert KFACPreconditioner(model, skip=["attn"]).layers == ["0"]


@pytest.mark.parametrize("fisher_type", ["type2", "mc"])
def test_one_kfac_step_on_a_linear_model_is_a_newton_step(fisher_type):
    """For a single Linear layer with MSE, the GGN is exactly kron(G, A): with lr 1 and tiny
    damping, one type2 step lands on the least-squares solution (closed form by lstsq), on an
    input distribution so ill-conditioned that gradient descent barely moves."""
    torch.manual_seed(0)
    x = torch.randn(200, 5, dtype=torch.float64) * torch.tensor([100.0, 10.0, 1.0, 0.1, 0.01],
                                                                  dtype=torch.float64)
    y = torch.randn(200, 2, dtype=torch.float64)
    model = nn.Linear(5, 2).double()
    precond = KFACPreconditioner(model, loss="mse", fisher_type=fisher_type, damping=1e-24,
                                 factor_dtype=torch.float64, mc_samples=50)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out = model(x)
    precond.accumulate_curvature(out)
    F.mse_loss(out, y).backward()
    precond.step()
    opt.step()
    X1 = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(X1, y).solution.T  # (2, 6): [W | b]
    got = torch.cat([model.weight, model.bias[:, None]], 1).detach()
    if fisher_type == "type2":
        torch.testing.assert_close(got, solution, rtol=1e-6, atol=1e-6)
    else:  # the MC G factor is 2c*I up to sampling error ~ 1/sqrt(samples)
        assert float((got - solution).norm() / solution.norm()) < 0.05


def test_mc_with_nonfinite_outputs_skips_curvature_and_continues():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    precond = KFACPreconditioner(model, fisher_type="mc", factor_update_every=1)
    _train(model, precond, opt, 1)
    before = precond.factors()["2"][1].clone()
    x, y = _batch(4)
    x[1] = float("inf")
    out = model(x)
    with pytest.warns(RuntimeWarning, match="non-finite model outputs"):
        precond.accumulate_curvature(out)
    precond.step()
    assert torch.equal(precond.factors()["2"][1], before)
    assert precond.skipped_updates() == {"0": 1, "2": 1}
    opt.zero_grad()
    _train(model, precond, opt, 2, start=5)
    assert not torch.equal(precond.factors()["2"][1], before)


def test_batch_statistics_reach_solvers_that_ask_for_them_every_step():
    seen = []

    class BatchSolver(EighSolver):
        uses_batch_statistics = True

        def observe_batch(self, a_rows, g_rows):
            seen.append((a_rows.T @ a_rows, g_rows.T @ g_rows))

    model = _mlp()
    precond = KFACPreconditioner(model, solver=BatchSolver, factor_decay=0.0, factor_update_every=3,
                                 factor_dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    _train(model, precond, opt, 1)
    A, G = precond.factors()["2"]
    torch.testing.assert_close(seen[1][0], A)  # layer "2" is the second layer reported
    torch.testing.assert_close(seen[1][1], G)
    _train(model, precond, opt, 2, start=1)  # steps without factor updates still observe batches
    assert len(seen) == 3 * 2


def test_random_solvers_draw_a_different_stream_per_layer():
    model = _mlp()
    precond = KFACPreconditioner(model, solver="thermo",
                                 solver_options={"analog_time": 5.0, "burn_in": 1.0, "seed": 3})
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    precond.step()
    reports = precond.last_report["solver_reports"]
    seeds = [tuple(reports[f"{name}/prepare"].info["seeds"]) for name in precond.layers]
    assert seeds[0] != seeds[1]


class _BrokenSolver(EighSolver):
    """Returns NaN (mode 'nan') or twice the right answer (mode 'scaled')."""

    mode = "nan"

    def apply(self, grad):
        out = super().apply(grad)
        return out * float("nan") if self.mode == "nan" else 2 * out


def _preconditioned_grads(model, precond, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    precond.step()
    return [p.grad.clone() for p in model.parameters()]


def test_nonfinite_solver_result_falls_back_to_eigh_and_is_counted():
    x, y = _batch()
    ref_model = _mlp()
    ref = _preconditioned_grads(ref_model, KFACPreconditioner(ref_model), x, y)
    model = _mlp()
    precond = KFACPreconditioner(model, solver=_BrokenSolver)
    with pytest.warns(RuntimeWarning, match="fallback solver"):
        got = _preconditioned_grads(model, precond, x, y)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert precond.fallbacks() == {"0": 1, "2": 1}
    assert precond.last_report["fallbacks"] == 2
    _preconditioned_grads(model, precond, x, y)  # training continues, counted again
    assert precond.fallbacks() == {"0": 2, "2": 2}


def test_residual_check_catches_a_wrong_but_finite_result():
    x, y = _batch()
    ref_model = _mlp()
    ref = _preconditioned_grads(ref_model, KFACPreconditioner(ref_model), x, y)

    class Scaled(_BrokenSolver):
        mode = "scaled"

    unchecked_model = _mlp()
    unchecked = _preconditioned_grads(unchecked_model, KFACPreconditioner(unchecked_model, solver=Scaled),
                                      x, y)
    torch.testing.assert_close(unchecked[0], 2 * ref[0])  # without the check the error passes
    model = _mlp()
    precond = KFACPreconditioner(model, solver=Scaled, fallback_residual_tol=1e-3)
    with pytest.warns(RuntimeWarning, match="fallback solver"):
        got = _preconditioned_grads(model, precond, x, y)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="fallback_residual_tol needs a fallback_solver"):
        KFACPreconditioner(_mlp(), fallback_solver=None, fallback_residual_tol=1e-3)


# ------------------------------------------------------------------ the public per-layer seam
def test_layer_table_is_the_preconditioners_state_and_precondition_layers_matches_step():
    model = _mlp()
    precond = KFACPreconditioner(model, damping=0.1, inverse_update_every=1)
    table = precond.layer_table
    assert list(table) == precond.layers == ["0", "2"]
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    precond.step()
    # the table's factors are the preconditioner's, by identity
    for name, (A, G) in precond.factors().items():
        assert table[name].A is A and table[name].G is G
    assert table.factor_tensors() == [t for name in table for t in precond.factors()[name]]
    # precondition_layers on the same gradients gives what step() wrote into .grad
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = {n: table[n].adapter.grad_matrix().clone() for n in table}
    results = precond.precondition_layers({})
    assert [r.state for r in results] == [table["0"], table["2"]]
    for name, r in zip(table, results, strict=True):
        assert torch.equal(r.grad, raw[name])
        A, G = table[name].A, table[name].G
        lam = math.sqrt(0.1)  # damping split evenly between the factors (pi_damping=False)
        ref = torch.linalg.solve(G + lam * torch.eye(len(G)),
                                 torch.linalg.solve(A + lam * torch.eye(len(A)), raw[name].T).T)
        torch.testing.assert_close(r.result, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="no registered layer named 'x'"):
        table["x"]


def test_replace_solver_keeps_layer_index_and_new_solver_is_unprepared():
    model = _mlp()
    precond = KFACPreconditioner(model, solver="cholesky", inverse_update_every=1)
    table = precond.layer_table
    index = table.solver_for("2").layer_index
    fresh = precond.new_solver("2")
    assert type(fresh) is type(table.solver_for("2")) and not fresh.ready
    table.replace_solver("2", fresh)
    assert table.solver_for("2") is fresh and fresh.layer_index == index == 1
    assert table["2"].fallback is None


def test_rng_state_round_trip_reproduces_mc_labels():
    model = _mlp()
    precond = KFACPreconditioner(model, fisher_type="mc", seed=5)
    assert precond.rng_state() is None  # created on first use
    x, _ = _batch()
    precond.accumulate_curvature(model(x))
    saved = precond.rng_state()
    precond.accumulate_curvature(model(x))
    after = precond.rng_state()
    precond.set_rng_state(saved)
    precond.accumulate_curvature(model(x))
    assert torch.equal(precond.rng_state(), after) and not torch.equal(saved, after)


def test_core_modules_use_no_private_names_of_other_modules():
    """The seam rule: no ``from x import _y`` and no ``obj._attr`` on another object in the
    preconditioner, its layer table, capture, fisher, distributed and the other optimizers."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "thermo_kfac"
    files = [root / f for f in ("preconditioner.py", "layers.py", "fisher.py", "adafisher.py",
                                "eva.py", "singd.py")]
    files += sorted((root / "capture").glob("*.py")) + sorted((root / "distributed").glob("*.py"))
    offences = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                offences += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names
                             if a.name.startswith("_")]
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                  and not node.attr.startswith("__")
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                offences.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert offences == []
