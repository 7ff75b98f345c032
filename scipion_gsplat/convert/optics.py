"""RELION 3.1 optics groups ↔ Scipion acquisitions.

Scipion keeps one :class:`~pwem.objects.Acquisition` per particle (voltage kV,
spherical aberration Cs mm, amplitude contrast Q0) plus one for the set; the
scipion-em-relion plugin also keeps the whole optics table as STAR text in
``Acquisition.opticsGroupInfo`` and the group number of each particle in its
``_rlnOpticsGroup`` attribute. Both forms are read and written here, so a set
whose optics groups differ in Cs/voltage/Q0 keeps them per particle.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pandas as pd
from pwem.objects import Acquisition

from ..core.io import read_star_table

ACQ_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
ATTR_OPTICS_GROUP = "_rlnOpticsGroup"


def optics_to_string(optics: pd.DataFrame) -> str:
    """The optics table as a STAR ``data_optics`` block (text), the form the
    RELION plugin stores in ``Acquisition.opticsGroupInfo``."""
    lines = ["", "# version 30001", "", "data_optics", "", "loop_"]
    lines += [f"_{col} #{k + 1}" for k, col in enumerate(optics.columns)]
    for row in optics.itertuples(index=False):
        lines.append(" ".join(f"{v:.6f}" if isinstance(v, (float, np.floating)) else str(v) for v in row))
    return "\n".join(lines) + "\n\n"


def optics_from_string(text) -> "pd.DataFrame | None":
    """Parse ``Acquisition.opticsGroupInfo`` text; None when empty or unreadable."""
    if not text or "data_optics" not in str(text):
        return None
    fd, path = tempfile.mkstemp(suffix=".star")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(str(text))
        table = read_star_table(path, "optics")
    except Exception:  # a foreign or damaged string: fall back to the acquisitions
        return None
    finally:
        os.unlink(path)
    table = table if isinstance(table, pd.DataFrame) else pd.DataFrame([table])
    return table if "rlnOpticsGroup" in table else None


def acquisition_from(values, magnification: float = 10000.0) -> Acquisition:
    """An Acquisition from a mapping with rlnVoltage / rlnSphericalAberration /
    rlnAmplitudeContrast (missing ones stay unset)."""
    acq = Acquisition()
    acq.setMagnification(magnification)
    if "rlnVoltage" in values:
        acq.setVoltage(float(values["rlnVoltage"]))
    if "rlnSphericalAberration" in values:
        acq.setSphericalAberration(float(values["rlnSphericalAberration"]))
    if "rlnAmplitudeContrast" in values:
        acq.setAmplitudeContrast(float(values["rlnAmplitudeContrast"]))
    return acq


def acquisition_values(acq) -> "tuple | None":
    """``(voltage kV, Cs mm, Q0)`` of an Acquisition, None when it has no voltage."""
    if acq is None or acq.getVoltage() is None:
        return None
    return (round(float(acq.getVoltage()), 6), round(float(acq.getSphericalAberration() or 0.0), 6),
            round(float(acq.getAmplitudeContrast() or 0.0), 6))


class OpticsGrouper:
    """Assign RELION optics groups to Scipion particles, one at a time.

    A particle's (voltage, Cs, Q0) is its own Acquisition, except when it only
    repeats the set's acquisition and the set carries an optics table
    (``opticsGroupInfo``) listing its ``_rlnOpticsGroup``: then the table's row
    is the truth (the RELION plugin gives every particle the first group's
    acquisition). Particles of one input group with different values are split
    into new groups, so no particle gets another group's CTF.

    Args:
        set_acq: the set's Acquisition.
        pixel_size_A / box_px: written as rlnImagePixelSize / rlnImageSize.
    """

    def __init__(self, set_acq, pixel_size_A: float, box_px: int):
        self.table = optics_from_string(set_acq.opticsGroupInfo.get()
                                        if hasattr(set_acq, "opticsGroupInfo") else None)
        self.rows = {} if self.table is None else {
            int(r["rlnOpticsGroup"]): dict(r) for _, r in self.table.iterrows()}
        self.set_values = acquisition_values(set_acq) or (0.0, 0.0, 0.0)
        self.pixel_size_A, self.box_px = float(pixel_size_A), int(box_px)
        self._groups: dict = {}     # (input group, values) -> output group number
        self._values: dict = {}     # output group -> (input group, values)

    def group_of(self, part) -> int:
        """Output optics group number of ``part``."""
        g_in = int(part.getAttributeValue(ATTR_OPTICS_GROUP, 1) or 1)
        own = acquisition_values(part.getAcquisition())
        row = self.rows.get(g_in)
        if row is not None and all(c in row for c in ACQ_COLUMNS) and (own is None or own == self.set_values):
            values = tuple(round(float(row[c]), 6) for c in ACQ_COLUMNS)
        else:
            values = own or self.set_values
        key = (g_in, values)
        if key not in self._groups:
            used = set(self._values) | set(self.rows)
            g_out = g_in if g_in not in self._values else max(used) + 1
            self._groups[key] = g_out
            self._values[g_out] = key
        return self._groups[key]

    def optics_table(self) -> pd.DataFrame:
        """The optics table of every group handed out, sorted by number."""
        rows = []
        for g_out in sorted(self._values):
            g_in, values = self._values[g_out]
            row = dict(self.rows.get(g_in, {}))
            name = str(row.get("rlnOpticsGroupName", f"opticsGroup{g_in}"))
            row["rlnOpticsGroupName"] = name if g_out == g_in else f"{name}_{g_out}"
            row["rlnOpticsGroup"] = g_out
            row.setdefault("rlnMicrographOriginalPixelSize", self.pixel_size_A)
            row.update(zip(ACQ_COLUMNS, values))
            row.update(rlnImagePixelSize=self.pixel_size_A, rlnImageSize=self.box_px, rlnImageDimensionality=2)
            rows.append(row)
        table = pd.DataFrame(rows)
        first = ["rlnOpticsGroupName", "rlnOpticsGroup"]
        return table[first + [c for c in table.columns if c not in first]]
