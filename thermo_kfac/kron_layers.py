"""Kronecker-product layers: ``KronLinear`` (weight ``A (x) B``) and its KronA-style adapter mode.

A ``KronLinear`` maps ``x`` (``n1 n2`` features) to ``y = (A (x) B) x + b`` (``m1 m2`` features)
with ``A`` of shape ``(m1, n1)`` and ``B`` of shape ``(m2, n2)``, never forming the
``(m1 m2) x (n1 n2)`` weight: with ``X`` the row-major ``(n1, n2)`` reshape of ``x``,
``(A (x) B) vec(X) = vec(A X B^T)``. It is computed in two weight-shared linear maps, each through
:func:`thermo_kfac.capture.linear_map` so that K-FAC sees both factors:

* ``P = A X``: ``A`` applied to the ``n2`` columns of ``X`` (``R = n2`` positions),
* ``Y = P B^T``: ``B`` applied to the ``m1`` rows of ``P`` (``R = m1`` positions).

The gradients of the factors are ``grad A = sum_j dP[:, j] X[:, j]^T`` and ``grad B = sum_r
dY[r, :] P[r, :]^T`` (summed over examples), so each factor's Fisher block gets K-FAC's Kronecker
factors of a weight-shared layer (expand: ``A_A = sum X_j X_j^T / (N n2)``, ``G_A ~ sum dP_j
dP_j^T``; ``A_B = sum P_r P_r^T / (N m1)``, ``G_B ~ sum dY_r dY_r^T``). The module announces them
with :meth:`KronLinear.kfac_linear_maps`, which :class:`~thermo_kfac.KFACPreconditioner` reads
(layers ``name.A`` and ``name.B``); the bias is left to the base optimizer.

With ``base=`` an existing ``nn.Linear`` is frozen and the layer computes ``base(x) + scale (A (x) B)
x`` (KronA, Edalati et al.: parameter-efficient fine-tuning with a Kronecker adapter); ``B`` starts
at zero so the adapted model starts as the base model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hw_models.validation import check_positive
from thermo_kfac.capture import linear_map


def _pair(label: str, value: Sequence[int]) -> tuple[int, int]:
    items = tuple(value)
    if len(items) != 2:
        raise ValueError(f"{label}={value!r} must be a pair (rows, columns) of positive integers")
    return (check_positive(f"{label}[0]", items[0], integer=True),
            check_positive(f"{label}[1]", items[1], integer=True))


class KronLinear(nn.Module):
    """``y = (A (x) B) x + b`` with ``A`` ``(m1, n1)``, ``B`` ``(m2, n2)`` (module docs).

    Args:
        a_shape: ``(m1, n1)``.
        b_shape: ``(m2, n2)``; the layer maps ``n1 n2`` features to ``m1 m2``.
        bias: learn a bias of ``m1 m2`` (not with ``base``, whose bias is the adapter's).
        base: an ``nn.Linear(n1 n2, m1 m2)`` to adapt: frozen, output ``base(x) + scale (A (x) B) x``.
        scale: the adapter's scale (KronA's ``s``).
    """

    def __init__(self, a_shape: Sequence[int], b_shape: Sequence[int], bias: bool = True,
                 base: nn.Linear | None = None, scale: float = 1.0) -> None:
        super().__init__()
        (m1, n1), (m2, n2) = _pair("a_shape", a_shape), _pair("b_shape", b_shape)
        self.a_shape, self.b_shape = (m1, n1), (m2, n2)
        self.in_features, self.out_features = n1 * n2, m1 * m2
        self.scale = float(scale)
        if base is not None:
            if not isinstance(base, nn.Linear):
                raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
            if (base.in_features, base.out_features) != (self.in_features, self.out_features):
                raise ValueError(f"base nn.Linear({base.in_features}, {base.out_features}) does not match "
                                 f"A (x) B: {self.in_features} -> {self.out_features} features")
            base.requires_grad_(False)
            bias = False
        self.base = base
        # without a base: entries of A (x) B with variance 1 / (n1 n2), as a fan-in initialisation
        self.A = nn.Parameter(torch.randn(m1, n1) / math.sqrt(n1))
        b_init = torch.zeros(m2, n2) if base is not None else torch.randn(m2, n2) / math.sqrt(n2)
        self.B = nn.Parameter(b_init)
        self.bias = nn.Parameter(torch.zeros(m1 * m2)) if bias else None

    def kronecker_product(self, x: torch.Tensor) -> torch.Tensor:
        """``(A (x) B) x`` for ``x`` of shape ``(..., n1 n2)``, without forming the weight."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KronLinear expects {self.in_features} input features, got shape "
                             f"{tuple(x.shape)}")
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        lead = x.shape[:-1]
        X = x.reshape(-1, n1, n2)
        P_t = linear_map(X.transpose(1, 2), self.A)        # (N, n2, m1): A on the columns of X
        Y = linear_map(P_t.transpose(1, 2), self.B)        # (N, m1, m2): B on the rows of P = A X
        return Y.reshape(*lead, m1 * m2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kronecker_product(x)
        if self.base is not None:
            return self.base(x) + self.scale * y
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """``A (x) B`` (times ``scale`` in adapter mode), the dense weight this layer represents."""
        w = torch.kron(self.A, self.B)
        return self.scale * w if self.base is not None else w

    def kfac_linear_maps(self) -> dict[str, tuple[torch.Tensor, None]]:
        """The parameters used as linear maps (through ``linear_map``) for K-FAC: ``{"A": (A, None),
        "B": (B, None)}``."""
        return {"A": (self.A, None), "B": (self.B, None)}

    def extra_repr(self) -> str:
        return (f"a_shape={self.a_shape}, b_shape={self.b_shape}, bias={self.bias is not None}, "
                f"adapter={self.base is not None}")
