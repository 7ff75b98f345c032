"""Figures of a classification's classes: a table with thumbnails, FSC per class
(matplotlib; no Scipion import).

* :func:`draw_class_table` — one row per class: a thumbnail (projection of the
  class map along z), the particle count and share, the mean probability of the
  assigned class, and the resolution at FSC = 0.143 of the class half maps.
* :func:`draw_fsc_curves` — each class's FSC against resolution, with the 0.143
  line and the resolution of each class in the legend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..fsc import resolution_at


@dataclass
class ClassRow:
    """One class: ``number``, ``size`` (particles), ``probability`` (mean over its
    particles of the probability of their class; NaN if unknown), ``volume``
    (the class map ``[z, y, x]`` or None), ``fsc`` ``(frequency 1/Å, fsc)`` or None."""
    number: int
    size: int
    probability: float = float("nan")
    volume: Optional[np.ndarray] = None
    fsc: Optional[tuple] = None

    def resolution(self, threshold: float = 0.143) -> float:
        """Å at FSC = ``threshold`` (NaN without an FSC)."""
        if self.fsc is None:
            return float("nan")
        return resolution_at(np.asarray(self.fsc[0], float), np.asarray(self.fsc[1], float), threshold)


def thumbnail(volume: np.ndarray) -> np.ndarray:
    """Projection of a map along z (``[y, x]``), the class thumbnail."""
    return np.asarray(volume, float).sum(axis=0)


def _fmt(value: float, fmt: str, missing: str = "—") -> str:
    return missing if value is None or not math.isfinite(value) else format(value, fmt)


def draw_class_table(fig, rows: list, title: str = "") -> list:
    """One row per class in ``fig``: thumbnail, class, particles (%), mean
    probability, resolution (Å, FSC 0.143). Returns the text lines drawn."""
    total = max(1, sum(r.size for r in rows))
    n = max(1, len(rows))
    grid = fig.add_gridspec(n + 1, 2, width_ratios=[1, 4], left=0.03, right=0.98, top=0.95, bottom=0.03,
                            hspace=0.15, wspace=0.05)
    header = fig.add_subplot(grid[0, 1])
    header.axis("off")
    columns = f"{'class':<7}{'particles':>16}{'mean probability':>20}{'resolution (Å)':>18}"
    header.text(0.0, 0.3, columns, family="monospace", fontsize=11, weight="bold", va="center")
    if title:
        fig.suptitle(title, fontsize=11)
    lines = []
    for i, row in enumerate(rows):
        ax_img = fig.add_subplot(grid[i + 1, 0])
        ax_img.set_xticks([])
        ax_img.set_yticks([])
        if row.volume is not None:
            ax_img.imshow(thumbnail(row.volume), cmap="gray", origin="lower")
        else:
            ax_img.text(0.5, 0.5, "no map", ha="center", va="center")
        ax_txt = fig.add_subplot(grid[i + 1, 1])
        ax_txt.axis("off")
        share = f"{row.size} ({100.0 * row.size / total:.0f}%)"
        line = (f"{row.number:<7}{share:>16}{_fmt(row.probability, '.3f'):>20}"
                f"{_fmt(row.resolution(), '.1f'):>18}")
        ax_txt.text(0.0, 0.5, line, family="monospace", fontsize=11, va="center")
        lines.append(line)
    return lines


def draw_fsc_curves(ax, curves: dict) -> None:
    """``curves``: label → ``(frequency 1/Å, fsc)``; one line each, the 0.143 line,
    x axis in 1/Å with Å tick labels."""
    for label, (freq, fsc) in curves.items():
        freq, fsc = np.asarray(freq, float), np.asarray(fsc, float)
        res = resolution_at(freq, fsc)
        ax.plot(freq, fsc, lw=2, label=f"{label}: {res:.1f} Å")
    ax.axhline(0.143, color="0.5", ls="--", lw=1)
    ax.axhline(0.0, color="0.8", lw=0.8)
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("FSC of the half maps")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(title="class (FSC = 0.143)")
    ax.set_title("FSC per class")
