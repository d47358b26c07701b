"""Projections: trace pricing on a hand-written trace, kappa-vs-width model, paper scenario, maps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import hw_models as hm
from hw_models import projection as pj
from hw_models.cost import Scenario, step_cost
from hw_models.pricing import AnalogJob, SpectrumSummary, price, price_digital

TRACE = Path(__file__).parent / "data" / "trace_small.json"
H100 = hm.digital_device("h100")
CHIP = hm.thermo_device("chip")


def test_trace_pricing_prices_exactly_the_listed_solves():
    trace = pj.load_trace(TRACE)
    doc = pj.price_trace(trace, thermo="chip", digital="h100")
    rows = {r["name"]: r for r in doc["layers"]}
    fc1 = rows["fc1"]
    assert fc1["kappa_measured"] == pytest.approx(200.0)
    # independent re-pricing of the four fc1 solve entries (2 calls each) over 4 steps
    expected = 0.0
    for kappa in (200.0, 100.0):
        a = SpectrumSummary.from_dict({"n": 65, "lambda_min": 2.0 / kappa, "lambda_max": 2.0})
        g = SpectrumSummary.from_dict({"n": 32, "lambda_min": 0.05, "lambda_max": 0.5})
        for n, n_rhs, spec in ((32, 65, g), (65, 32, a)):
            job = AnalogJob("solve", n, n_rhs, spectrum=spec, window_tau=50.0, burn_in_tau=10.0)
            expected += 2 * price(job, CHIP).seconds
    assert fc1["thermo_s"] == pytest.approx(expected / 4)
    # digital: one eigh per factor per update, and eigenvector preconditioning for the steps it covers
    eigh = price_digital("eigh", 65, device=H100).seconds + price_digital("eigh", 32, device=H100).seconds
    assert fc1["digital_s"] > 2 * eigh / 4
    assert fc1["fallbacks"] == 1 and fc1["rel_error_to_exact"] == pytest.approx(0.22)
    # a 5000-wide factor does not fit the 4096-cell chip: thermo_s is null, the step keeps it digital
    assert rows["fc2"]["thermo_s"] is None
    step = doc["step"]
    assert step["layers_too_big"] == 1
    assert step["thermo_kfac_solver_s"] == pytest.approx(fc1["thermo_s"] + rows["fc2"]["digital_s"])
    assert step["digital_kfac_solver_s"] == pytest.approx(fc1["digital_s"] + rows["fc2"]["digital_s"])


def test_trace_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        pj.load_trace(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="thermo-kfac-trace/1"):
        pj.load_trace(bad)


def test_kappa_model_fits_a_power_law_and_clamps():
    model = pj.KappaModel.from_trace(pj.load_trace(TRACE))
    # the last update per factor: (65, 100), (32, 10), (5000, 1000), (10, 2)
    assert 0.0 <= model.exponent <= 2.0
    assert model(5000) > model(65) > model(10)
    single = pj.KappaModel.from_trace({"updates": [{"layer": "x", "factors": {
        "A": {"n": 8, "lambda_min": 0.1, "lambda_max": 1.0}}}]})
    assert single.exponent == 0.0 and single(1000) == pytest.approx(10.0)
    scenario = Scenario(digital=H100, thermo=CHIP, kappa_of=model)
    assert scenario.factor_spectrum(100).kappa == pytest.approx(model(100))


def test_overlap_never_slows_a_step_and_update_only_excludes_forward_backward():
    work = hm.workload("mnist-ae")
    base = Scenario(digital=H100, thermo=CHIP, kappa=10.0, eps=0.2)
    plain, overlapped = step_cost(work, base), step_cost(work, base.replace(overlap=True))
    assert overlapped.thermo_kfac_s <= plain.thermo_kfac_s * (1 + 1e-12)
    upd = plain.update_only()
    assert upd["digital_kfac_update_s"] == pytest.approx(plain.digital_kfac_s - plain.fwd_bwd_s)
    assert upd["adam_update_s"] == pytest.approx(plain.optimizer_s)


def test_fixed_analog_time_reports_accuracy_from_the_law():
    work = hm.workload("mnist-ae")
    scen = Scenario(digital=H100, thermo=CHIP, method="solve", analog_time=5.0, burn_in=0.0)
    short = step_cost(work, scen)
    long = step_cost(work, scen.replace(analog_time=500.0, burn_in=100.0))
    err_short = max(l.thermo.info["predicted_rel_error"] for l in short.layers if l.thermo)
    err_long = max(l.thermo.info["predicted_rel_error"] for l in long.layers if l.thermo)
    assert err_long < err_short


def test_paper_report_states_a_verdict_and_lists_sources():
    work = hm.workload("mnist-ae")
    report = pj.paper_report(work, Scenario(digital=H100, thermo=CHIP))
    assert isinstance(report["reproduced"], bool)
    assert set(report["scenarios"]) == {"default", "paper"}
    names = {e["assumption"] for e in report["effects"]}
    assert {a[0] for a in pj.PAPER_ASSUMPTIONS} <= names
    assert all(a[2] for a in pj.PAPER_ASSUMPTIONS)
    assert report["max_steps_ratio_to_beat_adam"] > 0
    paper = report["scenarios"]["paper"]["assumptions"]
    assert paper["analog_time"] == 50.0 and paper["overlap"] and paper["inverse_every"] == 1


def test_speedup_map_shape_and_trend():
    doc = pj.speedup_map("width-kappa", Scenario(digital=H100, thermo=CHIP, eps=0.2), batch=64,
                         xs=[256, 2048, 8192], ys=[3, 300])
    assert len(doc["speedup"]) == 2 and len(doc["speedup"][0]) == 3
    assert doc["speedup"][0][2] is None  # 8192 does not fit the chip
    assert doc["speedup"][0][1] > doc["speedup"][1][1]  # better conditioned -> faster analog side
    assert all(v is None or v > 0 and math.isfinite(v) for row in doc["speedup"] for v in row)
