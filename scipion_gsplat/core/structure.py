"""Atomic structures (PDB/mmCIF via gemmi): density maps and two-state edits.

Positions are in Å. A map of box ``n`` and pixel size ``p`` has its voxel
``n//2`` at the structure's chosen centre (by default its centre of mass), so
two states made from one structure share the same frame when they are given
the same ``center_A``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import gemmi
import numpy as np

from .geometry import axis_angle_matrix
from .io import InputError


def read_structure(path) -> gemmi.Structure:
    """Read a PDB or mmCIF file (first model is used by the other functions)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"structure file not found: {path}")
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError on bad files
        raise InputError(f"cannot read structure {path}: {exc}") from None
    st.remove_hydrogens()
    st.remove_ligands_and_waters()
    st.remove_empty_chains()
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError(f"{path}: no atoms")
    return st


def atom_arrays(st: gemmi.Structure) -> dict:
    """Per-atom arrays of the first model.

    Returns:
        dict with ``xyz_A (M, 3)``, ``atomic_number (M,)``, ``b_iso_A2 (M,)``,
        ``mass_Da (M,)``.
    """
    xyz, z, b, mass = [], [], [], []
    for cra in st[0].all():
        a = cra.atom
        xyz.append(a.pos.tolist())
        z.append(a.element.atomic_number)
        b.append(a.b_iso)
        mass.append(a.element.weight * a.occ)
    return {"xyz_A": np.array(xyz), "atomic_number": np.array(z),
            "b_iso_A2": np.array(b), "mass_Da": np.array(mass)}


def center_of_mass_A(st: gemmi.Structure) -> np.ndarray:
    """Centre of mass of the first model, ``(3,)`` in Å."""
    arr = atom_arrays(st)
    return (arr["xyz_A"] * arr["mass_Da"][:, None]).sum(0) / arr["mass_Da"].sum()


def structure_to_map(st: gemmi.Structure, box: int, pixel_size_A: float,
                     center_A: Optional[np.ndarray] = None,
                     blur_sigma_px: float = 0.5) -> np.ndarray:
    """Electron-scattering density of a structure on a cubic grid.

    Uses gemmi's electron form factors (``DensityCalculatorE``) with each
    atom's B-factor plus an extra Gaussian blur of ``blur_sigma_px`` pixels,
    which limits aliasing at the grid's Nyquist frequency.

    Args:
        st: structure (first model used).
        box: map size ``n`` in voxels.
        pixel_size_A: voxel size in Å.
        center_A: point placed at voxel ``n//2`` (default: centre of mass).
        blur_sigma_px: extra blur σ in pixels.

    Returns:
        ``[z, y, x]`` float32 map.

    Raises:
        InputError: if atoms fall outside the box.
    """
    center = center_of_mass_A(st) if center_A is None else np.asarray(center_A, float)
    model = st.clone()[0]
    offset = (box // 2) * pixel_size_A - center
    extent = box * pixel_size_A
    xyz = atom_arrays(st)["xyz_A"] + offset
    if xyz.min() < 2 * pixel_size_A or xyz.max() > extent - 2 * pixel_size_A:
        raise InputError(f"structure does not fit in a box of {box} px × {pixel_size_A} Å "
                         f"(extent {np.ptp(xyz, axis=0).max():.1f} Å)")
    for cra in model.all():
        cra.atom.pos = gemmi.Position(*(np.array(cra.atom.pos.tolist()) + offset))
    dc = gemmi.DensityCalculatorE()
    dc.grid.set_unit_cell(gemmi.UnitCell(extent, extent, extent, 90, 90, 90))
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(box, box, box)
    dc.d_min = 2.0 * pixel_size_A
    dc.blur = 8.0 * np.pi ** 2 * (blur_sigma_px * pixel_size_A) ** 2
    dc.grid.fill(0.0)
    dc.add_model_density_to_grid(model)  # put_model_density_on_grid would resize the grid
    arr = np.array(dc.grid, copy=True)  # [x, y, z]
    return np.ascontiguousarray(arr.transpose(2, 1, 0), dtype=np.float32)


def remove_residues(st: gemmi.Structure, selection: str) -> gemmi.Structure:
    """A copy of ``st`` without the residues of a gemmi selection.

    Args:
        selection: gemmi CID, e.g. ``'A/100-129'`` or ``'//90-129'``.
    """
    out = st.clone()
    sel = _selection(selection)
    n_before = out[0].count_atom_sites()
    sel.remove_selected(out)
    out.remove_empty_chains()
    if out[0].count_atom_sites() == n_before:
        raise InputError(f"selection '{selection}' matches no atom")
    return out


def rotate_segment(st: gemmi.Structure, selection: str, angle_deg: float,
                   pivot_A: Optional[Sequence[float]] = None,
                   axis: Optional[Sequence[float]] = None) -> gemmi.Structure:
    """A copy of ``st`` with a segment rotated rigidly about a hinge.

    Args:
        selection: gemmi CID of the moving segment, e.g. ``'A/40-88'``.
        angle_deg: rotation angle in degrees.
        pivot_A: a point on the hinge axis (Å); default the CA (or first atom)
            of the segment's first residue.
        axis: hinge axis direction; default perpendicular to the plane through
            the pivot, the segment's centroid and the rest's centroid (an
            opening/closing motion).
    """
    out = st.clone()
    sel = _selection(selection)
    model = out[0]
    chosen = [(ch, res) for ch in sel.chains(model) for res in sel.residues(ch)]
    moving = [atom for _, res in chosen for atom in sel.atoms(res)]
    if not moving:
        raise InputError(f"selection '{selection}' matches no atom")
    mov_xyz = np.array([a.pos.tolist() for a in moving])
    all_xyz = np.array([cra.atom.pos.tolist() for cra in model.all()])
    n_fixed = len(all_xyz) - len(mov_xyz)
    if pivot_A is None:
        first = chosen[0][1]
        atom = first.find_atom("CA", "*") or first[0]
        pivot_A = atom.pos.tolist()
    pivot = np.asarray(pivot_A, float)
    if axis is None:
        rest = ((all_xyz.sum(0) - mov_xyz.sum(0)) / n_fixed) if n_fixed else pivot + [0, 0, 1]
        axis = np.cross(mov_xyz.mean(0) - pivot, rest - pivot)
        if np.linalg.norm(axis) < 1e-6:
            axis = np.array([0.0, 0.0, 1.0])
    rot = axis_angle_matrix(axis, angle_deg)
    new = (mov_xyz - pivot) @ rot.T + pivot
    for a, p in zip(moving, new):
        a.pos = gemmi.Position(*p)
    return out


def _selection(cid: str) -> gemmi.Selection:
    try:
        return gemmi.Selection(cid)
    except Exception as exc:
        raise InputError(f"bad residue selection '{cid}': {exc}") from None
