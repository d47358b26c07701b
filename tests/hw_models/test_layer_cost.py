"""The one layer-cost builder (hw_models.layer_cost) against the priced primitives it composes."""

from __future__ import annotations

import pytest

from hw_models import layer_cost, pricing
from hw_models.cost import KFACSchedule, digital_layer_cost
from hw_models.devices import digital_device, thermo_device
from hw_models.spectrum import SpectrumSummary

N_A, N_G = 257, 96


def _pair(host):
    return pricing.gemm_time(N_G, N_G, N_A, host) + pricing.gemm_time(N_G, N_A, N_A, host)


@pytest.mark.parametrize("method, pairs", [("eigh", 2), ("cholesky", 1), ("inverse", 1)])
def test_digital_layer_is_decompositions_amortized_plus_gemm_pairs(method, pairs):
    host = digital_device("h100")
    decomposition = sum(host.op_time(method, n, "fp32") for n in (N_A, N_G))
    seconds = layer_cost.digital_layer_seconds(method, N_A, N_G, host=host, inverse_every=7)
    assert seconds == pytest.approx(decomposition / 7 + pairs * _pair(host), rel=1e-12)
    # the step model's digital layer is built from the same pieces
    cost = digital_layer_cost(N_A - 1, N_G, 1, device=host, schedule=KFACSchedule(
        inverse_every=7, digital_method=method))
    assert cost.breakdown_s["preconditioning"] == pytest.approx(pairs * _pair(host), rel=1e-12)
    assert cost.breakdown_s["decomposition"] == pytest.approx(decomposition / 7, rel=1e-12)


def test_analog_inverse_layer_is_two_sampled_inverses_plus_one_host_pair():
    device, host = thermo_device("chip"), digital_device("h100")
    spectra = {"A": SpectrumSummary.from_kappa(N_A, 30.0), "G": SpectrumSummary.from_kappa(N_G, 30.0)}
    plan = layer_cost.analog_layer_seconds(N_A, N_G, device=device, host=host, spectra=spectra,
                                           method="inverse", window=40.0, burn_in=5.0, inverse_every=4)
    jobs = sum(pricing.price(pricing.AnalogJob("inverse", n, spectrum=spectra[k], window_tau=40.0,
                                               burn_in_tau=5.0), device, host).seconds
               for k, n in (("A", N_A), ("G", N_G)))
    assert plan.seconds == pytest.approx(jobs / 4 + _pair(host), rel=1e-12)


def test_a_factor_the_device_refuses_cannot_serve_with_the_reason():
    device = thermo_device("chip").replace(cells=64, oversize="refuse")
    spectra = {"A": SpectrumSummary.from_kappa(N_A, 30.0), "G": SpectrumSummary.from_kappa(N_G, 30.0)}
    plan = layer_cost.analog_layer_seconds(N_A, N_G, device=device, host=digital_device("h100"),
                                           spectra=spectra)
    assert plan.seconds is None and "64" in plan.reason


@pytest.mark.parametrize("make", [
    lambda: pricing.AnalogJob("solve", 8, bits=1, target_eps=0.1),
    lambda: thermo_device("chip").replace(bits=1),
    lambda: thermo_device("chip").replace(coupling_bits=1),
    lambda: pricing.price_program(8, "chip", bits=1),
])
def test_one_bits_rule_everywhere(make):
    with pytest.raises(ValueError, match=r"bits=1 is out of range; it must be an integer in \[2, 32\]"):
        make()
