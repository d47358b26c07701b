"""Helpers shared by the experiment commands: atomic files, JSON values, text tables, formatting
and the CLI's list parsers.

The module name has an underscore because it is an implementation detail of
:mod:`thermo_kfac.experiments`; the functions in it are public to the experiment modules.
Spec option values (``key=value``) are read by :func:`thermo_kfac.policy.parse_value`, the one
parser for them; :func:`kv_list` uses it.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from hw_models.units import format_seconds
from thermo_kfac.policy import parse_value

__all__ = ["atomic_write", "current_umask", "float_list", "format_seconds", "int_list", "jsonable", "kv_list",
           "text_table", "widths_list"]


# ------------------------------------------------------------------------------------ files
def atomic_write(path: str | os.PathLike[str], content: str | bytes | Callable[[IO[Any]], None], *,
                 binary: bool = False) -> Path:
    """Write ``content`` to ``path`` so that readers see the old file or the new one, never a part.

    ``content`` is text, bytes, or a callback ``write(file)`` that writes into an open file
    (binary when ``binary=True``, e.g. ``fig.savefig(f, format="png")``; text otherwise, opened
    with ``newline=""`` as the ``csv`` module wants). The data go to a temporary file in the same
    folder (created if missing), which then replaces ``path`` (``os.replace``); on any error the
    temporary file is removed and ``path`` is left as it was. The file gets the mode an ordinary
    ``open(path, "w")`` would give (``0o666`` less the user's umask), not the temporary file's
    ``0o600``, so that results on a shared machine stay readable by the group. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = binary or isinstance(content, bytes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's file-creation mask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def jsonable(value: Any) -> Any:
    """``value`` with NaN/Inf (e.g. a diverged run's loss) replaced by None, recursively through
    dicts, lists and tuples (tuples become lists), so that strict JSON can hold it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------- formatting
def text_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table: header, a dashed rule, one line per row; columns two spaces apart.

    ``align`` has one ``l``/``r`` per column (default: the first left, the others right).
    """
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = (c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True))
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


# ------------------------------------------------------------------------ CLI list parsers
def int_list(text: str, *, low: int | None = None) -> list[int]:
    """``"8,16,64"`` -> ``[8, 16, 64]`` for argparse; at least one value, each ``>= low`` if given."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one integer")
    if low is not None and any(v < low for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= {low}")
    return values


def float_list(text: str) -> list[float]:
    """``"0.1,1,10"`` -> ``[0.1, 1.0, 10.0]`` for argparse; at least one value."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def widths_list(text: str) -> tuple[int, ...]:
    """Hidden widths ``"128,128"`` (or ``"128-128"``) -> ``(128, 128)``; positive integers."""
    try:
        values = tuple(int(v) for v in text.replace("-", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers like 128,128") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: widths must be positive integers like 128,128")
    return values


def kv_list(text: str) -> dict[str, Any]:
    """``"channels=32,hidden=128"`` -> ``{"channels": 32, "hidden": 128}`` for argparse; keys may
    use ``-`` or ``_``, values are read by :func:`thermo_kfac.policy.parse_value`."""
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not key=value")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options
