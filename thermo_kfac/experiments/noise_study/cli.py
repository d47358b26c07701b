"""The ``thermo-kfac noise-study`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from hw_models.validation import check_positive
from thermo_kfac.data import DATASETS
from thermo_kfac.experiments import executors
from thermo_kfac.experiments._io import kv_list, widths_list
from thermo_kfac.experiments.noise_study.outputs import format_table, format_warnings
from thermo_kfac.experiments.noise_study.study import (
    DEFAULT_OPTIMIZER,
    DEFAULT_REFERENCES,
    STUDY_EVAL_POINTS,
    StudyInterrupted,
    noise_study,
    sweep_keys,
)
from thermo_kfac.experiments.progress import add_progress_argument, progress_mode
from thermo_kfac.experiments.run_notes import children_ignore_sigint
from thermo_kfac.experiments.training import DEFAULT_BATCH_SIZE
from thermo_kfac.models import available_models, with_width

__all__ = ["register"]


def _cli(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads={args.threads} must be a positive integer")
        torch.set_num_threads(args.threads)
    model_options = dict(args.model_options)
    if args.widths is not None:
        model_options["widths"] = args.widths
    if args.width is not None:
        model_options = with_width(args.model, model_options, args.width)
    dataset_options: dict[str, Any] = {}
    if args.max_train is not None:
        dataset_options["max_train"] = check_positive("--max-train", args.max_train, integer=True)
    try:
        with children_ignore_sigint():  # worker processes started now leave Ctrl-C to us
            executor = executors.from_args(args, device=args.device)
        with executor:
            study = noise_study(args.dataset, args.model, args.sweep, optimizer=args.optimizer,
                                references=args.references, steps=args.steps, epochs=args.epochs,
                                batch_size=args.batch_size, seeds=args.seeds, seed=args.seed,
                                model_options=model_options, dataset_options=dataset_options,
                                eval_every=args.eval_every, out=args.out, overwrite=args.overwrite,
                                progress=progress_mode(args), device=args.device, executor=executor,
                                log=_say)
    except StudyInterrupted as stop:
        _say(str(stop))
        return 130
    except KeyboardInterrupt:
        _say("interrupted before the study started; nothing was run")
        return 130
    print(format_table(study))
    notes = format_warnings(study)
    if notes:
        print("warnings (once per layer and cause; per study line):")
        print("\n".join(f"  {line}" for line in notes))
    if args.out:
        print(f"wrote {Path(args.out) / 'results.csv'}, study.json and plots "
              f"({', '.join(study.get('plots', []))})")
    return 0


def _say(message: str) -> None:
    """A one-line message for the user, on stderr (stdout holds the table)."""
    print(f"noise-study: {message}", file=sys.stderr, flush=True)


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
    parser.add_argument("--widths", type=widths_list, default=None, metavar="W,W,...",
                        help="hidden widths of mlp / encoder widths of autoencoder")
    parser.add_argument("--width", type=int, default=None, metavar="W",
                        help="the single width of cnn (classifier hidden layer), vit (embedding "
                             "dimension) or rnn (state), e.g. 256")
    parser.add_argument("--model-options", type=kv_list, default={}, metavar="K=V,...",
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
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (per worker with --workers/--cluster)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_progress_argument(parser)
    executors.add_arguments(parser)
    parser.set_defaults(func=_cli)
