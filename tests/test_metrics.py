import math

import numpy as np
import pytest
import torch

from monai_gradicon.metrics import (
    dice_per_label,
    folding_percentage,
    jacobian_determinant,
    landmark_tre,
    log_jacobian_std,
    log_determinant_std,
    reference_flips,
    sample_ddf_at_points,
)
from tolerance import assert_f32_close


def voxel_grid(shape, dtype=torch.float64):
    """[dim, *shape] voxel index coordinates."""
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in shape], indexing="ij"))


def linear_ddf(matrix, shape):
    """[1, dim, *shape] ddf(x) = A x (voxels)."""
    a = torch.as_tensor(matrix, dtype=torch.float64)
    return torch.einsum("ij,j...->i...", a, voxel_grid(shape))[None]


def folded_ddf_2d():
    """2D ddf [1, 2, 10, 4] whose map along axis 0 is 0,1,2,3,4,5,4,3,2,1: det J = d(map)/di per row."""
    target = torch.tensor([0, 1, 2, 3, 4, 5, 4, 3, 2, 1], dtype=torch.float64)
    ddf = torch.zeros(1, 2, 10, 4, dtype=torch.float64)
    ddf[0, 0] = (target - torch.arange(10, dtype=torch.float64))[:, None]
    return ddf


A3 = [[0.10, 0.20, -0.05], [0.03, -0.30, 0.10], [0.05, 0.07, 0.20]]


# ------------------------------------------------------------------------------------------------ Jacobian


def test_jacobian_of_affine_field_3d():
    det = jacobian_determinant(linear_ddf(A3, (6, 7, 8)))
    expected = float(np.linalg.det(np.eye(3) + np.array(A3)))
    assert det.shape == (1, 6, 7, 8)
    torch.testing.assert_close(det, torch.full_like(det, expected), rtol=0, atol=1e-12)


def test_jacobian_of_affine_field_2d_and_batch():
    a = [[0.5, -0.25], [0.1, -0.2]]
    ddf = torch.cat([linear_ddf(a, (5, 9)), torch.zeros(1, 2, 5, 9, dtype=torch.float64)])
    det = jacobian_determinant(ddf)
    assert det.shape == (2, 5, 9)
    expected = (1.5 * 0.8) - (-0.25 * 0.1)
    torch.testing.assert_close(det[0], torch.full((5, 9), expected, dtype=torch.float64))
    torch.testing.assert_close(det[1], torch.ones(5, 9, dtype=torch.float64))


def test_jacobian_matches_numpy_gradient_scheme():
    rng = np.random.default_rng(0)
    ddf = rng.normal(scale=0.4, size=(3, 5, 6, 7))
    jac = np.empty((5, 6, 7, 3, 3))
    for i in range(3):
        for j, g in enumerate(np.gradient(ddf[i], axis=(0, 1, 2))):
            jac[..., i, j] = g + (i == j)
    expected = np.linalg.det(jac)
    det = jacobian_determinant(torch.from_numpy(ddf)[None])[0].numpy()
    np.testing.assert_allclose(det, expected, atol=1e-10)


def test_jacobian_spacing_is_documented_invariant():
    rng = np.random.default_rng(1)
    ddf = torch.from_numpy(rng.normal(scale=0.3, size=(2, 3, 5, 6, 7)))
    torch.testing.assert_close(jacobian_determinant(ddf, spacing=(0.7, 1.0, 2.5)), jacobian_determinant(ddf))


def test_jacobian_input_errors():
    with pytest.raises(ValueError, match="channels"):
        jacobian_determinant(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="B, dim"):
        jacobian_determinant(torch.zeros(3, 4, 4, 4))
    with pytest.raises(ValueError, match="spacing"):
        jacobian_determinant(torch.zeros(1, 3, 4, 4, 4), spacing=(1.0, 2.0))
    with pytest.raises(ValueError, match="positive"):
        jacobian_determinant(torch.zeros(1, 3, 4, 4, 4), spacing=(1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------------ folding


def test_folding_percentage_known_fold():
    ddf = torch.cat([folded_ddf_2d(), torch.zeros(1, 2, 10, 4, dtype=torch.float64)])
    # central differences: det per row = 1,1,1,1,1,0,-1,-1,-1,-1 -> rows 5..9 (det <= 0) are folded
    torch.testing.assert_close(folding_percentage(ddf), torch.tensor([50.0, 0.0], dtype=torch.float64))


def test_folding_percentage_reflection_3d():
    ddf = linear_ddf([[-2.0, 0, 0], [0, 0, 0], [0, 0, 0]], (4, 4, 4))  # x0 -> -x0
    torch.testing.assert_close(folding_percentage(ddf), torch.tensor([100.0], dtype=torch.float64))


def _identity_map(shape):
    return (voxel_grid(shape) / torch.tensor([n - 1 for n in shape], dtype=torch.float64).view(-1, *[1] * len(shape)))[
        None
    ]


def test_reference_flips_two_rows_swapped_2d():
    phi = _identity_map((8, 8))
    assert float(reference_flips(phi)) == 0.0
    swapped = phi.clone()
    swapped[:, :, [3, 4]] = phi[:, :, [4, 3]]
    assert float(reference_flips(swapped)) == 7.0  # the 7 cells of row 3 are inverted
    assert float(reference_flips(swapped, in_percentage=True)) == pytest.approx(100 * 7 / 49, abs=1e-4)
    assert float(reference_flips(swapped, in_percentage=True)) == pytest.approx(14.29, abs=5e-3)
    batch = torch.cat([swapped, phi])  # count / B and percentage over all cells of the batch
    assert float(reference_flips(batch)) == 3.5
    assert float(reference_flips(batch, in_percentage=True)) == pytest.approx(100 * 7 / 98)


def test_reference_flips_3d_reflection_and_identity():
    phi = _identity_map((5, 6, 7))
    assert float(reference_flips(phi)) == 0.0
    mirrored = phi.clone()
    mirrored[:, 2] = 1.0 - phi[:, 2]
    assert float(reference_flips(mirrored)) == 4 * 5 * 6
    assert float(reference_flips(mirrored, in_percentage=True)) == pytest.approx(100.0)


@pytest.mark.parametrize("shape", [(2, 2, 9, 7), (2, 3, 6, 5, 7)])
def test_reference_flips_matches_icon_registration(shape):
    losses = pytest.importorskip("icon_registration.losses")
    spatial = shape[2:]
    generator = torch.Generator().manual_seed(4)
    phi = _identity_map(spatial).float().expand(shape[0], -1, *spatial) + 0.08 * torch.randn(shape, generator=generator)
    for in_percentage in (False, True):
        expected = losses.flips(phi, in_percentage=in_percentage)
        assert float(reference_flips(phi, in_percentage=in_percentage)) == pytest.approx(float(expected))
    assert float(losses.flips(phi)) > 0  # the noise does create folds


# ------------------------------------------------------------------------------------------------ log det J std


def test_log_jacobian_std():
    torch.testing.assert_close(log_jacobian_std(linear_ddf(A3, (5, 5, 5))), torch.zeros(1, dtype=torch.float64))
    # half of the rows have det 1 (log 0), half det <= 0 clamped to 1e-9: population std = |log 1e-9| / 2
    std = log_jacobian_std(folded_ddf_2d())
    assert float(std) == pytest.approx(-math.log(1e-9) / 2, rel=1e-9)


def test_log_jacobian_std_matches_numpy():
    rng = np.random.default_rng(2)
    ddf = torch.from_numpy(rng.normal(scale=0.2, size=(1, 3, 6, 5, 4)))
    det = jacobian_determinant(ddf).numpy()
    expected = np.log(np.clip(det, 1e-9, None)).std()
    assert float(log_jacobian_std(ddf)) == pytest.approx(float(expected), rel=1e-10)
    # from determinants already computed (the pipeline's path): the same value, the field differentiated once
    assert float(log_determinant_std(jacobian_determinant(ddf))) == pytest.approx(float(expected), rel=1e-10)
    with pytest.raises(ValueError, match="eps"):
        log_determinant_std(jacobian_determinant(ddf), eps=0.0)


# ------------------------------------------------------------------------------------------------ landmarks


def test_sample_ddf_at_points_is_exact_for_linear_fields():
    ddf = linear_ddf(A3, (6, 7, 8))
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.5, 4.25, 6.75], [5.0, 6.0, 7.0]])
    expected = points.double() @ torch.tensor(A3, dtype=torch.float64).T
    torch.testing.assert_close(sample_ddf_at_points(ddf, points)[0], expected, atol=1e-9, rtol=0)


def test_sample_ddf_at_points_2d_batched_points():
    rng = np.random.default_rng(3)
    ddf = torch.from_numpy(rng.normal(size=(2, 2, 5, 9)))
    pts = torch.tensor([[[0.0, 8.0], [4.0, 3.0]], [[2.0, 0.0], [1.0, 1.0]]])
    out = sample_ddf_at_points(ddf, pts)
    for b in range(2):
        for k in range(2):
            i, j = (int(v) for v in pts[b, k])
            torch.testing.assert_close(out[b, k], ddf[b, :, i, j])


def test_landmark_tre_voxel_constant_shift():
    shift = torch.tensor([1.0, -2.0, 3.0])
    ddf = shift.view(1, 3, 1, 1, 1).expand(1, 3, 8, 9, 10).clone()
    fixed = torch.tensor([[1.0, 2.0, 3.0], [4.5, 5.0, 1.0], [2.0, 7.0, 0.0]])
    offsets = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.0, 1.0]])
    moving = fixed + shift + offsets
    errors, mean = landmark_tre(moving, fixed, ddf, points_in="voxel")
    torch.testing.assert_close(errors, torch.tensor([[0.0, 0.5, math.sqrt(2)]], dtype=torch.float64))
    torch.testing.assert_close(mean, errors.mean(dim=1))
    # anisotropic spacing: offsets are scaled per axis (mm)
    errors_mm, _ = landmark_tre(moving, fixed, ddf, points_in="voxel", spacing=(2.0, 1.5, 3.0))
    torch.testing.assert_close(errors_mm, torch.tensor([[0.0, 1.0, math.sqrt(1.5**2 + 3.0**2)]], dtype=torch.float64))
    # perfect prediction
    errors0, mean0 = landmark_tre(fixed + shift, fixed, ddf, points_in="voxel", spacing=(2.0, 1.5, 3.0))
    # the DDF is float32: the prediction is exact up to its rounding at the landmark coordinates (mm)
    assert_f32_close(errors0, torch.zeros_like(errors0), ulps=8, scale=float(fixed.abs().max()) * 3.0)


def test_landmark_tre_world_anisotropic_affines():
    shape = (8, 9, 10)
    shift = np.array([1.0, -2.0, 0.5])
    ddf = torch.tensor(shift).view(1, 3, 1, 1, 1).expand(1, 3, *shape).clone()
    # fixed voxel -> world: spacing (2, 1, 3) mm with an axis permutation in world space and an origin
    fixed_affine = np.array([[0.0, 1.0, 0.0, -5.0], [2.0, 0.0, 0.0, 10.0], [0.0, 0.0, 3.0, 3.0], [0, 0, 0, 1]])
    moving_affine = np.array([[1.5, 0.0, 0.0, 7.0], [0.0, 0.5, 0.0, -2.0], [0.0, 0.0, 2.0, 1.0], [0, 0, 0, 1]])
    fixed_vox = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 8.0, 7.0]])
    fixed_world = fixed_vox @ fixed_affine[:3, :3].T + fixed_affine[:3, 3]
    true_moving_vox = fixed_vox + shift
    true_moving_world = true_moving_vox @ moving_affine[:3, :3].T + moving_affine[:3, 3]
    world_offsets = np.array([[0.0, 0.0, 0.0], [-3.0, 0.0, 4.0], [0.0, 0.0, -2.0]])
    errors, mean = landmark_tre(
        true_moving_world + world_offsets,
        fixed_world,
        ddf,
        points_in="world",
        fixed_affine=fixed_affine,
        moving_affine=moving_affine,
    )
    torch.testing.assert_close(errors, torch.tensor([[0.0, 5.0, 2.0]], dtype=torch.float64))
    assert float(mean) == pytest.approx(7.0 / 3.0)
    # the same points in the voxel frame with the moving affine for mm distances
    errors_vox, _ = landmark_tre(
        true_moving_vox + np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
        fixed_vox,
        ddf,
        points_in="voxel",
        moving_affine=moving_affine,
    )
    torch.testing.assert_close(errors_vox, torch.tensor([[0.0, 3.0, 2.0]], dtype=torch.float64))


def test_landmark_tre_argument_errors():
    ddf = torch.zeros(1, 3, 5, 5, 5)
    pts = torch.tensor([[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="outside the image"):
        landmark_tre(pts, torch.tensor([[1.0, 5.0, 1.0]]), ddf, points_in="voxel")
    with pytest.raises(ValueError, match="moving_points.*outside"):
        landmark_tre(torch.tensor([[-0.5, 1.0, 1.0]]), pts, ddf, points_in="voxel")
    with pytest.raises(ValueError, match="outside the image"):
        world_out = torch.tensor([[100.0, 0.0, 0.0]])
        landmark_tre(pts, world_out, ddf, points_in="world", fixed_affine=np.eye(4), moving_affine=np.eye(4))
    with pytest.raises(ValueError, match="outside the image"):
        sample_ddf_at_points(ddf, torch.tensor([[0.0, 0.0, 4.01]]))
    with pytest.raises(TypeError):
        landmark_tre(pts, pts, ddf)  # the frame is a required keyword
    with pytest.raises(ValueError, match="points_in"):
        landmark_tre(pts, pts, ddf, points_in="mm")
    with pytest.raises(ValueError, match="requires both"):
        landmark_tre(pts, pts, ddf, points_in="world", fixed_affine=np.eye(4))
    with pytest.raises(ValueError, match="fixed_affine is only used"):
        landmark_tre(pts, pts, ddf, points_in="voxel", fixed_affine=np.eye(4))
    with pytest.raises(ValueError, match="same number of landmarks"):
        landmark_tre(torch.cat([pts, pts]), pts, ddf, points_in="voxel")
    with pytest.raises(ValueError, match=r"shape \[K, 3\]"):
        landmark_tre(pts[:, :2], pts[:, :2], ddf, points_in="voxel")


# ------------------------------------------------------------------------------------------------ Dice


def test_dice_per_label_known_maps():
    fixed = torch.tensor([[1, 1, 2, 2, 0, 0]])
    warped = torch.tensor([[1, 2, 2, 2, 0, 3]])
    scores = dice_per_label(warped, fixed)
    assert set(scores) == {1, 2, 3, "mean"}  # background 0 excluded
    assert scores[1] == pytest.approx(2 * 1 / (1 + 2))
    assert scores[2] == pytest.approx(2 * 2 / (3 + 2))
    assert scores[3] == 0.0
    assert scores["mean"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)


def test_dice_absent_label_is_nan_and_ignored_in_mean():
    fixed = np.array([[[1, 1], [0, 0]]], dtype=np.int16)
    warped = np.array([[[1, 0], [0, 0]]], dtype=np.uint8)
    scores = dice_per_label(warped, fixed, labels=[1, 5])
    assert math.isnan(scores[5])
    assert scores[1] == pytest.approx(2 / 3)
    assert scores["mean"] == pytest.approx(2 / 3)
    assert math.isnan(dice_per_label(warped, fixed, labels=[7])["mean"])


def test_dice_float_labels():
    fixed = torch.tensor([0.0, 1.0, 2.0, 2.0])
    assert dice_per_label(fixed.clone(), fixed)["mean"] == 1.0  # whole-number floats are accepted
    with pytest.raises(ValueError, match="integer label map"):
        dice_per_label(torch.tensor([0.0, 1.0, 1.5, 2.0]), fixed)
    with pytest.raises(ValueError, match="same shape"):
        dice_per_label(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))


def test_tre_moving_landmarks_checked_against_moving_grid():
    """A moving landmark outside the fixed grid but inside a larger moving grid is valid when moving_shape says so."""
    from monai_gradicon.metrics import landmark_tre

    ddf = torch.zeros(1, 3, 8, 8, 8)
    ddf[:, 0] = 5.0  # fixed voxel x maps to moving voxel x + 5 along axis 0
    fixed = torch.tensor([[6.0, 2.0, 2.0]])
    moving = torch.tensor([[11.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match="moving_points"):
        landmark_tre(moving, fixed, ddf, points_in="voxel")
    errors, mean = landmark_tre(moving, fixed, ddf, points_in="voxel", moving_shape=(16, 8, 8))
    assert_f32_close(mean, torch.zeros_like(mean), ulps=8, scale=16.0)


def test_atomic_write_gives_normal_permissions(tmp_path):
    import os
    import stat

    from monai_gradicon.io_utils import atomic_write

    target = tmp_path / "out.txt"
    atomic_write(target, lambda p: open(p, "w").write("x"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask


def test_tre_statistics_hand_computed():
    from monai_gradicon.metrics import tre_statistics

    truth = np.zeros((4, 3))
    predicted = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    stats = tre_statistics(predicted, truth)
    assert stats["per_landmark_mm"] == [5.0, 1.0, 2.0, 0.0]
    assert stats["mean_mm"] == 2.0 and stats["max_mm"] == 5.0 and stats["median_mm"] == 1.5
    assert stats["p95_mm"] == float(np.percentile([5.0, 1.0, 2.0, 0.0], 95))
    with pytest.raises(ValueError, match="\\[K, dim\\]"):
        tre_statistics(predicted[:3], truth)
