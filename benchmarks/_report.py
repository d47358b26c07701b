"""Shared output of the benchmark scripts: one JSON object on stdout, optionally also in a file."""

from __future__ import annotations

import json
from typing import Any

from thermo_kfac.experiments._io import atomic_write


def emit(report: dict[str, Any], out: str | None) -> None:
    """Print ``report`` as JSON and, when ``out`` is given, write the same text there (atomically)."""
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if out:
        atomic_write(out, text + "\n")
