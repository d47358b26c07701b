"""The experiments: :func:`compare` several optimizers on one task, :func:`train` one.

Every run of a comparison starts from the same initial parameters and sees the same batches in
the same order; the runs advance in lockstep (:func:`~.run.train_interleaved`).
``time_to_target_s`` is the training wall time at the first evaluation whose full training-set
loss is at or below the target loss (default in ``compare``: the final training loss of the first
optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac.data import DATASETS, Dataset, load_dataset
from thermo_kfac.distributed import DistributedConfig, is_main_process, world_size
from thermo_kfac.experiments.run_notes import merge_causes, recorded_warnings, warning_causes
from thermo_kfac.experiments.training.codesign import add_predicted_times
from thermo_kfac.experiments.training.optimizers import build_optimizer
from thermo_kfac.experiments.training.options import (
    ADAPTIVE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    EVAL_POINTS,
    OPTIONS,
    TASK_LOSSES,
    OptimizerSpec,
    check_option,
    parse_optimizer_spec,
    resolve_options,
    solver_option_hint,
)
from thermo_kfac.experiments.training.outputs import time_to_target, write_results
from thermo_kfac.experiments.training.run import TrainingRun, train_interleaved
from thermo_kfac.experiments.training.tensorboard import check_tensorboard
from thermo_kfac.models import available_models, build_model

if TYPE_CHECKING:
    from thermo_kfac.experiments.executors import Executor

__all__ = ["compare", "compare_task", "train"]


def compare(dataset: str | Dataset = "digits", model: str = "mlp",
            optimizers: Sequence[str | OptimizerSpec] = ("adam", "kfac"), *,
            steps: int | None = None, epochs: float | None = None, batch_size: int | None = None,
            seed: int = 0, loss: str | None = None, model_options: dict[str, Any] | None = None,
            dataset_options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
            eval_every: int | None = None, target_loss: float | None = None,
            target_from_first: bool = True, out: str | Path | None = None, progress: str | bool = False,
            device: str = "cpu", command: str = "compare", print_assignment: bool = False,
            distributed: DistributedConfig | None = None,
            executor: Executor | None = None, tensorboard: str | Path | None = None) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` once per optimizer spec, from the same start on the same batches.

    Args:
        dataset: a :class:`Dataset` or a name for :func:`thermo_kfac.data.load_dataset`
            (``dataset_options`` are passed to it; an ``autoencoder`` model selects the
            auto-encoder task).
        model: a name of :func:`thermo_kfac.models.build_model`, with ``model_options``.
        optimizers: specs ``name[:key=value,...]`` (see :func:`parse_optimizer_spec`).
        steps, epochs: training length (one of them; default: the dataset's default epochs).
        batch_size: examples per step (default 256; larger than the dataset means full batch).
        seed: model initialization, data order, K-FAC's sampling.
        loss: ``cross_entropy``, ``mse`` or ``bce``; default from the task.
        overrides: option values for every run that takes them (the CLI's ``--lr`` ...); a
            spec's own ``key=value`` wins.
        eval_every: evaluate the full training/test loss every this many steps (default: about
            200 evaluations per run). Evaluation time is excluded from wall time.
        target_loss: training loss for ``time_to_target_s``; default (``target_from_first``):
            the final training loss of the first run.
        out: directory for ``results.json``, ``metrics.csv``, PNG plots and every K-FAC run's
            ``trace.json`` (written atomically at the end; nothing is written if a run fails).
        progress: ``"auto"`` (tqdm bars on a terminal, plain periodic lines otherwise), ``"bar"``,
            ``"lines"`` or ``"none"``; ``True`` is ``"auto"``, ``False`` ``"none"``.
        device: torch device for model and data.
        print_assignment: print each K-FAC run's solver per layer before training.
        distributed: how K-FAC spreads its work inside a process group (``train --placement``
            ...); None: the preconditioner's default.
        executor: a parallel :class:`thermo_kfac.experiments.executors.Executor` runs each
            optimizer as a task (same results as serial; wall times then measured under the
            load of the other runs, not interleaved); so does a serial one with a
            ``task_timeout`` (one run after the other). None or a serial executor: interleaved here.
        tensorboard: a folder for TensorBoard event files, one subfolder per run (needs the
            ``[tensorboard]`` extra; :mod:`thermo_kfac.experiments.training.tensorboard`).

    Returns:
        ``{"command", "config", "seed", "target_loss", "target_source", "runs": [...], "warnings"}``;
        ``warnings``: the runs' warnings, recorded instead of printed, once per layer and cause
        (``{"layer", "cause", "count"}``; :func:`~thermo_kfac.experiments.run_notes.warning_causes`).
    """
    specs = [parse_optimizer_spec(s) for s in optimizers]
    if not specs:
        raise ValueError("give at least one optimizer")
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        if key not in OPTIONS:
            raise ValueError(f"unknown optimizer option {key!r}; valid: {', '.join(OPTIONS)}")
        if not any(s.name in OPTIONS[key].optimizers for s in specs):
            raise ValueError(f"option {key.replace('_', '-')}={value!r} applies to "
                             f"{', '.join(OPTIONS[key].optimizers)} only, and none of the optimizers "
                             f"({', '.join(s.label for s in specs)}) is one of them")
        overrides[key] = check_option(key, value) if value is not None else None
    seed = check_number("seed", seed, integer=True)
    model_options = dict(model_options or {})
    if model not in available_models():
        check_choice("model", model, available_models())
    if isinstance(dataset, Dataset):
        data = dataset
        if model == "autoencoder" and data.task != "autoencoder":
            raise ValueError("model 'autoencoder' needs a dataset loaded with task='autoencoder'")
    else:
        check_choice("dataset", dataset, DATASETS)
        task = "autoencoder" if model == "autoencoder" else None
        data = load_dataset(dataset, task=task, seed=seed, **(dataset_options or {}))
    loss = check_choice("loss", loss if loss is not None else data.loss, TASK_LOSSES[data.task])
    batch_size = check_positive("batch_size", batch_size if batch_size is not None else DEFAULT_BATCH_SIZE,
                                integer=True)
    steps_per_epoch = data.steps_per_epoch(batch_size)
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if steps is None:
        epochs = epochs if epochs is not None else DEFAULT_EPOCHS.get(data.name, 5)
        check_number("epochs", epochs, low=0, low_inclusive=False)
        steps = max(1, round(epochs * steps_per_epoch))
    steps = check_positive("steps", steps, integer=True)
    if eval_every is None:
        eval_every = max(1, math.ceil(steps / EVAL_POINTS))
    eval_every = check_positive("eval_every", eval_every, integer=True)
    if target_loss is not None:
        check_number("target_loss", target_loss)
    if tensorboard is not None:
        check_tensorboard()
        if not is_main_process():
            tensorboard = None  # one writer
    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a torch device ({err})") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} is not available (torch.cuda.is_available() is False)")
    resolved = [resolve_options(s, overrides) for s in specs]
    # Fail on bad K-FAC/solver options before any training starts.
    for spec, options in zip(specs, resolved, strict=True):
        if spec.name in ("kfac", ADAPTIVE):
            probe = build_model(model, data, **model_options)
            try:
                build_optimizer(spec, probe, options, loss, seed)
            except ValueError as err:
                raise ValueError(f"optimizer {spec.label!r}: {err}{solver_option_hint(spec)}") from None
        else:
            build_model(model, data, **model_options)
    parallel = executor is not None and executor.parallel
    # a task timeout needs tasks: with it even a serial executor runs one task per optimizer
    as_tasks = executor is not None and (parallel or executor.task_timeout is not None)
    if as_tasks and distributed is not None:
        raise ValueError("a parallel executor (--workers/--cluster) runs each optimizer in its own "
                         "process; it cannot be combined with distributed K-FAC (a process group)")
    data = data.to(torch_device)

    labels = unique_labels([s.label for s in specs])
    if as_tasks:  # one task per optimizer; a task loads a named dataset itself
        from thermo_kfac.experiments.executors import Task, run_all

        source = dataset if isinstance(dataset, Dataset) else (
            dataset, "autoencoder" if model == "autoencoder" else None, dataset_options or {})
        tasks = [Task(label, compare_task, dict(
            data=source, model=model, model_options=model_options,
            spec=OptimizerSpec(spec.name, spec.options, spec.solver_options, label), options=options,
            loss=loss, steps=steps, batch_size=batch_size, seed=seed, eval_every=eval_every,
            device=str(torch_device), tensorboard=None if tensorboard is None else str(tensorboard)))
            for spec, options, label in zip(specs, resolved, labels, strict=True)]
        outcomes = run_all(executor, tasks, progress=progress, desc=command)
        runs = [o["run"] for o in outcomes]
        causes = merge_causes(*(o.get("warnings") or [] for o in outcomes))
        traces = {label: o["trace"] for label, o in zip(labels, outcomes, strict=True)
                  if o["trace"] is not None}
    else:
        setup_messages: list[str] = []  # the warm-up's warnings repeat the run's
        messages: list[str] = []
        with recorded_warnings(setup_messages):
            runners = [
                TrainingRun(data, model, model_options,
                            OptimizerSpec(spec.name, spec.options, spec.solver_options, label), options,
                            loss=loss, steps=steps, batch_size=batch_size, seed=seed, eval_every=eval_every,
                            device=torch_device, distributed=distributed, tensorboard=tensorboard)
                for spec, options, label in zip(specs, resolved, labels, strict=True)]
        if print_assignment and is_main_process():
            _print_assignments(runners)
        try:
            with recorded_warnings(messages):
                train_interleaved(runners, progress if is_main_process() else "none")
        finally:
            for runner in runners:
                runner.close_log()
        if print_assignment and is_main_process():
            _print_assignments(runners, after=True)
        runs = [runner.result() for runner in runners]
        traces = {runner.spec.label: trace for runner in runners if (trace := runner.trace()) is not None}
        causes = _with_setup_causes(warning_causes(messages), warning_causes(setup_messages))
    target_source = "given"
    if target_loss is None and target_from_first:
        target_loss = runs[0]["final_train_loss"]
        target_source = f"final train loss of {runs[0]['label']}"
    for run in runs:
        run["time_to_target_s"], run["steps_to_target"] = time_to_target(run, target_loss)
    add_predicted_times({"runs": runs, "target_loss": target_loss}, model, model_options, data, batch_size)
    results = {
        "command": command,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seed": seed,
        "target_loss": target_loss,
        "target_source": target_source if target_loss is not None else None,
        "config": {
            "dataset": data.describe(), "model": model, "model_options": model_options, "loss": loss,
            "batch_size": batch_size, "steps": steps, "steps_per_epoch": steps_per_epoch,
            "epochs": steps / steps_per_epoch, "eval_every": eval_every, "seed": seed,
            "optimizers": [s.label for s in specs], "overrides": overrides, "device": str(torch_device),
            "tensorboard": None if tensorboard is None else str(tensorboard),
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "world_size": world_size(),
            "wall_time_note": "training steps only; evaluation excluded" + (
                f"; runs in parallel ({executor.describe()}), each timed under the others' load"
                if parallel else "; runs one after the other as tasks, not interleaved" if as_tasks else ""),
        },
        "runs": runs,
        "warnings": causes,
    }
    if out is not None and is_main_process():  # one writer
        write_results(results, out, traces)
    return results


def compare_task(*, data: Dataset | tuple[str, str | None, dict[str, Any]], model: str,
                 model_options: dict[str, Any], spec: OptimizerSpec, options: dict[str, Any], loss: str,
                 steps: int, batch_size: int, seed: int, eval_every: int, device: str,
                 tensorboard: str | None = None) -> dict[str, Any]:
    """One optimizer's run of :func:`compare` as an executor task (top level: picklable by name).

    ``data``: a :class:`Dataset`, or ``(name, task, dataset_options)`` loaded here with ``seed``
    (as :func:`compare` loads it). Returns ``{"run": ..., "trace": ..., "warnings": ...}``: the
    run's entry of ``results["runs"]``, its ``trace.json`` entry (``None`` when the run records
    none) and its warnings once per layer and cause
    (:func:`~thermo_kfac.experiments.run_notes.warning_causes`)."""
    torch_device = torch.device(device)
    if not isinstance(data, Dataset):
        name, task, dataset_options = data
        data = load_dataset(name, task=task, seed=seed, **dataset_options)
    setup_messages: list[str] = []  # the warm-up's warnings repeat the run's
    messages: list[str] = []
    with recorded_warnings(setup_messages):
        run = TrainingRun(data.to(torch_device), model, model_options, spec, options, loss=loss,
                          steps=steps, batch_size=batch_size, seed=seed, eval_every=eval_every,
                          device=torch_device, tensorboard=tensorboard)
    try:
        with recorded_warnings(messages):
            run.run()
        causes = _with_setup_causes(warning_causes(messages), warning_causes(setup_messages))
        return {"run": run.result(), "trace": run.trace(), "warnings": causes}
    finally:
        run.close()


def _with_setup_causes(causes: list[dict[str, Any]], setup: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training loop's warning causes plus those only the set-up (warm-up) raised."""
    seen = {(c["layer"], c["cause"]) for c in causes}
    return causes + [c for c in setup if (c["layer"], c["cause"]) not in seen]


def train(dataset: str | Dataset = "digits", model: str = "mlp", optimizer: str | OptimizerSpec = "kfac",
          **kwargs: Any) -> dict[str, Any]:
    """Train with one optimizer spec; same arguments as :func:`compare` (``results["runs"]`` has
    one run). ``time_to_target_s`` is recorded only when ``target_loss`` is given."""
    kwargs.setdefault("target_from_first", False)
    return compare(dataset, model, [optimizer], command="train", **kwargs)


def unique_labels(labels: list[str]) -> list[str]:
    """Run labels made distinct: the second ``adam`` becomes ``adam#2``."""
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def _print_assignments(runners: list[TrainingRun], after: bool = False) -> None:
    """The solver per layer; ``after`` training: only runs with ``auto`` layers, with each one's
    last decision (measured kappa, predicted analog/digital times, choice)."""
    from thermo_kfac.policy import format_assignment
    from thermo_kfac.solvers.auto import AutoSolver

    for runner in runners:
        precond = runner.preconditioner
        if precond is None or not hasattr(precond, "layer_table"):
            continue
        solvers = {name: state.solver for name, state in precond.layer_table.items()}
        if after and not any(isinstance(s, AutoSolver) for s in solvers.values()):
            continue
        policy = precond.policy
        when = "after training, auto decisions" if after else "solver per layer"
        print(f"{runner.spec.label}: {when} (pricing: thermodynamic "
              f"{policy.hardware.name!r}, digital {policy.digital.name!r})")
        print(format_assignment(precond.assignment_details(), solvers) + "\n", flush=True)
