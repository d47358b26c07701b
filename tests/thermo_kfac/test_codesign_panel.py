"""The co-design view of ``compare``: loss against predicted hardware time, and the predicted
time to target on the all-digital and the hybrid machine."""

from __future__ import annotations

import pytest
import torch

from hw_models.cost import Scenario, step_cost
from hw_models.devices import digital_device, thermo_device
from hw_models.units import format_seconds
from hw_models.workloads import mlp
from thermo_kfac.data import load_dataset
from thermo_kfac.experiments.training import compare
from thermo_kfac.experiments.training.codesign import base_step_seconds, predicted_curve
from thermo_kfac.experiments.training.outputs import format_table, render_plots


@pytest.fixture(scope="module")
def results():
    torch.set_num_threads(1)
    return compare("digits", "mlp", ["adam", "kfac:solver=thermo", "kfac"], steps=16, eval_every=2,
                   batch_size=128, model_options={"widths": (32,)}, target_loss=1.5)


def _reference_base(preset: str) -> float:
    """Forward + backward + update of the 64-32-10 MLP at batch 128, priced from the cost model's
    own MLP workload (not read from the torch model)."""
    scenario = Scenario(digital=digital_device(preset), thermo=thermo_device("chip"))
    return step_cost(mlp("ref", (64, 32, 10), batch=128), scenario).adam_s


def test_base_step_is_the_cost_models_step_of_the_same_layers():
    data = load_dataset("digits")
    for preset in ("h100", "a100"):
        assert base_step_seconds("mlp", {"widths": (32,)}, data, 128, preset) == pytest.approx(
            _reference_base(preset), rel=1e-12)


def test_predicted_time_to_target_on_each_machine(results):
    runs = {r["label"]: r for r in results["runs"]}
    base = _reference_base("h100")
    for label in ("kfac", "kfac:solver=thermo"):
        run = runs[label]
        reached = run["steps_to_target"]
        assert reached is not None and run["predicted_preset"] == "h100"
        history = run["history"][:reached]
        for machine in ("digital", "hybrid"):
            expected = sum(base + h[f"predicted_{machine}_s"] for h in history)
            assert run["predicted_time_to_target_s"][machine] == pytest.approx(expected, rel=1e-9)
            per_step = sum(base + h[f"predicted_{machine}_s"] for h in run["history"]) / run["steps"]
            assert run["predicted_step_s"][machine] == pytest.approx(per_step, rel=1e-9)
    # digital K-FAC has no analog layer: both machines alike; the thermo run's hybrid differs
    digital_kfac = runs["kfac"]["predicted_time_to_target_s"]
    assert digital_kfac["hybrid"] == digital_kfac["digital"]
    thermo = runs["kfac:solver=thermo"]["predicted_step_s"]
    assert thermo["hybrid"] != thermo["digital"]
    # Adam: its base step on the digital preset of the first K-FAC run, no hybrid machine
    adam = runs["adam"]
    assert adam["predicted_step_s"] == {"digital": pytest.approx(base, rel=1e-12)}
    if adam["steps_to_target"] is not None:
        assert adam["predicted_time_to_target_s"]["digital"] == pytest.approx(adam["steps_to_target"] * base)


def test_curve_and_table_show_the_predicted_times(results):
    run = next(r for r in results["runs"] if r["label"] == "kfac:solver=thermo")
    xs, ys = predicted_curve(run, "hybrid")
    evaluated = [h for h in run["history"] if "eval_train_loss" in h]
    assert ys == [run["initial_eval"]["eval_train_loss"]] + [h["eval_train_loss"] for h in evaluated]
    assert xs[0] == 0.0 and xs[-1] == pytest.approx(run["predicted_step_s"]["hybrid"] * run["steps"])
    assert predicted_curve(next(r for r in results["runs"] if r["label"] == "adam"), "hybrid") == ([], [])
    table = format_table(results)
    assert "hw to target digital / hybrid" in table
    reached = run["predicted_time_to_target_s"]
    assert f"{format_seconds(reached['digital'])} / {format_seconds(reached['hybrid'])}" in table
    plots = render_plots(results)
    assert set(plots) == {"loss.png", "accuracy.png", "compare.png"}


def test_without_kfac_nothing_is_priced():
    torch.set_num_threads(1)
    res = compare("digits", "mlp", ["adam", "sgd"], steps=4, eval_every=2, model_options={"widths": (16,)})
    assert all("predicted_step_s" not in r for r in res["runs"])
    assert "hw to target" not in format_table(res)
