"""RELION particle STAR tables → CryoSPARC ``.cs`` files (the reverse of
:func:`.cryosparc.convert_cs_to_star`; conventions in :mod:`.cryosparc`).

Particles that came from CryoSPARC get their ``uid``, image path/index and
``blob/sign`` back while they still show the images ``gsplat_cs2star`` wrote for
them; STAR columns with no ``.cs`` home become ``relion/<column>`` fields.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from . import io
from .cryosparc import (CS_PREFIX, CTF_MAP, FIELDS_BLOCK, IMAGE_COLUMN, OPTICS_MAP, POSTERIOR_OURS,
                        POSTERIOR_RELION, STAR_PREFIX, euler_to_pose, image_names, optics_groups, per_stack)
from .io import InputError

def star_labels(path) -> set:
    """Every column label written in a STAR file (all blocks), without the ``_``."""
    labels = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("_"):
                labels.add(line.split()[0][1:])
    return labels


def _field_types(star: io.ParticleStar) -> dict:
    """``{field: (dtype, shape)}`` from the ``data_gsplat_cs_fields`` block, if any."""
    tab = star.extra_tables.get(FIELDS_BLOCK)
    if tab is None or "csField" not in tab:
        return {}
    return {str(r.csField): (str(r.csDtype), () if str(r.csShape) == "1" else
                             tuple(int(x) for x in str(r.csShape).split("x")))
            for r in tab.itertuples()}


def _guess_type(values: np.ndarray) -> str:
    """dtype of a carried field whose type table was lost: CryoSPARC stores float32,
    uint32 (uint64 for large values) and strings."""
    if values.dtype.kind == "f":
        return "<f4"
    if values.dtype.kind in "iu":
        return "<u8" if values.size and values.max() >= 2 ** 32 else ("<u4" if values.min(initial=0) >= 0
                                                                         else "<i8")
    return "O"


def _carried_fields(parts: pd.DataFrame, types: dict) -> dict:
    """``{field: (dtype, values)}`` of the ``cs/`` STAR columns (vector components joined)."""
    groups: dict = {}
    for col in parts.columns:
        if not col.startswith(CS_PREFIX):
            continue
        name = col[len(CS_PREFIX):]
        m = re.fullmatch(r"(.+)\.(\d+)", name)
        if m and (m.group(1) in types or name not in types):
            groups.setdefault(m.group(1), []).append((int(m.group(2)), col))
        else:
            groups.setdefault(name, []).append((0, col))
    out = {}
    for name, cols in groups.items():
        cols = [c for _, c in sorted(cols)]
        vals = parts[cols].to_numpy() if len(cols) > 1 else parts[cols[0]].to_numpy()
        dtype = types.get(name, (None,))[0] or _guess_type(np.asarray(vals))
        if dtype in ("|O", "O"):
            out[name] = ("O", np.asarray(vals).astype(str).astype(object))
        else:
            out[name] = (dtype, np.asarray(vals).astype(dtype))
    return out


def _uid_seed(names) -> int:
    h = hashlib.sha256("\n".join(map(str, names)).encode()).digest()
    return int.from_bytes(h[:8], "little")


def _blob_fields(star: io.ParticleStar, reader, carried: dict, project_dir) -> dict:
    """blob/path, blob/idx, blob/sign: the original CryoSPARC ones where the row still shows
    the image cs2star wrote for it, else the STAR's own image (sign +1)."""
    p = star.particles
    n = len(p)
    stacks = np.asarray(reader.stacks, dtype=object)
    current = image_names(reader.index, stacks, os.path.realpath)
    keep = np.zeros(n, bool)
    if IMAGE_COLUMN in p and all(f in carried for f in ("blob/path", "blob/idx")):
        keep = p[IMAGE_COLUMN].astype(str).to_numpy() == current
    def cs_path(stack):
        real = os.path.realpath(stack)
        if project_dir and real.startswith(os.path.realpath(project_dir) + os.sep):
            return ">" + os.path.relpath(real, os.path.realpath(project_dir))
        return real

    paths = per_stack(stacks, cs_path)
    path = np.where(keep, carried["blob/path"][1] if keep.any() else "", paths)
    idx = np.where(keep, carried["blob/idx"][1] if keep.any() else 0, reader.index).astype(np.uint32)
    sign = np.ones(n, np.float32)
    if "blob/sign" in carried and keep.any():
        sign = np.where(keep, carried["blob/sign"][1], sign).astype(np.float32)
    return {"blob/path": ("O", path.astype(object)), "blob/idx": ("<u4", idx), "blob/sign": ("<f4", sign)}


def star_to_dataset(star: io.ParticleStar, labels: set, project_dir=None):
    """Convert a normalised particle table into a CryoSPARC Dataset.

    Args:
        star: table from :func:`io.read_particles` (image stacks must exist).
        labels: column labels present in the file (:func:`star_labels`): CTF
            columns that ``read_particles`` filled with defaults are not written
            for files that came from CryoSPARC.
        project_dir: write stack paths under this CryoSPARC project folder as ``>relative``.

    Returns:
        ``(dataset, unmapped)``: the Dataset and the STAR columns kept as ``relion/`` fields.
    """
    from cryosparc.dataset import Dataset
    reader = io.ImageReader(star)
    reader.check()
    p = star.particles
    n = len(p)
    types = _field_types(star)
    carried = _carried_fields(p, types)
    from_cs = "uid" in carried
    f: dict = {}  # field → (dtype, values)
    f.update(_blob_fields(star, reader, carried, project_dir))
    box = p["rlnImageSize"].to_numpy(np.uint32)
    f["blob/shape"] = ("<u4", np.stack([box, box], axis=1))
    consumed = {"rlnImageName", "rlnImageSize", IMAGE_COLUMN, io.SOURCE_ROW} | {c for c in p if c.startswith(CS_PREFIX)}
    for field, col in OPTICS_MAP.items():
        if col in p:
            f[field] = ("<f4", p[col].to_numpy(np.float32))
            consumed.add(col)
    for field, (col, factor) in CTF_MAP.items():
        if col in p and (col in labels or not from_cs):
            f[field] = ("<f4", (p[col].to_numpy(np.float64) / factor).astype(np.float32))
        consumed.add(col)  # default-filled columns were not in the file
    if star.has_poses:
        f["alignments3D/pose"] = ("<f4", euler_to_pose(star.euler_deg()).astype(np.float32))
        f["alignments3D/shift"] = ("<f4", (star.shifts_A() / p["rlnImagePixelSize"].to_numpy(float)[:, None])
                                   .astype(np.float32))
        consumed.update(io.POSE_COLUMNS + ("rlnOriginXAngst", "rlnOriginYAngst"))
    elif (p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() == 0).all() and \
            "rlnOriginXAngst" not in labels and "rlnOriginX" not in labels:
        consumed.update(("rlnOriginXAngst", "rlnOriginYAngst"))  # zeros filled by read_particles
    if "rlnClassNumber" in p and (p["rlnClassNumber"].to_numpy() >= 1).all():
        f["alignments3D/class"] = ("<u4", p["rlnClassNumber"].to_numpy(np.int64) - 1)
        consumed.add("rlnClassNumber")
    post = POSTERIOR_OURS if POSTERIOR_OURS in p else (POSTERIOR_RELION if POSTERIOR_RELION in p else None)
    if post is not None:
        f["alignments3D/class_posterior"] = ("<f4", p[post].to_numpy(np.float32))
        if post == POSTERIOR_RELION:  # ours absent: RELION's comes back from the posterior
            consumed.add(POSTERIOR_RELION)
    if "rlnRandomSubset" in p and np.isin(p["rlnRandomSubset"].to_numpy(), (1, 2)).all():
        f["alignments3D/split"] = ("<u4", p["rlnRandomSubset"].to_numpy(np.int64) - 1)
        consumed.add("rlnRandomSubset")
    if "ctf/exp_group_id" not in carried:
        f["ctf/exp_group_id"] = ("<u4", p["rlnOpticsGroup"].to_numpy(np.int64))
    if from_cs:  # optics numbering/naming that cs2star regenerates need no relion/ copy
        keys = [c for c in ("rlnImagePixelSize", "rlnImageSize", "rlnVoltage", "rlnSphericalAberration",
                            "rlnAmplitudeContrast") if c in p]
        key_df = p[keys].copy()
        if "ctf/exp_group_id" in carried:
            key_df["exp"] = carried["ctf/exp_group_id"][1]
        if (optics_groups(key_df) == p["rlnOpticsGroup"].to_numpy()).all():
            consumed.add("rlnOpticsGroup")
            if "rlnOpticsGroupName" in p and (p["rlnOpticsGroupName"].astype(str) ==
                                              "opticsGroup" + p["rlnOpticsGroup"].astype(str)).all():
                consumed.add("rlnOpticsGroupName")
        if "rlnImageDimensionality" in p and (p["rlnImageDimensionality"] == 2).all():
            consumed.add("rlnImageDimensionality")
    for name, tv in carried.items():
        f.setdefault(name, tv)
    unmapped = [c for c in p.columns if c not in consumed]
    for col in unmapped:
        v = p[col].to_numpy()
        f[STAR_PREFIX + col] = ("O", v.astype(str).astype(object)) if v.dtype.kind not in "fiub" \
            else (v.dtype.str, v)
    uid = carried["uid"][1].astype(np.uint64) if from_cs else \
        np.random.default_rng(_uid_seed(p["rlnImageName"])).integers(1, 2 ** 63, n, dtype=np.uint64)
    descr = [(k, dt, np.asarray(v).shape[1:]) if np.asarray(v).ndim > 1 else (k, dt)
             for k, (dt, v) in f.items() if k != "uid"]
    ds = Dataset.allocate(n, descr)
    ds["uid"] = uid
    for k, (_, v) in f.items():
        if k != "uid":
            ds[k] = v
    return ds, unmapped


def convert_star_to_cs(star_path, out_cs, project_dir=None, star: Optional[io.ParticleStar] = None,
                       **read_options) -> dict:
    """Write a CryoSPARC ``.cs`` file (numpy format, as CryoSPARC writes) for a RELION
    particle STAR file.

    Args:
        star_path: particle STAR file.
        out_cs: output ``.cs`` file.
        project_dir: CryoSPARC project folder: stacks inside it are written ``>relative``.
        star: the file already read (else read with ``read_options`` of :func:`io.read_particles`).

    Returns:
        a summary dict (particles, fields, STAR columns kept as ``relion/`` fields).
    """
    star_path = Path(star_path)
    if star is None:
        star = io.read_particles(star_path, **read_options)
    inputs = {os.path.realpath(star_path)} | {os.path.realpath(s) for s in io.ImageReader(star).stack_files()}
    if os.path.realpath(out_cs) in inputs:
        raise InputError(f"the output {out_cs} would overwrite an input; choose another name")
    ds, unmapped = star_to_dataset(star, star_labels(star_path), project_dir)
    with io.atomic_path(out_cs) as tmp:
        with open(tmp, "wb") as fh:
            ds.save(fh)
    return {"particles": len(ds), "fields": len(ds.fields()), "relion_fields": unmapped}
