"""``KFAC``: a complete K-FAC optimizer (the preconditioner plus Martens & Grosse's step rule).

Usage::

    opt = thermo_kfac.KFAC(model, loss="bce")     # damping, learning rate and momentum adapted
    for x, y in loader:
        loss = opt.step(x, y)                     # forward, backward, curvature, update

For a model that takes other inputs, pass a tuple (``model(*inputs)``), a dict
(``model(**inputs)``) or a *forward closure* that computes the model's output from the current
parameters::

    loss = opt.step(forward=lambda: model(tokens, mask=mask), targets=labels)

The step (Martens & Grosse 2015, sections 6-7; ``h`` is the batch loss plus ``eta/2 |theta|^2``):

1. ``g = grad h`` (the loss evaluated in ``loss_dtype``, float64 by default); the preconditioner
   (:class:`~thermo_kfac.KFACPreconditioner`, factored Tikhonov damping of value
   ``lambda + eta``, i.e. ``gamma = sqrt(lambda + eta)`` per factor) gives the direction
   ``Delta = -F_kfac^-1 g`` (parameters outside the registered layers: ``Delta = -g``).
2. ``alpha`` and ``mu`` minimise the quadratic model
   ``M(delta) = g^T delta + 1/2 delta^T (C + (lambda + eta) I) delta`` over
   ``delta = alpha Delta + mu delta_0`` (``delta_0`` the previous update), where ``C`` is the
   exact generalized Gauss-Newton matrix of the batch loss (equal to its Fisher for the
   supported losses). The 2x2 system needs ``v^T C w`` for ``v, w`` in ``{Delta, delta_0}``:
   ``J v`` by forward-mode AD through the network (``torch.func.jvp``, both tangents in one
   vmapped pass; for chain models by :mod:`thermo_kfac.chain`'s direct recursion), then the
   exact Hessian of the loss with respect to the outputs. A fixed
   ``lr`` or ``momentum`` removes that unknown (fixing both removes the products, except on
   damping-adaptation steps).
   Guard: the objective is nonnegative, so when the model predicts a decrease larger than
   ``h(theta)`` itself (it does for confidently wrong predictions, where the cross-entropy's
   curvature is tiny: the blow-ups seen with small damping), the step is scaled down until its
   first-order decrease ``-g^T delta`` is ``h`` and ``lambda`` grows by ``1/omega`` (counted in
   ``guarded_steps``). Only adapted step sizes are guarded.
3. ``theta += delta``.
4. Every ``damping_adaptation_every`` (``T1``) steps, the Levenberg-Marquardt rule on the
   reduction ratio ``rho = (h(theta + delta) - h(theta)) / (M_0(delta) - M_0(0))`` (``M_0``: the
   quadratic model with ``C + eta I``, without ``lambda``; one extra forward on the same
   batch; both losses in float64):
   ``lambda *= omega`` if ``rho > 3/4``, ``lambda /= omega`` if ``rho < 1/4``, with
   ``omega = damping_decay ** T1`` (``(19/20)^T1`` by default), clamped to
   ``[min_damping, max_damping]``. If the loss after the step is not finite, the step is taken
   back (counted in ``rejected_steps``) and ``lambda`` grows.

The new damping reaches the solvers at their next inverse update (every
``inverse_update_every`` steps), as in the paper; the quadratic model always uses the current
``lambda``. In distributed mode (a process group of more than one rank) the curvature products
are computed on each rank's local batch and averaged (three numbers per step), as are the losses
that enter ``rho`` and the guard, so every rank takes the same step.

Extra forwards (the ``jvp`` and the ``rho`` evaluation) run without gradients, so the
preconditioner's hooks do not record them; layers with running statistics (batch norm) do update
them in those forwards.

Layout: this module holds the optimizer's state and the step; :mod:`thermo_kfac.quadratic` the
quadratic model (curvature-vector products, the 2x2 minimiser, the damping rule).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac import chain, quadratic
from thermo_kfac.defaults import KFAC_ADAPTIVE_DEFAULTS
from thermo_kfac.fisher import LOSSES
from thermo_kfac.preconditioner import KFACPreconditioner
from thermo_kfac.process_group import unwrap
from thermo_kfac.quadratic import (
    LOSS_FUNCTIONS,
    Forward,
    all_reduce_mean,
    lm_damping_update,
    loss_hessian_products,
    minimise_step,
    reduction_ratio,
)
from thermo_kfac.solvers.base import Damping

__all__ = ["KFAC", "LOSSES", "lm_damping_update", "loss_hessian_products", "reduction_ratio"]


class KFAC:
    """K-FAC with adaptive damping and quadratic-model learning rate and momentum.

    Args:
        model: the network (``nn.Linear``/``nn.Conv2d`` and the other layers the preconditioner
            supports are preconditioned; remaining parameters get the plain gradient direction).
            A ``DistributedDataParallel`` model is accepted.
        loss: ``"cross_entropy"`` (logits, class dim 1), ``"bce"`` (binary cross-entropy with
            logits) or ``"mse"``; mean reduction, as in ``torch.nn.functional``.
        lr: fixed learning rate ``alpha``; None (default) chooses it every step from the
            quadratic model.
        momentum: fixed momentum ``mu``; None (default) chooses it every step from the quadratic
            model.
        damping: initial (or, with ``adapt_damping=False``, fixed) damping ``lambda``.
        adapt_damping: adapt ``lambda`` by the Levenberg-Marquardt rule on ``rho``.
        damping_adaptation_every: ``T1``, steps between damping adaptations.
        damping_decay: per-step factor; ``omega = damping_decay ** T1``.
        min_damping, max_damping: bounds of the adapted ``lambda`` (``min_damping`` 1e-8 as in
            kfac-jax: near an interpolating solution the curvature, and with it the useful
            damping, keeps shrinking).
        max_momentum: an adapted ``mu`` is constrained to ``[0, max_momentum]`` (on a mini-batch
            the unconstrained 2x2 minimiser can be far outside; then ``alpha`` is re-optimised
            with ``mu`` at the bound); None leaves it unconstrained.
        weight_decay: ``eta``: L2 term ``eta/2 |theta|^2`` added to the objective (its gradient
            is preconditioned and ``eta`` is added to the damping, as in the paper).
        loss_dtype: dtype in which the loss and its gradient with respect to the outputs are
            computed (the outputs are cast; None: the outputs' dtype). float64 by default: near an
            interpolating solution the float32 cross-entropy gradient ``p - y`` loses the
            true class's ``-eps`` to rounding (``p`` rounds to 1), and the float32 loss is
            quantized, which made the steps and ``rho`` noise. It costs a cast of the outputs.
            ``rho`` and the step guard always use float64 losses.
        curvature_examples: examples of the batch used for the curvature products (the first
            ones; None: the whole batch). Fewer make the adaptive step cheaper and noisier; the
            2x2 system needs only three numbers, which a few hundred examples estimate well.
        fisher_type, factor_decay, factor_update_every, inverse_update_every, solver,
        solver_options, pi_damping, factor_dtype: passed to :class:`~thermo_kfac.KFACPreconditioner`;
            ``preconditioner_options`` may carry any other of its keyword arguments (not
            ``damping``, ``kl_clip``, ``optimizer``, ``loss``: the step rule owns them). The
            defaults differ from the preconditioner's: the Monte-Carlo Fisher (as in the paper;
            with the empirical Fisher the adapted steps diverged on the digits MLP), factors
            every 5 steps and inverses every 20 (cheaper steps; wall-clock is what counts).

    Attributes:
        preconditioner: the :class:`~thermo_kfac.KFACPreconditioner` in use.
        chain: the model as a chain of linear layers and elementwise activations
            (:func:`thermo_kfac.chain.linear_chain`), whose curvature products then skip
            ``torch.func`` (:func:`thermo_kfac.chain.chain_jvp`); None for other models, which
            use ``torch.func``. Set it to None to force the ``torch.func`` path.
        damping: the current ``lambda``.
        last_report: the last step's ``loss``, ``alpha``, ``mu``, ``rho`` (None when not
            computed), ``damping``, the quadratic model's predicted change, whether the step was
            ``guarded``, and the seconds spent in the preconditioner and in the curvature products.
        rejected_steps: steps taken back because the loss after them was not finite.
        guarded_steps: steps scaled down because the model predicted a decrease larger than the
            objective itself (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss: str = "cross_entropy",
        lr: float | None = None,
        momentum: float | None = None,
        damping: float = KFAC_ADAPTIVE_DEFAULTS["damping"],
        adapt_damping: bool = True,
        damping_adaptation_every: int = 5,
        damping_decay: float = 0.95,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        max_momentum: float | None = 1.0,
        weight_decay: float = 0.0,
        curvature_examples: int | None = 256,
        loss_dtype: torch.dtype | None = torch.float64,
        fisher_type: str = KFAC_ADAPTIVE_DEFAULTS["fisher_type"],
        factor_decay: float = KFAC_ADAPTIVE_DEFAULTS["factor_decay"],
        factor_update_every: int = KFAC_ADAPTIVE_DEFAULTS["factor_update_every"],
        inverse_update_every: int = KFAC_ADAPTIVE_DEFAULTS["inverse_update_every"],
        solver: Any = KFAC_ADAPTIVE_DEFAULTS["solver"],
        solver_options: dict[str, Any] | None = None,
        pi_damping: bool = KFAC_ADAPTIVE_DEFAULTS["pi_damping"],
        factor_dtype: torch.dtype = torch.float32,
        preconditioner_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.loss = check_choice("loss", loss, LOSSES)
        self.lr = None if lr is None else check_positive("lr", lr)
        self.momentum = None if momentum is None else check_number(
            "momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        self.max_momentum = None if max_momentum is None else check_number(
            "max_momentum", max_momentum, low=0.0)
        self.min_damping = check_positive("min_damping", min_damping)
        self.max_damping = check_positive("max_damping", max_damping)
        if self.max_damping < self.min_damping:
            raise ValueError(f"max_damping={max_damping} is below min_damping={min_damping}")
        self.damping = float(check_positive("damping", damping))
        if not isinstance(adapt_damping, bool):
            raise ValueError(f"adapt_damping={adapt_damping!r} must be True or False")
        self.adapt_damping = adapt_damping
        self.damping_adaptation_every = check_positive(
            "damping_adaptation_every", damping_adaptation_every, integer=True)
        self.damping_decay = check_number("damping_decay", damping_decay, low=0.0, high=1.0,
                                          low_inclusive=False, high_inclusive=False)
        self.weight_decay = check_number("weight_decay", weight_decay, low=0.0)
        if curvature_examples is not None:
            check_positive("curvature_examples", curvature_examples, integer=True)
        self.curvature_examples = curvature_examples
        if loss_dtype is not None and loss_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"loss_dtype={loss_dtype!r} must be torch.float32, torch.float64 or None")
        self.loss_dtype = loss_dtype
        options = dict(preconditioner_options or {})
        owned = {"damping", "kl_clip", "optimizer", "loss", "reduction"} & set(options)
        if owned:
            raise ValueError(f"preconditioner_options may not set {sorted(owned)}: KFAC owns them "
                             "(use its damping argument; the step size replaces KL clipping)")
        self.model = model
        module = unwrap(model)
        # traced before the preconditioner adds its hooks; see thermo_kfac.chain
        links = chain.linear_chain(module)
        self.chain: list[chain.Link] | None = links
        self.preconditioner = KFACPreconditioner(
            model, loss=self.loss, reduction="mean", fisher_type=fisher_type,
            damping=self.damping + self.weight_decay, pi_damping=pi_damping,
            factor_decay=factor_decay, factor_update_every=factor_update_every,
            inverse_update_every=inverse_update_every, solver=solver,
            solver_options=solver_options, kl_clip=None, factor_dtype=factor_dtype, **options)
        self.module = module
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter that requires grad")
        self._names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if links is not None:
            owned = chain.chain_parameters(links)
            if any(owned.get(n) is not p for n, p in named):
                self.chain = None  # a trained parameter outside the chain's linear layers
        self.steps = 0
        self.rejected_steps = 0
        self.guarded_steps = 0
        self.previous_update: list[torch.Tensor] | None = None
        self.last_report: dict[str, Any] = {}

    # ------------------------------------------------------------------------------- public
    @property
    def omega(self) -> float:
        """Factor of one damping adaptation: ``damping_decay ** damping_adaptation_every``."""
        return self.damping_decay ** self.damping_adaptation_every

    def zero_grad(self) -> None:
        """Reset the parameters' gradients (``step`` does it itself before its backward)."""
        for p in self.params:
            p.grad = None

    def loss_fn(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean-reduced training loss (without the weight-decay term)."""
        return LOSS_FUNCTIONS[self.loss](outputs, targets)

    def step(self, inputs: Any = None, targets: torch.Tensor | None = None, *,
             forward: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One training step on a batch; returns the batch loss (detached, before the update).

        ``inputs``: a tensor (``model(inputs)``), a tuple (``model(*inputs)``) or a dict
        (``model(**inputs)``). Or ``forward``: a zero-argument closure returning the model's
        output for the batch from the current parameters (it is re-run for the curvature
        products and for ``rho``). ``targets``: labels (cross-entropy) or target values.
        """
        return self.train_step(inputs, targets, forward=forward)[1]

    def train_step(self, inputs: Any = None, targets: torch.Tensor | None = None, *,
                   forward: Callable[[], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step` returning ``(outputs, loss)`` (outputs of the forward before the update)."""
        if targets is None:
            raise ValueError("targets is required: the labels or values the loss compares with")
        run = self._forward_function(inputs, forward)
        start = time.perf_counter()
        for p in self.params:
            p.grad = None
        outputs = run()
        if self.preconditioner.fisher_type != "empirical":
            self.preconditioner.accumulate_curvature(outputs)
        batch_loss = self.loss_fn(*self._loss_inputs(outputs, targets))
        batch_loss.backward()
        eta = self.weight_decay
        with torch.no_grad():
            if eta:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.add_(p, alpha=eta)
            adaptation_step = (self.adapt_damping
                               and (self.steps + 1) % self.damping_adaptation_every == 0)
            need_products = self.lr is None or self.momentum is None or adaptation_step
            grad = self._flat_grad() if need_products else None
        self.preconditioner.damping = Damping(self.damping + eta, self.preconditioner.damping.pi_damping)
        t0 = time.perf_counter()
        self.preconditioner.step()
        precond_s = time.perf_counter() - t0
        with torch.no_grad():
            direction = self._flat_grad().neg_()
        t0 = time.perf_counter()
        before = None if grad is None else float(all_reduce_mean(torch.tensor(
            self._h(outputs, targets, batch_loss.detach()), dtype=torch.float64)))  # same on all ranks
        alpha, mu, quad = self._step_sizes(run, targets, grad, direction, before)
        products_s = time.perf_counter() - t0
        with torch.no_grad():
            update = direction.mul_(alpha)
            if mu and self.previous_update is not None:
                update.add_(self._flat(self.previous_update), alpha=mu)
            self.previous_update = self._split(update)
            for p, u in zip(self.params, self.previous_update, strict=True):
                p.add_(u)
        rho = None
        if adaptation_step:
            assert quad is not None
            t0 = time.perf_counter()
            assert before is not None
            rho = self._adapt_damping(run, targets, before, quad)
            products_s += time.perf_counter() - t0
        self.steps += 1
        self.last_report = {
            "step": self.steps, "loss": float(batch_loss.detach()), "alpha": alpha, "mu": mu,
            "rho": rho, "damping": self.damping,
            "predicted_change": None if quad is None else quad["change"],
            "guarded": False if quad is None else quad["guarded"],
            "preconditioner_s": precond_s, "curvature_products_s": products_s,
            "wall_time_s": time.perf_counter() - start,
        }
        return outputs.detach(), batch_loss.detach()

    def _flat_grad(self) -> torch.Tensor:
        """The parameters' ``.grad`` as one flat vector (zeros where there is none)."""
        return torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if p.grad is None
                          else p.grad.reshape(-1) for p in self.params])

    @staticmethod
    def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like the parameters."""
        return [t.view_as(p) for t, p in zip(flat.split([p.numel() for p in self.params]),
                                             self.params, strict=True)]

    # --------------------------------------------------------------------------- step rule
    def _forward_function(self, inputs: Any, forward: Callable[[], torch.Tensor] | None) -> Forward:
        """``run(params=None)``: the model's output on the batch (:func:`quadratic.forward_function`)."""
        return quadratic.forward_function(self.model, self.module, inputs, forward)

    def _step_sizes(self, run: Forward, targets: torch.Tensor,
                    grad: torch.Tensor | None, direction: torch.Tensor,
                    before: float | None) -> tuple[float, float, dict[str, Any] | None]:
        """``(alpha, mu, quadratic model)`` of this step (see the module docstring); ``grad`` and
        ``direction`` are flat vectors, ``before`` the objective ``h`` at the current parameters
        (float64; needed when ``grad`` is given)."""
        if grad is None:  # lr and momentum fixed, no damping adaptation now
            return float(self.lr), float(self.momentum or 0.0), None
        prev = None if self.previous_update is None else self._flat(self.previous_update)
        rows = [direction] if prev is None else [direction, prev]
        k = len(rows)
        stacked = torch.stack(rows)
        # per-parameter (k, *shape) views of the stacked rows: no second copy
        tangents = [t.view(k, *p.shape) for t, p in zip(
            stacked.split([p.numel() for p in self.params], dim=1), self.params, strict=True)]
        curv = self._tangent_products(run, targets, tangents)
        with torch.no_grad():
            gram = torch.cat([grad[None], stacked]) @ torch.cat([grad[None], stacked]).T
        gram = gram.double()
        dots, norms = gram[0, 1:], gram[1:, 1:]  # g^T v_i and v_i^T v_j
        damped = curv + (self.damping + self.weight_decay) * norms
        alpha, mu = minimise_step(damped, dots, self.lr, 0.0 if prev is None else self.momentum,
                                  self.max_momentum)
        coef = torch.tensor([alpha, mu][:k], dtype=torch.float64)
        undamped = curv + self.weight_decay * norms
        change = float(dots @ coef + 0.5 * coef @ undamped @ coef)
        guarded = False
        if (self.lr is None or self.momentum is None) and before is not None \
                and math.isfinite(before) and -change > before:
            # The objective is nonnegative (the supported losses and the L2 term), so a model that
            # predicts a decrease larger than h itself is trusted far outside its region: scale the
            # step so that its linear term is -h (the quadratic term only makes the predicted
            # decrease smaller) and grow lambda as for a failed step.
            scale = before / -float(dots @ coef)
            alpha, mu = alpha * scale, mu * scale
            coef = coef * scale
            change = float(dots @ coef + 0.5 * coef @ undamped @ coef)
            self.damping = min(self.damping / self.omega, self.max_damping)
            self.guarded_steps += 1
            guarded = True
        return alpha, mu, {"change": change, "guarded": guarded}

    def curvature_products(self, run: Forward, targets: torch.Tensor,
                           vectors: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """``(k, k)`` float64 matrix of ``v_i^T C v_j``, ``C`` the exact GGN of the mean batch loss
        at the current parameters (on the first ``curvature_examples`` examples), for ``k``
        vectors given as lists matching the parameters; see
        :func:`thermo_kfac.quadratic.curvature_products` (averaged over ranks when distributed).
        """
        return self._tangent_products(run, targets,
                                      quadratic.stack_tangents(vectors, len(self.params)))

    def _tangent_products(self, run: Forward, targets: torch.Tensor,
                          tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`curvature_products` for tangents stacked per parameter (``(k, *shape)``)."""
        # the GGN of the supported losses does not depend on the targets
        args, kwargs = getattr(run, "args", None), getattr(run, "kwargs", None)
        if (self.chain is not None and args is not None and len(args) == 1 and not kwargs
                and isinstance(args[0], torch.Tensor)):
            x = args[0] if self.curvature_examples is None else args[0][:self.curvature_examples]
            out, jv = chain.chain_jvp(self.chain, x, dict(zip(self._names, tangents, strict=True)))
            return quadratic.symmetric_mean(loss_hessian_products(self.loss, out, jv))
        run, _ = quadratic.curvature_batch(self.module, run, targets, self.curvature_examples)
        return quadratic.tangent_products(run, self._names, self.params, self.loss, tangents)

    def _loss_inputs(self, outputs: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs, targets)`` in ``loss_dtype`` (the cast is differentiable)."""
        if self.loss_dtype is None or outputs.dtype == self.loss_dtype:
            return outputs, targets
        return _cast(outputs, targets, self.loss_dtype)

    def loss64(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The batch loss evaluated in float64 from ``outputs`` (detached).

        ``rho`` divides a difference of two losses by a small predicted change; near an
        interpolating solution the float32 loss is quantized (``log(1 + 1e-9)`` rounds to 0),
        which made ``rho`` noise and drove the damping to its upper bound."""
        return float(self.loss_fn(*_cast(outputs.detach(), targets, torch.float64)))

    def _h(self, outputs: torch.Tensor, targets: torch.Tensor,
           loss: torch.Tensor | None = None) -> float:
        """``h`` (float64) at the current parameters from the batch ``outputs`` computed at them;
        ``loss``, the batch loss already computed from them, is reused when it is float64."""
        value = float(loss) if loss is not None and loss.dtype == torch.float64 \
            else self.loss64(outputs, targets)
        if self.weight_decay:
            with torch.no_grad():
                value += 0.5 * self.weight_decay * sum(float(p.square().sum()) for p in self.params)
        return value

    def _objective(self, run: Forward, targets: torch.Tensor) -> float:
        """``h`` at the current parameters on the batch (no gradients, hooks silent)."""
        with torch.no_grad():
            return self._h(run(), targets)

    def _adapt_damping(self, run: Forward, targets: torch.Tensor,
                       before: float, quad: dict[str, Any]) -> float:
        """Levenberg-Marquardt update of ``lambda`` from this step's reduction ratio ``rho``
        (``before``: ``h`` before the step, float64)."""
        after = self._objective(run, targets)
        after = float(all_reduce_mean(torch.tensor(after, dtype=torch.float64)))
        rho = reduction_ratio(after - before, quad["change"])
        if not math.isfinite(after) and self.previous_update is not None:
            # the step broke the model (inf/NaN loss): take it back; lambda grows (rho is NaN)
            with torch.no_grad():
                for p, u in zip(self.params, self.previous_update, strict=True):
                    p.sub_(u)
                    u.zero_()
            self.rejected_steps += 1
        self.damping = lm_damping_update(self.damping, rho, self.omega, self.min_damping,
                                         self.max_damping)
        return rho

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: the preconditioner's state (factors, solvers,
        counters, RNG), ``lambda``, the previous update and the step counter. Save the model's
        own ``state_dict`` alongside."""
        return {
            "preconditioner": self.preconditioner.state_dict(),
            "damping": self.damping,
            "steps": self.steps,
            "rejected_steps": self.rejected_steps,
            "guarded_steps": self.guarded_steps,
            "previous_update": None if self.previous_update is None
            else [u.clone() for u in self.previous_update],
            "names": list(self._names),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the model must have the same parameters)."""
        if list(state["names"]) != self._names:
            raise ValueError(f"state_dict parameters {list(state['names'])} do not match the "
                             f"model's {self._names}")
        self.preconditioner.load_state_dict(state["preconditioner"])
        self.damping = float(state["damping"])
        self.steps = int(state["steps"])
        self.rejected_steps = int(state.get("rejected_steps", 0))
        self.guarded_steps = int(state.get("guarded_steps", 0))
        prev = state["previous_update"]
        self.previous_update = None if prev is None else [u.clone() for u in prev]
        self.preconditioner.damping = Damping(self.damping + self.weight_decay,
                                              self.preconditioner.damping.pi_damping)

    def __repr__(self) -> str:
        lr = "adaptive" if self.lr is None else self.lr
        mom = "adaptive" if self.momentum is None else self.momentum
        return (f"KFAC(loss={self.loss!r}, lr={lr}, momentum={mom}, damping={self.damping:g}"
                f"{' adaptive' if self.adapt_damping else ''}, preconditioner={self.preconditioner!r})")


def _cast(outputs: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``outputs`` and floating ``targets`` in ``dtype`` (class labels stay integers)."""
    return outputs.to(dtype), (targets.to(dtype) if targets.is_floating_point() else targets)
