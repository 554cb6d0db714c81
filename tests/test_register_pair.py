"""The registration pipeline on small in-memory images: geometry, orientation, reproducibility, outputs, bad inputs."""

import json
import os

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from monai_gradicon.io import Image, read_image, write_nifti
from monai_gradicon.model_card import CardError
from monai_gradicon.pipeline import OUTPUT_FILES, register as register_pair
from monai_gradicon.weights import load_weights, save_weights
from monai_gradicon.resample import Grid
from test_instance_optimization import slim_network

NET = (24, 24, 24)


def smooth_volume(shape, seed=0):
    vol = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.5).astype(np.float32)
    return (vol - vol.min()) / np.ptp(vol) * 1000.0 - 900.0  # HU-like, inside the lung window


def image(shape=(28, 30, 26), affine=None, seed=0):
    return Image(smooth_volume(shape, seed), np.diag([1.5, 1.2, 2.0, 1.0]) if affine is None else affine)


def random_network(num_steps=1, shape=NET, seed=0):
    """A slim network whose last layers are not zero, so that it produces a non-trivial transform."""
    net = slim_network(num_steps, shape, seed)
    with torch.no_grad():
        for step in net.steps:
            step.unet.lastConv.weight.normal_(0.0, 2e-3)
    return net


def test_identity_network_same_grid():
    fixed, moving = image(seed=0), image(seed=1)
    r = register_pair(fixed, moving, slim_network(1, NET), preprocessing="none")
    assert np.abs(r.displacement).max() < 1e-4 and np.abs(r.ddf).max() < 1e-4
    np.testing.assert_allclose(r.warped_moving, moving.array, atol=1e-3)
    np.testing.assert_allclose(r.jacobian, 1.0, atol=1e-4)
    assert r.folds_percent == 0.0 and r.inverse_displacement.shape == (3, *moving.shape)


def test_flipped_moving_is_reoriented():
    """The same world image stored with a flipped first axis must give the same result."""
    fixed = image(seed=0)
    moving = image(seed=1)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = moving.shape[0] - 1
    flipped_aff = moving.affine @ flip
    flipped = Image(moving.array[::-1].copy(), flipped_aff)
    net = random_network()
    a = register_pair(fixed, moving, net, preprocessing="none")
    b = register_pair(fixed, flipped, net, preprocessing="none")
    assert not a.prepared.reoriented and b.prepared.reoriented
    np.testing.assert_allclose(a.displacement, b.displacement, atol=1e-4)
    np.testing.assert_allclose(a.warped_moving, b.warped_moving, atol=1e-3)
    # the inverse field is on the original (flipped) moving grid
    np.testing.assert_allclose(b.inverse_displacement, a.inverse_displacement[:, ::-1], atol=1e-4)
    # the reference's pairing of stored arrays registers the flipped anatomy: another result
    c = register_pair(fixed, flipped, net, preprocessing="none", orientation="index")
    assert not c.prepared.reoriented and np.abs(c.warped_moving - a.warped_moving).max() > 1.0


def test_inverse_field_matches_point_mapping():
    moving_aff = np.array([[0.0, 1.3, 0, -5], [-1.1, 0, 0, 8], [0, 0, 2.2, 1], [0, 0, 0, 1]])
    fixed, moving = image(seed=0), image((25, 33, 21), moving_aff, seed=2)
    r = register_pair(fixed, moving, random_network(2, (33, 33, 33)), preprocessing="none")
    idx = np.array([[0, 0, 0], [12, 20, 7], [24, 32, 20]])
    world = Grid.of(moving).index_to_world(idx.astype(float))
    inverse_at = r.inverse_displacement[(slice(None), *idx.T)].T
    np.testing.assert_allclose(world + inverse_at, r.moving_to_fixed(world), atol=1e-3)
    fworld = Grid.of(fixed).index_to_world(idx[:2].astype(float))
    forward_at = r.displacement[(slice(None), *idx[:2].T)].T
    np.testing.assert_allclose(fworld + forward_at, r.fixed_to_moving(fworld), atol=1e-3)


def test_same_pair_twice_with_io_is_identical():
    fixed, moving = image(seed=0), image(seed=1)
    net = random_network()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = register_pair(fixed, moving, net, preprocessing="lung_ct", io_iterations=2, io_lr=1e-3, auto_masks=False)
    b = register_pair(fixed, moving, net, preprocessing="lung_ct", io_iterations=2, io_lr=1e-3, auto_masks=False)
    np.testing.assert_array_equal(a.displacement, b.displacement)
    np.testing.assert_array_equal(a.warped_moving, b.warped_moving)
    assert len(a.io_history) == 2
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k


def test_2d_registration():
    from monai_gradicon.networks.registration import gradicon_network

    net2d = gradicon_network(1, 2, (20, 20), down_channels=(8, 16, 16, 32, 32), up_channels=(8, 16, 16, 16, 16))
    fixed = Image(smooth_volume((30, 26)), np.diag([0.8, 0.8, 1.0, 1.0]))
    moving = Image(smooth_volume((22, 24), 3), np.diag([1.0, 1.1, 1.0, 1.0]))
    r = register_pair(fixed, moving, net2d, preprocessing="none")
    assert r.displacement.shape == (2, 30, 26) and r.warped_moving.shape == (30, 26)


def test_save_refuses_to_overwrite(tmp_path):
    fixed_p = write_nifti(tmp_path / "fixed.nii.gz", smooth_volume((20, 20, 20)), np.eye(4))
    moving_p = write_nifti(tmp_path / "moving.nii.gz", smooth_volume((20, 20, 20), 1), np.eye(4))
    r = register_pair(fixed_p, moving_p, slim_network(1, NET), preprocessing="none")
    with pytest.raises(ValueError, match="contains the input file"):
        r.save(tmp_path)
    out = tmp_path / "out"
    paths = r.save(out, overview=False)
    optional = {"overview.png", OUTPUT_FILES["fixed_mask"], OUTPUT_FILES["moving_mask"], OUTPUT_FILES["affine"],
                OUTPUT_FILES["transform"], OUTPUT_FILES["inverse_transform"]}
    assert set(os.path.basename(p) for p in paths.values()) == set(OUTPUT_FILES.values()) - optional
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"]["percent_voxels_detJ_le_0"] == 0.0 and "displacement_mm" in summary["conventions"]
    stamp = os.stat(out / "warped_moving.nii.gz").st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        r.save(out)
    assert os.stat(out / "warped_moving.nii.gz").st_mtime_ns == stamp
    r.fields.inverse_displacement = None
    r.save(out, overwrite=True)  # replaced as a whole: a result without the inverse leaves no stale inverse file
    assert read_image(out / "warped_moving.nii.gz").shape == (20, 20, 20)
    assert not (out / "inverse_displacement_mm.nii.gz").exists()
    assert sorted(os.listdir(tmp_path)) == ["fixed.nii.gz", "moving.nii.gz", "out"]  # no temporary folders left
    # a folder with anything but a previous result is never replaced, even with overwrite
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "overview.png").write_bytes(b"the user's own picture")
    with pytest.raises(FileExistsError, match="not a complete monai_gradicon result"):
        r.save(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "overview.png").read_bytes() == b"the user's own picture"
    # ... nor a result folder with a file the result did not write (a result saved without its overview)
    r.save(out, overwrite=True, overview=False)
    (out / "overview.png").write_bytes(b"the user's own picture")
    with pytest.raises(FileExistsError, match="overview.png"):
        r.save(out, overwrite=True)
    assert (out / "overview.png").read_bytes() == b"the user's own picture"


def test_bad_inputs():
    net = slim_network(1, NET)
    fixed = image()
    flat = Image(smooth_volume((30, 30)), np.eye(4))
    with pytest.raises(ValueError, match="fixed image is 3D .* moving image is 2D"):
        register_pair(fixed, flat, net, preprocessing="none")
    with pytest.raises(ValueError, match="network shape .* is 3D but the images are 2D"):
        register_pair(flat, flat, net, preprocessing="none")
    nan = image()
    nan.array[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="moving image contains 1 NaN"):
        register_pair(fixed, nan, net, preprocessing="none")
    const = Image(np.full((20, 20, 20), 7.0, np.float32), np.eye(4))
    with pytest.raises(ValueError, match="fixed image is constant"):
        register_pair(const, fixed, net, preprocessing="none")
    bright = Image(smooth_volume((20, 20, 20)) + 2000.0, np.eye(4))
    with pytest.raises(ValueError, match="After preprocessing 'lung_ct' the moving image is constant"):
        register_pair(fixed, bright, net, preprocessing="lung_ct", auto_masks=False)
    with pytest.raises(ValueError, match="fixed mask has shape"):
        register_pair(fixed, fixed, net, preprocessing="none", fixed_mask=Image(np.ones((5, 5, 5)), np.eye(4)))
    with pytest.raises(ValueError, match="moving mask is empty"):
        register_pair(fixed, fixed, net, preprocessing="none", moving_mask=Image(np.zeros(fixed.shape), fixed.affine))
    with pytest.raises(CardError, match="input_shape: the card says"):
        register_pair(fixed, fixed, net, input_shape=(8, 8, 8))
    with pytest.raises(ValueError, match="below the minimum"):
        register_pair(fixed, fixed, slim_network(1, None), input_shape=(8, 8, 8), preprocessing="none")
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        register_pair(fixed, fixed, net, preprocessing="ct")
    with pytest.raises(CardError, match="does not say the intensity preprocessing"):
        register_pair(fixed, fixed, net)
    with pytest.raises(ValueError, match="orientation must be one of"):
        register_pair(fixed, fixed, net, preprocessing="none", orientation="lps")
    with pytest.raises(FileNotFoundError, match="moving image file does not exist"):
        register_pair(fixed, "/nonexistent/moving.nii.gz", net, preprocessing="none")


def test_float_labels_are_refused():
    fixed, moving = image(seed=0), image(seed=1)
    r = register_pair(fixed, moving, slim_network(1, NET), preprocessing="none", inverse=False)
    with pytest.raises(ValueError, match="non-integer values"):
        r.warp(Image(moving.array.astype(np.float32), moving.affine), labels=True)
    labels = Image((moving.array > -400).astype(np.float32), moving.affine)  # whole numbers stored as float: fine
    out = r.warp(labels, labels=True)
    assert out.dtype == np.float32 and set(np.unique(out)) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="inverse transform was not computed"):
        r.moving_to_fixed(np.zeros((1, 3)))


def test_load_weights_slim_and_official(tmp_path):
    net = random_network(2, (33, 33, 33))
    save_weights(net, tmp_path / "ours.pt")
    loaded, card = load_weights(tmp_path / "ours.pt")
    assert card == net.card and loaded.unet_channels == net.unet_channels
    for (k, v), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    from monai_gradicon.weights import network_to_official_state

    torch.save(network_to_official_state(net), tmp_path / "official.trch")
    released, card = load_weights(tmp_path / "official.trch")  # slim UNets are read from the tensors' shapes too
    assert released.unet_channels == net.unet_channels and card.axis_order == "reference"
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load_weights(tmp_path / "junk.pt")
