"""A particle STAR file as it was read, and writing it back with a program's columns.

:func:`~scipion_gsplat.core.io.read_particles` normalises a table for the
numerics (optics merged into the rows, origins in Å, CTF defaults). Users need
the opposite on the way out: the file they gave us, every block, row, column
and value unchanged — micrograph names, coordinates, pixel-unit origins,
custom columns, the optics table, extra blocks such as ``data_general`` and the
version line — so they can go back to RELION (re-extraction, polishing, CTF
refinement). :class:`StarSource` keeps the tables as read and
:func:`output_blocks` builds the output blocks: the input's rows (matched through
:data:`~scipion_gsplat.core.io.SOURCE_ROW`), their raw columns, plus the columns a
program added or changed (optics values go to the optics table).

Also here: the line-level helpers that name the line of a damaged file
(:func:`short_row`) and read its version (:func:`version_line`).
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

# Normalised columns whose raw form is another column (pixel-unit origins).
RAW_FORMS = {"rlnOriginXAngst": "rlnOriginX", "rlnOriginYAngst": "rlnOriginY"}


@dataclass
class StarSource:
    """The blocks of a STAR file as read (DataFrames for loops, dicts for
    key-value blocks), in file order.

    Attributes:
        blocks: ``{name: table}``; never modified.
        particles_key: name of the particle block (``particles``, ``''``, ``images`` ...).
        optics_key: name of the optics block, None for RELION 3.0 files.
        version: the ``# version`` number of the file (e.g. ``'50001'``), None without one.
        derived: the columns normalisation added (optics values, origins in Å,
            CTF defaults ...) as first computed, one row per file row: a program's
            change to them is told from these, not from a table it may have edited.
        kept: the raw particle columns the normalised table has too; one that a
            caller removed from the rows it writes is left out of the output.
    """
    blocks: dict
    particles_key: str
    optics_key: Optional[str]
    version: Optional[str]
    derived: Optional[pd.DataFrame] = None
    kept: tuple = ()


def version_line(path) -> Optional[str]:
    """The number of the first ``# version NNNNN`` comment before the first data
    block, or None."""
    with open(path, "r", errors="replace") as fh:
        for _, line in zip(range(200), fh):
            m = re.match(r"\s*#\s*version\s+(\d+)", line)
            if m:
                return m.group(1)
            if line.startswith("data_"):
                break
    return None


def _loop_rows(path, block: str):
    """Yield ``(line_number, n_values, n_columns)`` for each data row of the loop
    of ``data_<block>`` (1-based line numbers)."""
    in_block, columns, started = False, 0, False
    with open(path, "r", errors="replace") as fh:
        for ln, line in enumerate(fh, 1):
            text = line.strip()
            if text.startswith("data_"):
                if in_block:
                    return
                in_block = text == "data_" + block
                continue
            if not in_block or not text or text.startswith("#") or text == "loop_":
                continue
            if text.startswith("_"):
                if started:  # a key-value pair after the loop: the loop is over
                    return
                columns += 1
                continue
            started = True
            values = shlex.split(text) if ('"' in text or "'" in text) else text.split()
            yield ln, len(values), columns


def short_row(path, block: str) -> Optional[str]:
    """Describe the first row of ``data_<block>`` with fewer values than
    columns (``'line 17 (row 3) has 9 of 12 values'``), or None."""
    for k, (ln, n, cols) in enumerate(_loop_rows(path, block)):
        if n < cols:
            return f"line {ln} (row {k + 1}) has {n} of {cols} values"
    return None


def _same(new: np.ndarray, old: np.ndarray) -> bool:
    """Whether a column still holds the values it was read with."""
    if len(new) != len(old):
        return False
    try:
        a, b = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
        return bool(np.array_equal(a, b, equal_nan=True))
    except (TypeError, ValueError):
        return bool(np.array_equal(np.asarray(new, dtype=str), np.asarray(old, dtype=str)))


def _ours(values) -> pd.Series:
    """A program's float column as text with 6 decimals (RELION's own style);
    other columns unchanged."""
    s = pd.Series(values).reset_index(drop=True)
    if pd.api.types.is_float_dtype(s):
        return s.map("{:.6f}".format)
    return s


def output_blocks(source: StarSource, parts: pd.DataFrame, filled: dict) -> dict:
    """The blocks of an output STAR file: the source file's blocks with the
    particle rows ``parts[SOURCE_ROW]`` of its particle table, every raw column
    unchanged, plus the columns of ``parts`` that are new or whose values differ
    from the file's (raw or as first normalised), and the values in ``filled``
    (options that completed the file, e.g. ``--amplitude-contrast``).

    Args:
        source: the file as read.
        parts: the rows to write, normalised columns + the program's (has SOURCE_ROW).
        filled: ``{label: value}`` filled in from the command line.

    Returns:
        ``{block name: DataFrame or dict}`` in the source's order. Raw float
        columns are written with Python's shortest exact representation, the
        program's float columns with 6 decimals.
    """
    from .io import OPTICS_COLUMNS, SOURCE_ROW
    rows = parts[SOURCE_ROW].to_numpy(np.int64)
    raw = source.blocks[source.particles_key]
    out = raw.iloc[rows].reset_index(drop=True).copy()
    for col in out.columns:  # exact text of the values as read
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].astype(str)
    derived = source.derived if source.derived is not None else pd.DataFrame(index=raw.index)
    out = out.drop(columns=[c for c in source.kept if c not in parts.columns])
    optics = None
    if source.optics_key is not None:
        optics = source.blocks[source.optics_key].copy()
        for col in optics.columns:
            if pd.api.types.is_float_dtype(optics[col]):
                optics[col] = optics[col].astype(str)
    groups = parts["rlnOpticsGroup"].to_numpy() if "rlnOpticsGroup" in parts else None
    for col in parts.columns:
        if col == SOURCE_ROW:
            continue
        new = parts[col].to_numpy()
        if col in filled:
            old = None
        elif col in raw.columns:
            old = raw[col].to_numpy()[rows]
        elif col in derived.columns:
            old = derived[col].to_numpy()[rows]
        else:
            old = None
        if old is not None:
            if col == "rlnImageSize" and not (np.asarray(old) > 0).all():
                old = new  # box read from the stacks: not a change
            if _same(new, old):
                continue
        if optics is not None and col in OPTICS_COLUMNS:
            _set_optics(optics, col, new, groups)
            if col in out.columns:
                out[col] = _ours(new)
            continue
        out[col] = _ours(new)
        if col in RAW_FORMS and RAW_FORMS[col] in out.columns:  # Å origin supersedes the pixel one
            out = out.drop(columns=[RAW_FORMS[col]])
    if optics is not None:  # RELION needs both in the optics table
        if "rlnImageSize" not in optics and "rlnImageSize" in parts and (parts["rlnImageSize"] > 0).all():
            _set_optics(optics, "rlnImageSize", parts["rlnImageSize"].to_numpy(), groups)
        if "rlnImageDimensionality" not in optics:
            optics["rlnImageDimensionality"] = 2
    blocks = {}
    for name, table in source.blocks.items():
        if name == source.particles_key:
            blocks[name] = out
        elif name == source.optics_key:
            blocks[name] = optics
        else:
            blocks[name] = table
    return blocks


def _set_optics(optics: pd.DataFrame, col: str, values: np.ndarray, groups) -> None:
    """Put per-row ``values`` of an optics label into the optics table (the
    first value of each group; groups without rows keep theirs)."""
    per_group = pd.Series(values).groupby(np.asarray(groups)).first()
    ids = optics["rlnOpticsGroup"].to_numpy()
    mapped = pd.Series(ids).map(per_group)
    if col in optics:
        keep = mapped.isna().to_numpy()
        text = _ours(mapped.to_numpy())
        optics[col] = np.where(keep, optics[col].astype(str).to_numpy(), text.astype(str).to_numpy())
    else:
        optics[col] = _ours(mapped.fillna(pd.Series(values).iloc[0]).to_numpy())


def rebase_image_names(names, old_dir, new_dir, data_dir=None) -> list:
    """Rewrite relative stack paths of ``index@stack`` names so that they still
    point to the same files from a STAR file written into ``new_dir``.

    Names relative to ``data_dir`` (a RELION project folder given with
    ``--data-dir``) stay as they are: they are relative to the project, not to
    the STAR file. Only stacks that exist relative to ``old_dir`` (the input
    STAR file's folder) are rebased.
    """
    old_dir, new_dir = Path(old_dir).absolute(), Path(new_dir).absolute()
    names = pd.Series(names, dtype=str).reset_index(drop=True)
    if old_dir == new_dir:
        return names.tolist()
    split = names.str.partition("@")
    has_at = split[1] == "@"
    stacks = split[2].where(has_at, split[0])
    index = split[0].where(has_at, "")
    sep = split[1]
    mapping = {}
    for stack in stacks.unique():
        mapping[stack] = stack
        if os.path.isabs(stack):
            continue
        if data_dir is not None and (Path(data_dir) / stack).exists():
            continue
        if (old_dir / stack).exists():
            mapping[stack] = os.path.relpath(old_dir / stack, new_dir)
    return (index + sep + stacks.map(mapping)).tolist()
