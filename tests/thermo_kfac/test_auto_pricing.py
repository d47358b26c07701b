"""``auto`` prices a deflating thermodynamic solver by that solver's own rule (hw_models.layer_cost):
the feasibility law picks the deflation depth, the host pays the deflation's GEMMs, and a layer
no depth can serve goes digital with the law's reason."""

from __future__ import annotations

import pytest
import torch

from hw_models import layer_cost, pricing
from hw_models.devices import digital_device, thermo_device
from hw_models.langevin.feasibility import feasibility
from thermo_kfac.layer_pricing import plan_layer
from thermo_kfac.solvers import Damping, EighSolver, ThermodynamicSolver
from thermo_kfac.solvers.auto import AutoSolver, measured_law

N = 24
TOP = 4  # the factor's large modes: deflating them leaves a perfectly conditioned remainder


def _spiked(seed: int) -> torch.Tensor:
    """An SPD factor with ``TOP`` eigenvalues 1000 and the rest 0 (so damped: 1000 + lam and lam)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))
    lam = torch.zeros(N, dtype=torch.float64)
    lam[:TOP] = 1000.0
    return (Q * lam) @ Q.T


def _remainder_verdict(F: torch.Tensor, k: int, lam: float, noise) -> bool:
    """The feasibility law on the exactly deflated, normalised remainder (independent of the code
    under test: exact eigenvectors, not the randomized sketch)."""
    mu, Q = torch.linalg.eigh(F)
    S = F - (Q[:, N - k:] * mu[N - k:]) @ Q[:, N - k:].T if k else F.clone()
    S = S + lam * torch.eye(N, dtype=F.dtype)
    c = float(torch.linalg.eigvalsh(S)[-1])
    return feasibility(S / c, noise, lam / c).feasible


def test_auto_prices_the_deflation_depth_the_thermo_solver_picks_and_its_host_gemms():
    host = digital_device("h100")
    solver = ThermodynamicSolver(bits=8, deflate="auto", seed=0)
    device = solver.device
    A, G = _spiked(0), _spiked(1)
    damping = Damping(1.0)  # lam_A = lam_G = 1
    # premise, from the law itself: the undeflated factor cannot be programmed, the deflated can
    assert not _remainder_verdict(A, 0, 1.0, device.noise)
    assert _remainder_verdict(A, TOP, 1.0, device.noise)
    settings = solver.pricing_settings()
    law = measured_law(A, G, damping, settings, device)
    plan, _ = plan_layer(settings, "eigh", N, N, hardware=device, digital=host, accuracy="eps",
                         inverse_every=5, **law)
    assert plan.seconds is not None, plan.reason
    # the solver itself, preparing these factors, deflates to the same depths
    solver.prepare(A, G, damping)
    assert plan.depths == solver.depths and plan.depths["A"] > 0 and plan.depths["G"] > 0
    # and the host pays the deflation's GEMMs: the sketch per update, the projections per step
    expected = sum(pricing.price_host_gemms(pricing.deflation_gemms(N, k), host).seconds / 5
                   + pricing.price_host_gemms(pricing.deflation_gemms(N, k, N), host).seconds
                   for k in plan.depths.values())
    assert plan.host_s == pytest.approx(expected, rel=1e-12)
    assert plan.seconds > plan.host_s > 0


def test_auto_sends_a_layer_no_depth_can_serve_to_digital_with_the_reason():
    host = digital_device("h100")
    # proportional mismatch this large makes even the identity unrepresentable (||dP|| > 1/2)
    analog = ThermodynamicSolver(deflate="auto", mismatch_std=0.5, seed=0)
    A, G = _spiked(2), _spiked(3)
    damping = Damping(1.0)
    for k in (0, TOP, N - 1):  # premise: the law refuses every depth
        assert not _remainder_verdict(A, k, 1.0, analog.device.noise)
    auto = AutoSolver(analog, EighSolver(), hardware=analog.device, host=host, n_a=N, n_g=N,
                      initial="analog", patience=3)
    auto.prepare(A, G, damping)
    d = auto.decision
    assert d["thermo_s"] is None and auto.choice == "digital" and d["switched"]
    assert "not representable" in d["reason"] and "deflation depth" in d["reason"]
    assert "not representable" in auto.describe()
    # the digital side served the layer: its solve is the exact damped Kronecker inverse
    grad = torch.randn(N, N, dtype=torch.float64)
    eye = torch.eye(N, dtype=torch.float64)
    expected = torch.linalg.solve(G + eye, torch.linalg.solve(A + eye, grad.T).T)
    torch.testing.assert_close(auto.apply(grad), expected, rtol=1e-8, atol=1e-10)


def test_spectra_only_callers_get_the_model_law():
    # placement and projection have spectra, no matrices: the law from summary statistics
    device, host = thermo_device("chip"), digital_device("h100")
    mu = torch.cat([torch.full((TOP,), 1001.0), torch.ones(N - TOP)]).numpy()
    spectra = {k: pricing.SpectrumSummary.from_eigenvalues(mu) for k in ("A", "G")}
    plan = layer_cost.analog_layer_seconds(N, N, device=device, host=host, spectra=spectra,
                                           deflate="auto", require_reachable=True,
                                           eigenvalues={"A": mu, "G": mu}, lam={"A": 1.0, "G": 1.0})
    check = layer_cost.model_feasibility(device, {"A": mu}, {"A": 1.0})
    assert not check("A", 0)[0] and check("A", TOP)[0]
    assert plan.seconds is not None and plan.depths == {"G": TOP, "A": TOP}
