"""The one registration pipeline: two images (any grids) -> transforms on their original grids.

Every door -- the command line, the bundles' inference and evaluation, the MONAI Label task and the Python API --
runs these stages and nothing else, so they give the same field for the same pair and weights:

1. :func:`read_pair` -- read and check both images and optional masks (NaN, constant, 2D vs 3D, masks on their
   image's grid);
2. :func:`prepare_pair` -- orientation (``"physical"``: the moving array is permuted/flipped, exactly, to the fixed
   image's orientation; ``"index"``: arrays paired by index as stored, the reference's behaviour), intensity
   preprocessing (:data:`monai_gradicon.data.preprocessing.PREPROCESSING`, masks binarised and multiplied in),
   resize to the network shape (trilinear, ``align_corners=False``, as the reference). Tensors stay in the
   **file's voxel axis order**; the network's own axis order is applied at the network boundary
   (:meth:`~monai_gradicon.GradICONNetwork.register_file_order`, :func:`~monai_gradicon.networks.to_network_axes`);
3. :func:`run_network` -- one forward pass per direction, or instance optimization; the transforms come back in
   the file's axis order, either exactly as composed (``transform_scheme="exact"``) or as the composed map sampled
   on the network grid and interpolated between its nodes (``"grid"``, the reference's ITK displacement-field
   transform; the default);
4. :func:`to_original_grids` -- the transform evaluated at every voxel of the original fixed grid in physical
   space (:mod:`monai_gradicon.resample`): world-mm field, MONAI voxel DDF, det J, the original moving image warped;
   the inverse on the original moving grid. A non-finite result is an error, never an output.

:func:`register` runs all four and returns a :class:`~monai_gradicon.pipeline.result.RegistrationResult`.
What the network needs (axis order, shape, preprocessing) comes from its model card
(:mod:`monai_gradicon.model_card`) through :func:`resolve_settings`; explicit settings that contradict it are an
error, and nothing is guessed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_gradicon.coordinate_transforms import CoordinateTransform, DisplacementTransform
from monai_gradicon.data.preprocessing import PREPROCESSING, preprocess
from monai_gradicon.errors import NonFiniteResultError
from monai_gradicon.field_optimization import DEFAULT_IO_LR as FIELD_IO_LR
from monai_gradicon.field_optimization import FieldOptions, check_field_options, optimize_fields
from monai_gradicon.instance_optimization import DEFAULT_IO_LR, instance_optimize
from monai_gradicon.io import Image, as_image
from monai_gradicon.losses.objective import GradICONObjective
from monai_gradicon.maps import identity_map
from monai_gradicon.metrics import log_determinant_std
from monai_gradicon.model_card import CardError, ModelCard
from monai_gradicon.networks.registration import (
    GradICONNetwork,
    file_order_transform,
    map_to_file_order,
    to_network_axes,
)
from monai_gradicon.resample import (
    DEFAULT_CHUNK_VOXELS,
    Grid,
    displacement_to_ddf,
    physical_displacement,
    physical_jacobian_determinant,
    resize_to_network,
    warp_physical,
)

__all__ = [
    "ORIENTATIONS",
    "TRANSFORM_SCHEMES",
    "NonFiniteResultError",
    "RegistrationSettings",
    "resolve_settings",
    "resolve_device",
    "predict_peak_memory_gb",
    "PairInputs",
    "PreparedPair",
    "NetworkTransforms",
    "OriginalGridFields",
    "read_pair",
    "complete_masks",
    "prepare_pair",
    "prealign_pair",
    "apply_prealignment",
    "PREALIGNMENTS",
    "METHODS",
    "IO_METHODS",
    "orient_pair",
    "prepared_from_network_input",
    "run_network",
    "optimize_pair",
    "stage_name",
    "default_optimize_shape",
    "transform_from_ddf",
    "to_original_grids",
]

PREALIGNMENTS = {"none": (), "rigid": ("rigid",), "affine": ("rigid", "affine")}
"""Affine pre-alignment choices -> the stages of :func:`monai_gradicon.affine.register_affine`."""

METHODS = ("network", "optimize")
"""How stage 3 finds the deformable transforms. ``network``: a GradICON network with weights (optionally followed by
instance optimization). ``optimize``: no network; the two transforms are optimized directly on the working grid
(:func:`monai_gradicon.field_optimization.optimize_fields`: GradICON's objective over displacement fields, coarse to
fine)."""

IO_METHODS = ("weights", "fields")
"""What instance optimization after a network changes. ``weights``: the paper's (Adam on all network weights, the
network restored afterwards). ``fields``: the network's two transforms are the start of
:func:`~monai_gradicon.field_optimization.optimize_fields` (the weights untouched; ~15x less time per step on CPU,
``bench/FIELD_OPTIMIZATION.md``)."""

ORIENTATIONS = ("physical", "index")
"""``physical``: the moving array is reoriented (exact permutation/flip) to the fixed image's axis orientation
before the network sees it, so two files of one anatomy stored with different direction matrices register as the
anatomy says. ``index``: arrays are paired by voxel index as stored (the reference's behaviour): a moving image
stored flipped registers as a flipped anatomy."""

TRANSFORM_SCHEMES = ("grid", "exact")
"""How the network's transform is evaluated at the original grids' voxels. ``grid`` (default, the reference's): the
composed map is sampled once on the network grid and interpolated trilinearly between its nodes (what the authors'
ITK displacement-field transform does). ``exact``: the composition of the steps is evaluated at each point itself.
The two agree at the network grid's nodes; between them they differ by the curvature of the map over one network
voxel (measured on lung CT pairs: ~0.06 mm mean, ~1 mm max)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; anything else is checked and passed to :class:`torch.device`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available here; use --device cpu or auto.")
    return dev


# ----------------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistrationSettings:
    """What one registration runs with (JSON-able through :meth:`to_dict`).

    Attributes:
        preprocessing: a :data:`~monai_gradicon.data.preprocessing.PREPROCESSING` name.
        input_shape: network shape in the network's axis order.
        axis_order: the network's axis order (``"reference"`` or ``"file"``, see :mod:`monai_gradicon.model_card`).
        orientation: :data:`ORIENTATIONS`.
        transform_scheme: :data:`TRANSFORM_SCHEMES`.
        inverse: also compute ``Phi_BA`` on the original moving grid.
        io_iterations: instance-optimization steps (0: one forward pass).
        io_lr, io_seed: IO learning rate and jitter seed.
        auto_masks: with the ``lung_ct`` preprocessing, compute a lung mask (:func:`monai_gradicon.lung_mask.lung_mask`)
            for an image given without one: the lung model was trained on lung-masked CT. Ignored otherwise.
        prealign: :data:`PREALIGNMENTS`: ``"none"``, or an affine pre-alignment (:func:`monai_gradicon.affine.register_affine`
            with the stages ``("rigid",)`` or ``("rigid", "affine")``) before the network; the deformable transform is
            composed with it exactly in every output.
        prealign_similarity: ``"mi"`` (any modality, default) or ``"lncc"`` for the pre-alignment.
        method: :data:`METHODS`; ``"optimize"`` needs no network (``axis_order`` is then ``"file"`` and
            ``input_shape`` the working grid of the optimization).
        io_method: :data:`IO_METHODS` (used when ``io_iterations`` > 0 with the network method): ``"fields"`` runs
            :func:`~monai_gradicon.field_optimization.optimize_fields` from the network's transforms with
            ``io_iterations`` steps per level at learning rate ``io_lr`` (voxels per step).
        opt_lambda, opt_levels, opt_iterations, opt_lr, opt_similarity: the field optimization's GradICON weight,
            pyramid levels, Adam steps per level (coarse to fine), learning rate (voxels of the level per step) and
            similarity (:data:`~monai_gradicon.field_optimization.SIMILARITIES`), for ``method="optimize"`` (and
            lambda, levels and similarity for ``io_method="fields"``); ``None``: the measured defaults of
            :mod:`monai_gradicon.field_optimization`.
    """

    preprocessing: str
    input_shape: tuple[int, ...]
    axis_order: str
    orientation: str = "physical"
    transform_scheme: str = "grid"
    inverse: bool = True
    io_iterations: int = 0
    io_lr: float = DEFAULT_IO_LR
    io_seed: int = 0
    auto_masks: bool = True
    prealign: str = "none"
    prealign_similarity: str = "mi"
    method: str = "network"
    io_method: str = "weights"
    opt_lambda: float | None = None
    opt_levels: int | None = None
    opt_iterations: int | tuple[int, ...] | None = None
    opt_lr: float | None = None
    opt_similarity: str = "lncc"

    def __post_init__(self) -> None:
        if self.preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {sorted(PREPROCESSING)}, got {self.preprocessing!r}.")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {self.orientation!r}.")
        if self.transform_scheme not in TRANSFORM_SCHEMES:
            raise ValueError(f"transform_scheme must be one of {TRANSFORM_SCHEMES}, got {self.transform_scheme!r}.")
        if not isinstance(self.inverse, bool):
            raise ValueError(f"inverse must be True or False, got {self.inverse!r}.")
        if isinstance(self.io_iterations, bool) or not isinstance(self.io_iterations, int) or self.io_iterations < 0:
            raise ValueError(f"io_iterations must be a whole number >= 0, got {self.io_iterations!r}.")
        if isinstance(self.io_lr, bool) or not isinstance(self.io_lr, (int, float)) or not self.io_lr > 0:
            raise ValueError(f"io_lr must be a positive number, got {self.io_lr!r}.")
        if isinstance(self.io_seed, bool) or not isinstance(self.io_seed, int):
            raise ValueError(f"io_seed must be a whole number, got {self.io_seed!r}.")
        if not isinstance(self.auto_masks, bool):
            raise ValueError(f"auto_masks must be True or False, got {self.auto_masks!r}.")
        if self.prealign not in PREALIGNMENTS:
            raise ValueError(f"prealign must be one of {tuple(PREALIGNMENTS)}, got {self.prealign!r}.")
        if self.prealign_similarity not in ("mi", "lncc"):
            raise ValueError(f"prealign_similarity must be 'mi' or 'lncc', got {self.prealign_similarity!r}.")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
        if self.io_method not in IO_METHODS:
            raise ValueError(f"io_method must be one of {IO_METHODS}, got {self.io_method!r}.")
        if self.method == "optimize" and self.io_iterations:
            raise ValueError("io_iterations is instance optimization after a network; method 'optimize' has no "
                             "network: set its steps with opt_iterations instead.")
        if self.method == "optimize" and self.axis_order != "file":
            raise ValueError(f"method 'optimize' works in the file's axis order, got axis_order {self.axis_order!r}.")
        self.field_options()  # every optimization option checked now, before any work

    def field_options(self) -> FieldOptions | None:
        """The checked :class:`~monai_gradicon.field_optimization.FieldOptions` of the field optimization this run
        does (``method="optimize"``, or field-level IO), defaults filled in; None when it does none."""
        optimize = self.method == "optimize"
        if not (optimize or (self.io_method == "fields" and self.io_iterations)):
            return None
        # the settings' names for optimize_fields' arguments, so that an error names what the user set
        names = {"lmbda": "opt_lambda", "levels": "opt_levels", "similarity": "opt_similarity",
                 "iterations": "opt_iterations" if optimize else "io_iterations", "lr": "opt_lr" if optimize else "io_lr"}
        iterations = self.opt_iterations if optimize else self.io_iterations
        try:
            return check_field_options(self.file_order_shape, from_init=not optimize, similarity=self.opt_similarity,
                                       lmbda=self.opt_lambda, levels=self.opt_levels,
                                       iterations=list(iterations) if isinstance(iterations, tuple) else iterations,
                                       lr=self.opt_lr if optimize else self.io_lr)
        except ValueError as exc:
            message = str(exc)
            for internal, setting in names.items():
                if message.startswith(internal + " "):
                    message = setting + message[len(internal):]
                    break
            raise ValueError(message) from exc

    @property
    def makes_masks(self) -> bool:
        """Whether missing masks are computed (:attr:`auto_masks` with the ``lung_ct`` preprocessing)."""
        return self.auto_masks and self.preprocessing == "lung_ct"

    @property
    def file_order_shape(self) -> tuple[int, ...]:
        """The network shape in the file's voxel axis order (entry ``k``: the size original axis ``k`` is resized
        to); the grid the pipeline's normalized coordinates refer to."""
        return tuple(self.input_shape[::-1]) if self.axis_order == "reference" else tuple(self.input_shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preprocessing": self.preprocessing,
            "preprocessing_description": PREPROCESSING[self.preprocessing].description,
            "input_shape": list(self.input_shape),
            "axis_order": self.axis_order,
            "orientation": self.orientation,
            "transform_scheme": self.transform_scheme,
            "inverse": self.inverse,
            "io_iterations": self.io_iterations,
            "io_lr": self.io_lr if self.io_iterations else None,
            "io_seed": self.io_seed if self.io_iterations else None,
            "auto_masks": self.makes_masks,
            "prealign": self.prealign,
            "prealign_similarity": self.prealign_similarity if self.prealign != "none" else None,
            "method": self.method,
            "io_method": self.io_method if self.io_iterations else None,
            "field_optimization": self._field_dict(),
        }

    def _field_dict(self) -> dict[str, Any] | None:
        options = self.field_options()
        if options is None:
            return None
        return {"lambda": options.lmbda, "similarity": self.opt_similarity, "levels": options.levels,
                "iterations": list(options.iterations), "lr": options.lr, "field_spacing": list(options.field_spacing)}


OPTIMIZE_MAX_SIZE = 175
"""Largest working-grid size per axis :func:`default_optimize_shape` picks for ``method="optimize"`` (the size the
field optimization's defaults were measured at, ``bench/FIELD_OPTIMIZATION.md``)."""


def default_optimize_shape(fixed_shape: Sequence[int], max_size: int = OPTIMIZE_MAX_SIZE) -> tuple[int, ...]:
    """The working grid of ``method="optimize"`` for a fixed image of ``fixed_shape`` (voxels, file axis order):
    the image's own size, each axis capped at ``max_size`` voxels."""
    return tuple(min(int(n), int(max_size)) for n in fixed_shape)


def resolve_settings(
    card: ModelCard | None,
    *,
    preprocessing: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    axis_order: str | None = None,
    orientation: str = "physical",
    transform_scheme: str = "grid",
    inverse: bool = True,
    io_iterations: int = 0,
    io_lr: float | None = None,
    io_seed: int = 0,
    auto_masks: bool = True,
    prealign: str = "none",
    prealign_similarity: str = "mi",
    method: str = "network",
    io_method: str = "weights",
    opt_lambda: float | None = None,
    opt_levels: int | None = None,
    opt_iterations: Sequence[int] | int | None = None,
    opt_lr: float | None = None,
    opt_similarity: str = "lncc",
    source: str = "the weights",
) -> RegistrationSettings:
    """Settings from a model card plus the caller's explicit choices.

    With a network (``method="network"``) the card decides ``preprocessing``, ``input_shape`` and ``axis_order``; an
    explicit value (not ``None``) that contradicts it raises :class:`~monai_gradicon.model_card.CardError`, and one
    the card leaves unknown must be given (also an error otherwise: nothing is guessed). ``method="optimize"`` has
    no weights: ``card`` must be None, ``preprocessing`` and ``input_shape`` (the working grid, file axis order,
    e.g. from :func:`default_optimize_shape`) are required and the axis order is the file's. ``io_lr`` None: the
    default of ``io_method`` (2e-5 for network weights, 0.05 voxels per step for fields).
    """
    if method == "optimize":
        if card is not None:
            raise ValueError("method 'optimize' uses no network: do not pass weights (a model card) with it.")
        if axis_order not in (None, "file"):
            raise ValueError(f"method 'optimize' works in the file's axis order, got axis_order {axis_order!r}.")
        missing = [what for what, value in (("preprocessing (e.g. unigradicon_ct, lung_ct, unigradicon_mri)",
                                             preprocessing), ("input_shape (the working grid)", input_shape))
                   if value is None]
        if missing:
            raise ValueError(f"method 'optimize' needs the {' and the '.join(missing)}.")
        pre, shape, order = preprocessing, tuple(input_shape), "file"
    else:
        if card is None:
            raise ValueError(f"method {method!r} needs a network's model card (or use method 'optimize').")
        card.check_agrees({"preprocessing": preprocessing, "input_shape": input_shape, "axis_order": axis_order},
                          source)
        pre = card.preprocessing if card.preprocessing is not None else preprocessing
        shape = card.input_shape if card.input_shape is not None else (tuple(input_shape) if input_shape else None)
        order = card.axis_order
        missing = []
        if pre is None:
            missing.append(f"the intensity preprocessing (--preprocess: one of {sorted(PREPROCESSING)})")
        if shape is None:
            missing.append("the network input shape (--input_shape, e.g. 175,175,175)")
        if missing:
            raise CardError(
                f"The model card of {source} ({card.name or 'no name'}) does not say {' or '.join(missing)}; state "
                "it explicitly, as the weights were trained."
            )
    if io_lr is None:
        io_lr = FIELD_IO_LR if io_method == "fields" else DEFAULT_IO_LR
    if isinstance(opt_iterations, list):
        opt_iterations = tuple(opt_iterations)
    return RegistrationSettings(
        preprocessing=pre,
        input_shape=tuple(int(s) for s in shape),
        axis_order=order,
        orientation=orientation,
        transform_scheme=transform_scheme,
        inverse=inverse,
        io_iterations=io_iterations,
        io_lr=io_lr,
        io_seed=io_seed,
        auto_masks=auto_masks,
        prealign=prealign,
        prealign_similarity=prealign_similarity,
        method=method,
        io_method=io_method,
        opt_lambda=opt_lambda,
        opt_levels=opt_levels,
        opt_iterations=opt_iterations,
        opt_lr=opt_lr,
        opt_similarity=opt_similarity,
    )


def predict_peak_memory_gb(fixed_shape: tuple[int, ...], moving_shape: tuple[int, ...],
                           settings: RegistrationSettings) -> float:
    """A conservative estimate of the peak memory (GiB, CPU) of one registration, from the image sizes alone.

    Network: ~0.7 GiB (runtime and 70.7 M weights) plus 0.21 GiB per million network voxels for a forward pass, 0.66
    with instance optimization (175³ peaks measured on CPU in ``bench/RESULTS.md``: 1.77 / 5.58 GiB). Original
    grids: ~80 bytes per fixed voxel (input copies, world field, voxel DDF, det J and its derivatives, warped image,
    file writing) and ~30 per moving voxel with the inverse (12 without), fitted to the peaks issue 13 and 17
    measured: a 512x512x400 pair 13.4 GB (predicted 12.7 GiB = 13.6 GB), the 512x512x48 / 61 lung pair 2.95 GB
    (predicted 3.2 GiB).
    """
    net_mvox = math.prod(settings.input_shape) / 1e6
    network = 0.7 + (0.66 if settings.io_iterations else 0.21) * net_mvox
    grids = 80.0 * math.prod(fixed_shape) + (30.0 if settings.inverse else 12.0) * math.prod(moving_shape)
    return network + grids / 2**30


# ----------------------------------------------------------------------------------------------------------------
# 1. read
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PairInputs:
    """Both images as read, checked; masks as boolean arrays on their image's grid (or None)."""

    fixed: Image
    moving: Image
    fixed_mask: np.ndarray | None = None
    moving_mask: np.ndarray | None = None
    fixed_mask_source: str | None = None
    moving_mask_source: str | None = None
    automatic_masks: dict[str, Any] = field(default_factory=dict)
    """``{"fixed" / "moving": LungMaskResult}`` for masks :func:`complete_masks` computed."""


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


def _source(obj: Any) -> str | None:
    if obj is None:
        return None
    if isinstance(obj, Image):
        return obj.path or "in-memory image"
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        import os

        return os.path.abspath(os.fspath(obj))
    return "in-memory image"


def read_pair(fixed: Any, moving: Any, fixed_mask: Any = None, moving_mask: Any = None) -> PairInputs:
    """Read (paths), or take (:class:`~monai_gradicon.io.Image`, MONAI ``MetaTensor``), both images and masks and
    check them: finite, not constant, both 2D or both 3D, masks on their image's grid and not empty."""
    fixed_img = as_image(fixed, "fixed image")
    moving_img = as_image(moving, "moving image")
    if fixed_img.ndim != moving_img.ndim:
        raise ValueError(
            f"The fixed image is {fixed_img.ndim}D (shape {fixed_img.shape}) but the moving image is "
            f"{moving_img.ndim}D (shape {moving_img.shape}); both must be 2D or both 3D."
        )
    for img, name in ((fixed_img, "fixed image"), (moving_img, "moving image")):
        _check_finite_and_varying(img.array, name)
    fmask = mmask = None
    if fixed_mask is not None:
        fmask = _binary_mask(as_image(fixed_mask, "fixed mask"), fixed_img, "fixed mask", "fixed image")
    if moving_mask is not None:
        mmask = _binary_mask(as_image(moving_mask, "moving mask"), moving_img, "moving mask", "moving image")
    return PairInputs(fixed_img, moving_img, fmask, mmask, _source(fixed_mask), _source(moving_mask))


def complete_masks(inputs: PairInputs, settings: RegistrationSettings) -> PairInputs:
    """Give every image without a mask an automatic lung mask when the settings ask for it
    (:attr:`RegistrationSettings.makes_masks`); the masks and their details are kept in ``inputs`` (and written next
    to the results). A CT in which no lung can be found is an error naming the image
    (:class:`monai_gradicon.lung_mask.LungMaskError`)."""
    if not settings.makes_masks:
        return inputs
    from monai_gradicon.lung_mask import lung_mask

    if inputs.fixed_mask is None:
        result = lung_mask(inputs.fixed, method="threshold")
        inputs.fixed_mask, inputs.automatic_masks["fixed"] = result.mask, result
        inputs.fixed_mask_source = f"automatic lung mask ({result.method}, {result.volume_ml:.0f} mL)"
    if inputs.moving_mask is None:
        result = lung_mask(inputs.moving, method="threshold")
        inputs.moving_mask, inputs.automatic_masks["moving"] = result.mask, result
        inputs.moving_mask_source = f"automatic lung mask ({result.method}, {result.volume_ml:.0f} mL)"
    return inputs


# ----------------------------------------------------------------------------------------------------------------
# 2. prepare
# ----------------------------------------------------------------------------------------------------------------


def _orientation_transform(image: Image, reference: Image) -> np.ndarray | None:
    """The nibabel orientation transform taking ``image``'s voxel axes to ``reference``'s orientation, or ``None``
    when they already point the same way (3D only)."""
    from nibabel.orientations import io_orientation, ornt_transform

    if image.ndim != 3:
        return None
    ornt = ornt_transform(io_orientation(image.affine), io_orientation(reference.affine))
    if np.array_equal(ornt[:, 0], np.arange(3)) and np.all(ornt[:, 1] == 1):
        return None
    return ornt


def _apply_orientation(image: Image, ornt: np.ndarray) -> Image:
    from nibabel.orientations import apply_orientation, inv_ornt_aff

    array = np.ascontiguousarray(apply_orientation(image.array, ornt))
    affine = image.affine @ inv_ornt_aff(ornt, image.shape)
    return Image(array=array, affine=affine, path=image.path)


@dataclass
class PreparedPair:
    """The pair as the network sees it, and the geometry to go back.

    Attributes:
        inputs: what :func:`read_pair` returned.
        moving_oriented: the moving image as paired with the fixed one (reoriented for ``"physical"``).
        reoriented: whether ``moving_oriented`` differs from the stored moving image.
        fixed_net, moving_net: ``[1, C, *settings.file_order_shape]`` float32 network inputs, **file axis order**.
        settings: what it was prepared with.
        prealign: the affine pre-alignment ``(dim + 1)`` square world matrix (fixed world -> moving world), when one
            ran: ``moving_oriented`` is then the moving image resampled through it onto the fixed grid, and every
            output composes the network's transform with it exactly.
        prealign_result: the :class:`monai_gradicon.affine.AffineResult` (history, timings), or None.
    """

    inputs: PairInputs
    moving_oriented: Image
    reoriented: bool
    fixed_net: torch.Tensor
    moving_net: torch.Tensor
    settings: RegistrationSettings
    prealign: np.ndarray | None = None
    prealign_result: Any = None

    @property
    def prealign_inverse(self) -> np.ndarray | None:
        return None if self.prealign is None else np.linalg.inv(self.prealign)

    @property
    def network_input(self) -> torch.Tensor:
        """``[1, 2C, *S]``: moving and fixed stacked on the channel axis (the :class:`~monai_gradicon.GradICONDDFNet`
        input, file axis order)."""
        return torch.cat([self.moving_net, self.fixed_net], dim=1)


def _network_input(image: Image, mask: np.ndarray | None, settings: RegistrationSettings, name: str) -> torch.Tensor:
    array = np.asarray(preprocess(np.asarray(image.array, dtype=np.float32), settings.preprocessing, mask))
    if not np.isfinite(array).all() or array.min() == array.max():
        raise ValueError(
            f"After preprocessing {settings.preprocessing!r} the {name} is constant or not finite (e.g. a CT window "
            "applied to an MR image, or an empty mask region); check the weights' modality and the masks."
        )
    if settings.axis_order == "reference":
        # transpose, then resize, as the reference does (the summation order of the trilinear weights is then the
        # reference's, bit for bit); the result is handed on in the file's axis order (an exact permutation)
        return to_network_axes(resize_to_network(np.ascontiguousarray(np.transpose(array)), settings.input_shape),
                               "reference")
    return resize_to_network(array, settings.input_shape)


def orient_pair(inputs: PairInputs, orientation: str) -> tuple[Image, np.ndarray | None, bool]:
    """The moving image (and its mask) as paired with the fixed one: reoriented exactly to the fixed image's axis
    orientation for ``"physical"``, as stored for ``"index"``; and whether anything changed."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}.")
    ornt = _orientation_transform(inputs.moving, inputs.fixed) if orientation == "physical" else None
    if ornt is None:
        return inputs.moving, inputs.moving_mask, False
    mask = inputs.moving_mask
    if mask is not None:
        from nibabel.orientations import apply_orientation

        mask = np.ascontiguousarray(apply_orientation(mask, ornt))
    return _apply_orientation(inputs.moving, ornt), mask, True


def prealign_pair(inputs: PairInputs, settings: RegistrationSettings, device: torch.device | str = "cpu",
                  progress: bool = False):
    """The affine pre-alignment stage: ``(matrix, AffineResult, moving resampled onto the fixed grid, its mask)``,
    or ``(None, None, inputs.moving, inputs.moving_mask)`` when ``settings.prealign == "none"``. The matrix maps a
    fixed world point to the moving world point (``(dim + 1)`` square); the resampled moving image is what the
    network then registers to the fixed image (linear, border values; the mask nearest-neighbour)."""
    if settings.prealign == "none":
        return None, None, inputs.moving, inputs.moving_mask
    from monai_gradicon.affine import register_affine

    result = register_affine(inputs.fixed, inputs.moving, fixed_mask=inputs.fixed_mask, moving_mask=inputs.moving_mask,
                             similarity=settings.prealign_similarity, stages=PREALIGNMENTS[settings.prealign],
                             device=device, progress=progress)
    ndim = inputs.fixed.ndim
    matrix = np.asarray(result.matrix, dtype=np.float64)
    if matrix.shape == (4, 4) and ndim == 2:
        matrix = matrix[np.ix_([0, 1, 3], [0, 1, 3])]
    aligned, mask = apply_prealignment(inputs, matrix, device)
    return matrix, result, aligned, mask


def apply_prealignment(inputs: PairInputs, matrix: np.ndarray, device: torch.device | str = "cpu"
                       ) -> tuple[Image, np.ndarray | None]:
    """The moving image resampled through a pre-alignment ``matrix`` (``(dim + 1)`` square, fixed world -> moving
    world, RAS mm) onto the fixed grid (linear, border values), and its mask (nearest neighbour) or None."""
    from monai_gradicon.affine import affine_displacement

    ndim = inputs.fixed.ndim
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (ndim + 1, ndim + 1) or not np.isfinite(matrix).all():
        raise ValueError(f"A {ndim}D pre-alignment must be a finite {ndim + 1}x{ndim + 1} matrix, got shape "
                         f"{matrix.shape}.")
    fixed_grid, moving_grid = Grid.of(inputs.fixed), Grid.of(inputs.moving)
    shift = affine_displacement(matrix, fixed_grid)
    aligned = warp_physical(np.asarray(inputs.moving.array, dtype=np.float32), moving_grid, shift, fixed_grid,
                            "bilinear", "border", device)
    mask = None
    if inputs.moving_mask is not None:
        mask = warp_physical(inputs.moving_mask.astype(np.uint8), moving_grid, shift, fixed_grid, "nearest", "zeros",
                             device) > 0
        if not mask.any():
            raise ValueError("After the affine pre-alignment the moving mask lies outside the fixed image's grid: "
                             "the images do not overlap; check them, or register without --prealign.")
    return Image(array=aligned, affine=inputs.fixed.affine, path=inputs.moving.path), mask


def prepared_from_network_input(inputs: PairInputs, settings: RegistrationSettings, network_input: torch.Tensor,
                                prealign: np.ndarray | None = None) -> PreparedPair:
    """A :class:`PreparedPair` around network inputs that were already computed (``[2C, *S]`` or ``[1, 2C, *S]``,
    moving then fixed, file axis order, as :attr:`PreparedPair.network_input`), e.g. by a bundle's preprocessing;
    the orientation is redone (exact and cheap) for the geometry, or, when the settings ask for a pre-alignment,
    ``prealign`` -- the matrix :func:`prealign_pair` found for these inputs -- is applied again (required then)."""
    x = network_input if network_input.ndim == len(settings.input_shape) + 2 else network_input[None]
    c = x.shape[1] // 2
    if tuple(x.shape[2:]) != settings.file_order_shape or x.shape[1] != 2 * c:
        raise ValueError(f"network input of shape {tuple(x.shape)} does not fit the settings' file-order shape "
                         f"{settings.file_order_shape}.")
    if settings.prealign == "none":
        if prealign is not None:
            raise ValueError("A pre-alignment matrix was given but the settings say prealign 'none'.")
        moving, _, reoriented = orient_pair(inputs, settings.orientation)
        return PreparedPair(inputs, moving, reoriented, x[:, c:].float(), x[:, :c].float(), settings)
    if prealign is None:
        raise ValueError(f"The settings ask for a {settings.prealign} pre-alignment: pass the matrix prealign_pair "
                         "found for this pair.")
    matrix = np.asarray(prealign, dtype=np.float64)
    moving, _ = apply_prealignment(inputs, matrix)
    return PreparedPair(inputs, moving, False, x[:, c:].float(), x[:, :c].float(), settings, matrix)


def prepare_pair(inputs: PairInputs, settings: RegistrationSettings, network: GradICONNetwork | None = None,
                 device: torch.device | str = "cpu", prealigned: tuple | None = None,
                 progress: bool = False) -> PreparedPair:
    """Affine pre-alignment (when the settings ask for it), orientation, preprocessing and resize (stage 2). With
    ``network`` given, its dimensionality and minimum size are checked against the pair and the settings first.
    ``prealigned``: the result of :func:`prealign_pair` when it already ran (e.g. in a bundle's preprocessing);
    ``progress``: show the pre-alignment's progress."""
    ndim = inputs.fixed.ndim
    if len(settings.input_shape) != ndim:
        raise ValueError(f"The network shape {settings.input_shape} is {len(settings.input_shape)}D but the images "
                         f"are {ndim}D.")
    if network is not None:
        if network.spatial_dims != ndim:
            raise ValueError(
                f"The network is {network.spatial_dims}D but the images are {ndim}D (fixed shape "
                f"{inputs.fixed.shape}); use {ndim}D weights."
            )
        if min(settings.input_shape) < network.min_size:
            raise ValueError(
                f"Network shape {settings.input_shape} is below the minimum of {network.min_size} voxels per axis of "
                f"a {network.num_steps}-step network."
            )
    if prealigned is None:
        prealigned = prealign_pair(inputs, settings, device, progress)
    matrix, result, moving, mmask = prealigned
    if matrix is None:
        moving, mmask, reoriented = orient_pair(inputs, settings.orientation)
    else:  # resampled onto the fixed grid: same orientation by construction
        reoriented = False
    fixed_net = _network_input(inputs.fixed, inputs.fixed_mask, settings, "fixed image")
    moving_net = _network_input(moving, mmask, settings, "moving image")
    return PreparedPair(inputs, moving, reoriented, fixed_net, moving_net, settings, matrix, result)


# ----------------------------------------------------------------------------------------------------------------
# 3. network
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class NetworkTransforms:
    """Stage 3's result: ``phi_ab`` (fixed -> moving) and ``phi_ba`` (or None), normalized coordinates of the
    file-order network grid ``settings.file_order_shape``, in the file's axis order."""

    phi_ab: CoordinateTransform
    phi_ba: CoordinateTransform | None
    io_history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class _EvalMode:
    """Every module in eval mode inside the block, each module's own mode restored afterwards."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def __enter__(self) -> nn.Module:
        self.modes = {name: m.training for name, m in self.network.named_modules()}
        self.network.eval()
        return self.network

    def __exit__(self, *exc: Any) -> None:
        for name, m in self.network.named_modules():
            m.training = self.modes[name]


def _file_order(transform: CoordinateTransform | None, settings: RegistrationSettings) -> CoordinateTransform | None:
    """A network transform (its axis order) in the file's axis order, per ``settings.transform_scheme``:
    ``exact`` -- the transform itself; ``grid`` -- its map sampled on the network grid, reordered exactly to the
    file-order grid, and interpolated between the nodes (trilinear displacement, border values beyond the outer
    nodes, added to the point itself: the reference's ITK displacement-field transform)."""
    if transform is None:
        return None
    if settings.transform_scheme == "exact":
        return file_order_transform(transform, settings.axis_order)
    with torch.no_grad():
        phi = map_to_file_order(transform.on_grid(settings.input_shape), settings.axis_order)
        ident = identity_map(settings.file_order_shape, dtype=phi.dtype, device=phi.device)
        return DisplacementTransform(phi - ident)


def transform_from_ddf(ddf: torch.Tensor) -> CoordinateTransform:
    """The ``grid`` transform of a MONAI voxel DDF ``[1, dim, *S]`` on a network grid (e.g. the output of
    :class:`~monai_gradicon.GradICONDDFNet`): ``x -> x + ddf(x) / (N - 1)`` in normalized coordinates."""
    if ddf.ndim != ddf.shape[1] + 2 or ddf.shape[0] != 1:
        raise ValueError(f"Expected a DDF [1, dim, *S], got shape {tuple(ddf.shape)}.")
    scale = torch.tensor([1.0 / max(n - 1, 1) for n in ddf.shape[2:]], dtype=ddf.dtype, device=ddf.device)
    return DisplacementTransform(ddf * scale.view(1, -1, *([1] * (ddf.ndim - 2))))


def _optimize(moving: torch.Tensor, fixed: torch.Tensor, settings: RegistrationSettings, init: tuple | None,
              progress: bool) -> tuple[CoordinateTransform, CoordinateTransform, list[dict[str, float]]]:
    options = settings.field_options()
    result = optimize_fields(
        moving, fixed, init_ab=None if init is None else init[0], init_ba=None if init is None else init[1],
        similarity=settings.opt_similarity, lmbda=options.lmbda, levels=options.levels,
        iterations=list(options.iterations), lr=options.lr, field_spacing=list(options.field_spacing),
        seed=settings.io_seed, progress=progress,
    )
    return result.phi_ab, result.phi_ba, result.history


def run_network(
    network: GradICONNetwork,
    prepared: PreparedPair,
    device: torch.device | str = "cpu",
    io_objective: Callable[[nn.Module], GradICONObjective] | None = None,
    progress: bool = False,
) -> NetworkTransforms:
    """Stage 3 with a network: its transforms for the prepared pair, then the instance optimization the settings ask
    for (``io_method`` ``"weights"``: Adam on the weights, restored afterwards; ``"fields"``: the two transforms
    optimized from the network's, the weights untouched). ``io_objective`` is for the weights IO only."""
    settings = prepared.settings
    if not isinstance(network, GradICONNetwork):
        raise TypeError(f"network must be a GradICONNetwork, got {type(network).__name__}.")
    if settings.method != "network":
        raise ValueError(f"run_network runs method 'network', but the settings say {settings.method!r}.")
    if network.axis_order != settings.axis_order:
        raise CardError(
            f"The settings were made for axis order {settings.axis_order!r} but the network's card says "
            f"{network.axis_order!r}."
        )
    field_io = bool(settings.io_iterations) and settings.io_method == "fields"
    if field_io and io_objective is not None:
        raise ValueError("io_objective (similarity, masks, Dice) applies to the weights' instance optimization; "
                         "io_method 'fields' takes opt_similarity and opt_lambda instead.")
    start = time.perf_counter()
    dev = torch.device(device)
    network.to(dev)
    moving = to_network_axes(prepared.moving_net.to(dev), settings.axis_order)
    fixed = to_network_axes(prepared.fixed_net.to(dev), settings.axis_order)
    history: list[dict[str, float]] = []
    if settings.io_iterations and not field_io:
        objective = io_objective(network) if io_objective is not None else GradICONObjective(network)
        io = instance_optimize(network, moving, fixed, settings.io_iterations, settings.io_lr, objective,
                               settings.io_seed, progress)
        phi_ab, phi_ba, history = io.phi_ab, (io.phi_ba if settings.inverse else None), io.history
    else:
        with torch.no_grad(), _EvalMode(network):
            phi_ab = network(moving, fixed)
            phi_ba = network(fixed, moving) if (settings.inverse or field_io) else None
        if field_io:
            phi_ab, phi_ba, history = _optimize(moving, fixed, settings, (phi_ab, phi_ba), progress)
            phi_ba = phi_ba if settings.inverse else None
    return NetworkTransforms(_file_order(phi_ab, settings), _file_order(phi_ba, settings), history,
                             time.perf_counter() - start)


def stage_name(settings: RegistrationSettings) -> str:
    """The timings key of stage 3: ``"optimize"`` (no network), ``"instance_optimization"`` (a network with IO of
    either kind) or ``"network"`` (one forward pass per direction)."""
    if settings.method == "optimize":
        return "optimize"
    return "instance_optimization" if settings.io_iterations else "network"


def optimize_pair(prepared: PreparedPair, device: torch.device | str = "cpu", progress: bool = False) -> NetworkTransforms:
    """Stage 3 without a network (``method="optimize"``): the two transforms optimized directly on the working grid
    ``settings.input_shape`` (file axis order) by :func:`~monai_gradicon.field_optimization.optimize_fields` with the
    settings' ``opt_*`` options and ``io_seed``; the result has the form of the network's."""
    settings = prepared.settings
    if settings.method != "optimize":
        raise ValueError(f"optimize_pair runs method 'optimize', but the settings say {settings.method!r}.")
    start = time.perf_counter()
    dev = torch.device(device)
    phi_ab, phi_ba, history = _optimize(prepared.moving_net.to(dev), prepared.fixed_net.to(dev), settings, None,
                                        progress)
    return NetworkTransforms(_file_order(phi_ab, settings), _file_order(phi_ba if settings.inverse else None, settings),
                             history, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------------
# 4. original grids
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class OriginalGridFields:
    """Stage 4's arrays (see :class:`~monai_gradicon.pipeline.result.RegistrationResult` for the conventions).
    ``fixed_grid``: the grid of ``displacement``, ``jacobian`` and ``warped_moving`` (the original fixed grid)."""

    displacement: np.ndarray
    jacobian: np.ndarray
    warped_moving: np.ndarray
    inverse_displacement: np.ndarray | None
    folds_percent: float
    log_jacobian_std: float
    fixed_grid: Grid
    seconds: float = 0.0

    @property
    def ddf(self) -> np.ndarray:
        """The MONAI DDF ``[dim, *S_fixed]`` float32 in fixed voxels (:func:`~monai_gradicon.resample.
        displacement_to_ddf` of ``displacement``), computed on each access: not kept beside the world-mm field."""
        return displacement_to_ddf(self.displacement, self.fixed_grid)


def _require_finite(array: np.ndarray, what: str) -> None:
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise NonFiniteResultError(
            f"The registration produced {bad} non-finite value(s) in the {what} ({100.0 * bad / array.size:.3g}% of "
            "it): the transform is broken (e.g. diverging instance optimization, non-finite weights, or extreme "
            "inputs). Nothing was written."
        )


def to_original_grids(
    prepared: PreparedPair,
    transforms: NetworkTransforms,
    device: torch.device | str = "cpu",
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    padding_mode: str = "border",
) -> OriginalGridFields:
    """Stage 4: evaluate the transforms on the original grids in physical space and warp the moving image.

    ``padding_mode``: moving-image values outside its field of view, ``"border"`` (repeat the edge voxels) or
    ``"zeros"`` (as ITK resampling)."""
    if padding_mode not in ("border", "zeros"):
        raise ValueError(f"padding_mode must be 'border' or 'zeros', got {padding_mode!r}.")
    start = time.perf_counter()
    inputs, settings = prepared.inputs, prepared.settings
    fixed_grid, paired_grid = Grid.of(inputs.fixed), Grid.of(prepared.moving_oriented)
    moving_grid = Grid.of(inputs.moving)
    shape = settings.file_order_shape
    # fixed voxel -> the network's moving point (the paired image's world) -> through the pre-alignment, if any
    displacement = physical_displacement(transforms.phi_ab, fixed_grid, paired_grid, shape, device, chunk_voxels,
                                         post=prepared.prealign)
    _require_finite(displacement, "displacement field")
    # the original moving image, sampled once (its world is the paired image's, or the pre-alignment's target)
    warped = warp_physical(inputs.moving.array, moving_grid, displacement, fixed_grid, "bilinear", padding_mode,
                           device, chunk_voxels)
    inverse = None
    if transforms.phi_ba is not None:
        # every voxel of the moving image as stored: into the paired image's world, then Phi_BA to the fixed world
        inverse = physical_displacement(transforms.phi_ba, paired_grid, fixed_grid, shape, device, chunk_voxels,
                                        output=moving_grid, pre=prepared.prealign_inverse)
        _require_finite(inverse, "inverse displacement field")
    jac = physical_jacobian_determinant(displacement, fixed_grid, chunk_voxels)
    _require_finite(jac, "Jacobian determinant")
    _require_finite(warped, "warped moving image")
    folds = float(np.count_nonzero(jac <= 0)) * 100.0 / jac.size
    log_std = float(log_determinant_std(torch.from_numpy(jac)[None])[0])
    return OriginalGridFields(displacement, jac, warped, inverse, folds, log_std, fixed_grid,
                              time.perf_counter() - start)
