"""PNG plots of a noise study: final loss against the first swept key, a heatmap of two keys,
and the mean training curves.

Every file of a study gives a method the same colour (:func:`method_colors`: the references
fixed colours by name, the swept points shades of one sequential map), every axis is labelled
with its unit, and diverged runs (:func:`~.outputs.is_diverged`) are left out of the plotted
values and marked: a red ``x`` at the top of the loss panels, ``diverged k/n`` in the heatmap, an
``x`` where each diverged run stopped on the curves.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from thermo_kfac.experiments._io import atomic_write
from thermo_kfac.experiments.noise_study.outputs import (
    STUDY_METHOD,
    finite,
    is_diverged,
    point_label,
    spec_text,
)

__all__ = ["AXIS_LABELS", "DIVERGED_COLOR", "REFERENCE_COLORS", "method_colors", "study_figures",
           "write_plots"]

# The same colours as thermo-kfac project's plots (digital K-FAC blue); the swept thermodynamic
# runs take shades of a sequential map, which none of these is part of.
REFERENCE_COLORS = {"kfac": "tab:blue", "adam": "tab:orange", "sgd": "tab:gray", "kfac-adaptive": "tab:cyan"}
SPARE_COLORS = ["tab:green", "tab:brown", "tab:pink", "tab:olive"]
DIVERGED_COLOR = "red"
THERMO_MAP = "viridis"
AXIS_LABELS = {
    "bits": "bits (couplings, DAC and ADC)", "coupling_bits": "coupling bits",
    "input_bits": "DAC (input) bits", "output_bits": "ADC (output) bits",
    "analog_time": "analog time t [tau]", "burn_in": "burn-in [tau]",
    "kappa0": "thermal noise kappa0 (of the normalised matrix)",
    "mismatch_std": "coupling mismatch (relative std)", "read_noise": "read noise (of full scale)",
}
LOSS_NAMES = {"cross_entropy": "cross-entropy [nats]", "bce": "binary cross-entropy [nats]",
              "mse": "mean squared error"}


def method_colors(study: dict[str, Any]) -> dict[str, Any]:
    """Colour of every line label of the study (references by name, swept points in grid order)."""
    import matplotlib

    colors: dict[str, Any] = {}
    spare = iter(SPARE_COLORS * 4)
    labels = list(dict.fromkeys(r["label"] for r in study["rows"]))
    for label in (x for x in labels if not x.startswith(STUDY_METHOD + " ")):
        colors[label] = REFERENCE_COLORS.get(label.split(":")[0]) or next(spare)
    points = [x for x in labels if x.startswith(STUDY_METHOD + " ")]
    cmap = matplotlib.colormaps[THERMO_MAP]
    for i, label in enumerate(points):
        colors[label] = cmap(0.85 * i / max(len(points) - 1, 1))
    return colors


def _axis(values: list[Any]) -> tuple[list[float], list[str] | None, dict[str, Any] | None]:
    """x positions for sweep values and the x-scale arguments: numeric values that span >= 20x
    get a log scale (symlog when 0 is among them, e.g. analog_time=0,1,5,20,50), others are
    categorical."""
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric:
        positive = [v for v in values if v > 0]
        scale = None
        if len(positive) >= 2 and max(positive) / min(positive) >= 20:
            if len(positive) == len(values):
                scale = {"value": "log"}
            elif all(v >= 0 for v in values):
                scale = {"value": "symlog", "linthresh": min(positive)}
        return [float(v) for v in values], None, scale
    return list(map(float, range(len(values)))), [spec_text(v) for v in values], None


def _members(study: dict[str, Any], method: str, point: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in study["rows"] if r["method"] == method and r.get("point", {}) == point
            and not r.get("task_failed")]


def _healthy_values(rows: list[dict[str, Any]], metric: str) -> list[float]:
    return [v for v in (finite(r.get(metric)) for r in rows if not is_diverged(r)) if v is not None]


def study_figures(study: dict[str, Any]) -> dict[str, Any]:
    """The study's figures by file name (matplotlib ``Figure`` objects, not yet saved)."""
    from thermo_kfac.experiments._plotting import agg_pyplot

    plt = agg_pyplot()  # files only: matplotlib's backend and pyplot are left alone
    colors = method_colors(study)
    figures = {f"loss_vs_{next(iter(study['grid']['sweeps']))}.png": _loss_figure(plt, study, colors)}
    if len(study["grid"]["sweeps"]) >= 2:
        figures["heatmap.png"] = _heatmap_figure(plt, study)
    figures["curves.png"] = _curves_figure(plt, study, colors)
    return figures


def write_plots(study: dict[str, Any], out: Path) -> list[str]:
    """Write the study's PNG plots into ``out`` (atomically each); return their names."""
    names = []
    for name, fig in study_figures(study).items():
        atomic_write(out / name, lambda f, fig=fig: fig.savefig(f, format="png", dpi=110), binary=True)
        names.append(name)
    return names


def _loss_figure(plt: Any, study: dict[str, Any], colors: dict[str, Any]) -> Any:
    """Final losses (and cosine, when reported) against the first swept key; one line per
    combination of the other keys, bars from the lowest to the highest seed, references as
    horizontal lines with their seeds' range as a band."""
    import matplotlib

    grid = study["grid"]["sweeps"]
    keys = list(grid)
    first, others = keys[0], keys[1:]
    loss = LOSS_NAMES.get(study["config"].get("loss"), "loss")
    panels = {"final_train_loss": ("final training loss", loss), "final_test_loss": ("final test loss", loss)}
    if any(r.get("cosine_to_exact") is not None for r in study["rows"]):
        panels["cosine_to_exact"] = ("accuracy of the analog solves", "cosine to the exact K-FAC direction")
    xs, ticks, scale = _axis(grid[first])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.6), squeeze=False)
    axes = dict(zip(panels, axes[0], strict=True))
    combos = [dict(zip(others, c, strict=True)) for c in itertools.product(*(grid[k] for k in others))]
    shades = matplotlib.colormaps[THERMO_MAP]  # the swept runs' family, as in the other files
    marks = {"diverged": False, "missing": False}
    for ci, combo in enumerate(combos):
        color = shades(0.85 * ci / max(len(combos) - 1, 1))
        for metric, ax in axes.items():
            px, mean, low, high = [], [], [], []
            for x, value in zip(xs, grid[first], strict=True):
                point = {first: value, **combo}
                rows = _members(study, STUDY_METHOD, point)
                if not rows:
                    continue
                diverged = sum(is_diverged(r) for r in rows)
                if diverged:  # one row of marks per combination, from the top: never on each other
                    marks["diverged"] = True
                    height = 0.96 - 0.07 * ci
                    ax.plot([x], [height], "x", color=DIVERGED_COLOR, ms=9, mew=2,
                            transform=ax.get_xaxis_transform())
                    where = f" {point_label(combo)}" if len(combos) > 1 else ""
                    last = x == max(xs)  # the text goes inwards
                    ax.annotate(f"{diverged}/{len(rows)}{where}", (x, height),
                                xycoords=ax.get_xaxis_transform(), xytext=(-7 if last else 7, -3),
                                textcoords="offset points", fontsize=7, color=DIVERGED_COLOR,
                                ha="right" if last else "left")
                values = _healthy_values(rows, metric)
                if not values:
                    if metric == "cosine_to_exact" and len(rows) > diverged:
                        marks["missing"] = True  # trained, but no analog solve was measured
                        ax.plot([x], [0.04], "v", color="0.4", ms=7, transform=ax.get_xaxis_transform())
                    continue
                px.append(x)
                mean.append(sum(values) / len(values))
                low.append(mean[-1] - min(values))
                high.append(max(values) - mean[-1])
                fallbacks = [finite(r.get("fallbacks")) or 0.0 for r in rows if not is_diverged(r)]
                if metric == "final_train_loss" and any(fallbacks):
                    # upright beside the point's x, one column per combination: no two texts meet
                    ax.annotate(f"{sum(fallbacks) / len(fallbacks):.0f} fallbacks", (x, 0.03),
                                xycoords=ax.get_xaxis_transform(), xytext=(3 + 9 * ci, 0),
                                textcoords="offset points", rotation=90, ha="left", va="bottom",
                                fontsize=7, color=color)
            if px:
                label = point_label(combo) if combo else "thermodynamic K-FAC"
                ax.errorbar(px, mean, yerr=[low, high], color=color, marker="o", ms=5, capsize=3, label=label)
    for entry in (e for e in study["summary"] if e["method"] != STUDY_METHOD):
        rows = _members(study, entry["method"], {})
        for metric, ax in axes.items():
            values = _healthy_values(rows, metric)
            if values:
                color = colors[entry["label"]]
                ax.axhline(sum(values) / len(values), color=color, ls="--", lw=1.3,
                           label=f"{entry['label']} (reference)")
                if max(values) > min(values):
                    ax.axhspan(min(values), max(values), color=color, alpha=0.12)
    for metric, ax in axes.items():
        title, ylabel = panels[metric]
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(AXIS_LABELS.get(first, first))
        if scale is not None:
            ax.set_xscale(**scale)
            if scale["value"] == "symlog":  # no empty negative half
                ax.set_xlim(left=-0.5 * scale["linthresh"], right=1.3 * max(xs))
        if ticks is not None:
            ax.set_xticks(xs, ticks)
        if metric != "cosine_to_exact" and _positive(ax):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    _legend_with_marks(axes["final_train_loss"], marks, plt)
    if "cosine_to_exact" in axes and marks["missing"]:
        from matplotlib.lines import Line2D

        axes["cosine_to_exact"].legend(handles=[Line2D([], [], ls="", marker="v", color="0.4",
                                                       label="no analog solve (all fell back)")], fontsize=7)
    fig.suptitle(_title(study) + "; bars: lowest to highest seed", fontsize=10)
    fig.tight_layout()
    return fig


def _legend_with_marks(ax: Any, marks: dict[str, bool], plt: Any) -> None:
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    if marks["diverged"]:
        handles.append(Line2D([], [], ls="", marker="x", mew=2, color=DIVERGED_COLOR))
        labels.append("diverged runs (k/n seeds; left out)")
    ax.legend(handles, labels, fontsize=7)


def _heatmap_figure(plt: Any, study: dict[str, Any]) -> Any:
    """log10 of the mean final training loss over the first two keys (averaged over the other
    keys and the seeds, diverged runs left out); cells with diverged runs say so, cells where
    every run diverged are hatched grey."""
    import matplotlib
    import numpy as np
    from matplotlib.patches import Patch, Rectangle

    grid = study["grid"]["sweeps"]
    first, second = list(grid)[:2]
    shape = (len(grid[second]), len(grid[first]))
    logged, text = np.full(shape, np.nan), [["-"] * shape[1] for _ in range(shape[0])]
    all_diverged = np.zeros(shape, dtype=bool)
    for j, v2 in enumerate(grid[second]):
        for i, v1 in enumerate(grid[first]):
            rows = [r for r in study["rows"] if r["method"] == STUDY_METHOD and not r.get("task_failed")
                    and r["point"].get(first) == v1 and r["point"].get(second) == v2]
            values = [v for v in _healthy_values(rows, "final_train_loss") if v > 0]
            diverged = sum(is_diverged(r) for r in rows)
            if values:
                mean = sum(values) / len(values)
                logged[j, i] = math.log10(mean)
                text[j][i] = f"{mean:.3g}" + (f"\n{diverged}/{len(rows)} diverged" if diverged else "")
            elif diverged:
                all_diverged[j, i] = True
                text[j][i] = f"diverged\n{diverged}/{len(rows)}"
    fig, ax = plt.subplots(figsize=(1.5 * shape[1] + 3.5, 0.9 * shape[0] + 2.8))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(logged), origin="lower", aspect="auto", cmap=cmap)
    for j in range(shape[0]):
        for i in range(shape[1]):
            if all_diverged[j, i]:
                ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, hatch="xx", lw=0,
                                       edgecolor=DIVERGED_COLOR))
            shade = image.norm(logged[j, i]) if not math.isnan(logged[j, i]) else 1.0
            color = DIVERGED_COLOR if all_diverged[j, i] else ("black" if shade > 0.6 else "white")
            ax.text(i, j, text[j][i], ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(shape[1]), [spec_text(v) for v in grid[first]])
    ax.set_yticks(range(shape[0]), [spec_text(v) for v in grid[second]])
    ax.set_xlabel(AXIS_LABELS.get(first, first))
    ax.set_ylabel(AXIS_LABELS.get(second, second))
    loss = LOSS_NAMES.get(study["config"].get("loss"), "loss")
    fig.colorbar(image, ax=ax, label=f"log10 final training loss ({loss})")
    if all_diverged.any():
        ax.legend(handles=[Patch(facecolor="0.85", hatch="xx", edgecolor=DIVERGED_COLOR,
                                 label="every run diverged")], fontsize=7, loc="upper left",
                  bbox_to_anchor=(0, -0.15))
    ax.set_title("thermodynamic K-FAC, mean over seeds (diverged runs left out)", fontsize=9)
    fig.suptitle(_title(study), fontsize=10)
    fig.tight_layout()
    return fig


def _curves_figure(plt: Any, study: dict[str, Any], colors: dict[str, Any]) -> Any:
    """Mean training and test loss over the healthy runs of each line (references dashed, each
    line its own marker so that equal curves stay visible); diverged runs end in a red ``x`` at
    the top of the panel, at the step where they stopped."""
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in study["rows"]:
        if not row.get("task_failed"):
            groups.setdefault(row["label"], []).append(row)
    markers = itertools.cycle("os^DvP*X<>")
    any_diverged = False
    for gi, (label, members) in enumerate(groups.items()):
        reference = members[0]["method"] != STUDY_METHOD
        marker = next(markers)
        healthy = [m for m in members if not is_diverged(m)]
        diverged = [m for m in members if is_diverged(m)]
        for ax, column in zip(axes, (1, 2), strict=True):
            curve = _mean_curve([m["curve"] for m in healthy], column)
            if curve:
                n = max(1, len(curve) // 8)
                ax.plot(*zip(*curve, strict=True), color=colors[label], ls="--" if reference else "-",
                        lw=1.3, marker=marker, ms=4, markevery=(gi % n, n), zorder=3 + gi % 3,
                        label=label + (f" ({len(diverged)} diverged)" if diverged else ""))
            for m in diverged:
                any_diverged = True
                last = m["curve"][-1][0] if m.get("curve") else m.get("steps", 0)
                ax.plot([last], [0.96], "x", color=DIVERGED_COLOR, mew=2, ms=8,
                        transform=ax.get_xaxis_transform())
    loss = LOSS_NAMES.get(study["config"].get("loss"), "loss")
    for ax, title in zip(axes, ("training loss", "test loss"), strict=True):
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{title}, {loss}")
        ax.set_title(title + " (mean over the seeds that did not diverge)", fontsize=9)
        if _positive(ax):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if any_diverged:
        handles.append(Line2D([], [], ls="", marker="x", mew=2, color=DIVERGED_COLOR))
        labels.append("a run diverged here (step)")
    axes[0].legend(handles, labels, fontsize=7)
    fig.suptitle(_title(study) + " (dashed: references)", fontsize=10)
    fig.tight_layout()
    return fig


def _mean_curve(curves: list[list[list[Any]]], column: int) -> list[tuple[float, float]]:
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for record in curve:
            value = finite(record[column])
            if value is not None:
                by_step.setdefault(int(record[0]), []).append(value)
    return [(step, sum(v) / len(v)) for step, v in sorted(by_step.items()) if len(v) == len(curves)]


def _positive(ax: Any) -> bool:
    """Whether the data lines (not the axis-fraction markers) are all positive (a log axis can
    show them)."""
    ys = [float(y) for line in ax.get_lines() if line.get_transform() == ax.transData
          for y in line.get_ydata()]
    return bool(ys) and all(y > 0 for y in ys)


def _title(study: dict[str, Any]) -> str:
    c = study["config"]
    widths = (c.get("model_options") or {}).get("widths")
    model = c["model"] + (f" {'-'.join(map(str, widths))}" if widths else "")
    return (f"{model} on {c['dataset']}, {c['steps']} steps, batch {c['batch_size']}\n"
            f"swept runs: {c['optimizer']}")
