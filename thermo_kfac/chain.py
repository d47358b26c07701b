"""Jacobian-vector products of chain models without ``torch.func``: the fast path of
:class:`~thermo_kfac.KFAC`'s curvature products.

Profiling the adaptive step on the digits MLP (64-128-128-10) showed 55 % of its time in the
vmapped ``torch.func.jvp`` through ``functional_call``: 2.2 ms for a forward that costs 0.2 ms,
nearly all of it dispatch overhead. Most networks people train with K-FAC are chains of linear
layers and elementwise activations, and for those ``J v`` is a short recursion (Pearlmutter's
R-operator): for ``z = h W^T + b`` the tangent is ``dz = dh W^T + h dW^T + db``, and an elementwise
``h' = f(z)`` gives ``dh' = f'(z) dz``. All ``k`` tangents go through together, as one batched
product per layer.

:func:`linear_chain` finds the chain once (``torch.fx`` symbolic trace: one input, every node a
supported leaf module applied to the previous node's output, one output); :func:`chain_jvp` runs
the recursion. Models that are not such chains (residual blocks, attention, convolutions, batch
norm, dropout, closures) keep the ``torch.func`` path of :mod:`thermo_kfac.quadratic`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

#: Leaf modules a chain may contain (activations are elementwise with a closed-form derivative).
SUPPORTED = (nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Flatten)


class Link(NamedTuple):
    """One module of a chain: its qualified name (as in ``named_parameters``) and the module."""

    name: str
    module: nn.Module


def linear_chain(model: nn.Module) -> list[Link] | None:
    """``model`` as a sequence of :data:`SUPPORTED` leaf modules applied one after the other to a
    single input, or None when it is not such a chain (or cannot be traced)."""
    from torch import fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means: not a chain, use torch.func
        return None
    links: list[Link] = []
    previous = None
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return None  # more than one input
            previous = node
        elif node.op == "call_module":
            module = modules.get(str(node.target))
            if (previous is None or node.args != (previous,) or node.kwargs
                    or not isinstance(module, SUPPORTED)):
                return None
            links.append(Link(str(node.target), module))
            previous = node
        elif node.op == "output":
            if node.args != (previous,):
                return None
        else:
            return None  # functions, methods, attributes: not a plain chain
    return links if links else None


def chain_parameters(links: Sequence[Link]) -> dict[str, torch.Tensor]:
    """``{qualified name: parameter}`` of the chain's linear layers."""
    out = {}
    for link in links:
        if isinstance(link.module, nn.Linear):
            out[f"{link.name}.weight"] = link.module.weight
            if link.module.bias is not None:
                out[f"{link.name}.bias"] = link.module.bias
    return out


@torch.no_grad()
def chain_jvp(links: Sequence[Link], x: torch.Tensor, tangents: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs, J V)`` of the chain on the batch ``x`` for ``k`` parameter tangents.

    ``tangents`` maps a parameter's qualified name to its ``k`` stacked tangents (shape
    ``(k, *param.shape)``); parameters without an entry have zero tangent. Returns the outputs
    ``(n, ...)`` and the output tangents ``(k, n, ...)``.
    """
    k = next(iter(tangents.values())).shape[0] if tangents else 0
    h = x
    dh: torch.Tensor | None = None  # tangent of h, (k, *h.shape); None while it is zero
    for link in links:
        m = link.module
        if isinstance(m, nn.Linear):
            dw = tangents.get(f"{link.name}.weight")
            db = tangents.get(f"{link.name}.bias")
            z = nn.functional.linear(h, m.weight, m.bias)
            dz = None if dh is None else dh @ m.weight.T
            if dw is not None:  # h dW^T for every tangent: (n, d) @ (k, d, o) -> (k, n, o)
                term = h @ dw.transpose(-1, -2)
                dz = term if dz is None else dz + term
            if db is not None:  # (k, 1, ..., o): broadcast over the batch
                term = db.reshape(k, *([1] * (z.dim() - 1)), -1)
                dz = term if dz is None else dz + term
            h, dh = z, dz
        elif isinstance(m, nn.Flatten):
            end = m.end_dim if m.end_dim < 0 else m.end_dim + 1  # tangents carry a leading k
            h = h.flatten(m.start_dim, m.end_dim)
            dh = None if dh is None else dh.flatten(m.start_dim + 1, end)
        elif isinstance(m, nn.ReLU):
            if dh is not None:
                dh = dh * (h > 0)
            h = torch.relu(h)
        elif isinstance(m, nn.Tanh):
            h = torch.tanh(h)
            if dh is not None:
                dh = dh * (1 - h * h)
        elif isinstance(m, nn.Sigmoid):
            h = torch.sigmoid(h)
            if dh is not None:
                dh = dh * (h * (1 - h))
        # nn.Identity: nothing to do
    if dh is None or dh.shape[1:] != h.shape:
        dh = torch.zeros(k, *h.shape, dtype=h.dtype, device=h.device) if dh is None \
            else dh.expand(k, *h.shape)
    return h, dh
