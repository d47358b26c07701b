"""``thermo-kfac project`` as a user reads it: units (Gb/s), --bits in the JSON, --plot/--csv in every
mode, one default per option in --help, and the plots' labels, scales, legends and titles (checked
on the matplotlib objects)."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import matplotlib
import pytest

from hw_models.cost import Scenario, compare_layer, step_cost
from hw_models.cost.steps import SquareLayer
from hw_models.devices import digital_device, thermo_device
from hw_models.projection import speedup_map
from hw_models.workloads import workload
from thermo_kfac.cli import build_parser
from thermo_kfac.experiments._io import bandwidth_gbps
from thermo_kfac.experiments.hardware import main
from thermo_kfac.experiments.project_report import (
    DIGITAL_COLOR,
    KAPPA_EPS_MAP_WIDTH,
    THERMO_COLOR,
    map_figure,
    map_title,
    project_figure,
    sweep_figure,
)

TRACE = Path(__file__).resolve().parents[1] / "hw_models" / "data" / "trace_small.json"


@pytest.fixture(autouse=True)
def _no_user_calibration(tmp_path, monkeypatch):
    monkeypatch.delenv("THERMO_KFAC_CALIBRATION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("text, gbps", [("400", 400.0), ("400Gb/s", 400.0), ("4e11b/s", 400.0),
                                        ("4e11 bit/s", 400.0), ("2Tb/s", 2000.0), ("500Mbps", 0.5)])
def test_bandwidth_is_gbps_or_carries_its_unit(text, gbps):
    assert bandwidth_gbps(text) == pytest.approx(gbps)


@pytest.mark.parametrize("text, message", [("4e11", "for bit/s write the unit (4e11b/s = 400 Gb/s)"),
                                           ("50GB/s", "in bytes"), ("-3", "not a positive number"),
                                           ("4furlongs", "not a positive number")])
def test_bandwidth_mistakes_are_refused(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        bandwidth_gbps(text)


def test_bandwidth_sweep_values_are_gbps_like_the_option(tmp_path, capsys):
    out = tmp_path / "bw.json"
    code, text, _ = _run(["project", "--model", "mnist-ae", "--sweep", "bandwidth", "--values", "50,400Gb/s",
                          "--json", str(out)], capsys)
    assert code == 0 and "bandwidth [Gb/s]" in text
    doc = json.loads(out.read_text())
    assert doc["x_unit"] == "Gb/s" and [p["x"] for p in doc["points"]] == [50.0, 400.0]
    # each point is the step priced with --bandwidth at that value (not 50 bit/s)
    for point in doc["points"]:
        single = tmp_path / "single.json"
        assert _run(["project", "--model", "mnist-ae", "--bandwidth", f"{point['x']:g}", "--json",
                     str(single)], capsys)[0] == 0
        step = json.loads(single.read_text())
        assert step["assumptions"]["io_bandwidth_gbps"] == point["x"]
        assert point["thermo_s"] == pytest.approx(step["step"]["thermo_only_kfac_s"], rel=1e-9)
    with pytest.raises(SystemExit) as stop:  # an argparse error
        main(["project", "--model", "mnist-ae", "--bandwidth", "4e11"])
    assert stop.value.code == 2 and "for bit/s write the unit" in capsys.readouterr().err


def test_bits_means_coupling_dac_and_adc_and_the_json_shows_it(tmp_path, capsys):
    chip = thermo_device("chip")
    own = {"coupling": chip.noise.coupling_bits, "dac": chip.noise.input_bits, "adc": chip.noise.output_bits}
    for extra, expected in (([], own), (["--bits", "8"], {"coupling": 8, "dac": 8, "adc": 8})):
        out = tmp_path / "b.json"
        code, text, _ = _run(["project", "--model", "mnist-ae", *extra, "--json", str(out)], capsys)
        assert code == 0
        assert json.loads(out.read_text())["assumptions"]["converter_bits"] == expected
        shown = "/".join(str(expected[k]) for k in ("coupling", "dac", "adc"))
        assert f"coupling/DAC/ADC {shown} bits" in text
    bits = next(a for a in _project_parser()._actions if "--bits" in a.option_strings)
    assert "coupling, DAC and ADC" in bits.help


@pytest.mark.parametrize("mode", [["--scenario", "paper"], ["--trace", str(TRACE)]])
@pytest.mark.parametrize("flag", ["--plot", "--csv"])
def test_plot_and_csv_are_refused_where_a_mode_cannot_write_them(mode, flag, tmp_path, capsys):
    target = tmp_path / "out.file"
    code, _, err = _run(["project", "--model", "mnist-ae", *mode, flag, str(target)], capsys)
    assert code == 2 and f"{flag} cannot be used with {mode[0]}" in err
    assert not target.exists()


@pytest.mark.parametrize("mode", [[], ["--sweep", "kappa", "--values", "10,100"], ["--map", "kappa-eps"]])
def test_plot_and_csv_are_written_in_the_other_modes(mode, tmp_path, capsys):
    png, table = tmp_path / "p.png", tmp_path / "t.csv"
    code, text, _ = _run(["project", "--model", "mnist-ae", *mode, "--plot", str(png), "--csv", str(table)],
                         capsys)
    assert code == 0 and png.stat().st_size > 0 and table.stat().st_size > 0
    assert f"wrote plot: {png}" in text and f"wrote csv: {table}" in text


def _project_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices["project"]


@pytest.mark.parametrize("command", ["project", "calibrate", "noise-study"])
def test_help_shows_one_default_per_option(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if not action.help or action.help == argparse.SUPPRESS:
            continue
        shown = formatter._expand_help(action)  # the text --help prints for the option
        assert shown.lower().count("default") <= 1, f"{command} {action.option_strings}: {shown!r}"
        assert "(default: None)" not in shown


# ------------------------------------------------------------------------------------------ plots
def _scenario(**kw) -> Scenario:
    return Scenario(digital=digital_device("h100"), thermo=thermo_device("chip"), **kw)


def test_project_plot_labels_colours_and_title():
    scenario = _scenario(kappa=30.0, eps=0.1)
    step = step_cost(workload("mnist-ae"), scenario)
    fig = project_figure(step, scenario)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "[s]" in ax.get_xlabel() and ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["digital K-FAC (h100)", "thermodynamic K-FAC (chip)"]
    bars = ax.containers
    assert matplotlib.colors.same_color(bars[0][0].get_facecolor(), DIGITAL_COLOR)
    assert matplotlib.colors.same_color(bars[1][0].get_facecolor(), THERMO_COLOR)
    title = ax.get_title()
    for part in ("mnist-ae", f"batch {step.batch}", "h100 vs chip", "kappa 30", "eps 0.1", "Gb/s"):
        assert part in title


@pytest.mark.parametrize("axis, xs", [("kappa", [1.0, 10.0, 100.0, 1000.0]), ("bits", [4.0, 8.0, 16.0])])
def test_sweep_plot_colours_match_across_panels_and_the_title_omits_the_swept_value(axis, xs):
    points = [{"x": x, "digital_s": 1.0, "thermo_s": None if x == xs[-1] else 0.5 * x,
               "speedup": None if x == xs[-1] else 2.0 / x, "hybrid_speedup": 1.2} for x in xs]
    fig = sweep_figure(axis, points, "a title")
    top, bottom = fig.axes
    assert top.get_yscale() == "log" and bottom.get_yscale() == "log"
    assert bottom.get_xscale() == ("log" if axis == "kappa" else "linear")
    assert top.get_ylabel() and bottom.get_ylabel() and bottom.get_xlabel()
    thermo_lines = [line for ax in (top, bottom) for line in ax.get_lines()
                    if line.get_label().startswith("thermodynamic")]
    assert len(thermo_lines) == 2 and all(matplotlib.colors.same_color(line.get_color(), THERMO_COLOR)
                                          for line in thermo_lines)
    digital = [line for line in top.get_lines() if line.get_label() == "digital K-FAC"]
    assert matplotlib.colors.same_color(digital[0].get_color(), DIGITAL_COLOR)
    assert "does not fit" in [t.get_text() for t in bottom.get_legend().get_texts()]


def test_sweep_title_does_not_state_the_swept_value(tmp_path, capsys):
    code, text, _ = _run(["project", "--model", "mnist-ae", "--sweep", "kappa", "--values", "10,100"], capsys)
    header = text.splitlines()[0]
    assert code == 0 and "kappa 100" not in header and "h100 vs chip" in header and "eps 0.1" in header


@pytest.mark.parametrize("kind", ["width-kappa", "kappa-eps"])
def test_map_separates_does_not_fit_from_break_even_and_states_its_assumptions(kind):
    scenario = _scenario(kappa=100.0, eps=0.1)
    doc = speedup_map(kind, scenario, batch=256)
    if kind == "kappa-eps":
        doc["width"] = KAPPA_EPS_MAP_WIDTH
        # the width the outputs state is the one the map priced
        layer = compare_layer(SquareLayer(KAPPA_EPS_MAP_WIDTH), 256,
                              scenario.replace(kappa=doc["xs"][0], eps=doc["ys"][0], kappa_of=None))
        assert doc["speedup"][0][0] == pytest.approx(layer.digital.seconds / layer.thermo.seconds)
    title = map_title(doc, scenario)
    fig = map_figure(doc, title)
    ax = fig.axes[0]
    image = ax.get_images()[0]
    logs = [math.log10(v) for row in doc["speedup"] for v in row if v is not None]
    low, high = image.get_clim()
    assert low <= min(logs) and high >= max(logs) and low == -high  # every value inside, centred on 1
    cmap = image.get_cmap()
    unfit = cmap.get_bad()
    assert not matplotlib.colors.same_color(unfit, cmap(0.5))  # "does not fit" is not break-even
    assert "does not fit" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_xlabel() and ax.get_ylabel() and "log10 speed-up" in fig.axes[1].get_ylabel()
    for part in ("h100 vs chip", "batch 256"):
        assert part in ax.get_title()
    if kind == "kappa-eps":
        assert f"width {KAPPA_EPS_MAP_WIDTH}" in ax.get_title() and "eps 0.1" not in ax.get_title()
    else:
        assert "eps 0.1" in ax.get_title() and "kappa 100" not in ax.get_title()
        assert any(v is None for row in doc["speedup"] for v in row)  # 8192 > the chip's cells
