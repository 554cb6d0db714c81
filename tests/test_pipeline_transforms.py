"""The pipeline's MONAI dictionary transforms (the bundles' inference and evaluation): geometry on the original
grids, the MONAI Warp convention of the voxel DDF, the file contents, and the axis-order transform of training."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.blocks import Warp

from monai_gradicon.io import read_displacement_field
from monai_gradicon.networks.registration import GradICONDDFNet, gradicon_network
from monai_gradicon.pipeline.transforms import (
    OriginalGridOutputsd,
    PrepareNetworkInputd,
    SaveRegistrationd,
    ToNetworkAxesd,
)
from tolerance import assert_f32_close

NET = (17, 18, 19)  # network shape, reference axis order
SLIM = {"down_channels": (8, 16, 16, 32, 32), "up_channels": (8, 16, 16, 16, 16)}


def _affine(spacing=(1.5, 1.2, 2.0), origin=(-10.0, 5.0, 3.0)):
    a = torch.eye(4, dtype=torch.float64)
    a[:3, :3] = torch.diag(torch.tensor(spacing, dtype=torch.float64))
    a[:3, 3] = torch.tensor(origin, dtype=torch.float64)
    return a


def _image(array, affine, name):
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None], affine=affine,
                      meta={"filename_or_obj": f"/data/{name}.nii.gz"})


def _ddf_net():
    return GradICONDDFNet(gradicon_network(1, 3, NET, preprocessing="none", **SLIM)).eval()


def _pair(shape=(12, 10, 14)):
    rng = np.random.default_rng(0)
    affine = _affine()
    return {"fixed_image": _image(rng.random(shape), affine, "fixed"),
            "moving_image": _image(rng.random(shape), affine, "moving")}


def test_prepare_gives_the_ddf_net_input_in_file_order():
    net = _ddf_net()
    out = PrepareNetworkInputd(net, mask_keys=None, use_masks=False)(_pair())
    assert tuple(out["image"].shape) == (2, *NET[::-1])  # file order: the card's shape reversed
    assert tuple(net(out["image"][None]).shape) == (1, 3, *NET[::-1])


def test_identity_and_a_one_voxel_shift_on_the_original_grid():
    net = _ddf_net()
    data = PrepareNetworkInputd(net, mask_keys=None, use_masks=False)(_pair())
    data["pred"] = torch.zeros(3, *NET[::-1])
    out = OriginalGridOutputsd(net, mask_keys=None, use_masks=False)(data)
    fields = out["registration"]["fields"]
    assert_f32_close(fields.displacement, np.zeros_like(fields.displacement), ulps=8, scale=30.0)
    assert_f32_close(out["warped"][0], data["moving_image"][0], ulps=8)
    # one network voxel along file axis 0 (network size 19 for an original size 12) -> 12/19 voxels of 1.5 mm
    data["pred"][0] = 1.0
    fields = OriginalGridOutputsd(net, mask_keys=None, use_masks=False)(data)["registration"]["fields"]
    assert_f32_close(fields.ddf[0], np.full((12, 10, 14), 12 / 19), ulps=8, scale=30.0)
    assert_f32_close(fields.displacement[0], np.full((12, 10, 14), 1.5 * 12 / 19), ulps=8, scale=30.0)
    assert_f32_close(fields.ddf[1:], np.zeros((2, 12, 10, 14)), ulps=8, scale=30.0)


def test_ddf_voxels_is_the_monai_warp_field():
    """``Warp()(moving on the fixed grid, ddf_voxels)`` is the warped image the transform writes."""
    net = _ddf_net()
    with torch.no_grad():
        net.network.steps[0].unet.lastConv.weight.normal_(0, 0.05)
    shape = (16, 16, 16)
    affine = _affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    rng = np.random.default_rng(1)
    data = {"fixed_image": _image(rng.random(shape), affine, "f"), "moving_image": _image(rng.random(shape), affine, "m")}
    data = PrepareNetworkInputd(net, mask_keys=None, use_masks=False)(data)
    with torch.no_grad():
        data["pred"] = net(data["image"][None])[0]
    out = OriginalGridOutputsd(net, mask_keys=None, use_masks=False)(data)
    fields = out["registration"]["fields"]
    assert np.abs(fields.ddf).max() > 0.1
    expected = Warp(mode="bilinear", padding_mode="border")(data["moving_image"].as_tensor()[None],
                                                            torch.from_numpy(fields.ddf)[None])[0, 0]
    assert_f32_close(fields.warped_moving, expected, ulps=64)  # values in [0, 1], two interpolation orders


def test_saved_files_have_the_conventions(tmp_path):
    net = _ddf_net()
    data = PrepareNetworkInputd(net, mask_keys=None, use_masks=False)(_pair())
    data["pred"] = torch.zeros(3, *NET[::-1])
    data["pred"][1] = 0.5
    out = OriginalGridOutputsd(net, mask_keys=None, use_masks=False)(data)
    SaveRegistrationd(str(tmp_path), outputs=("displacement_mm", "ddf_voxels", "warped", "jacobian_determinant"))(out)
    case = "moving_to_fixed"
    field = nib.load(tmp_path / f"{case}_displacement_mm.nii.gz")
    assert field.shape == (12, 10, 14, 1, 3) and int(field.header["intent_code"]) == 1007
    u, affine = read_displacement_field(tmp_path / f"{case}_displacement_mm.nii.gz")
    assert_f32_close(affine, data["fixed_image"].affine.numpy(), ulps=1)  # NIfTI stores the sform as float32
    np.testing.assert_array_equal(u, out["registration"]["fields"].displacement)
    ddf = np.asarray(nib.load(tmp_path / f"{case}_ddf_voxels.nii.gz").dataobj)
    np.testing.assert_array_equal(np.moveaxis(ddf, -1, 0), out["registration"]["fields"].ddf)
    assert nib.load(tmp_path / f"{case}_warped.nii.gz").shape == (12, 10, 14)
    with pytest.raises(ValueError, match="Unknown outputs"):
        SaveRegistrationd(str(tmp_path), outputs=("ddf",))
    with pytest.raises(ValueError, match="inverse=True"):
        SaveRegistrationd(str(tmp_path), outputs=("inverse_displacement_mm",))(out)


def test_bad_settings_fail_when_the_config_is_parsed():
    net = _ddf_net()
    with pytest.raises(ValueError, match="orientation"):
        PrepareNetworkInputd(net, orientation="lps")
    with pytest.raises(ValueError, match="transform_scheme"):
        OriginalGridOutputsd(net, transform_scheme="spline")
    with pytest.raises(ValueError, match="use_masks"):
        PrepareNetworkInputd(net, use_masks="maybe")
    assert PrepareNetworkInputd(net, use_masks="false").use_masks is False  # a command-line override's string
    with pytest.raises(ValueError, match="prealign must be one of"):
        PrepareNetworkInputd(net, prealign="similarity")
    with pytest.raises(ValueError, match="prealign_similarity"):
        OriginalGridOutputsd(net, prealign="rigid", prealign_similarity="ncc")


def test_to_network_axes_keeps_world_coordinates():
    affine = _affine()
    x = _image(np.random.default_rng(2).random((4, 5, 6)), affine, "x")
    out = ToNetworkAxesd("x", "reference")({"x": x})["x"]
    assert tuple(out.shape) == (1, 6, 5, 4)
    i, j, k = 1, 2, 3
    world_before = affine[:3, :3] @ torch.tensor([i, j, k], dtype=torch.float64) + affine[:3, 3]
    world_after = out.affine[:3, :3] @ torch.tensor([k, j, i], dtype=torch.float64) + out.affine[:3, 3]
    assert torch.equal(world_before, world_after) and out[0, k, j, i] == x[0, i, j, k]
    assert ToNetworkAxesd("x", "file")({"x": x})["x"] is x
    with pytest.raises(ValueError, match="axis_order"):
        ToNetworkAxesd("x", "zyx")
