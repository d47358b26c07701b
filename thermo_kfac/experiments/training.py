"""Training experiments: :func:`train` one optimizer, :func:`compare` several on the same task.

Both are library functions (returning the results dict) and CLI sub-commands (``thermo-kfac
train`` / ``thermo-kfac compare``, added by :func:`register`). Every run of a comparison starts
from the same initial parameters (``torch.manual_seed(seed)`` before the model is built) and sees
the same batches in the same order (:meth:`thermo_kfac.data.Dataset.batches`). The runs advance
in lockstep, one step each in turn, so that load changes on a shared machine hit all alike.

Optimizers are given as specs ``name[:key=value,key=value]``, e.g. ``adam:lr=3e-3`` or
``kfac:solver=cholesky,damping=0.1``. For ``kfac``, keys that are neither K-FAC nor base-optimizer
options are passed to the solver as ``solver_options`` (validated by the solver).

Timing: ``wall_time_s`` counts only the training steps (forward, curvature, backward,
preconditioning, optimizer step); evaluation, logging and the progress bar are excluded.
``time_to_target_s`` is the training wall time at the first evaluation whose full training-set
loss is at or below the target loss (default in ``compare``: the final training loss of the first
optimizer).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hw_models.devices import DIGITAL_PRESETS, THERMO_PRESETS
from hw_models.validation import check_choice, check_number, check_positive
from thermo_kfac import distributed as _distributed
from thermo_kfac.data import DATASETS, Dataset, load_dataset
from thermo_kfac.models import available_models, build_model
from thermo_kfac.policy import parse_value

OPTIMIZERS = ("sgd", "adam", "kfac", "adafisher", "eva")
BASE_OPTIMIZERS = ("sgd", "adam")
LOSSES = ("cross_entropy", "mse", "bce")
TASK_LOSSES = {"classification": ("cross_entropy",), "regression": ("mse",), "autoencoder": ("bce", "mse")}
FISHER_TYPES = ("empirical", "mc", "type2")
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _parse_optional_float(value: Any) -> float | None:
    if value is None or str(value).strip().lower() in ("none", "off", "null"):
        return None
    return float(value)


@dataclass(frozen=True)
class _Option:
    """One optimizer option: how to parse it from text and which optimizers take it."""

    parse: Callable[[Any], Any]
    help: str
    optimizers: tuple[str, ...]
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    integer: bool = False


# Options of the optimizer specs; the CLI flags of the same name (``--factor-decay`` ...) set
# them for every run that takes them.
OPTIONS: dict[str, _Option] = {
    "lr": _Option(float, "learning rate", OPTIMIZERS, low=0.0, low_inclusive=False),
    "momentum": _Option(float, "SGD momentum (sgd, kfac with base sgd, eva)", ("sgd", "kfac", "eva"), low=0.0,
                        high=1.0, high_inclusive=False),
    "weight_decay": _Option(float, "L2 weight decay", OPTIMIZERS, low=0.0),
    "beta1": _Option(float, "Adam beta1", ("adam", "kfac"), low=0.0, high=1.0, high_inclusive=False),
    "beta2": _Option(float, "Adam beta2", ("adam", "kfac"), low=0.0, high=1.0, high_inclusive=False),
    "eps": _Option(float, "Adam epsilon", ("adam", "kfac"), low=0.0, low_inclusive=False),
    "base": _Option(str, "optimizer that applies K-FAC's preconditioned gradient", ("kfac",),
                    choices=BASE_OPTIMIZERS),
    "damping": _Option(float, "Tikhonov damping of each Kronecker block", ("kfac", "adafisher", "eva"),
                       low=0.0),
    "pi_damping": _Option(_parse_bool, "factored pi-damping (true/false)", ("kfac",)),
    "factor_decay": _Option(float, "EMA decay of the factors", ("kfac",), low=0.0, high=1.0,
                            high_inclusive=False),
    "factor_update_every": _Option(int, "update the factors every N steps", ("kfac",), low=1,
                                   integer=True),
    "inverse_update_every": _Option(int, "re-factorize every N steps", ("kfac",), low=1, integer=True),
    "fisher_type": _Option(str, "curvature estimate", ("kfac",), choices=FISHER_TYPES),
    "kl_clip": _Option(_parse_optional_float, "KL clipping bound (none disables)", ("kfac", "eva"), low=0.0,
                       low_inclusive=False),
    "solver": _Option(str, "per-layer Kronecker solver (or the rules auto, fits)", ("kfac",)),
    "solver_map": _Option(str, "per-layer solvers 'pattern=spec;...' or a JSON file", ("kfac",)),
    "hardware": _Option(str, "thermodynamic preset for auto/fits and predicted times", ("kfac",),
                        choices=THERMO_PRESETS),
    "digital": _Option(str, "digital preset for auto and predicted times", ("kfac",),
                       choices=DIGITAL_PRESETS),
    "factor_dtype": _Option(str, "dtype of the factors", ("kfac",), choices=tuple(FACTOR_DTYPES)),
    # AdaFisher and Eva (thermo_kfac/adafisher.py, thermo_kfac/eva.py; docs/adafisher_eva.md)
    "beta": _Option(float, "AdaFisher first-moment EMA", ("adafisher",), low=0.0, high=1.0,
                    high_inclusive=False),
    "gamma1": _Option(float, "AdaFisher factor EMA: X <- (1 - gamma1) X + gamma2 X_new", ("adafisher",),
                      low=0.0, high=1.0, low_inclusive=False),
    "gamma2": _Option(float, "AdaFisher factor EMA weight of the new statistics", ("adafisher",), low=0.0,
                      high=1.0, low_inclusive=False),
    "decoupled_weight_decay": _Option(_parse_bool, "AdaFisherW: decoupled weight decay (true/false)",
                                      ("adafisher",)),
    "update_every": _Option(int, "refresh the curvature statistics every N steps", ("adafisher", "eva"),
                            low=1, integer=True),
    "stat_decay": _Option(float, "Eva: EMA decay of the Kronecker vectors", ("eva",), low=0.0, high=1.0,
                          high_inclusive=False),
    "kfac_approx": _Option(str, "K-FAC flavour for weight sharing (expand/reduce)", ("kfac",),
                           choices=("expand", "reduce")),
    "curvature": _Option(str, "curvature block: kfac, or a Kronecker-SVD approximation", ("kfac",),
                         choices=("kfac", "kpsvd", "deflation", "kfac_corrected")),
}

# Defaults per optimizer. kfac's were chosen by sweeps on digits (MLP 64-128-128-10, batch 256,
# 30-40 epochs, seeds 0 and 1): fastest to Adam's final loss while keeping a test loss close to
# Adam's (docs/cli.md).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
    "adam": {"lr": 1e-3, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    "kfac": {"base": "sgd", "lr": 0.3, "momentum": 0.9, "weight_decay": 0.0, "beta1": 0.9,
             "beta2": 0.999, "eps": 1e-8, "damping": 0.1, "pi_damping": False, "factor_decay": 0.95,
             "factor_update_every": 10, "inverse_update_every": 50, "fisher_type": "empirical",
             "kl_clip": 1e-3, "solver": "eigh", "factor_dtype": "float32", "solver_map": None,
             "hardware": "chip", "digital": "h100", "kfac_approx": "expand", "curvature": "kfac"},
}
# AdaFisher: the authors' defaults (lr, beta, lambda, T_cov = 100, EMA pair of their code).
OPTIMIZER_DEFAULTS["adafisher"] = {"lr": 1e-3, "beta": 0.9, "gamma1": 0.92, "gamma2": 0.008, "damping": 1e-3,
                                   "update_every": 100, "weight_decay": 0.0, "decoupled_weight_decay": False}
# Eva: the paper's defaults (SGD momentum 0.9 as in its experiments).
OPTIMIZER_DEFAULTS["eva"] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "damping": 0.03,
                             "kl_clip": 1e-3, "stat_decay": 0.95, "update_every": 1}
# Learning rate of kfac when its base optimizer is Adam (unless lr is given).
KFAC_ADAM_LR = 1e-3
DEFAULT_EPOCHS = {"digits": 40}
DEFAULT_BATCH_SIZE = 256
EVAL_POINTS = 200  # default evaluations per run (time-to-target resolution)
MAX_EVAL_EXAMPLES = 10_000
WARMUP_STEPS = 5


@dataclass
class OptimizerSpec:
    """A parsed optimizer spec ``name[:key=value,...]``.

    ``options`` holds the explicitly given values (typed); ``solver_options`` the kfac keys that
    are passed on to the solver.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    solver_options: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @property
    def label(self) -> str:
        return self.text or self.name


def _convert(key: str, option: _Option, value: Any, context: str) -> Any:
    try:
        parsed = option.parse(value)
    except (TypeError, ValueError):
        kind = {float: "a number", int: "an integer", _parse_bool: "true or false",
                _parse_optional_float: "a number or none"}.get(option.parse, "text")
        raise ValueError(f"{context}{key}={value!r} must be {kind}") from None
    if parsed is None:
        return None
    if option.choices is not None:
        return check_choice(f"{context}{key}", parsed, option.choices)
    if isinstance(parsed, int | float) and not isinstance(parsed, bool):
        return check_number(f"{context}{key}", parsed, low=option.low, high=option.high,
                            low_inclusive=option.low_inclusive, high_inclusive=option.high_inclusive,
                            integer=option.integer)
    return parsed


def parse_optimizer_spec(text: str | OptimizerSpec) -> OptimizerSpec:
    """Parse ``name[:key=value,key=value]`` (keys may use ``-`` or ``_``) into an :class:`OptimizerSpec`.

    Raises ``ValueError`` naming the bad name, key or value and what is allowed.
    """
    if isinstance(text, OptimizerSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"optimizer spec {text!r} is empty; use name[:key=value,...] with name one of "
                         f"{', '.join(OPTIMIZERS)}")
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    check_choice("optimizer", name, OPTIMIZERS)
    spec = OptimizerSpec(name, text=text.strip())
    context = f"optimizer spec {text!r}: "
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise ValueError(f"{context}{item!r} is not key=value")
        if key in spec.options or key in spec.solver_options:
            raise ValueError(f"{context}{key} is given twice")
        option = OPTIONS.get(key)
        if option is not None and name in option.optimizers:
            spec.options[key] = _convert(key, option, value.strip(), context)
        elif name == "kfac" and option is None:
            spec.solver_options[key] = parse_value(value)
        else:
            valid = sorted(k for k, o in OPTIONS.items() if name in o.optimizers)
            extra = " (other keys are passed to the solver)" if name == "kfac" else ""
            raise ValueError(f"{context}{name} has no option {key!r}; valid: {', '.join(valid)}{extra}")
    return spec


def resolve_options(spec: OptimizerSpec, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Full option dict of a run: defaults < ``overrides`` (CLI flags) < the spec's own options."""
    options = dict(OPTIMIZER_DEFAULTS[spec.name])
    given = {k: v for k, v in (overrides or {}).items() if spec.name in OPTIONS[k].optimizers}
    if spec.name == "kfac" and spec.options.get("base", given.get("base", options["base"])) == "adam":
        options["lr"] = KFAC_ADAM_LR
    options.update(given)
    options.update(spec.options)
    if spec.name == "kfac" and spec.solver_options:
        options["solver_options"] = dict(spec.solver_options)
    return options


def _make_optimizer(name: str, params: Any, options: dict[str, Any]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=options["lr"], momentum=options["momentum"],
                               weight_decay=options["weight_decay"])
    return torch.optim.Adam(params, lr=options["lr"], betas=(options["beta1"], options["beta2"]),
                            eps=options["eps"], weight_decay=options["weight_decay"])


def build_optimizer(spec: OptimizerSpec, model: nn.Module, options: dict[str, Any], loss: str,
                    seed: int = 0) -> tuple[torch.optim.Optimizer, Any]:
    """``(torch optimizer, KFACPreconditioner or None)`` for one run."""
    if spec.name in ("adafisher", "eva"):
        return _make_curvature_optimizer(spec.name, model, options), None
    if spec.name != "kfac":
        return _make_optimizer(spec.name, model.parameters(), options), None
    from thermo_kfac import KFACPreconditioner
    from thermo_kfac.policy import SolverPolicy, parse_solver_map

    opt = _make_optimizer(options["base"], model.parameters(), options)
    curvature = options.get("curvature", "kfac")
    if curvature != "kfac" and options.get("solver_map"):
        raise ValueError(f"solver_map cannot be combined with curvature={curvature!r}: the "
                         "Kronecker-SVD curvatures use their own solver on every layer")
    rules = parse_solver_map(options["solver_map"]) if options.get("solver_map") else ()
    policy = SolverPolicy(rules=rules, hardware=options.get("hardware", "chip"),
                          digital=options.get("digital", "h100"))
    precond = KFACPreconditioner(
        model, loss=loss, reduction="mean", fisher_type=options["fisher_type"],
        damping=options["damping"], pi_damping=options["pi_damping"],
        factor_decay=options["factor_decay"], factor_update_every=options["factor_update_every"],
        inverse_update_every=options["inverse_update_every"], solver=options["solver"],
        solver_options=options.get("solver_options"), kl_clip=options["kl_clip"], optimizer=opt,
        factor_dtype=FACTOR_DTYPES[options["factor_dtype"]], seed=seed,
        # the Kronecker-SVD curvatures bring their own solver: no per-layer map for them
        solver_map=policy if curvature == "kfac" else None,
        kfac_approx=options.get("kfac_approx", "expand"), curvature=curvature)
    return opt, precond


def _make_curvature_optimizer(name: str, model: nn.Module, options: dict[str, Any]) -> torch.optim.Optimizer:
    """AdaFisher or Eva, which capture their own statistics and apply their own step."""
    from thermo_kfac import AdaFisher, Eva

    if name == "adafisher":
        return AdaFisher(model, lr=options["lr"], beta=options["beta"],
                         gamma=(options["gamma1"], options["gamma2"]), damping=options["damping"],
                         update_every=options["update_every"], weight_decay=options["weight_decay"],
                         decoupled_weight_decay=options["decoupled_weight_decay"])
    return Eva(model, lr=options["lr"], momentum=options["momentum"], weight_decay=options["weight_decay"],
               damping=options["damping"], kl_clip=options["kl_clip"], stat_decay=options["stat_decay"],
               update_every=options["update_every"])


def loss_function(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean-reduced loss ``fn(outputs, targets)`` named ``loss``."""
    check_choice("loss", loss, LOSSES)
    return {"cross_entropy": F.cross_entropy, "mse": F.mse_loss,
            "bce": F.binary_cross_entropy_with_logits}[loss]


# ------------------------------------------------------------------------------- experiment
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
            # mean reduction: over examples for cross-entropy, over all elements for mse/bce
            # mean over all elements: the examples (or examples x nodes, for per-node labels)
            # for cross-entropy, all output elements for mse/bce
            elements += target.numel()
            if loss == "cross_entropy":
                correct += int((out.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    accuracy = correct / max(elements, 1) if loss == "cross_entropy" else None
    return total / max(elements, 1), accuracy


class _Run:
    """One optimizer's training run, advanced one step at a time so that runs can be interleaved."""

    def __init__(self, data: Dataset, model_name: str, model_options: dict[str, Any],
                 spec: OptimizerSpec, options: dict[str, Any], *, loss: str, steps: int,
                 batch_size: int, seed: int, eval_every: int, device: torch.device) -> None:
        torch.manual_seed(seed)  # same initial parameters for every run
        self.model = build_model(model_name, data, **model_options).to(device)
        trained = _distributed.wrap_model(self.model)  # DDP inside a process group, else the model
        self.opt, self.precond = build_optimizer(spec, trained, options, loss, seed)
        self.spec, self.options, self.loss = spec, options, loss
        self.steps, self.eval_every = steps, eval_every
        self.classification = loss == "cross_entropy"
        self.eval_x, self.eval_y = data.x_train[:MAX_EVAL_EXAMPLES], data.y_train[:MAX_EVAL_EXAMPLES]
        self.x_test, self.y_test = data.x_test, data.y_test
        self.steps_per_epoch = data.steps_per_epoch(batch_size)
        self.stream = data.stream(batch_size, seed=seed)  # same batches in the same order
        self.step_fn = _make_step(trained, self.opt, self.precond, loss_function(loss))
        self.history: list[dict[str, Any]] = []
        self.wall = 0.0
        self.hardware_total: float | None = None
        self.predicted_sums = [0.0, 0.0]  # all-digital, hybrid seconds summed over steps
        self.diverged = False
        self.initial = self.evaluation()
        _warm_up(data, model_name, model_options, spec, options, loss, batch_size, seed, device)

    @property
    def done(self) -> bool:
        return self.diverged or len(self.history) >= self.steps

    def evaluation(self) -> dict[str, Any]:
        train_loss, train_acc = evaluate(self.model, self.eval_x, self.eval_y, self.loss)
        test_loss, test_acc = evaluate(self.model, self.x_test, self.y_test, self.loss)
        record: dict[str, Any] = {"eval_train_loss": train_loss, "test_loss": test_loss}
        if self.classification:
            record.update(eval_train_accuracy=train_acc, test_accuracy=test_acc)
        return record

    def step(self) -> dict[str, Any]:
        """Run, time and record the next step (evaluating when due); return its record."""
        step = len(self.history) + 1
        _, x, y = next(self.stream)
        x, y = _distributed.shard(x, y)  # this rank's part of the global batch
        start = time.perf_counter()
        out, batch_loss = self.step_fn(x, y)
        loss_value = _distributed.global_mean(float(batch_loss.detach()))
        step_time = time.perf_counter() - start
        self.wall += step_time
        record: dict[str, Any] = {"step": step, "epoch": step / self.steps_per_epoch,
                                  "train_loss": loss_value, "step_time_s": step_time,
                                  "wall_time_s": self.wall}
        if self.classification:
            record["train_accuracy"] = _distributed.global_mean(
                float((out.detach().argmax(dim=1) == y).float().mean()))
        if self.precond is not None:
            predicted = self.precond.last_report.get("hardware_time_s")
            if predicted is not None:
                record["predicted_hardware_s"] = float(predicted)
                self.hardware_total = (self.hardware_total or 0.0) + float(predicted)
            report = self.precond.last_report
            record["predicted_digital_s"] = float(report["predicted_digital_s"])
            record["predicted_hybrid_s"] = float(report["predicted_hybrid_s"])
            record["fallbacks"] = int(report["fallbacks"])
            self.predicted_sums[0] += record["predicted_digital_s"]
            self.predicted_sums[1] += record["predicted_hybrid_s"]
        self.diverged = not math.isfinite(loss_value)
        if step % self.eval_every == 0 or step == self.steps or self.diverged:
            record.update(self.evaluation())
        self.history.append(record)
        return record

    def result(self) -> dict[str, Any]:
        """The run's entry of ``results["runs"]``."""
        spec, options = self.spec, self.options
        final = self.history[-1] if self.history else {"step": 0, **self.initial}
        run: dict[str, Any] = {
            "label": spec.label,
            "optimizer": spec.name,
            "base_optimizer": options.get("base") if spec.name == "kfac" else None,
            "solver": options.get("solver") if spec.name == "kfac" else None,
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
        if self.precond is not None:
            run["layers"] = list(self.precond.layers)
            run["predicted_hardware_total_s"] = self.hardware_total
            run["fallbacks"] = self.precond.fallbacks()
            if "distributed" in self.precond.last_report:
                run["distributed"] = self.precond.last_report["distributed"]
            steps_done = max(len(self.history), 1)
            run["predicted_digital_s"] = self.predicted_sums[0] / steps_done
            run["predicted_hybrid_s"] = self.predicted_sums[1] / steps_done
            run["assignment"] = self.precond.assignment()
            run["assignment_details"] = [a.to_dict() for a in self.precond.assignment_details()]
            run["solver_policy"] = self.precond.policy.describe()
        run["history"] = self.history
        return run


def _train_interleaved(runs: list[_Run], progress: bool) -> None:
    """Advance all runs step by step, round robin (A B A B ...), so that load changes on the
    machine affect every run alike; a diverged run drops out."""
    bars = [_progress_bar(r.steps, r.spec.label, progress, position=i) for i, r in enumerate(runs)]
    try:
        while any(not r.done for r in runs):
            for run, bar in zip(runs, bars, strict=True):
                if run.done:
                    continue
                record = run.step()
                if bar is not None:
                    bar.update(1)
                    if record["step"] % 10 == 0 or run.done:
                        postfix = {"loss": f"{record['train_loss']:.4f}",
                                   "ms/step": f"{1e3 * run.wall / record['step']:.2f}"}
                        if "train_accuracy" in record:
                            postfix["acc"] = f"{record['train_accuracy']:.3f}"
                        bar.set_postfix(postfix, refresh=False)
    finally:
        for bar in bars:
            if bar is not None:
                bar.close()


def _make_step(model: nn.Module, opt: torch.optim.Optimizer, precond: Any,
               fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One training step ``(x, y) -> (outputs, loss)``: the only code inside the timed region."""
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


def _warm_up(data: Dataset, model_name: str, model_options: dict[str, Any], spec: OptimizerSpec,
             options: dict[str, Any], loss: str, batch_size: int, seed: int, device: torch.device,
             steps: int = WARMUP_STEPS) -> None:
    """Untimed steps on a throwaway copy (allocator, thread pools, LAPACK) before a timed run.

    Uses its own model and optimizer, so the timed run is unaffected; the global RNG is restored.
    """
    if steps <= 0:
        return
    rng = torch.random.get_rng_state()
    try:
        model = build_model(model_name, data, **model_options).to(device)
        opt, precond = build_optimizer(spec, model, options, loss, seed)
        step_fn = _make_step(model, opt, precond, loss_function(loss))
        for (x, y), _ in zip(data.batches(batch_size, seed=seed), range(steps), strict=False):
            step_fn(x, y)
        if precond is not None:
            precond.remove_hooks()
    finally:
        torch.random.set_rng_state(rng)


def _progress_bar(total: int, label: str, enabled: bool, position: int = 0) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True,
                position=position)


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


def compare(dataset: str | Dataset = "digits", model: str = "mlp",
            optimizers: Sequence[str | OptimizerSpec] = ("adam", "kfac"), *,
            steps: int | None = None, epochs: float | None = None, batch_size: int | None = None,
            seed: int = 0, loss: str | None = None, model_options: dict[str, Any] | None = None,
            dataset_options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
            eval_every: int | None = None, target_loss: float | None = None,
            target_from_first: bool = True, out: str | Path | None = None, progress: bool = False,
            device: str = "cpu", command: str = "compare", print_assignment: bool = False
            ) -> dict[str, Any]:
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
        out: directory for ``results.json``, ``metrics.csv`` and PNG plots (written atomically
            at the end; nothing is written if a run fails).
        progress: show a tqdm progress bar per run.
        device: torch device for model and data.
        print_assignment: print each K-FAC run's solver per layer before training.

    Returns:
        ``{"command", "config", "seed", "target_loss", "target_source", "runs": [...]}``.
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
        overrides[key] = _convert(key, OPTIONS[key], value, "") if value is not None else None
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
    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a torch device ({err})") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} is not available (torch.cuda.is_available() is False)")
    resolved = [resolve_options(s, overrides) for s in specs]
    # Fail on bad K-FAC/solver options before any training starts.
    for spec, options in zip(specs, resolved, strict=True):
        if spec.name == "kfac":
            probe = build_model(model, data, **model_options)
            try:
                build_optimizer(spec, probe, options, loss, seed)
            except ValueError as err:
                raise ValueError(f"optimizer {spec.label!r}: {err}{_solver_option_hint(spec)}") from None
        else:
            build_model(model, data, **model_options)
    data = _to_device(data, torch_device)

    labels = _unique_labels([s.label for s in specs])
    runners = [
        _Run(data, model, model_options, OptimizerSpec(spec.name, spec.options, spec.solver_options, label),
             options, loss=loss, steps=steps, batch_size=batch_size, seed=seed, eval_every=eval_every,
             device=torch_device)
        for spec, options, label in zip(specs, resolved, labels, strict=True)]
    if print_assignment and _distributed.is_main_process():
        _print_assignments(runners)
    _train_interleaved(runners, progress and _distributed.is_main_process())
    runs = [runner.result() for runner in runners]
    target_source = "given"
    if target_loss is None and target_from_first:
        target_loss = runs[0]["final_train_loss"]
        target_source = f"final train loss of {runs[0]['label']}"
    for run in runs:
        run["time_to_target_s"], run["steps_to_target"] = time_to_target(run, target_loss)
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
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "world_size": _distributed.world_size(),
            "wall_time_note": "training steps only; evaluation excluded",
        },
        "runs": runs,
    }
    if out is not None and _distributed.is_main_process():  # one writer
        write_results(results, out)
    return results


def _print_assignments(runners: list[_Run]) -> None:
    from thermo_kfac.policy import format_assignment

    for runner in runners:
        if runner.precond is not None:
            policy = runner.precond.policy
            print(f"{runner.spec.label}: solver per layer (pricing: thermodynamic "
                  f"{policy.hardware.name!r}, digital {policy.digital.name!r})")
            print(format_assignment(runner.precond.assignment_details()) + "\n", flush=True)


def _solver_option_hint(spec: OptimizerSpec) -> str:
    """For unknown kfac keys (taken as solver options): the valid kfac keys, and close matches."""
    if not spec.solver_options:
        return ""
    valid = [k for k, o in OPTIONS.items() if "kfac" in o.optimizers]
    close = {k: difflib.get_close_matches(k, valid, n=1) for k in spec.solver_options}
    guesses = [f"{k!r} -> {m[0]!r}" for k, m in close.items() if m]
    hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
    return (f"{hint}; keys that are not kfac options ({', '.join(valid)}) are passed to the "
            "solver as solver_options")


def train(dataset: str | Dataset = "digits", model: str = "mlp", optimizer: str | OptimizerSpec = "kfac",
          **kwargs: Any) -> dict[str, Any]:
    """Train with one optimizer spec; same arguments as :func:`compare` (``results["runs"]`` has
    one run). ``time_to_target_s`` is recorded only when ``target_loss`` is given."""
    kwargs.setdefault("target_from_first", False)
    return compare(dataset, model, [optimizer], command="train", **kwargs)


def _to_device(data: Dataset, device: torch.device) -> Dataset:
    if data.x_train.device == device:
        return data
    return Dataset(data.name, data.task, data.x_train.to(device), data.y_train.to(device),
                   data.x_test.to(device), data.y_test.to(device), data.num_classes, dict(data.info))


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


# ---------------------------------------------------------------------------------- outputs
CSV_COLUMNS = ["run", "optimizer", "step", "epoch", "train_loss", "train_accuracy", "step_time_s",
               "wall_time_s", "eval_train_loss", "eval_train_accuracy", "test_loss", "test_accuracy",
               "predicted_hardware_s", "predicted_digital_s", "predicted_hybrid_s", "fallbacks"]


def write_results(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Write ``results.json``, ``metrics.csv`` and the plots into ``out``.

    Files are staged in a temporary folder inside ``out`` and moved into place only when all of
    them are written (``results.json`` last), so an interrupted write leaves earlier files intact.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output directory {str(out)!r}: {err}") from None
    if not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is not a directory")
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        names = ["metrics.csv", *_write_plots(results, stage)]
        _write_csv(results, stage / "metrics.csv")
        with open(stage / "results.json", "w") as f:
            json.dump(_jsonable(results), f, indent=1, allow_nan=False)
        names.append("results.json")
        for name in names:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [out / name for name in names]


def _jsonable(value: Any) -> Any:
    """Replace NaN/Inf (diverged runs) by None, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _write_csv(results: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for run in results["runs"]:
            for record in run["history"]:
                writer.writerow({"run": run["label"], "optimizer": run["optimizer"], **record})


def _write_plots(results: dict[str, Any], folder: Path) -> list[str]:
    from thermo_kfac.experiments._plotting import agg_pyplot

    plt = agg_pyplot()  # files only: matplotlib's backend and pyplot are left alone

    runs = results["runs"]
    classification = any("test_accuracy" in r for r in runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = []

    def series(run: dict[str, Any], key: str, x_key: str) -> tuple[list[float], list[float]]:
        start = [{"step": 0, "wall_time_s": 0.0, **run.get("initial_eval", {})}]
        points = [(r[x_key], r[key]) for r in start + run["history"]
                  if r.get(key) is not None and math.isfinite(r[key])]
        return [p[0] for p in points], [p[1] for p in points]

    def positive(ax: Any) -> None:
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for ax, x_key in zip(axes, ("step", "wall_time_s"), strict=True):
            ax.plot(*series(run, "train_loss", x_key), color=color, alpha=0.25, lw=0.8)
            ax.plot(*series(run, "eval_train_loss", x_key), color=color, lw=1.6,
                    label=f"{run['label']} train")
            ax.plot(*series(run, "test_loss", x_key), color=color, lw=1.2, ls="--",
                    label=f"{run['label']} test")
    for ax, xlabel in zip(axes, ("step", "training wall time [s]"), strict=True):
        if results.get("target_loss"):
            ax.axhline(results["target_loss"], color="gray", lw=0.8, ls=":", label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        positive(ax)
    axes[0].legend(fontsize=8)
    fig.suptitle(_title(results) + " (faint: batch loss)")
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)
    names.append("loss.png")

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
        fig.savefig(folder / "accuracy.png", dpi=110)
        plt.close(fig)
        names.append("accuracy.png")

    if results.get("command") == "compare":
        panels = ["eval_train_loss", "test_loss"] + (["test_accuracy"] if classification else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            for ax, key in zip(axes, panels, strict=True):
                ax.plot(*series(run, key, "wall_time_s"), color=color, lw=1.6, label=run["label"])
            if run.get("time_to_target_s") is not None:
                axes[0].axvline(run["time_to_target_s"], color=color, lw=0.8, ls=":")
        titles = {"eval_train_loss": "training loss", "test_loss": "test loss",
                  "test_accuracy": "test accuracy"}
        for ax, key in zip(axes, panels, strict=True):
            ax.set_xlabel("training wall time [s]")
            ax.set_title(titles[key])
            if key == "test_accuracy":
                ax.grid(True, alpha=0.3)
            else:
                positive(ax)
        if results.get("target_loss"):
            axes[0].axhline(results["target_loss"], color="gray", lw=0.8, ls=":", label="target")
        axes[0].legend(fontsize=8)
        fig.suptitle(_title(results) + " (dotted: time to target)")
        fig.tight_layout()
        fig.savefig(folder / "compare.png", dpi=110)
        plt.close(fig)
        names.append("compare.png")
    return names


def _title(results: dict[str, Any]) -> str:
    config = results["config"]
    return (f"{config['model']} on {config['dataset']['name']}, batch {config['batch_size']}, "
            f"seed {config['seed']}")


def format_table(results: dict[str, Any]) -> str:
    """The comparison table printed by the CLI."""
    from thermo_kfac.policy import format_seconds

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
    rows = [header]

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
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if target is not None:
        lines.append(f"target train loss {target:.4g} ({results.get('target_source')}); "
                     "speed-up = first run's time to target / this run's")
    if predicted:
        lines.append("hw digital/hybrid: predicted K-FAC curvature time per step of the all-digital "
                     "machine and of the hybrid one (analog layers on the thermodynamic device)")
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


# --------------------------------------------------------------------------------------- CLI
_FLAG_OPTIONS = ["lr", "momentum", "weight_decay", "base", "damping", "pi_damping", "factor_decay",
                 "factor_update_every", "inverse_update_every", "fisher_type", "kl_clip", "solver",
                 "solver_map", "hardware", "digital"]


def _kv_list(text: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not key=value")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("-", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers like 128,128") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: widths must be positive integers like 128,128")
    return values


def _add_common(parser: argparse.ArgumentParser) -> None:
    from thermo_kfac.solvers import available_solvers

    task = parser.add_argument_group("task")
    task.add_argument("--dataset", default="digits", choices=DATASETS, metavar="NAME",
                      help=f"dataset: {', '.join(DATASETS)} (default: digits, embedded, no download)")
    task.add_argument("--model", default="mlp", choices=available_models(), metavar="NAME",
                      help=f"model: {', '.join(available_models())} (default: mlp; 'autoencoder' "
                           "trains the dataset's images as an auto-encoder task)")
    task.add_argument("--widths", type=_int_list, default=None, metavar="W,W,...",
                      help="hidden widths of mlp (default 128,128) or encoder widths of autoencoder "
                           "(default 1000,500,250,30 for 784 inputs, scaled for smaller inputs)")
    task.add_argument("--activation", default=None, metavar="NAME",
                      help="hidden activation: relu, tanh, sigmoid, gelu, elu, silu (default: relu; "
                           "sigmoid for autoencoder)")
    task.add_argument("--model-options", type=_kv_list, default={}, metavar="K=V,...",
                      help="further model options, e.g. channels=32 or hidden=128 for cnn")
    task.add_argument("--loss", default=None, choices=LOSSES, metavar="NAME",
                      help="cross_entropy (classification), mse (regression/autoencoder) or bce "
                           "(autoencoder, with logits); default: the task's")
    task.add_argument("--data-dir", default=None, metavar="DIR",
                      help="folder with MNIST IDX / CIFAR-10 batches ($THERMO_KFAC_DATA or "
                           "~/.cache/thermo-kfac/data)")
    task.add_argument("--download", action="store_true",
                      help="download a missing MNIST/CIFAR-10 with torchvision "
                           "(pip install thermo-kfac[vision])")
    task.add_argument("--max-train", type=int, default=None, metavar="N",
                      help="use a seeded random subset of N training examples")

    length = parser.add_argument_group("schedule")
    exclusive = length.add_mutually_exclusive_group()
    exclusive.add_argument("--steps", type=int, default=None, metavar="N",
                           help="training steps (optimizer updates)")
    exclusive.add_argument("--epochs", type=float, default=None, metavar="E",
                           help=f"training epochs (fractions allowed); default: "
                                f"{DEFAULT_EPOCHS.get('digits')} on digits, 5 otherwise")
    length.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help=f"examples per step, same for every optimizer (default "
                             f"{DEFAULT_BATCH_SIZE}; above the dataset size = full batch)")
    length.add_argument("--seed", type=int, default=0,
                        help="seed of the initialization, data split and order (default 0)")
    length.add_argument("--eval-every", type=int, default=None, metavar="N",
                        help=f"evaluate full train/test loss every N steps (default: about "
                             f"{EVAL_POINTS} evaluations per run; not counted in wall time)")
    length.add_argument("--target-loss", type=float, default=None, metavar="LOSS",
                        help="training loss for the time-to-target column (compare default: the "
                             "first optimizer's final training loss)")

    opt = parser.add_argument_group(
        "optimizer options (set for every run that takes them; a spec's key=value wins)")
    opt.add_argument("--lr", type=float, default=None,
                     help="learning rate (defaults: sgd 0.1, adam 1e-3, kfac 0.3 with base sgd, "
                          "1e-3 with base adam)")
    opt.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    opt.add_argument("--weight-decay", type=float, default=None, help="L2 weight decay (default 0)")
    opt.add_argument("--base-optimizer", dest="base", default=None, choices=BASE_OPTIMIZERS,
                     help="kfac: optimizer applying the preconditioned gradient (default sgd)")
    opt.add_argument("--damping", type=float, default=None,
                     help=f"kfac, adafisher, eva: Tikhonov damping (default kfac "
                          f"{OPTIMIZER_DEFAULTS['kfac']['damping']}, adafisher 1e-3, eva 0.03)")
    opt.add_argument("--pi-damping", action="store_const", const=True, default=None,
                     help="kfac: split the damping between the factors by the pi rule")
    opt.add_argument("--factor-decay", type=float, default=None,
                     help=f"kfac: EMA decay of the factors in [0, 1) "
                          f"(default {OPTIMIZER_DEFAULTS['kfac']['factor_decay']})")
    opt.add_argument("--factor-update-every", type=int, default=None, metavar="N",
                     help=f"kfac: factor update period "
                          f"(default {OPTIMIZER_DEFAULTS['kfac']['factor_update_every']})")
    opt.add_argument("--inverse-update-every", type=int, default=None, metavar="N",
                     help=f"kfac: solver re-factorization period "
                          f"(default {OPTIMIZER_DEFAULTS['kfac']['inverse_update_every']})")
    opt.add_argument("--fisher-type", default=None, choices=FISHER_TYPES,
                     help=f"kfac: curvature estimate (default {OPTIMIZER_DEFAULTS['kfac']['fisher_type']})")
    opt.add_argument("--kl-clip", default=None, metavar="VALUE|none",
                     help=f"kfac, eva: KL clipping bound, 'none' disables "
                          f"(default {OPTIMIZER_DEFAULTS['kfac']['kl_clip']})")
    opt.add_argument("--solver", default=None, metavar="NAME",
                     help=f"kfac: Kronecker solver: {', '.join(available_solvers())}, or per layer "
                          "auto (cheapest predicted time) or fits (analog if the factors fit the "
                          "device) (default eigh)")
    opt.add_argument("--solver-map", default=None, metavar="'PATTERN=SPEC;...'|FILE.json",
                     help="kfac: per-layer solvers, first match wins; PATTERN is a regex searched in "
                          "the layer name or a module type name (Linear, Conv2d), SPEC a solver spec "
                          "such as thermo:bits=8,analog_time=20, eigh, auto or fits; or a JSON file "
                          "{pattern: spec}. Unmatched layers use --solver")
    opt.add_argument("--hardware", default=None, choices=THERMO_PRESETS,
                     help="kfac: thermodynamic preset for auto/fits and the predicted times "
                          "(default chip)")
    opt.add_argument("--digital", default=None, choices=DIGITAL_PRESETS,
                     help="kfac: digital preset for auto and the predicted times (default h100)")

    misc = parser.add_argument_group("output")
    misc.add_argument("--out", default=None, metavar="DIR",
                      help="write results.json, metrics.csv and PNG plots here (created; files are "
                           "replaced only when the run completes)")
    misc.add_argument("--threads", type=int, default=None, metavar="N",
                      help="torch CPU threads (default: torch's choice; 1 is often faster for small "
                           "models such as the digits MLP, and much steadier on a busy machine)")
    misc.add_argument("--device", default="cpu", help="torch device (default cpu)")
    misc.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {}
    for key in _FLAG_OPTIONS:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    return overrides


def _experiment_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--eval-every", args.eval_every), ("--threads", args.threads),
                        ("--max-train", args.max_train)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag}={value} must be a positive integer")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise ValueError(f"--epochs={args.epochs} must be a positive number")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_options = dict(args.model_options)
    if args.widths is not None:
        if args.model == "cnn":
            raise ValueError("--widths applies to mlp and autoencoder; use --model-options "
                             "channels=...,hidden=... for cnn")
        model_options["widths"] = args.widths
    if args.activation is not None:
        model_options["activation"] = args.activation
    dataset_options: dict[str, Any] = {}
    if args.dataset in ("mnist", "fashion-mnist", "cifar10"):
        dataset_options.update(root=args.data_dir, download=args.download)
    elif args.download or args.data_dir:
        raise ValueError(f"--download/--data-dir apply to mnist, fashion-mnist and cifar10, not "
                         f"{args.dataset!r}")
    if args.max_train is not None:
        dataset_options["max_train"] = args.max_train
    return dict(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                loss=args.loss, model_options=model_options, dataset_options=dataset_options,
                overrides=_overrides(args), eval_every=args.eval_every, target_loss=args.target_loss,
                out=args.out, progress=not args.no_progress, device=args.device,
                print_assignment=True)


def _run_cli(args: argparse.Namespace, optimizers: list[str], command: str) -> int:
    kwargs = _experiment_kwargs(args)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    replacing = out is not None and (out / "results.json").exists()
    try:
        if command == "train":
            results = train(args.dataset, args.model, optimizers[0], **kwargs)
        else:
            results = compare(args.dataset, args.model, optimizers, **kwargs)
    except ImportError as err:  # optional extras (torchvision): one clean line, like ValueError
        raise ValueError(str(err)) from None
    if not _distributed.is_main_process():
        return 0
    print(format_table(results))
    if out is not None:
        note = " (replaced the previous results)" if replacing else ""
        print(f"wrote {out / 'results.json'}, metrics.csv and plots{note}")
    return 0


def _train_cli(args: argparse.Namespace) -> int:
    # --nproc N: relaunch through torchrun; under torchrun/SLURM: join the process group
    return _distributed.launch_cli(args, lambda: _run_cli(args, [args.optimizer], "train"))


def _compare_cli(args: argparse.Namespace) -> int:
    return _run_cli(args, list(args.optimizers), "compare")


_SPEC_HELP = ("optimizer spec name[:key=value,...]; name: sgd, adam, kfac, adafisher, eva; keys: "
              + ", ".join(OPTIONS) + " (kfac: other keys go to the solver), e.g. "
              "kfac:solver=cholesky,damping=0.1")


def register(subparsers: Any) -> None:
    """Add the ``train`` and ``compare`` sub-commands to the ``thermo-kfac`` CLI."""
    train_parser = subparsers.add_parser(
        "train", help="train one model with one optimizer (sgd, adam, kfac)",
        description="Train a model with one optimizer; progress bar, then a summary table. With "
                    "--out DIR: DIR/results.json, DIR/metrics.csv, DIR/loss.png, DIR/accuracy.png.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train_parser.add_argument("--optimizer", default="kfac", metavar="SPEC",
                              help=_SPEC_HELP + " (default: kfac)")
    _add_common(train_parser)
    _distributed.add_arguments(train_parser)
    train_parser.set_defaults(func=_train_cli)

    compare_parser = subparsers.add_parser(
        "compare", help="train the same model with several optimizers and compare them",
        description="Run several optimizers on the same task (same initialization, same batches), "
                    "print a table (final train/test loss, accuracy, wall time, time to a target "
                    "training loss) and, with --out DIR, write DIR/results.json, DIR/metrics.csv, "
                    "DIR/loss.png, DIR/accuracy.png and the combined DIR/compare.png.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    compare_parser.add_argument("--optimizers", nargs="+", default=["adam", "kfac"], metavar="SPEC",
                                help=_SPEC_HELP + " (default: adam kfac); the first run sets the "
                                     "default target loss")
    _add_common(compare_parser)
    compare_parser.set_defaults(func=_compare_cli)
