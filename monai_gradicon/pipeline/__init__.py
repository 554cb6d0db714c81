"""The one registration pipeline behind every door (command line, bundles, MONAI Label, Python API).

``register(fixed, moving, network) -> RegistrationResult`` runs the stages of :mod:`monai_gradicon.pipeline.core`
(read -> orientation -> preprocessing -> resize -> network or instance optimization -> transform on the original
grids); :mod:`monai_gradicon.pipeline.result` holds the result and writes its files with one convention per output;
:mod:`monai_gradicon.pipeline.saved` applies and evaluates a saved result; :mod:`monai_gradicon.pipeline.transforms`
wraps the same stages as MONAI dictionary transforms for the bundles' configs.

Example::

    from monai_gradicon import load_weights
    from monai_gradicon.pipeline import register

    network, card = load_weights("lung_model_weights_step_2.trch")       # the card says: reference axes, 175^3, lung_ct
    result = register("fixed.nii.gz", "moving.nrrd", network, fixed_mask="fm.nii.gz", moving_mask="mm.nii.gz")
    result.save("result/")                                                # displacement_mm.nii.gz, ddf_voxels.nii.gz, ...
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch import nn

from monai_gradicon.instance_optimization import DEFAULT_IO_LR
from monai_gradicon.losses.objective import GradICONObjective
from monai_gradicon.networks.registration import GradICONNetwork
from monai_gradicon.pipeline.core import (
    ORIENTATIONS,
    TRANSFORM_SCHEMES,
    NetworkTransforms,
    NonFiniteResultError,
    OriginalGridFields,
    PairInputs,
    PreparedPair,
    RegistrationSettings,
    complete_masks,
    predict_peak_memory_gb,
    prepare_pair,
    read_pair,
    resolve_device,
    resolve_settings,
    run_network,
    to_original_grids,
    transform_from_ddf,
)
from monai_gradicon.pipeline.result import (
    CONVENTIONS,
    OUTPUT_FILES,
    RegistrationResult,
    check_result_folder,
    read_label_image,
    warp_with_field,
    write_result_folder,
)
from monai_gradicon.resample import DEFAULT_CHUNK_VOXELS

__all__ = [
    "register",
    "ORIENTATIONS",
    "TRANSFORM_SCHEMES",
    "CONVENTIONS",
    "OUTPUT_FILES",
    "NetworkTransforms",
    "NonFiniteResultError",
    "OriginalGridFields",
    "PairInputs",
    "PreparedPair",
    "RegistrationResult",
    "RegistrationSettings",
    "check_result_folder",
    "complete_masks",
    "predict_peak_memory_gb",
    "prepare_pair",
    "read_label_image",
    "read_pair",
    "resolve_device",
    "resolve_settings",
    "run_network",
    "to_original_grids",
    "transform_from_ddf",
    "warp_with_field",
    "write_result_folder",
]


def register(
    fixed: Any,
    moving: Any,
    network: GradICONNetwork,
    *,
    fixed_mask: Any = None,
    moving_mask: Any = None,
    preprocessing: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    orientation: str = "physical",
    transform_scheme: str = "grid",
    inverse: bool = True,
    io_iterations: int = 0,
    io_lr: float = DEFAULT_IO_LR,
    io_seed: int = 0,
    io_objective: Callable[[nn.Module], GradICONObjective] | None = None,
    auto_masks: bool = True,
    padding_mode: str = "border",
    device: str = "auto",
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    progress: bool = False,
    settings: RegistrationSettings | None = None,
) -> RegistrationResult:
    """Register ``moving`` (A) to ``fixed`` (B); results on both images' original grids.

    Args:
        fixed, moving: paths, :class:`~monai_gradicon.io.Image` objects or MONAI ``MetaTensor`` s (2D or 3D; any
            size, spacing and orientation).
        network: a :class:`~monai_gradicon.GradICONNetwork` with its weights and model card (e.g. from
            :func:`monai_gradicon.load_weights`); moved to ``device``; its weights are not changed (IO restores them).
        fixed_mask, moving_mask: optional masks on the images' grids, binarised and multiplied into the preprocessed
            intensities (the GradICON lung model expects lung masks).
        preprocessing, input_shape: only where the model card leaves them unknown (a contradiction is an error).
        orientation: ``"physical"`` (default) or ``"index"`` (the reference's pairing of stored arrays), see
            :data:`~monai_gradicon.pipeline.core.ORIENTATIONS`.
        transform_scheme: ``"grid"`` (default, the reference's) or ``"exact"``, see
            :data:`~monai_gradicon.pipeline.core.TRANSFORM_SCHEMES`.
        inverse: also compute ``Phi_BA`` on the original moving grid.
        io_iterations, io_lr, io_seed, io_objective: instance optimization (0 steps: one forward pass); the
            objective factory defaults to GradICON's (LNCC sigma 5, lambda 1.5, sparse GradICON).
        auto_masks: with the ``lung_ct`` preprocessing, compute lung masks for images given without one
            (:func:`monai_gradicon.lung_mask.lung_mask`; the lung model was trained on lung-masked CT).
        padding_mode: moving-image values outside its field of view in the warped image (``border`` / ``zeros``).
        device: ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:N``.
        chunk_voxels: voxels per slab of the dense evaluation on the original grids (memory bound).
        progress: IO progress bar.
        settings: a complete :class:`RegistrationSettings` instead of the individual arguments above.

    Raises:
        ValueError (incl. :class:`~monai_gradicon.model_card.CardError`, :class:`NonFiniteResultError`),
        FileNotFoundError, TypeError: naming the problem.
    """
    start = time.perf_counter()
    if not isinstance(network, GradICONNetwork):
        raise TypeError(f"network must be a GradICONNetwork, got {type(network).__name__}.")
    card = network.card
    if settings is None:
        settings = resolve_settings(
            card, preprocessing=preprocessing, input_shape=input_shape, orientation=orientation,
            transform_scheme=transform_scheme, inverse=inverse, io_iterations=io_iterations, io_lr=io_lr,
            io_seed=io_seed, auto_masks=auto_masks,
        )
    dev = resolve_device(device)
    timings: dict[str, float] = {}
    inputs = read_pair(fixed, moving, fixed_mask, moving_mask)
    timings["read"] = time.perf_counter() - start
    if settings.makes_masks and (inputs.fixed_mask is None or inputs.moving_mask is None):
        t = time.perf_counter()
        complete_masks(inputs, settings)
        timings["automatic_masks"] = time.perf_counter() - t
    t = time.perf_counter()
    prepared = prepare_pair(inputs, settings, network)
    timings["preprocess"] = time.perf_counter() - t
    transforms = run_network(network, prepared, dev, io_objective, progress)
    timings["instance_optimization" if settings.io_iterations else "network"] = transforms.seconds
    fields = to_original_grids(prepared, transforms, dev, chunk_voxels, padding_mode)
    timings["original_grids"] = fields.seconds
    timings["total_before_write"] = time.perf_counter() - start
    return RegistrationResult(prepared, transforms, fields, card, timings, device=str(dev))
