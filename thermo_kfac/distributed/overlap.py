"""Factor statistics all-reduced during the backward pass, one layer at a time (SPD-KFAC's pipelining
of factor computation with its communication; Shi, Zhang & Li).

Without it, every rank folds its own statistics into its EMA factors in ``step()`` and the factors
are averaged afterwards. With ``DistributedConfig(overlap_backward=True)`` the step's statistics
``a_sum`` and ``g_sum`` of a layer are averaged instead, by an asynchronous all-reduce launched
the moment the backward pass has delivered the output gradients of every call of that layer (a
:attr:`~thermo_kfac.layers.LayerState.on_statistics` callback), so the communication of the
layers the backward has finished runs while it works on the earlier layers. ``wait()`` (at the
start of ``step()``, before the factor update) finishes them; the EMA of the averaged statistics
is the average of the EMAs (the EMA is linear), so the factors are those of the serial run on the
global batch, up to rounding, and no factor all-reduce follows. Each layer's launch is its own
fusion bucket: the backward's order and the layers' sizes decide the buckets, not a fixed
grouping. Layers whose statistics were not complete when the backward ended are reduced, fused,
in ``wait()``.

Requirements: ``fisher_type="empirical"`` (the Monte-Carlo and type-2 Fishers deliver their
output gradients in extra backward passes, which the per-call count does not follow) and equal
shards on every rank (the average of ``a_sum`` is divided by the local row count).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from thermo_kfac.distributed.communication import Communicator, PendingReduction

if TYPE_CHECKING:
    from thermo_kfac.layers import LayerState, LayerTable


class BackwardFactorReduction:
    """Per-layer asynchronous all-reduce of one step's factor statistics (module docs)."""

    def __init__(self, comm: Communicator, table: LayerTable) -> None:
        self.comm = comm
        self.states = list({id(state): state for _, state in table.items()}.values())  # tied: once
        self._pending: list[tuple[LayerState, PendingReduction]] = []
        # id(state) -> the (a_sum, g_sum) tensors whose reduction was launched: another backward
        # before step() (gradient accumulation) replaces them, and they are launched again
        self._launched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.launched = 0          # layers reduced from the backward pass, over all steps
        self.finished_early = 0    # ... whose all-reduce had completed when step() began
        self.reduced_in_step = 0   # layers reduced in wait() (statistics incomplete at backward end)
        self.wait_s = 0.0          # time blocked in wait()
        for state in self.states:
            state.on_statistics.append(self._launch)

    def _current(self, state: LayerState) -> bool:
        """Whether the launched reduction of ``state`` covers its statistics as they are now."""
        launched = self._launched.get(id(state))
        return launched is not None and launched[0] is state.a_sum and launched[1] is state.g_sum

    def _launch(self, state: LayerState) -> None:
        if state.a_sum is None or state.g_sum is None or self._current(state):
            return
        self._launched[id(state)] = (state.a_sum, state.g_sum)
        pending = self.comm.allreduce_mean([state.a_sum, state.g_sum], "factor_statistics",
                                           symmetric=True, async_op=True)
        self._pending.append((state, pending))
        self.launched += 1

    def wait(self) -> None:
        """Finish the launched reductions and reduce, fused, the statistics not yet launched."""
        start = time.perf_counter()
        for _, pending in self._pending:
            self.finished_early += int(all(work.is_completed() for work in pending.works))
            pending.wait()
        late = [state for state in self.states if not self._current(state)
                and state.a_sum is not None and state.g_sum is not None]
        if late:
            self.comm.allreduce_mean([m for s in late for m in (s.a_sum, s.g_sum)], "factor_statistics",
                                     symmetric=True)
            self.reduced_in_step += len(late)
        self._pending, self._launched = [], {}
        self.wait_s += time.perf_counter() - start

    def report(self) -> dict[str, Any]:
        """Counters: ``overlap_fraction`` is the share of backward-launched reductions already
        complete when the step began (communication fully hidden behind the backward pass)."""
        return {"launched_in_backward": self.launched, "finished_before_step": self.finished_early,
                "reduced_in_step": self.reduced_in_step, "wait_s": self.wait_s,
                "overlap_fraction": self.finished_early / self.launched if self.launched else 0.0}
