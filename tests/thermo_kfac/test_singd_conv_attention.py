"""SINGD on nn.Conv2d and attention projections: the first factor update against closed forms built
from independently computed statistics (F.unfold patches, a functional attention forward), the
multi-step IKFAC ~ damped K-FAC agreement on a conv net, and bfloat16 training on the digits
CNN and ViT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermo_kfac.data import load_dataset
from thermo_kfac.models import build_model
from thermo_kfac.singd import SINGD

D = torch.float64


def _first_update_reference(U: torch.Tensor, G: torch.Tensor, lam: float, beta1: float, kfac_like: bool):
    """``K`` and ``C`` after one update from ``K = C = I`` (alpha1 irrelevant: zero momenta)."""
    eye_a, eye_g = torch.eye(len(U), dtype=D), torch.eye(len(G), dtype=D)
    if kfac_like:
        m_K, m_C = (U + lam * eye_a - eye_a) / 2, (G + lam * eye_g - eye_g) / 2
    else:
        d_in, d_out = len(U), len(G)
        m_K = (torch.trace(G) * U + lam * d_out * eye_a - d_out * eye_a) / (2 * d_out)
        m_C = (torch.trace(U) * G + lam * d_in * eye_g - d_in * eye_g) / (2 * d_in)
    return eye_a - beta1 * m_K, eye_g - beta1 * m_C


def _dense(structure) -> torch.Tensor:
    return structure.to_dense()


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        self.out = self.conv(x)
        return self.head(torch.tanh(self.out).flatten(1))


@pytest.mark.parametrize("kfac_like", [True, False])
def test_conv2d_first_update_matches_unfolded_patch_statistics(kfac_like):
    torch.manual_seed(0)
    model = _ConvNet().to(D)
    lam, beta1 = 0.1, 0.3
    opt = SINGD(model, lr=0.0, momentum=0.0, damping=lam, alpha1=0.0, beta1=beta1, T=1,
                kfac_like=kfac_like)
    assert opt.layers == ["conv", "head"]
    x, y = torch.randn(5, 2, 8, 8, dtype=D), torch.randint(0, 4, (5,))
    out = model(x)
    model.out.retain_grad()
    F.cross_entropy(out, y).backward()
    grad = torch.cat([model.conv.weight.grad.flatten(1), model.conv.bias.grad[:, None]], 1)
    opt.step()
    # independent statistics: patches by F.unfold, one row per (example, position)
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    a = torch.cat([patches, torch.ones(len(patches), 1, dtype=D)], 1)
    g = model.out.grad.flatten(2).transpose(1, 2).reshape(-1, 3)
    U, G = a.T @ a / len(a), len(x) * g.T @ g
    K_ref, C_ref = _first_update_reference(U, G, lam, beta1, kfac_like)
    K, C = opt.factor_roots("conv")
    torch.testing.assert_close(_dense(K), K_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_dense(C), C_ref, rtol=1e-10, atol=1e-12)
    # the preconditioned gradient is C C^T grad K K^T of the conv's [W | b]
    nat = opt.preconditioned_gradient("conv")
    torch.testing.assert_close(nat, C_ref @ C_ref.T @ grad @ K_ref @ K_ref.T)
    # K really moved away from the identity (the test is not vacuous)
    assert (K_ref - torch.eye(19, dtype=D)).abs().max() > 1e-2


class _Attn(nn.Module):
    def __init__(self, e=8, heads=2, batch_first=True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=batch_first)
        self.head = nn.Linear(e, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(1))


def _functional_attention(mha: nn.MultiheadAttention, head: nn.Linear, x: torch.Tensor):
    """The same model through F.scaled_dot_product_attention, returning the projections to read
    their output gradients."""
    n, length, e = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = (t.reshape(n, length, heads, e // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
    ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, e)
    out = F.linear(ctx, mha.out_proj.weight, mha.out_proj.bias)
    return head(out.mean(1)), qkv, ctx, out


@pytest.mark.parametrize("kfac_like", [True, False])
def test_attention_projections_first_update_matches_functional_reference(kfac_like):
    torch.manual_seed(1)
    model = _Attn().to(D)
    lam, beta1 = 0.05, 0.2
    opt = SINGD(model, lr=0.0, momentum=0.0, damping=lam, alpha1=0.0, beta1=beta1, T=1,
                kfac_like=kfac_like)
    assert sorted(opt.layers) == ["attn.in_proj", "attn.out_proj", "head"]
    x, y = torch.randn(4, 5, 8, dtype=D), torch.randint(0, 3, (4,))
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    ref_model = _Attn().to(D)
    ref_model.load_state_dict(model.state_dict())
    logits, qkv, ctx, out = _functional_attention(ref_model.attn, ref_model.head, x)
    for t in (qkv, out):
        t.retain_grad()
    F.cross_entropy(logits, y).backward()
    # the functional reference has the same parameter gradients as the patched module
    torch.testing.assert_close(ref_model.attn.in_proj_weight.grad, grads["attn.in_proj_weight"])
    ones = torch.ones(4 * 5, 1, dtype=D)
    for name, inputs, outputs in (("attn.in_proj", x, qkv), ("attn.out_proj", ctx, out)):
        a = torch.cat([inputs.detach().reshape(-1, 8), ones], 1)
        g = outputs.grad.reshape(20, -1)
        K_ref, C_ref = _first_update_reference(a.T @ a / 20, 4 * g.T @ g, lam, beta1, kfac_like)
        K, C = opt.factor_roots(name)
        torch.testing.assert_close(_dense(K), K_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(_dense(C), C_ref, rtol=1e-9, atol=1e-12)


def test_ikfac_on_conv_tracks_damped_kfac_over_many_steps():
    """IKFAC with alpha1 = 0 follows S <- (1 - beta1) S + beta1 (U + lam I) to first order in beta1."""
    torch.manual_seed(2)
    model = _ConvNet().to(D)
    lam, beta1, steps = 0.1, 0.02, 40
    opt = SINGD(model, lr=0.0, momentum=0.0, damping=lam, alpha1=0.0, beta1=beta1, T=1, kfac_like=True)
    S_A = torch.eye(19, dtype=D)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = 2 * torch.randn(8, 2, 8, 8, generator=gen, dtype=D)
        y = torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
        a = torch.cat([patches, torch.ones(len(patches), 1, dtype=D)], 1)
        S_A = (1 - beta1) * S_A + beta1 * (a.T @ a / len(a) + lam * torch.eye(19, dtype=D))
        F.cross_entropy(model(x), y).backward()
        opt.step()
    K = _dense(opt.factor_roots("conv")[0])
    ref = torch.linalg.inv(S_A)
    moved = float((torch.eye(19, dtype=D) - ref).norm() / ref.norm())
    err = float((K @ K.T - ref).norm() / ref.norm())
    assert moved > 0.3 and err < 0.1 * moved, (moved, err)


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
def test_bfloat16_singd_trains_digits_cnn_and_vit(model_name):
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(model_name, data).to(torch.bfloat16)
    opt = SINGD(model, lr=0.01 if model_name == "cnn" else 0.02, momentum=0.9, damping=1e-2, T=5,
                beta1=0.01, alpha1=0.5, structure="dense", dtype=torch.bfloat16)
    conv_or_attn = [n for n in opt.layers if n.startswith("features") or "in_proj" in n]
    assert conv_or_attn, opt.layers  # convolutions / attention projections are preconditioned
    x_all, y_all = data.x_train.to(torch.bfloat16), data.y_train
    gen = torch.Generator().manual_seed(0)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x_all[:512]).float(), y_all[:512]))

    before = eval_loss()
    for _ in range(120):
        idx = torch.randint(0, len(x_all), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x_all[idx]).float(), y_all[idx]).backward()
        opt.step()
    after = eval_loss()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for name in conv_or_attn:
        K, C = opt.factor_roots(name)
        assert K.dtype == torch.bfloat16 and torch.isfinite(K.to_dense()).all()
        assert not torch.equal(K.to_dense(), torch.eye(K.dim, dtype=torch.bfloat16))
    assert after < 0.5 * before, (before, after)
    opt.remove_hooks()


def test_grouped_conv_is_refused_with_the_skip_fix():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="skip"):
        SINGD(model)
    opt = SINGD(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)), skip=["^0$"])
    assert opt.layers == ["2"]


def test_remove_hooks_restores_attention_forward():
    model = _Attn()
    opt = SINGD(model)
    assert "forward" in model.attn.__dict__
    opt.remove_hooks()
    assert "forward" not in model.attn.__dict__
