"""Plots in self-contained HTML reports (agreement, reward model, evaluation)."""

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
