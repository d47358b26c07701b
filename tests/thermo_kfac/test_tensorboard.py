"""``--tensorboard DIR``: the event files are read back with TensorBoard's own reader (what
``tensorboard --logdir DIR`` loads) and hold the run's scalars."""

from __future__ import annotations

import json

import pytest
import torch

from thermo_kfac import cli
from thermo_kfac.experiments.training import compare
from thermo_kfac.experiments.training.tensorboard import run_directory

pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

THERMO = "kfac:solver=thermo,track_exact=true,inverse_update_every=3,factor_update_every=1"


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tb")
    results = compare("digits", "mlp", ["adam", THERMO], steps=6, eval_every=3, batch_size=64,
                      model_options={"widths": (16,)}, tensorboard=root,
                      out=root.parent / (root.name + "-out"))
    return root, {r["label"]: r for r in results["runs"]}


def test_each_run_has_its_own_folder_with_the_step_scalars(logged):
    root, runs = logged
    assert sorted(p.name for p in root.iterdir()) == sorted(run_directory(root, label).name for label in runs)
    for label, run in runs.items():
        scalars = _scalars(run_directory(root, label))
        history = run["history"]
        for tag, key in (("loss/train_batch", "train_loss"), ("accuracy/train_batch", "train_accuracy")):
            assert [s for s, _ in scalars[tag]] == [h["step"] for h in history]
            assert [v for _, v in scalars[tag]] == pytest.approx([h[key] for h in history], rel=1e-6)
        evaluated = [h for h in history if "eval_train_loss" in h]
        for tag, key in (("loss/train", "eval_train_loss"), ("loss/test", "test_loss"),
                         ("accuracy/test", "test_accuracy")):
            assert scalars[tag] == [(h["step"], pytest.approx(h[key], rel=1e-6)) for h in evaluated]
        assert [v for _, v in scalars["time/step_ms"]] == pytest.approx(
            [1e3 * h["step_time_s"] for h in history], rel=1e-6)
    assert not any(tag.startswith(("hardware/", "kfac/", "kappa/")) for tag in _scalars(
        run_directory(root, "adam")))


def test_kfac_run_logs_predicted_times_fallbacks_and_per_layer_values(logged):
    root, runs = logged
    run = runs[THERMO]
    scalars = _scalars(run_directory(root, THERMO))
    trace = json.loads((root.parent / (root.name + "-out") / "trace.json").read_text())
    for tag, key in (("hardware/predicted_digital_s", "predicted_digital_s"),
                     ("hardware/predicted_hybrid_s", "predicted_hybrid_s"), ("kfac/fallbacks", "fallbacks")):
        assert [v for _, v in scalars[tag]] == pytest.approx([h[key] for h in run["history"]], rel=1e-6)
    steps = [h["step"] for h in run["history"]]
    for layer in run["layers"]:
        for factor in ("A", "G"):
            for quantity in ("kappa", "window_tau", "bits_lost_to_ranging"):
                series = scalars[f"{quantity}/{layer}/{factor}"]
                assert [s for s, _ in series] == steps, (quantity, layer, factor)
            assert all(v >= 1.0 for _, v in scalars[f"kappa/{layer}/{factor}"])
            assert all(v >= 0.0 for _, v in scalars[f"bits_lost_to_ranging/{layer}/{factor}"])
            # the solves' windows, as the run's trace.json records them
            windows = {s["analog_time"] for u in trace["updates"] if u["layer"] == layer
                       for s in u["solves"] if s["factor"] == factor}
            # (TensorBoard stores float32; analog_time="auto" windows are not round numbers)
            stored = {float(torch.tensor(w, dtype=torch.float32)) for w in windows}
            assert windows and {v for _, v in scalars[f"window_tau/{layer}/{factor}"]} == stored
        for quantity in ("error_predicted", "error_measured", "residual_measured"):
            values = [v for _, v in scalars[f"{quantity}/{layer}"]]
            assert len(values) == len(steps) and all(0 < v < 1 for v in values), (quantity, layer)


def test_cli_flag_and_missing_extra(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    assert "--tensorboard DIR" in capsys.readouterr().out
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert cli.main(["train", "--optimizer", "adam", "--steps", "2", "--tensorboard", str(tmp_path)]) == 2
    assert "pip install 'thermo-kfac[tensorboard]'" in capsys.readouterr().err
