"""DIR-Lab COPDGene breath-hold CT pairs (10 cases, 300 expert landmarks per phase).

Expected layout under ``root`` (the nested ``copd{i}/copd{i}/`` layout of the original archives is accepted too)::

    copd{i}/copd{i}_iBHCT.img            inspiration CT, raw int16 little-endian, x fastest, then y, then z
    copd{i}/copd{i}_eBHCT.img            expiration CT
    copd{i}/copd{i}_300_iBH_xyz_r1.txt   300 rows "x<TAB>y<TAB>z", 1-based voxel indices
    copd{i}/copd{i}_300_eBH_xyz_r1.txt

Axis convention used here: images are returned as ``[X, Y, Z]`` arrays (raw x = column, y = row, z = slice), so
array index ``(i, j, k)`` = landmark ``(x - 1, y - 1, z - 1)``. The affine is ``diag(sx, sy, sz, 1)`` with zero
origin, so world = index * spacing and landmark world = (landmark index - 1) * spacing, in mm. This is the DIR-Lab
index frame scaled to mm, not a calibrated RAS frame (the raw files carry no orientation); distances, and hence
target registration errors, are correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ._demo_io import save_json, save_landmarks_csv, save_nifti
from .landmarks import read_landmarks

__all__ = [
    "DIRLAB_COPD_CASES",
    "DIRLAB_HU_OFFSET",
    "DirLabCase",
    "dirlab_affine",
    "dirlab_copd_datalist",
    "dirlab_copd_to_nifti",
    "read_dirlab_image",
    "read_dirlab_landmarks",
]

#: HU = raw value + offset. The DIR-Lab raw files store HU + 1024 (air ~ 0); pass ``hu_offset=0`` for copies that
#: were already converted to HU.
DIRLAB_HU_OFFSET = -1024.0


@dataclass(frozen=True)
class DirLabCase:
    """Grid of one DIR-Lab case: ``shape`` = (X, Y, Z) voxels, ``spacing_mm`` = (sx, sy, sz) mm."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]


def _copd(z: int, s: float) -> DirLabCase:
    return DirLabCase((512, 512, z), (s, s, 2.5))


#: the ten COPDGene cases; pass ``cases=`` to the functions below to use another table (e.g. in tests)
DIRLAB_COPD_CASES: dict[str, DirLabCase] = {
    "copd1": _copd(121, 0.625),
    "copd2": _copd(102, 0.645),
    "copd3": _copd(126, 0.652),
    "copd4": _copd(126, 0.590),
    "copd5": _copd(131, 0.647),
    "copd6": _copd(119, 0.633),
    "copd7": _copd(112, 0.625),
    "copd8": _copd(115, 0.586),
    "copd9": _copd(116, 0.664),
    "copd10": _copd(135, 0.742),
}


def _case_info(case: str | DirLabCase, cases: Mapping[str, DirLabCase] | None) -> DirLabCase:
    if isinstance(case, DirLabCase):
        return case
    table = DIRLAB_COPD_CASES if cases is None else cases
    if case not in table:
        raise ValueError(f"unknown DIR-Lab case {case!r}; known cases: {sorted(table)}")
    return table[case]


def dirlab_affine(case: str | DirLabCase, cases: Mapping[str, DirLabCase] | None = None) -> np.ndarray:
    """(4, 4) affine ``diag(sx, sy, sz, 1)`` (mm, zero origin) of a DIR-Lab case, see the module docstring."""
    return np.diag(list(_case_info(case, cases).spacing_mm) + [1.0])


def read_dirlab_image(
    path: str | Path,
    case: str | DirLabCase,
    cases: Mapping[str, DirLabCase] | None = None,
    hu_offset: float = DIRLAB_HU_OFFSET,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a DIR-Lab raw ``.img`` CT.

    Args:
        path: the ``copd{i}_iBHCT.img`` / ``copd{i}_eBHCT.img`` file (int16 little-endian, no header).
        case: case name in ``cases`` (e.g. ``"copd1"``) or a :class:`DirLabCase`.
        cases: case table, default :data:`DIRLAB_COPD_CASES`.
        hu_offset: added to the raw values to obtain HU (default :data:`DIRLAB_HU_OFFSET`).

    Returns:
        ``(image, affine)``: ``[X, Y, Z]`` float32 array in HU and the (4, 4) mm affine of :func:`dirlab_affine`.

    Raises:
        FileNotFoundError: missing file. ValueError: unknown case or file size not matching the case's shape.
    """
    path = Path(path)
    info = _case_info(case, cases)
    if not path.is_file():
        raise FileNotFoundError(f"DIR-Lab image not found: {path}")
    expected = int(np.prod(info.shape)) * 2
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path} has {actual} bytes but case shape {info.shape} of int16 needs {expected}: wrong case or file"
        )
    raw = np.fromfile(path, dtype="<i2").reshape(info.shape[::-1])  # (Z, Y, X): x varies fastest in the file
    image = raw.transpose(2, 1, 0).astype(np.float32) + np.float32(hu_offset)
    return np.ascontiguousarray(image), dirlab_affine(info)


def read_dirlab_landmarks(
    path: str | Path, case: str | DirLabCase, cases: Mapping[str, DirLabCase] | None = None
) -> np.ndarray:
    """Read a DIR-Lab landmark file (1-based x y z voxel indices) as (K, 3) world coordinates in mm.

    world = (index - 1) * spacing, matching the affine of :func:`read_dirlab_image` (K = 300 for COPDGene).

    Raises:
        FileNotFoundError: missing file. ValueError: malformed file or an index outside the case's grid.
    """
    info = _case_info(case, cases)
    indices = read_landmarks(path)
    shape = np.asarray(info.shape, dtype=np.float64)
    outside = np.any((indices < 0.5) | (indices > shape + 0.5), axis=1)
    if outside.any():
        row = int(np.argmax(outside))
        raise ValueError(
            f"{path}: landmark {row + 1} {indices[row].tolist()} lies outside the 1-based grid {info.shape}"
        )
    return (indices - 1.0) * np.asarray(info.spacing_mm, dtype=np.float64)


def _case_folder(root: Path, name: str) -> Path | None:
    for folder in (root / name / name, root / name):
        if (folder / f"{name}_iBHCT.img").is_file() or (folder / f"{name}_eBHCT.img").is_file():
            return folder
    return root / name if (root / name).is_dir() else None


def dirlab_copd_datalist(root: str | Path, cases: Mapping[str, DirLabCase] | None = None) -> list[dict[str, str]]:
    """List the DIR-Lab COPDGene pairs found under ``root``.

    Returns:
        One dict per case folder found, ordered by case number: ``case`` (name), ``fixed_image`` (inspiration
        ``.img``), ``moving_image`` (expiration), ``fixed_landmarks``, ``moving_landmarks`` (``.txt``, 1-based
        voxel indices: read them with :func:`read_dirlab_landmarks`), all absolute paths.

    Raises:
        FileNotFoundError: ``root`` missing, no case folder in it, or a case folder missing one of its 4 files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DIR-Lab root folder not found: {root}")
    table = DIRLAB_COPD_CASES if cases is None else cases
    entries = []
    for name in sorted(table, key=lambda n: (len(n), n)):
        folder = _case_folder(root, name)
        if folder is None:
            continue
        files = {
            "fixed_image": folder / f"{name}_iBHCT.img",
            "moving_image": folder / f"{name}_eBHCT.img",
            "fixed_landmarks": folder / f"{name}_300_iBH_xyz_r1.txt",
            "moving_landmarks": folder / f"{name}_300_eBH_xyz_r1.txt",
        }
        for key, path in files.items():
            if not path.is_file():
                raise FileNotFoundError(f"DIR-Lab case {name}: {key} file not found: {path}")
        entries.append({"case": name, **{key: str(path.resolve()) for key, path in files.items()}})
    if not entries:
        raise FileNotFoundError(f"no DIR-Lab case folder ({', '.join(sorted(table))}) under {root}")
    return entries


def dirlab_copd_to_nifti(
    root: str | Path,
    out_dir: str | Path,
    cases: Mapping[str, DirLabCase] | None = None,
    hu_offset: float = DIRLAB_HU_OFFSET,
    split: str = "test",
) -> Path:
    """Convert the DIR-Lab cases under ``root`` to NIfTI (int16 HU) + landmark CSV (world mm) + ``datalist.json``.

    The datalist (readable with :func:`monai_gradicon.data.datalist.load_datalist`) holds the pairs under ``split``
    with keys ``fixed_image`` (inspiration), ``moving_image``, ``fixed_landmarks``, ``moving_landmarks``; the NIfTI
    affines are those of :func:`read_dirlab_image`, so landmark CSVs and images share one world frame.

    Raises:
        FileExistsError: a file to be written already exists in ``out_dir`` (nothing is overwritten).
    """
    out = Path(out_dir)
    entries = dirlab_copd_datalist(root, cases)
    names = ["datalist.json"] + [
        f"{e['case']}_{phase}{ext}" for e in entries for phase in ("iBHCT", "eBHCT") for ext in (".nii.gz", ".csv")
    ]
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise FileExistsError(f"{out} already holds {existing[:4]}; refusing to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for entry in entries:
        name = entry["case"]
        pair = {}
        for role, phase in (("fixed", "iBHCT"), ("moving", "eBHCT")):
            image, affine = read_dirlab_image(entry[f"{role}_image"], name, cases, hu_offset)
            save_nifti(out / f"{name}_{phase}.nii.gz", np.clip(np.rint(image), -32768, 32767), affine, np.int16)
            landmarks_mm = read_dirlab_landmarks(entry[f"{role}_landmarks"], name, cases)
            save_landmarks_csv(out / f"{name}_{phase}.csv", landmarks_mm)
            pair[f"{role}_image"] = f"{name}_{phase}.nii.gz"
            pair[f"{role}_landmarks"] = f"{name}_{phase}.csv"
        pairs.append({"case": name, **pair})
    save_json(out / "datalist.json", {"landmark_coordinates": "world_mm", split: pairs})
    return out / "datalist.json"
