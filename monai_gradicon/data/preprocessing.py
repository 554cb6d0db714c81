"""Intensity preprocessing of the GradICON / uniGradICON reference: the one registry every door uses.

:data:`PREPROCESSING` maps a name (what a model card records) to a function; :func:`preprocess` applies one with an
optional binary mask, and :class:`monai_gradicon.data.transforms.IntensityPreprocessd` is the same as a MONAI
dictionary transform for the bundles' configs (in its own module, so that the command line does not import MONAI's
transform machinery: ~5 s per command on 2 CPU cores). The command line, the bundles, MONAI Label and the Python API all go through these, so a name means the
same intensities everywhere.

All functions take one sample (any shape, typically ``[C, D, H, W]``) as a numpy array or torch tensor (MONAI
``MetaTensor`` metadata is kept) and return the same kind, as float32. Statistics (min, max, quantile) are taken
over the whole sample. Resizing to the network shape is not done here (see :mod:`monai_gradicon.pipeline`).

* lung CT (GradICON lung): clip HU to [-1000, 0], ``(HU + 1000) / 1000`` -> [0, 1], times the binarised lung mask.
* uniGradICON CT: clip HU to [-1000, 1000] -> [0, 1].
* uniGradICON MR: min -> 0, 99th percentile (``torch.kthvalue`` of ``int(0.99 * n)``) -> 1, clipped to [0, 1].
* brain (GradICON brain): ``x * 0.9 / max(x)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
__all__ = [
    "PREPROCESSING",
    "Preprocessing",
    "preprocess",
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


def lung_ct_normalize(image: ArrayLike) -> ArrayLike:
    """GradICON lung CT: clip HU to [-1000, 0] and map to [0, 1] by ``(HU + 1000) / 1000`` (masking: :func:`preprocess`).
    """
    x, was_numpy = _as_float_tensor(image)
    return _restore((torch.clamp(x, -1000.0, 0.0) + 1000.0) / 1000.0, was_numpy)


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


@dataclass(frozen=True)
class Preprocessing:
    """A named intensity preprocessing: ``function(sample) -> sample`` (float32, same kind and shape)."""

    name: str
    description: str
    function: Callable[[ArrayLike], ArrayLike]


PREPROCESSING: dict[str, Preprocessing] = {
    p.name: p
    for p in (
        Preprocessing("lung_ct", "GradICON lung CT: clip HU to [-1000, 0], (HU + 1000) / 1000 -> [0, 1]",
                      lung_ct_normalize),
        Preprocessing("unigradicon_ct", "uniGradICON CT: clip HU to [-1000, 1000] -> [0, 1]", unigradicon_ct_normalize),
        Preprocessing("unigradicon_mri", "uniGradICON MR: [min, 99th percentile] -> [0, 1]", unigradicon_mr_normalize),
        Preprocessing("brain", "GradICON brain: x * 0.9 / max(x)", brain_max_normalize),
        Preprocessing("none", "intensities used as stored (float32)", lambda x: _restore(*_as_float_tensor(x))),
    )
}
"""Every preprocessing a model card may name. A mask, when given, is binarised (> 0) and multiplied in afterwards
(the lung model expects lung-masked CT)."""


def preprocess(image: ArrayLike, name: str, mask: ArrayLike | None = None) -> ArrayLike:
    """Apply the named :data:`PREPROCESSING`, then multiply by the binarised ``mask`` (broadcastable to ``image``).

    Raises:
        ValueError: unknown name, or a mask that does not broadcast to the image.
    """
    if name not in PREPROCESSING:
        raise ValueError(f"Unknown preprocessing {name!r}; choose one of {sorted(PREPROCESSING)}.")
    out = PREPROCESSING[name].function(image)
    if mask is None:
        return out
    x, was_numpy = _as_float_tensor(out)
    m, _ = _as_float_tensor(mask)
    try:
        fits = torch.broadcast_shapes(tuple(m.shape), tuple(x.shape)) == tuple(x.shape)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask shape {tuple(m.shape)} does not broadcast to image shape {tuple(x.shape)}")
    return _restore(x * (_plain(m) > 0).to(x.dtype).to(x.device), was_numpy)
