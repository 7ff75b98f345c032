"""SetOfParticles ↔ RELION 3.1 particle STAR files.

The programs read and write STAR + MRC only; protocols use these two functions
to hand particles over and to take them back:

* :func:`star_to_set` fills a SetOfParticles from a normalised
  :class:`~scipion_gsplat.core.io.ParticleStar` (poses → projection alignment,
  CTF, acquisition per optics group, coordinates and micrographs, class id,
  every other column as an ``_rln*`` attribute);
* :func:`set_to_star` writes a SetOfParticles (or SetOfClasses) as a RELION 3.1
  STAR file whose rows follow the set's id order and carry the Scipion id in
  ``rlnImageId``, so a program's output rows can be matched back to the
  particles; every ``_rln*`` attribute comes back out as its column.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from pwem.objects import Coordinate, CTFModel, Particle, Transform
from pyworkflow.object import Float, Integer, String

from ..core.io import SOURCE_ROW, InputError, ParticleStar, parse_image_name, write_particles
from .alignment import matrix_to_relion, relion_to_matrix
from .classes import is_classes, iter_particles, particle_class, particles_of, size_of
from .optics import ATTR_OPTICS_GROUP, OpticsGrouper, acquisition_from, optics_to_string

MRC_EXTENSIONS = (".mrc", ".mrcs", ".st", ".map", ".ali")
# STAR columns that star_to_set turns into Scipion objects (not into _rln attributes).
CORE_COLUMNS = ("rlnImageName", "rlnImageId", "rlnOpticsGroup", "rlnAngleRot", "rlnAngleTilt",
                "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV",
                "rlnDefocusAngle", "rlnPhaseShift", "rlnCoordinateX", "rlnCoordinateY",
                "rlnMicrographName", "rlnMicrographId")
# _rln attributes that set_to_star writes through other objects, never as they are.
WRITTEN_ELSEWHERE = ("rlnOpticsGroup", "rlnClassNumber", "rlnCoordinateX", "rlnCoordinateY",
                     "rlnMicrographName", "rlnImageName", "rlnImageId")


def star_to_set(star: ParticleStar, part_set, stack_paths: dict) -> None:
    """Append every STAR row as a Particle to ``part_set``.

    Each particle gets the Acquisition of its optics group (voltage kV, Cs mm,
    Q0) and ``_rlnOpticsGroup``; the set gets the first group's acquisition and
    the whole optics table in ``opticsGroupInfo`` (as the RELION plugin does).
    ``rlnCoordinateX/Y`` (px), ``rlnMicrographName`` and ``rlnMicrographId``
    become the particle's Coordinate and micrograph id (ids numbered by first
    appearance of each micrograph name when the file has none); fractional
    coordinates are also kept exactly as ``_rlnCoordinateX/Y``. ``rlnClassNumber``
    is the class id. Every other particle column ``rlnX`` is kept as the
    attribute ``_rlnX`` (Integer, Float or String), so :func:`set_to_star`
    writes it back.

    Args:
        star: normalised particle table.
        part_set: an empty SetOfParticles (acquisition and sampling rate are set here).
        stack_paths: maps each stack name in ``rlnImageName`` to the path the
            particle should point to (e.g. a link inside the protocol folder).
    """
    table = star.particles
    pix = star.pixel_size
    part_set.setSamplingRate(pix)
    groups = star.optics["rlnOpticsGroup"].astype(int).tolist()
    acqs = {g: acquisition_from(row) for g, (_, row) in zip(groups, star.optics.iterrows())}
    set_acq = part_set.getAcquisition()
    set_acq.copyInfo(acqs[int(table["rlnOpticsGroup"].iloc[0])])
    set_acq.opticsGroupInfo.set(optics_to_string(star.optics))
    part_set.setHasCTF(star.has_ctf)
    if star.has_poses:
        part_set.setAlignmentProj()
    euler = star.euler_deg() if star.has_poses else None
    origins_px = star.shifts_A() / pix
    ctf = star.ctf_params() if star.has_ctf else None
    names = table["rlnImageName"].astype(str).to_numpy()
    optics_groups = table["rlnOpticsGroup"].to_numpy(int)
    coords = _coordinates(table)
    classes = table["rlnClassNumber"].to_numpy(int) if "rlnClassNumber" in table else None
    skip = set(CORE_COLUMNS) | set(star.optics.columns) | {SOURCE_ROW}
    extras = [(col, _attribute_type(table[col]), table[col].tolist()) for col in table.columns
              if col not in skip]
    if coords is not None and coords["exact"]:
        extras += [(col, Float, table[col].astype(float).tolist()) for col in ("rlnCoordinateX", "rlnCoordinateY")]
    for i in range(len(star)):
        index, stack = parse_image_name(names[i])
        part = Particle()
        part.setLocation(index + 1, stack_paths[stack])
        part.setAcquisition(acqs[int(optics_groups[i])])
        setattr(part, ATTR_OPTICS_GROUP, Integer(int(optics_groups[i])))
        if ctf is not None:
            model = CTFModel(defocusU=ctf["defocus_u_A"][i], defocusV=ctf["defocus_v_A"][i],
                             defocusAngle=ctf["defocus_angle_deg"][i])
            model.setPhaseShift(float(ctf["phase_shift_deg"][i]))
            model.standardize()
            part.setCTF(model)
        if euler is not None:
            matrix = relion_to_matrix(*euler[i], *origins_px[i])
            part.setTransform(Transform(matrix))
        if coords is not None:
            coord = Coordinate(x=int(coords["x"][i]), y=int(coords["y"][i]))
            coord.setMicId(int(coords["mic_id"][i]))
            if coords["name"] is not None:
                coord.setMicName(str(coords["name"][i]))
            part.setCoordinate(coord)
            part.setMicId(int(coords["mic_id"][i]))
        if classes is not None:
            part.setClassId(int(classes[i]))
        for col, kind, values in extras:
            setattr(part, "_" + col, kind(values[i] if kind is not String else str(values[i])))
        part_set.append(part)


def _attribute_type(column: pd.Series):
    """Scipion scalar type for a STAR column."""
    if pd.api.types.is_integer_dtype(column) or pd.api.types.is_bool_dtype(column):
        return Integer
    if pd.api.types.is_float_dtype(column):
        return Float
    return String


def _coordinates(table: pd.DataFrame) -> Optional[dict]:
    """Picking coordinates (px, rounded for Scipion's integer Coordinate),
    micrograph names and ids of the rows, or None without rlnCoordinateX/Y."""
    if "rlnCoordinateX" not in table or "rlnCoordinateY" not in table:
        return None
    x, y = table["rlnCoordinateX"].to_numpy(float), table["rlnCoordinateY"].to_numpy(float)
    name = table["rlnMicrographName"].astype(str).to_numpy() if "rlnMicrographName" in table else None
    if "rlnMicrographId" in table:
        mic_id = table["rlnMicrographId"].to_numpy(int)
    elif name is not None:
        mic_id = pd.factorize(name)[0] + 1
    else:
        mic_id = np.ones(len(table), int)
    exact = bool(np.any(np.abs(x - np.round(x)) > 1e-6) or np.any(np.abs(y - np.round(y)) > 1e-6))
    return {"x": np.round(x).astype(int), "y": np.round(y).astype(int), "name": name, "mic_id": mic_id,
            "exact": exact}


def _stack_file(filename: str) -> str:
    """Absolute path of a Scipion image file name (drops ``:mrcs``-style suffixes)."""
    path = filename.split(":")[0]
    if not path.lower().endswith(MRC_EXTENSIONS):
        raise InputError(f"particle stack {path} is not an MRC stack; convert it to .mrcs first")
    return os.path.abspath(path)


def set_to_star(part_set, star_path: str, need_poses: bool = True, need_ctf: bool = True) -> str:
    """Write a SetOfParticles (or the particles of a SetOfClasses) as a RELION 3.1
    particle STAR file.

    Columns: rlnImageName, rlnImageId (the Scipion id), rlnOpticsGroup (one
    group per distinct voltage/Cs/Q0, see :class:`.optics.OpticsGrouper`),
    poses, CTF, rlnCoordinateX/Y + rlnMicrographName + rlnMicrographId from the
    particle's Coordinate, rlnClassNumber from the class id (see
    :func:`.classes.particle_class`) and every other ``_rlnX`` attribute of the
    particles as the column ``rlnX``.

    Args:
        part_set: Scipion particles (MRC stacks) or a SetOfClasses of them.
        star_path: output STAR file.
        need_poses / need_ctf: raise :class:`InputError` when the set lacks them.

    Returns:
        ``star_path``.
    """
    images = particles_of(part_set)
    if need_poses and not images.hasAlignmentProj():
        raise InputError("the input particles have no 3D projection alignment (poses)")
    if need_ctf and not images.hasCTF():
        raise InputError("the input particles have no CTF information")
    if size_of(part_set) == 0:
        raise InputError("the input particle set is empty")
    pix = float(images.getSamplingRate())
    acq = images.getAcquisition()
    if images.hasCTF() and acq.getVoltage() is None:
        raise InputError("the input particles have CTFs but no acquisition (voltage, Cs, Q0)")
    grouper = OpticsGrouper(acq, pix, int(images.getXDim()))
    rows = [_particle_row(part, pix, images.hasAlignmentProj(), images.hasCTF(), grouper)
            for part in iter_particles(part_set)]
    particles = pd.DataFrame(rows)
    if "rlnClassNumber" in particles:  # particles without a class (mixed sets) get 0
        particles["rlnClassNumber"] = particles["rlnClassNumber"].fillna(0).astype(int)
    if is_classes(part_set):
        particles = particles.sort_values("rlnImageId", kind="stable").reset_index(drop=True)
    optics = grouper.optics_table()
    write_particles(star_path, ParticleStar(particles, optics, Path(star_path).absolute()), particles)
    return star_path


def _particle_row(part, pix: float, poses: bool, ctf: bool, grouper: OpticsGrouper) -> dict:
    """One STAR row (dict) of a Scipion particle."""
    index, filename = part.getLocation()
    row = {"rlnImageName": f"{index:06d}@{_stack_file(filename)}", "rlnImageId": part.getObjId(),
           "rlnOpticsGroup": grouper.group_of(part)}
    if poses:
        rot, tilt, psi, ox, oy = matrix_to_relion(part.getTransform().getMatrix())
        row.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi,
                   rlnOriginXAngst=ox * pix, rlnOriginYAngst=oy * pix)
    if ctf:
        model = part.getCTF()
        row.update(rlnDefocusU=model.getDefocusU(), rlnDefocusV=model.getDefocusV(),
                   rlnDefocusAngle=model.getDefocusAngle(), rlnPhaseShift=model.getPhaseShift() or 0.0)
    coord = part.getCoordinate()
    if coord is not None and coord.getX() is not None and coord.getY() is not None:
        for axis, value in (("X", coord.getX()), ("Y", coord.getY())):
            exact = part.getAttributeValue(f"_rlnCoordinate{axis}", None)
            row[f"rlnCoordinate{axis}"] = (float(exact) if exact is not None and round(exact) == value
                                           else float(value))
        mic_id = coord.getMicId() or (part.getMicId() if part.hasMicId() else None)
        mic_name = coord.getMicName() or part.getAttributeValue("_rlnMicrographName", None)
        if mic_name or mic_id is not None:
            row["rlnMicrographName"] = str(mic_name) if mic_name else f"micrograph{mic_id}"
        if mic_id is not None:
            row["rlnMicrographId"] = int(mic_id)
    label = particle_class(part)
    if label is not None:
        row["rlnClassNumber"] = label
    for name, value in part.getAttributes():
        col = name[1:]
        if name.startswith("_rln") and col not in row and col not in WRITTEN_ELSEWHERE:
            row[col] = value.get()
    return row


def rows_by_image_id(star: ParticleStar) -> Optional[np.ndarray]:
    """Scipion ids of the rows of a STAR file written by :func:`set_to_star`."""
    if "rlnImageId" not in star.particles:
        return None
    return star.particles["rlnImageId"].to_numpy(int)
