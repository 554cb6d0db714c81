"""Atomic file writes: an interrupted save never leaves a truncated or half-written file behind.

This is the one writer every file of the project goes through (images, fields, checkpoints, reports, PNGs).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_write", "atomic_torch_save", "atomic_write_text", "jsonable"]


def _temporary_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".tmp-{uuid.uuid4().hex[:12]}-{name}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> str:
    """Call ``write(tmp_path)`` on a new temporary file next to ``path``, then rename it over ``path``.

    The temporary file is created empty with mode ``0o666`` and the process umask applied by the kernel (the
    permissions a plain ``open()`` gives; no process-wide umask change, so it is safe in threaded servers). The
    rename is atomic on POSIX file systems: readers see either the old file or the complete new one. On any error
    (or Ctrl-C) the temporary file is removed and ``path`` is untouched. Returns ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _temporary_name(os.path.join(folder, os.path.basename(path)))
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write a UTF-8 text file through :func:`atomic_write`."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def jsonable(obj: Any) -> Any:
    """``obj`` with what ``json.dumps(..., allow_nan=False)`` cannot write made writable: mappings (keys as str),
    lists / tuples, numpy numbers and arrays as Python values, and non-finite floats as ``None`` (JSON ``null``).
    The one home of this conversion for every JSON file the project writes."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj
