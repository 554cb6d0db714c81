"""ITK composite transform files (``.h5``): an affine and a displacement field in one file that ITK, SimpleITK
(``sitk.ReadTransform``), ANTs (``antsApplyTransforms -t``) and 3D Slicer read.

What a file holds (the HDF5 layout of ITK's ``HDF5TransformIO``, as ITK 5.4 writes it):

* ``/TransformGroup/0/TransformType``: ``CompositeTransform_double_{d}_{d}`` (the composite stores nothing else);
* ``/TransformGroup/{n}/TransformType``, ``.../TransformFixedParameters``, ``.../TransformParameters`` for each
  component ``n = 1, 2, ...`` in the composite's order; strings are variable-length ASCII datasets of shape
  ``(1,)``, parameters 1-D float64 datasets (the large ones chunked, shuffled and gzip-compressed; every HDF5
  build ITK ships decodes them).

Components (:class:`ITKAffine`, :class:`ITKDisplacementField`), in ITK's conventions:

* ``AffineTransform_double_{d}_{d}``: parameters = the ``d x d`` matrix row-major then the translation, fixed
  parameters = the centre (written as 0); ``T(p) = A p + t`` on **LPS** mm points.
* ``DisplacementFieldTransform_double_{d}_{d}``: fixed parameters = size (``d``), origin (``d``, LPS mm), spacing
  (``d``, mm), direction (``d x d`` row-major, LPS); parameters = the field's vectors (LPS mm), ITK's buffer order
  (first image axis fastest, the ``d`` components of one voxel together). ``T(p) = p + u(p)`` with ``u`` linearly
  interpolated; ITK uses zero displacement for a point outside the field's buffer (more than half a voxel beyond
  the first or last voxel centre) and the border voxels' vectors within that half voxel.
* **Order**: a composite ``[T_0, T_1, ..., T_{n-1}]`` maps a point as ``T_0(T_1(...T_{n-1}(p)))``: the component
  written **last is applied first** (ITK's ``CompositeTransform``; ANTs writes ``[affine, warp]`` this way).

Every transform here is a *resampling* transform, as ITK's ``ResampleImageFilter`` takes it: it maps a point of the
output grid (e.g. the fixed image) to the point of the input image (e.g. the moving image) to sample there.

In memory everything follows ``monai_gradicon``'s conventions (``monai_gradicon.io``): world coordinates are RAS+
mm, fields ``[dim, *S]`` on a :class:`~monai_gradicon.resample.Grid`; the LPS flip happens only in this module's
writer and reader. 2D transforms (``d = 2``) act on world (x, y), as ITK's 2D images do.

Writing needs ``h5py`` (a runtime dependency of ``monai_gradicon``; :func:`require_h5py` names the fix when an
environment lacks it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from monai_gradicon.affine import itk_parameters_to_matrix, matrix_to_itk_parameters
from monai_gradicon.io_utils import atomic_write
from monai_gradicon.resample import DEFAULT_CHUNK_VOXELS, Grid

__all__ = [
    "ITKAffine",
    "ITKDisplacementField",
    "ITKComponent",
    "write_itk_composite",
    "read_itk_composite",
    "transform_points_itk",
    "composite_displacement",
    "require_h5py",
    "TRANSFORM_GROUP",
]

TRANSFORM_GROUP = "TransformGroup"
"""The HDF5 group holding one sub-group per transform (``0``: the composite, ``1..n``: its components)."""

COMPRESSION_LEVEL = 4
"""gzip level of the displacement field's parameters (with the shuffle filter): a 7.9 M-voxel field (256 x 256 x 120)
writes in ~4 s into ~64 MB, about the size and time of the same field as ``.nii.gz``."""

_CHUNK_VALUES = 1 << 19
"""Values (float64) per HDF5 chunk of a large parameter dataset (4 MiB)."""

_AFFINE_TYPE = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_([23])_([23])$")
_FIELD_TYPE = re.compile(r"^DisplacementFieldTransform_(double|float)_([23])_([23])$")
_COMPOSITE_TYPE = re.compile(r"^CompositeTransform_(double|float)_([23])_([23])$")


def require_h5py():
    """Import ``h5py`` or raise an ``ImportError`` that says how to get it (and what needs it)."""
    try:
        import h5py
    except ImportError as exc:  # a broken or partial install: h5py is in install_requires
        raise ImportError(
            "Writing or reading ITK .h5 transform files (the outputs transform / inverse_transform) needs the h5py "
            "package, a dependency of monai_gradicon that this environment lacks: pip install h5py (or reinstall "
            "monai_gradicon), or leave these outputs out (outputs=... / --outputs ...)."
        ) from exc
    return h5py


# ----------------------------------------------------------------------------------------------------------------
# components
# ----------------------------------------------------------------------------------------------------------------


def _lps(ndim: int) -> np.ndarray:
    """``[ndim]`` signs turning RAS+ components into LPS+ (and back): x and y negated."""
    return np.array([-1.0, -1.0, 1.0][:ndim])


@dataclass(frozen=True)
class ITKAffine:
    """An affine resampling transform.

    Attributes:
        matrix: ``(4, 4)`` float64, world RAS+ mm point ``x`` -> ``matrix @ [x, 1]`` (``monai_gradicon.affine``'s
            convention; for 2D the matrix acts on (x, y) through rows and columns (0, 1, 3) and is the identity on
            z). A ``(3, 3)`` matrix is accepted for 2D and stored as ``(4, 4)``.
    """

    matrix: np.ndarray

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape == (3, 3):
            full = np.eye(4)
            full[np.ix_([0, 1, 3], [0, 1, 3])] = m
            m = full
        if m.shape != (4, 4):
            raise ValueError(f"An ITKAffine matrix must be (4, 4) (or (3, 3) for 2D), world RAS mm -> RAS mm; got "
                             f"shape {m.shape}.")
        if not np.all(np.isfinite(m)) or not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
            raise ValueError(f"An ITKAffine matrix must be finite with last row [0, 0, 0, 1]:\n{m}")
        if abs(np.linalg.det(m[:3, :3])) < 1e-12:
            raise ValueError(f"An ITKAffine matrix is singular:\n{m}")
        object.__setattr__(self, "matrix", m)

    def small(self, ndim: int) -> np.ndarray:
        """The ``(ndim + 1)`` square matrix acting on ``ndim``-D world points."""
        if ndim == 3:
            return self.matrix
        keep = [0, 1, 3]
        return self.matrix[np.ix_(keep, keep)]


@dataclass(frozen=True)
class ITKDisplacementField:
    """A displacement-field resampling transform ``p -> p + u(p)``.

    Attributes:
        displacement: ``[dim, *grid.shape]`` float32 or float64, world RAS+ mm, the vector at each voxel of ``grid``.
        grid: the field's voxel grid (voxel index -> world RAS+ mm).
    """

    displacement: np.ndarray
    grid: Grid

    def __post_init__(self) -> None:
        u = np.asarray(self.displacement)
        if u.dtype not in (np.float32, np.float64):
            raise ValueError(f"An ITKDisplacementField must be float32 or float64, got {u.dtype}.")
        if u.shape != (self.grid.ndim, *self.grid.shape):
            raise ValueError(f"An ITKDisplacementField on the grid {self.grid.shape} must have shape "
                             f"{(self.grid.ndim, *self.grid.shape)} ([dim, *S], world mm), got {u.shape}.")
        if self.grid.ndim not in (2, 3):
            raise ValueError(f"An ITKDisplacementField is 2D or 3D, got a {self.grid.ndim}D grid.")
        object.__setattr__(self, "displacement", u)

    @property
    def ndim(self) -> int:
        return self.grid.ndim


ITKComponent = ITKAffine | ITKDisplacementField
"""One component of a composite transform."""


def _dims(transforms: Sequence[ITKComponent]) -> int:
    """The dimensionality of a composite: its fields' (2 or 3), or 3 when it holds only affines."""
    if not transforms:
        raise ValueError("A composite transform needs at least one component.")
    bad = [type(t).__name__ for t in transforms if not isinstance(t, (ITKAffine, ITKDisplacementField))]
    if bad:
        raise TypeError(f"Composite components must be ITKAffine or ITKDisplacementField, got {bad}.")
    dims = {t.ndim for t in transforms if isinstance(t, ITKDisplacementField)}
    if len(dims) > 1:
        raise ValueError(f"The composite mixes fields of dimensions {sorted(dims)}.")
    return dims.pop() if dims else 3


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------


def _field_fixed_parameters(grid: Grid) -> np.ndarray:
    """ITK's ``DisplacementFieldTransform`` fixed parameters of ``grid``: size, origin, spacing, direction (LPS)."""
    d = grid.ndim
    flip = _lps(d)
    spacing = np.linalg.norm(grid.matrix, axis=0)
    direction = flip[:, None] * (grid.matrix / spacing[None, :])
    origin = flip * grid.offset
    return np.concatenate([np.asarray(grid.shape, dtype=np.float64), origin, spacing, direction.ravel()]) + 0.0


def _write_string(group, name: str, text: str, h5py) -> None:
    """A variable-length ASCII string dataset of shape ``(1,)`` (what ITK writes and reads)."""
    group.create_dataset(name, data=np.array([text.encode("ascii")], dtype=h5py.string_dtype("ascii")))


def _write_field_parameters(group, field: ITKDisplacementField) -> None:
    """The field's vectors in ITK's buffer order, LPS mm, float64: written in slabs along the last image axis (ITK's
    slowest), so no float64 copy of the whole field is made."""
    u = field.displacement
    d = field.ndim
    total = u.size
    chunk = (min(total, _CHUNK_VALUES),)
    data = group.create_dataset("TransformParameters", shape=(total,), dtype="<f8", chunks=chunk, shuffle=True,
                                compression="gzip", compression_opts=COMPRESSION_LEVEL)
    flip = _lps(d).reshape(-1, *([1] * d))
    per_slice = total // u.shape[-1]  # values per index of the last axis
    step = max(1, DEFAULT_CHUNK_VOXELS * d // max(per_slice, 1))
    for start in range(0, u.shape[-1], step):
        stop = min(u.shape[-1], start + step)
        # [dim, X, Y, k0:k1] -> LPS -> transposed to [k, Y, X, dim]: ITK's order (x fastest, components together)
        slab = (u[..., start:stop].astype(np.float64) * flip).T
        data[start * per_slice:stop * per_slice] = slab.ravel()


def write_itk_composite(path: str | os.PathLike, transforms: Sequence[ITKComponent]) -> str:
    """Write ``transforms`` as one ITK ``CompositeTransform`` ``.h5`` file, atomically (temporary file + rename).

    Args:
        path: the file, ending in ``.h5`` (ITK picks its HDF5 reader by the suffix; ``.hdf5`` works too).
        transforms: the components in ITK's order: ``[T_0, ..., T_{n-1}]`` maps a point as
            ``T_0(T_1(...T_{n-1}(p)))`` (the last is applied first). E.g. ``[ITKAffine(M), ITKDisplacementField(u,
            fixed grid)]`` is ``x -> M(x + u(x))``: the fixed -> moving resampling transform of a deformable
            registration that started from the affine pre-alignment ``M``.

    Returns:
        ``path``.

    Raises:
        ValueError / TypeError: a bad suffix, no components, mixed 2D / 3D, a 2D affine that mixes z in.
        ImportError: h5py missing (:func:`require_h5py`).
    """
    path = os.fspath(path)
    if not path.lower().endswith((".h5", ".hdf5")):
        raise ValueError(f"An ITK composite transform file must end in .h5 (ITK chooses its HDF5 reader by the "
                         f"suffix), got {path}.")
    d = _dims(transforms)
    h5py = require_h5py()
    params = [matrix_to_itk_parameters(t.matrix, d) if isinstance(t, ITKAffine) else None for t in transforms]

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["Producer"] = "monai_gradicon.itk_transforms"
            root = f.create_group(TRANSFORM_GROUP)
            composite = root.create_group("0")
            _write_string(composite, "TransformType", f"CompositeTransform_double_{d}_{d}", h5py)
            for n, (t, p) in enumerate(zip(transforms, params), start=1):
                group = root.create_group(str(n))
                if isinstance(t, ITKAffine):
                    _write_string(group, "TransformType", f"AffineTransform_double_{d}_{d}", h5py)
                    group.create_dataset("TransformFixedParameters", data=np.zeros(d, dtype="<f8"))
                    group.create_dataset("TransformParameters", data=np.asarray(p, dtype="<f8"))
                else:
                    _write_string(group, "TransformType", f"DisplacementFieldTransform_double_{d}_{d}", h5py)
                    group.create_dataset("TransformFixedParameters", data=_field_fixed_parameters(t.grid).astype("<f8"))
                    _write_field_parameters(group, t)

    return atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------


def _read_string(group, name: str, where: str) -> str:
    if name not in group:
        raise ValueError(f"{where} has no {name!r} dataset.")
    value = group[name][()]
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"{where}/{name} holds {value.size} strings, expected one.")
        value = value.ravel()[0]
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _read_vector(group, name: str, where: str) -> np.ndarray:
    if name not in group:
        raise ValueError(f"{where} has no {name!r} dataset.")
    values = np.asarray(group[name][()], dtype=np.float64).ravel()
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where}/{name} holds non-finite values.")
    return values


def _field_from_parameters(fixed: np.ndarray, params: np.ndarray, d: int, where: str) -> ITKDisplacementField:
    if fixed.size != d * (d + 3):
        raise ValueError(f"{where}: a {d}D displacement field has {d * (d + 3)} fixed parameters (size, origin, "
                         f"spacing, direction), got {fixed.size}.")
    size = fixed[:d]
    if np.any(size < 1) or np.any(size != np.round(size)):
        raise ValueError(f"{where}: the field size {size.tolist()} is not a positive whole number per axis.")
    shape = tuple(int(s) for s in size)
    origin, spacing = fixed[d:2 * d], fixed[2 * d:3 * d]
    direction = fixed[3 * d:].reshape(d, d)
    if params.size != int(np.prod(shape)) * d:
        raise ValueError(f"{where}: a {shape} field of {d}-vectors has {int(np.prod(shape)) * d} parameters, got "
                         f"{params.size}.")
    flip = _lps(d)
    affine = np.eye(d + 1)
    affine[:d, :d] = flip[:, None] * direction * spacing[None, :]
    affine[:d, d] = flip * origin
    if abs(np.linalg.det(affine[:d, :d])) < 1e-12:
        raise ValueError(f"{where}: the field's spacing and direction are singular.")
    u = params.reshape(*shape[::-1], d).T * flip.reshape(-1, *([1] * d))  # [k, j, i, c] -> [c, i, j, k], RAS
    return ITKDisplacementField(np.ascontiguousarray(u), Grid(shape, affine))


def read_itk_composite(path: str | os.PathLike) -> list[ITKComponent]:
    """Read an ITK ``.h5`` transform file -> its components in ITK's order (the last is applied first).

    Reads composites (``CompositeTransform`` in group 0, components after it) and files of plain transforms, of the
    types this module writes and ANTs / ITK write for affine + deformable registrations: ``AffineTransform`` /
    ``MatrixOffsetTransformBase`` (any centre) and ``DisplacementFieldTransform``, double or float, 2D or 3D. Any
    other type, a missing dataset or a wrong parameter count raises a ``ValueError`` that names it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The ITK transform file does not exist: {path}")
    h5py = require_h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path} is not an HDF5 file: {exc}") from exc
    with f:
        if TRANSFORM_GROUP not in f:
            raise ValueError(f"{path} has no /{TRANSFORM_GROUP}: not an ITK HDF5 transform file.")
        root = f[TRANSFORM_GROUP]
        names = sorted(root.keys(), key=lambda k: int(k) if k.isdigit() else -1)
        if not names or names != [str(i) for i in range(len(names))]:
            raise ValueError(f"{path}: /{TRANSFORM_GROUP} must hold groups 0, 1, ..., got {list(root.keys())}.")
        out: list[ITKComponent] = []
        dims: set[int] = set()
        for n in names:
            where = f"{path}:/{TRANSFORM_GROUP}/{n}"
            group = root[n]
            kind = _read_string(group, "TransformType", where)
            composite = _COMPOSITE_TYPE.match(kind)
            if composite is not None:
                if n != "0":
                    raise ValueError(f"{where}: a CompositeTransform can only be the first transform of a file.")
                dims.add(int(composite.group(2)))
                continue
            affine, field = _AFFINE_TYPE.match(kind), _FIELD_TYPE.match(kind)
            match = affine or field
            if match is None or match.group(match.re.groups - 1) != match.group(match.re.groups):
                raise ValueError(f"{where}: transform type {kind!r} is not supported (AffineTransform, "
                                 "MatrixOffsetTransformBase or DisplacementFieldTransform, 2D or 3D).")
            d = int(match.group(match.re.groups))
            dims.add(d)
            fixed = _read_vector(group, "TransformFixedParameters", where)
            params = _read_vector(group, "TransformParameters", where)
            if affine is not None:
                if params.size != d * d + d or fixed.size != d:
                    raise ValueError(f"{where}: a {d}D {kind} needs {d * d + d} parameters and {d} fixed parameters, "
                                     f"got {params.size} and {fixed.size}.")
                out.append(ITKAffine(itk_parameters_to_matrix(params, fixed)))
            else:
                out.append(_field_from_parameters(fixed, params, d, where))
        if len(dims) > 1:
            raise ValueError(f"{path} mixes transforms of dimensions {sorted(dims)}.")
        if not out:
            raise ValueError(f"{path} holds no transform besides the composite.")
    return out


# ----------------------------------------------------------------------------------------------------------------
# evaluation (ITK's semantics)
# ----------------------------------------------------------------------------------------------------------------


def _field_at(field: ITKDisplacementField, points: np.ndarray) -> np.ndarray:
    """ITK's ``DisplacementFieldTransform`` displacement at world points ``[K, dim]`` (RAS mm) -> ``[K, dim]``:
    linear interpolation with the border voxels' vectors within half a voxel outside, zero farther out."""
    grid, d = field.grid, field.ndim
    index = grid.world_to_index(points)  # [K, d] continuous, float64
    shape = np.asarray(grid.shape)
    inside = np.all((index >= -0.5) & (index < shape - 0.5), axis=1)
    c = np.clip(index, 0.0, shape - 1)
    low = np.minimum(np.floor(c).astype(np.int64), np.maximum(shape - 2, 0))
    frac = c - low
    u = field.displacement
    out = np.zeros((points.shape[0], d))
    for corner in range(1 << d):
        bits = [(corner >> a) & 1 for a in range(d)]
        weight = np.prod([frac[:, a] if b else 1.0 - frac[:, a] for a, b in enumerate(bits)], axis=0)
        idx = tuple(np.minimum(low[:, a] + b, shape[a] - 1) for a, b in enumerate(bits))
        out += weight[:, None] * u[(slice(None), *idx)].T.astype(np.float64)
    out[~inside] = 0.0
    return out


def transform_points_itk(transforms: Sequence[ITKComponent], points: np.ndarray) -> np.ndarray:
    """Map world points ``[K, dim]`` (RAS+ mm) through a composite as ITK does (the last component first; fields
    with ITK's interpolation and zero displacement outside their buffer), float64 -> ``[K, dim]`` RAS mm."""
    d = _dims(transforms)
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != d:
        raise ValueError(f"points must be [K, {d}] world mm for this {d}D composite, got shape {p.shape}.")
    for t in reversed(transforms):
        if isinstance(t, ITKAffine):
            m = t.small(d)
            p = p @ m[:-1, :-1].T + m[:-1, -1]
        else:
            p = p + _field_at(t, p)
    return p


def composite_displacement(transforms: Sequence[ITKComponent], grid: Grid,
                           chunk_voxels: int = DEFAULT_CHUNK_VOXELS) -> np.ndarray:
    """The composite as a displacement field on ``grid``: ``T(x) - x`` for every voxel ``x``, ``[dim, *grid.shape]``
    float64 world RAS+ mm (e.g. to compare with the ``displacement_mm`` field it was written from)."""
    d = _dims(transforms)
    if grid.ndim != d:
        raise ValueError(f"The grid is {grid.ndim}D but the composite is {d}D.")
    out = np.empty((d, *grid.shape), dtype=np.float64)
    per_slice = int(np.prod(grid.shape[1:]))
    step = max(1, chunk_voxels // max(per_slice, 1))
    for start in range(0, grid.shape[0], step):
        stop = min(grid.shape[0], start + step)
        axes = [np.arange(start, stop, dtype=np.float64)] + [np.arange(n, dtype=np.float64) for n in grid.shape[1:]]
        index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, d)
        world = grid.index_to_world(index)
        moved = transform_points_itk(transforms, world)
        out[:, start:stop] = (moved - world).T.reshape(d, stop - start, *grid.shape[1:])
    return out
