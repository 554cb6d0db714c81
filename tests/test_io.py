"""Image reading and writing: NIfTI, NRRD (built-in reader), displacement fields, clear errors."""

import gzip
import os
import stat

import nibabel as nib
import numpy as np
import pytest

from monai_gradicon.io import (
    NIFTI_INTENT_VECTOR,
    Image,
    ImageReadError,
    as_image,
    read_displacement_field,
    read_image,
    read_nrrd,
    write_displacement_field,
    write_nifti,
)


def _nrrd_bytes(array: np.ndarray, directions, origin, space="left-posterior-superior", encoding="gzip", dtype="short"):
    header = [
        "NRRD0004",
        f"type: {dtype}",
        f"dimension: {array.ndim}",
        f"space: {space}",
        "sizes: " + " ".join(str(s) for s in array.shape),
        "space directions: " + " ".join("(" + ",".join(repr(float(v)) for v in d) + ")" for d in directions),
        "kinds: " + " ".join(["domain"] * array.ndim),
        "endian: little",
        f"encoding: {encoding}",
        "space origin: (" + ",".join(repr(float(v)) for v in origin) + ")",
    ]
    raw = np.asfortranarray(array).tobytes(order="F")
    payload = gzip.compress(raw) if encoding == "gzip" else raw
    return ("\n".join(header) + "\n\n").encode() + payload


@pytest.mark.parametrize("encoding", ["gzip", "raw"])
def test_nrrd_lps_geometry_becomes_ras(tmp_path, encoding):
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, size=(5, 6, 4)).astype(np.int16)
    directions = [(0.5, 0.0, 0.0), (0.0, 0.7, 0.1), (0.0, 0.0, 2.0)]
    origin = (-10.0, 20.0, 30.0)
    path = tmp_path / "img.nrrd"
    path.write_bytes(_nrrd_bytes(arr, directions, origin, encoding=encoding))
    img = read_image(path)
    assert img.array.dtype == np.int16
    np.testing.assert_array_equal(img.array, arr)
    # voxel (i, j, k) -> LPS = origin + sum index * direction; RAS = (-x, -y, z)
    idx = np.array([2.0, 3.0, 1.0])
    lps = np.array(origin) + idx @ np.array(directions)
    ras = img.affine[:3, :3] @ idx + img.affine[:3, 3]
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-12)
    assert img.spacing == pytest.approx((0.5, np.hypot(0.7, 0.1), 2.0))


def test_nrrd_ras_space_and_errors(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "ras.nrrd"
    path.write_bytes(_nrrd_bytes(arr, [(1, 0, 0), (0, 1, 0), (0, 0, 1)], (1, 2, 3), space="RAS", dtype="float"))
    a, aff = read_nrrd(path)
    np.testing.assert_array_equal(a, arr)
    np.testing.assert_allclose(aff[:3, 3], [1, 2, 3])
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: gzip\n\nnot gzip data")
    with pytest.raises(ImageReadError, match="bad.nrrd"):
        read_image(bad, "fixed image")
    truncated = tmp_path / "short.nrrd"
    eye = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    truncated.write_bytes(_nrrd_bytes(arr, eye, (0, 0, 0), dtype="float", encoding="raw")[:-8])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(truncated)


def test_real_nrrd_matches_header(shared_data):
    img = read_image(os.path.join(shared_data, "lung_ct_pyradiomics", "lung1_image.nrrd"))
    assert img.shape == (512, 512, 48) and img.array.dtype == np.int16
    # header: LPS, directions diag(0.5703125, 0.5703125, 5), origin (-146, -325, -777.5)
    np.testing.assert_allclose(np.diag(img.affine)[:3], [-0.5703125, -0.5703125, 5.0])
    np.testing.assert_allclose(img.affine[:3, 3], [146.0, 325.0, -777.5], atol=1e-9)
    assert img.array.min() == -1024 and img.array.max() == 3071


def test_nifti_round_trip_and_permissions(tmp_path):
    arr = np.random.default_rng(1).normal(size=(7, 8, 9)).astype(np.float32)
    aff = np.array([[-1.5, 0.1, 0, 10], [0, 1.2, 0, -3], [0, 0, 2.5, 7], [0, 0, 0, 1]], dtype=float)
    path = write_nifti(tmp_path / "x.nii.gz", arr, aff)
    img = read_image(path)
    np.testing.assert_array_equal(img.array, arr)
    np.testing.assert_allclose(img.affine, aff, atol=1e-6)
    hdr = nib.load(path).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode & 0o044 == 0o044  # readable by others, not the 0600 of a temporary file
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]  # no temporary file left behind


def test_squeeze_2d_and_reject_multichannel(tmp_path):
    write_nifti(tmp_path / "slice.nii.gz", np.random.rand(10, 12, 1).astype(np.float32), np.eye(4))
    assert read_image(tmp_path / "slice.nii.gz").ndim == 2
    nib.save(nib.Nifti1Image(np.random.rand(6, 6, 6, 2).astype(np.float32), np.eye(4)), tmp_path / "two.nii.gz")
    with pytest.raises(ImageReadError, match="multi-channel"):
        read_image(tmp_path / "two.nii.gz", "moving image")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="fixed image file does not exist"):
        read_image(tmp_path / "nope.nii.gz", "fixed image")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="Cannot read the moving image .*garbage.nii.gz"):
        read_image(garbage, "moving image")
    with pytest.raises(FileNotFoundError, match="not a file"):
        read_image(tmp_path, "fixed image")


def test_displacement_field_on_disk_convention(tmp_path):
    u = np.random.default_rng(2).normal(size=(3, 4, 5, 6)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    path = write_displacement_field(tmp_path / "d.nii.gz", u, aff)
    img = nib.load(path)
    assert img.shape == (4, 5, 6, 1, 3)
    assert img.header.get_intent()[0] == "vector" and int(img.header["intent_code"]) == NIFTI_INTENT_VECTOR
    data = np.asarray(img.dataobj)
    np.testing.assert_array_equal(data[..., 0, 0], -u[0])  # LPS: x and y negated, z kept
    np.testing.assert_array_equal(data[..., 0, 1], -u[1])
    np.testing.assert_array_equal(data[..., 0, 2], u[2])
    back, aff2 = read_displacement_field(path)
    np.testing.assert_array_equal(back, u)
    np.testing.assert_allclose(aff2, aff)


def test_as_image_from_metatensor():
    from monai.data import MetaTensor

    arr = np.random.rand(1, 5, 6, 7).astype(np.float32)
    aff = np.diag([1.0, 2.0, 3.0, 1.0])
    img = as_image(MetaTensor(arr, affine=aff), "fixed image")
    assert img.shape == (5, 6, 7)
    np.testing.assert_allclose(img.affine, aff)
    with pytest.raises(TypeError, match="fixed image"):
        as_image(arr, "fixed image")
    with pytest.raises(ValueError, match="not finite and invertible"):
        Image(arr[0], np.zeros((4, 4)))
