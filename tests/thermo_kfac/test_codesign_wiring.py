"""Issue 14 phase 2: every hardware price goes through hw_models.pricing; the trace; overlap; auto."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from hw_models import pricing
from hw_models.devices import digital_device, thermo_device
from hw_models.projection import load_trace, price_trace
from thermo_kfac import KFACPreconditioner
from thermo_kfac.layer_pricing import AutoSolver, price_layer
from thermo_kfac.policy import format_assignment
from thermo_kfac.solvers.base import Damping
from thermo_kfac.solvers.digital import EighSolver
from thermo_kfac.solvers.thermodynamic import ThermodynamicSolver
from thermo_kfac.trace import TRACE_FORMAT, TraceRecorder


def _spd(n: int, kappa: float, seed: int) -> torch.Tensor:
    """A random SPD matrix with eigenvalues log-spaced in [1/kappa, 1]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -np.log10(kappa), n, dtype=torch.float64)
    return (Q * lam) @ Q.T


def _factors(seed: int = 0, n_a: int = 24, n_g: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xa = torch.randn(200, n_a, generator=g, dtype=torch.float64)
    xg = torch.randn(200, n_g, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, n_g,
                                                                                  dtype=torch.float64)
    return xa.T @ xa / 200, xg.T @ xg / 200


# ------------------------------------------------------------------ the solver's own report
def test_thermo_report_is_the_pricing_api_on_the_programmed_spectrum():
    A, G = _factors()
    solver = ThermodynamicSolver(device="chip", host="h100", ideal=True, analog_time=50.0)  # priced as ideal
    solver.prepare(A, G, Damping(1e-2))
    chip, h100 = thermo_device("chip").ideal(), digital_device("h100")  # exact converters: 32-bit words
    assert solver.device == chip
    host = sum(pricing.gemm_time(n, n, solver.power_iterations, h100) for n in (24, 16))
    program = sum(pricing.price_program(n, chip, oversize="block").seconds for n in (24, 16))
    assert solver.last_report.hardware_time_s == pytest.approx(host + program, rel=1e-12)
    grad = torch.randn(16, 24, dtype=torch.float64)
    solver.apply(grad)
    # independent reference: the spectrum of the programmed matrix by eigvalsh, the solver's window
    device = chip
    solves = 0.0
    for key, n, m in (("G", 16, 24), ("A", 24, 16)):
        spectrum = pricing.SpectrumSummary.from_matrix(solver.factors[key].P)
        job = pricing.AnalogJob("solve", n, m, spectrum=spectrum, window_tau=50.0, burn_in_tau=10.0,
                                start="previous", resident=True, oversize="block",
                                input_scale=solver.factors[key].scale)
        solves += pricing.price(job, device).seconds
    host = pricing.gemm_time(16, 16, 2 * 24 / 16, h100) + pricing.gemm_time(24, 24, 2 * 16 / 24, h100)
    assert solver.last_report.hardware_time_s == pytest.approx(host + solves, rel=1e-9)
    spectra = solver.last_report.info["pricing"]["spectra"]
    exact = torch.linalg.eigvalsh(0.5 * (A + A.T) + 0.1 * torch.eye(24, dtype=A.dtype))
    assert spectra["A"]["kappa"] == pytest.approx(float(exact[-1] / exact[0]), rel=1e-6)


@pytest.mark.parametrize("warm_start", ["previous", "gradient", "zero"])
def test_per_call_law_matches_the_measured_error(warm_start):
    """The law with the call's actual right-hand sides predicts rel_error_to_exact (median 0.7-1.4)."""
    A, G = _factors(1)
    solver = ThermodynamicSolver(track_exact=True, warm_start=warm_start)
    solver.prepare(A, G, Damping(1e-2))
    ratios = []
    g = torch.Generator().manual_seed(3)
    for _ in range(15):
        solver.apply(torch.randn(16, 24, generator=g, dtype=torch.float64))
        info = solver.last_report.info
        assert [s["prediction"] for s in info["pricing"]["solves"]] == ["actual_rhs"] * 2
        ratios.append(info["pricing"]["predicted_rel_error"] / info["rel_error_to_exact"])
    assert 0.7 <= statistics.median(ratios) <= 1.4, ratios


def test_one_pricing_call_per_solve_and_prepare():
    A, G = _factors(2)
    solver = ThermodynamicSolver()
    pricing.reset_pricing_calls()
    solver.prepare(A, G, Damping(1e-2))
    reloaded = set()  # factors whose warm start re-sent values through the DAC (a reload job)
    for _ in range(5):
        solver.apply(torch.randn(16, 24, dtype=torch.float64))
        reloaded |= {i for i, v in enumerate(solver.last_report.info["reloaded_values"]) if v}
    calls = pricing.pricing_calls()
    # two factors programmed, the law's window for each at prepare (deflate/analog_time "auto"),
    # two solves (and each reload job) priced once per prepare: the same jobs every apply
    assert calls == {"price_program": 2, "price": 2 + 2 + len(reloaded)}


# ------------------------------------------------------------------------------ overlap
def test_overlap_applies_the_previous_steps_solve():
    A, G = _factors(4)
    damping = Damping(1e-2)
    # a near-exact device (tiny noise, long window) so the solve itself is ~exact
    opts = dict(analog_time=2e4, burn_in=2e3, kappa0=1e-12, warm_start="zero", track_exact=True,
                ideal=True)
    solver = ThermodynamicSolver(overlap=True, **opts)
    solver.prepare(A, G, damping)
    lam_a, lam_g = damping.split(A, G)
    Ma, Mg = A + lam_a * torch.eye(24, dtype=A.dtype), G + lam_g * torch.eye(16, dtype=A.dtype)

    def exact(grad):
        return torch.linalg.solve(Mg, grad) @ torch.linalg.inv(Ma)

    grads = [torch.randn(16, 24, dtype=torch.float64) for _ in range(3)]
    first = solver.apply(grads[0])
    assert solver.last_report.info["staleness_steps"] == 0  # nothing earlier: its own solve
    assert torch.allclose(first, exact(grads[0]), rtol=1e-3, atol=1e-6)
    for t in (1, 2):
        out = solver.apply(grads[t])
        info = solver.last_report.info
        assert info["staleness_steps"] == 1
        # step t uses the solve of step t-1, not its own
        assert torch.allclose(out, exact(grads[t - 1]), rtol=1e-3, atol=1e-6)
        assert not torch.allclose(out, exact(grads[t]), rtol=1e-1)
        # track_exact measures the staleness cost against the CURRENT gradient's exact solve
        measured = float((out - exact(grads[t])).norm() / exact(grads[t]).norm())
        assert info["rel_error_to_exact"] == pytest.approx(measured, rel=1e-6)
    with pytest.raises(ValueError, match="overlap"):
        ThermodynamicSolver(method="inverse", overlap=True)


# --------------------------------------------------------------------------------- auto
def test_auto_switches_with_hysteresis_on_measured_spectra():
    chip = thermo_device("chip")
    slow = chip.replace(tau_s=16 * chip.tau_s)  # a kappa-100 layer costs more than eigh here
    h100 = digital_device("h100")
    # the premise below holds for this device (the solver's own device object is what is priced)
    opts = dict(ideal=True, kappa0=1e-2, device=slow)
    settings = ThermodynamicSolver(**opts).pricing_settings()
    assert settings["thermo_device"] == slow.ideal().replace(kappa0=1e-2)
    spec = pricing.SpectrumSummary.from_kappa
    cheap = price_layer(settings, "eigh", 16, 16, hardware=slow, digital=h100, accuracy="eps",
                        spectra={"A": spec(16, 2.0), "G": spec(16, 2.0)})
    dear = price_layer(settings, "eigh", 16, 16, hardware=slow, digital=h100, accuracy="eps",
                       spectra={"A": spec(16, 100.0), "G": spec(16, 100.0)})
    assert cheap[0] < 0.8 * cheap[1] and dear[1] < 0.8 * dear[0]  # the premise of the test
    auto = AutoSolver(ThermodynamicSolver(**opts), EighSolver(), hardware=slow, host=h100, n_a=16, n_g=16,
                      initial="analog", margin=0.2, patience=2)
    damping = Damping(0.0)
    well, ill = _spd(16, 2.0, 0), _spd(16, 100.0, 1)
    choices = []
    for A in (well, ill, ill, ill, well, well):
        auto.prepare(A, A, damping)
        choices.append(auto.choice)
        assert auto.decision["kappa"][0] == pytest.approx(float(np.linalg.cond(A.numpy())), rel=1e-6)
        assert auto.analog == (auto.choice == "analog")
        assert auto.last_report.info["auto"]["choice"] == auto.choice
    # switches only after two consecutive updates where the other side is cheaper by 20 %
    assert choices == ["analog", "analog", "digital", "digital", "digital", "analog"]
    assert auto.switches == 2
    out = auto.apply(torch.randn(16, 16, dtype=torch.float64))
    assert out.shape == (16, 16) and auto.ready
    state = auto.state_dict()
    clone = AutoSolver(ThermodynamicSolver(**opts), EighSolver(), hardware=slow, host=h100, n_a=16, n_g=16,
                       initial="digital")
    clone.load_state_dict(state)
    assert clone.choice == "analog" and clone.ready


def test_auto_layers_show_measured_kappa_and_times_in_the_table():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    precond = KFACPreconditioner(model, solver="auto", inverse_update_every=2)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(3):
        model.zero_grad()
        out = model(x)
        precond.accumulate_curvature(out)
        nn.functional.cross_entropy(out, y).backward()
        precond.step()
    solvers = {name: s.solver for name, s in precond.layer_table.items()}
    assert all(isinstance(s, AutoSolver) and s.decision for s in solvers.values())
    table = format_assignment(precond.assignment_details(), solvers)
    assert "kappa A" in table and "analog" in table and "digital" in table


# -------------------------------------------------------------------------------- trace
def _mlp_run(solver: str, steps: int, inverse_every: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 4))
    precond = KFACPreconditioner(model, solver=solver, inverse_update_every=inverse_every,
                                 factor_update_every=1)
    recorder = TraceRecorder(precond, run={"model": "test"})
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(64, 10, generator=g), torch.randint(0, 4, (64,), generator=g)
        model.zero_grad()
        out = model(x)
        precond.accumulate_curvature(out)
        nn.functional.cross_entropy(out, y).backward()
        precond.step()
        recorder.observe()
    return precond, recorder.to_dict()


def test_trace_records_spectra_solves_and_prices_by_project(tmp_path):
    precond, trace = _mlp_run("thermo:track_exact=true", steps=7)
    assert trace["format"] == TRACE_FORMAT and trace["steps"] == 7 and trace["inverse_every"] == 3
    updates = trace["updates"]
    assert [(u["step"], u["layer"]) for u in updates] == [(s, n) for s in (0, 3, 6) for n in ("0", "2")]
    assert [u["steps_until_next"] for u in updates] == [3, 3, 3, 3, 1, 1]
    last = updates[-1]
    state = precond.layer_table[last["layer"]]
    lam_a, _ = precond.damping.split(state.A, state.G)
    exact = torch.linalg.eigvalsh(state.A.double() + lam_a * torch.eye(state.A.shape[0], dtype=torch.float64))
    # the programmed matrix carries the preset's coupling quantization and mismatch (a few 1e-3)
    assert last["factors"]["A"]["kappa"] == pytest.approx(float(exact[-1] / exact[0]), rel=2e-2)
    assert last["factor_sizes"] == [13, 4]
    for u in updates:
        assert {s["factor"] for s in u["solves"]} == {"A", "G"}
        assert all(s["calls"] == u["steps_until_next"] for s in u["solves"])
        assert u["rel_error_to_exact"] > 0 and u["predicted_rel_error"] > 0
        assert 0.5 < u["predicted_over_exact"] < 2.0
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    doc = price_trace(load_trace(path), thermo="chip", digital="h100")
    assert [r["name"] for r in doc["layers"]] == ["0", "2"]
    assert all(r["thermo_s"] > 0 and r["run_predicted_rel_error"] > 0 for r in doc["layers"])


def test_trace_of_a_digital_run_measures_the_damped_spectra():
    precond, trace = _mlp_run("eigh", steps=4, inverse_every=2)
    assert len(trace["updates"]) == 4 and all(u["solves"] == [] for u in trace["updates"])
    u = trace["updates"][-1]
    state = precond.layer_table[u["layer"]]
    _, lam_g = precond.damping.split(state.A, state.G)
    exact = torch.linalg.eigvalsh(state.G.double() + lam_g * torch.eye(state.G.shape[0], dtype=torch.float64))
    assert u["factors"]["G"]["lambda_min"] == pytest.approx(float(exact[0]), rel=1e-6)


def test_predicted_hybrid_time_is_the_solvers_reported_times_plus_the_factor_statistics():
    """The hybrid machine's analog layers cost exactly what their solvers reported, plus the factor
    statistics (two GEMMs per factor, the same on the all-digital machine)."""
    _, trace = _mlp_run("thermo", steps=6)
    totals = trace["totals"]
    h100 = digital_device("h100")
    statistics_s = sum(pricing.gemm_time(n, 64, n, h100) for n in (11, 12, 13, 4))
    assert totals["predicted_hybrid_s_per_step"] == pytest.approx(
        totals["solver_hardware_s_per_step"] + statistics_s, rel=0.02)  # prepare amortized vs actual


def test_digits_run_writes_a_trace_whose_hybrid_time_is_the_solver_times(tmp_path):
    """Done-criterion on the digits MLP: predicted hybrid per step = the solvers' per-call hardware
    times per step within 5 %; the run's trace.json is priced by project."""
    from thermo_kfac.experiments.training import compare

    results = compare("digits", "mlp", ["kfac:solver=thermo"], steps=8, out=tmp_path)
    run = results["runs"][0]
    trace = load_trace(tmp_path / "trace.json")
    assert trace["steps"] == 8
    assert run["predicted_hybrid_s"] == pytest.approx(trace["totals"]["solver_hardware_s_per_step"],
                                                      rel=0.05)
    assert run["predicted_hybrid_s"] == pytest.approx(trace["totals"]["predicted_hybrid_s_per_step"],
                                                      rel=1e-9)
    doc = price_trace(trace, thermo="chip", digital="h100")
    assert len(doc["layers"]) == len(run["layers"]) and doc["step"]["thermo_kfac_solver_s"] > 0


def test_overlap_option_trains_through_the_preconditioner():
    """``kfac:solver=thermo,overlap=true``: every step after the first uses the previous one's solve."""
    precond, trace = _mlp_run("thermo:overlap=true,track_exact=true", steps=4)
    for state in precond.layer_table.values():
        assert state.solver.overlap and state.solver.last_report.info["staleness_steps"] == 1
    assert trace["updates"][0]["settings"]["overlap"] is True
    assert all(u["rel_error_to_exact"] > 0 for u in trace["updates"])


def test_default_solver_is_priced_as_simulated_and_charges_its_reloads():
    """Merged issues 14 and 15: the priced device is the simulated preset (its kappa0 and coupling
    bits), and a warm start's re-sent values (``reloaded_values``) are charged as DAC transfers
    (the previous-solution start; the default under the law's window is a zero start)."""
    A, G = _factors(3)
    solver = ThermodynamicSolver(warm_start="previous")
    chip = thermo_device("chip")
    settings = solver.pricing_settings()
    assert settings["kappa0"] == chip.kappa0 and settings["thermo_device"] == chip
    assert settings["ideal"] is False
    solver.prepare(A, G, Damping(1e-2))
    reloads = []
    for _ in range(4):
        solver.apply(torch.randn(16, 24, dtype=torch.float64))
        info = solver.last_report.info
        reloads.append((sum(info["reloaded_values"]), info["hardware_breakdown_s"].get("reload", 0.0)))
    assert any(values > 0 for values, _ in reloads), "the premise: some call re-sends values"
    for values, seconds in reloads:
        # each re-sent value crosses the link once more at the simulated DAC width (independent
        # formula; the DAC is the input converter, 12 bits on the chip, not the 10-bit couplings)
        assert seconds == pytest.approx(values * chip.noise.input_bits / chip.io_bandwidth_bps, rel=1e-9)


def test_auto_warm_start_is_zero_under_the_law_window_and_previous_under_a_fixed_one():
    """``warm_start="auto"`` (the default): a zero start when the window comes from the law (the
    law prices that start exactly; nothing is re-sent), the previous solution under a fixed window;
    the priced start is the simulated one."""
    A, G = _factors(3)
    auto = ThermodynamicSolver()
    fixed = ThermodynamicSolver(analog_time=20.0)
    assert (auto.warm_start, fixed.warm_start) == ("zero", "previous")
    assert auto.pricing_settings()["start"] == "zero" and fixed.pricing_settings()["start"] == "previous"
    for solver in (auto, fixed):
        solver.prepare(A, G, Damping(1e-2))
        for _ in range(3):
            solver.apply(torch.randn(16, 24, dtype=torch.float64))
    assert sum(auto.last_report.info["reloaded_values"]) == 0
    assert "reload" not in auto.last_report.info["hardware_breakdown_s"]
    assert sum(fixed.last_report.info["reloaded_values"]) > 0
    with pytest.raises(ValueError, match="'hot'"):
        ThermodynamicSolver(warm_start="hot")
