"""Outputs of the training experiments: ``results.json``, ``metrics.csv``, PNG plots, the table.

:func:`write_results` renders every file first and then replaces each one atomically
(``results.json`` last), so a failure leaves the previous results in place.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from thermo_kfac.experiments._io import atomic_write, format_seconds, jsonable, text_table
from thermo_kfac.experiments.run_notes import format_causes
from thermo_kfac.experiments.training.codesign import MACHINES, predicted_curve

__all__ = ["CSV_COLUMNS", "format_table", "format_warnings", "metrics_csv", "render_plots", "time_to_target",
           "trace_files", "write_results"]

CSV_COLUMNS = ["run", "optimizer", "step", "epoch", "train_loss", "train_accuracy", "step_time_s",
               "wall_time_s", "eval_train_loss", "eval_train_accuracy", "test_loss", "test_accuracy",
               "predicted_hardware_s", "predicted_digital_s", "predicted_hybrid_s", "fallbacks"]


def trace_files(traces: dict[str, dict[str, Any]]) -> dict[str, str]:
    """File names of the K-FAC runs' traces: the first run's is ``trace.json``, each further
    one ``trace-<label>.json`` (label characters other than letters, digits, ``._-`` become ``_``)."""
    files = {}
    for i, (label, trace) in enumerate(traces.items()):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
        files["trace.json" if i == 0 else f"trace-{safe}.json"] = json.dumps(trace, indent=1,
                                                                             allow_nan=False)
    return files


def write_results(results: dict[str, Any], out: str | Path,
                  traces: dict[str, dict[str, Any]] | None = None) -> list[Path]:
    """Write ``results.json``, ``metrics.csv``, the plots and the K-FAC runs' traces
    (:func:`trace_files`) into ``out`` (created if missing).

    All files are rendered before the first one is written, and each replaces its predecessor
    atomically, ``results.json`` last; returns the paths written.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output directory {str(out)!r}: {err}") from None
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is not a directory")
    files: dict[str, str | bytes] = {"metrics.csv": metrics_csv(results), **render_plots(results),
                                     **trace_files(traces or {})}
    files["results.json"] = json.dumps(jsonable(results), indent=1, allow_nan=False)
    return [atomic_write(out / name, content) for name, content in files.items()]


def metrics_csv(results: dict[str, Any]) -> str:
    """``metrics.csv``: one row per step of every run (columns :data:`CSV_COLUMNS`)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for run in results["runs"]:
        for record in run["history"]:
            writer.writerow({"run": run["label"], "optimizer": run["optimizer"], **record})
    return buffer.getvalue()


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def render_plots(results: dict[str, Any]) -> dict[str, bytes]:
    """The PNG plots of ``results``: ``{"loss.png": bytes, ...}`` (``accuracy.png`` for
    classification, ``compare.png`` for a comparison)."""
    from thermo_kfac.experiments._plotting import agg_pyplot

    plt = agg_pyplot()  # files only: matplotlib's backend and pyplot are left alone

    runs = results["runs"]
    classification = any("test_accuracy" in r for r in runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    files: dict[str, bytes] = {}

    def series(run: dict[str, Any], key: str, x_key: str) -> tuple[list[float], list[float]]:
        start = [{"step": 0, "wall_time_s": 0.0, **run.get("initial_eval", {})}]
        points = [(r[x_key], r[key]) for r in start + run["history"]
                  if r.get(key) is not None and math.isfinite(r[key])]
        return [p[0] for p in points], [p[1] for p in points]

    def positive(ax: Any) -> None:
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)

    priced = any(r.get("predicted_step_s") for r in runs)  # the co-design panel (codesign.py)
    fig, axes = plt.subplots(1, 3 if priced else 2, figsize=(16.5 if priced else 11, 4.2))
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for ax, x_key in zip(axes, ("step", "wall_time_s"), strict=False):
            ax.plot(*series(run, "train_loss", x_key), color=color, alpha=0.25, lw=0.8)
            ax.plot(*series(run, "eval_train_loss", x_key), color=color, lw=1.6,
                    label=f"{run['label']} train")
            ax.plot(*series(run, "test_loss", x_key), color=color, lw=1.2, ls="--",
                    label=f"{run['label']} test")
    for ax, xlabel in zip(axes, ("step", "training wall time [s]"), strict=False):
        if results.get("target_loss"):
            ax.axhline(results["target_loss"], color="gray", lw=0.8, ls=":", label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        positive(ax)
    axes[0].legend(fontsize=8)
    if priced:
        _predicted_panel(axes[2], results, colors)
        positive(axes[2])
    fig.suptitle(_title(results) + " (faint: batch loss)")
    fig.tight_layout()
    files["loss.png"] = _png(fig)

    if classification:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            for ax, x_key in zip(axes, ("step", "wall_time_s"), strict=True):
                ax.plot(*series(run, "eval_train_accuracy", x_key), color=color, lw=1.6,
                        label=f"{run['label']} train")
                ax.plot(*series(run, "test_accuracy", x_key), color=color, lw=1.2, ls="--",
                        label=f"{run['label']} test")
        for ax, xlabel in zip(axes, ("step", "training wall time [s]"), strict=True):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(_title(results))
        fig.tight_layout()
        files["accuracy.png"] = _png(fig)

    if results.get("command") == "compare":
        panels = ["eval_train_loss", "test_loss"] + (["test_accuracy"] if classification else [])
        fig, axes = plt.subplots(1, len(panels) + priced, figsize=(5 * (len(panels) + priced), 4.2))
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            for ax, key in zip(axes, panels, strict=False):
                ax.plot(*series(run, key, "wall_time_s"), color=color, lw=1.6, label=run["label"])
            if run.get("time_to_target_s") is not None:
                axes[0].axvline(run["time_to_target_s"], color=color, lw=0.8, ls=":")
        titles = {"eval_train_loss": "training loss", "test_loss": "test loss",
                  "test_accuracy": "test accuracy"}
        for ax, key in zip(axes, panels, strict=False):
            ax.set_xlabel("training wall time [s]")
            ax.set_title(titles[key])
            if key == "test_accuracy":
                ax.grid(True, alpha=0.3)
            else:
                positive(ax)
        if results.get("target_loss"):
            axes[0].axhline(results["target_loss"], color="gray", lw=0.8, ls=":", label="target")
        axes[0].legend(fontsize=8)
        if priced:
            _predicted_panel(axes[-1], results, colors)
            positive(axes[-1])
        fig.suptitle(_title(results) + " (dotted: time to target)")
        fig.tight_layout()
        files["compare.png"] = _png(fig)
    return files


def _hardware_to_target(run: dict[str, Any]) -> str:
    """``"digital / hybrid"`` predicted time to target of a run (``-``: not priced there)."""
    reached = run.get("predicted_time_to_target_s")
    if not reached:
        return "-"
    if all(v is None for v in reached.values()):
        return "not reached"
    return " / ".join(format_seconds(reached.get(m)) for m in ("digital", "hybrid"))


def _predicted_panel(ax: Any, results: dict[str, Any], colors: list[str]) -> None:
    """Training loss against the predicted hardware time: per priced run one curve per machine
    (solid: the all-digital preset, dashed: the hybrid machine); first-order runs on the digital
    preset only. Dotted verticals: predicted time to target."""
    styles = {"digital": "-", "hybrid": "--"}
    for i, run in enumerate(results["runs"]):
        color = colors[i % len(colors)]
        curves = {m: predicted_curve(run, m) for m in MACHINES}
        same = curves["hybrid"] == curves["digital"]  # no analog layer: one curve for both
        for machine in MACHINES:
            xs, ys = curves[machine]
            if not xs or (machine == "hybrid" and same):
                continue
            ax.plot(xs, ys, color=color, lw=1.6, ls=styles[machine],
                    label=f"{run['label']} (digital {run['predicted_preset']}{' = hybrid' if same else ''})"
                    if machine == "digital" else f"{run['label']} (hybrid)")
            reached = (run.get("predicted_time_to_target_s") or {}).get(machine)
            if reached is not None:
                ax.axvline(reached, color=color, lw=0.6, ls=":")
    if results.get("target_loss"):
        ax.axhline(results["target_loss"], color="gray", lw=0.8, ls=":")
    ax.set_xlabel("predicted hardware time [s]")
    ax.set_title("training loss vs predicted hardware time")
    ax.legend(fontsize=7)


def _title(results: dict[str, Any]) -> str:
    config = results["config"]
    return (f"{config['model']} on {config['dataset']['name']}, batch {config['batch_size']}, "
            f"seed {config['seed']}")


def time_to_target(run: dict[str, Any], target: float | None) -> tuple[float | None, int | None]:
    """``(wall time, step)`` of the first evaluation with full training loss <= ``target``."""
    if target is None:
        return None, None
    if run["initial_train_loss"] <= target:
        return 0.0, 0
    for record in run["history"]:
        value = record.get("eval_train_loss")
        if value is not None and value <= target:
            return record["wall_time_s"], record["step"]
    return None, None


def format_table(results: dict[str, Any]) -> str:
    """The comparison table printed by the CLI."""
    runs = results["runs"]
    classification = any("test_accuracy" in r for r in runs)
    target = results.get("target_loss")
    reference = runs[0].get("time_to_target_s") if runs else None
    header = ["optimizer", "steps", "train loss", "test loss"]
    if classification:
        header.append("test acc")
    header += ["wall s", "ms/step"]
    predicted = any(r.get("predicted_digital_s") is not None for r in runs)
    if predicted:
        header += ["hw digital/step", "hw hybrid/step"]
    if target is not None:
        header += ["to target s", "speed-up"]
    on_hardware = any(r.get("predicted_time_to_target_s") for r in runs)
    if on_hardware:
        header.append("hw to target digital / hybrid")
    rows = []

    def number(value: Any, fmt: str) -> str:
        return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
            else format(value, fmt)

    for run in runs:
        row = [run["label"] + (" (diverged)" if run.get("diverged") else ""), str(run["steps"]),
               number(run["final_train_loss"], ".4g"), number(run["final_test_loss"], ".4g")]
        if classification:
            acc = run.get("test_accuracy")
            row.append("-" if acc is None else f"{100 * acc:.1f}%")
        row += [number(run["wall_time_s"], ".2f"), number(1e3 * run["mean_step_time_s"], ".2f")]
        if predicted:
            row += [format_seconds(run.get("predicted_digital_s")),
                    format_seconds(run.get("predicted_hybrid_s"))]
        if target is not None:
            ttt = run.get("time_to_target_s")
            row.append("not reached" if ttt is None else f"{ttt:.2f}")
            row.append(f"{reference / ttt:.2f}x" if reference is not None and ttt else "-")
        if on_hardware:
            row.append(_hardware_to_target(run))
        rows.append(row)
    lines = text_table(header, rows).splitlines()
    if target is not None:
        lines.append(f"target train loss {target:.4g} ({results.get('target_source')}); "
                     "speed-up = first run's time to target / this run's")
    if predicted:
        lines.append("hw digital/hybrid: predicted K-FAC curvature time per step of the all-digital "
                     "machine and of the hybrid one (analog layers on the thermodynamic device)")
    if on_hardware:
        presets = sorted({r["predicted_preset"] for r in runs if r.get("predicted_preset")})
        lines.append(f"hw to target: predicted time of the whole steps to the target (forward, backward "
                     f"and update on {', '.join(presets)} plus the curvature work) on the all-digital / "
                     "the hybrid machine; first-order runs on the digital preset")
    for run in runs:
        used = {layer: n for layer, n in (run.get("fallbacks") or {}).items() if n}
        if used:
            detail = ", ".join(f"{layer!r} in {n}" for layer, n in used.items())
            lines.append(f"{run['label']}: fallback solver used on layer {detail} of "
                         f"{run['steps']} steps")
    config = results["config"]
    lines.append(f"wall time: training steps only (evaluation excluded), {config['torch_threads']} "
                 f"torch threads; losses on the full train/test sets")
    return "\n".join(lines)


def format_warnings(results: dict[str, Any]) -> list[str]:
    """The runs' warnings, one line per layer and cause (``results["warnings"]``), with the layer's
    fallback steps when one K-FAC run has fallbacks, e.g. ``layer '5' fell back 300/300 steps:
    not positive definite ...``; empty when no run warned."""
    with_fallbacks = [r for r in results["runs"] if any((r.get("fallbacks") or {}).values())]
    fallbacks = with_fallbacks[0]["fallbacks"] if len(with_fallbacks) == 1 else None
    steps = int(with_fallbacks[0]["steps"]) if len(with_fallbacks) == 1 else None
    return format_causes(results.get("warnings") or [], fallbacks, steps)
