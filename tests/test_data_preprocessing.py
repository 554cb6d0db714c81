"""The intensity preprocessing registry (one per name, used by every door), its functions and its MONAI transform."""

from __future__ import annotations

import monai.transforms as mt
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tolerance import assert_f32_close
from monai_gradicon.data.transforms import IntensityPreprocessd
from monai_gradicon.data import (
    PREPROCESSING,
    brain_max_normalize,
    kth_quantile,
    lung_ct_normalize,
    preprocess,
    unigradicon_ct_normalize,
    unigradicon_mr_normalize,
)

HU = np.array([[-2000.0, -1000.0, -750.0, -250.0, 0.0, 500.0]], dtype=np.float32)


def test_lung_ct_normalize_hand_computed():
    np.testing.assert_allclose(lung_ct_normalize(HU), [[0, 0, 0.25, 0.75, 1, 1]])
    mask = np.array([[1, 0, 1, 0.5, -1, 3]])  # > 0 counts as lung, values are binarised
    np.testing.assert_allclose(preprocess(HU, "lung_ct", mask), [[0, 0, 0.25, 0.75, 0, 1]])
    with pytest.raises(ValueError, match="mask shape"):
        preprocess(HU, "lung_ct", np.ones((1, 5)))
    with pytest.raises(ValueError, match="Unknown preprocessing 'ct'"):
        preprocess(HU, "ct")


def test_type_and_metadata_are_preserved():
    out = lung_ct_normalize(HU.astype(np.int16))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    tensor = torch.from_numpy(HU).double()
    out_t = unigradicon_ct_normalize(tensor)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    meta = MetaTensor(torch.from_numpy(HU), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out_m = preprocess(meta, "lung_ct", MetaTensor(torch.ones_like(meta)))
    assert isinstance(out_m, MetaTensor)
    torch.testing.assert_close(out_m.affine, meta.affine)
    with pytest.raises(TypeError):
        lung_ct_normalize([1.0, 2.0])


def test_unigradicon_ct_normalize_hand_computed():
    image = np.array([[-1500.0, -1000.0, 0.0, 500.0, 1000.0, 1200.0]])
    np.testing.assert_allclose(unigradicon_ct_normalize(image), [[0, 0, 0.5, 0.75, 1, 1]])
    np.testing.assert_allclose(unigradicon_ct_normalize(image, -1000, 0), [[0, 0, 1, 1, 1, 1]])
    with pytest.raises(ValueError):
        unigradicon_ct_normalize(image, 10, 10)


def test_unigradicon_mr_normalize_uses_reference_kthvalue():
    rng = np.random.default_rng(0)
    values = rng.permutation(np.arange(1.0, 201.0)).reshape(1, 4, 5, 10)  # 1..200, n = 200
    # reference: torch.kthvalue(x.flatten(), int(0.99 * 200) = 198) -> 198th smallest = 198
    assert kth_quantile(values, 0.99) == 198.0
    assert torch.kthvalue(torch.from_numpy(values).flatten(), 198).values.item() == 198.0
    out = unigradicon_mr_normalize(values)
    assert_f32_close(out, np.clip((values - 1.0) / 197.0, 0, 1))
    assert out.min() == 0.0 and out.max() == 1.0 and np.sum(out == 1.0) == 3  # 198, 199, 200
    # n = 50: int(49.5) = 49 -> 49th smallest of 0..49 is 48
    assert kth_quantile(np.arange(50.0), 0.99) == 48.0
    np.testing.assert_array_equal(unigradicon_mr_normalize(np.full((2, 3), 7.0)), np.zeros((2, 3)))


def test_brain_max_normalize_hand_computed():
    np.testing.assert_allclose(brain_max_normalize(np.array([0.0, 2.0, 4.0])), [0.0, 0.45, 0.9])
    np.testing.assert_allclose(brain_max_normalize(np.array([1.0, 5.0]), target_max=1.0), [0.2, 1.0])
    with pytest.raises(ValueError, match="positive"):
        brain_max_normalize(np.zeros(3))


def test_registry_names_and_dictionary_transform():
    assert set(PREPROCESSING) == {"lung_ct", "unigradicon_ct", "unigradicon_mri", "brain", "none"}
    data = {
        "fixed_image": HU.copy(),
        "moving_image": HU.copy() + 250,
        "fixed_label": np.array([[1, 1, 1, 1, 0, 1]]),
        "moving_label": np.ones((1, 6)),
        "other": "kept",
    }
    t = IntensityPreprocessd(["fixed_image", "moving_image"], "lung_ct", mask_keys=["fixed_label", "moving_label"])
    out = t(data)
    np.testing.assert_allclose(out["fixed_image"], [[0, 0, 0.25, 0.75, 0, 1]])
    np.testing.assert_allclose(out["moving_image"], [[0, 0.25, 0.5, 1, 1, 1]])
    assert out["other"] == "kept" and data["fixed_image"][0, 2] == -750.0  # input dict is not modified
    with pytest.raises(ValueError, match="mask_keys"):
        IntensityPreprocessd(["fixed_image", "moving_image"], "lung_ct", mask_keys=["fixed_label"])
    with pytest.raises(ValueError, match="Unknown preprocessing"):
        IntensityPreprocessd(["fixed_image"], "hu")
    with pytest.raises(ValueError, match="use_masks"):
        IntensityPreprocessd(["fixed_image"], "lung_ct", use_masks="maybe")
    # the string a `monai.bundle run ... --use_masks false` override passes means False, not a truthy string
    assert IntensityPreprocessd(["fixed_image"], "lung_ct", use_masks="false").use_masks is False
    # an absent mask leaves the image unmasked (masks are optional per pair); use_masks=False ignores them
    absent = IntensityPreprocessd(["fixed_image"], "lung_ct", mask_keys=["absent"])(data)
    np.testing.assert_allclose(absent["fixed_image"], [[0, 0, 0.25, 0.75, 1, 1]])
    off = IntensityPreprocessd(["fixed_image"], "lung_ct", mask_keys=["fixed_label"], use_masks=False)(data)
    np.testing.assert_allclose(off["fixed_image"], [[0, 0, 0.25, 0.75, 1, 1]])

    ct = IntensityPreprocessd("fixed_image", "unigradicon_ct")(data)["fixed_image"]
    np.testing.assert_allclose(ct, [[0, 0, 0.125, 0.375, 0.5, 0.75]])
    mr = {"image": np.arange(1.0, 201.0).reshape(1, 200)}
    assert_f32_close(IntensityPreprocessd("image", "unigradicon_mri")(mr)["image"][0, 99], 99.0 / 197.0)
    assert_f32_close(IntensityPreprocessd("image", "brain")(mr)["image"][0, -1], 0.9)
    assert_f32_close(IntensityPreprocessd("image", "none")(mr)["image"], mr["image"])


def test_transform_names_do_not_shadow_monai_and_subclass_maptransform():
    assert not hasattr(mt, IntensityPreprocessd.__name__)
    assert issubclass(IntensityPreprocessd, mt.MapTransform)


def test_in_a_monai_loading_pipeline(tmp_path):
    affine = np.diag([2.5, 2.5, 2.5, 1.0])
    image = np.linspace(-1200, 200, 4 * 5 * 6).reshape(4, 5, 6).astype(np.int16)
    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    mask[1:3, 1:4, 1:5] = 1
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "mask.nii.gz"))
    pipeline = mt.Compose(
        [
            mt.LoadImaged(["image", "mask"], image_only=True),
            mt.EnsureChannelFirstd(["image", "mask"]),
            IntensityPreprocessd("image", "lung_ct", mask_keys="mask"),
        ]
    )
    out = pipeline({"image": str(tmp_path / "ct.nii.gz"), "mask": str(tmp_path / "mask.nii.gz")})["image"]
    assert out.shape == (1, 4, 5, 6)
    expected = np.clip((image.astype(np.float32) + 1000) / 1000, 0, 1) * mask
    assert_f32_close(np.asarray(out[0]), expected)


def test_the_command_line_does_not_import_monai_transforms():
    """The registry and the command line import without MONAI (its import costs ~5 s per command on 2 CPU cores);
    the bundles' transform is in monai_gradicon.data.transforms."""
    import subprocess
    import sys

    code = ("import sys, monai_gradicon.cli, monai_gradicon.pipeline, monai_gradicon.data; "
            "print(sorted(m for m in sys.modules if m == 'monai' or m.startswith('monai.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
