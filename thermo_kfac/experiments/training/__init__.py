"""Training experiments: :func:`train` one optimizer, :func:`compare` several on the same task.

Both are library functions (returning the results dict) and CLI sub-commands (``thermo-kfac
train`` / ``thermo-kfac compare``, added by :func:`register`). The package is split by job:

- :mod:`.options`: optimizer specs ``name[:key=value,...]``, the option schema and defaults;
- :mod:`.optimizers`: :func:`build_optimizer`, a resolved spec -> torch optimizer (+ K-FAC);
- :mod:`.run`: :class:`TrainingRun`, one run advanced a step at a time, and the interleaved loop;
- :mod:`.experiment`: :func:`compare` and :func:`train`;
- :mod:`.outputs`: ``results.json``, ``metrics.csv``, plots, the table, time to target;
- :mod:`.cli`: the ``train`` / ``compare`` argparse commands.

Every run of a comparison starts from the same initial parameters (``torch.manual_seed(seed)``
before the model is built) and sees the same batches in the same order
(:meth:`thermo_kfac.data.Dataset.batches`). The runs advance in lockstep, one step each in turn,
so that load changes on a shared machine hit all alike.
"""

from thermo_kfac.experiments.training.cli import add_common_arguments, register
from thermo_kfac.experiments.training.experiment import compare, compare_task, train, unique_labels
from thermo_kfac.experiments.training.optimizers import build_optimizer
from thermo_kfac.experiments.training.options import (
    ADAPTIVE,
    BASE_OPTIMIZERS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    EVAL_POINTS,
    FACTOR_DTYPES,
    FISHER_TYPES,
    KFAC_ADAM_LR,
    LOSSES,
    OPTIMIZER_DEFAULTS,
    OPTIMIZERS,
    OPTIONS,
    TASK_LOSSES,
    OptimizerSpec,
    Option,
    check_option,
    parse_optimizer_spec,
    resolve_options,
    solver_option_hint,
)
from thermo_kfac.experiments.training.outputs import (
    CSV_COLUMNS,
    format_table,
    metrics_csv,
    render_plots,
    time_to_target,
    write_results,
)
from thermo_kfac.experiments.training.run import (
    MAX_EVAL_EXAMPLES,
    WARMUP_STEPS,
    TrainingRun,
    evaluate,
    loss_function,
    train_interleaved,
)

__all__ = [
    "ADAPTIVE", "BASE_OPTIMIZERS", "CSV_COLUMNS", "DEFAULT_BATCH_SIZE", "DEFAULT_EPOCHS", "EVAL_POINTS",
    "FACTOR_DTYPES", "FISHER_TYPES", "KFAC_ADAM_LR", "LOSSES", "MAX_EVAL_EXAMPLES", "OPTIMIZERS",
    "OPTIMIZER_DEFAULTS", "OPTIONS", "TASK_LOSSES", "WARMUP_STEPS", "Option", "OptimizerSpec",
    "TrainingRun", "add_common_arguments", "build_optimizer", "check_option", "compare", "compare_task",
    "evaluate",
    "format_table", "loss_function", "metrics_csv", "parse_optimizer_spec", "register", "render_plots",
    "resolve_options", "solver_option_hint", "time_to_target", "train", "train_interleaved",
    "unique_labels", "write_results"
]
