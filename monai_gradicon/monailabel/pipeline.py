"""The MONAI Label door onto the registration pipeline: a bundle loaded for serving, and one request's steps.

Nothing here imports ``monailabel``: the functions are plain Python on paths and arrays, tested without a server
(``tests/test_monailabel_pipeline.py``) and used by :class:`monai_gradicon.monailabel.GradICONRegistrationTask`.
The registration itself is :mod:`monai_gradicon.pipeline` -- the same stages the command line and the bundles run --
so a request gives the same field as ``python -m monai_gradicon register`` with the bundle's weights.

Steps (moving image A = ``image``, fixed image B = ``fixed_image``):

1. :func:`load_bundle`: ``models/model.pt`` with its model card (:func:`monai_gradicon.load_weights`, strict), checked
   against the bundle's ``configs/metadata.json`` ``model_card``.
2. :func:`prepare_request` (pre): read and check both files and the optional masks (``fixed_mask`` /
   ``moving_mask``), orientation, preprocessing, resize (:func:`monai_gradicon.pipeline.prepare_pair`).
3. :func:`run_registration` (infer): the network, optionally with instance optimization, under the bundle's lock.
4. :func:`finish_registration` (post): the transform on the original grids (:func:`~monai_gradicon.pipeline.to_original_grids`).
5. :func:`write_outputs`: the warped image and the field, with the pipeline's conventions (``ddf_units="mm"``: the
   ``displacement_mm`` file, ITK/Slicer; ``"voxel"``: the ``ddf_voxels`` file, MONAI ``Warp``).

Every problem with a request raises :class:`RegistrationRequestError`, which carries the HTTP status the server
should answer with (400 bad parameter / missing input, 404 unknown id or missing file, 422 unusable image).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monai_gradicon.io import Image, ImageReadError, read_image, write_displacement_field, write_nifti
from monai_gradicon.model_card import CardError, ModelCard
from monai_gradicon.networks.registration import GradICONNetwork
from monai_gradicon.pipeline import (
    CONVENTIONS,
    ORIENTATIONS,
    TRANSFORM_SCHEMES,
    NetworkTransforms,
    OriginalGridFields,
    PreparedPair,
    NonFiniteResultError,
    complete_masks,
    prepare_pair,
    read_pair,
    resolve_settings,
    run_network,
    to_original_grids,
)
from monai_gradicon.resample import Grid

__all__ = [
    "RegistrationRequestError",
    "GradICONBundle",
    "load_bundle",
    "find_bundles",
    "prepare_request",
    "run_registration",
    "finish_registration",
    "write_outputs",
    "register_files",
    "parse_int",
    "parse_choice",
    "DDF_UNITS",
    "MASK_KEYS",
    "PADDING_MODES",
]

DDF_UNITS = ("mm", "voxel")
"""``mm``: the ``displacement_mm`` file (ITK / Slicer NIfTI convention); ``voxel``: the ``ddf_voxels`` file (MONAI)."""

MASK_KEYS = ("fixed_mask", "moving_mask")
"""Request parameters naming optional masks (image ids or paths) on the fixed / moving grids."""

PADDING_MODES = ("border", "zeros")


class RegistrationRequestError(ValueError):
    """A request that cannot be served, with the HTTP status to answer (4xx) and a message for the user."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = int(status_code)


# ----------------------------------------------------------------------------------------------------------------
# bundle
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GradICONBundle:
    """A bundle loaded for serving.

    Attributes:
        name: folder name (the MONAI Label model name).
        root: bundle folder.
        network: the :class:`~monai_gradicon.GradICONNetwork` of ``models/model.pt`` (eval mode, frozen).
        card: its model card (axis order, shape, preprocessing).
        metadata: ``configs/metadata.json``.
        lock: serialises inference (instance optimization changes the weights temporarily).
    """

    name: str
    root: str
    network: GradICONNetwork
    card: ModelCard
    metadata: dict = field(default_factory=dict)
    lock: Any = field(default_factory=threading.Lock, repr=False)

    @property
    def spatial_dims(self) -> int:
        return self.network.spatial_dims

    @property
    def network_shape(self) -> tuple[int, ...] | None:
        return self.card.input_shape

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))

    @property
    def description(self) -> str:
        text = self.metadata.get("description") or self.metadata.get("name") or self.name
        return f"GradICON registration ({self.name}): {text}"

    def to(self, device: torch.device | str) -> GradICONBundle:
        self.network.to(device)
        return self


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"The bundle has no {what}: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"The bundle's {what} {path} is not valid JSON: {exc}") from exc


def load_bundle(path: str | os.PathLike, name: str | None = None, device: torch.device | str = "cpu") -> GradICONBundle:
    """Load a registration bundle folder for serving (no network access, no ``sys.path`` or logging side effects).

    Raises:
        FileNotFoundError: ``configs/metadata.json`` or ``models/model.pt`` is missing.
        ValueError / WeightFileError / CardError: the weights do not load strictly, or their card contradicts the
            bundle's ``model_card``.
    """
    from monai_gradicon.weights import load_weights

    root = os.path.abspath(os.fspath(path))
    name = name or os.path.basename(root.rstrip(os.sep))
    metadata = _read_json(os.path.join(root, "configs", "metadata.json"), "configs/metadata.json")
    model_path = os.path.join(root, "models", "model.pt")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"The bundle {name} has no weights at {model_path}; train them or convert released weights into it "
            f"(python -m monai_gradicon convert-weights --input <file.trch> --bundle_dir {root})."
        )
    network, card = load_weights(model_path)
    expected = metadata.get("model_card")
    if isinstance(expected, Mapping):
        shape = expected.get("input_shape")
        expected = {**expected, "input_shape": tuple(shape) if shape is not None else None}
        card.check_agrees({k: v for k, v in expected.items() if k in ("axis_order", "input_shape", "preprocessing")},
                          model_path)
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return GradICONBundle(name=name, root=root, network=network, card=card, metadata=metadata).to(device)


def find_bundles(folders: Sequence[str | os.PathLike], names: Sequence[str] | None = None) -> dict[str, str]:
    """``{name: folder}`` of the registration bundles under ``folders`` (first folder wins for a name).

    A bundle is a sub-folder with ``configs/metadata.json``; with ``names`` given, only those, in that order, and a
    missing one raises ``FileNotFoundError`` naming where it was looked for.
    """
    found: dict[str, str] = {}
    for folder in folders:
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry not in found and os.path.isfile(os.path.join(path, "configs", "metadata.json")):
                found[entry] = os.path.abspath(path)
    if names is None:
        return found
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(
            f"Bundle(s) {missing} not found in {[os.fspath(f) for f in folders]} (each needs "
            "<folder>/<name>/configs/metadata.json)."
        )
    return {n: found[n] for n in names}


# ----------------------------------------------------------------------------------------------------------------
# request parameters
# ----------------------------------------------------------------------------------------------------------------


def parse_int(value: Any, name: str, minimum: int = 0, maximum: int | None = None) -> int:
    if value is None or value == "" or (isinstance(value, str) and value.strip().lower() == "none"):
        return 0
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise RegistrationRequestError(f"{name} must be a whole number, got {value!r}.", 400) from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise RegistrationRequestError(f"{name} must be {bound}, got {number}.", 400)
    return number


def parse_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise RegistrationRequestError(f"{name} must be one of {', '.join(choices)}, got {value!r}.", 400)
    return value


# ----------------------------------------------------------------------------------------------------------------
# pre / infer / post / write
# ----------------------------------------------------------------------------------------------------------------


def _dims_word(image: Image) -> str:
    return f"{image.ndim}D (shape {image.shape})"


def _read(path: Any, what: str) -> Image:
    if path is None or (isinstance(path, str) and not path.strip()):
        raise RegistrationRequestError(f"No {what} given.", 400)
    if not isinstance(path, (str, os.PathLike)):
        raise RegistrationRequestError(f"The {what} must be a file path or an image id, got {type(path).__name__}.", 400)
    try:
        return read_image(path, what)
    except FileNotFoundError as exc:
        raise RegistrationRequestError(str(exc), 404) from exc
    except ImageReadError as exc:
        raise RegistrationRequestError(str(exc), 422) from exc


def prepare_request(
    bundle: GradICONBundle,
    moving: str | os.PathLike | None,
    fixed: str | os.PathLike | None,
    masks: Mapping[str, Any] | None = None,
    *,
    io_iterations: int = 0,
    orientation: str = "physical",
    transform_scheme: str = "grid",
) -> PreparedPair:
    """Read, check and prepare a pair of files (the "pre" step).

    Args:
        moving, fixed: image files (NIfTI, NRRD or anything MONAI ``LoadImage`` reads).
        masks: optional ``{"fixed_mask": path, "moving_mask": path}`` (see :data:`MASK_KEYS`).

    Raises:
        RegistrationRequestError: 400 (missing input, bad parameter), 404 (no such file), 422 (unreadable file, 2D vs
            3D, wrong dimensionality for the bundle, constant or non-finite image, mask off its image's grid).
    """
    if fixed is None or (isinstance(fixed, str) and not fixed.strip()):
        raise RegistrationRequestError(
            "No fixed image given: pass params {\"fixed_image\": \"<image id or path>\"} or upload the fixed image as "
            "the 'label' part of the request.",
            400,
        )
    parse_choice(orientation, "orientation", ORIENTATIONS)
    parse_choice(transform_scheme, "transform_scheme", TRANSFORM_SCHEMES)
    moving_img = _read(moving, "moving image")
    fixed_img = _read(fixed, "fixed image")
    if moving_img.ndim != fixed_img.ndim:
        raise RegistrationRequestError(
            f"The moving image is {_dims_word(moving_img)} but the fixed image is {_dims_word(fixed_img)}: both must "
            "be 2D or both 3D.",
            422,
        )
    if moving_img.ndim != bundle.spatial_dims:
        raise RegistrationRequestError(
            f"The bundle {bundle.name} registers {bundle.spatial_dims}D images; the images are "
            f"{_dims_word(moving_img)} and {_dims_word(fixed_img)}.",
            422,
        )
    masks = {k: v for k, v in dict(masks or {}).items() if v not in (None, "")}
    unknown = sorted(set(masks) - set(MASK_KEYS))
    if unknown:
        raise RegistrationRequestError(f"Unknown mask parameters {unknown}; use {list(MASK_KEYS)}.", 400)
    fmask = _read(masks["fixed_mask"], "fixed mask") if "fixed_mask" in masks else None
    mmask = _read(masks["moving_mask"], "moving mask") if "moving_mask" in masks else None
    try:
        settings = resolve_settings(bundle.card, orientation=orientation, transform_scheme=transform_scheme,
                                    inverse=False, io_iterations=io_iterations, source=f"the bundle {bundle.name}")
    except (CardError, ValueError) as exc:
        raise RegistrationRequestError(str(exc), 400) from exc
    try:
        inputs = read_pair(fixed_img, moving_img, fmask, mmask)
        inputs.fixed_mask_source = masks.get("fixed_mask")
        inputs.moving_mask_source = masks.get("moving_mask")
        complete_masks(inputs, settings)
        return prepare_pair(inputs, settings, bundle.network)
    except ValueError as exc:  # includes LungMaskError (no lung found in an image given without a mask)
        raise RegistrationRequestError(str(exc), 422) from exc


def run_registration(bundle: GradICONBundle, prepared: PreparedPair, device: torch.device | str = "cpu") -> NetworkTransforms:
    """The network (or instance optimization) on the prepared pair (the "infer" step), one request at a time."""
    with bundle.lock:
        with torch.enable_grad() if prepared.settings.io_iterations else torch.no_grad():
            transforms = run_network(bundle.network, prepared, device)
        for p in bundle.network.parameters():  # instance optimization restores the flags it found; keep frozen
            p.requires_grad_(False)
    return transforms


def finish_registration(prepared: PreparedPair, transforms: NetworkTransforms, device: torch.device | str = "cpu",
                        padding_mode: str = "border") -> OriginalGridFields:
    """The transform on the original grids (the "post" step)."""
    parse_choice(padding_mode, "padding_mode", PADDING_MODES)
    try:
        return to_original_grids(prepared, transforms, device, padding_mode=padding_mode)
    except NonFiniteResultError as exc:
        raise RegistrationRequestError(str(exc), 422) from exc


def write_outputs(prepared: PreparedPair, fields: OriginalGridFields, warped_path: str | os.PathLike,
                  ddf_path: str | os.PathLike, ddf_units: str = "mm") -> dict[str, Any]:
    """Write the warped image (float32 NIfTI, the fixed image's affine) and the field, with the pipeline's file
    conventions; return their description (JSON-able)."""
    parse_choice(ddf_units, "ddf_units", DDF_UNITS)
    affine = prepared.inputs.fixed.affine
    write_nifti(warped_path, fields.warped_moving.astype(np.float32), affine)
    if ddf_units == "mm":
        write_displacement_field(ddf_path, fields.displacement, affine)
        convention = CONVENTIONS["displacement_mm"]
    else:
        write_nifti(ddf_path, np.ascontiguousarray(np.moveaxis(fields.ddf, 0, -1)), affine)
        convention = CONVENTIONS["ddf_voxels"]
    magnitude = np.sqrt((fields.displacement.astype(np.float64) ** 2).sum(axis=0))
    return {
        "warped_image": os.fspath(warped_path),
        "ddf": os.fspath(ddf_path),
        "ddf_units": ddf_units,
        "ddf_convention": convention,
        "fixed_shape": list(Grid.of(prepared.inputs.fixed).shape),
        "displacement_mm_mean": round(float(magnitude.mean()), 4),
        "displacement_mm_max": round(float(magnitude.max()), 4),
        "folds_percent": round(fields.folds_percent, 6),
        "settings": prepared.settings.to_dict(),
    }


def register_files(
    bundle: GradICONBundle,
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    warped_path: str | os.PathLike,
    ddf_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    io_iterations: int = 0,
    ddf_units: str = "mm",
    padding_mode: str = "border",
    masks: Mapping[str, Any] | None = None,
    orientation: str = "physical",
    transform_scheme: str = "grid",
) -> dict[str, Any]:
    """pre -> infer -> post -> write for one pair of files, as the MONAI Label task runs it."""
    parse_choice(ddf_units, "ddf_units", DDF_UNITS)
    parse_choice(padding_mode, "padding_mode", PADDING_MODES)
    prepared = prepare_request(bundle, moving, fixed, masks, io_iterations=io_iterations, orientation=orientation,
                               transform_scheme=transform_scheme)
    transforms = run_registration(bundle, prepared, device)
    fields = finish_registration(prepared, transforms, device, padding_mode)
    result = write_outputs(prepared, fields, warped_path, ddf_path, ddf_units)
    result["instance_optimization_steps"] = int(io_iterations)
    if transforms.io_history:
        result["instance_optimization_loss"] = [round(transforms.io_history[0]["loss"], 6),
                                                round(transforms.io_history[-1]["loss"], 6)]
    return result
