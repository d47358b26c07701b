"""Layer adapters: how each supported module turns its inputs, output gradients and parameter
gradients into the matrices K-FAC works with.

For a layer computing ``s = W a (+ b)`` applied at ``R`` positions per example (tokens, spatial
locations), the adapter yields

* ``input_rows(a)``: a ``(N*R, d_in [+1])`` matrix of inputs (a column of ones for the bias),
* ``output_rows(g)``: the matching ``(N*R, d_out)`` matrix of output gradients,
* ``grad_matrix()``: ``[W.grad | b.grad]`` as ``(d_out, d_in [+1])``, and ``set_grad`` to write it back,

so that the expand-style statistics are ``A = rows^T rows / (N R)`` and ``G ~ sum rows^T rows``
(see :mod:`thermo_kfac.fisher` for the scaling of G).

K-FAC flavours for weight sharing (Eschenhagen et al., NeurIPS 2023): an adapter's ``approx`` is
``"expand"`` (every position is a row: ``A = sum_{n,r} a a^T / (N R)``, ``G = sum_{n,r} g g^T``)
or ``"reduce"`` (one row per example: the mean over the ``R`` positions of the inputs and the sum
over them of the output gradients, so ``A = sum_n abar abar^T / N = sum_n (sum_r a)(sum_r a)^T /
(N R^2)`` and ``G = sum_n (sum_r g)(sum_r g)^T``). Extra adapters: ``nn.Embedding`` (diagonal
``A`` from token counts), ``nn.MultiheadAttention`` (see :class:`AttentionCapture`) and any
parameter used as a linear map through :func:`linear_map` (:class:`LinearMapAdapter`).
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hw_models.validation import check_choice
from thermo_kfac.fisher import KFAC_APPROXIMATIONS
from thermo_kfac.gram import gram


class LayerAdapter:
    """Base adapter; subclasses implement the reshaping for one module type."""

    def __init__(self, name: str, module: nn.Module, approx: str = "expand") -> None:
        if approx not in KFAC_APPROXIMATIONS:
            raise ValueError(f"layer {name!r}: kfac approximation {approx!r} is not one of "
                             f"{', '.join(KFAC_APPROXIMATIONS)}")
        self.name = name
        self.module = module
        self.approx = approx
        self.has_bias = getattr(module, "bias", None) is not None

    @property
    def weight(self) -> torch.Tensor:
        """The weight parameter (used to look up its learning rate and device)."""
        return self.module.weight

    # sizes -------------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        """Input dimension of the A factor, including the bias column."""
        raise NotImplementedError

    @property
    def d_out(self) -> int:
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        params = [self.module.weight]
        if self.has_bias:
            params.append(self.module.bias)
        return params

    # statistics ----------------------------------------------------------------------------------
    def input_rows(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def input_statistic(self, a: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(rows^T rows, number of rows)`` of the input rows; adapters with structured rows
        (one-hot tokens) override it with a cheaper formula."""
        rows = self.input_rows(a)
        return rows.T @ rows, rows.shape[0]

    def _positions(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, R, d)`` view of per-position features ``(N, ..., d)``; a 2-d ``x`` has R = 1."""
        if x.dim() == 1:
            return x.reshape(1, 1, -1)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def _rows(self, x: torch.Tensor, reduce_op: str) -> torch.Tensor:
        """Rows of per-position features ``(N, R, d)``: all ``N R`` of them (expand) or one per
        example, the mean (inputs) or sum (output gradients) over the R positions (reduce)."""
        if self.approx == "expand":
            return x.reshape(-1, x.shape[-1])
        return x.mean(dim=1) if reduce_op == "mean" else x.sum(dim=1)

    def _append_ones(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)

    # gradients -----------------------------------------------------------------------------------
    def grad_matrix(self) -> torch.Tensor | None:
        """``[W.grad | b.grad]`` as a ``(d_out, d_in)`` matrix, or None if there is no gradient."""
        weight = self.weight
        if weight.grad is None:
            return None
        mat = weight.grad.reshape(weight.shape[0], -1)
        if self.has_bias:
            bias_grad = self.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.bias)
            mat = torch.cat([mat, bias_grad.reshape(-1, 1)], dim=1)
        return mat

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias if self.has_bias else None

    def set_grad(self, mat: torch.Tensor) -> None:
        """Write a ``(d_out, d_in)`` matrix back into ``.grad`` of weight (and bias)."""
        weight = self.weight
        n_w = weight[0].numel()
        weight.grad.copy_(mat[:, :n_w].reshape(weight.shape))
        if self.has_bias:
            bias = self.bias
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)
            bias.grad.copy_(mat[:, n_w])


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on inputs of shape ``(N, ..., d_in)``: the dims between the first and the
    last are the R shared positions (expand: all rows; reduce: one row per example)."""

    @property
    def d_in(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def d_out(self) -> int:
        return self.module.out_features

    def input_rows(self, a: torch.Tensor) -> torch.Tensor:
        # mean of [a, 1] over positions is [mean a, 1]: append the ones after reducing
        return self._append_ones(self._rows(self._positions(a), "mean"))

    def input_statistic(self, a: torch.Tensor) -> tuple[torch.Tensor, int]:
        # the bias column without copying the activations; blocked symmetric product
        rows = self._rows(self._positions(a), "mean")
        return gram(rows, append_ones=self.has_bias), rows.shape[0]

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        return self._rows(self._positions(g), "sum")


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` (groups=1) as KFC: a linear map on unfolded patches, one row per position."""

    def __init__(self, name: str, module: nn.Conv2d, approx: str = "expand") -> None:
        if module.groups != 1:
            raise ValueError(
                f"layer {name!r}: Conv2d with groups={module.groups} is not supported by K-FAC "
                "(only groups=1); add it to skip=[...] to leave it to the optimizer")
        super().__init__(name, module, approx)

    @property
    def d_in(self) -> int:
        m = self.module
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1] + int(self.has_bias)

    @property
    def d_out(self) -> int:
        return self.module.out_channels

    def input_rows(self, a: torch.Tensor) -> torch.Tensor:
        m = self.module
        if a.dim() == 3:  # unbatched (C, H, W)
            a = a.unsqueeze(0)
        # Padding is applied explicitly so that 'same', asymmetric and non-zero padding modes
        # produce exactly the patches the convolution saw.
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a = F.pad(a, conv_padding(m), mode=mode)
        if self.approx == "reduce":
            # The mean over output positions of the unfolded patches, computed without
            # unfolding: each input pixel counts as often as the patches containing it, which is
            # a convolution of the padded input with a ones kernel per channel (O(C H W k^2)
            # instead of materialising the (C k^2) x L patch matrix).
            return self._append_ones(self._averaged_patches(a))
        patches = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return self._append_ones(rows)

    def _averaged_patches(self, a: torch.Tensor) -> torch.Tensor:
        """``(N, C k_h k_w)``: the mean over output positions of the unfolded patches of ``a``
        (already padded), ordered as ``F.unfold`` orders a patch (channel, kernel row, column)."""
        m = self.module
        n, c, h, w = a.shape
        kh, kw = m.kernel_size
        dh, dw = m.dilation
        sh, sw = m.stride
        out_h = (h - dh * (kh - 1) - 1) // sh + 1
        out_w = (w - dw * (kw - 1) - 1) // sw + 1
        # patch entry (c, i, j) at output (p, q) reads a[c, p*sh + i*dh, q*sw + j*dw]: summing over
        # (p, q) is a strided window sum of a starting at (i*dh, j*dw).
        rows = []
        for i in range(kh):
            for j in range(kw):
                window = a[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh,
                           j * dw: j * dw + sw * (out_w - 1) + 1: sw]
                rows.append(window.sum(dim=(2, 3)))
        patches = torch.stack(rows, dim=2).reshape(n, c * kh * kw)
        return patches / (out_h * out_w)

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return self._rows(g.flatten(2).transpose(1, 2), "sum")


def conv_padding(m: nn.Conv2d) -> list[int]:
    """The ``F.pad`` amounts (last dim first, left then right) of a convolution's padding: the
    explicit padding of each side, or for ``"same"`` the split ``total // 2`` left, the rest right
    with ``total = dilation (kernel - 1)``, as torch's convolution applies it."""
    pads: list[int] = []
    for dim in reversed(range(len(m.kernel_size))):
        if m.padding == "valid":
            left = right = 0
        elif m.padding == "same":
            total = m.dilation[dim] * (m.kernel_size[dim] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = int(m.padding[dim])
        pads += [left, right]
    return pads


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding`` as the linear map ``s = W^T onehot(token)`` (d_in = vocabulary size,
    d_out = embedding dim, no bias). In the expand flavour ``A`` is diagonal, the token counts
    over ``N R``, computed by a bincount instead of a one-hot product."""

    def __init__(self, name: str, module: nn.Embedding, approx: str = "expand") -> None:
        if module.sparse:
            raise ValueError(f"layer {name!r}: nn.Embedding with sparse=True gives sparse gradients, "
                             "which K-FAC does not precondition; use sparse=False or add it to "
                             "skip=[...]")
        super().__init__(name, module, approx)
        self.has_bias = False

    @property
    def d_in(self) -> int:
        return self.module.num_embeddings

    @property
    def d_out(self) -> int:
        return self.module.embedding_dim

    def _counts(self, idx: torch.Tensor) -> torch.Tensor:
        """``(N, V)`` token counts per example (a 1-d input is one example per token)."""
        idx = idx.reshape(idx.shape[0], -1) if idx.dim() > 1 else idx.reshape(-1, 1)
        counts = torch.zeros(idx.shape[0], self.d_in, dtype=torch.float64, device=idx.device)
        return counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))

    def input_rows(self, a: torch.Tensor) -> torch.Tensor:
        if self.approx == "expand":
            return F.one_hot(a.reshape(-1), self.d_in).to(torch.float64)
        counts = self._counts(a)
        return counts / (a[0].numel() if a.dim() > 1 else 1)

    def input_statistic(self, a: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.approx == "expand":
            counts = torch.bincount(a.reshape(-1), minlength=self.d_in).to(torch.float64)
            return torch.diag(counts), a.numel()
        rows = self.input_rows(a)
        return rows.T @ rows, rows.shape[0]

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        if g.dim() == 1:
            g = g.reshape(1, -1)
        return self._rows(self._positions(g), "sum")

    def grad_matrix(self) -> torch.Tensor | None:
        grad = self.module.weight.grad
        return None if grad is None else grad.T  # (E, V): the linear map's orientation

    def set_grad(self, mat: torch.Tensor) -> None:
        self.module.weight.grad.copy_(mat.T)


class LinearMap:
    """Stand-in module of a parameter registered as a linear map: ``weight``, ``bias``, the sizes
    of an ``nn.Linear`` and the ``training`` flag of its owner (always True without one), so that
    code written for module adapters (``adapter.module.weight``) works unchanged."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 owner: nn.Module | None = None) -> None:
        self.weight, self.bias, self.owner = weight, bias, owner
        self.out_features, self.in_features = weight.shape

    @property
    def training(self) -> bool:
        return True if self.owner is None else self.owner.training


class LinearMapAdapter(LinearAdapter):
    """Any parameter ``W`` (``(d_out, d_in)``, optional bias ``(d_out,)``) used as a linear map on
    ``(N, R, d_in)`` inputs through :func:`linear_map`; ``module`` (optional) is the owner whose
    ``training`` flag gates the capture. ``self.module`` is a :class:`LinearMap`."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 module: nn.Module | None = None, approx: str = "expand") -> None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"linear map {name!r}: weight must be a 2-d (d_out, d_in) tensor, got "
                             f"{type(weight).__name__} of shape {tuple(getattr(weight, 'shape', ()))}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"linear map {name!r}: bias of shape {tuple(bias.shape)} does not match "
                             f"the weight's d_out={weight.shape[0]}")
        super().__init__(name, LinearMap(weight, bias, module), approx)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ functional linear maps
# id(weight) -> (weak reference to the weight, callbacks(input, output)); keyed by id because
# tensors compare elementwise.
_TAPS: dict[int, tuple[weakref.ref, list[Callable[[torch.Tensor, torch.Tensor], None]]]] = {}


class TapHandle:
    """Removes one callback installed by :func:`add_tap`."""

    def __init__(self, weight: torch.Tensor, callback: Callable[[torch.Tensor, torch.Tensor], None]):
        self._key, self._callback = id(weight), callback

    def remove(self) -> None:
        entry = _TAPS.get(self._key)
        if entry is not None and self._callback in entry[1]:
            entry[1].remove(self._callback)
            if not entry[1]:
                del _TAPS[self._key]


def add_tap(weight: torch.Tensor, callback: Callable[[torch.Tensor, torch.Tensor], None]) -> TapHandle:
    """Call ``callback(input, output)`` whenever :func:`linear_map` uses ``weight``."""
    entry = _TAPS.get(id(weight))
    if entry is None or entry[0]() is not weight:
        entry = (weakref.ref(weight), [])
        _TAPS[id(weight)] = entry
    entry[1].append(callback)
    return TapHandle(weight, callback)


def tap_hooks(weight: torch.Tensor, stand_in: LinearMap, pre_hook: Callable[..., None],
              forward_hook: Callable[..., None]) -> TapHandle:
    """Run a pair of module capture hooks (:func:`thermo_kfac.capture.capture_hooks`) on every
    :func:`linear_map` call with ``weight``, as if ``stand_in`` (whose ``training`` flag gates
    them) were the module called."""
    def tap(x: torch.Tensor, out: torch.Tensor) -> None:
        pre_hook(stand_in, (x,))
        forward_hook(stand_in, (x,), out)

    return add_tap(weight, tap)


def linear_map(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``x`` of shape ``(N, R, d_in)`` or ``(N, d_in)``) that
    K-FAC can see: use it in a forward for a parameter registered with
    ``KFACPreconditioner(..., linear_maps={name: weight})``."""
    out = F.linear(x, weight, bias)
    entry = _TAPS.get(id(weight))
    if entry is not None and entry[0]() is weight:
        for callback in list(entry[1]):
            callback(x, out)
    return out


# ----------------------------------------------------------------------------- attention
def check_attention(name: str, mha: nn.MultiheadAttention) -> None:
    """Raise a clear error for the MultiheadAttention configurations the capture does not cover."""
    unsupported = []
    if mha.kdim != mha.embed_dim or mha.vdim != mha.embed_dim or mha.in_proj_weight is None:
        unsupported.append("kdim/vdim different from embed_dim (separate q/k/v weights)")
    if mha.bias_k is not None:
        unsupported.append("add_bias_kv=True")
    if mha.add_zero_attn:
        unsupported.append("add_zero_attn=True")
    if unsupported:
        raise ValueError(f"layer {name!r}: nn.MultiheadAttention with {', '.join(unsupported)} is not "
                         f"supported by K-FAC; add skip=[{name!r}] to leave it to the optimizer")


class AttentionCapture:
    """Replaces the ``forward`` of one ``nn.MultiheadAttention`` instance by an explicit,
    mathematically identical computation in which the input projection goes through
    :func:`linear_map` (so ``in_proj_weight`` can be registered) and the output projection is a
    call of the ``out_proj`` module (so its hooks fire). :meth:`remove` restores the original.

    Self-attention (``query is key is value``) projects the ``R = L`` tokens once. Otherwise the
    query, key and value tokens are stacked (``R = L + 2 S``) and projected by the full
    ``in_proj_weight``; each keeps only its block of the output, so the unused blocks receive
    zero gradient: the gradient of ``in_proj_weight`` is unchanged and K-FAC sees the shared
    weight applied at ``L + 2 S`` positions.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        self.mha = mha
        mha.forward = self.forward  # instance attribute: nn.Module.__call__ dispatches to it

    def remove(self) -> None:
        if self.mha.__dict__.get("forward") == self.forward:
            del self.mha.forward

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.mha
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # now (L, N, E) / (S, N, E), the layout of F.multi_head_attention_forward; K-FAC wants the
        # batch first
        q_in, k_in, v_in = (t.transpose(0, 1) for t in (query, key, value))
        n, length, embed = q_in.shape
        src = k_in.shape[1]
        heads, head_dim = m.num_heads, m.head_dim
        if self_attention:
            q, k, v = linear_map(q_in, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        else:
            stacked = linear_map(torch.cat([q_in, k_in, v_in], dim=1), m.in_proj_weight,
                                 m.in_proj_bias)
            q = stacked[:, :length, :embed]
            k = stacked[:, length:length + src, embed:2 * embed]
            v = stacked[:, length + src:, 2 * embed:]
        q = q.reshape(n, length, heads, head_dim).transpose(1, 2)
        k = k.reshape(n, src, heads, head_dim).transpose(1, 2)
        v = v.reshape(n, src, heads, head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, src, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(n, heads, length, src)
            scores = _add_mask(scores, mask)
        if key_padding_mask is not None:
            scores = _add_mask(scores, key_padding_mask.reshape(n, 1, 1, src))
        weights = torch.softmax(scores, dim=-1)
        if m.dropout > 0.0:
            weights = F.dropout(weights, p=m.dropout, training=m.training)
        context = (weights @ v).transpose(1, 2).reshape(n, length, embed)
        out = m.out_proj(context)
        out = out.squeeze(0) if unbatched else (out if m.batch_first else out.transpose(0, 1))
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights.squeeze(0) if unbatched else weights)


def _add_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask.to(scores.dtype)


ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
}
# Adapters whose weight is not a (d_out, d_in [, k, k]) matrix of the module (Embedding: the map is
# W^T); only code that goes through grad_matrix/set_grad asks for them (extra=True).
EXTRA_ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Embedding: EmbeddingAdapter,
}


def flavour_rules(approx_per_layer: dict[str, str] | None) -> list[tuple[re.Pattern[str], str]]:
    """Compile ``{regex: flavour}`` (K-FAC flavour per layer name; clear errors on bad input)."""
    rules = []
    for pattern, flavour in (approx_per_layer or {}).items():
        check_choice(f"approx_per_layer[{pattern!r}]", flavour, KFAC_APPROXIMATIONS)
        try:
            rules.append((re.compile(pattern), flavour))
        except re.error as err:
            raise ValueError(f"approx_per_layer pattern {pattern!r} is not a valid regular "
                             f"expression: {err}") from None
    return rules


def flavour_for(rules: list[tuple[re.Pattern[str], str]], name: str, default: str) -> str:
    """The flavour of the first rule whose pattern is found in ``name`` (``re.search``), else ``default``."""
    for pattern, flavour in rules:
        if pattern.search(name):
            return flavour
    return default


def make_adapter(name: str, module: nn.Module, approx: str = "expand",
                 extra: bool = False) -> LayerAdapter | None:
    """Adapter for ``module`` if its exact type is supported, else None; ``approx`` is the K-FAC
    flavour, ``"expand"`` or ``"reduce"``; ``extra`` also allows :data:`EXTRA_ADAPTERS`."""
    cls = ADAPTERS.get(type(module)) or (EXTRA_ADAPTERS.get(type(module)) if extra else None)
    if cls is None:
        # Subclasses of supported layers with an unchanged forward (e.g. NonDynamicallyQuantizable
        # Linear inside MultiheadAttention) are matched by their base class.
        for base, adapter in ADAPTERS.items():
            if isinstance(module, base) and type(module).forward is base.forward:
                cls = adapter
                break
    return None if cls is None else cls(name, module, approx)


def trainable_adapters(modules: Iterator[tuple[str, nn.Module]]
                       ) -> Iterator[tuple[str, nn.Module, LayerAdapter]]:
    """``(name, module, adapter)`` of the given ``(name, module)`` pairs (e.g.
    :func:`~thermo_kfac.capture.candidate_modules`) whose weight is trained and which an adapter
    supports: the layers a second-order optimizer preconditions."""
    for name, module in modules:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
            continue
        adapter = make_adapter(name, module)
        if adapter is not None:
            yield name, module, adapter
