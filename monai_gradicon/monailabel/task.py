"""The MONAI Label infer task. Importing this module imports ``monailabel`` (install ``monai-gradicon[monailabel]``
into its own environment, see ``docs/monailabel.md``); ``import monai_gradicon`` never does.

Request contract (``POST /infer/<bundle name>?image=<moving id>``, form field ``params`` = JSON):

* ``image``: the **moving** image (datastore id, server path, or the uploaded ``file`` part).
* ``fixed_image`` in ``params``: the **fixed** image (datastore id or server path); alternatively upload the fixed
  image as the ``label`` part. The app resolves ids to paths (:meth:`GradICONRegistrationTask.resolve_request`).
* optional ``params``: ``io_iterations`` (instance optimization steps, default 0), ``ddf_units`` (``mm`` default,
  or ``voxel``), ``padding_mode`` (``border`` default, or ``zeros``), ``orientation`` (``physical`` default, or
  ``index``), ``transform_scheme`` (``grid`` default, or ``exact``), ``result`` (which file is streamed back:
  ``warped`` default, or ``ddf``), and ``fixed_mask`` / ``moving_mask`` (ids or paths, e.g. lung masks).

The registration is :mod:`monai_gradicon.pipeline`, the same stages as the command line and the bundles.

Response: the warped moving image (float32 NIfTI on the fixed grid, the fixed image's affine), or the field with
``result=ddf``; the JSON part (``output=json`` / ``output=all``) holds ``ddf`` and ``warped_image`` (paths on the
server, kept for an hour), ``ddf_units``, ``ddf_convention`` and timing. Request errors become HTTP 4xx with a
message (see :class:`monai_gradicon.monailabel.pipeline.RegistrationRequestError`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monailabel.tasks.infer.basic_infer import BasicInferTask

from monai_gradicon.monailabel.pipeline import (
    DDF_UNITS,
    MASK_KEYS,
    PADDING_MODES,
    GradICONBundle,
    RegistrationRequestError,
    finish_registration,
    load_bundle,
    parse_choice,
    parse_int,
    prepare_request,
    run_registration,
    write_outputs,
)
from monai_gradicon.pipeline import ORIENTATIONS, TRANSFORM_SCHEMES

logger = logging.getLogger(__name__)

__all__ = ["GradICONRegistrationTask", "REGISTRATION_TYPE", "OUTPUT_SUBDIR"]

REGISTRATION_TYPE = "registration"
"""The task's ``type`` in ``/info`` (MONAI Label has no registration ``InferType``; clients ignore unknown types)."""

OUTPUT_SUBDIR = "gradicon_monailabel"
_MAX_OUTPUT_AGE_S = 3600.0
_RESULTS = ("warped", "ddf")
_PREPARED = "gradicon_prepared"
_TRANSFORMS = "gradicon_transforms"
_OUTPUTS = "gradicon_outputs"
_INFO = "gradicon_info"


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


class GradICONRegistrationTask(BasicInferTask):
    """Serve a GradICON bundle as a registration task (moving = ``image``, fixed = ``params["fixed_image"]``).

    Args:
        bundle_path: the bundle folder (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``).
        name: model name (default: the folder name).
        output_dir: where result files are written (default ``<tmp>/gradicon_monailabel``); files older than an hour
            are removed at the next request. The streamed file is deleted by MONAI Label once sent.
        io_iterations: default instance optimization steps (a request may override it; 0 = off).
        max_io_iterations: upper bound a request may ask for.
        bundle: an already loaded :class:`GradICONBundle` (tests).
    """

    def __init__(
        self,
        bundle_path: str | os.PathLike | None = None,
        name: str | None = None,
        output_dir: str | None = None,
        io_iterations: int = 0,
        max_io_iterations: int = 500,
        bundle: GradICONBundle | None = None,
        description: str | None = None,
    ) -> None:
        if bundle is None:
            if bundle_path is None:
                raise ValueError("Give bundle_path or bundle.")
            bundle = load_bundle(bundle_path, name=name)
        self.bundle = bundle
        self.name = name or bundle.name
        self.output_dir = output_dir or os.path.join(tempfile.gettempdir(), OUTPUT_SUBDIR)
        self.max_io_iterations = int(max_io_iterations)
        self.default_io_iterations = parse_int(io_iterations, "io_iterations", 0, self.max_io_iterations)
        super().__init__(
            path=os.path.join(bundle.root, "models", "model.pt"),
            network=bundle.network,
            type=REGISTRATION_TYPE,
            labels=None,
            dimension=bundle.spatial_dims,
            description=description or bundle.description,
            input_key="image",
            output_label_key="pred",
            output_json_key="gradicon_result",  # not "result": that is a request param here
            config={
                "io_iterations": self.default_io_iterations,
                "ddf_units": "mm",
                "padding_mode": "border",
                "orientation": "physical",
                "transform_scheme": "grid",
                "result": "warped",
            },
            load_strict=True,
        )

    # -- info -----------------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update(
            {
                "bundle": self.bundle.root,
                "bundle_version": self.bundle.version,
                "network_shape": list(self.bundle.network_shape or []),
                "model_card": self.bundle.card.to_dict(),
                "inputs": {
                    "image": "moving image (id, path or uploaded 'file')",
                    "fixed_image": "fixed image (params: id or path; or uploaded 'label')",
                    **{k: "params: id or path (optional)" for k in MASK_KEYS},
                },
                "outputs": {"pred": "warped moving image on the fixed grid", "ddf": "displacement field (result JSON)"},
            }
        )
        return info

    def is_valid(self) -> bool:
        return True

    # -- request ---------------------------------------------------------------------------------------------------
    def resolve_request(self, request: dict, resolve_id: Callable[[str], str] | None = None) -> dict:
        """Resolve ``image``, ``fixed_image`` and the bundle's extra keys from datastore ids to paths.

        ``resolve_id(id) -> path`` returns ``""`` for an unknown id (``Datastore.get_image_uri``). An uploaded
        ``label`` part is taken as the fixed image when ``fixed_image`` is not in params.
        """
        request = dict(request)
        if not request.get("fixed_image") and request.get("label"):
            request["fixed_image"] = request["label"]
        for key, what in (("image", "moving image"), ("fixed_image", "fixed image"), *((k, k) for k in MASK_KEYS)):
            value = request.get(key)
            if value is None or value == "":
                if key == "fixed_image":
                    raise RegistrationRequestError(
                        "No fixed image given: pass params {\"fixed_image\": \"<image id or path>\"} or upload the "
                        "fixed image as the 'label' part of the request.",
                        400,
                    )
                if key == "image":
                    raise RegistrationRequestError("No moving image given (the 'image' query parameter).", 400)
                continue
            if not isinstance(value, str):
                raise RegistrationRequestError(f"The {what} must be an image id or a path, got {value!r}.", 400)
            if os.path.exists(value):
                continue
            path = resolve_id(value) if resolve_id is not None else ""
            if not path:
                raise RegistrationRequestError(
                    f"The {what} {value!r} is neither an image id of this server's datastore nor an existing path.",
                    404,
                )
            request[key] = path
        return request

    # -- pre / infer / post ----------------------------------------------------------------------------------------
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [PrepareRegistrationPair(self._prepare)]

    def _prepare(self, data: dict) -> dict:
        for key in ("io_iterations", "ddf_units", "padding_mode", "orientation", "transform_scheme", "result"):
            if key not in data:
                data[key] = self._config[key]
        data["io_iterations"] = parse_int(data.get("io_iterations"), "io_iterations", 0, self.max_io_iterations)
        parse_choice(data.get("ddf_units"), "ddf_units", DDF_UNITS)
        parse_choice(data.get("padding_mode"), "padding_mode", PADDING_MODES)
        parse_choice(data.get("orientation"), "orientation", ORIENTATIONS)
        parse_choice(data.get("transform_scheme"), "transform_scheme", TRANSFORM_SCHEMES)
        parse_choice(data.get("result"), "result", _RESULTS)
        masks = {k: data.get(k) for k in MASK_KEYS}
        prepared = prepare_request(self.bundle, data.get("image"), data.get("fixed_image"), masks,
                                   io_iterations=data["io_iterations"], orientation=data["orientation"],
                                   transform_scheme=data["transform_scheme"])
        data[_PREPARED] = prepared
        data[self.input_key] = prepared.network_input[0]
        return data

    def inferer(self, data=None):
        return None

    def _get_network(self, device, data):
        return self.bundle.network

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        device = _device_name(device)
        transforms = run_registration(self.bundle, data[_PREPARED], device)
        data[_TRANSFORMS] = transforms
        info: dict[str, Any] = {"device": device, "instance_optimization_steps": len(transforms.io_history)}
        if transforms.io_history:
            info["instance_optimization_seconds"] = round(transforms.seconds, 3)
            info["instance_optimization_loss"] = [round(transforms.io_history[0]["loss"], 6),
                                                  round(transforms.io_history[-1]["loss"], 6)]
        data[_INFO] = info
        return data

    def inverse_transforms(self, data=None):
        return None  # never undo anything on the field: the pipeline computes it on the original grids

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [WarpToFixedGrid(self._resample)]

    def _resample(self, data: dict) -> dict:
        device = _device_name(data.get("device"))
        fields = finish_registration(data[_PREPARED], data.pop(_TRANSFORMS), device, data.get("padding_mode", "border"))
        data[_OUTPUTS] = fields
        fixed = data[_PREPARED].inputs.fixed
        warped = MetaTensor(torch.from_numpy(fields.warped_moving), affine=torch.as_tensor(fixed.affine))
        data[self.output_label_key] = warped  # on the fixed grid already: no Restored / inverse transforms
        return data

    # -- writer ----------------------------------------------------------------------------------------------------
    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        os.makedirs(self.output_dir, exist_ok=True)
        _prune_old_files(self.output_dir, _MAX_OUTPUT_AGE_S)
        stem = f"{self.name}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:8]}"
        warped_path = os.path.join(self.output_dir, f"{stem}_warped.nii.gz")
        ddf_path = os.path.join(self.output_dir, f"{stem}_ddf.nii.gz")
        prepared = data[_PREPARED]
        result = write_outputs(prepared, data[_OUTPUTS], warped_path, ddf_path, data.get("ddf_units", "mm"))
        result.update(data.get(_INFO, {}))
        result.update(
            {
                "model": self.name,
                "bundle_version": self.bundle.version,
                "moving_image": prepared.inputs.moving.path,
                "fixed_image": prepared.inputs.fixed.path,
                "network_shape": list(prepared.settings.input_shape),
                "result": data.get("result", "warped"),
            }
        )
        # MONAI Label deletes the file it streams back; stream a copy so both paths in the JSON stay valid (until
        # they are pruned, an hour later).
        source = ddf_path if data.get("result") == "ddf" else warped_path
        streamed = os.path.join(self.output_dir, f"{stem}_response.nii.gz")
        shutil.copyfile(source, streamed)
        result["kept_for_seconds"] = int(_MAX_OUTPUT_AGE_S)
        return streamed, result


_OUTPUT_SUFFIXES = ("_warped.nii.gz", "_ddf.nii.gz", "_response.nii.gz")


def _prune_old_files(folder: str, max_age_s: float) -> None:
    """Delete this task's result files (by their suffixes only) older than ``max_age_s`` in ``folder``."""
    now = time.time()
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        path = os.path.join(folder, entry)
        try:
            if entry.endswith(_OUTPUT_SUFFIXES) and os.path.isfile(path) and now - os.path.getmtime(path) > max_age_s:
                os.unlink(path)
        except OSError:
            pass


def registration_http_error(exc: RegistrationRequestError):
    """The FastAPI ``HTTPException`` for a request error (4xx, the message as ``detail``)."""
    from fastapi import HTTPException

    return HTTPException(status_code=exc.status_code, detail=str(exc))


def resolve_with_datastore(datastore) -> Callable[[str], str]:
    """``id -> path`` via ``datastore.get_image_uri`` ("" for unknown ids or datastore errors)."""

    def resolve(image_id: str) -> str:
        try:
            return datastore.get_image_uri(image_id) or ""
        except Exception:  # remote datastores raise on unknown ids
            return ""

    return resolve


def resolve_and_mark(task: GradICONRegistrationTask, request: Mapping[str, Any], datastore) -> dict:
    """Resolve a request for ``task`` and turn off ``save_label`` (the warped image is not a label)."""
    request = task.resolve_request(dict(request), resolve_with_datastore(datastore) if datastore else None)
    request["save_label"] = False
    return request
