"""The thermodynamic solver owns its pricing (composition, not a mixin): per-layer copies get their
own, and what it prices is the solver's own device and settings."""

from __future__ import annotations

import copy

import torch

from thermo_kfac.solvers import Damping, ThermodynamicSolver


def _spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * n, generator=gen, dtype=torch.float64)
    return X @ X.T / (3 * n)


def test_per_layer_copies_own_their_pricing_state():
    proto = ThermodynamicSolver(ideal=True, kappa0=1e-3, analog_time=20.0, deflate=0, seed=0)
    layer = copy.deepcopy(proto)  # what the preconditioner does per layer
    assert layer.pricing is not proto.pricing and layer.pricing.program.__self__ is layer
    layer.prepare(_spd(6, 0), _spd(5, 1), Damping(0.1))
    assert set(layer.pricing.spectra) == {"A", "G"} and not proto.pricing.spectra
    # the priced spectrum is the one the copy programmed: its condition number is the report's
    reported = layer.last_report.info["condition_number"]  # per factor in setup order: A, G
    priced = [layer.pricing.spectra[k].kappa for k in ("A", "G")]
    f64 = torch.float64
    torch.testing.assert_close(torch.tensor(priced, dtype=f64), torch.tensor(reported, dtype=f64),
                               rtol=1e-9, atol=0.0)


def test_pricing_settings_carry_what_auto_needs_from_the_solver():
    solver = ThermodynamicSolver(max_deflate=16, target_error=0.05, max_analog_time=80.0,
                                 feasibility_margin=3.0, mismatch_std=0.01)
    s = solver.pricing_settings()
    assert (s["deflate"], s["max_deflate"], s["target_error"], s["max_analog_time"],
            s["feasibility_margin"]) == ("auto", 16, 0.05, 80.0, 3.0)
    assert s["thermo_device"] is solver.device and s["thermo_device"].noise.mismatch_std == 0.01
