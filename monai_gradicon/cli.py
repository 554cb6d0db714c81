"""Command line: ``python -m monai_gradicon <command>`` (or ``monai-gradicon <command>``).

Commands (``<command> --help`` shows each one's options):

* ``register``  register a moving image to a fixed image and write the results into a new folder;
* ``warp``      apply a saved result to another image or a label map;
* ``evaluate``  landmark error (both directions), Dice per label, folds and smoothness of a saved result;
* ``convert-weights``  turn a released GradICON / uniGradICON weight file into a monai_gradicon checkpoint.

Errors in the inputs are reported as one line ``error: ...`` (exit status 2); nothing the user had is overwritten.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import fire
import numpy as np

from monai_gradicon.io import ImageReadError, save_torch, write_nifti, write_text
from monai_gradicon.networks.registration import PRESET_SHAPES
from monai_gradicon.registration_api import (
    MODALITIES,
    OUTPUT_FILES,
    PREPROCESSING,
    apply_saved_transform,
    bundle_input_shape,
    check_output_paths,
    default_weights_path,
    evaluate_saved,
    network_from_weights,
    register_pair,
    resolve_device,
)
from monai_gradicon.weights import WeightFileError, network_from_official_weights

__all__ = ["main", "register", "warp", "evaluate", "convert_weights", "COMMANDS"]

_USER_ERRORS = (
    ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImageReadError, WeightFileError
)


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
    return os.fspath(str(value))


def _shape(value: Any, ndim: int | None = None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * (ndim or 3)
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--input_shape must be sizes like 175,175,175, got {value!r}.") from exc
    if any(s < 2 for s in shape):
        raise ValueError(f"--input_shape sizes must be >= 2, got {shape}.")
    return shape


def _resolve_weights(weights: str | None, modality: str) -> tuple[str, bool]:
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"The weight file does not exist: {weights}")
        return weights, False
    path = default_weights_path(modality)
    bundle = MODALITIES[modality].bundle
    if not path.is_file():
        raise FileNotFoundError(
            f"No --weights given and the default weights for --modality {modality} are missing: {path}. Get weights by "
            f"training the bundle (bundles/{bundle}) or by converting a released weight file:\n"
            "  python -m monai_gradicon convert-weights --input lung_model_weights_step_2.trch --output model.pt\n"
            "then pass --weights model.pt (released files also work directly with --weights)."
        )
    return str(path), True


def register(
    fixed: str | None = None,
    moving: str | None = None,
    output_dir: str | None = None,
    fixed_mask: str | None = None,
    moving_mask: str | None = None,
    modality: str = "ct",
    weights: str | None = None,
    io_iterations: int = 50,
    io_lr: float = 2e-5,
    preprocess: str | None = None,
    input_shape: Any = None,
    device: str = "auto",
    inverse: bool = True,
    overview: bool = True,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    reference_axis_order: bool = True,
) -> None:
    """Register MOVING to FIXED and write the results into OUTPUT_DIR.

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
      summary.json                  timings, folds, settings and the conventions above

    Args:
        fixed: fixed image (NIfTI, NRRD, or any format MONAI LoadImage reads).
        moving: moving image, 2D/3D like the fixed one; any size, spacing and orientation.
        output_dir: a new folder (or one without previous results, see --overwrite); it must not hold the inputs.
        fixed_mask: optional mask on the fixed grid (binarized, multiplied into the preprocessed image).
        moving_mask: optional mask on the moving grid.
        modality: ct or mri. Chooses the default weights (ct: bundles/gradicon_lung, mri: bundles/gradicon_brain),
            the default preprocessing and the default network shape.
        weights: a monai_gradicon checkpoint or a released GradICON/uniGradICON weight file (recognised by its keys).
        io_iterations: instance-optimization steps (Adam on all weights, the network is restored afterwards);
            0 for a single forward pass.
        io_lr: instance-optimization learning rate.
        preprocess: intensity preprocessing matching the weights: lung_ct (default for ct: GradICON lung, HU
            [-1000, 0] -> [0, 1] times the mask), brain (default for mri: x * 0.9 / max), unigradicon_ct or
            unigradicon_mri (for uniGradICON / multiGradICON weights, with --input_shape 175), or none.
        input_shape: network shape, e.g. 175,175,175, in the axis order the network sees (with
            --reference_axis_order the reference's z,y,x order: the file's last voxel axis is resized to the first
            size). Default: the bundle's declared shape, else the preset of the modality (ct 175^3, mri 130,155,130).
        device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
        inverse: also write the inverse (moving -> fixed) displacement; --noinverse skips it.
        overview: write overview.png; --nooverview skips it.
        overwrite: replace results already in OUTPUT_DIR.
        seed: seed of the instance-optimization noise.
        progress: show the progress bar (--noprogress hides it).
        reference_axis_order: show the network the arrays with their voxel axes reversed, (k, j, i) = ITK's numpy
            (z, y, x) order, as the GradICON reference and its released weights do (default);
            --noreference_axis_order feeds the file's index order (i, j, k). Outputs are on the original grids
            either way.
    """
    start = time.perf_counter()
    fixed_p, moving_p, out_dir = _path(fixed, "fixed"), _path(moving, "moving"), _path(output_dir, "output_dir")
    fmask_p, mmask_p = _path(fixed_mask, "fixed_mask", False), _path(moving_mask, "moving_mask", False)
    if modality not in MODALITIES:
        raise ValueError(f"--modality must be one of {sorted(MODALITIES)}, got {modality!r}.")
    method = preprocess if preprocess is not None else MODALITIES[modality].preprocess
    if method not in PREPROCESSING:
        raise ValueError(f"--preprocess must be one of {sorted(PREPROCESSING)}, got {method!r}.")
    io_iterations = 0 if io_iterations is None else io_iterations
    if not isinstance(io_iterations, int) or isinstance(io_iterations, bool) or io_iterations < 0:
        raise ValueError(f"--io_iterations must be a whole number >= 0, got {io_iterations!r}.")
    if not isinstance(reference_axis_order, bool):
        raise ValueError(
            f"--reference_axis_order is a switch: pass --reference_axis_order or --noreference_axis_order, got "
            f"{reference_axis_order!r}."
        )
    inputs = [p for p in (fixed_p, moving_p, fmask_p, mmask_p) if p]
    named = ((fixed_p, "fixed image"), (moving_p, "moving image"), (fmask_p, "fixed mask"), (mmask_p, "moving mask"))
    for p, name in named:
        if p is not None and not os.path.isfile(p):
            raise FileNotFoundError(f"The {name} file does not exist: {p}")
    weights_p, is_default = _resolve_weights(_path(weights, "weights", False), modality)
    # fail early, before the slow part
    check_output_paths(out_dir, list(OUTPUT_FILES.values()), inputs + [weights_p], overwrite, create=False)

    shape = _shape(input_shape)
    shape_source = "--input_shape"
    if shape is None and is_default:
        shape, shape_source = bundle_input_shape(modality), "the bundle's metadata"
    if shape is None:
        shape, shape_source = PRESET_SHAPES[MODALITIES[modality].preset], f"the {modality} preset"
    if is_default:
        _say(f"Using the default weights for --modality {modality}: {weights_p}")
    network = network_from_weights(weights_p, input_shape=None)
    if len(shape) != network.spatial_dims:
        shape = _shape(shape[0], network.spatial_dims) if len(set(shape)) == 1 else shape
    _say(
        f"Network: {network.num_steps} steps, {network.spatial_dims}D, shape {tuple(shape)} (from {shape_source}); "
        f"preprocessing {method}; instance optimization {io_iterations} steps; device {resolve_device(device)}"
    )
    if method == "lung_ct" and (fmask_p is None or mmask_p is None):
        _say(
            "Note: the GradICON lung model was trained on lung-masked CT; pass --fixed_mask and --moving_mask lung "
            "masks for best results."
        )
    result = register_pair(
        fixed_p,
        moving_p,
        network,
        fixed_mask=fmask_p,
        moving_mask=mmask_p,
        preprocess=method,
        input_shape=shape,
        io_iterations=io_iterations,
        io_lr=io_lr,
        io_seed=seed,
        inverse=inverse,
        reference_axis_order=reference_axis_order,
        device=device,
        progress=progress,
    )
    result.settings.update({"weights": os.path.abspath(weights_p), "default_weights": is_default, "modality": modality})
    paths = result.save(out_dir, overwrite=overwrite, protect=[weights_p], overview=overview, started_at=start)
    t = result.timings
    stage = "instance_optimization" if "instance_optimization" in t else "network"
    _say(
        f"Done in {t['total']:.1f} s ({stage} {t[stage]:.1f} s, composition {t['compose_and_warp']:.1f} s, writing "
        f"{t['write']:.1f} s). Folds (det J <= 0): {result.folds_percent:.4f}% of fixed voxels; std log det J "
        f"{result.log_jacobian_std:.4f}.\nResults in {os.path.abspath(out_dir)}: "
        + ", ".join(os.path.basename(p) for p in paths.values())
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
        output: output NIfTI path (.nii or .nii.gz); never one of the inputs.
        labels: warp a label map (nearest neighbour).
        overwrite: replace an existing OUTPUT.
    """
    tdir, img_p, out_p = _path(transform_dir, "transform_dir"), _path(image, "image"), _path(output, "output")
    if not out_p.lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"--output must be a NIfTI file name ending in .nii or .nii.gz, got {out_p}.")
    protected = [img_p] + [os.path.join(tdir, n) for n in OUTPUT_FILES.values()]
    for p in protected:
        if os.path.exists(p) and os.path.exists(out_p) and os.path.samefile(p, out_p):
            raise ValueError(f"--output {out_p} is one of the inputs ({p}); choose another file name.")
    if os.path.lexists(out_p) and not overwrite:
        raise FileExistsError(f"{out_p} already exists; pass --overwrite to replace it.")
    array, affine = apply_saved_transform(tdir, img_p, labels=labels)
    write_nifti(out_p, array, affine)
    _say(f"Wrote {out_p} ({'labels, nearest neighbour' if labels else 'linear'}; shape {array.shape}, {array.dtype}).")


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
        output: optional JSON file for all metrics (per-landmark errors included).
        overwrite: replace an existing OUTPUT.
    """
    tdir = _path(transform_dir, "transform_dir")
    out_p = _path(output, "output", False)
    if out_p is not None and os.path.lexists(out_p) and not overwrite:
        raise FileExistsError(f"{out_p} already exists; pass --overwrite to replace it.")
    result = evaluate_saved(
        tdir,
        fixed_landmarks=_path(fixed_landmarks, "fixed_landmarks", False),
        moving_landmarks=_path(moving_landmarks, "moving_landmarks", False),
        landmarks_in=landmarks_in,
        index_base=index_base,
        fixed_labels=_path(fixed_labels, "fixed_labels", False),
        moving_labels=_path(moving_labels, "moving_labels", False),
    )
    lines = [f"folds (det J <= 0): {result['folds_percent']:.4f}%   std log det J: {result['log_jacobian_std']:.4f}"]
    for key, label in (("tre_before_mm", "before registration"), ("tre_fixed_to_moving", "fixed -> moving"),
                       ("tre_moving_to_fixed", "moving -> fixed")):
        if key in result:
            r = result[key]
            lines.append(f"TRE {label}: mean {r['mean_mm']:.3f} mm, std {r['std_mm']:.3f}, max {r['max_mm']:.3f} "
                         f"({result['landmarks']['count']} landmarks)")
    if "dice" in result:
        lines.append("Dice: " + ", ".join(f"{k}: {v:.4f}" for k, v in result["dice"].items()))
    print("\n".join(lines))
    if out_p is not None:
        text = json.dumps(result, indent=2)
        write_text(out_p, text + "\n")
        _say(f"Wrote {out_p}")


def convert_weights(input: str | None = None, output: str | None = None, overwrite: bool = False) -> None:
    """Convert a released GradICON / uniGradICON weight file (.trch) into a monai_gradicon checkpoint (state dict
    with keys steps.<i>.unet.*), loadable with --weights, load_network_weights and the bundles.

    Args:
        input: the released weight file (e.g. lung_model_weights_step_2.trch, Step_2_final.trch).
        output: the checkpoint to write (e.g. model.pt).
        overwrite: replace an existing OUTPUT (never the input).
    """
    in_p, out_p = _path(input, "input"), _path(output, "output")
    if not os.path.isfile(in_p):
        raise FileNotFoundError(f"The weight file does not exist: {in_p}")
    if os.path.exists(out_p) and os.path.samefile(in_p, out_p):
        raise ValueError(f"--output {out_p} is the input file; choose another name.")
    if os.path.lexists(out_p) and not overwrite:
        raise FileExistsError(f"{out_p} already exists; pass --overwrite to replace it.")
    network = network_from_official_weights(in_p)
    save_torch(network.state_dict(), out_p)
    n_params = sum(int(np.prod(p.shape)) for p in network.state_dict().values())
    _say(f"Wrote {out_p}: {network.num_steps}-step {network.spatial_dims}D network, {n_params} values.")


COMMANDS = {"register": register, "warp": warp, "evaluate": evaluate, "convert-weights": convert_weights}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``monai-gradicon`` and ``python -m monai_gradicon``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        fire.Fire(COMMANDS, command=args, name="monai_gradicon")
    except _USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except fire.core.FireExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        print("interrupted; no partial results were left behind (files are written atomically).", file=sys.stderr)
        return 130
    return 0
