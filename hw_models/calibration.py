"""Measure GEMM, Cholesky, eigh and inverse on this machine and fit the digital time model.

The fit form is the one of :class:`hw_models.devices.OpModel`::

    t(n) = latency + flops(n) / (eff_max * peak) * (1 + n_half / n)

which is linear in ``(latency, 1/(eff_max*peak), n_half/(eff_max*peak))``; we solve it by
non-negative least squares on *relative* residuals (each row divided by the measured time), so
small and large sizes weigh the same. ``peak`` of a measured device is its best measured FP32
GEMM throughput over the fit sizes (``peak_fp64`` likewise from one FP64 GEMM).

Measurement protocol (see BENCHMARKS.md): inputs are built once per (op, size); one warm-up call;
then ``repeats`` rounds that visit every (op, size) in turn, so machine noise spreads over all of
them; each timing window of a call shorter than 20 ms starts with one untimed call (the other
operations have just evicted this one's operands from cache; without it the interleaving alone
moved Cholesky's held-out error from about 5 % to 30 %) and repeats the call enough times to
last about a millisecond. Min, median and max of the repeats are kept.

Clock and statistic (``clock="auto"``, ``statistic="auto"``): a single-threaded CPU run is timed
with the calling thread's CPU time, which does not advance while other processes hold the core,
and fitted to the median; any other run (several threads, CUDA) is timed by the wall clock and
fitted to the fastest repeat, the estimate of what the hardware can do that co-tenants disturb
least. On the shared 2-core dev machine with other jobs running (load average 4-6), a
single-threaded CPU-clock calibration predicted held-out sizes within about 10 %, while a
two-thread wall-clock one was off by 30-100 % and took minutes: calibrate the thread count you
train with on an idle machine, or use ``threads=1`` where the machine is shared.

Sizes are ``d + 1`` for round widths ``d`` (257, 385, ...), which is what K-FAC factors with a
bias look like; sizes that are multiples of 64 run markedly slower through MKL's Cholesky and LU
on this class of CPU (cache-set conflicts), and below about 250 torch's Cholesky is dominated by
a fixed overhead that varies by tens of percent between runs, so neither makes a good fit point
(smaller sizes are extrapolated through the latency term). Sizes held out of the fit give the
reported prediction error.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from hw_models.devices import (
    CALIBRATION_FORMAT,
    OPS,
    DigitalDevice,
    OpModel,
    default_calibration_path,
    nominal_flops,
)
from hw_models.validation import check_choice, check_positive

DEFAULT_FIT_SIZES = (257, 385, 577, 865, 1281, 1601)
DEFAULT_HOLDOUT_SIZES = (321, 449, 705, 1153)
REWARM_BELOW_S = 0.02
QUICK_FIT_SIZES = (257, 385, 577, 865)
QUICK_HOLDOUT_SIZES = (321, 449, 705)
STATISTICS = ("auto", "min", "median")
CLOCKS = ("auto", "wall", "cpu")
MIN_TIMING_S = 1e-3
CPU_WATTS_PER_CORE = 6.25
CUDA_DEFAULT_WATTS = 400.0


@dataclass(frozen=True)
class Measurement:
    """Timings of one operation at one size (seconds per call)."""

    op: str
    n: int
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    role: str  # "fit" or "holdout"


@dataclass(frozen=True)
class CalibrationResult:
    """A fitted :class:`DigitalDevice`, the raw measurements and the fit's relative errors."""

    device: DigitalDevice
    measurements: tuple[Measurement, ...]
    fit_error: dict[str, float]
    holdout_error: dict[str, float]
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def predicted(self, m: Measurement) -> float:
        """The fitted model's time for measurement ``m``."""
        return self.device.op_time(m.op, m.n)

    def measured(self, m: Measurement) -> float:
        """The statistic of ``m`` the fit used (``settings["statistic"]``)."""
        return m.min_s if self.settings.get("statistic", "min") == "min" else m.median_s

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the calibration file's content)."""
        return {
            "format": CALIBRATION_FORMAT,
            "created": self.machine.get("created"),
            "machine": dict(self.machine),
            "settings": dict(self.settings),
            "device": self.device.to_dict(),
            "fit_error": dict(self.fit_error),
            "holdout_error": dict(self.holdout_error),
            "measurements": [m.__dict__ for m in self.measurements],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationResult:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"not a thermo-kfac calibration (expected format {CALIBRATION_FORMAT!r})")
        try:
            measurements = tuple(Measurement(**m) for m in data["measurements"])
            return cls(DigitalDevice.from_dict(data["device"]), measurements, dict(data["fit_error"]),
                       dict(data["holdout_error"]), dict(data.get("machine", {})),
                       dict(data.get("settings", {})))
        except (KeyError, TypeError) as err:
            raise ValueError(f"calibration data is incomplete: {err}") from None


def save_calibration(result: CalibrationResult, path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``result`` as JSON to ``path`` (default :func:`default_calibration_path`); return the path."""
    device = "cuda" if result.device.kind == "gpu" else "cpu"
    target = Path(path) if path is not None else default_calibration_path(device)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return target


def load_calibration(path: str | os.PathLike[str]) -> CalibrationResult:
    """Read a calibration file written by :func:`save_calibration`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"calibration file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration file {str(path)!r} is not valid JSON: {err}") from None
    return CalibrationResult.from_dict(data)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _operation(op: str, n: int, device: str, dtype: torch.dtype) -> Callable[[], Any]:
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    spd = (a @ a.T / n + torch.eye(n, dtype=torch.float64)).to(device=device, dtype=dtype)
    a = a.to(device=device, dtype=dtype)
    if op == "gemm":
        b = a.T.contiguous()
        return lambda: a @ b
    if op == "cholesky":
        return lambda: torch.linalg.cholesky(spd)
    if op == "eigh":
        return lambda: torch.linalg.eigh(spd)
    return lambda: torch.linalg.inv(spd)


def _time_once(fn: Callable[[], Any], number: int, device: str, clock: str = "wall",
               rewarm: bool = False) -> float:
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    if rewarm:  # one untimed call brings this op's operands back into cache after the others ran
        fn()
    _sync(device)
    start = timer()
    for _ in range(number):
        fn()
    _sync(device)
    return (timer() - start) / number


def resolve_clock(clock: str, device: str, threads: int) -> str:
    """``"cpu"`` (thread CPU time) or ``"wall"`` for a run; ``"auto"`` picks CPU time only for a
    single-threaded CPU run, the one case where it equals the work done."""
    check_choice("clock", clock, CLOCKS)
    if clock == "auto":
        return "cpu" if device == "cpu" and threads == 1 else "wall"
    if clock == "cpu" and (device != "cpu" or threads != 1):
        raise ValueError(f"clock='cpu' measures the calling thread only, so it needs device='cpu' and "
                         f"threads=1 (got device={device!r}, threads={threads}); valid choices: "
                         "'auto', 'wall'")
    return clock


def measure(ops: Sequence[str], sizes: Sequence[int], *, device: str = "cpu", repeats: int = 5,
            dtype: torch.dtype = torch.float32, clock: str = "wall") -> dict[tuple[str, int], list[float]]:
    """Seconds per call for every (op, size), ``repeats`` interleaved rounds after a warm-up.

    ``clock="cpu"`` times with the calling thread's CPU time (single-threaded CPU runs only).
    """
    check_choice("device", device, ("cpu", "cuda"))
    check_choice("clock", clock, ("wall", "cpu"))
    check_positive("repeats", repeats, integer=True)
    for op in ops:
        check_choice("op", op, OPS)
    for n in sizes:
        check_positive("size", n, integer=True)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA device; valid choices "
                         "here: 'cpu'")
    plan = []
    for op in ops:
        for n in sizes:
            fn = _operation(op, n, device, dtype)
            first = _time_once(fn, 1, device, clock)  # warm-up, also sizes the inner loop
            number = max(1, min(1000, math.ceil(MIN_TIMING_S / max(first, 1e-9))))
            plan.append(((op, n), fn, number, first < REWARM_BELOW_S))
    times: dict[tuple[str, int], list[float]] = {key: [] for key, _, _, _ in plan}
    for _ in range(repeats):
        for key, fn, number, rewarm in plan:
            times[key].append(_time_once(fn, number, device, clock, rewarm=rewarm))
    return times


def _memory_bandwidth(device: str, floats: int) -> float:
    src = torch.ones(floats, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_time_once(lambda: dst.copy_(src), 1, device) for _ in range(5))
    return 2.0 * 4.0 * floats / best  # read + write


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------


#: Largest ``eff_max`` a fit may return, relative to the best measured GEMM rate: an operation whose
#: nominal FLOP count is real cannot beat GEMM speed (1; GEMM itself gets room for noise), while
#: eigh's nominal 9 n^3 is about twice what LAPACK's divide-and-conquer ``syevd`` does (2). Without
#: the cap, a range of sizes where efficiency is still climbing can yield an ``eff_max`` of 5-10
#: with a huge ``n_half``, which extrapolates to large n faster than the hardware.
EFF_CAPS = {"gemm": 1.25, "cholesky": 1.0, "inverse": 1.0, "eigh": 2.0}


def fit_op(op: str, sizes: Sequence[int], seconds: Sequence[float], peak: float,
           eff_cap: float | None = None) -> OpModel:
    """Fit ``latency + flops/(eff_max*peak)*(1 + n_half/n)`` to measured times (relative NNLS).

    ``eff_max`` is capped at ``eff_cap`` (default :data:`EFF_CAPS`); when the cap binds, the
    latency and ``n_half`` are refitted with ``eff_max`` fixed at the cap.
    """
    check_choice("op", op, OPS)
    check_positive("peak", peak)
    cap = EFF_CAPS[op] if eff_cap is None else check_positive("eff_cap", eff_cap)
    if len(sizes) != len(seconds) or len(sizes) < 2:
        raise ValueError(f"fit_op needs matching sizes and times, at least 2 (got {len(sizes)} and "
                         f"{len(seconds)})")
    n = np.asarray(sizes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if np.any(t <= 0) or np.any(n <= 0):
        raise ValueError("sizes and times must be positive")
    flops = np.array([nominal_flops(op, x) for x in n])
    design = np.stack([np.ones_like(n), flops, flops / n], axis=1) / t[:, None]
    (latency, slope, quad), _ = nnls(design, np.ones_like(t))
    if slope <= 0:  # no cubic signal in this range: fall back to latency + cubic only
        (latency, slope), _ = nnls(design[:, :2], np.ones_like(t))
        quad = 0.0
    if slope <= 0:
        slope, latency, quad = float(t[-1] / flops[-1]), 0.0, 0.0
    min_slope = 1.0 / (cap * peak)
    if slope < min_slope:
        slope = min_slope
        (latency, quad), _ = nnls(design[:, [0, 2]], 1.0 - slope * flops / t)
    return OpModel(eff_max=float(1.0 / (slope * peak)), n_half=float(quad / slope), latency_s=float(latency))


def calibrate(device: str = "cpu", *, fit_sizes: Sequence[int] | None = None,
              holdout_sizes: Sequence[int] | None = None, repeats: int | None = None, quick: bool = False,
              threads: int | None = None, ops: Sequence[str] = OPS, power_w: float | None = None,
              name: str | None = None, statistic: str = "auto", clock: str = "auto") -> CalibrationResult:
    """Time the operations, fit the digital model, report relative errors on held-out sizes.

    Defaults: sizes :data:`DEFAULT_FIT_SIZES` / :data:`DEFAULT_HOLDOUT_SIZES`, 5 repeats (about
    15 s on 2 cores); ``quick``: :data:`QUICK_FIT_SIZES` / :data:`QUICK_HOLDOUT_SIZES`, 3 repeats
    (about 3 s). ``clock`` / ``statistic``: how repeats are timed and summarized (module docs,
    ``"auto"`` by default). ``gemm`` is
    always measured (it sets the peak). ``threads`` sets torch's intra-op threads for the run
    (restored afterwards). ``power_w`` defaults to 6.25 W per CPU
    thread or 400 W for a GPU (assumptions; the device's energy model multiplies it by time).
    """
    check_choice("device", device, ("cpu", "cuda"))
    check_choice("statistic", statistic, STATISTICS)
    check_choice("clock", clock, CLOCKS)
    fit = tuple(fit_sizes or (QUICK_FIT_SIZES if quick else DEFAULT_FIT_SIZES))
    holdout = tuple(holdout_sizes if holdout_sizes is not None
                    else (QUICK_HOLDOUT_SIZES if quick else DEFAULT_HOLDOUT_SIZES))
    repeats = repeats if repeats is not None else (3 if quick else 5)
    if len(set(fit)) < 3:
        raise ValueError(f"fit_sizes={list(fit)!r} needs at least 3 distinct sizes")
    if set(fit) & set(holdout):
        raise ValueError(f"holdout sizes {sorted(set(fit) & set(holdout))} are also fit sizes")
    ops = tuple(dict.fromkeys(("gemm", *ops)))
    previous_threads = torch.get_num_threads()
    if threads is not None:
        check_positive("threads", threads, integer=True)
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        clock = resolve_clock(clock, device, used_threads)
        if statistic == "auto":
            statistic = "median" if clock == "cpu" else "min"
        pick = min if statistic == "min" else statistics.median
        times = measure(ops, sorted(fit + holdout), device=device, repeats=repeats, clock=clock)
        peak32 = max(nominal_flops("gemm", n) / pick(times[("gemm", n)]) for n in fit)
        big = max((n for n in fit if n <= 1200), default=min(fit))
        t64 = measure(["gemm"], [big], device=device, repeats=repeats, dtype=torch.float64, clock=clock)
        peak64 = nominal_flops("gemm", big) / pick(t64[("gemm", big)])
        bandwidth = _memory_bandwidth(device, 2_000_000 if quick else 8_000_000)
    finally:
        torch.set_num_threads(previous_threads)

    models = {}
    for op in OPS:
        if op in ops:
            models[op] = fit_op(op, fit, [pick(times[(op, n)]) for n in fit], peak32)
        else:
            models[op] = OpModel(eff_max=0.5, n_half=1000.0, latency_s=1e-4)  # not measured
    kind = "gpu" if device == "cuda" else "cpu"
    if power_w is None:
        power_w = CUDA_DEFAULT_WATTS if device == "cuda" else CPU_WATTS_PER_CORE * used_threads
    machine = {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": used_threads, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.machine(),
    }
    calibrated = DigitalDevice(
        name=name or ("cuda" if device == "cuda" else "cpu"), kind=kind, peak_fp32=peak32,
        peak_tf32=peak32, peak_bf16=peak32, peak_fp64=peak64, mem_bandwidth=bandwidth,
        launch_latency_s=models["gemm"].latency_s, power_w=float(power_w),
        gemm=models["gemm"], cholesky=models["cholesky"], eigh=models["eigh"], inverse=models["inverse"],
        source=f"calibrated {machine['created']} on {machine['device_name']} ({used_threads} threads, "
               f"torch {torch.__version__})",
    )
    measurements = []
    for (op, n), values in sorted(times.items()):
        measurements.append(Measurement(op, n, statistics.median(values), min(values), max(values),
                                        len(values), "fit" if n in fit else "holdout"))
    fit_error: dict[str, float] = {}
    holdout_error: dict[str, float] = {}
    for m in measurements:
        value = m.min_s if statistic == "min" else m.median_s
        err = abs(calibrated.op_time(m.op, m.n) - value) / value
        table = fit_error if m.role == "fit" else holdout_error
        table[m.op] = max(table.get(m.op, 0.0), err)
    settings = {"fit_sizes": list(fit), "holdout_sizes": list(holdout), "repeats": repeats,
                "ops": list(ops), "dtype": "float32", "statistic": statistic, "clock": clock}
    return CalibrationResult(calibrated, tuple(measurements), fit_error, holdout_error, machine, settings)
