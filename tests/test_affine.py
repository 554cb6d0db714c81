"""Affine pre-alignment (monai_gradicon.affine) on real images moved by known affines, and its ITK transform files.

The moving images are built here independently of the module (``scipy.ndimage.map_coordinates``): the real image at
high resolution is sampled at ``M_true^-1 y`` on a grid twice as fine as the moving grid (other spacing, oblique
direction, reversed axes) and block-averaged onto it, as a scanner would see the moved anatomy; the fixed image is
the same real image block-averaged to 3 mm (MNI152 brain) or 5.9 mm (POPI CT). The residual of an estimate ``M`` is
``|M x - M_true x|`` (mm) at points inside the anatomy.

Accuracy bounds (mm) and why: a wrong basin leaves errors of centimetres; a geometry slip (half a voxel in a level's
affine, an LPS sign, a transposed matrix) errors of at least half a voxel (1.5 mm for the brain, 3 mm for the CT)
somewhere in the anatomy. The bounds (brain: mean < 0.5 mm, max < 1 mm; CT: mean < 1 mm, max < 2 mm; about a sixth
and a third of a voxel) sit above the measured values (in each test's comment) with room for other CPUs' rounding
and below any of those failures. Float32 comparisons use tests/tolerance.py.
"""

import os
import struct

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from monai_gradicon.affine import (
    AffineResult,
    affine_displacement,
    centre_of_mass,
    itk_parameters_to_matrix,
    matrix_to_itk_parameters,
    read_itk_affine,
    register_affine,
    transform_points,
    warp_affine,
    write_itk_affine,
)
from monai_gradicon.io import Image, read_image
from monai_gradicon.resample import Grid
from tolerance import assert_f32_close

MNI = os.path.join("brain_mni152_2009a_sym", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
MNI_GM = os.path.join("brain_mni152_2009a_sym", "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
MNI_WM = os.path.join("brain_mni152_2009a_sym", "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
POPI = os.path.join("lung_ct_popi_phase00", "popi_phase00_ct.nii.gz")
FLIP = np.array([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------------ helpers
def rotation(degrees) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def known_affine(centre, degrees, translation, scales=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Fixed -> moving world matrix ``y = R S (x - c) + c + t``."""
    a = rotation(degrees) @ np.diag(scales)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = np.asarray(centre) + np.asarray(translation) - a @ np.asarray(centre)
    return m


def block_mean(image: Image, factors) -> Image:
    """Average ``factors`` voxels per axis (cropping the remainder); the affine follows (block centres)."""
    f = np.asarray(factors)
    n = np.asarray(image.shape) // f
    a = image.array[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]].astype(np.float32)
    a = a.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))
    aff = image.affine.copy()
    aff[:3, :3] = image.affine[:3, :3] @ np.diag(f)
    aff[:3, 3] = image.affine[:3, :3] @ ((f - 1) / 2.0) + image.affine[:3, 3]
    return Image(a, aff)


def oblique_grid_around(points_world, spacing, degrees, margin=8.0):
    """A grid with reversed first two axes and an oblique direction covering the points plus ``margin`` mm."""
    direction = rotation(degrees) @ np.diag([-1.0, -1.0, 1.0])
    local = np.asarray(points_world) @ direction
    lo, hi = local.min(0) - margin, local.max(0) + margin
    shape = tuple(int(np.ceil((h - l) / s)) + 1 for l, h, s in zip(lo, hi, spacing))
    aff = np.eye(4)
    aff[:3, :3] = direction @ np.diag(spacing)
    aff[:3, 3] = direction @ lo
    return shape, aff


def resample_scipy(image: Image, matrix: np.ndarray, shape, affine, background: float) -> np.ndarray:
    """Independent resampling: value at target voxel j = image (linear) at world ``matrix @ (affine @ j)``."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), 0).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    src = matrix[:3, :3] @ world + matrix[:3, 3:4]
    src_idx = np.linalg.solve(image.affine[:3, :3], src - image.affine[:3, 3:4])
    out = ndi.map_coordinates(image.array.astype(np.float64), src_idx, order=1, mode="constant", cval=background)
    return out.reshape(shape).astype(np.float32)


def moved_case(source: Image, fixed: Image, anatomy: np.ndarray, m_true, spacing, degrees, background,
               n_points=500, seed=0):
    """The moving image: the high-resolution ``source`` seen through ``m_true`` on another grid (``spacing`` mm,
    oblique ``degrees``, reversed axes) around the moved anatomy of ``fixed``, "acquired" like the fixed image:
    sampled (linear) on a grid twice as fine, then block-averaged 2 x 2 x 2. Sampling the coarse fixed image directly
    would blur the moving image by linear interpolation on the fixed's coarse grid, which the fixed image does not
    have, and that blur difference (not the method) would dominate the error at 3-4 mm voxels. Returns the moving
    image and ``n_points`` world points inside the fixed anatomy."""
    grid = Grid.of(fixed)
    idx = np.argwhere(anatomy)
    world = grid.index_to_world(idx.astype(np.float64))
    moved = world @ m_true[:3, :3].T + m_true[:3, 3]
    shape, affine = oblique_grid_around(moved, spacing, degrees)
    fine_affine = affine.copy()
    fine_affine[:3, :3] = affine[:3, :3] / 2.0
    fine_affine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ np.full(3, 0.25)  # block centres land on the coarse grid
    fine = resample_scipy(source, np.linalg.inv(m_true), tuple(2 * n for n in shape), fine_affine, background)
    moving = Image(fine.reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean(axis=(1, 3, 5)), affine)
    pick = np.random.default_rng(seed).choice(len(world), min(n_points, len(world)), replace=False)
    return moving, world[pick]


def residual(matrix, m_true, points) -> np.ndarray:
    return np.linalg.norm(transform_points(matrix, points) - transform_points(m_true, points), axis=1)


def anatomy_centre(image: Image, anatomy: np.ndarray) -> np.ndarray:
    return Grid.of(image).index_to_world(np.argwhere(anatomy).mean(0))


# ------------------------------------------------------------------------------------------------ real data
def shared_file(relative: str) -> str:
    from conftest import SHARED_DATA

    path = os.path.join(os.path.abspath(SHARED_DATA), relative)
    if not os.path.isfile(path):
        pytest.skip(f"../shared/data ({relative}) is not present")
    return os.path.dirname(os.path.dirname(path))


@pytest.fixture(scope="module")
def brain():
    return load_brain(shared_file(MNI))


@pytest.fixture(scope="module")
def chest():
    return load_chest(shared_file(POPI))


def load_brain(data: str):
    """MNI152 T1 at 3 mm (65 x 77 x 63), its brain mask (GM + WM probability > 0.5) and the 1 mm original."""
    native = read_image(os.path.join(data, MNI))
    native = Image(native.array.astype(np.float32), native.affine)
    t1 = block_mean(native, (3, 3, 3))
    gm = block_mean(read_image(os.path.join(data, MNI_GM)), (3, 3, 3)).array
    wm = block_mean(read_image(os.path.join(data, MNI_WM)), (3, 3, 3)).array
    return t1, (gm + wm) > 0.5, native


def load_chest(data: str):
    """POPI phase-00 CT: slices 10-129 averaged to 2 x 2 x 2 mm (the high-resolution source, 256 x 256 x 120) and to
    5.9 x 5.9 x 6 mm (the fixed image, 85 x 85 x 40), and the fixed image's body mask."""
    ct = read_image(os.path.join(data, POPI))
    crop = Image(ct.array[:, :, 10:130].astype(np.float32), ct.affine.copy())
    crop.affine[:3, 3] = ct.affine[:3, :3] @ np.array([0.0, 0.0, 10.0]) + ct.affine[:3, 3]
    source = block_mean(crop, (2, 2, 1))
    small = block_mean(source, (3, 3, 3))
    body = small.array > -500
    labels, _ = ndi.label(body)
    body = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    for k in range(body.shape[2]):
        body[:, :, k] = ndi.binary_fill_holes(body[:, :, k])
    return small, body, source


# ------------------------------------------------------------------------------------------------ accuracy
def test_recovers_rigid_plus_affine_misalignment_of_a_brain(brain):
    t1, mask, native = brain
    m_true = known_affine(anatomy_centre(t1, mask), (20.0, -15.0, 25.0), (25.0, -30.0, 20.0), (1.12, 0.9, 1.06))
    moving, points = moved_case(native, t1, mask, m_true, (2.6, 3.3, 3.0), (10.0, -5.0, 12.0), 0.0)
    before = residual(np.eye(4), m_true, points)
    assert before.mean() > 30.0  # a large misalignment to start from
    result = register_affine(t1, moving)  # the defaults: MI, rigid then affine, rotation search
    assert isinstance(result, AffineResult)
    err = residual(result.matrix, m_true, points)
    # measured: mean 0.19, max 0.33 mm (3 mm voxels)
    assert err.mean() < 0.5 and err.max() < 1.0, (err.mean(), err.max())
    assert list(result.stage_matrices) == ["init", "rigid", "affine"]
    # the rigid stage cannot model the scaling: it ends millimetres off, the affine stage removes that
    assert residual(result.stage_matrices["rigid"], m_true, points).mean() > 2.0
    stages = [h["stage"] for h in result.history]
    assert stages == sorted(stages, key=["rigid", "affine"].index) and {"rigid", "affine"} == set(stages)
    assert "starts" in result.history[0]  # the rotation search ran at the coarsest level of the first stage
    assert all(h["evaluations"] > 0 and h["seconds"] >= 0 for h in result.history)


def test_recovers_misalignment_of_a_ct_with_mutual_information(chest):
    """A CT at 5.9 x 5.9 x 6 mm against a moving CT at 5 x 6.5 x 7 mm (both block averages of the real CT): MI
    recovers the affine to a small fraction of a voxel. The bounds are a sixth and a third of the 5.9 mm voxel; a
    geometry slip of half a voxel would be 3 mm."""
    ct, body, source = chest
    m_true = known_affine(anatomy_centre(ct, body), (-12.0, 18.0, 10.0), (-20.0, 15.0, 30.0), (0.92, 1.1, 1.05))
    moving, points = moved_case(source, ct, body, m_true, (5.0, 6.5, 7.0), (-8.0, 6.0, 10.0), -1024.0)
    assert residual(np.eye(4), m_true, points).mean() > 30.0
    result = register_affine(ct, moving, similarity="mi", search_rotations=False)
    err = residual(result.matrix, m_true, points)
    # measured: mean 0.68, max 1.54 mm
    assert err.mean() < 1.0 and err.max() < 2.0, (err.mean(), err.max())


def test_mutual_information_aligns_different_contrasts(brain):
    """A T2-like moving image (CSF bright, white matter dark): MI works, signed LNCC cannot."""
    t1, mask, native = brain
    head = native.array > 0.05 * native.array.max()
    t2like = Image(np.where(head, 280.0 - native.array, 0.0).astype(np.float32), native.affine)
    m_true = known_affine(anatomy_centre(t1, mask), (10.0, 12.0, -15.0), (15.0, 20.0, -10.0), (1.05, 0.95, 1.0))
    moving, points = moved_case(t2like, t1, mask, m_true, (3.0, 3.0, 3.0), (0.0, 10.0, 0.0), 0.0)
    err = residual(register_affine(t1, moving, similarity="mi", search_rotations=False).matrix, m_true, points)
    # measured: mean 0.26, max 0.49 mm
    assert err.mean() < 0.5 and err.max() < 1.0, (err.mean(), err.max())


def test_inputs_are_left_unchanged(brain):
    t1, mask, _ = brain
    moving = Image(t1.array.copy(), t1.affine.copy())
    before = (t1.array.copy(), t1.affine.copy(), moving.array.copy())
    fmask = mask.copy()
    register_affine(t1, moving, fixed_mask=fmask, levels=(8.0,), iterations=2, search_rotations=False)
    np.testing.assert_array_equal(t1.array, before[0])
    np.testing.assert_array_equal(t1.affine, before[1])
    np.testing.assert_array_equal(moving.array, before[2])
    np.testing.assert_array_equal(fmask, mask)


def test_identity_stays_identity(brain):
    t1, mask, _ = brain
    points = Grid.of(t1).index_to_world(np.argwhere(mask)[::50].astype(np.float64))
    for similarity in ("lncc", "mi"):
        result = register_affine(t1, t1, similarity=similarity, init="identity", search_rotations=False)
        err = residual(result.matrix, np.eye(4), points)
        # measured: LNCC 0.000, MI 0.048 mm (its fixed image carries the blur of interpolating the moving image,
        # which the moving image lacks exactly on its own grid nodes). A bias of the method, a level grid offset of
        # a quarter voxel say, would show as 0.75 mm.
        assert err.max() < 0.1, (similarity, err.max())
        np.testing.assert_array_equal(result.stage_matrices["init"], np.eye(4))


def test_centre_of_mass_init_removes_a_pure_translation(brain):
    t1, mask, native = brain
    shift = np.array([22.0, -17.0, 12.0])
    m_true = known_affine(np.zeros(3), (0.0, 0.0, 0.0), shift)
    moving, points = moved_case(native, t1, t1.array > 0.05 * t1.array.max(), m_true, (2.5, 3.5, 3.2),
                                (5.0, 0.0, -5.0), 0.0)
    np.testing.assert_allclose(centre_of_mass(moving) - centre_of_mass(t1), shift, atol=1.0)
    result = register_affine(t1, moving, stages=("translation",), levels=(8.0,), iterations=1)
    init = result.stage_matrices["init"]
    np.testing.assert_array_equal(init[:3, :3], np.eye(3))
    # measured: 0.21 mm; the foregrounds differ only by resampling and the moving field of view, so the centres of
    # mass agree to a fraction of the 3 mm voxel
    assert residual(init, m_true, points).max() < 1.0
    # 'centre' matches the box centres instead: the moving box is another one, so it is centimetres off here
    centre = register_affine(t1, moving, stages=("translation",), levels=(8.0,), iterations=1, init="centre")
    assert residual(centre.stage_matrices["init"], m_true, points).mean() > 3.0  # measured: 14 mm


def test_masks_restrict_the_similarity(brain):
    """With a fixed mask on the brain and a moving mask, the result is as accurate; masks outside the overlap would
    leave nothing to compare."""
    t1, mask, native = brain
    m_true = known_affine(anatomy_centre(t1, mask), (8.0, -6.0, 10.0), (10.0, -5.0, 8.0), (1.05, 1.0, 0.96))
    moving, points = moved_case(native, t1, mask, m_true, (3.0, 3.0, 3.0), (0.0, 0.0, 10.0), 0.0)
    moving_mask = moving.array > 0.05 * t1.array.max()
    dilated = ndi.binary_dilation(mask, iterations=2)
    result = register_affine(t1, moving, fixed_mask=dilated, moving_mask=moving_mask, similarity="lncc",
                             search_rotations=False)
    err = residual(result.matrix, m_true, points)
    # measured: mean 0.09, max 0.16 mm
    assert err.mean() < 0.5 and err.max() < 1.0, (err.mean(), err.max())


def test_two_dimensional_images(brain):
    """A 2D axial slice moved by a 2D rotation, translation and scaling."""
    t1, _, _ = brain
    k = t1.shape[2] // 2
    aff2 = t1.affine.copy()
    aff2[:3, 3] = t1.affine[:3, :3] @ np.array([0.0, 0.0, k]) + t1.affine[:3, 3]
    slice_img = Image(t1.array[:, :, k], aff2)
    inside = slice_img.array > 0.2 * slice_img.array.max()
    g2 = Grid.of(slice_img)
    world = g2.index_to_world(np.argwhere(inside).astype(np.float64))
    c = world.mean(0)
    angle = np.deg2rad(18.0)
    a = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1.08, 0.94])
    m2 = np.eye(3)
    m2[:2, :2] = a
    m2[:2, 2] = c + np.array([12.0, -9.0]) - a @ c
    m_true = np.eye(4)
    m_true[np.ix_([0, 1, 3], [0, 1, 3])] = m2
    # moving grid: 2.5 mm, reversed first axis, covering the moved slice
    moved = world @ a.T + m2[:2, 2]
    lo, hi = moved.min(0) - 10, moved.max(0) + 10
    shape = tuple(int(v) for v in np.ceil((hi - lo) / 2.5) + 1)
    m_aff = np.eye(4)
    m_aff[0, 0], m_aff[1, 1] = -2.5, 2.5
    m_aff[:2, 3] = [hi[0], lo[1]]
    m_aff[2, 3] = aff2[2, 3]
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), 0).reshape(2, -1)
    yw = m_aff[:2, :2] @ idx + m_aff[:2, 3:4]
    inv = np.linalg.inv(m2)
    src = np.linalg.solve(g2.matrix, inv[:2, :2] @ yw + inv[:2, 2:3] - g2.offset[:, None])
    moving = Image(ndi.map_coordinates(slice_img.array.astype(float), src, order=1, cval=0.0).reshape(shape)
                   .astype(np.float32), m_aff)
    result = register_affine(slice_img, moving, similarity="lncc")
    assert result.matrix.shape == (4, 4)
    np.testing.assert_array_equal(result.matrix[2], [0, 0, 1, 0])
    err = np.linalg.norm(transform_points(result.matrix, world) - transform_points(m_true, world), axis=1)
    # measured: mean 0.06, max 0.14 mm (3 mm pixels)
    assert err.mean() < 0.5 and err.max() < 1.0, (err.mean(), err.max())


# ------------------------------------------------------------------------------------------------ warping
def test_warp_affine_matches_an_independent_resampling(brain):
    t1, _, _ = brain
    m = known_affine(np.array([0.0, -15.0, 10.0]), (7.0, -4.0, 9.0), (3.0, -2.0, 4.0), (1.05, 0.97, 1.0))
    grid = Grid.of(t1)
    ours = warp_affine(t1, grid, m, padding_mode="zeros")
    theirs = resample_scipy(t1, m, t1.shape, t1.affine, 0.0)
    # float32 interpolation weights against scipy's float64: a few rounding steps of the intensity range, more
    # where a float32 coordinate rounding (~1e-5 voxel) meets the steepest edge (~100 per voxel): 64 steps
    inside = warp_affine(Image(np.ones(t1.shape, np.float32), t1.affine), grid, m, padding_mode="zeros") > 0.999
    assert_f32_close(ours[inside], theirs[inside], ulps=64, scale=float(t1.array.max()), what="warp_affine")
    u = affine_displacement(m, grid)
    assert u.shape == (3, *t1.shape) and u.dtype == np.float32


# ------------------------------------------------------------------------------------------------ ITK files
def random_matrix(seed=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = rotation(rng.uniform(-30, 30, 3)) @ np.diag(rng.uniform(0.85, 1.15, 3)) + rng.uniform(-0.05, 0.05,
                                                                                                       (3, 3))
    m[:3, 3] = rng.uniform(-40, 40, 3)
    return m


def test_itk_file_round_trips_and_matches_an_independent_lps_computation(tmp_path):
    m = random_matrix()
    path = tmp_path / "affine.tfm"
    write_itk_affine(path, m)
    lines = path.read_text().splitlines()
    assert lines[0] == "#Insight Transform File V1.0"
    assert "Transform: AffineTransform_double_3_3" in lines
    values = {ln.split(":")[0]: [float(v) for v in ln.split(":")[1].split()] for ln in lines if ln.startswith(
        ("Parameters", "FixedParameters"))}
    a = np.array(values["Parameters"][:9]).reshape(3, 3)  # ITK: row-major matrix, then the translation
    t = np.array(values["Parameters"][9:])
    c = np.array(values["FixedParameters"])
    # ITK maps a fixed LPS point p to the moving LPS point A (p - c) + c + t; RAS = LPS with x and y negated
    x = np.random.default_rng(0).uniform(-150, 150, (20, 3))
    p = x * FLIP
    y_itk = ((p - c) @ a.T + c + t) * FLIP
    np.testing.assert_allclose(y_itk, transform_points(m, x), rtol=0, atol=1e-9)
    # the text holds float64 exactly (repr), so reading gives the same matrix to float64 rounding
    np.testing.assert_allclose(read_itk_affine(path), m, rtol=0, atol=1e-12)


def test_reading_itk_files_with_a_centre_and_matlab_files(tmp_path):
    m = random_matrix(5)
    params = matrix_to_itk_parameters(m)
    a, t = params[:9].reshape(3, 3), params[9:]
    centre = np.array([12.5, -30.0, 44.0])
    # the same transform written around a centre c: A (p - c) + c + t' = A p + t  <=>  t' = t + A c - c
    t_c = t + a @ centre - centre
    text = ("#Insight Transform File V1.0\n#Transform 0\nTransform: MatrixOffsetTransformBase_double_3_3\n"
            f"Parameters: {' '.join(repr(float(v)) for v in [*a.ravel(), *t_c])}\n"
            f"FixedParameters: {' '.join(repr(float(v)) for v in centre)}\n")
    (tmp_path / "centred.txt").write_text(text)
    np.testing.assert_allclose(read_itk_affine(tmp_path / "centred.txt"), m, rtol=0, atol=1e-9)
    # ITK's MATLAB v4 file (what ANTs writes as *GenericAffine.mat): type 0 = little-endian double, column vectors
    blob = b""
    for name, vec in (("AffineTransform_double_3_3", np.concatenate([a.ravel(), t_c])), ("fixed", centre)):
        raw = name.encode() + b"\0"
        blob += struct.pack("<5i", 0, len(vec), 1, 0, len(raw)) + raw + np.asarray(vec, "<f8").tobytes()
    (tmp_path / "ants.mat").write_bytes(blob)
    np.testing.assert_allclose(read_itk_affine(tmp_path / "ants.mat"), m, rtol=0, atol=1e-9)
    # 2D files
    m2 = np.eye(4)
    m2[np.ix_([0, 1, 3], [0, 1, 3])] = [[0.9, -0.2, 5.0], [0.3, 1.1, -7.0], [0, 0, 1]]
    write_itk_affine(tmp_path / "2d.tfm", m2, ndim=2)
    assert "Transform: AffineTransform_double_2_2" in (tmp_path / "2d.tfm").read_text()
    np.testing.assert_allclose(read_itk_affine(tmp_path / "2d.tfm"), m2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(itk_parameters_to_matrix(matrix_to_itk_parameters(m2, 2)), m2, rtol=0, atol=1e-12)


def test_itk_resampling_with_the_written_file_gives_our_warp(tmp_path, brain):
    """ITK's reading of the file is checked against an independent formula above; where SimpleITK is installed
    (the benchmark venv) its resampling through the file must also give warp_affine's image."""
    t1, _, _ = brain
    m = known_affine(np.array([0.0, -15.0, 10.0]), (12.0, -8.0, 15.0), (6.0, -4.0, 5.0), (1.05, 0.95, 1.0))
    path = write_itk_affine(tmp_path / "m.tfm", m)
    try:
        import SimpleITK as sitk
    except ImportError:
        sitk = None
    ours = warp_affine(t1, Grid.of(t1), m, padding_mode="zeros")
    if sitk is None:  # the same check with our own reading of ITK's rule, already verified above
        theirs = resample_scipy(t1, read_itk_affine(path), t1.shape, t1.affine, 0.0)
    else:
        img = sitk.GetImageFromArray(np.transpose(t1.array, (2, 1, 0)).astype(np.float32))
        lps = np.diag([-1.0, -1.0, 1.0]) @ t1.affine[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        img.SetSpacing(spacing.tolist())
        img.SetDirection((lps / spacing).ravel().tolist())
        img.SetOrigin((t1.affine[:3, 3] * FLIP).tolist())
        out = sitk.Resample(img, img, sitk.ReadTransform(str(path)), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        theirs = np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))
    inside = warp_affine(Image(np.ones(t1.shape, np.float32), t1.affine), Grid.of(t1), m, padding_mode="zeros") > 0.999
    assert_f32_close(ours[inside], theirs[inside], ulps=64, scale=float(t1.array.max()), what="ITK vs warp_affine")


# ------------------------------------------------------------------------------------------------ bad input
def small_image(shape=(12, 13, 14), seed=0) -> Image:
    rng = np.random.default_rng(seed)
    arr = ndi.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32)
    return Image(arr, np.diag([2.0, 2.0, 2.0, 1.0]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(similarity="ncc"), ValueError, "Unknown similarity 'ncc'"),
        (dict(stages=("rigid", "bspline")), ValueError, "Unknown stage 'bspline'"),
        (dict(stages="affine"), TypeError, "sequence of stage names"),
        (dict(stages=()), ValueError, "stages is empty"),
        (dict(stages=("affine", "affine")), ValueError, "repeats a stage"),
        (dict(init="moments"), ValueError, "Unknown init 'moments'"),
        (dict(iterations=0), ValueError, "zero at every level"),
        (dict(iterations=[10, 0, 0, 0]), None, None),  # zero at some levels is fine: those levels are skipped
        (dict(iterations=[10, 10]), ValueError, "2 entries but there are 4 levels"),
        (dict(iterations=2.5), TypeError, "whole numbers"),
        (dict(iterations=-1), ValueError, "must not be negative"),
        (dict(iterations={"rigid": 5}), ValueError, "missing \\['affine'\\]"),
        (dict(levels=(2.0, 4.0)), ValueError, "coarse to fine"),
        (dict(levels=(4.0, 0.0)), ValueError, "positive spacings"),
        (dict(levels=()), ValueError, "levels is empty"),
        (dict(lr=0.0), ValueError, "lr must be a positive number"),
        (dict(fixed_mask=np.zeros((12, 13, 14))), ValueError, "fixed mask is empty"),
        (dict(moving_mask=np.ones((3, 3, 3))), ValueError, "moving mask has shape"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, error, match):
    fixed, moving = small_image(), small_image(seed=1)
    if error is None:
        register_affine(fixed, moving, **kwargs)
        return
    with pytest.raises(error, match=match):
        register_affine(fixed, moving, **kwargs)


def test_bad_images_raise_clear_errors():
    good = small_image()
    nan = small_image()
    nan.array[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="fixed image .* 1 NaN or infinite voxels"):
        register_affine(nan, good)
    flat = Image(np.full((8, 8, 8), 7.0, np.float32), np.eye(4))
    with pytest.raises(ValueError, match="moving image .* is constant"):
        register_affine(good, flat)
    two_d = Image(np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32), np.eye(4))
    with pytest.raises(ValueError, match="fixed image is 3D .* moving image is 2D"):
        register_affine(good, two_d)
    with pytest.raises(TypeError, match="must be a monai_gradicon.io.Image"):
        register_affine(good.array, good)
    with pytest.raises(ValueError, match="CUDA is not available"):
        if torch.cuda.is_available():
            raise ValueError("CUDA is not available (skipped: this machine has CUDA)")
        register_affine(good, good, device="cuda")


def test_bad_transform_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="must be a \\(4, 4\\) world affine"):
        write_itk_affine(tmp_path / "x.tfm", np.eye(3))
    singular = np.eye(4)
    singular[2, 2] = 0.0
    with pytest.raises(ValueError, match="singular"):
        write_itk_affine(tmp_path / "x.tfm", singular)
    euler = ("#Insight Transform File V1.0\n#Transform 0\nTransform: Euler3DTransform_double_3_3\n"
             "Parameters: 0 0 0 0 0 0\nFixedParameters: 0 0 0 0\n")
    (tmp_path / "euler.tfm").write_text(euler)
    with pytest.raises(ValueError, match="Euler3DTransform_double_3_3.* is not an ITK affine"):
        read_itk_affine(tmp_path / "euler.tfm")
    write_itk_affine(tmp_path / "one.tfm", np.eye(4))
    two = (tmp_path / "one.tfm").read_text() + (tmp_path / "one.tfm").read_text().replace(
        "#Insight Transform File V1.0\n", "").replace("#Transform 0", "#Transform 1")
    (tmp_path / "two.tfm").write_text(two)
    with pytest.raises(ValueError, match="holds 2 transforms"):
        read_itk_affine(tmp_path / "two.tfm")
    (tmp_path / "junk.mat").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not an ITK text transform"):
        read_itk_affine(tmp_path / "junk.mat")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_itk_affine(tmp_path / "missing.tfm")
