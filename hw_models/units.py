"""Units shared by the simulator, the cost model and every report: seconds made readable."""

from __future__ import annotations

import math

__all__ = ["format_seconds"]


def format_seconds(seconds: float | None) -> str:
    """Seconds with a readable unit and three significant digits (``"3.2 us"``, ``"12.5 ms"``);
    ``"-"`` for None or a non-finite value."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"
