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
4. :func:`finish_registration` (post): the transform on the original grids
   (:func:`~monai_gradicon.pipeline.to_original_grids`).
5. :func:`write_outputs`: the warped image and the field, with the pipeline's conventions (``ddf_units="mm"``: the
   ``displacement_mm`` file, ITK/Slicer; ``"voxel"``: the ``ddf_voxels`` file, MONAI ``Warp``).

Every problem with a request raises :class:`RegistrationRequestError`, which carries the HTTP status the server
should answer with (400 bad parameter / missing input, 404 unknown id or missing file, 422 unusable image).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monai_gradicon.io import (
    Image,
    ImageReadError,
    read_image,
    read_shape,
    write_displacement_field,
    write_nifti,
)
from monai_gradicon.losses.objective import GradICONObjective
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
    read_label_image,
    prepare_pair,
    read_pair,
    resolve_settings,
    run_network,
    to_original_grids,
    warp_with_field,
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
    "LABEL_DTYPES",
    "DEFAULT_MAX_INPUT_VOXELS",
    "check_input_size",
    "RequestDeadline",
    "RequestQueue",
    "LabelReference",
    "load_atlas",
    "find_atlases",
    "datastore_reference",
    "propagate_labels",
    "write_label_map",
    "prune_outputs",
    "remove_files",
]

DDF_UNITS = ("mm", "voxel")
"""``mm``: the ``displacement_mm`` file (ITK / Slicer NIfTI convention); ``voxel``: the ``ddf_voxels`` file (MONAI)."""

MASK_KEYS = ("fixed_mask", "moving_mask")
"""Request parameters naming optional masks (image ids or paths) on the fixed / moving grids."""

PADDING_MODES = ("border", "zeros")

LABEL_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}
"""Label map dtypes a request may ask for (``result_dtype``; the Slicer plugin asks for ``uint8``)."""

DEFAULT_MAX_INPUT_VOXELS = 40_000_000
"""Default largest input (voxels per image, read from the header before any work): a 512 x 512 x 152 CT. The
memory of a registration grows with the fixed image's voxels (the original-grid stage keeps several float32
fields of that size); a 512^3 upload took 141 s and a 13.0 GB peak in issue 18's measurement."""


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
        raise RegistrationRequestError(
            f"The {what} must be a file path or an image id, got {type(path).__name__}.", 400)
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
    max_voxels: int | None = None,
) -> PreparedPair:
    """Read, check and prepare a pair of files (the "pre" step).

    Args:
        moving, fixed: image files (NIfTI, NRRD or anything MONAI ``LoadImage`` reads).
        masks: optional ``{"fixed_mask": path, "moving_mask": path}`` (see :data:`MASK_KEYS`).
        max_voxels: the largest image (voxels) accepted, checked from each file's header before it is read
            (:func:`check_input_size`); ``None``: no limit.

    Raises:
        RegistrationRequestError: 400 (missing input, bad parameter), 404 (no such file), 413 (an image over
            ``max_voxels``), 422 (unreadable file, 2D vs 3D, wrong dimensionality for the bundle, constant or
            non-finite image, mask off its image's grid).
    """
    if fixed is None or (isinstance(fixed, str) and not fixed.strip()):
        raise RegistrationRequestError(
            "No fixed image given: pass params {\"fixed_image\": \"<image id or path>\"} or upload the fixed image as "
            "the 'label' part of the request.",
            400,
        )
    parse_choice(orientation, "orientation", ORIENTATIONS)
    parse_choice(transform_scheme, "transform_scheme", TRANSFORM_SCHEMES)
    if max_voxels is not None:
        check_input_size(moving, "moving image", max_voxels)
        check_input_size(fixed, "fixed image", max_voxels)
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
    if max_voxels is not None:
        for key in masks:
            check_input_size(masks[key], key.replace("_", " "), max_voxels)
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


def run_registration(bundle: GradICONBundle, prepared: PreparedPair, device: torch.device | str = "cpu",
                     deadline: RequestDeadline | None = None) -> NetworkTransforms:
    """The network (or instance optimization) on the prepared pair (the "infer" step), one request at a time.

    With a ``deadline``, instance optimization checks it before every step (through the pipeline's ``io_objective``
    hook, :class:`_DeadlineObjective`) and stops with a 503 :class:`RegistrationRequestError` once it has passed;
    the network's weights are restored either way (``instance_optimize`` restores them on any exception). A plain
    forward pass is not interrupted: its time is bounded by the network shape, not by the request.
    """
    io_objective = None
    if deadline is not None:
        deadline.check("before the network")
        if prepared.settings.io_iterations:
            io_objective = lambda network: _DeadlineObjective(network, deadline)  # noqa: E731
    with bundle.lock:
        with torch.enable_grad() if prepared.settings.io_iterations else torch.no_grad():
            transforms = run_network(bundle.network, prepared, device, io_objective)
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
    try:
        write_nifti(warped_path, fields.warped_moving.astype(np.float32), affine)
        if ddf_units == "mm":
            write_displacement_field(ddf_path, fields.displacement, affine)
            convention = CONVENTIONS["displacement_mm"]
        else:
            write_nifti(ddf_path, np.moveaxis(fields.ddf, 0, -1), affine)
            convention = CONVENTIONS["ddf_voxels"]
    except BaseException:
        remove_files([warped_path, ddf_path])  # nothing half-written stays behind
        raise
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


# ----------------------------------------------------------------------------------------------------------------
# bounds: input size, wall time, queue, output files
# ----------------------------------------------------------------------------------------------------------------


def check_input_size(path: Any, what: str, max_voxels: int) -> tuple[int, ...]:
    """The spatial shape of an image file, read from its header only, refused with 413 above ``max_voxels``.

    Runs before any voxel is read (NIfTI and NRRD headers; other formats are read whole by
    :func:`monai_gradicon.io.read_shape`). Returns the shape (array order).

    Raises:
        RegistrationRequestError: 400 (no path), 404 (no such file), 413 (too large), 422 (unreadable header).
    """
    if path is None or (isinstance(path, str) and not path.strip()):
        raise RegistrationRequestError(f"No {what} given.", 400)
    if not isinstance(path, (str, os.PathLike)):
        raise RegistrationRequestError(
            f"The {what} must be a file path or an image id, got {type(path).__name__}.", 400)
    if not os.path.exists(path):
        raise RegistrationRequestError(f"The {what} file does not exist.", 404)
    try:
        shape = read_shape(path, what)
    except ImageReadError as exc:
        raise RegistrationRequestError(str(exc), 422) from exc
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > int(max_voxels):
        raise RegistrationRequestError(
            f"The {what} has {voxels} voxels (shape {tuple(shape)}); this server accepts at most {int(max_voxels)} "
            "voxels per image (conf max_input_voxels). Crop or resample it first.",
            413,
        )
    return tuple(shape)


class RequestDeadline:
    """A request's wall-time budget (seconds from its start, ``time.monotonic``); ``seconds=None``: unbounded."""

    def __init__(self, seconds: float | None, start: float | None = None) -> None:
        if seconds is not None and not seconds > 0:
            raise ValueError(f"The request time limit must be positive seconds, got {seconds!r}.")
        self.seconds = None if seconds is None else float(seconds)
        self.start = time.monotonic() if start is None else float(start)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.seconds is not None and self.elapsed > self.seconds

    def check(self, stage: str) -> None:
        """Raise a 503 :class:`RegistrationRequestError` naming ``stage`` once the budget is spent."""
        if self.expired():
            raise RegistrationRequestError(
                f"The request ran out of time {stage}: {self.elapsed:.1f} s spent, the limit is {self.seconds:g} s "
                "(conf max_request_seconds). Ask for fewer io_iterations or send smaller images.",
                503,
            )


class _DeadlineObjective(GradICONObjective):
    """GradICON's default instance-optimization objective that first checks a :class:`RequestDeadline` (once per
    Adam step, since ``instance_optimize`` evaluates the objective once per step)."""

    def __init__(self, network: GradICONNetwork, deadline: RequestDeadline) -> None:
        super().__init__(network)
        self._deadline = deadline

    def forward(self, *args: Any, **kwargs: Any):
        self._deadline.check("during instance optimization")
        return super().forward(*args, **kwargs)


class RequestQueue:
    """First-come first-served admission of registrations: at most ``slots`` run at once, at most ``max_waiting``
    wait; a request beyond that, or one that waited ``max_wait_s``, is refused with 503 at once instead of
    piling up (each registration holds several GB on a lung CT).

    Use ``with queue.admit("gradicon_lung"): ...`` around the whole request (read, network, grids, write).
    """

    def __init__(self, slots: int = 1, max_waiting: int = 8, max_wait_s: float | None = None) -> None:
        if int(slots) < 1 or int(max_waiting) < 0:
            raise ValueError(f"RequestQueue needs slots >= 1 and max_waiting >= 0, got {slots}, {max_waiting}.")
        if max_wait_s is not None and not max_wait_s > 0:
            raise ValueError(f"max_wait_s must be positive seconds or None, got {max_wait_s!r}.")
        self.slots, self.max_waiting, self.max_wait_s = int(slots), int(max_waiting), max_wait_s
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._running = 0

    def status(self) -> dict[str, int]:
        with self._cond:
            return {"running": self._running, "waiting": len(self._waiting), "slots": self.slots,
                    "max_waiting": self.max_waiting}

    @contextmanager
    def admit(self, what: str = "registration"):
        ticket = object()
        with self._cond:
            if self._running >= self.slots and len(self._waiting) >= self.max_waiting:
                raise RegistrationRequestError(
                    f"The server is busy: {self._running} {what} request(s) running and {len(self._waiting)} "
                    f"waiting (conf max_queue {self.max_waiting}). Retry later.",
                    503,
                )
            self._waiting.append(ticket)
            deadline = None if self.max_wait_s is None else time.monotonic() + self.max_wait_s
            try:
                while not (self._waiting[0] is ticket and self._running < self.slots):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise RegistrationRequestError(
                            f"The {what} request waited {self.max_wait_s:g} s in the queue without starting "
                            "(conf max_queue_wait_seconds). Retry later.",
                            503,
                        )
                    self._cond.wait(remaining)
            except BaseException:
                self._waiting.remove(ticket)
                self._cond.notify_all()
                raise
            self._waiting.popleft()
            self._running += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()


def remove_files(paths: Sequence[Any]) -> None:
    """Delete each existing file of ``paths`` (``None`` entries skipped); errors are ignored (best effort)."""
    for path in paths:
        if path is None:
            continue
        try:
            if os.path.isfile(path):
                os.unlink(path)
        except OSError:
            pass


def prune_outputs(folder: str | os.PathLike, suffixes: Sequence[str], max_age_s: float,
                  max_bytes: int | None = None, now: float | None = None) -> list[str]:
    """Delete this server's result files in ``folder`` (only names ending in one of ``suffixes``): every file older
    than ``max_age_s`` seconds, then the oldest until the rest holds at most ``max_bytes``. Returns what was
    deleted. Other files are never touched."""
    now = time.time() if now is None else now
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    files = []
    for entry in entries:
        path = os.path.join(folder, entry)
        if not entry.endswith(tuple(suffixes)):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        if os.path.isfile(path):
            files.append((st.st_mtime, st.st_size, path))
    removed = [p for mtime, _, p in files if now - mtime > max_age_s]
    kept = sorted((f for f in files if f[2] not in set(removed)), key=lambda f: f[0])
    if max_bytes is not None:
        total = sum(size for _, size, _ in kept)
        for _, size, path in kept:
            if total <= max_bytes:
                break
            removed.append(path)
            total -= size
    remove_files(removed)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# label propagation: a labelled reference registered onto the user's scan
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LabelReference:
    """A labelled reference image: the moving image of a label propagation.

    Attributes:
        name: how a request names it (``params["reference"]``): ``atlas:<folder name>`` or a datastore image id.
        image: the reference image file.
        label: its label map file (whole numbers, 0 = background), in the image's world space (usually its grid).
        label_names: ``{segment name: label value}``, values 1..255.
        description: for ``/info``.
    """

    name: str
    image: str
    label: str
    label_names: dict[str, int]
    description: str = ""


def _check_label_names(names: Any, where: str) -> dict[str, int]:
    if not isinstance(names, Mapping) or not names:
        raise ValueError(f"{where}: label_names must be a non-empty mapping {{name: value}}, got {names!r}.")
    out: dict[str, int] = {}
    for name, value in names.items():
        if not isinstance(name, str) or not name.strip() or name.strip().lower() == "background":
            raise ValueError(f"{where}: label name {name!r} must be a non-empty text other than 'background'.")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
            raise ValueError(f"{where}: label {name!r} has value {value!r}; values must be whole numbers 1..255.")
        out[name] = value
    if len(set(out.values())) != len(out):
        raise ValueError(f"{where}: two label names share a value: {out}.")
    return dict(sorted(out.items(), key=lambda item: item[1]))


def load_atlas(folder: str | os.PathLike) -> LabelReference:
    """Read ``<folder>/atlas.json`` (``{"image": file, "label": file, "label_names": {name: value},
    "description": text}``, file names relative to the folder) and check it before serving: both files readable,
    the label map on the image's grid, its values all declared (or 0).

    Raises:
        FileNotFoundError, ValueError: naming the file and the problem.
    """
    root = os.path.abspath(os.fspath(folder))
    spec_path = os.path.join(root, "atlas.json")
    spec = _read_json(spec_path, "atlas.json")
    for key in ("image", "label", "label_names"):
        if key not in spec:
            raise ValueError(f"{spec_path} has no {key!r}.")
    names = _check_label_names(spec["label_names"], spec_path)
    image_path = os.path.join(root, spec["image"])
    label_path = os.path.join(root, spec["label"])
    image = read_image(image_path, "atlas image")
    label = read_label_image(read_image(label_path, "atlas label map"), "atlas label map")
    if image.shape != label.shape or not np.allclose(image.affine, label.affine, atol=1e-4):
        raise ValueError(f"{spec_path}: the label map {label_path} is not on the image's grid "
                         f"({label.shape} vs {image.shape}, or different affines).")
    values = {int(v) for v in np.unique(label.array)} - {0}
    undeclared = sorted(values - set(names.values()))
    if undeclared:
        raise ValueError(f"{spec_path}: the label map holds values {undeclared} that label_names does not name.")
    return LabelReference(name=f"atlas:{os.path.basename(root)}", image=image_path, label=label_path,
                          label_names=names, description=str(spec.get("description", "")))


def find_atlases(folders: Sequence[str | os.PathLike]) -> dict[str, LabelReference]:
    """``{"atlas:<name>": reference}`` for every ``<folder>/<name>/atlas.json`` (first folder wins for a name)."""
    found: dict[str, LabelReference] = {}
    for folder in folders:
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            if f"atlas:{entry}" not in found and os.path.isfile(os.path.join(folder, entry, "atlas.json")):
                ref = load_atlas(os.path.join(folder, entry))
                found[ref.name] = ref
    return found


def datastore_reference(image_id: str, image_path: str, label_path: str,
                        label_names: Mapping[str, Any] | None = None) -> LabelReference:
    """A labelled study of the datastore as a reference. Names: the label's saved ``label_names`` (what the Slicer
    plugin stores with a label), else ``"label <value>"`` for every value present."""
    label = read_label_image(read_image(label_path, "reference label map"), "reference label map")
    values = sorted({int(v) for v in np.unique(label.array)} - {0})
    if not values:
        raise RegistrationRequestError(f"The label map of the reference {image_id!r} is empty (all 0).", 422)
    if max(values) > 255 or min(values) < 0:
        raise RegistrationRequestError(
            f"The label map of the reference {image_id!r} holds values outside 0..255 ({min(values)}..{max(values)}).",
            422)
    names: dict[str, int] = {}
    if label_names:
        names = {str(k): int(v) for k, v in label_names.items() if str(k).lower() != "background"
                 and not isinstance(v, bool) and isinstance(v, (int, float)) and int(v) in values}
    for v in values:
        if v not in names.values():
            names[f"label {v}"] = v
    return LabelReference(name=image_id, image=image_path, label=label_path,
                          label_names=dict(sorted(names.items(), key=lambda item: item[1])))


def propagate_labels(prepared: PreparedPair, fields: OriginalGridFields, reference: LabelReference
                     ) -> tuple[np.ndarray, dict[str, int]]:
    """The reference's label map carried onto the fixed image's grid by the registration (nearest neighbour).

    The reference image was the moving image A, the user's scan the fixed image B: ``fields.displacement`` (world
    mm, RAS, ``[dim, *fixed shape]``) takes each fixed voxel ``x`` to the reference point ``x + u(x)``, where the
    label map is sampled by :func:`monai_gradicon.pipeline.warp_with_field` (``labels=True``: nearest neighbour, 0
    outside the reference). Returns the label array ``fixed shape`` (the label map's dtype) and ``{name: value}`` of
    the labels that are present in it (a segment that vanished is left out, so that a client importing the values
    in increasing order, as the Slicer plugin does, names every segment correctly).
    """
    try:
        label = read_label_image(read_image(reference.label, "reference label map"), "reference label map")
        warped = warp_with_field(label, fields.displacement, Grid.of(prepared.inputs.fixed), labels=True)
    except ImageReadError as exc:
        raise RegistrationRequestError(str(exc), 422) from exc
    except ValueError as exc:
        raise RegistrationRequestError(str(exc), 422) from exc
    present = {int(v) for v in np.unique(warped)} - {0}
    names = {name: value for name, value in reference.label_names.items() if value in present}
    return warped, names


def _nrrd_header(array: np.ndarray, affine: np.ndarray, type_name: str) -> bytes:
    """NRRD header for a 3D scalar image: RAS voxel -> world ``affine`` written in NRRD's LPS space."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3, :]
    dirs = " ".join("(" + ",".join(f"{v:.17g}" for v in lps[:, k]) + ")" for k in range(3))
    origin = "(" + ",".join(f"{v:.17g}" for v in lps[:, 3]) + ")"
    lines = ["NRRD0004", f"type: {type_name}", "dimension: 3", "space: left-posterior-superior",
             "sizes: " + " ".join(str(n) for n in array.shape), f"space directions: {dirs}",
             "kinds: domain domain domain", "endian: little", "encoding: gzip", f"space origin: {origin}"]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def write_label_map(path: str | os.PathLike, labels: np.ndarray, affine: np.ndarray, dtype: str = "uint8") -> str:
    """Write a 3D label map (array order, the voxel -> RAS ``affine``) as NIfTI (``.nii`` / ``.nii.gz``) or NRRD
    (``.nrrd``, gzip, LPS space as 3D Slicer writes it), in ``dtype`` (:data:`LABEL_DTYPES`).

    Raises:
        RegistrationRequestError: 400 for an unknown dtype or extension, 422 when a value does not fit ``dtype``.
    """
    import gzip

    path = os.fspath(path)
    parse_choice(dtype, "result_dtype", tuple(LABEL_DTYPES))
    np_dtype = LABEL_DTYPES[dtype]
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np_dtype).max):
        raise RegistrationRequestError(
            f"The label map holds values {labels.min()}..{labels.max()}, which do not fit result_dtype {dtype}.", 422)
    out = labels.astype(np_dtype)
    if path.endswith((".nii", ".nii.gz")):
        return write_nifti(path, out, affine)
    if path.endswith(".nrrd"):
        if out.ndim != 3:
            raise RegistrationRequestError(f"NRRD output is written for 3D label maps, got {out.ndim}D.", 422)
        from monai_gradicon.io_utils import atomic_write

        header = _nrrd_header(out, affine, {"uint8": "uint8", "uint16": "uint16"}[dtype])
        payload = gzip.compress(np.ascontiguousarray(out.astype(out.dtype.newbyteorder("<"))).tobytes(order="F"),
                                compresslevel=6)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(header + payload)

        return atomic_write(path, write)
    raise RegistrationRequestError(f"result_extension must be .nii.gz, .nii or .nrrd, got {os.path.basename(path)!r}.",
                                   400)
