"""register_pair(reference_axis_order=...): the network sees the arrays in ITK's numpy order (file axes reversed) by
default, the file's index order without it; every output stays on the original grids in both modes."""

import json

import numpy as np
import pytest
import torch

from monai_gradicon.coordinate_transforms import DisplacementTransform
from monai_gradicon.io import Image
from monai_gradicon.registration_api import register_pair
from monai_gradicon.resample import Grid
from test_instance_optimization import slim_network
from test_register_pair import image, random_network

SHAPE = (33, 40, 36)  # network shape, deliberately not cubic
STEP = 0.05  # constant displacement along network channel 0, normalized units


def stand_in(shape=SHAPE):
    """A GradICON network whose forward pass records its inputs and returns a constant displacement along network
    coordinate channel 0 only (so the result depends on the axis order the network saw)."""
    net = slim_network(1, shape)
    seen = []

    def forward(moving, fixed):
        seen.append((moving.detach().clone(), fixed.detach().clone()))
        u = torch.zeros(1, 3, *moving.shape[2:])
        u[:, 0] = STEP
        return DisplacementTransform(u)

    net.forward = forward
    return net, seen


def ramp_image(shape=(20, 26, 30), axis=0, spacing=(1.5, 1.2, 2.0)):
    """Intensity varying along one file axis only."""
    ramp = np.arange(shape[axis], dtype=np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
    return Image(np.broadcast_to(ramp, shape).copy() + 1.0, np.diag([*spacing, 1.0]))


@pytest.mark.parametrize("reverse", [True, False])
def test_network_sees_reversed_axes(reverse):
    fixed, moving = ramp_image(axis=0), ramp_image(axis=0)
    net, seen = stand_in()
    r = register_pair(fixed, moving, net, preprocess="none", input_shape=SHAPE, reference_axis_order=reverse)
    assert r.settings["reference_axis_order"] is reverse and r.reference_axis_order is reverse
    moving_t, fixed_t = seen[0]
    assert tuple(moving_t.shape) == tuple(fixed_t.shape) == (1, 1, *SHAPE)
    # the ramp along file axis 0 must lie along network axis 2 (reversed) or 0 (file order)
    ramp_axis = 2 if reverse else 0
    other = tuple(a for a in range(3) if a != ramp_axis)
    x = fixed_t[0, 0]
    assert (x.amax(dim=other) - x.amin(dim=other)).abs().max() < 1e-5  # constant off the ramp axis
    assert (x.amax() - x.amin()) > 10

    # the constant network displacement along channel 0 is along the file's LAST voxel axis when reversed
    file_axis = 2 if reverse else 0
    n = SHAPE[0]  # network size of the original axis the network calls axis 0
    big = fixed.shape[file_axis]
    expected_voxels = STEP * (n - 1) * big / n
    expected = np.zeros(3)
    expected[file_axis] = expected_voxels
    np.testing.assert_allclose(r.ddf.reshape(3, -1).T, np.broadcast_to(expected, (r.ddf[0].size, 3)), atol=1e-4)
    spacing = np.array([1.5, 1.2, 2.0])
    np.testing.assert_allclose(r.displacement.reshape(3, -1).max(axis=1), expected * spacing, atol=1e-4)
    np.testing.assert_allclose(r.displacement.reshape(3, -1).min(axis=1), expected * spacing, atol=1e-4)
    # the inverse (same stand-in) and point mapping agree with the dense fields
    np.testing.assert_allclose(r.inverse_displacement.reshape(3, -1).max(axis=1), expected * spacing, atol=1e-4)
    pts = Grid.of(fixed).index_to_world(np.array([[3.0, 4.0, 5.0], [10.0, 20.0, 25.0]]))
    np.testing.assert_allclose(r.fixed_to_moving(pts), pts + expected * spacing, atol=1e-4)
    np.testing.assert_allclose(r.moving_to_fixed(pts), pts + expected * spacing, atol=1e-4)
    np.testing.assert_allclose(r.jacobian, 1.0, atol=1e-4)


@pytest.mark.parametrize("reverse", [True, False])
def test_identity_network_zero_displacement(reverse):
    fixed, moving = image((20, 26, 30), seed=0), image((22, 24, 28), seed=1)
    r = register_pair(fixed, moving, slim_network(1, SHAPE), preprocess="none", input_shape=SHAPE,
                      reference_axis_order=reverse)
    # box alignment only: fixed voxel i goes to the moving point with the same normalized network coordinate
    fg, mg = Grid.of(fixed), Grid.of(moving)
    idx = np.array([[0.0, 0.0, 0.0], [19.0, 25.0, 29.0], [7.0, 11.0, 13.0]])
    net_shape = np.array(SHAPE[::-1] if reverse else SHAPE, dtype=float)
    f_shape, m_shape = np.array(fixed.shape, float), np.array(moving.shape, float)
    q = ((idx + 0.5) * net_shape / f_shape - 0.5) / (net_shape - 1)
    m_idx = (q * (net_shape - 1) + 0.5) * m_shape / net_shape - 0.5
    np.testing.assert_allclose(r.fixed_to_moving(fg.index_to_world(idx)), mg.index_to_world(m_idx), atol=1e-4)
    disp = r.displacement[(slice(None), *idx.astype(int).T)].T
    np.testing.assert_allclose(fg.index_to_world(idx) + disp, mg.index_to_world(m_idx), atol=1e-4)
    # same grids: exactly zero displacement
    same = register_pair(fixed, image((20, 26, 30), seed=1), slim_network(1, SHAPE), preprocess="none",
                         input_shape=SHAPE, reference_axis_order=reverse)
    assert np.abs(same.displacement).max() < 1e-4 and np.abs(same.inverse_displacement).max() < 1e-4


def transposed(img):
    """The same world image stored with its voxel axes reversed."""
    aff = img.affine.copy()
    aff[:, :3] = img.affine[:, [2, 1, 0]]
    return Image(np.ascontiguousarray(np.transpose(img.array)), aff)


def test_reversed_equals_file_order_of_transposed_files():
    """Flag on with files (i, j, k) == flag off with the same images stored (k, j, i): the network sees identical
    arrays, so world displacements agree voxel for voxel (up to the transposed storage)."""
    aff = np.array([[0.0, 1.3, 0, -5], [-1.1, 0, 0, 8], [0, 0, 2.2, 1], [0, 0, 0, 1]])
    fixed, moving = image((20, 26, 30), seed=0), image((22, 24, 28), aff, seed=2)
    net = random_network(1, SHAPE)
    a = register_pair(fixed, moving, net, preprocess="none", input_shape=SHAPE, reference_axis_order=True)
    b = register_pair(transposed(fixed), transposed(moving), net, preprocess="none", input_shape=SHAPE,
                      reference_axis_order=False)
    assert np.abs(a.displacement).max() > 1e-2
    np.testing.assert_allclose(a.displacement, np.transpose(b.displacement, (0, 3, 2, 1)), atol=1e-4)
    np.testing.assert_allclose(a.inverse_displacement, np.transpose(b.inverse_displacement, (0, 3, 2, 1)), atol=1e-4)
    np.testing.assert_allclose(a.warped_moving, np.transpose(b.warped_moving), atol=1e-3)
    np.testing.assert_allclose(a.jacobian, np.transpose(b.jacobian), atol=1e-4)
    pts = Grid.of(fixed).index_to_world(np.array([[3.0, 4.0, 5.0], [15.0, 20.0, 25.0]]))
    np.testing.assert_allclose(a.fixed_to_moving(pts), b.fixed_to_moving(pts), atol=1e-4)
    np.testing.assert_allclose(a.moving_to_fixed(pts), b.moving_to_fixed(pts), atol=1e-4)
    # and the two modes differ on the same files (the network's output depends on the axis order)
    c = register_pair(fixed, moving, net, preprocess="none", input_shape=SHAPE, reference_axis_order=False)
    assert np.abs(c.displacement - a.displacement).max() > 1e-3


def test_summary_records_axis_order(tmp_path):
    net, _ = stand_in()
    r = register_pair(ramp_image(), ramp_image(), net, preprocess="none", input_shape=SHAPE, inverse=False)
    r.save(tmp_path / "out", overview=True)
    settings = json.loads((tmp_path / "out" / "summary.json").read_text())["settings"]
    assert settings["reference_axis_order"] is True and settings["network"]["input_shape"] == list(SHAPE)
