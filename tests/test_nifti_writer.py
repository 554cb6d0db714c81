"""The block-streaming NIfTI writer against nibabel's own writer: the same bytes (uncompressed) or a gzip stream
that decompresses to them, for every layout the pipeline writes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

import monai_gradicon.io as mio
from monai_gradicon.io import _nifti_image, read_displacement_field, write_displacement_field, write_nifti

AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, 1.2, 0.1, -20.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1.0]])


def _nibabel_bytes(tmp_path, array, intent=None):
    img = _nifti_image(np.asarray(array), AFFINE, intent)
    img.to_filename(str(tmp_path / "nibabel.nii"))
    return (tmp_path / "nibabel.nii").read_bytes()


def _arrays():
    rng = np.random.default_rng(0)
    field = rng.normal(size=(3, 9, 8, 7)).astype(np.float32)
    return {
        "float32_3d": rng.normal(size=(9, 8, 7)).astype(np.float32),
        "int16_3d": rng.integers(-1000, 1000, (9, 8, 7)).astype(np.int16),
        "uint8_3d": rng.integers(0, 3, (9, 8, 7)).astype(np.uint8),
        "float64_2d": rng.normal(size=(9, 8)),
        "channels_last_view": np.moveaxis(field, 0, -1),  # a non-contiguous (X, Y, Z, 3) view, as the DDF
        "vector_5d_view": np.moveaxis(field, 0, -1)[:, :, :, None, :],
        "fortran_order": np.asfortranarray(rng.normal(size=(9, 8, 7)).astype(np.float32)),
    }


@pytest.mark.parametrize("name", list(_arrays()))
@pytest.mark.parametrize("block_bytes", [64, 1 << 22])  # many blocks (one plane each) and one block
def test_same_bytes_as_nibabel(tmp_path, monkeypatch, name, block_bytes):
    array = _arrays()[name]
    monkeypatch.setattr(mio, "NIFTI_BLOCK_BYTES", block_bytes)
    expected = _nibabel_bytes(tmp_path, array)
    write_nifti(tmp_path / "ours.nii", array, AFFINE)
    assert (tmp_path / "ours.nii").read_bytes() == expected
    write_nifti(tmp_path / "ours.nii.gz", array, AFFINE, workers=2)
    assert gzip.decompress((tmp_path / "ours.nii.gz").read_bytes()) == expected
    back = nib.load(str(tmp_path / "ours.nii.gz"))
    np.testing.assert_array_equal(np.asarray(back.dataobj), array)
    np.testing.assert_array_equal(back.affine, nib.load(str(tmp_path / "nibabel.nii")).affine)  # sform: float32


@pytest.mark.parametrize("block_bytes", [64, 1 << 22])
def test_displacement_field_is_lps_without_a_copy(tmp_path, monkeypatch, block_bytes):
    """The writer negates x and y on the fly: the file equals nibabel writing the explicitly negated field."""
    monkeypatch.setattr(mio, "NIFTI_BLOCK_BYTES", block_bytes)
    u = np.random.default_rng(1).normal(size=(3, 9, 8, 7)).astype(np.float32)
    lps = u * np.array([-1, -1, 1], np.float32).reshape(3, 1, 1, 1)
    expected = _nibabel_bytes(tmp_path, np.moveaxis(lps, 0, -1)[:, :, :, None, :], intent=mio.NIFTI_INTENT_VECTOR)
    write_displacement_field(tmp_path / "u.nii.gz", u, AFFINE)
    assert gzip.decompress((tmp_path / "u.nii.gz").read_bytes()) == expected
    back, affine = read_displacement_field(tmp_path / "u.nii.gz")
    np.testing.assert_array_equal(back, u)
    u2 = u[:2, :, :, 0]  # 2D
    write_displacement_field(tmp_path / "u2.nii", u2, AFFINE)
    np.testing.assert_array_equal(read_displacement_field(tmp_path / "u2.nii")[0], u2)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mio, "_write_nifti_stream", broken)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(tmp_path / "x.nii.gz", np.zeros((4, 4, 4), np.float32), AFFINE)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="negate_last"):
        write_nifti(tmp_path / "y.nii", np.zeros((4, 4, 4), np.float32), AFFINE, negate_last=(0,))
