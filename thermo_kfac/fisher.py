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
from collections.abc import Iterator

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

__all__ = ["FISHER_TYPES", "KFAC_APPROXIMATIONS", "LOSSES", "REDUCTIONS", "hessian_sqrt_columns",
           "loss_scale", "mc_loss"]


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
