"""Pair-aware batch preparation for MONAI engines, with the GradICON augmentation applied on the device.

``SupervisedTrainer`` / ``SupervisedEvaluator`` call ``prepare_batch(batch, device, non_blocking)`` and expect
``(inputs, targets, args, kwargs)``; the network is then called as ``network(inputs, *args, **kwargs)``.
:class:`PairPrepareBatch` returns ``(moving, fixed, (fixed,), {})`` so the network sees ``(moving, fixed)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from monai.engines.utils import PrepareBatch

from monai_gradicon.data.augment import augment_pair, random_swap

__all__ = ["PairPrepareBatch", "PairAugmentation"]


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Drop MONAI metadata (``MetaTensor`` -> ``torch.Tensor``) so the network works on plain tensors."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


class PairAugmentation:
    """The GradICON training augmentation for a batch of pairs, applied on the batch's device without gradient.

    1. Random A/B swap per sample with probability ``swap_prob`` (:func:`monai_gradicon.data.random_swap`).
    2. Per sample, a random signed axis permutation shared by both images plus independent
       ``noise_std * N(0, 1)`` noise on every affine entry for each image (:func:`monai_gradicon.data.augment_pair`).

    Random numbers come from the global torch generator (seeded by ``monai.utils.set_determinism``), or from a
    private CPU generator when ``seed`` is given.

    Args:
        swap_prob: probability of swapping moving and fixed (0.5 in the paper).
        permute: draw the random signed axis permutation.
        noise_std: standard deviation of the affine noise (0.05 in the paper); 0 with ``permute=False`` disables the
            spatial augmentation.
        seed: optional seed for a private generator.
    """

    def __init__(self, swap_prob: float = 0.5, permute: bool = True, noise_std: float = 0.05,
                 seed: int | None = None) -> None:
        if not 0.0 <= swap_prob <= 1.0:
            raise ValueError(f"swap_prob must be in [0, 1], got {swap_prob}.")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}.")
        self.swap_prob = float(swap_prob)
        self.permute = bool(permute)
        self.noise_std = float(noise_std)
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    @torch.no_grad()
    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.swap_prob > 0:
            moving, fixed = random_swap(moving, fixed, p=self.swap_prob, generator=self.generator)
        if self.permute or self.noise_std > 0:
            moving, fixed = augment_pair(moving, fixed, generator=self.generator, noise_std=self.noise_std,
                                         permute=self.permute)
        return moving.contiguous(), fixed.contiguous()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(swap_prob={self.swap_prob}, permute={self.permute}, "
                f"noise_std={self.noise_std})")


class PairPrepareBatch(PrepareBatch):
    """``batch -> (moving, fixed, (fixed,), {})`` for MONAI engines; the network is called as
    ``network(moving, fixed)`` and ``loss_function(pred, fixed)``.

    Args:
        moving_key: batch key of the moving image ``[B, C, *S]``.
        fixed_key: batch key of the fixed image ``[B, C, *S]``.
        augmentation: optional callable ``(moving, fixed) -> (moving, fixed)`` applied after the transfer to the
            device, e.g. :class:`PairAugmentation` (training only; leave None for evaluators).
    """

    def __init__(self, moving_key: str = "moving_image", fixed_key: str = "fixed_image",
                 augmentation: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> None:
        self.moving_key = moving_key
        self.fixed_key = fixed_key
        self.augmentation = augmentation

    def __call__(self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        missing = [k for k in (self.moving_key, self.fixed_key) if k not in batchdata]
        if missing:
            raise KeyError(
                f"PairPrepareBatch: batch has no {missing}; it has {sorted(map(str, batchdata))}. Check the datalist "
                "keys and the preprocessing (the pair keys are set by moving_key / fixed_key)."
            )
        moving = _plain(batchdata[self.moving_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        fixed = _plain(batchdata[self.fixed_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        moving, fixed = moving.float(), fixed.float()
        if self.augmentation is not None:
            moving, fixed = self.augmentation(moving, fixed)
        return moving, fixed, (fixed,), {}
