"""PNG plots of a noise study: final loss against the first swept key, a heatmap of two keys,
and the mean training curves."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from thermo_kfac.experiments._io import atomic_write
from thermo_kfac.experiments.noise_study.outputs import STUDY_METHOD, finite, point_label, spec_text

__all__ = ["write_plots"]


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


def write_plots(study: dict[str, Any], out: Path) -> list[str]:
    """Write the study's PNG plots into ``out`` (atomically each); return their names."""
    from thermo_kfac.experiments._plotting import agg_pyplot

    plt = agg_pyplot()  # files only: matplotlib's backend and pyplot are left alone

    grid = study["grid"]["sweeps"]
    keys = list(grid)
    summary = study["summary"]
    refs = [e for e in summary if e["method"] != STUDY_METHOD]
    points = [e for e in summary if e["method"] == STUDY_METHOD]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names: list[str] = []

    def save(fig: Any, name: str) -> None:
        try:
            atomic_write(out / name, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
        finally:
            plt.close(fig)
        names.append(name)

    # Final loss (and cosine, when reported) against the first swept key; one line per
    # combination of the other keys.
    first, others = keys[0], keys[1:]
    panels = ["final_train_loss", "final_test_loss"]
    if any(e["cosine_to_exact"]["n"] for e in points):
        panels.append("cosine_to_exact")
    titles = {"final_train_loss": "final training loss", "final_test_loss": "final test loss",
              "cosine_to_exact": "cosine to exact natural gradient"}
    xs, ticks, log = _axis(grid[first])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    combos = [dict(zip(others, c, strict=True)) for c in itertools.product(*(grid[k] for k in others))]
    for ci, combo in enumerate(combos):
        color = colors[ci % len(colors)]
        for ax, metric in zip(axes[0], panels, strict=True):
            px, mean, std = [], [], []
            for x, value in zip(xs, grid[first], strict=True):
                point = {first: value, **combo}
                match = [e for e in points if e["point"] == point and e[metric]["mean"] is not None]
                if match:
                    px.append(x)
                    mean.append(match[0][metric]["mean"])
                    std.append(match[0][metric]["std"] or 0.0)
                    fallbacks = match[0]["fallbacks"]["mean"]
                    if fallbacks and metric == panels[0]:  # digital fallbacks shaped this point
                        ax.annotate(f"{fallbacks:.0f} fallbacks", (x, mean[-1]), xytext=(4, 6),
                                    textcoords="offset points", fontsize=7, color=color)
            if px:
                label = point_label(combo) or "thermo"
                ax.errorbar(px, mean, yerr=std, color=color, marker="o", capsize=3, label=label)
    for ri, entry in enumerate(refs):
        color = colors[(len(combos) + ri) % len(colors)]
        for ax, metric in zip(axes[0], panels, strict=True):
            stat = entry[metric]
            if stat["mean"] is None:
                continue
            ax.axhline(stat["mean"], color=color, ls="--", lw=1.2, label=f"{entry['label']} (reference)")
            if stat["std"]:
                ax.axhspan(stat["mean"] - stat["std"], stat["mean"] + stat["std"], color=color, alpha=0.12)
    for ax, metric in zip(axes[0], panels, strict=True):
        ax.set_xlabel(first)
        ax.set_title(titles[metric])
        if log is not None:
            ax.set_xscale(**log)
            if log["value"] == "symlog":  # no empty negative half
                ax.set_xlim(left=-0.5 * log["linthresh"], right=1.3 * max(xs))
        if ticks is not None:
            ax.set_xticks(xs, ticks)
        if metric != "cosine_to_exact" and _all_positive(ax):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(study) + " (mean +- std over seeds)")
    fig.tight_layout()
    save(fig, f"loss_vs_{first}.png")

    if len(keys) >= 2:
        second = keys[1]
        matrix = [[math.nan] * len(grid[first]) for _ in grid[second]]
        for j, v2 in enumerate(grid[second]):
            for i, v1 in enumerate(grid[first]):
                # mean over the remaining keys' values and the seeds
                values = [r.get("final_train_loss") for r in study["rows"]
                          if r["method"] == STUDY_METHOD and r["point"].get(first) == v1
                          and r["point"].get(second) == v2 and finite(r.get("final_train_loss")) is not None]
                if values:
                    matrix[j][i] = sum(values) / len(values)
        fig, ax = plt.subplots(figsize=(1.4 * len(grid[first]) + 3, 0.9 * len(grid[second]) + 2.5))
        logged = [[math.log10(v) if v > 0 else math.nan for v in row] for row in matrix]
        image = ax.imshow(logged, origin="lower", aspect="auto", cmap="viridis")
        for j, row in enumerate(matrix):
            for i, v in enumerate(row):
                # dark text on the bright (high) end of viridis, white elsewhere
                shade = image.norm(logged[j][i]) if not math.isnan(v) else 0.0
                ax.text(i, j, "-" if math.isnan(v) else f"{v:.3g}", ha="center", va="center",
                        color="black" if shade > 0.6 else "white", fontsize=8)
        ax.set_xticks(range(len(grid[first])), [spec_text(v) for v in grid[first]])
        ax.set_yticks(range(len(grid[second])), [spec_text(v) for v in grid[second]])
        ax.set_xlabel(first)
        ax.set_ylabel(second)
        fig.colorbar(image, ax=ax, label="log10 final training loss")
        fig.suptitle(_title(study))
        fig.tight_layout()
        save(fig, "heatmap.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in study["rows"]:
        groups.setdefault(row["label"], []).append(row)
    for gi, (label, members) in enumerate(groups.items()):
        color = colors[gi % len(colors)]
        style = "--" if members[0]["method"] != STUDY_METHOD else "-"
        for ax, column in zip(axes, (1, 2), strict=True):
            curve = _mean_curve([m["curve"] for m in members], column)
            if curve:
                ax.plot(*zip(*curve, strict=True), color=color, ls=style, lw=1.4, label=label)
    for ax, title in zip(axes, ("training loss", "test loss"), strict=True):
        ax.set_xlabel("step")
        ax.set_title(title + " (mean over seeds)")
        if _all_positive(ax):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(_title(study) + " (dashed: references)")
    fig.tight_layout()
    save(fig, "curves.png")
    return names


def _mean_curve(curves: list[list[list[Any]]], column: int) -> list[tuple[float, float]]:
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for record in curve:
            value = finite(record[column])
            if value is not None:
                by_step.setdefault(int(record[0]), []).append(value)
    return [(step, sum(v) / len(v)) for step, v in sorted(by_step.items()) if len(v) == len(curves)]


def _all_positive(ax: Any) -> bool:
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    return bool(ys) and all(float(y) > 0 for y in ys)


def _title(study: dict[str, Any]) -> str:
    c = study["config"]
    return f"{c['model']} on {c['dataset']}, {c['steps']} steps, batch {c['batch_size']}"


