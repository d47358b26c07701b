"""Helpers shared by the experiment commands: atomic files, JSON values, text tables, formatting
and the CLI's list parsers.

The module name has an underscore because it is an implementation detail of
:mod:`thermo_kfac.experiments`; the functions in it are public to the experiment modules.
Option lists (``key=value,...``) are read by the one option grammar, :mod:`thermo_kfac.grammar`;
:func:`kv_list` uses it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from hw_models.units import format_seconds
from thermo_kfac.grammar import parse_items, parse_value

__all__ = ["DefaultsHelpFormatter", "atomic_write", "bandwidth_gbps", "current_umask", "float_list",
           "format_seconds", "int_list", "jsonable", "kv_list", "text_table", "widths_list"]


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
    use ``-`` or ``_``, values are read by :func:`thermo_kfac.grammar.parse_value`."""
    try:
        items = parse_items(text)
    except ValueError as err:  # argparse shows the message of an ArgumentTypeError only
        raise argparse.ArgumentTypeError(str(err)) from None
    return {key: parse_value(value) for key, value in items.items()}


_BANDWIDTH_UNITS = {"b/s": 1e-9, "bit/s": 1e-9, "bps": 1e-9, "kb/s": 1e-6, "kbps": 1e-6, "mb/s": 1e-3,
                    "mbps": 1e-3, "gb/s": 1.0, "gbps": 1.0, "tb/s": 1e3, "tbps": 1e3}
MAX_PLAIN_GBPS = 1e5  # 100 Tb/s: a plain number above it is taken for bit/s given by mistake


def bandwidth_gbps(text: str) -> float:
    """A link bandwidth in Gb/s for argparse: ``400`` (Gb/s), or with a unit: ``400Gb/s``,
    ``50e9b/s``, ``2Tb/s``, ``100Mbps`` (bits, not bytes). A plain number above 1e5 (100 Tb/s) is
    refused: it is almost surely bit/s given without the unit."""
    raw = str(text).strip()
    match = re.fullmatch(r"([-+0-9.eE]+)\s*([A-Za-z/]*)", raw)
    unit = match.group(2) if match else ""
    if "B" in unit:  # GB/s, MBps: bytes
        raise argparse.ArgumentTypeError(f"bandwidth {raw!r} is in bytes; give bits (8x: Gb/s, b/s)")
    unit = unit.lower()
    try:
        value = float(match.group(1)) if match else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or (unit and unit not in _BANDWIDTH_UNITS):
        raise argparse.ArgumentTypeError(
            f"bandwidth {raw!r} is not a positive number in Gb/s or a number with a unit "
            f"({', '.join(sorted(_BANDWIDTH_UNITS))}), e.g. 400 or 400Gb/s")
    if not unit and value > MAX_PLAIN_GBPS:
        raise argparse.ArgumentTypeError(
            f"bandwidth {raw!r}: plain numbers are Gb/s, and {value:g} Gb/s is beyond any link; for "
            f"bit/s write the unit ({raw}b/s = {value / 1e9:g} Gb/s)")
    return value * _BANDWIDTH_UNITS.get(unit, 1.0)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after an option's help once: not when the help already names its
    default, and not for options whose default is None, False or empty (nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = isinstance(action.default, (list, tuple, dict)) and not action.default
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS) or empty
                or not action.option_strings or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"
