"""MONAI dictionary transforms used by the GradICON bundles.

* :class:`LoadLandmarksd`: landmark files -> ``(K, 3)`` world-mm tensors (voxel files converted with the image affine).
* :class:`LungPairNormalized`: the GradICON lung CT normalisation with *optional* per-entry lung masks.
* :class:`RegistrationEvalOutputd`: evaluator postprocessing computing the per-case metrics (mTRE before/after,
  Dice before/after, folds, log-Jacobian std) and the images for TensorBoard/PNG.
* :class:`ResampleToFixedGridd`: inference postprocessing giving the warped moving image and the DDF on the
  *original* fixed image grid, with its affine, ready for ``SaveImaged``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_gradicon.data.coords import voxel_to_world
from monai_gradicon.data.landmarks import read_landmarks
from monai_gradicon.data.preprocessing import lung_ct_normalize
from monai_gradicon.maps import ddf_to_map, warp_image
from monai_gradicon.metrics import dice_per_label, folding_percentage, landmark_tre, log_jacobian_std

__all__ = [
    "LoadLandmarksd",
    "LungPairNormalized",
    "RegistrationEvalOutputd",
    "ResampleToFixedGridd",
    "CASE_METRICS",
    "case_name",
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


def _stem(path: Any) -> str:
    name = os.path.basename(str(path))
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".img", ".hdr"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def case_name(data: Mapping, fixed_key: str = "fixed_image", moving_key: str = "moving_image") -> str:
    """A readable case id: the entry's ``case`` value, else ``<moving file stem>_to_<fixed file stem>``."""
    if "case" in data and data["case"] not in (None, ""):
        return str(data["case"])
    names = []
    for key in (moving_key, fixed_key):
        value = data.get(key)
        meta = value.meta if isinstance(value, MetaTensor) else data.get(f"{key}_meta_dict", {})
        source = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
        names.append(_stem(source) if source else key)
    return f"{names[0]}_to_{names[1]}"


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


class LungPairNormalized(MapTransform):
    """GradICON lung CT normalisation (:func:`monai_gradicon.data.lung_ct_normalize`: clip HU to [-1000, 0],
    ``(HU + 1000) / 1000``, times the binarised lung mask) where the mask of an image is used when the entry has it.

    Args:
        keys: CT image keys.
        mask_keys: the lung mask key of each image key (absent masks are skipped; None: never mask).
        use_masks: False ignores masks even when present.
    """

    def __init__(self, keys: KeysCollection = ("fixed_image", "moving_image"),
                 mask_keys: Sequence[Hashable] | None = ("fixed_label", "moving_label"), use_masks: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = (None,) * len(self.keys) if mask_keys is None else tuple(mask_keys)
        if len(self.mask_keys) != len(self.keys):
            raise ValueError(f"mask_keys {self.mask_keys} must give one mask key per image key {self.keys}.")
        self.use_masks = bool(use_masks)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            mask = d.get(mask_key) if (self.use_masks and mask_key is not None) else None
            d[key] = lung_ct_normalize(d[key], mask)
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


def _homogeneous(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a 4x4 matrix to ``[3, *P]`` points."""
    shape = points.shape
    flat = points.reshape(3, -1)
    out = matrix[:3, :3].to(flat.dtype) @ flat + matrix[:3, 3:].to(flat.dtype)
    return out.reshape(shape)


def _grid_sample_voxels(volume: torch.Tensor, points_vox: torch.Tensor, mode: str = "bilinear",
                        padding_mode: str = "border") -> torch.Tensor:
    """Sample ``volume`` ``[C, *S]`` at voxel positions ``points_vox`` ``[3, *P]`` (align_corners=True)."""
    sizes = volume.shape[1:]
    coords = [points_vox[k] * (2.0 / max(int(sizes[k]) - 1, 1)) - 1.0 for k in range(3)]
    grid = torch.stack(coords[::-1], dim=-1)[None].to(volume.dtype)
    return F.grid_sample(volume[None], grid, mode=mode, padding_mode=padding_mode, align_corners=True)[0]


class ResampleToFixedGridd(MapTransform):
    """Inference postprocessing: resample the registration result onto the **original** fixed image grid.

    Inputs (one decollated sample): ``ddf_key`` = the network output, a voxel DDF ``[3, *N]`` on the network grid
    of the fixed image; ``fixed_key``/``moving_key`` = the preprocessed (resized) images, whose MetaTensor affines
    describe the network grids; ``fixed_original_key``/``moving_original_key`` = the images as loaded (copies made
    before any preprocessing), giving the original grids and intensities.

    Outputs (MetaTensors with the fixed image's original affine, ready for ``SaveImaged``):

    * ``warped_key``: the original moving image (original intensities, e.g. HU) warped onto the original fixed grid
      (trilinear, border padding).
    * ``output_ddf_key``: the displacement ``[3, *S_fixed]`` of the transform on the original fixed grid, in
      **voxels of the fixed grid** (``ddf_units="voxel"``, MONAI ``Warp`` convention: ``Warp()(moving resampled onto
      the fixed grid, ddf)`` gives the warped image) or in world **mm** (``ddf_units="mm"``, the frame of the NIfTI
      affine, e.g. RAS). Channel k is along array axis k (voxel) or world axis k (mm).

    The network DDF is interpolated trilinearly between network voxels. Work is done in slabs of ``chunk_size``
    planes along the first axis to bound memory.
    """

    def __init__(self, ddf_key: str = "pred", fixed_key: str = "fixed_image", moving_key: str = "moving_image",
                 fixed_original_key: str = "fixed_original", moving_original_key: str = "moving_original",
                 warped_key: str = "warped", output_ddf_key: str = "ddf", ddf_units: str = "voxel",
                 chunk_size: int = 32, drop_originals: bool = True) -> None:
        super().__init__([ddf_key], allow_missing_keys=False)
        if ddf_units not in ("voxel", "mm"):
            raise ValueError(f"ddf_units must be 'voxel' or 'mm', got {ddf_units!r}.")
        self.ddf_key = ddf_key
        self.fixed_key, self.moving_key = fixed_key, moving_key
        self.fixed_original_key, self.moving_original_key = fixed_original_key, moving_original_key
        self.warped_key, self.output_ddf_key = warped_key, output_ddf_key
        self.ddf_units = ddf_units
        self.chunk_size = max(1, int(chunk_size))
        self.drop_originals = drop_originals

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in (self.fixed_key, self.moving_key, self.fixed_original_key, self.moving_original_key):
            if key not in d:
                raise KeyError(f"ResampleToFixedGridd needs {key!r} in the data (see the inference preprocessing).")
        ddf = _plain(d[self.ddf_key]).detach().float()
        device = ddf.device
        fixed_orig, moving_orig = d[self.fixed_original_key], d[self.moving_original_key]
        a_f = _affine(fixed_orig, self.fixed_original_key)
        a_m = _affine(moving_orig, self.moving_original_key)
        a_nf = _affine(d[self.fixed_key], self.fixed_key)
        a_nm = _affine(d[self.moving_key], self.moving_key)
        to_net = (torch.linalg.inv(a_nf) @ a_f).to(device)  # fixed voxel -> network fixed voxel
        net_to_moving = (torch.linalg.inv(a_m) @ a_nm).to(device)  # network moving voxel -> moving voxel
        net_to_fixed = (torch.linalg.inv(a_f) @ a_nm).to(device)  # network moving voxel -> fixed voxel
        moving_img = _plain(moving_orig).to(device=device, dtype=torch.float32)
        shape = tuple(int(s) for s in fixed_orig.shape[1:])
        if len(shape) != 3 or ddf.shape[0] != 3:
            raise ValueError(f"ResampleToFixedGridd supports 3D images, got fixed {shape} and ddf {tuple(ddf.shape)}.")
        warped = torch.empty((moving_img.shape[0], *shape), dtype=torch.float32, device=device)
        out_ddf = torch.empty((3, *shape), dtype=torch.float32, device=device)
        axes = [torch.arange(n, dtype=torch.float64, device=device) for n in shape]
        for start in range(0, shape[0], self.chunk_size):
            stop = min(shape[0], start + self.chunk_size)
            grid = torch.stack(torch.meshgrid(axes[0][start:stop], axes[1], axes[2], indexing="ij"), dim=0)
            p = _homogeneous(grid, to_net)
            q = p + _grid_sample_voxels(ddf, p.float()).double()
            warped[:, start:stop] = _grid_sample_voxels(moving_img, _homogeneous(q, net_to_moving).float())
            fixed_vox = _homogeneous(q, net_to_fixed)
            disp = fixed_vox - grid
            if self.ddf_units == "mm":
                disp = torch.einsum("ij,j...->i...", a_f[:3, :3].to(device), disp)
            out_ddf[:, start:stop] = disp.float()
        meta = dict(fixed_orig.meta) if isinstance(fixed_orig, MetaTensor) else {}
        for key in ("affine", "original_affine", "spatial_shape", "original_channel_dim"):
            meta.pop(key, None)
        pair_name = case_name(d, self.fixed_original_key, self.moving_original_key)
        meta["filename_or_obj"] = pair_name + ".nii.gz"
        d[self.warped_key] = MetaTensor(warped.cpu(), affine=a_f.clone(), meta=dict(meta))
        d[self.output_ddf_key] = MetaTensor(out_ddf.cpu(), affine=a_f.clone(), meta=dict(meta))
        if self.drop_originals:
            d.pop(self.fixed_original_key, None)
            d.pop(self.moving_original_key, None)
        return d
