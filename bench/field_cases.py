"""Cases for the field-optimization benchmarks: real anatomy, with a known deformation or with masks.

Cases (``CASES``; built by :func:`make_case`):

* ``popi-breathing`` (:func:`breathing_case`, described below): POPI phase-00 CT, a known exhale-like deformation,
  TRE at lung landmarks.
* ``mni-synthetic`` (:func:`mni_synthetic_case`): the MNI152 2009a T1 on the case grid, pulled through a known smooth
  inter-subject-like displacement (two Gaussian-filtered random scales, largest magnitude ``amplitude_mm`` = 7 mm
  inside the brain), TRE at landmarks inside the brain (GM + WM probability > 0.5, eroded by 2 voxels).
* ``mni-colin`` (:func:`mni_colin_case`): MNI152 2009a T1 (fixed) and Colin27 ``ch2bet`` (moving), both
  skull-stripped, resampled into the MNI file's field of view (both files are in MNI world coordinates); brain masks
  for Dice: the non-zero region of each (largest component, holes filled). With skull-stripped images this Dice
  measures how well the brain outline is matched, not the inner structures; no known truth.
* ``lung-pair`` (:func:`lung_pair_case`): pyradiomics ``lung1`` (fixed) and ``lung2`` (moving), two patients, each
  resampled into one box (the larger field of view per axis) centred on its own lung-mask centroid (the only
  pre-alignment), lung window; lung masks from ``monai_gradicon.lung_mask.lung_mask(method="threshold")`` on each
  CT's own grid, resampled like the image, for Dice; no known truth.
* ``mni-shift`` (:func:`shift_case`): the MNI T1 moved by a constant shift of (3, -2, 1) voxels along array axes
  (0, 1, 2): the convention check (a method whose maps are converted correctly recovers it with TRE near 0).

Brain MR intensities are divided by the 99th percentile of the head (voxels above 5 % of the maximum) and clipped to
[0, 1]; CT is lung-windowed (HU [-1000, 0] -> [0, 1]). The brain and lung-pair cases use a *box grid*
(:func:`resample_box`): ``n`` cells per axis over an axis-aligned world box, array axes (0, 1, 2) = world RAS
(z, y, x) increasing, cell centres as ``F.interpolate(..., align_corners=False)`` places them (so a box equal to a
file's field of view gives the pipeline's resize), trilinear, outside the scanned volume: 0 (MR) or -1024 HU (CT).

The POPI breathing case:

Everything lives on the *network grid* (the CT resized to ``n = (175, 175, 175)`` as the registration pipeline does:
axes reversed to the reference's (k, j, i) order, trilinear ``F.interpolate`` with ``align_corners=False``). One
network voxel along array axis ``k`` is ``spacing_mm[k] = s_k * N_k / n_k`` millimetres of the original scan
(POPI phase 00: 2.0 mm x 141 slices, 0.977 mm x 512 in plane -> 1.611 mm along axis 0 (S-I), 2.857 mm along axes 1
(A-P) and 2 (L-R) at 175³).

The case (see :func:`breathing_case`):

* fixed ``B``: the lung-windowed CT, HU clipped to [-1000, 0] and mapped to [0, 1] (no lung mask: the pipeline's
  mask multiplication is left out so that the chest wall and the diaphragm stay visible to every method);
* a smooth displacement ``d`` (voxels of the network grid, ``[1, 3, *n]``) that moves the lower lungs
  superiorly and the anterior chest wall posteriorly (exhale-like, ~16 mm at most, 15 mm S-I amplitude by default),
  plus a weak smooth random part;
* moving ``A = B o Psi`` with ``Psi(x) = x + d(x)`` (``A(x) = B(x + d(x))``, trilinear), so that the true maps are
  ``Phi_BA = Psi`` (moving -> fixed) and ``Phi_AB = Psi^-1`` (fixed -> moving);
* landmarks: ``count`` random voxels inside the lungs of ``B`` (HU < -500, the two largest connected components that
  do not touch the in-plane border, eroded by 2 voxels), and their images ``Psi^-1(p)`` in ``A`` (fixed-point iteration, to 1e-4 voxels).

The files under ``../shared/data`` (``--data``) are read-only inputs; nothing is written next to them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from monai_gradicon.maps import identity_map, sample

__all__ = [
    "CASES",
    "DEFAULT_DATA",
    "BreathingCase",
    "Case",
    "breathing_case",
    "breathing_displacement",
    "dice",
    "invert_points",
    "load_popi_network_grid",
    "lung_mask",
    "lung_pair_case",
    "make_case",
    "mni_colin_case",
    "mni_synthetic_case",
    "resample_box",
    "shift_case",
    "tre_mm",
]

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
POPI = os.path.join("lung_ct_popi_phase00", "popi_phase00_ct.nii.gz")


@dataclass
class Case:
    """A registration case on one grid (all tensors float32 / bool, CPU). ``None`` where a case has no such thing.

    Attributes:
        moving, fixed: ``[1, 1, *n]`` images in [0, 1] (A and B).
        spacing_mm: mm per grid voxel along each array axis.
        name: the case's name (``CASES``).
        displacement: ``[1, 3, *n]`` the true ``d`` in voxels (synthetic cases); ``Phi_BA = x + d(x)``.
        hu: ``[*n]`` the fixed image in Hounsfield units before windowing (POPI).
        lungs: ``[*n]`` bool lung mask of the fixed image (POPI).
        points_fixed: ``[P, 3]`` landmark voxels (float) in B (synthetic cases).
        points_moving: ``[P, 3]`` the same anatomical points in A (``Psi^-1(points_fixed)``).
        mask_fixed, mask_moving: ``[*n]`` bool masks of one structure in B and A, for Dice (pair cases).
        mask_name: what the masks are.
        info: JSON-able description (files, box, amplitude, ...).
    """

    moving: torch.Tensor
    fixed: torch.Tensor
    spacing_mm: tuple[float, ...]
    name: str = "popi-breathing"
    displacement: torch.Tensor | None = None
    hu: torch.Tensor | None = None
    lungs: torch.Tensor | None = None
    points_fixed: torch.Tensor | None = None
    points_moving: torch.Tensor | None = None
    mask_fixed: torch.Tensor | None = None
    mask_moving: torch.Tensor | None = None
    mask_name: str = ""
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.fixed.shape[2:])

    @property
    def has_truth(self) -> bool:
        return self.displacement is not None

    @property
    def has_masks(self) -> bool:
        return self.mask_fixed is not None

    def save(self, path: str) -> None:
        torch.save(dict(self.__dict__), path)

    @classmethod
    def load(cls, path: str) -> Case:
        return cls(**torch.load(path, weights_only=False))


BreathingCase = Case  # the name of the first (and for a while only) case


def load_popi_network_grid(data_dir: str, shape: tuple[int, int, int]) -> tuple[torch.Tensor, tuple[float, ...]]:
    """POPI phase 00 in HU resized to ``shape`` (reference axis order (k, j, i)) and the mm per network voxel."""
    import nibabel as nib

    path = os.path.join(data_dir, POPI)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"POPI CT not found at {path} (see ../shared/data/README.md).")
    img = nib.load(path)
    array = np.asarray(img.dataobj, dtype=np.float32)  # (i, j, k)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    array = np.ascontiguousarray(array.transpose(2, 1, 0))  # (k, j, i) as the reference orders axes
    zooms = zooms[::-1]
    hu = F.interpolate(torch.from_numpy(array)[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    spacing = tuple(z * n_orig / n for z, n_orig, n in zip(zooms, array.shape, shape))
    return hu, spacing


def lung_mask(hu: torch.Tensor, erode: int = 0) -> torch.Tensor:
    """Lungs of a chest CT ``[*n]`` (axis 0 = S-I) in HU: the largest air (< -500 HU) components that do not touch
    the in-plane borders (outside air), holes filled, optionally eroded by ``erode`` voxels."""
    from scipy import ndimage

    air = hu.numpy() < -500
    labels, count = ndimage.label(air)
    # outside air touches the in-plane borders; the trachea may reach the first or last slice, so those do not count
    border = np.unique(np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(),
                                       labels[:, :, -1].ravel()]))
    sizes = ndimage.sum(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    keep = np.zeros(count + 1, dtype=bool)
    order = np.argsort(sizes)[::-1] + 1
    inside = [lab for lab in order if lab not in border and sizes[lab - 1] > 0.001 * air.size]
    for lab in inside[:2]:  # the two lungs (or one connected pair)
        keep[lab] = True
    mask = keep[labels]
    if not mask.any():
        raise ValueError("No lung found (no air component away from the volume border).")
    mask = ndimage.binary_fill_holes(mask)
    if erode:
        mask = ndimage.binary_erosion(mask, iterations=erode)
    return torch.from_numpy(mask)


def _smooth_noise(shape: tuple[int, ...], sigma: float, generator: torch.Generator) -> torch.Tensor:
    from monai_gradicon.losses.similarity import gaussian_blur

    noise = torch.randn((1, len(shape), *shape), generator=generator)
    smooth = gaussian_blur(noise, sigma)
    return smooth / smooth.abs().amax(dim=tuple(range(2, smooth.ndim)), keepdim=True)


def breathing_displacement(lungs: torch.Tensor, spacing_mm: tuple[float, ...], amplitude_mm: float = 15.0,
                           seed: int = 0) -> torch.Tensor:
    """A smooth exhale-like displacement ``[1, 3, *n]`` in voxels of the network grid.

    Axis 0 is superior-inferior (index grows superiorly), axis 1 anterior-posterior (grows posteriorly), axis 2
    left-right. ``Psi(x) = x + d(x)`` is the moving -> fixed map, so ``A(x) = B(x + d(x))``: the moving image shows
    the anatomy at ``x + d``. The pattern: a broad bump centred on the lower third of the lungs, ``amplitude_mm``
    along S-I (the diaphragm region), 40 % of it along A-P on the anterior side, plus a random smooth field of
    1.5 mm (Gaussian-filtered noise, sigma 12 voxels). It is invertible (det J > 0, checked by the caller).
    """
    n = tuple(lungs.shape)
    idx = torch.nonzero(lungs).float()
    lo, hi = idx.min(0).values, idx.max(0).values
    centre = idx.mean(0)
    centre[0] = lo[0] + 0.3 * (hi[0] - lo[0])  # lower third (axis 0 grows superiorly)
    extent = (hi - lo).clamp_min(8.0)
    grid = identity_map(n)[0] * torch.tensor([s - 1 for s in n], dtype=torch.float32).view(3, 1, 1, 1)
    r2 = sum(((grid[k] - centre[k]) / (0.55 * extent[k])) ** 2 for k in range(3))
    bump = torch.exp(-r2)
    anterior = torch.sigmoid((centre[1] - grid[1]) / (0.15 * extent[1]))  # 1 on the anterior side (small index)
    d = torch.zeros((1, 3, *n))
    d[0, 0] = amplitude_mm / spacing_mm[0] * bump
    d[0, 1] = 0.4 * amplitude_mm / spacing_mm[1] * bump * anterior
    gen = torch.Generator().manual_seed(seed)
    noise = _smooth_noise(n, 12.0 * min(n) / 175.0, gen)
    d = d + 1.5 * noise / torch.tensor(spacing_mm, dtype=torch.float32).view(1, 3, 1, 1, 1)
    return d


def _to_normalized(points_vox: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``[P, dim]`` voxels -> ``[1, dim, P, 1, ...]`` normalized coordinates (a point set with as many axes as the
    grid, which ``grid_sample`` needs)."""
    scale = torch.tensor([s - 1 for s in shape], dtype=points_vox.dtype)
    return (points_vox / scale).t()[(None, ...) + (None,) * (len(shape) - 1)]


def displacement_at(displacement_vox: torch.Tensor, points_vox: torch.Tensor) -> torch.Tensor:
    """A voxel displacement field ``[1, dim, *n]`` at voxel points ``[P, dim]`` -> ``[P, dim]`` (trilinear)."""
    shape = tuple(displacement_vox.shape[2:])
    return sample(displacement_vox, _to_normalized(points_vox, shape)).reshape(len(shape), -1).t()


def invert_points(displacement_vox: torch.Tensor, points_vox: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """``Psi^-1(p)`` for ``Psi(x) = x + d(x)``: solve ``q + d(q) = p`` by fixed-point iteration ``q <- p - d(q)``."""
    q = points_vox.clone()
    for _ in range(iterations):
        q_new = points_vox - displacement_at(displacement_vox, q)
        if (q_new - q).abs().max() < 1e-4:
            return q_new
        q = q_new
    raise RuntimeError("Inverting the synthetic displacement did not converge (is it too large?).")


def breathing_case(data_dir: str = DEFAULT_DATA, shape: tuple[int, int, int] = (175, 175, 175), count: int = 300,
                   amplitude_mm: float = 15.0, seed: int = 0) -> BreathingCase:
    """Build the case described in the module docstring."""
    from monai_gradicon.maps import ddf_to_map, warp_image
    from monai_gradicon.metrics import jacobian_determinant

    hu, spacing = load_popi_network_grid(data_dir, shape)
    lungs = lung_mask(hu)
    fixed = ((hu.clamp(-1000.0, 0.0) + 1000.0) / 1000.0)[None, None]
    d = breathing_displacement(lungs, spacing, amplitude_mm, seed)
    det = jacobian_determinant(d)
    if det.min() <= 0.1:
        raise RuntimeError(f"The synthetic displacement is too strong (min det J {float(det.min()):.3f}).")
    moving = warp_image(fixed, ddf_to_map(d))
    points_fixed, points_moving = _landmarks(d, lung_mask(hu, erode=2), count, seed)
    return Case(moving, fixed, spacing, name="popi-breathing", displacement=d, hu=hu, lungs=lungs,
                points_fixed=points_fixed, points_moving=points_moving,
                info={"image": POPI, "amplitude_mm": amplitude_mm, "landmarks": "lungs (HU < -500), eroded 2"})


def _landmarks(d: torch.Tensor, inner: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random voxels of ``inner`` (fixed landmarks) and their images ``Psi^-1(p)`` in the moving image."""
    candidates = torch.nonzero(inner).float()
    gen = torch.Generator().manual_seed(seed + 1)
    pick = torch.randperm(candidates.shape[0], generator=gen)[:count]
    points_fixed = candidates[pick]
    return points_fixed, invert_points(d, points_fixed)


# ------------------------------------------------------------------------------------------------ box grids
def _fov_box(image) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) bounds of a file's field of view (voxel edges: index -0.5 .. N - 0.5), axis-aligned."""
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in image.array.shape], indexing="ij")).reshape(3, -1)
    world = image.affine[:3, :3] @ corners + image.affine[:3, 3:4]
    return world.min(1), world.max(1)


def resample_box(image, lo, hi, shape: tuple[int, int, int], fill: float = 0.0, shift=(0.0, 0.0, 0.0),
                 array: np.ndarray | None = None) -> torch.Tensor:
    """``image`` (a ``monai_gradicon.io.Image``, or ``array`` on its grid) resampled (trilinear) onto ``shape``
    cells over the world box ``[lo, hi]`` (RAS mm, per world axis x, y, z) moved by ``shift`` mm.

    Array axes (0, 1, 2) of the result are world (z, y, x), increasing; cell centres at ``lo + (p + 0.5) * (hi -
    lo) / n`` (as ``F.interpolate(align_corners=False)`` does over a field of view); ``fill`` outside the file.
    Returns ``[*shape]`` float32.
    """
    from scipy import ndimage

    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    source = image.array if array is None else array
    # world coordinates of the cells, array axis a <-> world axis 2 - a
    axes = [lo[2 - a] + (np.arange(shape[a]) + 0.5) * (hi[2 - a] - lo[2 - a]) / shape[a] + shift[2 - a]
            for a in range(3)]
    inv = np.linalg.inv(image.affine)
    source = source.astype(np.float32, copy=False)
    out = np.empty(shape, dtype=np.float32)
    zz, yy = np.meshgrid(axes[0], axes[1], indexing="ij")
    for c in range(shape[2]):  # one world-x plane at a time bounds the memory
        world = np.stack([np.full_like(zz, axes[2][c]), yy, zz])  # (x, y, z)
        index = np.tensordot(inv[:3, :3], world, axes=1) + inv[:3, 3].reshape(3, 1, 1)
        out[:, :, c] = ndimage.map_coordinates(source, index, order=1, mode="constant", cval=fill)
    return torch.from_numpy(out)


def box_spacing(lo, hi, shape) -> tuple[float, ...]:
    """mm per cell along array axes (0, 1, 2) = world (z, y, x) of a box grid."""
    return tuple(float(hi[2 - a] - lo[2 - a]) / shape[a] for a in range(3))


def mr_normalize(image: torch.Tensor) -> torch.Tensor:
    """Brain MR to [0, 1]: divided by the 99th percentile of the head (voxels above 5 % of the maximum), clipped."""
    head = image[image > 0.05 * float(image.max())]
    scale = float(torch.quantile(head[:: max(1, head.numel() // 1_000_000)], 0.99))
    return (image / scale).clamp(0.0, 1.0)


def ct_window(hu: torch.Tensor) -> torch.Tensor:
    return (hu.clamp(-1000.0, 0.0) + 1000.0) / 1000.0


MNI_DIR = "brain_mni152_2009a_sym"
MNI_T1 = os.path.join(MNI_DIR, "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
MNI_GM = os.path.join(MNI_DIR, "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
MNI_WM = os.path.join(MNI_DIR, "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
COLIN_BET = os.path.join("brain_colin27_ch2", "ch2bet.nii.gz")
LUNG1 = os.path.join("lung_ct_pyradiomics", "lung1_image.nrrd")
LUNG2 = os.path.join("lung_ct_pyradiomics", "lung2_image.nrrd")


def _read(data_dir: str, rel: str):
    from monai_gradicon.io import read_image

    path = os.path.join(data_dir, rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{rel} not found under {data_dir} (see ../shared/data/README.md).")
    return read_image(path)


def _mni(data_dir: str, shape: tuple[int, int, int]):
    """MNI T1 in [0, 1] and its brain (GM + WM probability > 0.5) on the box grid of the MNI file's field of view."""
    t1 = _read(data_dir, MNI_T1)
    gm, wm = _read(data_dir, MNI_GM).array, _read(data_dir, MNI_WM).array
    brain = (gm.astype(np.float32) + wm.astype(np.float32)) / 255.0
    lo, hi = _fov_box(t1)
    image = mr_normalize(resample_box(t1, lo, hi, shape))
    brain = resample_box(t1, lo, hi, shape, array=brain) > 0.5
    return image, brain, lo, hi


def intersubject_displacement(shape: tuple[int, ...], spacing_mm: tuple[float, ...], region: torch.Tensor,
                              amplitude_mm: float = 7.0, seed: int = 0) -> torch.Tensor:
    """A smooth inter-subject-like displacement ``[1, 3, *n]`` in voxels: Gaussian-filtered noise at two scales
    (sigma 20 mm, and 8 mm at 40 % of its weight), scaled so that its largest magnitude inside ``region`` is
    ``amplitude_mm``."""
    gen = torch.Generator().manual_seed(seed)
    mean_spacing = float(np.mean(spacing_mm))
    coarse = _smooth_noise(tuple(shape), 20.0 / mean_spacing, gen)
    fine = _smooth_noise(tuple(shape), 8.0 / mean_spacing, gen)
    d_mm = coarse + 0.4 * fine
    d_mm = d_mm * (amplitude_mm / float(d_mm.norm(dim=1)[0][region].max()))
    return d_mm / torch.tensor(spacing_mm, dtype=torch.float32).view(1, 3, 1, 1, 1)


def _synthetic(name: str, fixed: torch.Tensor, d: torch.Tensor, inner: torch.Tensor, spacing, count: int,
               seed: int, info: dict) -> Case:
    from monai_gradicon.maps import ddf_to_map, warp_image
    from monai_gradicon.metrics import jacobian_determinant

    det = jacobian_determinant(d)
    if det.min() <= 0.1:
        raise RuntimeError(f"The synthetic displacement is too strong (min det J {float(det.min()):.3f}).")
    moving = warp_image(fixed, ddf_to_map(d))
    points_fixed, points_moving = _landmarks(d, inner, count, seed)
    info = dict(info, min_det_j=float(det.min()), max_displacement_mm=float(
        (d * torch.tensor(spacing, dtype=torch.float32).view(1, 3, 1, 1, 1)).norm(dim=1).max()))
    return Case(moving, fixed, tuple(spacing), name=name, displacement=d, points_fixed=points_fixed,
                points_moving=points_moving, info=info)


def mni_synthetic_case(data_dir: str = DEFAULT_DATA, shape: tuple[int, int, int] = (175, 175, 175),
                       count: int = 300, amplitude_mm: float = 7.0, seed: int = 0) -> Case:
    """MNI152 T1 (fixed) and itself pulled through :func:`intersubject_displacement` (moving), TRE in the brain."""
    from scipy import ndimage

    image, brain, lo, hi = _mni(data_dir, shape)
    spacing = box_spacing(lo, hi, shape)
    d = intersubject_displacement(shape, spacing, brain, amplitude_mm, seed)
    inner = torch.from_numpy(ndimage.binary_erosion(brain.numpy(), iterations=2))
    return _synthetic("mni-synthetic", image[None, None], d, inner, spacing, count, seed,
                      {"image": MNI_T1, "box_lo_mm": lo.tolist(), "box_hi_mm": hi.tolist(),
                       "amplitude_mm": amplitude_mm, "landmarks": "brain (GM + WM > 0.5), eroded 2"})


def shift_case(data_dir: str = DEFAULT_DATA, shape: tuple[int, int, int] = (48, 48, 48), count: int = 300,
               shift_vox=(3.0, -2.0, 1.0), seed: int = 0) -> Case:
    """The convention check: the MNI T1 (fixed) and a copy moved by ``shift_vox`` voxels along array axes (0, 1, 2)
    (``A(x) = B(x - t)``, so ``Phi_AB(x) = x + t`` and ``Phi_BA(y) = y - t``); landmarks in the brain."""
    from scipy import ndimage

    image, brain, lo, hi = _mni(data_dir, shape)
    spacing = box_spacing(lo, hi, shape)
    d = -torch.tensor(shift_vox, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()
    inner = torch.from_numpy(ndimage.binary_erosion(brain.numpy(), iterations=2))
    return _synthetic("mni-shift", image[None, None], d, inner, spacing, count, seed,
                      {"image": MNI_T1, "shift_vox": list(shift_vox)})


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    """The largest 3D connected component of ``mask``, holes filled."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        raise ValueError("empty mask")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))


def mni_colin_case(data_dir: str = DEFAULT_DATA, shape: tuple[int, int, int] = (175, 175, 175)) -> Case:
    """MNI152 T1 (fixed) and Colin27 ``ch2bet`` (moving) in the MNI file's field of view, brain masks for Dice.

    Both images are skull-stripped (the MNI 2009a T1 of ``../shared/data`` is nilearn's brain-masked copy; Colin27's
    whole-head ``ch2`` would put its skull and scalp against the MNI brain's outline), and the masks are their
    brain-extraction masks: the non-zero region of each (largest component, holes filled).
    """
    t1 = _read(data_dir, MNI_T1)
    lo, hi = _fov_box(t1)
    image = mr_normalize(resample_box(t1, lo, hi, shape))
    brain = resample_box(t1, lo, hi, shape, array=_largest_filled(t1.array > 0).astype(np.float32)) > 0.5
    bet = _read(data_dir, COLIN_BET)
    moving = mr_normalize(resample_box(bet, lo, hi, shape))
    colin_brain = resample_box(bet, lo, hi, shape, array=_largest_filled(bet.array > 0).astype(np.float32)) > 0.5
    return Case(moving[None, None], image[None, None], box_spacing(lo, hi, shape), name="mni-colin",
                mask_fixed=brain, mask_moving=colin_brain, mask_name="brain",
                info={"fixed": MNI_T1, "moving": COLIN_BET, "box_lo_mm": lo.tolist(), "box_hi_mm": hi.tolist(),
                      "masks": "non-zero region of each skull-stripped T1, largest component, holes filled"})


def lung_pair_case(data_dir: str = DEFAULT_DATA, shape: tuple[int, int, int] = (175, 175, 175)) -> Case:
    """lung1 (fixed) and lung2 (moving) CT, each centred on its lung mask in one box, lung masks for Dice."""
    from monai_gradicon.lung_mask import lung_mask as lung_mask_ct

    images, masks, centres, boxes = [], [], [], []
    for rel in (LUNG1, LUNG2):
        ct = _read(data_dir, rel)
        ct.array = ct.array.astype(np.float32)
        mask = lung_mask_ct(ct, method="threshold").mask
        idx = np.argwhere(mask).mean(0)
        centres.append(ct.affine[:3, :3] @ idx + ct.affine[:3, 3])
        images.append(ct)
        masks.append(mask)
        boxes.append(_fov_box(ct))
    extent = np.max([hi - lo for lo, hi in boxes], axis=0)
    lo, hi = -extent / 2, extent / 2
    out, out_masks = [], []
    for ct, mask, centre in zip(images, masks, centres):
        out.append(ct_window(resample_box(ct, lo, hi, shape, fill=-1024.0, shift=centre)))
        out_masks.append(resample_box(ct, lo, hi, shape, shift=centre, array=mask.astype(np.float32)) > 0.5)
    return Case(out[1][None, None], out[0][None, None], box_spacing(lo, hi, shape), name="lung-pair",
                mask_fixed=out_masks[0], mask_moving=out_masks[1], mask_name="lungs",
                info={"fixed": LUNG1, "moving": LUNG2, "box_extent_mm": extent.tolist(),
                      "centres_mm": [c.tolist() for c in centres],
                      "masks": "monai_gradicon.lung_mask.lung_mask(method='threshold') on each CT's grid"})


CASES = ("popi-breathing", "mni-synthetic", "mni-colin", "lung-pair", "mni-shift")


def make_case(name: str, data_dir: str = DEFAULT_DATA, size: int = 175, count: int = 300,
              amplitude_mm: float | None = None) -> Case:
    """The case ``name`` (``CASES``) on an ``size``³ grid; ``amplitude_mm`` None: the case's default (15 mm POPI
    S-I, 7 mm MNI)."""
    shape = (size,) * 3
    if name == "popi-breathing":
        return breathing_case(data_dir, shape, count=count,
                              amplitude_mm=15.0 if amplitude_mm is None else amplitude_mm)
    if name == "mni-synthetic":
        return mni_synthetic_case(data_dir, shape, count=count,
                                  amplitude_mm=7.0 if amplitude_mm is None else amplitude_mm)
    if name == "mni-colin":
        return mni_colin_case(data_dir, shape)
    if name == "lung-pair":
        return lung_pair_case(data_dir, shape)
    if name == "mni-shift":
        return shift_case(data_dir, shape, count=count)
    raise ValueError(f"unknown case {name!r}; choose from {CASES}")


def map_at_points(phi: torch.Tensor, points_vox: torch.Tensor) -> torch.Tensor:
    """A map ``[1, dim, *n]`` (normalized) at voxel points ``[P, dim]`` -> mapped points in voxels ``[P, dim]``."""
    shape = tuple(phi.shape[2:])
    scale = torch.tensor([s - 1 for s in shape], dtype=phi.dtype)
    points = _to_normalized(points_vox.to(phi.dtype), shape).to(phi.device)
    return sample(phi, points).reshape(len(shape), -1).t().cpu() * scale


def tre_mm(case: BreathingCase, phi_ab: torch.Tensor, phi_ba: torch.Tensor) -> dict[str, float]:
    """Target registration errors in mm for both maps ``[1, 3, *n]`` (normalized, on the network grid).

    ``Phi_AB`` (fixed -> moving) is evaluated at the fixed landmarks and compared with their moving positions;
    ``Phi_BA`` (moving -> fixed) at the moving landmarks, compared with the fixed positions.
    """
    mm = torch.tensor(case.spacing_mm, dtype=torch.float32)
    err_ab = ((map_at_points(phi_ab, case.points_fixed) - case.points_moving) * mm).norm(dim=1)
    err_ba = ((map_at_points(phi_ba, case.points_moving) - case.points_fixed) * mm).norm(dim=1)
    return {
        "tre_ab_mm": float(err_ab.mean()), "tre_ab_p95_mm": float(err_ab.quantile(0.95)),
        "tre_ba_mm": float(err_ba.mean()), "tre_ba_p95_mm": float(err_ba.quantile(0.95)),
    }


def dice(case: Case, phi_ab: torch.Tensor, phi_ba: torch.Tensor) -> dict[str, float]:
    """Dice of the case's masks after warping, both directions: the moving mask pulled through ``Phi_AB`` (trilinear,
    > 0.5) against the fixed mask, and the fixed mask through ``Phi_BA`` against the moving mask."""
    from monai_gradicon.maps import warp_image

    def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(2.0 * (a & b).sum() / (a.sum() + b.sum()))

    fixed, moving = case.mask_fixed, case.mask_moving
    warped_ab = warp_image(moving.float()[None, None], phi_ab)[0, 0] > 0.5
    warped_ba = warp_image(fixed.float()[None, None], phi_ba)[0, 0] > 0.5
    return {"dice_ab": overlap(warped_ab, fixed), "dice_ba": overlap(warped_ba, moving)}


def true_maps(case: BreathingCase, iterations: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """The true maps ``(Phi_AB, Phi_BA)`` ``[1, 3, *n]`` (normalized): ``Phi_BA = Psi`` exactly on the grid and
    ``Phi_AB = Psi^-1`` by fixed-point iteration ``q <- x - d(q)`` at every voxel (to 1e-4 voxels)."""
    from monai_gradicon.maps import ddf_to_map

    shape = case.shape
    scale = torch.tensor([s - 1 for s in shape], dtype=torch.float32).view(1, 3, 1, 1, 1)
    ident = identity_map(shape)
    d_norm = case.displacement / scale
    q = ident.clone()
    for _ in range(iterations):
        q_new = ident - sample(d_norm, q)
        change = float(((q_new - q) * scale).abs().max())
        q = q_new
        if change < 1e-4:
            return q, ddf_to_map(case.displacement)
    raise RuntimeError("Inverting the synthetic displacement on the grid did not converge.")


def surrogate_init(case: BreathingCase, error_mm: float = 5.0, seed: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for a network's output: the true maps plus independent smooth errors (Gaussian-filtered noise,
    sigma 10 voxels at 175³) whose largest magnitude is ``error_mm`` per axis, so the two are neither exact nor
    inverse-consistent. Returns ``(init_ab, init_ba)`` maps ``[1, 3, *n]`` (normalized)."""
    shape = case.shape
    phi_ab, phi_ba = true_maps(case)
    gen = torch.Generator().manual_seed(seed)
    to_norm = torch.tensor([1.0 / ((s - 1) * mm) for s, mm in zip(shape, case.spacing_mm)]).view(1, 3, 1, 1, 1)
    sigma = 10.0 * min(shape) / 175.0
    e_ab = _smooth_noise(shape, sigma, gen) * error_mm * to_norm
    e_ba = _smooth_noise(shape, sigma, gen) * error_mm * to_norm
    return phi_ab + e_ab, phi_ba + e_ba
