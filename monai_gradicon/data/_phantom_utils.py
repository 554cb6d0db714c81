"""Small helpers shared by the synthetic phantoms (not public API)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def smoothstep(t: np.ndarray) -> np.ndarray:
    """C1 ramp from 0 (t <= 0) to 1 (t >= 1)."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def voxel_grid(shape: Sequence[int]) -> np.ndarray:
    """(prod(shape), 3) float64 voxel indices of a grid in C (array) order."""
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def centred_affine(shape: Sequence[int], spacing_mm: Sequence[float]) -> np.ndarray:
    """(4, 4) diagonal RAS affine with voxel size ``spacing_mm`` (mm) and the volume centre at world (0, 0, 0) mm."""
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    affine = np.diag(np.append(spacing, 1.0))
    affine[:3, 3] = -0.5 * (np.asarray(shape, dtype=np.float64) - 1.0) * spacing
    return affine


def check_shape_spacing(
    shape: Sequence[int], spacing_mm: float | Sequence[float], min_size: int
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Validate a 3D grid size (voxels) and a voxel size (mm, one value or three); return them as tuples."""
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or any(s < min_size for s in shape_t):
        raise ValueError(f"shape must be 3 sizes >= {min_size} voxels, got {tuple(shape)}")
    values = [spacing_mm] if np.isscalar(spacing_mm) else list(spacing_mm)  # type: ignore[arg-type]
    spacing = tuple(float(s) for s in values) * (3 if len(values) == 1 else 1)
    if len(spacing) != 3 or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be positive (one value or three), got {spacing_mm}")
    return shape_t, spacing  # type: ignore[return-value]
