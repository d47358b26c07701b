"""A recurrent layer K-FAC can precondition, with an optional Kronecker-product (KP-compressed)
recurrent weight.

``RecurrentLayer`` is an Elman RNN, ``h_t = phi(W_ih x_t + b + W_hh h_{t-1})``, written as an
explicit loop over time so that every use of a shared weight is visible (``nn.RNN``/``nn.LSTM``/
``nn.GRU`` run fused kernels whose per-step products no hook can see, so K-FAC skips them):

* ``W_ih`` (with the bias) is applied to the whole sequence in one
  :func:`~thermo_kfac.capture.linear_map` call: ``R = T`` positions;
* ``W_hh`` is applied once per time step by ``linear_map(h_{t-1}, W_hh)`` (from ``t = 2`` when the
  initial state is zero, whose products contribute nothing): ``R = T - 1`` positions.

This is K-FAC for weight sharing over time (Eschenhagen et al. 2023; Martens, Ba & Johnson 2018's
independence-over-time option): with ``kfac_approx="expand"`` every time step is a row of the
factors, ``A = sum_{n,t} a a^T / (N T)``, ``G ~ sum_{n,t} g g^T``; with ``"reduce"`` each call is
reduced on its own (for ``W_ih`` the mean over time). It is exact when nothing couples the time
steps: one step of a linear RNN with an MSE loss on its output (tested against the GGN from
``torch.func``); over several steps ``W_hh`` makes later outputs depend on earlier positions and
the Kronecker block is an approximation.

``kron=((m1, n1), (m2, n2))`` replaces ``W_hh`` by ``A (x) B`` (a :class:`~thermo_kfac.kron_layers.
KronLinear` without bias, Thakker et al.'s Kronecker-product-compressed RNN), whose factors are
registered as ``name.hh.A`` and ``name.hh.B``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hw_models.validation import check_choice, check_positive
from thermo_kfac.capture import linear_map
from thermo_kfac.kron_layers import KronLinear

NONLINEARITIES = {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda h: h}


class RecurrentLayer(nn.Module):
    """Elman RNN over ``(N, T, input_size)`` returning all hidden states ``(N, T, hidden_size)``.

    Args:
        input_size, hidden_size: feature sizes.
        nonlinearity: ``"tanh"``, ``"relu"`` or ``"linear"``.
        kron: ``((m1, n1), (m2, n2))`` with ``m1 m2 = n1 n2 = hidden_size``: the recurrent weight
            is ``A (x) B`` (module docs); None: a dense ``W_hh``.
    """

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh",
                 kron: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        self.input_size = check_positive("input_size", input_size, integer=True)
        self.hidden_size = check_positive("hidden_size", hidden_size, integer=True)
        self.nonlinearity = check_choice("nonlinearity", nonlinearity, tuple(NONLINEARITIES))
        bound = 1 / math.sqrt(hidden_size)  # nn.RNN's initialisation
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound))
        if kron is None:
            self.weight_hh: nn.Parameter | None = nn.Parameter(
                torch.empty(hidden_size, hidden_size).uniform_(-bound, bound))
            self.hh: KronLinear | None = None
        else:
            a_shape, b_shape = kron
            self.hh = KronLinear(a_shape, b_shape, bias=False)
            if (self.hh.in_features, self.hh.out_features) != (hidden_size, hidden_size):
                raise ValueError(f"kron={kron!r}: A (x) B maps {self.hh.in_features} -> "
                                 f"{self.hh.out_features} features, the recurrence needs "
                                 f"{hidden_size} -> {hidden_size}")
            self.weight_hh = None

    def recurrent(self, h: torch.Tensor) -> torch.Tensor:
        """``W_hh h`` (or ``(A (x) B) h``) for ``h`` of shape ``(N, hidden_size)``."""
        if self.hh is not None:
            return self.hh(h)
        return linear_map(h.unsqueeze(1), self.weight_hh).squeeze(1)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"RecurrentLayer expects (N, T, {self.input_size}) inputs, got shape "
                             f"{tuple(x.shape)}")
        phi = NONLINEARITIES[self.nonlinearity]
        drive = linear_map(x, self.weight_ih, self.bias)   # all T positions in one call
        h = h0
        states = []
        for t in range(x.shape[1]):
            pre = drive[:, t] if h is None else drive[:, t] + self.recurrent(h)
            h = phi(pre)
            states.append(h)
        return torch.stack(states, dim=1)

    def kfac_linear_maps(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """``ih`` (``W_ih`` and the bias) and, when dense, ``hh`` (``W_hh``); a Kronecker ``W_hh``
        is the child ``hh``, which lists its own factors."""
        maps: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {"ih": (self.weight_ih, self.bias)}
        if self.weight_hh is not None:
            maps["hh"] = (self.weight_hh, None)
        return maps


class RowRNN(nn.Module):
    """Images read row by row: ``(N, C, H, W)`` -> ``H`` steps of ``C W`` features ->
    :class:`RecurrentLayer` -> Linear head on the last hidden state."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, hidden: int = 64,
                 nonlinearity: str = "tanh", kron: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) != 3:
            raise ValueError(f"RowRNN needs image inputs (C, H, W), got input shape {shape}")
        c, _, w = shape
        self.rnn = RecurrentLayer(c * w, hidden, nonlinearity, kron)
        self.head = nn.Linear(hidden, check_positive("num_outputs", num_outputs, integer=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)
        return self.head(self.rnn(rows)[:, -1])
