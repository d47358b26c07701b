"""Capture hooks shared by the optimizers that keep their own layer statistics (AdaFisher, Eva).

A layer gets a forward hook that keeps its input and puts a tensor hook on its output (the
gradient of the loss with respect to that output). A tensor hook on the output, rather
than a module backward hook, still sees the gradient when an in-place activation follows the layer.
Both hooks only fire in training mode, with gradients enabled, when ``active()`` is true.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


def compile_skip(skip: str | Sequence[str]) -> list[re.Pattern[str]]:
    """Compile the ``skip`` regular expressions (clear error on a bad pattern)."""
    patterns = [skip] if isinstance(skip, str) else list(skip)
    try:
        return [re.compile(p) for p in patterns]
    except (re.error, TypeError) as err:
        raise ValueError(f"skip={skip!r} must be regular expressions: {err}") from None


def candidate_modules(model: nn.Module, skip: list[re.Pattern[str]]) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules that may be registered.

    Children of ``nn.MultiheadAttention`` are left out because attention calls their weights
    functionally, so their hooks would never fire; so are modules matched by ``skip`` (qualified
    name or class name, ``re.search``).
    """
    attention_children: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            attention_children.update(f"{name}.{child}" if name else child
                                      for child, _ in module.named_modules() if child)
    for name, module in model.named_modules():
        cls = type(module).__name__
        if name in attention_children or any(p.search(name) or p.search(cls) for p in skip):
            continue
        yield name, module


def register_paired(module: nn.Module, active: Callable[[], bool],
                    on_pair: Callable[[torch.Tensor, torch.Tensor], None]) -> list[Any]:
    """Hook ``module`` so that ``on_pair(x, g)`` receives, for every forward call made in training
    mode with gradients enabled while ``active()``, the detached input ``x`` and, once it is
    computed, the detached gradient ``g`` of the loss with respect to that call's output."""

    def out_hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (mod.training and torch.is_grad_enabled() and active()):
            return
        if isinstance(output, torch.Tensor) and output.requires_grad and inputs:
            x = inputs[0].detach()
            output.register_hook(lambda g: on_pair(x, g.detach()))

    return [module.register_forward_hook(out_hook)]


def batch_size_of(g: torch.Tensor, unbatched_dim: int) -> int:
    """Number of examples in an output gradient (1 for an unbatched one of ``unbatched_dim`` dims)."""
    return 1 if g.dim() == unbatched_dim else int(g.shape[0])
