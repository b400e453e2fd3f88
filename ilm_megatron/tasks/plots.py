"""Plots of length generalisation: accuracy and solver iterations against sequence length.

matplotlib is imported lazily with the non-interactive Agg backend, so importing this module (and
running the evaluation code) never needs it or a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (PlotUnavailableError without it)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailableError(
            "matplotlib is not installed: `pip install matplotlib` to get the plots"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_length_generalization(
    rows: Sequence[dict[str, Any]],
    path: Path,
    title: str = "",
    train_length: int | None = None,
    chance: float | None = None,
) -> Any:
    """Write a two-panel PNG (last-10 accuracy and mean solver iterations vs length) to ``path``.

    Args:
        rows: dicts with ``model``, ``length``, ``acc_last10``, ``iters_mean`` (one line per model).
        path: PNG file to write (parents are created).
        title: figure title.
        train_length: draws a vertical line at the training length when given.
        chance: draws a horizontal line at chance accuracy when given.

    Returns:
        The matplotlib figure (still open: the caller closes it, e.g. after logging it).

    Raises:
        PlotUnavailableError: matplotlib is not installed.
    """
    plt = pyplot()
    fig, (ax_acc, ax_it) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for name in models:
        pts = sorted(
            (r["length"], r["acc_last10"], r["iters_mean"]) for r in rows if r["model"] == name
        )
        xs = [p[0] for p in pts]
        ax_acc.plot(xs, [p[1] for p in pts], marker="o", label=name)
        ax_it.plot(xs, [p[2] for p in pts], marker="o", label=name)
    lengths = sorted({r["length"] for r in rows})
    for ax in (ax_acc, ax_it):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.set_xlabel("sequence length")
        ax.grid(True, alpha=0.3)
        if train_length:
            ax.axvline(train_length, color="gray", ls="--", lw=1, label="train length")
    if chance is not None:
        ax_acc.axhline(chance, color="red", ls=":", lw=1, label="chance")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_ylabel("accuracy (last 10 positions)")
    ax_it.set_ylabel("solver iterations (mean)")
    ax_acc.legend(loc="best", fontsize=8)
    ax_it.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig


def figure_to_array(fig: Any) -> Any:
    """The rendered figure as an (H, W, 3) uint8 numpy array (for TensorBoard ``add_image``)."""
    import numpy as np

    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return rgba[..., :3].copy()


def close(fig: Any) -> None:
    """Free a figure returned by :func:`plot_length_generalization`."""
    pyplot().close(fig)
