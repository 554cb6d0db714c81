"""Learn2Reg-compatible evaluation and submission files (NLST lung CT, OASIS brain MR, LUMIR, ...).

**The Learn2Reg field** (what a submission holds and what :func:`evaluate_learn2reg` scores): a displacement field
``d`` on the fixed image's voxel grid in the ``scipy.ndimage.map_coordinates`` convention -- voxel units, channel
``k`` along array axis ``k`` -- such that fixed voxel ``x`` (0-based index, array order) corresponds to the moving
image's continuous voxel index ``x + d(x)``: ``warped = map_coordinates(moving, identity + d)``. When both images
share one grid (as in the Learn2Reg tasks) it is this project's MONAI DDF (``ddf_voxels.nii.gz``); in general
``d(i) = A_moving^-1 (A_fixed i + u(i)) - i`` with ``u`` the world-mm field of a result (:func:`learn2reg_field`).

**Files** (:func:`export_learn2reg`, :func:`read_learn2reg_field`): ``disp_FFFF_MMMM.nii.gz`` -- a 4D NIfTI of shape
``(X, Y, Z, 3)`` (channel last), float32, with the fixed image's affine (the evaluation ignores it) -- or
``disp_FFFF_MMMM.npz`` holding exactly one array of that shape (``arr_0``, float32 or float16). ``FFFF`` / ``MMMM``
are the subject numbers of the fixed and moving images (``NLST_0101_0000.nii.gz`` -> ``0101``); when the two
modality suffixes differ (and are not ``0000`` -> ``0001``) the name carries them too:
``disp_FFFF_fmod_MMMM_mmod`` (:meth:`Learn2RegPair.field_name`). Zip the folder of fields for a grand-challenge
submission.

**Metrics** (per case, then aggregated over cases with mean, std and the 0.3 quantile ``"30"``; definitions and
sources in :mod:`monai_gradicon.metrics`): ``TRE_mm`` (mean keypoint error,
:func:`~monai_gradicon.metrics.learn2reg_tre`), ``DSC`` and ``HD95_mm`` (per label,
:func:`~monai_gradicon.metrics.learn2reg_dice`, :func:`~monai_gradicon.metrics.learn2reg_hd95`), ``SDlogJ``
(:func:`~monai_gradicon.metrics.learn2reg_sdlogj`), ``NDV_percent`` and ``NDP_percent``
(:func:`~monai_gradicon.metrics.non_diffeomorphic_volume`) and ``runtime_s`` (from the ``summary.json`` of this
project's result folders; unknown for plain fields). TRE30 / DSC30 / HD95_30 are the ``"30"`` aggregates:
``numpy.quantile(case values, 0.3)``, as the official evaluation computes them.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_gradicon.io import NIFTI_SUFFIXES, read_image, spatial_affine, write_nifti
from monai_gradicon.io_utils import atomic_write, atomic_write_text, jsonable
from monai_gradicon.metrics import (
    LEARN2REG_QUANTILE,
    learn2reg_aggregate,
    learn2reg_dice,
    learn2reg_hd95,
    learn2reg_sdlogj,
    learn2reg_tre,
    non_diffeomorphic_volume,
)
from monai_gradicon.pipeline.result import OUTPUT_FILES, RegistrationResult, read_label_image
from monai_gradicon.resample import Grid

__all__ = [
    "LEARN2REG_SPLITS",
    "LEARN2REG_METRICS",
    "NDV_MASKS",
    "FIELD_DTYPES",
    "Learn2RegPair",
    "Learn2RegEvaluation",
    "read_learn2reg_pairs",
    "learn2reg_field",
    "export_learn2reg",
    "export_saved_learn2reg",
    "read_learn2reg_field",
    "warp_labels",
    "evaluate_learn2reg_pair",
    "evaluate_learn2reg",
]

LEARN2REG_SPLITS = {"training": "training_paired_images", "validation": "registration_val", "test": "registration_test"}
"""Our split name -> key of the pair list in a Learn2Reg ``*_dataset.json``."""

LEARN2REG_METRICS = ("tre", "dice", "hd95", "sdlogj", "ndv")
"""What :func:`evaluate_learn2reg` can compute (the official ``metric`` names, plus ``ndv`` of the LUMIR
evaluation)."""

NDV_MASKS = ("none", "moving_image", "fixed_mask")
"""Where the NDV is evaluated: every interior voxel; voxels with ``moving image > 0`` (what the LUMIR evaluation
does: the images there are skull-stripped); or inside the fixed image's ``masks*/`` file."""

FIELD_DTYPES = ("float32", "float16")

_NAME = re.compile(r"_(\d{4})_(\d{4})\.nii\.gz$")
_RUNTIME_KEY = "total_before_write"


# ----------------------------------------------------------------------------------------------------------------
# pairs and file names
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Learn2RegPair:
    """One registration pair of a Learn2Reg dataset JSON.

    Attributes:
        fixed, moving: the image paths as written in the JSON (relative to the dataset root, e.g.
            ``./imagesTr/NLST_0101_0000.nii.gz``); names end in ``_SSSS_MMMM.nii.gz`` (subject, modality).
    """

    fixed: str
    moving: str

    def __post_init__(self) -> None:
        for what, path in (("fixed", self.fixed), ("moving", self.moving)):
            if not _NAME.search(path):
                raise ValueError(f"The {what} image {path!r} is not named like a Learn2Reg image "
                                 "(..._SSSS_MMMM.nii.gz: four-digit subject and modality numbers).")

    def _parts(self, path: str) -> tuple[str, str]:
        match = _NAME.search(path)
        assert match is not None  # checked in __post_init__
        return match.group(1), match.group(2)

    @property
    def fixed_subject(self) -> str:
        return self._parts(self.fixed)[0]

    @property
    def fixed_modality(self) -> str:
        return self._parts(self.fixed)[1]

    @property
    def moving_subject(self) -> str:
        return self._parts(self.moving)[0]

    @property
    def moving_modality(self) -> str:
        return self._parts(self.moving)[1]

    @property
    def key(self) -> str:
        """The case name of the official results: ``"FFFF_fmod<--MMMM_mmod"``."""
        return f"{self.fixed_subject}_{self.fixed_modality}<--{self.moving_subject}_{self.moving_modality}"

    @property
    def short_name_allowed(self) -> bool:
        """Whether the field may be named ``disp_FFFF_MMMM`` (same modality, or fixed ``0000`` and moving
        ``0001``, as the official evaluation accepts)."""
        return self.fixed_modality == self.moving_modality or (self.fixed_modality, self.moving_modality) == (
            "0000", "0001")

    @property
    def field_stems(self) -> tuple[str, ...]:
        """The field names (without suffix) the official evaluation looks for, in its order."""
        full = f"disp_{self.fixed_subject}_{self.fixed_modality}_{self.moving_subject}_{self.moving_modality}"
        if self.short_name_allowed:
            return (f"disp_{self.fixed_subject}_{self.moving_subject}", full)
        return (full,)

    def field_name(self, suffix: str = ".nii.gz") -> str:
        """The file name to submit this pair's field under (the short name where it is allowed)."""
        if suffix not in (".nii.gz", ".npz"):
            raise ValueError(f"A Learn2Reg field is a .nii.gz or .npz file, got suffix {suffix!r}.")
        return self.field_stems[0] + suffix

    def sibling(self, which: str, folder: str, suffix: str | None = None) -> str:
        """The path (relative, as in the JSON) of the fixed or moving image's file in another folder:
        ``images`` replaced by ``folder`` (``labels``, ``masks``, ``keypoints``), optionally ``.nii.gz`` by
        ``suffix`` -- the official evaluation's rule."""
        path = self.fixed if which == "fixed" else self.moving
        path = path.replace("images", folder)
        return path[: -len(".nii.gz")] + suffix if suffix is not None else path


def read_learn2reg_pairs(dataset_json: str | os.PathLike, split: str = "validation") -> tuple[str, list[Learn2RegPair]]:
    """``(task name, pairs)`` of a split of a Learn2Reg ``*_dataset.json`` (:data:`LEARN2REG_SPLITS`)."""
    path = os.fspath(dataset_json)
    if split not in LEARN2REG_SPLITS:
        raise ValueError(f"split must be one of {sorted(LEARN2REG_SPLITS)}, got {split!r}.")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"The Learn2Reg dataset JSON does not exist: {path}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    key = LEARN2REG_SPLITS[split]
    if not isinstance(content, dict) or not isinstance(content.get(key), list) or not content[key]:
        raise ValueError(f"{path} has no non-empty list {key!r} (split {split!r}).")
    pairs = []
    for index, entry in enumerate(content[key]):
        if not isinstance(entry, dict) or not isinstance(entry.get("fixed"), str) or not isinstance(
                entry.get("moving"), str):
            raise ValueError(f"{path} [{key}][{index}] must be an object with 'fixed' and 'moving' paths.")
        pairs.append(Learn2RegPair(entry["fixed"], entry["moving"]))
    keys = [p.key for p in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"{path} [{key}] lists the pair(s) {duplicates} more than once.")
    name = content.get("name")
    return (str(name) if name is not None else Path(path).stem), pairs


# ----------------------------------------------------------------------------------------------------------------
# fields: conversion, files
# ----------------------------------------------------------------------------------------------------------------


def learn2reg_field(displacement_mm: np.ndarray, fixed_grid: Grid, moving_grid: Grid) -> np.ndarray:
    """A world-mm field (this project's ``displacement``: ``[3, *S_fixed]`` RAS mm, fixed point ``x`` -> moving
    point ``x + u(x)``) as a Learn2Reg field: ``d(i) = A_moving^-1 (A_fixed i + u(i)) - i``, ``[3, *S_fixed]``
    float32, voxels; channel ``k`` along array axis ``k`` of the fixed grid, ``i + d(i)`` an index of the moving
    grid. Identical to the MONAI DDF ``A_fixed^-1 u`` when the two grids coincide."""
    u = np.asarray(displacement_mm, dtype=np.float64)
    if fixed_grid.ndim != 3 or moving_grid.ndim != 3 or u.shape != (3, *fixed_grid.shape):
        raise ValueError(f"A 3D world field [3, *{fixed_grid.shape}] on the fixed grid is needed, got {u.shape} "
                         f"(grids {fixed_grid.shape}, {moving_grid.shape}).")
    inv = np.linalg.inv(moving_grid.matrix)
    out = np.empty(u.shape, dtype=np.float32)
    axes = [np.arange(n, dtype=np.float64) for n in fixed_grid.shape[1:]]
    rest = np.stack(np.meshgrid(*axes, indexing="ij"))  # [2, Y, Z]
    for x in range(fixed_grid.shape[0]):  # one slice at a time: bounded memory for any grid
        idx = np.concatenate([np.full((1, *rest.shape[1:]), float(x)), rest])
        world = np.einsum("ij,j...->i...", fixed_grid.matrix, idx) + fixed_grid.offset[:, None, None] + u[:, x]
        moving_idx = np.einsum("ij,j...->i...", inv, world - moving_grid.offset[:, None, None])
        out[:, x] = moving_idx - idx
    return out


def _check_field_output(path: str | os.PathLike, dtype: str) -> str:
    path = os.fspath(path)
    if dtype not in FIELD_DTYPES:
        raise ValueError(f"dtype must be one of {FIELD_DTYPES}, got {dtype!r}.")
    if not path.endswith((".nii.gz", ".npz")):
        raise ValueError(f"A Learn2Reg field file ends in .nii.gz or .npz, got {path}.")
    if dtype == "float16" and path.endswith(".nii.gz"):
        raise ValueError("NIfTI-1 has no float16 type; write float16 fields as .npz.")
    return path


def _write_field(d: np.ndarray, path: str, dtype: str, fixed_affine: np.ndarray) -> str:
    """Write ``[3, X, Y, Z]`` as ``(X, Y, Z, 3)``: NIfTI with the fixed affine, or ``.npz`` (``arr_0``), atomically."""
    channels_last = np.ascontiguousarray(np.moveaxis(d, 0, -1).astype(dtype))
    if path.endswith(".nii.gz"):
        return write_nifti(path, channels_last, fixed_affine)
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, arr_0=channels_last))


def export_learn2reg(result: RegistrationResult, path: str | os.PathLike, dtype: str = "float32") -> str:
    """Write a result's ``Phi_AB`` as a Learn2Reg submission field (see the module docstring for the format).

    ``d = A_moving^-1 (A_fixed i + u(i)) - i`` on the fixed grid (:func:`learn2reg_field`), with the *stored*
    moving image's geometry (the one the evaluation indexes). ``.nii.gz``: ``(X, Y, Z, 3)`` with the fixed affine;
    ``.npz``: one compressed array ``arr_0`` of shape ``(X, Y, Z, 3)``. Name the file
    :meth:`Learn2RegPair.field_name` for a submission. Written atomically; returns the path.

    Args:
        result: a 3D :class:`~monai_gradicon.pipeline.result.RegistrationResult`.
        path: ends in ``.nii.gz`` or ``.npz``.
        dtype: ``"float32"`` (default) or ``"float16"`` (``.npz`` only: NIfTI-1 has no half floats; half the size,
            rounding 2^-11 relative, ~0.01 voxel at 20 voxels).
    """
    path = _check_field_output(path, dtype)
    if result.fixed.ndim != 3:
        raise ValueError("Learn2Reg fields are 3D; this result is 2D.")
    d = learn2reg_field(result.displacement, Grid.of(result.fixed), Grid.of(result.moving))
    return _write_field(d, path, dtype, result.fixed.affine)


def export_saved_learn2reg(transform_dir: str | os.PathLike, path: str | os.PathLike, dtype: str = "float32") -> str:
    """:func:`export_learn2reg` for a saved result folder (``displacement_mm.nii.gz`` and the moving image's shape and
    affine from its ``summary.json``), e.g. for a command line ``export`` step. Returns the path written."""
    from monai_gradicon.pipeline.saved import load_saved

    transform_dir, path = os.fspath(transform_dir), _check_field_output(path, dtype)
    u, fixed_grid, fixed_affine = load_saved(transform_dir)
    summary_path = os.path.join(transform_dir, OUTPUT_FILES["summary"])
    try:
        with open(summary_path, encoding="utf-8") as f:
            moving = json.load(f)["moving"]
        moving_grid = Grid(tuple(int(n) for n in moving["shape"]),
                           spatial_affine(np.asarray(moving["affine_ras"], dtype=np.float64), 3))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{summary_path} does not give the moving image's shape and affine (a result folder of "
                         f"this project has them): {type(exc).__name__}: {exc}") from exc
    if fixed_grid.ndim != 3 or moving_grid.ndim != 3:
        raise ValueError("Learn2Reg fields are 3D; this result is 2D.")
    return _write_field(learn2reg_field(u, fixed_grid, moving_grid), path, dtype, fixed_affine)


def read_learn2reg_field(path: str | os.PathLike, expected_shape: Sequence[int] | None = None) -> np.ndarray:
    """Read a Learn2Reg field file -> ``[3, X, Y, Z]`` float64 (channel first, voxels).

    ``.nii.gz`` / ``.nii``: a 4D image ``(X, Y, Z, 3)``; ``.npz``: exactly one array, ``(X, Y, Z, 3)`` or
    ``(3, X, Y, Z)`` (the LUMIR evaluation accepts both; a shape that fits both readings is refused).

    Args:
        expected_shape: the fixed grid ``(X, Y, Z)``; a field of another shape is an error.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The Learn2Reg field does not exist: {path}")
    if path.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        data = np.asarray(nib.load(path).dataobj, dtype=np.float64)
        if data.ndim != 4 or data.shape[-1] != 3:
            raise ValueError(f"{path} has shape {data.shape}; a Learn2Reg field is (X, Y, Z, 3) (a 5D "
                             "(X, Y, Z, 1, 3) file is an ITK world-mm field: convert it with export_learn2reg).")
        d = np.moveaxis(data, -1, 0)
    elif path.lower().endswith(".npz"):
        with np.load(path, allow_pickle=False) as npz:
            if len(npz.files) != 1:
                raise ValueError(f"{path} holds {len(npz.files)} arrays ({npz.files}); a Learn2Reg field is one.")
            data = np.asarray(npz[npz.files[0]], dtype=np.float64)
        last, first = data.ndim == 4 and data.shape[-1] == 3, data.ndim == 4 and data.shape[0] == 3
        if last and first:
            raise ValueError(f"{path} has shape {data.shape}: both (X, Y, Z, 3) and (3, X, Y, Z) fit; store it "
                             "channel last.")
        if not (last or first):
            raise ValueError(f"{path} has shape {data.shape}; a Learn2Reg field is (X, Y, Z, 3).")
        d = np.moveaxis(data, -1, 0) if last else data
    else:
        raise ValueError(f"A Learn2Reg field is a .nii.gz or .npz file, got {path}.")
    if expected_shape is not None and tuple(d.shape[1:]) != tuple(int(s) for s in expected_shape):
        raise ValueError(f"{path} is a field on a {d.shape[1:]} grid but the fixed image is "
                         f"{tuple(expected_shape)}.")
    if not np.isfinite(d).all():
        raise ValueError(f"{path} holds NaN or infinite displacements.")
    return np.ascontiguousarray(d)


def warp_labels(moving_labels: np.ndarray, disp: np.ndarray, slab_rows: int = 32) -> np.ndarray:
    """The moving label map on the fixed grid through a Learn2Reg field: ``map_coordinates(moving, identity + d,
    order=0)`` (nearest neighbour, 0 outside), as the official evaluation warps segmentations; slab by slab along
    axis 0 (same values). Returns ``[*d.shape[1:]]`` with the labels' dtype."""
    from scipy import ndimage

    moving = np.asarray(moving_labels)
    out = np.empty(disp.shape[1:], dtype=moving.dtype)
    rest = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in disp.shape[2:]], indexing="ij"))
    for start in range(0, disp.shape[1], slab_rows):
        stop = min(start + slab_rows, disp.shape[1])
        rows = np.arange(start, stop, dtype=np.float64)[:, None, None] * np.ones((1, *rest.shape[1:]))
        coords = np.concatenate([rows[None], np.broadcast_to(rest[:, None], (2, stop - start, *rest.shape[1:]))])
        out[start:stop] = ndimage.map_coordinates(moving, coords + disp[:, start:stop], order=0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# one pair
# ----------------------------------------------------------------------------------------------------------------


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = [metrics]
    chosen = tuple(dict.fromkeys(str(m) for m in metrics))
    unknown = [m for m in chosen if m not in LEARN2REG_METRICS]
    if not chosen or unknown:
        raise ValueError(f"metrics must be a non-empty selection of {LEARN2REG_METRICS}, got {list(metrics)}.")
    return chosen


def evaluate_learn2reg_pair(
    disp: np.ndarray,
    *,
    metrics: Sequence[str],
    fixed_keypoints: np.ndarray | None = None,
    moving_keypoints: np.ndarray | None = None,
    moving_spacing: Sequence[float] | None = None,
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    labels: Sequence[int] | None = None,
    hd95_spacing: Sequence[float] | None = None,
    sdlogj_mask: np.ndarray | None = None,
    ndv_mask: np.ndarray | None = None,
    tre_order: int = 3,
) -> dict[str, dict[str, Any]]:
    """The Learn2Reg metrics of one field (arrays in memory).

    Args:
        disp: ``[3, X, Y, Z]`` Learn2Reg field.
        metrics: a selection of :data:`LEARN2REG_METRICS`; each one needs its inputs: ``tre`` the keypoints
            (``[K, 3]`` voxel indices) and ``moving_spacing`` (mm); ``dice`` / ``hd95`` the label maps and
            ``labels``, ``hd95`` also ``hd95_spacing`` (fixed grid, mm; ``(1, 1, 1)`` for voxels).
        sdlogj_mask: the official ``masked_evaluation`` mask of SDlogJ (fixed grid), or None.
        ndv_mask: where NDV / NDP are evaluated (fixed grid), or None for every interior voxel.
        tre_order: spline order of the keypoint interpolation (3: official).

    Returns:
        ``{metric column: {"mean": case value, "detailed": per keypoint / per label / the value}}`` with the
        columns ``TRE_mm``, ``DSC``, ``HD95_mm``, ``SDlogJ``, ``NDV_percent``, ``NDP_percent``.
    """
    chosen = _check_metrics(metrics)
    out: dict[str, dict[str, Any]] = {}
    if "tre" in chosen:
        if fixed_keypoints is None or moving_keypoints is None or moving_spacing is None:
            raise ValueError("The tre metric needs fixed_keypoints, moving_keypoints and moving_spacing.")
        tre = learn2reg_tre(fixed_keypoints, moving_keypoints, disp, moving_spacing, order=tre_order)
        out["TRE_mm"] = {"mean": float(tre.mean()), "detailed": [float(v) for v in tre]}
    if "dice" in chosen or "hd95" in chosen:
        if fixed_labels is None or moving_labels is None or labels is None:
            raise ValueError("The dice and hd95 metrics need fixed_labels, moving_labels and labels.")
        warped = warp_labels(moving_labels, disp)
        if "dice" in chosen:
            mean, per = learn2reg_dice(fixed_labels, moving_labels, warped, labels)
            out["DSC"] = {"mean": mean, "detailed": per}
        if "hd95" in chosen:
            if hd95_spacing is None:
                raise ValueError("The hd95 metric needs hd95_spacing (the fixed grid's voxel size, or (1, 1, 1)).")
            mean, per = learn2reg_hd95(fixed_labels, moving_labels, warped, labels, hd95_spacing)
            out["HD95_mm"] = {"mean": mean, "detailed": per}
    if "sdlogj" in chosen:
        value = learn2reg_sdlogj(disp, sdlogj_mask)
        out["SDlogJ"] = {"mean": value, "detailed": value}
    if "ndv" in chosen:
        ndv = non_diffeomorphic_volume(disp, ndv_mask)
        out["NDV_percent"] = {"mean": ndv["ndv_percent"], "detailed": ndv["ndv_percent"]}
        out["NDP_percent"] = {"mean": ndv["ndp_percent"], "detailed": ndv["ndp_percent"]}
    return out


# ----------------------------------------------------------------------------------------------------------------
# a whole split
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Learn2RegEvaluation:
    """The results of :func:`evaluate_learn2reg`, in the structure of the official ``metrics.json``.

    Attributes:
        name: the task (the dataset JSON's ``name``).
        cases: ``{pair key "FFFF_fmod<--MMMM_mmod": {column: {"mean": value, "detailed": ...}}}``.
        aggregates: ``{column: {"mean", "std", "30"}}`` over the cases
            (:func:`~monai_gradicon.metrics.learn2reg_aggregate`; ``runtime_s`` over the cases that have it).
        pairs: ``{pair key: {"fixed", "moving", "prediction"}}`` (paths).
        settings: how it was computed (metrics, labels, units, masks, the definitions and their sources).
    """

    name: str
    cases: dict[str, dict[str, dict[str, Any]]]
    aggregates: dict[str, dict[str, float]]
    pairs: dict[str, dict[str, str]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        names: list[str] = []
        for case in self.cases.values():
            names += [k for k in case if k not in names]
        return names

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "aggregates": self.aggregates, "cases": self.cases, "pairs": self.pairs,
                "settings": self.settings, "eval_version": "2.0 (monai_gradicon reimplementation)"}

    def write_json(self, path: str | os.PathLike) -> str:
        """Write :meth:`to_dict` as JSON (non-finite numbers as ``null``), atomically."""
        return atomic_write_text(path, json.dumps(jsonable(self.to_dict()), indent=2, allow_nan=False) + "\n")

    def write_csv(self, path: str | os.PathLike) -> str:
        """Write one row per case (``case, fixed, moving`` and every column's case value), then one row per
        aggregate (``case`` = ``mean``, ``std``, ``30``), atomically. Non-finite values are written as ``nan`` /
        ``inf``."""
        columns = self.columns
        buffer = _io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case", "fixed", "moving", *columns])
        for key, case in self.cases.items():
            pair = self.pairs.get(key, {})
            writer.writerow([key, pair.get("fixed", ""), pair.get("moving", ""),
                             *[_csv_number(case[c]["mean"]) if c in case else "" for c in columns]])
        for stat in ("mean", "std", "30"):
            writer.writerow([stat, "", "", *[_csv_number(self.aggregates[c][stat]) if c in self.aggregates else ""
                                             for c in columns]])
        return atomic_write_text(path, buffer.getvalue())


def _csv_number(value: Any) -> str:
    v = float(value)
    return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))




def _geometry(path: str, name: str) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...]]:
    """``(shape, 4 x 4 voxel -> RAS affine, spacing from the header)`` of a dataset image, header only for NIfTI
    (the official evaluation takes the spacing from ``header.get_zooms()``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {name} does not exist: {path}")
    if path.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        img = nib.load(path)
        return (tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64),
                tuple(float(z) for z in img.header.get_zooms()[:3]))
    image = read_image(path, name)
    return image.shape, image.affine, image.spacing


def _read_keypoints(path: str, name: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {name} file does not exist: {path}")
    points = np.loadtxt(path, delimiter=",", ndmin=2)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{path} must hold rows 'i,j,k' (0-based voxel indices), got shape {points.shape}.")
    return points


def _labels_on(path: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {name} does not exist: {path}")
    image = read_label_image(path, name)
    if image.shape != shape:
        raise ValueError(f"The {name} {path} has shape {image.shape} but its image has {shape}.")
    return np.asarray(image.array)


def _prediction(pair: Learn2RegPair, folder: str) -> str:
    """The one prediction of a pair in ``folder``: a field file or a result folder named by a field stem."""
    files = [os.path.join(folder, stem + suffix) for stem in pair.field_stems for suffix in (".nii.gz", ".npz")]
    folders = [os.path.join(folder, stem) for stem in pair.field_stems]
    found = [c for c in files if os.path.isfile(c)] + [c for c in folders if os.path.isdir(c)]
    if not found:
        tried = ", ".join([os.path.basename(c) for c in files] + [os.path.basename(c) + "/" for c in folders])
        raise FileNotFoundError(f"No prediction for pair {pair.key} in {folder} (looked for {tried}).")
    if len(found) > 1:
        raise ValueError(f"Pair {pair.key} has several predictions in {folder}: "
                         f"{', '.join(os.path.basename(f) for f in found)}; keep exactly one.")
    return found[0]


def _field_of_result_folder(
    folder: str, fixed_shape: tuple[int, ...], fixed_affine: np.ndarray, moving_shape: tuple[int, ...],
    moving_affine: np.ndarray,
) -> tuple[np.ndarray, float | None]:
    """A result folder's ``displacement_mm.nii.gz`` as a Learn2Reg field on the dataset's grids, and its runtime
    (``summary.json`` timings, seconds; None when absent)."""
    from monai_gradicon.pipeline.saved import load_saved

    u, grid, affine = load_saved(folder)
    if grid.shape != fixed_shape or not np.allclose(affine, fixed_affine, atol=1e-3, rtol=1e-5):
        raise ValueError(f"The result folder {folder} holds a field on a {grid.shape} grid with affine\n"
                         f"{np.round(affine, 4)}\nbut the dataset's fixed image is {fixed_shape} with\n"
                         f"{np.round(fixed_affine, 4)}: it was registered to another fixed image.")
    moving_grid = Grid(moving_shape, spatial_affine(moving_affine, 3))
    runtime = None
    summary_path = os.path.join(folder, OUTPUT_FILES["summary"])
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        recorded = summary.get("moving", {}).get("affine_ras") if isinstance(summary, dict) else None
        if recorded is not None and not np.allclose(np.asarray(recorded), moving_affine, atol=1e-3, rtol=1e-5):
            raise ValueError(f"The result folder {folder} was registered with a moving image of affine\n"
                             f"{np.round(np.asarray(recorded), 4)}\nbut the dataset's moving image has\n"
                             f"{np.round(moving_affine, 4)}.")
        timings = summary.get("timings_seconds", {}) if isinstance(summary, dict) else {}
        if isinstance(timings, dict) and isinstance(timings.get(_RUNTIME_KEY), (int, float)):
            runtime = float(timings[_RUNTIME_KEY])
    return learn2reg_field(u, grid, moving_grid).astype(np.float64), runtime


def evaluate_learn2reg(
    dataset_json: str | os.PathLike,
    predictions: str | os.PathLike,
    *,
    metrics: Sequence[str],
    split: str = "validation",
    data_root: str | os.PathLike | None = None,
    labels: Sequence[int] | None = None,
    keypoints: str = "keypoints",
    masked_evaluation: bool = False,
    hd95_units: str = "mm",
    ndv_mask: str = "none",
    tre_order: int = 3,
    progress: bool = False,
) -> Learn2RegEvaluation:
    """Score a folder of predictions of a Learn2Reg split the way the official evaluation does.

    Args:
        dataset_json: the task's ``*_dataset.json`` (``NLST_dataset.json``, ``OASIS_dataset.json``, ...).
        predictions: a folder holding, per pair, one of: a Learn2Reg field ``disp_FFFF_MMMM.nii.gz`` / ``.npz``
            (:meth:`Learn2RegPair.field_stems`), or this project's result folder under that stem (``disp_FFFF_MMMM/``
            with ``displacement_mm.nii.gz``; converted with :func:`learn2reg_field`, runtime from its summary).
        metrics: what to compute, a selection of :data:`LEARN2REG_METRICS` (NLST: ``tre, sdlogj, ndv``; OASIS:
            ``dice, hd95, sdlogj, ndv``). Each metric's files must exist for every pair.
        split: :data:`LEARN2REG_SPLITS` key.
        data_root: the folder the JSON's paths are relative to (default: the JSON's folder).
        labels: the labels scored by ``dice`` / ``hd95`` (required for them; OASIS: ``range(1, 36)``). Label maps:
            the image path with ``images`` -> ``labels``.
        keypoints: the folder stem of the keypoints (``keypoints`` -> ``keypointsTr/<image stem>.csv``, rows
            ``i,j,k`` 0-based voxel indices; ``landmarks`` for manual landmarks).
        masked_evaluation: SDlogJ inside the fixed image's mask (``images`` -> ``masks``), the official option.
        hd95_units: ``"mm"`` (the fixed image's spacing) or ``"voxels"`` (unit spacing, as the official script).
        ndv_mask: :data:`NDV_MASKS`.
        tre_order: spline order of the keypoint interpolation (3: official).
        progress: print one line per pair.

    Returns:
        :class:`Learn2RegEvaluation` (write it with ``write_json`` / ``write_csv``).
    """
    chosen = _check_metrics(metrics)
    if hd95_units not in ("mm", "voxels"):
        raise ValueError(f"hd95_units must be 'mm' or 'voxels', got {hd95_units!r}.")
    if ndv_mask not in NDV_MASKS:
        raise ValueError(f"ndv_mask must be one of {NDV_MASKS}, got {ndv_mask!r}.")
    if ("dice" in chosen or "hd95" in chosen) and labels is None:
        raise ValueError("The dice and hd95 metrics need the task's label list (labels=..., e.g. range(1, 36) for "
                         "OASIS); labels absent from a pair are scored NaN as in the official evaluation.")
    label_list = None if labels is None else [int(v) for v in labels]
    name, pairs = read_learn2reg_pairs(dataset_json, split)
    root = os.path.abspath(os.fspath(data_root) if data_root is not None else os.path.dirname(os.fspath(dataset_json)))
    folder = os.fspath(predictions)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"The predictions folder does not exist: {folder}")
    found = {pair.key: _prediction(pair, folder) for pair in pairs}  # every pair checked before any work

    cases: dict[str, dict[str, dict[str, Any]]] = {}
    listing: dict[str, dict[str, str]] = {}
    for index, pair in enumerate(pairs):
        fixed_path = os.path.join(root, pair.fixed)
        moving_path = os.path.join(root, pair.moving)
        f_shape, f_affine, f_spacing = _geometry(fixed_path, "fixed image")
        m_shape, m_affine, m_spacing = _geometry(moving_path, "moving image")
        prediction = found[pair.key]
        runtime = None
        if os.path.isdir(prediction):
            disp, runtime = _field_of_result_folder(prediction, f_shape, f_affine, m_shape, m_affine)
        else:
            disp = read_learn2reg_field(prediction, f_shape)
        inputs: dict[str, Any] = {}
        if "tre" in chosen:
            inputs["fixed_keypoints"] = _read_keypoints(os.path.join(root, pair.sibling("fixed", keypoints, ".csv")),
                                                        "fixed keypoints")
            inputs["moving_keypoints"] = _read_keypoints(
                os.path.join(root, pair.sibling("moving", keypoints, ".csv")), "moving keypoints")
            inputs["moving_spacing"] = m_spacing
        if "dice" in chosen or "hd95" in chosen:
            inputs["fixed_labels"] = _labels_on(os.path.join(root, pair.sibling("fixed", "labels")), f_shape,
                                                "fixed label map")
            inputs["moving_labels"] = _labels_on(os.path.join(root, pair.sibling("moving", "labels")), m_shape,
                                                 "moving label map")
            inputs["labels"] = label_list
            inputs["hd95_spacing"] = f_spacing if hd95_units == "mm" else (1.0, 1.0, 1.0)
        if masked_evaluation and "sdlogj" in chosen:
            inputs["sdlogj_mask"] = _labels_on(os.path.join(root, pair.sibling("fixed", "masks")), f_shape,
                                               "fixed mask")
        if "ndv" in chosen and ndv_mask == "moving_image":
            moving = read_image(moving_path, "moving image")
            if moving.shape != f_shape:
                raise ValueError(f"ndv_mask='moving_image' needs the moving image on the fixed grid {f_shape}, got "
                                 f"{moving.shape}.")
            inputs["ndv_mask"] = np.asarray(moving.array) > 0
        elif "ndv" in chosen and ndv_mask == "fixed_mask":
            inputs["ndv_mask"] = _labels_on(os.path.join(root, pair.sibling("fixed", "masks")), f_shape, "fixed mask")
        case = evaluate_learn2reg_pair(disp, metrics=chosen, tre_order=tre_order, **inputs)
        if hd95_units == "voxels" and "HD95_mm" in case:
            case["HD95_voxels"] = case.pop("HD95_mm")
        if runtime is not None:
            case["runtime_s"] = {"mean": runtime, "detailed": runtime}
        cases[pair.key] = case
        listing[pair.key] = {"fixed": pair.fixed, "moving": pair.moving, "prediction": os.path.abspath(prediction)}
        if progress:
            summary = ", ".join(f"{k} {v['mean']:.4g}" for k, v in case.items())
            print(f"[{index + 1}/{len(pairs)}] {pair.key}: {summary}", flush=True)

    aggregates = {}
    columns: list[str] = []
    for case in cases.values():
        columns += [c for c in case if c not in columns]
    for column in columns:
        values = [case[column]["mean"] for case in cases.values() if column in case]
        aggregates[column] = learn2reg_aggregate(values)
    settings = {
        "split": split, "metrics": list(chosen), "labels": label_list, "keypoints": keypoints,
        "masked_evaluation": masked_evaluation, "hd95_units": hd95_units, "ndv_mask": ndv_mask,
        "tre_spline_order": tre_order, "quantile_30": LEARN2REG_QUANTILE, "data_root": root,
        "predictions": os.path.abspath(folder), "definitions": DEFINITIONS,
    }
    return Learn2RegEvaluation(name, cases, aggregates, listing, settings)


DEFINITIONS = {
    "field": "d on the fixed grid, voxels, channel k along array axis k; fixed voxel x <-> moving voxel x + d(x) "
             "(scipy.ndimage.map_coordinates convention)",
    "TRE_mm": "mean over keypoints of ||(f + d(f) - m) * moving spacing||, d(f) by map_coordinates (spline order "
              "tre_spline_order, 3 officially) [MDL-UzL/L2R evaluation/utils.py compute_tre]",
    "DSC": "per label 2|F&W|/(|F|+|W|), W = moving labels warped by map_coordinates(order=0); NaN if the label is "
           "absent from fixed or moving; case value = nanmean [compute_dice]",
    "HD95": "per label max of the 95th percentiles (numpy, linear) of the distances between the two surfaces' "
            "voxel centres (mm or voxels); the official script uses DeepMind surface-distance (surfel-area weighted, "
            "unit spacing), which agrees to a fraction of a voxel, not exactly; case value = nanmean",
    "SDlogJ": "std(log(clip(detJ + 3, 1e-9, 1e9))) over the grid without 2 voxels per side, central differences; "
              "the +3 is in the official code [MDL-UzL/L2R evaluation/evaluation.py]",
    "NDV_percent": "100/N sum over interior voxels of sum over 10 tetrahedra of 0.5 max(-det, 0)/6 [Liu et al. IJCV "
                   "2024; JHU-MedImage-Reg/LUMIR_L2R digital_diffeomorphism.py]",
    "NDP_percent": "percentage of interior voxels with central-difference det J <= 0",
    "aggregates": "mean, std (numpy, population) and '30' = numpy.quantile(case values, 0.3) over cases: TRE30, "
                  "DSC30, HD95_30 [MDL-UzL/L2R evaluation/evaluation.py aggregated_results]",
}
"""What every column means and where the definition comes from (written into the evaluation's settings)."""
