"""The distributed step model: ring all-reduce cost, pipelined buckets, dynamic tensor fusion against
brute force, and the step's exposed communication against hand calculations."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from hw_models.cost import (
    KFACSchedule,
    Network,
    Scenario,
    distributed_step,
    fixed_buckets,
    fusion_plan,
    gemm_time,
    pipeline,
    step_cost,
)
from hw_models.devices import digital_device, thermo_device
from hw_models.workloads import mlp

H100 = digital_device("h100")
SCENARIO = Scenario(H100, thermo_device("chip"), schedule=KFACSchedule(factor_every=2, inverse_every=10))


def test_ring_allreduce_alpha_beta():
    net = Network("t", latency_s=1e-5, bandwidth_Bps=1e9)
    assert net.alpha_beta(4) == pytest.approx((6e-5, 6 / 4e9))
    assert net.allreduce_s(1e6, 4) == pytest.approx(6e-5 + 1.5e-3)
    assert net.allreduce_s(1e9, 1) == 0.0  # one rank: nothing to reduce


def test_pipeline_launches_in_order_on_one_link():
    comm = lambda m: 1.0 + m  # noqa: E731
    times = pipeline([1.0, 2.0, 6.0], [2.0, 1.0, 1.0], [[0], [1], [2]], comm)
    assert times == [(1.0, 4.0), (4.0, 6.0), (6.0, 8.0)]
    assert pipeline([1.0, 2.0], [1.0, 1.0], [[0, 1]], comm, start_s=5.0) == [(5.0, 8.0)]


def _best_end(ready, nbytes, comm):
    """Brute force: the earliest finish over every contiguous partition of the ready order."""
    order = sorted(range(len(ready)), key=lambda i: (ready[i], i))
    best = math.inf
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        buckets, current = [], [order[0]]
        for i, cut in zip(order[1:], cuts, strict=True):
            if cut:
                buckets.append(current)
                current = []
            current.append(i)
        buckets.append(current)
        best = min(best, pipeline(ready, nbytes, buckets, comm)[-1][1])
    return best


def test_fusion_plan_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 7)
        ready = [rng.uniform(0, 10) for _ in range(n)]
        nbytes = [rng.uniform(0, 4) for _ in range(n)]
        alpha, beta = rng.uniform(0, 3), rng.uniform(0.1, 2)
        comm = lambda m, a=alpha, b=beta: a + b * m  # noqa: E731
        plan = fusion_plan(ready, nbytes, comm)
        assert sorted(i for b in plan for i in b) == list(range(n))
        assert pipeline(ready, nbytes, plan, comm)[-1][1] == pytest.approx(_best_end(ready, nbytes, comm))


def test_fusion_plan_hand_cases():
    comm = lambda m: 1.0 + m  # noqa: E731  (alpha 1, beta 1)
    # 0 and 1 ready together: fused (saves alpha); 2 ready much later: alone. By hand: [0,1] ends
    # 0.5 + 3 = 3.5, [2] ends 10 + 2 = 12; three buckets also end at 12 but with one more collective
    assert fusion_plan([0.0, 0.5, 10.0], [1.0, 1.0, 1.0], comm) == [[0, 1], [2]]
    assert fusion_plan([3.0, 3.0, 3.0], [1.0, 2.0, 3.0], comm) == [[0, 1, 2]]  # all at once: one
    # far apart and cheap to send: one all-reduce each (merging would only delay the first)
    assert fusion_plan([0.0, 100.0, 200.0], [1.0, 1.0, 1.0], comm) == [[0], [1], [2]]
    # ready order, not index order
    assert fusion_plan([50.0, 0.0], [1.0, 1.0], comm) == [[1], [0]]
    with pytest.raises(ValueError, match="one per layer"):
        fusion_plan([0.0], [1.0, 2.0], comm)


def test_fixed_buckets_cut_at_the_limit():
    assert fixed_buckets([0, 1, 2, 3], [4, 4, 9, 1], 8) == [[0, 1], [2], [3]]


def _hand_timeline(work):
    """The backward timeline computed by hand for an MLP (reverse order, stats then 2 GEMMs)."""
    t, ready, nbytes = 0.0, [], []
    for layer in reversed(work.layers):
        n_a, n_g = layer.d_in + 1, layer.d_out
        t += gemm_time(work.batch, n_a, n_a, H100) + gemm_time(work.batch, n_g, n_g, H100)
        ready.append(t)
        nbytes.append(4 * (n_a * (n_a + 1) / 2 + n_g * (n_g + 1) / 2))
        t += 2 * gemm_time(work.batch, layer.d_in, layer.d_out, H100) * SCENARIO.nongemm_factor
    return ready, nbytes, t


@pytest.mark.parametrize("latency", [1e-6, 1e-3])
def test_overlapped_step_exposes_only_what_outlasts_the_backward(latency):
    work = mlp("t", (256, 512, 128, 10), batch=64)
    net = Network("t", latency_s=latency, bandwidth_Bps=2e9)
    (r2, r1, r0), (m2, m1, m0), backward = _hand_timeline(work)  # reverse order: fc2, fc1, fc0
    T = lambda m: 2 * latency + m / 2e9  # noqa: E731  (two ranks: 2 message steps, half the payload x2)
    compute = step_cost(work, SCENARIO).digital_kfac_s

    per_layer = distributed_step(work, SCENARIO, world_size=2, net=net, fusion="layer")
    end = r2 + T(m2)
    end = max(end, r1) + T(m1)
    end = max(end, r0) + T(m0)
    assert per_layer.exposed_s == pytest.approx(max(0.0, end - backward))
    assert per_layer.step_s == pytest.approx(compute + max(0.0, end - backward) / 2)  # factors every 2
    assert per_layer.buckets == (("fc2",), ("fc1",), ("fc0",))

    after = distributed_step(work, SCENARIO, world_size=2, net=net, mode="after_backward")
    assert after.exposed_s == pytest.approx(T(m0 + m1 + m2))  # one 25 MiB buffer after the pass
    assert after.step_s == pytest.approx(compute + T(m0 + m1 + m2) / 2)
    assert after.overlap_fraction == pytest.approx(0.0, abs=1e-12)

    dynamic = distributed_step(work, SCENARIO, world_size=2, net=net)
    assert dynamic.exposed_s <= min(per_layer.exposed_s, after.exposed_s) + 1e-15
    assert 0.0 <= dynamic.overlap_fraction <= 1.0


def test_one_bucket_closed_form_and_one_rank():
    work = mlp("t", (64, 10), batch=32)
    (ready,), (m,), backward = _hand_timeline(work)
    net = Network("t", latency_s=1e-4, bandwidth_Bps=1e9)
    step = distributed_step(work, SCENARIO, world_size=4, net=net)
    comm = 6e-4 + 6 / 4 * m / 1e9
    # compute + max(0, comm - the backward time left after the statistics are ready)
    assert step.exposed_s == pytest.approx(max(0.0, comm - (backward - ready)))
    assert step.comm_s == pytest.approx(comm)
    alone = distributed_step(work, SCENARIO, world_size=1, net=net)
    assert alone.exposed_s == 0.0 and alone.step_s == pytest.approx(alone.compute_s)
    with pytest.raises(ValueError, match="mode"):
        distributed_step(work, SCENARIO, world_size=2, mode="sometimes")
    with pytest.raises(ValueError, match="bytes_per_element"):
        distributed_step(work, SCENARIO, world_size=2, bytes_per_element=0)
    with pytest.raises(ValueError, match="network"):
        distributed_step(work, SCENARIO, world_size=2, net="carrier-pigeon")
