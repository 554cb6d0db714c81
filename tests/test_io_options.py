"""Instance-optimization options: MIND-SSC, the similarity by name, loss masks and the Dice term, through register."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from test_instance_optimization import SHAPE, blob_pair, slim_network
from test_register_pair import image
from tolerance import assert_f32_close

from monai_gradicon.io import Image
from monai_gradicon.losses.objective import GradICONObjective
from monai_gradicon.losses.similarity import (
    IO_SIMILARITIES,
    LNCCLoss,
    MINDSSCLoss,
    SquaredLNCCLoss,
    mind_ssc,
    similarity_from_name,
    soft_dice_loss,
)
from monai_gradicon.maps import warp_image
from monai_gradicon.networks.registration import to_network_axes
from monai_gradicon.pipeline import register as register_pair
from monai_gradicon.pipeline.core import resolve_settings
from monai_gradicon.pipeline.io_options import io_network_inputs, io_objective_factory

# ----------------------------------------------------------------------------------------------------------------
# MIND-SSC
# ----------------------------------------------------------------------------------------------------------------


def mind_numpy(volume, radius, dilation):
    """MIND-SSC from its definition, in numpy: 12 pairs of face neighbours on different axes (enumerated by axis
    pair and signs), box means of squared differences with edge replication (scipy's uniform_filter, mode
    "nearest"), minus the per-voxel minimum, divided by the clamped mean, exponentiated. Channels in another order
    than ours: compare sorted per voxel."""
    pad = np.pad(volume.astype(np.float64), dilation, mode="edge")

    def at(offset):
        return pad[tuple(slice(dilation + o * dilation, dilation + o * dilation + n)
                         for o, n in zip(offset, volume.shape))]

    channels = []
    for a in range(3):
        for b in range(a + 1, 3):
            for sa in (1, -1):
                for sb in (1, -1):
                    p = [0, 0, 0]
                    q = [0, 0, 0]
                    p[a], q[b] = sa, sb
                    sq = (at(p) - at(q)) ** 2
                    channels.append(ndimage.uniform_filter(sq, size=2 * radius + 1, mode="nearest"))
    dist = np.stack(channels)
    dist -= dist.min(axis=0)
    var = dist.mean(axis=0)
    level = var.mean()
    var = np.clip(var, 0.001 * level, 1000.0 * level)
    return np.exp(-dist / var)


def test_mind_ssc_is_the_definition():
    volume = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(13, 12, 14)), 1.0)
    volume[7:] *= 0.01  # a quiet half: its local variance is below 1e-3 of the mean, so the clamp acts there
    ours = mind_ssc(torch.from_numpy(volume).float()[None, None], radius=2, dilation=2)[0].double().numpy()
    theirs = mind_numpy(volume, 2, 2)
    assert ours.shape == theirs.shape == (12, 13, 12, 14)
    assert_f32_close(np.sort(ours, axis=0), np.sort(theirs, axis=0), ulps=64, scale=1.0, what="MIND-SSC")
    assert np.allclose(ours.max(axis=0), 1.0)  # the most self-similar pair of every voxel


def test_mind_ssc_loss_properties():
    a, b = blob_pair(shift=2.0)
    loss = MINDSSCLoss()
    # invariant to an affine change of intensities (MIND's point): same descriptor
    assert_f32_close(mind_ssc(3.0 * a + 0.5), mind_ssc(a), ulps=64, scale=1.0, what="MIND of 3a + 0.5")
    assert float(loss(a, a)) == 0.0 and float(loss(a, b)) > 0.0
    moving = a.clone().requires_grad_(True)
    loss(moving, b).backward()
    assert torch.isfinite(moving.grad).all() and moving.grad.abs().sum() > 0
    # a masked loss ignores what happens far (beyond radius + dilation) outside the mask
    mask = torch.zeros_like(a)
    mask[..., 4:12, 4:12, 4:12] = 1
    changed = a.clone()
    changed[..., 18:, 18:, 18:] = torch.rand_like(changed[..., 18:, 18:, 18:])
    assert float(loss(changed, b, mask)) == pytest.approx(float(loss(a, b, mask)), rel=1e-6)
    assert float(loss(changed, b)) != pytest.approx(float(loss(a, b)), rel=1e-6)
    with pytest.raises(ValueError, match="3D"):
        mind_ssc(torch.rand(1, 1, 8, 8))


def test_similarity_by_name():
    assert IO_SIMILARITIES == ("lncc", "lncc2", "mind")
    lncc, lncc2, mind = (similarity_from_name(n) for n in IO_SIMILARITIES)
    assert type(lncc) is LNCCLoss and lncc.sigma == 5.0
    assert type(lncc2) is SquaredLNCCLoss and lncc2.sigma == 5.0
    assert type(mind) is MINDSSCLoss and (mind.radius, mind.dilation) == (2, 2)
    with pytest.raises(ValueError, match="lncc, lncc2|choose one of"):
        similarity_from_name("ncc")


def test_soft_dice_loss():
    p = torch.tensor([[[1.0, 0.5, 0.0, 0.0]], [[0.0, 1.0, 1.0, 0.0]]]).reshape(1, 2, 4)
    t = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 1.0]]]).reshape(1, 2, 4)
    dice0 = (2 * 1.5 + 1e-6) / (1.5 + 2 + 1e-6)
    dice1 = (2 * 1.0 + 1e-6) / (2 + 2 + 1e-6)
    assert float(soft_dice_loss(p, t)) == pytest.approx(1 - (dice0 + dice1) / 2)
    assert float(soft_dice_loss(t, t)) == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------------------------


def cube(lo, hi):
    m = torch.zeros(1, 1, *SHAPE)
    m[..., lo:hi, lo:hi, lo:hi] = 1
    return m


def test_objective_masks_each_comparison_with_its_target_mask():
    net = slim_network()
    moving, fixed = blob_pair()
    noise = torch.randn(1, 3, *SHAPE, generator=torch.Generator().manual_seed(1))
    fixed_mask, moving_mask = cube(4, 20), cube(6, 18)
    masked = GradICONObjective(net, LNCCLoss(5), moving_mask=moving_mask, fixed_mask=fixed_mask).eval()
    plain = GradICONObjective(net, LNCCLoss(5)).eval()
    with torch.no_grad():
        out = masked(moving, fixed, noise=noise)
        ref = plain(moving, fixed, noise=noise)
        expected = (LNCCLoss(5)(ref.warped_moving, fixed, fixed_mask)
                    + LNCCLoss(5)(ref.warped_fixed, moving, moving_mask))
        ones = GradICONObjective(net, LNCCLoss(5), moving_mask=torch.ones(1, 1, *SHAPE),
                                 fixed_mask=torch.ones(1, 1, *SHAPE)).eval()(moving, fixed, noise=noise)
    assert float(out.similarity) == pytest.approx(float(expected), rel=1e-6)
    assert float(out.similarity) != pytest.approx(float(ref.similarity), rel=1e-3)
    assert float(ones.similarity) == pytest.approx(float(ref.similarity), rel=1e-6)
    assert float(out.regularizer) == float(ref.regularizer) and out.dice is None and "dice" not in out.scalars()
    with pytest.raises(ValueError, match="both moving_mask and fixed_mask"):
        GradICONObjective(net, moving_mask=moving_mask)
    with pytest.raises(ValueError, match="grid"):
        GradICONObjective(net, moving_mask=cube(1, 3)[..., :20], fixed_mask=cube(1, 3)[..., :20]).eval()(moving, fixed)


def test_objective_dice_term():
    net = slim_network()
    moving, fixed = blob_pair()
    seg_a = torch.cat([cube(4, 12), cube(12, 20)], dim=1)
    seg_b = torch.cat([cube(5, 13), cube(11, 19)], dim=1)
    noise = torch.randn(1, 3, *SHAPE, generator=torch.Generator().manual_seed(1))
    objective = GradICONObjective(net, LNCCLoss(5), dice_weight=0.5, moving_segmentation=seg_a,
                                  fixed_segmentation=seg_b).eval()
    with torch.no_grad():
        out = objective(moving, fixed, noise=noise)
    expected = (soft_dice_loss(warp_image(seg_a, out.phi_ab), seg_b)
                + soft_dice_loss(warp_image(seg_b, out.phi_ba), seg_a))
    assert float(out.dice) == pytest.approx(float(expected), rel=1e-6) and out.scalars()["dice"] > 0
    assert float(out.loss) == pytest.approx(float(1.5 * out.regularizer + out.similarity + 0.5 * out.dice), rel=1e-6)
    with pytest.raises(ValueError, match="dice_weight > 0 needs"):
        GradICONObjective(net, dice_weight=1.0)
    with pytest.raises(ValueError, match="dice_weight is 0"):
        GradICONObjective(net, moving_segmentation=seg_a, fixed_segmentation=seg_b)


# ----------------------------------------------------------------------------------------------------------------
# through register
# ----------------------------------------------------------------------------------------------------------------

NET = (24, 24, 24)


def test_network_inputs_follow_the_pipeline_geometry():
    fixed, moving = image(seed=0), image(seed=1)
    settings = resolve_settings(slim_network(1, NET, preprocessing="none").card, io_iterations=2)
    mask = np.zeros(moving.shape, np.uint8)
    mask[2:10, 5:25, 3:20] = 1
    labels = np.zeros(moving.shape, np.int16)
    labels[2:10, 5:25, 3:20] = 4
    labels[15:25, 2:12, 8:22] = 7
    fixed_labels = labels.copy()
    fixed_labels[fixed_labels == 7] = 9  # only label 4 is shared
    plain = io_network_inputs(fixed, moving, settings, fixed_mask=Image(mask, fixed.affine),
                              moving_mask=Image(mask, moving.affine),
                              fixed_segmentation=Image(fixed_labels, fixed.affine),
                              moving_segmentation=Image(labels, moving.affine))
    assert plain.labels == (4,) and plain.moving_segmentation.shape == (1, 1, *settings.file_order_shape)
    expected = torch.nn.functional.interpolate(torch.from_numpy(mask).float()[None, None], size=NET, mode="nearest")
    assert torch.equal(plain.moving_mask, expected) and set(torch.unique(plain.fixed_mask).tolist()) == {0.0, 1.0}
    # the same anatomy stored with a flipped first axis gives the same network inputs ("physical" orientation)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = moving.shape[0] - 1
    flipped = Image(moving.array[::-1].copy(), moving.affine @ flip)
    other = io_network_inputs(fixed, flipped, settings, fixed_mask=Image(mask, fixed.affine),
                              moving_mask=Image(mask[::-1].copy(), flipped.affine),
                              fixed_segmentation=Image(fixed_labels, fixed.affine),
                              moving_segmentation=Image(labels[::-1].copy(), flipped.affine))
    assert torch.equal(other.moving_mask, plain.moving_mask)
    assert torch.equal(other.moving_segmentation, plain.moving_segmentation)
    with pytest.raises(ValueError, match="share no label"):
        io_network_inputs(fixed, moving, settings, fixed_segmentation=Image(fixed_labels * (fixed_labels == 9),
                                                                             fixed.affine),
                          moving_segmentation=Image(labels * (labels == 4), moving.affine))
    with pytest.raises(ValueError, match="both a fixed and a moving mask"):
        io_network_inputs(fixed, moving, settings, fixed_mask=Image(mask, fixed.affine))


def test_factory_puts_inputs_in_the_network_axis_order():
    fixed, moving = image(seed=0), image(seed=1)
    net = slim_network(1, NET, preprocessing="none", axis_order="reference")
    settings = resolve_settings(net.card, io_iterations=2)
    mask = np.zeros(moving.shape, np.uint8)
    mask[2:10, 5:25, 3:20] = 1
    extra = io_network_inputs(fixed, moving, settings, fixed_mask=Image(mask, fixed.affine),
                              moving_mask=Image(mask, moving.affine))
    objective = io_objective_factory("lncc2", network_inputs=extra, loss_masking=True)(net)
    assert type(objective.similarity) is SquaredLNCCLoss
    assert torch.equal(objective.moving_mask, to_network_axes(extra.moving_mask, "reference"))
    with pytest.raises(ValueError, match="loss_masking needs"):
        io_objective_factory("lncc", loss_masking=True)
    with pytest.raises(ValueError, match="Unknown IO similarity"):
        io_objective_factory("ssd")


def test_register_with_mind_masks_and_dice():
    fixed, moving = image(seed=0), image(seed=1)
    net = slim_network(1, NET, preprocessing="none")
    settings = resolve_settings(net.card, io_iterations=2, io_lr=1e-3)
    mask = np.zeros(fixed.shape, np.uint8)
    mask[3:25, 4:26, 3:22] = 1
    labels = np.zeros(fixed.shape, np.int16)
    labels[5:15, 5:20, 5:15] = 1
    labels[15:25, 10:28, 8:20] = 2
    extra = io_network_inputs(fixed, moving, settings, fixed_mask=Image(mask, fixed.affine),
                              moving_mask=Image(mask, moving.affine), fixed_segmentation=Image(labels, fixed.affine),
                              moving_segmentation=Image(np.roll(labels, 2, axis=0), moving.affine))
    factory = io_objective_factory("mind", network_inputs=extra, loss_masking=True, dice_weight=0.5)
    result = register_pair(fixed, moving, net, settings=settings, io_objective=factory)
    history = result.io_history
    assert len(history) == 2 and all("dice" in h and h["dice"] > 0 for h in history)
    plain = register_pair(fixed, moving, net, settings=settings)
    assert "dice" not in plain.io_history[0]
    assert np.abs(result.displacement - plain.displacement).max() > 1e-4
