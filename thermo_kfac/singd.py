"""SINGD / IKFAC (Lin, Dangel et al., ICML 2024, arXiv 2312.05705): inverse-free structured K-FAC.

Each preconditioned layer (``nn.Linear``, ``nn.Conv2d`` with groups=1, and both projections of
every ``nn.MultiheadAttention``, including those inside ``nn.TransformerEncoderLayer``) keeps
structured roots ``K`` (``d_in + 1``, bias column included) and ``C`` (``d_out``) with
``K K^T ~ A^-1`` and ``C C^T ~ G^-1``, initialised to the identity. Every ``T`` steps, from the
captured input rows ``a`` and output-gradient rows ``g`` of the step's batch (the K-FAC-expand
rows of :mod:`thermo_kfac.capture.adapters`: one row per example and position; a convolution's
rows are its unfolded patches; ``U = a^T a / rows``, ``G_hat = N g^T g`` for a batch-averaged loss
over ``N`` examples, the scaling of K-FAC's factors)::

    H_K = Pi(K^T U K),  H_C = Pi(C^T G_hat C)
    IKFAC (kfac_like=True):  m_K <- alpha1 m_K + (H_K + lambda Pi(K^T K) - I) / 2
    SINGD:  m_K <- alpha1 m_K + (tr(H_C) H_K + lambda tr(C^T C) Pi(K^T K) - d_out I) / (2 d_out)
    K <- K (I - beta1 m_K)                      (m_C, C symmetric: swap K <-> C, d_out <-> d_in)

and every step the parameters move by ``m <- momentum m + C C^T grad K K^T + wd W``,
``W <- W - lr m``. No inverse or eigendecomposition is computed, so the preconditioner can live
in bfloat16/float16 (``dtype``) with every operation in that precision. With ``alpha1 = 0`` IKFAC
tracks K-FAC with the damping inside the EMA, ``S <- (1 - beta1) S + beta1 (U + lambda I)``, to first
order in ``beta1``. Other parameters (norms, embeddings, position tables) get plain SGD with momentum.

Capture uses the shared hooks and adapters of :mod:`thermo_kfac.capture`, active in training mode on
steps where the preconditioner is updated; attention modules get the explicit forward of
:class:`~thermo_kfac.capture.AttentionCapture` (restored by :meth:`SINGD.remove_hooks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hw_models.validation import check_number, check_positive
from thermo_kfac.capture import (
    AttentionCapture,
    LayerAdapter,
    LinearMapAdapter,
    candidate_modules,
    capture_hooks,
    check_attention,
    compile_skip,
    make_adapter,
    remove_handles,
    tap_hooks,
)
from thermo_kfac.structures import Structure, get_structure


class _Layer:
    """State and captured statistics of one preconditioned layer."""

    def __init__(self, name: str, adapter: LayerAdapter) -> None:
        self.name = name
        self.adapter = adapter
        self.module = adapter.module
        # this step's calls: (input rows, output-gradient rows, examples) per backward reached
        self.inputs: list[torch.Tensor] = []
        self.grads: list[tuple[torch.Tensor, int]] = []
        self.K: Structure | None = None
        self.C: Structure | None = None
        self.m_K: Structure | None = None
        self.m_C: Structure | None = None
        self.handles: list[Any] = []

    def clear(self) -> None:
        self.inputs, self.grads = [], []


def _examples(adapter: LayerAdapter, g: torch.Tensor) -> int:
    """Examples in one call's output gradient: its first dim, 1 for an unbatched call."""
    unbatched_dim = 3 if isinstance(adapter.module, nn.Conv2d) else 1
    return 1 if g.dim() == unbatched_dim else int(g.shape[0])


class SINGD(torch.optim.Optimizer):
    """Structured inverse-free natural gradient descent (SINGD) and its K-FAC-like variant IKFAC.

    Args:
        model: the network; every ``nn.Linear``, ``nn.Conv2d`` (groups=1) and
            ``nn.MultiheadAttention`` projection whose weight requires grad is preconditioned
            unless matched by ``skip``.
        lr: step size ``beta2`` of the parameter update.
        momentum: parameter momentum ``alpha2``.
        damping: ``lambda``.
        alpha1: Riemannian momentum of the factor updates.
        beta1: step size of the factor updates.
        T: update ``K`` and ``C`` every ``T`` steps.
        weight_decay: ``gamma``, added to the preconditioned gradient.
        structure: ``"dense"``, ``"diagonal"``, ``"block"``, ``"hierarchical"``, ``"toeplitz"`` or
            ``"lowrank"`` (see :mod:`thermo_kfac.structures`), used for both ``K`` and ``C``.
        structure_options: options of the structure (``block_size``, ``k1``/``k2``, ``rank``).
        kfac_like: IKFAC update (``True``) or SINGD's (``False``).
        dtype: precision of ``K``, ``C``, their momenta and all preconditioner arithmetic
            (default: the parameters' dtype).
        batch_averaged: the loss is a mean over the batch (output gradients carry ``1/N``).
        skip: regular expressions; matching layers (qualified or class name) are left to SGD.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.9,
                 damping: float = 1e-3, alpha1: float = 0.5, beta1: float = 1e-2, T: int = 10,
                 weight_decay: float = 0.0, structure: str = "dense",
                 structure_options: dict[str, Any] | None = None, kfac_like: bool = False,
                 dtype: torch.dtype | None = None, batch_averaged: bool = True,
                 skip: str | Sequence[str] = ()) -> None:
        check_positive("lr", lr, allow_zero=True)
        check_number("momentum", momentum, low=0, high=1, high_inclusive=False)
        check_positive("damping", damping, allow_zero=True)
        check_number("alpha1", alpha1, low=0, high=1, high_inclusive=False)
        check_positive("beta1", beta1, allow_zero=True)
        self.T = check_positive("T", T, integer=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        self.structure_cls = get_structure(structure)
        self.structure_options = dict(structure_options or {})
        self.structure_cls.normalize_options(10_000, **self.structure_options)  # validate early
        for key, value in (("kfac_like", kfac_like), ("batch_averaged", batch_averaged)):
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r} must be True or False")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} must be a floating-point torch.dtype or None")
        self.kfac_like = kfac_like
        self.batch_averaged = batch_averaged
        self.dtype = dtype
        self.steps = 0
        self._layers: list[_Layer] = []
        self._attention: list[AttentionCapture] = []
        self._register(model, compile_skip(skip))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        defaults = {"lr": lr, "momentum": momentum, "damping": damping, "alpha1": alpha1,
                    "beta1": beta1, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _register(self, model: nn.Module, skip: list[Any]) -> None:
        modules = list(candidate_modules(model, skip, patched_attention=True))
        for name, module in modules:
            if isinstance(module, nn.MultiheadAttention):
                check_attention(name, module)  # before any patch is installed
        for name, module in modules:
            if isinstance(module, nn.MultiheadAttention):
                # in_proj goes through linear_map in the explicit forward, out_proj is a module call
                self._attention.append(AttentionCapture(module))
                if module.in_proj_weight.requires_grad:
                    adapter = LinearMapAdapter(f"{name}.in_proj" if name else "in_proj",
                                               module.in_proj_weight, module.in_proj_bias, module=module)
                    layer = _Layer(adapter.name, adapter)
                    layer.handles.append(tap_hooks(module.in_proj_weight, adapter.module,
                                                   *self._hooks(layer)))
                    self._layers.append(layer)
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
                continue
            adapter = make_adapter(name, module)
            if adapter is None:
                continue
            layer = _Layer(name, adapter)
            pre_hook, forward_hook = self._hooks(layer)
            layer.handles += [module.register_forward_pre_hook(pre_hook),
                              module.register_forward_hook(forward_hook)]
            self._layers.append(layer)

    # ------------------------------------------------------------------ capture
    def _capturing(self) -> bool:
        return self.steps % self.T == 0

    def _hooks(self, layer: _Layer):
        """The shared capture hooks, keeping this step's input and output-gradient rows."""
        adapter = layer.adapter

        def on_input(a: torch.Tensor) -> None:
            layer.inputs.append(adapter.input_rows(a.to(self._pdtype(layer))))

        def on_output_grad(_: torch.Tensor, g: torch.Tensor) -> None:
            layer.grads.append((adapter.output_rows(g.to(self._pdtype(layer))), _examples(adapter, g)))

        return capture_hooks(self._capturing, on_input, on_output_grad)

    # ------------------------------------------------------------------ helpers
    def _pdtype(self, layer: _Layer) -> torch.dtype:
        return self.dtype or layer.module.weight.dtype

    def _init_layer(self, layer: _Layer) -> None:
        w = layer.adapter.weight
        d_in, d_out = layer.adapter.d_in, layer.adapter.d_out
        dt, dev, cls, opts = self._pdtype(layer), w.device, self.structure_cls, self.structure_options
        layer.K = cls.identity(d_in, dt, dev, **opts)
        layer.C = cls.identity(d_out, dt, dev, **opts)
        layer.m_K = cls.zeros(d_in, dt, dev, **opts)
        layer.m_C = cls.zeros(d_out, dt, dev, **opts)

    def _update_factors(self, layer: _Layer, group: dict[str, Any]) -> None:
        a = torch.cat(layer.inputs) if len(layer.inputs) > 1 else layer.inputs[0]
        g = torch.cat([rows for rows, _ in layer.grads]) if len(layer.grads) > 1 else layer.grads[0][0]
        n_rows, examples = a.shape[0], layer.grads[0][1]
        K, C, m_K, m_C = layer.K, layer.C, layer.m_K, layer.m_C
        assert K is not None and C is not None and m_K is not None and m_C is not None
        cls, opts = self.structure_cls, self.structure_options
        H_K = cls.from_inner(K.rmatmul(a) / math.sqrt(n_rows), **opts)
        # per-example gradients are N times the captured ones of a batch-mean loss
        g_scale = math.sqrt(examples) if self.batch_averaged else 1 / math.sqrt(examples)
        H_C = cls.from_inner(C.rmatmul(g) * g_scale, **opts)
        lam, alpha1, beta1 = group["damping"], group["alpha1"], group["beta1"]
        KtK, CtC = K.gram(), C.gram()
        if self.kfac_like:
            step_K = H_K.add(KtK, lam).add_identity(-1.0).scale(0.5)
            step_C = H_C.add(CtC, lam).add_identity(-1.0).scale(0.5)
        else:
            d_in, d_out = K.dim, C.dim
            step_K = (H_K.scale(float(H_C.trace())).add(KtK, lam * float(C.frob_sq()))
                      .add_identity(-float(d_out)).scale(1 / (2 * d_out)))
            step_C = (H_C.scale(float(H_K.trace())).add(CtC, lam * float(K.frob_sq()))
                      .add_identity(-float(d_in)).scale(1 / (2 * d_in)))
        layer.m_K = m_K.scale(alpha1).add(step_K)
        layer.m_C = m_C.scale(alpha1).add(step_C)
        layer.K = K.compose(layer.m_K.scale(-beta1).add_identity(1.0))
        layer.C = C.compose(layer.m_C.scale(-beta1).add_identity(1.0))

    def preconditioned_gradient(self, layer: str | _Layer) -> torch.Tensor | None:
        """``C C^T [grad W | grad b] K K^T`` of a layer (by name) in the preconditioner dtype
        (``None`` without grad)."""
        if isinstance(layer, str):
            layer = self._layer_named(layer)
        grad = layer.adapter.grad_matrix()
        if grad is None:
            return None
        grad = grad.to(self._pdtype(layer))
        assert layer.K is not None and layer.C is not None
        X = layer.C.matmul(layer.C.matmul(grad, transpose=True))
        return layer.K.rmatmul(layer.K.rmatmul(X), transpose=True)

    # ------------------------------------------------------------------ optimizer API
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One SINGD step (updates ``K``/``C`` every ``T`` steps from the captured batch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        updates: dict[torch.Tensor, torch.Tensor] = {}
        for layer in self._layers:
            if layer.K is None:
                self._init_layer(layer)
            if self.steps % self.T == 0 and layer.inputs and layer.grads:
                self._update_factors(layer, group)
            layer.clear()
            nat = self.preconditioned_gradient(layer)
            if nat is None:
                continue
            w, b = layer.adapter.weight, layer.adapter.bias
            updates[w] = nat[:, : w[0].numel()].reshape(w.shape).to(w.dtype)
            if b is not None:
                updates[b] = nat[:, -1].to(b.dtype)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = updates.get(p, p.grad)
                if group["weight_decay"]:
                    d = d + group["weight_decay"] * p
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.sub_(group["lr"] * buf)
        self.steps += 1
        return loss

    def memory_per_layer(self) -> dict[str, dict[str, int]]:
        """Bytes of ``K``, ``C`` and their momenta per layer (``total`` included)."""
        out = {}
        for layer in self._layers:
            if layer.K is None:
                self._init_layer(layer)
            parts = {"K": layer.K.nbytes(), "C": layer.C.nbytes(), "m_K": layer.m_K.nbytes(),
                     "m_C": layer.m_C.nbytes()}
            parts["total"] = sum(parts.values())
            out[layer.name] = parts
        return out

    @property
    def layers(self) -> list[str]:
        """Names of the preconditioned layers."""
        return [layer.name for layer in self._layers]

    def factor_roots(self, name: str) -> tuple[Structure, Structure]:
        """``(K, C)`` of the layer called ``name``."""
        layer = self._layer_named(name)
        if layer.K is None:
            self._init_layer(layer)
        return layer.K, layer.C

    def _layer_named(self, name: str) -> _Layer:
        for layer in self._layers:
            if layer.name == name:
                return layer
        raise ValueError(f"no preconditioned layer named {name!r}; layers: {self.layers}")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["singd"] = {
            "steps": self.steps,
            "layers": {layer.name: None if layer.K is None else
                       {k: getattr(layer, k).state_dict() for k in ("K", "C", "m_K", "m_C")}
                       for layer in self._layers},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        singd = state_dict.pop("singd")
        super().load_state_dict(state_dict)
        if set(singd["layers"]) != set(self.layers):
            raise ValueError(f"state_dict layers {sorted(singd['layers'])} do not match {self.layers}")
        self.steps = int(singd["steps"])
        for layer in self._layers:
            saved = singd["layers"][layer.name]
            for k in ("K", "C", "m_K", "m_C"):
                setattr(layer, k, None if saved is None else Structure.from_state_dict(saved[k]))

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model and restore the attention modules' forward."""
        for layer in self._layers:
            remove_handles(layer.handles)
        for capture in self._attention:
            capture.remove()
        self._attention.clear()
