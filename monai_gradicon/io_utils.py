"""Small file helpers: atomic writes so an interrupted save never leaves a truncated file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["atomic_write", "atomic_torch_save"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    The rename is atomic on POSIX file systems: readers see either the old file or the complete new one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file 0600; give the result the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
