"""Cases for the field-optimization benchmarks: a real lung CT with a known, smooth, breathing-like deformation.

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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from monai_gradicon.maps import identity_map, sample

__all__ = [
    "DEFAULT_DATA",
    "BreathingCase",
    "breathing_case",
    "breathing_displacement",
    "invert_points",
    "load_popi_network_grid",
    "lung_mask",
    "tre_mm",
]

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
POPI = os.path.join("lung_ct_popi_phase00", "popi_phase00_ct.nii.gz")


@dataclass
class BreathingCase:
    """A registration case with known maps (all tensors float32, CPU).

    Attributes:
        moving, fixed: ``[1, 1, *n]`` images in [0, 1] (A and B).
        displacement: ``[1, 3, *n]`` the true ``d`` in voxels of the network grid; ``Phi_BA = x + d(x)``.
        hu: ``[*n]`` the fixed image in Hounsfield units (before windowing).
        lungs: ``[*n]`` bool lung mask of the fixed image.
        points_fixed: ``[P, 3]`` landmark voxels (float) in B.
        points_moving: ``[P, 3]`` the same anatomical points in A (``Psi^-1(points_fixed)``).
        spacing_mm: mm per network voxel along each array axis.
    """

    moving: torch.Tensor
    fixed: torch.Tensor
    displacement: torch.Tensor
    hu: torch.Tensor
    lungs: torch.Tensor
    points_fixed: torch.Tensor
    points_moving: torch.Tensor
    spacing_mm: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.fixed.shape[2:])


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
    inner = lung_mask(hu, erode=2)
    candidates = torch.nonzero(inner).float()
    gen = torch.Generator().manual_seed(seed + 1)
    pick = torch.randperm(candidates.shape[0], generator=gen)[:count]
    points_fixed = candidates[pick]
    points_moving = invert_points(d, points_fixed)
    return BreathingCase(moving, fixed, d, hu, lungs, points_fixed, points_moving, spacing)


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
