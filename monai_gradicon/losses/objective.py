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
from monai_gradicon.losses.similarity import LNCCLoss, soft_dice_loss
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
        dice: the segmentation term ``soft_dice(segA o Phi_AB, segB) + soft_dice(segB o Phi_BA, segA)`` before its
            weight (``None`` when the objective has no segmentations); ``loss`` includes ``dice_weight * dice``.
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
    dice: torch.Tensor | None = None

    def scalars(self) -> dict[str, float]:
        """The scalar terms as Python floats (for logging); ``dice`` only when the objective has that term."""
        names = ("loss", "similarity", "regularizer", "transform_magnitude", "folds")
        out = {k: float(getattr(self, k).detach()) for k in names}
        if self.dice is not None:
            out["dice"] = float(self.dice.detach())
        return out


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
        moving_mask, fixed_mask: optional loss masks, both or neither: ``[1 or B, 1, *S]`` on the input grid (the
            network's axis order, like the images), nonzero = included. The similarity is then
            ``sim(A o Phi_AB, B, fixed_mask) + sim(B o Phi_BA, A, moving_mask)`` -- each comparison masked on the
            grid of its target image (uniGradICON's ``loss_function_masking``; the mean per sample over included
            voxels, :func:`~monai_gradicon.losses.similarity.masked_mean`). The similarity must take a ``mask``.
        dice_weight: weight of the segmentation Dice term (0: none; uniGradICON's ``dice_loss_weight``).
        moving_segmentation, fixed_segmentation: with ``dice_weight > 0``, both: one-hot ``[1 or B, K, *S]`` float
            tensors on the input grid, one channel per label present in both (no background). Warped linearly with
            the maps (border padding), the term is ``soft_dice(segA o Phi_AB, segB) + soft_dice(segB o Phi_BA,
            segA)`` (:func:`~monai_gradicon.losses.similarity.soft_dice_loss`).
    """

    def __init__(
        self,
        network: GradICONNetwork,
        similarity: nn.Module | None = None,
        lmbda: float = 1.5,
        regularizer: str = "gradicon_sparse",
        padding_mode: str = "border",
        delta: float = 1e-3,
        *,
        moving_mask: torch.Tensor | None = None,
        fixed_mask: torch.Tensor | None = None,
        dice_weight: float = 0.0,
        moving_segmentation: torch.Tensor | None = None,
        fixed_segmentation: torch.Tensor | None = None,
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
        if (moving_mask is None) != (fixed_mask is None):
            raise ValueError("Loss masking needs both moving_mask and fixed_mask (each image's own), or neither.")
        for name, mask in (("moving_mask", moving_mask), ("fixed_mask", fixed_mask)):
            if mask is not None and (mask.ndim < 3 or mask.shape[1] != 1):
                raise ValueError(f"{name} must be [1 or B, 1, *S], got shape {tuple(mask.shape)}.")
        if isinstance(dice_weight, bool) or not isinstance(dice_weight, (int, float)) or not dice_weight >= 0:
            raise ValueError(f"dice_weight must be a number >= 0, got {dice_weight!r}.")
        if (moving_segmentation is None) != (fixed_segmentation is None):
            raise ValueError("The Dice term needs both moving_segmentation and fixed_segmentation, or neither.")
        if dice_weight > 0 and moving_segmentation is None:
            raise ValueError("dice_weight > 0 needs moving_segmentation and fixed_segmentation (one-hot [1, K, *S]).")
        if dice_weight == 0 and moving_segmentation is not None:
            raise ValueError("Segmentations were given but dice_weight is 0: give a positive weight or no "
                             "segmentations.")
        if moving_segmentation is not None and (
                moving_segmentation.ndim < 3 or moving_segmentation.shape[1:] != fixed_segmentation.shape[1:]):
            raise ValueError(f"moving_segmentation {tuple(moving_segmentation.shape)} and fixed_segmentation "
                             f"{tuple(fixed_segmentation.shape)} must both be [1 or B, K, *S] with the same K labels.")
        self.dice_weight = float(dice_weight)
        # buffers follow .to(device); not saved with the state dict
        self.register_buffer("moving_mask", moving_mask, persistent=False)
        self.register_buffer("fixed_mask", fixed_mask, persistent=False)
        self.register_buffer("moving_segmentation", moving_segmentation, persistent=False)
        self.register_buffer("fixed_segmentation", fixed_segmentation, persistent=False)

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
        if self.fixed_mask is not None:
            self._check_grid("masks", self.fixed_mask, spatial)
            similarity = (self.similarity(warped_moving, fixed, self.fixed_mask.to(moving.dtype))
                          + self.similarity(warped_fixed, moving, self.moving_mask.to(moving.dtype)))
        else:
            similarity = self.similarity(warped_moving, fixed) + self.similarity(warped_fixed, moving)
        dice = None
        if self.fixed_segmentation is not None:
            self._check_grid("segmentations", self.fixed_segmentation, spatial)
            batch = moving.shape[0]
            seg_a = self.moving_segmentation.to(moving.dtype).expand(batch, *self.moving_segmentation.shape[1:])
            seg_b = self.fixed_segmentation.to(moving.dtype).expand(batch, *self.fixed_segmentation.shape[1:])
            dice = (soft_dice_loss(warp_image(seg_a, phi_ab, padding_mode="border"), seg_b)
                    + soft_dice_loss(warp_image(seg_b, phi_ba, padding_mode="border"), seg_a))

        if noise is None:
            noise = draw_noise(spatial, generator=generator, device=moving.device)
        noise = noise.to(device=moving.device, dtype=moving.dtype)
        points = self.sample_points(spatial, noise)
        if self.regularizer == "icon":
            reg = icon_regularizer(phi_ab_t, phi_ba_t, points)
        else:
            reg = gradicon_regularizer(phi_ab_t, phi_ba_t, points, self.delta)

        ident = identity_map(spatial, dtype=phi_ab.dtype, device=phi_ab.device)
        loss = self.lmbda * reg + similarity
        if dice is not None:
            loss = loss + self.dice_weight * dice
        return ObjectiveOutput(
            loss=loss,
            similarity=similarity,
            regularizer=reg,
            transform_magnitude=torch.mean((ident - phi_ab) ** 2),
            folds=folds_count(phi_ba),
            phi_ab=phi_ab,
            phi_ba=phi_ba,
            warped_moving=warped_moving,
            warped_fixed=warped_fixed,
            dice=dice,
        )

    @staticmethod
    def _check_grid(what: str, tensor: torch.Tensor, spatial: tuple[int, ...]) -> None:
        if tuple(tensor.shape[2:]) != spatial:
            raise ValueError(f"The objective's {what} are on a {tuple(tensor.shape[2:])} grid but the images are "
                             f"{spatial} (both on the network grid, in the network's axis order).")
