"""Rows, summary, CSV/JSON files and the terminal table of a noise study.

``study.json`` is written first and ``results.csv`` is regenerated from its rows, each file
atomically (:func:`thermo_kfac.experiments._io.atomic_write`), so the two cannot drift apart
across a kill.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thermo_kfac.experiments._io import atomic_write, jsonable, text_table
from thermo_kfac.experiments.run_notes import warning_causes
from thermo_kfac.grammar import format_value

__all__ = ["DIVERGENCE_FACTOR", "METRICS", "ROW_COLUMNS_HEAD", "ROW_COLUMNS_TAIL", "STUDY_METHOD",
           "csv_text", "finite", "format_table", "format_warnings", "is_diverged", "mean_or_none",
           "point_label", "spec_text", "summarize", "warning_causes", "write_rows"]

STUDY_METHOD = "thermo"  # ``method`` column of the swept runs
# A run whose training loss is not finite or exceeds this many times its initial loss has
# diverged: no optimizer that is working multiplies the loss by a thousand, and a loss above
# that bound would dominate any mean it took part in.
DIVERGENCE_FACTOR = 1e3
METRICS = ("final_train_loss", "final_test_loss", "train_accuracy", "test_accuracy", "wall_time_s",
           "predicted_hardware_s", "fallbacks", "cosine_to_exact", "rel_error_to_exact")
ROW_COLUMNS_HEAD = ["method", "label", "optimizer", "seed"]
ROW_COLUMNS_TAIL = ["steps", "final_train_loss", "final_test_loss", "train_accuracy", "test_accuracy",
                     "diverged", "wall_time_s", "ms_per_step", "predicted_hardware_s",
                     "predicted_hardware_per_step_s", "fallbacks", "cosine_to_exact",
                     "rel_error_to_exact", "error", "key"]


def spec_text(value: Any) -> str:
    """A sweep value as written in a spec (``none``, ``true``/``false``, ``8``, ``0.01``)."""
    return format_value(value)



def point_label(point: dict[str, Any]) -> str:
    """``bits=8,kappa0=0.01`` (the swept values of one point)."""
    return ",".join(f"{k}={spec_text(v)}" for k, v in point.items())



def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of ``values``; None when there are none."""
    return sum(values) / len(values) if values else None


def finite(value: Any) -> float | None:
    """``value`` as a finite float; None for None, booleans, text and NaN/Inf."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def is_diverged(row: dict[str, Any]) -> bool:
    """Whether a row's run diverged: flagged while training, or (rows written before the flag
    covered it) a final training loss that is missing without an error, or above
    :data:`DIVERGENCE_FACTOR` times the initial loss (the first point of the row's curve)."""
    if row.get("diverged"):
        return True
    if row.get("error") or not row.get("steps"):
        return False  # failed, counted as failed
    loss = finite(row.get("final_train_loss"))
    if loss is None:
        return True
    curve = row.get("curve") or []
    initial = finite(curve[0][1]) if curve and len(curve[0]) > 1 else None
    return initial is not None and loss > DIVERGENCE_FACTOR * abs(initial)


def _csv_columns(grid_keys: Sequence[str]) -> list[str]:
    return ROW_COLUMNS_HEAD + list(grid_keys) + ROW_COLUMNS_TAIL


def csv_text(rows: list[dict[str, Any]], grid_keys: Sequence[str]) -> str:
    """``results.csv``: the row columns with the swept keys between head and tail."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_csv_columns(grid_keys), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def write_rows(out: Path, study: dict[str, Any], grid: dict[str, list[Any]]) -> None:
    """study.json first, then results.csv, each atomically; the CSV is regenerated from the
    JSON rows, so the two cannot drift apart across a kill."""
    study["summary"] = summarize(study["rows"], list(grid))
    atomic_write(out / "study.json", json.dumps(jsonable(study), indent=1, allow_nan=False))
    atomic_write(out / "results.csv", csv_text(study["rows"], list(grid)))



def summarize(rows: list[dict[str, Any]], grid_keys: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, std (sample, n-1) and count over seeds of each metric, per (method, point).

    Diverged runs (:func:`is_diverged`) are left out of every mean and counted in ``diverged``;
    failed runs (an ``error``) have no metrics and are counted in ``failed``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row["method"], row.get("point", {})], sort_keys=True), []).append(row)
    summary = []
    for members in groups.values():
        first = members[0]
        entry: dict[str, Any] = {"method": first["method"], "label": first["label"],
                                 "point": first.get("point", {}), "n_seeds": len(members),
                                 "diverged": sum(is_diverged(m) for m in members),
                                 "failed": sum(bool(m.get("error")) for m in members)}
        healthy = [m for m in members if not is_diverged(m)]
        for metric in METRICS:
            values = [v for v in (finite(m.get(metric)) for m in healthy) if v is not None]
            mean = mean_or_none(values)
            std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                   if len(values) > 1 and mean is not None else (0.0 if values else None))
            entry[metric] = {"mean": mean, "std": std, "n": len(values)}
        summary.append(entry)
    # references first, then the points in the order they were run (sort is stable)
    summary.sort(key=lambda e: e["method"] == STUDY_METHOD)
    return summary


def format_table(study: dict[str, Any]) -> str:
    """The terminal table: one line per method/point, mean +- std over seeds."""
    summary = study.get("summary") or summarize(study["rows"], study["config"]["sweep_keys"])
    has = {m: any(e[m]["n"] for e in summary) for m in METRICS}
    has["fallbacks"] = any(e["fallbacks"]["mean"] for e in summary)  # shown only when any happened
    header = ["method", "seeds", "train loss", "test loss"]
    keys = [("final_train_loss", ".4g"), ("final_test_loss", ".4g")]
    if has["test_accuracy"]:
        header.append("test acc %")
        keys.append(("test_accuracy", "pct"))
    header.append("wall s")
    keys.append(("wall_time_s", ".2f"))
    for metric, title, fmt in (("predicted_hardware_s", "hw s", ".3g"), ("fallbacks", "fallbacks", ".0f"),
                               ("cosine_to_exact", "cos to NG", ".4f"),
                               ("rel_error_to_exact", "rel err", ".3g")):
        if has[metric]:
            header.append(title)
            keys.append((metric, fmt))

    def cell(stat: dict[str, Any], fmt: str) -> str:
        if stat["mean"] is None:
            return "-"
        mean, std = stat["mean"], stat["std"] or 0.0
        if fmt == "pct":
            mean, std, fmt = 100 * mean, 100 * std, ".1f"
        text = format(mean, fmt)
        return text + (f" +- {format(std, fmt)}" if stat["n"] > 1 else "")

    table = []
    for entry in summary:
        label = entry["label"] + (f" ({entry['diverged']} diverged)" if entry["diverged"] else "") \
            + (f" ({entry['failed']} failed)" if entry.get("failed") else "")
        table.append([label, str(entry["n_seeds"])] + [cell(entry[m], f) for m, f in keys])
    lines = text_table(header, table).splitlines()
    config = study["config"]
    lines.append(f"{config['model']} on {config['dataset']}, {config['steps']} steps, batch "
                 f"{config['batch_size']}; losses on the full train/test sets at the end; mean +- std "
                 f"over seeds; wall s: training steps only")
    if any(e["diverged"] for e in summary):
        lines.append(f"diverged: training loss not finite or above {DIVERGENCE_FACTOR:g}x its initial value; "
                     "stopped there and left out of the means")
    return "\n".join(lines)




def format_warnings(study: dict[str, Any]) -> list[str]:
    """One line per study line (method/point) and cause of its runs' warnings, naming each
    layer with its fallback steps over all of the line's runs, e.g. ``thermo bits=4: layer '5'
    fell back 300/300 steps (3 of 3 runs): ...``; empty when no run warned."""
    causes: dict[tuple[str, str], dict[str | None, list[dict[str, Any]]]] = {}
    members: dict[str, list[dict[str, Any]]] = {}
    for row in study["rows"]:
        members.setdefault(row["label"], []).append(row)
        for item in row.get("warnings") or []:
            layers = causes.setdefault((row["label"], item["cause"]), {})
            layers.setdefault(item["layer"], []).append(row)
    lines = []
    for (label, cause), layers in causes.items():
        runs = members[label]
        steps = sum(int(r.get("steps") or 0) for r in runs)
        parts = []
        for layer, rows in layers.items():
            where = f"layer {layer!r}" if layer is not None else "the model"
            fell = sum(int((r.get("fallbacks_per_layer") or {}).get(layer) or 0) for r in rows)
            what = f" fell back {fell}/{steps} steps" if fell else ""
            parts.append(f"{where}{what} ({len(rows)} of {len(runs)} runs)")
        lines.append(f"{label}: {', '.join(parts)}: {cause}")
    return lines
