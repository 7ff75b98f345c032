"""Protecting the user's data: what a checkpoint was computed from.

A resumable program stores :func:`input_signature` of its inputs in every
checkpoint and reuses a checkpoint only when the signature of the current inputs
is the same, so a folder holding a run on another data set is never resumed.

Before any work, a program checks that none of its outputs is one of its inputs
(:func:`check_no_overwrite`: the STAR files, the image stacks they name, maps,
masks, models) and that it can write its output folders
(:func:`prepare_outputs`); a failed run removes the folders it created and left
empty (:func:`remove_empty_folders`).
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd

from .io import InputError


def table_digest(table: pd.DataFrame) -> str:
    """SHA-256 of a table's content: column names, row order and every value."""
    h = hashlib.sha256()
    h.update(json.dumps([str(c) for c in table.columns]).encode())
    h.update(pd.util.hash_pandas_object(table, index=False).to_numpy(np.uint64).tobytes())
    return h.hexdigest()


def files_digest(paths: Iterable[str]) -> str:
    """SHA-256 of each file's resolved path, size and modification time (ns)."""
    h = hashlib.sha256()
    for p in sorted(os.path.realpath(p) for p in paths):
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def content_digest(path: str) -> str:
    """SHA-256 of a file's bytes: for maps, masks and models, whose content
    decides a result even when a copy keeps the size and modification time
    (``cp -p``, ``rsync -t``). Image stacks are too large for this and are
    signed by :func:`files_digest`."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_signature(particles: pd.DataFrame, stack_files: Iterable[str], **options) -> str:
    """A text that changes whenever the particle rows used, their image stacks
    (size, modification time) or any of the given options change.

    Args:
        particles: the STAR rows the computation used (all their columns).
        stack_files: the image stacks those rows name.
        options: settings that change the result (JSON-serialisable values).
    """
    opts = json.dumps(options, sort_keys=True, default=str)
    return f"rows={table_digest(particles)};stacks={files_digest(stack_files)};options={opts}"


# --------------------------------------------------------------------------- outputs never replace inputs
@dataclass
class ProgramFiles:
    """What one program run reads and writes (paths as the user gave them).

    Attributes:
        particles: particle STAR files; the image stacks they name are inputs too.
        inputs: other input files (maps, masks, models, structures); ``None`` entries are ignored.
        outputs: every file the run may write. The last component may be a glob
            pattern (``motion*_frame*.mrc``) for files whose number depends on the data.
    """
    particles: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)  # also hard links
    except OSError:
        return False


def check_no_overwrite(inputs: Iterable[tuple[str, str]], outputs: Iterable[str]) -> None:
    """Refuse outputs that would replace an input.

    Paths are compared resolved (:func:`os.path.realpath`: symbolic links, ``..``,
    relative paths) and, where both exist, as files (hard links).

    Args:
        inputs: ``(path, what)`` pairs; ``what`` names the input in the message
            (e.g. ``"the image stack /data/a.mrcs named in particles.star"``).
        outputs: files the program writes; the last component may be a glob pattern.

    Raises:
        InputError: one line naming the output and the input it would replace.
    """
    resolved = [(os.path.realpath(p), what) for p, what in inputs if p]
    for out in outputs:
        out_real = os.path.realpath(out)
        folder, name = os.path.split(out_real)
        pattern = glob.has_magic(name)
        for real, what in resolved:
            if pattern:
                clash = os.path.dirname(real) == folder and fnmatch.fnmatchcase(os.path.basename(real), name)
            else:
                clash = real == out_real or _same_file(real, out_real)
            if clash:
                if pattern:
                    out = os.path.join(os.path.dirname(out), os.path.basename(real))
                raise InputError(f"the output {out} would overwrite {what}: "
                                 f"choose another output name or folder")


def _missing_folders(folder: str) -> list:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while folder and not os.path.lexists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def prepare_outputs(outputs: Iterable[str]) -> list:
    """Create the folders of the outputs and check a file can be created in each.

    Returns:
        the folders this call created, deepest first (for :func:`remove_empty_folders`).

    Raises:
        InputError: a folder cannot be created or written, or an output is a folder.
    """
    created: list = []
    folders = []
    for out in outputs:
        path = os.path.abspath(out)
        if not glob.has_magic(os.path.basename(path)) and os.path.isdir(path):
            raise InputError(f"the output {out} is a folder: give a file name")
        folder = os.path.dirname(path)
        if folder not in folders:
            folders.append(folder)
    try:
        for folder in folders:
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise InputError(f"cannot write into {folder}: it is a file, not a folder")
            created = _missing_folders(folder) + created
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise InputError(f"cannot create the output folder {folder}: {exc.strerror}") from None
            try:
                fd, probe = tempfile.mkstemp(prefix=".gsplat-write-test-", dir=folder)
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                raise InputError(f"cannot write into the output folder {folder}: {exc.strerror}") from None
    except InputError:
        remove_empty_folders(created)
        raise
    return created


def remove_empty_folders(folders: Iterable[str]) -> None:
    """Remove those of ``folders`` that are empty (deepest first); others stay."""
    for folder in sorted(folders, key=lambda f: f.count(os.sep), reverse=True):
        try:
            os.rmdir(folder)
        except OSError:
            pass
