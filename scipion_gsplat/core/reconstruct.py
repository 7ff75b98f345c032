"""Fourier reconstruction from particles with known poses and CTF.

As in RELION's back-projector: each image's rfft is taken on its own ``n``-pixel
grid, translated back by its origin and multiplied by its CTF; its samples are
inserted by trilinear interpolation at twice their frequency into a ×2 padded 3D
transform ``D = Σ CTF·X``, and the CTF² alongside into ``W = Σ CTF²``. Particles
go into their half set's sums (``rlnRandomSubset``). The map is::

    V(k) = D(k) / max(W(k) [+ W̄(|k|) / (fudge · SSNR(|k|))], W̄(|k|)/1000)

followed by the inverse transform, the sinc² correction of the trilinear
gridding, cropping to ``n`` and a soft spherical mask. The optional Wiener term
uses the SSNR measured from the data itself: the half-map FSC gives
``SSNR_half = FSC / (1 − FSC)`` (``2·FSC/(1−FSC)`` for the full set) and ``W̄`` is
the shell mean of ``W``; this is RELION's MAP estimator written with the FSC in
place of an explicit noise model. Off by default, as in ``relion_reconstruct``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .ctf import ctf_2d
from .fourier import as_tensor, image_rfft, shift_phase
from .fourier_solve import PAD, finish_grids, grid_columns, solve_grids, solve_sums, x_share, x_step
from .fsc import fsc_curve
from .io import ImageReader, InputError, ParticleStar
from .symmetry import expand_poses

#: slice samples scattered at once (1M: ~0.1 GB of temporaries, 20 images of 256 px)
SCATTER_SAMPLES = 1 << 20
#: bytes of one image batch's spectra inserted at once. glibc gives blocks
#: above 32 MB fresh pages on every allocation (its mmap threshold cannot be
#: raised further), so every temporary is kept under it: 16 MB is 63 images of
#: 256 px, 20 of 400 px.
INSERT_BYTES = 16 << 20


@dataclass
class Reconstruction:
    """Result of :func:`reconstruct_particles`.

    Attributes:
        full, half1, half2: ``[z, y, x]`` float32 maps (box ``n``).
        fsc: ``(n//2 + 1,)`` FSC between the half maps, per shell.
        frequency: ``(n//2 + 1,)`` shell frequency in 1/Å.
        pixel_size_A: pixel size in Å.
        n_particles: particles used (per half: ``n_half``).
        half_set_ranks: ranks that back-projected each half set when the
            ranks were split by half set (:func:`half_set_group`), else 0.
    """
    full: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    fsc: np.ndarray
    frequency: np.ndarray
    pixel_size_A: float
    n_particles: int
    n_half: tuple
    seconds: float = 0.0
    half_set_ranks: int = 0

    def resolution_A(self, threshold: float = 0.143) -> float:
        """Resolution (Å) where the half-map FSC first drops below ``threshold``."""
        from .fsc import resolution_at
        return resolution_at(self.frequency, self.fsc, threshold)


class FourierAccumulator:
    """Running sums ``D = Σ CTF·X`` and ``W = Σ CTF²`` on a ×2 padded 3D rfft grid.

    As in RELION's back-projector, each image's rfft is taken on its own
    ``n``-pixel grid (where the CTF and the origin shift are applied, matching
    how the images were formed) and its samples are inserted at twice their
    frequency index into the ``2n`` grid by trilinear interpolation. The
    insertion is our own scatter (``scatter_add_``): torch-fourier-slice's inserter
    took 13 s per 1000 images of 64 px on 2 cores (it pads the images and inserts
    4× more samples), this one under 1 s.

    Grid layout: ``(2n, 2n, n + 1)`` with the z and y axes fftshifted (origin at
    index ``n``) and x the non-negative rfft half.

    ``double=True`` keeps the sums in float64 (24 instead of 12 bytes per padded
    voxel; meant for working boxes) and rounds them to float32 once, in the
    solve: the sums of several ranks' accumulators then give the map of one
    process bit for bit (but for a float64 rounding tie), so discrete choices
    made from the map later (the cells a local pose search refines) do not
    depend on how the particles were split among ranks.
    """

    def __init__(self, box: int, pixel_size_A: float, device="cpu", max_shell: Optional[float] = None,
                 double: bool = False):
        self.box = box
        self.size = int(round(box * PAD))
        self.pixel_size_A = pixel_size_A
        self.device = torch.device(device)
        # one voxel of margin on each axis so that trilinear corners never fall outside
        self._shape = (self.size + 2, self.size + 2, self.size // 2 + 2)
        n_vox = int(np.prod(self._shape))
        self._d = torch.zeros(n_vox, dtype=torch.complex128 if double else torch.complex64, device=self.device)
        self._w = torch.zeros(n_vox, dtype=torch.float64 if double else torch.float32, device=self.device)
        self.count = 0
        # slice samples: unshifted rfft indices of the n grid, and their frequencies
        ky = torch.fft.fftfreq(box, d=1.0 / box, device=self.device)
        kx = torch.arange(box // 2 + 1, device=self.device, dtype=torch.float32)
        gy, gx = torch.meshgrid(ky, kx, indexing="ij")
        rmax = box / 2 if max_shell is None else min(box / 2, float(max_shell))
        keep = (gx ** 2 + gy ** 2 <= rmax ** 2) & ~((gx == 0) & (gy < 0))
        self._flat = torch.nonzero(keep.ravel()).squeeze(1)  # (P,) into the (n, n//2+1) rfft
        self._kxy = torch.stack([gx[keep], gy[keep]], dim=-1) * PAD  # (P, 2) padded units

    def insert(self, images: torch.Tensor, poses: np.ndarray, shifts_A: Optional[np.ndarray],
               ctf_params: Optional[dict], symmetry: str = "C1",
               weights: Optional[np.ndarray] = None) -> None:
        """Back-project a batch.

        Args:
            images: ``(B, n, n)`` particle images.
            poses: ``(B, 3, 3)`` RELION matrices.
            shifts_A: ``(B, 2)`` origins in Å, or None.
            ctf_params: per-particle CTF arrays ``(B,)`` or None (CTF = 1).
            symmetry: point group; each image is inserted at every ``A·R``.
            weights: ``(B,)`` per-image weights (e.g. class probabilities), or None.
        """
        n = self.box
        step = max(1, INSERT_BYTES // (8 * n * (n // 2 + 1)))
        for i in range(0, images.shape[0], step):
            part = slice(i, i + step)
            spec = image_rfft(images[part].to(self.device, torch.float32))
            if shifts_A is not None:  # move the particle back to the box centre (+origin)
                spec = spec * shift_phase(as_tensor(shifts_A[part], self.device), n, self.pixel_size_A)
            ctf = None if ctf_params is None else ctf_2d({k: v[part] for k, v in ctf_params.items()}, n,
                                                         self.pixel_size_A, device=self.device)
            self.insert_spectra(spec, poses[part], ctf, symmetry, None if weights is None else weights[part])

    def insert_spectra(self, spectra: torch.Tensor, poses: np.ndarray, ctf: Optional[torch.Tensor],
                       symmetry: str = "C1", weights=None, data_weights=None) -> None:
        """Back-project centred image rffts (origin already removed).

        Args:
            spectra: ``(B, n, n//2+1)`` complex, unshifted rfft of centred images.
            poses: ``(B, 3, 3)`` RELION matrices.
            ctf: ``(B, n, n//2+1)`` CTF values, or None (CTF = 1).
            weights: ``(B,)`` factors ``w`` giving ``D += w·CTF·X``, ``W += w·CTF²``.
            data_weights: ``(B,)`` optional separate factors for ``D`` only
                (then ``D += d·CTF·X``, ``W += w·CTF²``; used for residual
                eigenvolumes, where ``d = c`` and ``w = c²``).
        """
        b = spectra.shape[0]
        if ctf is not None:
            spec, wgt = spectra * ctf, ctf * ctf
        else:
            spec, wgt = spectra, torch.ones(spectra.shape, device=self.device)
        dvals = spec.reshape(b, -1)[:, self._flat]
        wvals = wgt.reshape(b, -1)[:, self._flat]
        if weights is not None:
            wt = as_tensor(weights, self.device)[:, None]
            dt = wt if data_weights is None else as_tensor(data_weights, self.device)[:, None]
            dvals, wvals = dvals * dt, wvals * wt
        mats = expand_poses(poses, symmetry)  # (B, G, 3, 3)
        g = mats.shape[1]
        if g > 1:
            dvals = dvals.repeat_interleave(g, dim=0)
            wvals = wvals.repeat_interleave(g, dim=0)
        mats = as_tensor(mats.reshape(-1, 3, 3), self.device)
        step = max(1, SCATTER_SAMPLES // max(dvals.shape[1], 1))  # bounded temporaries (~100 bytes a sample)
        for i in range(0, mats.shape[0], step):
            self._scatter(mats[i:i + step], dvals[i:i + step], wvals[i:i + step])
        self.count += b

    def _scatter(self, mats: torch.Tensor, dvals: torch.Tensor, wvals: torch.Tensor) -> None:
        """Trilinear scatter of slice samples ``(B, P)`` at frequencies ``Aᵀ·k``."""
        sz, sy, sx = self._shape
        r = torch.einsum("pk,bkj->bpj", self._kxy, mats[:, :2, :])  # (B, P, xyz)
        flip = r[..., 0] < 0  # store the Friedel mate in the x >= 0 half
        r = torch.where(flip[..., None], -r, r)
        dvals = torch.where(flip, dvals.conj(), dvals).reshape(-1).to(self._d.dtype)
        wvals = wvals.reshape(-1).to(self._w.dtype)
        r[..., 1:] += self.size // 2
        f = torch.floor(r)
        t = (r - f).reshape(-1, 3)
        i0 = f.to(torch.int64).reshape(-1, 3)
        base = (i0[:, 2] * sy + i0[:, 1]) * sx + i0[:, 0]
        tx, ty, tz = t[:, 0], t[:, 1], t[:, 2]
        for dz in (0, 1):
            wz = tz if dz else 1 - tz
            for dy in (0, 1):
                wzy = wz * (ty if dy else 1 - ty)
                for dx in (0, 1):
                    c = wzy * (tx if dx else 1 - tx)
                    idx = base + ((dz * sy + dy) * sx + dx)
                    # scatter_add_ sums in the same order as index_add_ (same result)
                    # but is 1.3-1.8x faster on CPU (torch 2.13, one thread)
                    self._d.scatter_add_(0, idx, dvals * c)
                    self._w.scatter_add_(0, idx, wvals * c)

    def all_reduce(self, world) -> "FourierAccumulator":
        """Add the sums of every rank (a :class:`~scipion_gsplat.core.distributed.World`);
        afterwards each rank holds the sums over all particles."""
        if world is not None and world.size > 1:
            world.all_reduce_(self._d)
            world.all_reduce_(self._w)
            self.count = world.sum_int(self.count)
        return self

    def __iadd__(self, other: "FourierAccumulator"):
        self._d += other._d
        self._w += other._w
        self.count += other.count
        return self

    def solve(self, ssnr: Optional[np.ndarray] = None, fudge: float = 1.0) -> np.ndarray:
        """Real-space map ``[z, y, x]`` (box ``n``) from the sums (:func:`solve_sums`)."""
        return solve_sums([self], ssnr, fudge)


def backproject_halves(star: ParticleStar, reader: ImageReader, symmetry: str = "C1",
                       device="cpu", chunk_size: int = 256, rows=None,
                       progress: Optional[Callable[[int, int], None]] = None,
                       use_ctf: bool = True, maxres_A: Optional[float] = None, world=None,
                       only: Optional[int] = None):
    """Back-project every particle (or ``rows``) into its half set's accumulator.

    Args:
        maxres_A: use Fourier components up to this resolution (Å) only.
        world: a :class:`~scipion_gsplat.core.distributed.World` of several
            ranks: each back-projects its share of the rows and the sums are
            added over ranks (map-reduce); None or one rank: every row here.
        only: 1 or 2: that half set's rows only (the other accumulator is None).

    Returns:
        ``(acc_half1, acc_half2)``.
    """
    box, pix = star.box_size, star.pixel_size
    halves = star.half_set()
    max_shell = None if maxres_A is None else box * pix / maxres_A
    accs = tuple(FourierAccumulator(box, pix, device, max_shell) if only in (None, h) else None for h in (1, 2))
    poses, shifts = star.poses(), star.shifts_A()
    ctf = star.ctf_params() if (use_ctf and star.has_ctf) else None
    rows = np.arange(len(star)) if rows is None else np.asarray(rows)
    if only is not None:
        rows = rows[halves[rows] == only]
    if world is not None:
        rows = world.shard(rows)
    done = 0
    for sel, imgs in reader.chunks(chunk_size, rows):
        imgs_t = torch.from_numpy(imgs)
        for h, acc in zip((1, 2), accs):
            m = halves[sel] == h
            if acc is None or not m.any():
                continue
            r = sel[m]
            acc.insert(imgs_t[torch.from_numpy(m)], poses[r], shifts[r],
                       None if ctf is None else {k: v[r] for k, v in ctf.items()}, symmetry)
        done += len(sel)
        if progress:
            progress(done, len(rows))
    for acc in accs:
        if acc is not None:
            acc.all_reduce(world)
    return accs


def _with_wiener(solve_halves_at: Callable, solve_full_at: Callable, pix: float, wiener: bool,
                 fudge: float, n_passes: int, consume: bool) -> tuple:
    """``(full, half1, half2, frequency, fsc)`` given the solvers of the half maps,
    ``(ssnr, fudge, last) -> (h1, h2)``, and of the full map, ``(ssnr, fudge) -> map``,
    at an SSNR (None: no Wiener term): the Wiener passes of :func:`solve_halves`.
    Without them the full map comes first, so that with ``consume`` the half maps,
    solved last, can use their accumulators' storage (``last``)."""
    if not wiener:
        full = solve_full_at(None, 1.0)
        h1, h2 = solve_halves_at(None, 1.0, consume)
        return (full, h1, h2) + fsc_curve(h1, h2, pix)
    h1, h2 = solve_halves_at(None, 1.0, False)
    freq, fsc = fsc_curve(h1, h2, pix)
    for _ in range(n_passes):
        f = np.clip(fsc, 1e-4, 0.999)
        h1, h2 = solve_halves_at(f / (1 - f), fudge, False)
        freq, fsc = fsc_curve(h1, h2, pix)
    f = np.clip(fsc, 1e-4, 0.999)
    return solve_full_at(2 * f / (1 - f), fudge), h1, h2, freq, fsc


def solve_halves(acc1: FourierAccumulator, acc2: FourierAccumulator, wiener: bool = False,
                 fudge: float = 1.0, n_passes: int = 2, world=None, consume: bool = False) -> Reconstruction:
    """Half maps, full map and half-map FSC from two accumulators.

    ``world``: ranks that all hold the summed accumulators: they share
    every solve (:func:`solve_sums`) and every rank gets every map.
    ``consume``: the accumulators are not needed afterwards (see :func:`solve_sums`)."""
    pix, counts = acc1.pixel_size_A, (acc1.count, acc2.count)
    full, h1, h2, freq, fsc = _with_wiener(
        lambda ssnr, f, last: tuple(solve_sums([acc], ssnr, f, world, last) for acc in (acc1, acc2)),
        lambda ssnr, f: solve_sums([acc1, acc2], ssnr, f, world), pix, wiener, fudge, n_passes, consume)
    return Reconstruction(full, h1, h2, fsc, freq, pix, sum(counts), counts)


#: the ranks split by half set (:func:`half_set_group`) only when neither half
#: holds more than this share of the particles (else the larger half's ranks
#: would keep the others waiting longer than the split saves)
HALF_GROUP_MAX_SHARE = 0.55


@dataclass
class HalfSetRanks:
    """This rank's place when the ranks are split by half set (:func:`half_set_group`).

    Attributes:
        group: the sub-world of the ranks of this rank's half set.
        half: the half set they serve, 1 or 2.
        first: the rank (of the whole world) of each half set's first rank,
            ``(first of half 1, first of half 2)``: where each half set's results come from.
    """
    group: object
    half: int
    first: tuple


def half_set_group(world, n1: int, n2: int) -> Optional[HalfSetRanks]:
    """This rank's half set and the sub-world of its ranks when an even number of
    ranks splits by half set (the first half of the ranks back-projects half
    set 1, the others half set 2), else None (one process, an odd number of
    ranks, or half sets of very different sizes: every rank takes a share of both).

    Split by half set, a rank holds one half set's sums instead of both (half
    the memory and the first-touch time of the grids), each group solves its
    half map without the other, and only the columns of the full map's solve
    travel between the groups (a quarter of the sums instead of all of them
    twice)."""
    if world is None or world.size < 2 or world.size % 2:
        return None
    if max(n1, n2) > HALF_GROUP_MAX_SHARE * (n1 + n2):
        return None
    g = world.size // 2
    group = world.split([list(range(g)), list(range(g, world.size))])
    return HalfSetRanks(group, 1 if world.rank < g else 2, (0, g))


def _solve_by_half_groups(acc: FourierAccumulator, split: HalfSetRanks, world, counts: tuple, wiener: bool,
                          fudge: float, n_passes: int = 2) -> Reconstruction:
    """:func:`solve_halves` when each half of the ranks (``split``, from
    :func:`half_set_group`) holds the summed sums of its half set only
    (``counts``: the particles of half set 1 and 2).

    Each group solves its half map (sharing the x columns within the group)
    and sends it to every rank; for the full map each rank of the world takes
    its share of the x columns and gets the other half set's sums there from
    its partner, the rank at the same place in the other group. Every rank
    gets every map: from the same sums, the bits of :func:`solve_halves` on one
    process (the sums themselves differ from one process's by float32 rounding:
    the particles are inserted in other batches)."""
    pix, size = acc.pixel_size_A, acc.size
    peer = (world.rank + world.size // 2) % world.size
    n_x, step = size // 2 + 1, x_step(size)
    x0, x1 = x_share(n_x, step, world)
    px0, px1 = x_share(n_x, step, world, peer)
    other = []  # the other half set's D and W on this rank's x columns
    for mine in grid_columns(acc, px0, px1):
        recv = torch.empty(mine.shape[:2] + (x1 - x0,), dtype=mine.dtype, device=mine.device)
        other.append(world.exchange(mine.contiguous(), recv, peer))

    def halves_at(ssnr, f, last):
        mine = torch.from_numpy(solve_sums([acc], ssnr, f, split.group, last))
        maps = [mine if h == split.half else torch.empty_like(mine) for h in (1, 2)]
        for m, src in zip(maps, split.first):
            world.broadcast_(m, src=src)
        return tuple(m.numpy() for m in maps)

    def full_at(ssnr, f):
        d, w = (t.clone() for t in grid_columns(acc, x0, x1))
        d += other[0]  # the sum is commutative: the bits of acc1 + acc2 in either order
        w += other[1]
        if not wiener:  # solved once
            other.clear()
        d, w = finish_grids(d, w, x0)
        return solve_grids(d, w, acc.box, x0, ssnr, f, world)

    full, h1, h2, freq, fsc = _with_wiener(halves_at, full_at, pix, wiener, fudge, n_passes, consume=True)
    return Reconstruction(full, h1, h2, fsc, freq, pix, sum(counts), tuple(counts))


def reconstruct_particles(star: ParticleStar, symmetry: str = "C1", device="cpu",
                          wiener: bool = False, fudge: float = 1.0, chunk_size: int = 256,
                          rows=None, progress=None, use_ctf: bool = True,
                          maxres_A: Optional[float] = None, world=None) -> Reconstruction:
    """Reconstruct a map with half maps and FSC from a particle table.

    Args:
        star: particles with poses (and CTF unless ``use_ctf=False``).
        symmetry: point group name.
        wiener: Wiener-regularise with the SSNR measured from the half maps.
        fudge: multiplies the SSNR (RELION's tau2_fudge).
        rows: restrict to these particle rows.
        maxres_A: highest resolution used (Å).
        world: split the back-projection over the ranks of this
            :class:`~scipion_gsplat.core.distributed.World` (None: one
            process); an even number of ranks splits by half set
            (:func:`half_set_group`). Every rank gets every map.
    """
    reader = ImageReader(star)
    reader.check()
    t0 = time.time()
    halves = star.half_set()[np.arange(len(star)) if rows is None else np.asarray(rows)]
    n1, n2 = int((halves == 1).sum()), int((halves == 2).sum())
    if n1 == 0 or n2 == 0:
        raise InputError("both half sets need particles (rlnRandomSubset 1 and 2)")
    split = half_set_group(world, n1, n2)
    if split is None:
        acc1, acc2 = backproject_halves(star, reader, symmetry, device, chunk_size, rows,
                                        progress, use_ctf, maxres_A, world)
        rec = solve_halves(acc1, acc2, wiener, fudge, world=world, consume=True)
    else:
        accs = backproject_halves(star, reader, symmetry, device, chunk_size, rows, progress, use_ctf,
                                  maxres_A, split.group, only=split.half)
        rec = _solve_by_half_groups(accs[split.half - 1], split, world, (n1, n2), wiener, fudge)
        rec.half_set_ranks = split.group.size
    rec.seconds = time.time() - t0
    return rec
