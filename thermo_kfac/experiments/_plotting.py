"""Figures written to files without touching matplotlib's global backend or pyplot's state.

The experiment commands save PNGs; switching the backend (``matplotlib.use("Agg")``) from a
library call would break inline plots in a notebook that calls it. :func:`agg_pyplot` returns the
small part of ``pyplot`` those functions use, backed by ``Figure`` + ``FigureCanvasAgg``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def agg_pyplot() -> SimpleNamespace:
    """``subplots``, ``close`` and ``rcParams`` like ``matplotlib.pyplot``, for file output only."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
        figure_keys = ("figsize", "dpi", "layout", "constrained_layout", "tight_layout")
        fig = Figure(**{k: kwargs.pop(k) for k in figure_keys if k in kwargs})
        FigureCanvasAgg(fig)  # attaches itself: fig.savefig renders with Agg
        return fig, fig.subplots(nrows, ncols, **kwargs)

    return SimpleNamespace(subplots=subplots, close=lambda fig: None, rcParams=matplotlib.rcParams)
