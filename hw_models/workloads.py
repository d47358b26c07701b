"""Layer-shape tables of standard training workloads, as plain matrix dimensions.

A :class:`Workload` is what the cost model needs from a network: for every layer K-FAC
preconditions, the weight's input and output sizes, whether it has a bias (which adds one row and
column to the factor ``A``) and the number of positions ``R`` (tokens, pixels, nodes, edges) each
example applies it to. Convolutions are unfolded (KFC): ``d_in = C_in/groups * kh * kw`` and
``R = H_out * W_out`` (grouped convolutions are priced as one ``d_out x d_in`` block).
Architectures are written here from their published shapes (no torchvision).

``extra_forward_flops`` counts matrix products per example that are not layers with weights
(attention scores and their weighted sums: ``4 T^2 d`` per transformer block).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hw_models.validation import check_choice, check_positive

LAYER_KINDS = ("linear", "conv1d", "conv2d")


@dataclass(frozen=True)
class LayerShape:
    """One preconditioned layer: ``d_out x d_in`` weight applied at ``positions`` places per example."""

    name: str
    d_in: int
    d_out: int
    positions: float = 1.0
    bias: bool = True
    kind: str = "linear"

    def __post_init__(self) -> None:
        check_positive("d_in", self.d_in, integer=True)
        check_positive("d_out", self.d_out, integer=True)
        check_positive("positions", self.positions)
        check_choice("kind", self.kind, LAYER_KINDS)
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias={self.bias!r} must be True or False")

    @property
    def params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)

    @property
    def factor_sizes(self) -> tuple[int, int]:
        """``(size of A, size of G)``."""
        return self.d_in + int(self.bias), self.d_out


@dataclass(frozen=True)
class Workload:
    """A network's preconditioned layers, the batch size of one step and any weight-free matmuls."""

    name: str
    layers: tuple[LayerShape, ...]
    batch: int
    extra_forward_flops: float = 0.0
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        check_positive("batch", self.batch, integer=True)
        check_positive("extra_forward_flops", self.extra_forward_flops, allow_zero=True)
        if not self.layers:
            raise ValueError(f"workload {self.name!r} needs at least one layer")

    @property
    def params(self) -> int:
        """Parameters in the preconditioned layers."""
        return sum(layer.params for layer in self.layers)

    @property
    def forward_flops(self) -> float:
        """Forward FLOPs per example (2 per multiply-add), layers plus ``extra_forward_flops``."""
        return sum(2.0 * l.positions * l.d_in * l.d_out for l in self.layers) + self.extra_forward_flops

    def with_batch(self, batch: int) -> Workload:
        """The same network at another batch size."""
        return dataclasses.replace(self, batch=batch)


def vit(name: str = "vit-b16", *, width: int = 768, depth: int = 12, mlp: int = 3072, patch: int = 16,
        image: int = 224, classes: int = 1000, cls_token: bool = True, batch: int = 1024) -> Workload:
    """A Vision Transformer (Dosovitskiy et al. 2021): patch embedding, ``depth`` pre-norm blocks
    (qkv, attention projection, two MLP layers, all with bias) and a linear head on one token."""
    patches = (image // patch) ** 2
    tokens = patches + int(cls_token)
    layers = [LayerShape("patch_embed", 3 * patch * patch, width, patches, True, "conv2d")]
    for i in range(depth):
        layers += [
            LayerShape(f"blocks.{i}.attn.qkv", width, 3 * width, tokens),
            LayerShape(f"blocks.{i}.attn.proj", width, width, tokens),
            LayerShape(f"blocks.{i}.mlp.fc1", width, mlp, tokens),
            LayerShape(f"blocks.{i}.mlp.fc2", mlp, width, tokens),
        ]
    layers.append(LayerShape("head", width, classes, 1))
    return Workload(name, tuple(layers), batch, extra_forward_flops=4.0 * tokens**2 * width * depth,
                    description=f"ViT width {width}, depth {depth}, MLP {mlp}, patch {patch}, {image}px, "
                                f"{tokens} tokens",
                    source="Dosovitskiy et al. 2021, Table 1; batch 1024 = AlgoPerf ImageNet reference")


def gpt2(name: str = "gpt2-small", *, width: int = 768, depth: int = 12, context: int = 1024,
         vocab: int = 50257, batch: int = 8) -> Workload:
    """GPT-2 (Radford et al. 2019): per block ``c_attn`` (3 d), ``c_proj``, ``c_fc`` (4 d) and the MLP
    projection, all with bias; the LM head (tied to the embedding, no bias) is preconditioned too."""
    layers = []
    for i in range(depth):
        layers += [
            LayerShape(f"h.{i}.attn.c_attn", width, 3 * width, context),
            LayerShape(f"h.{i}.attn.c_proj", width, width, context),
            LayerShape(f"h.{i}.mlp.c_fc", width, 4 * width, context),
            LayerShape(f"h.{i}.mlp.c_proj", 4 * width, width, context),
        ]
    layers.append(LayerShape("lm_head", width, vocab, context, bias=False))
    return Workload(name, tuple(layers), batch, extra_forward_flops=4.0 * context**2 * width * depth,
                    description=f"GPT-2 width {width}, depth {depth}, context {context}, vocab {vocab}; "
                                f"batch {batch} sequences",
                    source="Radford et al. 2019 (124M model); batch is an assumption")


def resnet50(name: str = "resnet50", *, image: int = 224, classes: int = 1000, batch: int = 1024) -> Workload:
    """ResNet-50 v1.5 (He et al. 2016; stride on the 3x3 conv): bias-free convolutions (BatchNorm
    follows each) and a linear classifier with bias."""
    layers = [LayerShape("conv1", 3 * 7 * 7, 64, (image // 2) ** 2, False, "conv2d")]
    side = image // 4  # after the stride-2 stem and the max pool
    in_ch = 64
    for stage, (blocks, planes) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512)), start=1):
        out_ch = 4 * planes
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 1) else 1
            out_side = side // stride
            prefix = f"layer{stage}.{b}"
            layers += [
                LayerShape(f"{prefix}.conv1", in_ch, planes, side**2, False, "conv2d"),
                LayerShape(f"{prefix}.conv2", planes * 9, planes, out_side**2, False, "conv2d"),
                LayerShape(f"{prefix}.conv3", planes, out_ch, out_side**2, False, "conv2d"),
            ]
            if b == 0:
                layers.append(LayerShape(f"{prefix}.downsample", in_ch, out_ch, out_side**2, False, "conv2d"))
            in_ch, side = out_ch, out_side
    layers.append(LayerShape("fc", in_ch, classes, 1))
    return Workload(name, tuple(layers), batch,
                    description=f"ResNet-50 v1.5 at {image}px",
                    source="He et al. 2016, Table 1; batch 1024 = AlgoPerf ImageNet reference")


def gnn_molpcba(name: str = "gnn-molpcba", *, latent: int = 256, steps: int = 5, outputs: int = 128,
                node_features: int = 9, edge_features: int = 3, nodes: float = 26.0, edges: float = 56.2,
                batch: int = 512) -> Workload:
    """The AlgoPerf ogbg-molpcba GNN: a jraph GraphNetwork (Battaglia et al. 2018) with 256-wide
    node/edge embeddings, 5 message-passing steps, each with one Dense(256)+LayerNorm MLP for
    edges, nodes and globals, and a Dense(128) decoder on the globals.

    Inputs per MLP are concatenations: edges ``[edge, sender, receiver, global]``, nodes
    ``[node, sum of sent edges, sum of received edges, global]``, globals ``[sum of nodes, sum of
    edges, global]``; the globals start as 128 zeros. Positions per graph are the ogbg-molpcba
    averages: 26.0 nodes and 28.1 bonds, stored in both directions (56.2 directed edges).
    """
    layers = [LayerShape("node_embedding", node_features, latent, nodes),
              LayerShape("edge_embedding", edge_features, latent, edges)]
    glob = outputs
    for s in range(steps):
        layers += [
            LayerShape(f"step{s}.edge_mlp", 3 * latent + glob, latent, edges),
            LayerShape(f"step{s}.node_mlp", 3 * latent + glob, latent, nodes),
            LayerShape(f"step{s}.global_mlp", 2 * latent + glob, latent, 1),
        ]
        glob = latent
    layers.append(LayerShape("decoder", latent, outputs, 1))
    return Workload(name, tuple(layers), batch,
                    description=f"GraphNetwork latent {latent}, {steps} steps, {nodes} nodes and {edges} "
                                f"directed edges per graph, {batch} graphs per batch",
                    source="AlgoPerf ogbg workload (init2winit GNN); OGB dataset statistics (Hu et al. "
                           "2020); batch 512 = AlgoPerf reference")


def mlp(name: str, widths: tuple[int, ...], *, batch: int) -> Workload:
    """A fully connected network with biases through ``widths`` (input first)."""
    if len(widths) < 2:
        raise ValueError(f"widths={widths!r} needs at least an input and an output width")
    pairs = zip(widths[:-1], widths[1:], strict=True)
    layers = tuple(LayerShape(f"fc{i}", a, b) for i, (a, b) in enumerate(pairs))
    return Workload(name, layers, batch, description="MLP " + "-".join(map(str, widths)))


def mnist_autoencoder(name: str = "mnist-ae", *, batch: int = 1000) -> Workload:
    """The MNIST auto-encoder 784-1000-500-250-30-250-500-1000-784 of Hinton & Salakhutdinov (2006),
    K-FAC's classic benchmark (Martens & Grosse 2015), batch 1000."""
    work = mlp(name, (784, 1000, 500, 250, 30, 250, 500, 1000, 784), batch=batch)
    return dataclasses.replace(work, source="Hinton & Salakhutdinov 2006; Martens & Grosse 2015")


_BUILDERS = {
    "vit-b16": lambda: vit("vit-b16"),
    "vit-s16": lambda: vit("vit-s16", width=384, depth=12, mlp=1536, cls_token=False),
    "gnn-molpcba": gnn_molpcba,
    "gpt2-small": gpt2,
    "resnet50": resnet50,
    "mnist-ae": mnist_autoencoder,
}
WORKLOADS = tuple(_BUILDERS)


def workload(name: str, *, batch: int | None = None) -> Workload:
    """A standard workload by name (see :data:`WORKLOADS`), optionally at another batch size.

    ``vit-s16`` is the smaller ViT (width 384, global-average pooling, 196 tokens) that the
    AlgoPerf ImageNet-ViT workload trains [recalled].
    """
    check_choice("model", name, WORKLOADS)
    work = _BUILDERS[name]()
    if batch is not None:
        check_positive("batch", batch, integer=True)
        work = work.with_batch(batch)
    return work
