"""Non-idealities of an analog thermodynamic processor.

The simulator (:mod:`hw_models.langevin`) applies these, in this order, to one solve:

1. **coupling quantization**: the matrix ``A`` is programmed into ``coupling_bits``-bit couplings
   (symmetric signed levels ``-L..L`` with ``L = 2**(bits-1) - 1``) over a managed range: abs-max
   of each matrix by default, or a fixed ``coupling_range`` (values beyond it are clipped and
   counted);
2. **mismatch / programming error**: each programmed coupling is off by a static Gaussian error,
   ``absolute`` (``A + std*eps``) or ``proportional`` (``A * (1 + std*eps)``). ``eps`` is one
   fixed pattern per physical cell pair of the device ``device_seed``: the value of the coupling
   between cells ``i`` and ``j`` of unit ``u`` is a hash of ``(device_seed, u, i, j)``
   (:func:`mismatch_pattern`), so a matrix placed at ``cell_offset`` of ``unit`` sees the block
   ``[offset:offset+n, offset:offset+n]`` of that unit's pattern: two matrices on different units
   (or offsets) differ, the same cells give the same error. A coupling joins two cells, so ``eps``
   is symmetric and a symmetric ``A`` stays symmetric;
3. **input DAC**: each right-hand-side column is quantized to ``input_bits`` over its abs-max (or
   ``input_range``); a state re-sent to the device (a warm start reloaded by the host) goes
   through the same DAC over ``state_range`` (:func:`load_state`);
4. **thermal noise** ``kappa0 = 1/beta`` drives the dynamics (it is ``AnalogConfig.kappa0``;
   :func:`thermal_kappa0` converts a temperature and capacitance into it); the state saturates at
   ``+-state_range`` (the integrators' rails; the simulator clips it);
5. **read-out**: Gaussian ``read_noise`` then an ``output_bits`` ADC per read-out vector;
6. **rounding-ensemble mitigation** (Aifer et al., arXiv:2401.16231): ``mitigation_copies``
   independently (stochastically) rounded instances of the problem are solved and their
   estimates averaged. Unbiased rounding makes first-order rounding errors cancel in the
   average, so the systematic error falls from ``O(eps)`` towards ``O(eps**2)``.

Every function works on torch tensors (CPU or CUDA) and takes an explicit ``torch.Generator``
so results are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hw_models.validation import check_bits, check_choice, check_number, check_positive

ROUNDING_MODES = ("nearest", "stochastic")
MISMATCH_KINDS = ("absolute", "proportional")
BOLTZMANN = 1.380649e-23  # J/K


@dataclass(frozen=True)
class NoiseConfig:
    """Optional hardware non-idealities; ``None`` (the default everywhere) means ideal.

    Attributes:
        coupling_bits: bits of the matrix couplings (>= 2).
        input_bits: bits of the DAC that loads the right-hand side (>= 2).
        output_bits: bits of the ADC that reads the result (>= 2).
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased) rounding for all converters.
        mismatch_std: standard deviation of the static coupling error (>= 0).
        mismatch_kind: ``"proportional"`` (relative to each coupling) or ``"absolute"``.
        read_noise: standard deviation of Gaussian noise on every read-out value (>= 0).
        mitigation_copies: independently rounded instances averaged (>= 1).
        coupling_range, input_range, output_range: fixed converter ranges (> 0); ``None`` means
            abs-max range management (the range follows the data, nothing clips).
        device_seed: seed of the simulated device's static mismatch pattern.
        state_range: ``|x_i|`` at which the state saturates (the rails, > 0); ``None``: no rails.
        unit, cell_offset: where the matrix is placed on the device (which solver unit, first
            cell): selects the block of the device's mismatch pattern (>= 0).
        diagonal_resistors: the diagonal (each cell's self-coupling to ground, the damping
            included) is programmed on its own resistors (TNGD, App. C), not by the coupling
            DACs: it is exact (or ``diagonal_bits`` over its own abs-max) and the coupling DACs'
            full scale then covers the off-diagonal entries only (their abs-max, at most
            ``coupling_range``). Mismatch applies to both.
        diagonal_bits: resolution of the diagonal resistors (>= 2); ``None`` = exact. Only with
            ``diagonal_resistors``.
    """

    coupling_bits: int | None = None
    input_bits: int | None = None
    output_bits: int | None = None
    rounding: str = "nearest"
    mismatch_std: float | None = None
    mismatch_kind: str = "proportional"
    read_noise: float | None = None
    mitigation_copies: int = 1
    coupling_range: float | None = None
    input_range: float | None = None
    output_range: float | None = None
    device_seed: int = 0
    state_range: float | None = None
    unit: int = 0
    cell_offset: int = 0
    diagonal_resistors: bool = False
    diagonal_bits: int | None = None

    def __post_init__(self) -> None:
        for name in ("coupling_bits", "input_bits", "output_bits"):
            value = getattr(self, name)
            if value is not None:
                check_bits(name, value)
        check_choice("rounding", self.rounding, ROUNDING_MODES)
        check_choice("mismatch_kind", self.mismatch_kind, MISMATCH_KINDS)
        for name in ("mismatch_std", "read_noise"):
            value = getattr(self, name)
            if value is not None:
                check_positive(name, value, allow_zero=True)
        for name in ("coupling_range", "input_range", "output_range", "state_range"):
            value = getattr(self, name)
            if value is not None:
                check_positive(name, value)
        check_number("mitigation_copies", self.mitigation_copies, low=1, integer=True)
        for name in ("device_seed", "unit", "cell_offset"):
            check_number(name, getattr(self, name), low=0, integer=True)
        if not isinstance(self.diagonal_resistors, bool):
            raise ValueError(f"diagonal_resistors={self.diagonal_resistors!r} must be True or False")
        if self.diagonal_bits is not None:
            check_bits("diagonal_bits", self.diagonal_bits)
            if not self.diagonal_resistors:
                raise ValueError(f"diagonal_bits={self.diagonal_bits} needs diagonal_resistors=True "
                                 "(without them the diagonal is programmed by the coupling DACs)")
        quantized = self.coupling_bits is not None or self.input_bits is not None
        if self.mitigation_copies > 1 and quantized and self.rounding != "stochastic":
            raise ValueError(
                f"mitigation_copies={self.mitigation_copies} needs rounding='stochastic': with "
                f"rounding={self.rounding!r} every quantized copy is identical, so averaging "
                "copies cannot cancel rounding errors")

    @property
    def ideal(self) -> bool:
        """True when no non-ideality is switched on."""
        return (self.coupling_bits is None and self.input_bits is None and self.output_bits is None
                and not self.mismatch_std and not self.read_noise and self.mitigation_copies == 1)

    @property
    def programs_couplings(self) -> bool:
        """True when the programmed matrix differs from ``A`` (quantization or mismatch)."""
        return self.coupling_bits is not None or bool(self.mismatch_std) or self.diagonal_bits is not None


@dataclass(frozen=True)
class Quantized:
    """Result of :func:`quantize`: the values, the step of each range group, clipped count."""

    values: torch.Tensor
    step: torch.Tensor
    n_clipped: int


def quantize(x: torch.Tensor, bits: int, *, rounding: str = "nearest", bound: float | None = None,
             dims: tuple[int, ...] | None = None, generator: torch.Generator | None = None,
             span: torch.Tensor | None = None, inplace: bool = False) -> Quantized:
    """Quantize ``x`` to signed ``bits``-bit levels ``q * step`` with ``|q| <= 2**(bits-1) - 1``.

    The range is ``bound`` if given (values with ``|x| > bound`` clip to the end level and are
    counted), else the abs-max of ``x`` over ``dims`` (every other dimension indexes an
    independent group with its own step; ``None`` means one group). Stochastic rounding rounds up
    with probability equal to the fractional part, so it is unbiased. ``span``: the abs-max over
    ``dims`` when the caller already knows it exactly (shaped as with ``keepdim``), which skips
    the scan; with a ``bound``, a ``span`` inside it says that nothing clips. ``inplace``: reuse
    ``x``'s storage for the result.
    """
    check_bits("bits", bits)
    check_choice("rounding", rounding, ROUNDING_MODES)
    levels = float(2 ** (bits - 1) - 1)
    inside = False
    if bound is None:
        span = abs_max(x, dims) if span is None else span
        n_clipped = 0
    else:
        check_positive("bound", bound)
        # nothing clips when the caller's span, or else the values' abs-max, is inside the bound
        inside = float((abs_max(x) if span is None else span).max()) <= bound
        span = torch.full((), float(bound), dtype=x.dtype, device=x.device)
        n_clipped = 0 if inside else int((x.abs() > bound).sum())
    step = span / levels
    safe_step = torch.where(step > 0, step, 1.0)  # an all-zero group stays 0
    q = x.div_(safe_step) if inplace else x / safe_step  # at most one full-size temporary
    if rounding == "nearest":
        q.round_()
    else:
        q.add_(torch.rand(q.shape, generator=generator, dtype=q.dtype, device=q.device)).floor_()
    # With an abs-max range |x / step| <= levels (1 + 2 eps) rounds to at most `levels` when
    # levels * 2 eps < 1/2 (float32/64 up to 16 bits): the clamp would be a no-op there.
    if (bound is not None and not inside) or rounding != "nearest" or bits > 16 \
            or x.dtype not in (torch.float32, torch.float64):
        q.clamp_(-levels, levels)
    return Quantized(values=q.mul_(step), step=step, n_clipped=n_clipped)


def abs_max(x: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """``max |x|`` over ``dims`` (kept as size-1 dimensions; ``None``: all, a 0-d result).

    ``max(x.amax(), -x.amin())`` rather than the inf-norm: the same exact values, but torch's CPU
    inf-norm reduction is about ten times slower on the small matrices of a K-FAC layer.
    """
    if x.numel() == 0:  # amax refuses empty reductions; the norm defines them as 0
        if dims is None:
            return torch.linalg.vector_norm(x, ord=float("inf"))
        return torch.linalg.vector_norm(x, ord=float("inf"), dim=dims, keepdim=True)
    # the larger of max and -min: two reductions, no |x| temporary (about twice as fast)
    if dims is None:
        return torch.maximum(x.amax(), x.amin().neg())
    return torch.maximum(x.amax(dim=dims, keepdim=True), x.amin(dim=dims, keepdim=True).neg_())


def quantize_couplings(A: torch.Tensor, bits: int, *, rounding: str = "nearest",
                       bound: float | None = None,
                       generator: torch.Generator | None = None) -> Quantized:
    """Quantize each matrix of a ``(..., n, n)`` stack over its own abs-max (or ``bound``).

    Symmetric matrices stay exactly symmetric: the upper triangle (one physical coupling per
    pair of cells) is quantized and mirrored, and only it is counted for clipping.
    """
    symmetric = bool(torch.equal(A, A.transpose(-1, -2)))
    if not symmetric:
        return quantize(A, bits, rounding=rounding, bound=bound, dims=(-2, -1), generator=generator)
    result = quantize(A, bits, rounding=rounding, bound=bound, dims=(-2, -1), generator=generator)
    upper = torch.triu(result.values)
    values = upper + torch.triu(result.values, diagonal=1).transpose(-1, -2)
    n_clipped = 0 if bound is None else int(torch.triu(A.abs() > bound).sum())
    return Quantized(values=values, step=result.step, n_clipped=n_clipped)


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64 with good avalanche): a counter-based stream."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mismatch_pattern(shape: tuple[int, ...], device_seed: int, *, symmetric: bool = True,
                     dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                     unit: int = 0, cell_offset: int = 0) -> torch.Tensor:
    """Standard-normal static error pattern of the cells of the simulated device ``device_seed``.

    ``shape`` is ``(..., n, n)``: system ``s`` of a stack sits on unit ``unit + s``, its cells
    ``cell_offset .. cell_offset + n - 1``. The entry for cells ``(i, j)`` of unit ``u`` is a
    counter-based hash of ``(device_seed, u, i, j)`` turned into a normal (Box-Muller), so it does
    not depend on the matrix size or on other matrices: the pattern of an ``n x n`` matrix at
    offset ``o`` is the block ``[o:o+n, o:o+n]`` of a larger one. With ``symmetric`` the entry of
    ``(i, j)`` and ``(j, i)`` is the same (one coupling per cell pair). Computed on the CPU in
    float64, so every backend and device sees the same pattern.
    """
    *lead, rows, cols = (int(v) for v in shape)
    k = int(np.prod(lead)) if lead else 1
    i = np.arange(rows, dtype=np.uint64)[:, None] + np.uint64(cell_offset)
    j = np.arange(cols, dtype=np.uint64)[None, :] + np.uint64(cell_offset)
    if symmetric:
        i, j = np.minimum(i, j), np.maximum(i, j)
    units = np.arange(k, dtype=np.uint64)[:, None, None] + np.uint64(unit)
    # one 64-bit key per (device, unit, i, j): fields of 16/24/24 bits (up to 16M cells per unit)
    with np.errstate(over="ignore"):
        key = _mix64(np.uint64(device_seed) * np.uint64(0x9E3779B97F4A7C15) + units)
        key = key ^ ((i << np.uint64(24)) | j)
        h1 = _mix64(key)
        h2 = _mix64(h1 + np.uint64(0x9E3779B97F4A7C15))
    # 53-bit uniforms in (0, 1]: u1 never 0, so the logarithm is finite
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / 2.0**53
    eps = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    eps = eps.reshape(*lead, rows, cols) if lead else eps[0]
    return torch.from_numpy(np.array(eps, dtype=np.float64)).to(dtype=dtype, device=device)


def apply_mismatch(A: torch.Tensor, std: float, kind: str = "proportional", *, device_seed: int = 0,
                   symmetric: bool | None = None, unit: int = 0,
                   cell_offset: int = 0) -> torch.Tensor:
    """Return ``A`` with the device's static coupling errors: ``A + std*eps`` or ``A*(1+std*eps)``.

    ``symmetric=None`` keeps a symmetric ``A`` symmetric (one error per coupling pair).
    """
    check_positive("mismatch_std", std, allow_zero=True)
    check_choice("mismatch_kind", kind, MISMATCH_KINDS)
    if symmetric is None:
        symmetric = bool(torch.equal(A, A.transpose(-1, -2)))
    eps = mismatch_pattern(tuple(A.shape), device_seed, symmetric=symmetric, dtype=A.dtype,
                           device=A.device, unit=unit, cell_offset=cell_offset)
    if kind == "absolute":
        return A + std * eps
    return A * (1.0 + std * eps)


def program_couplings(A: torch.Tensor, config: NoiseConfig, *, copies: int = 1,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Matrices the device realises for the stack ``A`` of shape ``(k, n, n)``.

    Returns ``(A_hw, info)`` with ``A_hw`` of shape ``(k * copies, n, n)`` (copy-major:
    ``A_hw[c * k + i]`` is copy ``c`` of system ``i``) and ``info`` holding ``clipped`` and the
    quantization ``step`` per system.
    """
    A_rep = A.repeat(copies, 1, 1) if copies > 1 else A
    info: dict = {"clipped": 0, "step": None}
    if config.diagonal_resistors:
        # the diagonal on its own resistors; the coupling DACs see (and range over) the rest
        diag = torch.diagonal(A_rep, dim1=-2, dim2=-1).clone()
        A_rep = A_rep - torch.diag_embed(diag)
        if config.diagonal_bits is not None:
            diag = quantize(diag, config.diagonal_bits, rounding=config.rounding, dims=(-1,),
                            generator=generator).values
    if config.coupling_bits is not None:
        bound = config.coupling_range
        if config.diagonal_resistors:  # full scale = the off-diagonal abs-max, capped by the range
            span = abs_max(A_rep, (-2, -1))
            clipped = 0
            if bound is not None and bool((span > bound).any()):
                clipped = int(torch.triu(A_rep.abs() > bound, diagonal=1).sum())
                A_rep = A_rep.clamp(-bound, bound)
                span = span.clamp_max(bound)
            q = quantize(A_rep, config.coupling_bits, rounding=config.rounding, dims=(-2, -1),
                         generator=generator, span=torch.where(span > 0, span, 1.0))
            upper = torch.triu(q.values, diagonal=1)  # one coupling per pair of cells, mirrored
            q = Quantized(values=upper + upper.transpose(-1, -2), step=q.step, n_clipped=clipped)
        else:
            q = quantize_couplings(A_rep, config.coupling_bits, rounding=config.rounding,
                                   bound=bound, generator=generator)
        A_rep = q.values
        info["clipped"] = q.n_clipped
        info["step"] = q.step.reshape(-1)[: A.shape[0]]
    if config.diagonal_resistors:
        A_rep = A_rep + torch.diag_embed(diag)
    if config.mismatch_std:
        # the cells the matrix is placed on (system s of a stack on unit config.unit + s), shared
        # by all copies
        symmetric = bool(torch.equal(A, A.transpose(-1, -2)))
        eps = mismatch_pattern(tuple(A.shape), config.device_seed, symmetric=symmetric,
                               dtype=A.dtype, device=A.device, unit=config.unit,
                               cell_offset=config.cell_offset)
        eps = eps.repeat(copies, 1, 1) if copies > 1 else eps
        if config.mismatch_kind == "absolute":
            A_rep = A_rep + config.mismatch_std * eps
        else:
            A_rep = A_rep * (1.0 + config.mismatch_std * eps)
    return A_rep, info


def load_inputs(B: torch.Tensor, config: NoiseConfig, *, copies: int = 1,
                generator: torch.Generator | None = None,
                col_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Right-hand sides ``(k, n, m)`` after the DAC, repeated for each copy (copy-major).

    Each column has its own range (abs-max over ``n``, or ``input_range``). ``col_absmax``: the
    exact column abs-max ``(k, 1, m)`` if the caller has it (skips the scan). Returns
    ``(B_hw, clipped)``.
    """
    B_rep = B.repeat(copies, 1, 1) if copies > 1 else B
    if config.input_bits is None:
        return B_rep, 0
    q = quantize(B_rep, config.input_bits, rounding=config.rounding, bound=config.input_range,
                 dims=(-2,), generator=generator, span=col_absmax, inplace=copies > 1)
    return q.values, q.n_clipped


def load_state(X: torch.Tensor, config: NoiseConfig, *,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """A state re-sent to the device (a host-side warm start): the ``input_bits`` DAC over
    ``+-state_range`` (ideal without either). Returns ``(values, clipped)``."""
    if config.input_bits is None:
        if config.state_range is None:
            return X, 0
        clipped = int((X.abs() > config.state_range).sum())
        return X.clamp(-config.state_range, config.state_range), clipped
    q = quantize(X, config.input_bits, rounding=config.rounding, bound=config.state_range,
                 dims=(-2,), generator=generator)
    return q.values, q.n_clipped


def read_out(X: torch.Tensor, config: NoiseConfig, *, dims: tuple[int, ...] = (-2,),
             generator: torch.Generator | None = None, noise: bool = True,
             inplace: bool = False) -> tuple[torch.Tensor, int]:
    """Read-out of analog values: add ``read_noise`` (unless ``noise=False``: the caller drew it,
    e.g. folded into the thermal noise), then the ADC (range groups over ``dims``).

    Returns ``(values, clipped)``; ``X`` is not modified unless ``inplace``.
    """
    clipped = 0
    if config.read_noise and noise:
        drawn = torch.randn(X.shape, generator=generator, dtype=X.dtype, device=X.device)
        X = X.add_(drawn, alpha=config.read_noise) if inplace else X + config.read_noise * drawn
        inplace = True  # X is a new tensor now
    if config.output_bits is not None:
        q = quantize(X, config.output_bits, rounding=config.rounding, bound=config.output_range,
                     dims=dims, generator=generator, inplace=inplace)
        X, clipped = q.values, q.n_clipped
    return X, clipped


def average_copies(X: torch.Tensor, copies: int) -> torch.Tensor:
    """Mean over the copy-major leading axis: ``(copies * k, ...) -> (k, ...)``."""
    if copies == 1:
        return X
    return X.reshape(copies, X.shape[0] // copies, *X.shape[1:]).mean(dim=0)


def thermal_kappa0(temperature: float = 300.0, capacitance: float = 1e-9,
                   voltage_scale: float = 1.0) -> float:
    """Dimensionless thermal noise level ``kappa0 = k_B T / (C V**2)``.

    Equipartition gives a cell of capacitance ``C`` the voltage variance ``k_B T / C``; dividing
    by the square of the voltage that represents 1.0 gives ``kappa0`` in the simulator's units.
    (300 K, 1 nF, 1 V: about 4.1e-12.)
    """
    check_positive("temperature", temperature)
    check_positive("capacitance", capacitance)
    check_positive("voltage_scale", voltage_scale)
    return BOLTZMANN * temperature / (capacitance * voltage_scale**2)
