"""Command line: ``python -m monai_gradicon <command>`` (or ``monai-gradicon <command>``).

Commands (``<command> --help`` shows each one's options):

* ``register``  register a moving image to a fixed image and write the results into a new folder;
* ``register-batch``  register every pair of a CSV / JSON list or a Learn2Reg dataset with one model, one result
  folder per pair and a summary table (a failing pair is recorded, the others go on; exit status 1 if any failed);
* ``warp``      apply a saved result to another image or a label map;
* ``evaluate``  landmark error (both directions), Dice per label, folds and smoothness of a saved result;
* ``export``    a saved result in another tool's format (``--format learn2reg``: the Learn2Reg submission field);
* ``evaluate-learn2reg``  score a folder of predictions of a Learn2Reg split (TRE/TRE30, Dice/Dice30, HD95, SDlogJ,
  non-diffeomorphic volume), per pair and aggregated, JSON + CSV;
* ``convert-weights``  turn a released GradICON / uniGradICON weight file (or one without a model card) into a
  weight file of this project with its model card, optionally straight into a bundle.

Every door of the project runs the same pipeline (:mod:`monai_gradicon.pipeline`); this module only parses the
arguments -- all of them, names, types and values, before any work -- and reports errors as one line
``error: ...`` (exit status 2). Nothing the user had is overwritten.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fire
import torch

from monai_gradicon.io import ImageReadError, read_shape, write_nifti
from monai_gradicon.io_utils import atomic_write_text
from monai_gradicon.model_card import AXIS_ORDERS, CardError, ModelCard
from monai_gradicon.networks.registration import GradICONNetwork
from monai_gradicon.field_optimization import SIMILARITIES as FIELD_SIMILARITIES
from monai_gradicon.losses.similarity import IO_SIMILARITIES
from monai_gradicon.pipeline import (
    IO_METHODS,
    METHODS,
    ORIENTATIONS,
    PREALIGNMENTS,
    TRANSFORM_SCHEMES,
    NonFiniteResultError,
    RegistrationResult,
    RegistrationSettings,
    check_result_folder,
    default_optimize_shape,
    predict_peak_memory_gb,
    register as register_images,
    resolve_device,
    resolve_settings,
    stage_name,
)
from monai_gradicon.pipeline.batch import (
    SUMMARY_FILES,
    BatchFailuresError,
    check_batch_memory,
    learn2reg_batch_pairs,
    plan_batch,
    read_pair_list,
    run_batch,
)
from monai_gradicon.pipeline.io_options import io_network_inputs, io_objective_factory
from monai_gradicon.pipeline.learn2reg import LEARN2REG_SPLITS
from monai_gradicon.pipeline.result import INVERSE_OUTPUTS, OUTPUT_CHOICES, check_outputs
from monai_gradicon.pipeline.saved import LANDMARK_FRAMES, apply_saved_transform, evaluate_saved
from monai_gradicon.data.preprocessing import PREPROCESSING
from monai_gradicon.weights import WeightFileError, convert_weights as convert_weight_file, load_weights, parse_shape

__all__ = ["main", "register", "register_batch", "warp", "evaluate", "export", "evaluate_learn2reg",
           "convert_weights", "COMMANDS", "BUNDLES_DIR", "MODALITY_BUNDLES", "EXPORT_FORMATS"]

_USER_ERRORS = (
    ImportError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
    ImageReadError, WeightFileError, MemoryError,
)

BUNDLES_DIR = Path(__file__).resolve().parent.parent / "bundles"
"""Where the bundles of this repository live (their ``models/model.pt`` are the default weights)."""

MODALITY_BUNDLES = {"ct": "gradicon_lung", "mri": "gradicon_brain"}
"""The bundle whose ``models/model.pt`` is the default for ``--modality``."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _path(value: Any, name: str, required: bool = True) -> str | None:
    """Fire turns ``--x 123`` into an int and ``--x`` into True: accept only real path strings."""
    if value is None:
        if required:
            raise ValueError(f"--{name} is required.")
        return None
    if isinstance(value, bool):
        raise ValueError(f"--{name} needs a value (a file path).")
    text = os.fspath(str(value))
    if not text.strip():
        raise ValueError(f"--{name} is empty; give a path.")
    return text


def _outputs(value: Any) -> list[str] | None:
    """``--outputs displacement,warped`` or ``all`` (Fire gives a string or a tuple) -> a checked list, or None for
    the default set."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    items = [v for v in items if v]
    unknown = [v for v in items if v not in OUTPUT_CHOICES and v != "all"]
    if not items or unknown:
        raise ValueError(f"--outputs must be a comma-separated list of {', '.join(OUTPUT_CHOICES)} (or all); got "
                         f"{value!r}.")
    return items


def _existing_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    if os.path.isdir(path):
        raise IsADirectoryError(f"The {what} {path} is a directory; give an image file.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {what} file does not exist: {path}")
    return path


def _switch(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"--{name} is a switch: pass --{name} or --no{name}, got {value!r}.")
    return value


def _whole(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{name} must be a whole number >= {minimum}, got {value!r}.")
    return value


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"--{name} must be a positive number, got {value!r}.")
    return float(value)


def _non_negative(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"--{name} must be one of {', '.join(choices)}; got {value!r}.")
    return value


def _total_memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def default_weights_path(modality: str) -> Path:
    """``bundles/<bundle>/models/model.pt`` for a modality; it may not exist yet."""
    return BUNDLES_DIR / MODALITY_BUNDLES[modality] / "models" / "model.pt"


def _resolve_weights(weights: str | None, modality: str | None) -> tuple[str, bool]:
    if weights is not None:
        _existing_file(weights, "weight")
        return weights, False
    path = default_weights_path(modality or "ct")
    if not path.is_file():
        bundle = MODALITY_BUNDLES[modality or "ct"]
        raise FileNotFoundError(
            f"No --weights given and the default weights for --modality {modality or 'ct'} are missing: {path}. "
            f"Train the bundle (bundles/{bundle}) or convert a released weight file into it:\n"
            f"  python -m monai_gradicon convert-weights --input lung_model_weights_step_2.trch --bundle_dir "
            f"bundles/{bundle}\n(released files also work directly with --weights)."
        )
    return str(path), True


# ----------------------------------------------------------------------------------------------------------------
# what register and register-batch share: the checked options, the model, one pair's registration + result folder
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunOptions:
    """The flags ``register`` and ``register-batch`` share, checked (meanings: ``register``'s docstring).

    ``weights`` is the resolved weight file (``default_weights``: the modality's bundle default; None with
    ``method`` optimize); ``input_shape`` an int (every axis), a tuple (network axis order; for optimize the working
    grid in the file's axis order) or None (from the card; for optimize the fixed image's shape capped at 175);
    ``preprocess`` for optimize defaults by modality (ct: unigradicon_ct, mri: unigradicon_mri); ``outputs`` the
    chosen file keys or None (all); ``inverse`` False also when ``outputs`` leaves the inverse out;
    ``memory_limit_gb`` the limit in GiB (default the machine's total memory; None when that is unknown)."""

    weights: str | None
    default_weights: bool
    modality: str | None
    preprocess: str | None
    input_shape: int | tuple[int, ...] | None
    orientation: str
    transform_scheme: str
    padding_mode: str
    auto_masks: bool
    prealign: str
    prealign_similarity: str
    io_iterations: int
    io_lr: float | None
    io_method: str
    io_sim: str
    io_mask_loss: bool
    io_dice_weight: float
    method: str
    opt_lambda: float | None
    opt_levels: int | None
    opt_iterations: int | tuple[int, ...] | None
    opt_lr: float | None
    opt_similarity: str
    seed: int
    inverse: bool
    overview: bool
    qc: bool
    overwrite: bool
    progress: bool
    outputs: list[str] | None
    memory_limit_gb: float | None
    device: torch.device


def _iterations(value: Any, name: str) -> int | tuple[int, ...] | None:
    """``--opt_iterations 60`` (every level) or ``--opt_iterations 100,50,25`` (per level, coarse to fine)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        try:
            values = tuple(int(v) for v in value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--{name} must be whole numbers like 100,50,25, got {value!r}.") from exc
        if any(v < 1 for v in values) or not values:
            raise ValueError(f"--{name} needs at least one step per level, got {value!r}.")
        return values
    return _whole(value, name, minimum=1)


def _run_options(
    *, modality: Any, weights: Any, io_iterations: Any, io_lr: Any, preprocess: Any, input_shape: Any,
    orientation: Any, transform_scheme: Any, padding_mode: Any, auto_masks: Any, prealign: Any,
    prealign_similarity: Any, memory_limit_gb: Any, outputs: Any, device: Any, inverse: Any, overview: Any,
    overwrite: Any, seed: Any, progress: Any, qc: Any, method: Any, io_method: Any, io_sim: Any, io_mask_loss: Any,
    io_dice_weight: Any, opt_lambda: Any, opt_levels: Any, opt_iterations: Any, opt_lr: Any, opt_similarity: Any,
) -> _RunOptions:
    """Check the shared flags (names, types, values, how they combine; the weight file exists) before any work."""
    if modality is not None:
        _choice(modality, "modality", tuple(MODALITY_BUNDLES))
    _choice(method, "method", METHODS)
    _choice(io_method, "io_method", IO_METHODS)
    _choice(io_sim, "io_sim", IO_SIMILARITIES)
    _choice(opt_similarity, "opt_similarity", FIELD_SIMILARITIES)
    _switch(io_mask_loss, "io_mask_loss")
    if method == "optimize":
        if io_iterations is not None:
            raise ValueError("--io_iterations fine-tunes a network; --method optimize has none: its steps are "
                             "--opt_iterations.")
        if weights is not None:
            raise ValueError("--method optimize uses no network: leave out --weights.")
        io_iterations = 0
    io_iterations = _whole(50 if io_iterations is None else io_iterations, "io_iterations")
    io_lr = None if io_lr is None else _positive(io_lr, "io_lr")
    io_dice_weight = _non_negative(io_dice_weight, "io_dice_weight")
    custom_io = [f for f, on in (("--io_sim", io_sim != "lncc"), ("--io_mask_loss", io_mask_loss),
                                 ("--io_dice_weight", io_dice_weight > 0)) if on]
    if custom_io and (io_iterations == 0 or io_method != "weights"):
        raise ValueError(f"{', '.join(custom_io)} set(s) the objective of the network weights' instance "
                         "optimization (--io_iterations > 0 with --io_method weights); "
                         + ("--method optimize and --io_method fields take --opt_similarity / --opt_lambda."
                            if io_iterations else "there is none here (--io_iterations 0)."))
    if custom_io and prealign != "none":
        raise ValueError(f"{', '.join(custom_io)} cannot be combined with --prealign yet (the masks and label maps "
                         "are brought to the network grid without the pre-alignment); use one or the other.")
    opt_lambda = None if opt_lambda is None else _non_negative(opt_lambda, "opt_lambda")
    opt_levels = None if opt_levels is None else _whole(opt_levels, "opt_levels", minimum=1)
    opt_iterations = _iterations(opt_iterations, "opt_iterations")
    opt_lr = None if opt_lr is None else _positive(opt_lr, "opt_lr")
    seed = _whole(seed, "seed")
    if preprocess is not None:
        _choice(preprocess, "preprocess", tuple(PREPROCESSING))
    elif method == "optimize":
        preprocess = {"ct": "unigradicon_ct", "mri": "unigradicon_mri"}[modality or "ct"]
    _choice(orientation, "orientation", ORIENTATIONS)
    _choice(transform_scheme, "transform_scheme", TRANSFORM_SCHEMES)
    _choice(padding_mode, "padding_mode", ("border", "zeros"))
    _choice(prealign, "prealign", tuple(PREALIGNMENTS))
    _choice(prealign_similarity, "prealign_similarity", ("mi", "lncc"))
    for value, name in ((inverse, "inverse"), (overview, "overview"), (overwrite, "overwrite"), (progress, "progress"),
                        (auto_masks, "auto_masks"), (qc, "qc")):
        _switch(value, name)
    chosen = _outputs(outputs)
    if chosen is not None and not any(k in (*INVERSE_OUTPUTS, "all") for k in chosen):
        inverse = False
    check_outputs(chosen, inverse)  # unknown names, an inverse output with --noinverse, h5py present
    if qc and not inverse:
        raise ValueError("--qc measures inverse consistency and needs the inverse: drop --noinverse (and keep an "
                         "inverse output in --outputs).")
    dev = resolve_device(device)
    shape_arg = input_shape if isinstance(input_shape, int) and not isinstance(input_shape, bool) else \
        parse_shape(input_shape, "--input_shape")
    limit = _positive(memory_limit_gb, "memory_limit_gb") if memory_limit_gb is not None else _total_memory_gb()
    if method == "optimize":
        weights_p, is_default = None, False
    else:
        weights_p, is_default = _resolve_weights(_path(weights, "weights", False), modality)
    return _RunOptions(
        weights=weights_p, default_weights=is_default, modality=modality, preprocess=preprocess,
        input_shape=shape_arg, orientation=orientation, transform_scheme=transform_scheme, padding_mode=padding_mode,
        auto_masks=auto_masks, prealign=prealign, prealign_similarity=prealign_similarity,
        io_iterations=io_iterations, io_lr=io_lr, io_method=io_method, io_sim=io_sim, io_mask_loss=io_mask_loss,
        io_dice_weight=io_dice_weight, method=method, opt_lambda=opt_lambda, opt_levels=opt_levels,
        opt_iterations=opt_iterations, opt_lr=opt_lr, opt_similarity=opt_similarity, seed=seed, inverse=inverse,
        overview=overview, qc=qc, overwrite=overwrite, progress=progress, outputs=chosen, memory_limit_gb=limit, device=dev,
    )


def _settings(opts: _RunOptions, card: ModelCard | None, dim: int, fixed_shape: tuple[int, ...]) -> RegistrationSettings:
    """The registration settings from the card (None for --method optimize) and the flags, for a pair whose fixed
    image has ``fixed_shape`` (voxels; sizes the optimize method's default working grid)."""
    shape = opts.input_shape
    if isinstance(shape, int):
        shape = (shape,) * dim
    if opts.method == "optimize" and shape is None:
        shape = default_optimize_shape(fixed_shape)
    return resolve_settings(
        card, preprocessing=opts.preprocess, input_shape=shape, orientation=opts.orientation,
        transform_scheme=opts.transform_scheme, inverse=opts.inverse, io_iterations=opts.io_iterations,
        io_lr=opts.io_lr, io_seed=opts.seed, auto_masks=opts.auto_masks, prealign=opts.prealign,
        prealign_similarity=opts.prealign_similarity, method=opts.method, io_method=opts.io_method,
        opt_lambda=opts.opt_lambda, opt_levels=opts.opt_levels, opt_iterations=opts.opt_iterations,
        opt_lr=opts.opt_lr, opt_similarity=opts.opt_similarity, source=opts.weights or "--method optimize",
    )


def _load_model(opts: _RunOptions, fixed_shape: tuple[int, ...]) -> tuple[
        GradICONNetwork | None, ModelCard | None, RegistrationSettings]:
    """Load the weights once (card checked against --modality; nothing for --method optimize), resolve the settings
    from the card and the flags (for a pair whose fixed image has ``fixed_shape``, voxels), and move the network to
    the device once."""
    if opts.method == "optimize":
        return None, None, _settings(opts, None, len(fixed_shape), fixed_shape)
    assert opts.weights is not None
    network, card = load_weights(opts.weights)
    if opts.modality is not None and card.modality is not None and card.modality != opts.modality:
        raise CardError(f"--modality {opts.modality} but the model card of {opts.weights} says modality "
                        f"{card.modality!r}.")
    if opts.default_weights:
        _say(f"Using the default weights for --modality {opts.modality or 'ct'}: {opts.weights}")
    settings = _settings(opts, card, network.spatial_dims, fixed_shape)
    network.to(opts.device)
    return network, card, settings


def _pair_settings(settings: RegistrationSettings, opts: _RunOptions, fixed_shape: tuple[int, ...]) -> RegistrationSettings:
    """A pair's settings: the batch's, except the optimize method's default working grid, sized from the pair's
    fixed image (``fixed_shape``, voxels)."""
    if opts.method == "optimize" and opts.input_shape is None:
        return _settings(opts, None, len(fixed_shape), fixed_shape)
    return settings


def _network_line(network: GradICONNetwork | None, card: ModelCard | None, settings: RegistrationSettings,
                  opts: _RunOptions) -> str:
    if network is None:
        field = settings.to_dict()["field_optimization"]
        return (f"No network (--method optimize): GradICON field optimization on the working grid "
                f"{settings.input_shape}{' (per pair: the fixed shape capped at 175)' if opts.input_shape is None else ''}"
                f"; preprocessing {settings.preprocessing}; {field['levels']} levels, {field['iterations']} steps, "
                f"lambda {field['lambda']}, similarity {field['similarity']}, lr {field['lr']}; device {opts.device}")
    io = (f"instance optimization {opts.io_iterations} steps on the {settings.io_method} (lr {settings.io_lr:g}"
          + (f", {opts.io_sim}" if settings.io_method == "weights" else "") + ")") if opts.io_iterations else \
        "no instance optimization"
    return (f"Network: {network.num_steps} steps, {network.spatial_dims}D, shape {settings.input_shape} in the "
            f"{settings.axis_order} axis order; preprocessing {settings.preprocessing}; orientation "
            f"{opts.orientation}; transform {opts.transform_scheme}; {io}; device {opts.device} "
            f"({card.name or 'weights'})")


def _lung_mask_note(settings: RegistrationSettings) -> str | None:
    """What happens to images given without a mask, for weights trained on lung-masked CT (else None)."""
    if settings.preprocessing != "lung_ct":
        return None
    return "The GradICON lung model was trained on lung-masked CT: " + (
        "computing automatic lung masks for the images given without one (written next to the results)."
        if settings.makes_masks else "--noauto_masks: the unmasked CT is outside what the weights saw.")


def _io_objective(opts: _RunOptions, settings: RegistrationSettings, fixed: str, moving: str,
                  fixed_mask: str | None, moving_mask: str | None, fixed_segmentation: str | None,
                  moving_segmentation: str | None):
    """The weights IO's objective factory for --io_sim / --io_mask_loss / --io_dice_weight, or None (GradICON's
    default objective)."""
    if not (opts.io_sim != "lncc" or opts.io_mask_loss or opts.io_dice_weight > 0):
        return None
    extra = None
    if opts.io_mask_loss or opts.io_dice_weight > 0:
        if opts.io_mask_loss and (fixed_mask is None or moving_mask is None):
            raise ValueError("--io_mask_loss needs both --fixed_mask and --moving_mask.")
        extra = io_network_inputs(
            fixed, moving, settings,
            fixed_mask=fixed_mask if opts.io_mask_loss else None, moving_mask=moving_mask if opts.io_mask_loss else None,
            fixed_segmentation=fixed_segmentation if opts.io_dice_weight > 0 else None,
            moving_segmentation=moving_segmentation if opts.io_dice_weight > 0 else None,
        )
    return io_objective_factory(opts.io_sim, network_inputs=extra, loss_masking=opts.io_mask_loss,
                                dice_weight=opts.io_dice_weight, padding_mode="border")


def _register_and_save(
    network: GradICONNetwork | None, settings: RegistrationSettings, opts: _RunOptions, output_dir: str, fixed: str,
    moving: str, fixed_mask: str | None, moving_mask: str | None, fixed_segmentation: str | None = None,
    moving_segmentation: str | None = None,
) -> tuple[RegistrationResult, dict[str, str]]:
    """One pair through the pipeline (the network already on ``opts.device``; None for --method optimize) and its
    result folder, written as a whole; returns the result (``timings["write"]`` added, seconds) and
    ``{file name: path}``."""
    settings = _pair_settings(settings, opts, read_shape(fixed, "fixed image"))
    objective = _io_objective(opts, settings, fixed, moving, fixed_mask, moving_mask, fixed_segmentation,
                              moving_segmentation)
    result = register_images(fixed, moving, network, fixed_mask=fixed_mask, moving_mask=moving_mask,
                             settings=settings, padding_mode=opts.padding_mode, device=str(opts.device),
                             progress=opts.progress, io_objective=objective)
    result.extra.update({"weights": None if opts.weights is None else os.path.abspath(opts.weights),
                         "default_weights": opts.default_weights})
    if objective is not None:
        result.extra["io_objective"] = {"similarity": opts.io_sim, "loss_masking": opts.io_mask_loss,
                                        "dice_weight": opts.io_dice_weight}
    t = time.perf_counter()
    paths = result.save(output_dir, overwrite=opts.overwrite, protect=[p for p in (opts.weights,) if p],
                        overview=opts.overview, outputs=opts.outputs, qc=opts.qc)
    result.timings["write"] = time.perf_counter() - t
    return result, paths


def register(
    fixed: str | None = None,
    moving: str | None = None,
    output_dir: str | None = None,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
    fixed_segmentation: str | None = None,
    moving_segmentation: str | None = None,
    modality: str | None = None,
    weights: str | None = None,
    method: str = "network",
    io_iterations: int | None = None,
    io_lr: float | None = None,
    io_method: str = "weights",
    io_sim: str = "lncc",
    io_mask_loss: bool = False,
    io_dice_weight: float = 0.0,
    opt_lambda: float | None = None,
    opt_levels: int | None = None,
    opt_iterations: Any = None,
    opt_lr: float | None = None,
    opt_similarity: str = "lncc",
    preprocess: str | None = None,
    input_shape: Any = None,
    orientation: str = "physical",
    transform_scheme: str = "grid",
    padding_mode: str = "border",
    auto_masks: bool = True,
    prealign: str = "none",
    prealign_similarity: str = "mi",
    memory_limit_gb: float | None = None,
    outputs: Any = None,
    device: str = "auto",
    inverse: bool = True,
    overview: bool = True,
    qc: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> None:
    """Register MOVING to FIXED and write the results into OUTPUT_DIR (a new folder, written as a whole).

    Written files (all on the fixed image's grid unless said otherwise):
      warped_moving.nii.gz          the moving image resampled onto the fixed grid (linear), float32
      displacement_mm.nii.gz        physical displacement, ITK/ANTs convention: 5D (X,Y,Z,1,3), intent 1007, vectors
                                    in LPS mm; fixed point x -> moving point x + u(x). Use it with
                                    antsApplyTransforms -r FIXED -i MOVING -t displacement_mm.nii.gz, ITK or 3D Slicer
      ddf_voxels.nii.gz             (X,Y,Z,3) displacement in fixed voxels (MONAI Warp convention, relative to the
                                    moving image resampled onto the fixed grid by world coordinates)
      jacobian_determinant.nii.gz   det J of the fixed -> moving map (<= 0: folded)
      inverse_displacement_mm.nii.gz  the moving -> fixed transform on the moving grid (unless --noinverse)
      transform_fixed_to_moving.h5  with --outputs all / transform: ITK composite transform [affine, displacement
                                    field] (fixed -> moving points)
      transform_moving_to_fixed.h5  with --outputs all / inverse_transform: its inverse direction
      affine_fixed_to_moving.tfm    with --prealign: the affine pre-alignment alone (ITK text, LPS)
      overview.png                  slices of fixed, moving, warped, difference, deformation grid and det J
      summary.json                  timings, folds, settings, the weights' model card and the conventions above

    How the network sees the images (axis order, input shape, intensity preprocessing) comes from the weights'
    model card; --preprocess / --input_shape are only for weights whose card leaves them open (e.g. uniGradICON).

    Args:
        fixed: fixed image (NIfTI, NRRD, or any format MONAI LoadImage reads).
        moving: moving image, 2D/3D like the fixed one; any size, spacing and orientation.
        output_dir: a new folder, or an empty one, or (with --overwrite) a previous result folder.
        fixed_mask: optional mask on the fixed grid (binarized, multiplied into the preprocessed image).
        moving_mask: optional mask on the moving grid.
        modality: ct or mri: which bundle's models/model.pt is the default weight file (ct: bundles/gradicon_lung,
            mri: bundles/gradicon_brain); with --weights it must agree with the weights' card.
        fixed_segmentation, moving_segmentation: label maps on the images' grids for --io_dice_weight (a soft Dice
            term on the labels both share, in the weights' instance optimization).
        weights: a weight file of this project or a released GradICON/uniGradICON file (recognised by its keys).
        method: network (default: the weights, then instance optimization) or optimize (no network and no weights:
            GradICON's objective, LNCC both ways + lambda GradICON, optimized over the two transforms directly,
            coarse to fine on a working grid -- the fixed image's shape capped at 175 voxels per axis, or
            --input_shape in the file's axis order; --preprocess defaults to unigradicon_ct / unigradicon_mri by
            --modality; about a minute at 96^3 and several at 175^3 on 2 CPU cores).
        io_iterations: instance-optimization steps after the network (default 50; 0 for a single forward pass).
        io_lr: instance-optimization learning rate (default: 2e-5 for --io_method weights, 0.05 voxels per step
            for fields).
        io_method: weights (default, the paper's: Adam on all network weights, restored afterwards) or fields (the
            network's two transforms optimized directly, the weights untouched; ~15x less time per step on CPU).
        io_sim: similarity of the weights' instance optimization: lncc (default, GradICON's), lncc2 (squared LNCC,
            uniGradICON's) or mind (MIND-SSC, for different contrasts).
        io_mask_loss: compare images only inside --fixed_mask / --moving_mask during the weights' instance
            optimization (each comparison masked on its target's grid).
        io_dice_weight: weight of a soft Dice term on --fixed_segmentation / --moving_segmentation in the weights'
            instance optimization (0: none).
        opt_lambda: GradICON weight of --method optimize and --io_method fields (default 3, measured: see
            monai_gradicon.field_optimization).
        opt_levels: pyramid levels of --method optimize (default 3, fewer for an axis under 58 voxels) or
            --io_method fields (default 1).
        opt_iterations: Adam steps per level of --method optimize, one number or one per level coarse to fine
            (default 100,50,25).
        opt_lr: learning rate of --method optimize, voxels of the level per step (default 0.1).
        opt_similarity: lncc (default), lncc2 or ssd, for --method optimize and --io_method fields.
        preprocess: intensity preprocessing, only where the card does not state it (unigradicon_ct,
            unigradicon_mri, lung_ct, brain, none).
        input_shape: network shape, e.g. 175,175,175 (network axis order), only where the card does not state it.
        orientation: physical (default: the moving image is reoriented to the fixed one's axes before the network)
            or index (arrays paired by index as stored, as the reference: a file stored flipped registers flipped).
        transform_scheme: grid (default: the composed map on the network grid, interpolated, as the reference's ITK
            transform) or exact (the composition of the steps evaluated at every voxel).
        padding_mode: border (default) or zeros: the warped image's values outside the moving image.
        auto_masks: with weights for lung-masked CT (preprocessing lung_ct), compute a lung mask for an image given
            without --fixed_mask / --moving_mask (HU threshold, body, airways, components, hole filling; written as
            fixed_lung_mask.nii.gz / moving_lung_mask.nii.gz next to the results); --noauto_masks feeds unmasked CT.
        prealign: none (default), rigid or affine: an affine pre-alignment (moments initialisation, rotation
            search, multi-resolution optimisation) before the network, for pairs the network's capture range does
            not cover (different scanners, positioning, a large shift); composed exactly with the deformable
            transform in every output, and written as affine_fixed_to_moving.tfm (ITK, LPS).
        prealign_similarity: mi (mutual information, any modality; default) or lncc for the pre-alignment.
        outputs: which files to write, comma-separated: warped, ddf, displacement, inverse_displacement, transform
            (transform_fixed_to_moving.h5: ITK composite [affine, displacement field], the moving image's resampling
            transform for ITK / SimpleITK / ANTs / Slicer), inverse_transform (transform_moving_to_fixed.h5),
            jacobian, overview, or all; default all but the two .h5 files (each costs about as much time as a
            compressed displacement field; the inverse ones unless --noinverse). summary.json,
            affine_fixed_to_moving.tfm (with --prealign) and computed lung masks are always written. Leaving out
            both inverse_displacement and inverse_transform skips computing the inverse.
        memory_limit_gb: refuse, before any work, a registration whose predicted peak memory (from the image sizes)
            exceeds this many GiB; default: the machine's total memory.
        device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
        inverse: also write the inverse (moving -> fixed) displacement; --noinverse skips it.
        overview: write overview.png; --nooverview skips it.
        qc: also write a QC report: qc_report.html (self-contained page), qc_overview.png (slices through the
            anatomy), qc_inverse_consistency.png and qc_inverse_consistency_mm.nii.gz (|Phi_BA(Phi_AB(x)) - x| in mm
            on the fixed grid), qc.json (its statistics, folds, SDlogJ, non-diffeomorphic volume).
        overwrite: replace a previous result folder at OUTPUT_DIR (as a whole).
        seed: seed of the instance-optimization noise.
        progress: show the progress bar (--noprogress hides it).
    """
    start = time.perf_counter()
    fixed_p = _existing_file(_path(fixed, "fixed"), "fixed image")
    moving_p = _existing_file(_path(moving, "moving"), "moving image")
    out_dir = _path(output_dir, "output_dir")
    fmask_p = _existing_file(_path(fixed_mask, "fixed_mask", False), "fixed mask")
    mmask_p = _existing_file(_path(moving_mask, "moving_mask", False), "moving mask")
    fseg_p = _existing_file(_path(fixed_segmentation, "fixed_segmentation", False), "fixed segmentation")
    mseg_p = _existing_file(_path(moving_segmentation, "moving_segmentation", False), "moving segmentation")
    opts = _run_options(
        modality=modality, weights=weights, io_iterations=io_iterations, io_lr=io_lr, preprocess=preprocess,
        input_shape=input_shape, orientation=orientation, transform_scheme=transform_scheme, padding_mode=padding_mode,
        auto_masks=auto_masks, prealign=prealign, prealign_similarity=prealign_similarity,
        memory_limit_gb=memory_limit_gb, outputs=outputs, device=device, inverse=inverse, overview=overview,
        overwrite=overwrite, seed=seed, progress=progress, qc=qc, method=method, io_method=io_method, io_sim=io_sim,
        io_mask_loss=io_mask_loss, io_dice_weight=io_dice_weight, opt_lambda=opt_lambda, opt_levels=opt_levels,
        opt_iterations=opt_iterations, opt_lr=opt_lr, opt_similarity=opt_similarity,
    )
    if (fseg_p is None) != (mseg_p is None) or (fseg_p is not None) != (opts.io_dice_weight > 0):
        raise ValueError("--io_dice_weight > 0 needs both --fixed_segmentation and --moving_segmentation, and the "
                         "segmentations are used only by it.")
    if opts.io_mask_loss and (fmask_p is None or mmask_p is None):
        raise ValueError("--io_mask_loss needs both --fixed_mask and --moving_mask.")
    inputs = [p for p in (fixed_p, moving_p, fmask_p, mmask_p, fseg_p, mseg_p, opts.weights) if p]
    check_result_folder(out_dir, inputs, opts.overwrite)  # fail early, before the slow part

    limit = opts.memory_limit_gb
    fixed_shape, moving_shape = read_shape(fixed_p, "fixed image"), read_shape(moving_p, "moving image")
    network, card, settings = _load_model(opts, fixed_shape)
    predicted = predict_peak_memory_gb(fixed_shape, moving_shape, settings)
    if limit is not None and predicted > limit:
        raise MemoryError(
            f"The predicted peak memory of this registration is {predicted:.1f} GiB (fixed {fixed_shape}, moving "
            f"{moving_shape} voxels), more than --memory_limit_gb {limit:.1f}. Raise the limit if the "
            "machine has that much memory, or crop / downsample the images."
        )
    _say(f"Predicted peak memory {predicted:.1f} GiB" + (f" (limit {limit:.1f} GiB)." if limit else "."))
    _say(_network_line(network, card, settings, opts))
    note = _lung_mask_note(settings)
    if note is not None and (fmask_p is None or mmask_p is None):
        _say(note)
    result, paths = _register_and_save(network, settings, opts, out_dir, fixed_p, moving_p, fmask_p, mmask_p,
                                       fseg_p, mseg_p)
    tm = result.timings
    stage = stage_name(result.settings)
    _say(
        f"Done in {time.perf_counter() - start:.1f} s ("
        + (f"{settings.prealign} pre-alignment {tm['prealign']:.1f} s, " if "prealign" in tm else "")
        + f"{stage} {tm[stage]:.1f} s, original grids "
        f"{tm['original_grids']:.1f} s, writing {tm['write']:.1f} s). Folds (det J <= 0): "
        f"{result.folds_percent:.4f}% of fixed voxels; std log det J {result.log_jacobian_std:.4f}.\n"
        f"Results in {os.path.abspath(out_dir)}: " + ", ".join(os.path.basename(p) for p in paths.values())
    )


def warp(
    transform_dir: str | None = None,
    image: str | None = None,
    output: str | None = None,
    labels: bool = False,
    overwrite: bool = False,
    device: str = "auto",
) -> None:
    """Apply a saved registration (a folder written by register) to IMAGE and write OUTPUT on the fixed grid.

    IMAGE may have any grid as long as it lives in the moving image's world space (e.g. a segmentation of the moving
    image). Images are interpolated linearly (float32 output); with --labels nearest neighbour is used, the label
    dtype is kept, and a floating point image with non-integer values is refused.

    Args:
        transform_dir: folder written by register (it must hold displacement_mm.nii.gz).
        image: image or label map to warp.
        output: output NIfTI path (.nii or .nii.gz); never one of the inputs, never inside TRANSFORM_DIR.
        labels: warp a label map (nearest neighbour).
        overwrite: replace an existing OUTPUT file.
        device: where the resampling is computed: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
    """
    tdir, img_p, out_p = _path(transform_dir, "transform_dir"), _path(image, "image"), _path(output, "output")
    _switch(labels, "labels")
    _switch(overwrite, "overwrite")
    dev = resolve_device(device)
    _existing_file(img_p, "image to warp")
    _check_output_file(out_p, [img_p], overwrite, inside_forbidden=[tdir], suffixes=(".nii", ".nii.gz"))
    array, affine = apply_saved_transform(tdir, img_p, labels=labels, device=dev)
    write_nifti(out_p, array, affine)
    _say(f"Wrote {out_p} ({'labels, nearest neighbour' if labels else 'linear'}; shape {array.shape}, {array.dtype}).")


def _check_output_file(out_p: str, inputs: Sequence[str | None], overwrite: bool, inside_forbidden: Sequence[str],
                       suffixes: tuple[str, ...]) -> None:
    if not out_p.lower().endswith(suffixes):
        raise ValueError(f"--output must be a file name ending in {' or '.join(suffixes)}, got {out_p}.")
    if os.path.isdir(out_p):
        raise IsADirectoryError(f"--output {out_p} is a directory; give a file name.")
    for p in inputs:
        if p and os.path.exists(p) and os.path.exists(out_p) and os.path.samefile(p, out_p):
            raise ValueError(f"--output {out_p} is one of the inputs ({p}); choose another file name.")
    for folder in inside_forbidden:
        if folder and os.path.commonpath([os.path.realpath(out_p), os.path.realpath(folder)]) == \
                os.path.realpath(folder):
            raise ValueError(f"--output {out_p} is inside the result folder {folder}; write it elsewhere so the result "
                             "stays as it was written.")
    if os.path.lexists(out_p) and not overwrite:
        raise FileExistsError(f"{out_p} already exists; pass --overwrite to replace it.")
    parent = os.path.dirname(os.path.abspath(out_p))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"The folder of --output {out_p} does not exist.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write --output {out_p}: {parent} is not writable.")


def evaluate(
    transform_dir: str | None = None,
    fixed_landmarks: str | None = None,
    moving_landmarks: str | None = None,
    landmarks_in: str | None = None,
    index_base: int = 0,
    fixed_labels: str | None = None,
    moving_labels: str | None = None,
    output: str | None = None,
    overwrite: bool = False,
    device: str = "auto",
) -> None:
    """Metrics of a saved registration: folds, std log det J, landmark error (mm, both directions) and Dice.

    Landmark files: one point per line, 3 numbers separated by spaces, tabs or commas ('#' comments and one header row
    allowed). The frame must be stated: --landmarks_in voxel (array indices of each image; --index_base 1 for
    1-based files such as DIR-Lab), ras or lps (world mm). The error is reported for fixed -> moving (Phi_AB applied to
    the fixed landmarks), moving -> fixed (needs inverse_displacement_mm.nii.gz) and before registration (world
    distance of the pairs).

    Args:
        transform_dir: folder written by register.
        fixed_landmarks: landmarks of the fixed image.
        moving_landmarks: corresponding landmarks of the moving image.
        landmarks_in: voxel, ras or lps.
        index_base: 0 or 1, for voxel landmarks.
        fixed_labels: label map on the fixed grid.
        moving_labels: label map on the moving grid (warped with nearest neighbour).
        output: optional JSON file for all metrics (per-landmark errors included); never an input, never inside
            TRANSFORM_DIR.
        overwrite: replace an existing OUTPUT.
        device: where det J and the label warping are computed: auto (cuda if available, else cpu), cpu, cuda or
            cuda:N.
    """
    tdir = _path(transform_dir, "transform_dir")
    out_p = _path(output, "output", False)
    files = {name: _path(value, name, False) for name, value in (
        ("fixed_landmarks", fixed_landmarks), ("moving_landmarks", moving_landmarks), ("fixed_labels", fixed_labels),
        ("moving_labels", moving_labels))}
    for name, p in files.items():
        _existing_file(p, name.replace("_", " "))
    if landmarks_in is not None:
        _choice(landmarks_in, "landmarks_in", LANDMARK_FRAMES)
    if isinstance(index_base, bool) or index_base not in (0, 1):
        raise ValueError(f"--index_base must be 0 or 1, got {index_base!r}.")
    _switch(overwrite, "overwrite")
    dev = resolve_device(device)
    if out_p is not None:
        _check_output_file(out_p, list(files.values()), overwrite, inside_forbidden=[tdir], suffixes=(".json",))
    result = evaluate_saved(tdir, landmarks_in=landmarks_in, index_base=index_base, device=dev, **files)
    lines = [f"folds (det J <= 0): {result['folds_percent']:.4f}%   std log det J: {result['log_jacobian_std']:.4f}"]
    for key, label in (("tre_before_mm", "before registration"), ("tre_fixed_to_moving", "fixed -> moving"),
                       ("tre_moving_to_fixed", "moving -> fixed")):
        if key in result:
            r = result[key]
            lines.append(f"TRE {label}: mean {r['mean_mm']:.3f} mm, std {r['std_mm']:.3f}, p95 {r['p95_mm']:.3f}, "
                         f"max {r['max_mm']:.3f} ({result['landmarks']['count']} landmarks)")
    if "dice" in result:
        lines.append("Dice: " + ", ".join(f"{k}: {v:.4f}" for k, v in result["dice"].items()))
    print("\n".join(lines))
    if out_p is not None:
        atomic_write_text(out_p, json.dumps(result, indent=2) + "\n")
        _say(f"Wrote {out_p}")


def convert_weights(
    input: str | None = None,
    output: str | None = None,
    bundle_dir: str | None = None,
    axis_order: str | None = None,
    input_shape: Any = None,
    preprocessing: str | None = None,
    modality: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write a weight file of this project, with its model card, from a released GradICON / uniGradICON file (.trch)
    or from a file without a card. The result loads with --weights, load_weights, monai.bundle.load and the bundles.

    Args:
        input: the file to convert (e.g. lung_model_weights_step_2.trch, Step_2_final.trch); never changed.
        output: the file to write (e.g. model.pt); or give --bundle_dir instead.
        bundle_dir: a bundle folder: write <bundle_dir>/models/model.pt, checking the card against the bundle's
            configs/metadata.json "model_card".
        axis_order: reference or file; card fields the input leaves unknown (a released file's card already says
            reference) or, for a file without a card, how it was trained.
        input_shape: e.g. 175,175,175 (network axis order).
        preprocessing: a preprocessing name (lung_ct, brain, unigradicon_ct, unigradicon_mri, none).
        modality: ct or mri.
        name: a description stored in the card.
        overwrite: replace an existing output file (never the input).
    """
    from monai_gradicon.bundle_utils import bundle_model_card

    in_p = _existing_file(_path(input, "input"), "input weight")
    if (output is None) == (bundle_dir is None):
        raise ValueError("Give exactly one of --output and --bundle_dir.")
    expect = None
    if bundle_dir is not None:
        bundle = _path(bundle_dir, "bundle_dir")
        expect = bundle_model_card(bundle)
        out_p = os.path.join(bundle, "models", "model.pt")
    else:
        out_p = _path(output, "output")
    if axis_order is not None:
        _choice(axis_order, "axis_order", AXIS_ORDERS)
    if preprocessing is not None:
        _choice(preprocessing, "preprocessing", tuple(PREPROCESSING))
    if modality is not None:
        _choice(modality, "modality", tuple(MODALITY_BUNDLES))
    _switch(overwrite, "overwrite")
    shape = parse_shape(input_shape, "--input_shape")
    path, card = convert_weight_file(in_p, out_p, overwrite=overwrite, expect=expect, axis_order=axis_order,
                                     input_shape=shape, preprocessing=preprocessing, modality=modality, name=name)
    _say(f"Wrote {path}: {card.num_steps}-step {card.spatial_dims}D network; card: axis order {card.axis_order}, "
         f"input shape {card.input_shape}, preprocessing {card.preprocessing}, modality {card.modality}"
         + (f", from {card.source_file} (sha256 {card.source_sha256[:12]}...)" if card.source_sha256 else "") + ".")


def register_batch(
    pairs: str | None = None,
    dataset_json: str | None = None,
    split: str | None = None,
    data_root: str | None = None,
    dataset_masks: bool = False,
    output_dir: str | None = None,
    skip_existing: bool = False,
    modality: str | None = None,
    weights: str | None = None,
    method: str = "network",
    io_iterations: int | None = None,
    io_lr: float | None = None,
    io_method: str = "weights",
    io_sim: str = "lncc",
    io_mask_loss: bool = False,
    opt_lambda: float | None = None,
    opt_levels: int | None = None,
    opt_iterations: Any = None,
    opt_lr: float | None = None,
    opt_similarity: str = "lncc",
    preprocess: str | None = None,
    input_shape: Any = None,
    orientation: str = "physical",
    transform_scheme: str = "grid",
    padding_mode: str = "border",
    auto_masks: bool = True,
    prealign: str = "none",
    prealign_similarity: str = "mi",
    memory_limit_gb: float | None = None,
    outputs: Any = None,
    device: str = "auto",
    inverse: bool = True,
    overview: bool = True,
    qc: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> None:
    """Register every pair of a list with one model (loaded once): one result folder per pair under OUTPUT_DIR,
    and OUTPUT_DIR/summary.csv + summary.json.

    The whole list is checked before any registration (every file present and readable, names unique and usable as
    folder names, no result folder in the way, the predicted memory of every pair); all problems are reported at
    once. Each pair's folder OUTPUT_DIR/<name>/ holds what register writes (see register --help) and is written as
    a whole: it is complete or absent. A pair that fails is recorded in the summary (its error) and the next pair
    runs; the exit status is 1 if any pair failed. One line per pair gives the count, the outcome and the time left.

    Pair list (--pairs): a .csv with a header row naming the columns fixed, moving (required), fixed_mask,
    moving_mask, name (optional; default <moving stem>_to_<fixed stem>), one pair per row; or a .json list of objects
    with those keys. Relative paths are relative to the list's folder (or --data_root). Or a Learn2Reg dataset JSON
    (--dataset_json, --split): pairs named disp_FFFF_MMMM, so that OUTPUT_DIR is a predictions folder
    evaluate_learn2reg scores directly.

    summary.csv / summary.json columns: name, status (ok, failed, skipped, not_run), seconds, registration_seconds,
    folds_percent (det J <= 0, % of fixed voxels), log_jacobian_std (SDlogJ), error, output_dir, fixed, moving,
    fixed_mask, moving_mask.

    Args:
        pairs: a CSV or JSON pair list (give this or --dataset_json).
        dataset_json: a Learn2Reg *_dataset.json (NLST_dataset.json, OASIS_dataset.json, ...).
        split: with --dataset_json: training, validation (default) or test.
        data_root: the folder relative paths are relative to (default: the list's / dataset JSON's folder).
        dataset_masks: with --dataset_json: use the dataset's masks (images -> masks in each path, e.g. NLST's lung
            masks) as fixed and moving masks.
        output_dir: the batch's folder (created if missing): OUTPUT_DIR/<name>/ per pair, summary.csv, summary.json.
        skip_existing: keep the pairs whose folder already holds a complete result (a rerun after a failure or an
            interruption); without it (or --overwrite) an existing result is an error.
        modality, weights, method, io_iterations, io_lr, io_method, io_sim, io_mask_loss, opt_lambda, opt_levels,
        opt_iterations, opt_lr, opt_similarity, preprocess, input_shape, orientation, transform_scheme,
        padding_mode, auto_masks, prealign, prealign_similarity, outputs, inverse, overview, qc, seed: as for register,
            the same for every pair (--io_mask_loss uses each pair's masks; segmentations and --io_dice_weight are
            register's only).
        memory_limit_gb: refuse the batch, before any work, if a pair's predicted peak memory exceeds this many GiB;
            default: the machine's total memory.
        device: auto (cuda if available, else cpu), cpu, cuda or cuda:N; the model is moved there once.
        overwrite: replace complete previous results in the pairs' folders (each as a whole, when its pair is
            written); folders holding anything else are never replaced.
        progress: also show the pipeline's own progress bars within each pair (default: one line per pair).
    """
    start = time.perf_counter()
    list_p = _path(pairs, "pairs", False)
    dataset_p = _path(dataset_json, "dataset_json", False)
    if (list_p is None) == (dataset_p is None):
        raise ValueError("Give exactly one of --pairs (a CSV or JSON pair list) and --dataset_json (a Learn2Reg "
                         "dataset JSON, with --split).")
    out_root = _path(output_dir, "output_dir")
    root_p = _path(data_root, "data_root", False)
    if root_p is not None and not os.path.isdir(root_p):
        raise NotADirectoryError(f"--data_root {root_p} is not an existing folder.")
    _switch(dataset_masks, "dataset_masks")
    _switch(skip_existing, "skip_existing")
    if list_p is not None and (split is not None or dataset_masks):
        raise ValueError("--split and --dataset_masks belong to --dataset_json (a Learn2Reg dataset), not --pairs.")
    if split is not None:
        _choice(split, "split", tuple(LEARN2REG_SPLITS))
    opts = _run_options(
        modality=modality, weights=weights, io_iterations=io_iterations, io_lr=io_lr, preprocess=preprocess,
        input_shape=input_shape, orientation=orientation, transform_scheme=transform_scheme, padding_mode=padding_mode,
        auto_masks=auto_masks, prealign=prealign, prealign_similarity=prealign_similarity,
        memory_limit_gb=memory_limit_gb, outputs=outputs, device=device, inverse=inverse, overview=overview,
        overwrite=overwrite, seed=seed, progress=progress, qc=qc, method=method, io_method=io_method, io_sim=io_sim,
        io_mask_loss=io_mask_loss, io_dice_weight=0.0, opt_lambda=opt_lambda, opt_levels=opt_levels,
        opt_iterations=opt_iterations, opt_lr=opt_lr, opt_similarity=opt_similarity,
    )
    if list_p is not None:
        batch_pairs = read_pair_list(list_p, root_p)
        source = {"pair_list": os.path.abspath(list_p)}
    else:
        assert dataset_p is not None
        split = split or "validation"
        batch_pairs = learn2reg_batch_pairs(dataset_p, split, root_p, masks=dataset_masks)
        source = {"learn2reg_dataset": os.path.abspath(dataset_p), "split": split, "dataset_masks": dataset_masks}
    plan = plan_batch(batch_pairs, out_root, overwrite=opts.overwrite, skip_existing=skip_existing,
                      protect=[p for p in (opts.weights,) if p])  # every pair checked before the slow part
    if opts.io_mask_loss:
        unmasked = [i.pair.name for i in plan.to_run if i.pair.fixed_mask is None or i.pair.moving_mask is None]
        if unmasked:
            raise ValueError(f"--io_mask_loss needs both masks for every pair; {len(unmasked)} pair(s) have none: "
                             f"{', '.join(unmasked[:10])}{', ...' if len(unmasked) > 10 else ''}.")

    first = plan.items[0].fixed_shape if plan.items else (1, 1, 1)
    network, card, settings = _load_model(opts, first)  # once for the batch, on the device once
    plan = check_batch_memory(plan, lambda shape: _pair_settings(settings, opts, shape), opts.memory_limit_gb)
    n, kept = len(plan.items), len(plan.items) - len(plan.to_run)
    peak = max((item.predicted_memory_gb for item in plan.to_run if item.predicted_memory_gb is not None), default=0.0)
    _say(f"Batch of {n} pair{'s' if n != 1 else ''}: {n - kept} to register" + (f", {kept} kept (complete results "
         "already there)" if kept else "") + f"; results in {plan.output_root}; predicted peak memory up to "
         f"{peak:.1f} GiB" + (f" (limit {opts.memory_limit_gb:.1f} GiB)." if opts.memory_limit_gb else "."))
    _say(_network_line(network, card, settings, opts))
    note = _lung_mask_note(settings)
    if note is not None and any(i.pair.fixed_mask is None or i.pair.moving_mask is None for i in plan.to_run):
        _say(note)

    def register_one(pair, out):
        return _register_and_save(network, settings, opts, out, pair.fixed, pair.moving, pair.fixed_mask,
                                  pair.moving_mask)[0]

    def announce(k, total, pair):
        _say(f"[{k}/{total}] {pair.name}: registering {os.path.basename(pair.moving)} -> "
             f"{os.path.basename(pair.fixed)}")

    details = {
        "source": source, "weights": None if opts.weights is None else os.path.abspath(opts.weights),
        "default_weights": opts.default_weights, "device": str(opts.device), "settings": settings.to_dict(),
        "model_card": None if card is None else card.to_dict(),
        "padding_mode": opts.padding_mode, "outputs": opts.outputs, "overview": opts.overview,
    }
    batch = run_batch(plan, register_one, log=_say, details=details, before_pair=announce if opts.progress else None)
    summary = {kind: os.path.join(plan.output_root, name) for kind, name in SUMMARY_FILES.items()}
    _say(f"Batch done in {time.perf_counter() - start:.1f} s: {len(batch.ok)} ok, {len(batch.failed)} failed, "
         f"{len(batch.skipped)} kept. Summary: {summary['csv']}, {summary['json']}")
    if batch.failed:
        names = ", ".join(r.name for r in batch.failed[:10]) + (", ..." if len(batch.failed) > 10 else "")
        raise BatchFailuresError(f"{len(batch.failed)} of {n} pairs failed ({names}); their errors are in "
                                 f"{summary['csv']}. The other results were written; rerun with --skip_existing "
                                 "to retry only the missing pairs.")


EXPORT_FORMATS = ("learn2reg",)
"""Formats :func:`export` writes."""


def export(
    transform_dir: str | None = None,
    output: str | None = None,
    format: str = "learn2reg",  # noqa: A002 (the flag's name)
    dtype: str = "float32",
    overwrite: bool = False,
) -> None:
    """Write a saved registration (a folder written by register) in another tool's format.

    --format learn2reg: the Learn2Reg submission field of Phi_AB: (X, Y, Z, 3) float voxels on the fixed grid in the
    scipy.ndimage.map_coordinates convention (fixed voxel x corresponds to moving voxel x + d(x), indices of the
    moving image as stored). Name it disp_FFFF_MMMM.nii.gz (or .npz) for a submission; evaluate-learn2reg scores a
    folder of them (or of result folders) directly.

    Args:
        transform_dir: folder written by register.
        output: the field file, ending in .nii.gz or .npz; never inside TRANSFORM_DIR.
        format: learn2reg.
        dtype: float32 (default) or float16 (.npz only: half the size, ~0.01 voxel rounding at 20 voxels).
        overwrite: replace an existing OUTPUT.
    """
    from monai_gradicon.pipeline.learn2reg import FIELD_DTYPES, export_saved_learn2reg

    tdir, out_p = _path(transform_dir, "transform_dir"), _path(output, "output")
    _choice(format, "format", EXPORT_FORMATS)
    _choice(dtype, "dtype", FIELD_DTYPES)
    _switch(overwrite, "overwrite")
    if not os.path.isdir(tdir):
        raise NotADirectoryError(f"--transform_dir {tdir} is not a folder written by register.")
    _check_output_file(out_p, [], overwrite, inside_forbidden=[tdir], suffixes=(".nii.gz", ".npz"))
    path = export_saved_learn2reg(tdir, out_p, dtype)
    _say(f"Wrote {path} (Learn2Reg field, {dtype}, fixed voxel x -> moving voxel x + d(x)).")


def evaluate_learn2reg(
    dataset_json: str | None = None,
    predictions: str | None = None,
    output_dir: str | None = None,
    metrics: Any = None,
    split: str = "validation",
    data_root: str | None = None,
    labels: Any = None,
    keypoints: str = "keypoints",
    masked_evaluation: bool = False,
    hd95_units: str = "mm",
    ndv_mask: str = "none",
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Score a folder of predictions of a Learn2Reg split as the official evaluation does, per pair and aggregated
    (mean, std and the 0.3 quantile over cases: TRE30, DSC30), into OUTPUT_DIR/metrics.json and metrics.csv.

    Args:
        dataset_json: the task's *_dataset.json (NLST_dataset.json, OASIS_dataset.json, ...).
        predictions: a folder with, per pair, a field disp_FFFF_MMMM.nii.gz / .npz (export --format learn2reg) or a
            result folder of this project named disp_FFFF_MMMM (register-batch --dataset_json writes those).
        output_dir: where metrics.json and metrics.csv go (created if missing; existing ones need --overwrite).
        metrics: comma-separated selection of tre, dice, hd95, sdlogj, ndv (NLST: tre,sdlogj,ndv; OASIS:
            dice,hd95,sdlogj,ndv).
        split: training, validation (default) or test.
        data_root: the folder the JSON's paths are relative to (default: the JSON's folder).
        labels: the labels dice / hd95 score, e.g. 1-35 or 1,2,3 (OASIS: 1-35).
        keypoints: the keypoint folder stem (keypoints, or landmarks for manual landmarks).
        masked_evaluation: SDlogJ inside the fixed image's mask (the official option).
        hd95_units: mm (default) or voxels (unit spacing, as the official script).
        ndv_mask: none (every interior voxel), moving_image (voxels where the moving image > 0, as LUMIR) or
            fixed_mask.
        overwrite: replace metrics.json / metrics.csv in OUTPUT_DIR.
        progress: one line per pair.
    """
    from monai_gradicon.pipeline.learn2reg import LEARN2REG_METRICS, NDV_MASKS
    from monai_gradicon.pipeline.learn2reg import evaluate_learn2reg as evaluate_pairs

    json_p = _existing_file(_path(dataset_json, "dataset_json"), "Learn2Reg dataset JSON")
    pred_p, out_dir = _path(predictions, "predictions"), _path(output_dir, "output_dir")
    root_p = _path(data_root, "data_root", False)
    if metrics is None:
        raise ValueError(f"--metrics is required: a comma-separated selection of {', '.join(LEARN2REG_METRICS)}.")
    chosen = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if str(m).strip()]
    for m in chosen:
        _choice(m, "metrics", LEARN2REG_METRICS)
    _choice(split, "split", tuple(LEARN2REG_SPLITS))
    _choice(hd95_units, "hd95_units", ("mm", "voxels"))
    _choice(ndv_mask, "ndv_mask", NDV_MASKS)
    for value, name in ((masked_evaluation, "masked_evaluation"), (overwrite, "overwrite"), (progress, "progress")):
        _switch(value, name)
    label_list = _labels(labels)
    if not os.path.isdir(pred_p):
        raise NotADirectoryError(f"--predictions {pred_p} is not a folder.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"--output_dir {out_dir} exists and is not a folder.")
    os.makedirs(out_dir, exist_ok=True)  # an empty folder at worst; unwritable places fail here, before the work
    targets = {kind: os.path.join(out_dir, f"metrics.{kind}") for kind in ("json", "csv")}
    for target in targets.values():
        _check_output_file(target, [json_p], overwrite, inside_forbidden=[], suffixes=(os.path.splitext(target)[1],))
    evaluation = evaluate_pairs(json_p, pred_p, metrics=chosen, split=split, data_root=root_p, labels=label_list,
                                keypoints=keypoints, masked_evaluation=masked_evaluation, hd95_units=hd95_units,
                                ndv_mask=ndv_mask, progress=progress)
    evaluation.write_csv(targets["csv"])
    evaluation.write_json(targets["json"])
    print("\n".join(f"{column}: mean {agg['mean']:.4f}, std {agg['std']:.4f}, 30% {agg['30']:.4f}"
                    for column, agg in evaluation.aggregates.items()))
    _say(f"Wrote {targets['json']} and {targets['csv']} ({len(evaluation.cases)} pairs).")


def _labels(value: Any) -> list[int] | None:
    """``--labels 1-35`` / ``1,2,3`` / ``(1, 2)`` -> a list of ints (None when absent)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    parts = value.split(",") if isinstance(value, str) else list(value)
    out: list[int] = []
    try:
        for part in parts:
            text = str(part).strip()
            if "-" in text:
                lo, hi = text.split("-", 1)
                out += list(range(int(lo), int(hi) + 1))
            elif text:
                out.append(int(text))
    except ValueError as exc:
        raise ValueError(f"--labels must be whole numbers and ranges like 1-35 or 1,2,3; got {value!r}.") from exc
    if not out:
        raise ValueError(f"--labels is empty: {value!r}.")
    return out


COMMANDS: dict[str, Callable[..., None]] = {
    "register": register, "register-batch": register_batch, "warp": warp, "evaluate": evaluate,
    "export": export, "evaluate-learn2reg": evaluate_learn2reg, "convert-weights": convert_weights,
}


def _check_flags(args: Sequence[str]) -> None:
    """Refuse unknown or misspelt flags before anything runs (Fire would report them only after the command ran),
    naming the nearest valid one."""
    if not args or args[0] not in COMMANDS:
        return
    params = inspect.signature(COMMANDS[args[0]]).parameters
    names = set(params)
    switches = {n for n, p in params.items() if isinstance(p.default, bool)}
    valid = names | {f"no{n}" for n in switches}
    for arg in args[1:]:
        if arg == "--":
            break
        if not arg.startswith("--") or arg in ("--help", "-h"):
            continue
        flag = arg[2:].split("=", 1)[0].replace("-", "_")
        if flag not in valid:
            near = difflib.get_close_matches(flag, sorted(valid), n=1)
            hint = f"; did you mean --{near[0]}?" if near else f"; valid flags: {', '.join('--' + n for n in params)}"
            raise ValueError(f"{args[0]}: unknown flag --{flag}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``monai-gradicon`` and ``python -m monai_gradicon``; returns the exit status."""
    args = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in (sys.argv[1:] if argv is None else argv)]
    finished = False
    try:
        _check_flags(args)
        fire.Fire(COMMANDS, command=args, name="monai_gradicon")
        finished = True
    except NonFiniteResultError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except BatchFailuresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except _USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except fire.core.FireExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        if not finished:
            if args and args[0] == "register-batch":
                print("interrupted: the pairs finished before are written and listed in the batch's summary.csv; "
                      "the pair in progress left nothing (result folders are written as a whole). Rerun with "
                      "--skip_existing to continue.", file=sys.stderr)
            else:
                print("interrupted: no result was written (result folders and files are written as a whole, so "
                      "anything already there is as it was).", file=sys.stderr)
        return 130
    return 0
