"""Conversions between voxel indices and world coordinates.

Voxel indices are 0-based and follow the array axis order of the loaded image (MONAI ``LoadImage`` of a NIfTI
file keeps the stored axis order, so axis ``i`` of the array is the first NIfTI voxel axis). World coordinates are
millimetres in the frame given by the image affine (RAS for NIfTI files read by nibabel).
"""

from __future__ import annotations

import numpy as np

__all__ = ["voxel_to_world", "world_to_voxel"]


def _check_points(points: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (K, 3), got {arr.shape}")
    return arr


def _check_affine(affine: np.ndarray) -> np.ndarray:
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must have shape (4, 4), got {aff.shape}")
    return aff


def voxel_to_world(points_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (K, 3) 0-based voxel indices (array axis order) to (K, 3) world coordinates in mm.

    Args:
        points_vox: (K, 3) voxel indices, possibly fractional.
        affine: (4, 4) voxel-to-world matrix in mm (e.g. ``nibabel_image.affine``).
    """
    pts = _check_points(points_vox, "points_vox")
    aff = _check_affine(affine)
    return pts @ aff[:3, :3].T + aff[:3, 3]


def world_to_voxel(points_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map (K, 3) world coordinates in mm to (K, 3) fractional 0-based voxel indices (array axis order).

    Args:
        points_mm: (K, 3) world coordinates in mm.
        affine: (4, 4) voxel-to-world matrix in mm.
    """
    pts = _check_points(points_mm, "points_mm")
    aff = _check_affine(affine)
    return (pts - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
