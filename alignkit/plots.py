"""Plots in self-contained HTML reports (agreement, reward model, evaluation, the loop's rounds)."""

from __future__ import annotations

import base64
import io


def figure_png(fig, dpi: int) -> str:
    """``fig`` as a base64 PNG for an ``<img src="data:image/png;base64,...">``; the figure is
    closed (a report draws many, and pyplot keeps every open one in memory)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def error_bars(rows: list[tuple]):
    """matplotlib's (2, n) error bars from (value, low, high): never negative (rounding can put an
    interval's end a hair past its estimate), 0 where an interval is unknown (None)."""
    import numpy as np

    def gap(a, b):
        return 0.0 if a is None or b is None else max(float(a) - float(b), 0.0)

    return np.array([[gap(v, lo), gap(hi, v)] for v, lo, hi in rows], dtype=float).T
