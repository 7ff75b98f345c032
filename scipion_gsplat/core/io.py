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
  DefocusU``), never NaN; voltage, Cs and amplitude contrast missing where
  there is a defocus are filled from the caller's values (``--voltage``,
  ``--cs``, ``--amplitude-contrast``) or refused, never dropped;
* optics groups may differ in pixel size and box: :attr:`ParticleStar.pixel_size`
  and :attr:`ParticleStar.box_size` are then the run's common grid (the
  coarsest pixel, the smallest field of view) and :class:`ImageReader`
  resamples each group's images onto it.

The file as read is kept (:class:`StarSource`): :func:`write_particles` writes
the input's blocks, rows, columns and values unchanged (version line, optics
table, extra blocks, pixel-unit origins) plus the columns a program added or
changed. Rows are matched through the column :data:`SOURCE_ROW`.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import mrcfile
import numpy as np
import pandas as pd
import starfile

from .geometry import euler_to_matrix
from .star_source import StarSource, output_blocks, rebase_image_names, short_row, version_line


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
# CTF values a RELION 3.0 file may lack; programs fill them from options.
CTF_FILL_OPTIONS = {"rlnVoltage": "--voltage", "rlnSphericalAberration": "--cs",
                    "rlnAmplitudeContrast": "--amplitude-contrast"}
# Row number (0-based) of each particle in the file it was read from: lets
# write_particles write the input's own rows back. Not a RELION label.
SOURCE_ROW = "gsplatSourceRow"


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
    """Write a large MRC stack chunk by chunk, renamed on close.

    Use as a context manager; ``write(start, images)`` fills rows
    ``start:start+len(images)``. Rows go to the file with ``pwrite`` and the
    header statistics (min, max, mean, RMS) are accumulated chunk by chunk, so
    memory does not grow with the stack (a memory-mapped stack counts its
    written pages in the process's memory, and a statistics pass over the
    whole stack at the end made copies of it: 3.3 GB at 200,000 × 64 px).
    """

    def __init__(self, path, n_images: int, box: int, pixel_size_A: float):
        self._ctx = atomic_path(path)
        self._tmp = self._ctx.__enter__()
        self._shape = (n_images, box, box)
        with mrcfile.new_mmap(self._tmp, shape=self._shape, mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = pixel_size_A
            self._offset = mrc.header.nbytes + mrc.extended_header.nbytes
        self._fd = os.open(self._tmp, os.O_WRONLY)
        self._min, self._max, self._sum, self._sum2, self._count = np.inf, -np.inf, 0.0, 0.0, 0

    def write(self, start: int, images: np.ndarray) -> None:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.shape[1:] != self._shape[1:] or start < 0 or start + len(images) > self._shape[0]:
            raise ValueError(f"rows {start}:{start + len(images)} of shape {images.shape[1:]} do not fit "
                             f"a stack of {self._shape}")
        data, pos = images.tobytes(), self._offset + start * images[0].nbytes
        while data:
            done = os.pwrite(self._fd, data, pos)
            data, pos = data[done:], pos + done
        if images.size:
            self._min, self._max = min(self._min, float(images.min())), max(self._max, float(images.max()))
            self._sum += float(images.sum(dtype=np.float64))
            self._sum2 += float(np.square(images, dtype=np.float64).sum())
            self._count += images.size

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        os.close(self._fd)
        if exc_type is None and self._count:
            mean = self._sum / self._count
            with mrcfile.mmap(self._tmp, mode="r+") as mrc:  # header only: the data are not read
                mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = self._min, self._max, mean
                mrc.header.rms = float(np.sqrt(max(self._sum2 / self._count - mean ** 2, 0.0)))
        self._ctx.__exit__(exc_type, exc, tb)
        return False


# --------------------------------------------------------------------------- STAR
@dataclass
class ParticleStar:
    """A normalised RELION particle table.

    Attributes:
        particles: one row per particle, optics columns merged in, shifts in Å;
            ``SOURCE_ROW`` gives each row's place in the file it was read from.
        optics: the optics table (one row per optics group), built for 3.0 files.
        path: the STAR file (image paths are resolved against its folder).
        extra_tables: any other data blocks, kept for writing back.
        source: the file as read (written back by :func:`write_particles`), or None.
        data_dir: folder that relative stack paths are relative to (a RELION
            project folder), tried before the STAR file's folder; or None.
        filled: ``{label: value}`` completed from the command line (``--angpix``,
            ``--voltage``, ``--cs``, ``--amplitude-contrast``); written to outputs.
    """
    particles: pd.DataFrame
    optics: pd.DataFrame
    path: Path
    extra_tables: dict = field(default_factory=dict)
    source: Optional[StarSource] = None
    data_dir: Optional[Path] = None
    filled: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.particles)

    def optics_groups(self) -> pd.DataFrame:
        """One row per optics group present: ``group``, ``pixel_A``, ``box_px``
        (0 while unknown) and ``particles``.

        Raises:
            InputError: a group whose particles have several pixel or box sizes.
        """
        p = self.particles
        groups = p["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in p else np.ones(len(p), int)
        df = pd.DataFrame({"group": groups, "pixel_A": p["rlnImagePixelSize"].to_numpy(float),
                           "box_px": p["rlnImageSize"].to_numpy(int)})
        g = df.groupby("group", sort=True).agg(pixel_A=("pixel_A", "max"), pixel_min=("pixel_A", "min"),
                                               box_px=("box_px", "max"), box_min=("box_px", "min"),
                                               particles=("box_px", "size"))
        bad = g[(g.pixel_A != g.pixel_min) | (g.box_px != g.box_min)]
        if len(bad):
            raise InputError(f"{self.path}: optics group {bad.index[0]} has particles of several pixel "
                             f"or box sizes")
        return g.drop(columns=["pixel_min", "box_min"]).reset_index()

    @property
    def pixel_size(self) -> float:
        """Pixel size of the images (Å) as the programs see them: the common
        pixel of all optics groups (the coarsest one; :class:`ImageReader`
        Fourier-crops finer groups to it)."""
        return float(self.particles["rlnImagePixelSize"].to_numpy(float).max())

    @property
    def box_size(self) -> int:
        """Box of the images (px) as the programs see them: the common box of all
        optics groups (the smallest field of view at :attr:`pixel_size`), 0 while
        a group's box is unknown (filled by :meth:`ImageReader.check`)."""
        g = self.optics_groups()
        if (g.box_px == 0).any():
            return 0
        pix = g.pixel_A.max()
        return int(min(common_box(int(b), float(p), pix) for b, p in zip(g.box_px, g.pixel_A)))

    def grid_note(self) -> str:
        """One line saying how optics groups of different pixel or box sizes are
        brought to the common grid ('' when they all agree)."""
        g = self.optics_groups()
        if len(g) < 2 or (g.box_px.nunique() == 1 and g.pixel_A.nunique() == 1):
            return ""
        groups = ", ".join(f"group {int(r.group)}: {r.pixel_A:.4g} Å × {int(r.box_px)} px ({int(r.particles)})"
                           for r in g.itertuples())
        return (f"optics groups differ ({groups}); every image is Fourier-cropped to the coarsest pixel "
                f"and cut to the smallest field of view: {self.pixel_size:.4g} Å × {self.box_size} px "
                f"(origins in Å and CTFs per particle stay valid)")

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
        """CTF parameters as float64 arrays ``(N,)`` keyed like :mod:`.ctf` expects
        (each particle with its own optics group's voltage, Cs and amplitude contrast)."""
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
        return replace(self, particles=self.particles.iloc[rows].reset_index(drop=True),
                       extra_tables=dict(self.extra_tables))


def common_box(box_px: int, pixel_A: float, common_pixel_A: float) -> int:
    """Box (px) of a group's images once at the common pixel: the box itself
    at that pixel, else the field of view rounded down to an even box."""
    if abs(pixel_A - common_pixel_A) <= 1e-6 * common_pixel_A:
        return box_px
    return max(2, int(np.floor(box_px * pixel_A / common_pixel_A / 2.0)) * 2)


def read_particles(path, pixel_size_A: Optional[float] = None, data_dir=None,
                   fill: Optional[dict] = None) -> ParticleStar:
    """Read a RELION 3.0, 3.1, 4 or 5 particle STAR file and normalise it.

    Args:
        path: STAR file.
        pixel_size_A: pixel size (Å) for RELION 3.0 files that do not give one
            (it replaces the file's value when given).
        data_dir: folder that relative stack paths in ``rlnImageName`` are
            relative to (a RELION project folder); default: the STAR file's
            folder, then the current folder.
        fill: values for CTF labels the file lacks (``rlnVoltage`` kV,
            ``rlnSphericalAberration`` mm, ``rlnAmplitudeContrast``); None
            entries are ignored. The file's own values always win.

    Raises:
        InputError: missing file, no particle table, no pixel size, a short
            (truncated) row, NaN values, a defocus without voltage/Cs/amplitude
            contrast, a negative defocus.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"STAR file not found: {path}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise InputError(f"--data-dir {data_dir}: not a folder")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted errors on bad files
        raise InputError(f"cannot parse STAR file {path}: {exc}") from None
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if "particles" in tables:
        pkey, okey = "particles", ("optics" if "optics" in tables else None)
    else:  # RELION 3.0: one (usually unnamed) table
        pkey = next((k for k, v in tables.items() if "rlnImageName" in v), None)
        if pkey is None:
            raise InputError(f"{path}: no particle table with rlnImageName")
        okey = None
    parts = blocks[pkey].copy()
    if "rlnImageName" not in parts:
        raise InputError(f"{path}: particle table has no rlnImageName column")
    if len(parts) == 0:
        raise InputError(f"{path}: the particle table is empty")
    if parts.isna().to_numpy().any():
        short = short_row(path, pkey)
        if short:
            raise InputError(f"{path}: {short} (truncated or damaged file?)")
    parts[SOURCE_ROW] = np.arange(len(parts))
    source = StarSource(dict(blocks), pkey, okey, version_line(path))
    fill = {k: float(v) for k, v in (fill or {}).items() if v is not None}
    filled = {}
    if okey is None:
        optics = _optics_from_v30(parts, path, pixel_size_A, filled)
        target = parts
    else:
        optics = blocks[okey].copy()
        if "rlnOpticsGroup" not in parts:
            parts["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
        if pixel_size_A is not None:
            optics["rlnImagePixelSize"] = filled["rlnImagePixelSize"] = float(pixel_size_A)
        if "rlnImagePixelSize" not in optics:
            raise InputError(f"{path}: optics table has no rlnImagePixelSize")
        target = optics
    if "rlnDefocusU" in parts:
        for col, value in fill.items():
            if col in CTF_FILL_OPTIONS and col not in parts and col not in optics:
                target[col] = filled[col] = value
    drop = [c for c in optics.columns if c in parts.columns and c != "rlnOpticsGroup"]
    parts = parts.drop(columns=drop)
    merged = parts.merge(optics, on="rlnOpticsGroup", how="left", sort=False)
    if merged["rlnImagePixelSize"].isna().any():
        raise InputError(f"{path}: particles refer to optics groups missing from the optics table")

    _normalise_shifts(merged)
    if "rlnDefocusU" in merged:
        _check_ctf(merged, path)
        if "rlnDefocusV" not in merged:
            merged["rlnDefocusV"] = merged["rlnDefocusU"]
        for col, default in CTF_DEFAULTS.items():
            if col not in merged:
                merged[col] = default
    if "rlnImageSize" not in merged:
        merged["rlnImageSize"] = 0  # filled from the stack by ImageReader.check
    _check_finite(merged, path)
    source.kept = tuple(c for c in blocks[pkey].columns if c in merged.columns)
    source.derived = merged.drop(columns=[c for c in merged.columns if c in blocks[pkey].columns]
                                 + [SOURCE_ROW]).copy()
    extra = {k: v for k, v in blocks.items() if k not in (pkey, okey)}
    return ParticleStar(merged, optics.reset_index(drop=True), path, extra, source=source,
                        data_dir=None if data_dir is None else Path(data_dir), filled=filled)


def _optics_from_v30(parts: pd.DataFrame, path: Path, pixel_size_A, filled: dict) -> pd.DataFrame:
    """Optics groups of a RELION 3.0 table: one per distinct pixel size. Voltage,
    Cs and amplitude contrast stay per particle, as the file gives them."""
    if pixel_size_A is not None:
        pix = np.full(len(parts), float(pixel_size_A))
        filled["rlnImagePixelSize"] = float(pixel_size_A)
    elif "rlnImagePixelSize" in parts:
        pix = parts["rlnImagePixelSize"].to_numpy(float)
    elif "rlnDetectorPixelSize" in parts and "rlnMagnification" in parts:
        pix = parts["rlnDetectorPixelSize"].to_numpy(float) * 1e4 / parts["rlnMagnification"].to_numpy(float)
    else:
        raise InputError(f"{path}: RELION 3.0 file without pixel size; give it explicitly (--angpix)")
    parts["rlnImagePixelSize"] = pix
    if "rlnOpticsGroup" not in parts:
        parts["rlnOpticsGroup"] = pd.factorize(np.round(pix, 6))[0] + 1
    first = pd.DataFrame({"g": parts["rlnOpticsGroup"].to_numpy(), "p": pix}).groupby("g", sort=True).first()
    return pd.DataFrame({"rlnOpticsGroupName": [f"opticsGroup{g}" for g in first.index],
                         "rlnOpticsGroup": first.index.to_numpy(), "rlnImagePixelSize": first.p.to_numpy(),
                         "rlnImageDimensionality": 2})


def _check_ctf(p: pd.DataFrame, path: Path) -> None:
    """A defocus needs voltage, Cs and amplitude contrast; defoci are positive."""
    missing = [c for c in CTF_FILL_OPTIONS if c not in p]
    if missing:
        opts = ", ".join(f"{CTF_FILL_OPTIONS[c]} ({c})" for c in missing)
        raise InputError(f"{path}: the particles have defoci but no {', '.join(missing)} (a RELION 3.0 "
                         f"file?); give {opts}, e.g. --voltage 300 --cs 2.7 --amplitude-contrast 0.1")
    for col in ("rlnDefocusU", "rlnDefocusV"):
        if col in p:
            neg = np.flatnonzero(p[col].to_numpy(float) < 0)
            if len(neg):
                i = int(neg[0])
                raise InputError(
                    f"{path}: {len(neg)} particle(s) with a negative {col} (first: row {i + 1}, "
                    f"{p['rlnImageName'].iloc[i]}, {float(p[col].iloc[i]):g} Å); RELION defoci are "
                    f"positive underfocus in Å: check the sign convention of the program that wrote the file")


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
    """Write a particle STAR file, atomically.

    When ``star`` was read from a file (and the rows carry ``SOURCE_ROW``) the
    output is that file's blocks, rows, columns and values, unchanged, plus the
    columns of ``particles`` that are new or changed (see
    :func:`.star_source.output_blocks`): a RELION 3.0 input stays a 3.0 table,
    a RELION 5 input keeps its version line, optics table and extra blocks.
    Otherwise a RELION 3.1 file (optics + particles) is built from the table.

    Args:
        path: output file.
        star: the table the particles came from (gives the optics table).
        particles: rows to write (default ``star.particles``); optics columns
            merged in by :func:`read_particles` are moved back to the optics table.
    """
    parts = star.particles if particles is None else particles
    names = rebase_image_names(parts["rlnImageName"].astype(str), Path(star.path).parent,
                               Path(path).parent, star.data_dir)
    if star.source is not None and SOURCE_ROW in parts and SOURCE_ROW in star.particles:
        changed = not np.array_equal(np.asarray(parts["rlnImageName"].astype(str)),
                                     star.source.blocks[star.source.particles_key]["rlnImageName"].astype(str)
                                     .to_numpy()[parts[SOURCE_ROW].to_numpy(np.int64)])
        if not changed:  # rebase the raw names (the names a program set are its own)
            parts = parts.assign(rlnImageName=names)
        blocks = output_blocks(star.source, parts, star.filled)
        write_star(path, blocks, version=star.source.version or ("30001" if star.source.optics_key else None),
                   float_format=None)
        return
    parts = parts.drop(columns=[SOURCE_ROW], errors="ignore").assign(rlnImageName=names)
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


def write_star(path, blocks: dict, version: Optional[str] = "30001", float_format: Optional[str] = "%.6f") -> None:
    """Write STAR data blocks ``{name: DataFrame or dict}`` atomically.

    Args:
        version: written as ``# version <version>`` before every block, as
            RELION does (None: no version line, as in RELION 3.0 files).
        float_format: format of float columns (None: shortest exact text).
    """
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format=float_format)
        text = Path(tmp).read_text()
        text = text.split("\n", 1)[1]  # starfile's own "Created by" comment
        if version:
            text = re.sub(r"(?m)^data_", f"# version {version}\n\ndata_", text)
        Path(tmp).write_text("\n" + text.lstrip("\n"))


# --------------------------------------------------------------------------- images
def __getattr__(name):
    """``ImageReader`` and ``parse_image_name`` live in :mod:`.image_reader`
    (which imports this module); ``io.ImageReader`` keeps working."""
    if name in ("ImageReader", "parse_image_name"):
        from . import image_reader
        return getattr(image_reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
