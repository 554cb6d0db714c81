# Copyright (c) monai-gradicon contributors
# Licensed under the Apache License, Version 2.0
"""Automatic lung masks for chest CT (the input the GradICON lung model was trained with).

The released GradICON lung model saw lung-masked CT: ``clip(HU, -1000, 0)`` mapped to ``[0, 1]`` and multiplied by a
binary lung mask (``monai_gradicon.data.preprocessing.lung_ct_normalize``). :func:`lung_mask` builds such a mask from
a raw CT in Hounsfield units when the user has none.

Conventions: the CT is a :class:`monai_gradicon.io.Image`, a 3D array ``[*S]`` in the file's voxel order with a
``4 x 4`` voxel -> world RAS+ mm affine. The mask is a bool array ``[*S]`` on that same grid. Every size in this module
is physical (mm, cm^2, mL), computed from the affine, because chest CTs come with very different voxels
(0.57 x 0.57 x 5 mm and 0.98 x 0.98 x 2 mm in the project's test data).

``method="threshold"`` (ours, numpy + ``scipy.ndimage``), in this order:

1. **Checks**: 3D, finite, numbers in Hounsfield units (at least 1 % of the voxels air-like, at most -900 HU, and 1 %
   soft-tissue-like, -200..200 HU; no value outside ``[-4000, 40000]``), so an MR, a normalised image or stored values
   without the DICOM rescale fail fast with an error that names the image. Padding below -1024 HU (-2048, -3024 on
   some scanners) is air.
2. **Grids**: the voxel axis closest to world superior is the slice axis; the 2D steps work in the (axial) planes
   across it. Steps 3-8 run on a working grid of blocks of voxels averaged up to ``working_spacing_mm`` (2 mm) per
   axis: 3 x 3 x 1 blocks for 0.57 x 0.57 x 5 mm voxels, 2 x 2 x 1 for 0.98 x 0.98 x 2 mm, 2 x 2 x 2 for 0.7 mm
   isotropic. GradICON sees the lungs at about 2 mm (175^3 voxels), and this is 5-15 times faster than the CT's grid.
3. **Air** = ``HU < air_threshold_hu`` (default **-400 HU**). Aerated lung is -950..-700 HU, fat -120..-60 HU and
   soft tissue -100..100 HU; half-way between air (-1000) and water (0), -400 HU leaves a wide margin to both
   classes and puts the boundary where a voxel is about half lung and half tissue (pleura, vessel walls). The lung
   outline is sharp: -500 or -320 HU change the volume of the test CTs by -2 % and +1.6 % (Dice 0.99 to -400).
   Higher thresholds would let dense but normal lung (dependent parts, expiration, -600..-500 HU) in less and fat in
   more; lower ones cut more partial-volume voxels off the lung surface.
4. **Body** = the largest 3D connected (6-neighbour) non-air component, its holes filled slice by slice. Air outside
   it (room air, air in the table, cushions and clothes) is never lung.
5. **Air inside the body**, in 3D connected components with volumes in mL.
6. **Airways**: the trachea is found in the upper slices (100 mm) of the largest air component as a small
   (0.3-8 cm^2, at most 45 mm across), central (within 30 mm of the body's left-right centre) air section holding
   lumen-dark voxels (< -900 HU). From it, a 3D region grows through ``HU < T`` for ``T = -1000, -980, ...`` up to
   ``airway_max_threshold_hu``; it stops at the last ``T`` before a leak into the lung parenchyma (a rise of more
   than ``airway_leak_ml`` in one step or a total above ``airway_max_ml``; the parenchyma is one connected region,
   so a leak is a jump of litres): trachea, main bronchi and usually lobar bronchi, whose walls separate their lumen
   from the lung. That tree, widened by ``airway_margin_mm`` (its partial-volume rim), is removed from the air.
7. **Lungs**: components of what remains are kept when they are large (at least ``min_component_ml`` and
   ``min_component_fraction`` of the largest) and either touch the removed airway tree, or reach within
   ``apex_tolerance_mm`` of the top of the lungs with a median above -970 HU (parenchyma; pure gas has a median
   near -1000 HU). Stomach and bowel gas lie under the diaphragm, are not connected to the bronchi and are pure gas,
   so they fail all three. When the two lungs touch (thin anterior or posterior junction) they form one component;
   it is split at its narrowest link: the component is eroded by growing distances in mm until two cores of similar
   size lie on either side of the body's midline, and each voxel joins its nearest core.
8. **Vessels and nodules**: each kept lung is closed with a ball of ``closing_radius_mm`` (exact Euclidean distances
   in mm), the airway tree is taken out again (so the closing does not put the main bronchi back), and holes of up
   to ``max_hole_cm2`` are filled slice by slice, so vessels, airway walls and nodules surrounded by lung are
   included, as in the lung masks of the GradICON training data, but not an organ ringed by lung under a diaphragm
   dome.
9. **Back to the CT's grid**: a working voxel inside the lungs stays in the mask whole (vessels included); one on the
   in-plane boundary of the lungs keeps only its CT voxels below ``air_threshold_hu``, so the outline follows the
   CT's own voxels. The volume comes out about 1 % below a run on the CT's grid (``working_spacing_mm=0``; Dice 0.99
   between the two on the test CTs).

Limits of the threshold method: lungs filled by dense disease (consolidation, large effusions, collapse) are left
out where they are denser than ``air_threshold_hu``; a tumour touching the chest wall or the mediastinum is only
included as far as the closing reaches (about ``closing_radius_mm`` deep); a lung cut by the in-plane field of view
loses the part where its air touches the image edge; when the trachea cannot be found (a scan starting below the
carina, or a lumen no darker than the lung as in severe emphysema), the main bronchi may stay in the mask
(``details["airway"]["found"]`` is False, and a warning says so); a lung separated from the airways and from the
apex level (a lobe cut off by a complete fissure in a partial scan) is dropped.

External segmenters: ``method="lungmask"`` runs the U-Net R231 of the ``lungmask`` package (Hofmanninger et al.,
Eur Radiol Exp 2020) when it is installed; it downloads its weights on first use. ``method="auto"`` uses it when
the package is importable and the threshold method otherwise; ``result.method`` says which one ran.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monai_gradicon.io import Image

__all__ = [
    "DEFAULT_AIR_THRESHOLD_HU",
    "EXTERNAL_METHODS",
    "METHODS",
    "LungMaskError",
    "LungMaskResult",
    "LungMaskWarning",
    "check_ct_hounsfield",
    "lung_mask",
]

DEFAULT_AIR_THRESHOLD_HU = -400.0
"""Air / tissue boundary in HU: half-way between air (-1000) and water (0); see the module docstring."""

EXTERNAL_METHODS = ("lungmask",)
"""External segmenters :func:`lung_mask` can call when their package is importable."""

METHODS = ("auto", "threshold") + EXTERNAL_METHODS

_HU_AIR = -900.0  # at most this is air for the input checks and the airway lumen
_HU_TISSUE = (-200.0, 200.0)  # fat-free soft tissue, blood, muscle, for the input checks
_HU_LIMITS = (-4000.0, 40000.0)  # any CT (with padding and extended-scale metal) lies inside
_MIN_FRACTION = 0.01  # of the voxels, for each of the air and tissue classes
_AIRWAY_START_HU = -1000.0
_AIRWAY_STEP_HU = 20.0
_TRACHEA_AREA_CM2 = (0.3, 8.0)  # adult trachea: 13-27 mm across (1.3-5.7 cm^2), plus a margin both ways
_TRACHEA_MAX_OFFSET_MM = 30.0  # from the body's left-right centre
_TRACHEA_MAX_EXTENT_MM = 45.0  # in-plane bounding box side
_TRACHEA_SEARCH_MM = 100.0  # below the top of the largest air component
_GAS_MEDIAN_HU = -970.0  # pure gas (bowel, stomach, outside air) has a median near -1000 HU, lung parenchyma above


class LungMaskError(ValueError):
    """No lung mask can be made: the input is not a 3D CT in Hounsfield units, or no lung is found in it."""


class LungMaskWarning(UserWarning):
    """The mask was made but may be wrong in a known way (the trachea was not found, so it may be in the mask)."""


@dataclass
class LungMaskResult:
    """A lung mask and how it was made.

    Attributes:
        mask: bool ``[*S]`` on the CT's own grid (file voxel order), True inside the lungs (vessels and airways
            inside the lungs included, trachea and main bronchi excluded).
        volume_ml: the mask's volume in mL (voxel count times the voxel volume from the affine).
        components: lung components in the mask: 2 (right and left) for a chest CT, 1 when the lungs cannot be
            separated (or only one is present).
        method: ``"threshold"`` or the name of the external segmenter that ran (``"lungmask"``).
        details: JSON-serialisable description: parameters, thresholds, the airway tree removed (volume in mL,
            growth threshold), the components kept and dropped (volumes in mL, side), seconds.
    """

    mask: np.ndarray
    volume_ml: float
    components: int
    method: str
    details: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# input checks and geometry
# ----------------------------------------------------------------------------------------------------------------


def check_ct_hounsfield(ct: Image) -> np.ndarray:
    """Check that ``ct`` is a 3D CT in Hounsfield units and return its array ``[*S]`` (not copied).

    Raises:
        LungMaskError: not an :class:`Image`, not 3D, not numeric, not finite, values outside ``[-4000, 40000]``,
            or fewer than 1 % air-like (at most -900 HU) or soft-tissue-like (-200..200 HU) voxels: an MR, a
            normalised image, or stored values without the DICOM rescale.
    """
    if not isinstance(ct, Image):
        raise LungMaskError(f"lung_mask needs a monai_gradicon.io.Image (array + affine), got {type(ct).__name__}.")
    array = np.asarray(ct.array)
    what = ct.describe()
    if array.ndim != 3:
        raise LungMaskError(f"A lung mask needs a 3D CT; {what} has shape {array.shape} ({array.ndim}D).")
    if min(array.shape) < 3:
        raise LungMaskError(f"A lung mask needs at least 3 voxels along every axis; {what} has shape {array.shape}.")
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer)
                                        or np.issubdtype(array.dtype, np.floating)):
        raise LungMaskError(f"{what} holds {array.dtype} values; a CT holds Hounsfield units (integers or floats).")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise LungMaskError(f"{what} has {bad} non-finite voxels (NaN or inf); a CT must be finite everywhere.")
    lo, hi = float(array.min()), float(array.max())
    if lo < _HU_LIMITS[0] or hi > _HU_LIMITS[1]:
        raise LungMaskError(
            f"{what} has values {lo:g}..{hi:g}, outside any CT in Hounsfield units ({_HU_LIMITS[0]:g}.."
            f"{_HU_LIMITS[1]:g}). Convert it to HU (slope and intercept) first."
        )
    n = array.size
    air = np.count_nonzero(array <= _HU_AIR) / n
    tissue = np.count_nonzero((array >= _HU_TISSUE[0]) & (array <= _HU_TISSUE[1])) / n
    if air < _MIN_FRACTION or tissue < _MIN_FRACTION:
        raise LungMaskError(
            f"{what} does not look like a CT in Hounsfield units: {100 * air:.2f} % of its voxels are air-like "
            f"(<= {_HU_AIR:g} HU) and {100 * tissue:.2f} % soft-tissue-like ({_HU_TISSUE[0]:g}..{_HU_TISSUE[1]:g} "
            f"HU), at least {100 * _MIN_FRACTION:g} % of each expected (values {lo:g}..{hi:g}). An MR, a normalised "
            "image or raw stored values without the rescale intercept cannot be lung-masked by threshold."
        )
    return array


@dataclass(frozen=True)
class _Grid:
    """The CT in slice-last order: ``perm`` takes the file axes to (in-plane, in-plane, slice)."""

    perm: tuple[int, int, int]
    affine: np.ndarray  # 4 x 4 voxel (slice-last order) -> world RAS mm
    spacing: np.ndarray  # (3,) mm, slice-last order
    voxel_ml: float
    superior: int  # +1 when the slice index grows towards world superior, -1 otherwise

    def world(self, index: np.ndarray) -> np.ndarray:
        """World RAS mm ``(3,)`` of a voxel index ``(3,)`` (slice-last order, may be fractional)."""
        return self.affine[:3, :3] @ np.asarray(index, dtype=np.float64) + self.affine[:3, 3]

    def blocks(self, factors: tuple[int, int, int]) -> _Grid:
        """The grid of ``factors``-voxel blocks (block ``b`` covers voxels ``b * f .. b * f + f - 1`` per axis)."""
        f = np.asarray(factors, dtype=np.float64)
        affine = self.affine.copy()
        affine[:3, :3] = self.affine[:3, :3] * f
        affine[:3, 3] = self.affine[:3, :3] @ ((f - 1.0) / 2.0) + self.affine[:3, 3]
        return _Grid(perm=self.perm, affine=affine, spacing=self.spacing * f, voxel_ml=self.voxel_ml * float(f.prod()),
                     superior=self.superior)


def _grid(ct: Image) -> _Grid:
    linear = ct.affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    slice_axis = int(np.argmax(np.abs(linear[2]) / spacing))  # voxel axis closest to world superior
    perm = tuple([a for a in range(3) if a != slice_axis] + [slice_axis])
    affine = np.eye(4)
    affine[:3, :3] = linear[:, perm]
    affine[:3, 3] = ct.affine[:3, 3]
    return _Grid(
        perm=perm,  # type: ignore[arg-type]
        affine=affine,
        spacing=spacing[list(perm)],
        voxel_ml=float(abs(np.linalg.det(linear))) / 1000.0,
        superior=1 if affine[2, 2] >= 0 else -1,
    )


# ----------------------------------------------------------------------------------------------------------------
# morphology in physical units (all on slice-last [X, Y, Z] bool arrays)
# ----------------------------------------------------------------------------------------------------------------


def _ndi():
    try:
        from scipy import ndimage
    except ImportError as exc:  # pragma: no cover - scipy is a declared dependency of this module
        raise ImportError("monai_gradicon.lung_mask needs scipy (scipy.ndimage) for the threshold method.") from exc
    return ndimage


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected labels of a bool ``[X, Y, Z]`` mask (int32, 0 = background)."""
    labels, n = _ndi().label(mask)
    return labels, int(n)


def _in_plane_structure() -> np.ndarray:
    """``3 x 3 x 3`` structure linking 4-neighbours inside a slice ``[:, :, k]`` and nothing across slices."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[:, :, 1] = _ndi().generate_binary_structure(2, 1)
    return structure


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a bool ``[X, Y, Z]`` mask in each slice ``[:, :, k]`` (4-connected background)."""
    # one call for all slices: the padding slices are foreground, so only in-plane paths reach the border
    padded = np.pad(mask, ((0, 0), (0, 0), (1, 1)), constant_values=True)
    return _ndi().binary_fill_holes(padded, structure=_in_plane_structure())[:, :, 1:-1]


def _fill_small_holes(mask: np.ndarray, max_area_cm2: float, grid: _Grid) -> np.ndarray:
    """Fill the holes of each slice of a bool ``[X, Y, Z]`` mask whose area is at most ``max_area_cm2``."""
    holes = _fill_slices(mask) & ~mask
    if not holes.any():
        return mask.copy()
    labels, _ = _ndi().label(holes, structure=_in_plane_structure())
    area_cm2 = np.bincount(labels.ravel()) * (grid.spacing[0] * grid.spacing[1] / 100.0)
    small = area_cm2 <= max_area_cm2
    small[0] = False
    return mask | small[labels]


def _box(mask: np.ndarray, margin: np.ndarray | int = 0) -> tuple[slice, ...]:
    """Bounding box of a non-empty bool mask, widened by ``margin`` voxels per axis (clipped to the array)."""
    margin = np.broadcast_to(np.asarray(margin, dtype=int), (mask.ndim,))
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=other))
        box.append(slice(max(int(idx[0]) - margin[axis], 0), min(int(idx[-1]) + 1 + margin[axis], mask.shape[axis])))
    return tuple(box)


def _dilate_mm(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Voxels within ``radius_mm`` (Euclidean, world mm) of a bool ``[X, Y, Z]`` mask."""
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    box = _box(mask, np.ceil(radius_mm / spacing).astype(int) + 1)
    out[box] = _ndi().distance_transform_edt(~mask[box], sampling=spacing) <= radius_mm
    return out


def _close_mm(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological closing of a bool ``[X, Y, Z]`` mask with a ball of ``radius_mm`` (world mm).

    Exact Euclidean distances in mm on the anisotropic grid, computed on the mask's bounding box padded with
    background, so the closing only ever adds voxels (concavities narrower than the ball) to ``mask``.
    """
    ndi = _ndi()
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    pad = np.ceil(radius_mm / spacing).astype(int) + 1
    box = _box(mask)
    sub = np.pad(mask[box], [(int(p), int(p)) for p in pad])
    dilated = ndi.distance_transform_edt(~sub, sampling=spacing) <= radius_mm
    closed = ndi.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    inner = tuple(slice(int(p), int(p) + (b.stop - b.start)) for p, b in zip(pad, box))
    out = mask.copy()
    out[box] |= closed[inner]
    return out


# ----------------------------------------------------------------------------------------------------------------
# working grid
# ----------------------------------------------------------------------------------------------------------------


def _block_factors(spacing: np.ndarray, working_spacing_mm: float) -> tuple[int, int, int]:
    """Per-axis block sizes (voxels) giving voxels of at most ``working_spacing_mm`` (never below 1)."""
    if working_spacing_mm <= 0:
        return (1, 1, 1)
    return tuple(max(1, int(np.floor(working_spacing_mm / s + 1e-6))) for s in spacing)  # type: ignore[return-value]


def _block_mean(hu: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean HU over ``factors`` blocks of ``hu`` ``[X, Y, Z]`` (edge-replicated to whole blocks), float32."""
    if factors == (1, 1, 1):
        return hu
    padded = np.pad(hu, [(0, (-n) % f) for n, f in zip(hu.shape, factors)], mode="edge")
    (x, y, z), (fx, fy, fz) = padded.shape, factors
    blocks = padded.reshape(x // fx, fx, y // fy, fy, z // fz, fz)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _upsample(mask: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour inverse of :func:`_block_mean` for a bool mask: each block voxel to its ``factors`` voxels."""
    for axis, f in enumerate(factors):
        if f > 1:
            mask = np.repeat(mask, f, axis=axis)
    return mask[: shape[0], : shape[1], : shape[2]]


# ----------------------------------------------------------------------------------------------------------------
# the threshold pipeline
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Component:
    """One connected air component of the working grid."""

    volume_ml: float
    box: tuple[slice, ...]
    centroid_world: np.ndarray  # RAS mm
    top_mm: float  # world superior coordinate of its highest slice

    def describe(self) -> dict:
        return {"volume_ml": round(self.volume_ml, 1), "top_mm": round(self.top_mm, 1),
                "centroid_ras_mm": [round(float(v), 1) for v in self.centroid_world]}


def _centroid_index(mask: np.ndarray) -> np.ndarray:
    """Mean voxel index ``(3,)`` of a non-empty bool ``[X, Y, Z]`` mask (from its three projections)."""
    total = float(np.count_nonzero(mask))
    out = np.empty(3)
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = np.count_nonzero(mask, axis=other)
        out[axis] = float(np.dot(profile, np.arange(mask.shape[axis]))) / total
    return out


def _component(mask: np.ndarray, grid: _Grid) -> _Component:
    """Volume, box, centroid and top of a non-empty bool ``[X, Y, Z]`` mask."""
    box = _box(mask)
    k_top = box[2].stop - 1 if grid.superior > 0 else box[2].start
    offset = np.array([b.start for b in box], dtype=np.float64)
    return _Component(
        volume_ml=float(np.count_nonzero(mask[box]) * grid.voxel_ml),
        box=box,
        centroid_world=grid.world(_centroid_index(mask[box]) + offset),
        top_mm=float(grid.world(np.array([0.0, 0.0, k_top]))[2]),
    )


def _large_components(mask: np.ndarray, grid: _Grid, min_ml: float) -> list[np.ndarray]:
    """The 6-connected components of a bool ``[X, Y, Z]`` mask with at least ``min_ml`` mL, largest first."""
    labels, n = _label(mask)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    counts[0] = 0
    order = [int(i) for i in np.argsort(counts)[::-1] if counts[i] * grid.voxel_ml >= min_ml]
    return [labels == i for i in order]


def _body(air: np.ndarray, what: str) -> np.ndarray:
    """The largest non-air component of ``air`` (bool ``[X, Y, Z]``) with its slice-wise holes filled."""
    labels, n = _label(~air)
    if n == 0:
        raise LungMaskError(f"{what} has no voxel above the air threshold: no body to find lungs in.")
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return _fill_slices(labels == int(np.argmax(counts)))


def _find_trachea_seed(
    candidate: np.ndarray, hu: np.ndarray, body: np.ndarray, grid: _Grid
) -> tuple[np.ndarray, dict] | None:
    """A 2D section of the trachea in the upper slices of ``candidate`` (bool ``[X, Y, Z]``), or None.

    Returns the seed (bool ``[X, Y, Z]``, one slice) and a description. Criteria: area 0.3-8 cm^2, in-plane extent
    at most 45 mm, centroid within 30 mm (world left-right) of the body's centre in that slice, holding voxels of at
    most -900 HU; slices scanned from the top of ``candidate`` down over 100 mm, the first slice with a section wins
    (the most central section when several qualify).
    """
    ndi = _ndi()
    box = _box(candidate)
    ks = np.arange(box[2].start, box[2].stop)
    if grid.superior > 0:
        ks = ks[::-1]
    top_mm = grid.world(np.array([0.0, 0.0, ks[0]]))[2]
    pixel_cm2 = grid.spacing[0] * grid.spacing[1] / 100.0
    for k in ks:
        if abs(grid.world(np.array([0.0, 0.0, k]))[2] - top_mm) > _TRACHEA_SEARCH_MM:
            break
        sections, n = ndi.label(candidate[:, :, k])
        if n == 0:
            continue
        body_ij = np.argwhere(body[:, :, k]).mean(axis=0)
        body_x = grid.world(np.array([body_ij[0], body_ij[1], k]))[0]
        best = None
        for s, sl in enumerate(ndi.find_objects(sections), start=1):
            section = sections[sl] == s
            area = float(np.count_nonzero(section) * pixel_cm2)
            extent = max((sl[0].stop - sl[0].start) * grid.spacing[0], (sl[1].stop - sl[1].start) * grid.spacing[1])
            if not (_TRACHEA_AREA_CM2[0] <= area <= _TRACHEA_AREA_CM2[1]) or extent > _TRACHEA_MAX_EXTENT_MM:
                continue
            if hu[sl[0], sl[1], k][section].min() > _HU_AIR:
                continue
            ij = np.argwhere(section).mean(axis=0) + [sl[0].start, sl[1].start]
            offset = abs(grid.world(np.array([ij[0], ij[1], k]))[0] - body_x)
            if offset <= _TRACHEA_MAX_OFFSET_MM and (best is None or offset < best[0]):
                best = (offset, s, area)
        if best is not None:
            seed = np.zeros_like(candidate)
            seed[:, :, k] = sections == best[1]
            return seed, {"slice": int(k), "area_cm2": round(best[2], 2), "offset_mm": round(float(best[0]), 1)}
    return None


def _grow_airway(
    seed: np.ndarray,
    hu: np.ndarray,
    region: np.ndarray,
    grid: _Grid,
    max_threshold_hu: float,
    leak_ml: float,
    max_ml: float,
) -> tuple[np.ndarray, dict]:
    """Grow the airway tree from ``seed`` through ``HU < T`` inside ``region`` (bool ``[X, Y, Z]``).

    ``T`` rises from -1000 HU in steps of 20 HU up to ``max_threshold_hu``; the result is the region of the last
    ``T`` before a leak (volume jump above ``leak_ml`` or total above ``max_ml``, in mL). Returns the tree (bool
    ``[X, Y, Z]``, possibly empty) and a description with the volumes tried.
    """
    box = _box(region, 1)
    hu_b, region_b, seed_b = hu[box], region[box], seed[box]
    best = np.zeros(region_b.shape, dtype=bool)
    best_t, previous, leaked, tried = None, 0.0, None, []
    t = _AIRWAY_START_HU
    while t <= max_threshold_hu + 1e-6:
        lumen = region_b & (hu_b < t)
        labels, _ = _label(lumen)
        ids = np.unique(labels[seed_b & lumen])
        ids = ids[ids > 0]
        tree = np.isin(labels, ids) if ids.size else np.zeros_like(lumen)
        volume = float(np.count_nonzero(tree) * grid.voxel_ml)
        tried.append([t, round(volume, 2)])
        if volume - previous > leak_ml or volume > max_ml:
            leaked = t
            break
        best, best_t, previous = tree, t, volume
        t += _AIRWAY_STEP_HU
    out = np.zeros_like(region)
    out[box] = best
    info = {
        "threshold_hu": best_t,
        "leak_threshold_hu": leaked,
        "volume_ml": round(previous, 2),
        "growth_ml_by_threshold": tried,
    }
    return out, info


def _split_lungs(
    component: np.ndarray, grid: _Grid, midline_x: float, max_erosion_mm: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """Split one component holding both lungs (bool ``[X, Y, Z]``) into two, or None.

    The component is eroded by growing distances (1 mm steps up to ``max_erosion_mm``, Euclidean in mm) until its
    two largest cores lie on opposite sides of ``midline_x`` (world RAS x, mm) and the smaller holds at least a
    quarter of their sum; every voxel then joins its nearest core. The thin anterior or posterior junction between
    the lungs is the first link to break.
    """
    ndi = _ndi()
    box = _box(component, 1)
    sub = component[box]
    depth = ndi.distance_transform_edt(np.pad(sub, 1), sampling=grid.spacing)[1:-1, 1:-1, 1:-1]
    offset = np.array([b.start for b in box], dtype=np.float64)
    for r in np.arange(1.0, max_erosion_mm + 0.5, 1.0):
        labels, n = _label(depth > r)
        if n == 0:
            return None
        if n < 2:
            continue
        counts = np.bincount(labels.ravel())
        counts[0] = 0
        a, b = (int(i) for i in np.argsort(counts)[::-1][:2])
        if counts[b] < 0.25 * (counts[a] + counts[b]):
            continue
        xs = [grid.world(_centroid_index(labels == i) + offset)[0] - midline_x for i in (a, b)]
        if xs[0] * xs[1] >= 0:
            continue
        cores = np.where(labels == a, 1, np.where(labels == b, 2, 0))
        nearest = ndi.distance_transform_edt(cores == 0, sampling=grid.spacing, return_distances=False,
                                             return_indices=True)
        owner = cores[tuple(nearest)]
        halves = []
        for lab in (1, 2):
            half = np.zeros_like(component)
            half[box] = sub & (owner == lab)
            halves.append(half)
        return halves[0], halves[1]
    return None


def _threshold_lung_mask(
    ct: Image,
    hu_file: np.ndarray,
    *,
    air_threshold_hu: float,
    working_spacing_mm: float,
    min_component_ml: float,
    min_component_fraction: float,
    apex_tolerance_mm: float,
    airway_max_threshold_hu: float,
    airway_leak_ml: float,
    airway_max_ml: float,
    airway_margin_mm: float,
    closing_radius_mm: float,
    max_hole_cm2: float,
    max_split_erosion_mm: float,
) -> tuple[np.ndarray, int, dict]:
    """The threshold pipeline of the module docstring: (mask bool ``[*S]`` file order, components, details)."""
    what = ct.describe()
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    full = _grid(ct)
    hu_full = np.transpose(hu_file, full.perm)  # [X, Y, Z] slice-last view
    factors = _block_factors(full.spacing, working_spacing_mm)
    hu = _block_mean(hu_full, factors)
    grid = full.blocks(factors)
    lap("working_grid_s")

    air = hu < air_threshold_hu
    body = _body(air, what)
    inside = air & body
    lap("body_s")

    regions = _large_components(inside, grid, min_component_ml)
    if not regions:
        raise LungMaskError(
            f"No lung found in {what}: no air region inside the body reaches {min_component_ml:g} mL at "
            f"{air_threshold_hu:g} HU (is it a chest CT in Hounsfield units?)."
        )
    lap("components_s")

    # -- airways, grown from the trachea inside the largest air region
    airway = np.zeros_like(inside)
    airway_info: dict[str, Any] = {"found": False}
    found = _find_trachea_seed(regions[0], hu, body, grid)
    if found is not None:
        seed, seed_info = found
        tree, grow_info = _grow_airway(
            seed, hu, regions[0], grid, airway_max_threshold_hu, airway_leak_ml, airway_max_ml
        )
        airway_info = {"found": bool(tree.any()), "seed": seed_info, **grow_info}
        if tree.any():
            margin = max(airway_margin_mm, float(grid.spacing[:2].max()))  # at least one in-plane voxel
            airway = _dilate_mm(tree, margin, grid.spacing) & inside
            airway_info["removed_ml"] = round(float(np.count_nonzero(airway) * grid.voxel_ml), 2)
    if not airway_info["found"]:
        warnings.warn(
            f"lung_mask: the trachea was not found in {what}; the trachea and main bronchi may remain in the "
            "lung mask.",
            LungMaskWarning,
            stacklevel=3,
        )
    lap("airway_s")

    # -- lungs: large air regions (the largest without its airways) that reach the apex or touch the bronchi
    parts = _large_components(regions[0] & ~airway, grid, min_component_ml) + regions[1:]
    if not parts:
        raise LungMaskError(f"No lung found in {what}: the only large air region inside the body is an airway.")
    comps = [_component(p, grid) for p in parts]
    order = np.argsort([-c.volume_ml for c in comps])
    parts, comps = [parts[i] for i in order], [comps[i] for i in order]
    near_airway = _dilate_mm(airway, 2.0 * float(grid.spacing.max()), grid.spacing) if airway.any() else None
    large = [c.volume_ml >= max(min_component_ml, min_component_fraction * comps[0].volume_ml) for c in comps]
    medians = [float(np.median(hu[c.box][p[c.box]])) for p, c in zip(parts, comps)]
    touches = [near_airway is not None and bool(np.any(p[c.box] & near_airway[c.box])) for p, c in zip(parts, comps)]
    # the top of the lungs: the highest large parenchyma-like region (air in the neck or an unconnected trachea is
    # pure gas and does not count)
    tops = [c.top_mm for c, big, med in zip(comps, large, medians) if big and med > _GAS_MEDIAN_HU]
    lung_top = max(tops) if tops else max(c.top_mm for c in comps)
    kept: list[tuple[np.ndarray, dict]] = []
    dropped: list[dict] = []
    for part, comp, big, median_hu, touching in zip(parts, comps, large, medians, touches):
        high = comp.top_mm >= lung_top - apex_tolerance_mm
        entry = {**comp.describe(), "median_hu": round(median_hu, 1), "reaches_apex": bool(high),
                 "touches_airway": bool(touching)}
        if big and ((high and median_hu > _GAS_MEDIAN_HU) or touching):
            kept.append((part, entry))
        else:
            dropped.append(entry)
    if not kept:
        found_regions = "; ".join(f"{e['volume_ml']:g} mL, median {e['median_hu']:g} HU" for e in dropped[:5])
        raise LungMaskError(
            f"No lung found in {what}: the air regions inside the body ({found_regions}) are gas pockets (median "
            f"at most {_GAS_MEDIAN_HU:g} HU, no lung parenchyma) or too small; is the chest in the field of view?"
        )
    lap("select_s")

    # -- two lungs in one region: split it at its narrowest link
    body_ij = _centroid_index(body)
    midline_x = float(grid.world(body_ij)[0])
    split = False
    if len(kept) == 1:
        halves = _split_lungs(kept[0][0], grid, midline_x, max_split_erosion_mm)
        if halves is not None:
            entry = kept[0][1]
            kept = [(half, {**entry, **_component(half, grid).describe(), "split_from_ml": entry["volume_ml"]})
                    for half in halves]
            split = True
    for _, entry in kept:
        entry["side"] = "right" if entry["centroid_ras_mm"][0] > midline_x else "left"
    lap("split_s")

    # -- vessels and nodules: per-lung closing, airways out again, small slice-wise holes filled
    lungs = np.zeros_like(inside)
    for part, _ in kept:
        lungs |= _close_mm(part, closing_radius_mm, grid.spacing)
    lungs &= body & ~airway
    lungs = _fill_small_holes(lungs, max_hole_cm2, grid) & body
    lap("close_fill_s")

    # -- back to the CT's grid: block voxels on the in-plane lung boundary keep only their air voxels
    if factors != (1, 1, 1) and lungs.any():
        interior = _ndi().binary_erosion(lungs, structure=_in_plane_structure())
        box = _box(lungs)
        box_full = tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(box, factors, hu_full.shape))
        shape = tuple(b.stop - b.start for b in box_full)
        mask = np.zeros(hu_full.shape, dtype=bool)
        mask[box_full] = _upsample(lungs[box], factors, shape) & (
            (hu_full[box_full] < air_threshold_hu) | _upsample(interior[box], factors, shape)
        )
    else:
        mask = lungs
    if not mask.any():
        raise LungMaskError(f"No lung found in {what}: the lung regions hold no voxel below {air_threshold_hu:g} HU.")
    lap("full_resolution_s")

    details = {
        "air_threshold_hu": air_threshold_hu,
        "slice_axis": int(full.perm[2]),
        "spacing_mm": [round(float(s), 4) for s in ct.spacing],
        "working_block": [int(f) for f in np.asarray(factors)[np.argsort(full.perm)]],
        "working_spacing_mm": [round(float(s), 4) for s in grid.spacing[np.argsort(full.perm)]],
        "body_ml": round(float(np.count_nonzero(body) * grid.voxel_ml), 1),
        "airway": airway_info,
        "lungs_split": split,
        "kept": [entry for _, entry in kept],
        "dropped": dropped[:20],
        "dropped_count": len(dropped),
        "seconds": timings,
    }
    return np.transpose(mask, np.argsort(full.perm)), len(kept), details


# ----------------------------------------------------------------------------------------------------------------
# external segmenters
# ----------------------------------------------------------------------------------------------------------------


def _external_available(name: str) -> bool:
    """Whether the package ``name`` can be imported (already imported, or found on the path)."""
    if sys.modules.get(name) is not None:
        return True
    return importlib.util.find_spec(name) is not None


def _lungmask_segment(ct: Image, hu: np.ndarray) -> np.ndarray:
    """Run ``lungmask``'s default U-Net (R231) and return its labels ``[*S]`` (file order; 0 background, 1 right
    lung, 2 left lung).

    ``lungmask`` reads a numpy volume as ``[z, y, x]`` in LPS orientation (slices towards superior, rows towards
    posterior, columns towards the patient's left), so the array is reoriented with the affine first and back after.
    """
    import nibabel.orientations as nio

    try:
        from lungmask import LMInferer
    except Exception as exc:  # an old lungmask without LMInferer, or a missing dependency of it
        raise LungMaskError(
            f"The lungmask package cannot be used ({type(exc).__name__}: {exc}); lungmask >= 0.2.14 provides "
            "LMInferer. Pass method='threshold' to use the built-in method."
        ) from exc
    current = nio.io_orientation(ct.affine)
    lps = nio.axcodes2ornt(("L", "P", "S"))
    volume = nio.apply_orientation(hu, nio.ornt_transform(current, lps))  # [x, y, z] towards L, P, S
    volume = np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))  # [z, y, x]
    try:
        labels = np.asarray(LMInferer(tqdm_disable=True).apply(volume))
    except Exception as exc:
        raise LungMaskError(
            f"The lungmask segmenter failed on {ct.describe()}: {type(exc).__name__}: {exc}. It downloads its "
            "weights on first use; offline, pass method='threshold'."
        ) from exc
    if labels.shape != volume.shape:
        raise LungMaskError(
            f"lungmask returned a segmentation of shape {labels.shape} for a [z, y, x] volume of shape "
            f"{volume.shape}."
        )
    return nio.apply_orientation(np.transpose(labels, (2, 1, 0)), nio.ornt_transform(lps, current))


def _external_lung_mask(name: str, ct: Image, hu: np.ndarray) -> tuple[np.ndarray, int, dict]:
    """(mask bool ``[*S]`` file order, components, details) from the external segmenter ``name``."""
    if name != "lungmask":  # pragma: no cover - guarded by METHODS
        raise LungMaskError(f"Unknown external segmenter {name!r}.")
    labels = _lungmask_segment(ct, hu)
    mask = labels > 0
    values = [int(v) for v in np.unique(labels) if v > 0]
    voxel_ml = float(abs(np.linalg.det(ct.affine[:3, :3]))) / 1000.0
    details = {
        "labels": values,
        "label_volumes_ml": {str(v): round(float(np.count_nonzero(labels == v) * voxel_ml), 1) for v in values},
    }
    return mask, len(values), details


# ----------------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------------


def lung_mask(
    ct: Image,
    *,
    method: str = "auto",
    air_threshold_hu: float = DEFAULT_AIR_THRESHOLD_HU,
    working_spacing_mm: float = 2.0,
    min_component_ml: float = 20.0,
    min_component_fraction: float = 0.05,
    apex_tolerance_mm: float = 40.0,
    airway_max_threshold_hu: float = -700.0,
    airway_leak_ml: float = 100.0,
    airway_max_ml: float = 300.0,
    airway_margin_mm: float = 2.0,
    closing_radius_mm: float = 5.0,
    max_hole_cm2: float = 15.0,
    max_split_erosion_mm: float = 8.0,
) -> LungMaskResult:
    """A binary lung mask of a chest CT in Hounsfield units, on the CT's own grid.

    Args:
        ct: 3D CT, array ``[*S]`` in HU (file voxel order) with its voxel -> world RAS mm affine.
        method: ``"threshold"`` (ours, see the module docstring), ``"lungmask"`` (external U-Net, needs the
            package and its weights), or ``"auto"``: ``"lungmask"`` when importable, else ``"threshold"``.
        air_threshold_hu: air / tissue boundary in HU (-400: half-way between air and water, the boundary of
            aerated lung). Lower values (-500) exclude more partial-volume voxels at the pleura and around vessels.
        working_spacing_mm: the detection steps run on blocks of the CT's voxels averaged up to this size (mm) per
            axis (the network sees the lungs at about 2 mm anyway); the mask boundary is then drawn on the CT's own
            voxels. 0 runs everything on the CT's grid (several times slower).
        min_component_ml: air components smaller than this (mL) are never lung (gas pockets, airway fragments).
        min_component_fraction: a lung component holds at least this fraction of the largest component's volume.
        apex_tolerance_mm: a lung component reaches within this distance (mm, world superior) of the highest lung
            component, unless it touches the airway tree; stomach and bowel gas lie below the diaphragm.
        airway_max_threshold_hu: the airway growth never goes above this threshold (HU, below
            ``air_threshold_hu``).
        airway_leak_ml: a rise of the airway volume of more than this (mL) in one 20 HU step is a leak into the lung.
        airway_max_ml: an airway tree above this volume (mL) is a leak (adult trachea + bronchi: 30-150 mL).
        airway_margin_mm: the airway tree is widened by this distance (mm; at least one in-plane working voxel)
            before it is removed, to take its partial-volume rim with it.
        closing_radius_mm: radius (mm) of the ball closing each lung, to include vessels and nodules on its
            boundary; 0 for none.
        max_hole_cm2: holes surrounded by lung in an axial slice are filled up to this area (cm^2; 15 cm^2 is a
            disc of 44 mm: vessels, airways, nodules and masses), larger ones (an organ under a diaphragm dome
            ringed by lung) are not.
        max_split_erosion_mm: how deep (mm) the erosion that separates touching lungs may go.

    Returns:
        :class:`LungMaskResult` with a bool mask ``[*S]`` on the CT's grid (file voxel order), never empty.

    Raises:
        LungMaskError: the input is not a 3D, finite CT in HU, no lung is found (for example a brain MR passed by
            mistake), an unknown ``method`` or a parameter out of range, or the external segmenter failed or found
            nothing.
    """
    if method not in METHODS:
        raise LungMaskError(f"Unknown lung mask method {method!r}; choose one of {', '.join(METHODS)}.")
    if not -900.0 <= air_threshold_hu <= -100.0:
        raise LungMaskError(f"air_threshold_hu={air_threshold_hu:g} is not an air / tissue boundary (-900..-100 HU).")
    if not _AIRWAY_START_HU <= airway_max_threshold_hu < air_threshold_hu:
        raise LungMaskError(
            f"airway_max_threshold_hu={airway_max_threshold_hu:g} must lie in [{_AIRWAY_START_HU:g}, "
            f"air_threshold_hu={air_threshold_hu:g})."
        )
    parameters = {
        "working_spacing_mm": working_spacing_mm,
        "min_component_ml": min_component_ml,
        "min_component_fraction": min_component_fraction,
        "apex_tolerance_mm": apex_tolerance_mm,
        "airway_max_threshold_hu": airway_max_threshold_hu,
        "airway_leak_ml": airway_leak_ml,
        "airway_max_ml": airway_max_ml,
        "airway_margin_mm": airway_margin_mm,
        "closing_radius_mm": closing_radius_mm,
        "max_hole_cm2": max_hole_cm2,
        "max_split_erosion_mm": max_split_erosion_mm,
    }
    positive = ("min_component_ml", "apex_tolerance_mm", "airway_leak_ml", "airway_max_ml", "max_hole_cm2")
    for name, value in parameters.items():
        if name == "airway_max_threshold_hu":
            continue
        if not np.isfinite(value) or value < 0 or (name in positive and value == 0):
            raise LungMaskError(f"{name}={value!r} must be {'positive' if name in positive else 'zero or positive'}.")
    if not min_component_fraction < 1:
        raise LungMaskError(f"min_component_fraction={min_component_fraction:g} must lie in [0, 1).")

    start = time.perf_counter()
    hu = check_ct_hounsfield(ct)
    chosen = method
    if method == "auto":
        chosen = next((m for m in EXTERNAL_METHODS if _external_available(m)), "threshold")
    if chosen == "threshold":
        mask, components, details = _threshold_lung_mask(ct, hu, air_threshold_hu=air_threshold_hu, **parameters)
        details["parameters"] = {k: float(v) for k, v in parameters.items()}
    else:
        if not _external_available(chosen):
            raise LungMaskError(f"method={chosen!r} needs the {chosen!r} package, which is not installed.")
        mask, components, details = _external_lung_mask(chosen, ct, hu)
        if not mask.any():
            raise LungMaskError(f"The {chosen} segmenter found no lung in {ct.describe()}.")
    voxel_ml = float(abs(np.linalg.det(ct.affine[:3, :3]))) / 1000.0
    details["requested_method"] = method
    details["total_seconds"] = round(time.perf_counter() - start, 3)
    return LungMaskResult(
        mask=np.ascontiguousarray(mask, dtype=bool),
        volume_ml=float(np.count_nonzero(mask) * voxel_ml),
        components=int(components),
        method=chosen,
        details=details,
    )
