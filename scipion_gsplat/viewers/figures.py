"""Writing a viewer's figures headless."""
from __future__ import annotations

import os
from typing import Callable, Iterable


def constrained_plotter(**kwargs):
    """A Scipion ``EmPlotter`` whose figure uses matplotlib's constrained layout
    (colour bars next to image panels). Scipion's plotter calls ``tight_layout``
    when shown, which matplotlib refuses on a constrained figure ("Colorbar
    layout of new layout engine not compatible"): that call is switched off."""
    from pwem.viewers.plotter import EmPlotter
    plotter = EmPlotter(**kwargs)
    plotter.getFigure().set_layout_engine("constrained")
    plotter.tightLayoutOn = False
    return plotter


def save_plotters(folder: str, makers: Iterable[tuple[str, Callable]]) -> list:
    """Call each ``(name, make)`` maker (returning a Scipion ``EmPlotter``), save its
    figure as ``<folder>/<name>.png``, close it; return the paths in order."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, make in makers:
        plotter = make()
        path = os.path.join(folder, f"{name}.png")
        plotter.getFigure().savefig(path)
        plotter.close()
        paths.append(path)
    return paths
