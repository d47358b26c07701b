"""Reports of ``thermo-kfac project``: the per-layer table, the headline, JSON/CSV rows and the
PNG plots (projection, sweeps, break-even maps)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from typing import Any

from hw_models.cost import (
    LayerComparison,
    Scenario,
    StepCost,
)
from thermo_kfac.experiments._io import format_seconds

# Earlier names of the shared formatters (notebooks and scripts import them from here).
fmt_time = format_seconds


def fmt_ratio(value: float) -> str:
    """A speed-up or overhead factor: two decimals, or three significant digits when tiny."""
    return f"{value:.2f}x" if value >= 0.01 else f"{value:.3g}x"


def group_name(name: str) -> str:
    """``blocks.3.mlp.fc1`` -> ``blocks.*.mlp.fc1``: index segments become ``*``."""
    parts = name.split(".")
    out = []
    for p in parts:
        if p.isdigit():
            out.append("*")
        elif p.startswith("step") and p[4:].isdigit():
            out.append("step*")
        else:
            out.append(p)
    return ".".join(out)


def layer_groups(step: StepCost, group: bool = True) -> list[tuple[str, int, LayerComparison]]:
    """``(name, count, representative)`` per table row; identical layers merge when ``group``."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for layer in step.layers:
        name = group_name(layer.name) if group else layer.name
        key = (name, layer.n_in, layer.n_out, round(layer.positions, 6), layer.bias)
        if key in groups:
            groups[key][1] += 1
        else:
            groups[key] = [name, 1, layer]
    return [(name, count, layer) for name, count, layer in groups.values()]


def layer_rows(step: StepCost, group: bool = True) -> list[list[Any]]:
    """Rows of the per-layer table (see :data:`LAYER_HEADERS`).

    ``stats`` is the factor accumulation both sides pay; ``solver d/t`` compares what differs
    (digital decomposition + preconditioning vs the analog work and its host-side products).
    """
    rows = []
    for name, count, layer in layer_groups(step, group):
        n_a, n_g = layer.n_in + int(layer.bias), layer.n_out
        thermo = layer.thermo
        stats = layer.digital.breakdown_s.get("factor_accumulation", 0.0)
        ratio = "-"
        if thermo is not None:
            solver_d = layer.digital.seconds - stats
            solver_t = thermo.seconds - thermo.breakdown_s.get("factor_accumulation", 0.0)
            ratio = f"{solver_d / solver_t:.3g}x" if solver_t > 0 else "-"
        rows.append([name, f"x{count}", f"{layer.n_in}->{layer.n_out}", f"{n_a}/{n_g}",
                     f"{layer.positions:g}", format_seconds(stats), format_seconds(layer.digital.seconds),
                     format_seconds(thermo.seconds if thermo else None),
                     thermo.info.get("method", "-") if thermo else "too big", ratio, layer.cheaper])
    return rows


LAYER_HEADERS = ["layer", "n", "d_in->d_out", "A/G", "R", "stats", "digital", "thermo", "method",
                 "solver d/t", "cheaper"]


def headline(step: StepCost, scenario: Scenario, be_kappa: float | None) -> str:
    """The step summary printed under the table."""
    s = step.summary()
    th, sched = scenario.thermo, scenario.schedule
    bits = scenario.bits or th.noise.input_bits
    too_big = f", {s['layers_not_fitting']} too big for it" if s["layers_not_fitting"] else ""
    lines = [
        f"Per training step of {step.workload}, batch {step.batch}:",
        f"  digital {scenario.digital.name} ({sched.precision}, {sched.digital_method} every "
        f"{sched.inverse_every} steps); thermodynamic {th.name} ({th.units} x {th.cells} cells, "
        f"tau {format_seconds(th.tau_s)}, {bits} bit, {th.io_bandwidth_bps / 1e9:g} Gb/s);",
        f"  kappa {scenario.kappa:g}, eps {scenario.eps:g}, method {scenario.method}",
        f"  Adam                      {format_seconds(s['adam_s']):>10}   "
        f"(forward+backward {format_seconds(s['fwd_bwd_s'])})",
        f"  digital K-FAC             {format_seconds(s['digital_kfac_s']):>10}   "
        f"{fmt_ratio(s['digital_overhead_vs_adam'])} Adam",
        f"  thermodynamic K-FAC       {format_seconds(s['thermo_kfac_s']):>10}   "
        f"{fmt_ratio(s['thermo_overhead_vs_adam'])} Adam; {s['layers_on_thermo']}/{s['layers']} layers "
        f"on the analog device{too_big}",
        f"  speed-up vs digital K-FAC {fmt_ratio(s['speedup_vs_digital_kfac']):>10}   (every layer that "
        f"fits on the analog device: {fmt_ratio(s['speedup_thermo_only'])})",
    ]
    if be_kappa is None:
        lines.append("  break-even kappa: none (thermodynamic K-FAC is slower even at kappa = 1)")
    else:
        lines.append(f"  break-even kappa: {be_kappa:.3g} (all-thermodynamic K-FAC is faster below it)")
    lines.append(f"  energy per step: Adam {s['adam_j']:.3g} J, digital K-FAC {s['digital_kfac_j']:.3g} J, "
                 f"thermodynamic K-FAC {s['thermo_kfac_j']:.3g} J")
    return "\n".join(lines)


def project_json(step: StepCost, scenario: Scenario, be_kappa: float | None) -> dict[str, Any]:
    """The ``--json`` document of ``project`` (schema in docs/hardware_model.md)."""
    layers = []
    for layer in step.layers:
        thermo = layer.thermo
        layers.append({
            "name": layer.name, "n_in": layer.n_in, "n_out": layer.n_out,
            "digital_s": layer.digital.seconds, "thermo_s": thermo.seconds if thermo else None,
            "cheaper": layer.cheaper, "kind": layer.kind, "positions": layer.positions, "bias": layer.bias,
            "factor_sizes": [layer.n_in + int(layer.bias), layer.n_out],
            "method": thermo.info.get("method") if thermo else None,
            "digital_j": layer.digital.joules, "thermo_j": thermo.joules if thermo else None,
            "digital_breakdown_s": dict(layer.digital.breakdown_s),
            "thermo_breakdown_s": dict(thermo.breakdown_s) if thermo else None,
            "thermo_error_floor": thermo.info.get("error_floor") if thermo else None,
            "predicted_rel_error": thermo.info.get("predicted_rel_error") if thermo else None,
            "kappa_measured": list(thermo.info.get("kappa_measured", ())) if thermo else None,
            "note": layer.note,
        })
    summary = step.summary()
    summary["break_even_kappa"] = be_kappa
    for layer_doc, on in zip(layers, step.assignment, strict=True):
        layer_doc["assigned"] = "thermo" if on else "digital"
    return {"model": step.workload, "hardware": scenario.thermo.name, "digital": scenario.digital.name,
            "batch": step.batch, "assumptions": scenario.describe(), "layers": layers, "step": summary}


def write_csv(path: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(rows)


def plot_project(path: str, step: StepCost, scenario: Scenario) -> None:
    from thermo_kfac.experiments._plotting import agg_pyplot

    plt = agg_pyplot()  # files only: matplotlib's backend and pyplot are left alone

    groups = layer_groups(step)
    names = [f"{name} x{count}" if count > 1 else name for name, count, _ in groups]
    digital = [layer.digital.seconds for _, _, layer in groups]
    thermo = [layer.thermo.seconds if layer.thermo else float("nan") for _, _, layer in groups]
    height = max(3.0, 0.28 * len(names) + 1.5)
    fig, ax = plt.subplots(figsize=(9, height))
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], digital, height=0.4, label=f"digital ({scenario.digital.name})")
    ax.barh([i + 0.2 for i in y], thermo, height=0.4, label=f"thermodynamic ({scenario.thermo.name})")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("K-FAC curvature time per training step per layer [s]")
    ax.set_title(f"{step.workload}: speed-up {fmt_ratio(step.speedup_vs_digital_kfac)} "
                 f"(kappa {scenario.kappa:g}, eps {scenario.eps:g})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(path: str, axis: str, points: list[dict[str, Any]], title: str) -> None:
    from thermo_kfac.experiments._plotting import agg_pyplot

    plt = agg_pyplot()  # files only: matplotlib's backend and pyplot are left alone

    xs = [p["x"] for p in points]
    nan = float("nan")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    top.plot(xs, [p["digital_s"] for p in points], "o-", label="digital K-FAC")
    top.plot(xs, [p["thermo_s"] if p["thermo_s"] is not None else nan for p in points], "s-",
             label="thermodynamic K-FAC")
    top.set_yscale("log")
    top.set_ylabel("time [s]")
    top.legend(fontsize=8)
    top.set_title(title, fontsize=10)
    bottom.plot(xs, [p["speedup"] if p["speedup"] is not None else nan for p in points], "o-",
                label="thermodynamic only")
    bottom.plot(xs, [p["hybrid_speedup"] for p in points], "--", label="hybrid (cheaper side per layer)")
    bottom.axhline(1.0, color="grey", lw=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel("speed-up over digital K-FAC")
    bottom.legend(fontsize=8)
    labels = {"width": "layer width n", "kappa": "condition number kappa", "bits": "DAC/ADC bits",
              "bandwidth": "host link bandwidth [bit/s]", "eps": "target relative error eps",
              "tau": "tau [s]", "units": "solver units", "inverse_every": "inverse period [steps]",
              "precision": "precision (fp32, tf32, bf16, fp64)"}
    bottom.set_xlabel(labels[axis])
    if axis not in ("bits", "precision"):
        bottom.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_map(path: str, doc: dict[str, Any]) -> None:
    from thermo_kfac.experiments._plotting import agg_pyplot

    plt = agg_pyplot()
    grid = [[math.nan if v is None else math.log10(v) for v in row] for row in doc["speedup"]]
    fig, ax = plt.subplots(figsize=(7, 5))
    image = ax.imshow(grid, origin="lower", cmap="RdBu", vmin=-2, vmax=2, aspect="auto")
    ax.set_xticks(range(len(doc["xs"])), [f"{x:g}" for x in doc["xs"]])
    ax.set_yticks(range(len(doc["ys"])), [f"{y:g}" for y in doc["ys"]])
    ax.set_xlabel(doc["x"])
    ax.set_ylabel(doc["y"])
    finite = [[v for v in row] for row in grid]
    if any(not math.isnan(v) for row in finite for v in row):
        ax.contour(finite, levels=[0.0], colors="k", linewidths=1.0)
    fig.colorbar(image, ax=ax, label="log10 speed-up (thermodynamic over digital)")
    ax.set_title(f"break-even map {doc['map']} (black: speed-up 1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
