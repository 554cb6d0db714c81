"""The affine pre-alignment stage of the registration pipeline (``prealign="rigid" | "affine"``) on a real brain
moved by a known affine: every output (displacement, inverse, warped image, points, the ITK ``.tfm``, the summary)
is the exact composition of the pre-alignment with the network's transform.

Independent computations: the known affine and the moved image come from tests/test_affine.py's helpers
(``scipy.ndimage`` resampling); the composition is checked against a second registration of the pre-aligned image
without pre-alignment, composed here with numpy. Accuracy bounds of the affine itself are explained in
tests/test_affine.py (a sixth and a third of a 3 mm voxel); float32 comparisons use tests/tolerance.py.
"""

import json
import os

import numpy as np
import pytest
import torch

from monai_gradicon.affine import affine_displacement, read_itk_affine, transform_points
from monai_gradicon.pipeline import OUTPUT_FILES, register as register_pair
from monai_gradicon.resample import Grid
from test_affine import anatomy_centre, brain, known_affine, moved_case, resample_scipy, residual  # noqa: F401
from test_instance_optimization import slim_network
from tolerance import assert_f32_close

NET = (24, 24, 24)


@pytest.fixture(scope="module")
def case(brain):  # noqa: F811 (the fixture imported above)
    t1, mask, native = brain
    m_true = known_affine(anatomy_centre(t1, mask), (12.0, -8.0, 15.0), (15.0, -20.0, 10.0), (1.08, 0.94, 1.03))
    moving, points = moved_case(native, t1, mask, m_true, (2.6, 3.3, 3.0), (10.0, -5.0, 12.0), 0.0, n_points=300)
    return t1, moving, m_true, points


def random_network(seed=0):
    net = slim_network(1, NET, seed)
    with torch.no_grad():
        net.steps[0].unet.lastConv.weight.normal_(0.0, 2e-3)
    return net


def world_of(grid: Grid) -> np.ndarray:
    """``[dim, *shape]`` world coordinates (RAS mm) of every voxel of ``grid``."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid.shape], indexing="ij"), 0)
    return np.einsum("ij,j...->i...", grid.matrix, idx) + grid.offset.reshape(-1, *([1] * grid.ndim))


def test_identity_network_gives_the_affine_everywhere(case, tmp_path):
    """A network that does not deform (zero last layer) leaves exactly the pre-alignment: the fields are the affine's,
    the points map through it, and the saved ``.tfm`` reads back as the same matrix."""
    fixed, moving, m_true, points = case
    assert residual(np.eye(4), m_true, points).mean() > 15.0  # far outside what the network alone would fix
    r = register_pair(fixed, moving, slim_network(1, NET), preprocessing="none", prealign="affine")
    matrix = r.prepared.prealign
    err = residual(matrix, m_true, points)
    assert err.mean() < 0.5 and err.max() < 1.0, (err.mean(), err.max())
    fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
    expected = affine_displacement(matrix, fixed_grid)
    assert_f32_close(r.displacement, expected, ulps=8, scale=np.abs(world_of(fixed_grid)).max(), what="displacement")
    inverse = affine_displacement(np.linalg.inv(matrix), moving_grid)
    assert_f32_close(r.inverse_displacement, inverse, ulps=8, scale=np.abs(world_of(moving_grid)).max(),
                     what="inverse displacement")
    assert_f32_close(r.fixed_to_moving(points), transform_points(matrix, points), ulps=8,
                     scale=np.abs(points).max(), what="points")
    np.testing.assert_allclose(r.jacobian, np.linalg.det(matrix[:3, :3]), rtol=1e-4)
    paths = r.save(tmp_path / "out")
    assert os.path.basename(paths[OUTPUT_FILES["affine"]]) == OUTPUT_FILES["affine"]
    np.testing.assert_allclose(read_itk_affine(paths[OUTPUT_FILES["affine"]]), matrix, rtol=0, atol=1e-9)
    summary = json.loads((tmp_path / "out" / OUTPUT_FILES["summary"]).read_text())
    assert summary["settings"]["prealign"] == "affine"
    assert np.allclose(summary["prealign"]["matrix_fixed_to_moving_ras"], matrix, atol=1e-7)
    assert OUTPUT_FILES["affine"] in summary["outputs"]
    # the warped image is the moving image sampled through the affine (scipy, independently), compared where the
    # sampled point is at least a voxel inside the moving image (the padding conventions differ at the border)
    expected_warp = resample_scipy(moving, matrix, fixed.shape, fixed.affine, 0.0)
    source = transform_points(np.linalg.inv(moving.affine) @ matrix, world_of(fixed_grid).reshape(3, -1).T)
    inside = np.all((source > 1) & (source < np.array(moving.shape) - 2), axis=1).reshape(fixed.shape)
    assert inside.mean() > 0.3
    # linear interpolation at coordinates rounded in float32 (world coordinates up to ~120 mm, gradient up to the
    # image range per voxel): a few rounding steps of the image range
    assert_f32_close(r.warped_moving[inside], expected_warp[inside], ulps=64,
                     scale=float(np.ptp(moving.array)), what="warped image")


def test_deformation_composes_exactly_with_the_prealignment(case):
    """With a deforming network, the result is ``x -> M (x + d(x))``: ``d`` from registering the pre-aligned image
    (on the fixed grid) without pre-alignment, ``M`` the pre-alignment. The inverse is
    ``y -> x + v(x)`` at ``x = M^-1 y``, ``v`` that registration's inverse."""
    fixed, moving, _, _ = case
    net = random_network()
    r = register_pair(fixed, moving, net, preprocessing="none", prealign="rigid")
    assert r.settings.prealign == "rigid"
    matrix = r.prepared.prealign
    linear = matrix[:3, :3]
    assert np.allclose(linear.T @ linear, np.eye(3), atol=1e-6)  # rigid: a rotation, no scaling
    aligned = r.prepared.moving_oriented  # the pre-aligned moving image on the fixed grid
    assert aligned.shape == fixed.shape and np.allclose(aligned.affine, fixed.affine)
    plain = register_pair(fixed, aligned, net, preprocessing="none")
    assert np.abs(plain.displacement).max() > 0.5  # the network really deforms (mm)
    fixed_world = world_of(Grid.of(fixed))
    target = np.einsum("ij,j...->i...", linear, fixed_world + plain.displacement) + matrix[:3, 3].reshape(3, 1, 1, 1)
    assert_f32_close(r.displacement, target - fixed_world, ulps=16, scale=np.abs(fixed_world).max(),
                     what="composed displacement")
    # the inverse on the moving grid: y -> M^-1 y -> + v there (v interpolated: compare at the mapped voxel points)
    pts = transform_points(moving.affine, np.argwhere(np.ones(moving.shape, bool))[::97].astype(np.float64))
    expected = plain.moving_to_fixed(transform_points(np.linalg.inv(matrix), pts))
    assert_f32_close(r.moving_to_fixed(pts), expected, ulps=16, scale=np.abs(pts).max(), what="inverse points")


def test_prealign_settings_are_checked_before_any_work(case):
    fixed, moving, _, _ = case
    with pytest.raises(ValueError, match="prealign must be one of"):
        register_pair(fixed, moving, slim_network(1, NET), preprocessing="none", prealign="similarity")
    with pytest.raises(ValueError, match="prealign_similarity must be"):
        register_pair(fixed, moving, slim_network(1, NET), preprocessing="none", prealign="rigid",
                      prealign_similarity="ncc")
