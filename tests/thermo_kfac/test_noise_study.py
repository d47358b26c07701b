"""`thermo-kfac noise-study`: resume after a kill, grids, references, config checks, file formats."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import statistics

import pytest
import torch

from thermo_kfac import cli
from thermo_kfac.experiments import noise_study as ns
from thermo_kfac.experiments.noise_study import outputs as ns_outputs
from thermo_kfac.experiments.training import train
from thermo_kfac.solvers.thermodynamic import ThermodynamicSolver

# A tiny task: digits, a 16-unit MLP, a few steps; thermo solver in analytic mode (fast).
TASK = dict(model_options={"widths": (16,)}, steps=6, eval_every=3, plots=False,
            optimizer="kfac:solver=thermo,integrator=analytic,analog_time=100,factor_update_every=2,"
                      "inverse_update_every=2")
VOLATILE = {"wall_time_s", "ms_per_step"}  # measured, so they differ between identical runs


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is faster and does not spin on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Killed(Exception):
    pass


def _csv_rows(path, drop=VOLATILE):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _study(out, **kwargs):
    return ns.noise_study("digits", "mlp", **{**TASK, "out": out, **kwargs})


def _kill_after(k):
    seen = []

    def hook(row):
        seen.append(row["key"])
        if len(seen) == k:
            raise _Killed

    return hook


def test_killed_and_resumed_study_equals_an_uninterrupted_one(tmp_path):
    sweeps = {"bits": [6, 8]}
    full = _study(tmp_path / "full", sweeps=sweeps, seeds=2)
    assert len(full["rows"]) == 8  # 2 references x 2 seeds + 2 points x 2 seeds

    with pytest.raises(_Killed):
        _study(tmp_path / "resumed", sweeps=sweeps, seeds=2, on_row=_kill_after(3))
    assert len(_csv_rows(tmp_path / "resumed" / "results.csv")) == 3  # finished rows are on disk
    assert len(json.loads((tmp_path / "resumed" / "study.json").read_text())["rows"]) == 3

    trained = []
    _study(tmp_path / "resumed", sweeps=sweeps, seeds=2, on_row=lambda r: trained.append(r["key"]))
    assert len(trained) == 5  # only the missing rows ran
    expected = _csv_rows(tmp_path / "full" / "results.csv")
    assert _csv_rows(tmp_path / "resumed" / "results.csv") == expected

    # A third run trains nothing and duplicates nothing.
    again = []
    _study(tmp_path / "resumed", sweeps=sweeps, seeds=2, on_row=lambda r: again.append(r))
    assert again == []
    rows = _csv_rows(tmp_path / "resumed" / "results.csv")
    assert rows == expected and len({r["key"] for r in rows}) == len(rows)


def test_kill_between_json_and_csv_write_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    out = tmp_path / "study"
    real = ns_outputs.atomic_write
    writes = {"csv": 0}

    def flaky(path, content, **kwargs):
        if path.name == "results.csv":
            writes["csv"] += 1
            if writes["csv"] == 2:  # second row: study.json is written, the CSV write dies
                raise _Killed
        return real(path, content, **kwargs)

    monkeypatch.setattr(ns_outputs, "atomic_write", flaky)
    kwargs = dict(sweeps={"bits": [8]}, seeds=2, references=["adam"])
    with pytest.raises(_Killed):
        _study(out, **kwargs)
    assert len(json.loads((out / "study.json").read_text())["rows"]) == 2
    assert len(_csv_rows(out / "results.csv")) == 1
    monkeypatch.setattr(ns_outputs, "atomic_write", real)
    trained = []
    _study(out, **kwargs, on_row=lambda r: trained.append(r))
    assert len(trained) == 2  # the 2 rows not yet in study.json
    rows = _csv_rows(out / "results.csv")
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("adam", "0"), ("adam", "1"), ("thermo", "0"), ("thermo", "1")]


def test_study_with_a_different_config_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "study"
    _study(out, sweeps={"bits": [8]}, seeds=1, references=["adam"])
    with pytest.raises(ValueError, match=r"different config \(steps \(--steps/--epochs\): 6 there, 7 now\)"):
        _study(out, sweeps={"bits": [8]}, seeds=1, references=["adam"], steps=7)
    with pytest.raises(ValueError, match="different config.*sweep_keys"):
        _study(out, sweeps={"kappa0": [0.01]}, seeds=1, references=["adam"])
    study = _study(out, sweeps={"bits": [8]}, seeds=1, references=["adam"], steps=7, overwrite=True)
    assert [r["steps"] for r in study["rows"]] == [7, 7]
    assert all(r["steps"] == "7" for r in _csv_rows(out / "results.csv"))
    # Growing the grid (more values or seeds) keeps the finished rows.
    trained = []
    _study(out, sweeps={"bits": [8, 6]}, seeds=1, references=["adam"], steps=7,
           on_row=lambda r: trained.append(r["label"]))
    assert trained == ["thermo bits=6"]
    # A smaller grid later trains nothing and still reports every row in the folder.
    study = _study(out, sweeps={"bits": [8]}, seeds=1, references=["adam"], steps=7,
                   on_row=lambda r: trained.append(r["label"]))
    assert trained == ["thermo bits=6"] and len(study["rows"]) == 3
    assert study["grid"]["sweeps"] == {"bits": [8, 6]}
    assert sorted(e["label"] for e in study["summary"]) == ["adam", "thermo bits=6", "thermo bits=8"]


def test_unknown_sweep_key_is_refused_with_the_valid_names(capsys):
    with pytest.raises(ValueError, match=r"unknown sweep key 'bitz'; valid: .*coupling_bits.*kappa0"):
        ns.noise_study("digits", "mlp", ["bitz=4,8"], **{k: v for k, v in TASK.items()})
    valid = ns.sweep_keys()
    for name in ("bits", "input_bits", "output_bits", "coupling_bits", "kappa0", "analog_time",
                 "mismatch_std", "integrator", "read_noise"):
        assert name in valid
    assert cli.main(["noise-study", "--sweep", "bitz=4", "--steps", "2", "--no-progress"]) == 2
    assert "unknown sweep key 'bitz'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be a kfac spec with solver=thermo"):
        ns.noise_study("digits", "mlp", ["bits=8"], optimizer="kfac", steps=2)
    with pytest.raises(ValueError, match="both swept and fixed"):
        ns.noise_study("digits", "mlp", ["bits=8"], optimizer="kfac:solver=thermo,bits=4", steps=2)


def test_sweep_keys_are_the_options_the_solver_declares():
    # the study reads declared metadata (ThermodynamicSolver.option_names); the test checks the
    # declaration against what the constructor takes: its named parameters and the noise fields
    import dataclasses
    import inspect

    from hw_models.noise import NoiseConfig

    named = [p.name for p in inspect.signature(ThermodynamicSolver.__init__).parameters.values()
             if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    noise = [f.name for f in dataclasses.fields(NoiseConfig)]
    declared = ThermodynamicSolver.option_names
    assert len(set(declared)) == len(declared)
    assert set(declared) == set(named) | set(noise)
    assert ns.sweep_keys() == sorted(declared)
    for key in noise:  # every declared noise key is accepted by the constructor
        assert getattr(ThermodynamicSolver(**{key: getattr(NoiseConfig(), key)}).noise, key) == \
            getattr(NoiseConfig(), key)


def test_two_sweeps_give_the_cartesian_product_and_reach_the_solver(tmp_path, monkeypatch):
    seen = []
    real_init = ThermodynamicSolver.__init__

    @functools.wraps(real_init)
    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append((self.noise.coupling_bits, self.config.kappa0))

    monkeypatch.setattr(ThermodynamicSolver, "__init__", spy)
    study = _study(tmp_path / "grid", sweeps={"bits": [6, 8], "kappa0": [1e-3, 1e-2]}, seeds=1,
                   references=[], steps=2)
    points = [(r["bits"], r["kappa0"]) for r in study["rows"]]
    assert sorted(points) == sorted(itertools.product([6, 8], [1e-3, 1e-2]))
    assert set(points) <= set(seen)  # each point's values were given to the solver
    rows = _csv_rows(tmp_path / "grid" / "results.csv")
    assert {(int(r["bits"]), float(r["kappa0"])) for r in rows} == set(points)


def test_references_match_the_training_library_and_files_parse(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["noise-study", "--dataset", "digits", "--model", "mlp", "--widths", "16",
            "--sweep", "bits=8", "--steps", "6", "--seeds", "2", "--eval-every", "3", "--threads", "1",
            "--optimizer", TASK["optimizer"], "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "adam" in printed and "kfac" in printed and "thermo bits=8" in printed
    assert {p.name for p in out.iterdir()} == {"results.csv", "study.json", "loss_vs_bits.png",
                                                "curves.png"}
    for png in ("loss_vs_bits.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study = json.loads((out / "study.json").read_text())
    rows = _csv_rows(out / "results.csv", drop=set())
    assert len(rows) == len(study["rows"]) == 6
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ("adam", "kfac", "thermo")
                                                         for s in ("0", "1")}
    assert all(r["steps"] == "6" for r in rows)
    # The references are ordinary training-library runs: same numbers as `train` with that seed.
    for row in (r for r in rows if r["method"] != "thermo"):
        direct = train("digits", "mlp", row["method"], steps=6, seed=int(row["seed"]), eval_every=3,
                       model_options={"widths": (16,)})["runs"][0]
        assert float(row["final_train_loss"]) == pytest.approx(direct["final_train_loss"], rel=1e-12)
        assert float(row["test_accuracy"]) == pytest.approx(direct["test_accuracy"], rel=1e-12)
    # The thermo rows carry a predicted hardware time; the summary is the mean/std over seeds.
    assert all(float(r["predicted_hardware_s"]) > 0 for r in rows if r["method"] == "thermo")
    for entry in study["summary"]:
        losses = [float(r["final_train_loss"]) for r in rows if r["label"] == entry["label"]]
        assert entry["final_train_loss"]["mean"] == pytest.approx(statistics.mean(losses))
        assert entry["final_train_loss"]["std"] == pytest.approx(statistics.stdev(losses))
    assert study["config"]["steps"] == 6 and study["grid"]["seeds"] == [0, 1]
    # The same command again: everything is skipped, the table is printed from the files.
    assert cli.main(argv) == 0
    assert len(_csv_rows(out / "results.csv")) == 6


def test_a_failing_point_is_recorded_and_the_study_continues(tmp_path, monkeypatch):
    # A failing prepare is served by the fallback solver; a failing apply ends the run.
    real_apply = ThermodynamicSolver.apply

    def apply(self, grad):
        if self.noise.coupling_bits == 6:
            raise RuntimeError("the programmed matrix is not positive definite (injected)")
        return real_apply(self, grad)

    monkeypatch.setattr(ThermodynamicSolver, "apply", apply)
    study = _study(tmp_path / "fail", sweeps={"bits": [6, 8]}, seeds=1, references=["adam"],
                   plots=True)
    by_label = {r["label"]: r for r in study["rows"]}
    assert "not positive definite (injected)" in by_label["thermo bits=6"]["error"]
    assert by_label["thermo bits=6"]["final_train_loss"] is None
    assert by_label["thermo bits=8"]["error"] is None
    assert by_label["thermo bits=8"]["final_train_loss"] > 0
    assert "1 failed" in ns.format_table(study)
