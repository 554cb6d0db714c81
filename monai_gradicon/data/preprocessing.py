"""Intensity preprocessing of the GradICON / uniGradICON reference, as functions and MONAI dictionary transforms.

All functions take one sample (any shape, typically ``[C, D, H, W]``) as a numpy array or torch tensor (MONAI
``MetaTensor`` metadata is kept) and return the same kind, as float32. Statistics (min, max, quantile) are taken
over the whole sample. Resizing to the network shape is not done here: use MONAI
``Resized(mode="trilinear", align_corners=False)``.

* lung CT (GradICON lung): clip HU to [-1000, 0], ``(HU + 1000) / 1000`` -> [0, 1], times the binarised lung mask.
* uniGradICON CT: clip HU to [-1000, 1000] -> [0, 1].
* uniGradICON MR: min -> 0, 99th percentile (``torch.kthvalue`` of ``int(0.99 * n)``) -> 1, clipped to [0, 1].
* brain (GradICON brain): ``x * 0.9 / max(x)``.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ensure_tuple

__all__ = [
    "BrainMaxNormalized",
    "LungCTNormalized",
    "UniGradICONCTNormalized",
    "UniGradICONMRNormalized",
    "brain_max_normalize",
    "kth_quantile",
    "lung_ct_normalize",
    "unigradicon_ct_normalize",
    "unigradicon_mr_normalize",
]

ArrayLike = np.ndarray | torch.Tensor


def _as_float_tensor(image: ArrayLike) -> tuple[torch.Tensor, bool]:
    """(float32 tensor, whether the input was a numpy array); MetaTensors stay MetaTensors."""
    if isinstance(image, torch.Tensor):
        return image.to(torch.float32), False
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), True
    raise TypeError(f"expected a numpy array or torch tensor, got {type(image).__name__}")


def _restore(result: torch.Tensor, was_numpy: bool) -> ArrayLike:
    return result.numpy() if was_numpy else result


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The data of a tensor without MONAI metadata (for statistics)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def kth_quantile(image: ArrayLike, q: float) -> float:
    """Quantile as in the reference: ``torch.kthvalue(x.flatten(), int(q * n))`` (k >= 1), as a float."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    flat = _plain(_as_float_tensor(image)[0]).reshape(-1)
    if flat.numel() == 0:
        raise ValueError("cannot take a quantile of an empty image")
    k = max(1, int(q * flat.numel()))
    return float(torch.kthvalue(flat.cpu(), k).values)


def lung_ct_normalize(image: ArrayLike, mask: ArrayLike | None = None) -> ArrayLike:
    """GradICON lung CT: clip HU to [-1000, 0], map to [0, 1] by ``(HU + 1000) / 1000``, zero outside ``mask > 0``.

    Args:
        image: CT in HU, any shape (e.g. [1, D, H, W]).
        mask: optional lung mask broadcastable to ``image`` (any value > 0 counts as lung).

    Raises:
        ValueError: the mask shape does not broadcast to the image shape.
    """
    x, was_numpy = _as_float_tensor(image)
    out = (torch.clamp(x, -1000.0, 0.0) + 1000.0) / 1000.0
    if mask is not None:
        m, _ = _as_float_tensor(mask)
        try:
            fits = torch.broadcast_shapes(tuple(m.shape), tuple(out.shape)) == tuple(out.shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"lung mask shape {tuple(m.shape)} does not broadcast to image shape {tuple(out.shape)}")
        out = out * (_plain(m) > 0).to(out.dtype).to(out.device)
    return _restore(out, was_numpy)


def unigradicon_ct_normalize(image: ArrayLike, hu_min: float = -1000.0, hu_max: float = 1000.0) -> ArrayLike:
    """uniGradICON CT: clip HU to [hu_min, hu_max] and map linearly to [0, 1]."""
    if not hu_max > hu_min:
        raise ValueError(f"hu_max must exceed hu_min, got [{hu_min}, {hu_max}]")
    x, was_numpy = _as_float_tensor(image)
    return _restore((torch.clamp(x, hu_min, hu_max) - hu_min) / (hu_max - hu_min), was_numpy)


def unigradicon_mr_normalize(image: ArrayLike, quantile: float = 0.99) -> ArrayLike:
    """uniGradICON MR: clip to [min, q-quantile] (see :func:`kth_quantile`) and map linearly to [0, 1].

    A constant image (quantile == min) gives all zeros.
    """
    x, was_numpy = _as_float_tensor(image)
    low = float(_plain(x).min())
    high = kth_quantile(x, quantile)
    if high <= low:
        return _restore(torch.zeros_like(x), was_numpy)
    return _restore((torch.clamp(x, low, high) - low) / (high - low), was_numpy)


def brain_max_normalize(image: ArrayLike, target_max: float = 0.9) -> ArrayLike:
    """GradICON brain: ``x * target_max / max(x)`` (default 0.9).

    Raises:
        ValueError: the image maximum is not positive.
    """
    x, was_numpy = _as_float_tensor(image)
    peak = float(_plain(x).max())
    if not peak > 0:
        raise ValueError(f"brain image maximum must be positive for max normalisation, got {peak}")
    return _restore(x * (target_max / peak), was_numpy)


class LungCTNormalized(MapTransform):
    """Dictionary version of :func:`lung_ct_normalize`.

    Args:
        keys: image keys (CT in HU, e.g. ``("fixed_image", "moving_image")``).
        mask_keys: lung mask key for each image key (same length; a single key for a single image key), or None
            for no masking.
        allow_missing_keys: skip absent image keys instead of raising.
    """

    def __init__(
        self, keys: KeysCollection, mask_keys: KeysCollection | None = None, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys: tuple[Hashable | None, ...] = (
            (None,) * len(self.keys) if mask_keys is None else ensure_tuple(mask_keys)
        )
        if len(self.mask_keys) != len(self.keys):
            raise ValueError(f"mask_keys {self.mask_keys} must give one mask key per image key {self.keys}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            if mask_key is not None and mask_key not in d:
                raise KeyError(f"LungCTNormalized: mask key {mask_key!r} (for {key!r}) not in the data")
            d[key] = lung_ct_normalize(d[key], None if mask_key is None else d[mask_key])
        return d


class UniGradICONCTNormalized(MapTransform):
    """Dictionary version of :func:`unigradicon_ct_normalize` (clip HU to [hu_min, hu_max] -> [0, 1])."""

    def __init__(
        self, keys: KeysCollection, hu_min: float = -1000.0, hu_max: float = 1000.0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not hu_max > hu_min:
            raise ValueError(f"hu_max must exceed hu_min, got [{hu_min}, {hu_max}]")
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = unigradicon_ct_normalize(d[key], self.hu_min, self.hu_max)
        return d


class UniGradICONMRNormalized(MapTransform):
    """Dictionary version of :func:`unigradicon_mr_normalize` (min -> 0, ``quantile`` -> 1, clipped)."""

    def __init__(self, keys: KeysCollection, quantile: float = 0.99, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.quantile = float(quantile)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = unigradicon_mr_normalize(d[key], self.quantile)
        return d


class BrainMaxNormalized(MapTransform):
    """Dictionary version of :func:`brain_max_normalize` (``x * target_max / max(x)``)."""

    def __init__(self, keys: KeysCollection, target_max: float = 0.9, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.target_max = float(target_max)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = brain_max_normalize(d[key], self.target_max)
        return d
