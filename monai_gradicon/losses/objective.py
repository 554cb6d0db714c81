"""The GradICON training objective: bidirectional similarity plus lambda times an inverse-consistency regularizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from monai_gradicon.losses.regularizers import (
    draw_noise,
    folds_count,
    gradicon_regularizer,
    icon_regularizer,
    jitter_points,
    sparse_jitter_points,
)
from monai_gradicon.losses.similarity import LNCCLoss
from monai_gradicon.maps import identity_map, warp_image
from monai_gradicon.networks.registration import GradICONNetwork

__all__ = ["GradICONObjective", "ObjectiveOutput", "REGULARIZERS"]

REGULARIZERS = ("gradicon_sparse", "gradicon", "icon")


@dataclass
class ObjectiveOutput:
    """Every term of one objective evaluation (scalars are 0-d tensors; maps are normalized coordinates).

    Attributes:
        loss: ``similarity + lmbda * regularizer`` (what is minimised).
        similarity: ``sim(A o Phi_AB, B) + sim(B o Phi_BA, A)``.
        regularizer: the inverse-consistency term (before multiplying by lambda).
        transform_magnitude: ``mean((id - Phi_AB(id))²)``.
        folds: folded cells of ``Phi_BA``, summed over the batch and divided by B (the reference's ``flips``; no gradient).
        phi_ab, phi_ba: the maps on the input grid, ``[B, dim, *S]``.
        warped_moving, warped_fixed: ``A o Phi_AB`` and ``B o Phi_BA``, ``[B, C, *S]``.
    """

    loss: torch.Tensor
    similarity: torch.Tensor
    regularizer: torch.Tensor
    transform_magnitude: torch.Tensor
    folds: torch.Tensor
    phi_ab: torch.Tensor
    phi_ba: torch.Tensor
    warped_moving: torch.Tensor
    warped_fixed: torch.Tensor

    def scalars(self) -> dict[str, float]:
        """The scalar terms as Python floats (for logging)."""
        names = ("loss", "similarity", "regularizer", "transform_magnitude", "folds")
        return {k: float(getattr(self, k).detach()) for k in names}


class GradICONObjective(nn.Module):
    """``forward(moving, fixed) -> ObjectiveOutput``: the loss GradICON is trained and instance-optimized with.

    Both directions are registered with shared weights (two network passes), both warped images are compared with
    their targets, and the regularizer is evaluated on jittered sample points.

    Args:
        network: the registration network (``forward(moving, fixed) -> CoordinateTransform``).
        similarity: image loss ``(warped, target) -> scalar``; default ``LNCCLoss(sigma=5)``.
        lmbda: regularizer weight (1.5 for the released models).
        regularizer: ``"gradicon_sparse"`` (released models: jitter sigma 2/N_last, stride 2), ``"gradicon"`` (dense,
            sigma 1/N_last) or ``"icon"``.
        padding_mode: padding when warping images for the similarity: ``"border"`` (GradICON) or ``"zeros"``
            (uniGradICON).
        delta: finite-difference step of the GradICON term, in normalized units.
    """

    def __init__(
        self,
        network: GradICONNetwork,
        similarity: nn.Module | None = None,
        lmbda: float = 1.5,
        regularizer: str = "gradicon_sparse",
        padding_mode: str = "border",
        delta: float = 1e-3,
    ) -> None:
        super().__init__()
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}.")
        self.network = network
        self.similarity = similarity if similarity is not None else LNCCLoss(sigma=5.0)
        self.lmbda = lmbda
        self.regularizer = regularizer
        self.padding_mode = padding_mode
        self.delta = delta

    def sample_points(self, spatial_shape: tuple[int, ...], noise: torch.Tensor) -> torch.Tensor:
        """The regularizer's sample points ``[1, dim, *P]`` for a standard-normal ``noise`` ``[1, dim, *S]``."""
        if self.regularizer == "gradicon_sparse":
            return sparse_jitter_points(spatial_shape, noise)
        return jitter_points(spatial_shape, noise, scale=1.0)

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> ObjectiveOutput:
        """Evaluate the objective for image A = ``moving`` and B = ``fixed`` (``[B, C, *S]``, intensities in [0, 1]).

        Args:
            noise: optional standard-normal jitter ``[1, dim, *S]`` (injected for reproducibility); by default it is
                drawn with ``torch.randn`` on the CPU (from ``generator`` if given) after the network passes.
        """
        spatial = tuple(moving.shape[2:])
        phi_ab_t = self.network(moving, fixed)
        phi_ba_t = self.network(fixed, moving)
        phi_ab = phi_ab_t.on_grid(spatial)
        phi_ba = phi_ba_t.on_grid(spatial)
        warped_moving = warp_image(moving, phi_ab, padding_mode=self.padding_mode)
        warped_fixed = warp_image(fixed, phi_ba, padding_mode=self.padding_mode)
        similarity = self.similarity(warped_moving, fixed) + self.similarity(warped_fixed, moving)

        if noise is None:
            noise = draw_noise(spatial, generator=generator, device=moving.device)
        noise = noise.to(device=moving.device, dtype=moving.dtype)
        points = self.sample_points(spatial, noise)
        if self.regularizer == "icon":
            reg = icon_regularizer(phi_ab_t, phi_ba_t, points)
        else:
            reg = gradicon_regularizer(phi_ab_t, phi_ba_t, points, self.delta)

        ident = identity_map(spatial, dtype=phi_ab.dtype, device=phi_ab.device)
        return ObjectiveOutput(
            loss=self.lmbda * reg + similarity,
            similarity=similarity,
            regularizer=reg,
            transform_magnitude=torch.mean((ident - phi_ab) ** 2),
            folds=folds_count(phi_ba),
            phi_ab=phi_ab,
            phi_ba=phi_ba,
            warped_moving=warped_moving,
            warped_fixed=warped_fixed,
        )
