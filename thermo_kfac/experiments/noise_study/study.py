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

Parallel: every (method, point, seed) row is an independent task (:func:`study_task`) run by an
:class:`~thermo_kfac.experiments.executors.Executor` (``--workers N``, ``--cluster ADDRESS``);
only this process writes the files, and rows are kept in the serial run's order. A task that
fails twice (it raised, or its worker died) is recorded as a row with its ``error`` and
``task_failed`` set in ``study.json``; a rerun runs such rows again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac.data import DATASETS, load_dataset
from thermo_kfac.experiments._io import jsonable
from thermo_kfac.experiments.executors import Executor, SerialExecutor, Task
from thermo_kfac.experiments.noise_study.outputs import (
    DIVERGENCE_FACTOR,
    ROW_COLUMNS_TAIL,
    STUDY_METHOD,
    mean_or_none,
    point_label,
    spec_text,
    summarize,
    warning_causes,
    write_rows,
)
from thermo_kfac.experiments.noise_study.plots import write_plots
from thermo_kfac.experiments.training import (
    ADAPTIVE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    TASK_LOSSES,
    OptimizerSpec,
    TrainingRun,
    build_optimizer,
    parse_optimizer_spec,
    resolve_options,
)
from thermo_kfac.grammar import parse_value
from thermo_kfac.models import available_models, build_model
from thermo_kfac.solvers.thermodynamic import ThermodynamicSolver

__all__ = ["DEFAULT_OPTIMIZER", "DEFAULT_REFERENCES", "FORMAT_VERSION", "STUDY_EVAL_POINTS",
           "StudyInterrupted", "StudyRun", "noise_study", "parse_sweep", "row_key", "study_task",
           "sweep_keys"]

FORMAT_VERSION = 1
DEFAULT_OPTIMIZER = "kfac:solver=thermo"
DEFAULT_REFERENCES = ("adam", "kfac")
STUDY_EVAL_POINTS = 50  # evaluations per run for the curves (fewer than compare's 200)


# The option that sets each config entry, as the refusal of a resume names it.
CONFIG_OPTIONS = {
    "format_version": "the study file format (a newer thermo-kfac)", "dataset": "--dataset",
    "dataset_options": "--max-train", "model": "--model", "model_options": "--widths/--model-options",
    "loss": "loss", "batch_size": "--batch-size", "steps": "--steps/--epochs", "eval_every": "--eval-every",
    "device": "--device", "optimizer": "--optimizer", "references": "--references",
    "sweep_keys": "the --sweep keys",
}


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C during a study: ``saved`` of the grid's ``total`` rows are in ``out`` (None: no
    folder); the same call again resumes. ``str()`` is the one line the command prints."""

    def __init__(self, saved: int, total: int, out: Path | None) -> None:
        self.saved, self.total, self.out = saved, total, out
        where = (f"{saved} of {total} rows saved in {out}; rerun the same command to resume"
                 if out is not None else f"{saved} of {total} rows done, none saved (no --out)")
        super().__init__(f"interrupted: {where}")


def sweep_keys() -> list[str]:
    """Names that ``--sweep`` accepts: the thermodynamic solver's options, as it declares them
    (:attr:`~thermo_kfac.solvers.KFACSolver.option_names`)."""
    return sorted(ThermodynamicSolver.option_names)


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
    text = ",".join([base.text] + [f"{k}={spec_text(v)}" for k, v in point.items()])
    return OptimizerSpec(base.name, dict(base.options), solver_options, text)


def row_key(config_id: str, method: str, point: dict[str, Any], seed: int) -> str:
    """Identity of a row: config hash, method, sweep point and seed."""
    return f"{config_id}|{method}|{json.dumps(point, sort_keys=True)}|seed={seed}"


class StudyRun(TrainingRun):
    """A training run that also collects the solver's accuracy against the exact direction
    (``cosine_to_exact``/``rel_error_to_exact`` in the per-layer apply reports, when present),
    and that counts as diverged (and stops) as soon as its training loss (the step's batch loss
    or an evaluation) is not finite or exceeds :data:`DIVERGENCE_FACTOR` times the initial
    training loss, not only when it stops being finite."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exact: dict[str, list[float]] = {"cosine_to_exact": [], "rel_error_to_exact": []}

    def step(self) -> dict[str, Any]:
        record = super().step()
        bound = DIVERGENCE_FACTOR * abs(float(self.initial["eval_train_loss"]))
        losses = [record.get("train_loss"), record.get("eval_train_loss")]
        if any(v is not None and not (math.isfinite(float(v)) and float(v) <= bound) for v in losses):
            self.diverged = True
            if "eval_train_loss" not in record:  # the row's final losses: where it diverged
                record.update(self.evaluation())
        if self.preconditioner is not None:
            reports = self.preconditioner.last_report.get("solver_reports", {})
            for name, report in reports.items():
                info = getattr(report, "info", None) or {}
                if not name.endswith("/apply"):
                    continue
                for key, values in self.exact.items():
                    value = info.get(key)
                    if value is not None and math.isfinite(float(value)):
                        values.append(float(value))
        return record


def noise_study(dataset: str = "digits", model: str = "mlp",
                sweeps: dict[str, Sequence[Any]] | Sequence[str] = ("bits=4,6,8,16",), *,
                optimizer: str = DEFAULT_OPTIMIZER, references: Sequence[str] = DEFAULT_REFERENCES,
                steps: int | None = None, epochs: float | None = None, batch_size: int | None = None,
                seeds: int = 1, seed: int = 0, loss: str | None = None,
                model_options: dict[str, Any] | None = None,
                dataset_options: dict[str, Any] | None = None, eval_every: int | None = None,
                out: str | Path | None = None, overwrite: bool = False, progress: bool = False,
                plots: bool = True, device: str = "cpu",
                on_row: Callable[[dict[str, Any]], None] | None = None,
                executor: Executor | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
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
        executor: runs the rows (default: :class:`SerialExecutor`, one after the other here);
            see :func:`thermo_kfac.experiments.executors.make_executor`.
        log: called with one-line messages for the user (``resuming: N of M rows found in DIR``).

    Raises:
        StudyInterrupted: on Ctrl-C (a ``KeyboardInterrupt``) once the study has started; it
            says how many rows are saved. Finished rows stay in ``out``.
    """
    given_eval_every = eval_every is not None
    grid = _check_sweeps(sweeps)
    seeds = check_positive("seeds", seeds, integer=True)
    seed = check_number("seed", seed, low=0, integer=True)
    base = parse_optimizer_spec(optimizer)
    if base.name not in ("kfac", ADAPTIVE) or resolve_options(base).get("solver") != "thermo":
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
    config = json.loads(json.dumps(jsonable(config), default=list))  # canonical (tuples -> lists)
    config_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]

    out_dir = Path(out) if out is not None else None
    rows: list[dict[str, Any]] = []
    created = datetime.now(UTC).isoformat(timespec="seconds")
    if out_dir is not None:
        derived = set() if given_eval_every else {"eval_every"}
        rows, created = _load_existing(out_dir, config, overwrite, created, derived)
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
    if rows and log is not None:
        others = len(rows) - (len(jobs) - len(pending))
        log(f"resuming: {len(jobs) - len(pending)} of {len(jobs)} rows found in {out_dir}"
            + (f" (and {others} rows of other sweep values or seeds)" if others else "")
            + ("; nothing to run" if not pending else ""))
    # A serial study's tasks run here: let them use the data loaded above.
    _DATA[_data_key(dataset, task, seed, dataset_options, str(torch_device))] = data0.to(torch_device)
    tasks = [Task(row_key(config_id, method, point, run_seed), study_task, dict(
        dataset=dataset, task=task, dataset_options=dataset_options, model=model,
        model_options=model_options, spec=spec, method=method, point=point, seed=run_seed, loss=loss,
        steps=steps, batch_size=batch_size, eval_every=eval_every, device=str(torch_device), grid=grid,
        config_id=config_id)) for method, point, run_seed, spec in pending]
    # Rows in the order of a serial run of this grid (rows of other grids in the folder first),
    # whichever finishes first and whichever finished before a kill.
    order = {row_key(config_id, *job[:3]): i for i, job in enumerate(jobs)}
    results = (executor or SerialExecutor()).map(tasks, progress=progress, desc="noise-study",
                                                 initial=len(jobs) - len(pending))
    try:
        for result in results:
            method, point, run_seed, spec = pending[result.index]
            row = result.value if result.ok else _failed_row(
                spec, method, point, run_seed, grid, config_id,
                f"task failed ({result.attempts} attempts): {result.error}")
            rows.append(row)
            rows.sort(key=lambda r: order.get(r["key"], -1))
            if out_dir is not None:
                write_rows(out_dir, study, grid)
            if on_row is not None:
                on_row(row)
        study["summary"] = summarize(rows, list(grid))
        if out_dir is not None:
            if plots:
                study["plots"] = write_plots(study, out_dir)
            write_rows(out_dir, study, grid)
    except KeyboardInterrupt:
        saved = sum(row_key(config_id, *job[:3]) in {r["key"] for r in rows} for job in jobs)
        raise StudyInterrupted(saved, len(jobs), out_dir) from None
    finally:
        results.close()  # an interrupted study cancels the tasks not yet started
        _DATA.clear()
    return study


_DATA: dict[str, Any] = {}  # datasets loaded in this process (driver or worker), by _data_key
_DATA_KEEP = 4


def _data_key(dataset: str, task: str | None, seed: int, options: dict[str, Any], device: str) -> str:
    return json.dumps([dataset, task, seed, jsonable(options), device], sort_keys=True, default=str)


def study_task(*, dataset: str, task: str | None, dataset_options: dict[str, Any], model: str,
               model_options: dict[str, Any], spec: OptimizerSpec, method: str, point: dict[str, Any],
               seed: int, loss: str, steps: int, batch_size: int, eval_every: int, device: str,
               grid: dict[str, list[Any]], config_id: str) -> dict[str, Any]:
    """One row of a study, run wherever the executor puts it (top level: picklable by name).

    Seeds itself from ``seed`` (initialization, data split and order, the solver's noise), so the
    row does not depend on the worker or on the other rows."""
    key = _data_key(dataset, task, seed, dataset_options, device)
    if key not in _DATA:
        if len(_DATA) >= _DATA_KEEP:  # a worker keeps the last few (one per seed, typically)
            del _DATA[next(iter(_DATA))]
        data = load_dataset(dataset, task=task, seed=seed, **dataset_options)
        _DATA[key] = data.to(torch.device(device))
    return _train_row(_DATA[key], model, model_options, spec, method, point, seed, loss=loss,
                      steps=steps, batch_size=batch_size, eval_every=eval_every,
                      device=torch.device(device), grid=grid, config_id=config_id)


def _failed_row(spec: OptimizerSpec, method: str, point: dict[str, Any], seed: int,
                grid: dict[str, list[Any]], config_id: str, error: str) -> dict[str, Any]:
    """The row of a task that did not return one; ``task_failed`` makes a rerun retry it."""
    row: dict[str, Any] = {
        "method": method, "label": spec.label if method != STUDY_METHOD else
        f"{STUDY_METHOD} {point_label(point)}", "optimizer": spec.label, "seed": seed,
        **{k: point.get(k) for k in grid}}
    row.update({c: None for c in ROW_COLUMNS_TAIL if c not in row})
    row.update(steps=0, diverged=False, fallbacks=0, error=error, key=row_key(config_id, method, point, seed),
               point=point, options=resolve_options(spec), curve=[], task_failed=True)
    return jsonable(row)


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
    # The run's warnings are recorded in the row (once per layer and cause) and summarised by
    # the command at the end, instead of being printed by every run (and its warm-up copy).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = StudyRun(data, model, model_options, spec, options, loss=loss, steps=steps,
                           batch_size=batch_size, seed=seed, eval_every=eval_every, device=device)
        except errors as err:  # the untimed warm-up steps already failed
            empty = dict.fromkeys(c for c in ROW_COLUMNS_TAIL if c not in tail)
            return jsonable({**base_row, **empty, "steps": 0, "diverged": False, "fallbacks": 0,
                             "error": _error_text(0, err), **tail, "curve": [],
                             "warnings": warning_causes([str(w.message) for w in caught])})
        caught.clear()  # the warm-up copy's warnings repeat the run's
        error = None
        try:
            while not run.done:
                run.step()
        except errors as err:
            # e.g. a matrix that is no longer positive definite after 4-bit coupling quantization:
            # a result of the study (recorded in the row), not a reason to stop the other runs.
            error = _error_text(len(run.history) + 1, err)
    result = run.result()
    run.close()
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
        "cosine_to_exact": mean_or_none(run.exact["cosine_to_exact"]),
        "rel_error_to_exact": mean_or_none(run.exact["rel_error_to_exact"]),
        **tail,
        "fallbacks_per_layer": fallbacks if isinstance(fallbacks, dict) else {},
        "warnings": warning_causes([str(w.message) for w in caught]),
        "curve": [[0, result["initial_train_loss"], result["initial_test_loss"]]] + [
            [r["step"], r.get("eval_train_loss"), r.get("test_loss")] for r in result["history"]
            if "eval_train_loss" in r],
    }
    return jsonable(row)


def _error_text(step: int, err: BaseException) -> str:
    where = "warm-up" if step == 0 else f"step {step}"
    return f"{where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _load_existing(out: Path, config: dict[str, Any], overwrite: bool, created: str,
                   derived: set[str] = frozenset()) -> tuple[list[dict[str, Any]], str]:
    """The rows already in ``out`` (a study with the same config), and when it was created.

    ``derived``: config entries that this call did not set but computed from others (the default
    ``eval_every`` follows ``steps``); a refusal names them only when nothing else differs."""
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
        order = list(CONFIG_OPTIONS)
        differ = sorted((k for k in set(old_config) | set(config) if old_config.get(k) != config.get(k)),
                        key=lambda k: (order.index(k) if k in order else len(order), k))
        if any(k not in derived for k in differ):
            differ = [k for k in differ if k not in derived]  # e.g. eval_every follows --steps
        detail = "; ".join(f"{k} ({CONFIG_OPTIONS.get(k, k)}): {old_config.get(k)!r} there, "
                           f"{config.get(k)!r} now" for k in differ)
        raise ValueError(f"{str(out)!r} holds a noise study with a different config ({detail}); rerun "
                         "with the same options to resume it, use another --out, or --overwrite to "
                         "discard it")
    # A key seen twice (should not happen) is kept once, the first time. Rows of tasks that
    # failed (raised or lost their worker twice) are dropped, so that this run retries them.
    seen: set[str] = set()
    rows = []
    for row in old_rows:
        if row.get("key") not in seen and not row.get("task_failed"):
            seen.add(row.get("key"))
            rows.append(row)
    return rows, old.get("created", created)


