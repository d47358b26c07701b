"""Cost model: scaling laws, monotonicity, the error laws behind the averaging times, errors."""

from __future__ import annotations

import math

import pytest

from hw_models.cost import (
    Cost,
    KFACSchedule,
    Scenario,
    ThermoCapacityError,
    break_even_kappa,
    digital_layer_cost,
    gemm_time,
    step_cost,
    sweep,
    thermo_inverse_cost,
    thermo_layer_cost,
    thermo_solve_cost,
)
from hw_models.devices import digital_device, thermo_device
from hw_models.workloads import mlp, workload

H100 = digital_device("h100")
A100 = digital_device("a100")
CHIP = thermo_device("chip")
BIG = CHIP.replace(cells=100_000)  # room for the scaling tests


def slope(fn, n1: float, n2: float) -> float:
    """Log-log slope of ``fn`` between two sizes."""
    return math.log(fn(n2) / fn(n1)) / math.log(n2 / n1)


# ---------------------------------------------------------------- scaling laws (issue item 6)


@pytest.mark.parametrize("device", [H100, A100, digital_device("cpu")], ids=["h100", "a100", "cpu"])
@pytest.mark.parametrize("op", ["inverse", "eigh", "cholesky"])
def test_digital_inversion_is_cubic(device, op):
    s = slope(lambda n: device.op_time(op, n), 32768, 65536)
    assert 2.8 <= s <= 3.0001


def test_digital_layer_decomposition_is_cubic():
    def decomposition(n):
        return digital_layer_cost(n, n, 64, device=H100, bias=False).breakdown_s["decomposition"]

    assert 2.8 <= slope(decomposition, 32768, 65536) <= 3.0001


@pytest.mark.parametrize("kappa", [3.0, 30.0])
def test_thermodynamic_solve_scaling_at_fixed_kappa(kappa):
    """Method 2: the per-column window of the finite-time law does not grow with n (isotropic
    full-scale right-hand sides), so the analog time of a layer is linear in its columns and the
    transfer of n^2 couplings and inputs is quadratic: the layer as a whole is at most O(n^2)."""
    def layer(n):  # 16-bit converters: the static error stays far below eps
        return thermo_layer_cost(n, n, 64, kappa=kappa, eps=0.1, device=BIG, host=H100, method="solve",
                                 bias=False, bits=16)

    def analog(n):
        cost = layer(n)
        return cost.breakdown_s["burn_in"] + cost.breakdown_s["averaging"]

    assert 0.95 <= slope(analog, 1024, 4096) <= 1.1
    assert 1.9 <= slope(lambda n: layer(n).breakdown_s["transfer"], 1024, 4096) <= 2.05
    total = slope(lambda n: layer(n).seconds - layer(n).breakdown_s["factor_accumulation"], 1024, 4096)
    assert 1.0 <= total <= 2.05


def test_analog_time_grows_with_kappa_as_the_error_law_says():
    """The windows come from the finite-time law (tests/hw_models/test_error_model.py checks the law
    against simulation): a worse-conditioned factor needs more analog time for the same eps."""
    def solve(k):
        c = thermo_solve_cost(500, 1, kappa=k, eps=0.1, device=BIG, bits=16)
        return c.window_tau + c.burn_in_tau

    def inverse(k):
        return thermo_inverse_cost(500, kappa=k, eps=0.1, device=BIG, bits=16).window_tau

    assert solve(10) < solve(100) < solve(1000)
    assert inverse(10) < inverse(100) < inverse(1000)
    # the inverse's window reaches eps by the law it was chosen from
    price = thermo_inverse_cost(500, kappa=100.0, eps=0.1, device=BIG, bits=16)
    assert price.predicted_rel_error == pytest.approx(0.1, rel=0.02)


# ------------------------------------------------------------------------------------ monotonicity


BASE = dict(n_in=512, n_out=768, batch=256, kappa=20.0, eps=0.1, bits=12)


def _thermo(method="inverse", device=CHIP, host=H100, **changes):
    args = {**BASE, **changes}
    return thermo_layer_cost(args["n_in"], args["n_out"], args["batch"], kappa=args["kappa"], eps=args["eps"],
                             bits=args["bits"], device=device, host=host, method=method)


@pytest.mark.parametrize("method", ["inverse", "solve"])
@pytest.mark.parametrize("arg, values", [
    ("n_in", [64, 256, 1024, 3000]),
    ("n_out", [64, 256, 1024, 3000]),
    ("batch", [1, 32, 1024]),
    ("kappa", [1.0, 10.0, 100.0, 1e4]),
])
def test_thermo_cost_increases_with_each_argument(method, arg, values):
    costs = [_thermo(method, **{arg: v, "bits": 16}) for v in values]
    for a, b in zip(costs, costs[1:], strict=False):
        assert a.seconds < b.seconds
        assert a.joules < b.joules


@pytest.mark.parametrize("method", ["inverse", "solve"])
def test_thermo_cost_decreases_with_looser_accuracy_faster_link_more_units(method):
    eps = [_thermo(method, eps=e).seconds for e in (0.01, 0.05, 0.2, 0.5)]
    assert eps == sorted(eps, reverse=True)
    bw = [_thermo(method, device=CHIP.replace(io_bandwidth_bps=b)).seconds for b in (1e8, 1e9, 1e11)]
    assert bw == sorted(bw, reverse=True) and bw[0] > bw[-1]
    units = [_thermo(method, device=CHIP.replace(units=u)).seconds for u in (1, 2, 8)]
    assert units == sorted(units, reverse=True) and units[0] > units[-1]
    tau = [_thermo(method, device=CHIP.replace(tau_s=t)).seconds for t in (1e-8, 1e-7, 1e-6)]
    assert tau == sorted(tau)


@pytest.mark.parametrize("arg, values", [("n_in", [64, 256, 1024, 4096]), ("n_out", [64, 256, 1024, 4096]),
                                         ("batch", [1, 64, 4096])])
@pytest.mark.parametrize("method", ["eigh", "cholesky", "inverse"])
def test_digital_cost_increases_with_each_argument(arg, values, method):
    args = {**BASE}
    costs = []
    for v in values:
        args[arg] = v
        costs.append(digital_layer_cost(args["n_in"], args["n_out"], args["batch"], device=A100,
                                        schedule=KFACSchedule(digital_method=method)).seconds)
    assert costs == sorted(costs) and costs[0] < costs[-1]


def test_periodic_work_is_amortized():
    every = [digital_layer_cost(1024, 1024, 64, device=H100, schedule=KFACSchedule(inverse_every=k))
             for k in (1, 10, 100)]
    decomposition = [c.breakdown_s["decomposition"] for c in every]
    assert decomposition[0] == pytest.approx(10 * decomposition[1]) == pytest.approx(100 * decomposition[2])
    assert every[0].seconds > every[1].seconds > every[2].seconds


def test_cost_breakdown_adds_up():
    for cost in (_thermo("inverse"), _thermo("solve"), digital_layer_cost(300, 200, 10, device=H100)):
        assert isinstance(cost, Cost)
        assert cost.seconds == pytest.approx(sum(cost.breakdown_s.values()))
        assert cost.joules == pytest.approx(sum(cost.breakdown_j.values()))
        assert all(v >= 0 for v in cost.breakdown_s.values())
    solve = _thermo("solve")
    assert {"transfer", "programming", "burn_in", "averaging", "readout"} <= set(solve.breakdown_s)


def test_best_method_is_the_cheaper_one():
    best = _thermo("best")
    assert best.seconds == min(_thermo("inverse").seconds, _thermo("solve").seconds)


def test_resident_couplings_save_transfer_and_programming():
    args = dict(kappa=2.0, eps=0.5, device=CHIP, host=H100, method="solve")
    fresh = thermo_layer_cost(1000, 1000, 8, **args)
    kept = thermo_layer_cost(1000, 1000, 8, resident=True, **args)
    assert kept.breakdown_s["transfer"] < fresh.breakdown_s["transfer"]
    assert kept.breakdown_s["programming"] < fresh.breakdown_s["programming"]
    assert kept.breakdown_s["averaging"] == pytest.approx(fresh.breakdown_s["averaging"])


def test_board_without_accumulators_streams_samples_to_the_host():
    board = thermo_device("board")
    cost = thermo_inverse_cost(20, kappa=10.0, eps=0.1, device=board, host=H100)
    onchip = thermo_inverse_cost(20, kappa=10.0, eps=0.1, device=board.replace(onchip_accumulators=True))
    assert cost.breakdown_s["readout"] > onchip.breakdown_s["readout"]
    with pytest.raises(ValueError, match="host="):
        thermo_inverse_cost(20, kappa=10.0, eps=0.1, device=board)


def test_quantization_error_floor():
    coarse = thermo_solve_cost(1000, 1, kappa=100.0, eps=0.1, device=BIG, bits=6)
    fine = thermo_solve_cost(1000, 1, kappa=100.0, eps=0.1, device=BIG, bits=16)
    assert fine.info["error_floor"] < coarse.info["error_floor"]
    assert fine.info["reachable"] and not coarse.info["reachable"]


# ------------------------------------------------------------------------------ capacity policy


def test_oversize_refused_or_blocked():
    small = CHIP.replace(cells=256)
    with pytest.raises(ThermoCapacityError) as err:
        thermo_inverse_cost(1000, kappa=10.0, eps=0.1, device=small)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "n=1000" in message and "256 cells" in message and "oversize='block'" in message
    blocked = thermo_inverse_cost(1000, kappa=10.0, eps=0.1, device=small.replace(oversize="block"))
    assert blocked.info["approximate"] and blocked.info["blocks"] == 4 and blocked.info["block_size"] == 250
    fits = thermo_inverse_cost(256, kappa=10.0, eps=0.1, device=small)
    assert not fits.info["approximate"] and fits.info["blocks"] == 1


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, text", [
    (dict(n_in=-5), "n_in=-5"),
    (dict(n_out=0), "n_out=0"),
    (dict(batch=-1), "batch=-1"),
    (dict(kappa=0.5), "kappa=0.5"),
    (dict(eps=0.0), "eps=0.0"),
    (dict(eps=1.5), "eps=1.5"),
    (dict(bits=0), "bits=0"),
])
def test_bad_layer_arguments_raise_clear_errors(kwargs, text):
    with pytest.raises(ValueError) as err:
        _thermo("inverse", **kwargs)
    assert text in str(err.value)


def test_unknown_methods_list_choices():
    with pytest.raises(ValueError, match="'inverse', 'solve', 'best'"):
        _thermo("magic")
    with pytest.raises(ValueError, match="'eigh', 'cholesky', 'inverse'"):
        KFACSchedule(digital_method="qr")
    with pytest.raises(ValueError, match="inverse_every=0"):
        KFACSchedule(inverse_every=0)
    with pytest.raises(ValueError, match="m=0"):
        gemm_time(0, 3, 3, H100)


# ---------------------------------------------------------------------------------- whole steps


def test_step_cost_relations():
    scenario = Scenario(digital=H100, thermo=CHIP, kappa=10.0, eps=0.1)
    step = step_cost(workload("mnist-ae"), scenario)
    s = step.summary()
    assert s["adam_s"] < s["digital_kfac_s"]
    assert s["thermo_kfac_s"] <= s["digital_kfac_s"] + 1e-15  # hybrid never loses
    assert s["thermo_kfac_s"] <= s["thermo_only_kfac_s"] + 1e-15
    assert s["speedup_vs_digital_kfac"] == pytest.approx(s["digital_kfac_s"] / s["thermo_kfac_s"])
    extra = sum(min(layer.digital.seconds, layer.thermo.seconds) for layer in step.layers)
    assert s["thermo_kfac_s"] == pytest.approx(s["adam_s"] + extra)
    assert s["layers"] == 8
    for layer in step.layers:
        assert layer.cheaper == ("thermo" if layer.thermo.seconds < layer.digital.seconds else "digital")


def test_layers_too_big_stay_digital():
    scenario = Scenario(digital=H100, thermo=CHIP.replace(cells=600))
    step = step_cost(mlp("wide", (500, 1000, 10), batch=32), scenario)
    too_big = [layer for layer in step.layers if layer.thermo is None]
    assert [layer.name for layer in too_big] == ["fc0", "fc1"]  # G of fc0 and A of fc1 are 1000 / 1001
    assert all(layer.cheaper == "digital" for layer in too_big)
    assert step.summary()["layers_not_fitting"] == 2


def test_break_even_kappa_separates_winning_and_losing():
    scenario = Scenario(digital=A100, thermo=CHIP, eps=0.2)
    work = mlp("mlp", (2048, 2048, 2048), batch=64)
    kappa = break_even_kappa(work, scenario)
    assert kappa is not None and 1.0 < kappa < 1e8
    below = step_cost(work, scenario.replace(kappa=kappa / 1.5))
    above = step_cost(work, scenario.replace(kappa=kappa * 1.5))
    assert below.thermo_only_kfac_s < below.digital_kfac_s
    assert above.thermo_only_kfac_s > above.digital_kfac_s


def test_speedup_grows_with_width():
    scenario = Scenario(digital=H100, thermo=BIG, kappa=10.0, eps=0.1, method="inverse")
    points = sweep("width", [256, 1024, 4096, 16384], scenario, batch=64)
    speedups = [p["speedup"] for p in points]
    # digital eigh is O(n^3); the sampling inverse's window grows like n (error ~ sqrt(n kappa / T))
    assert speedups[-1] > 1.0 and speedups[-1] > 3 * max(speedups[:-1])
    for p in points:
        assert set(p) >= {"x", "digital_s", "thermo_s", "speedup"}


def test_sweeps_of_each_axis():
    scenario = Scenario(digital=H100, thermo=CHIP)
    work = workload("mnist-ae")
    kappa = sweep("kappa", [1, 10, 100], scenario, workload=work)
    assert [p["speedup"] for p in kappa] == sorted((p["speedup"] for p in kappa), reverse=True)
    bits = sweep("bits", [4, 8, 16], scenario, workload=work)
    # coarse converters raise the static error, so the law needs longer windows (eps unreachable)
    assert bits[-1]["thermo_s"] < bits[0]["thermo_s"]
    bandwidth = sweep("bandwidth", [1e8, 1e10, 1e12], scenario, workload=work)
    assert [p["thermo_s"] for p in bandwidth] == sorted((p["thermo_s"] for p in bandwidth), reverse=True)
    too_wide = sweep("width", [8192], scenario)
    assert too_wide[0]["thermo_s"] is None and too_wide[0]["speedup"] is None
    with pytest.raises(ValueError, match="'width', 'kappa', 'bits', 'bandwidth'"):
        sweep("depth", [1], scenario)
    with pytest.raises(ValueError, match="bandwidth=0"):
        sweep("bandwidth", [0], scenario, workload=work)


def test_scenario_validation():
    with pytest.raises(ValueError, match="must be a ThermoDevice"):
        Scenario(digital=H100, thermo="chip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nongemm_factor=0.5"):
        Scenario(digital=H100, thermo=CHIP, nongemm_factor=0.5)
