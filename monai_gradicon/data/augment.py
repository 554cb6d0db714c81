"""GradICON training augmentation for a batch of image pairs, in torch on the batch's device.

Per sample, a random signed axis permutation ``P`` (a (d, d+1) affine with zero translation, d = 2 or 3) is drawn and
shared by both images of the pair; image A is resampled with ``P + noise_std * N(0, 1)`` and image B with
``P + noise_std * N'(0, 1)`` (independent noise on all d*(d+1) entries), through
``F.affine_grid(align_corners=False)`` and ``F.grid_sample(mode="bilinear", padding_mode="border",
align_corners=False)``. Matrices act on normalised [-1, 1] coordinates ordered (x, y[, z]) = (last, ..., first)
spatial array axis, as ``affine_grid`` defines them: output voxel at normalised position ``p`` samples the input at
``theta @ [p, 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["affine_warp", "augment_pair", "random_signed_permutation", "random_swap"]


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def random_signed_permutation(
    batch_size: int,
    ndim: int = 3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(B, ndim, ndim + 1) random signed permutation matrices with a zero translation column.

    Each of the ``2^ndim * ndim!`` signed permutations is equally likely. Random numbers are drawn on the
    generator's device (CPU without a generator) and the result is moved to ``device``.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    draw = _draw_device(generator)
    theta = torch.zeros(batch_size, ndim, ndim + 1, dtype=dtype, device=draw)
    for b in range(batch_size):
        perm = torch.randperm(ndim, generator=generator, device=draw)
        signs = torch.randint(0, 2, (ndim,), generator=generator, device=draw).to(dtype) * 2 - 1
        theta[b, torch.arange(ndim, device=draw), perm] = signs
    return theta.to(device if device is not None else draw)


def affine_warp(image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``image`` [B, C, *spatial] with ``theta`` [B, d, d + 1] (normalised coordinates, see module doc).

    Uses bilinear interpolation, border padding and ``align_corners=False``; output has the input's shape.
    """
    d = image.ndim - 2
    if d not in (2, 3):
        raise ValueError(f"image must be [B, C, H, W] or [B, C, D, H, W], got shape {tuple(image.shape)}")
    if tuple(theta.shape) != (image.shape[0], d, d + 1):
        raise ValueError(f"theta must have shape {(image.shape[0], d, d + 1)} for image {tuple(image.shape)}, "
                         f"got {tuple(theta.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating point tensor, got {image.dtype}")
    grid = F.affine_grid(theta.to(image.device, image.dtype), list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_pair(
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    generator: torch.Generator | None = None,
    noise_std: float = 0.05,
    permute: bool = True,
    return_matrices: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Random affine augmentation of a batch of pairs, as in the GradICON training scripts.

    Args:
        image_a: [B, C, D, H, W] (or [B, C, H, W]) float tensor.
        image_b: same batch size and number of spatial dims as ``image_a`` (its own spatial size).
        generator: optional ``torch.Generator`` for reproducibility (random numbers are drawn on its device).
        noise_std: standard deviation of the Gaussian noise added to every affine entry (normalised units).
        permute: draw the random signed axis permutation (False: identity, only noise).
        return_matrices: also return the (B, d, d + 1) matrices used for A and B.

    Returns:
        ``(warped_a, warped_b)`` or ``(warped_a, warped_b, theta_a, theta_b)``.
    """
    if image_a.ndim != image_b.ndim or image_a.shape[0] != image_b.shape[0]:
        raise ValueError(
            f"image_a {tuple(image_a.shape)} and image_b {tuple(image_b.shape)} need the same batch size and rank"
        )
    batch, d = image_a.shape[0], image_a.ndim - 2
    if d not in (2, 3):
        raise ValueError(f"images must be [B, C, H, W] or [B, C, D, H, W], got shape {tuple(image_a.shape)}")
    draw = _draw_device(generator)
    if permute:
        base = random_signed_permutation(batch, d, generator, device=draw, dtype=torch.float32)
    else:
        base = torch.eye(d, d + 1, device=draw).expand(batch, d, d + 1)
    noise_a = torch.randn(batch, d, d + 1, generator=generator, device=draw)
    noise_b = torch.randn(batch, d, d + 1, generator=generator, device=draw)
    theta_a = (base + noise_std * noise_a).to(image_a.device, image_a.dtype)
    theta_b = (base + noise_std * noise_b).to(image_b.device, image_b.dtype)
    warped_a, warped_b = affine_warp(image_a, theta_a), affine_warp(image_b, theta_b)
    if return_matrices:
        return warped_a, warped_b, theta_a, theta_b
    return warped_a, warped_b


def random_swap(
    image_a: torch.Tensor, image_b: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap A and B independently for each sample of the batch with probability ``p``.

    Args:
        image_a, image_b: tensors of identical shape [B, ...].
        p: swap probability in [0, 1].
        generator: optional ``torch.Generator`` (one uniform number per sample is drawn on its device).
    """
    if image_a.shape != image_b.shape:
        raise ValueError(f"random_swap needs equal shapes, got {tuple(image_a.shape)} and {tuple(image_b.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    swap = torch.rand(image_a.shape[0], generator=generator, device=_draw_device(generator)) < p
    swap = swap.to(image_a.device).view(-1, *([1] * (image_a.ndim - 1)))
    return torch.where(swap, image_b, image_a), torch.where(swap, image_a, image_b)
