"""The model card: what a weight file needs besides its tensors to be used correctly.

A network's tensors do not say in which axis order it saw the images, at which shape, or with which intensity
preprocessing; getting any of them wrong gives a plausible-looking but wrong field (the released weights saw the
arrays with their voxel axes reversed, at 175³, lung-masked). So every :class:`~monai_gradicon.GradICONNetwork`
carries a card, and it travels inside every state dict as the persistent buffer ``model_card`` (JSON, UTF-8,
zero-padded to :data:`CARD_BYTES` bytes, so strict loaders, ``monai.bundle.load``, MONAI Label and Ignite checkpoints
all move it with the weights). Released ``.trch`` files have no card: :func:`released_card` gives theirs.

Fields (``None`` = not known; a pipeline then needs the caller to state it, see
:func:`monai_gradicon.pipeline.resolve_settings`):

* ``axis_order``: ``"reference"`` -- the network sees each array with its spatial axes reversed: file voxel index
  ``(i, j, k)`` becomes network axes ``(k, j, i)``, ITK's numpy order, as the reference implementation and all
  released weights do; ``"file"`` -- the network sees the file's own index order ``(i, j, k)``.
* ``input_shape``: the spatial shape images are resized to, in the network's axis order (lung ``(175, 175, 175)``).
* ``num_steps``, ``spatial_dims``, ``in_channels``: structure (checked against the tensors when loading).
* ``preprocessing``: a name of :data:`monai_gradicon.data.preprocessing.PREPROCESSING` (e.g. ``"lung_ct"``).
* ``modality``: ``"ct"`` or ``"mri"`` (informative; doors use it to pick default weights).
* ``name``: a human-readable description; ``source_file`` / ``source_sha256``: for converted released files, the
  file name and the SHA-256 of its bytes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ModelCard", "CARD_BYTES", "AXIS_ORDERS", "RELEASED_MODELS", "released_card", "CardError"]

CARD_BYTES = 1024
"""Size of the ``model_card`` buffer (bytes). Fixed, so every loader that checks shapes moves it."""

AXIS_ORDERS = ("reference", "file")

CARD_VERSION = 1


class CardError(ValueError):
    """A model card that cannot be read, or that contradicts the network or the caller's explicit settings."""


@dataclass(frozen=True)
class ModelCard:
    """See the module docstring for the meaning of every field."""

    axis_order: str = "reference"
    input_shape: tuple[int, ...] | None = None
    num_steps: int | None = None
    spatial_dims: int = 3
    in_channels: int = 1
    preprocessing: str | None = None
    modality: str | None = None
    name: str | None = None
    source_file: str | None = None
    source_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.axis_order not in AXIS_ORDERS:
            raise CardError(f"model card axis_order must be one of {AXIS_ORDERS}, got {self.axis_order!r}.")
        if self.spatial_dims not in (2, 3):
            raise CardError(f"model card spatial_dims must be 2 or 3, got {self.spatial_dims!r}.")
        if self.input_shape is not None:
            shape = tuple(int(s) for s in self.input_shape)
            if len(shape) != self.spatial_dims or min(shape) < 2:
                raise CardError(
                    f"model card input_shape {shape} must have {self.spatial_dims} sizes >= 2 (spatial_dims)."
                )
            object.__setattr__(self, "input_shape", shape)
        if self.num_steps is not None and int(self.num_steps) < 1:
            raise CardError(f"model card num_steps must be >= 1, got {self.num_steps!r}.")
        if self.preprocessing is not None:
            from monai_gradicon.data.preprocessing import PREPROCESSING

            if self.preprocessing not in PREPROCESSING:
                raise CardError(
                    f"model card preprocessing {self.preprocessing!r} is not one of {sorted(PREPROCESSING)}."
                )

    # -- serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["input_shape"] = list(self.input_shape) if self.input_shape is not None else None
        out["card_version"] = CARD_VERSION
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model card") -> ModelCard:
        data = dict(data)
        version = data.pop("card_version", CARD_VERSION)
        if version != CARD_VERSION:
            raise CardError(f"{source}: card version {version!r} is not supported (this release reads {CARD_VERSION}).")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CardError(f"{source}: unknown model card fields {unknown}.")
        if data.get("input_shape") is not None:
            data["input_shape"] = tuple(data["input_shape"])
        return cls(**data)

    def to_tensor(self) -> torch.Tensor:
        """The card as the ``model_card`` buffer: ``[CARD_BYTES]`` uint8, JSON zero-padded."""
        raw = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")
        if len(raw) > CARD_BYTES:
            raise CardError(f"model card is {len(raw)} bytes, more than the {CARD_BYTES} a weight file holds: {raw!r}")
        out = torch.zeros(CARD_BYTES, dtype=torch.uint8)
        out[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return out

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, source: str = "model card") -> ModelCard:
        if tensor.dtype != torch.uint8 or tensor.ndim != 1 or tensor.numel() != CARD_BYTES:
            raise CardError(
                f"{source}: a model card is a [{CARD_BYTES}] uint8 tensor, got {tensor.dtype} {tuple(tensor.shape)}."
            )
        raw = bytes(tensor.detach().cpu().tolist()).rstrip(b"\0")
        if not raw:
            raise CardError(f"{source}: the model card is empty.")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CardError(f"{source}: the model card is not valid JSON: {exc}") from exc
        if not isinstance(data, Mapping):
            raise CardError(f"{source}: the model card is not a JSON object.")
        return cls.from_dict(data, source)

    def replace(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)

    # -- use -------------------------------------------------------------------------------------------------------
    @property
    def file_order_shape(self) -> tuple[int, ...] | None:
        """``input_shape`` in the file's voxel axis order (entry ``k``: the size original axis ``k`` is resized to)."""
        if self.input_shape is None:
            return None
        return tuple(self.input_shape[::-1]) if self.axis_order == "reference" else tuple(self.input_shape)

    def check_agrees(self, explicit: Mapping[str, Any], source: str = "the weights") -> None:
        """Raise :class:`CardError` when a setting the caller gave explicitly (not ``None``) contradicts a field the
        card states (not ``None``)."""
        clashes = []
        for key, value in explicit.items():
            if value is None:
                continue
            have = getattr(self, key)
            if key == "input_shape":
                value = tuple(int(s) for s in value)
            if have is not None and have != value:
                clashes.append(f"{key}: the card says {have!r}, you asked for {value!r}")
        if clashes:
            raise CardError(
                f"The model card of {source} contradicts your settings ({'; '.join(clashes)}). The card records how "
                "the weights were trained; drop the setting, or use weights trained for it."
            )


def _released(name: str, preprocessing: str | None, modality: str | None, shape: Sequence[int]) -> dict[str, Any]:
    return {"name": name, "preprocessing": preprocessing, "modality": modality, "input_shape": tuple(shape)}


RELEASED_MODELS: dict[str, dict[str, Any]] = {
    "lung_model_weights_step_2.trch": _released("GradICON lung CT (released)", "lung_ct", "ct", (175, 175, 175)),
    "brain_model_weights_step_2.trch": _released("GradICON brain MR (released)", "brain", "mri", (130, 155, 130)),
    "knee_model_weights_step_2.trch": _released("GradICON knee MR (released)", None, "mri", (80, 192, 192)),
    # uniGradICON and multiGradICON share this file name; their preprocessing depends on each image's modality
    "Step_2_final.trch": _released("uniGradICON / multiGradICON (released)", None, None, (175, 175, 175)),
}
"""What the authors' release names tell about a released file (their ``.trch`` files carry no card)."""


def released_card(file_name: str | None, num_steps: int, spatial_dims: int, in_channels: int,
                  sha256: str | None = None) -> ModelCard:
    """The card of an authors' released weight file: the reference axis order, and what its file name tells
    (:data:`RELEASED_MODELS`); an unknown name leaves the shape and the preprocessing unknown (``None``)."""
    import os

    base = os.path.basename(file_name) if file_name else None
    known = RELEASED_MODELS.get(base or "", {})
    shape = known.get("input_shape")
    if shape is not None and len(shape) != spatial_dims:
        shape = None
    return ModelCard(
        axis_order="reference",
        input_shape=shape,
        num_steps=num_steps,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        preprocessing=known.get("preprocessing"),
        modality=known.get("modality"),
        name=known.get("name", "released GradICON-layout weights (unrecognised file name)"),
        source_file=base,
        source_sha256=sha256,
    )
