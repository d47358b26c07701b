"""The one capture layer: which modules to hook, and the hooks that hand over a layer's inputs and
the gradients of the loss with respect to its outputs.

Used by :class:`~thermo_kfac.KFACPreconditioner`, :class:`~thermo_kfac.AdaFisher`,
:class:`~thermo_kfac.Eva` and :class:`~thermo_kfac.SINGD`. A layer gets

* a forward pre-hook that passes its (detached) input to ``on_input``, and
* a forward hook that puts a tensor hook on its output; when the backward pass reaches that
  output, ``on_output_grad(x, g)`` receives the same call's detached input ``x`` and the detached
  output gradient ``g``. A tensor hook on the output, rather than a module backward hook, still
  sees the gradient when an in-place activation follows the layer.

Both fire only for a call made in training mode, with gradients enabled, while the caller's
activity predicate ``active()`` is true (checked at forward time).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

InputCallback = Callable[[torch.Tensor], None]
OutputGradCallback = Callable[[torch.Tensor, torch.Tensor], None]


def compile_skip(skip: str | Sequence[str]) -> list[re.Pattern[str]]:
    """Compile the ``skip`` regular expressions (a clear ValueError on a bad pattern)."""
    patterns = [skip] if isinstance(skip, str) else list(skip)
    try:
        return [re.compile(p) for p in patterns]
    except (re.error, TypeError) as err:
        raise ValueError(f"skip={skip!r} must be valid regular expressions: {err}") from None


def is_skipped(name: str, module: nn.Module, skip: Sequence[re.Pattern[str]]) -> bool:
    """Whether a pattern matches the module's qualified name or class name (``re.search``)."""
    cls = type(module).__name__
    return any(p.search(name) or p.search(cls) for p in skip)


def candidate_modules(model: nn.Module, skip: Sequence[re.Pattern[str]], *,
                      patched_attention: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules that may be registered, in ``named_modules`` order.

    Modules matched by ``skip`` are left out, and so are the children of an
    ``nn.MultiheadAttention``: attention calls their weights functionally, so their hooks would
    never fire. With ``patched_attention`` the caller replaces the forward of every attention
    module it is given (:class:`~thermo_kfac.capture.AttentionCapture`, which calls ``out_proj``
    as a module); then only the children of *skipped* attention modules are left out.
    """
    attention_children: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and (
                not patched_attention or is_skipped(name, module, skip)):
            attention_children.update(f"{name}.{child}" if name else child
                                      for child, _ in module.named_modules() if child)
    for name, module in model.named_modules():
        if name in attention_children or is_skipped(name, module, skip):
            continue
        yield name, module


def module_linear_maps(model: nn.Module, skip: Sequence[re.Pattern[str]]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{name.suffix: (weight, bias)}`` of the modules (not matched by ``skip``) that compute
    parameter products through :func:`~thermo_kfac.capture.linear_map` and list them in a
    ``kfac_linear_maps() -> {suffix: (weight, bias)}`` method (e.g. ``models.KronLinear``);
    only weights that require grad."""
    maps = {}
    for name, module in candidate_modules(model, skip):
        listed = getattr(module, "kfac_linear_maps", None)
        if callable(listed):
            prefix = f"{name}." if name else ""
            maps.update({prefix + suffix: (w, b) for suffix, (w, b) in listed().items() if w.requires_grad})
    return maps


def capture_hooks(active: Callable[[], bool], on_input: InputCallback | None = None,
                  on_output_grad: OutputGradCallback | None = None
                  ) -> tuple[Callable[..., None], Callable[..., None]]:
    """``(pre_hook, forward_hook)`` with the signatures of ``nn.Module`` forward (pre-)hooks.

    Exposed so that calls that are not module calls (:func:`~thermo_kfac.capture.linear_map`
    taps) can invoke them with a stand-in module that has a ``training`` flag.
    """

    def firing(module: Any) -> bool:
        return bool(module.training and torch.is_grad_enabled() and active())

    def pre_hook(module: Any, inputs: tuple[Any, ...]) -> None:
        if on_input is not None and firing(module):
            on_input(inputs[0].detach())

    def forward_hook(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        if on_output_grad is None or not firing(module):
            return
        if isinstance(output, torch.Tensor) and output.requires_grad and inputs:
            x = inputs[0].detach()
            output.register_hook(lambda g: on_output_grad(x, g.detach()))

    return pre_hook, forward_hook


def register_capture(module: nn.Module, active: Callable[[], bool],
                     on_input: InputCallback | None = None,
                     on_output_grad: OutputGradCallback | None = None) -> list[Any]:
    """Install the capture hooks on ``module`` (module docs); returns the removable handles."""
    pre_hook, forward_hook = capture_hooks(active, on_input, on_output_grad)
    handles = []
    if on_input is not None:
        handles.append(module.register_forward_pre_hook(pre_hook))
    if on_output_grad is not None:
        handles.append(module.register_forward_hook(forward_hook))
    return handles


def remove_handles(handles: list[Any]) -> None:
    """Remove every hook handle in ``handles`` and empty the list."""
    for handle in handles:
        handle.remove()
    handles.clear()


def batch_size_of(g: torch.Tensor, unbatched_dim: int) -> int:
    """Number of examples in an output gradient (1 for an unbatched one of ``unbatched_dim`` dims)."""
    return 1 if g.dim() == unbatched_dim else int(g.shape[0])
