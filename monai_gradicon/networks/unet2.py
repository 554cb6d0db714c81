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
from torch.utils.checkpoint import checkpoint

__all__ = ["UNet2", "match_channels", "unet2_min_size"]

DOWN_CHANNELS = (16, 32, 64, 256, 512)
UP_CHANNELS = (16, 32, 64, 128, 256)


def unet2_min_size(num_levels: int = 5) -> int:
    """Smallest spatial size a UNet2 with ``num_levels`` levels accepts on every axis (17 for 5 levels)."""
    return 2 ** (num_levels - 1) + 1


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x`` ``[B, C, *S]``, or zero-pad at the front up to ``channels``."""
    if x.shape[1] >= channels:
        return x[:, :channels]
    pad = x.new_zeros((x.shape[0], channels - x.shape[1], *x.shape[2:]))
    return torch.cat([pad, x], dim=1)


class UNet2(nn.Module):
    """GradICON's U-Net: ``forward(moving [B, c, *S], fixed [B, c, *S]) -> displacement [B, dim, *S]``.

    The displacement is in normalized [0, 1] coordinate units (the network's last layer is divided by 10).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels per image (1 for the released models); the network sees ``2 * in_channels``.
        down_channels: output channels of the five down convolutions.
        up_channels: output channels of the five up convolutions (and BatchNorm features).
        checkpointing: recompute each level's activations in the backward pass (less memory, ~30% more time,
            identical numbers).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        down_channels: Sequence[int] = DOWN_CHANNELS,
        up_channels: Sequence[int] = UP_CHANNELS,
        checkpointing: bool = False,
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

    def _down(self, d: int, x: torch.Tensor) -> torch.Tensor:
        y = self.downConvs[d](F.leaky_relu(x))
        return y + match_channels(self._pool(x, 2, ceil_mode=True), y.shape[1])

    def _up(self, d: int, x: torch.Tensor) -> torch.Tensor:
        y = self.upConvs[d](F.leaky_relu(x))
        return y + F.interpolate(
            match_channels(x, y.shape[1]), scale_factor=2, mode=self._interp_mode, align_corners=False
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
        use_ckpt = self.checkpointing and torch.is_grad_enabled()
        skips = []
        for d in range(self.num_levels):
            skips.append(x)
            x = checkpoint(self._down, d, x, use_reentrant=False) if use_ckpt else self._down(d, x)
        for d in reversed(range(self.num_levels)):
            # BatchNorm stays outside the checkpointed part: recomputing it would update its running stats twice.
            x = checkpoint(self._up, d, x, use_reentrant=False) if use_ckpt else self._up(d, x)
            x = self.batchNorms[d](x)
            x = x[(slice(None), slice(None), *[slice(0, s) for s in skips[d].shape[2:]])]
            x = torch.cat([x, skips[d]], dim=1)
        return self.lastConv(x) / 10
