"""``thermo-kfac project`` / ``calibrate``: JSON contract, sweeps, plots, meta-device models, errors."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hw_models.workloads import workload
from thermo_kfac.experiments import hardware
from thermo_kfac.experiments.hardware import main, resolve_workload, workload_from_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_convnet() -> nn.Module:
    """Factory used through ``--model tests.thermo_kfac.test_hardware_cli:tiny_convnet``."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.Flatten(), nn.Linear(16 * 15 * 15, 10))


class SharedLinear(nn.Module):
    """One Linear applied twice per example (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.proj(x))


@pytest.fixture(autouse=True)
def _no_user_calibration(tmp_path, monkeypatch):
    monkeypatch.delenv("THERMO_KFAC_CALIBRATION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def check_project_document(doc: dict, model: str, n_layers: int) -> None:
    assert doc["model"] == model and doc["hardware"] == "chip"
    assert len(doc["layers"]) == n_layers
    for layer in doc["layers"]:
        assert {"name", "n_in", "n_out", "digital_s", "thermo_s", "cheaper"} <= set(layer)
        assert isinstance(layer["n_in"], int) and layer["n_in"] > 0 and layer["n_out"] > 0
        assert 0 < layer["digital_s"] < 60
        assert layer["thermo_s"] is None or layer["thermo_s"] > 0
        assert layer["cheaper"] in ("digital", "thermo")
        if layer["thermo_s"] is not None:
            assert layer["cheaper"] == ("thermo" if layer["thermo_s"] < layer["digital_s"] else "digital")
    step = doc["step"]
    assert {"adam_s", "digital_kfac_s", "thermo_kfac_s", "speedup_vs_digital_kfac"} <= set(step)
    assert 0 < step["adam_s"] < step["digital_kfac_s"]
    assert step["thermo_kfac_s"] <= step["digital_kfac_s"] * (1 + 1e-12)
    assert step["speedup_vs_digital_kfac"] == pytest.approx(step["digital_kfac_s"] / step["thermo_kfac_s"])
    assert step["speedup_vs_digital_kfac"] >= 1.0 - 1e-12
    # the K-FAC extra is the sum of the per-layer digital times
    extra = sum(layer["digital_s"] for layer in doc["layers"])
    assert step["digital_kfac_s"] == pytest.approx(step["adam_s"] + extra)


def test_project_vit_b16_json(tmp_path, capsys):
    out_json, out_csv, out_png = tmp_path / "vit.json", tmp_path / "vit.csv", tmp_path / "vit.png"
    code, out, _ = run(["project", "--model", "vit-b16", "--json", str(out_json), "--csv", str(out_csv),
                        "--plot", str(out_png)], capsys)
    assert code == 0
    assert "blocks.*.mlp.fc1" in out and "x12" in out and "speed-up vs digital K-FAC" in out
    doc = json.loads(out_json.read_text())
    check_project_document(doc, "vit-b16", 50)
    fc2 = next(layer for layer in doc["layers"] if layer["name"] == "blocks.0.mlp.fc2")
    assert (fc2["n_in"], fc2["n_out"], fc2["factor_sizes"]) == (3072, 768, [3073, 768])
    # a ViT-B/16 step at batch 1024 on an H100 takes on the order of a second in fp32
    assert 0.3 < doc["step"]["adam_s"] < 30
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 50 and rows[0]["name"] == "patch_embed"
    assert out_png.read_bytes()[:8] == PNG_MAGIC


def test_project_gnn_molpcba_json(tmp_path, capsys):
    out_json = tmp_path / "gnn.json"
    code, out, _ = run(["project", "--model", "gnn-molpcba", "--json", str(out_json)], capsys)
    assert code == 0 and "break-even kappa" in out
    doc = json.loads(out_json.read_text())
    check_project_document(doc, "gnn-molpcba", 18)
    assert doc["batch"] == 512
    assert doc["assumptions"]["kappa"] == 100.0 and doc["assumptions"]["eps"] == 0.1


def test_small_kappa_moves_layers_to_the_analog_device(tmp_path, capsys):
    out_json = tmp_path / "ae.json"
    code, _, _ = run(["project", "--model", "mnist-ae", "--kappa", "1.5", "--eps", "0.3", "--digital", "a100",
                      "--json", str(out_json)], capsys)
    assert code == 0
    doc = json.loads(out_json.read_text())
    assert doc["digital"] == "a100"
    assert doc["step"]["layers_on_thermo"] > 0
    assert doc["step"]["speedup_vs_digital_kfac"] > 1.0


def test_board_refuses_every_realistic_layer(tmp_path, capsys):
    out_json = tmp_path / "board.json"
    args = ["project", "--model", "vit-b16", "--hardware", "board", "--json", str(out_json)]
    code, out, _ = run(args, capsys)
    assert code == 0 and "too big" in out
    doc = json.loads(out_json.read_text())
    assert doc["hardware"] == "board"
    assert all(layer["thermo_s"] is None and layer["cheaper"] == "digital" for layer in doc["layers"])
    assert doc["step"]["speedup_vs_digital_kfac"] == pytest.approx(1.0)


@pytest.mark.parametrize("axis, values", [("width", "64,512,4096,8192"), ("kappa", "1,10,100"),
                                          ("bits", "4,8,16"), ("bandwidth", "1,100")])
def test_sweeps_write_the_contract(axis, values, tmp_path, capsys):
    out_json, out_png, out_csv = tmp_path / "s.json", tmp_path / "s.png", tmp_path / "s.csv"
    code, out, _ = run(["project", "--model", "mnist-ae", "--sweep", axis, "--values", values,
                        "--json", str(out_json), "--plot", str(out_png), "--csv", str(out_csv)], capsys)
    assert code == 0 and "Sweep of" in out
    doc = json.loads(out_json.read_text())
    assert doc["sweep"] == axis
    xs = [float(v) for v in values.split(",")]
    assert [p["x"] for p in doc["points"]] == xs
    for p in doc["points"]:
        assert {"x", "digital_s", "thermo_s", "speedup"} <= set(p)
        assert p["digital_s"] > 0
        if p["thermo_s"] is not None:
            assert p["speedup"] == pytest.approx(p["digital_s"] / p["thermo_s"])
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert len(list(csv.DictReader(out_csv.open()))) == len(xs)
    if axis == "width":  # 8192 > the chip's 4096 cells
        assert doc["points"][-1]["thermo_s"] is None and doc["points"][-1]["speedup"] is None


def test_default_sweep_values(tmp_path, capsys):
    args = ["project", "--model", "mnist-ae", "--sweep", "kappa", "--json", str(tmp_path / "k.json")]
    code, _, _ = run(args, capsys)
    assert code == 0
    assert len(json.loads((tmp_path / "k.json").read_text())["points"]) >= 5


@pytest.mark.parametrize("args, text", [
    (["--hardware", "quantum"], "'board', 'tngd', 'chip'"),
    (["--digital", "tpu"], "'cpu', 'cuda', 'a100', 'h100'"),
    (["--model", "alexnet"], "vit-b16"),
    (["--sweep", "bandwidth", "--values", "50,4e11"], "for bit/s write the unit"),
    (["--batch", "-4"], "batch=-4"),
    (["--cells", "-1"], "cells=-1"),
    (["--kappa", "0.5"], "kappa=0.5"),
    (["--eps", "2"], "eps=2.0"),
    (["--inverse-every", "0"], "inverse_every=0"),
    (["--model", "no_such_module_xyz:make"], "cannot import module"),
    (["--model", "vit-b16", "--input-shape", "3,224,224"], "--input-shape only applies"),
])
def test_bad_inputs_give_clear_errors(args, text, capsys):
    code, _, err = run(["project", *args], capsys)
    assert code == 2
    assert "error:" in err and text in err


def test_help_documents_every_option(capsys):
    parser = argparse.ArgumentParser(prog="thermo-kfac")
    hardware.register(parser.add_subparsers(dest="command"))
    for command in ("project", "calibrate"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text
            assert action.help, f"{command} {action.option_strings} has no help"


def test_calibrate_command_round_trip(tmp_path, capsys):
    out = tmp_path / "cal.json"
    code, text, _ = run(["calibrate", "--sizes", "257,385,577", "--holdout", "321", "--repeats", "3",
                         "--threads", "1", "--ops", "gemm,cholesky", "--out", str(out)], capsys)
    assert code == 0 and "held-out" in text and str(out) in text
    data = json.loads(out.read_text())
    assert data["settings"]["fit_sizes"] == [257, 385, 577]
    # the saved calibration drives the measured host preset
    proj = tmp_path / "p.json"
    code, _, _ = run(["project", "--model", "mnist-ae", "--digital", "cpu", "--calibration", str(out),
                      "--json", str(proj)], capsys)
    assert code == 0
    assert json.loads(proj.read_text())["digital"] == "cpu"


def test_calibrate_rejects_overlapping_sizes(capsys):
    code, _, err = run(["calibrate", "--sizes", "257,385,577", "--holdout", "385", "--no-save"], capsys)
    assert code == 2 and "also fit sizes" in err


# ------------------------------------------------------------------ torch models on the meta device


def test_meta_device_mlp_matches_the_table():
    widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    with torch.device("meta"):
        layers = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.Sigmoid()]
        model = nn.Sequential(*layers)
    read = workload_from_module(model, name="ae", batch=1000, input_shape=[784])
    table = workload("mnist-ae")
    assert [(l.d_in, l.d_out, l.bias, l.positions) for l in read.layers] == \
        [(l.d_in, l.d_out, l.bias, l.positions) for l in table.layers]
    assert next(model.parameters()).is_meta  # no weights were materialized


def test_meta_device_counts_positions():
    with torch.device("meta"):
        model = tiny_convnet()
    read = workload_from_module(model, name="conv", batch=4, input_shape=[3, 32, 32])
    conv1, conv2, fc = read.layers
    assert (conv1.kind, conv1.d_in, conv1.d_out, conv1.positions) == ("conv2d", 27, 8, 32 * 32)
    assert (conv2.d_in, conv2.d_out, conv2.positions) == (72, 16, 15 * 15)
    assert (fc.kind, fc.d_in, fc.positions) == ("linear", 3600, 1)
    with torch.device("meta"):
        shared = SharedLinear()
    read = workload_from_module(shared, name="shared", batch=2, input_shape=[5, 6])
    assert read.layers[0].positions == 2 * 5  # two calls on 5 tokens each


def test_module_factory_spec_and_errors(capsys, tmp_path):
    spec = "tests.thermo_kfac.test_hardware_cli:tiny_convnet"
    work = resolve_workload(spec, batch=8, input_shape=[3, 32, 32])
    assert work.batch == 8 and len(work.layers) == 3
    with pytest.raises(ValueError, match="--input-shape"):
        resolve_workload(spec)  # convolutions need an input shape
    with pytest.raises(ValueError, match="failed"):
        resolve_workload(spec, input_shape=[3, 5])
    with pytest.raises(ValueError, match="no attribute"):
        resolve_workload("tests.thermo_kfac.test_hardware_cli:missing")
    out = tmp_path / "m.json"
    code, _, _ = run(["project", "--model", spec, "--input-shape", "3,32,32", "--batch", "16",
                      "--json", str(out)], capsys)
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == spec and [l["n_in"] for l in doc["layers"]] == [27, 72, 3600]


def test_full_cli_registers_the_commands(tmp_path, capsys):
    from thermo_kfac import cli

    # Every command module must import and register: a broken one fails here, it is not skipped.
    for command in ("train", "compare", "calibrate", "project", "placement", "fisher-error",
                    "noise-study", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0, command  # argparse exits 2 on an unknown command
    capsys.readouterr()
    out = tmp_path / "g.json"
    assert cli.main(["project", "--model", "gnn-molpcba", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["model"] == "gnn-molpcba"
    assert cli.main(["project", "--hardware", "nope"]) == 2
    assert "'chip'" in capsys.readouterr().err


TRACE = Path(__file__).resolve().parents[1] / "hw_models" / "data" / "trace_small.json"


def test_project_trace_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    code, text, _ = run(["project", "--trace", str(TRACE), "--hardware", "chip", "--digital", "a100",
                         "--json", str(out)], capsys)
    assert code == 0 and "too big" in text
    doc = json.loads(out.read_text())
    rows = {r["name"]: r for r in doc["layers"]}
    assert rows["fc2"]["thermo_s"] is None and rows["fc1"]["thermo_s"] > 0
    assert {"kappa_measured", "digital_s", "thermo_s"} <= set(rows["fc1"])
    assert doc["digital"] == "a100" and doc["step"]["layers_too_big"] == 1


def test_project_paper_scenario_states_the_verdict(tmp_path, capsys):
    out = tmp_path / "paper.json"
    code, text, _ = run(["project", "--model", "mnist-ae", "--scenario", "paper", "--json", str(out)], capsys)
    assert code == 0
    assert "Verdict for mnist-ae" in text and ("REPRODUCED" in text or "NOT reproduced" in text)
    assert "deciding assumption" in text and "What must hold" in text
    doc = json.loads(out.read_text())
    assert set(doc["scenarios"]) == {"default", "paper"} and doc["requirements"]["paper"]


def test_project_map_and_fixed_analog_time(tmp_path, capsys):
    csv_path, png = tmp_path / "m.csv", tmp_path / "m.png"
    code, _, _ = run(["project", "--map", "kappa-eps", "--batch", "64", "--csv", str(csv_path),
                      "--plot", str(png)], capsys)
    assert code == 0 and png.stat().st_size > 0
    assert len(csv_path.read_text().splitlines()) == 5  # header + 4 eps rows
    out = tmp_path / "fixed.json"
    code, text, _ = run(["project", "--model", "mnist-ae", "--analog-time", "20", "--overlap",
                         "--method", "solve", "--json", str(out)], capsys)
    assert code == 0 and "optimizer update only" in text
    doc = json.loads(out.read_text())
    assert doc["assumptions"]["analog_time"] == 20.0 and doc["step"]["overlap"] is True
    assert all(layer["predicted_rel_error"] > 0 for layer in doc["layers"] if layer["thermo_s"])


def test_project_spectra_from_trace(tmp_path, capsys):
    out = tmp_path / "s.json"
    code, text, _ = run(["project", "--model", "mnist-ae", "--spectra-from", str(TRACE), "--json", str(out)],
                        capsys)
    assert code == 0 and "kappa(n) =" in text
    doc = json.loads(out.read_text())
    assert "kappa(n)" in doc["assumptions"]["kappa_of"]
    assert all(layer["kappa_measured"] for layer in doc["layers"] if layer["thermo_s"])
