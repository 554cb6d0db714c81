"""Reading landmark / keypoint files (CSV or whitespace/tab separated text, with or without a header row)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

__all__ = ["read_landmarks"]

_SEPARATORS = re.compile(r"[,;\s]+")
_DELIMITERS = (",", ";", "\t")


def _split(text: str, delimiter: str | None) -> list[str]:
    """Split a row on the file's delimiter (so a header name may hold spaces, e.g. ``point id``), or on runs of
    whitespace when the file has none."""
    if delimiter is None:
        return [t for t in _SEPARATORS.split(text) if t]
    return [t.strip() for t in text.split(delimiter) if t.strip()]


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _xyz_columns(header: list[str], path: Path) -> list[int]:
    """Indices of the x, y, z columns of a header row."""
    names = [name.strip().strip('"').lower() for name in header]
    picked = []
    for axis in ("x", "y", "z"):
        matches = [i for i, name in enumerate(names) if name == axis or name.startswith(axis + "_")]
        if len(matches) == 1:
            picked.append(matches[0])
    if len(picked) == 3:
        return picked
    if len(names) == 3:
        return [0, 1, 2]
    raise ValueError(
        f"cannot find the x, y, z columns in the header {header} of {path}: name them x/y/z (optionally with a "
        "suffix such as x_mm) or use exactly three columns"
    )


def read_landmarks(path: str | Path) -> np.ndarray:
    """Read K landmarks as a (K, 3) float64 array, in whatever units the file uses (voxels or mm).

    Accepted: comma, semicolon, tab or space separated values; blank lines and ``#`` comments are skipped; an
    optional header row (any non-numeric token in the first row). Without a header every row must have exactly 3
    values. With a header, columns named ``x``, ``y``, ``z`` (or ``x_*``, e.g. ``x_mm``) are used, or the three
    columns if there are exactly three.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, a row has the wrong number of values, or a value is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark file not found: {path}")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text landmark file (it holds binary data); expected rows of x, y, z "
                         "numbers") from None
    lines = [(n, line.strip()) for n, line in enumerate(content.splitlines(), start=1)]
    lines = [(n, text) for n, text in lines if text and not text.startswith("#")]
    first = lines[0][1] if lines else ""
    delimiter = next((d for d in _DELIMITERS if d in first), None)
    rows: list[tuple[int, list[str]]] = [(n, _split(text, delimiter)) for n, text in lines]
    if not rows:
        raise ValueError(f"no landmarks in {path}")
    columns = [0, 1, 2]
    n_values = 3
    if not all(_is_number(t) for t in rows[0][1]):
        header = rows.pop(0)[1]
        columns, n_values = _xyz_columns(header, path), len(header)
        if not rows:
            raise ValueError(f"no landmarks in {path} (only a header row)")
    points = np.empty((len(rows), 3), dtype=np.float64)
    for i, (line_no, tokens) in enumerate(rows):
        if len(tokens) != n_values:
            raise ValueError(f"{path}, line {line_no}: expected {n_values} values, found {len(tokens)}: {tokens}")
        try:
            points[i] = [float(tokens[c]) for c in columns]
        except ValueError:
            raise ValueError(f"{path}, line {line_no}: non-numeric coordinate in {tokens}") from None
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{path}: landmarks contain NaN or infinite values")
    return points
