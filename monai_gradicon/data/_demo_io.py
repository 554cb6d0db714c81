"""File helpers for the synthetic demo datasets: deterministic NIfTI/CSV writing and an ownership manifest.

A demo dataset folder holds only the files listed in its manifest (``monai_gradicon_demo.json``). The manifest is
written first with ``"complete": false`` and the expected file names, then rewritten with the SHA-256 of every file
once all of them are written, so an interrupted run is detected and finished on the next call, while folders with
files of somebody else are never touched.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

MANIFEST_NAME = "monai_gradicon_demo.json"


def save_nifti(path: Path, volume: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    """Write a [1, X, Y, Z] (or [X, Y, Z]) array as a NIfTI file with ``affine`` (mm) in qform and sform."""
    data = np.asarray(volume)
    if data.ndim == 4:
        if data.shape[0] != 1:
            raise ValueError(f"expected a single-channel [1, X, Y, Z] volume, got shape {data.shape}")
        data = data[0]
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def save_landmarks_csv(path: Path, points_mm: np.ndarray) -> None:
    """Write (K, 3) world coordinates (mm) as CSV with the header ``x_mm,y_mm,z_mm``."""
    pts = np.asarray(points_mm, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"landmarks must have shape (K, 3), got {pts.shape}")
    lines = ["x_mm,y_mm,z_mm"] + [f"{x:.4f},{y:.4f},{z:.4f}" for x, y, z in pts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def save_json(path: Path, content: Any) -> None:
    """Write JSON deterministically (sorted keys, 2-space indent, trailing newline)."""
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(generator: str, params: Mapping[str, Any], files: Mapping[str, str | None], complete: bool) -> dict:
    return {"generator": generator, "params": dict(params), "files": dict(files), "complete": complete}


def dataset_is_complete(out_dir: Path, generator: str, params: Mapping[str, Any], file_names: Sequence[str]) -> bool:
    """Check ``out_dir`` before (re)writing a demo dataset.

    Returns:
        True when the folder already holds the complete dataset for ``params`` (nothing to write), False when the
        dataset must be written (missing/empty folder, or an unfinished or damaged dataset of ours).

    Raises:
        NotADirectoryError: ``out_dir`` exists and is not a folder.
        FileExistsError: the folder holds files that are not part of this dataset, or a demo dataset generated
            with other parameters or by another generator.
    """
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise NotADirectoryError(f"demo dataset output {out_dir} exists and is not a folder")
    params = json.loads(json.dumps(params))
    entries = sorted(p.name for p in out_dir.iterdir())
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        if entries:
            raise FileExistsError(
                f"{out_dir} is not empty and holds no {MANIFEST_NAME}; refusing to write the demo dataset among "
                f"unrelated files: {entries[:5]}{' ...' if len(entries) > 5 else ''}"
            )
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        recorded_generator, recorded_params, recorded_files = (
            manifest["generator"], manifest["params"], manifest["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise FileExistsError(f"{manifest_path} is not a valid demo dataset manifest ({err}); not touching {out_dir}")
    if recorded_generator != generator or recorded_params != params:
        raise FileExistsError(
            f"{out_dir} holds a demo dataset written by {recorded_generator} with parameters {recorded_params}, not "
            f"{generator} with {params}; use another out_dir or delete that folder"
        )
    unrelated = [name for name in entries if name != MANIFEST_NAME and name not in set(file_names)]
    if unrelated:
        raise FileExistsError(f"{out_dir} holds files that are not part of the demo dataset: {unrelated[:5]}")
    if not manifest.get("complete", False):
        return False
    for name in file_names:
        path = out_dir / name
        if not path.is_file() or recorded_files.get(name) != _sha256(path):
            return False
    return True


def begin_dataset(out_dir: Path, generator: str, params: Mapping[str, Any], file_names: Sequence[str]) -> None:
    """Create ``out_dir`` and claim it with an incomplete manifest listing ``file_names``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / MANIFEST_NAME, _manifest(generator, params, {n: None for n in file_names}, complete=False))


def finish_dataset(out_dir: Path, generator: str, params: Mapping[str, Any], file_names: Sequence[str]) -> None:
    """Record the SHA-256 of every written file and mark the dataset complete."""
    missing = [name for name in file_names if not (out_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"demo dataset writer did not produce {missing} in {out_dir}")
    hashes = {name: _sha256(out_dir / name) for name in file_names}
    save_json(out_dir / MANIFEST_NAME, _manifest(generator, params, hashes, complete=True))
