"""The fast paths and opt-in performance modes compute the same numbers as the plain ones (float32 rounding), and
the modes that change numbers (bf16) stay off unless asked for. Timings live in ``bench/``, not here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_gradicon import maps
from monai_gradicon.coordinate_transforms import ComposedTransform, DisplacementTransform
from monai_gradicon.losses import GradICONObjective, LNCCLoss, gaussian_blur, gaussian_kernel1d, local_ncc
from monai_gradicon.networks import UNet2, gradicon_network
from monai_gradicon.networks.cpu_kernels import (
    CropCatChannelsLast,
    conv3d_channels_last_input_grad,
    conv_transpose3d_k4s2p1_matmul,
    conv_transpose3d_k4s2p1_matmul_grads,
)
from tolerance import assert_f32_close


def conv_blur(x, sigma, kernel_size=None):
    """The reference's blur: depth-wise zero-padded 'same' convolutions along axes 2, 3, 4."""
    k = gaussian_kernel1d(sigma, kernel_size)
    dim = x.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    out = x
    for axis in range(dim):
        shape = [x.shape[1], 1] + [1] * dim
        shape[2 + axis] = k.numel()
        out = conv(out, k.view(shape[2:]).expand(shape), padding="same", groups=x.shape[1])
    return out


def random_net(num_steps, dim, seed=0, scale=0.3):
    torch.manual_seed(seed)
    net = gradicon_network(num_steps, dim)
    g = torch.Generator().manual_seed(seed + 1)
    for step in net.steps:
        w = step.unet.lastConv.weight
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=g) * scale / w[0].numel() ** 0.5)
    return net


def smooth_pair(shape, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((2 * batch, 1, *[max(s // 6, 2) for s in shape]), generator=g)
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    img = F.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    return img[:batch].contiguous(), img[batch:].contiguous()


@pytest.mark.parametrize(
    "shape,sigma,kernel_size",
    [((2, 3, 17), 2, None), ((1, 2, 9, 13), 1.5, None), ((1, 5, 20, 7, 11), 3, None), ((1, 1, 5, 30, 6), 5, None),
     ((1, 2, 12, 13, 14), 2, 4), ((2, 1, 8, 8, 8), 0.5, None)],
)
def test_matrix_blur_equals_depthwise_convolution(shape, sigma, kernel_size):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    ours = gaussian_blur(x, sigma, kernel_size)
    ref = conv_blur(x, sigma, kernel_size)
    assert ours.shape == ref.shape
    # a separable pass sums kernel_size products per axis in another order: a few roundings of values <= 1
    assert_f32_close(ours, ref, ulps=8)


def test_blur_gradient_is_the_adjoint():
    x = torch.rand(1, 2, 11, 12, 13, requires_grad=True)
    g = torch.rand(1, 2, 11, 12, 13)
    (gaussian_blur(x, 2) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (conv_blur(x2, 2) * g).sum().backward()
    assert_f32_close(x.grad, x2.grad, ulps=8)


def test_separable_matmul_with_rectangular_matrices():
    """Non-square per-axis matrices (what the field optimizer's blur + upsampling uses), one axis left alone, against
    a float64 einsum; a wrong count or a mismatched matrix is refused with the axis named."""
    from monai_gradicon.losses.similarity import separable_matmul

    g = torch.Generator().manual_seed(3)
    x = torch.rand((2, 3, 5, 6, 7), generator=g)
    m0, m2 = torch.rand((4, 5), generator=g), torch.rand((9, 7), generator=g)
    ours = separable_matmul(x, [m0, None, m2])
    expected = torch.einsum("ai,bcijk,dk->bcajd", m0.double(), x.double(), m2.double())
    assert ours.shape == (2, 3, 4, 6, 9)
    assert_f32_close(ours, expected, ulps=16)
    with pytest.raises(ValueError, match="one matrix \\(or None\\) per spatial axis"):
        separable_matmul(x, [m0, None])
    with pytest.raises(ValueError, match="the matrix of axis 2 must be \\[m, 7\\]"):
        separable_matmul(x, [m0, None, m0])


def test_lncc_gradient_path_equals_plain_path():
    """When only the warped image needs a gradient the target's moments are blurred apart; same values."""
    a, b = smooth_pair((20, 21, 22), seed=2)
    a = (a + 0.1 * torch.rand(a.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    with torch.no_grad():
        plain = local_ncc(a, b, 3.0)
    x = a.clone().requires_grad_(True)
    split = local_ncc(x, b, 3.0)
    assert torch.equal(split.detach(), plain)
    y = b.clone().requires_grad_(True)  # the other way round
    assert torch.equal(local_ncc(a, y, 3.0).detach(), plain)
    LNCCLoss(3.0)(x, b).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_chunked_sampling_equals_one_thread():
    """Batch-1 CPU sampling is cut into one piece per thread; values and point gradients are unchanged."""
    g = torch.Generator().manual_seed(4)
    field = torch.randn(1, 3, 20, 22, 24, generator=g)
    points = torch.rand(1, 3, 41, 37, 33, generator=g) * 1.3 - 0.15  # 50k points, not a multiple of the threads
    weights = torch.randn(1, 3, 41, 37, 33, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            f = field.clone().requires_grad_(True)
            p = points.clone().requires_grad_(True)
            out = maps.sample(f, p)
            (out * weights).sum().backward()
            results.append((out.detach(), f.grad, p.grad))
    finally:
        torch.set_num_threads(threads)
    (o1, f1, p1), (o3, f3, p3) = results
    assert torch.equal(o1, o3)
    assert torch.equal(p1, p3)
    # the field gradient accumulates one term per point landing in a cell, in another order with 3 threads
    assert_f32_close(f1, f3, ulps=64)


def test_channels_last_input_grad_conv_equals_plain_conv():
    conv = torch.nn.Conv3d(18, 3, 3, padding=1)
    x = torch.randn(1, 18, 15, 16, 17, requires_grad=True)
    y = conv3d_channels_last_input_grad(x, conv)
    assert y.is_contiguous()
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = (x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone())
    x.grad = None
    conv.zero_grad()
    y2 = conv(x)
    (y2 * g).sum().backward()
    assert torch.equal(y, y2)  # the forward pass is the plain convolution
    assert x.grad.is_contiguous() and grads[0].is_contiguous()
    # the input gradient sums 3 x 27 products per voxel in another order
    assert_f32_close(grads[0], x.grad, ulps=64)
    assert torch.equal(grads[1], conv.weight.grad) and torch.equal(grads[2], conv.bias.grad)


def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def _train_passes(nets, a, b):
    """One train-mode forward + backward of ``sum(out ** 2)`` per network on the same inputs: for each, (output,
    parameter gradients, gradient of ``a``, BatchNorm running state)."""
    a = a.detach().requires_grad_(True)
    outs = []
    for net in nets:
        net.train()
        a.grad = None
        out = net(a, b)
        (out**2).sum().backward()
        outs.append((out.detach(), [p.grad.clone() for p in net.parameters()], a.grad.clone(), _bn_state(net)))
    return outs


def test_unet_checkpointing_same_output_gradients_and_running_stats():
    torch.manual_seed(0)
    plain = UNet2(3)
    torch.nn.init.normal_(plain.lastConv.weight, std=1e-2)
    ckpt = UNet2(3, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    a, b = smooth_pair((20, 18, 19), batch=2, seed=5)
    (o0, g0, a0, s0), (o1, g1, a1, s1) = _train_passes((plain, ckpt), a, b)
    assert torch.equal(o0, o1)
    assert_f32_close(a0, a1, ulps=16)
    for x, y in zip(g0, g1):  # weight gradients sum over every voxel: a reduction of ~1e4 terms
        assert_f32_close(x, y, ulps=256)
    for k in s0:  # the running statistics were updated exactly once
        assert torch.equal(s0[k], s1[k]), k


def test_network_checkpointing_same_loss_gradients_and_running_stats():
    shape = (65, 66, 65)
    base = random_net(4, 3, seed=3)
    a, b = smooth_pair(shape, seed=6)
    noise = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(7))
    results = []
    for ckpt in (False, True):
        net = random_net(4, 3, seed=3)
        net.load_state_dict(base.state_dict())
        net.set_checkpointing(ckpt)
        assert net.checkpointing is ckpt
        objective = GradICONObjective(net, LNCCLoss(5)).train()
        out = objective(a, b, noise=noise)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in net.parameters()], _bn_state(net)))
    (l0, g0, s0), (l1, g1, s1) = results
    assert torch.equal(l0, l1)
    scale = max(float(g.abs().max()) for g in g0)
    assert max(float((x - y).abs().max()) for x, y in zip(g0, g1)) <= 1e-6 * scale
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


def test_checkpointing_is_inactive_without_grad_and_kept_by_with_final_step():
    net = random_net(3, 2, seed=1)
    net.set_checkpointing(True)
    assert net.with_final_step().checkpointing
    a, b = smooth_pair((70, 66), seed=2)
    with torch.no_grad():
        on = net(a, b).on_grid((70, 66))
    net.set_checkpointing(False)
    with torch.no_grad():
        off = net(a, b).on_grid((70, 66))
    assert torch.equal(on, off)


def test_bf16_mode_is_opt_in_and_close():
    shape = (65, 65, 65)
    net = random_net(4, 3, seed=4).eval()
    a, b = smooth_pair(shape, seed=8)
    with torch.inference_mode():
        ref = net(a, b).on_grid(shape)
        net.set_mixed_precision(torch.bfloat16)
        low = net(a, b).on_grid(shape)
        net.set_mixed_precision(None)
        back = net(a, b).on_grid(shape)
    assert low.dtype == torch.float32
    assert torch.equal(back, ref)
    deviation = float((low - ref).abs().max()) * (shape[0] - 1)
    displacement = float((ref - maps.identity_map(shape)).abs().max()) * (shape[0] - 1)
    print(f"bf16 max map deviation {deviation:.3f} voxels (largest displacement {displacement:.2f} voxels)")
    assert deviation < 0.25 * max(displacement, 1.0)  # a loose sanity bound; bench/RESULTS.md reports the numbers


@pytest.mark.slow
def test_compiled_unets_match_eager():
    pytest.importorskip("torch._inductor")
    net = random_net(1, 3, seed=5).eval()
    a, b = smooth_pair((20, 20, 20), seed=9)
    with torch.no_grad():
        eager = net(a, b).on_grid((20, 20, 20))
        net.compile_unets()
        try:
            compiled = net(a, b).on_grid((20, 20, 20))
        except Exception as exc:  # no working C++ toolchain for inductor here
            pytest.skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}"[:300])
    assert torch.allclose(compiled, eager, atol=1e-5)


@pytest.mark.parametrize("x_shape,skip_shape", [((2, 4, 8, 8, 8), (2, 2, 7, 8, 7)), ((1, 3, 6, 6, 6), (1, 2, 6, 6, 6))])
def test_crop_cat_channels_last_equals_crop_then_cat(x_shape, skip_shape):
    cl = torch.channels_last_3d
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g).contiguous(memory_format=cl).requires_grad_(True)
    skip = torch.randn(skip_shape, generator=g).contiguous(memory_format=cl).requires_grad_(True)
    out = CropCatChannelsLast.apply(x, skip)
    ref = torch.cat([x[:, :, : skip_shape[2], : skip_shape[3], : skip_shape[4]], skip], dim=1)
    assert torch.equal(out, ref) and out.is_contiguous(memory_format=cl)
    grad = torch.randn(out.shape, generator=g)
    gx, gs = torch.autograd.grad(out, (x, skip), grad)
    rx, rs = torch.autograd.grad(ref, (x, skip), grad)
    assert torch.equal(gx, rx) and torch.equal(gs, rs)  # including the zeros of the cropped-off border
    assert gx.is_contiguous(memory_format=cl) and gs.is_contiguous(memory_format=cl)


@pytest.mark.parametrize("levels", [1, 2, 5])
def test_recomputed_tail_same_output_gradients_and_running_stats(levels):
    """UNet2's recomputed top levels (the default when gradients are needed) change neither the output, nor the
    gradients, nor how often BatchNorm updates its running statistics; odd sizes exercise the crop."""
    torch.manual_seed(0)
    keep = UNet2(3, recompute_levels=0)
    torch.nn.init.normal_(keep.lastConv.weight, std=1e-2)
    tail = UNet2(3, recompute_levels=levels)
    tail.load_state_dict(keep.state_dict())
    a, b = smooth_pair((19, 21, 18), batch=2, seed=5)
    (o0, g0, a0, s0), (o1, g1, a1, s1) = _train_passes((keep, tail), a, b)
    assert torch.equal(o0, o1)
    assert torch.equal(a0, a1)
    for x, y in zip(g0, g1):
        assert torch.equal(x, y)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


def test_recompute_levels_is_validated():
    with pytest.raises(ValueError, match="recompute_levels"):
        UNet2(3, recompute_levels=6)


def test_recomputed_compositions_same_values_and_gradients():
    shape = (65, 65, 66)
    a, b = smooth_pair(shape, seed=2)
    noise = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(3))
    results = []
    for recompute in (False, True):
        net = random_net(4, 3, seed=4)
        net.set_recompute_compositions(recompute)
        out = GradICONObjective(net, LNCCLoss(5)).train()(a, b, noise=noise)
        out.loss.backward()
        results.append((out.loss.detach(), out.phi_ab.detach(), [p.grad.clone() for p in net.parameters()]))
    (l0, m0, g0), (l1, m1, g1) = results
    assert torch.equal(l0, l1) and torch.equal(m0, m1)
    for x, y in zip(g0, g1):
        assert torch.equal(x, y)


def test_channels_last_switch_is_respected():
    net = random_net(1, 3, seed=5)
    a, b = smooth_pair((20, 22, 21), seed=1)
    unet = net.steps[0].unet
    assert unet._runs_channels_last(a)  # automatic on CPU float32 3D
    net.set_channels_last(False)
    assert unet.channels_last is False and not unet._runs_channels_last(a)
    with torch.no_grad():
        exact = net(a, b).on_grid((20, 22, 21))
    net.set_channels_last(None)
    with torch.no_grad():
        fast = net(a, b).on_grid((20, 22, 21))
    # channels-last convolutions sum in another order: maps agree to float32 rounding of the coordinates
    assert_f32_close(exact, fast, ulps=16, scale=1.0)


def test_performance_switches_are_explicit_attributes():
    """Every switch is a plain attribute set in ``__init__`` (or the constructor) and changed by the named setters;
    the composition recomputation is per instance, not a class-level global."""
    unet = UNet2(3, down_channels=(4, 4, 4, 4, 4), up_channels=(4, 4, 4, 4, 4))
    assert unet.channels_last is None and unet.autocast_dtype is None and unet.compiled_body is None
    assert UNet2(2, channels_last=False, autocast_dtype=torch.bfloat16).autocast_dtype is torch.bfloat16
    net = gradicon_network(2, 2, down_channels=(4, 4, 4, 4, 4), up_channels=(4, 4, 4, 4, 4))
    unets = [step.unet for step in net.steps]
    net.set_channels_last(False)
    net.set_mixed_precision(torch.bfloat16)
    assert all(u.channels_last is False and u.autocast_dtype is torch.bfloat16 for u in unets)
    net.set_mixed_precision(None)
    assert all(u.autocast_dtype is None for u in unets)

    assert "recompute_in_backward" not in vars(ComposedTransform)
    fields = [torch.zeros(1, 2, 5, 5, requires_grad=True) for _ in range(2)]
    parts = [DisplacementTransform(f) for f in fields]
    assert not ComposedTransform(*parts)._recompute()
    assert not (parts[0] @ parts[1]).recompute_in_backward
    assert ComposedTransform(*parts, recompute_in_backward=True)._recompute()
    assert not net.recompute_compositions
    net.set_recompute_compositions(True)
    assert net.with_final_step().recompute_compositions
    a, b = smooth_pair((34, 33), seed=3)
    phi = net(a, b)
    assert isinstance(phi, ComposedTransform) and phi.recompute_in_backward
    net.set_recompute_compositions(False)
    assert not net(a, b).recompute_in_backward


def test_matmul_transposed_convolution_equals_conv_transpose3d():
    """The k4/s2/p1 transposed convolution as matrix products (CPU inference forward, training backward)."""
    g = torch.Generator().manual_seed(11)
    conv = torch.nn.ConvTranspose3d(24, 8, 4, 2, 1)
    x = torch.randn(2, 24, 5, 6, 7, generator=g, requires_grad=True)
    y = conv(x)
    grad = torch.randn(y.shape, generator=g)
    ref = torch.autograd.grad(y, (x, conv.weight, conv.bias), grad)
    with torch.no_grad():
        ours = conv_transpose3d_k4s2p1_matmul(x, conv.weight, conv.bias)
    # each output sums up to 24 x 8 products (and the bias) in another order (~3 rounding steps measured)
    assert_f32_close(ours, y, ulps=32, what="forward")
    gx, gw, gb = conv_transpose3d_k4s2p1_matmul_grads(x.detach(), conv.weight.detach(), grad, True, True, True)
    for name, a, r in (("input", gx, ref[0]), ("weight", gw, ref[1]), ("bias", gb, ref[2])):
        # the weight and bias gradients sum one term per voxel (2 x 210 input, 2 x 1680 output voxels; <= 13
        # rounding steps measured)
        assert_f32_close(a, r, ulps=128, what=f"{name} gradient")


def test_compiled_body_is_an_explicit_switch():
    """``compile_body`` sets ``compiled_body``; the forward pass then runs it (same values; the ``eager`` backend
    traces with dynamo and needs no C++ compiler) and recomputes no tail around it."""
    pytest.importorskip("torch._dynamo")
    torch.manual_seed(0)
    unet = UNet2(3, down_channels=(4, 8, 8, 16, 16), up_channels=(4, 8, 8, 8, 16)).eval()
    torch.nn.init.normal_(unet.lastConv.weight, std=1e-2)
    a, b = smooth_pair((20, 21, 22), seed=4)
    with torch.no_grad():
        # the eager layers the compiled body replaces (plain inference takes the lean top level instead: rounding)
        eager = unet._last_conv(unet._body_eager(torch.cat([a, b], dim=1))) / 10
        assert_f32_close(unet(a, b), eager, ulps=64)
    unet.compile_body(backend="eager")
    assert unet.compiled_body is not None
    with torch.no_grad():
        assert torch.equal(unet(a, b), eager)
    assert unet._tail_levels(a.clone().requires_grad_(True)) == 0


@pytest.mark.parametrize("rows", [1, 3, 8, 100])
def test_slab_upsampling_equals_the_whole_interpolation(rows):
    """upsample2_add_ adds interpolate(low, x2) slab by slab: bit for bit the whole-tensor sum, any slab size."""
    from monai_gradicon.networks.cpu_kernels import CHANNELS_LAST
    from monai_gradicon.networks.unet2 import upsample2_add_

    g = torch.Generator().manual_seed(0)
    low = torch.randn((2, 3, 9, 6, 5), generator=g).contiguous(memory_format=CHANNELS_LAST)
    y = torch.randn((2, 3, 18, 12, 10), generator=g).contiguous(memory_format=CHANNELS_LAST)
    expected = y + F.interpolate(low, scale_factor=2, mode="trilinear", align_corners=False)
    assert torch.equal(upsample2_add_(y.clone(memory_format=CHANNELS_LAST), low, rows), expected)
    with pytest.raises(ValueError, match="twice"):
        upsample2_add_(y[:, :, :17], low)


@pytest.mark.parametrize("shape", [(19, 21, 23), (24, 24, 24)])
def test_lean_inference_top_level_agrees_with_the_layer_by_layer_path(shape):
    """Channels-last inference runs up level 0 and the last convolution lean (in-place LeakyReLU and BatchNorm,
    slab-wise upsampling, the last convolution as two halves without the concatenation): the same values as the
    layer-by-layer channels-last path to float32 rounding, odd sizes (the crop) included; training mode or gradients
    take the layer-by-layer path."""
    torch.manual_seed(1)
    unet = UNet2(3, down_channels=(4, 8, 8, 16, 16), up_channels=(4, 8, 8, 8, 16)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(std=0.2)
        for bn in unet.batchNorms:
            bn.running_mean.normal_(std=0.1)
            bn.running_var.uniform_(0.5, 1.5)
    a, b = smooth_pair(shape, seed=2)
    x = torch.cat([a, b], dim=1)
    assert not unet._lean_inference(x)  # gradients enabled
    with torch.no_grad():
        assert unet._lean_inference(x) and not unet._lean_inference(x.double())
        lean = unet(a, b)
        layered = unet._last_conv(unet._body_eager(x)) / 10
    assert lean.shape == (1, 3, *shape) and lean.is_contiguous()
    assert lean.abs().max() > 1e-2
    assert_f32_close(lean, layered, ulps=64)
    unet.train()
    with torch.no_grad():
        assert not unet._lean_inference(x)
