"""The ``thermo-kfac train`` and ``thermo-kfac compare`` commands (argparse over the library).

``train`` also takes the distributed options (``--nproc``, ``--placement`` ...): the launcher
(:mod:`thermo_kfac.experiments.launch`) relaunches it through torchrun or joins a process group,
and the options become the :class:`~thermo_kfac.distributed.DistributedConfig` of every run.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from hw_models.devices import DIGITAL_PRESETS, THERMO_PRESETS
from thermo_kfac.data import DATASETS
from thermo_kfac.distributed import is_main_process
from thermo_kfac.experiments import executors
from thermo_kfac.experiments._io import DefaultsHelpFormatter, kv_list, widths_list
from thermo_kfac.experiments.executors import Executor
from thermo_kfac.experiments.launch import add_arguments, config_from_args, launch_cli
from thermo_kfac.experiments.progress import add_progress_argument, progress_mode
from thermo_kfac.experiments.run_notes import children_ignore_sigint
from thermo_kfac.experiments.training.experiment import compare, train
from thermo_kfac.experiments.training.options import (
    BASE_OPTIMIZERS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    EVAL_POINTS,
    FISHER_TYPES,
    LOSSES,
    OPTIMIZER_DEFAULTS,
    OPTIONS,
)
from thermo_kfac.experiments.training.outputs import format_table, format_warnings
from thermo_kfac.models import available_models, with_width

__all__ = ["add_common_arguments", "register"]

# Options that have a CLI flag of the same name (``--factor-decay`` ...).
_FLAG_OPTIONS = ["lr", "momentum", "weight_decay", "base", "damping", "pi_damping", "factor_decay",
                 "factor_update_every", "inverse_update_every", "fisher_type", "kl_clip", "solver",
                 "solver_map", "hardware", "digital"]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The task, schedule, optimizer and output options shared by ``train`` and ``compare``."""
    from thermo_kfac.solvers import available_solvers

    task = parser.add_argument_group("task")
    task.add_argument("--dataset", default="digits", choices=DATASETS, metavar="NAME",
                      help=f"dataset: {', '.join(DATASETS)} (default: digits, embedded, no download)")
    task.add_argument("--model", default="mlp", choices=available_models(), metavar="NAME",
                      help=f"model: {', '.join(available_models())} (default: mlp; 'autoencoder' "
                           "trains the dataset's images as an auto-encoder task)")
    task.add_argument("--widths", type=widths_list, default=None, metavar="W,W,...",
                      help="hidden widths of mlp or encoder widths of autoencoder (default: 128,128 "
                           "for mlp; 1000,500,250,30 for autoencoder on 784 inputs, scaled for smaller "
                           "inputs)")
    task.add_argument("--width", type=int, default=None, metavar="W",
                      help="the single width of cnn (classifier hidden layer), vit (embedding "
                           "dimension) or rnn (state), e.g. 256 for the realistic-width workload "
                           "on digits28 (default: the model's, 64 / 32 / 64)")
    task.add_argument("--activation", default=None, metavar="NAME",
                      help="hidden activation: relu, tanh, sigmoid, gelu, elu, silu (default: relu; "
                           "sigmoid for autoencoder)")
    task.add_argument("--model-options", type=kv_list, default={}, metavar="K=V,...",
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
    misc.add_argument("--tensorboard", default=None, metavar="DIR",
                      help="also write TensorBoard scalars (losses, accuracy, predicted digital/hybrid "
                           "time, fallbacks; per analog layer kappa, predicted and measured error, "
                           "window, bits lost to ranging) to DIR/<run>; needs "
                           "pip install 'thermo-kfac[tensorboard]'")
    misc.add_argument("--threads", type=int, default=None, metavar="N",
                      help="torch CPU threads (default: torch's choice; 1 is often faster for small "
                           "models such as the digits MLP, and much steadier on a busy machine)")
    misc.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_progress_argument(misc)


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
    if args.width is not None:
        model_options = with_width(args.model, model_options, args.width)
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
                out=args.out, progress=progress_mode(args), device=args.device, tensorboard=args.tensorboard,
                print_assignment=True, distributed=config_from_args(args))


def _run_cli(args: argparse.Namespace, optimizers: list[str], command: str,
             executor: Executor | None = None) -> int:
    kwargs = _experiment_kwargs(args)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    replacing = out is not None and (out / "results.json").exists()
    try:
        if command == "train":
            results = train(args.dataset, args.model, optimizers[0], **kwargs)
        else:
            results = compare(args.dataset, args.model, optimizers, executor=executor, **kwargs)
    except ImportError as err:  # optional extras (torchvision): one clean line, like ValueError
        raise ValueError(str(err)) from None
    if not is_main_process():
        return 0
    print(format_table(results))
    notes = format_warnings(results)
    if notes:
        print("warnings (once per layer and cause, for the whole run):")
        print("\n".join(f"  {line}" for line in notes))
    if out is not None:
        note = " (replaced the previous results)" if replacing else ""
        print(f"wrote {out / 'results.json'}, metrics.csv and plots{note}")
    return 0


def _train_cli(args: argparse.Namespace) -> int:
    # --nproc N: relaunch through torchrun; under torchrun/SLURM: join the process group
    try:
        return launch_cli(args, lambda: _run_cli(args, [args.optimizer], "train"))
    except KeyboardInterrupt:
        return _interrupted("train", args)


def _compare_cli(args: argparse.Namespace) -> int:
    try:
        with children_ignore_sigint():  # worker processes started now leave Ctrl-C to us
            executor = executors.from_args(args, device=args.device)  # --workers/--cluster
        with executor:
            return _run_cli(args, list(args.optimizers), "compare", executor=executor)
    except KeyboardInterrupt:
        return _interrupted("compare", args)


def _interrupted(command: str, args: argparse.Namespace) -> int:
    """Ctrl-C: one line on stderr saying what was saved and how to rerun; exit status 130."""
    if not is_main_process():
        return 130
    if args.out and (Path(args.out) / "results.json").exists():
        saved = f"{Path(args.out)} keeps its previous results (files are replaced only when a run completes)"
    else:
        saved = "nothing was saved (results are written only when the run completes)"
    print(f"{command}: interrupted; {saved}; rerun the same command to start again", file=sys.stderr,
          flush=True)
    return 130


_SPEC_HELP = ("optimizer spec name[:key=value,...]; name: sgd, adam, kfac, adafisher, eva, kld-wrm; keys: "
              + ", ".join(OPTIONS) + " (kfac: other keys go to the solver), e.g. "
              "kfac:solver=cholesky,damping=0.1")


def register(subparsers: Any) -> None:
    """Add the ``train`` and ``compare`` sub-commands to the ``thermo-kfac`` CLI."""
    train_parser = subparsers.add_parser(
        "train", help="train one model with one optimizer (sgd, adam, kfac)",
        description="Train a model with one optimizer; progress (bars on a terminal, plain lines in a "
                    "log), then a summary table. With "
                    "--out DIR: DIR/results.json, DIR/metrics.csv, DIR/loss.png, DIR/accuracy.png.",
        formatter_class=DefaultsHelpFormatter)  # "(default: X)" once per option
    train_parser.add_argument("--optimizer", default="kfac", metavar="SPEC",
                              help=_SPEC_HELP + " (default: kfac)")
    add_common_arguments(train_parser)
    add_arguments(train_parser)
    train_parser.set_defaults(func=_train_cli)

    compare_parser = subparsers.add_parser(
        "compare", help="train the same model with several optimizers and compare them",
        description="Run several optimizers on the same task (same initialization, same batches), "
                    "print a table (final train/test loss, accuracy, wall time, time to a target "
                    "training loss) and, with --out DIR, write DIR/results.json, DIR/metrics.csv, "
                    "DIR/loss.png, DIR/accuracy.png and the combined DIR/compare.png.",
        formatter_class=DefaultsHelpFormatter)  # "(default: X)" once per option
    compare_parser.add_argument("--optimizers", nargs="+", default=["adam", "kfac"], metavar="SPEC",
                                help=_SPEC_HELP + " (default: adam kfac); the first run sets the "
                                     "default target loss")
    add_common_arguments(compare_parser)
    executors.add_arguments(compare_parser)  # one optimizer per task
    compare_parser.set_defaults(func=_compare_cli)
