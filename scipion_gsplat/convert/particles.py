"""SetOfParticles ↔ RELION 3.1 particle STAR files.

The programs read and write STAR + MRC only; protocols use these two functions
to hand particles over and to take them back:

* :func:`star_to_set` fills a SetOfParticles from a normalised
  :class:`~scipion_gsplat.core.io.ParticleStar` (poses → projection alignment,
  CTF, acquisition, half set and class number as extra attributes);
* :func:`set_to_star` writes a SetOfParticles as a RELION 3.1 STAR file whose
  rows follow the set's id order and carry the Scipion id in ``rlnImageId``, so
  a program's output rows can be matched back to the particles.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from pwem.objects import CTFModel, Particle, Transform
from pyworkflow.object import Integer

from ..constants import ATTR_CLASS_NUMBER, ATTR_RANDOM_SUBSET
from ..core.io import InputError, ParticleStar, parse_image_name, write_particles
from .alignment import matrix_to_relion, relion_to_matrix

MRC_EXTENSIONS = (".mrc", ".mrcs", ".st", ".map", ".ali")


def star_to_set(star: ParticleStar, part_set, stack_paths: dict) -> None:
    """Append every STAR row as a Particle to ``part_set``.

    Args:
        star: normalised particle table.
        part_set: an empty SetOfParticles (acquisition and sampling rate are set here).
        stack_paths: maps each stack name in ``rlnImageName`` to the path the
            particle should point to (e.g. a link inside the protocol folder).
    """
    p0 = star.particles.iloc[0]
    pix = star.pixel_size
    part_set.setSamplingRate(pix)
    acq = part_set.getAcquisition()
    if "rlnVoltage" in star.particles:
        acq.setVoltage(float(p0["rlnVoltage"]))
        acq.setSphericalAberration(float(p0["rlnSphericalAberration"]))
        acq.setAmplitudeContrast(float(p0["rlnAmplitudeContrast"]))
    acq.setMagnification(10000.0)
    part_set.setHasCTF(star.has_ctf)
    if star.has_poses:
        part_set.setAlignmentProj()
    euler = star.euler_deg() if star.has_poses else None
    origins_px = star.shifts_A() / pix
    ctf = star.ctf_params() if star.has_ctf else None
    halves = star.particles["rlnRandomSubset"].to_numpy(int) if "rlnRandomSubset" in star.particles else None
    classes = star.particles["rlnClassNumber"].to_numpy(int) if "rlnClassNumber" in star.particles else None
    names = star.particles["rlnImageName"].astype(str).to_numpy()
    for i in range(len(star)):
        index, stack = parse_image_name(names[i])
        part = Particle()
        part.setLocation(index + 1, stack_paths[stack])
        if ctf is not None:
            model = CTFModel(defocusU=ctf["defocus_u_A"][i], defocusV=ctf["defocus_v_A"][i],
                             defocusAngle=ctf["defocus_angle_deg"][i])
            model.setPhaseShift(float(ctf["phase_shift_deg"][i]))
            model.standardize()
            part.setCTF(model)
        if euler is not None:
            matrix = relion_to_matrix(*euler[i], *origins_px[i])
            part.setTransform(Transform(matrix))
        if halves is not None:
            setattr(part, ATTR_RANDOM_SUBSET, Integer(int(halves[i])))
        if classes is not None:
            setattr(part, ATTR_CLASS_NUMBER, Integer(int(classes[i])))
        part_set.append(part)


def _stack_file(filename: str) -> str:
    """Absolute path of a Scipion image file name (drops ``:mrcs``-style suffixes)."""
    path = filename.split(":")[0]
    if not path.lower().endswith(MRC_EXTENSIONS):
        raise InputError(f"particle stack {path} is not an MRC stack; convert it to .mrcs first")
    return os.path.abspath(path)


def set_to_star(part_set, star_path: str, need_poses: bool = True, need_ctf: bool = True) -> str:
    """Write a SetOfParticles as a RELION 3.1 particle STAR file.

    Args:
        part_set: Scipion particles (MRC stacks).
        star_path: output STAR file.
        need_poses / need_ctf: raise :class:`InputError` when the set lacks them.

    Returns:
        ``star_path``.
    """
    if need_poses and not part_set.hasAlignmentProj():
        raise InputError("the input particles have no 3D projection alignment (poses)")
    if need_ctf and not part_set.hasCTF():
        raise InputError("the input particles have no CTF information")
    if part_set.getSize() == 0:
        raise InputError("the input particle set is empty")
    pix = float(part_set.getSamplingRate())
    acq = part_set.getAcquisition()
    if part_set.hasCTF() and acq.getVoltage() is None:
        raise InputError("the input particles have CTFs but no acquisition (voltage, Cs, Q0)")
    rows = []
    for part in part_set.iterItems(orderBy="id"):
        index, filename = part.getLocation()
        row = {"rlnImageName": f"{index:06d}@{_stack_file(filename)}", "rlnImageId": part.getObjId(),
               "rlnOpticsGroup": 1}
        if part_set.hasAlignmentProj():
            rot, tilt, psi, ox, oy = matrix_to_relion(part.getTransform().getMatrix())
            row.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi,
                       rlnOriginXAngst=ox * pix, rlnOriginYAngst=oy * pix)
        if part_set.hasCTF():
            ctf = part.getCTF()
            row.update(rlnDefocusU=ctf.getDefocusU(), rlnDefocusV=ctf.getDefocusV(),
                       rlnDefocusAngle=ctf.getDefocusAngle(), rlnPhaseShift=ctf.getPhaseShift() or 0.0)
        for attr, col in ((ATTR_RANDOM_SUBSET, "rlnRandomSubset"), (ATTR_CLASS_NUMBER, "rlnClassNumber")):
            if hasattr(part, attr):
                row[col] = int(getattr(part, attr).get())
        rows.append(row)
    particles = pd.DataFrame(rows)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
        "rlnMicrographOriginalPixelSize": [pix],
        "rlnVoltage": [float(acq.getVoltage() or 0.0)],
        "rlnSphericalAberration": [float(acq.getSphericalAberration() or 0.0)],
        "rlnAmplitudeContrast": [float(acq.getAmplitudeContrast() or 0.0)],
        "rlnImagePixelSize": [pix], "rlnImageSize": [int(part_set.getXDim())],
        "rlnImageDimensionality": [2],
    })
    write_particles(star_path, ParticleStar(particles, optics, Path(star_path).absolute()), particles)
    return star_path


def rows_by_image_id(star: ParticleStar) -> Optional[np.ndarray]:
    """Scipion ids of the rows of a STAR file written by :func:`set_to_star`."""
    if "rlnImageId" not in star.particles:
        return None
    return star.particles["rlnImageId"].to_numpy(int)
