"""The ``kfac-adaptive`` optimizer spec in compare / train / noise-study."""

from __future__ import annotations

import pytest
import torch

from thermo_kfac import KFAC
from thermo_kfac.experiments import noise_study as ns
from thermo_kfac.experiments.training import build_optimizer, compare, parse_optimizer_spec, resolve_options
from thermo_kfac.experiments.training.options import parse_adaptive_options as parse_options


def test_parse_options_splits_kfac_and_solver_keys() -> None:
    options = parse_options("lr=auto,momentum=0.5,damping=0.3,solver=sre,rank=16,factor-dtype=float64")
    assert options == {"lr": None, "momentum": 0.5, "damping": 0.3, "solver": "sre",
                       "factor_dtype": torch.float64, "solver_options": {"rank": 16}}
    with pytest.raises(ValueError, match="twice"):
        parse_options("damping=1,damping=2")
    with pytest.raises(ValueError, match="factor_dtype"):
        parse_options("factor_dtype=float16")


def test_spec_builds_the_adaptive_optimizer() -> None:
    spec = parse_optimizer_spec("kfac-adaptive:damping=0.5,lr=0.1,solver=sre,rank=4")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt, precond = build_optimizer(spec, model, resolve_options(spec), "cross_entropy", seed=3)
    assert isinstance(opt, KFAC) and precond is opt.preconditioner
    assert opt.damping == 0.5 and opt.lr == 0.1 and opt.momentum is None
    assert precond.assignment() == {"0": "sre", "2": "sre"} and precond.seed == 3
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(parse_optimizer_spec("kfac-adaptive:momentum=2"), model,
                        resolve_options(parse_optimizer_spec("kfac-adaptive:momentum=2")), "mse")


def test_compare_runs_kfac_adaptive_beside_adam() -> None:
    results = compare("synthetic-regression", "mlp", ["adam", "kfac-adaptive"], steps=12,
                      batch_size=100, dataset_options={"n_train": 200, "n_test": 50})
    adam, kfac = results["runs"]
    assert kfac["optimizer"] == "kfac-adaptive" and kfac["steps"] == 12
    assert kfac["final_train_loss"] < kfac["initial_train_loss"]
    assert kfac["layers"] and kfac["assignment"]
    with pytest.raises(ValueError, match="kfac-adaptive"):
        compare("synthetic-regression", "mlp", ["kfac-adaptive:max_damping=-1"], steps=2,
                dataset_options={"n_train": 50, "n_test": 10})


def test_noise_study_sweeps_kfac_adaptive_with_the_thermo_solver(tmp_path) -> None:
    study = ns.noise_study("digits", "mlp", {"bits": [8]},
                           optimizer="kfac-adaptive:solver=thermo,integrator=analytic,analog_time=100",
                           references=["kfac-adaptive"], seeds=1, steps=3, eval_every=3,
                           model_options={"widths": (16,)}, out=tmp_path, plots=False)
    rows = study["rows"]
    assert {row["method"] for row in rows} == {"kfac-adaptive", ns.STUDY_METHOD}
    assert all(row["steps"] == 3 and not row["diverged"] for row in rows)
