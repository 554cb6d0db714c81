"""MONAI Label sample app: GradICON registration bundles served from local folders (no network access).

Start (see docs/monailabel.md)::

    monailabel start_server --app apps/gradicon_monailabel --studies <images folder> \
        --host 127.0.0.1 --port 8000 --conf models gradicon_lung,gradicon_brain

``--conf`` keys (all optional):

* ``models``: comma-separated bundle names, or ``all`` (default: every bundle found that has ``models/model.pt``).
* ``bundle_dirs``: comma-separated folders holding ``<name>/configs/inference.json`` bundles (default:
  ``<app>/model`` then the repository's ``bundles/`` folder). Nothing is downloaded: MONAI Label's zoo lookup
  (``monaihosting``) is never called.
* ``io_iterations``: default instance optimization steps per request (default 0; a request can override it).
* ``max_io_iterations``: the most a request may ask for (default 500).
* ``output_dir``: where result files are written (default ``<tmp>/gradicon_monailabel``).

Each bundle becomes one infer task, named after its folder. The moving image is ``image`` (datastore id, path or
uploaded ``file``), the fixed image is ``params["fixed_image"]`` (id or path) or the uploaded ``label`` part.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelException

from monai_gradicon.monailabel.pipeline import RegistrationRequestError, find_bundles
from monai_gradicon.monailabel.task import GradICONRegistrationTask, registration_http_error, resolve_and_mark

logger = logging.getLogger(__name__)

_REPO_BUNDLES = os.path.normpath(os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", "bundles"))


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").replace(os.pathsep, ",").split(",") if v.strip()]


class GradICONRegistrationApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.bundle_dirs = _split(conf.get("bundle_dirs")) or [os.path.join(app_dir, "model"), _REPO_BUNDLES]
        self.bundle_dirs = [os.path.abspath(os.path.expanduser(d)) for d in self.bundle_dirs]
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="GradICON registration",
            description="GradICON deformable registration: moving = image, fixed = params.fixed_image",
            version="0.1.0",
        )

    def init_infers(self) -> dict[str, Any]:
        names = _split(self.conf.get("models"))
        explicit = bool(names) and names != ["all"]
        bundles = find_bundles(self.bundle_dirs, names if explicit else None)
        infers: dict[str, Any] = {}
        for name, path in bundles.items():
            if not os.path.isfile(os.path.join(path, "models", "model.pt")):
                message = f"Bundle {name} at {path} has no models/model.pt"
                if explicit:
                    raise FileNotFoundError(message + "; train or export its weights first.")
                logger.warning(message + "; skipped.")
                continue
            infers[name] = GradICONRegistrationTask(
                path,
                name=name,
                output_dir=self.conf.get("output_dir"),
                io_iterations=int(self.conf.get("io_iterations", 0) or 0),
                max_io_iterations=int(self.conf.get("max_io_iterations", 500) or 500),
            )
            logger.info(f"+++ Registration task {name}: {path}")
        if not infers:
            logger.warning(f"No GradICON bundle with weights found in {self.bundle_dirs}.")
        return infers

    def init_trainers(self) -> dict[str, Any]:
        return {}

    def init_strategies(self) -> dict[str, Any]:
        return {}

    def infer(self, request, datastore=None):
        """Resolve the fixed image (id, path or uploaded ``label``) and the moving image, then run the task.

        Request problems (missing fixed image, unknown id, unreadable file, 2D vs 3D) answer HTTP 4xx with a
        message; the server keeps serving.
        """
        from fastapi import HTTPException

        model = request.get("model")
        task = self._infers.get(model)
        if task is None:
            raise HTTPException(status_code=404, detail=f"No model {model!r}; available: {sorted(self._infers)}.")
        try:
            request = resolve_and_mark(task, request, datastore if datastore else self.datastore())
            return super().infer(request, datastore)
        except RegistrationRequestError as exc:
            logger.warning(f"Registration request rejected ({exc.status_code}): {exc}")
            raise registration_http_error(exc) from exc
        except MONAILabelException as exc:
            raise HTTPException(status_code=400, detail=str(exc.msg)) from exc
