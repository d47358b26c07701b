"""`thermo-kfac train` / `compare` as a user meets them: Ctrl-C (one line, exit 130, no
tracebacks, also with worker processes), warnings summarised once per layer and cause at the end,
and one default per flag in --help."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from thermo_kfac import cli
from thermo_kfac.experiments.training import compare, run
from thermo_kfac.solvers import EighSolver, SolverFailure, register_solver

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--widths", "16", "--threads", "1", "--no-progress"]


@register_solver
class _UnrepresentableSolver(EighSolver):
    """A solver whose factors never fit its (pretend) device: every prepare fails, so K-FAC
    warns and falls back to eigh on every layer, as a low-bit thermodynamic solver does."""

    name = "test-unrepresentable"

    def prepare(self, A, G, damping):
        lam = -float(A.trace())  # a measured number, left out of the cause
        raise SolverFailure(f"factor not representable on the test device: lambda_min = {lam:.4g}")


@pytest.fixture(autouse=True)
def _only_training_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["thermo_kfac.experiments.training"])


def _interrupting_step(monkeypatch, after: int) -> None:
    """Make the ``after``-th training step of the process raise KeyboardInterrupt (Ctrl-C)."""
    original = run.TrainingRun.step
    calls = {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(run.TrainingRun, "step", step)


def _main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except KeyboardInterrupt:  # fail this test, not the session
        pytest.fail("Ctrl-C escaped the command (a traceback for the user)")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_ctrl_c_prints_one_line_saves_nothing_and_exits_130(command, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _interrupting_step(monkeypatch, after=3)
    assert _main([command, "--steps", "20", *SMALL, "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1] == (
        f"{command}: interrupted; nothing was saved (results are written only when the run completes); "
        "rerun the same command to start again")
    assert "final" not in captured.out  # no table of a half run
    assert not (out / "results.json").exists()


def test_ctrl_c_keeps_previous_results_and_says_so(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(["train", "--optimizer", "adam", "--steps", "4", *SMALL, "--out", str(out)]) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    _interrupting_step(monkeypatch, after=2)
    assert _main(["train", "--optimizer", "adam", "--steps", "8", *SMALL, "--out", str(out)]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"train: interrupted; {out} keeps its previous results")
    assert (out / "results.json").read_text() == before


def _children(pid: int) -> list[int]:
    """The ids of the processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes in Linux /proc")
def test_ctrl_c_with_workers_prints_no_worker_tracebacks(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it, during ``compare --workers 2``."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "thermo_kfac.cli", "compare", "--optimizers", "adam", "sgd",
            "--steps", "1000000", "--eval-every", "1000000", *SMALL[:-1], "--progress", "lines",
            "--workers", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_children(proc.pid)) < 2:  # the worker processes are started
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"compare ended or hung before its workers: {proc.communicate()}")
            time.sleep(0.2)
        time.sleep(5.0)  # let them import and train (a run of 10^6 steps does not end before)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("compare: interrupted; nothing was saved")


def test_warnings_are_recorded_once_per_layer_and_cause_and_summarised(tmp_path, capsys):
    steps = 12
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        results = compare("digits", "mlp", ["adam", "kfac:solver=test-unrepresentable"], steps=steps,
                          eval_every=6, model_options={"widths": [16]})
    assert [str(w.message) for w in escaped] == []  # none printed from inside the training loop
    kfac = results["runs"][1]
    layers = kfac["layers"]
    assert len(layers) == 2
    # one entry per layer, with the cause stripped of the layer name and the measured number
    assert sorted(w["layer"] for w in results["warnings"]) == sorted(layers)
    assert {w["cause"] for w in results["warnings"]} == {"factor not representable on the test device"}
    assert all(kfac["fallbacks"][name] == steps for name in layers)

    out = tmp_path / "run"
    assert cli.main(["compare", "--optimizers", "adam", "kfac:solver=test-unrepresentable", "--steps",
                     str(steps), *SMALL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    head = printed.index("warnings (once per layer and cause, for the whole run):")
    notes = printed[head + 1:head + 1 + len(layers)]
    assert printed[head + 1 + len(layers)].startswith("wrote ")  # nothing else warned
    assert notes == [f"  layer {name!r} fell back {steps}/{steps} steps: factor not representable on the "
                     "test device" for name in layers]
    cause = "factor not representable on the test device"
    assert json.loads((out / "results.json").read_text())["warnings"] == [
        {"layer": name, "cause": cause, "count": 1} for name in layers]


_DEFAULT = re.compile(r"\(defaults?\b|\bdefaults?:")


def _option_blocks(text: str) -> dict[str, str]:
    """The help text of each option, keyed by its first flag."""
    blocks: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            flag = match.group(1)
            blocks[flag] = line
        elif flag is not None and line.startswith("   "):
            blocks[flag] += " " + line.strip()
        else:
            flag = None
    return blocks


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_shows_one_default_per_flag(command, capsys):
    parser = cli.build_parser(["thermo_kfac.experiments.training"])
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    blocks = _option_blocks(capsys.readouterr().out)
    sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    checked = 0
    for action in sub._actions:
        if not action.option_strings or action.option_strings[0] in ("-h", "--help"):
            continue
        text = blocks[action.option_strings[0]]
        assert len(_DEFAULT.findall(text)) <= 1, text
        empty = isinstance(action.default, (list, tuple, dict)) and not action.default
        if action.default not in (None, False) and not empty and action.nargs != 0:
            assert _DEFAULT.search(text), f"{command} {action.option_strings[0]}: no default shown: {text}"
            checked += 1
    assert checked >= 5


def test_warnings_of_task_runs_come_back_from_the_tasks():
    """``compare`` with an executor (as with --workers) runs each optimizer as a task: its warnings
    are recorded in the task and merged, not printed by the worker."""
    from thermo_kfac.experiments.executors import SerialExecutor

    specs = ["kfac:solver=test-unrepresentable", "kfac:solver=test-unrepresentable,damping=0.01"]
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        with SerialExecutor(threads=1, task_timeout=300) as executor:  # a timeout makes tasks
            results = compare("digits", "mlp", specs, steps=6, eval_every=3, model_options={"widths": [16]},
                              executor=executor)
    assert [str(w.message) for w in escaped] == []
    layers = results["runs"][0]["layers"]
    assert "one after the other as tasks" in results["config"]["wall_time_note"]
    # two runs, each warned once per layer: merged into one entry per layer with both counts
    assert results["warnings"] == [{"layer": name, "cause": "factor not representable on the test device",
                                    "count": 2} for name in layers]
