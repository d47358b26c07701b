"""KLD-WRM (Puiu, "Rethinking Exponential Averaging of the Fisher", ECML PKDD 2022, arXiv 2204.04718).

K-FAC's exponential average of curvature estimates, ``F_bar_k = (1 - rho) sum_j rho^(k-j) F_j``,
re-read as a *wake of regularized models*: the step from ``theta_k`` minimises the linearized
loss plus ``lambda = 1 / lr`` times a rho-weighted sum of KL divergences to the previous models
``theta_j``. Plain K-FAC (EA-CM) centres every wake term at the current point; KLD-WRM centres
term ``j`` at ``theta_j``. With the second-order (Fisher) expansion of each KL around its own
model and damping ``gamma`` in each term (``F_j + gamma I``)::

    s_k = argmin_s  lr g_k^T s + (1/2) sum_j (1 - rho) rho^(k-j) |theta_k + s - theta_j|^2_(F_j + gamma)

whose stationarity condition is ``(F_bar_k + gamma) s_k = -(lr g_k + rho r_{k-1})`` with the
*wake vector* ``r_k = (1 - rho) sum_{j<=k} rho^(k-j) (F_j + gamma)(theta_{k+1} - theta_j)``, which
obeys ``r_k = rho r_{k-1} + (F_bar_k + gamma) (theta_{k+1} - theta_k)``. Variants
(``variant=``), per layer, on K-FAC's Kronecker factors ``F_bar = G_bar (x) A_bar`` (EMA ``rho``)
with factored damping ``(G_bar + sqrt(gamma) I) (x) (A_bar + sqrt(gamma) I)``:

* ``"so"`` (SO-KLD-WRM): the step above. When every step is taken exactly (no KL clip, no
  momentum), ``r_{k-1} = -lr_{k-1} g_{k-1}`` and the step is the paper's closed form
  ``s_k = -lr_k F_bar_k^-1 (g_k - rho (lr_{k-1} / lr_k) g_{k-1})`` (tested);
* ``"q"`` (Q-KLD-WRM): the linearized loss is replaced by its quadratic model ``lr (g_k^T s +
  s^T F_k s / 2)`` with ``F_k = G_k (x) A_k`` the current batch's (not averaged) factors, so
  ``(F_bar_k + gamma + lr F_k) s_k = -(lr g_k + rho r_{k-1})``; exactly taken steps give the
  closed form ``rho r_{k-1} = -rho lr_{k-1} (g_{k-1} + F_{k-1} s_{k-1})``. The sum of two
  Kronecker products is inverted exactly by the simultaneous diagonalisation of
  ``(A_bar_gamma, A_k)`` and ``(G_bar_gamma, G_k)`` (two ``eigh`` per factor);
* ``"qe"`` (QE-KLD-WRM): the Q step is the starting point of ``qe_steps`` inner SGD iterations
  (step ``qe_lr_factor lr``, per-parameter gradient RMS clipped to ``qe_clip``) on the sub-problem
  with the *exact* KL to the last ``qe_models`` models on the current batch instead of its
  quadratic expansion: ``g_k^T s + s^T F_k s / 2 + (1 / (2 lr)) W``, ``W`` the rho-weighted
  average (recursively ``W <- rho W + (1 - rho) KL_j``, oldest first) of the symmetric KL between
  the softmax outputs (``qe_output="softmax"``, logits over dim 1) or ``|f - f_j|^2 / 2``
  (``"gaussian"``) of the model and model ``j``. The batch is the model's latest training input
  (a forward pre-hook keeps it); until ``qe_models`` models are stored the step is Q's.
* ``"kfac"``: ``r = 0``, i.e. EA-CM K-FAC in the same code (the ablation).

The wake vector tracks the displacement actually taken (after the KL clip, momentum and QE's
inner iterations), so it stays the wake of the models visited even when a step is not the exact
minimiser. Parameters outside the preconditioned layers get SGD with momentum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac.capture import (
    LayerAdapter,
    candidate_modules,
    compile_skip,
    register_capture,
    remove_handles,
    trainable_adapters,
)

VARIANTS = ("so", "q", "qe", "kfac")
QE_OUTPUTS = ("softmax", "gaussian")


@dataclass
class _Layer:
    name: str
    adapter: LayerAdapter
    a_stat: torch.Tensor | None = None   # this step's sum of input rows' outer products and row count
    a_rows: int = 0
    g_stat: torch.Tensor | None = None   # this step's per-example-scaled output-gradient Gram matrix
    A_bar: torch.Tensor | None = None    # EMA factors
    G_bar: torch.Tensor | None = None
    A_loc: torch.Tensor | None = None    # the latest batch's factors (variant "q")
    G_loc: torch.Tensor | None = None
    solve: dict[str, torch.Tensor] = field(default_factory=dict)  # damped factors and their bases
    wake: torch.Tensor | None = None     # r_k, (d_out, d_in)
    handles: list[Any] = field(default_factory=list)


def _symmetric_sqrt_inv(M: torch.Tensor) -> torch.Tensor:
    d, Q = torch.linalg.eigh(M)
    return (Q * d.clamp_min(torch.finfo(M.dtype).tiny).rsqrt()) @ Q.T


def two_term_basis(M_bar: torch.Tensor, M_loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, s)`` with ``K^T M_bar K = I`` and ``K^T M_loc K = diag(s)`` (``M_bar`` positive definite,
    ``M_loc`` symmetric): the simultaneous diagonalisation behind the two-term Kronecker inverse."""
    P = _symmetric_sqrt_inv(M_bar)
    s, E = torch.linalg.eigh(P @ M_loc @ P)
    return P @ E, s


def two_term_solve(V: torch.Tensor, K_G: torch.Tensor, s_G: torch.Tensor, K_A: torch.Tensor,
                   s_A: torch.Tensor, alpha: float) -> torch.Tensor:
    """``X`` with ``G_bar X A_bar + alpha G_loc X A_loc = V`` from the bases of :func:`two_term_basis`
    (``X = K_G [(K_G^T V K_A) / (1 + alpha s_G s_A^T)] K_A^T``)."""
    return K_G @ ((K_G.T @ V @ K_A) / (1 + alpha * torch.outer(s_G, s_A))) @ K_A.T


class KLDWRM(torch.optim.Optimizer):
    """KL-divergence wake-regularized models on K-FAC's Kronecker factors (module docs).

    Args:
        model: every ``nn.Linear`` and ``nn.Conv2d`` (groups=1) whose weight requires grad is
            preconditioned unless matched by ``skip``.
        lr: ``1 / lambda``, the weight of the loss against the wake (a scheduler may change it).
        variant: ``"so"``, ``"q"``, ``"qe"`` or ``"kfac"`` (module docs).
        stat_decay: ``rho``, the EMA decay of the factors and the wake's decay.
        damping: ``gamma``, added to each wake model's curvature (factored: ``sqrt(gamma)`` per factor).
        kl_clip: scale a step down to ``sum_l s^T (F_bar + gamma) s <= kl_clip`` (None: never).
        momentum: heavy-ball momentum on the taken step (0 keeps the exact minimiser).
        weight_decay: L2 coefficient added to the gradient.
        update_every: refresh the factors and their decompositions every this many steps.
        batch_averaged: the loss is a mean over the batch (output gradients carry ``1/N``).
        skip: regular expressions of layers left to SGD.
        qe_steps, qe_lr_factor, qe_clip, qe_models, qe_output: QE's inner iterations, their step
            (times ``lr``), gradient RMS clip per parameter, the stored models and the output
            divergence (``"softmax"`` or ``"gaussian"``).
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, variant: str = "so", stat_decay: float = 0.95,
                 damping: float = 0.1, kl_clip: float | None = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, update_every: int = 1, batch_averaged: bool = True,
                 skip: str | Sequence[str] = (), qe_steps: int = 10, qe_lr_factor: float = 0.01,
                 qe_clip: float | None = 1.5, qe_models: int = 3, qe_output: str = "softmax") -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_positive("lr", lr)
        self.variant = check_choice("variant", variant, VARIANTS)
        self.rho = check_number("stat_decay", stat_decay, low=0.0, high=1.0, high_inclusive=False)
        self.damping = check_positive("damping", damping, allow_zero=True)
        self.kl_clip = None if kl_clip is None else check_positive("kl_clip", kl_clip)
        check_number("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        self.update_every = check_positive("update_every", update_every, integer=True)
        if not isinstance(batch_averaged, bool):
            raise ValueError(f"batch_averaged={batch_averaged!r} must be True or False")
        self.batch_averaged = batch_averaged
        self.qe_steps = check_positive("qe_steps", qe_steps, integer=True, allow_zero=True)
        self.qe_lr_factor = check_positive("qe_lr_factor", qe_lr_factor)
        self.qe_clip = None if qe_clip is None else check_positive("qe_clip", qe_clip)
        self.qe_models = check_positive("qe_models", qe_models, integer=True)
        self.qe_output = check_choice("qe_output", qe_output, QE_OUTPUTS)
        self.model = model
        self._inputs: tuple[Any, ...] | None = None
        self._in_qe = False  # QE's inner forwards: no capture
        self._snapshots: list[dict[str, torch.Tensor]] = []
        self._input_handle = (model.register_forward_pre_hook(self._keep_inputs) if self.variant == "qe"
                              else None)
        self.steps = 0
        self.last_kl_scale = 1.0
        self._layers: list[_Layer] = []
        for name, module, adapter in trainable_adapters(candidate_modules(model, compile_skip(skip))):
            layer = _Layer(name, adapter)
            layer.handles = register_capture(module, self._capturing, *self._hooks(layer))
            self._layers.append(layer)
        if not self._layers:
            raise ValueError("the model has no nn.Linear or nn.Conv2d layer to precondition (after skip)")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    # ------------------------------------------------------------------ capture
    def _capturing(self) -> bool:
        return not self._in_qe and self.steps % self.update_every == 0

    def _keep_inputs(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """QE: the latest training batch, the sub-problem's data."""
        if module.training and torch.is_grad_enabled() and not self._in_qe:
            self._inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

    def _hooks(self, layer: _Layer):
        adapter = layer.adapter

        def on_input(a: torch.Tensor) -> None:
            stat, rows = adapter.input_statistic(a.to(torch.float64))
            layer.a_stat = stat if layer.a_stat is None else layer.a_stat + stat
            layer.a_rows += rows

        def on_output_grad(_: torch.Tensor, g: torch.Tensor) -> None:
            rows = adapter.output_rows(g.to(torch.float64))
            examples = 1 if g.dim() == (3 if isinstance(adapter.module, nn.Conv2d) else 1) else g.shape[0]
            scale = examples if self.batch_averaged else 1.0 / examples  # per-example gradients
            stat = scale * (rows.T @ rows)
            layer.g_stat = stat if layer.g_stat is None else layer.g_stat + stat

        return on_input, on_output_grad

    # ------------------------------------------------------------------ curvature
    def _refresh(self, layer: _Layer) -> None:
        """Fold the step's statistics into the EMA and rebuild the solve (every ``update_every``)."""
        A_loc, G_loc = layer.a_stat / layer.a_rows, layer.g_stat
        layer.a_stat, layer.a_rows, layer.g_stat = None, 0, None
        if layer.A_bar is None:
            layer.A_bar, layer.G_bar = A_loc.clone(), G_loc.clone()
        else:
            layer.A_bar.mul_(self.rho).add_(A_loc, alpha=1 - self.rho)
            layer.G_bar.mul_(self.rho).add_(G_loc, alpha=1 - self.rho)
        layer.A_loc, layer.G_loc = A_loc, G_loc
        self._rebuild(layer)

    def _rebuild(self, layer: _Layer) -> None:
        """The damped factors and what the step solves with, from the layer's current factors."""
        A_loc, G_loc = layer.A_loc, layer.G_loc
        root = math.sqrt(self.damping)
        A_d = layer.A_bar + root * torch.eye(len(A_loc), dtype=A_loc.dtype, device=A_loc.device)
        G_d = layer.G_bar + root * torch.eye(len(G_loc), dtype=G_loc.dtype, device=G_loc.device)
        solve = {"A": A_d, "G": G_d}
        if self.variant in ("q", "qe"):
            solve["K_A"], solve["s_A"] = two_term_basis(A_d, A_loc)
            solve["K_G"], solve["s_G"] = two_term_basis(G_d, G_loc)
        else:
            solve["A_inv"], solve["G_inv"] = torch.linalg.inv(A_d), torch.linalg.inv(G_d)
        layer.solve = solve

    def curvature_product(self, name: str, V: torch.Tensor) -> torch.Tensor:
        """``(F_bar + gamma) V`` of a layer, ``(G_bar + sqrt(gamma)) V (A_bar + sqrt(gamma))``, with
        the factors of its last refresh."""
        solve = self._layer_named(name).solve
        return solve["G"] @ V @ solve["A"]

    def _direction(self, layer: _Layer, rhs: torch.Tensor, lr: float) -> torch.Tensor:
        solve = layer.solve
        if self.variant in ("q", "qe"):
            return -two_term_solve(rhs, solve["K_G"], solve["s_G"], solve["K_A"], solve["s_A"], lr)
        return -(solve["G_inv"] @ rhs @ solve["A_inv"])

    # ------------------------------------------------------------------ optimizer API
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One KLD-WRM step (refreshing the factors on capture steps)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, wd = group["lr"], group["weight_decay"]
        qe = self.variant == "qe" and self.qe_steps and len(self._snapshots) == self.qe_models \
            and self._inputs is not None
        start = self._qe_start(wd) if qe else None
        steps: dict[str, torch.Tensor] = {}
        for layer in self._layers:
            if layer.a_stat is not None and layer.g_stat is not None and layer.a_rows:
                self._refresh(layer)
            grad = layer.adapter.grad_matrix()
            if grad is None or not layer.solve:
                continue
            grad = grad.to(torch.float64)
            if wd:
                grad = grad + wd * self._param_matrix(layer)
            rhs = lr * grad
            if self.variant != "kfac" and layer.wake is not None:
                rhs = rhs + self.rho * layer.wake
            steps[layer.name] = self._direction(layer, rhs, lr)
        kl = sum(float((s * self.curvature_product(n, s)).sum()) for n, s in steps.items())
        nu = 1.0 if self.kl_clip is None or kl <= self.kl_clip else math.sqrt(self.kl_clip / kl)
        self.last_kl_scale = nu
        done: set[int] = set()
        for layer in self._layers:
            s = steps.get(layer.name)
            if s is None:
                continue
            taken = self._momentum_step(layer, nu * s, group["momentum"])
            for p in layer.adapter.parameters():
                done.add(id(p))
            if self.variant != "kfac":
                moved = self.curvature_product(layer.name, taken)
                layer.wake = moved if layer.wake is None else layer.wake.mul_(self.rho).add_(moved)
        self._sgd_rest(group, done)
        if start is not None:
            self._qe_iterations(group, *start)
        if self.variant == "qe":
            self._snapshots = (self._snapshots + [{n: p.detach().clone() for n, p in
                                                  self.model.named_parameters()}])[-self.qe_models:]
        self.steps += 1
        return loss

    # ------------------------------------------------------------------ QE-KLD-WRM
    def _qe_start(self, wd: float) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
        """``g_k`` of every parameter (with weight decay) and ``theta_k`` of every layer."""
        grads = {id(p): (p.grad + wd * p if wd else p.grad).detach().clone()
                 for group in self.param_groups for p in group["params"] if p.grad is not None}
        return grads, {layer.name: self._param_matrix(layer) for layer in self._layers}

    def _divergence(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.qe_output == "gaussian":
            return 0.5 * (out - target).square().flatten(1).sum(1).mean()
        log_p, log_q = torch.log_softmax(out, dim=1), torch.log_softmax(target, dim=1)
        sym = 0.5 * (log_p.exp() - log_q.exp()) * (log_p - log_q)  # (KL(p|q) + KL(q|p)) / 2
        return sym.sum(dim=1).mean()

    def _qe_iterations(self, group: dict[str, Any], g_k: dict[int, torch.Tensor],
                       theta_k: dict[str, torch.Tensor]) -> None:
        """SGD on ``g_k^T s + s^T F_k s / 2 + W / (2 lr)`` from the Q step (module docs)."""
        lr = group["lr"]
        params = [p for p in group["params"] if id(p) in g_k]
        after_q = {layer.name: self._param_matrix(layer) for layer in self._layers if layer.solve}
        self._in_qe = True
        try:
            with torch.no_grad():
                targets = [functional_call(self.model, snap, self._inputs) for snap in self._snapshots]
            for _ in range(self.qe_steps):
                with torch.enable_grad():
                    out = self.model(*self._inputs)
                    wake = None
                    for target in targets:  # oldest first
                        kl = self._divergence(out, target)
                        wake = kl if wake is None else self.rho * wake + (1 - self.rho) * kl
                    kl_grads = torch.autograd.grad(wake / (2 * lr), params, allow_unused=True)
                total = {id(p): g_k[id(p)] + (0 if g is None else g)
                         for p, g in zip(params, kl_grads, strict=True)}
                for layer in self._layers:
                    if layer.name not in after_q or layer.A_loc is None:
                        continue
                    curv = layer.G_loc @ (self._param_matrix(layer) - theta_k[layer.name]) @ layer.A_loc
                    w, b = layer.adapter.weight, layer.adapter.bias
                    n_w = w[0].numel()
                    total[id(w)] = total[id(w)] + curv[:, :n_w].reshape(w.shape).to(w.dtype)
                    if b is not None:
                        total[id(b)] = total[id(b)] + curv[:, n_w].to(b.dtype)
                for p in params:
                    d = total[id(p)]
                    if self.qe_clip is not None:
                        rms = float(d.norm()) / math.sqrt(d.numel())
                        d = d * min(1.0, self.qe_clip / rms) if rms > 0 else d
                    p.sub_(self.qe_lr_factor * lr * d)
        finally:
            self._in_qe = False
        for layer in self._layers:  # the wake follows the inner iterations' displacement
            if layer.name in after_q and layer.wake is not None:
                moved = self._param_matrix(layer) - after_q[layer.name]
                layer.wake.add_(self.curvature_product(layer.name, moved))

    def _param_matrix(self, layer: _Layer) -> torch.Tensor:
        w, b = layer.adapter.weight, layer.adapter.bias
        mat = w.detach().reshape(w.shape[0], -1)
        if b is not None:
            mat = torch.cat([mat, b.detach().reshape(-1, 1)], dim=1)
        return mat.to(torch.float64)

    def _momentum_step(self, layer: _Layer, s: torch.Tensor, momentum: float) -> torch.Tensor:
        """Apply ``delta = momentum delta_prev + s`` to the layer's parameters; returns ``delta``."""
        w, b = layer.adapter.weight, layer.adapter.bias
        state = self.state[w]
        if momentum:
            delta = state["delta"].mul_(momentum).add_(s) if "delta" in state else s.clone()
            state["delta"] = delta
        else:
            delta = s
        n_w = w[0].numel()
        w.add_(delta[:, :n_w].reshape(w.shape).to(w.dtype))
        if b is not None:
            b.add_(delta[:, n_w].to(b.dtype))
        return delta

    def _sgd_rest(self, group: dict[str, Any], done: set[int]) -> None:
        for p in group["params"]:
            if id(p) in done or p.grad is None:
                continue
            d = p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad
            state = self.state[p]
            buf = state.get("momentum_buffer")
            buf = d.clone() if buf is None else buf.mul_(group["momentum"]).add_(d)
            state["momentum_buffer"] = buf
            p.sub_(group["lr"] * buf)

    # ------------------------------------------------------------------ inspection
    @property
    def layers(self) -> list[str]:
        """Names of the preconditioned layers."""
        return [layer.name for layer in self._layers]

    def wake(self, name: str) -> torch.Tensor | None:
        """The wake vector ``r_k`` of a layer (``(d_out, d_in)``, None before its first step)."""
        return self._layer_named(name).wake

    def factors(self, name: str) -> dict[str, torch.Tensor | None]:
        """``A_bar``, ``G_bar`` (EMA) and ``A_loc``, ``G_loc`` (latest batch) of a layer."""
        layer = self._layer_named(name)
        return {"A_bar": layer.A_bar, "G_bar": layer.G_bar, "A_loc": layer.A_loc, "G_loc": layer.G_loc}

    def _layer_named(self, name: str) -> _Layer:
        for layer in self._layers:
            if layer.name == name:
                return layer
        raise ValueError(f"no preconditioned layer named {name!r}; layers: {self.layers}")

    _SAVED = ("A_bar", "G_bar", "A_loc", "G_loc", "wake")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kld_wrm"] = {"steps": self.steps, "variant": self.variant, "snapshots": self._snapshots,
                            "layers": {layer.name: {k: getattr(layer, k) for k in self._SAVED}
                                       for layer in self._layers}}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("kld_wrm")
        if set(saved["layers"]) != set(self.layers) or saved["variant"] != self.variant:
            raise ValueError(f"state_dict of variant {saved['variant']!r} with layers "
                             f"{sorted(saved['layers'])} does not match {self.variant!r}, {self.layers}")
        super().load_state_dict(state_dict)
        self.steps = int(saved["steps"])
        self._snapshots = [{n: t.clone() for n, t in snap.items()} for snap in saved["snapshots"]]
        for layer in self._layers:
            for key, value in saved["layers"][layer.name].items():
                setattr(layer, key, None if value is None else value.clone())
            layer.solve = {}
            if layer.A_bar is not None:
                self._rebuild(layer)  # the factors only change at a refresh, so this is that solve

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model."""
        for layer in self._layers:
            remove_handles(layer.handles)
        if self._input_handle is not None:
            self._input_handle.remove()
