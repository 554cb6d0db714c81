"""The UNet2 backbone of GradICON (the reference's ``tallUNet2``), layer for layer.

Structure (3D channel counts, ``c`` = channels per image):

* down path, level d = 0..4: ``skip_d = x``; ``y = Conv(k3, s2, p1)(LeakyReLU(x))``;
  ``x = y + match_channels(avg_pool(x, 2, ceil_mode=True))``. Convs 2c->16->32->64->256->512. No normalization.
* up path, level d = 4..0: ``y = ConvTranspose(k4, s2, p1)(LeakyReLU(x))``;
  ``x = BatchNorm_d(y + interpolate(match_channels(x), x2, (tri)linear, align_corners=False))``;
  crop to ``skip_d``'s size (leading indices); ``x = cat(x, skip_d)``. Up convs 48->16, 96->32, 192->64, 512->128,
  512->256 (index d); BatchNorm only here.
* output: ``Conv(k3, p1)(x) / 10`` (18 -> dim channels), zero-initialised, no activation.

``match_channels`` keeps the first channels when there are too many and pads zeros at the *front* of the channel
axis when there are too few. Parameter names (``downConvs``, ``upConvs``, ``batchNorms``, ``lastConv``) follow the
released weight files so a state dict maps one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_gradicon.recompute import checkpoint_call, is_checkpointed, is_recomputing

__all__ = ["UNet2", "match_channels", "unet2_min_size", "checkpoint_call", "is_checkpointed", "is_recomputing"]

DOWN_CHANNELS = (16, 32, 64, 256, 512)
UP_CHANNELS = (16, 32, 64, 128, 256)


def unet2_min_size(num_levels: int = 5) -> int:
    """Smallest spatial size a UNet2 with ``num_levels`` levels accepts on every axis (17 for 5 levels)."""
    return 2 ** (num_levels - 1) + 1


_CHANNELS_LAST_LEVELS = 3  # levels 0-2 of the CPU inference path run channels-last


class _ConvChannelsLastInputGrad(torch.autograd.Function):
    """A 3D convolution: plain ``F.conv3d`` forward and weight gradient, input gradient in the channels-last layout."""

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
            cl = torch.channels_last_3d
            # the input only lends its shape and layout to the input gradient: an uninitialised channels-last tensor
            gx = torch.ops.aten.convolution_backward(
                grad.contiguous(memory_format=cl), torch.empty_like(x, memory_format=cl),
                weight.contiguous(memory_format=cl), bias_sizes, stride, padding, dilation, False, [0, 0, 0], groups,
                [True, False, False],
            )[0].contiguous()
        if ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2]):
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0, 0], groups,
                [False, ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]],
            )
        return gx, gw, gb, None, None, None, None


def conv3d_channels_last_input_grad(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv(x)`` whose input gradient is computed in the channels-last layout.

    On CPU, oneDNN's default-layout kernels are slow for convolutions with few output channels (UNet2's last layer:
    18 -> 3 at full resolution); its channels-last kernel computes the input gradient about four times faster. The
    forward pass and the weight gradient are the plain ones, so maps stay bit-identical to the reference and the
    weight gradient is the reference's; the input gradient agrees with it to float32 rounding.
    """
    stride, padding, dilation = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))
    return _ConvChannelsLastInputGrad.apply(x, conv.weight, conv.bias, stride, padding, dilation, conv.groups)


# ----------------------------------------------------------------------------------------- small transposed convs
# UNet2's deep up-convolutions (k4, s2, p1; 512 input channels at 3-12 voxels per axis) are dominated by oneDNN
# reordering their large weights on every call, not by arithmetic. As one matrix product plus 64 strided adds they
# cost a fraction. Training keeps oneDNN's forward (bit-identical maps) and uses the products for the backward
# pass; CPU inference uses them for the forward pass too.
_MATMUL_CT_MAX_VOXELS = 1728  # input volume (per batch element) up to which the products are used (12³)


def _use_matmul_conv_transpose(conv: nn.Module, x: torch.Tensor) -> bool:
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
        and x[0, 0].numel() <= _MATMUL_CT_MAX_VOXELS
    )


def _ct_taps(n: Sequence[int]):
    """(a, b, c, slices) for the 64 taps: output (padded by 1) index 2 i + tap along each axis."""
    for a in range(4):
        for b in range(4):
            for c in range(4):
                yield a * 16 + b * 4 + c, (slice(a, a + 2 * n[0], 2), slice(b, b + 2 * n[1], 2), slice(c, c + 2 * n[2], 2))


def conv_transpose3d_k4s2p1_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv_transpose3d(x, weight, bias, stride=2, padding=1)`` for a 4³ kernel as a matrix product and 64
    strided adds (float32 rounding differences)."""
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


def _ct_matmul_grads(x, weight, grad, need_x: bool, need_w: bool, need_b: bool):
    """Gradients of ``F.conv_transpose3d(x, weight, bias, stride=2, padding=1)`` (4³ kernel) as matrix products."""
    bsz, cin, *n = x.shape
    cout = weight.shape[1]
    padded = F.pad(grad, (1, 1, 1, 1, 1, 1))
    # cols[(cout, tap), (B, i)] = grad at output 2 i - 1 + tap: the transpose of the forward's scatter
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


class _LeakyConv(torch.autograd.Function):
    """``conv(leaky_relu(x))`` keeping only ``x`` (and the weight) for the backward pass, where the activation is
    recomputed (exactly, and cheaply); the two separate ops would keep both ``x`` and ``leaky_relu(x)``. The forward
    ops are the same, so the same numbers; less activation memory in training. ``matmul_backward`` computes the
    gradients of a small 4³/stride-2 transposed convolution as matrix products (see above)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv: nn.Module, matmul_backward: bool):
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        ctx.has_bias = bias is not None
        ctx.matmul_backward = matmul_backward
        return _apply_conv(conv, F.leaky_relu(x), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        conv = ctx.conv
        h = F.leaky_relu(x)
        need_x = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.matmul_backward:
            gh, gw, gb = _ct_matmul_grads(h, weight, grad, need_x, need_w, need_b)
        else:
            transposed = isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))
            out_channels = weight.shape[1] * conv.groups if transposed else weight.shape[0]
            layout = torch.channels_last_3d if _is_channels_last(x) else torch.contiguous_format
            gh, gw, gb = torch.ops.aten.convolution_backward(
                grad.contiguous(memory_format=layout), h, weight, [out_channels] if ctx.has_bias else None,
                list(conv.stride), list(conv.padding), list(conv.dilation), transposed,
                list(conv.output_padding) if transposed else [0] * (x.ndim - 2), conv.groups, [need_x, need_w, need_b],
            )
        gx = torch.ops.aten.leaky_relu_backward(gh, x, 0.01, False) if need_x else None
        return gx, gw, gb, None, None


def _apply_conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        fn = F.conv_transpose3d if isinstance(conv, nn.ConvTranspose3d) else F.conv_transpose2d
        return fn(x, weight, bias, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation)
    fn = F.conv3d if isinstance(conv, nn.Conv3d) else F.conv2d
    return fn(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _CropCatChannelsLast(torch.autograd.Function):
    """``cat([x[:, :, :S0, :S1, :S2], skip], dim=1)`` for channels-last 3D tensors, with a channels-last result and
    channels-last gradients.

    ``torch.cat`` of a cropped channels-last view returns the default layout (a slow strided write, then a second copy
    for the channels-last convolution that reads it), and autograd's crop backward fills one full-size zero tensor
    per cropped axis. Here the concatenation is one contiguous copy along the channel axis (the last in memory) and
    the backward writes the gradient once, zeroing only the cropped-off border. Same values.
    """

    @staticmethod
    def forward(ctx, x, skip):
        ctx.x_shape = x.shape
        ctx.channels = x.shape[1]
        return _crop_cat_channels_last_values(x, skip)

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1)  # [B, *S, C + c]
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


def _crop_cat_channels_last_values(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    crop = x[(slice(None), slice(None), *[slice(0, n) for n in skip.shape[2:]])]
    out = torch.cat([crop.permute(0, 2, 3, 4, 1), skip.permute(0, 2, 3, 4, 1)], dim=-1)
    return out.permute(0, 4, 1, 2, 3)


def crop_cat_channels_last(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``cat([x cropped to skip's spatial size, skip], dim=1)``, channels-last result (see ``_CropCatChannelsLast``);
    plain differentiable ops when no gradient is recorded or while tracing (TorchScript export)."""
    if torch.is_grad_enabled() and (x.requires_grad or skip.requires_grad) and not torch.jit.is_tracing():
        return _CropCatChannelsLast.apply(x, skip)
    return _crop_cat_channels_last_values(x, skip)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.ndim == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x`` ``[B, C, *S]``, or zero-pad at the front up to ``channels``."""
    if x.shape[1] >= channels:
        return x[:, :channels]
    pad = x.new_zeros((x.shape[0], channels - x.shape[1], *x.shape[2:]))
    if _is_channels_last(x):
        pad = pad.contiguous(memory_format=torch.channels_last_3d)
    return torch.cat([pad, x], dim=1)


class UNet2(nn.Module):
    """GradICON's U-Net: ``forward(moving [B, c, *S], fixed [B, c, *S]) -> displacement [B, dim, *S]``.

    The displacement is in normalized [0, 1] coordinate units (the network's last layer is divided by 10).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels per image (1 for the released models); the network sees ``2 * in_channels``.
        down_channels: output channels of the five down convolutions.
        up_channels: output channels of the five up convolutions (and BatchNorm features).
        checkpointing: keep none of the UNet's activations for the backward pass and recompute them there (less
            memory, one more forward pass of time, identical numbers; BatchNorm statistics are updated once).
        recompute_levels: when gradients are needed (and ``checkpointing`` is off), the last ``recompute_levels``
            levels of the up path and the last convolution -- the full- and half-resolution layers that hold most of
            the activation memory but little of the arithmetic -- keep only their inputs for the backward pass and
            are recomputed there. Identical numbers; at 175³ this saves about 0.9 GB per UNet call for a few percent
            more time. 0 keeps every activation, as the reference does.
        channels_last: run the high-resolution levels in the channels-last layout (oneDNN's fast kernels on CPU).
            ``None`` (default): on for 3D float32 CPU tensors. Summation order changes, so values agree with the
            reference to float32 rounding instead of bit for bit; ``False`` gives the reference's exact operations.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        down_channels: Sequence[int] = DOWN_CHANNELS,
        up_channels: Sequence[int] = UP_CHANNELS,
        checkpointing: bool = False,
        recompute_levels: int = 2,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"UNet2 supports spatial_dims 2 or 3, got {spatial_dims}.")
        if len(down_channels) != len(up_channels):
            raise ValueError("down_channels and up_channels must have the same length.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_levels = len(down_channels)
        self.checkpointing = checkpointing
        if not 0 <= int(recompute_levels) <= len(down_channels):
            raise ValueError(f"recompute_levels must be in [0, {len(down_channels)}], got {recompute_levels}.")
        self.recompute_levels = int(recompute_levels)
        self.channels_last = channels_last
        self.autocast_dtype: torch.dtype | None = None  # opt-in mixed precision of the body (see _forward)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        conv_t = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
        self._pool = F.avg_pool3d if spatial_dims == 3 else F.avg_pool2d
        self._interp_mode = "trilinear" if spatial_dims == 3 else "bilinear"

        down_in = [2 * in_channels, *down_channels[:-1]]
        # up conv d reads the level-d bottom output plus the skip concatenated at level d + 1
        up_in = [down_channels[d] + (up_channels[d + 1] if d + 1 < self.num_levels else 0) for d in range(self.num_levels)]
        self.downConvs = nn.ModuleList(
            [conv(down_in[d], down_channels[d], kernel_size=3, stride=2, padding=1) for d in range(self.num_levels)]
        )
        self.upConvs = nn.ModuleList(
            [conv_t(up_in[d], up_channels[d], kernel_size=4, stride=2, padding=1) for d in range(self.num_levels)]
        )
        self.batchNorms = nn.ModuleList([norm(up_channels[d]) for d in range(self.num_levels)])
        self.lastConv = conv(down_in[0] + up_channels[0], spatial_dims, kernel_size=3, padding=1)
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)

    @property
    def min_size(self) -> int:
        return unet2_min_size(self.num_levels)

    def _down(self, d: int, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        y = self._leaky_conv(self.downConvs[d], x, channels_last)
        return y + match_channels(self._pool(x, 2, ceil_mode=True), y.shape[1])

    def _up(self, d: int, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        y = self._leaky_conv(self.upConvs[d], x, channels_last)
        low = match_channels(x, y.shape[1])
        if channels_last:  # a channel slice of a channels-last tensor would take the slow strided upsampling path
            low = low.contiguous(memory_format=torch.channels_last_3d)
        # y is a fresh convolution output that no backward needs: summing into it saves a full-resolution buffer
        return y.add_(F.interpolate(low, scale_factor=2, mode=self._interp_mode, align_corners=False))

    def _leaky_conv(self, conv: nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """``conv(leaky_relu(x))``, by the fastest route that gives the reference's numbers (see the helpers)."""
        matmul_ct = _use_matmul_conv_transpose(conv, x)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)
        if needs_grad and not torch.is_autocast_enabled(x.device.type):  # training / IO: leaner saved state
            if channels_last:
                weight = conv.weight.contiguous(memory_format=torch.channels_last_3d)
                x = x.contiguous(memory_format=torch.channels_last_3d)
                return _LeakyConv.apply(x, weight, conv.bias, conv, False)
            return _LeakyConv.apply(x.contiguous(), conv.weight, conv.bias, conv, matmul_ct)
        if matmul_ct and not conv.training and not torch.is_grad_enabled():  # CPU inference
            return conv_transpose3d_k4s2p1_matmul(F.leaky_relu(x).contiguous(), conv.weight, conv.bias)
        return self._conv(conv, F.leaky_relu(x), channels_last)

    @staticmethod
    def _conv(conv: nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        if not channels_last:
            return conv(x.contiguous())
        # oneDNN picks its channels-last kernels when the weight is channels-last too
        return _apply_conv(conv, x, conv.weight.contiguous(memory_format=torch.channels_last_3d), conv.bias)

    def _channels_last(self, x: torch.Tensor) -> bool:
        """3D float32 on CPU runs the high-resolution levels channels-last: oneDNN's channels-last kernels are 2-4x
        faster there, forward and backward (UNet2's full-resolution layers have few output channels). Same sums in
        another order, so the maps agree with the reference to float32 rounding (not bit for bit)."""
        if getattr(self, "channels_last", None) is False:
            return False
        return (
            self.spatial_dims == 3
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and getattr(self, "autocast_dtype", None) is None
        )

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([moving, fixed], dim=1)
        if x.ndim - 2 != self.spatial_dims or x.shape[1] != 2 * self.in_channels:
            raise ValueError(
                f"UNet2({self.spatial_dims}D, {self.in_channels} channel(s) per image) got images of shapes "
                f"{tuple(moving.shape)} and {tuple(fixed.shape)}."
            )
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(
                f"UNet2 needs every spatial axis >= {self.min_size} voxels, got spatial shape {tuple(x.shape[2:])}."
            )
        if self.checkpointing and torch.is_grad_enabled() and not is_recomputing():
            return checkpoint_call(self._forward, x)
        return self._forward(x)

    def _norm(self, d: int, x: torch.Tensor) -> torch.Tensor:
        bn = self.batchNorms[d]
        if bn.training and bn.track_running_stats and is_recomputing():
            # The recomputed pass of activation checkpointing: the same batch statistics normalise the output, but
            # the running statistics were updated in the first pass already, so this pass updates throw-away copies
            # (and saves as many tensors for backward as the first pass did).
            return F.batch_norm(
                x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, True, 0.0, bn.eps
            )
        return bn(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = getattr(self, "autocast_dtype", None)
        if dtype is not None:
            # opt-in mixed precision: the body under autocast, the displacement-producing last layer in float32
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                features = self._body(x)
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._last_conv(features.float()) / 10
        tail = self._tail_levels(x)
        if tail == 0:
            return self._last_conv(self._body(x)) / 10
        x, skips = self._down_path(x)
        x = self._up_path(x, skips, range(self.num_levels - 1, tail - 1, -1))
        return checkpoint_call(self._tail, x, *skips[:tail])

    def _tail_levels(self, x: torch.Tensor) -> int:
        """How many of the top up levels :meth:`_forward` recomputes in the backward pass (0: none)."""
        if (
            self.recompute_levels == 0
            or self.checkpointing
            or not torch.is_grad_enabled()
            or is_checkpointed()  # already inside a recomputed region
            or "_body" in self.__dict__  # compiled body (compile_body)
            or torch.jit.is_tracing()
        ):
            return 0
        if not (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return 0
        return self.recompute_levels

    def _tail(self, x: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        """Up levels ``len(skips) - 1 .. 0`` and the last convolution: the part recomputed in the backward pass
        (see ``recompute_levels``)."""
        return self._last_conv(self._up_path(x, skips, range(len(skips) - 1, -1, -1))) / 10

    def compile_body(self, **kwargs) -> None:
        """Opt-in: replace the down/up paths by ``torch.compile(**kwargs)`` of them (same layers and weights)."""
        self._body = torch.compile(self._body_eager, **kwargs)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        return self._body_eager(x)

    def _body_eager(self, x: torch.Tensor) -> torch.Tensor:
        """Down and up paths: the ``[B, 2c + 16, *S]`` features the last convolution reads."""
        x, skips = self._down_path(x)
        return self._up_path(x, skips, range(self.num_levels - 1, -1, -1))

    def _fast(self, d: int, x: torch.Tensor) -> bool:
        # channels-last only pays at the high-resolution levels; the deep levels have large weights (converting them
        # costs more than it saves) and tiny images
        return d < _CHANNELS_LAST_LEVELS and self._channels_last(x)

    def _down_path(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down path: its output and the skip tensors ``skips[d]`` (the input of level ``d``)."""
        if self._channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        skips = []
        for d in range(self.num_levels):
            skips.append(x)
            x = self._down(d, x, self._fast(d, x))
        return x, skips

    def _up_path(self, x: torch.Tensor, skips: Sequence[torch.Tensor], levels: Sequence[int]) -> torch.Tensor:
        """Up levels ``levels`` (descending): up-convolution, BatchNorm, crop to the skip's size, concatenate it."""
        for d in levels:
            fast = self._fast(d, skips[d])
            x = self._norm(d, self._up(d, x, fast))
            if fast:
                x = crop_cat_channels_last(x, skips[d].contiguous(memory_format=torch.channels_last_3d))
            else:
                x = x[(slice(None), slice(None), *[slice(0, s) for s in skips[d].shape[2:]])]
                x = torch.cat([x, skips[d]], dim=1)
        return x

    def _last_conv(self, x: torch.Tensor) -> torch.Tensor:
        if self._channels_last(x):
            return self._conv(self.lastConv, x.contiguous(memory_format=torch.channels_last_3d), True).contiguous()
        if (
            self.spatial_dims == 3
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and torch.is_grad_enabled()
            and x.requires_grad
            and isinstance(self.lastConv.padding, tuple)
        ):
            return conv3d_channels_last_input_grad(x, self.lastConv)
        return self.lastConv(x)
