"""The pipeline's stages as MONAI dictionary transforms, for the bundles' ``inference.json`` / ``evaluate.json``.

A bundle's inference is the same pipeline as the command line, wired as MONAI components:

* preprocessing: :class:`LoadRegistrationImaged` (our reader: NIfTI, NRRD, MONAI ``LoadImage`` formats; images as
  ``MetaTensor`` ``[1, *S]`` with their RAS affines) -> :class:`PrepareNetworkInputd` (orientation, the card's
  preprocessing, resize: ``image`` = ``[2C, *S_net]`` moving + fixed, file axis order);
* network: :class:`~monai_gradicon.GradICONDDFNet` (``image`` -> voxel DDF on the network grid, the card's axis
  order applied inside);
* postprocessing: :class:`OriginalGridOutputsd` (the DDF -> transform -> every output on the original grids) ->
  :class:`SaveRegistrationd` (``<case>_displacement_mm.nii.gz``, ``<case>_ddf_voxels.nii.gz``,
  ``<case>_warped.nii.gz``, ... with exactly the contents of the command line's files) and, for evaluation,
  :class:`RegistrationMetricsd` (TRE in mm, Dice, folds, SDlogJ on the original grids).

Settings come from the network's model card at call time (after the bundle's ``CheckpointLoader`` put the weight
file's card in place), so the bundle cannot feed the weights differently from how they were trained.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import nn

from monai_gradicon.config import config_bool
from monai_gradicon.io import Image, as_image, read_image, write_displacement_field, write_nifti
from monai_gradicon.networks.registration import GradICONDDFNet, GradICONNetwork
from monai_gradicon.pipeline.core import (
    ORIENTATIONS,
    PREALIGNMENTS,
    TRANSFORM_SCHEMES,
    NetworkTransforms,
    PairInputs,
    RegistrationSettings,
    complete_masks,
    default_optimize_shape,
    optimize_pair,
    prealign_pair,
    prepare_pair,
    prepared_from_network_input,
    read_pair,
    resolve_settings,
    run_network,
    to_original_grids,
    transform_from_ddf,
)
from monai_gradicon.pipeline.result import warp_with_field
from monai_gradicon.resample import Grid, map_points

__all__ = [
    "ToNetworkAxesd",
    "LoadRegistrationImaged",
    "PrepareNetworkInputd",
    "OriginalGridOutputsd",
    "OptimizeRegistrationd",
    "SaveRegistrationd",
    "RegistrationMetricsd",
    "BUNDLE_OUTPUTS",
    "case_name",
]

BUNDLE_OUTPUTS = ("displacement_mm", "ddf_voxels", "warped", "inverse_displacement_mm", "jacobian_determinant")
"""What :class:`SaveRegistrationd` can write (file ``<case>_<name>.nii.gz``, contents as the command line's files
``displacement_mm.nii.gz``, ``ddf_voxels.nii.gz``, ``warped_moving.nii.gz``, ...)."""

_RESULT_KEY = "registration"


def _registration_network(network: nn.Module) -> GradICONNetwork:
    inner = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    if isinstance(inner, GradICONDDFNet):
        inner = inner.network
    if not isinstance(inner, GradICONNetwork):
        raise TypeError(f"Expected a GradICONNetwork or GradICONDDFNet, got {type(inner).__name__}.")
    return inner


def _stem(path: Any) -> str:
    name = os.path.basename(str(path))
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".img", ".hdr"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def case_name(data: Mapping, fixed_key: str = "fixed_image", moving_key: str = "moving_image") -> str:
    """A readable case id: the entry's ``case`` value, else ``<moving file stem>_to_<fixed file stem>``."""
    if data.get("case") not in (None, ""):
        return str(data["case"])
    names = []
    for key in (moving_key, fixed_key):
        value = data.get(key)
        meta = value.meta if isinstance(value, MetaTensor) else {}
        source = meta.get("filename_or_obj")
        names.append(_stem(source) if source else key)
    return f"{names[0]}_to_{names[1]}"


def _metatensor(image: Image) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(image.array))[None], affine=torch.as_tensor(image.affine),
                      meta={"filename_or_obj": image.path or ""})


def _image(value: Any, name: str) -> Image:
    if isinstance(value, Image):
        return value
    if isinstance(value, MetaTensor):
        img = as_image(value, name)
        img.path = value.meta.get("filename_or_obj") or None
        return img
    return as_image(value, name)


class LoadRegistrationImaged(MapTransform):
    """Read images with :func:`monai_gradicon.io.read_image` (the reader of every door) into ``MetaTensor`` s
    ``[1, *S]`` carrying the voxel -> RAS affine and ``filename_or_obj``.

    Args:
        keys: image keys that must be present (e.g. ``("fixed_image", "moving_image")``).
        optional_keys: keys read when the entry has them (e.g. masks ``("fixed_label", "moving_label")``).
    """

    def __init__(self, keys: KeysCollection, optional_keys: Sequence[Hashable] = ()) -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.optional_keys = tuple(optional_keys)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in (*self.keys, *[k for k in self.optional_keys if d.get(k) not in (None, "")]):
            if key not in d:
                raise KeyError(f"LoadRegistrationImaged: the entry has no {key!r} (keys: {sorted(map(str, d))}).")
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                d[key] = _metatensor(read_image(value, str(key).replace("_", " ")))
        for key in self.optional_keys:
            if d.get(key) in (None, ""):
                d.pop(key, None)
        return d


class ToNetworkAxesd(MapTransform):
    """Present ``[C, *S]`` images (file voxel order) in a network's axis order, for training configs: unchanged for
    ``"file"``, spatial axes reversed for ``"reference"`` (file ``(i, j, k)`` -> ``(k, j, i)``, ITK's numpy order, what
    the released weights saw). A ``MetaTensor``'s affine is permuted to match, so world coordinates (landmarks, TRE)
    stay valid. Put it before ``Resized`` to the network shape, as the reference transposes before resizing."""

    def __init__(self, keys: KeysCollection, axis_order: str, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        from monai_gradicon.model_card import AXIS_ORDERS

        if axis_order not in AXIS_ORDERS:
            raise ValueError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}.")
        self.axis_order = axis_order

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.axis_order == "file":
            return d
        for key in self.key_iterator(d):
            x = d[key]
            spatial = list(range(1, x.ndim))
            order = [0, *spatial[::-1]]
            if isinstance(x, MetaTensor):
                affine = x.affine.clone()
                n = len(spatial)
                affine[:n, :n] = affine[:n, :n][:, [s - 1 for s in spatial[::-1]]]
                meta = {k: v for k, v in x.meta.items() if k != "affine"}
                d[key] = MetaTensor(x.as_tensor().permute(order).contiguous(), affine=affine, meta=meta)
            elif isinstance(x, torch.Tensor):
                d[key] = x.permute(order).contiguous()
            else:
                d[key] = np.ascontiguousarray(np.transpose(np.asarray(x), order))
        return d


class _PipelineTransform(MapTransform):
    """Shared arguments: the network (for its card), the keys, and the pipeline settings the card leaves open."""

    def __init__(self, network: nn.Module, fixed_key: str = "fixed_image", moving_key: str = "moving_image",
                 mask_keys: Sequence[str] | None = ("fixed_label", "moving_label"), use_masks: bool = True,
                 orientation: str = "physical", transform_scheme: str = "grid", padding_mode: str = "border",
                 preprocessing: str | None = None, input_shape: Sequence[int] | None = None,
                 auto_masks: bool = True, prealign: str = "none", prealign_similarity: str = "mi",
                 prealign_key: str = "prealign_matrix") -> None:
        super().__init__([fixed_key, moving_key], allow_missing_keys=False)
        use_masks, auto_masks = config_bool(use_masks, "use_masks"), config_bool(auto_masks, "auto_masks")
        self.auto_masks = auto_masks
        self.network = network
        self.fixed_key, self.moving_key = fixed_key, moving_key
        self.mask_keys = tuple(mask_keys) if mask_keys is not None else (None, None)
        if len(self.mask_keys) != 2:
            raise ValueError(f"mask_keys must name the fixed and the moving mask, got {mask_keys!r}.")
        self.use_masks = use_masks
        self.orientation, self.transform_scheme, self.padding_mode = orientation, transform_scheme, padding_mode
        self.preprocessing = preprocessing
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        # fail on bad names when the config is parsed, not at the first pair
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}.")
        if transform_scheme not in TRANSFORM_SCHEMES:
            raise ValueError(f"transform_scheme must be one of {TRANSFORM_SCHEMES}, got {transform_scheme!r}.")
        if padding_mode not in ("border", "zeros"):
            raise ValueError(f"padding_mode must be 'border' or 'zeros', got {padding_mode!r}.")
        if prealign not in PREALIGNMENTS:
            raise ValueError(f"prealign must be one of {tuple(PREALIGNMENTS)}, got {prealign!r}.")
        if prealign_similarity not in ("mi", "lncc"):
            raise ValueError(f"prealign_similarity must be 'mi' or 'lncc', got {prealign_similarity!r}.")
        self.prealign, self.prealign_similarity, self.prealign_key = prealign, prealign_similarity, prealign_key

    def settings(self) -> RegistrationSettings:
        card = _registration_network(self.network).card
        return resolve_settings(card, preprocessing=self.preprocessing, input_shape=self.input_shape,
                                orientation=self.orientation, transform_scheme=self.transform_scheme, inverse=False,
                                auto_masks=self.auto_masks and self.use_masks, prealign=self.prealign,
                                prealign_similarity=self.prealign_similarity, source="the bundle's weights")

    def inputs(self, d: Mapping, settings: RegistrationSettings | None = None) -> PairInputs:
        """The pair as read; with ``settings``, missing lung masks are completed (:func:`complete_masks`)."""
        masks = [d.get(k) if (self.use_masks and k is not None) else None for k in self.mask_keys]
        inputs = read_pair(_image(d[self.fixed_key], "fixed image"), _image(d[self.moving_key], "moving image"),
                           _image(masks[0], "fixed mask") if masks[0] is not None else None,
                           _image(masks[1], "moving mask") if masks[1] is not None else None)
        return complete_masks(inputs, settings) if settings is not None else inputs


class PrepareNetworkInputd(_PipelineTransform):
    """Stages 1b-2 of the pipeline: the affine pre-alignment when ``prealign`` asks for one (its matrix, fixed world
    -> moving world, ``(dim + 1)`` square float64, goes to ``prealign_key`` for :class:`OriginalGridOutputsd`), then
    ``output_key`` = ``[2C, *S_net]`` (moving then fixed, file axis order), what
    :class:`~monai_gradicon.GradICONDDFNet` takes. The images and masks stay as loaded for the postprocessing."""

    def __init__(self, network: nn.Module, output_key: str = "image", **kwargs: Any) -> None:
        super().__init__(network, **kwargs)
        self.output_key = output_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        settings = self.settings()
        inputs = self.inputs(d, settings)
        prealigned = prealign_pair(inputs, settings, "cpu")
        prepared = prepare_pair(inputs, settings, _registration_network(self.network), prealigned=prealigned)
        d[self.output_key] = prepared.network_input[0]
        if prepared.prealign is not None:
            d[self.prealign_key] = prepared.prealign
        return d


class OriginalGridOutputsd(_PipelineTransform):
    """Stage 4 of the pipeline on one decollated sample: the network's output DDF (``pred_key``, ``[dim, *S_net]``
    voxels of the file-order network grid) -> the registration on the original grids.

    With ``transform_scheme="exact"`` the transform is recomputed from ``input_key`` with the network (one more
    forward pass) because a DDF holds only the grid scheme. Adds ``result_key`` (the
    :class:`~monai_gradicon.pipeline.core.OriginalGridFields`, plus what :class:`SaveRegistrationd` and
    :class:`RegistrationMetricsd` need) and ``"warped"`` (a ``MetaTensor`` on the fixed grid).
    """

    def __init__(self, network: nn.Module, pred_key: str = "pred", input_key: str = "image",
                 result_key: str = _RESULT_KEY, inverse: bool = False, **kwargs: Any) -> None:
        super().__init__(network, **kwargs)
        self.pred_key, self.input_key, self.result_key = pred_key, input_key, result_key
        self.inverse = config_bool(inverse, "inverse")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        settings = self.settings()
        inputs = self.inputs(d)
        x = torch.as_tensor(d[self.input_key]).detach()
        matrix = None
        if settings.prealign != "none":
            if self.prealign_key not in d:
                raise KeyError(f"prealign {settings.prealign!r}: the pre-alignment matrix {self.prealign_key!r} that "
                               "PrepareNetworkInputd stores is missing from the data (same prealign settings and key "
                               "in both transforms?).")
            matrix = np.asarray(torch.as_tensor(d[self.prealign_key]).detach().cpu(), dtype=np.float64)
        prepared = prepared_from_network_input(inputs, settings, x, matrix)
        ddf = torch.as_tensor(d[self.pred_key]).detach().float()
        network = _registration_network(self.network)
        device = ddf.device
        if self.transform_scheme == "exact" or self.inverse:
            from dataclasses import replace

            full = replace(settings, inverse=self.inverse)
            prepared.settings = full
            transforms = run_network(network, prepared, device)
            if self.transform_scheme == "grid":  # keep the forward transform of the evaluated DDF
                transforms.phi_ab = transform_from_ddf(ddf[None])
        else:
            transforms = NetworkTransforms(transform_from_ddf(ddf[None]), None)
        fields = to_original_grids(prepared, transforms, device, padding_mode=self.padding_mode)
        d[self.result_key] = {"prepared": prepared, "transforms": transforms, "fields": fields,
                              "case": case_name(d, self.fixed_key, self.moving_key)}
        d["warped"] = MetaTensor(torch.from_numpy(fields.warped_moving)[None],
                                 affine=torch.as_tensor(inputs.fixed.affine))
        return d


class OptimizeRegistrationd(_PipelineTransform):
    """The whole pipeline without a network (``method="optimize"``, :func:`~monai_gradicon.pipeline.core.
    optimize_pair`) on one pair: read, pre-align and prepare as :class:`PrepareNetworkInputd`, optimize the two
    transforms directly (GradICON's objective, coarse to fine), evaluate them on the original grids as
    :class:`OriginalGridOutputsd`. Adds ``result_key`` (for :class:`SaveRegistrationd` and
    :class:`RegistrationMetricsd`) and ``"warped"``; the inverse is always computed (the method optimizes both).

    Args:
        preprocessing: a :data:`~monai_gradicon.data.preprocessing.PREPROCESSING` name (no model card supplies one).
        input_shape: the working grid (file axis order); None: the fixed image's shape capped at 175 per axis.
        opt_lambda, opt_levels, opt_iterations, opt_lr, opt_similarity, seed: the field optimization's options
            (None: its measured defaults), as ``register --method optimize``.
        device: where the optimization and the original-grid stage run.
        progress: show the optimization's progress.
        Other arguments as :class:`PrepareNetworkInputd` (there is no network: ``network`` is not taken).
    """

    def __init__(self, preprocessing: str, input_shape: Sequence[int] | None = None, opt_lambda: float | None = None,
                 opt_levels: int | None = None, opt_iterations: int | Sequence[int] | None = None,
                 opt_lr: float | None = None, opt_similarity: str = "lncc", seed: int = 0,
                 device: torch.device | str = "cpu", progress: bool = False, result_key: str = _RESULT_KEY,
                 **kwargs: Any) -> None:
        super().__init__(None, preprocessing=preprocessing, input_shape=input_shape, **kwargs)
        self.options = {"opt_lambda": opt_lambda, "opt_levels": opt_levels, "opt_iterations": opt_iterations,
                        "opt_lr": opt_lr, "opt_similarity": opt_similarity, "io_seed": seed}
        self.device, self.progress = torch.device(device), config_bool(progress, "progress")
        self.result_key = result_key
        # bad options fail when the config is parsed, not at the first pair
        self.settings_for(self.input_shape or (64, 64, 64))

    def settings_for(self, fixed_shape: Sequence[int]) -> RegistrationSettings:
        """The settings for a pair whose fixed image has ``fixed_shape`` (voxels; sizes the default working grid)."""
        shape = self.input_shape if self.input_shape is not None else default_optimize_shape(fixed_shape)
        return resolve_settings(None, preprocessing=self.preprocessing, input_shape=tuple(shape),
                                orientation=self.orientation, transform_scheme=self.transform_scheme, inverse=True,
                                auto_masks=self.auto_masks and self.use_masks, prealign=self.prealign,
                                prealign_similarity=self.prealign_similarity, method="optimize",
                                source="the bundle's optimize settings", **self.options)

    def settings(self) -> RegistrationSettings:
        raise TypeError("OptimizeRegistrationd has no network card; its settings depend on the pair (settings_for).")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        inputs = self.inputs(d)
        settings = self.settings_for(inputs.fixed.shape)
        inputs = complete_masks(inputs, settings)
        prepared = prepare_pair(inputs, settings, None, self.device, progress=self.progress)
        transforms = optimize_pair(prepared, self.device, self.progress)
        fields = to_original_grids(prepared, transforms, self.device, padding_mode=self.padding_mode)
        d[self.result_key] = {"prepared": prepared, "transforms": transforms, "fields": fields,
                              "case": case_name(d, self.fixed_key, self.moving_key)}
        d["warped"] = MetaTensor(torch.from_numpy(fields.warped_moving)[None],
                                 affine=torch.as_tensor(inputs.fixed.affine))
        return d


class SaveRegistrationd(MapTransform):
    """Write one case's outputs as ``<output_dir>/<case>_<name>.nii.gz``, each with exactly the contents of the
    command line's file of that name (:data:`BUNDLE_OUTPUTS`), atomically.

    Args:
        output_dir: folder (created).
        outputs: which of :data:`BUNDLE_OUTPUTS`.
        result_key: the key :class:`OriginalGridOutputsd` filled.
        overwrite: replace files of an earlier run (otherwise an existing file is an error naming it).
    """

    def __init__(self, output_dir: str, outputs: Sequence[str] = ("displacement_mm", "ddf_voxels", "warped"),
                 result_key: str = _RESULT_KEY, overwrite: bool = True) -> None:
        super().__init__([result_key], allow_missing_keys=False)
        unknown = [o for o in outputs if o not in BUNDLE_OUTPUTS]
        if unknown:
            raise ValueError(f"Unknown outputs {unknown}; choose from {BUNDLE_OUTPUTS}.")
        self.output_dir, self.outputs, self.result_key = output_dir, tuple(outputs), result_key
        self.overwrite = overwrite

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        res = d[self.result_key]
        fields, prepared = res["fields"], res["prepared"]
        fixed, moving = prepared.inputs.fixed, prepared.inputs.moving
        writers = {
            "displacement_mm": lambda p: write_displacement_field(p, fields.displacement, fixed.affine),
            "ddf_voxels": lambda p: write_nifti(p, np.moveaxis(fields.ddf, 0, -1), fixed.affine),
            "warped": lambda p: write_nifti(p, fields.warped_moving.astype(np.float32), fixed.affine),
            "jacobian_determinant": lambda p: write_nifti(p, np.asarray(fields.jacobian, dtype=np.float32), fixed.affine),
            "inverse_displacement_mm": lambda p: write_displacement_field(p, fields.inverse_displacement,
                                                                          moving.affine),
        }
        written = {}
        for name in self.outputs:
            if name == "inverse_displacement_mm" and fields.inverse_displacement is None:
                raise ValueError("inverse_displacement_mm needs OriginalGridOutputsd(inverse=True).")
            path = os.path.join(self.output_dir, f"{res['case']}_{name}.nii.gz")
            if os.path.lexists(path) and not self.overwrite:
                raise FileExistsError(f"{path} already exists (overwrite is off).")
            writers[name](path)
            written[name] = path
        res["files"] = written
        return d


class RegistrationMetricsd(MapTransform):
    """Per-case metrics on the original grids, as the command line's ``evaluate`` computes them: mean TRE before
    and after (mm; fixed landmarks mapped by ``Phi_AB`` itself), Dice of the moving label map warped with nearest
    neighbour vs the fixed one (mean over labels), folds (% fixed voxels with det J <= 0), SDlogJ. Landmarks are
    world mm tensors (``monai_gradicon.engines.LoadLandmarksd``). Adds ``eval_key`` = ``{"case", "fixed", "moving",
    "warped", "ddf", "metrics"}`` for :class:`~monai_gradicon.engines.MetricsReportHandler` and the overview images.
    """

    def __init__(self, result_key: str = _RESULT_KEY, eval_key: str = "eval",
                 landmark_keys: Sequence[str] = ("fixed_landmarks", "moving_landmarks"),
                 label_keys: Sequence[str] = ("fixed_label", "moving_label")) -> None:
        super().__init__([result_key], allow_missing_keys=False)
        self.result_key, self.eval_key = result_key, eval_key
        self.landmark_keys, self.label_keys = tuple(landmark_keys), tuple(label_keys)

    def __call__(self, data: Mapping) -> dict:
        from monai_gradicon.metrics import dice_per_label, tre_statistics

        d = dict(data)
        res = d[self.result_key]
        fields, prepared, transforms = res["fields"], res["prepared"], res["transforms"]
        fixed = prepared.inputs.fixed
        nan = float("nan")
        metrics = {"tre_before_mm": nan, "tre_after_mm": nan, "dice_before": nan, "dice_after": nan,
                   "folds_percent": fields.folds_percent, "log_jacobian_std": fields.log_jacobian_std}
        fl, ml = (d.get(k) for k in self.landmark_keys)
        if isinstance(fl, torch.Tensor) and isinstance(ml, torch.Tensor):
            fixed_w, moving_w = fl.double().cpu().numpy(), ml.double().cpu().numpy()
            metrics["tre_before_mm"] = tre_statistics(fixed_w, moving_w)["mean_mm"]
            mapped = map_points(transforms.phi_ab, fixed_w, Grid.of(fixed), Grid.of(prepared.moving_oriented),
                                prepared.settings.file_order_shape)
            metrics["tre_after_mm"] = tre_statistics(mapped, moving_w)["mean_mm"]
        flab, mlab = (d.get(k) for k in self.label_keys)
        if flab is not None and mlab is not None:
            f_img, m_img = _image(flab, "fixed label map"), _image(mlab, "moving label map")
            f_arr = torch.from_numpy(np.rint(f_img.array).astype(np.int64))
            zero = np.zeros_like(fields.displacement)
            before = warp_with_field(_as_labels(m_img), zero, Grid.of(fixed), True)
            after = warp_with_field(_as_labels(m_img), fields.displacement, Grid.of(fixed), True)
            metrics["dice_before"] = dice_per_label(torch.from_numpy(before.astype(np.int64)), f_arr)["mean"]
            metrics["dice_after"] = dice_per_label(torch.from_numpy(after.astype(np.int64)), f_arr)["mean"]
        moving_box = warp_with_field(prepared.moving_oriented, np.zeros_like(fields.displacement), Grid.of(fixed),
                                     False)
        d[self.eval_key] = {
            "case": res["case"],
            "fixed": torch.from_numpy(np.asarray(fixed.array, np.float32)),
            "moving": torch.from_numpy(moving_box),
            "warped": torch.from_numpy(fields.warped_moving),
            "ddf": torch.from_numpy(fields.ddf),
            "metrics": metrics,
        }
        return d


def _as_labels(image: Image) -> Image:
    return Image(array=np.rint(np.asarray(image.array, dtype=np.float64)).astype(np.int32), affine=image.affine,
                 path=image.path)
