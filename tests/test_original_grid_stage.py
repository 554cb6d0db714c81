"""The original-grid stage's dense loops against independent float64 formulations.

``physical_displacement`` evaluates a grid-scheme field by three 1D interpolations when the output grid's axes map
onto the network's (the forward direction, and the inverse without a pre-alignment) and by trilinear lookups
otherwise; ``warp_physical`` and ``box_relative_ddf`` build their sampling points from per-axis terms;
``physical_jacobian_determinant`` differentiates slab by slab. Each is checked here against a direct float64
computation on a meshgrid of every voxel (numpy, no code shared with the module beyond the grid geometry's
documented formulas), with tolerances in float32 rounding steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_gradicon.coordinate_transforms import AxisReversedTransform, DisplacementTransform
from monai_gradicon.metrics import jacobian_determinant
from monai_gradicon.resample import (
    Grid,
    box_relative_ddf,
    displacement_to_ddf,
    physical_displacement,
    physical_jacobian_determinant,
    warp_physical,
)
from tolerance import assert_f32_close

NET = (9, 11, 10)


def _grid(shape, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), perm=(0, 1, 2), flips=(1, 1, 1)):
    m = np.zeros((3, 3))
    for col, axis in enumerate(perm):
        m[axis, col] = flips[col] * spacing[col]
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = m, origin
    return Grid(tuple(shape), a)


def _rotation(deg, axis=2):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(4)
    i, j = [k for k in range(3) if k != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    r[:3, 3] = [2.0, -1.5, 0.7]
    return r


def _field(seed=0, amplitude=0.06):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((1, 3, *NET), generator=g, dtype=torch.float64) - 0.5) * 2 * amplitude


def _trilinear_border(values: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``values [C, *n]`` at continuous indices ``pos [3, *P]`` (border: clamped), float64, corner sums."""
    n = np.array(values.shape[1:])
    p = np.clip(pos, 0, (n - 1).reshape(3, *([1] * (pos.ndim - 1))))
    low = np.minimum(np.floor(p).astype(int), (n - 2).reshape(3, *([1] * (pos.ndim - 1))))
    w = p - low
    out = np.zeros((values.shape[0], *pos.shape[1:]))
    for corner in range(8):
        bits = [(corner >> k) & 1 for k in range(3)]
        weight = np.prod([w[k] if bits[k] else 1 - w[k] for k in range(3)], axis=0)
        out += weight * values[:, low[0] + bits[0], low[1] + bits[1], low[2] + bits[2]]
    return out


def _reference_displacement(field64, target, source, output, pre=None, post=None):
    """Direct float64: world point of every output voxel -> (pre) -> target index -> network q -> q + d(q) ->
    source index -> world (post) -> minus the voxel's world point."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in output.shape], indexing="ij"))
    world = np.einsum("ij,j...->i...", output.matrix, idx) + output.offset.reshape(3, 1, 1, 1)
    x = world if pre is None else np.einsum("ij,j...->i...", pre[:3, :3], world) + pre[:3, 3].reshape(3, 1, 1, 1)
    t_idx = np.einsum("ij,j...->i...", np.linalg.inv(target.matrix), x - target.offset.reshape(3, 1, 1, 1))
    big, small = np.array(target.shape, float), np.array(NET, float)
    q = ((t_idx + 0.5) * (small / big).reshape(3, 1, 1, 1) - 0.5) / (small - 1).reshape(3, 1, 1, 1)
    d = _trilinear_border(field64[0].numpy(), q * (small - 1).reshape(3, 1, 1, 1))
    q_s = q + d
    sb = np.array(source.shape, float)
    s_idx = (q_s * (small - 1).reshape(3, 1, 1, 1) + 0.5) * (sb / small).reshape(3, 1, 1, 1) - 0.5
    y = np.einsum("ij,j...->i...", source.matrix, s_idx) + source.offset.reshape(3, 1, 1, 1)
    if post is not None:
        y = np.einsum("ij,j...->i...", post[:3, :3], y) + post[:3, 3].reshape(3, 1, 1, 1)
    return y - world


CASES = {
    # (target, source, output, pre, post): the fixed grid and the paired moving grid
    "same_box": (_grid((14, 12, 16), (1.2, 0.9, 1.5)), _grid((13, 15, 11), (1.3, 0.7, 2.2), (1, -2, 3)), None, None,
                 None),
    "inverse_permuted_output": (_grid((13, 15, 11), (1.3, 0.7, 2.2), (1, -2, 3)), _grid((14, 12, 16), (1.2, 0.9, 1.5)),
                                _grid((11, 15, 13), (2.2, 0.7, 1.3), (1 + 2.2 * 10, -2, 3), perm=(2, 1, 0),
                                      flips=(-1, 1, 1)), None, None),
    "post_affine": (_grid((14, 12, 16), (1.2, 0.9, 1.5)), _grid((13, 15, 11), (1.3, 0.7, 2.2)), None, None,
                    _rotation(12)),
    "pre_affine_not_separable": (_grid((13, 15, 11), (1.3, 0.7, 2.2)), _grid((14, 12, 16), (1.2, 0.9, 1.5)),
                                 _grid((12, 14, 10), (1.4, 0.8, 2.0)), np.linalg.inv(_rotation(12)), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_physical_displacement_matches_a_direct_float64_computation(name):
    target, source, output, pre, post = CASES[name]
    field64 = _field()
    expected = _reference_displacement(field64, target, source, output or target, pre, post)
    transform = DisplacementTransform(field64.to(torch.float32))
    # several slabs (chunk of ~one plane) and one slab give the same values
    for chunk in (200, 1 << 20):
        got = physical_displacement(transform, target, source, NET, chunk_voxels=chunk, output=output, pre=pre,
                                    post=post)
        # float32 field values and float32 point coordinates: a few steps at the world coordinates' magnitude
        assert_f32_close(got, expected, ulps=32, scale=40.0, what=f"{name}, chunk {chunk}")


def test_separable_and_trilinear_paths_agree():
    """The same field as a DisplacementTransform (separable path) and wrapped so that it is not one (trilinear
    lookups): the same displacement up to float32 rounding."""
    target, source = CASES["same_box"][:2]
    field32 = _field(seed=3).to(torch.float32)
    fast = physical_displacement(DisplacementTransform(field32), target, source, NET)
    wrapped = AxisReversedTransform(AxisReversedTransform(DisplacementTransform(field32)))
    slow = physical_displacement(wrapped, target, source, NET)
    assert np.abs(fast).max() > 1.0
    assert_f32_close(fast, slow, ulps=32, scale=40.0)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_physical_matches_a_direct_float64_computation(mode):
    image_grid = _grid((13, 15, 11), (1.3, 0.7, 2.2), (1, -2, 3), perm=(0, 2, 1), flips=(1, -1, 1))
    target = _grid((14, 12, 16), (1.2, 0.9, 1.5))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 7, image_grid.shape).astype(np.float64) if mode == "nearest" else rng.normal(
        size=image_grid.shape)
    u = rng.normal(scale=2.0, size=(3, *target.shape)).astype(np.float32)
    got = warp_physical(image, image_grid, u, target, mode, "border", chunk_voxels=300)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in target.shape], indexing="ij"))
    world = np.einsum("ij,j...->i...", target.matrix, idx) + target.offset.reshape(3, 1, 1, 1) + u
    pos = np.einsum("ij,j...->i...", np.linalg.inv(image_grid.matrix), world - image_grid.offset.reshape(3, 1, 1, 1))
    if mode == "nearest":
        n = np.array(image_grid.shape).reshape(3, 1, 1, 1)
        k = np.clip(np.floor(pos + 0.5), 0, n - 1).astype(int)
        # points within float rounding of a half-voxel boundary may go either way: leave them out
        sure = np.all(np.abs(pos - np.round(pos)) < 0.5 - 1e-6, axis=0)
        expected = image[k[0], k[1], k[2]]
        np.testing.assert_array_equal(got[sure], expected[sure])
        assert sure.mean() > 0.99
    else:
        expected = _trilinear_border(image[None], pos)[0]
        assert_f32_close(got, expected, ulps=64, scale=np.abs(image).max() * 2)


def test_jacobian_by_slabs_equals_the_whole_array_computation():
    grid = _grid((17, 12, 9), (1.2, 0.9, 1.5), perm=(1, 0, 2))
    rng = np.random.default_rng(1)
    u = rng.normal(scale=0.4, size=(3, *grid.shape)).astype(np.float32)
    whole = jacobian_determinant(torch.from_numpy(displacement_to_ddf(u, grid))[None])[0].numpy()
    for chunk in (1, 108, 250, 10**6):  # one plane per slab, ... , one slab
        np.testing.assert_array_equal(physical_jacobian_determinant(u, grid, chunk), whole)
    with pytest.raises(ValueError, match="displacement must be"):
        physical_jacobian_determinant(u[:, :5], grid)


def test_box_relative_ddf_is_zero_for_the_box_matching_displacement():
    """The identity network transform's displacement is pure box matching: nothing is left on top of it."""
    target, source = CASES["same_box"][:2]
    zero = DisplacementTransform(torch.zeros((1, 3, *NET)))
    box = physical_displacement(zero, target, source, NET)
    assert np.abs(box).max() > 0.5
    assert_f32_close(box_relative_ddf(box, target, source, NET, chunk_voxels=150), np.zeros_like(box), ulps=64,
                     scale=40.0)


def test_largest_displacement_length_slice_by_slice():
    """The summary's and the QC report's displacement_mm_max: the largest vector length, as a direct float64 norm."""
    from monai_gradicon.pipeline.result import _max_length

    u = np.random.default_rng(2).normal(size=(3, 7, 6, 5)).astype(np.float32)
    u[:, 4, 2, 3] = [30.0, -40.0, 0.0]  # length 50, in one slice
    assert _max_length(u) == pytest.approx(float(np.linalg.norm(u.astype(np.float64), axis=0).max()), rel=1e-15)
    assert _max_length(u) == pytest.approx(50.0, rel=1e-7)
