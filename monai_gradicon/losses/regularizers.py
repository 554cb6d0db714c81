"""Inverse-consistency regularizers: GradICON (dense and sparse) and ICON.

All work on :class:`~monai_gradicon.coordinate_transforms.CoordinateTransform` s and point sets in normalized [0, 1]
coordinates. The jitter that makes the sample points random is a standard-normal tensor the caller may inject
(``noise``) for reproducibility; otherwise it is drawn with ``torch.randn`` on the CPU generator (or ``generator``)
and then moved to the device, as the reference does, so seeded runs agree with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monai_gradicon.coordinate_transforms import CoordinateTransform
from monai_gradicon.maps import identity_map
from monai_gradicon.metrics import reference_flips

__all__ = [
    "draw_noise",
    "jitter_points",
    "sparse_jitter_points",
    "gradicon_regularizer",
    "icon_regularizer",
    "folds_count",
]


def draw_noise(
    spatial_shape: Sequence[int], generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Standard-normal jitter ``[1, dim, *spatial_shape]`` drawn on the CPU (like the reference), then moved."""
    shape = (1, len(spatial_shape), *[int(s) for s in spatial_shape])
    return torch.randn(shape, generator=generator).to(device)


def _check_noise(noise: torch.Tensor, spatial_shape: Sequence[int]) -> None:
    expected = (1, len(spatial_shape), *[int(s) for s in spatial_shape])
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise must have the identity map's shape {expected}, got {tuple(noise.shape)}.")


def jitter_points(spatial_shape: Sequence[int], noise: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Dense jittered grid ``id + scale * noise / N_last`` ``[1, dim, *S]`` (the reference's GradICON / ICON points;
    ``N_last`` is the size of the last spatial axis and is used for every axis)."""
    _check_noise(noise, spatial_shape)
    ident = identity_map(spatial_shape, dtype=noise.dtype, device=noise.device)
    return ident + scale * noise / spatial_shape[-1]


def sparse_jitter_points(spatial_shape: Sequence[int], noise: torch.Tensor) -> torch.Tensor:
    """Sparse points of the released models: ``(id + 2 * noise / N_last)`` on every other voxel per axis,
    ``[1, dim, *ceil(S / 2)]`` (88³ points for 175³)."""
    points = jitter_points(spatial_shape, noise, scale=2.0)
    return points[(slice(None), slice(None), *[slice(None, None, 2)] * len(spatial_shape))]


def _stacked_eval(transform: CoordinateTransform, point_sets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Evaluate ``transform`` on several point sets of equal shape in one call (stacked on the last axis).

    Interpolation is pointwise, so the values equal separate calls; one call does fewer, larger kernel launches.
    """
    n = point_sets[0].shape[-1]
    out = transform(torch.cat(point_sets, dim=-1))
    return list(torch.split(out, n, dim=-1))


def gradicon_regularizer(
    phi_ab: CoordinateTransform, phi_ba: CoordinateTransform, points: torch.Tensor, delta: float = 1e-3
) -> torch.Tensor:
    """GradICON: ``sum_d mean(((e(x) - e(x + delta e_d)) / delta)²)`` with ``e(x) = x - Phi_AB(Phi_BA(x))``.

    This approximates ``mean_x ||J(x) - I||_F² / dim`` of the composition; ``delta`` is in normalized units and the
    same on every axis. Only the composition ``Phi_AB o Phi_BA`` is penalized, as in the reference.

    Args:
        phi_ab, phi_ba: the two transforms (batch B).
        points: ``[1 or B, dim, *P]`` sample points in normalized coordinates.
        delta: finite-difference step (normalized units).
    """
    dim = points.shape[1]
    shifted = []
    for d in range(dim):
        step = torch.zeros((1, dim) + (1,) * (points.ndim - 2), dtype=points.dtype, device=points.device)
        step[:, d] = delta
        shifted.append(points + step)
    all_points = [points, *shifted]
    mapped = _stacked_eval(lambda x: phi_ab(phi_ba(x)), all_points)
    error = points - mapped[0]
    loss = points.new_zeros(())
    for d in range(dim):
        error_d = all_points[d + 1] - mapped[d + 1]
        loss = loss + torch.mean(((error - error_d) / delta) ** 2)
    return loss


def icon_regularizer(phi_ab: CoordinateTransform, phi_ba: CoordinateTransform, points: torch.Tensor) -> torch.Tensor:
    """ICON: ``mean((x - Phi_AB(Phi_BA(x)))²) + mean((x - Phi_BA(Phi_AB(x)))²)`` (both compositions)."""
    return torch.mean((points - phi_ab(phi_ba(points))) ** 2) + torch.mean((points - phi_ba(phi_ab(points))) ** 2)


def folds_count(phi: torch.Tensor) -> torch.Tensor:
    """Folded cells of a map ``[B, dim, *S]`` per batch element, as the reference's ``flips`` counts them (no
    gradient). See :func:`monai_gradicon.metrics.reference_flips` for the definition and a percentage form."""
    return reference_flips(phi)
