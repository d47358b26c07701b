"""Input checking and conversion: user arrays <-> canonical ``(k, n, n)`` / ``(k, n, m)`` tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Array = Any  # numpy.ndarray or torch.Tensor


@dataclass
class Problem:
    """A validated problem in canonical batched form, on the compute device and dtype.

    ``A`` is ``(k, n, n)``; ``B`` and ``X0`` are ``(k, n, m)``. ``symmetric`` says whether ``A``
    passed the symmetry check (it is then exactly symmetrised).
    """

    A: torch.Tensor
    B: torch.Tensor
    X0: torch.Tensor
    symmetric: bool
    kind: str  # "numpy" or "torch"
    out_shape: tuple[int, ...]
    out_device: torch.device
    batched: bool

    @property
    def k(self) -> int:
        return self.A.shape[0]

    @property
    def n(self) -> int:
        return self.A.shape[1]

    @property
    def m(self) -> int:
        return self.B.shape[2]

    def restore(self, X: torch.Tensor) -> Array:
        """Canonical ``(k, n, m)`` (or ``(k, n, n)``) result -> the user's shape and array kind."""
        X = X.reshape(self.out_shape)
        if self.kind == "numpy":
            return X.detach().cpu().numpy()
        return X.to(self.out_device)


def _kind(*arrays: Any) -> str:
    kinds = {"torch" if isinstance(a, torch.Tensor) else "numpy" for a in arrays if a is not None}
    if len(kinds) > 1:
        raise ValueError("inputs mix numpy arrays and torch tensors; pass all of them as one kind")
    return kinds.pop()


def _to_tensor(name: str, x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            arr = np.asarray(x)
        except Exception as err:  # noqa: BLE001 - any conversion failure is a bad input
            raise ValueError(f"{name} could not be converted to an array ({err})") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                       or arr.dtype == np.bool_):
            raise ValueError(f"{name} has dtype {arr.dtype}; a real floating-point array is needed")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise ValueError(f"{name} is complex ({t.dtype}); only real matrices are supported")
    return t


def _default_dtype(t: torch.Tensor) -> torch.dtype:
    if t.dtype == torch.float64:
        return torch.float64
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    return torch.float64 if not t.is_floating_point() else torch.float32


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise a ValueError naming ``name`` and its count of NaN/Inf entries, if it has any."""
    # amax/amin propagate NaN and see +-Inf: two allocation-free reductions instead of isfinite
    if t.numel() and math.isfinite(float(t.amax())) and math.isfinite(float(t.amin())):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); all entries must be finite")


def symmetry_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for ``max|A - A^T| <= tol * max|A|`` (100 ulps of the input dtype)."""
    return 100.0 * torch.finfo(dtype).eps


def prepare(A: Array, B: Array | None, X0: Array | None, *, device: torch.device | None,
            dtype: torch.dtype | None, require_symmetric: bool, why: str,
            vector_x0: bool = False, trusted_A: bool = False) -> Problem:
    """Validate shapes and values and convert to canonical tensors.

    ``B=None`` (the inverse) gives ``B`` of zeros with one column; ``X0`` then has the shape
    ``(n,)`` or ``(k, n)`` (``vector_x0``). ``why`` names what needs symmetry, for the message.
    ``trusted_A`` skips the ``O(n^2)`` finiteness and symmetry checks of ``A`` (a matrix that
    was validated and symmetrised before, e.g. by :func:`hw_models.langevin.program`).
    """
    kind = _kind(A, B, X0)
    tA = _to_tensor("A", A)
    if tA.ndim not in (2, 3):
        raise ValueError(f"A has shape {tuple(tA.shape)}; expected (n, n) or a batch (k, n, n)")
    if tA.shape[-1] != tA.shape[-2]:
        raise ValueError(f"A has shape {tuple(tA.shape)}; its last two dimensions must be equal "
                         "(a square matrix)")
    if tA.shape[-1] == 0 or (tA.ndim == 3 and tA.shape[0] == 0):
        raise ValueError(f"A has shape {tuple(tA.shape)}; it must not be empty")
    batched = tA.ndim == 3
    n = tA.shape[-1]
    k = tA.shape[0] if batched else 1
    out_device = tA.device if kind == "torch" else torch.device("cpu")
    device = device if device is not None else (tA.device if kind == "torch" else torch.device("cpu"))
    input_dtype = _default_dtype(tA)
    dtype = dtype if dtype is not None else input_dtype

    if B is None:
        tB = torch.zeros((k, n, 1), dtype=dtype)
        out_shape: tuple[int, ...] = (k, n, n) if batched else (n, n)
    else:
        tB = _to_tensor("B", B)
        lead = (k,) if batched else ()
        if tB.ndim == len(lead) + 1:
            m = 1
        elif tB.ndim == len(lead) + 2:
            m = tB.shape[-1]
        else:
            expect = "(k, n) or (k, n, m)" if batched else "(n,) or (n, m)"
            raise ValueError(f"B has shape {tuple(tB.shape)} but A has shape {tuple(tA.shape)}; "
                             f"B must be {expect}")
        if tuple(tB.shape[: len(lead)]) != lead or tB.shape[len(lead)] != n:
            expect = f"({k}, {n}[, m])" if batched else f"({n}[, m])"
            raise ValueError(f"B has shape {tuple(tB.shape)}, which does not match A of shape "
                             f"{tuple(tA.shape)}; expected {expect}")
        if m == 0:
            raise ValueError(f"B has shape {tuple(tB.shape)}; it needs at least one column")
        out_shape = tuple(tB.shape)
        tB = tB.reshape(k, n, m)
    m = tB.shape[2]

    if X0 is None:
        tX0 = torch.zeros((k, n, m), dtype=dtype)
    else:
        tX0 = _to_tensor("x0", X0)
        if vector_x0:
            expect_shape = (k, n) if batched else (n,)
        else:
            expect_shape = out_shape
        if tuple(tX0.shape) != tuple(expect_shape):
            raise ValueError(f"x0 has shape {tuple(tX0.shape)}; it must have shape "
                             f"{tuple(expect_shape)}")
        tX0 = tX0.reshape(k, n, m)

    tA = tA.reshape(k, n, n).to(device=device, dtype=dtype)
    tB = tB.to(device=device, dtype=dtype)
    tX0 = tX0.to(device=device, dtype=dtype)
    check_finite("B", tB)
    if X0 is not None:
        check_finite("x0", tX0)
    if trusted_A:
        return Problem(A=tA.contiguous(), B=tB.contiguous(), X0=tX0.contiguous(), symmetric=True,
                       kind=kind, out_shape=out_shape, out_device=out_device, batched=batched)
    check_finite("A", tA)

    scale = torch.maximum(tA.amax(dim=(-2, -1)), -tA.amin(dim=(-2, -1)))
    asym = (tA - tA.transpose(-1, -2)).abs_().amax(dim=(-2, -1))
    tol = symmetry_tolerance(input_dtype)
    symmetric = bool((asym <= tol * scale).all())
    if require_symmetric and not symmetric:
        worst = int(torch.argmax(asym / torch.clamp(scale, min=1e-300)))
        where = f" (system {worst})" if batched else ""
        raise ValueError(
            f"A must be symmetric for {why}: max|A - A^T| = {float(asym[worst]):.3g}{where} exceeds "
            f"{tol:.1e} * max|A| = {tol * float(scale[worst]):.3g}; only the overdamped "
            "Euler-Maruyama solve accepts a non-symmetric A (eigenvalues with positive real parts)")
    if symmetric and bool(asym.any()):
        tA = 0.5 * (tA + tA.transpose(-1, -2))
    return Problem(A=tA.contiguous(), B=tB.contiguous(), X0=tX0.contiguous(), symmetric=symmetric,
                   kind=kind, out_shape=out_shape, out_device=out_device, batched=batched)
