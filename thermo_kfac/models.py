"""Model zoo for the experiments: MLP classifier/regressor, deep auto-encoder, small CNN.

All models are plain ``nn.Linear`` / ``nn.Conv2d`` stacks, so every weight layer is registered by
:class:`thermo_kfac.KFACPreconditioner`. Models return logits (or raw regression outputs); the
loss (cross-entropy, BCE with logits, MSE) is applied outside.

:func:`build_model` builds a model by name for a :class:`thermo_kfac.data.Dataset` (or anything
with ``input_shape``, ``output_dim`` and ``task``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hw_models.validation import check_choice, check_positive
from thermo_kfac.kron_layers import KronLinear as KronLinear  # re-exported: thermo_kfac.models.KronLinear
from thermo_kfac.recurrent import RecurrentLayer as RecurrentLayer  # re-exported
from thermo_kfac.recurrent import RowRNN

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}
# The classic K-FAC benchmark (Hinton & Salakhutdinov 2006; Martens & Grosse 2015):
# 784-1000-500-250-30 encoder and its mirror decoder.
MNIST_AUTOENCODER_WIDTHS = (1000, 500, 250, 30)
MNIST_INPUT_DIM = 784


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (see :data:`ACTIVATIONS`)."""
    return ACTIVATIONS[check_choice("activation", name, tuple(ACTIVATIONS))]()


def _check_widths(widths: Sequence[int], allow_empty: bool = True) -> tuple[int, ...]:
    if isinstance(widths, int):
        widths = (widths,)
    widths = tuple(widths)
    if not widths and not allow_empty:
        raise ValueError("widths must name at least one layer width")
    for w in widths:
        check_positive("widths", w, integer=True)
    return tuple(int(w) for w in widths)


class MLP(nn.Sequential):
    """``Flatten -> [Linear -> activation] * len(widths) -> Linear(out_features)``."""

    def __init__(self, in_features: int, out_features: int, widths: Sequence[int] = (128, 128),
                 activation: str = "relu") -> None:
        check_positive("in_features", in_features, integer=True)
        check_positive("out_features", out_features, integer=True)
        widths = _check_widths(widths)
        act = check_choice("activation", activation, tuple(ACTIVATIONS))
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_features
        for width in widths:
            layers += [nn.Linear(fan_in, width), ACTIVATIONS[act]()]
            fan_in = width
        layers.append(nn.Linear(fan_in, out_features))
        super().__init__(*layers)
        self.widths = widths


class AutoEncoder(nn.Module):
    """Deep auto-encoder ``in - widths... - code`` with the mirror decoder back to ``in``.

    The last width is the code layer, which is linear (no activation), as in the classic
    benchmark; all other hidden layers use ``activation``. The output is flattened logits of
    shape ``(n, in_features)``: train with BCE-with-logits on inputs in [0, 1], or MSE.
    """

    def __init__(self, in_features: int = MNIST_INPUT_DIM,
                 widths: Sequence[int] = MNIST_AUTOENCODER_WIDTHS, activation: str = "sigmoid") -> None:
        super().__init__()
        check_positive("in_features", in_features, integer=True)
        widths = _check_widths(widths, allow_empty=False)
        act = check_choice("activation", activation, tuple(ACTIVATIONS))
        sizes = (in_features, *widths)
        encoder: list[nn.Module] = [nn.Flatten()]
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            encoder.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 1:
                encoder.append(ACTIVATIONS[act]())
        decoder: list[nn.Module] = []
        back = sizes[::-1]
        for i, (fan_in, fan_out) in enumerate(zip(back[:-1], back[1:], strict=True)):
            decoder.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 1:
                decoder.append(ACTIVATIONS[act]())
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)
        self.in_features = in_features
        self.widths = widths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def mnist_autoencoder(activation: str = "sigmoid") -> AutoEncoder:
    """The MNIST-shaped 784-1000-500-250-30-250-500-1000-784 auto-encoder."""
    return AutoEncoder(MNIST_INPUT_DIM, MNIST_AUTOENCODER_WIDTHS, activation)


class SmallCNN(nn.Module):
    """``[Conv3x3(pad 1) -> activation -> MaxPool2] * len(channels) -> Linear(hidden) -> Linear``.

    Works for any image size whose sides survive the poolings (8x8 digits, 28x28 MNIST,
    32x32 CIFAR-10).
    """

    def __init__(self, input_shape: Sequence[int], num_outputs: int, channels: Sequence[int] = (16, 32),
                 hidden: int = 64, activation: str = "relu") -> None:
        super().__init__()
        input_shape = tuple(input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"SmallCNN needs image inputs (C, H, W), got input shape {input_shape}")
        check_positive("num_outputs", num_outputs, integer=True)
        check_positive("hidden", hidden, integer=True)
        channels = _check_widths(channels, allow_empty=False)
        act = check_choice("activation", activation, tuple(ACTIVATIONS))
        c, h, w = input_shape
        if h >> len(channels) < 1 or w >> len(channels) < 1:
            raise ValueError(f"images of size {h}x{w} are too small for {len(channels)} conv+pool "
                             f"stages (each halves the size); use fewer channels entries")
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), ACTIVATIONS[act](), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), ACTIVATIONS[act](),
                                        nn.Linear(hidden, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class GCNLayer(nn.Module):
    """Graph convolution ``H' = A_hat H W (+ b)`` (Kipf & Welling) on node features ``(N, R, d)``.

    ``A_hat`` is the normalized adjacency ``(N, R, R)`` (or ``(R, R)``, shared) passed with ``H``.
    The weight is an ``nn.Linear`` applied to the aggregated features ``A_hat H``, so K-FAC
    registers it as a Linear layer whose R shared positions are the nodes (expand or reduce).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        check_positive("in_features", in_features, integer=True)
        check_positive("out_features", out_features, integer=True)
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return self.linear(adj @ h)


class GCN(nn.Module):
    """Node classifier ``[GCNLayer -> activation] * len(widths) -> GCNLayer(num_classes)``.

    Input: ``(N, R, F + R)``, the ``F`` node features followed by the normalized adjacency (the
    layout of the ``sbm`` dataset). Output: logits ``(N, num_classes, R)``, the layout
    ``F.cross_entropy`` expects for per-node labels ``(N, R)``.
    """

    def __init__(self, n_features: int, num_classes: int, widths: Sequence[int] = (32, 32),
                 activation: str = "relu") -> None:
        super().__init__()
        check_positive("n_features", n_features, integer=True)
        check_positive("num_classes", num_classes, integer=True)
        widths = _check_widths(widths)
        act = check_choice("activation", activation, tuple(ACTIVATIONS))
        sizes = (n_features, *widths, num_classes)
        self.layers = nn.ModuleList(GCNLayer(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.act = ACTIVATIONS[act]()
        self.n_features = n_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, adj = x[..., :self.n_features], x[..., self.n_features:]
        for i, layer in enumerate(self.layers):
            h = layer(h, adj)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h.transpose(-1, -2)


class TinyViT(nn.Module):
    """A small vision transformer: non-overlapping ``patch x patch`` patches -> Linear embedding
    + learned position embedding -> ``depth`` pre-norm ``nn.TransformerEncoderLayer`` blocks ->
    LayerNorm -> mean over tokens -> Linear head. For 8x8 digits with patch 2: 16 tokens."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, patch: int = 2, dim: int = 32,
                 depth: int = 2, heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        input_shape = tuple(input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"TinyViT needs image inputs (C, H, W), got input shape {input_shape}")
        c, h, w = input_shape
        check_positive("patch", patch, integer=True)
        if h % patch or w % patch:
            raise ValueError(f"patch={patch} does not divide the image size {h}x{w}")
        for label, value in (("num_outputs", num_outputs), ("dim", dim), ("depth", depth),
                             ("heads", heads), ("mlp_ratio", mlp_ratio)):
            check_positive(label, value, integer=True)
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.patch = patch
        tokens = (h // patch) * (w // patch)
        self.embed = nn.Linear(c * patch * patch, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*(
            nn.TransformerEncoderLayer(dim, heads, mlp_ratio * dim, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, tokens, C patch^2)``, row-major over the patch grid."""
        n, c, h, w = x.shape
        p = self.patch
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(self.patches(x)) + self.pos
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


# ---------------------------------------------------------------------------------- registry
def _build_mlp(spec: Any, widths: Sequence[int] = (128, 128), activation: str = "relu") -> nn.Module:
    return MLP(math.prod(spec.input_shape), spec.output_dim, widths, activation)


def _build_autoencoder(spec: Any, widths: Sequence[int] | None = None,
                       activation: str = "sigmoid") -> nn.Module:
    if spec.task != "autoencoder":
        raise ValueError(f"model 'autoencoder' needs an autoencoder task, got task={spec.task!r} "
                         "(load the dataset with task='autoencoder')")
    in_features = math.prod(spec.input_shape)
    if widths is None:
        widths = default_autoencoder_widths(in_features)
    return AutoEncoder(in_features, widths, activation)


def default_autoencoder_widths(in_features: int) -> tuple[int, ...]:
    """The classic 1000-500-250-30 for 784 inputs; for others, the same shape scaled to the input.

    For the 64 pixels of digits this gives (128, 64, 32, 8).
    """
    if in_features == MNIST_INPUT_DIM:
        return MNIST_AUTOENCODER_WIDTHS
    first = max(8, 2 * in_features)
    return (first, max(4, first // 2), max(4, first // 4), max(2, first // 16))


def _build_cnn(spec: Any, channels: Sequence[int] = (16, 32), hidden: int = 64,
               activation: str = "relu") -> nn.Module:
    return SmallCNN(spec.input_shape, spec.output_dim, channels, hidden, activation)


def _build_vit(spec: Any, patch: int = 2, dim: int = 32, depth: int = 2, heads: int = 4,
               mlp_ratio: int = 2, dropout: float = 0.0) -> nn.Module:
    return TinyViT(spec.input_shape, spec.output_dim, patch, dim, depth, heads, mlp_ratio, dropout)


def _build_gcn(spec: Any, widths: Sequence[int] = (32, 32), activation: str = "relu") -> nn.Module:
    shape = tuple(spec.input_shape)
    if len(shape) != 2 or shape[1] <= shape[0]:
        raise ValueError(f"model 'gcn' needs graph inputs (R nodes, F features + R adjacency "
                         f"columns), such as dataset 'sbm'; got input shape {shape}")
    return GCN(shape[1] - shape[0], spec.output_dim, widths, activation)


def _build_rnn(spec: Any, hidden: int = 64, nonlinearity: str = "tanh", kron: bool = False) -> nn.Module:
    side = math.isqrt(hidden)
    if kron and side * side != hidden:
        raise ValueError(f"kron=True needs a square hidden size (A, B of side sqrt), got hidden={hidden}")
    return RowRNN(spec.input_shape, spec.output_dim, hidden, nonlinearity,
                  ((side, side), (side, side)) if kron else None)


MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "mlp": (_build_mlp, "fully connected net; options widths=(128, 128), activation='relu'"),
    "autoencoder": (_build_autoencoder, "deep auto-encoder with mirror decoder (autoencoder task); "
                    "options widths (default 1000-500-250-30 for 784 inputs), activation='sigmoid'"),
    "cnn": (_build_cnn, "small CNN for images; options channels=(16, 32), hidden=64, activation='relu'"),
    "vit": (_build_vit, "tiny vision transformer for images; options patch=2, dim=32, depth=2, "
            "heads=4, mlp_ratio=2, dropout=0.0"),
    "gcn": (_build_gcn, "graph convolutional node classifier (dataset 'sbm'); options "
            "widths=(32, 32), activation='relu'"),
    "rnn": (_build_rnn, "images read row by row by an Elman RNN (K-FAC over time steps); options "
            "hidden=64, nonlinearity='tanh', kron=False (recurrent weight A (x) B)"),
}


# The option that sets a model's width (``--width`` on the command line): the hidden layer of the
# CNN's classifier, the ViT's embedding dimension (its MLP blocks are ``mlp_ratio`` times wider),
# the RNN's state. The MLP and the auto-encoder take a list of widths (``--widths``) instead.
WIDTH_OPTIONS: dict[str, str] = {"cnn": "hidden", "vit": "dim", "rnn": "hidden"}


def with_width(name: str, options: dict[str, Any], width: int) -> dict[str, Any]:
    """``options`` plus the width option of model ``name`` (:data:`WIDTH_OPTIONS`) set to ``width``.

    Raises ``ValueError`` for a model without a single width, a non-positive width, or options that
    already set that width to another value.
    """
    check_choice("model", name, tuple(MODELS))
    if name not in WIDTH_OPTIONS:
        raise ValueError(f"--width applies to {', '.join(WIDTH_OPTIONS)}, not model {name!r}; use "
                         f"--widths W,W,... for mlp, autoencoder and gcn")
    check_positive("width", width, integer=True)
    key = WIDTH_OPTIONS[name]
    if key in options and options[key] != width:
        raise ValueError(f"--width {width} and the model option {key}={options[key]} disagree; give one")
    return {**options, key: int(width)}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(MODELS)


def model_options(name: str) -> list[str]:
    """Keyword options accepted by model ``name`` in :func:`build_model`."""
    builder = MODELS[check_choice("model", name, tuple(MODELS))][0]
    return list(inspect.signature(builder).parameters)[1:]


def build_model(name: str, dataset: Any, **options: Any) -> nn.Module:
    """Build model ``name`` sized for ``dataset`` (anything with ``input_shape``, ``output_dim``,
    ``task``). ``options`` are the model's keyword options (see :data:`MODELS`).

    Parameters are initialized from torch's global generator: seed it (``torch.manual_seed``)
    for reproducible runs.
    """
    check_choice("model", name, tuple(MODELS))
    for attr in ("input_shape", "output_dim", "task"):
        if not hasattr(dataset, attr):
            raise ValueError(f"build_model needs a dataset with {attr!r}, got {type(dataset).__name__}")
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {', '.join(unknown)}; valid options: "
                         f"{', '.join(valid)}")
    return MODELS[name][0](dataset, **options)
