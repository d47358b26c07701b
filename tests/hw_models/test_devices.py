"""Device presets: construction, validation, lookup errors, JSON round trip, measured host preset."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hw_models.devices import (
    CALIBRATION_FORMAT,
    DIGITAL_PRESETS,
    OPS,
    THERMO_PRESETS,
    DigitalDevice,
    OpModel,
    ThermoDevice,
    default_calibration_path,
    digital_device,
    host_cpu,
    nominal_flops,
    thermo_device,
)


@pytest.fixture(autouse=True)
def _no_user_calibration(tmp_path, monkeypatch):
    """Presets must not depend on a calibration file in the user's home."""
    monkeypatch.delenv("THERMO_KFAC_CALIBRATION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", THERMO_PRESETS)
def test_thermo_presets_are_frozen_and_documented(name):
    device = thermo_device(name)
    assert isinstance(device, ThermoDevice)
    assert device.name == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        device.cells = 1  # type: ignore[misc]
    # every preset writes its assumptions down
    from hw_models import devices

    builder = {"board": devices._board, "tngd": devices._tngd, "chip": devices._chip}[name]
    assert builder.__doc__ and "assum" in builder.__doc__.lower()


def test_thermo_presets_match_the_issue():
    board, chip, tngd = thermo_device("board"), thermo_device("chip"), thermo_device("tngd")
    assert 10 <= board.cells < 100  # "tens of cells"
    assert chip.cells >= 1000 and tngd.cells >= 1000  # "thousands"
    # TNGD App. C timing model: 16 bit, 50 Gb/s, RC = 1 us
    assert (tngd.noise.input_bits, tngd.noise.output_bits, tngd.noise.coupling_bits) == (16, 16, 16)
    assert tngd.io_bandwidth_bps == pytest.approx(50e9)
    assert tngd.tau_s == pytest.approx(1e3 * 1e-9)  # R = 1 kOhm, C = 1 nF


@pytest.mark.parametrize("name", ["a100", "h100", "cpu"])
def test_digital_presets_are_consistent(name):
    device = digital_device(name)
    assert isinstance(device, DigitalDevice)
    assert device.peak("fp64") <= device.peak("fp32") <= device.peak("tf32") <= device.peak("bf16")
    # decompositions never run on tensor cores
    assert device.peak("bf16", decomposition=True) == device.peak("fp32")
    for op in OPS:
        small, large = device.op_time(op, 200), device.op_time(op, 2000)
        assert 0 < small < large


def test_gpu_data_sheet_figures():
    a100, h100 = digital_device("a100"), digital_device("h100")
    # A100 SXM4 80GB and H100 SXM5 data sheets (dense figures, TFLOP/s and TB/s)
    assert a100.peak_fp32 == pytest.approx(19.5e12)
    assert a100.mem_bandwidth == pytest.approx(2.039e12)
    assert h100.peak_fp32 == pytest.approx(67e12, rel=0.01)
    assert h100.mem_bandwidth == pytest.approx(3.35e12)
    for op in OPS:
        assert h100.op_time(op, 8192) < a100.op_time(op, 8192)
    # eigh is far below GEMM speed on GPUs (Wang et al.: under 3 % of H100's compute)
    assert h100.eigh.efficiency(8192) < 0.05 < h100.gemm.efficiency(8192)


def test_unknown_presets_list_valid_choices():
    with pytest.raises(ValueError, match="board") as err:
        thermo_device("quantum")
    assert "'quantum'" in str(err.value) and "chip" in str(err.value)
    with pytest.raises(ValueError) as err:
        digital_device("tpu")
    for valid in DIGITAL_PRESETS:
        assert repr(valid) in str(err.value)


@pytest.mark.parametrize("field, value, text", [
    ("cells", -4, "cells=-4"),
    ("cells", 0, "cells=0"),
    ("io_bandwidth_bps", 0.0, "io_bandwidth_bps=0.0"),
    ("tau_s", -1e-6, "tau_s=-1e-06"),
    ("units", 1.5, "units=1.5"),
    ("oversize", "tile", "'refuse', 'block'"),
    ("input_bits", 0, "input_bits=0"),
    ("kappa0", -1e-3, "kappa0=-0.001"),
    ("dac_bits", 12, "unknown thermodynamic device field"),
])
def test_thermo_device_validation(field, value, text):
    with pytest.raises(ValueError) as err:
        thermo_device("chip", **{field: value})
    assert text in str(err.value)


def test_unknown_override_field_lists_fields():
    with pytest.raises(ValueError, match="tau_s"):
        thermo_device("chip", speed=3)


def test_digital_device_validation():
    with pytest.raises(ValueError, match="mem_bandwidth=0"):
        digital_device("h100").replace(mem_bandwidth=0)
    with pytest.raises(ValueError, match="eff_max=-0.1"):
        OpModel(eff_max=-0.1, n_half=10, latency_s=0)
    with pytest.raises(ValueError, match="'cpu', 'gpu'"):
        digital_device("h100").replace(kind="fpga")
    with pytest.raises(ValueError, match="precision='fp8'"):
        digital_device("h100").peak("fp8")


def test_op_model_formula():
    model = OpModel(eff_max=0.5, n_half=100.0, latency_s=1e-3)
    # at n = n_half the efficiency is half of eff_max
    assert model.efficiency(100) == pytest.approx(0.25)
    flops = nominal_flops("gemm", 100)
    assert flops == pytest.approx(2e6)
    assert model.time(flops, 100, peak_flops=1e9) == pytest.approx(1e-3 + 2e6 / (0.25 * 1e9))


def test_nominal_flops_rejects_bad_input():
    with pytest.raises(ValueError, match="n=-3"):
        nominal_flops("eigh", -3)
    with pytest.raises(ValueError, match="'gemm', 'cholesky', 'eigh', 'inverse'"):
        nominal_flops("svd", 10)


def test_digital_device_dict_round_trip():
    device = digital_device("a100")
    again = DigitalDevice.from_dict(json.loads(json.dumps(device.to_dict())))
    assert again == device
    with pytest.raises(ValueError, match="not a valid digital device"):
        DigitalDevice.from_dict({"name": "x"})


def test_host_cpu_uses_fallback_then_file(tmp_path, monkeypatch):
    fallback = host_cpu()
    assert fallback.kind == "cpu" and "fallback" in fallback.source
    custom = fallback.replace(name="cpu", peak_fp32=1.23e11, source="test file")
    path = default_calibration_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": CALIBRATION_FORMAT, "device": custom.to_dict()}))
    assert host_cpu() == custom
    assert digital_device("cpu") == custom
    # the environment variable points elsewhere
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": CALIBRATION_FORMAT, "device": fallback.to_dict()}))
    monkeypatch.setenv("THERMO_KFAC_CALIBRATION", str(other))
    assert default_calibration_path("cpu") == other
    assert host_cpu() == fallback


def test_calibration_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        host_cpu(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a thermo-kfac calibration"):
        digital_device("cpu", calibration=bad)
    with pytest.raises(ValueError, match="data-sheet preset 'h100'"):
        digital_device("h100", calibration=bad)


def test_cuda_preset_without_calibration_says_what_to_run():
    with pytest.raises(ValueError, match="thermo-kfac calibrate --device cuda"):
        digital_device("cuda")
