"""Tests for the synthetic lung and brain phantoms and the demo dataset writers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_gradicon.data import (
    BRAIN_LABELS,
    load_datalist,
    make_brain_phantom,
    make_lung_phantom_pair,
    read_landmarks,
    voxel_to_world,
    world_to_voxel,
    write_brain_demo_dataset,
    write_lung_demo_dataset,
)
from monai_gradicon.data.phantom_lung import HU_AIR, HU_LUNG, HU_RIB, HU_SOFT_TISSUE, HU_VESSEL, LUNG_TEXTURE_MAX_HU

SHAPE = (48, 48, 48)


@pytest.fixture(scope="module")
def clean_pair():
    """Noise-free pair, so intensities can be compared exactly with the analytic model."""
    return make_lung_phantom_pair(SHAPE, seed=3, noise_std_hu=0.0)


def _trilinear(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Sample a [X, Y, Z] volume at (N, 3) voxel positions (edge-clamped trilinear interpolation)."""
    upper = np.array(volume.shape) - 1
    p = np.clip(points, 0, upper)
    lo = np.minimum(np.floor(p).astype(int), upper - 1)
    f = p - lo
    out = np.zeros(len(p))
    for corner in np.ndindex(2, 2, 2):
        c = np.array(corner)
        weight = np.prod(np.where(c == 1, f, 1 - f), axis=1)
        idx = lo + c
        out += weight * volume[idx[:, 0], idx[:, 1], idx[:, 2]]
    return out


def test_lung_pair_shapes_and_types(clean_pair):
    p = clean_pair
    for volume in (p.inspiration, p.expiration):
        assert volume.shape == (1,) + SHAPE and volume.dtype == np.float32
    for mask in (p.inspiration_mask, p.expiration_mask):
        assert mask.shape == (1,) + SHAPE and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert p.inspiration_landmarks.shape == (80, 3) and p.expiration_landmarks.shape == (80, 3)
    np.testing.assert_allclose(np.diag(p.affine)[:3], p.spacing_mm)
    np.testing.assert_allclose(p.spacing_mm, (2.5, 2.5, 2.5))


def test_expiration_landmarks_map_to_inspiration_through_known_motion(clean_pair):
    p = clean_pair
    mapped = p.motion.expiration_to_inspiration(p.expiration_landmarks)
    np.testing.assert_allclose(mapped, p.inspiration_landmarks, atol=1e-6)
    disp = p.inspiration_landmarks - p.expiration_landmarks
    assert np.abs(disp).max() > 1.0, "the breathing motion should move landmarks by more than a voxel"
    np.testing.assert_allclose(disp[:, 0], 0.0, atol=1e-12)  # no left-right motion
    assert disp[:, 2].mean() < 0 and disp[:, 1].mean() > 0  # inspiration: lower (inferior) and more anterior
    # the world-coordinate views use the image affine
    np.testing.assert_allclose(world_to_voxel(p.inspiration_landmarks_mm, p.affine), p.inspiration_landmarks, atol=1e-9)


def test_landmarks_lie_inside_the_lungs_in_both_phases(clean_pair):
    p = clean_pair
    phases = ((p.inspiration_landmarks, p.inspiration_mask[0]), (p.expiration_landmarks, p.expiration_mask[0]))
    for landmarks, mask in phases:
        idx = np.rint(landmarks).astype(int)
        assert np.all(mask[idx[:, 0], idx[:, 1], idx[:, 2]] == 1)
    # landmarks sit on bright vessels/nodules, i.e. on texture that can be registered
    values = _trilinear(p.inspiration[0].astype(np.float64), p.inspiration_landmarks)
    assert np.median(values) > HU_LUNG + 200


def test_expiration_image_is_inspiration_warped_by_the_motion(clean_pair):
    p = clean_pair
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    lungs = p.expiration_mask[0].reshape(-1) == 1
    pts = grid[lungs]
    expiration = p.expiration[0].reshape(-1)[lungs].astype(np.float64)
    inspiration = p.inspiration[0].astype(np.float64)
    warped_error = np.abs(_trilinear(inspiration, p.motion.expiration_to_inspiration(pts)) - expiration).mean()
    unwarped_error = np.abs(_trilinear(inspiration, pts) - expiration).mean()
    assert warped_error < 0.3 * unwarped_error, (warped_error, unwarped_error)
    # masks agree through the motion (nearest-neighbour lookup)
    mapped = np.rint(p.motion.expiration_to_inspiration(grid)).astype(int)
    mapped = np.clip(mapped, 0, np.array(SHAPE) - 1)
    insp_at_mapped = p.inspiration_mask[0][mapped[:, 0], mapped[:, 1], mapped[:, 2]]
    assert np.mean(insp_at_mapped == p.expiration_mask[0].reshape(-1)) > 0.99


def test_motion_inverse_is_consistent(clean_pair):
    motion = clean_pair.motion
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, SHAPE[0] - 1, (200, 3))
    np.testing.assert_allclose(motion.expiration_to_inspiration(motion.inspiration_to_expiration(pts)), pts, atol=1e-7)
    assert motion.min_jacobian_determinant(SHAPE) > 0.5


def test_expiration_lungs_are_smaller_and_higher(clean_pair):
    p = clean_pair
    insp, exp = p.inspiration_mask[0], p.expiration_mask[0]
    assert exp.sum() < 0.95 * insp.sum()
    z = np.arange(SHAPE[2])
    centroid = lambda m: (m.sum(axis=(0, 1)) * z).sum() / m.sum()  # noqa: E731
    assert centroid(exp) > centroid(insp)


def test_lung_phantom_hu_ranges(clean_pair):
    p = clean_pair
    for image, mask in ((p.inspiration[0], p.inspiration_mask[0]), (p.expiration[0], p.expiration_mask[0])):
        assert image.min() >= HU_AIR - 1e-3 and image.max() <= HU_RIB + 1e-3
        assert image[0, 0, 0] == pytest.approx(HU_AIR, abs=1e-3)  # corner: air outside the body
        lung = image[mask == 1]
        assert lung.min() >= HU_LUNG - LUNG_TEXTURE_MAX_HU - 1e-3 and lung.max() <= HU_VESSEL + 1e-3
        assert -900 <= np.median(lung) <= -800
        assert image.max() > 500  # ribs / vertebrae
    # mediastinum between the lungs, anterior to the spine: soft tissue
    x, y, z = SHAPE[0] // 2, int(0.6 * SHAPE[1]), SHAPE[2] // 2
    assert p.inspiration[0, x, y, z] == pytest.approx(HU_SOFT_TISSUE, abs=1.0)


def test_lung_phantom_noise_and_determinism():
    a = make_lung_phantom_pair((32, 32, 32), seed=5)
    b = make_lung_phantom_pair((32, 32, 32), seed=5)
    c = make_lung_phantom_pair((32, 32, 32), seed=6)
    for name in ("inspiration", "expiration", "inspiration_mask", "expiration_mask", "inspiration_landmarks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.inspiration, c.inspiration)
    air = a.inspiration[0, :3, :3, :]
    assert 5.0 < air.std() < 15.0  # default noise_std_hu = 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (16, 64, 64)},
        {"shape": (64, 64)},
        {"breathing_amplitude_mm": -1.0},
        {"breathing_amplitude_mm": 300.0},
        {"spacing_mm": 0.0},
        {"n_landmarks": 0},
        {"n_landmarks": 100000},
    ],
)
def test_lung_phantom_rejects_bad_arguments(kwargs):
    args = {"shape": (32, 32, 32)} | kwargs
    with pytest.raises(ValueError):
        make_lung_phantom_pair(**args)


def test_brain_phantom_labels_intensities_and_variability():
    a = make_brain_phantom((40, 44, 40), seed=1)
    b = make_brain_phantom((40, 44, 40), seed=2)
    again = make_brain_phantom((40, 44, 40), seed=1)
    np.testing.assert_array_equal(a.image, again.image)
    np.testing.assert_array_equal(a.label, again.label)
    assert a.image.shape == (1, 40, 44, 40) and a.label.dtype == np.uint8
    assert set(np.unique(a.label)) == set(BRAIN_LABELS)
    image, label = a.image[0], a.label[0]
    means = {k: image[label == k].mean() for k in BRAIN_LABELS}
    assert means[3] > means[4] > means[2] > means[1] > means[0]  # WM > deep GM > cortex > CSF > background
    assert image.min() >= 0
    # different subjects: same anatomy, smoothly deformed
    wm_a, wm_b = label == 3, b.label[0] == 3
    dice = 2 * (wm_a & wm_b).sum() / (wm_a.sum() + wm_b.sum())
    assert 0.6 < dice < 0.99
    with pytest.raises(ValueError):
        make_brain_phantom((8, 8, 8))


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_write_lung_demo_dataset(tmp_path, monkeypatch):
    out = tmp_path / "lung"
    datalist_path = write_lung_demo_dataset(out, n_pairs=2, shape=(32, 32, 32), seed=0, n_landmarks=20)
    training = load_datalist(datalist_path, "training")
    validation = load_datalist(out, "validation")
    assert len(training) == 1 and len(validation) == 1
    entry = training[0]
    assert set(entry) == {f"{role}_{kind}" for role in ("fixed", "moving") for kind in ("image", "label", "landmarks")}

    fixed = nib.load(entry["fixed_image"])
    assert fixed.shape == (32, 32, 32) and fixed.get_data_dtype() == np.int16
    np.testing.assert_allclose(fixed.header.get_zooms(), (2.5, 2.5, 2.5))
    assert nib.load(entry["moving_label"]).get_data_dtype() == np.uint8
    # landmark CSVs are world mm: mapped through each image's affine they fall inside its lung mask
    for role in ("fixed", "moving"):
        mask_image = nib.load(entry[f"{role}_label"])
        points = read_landmarks(entry[f"{role}_landmarks"])
        assert points.shape == (20, 3)
        idx = np.rint(world_to_voxel(points, mask_image.affine)).astype(int)
        assert np.all(np.asarray(mask_image.dataobj)[idx[:, 0], idx[:, 1], idx[:, 2]] == 1)
    image = np.asarray(fixed.dataobj)
    assert image.min() >= -1100 and image.max() <= 800

    # idempotent: a complete dataset is not regenerated
    before = _digests(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("the dataset should not be regenerated")

    monkeypatch.setattr("monai_gradicon.data.phantom.make_lung_phantom_pair", fail)
    assert write_lung_demo_dataset(out, n_pairs=2, shape=(32, 32, 32), seed=0, n_landmarks=20) == datalist_path
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    monkeypatch.undo()

    # a damaged dataset of ours is repaired to the same bytes
    Path(entry["moving_image"]).unlink()
    write_lung_demo_dataset(out, n_pairs=2, shape=(32, 32, 32), seed=0, n_landmarks=20)
    assert _digests(out) == before

    # deterministic: another folder gets byte-identical files
    other = tmp_path / "lung_again"
    write_lung_demo_dataset(other, n_pairs=2, shape=(32, 32, 32), seed=0, n_landmarks=20)
    assert _digests(other) == before

    # other parameters in the same folder are refused
    with pytest.raises(FileExistsError):
        write_lung_demo_dataset(out, n_pairs=2, shape=(32, 32, 32), seed=1, n_landmarks=20)


def test_demo_writers_never_touch_unrelated_files(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_brain_demo_dataset(foreign, n_subjects=2, shape=(20, 20, 20), n_validation=1)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1

    out = tmp_path / "brain"
    write_brain_demo_dataset(out, n_subjects=2, shape=(20, 20, 20), n_validation=1)
    (out / "extra.nii.gz").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="extra.nii.gz"):
        write_brain_demo_dataset(out, n_subjects=2, shape=(20, 20, 20), n_validation=1)
    assert (out / "extra.nii.gz").read_bytes() == b"not ours"

    with pytest.raises(ValueError):
        write_brain_demo_dataset(tmp_path / "bad", n_subjects=2, n_validation=2)


def test_write_brain_demo_dataset(tmp_path):
    path_a = write_brain_demo_dataset(tmp_path / "a", n_subjects=3, shape=(24, 26, 24), seed=4, n_validation=1)
    path_b = write_brain_demo_dataset(tmp_path / "b", n_subjects=3, shape=(24, 26, 24), seed=4, n_validation=1)
    assert _digests(path_a.parent) == _digests(path_b.parent)
    training, validation = load_datalist(path_a, "training"), load_datalist(path_a, "validation")
    assert len(training) == 2 and len(validation) == 1
    assert set(training[0]) == {"image", "label"}
    label = nib.load(training[0]["label"])
    assert label.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(label.dataobj))) <= set(BRAIN_LABELS)
    np.testing.assert_allclose(label.header.get_zooms(), (2.0, 2.0, 2.0))
    origin = voxel_to_world(np.zeros((1, 3)), label.affine)[0]
    np.testing.assert_allclose(origin, -0.5 * 2.0 * (np.array([24, 26, 24]) - 1))  # volume centred at 0 mm
    image = np.asarray(nib.load(training[0]["image"]).dataobj)
    assert image.shape == (24, 26, 24) and image.max() > 500
    # two subjects differ
    other = np.asarray(nib.load(training[1]["image"]).dataobj)
    assert not np.array_equal(image, other)
