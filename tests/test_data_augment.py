"""Tests for the GradICON pair augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from monai_gradicon.data import affine_warp, augment_pair, random_signed_permutation, random_swap


def _expected_permuted(image: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Apply a signed permutation ``theta`` (d, d+1) to a cubic [*spatial] array by pure indexing.

    ``affine_grid`` coordinates are ordered (x, y, z) = (last, ..., first) array axis; with align_corners=False a
    sign flip of a normalised coordinate maps index i to n - 1 - i exactly.
    """
    d = image.ndim
    n = image.shape[0]
    out_index = np.meshgrid(*[np.arange(n)] * d, indexing="ij")
    in_index = [None] * d
    for row in range(d):
        col = int(np.argmax(np.abs(theta[row, :d])))
        sign = theta[row, col]
        source = out_index[d - 1 - col]
        in_index[d - 1 - row] = source if sign > 0 else n - 1 - source
    return image[tuple(in_index)]


@pytest.mark.parametrize("shape", [(2, 1, 7, 6, 5), (3, 2, 9, 8)])
def test_identity_without_noise_or_permutation(shape):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    a, b = augment_pair(image, image * 2, noise_std=0.0, permute=False)
    torch.testing.assert_close(a, image, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, image * 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_permutation_flips_and_transposes_axes(ndim):
    n = 6
    generator = torch.Generator().manual_seed(1)
    image_a = torch.rand((8, 1) + (n,) * ndim, generator=generator, dtype=torch.float64)
    image_b = torch.rand((8, 1) + (n,) * ndim, generator=generator, dtype=torch.float64)
    a, b, theta_a, theta_b = augment_pair(image_a, image_b, generator, noise_std=0.0, return_matrices=True)
    torch.testing.assert_close(theta_a, theta_b)  # A and B share the permutation
    seen = set()
    for i in range(image_a.shape[0]):
        theta = theta_a[i].numpy()
        seen.add(tuple(theta.ravel()))
        np.testing.assert_allclose(a[i, 0].numpy(), _expected_permuted(image_a[i, 0].numpy(), theta), atol=1e-5)
        np.testing.assert_allclose(b[i, 0].numpy(), _expected_permuted(image_b[i, 0].numpy(), theta), atol=1e-5)
    assert len(seen) > 1  # several different permutations occurred


def test_known_matrix_transposes_and_flips():
    image = torch.arange(27.0).reshape(1, 1, 3, 3, 3)
    swap_xy = torch.tensor([[[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]])  # exchange the last two array axes
    torch.testing.assert_close(affine_warp(image, swap_xy), image.transpose(3, 4))
    flip_z = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0]]])  # z = first array axis
    torch.testing.assert_close(affine_warp(image, flip_z), image.flip(2))


def test_noise_is_independent_for_a_and_b_and_has_the_right_scale():
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(400, 1, 4, 4, generator=generator)
    _, _, theta_a, theta_b = augment_pair(image, image, generator, noise_std=0.05, return_matrices=True)
    perm_a = torch.round(theta_a[:, :, :2])
    torch.testing.assert_close(perm_a, torch.round(theta_b[:, :, :2]))  # same underlying permutation
    noise_a = theta_a - torch.cat([perm_a, torch.zeros(400, 2, 1)], dim=2)
    noise_b = theta_b - torch.cat([perm_a, torch.zeros(400, 2, 1)], dim=2)
    assert 0.045 < noise_a.std().item() < 0.055 and 0.045 < noise_b.std().item() < 0.055
    assert abs(np.corrcoef(noise_a.flatten(), noise_b.flatten())[0, 1]) < 0.05
    assert abs(noise_a[:, :, 2].mean().item()) < 0.01  # translation column: noise only


def test_signed_permutations_cover_the_group():
    theta = random_signed_permutation(2000, 2, torch.Generator().manual_seed(0))
    assert theta.shape == (2000, 2, 3)
    torch.testing.assert_close(theta[:, :, 2], torch.zeros(2000, 2))
    rot = theta[:, :, :2]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(2).expand(2000, 2, 2))
    assert len({tuple(m.flatten().tolist()) for m in rot}) == 8  # 2! * 2^2 signed permutations
    theta3 = random_signed_permutation(3000, 3, torch.Generator().manual_seed(0))
    assert len({tuple(m.flatten().tolist()) for m in theta3[:, :, :3]}) == 48


def test_reproducible_with_generator_and_keeps_dtype():
    image = torch.rand(2, 1, 5, 5, 5, dtype=torch.float64)
    first = augment_pair(image, image, torch.Generator().manual_seed(7))
    second = augment_pair(image, image, torch.Generator().manual_seed(7))
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y)
        assert x.dtype == torch.float64 and x.shape == image.shape
    assert not torch.allclose(first[0], first[1])  # independent noise for A and B


def test_augment_pair_errors():
    with pytest.raises(ValueError, match="batch"):
        augment_pair(torch.rand(2, 1, 4, 4, 4), torch.rand(3, 1, 4, 4, 4))
    with pytest.raises(ValueError):
        augment_pair(torch.rand(2, 4), torch.rand(2, 4))
    with pytest.raises(TypeError, match="floating"):
        augment_pair(torch.ones(1, 1, 4, 4, dtype=torch.int64), torch.ones(1, 1, 4, 4, dtype=torch.int64))


def test_random_swap():
    a = torch.arange(64.0).view(64, 1, 1, 1)
    b = -a - 1
    same = random_swap(a, b, p=0.0)
    assert torch.equal(same[0], a) and torch.equal(same[1], b)
    swapped = random_swap(a, b, p=1.0)
    assert torch.equal(swapped[0], b) and torch.equal(swapped[1], a)
    new_a, new_b = random_swap(a, b, generator=torch.Generator().manual_seed(0))
    flipped = new_a < 0
    assert 10 < int(flipped.sum()) < 54  # a mixture at p = 0.5
    assert torch.equal(torch.where(flipped, b, a), new_a) and torch.equal(torch.where(flipped, a, b), new_b)
    repeat = random_swap(a, b, generator=torch.Generator().manual_seed(0))
    assert torch.equal(repeat[0], new_a)
    with pytest.raises(ValueError):
        random_swap(a, b[:3])
    with pytest.raises(ValueError):
        random_swap(a, b, p=1.5)


def test_expected_permuted_helper_matches_numpy_for_a_flip_and_transpose():
    """Guard for the test helper itself: theta rows/columns follow affine_grid's (x, y, z) ordering."""
    image = np.arange(27).reshape(3, 3, 3)
    theta = np.zeros((3, 4))
    theta[0, 2], theta[1, 1], theta[2, 0] = 1, -1, 1  # x <- z, y <- -y, z <- x
    expected = np.flip(image.transpose(2, 1, 0), axis=1)
    np.testing.assert_array_equal(_expected_permuted(image, theta), expected)
    for perm in itertools.permutations(range(3)):
        theta = np.zeros((3, 4))
        theta[np.arange(3), perm] = 1
        out = affine_warp(torch.from_numpy(image).double()[None, None], torch.from_numpy(theta)[None])
        np.testing.assert_allclose(out[0, 0].numpy(), _expected_permuted(image, theta), atol=1e-9)


def test_translation_uses_align_corners_false_and_border_padding():
    # ramp along the last array axis (affine_grid x); a normalised shift of 0.5 is n * 0.5 / 2 = 1 voxel when
    # align_corners=False (it would be 0.75 voxel with align_corners=True); the last voxel repeats the border
    image = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 3, 4).contiguous()
    theta = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])
    torch.testing.assert_close(affine_warp(image, theta)[0, 0, 0], torch.tensor([1.0, 2.0, 3.0, 3.0]))
