"""Factor statistics all-reduced during the backward pass (SPD-KFAC's pipelining of factor computation
with its communication, with its dynamic tensor fusion; Shi, Zhang & Li).

Without it, every rank folds its own statistics into its EMA factors in ``step()`` and the factors
are averaged afterwards. With ``DistributedConfig(overlap_backward=True)`` the step's statistics
``a_sum`` and ``g_sum`` of a layer are averaged instead, by asynchronous all-reduces launched from
the backward pass as the layers' statistics become complete (the
:attr:`~thermo_kfac.layers.LayerState.on_statistics` callback fires once the output gradients of
every call of the layer have arrived), so the communication of the layers the backward has
finished runs while it works on the earlier layers. ``wait()`` (at the start of ``step()``,
before the factor update) finishes them; the EMA of the averaged statistics is the average of
the EMAs (the EMA is linear), so the factors are those of the serial run on the global batch, up
to rounding, and no factor all-reduce follows. Layers whose statistics were not complete when the
backward ended are reduced, fused, in ``wait()``.

Fusion buckets (``fusion``):

* ``"dynamic"`` (default): the first :data:`PROFILE_STEPS` factor steps launch one all-reduce per
  layer and record when each layer became ready (seconds after the first one, per step). Then
  every rank gathers everyone's timings (median over the profiled steps, mean over ranks, so all
  ranks plan alike), takes the all-reduce cost ``alpha + beta m`` (``network="measured"``: fitted
  to blocking all-reduces of 256 B and 1 MiB timed on the group, the slowest rank's; or a
  :data:`hw_models.cost.NETWORKS` preset) and cuts the layers, in ready order, into the buckets
  whose pipelined all-reduces finish earliest (:func:`hw_models.cost.fusion_plan`). From then on
  a bucket is one collective, launched when its last member's statistics are complete. On a GPU
  the ready times are those at which the host issued the layers' statistics (the kernels run
  asynchronously), an approximation of when they complete.
* ``"layer"``: one all-reduce per layer, always.

Requirements: ``fisher_type="empirical"`` (the Monte-Carlo and type-2 Fishers deliver their
output gradients in extra backward passes, which the per-call count does not follow) and equal
shards on every rank (the average of ``a_sum`` is divided by the local row count).
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

from hw_models.cost import fusion_plan, network, pipeline
from thermo_kfac.distributed.communication import Communicator, PendingReduction
from thermo_kfac.distributed.config import FUSIONS

if TYPE_CHECKING:
    from thermo_kfac.layers import LayerState, LayerTable

PROFILE_STEPS = 2  # factor steps timed before the buckets are planned (the first carries warm-up)
CALIBRATION_BYTES = (256, 2**20)


class BackwardFactorReduction:
    """Asynchronous all-reduce of one step's factor statistics from the backward pass (module docs)."""

    def __init__(self, comm: Communicator, table: LayerTable, *, fusion: str = "dynamic",
                 network_model: str = "measured") -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"fusion={fusion!r} must be one of {', '.join(FUSIONS)}")
        self.comm, self.fusion, self.network_model = comm, fusion, network_model
        unique: dict[int, tuple[str, LayerState]] = {}
        for name, state in table.items():
            unique.setdefault(id(state), (name, state))  # tied layers: once, under the first name
        self.names = [name for name, _ in unique.values()]
        self.states = [state for _, state in unique.values()]
        self._index = {id(state): i for i, state in enumerate(self.states)}
        self._pending: list[tuple[list[int], PendingReduction]] = []
        # index -> the (a_sum, g_sum) tensors whose reduction was launched: another backward before
        # step() (gradient accumulation) replaces them, and they are launched again
        self._launched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ready: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}  # this step: time, tensors
        self._profiles: list[tuple[dict[int, float], float]] = []  # (ready offsets, backward end offset)
        self.plan: list[list[int]] | None = None
        self._bucket_of: dict[int, int] = {}
        self.alpha_s = self.beta_s_per_byte = self.predicted_exposed_s = None
        self.launched = 0           # layers reduced from the backward pass, over all steps
        self.finished_early = 0     # ... whose all-reduce had completed when step() began
        self.bytes_launched = 0     # their payload bytes
        self.bytes_finished_early = 0
        self.collectives = 0        # all-reduces launched from the backward pass
        self.reduced_in_step = 0    # layers reduced in wait() (statistics incomplete at backward end)
        self.wait_s = 0.0           # time blocked in wait()
        for state in self.states:
            state.on_statistics.append(self._on_statistics)

    @staticmethod
    def _nbytes(state: LayerState) -> int:
        return sum(t.shape[0] * (t.shape[0] + 1) // 2 * t.element_size() for t in (state.a_sum, state.g_sum))

    def _current(self, i: int, state: LayerState) -> bool:
        """Whether the launched reduction of layer ``i`` covers its statistics as they are now."""
        launched = self._launched.get(i)
        return launched is not None and launched[0] is state.a_sum and launched[1] is state.g_sum

    def _is_ready(self, i: int) -> bool:
        ready, state = self._ready.get(i), self.states[i]
        return ready is not None and ready[1] is state.a_sum and ready[2] is state.g_sum

    def _on_statistics(self, state: LayerState) -> None:
        i = self._index[id(state)]
        if state.a_sum is None or state.g_sum is None or self._current(i, state):
            return
        self._ready[i] = (time.perf_counter(), state.a_sum, state.g_sum)
        bucket = self._bucket_of.get(i) if self.plan is not None else None
        if bucket is None:  # profiling, per-layer fusion, or a layer the profile never saw
            self._reduce([i])
        elif all(self._is_ready(j) for j in self.plan[bucket]):
            self._reduce(self.plan[bucket])

    def _reduce(self, indices: list[int]) -> None:
        tensors = []
        for i in indices:
            state = self.states[i]
            self._launched[i] = (state.a_sum, state.g_sum)
            tensors += [state.a_sum, state.g_sum]
        pending = self.comm.allreduce_mean(tensors, "factor_statistics", symmetric=True, async_op=True,
                                           fuse_all=True)
        self._pending.append((indices, pending))
        self.launched += len(indices)
        self.bytes_launched += sum(self._nbytes(self.states[i]) for i in indices)
        self.collectives += 1

    def wait(self) -> None:
        """Finish the launched reductions and reduce, fused, the statistics not yet launched."""
        start = time.perf_counter()
        for indices, pending in self._pending:
            if all(work.is_completed() for work in pending.works):
                self.finished_early += len(indices)
                self.bytes_finished_early += sum(self._nbytes(self.states[i]) for i in indices)
            pending.wait()
        late = [state for i, state in enumerate(self.states) if not self._current(i, state)
                and state.a_sum is not None and state.g_sum is not None]
        if late:
            self.comm.allreduce_mean([m for s in late for m in (s.a_sum, s.g_sum)], "factor_statistics",
                                     symmetric=True)
            self.reduced_in_step += len(late)
        if self.fusion == "dynamic" and self.plan is None and self._ready:
            first = min(t for t, _, _ in self._ready.values())
            self._profiles.append(({i: t - first for i, (t, _, _) in self._ready.items()}, start - first))
            if len(self._profiles) >= PROFILE_STEPS:
                self._make_plan()
        self._pending, self._launched, self._ready = [], {}, {}
        self.wait_s += time.perf_counter() - start

    def _calibrate(self) -> tuple[float, float]:
        """``(alpha, beta)`` of one all-reduce, fitted to timed blocking all-reduces (slowest rank)."""
        times = []
        for nbytes in CALIBRATION_BYTES:
            buffer = torch.zeros(nbytes // 4, dtype=torch.float32, device=self.states[0].device)
            samples = []
            for _ in range(4):
                t0 = time.perf_counter()
                self.comm.allreduce_mean([buffer], "fusion_calibration")
                if buffer.is_cuda:  # NCCL's wait() only orders streams: time the completion
                    torch.cuda.synchronize(buffer.device)
                samples.append(time.perf_counter() - t0)
            times.append(statistics.median(samples[1:]))  # the first warms the path up
        everyone = self.comm.all_gather_object(times, "metadata")
        slowest = [max(column) for column in zip(*everyone, strict=True)]
        small, big = CALIBRATION_BYTES
        beta = max(0.0, (slowest[1] - slowest[0]) / (big - small))
        return max(0.0, slowest[0] - beta * small), beta

    def _make_plan(self) -> None:
        """Plan the buckets from every rank's profiled ready times and the all-reduce cost model."""
        local = {i: statistics.median(p[i] for p, _ in self._profiles if i in p)
                 for i in self._profiles[-1][0]}
        local_end = statistics.median(end for _, end in self._profiles)
        gathered = self.comm.all_gather_object((local, local_end), "metadata")
        common = sorted(set.intersection(*(set(offsets) for offsets, _ in gathered)))
        ready = [statistics.fmean(offsets[i] for offsets, _ in gathered) for i in common]
        nbytes = [float(self._nbytes(self.states[i])) for i in common]
        if self.network_model == "measured":
            self.alpha_s, self.beta_s_per_byte = self._calibrate()
        else:
            self.alpha_s, self.beta_s_per_byte = network(self.network_model).alpha_beta(self.comm.world_size)
        alpha, beta = self.alpha_s, self.beta_s_per_byte

        def comm(m: float) -> float:
            return alpha + beta * m

        buckets = fusion_plan(ready, nbytes, comm)
        end = statistics.fmean(e for _, e in gathered)
        self.predicted_exposed_s = max(0.0, pipeline(ready, nbytes, buckets, comm)[-1][1] - end)
        self.plan = [[common[k] for k in bucket] for bucket in buckets]
        self._bucket_of = {i: b for b, bucket in enumerate(self.plan) for i in bucket}

    def use_plan(self, buckets: list[list[str]]) -> None:
        """Fuse by these buckets of layer names from now on (instead of, or replacing, the profiled
        plan); every rank must pass the same buckets. Layers in no bucket are reduced alone."""
        known = {name: i for i, name in enumerate(self.names)}
        unknown = [name for bucket in buckets for name in bucket if name not in known]
        if unknown:
            raise ValueError(f"use_plan: unknown layer(s) {unknown}; the layers are {self.names}")
        listed = [name for bucket in buckets for name in bucket]
        if len(set(listed)) != len(listed):
            raise ValueError(f"use_plan: a layer is in more than one bucket: {buckets}")
        self.plan = [[known[name] for name in bucket] for bucket in buckets if bucket]
        self._bucket_of = {i: b for b, bucket in enumerate(self.plan) for i in bucket}

    def report(self) -> dict[str, Any]:
        """Counters. ``overlap_fraction``: share of the backward-launched layer reductions already
        complete when the step began (fully hidden behind the backward pass);
        ``bytes_overlap_fraction`` the same share of their bytes; ``buckets``: the planned fusion
        buckets (layer names; ``None`` while profiling or with per-layer fusion)."""
        return {"fusion": self.fusion, "launched_in_backward": self.launched,
                "finished_before_step": self.finished_early, "collectives_in_backward": self.collectives,
                "reduced_in_step": self.reduced_in_step, "wait_s": self.wait_s,
                "overlap_fraction": self.finished_early / self.launched if self.launched else 0.0,
                "bytes_overlap_fraction": (self.bytes_finished_early / self.bytes_launched
                                           if self.bytes_launched else 0.0),
                "buckets": None if self.plan is None else [[self.names[i] for i in b] for b in self.plan],
                "alpha_s": self.alpha_s, "beta_s_per_byte": self.beta_s_per_byte,
                "predicted_exposed_s": self.predicted_exposed_s}
