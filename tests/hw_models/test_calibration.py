"""Host calibration: the fit, its prediction of held-out sizes, and the save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch

from hw_models.calibration import (
    CalibrationResult,
    calibrate,
    fit_op,
    load_calibration,
    save_calibration,
)
from hw_models.devices import OPS, digital_device, host_cpu, load_calibrated_device, nominal_flops

# Single-threaded timing is far steadier than two threads when other processes share the two
# cores; sizes are d+1 like K-FAC factors with a bias (see hw_models.calibration), interpolated.
FIT = (257, 385, 577, 865)
HOLDOUT = (321, 449, 705)
REPEATS = 7


@pytest.fixture(scope="module")
def calibration() -> CalibrationResult:
    result = calibrate(fit_sizes=FIT, holdout_sizes=HOLDOUT, repeats=REPEATS, threads=1)
    if max(result.holdout_error.values()) > 0.3:
        # a burst of load from another process during one size can spoil a median; measure once more
        result = calibrate(fit_sizes=FIT, holdout_sizes=HOLDOUT, repeats=REPEATS, threads=1)
    return result


def test_fit_recovers_a_known_model():
    eff, n_half, latency, peak = 0.4, 300.0, 2e-4, 1e11
    sizes = [100, 200, 400, 800, 1600]
    times = [latency + nominal_flops("eigh", n) / (eff * peak) * (1 + n_half / n) for n in sizes]
    model = fit_op("eigh", sizes, times, peak)
    assert model.eff_max == pytest.approx(eff, rel=1e-6)
    assert model.n_half == pytest.approx(n_half, rel=1e-6)
    assert model.latency_s == pytest.approx(latency, rel=1e-6)


def test_fit_caps_efficiency_so_extrapolation_stays_physical():
    # efficiency still climbing over the fitted range (3 n / (n + 20000), 4-12 % of peak): the
    # uncapped fit follows it to eff_max = 3, i.e. three times GEMM speed at large n
    sizes = [257, 385, 577, 865]
    times = [nominal_flops("cholesky", n) / (3e11 * n / (n + 20000)) for n in sizes]
    assert fit_op("cholesky", sizes, times, 1e11, eff_cap=10.0).eff_max == pytest.approx(3.0)
    model = fit_op("cholesky", sizes, times, 1e11)
    assert model.eff_max <= 1.0 + 1e-12
    assert model.efficiency(1e6) <= 1.0 + 1e-12
    errors = [abs(model.time(nominal_flops("cholesky", n), n, 1e11) - t) / t for n, t in zip(sizes, times,
                                                                                          strict=True)]
    assert max(errors) < 0.15


def test_fit_rejects_bad_data():
    with pytest.raises(ValueError, match="at least 2"):
        fit_op("gemm", [100], [1e-3], 1e9)
    with pytest.raises(ValueError, match="positive"):
        fit_op("gemm", [100, 200], [1e-3, -1.0], 1e9)


def test_host_calibration_reports_its_held_out_error(calibration):
    """The held-out error is the largest relative miss of the fitted device on the sizes it was
    not fitted to, recomputed here from the measurements (how small it is depends on the host's
    load: a benchmark figure, never asserted in a test)."""
    assert set(calibration.holdout_error) == set(OPS)
    for op in OPS:
        held = [m for m in calibration.measurements if m.op == op and m.role == "holdout"]
        assert held
        worst = max(abs(calibration.device.op_time(op, m.n) - m.median_s) / m.median_s for m in held)
        assert calibration.holdout_error[op] == pytest.approx(worst, rel=1e-12)
    roles = {m.role for m in calibration.measurements}
    assert roles == {"fit", "holdout"}
    for m in calibration.measurements:
        assert m.min_s <= m.median_s <= m.max_s and m.repeats == REPEATS
    assert calibration.machine["threads"] == 1
    assert calibration.settings["clock"] == "cpu" and calibration.settings["statistic"] == "median"
    assert torch.get_num_threads() >= 1  # restored after the run


def test_calibrated_device_behaves_like_a_cpu(calibration):
    device = calibration.device
    assert device.kind == "cpu" and device.name == "cpu"
    assert device.peak_fp32 > 1e9  # any CPU that runs torch does more than a GFLOP/s
    for op in OPS:
        assert device.op_time(op, 300) < device.op_time(op, 600)


def test_save_load_round_trip(calibration, tmp_path, monkeypatch):
    path = save_calibration(calibration, tmp_path / "sub" / "cal.json")
    assert path.is_file()
    again = load_calibration(path)
    assert again.device == calibration.device
    assert again.measurements == calibration.measurements
    assert again.holdout_error == pytest.approx(calibration.holdout_error)
    assert load_calibrated_device(path) == calibration.device
    assert host_cpu(path) == calibration.device
    assert digital_device("cpu", calibration=path) == calibration.device
    # the default location, redirected through the documented environment variable
    monkeypatch.setenv("THERMO_KFAC_CALIBRATION", str(tmp_path / "default.json"))
    default = save_calibration(calibration)
    assert default == tmp_path / "default.json"
    assert digital_device("cpu") == calibration.device
    data = json.loads(default.read_text())
    assert {"format", "device", "measurements", "fit_error", "holdout_error", "machine"} <= set(data)


def test_load_rejects_other_files(tmp_path):
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"format": "nope"}))
    with pytest.raises(ValueError, match="not a thermo-kfac calibration"):
        load_calibration(other)
    with pytest.raises(ValueError, match="does not exist"):
        load_calibration(tmp_path / "missing.json")


def test_calibrate_argument_errors():
    with pytest.raises(ValueError, match="'cpu', 'cuda'"):
        calibrate("tpu")
    with pytest.raises(ValueError, match="also fit sizes"):
        calibrate(fit_sizes=(100, 200, 300), holdout_sizes=(200,))
    with pytest.raises(ValueError, match="at least 3 distinct"):
        calibrate(fit_sizes=(100, 100, 200))
    with pytest.raises(ValueError, match="threads=1"):
        calibrate(fit_sizes=(100, 200, 300), holdout_sizes=(), threads=2, clock="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            calibrate("cuda", fit_sizes=(100, 200, 300), holdout_sizes=())
