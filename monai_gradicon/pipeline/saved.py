"""Using a saved result folder (written by :meth:`RegistrationResult.save`): warp other images, evaluate it.

The transform is read from ``displacement_mm.nii.gz`` (and ``inverse_displacement_mm.nii.gz``), so any folder with
that ITK-convention field works, whoever wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_gradicon.io import Image, as_image, read_displacement_field, spatial_affine
from monai_gradicon.metrics import (
    dice_per_label,
    folding_percentage,
    log_jacobian_std,
    sample_ddf_at_points,
    tre_statistics,
)
from monai_gradicon.pipeline.result import OUTPUT_FILES, read_label_image, warp_with_field
from monai_gradicon.resample import Grid, displacement_to_ddf

__all__ = ["LANDMARK_FRAMES", "load_saved", "apply_saved_transform", "evaluate_saved", "landmarks_to_world"]

LANDMARK_FRAMES = ("voxel", "ras", "lps")


def load_saved(transform_dir: str | os.PathLike) -> tuple[np.ndarray, Grid, np.ndarray]:
    """``(displacement RAS mm [dim, *S], fixed grid, 4 x 4 fixed affine)`` of a result folder."""
    transform_dir = os.fspath(transform_dir)
    if not os.path.isdir(transform_dir):
        raise FileNotFoundError(f"The transform directory does not exist: {transform_dir}")
    u, affine = read_displacement_field(os.path.join(transform_dir, OUTPUT_FILES["displacement"]),
                                        "displacement field")
    if not np.isfinite(u).all():
        raise ValueError(f"The displacement field in {transform_dir} holds NaN or infinite values.")
    dim = u.shape[0]
    return u, Grid(tuple(u.shape[1:]), spatial_affine(affine, dim)), affine


def apply_saved_transform(
    transform_dir: str | os.PathLike, image: Image | str | os.PathLike, labels: bool = False,
    padding_mode: str | None = None, device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Warp an image (in the moving image's world space, any grid) onto the fixed grid with a saved result.

    Returns ``(array on the fixed grid, 4 x 4 fixed affine)``. Labels: nearest neighbour, zero outside, dtype kept.
    ``device``: where the resampling is computed.
    """
    u, grid, affine = load_saved(transform_dir)
    img = read_label_image(image, "label map") if labels else as_image(image, "image to warp")
    return warp_with_field(img, u, grid, labels, padding_mode, device), affine


def landmarks_to_world(points: np.ndarray, frame: str, affine: np.ndarray, index_base: int, name: str) -> np.ndarray:
    """``[K, 3]`` landmarks in ``frame`` (``voxel`` indices with ``index_base`` 0/1, or world ``ras`` / ``lps`` mm)
    -> world RAS mm."""
    pts = np.asarray(points, dtype=np.float64)
    if frame == "voxel":
        return (pts - index_base) @ affine[:3, :3].T + affine[:3, 3]
    if frame == "ras":
        return pts
    if frame == "lps":
        return pts * np.array([-1.0, -1.0, 1.0])
    raise ValueError(f"landmarks_in must be one of {LANDMARK_FRAMES} (world mm for ras/lps), got {frame!r} for the "
                     f"{name}.")


def _inside_index(world: np.ndarray, grid: Grid, name: str) -> np.ndarray:
    idx = grid.world_to_index(world)
    upper = np.array(grid.shape, dtype=np.float64) - 1
    outside = np.nonzero(((idx < -1e-3) | (idx > upper + 1e-3)).any(axis=1))[0]
    if outside.size:
        k = int(outside[0])
        raise ValueError(
            f"{outside.size} of the {name} lie outside the image (grid {grid.shape}); the first is landmark {k} at "
            f"voxel {np.round(idx[k], 2).tolist()} (world RAS {np.round(world[k], 2).tolist()} mm). Check the "
            "landmark frame (--landmarks_in voxel/ras/lps, --index_base)."
        )
    return idx


def _moved_by_field(world: np.ndarray, field: np.ndarray, grid: Grid, name: str) -> np.ndarray:
    idx = _inside_index(world, grid, name)
    disp = sample_ddf_at_points(torch.from_numpy(field)[None], torch.from_numpy(idx)).numpy()[0]
    return world + disp


def _moving_affine_from_summary(transform_dir: str) -> np.ndarray | None:
    try:
        summary = json.loads(Path(transform_dir, OUTPUT_FILES["summary"]).read_text(encoding="utf-8"))
        return np.asarray(summary["moving"]["affine_ras"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate_saved(
    transform_dir: str | os.PathLike,
    fixed_landmarks: str | os.PathLike | np.ndarray | None = None,
    moving_landmarks: str | os.PathLike | np.ndarray | None = None,
    landmarks_in: str | None = None,
    index_base: int = 0,
    fixed_labels: str | os.PathLike | Image | None = None,
    moving_labels: str | os.PathLike | Image | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Metrics of a saved registration.

    Args:
        fixed_landmarks, moving_landmarks: corresponding points (files read by
            :func:`monai_gradicon.data.read_landmarks`, or ``[K, 3]`` arrays).
        landmarks_in: **required with landmarks**: ``"voxel"`` (indices in each image's own array order, ``index_base``
            0 or 1), ``"ras"`` or ``"lps"`` (world mm).
        fixed_labels, moving_labels: label maps on the fixed / moving grids; the moving one is warped with nearest
            neighbour and compared with the fixed one (Dice per label).
        device: where det J (folds, SDlogJ) and the label warping are computed.

    Returns:
        dict with ``folds_percent`` and ``log_jacobian_std`` (always), ``tre_fixed_to_moving`` (``Phi_AB`` applied to
        the fixed landmarks vs the moving ones), ``tre_moving_to_fixed`` (needs the inverse field),
        ``tre_before_mm`` (distance of the landmark pairs in world coordinates, no registration), ``dice``; TRE
        entries are :func:`monai_gradicon.metrics.tre_statistics`.
    """
    from monai_gradicon.data.landmarks import read_landmarks

    transform_dir = os.fspath(transform_dir)
    u, fixed_grid, fixed_affine = load_saved(transform_dir)
    ddf = torch.from_numpy(displacement_to_ddf(u, fixed_grid))[None].to(device)
    result: dict[str, Any] = {
        "transform_dir": os.path.abspath(transform_dir),
        "folds_percent": float(folding_percentage(ddf)[0]),
        "log_jacobian_std": float(log_jacobian_std(ddf)[0]),
    }
    inverse_path = os.path.join(transform_dir, OUTPUT_FILES["inverse_displacement"])
    inverse = read_displacement_field(inverse_path, "inverse displacement field") if os.path.isfile(inverse_path) else None
    moving_affine = inverse[1] if inverse is not None else _moving_affine_from_summary(transform_dir)

    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ValueError("Give both fixed and moving landmarks (corresponding points), or neither.")
    if fixed_landmarks is not None:
        if landmarks_in is None:
            raise ValueError("State the landmark frame explicitly: landmarks_in='voxel', 'ras' or 'lps'.")
        if landmarks_in not in LANDMARK_FRAMES:
            raise ValueError(f"landmarks_in must be one of {LANDMARK_FRAMES}, got {landmarks_in!r}.")
        if isinstance(index_base, bool) or index_base not in (0, 1):
            raise ValueError(f"index_base must be 0 or 1, got {index_base!r}.")
        fixed_pts = fixed_landmarks if isinstance(fixed_landmarks, np.ndarray) else read_landmarks(fixed_landmarks)
        moving_pts = moving_landmarks if isinstance(moving_landmarks, np.ndarray) else read_landmarks(moving_landmarks)
        if fixed_pts.shape != moving_pts.shape:
            raise ValueError(
                f"{len(fixed_pts)} fixed but {len(moving_pts)} moving landmarks; they must correspond one to one."
            )
        if landmarks_in == "voxel" and moving_affine is None:
            raise ValueError(
                "Voxel landmarks of the moving image need its geometry: the inverse field or summary.json is missing."
            )
        fixed_w = landmarks_to_world(fixed_pts, landmarks_in, fixed_affine, index_base, "fixed landmarks")
        m_aff = moving_affine if moving_affine is not None else np.eye(4)
        moving_w = landmarks_to_world(moving_pts, landmarks_in, m_aff, index_base, "moving landmarks")
        result["landmarks"] = {"count": int(len(fixed_w)), "frame": landmarks_in, "index_base": index_base}
        result["tre_before_mm"] = tre_statistics(fixed_w, moving_w)
        result["tre_fixed_to_moving"] = tre_statistics(_moved_by_field(fixed_w, u, fixed_grid, "fixed landmarks"),
                                                       moving_w)
        if inverse is not None:
            v, inv_affine = inverse
            m_grid = Grid(tuple(v.shape[1:]), spatial_affine(inv_affine, v.shape[0]))
            result["tre_moving_to_fixed"] = tre_statistics(_moved_by_field(moving_w, v, m_grid, "moving landmarks"),
                                                           fixed_w)
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("Give both fixed and moving label maps, or neither.")
    if fixed_labels is not None:
        f_lab = read_label_image(fixed_labels, "fixed label map")
        same_affine = np.allclose(spatial_affine(f_lab.affine, f_lab.ndim), fixed_grid.affine, atol=1e-3)
        if f_lab.shape != fixed_grid.shape or not same_affine:
            raise ValueError(
                f"The fixed label map (shape {f_lab.shape}) is not on the fixed image's grid {fixed_grid.shape}."
            )
        m_lab = read_label_image(moving_labels, "moving label map")
        warped = warp_with_field(m_lab, u, fixed_grid, True, None, device)
        dice = dice_per_label(torch.from_numpy(warped.astype(np.int64)), torch.from_numpy(f_lab.array.astype(np.int64)))
        result["dice"] = {str(k): v for k, v in dice.items()}
    return result
