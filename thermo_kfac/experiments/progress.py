"""Progress reporting of the commands: tqdm bars on a terminal, plain periodic lines elsewhere.

``--progress auto`` (the default) draws bars only when stderr is a terminal; redirected to a file
(CI, SLURM, ``nohup``) it prints one plain line per run every few steps or seconds instead, with
no carriage returns or escape codes, so a log stays readable. ``bar`` and ``lines`` force either
form, ``none`` prints nothing.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from hw_models.validation import check_choice

__all__ = ["LINE_POINTS", "LINE_SECONDS", "PROGRESS_MODES", "LineThrottle", "add_progress_argument",
           "print_line", "progress_mode", "resolve_progress"]

PROGRESS_MODES = ("auto", "bar", "lines", "none")
LINE_POINTS = 10  # lines per run in ``lines`` mode (plus one at the end)
LINE_SECONDS = 30.0  # ... and at least one line this often while a run is slow


def resolve_progress(mode: str | bool | None, stream: TextIO | None = None) -> str:
    """``"bar"``, ``"lines"`` or ``"none"`` for a ``--progress`` mode.

    ``auto``: bars when ``stream`` (default: stderr) is a terminal, else lines. ``True`` means
    ``auto`` and ``False``/``None`` ``none`` (the boolean ``progress=`` of the Python API)."""
    if mode is True:
        mode = "auto"
    elif mode is False or mode is None:
        mode = "none"
    check_choice("progress", mode, PROGRESS_MODES)
    if mode != "auto":
        return str(mode)
    stream = stream if stream is not None else sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        tty = False
    return "bar" if tty else "lines"


class LineThrottle:
    """Decides when the next plain progress line of one run is due: every ``every`` steps
    (default: :data:`LINE_POINTS` lines over ``total``), at least every ``seconds``, and at the end."""

    def __init__(self, total: int, every: int | None = None, seconds: float = LINE_SECONDS) -> None:
        self.total = max(1, int(total))
        self.every = every if every is not None else max(1, math.ceil(self.total / LINE_POINTS))
        self.seconds = seconds
        self.last = time.monotonic()

    def due(self, step: int, final: bool = False) -> bool:
        """Whether to print a line after ``step`` (``final``: the run ended)."""
        now = time.monotonic()
        if final or step % self.every == 0 or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def print_line(text: str, stream: TextIO | None = None) -> None:
    """One progress line on ``stream`` (default stderr), flushed (a log shows it at once)."""
    stream = stream if stream is not None else sys.stderr
    print(text, file=stream, flush=True)


def add_progress_argument(parser: Any) -> None:
    """``--progress auto|bar|lines|none`` and its short form ``--no-progress``."""
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                        help="progress display: auto (default: bars on a terminal, plain periodic "
                             "lines when stderr is redirected), bar, lines or none")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const="none",
                        help="same as --progress none")


def progress_mode(args: Any) -> str:
    """The ``--progress`` mode of parsed arguments (``auto`` when the command has no flag)."""
    return str(getattr(args, "progress", "auto"))
