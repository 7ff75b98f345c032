"""CryoSPARC ``.cs`` particle files ⇄ RELION 3.1 particle STAR tables.

A ``.cs`` file is a numpy structured array, one row per particle, read and
written with ``cryosparc-tools`` (:class:`cryosparc.dataset.Dataset`). The
conventions below were taken from cryoDRGN (``parse_pose_csparc``,
``parse_pose_star``) and pyem (``csparc2star``), which agree, and are pinned by
projection tests (``tests/test_cryosparc.py``):

* ``alignments3D/pose`` is a rotation vector (axis × angle, radians) whose
  matrix ``R = exp([pose]×)`` is the **transpose** of RELION's
  ``Euler_angles2matrix`` matrix ``A``: ``A = Rᵀ``.
* ``alignments3D/shift`` is in pixels of the particle image (``blob/psize_A``)
  with RELION's sign: ``rlnOriginX/YAngst = shift · blob/psize_A``.
* ``ctf/df1_A, df2_A`` are RELION's DefocusU/V (Å); ``ctf/df_angle_rad`` and
  ``ctf/phase_shift_rad`` are RELION's DefocusAngle/PhaseShift in radians;
  ``ctf/accel_kv, cs_mm, amp_contrast`` are the optics values; ``ctf/bfactor``
  (Å²) and ``ctf/scale`` are rlnCtfBfactor and rlnCtfScalefactor.
* ``alignments3D/class`` and ``alignments3D/split`` are 0-based; RELION's
  ``rlnClassNumber`` and ``rlnRandomSubset`` are 1-based.
* ``alignments3D/class_posterior`` ⇄ ``rlnMaxValueProbDistribution`` (our
  ``rlnGsplatClassProbability`` fills it when present).
* ``blob/sign`` is the contrast of the stored images relative to the map:
  CryoSPARC extracts particles as they are in the micrograph (protein dark,
  sign −1) and multiplies by the sign when it reads them. Our programs expect
  the map's contrast (RELION's "invert contrast" images, CTF positive at low
  frequency), so images with sign −1 are written negated into new stacks.
* ``blob/path`` starting with ``>`` is relative to the CryoSPARC project folder;
  other relative paths are tried against the project folder, the ``.cs`` file's
  folder and its parents.

Nothing is dropped: ``.cs`` fields with no RELION home travel in STAR columns
``cs/<field>`` (vector fields as ``cs/<field>.0``, ``.1``, …; their dtypes in a
``data_gsplat_cs_fields`` block), STAR columns with no ``.cs`` home travel in
``.cs`` fields ``relion/<column>``; each converter restores what the other kept.
This module reads ``.cs`` files (:func:`convert_cs_to_star`); :mod:`.cryosparc_export`
writes them (:func:`convert_star_to_cs`, re-exported here).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from . import io
from .geometry import euler_to_matrix, matrix_to_euler
from .io import InputError

CS_PREFIX = "cs/"            # STAR columns holding .cs fields without a RELION home
STAR_PREFIX = "relion/"      # .cs fields holding STAR columns without a .cs home
FIELDS_BLOCK = "gsplat_cs_fields"
IMAGE_COLUMN = "gsplatCsImage"   # the image cs2star wrote ("idx@/real/path"): are cs/blob/* still valid?
POSTERIOR_OURS = "rlnGsplatClassProbability"
POSTERIOR_RELION = "rlnMaxValueProbDistribution"
CTF_MAP = {  # .cs field → (STAR column, factor STAR/.cs)
    "ctf/df1_A": ("rlnDefocusU", 1.0), "ctf/df2_A": ("rlnDefocusV", 1.0),
    "ctf/df_angle_rad": ("rlnDefocusAngle", 180.0 / np.pi),
    "ctf/phase_shift_rad": ("rlnPhaseShift", 180.0 / np.pi),
    "ctf/bfactor": ("rlnCtfBfactor", 1.0), "ctf/scale": ("rlnCtfScalefactor", 1.0),
}
OPTICS_MAP = {"blob/psize_A": "rlnImagePixelSize", "ctf/accel_kv": "rlnVoltage",
              "ctf/cs_mm": "rlnSphericalAberration", "ctf/amp_contrast": "rlnAmplitudeContrast"}


# --------------------------------------------------------------------------- poses
def pose_to_matrix(rotvec) -> np.ndarray:
    """``(N, 3)`` CryoSPARC rotation vectors (rad) → ``(N, 3, 3)`` RELION matrices ``A = Rᵀ``."""
    from scipy.spatial.transform import Rotation
    r = Rotation.from_rotvec(np.asarray(rotvec, np.float64).reshape(-1, 3)).as_matrix()
    return np.swapaxes(r, -1, -2)


def matrix_to_pose(matrix) -> np.ndarray:
    """``(N, 3, 3)`` RELION matrices ``A`` → ``(N, 3)`` CryoSPARC rotation vectors of ``Aᵀ`` (rad)."""
    from scipy.spatial.transform import Rotation
    a = np.asarray(matrix, np.float64).reshape(-1, 3, 3)
    return Rotation.from_matrix(np.swapaxes(a, -1, -2)).as_rotvec()


def pose_to_euler(rotvec) -> np.ndarray:
    """``(N, 3)`` rotation vectors → ``(N, 3)`` RELION (rot, tilt, psi) in degrees."""
    return matrix_to_euler(pose_to_matrix(rotvec))


def euler_to_pose(euler_deg) -> np.ndarray:
    """``(N, 3)`` RELION (rot, tilt, psi) in degrees → ``(N, 3)`` rotation vectors (rad)."""
    e = np.asarray(euler_deg, np.float64).reshape(-1, 3)
    return matrix_to_pose(euler_to_matrix(e[:, 0], e[:, 1], e[:, 2]))


# --------------------------------------------------------------------------- reading .cs
def load_cs(path, passthrough: Sequence = ()):
    """Read a ``.cs`` file and add the fields of passthrough ``.cs`` files (matched by ``uid``;
    fields already in the main file win).

    Returns:
        a :class:`cryosparc.dataset.Dataset`.
    """
    ds = _load_one(path)
    for extra in passthrough:
        other = _load_one(extra)
        new = [f for f in other.fields() if f not in ds.fields()]
        if not new:
            continue
        order = np.argsort(other["uid"], kind="stable")
        pos = np.searchsorted(other["uid"], ds["uid"], sorter=order)
        pos = np.clip(pos, 0, len(order) - 1)
        rows = order[pos]
        missing = other["uid"][rows] != ds["uid"]
        if missing.any():
            raise InputError(f"{extra}: {int(missing.sum())} of {len(ds)} particles of {path} are missing")
        ds.add_fields([(f, *_descr(other, f)[1:]) for f in new])
        for f in new:
            ds[f][:] = other[f][rows]
    return ds


def _load_one(path):
    from cryosparc.dataset import Dataset
    path = Path(path)
    if not path.is_file():
        raise InputError(f".cs file not found: {path}")
    try:
        ds = Dataset.load(str(path))
    except Exception as exc:  # numpy and cryosparc-tools raise assorted errors on bad files
        raise InputError(f"cannot read {path} as a CryoSPARC .cs file: {str(exc).splitlines()[0]}") from None
    if len(ds) == 0:
        raise InputError(f"{path}: no particles")
    return ds


def _descr(ds, field: str) -> tuple:
    """``(field, dtype str, shape)`` of one field ("O" for strings)."""
    for d in ds.descr():
        if d[0] == field:
            return (field, d[1], tuple(d[2]) if len(d) > 2 else ())
    raise KeyError(field)


def find_project_dir(cs_path, rel_path: str) -> Optional[Path]:
    """The folder, among the ``.cs`` file's folder and its parents (4 levels), in which
    ``rel_path`` exists (a CryoSPARC project folder holds ``J*/`` job folders)."""
    d = Path(cs_path).absolute().parent
    for _ in range(5):
        if (d / rel_path).exists():
            return d
        d = d.parent
    return None


def resolve_blob_paths(paths, cs_path, project_dir=None) -> dict:
    """Map every distinct ``blob/path`` to an existing absolute file.

    ``>rel`` is relative to the project folder (``project_dir``, else found by
    :func:`find_project_dir`); other relative paths are tried against the project
    folder, the ``.cs`` folder and its parents, then the current folder.

    Raises:
        InputError: a stack that cannot be found (naming ``--project-dir``).
    """
    out = {}
    for p in np.unique(np.asarray(paths, dtype=object).astype(str)):
        rel = p[1:] if p.startswith(">") else p
        if os.path.isabs(rel):
            cands = [Path(rel)]
        else:
            base = Path(project_dir) if project_dir else find_project_dir(cs_path, rel)
            cands = [c for c in (base / rel if base else None, Path(cs_path).absolute().parent / rel,
                                 Path(rel)) if c is not None]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            where = f"project folder {project_dir}" if project_dir else \
                "the .cs folder or its parents (give the CryoSPARC project folder with --project-dir)"
            raise InputError(f"particle stack {p!r} not found under {where}")
        out[p] = str(hit.absolute())
    return out


# --------------------------------------------------------------------------- .cs → STAR
def optics_groups(keys: pd.DataFrame) -> np.ndarray:
    """1-based optics group of each row: one group per distinct combination of the
    key columns (pixel size, box, voltage, Cs, Q0, exposure group), numbered in
    order of first appearance."""
    if keys.shape[1] == 0:
        return np.ones(len(keys), int)
    return keys.groupby(list(keys.columns), sort=False).ngroup().to_numpy() + 1


def short_float32(values) -> np.ndarray:
    """float32 values as the float64 numbers with the fewest significant digits (6 to 9)
    that round back to the same float32, so a STAR file shows ``2.7`` and not
    ``2.70000004768`` while keeping every bit."""
    v32 = np.asarray(values, np.float32)
    v = v32.astype(np.float64)
    out = v.copy()
    todo = np.isfinite(v) & (v != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        exp10 = np.floor(np.log10(np.abs(np.where(todo, v, 1.0))))
    for digits in range(6, 10):
        scale = 10.0 ** (digits - 1 - exp10)
        cand = np.round(v * scale) / scale
        ok = todo & (cand.astype(np.float32) == v32)
        out[ok] = cand[ok]
        todo &= ~ok
    return out


def _as_float(ds, field: str, factor: float = 1.0) -> np.ndarray:
    """A float32 field as float64 (shortest decimal form when ``factor`` is 1)."""
    v = np.asarray(ds[field])
    return short_float32(v) if factor == 1.0 and v.dtype == np.float32 else v.astype(np.float64) * factor


def _flat_columns(ds, field: str) -> dict:
    """``{STAR column: values}`` for one carried field (vector fields split per component)."""
    name, dtype, shape = _descr(ds, field)
    values = ds[field]
    if not shape:
        return {CS_PREFIX + name: np.asarray(values).astype(str) if dtype == "|O" else
                short_float32(values) if np.asarray(values).dtype == np.float32 else values}
    flat = np.asarray(values).reshape(len(values), -1)
    if flat.dtype == np.float32:
        flat = short_float32(flat)
    return {f"{CS_PREFIX}{name}.{k}": flat[:, k] for k in range(flat.shape[1])}


def cs_to_tables(ds, cs_path, project_dir=None):
    """Convert a Dataset into RELION tables (image names not yet written).

    Returns:
        ``(particles, optics, fields, stacks, index, sign)``: the particle table
        (every column but ``rlnImageName``), the optics table, the carried
        fields' table (name, dtype, shape), the absolute stack of each row,
        its 0-based index and ``blob/sign`` (+1 where the file has none).
    """
    fields = list(ds.fields())
    for need in ("blob/path", "blob/idx", "blob/psize_A"):
        if need not in fields:
            raise InputError(f"{cs_path}: no {need} field (is this a particle .cs file?)")
    n = len(ds)
    paths = np.asarray(ds["blob/path"]).astype(str)
    resolved = resolve_blob_paths(paths, cs_path, project_dir)
    stacks = np.array([resolved[p] for p in paths], dtype=object)
    index = np.asarray(ds["blob/idx"], np.int64)
    sign = np.asarray(ds["blob/sign"], np.float64) if "blob/sign" in fields else np.ones(n)
    if not np.isin(sign, (-1.0, 1.0)).all():
        raise InputError(f"{cs_path}: blob/sign must be +1 or -1 (found {np.unique(sign)[:5]})")
    used = {"uid", "blob/path", "blob/idx", "blob/sign"}  # carried explicitly below
    p = {}
    relion = [f for f in fields if f.startswith(STAR_PREFIX)]
    for f in relion:
        p[f[len(STAR_PREFIX):]] = np.asarray(ds[f]).astype(str) if _descr(ds, f)[1] == "|O" else ds[f]
    used.update(relion)
    for f, col in OPTICS_MAP.items():
        if f in fields:
            p.setdefault(col, _as_float(ds, f))
            used.add(f)
    if "blob/shape" in fields:
        shape = np.asarray(ds["blob/shape"]).reshape(n, -1)
        if (shape[:, 0] != shape[:, -1]).any():
            raise InputError(f"{cs_path}: images are not square (blob/shape {shape[0]})")
        p.setdefault("rlnImageSize", shape[:, 0].astype(int))
        used.add("blob/shape")
    for f, (col, factor) in CTF_MAP.items():
        if f in fields:
            p.setdefault(col, _as_float(ds, f, factor))
            used.add(f)
    if "alignments3D/pose" in fields:
        e = pose_to_euler(ds["alignments3D/pose"])
        for k, col in enumerate(io.POSE_COLUMNS):
            p.setdefault(col, e[:, k])
        used.add("alignments3D/pose")
    if "alignments3D/shift" in fields:
        sh = np.asarray(ds["alignments3D/shift"], np.float64).reshape(n, 2)
        psize = short_float32(ds["blob/psize_A"])  # the value the STAR shows, so Å / psize gives px back
        p.setdefault("rlnOriginXAngst", sh[:, 0] * psize)
        p.setdefault("rlnOriginYAngst", sh[:, 1] * psize)
        used.add("alignments3D/shift")
    if "alignments3D/class" in fields:
        p.setdefault("rlnClassNumber", np.asarray(ds["alignments3D/class"], np.int64) + 1)
        used.add("alignments3D/class")
    if "alignments3D/class_posterior" in fields:
        if POSTERIOR_OURS not in p:  # ours came back through relion/, so did RELION's
            p.setdefault(POSTERIOR_RELION, _as_float(ds, "alignments3D/class_posterior"))
        used.add("alignments3D/class_posterior")
    split = next((f for f in ("alignments3D/split", "split") if f in fields), None)
    if split is not None and np.isin(ds[split], (0, 1)).all():
        p.setdefault("rlnRandomSubset", np.asarray(ds[split], np.int64) + 1)
        used.add(split)
    carried = ["uid", "blob/path", "blob/idx"] + (["blob/sign"] if "blob/sign" in fields else []) \
        + [f for f in fields if f not in used]
    for f in carried:
        p.update(_flat_columns(ds, f))
    table = pd.DataFrame(p)
    ftab = pd.DataFrame([_descr(ds, f) for f in carried], columns=["csField", "csDtype", "csShape"])
    ftab["csShape"] = ftab["csShape"].map(lambda s: "x".join(map(str, s)) if s else "1")
    if "rlnOpticsGroup" not in table:
        keys = [c for c in ("rlnImagePixelSize", "rlnImageSize", "rlnVoltage", "rlnSphericalAberration",
                            "rlnAmplitudeContrast", CS_PREFIX + "ctf/exp_group_id") if c in table]
        table["rlnOpticsGroup"] = optics_groups(table[keys])
    optics = _optics_table(table)
    return table, optics, ftab, stacks, index, sign


def _optics_table(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in io.OPTICS_COLUMNS if c in table]
    optics = table.groupby("rlnOpticsGroup", sort=True)[cols].first().reset_index()
    if "rlnOpticsGroupName" not in optics:
        optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]])
    if "rlnImageDimensionality" not in optics:
        optics["rlnImageDimensionality"] = 2
    return optics


def per_stack(stacks, fn) -> np.ndarray:
    """``fn`` of each row's stack path, computed once per distinct stack (``(N,)`` object array)."""
    codes, uniques = pd.factorize(pd.Series(stacks, dtype=object))
    return np.array([fn(u) for u in uniques], dtype=object)[codes]


def rows_by_stack(stacks, mask):
    """``(stack, rows)`` for each distinct stack among the rows ``mask``, sorted by stack
    (O(rows log rows), one pass)."""
    rows = np.flatnonzero(mask)
    codes, uniques = pd.factorize(pd.Series(stacks[rows], dtype=object), sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    return [(uniques[k], rows[order[bounds[k]:bounds[k + 1]]]) for k in range(len(uniques))]


def image_names(index, stacks, fn, fmt: str = "{}") -> np.ndarray:
    """RELION image names ``<index+1>@<fn(stack)>`` of every row, with ``fmt`` for the number."""
    numbers = pd.Series(np.asarray(index, np.int64) + 1).map(fmt.format) if fmt != "{}" else \
        pd.Series(np.asarray(index, np.int64) + 1).astype(str)
    return (numbers + "@" + pd.Series(per_stack(stacks, fn))).to_numpy(dtype=object)


def _unique_name(folder: Path, stem: str, suffix: str, taken: set) -> Path:
    k, name = 1, f"{stem}{suffix}"
    while name in taken:
        k += 1
        name = f"{stem}_{k}{suffix}"
    taken.add(name)
    return folder / name


def convert_cs_to_star(cs_path, out_star, project_dir=None, passthrough: Sequence = (),
                       contrast: str = "flip", links: bool = True, stack_dir=None,
                       log: Callable = print) -> dict:
    """Write a RELION 3.1 particle STAR file for a CryoSPARC ``.cs`` file.

    Args:
        cs_path: particle ``.cs`` file.
        out_star: output STAR file.
        project_dir: CryoSPARC project folder (for ``>`` and project-relative paths).
        passthrough: further ``.cs`` files whose extra fields are merged by uid.
        contrast: ``flip``: images with ``blob/sign`` −1 are written negated into
            ``stack_dir`` (the map's contrast, as our programs expect); ``keep``:
            images are used as they are.
        links: refer to ``.mrc`` stacks through ``.mrcs`` links in ``stack_dir``
            (RELION reads ``n@file`` only from ``.mrcs``).
        stack_dir: folder for negated stacks and links (default
            ``<out_star stem>_stacks`` beside the STAR file).

    Returns:
        a summary dict (particles, optics groups, flipped, links, stacks written).
    """
    out_star = Path(out_star).absolute()
    ds = load_cs(cs_path, passthrough)
    table, optics, ftab, stacks, index, sign = cs_to_tables(ds, cs_path, project_dir)
    inputs = {os.path.realpath(p) for p in [cs_path, *passthrough, *set(stacks)]}
    if os.path.realpath(out_star) in inputs:
        raise InputError(f"output {out_star} is one of the inputs; choose another name")
    stack_dir = Path(stack_dir).absolute() if stack_dir else out_star.parent / f"{out_star.stem}_stacks"
    # validate stacks, indices and box through the STAR reader of the programs
    raw = io.ParticleStar(table.assign(rlnImageName=image_names(index, stacks, str)),
                          optics, Path(cs_path).absolute())
    if "rlnImageSize" not in raw.particles:
        raw.particles["rlnImageSize"] = 0
    reader = io.ImageReader(raw)
    reader.check()  # stacks readable, indices in range, one box per optics group
    reader.close()
    if "rlnImageSize" not in optics:
        optics = _optics_table(table.assign(rlnImageSize=raw.particles["rlnImageSize"].to_numpy()))
    flip = (sign < 0) & (contrast == "flip")
    if contrast == "keep" and (sign < 0).any():
        log(f"warning: {int((sign < 0).sum())} particles have blob/sign -1 (protein dark); they are "
            f"used as they are, but gsplat programs expect the map's contrast")
    new_stack = stacks.copy()
    new_index = index.copy()
    taken, written, linked = set(), [], 0
    if flip.any():
        written = _write_flipped(raw, flip, stacks, index, sign, stack_dir, taken, inputs,
                                 new_stack, new_index, log)
    if links:
        for s, rows in rows_by_stack(stacks, ~flip):
            if s.endswith(".mrc"):
                link = _unique_name(stack_dir, Path(s).stem, ".mrcs", taken)
                _make_link(link, s)
                new_stack[rows] = str(link)
                linked += 1
    table.insert(0, "rlnImageName", image_names(new_index, new_stack, lambda s: os.path.relpath(s, out_star.parent),
                                                "{:06d}"))
    table[IMAGE_COLUMN] = image_names(new_index, new_stack, os.path.realpath)
    parts = table.drop(columns=[c for c in optics.columns if c in table and c != "rlnOpticsGroup"])
    io.write_star(out_star, {"optics": optics, "particles": parts, FIELDS_BLOCK: ftab}, float_format=None)
    summary = {"particles": len(table), "optics_groups": len(optics), "flipped": int(flip.sum()),
               "flipped_stacks": len(written), "links": linked,
               "poses": "alignments3D/pose" in ds.fields(), "ctf": "ctf/df1_A" in ds.fields()}
    return summary


def _write_flipped(raw: io.ParticleStar, flip, stacks, index, sign, stack_dir, taken, inputs,
                   new_stack, new_index, log, chunk: int = 256) -> list:
    """Write the images of the rows ``flip`` multiplied by their sign, one ``.mrcs`` per source
    stack (only the images used, in order, at the stack's own pixel size and box), and point
    ``new_stack/new_index`` at them."""
    p = raw.particles
    written = []
    for s, rows in rows_by_stack(stacks, flip):
        _, first_pos, inverse = np.unique(index[rows], return_index=True, return_inverse=True)
        first = rows[first_pos]
        pix, box = float(p["rlnImagePixelSize"].iloc[first[0]]), int(p["rlnImageSize"].iloc[first[0]])
        one = io.ParticleStar(p.iloc[first].assign(rlnOpticsGroup=1).reset_index(drop=True),
                              raw.optics.iloc[:1].assign(rlnOpticsGroup=1), raw.path)
        reader = io.ImageReader(one)  # one stack, one group: images as stored, no resampling
        out = _unique_name(stack_dir, Path(s).stem + "_flipped", ".mrcs", taken)
        if os.path.realpath(out) in inputs:
            raise InputError(f"{out} would overwrite an input stack; choose another --stack-dir")
        with io.StackWriter(out, len(first), box, pix) as writer:
            for start in range(0, len(first), chunk):
                sel = np.arange(start, min(start + chunk, len(first)))
                writer.write(start, reader.read(sel) * sign[first[sel], None, None].astype(np.float32))
        reader.close()
        new_stack[rows] = str(out)
        new_index[rows] = inverse
        written.append(str(out))
    log(f"  {int(flip.sum())} images with blob/sign -1 written with the map's contrast "
        f"into {len(written)} stack(s) in {stack_dir}")
    return written


def _make_link(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if os.path.islink(link):
        if os.path.realpath(link) == os.path.realpath(target):
            return
        os.unlink(link)
    elif link.exists():
        raise InputError(f"{link} exists and is not a link; choose another --stack-dir")
    os.symlink(target, link)


from .cryosparc_export import convert_star_to_cs, star_labels, star_to_dataset  # noqa: E402,F401
