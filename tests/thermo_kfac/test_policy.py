"""Per-layer solver policy: rules, size rule, auto by cost model, errors, state, predicted times."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from hw_models.cost import KFACSchedule, ThermoCapacityError, digital_layer_cost, thermo_layer_cost
from hw_models.devices import digital_device, thermo_device
from thermo_kfac import KFACPreconditioner
from thermo_kfac.grammar import parse_solver_map
from thermo_kfac.policy import SolverPolicy, SolverSpec, format_assignment
from thermo_kfac.solvers import EighSolver, KFACSolver, register_solver

FAST_THERMO = "thermo:method=inverse,integrator=analytic,analog_time=200"  # factors inverted in prepare


class _Net(nn.Module):
    def __init__(self, widths=(6, 8, 40, 5)) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)  # A: 1*3*3 + 1 = 10, G: 2
        self.fc1 = nn.Linear(2 * 4 * 4, widths[1])
        self.fc2 = nn.Linear(widths[1], widths[2])
        self.head = nn.Linear(widths[2], widths[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def _batch(seed: int = 0, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def _train(precond: KFACPreconditioner, model: nn.Module, steps: int) -> list[dict]:
    reports = []
    for i in range(steps):
        x, y = _batch(i)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        reports.append(dict(precond.last_report))
    return reports


def test_rules_match_name_or_type_first_match_wins_and_default_covers_the_rest():
    torch.manual_seed(0)
    model = _Net()
    precond = KFACPreconditioner(model, solver="cholesky", solver_map={
        "Conv2d": "eigh",            # type name, matched in full
        r"fc\d": FAST_THERMO,        # regex searched in the name
        "fc2": "eigh",               # never reached: fc2 already matched the rule above
    })
    assert precond.assignment() == {"conv": "eigh", "fc1": "thermo", "fc2": "thermo", "head": "cholesky"}
    details = {a.layer: a for a in precond.assignment_details()}
    assert details["fc2"].reason == r"rule 'fc\\d'" and details["head"].reason == "default"
    assert details["conv"].factor_sizes == (10, 2) and details["fc1"].factor_sizes == (33, 8)
    assert type(precond.layer_table["fc1"].solver).__name__ == "ThermodynamicSolver"
    assert isinstance(precond.layer_table["conv"].solver, EighSolver)
    # "Linear" as a type matches every linear layer in full, but not a layer merely named like it
    policy = SolverPolicy(rules={"Line": "cholesky"})
    assert policy.match("fc1", "Linear") is None and policy.match("Linear_1", "Conv2d") is not None
    table = format_assignment(precond.assignment_details())
    assert "fc1" in table and FAST_THERMO in table


def test_size_rule_sends_layers_that_fit_the_device_to_the_analog_solver():
    cells = thermo_device("board").cells
    model = _Net(widths=(6, 8, 40, 5))
    precond = KFACPreconditioner(model, solver="fits", solver_options={"integrator": "analytic"},
                                 solver_map=SolverPolicy(hardware="board"))
    for a in precond.assignment_details():
        expect = "thermo" if max(a.factor_sizes) <= cells else "eigh"
        assert a.solver == expect, a
    # the board has 32 cells: conv (10, 2) and fc1 (33, 8)? 33 > 32 stays digital; head (41, 5) too
    assert precond.assignment() == {"conv": "thermo", "fc1": "eigh", "fc2": "eigh", "head": "eigh"}
    # the analog solver got the rule's options and prices on the policy's presets
    solver = precond.layer_table["conv"].solver
    assert solver.config.integrator == "analytic" and solver.device.name == "board"


def test_auto_agrees_with_the_cost_model_numbers():
    schedule = KFACSchedule(factor_every=1, inverse_every=10)
    kappa, eps = 10.0, 0.1
    model = _Net(widths=(6, 8, 600, 5))
    # method "inverse": its sampling window grows like n kappa / eps^2 (the error law), so the
    # 6->8 layer goes analog and the 600-wide factors stay digital: both outcomes are exercised
    policy = SolverPolicy(kappa=kappa, eps=eps, hardware="chip", digital="h100",
                          analog="thermo:method=inverse")
    precond = KFACPreconditioner(model, solver="auto", inverse_update_every=10, solver_map=policy)
    chip, h100 = thermo_device("chip"), digital_device("h100")
    picks = {}
    for a in precond.assignment_details():
        n_a, n_g = a.factor_sizes
        digital = digital_layer_cost(n_a - 1, n_g, 1, device=h100, schedule=schedule).seconds
        try:
            thermo = thermo_layer_cost(n_a - 1, n_g, 1, kappa=kappa, eps=eps, device=chip, host=h100,
                                       method="inverse", schedule=schedule).seconds
        except ThermoCapacityError:
            thermo = float("inf")
        picks[a.layer] = "thermo" if thermo < digital else "eigh"
    assert precond.assignment() == picks
    assert set(picks.values()) == {"thermo", "eigh"}  # the case exercises both outcomes
    # a device too small for every factor keeps everything digital
    tiny = KFACPreconditioner(_Net(), solver="auto", solver_map=SolverPolicy(hardware=chip.replace(cells=1)))
    assert set(tiny.assignment().values()) == {"eigh"}


@pytest.mark.parametrize("kwargs, names", [
    ({"solver": "thermoo"}, ["'thermoo'", "auto", "fits", "eigh"]),
    ({"solver_map": {"fc1": "thermo:bitz=8"}}, ["bitz"]),
    ({"solver_map": {"fc1": "thermo:bits"}}, ["'bits'", "key=value"]),
    ({"solver_map": {"fc(": "eigh"}}, ["'fc('", "regular expression"]),
    ({"solver_map": {"fc1": "nosuch"}}, ["'nosuch'"]),
    ({"solver": "auto", "solver_options": {"bitz": 8}}, ["bitz"]),
    ({"solver_map": "fc1"}, ["'fc1'", "pattern=spec"]),
    ({"solver_map": {"fc1": 3}}, ["3"]),
])
def test_bad_specs_raise_value_errors_naming_the_value(kwargs, names):
    with pytest.raises(ValueError) as info:
        KFACPreconditioner(_Net(), **kwargs)
    for name in names:
        assert name in str(info.value)


def test_bad_policy_presets_name_the_value():
    with pytest.raises(ValueError, match="'chipp'"):
        SolverPolicy(hardware="chipp")
    with pytest.raises(ValueError, match="'h200'"):
        SolverPolicy(digital="h200")
    with pytest.raises(ValueError, match="'auto'"):
        SolverPolicy(analog="auto")


def test_solver_map_text_and_json_file(tmp_path):
    assert parse_solver_map("fc1=thermo:bits=8,analog_time=20; .*=eigh") == [
        ("fc1", "thermo:bits=8,analog_time=20"), (".*", "eigh")]
    spec = SolverSpec.parse("thermo:bits=8,analog_time=20,integrator=analytic")
    assert spec.name == "thermo" and spec.options == {"bits": 8, "analog_time": 20, "integrator": "analytic"}
    assert SolverSpec.parse({"solver": "thermo", "bits": 8}).options == {"bits": 8}
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"conv": "eigh", "fc": {"solver": "cholesky"}}))
    precond = KFACPreconditioner(_Net(), solver_map=str(path))
    assert precond.assignment() == {"conv": "eigh", "fc1": "cholesky", "fc2": "cholesky", "head": "eigh"}
    with pytest.raises(ValueError, match="missing.json"):
        parse_solver_map(str(tmp_path / "missing.json"))


def test_assignment_survives_state_dict_round_trip_and_mismatch_is_refused():
    torch.manual_seed(0)
    model = _Net()
    solver_map = {"fc1": FAST_THERMO, "conv": "cholesky"}
    precond = KFACPreconditioner(model, solver_map=solver_map, inverse_update_every=2)
    _train(precond, model, 3)
    state = precond.state_dict()
    assert state["assignment"] == precond.assignment()
    json.dumps(state["assignment"])
    clone = KFACPreconditioner(model, solver_map=solver_map, inverse_update_every=2)
    clone.load_state_dict(state)
    assert clone.assignment() == state["assignment"]
    assert torch.equal(clone.layer_table["fc1"].solver.A_inv, precond.layer_table["fc1"].solver.A_inv)
    other = KFACPreconditioner(model, inverse_update_every=2)
    with pytest.raises(ValueError, match="'fc1': saved 'thermo', now 'eigh'"):
        other.load_state_dict(state)


def test_predicted_hybrid_equals_digital_without_analog_layers_and_differs_with_them():
    torch.manual_seed(0)
    model = _Net()
    every = (2, 4)
    digital = KFACPreconditioner(model, factor_update_every=every[0], inverse_update_every=every[1])
    reports = _train(digital, model, 5)
    digital.remove_hooks()
    # independent reference: the cost model on the data-sheet H100, 32 rows per step (conv: x16)
    h100 = digital_device("h100")
    schedule = KFACSchedule(factor_every=every[0], inverse_every=every[1])
    rows = {"conv": 32 * 16, "fc1": 32, "fc2": 32, "head": 32}
    shapes = {"conv": (9, 2), "fc1": (32, 8), "fc2": (8, 40), "head": (40, 5)}
    expected = sum(digital_layer_cost(shapes[n][0], shapes[n][1], rows[n], device=h100,
                                      schedule=schedule).seconds for n in shapes)
    for report in reports:
        assert report["predicted_hybrid_s"] == report["predicted_digital_s"]
        assert report["predicted_digital_s"] == pytest.approx(expected, rel=1e-12)

    hybrid = KFACPreconditioner(model, solver_map={"fc2": FAST_THERMO}, factor_update_every=every[0],
                                inverse_update_every=every[1])
    reports = _train(hybrid, model, 5)
    for report in reports:
        assert report["predicted_digital_s"] == pytest.approx(expected, rel=1e-12)
        assert report["predicted_hybrid_s"] != pytest.approx(report["predicted_digital_s"], rel=1e-6)
    # the hybrid swaps fc2's digital cost for its host work + the solver's reported analog time
    prepared = reports[0]["solver_reports"]["fc2/prepare"].hardware_time_s
    fc2_digital = digital_layer_cost(8, 40, 32, device=h100, schedule=schedule).seconds
    host = thermo_layer_cost(8, 40, 32, kappa=100.0, eps=0.1, device=thermo_device("chip"), host=h100,
                             schedule=schedule)
    host_s = host.breakdown_s["factor_accumulation"] + host.breakdown_s["preconditioning"]
    assert reports[0]["predicted_hybrid_s"] == pytest.approx(
        expected - fc2_digital + host_s + prepared / every[1], rel=1e-9)


@register_solver
class _UnprogrammableSolver(KFACSolver):
    """A solver whose prepare fails like an analog device that cannot hold the factor."""

    name = "test-unprogrammable"
    analog = True  # priced as an analog layer

    def prepare(self, A, G, damping):
        raise ValueError("the programmed matrix is not positive definite")

    def apply(self, grad):  # pragma: no cover - never prepared
        raise AssertionError("apply without prepare")


def test_prepare_failure_uses_the_fallback_solver_and_counts_it():
    torch.manual_seed(0)
    model = _Net()
    precond = KFACPreconditioner(model, solver_map={"fc2": "test-unprogrammable"}, inverse_update_every=3,
                                 factor_update_every=1)
    reference = KFACPreconditioner(_clone_model(model), inverse_update_every=3, factor_update_every=1)
    analog_fc2 = thermo_layer_cost(8, 40, 32, kappa=100.0, eps=0.1, device=thermo_device("chip"),
                                   host=digital_device("h100"), schedule=KFACSchedule(1, 3)).seconds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4):
            x, y = _batch(i)
            for m, p in ((model, precond), (reference.model, reference)):
                m.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                p.step()
            assert torch.allclose(model.fc2.weight.grad, reference.model.fc2.weight.grad, atol=1e-6)
            # the hybrid machine paid fc2's analog attempt (no report: the cost model's price) and
            # then its digital fallback: hybrid = all-digital + fc2's analog price
            report = precond.last_report
            assert report["predicted_hybrid_s"] == pytest.approx(report["predicted_digital_s"] + analog_fc2)
    assert precond.fallbacks() == {"conv": 0, "fc1": 0, "fc2": 4, "head": 0}
    assert precond.skipped_updates()["fc2"] == 2  # two inverse updates failed (steps 0 and 3)
    messages = [str(w.message) for w in caught if "'fc2'" in str(w.message)]
    assert len(messages) == 1 and "not positive definite" in messages[0]  # warned once per layer


def _clone_model(model: nn.Module) -> nn.Module:
    clone = _Net()
    clone.load_state_dict(model.state_dict())
    return clone


# ------------------------------------------------------------------- the solver protocol
def test_solver_protocol_declares_analog_and_digital_method():
    from thermo_kfac.policy import is_analog
    from thermo_kfac.solvers import (
        CGSolver,
        CholeskySolver,
        ThermodynamicSolver,
        digital_method_of,
        registered_solver,
    )

    assert ThermodynamicSolver.analog and not EighSolver.analog and not CGSolver.analog
    assert is_analog(ThermodynamicSolver()) and not is_analog(CholeskySolver())
    assert is_analog(_UnprogrammableSolver())  # a solver class only sets the attribute
    assert CholeskySolver.digital_method == "cholesky" and EighSolver.digital_method == "eigh"
    assert digital_method_of("cholesky") == "cholesky" == digital_method_of(CholeskySolver())
    assert digital_method_of(CholeskySolver) == "cholesky"
    assert digital_method_of(SolverSpec.parse("cholesky")) == "cholesky"
    for other in ("eigh", "thermo", "cg", "auto", None):  # rules and unknowns: the eigh default
        assert digital_method_of(other) == "eigh"
    assert registered_solver("thermo") is ThermodynamicSolver and registered_solver("auto") is None


def test_pricing_settings_carry_what_the_cost_model_needs():
    from thermo_kfac.solvers import ThermodynamicSolver

    thermo = ThermodynamicSolver(method="inverse", bits=6, device="board", host="a100")
    settings = thermo.pricing_settings()
    assert settings["method"] == "inverse" and settings["thermo_device"] == thermo_device("board", bits=6)
    assert settings["device"] == "board" and settings["host"] == "a100"
    assert settings["digital_method"] == "eigh"
    assert EighSolver().pricing_settings() == {"digital_method": "eigh"}
    # the pricer uses exactly these: the thermo layer cost of a 10-bit inverse on the presets
    # (the solver work: the factor statistics, the same on both machines, are left out)
    policy = SolverPolicy(hardware="chip", digital="h100", kappa=10.0, eps=0.1)
    schedule = KFACSchedule(factor_every=1, inverse_every=10)
    thermo_s, _ = policy.layer_costs(SolverSpec.parse("thermo:method=inverse,bits=10"),
                                     SolverSpec.parse("eigh"), (21, 10), True, schedule)
    expect = thermo_layer_cost(20, 10, 1, kappa=10.0, eps=0.1, device=thermo_device("chip"),
                               host=digital_device("h100"), bits=10, method="inverse",
                               schedule=schedule)
    assert thermo_s == pytest.approx(expect.seconds - expect.breakdown_s["factor_accumulation"], rel=1e-12)
    # 3-bit couplings cannot reach eps = 0.1 at all (static error floor): auto keeps it digital
    thermo_s, _ = policy.layer_costs(SolverSpec.parse("thermo:method=inverse,bits=3"),
                                     SolverSpec.parse("eigh"), (21, 10), True, schedule)
    assert thermo_s is None


def test_policy_fills_the_declared_preset_options_only():
    from thermo_kfac.solvers import ThermodynamicSolver

    assert ThermodynamicSolver.preset_options == {"device": "thermo", "host": "digital"}
    policy = SolverPolicy(hardware="board", digital="a100")

    def bound(spec: str) -> dict:
        return policy.assign("fc", "Linear", 5, 4, default=SolverSpec.parse(spec)).spec.options

    assert bound("thermo:bits=8") == {"bits": 8, "device": "board", "host": "a100"}
    assert bound("thermo:device=chip")["device"] == "chip"
    assert bound("eigh") == {}
