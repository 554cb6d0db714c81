"""The result of one registration and its files: one convention per output, the same from every door.

Files (:data:`OUTPUT_FILES`; the bundle inference writes the same contents as ``<case>_<name>``):

* ``displacement_mm.nii.gz``: the ITK / ANTs / 3D Slicer displacement field on the fixed image's grid -- 5D
  ``(X, Y, Z, 1, 3)``, ``intent_code 1007``, vector components **LPS** mm (x and y negated relative to the NIfTI
  RAS frame), the fixed image's affine. Fixed point ``x`` corresponds to moving point ``x + u(x)`` (a resampling
  transform fixed -> moving): ``antsApplyTransforms -r fixed -i moving -t displacement_mm.nii.gz``, ITK
  ``DisplacementFieldTransform``, 3D Slicer.
* ``ddf_voxels.nii.gz``: the MONAI ``Warp`` DDF on the fixed grid, ``(X, Y, Z, 3)``, in voxels of the fixed grid,
  channel ``k`` along array axis ``k``: ``Warp()(moving resampled onto the fixed grid by world coordinates, ddf)``
  is the warped image (``ddf = A_fixed^-1 u``); when both images share one grid it is the plain voxel displacement.
* ``warped_moving.nii.gz``: the original moving image linearly interpolated at ``x + u(x)`` for every fixed voxel,
  float32, on the fixed grid.
* ``inverse_displacement_mm.nii.gz``: as ``displacement_mm`` for ``Phi_BA``, on the moving image's grid.
* ``transform_fixed_to_moving.h5``: the same fixed -> moving resampling transform as an ITK composite transform file
  (:mod:`monai_gradicon.itk_transforms`) that keeps the two parts apart: ``[AffineTransform, DisplacementField
  Transform]`` in ITK's order (the field is applied first): ``x -> M(x + d(x))`` with ``M`` the affine pre-alignment
  (the identity without one) and ``d`` the network's deformation alone on the fixed grid (LPS mm). ITK's
  ``ResampleImageFilter`` / ``sitk.Resample``, ``antsApplyTransforms -t`` and 3D Slicer resample the moving image
  onto the fixed grid with it; at the fixed voxels it equals ``displacement_mm``.
* ``transform_moving_to_fixed.h5``: the inverse direction (moving point -> fixed point, from ``Phi_BA``):
  ``[DisplacementFieldTransform, AffineTransform]``, ``y -> e(M^-1 y)`` with ``e`` the network's inverse deformation
  on the grid the network registered the moving image on (the fixed grid with a pre-alignment, the moving grid
  without one). Without a pre-alignment it equals ``inverse_displacement_mm`` at the moving voxels; with one, up to
  the linear interpolation of ``e`` between fixed voxels.
* ``jacobian_determinant.nii.gz``: det J of ``x -> x + u(x)`` in physical space; ``<= 0`` is a fold.
* ``overview.png``, ``summary.json`` (timings, settings, model card, folds, conventions; written last).

:func:`write_result_folder` writes them into a temporary folder beside the target and moves it into place as a
whole, so a result folder holds one complete run or nothing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monai_gradicon.io import Image, as_image, write_displacement_field, write_nifti
from monai_gradicon.io_utils import atomic_write_text, jsonable
from monai_gradicon.itk_transforms import (
    ITKAffine,
    ITKComponent,
    ITKDisplacementField,
    require_h5py,
    write_itk_composite,
)
from monai_gradicon.model_card import ModelCard
from monai_gradicon.pipeline.core import (
    NetworkTransforms,
    OriginalGridFields,
    PreparedPair,
    RegistrationSettings,
)
from monai_gradicon.resample import Grid, box_relative_ddf, map_points, physical_displacement, warp_physical

__all__ = [
    "OUTPUT_FILES",
    "OUTPUT_CHOICES",
    "DEFAULT_OUTPUTS",
    "INVERSE_OUTPUTS",
    "RESULT_MARKER",
    "CONVENTIONS",
    "is_complete_result",
    "RegistrationResult",
    "check_outputs",
    "check_result_folder",
    "write_result_folder",
    "read_label_image",
    "warp_with_field",
]

OUTPUT_FILES: dict[str, str] = {
    "warped": "warped_moving.nii.gz",
    "ddf": "ddf_voxels.nii.gz",
    "displacement": "displacement_mm.nii.gz",
    "inverse_displacement": "inverse_displacement_mm.nii.gz",
    "transform": "transform_fixed_to_moving.h5",
    "inverse_transform": "transform_moving_to_fixed.h5",
    "jacobian": "jacobian_determinant.nii.gz",
    "overview": "overview.png",
    "affine": "affine_fixed_to_moving.tfm",
    "fixed_mask": "fixed_lung_mask.nii.gz",
    "moving_mask": "moving_lung_mask.nii.gz",
    "summary": "summary.json",
}
"""File names of a result folder (the summary is written last; the lung masks only when they were computed)."""

OUTPUT_CHOICES: tuple[str, ...] = (
    "warped", "ddf", "displacement", "inverse_displacement", "transform", "inverse_transform", "jacobian", "overview",
)
"""Keys of :data:`OUTPUT_FILES` a caller chooses among (``outputs=``; default all of them). The inverse outputs
(``inverse_displacement``, ``inverse_transform``) need the inverse computed; the summary, the pre-alignment's
``.tfm`` and computed lung masks are always written."""

DEFAULT_OUTPUTS: tuple[str, ...] = ("warped", "ddf", "displacement", "inverse_displacement", "jacobian", "overview")
"""What ``outputs=None`` writes: everything but the two ITK ``.h5`` composite transforms, which are asked for by
name (each costs about as much to write as a compressed displacement field -- 4-7 s for 256 x 256 x 120 on 2 CPU
cores -- and ``displacement_mm`` already is the same transform for every ITK-based tool)."""

INVERSE_OUTPUTS = ("inverse_displacement", "inverse_transform")
"""The outputs that need ``Phi_BA`` (a registration without them can skip computing the inverse)."""

RESULT_MARKER = "monai_gradicon registration result"
"""``summary.json["kind"]`` of a result folder: only folders carrying it (and holding only result files) may be
replaced with ``overwrite``."""

CONVENTIONS: dict[str, str] = {
    "world": "RAS+ mm in memory; NIfTI affines are voxel -> RAS",
    "displacement_mm": (
        "5D (X,Y,Z,1,3) float32, NIfTI intent 1007 (vector), the fixed image's grid and affine; vectors in LPS "
        "millimetres (ITK/ANTs convention, x and y negated relative to the NIfTI RAS frame). Fixed point x (world) "
        "corresponds to moving point x + u(x): a resampling transform (fixed -> moving) usable directly with "
        "antsApplyTransforms -t, ITK DisplacementFieldTransform and 3D Slicer."
    ),
    "ddf_voxels": (
        "4D (X,Y,Z,3) float32 on the fixed grid, displacement in voxels of the fixed grid, channel k along array axis "
        "k; MONAI Warp convention for the moving image resampled onto the fixed grid by world coordinates "
        "(ddf = inverse(fixed affine linear part) @ u_RAS)."
    ),
    "warped": "the original moving image linearly interpolated at x + u(x) for every fixed voxel, float32",
    "inverse_displacement_mm": "as displacement_mm, on the moving grid: moving point y -> fixed point y + v(y)",
    "jacobian_determinant": "det J of x -> x + u(x) in physical space on the fixed grid; <= 0 is a fold",
    "transform_fixed_to_moving.h5": (
        "ITK composite transform (HDF5): [AffineTransform_double, DisplacementFieldTransform_double] in ITK's order "
        "(the last is applied first), LPS mm: fixed point x -> M(x + d(x)), M the affine pre-alignment (identity "
        "without one, also in affine_fixed_to_moving.tfm), d the network's deformation alone on the fixed grid. The "
        "resampling transform of the moving image onto the fixed grid (ITK ResampleImageFilter, SimpleITK Resample, "
        "antsApplyTransforms -t, 3D Slicer); equal to displacement_mm at the fixed voxels."
    ),
    "transform_moving_to_fixed.h5": (
        "ITK composite transform (HDF5): [DisplacementFieldTransform_double, AffineTransform_double], LPS mm: moving "
        "point y -> e(M^-1 y), e the network's inverse deformation on the grid the network registered the moving "
        "image on (the fixed grid with a pre-alignment, the moving grid without one); ITK uses zero displacement "
        "for points more than half a voxel outside that grid."
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# result folders
# ----------------------------------------------------------------------------------------------------------------


def check_outputs(outputs: Sequence[str] | None, inverse: bool = True) -> list[str]:
    """Check an ``outputs`` selection before any work; returns the chosen keys (:data:`DEFAULT_OUTPUTS` for
    ``None``, then the inverse outputs only when ``inverse``; the word ``"all"`` in the selection stands for every
    one of :data:`OUTPUT_CHOICES`).

    Raises:
        ValueError: an unknown name, an empty selection, or an inverse output chosen with ``inverse=False``.
        ImportError: a ``.h5`` output chosen in an environment without h5py (naming the fix).
    """
    if outputs is None:
        chosen = [k for k in DEFAULT_OUTPUTS if inverse or k not in INVERSE_OUTPUTS]
    else:
        if isinstance(outputs, str):
            raise TypeError(f"outputs must be a sequence of names, not the string {outputs!r}.")
        names = [str(o) for o in outputs]
        if "all" in names:
            names = [k for k in OUTPUT_CHOICES if inverse or k not in INVERSE_OUTPUTS] + [n for n in names if n != "all"]
        chosen = list(dict.fromkeys(names))
        unknown = [o for o in chosen if o not in OUTPUT_CHOICES]
        if unknown or not chosen:
            raise ValueError(f"Unknown outputs {unknown}; choose from {', '.join(OUTPUT_CHOICES)}." if unknown else
                             f"No outputs chosen; choose from {', '.join(OUTPUT_CHOICES)}.")
        needs_inverse = [o for o in chosen if o in INVERSE_OUTPUTS]
        if needs_inverse and not inverse:
            raise ValueError(f"{', '.join(needs_inverse)} was asked for but the inverse is not computed "
                             "(inverse=False).")
    if "transform" in chosen or "inverse_transform" in chosen:
        require_h5py()
    return chosen


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _result_files(folder: str) -> set[str] | None:
    """The files a previous result folder says it wrote (its summary's ``outputs``), or None if it is not one."""
    try:
        with open(os.path.join(folder, OUTPUT_FILES["summary"]), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("kind") != RESULT_MARKER:
        return None
    outputs = summary.get("outputs")
    if not isinstance(outputs, list):
        return None
    return {str(o) for o in outputs} | {OUTPUT_FILES["summary"]}


def is_complete_result(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds one complete result of this project: a ``summary.json`` with the
    :data:`RESULT_MARKER` whose ``outputs`` are all present as files (what :func:`write_result_folder` leaves)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return False
    written = _result_files(folder)
    return written is not None and all(os.path.isfile(os.path.join(folder, name)) for name in written)


def check_result_folder(
    output_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], overwrite: bool
) -> str:
    """Check, before any work, that a result folder can be written at ``output_dir``; returns its absolute path.

    The folder must not exist, or be empty, or (with ``overwrite``) hold exactly a previous result of this project
    (its ``summary.json`` marker and nothing but result files): a folder with anything else in it is never replaced.
    It must not contain any input, and its parent must be writable. A file in the folder that the previous result did
    not write itself (its ``summary.json`` lists what it wrote) is the user's, and is never replaced.

    Raises:
        ValueError, FileExistsError, NotADirectoryError, PermissionError: naming the problem.
    """
    raw = os.fspath(output_dir)
    if not raw.strip():
        raise ValueError("The output directory is empty (''); give a folder name such as result/.")
    path = os.path.abspath(raw)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"The output directory {raw} exists and is not a directory.")
    if os.path.realpath(path) in (os.path.realpath(os.getcwd()), os.path.realpath(os.sep)):
        raise ValueError(f"The output directory {raw} is the current directory (or /); give a new folder for results.")
    for p in inputs:
        p = os.fspath(p)
        if os.path.exists(p) and _inside(p, path):
            raise ValueError(
                f"The output directory {raw} contains the input file {p}; choose a new directory so nothing you have "
                "can be overwritten."
            )
    if os.path.isdir(path):
        entries = sorted(os.listdir(path))
        if entries and not overwrite:
            raise FileExistsError(
                f"{raw} already holds files ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); pass "
                "--overwrite (overwrite=True) to replace a previous result there, or choose another directory."
            )
        written = _result_files(path) if entries else set()
        foreign = [e for e in entries if written is None or e not in written]
        if entries and (foreign or written is None):
            raise FileExistsError(
                f"{raw} holds files that are not a complete monai_gradicon result ({', '.join((foreign or entries)[:5])}"
                "); --overwrite only replaces a previous result folder as a whole. Choose another directory."
            )
    parent = os.path.dirname(path)
    probe = parent
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write the output directory {raw}: {probe} is not writable.")
    return path


def write_result_folder(
    output_dir: str | os.PathLike, writers: Mapping[str, Callable[[str], Any]], inputs: Sequence[str | os.PathLike],
    overwrite: bool, workers: int | None = None,
) -> dict[str, str]:
    """Write a result folder as a whole: ``writers`` maps file names to ``write(path)`` callables, called in a
    temporary folder beside ``output_dir`` -- all but the last in parallel threads (gzip compression releases the
    GIL, so the files compress on all cores), then the last one (the summary) -- and the folder is moved into
    place. A previous result there (``overwrite``) is replaced as a whole; on any error or interruption the
    temporary folder is removed and ``output_dir`` is as it was. Returns ``{file name: final path}``.

    Args:
        workers: threads for the parallel writes (default: the number of CPUs, at most 4; 1 writes in order).
    """
    path = check_result_folder(output_dir, inputs, overwrite)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f".{name}.partial-{tag}")
    old = os.path.join(parent, f".{name}.replaced-{tag}")
    os.mkdir(tmp)
    moved_old = False
    items = list(writers.items())
    threads = max(1, min(4, os.cpu_count() or 1) if workers is None else int(workers))
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 and len(items) > 2 else None
    try:
        if pool is not None:
            futures = [pool.submit(write, os.path.join(tmp, file_name)) for file_name, write in items[:-1]]
            for future in futures:
                future.result()
        else:
            for file_name, write in items[:-1]:
                write(os.path.join(tmp, file_name))
        if items:
            items[-1][1](os.path.join(tmp, items[-1][0]))
        if os.path.isdir(path):
            os.rename(path, old)
            moved_old = True
        os.rename(tmp, path)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # no thread still writing into the folder being removed
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_old and not os.path.exists(path):
            os.rename(old, path)
        raise
    if pool is not None:
        pool.shutdown(wait=True)
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)
    return {file_name: os.path.join(path, file_name) for file_name in writers}


# ----------------------------------------------------------------------------------------------------------------
# labels and warping with a field
# ----------------------------------------------------------------------------------------------------------------


def read_label_image(path_or_image: Image | str | os.PathLike, name: str = "label map") -> Image:
    """Read a label map and check it holds whole numbers (integer dtype, or float with integral values)."""
    img = as_image(path_or_image, name)
    arr = img.array
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all() or not np.array_equal(arr, np.round(arr)):
            raise ValueError(
                f"The {name} {img.path or ''} is a floating point image with non-integer values (e.g. an intensity "
                "image or a probability map), not a label map; pass it without --labels or round it first."
            )
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"The {name} has dtype {arr.dtype}; a label map needs integer values.")
    return img


def warp_with_field(
    image: Image, displacement: np.ndarray, target: Grid, labels: bool, padding_mode: str | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Resample ``image`` (in the moving image's world space, any grid) onto ``target`` through a world-mm field
    ``[dim, *target.shape]``. Labels: nearest neighbour, zero outside, dtype kept; images: linear, border, float32.
    ``device``: where the resampling is computed (the result is a numpy array either way)."""
    if image.ndim != target.ndim:
        raise ValueError(f"The image to warp is {image.ndim}D but the transform is {target.ndim}D.")
    if labels:
        image = read_label_image(image, "label map")
        out = warp_physical(image.array, Grid.of(image), displacement, target, "nearest", padding_mode or "zeros",
                            device)
        return out.astype(image.array.dtype)
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        raise ValueError(f"The image to warp {image.path or ''} contains NaN or infinite voxels.")
    return warp_physical(image.array, Grid.of(image), displacement, target, "bilinear", padding_mode or "border",
                         device)


# ----------------------------------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RegistrationResult:
    """Everything :func:`monai_gradicon.pipeline.register` computed (conventions: the module docstring).

    Attributes:
        prepared: the pair as prepared (inputs, orientation, network inputs, settings).
        transforms: ``phi_ab`` / ``phi_ba`` in the file's axis order (normalized coordinates of the file-order
            network grid ``settings.file_order_shape``); use :meth:`fixed_to_moving` for world points.
        fields: the arrays on the original grids.
        card: the weights' model card (None for ``method="optimize"``: no weights).
        timings: seconds per stage.
        extra: further JSON-able facts a door adds to the summary (weights path, ...).
    """

    prepared: PreparedPair
    transforms: NetworkTransforms
    fields: OriginalGridFields
    card: ModelCard | None
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    # -- convenient views -------------------------------------------------------------------------------------------
    @property
    def settings(self) -> RegistrationSettings:
        return self.prepared.settings

    @property
    def fixed(self) -> Image:
        return self.prepared.inputs.fixed

    @property
    def moving(self) -> Image:
        return self.prepared.inputs.moving

    @property
    def displacement(self) -> np.ndarray:
        """``[dim, *S_fixed]`` float32 world RAS mm, fixed -> moving."""
        return self.fields.displacement

    @property
    def ddf(self) -> np.ndarray:
        """``[dim, *S_fixed]`` float32 in fixed voxels."""
        return self.fields.ddf

    @property
    def jacobian(self) -> np.ndarray:
        return self.fields.jacobian

    @property
    def displacement_mm_max(self) -> float:
        """The largest displacement length (mm) on the fixed grid (computed on each access, slice by slice)."""
        return _max_length(self.displacement)

    @property
    def warped_moving(self) -> np.ndarray:
        return self.fields.warped_moving

    @property
    def inverse_displacement(self) -> np.ndarray | None:
        """``[dim, *S_moving]`` float32 world RAS mm, moving -> fixed (on the moving image's stored grid)."""
        return self.fields.inverse_displacement

    @property
    def folds_percent(self) -> float:
        return self.fields.folds_percent

    @property
    def log_jacobian_std(self) -> float:
        return self.fields.log_jacobian_std

    @property
    def phi_ab(self):
        return self.transforms.phi_ab

    @property
    def phi_ba(self):
        return self.transforms.phi_ba

    @property
    def io_history(self) -> list[dict[str, float]]:
        return self.transforms.io_history

    # -- points and images ------------------------------------------------------------------------------------------
    def fixed_to_moving(self, points_world: np.ndarray) -> np.ndarray:
        """Map fixed-image world points ``[K, dim]`` (RAS mm) to moving world points with ``Phi_AB`` (the transform
        itself, per the settings' scheme; no dense field)."""
        return map_points(self.phi_ab, points_world, Grid.of(self.fixed), Grid.of(self.prepared.moving_oriented),
                          self.settings.file_order_shape, self.device, post=self.prepared.prealign)

    def moving_to_fixed(self, points_world: np.ndarray) -> np.ndarray:
        """Map moving-image world points ``[K, dim]`` (RAS mm) to fixed world points with ``Phi_BA``."""
        if self.phi_ba is None:
            raise ValueError("The inverse transform was not computed (inverse=False).")
        return map_points(self.phi_ba, points_world, Grid.of(self.prepared.moving_oriented), Grid.of(self.fixed),
                          self.settings.file_order_shape, self.device, pre=self.prepared.prealign_inverse)

    def warp(self, image: Image | str | os.PathLike, labels: bool = False, padding_mode: str | None = None) -> np.ndarray:
        """Resample another image defined in the moving image's world space onto the fixed grid (see
        :func:`warp_with_field`)."""
        img = as_image(image, "image to warp")
        return warp_with_field(img, self.displacement, Grid.of(self.fixed), labels, padding_mode)

    # -- the two parts of the transform (ITK files) -------------------------------------------------------------------
    def deformable_displacement(self) -> np.ndarray:
        """The network's deformation alone, ``[dim, *S_fixed]`` float32 world RAS mm on the fixed grid: fixed point
        ``x`` -> ``x + d(x)`` in the world of the image the network registered (``prepared.moving_oriented``: the
        moving image resampled through the pre-alignment ``M`` onto the fixed grid). ``M(x + d(x)) = x + u(x)`` with
        ``u`` = :attr:`displacement`; without a pre-alignment ``d = u`` (returned as is)."""
        if self.prepared.prealign is None:
            return self.displacement
        return physical_displacement(self.phi_ab, Grid.of(self.fixed), Grid.of(self.prepared.moving_oriented),
                                     self.settings.file_order_shape, self.device)

    def inverse_deformable_displacement(self) -> tuple[np.ndarray, Grid]:
        """The network's inverse deformation alone and its grid: ``([dim, *S], grid)``, float32 world RAS mm; point
        ``y`` of the registered moving image's world -> fixed point ``y + e(y)``, on the grid of
        ``prepared.moving_oriented`` (the fixed grid with a pre-alignment; without one the moving image's stored
        grid, where ``e`` = :attr:`inverse_displacement`). The inverse of the whole transform is ``y -> e(M^-1 y)``.

        Raises:
            ValueError: the inverse was not computed.
        """
        if self.phi_ba is None or self.inverse_displacement is None:
            raise ValueError("The inverse transform was not computed (inverse=False).")
        if self.prepared.prealign is None:
            return self.inverse_displacement, Grid.of(self.moving)
        paired = Grid.of(self.prepared.moving_oriented)
        field_ = physical_displacement(self.phi_ba, paired, Grid.of(self.fixed), self.settings.file_order_shape,
                                       self.device, output=paired)
        return field_, paired

    def itk_transform(self, inverse: bool = False) -> list[ITKComponent]:
        """The transform as ITK composite components (:func:`monai_gradicon.itk_transforms.write_itk_composite`; ITK's
        order, the last applied first).

        ``inverse=False``: ``[ITKAffine(M), ITKDisplacementField(d, fixed grid)]``, fixed point ``x`` -> moving point
        ``M(x + d(x))`` (the resampling transform of the moving image onto the fixed grid). ``inverse=True``:
        ``[ITKDisplacementField(e, grid), ITKAffine(M^-1)]``, moving point ``y`` -> fixed point ``e(M^-1 y)``. ``M``
        is the affine pre-alignment, the identity without one (the layout stays the same)."""
        ndim = self.fixed.ndim
        matrix = np.eye(ndim + 1) if self.prepared.prealign is None else np.asarray(self.prepared.prealign)
        if not inverse:
            return [ITKAffine(matrix), ITKDisplacementField(self.deformable_displacement(), Grid.of(self.fixed))]
        field_, grid = self.inverse_deformable_displacement()
        return [ITKDisplacementField(field_, grid), ITKAffine(np.linalg.inv(matrix))]

    # -- summary and files ------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The contents of ``summary.json``."""
        io = self.io_history
        inputs = self.prepared.inputs
        return {
            "kind": RESULT_MARKER,
            "fixed": _image_summary(self.fixed),
            "moving": _image_summary(self.moving),
            "masks": {"fixed": inputs.fixed_mask_source, "moving": inputs.moving_mask_source,
                      "automatic": {k: {"volume_ml": v.volume_ml, "components": v.components, "method": v.method,
                                        "details": v.details} for k, v in inputs.automatic_masks.items()}},
            "settings": self.settings.to_dict(),
            "moving_reoriented_for_network": self.prepared.reoriented,
            "prealign": None if self.prepared.prealign is None else {
                "matrix_fixed_to_moving_ras": np.round(self.prepared.prealign, 8).tolist(),
                "file": OUTPUT_FILES["affine"],
                "seconds": self.prepared.prealign_result.seconds,
            },
            "model_card": None if self.card is None else self.card.to_dict(),
            "device": self.device,
            "timings_seconds": {k: round(v, 3) for k, v in self.timings.items()},
            "folds": {
                "percent_voxels_detJ_le_0": self.folds_percent,
                "count": int(np.count_nonzero(self.jacobian <= 0)),
                "grid": "original fixed grid, Phi_AB (fixed -> moving), physical det J",
            },
            "log_jacobian_std": self.log_jacobian_std,
            "jacobian_min": float(self.jacobian.min()),
            "jacobian_max": float(self.jacobian.max()),
            "displacement_mm_max": self.displacement_mm_max,
            "instance_optimization": {
                "steps": len(io),
                "first_loss": io[0]["loss"] if io else None,
                "last_loss": io[-1]["loss"] if io else None,
                "history": io,
            },
            "conventions": CONVENTIONS,
            "software": {"monai_gradicon": _package_version(), "torch": torch.__version__,
                         "python": platform.python_version()},
            **self.extra,
        }

    def file_writers(self, overview: bool = True, outputs: Sequence[str] | None = None,
                     qc: bool = False) -> dict[str, Callable[[str], Any]]:
        """``{file name: write(path)}`` for the output files, the summary last.

        Args:
            overview: include ``overview.png``.
            qc: include the QC report (:func:`monai_gradicon.pipeline.qc.write_qc_report`: the ``qc_*`` files and
                ``qc_report.html``, written together by the report's writer; needs the inverse).
            outputs: keys of :data:`OUTPUT_CHOICES` to write (``warped``, ``ddf``, ``displacement``,
                ``inverse_displacement``, ``transform``, ``inverse_transform``, ``jacobian``, ``overview``); default
                all (the inverse ones when the inverse was computed). The summary, the pre-alignment's ``.tfm`` and
                computed lung masks are always written.

        Raises:
            ValueError: an unknown output, or an inverse output chosen when the inverse was not computed.
            ImportError: a ``.h5`` output without h5py.
        """
        wanted = set(check_outputs(outputs, self.inverse_displacement is not None))
        if qc and self.phi_ba is None:
            raise ValueError("The QC report needs the inverse transform: register with the inverse (not --noinverse, "
                             "and an inverse output or the default outputs).")
        if not overview:
            wanted.discard("overview")
        affine = self.fixed.affine
        makers: dict[str, Callable[[str], Any]] = {
            "warped": lambda p: write_nifti(p, np.asarray(self.warped_moving, dtype=np.float32), affine),
            "ddf": lambda p: write_nifti(p, _channels_last(self.ddf), affine),
            "displacement": lambda p: write_displacement_field(p, self.displacement, affine),
            "inverse_displacement": lambda p: write_displacement_field(p, self.inverse_displacement,
                                                                       self.moving.affine),
            "transform": lambda p: write_itk_composite(p, self.itk_transform()),
            "inverse_transform": lambda p: write_itk_composite(p, self.itk_transform(inverse=True)),
            "jacobian": lambda p: write_nifti(p, np.asarray(self.jacobian, np.float32), affine),
            "overview": self.save_overview,
        }
        writers: dict[str, Callable[[str], Any]] = {
            OUTPUT_FILES[key]: makers[key] for key in OUTPUT_CHOICES if key in wanted}
        if self.prepared.prealign is not None:
            from monai_gradicon.affine import write_itk_affine

            writers[OUTPUT_FILES["affine"]] = lambda p: write_itk_affine(p, self.prepared.prealign_result.matrix,
                                                                        self.fixed.ndim)
        for which, mask in self.prepared.inputs.automatic_masks.items():
            image = self.prepared.inputs.fixed if which == "fixed" else self.prepared.inputs.moving
            writers[OUTPUT_FILES[f"{which}_mask"]] = (
                lambda p, m=mask, a=image.affine: write_nifti(p, m.mask.astype(np.uint8), a))
        if qc:
            from monai_gradicon.pipeline.qc import QC_FILES, write_qc_report

            def report(path: str) -> None:  # every QC file at once (one inverse-consistency computation)
                write_qc_report(self, os.path.dirname(path))

            for key, name in QC_FILES.items():  # listed so the folder's summary names them; the report writes them
                writers[name] = report if key == "report" else _written_by_the_report
        names = [*writers, OUTPUT_FILES["summary"]]

        def summary(path: str) -> None:
            data = self.summary()
            data["outputs"] = names
            atomic_write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")

        writers[OUTPUT_FILES["summary"]] = summary
        return writers

    def save(self, output_dir: str | os.PathLike, overwrite: bool = False, protect: Sequence[str | os.PathLike] = (),
             overview: bool = True, outputs: Sequence[str] | None = None, qc: bool = False) -> dict[str, str]:
        """Write the result folder as a whole (:func:`write_result_folder`); returns ``{file name: path}``.

        Refuses (before writing anything) a folder holding an input or a file in ``protect``, a folder with files
        that are not a previous result, or a previous result without ``overwrite``. ``outputs``, ``qc``: see
        :meth:`file_writers`."""
        inputs = [p for p in (self.fixed.path, self.moving.path, *protect) if p]
        return write_result_folder(output_dir, self.file_writers(overview, outputs, qc), inputs, overwrite)

    def save_overview(self, path: str, slices: Sequence[int] | None = None) -> None:
        """The overview PNG: fixed, moving (box-aligned), warped, difference, deformation grid, det J; 3D: through
        ``slices`` (one fixed-grid index per axis; default the central slices)."""
        from monai_gradicon.visualize import save_overview_png

        fixed_grid = Grid.of(self.fixed)
        moving = self.prepared.moving_oriented  # the image the network registered (pre-aligned, if it was)
        moving_grid = Grid.of(moving)
        shape = self.settings.file_order_shape
        # Resizing both images to the network shape matches their bounding boxes: the network starts there. Show the
        # moving image box-aligned, and the deformation the network added on top, in fixed voxels.
        box = physical_displacement(_Identity(), fixed_grid, moving_grid, shape)
        moving_box = warp_physical(moving.array, moving_grid, box, fixed_grid)
        del box
        network_part = self.displacement if self.prepared.prealign is None else physical_displacement(
            self.phi_ab, fixed_grid, moving_grid, shape, self.device)
        deformation = box_relative_ddf(network_part, fixed_grid, moving_grid, shape)
        save_overview_png(
            path,
            self.fixed.array.astype(np.float32),
            moving_box,
            self.warped_moving,
            deformation,
            jacobian=self.jacobian,
            spacing=self.fixed.spacing,
            title=f"{_name(self.moving)} -> {_name(self.fixed)} (moving box-aligned; det J physical; "
            f"folds {self.folds_percent:.3f}%)",
            slices=slices,
        )


def _written_by_the_report(path: str) -> None:
    """The writer of a QC file other than the report: the report's writer writes it (nothing to do here)."""


class _Identity:
    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return points


def _package_version() -> str:
    from monai_gradicon import __version__

    return __version__


def _name(image: Image) -> str:
    return os.path.basename(image.path) if image.path else "in-memory image"


def _image_summary(image: Image) -> dict[str, Any]:
    return {
        "path": os.path.abspath(image.path) if image.path else None,
        "shape": list(image.shape),
        "spacing_mm": [round(s, 6) for s in image.spacing],
        "affine_ras": np.round(image.affine, 6).tolist(),
        "dtype": str(image.array.dtype),
    }




def _max_length(field_cf: np.ndarray) -> float:
    """The largest vector length of a channel-first field ``[dim, *S]`` (float64 sums, one slice at a time: no
    whole-field float64 copy)."""
    best = 0.0
    for k in range(field_cf.shape[1]):
        part = field_cf[:, k].astype(np.float64)
        best = max(best, float(np.sqrt(np.einsum("i...,i...->...", part, part)).max()))
    return best


def _channels_last(field_cf: np.ndarray) -> np.ndarray:
    """``[dim, *S]`` -> ``(X, Y, Z, dim)`` (2D: ``(X, Y, 1, 2)``) float32 for NIfTI."""
    out = np.moveaxis(np.asarray(field_cf, dtype=np.float32), 0, -1)
    return out[:, :, None, :] if field_cf.shape[0] == 2 else out
