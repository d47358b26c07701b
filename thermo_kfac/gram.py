"""Symmetric Gram products ``X^T X`` for the Kronecker factors, at the cost of their upper triangle.

K-FAC's factor statistics are Gram matrices of the layer inputs (``A``, with a column of ones for
the bias) and of the output gradients (``G``). A plain ``X.T @ X`` computes every entry twice.
:func:`gram` splits the columns into blocks, computes only the block rows of the upper block
triangle (one GEMM per block row, ``X[:, blk]^T X[:, start:]``, written into the output in place)
and mirrors them:
``(b + 1) / (2 b)`` of the FLOPs for ``b`` blocks. A bias column is handled without copying the
activations (``[X, 1]^T [X, 1] = [[X^T X, X^T 1], [1^T X, n]]``), so the forward's tensor is used
as is. Small matrices (fewer than ``min_blocked`` columns) use one GEMM: there the call overhead
outweighs the saved work (``benchmarks/kfac_step.py`` reports both).
"""

from __future__ import annotations

import math

import torch

#: Columns below which one plain GEMM is used; block width of the blocked product.
MIN_BLOCKED = 512
BLOCK = 256


def gram(rows: torch.Tensor, *, append_ones: bool = False, block: int = BLOCK,
         min_blocked: int = MIN_BLOCKED) -> torch.Tensor:
    """``X^T X`` of the ``(n, d)`` matrix ``rows`` (``[X, 1]^T [X, 1]``, size ``d + 1``, with
    ``append_ones``), exactly symmetric.

    ``rows`` is read in place (any strides); ``block``/``min_blocked`` set the blocking
    (``d < min_blocked``: a single GEMM).
    """
    if rows.dim() != 2:
        raise ValueError(f"rows must be a 2-d (n, d) matrix, got shape {tuple(rows.shape)}")
    if block < 1 or min_blocked < 1:
        raise ValueError(f"block={block} and min_blocked={min_blocked} must be >= 1")
    n, d = rows.shape
    size = d + int(append_ones)
    out = torch.empty(size, size, dtype=rows.dtype, device=rows.device)
    core = out[:d, :d]
    if d < min_blocked:
        torch.mm(rows.T, rows, out=core)  # BLAS writes into the strided block directly
    else:
        _blocked_upper(rows, core, block)
    if append_ones:
        sums = rows.sum(dim=0)
        out[:d, d] = sums
        out[d, :d] = sums
        out[d, d] = n
    return out


def _blocked_upper(rows: torch.Tensor, out: torch.Tensor, block: int) -> None:
    """Fill ``out`` (d x d, possibly a strided view) with ``rows^T rows``: one GEMM per block row
    of the upper block triangle, written in place (BLAS takes the row-strided block as its
    output), then each diagonal block's upper triangle and each off-diagonal block mirrored, so
    the result is exactly symmetric."""
    d = rows.shape[1]
    blocks = math.ceil(d / block)
    width = math.ceil(d / blocks)  # balanced blocks
    for start in range(0, d, width):
        stop = min(start + width, d)
        torch.mm(rows[:, start:stop].T, rows[:, start:], out=out[start:stop, start:])
    for start in range(0, d, width):
        stop = min(start + width, d)
        diag = out[start:stop, start:stop]
        diag.copy_(diag.triu() + diag.triu(1).T)
        if stop < d:
            out[stop:, start:stop] = out[start:stop, stop:].T


def gram_flops(n: int, d: int, *, blocked: bool, block: int = BLOCK) -> float:
    """FLOPs of :func:`gram`'s products for an ``(n, d)`` input (2 per multiply-add)."""
    if not blocked:
        return 2.0 * n * d * d
    blocks = math.ceil(d / block)
    width = math.ceil(d / blocks)
    return sum(2.0 * n * (min(s + width, d) - s) * (d - s) for s in range(0, d, width))
