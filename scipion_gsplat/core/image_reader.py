"""Particle images of a STAR table: bounded open files, an O(rows) check, one common grid.

RELION's normal layout is one ``.mrcs`` stack per micrograph: thousands of
files. :class:`ImageReader` therefore

* reads each stack's MRC header once (``mrcfile`` header only, never the
  data) and keeps at most ``max_open`` stacks open (least recently used first
  out; default 64, ``GSPLAT_MAX_OPEN_STACKS`` in the environment), reading
  images with ``os.pread`` at the offsets the header gives;
* checks every row in O(rows): rows are grouped by stack with numpy, each
  stack's header is read once;
* returns images on the run's common grid (:attr:`ParticleStar.pixel_size`,
  :attr:`ParticleStar.box_size`): optics groups with a finer pixel are
  zero-padded, Fourier-cropped to the coarsest pixel (pixel values kept, like
  an interpolation) and cut to the common box; groups with a larger box are cut.

Relative stack paths are resolved against ``star.data_dir`` (``--data-dir``,
a RELION project folder), then the STAR file's folder, then the current folder.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional

import mrcfile
import numpy as np
import pandas as pd

from .io import InputError, ParticleStar

DEFAULT_MAX_OPEN = 64


def parse_image_name(name: str) -> tuple[int, str]:
    """``'12@stack.mrcs'`` → ``(11, 'stack.mrcs')`` (0-based index); a name
    without ``@`` is a single image (index 0)."""
    if "@" in name:
        idx, stack = name.split("@", 1)
        return int(idx) - 1, stack
    return 0, name


def parse_image_names(names, where="") -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`parse_image_name`: ``(index (N,) 0-based int64, stack (N,) str)``."""
    s = pd.Series(names, dtype=str).reset_index(drop=True)
    split = s.str.partition("@")
    has_at = (split[1] == "@").to_numpy()
    stacks = split[2].where(has_at, split[0]).to_numpy(dtype=object)
    idx = pd.to_numeric(split[0].where(has_at, "1"), errors="coerce").to_numpy(float)
    bad = np.flatnonzero(~np.isfinite(idx))
    if len(bad):
        raise InputError(f"{where}: rlnImageName '{s.iloc[bad[0]]}' (row {bad[0] + 1}) is not index@stack")
    return idx.astype(np.int64) - 1, stacks


def resample_plan(box_px: int, pixel_A: float, common_pixel_A: float) -> tuple[int, int]:
    """``(padded_box, cropped_box)`` that bring ``box_px`` images at ``pixel_A``
    to ``common_pixel_A`` (≥ ``pixel_A``): zero-pad to ``padded_box``, then
    Fourier-crop to the even ``cropped_box``. The padding is chosen so that
    ``pixel_A · padded_box / cropped_box`` matches the common pixel to 1e-4
    where a padding below 1.5 × the box allows it (else the closest one)."""
    ratio = pixel_A / common_pixel_A
    if abs(ratio - 1.0) <= 1e-6:
        return box_px, box_px
    best = None
    for padded in range(box_px, box_px + box_px // 2 + 2):
        m = int(round(padded * ratio / 2.0)) * 2
        err = abs(padded * ratio - m) / (padded * ratio)
        if best is None or err < best[0] - 1e-12:
            best = (err, padded, m)
        if err < 1e-4:
            break
    return best[1], best[2]


class ImageReader:
    """Read particle images listed in a :class:`ParticleStar`, in chunks.

    Args:
        star: the particle table.
        max_open: most stacks kept open at once (default 64 or
            ``$GSPLAT_MAX_OPEN_STACKS``); each costs one file descriptor.
    """

    def __init__(self, star: ParticleStar, max_open: Optional[int] = None):
        self.star = star
        self.max_open = max(1, int(max_open or os.environ.get("GSPLAT_MAX_OPEN_STACKS", DEFAULT_MAX_OPEN)))
        self.index, names = parse_image_names(star.particles["rlnImageName"], star.path)
        codes, uniques = pd.factorize(pd.Series(names, dtype=object))
        self.stack_code = codes.astype(np.int64)
        self.stack_paths = [self._resolve(s) for s in uniques]
        self._headers: dict[int, tuple] = {}
        self._open: "OrderedDict[int, int]" = OrderedDict()
        self._plans: Optional[dict] = None

    # ------------------------------------------------------------------ paths
    def _resolve(self, stack: str) -> str:
        if os.path.isabs(stack):
            candidates = [Path(stack)]
        else:
            candidates = [Path(self.star.path).parent / stack, Path(stack)]
            if self.star.data_dir is not None:
                candidates.insert(0, Path(self.star.data_dir) / stack)
        for c in candidates:
            if c.exists():
                return str(c)
        hint = "" if self.star.data_dir is not None or os.path.isabs(stack) else \
            " (paths relative to a RELION project folder need --data-dir <project folder>)"
        raise InputError(f"image stack not found: {stack} (listed in {self.star.path}){hint}")

    @property
    def stacks(self) -> list[str]:
        """The resolved stack path of every row (``(N,)`` list)."""
        return [self.stack_paths[c] for c in self.stack_code]

    def stack_files(self) -> list[str]:
        """The distinct image stacks this reader reads, as absolute resolved paths
        (symbolic links followed), sorted."""
        return sorted({os.path.realpath(p) for p in self.stack_paths})

    # ------------------------------------------------------------------ files
    def _header(self, code: int) -> tuple:
        """``(data_offset_bytes, dtype, n_images, ny, nx)`` of a stack, from its
        header (read once; images beyond a truncated file's end are not counted)."""
        if code not in self._headers:
            path = self.stack_paths[code]
            try:
                with mrcfile.open(path, header_only=True, permissive=True) as m:
                    h = m.header
                    dtype = mrcfile.utils.data_dtype_from_header(h)
                    nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                    offset = int(h.nbytes) + int(h.nsymbt)
            except (ValueError, OSError) as exc:
                raise InputError(f"cannot read image stack {path}: {exc}") from None
            if dtype.kind == "c" or nx <= 0 or ny <= 0:
                raise InputError(f"{path}: not an image stack (mode {int(h.mode)}, {nx}x{ny})")
            image_bytes = nx * ny * dtype.itemsize
            n = min(max(nz, 1), max(0, (os.path.getsize(path) - offset) // image_bytes))
            self._headers[code] = (offset, dtype, n, ny, nx)
        return self._headers[code]

    def _fd(self, code: int) -> int:
        """An open descriptor of a stack; the least recently used is closed
        beyond ``max_open``."""
        fd = self._open.get(code)
        if fd is not None:
            self._open.move_to_end(code)
            return fd
        while len(self._open) >= self.max_open:
            os.close(self._open.popitem(last=False)[1])
        fd = os.open(self.stack_paths[code], os.O_RDONLY)
        self._open[code] = fd
        return fd

    def close(self) -> None:
        """Close every open stack (reading again reopens them)."""
        while self._open:
            os.close(self._open.popitem()[1])

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _read_stack(self, code: int, index: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Images ``index`` (0-based) of one stack as float32 ``(B, ny, nx)``,
        into ``out`` when given. Each run of consecutive indices is one read;
        float32 stacks in this machine's byte order are read straight into
        the output (no intermediate copy)."""
        offset, dtype, n, ny, nx = self._header(code)
        if len(index) and (index.min() < 0 or index.max() >= n):
            raise InputError(f"{self.stack_paths[code]}: image index {int(index.max()) + 1} out of range "
                             f"(stack has {n})")
        size = ny * nx * dtype.itemsize
        fd = self._fd(code)
        if out is None:
            out = np.empty((len(index), ny, nx), dtype=np.float32)
        direct = dtype == np.dtype(np.float32) and out.flags.c_contiguous
        cuts = np.flatnonzero(np.diff(index) != 1) + 1
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(index)]):
            pos = offset + int(index[s]) * size
            if direct:
                view = memoryview(out[s:e]).cast("B")
                done = 0
                while done < len(view):
                    got = os.preadv(fd, [view[done:]], pos + done)
                    if got <= 0:
                        self._ended(code, int(index[s]) + done // size)
                    done += got
            else:
                buf = os.pread(fd, size * (e - s), pos)
                if len(buf) < size * (e - s):
                    self._ended(code, int(index[s]) + len(buf) // size)
                out[s:e] = np.frombuffer(buf, dtype=dtype).reshape(e - s, ny, nx)
        return out

    def _ended(self, code: int, image: int) -> None:
        """Raise the error of a stack that ends inside image ``image`` (0-based)."""
        raise InputError(f"{self.stack_paths[code]}: the file ended while reading image {image + 1}")

    # ------------------------------------------------------------------ check
    def check(self) -> None:
        """Check in O(rows) that every stack is readable, indices are in range,
        images are square and each optics group has one box size (filling
        ``rlnImageSize`` where the STAR gives none); each stack's header is read
        once."""
        n_stacks = len(self.stack_paths)
        heads = [self._header(c) for c in range(n_stacks)]
        lo = np.full(n_stacks, np.iinfo(np.int64).max)
        hi = np.full(n_stacks, -1)
        np.minimum.at(lo, self.stack_code, self.index)
        np.maximum.at(hi, self.stack_code, self.index)
        for c, (_, _, n, ny, nx) in enumerate(heads):
            if ny != nx:
                raise InputError(f"{self.stack_paths[c]}: images are not square ({ny}x{nx})")
            if lo[c] < 0 or hi[c] >= n:
                bad = int(hi[c]) + 1 if hi[c] >= n else int(lo[c]) + 1
                raise InputError(f"{self.stack_paths[c]}: image index {bad} out of range (stack has {n})")
        p = self.star.particles
        stack_box = np.array([h[3] for h in heads], dtype=np.int64)[self.stack_code]
        groups = p["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in p else np.ones(len(p), int)
        pairs = pd.DataFrame({"group": groups, "box": stack_box}).drop_duplicates()
        several = pairs[pairs.duplicated("group", keep=False)]
        if len(several):
            g = several.group.iloc[0]
            raise InputError(f"{self.star.path}: optics group {g} has stacks of several box sizes "
                             f"{sorted(several[several.group == g].box.tolist())}")
        declared = p["rlnImageSize"].to_numpy(int)
        wrong = np.flatnonzero((declared != 0) & (declared != stack_box))
        if len(wrong):
            i = int(wrong[0])
            raise InputError(f"{self.star.path}: rlnImageSize {declared[i]} but the stacks hold "
                             f"{stack_box[i]}x{stack_box[i]} images ({self.stack_paths[self.stack_code[i]]})")
        if (declared == 0).any():
            p["rlnImageSize"] = stack_box
            box_of = dict(zip(pairs.group, pairs.box))
            opt = self.star.optics
            opt["rlnImageSize"] = [int(box_of.get(g, 0)) for g in opt["rlnOpticsGroup"]]
        self._plans = None

    # ------------------------------------------------------------------ grid
    def _grid_plans(self) -> dict:
        """``{group: (box, padded, cropped, common_box)}`` for the groups whose
        images need resampling or cutting (empty when all share one grid)."""
        if self._plans is None:
            g = self.star.optics_groups()
            if len(g) > 1 and (g.box_px == 0).any():
                self.check()
                g = self.star.optics_groups()
            plans = {}
            if len(g) > 1:
                pix, box = self.star.pixel_size, self.star.box_size
                for r in g.itertuples():
                    padded, cropped = resample_plan(int(r.box_px), float(r.pixel_A), pix)
                    if (padded, cropped) != (r.box_px, r.box_px) or r.box_px != box:
                        plans[r.group] = (int(r.box_px), padded, cropped, box)
            self._plans = plans
        return self._plans

    @staticmethod
    def _to_grid(images: np.ndarray, plan: tuple) -> np.ndarray:
        """Zero-pad, Fourier-crop (pixel values kept) and cut ``(B, n, n)`` images."""
        import torch
        from .fourier import crop_to, image_irfft, image_rfft, pad_to
        from .particle_spectra import fourier_crop
        box, padded, cropped, common = plan
        x = torch.from_numpy(images)
        if padded != box:
            x = pad_to(x, padded, 2)
        if cropped != padded:
            x = image_irfft(fourier_crop(image_rfft(x), padded, cropped), cropped)
        return crop_to(x, common, 2).contiguous().numpy()

    # ------------------------------------------------------------------ reading
    def read(self, rows) -> np.ndarray:
        """Images of the given particle rows as float32 ``(B, n, n)`` on the
        common grid (``n`` = :attr:`ParticleStar.box_size`)."""
        rows = np.asarray(rows, dtype=np.int64)
        plans = self._grid_plans()
        groups = (self.star.particles["rlnOpticsGroup"].to_numpy()[rows] if plans
                  else np.zeros(len(rows), int))
        codes = self.stack_code[rows]
        order = np.lexsort((self.index[rows], codes))
        if not len(order):
            box = self.star.box_size
            return np.empty((0, box, box), dtype=np.float32)
        codes_o, groups_o = codes[order], groups[order]
        cuts = np.flatnonzero((codes_o[1:] != codes_o[:-1]) | (groups_o[1:] != groups_o[:-1])) + 1
        out = None
        for start, end in zip(np.r_[0, cuts], np.r_[cuts, len(order)]):  # runs from one stack and group
            c, g = int(codes_o[start]), groups_o[start]
            sel = order[start:end]
            ny, nx = self._header(c)[3:]
            if ny != nx:
                raise InputError(f"{self.stack_paths[c]}: images are not square ({ny}x{nx})")
            side = plans[g][3] if g in plans else ny
            if out is None:
                out = np.empty((len(rows), side, side), dtype=np.float32)
            elif side != out.shape[-1]:
                raise InputError(f"{self.stack_paths[c]}: box {side} differs from other stacks "
                                 f"({out.shape[-1]}); give rlnImageSize per optics group")
            if g not in plans and np.all(np.diff(sel) == 1):  # consecutive output rows
                self._read_stack(c, self.index[rows[sel]], out[sel[0]:sel[0] + len(sel)])  # in place
                continue
            imgs = self._read_stack(c, self.index[rows[sel]])
            out[sel] = self._to_grid(imgs, plans[g]) if g in plans else imgs
        return out

    def chunks(self, chunk_size: int = 512, rows=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(rows, images)`` for consecutive chunks of particles."""
        rows = np.arange(len(self.star)) if rows is None else np.asarray(rows)
        for start in range(0, len(rows), chunk_size):
            sel = rows[start:start + chunk_size]
            yield sel, self.read(sel)
