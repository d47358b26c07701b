"""Command-line entry point ``thermo-kfac``: a thin layer over :mod:`thermo_kfac.experiments`.

Each command lives in a module that exposes ``register(subparsers)``; that function adds one or
more sub-commands and sets ``func`` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = [
    "thermo_kfac.experiments.training",  # train, compare
    "thermo_kfac.experiments.hardware",  # calibrate, project
    "thermo_kfac.experiments.placement",  # placement
    "thermo_kfac.experiments.fisher_error",  # fisher-error
    "thermo_kfac.experiments.noise_study",  # noise-study
    "thermo_kfac.experiments.bench",  # bench
]


def build_parser(modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``thermo-kfac`` parser with the sub-commands of ``modules`` (default: all)."""
    parser = argparse.ArgumentParser(
        prog="thermo-kfac",
        description="K-FAC training with simulated thermodynamic (analog) solvers, and hardware "
                    "cost projections.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES if modules is None else modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, modules: Sequence[str] | None = None) -> int:
    """Run the CLI; ``modules`` limits the sub-commands (see :data:`COMMAND_MODULES`)."""
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for relaunching (train --nproc)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        # Configuration mistakes: one clear line, no traceback.
        print(f"thermo-kfac {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
