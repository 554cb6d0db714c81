"""Datalists for the Learn2Reg NLST (lung CT) and OASIS (brain MR) task layouts.

NLST (``root/NLST_dataset.json``)::

    "training_paired_images": [{"fixed": "./imagesTr/NLST_0001_0000.nii.gz",
                                "moving": "./imagesTr/NLST_0001_0001.nii.gz"}, ...]
    "registration_val":       [{"fixed": ..., "moving": ...}, ...]
    masksTr/<image file name>                 lung masks
    keypointsTr/<image stem>.csv              rows "x,y,z": 0-based voxel indices (array order), no header

OASIS (``root/OASIS_dataset.json``)::

    "training":          [{"image": "./imagesTr/OASIS_0001_0000.nii.gz",
                           "label": "./labelsTr/OASIS_0001_0000.nii.gz"}, ...]
    "registration_val":  [{"fixed": "./imagesTr/OASIS_0438_0000.nii.gz", "moving": ...}, ...]
    labelsTr/<image file name>                label maps
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .datalist import read_json_file, resolve_entry_paths

__all__ = ["NLST_SPLITS", "OASIS_SPLITS", "nlst_datalist", "oasis_datalist"]

#: our split name -> key in NLST_dataset.json
NLST_SPLITS = {"training": "training_paired_images", "validation": "registration_val", "test": "registration_test"}
#: our split name -> key in OASIS_dataset.json
OASIS_SPLITS = {"training": "training", "validation": "registration_val", "test": "registration_test"}


def _dataset_entries(root: str | Path, json_name: str, split: str, splits: dict[str, str]) -> tuple[Path, Path, list]:
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root folder not found: {root_path}")
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(splits)}")
    json_path = root_path / json_name
    content = read_json_file(json_path)
    key = splits[split]
    if not isinstance(content, dict) or key not in content:
        raise ValueError(f"{json_path}: missing key {key!r} for split {split!r}")
    entries = content[key]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{json_path}: {key!r} must be a non-empty list")
    return root_path.resolve(), json_path, entries


def _pair_images(entry: Any, where: str) -> tuple[str, str]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: entry must be an object, got {type(entry).__name__}")
    for key in ("fixed", "moving"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ValueError(f"{where}: missing or invalid {key!r} path")
    return entry["fixed"], entry["moving"]


def _sibling(image_rel: str, folder: str, suffix: str | None = None) -> str:
    """Path of the file for ``image_rel`` in ``folder`` (same file name, or same stem + ``suffix``)."""
    name = Path(image_rel).name
    if suffix is not None:
        name = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
        name += suffix
    return f"{folder}/{name}"


def nlst_datalist(root: str | Path, split: str = "training", require_keypoints: bool = True) -> list[dict[str, Any]]:
    """Learn2Reg NLST pairs as datalist entries with absolute paths.

    Returns:
        Dicts with ``fixed_image``, ``moving_image``, ``fixed_label``, ``moving_label`` (lung masks from
        ``masksTr``), ``fixed_landmarks``, ``moving_landmarks`` (``keypointsTr`` CSVs, 0-based voxel indices; left out
        when absent and ``require_keypoints`` is False) and ``landmark_coordinates = "voxel"``.

    Raises:
        FileNotFoundError: missing root, JSON, image, mask or (if required) keypoint file.
        ValueError: unknown split, malformed JSON, missing split key or malformed entry.
    """
    base, json_path, entries = _dataset_entries(root, "NLST_dataset.json", split, NLST_SPLITS)
    result = []
    for index, raw in enumerate(entries):
        where = f"{json_path} [{NLST_SPLITS[split]}][{index}]"
        fixed, moving = _pair_images(raw, where)
        entry: dict[str, Any] = {
            "fixed_image": fixed,
            "moving_image": moving,
            "fixed_label": _sibling(fixed, "masksTr"),
            "moving_label": _sibling(moving, "masksTr"),
        }
        keypoints = {"fixed_landmarks": _sibling(fixed, "keypointsTr", ".csv"),
                     "moving_landmarks": _sibling(moving, "keypointsTr", ".csv")}
        if require_keypoints or all((base / p).is_file() for p in keypoints.values()):
            entry.update(keypoints)
            entry["landmark_coordinates"] = "voxel"
        result.append(resolve_entry_paths(entry, base, where))
    return result


def oasis_datalist(root: str | Path, split: str = "training") -> list[dict[str, Any]]:
    """Learn2Reg OASIS subjects (``split="training"``) or registration pairs (``"validation"``/``"test"``).

    Returns:
        training: dicts ``image``, ``label`` (plus ``mask`` when the JSON lists one); validation/test: dicts
        ``fixed_image``, ``moving_image``, ``fixed_label``, ``moving_label`` (label maps from ``labelsTr``), all
        absolute paths.

    Raises:
        FileNotFoundError: missing root, JSON, image or label file.
        ValueError: unknown split, malformed JSON, missing split key or malformed entry.
    """
    base, json_path, entries = _dataset_entries(root, "OASIS_dataset.json", split, OASIS_SPLITS)
    result = []
    for index, raw in enumerate(entries):
        where = f"{json_path} [{OASIS_SPLITS[split]}][{index}]"
        if split == "training":
            if not isinstance(raw, dict) or not isinstance(raw.get("image"), str):
                raise ValueError(f"{where}: entry must be an object with an 'image' path")
            entry = {k: raw[k] for k in ("image", "label", "mask") if k in raw}
            entry.setdefault("label", _sibling(raw["image"], "labelsTr"))
        else:
            fixed, moving = _pair_images(raw, where)
            entry = {
                "fixed_image": fixed,
                "moving_image": moving,
                "fixed_label": _sibling(fixed, "labelsTr"),
                "moving_label": _sibling(moving, "labelsTr"),
            }
        result.append(resolve_entry_paths(entry, base, where))
    return result
