"""Shifted Cholesky-QR2 orthonormalization of the randomized solvers' sketches."""

from __future__ import annotations

import pytest
import torch

from thermo_kfac.solvers.randomized import orthonormalize, single_thread


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", [0.0, 3.0, 8.0])
def test_orthonormal_basis_of_the_same_span(dtype: torch.dtype, decay: float) -> None:
    gen = torch.Generator().manual_seed(0)
    m, k = 300, 40
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64)).Q
    s = torch.logspace(0, -decay, k, dtype=torch.float64)  # condition number up to 1e8
    Y = ((U * s) @ V.T).to(dtype)
    Q = orthonormalize(Y)
    assert Q.dtype == dtype and Q.shape == (m, k)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(Q.double().T @ Q.double(), torch.eye(k, dtype=torch.float64),
                               atol=50 * eps, rtol=0)
    # the span is Y's: projecting Y onto it leaves (almost) nothing
    Yd = Y.double()
    residual = Yd - Q.double() @ (Q.double().T @ Yd)
    assert float(residual.norm() / Yd.norm()) < 100 * eps


def test_rank_deficient_and_zero_inputs() -> None:
    gen = torch.Generator().manual_seed(1)
    Y = torch.randn(200, 10, generator=gen, dtype=torch.float64) @ torch.randn(10, 30, generator=gen,
                                                                               dtype=torch.float64)
    Q = orthonormalize(Y)  # rank 10 of 30 columns: still an orthonormal basis containing the span
    torch.testing.assert_close(Q.T @ Q, torch.eye(30, dtype=torch.float64), atol=1e-10, rtol=0)
    assert float((Y - Q @ (Q.T @ Y)).norm() / Y.norm()) < 1e-12
    Z = orthonormalize(torch.zeros(50, 5))
    torch.testing.assert_close(Z.T @ Z, torch.eye(5), atol=1e-6, rtol=0)


def test_single_thread_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    with single_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), single_thread():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
