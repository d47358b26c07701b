"""What a command tells its user besides its results: warnings recorded once per layer and cause
and summarised at the end (:func:`recorded_warnings`, :func:`warning_causes`,
:func:`format_causes`), and Ctrl-C left to the main process (:func:`children_ignore_sigint`).

Shared by ``noise-study``, ``compare`` and ``train``.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["children_ignore_sigint", "format_causes", "merge_causes", "recorded_warnings", "warning_causes"]


_SOLVER_FAILED = re.compile(r"on layer '(?P<layer>[^']+)' \((?P<reason>.*)\); (?:using|keeping)", re.S)
_LAYER = re.compile(r"(?:in|on) layer '(?P<layer>[^']+)'")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?", re.I)


def warning_causes(messages: Sequence[str]) -> list[dict[str, Any]]:
    """The distinct (layer, cause) pairs of a run's warning messages, with how often each came.

    The cause is the message without the layer's name, the K-FAC prefix, the pointers to Python
    methods (``skipped_updates()``, ``fallbacks()``) and measured numbers (``lambda_min =
    -0.05``), so that a run's many warnings about one problem count as one cause."""
    causes: dict[tuple[str | None, str], int] = {}
    for message in messages:
        text = " ".join(str(message).split())
        match = _SOLVER_FAILED.search(text)
        layer_match = match or _LAYER.search(text)
        layer = layer_match.group("layer") if layer_match else None
        if match:
            cause = re.sub(r"^\w+ solver \(layer \d+\): ", "", match.group("reason"))
        else:
            cause = re.sub(r"^K-FAC: ", "", text)
            if layer is not None:
                cause = cause.replace(f" in layer {layer!r}", "").replace(f" on layer {layer!r}", "")
            # "(see skipped_updates())": a pointer to a Python method, with its own "()"
            cause = re.sub(r" ?\((?:see|counted in) [^()]*(?:\(\)[^()]*)*\)", "", cause)
        cause = re.sub(r"[:,]?\s*\w+\s*=\s*" + _NUMBER.pattern, "", cause, flags=re.I)
        key = (layer, cause.strip().rstrip(";."))
        causes[key] = causes.get(key, 0) + 1
    return [{"layer": layer, "cause": cause, "count": n} for (layer, cause), n in causes.items()]


def merge_causes(*lists: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several :func:`warning_causes` lists as one, adding the counts of equal (layer, cause)."""
    merged: dict[tuple[str | None, str], int] = {}
    for items in lists:
        for item in items:
            key = (item["layer"], item["cause"])
            merged[key] = merged.get(key, 0) + int(item["count"])
    return [{"layer": layer, "cause": cause, "count": n} for (layer, cause), n in merged.items()]


def format_causes(causes: Sequence[dict[str, Any]], fallbacks: dict[str, int] | None = None,
                  steps: int | None = None) -> list[str]:
    """One line per (layer, cause): ``layer '5' fell back 300/300 steps: <cause>`` when the
    layer's fallback count is known, else ``layer '5': <cause> (warned N times)``."""
    lines = []
    for item in causes:
        layer = item["layer"]
        where = f"layer {layer!r}" if layer is not None else "the model"
        fell = (fallbacks or {}).get(layer) if layer is not None else None
        if fell and steps:
            lines.append(f"{where} fell back {fell}/{steps} steps: {item['cause']}")
        else:
            times = "once" if item["count"] == 1 else f"{item['count']} times"
            lines.append(f"{where}: {item['cause']} (warned {times})")
    return lines


@contextlib.contextmanager
def recorded_warnings(into: list[str]) -> Iterator[None]:
    """Record every warning raised inside the block (as its message text) into ``into`` instead
    of printing it, so that a command can summarise them once at the end."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            into.extend(str(w.message) for w in caught)


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Ignore SIGINT while worker processes are started, so that they inherit "ignore" (a
    disposition that survives fork and exec, and that Python keeps): Ctrl-C in a terminal signals
    the whole process group, and the workers would print tracebacks of their own. This process
    gets its handler back, so Ctrl-C stops the command here and the executor cancels the rest."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
