"""The model card's axis order: with ``"reference"`` the network sees the arrays in ITK's numpy order (file axes
reversed, as the released weights), with ``"file"`` in the file's index order; every output stays on the original
grids in both, and both transform schemes agree at the network grid's nodes."""

import json

import numpy as np
import pytest
import torch

from monai_gradicon.coordinate_transforms import DisplacementTransform
from monai_gradicon.io import Image
from monai_gradicon.pipeline import register as register_pair
from monai_gradicon.resample import Grid
from test_instance_optimization import slim_network
from test_register_pair import image, random_network
from tolerance import assert_f32_close

SHAPE = (33, 40, 36)  # network shape, deliberately not cubic
STEP = 0.05  # constant displacement along network channel 0, normalized units


def order(reverse):
    return "reference" if reverse else "file"


def stand_in(shape=SHAPE, reverse=True):
    """A GradICON network whose forward pass records its inputs and returns a constant displacement along network
    coordinate channel 0 only (so the result depends on the axis order the network saw)."""
    net = slim_network(1, shape, axis_order=order(reverse), preprocessing="none")
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
    net, seen = stand_in(reverse=reverse)
    r = register_pair(fixed, moving, net)
    assert r.settings.axis_order == order(reverse) and r.card.axis_order == order(reverse)
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
    r = register_pair(fixed, moving, slim_network(1, SHAPE, axis_order=order(reverse), preprocessing="none"))
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
    same = register_pair(fixed, image((20, 26, 30), seed=1),
                         slim_network(1, SHAPE, axis_order=order(reverse), preprocessing="none"))
    assert np.abs(same.displacement).max() < 1e-4 and np.abs(same.inverse_displacement).max() < 1e-4


def transposed(img):
    """The same world image stored with its voxel axes reversed."""
    aff = img.affine.copy()
    aff[:, :3] = img.affine[:, [2, 1, 0]]
    return Image(np.ascontiguousarray(np.transpose(img.array)), aff)


def with_order(net, axis_order):
    net.card = net.card.replace(axis_order=axis_order, preprocessing="none")
    return net


@pytest.mark.parametrize("scheme", ["grid", "exact"])
def test_reversed_equals_file_order_of_transposed_files(scheme):
    """Reference order with files (i, j, k) == file order with the same images stored (k, j, i): the network sees
    identical arrays, so world displacements agree voxel for voxel (up to the transposed storage)."""
    aff = np.array([[0.0, 1.3, 0, -5], [-1.1, 0, 0, 8], [0, 0, 2.2, 1], [0, 0, 0, 1]])
    fixed, moving = image((20, 26, 30), seed=0), image((22, 24, 28), aff, seed=2)
    net = random_network(1, SHAPE)
    a = register_pair(fixed, moving, with_order(net, "reference"), transform_scheme=scheme)
    b = register_pair(transposed(fixed), transposed(moving), with_order(net, "file"), transform_scheme=scheme)
    assert np.abs(a.displacement).max() > 1e-2
    # the images are resized before vs after the transposition: trilinear sums in another order, so the network's
    # inputs and hence the fields agree to float32 rounding (a few dozen steps of the world coordinates, ~300 mm)
    world = 300.0
    assert_f32_close(a.displacement, np.transpose(b.displacement, (0, 3, 2, 1)), ulps=64, scale=world)
    assert_f32_close(a.inverse_displacement, np.transpose(b.inverse_displacement, (0, 3, 2, 1)), ulps=64, scale=world)
    assert_f32_close(a.warped_moving, np.transpose(b.warped_moving), ulps=64 * 100, scale=1000.0)  # HU, slope ~100/mm
    # det J reaches ~600 here (a random network); the file-order side evaluates its field by separable interpolation,
    # the reversed side by trilinear lookups at float32 points: a few dozen steps at det J's magnitude
    assert_f32_close(a.jacobian, np.transpose(b.jacobian), ulps=64)
    pts = Grid.of(fixed).index_to_world(np.array([[3.0, 4.0, 5.0], [15.0, 20.0, 25.0]]))
    assert_f32_close(a.fixed_to_moving(pts), b.fixed_to_moving(pts), ulps=64, scale=world)
    assert_f32_close(a.moving_to_fixed(pts), b.moving_to_fixed(pts), ulps=64, scale=world)
    # and the two modes differ on the same files (the network's output depends on the axis order)
    c = register_pair(fixed, moving, with_order(net, "file"), transform_scheme=scheme)
    assert np.abs(c.displacement - a.displacement).max() > 1e-3


def test_summary_records_axis_order_and_card(tmp_path):
    net, _ = stand_in()
    r = register_pair(ramp_image(), ramp_image(), net, inverse=False)
    r.save(tmp_path / "out", overview=True)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["axis_order"] == "reference" and summary["settings"]["input_shape"] == list(SHAPE)
    assert summary["model_card"]["axis_order"] == "reference" and summary["model_card"]["input_shape"] == list(SHAPE)
    assert summary["settings"]["transform_scheme"] == "grid" and summary["settings"]["orientation"] == "physical"


def test_schemes_agree_at_network_nodes_and_differ_between():
    """``exact`` evaluates the composition at each point, ``grid`` interpolates the composed map: equal (to float32
    rounding) at fixed voxels that sit on network nodes, different between them when the map is curved."""
    fixed, moving = image((33, 40, 36), seed=0), image((33, 40, 36), seed=1)  # network shape == fixed shape (file order)
    net = random_network(2, (36, 40, 33))  # reference order: network shape = reversed file shape
    net.card = net.card.replace(preprocessing="none")
    grid = register_pair(fixed, moving, net, transform_scheme="grid", inverse=False)
    exact = register_pair(fixed, moving, net, transform_scheme="exact", inverse=False)
    scale = float(np.abs(exact.displacement).max())
    assert scale > 1e-2
    assert_f32_close(grid.displacement, exact.displacement, ulps=64, scale=100.0)  # coordinates ~100 mm
    # off the nodes: a moving image on a finer grid sees points between the network's nodes
    fine = register_pair(image((60, 70, 66), seed=0), moving, net, transform_scheme="grid", inverse=False)
    fine_exact = register_pair(image((60, 70, 66), seed=0), moving, net, transform_scheme="exact", inverse=False)
    assert np.abs(fine.displacement - fine_exact.displacement).max() > 1e-4
