"""Noise-robustness study: thermodynamic K-FAC swept over simulator settings, with references.

The package is split by job: :mod:`.study` runs (or resumes) the study, :mod:`.outputs` holds
the rows, summary, files and table, :mod:`.plots` the PNG plots, :mod:`.cli` the
``thermo-kfac noise-study`` command. See :func:`noise_study` and docs/noise_study.md.
"""

from thermo_kfac.experiments.noise_study.cli import register
from thermo_kfac.experiments.noise_study.outputs import (
    METRICS,
    STUDY_METHOD,
    format_table,
    format_warnings,
    point_label,
    summarize,
)
from thermo_kfac.experiments.noise_study.plots import study_figures, write_plots
from thermo_kfac.experiments.noise_study.study import (
    DEFAULT_OPTIMIZER,
    DEFAULT_REFERENCES,
    FORMAT_VERSION,
    STUDY_EVAL_POINTS,
    StudyInterrupted,
    StudyRun,
    noise_study,
    parse_sweep,
    row_key,
    study_task,
    sweep_keys,
)

__all__ = [
    "DEFAULT_OPTIMIZER", "DEFAULT_REFERENCES", "FORMAT_VERSION", "METRICS", "STUDY_EVAL_POINTS",
    "STUDY_METHOD", "StudyInterrupted", "StudyRun", "format_table", "format_warnings", "noise_study",
    "parse_sweep", "point_label", "register", "row_key", "study_figures", "study_task", "summarize",
    "sweep_keys", "write_plots"
]
