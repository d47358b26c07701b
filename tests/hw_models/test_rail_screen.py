"""The analytic path's rail screen and its cheap draws (simulation throughput): the midpoint bound
never passes a run whose mean path leaves the rails, in float32 and in bfloat16 with its rounding
allowance; end states of chosen columns are those columns of the full draw; the read noise folded
into the thermal draw has the variance of a separate draw."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hw_models.langevin import analytic


def _case(n: int, m: int, seed: int, kappa: float = 50.0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.logspace(0, -np.log10(kappa), n, dtype=torch.float64)
    B = torch.randn(n, m, generator=gen, dtype=torch.float64)
    B = B / B.abs().amax(dim=0, keepdim=True)  # full-scale columns, as the solver loads them
    x0 = torch.randn(n, m, generator=gen, dtype=torch.float64)
    return Q.float(), lam, B.float(), x0.float()


def _brute_peak(Q, lam, ustar, d, margin, times):
    """max over a fine time grid of |x* + Q exp(-lam t) d| plus the margin (the reference)."""
    peak = 0.0
    for t in times:
        path = ustar + torch.exp(-lam[:, None] * t) * d
        peak = max(peak, float(((Q.double() @ path).abs() + margin).amax()))
    return peak


@pytest.mark.parametrize("screen", ["float32", "bfloat16"])
@pytest.mark.parametrize("start", ["zero", "warm"])
def test_midpoint_bound_is_never_below_the_mean_paths_peak(screen, start):
    times = np.concatenate([[0.0], np.geomspace(1e-3, 2e3, 400)])
    for seed in range(6):
        Q, lam, B, x0 = _case(24, 5, seed)
        law = analytic.make_law(lam.numpy()[None], Q[None], 10.0, 50.0, 1e-4, True)
        dtype = torch.bfloat16 if screen == "bfloat16" else torch.float32
        law = dataclasses.replace(law, screen_Q=Q[None].to(dtype).contiguous(),
                                  screen_absQ=Q[None].to(dtype).abs().contiguous())
        ustar = (Q.T @ B) / lam.float()[:, None]
        d = None if start == "zero" else (Q.T @ x0) - ustar
        before = ustar.clone()
        bound = analytic.midpoint_peak(law, ustar[None], None if d is None else d[None])
        assert torch.equal(ustar, before)  # the screen leaves the solve's u* alone
        margin = analytic.RAIL_SIGMAS * law.coord_sd[0].double()
        ref = _brute_peak(Q, lam, ustar.double(), (-ustar if d is None else d).double(), margin, times)
        assert bound >= ref * (1 - 1e-6), (seed, bound, ref)
        # and it is a useful screen, not a trivial one: within a small factor of the true peak
        assert bound <= 4.0 * ref


def test_rail_check_passes_inside_and_refuses_a_path_beyond_the_rails():
    Q, lam, B, x0 = _case(16, 4, 3)
    law = analytic.make_law(lam.numpy()[None], Q[None], 10.0, 50.0, 1e-4, True)
    ustar = ((Q.T @ B) / lam.float()[:, None])[None]
    d = (Q.T @ x0)[None] - ustar
    start = float(x0.abs().amax())  # the path starts at x0: rails below it are crossed at t = 0
    reach = float((Q @ ustar[0]).abs().amax()) + float(torch.linalg.vector_norm(d, dim=-2).amax())
    assert analytic.within_rails(law, Q[None], ustar, d, 2.0 * (reach + start))
    assert not analytic.within_rails(law, Q[None], ustar, d, 0.9 * start)


def test_end_states_of_chosen_columns_are_those_columns_of_the_full_draw():
    Q, lam, B, x0 = _case(12, 6, 5)
    law = analytic.make_law(lam.numpy()[None], Q[None], 5.0, 20.0, 0.0, False)  # no noise
    normal = lambda shape: torch.zeros(shape)  # noqa: E731
    full = analytic.draw(law, Q[None], B[None], normal, x0=x0[None], want_end=True)
    cols = torch.tensor([1, 4])
    part = analytic.draw(law, Q[None], B[None], normal, x0=x0[None], want_end=True, end_cols=cols)
    assert part.end.shape == (1, 12, 2)
    assert torch.allclose(part.end, full.end[..., cols], atol=1e-5)
    assert torch.allclose(part.mean, full.mean, atol=1e-6)
    # the end state with no noise is the mean path at burn-in + window: x* + Q exp(-lam s) d
    ustar = (Q.T @ B) / lam.float()[:, None]
    d = Q.T @ x0 - ustar
    exact = Q @ (ustar + torch.exp(-lam.float()[:, None] * 25.0) * d)
    assert torch.allclose(full.end[0], exact, atol=1e-4)


def test_folded_read_noise_has_the_variance_of_a_separate_draw():
    """Isotropic read noise added to Q U equals, in distribution, read_sd**2 more variance per mode:
    the empirical per-coordinate variance of the draw matches sd_k^2 + read_sd^2 rotated."""
    n, m = 8, 20000
    Q, lam, _, _ = _case(n, 1, 7)
    law = analytic.make_law(lam.numpy()[None], Q[None], 5.0, 20.0, 1e-2, False)
    B = torch.zeros(1, n, m)
    gen = torch.Generator().manual_seed(0)
    normal = lambda shape: torch.randn(shape, generator=gen)  # noqa: E731
    read_sd = 0.5  # its variance (0.25) well above the tolerance: a missing fold would fail
    drawn = analytic.draw(law, Q[None], B, normal, read_sd=read_sd)
    assert drawn.read_noise_drawn
    cov = drawn.mean[0] @ drawn.mean[0].T / m
    expected = Q @ torch.diag(law.sd[0, :, 0] ** 2 + read_sd**2) @ Q.T
    assert torch.allclose(cov, expected, atol=6.0 * float(expected.diag().max()) / m**0.5)
    assert not analytic.draw(law, Q[None], B, normal, read_sd=read_sd, want_end=True).read_noise_drawn


@pytest.mark.parametrize("start", ["zero", "warm"])
def test_log_norm_bound_is_never_below_the_mean_paths_peak(start):
    """Diagonally dominant programmed matrices (a well-conditioned factor): ``||x0||_inf +
    ||b||_inf / rate`` bounds the mean path at every time (fine-grid reference)."""
    times = np.concatenate([[0.0], np.geomspace(1e-3, 2e3, 400)])
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        n, m = 20, 4
        E = torch.randn(n, n, generator=gen, dtype=torch.float64) * 0.02
        P = torch.eye(n, dtype=torch.float64) * 0.9 + (E + E.T) / 2
        lam, Q = torch.linalg.eigh(P)
        B = torch.randn(n, m, generator=gen, dtype=torch.float64)
        x0 = torch.randn(n, m, generator=gen, dtype=torch.float64) if start == "warm" else None
        law = analytic.make_law(lam.numpy()[None], Q.float()[None], 10.0, 50.0, 1e-4, True,
                                A=P.float()[None])
        assert law.rate is not None and float(law.rate) > 0
        b_max = B.abs().amax().reshape(1)
        x0_max = None if x0 is None else x0.abs().amax().reshape(1)
        bound = analytic.log_norm_peak(law, b_max, x0_max)
        ustar = (Q.T @ B) / lam[:, None]
        d = -ustar if x0 is None else Q.T @ x0 - ustar
        margin = analytic.RAIL_SIGMAS * law.coord_sd[0].double()
        ref = _brute_peak(Q.float(), lam, ustar, d, margin, times)
        assert bound >= ref * (1 - 1e-6), (seed, bound, ref)
    # a matrix that is not diagonally dominant has no such bound
    P = torch.full((4, 4), 0.3, dtype=torch.float64) + 0.1 * torch.eye(4, dtype=torch.float64)
    lam, Q = torch.linalg.eigh(P)
    law = analytic.make_law(lam.numpy()[None], Q.float()[None], 10.0, 50.0, 1e-4, True, A=P.float()[None])
    assert analytic.log_norm_peak(law, torch.ones(1), None) is None
