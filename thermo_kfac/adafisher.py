"""AdaFisher (Gomes et al., ICLR 2025, arXiv 2405.16397): diagonal Kronecker-factored Fisher with an
Adam-like update.

For an ``nn.Linear`` / ``nn.Conv2d`` layer with inputs ``a`` (bias column of ones appended; conv
inputs unfolded into patches, one row per position) and per-example output gradients ``g``, only
the diagonals of the K-FAC factors are kept::

    H_D = mean over rows of a * a                    (diag of K-FAC's A)
    S_D = N * sum over rows of g * g                 (diag of K-FAC's G for a batch-mean loss)

Every ``update_every`` steps (the paper's T_cov) each is min-max normalised to [0, 1] and folded
into an EMA that starts at ones (``X <- (1 - gamma1) X + gamma2 X_new`` as in the authors' code,
or the conventional ``X <- gamma X + (1 - gamma) X_new``). The Fisher diagonal of the
``(d_out, d_in)`` weight matrix ``[W | b]`` is ``F = kron(H_D, S_D) + lambda``, i.e.
``F[o, i] = S_D[o] H_D[i] + lambda``, and the update is Adam's without the square root or the
second moment::

    m <- beta m + (1 - beta) grad,   theta <- theta - lr / (1 - beta^t) * m / F.

Normalisation layers (``LayerNorm``, ``BatchNorm1d/2d/3d`` with affine parameters) use the
diagonal empirical Fisher of their scale and shift directly: with ``x_hat`` the normalised input
and ``u_n = sum_positions g x_hat``, ``v_n = sum_positions g`` example ``n``'s share of the weight
and bias gradients, ``F = N sum_n [u_n^2, v_n^2]`` (min-max normalised jointly, EMA, + lambda).
Every other trainable parameter gets ``F = 1``: bias-corrected momentum SGD at rate ``lr``.
"""

from __future__ import annotations

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
    make_adapter,
    register_capture,
    remove_handles,
)

NORM_LAYERS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MINMAX_EPS = 1e-12


def min_max_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x - min) / (max - min + 1e-12)``: the paper's rescaling of a factor diagonal to [0, 1]."""
    low = x.min()
    return (x - low) / (x.max() - low + _MINMAX_EPS)


def _stat_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


@dataclass
class _KronBlock:
    """A Linear / Conv2d layer: diagonals ``H`` (d_in, bias last) and ``S`` (d_out)."""

    name: str
    adapter: LayerAdapter
    H: torch.Tensor
    S: torch.Tensor
    h_sum: torch.Tensor | None = None
    h_rows: int = 0
    s_sum: torch.Tensor | None = None
    handles: list[Any] = field(default_factory=list)

    @property
    def params(self) -> list[nn.Parameter]:
        return self.adapter.parameters()

    def has_stats(self) -> bool:
        return self.h_sum is not None and self.s_sum is not None and self.h_rows > 0

    def reset(self) -> None:
        self.h_sum = self.s_sum = None
        self.h_rows = 0


@dataclass
class _NormBlock:
    """A LayerNorm / BatchNorm layer: the Fisher diagonal ``F`` of ``[weight, bias]`` (flattened)."""

    name: str
    module: nn.Module
    F: torch.Tensor
    f_sum: torch.Tensor | None = None
    handles: list[Any] = field(default_factory=list)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.module.weight, self.module.bias) if p is not None]

    def has_stats(self) -> bool:
        return self.f_sum is not None

    def reset(self) -> None:
        self.f_sum = None


def norm_layer_fisher(module: nn.Module, x: torch.Tensor, g: torch.Tensor,
                      batch_averaged: bool = True) -> torch.Tensor:
    """Diagonal empirical Fisher ``[F_weight, F_bias]`` (flattened) of a LayerNorm / BatchNorm.

    ``x`` is the layer's input and ``g`` the gradient of the loss with respect to its output.
    Example ``n`` contributes ``u_n = sum_positions g * x_hat`` to the weight gradient and
    ``v_n = sum_positions g`` to the bias gradient; with a batch-mean loss its own gradient is
    ``N u_n``, so ``F = (1/N) sum_n (N u_n)^2 = N sum_n u_n^2`` (``sum_n u_n^2`` for a sum loss).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, g = x.to(dtype), g.to(dtype)
    if isinstance(module, nn.LayerNorm):
        k = len(module.normalized_shape)
        norm_dims = tuple(range(x.dim() - k, x.dim()))
        mean = x.mean(norm_dims, keepdim=True)
        var = x.var(norm_dims, unbiased=False, keepdim=True)
        x_hat = (x - mean) / torch.sqrt(var + module.eps)
        if x.dim() == k:  # unbatched
            x_hat, g = x_hat.unsqueeze(0), g.unsqueeze(0)
        position_dims = tuple(range(1, x_hat.dim() - k))
    else:  # BatchNorm in training mode: batch statistics over all dims but the channel dim
        if x.dim() < 2:
            raise ValueError(f"BatchNorm input of shape {tuple(x.shape)} has no batch dimension")
        reduce_dims = tuple(d for d in range(x.dim()) if d != 1)
        mean = x.mean(reduce_dims, keepdim=True)
        var = x.var(reduce_dims, unbiased=False, keepdim=True)
        x_hat = (x - mean) / torch.sqrt(var + module.eps)
        position_dims = tuple(range(2, x.dim()))
    n = x_hat.shape[0]
    u = (g * x_hat).sum(position_dims) if position_dims else g * x_hat
    parts = [u]
    if module.bias is not None:
        parts.append(g.sum(position_dims) if position_dims else g)
    scale = float(n) if batch_averaged else 1.0
    return torch.cat([(p * p).sum(0).flatten() * scale for p in parts])


class AdaFisher(torch.optim.Optimizer):
    """AdaFisher: Adam-like steps preconditioned by a diagonal Kronecker-factored Fisher.

    Two ways to use it::

        opt = AdaFisher(model, lr=1e-3)            # as an optimizer
        loss.backward(); opt.step()

        af = AdaFisher(model)                      # as a preconditioner for another optimizer
        loss.backward(); af.precondition(); sgd.step()   # .grad <- grad / F

    Args:
        model: the network. ``nn.Linear`` and ``nn.Conv2d`` (groups=1) layers get the Kronecker
            diagonal, ``LayerNorm`` / ``BatchNorm`` layers with affine parameters (if
            ``norm_layers``) their empirical Fisher diagonal; other parameters ``F = 1``.
        lr: learning rate (paper default 1e-3).
        beta: EMA coefficient of the first moment ``m`` (paper: beta = 0.9).
        gamma: EMA coefficients of the Fisher factors. A pair ``(gamma1, gamma2)`` is the
            authors' code, ``X <- (1 - gamma1) X + gamma2 X_new``, default ``(0.92, 0.008)`` as
            in their code and README (the setting behind the published results); a number
            ``gamma`` is the conventional ``X <- gamma X + (1 - gamma) X_new`` (the paper's text:
            0.8; this keeps ``F`` near 1, so steps are about ``lr * m``; raise ``lr`` with it).
        damping: Tikhonov damping ``lambda`` > 0 added to the Fisher diagonal (paper: 1e-3).
        update_every: refresh the factors every this many steps (the paper's T_cov, 100).
        weight_decay: L2 coefficient added to the gradient, or (with ``decoupled_weight_decay``,
            AdaFisherW) a decoupled shrinkage ``theta <- theta (1 - lr wd)``.
        normalize: min-max normalise each new factor diagonal to [0, 1] (the paper's rule); with
            False the raw diagonals of K-FAC's ``A`` and ``G`` are averaged.
        norm_layers: give LayerNorm / BatchNorm their Fisher rule (else ``F = 1``).
        batch_averaged: the loss is a mean over the batch, so per-example output gradients are
            ``N`` times the captured ones (False: a sum loss).
        skip: regular expressions; matching layers (qualified or class name) get ``F = 1``.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, beta: float = 0.9,
                 gamma: float | Sequence[float] = (0.92, 0.008), damping: float = 1e-3,
                 update_every: int = 100,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 normalize: bool = True, norm_layers: bool = True, batch_averaged: bool = True,
                 skip: str | Sequence[str] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_positive("lr", lr, allow_zero=True)
        check_number("beta", beta, low=0.0, high=1.0, high_inclusive=False)
        self.gamma_keep, self.gamma_new = _ema_weights(gamma)
        self.gamma = gamma
        # lambda > 0 always: min-max normalisation maps the smallest entry to 0, and a constant
        # input feature (e.g. an always-black pixel) has H_D = 0 even without it.
        self.damping = check_positive("damping", damping)
        self.update_every = check_positive("update_every", update_every, integer=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        for key, value in (("decoupled_weight_decay", decoupled_weight_decay), ("normalize", normalize),
                           ("norm_layers", norm_layers), ("batch_averaged", batch_averaged)):
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r} must be True or False")
        self.decoupled_weight_decay = decoupled_weight_decay
        self.normalize = normalize
        self.batch_averaged = batch_averaged
        self.model = model
        self.steps = 0
        self._blocks: dict[str, _KronBlock | _NormBlock] = {}
        for name, module in candidate_modules(model, compile_skip(skip)):
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
                continue
            if norm_layers and isinstance(module, NORM_LAYERS):
                n_f = sum(p.numel() for p in (module.weight, module.bias) if p is not None)
                block: _KronBlock | _NormBlock = _NormBlock(
                    name, module, torch.ones(n_f, dtype=_stat_dtype(weight), device=weight.device))
            else:
                adapter = make_adapter(name, module)
                if adapter is None:
                    continue
                dt, dev = _stat_dtype(weight), weight.device
                block = _KronBlock(name, adapter, torch.ones(adapter.d_in, dtype=dt, device=dev),
                                   torch.ones(adapter.d_out, dtype=dt, device=dev))
            block.handles = register_capture(module, self._capture_step,
                                             on_output_grad=self._make_hook(block))
            self._blocks[name] = block
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay})

    # ------------------------------------------------------------------ capture
    def _capture_step(self) -> bool:
        return self.steps % self.update_every == 0

    def _make_hook(self, block: _KronBlock | _NormBlock):
        if isinstance(block, _NormBlock):
            def norm_hook(x: torch.Tensor, g: torch.Tensor) -> None:
                f = norm_layer_fisher(block.module, x, g, self.batch_averaged).to(block.F.dtype)
                block.f_sum = f if block.f_sum is None else block.f_sum + f
            return norm_hook

        def kron_hook(x: torch.Tensor, g: torch.Tensor) -> None:
            dt = block.H.dtype
            a_rows = block.adapter.input_rows(x.to(dt))
            g_rows = block.adapter.output_rows(g.to(dt))
            n = batch_size_of(g, 1 if isinstance(block.adapter.module, nn.Linear) else 3)
            h = (a_rows * a_rows).sum(0)
            s = (g_rows * g_rows).sum(0) * (float(n) if self.batch_averaged else 1.0)
            block.h_sum = h if block.h_sum is None else block.h_sum + h
            block.s_sum = s if block.s_sum is None else block.s_sum + s
            block.h_rows += a_rows.shape[0]
        return kron_hook

    # ------------------------------------------------------------------ statistics
    def _ema(self, current: torch.Tensor, new: torch.Tensor) -> None:
        if self.normalize:
            new = min_max_normalize(new)
        current.mul_(self.gamma_keep).add_(new, alpha=self.gamma_new)

    def _refresh(self) -> None:
        """Fold this step's statistics into the EMAs (on update steps)."""
        if not self._capture_step():
            return
        silent = []
        for name, block in self._blocks.items():
            if block.has_stats():
                if isinstance(block, _KronBlock):
                    assert block.h_sum is not None and block.s_sum is not None
                    self._ema(block.H, block.h_sum / block.h_rows)
                    self._ema(block.S, block.s_sum)
                else:
                    assert block.f_sum is not None
                    self._ema(block.F, block.f_sum)
            elif self.steps == 0 and any(p.grad is not None for p in block.params):
                silent.append(name)
            block.reset()
        if silent:
            raise RuntimeError(
                f"AdaFisher: layer(s) {silent} have gradients but their hooks never fired in the first "
                "step (applied functionally, or the forward ran in eval mode / without grad?). Exclude "
                "them with skip=[...] to give them F = 1")

    def fisher_diagonals(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{parameter: F}`` (damped Fisher diagonal, the parameter's shape) of the handled layers."""
        out: dict[torch.Tensor, torch.Tensor] = {}
        for block in self._blocks.values():
            if isinstance(block, _KronBlock):
                fisher = torch.outer(block.S, block.H) + self.damping  # F[o, i] = S[o] H[i] + lambda
                weight = block.adapter.module.weight
                n_w = weight[0].numel()
                out[weight] = fisher[:, :n_w].reshape(weight.shape).to(weight.dtype)
                if block.adapter.has_bias:
                    bias = block.adapter.module.bias
                    out[bias] = fisher[:, n_w].to(bias.dtype)
            else:
                fisher = block.F + self.damping
                start = 0
                for p in block.params:
                    out[p] = fisher[start:start + p.numel()].reshape(p.shape).to(p.dtype)
                    start += p.numel()
        return out

    # ------------------------------------------------------------------ optimizer API
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdaFisher step (refreshes the factors every ``update_every`` steps)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refresh()
        fisher = self.fisher_diagonals()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["beta"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if wd and not self.decoupled_weight_decay:
                    grad = grad.add(p, alpha=wd)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg = state["exp_avg"]
                exp_avg.mul_(beta).add_(grad, alpha=1 - beta)
                if wd and self.decoupled_weight_decay:
                    p.mul_(1 - lr * wd)
                step_size = lr / (1 - beta ** state["step"])
                f = fisher.get(p)
                if f is None:
                    p.add_(exp_avg, alpha=-step_size)
                else:
                    p.addcdiv_(exp_avg, f, value=-step_size)
        self.steps += 1
        return loss

    @torch.no_grad()
    def precondition(self) -> None:
        """Preconditioner-only mode: refresh the factors when due and set ``.grad <- .grad / F`` for
        the handled layers (other gradients untouched), for any ``torch.optim`` optimizer's step.
        The first moment, ``lr`` and weight decay of this object are not used in this mode."""
        self._refresh()
        for p, f in self.fisher_diagonals().items():
            if p.grad is not None:
                p.grad.div_(f)
        self.steps += 1

    # ------------------------------------------------------------------ inspection
    @property
    def layers(self) -> list[str]:
        """Names of the layers with a Fisher rule (Kronecker or normalisation layer)."""
        return list(self._blocks)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (H_D, S_D)}`` (EMA'd factor diagonals) of the Linear / Conv2d layers."""
        return {n: (b.H, b.S) for n, b in self._blocks.items() if isinstance(b, _KronBlock)}

    def norm_fisher(self) -> dict[str, torch.Tensor]:
        """``{layer: F}`` (EMA'd, undamped ``[weight, bias]`` Fisher diagonal) of the norm layers."""
        return {n: b.F for n, b in self._blocks.items() if isinstance(b, _NormBlock)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["adafisher"] = {
            "steps": self.steps,
            "blocks": {n: ({"H": b.H.clone(), "S": b.S.clone()} if isinstance(b, _KronBlock)
                           else {"F": b.F.clone()}) for n, b in self._blocks.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        if "adafisher" not in state_dict:
            raise ValueError("state_dict has no 'adafisher' entry; it was not saved by AdaFisher")
        saved = state_dict.pop("adafisher")
        if set(saved["blocks"]) != set(self._blocks):
            raise ValueError(f"state_dict layers {sorted(saved['blocks'])} do not match the "
                             f"registered layers {sorted(self._blocks)}")
        super().load_state_dict(state_dict)
        self.steps = int(saved["steps"])
        for name, block in self._blocks.items():
            tensors = saved["blocks"][name]
            if isinstance(block, _KronBlock):
                block.H = tensors["H"].clone().to(block.H)
                block.S = tensors["S"].clone().to(block.S)
            else:
                block.F = tensors["F"].clone().to(block.F)
            block.reset()

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model."""
        for block in self._blocks.values():
            remove_handles(block.handles)

    def __repr__(self) -> str:
        return (f"AdaFisher(layers={len(self._blocks)}, lr={self.defaults['lr']}, "
                f"beta={self.defaults['beta']}, gamma={self.gamma!r}, damping={self.damping}, "
                f"update_every={self.update_every})")


def _ema_weights(gamma: Any) -> tuple[float, float]:
    """``(keep, new)`` weights of the factor EMA from ``gamma`` (float or reference-code pair)."""
    if isinstance(gamma, int | float) and not isinstance(gamma, bool):
        check_number("gamma", gamma, low=0.0, high=1.0, high_inclusive=False)
        return float(gamma), 1.0 - float(gamma)
    if isinstance(gamma, Sequence) and not isinstance(gamma, str) and len(gamma) == 2:
        g1 = check_number("gamma[0]", gamma[0], low=0.0, high=1.0, low_inclusive=False)
        g2 = check_number("gamma[1]", gamma[1], low=0.0, high=1.0, low_inclusive=False)
        return 1.0 - float(g1), float(g2)
    raise ValueError(f"gamma={gamma!r} must be a number in [0, 1) (X <- gamma X + (1 - gamma) X_new) "
                     "or a pair (gamma1, gamma2) in (0, 1] (X <- (1 - gamma1) X + gamma2 X_new)")
