"""From the network's grid to the images' own grids, in physical space.

The network registers two images resized to one *network shape* ``n`` (trilinear ``F.interpolate``,
``align_corners=False``, as the reference does). This module turns the resulting transform ``Phi_AB`` (normalized
network coordinates of the fixed image -> normalized network coordinates of the moving image) into quantities on
the **original fixed grid** (any size, spacing, origin and direction) and back.

Geometry of the resize (per spatial axis, original size ``N``, network size ``n``): network voxel ``p`` covers the
same physical extent as original continuous index ``i = (p + 0.5) * N / n - 0.5``. In normalized network coordinates
``q = p / (n - 1)``:

    i = (q * (n - 1) + 0.5) * N / n - 0.5          (network_to_index)
    q = ((i + 0.5) * n / N - 0.5) / (n - 1)        (index_to_network)

This is the reference's ITK wrapper geometry: world = c + Dir * diag(spacing * N / n) * (p - (n - 1) / 2) with ``c``
the world position of index ``(N - 1) / 2``.

For every fixed voxel ``i_f`` (world ``x = A_f i_f``) the moving point is
``y = A_m network_to_index_m(Phi_AB(index_to_network_f(i_f)))`` and the physical displacement is ``u = y - x``
(world mm, RAS+). Fixed points outside the network's ``[0, 1]`` box (the outer half network voxel) are mapped with
the field's border values, as the reference's torch transforms do.

All dense work is done in slabs along the first array axis to bound memory; affine arithmetic is float64, transform
evaluation float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from monai_gradicon.coordinate_transforms import CoordinateTransform
from monai_gradicon.io import Image
from monai_gradicon.maps import sample

__all__ = [
    "Grid",
    "index_to_network",
    "network_to_index",
    "resize_to_network",
    "physical_displacement",
    "warp_physical",
    "displacement_to_ddf",
    "map_points",
    "box_relative_ddf",
    "DEFAULT_CHUNK_VOXELS",
]

DEFAULT_CHUNK_VOXELS = 1 << 20
"""Voxels evaluated at once in the dense loops (about 50 MB of float32 work tensors per million voxels)."""


@dataclass(frozen=True)
class Grid:
    """A voxel grid in physical space.

    Attributes:
        shape: spatial shape ``S`` (2 or 3 axes, array order).
        affine: ``(dim + 1) x (dim + 1)`` voxel index -> world mm (RAS+).
    """

    shape: tuple[int, ...]
    affine: np.ndarray

    @classmethod
    def of(cls, image: Image) -> Grid:
        return cls(image.shape, image.affine_nd)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def matrix(self) -> np.ndarray:
        """The linear part ``(dim, dim)``: columns are the voxel axes' steps in world mm."""
        return self.affine[: self.ndim, : self.ndim]

    @property
    def offset(self) -> np.ndarray:
        return self.affine[: self.ndim, self.ndim]

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """``[..., dim]`` voxel indices -> ``[..., dim]`` world mm."""
        return index @ self.matrix.T + self.offset

    def world_to_index(self, world: np.ndarray) -> np.ndarray:
        """``[..., dim]`` world mm -> ``[..., dim]`` continuous voxel indices."""
        return (world - self.offset) @ np.linalg.inv(self.matrix).T


def _axis_coefficients(image_shape: Sequence[int], network_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per axis ``(scale, offset)`` with ``index = scale * q + offset`` (see :func:`network_to_index`)."""
    big = np.asarray(image_shape, dtype=np.float64)
    small = np.asarray(network_shape, dtype=np.float64)
    return (small - 1) * big / small, 0.5 * big / small - 0.5


def _like(values: np.ndarray, like: torch.Tensor | np.ndarray):
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return values


def index_to_network(index, image_shape: Sequence[int], network_shape: Sequence[int]):
    """Original voxel indices ``[..., dim]`` -> normalized network coordinates ``[..., dim]`` (numpy or torch)."""
    scale, offset = _axis_coefficients(image_shape, network_shape)
    return (index - _like(offset, index)) / _like(scale, index)


def network_to_index(q, image_shape: Sequence[int], network_shape: Sequence[int]):
    """Normalized network coordinates ``[..., dim]`` -> original voxel indices ``[..., dim]`` (numpy or torch)."""
    scale, offset = _axis_coefficients(image_shape, network_shape)
    return q * _like(scale, q) + _like(offset, q)


def resize_to_network(array: np.ndarray | torch.Tensor, network_shape: Sequence[int]) -> torch.Tensor:
    """Resize a spatial array ``[*S]`` to ``[1, 1, *network_shape]`` float32 (trilinear/bilinear,
    ``align_corners=False``, no antialiasing), exactly as the reference does before registration."""
    t = torch.as_tensor(np.asarray(array, dtype=np.float32) if isinstance(array, np.ndarray) else array)
    t = t.to(torch.float32)[None, None]
    mode = "trilinear" if t.ndim == 5 else "bilinear"
    return F.interpolate(t, size=tuple(int(s) for s in network_shape), mode=mode, align_corners=False)


def _slabs(shape: Sequence[int], chunk_voxels: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges along axis 0 holding about ``chunk_voxels`` voxels each."""
    per_slice = int(np.prod(shape[1:]))
    step = max(1, chunk_voxels // max(per_slice, 1))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)


def _slab_grid(shape: Sequence[int], start: int, stop: int, device: torch.device | str) -> torch.Tensor:
    """Voxel indices of a slab, channel first: ``[dim, stop - start, *shape[1:]]`` float64."""
    axes = [torch.arange(start, stop, dtype=torch.float64, device=device)]
    axes += [torch.arange(n, dtype=torch.float64, device=device) for n in shape[1:]]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _linear(matrix: np.ndarray, offset: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """``matrix @ p + offset`` for channel-first points ``[dim, *P]`` (float64)."""
    m = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
    o = torch.as_tensor(offset, dtype=points.dtype, device=points.device)
    return torch.einsum("ij,j...->i...", m, points) + o.view(-1, *([1] * (points.ndim - 1)))


def _per_channel(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


def _channels_first(points: np.ndarray, device: torch.device | str, dtype=torch.float32) -> torch.Tensor:
    """``[*P, dim]`` numpy -> ``[1, dim, *P]`` tensor (the layout transforms and :func:`sample` take)."""
    t = torch.from_numpy(np.ascontiguousarray(points)).to(device=device, dtype=dtype)
    return t.movedim(-1, 0)[None]


def _apply_transform(transform: CoordinateTransform, q: np.ndarray, device: torch.device | str) -> np.ndarray:
    """Evaluate a network transform at normalized points ``[*P, dim]`` -> ``[*P, dim]`` (float64)."""
    with torch.no_grad():
        out = transform(_channels_first(q, device))
    return out[0].movedim(0, -1).to(torch.float64).cpu().numpy()


def _world_matrix(matrix: np.ndarray | None, ndim: int) -> np.ndarray | None:
    """A world affine (``4 x 4``, or ``(ndim + 1)`` square) as ``(ndim + 1)`` square, or None for the identity."""
    if matrix is None:
        return None
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (ndim + 1, ndim + 1):
        return m
    if m.shape == (4, 4) and ndim == 2:
        return m[np.ix_([0, 1, 3], [0, 1, 3])]
    raise ValueError(f"A world affine for {ndim}D must be {ndim + 1} x {ndim + 1} or 4 x 4, got {m.shape}.")


def physical_displacement(
    transform: CoordinateTransform,
    target: Grid,
    source: Grid,
    network_shape: Sequence[int],
    device: torch.device | str = "cpu",
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    output: Grid | None = None,
    pre: np.ndarray | None = None,
    post: np.ndarray | None = None,
) -> np.ndarray:
    """Dense physical displacement of a network transform on an original grid.

    Args:
        transform: ``Phi`` mapping normalized network coordinates of the *target* image to those of the *source*
            image (``Phi_AB`` with target = fixed and source = moving; ``Phi_BA`` for the other way round).
        target: the grid of the image the network saw as its target (original fixed grid for ``Phi_AB``).
        source: the grid of the image the network saw as its source (original moving grid for ``Phi_AB``).
        network_shape: the shape both images were resized to.
        device: where to evaluate the transform (the device its tensors live on).
        chunk_voxels: voxels per slab.
        output: the grid the field is computed on (default ``target``).
        pre: world affine applied to each output voxel's world point before it is located in ``target`` (default
            identity); e.g. the inverse of an affine pre-alignment when the output is the original moving grid.
        post: world affine applied to the source world point found (default identity); e.g. an affine
            pre-alignment, when the network's source was the moving image resampled through it.

    Returns:
        ``[dim, *output.shape]`` float32: ``u(x) = post(y(pre(x))) - x`` in world mm (RAS+), where ``y`` is the
        source point matching target point ``pre(x)``.
    """
    _check_dims(target, source, network_shape)
    output = target if output is None else output
    pre_m, post_m = _world_matrix(pre, target.ndim), _world_matrix(post, target.ndim)
    t_scale, t_offset = _axis_coefficients(target.shape, network_shape)
    s_scale, s_offset = _axis_coefficients(source.shape, network_shape)
    # world(source point) = A_s (s_scale * q_s + s_offset) = L_s q_s + o_s, then post
    l_s = source.matrix * s_scale[None, :]
    o_s = source.matrix @ s_offset + source.offset
    if post_m is not None:
        l_s, o_s = post_m[:-1, :-1] @ l_s, post_m[:-1, :-1] @ o_s + post_m[:-1, -1]
    # target index of an output voxel: A_t^-1 (pre (A_out i))
    to_target = np.linalg.inv(target.affine) @ (pre_m if pre_m is not None else np.eye(target.ndim + 1)) @ output.affine
    out = np.empty((target.ndim, *output.shape), dtype=np.float32)
    for start, stop in _slabs(output.shape, chunk_voxels):
        idx = _slab_grid(output.shape, start, stop, device)
        t_idx = _linear(to_target[:-1, :-1], to_target[:-1, -1], idx)
        q_t = (t_idx - _per_channel(t_offset, idx)) / _per_channel(t_scale, idx)
        with torch.no_grad():
            q_s = transform(q_t.to(torch.float32)[None])[0].to(torch.float64)
        u = _linear(l_s, o_s, q_s) - _linear(output.matrix, output.offset, idx)
        out[:, start:stop] = u.to(torch.float32).cpu().numpy()
    return out


def _source_index(image_grid: Grid, target: Grid, idx: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Continuous image indices of target voxels ``idx`` moved by world displacements ``u`` (channel first)."""
    inv = np.linalg.inv(image_grid.matrix)
    moved = _linear(inv @ target.matrix, inv @ (target.offset - image_grid.offset), idx)
    return moved + _linear(inv, np.zeros(target.ndim), u)


def warp_physical(
    image: np.ndarray,
    image_grid: Grid,
    displacement: np.ndarray,
    target: Grid,
    mode: str = "bilinear",
    padding_mode: str = "border",
    device: torch.device | str = "cpu",
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
) -> np.ndarray:
    """Resample ``image`` onto the target grid through a physical displacement field.

    The value at target voxel ``i`` is ``image`` interpolated at the continuous index
    ``A_image^-1 (A_target i + u(i))`` (``align_corners=True`` semantics: integer indices are voxel centres).

    Args:
        image: ``[*S_image]`` array on ``image_grid`` (any dtype).
        image_grid: geometry of ``image``.
        displacement: ``[dim, *target.shape]`` world mm (RAS+), see :func:`physical_displacement`. Pass zeros to
            resample by world coordinates only.
        target: the output grid.
        mode: ``"bilinear"`` (linear, for intensities) or ``"nearest"`` (label maps; values are kept exactly).
        padding_mode: outside the image: ``"border"`` (repeat the edge voxels) or ``"zeros"``.

    Returns:
        ``[*target.shape]``: float32 for ``"bilinear"``, float64 holding the exact input values for ``"nearest"``.
    """
    if displacement.shape != (target.ndim, *target.shape):
        raise ValueError(
            f"displacement must be [{target.ndim}, *{target.shape}] on the target grid, got {displacement.shape}."
        )
    if image_grid.ndim != target.ndim or tuple(image.shape) != image_grid.shape:
        raise ValueError(f"image of shape {image.shape} does not fit its grid {image_grid.shape} / the target.")
    dtype = torch.float64 if mode == "nearest" else torch.float32
    img_t = torch.as_tensor(np.asarray(image), device=device).to(dtype)[None, None]
    out = np.empty(target.shape, dtype=np.float64 if mode == "nearest" else np.float32)
    scale = np.array([max(n - 1, 1) for n in image_grid.shape], dtype=np.float64)
    for start, stop in _slabs(target.shape, chunk_voxels):
        idx = _slab_grid(target.shape, start, stop, device)
        u = torch.from_numpy(np.ascontiguousarray(displacement[:, start:stop])).to(device=device, dtype=torch.float64)
        normalized = _source_index(image_grid, target, idx, u) / _per_channel(scale, idx)
        with torch.no_grad():
            values = sample(img_t, normalized.to(dtype)[None], mode=mode, padding_mode=padding_mode)
        out[start:stop] = values[0, 0].cpu().numpy()
    return out


def displacement_to_ddf(displacement: np.ndarray, target: Grid) -> np.ndarray:
    """World-mm displacement ``[dim, *S]`` -> displacement in **voxels of the target grid** ``[dim, *S]``.

    ``ddf = A^-1 u`` (linear part only), so ``target.index_to_world(i + ddf(i)) = x + u(x)``. This is the MONAI
    ``Warp`` DDF that maps the *moving image resampled onto the fixed grid by world coordinates* (e.g. with
    ``monai.transforms.ResampleToMatch``) to the warped image; when both images share one grid it is the usual
    voxel-index displacement.
    """
    inv = torch.as_tensor(np.linalg.inv(target.matrix), dtype=torch.float32)
    return torch.einsum("ij,j...->i...", inv, torch.from_numpy(np.asarray(displacement, dtype=np.float32))).numpy()


def box_relative_ddf(
    displacement: np.ndarray,
    target: Grid,
    source: Grid,
    network_shape: Sequence[int],
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
) -> np.ndarray:
    """The deformation the network added on top of matching the two images' bounding boxes, in target voxels.

    Resizing both images to one network shape aligns their boxes: target index ``i`` starts at source index
    ``B(i) = network_to_index_source(index_to_network_target(i))``. For a physical displacement ``u`` (target ->
    source, world mm) this returns ``B^-1(A_source^-1 (A_target i + u(i))) - i`` ``[dim, *target.shape]`` float32:
    zero for the identity network transform whatever the two grids are (used for overview pictures).
    """
    t_scale, t_offset = _axis_coefficients(target.shape, network_shape)
    s_scale, s_offset = _axis_coefficients(source.shape, network_shape)
    out = np.empty((target.ndim, *target.shape), dtype=np.float32)
    for start, stop in _slabs(target.shape, chunk_voxels):
        idx = _slab_grid(target.shape, start, stop, "cpu")
        u = torch.from_numpy(np.ascontiguousarray(displacement[:, start:stop])).to(torch.float64)
        q = (_source_index(source, target, idx, u) - _per_channel(s_offset, idx)) / _per_channel(s_scale, idx)
        back = q * _per_channel(t_scale, idx) + _per_channel(t_offset, idx)
        out[:, start:stop] = (back - idx).to(torch.float32).numpy()
    return out


def map_points(
    transform: CoordinateTransform,
    points_world: np.ndarray,
    target: Grid,
    source: Grid,
    network_shape: Sequence[int],
    device: torch.device | str = "cpu",
    pre: np.ndarray | None = None,
    post: np.ndarray | None = None,
) -> np.ndarray:
    """Map world points ``[K, dim]`` (mm, RAS+) with ``transform``: each point is moved by ``pre``, located in the
    target grid, mapped to the source grid's world and moved by ``post`` (the affines default to the identity; see
    :func:`physical_displacement`). The transform is evaluated at the points themselves (no dense field)."""
    _check_dims(target, source, network_shape)
    pts = np.asarray(points_world, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != target.ndim:
        raise ValueError(f"points must be [K, {target.ndim}] world coordinates, got shape {pts.shape}.")
    pre_m, post_m = _world_matrix(pre, target.ndim), _world_matrix(post, target.ndim)
    if pre_m is not None:
        pts = pts @ pre_m[:-1, :-1].T + pre_m[:-1, -1]
    q = index_to_network(target.world_to_index(pts), target.shape, network_shape)
    # [K, dim] -> [1, K, dim] so that points form a 1 x K (2D) or 1 x 1 x K (3D) grid for grid_sample
    q = q.reshape((1,) * (target.ndim - 1) + q.shape)
    moved = _apply_transform(transform, q, device).reshape(-1, target.ndim)
    world = source.index_to_world(network_to_index(moved, source.shape, network_shape))
    if post_m is not None:
        world = world @ post_m[:-1, :-1].T + post_m[:-1, -1]
    return world


def _check_dims(target: Grid, source: Grid, network_shape: Sequence[int]) -> None:
    if not (target.ndim == source.ndim == len(network_shape)):
        raise ValueError(
            f"Dimensionality mismatch: target grid {target.shape}, source grid {source.shape}, network shape "
            f"{tuple(network_shape)}."
        )
