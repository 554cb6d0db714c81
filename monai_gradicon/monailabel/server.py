"""MONAI Label's server with its infer handler off the event loop.

Use: ``monailabel start_server ... --uvicorn_app monai_gradicon.monailabel.server:app``.

MONAI Label 0.8.5 declares ``POST /infer/{model}`` as ``async def`` and runs the whole inference inside it, so the
event loop is blocked for the length of a registration: ``/info`` and every other request wait, and finished
responses of queued requests are only flushed when the loop gets free (issue 18: 20 concurrent lung requests all
returned at 228 s). Its own setting ``MONAI_LABEL_INFER_CONCURRENCY`` only moves the work to a thread pool that the
async handler then waits for synchronously (``Future.result``), which blocks the loop just the same.

This module is ``monailabel.app:app`` (MONAI Label's own FastAPI application, with all its routes and
authentication) with one change: ``POST /infer/{model}`` is served by :func:`infer_in_worker_thread`, a plain
``def`` endpoint (FastAPI runs those in its worker threads) that calls MONAI Label's own
``monailabel.endpoints.infer.run_inference`` after four checks MONAI Label lacks:

* a request with neither ``image``, ``file`` nor ``session_id`` gets 400 (MONAI Label: 500);
* ``params`` that is not a JSON object, or that tries to set ``image`` / ``label`` / ``model`` (which would replace
  the uploaded file by a server path), gets 400 (MONAI Label: 500);
* a body over the app's ``max_upload_mb`` gets 413 before it is read (:class:`UploadLimitMiddleware`; a POST to
  ``/infer`` without ``Content-Length`` gets 411);
* when the request fails, the uploaded temporary files that MONAI Label only deletes after a successful response
  are deleted too.

Which inputs were uploaded (rather than named by the client) is passed to the app through the context variable
:data:`monai_gradicon.monailabel.task.trusted_inputs`, which a client cannot set.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from monailabel.app import app
from monailabel.config import settings
from monailabel.endpoints import infer as monailabel_infer
from monailabel.endpoints.infer import ResultType, run_inference
from monailabel.endpoints.user.auth import RBAC, User
from fastapi.routing import APIRoute

from monai_gradicon.monailabel.task import TrustedInputs, trusted_inputs

logger = logging.getLogger(__name__)

__all__ = ["app", "infer_in_worker_thread", "UploadLimitMiddleware", "RESERVED_PARAMS"]

RESERVED_PARAMS = ("image", "label", "model", "session", "file")
"""Keys ``params`` may not set: MONAI Label merges ``params`` over the request, so they would replace the uploaded
image or the model."""

INFER_PATH = "/infer/{model}"


def infer_in_worker_thread(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[ResultType] = None,
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
):
    """MONAI Label's ``POST /infer/{model}`` in a worker thread, with the checks listed in the module docstring."""
    if not file and not image and not session_id:
        raise HTTPException(status_code=400, detail="No image: pass ?image=<datastore image id>, upload the image as "
                                                    "the 'file' part, or give a session_id.")
    try:
        parsed = json.loads(params) if params else {}
    except json.JSONDecodeError as exc:
        raise HTTPException(status_code=400, detail=f"params is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise HTTPException(status_code=400, detail=f"params must be a JSON object, got {type(parsed).__name__}.")
    reserved = sorted(k for k in parsed if k in RESERVED_PARAMS)
    if reserved:
        raise HTTPException(status_code=400, detail=f"params may not set {reserved}: pass the image as ?image=<id> "
                                                    "or the 'file' part, and the model in the path.")
    token = trusted_inputs.set(TrustedInputs(image=bool(file) or bool(session_id), label=bool(label)))
    try:
        return run_inference(background_tasks, model, image, session_id, params, file, label, output)
    except BaseException:
        # MONAI Label registers the deletion of the uploaded files as background tasks, which Starlette runs only
        # after a successful response: run them now
        for task in background_tasks.tasks:
            try:
                task.func(*task.args, **task.kwargs)
            except Exception as exc:
                logger.warning(f"Cleaning up after a failed request: {exc}")
        background_tasks.tasks.clear()
        raise
    finally:
        trusted_inputs.reset(token)


def _max_upload_bytes() -> int:
    """The served app's ``max_upload_bytes`` (``GradICONRegistrationApp`` sets it from ``--conf max_upload_mb``)."""
    from monailabel.interfaces.utils.app import app_instance

    instance = app_instance()
    try:
        return int(instance.max_upload_bytes)
    except AttributeError:
        raise RuntimeError(
            f"{type(instance).__name__} has no max_upload_bytes: monai_gradicon.monailabel.server serves the "
            "GradICON app (apps/gradicon_monailabel), which sets it from --conf max_upload_mb."
        ) from None


class UploadLimitMiddleware:
    """ASGI middleware: ``POST .../infer/...`` with a ``Content-Length`` over the app's ``max_upload_mb`` gets 413,
    one without ``Content-Length`` 411, before any of the body is read."""

    def __init__(self, asgi_app) -> None:
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST" and "/infer/" in scope.get("path", ""):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            length = headers.get("content-length")
            problem = None
            if length is None:
                problem = (411, "POST /infer needs a Content-Length header (chunked uploads are not accepted).")
            else:
                try:
                    size = int(length)
                except ValueError:
                    size = -1
                limit = _max_upload_bytes()
                if size < 0:
                    problem = (400, f"Invalid Content-Length {length!r}.")
                elif size > limit:
                    problem = (413, f"The request body is {size} bytes; this server accepts at most {limit} bytes "
                                    "(conf max_upload_mb).")
            if problem is not None:
                response = JSONResponse({"detail": problem[1]}, status_code=problem[0])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _install() -> None:
    """Serve ``POST /infer/{model}`` with :func:`infer_in_worker_thread`, put first in the application's routes so
    it is matched before MONAI Label's own (which stays registered but is never reached), and add
    :class:`UploadLimitMiddleware`."""
    own = [r for r in monailabel_infer.router.routes if isinstance(r, APIRoute) and r.path == INFER_PATH
           and "POST" in r.methods]
    if not own:
        raise RuntimeError(f"monailabel.endpoints.infer has no POST {INFER_PATH} route (monailabel version changed?): "
                           "this module replaces exactly that route.")
    if any(isinstance(r, APIRoute) and r.endpoint is infer_in_worker_thread for r in app.router.routes):
        return
    app.add_api_route(f"{settings.MONAI_LABEL_API_STR}{INFER_PATH}", infer_in_worker_thread, methods=["POST"],
                      tags=["Infer"], summary="Run inference (GradICON: in a worker thread)")
    app.router.routes.insert(0, app.router.routes.pop())
    app.add_middleware(UploadLimitMiddleware)


_install()
