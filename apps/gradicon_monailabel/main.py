"""MONAI Label sample app: GradICON registration bundles served from local folders (no network access).

Start (see docs/monailabel.md)::

    monailabel start_server --app apps/gradicon_monailabel --studies <images folder> \
        --host 127.0.0.1 --port 8000 --uvicorn_app monai_gradicon.monailabel.server:app \
        --conf models gradicon_brain

``--uvicorn_app monai_gradicon.monailabel.server:app`` runs MONAI Label's own infer handler in a worker thread
(so ``/info`` answers during registrations), answers a request without an image with 400, removes rejected
uploads and refuses over-large bodies with 413; without it the app still works, with MONAI Label's blocking
handler.

Each bundle with weights becomes two infer tasks:

* ``<bundle>`` (type ``registration``): moving = ``image``, fixed = ``params["fixed_image"]`` or the uploaded
  ``label`` part;
* ``<bundle>_propagate`` (type ``segmentation``, shown by the 3D Slicer plugin): the current image is the fixed
  image, ``params["reference"]`` an atlas (``atlas:<name>``) or a labelled datastore image; the reference's labels
  come back on the current image's grid.

``--conf`` keys (all optional; see the table in docs/monailabel.md):

* ``models``: comma-separated bundle names, or ``all`` (default: every bundle found that has ``models/model.pt``).
* ``bundle_dirs``: folders holding ``<name>/configs/metadata.json`` bundles (default ``<app>/model``, then the
  repository's ``bundles/``). Nothing is downloaded.
* ``atlas_dirs``: folders holding ``<name>/atlas.json`` label atlases (default ``<app>/atlases``).
* ``io_iterations`` (0), ``max_io_iterations`` (5), ``max_input_voxels`` (40000000), ``max_request_seconds``
  (300; 0 = unbounded), ``max_concurrent`` (1), ``max_queue`` (8), ``max_queue_wait_seconds`` (600),
  ``max_upload_mb`` (1024), ``output_dir`` (``<tmp>/gradicon_monailabel``), ``output_max_age_seconds`` (600),
  ``output_max_mb`` (2048), ``prune_interval_seconds`` (60), ``allow_server_paths`` (false).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelException

from monai_gradicon.config import config_bool
from monai_gradicon.monailabel.pipeline import (
    DEFAULT_MAX_INPUT_VOXELS,
    RegistrationRequestError,
    RequestQueue,
    find_atlases,
    find_bundles,
    load_bundle,
)
from monai_gradicon.monailabel.task import (
    GradICONPropagationTask,
    GradICONRegistrationTask,
    ServingLimits,
    datastore_resolver,
    trusted_inputs,
)

logger = logging.getLogger(__name__)

_APP_DIR = os.path.dirname(os.path.realpath(__file__))
_REPO_BUNDLES = os.path.normpath(os.path.join(_APP_DIR, "..", "..", "bundles"))
PROPAGATE_SUFFIX = "_propagate"


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").replace(os.pathsep, ",").split(",") if v.strip()]


def _conf_number(conf: dict[str, str], key: str, default: float, kind: type = int, minimum: float = 0) -> Any:
    """A numeric ``--conf`` value; a malformed or negative one stops the server naming the key."""
    raw = conf.get(key)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        value = kind(str(raw).strip())
    except ValueError:
        raise ValueError(f"--conf {key} must be a {kind.__name__}, got {raw!r}.") from None
    if value < minimum:
        raise ValueError(f"--conf {key} must be >= {minimum}, got {value}.")
    return value


class GradICONRegistrationApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.bundle_dirs = _split(conf.get("bundle_dirs")) or [os.path.join(app_dir, "model"), _REPO_BUNDLES]
        self.bundle_dirs = [os.path.abspath(os.path.expanduser(d)) for d in self.bundle_dirs]
        self.atlas_dirs = [os.path.abspath(os.path.expanduser(d))
                           for d in (_split(conf.get("atlas_dirs")) or [os.path.join(app_dir, "atlases")])]
        seconds = _conf_number(conf, "max_request_seconds", 300.0, float)
        self.limits = ServingLimits(
            max_io_iterations=_conf_number(conf, "max_io_iterations", 5),
            max_input_voxels=_conf_number(conf, "max_input_voxels", DEFAULT_MAX_INPUT_VOXELS, minimum=1),
            max_request_seconds=seconds or None,
            output_max_age_s=_conf_number(conf, "output_max_age_seconds", 600.0, float),
            output_max_bytes=int(_conf_number(conf, "output_max_mb", 2048.0, float) * 1024**2),
        )
        self.max_upload_bytes = int(_conf_number(conf, "max_upload_mb", 1024.0, float, minimum=1) * 1024**2)
        self.allow_server_paths = config_bool(conf.get("allow_server_paths", "false"), "allow_server_paths")
        wait = _conf_number(conf, "max_queue_wait_seconds", 600.0, float)
        self.queue = RequestQueue(slots=_conf_number(conf, "max_concurrent", 1, minimum=1),
                                  max_waiting=_conf_number(conf, "max_queue", 8), max_wait_s=wait or None)
        self.prune_interval_s = _conf_number(conf, "prune_interval_seconds", 60.0, float)
        self._stop_pruning = threading.Event()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="GradICON registration",
            description="GradICON deformable registration and registration-based label propagation",
            version="0.2.0",
        )
        for task in self._infers.values():
            if isinstance(task, GradICONPropagationTask):
                task.attach_datastore(self.datastore())
        self._start_pruning()

    # -- tasks -----------------------------------------------------------------------------------------------------
    def init_infers(self) -> dict[str, Any]:
        names = _split(self.conf.get("models"))
        explicit = bool(names) and names != ["all"]
        bundles = find_bundles(self.bundle_dirs, names if explicit else None)
        atlases = find_atlases(self.atlas_dirs)
        common = {"output_dir": self.conf.get("output_dir"),
                  "io_iterations": _conf_number(self.conf, "io_iterations", 0),
                  "limits": self.limits, "allow_server_paths": self.allow_server_paths}
        infers: dict[str, Any] = {}
        for name, path in bundles.items():
            if not os.path.isfile(os.path.join(path, "models", "model.pt")):
                message = f"Bundle {name} at {path} has no models/model.pt"
                if explicit:
                    raise FileNotFoundError(message + "; train or export its weights first (docs/monailabel.md).")
                logger.warning(message + "; skipped.")
                continue
            bundle = load_bundle(path, name=name)
            infers[name] = GradICONRegistrationTask(bundle=bundle, name=name, **common)
            # atlases of the bundle's dimensionality (a 2D bundle cannot use a 3D atlas)
            usable = {k: a for k, a in atlases.items() if _atlas_ndim(a) == bundle.spatial_dims}
            infers[name + PROPAGATE_SUFFIX] = GradICONPropagationTask(bundle=bundle, name=name + PROPAGATE_SUFFIX,
                                                                      atlases=usable, **common)
            logger.info(f"+++ Registration task {name} and label propagation task {name}{PROPAGATE_SUFFIX} "
                        f"(atlases {sorted(usable)}): {path}")
        if not infers:
            logger.warning(f"No GradICON bundle with weights found in {self.bundle_dirs}.")
        return infers

    def init_trainers(self) -> dict[str, Any]:
        return {}

    def init_strategies(self) -> dict[str, Any]:
        return {}

    def on_init_complete(self) -> None:
        super().on_init_complete()
        if "monai_gradicon.monailabel.server" not in sys.modules:
            logger.warning(
                "Served without --uvicorn_app monai_gradicon.monailabel.server:app: MONAI Label runs each inference "
                "on its event loop, so /info and every other client wait for the whole queue, and rejected uploads "
                "stay in the temporary folder. See docs/monailabel.md."
            )

    # -- output pruning on a timer ---------------------------------------------------------------------------------
    def prune_outputs(self) -> list[str]:
        """Delete old result files of every task now (age and total size bounds of :class:`ServingLimits`)."""
        removed: list[str] = []
        for folder_task in {t.output_dir: t for t in self._infers.values()}.values():
            removed += folder_task.prune()
        return removed

    def _start_pruning(self) -> None:
        if not self.prune_interval_s:
            return

        def loop() -> None:
            while not self._stop_pruning.wait(self.prune_interval_s):
                try:
                    removed = self.prune_outputs()
                    if removed:
                        logger.info(f"Pruned {len(removed)} old result file(s).")
                except Exception as exc:  # never let the timer die on a transient file system error
                    logger.warning(f"Pruning result files failed: {exc}")

        threading.Thread(target=loop, name="gradicon-prune-outputs", daemon=True).start()

    def stop_pruning(self) -> None:
        self._stop_pruning.set()

    # -- requests --------------------------------------------------------------------------------------------------
    def infer(self, request, datastore=None):
        """Check every parameter and input size, resolve ids, then wait for a slot and run the task.

        Request problems answer HTTP 4xx (400 bad parameter or missing input, 404 unknown id / model / reference,
        413 image too large, 422 unusable image) or 503 (queue full, waited too long, out of time) with a message;
        the server keeps serving. Nothing is queued or read before the checks pass.
        """
        from fastapi import HTTPException

        model = request.get("model")
        task = self._infers.get(model)
        if task is None:
            raise HTTPException(status_code=404, detail=f"No model {model!r}; available: {sorted(self._infers)}.")
        datastore = datastore if datastore else self.datastore()
        try:
            resolve = datastore_resolver(datastore)
            request = task.resolve_request(dict(request), resolve, datastore=datastore, trusted=trusted_inputs.get())
            with self.queue.admit(model):
                return super().infer(request, datastore)
        except RegistrationRequestError as exc:
            logger.warning(f"Request to {model} rejected ({exc.status_code}): {exc}")
            headers = {"Retry-After": "30"} if exc.status_code == 503 else None
            raise HTTPException(status_code=exc.status_code, detail=str(exc), headers=headers) from exc
        except MONAILabelException as exc:
            raise HTTPException(status_code=400, detail=str(exc.msg)) from exc

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["gradicon_queue"] = self.queue.status()
        return info


def _atlas_ndim(atlas) -> int:
    from monai_gradicon.io import read_shape

    return len(read_shape(atlas.image, "atlas image"))
