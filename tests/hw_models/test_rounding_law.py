"""The error law's rounding variance against Monte-Carlo quantization (issue 28): stochastic
rounding has twice the variance of rounding to nearest (step^2/6 against step^2/12)."""

from __future__ import annotations

import pytest
import torch

from hw_models.langevin.feasibility import rounding_variance
from hw_models.noise import quantize


@pytest.mark.parametrize("rounding, bits", [("nearest", 8), ("stochastic", 8), ("stochastic", 12),
                                            ("nearest", 14)])
def test_rounding_variance_matches_monte_carlo(rounding, bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(200_000, generator=gen, dtype=torch.float64) * 2 - 1
    q = quantize(x, bits, rounding=rounding, bound=1.0, generator=gen)
    step = 1.0 / (2 ** (bits - 1) - 1)
    measured = float((q.values - x).var())
    assert measured == pytest.approx(rounding_variance(step, rounding), rel=0.03)


def test_static_law_uses_the_rounding_mode():
    import numpy as np

    from hw_models.langevin.error_model import static_solve_error

    lam = np.geomspace(0.01, 1.0, 64)
    nearest = static_solve_error(lam, solution_norm2=1.0, coupling_bits=10)
    stochastic = static_solve_error(lam, solution_norm2=1.0, coupling_bits=10, rounding="stochastic")
    assert stochastic == pytest.approx(np.sqrt(2.0) * nearest, rel=1e-12)
