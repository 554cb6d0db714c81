"""MONAI dictionary transforms used by the GradICON bundles.

* :class:`LoadLandmarksd`: landmark files -> ``(K, 3)`` world-mm tensors (voxel files converted with the image affine).
* :class:`RegistrationEvalOutputd`: the validation during training: per-case metrics of the training module's
  output on the network grid (mTRE before/after, Dice before/after, folds, log-Jacobian std) and the images for
  TensorBoard/PNG. (Inference and evaluation on the original grids are :mod:`monai_gradicon.pipeline.transforms`.)

Intensity preprocessing is :class:`monai_gradicon.data.transforms.IntensityPreprocessd` (the one registry of every door).
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

from monai_gradicon.data.coords import voxel_to_world
from monai_gradicon.data.landmarks import read_landmarks
from monai_gradicon.maps import ddf_to_map, warp_image
from monai_gradicon.metrics import dice_per_label, folding_percentage, landmark_tre, log_jacobian_std
from monai_gradicon.pipeline.transforms import case_name

__all__ = [
    "LoadLandmarksd",
    "RegistrationEvalOutputd",
    "CASE_METRICS",
]

CASE_METRICS = (
    "tre_before_mm",
    "tre_after_mm",
    "dice_before",
    "dice_after",
    "folds_percent",
    "folds_percent_reference",
    "log_jacobian_std",
    "loss",
    "similarity",
)
"""Per-case values written by :class:`RegistrationEvalOutputd` (NaN when not applicable)."""

LANDMARK_FRAMES = ("world_mm", "voxel")


def _plain(x: Any) -> Any:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _affine(image: Any, key: str) -> torch.Tensor:
    if not isinstance(image, MetaTensor):
        raise ValueError(f"{key} must be a MONAI MetaTensor with an affine (load it with LoadImaged).")
    affine = image.affine
    if affine.ndim == 3:
        affine = affine[0]
    return affine.detach().cpu().to(torch.float64)


class LoadLandmarksd(MapTransform):
    """Read landmark files (CSV / text, see :func:`monai_gradicon.data.read_landmarks`) into ``(K, 3)`` float64
    tensors in **world mm** (the frame of the image affines MONAI loads).

    The frame of the files is taken from the entry's ``coordinates_key`` (``"world_mm"`` or ``"voxel"`` = 0-based
    voxel indices in array order, e.g. Learn2Reg NLST keypoints), default ``default_frame``. Voxel landmarks are
    mapped with the affine of the corresponding image, so this transform must run after ``LoadImaged`` and before
    any spatial resampling. Entries without landmarks are left as they are (``allow_missing_keys``).

    Args:
        keys: landmark keys, e.g. ``("fixed_landmarks", "moving_landmarks")``.
        image_keys: the image of each landmark key (for voxel -> world).
        coordinates_key: entry key naming the frame; removed from the data.
        default_frame: frame when the entry does not name one.
    """

    def __init__(self, keys: KeysCollection = ("fixed_landmarks", "moving_landmarks"),
                 image_keys: Sequence[Hashable] = ("fixed_image", "moving_image"),
                 coordinates_key: str = "landmark_coordinates", default_frame: str = "world_mm",
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(image_keys) != len(self.keys):
            raise ValueError(f"image_keys {tuple(image_keys)} must give one image per landmark key {self.keys}.")
        if default_frame not in LANDMARK_FRAMES:
            raise ValueError(f"default_frame must be one of {LANDMARK_FRAMES}, got {default_frame!r}.")
        self.image_keys = tuple(image_keys)
        self.coordinates_key = coordinates_key
        self.default_frame = default_frame

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        frame = d.pop(self.coordinates_key, None) or self.default_frame
        if frame not in LANDMARK_FRAMES:
            raise ValueError(f"{self.coordinates_key} must be one of {LANDMARK_FRAMES}, got {frame!r}.")
        for key, image_key in self.key_iterator(d, self.image_keys):
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                points = read_landmarks(value)
            else:
                points = np.asarray(value, dtype=np.float64)
            if frame == "voxel":
                if image_key not in d:
                    raise KeyError(f"LoadLandmarksd: voxel landmarks {key!r} need the image {image_key!r}.")
                points = voxel_to_world(points, _affine(d[image_key], str(image_key)).numpy())
            d[key] = torch.as_tensor(points, dtype=torch.float64)
        return d


def _nan() -> float:
    return float("nan")


class RegistrationEvalOutputd(MapTransform):
    """Evaluator postprocessing: per-case registration metrics and the images of one registration.

    It runs on one decollated sample of ``SupervisedEvaluator`` (batch and output merged by MONAI): ``pred`` is the
    output of :class:`~monai_gradicon.engines.GradICONTrainingModule` in eval mode (``ddf``, ``warped``, scalars),
    ``image``/``label`` are the moving/fixed network inputs; landmarks (world mm, :class:`LoadLandmarksd`) and label
    maps (resampled to the network grid with nearest neighbour) are read from the batch when present.

    It adds the output key ``eval_key`` holding ``{"case", "fixed", "moving", "warped", "ddf", "metrics"}`` where
    ``metrics`` has every name of :data:`CASE_METRICS` (NaN when not applicable):

    * ``tre_before_mm``: mean distance of corresponding landmarks (world mm); ``tre_after_mm``: mean TRE after
      registration (:func:`monai_gradicon.metrics.landmark_tre`, DDF interpolated at the fixed landmarks).
    * ``dice_before`` / ``dice_after``: mean Dice over labels of the moving / nearest-warped moving label map vs.
      the fixed one, at network resolution.
    * ``folds_percent``: % voxels with ``det J <= 0`` of the output DDF (``Phi_AB``);
      ``folds_percent_reference``: the reference's ``flips`` of ``Phi_BA`` in % of voxels (paper's %|J|<0).
    * ``log_jacobian_std``, ``loss``, ``similarity``.
    """

    def __init__(self, pred_key: str = "pred", eval_key: str = "eval", fixed_key: str = "fixed_image",
                 moving_key: str = "moving_image", fixed_landmarks_key: str = "fixed_landmarks",
                 moving_landmarks_key: str = "moving_landmarks", fixed_label_key: str = "fixed_label",
                 moving_label_key: str = "moving_label", compute_dice: bool = True) -> None:
        super().__init__([pred_key], allow_missing_keys=False)
        self.pred_key = pred_key
        self.eval_key = eval_key
        self.fixed_key, self.moving_key = fixed_key, moving_key
        self.fixed_landmarks_key, self.moving_landmarks_key = fixed_landmarks_key, moving_landmarks_key
        self.fixed_label_key, self.moving_label_key = fixed_label_key, moving_label_key
        self.compute_dice = compute_dice

    def _tre(self, d: Mapping, ddf: torch.Tensor) -> tuple[float, float]:
        fixed_pts, moving_pts = d.get(self.fixed_landmarks_key), d.get(self.moving_landmarks_key)
        if not isinstance(fixed_pts, torch.Tensor) or not isinstance(moving_pts, torch.Tensor):
            return _nan(), _nan()
        fixed_pts, moving_pts = _plain(fixed_pts).double().cpu(), _plain(moving_pts).double().cpu()
        before = float((moving_pts - fixed_pts).norm(dim=-1).mean())
        _, after = landmark_tre(
            moving_pts, fixed_pts, ddf[None].float(), points_in="world",
            fixed_affine=_affine(d[self.fixed_key], self.fixed_key),
            moving_affine=_affine(d[self.moving_key], self.moving_key),
        )
        return before, float(after[0])

    def _dice(self, d: Mapping, ddf: torch.Tensor) -> tuple[float, float]:
        fixed_lab, moving_lab = d.get(self.fixed_label_key), d.get(self.moving_label_key)
        if not self.compute_dice or not isinstance(fixed_lab, torch.Tensor) or not isinstance(moving_lab, torch.Tensor):
            return _nan(), _nan()
        fixed_lab = _plain(fixed_lab).cpu().round()
        moving_lab = _plain(moving_lab).cpu().float()
        if tuple(moving_lab.shape[1:]) != tuple(ddf.shape[1:]):
            raise ValueError(
                f"label maps must be resampled to the network grid {tuple(ddf.shape[1:])} for Dice, got "
                f"{tuple(moving_lab.shape)}"
            )
        phi = ddf_to_map(ddf[None].float().cpu())
        warped = warp_image(moving_lab[None], phi, mode="nearest")[0].round()
        return dice_per_label(moving_lab.round(), fixed_lab)["mean"], dice_per_label(warped, fixed_lab)["mean"]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        pred = d[self.pred_key]
        if not isinstance(pred, Mapping) or "ddf" not in pred:
            raise ValueError(
                "RegistrationEvalOutputd expects the network output to be a dict with 'ddf' (the "
                "GradICONTrainingModule in eval mode)."
            )
        ddf = _plain(pred["ddf"]).detach()
        tre_before, tre_after = self._tre(d, ddf)
        dice_before, dice_after = self._dice(d, ddf)
        metrics = {
            "tre_before_mm": tre_before,
            "tre_after_mm": tre_after,
            "dice_before": dice_before,
            "dice_after": dice_after,
            "folds_percent": float(folding_percentage(ddf[None].float())[0]),
            "folds_percent_reference": float(pred.get("folds_percent", _nan())),
            "log_jacobian_std": float(log_jacobian_std(ddf[None].float())[0]),
            "loss": float(pred.get("loss", _nan())),
            "similarity": float(pred.get("similarity", _nan())),
        }
        d[self.eval_key] = {
            "case": case_name(d, self.fixed_key, self.moving_key),
            "fixed": _plain(d["label"]) if "label" in d else _plain(d[self.fixed_key]),
            "moving": _plain(d["image"]) if "image" in d else _plain(d[self.moving_key]),
            "warped": _plain(pred["warped"]),
            "ddf": ddf,
            "metrics": metrics,
        }
        return d
