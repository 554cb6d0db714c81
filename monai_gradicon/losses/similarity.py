"""Image similarity losses of GradICON: LNCC (as the reference computes it), squared LNCC, SSD and MIND-SSC; a soft
Dice loss for warped segmentations; the instance-optimization similarities by name (:func:`similarity_from_name`).

All similarities take ``pred`` (the warped moving image) and ``target`` (the fixed image), both ``[B, C, *S]`` with
intensities in [0, 1] (the 1e-5 variance floor of LNCC is in intensity² units, so the scale matters), and an
optional ``mask`` (broadcastable to the per-voxel loss, nonzero = included: :func:`masked_mean`), and return a
scalar loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_gradicon.recompute import checkpoint_call, is_checkpointed

__all__ = [
    "gaussian_kernel1d",
    "gaussian_blur",
    "blur_matrix",
    "separable_matmul",
    "local_ncc",
    "LNCCLoss",
    "SquaredLNCCLoss",
    "SSDLoss",
    "masked_mean",
    "mind_ssc",
    "MINDSSCLoss",
    "soft_dice_loss",
    "IO_SIMILARITIES",
    "similarity_from_name",
]


def gaussian_kernel1d(sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Normalized 1D Gaussian, ``K = 4 sigma + 1`` taps by default, taps at ``linspace(-(K-1)/2, (K-1)/2, K)``."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    if kernel_size is None:
        kernel_size = int(4 * sigma + 1)
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def blur_matrix(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` matrix ``T`` with ``(T @ x)[i] = sum_t k[t] x[i + t - (K - 1) // 2]`` and zeros outside ``[0, n)``:
    a 1D "same" zero-padded correlation with ``kernel`` written as a banded matrix."""
    k = kernel.numel()
    idx = torch.arange(n, device=kernel.device)
    tap = idx[None, :] - idx[:, None] + (k - 1) // 2  # [i, j] -> kernel index
    inside = (tap >= 0) & (tap < k)
    return torch.where(inside, kernel[tap.clamp(0, k - 1)], kernel.new_zeros(()))


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of every channel of ``x`` ``[B, C, *S]`` (1D to 3D), zero padding, no renormalization
    at the borders; axes are filtered in order 2, 3, 4. Several images can be blurred in one call by stacking them
    on the channel axis.

    Each axis is filtered as a product with a banded ``[N, N]`` matrix (a general matrix product) instead of a
    depth-wise convolution: the taps and the zero padding are the same, and BLAS runs this many times faster than
    the depth-wise convolution kernels (and its backward is again one product, with no saved input).
    """
    dim = x.ndim - 2
    if dim not in (1, 2, 3):
        raise ValueError(f"gaussian_blur supports 1D to 3D images [B, C, *S], got shape {tuple(x.shape)}.")
    kernel = gaussian_kernel1d(sigma, kernel_size).to(device=x.device, dtype=x.dtype)
    matrices = [None if n == 1 and kernel.numel() == 1 else blur_matrix(n, kernel) for n in x.shape[2:]]
    return separable_matmul(x, matrices)


def separable_matmul(x: torch.Tensor, matrices: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """A separable linear operator on ``x`` ``[B, C, *S]``: along spatial axis ``k`` (in order 0, 1, 2), ``out[..., i,
    ...] = sum_j M_k[i, j] x[..., j, ...]`` with ``M_k`` ``[S'_k, S_k]`` (``None``: the axis is left as it is).
    Returns ``[B, C, *S']``. Each axis is one general matrix product (BLAS), differentiable as such."""
    if len(matrices) != x.ndim - 2:
        raise ValueError(f"separable_matmul needs one matrix (or None) per spatial axis of {tuple(x.shape)}, got "
                         f"{len(matrices)}.")
    out = x.contiguous()
    for axis, matrix in enumerate(matrices):
        if matrix is None:
            continue
        shape = list(out.shape)
        n = shape[2 + axis]
        if matrix.ndim != 2 or matrix.shape[1] != n:
            raise ValueError(f"the matrix of axis {axis} must be [m, {n}], got {tuple(matrix.shape)}.")
        inner = 1
        for size in shape[3 + axis :]:
            inner *= size
        if inner == 1:  # last axis: [..., n] @ M^T, folded into one matrix product
            out = out.matmul(matrix.t())
        else:  # M @ [outer, n, inner]
            shape[2 + axis] = matrix.shape[0]
            out = torch.matmul(matrix, out.reshape(-1, n, inner)).view(shape)
    return out


def local_ncc(pred: torch.Tensor, target: torch.Tensor, sigma: float, eps: float = 1e-5) -> torch.Tensor:
    """Local normalized cross-correlation map ``[B, C, *S]`` with a Gaussian window.

    ``(G(IJ) - G(I)G(J)) / sqrt((relu(G(I²) - G(I)²) + eps) (relu(G(J²) - G(J)²) + eps))``.
    The moment images are blurred together (stacked on the channel axis); the moments of an image that needs no
    gradient are blurred in a separate call so that the backward pass only filters the other three.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}.")
    c = pred.shape[1]
    if torch.is_grad_enabled() and pred.requires_grad != target.requires_grad:
        grad_img, const_img = (pred, target) if pred.requires_grad else (target, pred)
        varying = gaussian_blur(torch.cat([grad_img, pred * target, grad_img * grad_img], dim=1), sigma)
        with torch.no_grad():
            fixed = gaussian_blur(torch.cat([const_img, const_img * const_img], dim=1), sigma)
        mu_g, m_ij, m_gg = torch.split(varying, c, dim=1)
        mu_c, m_cc = torch.split(fixed, c, dim=1)
        mu_i, m_ii, mu_j, m_jj = (mu_g, m_gg, mu_c, m_cc) if pred.requires_grad else (mu_c, m_cc, mu_g, m_gg)
    else:
        moments = gaussian_blur(torch.cat([pred, target, pred * target, pred * pred, target * target], dim=1), sigma)
        mu_i, mu_j, m_ij, m_ii, m_jj = torch.split(moments, c, dim=1)
    if torch.is_grad_enabled() and not is_checkpointed():
        # the pointwise tail would keep about six image-sized temporaries for the backward pass; recomputing it
        # there is cheap (a few elementwise passes) and gives the same values
        return checkpoint_call(_ncc_from_moments, mu_i, mu_j, m_ij, m_ii, m_jj, eps)
    return _ncc_from_moments(mu_i, mu_j, m_ij, m_ii, m_jj, eps)


def _ncc_from_moments(mu_i, mu_j, m_ij, m_ii, m_jj, eps: float) -> torch.Tensor:
    var_i = torch.relu(m_ii - mu_i**2) + eps
    var_j = torch.relu(m_jj - mu_j**2) + eps
    return (m_ij - mu_i * mu_j) / torch.sqrt(var_i * var_j)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values``; with a ``mask`` (broadcastable, nonzero = included): the mean over included voxels of each
    sample, then the mean over samples (the reference 1.1.9 semantics)."""
    if mask is None:
        return values.mean()
    included = (mask != 0).expand_as(values)
    dims = tuple(range(1, values.ndim))
    counts = included.sum(dims).clamp_min(1)
    totals = (values * included).sum(dims, dtype=torch.float32)
    return (totals / counts).mean().to(values.dtype)


class LNCCLoss(nn.Module):
    """``1 - mean(LNCC)`` with a Gaussian window of width ``sigma`` voxels (GradICON's similarity; sigma 5 for the
    released models). Not MONAI's ``LocalNormalizedCrossCorrelationLoss``, which squares and normalizes differently.
    """

    def __init__(self, sigma: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.sigma = sigma
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return 1 - masked_mean(local_ncc(pred, target, self.sigma, self.eps), mask)


class SquaredLNCCLoss(LNCCLoss):
    """``1 - mean(LNCC²)``: rewards anti-correlation too (the reference's ``SquaredLNCC``, uniGradICON's "lncc2")."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return 1 - masked_mean(local_ncc(pred, target, self.sigma, self.eps) ** 2, mask)


class SSDLoss(nn.Module):
    """Mean squared difference ``mean((pred - target)²)``."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}.")
        return masked_mean((pred - target) ** 2, mask)


# ----------------------------------------------------------------------------------------------------------------
# MIND-SSC
# ----------------------------------------------------------------------------------------------------------------

#: the six face neighbours of a voxel (offsets in units of the dilation)
_SIX_NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
#: the self-similarity context: the 12 pairs of face neighbours on different axes (squared distance 2)
SSC_PAIRS = tuple(
    (p, q) for i, p in enumerate(_SIX_NEIGHBOURS) for q in _SIX_NEIGHBOURS[i + 1:]
    if sum((a - b) ** 2 for a, b in zip(p, q)) == 2
)


def _shifted(padded: torch.Tensor, offset: tuple[int, int, int], pad: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``image(x + offset)`` for every voxel ``x`` of ``shape``, from an image replicate-padded by ``pad``."""
    return padded[(slice(None), slice(None), *[slice(pad + o, pad + o + n) for o, n in zip(offset, shape)])]


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2, eps: float = 1e-12) -> torch.Tensor:
    """The MIND-SSC descriptor (Heinrich et al., MICCAI 2013): 12 self-similarity context channels per voxel.

    For each of the 12 pairs ``(p, q)`` of :data:`SSC_PAIRS` (face neighbours on different axes, offsets times
    ``dilation`` voxels): the patch distance ``D_pq(x)`` = mean over the ``(2 radius + 1)^3`` box around ``x`` of
    ``(I(y + p) - I(y + q))^2``; then ``D' = D - min_pairs D`` per voxel, the local variance ``V(x) = mean_pairs D'``
    clamped to ``[1e-3, 1e3]`` times its mean over the volume (per sample), and ``MIND = exp(-D' / V)``. Images are
    extended by replicating their border voxels (for the shifts and for the box). The channel order is that of
    :data:`SSC_PAIRS` (the loss, a mean over channels, does not depend on it). ``eps`` only guards a constant image
    (``V = 0`` everywhere).

    Args:
        image: ``[B, C, D, H, W]`` (3D only); each channel gets its own 12 channels.
        radius, dilation: box radius and neighbour distance in voxels (uniGradICON's ``mind``: 2 and 2).

    Returns:
        ``[B, 12 C, D, H, W]`` in ``(0, 1]`` (1 in the most self-similar pair of each voxel).
    """
    if image.ndim != 5:
        raise ValueError(f"MIND-SSC is implemented for 3D images [B, C, D, H, W], got shape {tuple(image.shape)}.")
    if int(radius) < 0 or int(dilation) < 1:
        raise ValueError(f"MIND-SSC needs radius >= 0 and dilation >= 1, got {radius} and {dilation}.")
    b, c = image.shape[:2]
    shape = tuple(image.shape[2:])
    x = image.reshape(b * c, 1, *shape)
    pad = int(dilation)
    padded = F.pad(x, (pad,) * 6, mode="replicate")
    diffs = []
    for p, q in SSC_PAIRS:
        op = tuple(pad * v for v in p)
        oq = tuple(pad * v for v in q)
        diffs.append((_shifted(padded, op, pad, shape) - _shifted(padded, oq, pad, shape)) ** 2)
    sq = torch.cat(diffs, dim=1)  # [BC, 12, *S]
    k = 2 * int(radius) + 1
    if radius:
        sq = F.avg_pool3d(F.pad(sq, (int(radius),) * 6, mode="replicate"), k, stride=1)
    dist = sq - sq.amin(dim=1, keepdim=True)
    var = dist.mean(dim=1, keepdim=True)
    level = var.mean(dim=(1, 2, 3, 4), keepdim=True)
    var = torch.maximum(torch.minimum(var, level * 1000.0), level * 0.001).clamp_min(eps)
    mind = torch.exp(-dist / var)
    return mind.reshape(b, c * len(SSC_PAIRS), *shape)


class MINDSSCLoss(nn.Module):
    """``mean((MIND(pred) - MIND(target))^2)`` over voxels and the 12 channels (:func:`mind_ssc`), masked per
    :func:`masked_mean`: uniGradICON's ``mind`` IO similarity (radius 2, dilation 2), for 3D images. The descriptor
    of a target that needs no gradient is computed without recording one."""

    def __init__(self, radius: int = 2, dilation: int = 2) -> None:
        super().__init__()
        self.radius = int(radius)
        self.dilation = int(dilation)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}.")
        if target.requires_grad:
            target_mind = mind_ssc(target, self.radius, self.dilation)
        else:
            with torch.no_grad():
                target_mind = mind_ssc(target, self.radius, self.dilation)
        return masked_mean((mind_ssc(pred, self.radius, self.dilation) - target_mind) ** 2, mask)


# ----------------------------------------------------------------------------------------------------------------
# segmentations
# ----------------------------------------------------------------------------------------------------------------


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - mean_{b,k} (2 sum(p t) + eps) / (sum p + sum t + eps)`` for one-hot (or soft) segmentations
    ``[B, K, *S]`` (sums over voxels; one channel per label, no background channel): uniGradICON's Dice term."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}.")
    dims = tuple(range(2, pred.ndim))
    intersection = (pred * target).sum(dims)
    total = pred.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * intersection + eps) / (total + eps)).mean()


# ----------------------------------------------------------------------------------------------------------------
# by name
# ----------------------------------------------------------------------------------------------------------------

IO_SIMILARITIES = ("lncc", "lncc2", "mind")
"""The instance-optimization similarities by name, as uniGradICON's ``--io_sim``: ``lncc`` = ``LNCCLoss(5)``,
``lncc2`` = ``SquaredLNCCLoss(5)``, ``mind`` = ``MINDSSCLoss(radius=2, dilation=2)``."""


def similarity_from_name(name: str) -> nn.Module:
    """A new similarity module for a name of :data:`IO_SIMILARITIES`."""
    if name == "lncc":
        return LNCCLoss(sigma=5.0)
    if name == "lncc2":
        return SquaredLNCCLoss(sigma=5.0)
    if name == "mind":
        return MINDSSCLoss(radius=2, dilation=2)
    raise ValueError(f"Unknown similarity {name!r}; choose one of {IO_SIMILARITIES}.")
