"""Optimization-based affine pre-alignment in physical space (torch, CPU or GPU).

Convention of every matrix here (the direction of our displacement fields, ``monai_gradicon.resample``): a
``(4, 4)`` float64 matrix ``M`` maps a **fixed** world point ``x`` (RAS+ mm) to the **moving** world point
``y = M @ [x, 1]`` that should show the same anatomy. Resampling the moving image at ``M x`` for every fixed voxel
``x`` puts it on the fixed grid (:func:`warp_affine`); ITK, SimpleITK, ANTs and 3D Slicer call this transform the
fixed -> moving *resampling* transform (:func:`write_itk_affine` writes it for them, in their LPS convention).
For 2D images the matrix acts on world (x, y) through rows and columns (0, 1, 3) and is the identity on z.

Method (:func:`register_affine`; measurements behind the defaults in ``bench/affine_vs_ants.py``):

* **Pyramid** (``levels``, mm, coarse to fine): each image is block-averaged on its *own* grid by integer factors
  ``round(s / spacing)`` per axis (the level grid's voxel -> world affine follows) and blurred so that its total blur
  is a Gaussian of std ``s / 2`` mm. Fixed and moving keep their own sizes, spacings and directions; nothing is
  resampled before the optimization. Levels finer than both images come out identical and run once.
* **Intensities** are mapped to ``[0, 1]`` between robust percentiles (:data:`PERCENTILES`) of each image (inside
  its mask when one is given), clipped: CT HU and MR values alike.
* **Initialisation** (``init``): ``"com"`` matches the intensity-weighted centres of mass of each image's foreground
  (Otsu threshold of the normalised intensities, inside the mask when given); ``"centre"`` matches the centres of
  the two image boxes; ``"identity"`` starts from ``M = I``. Rotations and linear changes are always about the fixed
  foreground's centre of mass ``c``: ``y = A (x - c) + c + t``.
* **Rotation search** (``search_rotations``): at the coarsest level of the first stage that rotates, the similarity
  is evaluated for 27 start rotations (0 and +-:data:`SEARCH_DEGREES` about each axis, all combinations; 5 in 2D)
  and the :data:`SEARCH_STARTS` best are optimised; the best end wins. This is what recovers 30 degrees about all
  three axes at once.
* **Stages** (``"translation"``, ``"rigid"``, ``"affine"``): each starts from the previous one's ``(A, t)`` and
  optimises a change of it: ``t``; ``A = R(w) A_prev`` (rotation vector ``w``, matrix exponential) and ``t``;
  ``A = A_prev + L`` and ``t``. Parameters are scaled so that one unit moves the foreground by about one millimetre
  (rotations and linear terms times the foreground's RMS radius). By default the earlier stages run on the coarser
  half of the levels and the last stage on all of them.
* **Optimiser**: BFGS on the similarity's autograd gradient (float64 parameters, float32 images), Armijo
  backtracking; the first step of a level moves the parameters by ``lr`` times the level spacing (mm).
* **Similarity** (``similarity``): ``"mi"`` (default; any modality) is the mutual information of a joint histogram
  with cubic B-spline Parzen windows (:data:`MI_BINS` bins) at :data:`MI_MAX_POINTS` fixed voxels drawn once per
  level (seeded); ``"lncc"`` (same modality) is the normalised cross-correlation of windows of :data:`LNCC_WINDOW`
  level voxels (a window around every voxel on small grids, non-overlapping blocks with contrast on large ones),
  summed over the windows. Both are evaluated in the box around the fixed foreground (the fixed mask when given);
  fixed points whose moving point leaves the moving image (or ``moving_mask``) fade out over one level voxel.
  Neither compares intensities directly, so the two images need no common scale.

Bad input (NaN values, 2D with 3D, masks of the wrong shape or empty, unknown names, zero iterations...) raises a
``ValueError`` or ``TypeError`` that names the problem before any optimization starts. The input images and masks
are never modified.
"""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from monai_gradicon.io import Image
from monai_gradicon.io_utils import atomic_write_text
from monai_gradicon.resample import Grid, warp_physical

__all__ = [
    "AffineResult",
    "register_affine",
    "affine_displacement",
    "warp_affine",
    "transform_points",
    "centre_of_mass",
    "write_itk_affine",
    "read_itk_affine",
    "matrix_to_itk_parameters",
    "itk_parameters_to_matrix",
    "SIMILARITIES",
    "STAGES",
    "INITS",
    "DEFAULT_LEVELS",
    "DEFAULT_ITERATIONS",
    "DEFAULT_LR",
]

SIMILARITIES = ("lncc", "mi")
STAGES = ("translation", "rigid", "affine")
INITS = ("com", "centre", "identity")

DEFAULT_LEVELS = (8.0, 4.0, 2.0, 1.0)
"""Level spacings in mm, coarse to fine. The 1 mm level lowers the MI error on 1 mm brains (Colin27: 0.052 -> 0.034 mm
mean) at little cost: MI works on a fixed number of points."""
DEFAULT_ITERATIONS = 20
"""BFGS iterations per level and stage when ``iterations`` is not given (stages before the last run on the coarser
half of the levels only, rounded up)."""
DEFAULT_LR = 0.5
"""Length of the first optimisation step of a level, in mm per mm of level spacing (later steps come from the
BFGS model)."""
MAX_BACKTRACKS = 8
"""A step is halved at most this many times before a level is taken as converged."""
TOLERANCE = 0.02
"""A level ends when a step moves no parameter by more than this fraction of the first step."""

PERCENTILES = (0.5, 99.5)
"""Intensities between these percentiles of an image are mapped linearly to [0, 1], the rest clipped."""
LNCC_WINDOW = 5
"""LNCC windows: this many fixed level voxels per axis (odd)."""
LNCC_DENSE_VOXELS = 150_000
"""Fixed crops up to this many voxels get a window around every voxel; larger ones non-overlapping blocks."""
LNCC_MIN_STD = 0.01
"""Windows whose fixed intensities (normalised to [0, 1]) vary less than this are left out (flat: no correlation)."""
LNCC_MAX_BLOCKS = 4096
"""At most this many blocks per level (a seeded random subset when there are more)."""
LNCC_EPS = 1e-6
"""Added under the square root of the product of the local variances (intensities in [0, 1]): far below the smallest
product of windows with contrast (``LNCC_MIN_STD^4``), so it only keeps flat moving windows finite."""
MI_BINS = 32
MI_MAX_POINTS = 40000
SAMPLING_SEED = 0
"""Seed of the random choice of MI points and LNCC blocks (the same points at every evaluation of a level)."""
SEARCH_DEGREES = 25.0
"""Step of the rotation search at the coarsest level (see ``search_rotations``)."""
SEARCH_STARTS = 3
"""How many of the best-scoring search rotations are optimised at the coarsest level."""
MIN_RADIUS_MM = 10.0
"""Lower bound of the RMS foreground radius that scales rotation and linear parameters to mm."""
CROP_MARGIN_MM = 10.0
"""Margin around the fixed foreground box (and at least three LNCC windows) kept in the fixed level grids."""
MIN_LEVEL_VOXELS = 4
"""A level grid keeps at least this many voxels per axis (block factors are reduced for small images)."""

_ITK_HEADER = "#Insight Transform File V1.0"


@dataclass
class AffineResult:
    """Result of :func:`register_affine`.

    Attributes:
        matrix: ``(4, 4)`` float64: fixed world point ``x`` (RAS+ mm) -> moving world point ``y = matrix @ [x, 1]``
            (the fixed -> moving resampling transform, the direction of our displacement fields).
        stage_matrices: the matrix after each step, same convention: ``"init"`` then one entry per stage name.
        history: one dict per (stage, level) that ran: ``stage``, ``level`` (index into ``levels``),
            ``spacing_mm``, ``iterations`` (the limit), ``evaluations`` (similarity evaluations), ``similarity``
            (final value of the maximised similarity: MI in nats, or the LNCC sum per window, at most 1),
            ``seconds``, ``matrix`` (after this level); the search level also has ``starts`` (one record per
            optimised start rotation).
        seconds: wall time of the whole registration (including the pyramid), seconds.
        centre: ``[dim]`` world mm (RAS+): the fixed foreground centre of mass that rotations are about.
    """

    matrix: np.ndarray
    stage_matrices: dict[str, np.ndarray]
    history: list[dict]
    seconds: float
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))


# ----------------------------------------------------------------------------------------------------------------
# matrices and points
# ----------------------------------------------------------------------------------------------------------------


def _embed(small: np.ndarray, ndim: int) -> np.ndarray:
    """``(ndim + 1) x (ndim + 1)`` world affine -> ``(4, 4)`` (2D: rows and columns (0, 1, 3), identity on z)."""
    if ndim == 3:
        return np.array(small, dtype=np.float64)
    full = np.eye(4)
    full[np.ix_([0, 1, 3], [0, 1, 3])] = small
    return full


def _restrict(matrix: np.ndarray, ndim: int) -> np.ndarray:
    """``(4, 4)`` -> ``(ndim + 1) x (ndim + 1)``; for 2D the matrix must not mix z with x, y."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if ndim == 3:
        return matrix
    if np.abs(matrix[[0, 1], 2]).max() > 0 or np.abs(matrix[2, [0, 1, 3]]).max() > 0 or matrix[2, 2] != 1:
        raise ValueError(f"The matrix is used for 2D images but mixes z with the in-plane axes:\n{matrix}")
    return matrix[np.ix_([0, 1, 3], [0, 1, 3])]


def _check_matrix(matrix, what: str = "matrix") -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"The {what} must be a (4, 4) world affine (fixed RAS mm -> moving RAS mm), got shape "
                         f"{matrix.shape}.")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"The {what} has non-finite entries:\n{matrix}")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"The last row of the {what} must be [0, 0, 0, 1], got {matrix[3]}.")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError(f"The {what} is singular:\n{matrix}")
    return matrix


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map world points ``[K, 3]`` (or ``[K, 2]`` for 2D: world x, y) with a ``(4, 4)`` matrix -> ``[K, dim]`` mm."""
    matrix = _check_matrix(matrix)
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] not in (2, 3):
        raise ValueError(f"points must be [K, 3] (or [K, 2]) world mm, got shape {points.shape}.")
    small = _restrict(matrix, points.shape[1])
    return points @ small[:-1, :-1].T + small[:-1, -1]


def affine_displacement(matrix: np.ndarray, grid: Grid) -> np.ndarray:
    """The displacement ``u(x) = M x - x`` of a world affine on a grid: ``[dim, *grid.shape]`` float32, world mm
    (RAS+), as :func:`monai_gradicon.resample.warp_physical` and the mm fields of ``monai_gradicon.io`` take it."""
    small = _restrict(_check_matrix(matrix), grid.ndim)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid.shape], indexing="ij"), axis=0)
    lin = small[:-1, :-1] - np.eye(grid.ndim)
    # u = (M - I) (A i) + m  with world x = A i
    world = np.einsum("ij,j...->i...", grid.matrix, idx) + grid.offset.reshape(-1, *([1] * grid.ndim))
    u = np.einsum("ij,j...->i...", lin, world) + small[:-1, -1].reshape(-1, *([1] * grid.ndim))
    return u.astype(np.float32)


def warp_affine(
    moving: Image,
    fixed_grid: Grid,
    matrix: np.ndarray,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Resample the moving image onto the fixed grid through ``matrix``: the value at fixed voxel ``i`` is the moving
    image at world point ``M (A_fixed i)`` (linear or nearest interpolation, :func:`warp_physical` semantics).

    Returns:
        ``[*fixed_grid.shape]`` float32 (``"bilinear"``) or float64 (``"nearest"``).
    """
    if not isinstance(moving, Image):
        raise TypeError(f"moving must be a monai_gradicon.io.Image, got {type(moving).__name__}.")
    if moving.ndim != fixed_grid.ndim:
        raise ValueError(f"The moving image is {moving.ndim}D but the fixed grid is {fixed_grid.ndim}D.")
    u = affine_displacement(matrix, fixed_grid)
    return warp_physical(moving.array, Grid.of(moving), u, fixed_grid, mode=mode, padding_mode=padding_mode,
                         device=device)


# ----------------------------------------------------------------------------------------------------------------
# ITK transform files
# ----------------------------------------------------------------------------------------------------------------


def _lps_flip(ndim: int) -> np.ndarray:
    return np.diag([-1.0, -1.0] + [1.0] * (ndim - 1))


def matrix_to_itk_parameters(matrix: np.ndarray, ndim: int = 3) -> np.ndarray:
    """Our ``(4, 4)`` RAS matrix -> ITK ``AffineTransform`` parameters (LPS, centre 0): ``ndim * ndim`` row-major
    matrix entries then ``ndim`` translations (float64), so that ITK's ``T(p) = A p + t`` maps fixed LPS points to
    moving LPS points."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}.")
    small = _restrict(_check_matrix(matrix), ndim)
    flip = _lps_flip(ndim)
    lps = flip @ small @ flip
    return np.concatenate([lps[:ndim, :ndim].ravel(), lps[:ndim, ndim]])


def itk_parameters_to_matrix(parameters: Sequence[float], fixed_parameters: Sequence[float] | None = None) -> np.ndarray:
    """ITK ``AffineTransform`` / ``MatrixOffsetTransformBase`` parameters (LPS; ``fixed_parameters`` = the centre,
    zero when absent) -> our ``(4, 4)`` RAS matrix. 12 parameters give a 3D transform, 6 a 2D one."""
    params = np.asarray(parameters, dtype=np.float64).ravel()
    if params.size == 12:
        ndim = 3
    elif params.size == 6:
        ndim = 2
    else:
        raise ValueError(f"An ITK affine has 12 (3D) or 6 (2D) parameters, got {params.size}.")
    centre = np.zeros(ndim) if fixed_parameters is None else np.asarray(fixed_parameters, dtype=np.float64).ravel()
    if centre.size != ndim:
        raise ValueError(f"An ITK {ndim}D affine has {ndim} fixed parameters (its centre), got {centre.size}.")
    a = params[: ndim * ndim].reshape(ndim, ndim)
    t = params[ndim * ndim:]
    lps = np.eye(ndim + 1)
    lps[:ndim, :ndim] = a
    lps[:ndim, ndim] = t + centre - a @ centre  # T(p) = A (p - c) + c + t
    flip = _lps_flip(ndim)
    return _check_matrix(_embed(flip @ lps @ flip, ndim), "matrix read from the ITK transform")


def write_itk_affine(path: str | os.PathLike, matrix: np.ndarray, ndim: int = 3) -> str:
    """Write ``matrix`` (fixed RAS mm -> moving RAS mm) as an ITK text transform file (``.tfm`` / ``.txt``).

    The file holds one ``AffineTransform_double_{ndim}_{ndim}`` in LPS with centre 0: ITK, SimpleITK
    (``ReadTransform``), ANTs (``antsApplyTransforms -t``) and 3D Slicer read it as the fixed -> moving resampling
    transform, so resampling the moving image onto the fixed grid with it gives :func:`warp_affine`'s image.
    ``ndim=2`` writes the in-plane part of a 2D matrix. The file is written atomically. Returns the path.
    """
    params = matrix_to_itk_parameters(matrix, ndim)
    text = "\n".join([
        _ITK_HEADER,
        "#Transform 0",
        f"Transform: AffineTransform_double_{ndim}_{ndim}",
        "Parameters: " + " ".join(repr(float(v)) for v in params),
        "FixedParameters: " + " ".join(["0"] * ndim),
        "",
    ])
    return atomic_write_text(path, text)


_ITK_AFFINE_TYPE = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_([23])_([23])$")


def read_itk_affine(path: str | os.PathLike) -> np.ndarray:
    """Read one ITK affine transform file -> our ``(4, 4)`` RAS matrix (fixed RAS mm -> moving RAS mm).

    Reads ITK text files (``.tfm`` / ``.txt``: ``AffineTransform`` or ``MatrixOffsetTransformBase``, double or
    float, 2D or 3D, any centre) and ITK's MATLAB files (``.mat``, as ANTs writes them). A file with several
    transforms, or another transform type, raises a ``ValueError`` that names it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The ITK transform file does not exist: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"#Insight Transform File"):
        return _read_itk_text(data.decode("latin-1"), path)
    return _read_itk_matlab(data, path)


def _read_itk_text(text: str, path: str) -> np.ndarray:
    transforms: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"{path}: malformed ITK transform line {line!r}.")
        key = key.strip()
        if key == "Transform":
            transforms.append({"Transform": value.strip()})
        elif not transforms:
            raise ValueError(f"{path}: {key!r} before any 'Transform:' line.")
        else:
            transforms[-1][key] = value.strip()
    if len(transforms) != 1:
        kinds = [t["Transform"] for t in transforms]
        raise ValueError(f"{path} holds {len(transforms)} transforms {kinds}; read_itk_affine reads exactly one "
                         "affine transform.")
    entry = transforms[0]
    kind = entry["Transform"]
    match = _ITK_AFFINE_TYPE.match(kind)
    if match is None or match.group(3) != match.group(4):
        raise ValueError(f"{path}: transform type {kind!r} is not an ITK affine (AffineTransform or "
                         "MatrixOffsetTransformBase, 2D or 3D).")
    ndim = int(match.group(3))
    for key in ("Parameters", "FixedParameters"):
        if key not in entry:
            raise ValueError(f"{path}: the transform has no {key!r} line.")
    try:
        params = [float(v) for v in entry["Parameters"].split()]
        fixed = [float(v) for v in entry["FixedParameters"].split()]
    except ValueError as exc:
        raise ValueError(f"{path}: non-numeric transform parameters: {exc}") from exc
    if len(params) != ndim * ndim + ndim or len(fixed) != ndim:
        raise ValueError(f"{path}: a {ndim}D {kind} needs {ndim * ndim + ndim} parameters and {ndim} fixed "
                         f"parameters, got {len(params)} and {len(fixed)}.")
    return itk_parameters_to_matrix(params, fixed)


def _read_itk_matlab(data: bytes, path: str) -> np.ndarray:
    """ITK's MATLAB v4 transform files: matrices named ``<TransformType>`` (parameters) and ``fixed`` (centre)."""
    variables: dict[str, np.ndarray] = {}
    pos = 0
    while pos < len(data):
        if len(data) - pos < 20:
            raise ValueError(f"{path}: not an ITK text transform and not a MATLAB v4 transform file (truncated "
                             "header).")
        header = None
        for endian in ("<", ">"):
            mopt, rows, cols, imag, namlen = struct.unpack(endian + "5i", data[pos:pos + 20])
            if 0 <= mopt < 5000 and 0 < namlen < 256 and rows >= 0 and cols >= 0 and imag in (0, 1):
                header = (endian, mopt, rows, cols, imag, namlen)
                break
        if header is None:
            raise ValueError(f"{path}: not an ITK text transform and not a MATLAB v4 transform file.")
        endian, mopt, rows, cols, imag, namlen = header
        precision = (mopt // 10) % 10
        dtypes = {0: "f8", 1: "f4", 2: "i4", 3: "i2", 4: "u2", 5: "u1"}
        if precision not in dtypes or imag:
            raise ValueError(f"{path}: unsupported MATLAB matrix type {mopt} in a transform file.")
        pos += 20
        name = data[pos:pos + namlen].rstrip(b"\x00").decode("latin-1")
        pos += namlen
        dtype = np.dtype(endian + dtypes[precision])
        count = rows * cols
        if len(data) - pos < count * dtype.itemsize:
            raise ValueError(f"{path}: truncated MATLAB matrix {name!r}.")
        values = np.frombuffer(data, dtype=dtype, count=count, offset=pos).astype(np.float64)
        pos += count * dtype.itemsize
        variables[name] = values.reshape(cols, rows).T.ravel(order="F")  # column-major, a vector here
    kinds = [k for k in variables if k != "fixed"]
    if len(kinds) != 1 or "fixed" not in variables:
        raise ValueError(f"{path}: expected one transform and its 'fixed' centre, found variables {sorted(variables)}.")
    match = _ITK_AFFINE_TYPE.match(kinds[0])
    if match is None or match.group(3) != match.group(4):
        raise ValueError(f"{path}: transform type {kinds[0]!r} is not an ITK affine.")
    return itk_parameters_to_matrix(variables[kinds[0]], variables["fixed"])


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------


def _check_image(image, name: str) -> None:
    if not isinstance(image, Image):
        raise TypeError(f"The {name} must be a monai_gradicon.io.Image (use monai_gradicon.io.read_image), got "
                        f"{type(image).__name__}.")
    array = image.array
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"The {name} ({image.describe()}) has non-numeric dtype {array.dtype}.")
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ValueError(f"The {name} ({image.describe()}) has {bad} NaN or infinite voxels; replace them "
                             "(e.g. np.nan_to_num) or mask them out first.")
    if np.iscomplexobj(array):
        raise ValueError(f"The {name} ({image.describe()}) is complex-valued.")
    if min(image.shape) < 2:
        raise ValueError(f"The {name} ({image.describe()}) has shape {image.shape}: every axis needs 2 voxels.")


def _check_mask(mask, image: Image, name: str) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, Image):
        raise TypeError(f"The {name} must be an array on its image's grid, not an Image (pass mask.array after "
                        "checking that its affine matches the image's).")
    mask = np.asarray(mask)
    if mask.shape != image.shape:
        raise ValueError(f"The {name} has shape {mask.shape} but its image has shape {image.shape}; a mask must be "
                         "on its image's voxel grid.")
    if not (np.issubdtype(mask.dtype, np.number) or mask.dtype == np.bool_):
        raise ValueError(f"The {name} has non-numeric dtype {mask.dtype}.")
    if np.issubdtype(mask.dtype, np.floating) and not np.all(np.isfinite(mask)):
        raise ValueError(f"The {name} has NaN or infinite values.")
    binary = mask > 0
    if not binary.any():
        raise ValueError(f"The {name} is empty (no voxel > 0).")
    return binary


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _per_level_counts(value, levels: int, name: str) -> list[int]:
    """An iteration count (all levels) or one count per level -> a list of ``levels`` non-negative ints."""
    if _is_number(value):
        values = [value] * levels
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
        if len(values) != levels:
            raise ValueError(f"{name} has {len(values)} entries but there are {levels} levels.")
    else:
        raise TypeError(f"{name} must be a whole number or a sequence of one whole number per level, got {value!r}.")
    out = []
    for v in values:
        if not _is_number(v) or int(v) != v:
            raise TypeError(f"{name} entries must be whole numbers, got {v!r}.")
        if v < 0:
            raise ValueError(f"{name} entries must not be negative, got {v!r}.")
        out.append(int(v))
    if not any(out):
        raise ValueError(f"{name} is zero at every level: the stage would not run. Give at least one iteration.")
    return out


def _check_options(similarity, stages, init, levels, iterations, lr):
    """Validate the options of :func:`register_affine`; returns ``(stages, levels, {stage: counts per level}, lr)``."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"Unknown similarity {similarity!r}; choose one of {SIMILARITIES}.")
    if isinstance(stages, str) or not isinstance(stages, Sequence):
        raise TypeError(f"stages must be a sequence of stage names such as ('rigid', 'affine'), got {stages!r}.")
    stages = tuple(stages)
    if not stages:
        raise ValueError(f"stages is empty; give at least one of {STAGES}.")
    for name in stages:
        if name not in STAGES:
            raise ValueError(f"Unknown stage {name!r}; stages are chosen from {STAGES}.")
    if len(set(stages)) != len(stages):
        raise ValueError(f"stages {stages} repeats a stage.")
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}; choose one of {INITS}.")
    if isinstance(levels, str) or not isinstance(levels, Sequence):
        raise TypeError(f"levels must be a sequence of level spacings in mm, coarse to fine, e.g. (8, 4, 2); got "
                        f"{levels!r}.")
    if not levels:
        raise ValueError("levels is empty; give at least one level spacing in mm.")
    if not all(_is_number(v) for v in levels):
        raise TypeError(f"levels must be numbers (spacings in mm), got {tuple(levels)}.")
    levels = [float(v) for v in levels]
    if any(not math.isfinite(v) or v <= 0 for v in levels):
        raise ValueError(f"levels must be positive spacings in mm, got {tuple(levels)}.")
    if any(b > a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must go from coarse to fine (non-increasing spacings), got {tuple(levels)}.")
    n = len(levels)
    if iterations is None:
        counts = {}
        coarse = (n + 1) // 2
        for i, name in enumerate(stages):
            last = i == len(stages) - 1
            # earlier stages only bring the last one into its basin: the coarser half of the levels is enough
            counts[name] = [DEFAULT_ITERATIONS if last or li < coarse else 0 for li in range(n)]
    elif isinstance(iterations, Mapping):
        unknown = set(iterations) - set(stages)
        missing = set(stages) - set(iterations)
        if unknown or missing:
            raise ValueError(f"iterations must give every stage of {stages} and no other; missing {sorted(missing)}, "
                             f"not a stage here {sorted(unknown)}.")
        counts = {name: _per_level_counts(iterations[name], n, f"iterations[{name!r}]") for name in stages}
    else:
        per = _per_level_counts(iterations, n, "iterations")
        counts = {name: per for name in stages}
    if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number (the first step of a level in mm per mm of level spacing), "
                         f"got {lr!r}.")
    return stages, levels, counts, float(lr)


# ----------------------------------------------------------------------------------------------------------------
# pyramid
# ----------------------------------------------------------------------------------------------------------------


def _blur(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``[B, C, *S]`` with one std per spatial axis (voxels; below 0.1 the axis is
    left alone). The kernel is cut at 3 std; the image edges are extended by repeating the edge voxels. Each axis is
    a weighted sum of shifted views (single-channel convolutions are far slower on the CPU)."""
    out = x
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.1:
            continue
        d = 2 + axis
        n = out.shape[d]
        radius = max(1, int(math.ceil(3.0 * sigma)))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = (kernel / kernel.sum()).tolist()
        first = out.narrow(d, 0, 1)
        last = out.narrow(d, n - 1, 1)
        padded = torch.cat([first.expand(*[radius if k == d else -1 for k in range(out.ndim)]), out,
                            last.expand(*[radius if k == d else -1 for k in range(out.ndim)])], dim=d)
        acc = padded.narrow(d, 0, n) * kernel[0]
        for k in range(1, 2 * radius + 1):
            acc.add_(padded.narrow(d, k, n), alpha=kernel[k])
        out = acc
    return out


@dataclass
class _Level:
    """One image of one pyramid level.

    image: ``[1, 1, *S_l]`` normalised intensities (float32); mask: ``[1, 1, *S_l]`` in [0, 1] or ``None``;
    affine: ``(dim + 1) x (dim + 1)`` level voxel index -> world mm (RAS+).
    """

    image: torch.Tensor
    mask: torch.Tensor | None
    affine: np.ndarray
    signature: tuple = ()  # (block factors, blur stds): equal signatures mean equal levels


def _shrink_factors(shape: Sequence[int], spacing: Sequence[float], target: float) -> list[int]:
    factors = []
    for n, sp in zip(shape, spacing):
        f = max(1, int(round(target / sp)))
        f = min(f, max(1, n // MIN_LEVEL_VOXELS))
        factors.append(f)
    return factors


class _Pyramid:
    """Block averages of one image (and its mask) on its own grid, built on demand and kept unblurred so that a
    coarser one is pooled from a finer one whose factors divide its own (pooling twice by ``f`` and ``g`` equals
    pooling once by ``f g``, remainders dropped alike)."""

    def __init__(self, image: torch.Tensor, mask: torch.Tensor | None, affine: np.ndarray,
                 spacing: Sequence[float]):
        self.affine = affine
        self.spacing = tuple(float(v) for v in spacing)
        self.shape = tuple(image.shape[2:])
        self._pooled: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = {
            (1,) * len(self.shape): (image, mask)}

    def pooled(self, factors: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if factors in self._pooled:
            return self._pooled[factors]
        divisors = [f for f in self._pooled if all(g % h == 0 for g, h in zip(factors, f))]
        base = max(divisors, key=lambda f: int(np.prod(f)))
        rel = tuple(g // h for g, h in zip(factors, base))
        image, mask = self._pooled[base]
        pool = F.avg_pool3d if len(factors) == 3 else F.avg_pool2d
        out = (pool(image, kernel_size=rel, stride=rel), None if mask is None else pool(mask, kernel_size=rel, stride=rel))
        self._pooled[factors] = out
        return out

    def level(self, grid_spacing: float, blur_mm: float, extra_variance: float = 0.0) -> _Level:
        """The image block-averaged by ``round(grid_spacing / spacing)`` per axis and blurred so that its total blur
        is a Gaussian of std ``blur_mm`` plus ``extra_variance`` mm^2, counting the native image's own blur as
        ``(spacing / 2)^2`` and the block average's as ``(f * spacing)^2 / 12``."""
        dim = len(self.shape)
        factors = tuple(_shrink_factors(self.shape, self.spacing, grid_spacing))
        pooled, pooled_mask = self.pooled(factors)
        step = np.eye(dim + 1)
        step[:dim, :dim] = np.diag(factors)
        step[:dim, dim] = (np.asarray(factors, dtype=np.float64) - 1.0) / 2.0
        sigmas = []
        for f, sp in zip(factors, self.spacing):
            extra = blur_mm**2 + extra_variance - (0.5 * sp) ** 2 - ((f * sp) ** 2 / 12.0 if f > 1 else 0.0)
            sigmas.append(math.sqrt(extra) / (f * sp) if extra > 0 else 0.0)
        signature = (factors, tuple(round(v, 6) for v in sigmas))
        return _Level(_blur(pooled, sigmas), pooled_mask, self.affine @ step, signature)


_MOVING_GRID = {"lncc": (1.0, False), "mi": (0.5, True)}
"""Per similarity: moving level grid spacing as a fraction of the level spacing, and whether the fixed image gets the
blur of linear interpolation on that grid (see :func:`_level_pair`)."""


def _level_pair(fixed: _Pyramid, moving: _Pyramid, spacing: float, similarity: str) -> tuple[_Level, _Level]:
    """The fixed and moving images of the level with spacing ``spacing`` mm.

    Both are blurred to a Gaussian of std ``spacing / 2`` mm (the native blur counted as ``(native spacing / 2)^2``).
    The fixed grid has about ``spacing`` mm voxels: the points where the similarity is evaluated. For MI the moving
    grid is twice as fine (at most the native one) and the fixed image gets the mean blur of linear interpolation on
    it (variance ``h^2 / 6`` for grid spacing ``h``): mutual information is sensitive to the extra blur that
    interpolation puts into the warped moving image only (measured: a 0.3 % scale bias at the 2 mm level without
    this). LNCC normalises its windows and was not more accurate with it, so its moving grid has the level spacing,
    which keeps the interpolation cache-friendly.
    """
    ratio, compensate = _MOVING_GRID[similarity]
    m_factors = _shrink_factors(moving.shape, moving.spacing, spacing * ratio)
    m_spacing = float(np.mean([f * sp for f, sp in zip(m_factors, moving.spacing)]))
    fixed_level = fixed.level(spacing, spacing / 2.0, m_spacing**2 / 6.0 if compensate else 0.0)
    moving_level = moving.level(spacing * ratio, spacing / 2.0)
    return fixed_level, moving_level


def _normalise(image: Image, mask: np.ndarray | None, device, name: str) -> torch.Tensor:
    """``[*S]`` -> ``[1, 1, *S]`` float32 on ``device``, mapped to [0, 1] between :data:`PERCENTILES` (of the voxels
    in ``mask`` when given), clipped."""
    # a copy: the input array is never changed (torch.as_tensor would share a float32 array's memory)
    t = torch.tensor(np.asarray(image.array), dtype=torch.float32, device=device)
    values = t[torch.as_tensor(mask, device=device)] if mask is not None else t.reshape(-1)
    if values.numel() > 2_000_000:  # percentiles of an evenly strided subset (fast on 10^8 voxels)
        values = values[:: int(math.ceil(values.numel() / 2_000_000))]
    q = torch.tensor([PERCENTILES[0] / 100, PERCENTILES[1] / 100], dtype=torch.float64, device=values.device)
    lo, hi = torch.quantile(values.to(torch.float64), q).tolist()
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        where = " inside its mask" if mask is not None else ""
        raise ValueError(f"The {name} ({image.describe()}) is constant{where}: nothing to register.")
    return t.sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)[None, None]


def _otsu(values: torch.Tensor, bins: int = 128) -> float:
    """Otsu threshold of values in [0, 1]."""
    hist = torch.histc(values.to(torch.float32), bins=bins, min=0.0, max=1.0).to(torch.float64)
    p = hist / hist.sum()
    centres = (torch.arange(bins, dtype=torch.float64, device=values.device) + 0.5) / bins
    w0 = torch.cumsum(p, 0)
    m0 = torch.cumsum(p * centres, 0)
    total = m0[-1]
    between = (total * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    k = int(torch.argmax(between[:-1]))
    return float((k + 1) / bins)


def _level_points(level: _Level) -> torch.Tensor:
    """World coordinates of every level voxel, ``[*S_l, dim]`` float64."""
    shape = level.image.shape[2:]
    dev = level.image.device
    axes = [torch.arange(n, dtype=torch.float64, device=dev) for n in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    a = torch.as_tensor(level.affine, dtype=torch.float64, device=dev)
    dim = len(shape)
    return idx @ a[:dim, :dim].T + a[:dim, dim]


def _foreground(level: _Level) -> torch.Tensor:
    """``[*S_l]`` float64 weights: normalised intensity above the Otsu threshold (times the mask when given)."""
    img = level.image[0, 0].to(torch.float64)
    inside = img[level.mask[0, 0] > 0.5] if level.mask is not None else img.reshape(-1)
    threshold = _otsu(inside)
    w = img * (img > threshold)
    if level.mask is not None:
        w = w * (level.mask[0, 0] > 0.5)
    return w


def _com_and_radius(level: _Level) -> tuple[np.ndarray, float, torch.Tensor]:
    """Intensity-weighted centre of mass (world mm), RMS radius (mm) and the foreground weights of a level."""
    w = _foreground(level)
    if float(w.sum()) <= 0:
        w = level.image[0, 0].to(torch.float64) + 1e-6
    pts = _level_points(level)
    total = w.sum()
    com = (pts * w[..., None]).reshape(-1, pts.shape[-1]).sum(0) / total
    radius = torch.sqrt(((pts - com) ** 2).sum(-1).mul(w).sum() / total)
    return com.cpu().numpy(), float(radius), w


def centre_of_mass(image: Image, mask: np.ndarray | None = None, spacing: float = 4.0) -> np.ndarray:
    """Intensity-weighted centre of mass of an image's robust foreground, ``[dim]`` world mm (RAS+).

    Intensities are normalised to [0, 1] between :data:`PERCENTILES`; the foreground is the part above the Otsu
    threshold (inside ``mask`` when given); the image is first block-averaged to about ``spacing`` mm.
    """
    _check_image(image, "image")
    binary = _check_mask(mask, image, "mask")
    t = _normalise(image, binary, "cpu", "image")
    m = None if binary is None else torch.as_tensor(binary, dtype=torch.float32)[None, None]
    level = _Pyramid(t, m, image.affine_nd, image.spacing).level(spacing, spacing / 2.0)
    return _com_and_radius(level)[0]


def _world_box(level: _Level) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (mm, ``[dim]`` low and high corners) of the level's foreground (its mask when it has one,
    else the Otsu foreground)."""
    region = level.mask[0, 0] > 0.5 if level.mask is not None else _foreground(level) > 0
    nz = torch.nonzero(region).to(torch.float64).cpu().numpy()
    if nz.size == 0:
        nz = np.argwhere(np.ones(level.image.shape[2:], bool)).astype(np.float64)
    lo, hi = nz.min(0), nz.max(0)
    dim = len(lo)
    corners = np.array([[hi[k] if (c >> k) & 1 else lo[k] for k in range(dim)] for c in range(2**dim)])
    world = corners @ level.affine[:dim, :dim].T + level.affine[:dim, dim]
    return world.min(0), world.max(0)


def _crop_box(level: _Level, world_lo: np.ndarray, world_hi: np.ndarray) -> list[slice]:
    """Slices of the level grid covering the world box plus :data:`CROP_MARGIN_MM` (at least 2 voxels per axis)."""
    dim = len(world_lo)
    corners = np.array([[world_hi[k] if (c >> k) & 1 else world_lo[k] for k in range(dim)] for c in range(2**dim)])
    index = (corners - level.affine[:dim, dim]) @ np.linalg.inv(level.affine[:dim, :dim]).T
    sp = np.linalg.norm(level.affine[:dim, :dim], axis=0)
    box = []
    for k, n in enumerate(level.image.shape[2:]):
        margin = CROP_MARGIN_MM / sp[k]
        lo = max(0, int(math.floor(index[:, k].min() - margin)))
        hi = min(n, int(math.ceil(index[:, k].max() + margin)) + 1)
        if hi - lo < 2:
            lo, hi = max(0, min(lo, n - 2)), min(n, max(hi, lo + 2))
        box.append(slice(lo, hi))
    return box


# ----------------------------------------------------------------------------------------------------------------
# similarity
# ----------------------------------------------------------------------------------------------------------------


def _normalised_to_grid(shape: Sequence[int]) -> np.ndarray:
    """``(dim + 1) x (dim + 1)``: voxel index -> grid_sample coordinates in [-1, 1], reversed axis order."""
    dim = len(shape)
    m = np.zeros((dim + 1, dim + 1))
    for k, n in enumerate(shape):
        row = dim - 1 - k
        scale = 2.0 / (n - 1) if n > 1 else 0.0
        m[row, k] = scale
        m[row, dim] = -1.0
    m[dim, dim] = 1.0
    return m


class _Similarity:
    """Similarity of the fixed and moving images of one level as a function of the world matrix (torch).

    * ``"lncc"``: normalised cross-correlation in windows of :data:`LNCC_WINDOW` fixed level voxels per axis, summed
      over the windows and divided by their number (a constant: a mean over the windows inside the moving image
      would reward pushing windows of below-average correlation, flat background or cut anatomy, out of the
      overlap). A crop of up to :data:`LNCC_DENSE_VOXELS` voxels uses a window around every voxel (box filters of
      the warped moving image, weighted by the fixed mask); a larger one uses non-overlapping blocks with fixed
      std above :data:`LNCC_MIN_STD` (flat blocks have no correlation to find) and at least half inside the fixed
      mask, :data:`LNCC_MAX_BLOCKS` of them drawn at random (seeded) when there are more. Only the blocks' voxels
      are sampled, which bounds the cost on large images.
    * ``"mi"``: up to :data:`MI_MAX_POINTS` fixed voxels with weight > 0 (drawn once, seeded); mutual information
      of the joint histogram with cubic B-spline Parzen windows (:data:`MI_BINS` bins of [0, 1]), points weighted.

    Points closer to the border of the moving image than half a moving voxel (plus the LNCC window for the dense
    LNCC) get weight 0, rising linearly to 1 over one fixed level voxel inwards (a block takes its smallest point
    weight), so that points enter and leave the overlap smoothly and never see the border padding; the moving
    mask, when given, multiplies the weights. ``__call__(matrix)`` takes the ``(dim + 1) x (dim + 1)`` float64
    tensor ``M`` (fixed world -> moving world) and returns the similarity to *maximise* (a 0-d tensor).
    """

    def __init__(self, kind: str, fixed: _Level, moving: _Level, fixed_weight: torch.Tensor, crop: list[slice]):
        dim = fixed.image.ndim - 2
        self.dim = dim
        dev = fixed.image.device
        img = fixed.image[(0, 0, *crop)]
        weight = fixed_weight[tuple(crop)]
        if min(img.shape) < LNCC_WINDOW and kind == "lncc":
            raise ValueError(f"The fixed image region {tuple(img.shape)} at this level is smaller than one LNCC "
                             f"window ({LNCC_WINDOW} voxels per axis); use finer levels.")
        self.kind = "dense" if kind == "lncc" and img.numel() <= LNCC_DENSE_VOXELS else kind
        self.moving_input = moving.image if moving.mask is None else torch.cat([moving.image, moving.mask], dim=1)
        m_shape = np.asarray(moving.image.shape[2:], dtype=np.float64)
        m_spacing = np.linalg.norm(moving.affine[:dim, :dim], axis=0)
        f_spacing = float(np.mean(np.linalg.norm(fixed.affine[:dim, :dim], axis=0)))
        window = (LNCC_WINDOW // 2) * f_spacing if self.kind == "dense" else 0.0
        # per grid axis (grid_sample's reversed spatial order)
        self.half_extent = torch.as_tensor(((m_shape - 1.0) / 2.0)[::-1].copy(), dtype=torch.float32, device=dev)
        self.edge = torch.as_tensor((window / m_spacing + 0.5)[::-1].copy(), dtype=torch.float32, device=dev)
        self.ramp = torch.as_tensor((f_spacing / m_spacing)[::-1].copy(), dtype=torch.float32, device=dev)
        self.to_moving_grid = torch.as_tensor(
            _normalised_to_grid(moving.image.shape[2:]) @ np.linalg.inv(moving.affine), dtype=torch.float64,
            device=dev)
        offset = torch.as_tensor([s.start for s in crop], dtype=torch.float64, device=dev)
        a = torch.as_tensor(fixed.affine, dtype=torch.float64, device=dev)
        gen = torch.Generator().manual_seed(SAMPLING_SEED)

        def to_world(index: torch.Tensor) -> torch.Tensor:  # crop voxel indices [..., dim] -> world [..., dim]
            return ((index.to(torch.float64) + offset) @ a[:dim, :dim].T + a[:dim, dim]).to(torch.float32)

        if self.kind == "dense":
            self.points = to_world(torch.stack(torch.meshgrid(
                *[torch.arange(n, device=dev) for n in img.shape], indexing="ij"), dim=-1))  # [*C, dim]
            self.box = [_box_matrix(n, LNCC_WINDOW // 2, dev) for n in img.shape]
            self.fixed = img[None, None]
            mu = _box_mean(self.fixed, self.box)
            self.fixed_mu = mu
            self.fixed_var = (_box_mean(self.fixed * self.fixed, self.box) - mu * mu).clamp_min(0.0)
            # windows without contrast have no correlation to find (and would reward raising the moving contrast)
            self.weight = (weight * (self.fixed_var[0, 0] > LNCC_MIN_STD**2))[None, None]
            self.normaliser = float(self.weight.sum())
            if self.normaliser == 0:
                raise ValueError("No fixed-image window at this level has any contrast inside the mask: nothing for "
                                 "LNCC to align (is the fixed mask on the anatomy?).")
        elif self.kind == "lncc":
            b = LNCC_WINDOW
            counts = [n // b for n in img.shape]
            split = [v for c in counts for v in (c, b)]
            order = list(range(0, 2 * dim, 2)) + list(range(1, 2 * dim, 2))

            def blocks(t: torch.Tensor) -> torch.Tensor:  # [*C] -> [K, b^dim], block k = unravelled (k_0, k_1, ..)
                return t[tuple(slice(0, c * b) for c in counts)].reshape(split).permute(order).reshape(-1, b**dim)

            values = blocks(img)
            std = values.std(dim=1, unbiased=False)
            inside = blocks(weight).mean(dim=1)
            keep = torch.nonzero((std > LNCC_MIN_STD) & (inside >= 0.5))[:, 0]
            if keep.numel() == 0:
                raise ValueError("No fixed-image block at this level has any contrast inside the mask: nothing for "
                                 "LNCC to align (is the fixed mask on the anatomy?).")
            if keep.numel() > LNCC_MAX_BLOCKS:
                keep = keep[torch.randperm(keep.numel(), generator=gen)[:LNCC_MAX_BLOCKS].to(dev)]
            # voxel indices of the kept blocks: block corner + offsets inside the block
            corner = torch.stack(torch.unravel_index(keep, tuple(counts)), dim=-1) * b  # [K, dim]
            inner = torch.stack(torch.meshgrid(*[torch.arange(b, device=dev)] * dim, indexing="ij"), dim=-1)
            self.points = to_world(corner[:, None, :] + inner.reshape(1, -1, dim))  # [K, b^dim, dim]
            values = values[keep]
            self.fixed_centred = values - values.mean(dim=1, keepdim=True)
            self.fixed_var = self.fixed_centred.pow(2).mean(dim=1)
            self.block_weight = inside[keep]
            self.normaliser = float(keep.numel())
        else:
            flat = weight.reshape(-1)
            if flat.numel() <= 4 * MI_MAX_POINTS:
                candidates = torch.nonzero(flat > 0)[:, 0]
                if candidates.numel() > MI_MAX_POINTS:
                    candidates = candidates[torch.randperm(candidates.numel(), generator=gen)[:MI_MAX_POINTS].to(dev)]
            else:  # draw voxels of the crop at random (a few repeats do no harm) and keep those with weight
                draws = torch.randint(flat.numel(), (4 * MI_MAX_POINTS,), generator=gen).to(dev)
                candidates = draws[flat[draws] > 0][:MI_MAX_POINTS]
            if candidates.numel() == 0:
                raise ValueError("No fixed-image voxel at this level lies inside the mask: nothing for MI to align.")
            keep = torch.stack(torch.unravel_index(candidates, tuple(img.shape)), dim=-1)
            self.points = to_world(keep)[None]  # [1, N, dim]
            self.weight = weight[tuple(keep.T)].to(torch.float32)
            self.fixed_bins, self.fixed_parzen = _parzen(img[tuple(keep.T)])

    def _sample(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Moving values and point weights ``[*P]`` at the fixed points ``self.points`` ``[*P, dim]``."""
        dim = self.dim
        theta = (self.to_moving_grid @ matrix)[:dim].to(torch.float32)
        grid = self.points @ theta[:, :dim].T + theta[:, dim]  # grid_sample's [-1, 1], reversed axes
        shape = grid.shape[:-1]
        view = shape if len(shape) == dim else (*shape, *([1] * (dim - len(shape))))
        out = _grid_sample(self.moving_input, grid.reshape(1, *view, dim))
        out = out.reshape(out.shape[1], *shape)
        # distance to the border in moving voxels, per grid axis
        ramp = ((1.0 - grid.abs()) * self.half_extent - self.edge) / self.ramp
        weight = ramp.clamp(0.0, 1.0).prod(dim=-1)
        if out.shape[0] > 1:
            weight = weight * out[1]
        if self.kind != "mi":
            # LNCC sums over the windows inside the overlap (and the moving mask): a gradient through these weights
            # would pull towards covering more of the moving image (a shrinking bias where its field of view cuts the
            # anatomy, measured 1-4 per mille of scale; 1.6 mm on a 3 mm brain with a moving mask). MI normalises
            # its histogram by the overlap and keeps the gradient.
            weight = weight.detach()
        return out[0], weight

    def __call__(self, matrix: torch.Tensor, reference: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The similarity at ``matrix``: ``(value, value with the reference weights, weights)``.

        For LNCC the window weights (overlap with the moving image and its mask) carry no gradient, and ``value``
        uses the weights at ``matrix``; the second value uses the windows' weights ``reference`` (returned by an
        earlier call) instead, so that an optimiser can compare a trial point with the point it started from on
        the same windows. For MI both values are the same and the weights are ``None``.
        """
        values, weight = self._sample(matrix)
        if self.kind in ("dense", "lncc"):
            if self.kind == "dense":
                warped = values[None, None]
                moments = _box_mean(torch.cat([warped, warped * warped, warped * self.fixed], dim=1), self.box)
                mu, m2, fm = moments[:, :1], moments[:, 1:2], moments[:, 2:3]
                var = (m2 - mu * mu).clamp_min(0.0)
                cc = (fm - mu * self.fixed_mu) / torch.sqrt(var * self.fixed_var + LNCC_EPS**2)
                own = self.weight * weight
            else:
                centred = values - values.mean(dim=1, keepdim=True)
                var = centred.pow(2).mean(dim=1)
                cov = (centred * self.fixed_centred).mean(dim=1)
                cc = cov / torch.sqrt(var * self.fixed_var + LNCC_EPS**2)
                own = self.block_weight * weight.amin(dim=1)
            value = (cc * own).sum() / self.normaliser
            ref = value if reference is None else (cc * reference).sum() / self.normaliser
            return value, ref, own
        w = self.weight * weight[0]
        moving_bins, moving_parzen = _parzen(values[0])
        # joint histogram: every point adds w * fixed weight i * moving weight j to bin (fixed bin i, moving bin j)
        index = (self.fixed_bins[:, :, None] * MI_BINS + moving_bins[:, None, :]).reshape(-1)
        mass = (self.fixed_parzen * w[:, None])[:, :, None] * moving_parzen[:, None, :]
        joint = torch.zeros(MI_BINS * MI_BINS, dtype=mass.dtype, device=mass.device).index_add(
            0, index, mass.reshape(-1))
        joint = joint.view(MI_BINS, MI_BINS) / w.sum().clamp_min(1e-6)
        pf = joint.sum(dim=1, keepdim=True)
        pm = joint.sum(dim=0, keepdim=True)
        eps = 1e-10
        value = (joint * (torch.log(joint + eps) - torch.log(pf @ pm + eps))).sum()
        return value, value, None


def _box_matrix(n: int, radius: int, device) -> torch.Tensor:
    """``[n, n]`` float32 banded matrix averaging the ``2 radius + 1`` neighbours of each index (those in
    ``[0, n)``)."""
    idx = torch.arange(n, device=device)
    m = ((idx[:, None] - idx[None, :]).abs() <= radius).to(torch.float32)
    return m / m.sum(dim=1, keepdim=True)


def _box_mean(x: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
    """Box mean of ``x`` ``[B, C, *S]``: one banded ``[n, n]`` matrix product per spatial axis (``matrices`` from
    :func:`_box_matrix`); BLAS makes this faster than pooling, forward and backward."""
    dim = x.ndim - 2
    out = x
    for axis in range(dim):
        n = x.shape[2 + axis]
        if axis == dim - 1:
            out = out @ matrices[axis].T
        else:
            inner = int(np.prod(x.shape[3 + axis:]))
            out = torch.matmul(matrices[axis], out.reshape(-1, n, inner)).view(x.shape)
    return out


def _parzen(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic B-spline Parzen window of intensities in [0, 1] (clipped) over :data:`MI_BINS` bins of width
    ``1 / MI_BINS`` (centres ``(b + 0.5) / MI_BINS``): ``[N]`` -> bins ``[N, 4]`` (int64) and weights ``[N, 4]``
    summing to 1 per value. The weights are differentiable in the values; bins past either end fold onto the end
    bins."""
    u = values.clamp(0.0, 1.0) * MI_BINS - 0.5  # continuous bin coordinate
    base = torch.floor(u.detach())
    t = u - base  # in [0, 1): position between bins base and base + 1
    t2 = t * t
    t3 = t2 * t
    # the cubic B-spline at distances 1 + t, t, 1 - t, 2 - t from bins base - 1 .. base + 2
    weights = torch.stack([(1.0 - t) ** 3, 3.0 * t3 - 6.0 * t2 + 4.0, -3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0, t3],
                          dim=1) / 6.0
    offsets = torch.arange(-1, 3, device=values.device, dtype=torch.int64)
    bins = (base.to(torch.int64)[:, None] + offsets[None, :]).clamp(0, MI_BINS - 1)
    return bins, weights


_MIN_POINTS_PER_THREAD = 16384


def _grid_sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample`` (linear, border padding, ``align_corners=True``) of ``image`` ``[1, C, *S]`` at ``grid``
    ``[1, *P, dim]``. On the CPU PyTorch runs a batch of one on one thread, so the points are cut into one piece
    per thread and sampled as a batch (the image is broadcast, not copied); the values are the same."""
    threads = torch.get_num_threads() if image.device.type == "cpu" else 1
    dim = grid.shape[-1]
    flat = grid.reshape(-1, dim)
    total = flat.shape[0]
    chunks = max(1, min(threads, total // _MIN_POINTS_PER_THREAD))
    if chunks == 1:
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    per = -(-total // chunks)
    if per * chunks != total:
        flat = torch.cat([flat, flat.new_zeros((per * chunks - total, dim))], dim=0)
    shape = (chunks, 1, 1, per, dim) if dim == 3 else (chunks, 1, per, dim)
    out = F.grid_sample(image.expand(chunks, *image.shape[1:]), flat.view(shape), mode="bilinear",
                        padding_mode="border", align_corners=True)
    channels = image.shape[1]
    out = out.reshape(chunks, channels, per).transpose(0, 1).reshape(channels, per * chunks)[:, :total]
    return out.reshape(1, channels, *grid.shape[1:-1])


# ----------------------------------------------------------------------------------------------------------------
# transform parameters
# ----------------------------------------------------------------------------------------------------------------


def _rotation(w: torch.Tensor, dim: int) -> torch.Tensor:
    if dim == 2:
        c, s = torch.cos(w[0]), torch.sin(w[0])
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    skew = torch.stack([
        torch.stack([zero, -w[2], w[1]]),
        torch.stack([w[2], zero, -w[0]]),
        torch.stack([-w[1], w[0], zero]),
    ])
    return torch.linalg.matrix_exp(skew)


class _Stage:
    """Parameters of one stage around a base ``(A0, t0)``: ``y = A (x - c) + c + t`` (world mm).

    One flat float64 vector ``p``: the translation change (mm) first, then the rotation vector (``"rigid"``,
    radians times the radius) or the linear change (``"affine"``, row-major, times the radius), so that every
    entry moves the foreground by about its own value in millimetres.
    """

    def __init__(self, name: str, a0: np.ndarray, t0: np.ndarray, centre: np.ndarray, radius: float, device):
        self.name = name
        dim = a0.shape[0]
        self.dim = dim
        f64 = dict(dtype=torch.float64, device=device)
        self.a0 = torch.as_tensor(a0, **f64)
        self.t0 = torch.as_tensor(t0, **f64)
        self.c = torch.as_tensor(centre, **f64)
        self.radius = radius
        size = dim + {"translation": 0, "rigid": 1 if dim == 2 else 3, "affine": dim * dim}[name]
        self.p = torch.zeros(size, **f64)

    def matrix(self, p: torch.Tensor | None = None) -> torch.Tensor:
        """``(dim + 1) x (dim + 1)`` float64 world matrix (fixed -> moving) at parameters ``p`` (default: the
        stage's own)."""
        p = self.p if p is None else p
        dim = self.dim
        if self.name == "rigid":
            a = _rotation(p[dim:] / self.radius, dim) @ self.a0
        elif self.name == "affine":
            a = self.a0 + p[dim:].view(dim, dim) / self.radius
        else:
            a = self.a0
        offset = self.c + self.t0 + p[:dim] - a @ self.c
        bottom = torch.zeros(1, dim + 1, dtype=a.dtype, device=a.device)
        bottom[0, -1] = 1.0
        return torch.cat([torch.cat([a, offset[:, None]], dim=1), bottom], dim=0)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The linear part ``A`` ``(dim, dim)`` and translation ``t`` ``(dim,)`` (mm) of the current parameters."""
        with torch.no_grad():
            m = self.matrix()
            a = m[: self.dim, : self.dim]
            t = m[: self.dim, self.dim] - self.c + a @ self.c
            return a.cpu().numpy(), t.cpu().numpy()


def _to_matrix(a: np.ndarray, t: np.ndarray, centre: np.ndarray) -> np.ndarray:
    dim = a.shape[0]
    m = np.eye(dim + 1)
    m[:dim, :dim] = a
    m[:dim, dim] = centre + t - a @ centre
    return _embed(m, dim)


# ----------------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------------


def register_affine(
    fixed: Image,
    moving: Image,
    *,
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
    similarity: str = "mi",
    stages: Sequence[str] = ("rigid", "affine"),
    init: str = "com",
    levels: Sequence[float] = DEFAULT_LEVELS,
    iterations: int | Sequence[int] | Mapping[str, int | Sequence[int]] | None = None,
    lr: float = DEFAULT_LR,
    search_rotations: bool = True,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> AffineResult:
    """Affine registration of two images in physical space (see the module docstring for the method).

    Args:
        fixed: the fixed image (2D or 3D, any grid).
        moving: the moving image (same dimensionality, any grid of its own).
        fixed_mask: ``[*fixed.shape]`` array on the fixed grid; only voxels > 0 are compared (and weigh in the centre
            of mass).
        moving_mask: ``[*moving.shape]`` array on the moving grid; fixed points mapped outside it do not count.
        similarity: ``"mi"`` (mutual information, any modality) or ``"lncc"`` (same modality).
        stages: stage names in order, from :data:`STAGES`.
        init: ``"com"``, ``"centre"`` or ``"identity"``.
        levels: pyramid level spacings in mm, coarse to fine.
        iterations: BFGS iterations per level: one whole number (every level and stage), one per level (every
            stage), or a mapping ``{stage: number or per-level sequence}`` giving every stage; a 0 skips that level.
            ``None``: :data:`DEFAULT_ITERATIONS` at every level of the last stage and at the coarser half of the
            levels (rounded up) of earlier stages.
        lr: the first step of every level, in mm per mm of level spacing.
        search_rotations: run the start-rotation search at the coarsest level of the first rotating stage.
        device: torch device of all computations (``"cpu"``, ``"cuda"``...).
        progress: print one line per (stage, level) to stderr.

    Returns:
        :class:`AffineResult`; ``matrix`` ``(4, 4)``: fixed world RAS mm -> moving world RAS mm.

    Raises:
        TypeError / ValueError: bad images, masks or options (before any work is done).
    """
    start = time.perf_counter()
    _check_image(fixed, "fixed image")
    _check_image(moving, "moving image")
    if fixed.ndim != moving.ndim:
        raise ValueError(f"The fixed image is {fixed.ndim}D {fixed.shape} but the moving image is {moving.ndim}D "
                         f"{moving.shape}; both must be 2D or both 3D.")
    stages, levels, iterations, lr = _check_options(similarity, stages, init, levels, iterations, lr)
    fmask = _check_mask(fixed_mask, fixed, "fixed mask")
    mmask = _check_mask(moving_mask, moving, "moving mask")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was requested but CUDA is not available.")
    dim = fixed.ndim

    with torch.no_grad():
        f_img = _normalise(fixed, fmask, device, "fixed image")
        m_img = _normalise(moving, mmask, device, "moving image")
        f_mask = None if fmask is None else torch.as_tensor(fmask, dtype=torch.float32, device=device)[None, None]
        m_mask = None if mmask is None else torch.as_tensor(mmask, dtype=torch.float32, device=device)[None, None]
        f_pyramid = _Pyramid(f_img, f_mask, fixed.affine_nd, fixed.spacing)
        m_pyramid = _Pyramid(m_img, m_mask, moving.affine_nd, moving.spacing)
        del f_img, m_img, f_mask, m_mask
        # fine to coarse, so that coarse block averages are pooled from finer ones
        pairs = [_level_pair(f_pyramid, m_pyramid, s, similarity) for s in levels[::-1]][::-1]
        f_levels = [p[0] for p in pairs]
        m_levels = [p[1] for p in pairs]
        # levels finer than both images' own resolution come out identical (native grid, no blur): run them once
        repeated = [i > 0 and f_levels[i].signature == f_levels[i - 1].signature
                    and m_levels[i].signature == m_levels[i - 1].signature for i in range(len(levels))]
        # centres of mass and the fixed foreground box on a level of about 4 mm (block averaging keeps the centre of
        # mass; the box bounds the region where the similarity is evaluated at every level)
        probe_f = f_pyramid.level(max(4.0, min(levels)), 2.0)
        probe_m = m_pyramid.level(max(4.0, min(levels)), 2.0)
        c_f, radius, _ = _com_and_radius(probe_f)
        c_m, _, _ = _com_and_radius(probe_m)
        radius = max(radius, MIN_RADIUS_MM)
        box = _world_box(probe_f)
        del f_pyramid, m_pyramid, probe_f, probe_m

    a = np.eye(dim)
    if init == "com":
        t = c_m - c_f
    elif init == "centre":
        t = _box_centre(moving) - _box_centre(fixed)
    else:
        t = np.zeros(dim)
    stage_matrices = {"init": _to_matrix(a, t, c_f)}
    history: list[dict] = []

    sims: dict[int, _Similarity] = {}
    searched = not search_rotations
    for stage_name in stages:
        stage = _Stage(stage_name, a, t, c_f, radius, device)
        for li, spacing in enumerate(levels):
            iters = iterations[stage_name][li]
            if iters == 0 or repeated[li]:
                continue
            t0 = time.perf_counter()
            if li not in sims:
                sims[li] = _level_similarity(similarity, f_levels[li], m_levels[li], box)
            entry = {"stage": stage_name, "level": li, "spacing_mm": spacing, "iterations": iters}
            if not searched and stage_name != "translation":
                # the first level of the first stage that rotates: start from several rotations, keep the best
                stage, value, evaluations, starts = _search(sims[li], stage_name, a, t, c_f, radius, device, iters,
                                                            lr * spacing)
                entry["starts"] = starts
                searched = True
            else:
                value, evaluations = _optimize(sims[li], stage, iters, lr * spacing)
            seconds = time.perf_counter() - t0
            entry.update({"evaluations": evaluations, "similarity": value, "seconds": seconds,
                          "matrix": _to_matrix(*stage.result(), c_f)})
            history.append(entry)
            if progress:
                print(f"[register_affine] {stage_name:<11} level {li} ({spacing:g} mm): {evaluations} evaluations, "
                      f"{similarity} {value:.4f}, {seconds:.2f} s", file=sys.stderr, flush=True)
        a, t = stage.result()
        stage_matrices[stage_name] = _to_matrix(a, t, c_f)
    matrix = _to_matrix(a, t, c_f)
    return AffineResult(matrix=matrix, stage_matrices=stage_matrices, history=history,
                        seconds=time.perf_counter() - start, centre=np.asarray(c_f, dtype=np.float64))


def _search_rotations_grid(dim: int) -> list[np.ndarray]:
    """Rotation vectors (radians) of the start search: every combination of -a, 0, a about each axis (3D, 27
    starts) or -2a .. 2a (2D, 5 starts), a = :data:`SEARCH_DEGREES`."""
    step = math.radians(SEARCH_DEGREES)
    if dim == 2:
        return [np.array([k * step]) for k in (0, -1, 1, -2, 2)]
    values = (0.0, -step, step)
    return [np.array([x, y, z]) for x in values for y in values for z in values]


def _search(sim: _Similarity, name: str, a: np.ndarray, t: np.ndarray, centre: np.ndarray, radius: float, device,
            iters: int, step_mm: float) -> tuple[_Stage, float, int, list[dict]]:
    """Evaluate the similarity with the linear part rotated by each start of :func:`_search_rotations_grid` (about
    the centre), optimise from the :data:`SEARCH_STARTS` best ones and return the stage that ends highest, its
    similarity, the number of evaluations and one record per optimised start."""
    dim = a.shape[0]
    scored = []
    for w in _search_rotations_grid(dim):
        rot = _rotation(torch.as_tensor(w, dtype=torch.float64), dim).numpy()
        candidate = _Stage(name, rot @ a, t, centre, radius, device)
        with torch.no_grad():
            scored.append((float(sim(candidate.matrix())[0]), w, candidate))
    evaluations = len(scored)
    scored.sort(key=lambda item: -item[0])
    best, starts = None, []
    for first_value, w, candidate in scored[:SEARCH_STARTS]:
        value, count = _optimize(sim, candidate, iters, step_mm)
        evaluations += count
        starts.append({"rotation_degrees": np.degrees(w).tolist(), "start": first_value, "end": value})
        if best is None or value > best[0]:
            best = (value, candidate)
    return best[1], best[0], evaluations, starts


def _level_similarity(similarity: str, fixed: _Level, moving: _Level,
                      box: tuple[np.ndarray, np.ndarray]) -> _Similarity:
    """The similarity of one level: fixed voxels in the mask (or all of them) inside the world ``box`` (the fixed
    foreground's bounding box) plus :data:`CROP_MARGIN_MM`."""
    with torch.no_grad():
        if fixed.mask is not None:
            weight = fixed.mask[0, 0].clone()
            weight[weight < 0.5] = 0.0
        else:
            weight = torch.ones(fixed.image.shape[2:], dtype=torch.float32, device=fixed.image.device)
        return _Similarity(similarity, fixed, moving, weight, _crop_box(fixed, *box))


def _optimize(sim: _Similarity, stage: _Stage, iters: int, step_mm: float) -> tuple[float, int]:
    """Maximise ``sim(stage.matrix(p))`` over the stage parameters ``p`` (mm units) with BFGS.

    The first step moves the parameter with the largest gradient by ``step_mm`` (along the gradient); later steps
    come from the BFGS inverse-Hessian model (scaled after the first step). Each step backtracks (halving) until
    the similarity increases enough (Armijo), compared on the LNCC windows of the point the step starts from; the
    level ends after ``iters`` steps, when no step increases it, or when a step changes no parameter by more than
    :data:`TOLERANCE` times ``step_mm``. Returns the final similarity and the number of similarity evaluations.
    """

    def evaluate(x: torch.Tensor, reference):
        """``(-similarity, -similarity on the reference windows, gradient of the first, window weights)``."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value, on_reference, weights = sim(stage.matrix(x), reference)
            (grad,) = torch.autograd.grad(-value, x)
        return -float(value.detach()), -float(on_reference.detach()), grad.detach(), weights

    x = stage.p.detach().clone()
    f, _, g, weights = evaluate(x, None)
    evaluations = 1
    h = None  # inverse Hessian approximation
    eye = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
    for _ in range(iters):
        if h is None:
            d = -g * (step_mm / float(g.abs().max().clamp_min(1e-30)))
        else:
            d = -(h @ g)
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction (a stale model): restart from the gradient
            h = None
            d = -g * (step_mm / float(g.abs().max().clamp_min(1e-30)))
            slope = float(g @ d)
        step = 1.0
        for _ in range(MAX_BACKTRACKS):
            x_new = x + step * d
            f_new, f_same_windows, g_new, weights_new = evaluate(x_new, weights)
            evaluations += 1
            if f_same_windows <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no step increases the similarity: converged to the level's precision
        s, y = x_new - x, g_new - g
        sy = float(s @ y)
        if sy > 1e-12 * float(s @ s) ** 0.5 * float(y @ y) ** 0.5:
            if h is None:
                h = eye * (sy / float(y @ y))
            rho = 1.0 / sy
            v = eye - rho * torch.outer(s, y)
            h = v @ h @ v.T + rho * torch.outer(s, s)
        x, f, g, weights = x_new, f_new, g_new, weights_new
        if float(s.abs().max()) < TOLERANCE * step_mm:
            break
    stage.p = x
    return -f, evaluations


def _box_centre(image: Image) -> np.ndarray:
    """World position (mm) of the centre of the image's voxel box (index ``(n - 1) / 2``)."""
    grid = Grid.of(image)
    return grid.index_to_world((np.asarray(image.shape, dtype=np.float64) - 1.0) / 2.0)
