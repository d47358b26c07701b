"""Cost model: scaling laws, monotonicity, the error laws behind the averaging times, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hw_models.cost import (
    Cost,
    KFACSchedule,
    Scenario,
    ThermoCapacityError,
    break_even_kappa,
    digital_layer_cost,
    gemm_time,
    inverse_averaging_time_tau,
    settling_time_tau,
    solve_averaging_time_tau,
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
def test_thermodynamic_solve_is_quadratic_at_fixed_kappa(kappa):
    def layer_solve(n):  # method 2: two solves with n right-hand sides each
        cost = thermo_layer_cost(n, n, 64, kappa=kappa, eps=0.1, device=BIG, host=H100, method="solve",
                                 bias=False)
        return cost.seconds - cost.breakdown_s["factor_accumulation"]

    assert 1.9 <= slope(layer_solve, 1024, 4096) <= 2.05
    def matrix_rhs(n):
        return thermo_solve_cost(n, n, kappa=kappa, eps=0.1, device=BIG).seconds

    assert 1.9 <= slope(matrix_rhs, 1024, 4096) <= 2.05


def test_solve_is_kappa_squared_and_inverse_kappa_linear():
    def solve(k):
        return thermo_solve_cost(2000, 2000, kappa=k, eps=0.1, device=BIG).breakdown_s["averaging"]

    def inverse(k):
        return thermo_inverse_cost(2000, kappa=k, eps=0.1, device=BIG).breakdown_s["averaging"]

    assert slope(solve, 10, 100) == pytest.approx(2.0, abs=1e-9)
    assert slope(inverse, 10, 100) == pytest.approx(1.0, abs=1e-9)


def test_averaging_laws_from_thermo_md():
    # 2.1 [D]: solve t ~ 2 tr(A^-2)/(beta eps^2) <= 2 n kappa^2 kappa0 / eps^2, inverse t ~ (n+1) kappa/eps^2
    assert solve_averaging_time_tau(100, 10.0, 0.1, kappa0=0.5) == pytest.approx(100 * 10.0**2 / 0.1**2)
    assert inverse_averaging_time_tau(100, 10.0, 0.1) == pytest.approx(101 * 10.0 / 0.01)
    assert settling_time_tau(10.0, math.exp(-2)) == pytest.approx(20.0)


# ------------------------------------------------- the error laws, checked by simulating the OU process


def _ou_exact_step(eigvals: np.ndarray, dt: float):
    decay = np.exp(-eigvals * dt)
    return decay, np.sqrt((1.0 - decay**2) / eigvals)


def test_solve_error_law_holds_for_the_ou_process():
    """Time-averaged OU mean (beta = 1/kappa0, x* of unit norm): relative error close to eps."""
    rng = np.random.default_rng(0)
    n, kappa, eps, kappa0 = 4, 5.0, 0.3, 0.5
    # tight case of tr(A^-2) <= n kappa^2: all eigenvalues at 1/kappa but one at 1 (lambda_max = 1)
    lam = np.array([1.0] + [1.0 / kappa] * (n - 1))
    x_star = np.ones(n) / math.sqrt(n)
    t_avg = solve_averaging_time_tau(n, kappa, eps, kappa0)
    dt = 0.05
    steps = int(t_avg / dt)
    decay, spread = _ou_exact_step(lam, dt)
    trials = 400
    x = np.tile(x_star, (trials, 1))  # start in equilibrium: this checks the averaging term only
    x = x + np.sqrt(kappa0 / lam) * rng.standard_normal((trials, n))
    total = np.zeros_like(x)
    for _ in range(steps):  # eigenbasis of A (diagonal): exact transitions, noise variance kappa0/lam
        x = x_star + decay * (x - x_star) + math.sqrt(kappa0) * spread * rng.standard_normal((trials, n))
        total += x
    rms_error = math.sqrt(np.mean(np.sum((total / steps - x_star) ** 2, axis=1)))
    assert 0.7 * eps <= rms_error <= 1.15 * eps


def test_inverse_error_law_holds_for_the_ou_process():
    """Sample covariance over (n+1) kappa / eps^2 tau: relative Frobenius error at most about eps."""
    rng = np.random.default_rng(1)
    n, kappa, eps = 4, 10.0, 0.3
    lam = np.array([1.0] + [1.0 / kappa] * (n - 1))  # the slow modes dominate the error
    sigma = np.diag(1.0 / lam)  # beta = 1: covariance A^-1
    t_avg = inverse_averaging_time_tau(n, kappa, eps)
    dt = 0.1
    steps = int(t_avg / dt)
    decay, spread = _ou_exact_step(lam, dt)
    trials = 300
    x = rng.standard_normal((trials, n)) / np.sqrt(lam)
    acc = np.zeros((trials, n, n))
    for _ in range(steps):
        x = decay * x + spread * rng.standard_normal((trials, n))
        acc += x[:, :, None] * x[:, None, :]
    err = np.linalg.norm(acc / steps - sigma, axis=(1, 2)) / np.linalg.norm(sigma)
    rms = math.sqrt(np.mean(err**2))
    assert 0.4 * eps <= rms <= 1.1 * eps


def test_settling_removes_a_cold_start_to_eps():
    kappa, eps = 50.0, 0.01
    t0 = settling_time_tau(kappa, eps)
    lam_min = 1.0 / kappa
    assert math.exp(-lam_min * t0) == pytest.approx(eps)


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
    ("bits", [4, 8, 12, 16]),
])
def test_thermo_cost_increases_with_each_argument(method, arg, values):
    costs = [_thermo(method, **{arg: v}) for v in values]
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
    assert {"transfer", "programming", "settling", "averaging", "readout"} <= set(solve.breakdown_s)


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
    assert speedups == sorted(speedups) and speedups[-1] > 10 * speedups[0]
    for p in points:
        assert set(p) >= {"x", "digital_s", "thermo_s", "speedup"}


def test_sweeps_of_each_axis():
    scenario = Scenario(digital=H100, thermo=CHIP)
    work = workload("mnist-ae")
    kappa = sweep("kappa", [1, 10, 100], scenario, workload=work)
    assert [p["speedup"] for p in kappa] == sorted((p["speedup"] for p in kappa), reverse=True)
    bits = sweep("bits", [4, 8, 16], scenario, workload=work)
    assert [p["thermo_s"] for p in bits] == sorted(p["thermo_s"] for p in bits)
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
