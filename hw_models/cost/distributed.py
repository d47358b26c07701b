"""Data-parallel K-FAC's factor communication: an all-reduce cost model, SPD-KFAC's dynamic tensor
fusion, and the distributed step with the factor statistics reduced after or during the backward pass.

All-reduce (ring, ``P`` ranks, ``m`` bytes): ``2 (P - 1)`` message steps of latency ``l`` and
``2 (P - 1) / P`` of the payload over one link of bandwidth ``b``, i.e. SPD-KFAC's ``alpha + beta m``
with ``alpha = 2 (P - 1) l`` and ``beta = 2 (P - 1) / (P b)`` (:class:`Network`).

Dynamic tensor fusion (Shi, Zhang & Li, SPD-KFAC): the layers' statistics become ready one by one
during the backward pass (``ready_s``, in seconds from its start); each *bucket* of consecutive
layers (in ready order) is one all-reduce, launched when its last member is ready and the link
is free. Merging saves the per-collective ``alpha`` but delays the launch; :func:`fusion_plan`
chooses the buckets that finish the last all-reduce earliest (exact, by dynamic programming over
the ``2^(L-1)`` contiguous partitions: the finish time of a prefix is monotone in the finish
time of the prefix before it, so the best prefix plans compose), with fewer collectives on ties.

The distributed step (:func:`distributed_step`) of one rank on its shard (``workload.batch`` is
the per-rank batch): ``compute`` is the digital K-FAC step of :func:`hw_models.cost.step_cost`;
on a factor-update step the statistics of every layer (upper triangles of ``A`` and ``G``,
``bytes_per_element`` each) are all-reduced

* ``"after_backward"``: after the backward pass, in fixed buckets of ``bucket_mb``; all of it is
  exposed: ``step = compute + comm``;
* ``"overlap"``: per bucket as the backward produces them; bucket ``k`` starts at
  ``max(ready_k, end_{k-1})`` and ends ``T(m_k)`` later, and only what runs past the end of the
  backward pass is exposed: ``step = compute + max(0, end_last - backward)``. For one bucket that
  is ``compute + max(0, T(m) - (backward - ready))``: its communication minus the backward time
  left to hide it.

Exposed time counts on factor-update steps only (``/ factor_every`` per step). The backward
timeline: layers in reverse order; a layer's statistics GEMMs (``rows n_a^2`` and ``rows n_g^2``,
unscaled) run when its output gradient arrives and make it ready, then its two backward GEMMs
(scaled by ``nongemm_factor``). Attention scores and other ``extra_forward_flops`` are left out of
the timeline (less backward to hide behind: conservative). Gradient all-reduces and the solve
placement are not priced here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hw_models.cost.steps import Scenario, step_cost
from hw_models.pricing import gemm_time
from hw_models.validation import check_choice, check_positive

MODES = ("after_backward", "overlap")
FUSIONS = ("dynamic", "layer", "fixed")


@dataclass(frozen=True)
class Network:
    """Ring all-reduce cost: ``latency_s`` per message step, ``bandwidth_Bps`` bytes/s per link."""

    name: str
    latency_s: float
    bandwidth_Bps: float
    source: str = ""

    def __post_init__(self) -> None:
        check_positive("latency_s", self.latency_s, allow_zero=True)
        check_positive("bandwidth_Bps", self.bandwidth_Bps)

    def alpha_beta(self, world_size: int) -> tuple[float, float]:
        """``(alpha, beta)`` of one all-reduce over ``world_size`` ranks (module docs)."""
        check_positive("world_size", world_size, integer=True)
        steps = 2 * (world_size - 1)
        return steps * self.latency_s, steps / (world_size * self.bandwidth_Bps)

    def allreduce_s(self, nbytes: float, world_size: int) -> float:
        """Seconds of one all-reduce of ``nbytes`` over ``world_size`` ranks (0 on one rank)."""
        alpha, beta = self.alpha_beta(world_size)
        return alpha + beta * float(nbytes)


NETWORKS = {
    "ib100": Network("ib100", 5e-6, 10e9, "100 Gb/s InfiniBand (SPD-KFAC's cluster), 80% of line "
                     "rate, 5 us per message step [assumption]"),
    "eth10": Network("eth10", 30e-6, 1.0e9, "10 Gb/s Ethernet, 80% of line rate, 30 us per message "
                     "step [assumption]"),
    "nvlink": Network("nvlink", 3e-6, 300e9, "H100 NVLink 4 ring, 2/3 of 450 GB/s per direction, "
                      "3 us per message step [assumption]"),
}


def network(name: str | Network) -> Network:
    """A network preset by name (``ib100``, ``eth10``, ``nvlink``); networks pass through."""
    if isinstance(name, Network):
        return name
    check_choice("network", name, tuple(NETWORKS))
    return NETWORKS[name]


def _ready_order(ready_s: Sequence[float], nbytes: Sequence[float]) -> list[int]:
    if len(ready_s) != len(nbytes):
        raise ValueError(f"ready_s has {len(ready_s)} entries but nbytes has {len(nbytes)}: one per layer")
    for i, (r, m) in enumerate(zip(ready_s, nbytes, strict=True)):
        if not (math.isfinite(r) and m >= 0):
            raise ValueError(f"layer {i}: ready_s={r!r} must be finite and nbytes={m!r} >= 0")
    return sorted(range(len(ready_s)), key=lambda i: (ready_s[i], i))


def pipeline(ready_s: Sequence[float], nbytes: Sequence[float], buckets: Sequence[Sequence[int]],
             comm: Callable[[float], float], *, start_s: float = -math.inf) -> list[tuple[float, float]]:
    """``(start, end)`` of each bucket's all-reduce, launched in order on one link: bucket ``k``
    starts at ``max(start_s, its last member's ready time, end of bucket k-1)``."""
    times, free = [], start_s
    for bucket in buckets:
        start = max(free, max(ready_s[i] for i in bucket))
        free = start + comm(sum(nbytes[i] for i in bucket))
        times.append((start, free))
    return times


def fusion_plan(ready_s: Sequence[float], nbytes: Sequence[float],
                comm: Callable[[float], float]) -> list[list[int]]:
    """SPD-KFAC's dynamic tensor fusion: contiguous buckets (in ready order) of layer indices whose
    pipelined all-reduces (:func:`pipeline`) finish earliest; ties go to fewer collectives.
    ``comm(m)``: seconds of one all-reduce of ``m`` bytes (e.g. ``alpha + beta m``)."""
    order = _ready_order(ready_s, nbytes)
    n = len(order)
    prefix = [0.0]
    for i in order:
        prefix.append(prefix[-1] + float(nbytes[i]))
    # best[i] = (finish time, collectives, cut) of the best plan of the first i layers
    best: list[tuple[float, int, int]] = [(-math.inf, 0, 0)]
    for i in range(1, n + 1):
        ready = ready_s[order[i - 1]]
        choice = None
        for j in range(i):
            end = max(best[j][0], ready) + comm(prefix[i] - prefix[j])
            key = (end, best[j][1] + 1, j)
            if choice is None or end < choice[0] - 1e-12 * abs(choice[0]) or (
                    end <= choice[0] + 1e-12 * abs(choice[0]) and key[1] < choice[1]):
                choice = key
        assert choice is not None
        best.append(choice)
    buckets, i = [], n
    while i > 0:
        j = best[i][2]
        buckets.append(order[j:i])
        i = j
    return buckets[::-1]


def fixed_buckets(ready_s: Sequence[float], nbytes: Sequence[float], limit_bytes: float) -> list[list[int]]:
    """Buckets of consecutive layers (ready order) of at most ``limit_bytes`` (a layer larger than
    the limit is a bucket of its own), as a fixed-size fusion buffer cuts them."""
    check_positive("limit_bytes", limit_bytes)
    buckets: list[list[int]] = []
    used = 0.0
    for i in _ready_order(ready_s, nbytes):
        if buckets and used + nbytes[i] <= limit_bytes:
            buckets[-1].append(i)
            used += nbytes[i]
        else:
            buckets.append([i])
            used = float(nbytes[i])
    return buckets


def backward_timeline(workload: Any, scenario: Scenario, *, bytes_per_element: int = 4
                      ) -> tuple[list[str], list[float], list[float], float]:
    """``(names, ready_s, nbytes, backward_s)`` of a factor-update step's backward pass (module docs):
    when each layer's statistics are ready, their upper triangles' bytes, and the pass's length."""
    device, precision = scenario.digital, scenario.schedule.precision
    names, ready, nbytes, t = [], [], [], 0.0
    for layer in reversed(workload.layers):
        name, d_in, d_out = str(layer.name), int(layer.d_in), int(layer.d_out)
        bias = bool(getattr(layer, "bias", True))
        rows = max(1.0, workload.batch * float(getattr(layer, "positions", 1.0)))
        n_a = d_in + int(bias)
        t += gemm_time(rows, n_a, n_a, device, precision) + gemm_time(rows, d_out, d_out, device, precision)
        names.append(name)
        ready.append(t)
        nbytes.append(float(bytes_per_element * (n_a * (n_a + 1) // 2 + d_out * (d_out + 1) // 2)))
        t += 2.0 * gemm_time(rows, d_in, d_out, device, precision) * scenario.nongemm_factor
    return names, ready, nbytes, t


@dataclass(frozen=True)
class DistributedStep:
    """One rank's data-parallel K-FAC step with its factor communication (module docs)."""

    workload: str
    world_size: int
    network: str
    mode: str
    fusion: str
    compute_s: float
    backward_s: float
    buckets: tuple[tuple[str, ...], ...]
    bucket_times: tuple[tuple[float, float], ...]
    comm_s: float
    exposed_s: float
    factor_every: int

    @property
    def step_s(self) -> float:
        """Seconds per step: compute plus the exposed communication, amortized over factor steps."""
        return self.compute_s + self.exposed_s / self.factor_every

    @property
    def overlap_fraction(self) -> float:
        """Share of the communication hidden behind the backward pass (1 with no communication)."""
        return 1.0 - self.exposed_s / self.comm_s if self.comm_s > 0 else 1.0

    def summary(self) -> dict[str, Any]:
        return {"workload": self.workload, "world_size": self.world_size, "network": self.network,
                "mode": self.mode, "fusion": self.fusion, "compute_s": self.compute_s,
                "backward_s": self.backward_s, "collectives": len(self.buckets), "comm_s": self.comm_s,
                "exposed_s": self.exposed_s, "overlap_fraction": self.overlap_fraction,
                "step_s": self.step_s, "factor_every": self.factor_every}


def distributed_step(workload: Any, scenario: Scenario, *, world_size: int, net: str | Network = "ib100",
                     mode: str = "overlap", fusion: str = "dynamic", bucket_mb: float = 25.0,
                     bytes_per_element: int = 4) -> DistributedStep:
    """Price one rank's step of data-parallel K-FAC over ``world_size`` ranks (module docs).

    ``fusion`` (overlap mode): ``"dynamic"`` (:func:`fusion_plan`), ``"layer"`` (one all-reduce
    per layer) or ``"fixed"`` (``bucket_mb`` buffers); ``"after_backward"`` always uses fixed buffers.
    """
    check_choice("mode", mode, MODES)
    check_choice("fusion", fusion, FUSIONS)
    check_positive("world_size", world_size, integer=True)
    check_positive("bucket_mb", bucket_mb)
    check_positive("bytes_per_element", bytes_per_element, integer=True)
    link = network(net)
    names, ready, nbytes, backward = backward_timeline(workload, scenario,
                                                       bytes_per_element=bytes_per_element)

    def comm(m: float) -> float:
        return link.allreduce_s(m, world_size)

    limit = bucket_mb * 2**20
    if mode == "after_backward" or fusion == "fixed":
        buckets = fixed_buckets(ready, nbytes, limit)
    elif fusion == "layer":
        buckets = [[i] for i in _ready_order(ready, nbytes)]
    else:
        buckets = fusion_plan(ready, nbytes, comm)
    start = backward if mode == "after_backward" else -math.inf  # after: nothing before the pass ends
    times = pipeline(ready, nbytes, buckets, comm, start_s=start)
    comm_s = sum(end - start for start, end in times)
    exposed = max(0.0, times[-1][1] - backward) if times else 0.0
    return DistributedStep(
        str(workload.name), world_size, link.name, mode, fusion if mode == "overlap" else "fixed",
        step_cost(workload, scenario).digital_kfac_s, backward,
        tuple(tuple(names[i] for i in b) for b in buckets), tuple(times), comm_s, exposed,
        scenario.schedule.factor_every)
