"""Coordinate maps, sampling at maps and point sets, and conversion to MONAI displacement fields.

Conventions (see ``docs/architecture.md``):

* A **map** ``phi`` is a tensor ``[B, dim, *S]`` of **normalized coordinates**: along a spatial axis of size ``N``
  voxel index ``i`` sits at ``i / (N - 1)``, so ``0`` is the first voxel centre and ``1`` the last. Channel ``k`` is
  the coordinate along tensor spatial axis ``k`` (channel 0 is the first spatial axis, ITK's z in 3D).
* A **point set** is any tensor ``[B, dim, *P]`` of normalized coordinates; ``*P`` need not match the image grid.
* A **DDF** follows :class:`monai.networks.blocks.Warp`: ``[B, dim, *S]`` displacements in **voxels** of the grid
  it is defined on, ``warped(x) = image(x + ddf(x))``. Hence ``ddf_k = (phi_k - id_k) * (N_k - 1)``.

Physical spacing never enters here; see ``monai_gradicon.io`` for millimetres.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "identity_map",
    "sample",
    "warp_image",
    "map_to_ddf",
    "ddf_to_map",
]

_PADDING_MODES = ("border", "zeros", "reflection")
_MODES = ("bilinear", "nearest")


def identity_map(
    spatial_shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The identity map of a grid, ``[1, dim, *spatial_shape]`` in normalized [0, 1] coordinates.

    Channel ``k`` holds ``i_k / (N_k - 1)``. It is computed in float64 and rounded once to ``dtype``, which gives
    the same float32 values as the reference implementation. An axis of size 1 holds 0.
    """
    shape = [int(s) for s in spatial_shape]
    if len(shape) not in (1, 2, 3):
        raise ValueError(f"identity_map supports 1 to 3 spatial dimensions, got spatial shape {tuple(shape)}.")
    if any(s < 1 for s in shape):
        raise ValueError(f"identity_map needs positive sizes, got spatial shape {tuple(shape)}.")
    axes = [torch.arange(n, dtype=torch.float64) * (1.0 / (n - 1) if n > 1 else 0.0) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]
    return grid.to(dtype=dtype, device=device)


def _check_points(image: torch.Tensor, points: torch.Tensor) -> int:
    dim = image.ndim - 2
    if dim not in (2, 3):
        raise ValueError(f"Expected a 2D [B, C, H, W] or 3D [B, C, D, H, W] tensor to sample, got shape {tuple(image.shape)}.")
    if points.ndim < 3 or points.shape[1] != dim:
        raise ValueError(
            f"Points must be [B, {dim}, *P] normalized coordinates for a {dim}D image, got shape {tuple(points.shape)}."
        )
    if points.shape[0] not in (1, image.shape[0]) and image.shape[0] != 1:
        raise ValueError(
            f"Batch sizes differ: image has {image.shape[0]}, points have {points.shape[0]} (one of them may be 1)."
        )
    return dim


def sample(
    image: torch.Tensor, points: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Interpolate ``image`` at normalized coordinates.

    Args:
        image: ``[B, C, *S]`` image or vector field (2D or 3D).
        points: ``[B, dim, *P]`` normalized [0, 1] coordinates (channel k along spatial axis k). A batch of 1 on
            either side is broadcast to the other.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.
        padding_mode: ``"border"`` (default, as the reference), ``"zeros"`` or ``"reflection"``.

    Returns:
        ``[B, C, *P]``: the image at the points, ``align_corners=True`` semantics (0 and 1 are voxel centres).
    """
    dim = _check_points(image, points)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}.")
    sizes = image.shape[2:]
    # grid_sample wants [-1, 1] coordinates, channels last and in (x, y, z) = reversed axis order.
    if all(n > 1 for n in sizes):
        # whole-tensor ops: the backward is two passes over the points instead of a zero-filled tensor per axis
        # (same values: 2p is exact, so 2p - 1 rounds once either way)
        grid = points.flip(1).mul(2.0).sub_(1.0).movedim(1, -1)
    else:  # an axis of one voxel keeps its coordinate (0)
        scaled = [points[:, k] * 2.0 - 1.0 if sizes[k] > 1 else points[:, k] for k in range(dim)]
        grid = torch.stack(scaled[::-1], dim=-1)
    if grid.shape[0] == 1 and image.shape[0] != 1:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    elif image.shape[0] == 1 and grid.shape[0] != 1:
        image = image.expand(grid.shape[0], *image.shape[1:])
    grid = grid.to(image.dtype)
    chunks = _cpu_chunks(image, grid)
    if chunks > 1:
        return _chunked_grid_sample(image, grid, chunks, mode, padding_mode)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


_MIN_POINTS_PER_CHUNK = 16384


def _cpu_chunks(image: torch.Tensor, grid: torch.Tensor) -> int:
    """How many pieces to cut the points of a batch-1 CPU sample into.

    PyTorch's CPU ``grid_sample`` (3D, and its backward) parallelises over the batch only, so a batch of 1 runs on
    one thread; cutting the points into one piece per thread and sampling them as a batch (the image is broadcast,
    not copied) uses them all. Interpolation is pointwise, so the values are unchanged.
    """
    if image.device.type != "cpu" or image.shape[0] != 1 or image.ndim != 5:
        return 1
    threads = torch.get_num_threads()
    if threads < 2:
        return 1
    points = grid[0, ..., 0].numel()
    return max(1, min(threads, points // _MIN_POINTS_PER_CHUNK))


def _chunked_grid_sample(
    image: torch.Tensor, grid: torch.Tensor, chunks: int, mode: str, padding_mode: str
) -> torch.Tensor:
    dim = grid.shape[-1]
    point_shape = grid.shape[1:-1]
    flat = grid.reshape(-1, dim)
    total = flat.shape[0]
    per_chunk = -(-total // chunks)
    pad = per_chunk * chunks - total
    if pad:
        flat = torch.cat([flat, flat.new_zeros((pad, dim))], dim=0)
    out = F.grid_sample(
        image.expand(chunks, *image.shape[1:]),
        flat.view(chunks, 1, 1, per_chunk, dim),
        mode=mode,
        padding_mode=padding_mode,
        align_corners=True,
    )  # [chunks, C, 1, 1, per_chunk]
    channels = image.shape[1]
    out = out.view(chunks, channels, per_chunk).transpose(0, 1).reshape(channels, chunks * per_chunk)
    if pad:
        out = out[:, :total]
    return out.reshape(1, channels, *point_shape)


def warp_image(
    image: torch.Tensor, phi: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Pull ``image`` ``[B, C, *S_image]`` back through the map ``phi`` ``[B, dim, *S]``: ``image(phi(x))``.

    This is :func:`sample` under the name used for whole-grid warps; the result has the map's grid ``S``.
    """
    return sample(image, phi, mode=mode, padding_mode=padding_mode)


def map_to_ddf(phi: torch.Tensor) -> torch.Tensor:
    """Convert a map ``[B, dim, *S]`` (normalized coordinates on its own grid) to a MONAI DDF in voxels.

    ``ddf_k = (phi_k - id_k) * (N_k - 1)``: the factor is ``N - 1``, not ``N``, because ``1`` is the last voxel
    centre. The result can be passed to :class:`monai.networks.blocks.Warp` for an image on the same grid.
    """
    spatial = phi.shape[2:]
    if phi.shape[1] != len(spatial):
        raise ValueError(f"A map must be [B, dim, *S] with dim = len(S), got shape {tuple(phi.shape)}.")
    ident = identity_map(spatial, dtype=phi.dtype, device=phi.device)
    scale = torch.tensor([max(n - 1, 1) for n in spatial], dtype=phi.dtype, device=phi.device)
    return (phi - ident) * scale.view(1, -1, *([1] * len(spatial)))


def ddf_to_map(ddf: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`map_to_ddf`: a voxel DDF ``[B, dim, *S]`` to a normalized map on the same grid."""
    spatial = ddf.shape[2:]
    if ddf.shape[1] != len(spatial):
        raise ValueError(f"A DDF must be [B, dim, *S] with dim = len(S), got shape {tuple(ddf.shape)}.")
    ident = identity_map(spatial, dtype=ddf.dtype, device=ddf.device)
    scale = torch.tensor([max(n - 1, 1) for n in spatial], dtype=ddf.dtype, device=ddf.device)
    return ident + ddf / scale.view(1, -1, *([1] * len(spatial)))
