# Copyright (c) monai-gradicon contributors
# Licensed under the Apache License, Version 2.0
"""
Evaluation metrics for deformable registration.

Conventions (shared with the rest of ``monai_gradicon``):

* A dense displacement field (DDF) follows :class:`monai.networks.blocks.Warp`: a tensor ``[B, dim, *S]``
  (``dim`` = 2 or 3) whose channel ``i`` is the displacement along tensor spatial axis ``i`` (tensor dim ``2 + i``),
  in **voxels of the fixed grid**. Warping is a pull-back, ``warped(x) = moving(x + ddf(x))``, so the moving-image
  voxel corresponding to fixed voxel ``x`` is ``x + ddf(x)``. The moving tensor lives on a grid of the same shape.
* A map ``phi`` is ``[B, dim, *S]`` in **normalized coordinates**: voxel index ``i`` along an axis of size ``N`` sits
  at ``i / (N - 1)``, i.e. ``phi = id + ddf / (N - 1)`` per channel.
* Physical coordinates are **world mm**, obtained from a ``(dim + 1) x (dim + 1)`` (or 4x4) affine mapping voxel
  indices to world mm (nibabel / MONAI convention).
* The ``learn2reg_*`` metrics and :func:`non_diffeomorphic_volume` take **Learn2Reg fields** ``[3, X, Y, Z]`` in the
  ``scipy.ndimage.map_coordinates`` convention (fixed voxel ``x`` <-> moving voxel index ``x + d(x)``; the DDF above
  when both images share a grid) and follow the official Learn2Reg evaluation code; each docstring names its source.

The metrics are plain torch / numpy functions. The evaluators average their per-case values with the one Ignite
metric family of the project, :class:`monai_gradicon.engines.CaseMetricAverage`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "jacobian_determinant",
    "folding_percentage",
    "reference_flips",
    "log_jacobian_std",
    "log_determinant_std",
    "sample_ddf_at_points",
    "landmark_tre",
    "tre_statistics",
    "dice_per_label",
    "surface_voxels",
    "hausdorff_distance_95",
    "learn2reg_tre",
    "learn2reg_dice",
    "learn2reg_hd95",
    "learn2reg_jacobian_determinant",
    "learn2reg_sdlogj",
    "tetrahedra_jacobian_determinants",
    "TETRAHEDRA",
    "non_diffeomorphic_volume",
    "learn2reg_aggregate",
    "LEARN2REG_QUANTILE",
]

#: lower clamp applied to det J before taking the log in :func:`log_jacobian_std`.
LOG_JACOBIAN_EPS = 1e-9
#: tolerance, in voxels, for landmarks lying on the image border.
_BOUNDS_TOL = 1e-3
_POINT_FRAMES = ("voxel", "world")

ArrayLike = torch.Tensor | np.ndarray | Sequence


# ----------------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------------


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """Drop tensor subclasses with metadata (MONAI ``MetaTensor``) so results are plain tensors."""
    if type(t) is not torch.Tensor and hasattr(t, "as_tensor"):
        return t.as_tensor()
    return t


def _as_float_tensor(x: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    """Convert ``x`` to a floating point tensor (integers become float32, float dtypes are kept)."""
    try:
        t = torch.as_tensor(x, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a tensor or array of numbers, got {type(x).__name__}.") from e
    t = _plain_tensor(t)
    if not torch.is_floating_point(t):
        t = t.to(torch.float32)
    return t


def _check_ddf(ddf: ArrayLike, name: str = "ddf") -> torch.Tensor:
    """
    Validate a DDF and return it as a float tensor.

    Args:
        ddf: ``[B, dim, *S]`` with ``dim`` in {2, 3} and ``len(S) == dim``.
    """
    t = _as_float_tensor(ddf, name)
    if t.ndim not in (4, 5):
        raise ValueError(
            f"{name} must have shape [B, dim, *spatial] with dim 2 or 3 (4 or 5 dimensions), got shape "
            f"{tuple(t.shape)}."
        )
    dim = t.ndim - 2
    if t.shape[1] != dim:
        raise ValueError(
            f"{name} must have shape [B, dim, *spatial] with dim channels (one displacement per spatial axis); "
            f"shape {tuple(t.shape)} has {dim} spatial axes but {t.shape[1]} channels (an unbatched field needs a "
            "leading batch axis)."
        )
    return t


def _spacing_tuple(spacing: float | Sequence[float] | None, dim: int) -> tuple[float, ...]:
    """Expand ``spacing`` (mm per voxel, scalar or one value per spatial axis) to a ``dim``-tuple of floats."""
    if spacing is None:
        return (1.0,) * dim
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().numpy()
    try:
        arr = np.asarray(spacing, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"spacing must be a number or a sequence of numbers (mm per voxel), got {spacing!r}.") from e
    values = tuple(float(v) for v in (np.repeat(arr, dim) if arr.size == 1 else arr))
    if len(values) != dim:
        raise ValueError(f"spacing must be a scalar or have one value per spatial axis ({dim}), got {spacing}.")
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"spacing values must be positive and finite (mm per voxel), got {values}.")
    return values


# ----------------------------------------------------------------------------------------------------------------
# Jacobian-based regularity metrics
# ----------------------------------------------------------------------------------------------------------------


def _determinant(jac: list[list[torch.Tensor]]) -> torch.Tensor:
    """Determinant of a 2x2 or 3x3 matrix given as nested lists of equally shaped tensors (cofactor expansion along
    the first row, evaluated left to right; the entries are not modified)."""
    if len(jac) == 2:
        return (jac[0][0] * jac[1][1]).sub_(jac[0][1] * jac[1][0])
    (a, b, c), (d, e, f), (g, h, i) = jac
    det = a * (e * i).sub_(f * h)
    det.sub_(b * (d * i).sub_(f * g))
    return det.add_(c * (d * h).sub_(e * g))


def _gradient(values: torch.Tensor, axis: int, step: float) -> torch.Tensor:
    """``torch.gradient(values, spacing=step, dim=axis, edge_order=1)``: central differences inside, one-sided at the
    two ends (same arithmetic, written into one new tensor)."""
    n = values.shape[axis]
    out = torch.empty_like(values)
    torch.sub(values.narrow(axis, 2, n - 2), values.narrow(axis, 0, n - 2), out=out.narrow(axis, 1, n - 2))
    out.narrow(axis, 1, n - 2).div_(2.0 * step)
    for at, (hi, lo) in ((0, (1, 0)), (n - 1, (n - 1, n - 2))):
        torch.sub(values.narrow(axis, hi, 1), values.narrow(axis, lo, 1), out=out.narrow(axis, at, 1))
        out.narrow(axis, at, 1).div_(step)
    return out


def jacobian_determinant(ddf: ArrayLike, spacing: float | Sequence[float] | None = None) -> torch.Tensor:
    """
    Determinant of the Jacobian of the transform ``x -> x + ddf(x)`` at every voxel.

    Derivatives use central differences in the interior and first-order one-sided differences at the borders,
    exactly like ``numpy.gradient`` (``torch.gradient`` with ``edge_order=1``).

    Args:
        ddf: displacement field ``[B, dim, *S]`` in voxels of the fixed grid (dim 2 or 3; every spatial size >= 2).
        spacing: optional voxel size in mm (scalar or one value per spatial axis). When given, the transform is
            expressed in mm (``y_mm = spacing * (x + ddf(x))`` as a function of ``x_mm = spacing * x``) before
            differentiating. Because fixed and moving share the voxel grid, this Jacobian is ``D J D^-1`` with
            ``D = diag(spacing)``, so the determinant is mathematically the same as in voxel units for any
            (isotropic or anisotropic) spacing; only floating point rounding differs. The option exists so callers
            can state their units explicitly.

    Returns:
        ``[B, *S]`` determinant (dimensionless). Values ``<= 0`` mark folding, ``1`` means locally volume preserving.
    """
    ddf = _check_ddf(ddf)
    dim = ddf.shape[1]
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"every spatial size of ddf must be >= 2 to take finite differences, got {tuple(ddf.shape)}.")
    sp = _spacing_tuple(spacing, dim)
    scale = torch.tensor(sp, dtype=ddf.dtype, device=ddf.device).view(1, dim, *([1] * dim))
    disp = ddf * scale if spacing is not None else ddf
    # jac[i][j] = d(x_i + disp_i) / d x_j, one component at a time
    jac = [[_gradient(disp[:, i], 1 + j, sp[j]) for j in range(dim)] for i in range(dim)]
    for i in range(dim):
        jac[i][i].add_(1.0)
    return _determinant(jac)


def folding_percentage(ddf: ArrayLike, spacing: float | Sequence[float] | None = None) -> torch.Tensor:
    """
    Percentage of voxels whose Jacobian determinant is ``<= 0`` (see :func:`jacobian_determinant`).

    This counts voxels (one determinant per voxel, central differences). The GradICON reference instead counts
    negatively oriented grid *cells* (strictly ``< 0``) with one-sided differences, see :func:`reference_flips`;
    the two numbers are close but not identical.

    Args:
        ddf: displacement field ``[B, dim, *S]`` in voxels.
        spacing: optional mm per voxel, forwarded to :func:`jacobian_determinant` (does not change the result).

    Returns:
        ``[B]`` percentage in [0, 100].
    """
    det = jacobian_determinant(ddf, spacing)
    return (det <= 0).flatten(1).to(det.dtype).mean(dim=1) * 100.0


def log_jacobian_std(
    ddf: ArrayLike, spacing: float | Sequence[float] | None = None, eps: float = LOG_JACOBIAN_EPS
) -> torch.Tensor:
    """
    Standard deviation of ``log(det J)`` over voxels (the Learn2Reg "SDlogJ" smoothness score).

    ``det J`` is clamped to ``>= eps`` before the log, so folded voxels contribute ``log(eps)`` (about -20.7 for
    the default ``1e-9``) instead of NaN; a few folds therefore inflate the score strongly. The population standard
    deviation is used (``ddof=0``, like ``numpy.std``).

    Args:
        ddf: displacement field ``[B, dim, *S]`` in voxels.
        spacing: optional mm per voxel, forwarded to :func:`jacobian_determinant` (does not change the result).
        eps: lower clamp of the determinant, must be positive.

    Returns:
        ``[B]`` standard deviation (dimensionless).
    """
    return log_determinant_std(jacobian_determinant(ddf, spacing), eps)


def log_determinant_std(det: torch.Tensor, eps: float = LOG_JACOBIAN_EPS) -> torch.Tensor:
    """:func:`log_jacobian_std` from determinants already computed (``[B, *S]``, e.g. by
    :func:`jacobian_determinant`), so a caller that needs both does not differentiate the field twice.

    Returns:
        ``[B]`` population standard deviation of ``log(max(det, eps))``.
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}.")
    return torch.log(det.clamp(min=eps)).flatten(1).std(dim=1, correction=0)


def reference_flips(phi: ArrayLike, in_percentage: bool = False) -> torch.Tensor:
    """
    Fold count of a normalized map, computed exactly like the GradICON reference (``icon_registration.losses.flips``).

    For 3D maps the ``(N0-1)(N1-1)(N2-1)`` cells use backward differences at ``[1:, 1:, 1:]``::

        a = phi[1:, 1:, 1:] - phi[:-1, 1:, 1:]
        b = phi[1:, 1:, 1:] - phi[1:, :-1, 1:]
        c = phi[1:, 1:, 1:] - phi[1:, 1:, :-1]
        dV = (a x b) . c          # over channels

    and for 2D maps the ``(N0-1)(N1-1)`` cells use forward differences at ``[:-1, :-1]``::

        du = phi[1:, :-1] - phi[:-1, :-1]
        dv = phi[:-1, 1:] - phi[:-1, :-1]
        dA = du_0 * dv_1 - du_1 * dv_0

    A cell is folded when ``dV < 0`` (``dA < 0``), strictly. Differences from :func:`folding_percentage`: cells
    instead of voxels, one-sided instead of central differences, and ``< 0`` instead of ``<= 0``.

    Args:
        phi: map ``[B, dim, *S]`` in normalized [0, 1] coordinates (a DDF in voxels works as well: the sign of the
            cell volumes does not depend on the per-axis positive scaling).
        in_percentage: if False return ``(number of folded cells over the batch) / B``, the reference's default;
            if True return the percentage of folded cells over all cells of the batch.

    Returns:
        0-dim float tensor (no gradient).
    """
    phi = _check_ddf(phi, "phi").detach()
    if min(phi.shape[2:]) < 2:
        raise ValueError(f"every spatial size of phi must be >= 2 to form cells, got {tuple(phi.shape)}.")
    if phi.shape[1] == 3:
        a = phi[:, :, 1:, 1:, 1:] - phi[:, :, :-1, 1:, 1:]
        b = phi[:, :, 1:, 1:, 1:] - phi[:, :, 1:, :-1, 1:]
        c = phi[:, :, 1:, 1:, 1:] - phi[:, :, 1:, 1:, :-1]
        volume = (torch.cross(a, b, dim=1) * c).sum(dim=1)
    else:
        du = phi[:, :, 1:, :-1] - phi[:, :, :-1, :-1]
        dv = phi[:, :, :-1, 1:] - phi[:, :, :-1, :-1]
        volume = du[:, 0] * dv[:, 1] - du[:, 1] * dv[:, 0]
    folded = (volume < 0).to(phi.dtype)
    if in_percentage:
        return folded.mean() * 100.0
    return folded.sum() / phi.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# landmarks
# ----------------------------------------------------------------------------------------------------------------


def _batched_points(points: ArrayLike, batch: int, dim: int, name: str) -> torch.Tensor:
    """Return points as float64 ``[batch, K, dim]``; ``[K, dim]`` input is shared across the batch."""
    p = _as_float_tensor(points, name).to(torch.float64)
    if p.ndim == 2:
        p = p.unsqueeze(0).expand(batch, -1, -1)
    if p.ndim != 3 or p.shape[-1] != dim or p.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape [K, {dim}] or [{batch}, K, {dim}] (batch size {batch}, {dim}D), got "
            f"{tuple(torch.as_tensor(points).shape)}."
        )
    if not torch.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates.")
    return p


def _check_inside(points_vox: torch.Tensor, spatial_shape: Sequence[int], name: str) -> None:
    """Raise ValueError if any ``[B, K, dim]`` voxel coordinate lies outside ``[0, N - 1]`` (with a small tolerance)."""
    upper = torch.tensor([n - 1 for n in spatial_shape], dtype=points_vox.dtype, device=points_vox.device)
    outside = (points_vox < -_BOUNDS_TOL) | (points_vox > upper + _BOUNDS_TOL)
    if outside.any():
        b, k = (int(i) for i in outside.any(dim=-1).nonzero()[0])
        raise ValueError(
            f"{name}: landmark {k} of batch item {b} is outside the image: voxel position "
            f"{[round(v, 3) for v in points_vox[b, k].tolist()]} not within [0, N-1] for spatial shape "
            f"{tuple(spatial_shape)} ({int(outside.any(dim=-1).sum())} landmark(s) outside in total)."
        )


def sample_ddf_at_points(ddf: ArrayLike, points: ArrayLike) -> torch.Tensor:
    """
    Sample a DDF at arbitrary (sub-voxel) positions with linear (bilinear/trilinear) interpolation.

    Interpolation uses ``align_corners=True`` semantics: integer positions hit voxel centres exactly, so sampling at
    an integer index returns ``ddf[..., index]``.

    Args:
        ddf: ``[B, dim, *S]`` displacement in voxels.
        points: ``[K, dim]`` (shared across the batch) or ``[B, K, dim]`` 0-based voxel coordinates on the DDF
            grid, ordered like the tensor spatial axes. Must lie inside ``[0, N - 1]`` on every axis.

    Returns:
        ``[B, K, dim]`` displacement in voxels at each point, in the DDF's dtype.

    Raises:
        ValueError: if a point lies outside the image.
    """
    ddf = _check_ddf(ddf)
    batch, dim = ddf.shape[:2]
    spatial = ddf.shape[2:]
    pts = _batched_points(points, batch, dim, "points")
    _check_inside(pts, spatial, "points")
    k = pts.shape[1]
    denom = torch.tensor([max(n - 1, 1) for n in spatial], dtype=torch.float64)
    grid = (2.0 * pts / denom - 1.0).flip(-1)  # grid_sample wants (x, y, z) = reversed tensor axes
    grid = grid.to(device=ddf.device, dtype=ddf.dtype).view(batch, *([1] * (dim - 1)), k, dim)
    sampled = F.grid_sample(ddf, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return sampled.reshape(batch, dim, k).transpose(1, 2)


def _prepare_affine(affine: ArrayLike, batch: int, dim: int, name: str) -> torch.Tensor:
    """Return a float64 ``[batch, dim + 1, dim + 1]`` affine; 4x4 affines of 2D data keep rows/cols (0, 1, 3)."""
    a = _as_float_tensor(affine, name).to(torch.float64)
    if a.ndim == 2:
        a = a.unsqueeze(0).expand(batch, -1, -1)
    if a.ndim != 3 or a.shape[0] != batch or a.shape[-1] != a.shape[-2] or a.shape[-1] not in (dim + 1, 4):
        raise ValueError(
            f"{name} must be a voxel-to-world affine of shape [{dim + 1}, {dim + 1}] or [4, 4] (optionally with a "
            f"leading batch size {batch}), got {tuple(torch.as_tensor(affine).shape)}."
        )
    if a.shape[-1] != dim + 1:  # 4x4 affine for 2D data: keep the in-plane part
        keep = [0, 1, 3]
        a = a[:, keep][:, :, keep]
    if not torch.isfinite(a).all() or torch.linalg.det(a[:, :dim, :dim]).abs().min() < 1e-12:
        raise ValueError(f"{name} must be finite and invertible.")
    return a


def _apply_affine(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``[B, d+1, d+1]`` homogeneous affines to ``[B, K, d]`` points."""
    d = points.shape[-1]
    return points @ affine[:, :d, :d].transpose(1, 2) + affine[:, None, :d, d]


def tre_statistics(predicted: ArrayLike, target: ArrayLike) -> dict[str, Any]:
    """Target registration error of landmarks already mapped: ``predicted`` and ``target`` ``[K, dim]`` in one
    frame (world mm). Returns ``mean_mm``, ``std_mm``, ``median_mm``, ``p95_mm``, ``max_mm`` and
    ``per_landmark_mm`` (the one TRE summary of every door)."""
    p = np.asarray(predicted, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"predicted and target landmarks must both be [K, dim], got {p.shape} and {t.shape}.")
    err = np.linalg.norm(p - t, axis=1)
    return {
        "mean_mm": float(err.mean()),
        "std_mm": float(err.std()),
        "median_mm": float(np.median(err)),
        "p95_mm": float(np.percentile(err, 95)),
        "max_mm": float(err.max()),
        "per_landmark_mm": [round(float(e), 4) for e in err],
    }


def landmark_tre(
    moving_points: ArrayLike,
    fixed_points: ArrayLike,
    ddf: ArrayLike,
    *,
    points_in: str,
    fixed_affine: ArrayLike | None = None,
    moving_affine: ArrayLike | None = None,
    spacing: float | Sequence[float] | None = None,
    moving_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Target registration error (TRE) of corresponding landmarks.

    Each fixed landmark ``x`` (in fixed voxels) is mapped to its predicted moving position ``x + ddf(x)``, with the
    DDF linearly interpolated at ``x`` (:func:`sample_ddf_at_points`); the error is the Euclidean distance between
    the predicted and the true moving landmark.

    Coordinate frames (``points_in``, required):

    * ``"voxel"``: both point sets are 0-based voxel indices on the DDF grid (fixed and moving tensors share it).
      Distances are in mm when ``spacing`` (mm per voxel per axis) or ``moving_affine`` is given (the affine maps
      both predicted and true moving voxels to world mm, which also handles oblique grids), otherwise in voxels.
      ``fixed_affine`` must not be given.
    * ``"world"``: both point sets are world mm. ``fixed_affine`` (fixed voxel -> world) is inverted to locate the
      fixed landmarks on the DDF grid and ``moving_affine`` (moving voxel -> world) maps the predicted moving voxel
      back to world mm. Both affines are required, ``spacing`` must not be given, distances are in mm.

    Args:
        moving_points: ``[K, dim]`` or ``[B, K, dim]`` true moving landmarks (frame per ``points_in``).
        fixed_points: ``[K, dim]`` or ``[B, K, dim]`` fixed landmarks, same order as ``moving_points``.
        ddf: ``[B, dim, *S]`` displacement in voxels of the fixed grid.
        points_in: ``"voxel"`` or ``"world"``.
        fixed_affine: ``[dim+1, dim+1]``/``[4, 4]`` (or batched) voxel -> world affine of the fixed image.
        moving_affine: ``[dim+1, dim+1]``/``[4, 4]`` (or batched) voxel -> world affine of the moving image.
        spacing: mm per voxel (scalar or per axis), voxel frame only.
        moving_shape: spatial shape of the moving image's grid, for the bounds check of the moving landmarks when
            it differs from the fixed (DDF) grid; defaults to the DDF grid.

    Returns:
        ``(errors, mean)``: ``errors`` ``[B, K]`` per-landmark distance and ``mean`` ``[B]`` mTRE, float64, in mm
        (in voxels for ``points_in="voxel"`` without ``spacing``/``moving_affine``).

    Raises:
        ValueError: on an unknown frame, missing/conflicting affine or spacing arguments, mismatched shapes, or a
            landmark (fixed or moving) outside the image grid.
    """
    if points_in not in _POINT_FRAMES:
        raise ValueError(f"points_in must be one of {_POINT_FRAMES}, got {points_in!r}.")
    ddf = _check_ddf(ddf)
    batch, dim = ddf.shape[:2]
    spatial = ddf.shape[2:]
    fixed = _batched_points(fixed_points, batch, dim, "fixed_points")
    moving = _batched_points(moving_points, batch, dim, "moving_points")
    if fixed.shape[1] != moving.shape[1]:
        raise ValueError(
            f"fixed_points and moving_points must have the same number of landmarks, got {fixed.shape[1]} and "
            f"{moving.shape[1]}."
        )

    m_aff = None if moving_affine is None else _prepare_affine(moving_affine, batch, dim, "moving_affine")
    if points_in == "world":
        if fixed_affine is None or m_aff is None:
            raise ValueError("points_in='world' requires both fixed_affine and moving_affine (voxel -> world mm).")
        if spacing is not None:
            raise ValueError("spacing is only used with points_in='voxel'; world coordinates are already in mm.")
        f_aff = _prepare_affine(fixed_affine, batch, dim, "fixed_affine")
        fixed_vox = _apply_affine(torch.linalg.inv(f_aff), fixed)
        moving_vox = _apply_affine(torch.linalg.inv(m_aff), moving)
    else:
        if fixed_affine is not None:
            raise ValueError(
                "fixed_affine is only used with points_in='world'; voxel landmarks are already on the grid."
            )
        if spacing is not None and m_aff is not None:
            raise ValueError("give either spacing or moving_affine to convert voxel distances to mm, not both.")
        fixed_vox, moving_vox = fixed, moving

    _check_inside(fixed_vox, spatial, "fixed_points")
    _check_inside(moving_vox, tuple(moving_shape) if moving_shape is not None else spatial, "moving_points")
    predicted_vox = fixed_vox + sample_ddf_at_points(ddf, fixed_vox).to(torch.float64).cpu()

    if points_in == "world":
        diff = _apply_affine(m_aff, predicted_vox) - moving
    elif m_aff is not None:
        diff = _apply_affine(m_aff, predicted_vox) - _apply_affine(m_aff, moving_vox)
    else:
        diff = (predicted_vox - moving_vox) * torch.tensor(_spacing_tuple(spacing, dim), dtype=torch.float64)
    errors = diff.norm(dim=-1)
    return errors, errors.mean(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# label overlap
# ----------------------------------------------------------------------------------------------------------------


def _as_label_tensor(labels: ArrayLike, name: str) -> torch.Tensor:
    """Convert a label map to int64, rejecting floating point maps with non-integer values."""
    t = torch.as_tensor(labels)
    t = _plain_tensor(t)
    if t.dtype == torch.bool:
        return t.to(torch.int64)
    if torch.is_floating_point(t):
        if not torch.isfinite(t).all() or not torch.equal(t, torch.round(t)):
            raise ValueError(
                f"{name} must be an integer label map; got floating point values that are not whole numbers "
                "(e.g. an interpolated or one-hot probability map). Warp labels with nearest-neighbour "
                "interpolation or round them first."
            )
    elif torch.is_complex(t):
        raise ValueError(f"{name} must be an integer label map, got dtype {t.dtype}.")
    return t.to(torch.int64)


def dice_per_label(
    warped_labels: ArrayLike, fixed_labels: ArrayLike, labels: Sequence[int] | None = None
) -> dict[int | str, float]:
    """
    Dice overlap ``2 |W ∩ F| / (|W| + |F|)`` of each label between a warped moving and a fixed label map.

    Args:
        warped_labels: integer label map of any shape, e.g. ``[D, H, W]`` or ``[1, D, H, W]`` (a single case; all
            elements are pooled). Floating point maps are accepted only if all values are whole numbers.
        fixed_labels: integer label map with the same shape.
        labels: labels to evaluate. Default: every non-zero label present in either map (background 0 is
            excluded). Labels given explicitly are evaluated as given.

    Returns:
        dict mapping each label (int) to its Dice in [0, 1], plus the key ``"mean"``: the mean over labels ignoring
        NaN. A label absent from both maps has an undefined Dice and is reported as NaN; ``"mean"`` is NaN if no
        label has a defined Dice.

    Raises:
        ValueError: for shape mismatch or non-integer floating point labels.
    """
    warped = _as_label_tensor(warped_labels, "warped_labels")
    fixed = _as_label_tensor(fixed_labels, "fixed_labels")
    if warped.shape != fixed.shape:
        raise ValueError(
            f"warped_labels and fixed_labels must have the same shape, got {tuple(warped.shape)} and "
            f"{tuple(fixed.shape)}."
        )
    fixed = fixed.to(warped.device)
    if labels is None:
        present = torch.unique(torch.cat([warped.unique(), fixed.unique()]))
        label_list = [int(v) for v in present.tolist() if v != 0]
    else:
        label_list = [int(v) for v in labels]
    result: dict[int | str, float] = {}
    for lab in label_list:
        w, f = warped == lab, fixed == lab
        total = int(w.sum()) + int(f.sum())
        result[lab] = float("nan") if total == 0 else 2.0 * int((w & f).sum()) / total
    defined = [v for v in result.values() if not math.isnan(v)]
    result["mean"] = float(np.mean(defined)) if defined else float("nan")
    return result


# ----------------------------------------------------------------------------------------------------------------
# surface distances
# ----------------------------------------------------------------------------------------------------------------


def _binary(mask: Any, name: str) -> np.ndarray:
    """A 2D or 3D array as bool (nonzero = inside); metadata tensors and tensors become numpy arrays."""
    if isinstance(mask, torch.Tensor):
        mask = _plain_tensor(mask).detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D mask, got shape {arr.shape}.")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return arr != 0


def surface_voxels(mask: Any) -> np.ndarray:
    """The surface of a binary mask: voxels inside it with at least one face neighbour (4-connectivity in 2D,
    6-connectivity in 3D) outside it; voxels on the array border count as touching the outside.

    Args:
        mask: ``[*S]`` (2D or 3D) array, nonzero = inside.

    Returns:
        bool ``[*S]``: ``mask & ~binary_erosion(mask)`` with a cross-shaped structuring element and zero border.
    """
    from scipy import ndimage

    inside = _binary(mask, "mask")
    structure = ndimage.generate_binary_structure(inside.ndim, 1)
    return inside & ~ndimage.binary_erosion(inside, structure=structure, border_value=0)


def hausdorff_distance_95(
    mask_a: Any, mask_b: Any, spacing: Sequence[float], percentile: float = 95.0
) -> float:
    """Symmetric robust Hausdorff distance between two binary masks on one grid, in the units of ``spacing`` (mm).

    Definition: the surfaces ``S_A``, ``S_B`` are the :func:`surface_voxels` of each mask (voxel centres); for every
    point of ``S_A`` its Euclidean distance to the nearest point of ``S_B`` (physical units, axis ``k`` scaled by
    ``spacing[k]``), and vice versa; the ``percentile`` of each set of distances (``numpy.percentile``, linear
    interpolation); the larger of the two. ``percentile=100`` is the classical Hausdorff distance. Distances are
    exact Euclidean distances between voxel centres (``scipy.ndimage.distance_transform_edt`` with
    ``sampling=spacing`` on the two masks' common bounding box plus one voxel; cropping does not change them).

    This is the surface-voxel definition (MONAI's ``compute_hausdorff_distance`` with ``percentile=95`` computes the
    same). The Learn2Reg evaluation script uses DeepMind's ``surface-distance`` package instead: surface elements
    between voxel corners weighted by their area, with unit spacing (voxels); for 1 mm isotropic label maps (OASIS,
    LUMIR) the two agree to a fraction of a voxel, not exactly.

    Args:
        mask_a, mask_b: ``[*S]`` binary masks (nonzero = inside) on the same grid, 2D or 3D.
        spacing: voxel size per array axis (mm).
        percentile: in ``[0, 100]``.

    Returns:
        the distance (float, units of ``spacing``); ``inf`` when exactly one mask is empty, ``nan`` when both are.
    """
    from scipy import ndimage

    a, b = _binary(mask_a, "mask_a"), _binary(mask_b, "mask_b")
    if a.shape != b.shape:
        raise ValueError(f"mask_a and mask_b must share one grid, got shapes {a.shape} and {b.shape}.")
    sp = _spacing_tuple(spacing, a.ndim)
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {percentile}.")
    has_a, has_b = bool(a.any()), bool(b.any())
    if not (has_a or has_b):
        return float("nan")
    if not (has_a and has_b):
        return float("inf")
    both = np.argwhere(a | b)
    lo = np.maximum(both.min(axis=0) - 1, 0)
    hi = np.minimum(both.max(axis=0) + 2, np.asarray(a.shape))
    box = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))
    # the border of the full array is "outside" for both masks: a box touching it keeps zero-border erosion there
    surf_a, surf_b = surface_voxels(a)[box], surface_voxels(b)[box]
    dist_to_b = ndimage.distance_transform_edt(~surf_b, sampling=sp)
    dist_to_a = ndimage.distance_transform_edt(~surf_a, sampling=sp)
    a_to_b = dist_to_b[surf_a]
    b_to_a = dist_to_a[surf_b]
    return float(max(np.percentile(a_to_b, percentile), np.percentile(b_to_a, percentile)))


# ----------------------------------------------------------------------------------------------------------------
# Learn2Reg evaluation
# ----------------------------------------------------------------------------------------------------------------
#
# Fields here are Learn2Reg displacement fields: ``[3, X, Y, Z]`` (channel first in memory; the files store them
# channel last, see monai_gradicon.pipeline.learn2reg) in voxel units, channel k along array axis k, in the
# ``scipy.ndimage.map_coordinates`` convention: fixed voxel x corresponds to the moving image's continuous voxel
# index x + d(x) (``warped = map_coordinates(moving, identity + d)``). When fixed and moving share one grid this is
# the MONAI DDF of this project. Definitions follow the official evaluation code, read in the Learn2Reg repository
# github.com/MDL-UzL/L2R (evaluation/evaluation.py, evaluation/utils.py, eval_version "2.0") and, for the
# non-diffeomorphic volume, the LUMIR evaluation github.com/JHU-MedImage-Reg/LUMIR_L2R
# (L2R_LUMIR_Eval/evaluation.py, digital_diffeomorphism.py) after Liu et al., "On finite difference Jacobian
# computation in deformable image registration", IJCV 2024 (github.com/yihao6/digital_diffeomorphism).

LEARN2REG_QUANTILE = 0.3
"""The robustness aggregate of the Learn2Reg evaluation (the ``"30"`` entry of every metric's aggregates):
``numpy.quantile(per-case values, 0.3)``, linear interpolation, over the cases (TRE30, DSC30, HD95_30, ...)."""

#: lower and upper clip of ``det J + 3`` before the log in :func:`learn2reg_sdlogj` (the official values)
_L2R_LOGJ_CLIP = (1e-9, 1e9)
#: the official evaluation adds 3 to det J before clipping and taking the log (see learn2reg_sdlogj)
_L2R_LOGJ_SHIFT = 3.0


def _learn2reg_field(disp: Any, name: str = "disp") -> np.ndarray:
    """A Learn2Reg field as a floating ``[3, X, Y, Z]`` numpy array (float32 and float64 kept without a copy; the
    computations take float64 slabs of it)."""
    if isinstance(disp, torch.Tensor):
        disp = _plain_tensor(disp).detach().cpu().numpy()
    d = np.asarray(disp)
    if not np.issubdtype(d.dtype, np.floating):
        d = d.astype(np.float64)
    if d.ndim != 4 or d.shape[0] != 3:
        raise ValueError(
            f"{name} must be a 3D displacement field [3, X, Y, Z] (channel first, voxels), got shape {d.shape}."
        )
    if min(d.shape[1:]) < 5:
        raise ValueError(f"{name} must have at least 5 voxels per axis (the Jacobians drop 2 on each side), got "
                         f"{d.shape[1:]}.")
    if not np.isfinite(d).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return d


def _rows_with_identity(d: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The deformation ``T = x + d(x)`` (voxel indices, float64) on rows ``start .. stop - 1`` of axis 0."""
    t = np.array(d[:, start:stop], dtype=np.float64)
    t[0] += np.arange(start, stop, dtype=np.float64)[:, None, None]
    t[1] += np.arange(d.shape[2], dtype=np.float64)[None, :, None]
    t[2] += np.arange(d.shape[3], dtype=np.float64)[None, None, :]
    return t


def _keypoints(points: Any, name: str) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{name} must be [K, 3] voxel indices (array order), got shape {p.shape}.")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates.")
    return p


def learn2reg_tre(
    fixed_keypoints: Any, moving_keypoints: Any, disp: Any, moving_spacing: Sequence[float], order: int = 3
) -> np.ndarray:
    """Target registration error of corresponding keypoints, per keypoint, in mm (the Learn2Reg ``tre`` metric).

    Each fixed keypoint ``f`` (0-based voxel index of the fixed grid, array order) moves to ``f + d(f)``, with ``d``
    interpolated by ``scipy.ndimage.map_coordinates(d_k, f, order=order)`` (defaults otherwise: spline prefilter,
    ``mode="constant"``); the error is ``||(f + d(f) - m) * moving_spacing||`` with ``m`` the moving keypoint (voxel
    index of the moving grid) -- exactly ``compute_tre`` of the official evaluation (order 3 there, spacing of the
    moving image from its NIfTI header). The case value is the mean over keypoints; TRE30 is
    :data:`LEARN2REG_QUANTILE` of the case means (:func:`learn2reg_aggregate`).

    Args:
        fixed_keypoints, moving_keypoints: ``[K, 3]`` voxel indices (rows of the ``keypoints*/*.csv`` files).
        disp: ``[3, X, Y, Z]`` Learn2Reg field (voxels).
        moving_spacing: the moving image's voxel size per array axis (mm).
        order: spline order of the field interpolation (3 as the official script; 1 = trilinear).

    Returns:
        ``[K]`` float64 distances in mm.

    Raises:
        ValueError: mismatched keypoint counts, or a fixed keypoint outside the field's grid.
    """
    from scipy import ndimage

    d = _learn2reg_field(disp)
    fixed = _keypoints(fixed_keypoints, "fixed_keypoints")
    moving = _keypoints(moving_keypoints, "moving_keypoints")
    if fixed.shape != moving.shape:
        raise ValueError(f"{len(fixed)} fixed but {len(moving)} moving keypoints; they must correspond one to one.")
    upper = np.asarray(d.shape[1:], dtype=np.float64) - 1
    outside = np.nonzero(((fixed < -_BOUNDS_TOL) | (fixed > upper + _BOUNDS_TOL)).any(axis=1))[0]
    if outside.size:
        raise ValueError(f"{outside.size} fixed keypoint(s) lie outside the field's grid {d.shape[1:]}; the first is "
                         f"{fixed[outside[0]].tolist()} (0-based voxel indices, array order).")
    sp = np.asarray(_spacing_tuple(moving_spacing, 3))
    moved = fixed + np.stack([ndimage.map_coordinates(d[k], fixed.T, order=order) for k in range(3)], axis=1)
    return np.linalg.norm((moved - moving) * sp, axis=1)


def _label_array(labels: Any, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = _plain_tensor(labels).detach().cpu().numpy()
    arr = np.asarray(labels)
    if np.issubdtype(arr.dtype, np.floating) and (not np.isfinite(arr).all()
                                                  or not np.array_equal(arr, np.round(arr))):
        raise ValueError(f"{name} must hold whole-number labels; got non-integer values.")
    return arr


def _learn2reg_label_maps(fixed: Any, moving: Any, warped: Any, labels: Sequence[int]):
    f = _label_array(fixed, "fixed_labels")
    m = _label_array(moving, "moving_labels")
    w = _label_array(warped, "warped_labels")
    if f.shape != w.shape:
        raise ValueError(f"fixed_labels {f.shape} and warped_labels {w.shape} must share the fixed grid.")
    label_list = [int(v) for v in labels]
    if not label_list:
        raise ValueError("labels must name at least one label to evaluate.")
    return f, m, w, label_list


def learn2reg_dice(
    fixed_labels: Any, moving_labels: Any, warped_labels: Any, labels: Sequence[int]
) -> tuple[float, list[float]]:
    """Dice overlap per label, as the Learn2Reg ``dice`` metric (``compute_dice`` of the official evaluation).

    For each label ``l``: NaN when ``l`` is absent from the fixed or from the (unwarped) moving label map, else
    ``2 |F_l & W_l| / (|F_l| + |W_l|)`` with ``W`` the moving label map warped onto the fixed grid (nearest
    neighbour, ``map_coordinates(order=0)``). The case value is the mean over labels ignoring NaN; DSC30 is
    :data:`LEARN2REG_QUANTILE` of the case values.

    Args:
        fixed_labels: ``[X, Y, Z]`` label map on the fixed grid; moving_labels: on the moving grid;
        warped_labels: the moving label map warped onto the fixed grid.
        labels: the labels to evaluate (the task's list).

    Returns:
        ``(mean over labels ignoring NaN, [Dice per label in the order of labels])``; the mean is NaN when no label
        is defined.
    """
    f, m, w, label_list = _learn2reg_label_maps(fixed_labels, moving_labels, warped_labels, labels)
    per_label = []
    for lab in label_list:
        fl = f == lab
        if not fl.any() or not (m == lab).any():
            per_label.append(float("nan"))
            continue
        wl = w == lab
        per_label.append(2.0 * float(np.count_nonzero(fl & wl)) / float(np.count_nonzero(fl) + np.count_nonzero(wl)))
    defined = [v for v in per_label if not math.isnan(v)]
    return (float(np.mean(defined)) if defined else float("nan")), per_label


def learn2reg_hd95(
    fixed_labels: Any, moving_labels: Any, warped_labels: Any, labels: Sequence[int], spacing: Sequence[float]
) -> tuple[float, list[float]]:
    """95th percentile Hausdorff distance per label (:func:`hausdorff_distance_95`), with the Learn2Reg ``hd95``
    metric's label handling: NaN when the label is absent from the fixed or the (unwarped) moving map; ``inf`` when
    it vanished from the warped map. The case value is the mean over labels ignoring NaN.

    Args:
        fixed_labels, moving_labels, warped_labels, labels: as :func:`learn2reg_dice`.
        spacing: voxel size of the fixed grid per array axis (mm); pass ``(1, 1, 1)`` for the official script's
            voxel units.

    Returns:
        ``(mean over labels ignoring NaN, [HD95 per label])`` in the units of ``spacing``.
    """
    f, m, w, label_list = _learn2reg_label_maps(fixed_labels, moving_labels, warped_labels, labels)
    per_label = []
    for lab in label_list:
        fl = f == lab
        if not fl.any() or not (m == lab).any():
            per_label.append(float("nan"))
            continue
        per_label.append(hausdorff_distance_95(fl, w == lab, spacing))
    defined = [v for v in per_label if not math.isnan(v)]
    return (float(np.mean(defined)) if defined else float("nan")), per_label


def _learn2reg_det_rows(d: np.ndarray, start: int, stop: int) -> np.ndarray:
    """:func:`learn2reg_jacobian_determinant` for kept rows ``start .. stop - 1`` (full-grid indices of axis 0,
    within ``2 .. X - 3``): ``[stop - start, Y - 4, Z - 4]``."""
    t = _rows_with_identity(d, start - 1, stop + 1)  # one row of margin on each side for the differences
    rows = t.shape[1]
    y, z = d.shape[2], d.shape[3]
    keep = (slice(1, rows - 1), slice(2, y - 2), slice(2, z - 2))
    jac: list[list[Any]] = [[None] * 3 for _ in range(3)]
    for axis in range(3):
        up, down = list(keep), list(keep)
        up[axis] = slice(keep[axis].start + 1, keep[axis].stop + 1)
        down[axis] = slice(keep[axis].start - 1, keep[axis].stop - 1)
        for comp in range(3):
            jac[comp][axis] = 0.5 * (t[comp][tuple(up)] - t[comp][tuple(down)])
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )


def learn2reg_jacobian_determinant(disp: Any) -> np.ndarray:
    """det J of ``x -> x + d(x)`` as the Learn2Reg evaluation computes it (``jacobian_determinant`` of the official
    ``utils.py``): central differences ``(T[i+1] - T[i-1]) / 2`` along each array axis, then the two outermost voxels
    of every axis dropped (the zero padding the official script uses never reaches what is kept).

    Args:
        disp: ``[3, X, Y, Z]`` Learn2Reg field (voxels).

    Returns:
        ``[X - 4, Y - 4, Z - 4]`` float64 determinants (dimensionless).
    """
    d = _learn2reg_field(disp)
    return _learn2reg_det_rows(d, 2, d.shape[1] - 2)


def learn2reg_sdlogj(disp: Any, mask: Any | None = None, slab_rows: int = 16) -> float:
    """The Learn2Reg ``sdlogj`` score (``LogJacDetStd``), exactly as the official evaluation computes it.

    ``std(log(clip(det J + 3, 1e-9, 1e9)))`` over the voxels of :func:`learn2reg_jacobian_determinant` (the grid
    without its two outermost voxels per axis), population standard deviation. Note the ``+ 3``: the official code
    (github.com/MDL-UzL/L2R ``evaluation/evaluation.py``, every version since the 2021 ``eval/evaluation.py``, and
    the LUMIR evaluation) adds 3 to det J before clipping, so folded voxels with ``-3 < det J <= 0`` still have a
    finite log and the score is smaller than the plain ``std(log det J)`` (:func:`log_jacobian_std`). This function
    reproduces the leaderboard number; :func:`log_jacobian_std` is the textbook quantity.

    Args:
        disp: ``[3, X, Y, Z]`` Learn2Reg field (voxels).
        mask: optional ``[X, Y, Z]`` mask on the fixed grid (nonzero = evaluated), cropped like the determinants
            (the official ``masked_evaluation``).
        slab_rows: rows of axis 0 differentiated at once (memory bound; the result does not depend on it).

    Returns:
        the score (float, dimensionless).
    """
    d = _learn2reg_field(disp)
    if int(slab_rows) < 1:
        raise ValueError(f"slab_rows must be >= 1, got {slab_rows}.")
    slab_rows = int(slab_rows)
    inside = None
    if mask is not None:
        m = _binary(mask, "mask")
        if m.shape != d.shape[1:]:
            raise ValueError(f"mask shape {m.shape} does not match the field's grid {d.shape[1:]}.")
        inside = m[2:-2, 2:-2, 2:-2]
        if not inside.any():
            raise ValueError("mask is empty inside the evaluated region (the grid without 2 voxels per side).")
    x = d.shape[1]
    log_det = np.empty((x - 4, d.shape[2] - 4, d.shape[3] - 4), dtype=np.float64)
    for start in range(2, x - 2, slab_rows):  # bounded memory: the Jacobian of a few rows at a time
        stop = min(start + slab_rows, x - 2)
        det = _learn2reg_det_rows(d, start, stop)
        log_det[start - 2: stop - 2] = np.log(np.clip(det + _L2R_LOGJ_SHIFT, *_L2R_LOGJ_CLIP))
    return float(log_det.std() if inside is None else log_det[inside].std())


#: finite-difference stencils of the 10 tetrahedra of Liu et al. 2024: for each, the three edge vectors from the
#: voxel as ``(sign, offset)``: the edge is ``sign * (T(x + offset) - T(x))`` (a backward difference along an axis is
#: ``T(x) - T(x - e)``); the determinant of the three edges (as columns) is 6 times the tetrahedron's signed volume,
#: positive for the identity. "+-+" : forward along axes 0 and 2, backward along axis 1. The two central tetrahedra
#: ("star1", "star2") join face-diagonal neighbours.
_TETRAHEDRA: dict[str, tuple[tuple[int, tuple[int, int, int]], ...]] = {
    **{
        "".join("+" if s > 0 else "-" for s in signs): tuple(
            (s, tuple(s if a == axis else 0 for a in range(3))) for axis, s in enumerate(signs)
        )
        for signs in [(a, b, c) for a in (1, -1) for b in (1, -1) for c in (1, -1)]
    },
    "star1": ((1, (-1, -1, 0)), (1, (-1, 0, -1)), (1, (0, -1, -1))),
    "star2": ((1, (1, 1, 0)), (1, (0, 1, 1)), (1, (1, 0, 1))),
}
TETRAHEDRA = tuple(_TETRAHEDRA)
"""Names of the 10 tetrahedra of :func:`tetrahedra_jacobian_determinants` (8 corner ones, then 2 central)."""


def _det_columns(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """det of the 3x3 matrices whose columns are ``c0, c1, c2`` (each ``[3, ...]``): ``c0 . (c1 x c2)``."""
    return (c0[0] * (c1[1] * c2[2] - c1[2] * c2[1]) - c0[1] * (c1[0] * c2[2] - c1[2] * c2[0])
            + c0[2] * (c1[0] * c2[1] - c1[1] * c2[0]))


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross product of ``[3, ...]`` vector fields."""
    return np.stack([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _tetrahedra_slab(d: np.ndarray, start: int, stop: int) -> dict[str, np.ndarray]:
    """Determinants for interior rows ``start .. stop - 1`` (full-grid indices along axis 0, within
    ``1 .. X - 2``), every interior column, of the field ``d`` ``[3, X, Y, Z]``."""
    t = _rows_with_identity(d, start - 1, stop + 1)  # one row of margin on each side
    rows, y, z = t.shape[1:]

    def at(offset: tuple[int, int, int]) -> np.ndarray:
        o0, o1, o2 = offset
        return t[:, 1 + o0: rows - 1 + o0, 1 + o1: y - 1 + o1, 1 + o2: z - 1 + o2]

    centre = at((0, 0, 0))
    unit = [tuple(1 if a == axis else 0 for a in range(3)) for axis in range(3)]
    # one-sided differences per axis: "+" forward T(x + e) - T(x), "-" backward T(x) - T(x - e)
    diff = {(axis, "+"): at(unit[axis]) - centre for axis in range(3)}
    diff.update({(axis, "-"): centre - at(tuple(-v for v in unit[axis])) for axis in range(3)})
    # det[c0, c1, c2] = c0 . (c1 x c2): the 4 cross products of axes 1 and 2 serve the 8 corner tetrahedra
    crosses = {(s1, s2): _cross(diff[(1, s1)], diff[(2, s2)]) for s1 in "+-" for s2 in "+-"}
    out = {}
    for name in TETRAHEDRA[:8]:
        out[name] = (diff[(0, name[0])] * crosses[(name[1], name[2])]).sum(axis=0)
    for name in ("star1", "star2"):
        out[name] = _det_columns(*[at(offset) - centre for _, offset in _TETRAHEDRA[name]])
    out["central"] = _det_columns(*[0.5 * (diff[(axis, "+")] + diff[(axis, "-")]) for axis in range(3)])
    return out


def tetrahedra_jacobian_determinants(disp: Any) -> dict[str, np.ndarray]:
    """The finite-difference Jacobian determinants of Liu et al. 2024 on the interior voxels of a field.

    For the deformation ``T(x) = x + d(x)`` (voxel indices) and every voxel not on the grid's border: the 8 one-sided
    Jacobians ``"+++" .. "---"`` (forward ``T(x + e_k) - T(x)`` or backward ``T(x) - T(x - e_k)`` differences per
    axis), the 2 central tetrahedra ``"star1"`` (edges to ``x + (-1,-1,0), x + (-1,0,-1), x + (0,-1,-1)``) and
    ``"star2"`` (``x + (1,1,0), x + (0,1,1), x + (1,0,1)``), and ``"central"`` (central differences). Each
    determinant is 6 times a tetrahedron's signed volume (identity: 1 for the corner ones and the central
    differences, 2 for the stars). Same values as the LUMIR evaluation's ``calc_jac_dets`` (which pads by edge
    replication and drops the border voxels).

    Args:
        disp: ``[3, X, Y, Z]`` Learn2Reg field (voxels).

    Returns:
        ``{name: [X - 2, Y - 2, Z - 2] float64}`` for :data:`TETRAHEDRA` and ``"central"``.
    """
    d = _learn2reg_field(disp)
    return _tetrahedra_slab(d, 1, d.shape[1] - 1)


def non_diffeomorphic_volume(disp: Any, mask: Any | None = None, slab_rows: int = 16) -> dict[str, float]:
    """Non-diffeomorphic volume (NDV) of a field, as the LUMIR evaluation of Learn2Reg reports it (Liu et al. 2024).

    Every interior voxel is covered by the 10 tetrahedra of :func:`tetrahedra_jacobian_determinants` (two ways of
    cutting the voxel's cube into 5 tetrahedra, each weighted 1/2); a tetrahedron with a negative determinant
    contributes its inverted volume ``max(-det, 0) / 6``. So ``NDV = sum_voxels sum_10 0.5 max(-det, 0) / 6`` in
    voxel volumes, and ``ndv_percent = 100 NDV / (number of evaluated voxels)``. ``ndp_percent`` is the percentage
    of evaluated voxels whose central-difference determinant is ``<= 0`` (the "non-diffeomorphic voxels").
    Evaluated voxels: the grid without its border voxels, inside ``mask`` if given (the LUMIR evaluation passes
    ``moving image > 0``).

    Args:
        disp: ``[3, X, Y, Z]`` Learn2Reg field (voxels).
        mask: optional ``[X, Y, Z]`` mask (nonzero = evaluated).
        slab_rows: rows of axis 0 computed at once (memory bound; the result does not depend on it).

    Returns:
        ``{"ndv_percent", "ndv_voxels", "ndp_percent", "evaluated_voxels"}``.
    """
    d = _learn2reg_field(disp)
    shape = d.shape[1:]
    inside = None
    if mask is not None:
        m = _binary(mask, "mask")
        if m.shape != shape:
            raise ValueError(f"mask shape {m.shape} does not match the field's grid {shape}.")
        inside = m[1:-1, 1:-1, 1:-1]
        if not inside.any():
            raise ValueError("mask is empty inside the evaluated region (the grid without its border voxels).")
    if int(slab_rows) < 1:
        raise ValueError(f"slab_rows must be >= 1, got {slab_rows}.")
    ndv = 0.0
    ndp = 0
    for start in range(1, shape[0] - 1, int(slab_rows)):
        stop = min(start + int(slab_rows), shape[0] - 1)
        dets = _tetrahedra_slab(d, start, stop)
        keep = None if inside is None else inside[start - 1: stop - 1]
        inverted = sum(np.maximum(-dets[name], 0.0) for name in TETRAHEDRA) * (0.5 / 6.0)
        folded = dets["central"] <= 0
        if keep is not None:
            inverted, folded = inverted[keep], folded[keep]
        ndv += float(inverted.sum())
        ndp += int(np.count_nonzero(folded))
    total = int(np.prod([s - 2 for s in shape])) if inside is None else int(np.count_nonzero(inside))
    return {"ndv_percent": 100.0 * ndv / total, "ndv_voxels": ndv, "ndp_percent": 100.0 * ndp / total,
            "evaluated_voxels": float(total)}


def learn2reg_aggregate(values: Sequence[float]) -> dict[str, float]:
    """The Learn2Reg aggregates of one metric over cases: ``mean``, ``std`` (population, ``numpy.std``) and ``"30"``
    (:data:`LEARN2REG_QUANTILE`: ``numpy.quantile(values, 0.3)``, linear interpolation) -- the ``aggregates`` of the
    official evaluation (``evaluation/evaluation.py``, eval_version 2.0), where TRE30 / DSC30 / HD95_30 are these
    ``"30"`` entries: the 0.3 quantile of the per-case values, not a mean of the worst 30 % within a case.

    NaN case values propagate (as in the official code: the mean of a list holding NaN is NaN).
    """
    v = np.asarray(list(values), dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty list of per-case numbers, got shape {v.shape}.")
    return {"mean": float(v.mean()), "std": float(v.std()), "30": float(np.quantile(v, LEARN2REG_QUANTILE))}
