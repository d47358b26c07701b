"""The co-design view of a comparison: training loss against the *predicted* time of the machines
being studied, instead of the simulator's wall time.

Each K-FAC step's preconditioner reports the predicted curvature time of the all-digital machine
(``predicted_digital_s``) and of the hybrid one (``predicted_hybrid_s``: analog layers on the
thermodynamic device). The rest of a step, forward, backward and the elementwise optimizer update,
is the same on both machines: :func:`base_step_seconds` prices it with the cost model
(:func:`hw_models.cost.step_cost`: three GEMMs per layer, a non-GEMM factor, the update's memory
traffic) on the run's digital preset. A first-order run (SGD, Adam) is that base step alone, on
the digital preset of the comparison's first K-FAC run. Other optimizers (AdaFisher, Eva) have
curvature work that is not priced; they are left out.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hw_models.defaults import DEFAULT_DIGITAL, DEFAULT_THERMO
from thermo_kfac.data import Dataset
from thermo_kfac.models import build_model

__all__ = ["FIRST_ORDER", "MACHINES", "add_predicted_times", "base_step_seconds", "predicted_curve"]

FIRST_ORDER = ("sgd", "adam")
MACHINES = ("digital", "hybrid")


def base_step_seconds(model: str, model_options: dict[str, Any], data: Dataset, batch_size: int,
                      digital: str) -> float | None:
    """Predicted forward + backward + optimizer update of one step on the ``digital`` preset, or
    None when the model's layers cannot be read (no Linear/Conv layer, a failing meta forward)."""
    from hw_models.cost import Scenario, step_cost
    from hw_models.devices import digital_device, thermo_device
    from thermo_kfac.experiments.hardware import workload_from_module

    with torch.device("meta"):
        net = build_model(model, data, **model_options)
    dtype = "long" if not torch.is_floating_point(data.x_train) else "float"
    try:
        work = workload_from_module(net, name=model, batch=min(batch_size, len(data.x_train)),
                                    input_shape=data.input_shape, input_dtype=dtype)
        scenario = Scenario(digital=digital_device(digital), thermo=thermo_device(DEFAULT_THERMO))
        cost = step_cost(work, scenario)
    except ValueError:
        return None
    return float(cost.adam_s)


def add_predicted_times(results: dict[str, Any], model: str, model_options: dict[str, Any], data: Dataset,
                        batch_size: int) -> None:
    """Add to each priced run of ``results["runs"]`` its ``predicted_step_s`` (mean seconds per
    step on each machine, base step included), ``predicted_base_step_s`` and, with a target loss,
    ``predicted_time_to_target_s`` (``{"digital": s, "hybrid": s}``; None where not reached).
    Nothing is added when no run reports predicted times (no K-FAC run)."""
    runs = results["runs"]
    kfac = [r for r in runs if any("predicted_digital_s" in h for h in r["history"])]
    if not kfac:
        return
    default = kfac[0]["options"].get("digital", DEFAULT_DIGITAL)
    bases: dict[str, float | None] = {}
    for run in runs:
        if run in kfac:
            preset = run["options"].get("digital", DEFAULT_DIGITAL)
        elif run["optimizer"] in FIRST_ORDER:
            preset = default
        else:
            continue
        if preset not in bases:
            bases[preset] = base_step_seconds(model, model_options, data, batch_size, preset)
        if bases[preset] is None:
            continue
        run["predicted_base_step_s"] = bases[preset]
        run["predicted_preset"] = preset
        curves = {m: _cumulative(run, m) for m in MACHINES if run in kfac or m == "digital"}
        steps = max(len(run["history"]), 1)
        run["predicted_step_s"] = {m: (c[-1] if c else 0.0) / steps for m, c in curves.items()}
        reached = run.get("steps_to_target")
        if results.get("target_loss") is not None:
            run["predicted_time_to_target_s"] = {
                m: None if reached is None else (c[reached - 1] if reached > 0 else 0.0)
                for m, c in curves.items()}


def _cumulative(run: dict[str, Any], machine: str) -> list[float]:
    """Predicted seconds after each step of ``run`` on ``machine`` (base step + curvature)."""
    base = run["predicted_base_step_s"]
    total, out = 0.0, []
    for record in run["history"]:
        total += base + float(record.get(f"predicted_{machine}_s", 0.0))
        out.append(total)
    return out


def predicted_curve(run: dict[str, Any], machine: str, key: str = "eval_train_loss"
                    ) -> tuple[list[float], list[float]]:
    """``(predicted seconds, key)`` at the initial evaluation and every evaluation of ``run`` on
    ``machine``; empty when the run is not priced on it."""
    if machine not in run.get("predicted_step_s", {}):
        return [], []
    times = _cumulative(run, machine)
    xs, ys = [0.0], [run.get("initial_eval", {}).get(key)]
    for record, t in zip(run["history"], times, strict=True):
        if record.get(key) is not None:
            xs.append(t)
            ys.append(record[key])
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    return [p[0] for p in points], [p[1] for p in points]
