"""Progress output: bars only on a terminal, plain lines in a log (``--progress``)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from thermo_kfac.experiments import executors as ex
from thermo_kfac.experiments.progress import LineThrottle, resolve_progress

ROOT = Path(__file__).resolve().parents[2]
ESCAPES = re.compile(r"[\x1b\r]")  # ANSI escape sequences and carriage returns (bar redraws)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _compare_log(tmp_path: Path, *extra: str) -> str:
    """``thermo-kfac compare ... > log 2>&1`` in a subprocess; returns the log."""
    log = tmp_path / "log"
    argv = [sys.executable, "-m", "thermo_kfac.cli", "compare", "--optimizers", "adam", "kfac",
            "kfac:solver=thermo", "--steps", "12", "--batch-size", "64", "--eval-every", "6",
            "--threads", "1", *extra]
    with log.open("w") as handle:
        done = subprocess.run(argv, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    return text


def test_resolve_progress_picks_bars_only_on_a_terminal():
    assert resolve_progress("auto", _Terminal()) == "bar"
    assert resolve_progress("auto", io.StringIO()) == "lines"
    assert resolve_progress(True, io.StringIO()) == "lines" and resolve_progress(False) == "none"
    assert resolve_progress("bar", io.StringIO()) == "bar"
    with pytest.raises(ValueError, match=r"progress='fancy' is not valid; choose one of: 'auto', 'bar'"):
        resolve_progress("fancy")


def test_line_throttle_every_n_steps_and_at_the_end():
    throttle = LineThrottle(total=95, seconds=1e9)  # 10 lines: every 10 steps
    due = [step for step in range(1, 96) if throttle.due(step, final=step == 95)]
    assert due == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    assert LineThrottle(total=5, seconds=0.0).due(1)  # a slow run prints at least every `seconds`


def test_redirected_compare_log_has_no_escape_codes(tmp_path):
    text = _compare_log(tmp_path)
    assert not ESCAPES.search(text), repr(text[:400])
    for label in ("adam", "kfac", "kfac:solver=thermo"):  # one plain line per run at its last step
        assert re.search(rf"^{re.escape(label)}: step 12/12, loss [0-9.e+-]+, acc [0-9.]+, "
                         r"[0-9.]+ ms/step", text, re.M), label
    # K-FAC runs also report the predicted step time of both machines
    assert re.search(r"^kfac:solver=thermo: step 12/12, .*predicted curvature/step digital [0-9.]+ [mun]?s, "
                     r"hybrid [0-9.]+ [mun]?s$", text, re.M)
    assert re.search(r"^optimizer +steps +train loss", text, re.M)  # the summary table follows


def test_forced_bars_write_redraws_into_the_log(tmp_path):
    # the check above would notice bars: forcing them into a file writes tqdm's redraws
    assert ESCAPES.search(_compare_log(tmp_path, "--progress", "bar"))


def test_executor_progress_lines_name_each_finished_task(capsys, tmp_path):
    from tests.thermo_kfac.test_executors import raises, report

    tasks = [ex.Task("a", report, {"_": 1}), ex.Task("bad", raises, {"log": str(tmp_path / "log")})]
    results = list(ex.SerialExecutor().map(tasks, progress="lines", desc="study", initial=3))
    assert len(results) == 2
    err = capsys.readouterr().err
    assert not ESCAPES.search(err)
    lines = err.strip().splitlines()
    assert lines[0] == "study: 4/5 tasks (done 1, failed 0, running 0); a done"
    assert lines[1].startswith("study: 5/5 tasks (done 1, failed 1, running 0); bad FAILED (RuntimeError:")
    list(ex.SerialExecutor().map(tasks[:1], progress="none"))
    assert capsys.readouterr().err == ""
