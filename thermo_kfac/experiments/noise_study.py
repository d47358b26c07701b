"""Noise-robustness study: thermodynamic K-FAC swept over simulator settings, with references.

:func:`noise_study` trains the same task once per *sweep point* (a combination of thermodynamic
solver options such as ``bits``, ``kappa0`` or ``analog_time``; several sweeps form a grid) and
per seed, plus the reference optimizers (default: Adam and digital K-FAC) for the same steps and
seeds. Every run goes through the training library (:mod:`thermo_kfac.experiments.training`):
the same optimizer specs, initialization, batches and timing as ``thermo-kfac compare``.

Outputs in ``out``:

- ``results.csv``: one row per (method, sweep point, seed) with the swept values, the final
  full-set train/test loss and accuracy, training wall time, the predicted hardware time, and the
  mean cosine / relative error of the solver's direction to the exact K-FAC natural gradient when
  the solver reports them (``track_exact=True``).
- ``study.json``: ``config`` (everything that determines a row, except its point and seed),
  ``grid``, ``rows`` (the CSV rows plus options and a loss curve) and ``summary`` (mean/std over
  seeds per method and point).
- PNG plots: ``loss_vs_<key>.png`` (final loss against the first swept key, references as
  horizontal lines), ``heatmap.png`` (two swept keys), ``curves.png`` (training curves).

Resume: after each run, ``study.json`` and then ``results.csv`` are rewritten atomically
(temporary file + ``os.replace``), so a killed study keeps every finished row. Running the same
study into the same folder skips rows whose key (config hash, method, point, seed) is present; a
folder holding a study with a different ``config`` is refused unless ``overwrite=True``. The grid
(sweep values and seeds) may grow between runs: rows are keyed individually.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from hw_models.noise import NoiseConfig
from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac.data import DATASETS, load_dataset
from thermo_kfac.experiments import training
from thermo_kfac.experiments.training import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    TASK_LOSSES,
    OptimizerSpec,
    _jsonable,
    _Run,
    _to_device,
    build_optimizer,
    parse_optimizer_spec,
    resolve_options,
)
from thermo_kfac.models import available_models, build_model
from thermo_kfac.policy import parse_value
from thermo_kfac.solvers.thermodynamic import ThermodynamicSolver

FORMAT_VERSION = 1
STUDY_METHOD = "thermo"  # ``method`` column of the swept runs
DEFAULT_OPTIMIZER = "kfac:solver=thermo"
DEFAULT_REFERENCES = ("adam", "kfac")
STUDY_EVAL_POINTS = 50  # evaluations per run for the curves (fewer than compare's 200)
METRICS = ("final_train_loss", "final_test_loss", "train_accuracy", "test_accuracy", "wall_time_s",
           "predicted_hardware_s", "fallbacks", "cosine_to_exact", "rel_error_to_exact")
_ROW_COLUMNS_HEAD = ["method", "label", "optimizer", "seed"]
_ROW_COLUMNS_TAIL = ["steps", "final_train_loss", "final_test_loss", "train_accuracy", "test_accuracy",
                     "diverged", "wall_time_s", "ms_per_step", "predicted_hardware_s",
                     "predicted_hardware_per_step_s", "fallbacks", "cosine_to_exact",
                     "rel_error_to_exact", "error", "key"]


def sweep_keys() -> list[str]:
    """Names that ``--sweep`` accepts: the thermodynamic solver's options (its constructor's
    parameters and every :class:`hw_models.NoiseConfig` field)."""
    params = [p.name for p in inspect.signature(ThermodynamicSolver.__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    fields = [f.name for f in dataclasses.fields(NoiseConfig)]
    return sorted(set(params) | set(fields))


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``"bits=4,6,8"`` -> ``("bits", [4, 6, 8])``; values read as int, float, bool, none or text."""
    key, sep, values = str(text).partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key or not values.strip():
        raise ValueError(f"--sweep {text!r} is not key=v1,v2,...; keys: {', '.join(sweep_keys())}")
    return key, [parse_value(v) for v in values.split(",") if v.strip()]


def _check_sweeps(sweeps: dict[str, Sequence[Any]] | Sequence[str]) -> dict[str, list[Any]]:
    if not isinstance(sweeps, dict):
        parsed: dict[str, list[Any]] = {}
        for text in sweeps:
            key, values = parse_sweep(text)
            if key in parsed:
                raise ValueError(f"--sweep {key} is given twice; list all its values in one --sweep")
            parsed[key] = values
        sweeps = parsed
    valid = sweep_keys()
    out: dict[str, list[Any]] = {}
    for key, values in sweeps.items():
        if key not in valid:
            raise ValueError(f"unknown sweep key {key!r}; valid: {', '.join(valid)}")
        values = list(values) if isinstance(values, list | tuple) else [values]
        if not values:
            raise ValueError(f"sweep {key!r} has no values")
        keys = [json.dumps(v) for v in values]
        if len(set(keys)) != len(keys):
            raise ValueError(f"sweep {key!r} repeats a value: {values}")
        out[key] = values
    if not out:
        raise ValueError(f"give at least one sweep (key=v1,v2,...); keys: {', '.join(valid)}")
    return out


def _spec_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _point_spec(base: OptimizerSpec, point: dict[str, Any], seed: int) -> OptimizerSpec:
    """The base spec with the point's solver options; solver ``seed``/``device_seed`` default to
    the run's seed so that seeds also vary the simulated noise and device."""
    solver_options = dict(base.solver_options)
    for key, value in point.items():
        if key in solver_options:
            raise ValueError(f"{key!r} is both swept and fixed in the optimizer spec {base.text!r}")
        solver_options[key] = value
    solver_options.setdefault("seed", seed)
    solver_options.setdefault("device_seed", seed)
    text = ",".join([base.text] + [f"{k}={_spec_text(v)}" for k, v in point.items()])
    return OptimizerSpec(base.name, dict(base.options), solver_options, text)


def point_label(point: dict[str, Any]) -> str:
    """``bits=8,kappa0=0.01`` (the swept values of one point)."""
    return ",".join(f"{k}={_spec_text(v)}" for k, v in point.items())


def row_key(config_id: str, method: str, point: dict[str, Any], seed: int) -> str:
    """Identity of a row: config hash, method, sweep point and seed."""
    return f"{config_id}|{method}|{json.dumps(point, sort_keys=True)}|seed={seed}"


class _StudyRun(_Run):
    """A training run that also collects the solver's accuracy against the exact direction
    (``cosine_to_exact``/``rel_error_to_exact`` in the per-layer apply reports, when present)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exact: dict[str, list[float]] = {"cosine_to_exact": [], "rel_error_to_exact": []}

    def step(self) -> dict[str, Any]:
        record = super().step()
        if self.precond is not None:
            reports = self.precond.last_report.get("solver_reports", {})
            for name, report in reports.items():
                info = getattr(report, "info", None) or {}
                if not name.endswith("/apply"):
                    continue
                for key, values in self.exact.items():
                    value = info.get(key)
                    if value is not None and math.isfinite(float(value)):
                        values.append(float(value))
        return record


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def noise_study(dataset: str = "digits", model: str = "mlp",
                sweeps: dict[str, Sequence[Any]] | Sequence[str] = ("bits=4,6,8,16",), *,
                optimizer: str = DEFAULT_OPTIMIZER, references: Sequence[str] = DEFAULT_REFERENCES,
                steps: int | None = None, epochs: float | None = None, batch_size: int | None = None,
                seeds: int = 1, seed: int = 0, loss: str | None = None,
                model_options: dict[str, Any] | None = None,
                dataset_options: dict[str, Any] | None = None, eval_every: int | None = None,
                out: str | Path | None = None, overwrite: bool = False, progress: bool = False,
                plots: bool = True, device: str = "cpu",
                on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a noise-robustness study; return ``study.json``'s content.

    Args:
        dataset, model, model_options, dataset_options, loss, batch_size, steps, epochs,
            eval_every, device: the task, as in :func:`thermo_kfac.experiments.training.compare`
            (default ``eval_every``: about 50 evaluations per run).
        sweeps: ``{"bits": [4, 8], ...}`` or texts ``"bits=4,8"``; keys from :func:`sweep_keys`.
            Several sweeps give their Cartesian product.
        optimizer: the swept runs' spec, a ``kfac`` spec with ``solver=thermo`` (fixed solver
            options go here, e.g. ``kfac:solver=thermo,method=solve,integrator=analytic``).
        references: specs trained at every seed without the sweep (``method`` = their label).
        seeds, seed: the seeds ``seed, seed + 1, ..., seed + seeds - 1`` (initialization, data
            split and order, and the solver's noise/device seeds unless the spec sets them).
        out: folder for ``results.csv``, ``study.json`` and plots; rows already there are kept
            and skipped. ``overwrite``: discard a study with a different config instead of refusing.
        on_row: called with each new row after it has been written (a hook for logging).
    """
    grid = _check_sweeps(sweeps)
    seeds = check_positive("seeds", seeds, integer=True)
    seed = check_number("seed", seed, low=0, integer=True)
    base = parse_optimizer_spec(optimizer)
    if base.name != "kfac" or resolve_options(base).get("solver") != "thermo":
        raise ValueError(f"optimizer {optimizer!r} must be a kfac spec with solver=thermo (the swept "
                         f"keys are thermodynamic solver options), e.g. {DEFAULT_OPTIMIZER!r}")
    ref_specs = [parse_optimizer_spec(r) for r in references]
    labels = [s.label for s in ref_specs]
    if len(set(labels)) != len(labels) or STUDY_METHOD in labels:
        raise ValueError(f"reference labels must be distinct and not {STUDY_METHOD!r}: {labels}")
    check_choice("dataset", dataset, DATASETS)
    if model not in available_models():
        check_choice("model", model, available_models())
    model_options = dict(model_options or {})
    dataset_options = dict(dataset_options or {})
    task = "autoencoder" if model == "autoencoder" else None
    data0 = load_dataset(dataset, task=task, seed=seed, **dataset_options)
    loss = check_choice("loss", loss if loss is not None else data0.loss, TASK_LOSSES[data0.task])
    batch_size = check_positive("batch_size", batch_size if batch_size is not None else DEFAULT_BATCH_SIZE,
                                integer=True)
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if steps is None:
        epochs = epochs if epochs is not None else DEFAULT_EPOCHS.get(data0.name, 5)
        check_number("epochs", epochs, low=0, low_inclusive=False)
        steps = max(1, round(epochs * data0.steps_per_epoch(batch_size)))
    steps = check_positive("steps", steps, integer=True)
    eval_every = check_positive("eval_every", eval_every if eval_every is not None
                                else max(1, math.ceil(steps / STUDY_EVAL_POINTS)), integer=True)
    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a torch device ({err})") from None

    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    seed_list = list(range(seed, seed + seeds))
    # Every spec is built once before any training, so bad options fail fast.
    jobs: list[tuple[str, dict[str, Any], int, OptimizerSpec]] = []
    for spec in ref_specs:
        jobs += [(spec.label, {}, s, spec) for s in seed_list]
    for point in points:
        jobs += [(STUDY_METHOD, point, s, _point_spec(base, point, s)) for s in seed_list]
    checked: set[str] = set()
    for method, point, _, spec in jobs:
        probe_key = json.dumps([method, point], sort_keys=True)
        if probe_key in checked:
            continue
        checked.add(probe_key)
        try:
            build_optimizer(spec, build_model(model, data0, **model_options), resolve_options(spec),
                            loss, seed)
        except (ValueError, TypeError) as err:
            where = f" at sweep point {point_label(point)}" if point else ""
            raise ValueError(f"optimizer {spec.label!r}{where}: {err}") from None

    config = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset, "dataset_options": dataset_options, "model": model,
        "model_options": model_options, "loss": loss, "batch_size": batch_size, "steps": steps,
        "eval_every": eval_every, "device": str(torch_device), "optimizer": base.text,
        "references": labels, "sweep_keys": list(grid),
    }
    config = json.loads(json.dumps(_jsonable(config), default=list))  # canonical (tuples -> lists)
    config_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]

    out_dir = Path(out) if out is not None else None
    rows: list[dict[str, Any]] = []
    created = datetime.now(UTC).isoformat(timespec="seconds")
    if out_dir is not None:
        rows, created = _load_existing(out_dir, config, overwrite, created)
    done = {r["key"] for r in rows}
    # The study covers every row in the folder: values and seeds of earlier runs of a grown grid
    # stay in the grid that the table and plots use.
    all_values = {k: list(v) for k, v in grid.items()}
    for row in rows:
        for key, value in row.get("point", {}).items():
            if key in all_values and value not in all_values[key]:
                all_values[key].append(value)
    all_seeds = sorted(set(seed_list) | {int(r["seed"]) for r in rows})
    study: dict[str, Any] = {"command": "noise-study", "created": created, "config": config,
                             "config_id": config_id,
                             "grid": {"sweeps": all_values, "seeds": all_seeds}, "rows": rows}

    pending = [j for j in jobs if row_key(config_id, j[0], j[1], j[2]) not in done]
    data_cache: dict[int, Any] = {}
    bar = _bar(len(jobs), len(jobs) - len(pending), progress)
    try:
        for method, point, run_seed, spec in pending:
            if bar is not None:
                bar.set_postfix_str(f"{method} {point_label(point)} seed {run_seed}".strip(), refresh=True)
            if run_seed not in data_cache:
                data = data0 if run_seed == seed else load_dataset(dataset, task=task, seed=run_seed,
                                                                   **dataset_options)
                data_cache[run_seed] = _to_device(data, torch_device)
            row = _train_row(data_cache[run_seed], model, model_options, spec, method, point, run_seed,
                             loss=loss, steps=steps, batch_size=batch_size, eval_every=eval_every,
                             device=torch_device, grid=grid, config_id=config_id)
            rows.append(row)
            if out_dir is not None:
                _write_rows(out_dir, study, grid)
            if bar is not None:
                bar.update(1)
            if on_row is not None:
                on_row(row)
    finally:
        if bar is not None:
            bar.close()
    study["summary"] = summarize(rows, list(grid))
    if out_dir is not None:
        if plots:
            study["plots"] = write_plots(study, out_dir)
        _write_rows(out_dir, study, grid)
    return study


def _bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="noise-study", unit="run", file=sys.stderr,
                dynamic_ncols=True)


def _train_row(data: Any, model: str, model_options: dict[str, Any], spec: OptimizerSpec, method: str,
               point: dict[str, Any], seed: int, *, loss: str, steps: int, batch_size: int,
               eval_every: int, device: torch.device, grid: dict[str, list[Any]],
               config_id: str) -> dict[str, Any]:
    options = resolve_options(spec)
    base_row: dict[str, Any] = {
        "method": method, "label": spec.label if method != STUDY_METHOD else
        f"{STUDY_METHOD} {point_label(point)}", "optimizer": spec.label, "seed": seed,
        **{k: point.get(k) for k in grid}}
    tail = {"key": row_key(config_id, method, point, seed), "point": point, "options": options}
    errors = (ValueError, RuntimeError, torch.linalg.LinAlgError)
    try:
        run = _StudyRun(data, model, model_options, spec, options, loss=loss, steps=steps,
                        batch_size=batch_size, seed=seed, eval_every=eval_every, device=device)
    except errors as err:  # the untimed warm-up steps already failed
        empty = dict.fromkeys(c for c in _ROW_COLUMNS_TAIL if c not in tail)
        return _jsonable({**base_row, **empty, "steps": 0, "diverged": False, "fallbacks": 0,
                          "error": _error_text(0, err), **tail, "curve": []})
    error = None
    try:
        while not run.done:
            run.step()
    except errors as err:
        # e.g. a matrix that is no longer positive definite after 4-bit coupling quantization:
        # a result of the study (recorded in the row), not a reason to stop the other runs.
        error = _error_text(len(run.history) + 1, err)
    result = run.result()
    if run.precond is not None:
        run.precond.remove_hooks()
    n = max(int(result["steps"]), 1)
    hardware = result.get("predicted_hardware_total_s")
    fallbacks = result.get("fallbacks") or {}
    row: dict[str, Any] = {
        **base_row,
        "steps": result["steps"],
        "final_train_loss": None if error else result["final_train_loss"],
        "final_test_loss": None if error else result["final_test_loss"],
        "train_accuracy": None if error else result.get("train_accuracy"),
        "test_accuracy": None if error else result.get("test_accuracy"),
        "diverged": result["diverged"], "error": error, "wall_time_s": result["wall_time_s"],
        "ms_per_step": 1e3 * result["mean_step_time_s"],
        "predicted_hardware_s": hardware,
        "predicted_hardware_per_step_s": None if hardware is None else hardware / n,
        "fallbacks": sum(fallbacks.values()) if isinstance(fallbacks, dict) else fallbacks,
        "cosine_to_exact": _mean(run.exact["cosine_to_exact"]),
        "rel_error_to_exact": _mean(run.exact["rel_error_to_exact"]),
        **tail,
        "curve": [[0, result["initial_train_loss"], result["initial_test_loss"]]] + [
            [r["step"], r.get("eval_train_loss"), r.get("test_loss")] for r in result["history"]
            if "eval_train_loss" in r],
    }
    return _jsonable(row)


def _error_text(step: int, err: BaseException) -> str:
    where = "warm-up" if step == 0 else f"step {step}"
    return f"{where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _csv_columns(grid_keys: Sequence[str]) -> list[str]:
    return _ROW_COLUMNS_HEAD + list(grid_keys) + _ROW_COLUMNS_TAIL


def _csv_text(rows: list[dict[str, Any]], grid_keys: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_csv_columns(grid_keys), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def _write_rows(out: Path, study: dict[str, Any], grid: dict[str, list[Any]]) -> None:
    """study.json first, then results.csv, each atomically; the CSV is regenerated from the
    JSON rows, so the two cannot drift apart across a kill."""
    study["summary"] = summarize(study["rows"], list(grid))
    _atomic_write(out / "study.json", json.dumps(_jsonable(study), indent=1, allow_nan=False))
    _atomic_write(out / "results.csv", _csv_text(study["rows"], list(grid)))


def _load_existing(out: Path, config: dict[str, Any], overwrite: bool,
                   created: str) -> tuple[list[dict[str, Any]], str]:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output directory {str(out)!r}: {err}") from None
    path = out / "study.json"
    if not path.exists():
        if (out / "results.csv").exists() and not overwrite:
            raise ValueError(f"{str(out)!r} has results.csv but no study.json (not a noise study, or "
                             "damaged); use another --out or --overwrite")
        return [], created
    if overwrite:
        return [], created
    try:
        old = json.loads(path.read_text())
        old_config, old_rows = old["config"], old["rows"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the study in {str(path)!r} ({err}); use another --out or "
                         "--overwrite") from None
    if old_config != config:
        differ = sorted(k for k in set(old_config) | set(config) if old_config.get(k) != config.get(k))
        detail = "; ".join(f"{k}: {old_config.get(k)!r} there, {config.get(k)!r} now" for k in differ)
        raise ValueError(f"{str(out)!r} holds a noise study with a different config ({detail}); use "
                         "another --out, or --overwrite to discard it")
    # A key seen twice (should not happen) is kept once, the first time.
    seen: set[str] = set()
    rows = []
    for row in old_rows:
        if row.get("key") not in seen:
            seen.add(row.get("key"))
            rows.append(row)
    return rows, old.get("created", created)


# ------------------------------------------------------------------------------- summary
def summarize(rows: list[dict[str, Any]], grid_keys: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, std (sample, n-1) and count over seeds of each metric, per (method, point)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row["method"], row.get("point", {})], sort_keys=True), []).append(row)
    summary = []
    for members in groups.values():
        first = members[0]
        entry: dict[str, Any] = {"method": first["method"], "label": first["label"],
                                 "point": first.get("point", {}), "n_seeds": len(members),
                                 "diverged": sum(bool(m.get("diverged")) for m in members),
                                 "failed": sum(bool(m.get("error")) for m in members)}
        for metric in METRICS:
            values = [v for v in (_finite(m.get(metric)) for m in members) if v is not None]
            mean = _mean(values)
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

    table = [header]
    for entry in summary:
        label = entry["label"] + (f" ({entry['diverged']} diverged)" if entry["diverged"] else "") \
            + (f" ({entry['failed']} failed)" if entry.get("failed") else "")
        table.append([label, str(entry["n_seeds"])] + [cell(entry[m], f) for m, f in keys])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    config = study["config"]
    lines.append(f"{config['model']} on {config['dataset']}, {config['steps']} steps, batch "
                 f"{config['batch_size']}; losses on the full train/test sets at the end; mean +- std "
                 f"over seeds; wall s: training steps only")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- plots
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
    return list(map(float, range(len(values)))), [_spec_text(v) for v in values], None


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
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".png", dir=out)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, out / name)
        finally:
            Path(tmp).unlink(missing_ok=True)
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
                          and r["point"].get(second) == v2 and _finite(r.get("final_train_loss")) is not None]
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
        ax.set_xticks(range(len(grid[first])), [_spec_text(v) for v in grid[first]])
        ax.set_yticks(range(len(grid[second])), [_spec_text(v) for v in grid[second]])
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
            value = _finite(record[column])
            if value is not None:
                by_step.setdefault(int(record[0]), []).append(value)
    return [(step, sum(v) / len(v)) for step, v in sorted(by_step.items()) if len(v) == len(curves)]


def _all_positive(ax: Any) -> bool:
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    return bool(ys) and all(float(y) > 0 for y in ys)


def _title(study: dict[str, Any]) -> str:
    c = study["config"]
    return f"{c['model']} on {c['dataset']}, {c['steps']} steps, batch {c['batch_size']}"


# ----------------------------------------------------------------------------------- CLI
def _cli(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads={args.threads} must be a positive integer")
        torch.set_num_threads(args.threads)
    model_options = dict(args.model_options)
    if args.widths is not None:
        model_options["widths"] = args.widths
    dataset_options: dict[str, Any] = {}
    if args.max_train is not None:
        dataset_options["max_train"] = check_positive("--max-train", args.max_train, integer=True)
    study = noise_study(args.dataset, args.model, args.sweep, optimizer=args.optimizer,
                        references=args.references, steps=args.steps, epochs=args.epochs,
                        batch_size=args.batch_size, seeds=args.seeds, seed=args.seed,
                        model_options=model_options, dataset_options=dataset_options,
                        eval_every=args.eval_every, out=args.out, overwrite=args.overwrite,
                        progress=not args.no_progress, device=args.device)
    print(format_table(study))
    if args.out:
        print(f"wrote {Path(args.out) / 'results.csv'}, study.json and plots "
              f"({', '.join(study.get('plots', []))})")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``noise-study`` sub-command to the ``thermo-kfac`` CLI."""
    parser = subparsers.add_parser(
        "noise-study", help="sweep thermodynamic-solver settings (bits, kappa0, analog time, ...) "
                            "with Adam and digital K-FAC as references",
        description="Train with thermodynamic K-FAC at every point of a grid of solver settings "
                    "and every seed, plus reference optimizers; print a table and write "
                    "DIR/results.csv, DIR/study.json and plots. Rerunning with the same --out "
                    "skips finished rows (a killed study resumes). Sweep keys: "
                    + ", ".join(sweep_keys()) + ".")
    parser.add_argument("--sweep", action="append", required=True, metavar="KEY=V1,V2,...",
                        help="a swept solver option and its values (repeat for a grid), e.g. "
                             "bits=4,6,8,16 or kappa0=1e-3,1e-2; 'none' means unset (e.g. no "
                             "quantization)")
    parser.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, metavar="SPEC",
                        help="spec of the swept runs, kfac with solver=thermo plus fixed options "
                             f"(default {DEFAULT_OPTIMIZER}), e.g. "
                             "kfac:solver=thermo,method=solve,integrator=analytic,kappa0=1e-4")
    parser.add_argument("--references", nargs="*", default=list(DEFAULT_REFERENCES), metavar="SPEC",
                        help="reference optimizer specs run at every seed (default: adam kfac)")
    parser.add_argument("--dataset", default="digits", choices=DATASETS, metavar="NAME",
                        help=f"dataset: {', '.join(DATASETS)} (default digits)")
    parser.add_argument("--model", default="mlp", choices=available_models(), metavar="NAME",
                        help=f"model: {', '.join(available_models())} (default mlp)")
    parser.add_argument("--widths", type=training._int_list, default=None, metavar="W,W,...",
                        help="hidden widths of mlp / encoder widths of autoencoder")
    parser.add_argument("--model-options", type=training._kv_list, default={}, metavar="K=V,...",
                        help="further model options")
    parser.add_argument("--max-train", type=int, default=None, metavar="N",
                        help="use a seeded random subset of N training examples")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, metavar="N", help="training steps per run")
    length.add_argument("--epochs", type=float, default=None, metavar="E",
                        help="training epochs per run (default: 40 on digits, 5 otherwise)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help=f"examples per step (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--seeds", type=int, default=1, metavar="K",
                        help="seeds per point: --seed .. --seed+K-1 (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--eval-every", type=int, default=None, metavar="N",
                        help=f"evaluate every N steps for the curves (default: about "
                             f"{STUDY_EVAL_POINTS} per run)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write results.csv, study.json and plots here; finished rows in DIR are "
                             "kept and skipped")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a study in --out whose config differs (default: refuse)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cli)
