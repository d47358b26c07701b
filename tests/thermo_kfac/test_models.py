"""Model zoo: shapes, the classic auto-encoder, registry errors, and compatibility with K-FAC."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermo_kfac import KFACPreconditioner
from thermo_kfac.data import load_dataset
from thermo_kfac.models import (
    MLP,
    MNIST_AUTOENCODER_WIDTHS,
    AutoEncoder,
    SmallCNN,
    available_models,
    build_model,
    default_autoencoder_widths,
    mnist_autoencoder,
    model_options,
)


def _spec(input_shape, output_dim, task="classification"):
    return SimpleNamespace(input_shape=tuple(input_shape), output_dim=output_dim, task=task)


def _linear_sizes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_mlp_widths_activation_and_output():
    model = MLP(64, 10, widths=(32, 16), activation="tanh")
    assert _linear_sizes(model) == [(64, 32), (32, 16), (16, 10)]
    assert sum(isinstance(m, nn.Tanh) for m in model) == 2
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)  # flattens image inputs
    assert _linear_sizes(MLP(3, 2, widths=())) == [(3, 2)]  # plain linear model
    with pytest.raises(ValueError, match="activation='swish'.*relu"):
        MLP(4, 2, activation="swish")
    with pytest.raises(ValueError, match="widths"):
        MLP(4, 2, widths=(8, 0))


def test_mnist_autoencoder_is_the_classic_shape_with_linear_code():
    model = mnist_autoencoder()
    widths = [784, *MNIST_AUTOENCODER_WIDTHS]
    expected = list(zip(widths[:-1], widths[1:], strict=True))
    expected += [(b, a) for a, b in reversed(expected)]
    assert _linear_sizes(model) == expected  # 784-1000-500-250-30-250-500-1000-784
    # no activation after the 30-unit code layer nor after the output layer; sigmoid elsewhere
    assert not isinstance(model.encoder[-1], nn.Sigmoid)
    assert isinstance(model.encoder[-1], nn.Linear) and model.encoder[-1].out_features == 30
    assert isinstance(model.decoder[-1], nn.Linear)
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 6
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 784)
    relu = AutoEncoder(784, MNIST_AUTOENCODER_WIDTHS, activation="relu")
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 6


def test_autoencoder_default_widths():
    assert default_autoencoder_widths(784) == MNIST_AUTOENCODER_WIDTHS
    assert default_autoencoder_widths(64) == (128, 64, 32, 8)
    digits = load_dataset("digits", task="autoencoder")
    model = build_model("autoencoder", digits)
    assert _linear_sizes(model)[0] == (64, 128) and _linear_sizes(model)[-1] == (128, 64)
    custom = build_model("autoencoder", digits, widths=(20, 5), activation="relu")
    assert _linear_sizes(custom) == [(64, 20), (20, 5), (5, 20), (20, 64)]


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_output_shape_for_image_sizes(shape):
    model = build_model("cnn", _spec(shape, 10))
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 2


def test_cnn_rejects_vectors_and_tiny_images():
    with pytest.raises(ValueError, match=r"image inputs \(C, H, W\)"):
        build_model("cnn", _spec((20,), 3))
    with pytest.raises(ValueError, match="too small"):
        SmallCNN((1, 4, 4), 2, channels=(4, 4, 4))


def test_registry_errors_list_valid_names_and_options():
    digits = load_dataset("digits")
    assert available_models()[:3] == ["mlp", "autoencoder", "cnn"]
    with pytest.raises(ValueError, match="model='resnet'.*'mlp', 'autoencoder', 'cnn'"):
        build_model("resnet", digits)
    with pytest.raises(ValueError, match="no option.*depth.*valid options: widths, activation"):
        build_model("mlp", digits, depth=3)
    assert model_options("cnn") == ["channels", "hidden", "activation"]
    with pytest.raises(ValueError, match="autoencoder task"):
        build_model("autoencoder", digits)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", object())


def test_seeded_initialization_is_reproducible():
    digits = load_dataset("digits")
    torch.manual_seed(3)
    a = build_model("mlp", digits)
    torch.manual_seed(3)
    b = build_model("mlp", digits)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("name,task,loss", [("mlp", None, "cross_entropy"),
                                            ("cnn", None, "cross_entropy"),
                                            ("autoencoder", "autoencoder", "bce")])
def test_every_weight_layer_is_registered_by_kfac_and_trains(name, task, loss):
    data = load_dataset("digits", task=task, max_train=64)
    torch.manual_seed(0)
    model = build_model(name, data)
    weight_layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, loss=loss, damping=0.1, inverse_update_every=1)
    assert precond.layers == weight_layers
    fn = {"cross_entropy": F.cross_entropy, "bce": F.binary_cross_entropy_with_logits}[loss]
    x, y = data.x_train, data.y_train
    with torch.no_grad():
        before = float(fn(model(x), y))
    for _ in range(5):
        opt.zero_grad()
        fn(model(x), y).backward()
        precond.step()
        opt.step()
    with torch.no_grad():
        assert float(fn(model(x), y)) < before
