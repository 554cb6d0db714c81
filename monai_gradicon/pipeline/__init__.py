"""The one registration pipeline behind every door (command line, bundles, MONAI Label, Python API).

``register(fixed, moving, network) -> RegistrationResult`` runs the stages of :mod:`monai_gradicon.pipeline.core`
(read -> orientation -> preprocessing -> resize -> network or instance optimization -> transform on the original
grids); :mod:`monai_gradicon.pipeline.result` holds the result and writes its files with one convention per output;
:mod:`monai_gradicon.pipeline.saved` applies and evaluates a saved result; :mod:`monai_gradicon.pipeline.transforms`
wraps the same stages as MONAI dictionary transforms for the bundles' configs; :mod:`monai_gradicon.pipeline.batch`
runs a list of pairs (one model, one result folder per pair, a summary table).

Example::

    from monai_gradicon import load_weights
    from monai_gradicon.pipeline import register

    network, card = load_weights("lung_model_weights_step_2.trch")       # the card says: reference axes, 175^3, lung_ct
    result = register("fixed.nii.gz", "moving.nrrd", network, fixed_mask="fm.nii.gz", moving_mask="mm.nii.gz")
    result.save("result/")                                                # displacement_mm.nii.gz, ddf_voxels.nii.gz, ...
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from monai_gradicon.losses.objective import GradICONObjective
from monai_gradicon.networks.registration import GradICONNetwork
from monai_gradicon.pipeline.core import (
    IO_METHODS,
    METHODS,
    ORIENTATIONS,
    PREALIGNMENTS,
    TRANSFORM_SCHEMES,
    NetworkTransforms,
    NonFiniteResultError,
    OriginalGridFields,
    PairInputs,
    PreparedPair,
    RegistrationSettings,
    complete_masks,
    default_optimize_shape,
    optimize_pair,
    prealign_pair,
    predict_peak_memory_gb,
    prepare_pair,
    read_pair,
    resolve_device,
    resolve_settings,
    run_network,
    stage_name,
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
    "IO_METHODS",
    "METHODS",
    "ORIENTATIONS",
    "PREALIGNMENTS",
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
    "default_optimize_shape",
    "optimize_pair",
    "stage_name",
    "prealign_pair",
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
    network: GradICONNetwork | None,
    *,
    fixed_mask: Any = None,
    moving_mask: Any = None,
    preprocessing: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    orientation: str = "physical",
    transform_scheme: str = "grid",
    inverse: bool = True,
    io_iterations: int = 0,
    io_lr: float | None = None,
    io_seed: int = 0,
    io_objective: Callable[[nn.Module], GradICONObjective] | None = None,
    io_method: str = "weights",
    auto_masks: bool = True,
    prealign: str = "none",
    prealign_similarity: str = "mi",
    method: str = "network",
    opt_lambda: float | None = None,
    opt_levels: int | None = None,
    opt_iterations: int | Sequence[int] | None = None,
    opt_lr: float | None = None,
    opt_similarity: str = "lncc",
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
            None with ``method="optimize"``.
        fixed_mask, moving_mask: optional masks on the images' grids, binarised and multiplied into the preprocessed
            intensities (the GradICON lung model expects lung masks).
        preprocessing, input_shape: only where the model card leaves them unknown (a contradiction is an error).
        orientation: ``"physical"`` (default) or ``"index"`` (the reference's pairing of stored arrays), see
            :data:`~monai_gradicon.pipeline.core.ORIENTATIONS`.
        transform_scheme: ``"grid"`` (default, the reference's) or ``"exact"``, see
            :data:`~monai_gradicon.pipeline.core.TRANSFORM_SCHEMES`.
        inverse: also compute ``Phi_BA`` on the original moving grid.
        io_iterations, io_lr, io_seed, io_objective: instance optimization (0 steps: one forward pass); ``io_lr``
            None: the ``io_method``'s default; the objective factory (weights IO only,
            :func:`monai_gradicon.pipeline.io_options.io_objective_factory`) defaults to GradICON's (LNCC sigma 5,
            lambda 1.5, sparse GradICON).
        io_method: ``"weights"`` (the paper's IO on all network weights) or ``"fields"`` (the network's two
            transforms optimized directly, the weights untouched), see
            :data:`~monai_gradicon.pipeline.core.IO_METHODS`.
        auto_masks: with the ``lung_ct`` preprocessing, compute lung masks for images given without one
            (:func:`monai_gradicon.lung_mask.lung_mask`; the lung model was trained on lung-masked CT).
        prealign, prealign_similarity: ``"none"`` (default), ``"rigid"`` or ``"affine"`` pre-alignment
            (:func:`monai_gradicon.affine.register_affine`, ``"mi"`` or ``"lncc"``) before the network, composed
            exactly with the deformable transform in every output.
        method: ``"network"`` (default) or ``"optimize"`` (no network: GradICON's objective optimized over the two
            transforms directly, :func:`monai_gradicon.field_optimization.optimize_fields`); with ``"optimize"``,
            ``preprocessing`` is required and ``input_shape`` (the working grid, file axis order) defaults to the
            fixed image's shape capped at 175 voxels per axis.
        opt_lambda, opt_levels, opt_iterations, opt_lr, opt_similarity: the field optimization's options (see
            :class:`~monai_gradicon.pipeline.core.RegistrationSettings`); None: the measured defaults.
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
    if method == "optimize" or (settings is not None and settings.method == "optimize"):
        if network is not None:
            raise ValueError("method 'optimize' uses no network: pass network=None.")
    elif not isinstance(network, GradICONNetwork):
        raise TypeError(f"network must be a GradICONNetwork, got {type(network).__name__}.")
    card = None if network is None else network.card
    inputs = read_pair(fixed, moving, fixed_mask, moving_mask)
    if settings is None:
        if method == "optimize" and input_shape is None:
            input_shape = default_optimize_shape(inputs.fixed.shape)
        settings = resolve_settings(
            card, preprocessing=preprocessing, input_shape=input_shape, orientation=orientation,
            transform_scheme=transform_scheme, inverse=inverse, io_iterations=io_iterations, io_lr=io_lr,
            io_seed=io_seed, auto_masks=auto_masks, prealign=prealign, prealign_similarity=prealign_similarity,
            method=method, io_method=io_method, opt_lambda=opt_lambda, opt_levels=opt_levels,
            opt_iterations=opt_iterations, opt_lr=opt_lr, opt_similarity=opt_similarity,
        )
    dev = resolve_device(device)
    timings: dict[str, float] = {}
    timings["read"] = time.perf_counter() - start
    if settings.makes_masks and (inputs.fixed_mask is None or inputs.moving_mask is None):
        t = time.perf_counter()
        complete_masks(inputs, settings)
        timings["automatic_masks"] = time.perf_counter() - t
    t = time.perf_counter()
    prepared = prepare_pair(inputs, settings, network, dev, progress=progress)
    timings["preprocess"] = time.perf_counter() - t
    if prepared.prealign_result is not None:
        timings["prealign"] = prepared.prealign_result.seconds
        timings["preprocess"] -= prepared.prealign_result.seconds
    if settings.method == "optimize":
        if io_objective is not None:
            raise ValueError("io_objective is for the network's instance optimization; method 'optimize' takes the "
                             "opt_* options.")
        transforms = optimize_pair(prepared, dev, progress)
    else:
        transforms = run_network(network, prepared, dev, io_objective, progress)
    timings[stage_name(settings)] = transforms.seconds
    fields = to_original_grids(prepared, transforms, dev, chunk_voxels, padding_mode)
    timings["original_grids"] = fields.seconds
    timings["total_before_write"] = time.perf_counter() - start
    return RegistrationResult(prepared, transforms, fields, card, timings, device=str(dev))
