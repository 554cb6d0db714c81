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

How each layer is computed on CPU (channels-last layouts, matrix-product transposed convolutions, lean saved state)
lives in :mod:`monai_gradicon.networks.cpu_kernels`; this module only says which layer runs where. The switches,
all plain attributes set in ``__init__``: ``channels_last``, ``autocast_dtype``, ``checkpointing``,
``recompute_levels`` and ``compiled_body`` (see :class:`UNet2`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_gradicon.networks.cpu_kernels import (
    CHANNELS_LAST,
    crop_cat_channels_last,
    is_channels_last_3d,
    layout_conv,
    leaky_conv,
    output_conv,
)
from monai_gradicon.recompute import checkpoint_call, is_checkpointed, is_recomputing

__all__ = ["UNet2", "match_channels", "unet2_min_size", "checkpoint_call", "is_checkpointed", "is_recomputing"]

DOWN_CHANNELS = (16, 32, 64, 256, 512)
UP_CHANNELS = (16, 32, 64, 128, 256)

CHANNELS_LAST_LEVELS = 3
"""Levels 0-2 (and the last convolution) run channels-last when the layout is on: the high-resolution levels with few
output channels, where oneDNN's channels-last kernels pay. The deep levels have large weights (converting them costs
more than it saves) and tiny images."""


def unet2_min_size(num_levels: int = 5) -> int:
    """Smallest spatial size a UNet2 with ``num_levels`` levels accepts on every axis (17 for 5 levels)."""
    return 2 ** (num_levels - 1) + 1


def upsample2_add_(y: torch.Tensor, low: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """``y += interpolate(low, scale_factor=2, trilinear, align_corners=False)`` for 3D ``y`` ``[B, C, 2n, ...]`` and
    ``low`` ``[B, C, n, ...]``, ``rows`` input slices at a time (with one slice of overlap on each side), so the
    full-size upsampled tensor never exists. The same values: each output slice reads the same two input slices with
    the same weights (the source coordinate ``(o + 0.5) / 2 - 0.5`` is exact in float32). Returns ``y``."""
    n_in, n_out = low.shape[2], y.shape[2]
    if n_out != 2 * n_in:
        raise ValueError(f"upsample2_add_ needs y twice low's depth, got {tuple(y.shape)} and {tuple(low.shape)}.")
    for o0 in range(0, n_out, 2 * rows):
        o1 = min(n_out, o0 + 2 * rows)
        i0, i1 = max(0, o0 // 2 - 1), min(n_in, o1 // 2 + 1)
        piece = F.interpolate(low[:, :, i0:i1], scale_factor=2, mode="trilinear", align_corners=False)
        y[:, :, o0:o1].add_(piece[:, :, o0 - 2 * i0: o1 - 2 * i0])
    return y


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x`` ``[B, C, *S]``, or zero-pad at the front up to ``channels``."""
    if x.shape[1] >= channels:
        return x[:, :channels]
    pad = x.new_zeros((x.shape[0], channels - x.shape[1], *x.shape[2:]))
    if is_channels_last_3d(x):
        pad = pad.contiguous(memory_format=CHANNELS_LAST)
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
        channels_last: run levels ``0 .. CHANNELS_LAST_LEVELS - 1`` and the last convolution in the channels-last
            layout (oneDNN's fast kernels on CPU). ``None`` (default) or ``True``: where it pays, i.e. for 3D float32
            CPU tensors without ``autocast_dtype``. Summation order changes, so values agree with the reference to
            float32 rounding instead of bit for bit; ``False`` never, the reference's exact forward operations.
        autocast_dtype: opt-in reduced precision: ``None`` (default, float32) or e.g. ``torch.bfloat16`` to run the
            down and up paths under ``torch.autocast`` (the last convolution stays float32). Numbers change.

    The compiled body is the attribute ``compiled_body`` (``None`` until :meth:`compile_body`).
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
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"UNet2 supports spatial_dims 2 or 3, got {spatial_dims}.")
        if len(down_channels) != len(up_channels):
            raise ValueError("down_channels and up_channels must have the same length.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.down_channels = tuple(int(c) for c in down_channels)
        self.up_channels = tuple(int(c) for c in up_channels)
        self.num_levels = len(down_channels)
        if not 0 <= int(recompute_levels) <= len(down_channels):
            raise ValueError(f"recompute_levels must be in [0, {len(down_channels)}], got {recompute_levels}.")
        # performance switches (none changes the layers; see the class docstring)
        self.checkpointing = checkpointing
        self.recompute_levels = int(recompute_levels)
        self.channels_last: bool | None = channels_last
        self.autocast_dtype: torch.dtype | None = autocast_dtype
        self.compiled_body: Callable[[torch.Tensor], torch.Tensor] | None = None

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

    # ------------------------------------------------------------------------------------------------ the network
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

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Down path, up path, last convolution / 10 -- under autocast, or with the top levels recomputed."""
        if self.autocast_dtype is not None:
            # opt-in mixed precision: the body under autocast, the displacement-producing last layer in float32
            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                features = self._body(x)
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._last_conv(features.float()) / 10
        if self._lean_inference(x):
            x, skips = self._down_path(x)
            return self._lean_top(self._up_path(x, skips, range(self.num_levels - 1, 0, -1)), skips[0]) / 10
        tail = self._tail_levels(x)
        if tail == 0:
            return self._last_conv(self._body(x)) / 10
        x, skips = self._down_path(x)
        x = self._up_path(x, skips, range(self.num_levels - 1, tail - 1, -1))
        return checkpoint_call(self._tail, x, *skips[:tail])

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        """Down and up paths (the compiled ones after :meth:`compile_body`)."""
        if self.compiled_body is not None:
            return self.compiled_body(x)
        return self._body_eager(x)

    def _body_eager(self, x: torch.Tensor) -> torch.Tensor:
        """Down and up paths: the ``[B, 2c + 16, *S]`` features the last convolution reads."""
        x, skips = self._down_path(x)
        return self._up_path(x, skips, range(self.num_levels - 1, -1, -1))

    def _down_path(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down path: its output and the skip tensors ``skips[d]`` (the input of level ``d``)."""
        if self._runs_channels_last(x):
            x = x.contiguous(memory_format=CHANNELS_LAST)
        skips = []
        for d in range(self.num_levels):
            skips.append(x)
            x = self._down(d, x, self._channels_last_at(d, x))
        return x, skips

    def _up_path(self, x: torch.Tensor, skips: Sequence[torch.Tensor], levels: Sequence[int]) -> torch.Tensor:
        """Up levels ``levels`` (descending): up-convolution, BatchNorm, crop to the skip's size, concatenate it."""
        for d in levels:
            channels_last = self._channels_last_at(d, skips[d])
            x = self._norm(d, self._up(d, x, channels_last))
            if channels_last:
                x = crop_cat_channels_last(x, skips[d].contiguous(memory_format=CHANNELS_LAST))
            else:
                x = x[(slice(None), slice(None), *[slice(0, s) for s in skips[d].shape[2:]])]
                x = torch.cat([x, skips[d]], dim=1)
        return x

    def _down(self, d: int, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Down level ``d``: ``Conv(LeakyReLU(x)) + match_channels(avg_pool(x))``."""
        y = leaky_conv(self.downConvs[d], x, channels_last)
        return y + match_channels(self._pool(x, 2, ceil_mode=True), y.shape[1])

    def _up(self, d: int, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Up level ``d`` before BatchNorm: ``ConvTranspose(LeakyReLU(x)) + interpolate(match_channels(x), x2)``."""
        y = leaky_conv(self.upConvs[d], x, channels_last)
        low = match_channels(x, y.shape[1])
        if channels_last:  # a channel slice of a channels-last tensor would take the slow strided upsampling path
            low = low.contiguous(memory_format=CHANNELS_LAST)
        # y is a fresh convolution output that no backward needs: summing into it saves a full-resolution buffer
        return y.add_(F.interpolate(low, scale_factor=2, mode=self._interp_mode, align_corners=False))

    def _norm(self, d: int, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm of up level ``d``."""
        bn = self.batchNorms[d]
        if bn.training and bn.track_running_stats and is_recomputing():
            # The recomputed pass of activation checkpointing: the same batch statistics normalise the output, but
            # the running statistics were updated in the first pass already, so this pass updates throw-away copies
            # (and saves as many tensors for backward as the first pass did).
            return F.batch_norm(
                x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, True, 0.0, bn.eps
            )
        return bn(x)

    def _last_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The output convolution (before the division by 10)."""
        return output_conv(self.lastConv, x, self._runs_channels_last(x))

    def _lean_top(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Up level 0 and the last convolution for inference without gradients (see :meth:`_lean_inference`), with
        about half the full-resolution memory of :meth:`_up_path` + :meth:`_last_conv`: LeakyReLU in place on the
        level's input (a fresh tensor nobody else reads), the upsampled shortcut added slab by slab
        (:func:`upsample2_add_`), BatchNorm's affine map applied in place, and no concatenation -- the last
        convolution is the sum of its two halves, the 16 up channels on the uncropped grid (the cropped-off border
        zeroed, which is what the crop's zero padding reads) and the skip's channels. The same layers; values agree
        with the channels-last path to float32 rounding (other summation orders). ``x`` is consumed."""
        conv, bn = self.upConvs[0], self.batchNorms[0]
        low = match_channels(x, conv.out_channels).clone(memory_format=CHANNELS_LAST)
        y = layout_conv(conv, F.leaky_relu_(x), True)  # LeakyReLU in place: x is read nowhere else
        del x
        upsample2_add_(y, low)
        del low
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shape = (1, -1) + (1,) * (y.ndim - 2)
        y.mul_(scale.view(shape)).add_((bn.bias - bn.running_mean * scale).view(shape))
        for axis, n in enumerate(skip.shape[2:]):  # the crop: what lies beyond the skip's size reads as zero padding
            y.narrow(2 + axis, n, y.shape[2 + axis] - n).zero_()
        c = y.shape[1]
        weight = self.lastConv.weight.contiguous(memory_format=CHANNELS_LAST)
        out = F.conv3d(y, weight[:, :c], self.lastConv.bias, padding=self.lastConv.padding)
        del y
        out = out[(slice(None), slice(None), *[slice(0, n) for n in skip.shape[2:]])]
        out = out + F.conv3d(skip.contiguous(memory_format=CHANNELS_LAST), weight[:, c:], None,
                             padding=self.lastConv.padding)
        return out.contiguous()

    # ----------------------------------------------------------------------------- where the fast paths are used
    def _lean_inference(self, x: torch.Tensor) -> bool:
        """Whether :meth:`_forward` runs the top level by :meth:`_lean_top`: channels-last CPU float32 inference
        (no gradient, not traced or compiled), BatchNorm on its running statistics, a 3 x 3 x 3 / padding 1 last
        convolution."""
        return (
            self._runs_channels_last(x)
            and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and self.compiled_body is None
            and not self.batchNorms[0].training
            and self.batchNorms[0].running_var is not None
            and tuple(self.lastConv.padding) == (1, 1, 1)
            and tuple(self.lastConv.stride) == (1, 1, 1)
        )

    def _runs_channels_last(self, x: torch.Tensor) -> bool:
        """Whether the channels-last layers are used for this input: the switch ``channels_last`` is not ``False``
        and ``x`` is a 3D float32 CPU tensor outside mixed precision (oneDNN's channels-last kernels are 2-4x faster
        there, forward and backward; same sums in another order, so float32 rounding, not bit for bit)."""
        if self.channels_last is False:
            return False
        return (
            self.spatial_dims == 3
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.autocast_dtype is None
        )

    def _channels_last_at(self, d: int, x: torch.Tensor) -> bool:
        """Whether level ``d`` runs channels-last (only the high-resolution levels, :data:`CHANNELS_LAST_LEVELS`)."""
        return d < CHANNELS_LAST_LEVELS and self._runs_channels_last(x)

    def _tail_levels(self, x: torch.Tensor) -> int:
        """How many of the top up levels :meth:`_forward` recomputes in the backward pass (0: none)."""
        if (
            self.recompute_levels == 0
            or self.checkpointing
            or not torch.is_grad_enabled()
            or is_checkpointed()  # already inside a recomputed region
            or self.compiled_body is not None  # the compiled body runs the down and up paths whole
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
        """Opt-in: set ``compiled_body`` to ``torch.compile(**kwargs)`` of the down/up paths (same layers and
        weights); :meth:`_body` then runs it instead of the eager paths."""
        self.compiled_body = torch.compile(self._body_eager, **kwargs)
