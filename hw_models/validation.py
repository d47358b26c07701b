"""Argument checks shared by both packages.

Every check raises ``ValueError`` whose message names the argument, the bad value and what is
allowed, so configuration mistakes are caught where an object is constructed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

#: The floating dtypes by name: the one map from a dtype's name to the torch dtype, for both
#: packages (simulator configs, K-FAC's factor and loss dtypes, the option grammar).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


#: Converter and coupling resolution: a signed ``b``-bit converter has ``2^(b-1) - 1`` levels per
#: side, so ``b >= 2`` for a single level; 32 bits is beyond any analog converter.
MIN_BITS, MAX_BITS = 2, 32


def check_bits(name: str, value: Any) -> int:
    """Return ``value`` if it is an integer number of converter bits in ``[MIN_BITS, MAX_BITS]``."""
    return check_number(name, value, low=MIN_BITS, high=MAX_BITS, integer=True)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise listing the valid choices."""
    choices = tuple(choices)
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {valid}")
    return value


def check_dtype(name: str, value: Any) -> torch.dtype:
    """``value`` (one of :data:`DTYPES`' dtypes, its name, or a numpy scalar type of that name) as
    a torch dtype, else raise listing the valid names."""
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
    else:
        key = str(getattr(value, "__name__", value))  # numpy scalar types carry their name
        if key in DTYPES:
            return DTYPES[key]
    valid = ", ".join(repr(k) for k in DTYPES)
    raise ValueError(f"{name}={value!r} is not valid; choose one of: {valid}")


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> Any:
    """Check that ``value`` is a finite (integer) number within ``[low, high]``.

    Bounds are inclusive unless ``low_inclusive``/``high_inclusive`` say otherwise.
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        bounds = _range_text(low, high, low_inclusive, high_inclusive)
        raise ValueError(f"{name}={value!r} must be {kind}{bounds}")
    if integer and not isinstance(value, int):
        if not float(value).is_integer():
            raise ValueError(f"{name}={value!r} must be {kind}")
        value = int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        raise ValueError(f"{name}={value!r} is out of range; it must be {kind}"
                         f"{_range_text(low, high, low_inclusive, high_inclusive)}")
    return value


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> Any:
    """Check ``value > 0`` (or ``>= 0`` with ``allow_zero``)."""
    return check_number(name, value, low=0, low_inclusive=allow_zero, integer=integer)


def _range_text(low: float | None, high: float | None, low_inc: bool, high_inc: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>=' if low_inc else '>'} {low}"
    if low is None:
        return f" {'<=' if high_inc else '<'} {high}"
    return f" in {'[' if low_inc else '('}{low}, {high}{']' if high_inc else ')'}"
