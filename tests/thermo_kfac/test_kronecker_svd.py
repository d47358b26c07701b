"""Kronecker-SVD curvature (KPSVD, deflation, KFAC-corrected) and the fisher-error tool, checked
against explicitly formed Fisher blocks from autograd and dense linear algebra (float64)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermo_kfac import KFACPreconditioner
from thermo_kfac.cli import main
from thermo_kfac.experiments.fisher_error import exact_fishers, relative_errors
from thermo_kfac.solvers.kronecker_svd import (
    KroneckerSVDSolver,
    TwoTermInverse,
    kronecker_svd,
    rearrange,
    rearranged_matvec,
    rearranged_rmatvec,
    split_passes,
)

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: one thread is far faster than several on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def _autograd_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact empirical Fisher ``(1/N) sum_n grad l_n grad l_n^T`` of every Linear layer, over the
    row-major flattened ``[W | b]``, from a loop of per-example backward passes."""
    grads: dict[str, list[torch.Tensor]] = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for name, m in layers.items():
            grads.setdefault(name, []).append(torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).reshape(-1))
    return {name: torch.stack(v).T @ torch.stack(v) / len(x) for name, v in grads.items()}


def _rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-example inputs (ones appended) and output gradients ``dl_n/ds_n`` of each Linear layer."""
    store: dict[str, list[torch.Tensor]] = {}

    def hooks(name: str):
        def fwd(module, args, out):
            store[name] = [torch.cat([args[0].detach(), torch.ones(len(args[0]), 1, dtype=DT)], 1)]
            out.register_hook(lambda g: store[name].append(g.detach()))
        return fwd

    handles = [m.register_forward_hook(hooks(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    F.cross_entropy(model(x), y, reduction="sum").backward()
    for h in handles:
        h.remove()
    return {n: (v[0], v[1]) for n, v in store.items()}


def _error(Fx: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    approx = sum(torch.kron(G, A) for A, G in terms)
    return float((approx - Fx).norm() / Fx.norm())


def test_matrix_free_products_match_explicit_rearrangement() -> None:
    gen = torch.Generator().manual_seed(0)
    n, r, k, d_in, d_out = 4, 3, 2, 5, 3
    a = torch.randn(n * r, d_in, generator=gen, dtype=DT)
    g = torch.randn(k, n * r, d_out, generator=gen, dtype=DT)
    for rows_per_example in (1, r):
        Fx = torch.zeros(d_out * d_in, d_out * d_in, dtype=DT)
        for e in range(n * r // rows_per_example):
            sl = slice(e * rows_per_example, (e + 1) * rows_per_example)
            for kk in range(k):
                v = (g[kk, sl].T @ a[sl]).reshape(-1)  # per-example gradient sum_r g a^T
                Fx += torch.outer(v, v)
        RF = rearrange(Fx, d_out, d_in)
        W = torch.randn(2, d_out, d_out, generator=gen, dtype=DT)
        U = torch.randn(2, d_in, d_in, generator=gen, dtype=DT)
        got = rearranged_matvec(a, g, W, rows_per_example).reshape(2, -1)
        torch.testing.assert_close(got, (RF @ W.reshape(2, -1).T).T)
        got = rearranged_rmatvec(a, g, U, rows_per_example).reshape(2, -1)
        torch.testing.assert_close(got, (RF.T @ U.reshape(2, -1).T).T)
        # rearrange(kron(G, A)) = vec(A) vec(G)^T and norms are preserved
        A, G = U[0] @ U[0].T, W[0] @ W[0].T
        torch.testing.assert_close(rearrange(torch.kron(G, A), d_out, d_in),
                                   torch.outer(A.reshape(-1), G.reshape(-1)))
        # the truncated SVD of R(F) is what kronecker_svd returns (ranks 1 and 2)
        u, s, vh = torch.linalg.svd(RF)
        res = kronecker_svd(a, g, 2, rows_per_example=rows_per_example, tol=1e-12, max_iter=5000)
        assert res.converged
        torch.testing.assert_close(res.singular_values, s[:2])
        for rank in (1, 2):
            approx = sum(torch.kron(G_k, A_k) for A_k, G_k in res.terms[:rank])
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]
            torch.testing.assert_close(rearrange(approx, d_out, d_in), best, atol=1e-8, rtol=1e-8)
        A1, G1 = res.terms[0]
        assert torch.linalg.eigvalsh(A1).min() > -1e-10 and torch.linalg.eigvalsh(G1).min() > -1e-10


def test_error_ordering_against_autograd_fisher() -> None:
    """KPSVD <= K-FAC and deflation, KFAC-corrected <= KPSVD on every layer of an MLP (float64)."""
    for seed in (0, 1):
        model = _mlp(seed)
        x, y = _data(seed=seed + 10)
        exact = _autograd_fisher(model, x, y)
        rows = _rows(model, x, y)
        n = len(x)
        for name, Fx in exact.items():
            a, g = rows[name]
            g = g / math.sqrt(n)  # F = (1/N) sum_n (g g^T) kron (a a^T)
            A, G = a.T @ a / n, g.T @ g
            kw = {"tol": 1e-12, "max_iter": 5000}
            two = kronecker_svd(a, g, 2, **kw).terms
            corr = kronecker_svd(a, g, 1, subtract=(A, G), **kw).terms
            e_kfac, e_kpsvd = _error(Fx, [(A, G)]), _error(Fx, two[:1])
            e_defl, e_corr = _error(Fx, two), _error(Fx, [(A, G), *corr])
            assert e_kpsvd <= e_kfac + 1e-12, (name, e_kpsvd, e_kfac)
            assert e_defl <= e_kpsvd + 1e-12 and e_corr <= e_kpsvd + 1e-12, (name, e_defl, e_corr, e_kpsvd)
            assert e_defl < e_kpsvd < e_kfac  # strict on random data: the methods do differ
            # Eckart-Young: the rank-1 error is the tail of R(F)'s singular values
            s = torch.linalg.svdvals(rearrange(Fx, *G.shape[:1], A.shape[0]))
            assert e_kpsvd == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-8)


def test_two_term_inverse_matches_dense_solve() -> None:
    gen = torch.Generator().manual_seed(3)
    d_in, d_out = 5, 4
    X = torch.randn(20, d_in, generator=gen, dtype=DT)
    Y = torch.randn(20, d_out, generator=gen, dtype=DT)
    A1, G1 = X.T @ X / 20, Y.T @ Y / 20
    A2 = 0.05 * torch.randn(d_in, d_in, generator=gen, dtype=DT)
    G2 = 0.05 * torch.randn(d_out, d_out, generator=gen, dtype=DT)
    A2, G2 = A2 + A2.T, G2 + G2.T  # indefinite, as a deflation term can be
    lam_a, lam_g = 0.3, 0.1
    inv = TwoTermInverse.build(A1, G1, lam_a, lam_g, A2, G2, eigenvalue_floor=1e-6)
    M = (torch.kron(G1 + lam_g * torch.eye(d_out, dtype=DT), A1 + lam_a * torch.eye(d_in, dtype=DT))
         + torch.kron(G2, A2))
    assert torch.linalg.eigvalsh(M).min() > 0 and inv.clamped == 0
    V = torch.randn(d_out, d_in, generator=gen, dtype=DT)
    expected = torch.linalg.solve(M, V.reshape(-1)).reshape(d_out, d_in)
    torch.testing.assert_close(inv.apply(V), expected)
    # one term: the K-FAC inverse (G1 + lam_g)^-1 V (A1 + lam_a)^-1
    one = TwoTermInverse.build(A1, G1, lam_a, lam_g)
    torch.testing.assert_close(one.apply(V), torch.linalg.solve(G1 + lam_g * torch.eye(d_out, dtype=DT), V)
                               @ torch.linalg.inv(A1 + lam_a * torch.eye(d_in, dtype=DT)))
    # an indefinite sum gets its generalized eigenvalues floored (and counted)
    bad = TwoTermInverse.build(A1, G1, lam_a, lam_g, 50 * A2, 50 * G2, eigenvalue_floor=0.1)
    assert bad.clamped > 0 and bool(torch.isfinite(bad.apply(V)).all())


def _scaled_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   fisher: str) -> dict[str, torch.Tensor]:
    """The block the preconditioner approximates for mean cross-entropy: (1/N) sum_n F_n."""
    out = {}
    for layer in exact_fishers(model, x, y, "cross_entropy", fisher):
        V = layer.grads.flatten(1)
        out[layer.name] = V.T @ V
    return out


@pytest.mark.parametrize("fisher_type", ["empirical", "type2"])
def test_preconditioner_pairs_rows_per_example(fisher_type: str) -> None:
    """With factor_decay=0 the solver's KPSVD term is the best Kronecker product of the exact
    (empirical / GGN) Fisher of the batch: the rows reach it correctly paired and scaled."""
    model = _mlp(2)
    x, y = _data(16, seed=5)
    reference = _scaled_fisher(_mlp(2), x, y, "empirical" if fisher_type == "empirical" else "ggn")
    for curvature in ("kpsvd", "deflation", "kfac_corrected"):
        pre = KFACPreconditioner(model, curvature=curvature, fisher_type=fisher_type, factor_decay=0.0,
                                 factor_dtype=DT, damping=1e-2,
                                 solver_options={"tol": 1e-12, "max_iter": 5000})
        model.zero_grad()
        out = model(x)
        pre.accumulate_curvature(out)
        F.cross_entropy(out, y).backward()
        pre.step()
        for name, state in pre._layers.items():
            Fx = reference[name]
            terms = state.solver.approximation()
            d_out, d_in = terms[0][1].shape[0], terms[0][0].shape[0]
            u, s, vh = torch.linalg.svd(rearrange(Fx, d_out, d_in))
            if curvature == "kfac_corrected":
                A, G = pre.factors()[name]
                residual = rearrange(Fx - torch.kron(G, A), d_out, d_in)
                ur, sr, vhr = torch.linalg.svd(residual)
                expected = rearrange(torch.kron(G, A), d_out, d_in) + sr[0] * torch.outer(ur[:, 0], vhr[0])
            else:
                rank = 1 if curvature == "kpsvd" else 2
                expected = (u[:, :rank] * s[:rank]) @ vh[:rank]
            got = rearrange(sum(torch.kron(G_k, A_k) for A_k, G_k in terms), d_out, d_in)
            torch.testing.assert_close(got, expected, atol=1e-7 * float(s[0]), rtol=1e-6)
        pre.remove_hooks()


@pytest.mark.parametrize("curvature", ["kfac", "kpsvd", "deflation", "kfac_corrected"])
def test_training_with_each_curvature_lowers_the_loss(curvature: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = (x @ torch.randn(8, 3, generator=gen)).argmax(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    pre = KFACPreconditioner(model, curvature=curvature, damping=0.1, kl_clip=1e-2, optimizer=opt,
                             factor_update_every=2, inverse_update_every=4)
    with torch.no_grad():
        start = float(F.cross_entropy(model(x), y))
    for step in range(40):
        idx = torch.arange(step * 64, step * 64 + 64) % 256
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        pre.step()
        opt.step()
    with torch.no_grad():
        end = float(F.cross_entropy(model(x), y))
    assert end < 0.6 * start, (curvature, start, end)
    assert pre.fallbacks() == dict.fromkeys(pre.layers, 0)
    if curvature != "kfac":
        info = pre.last_report["solver_reports"]["0/apply"].info
        assert info["converged"] and info["power_iterations"] >= 1


def test_mc_samples_and_state_dict_resume() -> None:
    """mc_samples > 1 stacks several backward passes per example (summed per row); a resumed run
    continues bitwise like an uninterrupted one."""
    x, y = _data(32, seed=7)

    def run(steps: int, state=None, model=None):
        model = model or _mlp(4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        pre = KFACPreconditioner(model, curvature="deflation", fisher_type="mc", mc_samples=2,
                                 factor_dtype=DT, damping=0.1, inverse_update_every=2)
        if state is not None:
            pre.load_state_dict(state)
        for _ in range(steps):
            opt.zero_grad()
            out = model(x)
            pre.accumulate_curvature(out)
            F.cross_entropy(out, y).backward()
            pre.step()
            opt.step()
        return model, pre

    full, _ = run(5)
    half, pre = run(3)
    state = pre.state_dict()
    pre.remove_hooks()
    assert state["layers"]["0"]["solver"]["batches_seen"] == 3
    resumed, _ = run(2, state=state, model=half)
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_curvature_and_options_raise_clear_errors() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="curvature='kpsv'.*'kfac', 'kpsvd', 'deflation', 'kfac_corrected'"):
        KFACPreconditioner(model, curvature="kpsv")
    with pytest.raises(ValueError, match="solver='cholesky' cannot be combined with curvature='deflation'"):
        KFACPreconditioner(model, curvature="deflation", solver="cholesky")
    with pytest.raises(ValueError, match="factor_decay"):
        KFACPreconditioner(model, curvature="kpsvd", solver_options={"decay": 0.5})
    with pytest.raises(ValueError, match="invalid solver_options"):
        KFACPreconditioner(model, curvature="kpsvd", solver_options={"rank": 3})
    with pytest.raises(ValueError, match="curvature='kfac'"):
        KroneckerSVDSolver("kfac")
    with pytest.raises(ValueError, match="inner_solver"):
        KroneckerSVDSolver("deflation", inner_solver="cholesky")
    with pytest.raises(ValueError, match="eigenvalue_floor"):
        KroneckerSVDSolver("kpsvd", eigenvalue_floor=0)
    with pytest.raises(ValueError, match="cannot pair 7 output-gradient rows with 3 input rows"):
        split_passes(torch.zeros(3, 2), torch.zeros(7, 2))


def test_kpsvd_with_an_inner_solver_matches_the_builtin_solve() -> None:
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(30, 4, generator=gen, dtype=DT) / math.sqrt(30)
    g = torch.randn(30, 3, generator=gen, dtype=DT)
    V = torch.randn(3, 4, generator=gen, dtype=DT)
    from thermo_kfac.solvers.base import Damping

    results = []
    for options in ({}, {"inner_solver": "cholesky"}):
        solver = KroneckerSVDSolver("kpsvd", decay=0.0, tol=1e-12, **options)
        solver.prepare(a.T @ a, g.T @ g, Damping(0.05))
        solver.observe_batch(a, g)
        assert solver.ready
        results.append(solver.apply(V))
    torch.testing.assert_close(results[0], results[1])


def test_fisher_error_tool_against_explicit_fisher_and_cli_json(tmp_path) -> None:
    model = _mlp(5)
    x, y = _data(12, seed=9)
    exact = _autograd_fisher(_mlp(5), x, y)
    for layer in exact_fishers(model, x, y, "cross_entropy", "empirical"):
        errors = relative_errors(layer)
        gram = relative_errors(layer, dense_limit=0)  # the F-free evaluation used for big layers
        assert gram == pytest.approx(errors, rel=1e-6, abs=1e-7)
        Fx = exact[layer.name]
        a, g = layer.a, layer.g[0]
        kfac = _error(Fx, [(a.T @ a / len(x), g.T @ g)])
        assert errors["kfac_expand"] == pytest.approx(kfac, rel=1e-6)
        assert errors["kfac_reduce"] == errors["kfac_expand"]  # no weight sharing
        diag = float((Fx - torch.diag(Fx.diagonal())).norm() / Fx.norm())
        assert errors["diagonal"] == pytest.approx(diag, rel=1e-6)
        s = torch.linalg.svdvals(rearrange(Fx, g.shape[1], a.shape[1]))
        assert errors["kpsvd"] == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-6)
        assert errors["deflation"] == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-6)

    out = tmp_path / "fe.json"
    code = main(["fisher-error", "--widths", "8", "--batch-size", "16", "--fisher", "empirical",
                 "--json", str(out), "--csv", str(tmp_path / "fe.csv"), "--plot", str(tmp_path / "fe.png")])
    assert code == 0
    data = json.loads(out.read_text())
    methods = {"kfac_expand", "kfac_reduce", "kpsvd", "deflation", "kfac_corrected", "diagonal"}
    assert {r["method"] for r in data["layers"]} == methods
    names = {r["name"] for r in data["layers"]}
    assert len(names) == 2 and len(data["layers"]) == 2 * len(methods)
    for row in data["layers"]:
        assert set(row) >= {"name", "method", "rel_error"} and 0 <= row["rel_error"] <= 1
    by = {(r["name"], r["method"]): r["rel_error"] for r in data["layers"]}
    for name in names:
        assert by[(name, "kpsvd")] <= by[(name, "kfac_expand")] + 1e-12
        assert by[(name, "deflation")] <= by[(name, "kpsvd")] + 1e-12
    assert (tmp_path / "fe.png").stat().st_size > 0
    assert (tmp_path / "fe.csv").read_text().startswith("name,fisher,method,rel_error")
    assert main(["fisher-error", "--fisher", "empirical", "--batch-size", "0"]) == 2


def test_fisher_error_on_weight_sharing_conv_layers() -> None:
    """A Conv2d shares its weight over positions: the exact block has cross-position terms, expand
    and reduce differ, and the best Kronecker product (KPSVD, per-example rearrangement) beats both."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3, stride=2),
                          nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(10, 1, 5, 5, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (10,), generator=gen)
    for fisher in ("empirical", "ggn"):
        layers = exact_fishers(model, x, y, "cross_entropy", fisher)
        assert [layer.positions for layer in layers] == [25, 4, 1]
        for layer in layers:
            err = relative_errors(layer)
            assert err["kpsvd"] <= min(err["kfac_expand"], err["kfac_reduce"]) + 1e-10
            assert err["deflation"] <= err["kpsvd"] + 1e-10
            if layer.positions > 1:
                assert abs(err["kfac_expand"] - err["kfac_reduce"]) > 1e-3
        if fisher == "empirical":  # per-example matrices = single-example backward passes
            conv = model[0]
            for i in (0, 7):
                model.zero_grad()
                F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
                ref = torch.cat([conv.weight.grad.reshape(2, -1), conv.bias.grad[:, None]], 1)
                torch.testing.assert_close(layers[0].grads[i] * math.sqrt(len(x)), ref)


def test_conv_layers_train_with_per_row_kronecker_svd() -> None:
    """Conv2d rows (one per position) pair per row; a small CNN trains with each two-term curvature."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 1, 6, 6, generator=gen)
    y = (x.flatten(1) @ torch.randn(36, 3, generator=gen)).argmax(1)
    for curvature in ("deflation", "kfac_corrected"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pre = KFACPreconditioner(model, curvature=curvature, damping=0.1, kl_clip=1e-2, optimizer=opt,
                                 inverse_update_every=3)
        losses = []
        for _ in range(25):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            pre.step()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.6 * losses[0], (curvature, losses[0], losses[-1])
        assert pre.layer_table["0"].solver.terms[0][0].shape == (10, 10)


def test_degenerate_layers_single_output_and_nonfinite_rows() -> None:
    """A single-output layer has a 1x1 G (R(F) has rank <= 1): deflation's second term is zero.
    Non-finite rows leave the averaged terms untouched."""
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(20, 4, generator=gen, dtype=DT)
    g = torch.randn(20, 1, generator=gen, dtype=DT)
    res = kronecker_svd(a, g, 2)
    assert len(res.terms) == 2 and float(res.terms[1][0].abs().sum()) == 0.0
    Fx = sum(torch.kron(torch.outer(g[i], g[i]), torch.outer(a[i], a[i])) for i in range(20))
    assert _error(Fx, res.terms) < 1e-6  # with d_out = 1 every F is a Kronecker product
    from thermo_kfac.solvers.base import Damping

    solver = KroneckerSVDSolver("deflation", decay=0.5)
    solver.prepare(a.T @ a, g.T @ g, Damping(0.1))
    solver.observe_batch(a / math.sqrt(20), g)
    before = [t.clone() for pair in solver.terms for t in pair]
    bad = g.clone()
    bad[3, 0] = float("nan")
    solver.observe_batch(a / math.sqrt(20), bad)
    assert all(torch.equal(x, y) for x, y in zip(before, [t for p in solver.terms for t in p], strict=True))
    assert bool(torch.isfinite(solver.apply(torch.ones(1, 4, dtype=DT))).all())
