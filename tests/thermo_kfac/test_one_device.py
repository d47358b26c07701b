"""One description of the device (issue 22): what the thermo solver simulates is what it prices.

Every field of the device's converter/non-ideality configuration, and ``kappa0``, is overridden
through the solver in turn; the configuration the simulator ran with and the device of every
priced job must hold the overridden value.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hw_models as hm
from hw_models import pricing
from thermo_kfac.solvers import ThermodynamicSolver
from thermo_kfac.solvers.base import Damping

#: a non-default value for every NoiseConfig field the solver can set (placement excluded: the
#: solver places each factor on its own unit, which the device object does not describe)
OVERRIDES = {
    "coupling_bits": 14, "input_bits": 9, "output_bits": 11, "rounding": "stochastic",
    "mismatch_std": 1e-3, "mismatch_kind": "absolute", "read_noise": 1e-3,
    "mitigation_copies": 2, "coupling_range": 1.5, "input_range": 0.9, "output_range": 6.0,
    "device_seed": 7, "state_range": 12.0, "diagonal_resistors": False, "diagonal_bits": 8,
}
PLACEMENT = {"unit", "cell_offset"}


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return X @ X.T / (3 * n)


def test_every_device_field_is_covered():
    fields = {f.name for f in dataclasses.fields(hm.NoiseConfig)}
    assert set(OVERRIDES) == fields - PLACEMENT


@pytest.mark.parametrize("field", [*OVERRIDES, "kappa0", "bits"])
def test_an_override_is_simulated_and_priced(field):
    value = {"kappa0": 3e-3, "bits": 7}.get(field, OVERRIDES.get(field))
    options = {field: value}
    if field == "mitigation_copies":
        options["rounding"] = "stochastic"  # copies need unbiased rounding
    if field == "diagonal_bits":
        options["diagonal_resistors"] = True  # the chip has them; stated so the test says why
    solver = ThermodynamicSolver(seed=1, **options)
    chip = hm.thermo_device("chip")
    assert solver.device == chip.replace(**options)
    solver.prepare(_spd(12, 0), _spd(8, 1), Damping(0.05))
    solver.apply(torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    simulated = solver.config.noise
    solves = solver.last_report.info["pricing"]["solves"]
    assert len(solves) == 2
    for solve in solves:
        priced = solve["converters"]
        for name in OVERRIDES:  # field by field: the priced job's device is the simulated one
            assert priced[name] == getattr(simulated, name), name
        assert solve["kappa0"] == solver.config.kappa0
    if field == "bits":
        assert (simulated.coupling_bits, simulated.input_bits, simulated.output_bits) == (7, 7, 7)
    elif field == "kappa0":
        assert solver.config.kappa0 == value
    else:
        assert getattr(simulated, field) == value
        assert getattr(chip.noise, field) != value  # the premise: the override changed something


def test_an_override_changes_the_price_the_way_it_changes_the_simulation():
    """Fewer converter bits: the simulator's static error rises and so does the priced error."""
    A, G = _spd(12, 0), _spd(8, 1)
    errors = {}
    for bits in (6, 12):
        solver = ThermodynamicSolver(seed=1, input_bits=bits, output_bits=bits, analog_time=400.0)
        solver.prepare(A, G, Damping(0.05))
        solver.apply(torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
        solve = pricing.price(pricing.AnalogJob("solve", 12, 8, kappa=10.0, window_tau=400.0),
                              solver.device)
        errors[bits] = solve.error["static"]
    assert errors[6] > 4 * errors[12]


def test_a_device_object_is_simulated_and_priced_as_given():
    slow = hm.thermo_device("chip", tau_s=1e-6, coupling_bits=12, kappa0=1e-3)
    solver = ThermodynamicSolver(device=slow, seed=0)
    assert solver.device is slow and solver.config.noise is slow.noise
    solver.prepare(_spd(12, 0), _spd(8, 1), Damping(0.05))
    solver.apply(torch.randn(8, 12, dtype=torch.float64))
    info = solver.last_report.info["pricing"]
    assert all(s["converters"]["coupling_bits"] == 12 and s["kappa0"] == 1e-3 for s in info["solves"])


def test_exact_converters_are_priced_as_32_bit_words():
    chip = hm.thermo_device("chip")
    ideal = chip.ideal()
    n = 64
    exact = pricing.price_program(n, ideal).breakdown_s["transfer"] - ideal.link_latency_s
    quantized = pricing.price_program(n, chip).breakdown_s["transfer"] - chip.link_latency_s
    couplings = n * (n + 1) / 2
    assert exact == pytest.approx(couplings * 32 / chip.io_bandwidth_bps, rel=1e-12)
    assert quantized == pytest.approx(couplings * 10 / chip.io_bandwidth_bps, rel=1e-12)


def test_bad_device_overrides_name_the_value():
    with pytest.raises(ValueError, match="dac_bits"):
        hm.thermo_device("chip", dac_bits=8)
    with pytest.raises(ValueError, match="coupling_bits=1"):
        ThermodynamicSolver(coupling_bits=1)
    with pytest.raises(ValueError, match="kappa0=-1"):
        ThermodynamicSolver(kappa0=-1.0)
