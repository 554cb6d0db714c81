"""Command line: ``python -m monai_gradicon <command>`` (or ``monai-gradicon <command>``).

Commands (``<command> --help`` shows each one's options):

* ``register``  register a moving image to a fixed image and write the results into a new folder;
* ``warp``      apply a saved result to another image or a label map;
* ``evaluate``  landmark error (both directions), Dice per label, folds and smoothness of a saved result;
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
from pathlib import Path
from typing import Any

import fire

from monai_gradicon.io import ImageReadError, read_shape, write_nifti
from monai_gradicon.io_utils import atomic_write_text
from monai_gradicon.model_card import AXIS_ORDERS, CardError
from monai_gradicon.pipeline import (
    ORIENTATIONS,
    TRANSFORM_SCHEMES,
    NonFiniteResultError,
    check_result_folder,
    predict_peak_memory_gb,
    register as register_images,
    resolve_device,
    resolve_settings,
)
from monai_gradicon.pipeline.saved import LANDMARK_FRAMES, apply_saved_transform, evaluate_saved
from monai_gradicon.data.preprocessing import PREPROCESSING
from monai_gradicon.weights import WeightFileError, convert_weights as convert_weight_file, load_weights, parse_shape

__all__ = ["main", "register", "warp", "evaluate", "convert_weights", "COMMANDS", "BUNDLES_DIR", "MODALITY_BUNDLES"]

_USER_ERRORS = (
    ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
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


OUTPUT_CHOICES = ("warped", "ddf", "displacement", "inverse_displacement", "jacobian", "overview")


def _outputs(value: Any) -> list[str] | None:
    """``--outputs displacement,warped`` (Fire gives a string or a tuple) -> a checked list, or None for all."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    items = [v for v in items if v]
    unknown = [v for v in items if v not in OUTPUT_CHOICES]
    if not items or unknown:
        raise ValueError(f"--outputs must be a comma-separated list of {', '.join(OUTPUT_CHOICES)}; got {value!r}.")
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


def register(
    fixed: str | None = None,
    moving: str | None = None,
    output_dir: str | None = None,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
    modality: str | None = None,
    weights: str | None = None,
    io_iterations: int = 50,
    io_lr: float = 2e-5,
    preprocess: str | None = None,
    input_shape: Any = None,
    orientation: str = "physical",
    transform_scheme: str = "grid",
    padding_mode: str = "border",
    auto_masks: bool = True,
    memory_limit_gb: float | None = None,
    outputs: Any = None,
    device: str = "auto",
    inverse: bool = True,
    overview: bool = True,
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
        weights: a weight file of this project or a released GradICON/uniGradICON file (recognised by its keys).
        io_iterations: instance-optimization steps (Adam on all weights, the network is restored afterwards);
            0 for a single forward pass.
        io_lr: instance-optimization learning rate.
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
        outputs: which files to write, e.g. displacement,warped (default all: warped, ddf, displacement,
            inverse_displacement, jacobian, overview; summary.json and computed lung masks always); leaving out
            inverse_displacement also skips computing the inverse.
        memory_limit_gb: refuse, before any work, a registration whose predicted peak memory (from the image sizes)
            exceeds this many GiB; default: the machine's total memory.
        device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
        inverse: also write the inverse (moving -> fixed) displacement; --noinverse skips it.
        overview: write overview.png; --nooverview skips it.
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
    if modality is not None:
        _choice(modality, "modality", tuple(MODALITY_BUNDLES))
    io_iterations = _whole(0 if io_iterations is None else io_iterations, "io_iterations")
    io_lr = _positive(io_lr, "io_lr")
    seed = _whole(seed, "seed")
    if preprocess is not None:
        _choice(preprocess, "preprocess", tuple(PREPROCESSING))
    _choice(orientation, "orientation", ORIENTATIONS)
    _choice(transform_scheme, "transform_scheme", TRANSFORM_SCHEMES)
    _choice(padding_mode, "padding_mode", ("border", "zeros"))
    for value, name in ((inverse, "inverse"), (overview, "overview"), (overwrite, "overwrite"), (progress, "progress"),
                        (auto_masks, "auto_masks")):
        _switch(value, name)
    chosen = _outputs(outputs)
    if chosen is not None and "inverse_displacement" not in chosen:
        inverse = False
    dev = resolve_device(device)
    shape_arg = input_shape if isinstance(input_shape, int) and not isinstance(input_shape, bool) else \
        parse_shape(input_shape, "--input_shape")
    weights_p, is_default = _resolve_weights(_path(weights, "weights", False), modality)
    inputs = [p for p in (fixed_p, moving_p, fmask_p, mmask_p) if p]
    check_result_folder(out_dir, inputs + [weights_p], overwrite)  # fail early, before the slow part

    network, card = load_weights(weights_p)
    if modality is not None and card.modality is not None and card.modality != modality:
        raise CardError(f"--modality {modality} but the model card of {weights_p} says modality {card.modality!r}.")
    if isinstance(shape_arg, int):
        shape_arg = (shape_arg,) * network.spatial_dims
    if is_default:
        _say(f"Using the default weights for --modality {modality or 'ct'}: {weights_p}")
    settings = resolve_settings(card, preprocessing=preprocess, input_shape=shape_arg, orientation=orientation,
                                transform_scheme=transform_scheme, inverse=inverse, io_iterations=io_iterations,
                                io_lr=io_lr, io_seed=seed, auto_masks=auto_masks, source=weights_p)
    limit = _positive(memory_limit_gb, "memory_limit_gb") if memory_limit_gb is not None else _total_memory_gb()
    fixed_shape, moving_shape = read_shape(fixed_p, "fixed image"), read_shape(moving_p, "moving image")
    predicted = predict_peak_memory_gb(fixed_shape, moving_shape, settings)
    if limit is not None and predicted > limit:
        raise MemoryError(
            f"The predicted peak memory of this registration is {predicted:.1f} GiB (fixed {fixed_shape}, moving "
            f"{moving_shape} voxels), more than --memory_limit_gb {limit:.1f}. Raise the limit if the "
            "machine has that much memory, or crop / downsample the images."
        )
    _say(f"Predicted peak memory {predicted:.1f} GiB" + (f" (limit {limit:.1f} GiB)." if limit else "."))
    _say(
        f"Network: {network.num_steps} steps, {network.spatial_dims}D, shape {settings.input_shape} in the "
        f"{settings.axis_order} axis order; preprocessing {settings.preprocessing}; orientation {orientation}; "
        f"transform {transform_scheme}; instance optimization {io_iterations} steps; device {dev} "
        f"({card.name or 'weights'})"
    )
    if settings.preprocessing == "lung_ct" and (fmask_p is None or mmask_p is None):
        _say("The GradICON lung model was trained on lung-masked CT: " + (
            "computing automatic lung masks for the images given without one (written next to the results)."
            if settings.makes_masks else "--noauto_masks: the unmasked CT is outside what the weights saw."))
    result = register_images(fixed_p, moving_p, network, fixed_mask=fmask_p, moving_mask=mmask_p, settings=settings,
                             padding_mode=padding_mode, device=str(dev), progress=progress)
    result.extra.update({"weights": os.path.abspath(weights_p), "default_weights": is_default})
    t = time.perf_counter()
    paths = result.save(out_dir, overwrite=overwrite, protect=[weights_p], overview=overview, outputs=chosen)
    result.timings["write"] = time.perf_counter() - t
    tm = result.timings
    stage = "instance_optimization" if "instance_optimization" in tm else "network"
    _say(
        f"Done in {time.perf_counter() - start:.1f} s ({stage} {tm[stage]:.1f} s, original grids "
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
    """
    tdir, img_p, out_p = _path(transform_dir, "transform_dir"), _path(image, "image"), _path(output, "output")
    _switch(labels, "labels")
    _switch(overwrite, "overwrite")
    _existing_file(img_p, "image to warp")
    _check_output_file(out_p, [img_p], overwrite, inside_forbidden=[tdir], suffixes=(".nii", ".nii.gz"))
    array, affine = apply_saved_transform(tdir, img_p, labels=labels)
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
    if out_p is not None:
        _check_output_file(out_p, list(files.values()), overwrite, inside_forbidden=[tdir], suffixes=(".json",))
    result = evaluate_saved(tdir, landmarks_in=landmarks_in, index_base=index_base, **files)
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


COMMANDS: dict[str, Callable[..., None]] = {
    "register": register, "warp": warp, "evaluate": evaluate, "convert-weights": convert_weights,
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
    except _USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except fire.core.FireExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        if not finished:
            print("interrupted: no result was written (result folders and files are written as a whole, so anything "
                  "already there is as it was).", file=sys.stderr)
        return 130
    return 0
