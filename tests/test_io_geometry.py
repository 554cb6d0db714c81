"""Network grid <-> original grid geometry and the physical-space composition of monai_gradicon.resample."""

import numpy as np
import pytest
import torch

from monai_gradicon.coordinate_transforms import CoordinateTransform, DisplacementTransform
from monai_gradicon.resample import (
    Grid,
    box_relative_ddf,
    displacement_to_ddf,
    index_to_network,
    map_points,
    network_to_index,
    physical_displacement,
    resize_to_network,
    warp_physical,
)


class Identity(CoordinateTransform):
    def __call__(self, points):
        return points


def oblique_grid(shape=(20, 30, 12)):
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, -1.1, 2.5])
    aff[:3, 3] = [12.0, -40.0, 7.0]
    return Grid(shape, aff)


def test_network_index_round_trip():
    idx = np.random.default_rng(0).uniform(-1, 40, size=(50, 3))
    q = index_to_network(idx, (41, 17, 23), (16, 16, 16))
    np.testing.assert_allclose(network_to_index(q, (41, 17, 23), (16, 16, 16)), idx, atol=1e-10)
    t = torch.from_numpy(idx)
    np.testing.assert_allclose(index_to_network(t, (41, 17, 23), (16, 16, 16)).numpy(), q)


def test_resize_matches_the_network_index_geometry():
    """F.interpolate(align_corners=False) reproduces a linear function at exactly network_to_index's positions."""
    shape, net = (20, 30, 12), (16, 16, 16)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    coef = np.array([0.3, -0.7, 1.9])
    image = grid @ coef + 5.0
    resized = resize_to_network(image, net)[0, 0].double().numpy()
    p = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in net], indexing="ij"), -1)
    idx = network_to_index(p / (np.array(net) - 1), shape, net)
    inside = np.all((idx >= 0) & (idx <= np.array(shape) - 1), axis=-1)
    assert inside.mean() > 0.8
    np.testing.assert_allclose(resized[inside], (idx @ coef + 5.0)[inside], atol=1e-4)


def test_identity_on_same_and_matching_boxes():
    g = oblique_grid()
    u = physical_displacement(Identity(), g, g, (16, 16, 16))
    assert np.abs(u).max() < 1e-4
    # a different grid covering the same physical box (same centre and extent, other size and spacing)
    centre = g.index_to_world((np.array(g.shape) - 1) / 2)
    new_shape = np.array([10, 15, 30])
    matrix = g.matrix @ np.diag(np.array(g.shape) / new_shape)
    aff = np.eye(4)
    aff[:3, :3] = matrix
    aff[:3, 3] = centre - matrix @ ((new_shape - 1) / 2)
    h = Grid(tuple(new_shape), aff)
    assert np.abs(physical_displacement(Identity(), g, h, (16, 16, 16))).max() < 1e-4
    assert np.abs(box_relative_ddf(np.zeros((3, *g.shape), np.float32), g, g, (16, 16, 16))).max() < 1e-5


def test_constant_network_shift_gives_the_expected_physical_shift():
    g, net = oblique_grid(), (16, 16, 16)
    d = torch.tensor([0.05, -0.02, 0.1]).view(1, 3, 1, 1, 1).expand(1, 3, *net).contiguous()
    u = physical_displacement(DisplacementTransform(d), g, g, net)
    expected_vox = d[0, :, 0, 0, 0].double().numpy() * (np.array(net) - 1) * np.array(g.shape) / np.array(net)
    expected_mm = g.matrix @ expected_vox
    np.testing.assert_allclose(u.reshape(3, -1).T, np.broadcast_to(expected_mm, (u[0].size, 3)), atol=1e-4)
    ddf = displacement_to_ddf(u, g)
    np.testing.assert_allclose(ddf.reshape(3, -1).mean(1), expected_vox, atol=1e-4)


def test_map_points_equals_dense_field_at_voxels():
    torch.manual_seed(0)
    fixed = oblique_grid((14, 18, 10))
    m_aff = np.diag([1.3, 2.0, -1.7, 1.0])
    m_aff[:3, 3] = [5, 2, 9]
    moving = Grid((20, 11, 16), m_aff)
    outer = DisplacementTransform(torch.randn(1, 3, 17, 17, 17) * 0.03)
    transform = outer @ DisplacementTransform(torch.randn(1, 3, 17, 17, 17) * 0.02)
    u = physical_displacement(transform, fixed, moving, (17, 17, 17), chunk_voxels=100)  # many slabs
    idx = np.array([[0, 0, 0], [13, 17, 9], [5, 7, 3], [2, 16, 8]], dtype=float)
    world = fixed.index_to_world(idx)
    mapped = map_points(transform, world, fixed, moving, (17, 17, 17))
    expected = world + np.stack([u[:, int(i), int(j), int(k)] for i, j, k in idx])
    np.testing.assert_allclose(mapped, expected, atol=1e-3)


def test_warp_physical_identity_labels_and_padding():
    g = oblique_grid((9, 10, 11))
    img = np.random.default_rng(3).normal(size=g.shape).astype(np.float32)
    zero = np.zeros((3, *g.shape), np.float32)
    np.testing.assert_allclose(warp_physical(img, g, zero, g), img, atol=1e-5)
    labels = np.random.default_rng(4).integers(0, 70000, size=g.shape).astype(np.int64)
    out = warp_physical(labels, g, zero, g, mode="nearest", padding_mode="zeros")
    np.testing.assert_array_equal(out, labels)  # exact, also beyond float32's integer range
    far = np.broadcast_to((g.matrix @ np.array([100.0, 0, 0]))[:, None, None, None], (3, *g.shape)).astype(np.float32)
    assert np.all(warp_physical(labels, g, far, g, mode="nearest", padding_mode="zeros") == 0)
    border = warp_physical(img, g, far, g, padding_mode="border")
    np.testing.assert_allclose(border, np.broadcast_to(img[-1:], img.shape), atol=1e-5)


def test_dimension_mismatch_is_reported():
    with pytest.raises(ValueError, match="Dimensionality mismatch"):
        physical_displacement(Identity(), Grid((5, 5), np.eye(3)), oblique_grid(), (16, 16, 16))
