"""Image similarity losses of GradICON: LNCC (as the reference computes it), squared LNCC and SSD.

All take ``pred`` (the warped moving image) and ``target`` (the fixed image), both ``[B, C, *S]`` with intensities in
[0, 1] (the 1e-5 variance floor is in intensity² units, so the scale matters), and return a scalar loss.
"""

from __future__ import annotations

import torch
from torch import nn

from monai_gradicon.recompute import checkpoint_call, is_checkpointed

__all__ = ["gaussian_kernel1d", "gaussian_blur", "local_ncc", "LNCCLoss", "SquaredLNCCLoss", "SSDLoss", "masked_mean"]


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


def _blur_matrix(n: int, kernel: torch.Tensor) -> torch.Tensor:
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
    sizes = x.shape[2:]
    out = x.contiguous()
    for axis in range(dim):
        n = sizes[axis]
        if n == 1 and kernel.numel() == 1:
            continue
        matrix = _blur_matrix(n, kernel)
        inner = 1
        for s in sizes[axis + 1 :]:
            inner *= s
        if inner == 1:  # last axis: [..., n] @ T^T, folded into one matrix product
            out = out.matmul(matrix.t())
        else:  # T @ [outer, n, inner]
            out = torch.matmul(matrix, out.reshape(-1, n, inner)).view(x.shape)
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
