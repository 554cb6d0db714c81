"""Deterministic synthetic T1-like skull-stripped brain with an integer tissue label map.

Every subject is the same analytic template (folded cortex, white matter, deep grey matter, lateral ventricles)
evaluated through a subject-specific random smooth deformation, so that random inter-subject pairs are related by
a plausible smooth transform. Axes (0-based voxel indices, array order): axis 0 left-right, axis 1
posterior -> anterior, axis 2 inferior -> superior; the affine is a diagonal RAS matrix (mm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ._phantom_utils import centred_affine, check_shape_spacing, voxel_grid

__all__ = [
    "BRAIN_LABELS",
    "BRAIN_TISSUE_INTENSITY",
    "BrainPhantom",
    "make_brain_phantom",
]

#: label value -> tissue name
BRAIN_LABELS: dict[int, str] = {
    0: "background",
    1: "csf",
    2: "cortical_grey_matter",
    3: "white_matter",
    4: "deep_grey_matter",
}
#: label value -> mean T1-like intensity (arbitrary units) before the per-subject gain, bias field and noise
BRAIN_TISSUE_INTENSITY: dict[int, float] = {0: 0.0, 1: 250.0, 2: 650.0, 3: 1000.0, 4: 800.0}

_TEMPLATE_SEED = 1729  # the template anatomy is the same for every subject
_N_FOLD_MODES = 12
_N_WARP_MODES = 4
_MAX_WARP_LIPSCHITZ = 0.5  # bound on |grad u|, keeps the subject deformation invertible


@dataclass(frozen=True)
class BrainPhantom:
    """One synthetic subject.

    Attributes:
        image: [1, X, Y, Z] float32 T1-like intensities (arbitrary units, >= 0; white matter ~1000 times a subject
            gain in [0.8, 1.2]).
        label: [1, X, Y, Z] uint8 labels, see :data:`BRAIN_LABELS` (0 background, 1 CSF, 2 cortical GM, 3 WM,
            4 deep GM).
        spacing_mm: voxel size along the array axes (mm).
        affine: (4, 4) voxel-to-world (RAS, mm) matrix.
    """

    image: np.ndarray
    label: np.ndarray
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray = field(repr=False)


def _template_labels(q: np.ndarray) -> np.ndarray:
    """(N,) uint8 template labels at (N, 3) points in brain-normalised coordinates (unit ball = brain outline)."""
    rng = np.random.default_rng(_TEMPLATE_SEED)
    fold_dirs = rng.normal(size=(_N_FOLD_MODES, 3))
    fold_k = fold_dirs / np.linalg.norm(fold_dirs, axis=1, keepdims=True) * rng.uniform(10.0, 18.0, (_N_FOLD_MODES, 1))
    fold_phase = rng.uniform(0.0, 2.0 * np.pi, _N_FOLD_MODES)

    r = np.sqrt(np.sum(q * q, axis=1))
    direction = q / np.maximum(r, 1e-9)[:, None]
    fold = np.mean(np.cos(direction @ fold_k.T + fold_phase), axis=1) * np.sqrt(_N_FOLD_MODES / 2.0)
    fold = np.clip(fold, -1.0, 1.0)
    r_pial = 0.93 + 0.045 * fold  # CSF between the pial surface and the brain outline: sulci
    r_white = 0.76 + 0.09 * fold  # white-matter surface follows the gyri

    labels = np.zeros(q.shape[0], dtype=np.uint8)
    labels[r <= 1.0] = 1
    labels[r <= r_pial] = 2
    labels[r <= r_white] = 3
    for side in (-1.0, 1.0):
        deep = np.sum(((q - [0.27 * side, 0.05, -0.08]) / [0.14, 0.25, 0.18]) ** 2, axis=1) <= 1.0
        labels[deep] = 4
        ventricle = np.sum(((q - [0.1 * side, 0.0, 0.14]) / [0.07, 0.38, 0.11]) ** 2, axis=1) <= 1.0
        labels[ventricle] = 1
    return labels


def _random_warp(
    rng: np.random.Generator, shape: tuple[int, int, int], amplitude_vox: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random low-frequency Fourier displacement: wave vectors (3, W, 3) rad/voxel, phases (3, W), amplitudes (3, W)."""
    size = float(np.mean(shape))
    dirs = rng.normal(size=(3, _N_WARP_MODES, 3))
    dirs /= np.linalg.norm(dirs, axis=2, keepdims=True)
    k = dirs * (2.0 * np.pi / (rng.uniform(0.5, 1.0, (3, _N_WARP_MODES, 1)) * size))
    phase = rng.uniform(0.0, 2.0 * np.pi, (3, _N_WARP_MODES))
    amp = rng.uniform(0.5, 1.0, (3, _N_WARP_MODES)) * amplitude_vox
    # |grad u|_2 <= sqrt(sum_c (sum_w amp |k|)^2): rescale so the map stays a diffeomorphism
    bound = float(np.sqrt(np.sum(np.sum(amp * np.linalg.norm(k, axis=2), axis=1) ** 2)))
    if bound > _MAX_WARP_LIPSCHITZ:
        amp *= _MAX_WARP_LIPSCHITZ / bound
    return k, phase, amp


def _blur3(volume: np.ndarray) -> np.ndarray:
    """Separable [1/4, 1/2, 1/4] smoothing along each axis (edge-replicating), a mild partial-volume effect."""
    out = volume
    for axis in range(volume.ndim):
        padded = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in range(volume.ndim)], mode="edge")
        lo = np.take(padded, np.arange(0, out.shape[axis]), axis=axis)
        hi = np.take(padded, np.arange(2, out.shape[axis] + 2), axis=axis)
        out = 0.5 * out + 0.25 * (lo + hi)
    return out


def make_brain_phantom(
    shape: Sequence[int] = (64, 72, 64),
    seed: int | Sequence[int] = 0,
    spacing_mm: float | Sequence[float] = 2.0,
    deformation_vox: float = 3.0,
    noise_std: float = 20.0,
) -> BrainPhantom:
    """Generate one deterministic synthetic subject (T1-like image + label map).

    Args:
        shape: grid size (X, Y, Z) in voxels (each >= 16); the brain fills ~80 % of the field of view.
        seed: seed for ``numpy.random.default_rng``; it drives the subject deformation, gain and noise.
        spacing_mm: voxel size (mm), one value or one per axis.
        deformation_vox: typical amplitude of the subject's smooth deformation of the template (voxels, at a
            64-voxel field of view; scaled with the grid size). 0 gives the template.
        noise_std: standard deviation of the additive noise (intensity units; white matter ~1000).

    Raises:
        ValueError: for an invalid shape, spacing or negative deformation/noise.
    """
    shape_t, spacing = check_shape_spacing(shape, spacing_mm, min_size=16)
    if deformation_vox < 0 or noise_std < 0:
        raise ValueError(f"deformation_vox and noise_std must be >= 0, got {deformation_vox}, {noise_std}")
    rng = np.random.default_rng(seed)
    n = np.asarray(shape_t, dtype=np.float64)
    centre = 0.5 * (n - 1.0)
    semi_axes = n * np.array([0.40, 0.42, 0.38])

    # subject transform: template point = centre + A (p - centre) + u(p), p in voxels
    scales = rng.uniform(0.94, 1.06, 3)
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    rot = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    matrix = rot @ np.diag(scales)
    k, phase, amp = _random_warp(rng, shape_t, deformation_vox * float(n.mean()) / 64.0)

    grid = voxel_grid(shape_t)
    template_points = centre + (grid - centre) @ matrix.T
    for c in range(3):
        template_points[:, c] += np.sum(amp[c] * np.cos(grid @ k[c].T + phase[c]), axis=1)
    labels = _template_labels((template_points - centre) / semi_axes).reshape(shape_t)

    tissue = np.array([BRAIN_TISSUE_INTENSITY[i] for i in range(len(BRAIN_LABELS))])
    tissue[1:] *= rng.uniform(0.95, 1.05, len(tissue) - 1)  # subject-specific contrast
    bias_dirs = rng.normal(size=(3, 3))
    bias_k = bias_dirs / np.linalg.norm(bias_dirs, axis=1, keepdims=True) * (2.0 * np.pi / (1.5 * n.mean()))
    bias = 1.0 + 0.08 * np.mean(np.cos(grid @ bias_k.T + rng.uniform(0, 2 * np.pi, 3)), axis=1)
    image = _blur3(tissue[labels]) * bias.reshape(shape_t) * rng.uniform(0.8, 1.2)
    if noise_std > 0:
        image = np.abs(image + rng.normal(0.0, noise_std, shape_t))

    return BrainPhantom(
        image=image[None].astype(np.float32),
        label=labels[None].astype(np.uint8),
        spacing_mm=spacing,
        affine=centred_affine(shape_t, spacing),
    )
