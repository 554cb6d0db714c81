"""Register two image files end to end: ``register_pair(fixed, moving, network) -> RegistrationResult``.

Pipeline (all of it usable without the command line, e.g. from a MONAI Label task):

1. read both images (any size, spacing, origin, direction; see :mod:`monai_gradicon.io`); if their voxel axes point
   in different anatomical directions, the moving array is permuted/flipped (exactly, no interpolation) to the fixed
   image's orientation so the network sees both the same way round;
2. intensity preprocessing tied to the weights (:data:`PREPROCESSING`; masks are binarized and multiplied in);
3. resize both to the network shape (trilinear, ``align_corners=False``). By default
   (``reference_axis_order=True``) the network sees each array with its spatial axes **reversed** — file voxel index
   ``(i, j, k)`` becomes network axes ``(k, j, i)``, the ``(z, y, x)`` numpy order of ITK that the reference
   implementation and the released weights use — so network axis ``a`` holds original axis ``dim - 1 - a``, resized
   to ``input_shape[a]``. With ``reference_axis_order=False`` the network sees the file's own index order;
4. one forward pass per direction, or instance optimization
   (:func:`~monai_gradicon.instance_optimization.instance_optimize`);
5. compose the transform on the **original fixed grid** in physical space (:mod:`monai_gradicon.resample`) and warp the
   original moving image once.

Output conventions (``RegistrationResult`` and the files of :meth:`RegistrationResult.save`):

* ``displacement`` / ``displacement_mm.nii.gz``: on the fixed grid, world mm. Fixed point ``x`` corresponds to moving
  point ``x + u(x)`` (a resampling transform, fixed -> moving). In memory RAS+; on disk the ITK/ANTs convention:
  5D ``(X, Y, Z, 1, 3)``, ``intent_code 1007``, vector components **LPS** (x and y negated), the fixed image's affine.
  Use it directly with ``antsApplyTransforms -r fixed -i moving -t displacement_mm.nii.gz``, ITK
  ``DisplacementFieldTransform`` or load it in 3D Slicer as a transform.
* ``ddf`` / ``ddf_voxels.nii.gz``: on the fixed grid, ``(X, Y, Z, 3)``, voxels **of the fixed grid**, channel k along
  array axis k: ``ddf = A_fixed^-1 u``. It is the MONAI ``Warp`` DDF for the moving image resampled onto the fixed
  grid by world coordinates (``monai.transforms.ResampleToMatch``); when both images share one grid it is the plain
  voxel displacement of Learn2Reg.
* ``jacobian`` / ``jacobian_determinant.nii.gz``: det of the Jacobian of ``x -> x + u(x)`` in physical space; folded
  voxels have ``det J <= 0``.
* ``inverse_displacement`` / ``inverse_displacement_mm.nii.gz``: the same for ``Phi_BA`` on the original moving grid
  (moving point ``y`` corresponds to fixed point ``y + v(y)``).
* ``warped_moving.nii.gz``: the original moving image, linearly interpolated at ``x + u(x)`` for every fixed voxel
  (border values outside the moving image), float32, on the fixed grid.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_gradicon.coordinate_transforms import CoordinateTransform
from monai_gradicon.instance_optimization import DEFAULT_IO_LR, instance_optimize
from monai_gradicon.io import (
    Image,
    as_image,
    read_displacement_field,
    spatial_affine,
    write_displacement_field,
    write_nifti,
    write_text,
)
from monai_gradicon.losses.objective import GradICONObjective
from monai_gradicon.metrics import (
    dice_per_label,
    folding_percentage,
    jacobian_determinant,
    log_jacobian_std,
    sample_ddf_at_points,
)
from monai_gradicon.networks.registration import STEP_LEVELS, GradICONNetwork, gradicon_network
from monai_gradicon.networks.unet2 import DOWN_CHANNELS, UP_CHANNELS, UNet2
from monai_gradicon.resample import (
    DEFAULT_CHUNK_VOXELS,
    Grid,
    box_relative_ddf,
    displacement_to_ddf,
    map_points,
    physical_displacement,
    resize_to_network,
    warp_physical,
)
from monai_gradicon.weights import (
    WeightFileError,
    is_official_state,
    load_network_weights,
    network_from_official_weights,
    read_state_dict,
)

__all__ = [
    "PREPROCESSING",
    "MODALITIES",
    "OUTPUT_FILES",
    "RegistrationResult",
    "register_pair",
    "preprocess_intensities",
    "resolve_device",
    "network_from_weights",
    "default_weights_path",
    "check_output_paths",
    "apply_saved_transform",
    "evaluate_saved",
    "read_label_image",
    "BUNDLES_DIR",
]

PREPROCESSING: dict[str, str] = {
    "lung_ct": "GradICON lung CT: clip HU to [-1000, 0], (HU + 1000) / 1000 -> [0, 1], times the binarized mask",
    "unigradicon_ct": "uniGradICON CT: clip HU to [-1000, 1000] -> [0, 1], times the binarized mask if given",
    "unigradicon_mri": "uniGradICON MR: [min, 99th percentile] -> [0, 1], times the binarized mask if given",
    "brain": "GradICON brain: x * 0.9 / max(x), times the binarized mask if given",
    "none": "intensities used as stored (float32), times the binarized mask if given",
}
"""Intensity preprocessing per name. It must match what the weights were trained with (see :data:`MODALITIES`)."""


@dataclass(frozen=True)
class Modality:
    """Defaults tied to a modality: the preprocessing, the bundle whose weights are used, the network shape preset."""

    preprocess: str
    bundle: str
    preset: str


MODALITIES: dict[str, Modality] = {
    "ct": Modality("lung_ct", "gradicon_lung", "lung"),
    "mri": Modality("brain", "gradicon_brain", "brain"),
}

OUTPUT_FILES: dict[str, str] = {
    "warped": "warped_moving.nii.gz",
    "ddf": "ddf_voxels.nii.gz",
    "displacement": "displacement_mm.nii.gz",
    "inverse_displacement": "inverse_displacement_mm.nii.gz",
    "jacobian": "jacobian_determinant.nii.gz",
    "overview": "overview.png",
    "summary": "summary.json",
}
"""File names written by :meth:`RegistrationResult.save` (the summary is written last)."""

BUNDLES_DIR = Path(__file__).resolve().parent.parent / "bundles"
"""Where the bundles of this repository live (their ``models/model.pt`` are the default weights)."""

DISPLACEMENT_CONVENTION = (
    "displacement_mm.nii.gz: 5D (X,Y,Z,1,3) float32, NIfTI intent 1007 (vector), the fixed image's grid and affine; "
    "vectors in LPS millimetres (ITK/ANTs convention, x and y negated relative to the NIfTI RAS frame). Fixed point x "
    "(world) corresponds to moving point x + u(x): a resampling transform (fixed -> moving) usable directly with "
    "antsApplyTransforms -t, ITK DisplacementFieldTransform and 3D Slicer."
)
DDF_CONVENTION = (
    "ddf_voxels.nii.gz: 4D (X,Y,Z,3) float32 on the fixed grid, displacement in voxels of the fixed grid, channel k "
    "along array axis k; MONAI Warp convention for the moving image resampled onto the fixed grid by world "
    "coordinates (ddf = inverse(fixed affine linear part) @ u_RAS)."
)


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; anything else is passed to :class:`torch.device`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available here; use --device cpu or auto.")
    return dev


def _check_finite_and_varying(array: np.ndarray, name: str) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ValueError(
                f"The {name} contains {bad} NaN or infinite voxel(s); fix or mask them before registering."
            )
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise ValueError(f"The {name} is constant (every voxel is {lo}); there is nothing to register.")


def _check_same_grid(image: Image, other: Image, what: str, of: str) -> None:
    if image.shape != other.shape:
        raise ValueError(
            f"The {what} has shape {image.shape} but the {of} has shape {other.shape}; they must share a grid."
        )
    if not np.allclose(image.affine, other.affine, atol=1e-3, rtol=1e-5):
        raise ValueError(
            f"The {what} and the {of} have the same shape but different geometry (affines differ):\n"
            f"{np.round(image.affine, 4)}\nvs\n{np.round(other.affine, 4)}"
        )


def _binary_mask(mask: Image, image: Image, what: str, of: str) -> np.ndarray:
    _check_same_grid(mask, image, what, of)
    if np.issubdtype(mask.array.dtype, np.floating) and not np.all(np.isfinite(mask.array)):
        raise ValueError(f"The {what} contains NaN or infinite values.")
    binary = mask.array > 0
    if not binary.any():
        raise ValueError(f"The {what} is empty (no voxel > 0).")
    return binary


def preprocess_intensities(
    array: np.ndarray, method: str | Callable[[np.ndarray], np.ndarray], mask: np.ndarray | None = None
) -> np.ndarray:
    """Map raw intensities ``[*S]`` to the network's input range with a named :data:`PREPROCESSING` (or a callable
    ``array -> array``), then multiply by the binary ``mask`` if given. Returns float32 ``[*S]``."""
    from monai_gradicon.data.preprocessing import (
        brain_max_normalize,
        lung_ct_normalize,
        unigradicon_ct_normalize,
        unigradicon_mr_normalize,
    )

    x = np.asarray(array, dtype=np.float32)
    if callable(method):
        out = np.asarray(method(x), dtype=np.float32)
    elif method == "lung_ct":
        out = lung_ct_normalize(x)
    elif method == "unigradicon_ct":
        out = unigradicon_ct_normalize(x)
    elif method == "unigradicon_mri":
        out = unigradicon_mr_normalize(x)
    elif method == "brain":
        out = brain_max_normalize(x)
    elif method == "none":
        out = x
    else:
        raise ValueError(f"Unknown preprocessing {method!r}; choose one of {sorted(PREPROCESSING)} or pass a callable.")
    if out.shape != x.shape:
        raise ValueError(f"Preprocessing changed the image shape from {x.shape} to {out.shape}.")
    if mask is not None:
        out = out * mask.astype(np.float32)
    return np.asarray(out, dtype=np.float32)


def _reorient_like(image: Image, reference: Image) -> tuple[Image, np.ndarray | None]:
    """Permute/flip ``image``'s voxel axes to the closest orientation of ``reference`` (3D only, exact).

    Returns the reoriented image and the nibabel orientation transform applied (``None`` if nothing changed)."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    if image.ndim != 3:
        return image, None
    ornt = ornt_transform(io_orientation(image.affine), io_orientation(reference.affine))
    if np.array_equal(ornt[:, 0], np.arange(3)) and np.all(ornt[:, 1] == 1):
        return image, None
    array = np.ascontiguousarray(apply_orientation(image.array, ornt))
    affine = image.affine @ inv_ornt_aff(ornt, image.shape)
    return Image(array=array, affine=affine, path=image.path), ornt


def _undo_orientation(field_cf: np.ndarray, reoriented: Image, original: Image) -> np.ndarray:
    """Bring a channel-first field ``[c, *S]`` on the reoriented grid back to the original grid (vectors unchanged)."""
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    back = ornt_transform(io_orientation(reoriented.affine), io_orientation(original.affine))
    moved = apply_orientation(np.moveaxis(field_cf, 0, -1), back)
    return np.ascontiguousarray(np.moveaxis(moved, -1, 0))


class _IdentityTransform(CoordinateTransform):
    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return points


class _ReversedAxesTransform(CoordinateTransform):
    """A network transform seen in the original (file) axis order when the network saw the arrays with their spatial
    axes reversed: points ``[B, dim, *P]`` in original order have their coordinate channels reversed before the
    network transform is evaluated and its output channels reversed back. Evaluation is pointwise, so the spatial
    layout of ``P`` needs no change."""

    def __init__(self, network_transform: CoordinateTransform) -> None:
        self.network_transform = network_transform

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return self.network_transform(points.flip(1)).flip(1)

    def _reference_tensor(self) -> torch.Tensor:
        return self.network_transform._reference_tensor()


def _reversed_axes(transform: CoordinateTransform | None, reverse: bool) -> CoordinateTransform | None:
    return _ReversedAxesTransform(transform) if reverse and transform is not None else transform


# ----------------------------------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RegistrationResult:
    """Everything :func:`register_pair` computed (see the module docstring for the conventions).

    Attributes:
        fixed, moving: the input images as read (the moving image in its own original orientation).
        network_shape: the shape both images were resized to, in the network's axis order (``input_shape``).
        phi_ab: network transform, fixed -> moving normalized coordinates of the resized images, **in the original
            (file) axis order** (channel k along original array axis k, whatever axis order the network saw; see
            :attr:`grid_network_shape`). It acts on the possibly reoriented moving image; use
            :meth:`fixed_to_moving` for world points.
        phi_ba: moving -> fixed, or ``None`` when the inverse was not computed.
        reference_axis_order: whether the network saw the arrays with their spatial axes reversed (see
            :func:`register_pair`).
        displacement: ``[dim, *S_fixed]`` float32 world RAS mm, fixed -> moving.
        ddf: ``[dim, *S_fixed]`` float32 in fixed voxels.
        jacobian: ``[*S_fixed]`` float32 physical det J of the fixed -> moving map.
        warped_moving: ``[*S_fixed]`` float32.
        inverse_displacement: ``[dim, *S_moving]`` float32 world RAS mm, moving -> fixed, or ``None``.
        folds_percent: percentage of fixed voxels with ``det J <= 0``.
        log_jacobian_std: standard deviation of ``log(det J)`` (det clamped to 1e-9).
        io_history: per IO step, the objective's scalars (empty without IO).
        timings: seconds per stage.
        settings: what was run (JSON-serialisable).
    """

    fixed: Image
    moving: Image
    network_shape: tuple[int, ...]
    phi_ab: CoordinateTransform
    phi_ba: CoordinateTransform | None
    displacement: np.ndarray
    ddf: np.ndarray
    jacobian: np.ndarray
    warped_moving: np.ndarray
    inverse_displacement: np.ndarray | None
    folds_percent: float
    log_jacobian_std: float
    io_history: list[dict[str, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    reference_axis_order: bool = False
    _moving_net: Image | None = None  # the moving image as the network saw it (reoriented), for point mapping
    _device: str = "cpu"

    @property
    def grid_network_shape(self) -> tuple[int, ...]:
        """The network shape in the original axis order (entry k: the size original axis k was resized to); the
        shape ``phi_ab`` / ``phi_ba`` coordinates are normalized to."""
        return tuple(self.network_shape[::-1]) if self.reference_axis_order else tuple(self.network_shape)

    @property
    def _moving_grid(self) -> Grid:
        return Grid.of(self._moving_net if self._moving_net is not None else self.moving)

    def fixed_to_moving(self, points_world: np.ndarray) -> np.ndarray:
        """Map fixed-image world points ``[K, dim]`` (RAS mm) to moving world points with ``Phi_AB``, evaluated at
        the points themselves (no dense-field interpolation)."""
        fixed_grid = Grid.of(self.fixed)
        return map_points(self.phi_ab, points_world, fixed_grid, self._moving_grid, self.grid_network_shape,
                          self._device)

    def moving_to_fixed(self, points_world: np.ndarray) -> np.ndarray:
        """Map moving-image world points ``[K, dim]`` (RAS mm) to fixed world points with ``Phi_BA``."""
        if self.phi_ba is None:
            raise ValueError("The inverse transform was not computed; call register_pair(..., inverse=True).")
        fixed_grid = Grid.of(self.fixed)
        return map_points(self.phi_ba, points_world, self._moving_grid, fixed_grid, self.grid_network_shape,
                          self._device)

    def warp(
        self, image: Image | str | os.PathLike, labels: bool = False, padding_mode: str | None = None
    ) -> np.ndarray:
        """Resample another image defined in the moving image's world space onto the fixed grid.

        ``labels=True``: nearest neighbour, zero outside, the label dtype kept (float maps must hold whole numbers).
        Otherwise linear, border values outside, float32.
        """
        img = as_image(image, "image to warp")
        return _warp_with_field(img, self.displacement, Grid.of(self.fixed), labels, padding_mode)

    def summary(self) -> dict[str, Any]:
        """The contents of ``summary.json``."""
        io = self.io_history
        return {
            "fixed": _image_summary(self.fixed),
            "moving": _image_summary(self.moving),
            "network_shape": list(self.network_shape),
            "settings": self.settings,
            "timings_seconds": {k: round(v, 3) for k, v in self.timings.items()},
            "folds": {
                "percent_voxels_detJ_le_0": self.folds_percent,
                "count": int(np.count_nonzero(self.jacobian <= 0)),
                "grid": "original fixed grid, Phi_AB (fixed -> moving), physical det J",
            },
            "log_jacobian_std": self.log_jacobian_std,
            "jacobian_min": float(self.jacobian.min()),
            "jacobian_max": float(self.jacobian.max()),
            "displacement_mm_max": float(torch.linalg.vector_norm(torch.from_numpy(self.displacement), dim=0).max()),
            "instance_optimization": {
                "steps": len(io),
                "first_loss": io[0]["loss"] if io else None,
                "last_loss": io[-1]["loss"] if io else None,
                "history": io,
            },
            "conventions": {
                "world": "RAS+ mm in memory; NIfTI affines are voxel -> RAS",
                "displacement_mm": DISPLACEMENT_CONVENTION,
                "ddf_voxels": DDF_CONVENTION,
                "inverse_displacement_mm": (
                    "as displacement_mm, on the moving grid, moving point y -> fixed point y + v(y)"
                ),
                "jacobian_determinant": "det J of x -> x + u(x) in physical space on the fixed grid; <= 0 is a fold",
            },
            "software": {"monai_gradicon": _package_version(), "torch": torch.__version__,
                         "python": platform.python_version()},
        }

    def save(
        self,
        output_dir: str | os.PathLike,
        overwrite: bool = False,
        protect: Sequence[str | os.PathLike] = (),
        overview: bool = True,
        started_at: float | None = None,
    ) -> dict[str, str]:
        """Write the results into ``output_dir`` (created if needed); returns ``{key: path}``.

        Refuses (before writing anything) if ``output_dir`` holds one of the input files or any file in ``protect``,
        or if a result file already exists and ``overwrite`` is False. Every file is written atomically; the summary
        comes last. ``started_at`` (a ``time.perf_counter()`` value) adds ``total`` to the timings.
        """
        names = dict(OUTPUT_FILES)
        if self.inverse_displacement is None:
            names.pop("inverse_displacement")
        if not overview:
            names.pop("overview")
        inputs = [p for p in (self.fixed.path, self.moving.path, *protect) if p]
        paths = check_output_paths(output_dir, list(OUTPUT_FILES.values()), inputs, overwrite)
        out = {key: paths[name] for key, name in names.items()}
        for name in set(OUTPUT_FILES.values()) - set(names.values()):  # stale results of an earlier run (overwrite)
            if os.path.isfile(paths[name]):
                os.unlink(paths[name])
        start = time.perf_counter()
        affine = self.fixed.affine
        write_nifti(out["warped"], np.asarray(self.warped_moving, dtype=np.float32), affine)
        write_nifti(out["ddf"], _channels_last(self.ddf), affine)
        write_displacement_field(out["displacement"], self.displacement, affine)
        if "inverse_displacement" in out:
            write_displacement_field(out["inverse_displacement"], self.inverse_displacement, self.moving.affine)
        write_nifti(out["jacobian"], np.asarray(self.jacobian, dtype=np.float32), affine)
        if "overview" in out:
            self._save_overview(out["overview"])
        self.timings["write"] = time.perf_counter() - start
        if started_at is not None:
            self.timings["total"] = time.perf_counter() - started_at
        summary = self.summary()
        summary["outputs"] = {k: os.path.basename(v) for k, v in out.items()}
        text = json.dumps(_jsonable(summary), indent=2, allow_nan=True)
        write_text(out["summary"], text + "\n")
        return out

    def _save_overview(self, path: str) -> None:
        from monai_gradicon.visualize import save_overview_png

        fixed_grid = Grid.of(self.fixed)
        moving_net = self._moving_net if self._moving_net is not None else self.moving
        moving_grid = Grid.of(moving_net)
        # Resizing both images to the network shape matches their bounding boxes: the network starts there. Show the
        # moving image box-aligned, and the deformation the network added on top, in fixed voxels.
        box = physical_displacement(_IdentityTransform(), fixed_grid, moving_grid, self.grid_network_shape)
        moving_box = warp_physical(moving_net.array, moving_grid, box, fixed_grid)
        del box
        deformation = box_relative_ddf(self.displacement, fixed_grid, moving_grid, self.grid_network_shape)
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
        )


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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def _channels_last(field_cf: np.ndarray) -> np.ndarray:
    """``[dim, *S]`` -> ``(X, Y, Z, dim)`` (2D: ``(X, Y, 1, 2)``) float32 for NIfTI."""
    out = np.moveaxis(field_cf.astype(np.float32), 0, -1)
    return out[:, :, None, :] if field_cf.shape[0] == 2 else out


def _physical_jacobian(ddf: np.ndarray) -> np.ndarray:
    """det J in physical space from a DDF in voxels of the (fixed) grid it lives on: ``[*S]`` float32."""
    return jacobian_determinant(torch.from_numpy(ddf)[None])[0].numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# register
# ----------------------------------------------------------------------------------------------------------------


class _EvalMode:
    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def __enter__(self) -> nn.Module:
        self.modes = {name: m.training for name, m in self.network.named_modules()}
        self.network.eval()
        return self.network

    def __exit__(self, *exc: Any) -> None:
        for name, m in self.network.named_modules():
            m.training = self.modes[name]


def register_pair(
    fixed: Image | str | os.PathLike,
    moving: Image | str | os.PathLike,
    network: GradICONNetwork,
    *,
    fixed_mask: Image | str | os.PathLike | None = None,
    moving_mask: Image | str | os.PathLike | None = None,
    preprocess: str | Callable[[np.ndarray], np.ndarray] = "lung_ct",
    input_shape: Sequence[int] | None = None,
    io_iterations: int | None = 0,
    io_lr: float = DEFAULT_IO_LR,
    io_objective: Callable[[nn.Module], GradICONObjective] | None = None,
    io_seed: int = 0,
    inverse: bool = True,
    match_orientation: bool = True,
    reference_axis_order: bool = True,
    device: str | torch.device = "auto",
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    progress: bool = True,
) -> RegistrationResult:
    """Register ``moving`` (A) to ``fixed`` (B) and express the result on the fixed image's original grid.

    Args:
        fixed, moving: paths, :class:`~monai_gradicon.io.Image` objects or MONAI MetaTensors (2D or 3D, same
            dimensionality as the network; any size, spacing and orientation).
        network: a :class:`GradICONNetwork` with its weights loaded. It is moved to ``device``; its weights are not
            changed (IO restores them).
        fixed_mask, moving_mask: optional masks on the images' grids; binarized (> 0) and multiplied into the
            preprocessed intensities (the GradICON lung model expects lung masks).
        preprocess: a :data:`PREPROCESSING` name or a callable on the raw array; it must match the weights.
        input_shape: network shape, in the axis order the network sees (with ``reference_axis_order`` the
            reference's ``(z, y, x)``, e.g. brain ``(130, 155, 130)``); default ``network.input_shape``.
        io_iterations: instance-optimization steps; 0 or ``None`` for a plain forward pass.
        io_lr: IO learning rate (Adam).
        io_objective: factory ``network -> GradICONObjective`` for IO; default LNCC sigma 5, lambda 1.5,
            GradICON-sparse, border padding.
        io_seed: seed of the IO jitter noise (same inputs and seed give the same result).
        inverse: also compute ``Phi_BA`` and its displacement on the moving grid (one more forward pass without IO).
        match_orientation: permute/flip the moving array to the fixed image's axis orientation first (exact).
        reference_axis_order: present both images (and masks) to the network with their spatial axes reversed, i.e.
            in ITK's numpy order ``(k, j, i)`` of the file's voxel indices ``(i, j, k)``, as the GradICON reference
            (``np.array(itk_image)``) and hence the released weights do; original axis ``dim - 1 - a`` is resized to
            ``input_shape[a]``. ``False``: the network sees the file's index order ``(i, j, k)``. All outputs are on
            the original grids either way (``phi_ab`` / ``phi_ba`` of the result are expressed in the original axis
            order).
        device: ``"auto"`` (cuda if available), ``"cpu"``, ``"cuda"``...
        chunk_voxels: voxels per slab in the dense composition.
        progress: show the IO progress bar.

    Raises:
        ValueError: dimensionality mismatch, NaN or constant images, masks off the image grid, a network shape below
            the network's minimum...
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    inputs = _load_inputs(fixed, moving, fixed_mask, moving_mask, network, match_orientation)
    shape = _network_shape(network, input_shape, inputs.fixed.ndim)
    timings["load"] = time.perf_counter() - t_start

    t = time.perf_counter()
    dev = resolve_device(device)
    method = preprocess if isinstance(preprocess, str) else getattr(preprocess, "__name__", "callable")
    reverse = bool(reference_axis_order)
    fixed_t = _network_input(inputs.fixed, inputs.fixed_mask, preprocess, method, shape, "fixed image", reverse)
    moving_t = _network_input(inputs.moving_net, inputs.moving_mask, preprocess, method, shape, "moving image", reverse)
    fixed_t, moving_t = fixed_t.to(dev), moving_t.to(dev)
    # the network shape in the original axis order: what the normalized coordinates of the grids refer to
    grid_shape = tuple(shape[::-1]) if reverse else shape
    network.to(dev)
    timings["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    history: list[dict[str, float]] = []
    if io_iterations:
        objective = io_objective(network) if io_objective is not None else GradICONObjective(network)
        io = instance_optimize(network, moving_t, fixed_t, int(io_iterations), io_lr, objective, io_seed, progress)
        phi_ab, phi_ba, history = io.phi_ab, (io.phi_ba if inverse else None), io.history
        timings["instance_optimization"] = time.perf_counter() - t
    else:
        with torch.no_grad(), _EvalMode(network):
            phi_ab = network(moving_t, fixed_t)
            phi_ba = network(fixed_t, moving_t) if inverse else None
        timings["network"] = time.perf_counter() - t
    # from here on the transforms take and return coordinates in the original axis order
    phi_ab, phi_ba = _reversed_axes(phi_ab, reverse), _reversed_axes(phi_ba, reverse)

    t = time.perf_counter()
    fixed_grid, moving_grid = Grid.of(inputs.fixed), Grid.of(inputs.moving_net)
    displacement = physical_displacement(phi_ab, fixed_grid, moving_grid, grid_shape, dev, chunk_voxels)
    warped = warp_physical(inputs.moving_net.array, moving_grid, displacement, fixed_grid, "bilinear", "border", dev,
                           chunk_voxels)
    inverse_displacement = None
    if phi_ba is not None:
        inverse_displacement = physical_displacement(phi_ba, moving_grid, fixed_grid, grid_shape, dev, chunk_voxels)
        if inputs.reoriented:
            inverse_displacement = _undo_orientation(inverse_displacement, inputs.moving_net, inputs.moving)
    ddf = displacement_to_ddf(displacement, fixed_grid)
    jac = _physical_jacobian(ddf)
    folds = float(np.count_nonzero(jac <= 0)) * 100.0 / jac.size
    log_std = float(log_jacobian_std(torch.from_numpy(ddf)[None])[0])
    timings["compose_and_warp"] = time.perf_counter() - t
    timings["total_before_write"] = time.perf_counter() - t_start

    settings = {
        "preprocess": method,
        "preprocess_description": PREPROCESSING.get(method, "user callable"),
        "fixed_mask": _mask_path(fixed_mask),
        "moving_mask": _mask_path(moving_mask),
        "network": {
            "num_steps": network.num_steps,
            "levels": list(network.levels),
            "input_shape": list(shape),
            "parameters": int(sum(p.numel() for p in network.parameters())),
        },
        "io_iterations": int(io_iterations or 0),
        "io_lr": io_lr if io_iterations else None,
        "io_seed": io_seed if io_iterations else None,
        "moving_reoriented_for_network": inputs.reoriented,
        "reference_axis_order": reverse,
        "network_axis_order": "reversed file axes (k, j, i), ITK numpy order" if reverse else "file axes (i, j, k)",
        "device": str(dev),
    }
    return RegistrationResult(
        fixed=inputs.fixed,
        moving=inputs.moving,
        network_shape=shape,
        phi_ab=phi_ab,
        phi_ba=phi_ba,
        displacement=displacement,
        ddf=ddf,
        jacobian=jac,
        warped_moving=warped,
        inverse_displacement=inverse_displacement,
        folds_percent=folds,
        log_jacobian_std=log_std,
        io_history=history,
        timings=timings,
        settings=settings,
        reference_axis_order=reverse,
        _moving_net=inputs.moving_net,
        _device=str(dev),
    )


@dataclass
class _Inputs:
    """The checked inputs: images as read, the moving image as the network sees it, binary masks (or None)."""

    fixed: Image
    moving: Image
    moving_net: Image
    fixed_mask: np.ndarray | None
    moving_mask: np.ndarray | None
    reoriented: bool


def _load_inputs(fixed: Any, moving: Any, fixed_mask: Any, moving_mask: Any, network: nn.Module,
                 match_orientation: bool) -> _Inputs:
    fixed_img = as_image(fixed, "fixed image")
    moving_img = as_image(moving, "moving image")
    if not isinstance(network, GradICONNetwork):
        raise TypeError(f"network must be a GradICONNetwork, got {type(network).__name__}.")
    if fixed_img.ndim != moving_img.ndim:
        raise ValueError(
            f"The fixed image is {fixed_img.ndim}D (shape {fixed_img.shape}) but the moving image is "
            f"{moving_img.ndim}D (shape {moving_img.shape}); both must be 2D or both 3D."
        )
    if network.spatial_dims != fixed_img.ndim:
        raise ValueError(
            f"The network is {network.spatial_dims}D but the images are {fixed_img.ndim}D (fixed shape "
            f"{fixed_img.shape}); use {fixed_img.ndim}D weights."
        )
    for img, name in ((fixed_img, "fixed image"), (moving_img, "moving image")):
        _check_finite_and_varying(img.array, name)
    fmask = None
    if fixed_mask is not None:
        fmask = _binary_mask(as_image(fixed_mask, "fixed mask"), fixed_img, "fixed mask", "fixed image")
    moving_net, ornt = _reorient_like(moving_img, fixed_img) if match_orientation else (moving_img, None)
    mmask = None
    if moving_mask is not None:
        mmask_img = as_image(moving_mask, "moving mask")
        _check_same_grid(mmask_img, moving_img, "moving mask", "moving image")
        if ornt is not None:
            mmask_img = _reorient_like(mmask_img, fixed_img)[0]
        mmask = _binary_mask(mmask_img, moving_net, "moving mask", "moving image")
    return _Inputs(fixed_img, moving_img, moving_net, fmask, mmask, ornt is not None)


def _network_shape(network: GradICONNetwork, input_shape: Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in (input_shape if input_shape is not None else (network.input_shape or ())))
    if not shape:
        raise ValueError("No network shape: pass input_shape (e.g. (175, 175, 175)) or set network.input_shape.")
    if len(shape) != ndim or min(shape) < network.min_size:
        raise ValueError(
            f"Network shape {shape} does not fit a {network.num_steps}-step {network.spatial_dims}D network (needs "
            f"{network.spatial_dims} sizes >= {network.min_size})."
        )
    return shape


def _network_input(image: Image, mask: np.ndarray | None, preprocess: Any, method: str, shape: tuple[int, ...],
                   name: str, reverse_axes: bool = False) -> torch.Tensor:
    """Preprocess and resize one image: ``[1, 1, *shape]`` float32. ``reverse_axes``: transpose the spatial axes
    (file order ``(i, j, k)`` -> ``(k, j, i)``) before the resize, so network axis a holds original axis dim-1-a."""
    array = preprocess_intensities(image.array, preprocess, mask)
    if not np.isfinite(array).all() or array.min() == array.max():
        raise ValueError(
            f"After preprocessing {method!r} the {name} is constant or not finite (e.g. a CT window applied to an MR "
            "image, or an empty mask region); check --modality / --preprocess."
        )
    if reverse_axes:
        array = np.ascontiguousarray(np.transpose(array))
    return resize_to_network(array, shape)


def _mask_path(mask: Any) -> str | None:
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        return os.path.abspath(os.fspath(mask))
    return getattr(mask, "path", None) or "in-memory mask"


# ----------------------------------------------------------------------------------------------------------------
# networks and weights
# ----------------------------------------------------------------------------------------------------------------


def default_weights_path(modality: str) -> Path:
    """``bundles/<bundle>/models/model.pt`` for a modality (see :data:`MODALITIES`); it may not exist yet."""
    if modality not in MODALITIES:
        raise ValueError(f"Unknown modality {modality!r}; choose one of {sorted(MODALITIES)}.")
    return BUNDLES_DIR / MODALITIES[modality].bundle / "models" / "model.pt"


def bundle_input_shape(modality: str) -> tuple[int, ...] | None:
    """The network shape a bundle declares in ``configs/metadata.json``
    (``network_data_format.inputs.*.spatial_shape``), or ``None``."""
    meta = BUNDLES_DIR / MODALITIES[modality].bundle / "configs" / "metadata.json"
    try:
        inputs = json.loads(meta.read_text())["network_data_format"]["inputs"]
        for spec in inputs.values():
            shape = spec.get("spatial_shape")
            if isinstance(shape, list) and len(shape) in (2, 3) and all(isinstance(s, int) for s in shape):
                return tuple(shape)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for prefix in ("regis_net.", "module.", "network."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def network_from_weights(path: str | os.PathLike, input_shape: Sequence[int] | None = None) -> GradICONNetwork:
    """Build the network a weight file describes and load it strictly.

    Accepts a released GradICON / uniGradICON file (recognised by its keys) or one of our checkpoints
    (``steps.{i}.unet.*``, optionally under ``network.``). The number of steps, 2D/3D, the channels per image and the
    UNet widths are read from the tensors.
    """
    state = read_state_dict(path)
    stripped = _strip_prefixes(state)
    if is_official_state(stripped):
        return network_from_official_weights(stripped, input_shape=input_shape)
    steps = sorted({int(k.split(".")[1]) for k in stripped if k.startswith("steps.") and k.split(".")[1].isdigit()})
    if not steps or steps != list(range(len(steps))) or len(steps) not in STEP_LEVELS:
        raise WeightFileError(
            f"{path} is neither a released GradICON weight file nor a monai_gradicon checkpoint with 1-4 steps "
            f"(keys steps.<i>.unet.*); first keys: {sorted(stripped)[:5]}"
        )
    try:
        first = stripped["steps.0.unet.downConvs.0.weight"]
        n_levels = len({k.split(".")[4] for k in stripped if k.startswith("steps.0.unet.downConvs.")})
        down = [int(stripped[f"steps.0.unet.downConvs.{d}.weight"].shape[0]) for d in range(n_levels)]
        up = [int(stripped[f"steps.0.unet.upConvs.{d}.weight"].shape[1]) for d in range(n_levels)]
    except KeyError as exc:
        raise WeightFileError(f"{path} lacks UNet tensor {exc} of a monai_gradicon checkpoint.") from exc
    spatial_dims, in_channels = first.ndim - 2, int(first.shape[1]) // 2
    network = gradicon_network(len(steps), spatial_dims, input_shape, in_channels)
    if tuple(down) != DOWN_CHANNELS or tuple(up) != UP_CHANNELS:  # a slimmer UNet2 (e.g. for tests and demos)
        for step in network.steps:
            step.unet = UNet2(spatial_dims, in_channels, down_channels=down, up_channels=up)
    return load_network_weights(network, stripped)


# ----------------------------------------------------------------------------------------------------------------
# output folders, saved transforms
# ----------------------------------------------------------------------------------------------------------------


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_output_paths(
    output_dir: str | os.PathLike,
    names: Sequence[str],
    inputs: Sequence[str | os.PathLike],
    overwrite: bool,
    create: bool = True,
) -> dict[str, str]:
    """Validate an output folder before anything is written; returns ``{name: path}``.

    ``create``: make the folder (otherwise only check, e.g. before a long computation).

    Raises:
        FileExistsError / NotADirectoryError / ValueError: the folder is a file, would hold or overwrite an input,
            or already has result files and ``overwrite`` is False.
    """
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"The output directory {output_dir} exists and is not a directory.")
    for p in inputs:
        p = os.fspath(p)
        if os.path.exists(p) and _inside(p, output_dir):
            raise ValueError(
                f"The output directory {output_dir} contains the input file {p}; choose a new directory so nothing "
                "you have can be overwritten."
            )
    paths = {name: os.path.join(output_dir, name) for name in names}
    existing = [p for p in paths.values() if os.path.lexists(p)]
    if existing and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds results ({', '.join(os.path.basename(p) for p in existing)}); pass "
            "--overwrite (overwrite=True) to replace them or choose another directory."
        )
    if create:
        os.makedirs(output_dir, exist_ok=True)
    return paths


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


def _warp_with_field(
    image: Image, displacement: np.ndarray, target: Grid, labels: bool, padding_mode: str | None
) -> np.ndarray:
    if image.ndim != target.ndim:
        raise ValueError(f"The image to warp is {image.ndim}D but the transform is {target.ndim}D.")
    if labels:
        image = read_label_image(image, "label map")
        out = warp_physical(image.array, Grid.of(image), displacement, target, "nearest", padding_mode or "zeros")
        return out.astype(image.array.dtype)
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        raise ValueError(f"The image to warp {image.path or ''} contains NaN or infinite voxels.")
    return warp_physical(image.array, Grid.of(image), displacement, target, "bilinear", padding_mode or "border")


def _load_saved(transform_dir: str | os.PathLike) -> tuple[np.ndarray, Grid, np.ndarray]:
    """(displacement RAS [dim, *S], fixed grid, 4x4 fixed affine) of a folder written by ``save``."""
    path = os.path.join(os.fspath(transform_dir), OUTPUT_FILES["displacement"])
    if not os.path.isdir(os.fspath(transform_dir)):
        raise FileNotFoundError(f"The transform directory does not exist: {transform_dir}")
    u, affine = read_displacement_field(path, "displacement field")
    dim = u.shape[0]
    return u, Grid(tuple(u.shape[1:]), spatial_affine(affine, dim)), affine


def apply_saved_transform(
    transform_dir: str | os.PathLike,
    image: Image | str | os.PathLike,
    labels: bool = False,
    padding_mode: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp an image (in the moving image's world space, any grid) onto the fixed grid with a saved result.

    Returns ``(array on the fixed grid, 4 x 4 fixed affine)``. Labels: nearest neighbour, zero outside, dtype kept.
    """
    u, grid, affine = _load_saved(transform_dir)
    img = read_label_image(image, "label map") if labels else as_image(image, "image to warp")
    return _warp_with_field(img, u, grid, labels, padding_mode), affine


def _landmarks_world(points: np.ndarray, frame: str, affine: np.ndarray, index_base: int, name: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if frame == "voxel":
        return (pts - index_base) @ affine[:3, :3].T + affine[:3, 3]
    if frame == "ras":
        return pts
    if frame == "lps":
        return pts * np.array([-1.0, -1.0, 1.0])
    raise ValueError(f"landmarks_in must be 'voxel', 'ras' or 'lps' (world mm), got {frame!r} for the {name}.")


def _check_landmarks_inside(world: np.ndarray, grid: Grid, name: str) -> np.ndarray:
    idx = grid.world_to_index(world)
    upper = np.array(grid.shape, dtype=np.float64) - 1
    outside = np.nonzero(((idx < -1e-3) | (idx > upper + 1e-3)).any(axis=1))[0]
    if outside.size:
        k = int(outside[0])
        raise ValueError(
            f"{outside.size} of the {name} lie outside the image (grid {grid.shape}); the first is landmark {k} at "
            f"voxel {np.round(idx[k], 2).tolist()} (world RAS {np.round(world[k], 2).tolist()} mm). Check the "
            "landmark frame (--landmarks_in voxel/ras/lps, --index_base)."
        )
    return idx


def _tre(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    err = np.linalg.norm(pred - truth, axis=1)
    return {
        "mean_mm": float(err.mean()),
        "std_mm": float(err.std()),
        "median_mm": float(np.median(err)),
        "max_mm": float(err.max()),
        "per_landmark_mm": [round(float(e), 4) for e in err],
    }


def evaluate_saved(
    transform_dir: str | os.PathLike,
    fixed_landmarks: str | os.PathLike | np.ndarray | None = None,
    moving_landmarks: str | os.PathLike | np.ndarray | None = None,
    landmarks_in: str | None = None,
    index_base: int = 0,
    fixed_labels: str | os.PathLike | Image | None = None,
    moving_labels: str | os.PathLike | Image | None = None,
) -> dict[str, Any]:
    """Metrics of a saved registration (a folder written by :meth:`RegistrationResult.save`).

    Args:
        fixed_landmarks, moving_landmarks: corresponding points (files read by
            :func:`monai_gradicon.data.read_landmarks`, or ``[K, 3]`` arrays).
        landmarks_in: **required with landmarks**: ``"voxel"`` (indices in each image's own array order, ``index_base``
            0 or 1), ``"ras"`` or ``"lps"`` (world mm).
        fixed_labels, moving_labels: label maps on the fixed / moving grids; the moving one is warped with nearest
            neighbour and compared with the fixed one (Dice per label).

    Returns:
        dict with ``folds_percent`` and ``log_jacobian_std`` (always), ``tre_fixed_to_moving`` (``Phi_AB`` applied to
        the fixed landmarks vs the moving ones), ``tre_moving_to_fixed`` (needs the inverse field),
        ``tre_before_mm`` (distance of the landmark pairs in world coordinates, no registration), ``dice``.
    """
    from monai_gradicon.data.landmarks import read_landmarks

    transform_dir = os.fspath(transform_dir)
    u, fixed_grid, fixed_affine = _load_saved(transform_dir)
    ddf = torch.from_numpy(displacement_to_ddf(u, fixed_grid))[None]
    result: dict[str, Any] = {
        "transform_dir": os.path.abspath(transform_dir),
        "folds_percent": float(folding_percentage(ddf)[0]),
        "log_jacobian_std": float(log_jacobian_std(ddf)[0]),
    }
    inverse_path = os.path.join(transform_dir, OUTPUT_FILES["inverse_displacement"])
    inverse = None
    if os.path.isfile(inverse_path):
        inverse = read_displacement_field(inverse_path, "inverse displacement field")
    moving_affine = inverse[1] if inverse is not None else _moving_affine_from_summary(transform_dir)

    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ValueError("Give both fixed and moving landmarks (corresponding points), or neither.")
    if fixed_landmarks is not None:
        if landmarks_in is None:
            raise ValueError("State the landmark frame explicitly: landmarks_in='voxel', 'ras' or 'lps'.")
        if index_base not in (0, 1):
            raise ValueError(f"index_base must be 0 or 1, got {index_base}.")
        fixed_pts = fixed_landmarks if isinstance(fixed_landmarks, np.ndarray) else read_landmarks(fixed_landmarks)
        moving_pts = moving_landmarks if isinstance(moving_landmarks, np.ndarray) else read_landmarks(moving_landmarks)
        if fixed_pts.shape != moving_pts.shape:
            raise ValueError(
                f"{len(fixed_pts)} fixed but {len(moving_pts)} moving landmarks; they must correspond one to one."
            )
        if landmarks_in == "voxel" and moving_affine is None:
            raise ValueError(
                "Voxel landmarks of the moving image need its geometry: the inverse field or summary.json is missing."
            )
        fixed_w = _landmarks_world(fixed_pts, landmarks_in, fixed_affine, index_base, "fixed landmarks")
        m_aff = moving_affine if moving_affine is not None else np.eye(4)
        moving_w = _landmarks_world(moving_pts, landmarks_in, m_aff, index_base, "moving landmarks")
        result["landmarks"] = {"count": int(len(fixed_w)), "frame": landmarks_in, "index_base": index_base}
        result["tre_before_mm"] = _tre(fixed_w, moving_w)
        idx = _check_landmarks_inside(fixed_w, fixed_grid, "fixed landmarks")
        disp = sample_ddf_at_points(torch.from_numpy(u)[None], torch.from_numpy(idx)).numpy()[0]
        result["tre_fixed_to_moving"] = _tre(fixed_w + disp, moving_w)
        if inverse is not None:
            v, m_aff = inverse
            m_grid = Grid(tuple(v.shape[1:]), spatial_affine(m_aff, v.shape[0]))
            idx_m = _check_landmarks_inside(moving_w, m_grid, "moving landmarks")
            disp_m = sample_ddf_at_points(torch.from_numpy(v)[None], torch.from_numpy(idx_m)).numpy()[0]
            result["tre_moving_to_fixed"] = _tre(moving_w + disp_m, fixed_w)
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("Give both fixed and moving label maps, or neither.")
    if fixed_labels is not None:
        f_lab = read_label_image(fixed_labels, "fixed label map")
        same_affine = np.allclose(spatial_affine(f_lab.affine, f_lab.ndim), fixed_grid.affine, atol=1e-3)
        if f_lab.shape != fixed_grid.shape or not same_affine:
            raise ValueError(
                f"The fixed label map (shape {f_lab.shape}) is not on the fixed image's grid {fixed_grid.shape}."
            )
        m_lab = read_label_image(moving_labels, "moving label map")
        warped = _warp_with_field(m_lab, u, fixed_grid, True, None)
        dice = dice_per_label(torch.from_numpy(warped.astype(np.int64)), torch.from_numpy(f_lab.array.astype(np.int64)))
        result["dice"] = {str(k): v for k, v in dice.items()}
    return result


def _moving_affine_from_summary(transform_dir: str) -> np.ndarray | None:
    try:
        summary = json.loads(Path(transform_dir, OUTPUT_FILES["summary"]).read_text())
        return np.asarray(summary["moving"]["affine_ras"], dtype=np.float64)
    except (OSError, ValueError, KeyError):
        return None
