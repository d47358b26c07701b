"""Workload tables against published parameter and FLOP counts."""

from __future__ import annotations

import pytest

from hw_models.workloads import WORKLOADS, LayerShape, Workload, mlp, workload


def test_vit_b16_matches_published_counts():
    vit = workload("vit-b16")
    # timm's vit_base_patch16_224 has 86,567,656 parameters; the ones outside Linear/Conv layers are
    # the class token (768), position embeddings (197 x 768) and 25 LayerNorms (2 x 768 each).
    outside = 768 + 197 * 768 + 25 * 2 * 768
    assert vit.params == 86_567_656 - outside
    # ViT-B/16 at 224 px: 17.6 GFLOPs in the multiply-accumulate convention of the ViT/DeiT papers
    assert vit.forward_flops / 2 == pytest.approx(17.6e9, rel=0.01)
    assert len(vit.layers) == 1 + 12 * 4 + 1
    assert {layer.positions for layer in vit.layers} == {196, 197, 1}
    assert max(max(layer.factor_sizes) for layer in vit.layers) == 3073  # fc2's A with bias
    assert vit.batch == 1024


def test_gpt2_small_matches_published_count():
    gpt = workload("gpt2-small")
    # Hugging Face gpt2: 124,439,808 parameters = token (50257 x 768) and position (1024 x 768)
    # embeddings + 25 LayerNorms + the block Linears. The LM head is tied to the token embedding,
    # but K-FAC preconditions it as a layer, so it counts here once more.
    wte, wpe, norms = 50257 * 768, 1024 * 768, 25 * 2 * 768
    assert gpt.params == 124_439_808 - wte - wpe - norms + wte
    lm_head = gpt.layers[-1]
    assert (lm_head.d_in, lm_head.d_out, lm_head.bias, lm_head.positions) == (768, 50257, False, 1024)


def test_resnet50_matches_published_counts():
    net = workload("resnet50")
    # torchvision resnet50: 25,557,032 parameters; BatchNorm holds 2 per channel over
    # 64 (stem) + per stage blocks*(p + p + 4p) + 4p (downsample), p = 64, 128, 256, 512.
    bn_channels = 64 + sum(b * 6 * p + 4 * p for b, p in ((3, 64), (4, 128), (6, 256), (3, 512)))
    assert net.params == 25_557_032 - 2 * bn_channels
    # about 4.1 GMACs at 224 px
    assert net.forward_flops / 2 == pytest.approx(4.1e9, rel=0.02)
    convs = [layer for layer in net.layers if layer.kind == "conv2d"]
    assert len(convs) == 53 and not any(layer.bias for layer in convs)
    assert net.layers[0].positions == 112 * 112
    assert net.layers[-2].positions == 7 * 7  # last bottleneck conv3


def test_mnist_autoencoder():
    net = workload("mnist-ae")
    widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    pairs = list(zip(widths[:-1], widths[1:], strict=True))
    assert [(layer.d_in, layer.d_out) for layer in net.layers] == pairs
    assert net.params == sum(a * b + b for a, b in pairs)
    assert net.batch == 1000


def test_gnn_molpcba_structure():
    gnn = workload("gnn-molpcba")
    assert gnn.batch == 512
    names = [layer.name for layer in gnn.layers]
    assert names[:2] == ["node_embedding", "edge_embedding"] and names[-1] == "decoder"
    assert len(gnn.layers) == 2 + 5 * 3 + 1
    # step 0 sees 128 zero globals, later steps the 256-wide globals
    by_name = {layer.name: layer for layer in gnn.layers}
    assert by_name["step0.edge_mlp"].d_in == 3 * 256 + 128
    assert by_name["step1.edge_mlp"].d_in == 4 * 256
    assert by_name["step1.global_mlp"].d_in == 3 * 256
    assert by_name["step1.edge_mlp"].positions == pytest.approx(2 * 28.1)  # bonds in both directions
    assert by_name["step1.node_mlp"].positions == pytest.approx(26.0)


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_workload_builds_and_rebatches(name):
    net = workload(name)
    assert net.params > 0 and net.forward_flops > 0
    assert workload(name, batch=7).batch == 7


def test_bad_workload_inputs():
    with pytest.raises(ValueError, match="'vit-b16'"):
        workload("alexnet")
    with pytest.raises(ValueError, match="batch=0"):
        workload("vit-b16", batch=0)
    with pytest.raises(ValueError, match="d_in=-3"):
        LayerShape("x", -3, 4)
    with pytest.raises(ValueError, match="'linear', 'conv1d', 'conv2d'"):
        LayerShape("x", 3, 4, kind="rnn")
    with pytest.raises(ValueError, match="at least one layer"):
        Workload("empty", (), 1)
    with pytest.raises(ValueError, match="widths"):
        mlp("m", (5,), batch=1)
