"""Layer adapters: how each supported module turns its inputs, output gradients and parameter
gradients into the matrices K-FAC works with.

For a layer computing ``s = W a (+ b)`` applied at ``R`` positions per example (tokens, spatial
locations), the adapter yields

* ``input_rows(a)``: a ``(N*R, d_in [+1])`` matrix of inputs (a column of ones for the bias),
* ``output_rows(g)``: the matching ``(N*R, d_out)`` matrix of output gradients,
* ``grad_matrix()``: ``[W.grad | b.grad]`` as ``(d_out, d_in [+1])``, and ``set_grad`` to write it back,

so that the expand-style statistics are ``A = rows^T rows / (N R)`` and ``G ~ sum rows^T rows``
(see :mod:`thermo_kfac.curvature` for the scaling of G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerAdapter:
    """Base adapter; subclasses implement the reshaping for one module type."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.has_bias = getattr(module, "bias", None) is not None

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

    def _append_ones(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)

    # gradients -----------------------------------------------------------------------------------
    def grad_matrix(self) -> torch.Tensor | None:
        """``[W.grad | b.grad]`` as a ``(d_out, d_in)`` matrix, or None if there is no gradient."""
        weight = self.module.weight
        if weight.grad is None:
            return None
        mat = weight.grad.reshape(weight.shape[0], -1)
        if self.has_bias:
            bias_grad = self.module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.module.bias)
            mat = torch.cat([mat, bias_grad.reshape(-1, 1)], dim=1)
        return mat

    def set_grad(self, mat: torch.Tensor) -> None:
        """Write a ``(d_out, d_in)`` matrix back into ``.grad`` of weight (and bias)."""
        weight = self.module.weight
        n_w = weight[0].numel()
        weight.grad.copy_(mat[:, :n_w].reshape(weight.shape))
        if self.has_bias:
            bias = self.module.bias
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)
            bias.grad.copy_(mat[:, n_w])


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on inputs of shape ``(..., d_in)``; all leading dims become rows (expand)."""

    @property
    def d_in(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def d_out(self) -> int:
        return self.module.out_features

    def input_rows(self, a: torch.Tensor) -> torch.Tensor:
        return self._append_ones(a.reshape(-1, a.shape[-1]))

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(-1, g.shape[-1])


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` (groups=1) as KFC: a linear map on unfolded patches, one row per position."""

    def __init__(self, name: str, module: nn.Conv2d) -> None:
        if module.groups != 1:
            raise ValueError(
                f"layer {name!r}: Conv2d with groups={module.groups} is not supported by K-FAC "
                "(only groups=1); add it to skip=[...] to leave it to the optimizer")
        super().__init__(name, module)

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
        a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        return self._append_ones(rows)

    def output_rows(self, g: torch.Tensor) -> torch.Tensor:
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
}


def make_adapter(name: str, module: nn.Module) -> LayerAdapter | None:
    """Adapter for ``module`` if its exact type is supported, else None."""
    cls = ADAPTERS.get(type(module))
    if cls is None:
        # Subclasses of supported layers with an unchanged forward (e.g. NonDynamicallyQuantizable
        # Linear inside MultiheadAttention) are matched by their base class.
        for base, adapter in ADAPTERS.items():
            if isinstance(module, base) and type(module).forward is base.forward:
                cls = adapter
                break
    return None if cls is None else cls(name, module)
