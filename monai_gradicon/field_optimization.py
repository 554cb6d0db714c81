"""GradICON without a network: optimize the two transforms of one pair directly.

:func:`optimize_fields` minimises, for moving image A and fixed image B (``[1, C, *S]``, intensities in [0, 1], one
grid), the GradICON objective over the two transforms themselves instead of over a network's weights::

    LNCC(A o Phi_AB, B) + LNCC(B o Phi_BA, A) + lambda * (GradICON(Phi_AB o Phi_BA) + GradICON(Phi_BA o Phi_AB)) / 2

with the project's losses (LNCC with a Gaussian window of ``sigma`` voxels; the GradICON regularizer of
:func:`~monai_gradicon.losses.regularizers.gradicon_regularizer` on the sparse jittered points of the released
models: every other voxel, jitter sigma ``2 / N_last``, finite-difference step ``delta`` = 1e-3, a fresh jitter at
every step and for each composition), coarse to fine over an image pyramid, with Adam. ``symmetric=False`` keeps the
paper's one-sided term ``GradICON(Phi_AB o Phi_BA)`` (section "Both compositions" below for why the default differs).
Two uses:

1. **From scratch** (no network): ``optimize_fields(moving, fixed)``.
2. **Field-level instance optimization** after a network: ``optimize_fields(moving, fixed, init_ab=phi_ab,
   init_ba=phi_ba)`` with the network's two transforms (:class:`CoordinateTransform` s or maps ``[1, dim, *S]`` on the
   input grid). Only the two displacement fields are optimized; the transforms are evaluated once, under
   ``torch.no_grad``, and no network is touched.

The device and dtype follow the inputs (the jitter is drawn from a seeded CPU generator and moved, so a seed gives
the same points on every device).

Frames and units
----------------
Maps are normalized [0, 1] coordinates of the input grid (voxel ``i`` of ``N`` at ``i / (N - 1)``), channel ``k``
along spatial axis ``k``. ``Phi_AB`` maps fixed (B) points to moving (A) points (``A o Phi_AB ~ B``), exactly the
convention of :class:`~monai_gradicon.networks.GradICONNetwork`; ``Phi_BA`` the other way. Both are returned as
:class:`~monai_gradicon.coordinate_transforms.DisplacementTransform` s on the input grid (trilinear, border padding).

Parametrisation
---------------
Pyramid level ``l`` (0 = the input grid) has ``ceil((N - 1) / 2^l) + 1`` voxels per axis, on the same [0, 1] frame
(``align_corners=True``: no sub-voxel shift between levels; images are Gaussian anti-aliased with sigma ``2^l / 2``
input voxels before resampling). At every level each transform is ``x + u(x)`` with

    u = base + upsample(G_s * v) / (n - 1)        (normalized units; per axis n = level size)

``v`` (trainable, in voxels of the level) lives on a control grid ``field_spacing`` voxels apart, ``G_s`` is a
border-normalized Gaussian of ``smoothing`` control voxels, ``upsample`` is (tri)linear (``align_corners=True``).
``base`` is fixed during the level: the initial transform (evaluated on the level grid, exact on the input grid) plus
what the coarser levels found (interpolated), so the final displacement on the input grid keeps all of a network's
detail and adds the optimized corrections. Adam's ``lr`` is therefore a step in *voxels of the level* per iteration,
the same meaning at every level.

Why smooth parameters: GradICON only penalises the Jacobian of ``Phi_AB o Phi_BA``, so it does not by itself make
each field smooth (in the paper the network supplies that); a free displacement per voxel, moved by Adam's
sign-like steps, turns rough and the objective stalls (table below: 7.4 mm, hardly better than the identity's 9.0). A Gaussian of one
control voxel (or a control grid two voxels apart) is enough, and the full resolution uses a grid two voxels apart,
which is as accurate as one voxel and cheaper.

Defaults and the measurements behind them
-----------------------------------------
Case (``bench/field_cases.py``): the POPI phase-00 CT resized to the network grid as the pipeline does, lung window
[-1000, 0] HU -> [0, 1], pulled through a known smooth exhale-like displacement (15 mm S-I at the lung base, smooth
random part); TRE = mean error (mm) of ``Phi_AB`` / ``Phi_BA`` at 300 random points inside the lungs (identity: 9.04 mm
at 96³, 8.88 mm at 175³, 95th percentile 13 mm). % folds = voxels with det J <= 0; IC = mean
``|Phi_AB(Phi_BA(x)) - x|`` in voxels. 2 CPU cores shared with other jobs (load 6-9), so times are only relative.

Parametrisation, 96³ (voxels 2.9 x 5.2 x 5.2 mm), 3 levels, iterations (100, 50, 25), lr 0.1, lambda 1.5:

=====================================================  ==============  =========  =======
parameters (control spacing per level; smoothing)       TRE AB / BA mm  folds %    IC vox
=====================================================  ==============  =========  =======
1 voxel, none (a free displacement per voxel)           7.39 / 7.31     0.006      0.43
1 voxel, sigma 0.5                                      4.90 / 4.92     0          0.20
1 voxel, sigma 1                                        0.91 / 0.63     0          0.07
1 voxel, sigma 2                                        0.91 / 0.50     0          0.09
2 voxels at every level, none                           0.94 / 0.63     0          0.08
2 voxels at every level, sigma 1                        0.91 / 0.51     0          0.08
(1, 1, 2) coarse to fine, sigma 1 (**default**)         0.92 / 0.52     0          0.08
=====================================================  ==============  =========  =======

(The 96³ runs of this and the next two paragraphs, except the cosine decay, come from an earlier draft that
computed the same loss through ``LNCCLoss`` and drew the jitter on the whole grid before subsampling: same objective,
another random stream; the final code gives 0.919 / 0.525 for the default row. All 175³ runs use the final code.)

Both compositions
-----------------
The paper's term penalises ``Phi_AB o Phi_BA``: ``Phi_BA`` is differentiated at the regular points, ``Phi_AB`` only
where ``Phi_BA`` lands. A network trained on pairs in both orders sees both compositions on average; one pair
optimized in one order does not, and ``Phi_AB`` is then free wherever the images carry no signal (constant in both,
so LNCC has no gradient) and ``Phi_BA`` does not land. Case ``lung-pair`` of ``bench/field_cases.py`` (two patients'
chest CTs, lung window, 3.2 x 3.3 x 3.3 mm voxels at 96³; lung1's field of view ends ~18 slices before lung2's, so
the fixed image is 0 there while the moving image has anatomy): with the one-sided term (lambda 1.5) 1.73 % of
``Phi_AB``'s voxels fold (det J <= 0), every one of them outside the lungs, in those empty slices, where the map
samples the moving image up to 7 voxels beyond its border; lung-mask Dice 0.879 / 0.945, SDlogJ 1.95, mean
inverse-consistency error 3.4 voxels. The same optimization with both compositions (mean of the two terms, each at
its own jittered points), 2 threads:

======================================  ==============  ==================  ============  ======================
96³ (one run each)                      folds AB / BA %  lung Dice AB / BA   IC vox        time s
======================================  ==============  ==================  ============  ======================
one-sided, lambda 1.5 (the former)       1.73 / 0.024     0.879 / 0.945       3.36          9.5
one-sided, reverse order only            0.0002 / 0.63    0.915 / 0.957       3.42          9.9
alternating the order every step         0.009 / 0.11     0.912 / 0.950       1.64          9.8
both, lambda 1.5                         0.016 / 0.074    0.914 / 0.953       1.13          12.3
both, lambda 3 (**default**; seeds 0-2)  0 / 0 (all 3)    0.928-0.931 / 0.944 0.41-0.46     12.4
both, lambda 5                           0 / 0            0.934 / 0.941       0.31          12.2
======================================  ==============  ==================  ============  ======================

At 175³ on this pair: one-sided lambda 1.5 folds 0.71 / 0.002 % (70 s), both with lambda 1.5 0.041 / 0.008 %
(90 s), both with lambda 3 0.0019 / 0.0001 % (Dice 0.911 / 0.944, 89 s), alternating with lambda 3 0.0048 / 0.0002 %
(69 s), both with lambda 3 but each composition on half of the points (every other point along the last axis, to
save time) 0.0034 / 0.0001 % (83 s: the points are not where the time goes). Zero padding of the moving image
instead of border (the pair was padded with air) gave a better Dice A->B at 96³ (0.952) but stray folds
(0.0003-0.0014 % B->A), so the default stays GradICON's border padding.

The other cases did not lose: POPI at 175³ (TRE AB / BA mm) one-sided lambda 1.5 0.70 / 0.46, both with lambda 1.5
0.68 / 0.43, both with lambda 3 **0.63 / 0.42**, alternating lambda 3 0.71 / 0.52, half points 0.67 / 0.47; at 96³
POPI 0.91 / 0.52 -> 0.87 / 0.54, MNI synthetic 0.58 / 0.48 -> 0.58 / 0.51, MNI-Colin brain Dice 0.986 / 0.980 ->
0.986 / 0.979 (one-sided lambda 1.5 -> both with lambda 3), all fold-free. Field IO from the surrogate init at 96³:
POPI 0.83 / 0.43 -> 0.75 / 0.45, MNI synthetic 0.56 / 0.43 -> 0.54 / 0.46. The price is the second composition's
time: ~30 % more per step (70 -> 90 s for the defaults at 175³ on 2 threads).

The tables below were measured with the one-sided term, before this change; they chose the parametrisation, the
learning rate and the iterations, which the symmetric term leaves as they are (its lambda is 3 instead of 1.5).

lambda (GradICON weight, one-sided term), default parametrisation (SDlogJ of ``Phi_AB``):

======  ============================  ==========================  ===================  ============  ============
lambda  96³ TRE AB / BA mm            175³ TRE AB / BA mm         175³ p95 AB / BA mm  175³ folds %  175³ SDlogJ,
                                                                                                     IC vox (max)
======  ============================  ==========================  ===================  ============  ============
0       1.46 / 0.39 (folds 0.02 %)    1.34 / 0.82                 4.22 / 3.95          0.54 / 0.52   1.57, 1.0 (32)
0.5     --                            0.79 / 0.50                 2.02 / 2.17          0 / 0         0.096, 0.17 (1.7)
1.5     0.92 / 0.52                   **0.70 / 0.46**             1.48 / 1.83          0 / 0         0.085, 0.11 (1.0)
5       0.83 / 0.56                   0.74 / 0.62                 2.34 / 2.56          0 / 0         0.078, 0.08 (0.8)
======  ============================  ==========================  ===================  ============  ============

Without the regularizer the two directions are independent problems and one of them (``Phi_AB``, which must warp
the interpolated, smoother image) is clearly worse, and both fold (0.5 % of the voxels at 175³) with a mean inverse-consistency
error of a voxel; GradICON couples the two and transfers the accuracy. 1.5 (the released models' value) was the best TRE at 175³.

Learning rate (96³): 0.05 -> 0.91 / 0.51, 0.1 -> 0.92 / 0.52, 0.2 -> 0.93 / 0.55 (flat: 0.1); a cosine decay of the
rate per level: 0.91 / 0.52 (not worth a knob). Alternating the order of the composition (``Phi_BA o Phi_AB`` every
other step) instead of the paper's one-sided term: 0.92 / 0.53 (no gain).

Iterations per level: in the 175³ history the level-2 (45³) similarity stops improving after ~60 of 100 steps, level 1
(88³) after ~30 of 50, level 0 is still improving at step 25. Fewer full-resolution steps cost accuracy: (100, 50, 10)
-> 0.81 / 0.60 mm against (100, 50, 25) -> 0.70 / 0.46 mm; at 96³ (100, 50, 50) gave no gain over 25 (0.92 / 0.51).
The 25 full-resolution steps already take ~70 % of the run's time (229 of 324 s at 175³, one busy core); doubling
them would cost ~70 % more for a gain that 96³ did not show, so 25 it is. Rechecked with both compositions and
lambda 3 (``bench/FIELD_OPTIMIZATION.md``, session 22): at 175³ (60, 30, 10) gives 1.09 / 0.98 mm in 44 s against
0.63 / 0.42 mm in 89 s for the defaults; at 96³ it is nearly as good as the defaults (POPI 0.83 / 0.58 vs 0.87 / 0.53
mm, MNI synthetic 0.62 / 0.56 vs 0.58 / 0.51 mm) in half the time: on grids of ~100 voxels per axis it is the faster
choice (``--opt_iterations 60,30,10``).

Instance-optimization defaults (init given): one level (the input grid), 50 iterations (the network IO's count),
lr 0.05, control spacing 2, smoothing 1. 96³, started from a stand-in for a network's output (the true maps plus
independent smooth errors of up to 5 mm: TRE 2.04 / 2.52 mm, IC 0.67 voxel): lr 0.05 x 50 -> 0.83 / 0.43; lr 0.1 x 50
-> 0.90 / 0.49; lr 0.02 x 50 -> 0.80 / 0.50; lr 0.1 x 25 -> 0.88 / 0.52; two levels (50, 25) lr 0.1 -> 0.92 / 0.54;
control spacing 1 -> 0.82 / 0.55; all fold-free, IC ~0.1 voxel. At 175³ the defaults take the same kind of
init (1.95 / 2.16 mm) to 0.60 / 0.38 mm, better than from scratch. An init far from the truth (an untrained
network) needs a coarse level too: pass ``levels=2``.

Cost (``bench/FIELD_OPTIMIZATION.md``): one field-IO step at 175³ took 19 s against 298 s for one network-weight IO
step on the same 2 busy cores (15.6x, interleaved; 11.8x and 22.9x in the two rounds), peak RSS 2.3 against 5.5 GiB.
The file also has the accuracy table against identity and ANTs SyN.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from monai_gradicon.coordinate_transforms import CoordinateTransform, DisplacementTransform
from monai_gradicon.losses.regularizers import gradicon_regularizer
from monai_gradicon.losses.similarity import blur_matrix, gaussian_blur, gaussian_kernel1d, separable_matmul
from monai_gradicon.maps import identity_map, sample, warp_image

__all__ = [
    "DEFAULT_FIELD_SPACING",
    "DEFAULT_IO_ITERATIONS",
    "DEFAULT_IO_LEVELS",
    "DEFAULT_IO_LR",
    "DEFAULT_ITERATIONS",
    "DEFAULT_LEVELS",
    "DEFAULT_LMBDA",
    "DEFAULT_LR",
    "DEFAULT_SMOOTHING",
    "FieldOptions",
    "FIELD_REGULARIZERS",
    "MIN_LEVEL_SIZE",
    "SIMILARITIES",
    "check_field_options",
    "FieldOptimizationResult",
    "image_pyramid",
    "level_shapes",
    "optimize_fields",
]

SIMILARITIES = ("lncc", "lncc2", "ssd")
"""``"lncc"``: 1 - mean LNCC (GradICON's); ``"lncc2"``: 1 - mean LNCC² (uniGradICON's ``lncc2``); ``"ssd"``."""
FIELD_REGULARIZERS = ("gradicon_sparse", "gradicon")
_PADDING_MODES = ("border", "zeros", "reflection")
MIN_LEVEL_SIZE = 16
"""Voxels per axis the coarsest pyramid level must keep (smaller grids hold too little image for LNCC windows)."""

DEFAULT_LMBDA = 3.0
DEFAULT_LEVELS = 3
DEFAULT_ITERATIONS = (100, 50, 25)
DEFAULT_LR = 0.1
DEFAULT_FIELD_SPACING = (1, 1, 2)
DEFAULT_SMOOTHING = 1.0
DEFAULT_IO_LEVELS = 1
DEFAULT_IO_ITERATIONS = (50,)
DEFAULT_IO_LR = 0.05


@dataclass
class FieldOptimizationResult:
    """The optimized transforms and the history of the optimization.

    Attributes:
        phi_ab: fixed -> moving, normalized [0, 1] coordinates of the input grid (``sample(moving,
            phi_ab.on_grid(S)) ~ fixed``, as a :class:`~monai_gradicon.networks.GradICONNetwork` returns):
            a :class:`~monai_gradicon.coordinate_transforms.DisplacementTransform` whose displacement
            ``[1, dim, *S]`` (normalized units) lives on the input grid ``S``.
        phi_ba: moving -> fixed, likewise.
        history: one dict per optimization step, its values *before* that step's update: ``level`` (pyramid level,
            0 = the input grid), ``iteration`` (within the level), ``loss`` (``similarity + lmbda * regularizer``),
            ``similarity`` (both directions summed), ``regularizer`` (GradICON, before lambda) and ``seconds`` (wall
            time since the start, at the end of the step).
        seconds: wall time of the whole call (pyramid, optimization and the final fields).
    """

    phi_ab: DisplacementTransform
    phi_ba: DisplacementTransform
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def level_shapes(spatial_shape: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Grid shapes of the pyramid, coarse to fine: level ``l`` has ``ceil((N - 1) / 2^l) + 1`` voxels along an axis
    of ``N``, so its voxels are about ``2^l`` input voxels apart; the last entry is ``spatial_shape`` itself."""
    shape = tuple(int(s) for s in spatial_shape)
    return [tuple(math.ceil((n - 1) / 2**lev) + 1 for n in shape) for lev in range(levels - 1, -1, -1)]


def _border_normalized_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[B, C, *S]`` (``sigma`` voxels, zero padding) divided by the blurred constant 1, so values
    near the border are averages of what is inside rather than pulled towards 0."""
    norm = gaussian_blur(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device), sigma)
    return gaussian_blur(x, sigma) / norm


def image_pyramid(image: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """``image`` ``[1, C, *S]`` on each grid of ``shapes`` (a list of spatial shapes).

    A grid smaller than ``S`` gets a Gaussian anti-aliasing blur of sigma = half the size ratio (in input voxels,
    border-normalized) and then (tri)linear resampling with ``align_corners=True``, so its voxel ``j`` is the image
    at the normalized position ``j / (n - 1)`` -- the same convention as every map here (no sub-voxel offset
    between levels). The grid ``S`` itself returns ``image`` unchanged.
    """
    full = tuple(image.shape[2:])
    mode = "trilinear" if image.ndim == 5 else "bilinear"
    out = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if shape == full:
            out.append(image)
            continue
        ratio = max((n - 1) / max(m - 1, 1) for n, m in zip(full, shape))
        blurred = _border_normalized_blur(image, 0.5 * ratio)
        out.append(F.interpolate(blurred, size=shape, mode=mode, align_corners=True))
    return out


class _TargetLNCC:
    """``1 - mean(LNCC)`` (or ``1 - mean(LNCC²)``) against one fixed target image, exactly the formula of
    :func:`monai_gradicon.losses.similarity.local_ncc` (Gaussian window ``sigma`` voxels, ``eps`` added to each
    local variance), with the target's blurred moments computed once instead of at every step.

    ``__call__(pred [1, C, *S]) -> scalar``; the target ``[1, C, *S]`` does not take gradients.
    """

    def __init__(self, target: torch.Tensor, sigma: float, squared: bool, eps: float = 1e-5) -> None:
        self.target = target
        self.sigma = sigma
        self.squared = squared
        self.eps = eps
        c = target.shape[1]
        with torch.no_grad():
            mu_t, m_tt = torch.split(gaussian_blur(torch.cat([target, target * target], dim=1), sigma), c, dim=1)
            self.mu_t = mu_t
            self.var_t = torch.relu(m_tt - mu_t**2) + eps

    def __call__(self, pred: torch.Tensor) -> torch.Tensor:
        c = pred.shape[1]
        moments = gaussian_blur(torch.cat([pred, pred * self.target, pred * pred], dim=1), self.sigma)
        mu_p, m_pt, m_pp = torch.split(moments, c, dim=1)
        var_p = torch.relu(m_pp - mu_p**2) + self.eps
        ncc = (m_pt - mu_p * self.mu_t) / torch.sqrt(var_p * self.var_t)
        return 1 - (ncc**2 if self.squared else ncc).mean()


class _TargetSSD:
    """``mean((pred - target)²)`` against one fixed target image (:class:`SSDLoss`)."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    def __call__(self, pred: torch.Tensor) -> torch.Tensor:
        return ((pred - self.target) ** 2).mean()


def _similarity_to(target: torch.Tensor, name: str, sigma: float):
    if name == "ssd":
        return _TargetSSD(target)
    return _TargetLNCC(target, sigma, squared=name == "lncc2")


def _per_level(value, levels: int, name: str, kind: type) -> list:
    """An int (or float) for every level, or a sequence of ``levels`` of them, as a list (coarse to fine)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a sequence of {levels} numbers, got {value!r}.")
    if isinstance(value, (int, float)) and not (kind is int and isinstance(value, float)):
        return [value] * levels
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a number or a sequence of {levels} numbers (coarse to fine), got "
                        f"{value!r}.")
    values = list(value)
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries but levels={levels} (one per level, coarse to fine).")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise TypeError(f"{name} entries must be {kind.__name__}s, got {v!r} in {values}.")
    return values


def _fine_aligned(table: Sequence[int], levels: int) -> list[int]:
    """A per-level default for ``levels`` levels from a coarse-to-fine ``table``: the finest levels take the table's
    last entries, levels coarser than the table repeat its first entry."""
    values = list(table)
    return ([values[0]] * max(0, levels - len(values)) + values)[-levels:]


def _check_images(moving: torch.Tensor, fixed: torch.Tensor) -> tuple[int, ...]:
    for name, t in (("moving", moving), ("fixed", fixed)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor [1, C, *S], got {type(t).__name__}.")
        if t.ndim not in (4, 5) or t.shape[0] != 1:
            raise ValueError(f"{name} must be one 2D or 3D image [1, C, *S] (batch 1), got shape {tuple(t.shape)}.")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor (intensities in [0, 1]), got {t.dtype}.")
    if moving.shape != fixed.shape:
        raise ValueError(f"moving and fixed must have the same shape (resize them to one grid first), got "
                         f"{tuple(moving.shape)} and {tuple(fixed.shape)}.")
    if moving.dtype != fixed.dtype or moving.device != fixed.device:
        raise ValueError(f"moving and fixed must share dtype and device, got {moving.dtype} on {moving.device} and "
                         f"{fixed.dtype} on {fixed.device}.")
    for name, t in (("moving", moving), ("fixed", fixed)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or inf).")
    return tuple(int(s) for s in moving.shape[2:])


def _init_displacement(init, name: str, spatial: tuple[int, ...], ref: torch.Tensor) -> torch.Tensor:
    """An initial transform as a detached normalized displacement ``[1, dim, *S]`` on the input grid."""
    dim = len(spatial)
    with torch.no_grad():
        if isinstance(init, CoordinateTransform):
            phi = init.on_grid(spatial)
        elif isinstance(init, torch.Tensor):
            phi = init
        else:
            raise TypeError(f"{name} must be a CoordinateTransform or a map tensor [1, {dim}, *S] (normalized "
                            f"coordinates on the input grid), got {type(init).__name__}.")
        if tuple(phi.shape) != (1, dim, *spatial):
            raise ValueError(f"{name} must give a map of shape {(1, dim, *spatial)} (normalized coordinates on the "
                             f"input grid), got {tuple(phi.shape)}.")
        if not bool(torch.isfinite(phi).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or inf).")
        phi = phi.detach().to(device=ref.device, dtype=ref.dtype)
        return phi - identity_map(spatial, dtype=ref.dtype, device=ref.device)


def _per_axis(values: Sequence[float], ref: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(values), dtype=ref.dtype, device=ref.device).view(1, len(values), *([1] * len(values)))


def _on_grid(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A normalized displacement ``[1, dim, *S']`` evaluated on the grid ``shape`` (trilinear, border padding)."""
    shape = tuple(shape)
    if tuple(u.shape[2:]) == shape:
        return u
    return sample(u, identity_map(shape, dtype=u.dtype, device=u.device))


def _linear_upsample_matrix(n: int, c: int) -> torch.Tensor:
    """``[n, c]`` float64 matrix of 1D linear interpolation from ``c`` nodes to ``n`` with ``align_corners=True``
    (output node ``i`` at input position ``i (c - 1) / (n - 1)``), what ``F.interpolate(..., mode="linear",
    align_corners=True)`` does along one axis."""
    if c == n:
        return torch.eye(n, dtype=torch.float64)
    position = torch.arange(n, dtype=torch.float64) * ((c - 1) / max(n - 1, 1))
    low = position.floor().clamp(max=c - 2).long()
    weight = position - low
    matrix = torch.zeros((n, c), dtype=torch.float64)
    rows = torch.arange(n)
    matrix[rows, low] = 1.0 - weight
    matrix[rows, low + 1] += weight
    return matrix


def _smooth_upsample_matrix(n: int, c: int, smoothing: float) -> torch.Tensor:
    """``[n, c]`` float64: the border-normalized Gaussian of ``smoothing`` control voxels (the kernel of
    :func:`~monai_gradicon.losses.similarity.gaussian_blur`, zero padding, each row divided by its sum: the blur of
    a constant is that constant) followed by linear upsampling to ``n`` nodes. In 3D the blur of zero-padded
    Gaussians divided by the blurred ones is the product of these per-axis operators, exactly."""
    matrix = _linear_upsample_matrix(n, c)
    if smoothing > 0:
        blur = blur_matrix(c, gaussian_kernel1d(smoothing).to(torch.float64))
        matrix = matrix @ (blur / blur.sum(dim=1, keepdim=True))
    return matrix


class _LevelFields:
    """The two displacements of one pyramid level as ``base + smooth(v) / (n - 1)``.

    ``base`` ``[1, dim, *shape]`` (normalized units, fixed) is what the earlier levels (and the initial transforms)
    give on this level's grid; ``v`` ``[1, dim, *control]`` (trainable, voxels of this level) is a control grid
    ``spacing`` voxels apart, blurred with ``smoothing`` (sigma in control voxels, border-normalized) and resampled
    to the level grid by (tri)linear interpolation (``align_corners=True``). Both steps are linear and separable:
    they are applied as one ``[n_k, c_k]`` matrix per axis (:func:`_smooth_upsample_matrix`, three matrix
    products), which is several times cheaper, forward and backward, than a blur followed by ``F.interpolate``.
    """

    def __init__(self, bases: list[torch.Tensor], spacing: int, smoothing: float) -> None:
        self.bases = bases
        self.shape = tuple(bases[0].shape[2:])
        self.control = tuple(math.ceil((n - 1) / spacing) + 1 for n in self.shape)
        ref = bases[0]
        self.params = [torch.zeros((1, len(self.shape), *self.control), dtype=ref.dtype, device=ref.device,
                                   requires_grad=True) for _ in bases]
        self.matrices = [None if c == n and smoothing == 0 else
                         _smooth_upsample_matrix(n, c, float(smoothing)).to(dtype=ref.dtype, device=ref.device)
                         for n, c in zip(self.shape, self.control)]
        self.to_normalized = _per_axis([1.0 / (n - 1) for n in self.shape], ref)

    def displacement(self, k: int) -> torch.Tensor:
        return self.bases[k] + separable_matmul(self.params[k], self.matrices) * self.to_normalized


class _Level:
    """The images and fixed terms of one pyramid level: ``terms(fields) -> (similarity, regularizer)``.

    ``moving``, ``fixed``: ``[1, C, *shape]`` at this level. The similarity compares ``A o Phi_AB`` with B and
    ``B o Phi_BA`` with A (their targets' LNCC moments are computed once here); the regularizer is GradICON on
    ``Phi_AB o Phi_BA`` at a jittered point set ``[1, dim, *P]`` (normalized): every ``stride``-th voxel plus
    Gaussian jitter of sigma ``stride / n_last``, drawn afresh at each call from ``generator`` (CPU) -- the same
    distribution as :func:`~monai_gradicon.losses.regularizers.sparse_jitter_points` (stride 2) and
    :func:`~monai_gradicon.losses.regularizers.jitter_points` (stride 1), drawn only where it is used.
    """

    def __init__(self, moving: torch.Tensor, fixed: torch.Tensor, similarity: str, sigma: float, regularizer: str,
                 padding_mode: str) -> None:
        self.moving, self.fixed = moving, fixed
        self.shape = tuple(moving.shape[2:])
        self.to_fixed = _similarity_to(fixed, similarity, sigma)
        self.to_moving = _similarity_to(moving, similarity, sigma)
        self.padding_mode = padding_mode
        self.identity = identity_map(self.shape, dtype=moving.dtype, device=moving.device)
        stride = 2 if regularizer == "gradicon_sparse" else 1
        self.point_grid = self.identity[(slice(None), slice(None), *[slice(None, None, stride)] * len(self.shape))]
        self.jitter = stride / self.shape[-1]

    def points(self, generator: torch.Generator) -> torch.Tensor:
        """A fresh jittered point set ``[1, dim, *P]`` (normalized coordinates of this level)."""
        noise = torch.randn(self.point_grid.shape, generator=generator)
        return self.point_grid + self.jitter * noise.to(device=self.point_grid.device, dtype=self.point_grid.dtype)

    def terms(self, fields: _LevelFields, generator: torch.Generator, regularize: bool, delta: float,
              symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(similarity, regularizer)``: the regularizer is GradICON on ``Phi_AB o Phi_BA`` (the paper's term) or,
        with ``symmetric``, the mean of that and GradICON on ``Phi_BA o Phi_AB``, each at its own point set."""
        u_ab, u_ba = fields.displacement(0), fields.displacement(1)
        warped_moving = warp_image(self.moving, self.identity + u_ab, padding_mode=self.padding_mode)
        warped_fixed = warp_image(self.fixed, self.identity + u_ba, padding_mode=self.padding_mode)
        similarity = self.to_fixed(warped_moving) + self.to_moving(warped_fixed)
        phi_ab, phi_ba = DisplacementTransform(u_ab), DisplacementTransform(u_ba)
        with torch.set_grad_enabled(regularize and torch.is_grad_enabled()):
            reg = gradicon_regularizer(phi_ab, phi_ba, self.points(generator), delta)
            if symmetric:
                reg = 0.5 * (reg + gradicon_regularizer(phi_ba, phi_ab, self.points(generator), delta))
        return similarity, reg


class _Adam:
    """Adam without weight decay (Kingma & Ba), the same update as ``torch.optim.Adam``'s default (single-tensor,
    not capturable) path, operation for operation, so the two give identical parameters step for step on the CPU
    (``tests/test_field_optimization.py``). Written out because constructing any ``torch.optim`` optimizer imports
    ``torch._dynamo``, 0.8 s per process (measured: about 7 % of a whole 96³ optimization).

    ``params``: leaf tensors with ``.grad`` set by ``backward``; ``step()`` updates them in place.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        step_size = self.lr / bias_correction1
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(self.eps), value=-step_size)


@dataclass(frozen=True)
class FieldOptions:
    """The resolved per-level options of one field optimization (defaults filled in, every value checked).

    Attributes:
        lmbda: weight of the GradICON term (>= 0).
        levels: pyramid levels (>= 1).
        iterations: Adam steps per level, coarse to fine.
        lr: Adam learning rate, voxels of the level per step.
        field_spacing: control-grid spacing per level, coarse to fine, voxels of the level.
    """

    lmbda: float
    levels: int
    iterations: tuple[int, ...]
    lr: float
    field_spacing: tuple[int, ...]


def check_field_options(
    spatial_shape: Sequence[int],
    *,
    from_init: bool,
    similarity: str = "lncc",
    sigma: float = 5.0,
    lmbda: float | None = None,
    levels: int | None = None,
    iterations: int | Sequence[int] | None = None,
    lr: float | None = None,
    field_spacing: int | Sequence[int] | None = None,
    smoothing: float = DEFAULT_SMOOTHING,
    regularizer: str = "gradicon_sparse",
    symmetric: bool = True,
    delta: float = 1e-3,
    padding_mode: str = "border",
) -> FieldOptions:
    """Check the options of :func:`optimize_fields` for an input grid ``spatial_shape`` (``S``, voxels) and fill in
    the defaults (``from_init``: field-level instance optimization after a network, whose defaults differ), so a
    pipeline can refuse bad settings before any long work. Raises ValueError / TypeError naming the option."""
    spatial = tuple(int(n) for n in spatial_shape)
    io = from_init
    if levels is None:
        # the default count, or fewer where the image is too thin for it (a CT of 48 slices gets 2 levels)
        levels = DEFAULT_IO_LEVELS if io else DEFAULT_LEVELS
        while levels > 1 and min(level_shapes(spatial, levels)[0]) < MIN_LEVEL_SIZE:
            levels -= 1
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a whole number >= 1, got {levels!r}.")
    shapes = level_shapes(spatial, levels)
    if min(shapes[0]) < MIN_LEVEL_SIZE:
        if levels == 1:
            raise ValueError(f"The image of shape {spatial} is too small: field optimization needs at least "
                             f"{MIN_LEVEL_SIZE} voxels per axis.")
        raise ValueError(f"levels={levels} is too many for an image of shape {spatial}: the coarsest level would be "
                         f"{shapes[0]}, smaller than {MIN_LEVEL_SIZE} voxels per axis (use fewer levels).")
    if iterations is None:
        iterations = list(DEFAULT_IO_ITERATIONS) if io and levels == 1 else _fine_aligned(DEFAULT_ITERATIONS, levels)
    iterations = _per_level(iterations, levels, "iterations", int)
    if any(i < 1 for i in iterations):
        raise ValueError(f"every level needs at least one iteration, got iterations={iterations}.")
    if field_spacing is None:
        field_spacing = _fine_aligned(DEFAULT_FIELD_SPACING, levels)
    spacings = _per_level(field_spacing, levels, "field_spacing", int)
    if any(s < 1 for s in spacings):
        raise ValueError(f"field_spacing entries must be >= 1 voxel, got {spacings}.")
    if lr is None:
        lr = DEFAULT_IO_LR if io else DEFAULT_LR
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}.")
    if regularizer not in FIELD_REGULARIZERS:
        raise ValueError(f"regularizer must be one of {FIELD_REGULARIZERS}, got {regularizer!r}.")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}.")
    for name, value, low in (("sigma", sigma, 0.0), ("lr", lr, 0.0), ("delta", delta, 0.0)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > low):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    if lmbda is None:
        lmbda = DEFAULT_LMBDA
    if isinstance(lmbda, bool) or not (isinstance(lmbda, (int, float)) and math.isfinite(lmbda) and lmbda >= 0):
        raise ValueError(f"lmbda must be a finite number >= 0, got {lmbda!r}.")
    if not (isinstance(smoothing, (int, float)) and math.isfinite(smoothing) and smoothing >= 0):
        raise ValueError(f"smoothing must be a finite number >= 0 (0 = none), got {smoothing!r}.")
    return FieldOptions(float(lmbda), int(levels), tuple(int(i) for i in iterations), float(lr),
                        tuple(int(v) for v in spacings))


def optimize_fields(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    *,
    init_ab: CoordinateTransform | torch.Tensor | None = None,
    init_ba: CoordinateTransform | torch.Tensor | None = None,
    similarity: str = "lncc",
    sigma: float = 5.0,
    lmbda: float | None = None,
    levels: int | None = None,
    iterations: int | Sequence[int] | None = None,
    lr: float | None = None,
    field_spacing: int | Sequence[int] | None = None,
    smoothing: float = DEFAULT_SMOOTHING,
    regularizer: str = "gradicon_sparse",
    symmetric: bool = True,
    delta: float = 1e-3,
    padding_mode: str = "border",
    seed: int = 0,
    progress: bool = False,
) -> FieldOptimizationResult:
    """Register ``moving`` (A) to ``fixed`` (B) by optimizing ``Phi_AB`` and ``Phi_BA`` directly (see the module
    docstring for the objective, the parametrisation and the measurements behind every default).

    Every setting is checked before any work; a non-finite loss during the optimization raises
    :class:`FloatingPointError` naming the step.

    Args:
        moving: ``[1, C, *S]`` moving image A (2D or 3D), preprocessed (intensities in [0, 1]) and on the same grid
            as ``fixed``.
        fixed: ``[1, C, *S]`` fixed image B, same shape, dtype and device.
        init_ab: initial ``Phi_AB`` (fixed -> moving): a :class:`CoordinateTransform` (e.g. a network's output) or a
            map ``[1, dim, *S]`` in normalized [0, 1] coordinates of the input grid. Evaluated once on the input grid
            without gradients. ``None`` (with ``init_ba`` ``None``): start from the identity.
        init_ba: initial ``Phi_BA`` (moving -> fixed), likewise; give both or neither.
        similarity: ``"lncc"`` (1 - mean LNCC, GradICON's), ``"lncc2"`` (1 - mean LNCC², rewards anti-correlation
            too) or ``"ssd"`` (mean squared difference; lambda and lr were measured for LNCC only).
        sigma: LNCC Gaussian window, in voxels of each level.
        lmbda: weight of the GradICON term (>= 0; 0 switches it off, it is still reported). Default
            ``DEFAULT_LMBDA`` (3, measured with the symmetric term).
        levels: pyramid levels (>= 1; the coarsest must keep ``MIN_LEVEL_SIZE`` voxels per axis). Default 3 from
            scratch (fewer where an axis is too short for 3: 2 for 30-57 voxels, 1 for 16-29), 1 with an init.
        iterations: Adam steps per level, one int for all or one per level (coarse to fine), each >= 1. Default
            (100, 50, 25) for the last three levels (100 for any coarser), 50 for a one-level run from an init.
        lr: Adam learning rate, in voxels of the level per step. Default 0.1 from scratch, 0.05 with an init.
        field_spacing: control-grid spacing in voxels of each level (int or one per level, coarse to fine). Default
            2 at the finest level and 1 at the coarser ones.
        smoothing: Gaussian sigma applied to the control grid, in control voxels (0: none).
        regularizer: ``"gradicon_sparse"`` (the released models' points: every other voxel, jitter 2 / N_last) or
            ``"gradicon"`` (every voxel, jitter 1 / N_last).
        symmetric: penalise both compositions, ``Phi_AB o Phi_BA`` and ``Phi_BA o Phi_AB`` (the mean of the two
            GradICON terms, each at its own jittered points; default), instead of the paper's ``Phi_AB o Phi_BA``
            only. The one-sided term constrains ``Phi_AB`` only where ``Phi_BA`` lands, and lets it fold where the
            images give no signal (module docstring).
        delta: finite-difference step of the GradICON term, normalized units.
        padding_mode: how images are sampled outside their grid while warping (``"border"``, GradICON's, or
            ``"zeros"``, uniGradICON's, or ``"reflection"``).
        seed: seed of the jitter generator (same seed, same inputs, same device: same result).
        progress: show a tqdm progress bar.

    Returns:
        :class:`FieldOptimizationResult`: the two transforms on the input grid, the per-step history (values before
        each update) and the wall time.
    """
    spatial = _check_images(moving, fixed)
    dim = len(spatial)
    io = init_ab is not None or init_ba is not None
    if io and (init_ab is None or init_ba is None):
        raise ValueError("init_ab and init_ba must be given together (both transforms of the pair) or not at all.")
    options = check_field_options(spatial, from_init=io, similarity=similarity, sigma=sigma, lmbda=lmbda,
                                  levels=levels, iterations=iterations, lr=lr, field_spacing=field_spacing,
                                  smoothing=smoothing, regularizer=regularizer, symmetric=symmetric, delta=delta,
                                  padding_mode=padding_mode)
    lmbda, levels, iterations, lr = options.lmbda, options.levels, options.iterations, options.lr
    spacings = options.field_spacing
    shapes = level_shapes(spatial, levels)

    start = time.perf_counter()
    init: list[torch.Tensor | None] = [None, None]
    if io:
        init = [_init_displacement(init_ab, "init_ab", spatial, moving),
                _init_displacement(init_ba, "init_ba", spatial, moving)]
    moving_pyramid = image_pyramid(moving, shapes)
    fixed_pyramid = image_pyramid(fixed, shapes)
    generator = torch.Generator().manual_seed(int(seed))
    corrections: list[list[torch.Tensor]] = [[], []]  # per direction, what each finished level added
    history: list[dict[str, float]] = []
    final: list[torch.Tensor] = []
    bar = tqdm(total=sum(iterations), desc="field optimization", unit="step", disable=not progress, leave=False)
    try:
        for index, (shape, steps, spacing) in enumerate(zip(shapes, iterations, spacings)):
            with torch.no_grad():
                bases = []
                for k in range(2):
                    base = torch.zeros((1, dim, *shape), dtype=moving.dtype, device=moving.device)
                    if init[k] is not None:
                        base = base + _on_grid(init[k], shape)
                    for c in corrections[k]:
                        base = base + _on_grid(c, shape)
                    bases.append(base)
            fields = _LevelFields(bases, spacing, smoothing)
            level = _Level(moving_pyramid[index], fixed_pyramid[index], similarity, float(sigma), regularizer,
                           padding_mode)
            optimizer = _Adam(fields.params, lr=lr)
            for it in range(steps):
                optimizer.zero_grad()
                sim_value, reg = level.terms(fields, generator, lmbda > 0, delta, symmetric)
                loss = sim_value + lmbda * reg
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"The field optimization loss became {loss_value} at step {len(history)} (level "
                        f"{levels - 1 - index}, grid {shape}, iteration {it} of {steps}): similarity "
                        f"{float(sim_value.detach())}, regularizer {float(reg.detach())}. Lower lr (now {lr}) or "
                        "check the images.")
                loss.backward()
                optimizer.step()
                history.append({"level": float(levels - 1 - index), "iteration": float(it), "loss": loss_value,
                                "similarity": float(sim_value.detach()), "regularizer": float(reg.detach()),
                                "seconds": time.perf_counter() - start})
                bar.update(1)
            with torch.no_grad():
                final = [fields.displacement(k) for k in range(2)]
                for k in range(2):
                    corrections[k].append(final[k] - bases[k])
    finally:
        bar.close()
    return FieldOptimizationResult(DisplacementTransform(final[0]), DisplacementTransform(final[1]), history,
                                   time.perf_counter() - start)
