"""The loss side of the Fisher / GGN estimate: loss scaling, Monte-Carlo label sampling and the
columns of the loss Hessian's square root; and the one home of the option choices that describe
it (:data:`LOSSES`, :data:`REDUCTIONS`, :data:`FISHER_TYPES`, :data:`KFAC_APPROXIMATIONS`).

Convention. A loss with reduction ``mean`` or ``sum`` is ``L = c * sum_t l_t`` over its terms
``t`` (examples, or examples x positions). ``l_t`` sums over the feature dimension and is a
negative log-likelihood (cross-entropy; BCE; MSE as a Gaussian with variance 1/2, so
``l = sum (f - y)^2``), hence its Fisher equals its GGN. ``c`` is ``1/#(elements averaged)``
for ``mean`` (cross-entropy: all positions but the class dim; MSE/BCE: all elements) and 1 for
``sum``. The curvature of ``L`` is

    F = c * sum_t J_t^T H_t J_t,

and K-FAC's G factor is ``sum over rows of g g^T`` where the backpropagated vectors ``g`` are
scaled so that this sum estimates ``c * sum_t (J^T H J)_t`` (see ``KFACPreconditioner``):

* empirical: ``g = dL/ds`` from the user's backward, weighted by ``1/c``;
* mc: ``g`` from backpropagating ``sqrt(c) * sum_t l_t(y_sampled)``, one pass per sample;
* type2: ``g`` from backpropagating each column of ``sqrt(c) * H^(1/2)``, one pass per column.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

#: losses whose curvature K-FAC models (a negative log-likelihood each, see above)
LOSSES = ("cross_entropy", "mse", "bce")
#: how the loss combines its terms
REDUCTIONS = ("mean", "sum")
#: how the output-gradient statistics are obtained: the data labels' gradients, sampled labels,
#: or the exact GGN through the loss Hessian's square root
FISHER_TYPES = ("empirical", "mc", "type2")
#: K-FAC flavours for layers applied at shared positions (see docs/kfac_variants.md)
KFAC_APPROXIMATIONS = ("expand", "reduce")

__all__ = ["FISHER_TYPES", "KFAC_APPROXIMATIONS", "LOSSES", "REDUCTIONS", "FisherWeights",
           "backpropagate_curvature", "kl_clip_scale",
           "hessian_sqrt_columns", "loss_scale", "mc_loss"]


def loss_scale(loss: str, reduction: str, output_shape: torch.Size) -> float:
    """The factor ``c`` in ``L = c * sum_t l_t`` for an output of ``output_shape``."""
    if reduction == "sum":
        return 1.0
    numel = math.prod(output_shape)
    if loss == "cross_entropy":
        n_classes = output_shape[1] if len(output_shape) >= 2 else output_shape[0]
        return n_classes / numel
    return 1.0 / numel


def mc_loss(loss: str, outputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``sum_t l_t(y)`` with labels ``y`` sampled from the model's predictive distribution."""
    with torch.no_grad():
        if loss == "cross_entropy":
            logits = outputs.detach()
            class_dim = 1 if logits.dim() >= 2 else 0
            probs = torch.softmax(logits.movedim(class_dim, -1).reshape(-1, logits.shape[class_dim]), -1)
            labels = torch.multinomial(probs.float(), 1, generator=generator).squeeze(1)
            if logits.dim() >= 2:
                shape = list(logits.movedim(class_dim, -1).shape[:-1])
                labels = labels.reshape(shape)
            else:
                labels = labels.reshape(())
        elif loss == "mse":
            noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype,
                                device=outputs.device)
            labels = outputs.detach() + math.sqrt(0.5) * noise
        else:  # bce with logits
            probs = torch.sigmoid(outputs.detach())
            labels = torch.bernoulli(probs, generator=generator)
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, labels, reduction="sum")
    if loss == "mse":
        return F.mse_loss(outputs, labels, reduction="sum")
    return F.binary_cross_entropy_with_logits(outputs, labels, reduction="sum")


def hessian_sqrt_columns(loss: str, outputs: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield the columns of ``H^(1/2)`` per loss term, batched over all terms at once.

    Each yielded tensor has the shape of ``outputs``; backpropagating it gives one ``g`` per row.
    Cross-entropy: ``H = diag(p) - p p^T = S S^T`` with ``S[:, k] = sqrt(p_k) (e_k - p)``.
    MSE: ``H = 2 I``. BCE with logits: ``H = diag(sigma (1 - sigma))``. The feature dimension is
    dim 1 for cross-entropy (the class dim) and the last dim for MSE/BCE.
    """
    out = outputs.detach()
    if loss == "cross_entropy":
        class_dim = 1 if out.dim() >= 2 else 0
        probs = torch.softmax(out, dim=class_dim)
        for k in range(out.shape[class_dim]):
            p_k = probs.narrow(class_dim, k, 1)
            onehot = torch.zeros_like(probs)
            onehot.narrow(class_dim, k, 1).fill_(1.0)
            yield p_k.sqrt() * (onehot - probs)
        return
    if loss == "mse":
        diag = torch.full_like(out, math.sqrt(2.0))
    else:
        sig = torch.sigmoid(out)
        diag = (sig * (1 - sig)).sqrt()
    for k in range(out.shape[-1]):
        column = torch.zeros_like(out)
        column[..., k] = diag[..., k]
        yield column


def backpropagate_curvature(loss: str, fisher_type: str, outputs: torch.Tensor,
                            params: list[torch.Tensor], scale: float, *,
                            generator: torch.Generator | None = None, mc_samples: int = 1) -> None:
    """The extra backward passes whose output gradients carry the curvature statistics.

    ``"mc"``: ``mc_samples`` passes of ``sqrt(c) * sum_t l_t(y_sampled)`` (labels drawn with
    ``generator``); ``"type2"``: one pass per column of ``sqrt(c) H^(1/2)``. ``c = scale``. The
    graph is kept and no ``.grad`` is written (``torch.autograd.grad`` on ``params``): capture
    hooks on the layers see the gradients.
    """
    if fisher_type == "mc":
        assert generator is not None
        for _ in range(mc_samples):
            sampled = math.sqrt(scale) * mc_loss(loss, outputs, generator)
            torch.autograd.grad(sampled, params, retain_graph=True, allow_unused=True)
    elif fisher_type == "type2":
        for column in hessian_sqrt_columns(loss, outputs):
            torch.autograd.grad(outputs, params, grad_outputs=math.sqrt(scale) * column,
                                retain_graph=True, allow_unused=True)
    else:
        raise ValueError(f"fisher_type={fisher_type!r} has no extra backward passes; choose one of "
                         "'mc', 'type2'")


class FisherWeights:
    """Which captured output gradients count for a Fisher type, and the weight of their rows.

    ``"empirical"``: the gradients of the user's backward, weighted by ``1/c`` for the output
    shape recorded by :meth:`record_output` (the model's root forward hook) or
    ``accumulate_curvature``. ``"mc"`` / ``"type2"``: only those of the extra passes run by
    :meth:`backpropagate`, weighted by ``1/mc_samples`` or 1 (their ``sqrt(c)`` is in the pass).
    """

    def __init__(self, loss: str, reduction: str, fisher_type: str, mc_samples: int = 1) -> None:
        self.loss, self.reduction, self.fisher_type = loss, reduction, fisher_type
        self.mc_samples = mc_samples
        self.output_shape: torch.Size | None = None
        self._in_extra_pass = False
        self._extra_weight = 1.0

    def record_output(self, module: Any, inputs: Any, output: Any) -> None:
        """Forward hook of the model: remember the output shape (used for ``c``)."""
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            self.output_shape = output.shape

    def weight(self) -> float | None:
        """The weight of the output-gradient rows being captured now (None: they do not count)."""
        if (self.fisher_type == "empirical") == self._in_extra_pass:
            return None
        return self._extra_weight if self._in_extra_pass else self.empirical_weight()

    def empirical_weight(self) -> float:
        """``1/c`` of the recorded output shape."""
        if self.output_shape is None:
            raise RuntimeError(
                "cannot scale the empirical Fisher: the model's forward did not return a tensor. "
                "Call precond.accumulate_curvature(outputs) with the tensor the loss is computed "
                "from before loss.backward()")
        return 1.0 / loss_scale(self.loss, self.reduction, self.output_shape)

    def backpropagate(self, outputs: torch.Tensor, params: list[torch.Tensor],
                      generator: torch.Generator | None) -> None:
        """Run :func:`backpropagate_curvature` for ``outputs`` with this object's weights active."""
        scale = loss_scale(self.loss, self.reduction, outputs.shape)
        self._extra_weight = 1.0 / self.mc_samples if self.fisher_type == "mc" else 1.0
        self._in_extra_pass = True
        try:
            backpropagate_curvature(self.loss, self.fisher_type, outputs, params, scale,
                                    generator=generator, mc_samples=self.mc_samples)
        finally:
            self._in_extra_pass = False


def kl_clip_scale(steps: Iterable[tuple[torch.Tensor, torch.Tensor, float]], kl_clip: float) -> float:
    """The factor ``min(1, sqrt(kl_clip / sum_l lr_l^2 <U_l, grad_l>))`` that keeps the KL change
    predicted by the Fisher for the steps ``(U_l, grad_l, lr_l)`` below ``kl_clip`` (1 when the
    prediction is not positive)."""
    # one host sync for all layers
    vg = float(torch.stack([(update * grad).sum() * lr ** 2 for update, grad, lr in steps]).sum())
    return min(1.0, math.sqrt(kl_clip / vg)) if vg > 0 else 1.0
