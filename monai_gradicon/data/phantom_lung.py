"""Deterministic synthetic chest CT pair (inspiration / expiration) with a known breathing motion.

Geometry and axis conventions (voxel indices are 0-based, array axis order ``(i, j, k)``):

* axis 0 (``i``): left-right (world +x, towards the subject's right with the RAS affine below),
* axis 1 (``j``): posterior -> anterior (world +y, the spine sits at small ``j``),
* axis 2 (``k``): inferior -> superior (world +z, the lung apex is at large ``k``, the diaphragm at small ``k``).

The anatomy is an analytic function of continuous voxel coordinates, so the expiration image is *exactly* the
inspiration anatomy evaluated through the breathing map (no interpolation blur)::

    expiration(p) = inspiration_anatomy(psi(p)),    psi(p) = p + u(p)     (p in voxels)

``psi`` (:meth:`BreathingMotion.expiration_to_inspiration`) maps an expiration-image position to the inspiration
position of the same tissue. It is mostly a superior-inferior stretch of the lungs (the diaphragm is higher in
expiration) plus a small anterior-posterior component.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ._phantom_utils import centred_affine, check_shape_spacing, smoothstep, voxel_grid
from .coords import voxel_to_world

__all__ = [
    "HU_AIR",
    "HU_SOFT_TISSUE",
    "HU_LUNG",
    "HU_VESSEL",
    "HU_RIB",
    "HU_VERTEBRA",
    "LUNG_TEXTURE_MAX_HU",
    "BreathingMotion",
    "LungPhantomPair",
    "make_lung_phantom_pair",
]

HU_AIR = -1000.0
HU_SOFT_TISSUE = 20.0
HU_LUNG = -850.0
HU_VESSEL = 40.0
HU_RIB = 650.0
HU_VERTEBRA = 600.0
HU_DISC = 80.0
#: bound on the smooth parenchyma texture: parenchyma away from vessels lies in HU_LUNG +- this (before noise)
LUNG_TEXTURE_MAX_HU = 48.0

_N_TEXTURE_MODES = 8
# initial directions of the vessel trees from each hilum, lung-unit coordinates (lateral, anterior, superior)
_TREE_DIRECTIONS = ((0.6, 0.2, 0.8), (0.6, -0.2, -0.8), (0.9, 0.4, 0.0), (0.5, -0.6, 0.3), (0.4, 0.5, -0.7))
_EDGE_WIDTH_VOX = 0.5  # width of the partial-volume transition at tissue boundaries


def _soft_inside(signed_dist_vox: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy in [0, 1] from an (approximate) signed distance in voxels (negative inside)."""
    return 0.5 * (1.0 - np.tanh(signed_dist_vox / _EDGE_WIDTH_VOX))


def _elliptic_radius(x: np.ndarray, y: np.ndarray, centre: np.ndarray, semi_axes: np.ndarray) -> np.ndarray:
    """In-plane (axes 0, 1) elliptic radius: 1 on the ellipse with ``centre`` and ``semi_axes`` (voxels)."""
    return np.hypot((x - centre[0]) / semi_axes[0], (y - centre[1]) / semi_axes[1])


@dataclass(frozen=True)
class BreathingMotion:
    """Known smooth breathing motion ``psi(p) = p + u(p)`` from expiration to inspiration, in voxel units.

    All points are (N, 3) float arrays of 0-based voxel indices in array axis order. ``u`` is zero along axis 0,
    pulls tissue inferiorly (``-k``) by up to ``amplitude_mm`` at the lung bases (less towards the apex and outside
    the lungs) and anteriorly (``+j``) by up to ``ap_fraction * amplitude_mm``.

    Attributes:
        spacing_mm: voxel size (mm) along the three array axes.
        amplitude_mm: superior-inferior displacement of the lung bases (mm).
        ap_fraction: anterior-posterior amplitude as a fraction of ``amplitude_mm``.
        lung_centres_ij: (2, 2) in-plane lung centres (voxels, axes 0 and 1).
        lung_sigmas_ij: (2, 2) in-plane Gaussian widths of the motion envelope (voxels).
        apex_k: axis-2 index of the lung apex where the SI motion vanishes (voxels).
        base_k: axis-2 index below which the SI motion is maximal (voxels).
        posterior_j: axis-1 index where the AP motion vanishes (voxels).
        anterior_j: axis-1 index where the AP motion is maximal (voxels).
    """

    spacing_mm: tuple[float, float, float]
    amplitude_mm: float
    ap_fraction: float
    lung_centres_ij: tuple[tuple[float, float], tuple[float, float]]
    lung_sigmas_ij: tuple[tuple[float, float], tuple[float, float]]
    apex_k: float
    base_k: float
    posterior_j: float
    anterior_j: float

    def displacement(self, points_vox: np.ndarray) -> np.ndarray:
        """``u(p)``: (N, 3) displacement in voxels at (N, 3) expiration voxel positions."""
        p = np.asarray(points_vox, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3:
            raise ValueError(f"points_vox must have shape (N, 3), got {p.shape}")
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        envelope = np.zeros_like(x)
        for (cx, cy), (sx, sy) in zip(self.lung_centres_ij, self.lung_sigmas_ij):
            envelope += np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))
        s_z = smoothstep((self.apex_k - z) / (self.apex_k - self.base_k))
        s_y = smoothstep((y - self.posterior_j) / (self.anterior_j - self.posterior_j))
        u = np.zeros_like(p)
        u[:, 1] = self.ap_fraction * self.amplitude_mm / self.spacing_mm[1] * s_y * envelope * (0.5 + 0.5 * s_z)
        u[:, 2] = -self.amplitude_mm / self.spacing_mm[2] * s_z * envelope
        return u

    def expiration_to_inspiration(self, points_vox: np.ndarray) -> np.ndarray:
        """``psi``: (N, 3) expiration voxel positions -> (N, 3) inspiration voxel positions (exact)."""
        p = np.asarray(points_vox, dtype=np.float64)
        return p + self.displacement(p)

    def inspiration_to_expiration(
        self, points_vox: np.ndarray, tol_vox: float = 1e-9, max_iter: int = 200
    ) -> np.ndarray:
        """``psi^-1``: (N, 3) inspiration voxel positions -> (N, 3) expiration voxel positions.

        Solved by the fixed-point iteration ``q <- p - u(q)`` (a contraction because ``|grad u| < 1``).

        Raises:
            RuntimeError: if the iteration does not reach ``tol_vox`` (voxels) within ``max_iter`` steps.
        """
        target = np.asarray(points_vox, dtype=np.float64)
        q = target.copy()
        for _ in range(max_iter):
            q_next = target - self.displacement(q)
            step = float(np.max(np.abs(q_next - q))) if q.size else 0.0
            q = q_next
            if step < tol_vox:
                return q
        raise RuntimeError(f"inverting the breathing motion did not converge to {tol_vox} voxels in {max_iter} steps")

    def min_jacobian_determinant(self, shape: Sequence[int]) -> float:
        """Smallest finite-difference Jacobian determinant of ``psi`` over a voxel grid of ``shape`` (unitless)."""
        grid_shape = tuple(int(n) for n in shape) + (3,)
        mapped = self.expiration_to_inspiration(voxel_grid(shape)).reshape(grid_shape)
        jac = np.stack([np.gradient(mapped, axis=a) for a in range(3)], axis=-1)  # [..., component, derivative axis]
        return float(np.linalg.det(jac).min())


@dataclass(frozen=True)
class _LungAnatomy:
    """Analytic chest anatomy in voxel coordinates (see module docstring for axes)."""

    body_centre: np.ndarray  # (2,) axes 0/1
    body_semi: np.ndarray  # (2,)
    lung_centres: np.ndarray  # (2, 3)
    lung_semi: np.ndarray  # (2, 3)
    vessel_a: np.ndarray  # (M, 3) segment start points
    vessel_b: np.ndarray  # (M, 3) segment end points (== start for round nodules)
    vessel_radius: np.ndarray  # (M,) tube / nodule radius (voxels)
    texture_k: np.ndarray  # (T, 3) wave vectors (radians / voxel)
    texture_phase: np.ndarray  # (T,)
    rib_z0: float
    rib_period: float
    rib_radius: float
    spine_centre: np.ndarray  # (2,)
    spine_semi: np.ndarray  # (2,)
    vertebra_period: float
    vertebra_phase: float

    def lung_signed_distance(self, p: np.ndarray) -> np.ndarray:
        """Approximate signed distance (voxels, negative inside) to the union of both lungs at (N, 3) points."""
        sd = np.full(p.shape[0], np.inf)
        for c, a in zip(self.lung_centres, self.lung_semi):
            q = (p - c) / a
            ellipsoid = (np.sqrt(np.sum(q * q, axis=1)) - 1.0) * a.min()
            rho2 = q[:, 0] ** 2 + q[:, 1] ** 2
            dome_k = c[2] - a[2] * (0.75 - 0.35 * np.clip(1.0 - rho2, 0.0, 1.0))  # diaphragm dome height
            below_dome = dome_k - p[:, 2]
            sd = np.minimum(sd, np.maximum(ellipsoid, below_dome))
        return sd

    def vessel_profile(self, p: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """Max over vessels/nodules of the partial-volume tube occupancy in [0, 1] at (N, 3) points.

        Points are processed in chunks; only segments whose bounding box (grown by the radius + 5 edge widths, where
        the occupancy is < 1e-4) meets the chunk's bounding box are evaluated.
        """
        reach = self.vessel_radius[:, None] + 5.0 * _EDGE_WIDTH_VOX
        seg_lo = np.minimum(self.vessel_a, self.vessel_b) - reach
        seg_hi = np.maximum(self.vessel_a, self.vessel_b) + reach
        out = np.zeros(p.shape[0])
        for start in range(0, p.shape[0], chunk):
            chunk_slice = slice(start, start + chunk)
            pts = p[chunk_slice]
            hit = np.all((seg_lo <= pts.max(axis=0)) & (seg_hi >= pts.min(axis=0)), axis=1)
            if not hit.any():
                continue
            a, radius = self.vessel_a[hit], self.vessel_radius[hit]
            ab = self.vessel_b[hit] - a
            ap = pts[:, None, :] - a[None]
            t = np.clip(np.einsum("nmk,mk->nm", ap, ab) / np.maximum(np.einsum("mk,mk->m", ab, ab), 1e-12), 0.0, 1.0)
            d = ap - t[..., None] * ab[None]
            d2 = np.einsum("nmk,nmk->nm", d, d)
            out[chunk_slice] = _soft_inside((np.sqrt(d2) - radius).min(axis=1))
        return out

    def render(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free HU values and lung signed distance (voxels) at (N, 3) voxel points."""
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        # body: elliptic cylinder of soft tissue in air
        body_rho = _elliptic_radius(x, y, self.body_centre, self.body_semi)
        hu = HU_AIR + (HU_SOFT_TISSUE - HU_AIR) * _soft_inside((body_rho - 1.0) * self.body_semi.min())
        # ribs: tori on an elliptic ring at 0.9 of the body outline, absent anteriorly (costal cartilage)
        nearest_rib = self.rib_z0 + self.rib_period * np.round((z - self.rib_z0) / self.rib_period)
        ring = (body_rho - 0.9) * self.body_semi.min()
        rib = _soft_inside(np.sqrt(ring**2 + (z - nearest_rib) ** 2) - self.rib_radius)
        rib *= y < self.body_centre[1] + 0.55 * self.body_semi[1]
        hu = hu + (HU_RIB - hu) * rib
        # spine: elliptic column of vertebral bodies separated by discs
        spine_rho = _elliptic_radius(x, y, self.spine_centre, self.spine_semi)
        spine = _soft_inside((spine_rho - 1.0) * self.spine_semi.min())
        cycle = 0.5 + 0.5 * np.cos(2.0 * np.pi * z / self.vertebra_period + self.vertebra_phase)
        spine_hu = HU_DISC + (HU_VERTEBRA - HU_DISC) * smoothstep((cycle - 0.15) / 0.3)
        hu = hu + (spine_hu - hu) * spine
        # lungs: textured parenchyma with bright vessels and nodules
        lung_sd = self.lung_signed_distance(p)
        near = lung_sd < 4.0 * _EDGE_WIDTH_VOX
        q = p[near]
        parenchyma = HU_LUNG + np.sum(
            (LUNG_TEXTURE_MAX_HU / _N_TEXTURE_MODES) * np.cos(q @ self.texture_k.T + self.texture_phase), axis=1
        )
        lung_hu = parenchyma + (HU_VESSEL - parenchyma) * self.vessel_profile(q)
        occupancy = _soft_inside(lung_sd[near])
        hu[near] = hu[near] + (lung_hu - hu[near]) * occupancy
        return hu, lung_sd


def _random_unit_perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    v = rng.normal(size=3)
    v -= v.dot(d) * d
    return v / np.linalg.norm(v)


def _vessel_tree(
    rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, depth: int
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Branching segments in lung-unit-ball coordinates: list of (start, end, generation)."""
    segments: list[tuple[np.ndarray, np.ndarray, int]] = []
    stack = [(root, direction / np.linalg.norm(direction), 0.5, 0)]
    while stack:
        start, d, length, gen = stack.pop()
        end = start + length * d
        segments.append((start, end, gen))
        if gen + 1 >= depth:
            continue
        for sign in (-1.0, 1.0):
            angle = np.deg2rad(rng.uniform(25.0, 40.0)) * sign
            perp = _random_unit_perpendicular(rng, d)
            child = np.cos(angle) * d + np.sin(angle) * perp
            stack.append((end, child / np.linalg.norm(child), length * rng.uniform(0.65, 0.8), gen + 1))
    return segments


def _make_anatomy(shape: tuple[int, int, int], rng: np.random.Generator) -> _LungAnatomy:
    n = np.asarray(shape, dtype=np.float64)

    def jitter(scale: float, size: int | None = None) -> np.ndarray:
        return rng.uniform(-scale, scale, size)

    body_centre = n[:2] * (0.5 + jitter(0.01, 2))
    body_semi = n[:2] * np.array([0.44, 0.32]) * (1.0 + jitter(0.03, 2))
    lung_semi_frac = np.array([0.15, 0.22, 0.45])
    lung_centres, lung_semi = [], []
    for side in (-1.0, 1.0):
        centre = np.array([0.5 + side * 0.19, 0.52, 0.45]) + jitter(0.012, 3)
        lung_centres.append(centre * n)
        lung_semi.append(lung_semi_frac * (1.0 + jitter(0.04, 3)) * n)
    lung_centres_a, lung_semi_a = np.array(lung_centres), np.array(lung_semi)

    radius0 = max(0.7, 0.022 * float(n.mean()))
    starts, ends, radii = [], [], []
    for side, c, a in zip((-1.0, 1.0), lung_centres_a, lung_semi_a):
        hilum = np.array([-0.55 * side, 0.0, 0.05])  # medial, in lung-unit coordinates
        for direction in _TREE_DIRECTIONS:
            direction = np.array([side * direction[0], direction[1], direction[2]])
            for start, end, gen in _vessel_tree(rng, hilum, direction + jitter(0.15, 3), depth=4):
                starts.append(c + a * start)
                ends.append(c + a * end)
                radii.append(max(0.7, radius0 * 0.72**gen))
        for _ in range(15):  # round nodules
            u = rng.normal(size=3)
            centre = c + a * u / np.linalg.norm(u) * rng.uniform(0.1, 0.8)
            starts.append(centre)
            ends.append(centre)
            radii.append(rng.uniform(0.8, 1.4))

    wavelengths = rng.uniform(0.1, 0.25, _N_TEXTURE_MODES) * float(n.mean())
    dirs = rng.normal(size=(_N_TEXTURE_MODES, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return _LungAnatomy(
        body_centre=body_centre,
        body_semi=body_semi,
        lung_centres=lung_centres_a,
        lung_semi=lung_semi_a,
        vessel_a=np.array(starts),
        vessel_b=np.array(ends),
        vessel_radius=np.array(radii),
        texture_k=dirs * (2.0 * np.pi / wavelengths)[:, None],
        texture_phase=rng.uniform(0.0, 2.0 * np.pi, _N_TEXTURE_MODES),
        rib_z0=float(n[2] * rng.uniform(0.0, 0.1)),
        rib_period=float(n[2] * 0.1),
        rib_radius=max(0.9, 0.018 * float(min(n[0], n[1]))),
        spine_centre=np.array([body_centre[0], body_centre[1] - 0.72 * body_semi[1]]),
        spine_semi=n[:2] * np.array([0.055, 0.05]),
        vertebra_period=float(n[2] * 0.09),
        vertebra_phase=float(rng.uniform(0.0, 2.0 * np.pi)),
    )


def _make_motion(
    anatomy: _LungAnatomy, spacing_mm: tuple[float, float, float], amplitude_mm: float, ap_fraction: float
) -> BreathingMotion:
    c, a = anatomy.lung_centres, anatomy.lung_semi
    return BreathingMotion(
        spacing_mm=spacing_mm,
        amplitude_mm=float(amplitude_mm),
        ap_fraction=float(ap_fraction),
        lung_centres_ij=tuple((float(ci[0]), float(ci[1])) for ci in c),  # type: ignore[arg-type]
        lung_sigmas_ij=tuple((float(0.9 * ai[0]), float(0.9 * ai[1])) for ai in a),  # type: ignore[arg-type]
        apex_k=float(np.max(c[:, 2] + a[:, 2])),
        base_k=float(np.min(c[:, 2] - 0.6 * a[:, 2])),
        posterior_j=float(np.min(c[:, 1] - a[:, 1])),
        anterior_j=float(np.max(c[:, 1] + a[:, 1])),
    )


def _pick_landmarks(
    anatomy: _LungAnatomy, rng: np.random.Generator, n_landmarks: int, margin_vox: float, min_sep_vox: float
) -> np.ndarray:
    """(K, 3) inspiration voxel positions at least ``margin_vox`` inside the lungs and ``min_sep_vox`` apart.

    Points on vessels / nodules are preferred; random parenchyma points fill up if there are not enough of them.
    """
    a, b = anatomy.vessel_a, anatomy.vessel_b
    t = rng.uniform(0.0, 1.0, size=(a.shape[0], 8))
    on_vessels = np.concatenate([a, b, (a[:, None, :] + t[..., None] * (b - a)[:, None, :]).reshape(-1, 3)])
    lo = (anatomy.lung_centres - anatomy.lung_semi).min(axis=0)
    hi = (anatomy.lung_centres + anatomy.lung_semi).max(axis=0)
    in_parenchyma = rng.uniform(lo, hi, size=(min(20 * n_landmarks, 50_000), 3))
    candidates = np.concatenate([on_vessels[rng.permutation(len(on_vessels))], in_parenchyma])
    candidates = candidates[anatomy.lung_signed_distance(candidates) < -margin_vox]
    if len(candidates) < n_landmarks:
        raise ValueError(
            f"at most {len(candidates)} landmark positions fit in the lungs of this phantom, {n_landmarks} requested"
        )
    chosen = np.empty((n_landmarks, 3))
    count = 0
    for point in candidates:
        if count == 0 or np.min(np.sum((chosen[:count] - point) ** 2, axis=1)) >= min_sep_vox**2:
            chosen[count] = point
            count += 1
            if count == n_landmarks:
                return chosen
    raise ValueError(
        f"only {count} landmark positions fit in the lungs of this phantom, {n_landmarks} requested: "
        "use a larger shape or fewer landmarks"
    )


@dataclass(frozen=True)
class LungPhantomPair:
    """A synthetic inspiration/expiration chest CT pair with exact landmark correspondences.

    Attributes:
        inspiration: [1, X, Y, Z] float32 CT in HU.
        expiration: [1, X, Y, Z] float32 CT in HU (same grid and affine).
        inspiration_mask: [1, X, Y, Z] uint8 lung mask (1 = lung).
        expiration_mask: [1, X, Y, Z] uint8 lung mask.
        inspiration_landmarks: (K, 3) float64 0-based voxel indices (array axis order) in the inspiration image.
        expiration_landmarks: (K, 3) float64 voxel indices of the same points in the expiration image; exactly
            ``motion.inspiration_to_expiration(inspiration_landmarks)``.
        motion: the known expiration -> inspiration map.
        spacing_mm: voxel size along the array axes (mm).
        affine: (4, 4) voxel-to-world (RAS, mm) matrix shared by both images.
    """

    inspiration: np.ndarray
    expiration: np.ndarray
    inspiration_mask: np.ndarray
    expiration_mask: np.ndarray
    inspiration_landmarks: np.ndarray
    expiration_landmarks: np.ndarray
    motion: BreathingMotion
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray = field(repr=False)

    @property
    def inspiration_landmarks_mm(self) -> np.ndarray:
        """(K, 3) inspiration landmarks in world coordinates (mm, RAS)."""
        return voxel_to_world(self.inspiration_landmarks, self.affine)

    @property
    def expiration_landmarks_mm(self) -> np.ndarray:
        """(K, 3) expiration landmarks in world coordinates (mm, RAS)."""
        return voxel_to_world(self.expiration_landmarks, self.affine)


def make_lung_phantom_pair(
    shape: Sequence[int] = (64, 64, 64),
    seed: int | Sequence[int] = 0,
    breathing_amplitude_mm: float = 12.0,
    spacing_mm: float | Sequence[float] = 2.5,
    n_landmarks: int = 80,
    noise_std_hu: float = 10.0,
    ap_fraction: float = 0.25,
) -> LungPhantomPair:
    """Generate a deterministic synthetic inspiration/expiration chest CT pair.

    HU ranges (before the Gaussian noise of ``noise_std_hu``): air -1000, body soft tissue 20, lung parenchyma
    ``HU_LUNG +- LUNG_TEXTURE_MAX_HU`` (-850 +- 48), vessels/nodules up to 40, ribs 650, vertebrae 80..600.

    Args:
        shape: grid size (X, Y, Z) in voxels (each >= 32); anatomy scales with the field of view.
        seed: seed for ``numpy.random.default_rng`` (an int or a sequence of ints); same seed -> same arrays.
        breathing_amplitude_mm: superior-inferior displacement of the lung bases between phases (mm).
        spacing_mm: voxel size (mm), one value or one per axis.
        n_landmarks: number K of corresponding landmarks, placed on vessels/nodules inside the lungs.
        noise_std_hu: standard deviation of independent Gaussian noise added to each image (HU).
        ap_fraction: anterior-posterior motion amplitude as a fraction of ``breathing_amplitude_mm``.

    Raises:
        ValueError: for an invalid shape/spacing/amplitude, a motion that would fold, or too many landmarks.
    """
    shape_t, spacing = check_shape_spacing(shape, spacing_mm, min_size=32)
    if not breathing_amplitude_mm >= 0:
        raise ValueError(f"breathing_amplitude_mm must be >= 0, got {breathing_amplitude_mm}")
    if n_landmarks < 1:
        raise ValueError(f"n_landmarks must be >= 1, got {n_landmarks}")
    rng = np.random.default_rng(seed)
    anatomy = _make_anatomy(shape_t, rng)
    motion = _make_motion(anatomy, spacing, breathing_amplitude_mm, ap_fraction)
    if breathing_amplitude_mm > 0 and motion.min_jacobian_determinant(shape_t) < 0.2:
        raise ValueError(
            f"breathing_amplitude_mm={breathing_amplitude_mm} is too large for this field of view: the motion would "
            "fold (Jacobian determinant < 0.2)"
        )

    grid = voxel_grid(shape_t)
    insp_hu, insp_sd = anatomy.render(grid)
    exp_hu, exp_sd = anatomy.render(motion.expiration_to_inspiration(grid))
    insp_hu += rng.normal(0.0, noise_std_hu, insp_hu.shape) if noise_std_hu > 0 else 0.0
    exp_hu += rng.normal(0.0, noise_std_hu, exp_hu.shape) if noise_std_hu > 0 else 0.0

    size = float(np.mean(shape_t))
    landmarks_insp = _pick_landmarks(
        anatomy, rng, n_landmarks, margin_vox=max(1.0, size / 48.0), min_sep_vox=max(1.0, size / 32.0)
    )
    landmarks_exp = motion.inspiration_to_expiration(landmarks_insp)

    def volume(values: np.ndarray, dtype: type) -> np.ndarray:
        return values.reshape((1,) + shape_t).astype(dtype)

    return LungPhantomPair(
        inspiration=volume(insp_hu, np.float32),
        expiration=volume(exp_hu, np.float32),
        inspiration_mask=volume(insp_sd < 0, np.uint8),
        expiration_mask=volume(exp_sd < 0, np.uint8),
        inspiration_landmarks=landmarks_insp,
        expiration_landmarks=landmarks_exp,
        motion=motion,
        spacing_mm=spacing,
        affine=centred_affine(shape_t, spacing),
    )
