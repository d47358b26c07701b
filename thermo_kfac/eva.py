"""Eva (Zhang, Shi, Li, ICLR 2023, arXiv 2308.02123): Kronecker-vectorized second-order steps.

Instead of K-FAC's factors, each ``nn.Linear`` / ``nn.Conv2d`` layer keeps two vectors, the
batch-averaged input ``a_bar`` (bias entry 1 last; conv inputs unfolded into patches and averaged
over positions too) and the batch-averaged per-example output gradient ``g_bar`` (``N`` times the
mean captured gradient for a batch-mean loss), as EMAs ``v <- xi v + (1 - xi) v_new``. The
curvature of the ``(d_out, d_in)`` weight matrix ``[W | b]`` is the rank-one Kronecker product
``(g_bar g_bar^T) kron (a_bar a_bar^T)`` damped by ``gamma I``; Sherman-Morrison inverts it exactly::

    P = (1/gamma) [grad - (g_bar^T grad a_bar) / (gamma + |a_bar|^2 |g_bar|^2) g_bar a_bar^T].

The preconditioned gradients are scaled by the KL clip ``nu = min(1, sqrt(kappa / sum_l lr^2
<P_l, grad_l>))`` and applied by SGD with momentum; other parameters get plain SGD with momentum.
Cost per layer: O(N d) for the vectors and O(d_in d_out) for the step, memory O(d_in + d_out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hw_models.validation import check_number, check_positive
from thermo_kfac.capture import (
    LayerAdapter,
    batch_size_of,
    candidate_modules,
    compile_skip,
    register_capture,
    remove_handles,
    trainable_adapters,
)


def eva_precondition(grad: torch.Tensor, a_bar: torch.Tensor, g_bar: torch.Tensor,
                     damping: float) -> torch.Tensor:
    """``(kron(g g^T, a a^T) + damping I)^-1`` applied to the row-major ``(d_out, d_in)`` ``grad``.

    The damped curvature is ``v v^T + damping I`` with ``v = vec(g a^T)``, whose inverse by
    Sherman-Morrison is ``(I - v v^T / (damping + |v|^2)) / damping``, where ``|v|^2 =
    |a|^2 |g|^2`` and ``v^T vec(grad) = g^T grad a``.
    """
    if damping <= 0:
        raise ValueError(f"damping={damping!r} must be > 0 (the rank-one curvature is singular)")
    projection = g_bar @ grad @ a_bar
    coef = projection / (damping + (a_bar @ a_bar) * (g_bar @ g_bar))
    return (grad - coef * torch.outer(g_bar, a_bar)) / damping


@dataclass
class _Layer:
    name: str
    adapter: LayerAdapter
    a_bar: torch.Tensor | None = None
    g_bar: torch.Tensor | None = None
    a_sum: torch.Tensor | None = None
    a_rows: int = 0
    g_sum: torch.Tensor | None = None
    g_rows: int = 0
    handles: list[Any] = field(default_factory=list)

    def has_stats(self) -> bool:
        return self.a_sum is not None and self.g_sum is not None and self.a_rows > 0 and self.g_rows > 0

    def reset(self) -> None:
        self.a_sum = self.g_sum = None
        self.a_rows = self.g_rows = 0


class Eva(torch.optim.Optimizer):
    """Eva: rank-one Kronecker-vector curvature, Sherman-Morrison inverse, KL clip, SGD momentum.

    Two ways to use it::

        opt = Eva(model, lr=0.1)                       # as an optimizer (SGD with momentum)
        loss.backward(); opt.step()

        eva = Eva(model)                               # as a preconditioner for another optimizer
        loss.backward(); eva.precondition(optimizer=sgd); sgd.step()   # .grad <- nu P

    Args:
        model: the network; every ``nn.Linear`` and ``nn.Conv2d`` (groups=1) whose weight requires
            grad is preconditioned unless matched by ``skip``.
        lr: learning rate of the SGD step (and of the KL clip in optimizer mode).
        momentum: SGD momentum (the paper's experiments: 0.9).
        weight_decay: L2 coefficient added to the (preconditioned) gradient.
        damping: ``gamma`` (paper default 0.03).
        kl_clip: ``kappa`` (paper default 1e-3); None disables the clip.
        stat_decay: EMA coefficient ``xi`` of the vectors (paper default 0.95, weight on the old
            value; the first update sets them directly).
        update_every: refresh the vectors every this many steps (paper: every step).
        stat_samples: use only the first this many examples of a batch for the vectors (the
            reference code uses 16); None uses the whole batch.
        batch_averaged: the loss is a mean over the batch (per-example output gradients are ``N``
            times the captured ones); False for a sum loss.
        skip: regular expressions; matching layers (qualified or class name) are not preconditioned.
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, damping: float = 0.03, kl_clip: float | None = 1e-3,
                 stat_decay: float = 0.95, update_every: int = 1, stat_samples: int | None = None,
                 batch_averaged: bool = True, skip: str | Sequence[str] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_positive("lr", lr, allow_zero=True)
        check_number("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        self.damping = check_positive("damping", damping)
        self.kl_clip = None if kl_clip is None else check_positive("kl_clip", kl_clip)
        self.stat_decay = check_number("stat_decay", stat_decay, low=0.0, high=1.0, high_inclusive=False)
        self.update_every = check_positive("update_every", update_every, integer=True)
        self.stat_samples = None if stat_samples is None else check_positive("stat_samples", stat_samples,
                                                                               integer=True)
        if not isinstance(batch_averaged, bool):
            raise ValueError(f"batch_averaged={batch_averaged!r} must be True or False")
        self.batch_averaged = batch_averaged
        self.model = model
        self.steps = 0
        self.last_kl_scale = 1.0
        self._layers: dict[str, _Layer] = {}
        for name, module, adapter in trainable_adapters(candidate_modules(model, compile_skip(skip))):
            layer = _Layer(name, adapter)
            layer.handles = register_capture(module, self._capture_step,
                                             on_output_grad=self._make_hook(layer))
            self._layers[name] = layer
        if not self._layers:
            raise ValueError("the model has no nn.Linear or nn.Conv2d layer to precondition (after skip)")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    # ------------------------------------------------------------------ capture
    def _capture_step(self) -> bool:
        return self.steps % self.update_every == 0

    def _make_hook(self, layer: _Layer):
        conv = not isinstance(layer.adapter.module, nn.Linear)

        def hook(x: torch.Tensor, g: torch.Tensor) -> None:
            weight = layer.adapter.module.weight
            dt = torch.promote_types(weight.dtype, torch.float32)
            n = batch_size_of(g, 3 if conv else 1)
            unbatched = (g.dim() == 3) if conv else (g.dim() == 1)
            if self.stat_samples is not None and not unbatched:
                x, g = x[: self.stat_samples], g[: self.stat_samples]
            a_rows = layer.adapter.input_rows(x.to(dt))
            g_rows = layer.adapter.output_rows(g.to(dt))
            a_sum = a_rows.sum(0)
            g_sum = g_rows.sum(0) * (float(n) if self.batch_averaged else 1.0)
            layer.a_sum = a_sum if layer.a_sum is None else layer.a_sum + a_sum
            layer.g_sum = g_sum if layer.g_sum is None else layer.g_sum + g_sum
            layer.a_rows += a_rows.shape[0]
            layer.g_rows += g_rows.shape[0]
        return hook

    def _refresh(self) -> None:
        if not self._capture_step():
            return
        silent = []
        xi = self.stat_decay
        for name, layer in self._layers.items():
            if layer.has_stats():
                assert layer.a_sum is not None and layer.g_sum is not None
                a_new, g_new = layer.a_sum / layer.a_rows, layer.g_sum / layer.g_rows
                if layer.a_bar is None or layer.g_bar is None:
                    layer.a_bar, layer.g_bar = a_new, g_new
                else:
                    layer.a_bar.mul_(xi).add_(a_new, alpha=1 - xi)
                    layer.g_bar.mul_(xi).add_(g_new, alpha=1 - xi)
            elif self.steps == 0 and layer.adapter.module.weight.grad is not None:
                silent.append(name)
            layer.reset()
        if silent:
            raise RuntimeError(
                f"Eva: layer(s) {silent} have gradients but their hooks never fired in the first step "
                "(applied functionally, or the forward ran in eval mode / without grad?). Exclude them "
                "with skip=[...]")

    def _preconditioned(self, lrs: dict[torch.Tensor, float]) -> dict[torch.Tensor, torch.Tensor]:
        """``{parameter: nu P}`` for the layers with vectors and a gradient; sets ``last_kl_scale``."""
        updates: list[tuple[_Layer, torch.Tensor]] = []
        vg_terms = []
        for layer in self._layers.values():
            grad = layer.adapter.grad_matrix()
            if grad is None or layer.a_bar is None or layer.g_bar is None:
                continue
            rhs = grad.to(layer.a_bar.dtype)
            p = eva_precondition(rhs, layer.a_bar, layer.g_bar, self.damping)
            updates.append((layer, p))
            if self.kl_clip is not None:
                vg_terms.append((p * rhs).sum() * lrs.get(layer.adapter.module.weight, 0.0) ** 2)
        scale = 1.0
        if self.kl_clip is not None and vg_terms:
            vg = float(torch.stack(vg_terms).sum())  # one host sync for all layers
            if vg > 0:
                scale = min(1.0, math.sqrt(self.kl_clip / vg))
        self.last_kl_scale = scale
        out: dict[torch.Tensor, torch.Tensor] = {}
        for layer, p in updates:
            p = p * scale if scale != 1.0 else p
            weight = layer.adapter.module.weight
            n_w = weight[0].numel()
            out[weight] = p[:, :n_w].reshape(weight.shape).to(weight.dtype)
            if layer.adapter.has_bias:
                bias = layer.adapter.module.bias
                out[bias] = p[:, n_w].to(bias.dtype)
        return out

    @staticmethod
    def _learning_rates(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, float]:
        return {p: float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}

    # ------------------------------------------------------------------ optimizer API
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Eva step: refresh the vectors when due, precondition, KL-clip, SGD with momentum."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refresh()
        updates = self._preconditioned(self._learning_rates(self))
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = updates.get(p, p.grad)
                if wd:
                    d = d.add(p, alpha=wd)
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(d)
                    d = state["momentum_buffer"]
                p.add_(d, alpha=-lr)
        self.steps += 1
        return loss

    @torch.no_grad()
    def precondition(self, optimizer: torch.optim.Optimizer | None = None) -> float:
        """Preconditioner-only mode: refresh the vectors when due and set ``.grad <- nu P`` for the
        registered layers. The KL clip reads the learning rates of ``optimizer`` (the optimizer that
        will apply the step; default: this object's ``lr``). Returns the clip factor ``nu``."""
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._refresh()
        updates = self._preconditioned(self._learning_rates(optimizer or self))
        for p, u in updates.items():
            assert p.grad is not None
            p.grad.copy_(u)
        self.steps += 1
        return self.last_kl_scale

    # ------------------------------------------------------------------ inspection and state
    @property
    def layers(self) -> list[str]:
        """Names of the preconditioned layers."""
        return list(self._layers)

    def vectors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (a_bar, g_bar)}`` of the layers whose vectors have been computed."""
        return {n: (l.a_bar, l.g_bar) for n, l in self._layers.items()
                if l.a_bar is not None and l.g_bar is not None}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["eva"] = {"steps": self.steps, "last_kl_scale": self.last_kl_scale,
                        "layers": {n: {"a_bar": None if l.a_bar is None else l.a_bar.clone(),
                                       "g_bar": None if l.g_bar is None else l.g_bar.clone()}
                                   for n, l in self._layers.items()}}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        if "eva" not in state_dict:
            raise ValueError("state_dict has no 'eva' entry; it was not saved by Eva")
        saved = state_dict.pop("eva")
        if set(saved["layers"]) != set(self._layers):
            raise ValueError(f"state_dict layers {sorted(saved['layers'])} do not match the "
                             f"registered layers {sorted(self._layers)}")
        super().load_state_dict(state_dict)
        self.steps = int(saved["steps"])
        self.last_kl_scale = float(saved["last_kl_scale"])
        for name, layer in self._layers.items():
            vec = saved["layers"][name]
            layer.a_bar = None if vec["a_bar"] is None else vec["a_bar"].clone()
            layer.g_bar = None if vec["g_bar"] is None else vec["g_bar"].clone()
            layer.reset()

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model."""
        for layer in self._layers.values():
            remove_handles(layer.handles)

    def __repr__(self) -> str:
        return (f"Eva(layers={len(self._layers)}, lr={self.defaults['lr']}, damping={self.damping}, "
                f"kl_clip={self.kl_clip}, stat_decay={self.stat_decay}, update_every={self.update_every})")
