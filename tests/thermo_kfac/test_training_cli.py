"""`thermo-kfac train` / `compare`: output files and schema, learning, same data order, errors."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from thermo_kfac import cli
from thermo_kfac.experiments import training
from thermo_kfac.experiments.training import (
    OPTIONS,
    compare,
    parse_optimizer_spec,
    resolve_options,
    train,
)
from thermo_kfac.solvers import EighSolver, SolverReport, register_solver

RUN_KEYS = {"optimizer", "solver", "steps", "wall_time_s", "final_train_loss", "final_test_loss",
            "test_accuracy", "history", "time_to_target_s", "label"}


@register_solver
class _FakeHardwareSolver(EighSolver):
    """eigh that reports a predicted hardware time, like a hardware-model solver will."""

    name = "test-fake-hardware"

    def apply(self, grad):
        self.last_report = SolverReport(hardware_time_s=1e-6)
        return super().apply(grad)


@pytest.fixture(autouse=True)
def _only_training_commands(monkeypatch):
    # These tests are about train/compare; other command modules are tested on their own.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["thermo_kfac.experiments.training"])


def _main(*argv: str) -> int:
    return cli.main([*argv, "--no-progress"])


def test_train_writes_files_with_the_documented_schema(tmp_path, capsys):
    out = tmp_path / "new" / "run"  # parents are created
    assert _main("train", "--optimizer", "adam", "--steps", "12", "--eval-every", "5",
                 "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "adam" in printed and "test acc" in printed and "results.json" in printed
    assert {p.name for p in out.iterdir()} == {"results.json", "metrics.csv", "loss.png",
                                                "accuracy.png"}
    for png in ("loss.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "train" and results["seed"] == 0
    assert results["config"]["dataset"]["name"] == "digits" and results["config"]["steps"] == 12
    (run,) = results["runs"]
    assert RUN_KEYS <= set(run)
    assert run["optimizer"] == "adam" and run["solver"] is None and run["steps"] == 12
    assert run["time_to_target_s"] is None  # train: only with --target-loss
    history = run["history"]
    assert [h["step"] for h in history] == list(range(1, 13))
    assert all({"step", "train_loss", "wall_time_s", "step_time_s"} <= set(h) for h in history)
    assert [h["step"] for h in history if "test_loss" in h] == [5, 10, 12]  # + the last step
    walls = [h["wall_time_s"] for h in history]
    assert walls == sorted(walls) and math.isclose(walls[-1], run["wall_time_s"])
    assert run["final_train_loss"] == history[-1]["eval_train_loss"]
    assert 0 <= run["test_accuracy"] <= 1
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and rows[0]["run"] == "adam" and rows[4]["test_loss"] != ""


def test_kfac_lowers_the_loss_on_digits_and_records_hardware_time(tmp_path):
    results = train("digits", "mlp", "kfac:solver=test-fake-hardware", steps=30, eval_every=10)
    (run,) = results["runs"]
    assert run["solver"] == "test-fake-hardware" and run["layers"] == ["1", "3", "5"]
    assert run["final_train_loss"] < 0.3 * run["initial_train_loss"]
    assert run["test_accuracy"] > 0.8
    assert run["fallbacks"] == {"1": 0, "3": 0, "5": 0}  # the fake solver's results are all usable
    assert all(h["predicted_hardware_s"] > 0 for h in run["history"])
    assert run["predicted_hardware_total_s"] == pytest.approx(
        sum(h["predicted_hardware_s"] for h in run["history"]))


def test_compare_same_start_same_batches_and_time_to_target(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _main("compare", "--optimizers", "adam", "kfac", "sgd:lr=0.05", "kfac:solver=cholesky",
                 "--steps", "15", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    for word in ("to target s", "speed-up", "kfac:solver=cholesky", "sgd:lr=0.05"):
        assert word in printed
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["label"] for r in runs] == ["adam", "kfac", "sgd:lr=0.05", "kfac:solver=cholesky"]
    assert [r["solver"] for r in runs] == [None, "eigh", None, "cholesky"]
    assert runs[2]["options"]["lr"] == 0.05
    # same initialization and same first batch: identical loss before the first update
    first = [r["history"][0]["train_loss"] for r in runs]
    assert max(first) - min(first) < 1e-6
    assert results["target_loss"] == runs[0]["final_train_loss"]
    assert "adam" in results["target_source"]
    assert runs[0]["time_to_target_s"] is not None
    assert runs[0]["time_to_target_s"] <= runs[0]["wall_time_s"]
    for run in runs:
        assert run["steps"] == 15 and RUN_KEYS <= set(run)
    with open(out / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 * 15


def test_target_loss_option_and_regression_task(tmp_path):
    results = compare("synthetic-regression", "mlp", ["adam", "kfac:fisher_type=mc"], steps=8,
                      batch_size=100, target_loss=1e9, dataset_options={"n_train": 200, "n_test": 50})
    assert results["target_loss"] == 1e9 and results["target_source"] == "given"
    for run in results["runs"]:
        assert run["time_to_target_s"] == 0.0 and run["steps_to_target"] == 0
        assert "test_accuracy" not in run and run["final_test_loss"] > 0
    assert results["config"]["loss"] == "mse"


def test_autoencoder_cli_runs_with_type2_kfac(tmp_path, capsys):
    assert _main("train", "--model", "autoencoder", "--widths", "16,4", "--optimizer",
                 "kfac:fisher_type=type2", "--steps", "3", "--batch-size", "32",
                 "--max-train", "64") == 0
    printed = capsys.readouterr().out
    assert "test acc" not in printed and "kfac" in printed


def test_failed_run_leaves_previous_results_intact(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert _main("train", "--optimizer", "sgd", "--steps", "2", "--out", str(out)) == 0
    before = (out / "results.json").read_text()

    def broken(self):
        if self.history:  # fail in the middle of training
            raise RuntimeError("interrupted")
        return original(self)

    original = training.TrainingRun.step
    monkeypatch.setattr(training.TrainingRun, "step", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        _main("train", "--optimizer", "adam", "--steps", "2", "--out", str(out))
    assert (out / "results.json").read_text() == before
    monkeypatch.setattr(training.TrainingRun, "step", original)
    capsys.readouterr()
    assert _main("train", "--optimizer", "adam", "--steps", "2", "--out", str(out)) == 0
    assert "replaced the previous results" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["runs"][0]["optimizer"] == "adam"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("argv,message", [
    (["train", "--optimizer", "rmsprop"], "optimizer='rmsprop' is not valid; choose one of: 'sgd'"),
    (["train", "--optimizer", "kfac:dampin=1"], "did you mean 'dampin' -> 'damping'"),
    (["train", "--optimizer", "adam:damping=1"], "adam has no option 'damping'"),
    (["train", "--optimizer", "kfac:damping=abc"], "damping='abc' must be a number"),
    (["train", "--optimizer", "kfac:damping=-1"], "damping=-1.0 is out of range"),
    (["train", "--optimizer", "kfac:fisher_type=exact"], "fisher_type='exact' is not valid"),
    (["train", "--optimizer", "kfac:lr"], "'lr' is not key=value"),
    (["train", "--optimizer", "kfac:bits=8"], "bits"),
    (["train", "--optimizer", "kfac", "--solver", "magic"], "solver='magic' is not valid"),
    (["train", "--optimizer", "adam", "--damping", "0.1"], "damping=0.1 applies to kfac, adafisher, eva"),
    (["train", "--steps", "0"], "--steps=0 must be a positive integer"),
    (["train", "--batch-size", "-4"], "--batch-size=-4 must be a positive integer"),
    (["train", "--epochs", "0"], "--epochs=0.0 must be a positive number"),
    (["train", "--lr", "-1"], "lr=-1.0 is out of range"),
    (["train", "--optimizer", "kfac", "--kl-clip", "abc"], "kl_clip='abc' must be a number or none"),
    (["train", "--model", "autoencoder", "--loss", "cross_entropy"], "loss='cross_entropy' is not valid"),
    (["train", "--model", "mlp", "--model-options", "depth=3"], "no option"),
    (["train", "--dataset", "mnist", "--data-dir", "/nonexistent"], "--download"),
    (["train", "--dataset", "digits", "--download"], "--download/--data-dir apply to mnist"),
    (["compare", "--optimizers", "adam", "sgd", "--factor-decay", "0.5"], "applies to kfac only"),
])
def test_bad_input_gives_one_clean_error_line(argv, message, capsys):
    assert _main(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"thermo-kfac {argv[0]}: error:") and len(err.splitlines()) == 1
    assert any(part in err for part in message.split("|")), err


def test_argparse_rejects_steps_with_epochs_and_unknown_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        _main("train", "--steps", "3", "--epochs", "1")
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        _main("train", "--dataset", "imagenet")
    assert "imagenet" in capsys.readouterr().err


def test_out_must_be_a_directory(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert _main("train", "--steps", "1", "--out", str(target)) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    flags = ["--dataset", "--model", "--widths", "--activation", "--model-options", "--loss",
             "--data-dir", "--download", "--max-train", "--steps", "--epochs", "--batch-size",
             "--seed", "--eval-every", "--target-loss", "--lr", "--momentum", "--weight-decay",
             "--base-optimizer", "--damping", "--pi-damping", "--factor-decay",
             "--factor-update-every", "--inverse-update-every", "--fisher-type", "--kl-clip",
             "--solver", "--out", "--threads", "--device", "--no-progress",
             "--optimizer" if command == "train" else "--optimizers"]
    for flag in flags:
        assert flag in text, flag
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    undocumented = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
    assert not undocumented


def test_spec_parsing_and_option_precedence():
    spec = parse_optimizer_spec("kfac:solver=cholesky,damping=0.5,pi-damping=true,kl_clip=none,bits=8")
    assert spec.options == {"solver": "cholesky", "damping": 0.5, "pi_damping": True, "kl_clip": None}
    assert spec.solver_options == {"bits": 8}
    options = resolve_options(parse_optimizer_spec("kfac:damping=0.5"), {"damping": 2.0, "lr": 0.2})
    assert options["damping"] == 0.5 and options["lr"] == 0.2  # spec beats flag beats default
    assert resolve_options(parse_optimizer_spec("kfac:base=adam"))["lr"] == 1e-3
    assert resolve_options(parse_optimizer_spec("adam"), {"damping": 1.0})["lr"] == 1e-3
    assert "damping" not in resolve_options(parse_optimizer_spec("adam"), {"damping": 1.0})
    assert set(OPTIONS) >= {"lr", "damping", "factor_decay", "factor_update_every",
                            "inverse_update_every", "fisher_type", "kl_clip", "solver", "base"}
    with pytest.raises(ValueError, match="given twice"):
        parse_optimizer_spec("sgd:lr=1,lr=2")


def test_diverging_run_is_flagged_and_json_stays_standard(tmp_path):
    results = train("digits", "mlp", "sgd:lr=1e6", steps=30, out=tmp_path)
    (run,) = results["runs"]
    assert run["diverged"] and run["steps"] < 30
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)


def test_library_functions_accept_loaded_datasets():
    from thermo_kfac.data import load_dataset

    data = load_dataset("digits", max_train=200)
    results = compare(data, "cnn", ["sgd", "kfac"], steps=4, batch_size=50)
    assert [r["steps"] for r in results["runs"]] == [4, 4]
    assert results["config"]["dataset"]["n_train"] == 200
    assert torch.get_num_threads() >= 1


def test_solver_map_end_to_end_writes_assignment_and_predicted_times(tmp_path, capsys):
    out = tmp_path / "policy"
    assert _main("compare", "--optimizers", "adam", "kfac",
                 "kfac:solver_map=^1$=thermo:integrator=analytic", "--steps", "6", "--eval-every", "3",
                 "--solver-map", "^5$=thermo:integrator=analytic;Linear=eigh", "--hardware", "chip",
                 "--digital", "a100", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "solver per layer" in printed and "rule '^5$'" in printed
    assert "hw digital/step" in printed and "hw hybrid/step" in printed
    runs = json.loads((out / "results.json").read_text())["runs"]
    adam, flag_map, spec_map = runs
    assert "predicted_digital_s" not in adam and "assignment" not in adam
    # the flag sets the map of every kfac run; a spec's own solver_map wins
    assert flag_map["assignment"] == {"1": "eigh", "3": "eigh", "5": "thermo"}
    assert spec_map["assignment"] == {"1": "thermo", "3": "eigh", "5": "eigh"}
    for run in (flag_map, spec_map):
        assert run["solver_policy"]["digital"] == "a100" and run["solver_policy"]["hardware"] == "chip"
        assert run["fallbacks"] == {"1": 0, "3": 0, "5": 0}
        history = run["history"]
        assert all({"predicted_digital_s", "predicted_hybrid_s", "fallbacks", "wall_time_s"} <= set(h)
                   for h in history)
        assert run["predicted_digital_s"] == pytest.approx(
            sum(h["predicted_digital_s"] for h in history) / len(history))
        assert run["predicted_hybrid_s"] == pytest.approx(
            sum(h["predicted_hybrid_s"] for h in history) / len(history))
        assert run["predicted_hybrid_s"] != pytest.approx(run["predicted_digital_s"])
    # the all-digital machine is the same for both runs (same layers, same presets)
    assert flag_map["predicted_digital_s"] == pytest.approx(spec_map["predicted_digital_s"])
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["run"] == "kfac"]
    assert len(rows) == 6 and float(rows[0]["predicted_hybrid_s"]) > 0 and rows[0]["fallbacks"] == "0"


def test_bad_solver_map_and_preset_stop_before_training(capsys):
    assert _main("train", "--solver-map", "fc1", "--steps", "2") == 2
    assert "pattern=spec" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _main("train", "--hardware", "chipp", "--steps", "2")
    assert "chipp" in capsys.readouterr().err
    assert _main("train", "--solver", "thermoo", "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "thermoo" in err and "auto" in err


def test_curvature_spec_key_reaches_the_preconditioner_and_refuses_a_solver_map():
    from thermo_kfac.experiments.training import build_optimizer, parse_optimizer_spec, resolve_options
    from thermo_kfac.solvers.kronecker_svd import KroneckerSVDSolver

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    spec = parse_optimizer_spec("kfac:curvature=deflation")
    _, precond = build_optimizer(spec, model, resolve_options(spec), "cross_entropy")
    assert precond.curvature == "deflation"
    assert all(isinstance(precond.layer_table[n].solver, KroneckerSVDSolver) for n in precond.layers)
    spec = parse_optimizer_spec("kfac:curvature=kpsvd,solver_map=0=eigh")
    with pytest.raises(ValueError, match="solver_map cannot be combined with curvature='kpsvd'"):
        build_optimizer(spec, model, resolve_options(spec), "cross_entropy")
    with pytest.raises(ValueError, match="curvature"):
        parse_optimizer_spec("kfac:curvature=shampoo")


def test_writing_plots_leaves_the_matplotlib_backend_and_pyplot_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a non-Agg backend, as a notebook's inline one would be
    try:
        figures = plt.get_fignums()
        assert _main("train", "--optimizer", "adam", "--steps", "3", "--out", str(tmp_path / "r")) == 0
        assert (tmp_path / "r" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figures
    finally:
        matplotlib.use(before)


def test_kfac_option_choices_are_the_library_constants():
    from thermo_kfac.capture import KFAC_APPROXIMATIONS
    from thermo_kfac.fisher import FISHER_TYPES
    from thermo_kfac.preconditioner import FACTOR_DTYPES
    from thermo_kfac.solvers.kronecker_svd import CURVATURES

    assert OPTIONS["fisher_type"].choices == FISHER_TYPES
    assert OPTIONS["kfac_approx"].choices == KFAC_APPROXIMATIONS
    assert OPTIONS["curvature"].choices == CURVATURES
    assert set(training.FACTOR_DTYPES.values()) == set(FACTOR_DTYPES)
    assert training.FACTOR_DTYPES["float64"] is torch.float64


@pytest.mark.slow  # two fresh interpreters import torch: ~10 s on a quiet machine, a minute under load
def test_train_nproc_passes_the_placement_to_the_preconditioner(tmp_path):
    """``--placement mem_opt`` (not the default comm_opt) reaches every rank's preconditioner:
    owners then broadcast preconditioned gradients, never solver states."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-m", "thermo_kfac.cli", "train", "--widths", "16", "--steps", "2",
                           "--batch-size", "64", "--no-progress", "--threads", "1", "--optimizer",
                           "kfac:inverse_update_every=1,factor_update_every=1", "--placement", "mem_opt",
                           "--nproc", "2", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sent = json.loads((tmp_path / "results.json").read_text())["runs"][0]["distributed"]["bytes"]
    assert sent.get("preconditioned_gradients", 0) > 0 and "solver_state" not in sent
