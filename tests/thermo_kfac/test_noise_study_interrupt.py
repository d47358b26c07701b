"""Noise study as a user meets it: Ctrl-C (serial and with Dask workers), resume messages, a refused
resume that names the option, and the files' permissions."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thermo_kfac import cli

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--widths", "16", "--seeds", "2", "--threads", "1", "--references", "adam", "--optimizer",
         "kfac:solver=thermo,integrator=analytic,analog_time=100"]


def _interrupt(out: Path, extra: list[str], steps: int) -> subprocess.CompletedProcess:
    """Start a study, press Ctrl-C (SIGINT to the whole process group, as a terminal does) once
    its first row is saved, and return what it printed."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "thermo_kfac.cli", "noise-study", "--sweep", "bits=6,8,12,16",
            "--steps", str(steps), *SMALL, *extra, "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out / "study.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the study ended or hung before its first row: {proc.communicate()}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _check_interrupted(done: subprocess.CompletedProcess, out: Path) -> None:
    saved = len(json.loads((out / "study.json").read_text())["rows"])
    assert done.returncode == 130, done.stderr[-3000:]
    assert 1 <= saved < 10  # 2 adam + 4 points x 2 seeds
    assert "Traceback" not in done.stderr and "CancelledError" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"noise-study: interrupted: {saved} of 10 rows saved in {out}; rerun the same command to resume")
    assert done.stdout == ""  # no table of a half study


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    out = tmp_path / "serial"
    _check_interrupted(_interrupt(out, ["--no-progress"], steps=400), out)


def test_ctrl_c_with_dask_workers_prints_no_worker_tracebacks(tmp_path):
    pytest.importorskip("distributed", reason="the [cluster] extra (dask distributed) is not installed")
    out = tmp_path / "dask"
    _check_interrupted(_interrupt(out, ["--workers", "2"], steps=400), out)


def _argv(out: Path, *extra: str) -> list[str]:
    return ["noise-study", "--sweep", "bits=8", "--steps", "4", *SMALL, "--no-progress", "--out", str(out),
            *extra]


def test_resume_says_what_it_found_and_a_refusal_names_the_option(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli.main(_argv(out)) == 0
    assert "resuming" not in capsys.readouterr().err  # a fresh folder
    assert cli.main(_argv(out, "--seeds", "3")) == 0  # one more seed: 2 of the 4 rows are new
    assert "noise-study: resuming: 4 of 6 rows found in " + str(out) in capsys.readouterr().err
    assert cli.main(_argv(out, "--seeds", "3")) == 0
    assert "resuming: 6 of 6 rows found in " + str(out) + "; nothing to run" in capsys.readouterr().err
    # --steps changed (and with it the default --eval-every): the message names --steps only
    assert cli.main(_argv(out, "--seeds", "3", "--steps", "6")) == 2
    err = capsys.readouterr().err
    assert "steps (--steps/--epochs): 4 there, 6 now" in err and "eval_every" not in err
    assert "rerun with the same options to resume" in err
    assert cli.main(_argv(out, "--seeds", "3", "--eval-every", "2")) == 2
    assert "eval_every (--eval-every): 1 there, 2 now" in capsys.readouterr().err


def test_study_files_are_written_with_the_users_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "study"
        assert cli.main(_argv(out)) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert {"results.csv", "study.json", "loss_vs_bits.png", "curves.png"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes
