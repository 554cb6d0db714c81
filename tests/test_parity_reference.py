"""Parity with the reference implementation (icon_registration 1.1.9): same weights and inputs, same numbers.

These compare against the installed reference package, not against saved outputs of our own code.
"""

from __future__ import annotations

import copy

import pytest
import torch

from reference_impl import (
    randomize_batchnorm_stats,
    randomize_last_layers,
    reference_loss,
    reference_tree,
)
from icon_registration import losses as ref_losses
from icon_registration import mermaidlite as ref_ml
from icon_registration import network_wrappers as ref_wrappers
from icon_registration import networks as ref_networks

from monai_gradicon import maps
from monai_gradicon.losses import GradICONObjective, LNCCLoss, SSDLoss, SquaredLNCCLoss
from monai_gradicon.networks import UNet2, gradicon_network
from monai_gradicon.weights import load_network_weights, network_to_official_state
from tolerance import EPS32, assert_f32_close, f32_tolerance

# maps are [0, 1] coordinates after 4 UNets whose channels-last convolutions sum in another order (the reference
# shows the same deviation against itself, bench/layout_deviation.py): ~84 float32 rounding steps of a coordinate
MAP_TOL = f32_tolerance(1.0, 84)
LOSS_RTOL = 84 * EPS32  # the same number of rounding steps relative to the loss


def smooth_images(shape, batch=1, seed=0):
    """Two different smooth random images in [0, 1], ``[batch, 1, *shape]``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((2 * batch, 1, *[max(s // 8, 2) for s in shape]), generator=g)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    img = torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    return img[:batch].contiguous(), img[batch:].contiguous()


def matched_pair(num_steps, dim, seed=1):
    """A reference tree and our network with identical, non-trivial weights (loaded through the key map)."""
    g = torch.Generator().manual_seed(seed)
    ref = reference_tree(num_steps, dim)
    randomize_last_layers(ref, g)
    randomize_batchnorm_stats(ref, g)
    ours = gradicon_network(num_steps, dim)
    load_network_weights(ours, ref.state_dict())
    return ref, ours


def rel_err(a, b):
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 8)])
def test_identity_map_equals_reference(shape):
    module = ref_wrappers.FunctionFromVectorField(None)
    module.assign_identity_map([1, 1, *shape])  # what every reference module uses
    ours = maps.identity_map(shape)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, module.identity_map)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("shape", [(11, 13), (9, 10, 12)])
def test_sample_equals_reference(shape, padding):
    g = torch.Generator().manual_seed(3)
    image = torch.rand((2, 3, *shape), generator=g)
    points = torch.rand((1, len(shape), 6, 7, *([5] if len(shape) == 3 else [])), generator=g) * 1.4 - 0.2
    spacing = [1.0 / (s - 1) for s in shape]
    ref = ref_ml.compute_warped_image_multiNC(image, points, spacing, 1, zero_boundary=(padding == "zeros"))
    ours = maps.sample(image, points, padding_mode=padding)
    assert_f32_close(ours, ref, ulps=8)


def _sample_and_grads(fn, image, points, grad_out):
    im, p = image.clone().requires_grad_(), points.clone().requires_grad_()
    out = fn(im, p)
    return (out.detach(), *torch.autograd.grad(out, (im, p), grad_out))


@pytest.mark.parametrize("batch", [1, 2])  # batch 1 on CPU takes the per-thread chunked path in 3D
@pytest.mark.parametrize("shape", [(11, 13), (40, 41, 42)])
def test_sample_gradients_equal_reference(shape, batch):
    """Values and gradients (image and points) of ``maps.sample`` against the reference's sampler."""
    g = torch.Generator().manual_seed(5)
    image = torch.rand((batch, 3, *shape), generator=g)
    points = torch.rand((batch, len(shape), *shape), generator=g) * 1.2 - 0.1
    grad_out = torch.randn((batch, 3, *shape), generator=g)
    spacing = [1.0 / (s - 1) for s in shape]
    def reference(im, p):
        return ref_ml.compute_warped_image_multiNC(im, p, spacing, 1, zero_boundary=False)

    ref, ref_gi, ref_gp = _sample_and_grads(reference, image, points, grad_out)
    ours, gi, gp = _sample_and_grads(maps.sample, image, points, grad_out)
    assert_f32_close(ours, ref, ulps=8)
    assert_f32_close(gi, ref_gi, ulps=64)  # scattered sums of up to 8 neighbours per point, other order
    assert torch.allclose(gp, ref_gp, atol=1e-4 * ref_gp.abs().max().item(), rtol=0)


def test_sample_keeps_the_coordinate_of_a_one_voxel_axis():
    """An axis of size 1 (the reference divides by zero there): values and gradients equal ``grid_sample`` with that
    axis's coordinate passed through unscaled."""
    g = torch.Generator().manual_seed(6)
    image = torch.rand((1, 2, 9, 1, 12), generator=g)
    points = torch.rand((1, 3, 9, 1, 12), generator=g)
    points[:, 1] = 0.0
    grad_out = torch.randn((1, 2, 9, 1, 12), generator=g)

    def direct(im, p):
        grid = torch.stack([p[:, 2] * 2 - 1, p[:, 1], p[:, 0] * 2 - 1], dim=-1)
        return torch.nn.functional.grid_sample(im, grid, padding_mode="border", align_corners=True)

    expected = _sample_and_grads(direct, image, points, grad_out)
    for ours, want in zip(_sample_and_grads(maps.sample, image, points, grad_out), expected):
        assert_f32_close(ours, want, ulps=8)


@pytest.mark.parametrize("shape", [(20, 24), (12, 14, 16)])
def test_warp_equals_monai_warp(shape):
    from monai.networks.blocks import Warp

    g = torch.Generator().manual_seed(4)
    image = torch.rand((2, 1, *shape), generator=g)
    ddf = torch.randn((2, len(shape), *shape), generator=g) * 2.0
    ours = maps.warp_image(image, maps.ddf_to_map(ddf))
    monai_out = Warp(mode="bilinear", padding_mode="border")(image, ddf)
    # MONAI normalizes the DDF to grid_sample's [-1, 1] by another sequence of roundings (coordinates up to ~N)
    assert_f32_close(ours, monai_out, ulps=16 * max(shape), scale=1.0)
    # and the conversion round-trips (values of a few voxels, rounded through [0, 1] coordinates)
    assert_f32_close(maps.map_to_ddf(maps.ddf_to_map(ddf)), ddf, ulps=4 * max(shape), scale=1.0)


def test_map_to_ddf_uses_n_minus_one():
    phi = maps.identity_map((5, 9))
    phi[:, 0] += 1.0 / 4  # one voxel along axis 0 (N = 5)
    phi[:, 1] += 2.0 / 8  # two voxels along axis 1 (N = 9)
    ddf = maps.map_to_ddf(phi)
    assert_f32_close(ddf[:, 0], torch.ones(1, 5, 9), ulps=8)
    assert_f32_close(ddf[:, 1], 2 * torch.ones(1, 5, 9), ulps=8)


@pytest.mark.parametrize("dim,shape", [(2, (33, 40)), (3, (20, 22, 19))])
@pytest.mark.parametrize("train", [False, True])
def test_unet2_equals_reference(dim, shape, train):
    g = torch.Generator().manual_seed(5)
    ref = ref_networks.tallUNet2(dimension=dim)
    randomize_last_layers(ref, g)
    randomize_batchnorm_stats(ref, g)
    ours = UNet2(dim)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train(train)
    ours.train(train)
    a, b = smooth_images(shape, batch=2)
    with torch.no_grad():
        out_ref = ref(a, b)
        out = ours(a, b)
    assert_f32_close(out, out_ref, ulps=16)
    assert out.abs().max() > 1e-3  # not the zero map


def test_parameter_counts():
    assert sum(p.numel() for p in UNet2(3).parameters()) == 17_670_229
    assert sum(p.numel() for p in UNet2(2).parameters()) == 4_756_902
    net = gradicon_network(4, 3)
    assert sum(p.numel() for p in net.parameters()) == 70_680_916
    # 188 tensors of the released layout, plus the model card our networks carry
    assert len(net.state_dict()) == 188 + 1 and "model_card" in net.state_dict()
    assert sum(p.numel() for p in gradicon_network(3, 3).parameters()) == 53_010_687


@pytest.mark.parametrize(
    "num_steps,dim,shape",
    [(4, 3, (65, 65, 66)), (3, 3, (65, 67, 65)), (2, 2, (40, 36)), (1, 2, (30, 25)), (4, 2, (70, 66))],
)
def test_maps_equal_reference(num_steps, dim, shape):
    ref, ours = matched_pair(num_steps, dim)
    ref.eval()
    ours.eval()
    ref.assign_identity_map([1, 1, *shape])
    a, b = smooth_images(shape)
    with torch.no_grad():
        ident = ref.identity_map
        ident.isIdentity = True
        ref_map = ref(a, b)(ident)
        our_map = ours(a, b).on_grid(shape)
    diff = (our_map - ref_map).abs().max().item()
    print(f"max |map diff| {num_steps}-step {dim}D {shape}: {diff:.3e}")
    assert diff <= MAP_TOL
    assert (ref_map - ident).abs().max() > 1e-3  # the transform is not the identity


def test_exported_weights_load_into_reference():
    ours = gradicon_network(4, 3)
    g = torch.Generator().manual_seed(9)
    randomize_last_layers(ours, g)
    ref = reference_tree(4, 3)
    ref.load_state_dict(network_to_official_state(ours), strict=True)
    shape = (65, 65, 65)
    ref.assign_identity_map([1, 1, *shape])
    ref.eval()
    ours.eval()
    a, b = smooth_images(shape, seed=2)
    with torch.no_grad():
        ref.identity_map.isIdentity = True
        diff = (ours(a, b).on_grid(shape) - ref(a, b)(ref.identity_map)).abs().max()
    assert diff <= MAP_TOL


def channels_last_copy(*tensors):
    return [t.contiguous(memory_format=torch.channels_last_3d) for t in tensors]


def reference_layout_deviation(ref_run, a, b):
    """The reference's own disagreement under a change of memory layout only: its network in channels-last (oneDNN's
    other kernels: the same sums in another order). ``ref_run(a, b)`` returns a dict of values; this returns the same
    dict computed with channels-last modules and inputs. GradICON's finite-difference regularizer (delta 1e-3)
    amplifies float32 rounding of the maps about a thousandfold, so this is the scale "float32 rounding" has for
    the loss terms and their gradients."""
    return ref_run(*channels_last_copy(a, b), channels_last=True)


@pytest.mark.parametrize("layout", ["exact", "default"])
@pytest.mark.parametrize(
    "kind,sim_ours,sim_ref,lmbda",
    [
        ("gradicon_sparse", LNCCLoss(5), ref_losses.LNCC(5), 1.5),
        ("gradicon", SquaredLNCCLoss(3), ref_losses.SquaredLNCC(3), 1.5),
        ("icon", SSDLoss(), ref_losses.SSD(), 2.0),
    ],
)
def test_loss_terms_equal_reference_3d(kind, sim_ours, sim_ref, lmbda, layout):
    """``exact``: our network in the reference's memory layout gives the reference's loss terms to 1e-5.
    ``default`` (channels-last high-resolution layers on CPU): within twice the reference's own deviation when only its
    memory layout changes."""
    shape = (65, 65, 65)
    ref_net, ours = matched_pair(4, 3, seed=11)
    if layout == "exact":
        ours.set_channels_last(False)
    ref_model = reference_loss(kind, ref_net, sim_ref, lmbda, shape)
    objective = GradICONObjective(ours, sim_ours, lmbda=lmbda, regularizer=kind)
    ref_model.train()
    objective.train()
    a, b = smooth_images(shape, batch=2, seed=3)

    def ref_run(a, b, channels_last=False):
        if channels_last:
            ref_model.to(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            torch.manual_seed(1234)  # the reference draws its jitter as the first randn after the network passes
            r = ref_model(a, b)
        return {"loss": r.all_loss, "regularizer": r.inverse_consistency_loss, "similarity": r.similarity_loss,
                "transform_magnitude": r.transform_magnitude, "folds": r.flips}

    ref = ref_run(a, b)
    with torch.no_grad():
        noise = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(1234))
        o = objective(a, b, noise=noise)
    ours_v = {"loss": o.loss, "regularizer": o.regularizer, "similarity": o.similarity,
              "transform_magnitude": o.transform_magnitude}
    tol = dict.fromkeys(ours_v, LOSS_RTOL)
    if layout == "default":
        ref_cl = reference_layout_deviation(ref_run, a, b)
        tol = {k: max(LOSS_RTOL, 2 * rel_err(ref_cl[k], ref[k])) for k in ours_v}
    for name in ours_v:
        err = rel_err(ours_v[name], ref[name])
        print(f"{kind} {layout} {name}: ours {float(ours_v[name]):.8g} ref {float(ref[name]):.8g} rel {err:.2e} "
              f"(tolerance {tol[name]:.2e})")
        assert err <= tol[name], name
    if layout == "exact":
        assert float(o.folds) == float(ref["folds"])
    assert float(ref["regularizer"]) > 0


@pytest.mark.parametrize("kind", ["gradicon_sparse", "gradicon", "icon"])
def test_loss_terms_equal_reference_2d(kind):
    shape = (66, 70)
    ref_net, ours = matched_pair(4, 2, seed=12)
    ref_model = reference_loss(kind, ref_net, ref_losses.LNCC(5), 1.5, shape)
    objective = GradICONObjective(ours, LNCCLoss(5), lmbda=1.5, regularizer=kind)
    a, b = smooth_images(shape, batch=3, seed=4)
    with torch.no_grad():
        torch.manual_seed(77)
        r = ref_model(a, b)
        o = objective(a, b, noise=torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(77)))
    for ours_v, ref_v in [(o.loss, r.all_loss), (o.regularizer, r.inverse_consistency_loss),
                          (o.similarity, r.similarity_loss), (o.transform_magnitude, r.transform_magnitude)]:
        assert rel_err(ours_v, ref_v) <= LOSS_RTOL


@pytest.mark.parametrize("layout", ["exact", "default"])
def test_gradients_equal_reference(layout):
    """One backward pass: the gradient of the loss w.r.t. every weight matches (training parity). ``exact``: to 1e-5
    of the largest gradient. ``default`` (channels-last on CPU): within twice the reference's own deviation when only
    its memory layout changes (about 1e-2 here: the finite-difference regularizer amplifies rounding)."""
    shape = (65, 65, 65)
    ref_net, ours = matched_pair(4, 3, seed=13)
    ref_net_cl = copy.deepcopy(ref_net)
    if layout == "exact":
        ours.set_channels_last(False)
    objective = GradICONObjective(ours, LNCCLoss(5), lmbda=1.5)
    a, b = smooth_images(shape, batch=1, seed=5)

    def ref_grads(net, a, b, channels_last=False):
        model = reference_loss("gradicon_sparse", net, ref_losses.LNCC(5), 1.5, shape)
        if channels_last:
            model.to(memory_format=torch.channels_last_3d)
        torch.manual_seed(5)
        model(a, b).all_loss.backward()
        return network_to_official_state_grads(net)

    ref = ref_grads(ref_net, a, b)
    objective(a, b, noise=torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(5))).loss.backward()
    # Relative to the largest gradient: biases feeding a train-mode BatchNorm have a true gradient of 0, so their
    # computed values are pure rounding noise and a per-tensor relative error would be meaningless.
    scale = max(float(g.abs().max()) for g in ref.values())
    worst = 0.0
    for i, step in enumerate(ours.steps):
        for name, p in step.unet.named_parameters():
            worst = max(worst, float((p.grad - ref[(i, name)]).abs().max()) / scale)
    tolerance = 1e-5
    if layout == "default":
        ref_cl = reference_layout_deviation(lambda a, b, channels_last: ref_grads(ref_net_cl, a, b, True), a, b)
        self_dev = max(float((ref_cl[k] - ref[k]).abs().max()) for k in ref) / scale
        print(f"reference vs itself in channels-last: {self_dev:.2e}")
        assert self_dev < 0.05  # sanity: rounding, not a different computation
        tolerance = max(tolerance, 2 * self_dev)
    print(f"{layout}: worst gradient difference relative to the largest gradient: {worst:.2e}")
    assert worst <= tolerance


def network_to_official_state_grads(ref_net):
    from monai_gradicon.weights import OFFICIAL_PREFIXES

    out = {}
    for key, p in ref_net.named_parameters():
        for i, prefix in enumerate(OFFICIAL_PREFIXES[4]):
            if key.startswith(prefix):
                out[(i, key[len(prefix):])] = p.grad
    return out
