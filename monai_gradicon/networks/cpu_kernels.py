"""CPU kernels behind :class:`~monai_gradicon.networks.unet2.UNet2`'s layers: the same convolutions and
concatenations, computed by routes that are faster (or keep less memory) on CPU.

Every function here computes exactly the operation its name and docstring give -- the layer of the reference's
``tallUNet2`` it stands for -- and says how close its numbers are to PyTorch's plain operation:

* **bit-identical**: the same float32 operations in the same order (same values and gradients);
* **float32 rounding**: the same sums in another order (another oneDNN kernel or a matrix product), so the values
  differ by a few float32 rounding steps at the magnitude of the result, as two BLAS libraries would.

Why they are faster, in short: oneDNN's default-layout CPU kernels are slow for convolutions with few output
channels (UNet2's full- and half-resolution layers) and its channels-last kernels are 2-4x faster there; and the
small deep transposed convolutions spend their time reordering large weights rather than computing, which one
matrix product avoids. Which route a layer takes is decided by :func:`leaky_conv` and :func:`output_conv` from the
layer, the tensor (device, dtype, layout, size), the grad mode and the ``channels_last`` flag UNet2 passes in; UNet2
itself decides *where* channels-last is used (its switch ``channels_last``).

Tensor shapes: ``[B, C, D, H, W]`` (3D) unless a function says otherwise; "channels-last" is
``torch.channels_last_3d`` (strides ordered C, W, H, D, B from fastest to slowest).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CHANNELS_LAST",
    "MATMUL_CT_MAX_VOXELS",
    "is_channels_last_3d",
    "apply_conv",
    "layout_conv",
    "leaky_conv",
    "output_conv",
    "LeakyConv",
    "ConvChannelsLastInputGrad",
    "conv3d_channels_last_input_grad",
    "use_matmul_conv_transpose",
    "conv_transpose3d_k4s2p1_matmul",
    "conv_transpose3d_k4s2p1_matmul_grads",
    "CropCatChannelsLast",
    "crop_cat_channels_last",
]

CHANNELS_LAST = torch.channels_last_3d
"""The channels-last memory format of 5D tensors."""

MATMUL_CT_MAX_VOXELS = 1728
"""Input volume per batch element (12³) up to which a k4/s2/p1 transposed convolution is computed by
:func:`conv_transpose3d_k4s2p1_matmul` and :func:`conv_transpose3d_k4s2p1_matmul_grads`."""


def is_channels_last_3d(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 5D tensor laid out channels-last (and not also plain contiguous, as a 1-voxel one is)."""
    return x.ndim == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=CHANNELS_LAST)


# ------------------------------------------------------------------------------------------------ plain convolutions
def apply_conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s operation (its stride, padding, ...) on ``x`` with the given ``weight`` and ``bias`` (typically
    ``conv``'s own parameters in another memory layout). Bit-identical to ``conv(x)`` when the weight is ``conv``'s
    in the same layout; oneDNN picks its kernel from the layouts of ``x`` and ``weight``, so another layout gives
    values that agree to float32 rounding."""
    if isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        fn = F.conv_transpose3d if isinstance(conv, nn.ConvTranspose3d) else F.conv_transpose2d
        return fn(x, weight, bias, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation)
    fn = F.conv3d if isinstance(conv, nn.Conv3d) else F.conv2d
    return fn(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def layout_conv(conv: nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``conv(x)`` in the requested layout.

    ``channels_last=False``: ``conv(x.contiguous())``, bit-identical to the reference. ``True`` (``x`` channels-last,
    3D): the convolution with a channels-last copy of the weight, so oneDNN runs its channels-last kernel (2-4x faster
    for few output channels, forward and backward) and returns a channels-last result; values agree with the plain
    convolution to float32 rounding (another summation order).
    """
    if not channels_last:
        return conv(x.contiguous())
    # oneDNN picks its channels-last kernels when the weight is channels-last too
    return apply_conv(conv, x, conv.weight.contiguous(memory_format=CHANNELS_LAST), conv.bias)


# ------------------------------------------------------------------------------------ LeakyReLU + convolution, lean
class LeakyConv(torch.autograd.Function):
    """``conv(leaky_relu(x))`` (any Conv/ConvTranspose 2D/3D module ``conv``, with ``weight``/``bias`` as passed)
    that keeps only ``x`` and the weight for the backward pass.

    Plain autograd of the two ops keeps both ``x`` and ``leaky_relu(x)``; here the activation is recomputed in the
    backward pass (exactly and cheaply), which saves one activation tensor per layer in training. The forward ops
    are the same as the plain ones, and the backward pass calls ``aten.convolution_backward`` and
    ``aten.leaky_relu_backward`` as autograd would, with the output gradient in the layout of ``x``: the same values
    as autograd of ``conv(leaky_relu(x))`` (bit-identical output and gradients in our CPU checks, default and
    channels-last layouts; the tests compare UNet2 with and without recomputation bit for bit).

    ``matmul_backward=True`` (a k4/s2/p1 3D transposed convolution, see :func:`use_matmul_conv_transpose`): the
    gradients come from :func:`conv_transpose3d_k4s2p1_matmul_grads` instead; they agree with the plain ones to
    float32 rounding (the forward pass is still the plain, bit-identical one).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv: nn.Module, matmul_backward: bool):
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        ctx.has_bias = bias is not None
        ctx.matmul_backward = matmul_backward
        return apply_conv(conv, F.leaky_relu(x), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        conv = ctx.conv
        h = F.leaky_relu(x)
        need_x = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.matmul_backward:
            gh, gw, gb = conv_transpose3d_k4s2p1_matmul_grads(h, weight, grad, need_x, need_w, need_b)
        else:
            transposed = isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))
            out_channels = weight.shape[1] * conv.groups if transposed else weight.shape[0]
            layout = CHANNELS_LAST if is_channels_last_3d(x) else torch.contiguous_format
            gh, gw, gb = torch.ops.aten.convolution_backward(
                grad.contiguous(memory_format=layout), h, weight, [out_channels] if ctx.has_bias else None,
                list(conv.stride), list(conv.padding), list(conv.dilation), transposed,
                list(conv.output_padding) if transposed else [0] * (x.ndim - 2), conv.groups, [need_x, need_w, need_b],
            )
        gx = torch.ops.aten.leaky_relu_backward(gh, x, 0.01, False) if need_x else None
        return gx, gw, gb, None, None


def leaky_conv(conv: nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``conv(leaky_relu(x))`` -- UNet2's down and up layers -- by the fastest route that computes it:

    * gradients recorded (training, instance optimization; not under autocast): :class:`LeakyConv` (leaner saved
      state), channels-last when ``channels_last`` (float32 rounding), else in the default layout (bit-identical)
      with the matrix-product backward for small k4/s2/p1 transposed convolutions (gradients to float32 rounding);
    * CPU inference (no grad, eval mode) of a small k4/s2/p1 transposed convolution:
      :func:`conv_transpose3d_k4s2p1_matmul` (float32 rounding);
    * otherwise the plain ops, in the layout ``channels_last`` asks for (:func:`layout_conv`).
    """
    matmul_ct = use_matmul_conv_transpose(conv, x)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
    if needs_grad and not torch.is_autocast_enabled(x.device.type):
        if channels_last:
            weight = conv.weight.contiguous(memory_format=CHANNELS_LAST)
            return LeakyConv.apply(x.contiguous(memory_format=CHANNELS_LAST), weight, conv.bias, conv, False)
        return LeakyConv.apply(x.contiguous(), conv.weight, conv.bias, conv, matmul_ct)
    if matmul_ct and not conv.training and not torch.is_grad_enabled():
        return conv_transpose3d_k4s2p1_matmul(F.leaky_relu(x).contiguous(), conv.weight, conv.bias)
    return layout_conv(conv, F.leaky_relu(x), channels_last)


# --------------------------------------------------------------------- last convolution: channels-last input grad
class ConvChannelsLastInputGrad(torch.autograd.Function):
    """A 3D convolution ``F.conv3d(x, weight, bias, stride, padding, dilation, groups)`` whose forward pass and
    weight/bias gradients are the plain ones (bit-identical) and whose input gradient is computed by oneDNN's
    channels-last kernel (float32 rounding), then returned in the default layout."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        bias_sizes = [weight.shape[0]] if has_bias else None
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # the input only lends its shape and layout to the input gradient: an uninitialised channels-last tensor
            gx = torch.ops.aten.convolution_backward(
                grad.contiguous(memory_format=CHANNELS_LAST), torch.empty_like(x, memory_format=CHANNELS_LAST),
                weight.contiguous(memory_format=CHANNELS_LAST), bias_sizes, stride, padding, dilation, False,
                [0, 0, 0], groups, [True, False, False],
            )[0].contiguous()
        if ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2]):
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0, 0], groups,
                [False, ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]],
            )
        return gx, gw, gb, None, None, None, None


def conv3d_channels_last_input_grad(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(x)`` (``x`` ``[B, Cin, *S]`` in the default layout) whose input gradient is computed channels-last.

    On CPU, oneDNN's default-layout kernels are slow for convolutions with few output channels (UNet2's last layer:
    18 -> 3 at full resolution); its channels-last kernel computes the input gradient about four times faster. The
    forward pass and the weight gradient are the plain ones, so maps stay bit-identical to the reference and the
    weight gradient is the reference's; the input gradient agrees with it to float32 rounding.
    """
    stride, padding, dilation = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))
    return ConvChannelsLastInputGrad.apply(x, conv.weight, conv.bias, stride, padding, dilation, conv.groups)


def output_conv(conv: nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``conv(x)`` for UNet2's last convolution (few output channels at full resolution), default-layout result:

    * ``channels_last``: :func:`layout_conv` channels-last, forward and backward (float32 rounding);
    * else, a 3D float32 CPU input that needs a gradient: :func:`conv3d_channels_last_input_grad` (bit-identical
      output and weight gradient, input gradient to float32 rounding);
    * else ``conv(x)``.
    """
    if channels_last:
        return layout_conv(conv, x.contiguous(memory_format=CHANNELS_LAST), True).contiguous()
    if (
        isinstance(conv, nn.Conv3d)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.is_grad_enabled()
        and x.requires_grad
        and isinstance(conv.padding, tuple)  # not padding="same"/"valid"
    ):
        return conv3d_channels_last_input_grad(x, conv)
    return conv(x)


# ------------------------------------------------------------------------- small transposed convs as matrix products
# UNet2's deep up-convolutions (k4, s2, p1; 512 input channels at 3-12 voxels per axis) are dominated by oneDNN
# reordering their large weights on every call, not by arithmetic. As one matrix product plus 64 strided adds they
# cost a fraction. Training keeps oneDNN's forward (bit-identical maps) and uses the products for the backward
# pass; CPU inference uses them for the forward pass too.
def use_matmul_conv_transpose(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv`` on ``x`` can and should be computed by the matrix-product kernels: a 3D transposed
    convolution with kernel 4, stride 2, padding 1 (no output padding, dilation or groups) on a float32 CPU input of
    at most :data:`MATMUL_CT_MAX_VOXELS` voxels per channel."""
    return (
        isinstance(conv, nn.ConvTranspose3d)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and tuple(conv.kernel_size) == (4, 4, 4)
        and tuple(conv.stride) == (2, 2, 2)
        and tuple(conv.padding) == (1, 1, 1)
        and tuple(conv.output_padding) == (0, 0, 0)
        and tuple(conv.dilation) == (1, 1, 1)
        and conv.groups == 1
        and x[0, 0].numel() <= MATMUL_CT_MAX_VOXELS
    )


def _ct_taps(n: Sequence[int]) -> Iterator[tuple[int, tuple[slice, slice, slice]]]:
    """``(tap, slices)`` for the 64 kernel taps ``tap = 16 a + 4 b + c``: the slices of the output padded by one
    voxel per side that input voxel ``i`` reaches through that tap (index ``2 i + a``, ``2 i + b``, ``2 i + c``)."""
    for a in range(4):
        for b in range(4):
            for c in range(4):
                slices = (slice(a, a + 2 * n[0], 2), slice(b, b + 2 * n[1], 2), slice(c, c + 2 * n[2], 2))
                yield a * 16 + b * 4 + c, slices


def conv_transpose3d_k4s2p1_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv_transpose3d(x, weight, bias, stride=2, padding=1)`` for a 4³ kernel, as one matrix product and 64
    strided adds.

    ``x`` ``[B, Cin, *n]``, ``weight`` ``[Cin, Cout, 4, 4, 4]``, ``bias`` ``[Cout]`` -> ``[B, Cout, *(2 n)]``. The
    product ``weight^T x`` gives every tap's contribution ``[Cout * 64, B * n³]`` at once; each tap's block is added
    into the output at stride 2, and the one-voxel border that padding 1 removes is cropped. Values agree with
    oneDNN's to float32 rounding (another summation order).
    """
    bsz, cin, *n = x.shape
    cout = weight.shape[1]
    cols = weight.reshape(cin, cout * 64).t() @ x.transpose(0, 1).reshape(cin, -1)  # [cout*64, B*n³]
    cols = cols.view(cout, 64, bsz, *n).permute(2, 1, 0, 3, 4, 5)  # [B, 64, cout, *n]
    out = x.new_zeros((bsz, cout, *[2 * k + 2 for k in n]))
    for tap, (sa, sb, sc) in _ct_taps(n):
        out[:, :, sa, sb, sc] += cols[:, tap]
    out = out[:, :, 1 : 1 + 2 * n[0], 1 : 1 + 2 * n[1], 1 : 1 + 2 * n[2]]
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out


def conv_transpose3d_k4s2p1_matmul_grads(
    x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, need_x: bool, need_w: bool, need_b: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(d/dx, d/dweight, d/dbias)`` of ``F.conv_transpose3d(x, weight, bias, stride=2, padding=1)``
    (4³ kernel) for the output gradient ``grad`` ``[B, Cout, *(2 n)]``, as matrix products (``None`` where not
    needed).

    The forward's scatter is transposed into a gather: ``cols[(Cout, tap), (B, i)]`` is ``grad`` at output
    ``2 i - 1 + tap``; then ``d/dx = weight cols`` and ``d/dweight = x cols^T``. Values agree with
    ``aten.convolution_backward``'s to float32 rounding (another summation order).
    """
    bsz, cin, *n = x.shape
    cout = weight.shape[1]
    padded = F.pad(grad, (1, 1, 1, 1, 1, 1))
    cols = torch.stack([padded[:, :, sa, sb, sc] for _, (sa, sb, sc) in _ct_taps(n)], dim=2)  # [B, co, 64, *n]
    cols = cols.permute(1, 2, 0, 3, 4, 5).reshape(cout * 64, -1)
    gx = gw = gb = None
    if need_x:
        gx = (weight.reshape(cin, cout * 64) @ cols).view(cin, bsz, *n).transpose(0, 1).contiguous()
    if need_w:
        gw = (x.transpose(0, 1).reshape(cin, -1) @ cols.t()).view_as(weight)
    if need_b:
        gb = grad.sum((0, 2, 3, 4))
    return gx, gw, gb


# --------------------------------------------------------------------------------- crop + skip concatenation
class CropCatChannelsLast(torch.autograd.Function):
    """``cat([x[:, :, :S0, :S1, :S2], skip], dim=1)`` for channels-last 3D tensors (``x`` ``[B, C, *S_x]``, ``skip``
    ``[B, c, *S]`` with ``S <= S_x``), with a channels-last ``[B, C + c, *S]`` result and channels-last gradients.

    ``torch.cat`` of a cropped channels-last view returns the default layout (a slow strided write, then a second copy
    for the channels-last convolution that reads it), and autograd's crop backward fills one full-size zero tensor
    per cropped axis. Here the concatenation is one contiguous copy along the channel axis (the last in memory) and
    the backward writes the gradient once, zeroing only the cropped-off border. Bit-identical values and gradients
    (copies only).
    """

    @staticmethod
    def forward(ctx, x, skip):
        ctx.x_shape = x.shape
        ctx.channels = x.shape[1]
        return _crop_cat_values(x, skip)

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous(memory_format=CHANNELS_LAST).permute(0, 2, 3, 4, 1)  # [B, *S, C + c]
        c = ctx.channels
        gx = g.new_empty((ctx.x_shape[0], *ctx.x_shape[2:], c))  # [B, *S_x, C]
        spatial = g.shape[1:4]
        gx[:, : spatial[0], : spatial[1], : spatial[2]] = g[..., :c]
        # zero the border the crop removed (the up-convolution's extra row/column/slice for odd sizes)
        if spatial[0] < gx.shape[1]:
            gx[:, spatial[0] :].zero_()
        if spatial[1] < gx.shape[2]:
            gx[:, : spatial[0], spatial[1] :].zero_()
        if spatial[2] < gx.shape[3]:
            gx[:, : spatial[0], : spatial[1], spatial[2] :].zero_()
        gskip = g[..., c:].contiguous()
        return gx.permute(0, 4, 1, 2, 3), gskip.permute(0, 4, 1, 2, 3)


def _crop_cat_values(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """The values of :class:`CropCatChannelsLast` with plain differentiable ops (channels-last result)."""
    crop = x[(slice(None), slice(None), *[slice(0, n) for n in skip.shape[2:]])]
    out = torch.cat([crop.permute(0, 2, 3, 4, 1), skip.permute(0, 2, 3, 4, 1)], dim=-1)
    return out.permute(0, 4, 1, 2, 3)


def crop_cat_channels_last(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``cat([x cropped to skip's spatial size, skip], dim=1)`` with a channels-last result:
    :class:`CropCatChannelsLast` when a gradient is recorded, the same values by plain differentiable ops otherwise or
    while tracing (TorchScript export). Bit-identical to the plain crop and ``torch.cat``."""
    if torch.is_grad_enabled() and (x.requires_grad or skip.requires_grad) and not torch.jit.is_tracing():
        return CropCatChannelsLast.apply(x, skip)
    return _crop_cat_values(x, skip)
