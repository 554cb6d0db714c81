"""MONAI Label integration: serve the GradICON bundles as a registration task (optional).

* :mod:`monai_gradicon.monailabel.pipeline` (no ``monailabel`` needed): load a bundle, and the pre / infer / post /
  write steps of one registration request, as plain functions over :mod:`monai_gradicon.pipeline`.
* :class:`GradICONRegistrationTask` and :class:`GradICONPropagationTask` (need ``monailabel``, imported on first
  access only): the ``BasicInferTask`` subclasses the sample app ``apps/gradicon_monailabel`` registers (registration
  for API clients; registration-based label propagation as a segmentation task for 3D Slicer).
* :mod:`monai_gradicon.monailabel.server` (needs ``monailabel``): MONAI Label's server with the infer handler in a
  worker thread (``monailabel start_server ... --uvicorn_app monai_gradicon.monailabel.server:app``).

``import monai_gradicon`` does not import this package, and importing this package does not import ``monailabel``.
See ``docs/monailabel.md``.
"""

from __future__ import annotations

from typing import Any

from monai_gradicon.monailabel.pipeline import (
    DDF_UNITS,
    MASK_KEYS,
    GradICONBundle,
    LabelReference,
    RegistrationRequestError,
    RequestDeadline,
    RequestQueue,
    check_input_size,
    find_atlases,
    find_bundles,
    finish_registration,
    load_atlas,
    load_bundle,
    prepare_request,
    propagate_labels,
    prune_outputs,
    register_files,
    run_registration,
    write_label_map,
    write_outputs,
)

__all__ = [
    "DDF_UNITS",
    "MASK_KEYS",
    "GradICONBundle",
    "LabelReference",
    "RegistrationRequestError",
    "RequestDeadline",
    "RequestQueue",
    "check_input_size",
    "find_atlases",
    "find_bundles",
    "finish_registration",
    "load_atlas",
    "load_bundle",
    "prepare_request",
    "propagate_labels",
    "prune_outputs",
    "register_files",
    "run_registration",
    "write_label_map",
    "write_outputs",
    "GradICONRegistrationTask",
    "GradICONPropagationTask",
    "monailabel_available",
]

_LAZY = {
    "GradICONRegistrationTask": "monai_gradicon.monailabel.task",
    "GradICONPropagationTask": "monai_gradicon.monailabel.task",
    "REGISTRATION_TYPE": "monai_gradicon.monailabel.task",
}


def monailabel_available() -> bool:
    """Whether ``monailabel`` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("monailabel") is not None


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as exc:
            raise ImportError(
                f"monai_gradicon.monailabel.{name} needs the 'monailabel' package: install monai-gradicon[monailabel] "
                "into a separate environment (see docs/monailabel.md)."
            ) from exc
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
