"""The numba backend's random streams and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

import hw_models as hm

nb = pytest.importorskip("hw_models.langevin.numba_backend")


def _normals(key, rows, cols):
    out = np.empty((rows, cols))
    nb.fill_normal(out, nb.make_streams(key, rows), nb.ZIG_X, nb.ZIG_R, nb.ZIG_F)
    return out


def test_ziggurat_tables_have_equal_layer_areas():
    x, ratio, f = nb.ZIG_X, nb.ZIG_R, nb.ZIG_F
    layers = x.size - 1
    r = x[1]
    v = r * math.exp(-r * r / 2) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))
    areas = x[1:layers] * (f[2 : layers + 1] - f[1:layers])  # rectangles of layers 1..N-1
    np.testing.assert_allclose(areas, v, rtol=1e-9)
    assert x[0] * f[1] == pytest.approx(v)  # base rectangle has the same area
    assert x[layers] == 0.0 and f[layers] == 1.0
    np.testing.assert_allclose(ratio, x[1:] / x[:-1])


def test_normals_follow_the_standard_normal_law():
    z = _normals(1, 8, 500_000).ravel()  # 4M draws
    n = z.size
    assert abs(z.mean()) < 4.5 / math.sqrt(n)
    assert abs(z.var() - 1) < 4.5 * math.sqrt(2 / n)
    assert abs(stats.kurtosis(z)) < 4.5 * math.sqrt(24 / n)
    assert stats.kstest(z[:1_000_000], "norm").pvalue > 1e-4
    # the tail beyond the ziggurat base r and the wedges are sampled correctly
    r = nb.ZIG_X[1]
    p_tail = 2 * stats.norm.sf(r)
    count = np.sum(np.abs(z) > r)
    assert abs(count - n * p_tail) < 4.5 * math.sqrt(n * p_tail)
    # chi-square on 200 equiprobable bins
    edges = stats.norm.ppf(np.linspace(0, 1, 201))
    counts, _ = np.histogram(z, bins=edges)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_streams_are_independent_and_reproducible():
    z = _normals(7, 64, 4000)
    C = np.corrcoef(z)
    off = C[np.triu_indices(64, 1)]
    assert np.abs(off).max() < 4.5 / math.sqrt(4000) * 1.3  # max of 2016 |N(0, 1/4000)|
    np.testing.assert_array_equal(z, _normals(7, 64, 4000))
    assert not np.array_equal(z, _normals(8, 64, 4000))
    # lag-1 autocorrelation within a stream
    ac = np.mean(z[:, 1:] * z[:, :-1])
    assert abs(ac) < 4.5 / math.sqrt(z[:, 1:].size)


def test_results_do_not_depend_on_thread_count(problem5):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least 2 numba threads")
    A, b, _ = problem5
    B = np.repeat(b[:, None], 6, axis=1)
    outs = []
    threads = numba.get_num_threads()
    try:
        for t in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(t)
            for integrator in ["euler", "exact"]:
                cfg = hm.AnalogConfig(analog_time=5.0, kappa0=0.1, integrator=integrator,
                                      backend="numba", seed=3)
                outs.append(hm.solve(A, B, cfg).x)
                outs.append(hm.inverse(np.stack([A, A]), cfg).x)
    finally:
        numba.set_num_threads(threads)
    half = len(outs) // 2
    # Same streams per column whatever the thread count; the per-block GEMM may round its last
    # bits differently for different block widths (seen with 16 threads), so 1e-12, not bitwise:
    # a changed random stream would differ at O(1).
    for a, c in zip(outs[:half], outs[half:], strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-12)


def test_blocking_does_not_change_the_result(monkeypatch):
    """Columns keep their streams however they are split into blocks across threads."""
    import numba

    A = np.diag(np.linspace(1.0, 2.0, 8)) + 0.1
    B = np.ones((8, 6))
    cfg = hm.AnalogConfig(analog_time=3.0, kappa0=0.1, backend="numba", seed=4)
    one = hm.solve(A, B, cfg).x
    monkeypatch.setattr(numba, "get_num_threads", lambda: 3)  # 6 tasks -> blocks of one column
    many = hm.solve(A, B, cfg).x
    np.testing.assert_allclose(one, many, rtol=1e-12, atol=1e-14)
