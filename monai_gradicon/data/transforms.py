"""MONAI dictionary transforms of :mod:`monai_gradicon.data` for the bundles' configs.

:class:`IntensityPreprocessd` applies the one preprocessing registry (:data:`~monai_gradicon.data.preprocessing.
PREPROCESSING`) that every door uses. It lives apart from the registry so that importing the registry (the command
line, the Python API) does not import MONAI's transforms.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ensure_tuple

from monai_gradicon.config import config_bool
from monai_gradicon.data.preprocessing import PREPROCESSING, preprocess

__all__ = ["IntensityPreprocessd"]


class IntensityPreprocessd(MapTransform):
    """Dictionary version of :func:`preprocess` for the bundles' configs.

    Args:
        keys: image keys (e.g. ``("fixed_image", "moving_image")``).
        name: a :data:`PREPROCESSING` name.
        mask_keys: the mask key of each image key (same length), or None for no masking; a mask key absent from the
            data leaves its image unmasked (masks are optional per pair).
        use_masks: False ignores masks even when present.
    """

    def __init__(
        self,
        keys: KeysCollection,
        name: str,
        mask_keys: Sequence[Hashable] | None = None,
        use_masks: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if name not in PREPROCESSING:
            raise ValueError(f"Unknown preprocessing {name!r}; choose one of {sorted(PREPROCESSING)}.")
        self.name = name
        self.mask_keys: tuple[Hashable | None, ...] = (
            (None,) * len(self.keys) if mask_keys is None else ensure_tuple(mask_keys)
        )
        if len(self.mask_keys) != len(self.keys):
            raise ValueError(f"mask_keys {self.mask_keys} must give one mask key per image key {self.keys}")
        self.use_masks = config_bool(use_masks, "use_masks")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            mask = d.get(mask_key) if (self.use_masks and mask_key is not None) else None
            d[key] = preprocess(d[key], self.name, mask)
        return d
