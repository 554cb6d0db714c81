"""The MONAI Label infer tasks. Importing this module imports ``monailabel`` (install ``monai-gradicon[monailabel]``
into its own environment, see ``docs/monailabel.md``); ``import monai_gradicon`` never does.

Two tasks per bundle, both running :mod:`monai_gradicon.pipeline` (the stages of the command line and the bundles):

* :class:`GradICONRegistrationTask` (type ``registration``, for API clients): ``POST /infer/<bundle>?image=<moving>``
  with ``params = {"fixed_image": <id>}`` (or the fixed image uploaded as ``label``). Optional params:
  ``io_iterations`` (instance optimization steps, default 0, at most the app's ``max_io_iterations``), ``ddf_units``
  (``mm`` / ``voxel``), ``padding_mode`` (``border`` / ``zeros``), ``orientation`` (``physical`` / ``index``),
  ``transform_scheme`` (``grid`` / ``exact``), ``result`` (the streamed file: ``warped``, ``ddf`` or ``zip`` = warped
  image + field + summary JSON in one archive), ``fixed_mask`` / ``moving_mask`` (datastore ids).
* :class:`GradICONPropagationTask` (type ``segmentation``, what the 3D Slicer plugin lists under *Auto
  segmentation*): ``image`` is the user's scan (the **fixed** image); ``params["reference"]`` names a labelled
  reference (``atlas:<name>`` from the app's atlas folders, or the id of a datastore image with a final label),
  which is registered onto the scan (it is the **moving** image); the reference's label map comes back warped onto
  the scan with nearest-neighbour interpolation, in the format the request asks for (``result_extension``
  ``.nii.gz`` / ``.nrrd``, ``result_dtype`` ``uint8`` / ``uint16``, as the plugin sends), with ``label_names``
  ``{name: value}`` of the segments present in it.

Every parameter is checked by :meth:`_GradICONTask.validate_request` before the request waits in the queue or any
image is read; request problems raise :class:`~monai_gradicon.monailabel.pipeline.RegistrationRequestError`
(HTTP 4xx / 503 with a message).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from monai_gradicon.monailabel.pipeline import (
    DDF_UNITS,
    DEFAULT_MAX_INPUT_VOXELS,
    LABEL_DTYPES,
    MASK_KEYS,
    PADDING_MODES,
    GradICONBundle,
    LabelReference,
    RegistrationRequestError,
    RequestDeadline,
    check_input_size,
    finish_registration,
    load_bundle,
    parse_choice,
    parse_int,
    prepare_request,
    propagate_labels,
    prune_outputs,
    remove_files,
    run_registration,
    write_label_map,
    write_outputs,
)
from monai_gradicon.pipeline import ORIENTATIONS, TRANSFORM_SCHEMES

logger = logging.getLogger(__name__)

__all__ = [
    "GradICONRegistrationTask",
    "GradICONPropagationTask",
    "ServingLimits",
    "REGISTRATION_TYPE",
    "OUTPUT_SUBDIR",
    "OUTPUT_SUFFIXES",
    "TrustedInputs",
    "trusted_inputs",
    "datastore_resolver",
]

REGISTRATION_TYPE = "registration"
"""The registration task's ``type`` in ``/info`` (MONAI Label has no registration ``InferType``; the Slicer plugin
lists only segmentation/detection, deepgrow/deepedit and scribbles types, so this task is for API clients)."""

OUTPUT_SUBDIR = "gradicon_monailabel"
OUTPUT_SUFFIXES = ("_warped.nii.gz", "_ddf.nii.gz", "_response.nii.gz", "_response.zip", "_labels.nii.gz",
                   "_labels.nii", "_labels.nrrd")
"""Name endings of the files the tasks write into their output folder (pruning touches nothing else)."""

_RESULTS = ("warped", "ddf", "zip")
_RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
_PREPARED = "gradicon_prepared"
_TRANSFORMS = "gradicon_transforms"
_OUTPUTS = "gradicon_outputs"
_INFO = "gradicon_info"
_DEADLINE = "gradicon_deadline"
_REFERENCE = "gradicon_reference"
_LABEL_NAMES = "gradicon_label_names"


@dataclass(frozen=True)
class ServingLimits:
    """What one request may cost. Defaults keep a request to a few minutes on CPU with the demo bundles.

    Attributes:
        max_io_iterations: the most instance-optimization steps a request may ask for (a lung step at 175^3 took
            48-95 s on CPU in issue 18's measurement).
        max_input_voxels: the largest image, in voxels, read from the header before any work (413 above it).
        max_request_seconds: wall time from the start of the work (after the queue) to the result; checked between
            stages and before every instance-optimization step (503 once passed); ``None``: unbounded.
        output_max_age_s: result files older than this are deleted (at every write and by the app's timer).
        output_max_bytes: the result folder is pruned, oldest first, to at most this many bytes.
    """

    max_io_iterations: int = 5
    max_input_voxels: int = DEFAULT_MAX_INPUT_VOXELS
    max_request_seconds: float | None = 300.0
    output_max_age_s: float = 600.0
    output_max_bytes: int = 2 * 1024**3

    def __post_init__(self) -> None:
        if self.max_io_iterations < 0 or self.max_input_voxels < 1 or self.output_max_age_s < 0 \
                or self.output_max_bytes < 0:
            raise ValueError(f"ServingLimits must be non-negative (max_input_voxels >= 1), got {self}.")
        if self.max_request_seconds is not None and not self.max_request_seconds > 0:
            raise ValueError(f"max_request_seconds must be positive or None, got {self.max_request_seconds!r}.")


@dataclass(frozen=True)
class TrustedInputs:
    """Server-side paths that came from the server itself for the current request, not from the client: the
    temporary files of an uploaded ``file`` / ``label`` part, or a session's image. Set by
    :mod:`monai_gradicon.monailabel.server` around MONAI Label's own infer handler (a context variable, so a client
    cannot forge it through ``params``)."""

    image: bool = False
    label: bool = False


trusted_inputs: contextvars.ContextVar[TrustedInputs] = contextvars.ContextVar(
    "gradicon_trusted_inputs", default=TrustedInputs())


def _device_name(device: Any) -> str:
    name = device if isinstance(device, str) else str(device or "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return name


class _Step:
    """A named callable for MONAI Label's transform runner (which logs ``t.__class__.__name__`` and timings)."""

    def __init__(self, fn: Callable[[dict], dict]) -> None:
        self.fn = fn

    def __call__(self, data: dict) -> dict:
        return self.fn(data)


class PrepareRegistrationPair(_Step):
    pass


class WarpToFixedGrid(_Step):
    pass


class PropagateLabels(_Step):
    pass


def datastore_resolver(datastore) -> Callable[[str], str]:
    """``id -> path`` via ``datastore.get_image_uri`` ("" for unknown ids or datastore errors)."""

    def resolve(image_id: str) -> str:
        try:
            return datastore.get_image_uri(image_id) or ""
        except Exception:  # remote datastores raise on unknown ids
            return ""

    return resolve


def _names_from_label_info(info: Mapping[str, Any]) -> dict[str, int] | None:
    """Segment names a datastore keeps with a label: ``label_info`` ``[{"name", "idx" | "id"}]`` (the Slicer
    plugin's *Submit label*), ``params.label_names`` (a saved inference result) or ``label_names``."""
    entries = info.get("label_info")
    if isinstance(entries, list):
        names = {}
        for entry in entries:
            if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
                value = entry.get("idx", entry.get("id"))
                if isinstance(value, int) and not isinstance(value, bool):
                    names[entry["name"]] = value
        return names or None
    params = info.get("params")
    for candidate in (params.get("label_names") if isinstance(params, Mapping) else None, info.get("label_names")):
        if isinstance(candidate, Mapping):
            return {str(k): v for k, v in candidate.items()}
    return None


class _GradICONTask(BasicInferTask):
    """What both tasks share: the bundle, the limits, request checking, the pipeline's pre / infer steps.

    Args:
        bundle_path: the bundle folder (``configs/metadata.json``, ``models/model.pt``).
        name: model name (default: the folder name).
        output_dir: where result files are written (default ``<tmp>/gradicon_monailabel``); this task's files
            there are pruned by age and total size (:class:`ServingLimits`). The streamed file is deleted by MONAI
            Label once sent.
        io_iterations: default instance optimization steps (a request may override it up to the limit; 0 = off).
        limits: :class:`ServingLimits`.
        allow_server_paths: accept server file paths in requests (local use only). Off: only datastore ids and
            uploads, and an unknown value is answered 404 whatever exists on the server.
        bundle: an already loaded :class:`GradICONBundle` (tests).
    """

    task_type: str = REGISTRATION_TYPE

    def __init__(
        self,
        bundle_path: str | os.PathLike | None = None,
        name: str | None = None,
        output_dir: str | None = None,
        io_iterations: int = 0,
        limits: ServingLimits | None = None,
        allow_server_paths: bool = False,
        bundle: GradICONBundle | None = None,
        description: str | None = None,
        labels: Mapping[str, int] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if bundle is None:
            if bundle_path is None:
                raise ValueError("Give bundle_path or bundle.")
            bundle = load_bundle(bundle_path, name=name)
        self.bundle = bundle
        self.name = name or bundle.name
        self.output_dir = output_dir or os.path.join(tempfile.gettempdir(), OUTPUT_SUBDIR)
        self.limits = limits or ServingLimits()
        self.allow_server_paths = bool(allow_server_paths)
        self.default_io_iterations = parse_int(io_iterations, "io_iterations", 0, self.limits.max_io_iterations)
        super().__init__(
            path=os.path.join(bundle.root, "models", "model.pt"),
            network=bundle.network,
            type=self.task_type,
            labels=dict(labels) if labels else None,
            dimension=bundle.spatial_dims,
            description=description or bundle.description,
            input_key="image",
            output_label_key="pred",
            output_json_key="gradicon_result",  # not "result": that is a request param here
            config={"io_iterations": self.default_io_iterations, "orientation": "physical",
                    "transform_scheme": "grid", **dict(config or {})},
            load_strict=True,
        )

    # -- info -----------------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update(
            {
                "bundle_version": self.bundle.version,
                "network_shape": list(self.bundle.network_shape or []),
                "model_card": self.bundle.card.to_dict(),
                "limits": {"max_io_iterations": self.limits.max_io_iterations,
                           "max_input_voxels": self.limits.max_input_voxels,
                           "max_request_seconds": self.limits.max_request_seconds},
            }
        )
        return info

    def is_valid(self) -> bool:
        return True

    # -- request checking (before the queue, before any image is read) ---------------------------------------------
    def _value(self, request: Mapping[str, Any], key: str) -> Any:
        """A request value, or the task's default; the Slicer plugin sends list-valued options as their first item
        and so may a client (``["a", "b"]`` means ``"a"``)."""
        value = request.get(key, self._config.get(key))
        return value[0] if isinstance(value, list) and value else value

    def validate_request(self, request: dict) -> dict:
        """Check and normalise the parameters both tasks share (``io_iterations``, ``orientation``,
        ``transform_scheme``); subclasses add theirs. Returns the request with normalised values.

        Raises:
            RegistrationRequestError: 400 naming the parameter and the allowed values.
        """
        request["io_iterations"] = parse_int(self._value(request, "io_iterations"), "io_iterations", 0,
                                             self.limits.max_io_iterations)
        request["orientation"] = parse_choice(self._value(request, "orientation"), "orientation", ORIENTATIONS)
        request["transform_scheme"] = parse_choice(self._value(request, "transform_scheme"), "transform_scheme",
                                                   TRANSFORM_SCHEMES)
        return request

    def resolve_image(self, value: Any, what: str, resolve_id: Callable[[str], str] | None,
                      trusted: bool = False) -> str:
        """A datastore id (or, when trusted or ``allow_server_paths``, a server path) -> a path whose size is
        within the limit.

        With ``allow_server_paths`` off an unknown value is answered 404 without looking at the server's files, so
        a client learns nothing about which server paths exist.
        """
        if value is None or value == "" or (isinstance(value, list) and not value):
            raise RegistrationRequestError(f"No {what} given.", 400)
        if not isinstance(value, str):
            raise RegistrationRequestError(f"The {what} must be an image id, got {value!r}.", 400)
        if trusted:
            path = value
        else:
            path = resolve_id(value) if resolve_id is not None else ""
            if not path and self.allow_server_paths and os.path.isfile(value):
                path = value
            if not path:
                where = "an image id of this server's datastore" + (
                    " nor an existing file" if self.allow_server_paths else
                    " (server paths are not accepted; upload the file instead)")
                raise RegistrationRequestError(f"The {what} {value!r} is not {where}.", 404)
        check_input_size(path, what, self.limits.max_input_voxels)
        return path

    def resolve_request(self, request: dict, resolve_id: Callable[[str], str] | None = None,
                        datastore=None, trusted: TrustedInputs | None = None) -> dict:
        """Validate every parameter, then resolve ids to paths and check each input's size from its header
        (nothing is read or queued before this passes). Subclasses resolve their inputs."""
        raise NotImplementedError

    # -- pipeline steps --------------------------------------------------------------------------------------------
    def inferer(self, data=None):
        return None

    def _get_network(self, device, data):
        return self.bundle.network

    def inverse_transforms(self, data=None):
        return None  # never undo anything on the field: the pipeline computes it on the original grids

    def _start(self, data: dict) -> RequestDeadline:
        deadline = RequestDeadline(self.limits.max_request_seconds)
        data[_DEADLINE] = deadline
        return deadline

    def _prepare_pair(self, data: dict, moving: Any, fixed: Any, masks: dict | None) -> dict:
        """Stages 1-2 of the pipeline for a validated request (``moving`` / ``fixed``: paths or images; ``masks``:
        the mask keys or None), within the request's size bound; the prepared pair and the network input go into
        ``data``."""
        prepared = prepare_request(self.bundle, moving, fixed, masks, io_iterations=data["io_iterations"],
                                   orientation=data["orientation"], transform_scheme=data["transform_scheme"],
                                   max_voxels=self.limits.max_input_voxels)
        data[_PREPARED] = prepared
        data[self.input_key] = prepared.network_input[0]
        return data

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        device = _device_name(device)
        transforms = run_registration(self.bundle, data[_PREPARED], device, data[_DEADLINE])
        data[_TRANSFORMS] = transforms
        info: dict[str, Any] = {"device": device, "instance_optimization_steps": len(transforms.io_history)}
        if transforms.io_history:
            info["instance_optimization_seconds"] = round(transforms.seconds, 3)
            info["instance_optimization_loss"] = [round(transforms.io_history[0]["loss"], 6),
                                                  round(transforms.io_history[-1]["loss"], 6)]
        data[_INFO] = info
        return data

    def _fields(self, data: dict, padding_mode: str = "border"):
        data[_DEADLINE].check("before the transform on the original grids")
        device = _device_name(data.get("device"))
        fields = finish_registration(data[_PREPARED], data.pop(_TRANSFORMS), device, padding_mode)
        data[_OUTPUTS] = fields
        return fields

    def _stem(self) -> str:
        return f"{self.name}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:8]}"

    def prune(self) -> list[str]:
        """Delete this task's old result files (:class:`ServingLimits` age and size bounds)."""
        return prune_outputs(self.output_dir, OUTPUT_SUFFIXES, self.limits.output_max_age_s,
                             self.limits.output_max_bytes)

    def _summary(self, data: dict) -> dict[str, Any]:
        prepared = data[_PREPARED]
        fields = data[_OUTPUTS]
        magnitude = np.sqrt((fields.displacement.astype(np.float64) ** 2).sum(axis=0))
        return {
            **data.get(_INFO, {}),
            "model": self.name,
            "bundle_version": self.bundle.version,
            "network_shape": list(prepared.settings.input_shape),
            "displacement_mm_mean": round(float(magnitude.mean()), 4),
            "displacement_mm_max": round(float(magnitude.max()), 4),
            "folds_percent": round(fields.folds_percent, 6),
            "settings": prepared.settings.to_dict(),
        }


class GradICONRegistrationTask(_GradICONTask):
    """Serve a GradICON bundle as a registration task (moving = ``image``, fixed = ``params["fixed_image"]``).

    Response: the warped moving image (float32 NIfTI on the fixed grid, the fixed image's affine), the field with
    ``result=ddf``, or a zip archive with ``result=zip`` (``warped.nii.gz``, ``ddf_mm.nii.gz`` or
    ``ddf_voxels.nii.gz``, ``summary.json``: everything one request computed, for remote clients). See
    :class:`_GradICONTask` for the arguments.
    """

    task_type = REGISTRATION_TYPE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("config", {"ddf_units": "mm", "padding_mode": "border", "result": "warped"})
        super().__init__(*args, **kwargs)

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["inputs"] = {
            "image": "moving image (datastore id or uploaded 'file')",
            "fixed_image": "fixed image (params: datastore id; or uploaded 'label')",
            **{k: "params: datastore id (optional)" for k in MASK_KEYS},
        }
        info["outputs"] = {"pred": "warped moving image on the fixed grid (result=warped)",
                           "ddf": "displacement field (result=ddf)", "zip": "warped + field + summary (result=zip)"}
        return info

    def validate_request(self, request: dict) -> dict:
        request = super().validate_request(request)
        request["ddf_units"] = parse_choice(self._value(request, "ddf_units"), "ddf_units", DDF_UNITS)
        request["padding_mode"] = parse_choice(self._value(request, "padding_mode"), "padding_mode", PADDING_MODES)
        request["result"] = parse_choice(self._value(request, "result"), "result", _RESULTS)
        unknown = sorted(k for k in request if k.endswith("_mask") and k not in MASK_KEYS)
        if unknown:
            raise RegistrationRequestError(f"Unknown mask parameters {unknown}; use {list(MASK_KEYS)}.", 400)
        return request

    def resolve_request(self, request: dict, resolve_id: Callable[[str], str] | None = None,
                        datastore=None, trusted: TrustedInputs | None = None) -> dict:
        """Validate, then resolve ``image`` (moving), ``fixed_image`` (or the uploaded ``label`` part) and the masks
        to paths within the size limit.

        ``resolve_id(id) -> path`` returns ``""`` for an unknown id (``Datastore.get_image_uri``).
        """
        trusted = trusted or TrustedInputs()
        request = self.validate_request(dict(request))
        fixed_trusted = False
        if request.get("fixed_image") in (None, ""):
            if request.get("label") in (None, ""):
                raise RegistrationRequestError(
                    "No fixed image given: pass params {\"fixed_image\": \"<image id>\"} or upload the fixed image "
                    "as the 'label' part of the request.",
                    400,
                )
            request["fixed_image"] = request["label"]
            fixed_trusted = trusted.label
        if request.get("image") in (None, ""):
            raise RegistrationRequestError("No moving image given: pass ?image=<image id> or upload it as 'file'.",
                                           400)
        request["image"] = self.resolve_image(request["image"], "moving image", resolve_id, trusted.image)
        request["fixed_image"] = self.resolve_image(request["fixed_image"], "fixed image", resolve_id, fixed_trusted)
        for key in MASK_KEYS:
            if request.get(key) not in (None, ""):
                request[key] = self.resolve_image(request[key], key.replace("_", " "), resolve_id)
        request["save_label"] = False  # the warped image is not a label of the moving image
        return request

    # -- pre / infer / post ----------------------------------------------------------------------------------------
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [PrepareRegistrationPair(self._prepare)]

    def _prepare(self, data: dict) -> dict:
        self._start(data)
        self.validate_request(data)  # also for direct calls of the task (tests, batch use)
        masks = {k: data.get(k) for k in MASK_KEYS}
        return self._prepare_pair(data, data.get("image"), data.get("fixed_image"), masks)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [WarpToFixedGrid(self._resample)]

    def _resample(self, data: dict) -> dict:
        fields = self._fields(data, data["padding_mode"])
        fixed = data[_PREPARED].inputs.fixed
        warped = MetaTensor(torch.from_numpy(fields.warped_moving), affine=torch.as_tensor(fixed.affine))
        data[self.output_label_key] = warped  # on the fixed grid already: no Restored / inverse transforms
        return data

    # -- writer ----------------------------------------------------------------------------------------------------
    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        data[_DEADLINE].check("before writing the results")
        os.makedirs(self.output_dir, exist_ok=True)
        self.prune()
        stem = self._stem()
        warped_path = os.path.join(self.output_dir, f"{stem}_warped.nii.gz")
        ddf_path = os.path.join(self.output_dir, f"{stem}_ddf.nii.gz")
        result_kind = data["result"]
        streamed = os.path.join(self.output_dir, f"{stem}_response.{'zip' if result_kind == 'zip' else 'nii.gz'}")
        try:
            result = write_outputs(data[_PREPARED], data[_OUTPUTS], warped_path, ddf_path, data["ddf_units"])
            result.update(self._summary(data))
            result["result"] = result_kind
            # MONAI Label deletes the file it streams back; stream a copy so both files stay for local clients
            # until they are pruned
            if result_kind == "zip":
                with zipfile.ZipFile(streamed, "w", compression=zipfile.ZIP_STORED) as z:
                    z.write(warped_path, "warped.nii.gz")
                    z.write(ddf_path, "ddf_mm.nii.gz" if data["ddf_units"] == "mm" else "ddf_voxels.nii.gz")
                    z.writestr("summary.json", json.dumps(result, indent=2, default=str))
            else:
                shutil.copyfile(ddf_path if result_kind == "ddf" else warped_path, streamed)
        except BaseException:
            remove_files([warped_path, ddf_path, streamed])
            raise
        result["kept_for_seconds"] = int(self.limits.output_max_age_s)
        return streamed, result


class GradICONPropagationTask(_GradICONTask):
    """Label propagation as a segmentation task (what the 3D Slicer plugin shows under *Auto segmentation*).

    ``image`` is the scan to segment (the **fixed** image B). ``params["reference"]`` picks a labelled reference
    (the **moving** image A): ``atlas:<name>`` (an atlas folder of the app) or the id of a datastore image that has
    a final label. The bundle registers A onto B with the pipeline; the reference's label map is carried onto B's
    grid through the same displacement with nearest-neighbour interpolation
    (:func:`monai_gradicon.monailabel.pipeline.propagate_labels`). The result is a label map on the scan's grid
    (its affine) in ``result_extension`` (``.nii.gz`` default, ``.nrrd``) and ``result_dtype`` (``uint8`` default,
    ``uint16``); the result JSON's ``label_names`` is ``{name: value}`` of the segments present.

    Args:
        atlases: ``{"atlas:<name>": LabelReference}`` offered in the ``reference`` option (first = default).
        list_datastore_references: also offer the datastore's images with a final label in ``/info``.
        (the rest: see :class:`_GradICONTask`)
    """

    task_type = InferType.SEGMENTATION

    def __init__(self, *args: Any, atlases: Mapping[str, LabelReference] | None = None,
                 list_datastore_references: bool = True, **kwargs: Any) -> None:
        self.atlases = dict(atlases or {})
        self.list_datastore_references = bool(list_datastore_references)
        self._datastore = None
        names: dict[str, int] = {}
        for ref in self.atlases.values():
            for label_name, value in ref.label_names.items():
                names.setdefault(label_name, value)
        kwargs.setdefault("labels", names or None)
        kwargs.setdefault("config", {"reference": list(self.atlases), "result_extension": ".nii.gz",
                                     "result_dtype": "uint8"})
        description = kwargs.pop("description", None)
        super().__init__(*args, **kwargs)
        self.description = description or (
            f"GradICON label propagation ({self.bundle.name}): registers a labelled reference (option 'reference') "
            "onto the current image and returns its labels there")

    def attach_datastore(self, datastore) -> None:
        """The datastore whose labelled images are offered (and accepted) as references."""
        self._datastore = datastore

    def references(self) -> list[str]:
        """The ``reference`` choices: atlases first (the default is the first), then labelled datastore images."""
        names = list(self.atlases)
        if self.list_datastore_references and self._datastore is not None:
            try:
                names += [i for i in self._datastore.get_labeled_images(label_tag="final") if i not in names]
            except Exception as exc:  # a remote datastore that cannot list: atlases only
                logger.warning(f"Cannot list labelled images of the datastore: {exc}")
        return names

    def config(self) -> dict[str, Any]:
        config = dict(super().config())
        config["reference"] = self.references()
        return config

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["config"] = self.config()
        info["inputs"] = {"image": "the scan to label (fixed image; datastore id, session or uploaded 'file')",
                          "reference": "params: atlas:<name> or the id of a datastore image with a final label"}
        info["outputs"] = {"pred": "the reference's label map on the scan's grid (nearest neighbour)"}
        info["atlases"] = {name: {"labels": ref.label_names, "description": ref.description}
                           for name, ref in self.atlases.items()}
        return info

    def validate_request(self, request: dict) -> dict:
        request = super().validate_request(request)
        ext = self._value(request, "result_extension")
        if ext not in _RESULT_EXTENSIONS:
            raise RegistrationRequestError(
                f"result_extension must be one of {', '.join(_RESULT_EXTENSIONS)}, got {ext!r}.", 400)
        request["result_extension"] = ext
        request["result_dtype"] = parse_choice(self._value(request, "result_dtype"), "result_dtype",
                                               tuple(LABEL_DTYPES))
        reference = self._value(request, "reference")
        if reference in (None, ""):
            raise RegistrationRequestError(
                f"No reference given: pass params {{\"reference\": ...}} with one of {self.references()}.", 400)
        if not isinstance(reference, (str, LabelReference)):
            raise RegistrationRequestError(f"reference must be a name, got {reference!r}.", 400)
        request["reference"] = reference
        return request

    def resolve_reference(self, name: Any, datastore=None) -> LabelReference:
        """``atlas:<name>`` -> the atlas; otherwise a datastore image id with a final label."""
        if isinstance(name, LabelReference):
            return name
        if name in self.atlases:
            return self.atlases[name]
        if isinstance(name, str) and name.startswith("atlas:"):
            raise RegistrationRequestError(f"No atlas {name!r}; this task has {sorted(self.atlases)}.", 404)
        datastore = datastore if datastore is not None else self._datastore
        if datastore is None:
            raise RegistrationRequestError(f"No reference {name!r}; choose one of {self.references()}.", 404)
        from monai_gradicon.monailabel.pipeline import datastore_reference

        image_path = datastore_resolver(datastore)(name)
        label_path = ""
        if image_path:
            try:
                label_path = datastore.get_label_uri(name, "final") or ""
            except Exception:
                label_path = ""
        if not image_path or not label_path or not os.path.isfile(label_path):
            raise RegistrationRequestError(
                f"The reference {name!r} is neither an atlas of this task nor a datastore image with a final label; "
                f"choose one of {self.references()}.",
                404,
            )
        try:
            info = datastore.get_label_info(name, "final") or {}
        except Exception:
            info = {}
        check_input_size(label_path, "reference label map", self.limits.max_input_voxels)
        return datastore_reference(name, image_path, label_path, _names_from_label_info(info))

    def resolve_request(self, request: dict, resolve_id: Callable[[str], str] | None = None,
                        datastore=None, trusted: TrustedInputs | None = None) -> dict:
        """Validate, resolve the scan (``image``) and the reference (an atlas, or a labelled datastore image)."""
        trusted = trusted or TrustedInputs()
        request = self.validate_request(dict(request))
        if request.get("image") in (None, ""):
            raise RegistrationRequestError("No image given: pass ?image=<image id> or upload it as 'file'.", 400)
        request["image"] = self.resolve_image(request["image"], "image", resolve_id, trusted.image)
        reference = self.resolve_reference(request["reference"], datastore)
        check_input_size(reference.image, "reference image", self.limits.max_input_voxels)
        request["reference"] = reference.name
        request[_REFERENCE] = reference
        request["save_label"] = False
        return request

    # -- pre / infer / post ----------------------------------------------------------------------------------------
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [PrepareRegistrationPair(self._prepare)]

    def _prepare(self, data: dict) -> dict:
        self._start(data)
        self.validate_request(data)
        reference = data.get(_REFERENCE) or self.resolve_reference(data["reference"])
        data[_REFERENCE] = reference
        # the reference is the moving image A, the user's scan the fixed image B
        return self._prepare_pair(data, reference.image, data.get("image"), None)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [PropagateLabels(self._propagate)]

    def _propagate(self, data: dict) -> dict:
        fields = self._fields(data)
        labels, names = propagate_labels(data[_PREPARED], fields, data[_REFERENCE])
        fixed = data[_PREPARED].inputs.fixed
        data[self.output_label_key] = MetaTensor(torch.from_numpy(labels.astype(np.int32)),
                                                 affine=torch.as_tensor(fixed.affine))
        data[_LABEL_NAMES] = names
        return data

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        data[_DEADLINE].check("before writing the label map")
        os.makedirs(self.output_dir, exist_ok=True)
        self.prune()
        ext = data["result_extension"]
        path = os.path.join(self.output_dir, f"{self._stem()}_labels{ext}")
        prepared = data[_PREPARED]
        labels = data[self.output_label_key]
        labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        try:
            write_label_map(path, labels, prepared.inputs.fixed.affine, data["result_dtype"])
        except BaseException:
            remove_files([path])
            raise
        names = data[_LABEL_NAMES]
        result = self._summary(data)
        reference = data[_REFERENCE]
        result.update({
            "reference": reference.name,
            "reference_labels": reference.label_names,
            "labels_present": names,
            "label_voxels": {name: int(np.count_nonzero(labels == value)) for name, value in names.items()},
            "result_extension": ext,
            "result_dtype": data["result_dtype"],
        })
        result[_LABEL_NAMES] = names
        return path, result

    def __call__(self, request, callbacks=None):
        """BasicInferTask overwrites the result's ``label_names`` with the task's labels; put back the names of the
        segments actually present in this result (the Slicer plugin names segments from it, in value order)."""
        path, result = super().__call__(request, callbacks)
        if isinstance(result, dict) and _LABEL_NAMES in result:
            result["label_names"] = result.pop(_LABEL_NAMES)
        return path, result
