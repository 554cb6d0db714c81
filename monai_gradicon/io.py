"""Reading and writing medical images with their voxel-to-world geometry.

Conventions used throughout ``monai_gradicon`` for files on disk:

* An :class:`Image` holds a **spatial** array ``[*S]`` (2D or 3D, no channel axis) in the file's own voxel order,
  and a ``4 x 4`` affine mapping a 0-based voxel index ``(i, j, k, 1)`` to **world coordinates in mm, RAS+**: the
  NIfTI / nibabel / MONAI convention, x towards the patient's **R**ight, y **A**nterior, z **S**uperior.
  ITK, 3D Slicer's files and NRRD's ``left-posterior-superior`` space use LPS+ instead: ``(x, y, z)_LPS =
  (-x, -y, z)_RAS``. Conversions happen only here, at reading and writing.
* The network sees the array in this voxel order (as MONAI ``LoadImage`` gives it); physical anisotropy is ignored
  by the network, exactly as in the reference implementation.

Readers: NIfTI (``.nii``, ``.nii.gz``) with nibabel; NRRD (``.nrrd`` / ``.nhdr``, raw, gzip or bzip2 encoded) with a
small built-in reader (no extra dependency); anything else through MONAI ``LoadImage`` (which needs ITK or another
backend for formats like ``.mha``). Every failure raises an error that names the file and the problem.

Writer: :func:`write_nifti` writes NIfTI-1 atomically (temporary file + rename) with the affine in both sform and
qform, so ITK, ANTs, 3D Slicer, nibabel and MONAI all read the same geometry.
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from monai_gradicon.io_utils import atomic_write, atomic_write_text

__all__ = [
    "Image",
    "ImageReadError",
    "read_image",
    "read_shape",
    "as_image",
    "read_nrrd",
    "write_nifti",
    "write_displacement_field",
    "read_displacement_field",
    "write_text",
    "spatial_affine",
    "LPS_TO_RAS",
    "NIFTI_INTENT_VECTOR",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""``4 x 4`` matrix turning LPS+ world coordinates into RAS+ (it is its own inverse)."""

NIFTI_INTENT_VECTOR = 1007
"""NIfTI intent code of a vector image; ITK and ANTs read a ``(X, Y, Z, 1, 3)`` file with it as a displacement field."""

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")


class ImageReadError(ValueError):
    """An image file exists but cannot be read, or holds something that is not a 2D/3D scalar image."""


@dataclass
class Image:
    """A scalar image on a voxel grid with its world geometry.

    Attributes:
        array: ``[*S]`` numpy array (2D or 3D), file voxel order, the dtype as stored in the file.
        affine: ``(4, 4)`` float64, voxel index ``(i, j, k)`` -> world RAS+ mm. For a 2D image the third voxel axis
            is the (single) slice axis.
        path: where the image was read from (``None`` if built in memory).
    """

    array: np.ndarray
    affine: np.ndarray
    path: str | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"An image affine must be 4 x 4 (voxel -> world RAS mm), got shape {self.affine.shape}.")
        if self.array.ndim not in (2, 3):
            raise ValueError(f"An Image holds a 2D or 3D spatial array, got shape {self.array.shape}.")
        linear = spatial_affine(self.affine, self.ndim)[:-1, :-1]
        if not np.all(np.isfinite(self.affine)) or abs(np.linalg.det(linear)) < 1e-12:
            raise ValueError(f"The affine of {self.describe()} is not finite and invertible:\n{self.affine}")

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.array.ndim

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, : self.ndim], axis=0))

    @property
    def affine_nd(self) -> np.ndarray:
        """The ``(ndim + 1) x (ndim + 1)`` affine (for 2D: the in-plane part of the 4 x 4 affine)."""
        return spatial_affine(self.affine, self.ndim)

    def describe(self) -> str:
        return f"image {self.path}" if self.path else "the in-memory image"


def spatial_affine(affine: np.ndarray, ndim: int) -> np.ndarray:
    """The ``(ndim + 1) x (ndim + 1)`` voxel -> world affine of a 2D or 3D image from its ``4 x 4`` affine.

    For 2D the rows and columns (0, 1, 3) are kept: world x and y as functions of the two in-plane voxel indices.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if ndim == 3:
        return affine
    keep = [0, 1, 3]
    return affine[np.ix_(keep, keep)]


def _has_suffix(path: str, suffixes: tuple[str, ...]) -> bool:
    return path.lower().endswith(suffixes)


def _squeeze_to_spatial(array: np.ndarray, path: str) -> np.ndarray:
    """Drop trailing singleton axes beyond the spatial ones; a single-slice volume becomes 2D."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim > 3:
        raise ImageReadError(
            f"{path} has shape {array.shape}: a multi-channel or time-series image. Registration needs one 2D or "
            "3D scalar image per input; extract the channel or frame you want first."
        )
    if array.ndim < 2:
        raise ImageReadError(f"{path} has shape {array.shape}: not a 2D or 3D image.")
    if min(array.shape) < 2:
        raise ImageReadError(f"{path} has shape {array.shape}: every spatial axis needs at least 2 voxels.")
    return array


def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(path)
    array = np.asanyarray(img.dataobj)
    return array, np.asarray(img.affine, dtype=np.float64)


def _read_with_monai(path: str) -> tuple[np.ndarray, np.ndarray]:
    from monai.transforms import LoadImage

    data = LoadImage(image_only=True)(path)
    affine = np.asarray(data.affine, dtype=np.float64)
    array = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data)
    if affine.shape == (3, 3):  # MONAI gives (d+1) x (d+1) affines for 2D images
        full = np.eye(4)
        full[np.ix_([0, 1, 3], [0, 1, 3])] = affine
        affine = full
    return array, affine


def read_image(path: str | os.PathLike, name: str = "image") -> Image:
    """Read a 2D or 3D scalar image and its voxel -> world RAS+ mm affine.

    Args:
        path: a NIfTI, NRRD or other file MONAI ``LoadImage`` can read.
        name: what the image is (``"fixed image"``, ``"moving mask"``...), used in error messages.

    Raises:
        FileNotFoundError: the path does not exist or is not a file.
        ImageReadError: the file cannot be decoded, or it is not a single 2D/3D scalar image.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"The {name} file does not exist: {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {name} path is not a file: {path}")
    try:
        if _has_suffix(path, NIFTI_SUFFIXES):
            array, affine = _read_nifti(path)
        elif _has_suffix(path, NRRD_SUFFIXES):
            array, affine = read_nrrd(path)
        else:
            array, affine = _read_with_monai(path)
    except (ImageReadError, FileNotFoundError) as exc:
        raise type(exc)(f"Cannot read the {name}: {exc}") from exc
    except Exception as exc:  # nibabel / zlib / MONAI raise many types; name the file and the reason
        raise ImageReadError(f"Cannot read the {name} {path}: {type(exc).__name__}: {exc}") from exc
    array = np.asarray(array)
    if array.dtype.fields is not None or array.dtype.kind not in "biuf":
        raise ImageReadError(
            f"The {name} {path} holds {array.dtype} voxels (a colour/RGB or complex image); registration needs a "
            "scalar greyscale image: convert it first."
        )
    array = _squeeze_to_spatial(array, f"The {name} {path}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    try:
        return Image(array=array, affine=affine, path=path)
    except ValueError as exc:
        raise ImageReadError(f"The {name} {path} has an unusable geometry: {exc}") from exc


def read_shape(path: str | os.PathLike, name: str = "image") -> tuple[int, ...]:
    """The spatial shape of an image file from its header only (NIfTI, NRRD; other formats are read whole), e.g.
    to predict memory before any work. Trailing singleton axes are dropped as :func:`read_image` does."""
    path = os.fspath(path)
    shape: tuple[int, ...]
    try:
        if _has_suffix(path, NIFTI_SUFFIXES):
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(path).shape)
        elif _has_suffix(path, NRRD_SUFFIXES):
            sizes = None
            with open(path, "rb") as f:
                for raw in f:
                    line = raw.decode("latin-1").strip()
                    if not line:
                        break
                    if line.lower().startswith("sizes:"):
                        sizes = tuple(int(v) for v in line.split(":", 1)[1].split())
            if sizes is None:
                raise ImageReadError(f"Cannot read the {name} {path}: the NRRD header has no 'sizes' field.")
            shape = sizes
        else:
            return read_image(path, name).shape
    except ImageReadError:
        raise
    except Exception as exc:  # nibabel / zlib raise many types; name the file and the reason
        raise ImageReadError(f"Cannot read the {name} {path}: {type(exc).__name__}: {exc}") from exc
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 3 and shape[2] == 1:
        shape = shape[:2]
    return shape


def as_image(obj: Any, name: str = "image") -> Image:
    """Accept an :class:`Image`, a path, or a MONAI ``MetaTensor`` / array with an ``affine`` attribute.

    A ``MetaTensor`` may carry one leading channel axis of size 1 (``EnsureChannelFirst``); MONAI affines are RAS.
    """
    if isinstance(obj, Image):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return read_image(obj, name)
    affine = getattr(obj, "affine", None)
    if affine is None:
        raise TypeError(
            f"The {name} must be a path, a monai_gradicon.io.Image or a MONAI MetaTensor with an affine; got "
            f"{type(obj).__name__}."
        )
    array = obj.detach().cpu().numpy() if hasattr(obj, "detach") else np.asarray(obj)
    affine = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
    spatial = affine.shape[0] - 1
    if array.ndim == spatial + 1 and array.shape[0] == 1:
        array = array[0]
    if affine.shape == (3, 3):
        full = np.eye(4)
        full[np.ix_([0, 1, 3], [0, 1, 3])] = affine
        affine = full
    return Image(array=_squeeze_to_spatial(np.asarray(array), f"The {name}"), affine=affine, path=None)


# ----------------------------------------------------------------------------------------------------------------
# NRRD
# ----------------------------------------------------------------------------------------------------------------

_NRRD_TYPES = {
    ("signed char", "int8", "int8_t"): np.int8,
    ("uchar", "unsigned char", "uint8", "uint8_t"): np.uint8,
    ("short", "short int", "signed short", "signed short int", "int16", "int16_t"): np.int16,
    ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"): np.uint16,
    ("int", "signed int", "int32", "int32_t"): np.int32,
    ("uint", "unsigned int", "uint32", "uint32_t"): np.uint32,
    ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"):
        np.int64,
    ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"): np.uint64,
    ("float",): np.float32,
    ("double",): np.float64,
}

_AXIS_SIGN_TO_RAS = {"right": 1.0, "left": -1.0, "anterior": 1.0, "posterior": -1.0, "superior": 1.0, "inferior": -1.0}
_SPACE_ABBREVIATIONS = {
    "ras": "right-anterior-superior",
    "las": "left-anterior-superior",
    "lps": "left-posterior-superior",
}


def _nrrd_dtype(name: str, path: str) -> np.dtype:
    key = name.strip().lower()
    for names, dtype in _NRRD_TYPES.items():
        if key in names:
            return np.dtype(dtype)
    raise ImageReadError(f"{path}: unsupported NRRD type {name!r}.")


def _nrrd_vectors(text: str) -> list[list[float] | None]:
    """Parse ``(a,b,c) (d,e,f) none`` into vectors (``None`` for ``none``)."""
    out: list[list[float] | None] = []
    for token in re.findall(r"\([^)]*\)|none", text):
        out.append(None if token == "none" else [float(v) for v in token.strip("()").split(",")])
    return out


def _space_to_ras_signs(space: str, path: str) -> np.ndarray:
    words = _SPACE_ABBREVIATIONS.get(space.strip().lower(), space.strip().lower()).split("-")
    if len(words) != 3 or any(w not in _AXIS_SIGN_TO_RAS for w in words):
        raise ImageReadError(
            f"{path}: NRRD space {space!r} is not an anatomical 3D space (right/left-anterior/posterior-"
            "superior/inferior); its world orientation is unknown."
        )
    return np.array([_AXIS_SIGN_TO_RAS[w] for w in words])


def read_nrrd(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NRRD file (attached ``.nrrd`` or detached ``.nhdr``) into an array and a voxel -> RAS+ affine.

    Supports encodings raw, gzip and bzip2, any endianness, ``space`` + ``space directions`` + ``space origin``
    (or plain ``spacings``, taken as LPS-aligned axes with origin 0, as ITK does). The array is in NRRD's axis order
    (fastest axis first), matching the index order of ``space directions``.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.readline()
        if not magic.startswith(b"NRRD000"):
            raise ImageReadError(f"{path} is not a NRRD file (it does not start with 'NRRD000').")
        fields: dict[str, str] = {}
        while True:
            line = f.readline()
            if not line or line in (b"\n", b"\r\n"):
                break
            text = line.decode("latin-1").rstrip("\r\n")
            if text.startswith("#"):
                continue
            if ":=" in text:  # key/value pairs, not fields
                continue
            if ":" not in text:
                raise ImageReadError(f"{path}: malformed NRRD header line {text!r}.")
            key, value = text.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        attached = f.read()

    def need(key: str) -> str:
        if key not in fields:
            raise ImageReadError(f"{path}: the NRRD header has no {key!r} field.")
        return fields[key]

    dtype = _nrrd_dtype(need("type"), path)
    sizes = [int(v) for v in need("sizes").split()]
    if int(need("dimension")) != len(sizes):
        raise ImageReadError(f"{path}: NRRD 'dimension' does not match the number of 'sizes'.")
    endian = fields.get("endian", "little").lower()
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    encoding = need("encoding").lower()

    data_file = fields.get("data file", fields.get("datafile"))
    if data_file is not None:
        if data_file.startswith("LIST") or len(data_file.split()) > 1:
            raise ImageReadError(f"{path}: NRRD with several detached data files is not supported.")
        data_path = data_file if os.path.isabs(data_file) else os.path.join(os.path.dirname(path), data_file)
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"{path}: its NRRD data file {data_path} does not exist.")
        with open(data_path, "rb") as df:
            payload = df.read()
    else:
        payload = attached
    line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
    for _ in range(line_skip):
        payload = payload[payload.index(b"\n") + 1:]
    if encoding in ("gzip", "gz"):
        payload = gzip.decompress(payload)
    elif encoding in ("bzip2", "bz2"):
        payload = bz2.decompress(payload)
    elif encoding != "raw":
        raise ImageReadError(f"{path}: NRRD encoding {encoding!r} is not supported (raw, gzip and bzip2 are).")
    count = int(np.prod(sizes))
    byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
    if byte_skip == -1:
        byte_skip = len(payload) - count * dtype.itemsize
    if len(payload) - byte_skip < count * dtype.itemsize:
        raise ImageReadError(
            f"{path}: the NRRD data is truncated ({len(payload) - byte_skip} bytes for {count} voxels of "
            f"{dtype.itemsize} bytes)."
        )
    flat = np.frombuffer(payload, dtype=dtype, count=count, offset=byte_skip)
    array = flat.reshape(sizes, order="F").astype(dtype.newbyteorder("="), copy=True)

    if "space directions" in fields:
        vectors = _nrrd_vectors(fields["space directions"])
        if len(vectors) != len(sizes):
            raise ImageReadError(f"{path}: 'space directions' has {len(vectors)} entries for {len(sizes)} axes.")
        spatial_axes = [i for i, v in enumerate(vectors) if v is not None]
        other_axes = [i for i, v in enumerate(vectors) if v is None]
        if any(sizes[i] != 1 for i in other_axes):
            raise ImageReadError(
                f"{path} is a multi-component NRRD (non-spatial axis of size "
                f"{[sizes[i] for i in other_axes]}); registration needs a scalar image."
            )
        array = array.reshape([sizes[i] for i in spatial_axes], order="A")
        directions = np.array([vectors[i] for i in spatial_axes], dtype=np.float64).T  # columns = voxel axes
        space_dim = directions.shape[0]
        origin = np.zeros(space_dim)
        if "space origin" in fields:
            origin = np.array(_nrrd_vectors(fields["space origin"])[0], dtype=np.float64)
        space = fields.get("space")
        signs = _space_to_ras_signs(space, path) if space is not None else np.array([-1.0, -1.0, 1.0])
        if space is None and "space dimension" not in fields:
            raise ImageReadError(f"{path}: NRRD has 'space directions' but neither 'space' nor 'space dimension'.")
        signs = signs[:space_dim]
    else:
        spacings = [float(v) for v in fields.get("spacings", " ".join(["1"] * len(sizes))).split()]
        spacings = [1.0 if not np.isfinite(s) else s for s in spacings]
        directions = np.diag(spacings)
        origin = np.zeros(len(sizes))
        signs = np.array([-1.0, -1.0, 1.0])[: len(sizes)]
    n_vox, space_dim = directions.shape[1], directions.shape[0]
    if n_vox not in (2, 3) or space_dim not in (2, 3) or n_vox > space_dim:
        raise ImageReadError(f"{path}: NRRD with {n_vox} spatial axes in a {space_dim}D space is not supported.")
    affine = np.eye(4)
    affine[:space_dim, :n_vox] = directions * signs[:, None] + 0.0  # + 0.0 turns -0.0 into 0.0
    affine[:space_dim, 3] = origin * signs + 0.0
    if n_vox == 2:  # a 2D image: complete the slice axis so the 4 x 4 affine is invertible
        normal = np.cross(affine[:3, 0], affine[:3, 1])
        affine[:3, 2] = normal / max(np.linalg.norm(normal), 1e-12)
    return array, affine


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------


def _nifti_image(array: np.ndarray, affine: np.ndarray, intent: int | None = None, intent_name: str = ""):
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if intent is not None:
        img.header.set_intent(intent, (), name=intent_name)
    return img


NIFTI_BLOCK_BYTES = 4 << 20
"""Bytes of voxel data per block of :func:`write_nifti` (each block laid out and gzip-compressed on its own)."""


def _nifti_blocks(array: np.ndarray, negate_last: tuple[int, ...], block_bytes: int):
    """The voxel data of ``array`` in NIfTI's order (Fortran: the first axis fastest) as a sequence of zero-argument
    callables, each returning one C-contiguous block: planes of the third axis for every index of the later axes,
    in file order. Indices in ``negate_last`` of the last axis (of a 4D/5D array) are written negated."""
    arr = array if array.ndim >= 3 else array.reshape(array.shape + (1,) * (3 - array.ndim))
    rest = arr.shape[3:]
    plane = max(1, arr.shape[0] * arr.shape[1] * arr.itemsize)
    step = max(1, block_bytes // plane)
    for later in np.ndindex(*rest[::-1]):
        index = tuple(reversed(later))
        negate = bool(rest) and index[-1] in negate_last
        for z0 in range(0, arr.shape[2], step):
            part = arr[(slice(None), slice(None), slice(z0, z0 + step)) + index].transpose(2, 1, 0)

            def block(part=part, negate=negate) -> np.ndarray:
                return np.negative(part, order="C") if negate else np.ascontiguousarray(part)

            yield block


def _gzip_member(level: int):
    """(header bytes, compress(raw, last) -> deflate bytes, trailer(crc, size) -> bytes) of one gzip member whose
    raw deflate stream is cut into independently compressed blocks (each ends on a byte boundary with a sync flush,
    the last one finishes the stream): any gzip reader sees one ordinary member."""
    import struct
    import zlib

    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no flags, mtime 0, unknown OS

    def compress(raw, last: bool) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(raw) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    def trailer(crc: int, size: int) -> bytes:
        return struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)

    return header, compress, trailer


def _write_nifti_stream(path: str, header: bytes, array: np.ndarray, negate_last: tuple[int, ...], compress: bool,
                        level: int, workers: int, block_bytes: int) -> None:
    """Write ``header`` then the voxel data block by block: blocks are laid out (and compressed) in ``workers``
    threads -- numpy copies and zlib release the GIL -- and written in order, at most ``2 * workers`` in flight."""
    import zlib
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    blocks = list(_nifti_blocks(array, negate_last, block_bytes))
    if compress:
        gz_header, deflate, trailer = _gzip_member(level)

        def job(i: int) -> tuple[np.ndarray, bytes]:
            raw = blocks[i]()
            return raw, deflate(memoryview(raw).cast("B"), i == len(blocks) - 1)
    else:
        def job(i: int) -> tuple[np.ndarray, bytes]:
            raw = blocks[i]()
            return raw, b""

    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        crc, size = zlib.crc32(header), len(header)
        if compress:
            f.write(gz_header)
            f.write(deflate(header, not blocks))
        else:
            f.write(header)
        pending: deque = deque()

        def emit() -> None:
            nonlocal crc, size
            raw, packed = pending.popleft().result()
            view = memoryview(raw).cast("B")
            if compress:
                crc, size = zlib.crc32(view, crc), size + len(view)
                f.write(packed)
            else:
                f.write(view)

        for i in range(len(blocks)):
            pending.append(pool.submit(job, i))
            if len(pending) >= 2 * max(1, workers):
                emit()
        while pending:
            emit()
        if compress:
            f.write(trailer(crc, size))


def write_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    intent: int | None = None,
    intent_name: str = "",
    negate_last: tuple[int, ...] = (),
    workers: int | None = None,
) -> str:
    """Write ``array`` with the voxel -> RAS mm ``affine`` (4 x 4) as NIfTI-1, atomically (temp file + rename).

    The affine goes into both sform and qform (code 1, scanner). ``.nii.gz`` is gzip level 1 (nibabel's default).
    The data are streamed in blocks of :data:`NIFTI_BLOCK_BYTES` laid out and compressed in ``workers`` threads
    (default: the CPUs, at most 4), from ``array`` as it is (any memory layout, e.g. a ``moveaxis`` view: no
    whole-array copy); the file is byte for byte what nibabel writes (uncompressed) or its gzip-compressed equal.
    ``negate_last``: indices of the last axis of a 4D/5D array written negated (:func:`write_displacement_field`'s
    RAS -> LPS components, without a negated copy). Returns the path written.
    """
    path = os.fspath(path)
    if not _has_suffix(path, NIFTI_SUFFIXES):
        raise ValueError(f"Output {path} must end in .nii or .nii.gz.")
    array = np.asarray(array)
    if negate_last and array.ndim < 4:
        raise ValueError(f"negate_last applies to the last axis of a 4D/5D array, got shape {array.shape}.")
    img = _nifti_image(array, np.asarray(affine, dtype=np.float64), intent, intent_name)
    img.update_header()
    header = img.header
    if header.get_data_dtype() != array.dtype or not array.dtype.isnative:
        if negate_last:
            raise ValueError(f"negate_last needs a natively stored NIfTI dtype, got {array.dtype}.")
        return atomic_write(path, img.to_filename)  # a dtype nibabel converts or scales: its own writer
    header.set_slope_inter(1.0, 0.0)  # no scaling, as nibabel records it
    import io as _io

    buffer = _io.BytesIO()
    header.write_to(buffer)
    head = buffer.getvalue()
    head += b"\0" * (int(header["vox_offset"]) - len(head))
    threads = min(4, os.cpu_count() or 1) if workers is None else int(workers)
    compress = path.lower().endswith(".gz")
    return atomic_write(path, lambda tmp: _write_nifti_stream(tmp, head, array, tuple(negate_last), compress, 1,
                                                             threads, NIFTI_BLOCK_BYTES))


write_text = atomic_write_text
"""Write a text file atomically (:func:`monai_gradicon.io_utils.atomic_write_text`)."""


def write_displacement_field(path: str | os.PathLike, displacement_ras: np.ndarray, affine: np.ndarray) -> str:
    """Write a physical displacement field in the ITK / ANTs NIfTI convention.

    Args:
        displacement_ras: ``[dim, *S]`` float, world **RAS** mm, on the grid of ``affine``: the point ``x`` of this
            grid maps to ``x + u(x)`` (a *resampling* transform: fixed point -> moving point).
        affine: ``(4, 4)`` voxel -> world RAS mm of the grid.

    On disk: shape ``(X, Y, Z, 1, 3)`` (``(X, Y, 1, 1, 2)`` in 2D), float32, ``intent_code = 1007``
    (``NIFTI_INTENT_VECTOR``) and vector components in **LPS** mm (the x and y components negated), which is what
    ITK's NIfTI reader (no vector reorientation for intent 1007), ``antsApplyTransforms`` and 3D Slicer's
    ITK-based transform reader expect of a displacement field.
    """
    u = np.asarray(displacement_ras, dtype=np.float32)
    dim = u.shape[0]
    if u.ndim != dim + 1 or dim not in (2, 3):
        raise ValueError(f"A displacement field must be [dim, *S] with dim 2 or 3, got shape {u.shape}.")
    vectors = np.moveaxis(u, 0, -1)  # [*S, dim], a view: the writer lays the blocks out (and negates x, y) itself
    if dim == 2:
        vectors = vectors[:, :, None, None, :]
    else:
        vectors = vectors[:, :, :, None, :]
    return write_nifti(path, vectors, affine, intent=NIFTI_INTENT_VECTOR, negate_last=(0, 1))


def read_displacement_field(path: str | os.PathLike, name: str = "displacement field") -> tuple[np.ndarray, np.ndarray]:
    """Read a field written by :func:`write_displacement_field` (or ANTs): ``([dim, *S] RAS mm, 4 x 4 affine)``."""
    import nibabel as nib

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {name} file does not exist: {path}")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise ImageReadError(f"Cannot read the {name} {path}: {type(exc).__name__}: {exc}") from exc
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] not in (2, 3):
        raise ImageReadError(
            f"The {name} {path} has shape {data.shape}; a displacement field is (X, Y, Z, 1, 3) or (X, Y, 1, 1, 2)."
        )
    dim = data.shape[4]
    vectors = data[:, :, :, 0, :] if dim == 3 else data[:, :, 0, 0, :]
    u = np.moveaxis(vectors, -1, 0).copy()
    u[0] *= -1.0
    u[1] *= -1.0
    return u, np.asarray(img.affine, dtype=np.float64)
