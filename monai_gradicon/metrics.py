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
    "sample_ddf_at_points",
    "landmark_tre",
    "tre_statistics",
    "dice_per_label",
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
    """Determinant of a 2x2 or 3x3 matrix given as nested lists of equally shaped tensors."""
    if len(jac) == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )


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
    # grads[j][:, i] = d disp_i / d x_j
    grads = torch.gradient(disp, spacing=list(sp), dim=list(range(2, 2 + dim)), edge_order=1)
    jac = [[grads[j][:, i] + (1.0 if i == j else 0.0) for j in range(dim)] for i in range(dim)]
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
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}.")
    det = jacobian_determinant(ddf, spacing)
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
