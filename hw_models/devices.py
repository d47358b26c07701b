"""Hardware specifications: thermodynamic (analog Langevin) processors and digital processors.

Every device is a frozen dataclass validated on construction; named presets are built by
:func:`thermo_device` and :func:`digital_device` (unknown names raise ``ValueError`` listing the
valid ones). Numbers that come from a data sheet or paper say so in the preset's docstring; the
rest are assumptions, labelled as such, that the cost model's sweeps let you vary.

Digital time model (one operation on an ``n x n`` operand, see :class:`OpModel`)::

    t(n) = latency + flops(n) / (eff_max * peak) * (1 + n_half / n)

``flops(n)`` is a *nominal* count (:data:`NOMINAL_FLOPS`), so ``eff_max`` is "nominal FLOPs per
peak FLOP" and absorbs how the library really does the work. The ``n_half/n`` term is the
O(n^2) part (memory traffic, panel factorizations, per-column kernel launches): efficiency is half
of ``eff_max`` at ``n = n_half``. The form is linear in ``(latency, 1/eff_max, n_half/eff_max)``,
which is how :mod:`hw_models.calibration` fits it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hw_models.noise import NoiseConfig
from hw_models.validation import check_bits, check_choice, check_positive

if TYPE_CHECKING:
    from hw_models.langevin.config import AnalogConfig

OPS = ("gemm", "cholesky", "eigh", "inverse")
PRECISIONS = ("fp32", "tf32", "bf16", "fp64")
OVERSIZE_POLICIES = ("refuse", "block")

#: Nominal FLOP counts for an ``n x n`` operand (a GEMM is ``n x n`` times ``n x n``).
#: Cholesky n^3/3 (LAPACK potrf); inverse 2n^3 (getrf + getri, what ``torch.linalg.inv`` does);
#: eigh 9n^3 (Golub & Van Loan's count for the symmetric QR algorithm with eigenvectors; the
#: divide-and-conquer ``syevd`` that LAPACK/cuSOLVER use does a similar amount of work).
NOMINAL_FLOPS = {"gemm": 2.0, "cholesky": 1.0 / 3.0, "inverse": 2.0, "eigh": 9.0}

CALIBRATION_ENV = "THERMO_KFAC_CALIBRATION"
CALIBRATION_FORMAT = "thermo-kfac-calibration/1"


def nominal_flops(op: str, n: float) -> float:
    """Nominal FLOP count of ``op`` on an ``n x n`` operand (see :data:`NOMINAL_FLOPS`)."""
    check_choice("op", op, OPS)
    check_positive("n", n)
    return NOMINAL_FLOPS[op] * float(n) ** 3


# --------------------------------------------------------------------------------------------
# Digital processors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpModel:
    """Time model of one dense operation: ``latency + flops/(eff_max*peak) * (1 + n_half/n)``."""

    eff_max: float
    n_half: float
    latency_s: float

    def __post_init__(self) -> None:
        check_positive("eff_max", self.eff_max)
        check_positive("n_half", self.n_half, allow_zero=True)
        check_positive("latency_s", self.latency_s, allow_zero=True)

    def efficiency(self, n: float) -> float:
        """Fraction of peak reached (in nominal FLOPs) at size ``n``."""
        check_positive("n", n)
        return self.eff_max / (1.0 + self.n_half / float(n))

    def time(self, flops: float, n: float, peak_flops: float) -> float:
        """Seconds for ``flops`` nominal FLOPs at characteristic size ``n`` on a ``peak_flops`` unit."""
        check_positive("flops", flops, allow_zero=True)
        check_positive("peak_flops", peak_flops)
        return self.latency_s + flops / (self.efficiency(n) * peak_flops)


@dataclass(frozen=True)
class DigitalDevice:
    """A CPU or GPU: peak throughputs, memory bandwidth, power and per-operation time models.

    ``peak_*`` are FLOP/s. Decompositions (Cholesky, eigh, inverse) never run on tensor cores, so
    they use the FP32 peak for fp32/tf32/bf16 work and the FP64 peak for fp64; GEMMs use the peak
    of the requested precision.
    """

    name: str
    kind: str
    peak_fp32: float
    peak_tf32: float
    peak_bf16: float
    peak_fp64: float
    mem_bandwidth: float
    launch_latency_s: float
    power_w: float
    gemm: OpModel
    cholesky: OpModel
    eigh: OpModel
    inverse: OpModel
    source: str = ""

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, ("cpu", "gpu"))
        for name in ("peak_fp32", "peak_tf32", "peak_bf16", "peak_fp64", "mem_bandwidth", "power_w"):
            check_positive(name, getattr(self, name))
        check_positive("launch_latency_s", self.launch_latency_s, allow_zero=True)
        for op in OPS:
            if not isinstance(getattr(self, op), OpModel):
                raise ValueError(f"{op}={getattr(self, op)!r} must be an OpModel")

    def peak(self, precision: str = "fp32", *, decomposition: bool = False) -> float:
        """Peak FLOP/s for GEMMs (or, with ``decomposition``, for LAPACK-style factorizations)."""
        check_choice("precision", precision, PRECISIONS)
        if decomposition:
            return self.peak_fp64 if precision == "fp64" else self.peak_fp32
        return getattr(self, f"peak_{precision}")

    def op(self, name: str) -> OpModel:
        """The :class:`OpModel` of ``name`` (one of :data:`OPS`)."""
        check_choice("op", name, OPS)
        return getattr(self, name)

    def op_time(self, name: str, n: float, precision: str = "fp32") -> float:
        """Seconds for one ``name`` operation on an ``n x n`` operand."""
        flops = nominal_flops(name, n)
        return self.op(name).time(flops, n, self.peak(precision, decomposition=name != "gemm"))

    def replace(self, **changes: Any) -> DigitalDevice:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DigitalDevice:
        """Rebuild a device from :meth:`to_dict` output (validates every field)."""
        data = dict(data)
        try:
            for op in OPS:
                data[op] = OpModel(**data[op])
            return cls(**data)
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a valid digital device description: {err}") from None


def _a100() -> DigitalDevice:
    """NVIDIA A100 SXM4 80 GB.

    Data sheet (NVIDIA A100 Tensor Core GPU data sheet, 2021): FP64 9.7 TFLOP/s (19.5 on FP64
    tensor cores, not used by cuSOLVER's FP32 paths), FP32 19.5, TF32 tensor 156 (312 is the
    2:4-sparsity figure), BF16 tensor 312 (dense), HBM2e 2,039 GB/s, max TDP 400 W (energy =
    TDP x time: an upper bound on board power).
    Efficiency factors: same provenance as :func:`_h100`; eigh's ``eff_max`` scales with the
    bandwidth-to-FLOP ratio because half of its tridiagonal reduction is memory-bound, so A100's
    (2039/19.5e3) gives ``0.6 * 2.039/19.5 = 0.063``.
    """
    return _gpu("a100", peak_fp32=19.5e12, peak_tf32=156e12, peak_bf16=312e12, peak_fp64=9.7e12,
                mem_bandwidth=2.039e12, power_w=400.0, sheet="NVIDIA A100 SXM4 80GB")


def _h100() -> DigitalDevice:
    """NVIDIA H100 SXM5 80 GB.

    Data sheet (NVIDIA H100 Tensor Core GPU data sheet, 2023): FP64 34 TFLOP/s (67 on FP64 tensor
    cores), FP32 67, TF32 tensor 494.7 dense (the sheet's 989 is with 2:4 sparsity), BF16 tensor
    989.5 dense (1,979 sparse), HBM3 3.35 TB/s, TDP up to 700 W (energy = TDP x time).

    Efficiency factors (fraction of the peak reached in nominal FLOPs, see :data:`NOMINAL_FLOPS`):

    - gemm ``eff_max = 0.85``, ``n_half = 256``: cuBLAS SGEMM reaches 80-90 % of FP32 peak on large
      square problems and falls off below a few hundred (tile quantization, launch latency);
      launch latency 5 us is the usual CUDA kernel-launch overhead.
    - cholesky ``eff_max = 0.5``, ``n_half = 2048``, latency 50 us: blocked ``potrf`` is BLAS-3 rich
      but its panel factorizations are sequential; MAGMA/cuSOLVER reports put large-n Cholesky
      at roughly half to 80 % of the GEMM rate and far lower below n ~ 2000 [recalled, not
      re-measured here: calibrate a real GPU with ``thermo-kfac calibrate --device cuda``].
    - inverse ``eff_max = 0.4``, ``n_half = 2048``, latency 100 us: ``getrf`` + ``getri`` is two
      passes with pivoting; taken a little below Cholesky for the same reason [recalled].
    - eigh ``eff_max = 0.03``, ``n_half = 512``, latency 1 ms: Wang et al., "Extracting the
      potential of emerging hardware accelerators for symmetric eigenvalue decomposition"
      (arXiv 2024) report that symmetric EVD reaches under 3 % of H100's compute. The reason is
      structural: the tridiagonal reduction ``sytrd`` does half of its (4/3)n^3 FLOPs as
      matrix-vector products limited by memory bandwidth, so we scale ``eff_max`` by the
      bandwidth-to-FLOP ratio across GPUs (``0.6 * BW[TB/s] / FP32[TFLOP/s]``; 0.03 for H100).
    """
    return _gpu("h100", peak_fp32=66.9e12, peak_tf32=494.7e12, peak_bf16=989.5e12, peak_fp64=33.5e12,
                mem_bandwidth=3.35e12, power_w=700.0, sheet="NVIDIA H100 SXM5 80GB")


def _gpu(name: str, *, peak_fp32: float, peak_tf32: float, peak_bf16: float, peak_fp64: float,
         mem_bandwidth: float, power_w: float, sheet: str) -> DigitalDevice:
    """A GPU preset from its data-sheet numbers and the efficiency factors documented in
    :func:`_h100` (shared by every GPU; eigh's scales with the bandwidth-to-FLOP ratio)."""
    return DigitalDevice(
        name=name, kind="gpu", peak_fp32=peak_fp32, peak_tf32=peak_tf32, peak_bf16=peak_bf16,
        peak_fp64=peak_fp64, mem_bandwidth=mem_bandwidth, launch_latency_s=5e-6, power_w=power_w,
        gemm=OpModel(eff_max=0.85, n_half=256.0, latency_s=5e-6),
        cholesky=OpModel(eff_max=0.5, n_half=2048.0, latency_s=50e-6),
        eigh=OpModel(eff_max=round(0.6 * mem_bandwidth / peak_fp32, 4), n_half=512.0, latency_s=1e-3),
        inverse=OpModel(eff_max=0.4, n_half=2048.0, latency_s=100e-6),
        source=f"data sheet ({sheet}); efficiency factors documented in hw_models.devices",
    )


def _cpu_fallback() -> DigitalDevice:
    """The host CPU when no calibration file exists: numbers measured on the project's dev machine.

    Fitted (``hw_models.calibration.fit_op``) to two-thread wall-clock timings at sizes 257-1025
    taken with torch 2.13 (MKL) on the 2-core AVX-512 Xeon KVM guest the project is developed on,
    and rounded; the fit's largest error over those sizes was 13 % (Cholesky). ``peak_fp32`` is the
    best measured FP32 GEMM throughput, so ``gemm.eff_max`` is about 1 by construction; eigh's
    ``eff_max`` exceeds 1 because LAPACK's divide-and-conquer does fewer than the nominal 9 n^3
    FLOPs. TF32/BF16 are taken equal to FP32 (torch's CPU fp32 GEMM uses no matrix units) and FP64
    as half of FP32 (AVX-512 lanes). Memory bandwidth is a 32 MB tensor copy (it varied from 8 to
    53 GB/s between runs on the shared machine; 50 GB/s is the undisturbed figure). Power is an
    assumption: 6.25 W per core (a 56-core, 350 W server part's TDP per core) times 2 cores.
    Run ``thermo-kfac calibrate`` to replace these with your own machine's figures (see
    :func:`default_calibration_path`).
    """
    return DigitalDevice(
        name="cpu", kind="cpu", peak_fp32=2.24e11, peak_tf32=2.24e11, peak_bf16=2.24e11,
        peak_fp64=1.12e11, mem_bandwidth=5.0e10, launch_latency_s=5e-6, power_w=12.5,
        gemm=OpModel(eff_max=1.0, n_half=51.0, latency_s=5e-6),
        cholesky=OpModel(eff_max=0.44, n_half=317.0, latency_s=1.5e-4),
        eigh=OpModel(eff_max=1.43, n_half=1167.0, latency_s=2.6e-4),
        inverse=OpModel(eff_max=0.76, n_half=581.0, latency_s=1.2e-4),
        source="fallback: measured once on the 2-core dev machine (no calibration file found)",
    )


def default_calibration_path(device: str = "cpu") -> Path:
    """Where ``thermo-kfac calibrate`` saves (and presets ``cpu``/``cuda`` look for) a calibration.

    ``$THERMO_KFAC_CALIBRATION`` if set (a file path, used for the ``cpu`` device), else
    ``$XDG_CACHE_HOME/thermo-kfac/calibration-<device>.json`` (``~/.cache`` when XDG is unset).
    """
    check_choice("device", device, ("cpu", "cuda"))
    env = os.environ.get(CALIBRATION_ENV)
    if env and device == "cpu":
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "thermo-kfac" / f"calibration-{device}.json"


def load_calibrated_device(path: str | os.PathLike[str]) -> DigitalDevice:
    """Read the :class:`DigitalDevice` stored in a calibration JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"calibration file {str(path)!r} does not exist; "
                         "run `thermo-kfac calibrate --out PATH` first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration file {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT or "device" not in data:
        raise ValueError(f"{str(path)!r} is not a thermo-kfac calibration file "
                         f"(expected format {CALIBRATION_FORMAT!r})")
    return DigitalDevice.from_dict(data["device"])


def host_cpu(calibration: str | os.PathLike[str] | None = None) -> DigitalDevice:
    """The host CPU, "measured": from ``calibration`` if given, else from the default calibration
    file if it exists (:func:`default_calibration_path`), else the documented fallback
    (:func:`_cpu_fallback`)."""
    if calibration is not None:
        return load_calibrated_device(calibration)
    path = default_calibration_path("cpu")
    if path.is_file():
        return load_calibrated_device(path)
    return _cpu_fallback()


def _cuda_measured() -> DigitalDevice:
    """The local CUDA GPU as measured by ``thermo-kfac calibrate --device cuda`` (no fallback)."""
    path = default_calibration_path("cuda")
    if not path.is_file():
        raise ValueError(f"digital preset 'cuda' needs a calibration file at {str(path)!r}; run "
                         "`thermo-kfac calibrate --device cuda` on a machine with a GPU, or use "
                         "one of the data-sheet presets 'a100', 'h100'")
    return load_calibrated_device(path)


_DIGITAL = {"cpu": host_cpu, "cuda": _cuda_measured, "a100": _a100, "h100": _h100}
DIGITAL_PRESETS = tuple(_DIGITAL)


def digital_device(name: str | DigitalDevice, *, calibration: str | os.PathLike[str] | None = None
                   ) -> DigitalDevice:
    """A digital preset by name (``cpu``, ``cuda``, ``a100``, ``h100``); devices pass through.

    ``calibration`` (a calibration JSON path) is only meaningful for ``cpu`` and ``cuda`` and
    replaces the default file.
    """
    if isinstance(name, DigitalDevice):
        return name
    check_choice("digital preset", name, DIGITAL_PRESETS)
    if calibration is not None:
        if name not in ("cpu", "cuda"):
            raise ValueError(f"a calibration file applies to the measured presets 'cpu' and 'cuda', "
                             f"not to the data-sheet preset {name!r}")
        return load_calibrated_device(calibration)
    return _DIGITAL[name]()


# --------------------------------------------------------------------------------------------
# Thermodynamic processors
# --------------------------------------------------------------------------------------------


#: Bits a value occupies on the host link when its converter is exact (``*_bits=None``: the value
#: crosses the link as a float32 word, and the converter adds no error).
EXACT_WORD_BITS = 32

#: The converter and non-ideality fields of a thermodynamic device: :class:`NoiseConfig`'s, the
#: one set of names the simulator, the error law and the pricing read.
NOISE_FIELDS = tuple(f.name for f in dataclasses.fields(NoiseConfig))


@dataclass(frozen=True)
class ThermoDevice:
    """An analog thermodynamic (Langevin / Ornstein-Uhlenbeck) linear-algebra processor.

    ONE description of the device: ``noise`` IS the :class:`~hw_models.noise.NoiseConfig` the
    simulator runs (converters, ranges, rails, mismatch, read noise: its field names are the only
    names of those quantities), and ``kappa0`` is the thermal noise the simulator and the error
    law use. :func:`hw_models.pricing.price`, the error law, the solver's ``auto`` rule, placement
    and projection all read this object, so a device that is simulated is the device that is
    priced. Changes go through :meth:`replace` (device fields and ``NoiseConfig`` field names alike,
    plus ``bits`` for the three converters together), which returns a new, validated device.

    Fields:

    - ``cells``: state variables per solver unit = the largest system it holds (``cells x cells``
      couplings, ``cells(cells+1)/2`` distinct since they are symmetric).
    - ``tau_s``: the circuit time constant tau = RC; all dynamics are in units of tau.
    - ``io_bandwidth_bps``: host link, bits per second; ``link_latency_s`` per transfer.
    - ``program_row_s``: time to program one row of couplings once its values are on chip (rows
      are written one after another, the columns of a row in parallel).
    - ``units``: independent solver units working in parallel (each ``cells`` big).
    - ``kappa0``: thermal noise level ``1/beta`` of a solve in the SIMULATOR's convention (one
      convention for simulator and pricing, docs/hardware_model.md section 3):
      ``dx = -(P x - b) dt + sqrt(2 kappa0) dW`` with ``P`` the lambda_max-normalised programmed
      matrix and ``b`` in DAC full-scale units; ``0`` is a noiseless (purely deterministic)
      device. Inversion by sampling tunes its noise source separately (see
      :mod:`hw_models.pricing`).
    - ``noise``: converters and non-idealities (:class:`NoiseConfig`): ``coupling_bits`` over
      ``coupling_range`` (lambda_max-normalised units), the right-hand-side DAC ``input_bits`` over
      ``input_range`` (the full scale, 1), the read-out ADC ``output_bits`` over ``output_range``,
      the integrators' rails ``state_range``, ``mismatch_std``, ``read_noise``, ``rounding``,
      ``mitigation_copies``, the mismatch pattern's ``device_seed``. A converter given as
      ``None`` is exact: it adds no error and its values cross the link as
      :data:`EXACT_WORD_BITS`-bit words.
    - ``power_per_cell_w`` / ``power_per_coupling_w``: analog power while a unit runs.
    - ``io_energy_per_bit_j``: link energy; ``converter_fom_j``: Walden figure of merit of the
      DACs/ADCs, energy per conversion = ``fom * 2**bits``; ``mac_energy_j``: one on-chip
      multiply-accumulate of the covariance accumulators.
    - ``onchip_accumulators``: the chip accumulates ``x x^T`` itself for inversion by sampling
      (reads out n(n+1)/2 numbers once); if False every sample streams to the host.
    - ``oversize``: what happens to a system larger than ``cells``: ``"refuse"`` (raise; the
      projection then keeps that layer digital) or ``"block"`` (solve the ``ceil(n/cells)``
      diagonal blocks independently: a block-diagonal *approximation* of the factor, flagged in
      the cost's ``info``).
    """

    name: str
    cells: int
    tau_s: float
    io_bandwidth_bps: float
    link_latency_s: float
    program_row_s: float
    units: int
    kappa0: float
    power_per_cell_w: float
    power_per_coupling_w: float
    io_energy_per_bit_j: float
    converter_fom_j: float
    mac_energy_j: float
    onchip_accumulators: bool
    oversize: str = "refuse"
    description: str = ""
    noise: NoiseConfig = NoiseConfig()

    def __post_init__(self) -> None:
        check_positive("cells", self.cells, integer=True)
        check_positive("tau_s", self.tau_s)
        check_positive("io_bandwidth_bps", self.io_bandwidth_bps)
        for name in ("link_latency_s", "program_row_s", "power_per_cell_w", "power_per_coupling_w",
                     "io_energy_per_bit_j", "converter_fom_j", "mac_energy_j"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_positive("units", self.units, integer=True)
        check_positive("kappa0", self.kappa0, allow_zero=True)
        if not isinstance(self.onchip_accumulators, bool):
            raise ValueError(f"onchip_accumulators={self.onchip_accumulators!r} must be True or False")
        check_choice("oversize", self.oversize, OVERSIZE_POLICIES)
        if not isinstance(self.noise, NoiseConfig):
            raise ValueError(f"noise={self.noise!r} must be a hw_models.NoiseConfig")

    def replace(self, **changes: Any) -> ThermoDevice:
        """A new device with some fields changed (validated again).

        Keys are this class's fields, :class:`NoiseConfig`'s fields (they change ``noise``) or
        ``bits`` (coupling, input and output bits together; an explicit ``*_bits`` wins). Unknown
        keys raise ``ValueError`` listing the valid ones.
        """
        own = {f.name for f in dataclasses.fields(ThermoDevice)}
        unknown = sorted(set(changes) - own - set(NOISE_FIELDS) - {"bits"})
        if unknown:
            raise ValueError(f"unknown thermodynamic device field(s) {unknown}; valid fields: "
                             f"{', '.join(sorted(own | set(NOISE_FIELDS) | {'bits'}))}")
        changes = dict(changes)
        bits = changes.pop("bits", None)
        noise = {k: changes.pop(k) for k in list(changes) if k in NOISE_FIELDS}
        if bits is not None:
            check_bits("bits", bits)
            for key in ("coupling_bits", "input_bits", "output_bits"):
                noise.setdefault(key, bits)
        base = changes.pop("noise", self.noise)
        if noise:
            if not isinstance(base, NoiseConfig):
                raise ValueError(f"noise={base!r} must be a hw_models.NoiseConfig")
            base = dataclasses.replace(base, **noise)
        return dataclasses.replace(self, noise=base, **changes)

    def ideal(self) -> ThermoDevice:
        """This device with exact converters and no rails, mismatch or read noise (thermal noise
        ``kappa0``, timing and power unchanged)."""
        return dataclasses.replace(self, noise=NoiseConfig(device_seed=self.noise.device_seed))

    def link_bits(self, converter: str) -> int:
        """Bits per value on the link for ``"coupling"``, ``"input"`` or ``"output"`` values."""
        check_choice("converter", converter, ("coupling", "input", "output"))
        bits = getattr(self.noise, f"{converter}_bits")
        return EXACT_WORD_BITS if bits is None else int(bits)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (``noise`` nested); :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThermoDevice:
        """Rebuild a device from :meth:`to_dict` output (validates every field)."""
        data = dict(data)
        try:
            data["noise"] = NoiseConfig(**data.get("noise", {}))
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"not a valid thermodynamic device description: {err}") from None

    def analog_config(self, **window: Any) -> AnalogConfig:
        """The simulator settings of this device: its ``kappa0`` and ``noise``.

        ``window`` sets the remaining :class:`~hw_models.langevin.AnalogConfig` fields
        (``analog_time``, ``burn_in``, ``integrator``, ``seed``...); the default integrator is
        ``"analytic"``. Times are in tau of the lambda_max-normalised matrix.
        """
        from hw_models.langevin.config import AnalogConfig

        window.setdefault("integrator", "analytic")
        return AnalogConfig(noise=self.noise, kappa0=self.kappa0, **window)


def _converters(*, coupling_bits: int, input_bits: int, output_bits: int, state_range: float,
                mismatch: float, read_noise: float, coupling_range: float = 1.0,
                diagonal_resistors: bool = False) -> NoiseConfig:
    """A preset's converters: couplings over the fixed ``coupling_range`` (with
    ``diagonal_resistors``: over the off-diagonal abs-max, at most that range), right-hand sides
    over the full scale 1, read-out over the rails, proportional mismatch."""
    return NoiseConfig(coupling_bits=coupling_bits, input_bits=input_bits, output_bits=output_bits,
                       coupling_range=coupling_range, input_range=1.0, output_range=state_range,
                       state_range=state_range, mismatch_std=mismatch or None,
                       mismatch_kind="proportional", read_noise=read_noise or None,
                       diagonal_resistors=diagonal_resistors)


def _board() -> ThermoDevice:
    """Near-term board: the 8-cell SPU prototype scaled up to 32 cells, still discrete parts.

    Basis: Melanson et al., "Thermodynamic computing system for AI applications" (Nature Comm. 16,
    3757, 2025; arXiv 2312.04836): 8 RLC cells on a PCB, all-to-all switched-capacitor couplings,
    one tunable Gaussian noise source per cell, 8x8 inversion demonstrated. Assumptions:

    - 32 cells ("tens of cells": 4x the cells, 16x the couplings of the prototype), one unit;
    - tau = 10 us (discrete R = 10 kOhm, C = 1 nF; 10x TNGD's 1 us);
    - 12-bit DACs/ADCs (common SPI converter parts), Walden FoM 1 pJ/step (discrete parts);
    - host link 1 Gb/s effective (USB 3 / FPGA bridge), 50 us per transfer round trip,
      100 pJ/bit;
    - couplings programmed over SPI at 10 us per row;
    - kappa0 = 1e-2 in the simulator's convention [assumed: discrete op-amp integrators and
      noise sources; the simulator's default, TNGD's "noise below 0.01 is negligible" level];
    - coupling_bits 12 (switched-capacitor / digital-potentiometer couplings) [assumed];
      coupling_range 1.0 (convention);
    - state_range 10 full-scale units (+-10 V integrator swing for a 1 V DAC full scale) [assumed];
    - mismatch 1e-3 (0.1 % parts after one calibration) [assumed]; read_noise 1e-4 [assumed];
    - 50 mW per cell (op-amps and noise source), 1 mW per coupling;
    - no on-chip accumulators: every sample of an inversion streams to the host (the FPGA or
      host does the outer products at 10 pJ per MAC);
    - oversize: refuse (a 32-cell board cannot hold any realistic K-FAC factor).
    """
    return ThermoDevice(
        name="board", cells=32, tau_s=10e-6, io_bandwidth_bps=1e9,
        link_latency_s=50e-6, program_row_s=10e-6, units=1, kappa0=1e-2,
        power_per_cell_w=0.05, power_per_coupling_w=1e-3, io_energy_per_bit_j=100e-12,
        converter_fom_j=1e-12, mac_energy_j=10e-12, onchip_accumulators=False, oversize="refuse",
        description="near-term PCB board, 32 cells (SPU prototype scaled up)",
        noise=_converters(coupling_bits=12, input_bits=12, output_bits=12, state_range=10.0, mismatch=1e-3,
                          read_noise=1e-4),
    )


def _tngd() -> ThermoDevice:
    """TNGD's published timing model at chip scale.

    Donatella, Duffield et al., "Thermodynamic natural gradient descent" (arXiv 2405.13817, App. C):
    16-bit precision, 50 Gb/s digital transfer, R = 1 kOhm and C = 1 nF so tau = RC = 1 us. The
    paper gives no cell count, programming time or power, so we assume: 4096 cells, one unit,
    no separate programming time (TNGD counts transfer only), 1 us link latency (PCIe-class),
    the same power and converter figures as :func:`_chip`, on-chip accumulators, oversize refuse.
    Noise and converters: kappa0 = 1e-3 (the smallest thermal noise TNGD simulates, Fig. 7; its
    effect was negligible below 1e-2) [source: TNGD, in the simulator's convention as TNGD's eq. 15
    uses it]; coupling_bits 16 (TNGD's 16-bit precision) [source]; state_range 8 [assumed];
    mismatch 0 and read_noise 0 (TNGD's timing model has neither) [source: absent there];
    diagonal_resistors (TNGD App. C adds the damping as separate resistors to ground) [source].
    """
    return ThermoDevice(
        name="tngd", cells=4096, tau_s=1e-6, io_bandwidth_bps=50e9,
        link_latency_s=1e-6, program_row_s=0.0, units=1, kappa0=1e-3,
        power_per_cell_w=1e-3, power_per_coupling_w=1e-6, io_energy_per_bit_j=5e-12,
        converter_fom_j=50e-15, mac_energy_j=1e-12, onchip_accumulators=True, oversize="refuse",
        description="TNGD timing model (16 bit, 50 Gb/s, tau = 1 us), 4096 cells",
        noise=_converters(coupling_bits=16, input_bits=16, output_bits=16, state_range=8.0, mismatch=0.0,
                          read_noise=0.0, diagonal_resistors=True),
    )


def _chip() -> ThermoDevice:
    """Projected integrated chip: thousands of cells in CMOS, several units.

    Assumptions (none measured; every one is a sweep axis or a ``--`` option of ``project``):

    - 4096 cells per unit (ViT-B's widest factor, 3073, fits; ResNet-50's 4608 does not), 4 units;
    - tau = 100 ns (on-chip R = 10 kOhm, C = 10 pF: 10x faster than TNGD's PCB-scale 1 us, still
      slow enough for low-power integrators);
    - 12-bit DACs/ADCs (typical of on-chip SAR converters), Walden FoM 50 fJ/step (B. Murmann's
      ADC performance survey: mainstream SAR designs sit at tens of fJ/step) [recalled];
    - host link 400 Gb/s (PCIe 5.0 x16 is about 512 Gb/s raw), 1 us latency, 5 pJ/bit (SerDes);
    - one row of couplings programmed per 100 ns (per-column DACs settle in about one tau);
    - kappa0 = 1e-4 in the simulator's convention [assumed: kT/C of a 10 pF integrator at 300 K
      is 4e-10 V^2, i.e. 4e-10 at a 1 V full scale; amplifier and noise-source floors are taken
      as 1 % rms of full scale at lambda = 1];
    - coupling_bits 10 (on-chip capacitor/conductance DACs) [assumed]; coupling_range 1.0;
    - state_range 8 full-scale units [assumed];
    - mismatch 2e-3 (on-chip capacitor matching after trimming) [assumed]; read_noise 2e-4
      (about one LSB of a 12-bit ADC over +-1) [assumed];
    - diagonal_resistors: the diagonal (damping included) on exact resistors (TNGD App. C), the
      coupling DACs ranged over the off-diagonal abs-max [assumed: needed for 785-wide factors];
    - 1 mW per cell (integrator, noise source, share of converters), 1 uW per coupling (tens of
      mV across tens of kOhm);
    - on-chip covariance accumulators at 1 pJ per 16-bit MAC (Horowitz, ISSCC 2014, 45 nm:
      about 1.1 pJ multiply + 0.4 pJ add) [recalled];
    - oversize refuse.
    """
    return ThermoDevice(
        name="chip", cells=4096, tau_s=100e-9, io_bandwidth_bps=400e9,
        link_latency_s=1e-6, program_row_s=100e-9, units=4, kappa0=1e-4,
        power_per_cell_w=1e-3, power_per_coupling_w=1e-6, io_energy_per_bit_j=5e-12,
        converter_fom_j=50e-15, mac_energy_j=1e-12, onchip_accumulators=True, oversize="refuse",
        description="projected integrated chip, 4 units x 4096 cells, tau = 100 ns",
        noise=_converters(coupling_bits=10, input_bits=12, output_bits=12, state_range=8.0, mismatch=2e-3,
                          read_noise=2e-4, diagonal_resistors=True),
    )


_THERMO = {"board": _board, "tngd": _tngd, "chip": _chip}
THERMO_PRESETS = tuple(_THERMO)


def thermo_device(name: str | ThermoDevice, **overrides: Any) -> ThermoDevice:
    """A thermodynamic preset by name (``board``, ``tngd``, ``chip``) or a device, with optional
    overrides (any key :meth:`ThermoDevice.replace` takes)."""
    if isinstance(name, ThermoDevice):
        device = name
    else:
        check_choice("thermodynamic preset", name, THERMO_PRESETS)
        device = _THERMO[name]()
    return device.replace(**overrides) if overrides else device
