"""Shared helpers for the hw_models tests."""

from __future__ import annotations

import numpy as np
import pytest


def spd(eigvals, seed: int = 0) -> np.ndarray:
    """Symmetric positive definite matrix with the given eigenvalues and a random eigenbasis."""
    eigvals = np.asarray(eigvals, dtype=np.float64)
    n = eigvals.size
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    A = (Q * eigvals) @ Q.T
    return 0.5 * (A + A.T)


@pytest.fixture
def problem5():
    """A 5x5 SPD system (eigenvalues 0.5..3) and a right-hand side."""
    lam = np.array([0.5, 0.8, 1.2, 2.0, 3.0])
    A = spd(lam, seed=1)
    b = np.random.default_rng(2).standard_normal(5)
    return A, b, lam
