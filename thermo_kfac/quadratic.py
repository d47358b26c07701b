"""The quadratic model of :class:`~thermo_kfac.KFAC`'s step rule (Martens & Grosse 2015, secs. 6-7).

- :func:`forward_function`: the model's output on a batch as a function of (optionally swapped-in)
  parameters, for a tensor, tuple or dict input or a zero-argument forward closure;
- :func:`curvature_products`: ``v_i^T C v_j`` for the exact generalized Gauss-Newton matrix ``C``
  of the mean batch loss (``J v`` by ``torch.func.jvp``, all tangents in one vmapped forward,
  then :func:`loss_hessian_products`), averaged over ranks in distributed mode;
- :func:`minimise_step`: the 2x2 minimiser ``(alpha, mu)`` with fixed or constrained components;
- :func:`reduction_ratio` and :func:`lm_damping_update`: the Levenberg-Marquardt damping rule.

The optimizer itself (:mod:`thermo_kfac.optimizer`) owns the state and calls these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vmap

from thermo_kfac.fisher import LOSSES
from thermo_kfac.process_group import is_distributed, world_size

#: The mean-reduced training loss of each supported loss name (outputs, targets) -> scalar.
LOSS_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce": F.binary_cross_entropy_with_logits,
}
assert set(LOSS_FUNCTIONS) == set(LOSSES)  # one list of losses: thermo_kfac.fisher.LOSSES

#: ``run(params=None) -> outputs``: the model's output on the batch, with ``params`` (a dict of
#: parameter name -> tensor) swapped in by ``functional_call`` when given.
Forward = Callable[..., torch.Tensor]


class _ForwardModule(nn.Module):
    """Wraps ``model`` and a zero-argument forward closure, so that ``functional_call`` can swap the
    model's parameters under a closure that calls the model however it likes."""

    def __init__(self, model: nn.Module, forward: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.closure = forward

    def forward(self) -> torch.Tensor:
        return self.closure()


def forward_function(model: nn.Module, module: nn.Module, inputs: Any,
                     forward: Callable[[], torch.Tensor] | None) -> Forward:
    """A callable ``run(params=None)``: the model's output on the batch, with the given parameters
    swapped in (``functional_call`` on ``module``, the unwrapped model) when ``params`` is a dict.

    ``inputs``: a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or a dict
    (``model(**inputs)``); or ``forward``, a zero-argument closure. For plain inputs the returned
    callable carries ``args`` and ``kwargs`` (so :func:`curvature_batch` can slice them).
    """
    if forward is not None:
        if inputs is not None:
            raise ValueError("give either inputs or forward=, not both")
        if not callable(forward):
            raise ValueError(f"forward must be a zero-argument callable, got {type(forward).__name__}")
        wrapper = _ForwardModule(module, forward)

        def run(params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
            if params is None:
                return forward()
            return functional_call(wrapper, {f"model.{k}": v for k, v in params.items()}, ())
        return run
    if inputs is None:
        raise ValueError("inputs (or forward=) is required")
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else \
        ((tuple(inputs), {}) if isinstance(inputs, tuple | list) else ((inputs,), {}))

    def run_model(params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if params is None:
            return model(*args, **kwargs)
        return functional_call(module, params, args, kwargs)
    run_model.args, run_model.kwargs = args, kwargs  # type: ignore[attr-defined]
    return run_model


def curvature_batch(module: nn.Module, run: Forward, targets: torch.Tensor, examples: int | None
                    ) -> tuple[Forward, torch.Tensor]:
    """The first ``examples`` examples of the batch (plain inputs only; a forward closure, or
    ``examples=None``, keeps the whole batch)."""
    args = getattr(run, "args", None)
    if examples is None or args is None or not args or targets.shape[0] <= examples:
        return run, targets
    kwargs = run.kwargs  # type: ignore[attr-defined]
    sub = tuple(a[:examples] if isinstance(a, torch.Tensor) else a for a in args)

    def run_sub(params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return functional_call(module, params, sub, kwargs)
    return run_sub, targets[:examples]


def curvature_products(run: Forward, names: Sequence[str], params: Sequence[torch.Tensor],
                       loss: str, vectors: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``(k, k)`` float64 matrix of ``v_i^T C v_j``, ``C`` the exact GGN of the mean batch ``loss``
    at ``params`` (named ``names``), for ``k`` vectors given as lists matching the parameters.

    ``J v`` comes from ``torch.func.jvp`` (all tangents in one vmapped forward), then
    :func:`loss_hessian_products`; in distributed mode the result is averaged over ranks.
    """
    return tangent_products(run, names, params, loss, stack_tangents(vectors, len(params)))


def stack_tangents(vectors: Sequence[Sequence[torch.Tensor]], n_params: int) -> list[torch.Tensor]:
    """Per parameter, its ``k`` tangents stacked: ``(k, *param.shape)``."""
    return [torch.stack([v[i] for v in vectors]) for i in range(n_params)]


def tangent_products(run: Forward, names: Sequence[str], params: Sequence[torch.Tensor],
                     loss: str, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`curvature_products` for tangents already stacked per parameter
    (``(k, *param.shape)`` each, as :func:`stack_tangents` makes them)."""
    def outputs(*ps: torch.Tensor) -> torch.Tensor:
        return run(dict(zip(names, ps, strict=True)))

    primals = tuple(p.detach() for p in params)
    with torch.no_grad():  # the preconditioner's hooks stay silent; forward AD is unaffected
        def push(*ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return jvp(outputs, primals, ts)

        out, jv = vmap(push, out_dims=(None, 0))(*tangents)
        return symmetric_mean(loss_hessian_products(loss, out.detach(), jv.detach()))


def symmetric_mean(products: torch.Tensor) -> torch.Tensor:
    """``(P + P^T) / 2``, averaged over ranks in distributed mode."""
    return all_reduce_mean((products + products.T) / 2)


def loss_hessian_products(loss: str, outputs: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """``(k, k)`` float64 matrix ``u_i^T H u_j``, ``H`` the Hessian of the mean-reduced ``loss`` with
    respect to ``outputs`` and ``u_i = tangents[i]`` (shape of ``outputs``).

    mse: ``H = 2 I / n``; bce with logits: ``diag(sigma (1 - sigma)) / n`` (``n`` elements);
    cross-entropy (class dim 1 of ``outputs``): ``(diag(p) - p p^T) / P`` per position, ``P``
    positions (examples times any trailing dims).
    """
    k = tangents.shape[0]
    u = tangents.double()
    out = outputs.double()
    if loss == "mse":
        flat = u.reshape(k, -1)
        return flat @ flat.T * (2.0 / out.numel())
    if loss == "bce":
        sig = torch.sigmoid(out)
        flat = u.reshape(k, -1)
        return (flat * (sig * (1 - sig)).reshape(1, -1)) @ flat.T / out.numel()
    class_dim = 1 if out.dim() >= 2 else 0
    p = torch.softmax(out, dim=class_dim).unsqueeze(0)
    hu = p * u - p * (p * u).sum(dim=class_dim + 1, keepdim=True)
    positions = out.numel() // out.shape[class_dim]
    return u.reshape(k, -1) @ hu.reshape(k, -1).T / positions


def reduction_ratio(actual_change: float, predicted_change: float) -> float:
    """``rho = actual / predicted`` change of the objective; ``-inf`` when the model predicts no
    decrease (so the damping grows) and the actual change is not a decrease either; NaN when
    either change is not finite (the damping grows too)."""
    if not (math.isfinite(actual_change) and math.isfinite(predicted_change)):
        return float("nan")
    if predicted_change < 0:
        return actual_change / predicted_change
    return float("-inf") if actual_change >= 0 else float("inf")


def lm_damping_update(damping: float, rho: float, omega: float, low: float, high: float) -> float:
    """Levenberg-Marquardt rule (Martens & Grosse 2015, sec. 6.5): ``damping * omega`` if
    ``rho > 3/4``, ``damping / omega`` if ``rho < 1/4`` (or ``rho`` is NaN), clamped to
    ``[low, high]``."""
    if rho > 0.75:
        damping *= omega
    elif not rho >= 0.25:
        damping /= omega
    return min(max(damping, low), high)


def minimise_step(matrix: torch.Tensor, linear: torch.Tensor, lr: float | None,
                  momentum: float | None, max_momentum: float | None = 1.0) -> tuple[float, float]:
    """Minimiser ``(alpha, mu)`` of ``b^T c + 1/2 c^T M c`` over ``c = (alpha, mu)`` (``M``
    positive definite), with the given components held fixed and an adapted ``mu`` constrained
    to ``[0, max_momentum]`` (unless None; a convex quadratic: outside, the minimum is at the nearer bound,
    with ``alpha`` re-optimised). One vector (no previous update): ``mu = 0``."""
    m = matrix.tolist()
    b = linear.tolist()

    def best_alpha(mu: float) -> float:
        if lr is not None:
            return float(lr)
        value = -(b[0] + (mu * m[0][1] if len(b) > 1 else 0.0)) / m[0][0] if m[0][0] > 0 else 0.0
        return value if math.isfinite(value) else 0.0

    if len(b) == 1:
        return best_alpha(0.0), 0.0
    if momentum is not None:
        return best_alpha(momentum), float(momentum)
    if lr is not None:
        mu = -(b[1] + lr * m[1][0]) / m[1][1] if m[1][1] > 0 else 0.0
    else:
        det = m[0][0] * m[1][1] - m[0][1] * m[1][0]
        # (nearly) parallel directions make the 2x2 system singular: the gradient direction alone
        mu = (-b[1] * m[0][0] + b[0] * m[1][0]) / det \
            if det > 1e-10 * abs(m[0][0] * m[1][1]) and m[0][0] > 0 else 0.0
    if not math.isfinite(mu):
        mu = 0.0
    elif max_momentum is not None:
        mu = min(max(mu, 0.0), max_momentum)
    return best_alpha(mu), float(mu)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average ``value`` over ranks when a process group of more than one rank exists."""
    if not is_distributed():
        return value
    import torch.distributed as tdist

    out = value.clone()
    tdist.all_reduce(out)
    return out / world_size()
