"""File I/O: RELION STAR particle tables, MRC maps and stacks, atomic writes.

STAR files are read and written with ``starfile`` (RELION 3.0 single table and
RELION 3.1 optics + particles tables), MRC files with ``mrcfile``. Every writer
writes to a temporary name beside the target and renames it at the end, so a
killed program never leaves a half-written output under the final name.

Particle tables are normalised on reading (:func:`read_particles`):

* optics-group columns are merged into the particle rows;
* shifts are always ``rlnOriginXAngst/YAngst`` in Å (RELION 3.0 pixel shifts
  ``rlnOriginX/Y`` are converted);
* optional CTF columns missing from the file get RELION's defaults
  (phase shift 0, B-factor 0, scale 1, astigmatism angle 0, ``DefocusV =
  DefocusU``), never NaN.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import mrcfile
import numpy as np
import pandas as pd
import starfile

from .geometry import euler_to_matrix


class InputError(ValueError):
    """Bad user input: programs print the message on one line and exit non-zero."""


# Columns that belong to the optics table in RELION 3.1.
OPTICS_COLUMNS = (
    "rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
    "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality",
    "rlnMicrographOriginalPixelSize", "rlnCtfDataAreCtfPremultiplied",
)
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_COLUMNS = ("rlnDefocusU", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
CTF_DEFAULTS = {"rlnPhaseShift": 0.0, "rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0,
                "rlnDefocusAngle": 0.0}


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; rename it to ``path`` on success.

    The temporary name keeps the suffix (``.star``, ``.mrc``), so libraries that
    look at it behave. On an exception the temporary file is removed and the
    final name is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".part" + path.suffix,
                               dir=str(path.parent))
    os.close(fd)
    os.unlink(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- MRC
def read_map(path) -> tuple[np.ndarray, float]:
    """Read an MRC map.

    Returns:
        ``(volume [z, y, x] float32, pixel_size_A)``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"map not found: {path}")
    try:
        with mrcfile.open(path, permissive=True) as m:
            data = np.asarray(m.data, dtype=np.float32).copy()
            pix = float(m.voxel_size.x)
    except ValueError as exc:
        raise InputError(f"cannot read MRC file {path}: {exc}") from None
    if data.ndim != 3:
        raise InputError(f"{path} is not a 3D map (shape {data.shape})")
    return data, pix


def write_map(path, volume: np.ndarray, pixel_size_A: float) -> None:
    """Write a 3D map ``[z, y, x]`` (float32) atomically."""
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(volume, dtype=np.float32))
            m.voxel_size = pixel_size_A


def write_stack(path, images: np.ndarray, pixel_size_A: float) -> None:
    """Write an image stack ``(N, y, x)`` as an MRC stack, atomically."""
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(images, dtype=np.float32))
            m.set_image_stack()
            m.voxel_size = pixel_size_A


class StackWriter:
    """Write a large MRC stack chunk by chunk (memory-mapped), renamed on close.

    Use as a context manager; ``write(start, images)`` fills rows
    ``start:start+len(images)``.
    """

    def __init__(self, path, n_images: int, box: int, pixel_size_A: float):
        self._ctx = atomic_path(path)
        self._tmp = self._ctx.__enter__()
        self._mrc = mrcfile.new_mmap(self._tmp, shape=(n_images, box, box), mrc_mode=2,
                                     overwrite=True)
        self._mrc.set_image_stack()
        self._mrc.voxel_size = pixel_size_A

    def write(self, start: int, images: np.ndarray) -> None:
        self._mrc.data[start:start + len(images)] = images

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._mrc.update_header_stats()
        self._mrc.close()
        self._ctx.__exit__(exc_type, exc, tb)
        return False


# --------------------------------------------------------------------------- STAR
@dataclass
class ParticleStar:
    """A normalised RELION particle table.

    Attributes:
        particles: one row per particle, optics columns merged in, shifts in Å.
        optics: the optics table (one row per optics group), built for 3.0 files.
        path: the STAR file (image paths are resolved against its folder).
        extra_tables: any other data blocks, kept for writing back.
    """
    particles: pd.DataFrame
    optics: pd.DataFrame
    path: Path
    extra_tables: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def pixel_size(self) -> float:
        """Image pixel size in Å (one value for the whole set)."""
        values = np.unique(self.particles["rlnImagePixelSize"].to_numpy(float))
        if len(values) != 1:
            raise InputError(f"{self.path}: optics groups with different pixel sizes {values}")
        return float(values[0])

    @property
    def box_size(self) -> int:
        """Image box size in pixels (one value for the whole set)."""
        values = np.unique(self.particles["rlnImageSize"].to_numpy(int))
        if len(values) != 1:
            raise InputError(f"{self.path}: optics groups with different box sizes {values}")
        return int(values[0])

    @property
    def has_poses(self) -> bool:
        return all(c in self.particles for c in POSE_COLUMNS)

    @property
    def has_ctf(self) -> bool:
        return all(c in self.particles for c in CTF_COLUMNS)

    def column(self, name: str) -> np.ndarray:
        """A numeric column as float64 ``(N,)``."""
        return self.particles[name].to_numpy(dtype=np.float64)

    def euler_deg(self) -> np.ndarray:
        """``(N, 3)`` RELION angles (rot, tilt, psi) in degrees."""
        if not self.has_poses:
            raise InputError(f"{self.path}: no particle poses (rlnAngleRot/Tilt/Psi)")
        return self.particles[list(POSE_COLUMNS)].to_numpy(dtype=np.float64)

    def poses(self) -> np.ndarray:
        """``(N, 3, 3)`` RELION rotation matrices."""
        e = self.euler_deg()
        return euler_to_matrix(e[:, 0], e[:, 1], e[:, 2])

    def shifts_A(self) -> np.ndarray:
        """``(N, 2)`` origin (x, y) in Å, subtracted when projecting."""
        return self.particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64)

    def ctf_params(self) -> dict:
        """CTF parameters as float64 arrays ``(N,)`` keyed like :mod:`.ctf` expects."""
        if not self.has_ctf:
            missing = [c for c in CTF_COLUMNS if c not in self.particles]
            raise InputError(f"{self.path}: no CTF information (missing {', '.join(missing)})")
        p = self.particles
        return {
            "defocus_u_A": p["rlnDefocusU"].to_numpy(float),
            "defocus_v_A": p["rlnDefocusV"].to_numpy(float),
            "defocus_angle_deg": p["rlnDefocusAngle"].to_numpy(float),
            "voltage_kV": p["rlnVoltage"].to_numpy(float),
            "cs_mm": p["rlnSphericalAberration"].to_numpy(float),
            "amplitude_contrast": p["rlnAmplitudeContrast"].to_numpy(float),
            "phase_shift_deg": p["rlnPhaseShift"].to_numpy(float),
            "bfactor_A2": p["rlnCtfBfactor"].to_numpy(float),
            "scale": p["rlnCtfScalefactor"].to_numpy(float),
        }

    def half_set(self) -> np.ndarray:
        """``(N,)`` half-set number 1 or 2: ``rlnRandomSubset`` if present, else
        alternating (even rows → 1, odd rows → 2)."""
        if "rlnRandomSubset" in self.particles:
            h = self.particles["rlnRandomSubset"].to_numpy(int)
            if set(np.unique(h)) <= {1, 2} and len(np.unique(h)) == 2:
                return h
        return (np.arange(len(self)) % 2) + 1

    def subset(self, rows) -> "ParticleStar":
        """A new table with the given rows (boolean mask or indices)."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return ParticleStar(self.particles.iloc[rows].reset_index(drop=True),
                            self.optics, self.path, dict(self.extra_tables))


def read_particles(path, pixel_size_A: Optional[float] = None) -> ParticleStar:
    """Read a RELION 3.0 or 3.1 particle STAR file and normalise it.

    Args:
        path: STAR file.
        pixel_size_A: pixel size for RELION 3.0 files that do not give one.

    Raises:
        InputError: missing file, no particle table, no pixel size, NaN values.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"STAR file not found: {path}")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted errors on bad files
        raise InputError(f"cannot parse STAR file {path}: {exc}") from None
    blocks = {k: (v if isinstance(v, pd.DataFrame) else pd.DataFrame([v])) for k, v in blocks.items()}
    if "particles" in blocks:
        parts = blocks.pop("particles").copy()
        optics = blocks.pop("optics", None)
    else:  # RELION 3.0: one (usually unnamed) table
        key = next((k for k, v in blocks.items() if "rlnImageName" in v), None)
        if key is None:
            raise InputError(f"{path}: no particle table with rlnImageName")
        parts = blocks.pop(key).copy()
        optics = None
    if "rlnImageName" not in parts:
        raise InputError(f"{path}: particle table has no rlnImageName column")
    if len(parts) == 0:
        raise InputError(f"{path}: the particle table is empty")

    if optics is None:
        optics = _optics_from_v30(parts, path, pixel_size_A)
    else:
        optics = optics.copy()
        if "rlnOpticsGroup" not in parts:
            parts["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
        if pixel_size_A is not None:
            optics["rlnImagePixelSize"] = float(pixel_size_A)
        if "rlnImagePixelSize" not in optics:
            raise InputError(f"{path}: optics table has no rlnImagePixelSize")
    drop = [c for c in optics.columns if c in parts.columns and c != "rlnOpticsGroup"]
    parts = parts.drop(columns=drop)
    merged = parts.merge(optics, on="rlnOpticsGroup", how="left", sort=False)
    if merged["rlnImagePixelSize"].isna().any():
        raise InputError(f"{path}: particles refer to optics groups missing from the optics table")

    _normalise_shifts(merged)
    if "rlnDefocusU" in merged:
        if "rlnDefocusV" not in merged:
            merged["rlnDefocusV"] = merged["rlnDefocusU"]
        for col, default in CTF_DEFAULTS.items():
            if col not in merged:
                merged[col] = default
    if "rlnImageSize" not in merged:
        merged["rlnImageSize"] = 0  # filled from the stack by ImageReader.check
    _check_finite(merged, path)
    return ParticleStar(merged, optics.reset_index(drop=True), path, blocks)


def _optics_from_v30(parts: pd.DataFrame, path: Path, pixel_size_A) -> pd.DataFrame:
    if pixel_size_A is None:
        if "rlnImagePixelSize" in parts:
            pixel_size_A = float(parts["rlnImagePixelSize"].iloc[0])
        elif "rlnDetectorPixelSize" in parts and "rlnMagnification" in parts:
            pixel_size_A = float(parts["rlnDetectorPixelSize"].iloc[0] * 1e4
                                 / parts["rlnMagnification"].iloc[0])
        else:
            raise InputError(f"{path}: RELION 3.0 file without pixel size; give it explicitly")
    row = {"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1,
           "rlnImagePixelSize": float(pixel_size_A), "rlnImageDimensionality": 2}
    for col in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        if col in parts:
            row[col] = float(parts[col].iloc[0])
    parts["rlnOpticsGroup"] = 1
    return pd.DataFrame([row])


def _normalise_shifts(p: pd.DataFrame) -> None:
    pix = p["rlnImagePixelSize"].to_numpy(float)
    for axis in "XY":
        angst, pixels = f"rlnOrigin{axis}Angst", f"rlnOrigin{axis}"
        if angst not in p:
            p[angst] = p[pixels].to_numpy(float) * pix if pixels in p else 0.0
        if pixels in p:
            p.drop(columns=[pixels], inplace=True)


def _check_finite(p: pd.DataFrame, path: Path) -> None:
    numeric = p.select_dtypes(include=[np.number])
    bad = [c for c in numeric.columns if not np.isfinite(numeric[c].to_numpy(float)).all()]
    if bad:
        raise InputError(f"{path}: NaN or infinite values in column(s) {', '.join(bad)}")


def write_particles(path, star: ParticleStar, particles: Optional[pd.DataFrame] = None) -> None:
    """Write a RELION 3.1 particle STAR file (optics + particles), atomically.

    Args:
        path: output file.
        star: the table the particles came from (gives the optics table).
        particles: rows to write (default ``star.particles``); optics columns
            merged in by :func:`read_particles` are moved back to the optics table.
    """
    parts = (star.particles if particles is None else particles).copy()
    parts["rlnImageName"] = _rebase_image_names(parts["rlnImageName"].astype(str).tolist(),
                                                Path(star.path).parent, Path(path).parent)
    optics = star.optics.copy()
    if "rlnImageSize" not in optics or (optics["rlnImageSize"] == 0).any():
        optics["rlnImageSize"] = star.box_size
    if "rlnImageDimensionality" not in optics:
        optics["rlnImageDimensionality"] = 2
    for col in OPTICS_COLUMNS:
        if col in parts and col in optics:
            parts = parts.drop(columns=[col])
        elif col in parts and col not in optics:  # lift a per-particle value into optics
            optics[col] = parts.groupby("rlnOpticsGroup")[col].first().reindex(
                optics["rlnOpticsGroup"]).to_numpy()
            parts = parts.drop(columns=[col])
    blocks = {"optics": optics, "particles": parts}
    blocks.update(star.extra_tables)
    write_star(path, blocks)


def read_star_table(path, name: str) -> pd.DataFrame:
    """One named data block of a STAR file (e.g. ``fsc``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"STAR file not found: {path}")
    blocks = starfile.read(path, always_dict=True)
    if name not in blocks:
        raise InputError(f"{path}: no data_{name} block")
    return blocks[name]


def _rebase_image_names(names: list, old_dir: Path, new_dir: Path) -> list:
    """Rewrite relative stack paths of ``index@stack`` names so that they still
    point to the same files from a STAR file written into ``new_dir``."""
    old_dir, new_dir = Path(old_dir).absolute(), Path(new_dir).absolute()
    if old_dir == new_dir:
        return names
    cache, out = {}, []
    for name in names:
        idx, sep, stack = name.rpartition("@")
        if stack not in cache:
            cache[stack] = stack
            if not os.path.isabs(stack) and (old_dir / stack).exists():
                cache[stack] = os.path.relpath(old_dir / stack, new_dir)
        out.append(f"{idx}{sep}{cache[stack]}")
    return out


def write_star(path, blocks: dict) -> None:
    """Write STAR data blocks ``{name: DataFrame}`` atomically."""
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f")
        # RELION 3.1 marks its files with a version line; add it for clarity.
        text = Path(tmp).read_text()
        Path(tmp).write_text("\n# version 30001\n" + text.split("\n", 1)[1])


# --------------------------------------------------------------------------- images
def parse_image_name(name: str) -> tuple[int, str]:
    """``'12@stack.mrcs'`` → ``(11, 'stack.mrcs')`` (0-based index); a name
    without ``@`` is a single image (index 0)."""
    if "@" in name:
        idx, stack = name.split("@", 1)
        return int(idx) - 1, stack
    return 0, name


class ImageReader:
    """Read particle images listed in a :class:`ParticleStar`, in chunks.

    Stacks are memory-mapped once and kept open; relative stack paths are
    resolved against the STAR file's folder, then the current folder.
    """

    def __init__(self, star: ParticleStar):
        self.star = star
        self._maps: dict[str, np.ndarray] = {}
        self._paths: dict[str, str] = {}
        names = star.particles["rlnImageName"].astype(str).tolist()
        parsed = [parse_image_name(n) for n in names]
        self.index = np.array([p[0] for p in parsed], dtype=np.int64)
        self.stacks = [self._resolve(p[1]) for p in parsed]

    def _resolve(self, stack: str) -> str:
        if stack in self._paths:
            return self._paths[stack]
        candidates = [Path(stack)] if os.path.isabs(stack) else [self.star.path.parent / stack, Path(stack)]
        for c in candidates:
            if c.exists():
                self._paths[stack] = str(c)
                return str(c)
        raise InputError(f"image stack not found: {stack} (listed in {self.star.path})")

    def _stack(self, path: str) -> np.ndarray:
        if path not in self._maps:
            try:
                m = mrcfile.mmap(path, mode="r", permissive=True)
            except ValueError as exc:
                raise InputError(f"cannot read image stack {path}: {exc}") from None
            data = m.data
            if data is None:
                raise InputError(f"cannot read image stack {path}")
            self._maps[path] = data if data.ndim == 3 else data[None]
        return self._maps[path]

    def check(self) -> None:
        """Check every stack exists, indices are in range and images are square
        and of the declared box size (filling it where the STAR gives none)."""
        box = None
        for path in sorted(set(self.stacks)):
            data = self._stack(path)
            n, h, w = data.shape
            if h != w:
                raise InputError(f"{path}: images are not square ({h}x{w})")
            if box is not None and h != box:
                raise InputError(f"{path}: box {h} differs from other stacks ({box})")
            box = h
            idx = self.index[np.array([s == path for s in self.stacks])]
            if idx.min() < 0 or idx.max() >= n:
                raise InputError(f"{path}: image index {idx.max() + 1} out of range (stack has {n})")
        declared = self.star.particles["rlnImageSize"].to_numpy(int)
        if (declared == 0).all():
            self.star.particles["rlnImageSize"] = box
            self.star.optics["rlnImageSize"] = box
        elif (declared != box).any():
            raise InputError(f"{self.star.path}: rlnImageSize {declared[0]} but the stacks hold "
                             f"{box}x{box} images")

    def read(self, rows) -> np.ndarray:
        """Images of the given particle rows as float32 ``(B, n, n)``."""
        rows = np.asarray(rows)
        out = None
        for k, r in enumerate(rows):
            img = self._stack(self.stacks[r])[self.index[r]]
            if out is None:
                out = np.empty((len(rows),) + img.shape, dtype=np.float32)
            out[k] = img
        return out

    def chunks(self, chunk_size: int = 512, rows=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(rows, images)`` for consecutive chunks of particles."""
        rows = np.arange(len(self.star)) if rows is None else np.asarray(rows)
        for start in range(0, len(rows), chunk_size):
            sel = rows[start:start + chunk_size]
            yield sel, self.read(sel)
