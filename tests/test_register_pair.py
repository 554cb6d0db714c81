"""register_pair on small in-memory images: geometry, orientation, reproducibility, outputs and bad inputs."""

import json
import os

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from monai_gradicon.io import Image, read_image, write_nifti
from monai_gradicon.registration_api import OUTPUT_FILES, network_from_weights, register_pair
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
    r = register_pair(fixed, moving, slim_network(1, NET), preprocess="none")
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
    a = register_pair(fixed, moving, net, preprocess="none")
    b = register_pair(fixed, flipped, net, preprocess="none")
    assert not a.settings["moving_reoriented_for_network"] and b.settings["moving_reoriented_for_network"]
    np.testing.assert_allclose(a.displacement, b.displacement, atol=1e-4)
    np.testing.assert_allclose(a.warped_moving, b.warped_moving, atol=1e-3)
    # the inverse field is on the original (flipped) moving grid
    np.testing.assert_allclose(b.inverse_displacement, a.inverse_displacement[:, ::-1], atol=1e-4)
    c = register_pair(fixed, flipped, net, preprocess="none", match_orientation=False)
    assert np.abs(c.warped_moving - a.warped_moving).max() > 1.0


def test_inverse_field_matches_point_mapping():
    moving_aff = np.array([[0.0, 1.3, 0, -5], [-1.1, 0, 0, 8], [0, 0, 2.2, 1], [0, 0, 0, 1]])
    fixed, moving = image(seed=0), image((25, 33, 21), moving_aff, seed=2)
    r = register_pair(fixed, moving, random_network(2, (33, 33, 33)), preprocess="none")
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
    a = register_pair(fixed, moving, net, preprocess="lung_ct", io_iterations=2, io_lr=1e-3, progress=False)
    b = register_pair(fixed, moving, net, preprocess="lung_ct", io_iterations=2, io_lr=1e-3, progress=False)
    np.testing.assert_array_equal(a.displacement, b.displacement)
    np.testing.assert_array_equal(a.warped_moving, b.warped_moving)
    assert len(a.io_history) == 2
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k


def test_2d_registration():
    from monai_gradicon.networks.registration import gradicon_network
    from monai_gradicon.networks.unet2 import UNet2

    net2d = gradicon_network(1, 2, (20, 20))
    net2d.steps[0].unet = UNet2(2, 1, down_channels=(8, 16, 16, 32, 32), up_channels=(8, 16, 16, 16, 16))
    fixed = Image(smooth_volume((30, 26)), np.diag([0.8, 0.8, 1.0, 1.0]))
    moving = Image(smooth_volume((22, 24), 3), np.diag([1.0, 1.1, 1.0, 1.0]))
    r = register_pair(fixed, moving, net2d, preprocess="none")
    assert r.displacement.shape == (2, 30, 26) and r.warped_moving.shape == (30, 26)


def test_save_refuses_to_overwrite(tmp_path):
    fixed_p = write_nifti(tmp_path / "fixed.nii.gz", smooth_volume((20, 20, 20)), np.eye(4))
    moving_p = write_nifti(tmp_path / "moving.nii.gz", smooth_volume((20, 20, 20), 1), np.eye(4))
    r = register_pair(fixed_p, moving_p, slim_network(1, NET), preprocess="none")
    with pytest.raises(ValueError, match="contains the input file"):
        r.save(tmp_path)
    out = tmp_path / "out"
    paths = r.save(out, overview=False)
    assert set(os.path.basename(p) for p in paths.values()) == set(OUTPUT_FILES.values()) - {"overview.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"]["percent_voxels_detJ_le_0"] == 0.0 and "displacement_mm" in summary["conventions"]
    stamp = os.stat(out / "warped_moving.nii.gz").st_mtime_ns
    with pytest.raises(FileExistsError, match="--overwrite"):
        r.save(out)
    assert os.stat(out / "warped_moving.nii.gz").st_mtime_ns == stamp
    r.inverse_displacement = None
    r.save(out, overwrite=True)  # a result without the inverse: the stale inverse file goes
    assert read_image(out / "warped_moving.nii.gz").shape == (20, 20, 20)
    assert not (out / "inverse_displacement_mm.nii.gz").exists()


def test_bad_inputs():
    net = slim_network(1, NET)
    fixed = image()
    flat = Image(smooth_volume((30, 30)), np.eye(4))
    with pytest.raises(ValueError, match="fixed image is 3D .* moving image is 2D"):
        register_pair(fixed, flat, net)
    with pytest.raises(ValueError, match="network is 3D but the images are 2D"):
        register_pair(flat, flat, net)
    nan = image()
    nan.array[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="moving image contains 1 NaN"):
        register_pair(fixed, nan, net)
    const = Image(np.full((20, 20, 20), 7.0, np.float32), np.eye(4))
    with pytest.raises(ValueError, match="fixed image is constant"):
        register_pair(const, fixed, net)
    bright = Image(smooth_volume((20, 20, 20)) + 2000.0, np.eye(4))
    with pytest.raises(ValueError, match="After preprocessing 'lung_ct' the moving image is constant"):
        register_pair(fixed, bright, net, preprocess="lung_ct")
    with pytest.raises(ValueError, match="fixed mask has shape"):
        register_pair(fixed, fixed, net, fixed_mask=Image(np.ones((5, 5, 5)), np.eye(4)))
    with pytest.raises(ValueError, match="moving mask is empty"):
        register_pair(fixed, fixed, net, moving_mask=Image(np.zeros(fixed.shape), fixed.affine))
    with pytest.raises(ValueError, match="below|does not fit"):
        register_pair(fixed, fixed, net, input_shape=(8, 8, 8))
    with pytest.raises(ValueError, match="Unknown preprocessing"):
        register_pair(fixed, fixed, net, preprocess="ct")
    with pytest.raises(FileNotFoundError, match="moving image file does not exist"):
        register_pair(fixed, "/nonexistent/moving.nii.gz", net)


def test_float_labels_are_refused():
    fixed, moving = image(seed=0), image(seed=1)
    r = register_pair(fixed, moving, slim_network(1, NET), preprocess="none", inverse=False)
    with pytest.raises(ValueError, match="non-integer values"):
        r.warp(Image(moving.array.astype(np.float32), moving.affine), labels=True)
    labels = Image((moving.array > -400).astype(np.float32), moving.affine)  # whole numbers stored as float: fine
    out = r.warp(labels, labels=True)
    assert out.dtype == np.float32 and set(np.unique(out)) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="inverse transform was not computed"):
        r.moving_to_fixed(np.zeros((1, 3)))


def test_network_from_weights_slim_and_official(tmp_path):
    net = random_network(2, (33, 33, 33))
    torch.save(net.state_dict(), tmp_path / "ours.pt")
    loaded = network_from_weights(tmp_path / "ours.pt", input_shape=(33, 33, 33))
    for (k, v), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    from monai_gradicon.weights import network_to_official_state

    torch.save(network_to_official_state(net), tmp_path / "official.trch")
    with pytest.raises(Exception, match="wrong shape|does not fit"):  # slim UNets do not fit the released layout
        network_from_weights(tmp_path / "official.trch")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        network_from_weights(tmp_path / "junk.pt")
