"""Plotting helpers shared by ``nrgpt dynamics`` and ``nrgpt report``.

Figures are ``matplotlib.figure.Figure`` objects drawn on the Agg canvas: no pyplot, no global state, no
display needed, and safe to use from any thread. A figure is built with ``new_figure``, filled with the
helpers below (or plain matplotlib calls on its axes) and written with ``save_png`` / ``png_bytes``.

``indexed_lines`` draws one line per row of an array, coloured by the row's index (a token's position,
a model size, ...), and ``index_colorbar`` adds the colourbar that explains the colours: the layout of
the paper's Figure 2.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 120


def new_figure(nrows: int = 1, ncols: int = 1, *, panel_size: tuple[float, float] = (5.0, 3.4),
               sharex: bool = False, title: str | None = None) -> tuple[Figure, np.ndarray]:
    """A figure of ``nrows`` x ``ncols`` panels of ``panel_size`` inches each (constrained layout) and its
    axes as a 2-d array."""
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharex=sharex, squeeze=False)
    if title:  # wrapped to the figure's width (about 9 characters an inch at the default size)
        fig.suptitle(textwrap.fill(title, max(30, int(9 * panel_size[0] * ncols))))
    return fig, axes


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write the figure to ``path`` as a PNG (parent directories created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(fig, dpi))
    return path


def indexed_lines(ax: Axes, x: Sequence[float] | np.ndarray, ys: np.ndarray, *, cmap: str = "viridis",
                  linewidth: float = 0.9, alpha: float = 0.85) -> ScalarMappable:
    """Draw row i of ``ys`` (N, len(x)) against ``x``, coloured by i on ``cmap``; return the mappable for
    ``index_colorbar``. One ``LineCollection``, so thousands of lines stay fast."""
    ys = np.asarray(ys, dtype=float)
    x = np.broadcast_to(np.asarray(x, dtype=float), ys.shape)
    norm = Normalize(0, max(len(ys) - 1, 1))
    lines = LineCollection(np.stack([x, ys], axis=-1), cmap=cmap, norm=norm, linewidths=linewidth, alpha=alpha)
    lines.set_array(np.arange(len(ys)))
    ax.add_collection(lines)
    ax.autoscale_view()
    return ScalarMappable(norm=norm, cmap=cmap)


def index_colorbar(fig: Figure, mappable: ScalarMappable, axes: np.ndarray | Sequence[Axes], label: str) -> None:
    """One colourbar for ``axes`` (beside them), explaining the colours of ``indexed_lines``."""
    bar = fig.colorbar(mappable, ax=np.ravel(axes).tolist(), fraction=0.04, pad=0.02)
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    bar.set_label(label)


def mark_x(ax: Axes, x: float, label: str) -> None:
    """A dashed vertical line at ``x`` with a legend label (e.g. the number of trained steps)."""
    ax.axvline(x, color="0.4", linestyle="--", linewidth=1.0, label=label)


def style_axes(ax: Axes, *, xlabel: str, ylabel: str, title: str | None = None, log_y: bool = False) -> None:
    """Labels, optional title and log y-scale, and a light grid."""
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if title:
        ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
