"""Reports of ``thermo-kfac project``: the per-layer table, the headline, JSON/CSV rows and the
PNG plots (projection, sweeps, break-even maps)."""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from typing import Any

from hw_models.cost import (
    LayerComparison,
    Scenario,
    StepCost,
)
from hw_models.projection import PAPER_ASSUMPTIONS, paper_report, paper_scenario, requirements
from hw_models.workloads import Workload
from thermo_kfac.experiments._io import atomic_write, bandwidth_gbps, format_seconds, text_table

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
    bits = "/".join(str(b) for b in converter_bits(scenario).values())
    too_big = f", {s['layers_not_fitting']} too big for it" if s["layers_not_fitting"] else ""
    lines = [
        f"Per training step of {step.workload}, batch {step.batch}:",
        f"  digital {scenario.digital.name} ({sched.precision}, {sched.digital_method} every "
        f"{sched.inverse_every} steps); thermodynamic {th.name} ({th.units} x {th.cells} cells, "
        f"tau {format_seconds(th.tau_s)}, coupling/DAC/ADC {bits} bits, "
        f"{th.io_bandwidth_bps / 1e9:g} Gb/s);",
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
            "batch": step.batch, "assumptions": assumptions(scenario), "layers": layers, "step": summary}


def assumptions(scenario: Scenario) -> dict[str, Any]:
    """``Scenario.describe()`` plus the bits the pricing actually uses (``converter_bits``: the
    device's own coupling/DAC/ADC bits, all three replaced by ``--bits`` when given) and the
    host link in Gb/s, so that the JSON does not list the device's bits next to a different
    ``bits``."""
    doc = scenario.describe()
    doc["converter_bits"] = converter_bits(scenario)
    doc["io_bandwidth_gbps"] = scenario.thermo.io_bandwidth_bps / 1e9
    return doc


def write_csv(path: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(rows)


def measured_steps_ratio(path: str) -> tuple[float, str]:
    """``(ratio, description)``: thermodynamic K-FAC's steps to the run's target loss over Adam's,
    from a ``compare`` ``results.json`` (the first run whose label names ``solver=thermo``, else
    the first K-FAC run; Adam's run by its label). Raises ``ValueError`` naming what is missing."""
    try:
        with open(path) as handle:
            results = json.load(handle)
        runs = {str(r["label"]): r for r in results["runs"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--steps-ratio-from {path!r} is not a compare results.json: {err}") from None
    adam = next((r for label, r in runs.items() if label.split(":")[0] == "adam"), None)
    kfac = next((r for label, r in runs.items() if "solver=thermo" in label), None) or next(
        (r for label, r in runs.items() if label.split(":")[0].startswith("kfac")), None)
    if adam is None or kfac is None:
        raise ValueError(f"--steps-ratio-from {path!r} needs an adam run and a K-FAC run; it has "
                         f"{', '.join(runs) or 'none'}")
    steps = (kfac.get("steps_to_target"), adam.get("steps_to_target"))
    if not all(isinstance(s, int) and s > 0 for s in steps):
        raise ValueError(f"--steps-ratio-from {path!r}: a run did not reach the target loss "
                         f"{results.get('target_loss')} (steps to target: {kfac['label']} {steps[0]}, "
                         f"adam {steps[1]})")
    return steps[0] / steps[1], f"{kfac['label']} {steps[0]} vs adam {steps[1]} steps, {path}"


def run_paper(args: Any, scenario: Scenario, work: Workload) -> int:
    """``project --scenario paper``: both scenarios, the verdict, the deciding assumption and the
    requirements table (printed; ``--json`` writes the report)."""
    assumed = args.steps_ratio
    measured = None
    if getattr(args, "steps_ratio_from", None):
        measured, source = measured_steps_ratio(args.steps_ratio_from)
        args.steps_ratio = measured
    report = paper_report(work, scenario, steps_ratio=args.steps_ratio)
    if measured is not None:
        report["steps_ratio_assumed"], report["steps_ratio_measured"] = assumed, measured
        report["steps_ratio_source"] = source
    rows = []
    for name in ("default", "paper"):
        sc = report["scenarios"][name]
        st, vm = sc["step"], sc["verdict_metrics"]
        rows.append([name, format_seconds(st["adam_s"]), format_seconds(st["digital_kfac_s"]),
                     format_seconds(st["thermo_kfac_s"]), fmt_ratio(st["speedup_vs_digital_kfac"]),
                     fmt_ratio(vm["update_speedup_vs_digital_kfac"]),
                     fmt_ratio(vm["time_to_result_vs_adam"]), f"{st['layers_on_thermo']}/{st['layers']}"])
    print(f"{work.name}: default scenario ({scenario_text(scenario)}) beside our reading of the seed "
          "paper (arXiv 2502.08603)")
    print(text_table(["scenario", "Adam", "digital K-FAC", "thermo K-FAC", "step speed-up", "update speed-up",
                      "vs Adam (time to result)", "analog"], rows))
    print(f"(time to result vs Adam: K-FAC taking {report['steps_ratio']:g} of Adam's steps; "
          "> 1 means faster)")
    if measured is not None:
        print(f"(steps ratio measured {measured:.3g} ({source}), beside the assumed {assumed:g})")
    print("\nThe paper's assumptions as we read them (docs/hardware_model.md):")
    print(text_table(["assumption", "value", "source"], [list(a) for a in PAPER_ASSUMPTIONS], "lll"))
    print("\nEffect of setting each assumption back to the default scenario's value:")
    eff_rows = [[e["assumption"], fmt_ratio(e["reverted_update_speedup"]) if e.get("reverted_update_speedup")
                 else "-", fmt_ratio(e["reverted_time_to_result_vs_adam"])
                 if e.get("reverted_time_to_result_vs_adam") else "-",
                 f"{e['reverted_max_predicted_rel_error']:.3g}" if "reverted_max_predicted_rel_error" in e
                 else "-", "yes" if e["decides"] else "no"]
                for e in report["effects"]]
    print(text_table(["reverted", "update speed-up", "vs Adam", "max error", "flips verdict"], eff_rows))
    verdict = "REPRODUCED" if report["reproduced"] else "NOT reproduced"
    deciding = ", ".join(report["deciding_assumptions"]) or "no single assumption flips it"
    print(f"\nVerdict for {work.name}: the paper's claim (>= {report['substantial']:g}x over digital K-FAC "
          f"on the optimizer update AND faster than Adam to a target, at per-layer error <= "
          f"{report['accuracy_limit']:g}) is {verdict} under its assumptions.")
    print(f"  deciding assumption(s): {deciding}; largest effect on the update speed-up: "
          f"{report['most_influential']}; thermodynamic K-FAC beats Adam if K-FAC needs fewer than "
          f"{report['max_steps_ratio_to_beat_adam']:.3g} of Adam's steps.")
    if report["paper_predicted_rel_error_max"] is not None:
        print(f"  accuracy of the paper's fixed 50 tau solves by the law: relative error up to "
              f"{report['paper_predicted_rel_error_max']:.3g}")
    reqs = {}
    for name, scen in (("default", scenario), ("paper", paper_scenario(scenario, work))):
        reqs[name] = requirements(work, scen, steps_ratio=args.steps_ratio)
    print("\nWhat must hold (each axis alone, the rest as in the scenario) for thermodynamic K-FAC to win:")
    req_rows = [[name, r["axis"], r["vs_digital_kfac"], r["vs_adam"]] for name in reqs for r in reqs[name]]
    print(text_table(["scenario", "axis", "vs digital K-FAC (update)", "vs Adam (time to result)"], req_rows,
                     "llll"))
    report["requirements"] = reqs
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote json: {args.json}")
    return 0


KAPPA_EPS_MAP_WIDTH = 1024  # the layer width of hw_models.projection.speedup_map("kappa-eps")


def sweep_values(axis: str | None, text: str | None) -> list[float] | None:
    """``--values`` of a sweep: numbers, or for ``bandwidth`` Gb/s or values with a unit
    (``400Gb/s``), returned in the bit/s the pricing takes; None without ``--values``."""
    if text is None or isinstance(text, list):
        return text
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    if not items:
        raise ValueError("--values: give at least one value")
    try:
        if axis == "bandwidth":
            return [bandwidth_gbps(v) * 1e9 for v in items]
        return [float(v) for v in items]
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"--values {text!r}: {err}") from None


# One colour per side in every project plot (and per method in the noise study's files).
DIGITAL_COLOR, THERMO_COLOR, HYBRID_COLOR = "tab:blue", "tab:red", "tab:purple"
SWEEP_LABELS = {"width": "layer width n", "kappa": "condition number kappa of the damped factors",
                "bits": "coupling/DAC/ADC bits", "bandwidth": "host link bandwidth [Gb/s]",
                "eps": "target relative error eps", "tau": "time constant tau [s]",
                "units": "solver units", "inverse_every": "inverse period [steps]",
                "precision": "GEMM precision"}
PRECISION_TICKS = ["fp32", "tf32", "bf16", "fp64"]  # --sweep precision values index these


def scenario_text(scenario: Scenario, *, skip: Sequence[str] = ()) -> str:
    """``h100 vs chip, kappa 100, eps 0.1, 8 bits, 400 Gb/s``: the devices and the assumptions a
    figure depends on, without those in ``skip`` (the swept ones)."""
    th = scenario.thermo
    parts = [f"{scenario.digital.name} vs {th.name}"]
    if "kappa" not in skip:
        parts.append(f"kappa {scenario.kappa:g}" if scenario.kappa_of is None else "kappa measured")
    if "eps" not in skip:
        parts.append(f"eps {scenario.eps:g}" if scenario.analog_time is None
                     else f"window {scenario.analog_time:g} tau")
    if "bits" not in skip:
        bits = converter_bits(scenario)
        parts.append("bits coupling/DAC/ADC " + "/".join(str(bits[k]) for k in ("coupling", "dac", "adc")))
    if "bandwidth" not in skip:
        parts.append(f"{th.io_bandwidth_bps / 1e9:g} Gb/s")
    return ", ".join(parts)


def converter_bits(scenario: Scenario) -> dict[str, int]:
    """The bits the pricing uses: ``--bits`` replaces all three (couplings, DAC, ADC); without it
    each is the device's own (``None``: exact)."""
    noise, bits = scenario.thermo.noise, scenario.bits
    return {"coupling": bits or noise.coupling_bits, "dac": bits or noise.input_bits,
            "adc": bits or noise.output_bits}


def _pyplot() -> Any:
    from thermo_kfac.experiments._plotting import agg_pyplot

    return agg_pyplot()  # files only: matplotlib's backend and pyplot are left alone


def _save(fig: Any, path: str) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)


def project_figure(step: StepCost, scenario: Scenario) -> Any:
    """Per-layer curvature time on each side (log axis); layers that do not fit are marked."""
    plt = _pyplot()
    groups = layer_groups(step)
    names = [f"{name} x{count}" if count > 1 else name for name, count, _ in groups]
    digital = [layer.digital.seconds for _, _, layer in groups]
    thermo = [layer.thermo.seconds if layer.thermo else float("nan") for _, _, layer in groups]
    height = max(3.0, 0.28 * len(names) + 1.8)
    fig, ax = plt.subplots(figsize=(9, height))
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], digital, height=0.4, color=DIGITAL_COLOR,
            label=f"digital K-FAC ({scenario.digital.name})")
    ax.barh([i + 0.2 for i in y], thermo, height=0.4, color=THERMO_COLOR,
            label=f"thermodynamic K-FAC ({scenario.thermo.name})")
    for i, value in zip(y, thermo, strict=True):
        if math.isnan(value):
            ax.text(0.99, i + 0.2, "does not fit", transform=ax.get_yaxis_transform(), ha="right",
                    va="center", fontsize=7, color=THERMO_COLOR)
    ax.set_yticks(list(y), names, fontsize=7)
    ax.set_ylabel("layer (x count: identical layers)")
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("K-FAC curvature time per training step per layer [s]")
    ax.set_title(f"{step.workload}, batch {step.batch}: speed-up "
                 f"{fmt_ratio(step.speedup_vs_digital_kfac)}\n{scenario_text(scenario)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_project(path: str, step: StepCost, scenario: Scenario) -> None:
    """:func:`project_figure` as a PNG."""
    _save(project_figure(step, scenario), path)


def sweep_figure(axis: str, points: list[dict[str, Any]], title: str) -> Any:
    """Times (top) and speed-ups (bottom) against the swept axis; points where the layers do not
    fit on the analog device are marked on the bottom panel."""
    plt = _pyplot()
    xs = [p["x"] for p in points]  # bandwidth: in Gb/s (the command converts the points)
    nan = float("nan")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    top.plot(xs, [p["digital_s"] for p in points], "o-", color=DIGITAL_COLOR, label="digital K-FAC")
    top.plot(xs, [p["thermo_s"] if p["thermo_s"] is not None else nan for p in points], "s-",
             color=THERMO_COLOR, label="thermodynamic K-FAC (every layer that fits)")
    top.set_yscale("log")
    # width sweeps price one layer's curvature work, the others the model's whole training step
    top.set_ylabel("curvature time of the layer [s]" if axis == "width" else "time per training step [s]")
    top.legend(fontsize=8)
    top.set_title(title, fontsize=9)
    bottom.plot(xs, [p["speedup"] if p["speedup"] is not None else nan for p in points], "s-",
                color=THERMO_COLOR, label="thermodynamic only")
    bottom.plot(xs, [p["hybrid_speedup"] for p in points], "--", color=HYBRID_COLOR,
                label="hybrid (cheaper side per layer)")
    missing = [x for x, p in zip(xs, points, strict=True) if p["speedup"] is None]
    if missing:
        bottom.plot(missing, [0.03] * len(missing), "x", color=THERMO_COLOR, ms=8,
                    transform=bottom.get_xaxis_transform(), label="does not fit")
    bottom.axhline(1.0, color="grey", lw=0.8, label="break-even")
    bottom.set_yscale("log")
    bottom.set_ylabel("speed-up over digital K-FAC")
    bottom.legend(fontsize=8)
    bottom.set_xlabel(SWEEP_LABELS[axis])
    if axis == "precision":
        bottom.set_xticks(xs, [PRECISION_TICKS[int(x)] for x in xs])
    elif axis != "bits" and len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 20:
        bottom.set_xscale("log")
    fig.tight_layout()
    return fig


def plot_sweep(path: str, axis: str, points: list[dict[str, Any]], title: str) -> None:
    """:func:`sweep_figure` as a PNG."""
    _save(sweep_figure(axis, points, title), path)


MAP_UNFIT_COLOR = "0.55"  # grey, hatched: distinct from every colour of the diverging map


def map_figure(doc: dict[str, Any], title: str) -> Any:
    """log10 speed-up on the grid, centred on break-even (white) with limits covering every value;
    cells where the layer does not fit are hatched grey; the black contour is speed-up 1."""
    import matplotlib
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    plt = _pyplot()
    values = np.array([[np.nan if v is None else math.log10(v) for v in row] for row in doc["speedup"]])
    finite = values[np.isfinite(values)]
    limit = max(0.5, float(np.abs(finite).max())) if finite.size else 1.0
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad=MAP_UNFIT_COLOR)
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    image = ax.imshow(np.ma.masked_invalid(values), origin="lower", cmap=cmap, vmin=-limit, vmax=limit,
                      aspect="auto")
    for j, row in enumerate(doc["speedup"]):
        for i, v in enumerate(row):
            if v is None:
                ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, hatch="//", lw=0,
                                       edgecolor="white"))
    ax.set_xticks(range(len(doc["xs"])), [f"{x:g}" for x in doc["xs"]])
    ax.set_yticks(range(len(doc["ys"])), [f"{y:g}" for y in doc["ys"]])
    names = {"width": "layer width n", "kappa": "condition number kappa", "eps": "target relative error eps"}
    ax.set_xlabel(names.get(doc["x"], doc["x"]))
    ax.set_ylabel(names.get(doc["y"], doc["y"]))
    if finite.size and finite.min() < 0 < finite.max():
        ax.contour(values, levels=[0.0], colors="k", linewidths=1.2)
    fig.colorbar(image, ax=ax, label="log10 speed-up (thermodynamic over digital); 0: break-even")
    handles = [Patch(facecolor=MAP_UNFIT_COLOR, hatch="//", edgecolor="white", label="does not fit"),
               Line2D([], [], color="k", lw=1.2, label="break-even (speed-up 1)")]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.12), ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def map_title(doc: dict[str, Any], scenario: Scenario) -> str:
    """What a break-even map shows and under which assumptions (the width of a kappa-eps map)."""
    layer = (f"one square layer of width {doc['width']}" if doc.get("width") else "one square layer")
    skip = [doc["x"], doc["y"]]
    return f"break-even map {doc['map']}: {layer}, batch {doc['batch']}\n{scenario_text(scenario, skip=skip)}"


def plot_map(path: str, doc: dict[str, Any], title: str | None = None) -> None:
    """:func:`map_figure` as a PNG."""
    _save(map_figure(doc, title or f"break-even map {doc['map']}"), path)
