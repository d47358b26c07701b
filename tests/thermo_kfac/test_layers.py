"""Layer coverage: attention, transformer blocks, Embedding, weight tying, generic linear maps,
norm layers, and the ViT/GCN models of the zoo training with K-FAC.

References are independent: factors are rebuilt from tensors retained in a hand-written forward,
and the preconditioned gradient from an eigendecomposition of the damped factors.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermo_kfac import KFACPreconditioner
from thermo_kfac.capture import AttentionCapture, linear_map
from thermo_kfac.data import load_dataset, make_sbm
from thermo_kfac.models import GCN, TinyViT, build_model

DT = torch.float64
DAMPING = 1e-2  # factored: sqrt(1e-2) = 0.1 added to each factor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _damped_inverse(M: torch.Tensor, shift: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(M)
    return evecs @ torch.diag(1.0 / (evals + shift)) @ evecs.T


def _expected_update(A: torch.Tensor, G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    gamma = math.sqrt(DAMPING)
    return _damped_inverse(G, gamma) @ V @ _damped_inverse(A, gamma)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)


def _precond(model: nn.Module, **kwargs) -> KFACPreconditioner:
    return KFACPreconditioner(model, damping=DAMPING, factor_decay=0.0, factor_dtype=DT,
                              inverse_update_every=1, fallback_solver=None, **kwargs)


# ------------------------------------------------------------------------------- attention
ATTENTION_CASES = [
    dict(batch_first=True, cross=False),
    dict(batch_first=False, cross=False),
    dict(batch_first=True, cross=True),
    dict(batch_first=True, cross=False, key_padding=True, need_weights=True),
    dict(batch_first=False, cross=True, float_mask=True, need_weights=True, average=False),
    dict(batch_first=True, cross=False, causal=True),
    dict(batch_first=True, cross=False, unbatched=True, need_weights=True),
]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_capture_is_identical_to_multihead_attention(case):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=case["batch_first"]).to(DT)
    reference = copy.deepcopy(mha)
    capture = AttentionCapture(mha)
    n, length, src = 3, 5, 4
    gen = _gen(1)

    def sample(seq: int) -> torch.Tensor:
        if case.get("unbatched"):
            return torch.randn(seq, 8, generator=gen, dtype=DT)
        shape = (n, seq, 8) if case["batch_first"] else (seq, n, 8)
        return torch.randn(*shape, generator=gen, dtype=DT)

    q = sample(length)
    k, v = (sample(src), sample(src)) if case["cross"] else (q, q)
    kwargs = dict(need_weights=case.get("need_weights", False),
                  average_attn_weights=case.get("average", True))
    if case.get("key_padding"):
        pad = torch.zeros(n, length, dtype=torch.bool)
        pad[0, -2:] = True
        kwargs["key_padding_mask"] = pad
    if case.get("float_mask"):
        kwargs["attn_mask"] = torch.randn(length, src, generator=gen, dtype=DT)
    if case.get("causal"):
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, dtype=DT)
        kwargs["is_causal"] = True
    out, weights = mha(q, k, v, **kwargs)
    ref_out, ref_weights = reference(q, k, v, **kwargs)
    torch.testing.assert_close(out, ref_out)
    if kwargs["need_weights"]:
        torch.testing.assert_close(weights, ref_weights)
    # same parameter gradients
    out.square().sum().backward()
    ref_out.square().sum().backward()
    for (name, p), p_ref in zip(mha.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    capture.remove()
    assert "forward" not in mha.__dict__


class AttentionClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))


def test_attention_projections_are_preconditioned_with_their_own_factors():
    torch.manual_seed(2)
    model = AttentionClassifier().to(DT)
    reference = copy.deepcopy(model)
    precond = _precond(model)
    assert precond.layers == ["attn.in_proj", "attn.out_proj", "head"]
    n, length = 5, 4
    x = torch.randn(n, length, 6, generator=_gen(3), dtype=DT)
    y = torch.randint(0, 3, (n,), generator=_gen(4))
    F.cross_entropy(model(x), y).backward()
    precond.step()

    # independent forward: explicit projections and torch's scaled_dot_product_attention
    m = reference.attn
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
    qkv.retain_grad()
    q, k, v = (t.reshape(n, length, 2, 3).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, 6)
    attn_out = m.out_proj(context)
    attn_out.retain_grad()
    F.cross_entropy(reference.head(attn_out.mean(dim=1)), y).backward()
    weight = 1.0 * n  # empirical G is scaled by 1/c, c = 1/N for the cross-entropy mean

    A_in = _ones(x).reshape(-1, 7)
    g_in = qkv.grad.reshape(-1, 18)
    A_out = _ones(context.detach()).reshape(-1, 7)
    g_out = attn_out.grad.reshape(-1, 6)
    expected = {
        "attn.in_proj": (A_in.T @ A_in / (n * length), g_in.T @ g_in * weight,
                         torch.cat([m.in_proj_weight.grad, m.in_proj_bias.grad[:, None]], 1)),
        "attn.out_proj": (A_out.T @ A_out / (n * length), g_out.T @ g_out * weight,
                          torch.cat([m.out_proj.weight.grad, m.out_proj.bias.grad[:, None]], 1)),
    }
    factors = precond.factors()
    grads = {"attn.in_proj": torch.cat([model.attn.in_proj_weight.grad,
                                        model.attn.in_proj_bias.grad[:, None]], 1),
             "attn.out_proj": torch.cat([model.attn.out_proj.weight.grad,
                                         model.attn.out_proj.bias.grad[:, None]], 1)}
    for name, (A, G, V) in expected.items():
        torch.testing.assert_close(factors[name][0], A, msg=name)
        torch.testing.assert_close(factors[name][1], G, msg=name)
        torch.testing.assert_close(grads[name], _expected_update(A, G, V), msg=name)


def test_transformer_encoder_layer_registers_all_projections_and_matches():
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).to(DT)
    reference = copy.deepcopy(layer)
    precond = _precond(layer, loss="mse")
    assert precond.layers == ["self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"]
    x = torch.randn(3, 5, 8, generator=_gen(6), dtype=DT)
    out = layer(x)
    torch.testing.assert_close(out, reference(x))
    raw = {n: p.grad for n, p in layer.named_parameters()}
    assert all(g is None for g in raw.values())
    F.mse_loss(out, torch.zeros_like(out)).backward()
    raw = {n: p.grad.clone() for n, p in layer.named_parameters()}
    precond.step()  # raises if a registered layer's hooks did not fire
    changed = {n for n, p in layer.named_parameters() if not torch.equal(p.grad, raw[n])}
    assert changed == {"self_attn.in_proj_weight", "self_attn.in_proj_bias",
                       "self_attn.out_proj.weight", "self_attn.out_proj.bias", "linear1.weight",
                       "linear1.bias", "linear2.weight", "linear2.bias"}  # norms untouched


def test_transformer_decoder_layer_self_and_cross_attention():
    torch.manual_seed(16)
    layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True).to(DT)
    reference = copy.deepcopy(layer)
    precond = _precond(layer, loss="mse")
    assert precond.layers == ["self_attn.in_proj", "self_attn.out_proj", "multihead_attn.in_proj",
                              "multihead_attn.out_proj", "linear1", "linear2"]
    tgt = torch.randn(2, 4, 8, generator=_gen(17), dtype=DT)
    memory = torch.randn(2, 6, 8, generator=_gen(18), dtype=DT)
    mask = nn.Transformer.generate_square_subsequent_mask(4, dtype=DT)
    out = layer(tgt, memory, tgt_mask=mask)
    torch.testing.assert_close(out, reference(tgt, memory, tgt_mask=mask))
    F.mse_loss(out, torch.zeros_like(out)).backward()
    precond.step()
    # cross-attention: query (4) + key (6) + value (6) tokens share in_proj, R = 16 per example
    with torch.no_grad():
        query = reference.norm1(tgt + reference._sa_block(tgt, mask, None))
    rows = _ones(torch.cat([query, memory, memory], dim=1)).reshape(-1, 9)
    torch.testing.assert_close(precond.factors()["multihead_attn.in_proj"][0], rows.T @ rows / 32)


def test_unsupported_attention_configuration_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 8))
    model.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match=r"'attn'.*add_bias_kv.*skip=\['attn'\]"):
        KFACPreconditioner(model)
    assert KFACPreconditioner(model, skip=["attn"]).layers == ["0"]


# ------------------------------------------------------------------------------- embedding
class BagOfTokens(nn.Module):
    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens)).mean(dim=1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_embedding_factors_and_preconditioned_gradient(approx):
    torch.manual_seed(7)
    model = BagOfTokens().to(DT)
    reference = copy.deepcopy(model)
    precond = _precond(model, kfac_approx=approx)
    assert precond.layers == ["emb", "head"]
    n, length, vocab = 6, 5, 7
    tokens = torch.randint(0, vocab, (n, length), generator=_gen(8))
    y = torch.randint(0, 3, (n,), generator=_gen(9))
    emb_out = reference.emb(tokens)  # independent pass for the reference statistics
    emb_out.retain_grad()
    F.cross_entropy(reference.head(torch.tanh(emb_out).mean(dim=1)), y).backward()
    g = emb_out.grad
    V = reference.emb.weight.grad.T  # the linear map's (E, V) orientation
    F.cross_entropy(model(tokens), y).backward()
    precond.step()
    onehot = F.one_hot(tokens, vocab).to(DT)  # (N, R, V)
    if approx == "expand":
        A = torch.diag(onehot.sum(dim=(0, 1))) / (n * length)
        rows = g.reshape(-1, 4)
    else:
        mean = onehot.mean(dim=1)
        A = mean.T @ mean / n
        rows = g.sum(dim=1)
    G = rows.T @ rows * n
    A_kfac, G_kfac = precond.factors()["emb"]
    torch.testing.assert_close(A_kfac, A)
    torch.testing.assert_close(G_kfac, G)
    torch.testing.assert_close(model.emb.weight.grad, _expected_update(A, G, V).T)


def test_sparse_embedding_is_refused():
    with pytest.raises(ValueError, match="sparse=True"):
        KFACPreconditioner(nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Linear(3, 2)))


# ------------------------------------------------------------------------------- weight tying
class SharedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.second.bias = self.first.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_weight_tied_linear_layers_share_one_set_of_factors():
    torch.manual_seed(10)
    model = SharedLinear().to(DT)
    precond = _precond(model, loss="mse")
    assert precond.layers == ["first"]
    x = torch.randn(6, 4, generator=_gen(11), dtype=DT)
    with torch.no_grad():  # no capture
        hidden = torch.tanh(model.first(x))
    out = model(x)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    precond.step()
    rows = _ones(torch.cat([x, hidden]))  # the weight is applied at 2 positions per example
    torch.testing.assert_close(precond.factors()["first"][0], rows.T @ rows / 12)


class TiedLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.decoder = nn.Linear(4, 6, bias=False)
        self.decoder.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.emb(tokens))


def test_embedding_tied_to_decoder_is_refused_naming_both_layers():
    model = TiedLanguageModel()
    with pytest.raises(ValueError, match=r"'emb' and 'decoder'.*skip=\['decoder'\]"):
        KFACPreconditioner(model)
    assert KFACPreconditioner(model, skip=["decoder"]).layers == ["emb"]


# ------------------------------------------------------------------------- generic linear maps
class KronAAdapter(nn.Module):
    """KronA-style update: y = W0 x + s vec(B X A^T), X the (b2, a2) reshape of x."""

    def __init__(self, a: tuple[int, int] = (2, 3), b: tuple[int, int] = (3, 2), scale: float = 0.5):
        super().__init__()
        self.base = nn.Linear(a[1] * b[1], a[0] * b[0])
        self.A = nn.Parameter(torch.randn(*a))
        self.B = nn.Parameter(torch.randn(*b))
        self.dims, self.scale = (a, b), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (a1, a2), (b1, b2) = self.dims
        X = x.reshape(-1, b2, a2)  # rows of X are the inputs of A (R = b2)
        XA = linear_map(X, self.A)  # (N, b2, a1)
        BXA = linear_map(XA.transpose(1, 2), self.B)  # columns of X A^T are B's inputs (R = a1)
        return self.base(x) + self.scale * BXA.reshape(x.shape[0], -1)


def test_generic_linear_map_registration_kron_adapter():
    torch.manual_seed(12)
    model = KronAAdapter().to(DT)
    reference = copy.deepcopy(model)
    precond = _precond(model, loss="mse", linear_maps={"A": model.A, "B": model.B},
                       approx_per_layer={"^B$": "reduce"})
    assert precond.layers == ["base", "A", "B"]
    x = torch.randn(5, 6, generator=_gen(13), dtype=DT)
    out = model(x)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    V_A, V_B = model.A.grad.clone(), model.B.grad.clone()
    precond.step()
    # reference statistics from a hand-written forward
    X = x.reshape(5, 2, 3)
    XA = (X @ reference.A.T).detach().requires_grad_()
    BXA = XA.transpose(1, 2) @ reference.B.T
    result = reference.base(x) + 0.5 * BXA.reshape(5, -1)
    BXA.retain_grad()
    F.mse_loss(result, torch.zeros_like(result)).backward()
    c_inv = result.numel()
    A_A = X.reshape(-1, 3).T @ X.reshape(-1, 3) / 10  # expand: N R = 10 rows
    g_A = XA.grad.reshape(-1, 2)
    inputs_B = XA.detach().transpose(1, 2).mean(dim=1)  # reduce: per-example mean over R
    g_B = BXA.grad.sum(dim=1)
    factors = precond.factors()
    torch.testing.assert_close(factors["A"][0], A_A)
    torch.testing.assert_close(factors["A"][1], g_A.T @ g_A * c_inv)
    torch.testing.assert_close(factors["B"][0], inputs_B.T @ inputs_B / 5)
    torch.testing.assert_close(factors["B"][1], g_B.T @ g_B * c_inv)
    torch.testing.assert_close(model.A.grad, _expected_update(*factors["A"], V_A))
    torch.testing.assert_close(model.B.grad, _expected_update(*factors["B"], V_B))


def test_linear_map_errors():
    model = KronAAdapter()
    with pytest.raises(ValueError, match="2-d"):
        KFACPreconditioner(model, linear_maps={"v": nn.Parameter(torch.ones(3))})
    with pytest.raises(ValueError, match="already registered as .*'base'"):
        KFACPreconditioner(model, linear_maps={"w": model.base.weight})


def test_norm_layers_are_left_to_the_optimizer():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    assert KFACPreconditioner(model).layers == ["0", "3"]


# ------------------------------------------------------------------------------- model zoo
def _train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, approx: str, steps: int,
                 lr: float) -> tuple[float, float, list[str]]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    precond = KFACPreconditioner(model, damping=0.1, kfac_approx=approx, factor_update_every=1,
                                 inverse_update_every=5, kl_clip=1e-2, optimizer=opt)
    with torch.no_grad():
        first = float(F.cross_entropy(model(x), y))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        opt.step()
    with torch.no_grad():
        last = float(F.cross_entropy(model(x), y))
    return first, last, precond.layers


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_tiny_vit_trains_with_kfac(approx):
    torch.manual_seed(14)
    data = load_dataset("digits")
    model = build_model("vit", data, dim=16, depth=1, heads=2)
    assert isinstance(model, TinyViT)
    first, last, names = _train_steps(model, data.x_train[:64], data.y_train[:64], approx, 20, 0.3)
    assert "blocks.0.self_attn.in_proj" in names and "blocks.0.self_attn.out_proj" in names
    assert last < 0.8 * first  # measured: 0.57 (expand), 0.52 (reduce)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_gcn_trains_with_kfac_on_sbm(approx):
    torch.manual_seed(15)
    data = make_sbm(n_train=64, n_test=8)
    model = build_model("gcn", data, widths=(16,))
    assert isinstance(model, GCN)
    first, last, names = _train_steps(model, data.x_train, data.y_train, approx, 15, 0.3)
    assert names == ["layers.0.linear", "layers.1.linear"]
    assert last < 0.7 * first


def test_gcn_refuses_non_graph_data():
    with pytest.raises(ValueError, match="graph inputs"):
        build_model("gcn", load_dataset("digits"))


def test_sbm_dataset_is_seeded_and_well_formed():
    a, b = make_sbm(n_train=20, n_test=5, seed=3), make_sbm(n_train=20, n_test=5, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, make_sbm(n_train=20, n_test=5, seed=4).x_train)
    assert a.input_shape == (24, 8 + 24) and a.y_train.shape == (20, 24) and a.output_dim == 3
    adj = a.x_train[:, :, 8:]
    torch.testing.assert_close(adj, adj.transpose(1, 2))
    # D^-1/2 (A + I) D^-1/2 has spectral radius 1 (eigenvector D^1/2 1)
    torch.testing.assert_close(torch.linalg.eigvalsh(adj).max(dim=1).values, torch.ones(20))
    with pytest.raises(ValueError, match="p_in"):
        make_sbm(p_in=1.5)


def test_evaluate_counts_per_node_labels():
    from thermo_kfac.experiments.training import evaluate

    torch.manual_seed(19)
    data = make_sbm(n_train=10, n_test=6)
    model = build_model("gcn", data)
    loss, accuracy = evaluate(model, data.x_test, data.y_test, "cross_entropy")
    with torch.no_grad():
        out = model(data.x_test)
    assert loss == pytest.approx(float(F.cross_entropy(out, data.y_test)), rel=1e-6)
    assert accuracy == pytest.approx(float((out.argmax(dim=1) == data.y_test).float().mean()))


def test_adapter_contract_for_other_optimizers():
    """Optimizers written for module adapters (``make_adapter(name, module)``,
    ``adapter.module.weight``) keep seeing only Linear/Conv2d, and linear maps expose a module
    stand-in whose weight is the parameter and whose training flag is the owner's."""
    from thermo_kfac.capture import LinearMapAdapter, make_adapter

    emb = nn.Embedding(5, 3)
    assert make_adapter("emb", emb) is None
    assert make_adapter("emb", emb, extra=True) is not None
    mha = nn.MultiheadAttention(4, 2)
    adapter = LinearMapAdapter("in_proj", mha.in_proj_weight, mha.in_proj_bias, module=mha)
    assert adapter.module.weight is mha.in_proj_weight and adapter.module.bias is mha.in_proj_bias
    assert (adapter.d_in, adapter.d_out) == (5, 12)
    mha.eval()
    assert adapter.module.training is False
