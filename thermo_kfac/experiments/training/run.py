"""One training run, advanced a step at a time (:class:`TrainingRun`), and the interleaved loop.

Timing: ``wall_time_s`` counts only the training steps (forward, curvature, backward,
preconditioning, optimizer step); evaluation, logging and the progress bar are excluded. Before
the timed steps, a throwaway copy of the run takes a few untimed warm-up steps (allocator, thread
pools, LAPACK), leaving the run and the global RNG untouched.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hw_models.units import format_seconds
from hw_models.validation import check_choice
from thermo_kfac import KFAC
from thermo_kfac.data import Dataset
from thermo_kfac.distributed import DistributedConfig
from thermo_kfac.experiments.launch import global_mean, shard, wrap_model
from thermo_kfac.experiments.progress import LineThrottle, print_line, resolve_progress
from thermo_kfac.experiments.training.optimizers import build_optimizer
from thermo_kfac.experiments.training.options import ADAPTIVE, LOSSES, OptimizerSpec
from thermo_kfac.experiments.training.tensorboard import TensorBoardLogger
from thermo_kfac.models import build_model
from thermo_kfac.solvers.auto import AutoSolver
from thermo_kfac.trace import TraceRecorder

__all__ = ["MAX_EVAL_EXAMPLES", "WARMUP_STEPS", "TrainingRun", "evaluate", "loss_function",
           "progress_line", "train_interleaved"]

MAX_EVAL_EXAMPLES = 10_000  # the "full training set" loss uses at most this many examples
WARMUP_STEPS = 5


def loss_function(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean-reduced loss ``fn(outputs, targets)`` named ``loss``."""
    check_choice("loss", loss, LOSSES)
    return {"cross_entropy": F.cross_entropy, "mse": F.mse_loss,
            "bce": F.binary_cross_entropy_with_logits}[loss]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str,
             chunk: int = 4096) -> tuple[float, float | None]:
    """Mean loss (and accuracy for cross-entropy) of ``model`` on ``(x, y)``, in eval mode."""
    was_training = model.training
    model.eval()
    fn = loss_function(loss)
    total, elements, correct = 0.0, 0, 0
    try:
        for start in range(0, len(x), chunk):
            out = model(x[start:start + chunk])
            target = y[start:start + chunk]
            total += float(fn(out, target, reduction="sum"))
            # mean over all elements: the examples (or examples x nodes, for per-node labels)
            # for cross-entropy, all output elements for mse/bce
            elements += target.numel()
            if loss == "cross_entropy":
                correct += int((out.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    accuracy = correct / max(elements, 1) if loss == "cross_entropy" else None
    return total / max(elements, 1), accuracy


def _make_step(model: nn.Module, opt: torch.optim.Optimizer | KFAC, precond: Any,
               fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One training step ``(x, y) -> (outputs, loss)``: the only code inside the timed region."""
    if isinstance(opt, KFAC):  # kfac-adaptive: forward, backward and update in its own step
        return opt.train_step
    curvature = precond is not None and precond.fisher_type != "empirical"

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        if curvature:
            precond.accumulate_curvature(out)
        batch_loss = fn(out, y)
        batch_loss.backward()
        if precond is not None:
            precond.step()
        opt.step()
        return out, batch_loss

    return step


class TrainingRun:
    """One optimizer's training run, advanced one :meth:`step` at a time so that runs interleave.

    Construction seeds torch with ``seed`` (every run of a comparison starts from the same
    parameters), builds the model and the optimizer (wrapping the model in
    ``DistributedDataParallel`` inside a process group), evaluates the initial model and takes
    ``warmup_steps`` untimed steps on a throwaway copy. The run then yields the batches of
    ``data.stream(batch_size, seed=seed)``, so runs with the same seed see the same batches.

    Args:
        data: the task (its tensors already on ``device``).
        model_name, model_options: for :func:`thermo_kfac.models.build_model`.
        spec, options: the optimizer spec and its resolved options
            (:func:`~thermo_kfac.experiments.training.resolve_options`).
        loss: ``cross_entropy``, ``mse`` or ``bce``.
        steps: training steps of the run; eval_every: evaluate every this many steps (and at
            the last step, and when the loss stops being finite).
        batch_size, seed, device: as in :func:`~thermo_kfac.experiments.training.compare`.
        distributed: the K-FAC work split inside a process group (None: the default).
        warmup_steps: untimed steps before the run (0: none).
        tensorboard: a folder for TensorBoard event files (the run writes its scalars to a
            subfolder named after its label; :mod:`~.tensorboard`); None: none.

    Attributes:
        model: the trained module (not wrapped); optimizer: the torch optimizer;
        preconditioner: K-FAC's :class:`~thermo_kfac.KFACPreconditioner`, or None.
        history: one record per step taken (:meth:`step`); initial: the evaluation before training.
        wall: training wall time so far, seconds; diverged: the last loss was not finite.
    """

    def __init__(self, data: Dataset, model_name: str, model_options: dict[str, Any],
                 spec: OptimizerSpec, options: dict[str, Any], *, loss: str, steps: int,
                 batch_size: int, seed: int, eval_every: int, device: torch.device,
                 distributed: DistributedConfig | None = None, warmup_steps: int = WARMUP_STEPS,
                 tensorboard: str | Path | None = None) -> None:
        torch.manual_seed(seed)  # same initial parameters for every run
        self.model = build_model(model_name, data, **model_options).to(device)
        trained = wrap_model(self.model)  # DDP inside a process group, else the model
        self.optimizer, self.preconditioner = build_optimizer(spec, trained, options, loss, seed,
                                                              distributed=distributed)
        self.spec, self.options, self.loss = spec, options, loss
        self.steps, self.eval_every = steps, eval_every
        self.classification = loss == "cross_entropy"
        self.eval_x, self.eval_y = data.x_train[:MAX_EVAL_EXAMPLES], data.y_train[:MAX_EVAL_EXAMPLES]
        self.x_test, self.y_test = data.x_test, data.y_test
        self.steps_per_epoch = data.steps_per_epoch(batch_size)
        self._stream = data.stream(batch_size, seed=seed)  # same batches in the same order
        self._step_fn = _make_step(trained, self.optimizer, self.preconditioner, loss_function(loss))
        self.history: list[dict[str, Any]] = []
        self.wall = 0.0
        self.hardware_total: float | None = None
        self._predicted_sums = [0.0, 0.0]  # all-digital, hybrid seconds summed over steps
        self.diverged = False
        # every K-FAC run records its trace (trace.json; recording is outside the timed step)
        self.recorder = (TraceRecorder(self.preconditioner, run={
            "model": model_name, "dataset": data.name, "optimizer": spec.label, "options": dict(options)})
            if spec.name == "kfac" and self.preconditioner is not None else None)
        self.initial = self.evaluation()
        self.tensorboard = None if tensorboard is None else TensorBoardLogger(tensorboard, spec.label)
        self._warm_up(data, model_name, model_options, batch_size, seed, device, distributed, warmup_steps)

    @property
    def done(self) -> bool:
        """Whether all steps are taken or the run diverged."""
        return self.diverged or len(self.history) >= self.steps

    def evaluation(self) -> dict[str, Any]:
        """Loss (and accuracy) on the training set (up to :data:`MAX_EVAL_EXAMPLES`) and the test set."""
        train_loss, train_acc = evaluate(self.model, self.eval_x, self.eval_y, self.loss)
        test_loss, test_acc = evaluate(self.model, self.x_test, self.y_test, self.loss)
        record: dict[str, Any] = {"eval_train_loss": train_loss, "test_loss": test_loss}
        if self.classification:
            record.update(eval_train_accuracy=train_acc, test_accuracy=test_acc)
        return record

    def step(self) -> dict[str, Any]:
        """Run, time and record the next step (evaluating when due); return its record."""
        step = len(self.history) + 1
        _, x, y = next(self._stream)
        x, y = shard(x, y)  # this rank's part of the global batch
        start = time.perf_counter()
        out, batch_loss = self._step_fn(x, y)
        loss_value = global_mean(float(batch_loss.detach()))
        step_time = time.perf_counter() - start
        self.wall += step_time
        record: dict[str, Any] = {"step": step, "epoch": step / self.steps_per_epoch,
                                  "train_loss": loss_value, "step_time_s": step_time,
                                  "wall_time_s": self.wall}
        if self.classification:
            record["train_accuracy"] = global_mean(float((out.detach().argmax(dim=1) == y).float().mean()))
        if self.preconditioner is not None:
            report = self.preconditioner.last_report
            predicted = report.get("hardware_time_s")
            if predicted is not None:
                record["predicted_hardware_s"] = float(predicted)
                self.hardware_total = (self.hardware_total or 0.0) + float(predicted)
            record["predicted_digital_s"] = float(report["predicted_digital_s"])
            record["predicted_hybrid_s"] = float(report["predicted_hybrid_s"])
            record["fallbacks"] = int(report["fallbacks"])
            self._predicted_sums[0] += record["predicted_digital_s"]
            self._predicted_sums[1] += record["predicted_hybrid_s"]
            if self.recorder is not None:
                self.recorder.observe()
        self.diverged = not math.isfinite(loss_value)
        if step % self.eval_every == 0 or step == self.steps or self.diverged:
            record.update(self.evaluation())
        self.history.append(record)
        if self.tensorboard is not None:
            self.tensorboard.log_step(record, None if self.preconditioner is None else
                                      self.preconditioner.last_report.get("solver_reports"))
        return record

    def run(self) -> None:
        """Take the remaining steps."""
        while not self.done:
            self.step()

    def result(self) -> dict[str, Any]:
        """The run's entry of ``results["runs"]`` (usable at any point, also after a failure)."""
        spec, options = self.spec, self.options
        final = self.history[-1] if self.history else {"step": 0, **self.initial}
        run: dict[str, Any] = {
            "label": spec.label,
            "optimizer": spec.name,
            "base_optimizer": options.get("base") if spec.name == "kfac" else None,
            "solver": options.get("solver") if spec.name in ("kfac", ADAPTIVE) else None,
            "options": dict(options),
            "steps": int(final["step"]),
            "epochs": final["step"] / self.steps_per_epoch,
            "wall_time_s": self.wall,
            "mean_step_time_s": self.wall / max(len(self.history), 1),
            "initial_train_loss": self.initial["eval_train_loss"],
            "initial_test_loss": self.initial["test_loss"],
            "initial_eval": self.initial,
            "final_train_loss": final.get("eval_train_loss"),
            "final_test_loss": final.get("test_loss"),
            "diverged": self.diverged,
        }
        if self.classification:
            run["train_accuracy"] = final.get("eval_train_accuracy")
            run["test_accuracy"] = final.get("test_accuracy")
        precond = self.preconditioner
        if precond is not None:
            run["layers"] = list(precond.layers)
            run["predicted_hardware_total_s"] = self.hardware_total
            run["fallbacks"] = precond.fallbacks()
            if "distributed" in precond.last_report:
                run["distributed"] = precond.last_report["distributed"]
            steps_done = max(len(self.history), 1)
            run["predicted_digital_s"] = self._predicted_sums[0] / steps_done
            run["predicted_hybrid_s"] = self._predicted_sums[1] / steps_done
            run["assignment"] = precond.assignment()
            run["assignment_details"] = [a.to_dict() for a in precond.assignment_details()]
            run["solver_policy"] = precond.policy.describe()
            decisions = {name: dict(state.solver.decision) for name, state in precond.layer_table.items()
                         if isinstance(state.solver, AutoSolver)}
            if decisions:
                run["auto_decisions"] = decisions
        run["history"] = self.history
        return run

    def trace(self) -> dict[str, Any] | None:
        """The run's ``trace.json`` content (K-FAC runs; None otherwise). Call once, at the end."""
        return None if self.recorder is None else self.recorder.to_dict()

    def close(self) -> None:
        """Remove the preconditioner's hooks from the model and close the TensorBoard writer
        (the run takes no more steps)."""
        if self.preconditioner is not None:
            self.preconditioner.remove_hooks()
        self.close_log()

    def close_log(self) -> None:
        """Flush and close the run's TensorBoard event file (if any)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _warm_up(self, data: Dataset, model_name: str, model_options: dict[str, Any], batch_size: int,
                 seed: int, device: torch.device, distributed: DistributedConfig | None, steps: int) -> None:
        """Untimed steps on a throwaway copy with its own model and optimizer; the RNG is restored."""
        if steps <= 0:
            return
        rng = torch.random.get_rng_state()
        try:
            model = build_model(model_name, data, **model_options).to(device)
            opt, precond = build_optimizer(self.spec, model, self.options, self.loss, seed,
                                           distributed=distributed)
            step_fn = _make_step(model, opt, precond, loss_function(self.loss))
            for (x, y), _ in zip(data.batches(batch_size, seed=seed), range(steps), strict=False):
                step_fn(x, y)
            if precond is not None:
                precond.remove_hooks()
        finally:
            torch.random.set_rng_state(rng)


class _RunProgress:
    """Progress of interleaved runs: a tqdm bar per run, or a plain line per run every few
    steps/seconds (:mod:`thermo_kfac.experiments.progress`), or nothing."""

    def __init__(self, runs: Sequence[TrainingRun], mode: str) -> None:
        self.mode = mode
        self.bars: list[Any] = []
        self.throttles = [LineThrottle(r.steps) for r in runs]
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bars = [tqdm(total=r.steps, desc=r.spec.label, unit="step", file=sys.stderr,
                              dynamic_ncols=True, position=i) for i, r in enumerate(runs)]

    def update(self, index: int, run: TrainingRun, record: dict[str, Any]) -> None:
        if self.mode == "bar":
            bar = self.bars[index]
            bar.update(1)
            if record["step"] % 10 == 0 or run.done:
                postfix = {"loss": f"{record['train_loss']:.4f}",
                           "ms/step": f"{1e3 * run.wall / record['step']:.2f}"}
                if "train_accuracy" in record:
                    postfix["acc"] = f"{record['train_accuracy']:.3f}"
                bar.set_postfix(postfix, refresh=False)
        elif self.mode == "lines" and self.throttles[index].due(record["step"], final=run.done):
            print_line(progress_line(run, record))

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def progress_line(run: TrainingRun, record: dict[str, Any]) -> str:
    """One plain progress line of a run: step, loss, accuracy, ms/step, predicted hardware time."""
    parts = [f"{run.spec.label}: step {record['step']}/{run.steps}",
             f"loss {record['train_loss']:.4g}"]
    if "train_accuracy" in record:
        parts.append(f"acc {record['train_accuracy']:.3f}")
    parts.append(f"{1e3 * run.wall / record['step']:.2f} ms/step")
    if "predicted_digital_s" in record:
        parts.append(f"predicted curvature/step digital {format_seconds(record['predicted_digital_s'])}, "
                     f"hybrid {format_seconds(record['predicted_hybrid_s'])}")
    if run.diverged:
        parts.append("diverged")
    return ", ".join(parts)


def train_interleaved(runs: Sequence[TrainingRun], progress: str | bool = False) -> None:
    """Advance all runs step by step, round robin (A B A B ...), so that load changes on the
    machine affect every run alike; a diverged run drops out. ``progress``: a ``--progress`` mode
    (``auto``, ``bar``, ``lines``, ``none``; ``True`` is ``auto``, ``False`` ``none``)."""
    display = _RunProgress(runs, resolve_progress(progress))
    try:
        while any(not r.done for r in runs):
            for index, run in enumerate(runs):
                if run.done:
                    continue
                record = run.step()
                display.update(index, run, record)
    finally:
        display.close()
