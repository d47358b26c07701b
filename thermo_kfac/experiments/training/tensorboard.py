"""TensorBoard scalars of a training run (``--tensorboard DIR``; the ``[tensorboard]`` extra).

Each run writes event files to ``DIR/<run label>`` (characters other than letters, digits and
``._=-`` become ``_``), so ``tensorboard --logdir DIR`` shows the runs of a comparison side by
side. Per step (the step number is TensorBoard's step):

- ``loss/train_batch``, ``accuracy/train_batch``: the step's batch, before the update;
  ``loss/train``, ``loss/test``, ``accuracy/train``, ``accuracy/test``: the full-set evaluations;
- ``time/step_ms``: the step's training wall time; K-FAC runs also
  ``hardware/predicted_digital_s`` and ``hardware/predicted_hybrid_s`` (the step's predicted
  curvature time on the all-digital and the hybrid machine) and ``kfac/fallbacks`` (cumulative);
- per layer served by the thermodynamic solver, from its report of the step (``<L>`` the layer,
  ``<F>`` the factor ``A`` or ``G``): ``kappa/<L>/<F>`` (condition number of the programmed
  factor), ``error_predicted/<L>`` (the error law's relative error of the preconditioned
  gradient), ``error_measured/<L>`` (relative error to the exact damped solve; solver option
  ``track_exact=true``), ``residual_measured/<L>`` (relative residual on the damped system),
  ``window_tau/<L>/<F>`` (averaging window of the solve) and ``bits_lost_to_ranging/<L>/<F>``.

Logging happens after the timed part of a step; it is not counted in the wall time.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

__all__ = ["TENSORBOARD_EXTRA", "TensorBoardLogger", "check_tensorboard", "run_directory"]

TENSORBOARD_EXTRA = "pip install 'thermo-kfac[tensorboard]'"
_RECORD_TAGS = {"train_loss": "loss/train_batch", "train_accuracy": "accuracy/train_batch",
                "eval_train_loss": "loss/train", "test_loss": "loss/test",
                "eval_train_accuracy": "accuracy/train", "test_accuracy": "accuracy/test",
                "predicted_digital_s": "hardware/predicted_digital_s",
                "predicted_hybrid_s": "hardware/predicted_hybrid_s", "fallbacks": "kfac/fallbacks"}
_FACTORS = ("G", "A")  # the thermodynamic solver reports its per-factor lists in this order


def check_tensorboard() -> None:
    """Raise a ValueError naming the extra when TensorBoard's writer cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise ValueError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_EXTRA} "
                         f"({err})") from None


def run_directory(root: str | Path, label: str) -> Path:
    """``root/<label>`` with the label made a safe folder name."""
    return Path(root) / (re.sub(r"[^A-Za-z0-9._=-]+", "_", label) or "run")


class TensorBoardLogger:
    """Writes one run's scalars (module docs) to ``run_directory(root, label)``."""

    def __init__(self, root: str | Path, label: str) -> None:
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.directory = run_directory(root, label)
        self.writer = SummaryWriter(log_dir=str(self.directory))

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, bool) or value is None:
            return
        value = float(value)
        if math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

    def log_step(self, record: dict[str, Any], solver_reports: dict[str, Any] | None = None) -> None:
        """The scalars of one step's ``record`` (:meth:`TrainingRun.step`) and, for K-FAC, the
        per-layer values of the step's solver reports (``last_report["solver_reports"]``)."""
        step = int(record["step"])
        for key, tag in _RECORD_TAGS.items():
            self._scalar(tag, record.get(key), step)
        self._scalar("time/step_ms", 1e3 * record["step_time_s"], step)
        for name, report in (solver_reports or {}).items():
            layer, _, phase = name.rpartition("/")
            info = getattr(report, "info", None) or {}
            if phase != "apply" or "bits_lost_to_ranging" not in info:
                continue  # per-layer values of the analog solves only
            for factor, kappa, bits in zip(_FACTORS, info.get("condition_number", []),
                                           info["bits_lost_to_ranging"], strict=False):
                self._scalar(f"kappa/{layer}/{factor}", kappa, step)
                self._scalar(f"bits_lost_to_ranging/{layer}/{factor}", bits, step)
            windows = {s["factor"]: s["analog_time"] for s in (info.get("pricing") or {}).get("solves", [])}
            for factor in _FACTORS:
                self._scalar(f"window_tau/{layer}/{factor}", windows.get(factor), step)
            self._scalar(f"error_predicted/{layer}", info.get("predicted_error"), step)
            self._scalar(f"error_measured/{layer}", info.get("rel_error_to_exact"), step)
            self._scalar(f"residual_measured/{layer}", info.get("relative_residual"), step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
