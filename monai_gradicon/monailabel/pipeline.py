"""Registration of one image pair with a GradICON bundle: the pre / infer / post steps of the MONAI Label task.

Nothing here imports ``monailabel``: the functions are plain Python on paths, tensors and numpy arrays, so they are
tested without a server (``tests/test_monailabel_pipeline.py``) and reused by
:class:`monai_gradicon.monailabel.GradICONRegistrationTask`.

Steps (moving image A, fixed image B):

1. :func:`load_bundle` reads a bundle folder: ``configs/inference.json`` (``network_def``, ``preprocessing``),
   ``configs/metadata.json`` and ``models/model.pt`` (loaded **strictly**).
2. :func:`prepare_pair` (pre) checks both files (exist, readable, 2D/3D, same dimensionality as each other and as
   the bundle) and runs the bundle's own ``preprocessing`` on ``{moving_key: A, fixed_key: B}``. The preprocessed
   tensors are at the network shape; their MONAI ``MetaTensor`` affines say where each network voxel sits in the
   world, so any spatial preprocessing MONAI tracks (``Resized``, ``Orientationd``, ``Spacingd``, crops) is undone
   exactly afterwards.
3. :func:`run_registration_network` (infer) runs the network, optionally with instance optimization, and returns
   ``Phi_AB`` as a callable on normalized network coordinates (fixed -> moving).
4. :func:`resample_to_fixed` (post) evaluates ``Phi_AB`` at every voxel of the **original fixed grid** and returns
   the physical displacement ``u(x) = y(x) - x`` (world RAS mm) and the original moving image warped onto that grid
   (float32).
5. :func:`write_outputs` writes the warped image as float32 NIfTI with the fixed image's affine, and the field as
   the project's mm displacement field (:func:`monai_gradicon.io.write_displacement_field`: ``(X, Y, Z, 1, 3)``,
   LPS components, intent 1007, readable by ITK / ANTs / 3D Slicer as a transform) or, on request, as a MONAI voxel
   DDF on the fixed grid. No ``Restored``-style resampling is ever applied to the field.

Every problem with a request raises :class:`RegistrationRequestError`, which carries the HTTP status the server
should answer with (400 missing input, 404 unknown id / missing file, 422 unreadable or unusable image).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_gradicon.io import Image, ImageReadError, read_image, write_displacement_field, write_nifti
from monai_gradicon.maps import ddf_to_map, sample
from monai_gradicon.resample import Grid, displacement_to_ddf, warp_physical

__all__ = [
    "RegistrationRequestError",
    "GradICONBundle",
    "PreparedPair",
    "RegistrationOutputs",
    "load_bundle",
    "find_bundles",
    "prepare_pair",
    "run_registration_network",
    "resample_to_fixed",
    "write_outputs",
    "register_files",
    "parse_bool",
    "parse_int",
    "DDF_UNITS",
]

DDF_UNITS = ("mm", "voxel")
"""``mm``: physical field (ITK / Slicer NIfTI convention); ``voxel``: MONAI DDF in voxels of the fixed grid."""

_CHUNK_VOXELS = 1 << 20


class RegistrationRequestError(ValueError):
    """A request that cannot be served, with the HTTP status to answer (4xx) and a message for the user."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = int(status_code)


# ----------------------------------------------------------------------------------------------------------------
# bundle
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GradICONBundle:
    """A bundle loaded for serving.

    Attributes:
        name: folder name (the MONAI Label model name).
        root: bundle folder.
        network: the ``network_def`` module (a :class:`monai_gradicon.GradICONDDFNet` for the GradICON bundles), in
            ``eval()`` mode with the weights of ``models/model.pt``.
        preprocessing: the bundle's ``preprocessing`` (a MONAI ``Compose`` of dictionary transforms).
        moving_key, fixed_key: the dictionary keys of the two images in ``preprocessing``.
        input_key: the key holding the stacked ``[moving, fixed]`` network input, if ``preprocessing`` builds it.
        extra_keys: further keys ``preprocessing`` loads and requires; a request must provide them.
        optional_keys: further keys ``preprocessing`` loads if given (``allow_missing_keys``), e.g. the lung masks
            ``fixed_label`` / ``moving_label`` of ``gradicon_lung``.
        spatial_dims: 2 or 3.
        metadata: ``configs/metadata.json``.
        lock: serialises inference (instance optimization changes the weights temporarily).
    """

    name: str
    root: str
    network: nn.Module
    preprocessing: Callable[[dict], dict]
    moving_key: str
    fixed_key: str
    input_key: str | None
    extra_keys: tuple[str, ...]
    optional_keys: tuple[str, ...]
    spatial_dims: int
    metadata: dict = field(default_factory=dict)
    lock: Any = field(default_factory=threading.Lock, repr=False)

    @property
    def registration_network(self) -> nn.Module | None:
        """The wrapped :class:`monai_gradicon.GradICONNetwork` (``forward(moving, fixed) -> transform``), if any."""
        from monai_gradicon.networks.registration import GradICONNetwork

        if isinstance(self.network, GradICONNetwork):
            return self.network
        inner = getattr(self.network, "network", None)
        return inner if isinstance(inner, GradICONNetwork) else None

    @property
    def network_shape(self) -> tuple[int, ...] | None:
        net = self.registration_network
        if net is not None and net.input_shape is not None:
            return tuple(net.input_shape)
        shape = _metadata_input(self.metadata).get("spatial_shape")
        if isinstance(shape, Sequence) and all(isinstance(s, int) for s in shape):
            return tuple(int(s) for s in shape)
        return None

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))

    @property
    def description(self) -> str:
        text = self.metadata.get("description") or self.metadata.get("name") or self.name
        return f"GradICON registration ({self.name}): {text}"

    def to(self, device: torch.device | str) -> GradICONBundle:
        self.network.to(device)
        return self


def _metadata_input(metadata: Mapping) -> dict:
    inputs = ((metadata.get("network_data_format") or {}).get("inputs")) or {}
    return dict(next(iter(inputs.values()))) if inputs else {}


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"The bundle has no {what}: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"The bundle's {what} {path} is not valid JSON: {exc}") from exc


def _load_weights(network: nn.Module, model_path: str) -> None:
    """Strict weight loading: a file that does not fit the network raises instead of leaving random weights."""
    from monai_gradicon.weights import load_network_weights, read_state_dict

    inner = getattr(network, "network", None)
    from monai_gradicon.networks.registration import GradICONNetwork

    if isinstance(network, GradICONNetwork):
        load_network_weights(network, model_path)
    elif isinstance(inner, GradICONNetwork):
        load_network_weights(inner, model_path)  # accepts ``network.steps.*``, ``steps.*`` and released layouts
    else:
        state = read_state_dict(model_path)
        network.load_state_dict(state, strict=True)


def _transforms_of(preprocessing: Any) -> list:
    if hasattr(preprocessing, "transforms"):
        return list(preprocessing.transforms)
    if isinstance(preprocessing, Sequence):
        return list(preprocessing)
    return [preprocessing]


def _discover_keys(config: Mapping, transforms: list) -> tuple[str, str, str | None, tuple[str, ...], tuple[str, ...]]:
    """(moving key, fixed key, stacked input key or None, required other keys, optional other keys) from the
    preprocessing transforms. Other keys are what ``LoadImaged`` loads besides the pair (e.g. lung masks); they are
    optional when that ``LoadImaged`` has ``allow_missing_keys=True``."""
    from monai.transforms import ConcatItemsd, LoadImaged

    loaded: dict[str, bool] = {}  # key -> optional
    for t in transforms:
        if isinstance(t, LoadImaged):
            for k in t.keys:
                loaded.setdefault(str(k), bool(t.allow_missing_keys))
    concat = next((t for t in transforms if isinstance(t, ConcatItemsd)), None)
    moving = config.get("moving_key")
    fixed = config.get("fixed_key")
    input_key = None
    if concat is not None:
        keys = [str(k) for k in concat.keys]
        if len(keys) != 2:
            raise ValueError(f"The bundle's ConcatItemsd stacks {keys}; a registration bundle stacks [moving, fixed].")
        moving = moving or keys[0]
        fixed = fixed or keys[1]
        input_key = str(concat.name)
    if not moving or not fixed:
        moving = moving or next((k for k in loaded if "moving" in k and "image" in k), None)
        fixed = fixed or next((k for k in loaded if "fixed" in k and "image" in k), None)
    if not moving or not fixed:
        raise ValueError(
            "Cannot tell the moving and fixed image keys of the bundle's preprocessing: expected a ConcatItemsd of "
            "[moving, fixed], keys named moving*image / fixed*image, or top-level 'moving_key' / 'fixed_key'; "
            f"loaded keys are {list(loaded)}."
        )
    others = [k for k in loaded if k not in (moving, fixed)]
    required = tuple(k for k in others if not loaded[k])
    optional = tuple(k for k in others if loaded[k])
    return str(moving), str(fixed), input_key, required, optional


def load_bundle(path: str | os.PathLike, name: str | None = None, device: torch.device | str = "cpu") -> GradICONBundle:
    """Load a registration bundle folder for serving (no network access, no ``sys.path`` or logging side effects).

    Raises:
        FileNotFoundError: a required file is missing.
        ValueError / monai_gradicon.weights.WeightFileError: the config or the weights do not fit.
    """
    from monai.bundle import ConfigParser

    root = os.path.abspath(os.fspath(path))
    name = name or os.path.basename(root.rstrip(os.sep))
    config_file = os.path.join(root, "configs", "inference.json")
    metadata = _read_json(os.path.join(root, "configs", "metadata.json"), "configs/metadata.json")
    model_path = os.path.join(root, "models", "model.pt")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"The bundle {name} has no configs/inference.json: {config_file}")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"The bundle {name} has no weights at {model_path}; train or export them first (see the bundle's README)."
        )
    parser = ConfigParser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI 1.6.1 warns on every config parse
        parser.read_config(config_file)
        parser["bundle_root"] = root
        if "device" in parser:
            parser["device"] = "$torch.device('cpu')"
        if "network_def" not in parser:
            raise ValueError(f"{config_file} has no 'network_def'.")
        if "preprocessing" not in parser:
            raise ValueError(f"{config_file} has no 'preprocessing' (the loading and intensity scaling of the pair).")
        network = parser.get_parsed_content("network_def", instantiate=True)
        preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
        config = {k: parser[k] for k in ("moving_key", "fixed_key") if k in parser}
    if not isinstance(network, nn.Module):
        raise ValueError(f"'network_def' of {config_file} is not a torch module: {type(network).__name__}")
    _load_weights(network, model_path)
    try:
        from monai_gradicon.bundle_utils import check_all_weights_loaded
    except ImportError:  # pragma: no cover - older checkouts
        check_all_weights_loaded = None
    if check_all_weights_loaded is not None:
        from monai_gradicon.weights import read_state_dict

        state = read_state_dict(model_path)
        if all(k.startswith("network.") for k in state) or set(state) == set(network.state_dict()):
            check_all_weights_loaded(network, state, model_path)
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    transforms = _transforms_of(preprocessing)
    moving_key, fixed_key, input_key, extra, optional = _discover_keys(config, transforms)
    bundle = GradICONBundle(
        name=name,
        root=root,
        network=network,
        preprocessing=preprocessing,
        moving_key=moving_key,
        fixed_key=fixed_key,
        input_key=input_key,
        extra_keys=extra,
        optional_keys=optional,
        spatial_dims=3,
        metadata=metadata,
    )
    net = bundle.registration_network
    if net is not None:
        bundle.spatial_dims = int(net.spatial_dims)
    else:
        shape = _metadata_input(metadata).get("spatial_shape") or []
        bundle.spatial_dims = len(shape) if len(shape) in (2, 3) else 3
    return bundle.to(device)


def find_bundles(folders: Sequence[str | os.PathLike], names: Sequence[str] | None = None) -> dict[str, str]:
    """``{name: folder}`` of the registration bundles under ``folders`` (first folder wins for a name).

    A bundle is a sub-folder with ``configs/inference.json``; with ``names`` given, only those, in that order, and a
    missing one raises ``FileNotFoundError`` naming where it was looked for.
    """
    found: dict[str, str] = {}
    for folder in folders:
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry not in found and os.path.isfile(os.path.join(path, "configs", "inference.json")):
                found[entry] = os.path.abspath(path)
    if names is None:
        return found
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(
            f"Bundle(s) {missing} not found in {[os.fspath(f) for f in folders]} (each needs "
            "<folder>/<name>/configs/inference.json)."
        )
    return {n: found[n] for n in names}


# ----------------------------------------------------------------------------------------------------------------
# pre
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedPair:
    """The pair after :func:`prepare_pair`.

    Attributes:
        moving, fixed: the original images (array in file voxel order, affine voxel -> world RAS mm).
        moving_net, fixed_net: ``[C, *n]`` preprocessed network inputs.
        moving_net_affine, fixed_net_affine: ``(dim + 1)`` square affines, network voxel -> world RAS mm.
        data: the whole dictionary the bundle's preprocessing returned.
    """

    moving: Image
    fixed: Image
    moving_net: torch.Tensor
    fixed_net: torch.Tensor
    moving_net_affine: np.ndarray
    fixed_net_affine: np.ndarray
    data: dict = field(default_factory=dict, repr=False)

    @property
    def network_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.fixed_net.shape[1:])

    @property
    def network_input(self) -> torch.Tensor:
        """``[2C, *n]``: moving and fixed stacked on the channel axis (the ``GradICONDDFNet`` input)."""
        return torch.cat([self.moving_net, self.fixed_net], dim=0)


def _dims_word(image: Image) -> str:
    return f"{image.ndim}D (shape {image.shape})"


def _read(path: Any, what: str) -> Image:
    if path is None or (isinstance(path, str) and not path.strip()):
        raise RegistrationRequestError(f"No {what} given.", 400)
    if not isinstance(path, (str, os.PathLike)):
        raise RegistrationRequestError(
            f"The {what} must be a file path or an image id, got {type(path).__name__}.", 400
        )
    try:
        image = read_image(path, what)
    except FileNotFoundError as exc:
        raise RegistrationRequestError(str(exc), 404) from exc
    except ImageReadError as exc:
        raise RegistrationRequestError(str(exc), 422) from exc
    return image


def _check_contents(image: Image, what: str) -> None:
    array = image.array
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise RegistrationRequestError(f"The {what} {image.path} contains NaN or infinite voxels.", 422)
    if array.min() == array.max():
        raise RegistrationRequestError(
            f"The {what} {image.path} is constant (every voxel is {array.min()}); there is nothing to register.", 422
        )


def _network_affine(tensor: Any, original: Image, shape: Sequence[int]) -> np.ndarray:
    """Network voxel -> world affine of a preprocessed tensor: its MetaTensor affine, else a plain resize
    (``align_corners=False``) of the original grid is assumed."""
    dim = len(shape)
    affine = getattr(tensor, "affine", None)
    if affine is not None:
        a = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
        if a.shape == (dim + 1, dim + 1) and np.all(np.isfinite(a)) and abs(np.linalg.det(a[:dim, :dim])) > 1e-12:
            return a
    big = np.asarray(original.shape, dtype=np.float64)
    small = np.asarray(shape, dtype=np.float64)
    scale = np.eye(dim + 1)
    scale[:dim, :dim] = np.diag(big / small)
    scale[:dim, dim] = 0.5 * big / small - 0.5  # index = (p + 0.5) * N / n - 0.5
    return original.affine_nd @ scale


def prepare_pair(
    bundle: GradICONBundle,
    moving: str | os.PathLike,
    fixed: str | os.PathLike | None,
    extras: Mapping[str, Any] | None = None,
) -> PreparedPair:
    """Check and preprocess a pair of image files with the bundle's ``preprocessing`` (the "pre" step).

    Args:
        bundle: from :func:`load_bundle`.
        moving, fixed: image files (NIfTI, NRRD or anything the bundle's ``LoadImaged`` reads).
        extras: files for the bundle's further keys (``bundle.extra_keys`` required, ``bundle.optional_keys`` optional,
            e.g. lung masks); other entries are ignored.

    Raises:
        RegistrationRequestError: 400 (an input is missing), 404 (a file does not exist), 422 (unreadable file, 2D vs
            3D mismatch, wrong dimensionality for the bundle, image too small, preprocessing failed).
    """
    if fixed is None or (isinstance(fixed, str) and not fixed.strip()):
        raise RegistrationRequestError(
            "No fixed image given: pass params {\"fixed_image\": \"<image id or path>\"} or upload the fixed image as "
            "the 'label' part of the request.",
            400,
        )
    moving_img = _read(moving, "moving image")
    fixed_img = _read(fixed, "fixed image")
    if moving_img.ndim != fixed_img.ndim:
        raise RegistrationRequestError(
            f"The moving image is {_dims_word(moving_img)} but the fixed image is {_dims_word(fixed_img)}: both must "
            "be 2D or both 3D.",
            422,
        )
    if moving_img.ndim != bundle.spatial_dims:
        raise RegistrationRequestError(
            f"The bundle {bundle.name} registers {bundle.spatial_dims}D images; the images are "
            f"{_dims_word(moving_img)} and {_dims_word(fixed_img)}.",
            422,
        )
    _check_contents(moving_img, "moving image")
    _check_contents(fixed_img, "fixed image")
    extras = {k: v for k, v in dict(extras or {}).items() if v not in (None, "")}
    missing = [k for k in bundle.extra_keys if k not in extras]
    if missing:
        raise RegistrationRequestError(
            f"The bundle {bundle.name} also needs {missing} (image ids or paths in params).", 400
        )
    data: dict[str, Any] = {}
    for key in (*bundle.extra_keys, *bundle.optional_keys):
        if key in extras:
            extra_img = _read(extras[key], key.replace("_", " "))
            if extra_img.ndim != moving_img.ndim:
                raise RegistrationRequestError(
                    f"The {key.replace('_', ' ')} is {_dims_word(extra_img)} but the images are {moving_img.ndim}D.",
                    422,
                )
            data[key] = os.fspath(extras[key])
    data[bundle.moving_key] = os.fspath(moving)
    data[bundle.fixed_key] = os.fspath(fixed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = bundle.preprocessing(data)
    except Exception as exc:  # MONAI wraps transform errors in RuntimeError; report the innermost reason
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise RegistrationRequestError(
            f"The bundle {bundle.name}'s preprocessing failed on this pair: {type(root).__name__}: {root}", 422
        ) from exc
    moving_net = torch.as_tensor(out[bundle.moving_key])
    fixed_net = torch.as_tensor(out[bundle.fixed_key])
    shape = tuple(fixed_net.shape[1:])
    if moving_net.shape != fixed_net.shape or len(shape) != bundle.spatial_dims:
        raise RegistrationRequestError(
            f"The bundle's preprocessing gave moving {tuple(moving_net.shape)} and fixed {tuple(fixed_net.shape)}; "
            f"expected two [C, *S] tensors of one {bundle.spatial_dims}D network shape.",
            422,
        )
    return PreparedPair(
        moving=moving_img,
        fixed=fixed_img,
        moving_net=moving_net.as_tensor() if hasattr(moving_net, "as_tensor") else moving_net,
        fixed_net=fixed_net.as_tensor() if hasattr(fixed_net, "as_tensor") else fixed_net,
        moving_net_affine=_network_affine(out[bundle.moving_key], moving_img, shape),
        fixed_net_affine=_network_affine(out[bundle.fixed_key], fixed_img, shape),
        data=out,
    )


# ----------------------------------------------------------------------------------------------------------------
# infer
# ----------------------------------------------------------------------------------------------------------------


def run_registration_network(
    bundle: GradICONBundle,
    prepared: PreparedPair,
    device: torch.device | str = "cpu",
    io_iterations: int = 0,
    io_lr: float | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """Run the network on the prepared pair (the "infer" step).

    Returns:
        ``(phi, info)``: ``phi`` maps normalized network coordinates of the fixed image ``[1, dim, *P]`` to those
        of the moving image; ``info`` is JSON-able (instance optimization summary).
    """
    device = torch.device(device)
    moving = prepared.moving_net[None].to(device=device, dtype=torch.float32)
    fixed = prepared.fixed_net[None].to(device=device, dtype=torch.float32)
    net = bundle.registration_network
    info: dict[str, Any] = {"instance_optimization_steps": int(io_iterations)}
    with bundle.lock:
        bundle.network.to(device)
        if io_iterations:
            if net is None:
                raise RegistrationRequestError(
                    f"Instance optimization needs a GradICON network; the bundle {bundle.name}'s network_def is a "
                    f"{type(bundle.network).__name__}.",
                    422,
                )
            from monai_gradicon.instance_optimization import DEFAULT_IO_LR, instance_optimize

            with torch.enable_grad():
                result = instance_optimize(
                    net, moving, fixed, steps=int(io_iterations), lr=float(io_lr or DEFAULT_IO_LR), progress=False
                )
            for p in net.parameters():  # instance_optimize restores the flags it found; keep the bundle frozen
                p.requires_grad_(False)
            info["instance_optimization_seconds"] = round(float(result.seconds), 3)
            if result.history:
                info["instance_optimization_loss"] = [
                    round(result.history[0]["loss"], 6),
                    round(result.history[-1]["loss"], 6),
                ]
            return result.phi_ab, info
        with torch.no_grad():
            if net is not None:
                return net(moving, fixed), info
            ddf = bundle.network(torch.cat([moving, fixed], dim=1))
    phi_map = ddf_to_map(ddf.float())
    return (lambda points: sample(phi_map, points, padding_mode="border")), info


# ----------------------------------------------------------------------------------------------------------------
# post
# ----------------------------------------------------------------------------------------------------------------


def _slab_indices(shape: Sequence[int], start: int, stop: int) -> np.ndarray:
    axes = [np.arange(start, stop, dtype=np.float64)] + [np.arange(n, dtype=np.float64) for n in shape[1:]]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def physical_displacement_via_affines(
    phi: Callable[[torch.Tensor], torch.Tensor],
    fixed: Grid,
    fixed_net_affine: np.ndarray,
    moving_net_affine: np.ndarray,
    network_shape: Sequence[int],
    device: torch.device | str = "cpu",
    chunk_voxels: int = _CHUNK_VOXELS,
) -> np.ndarray:
    """``u(x) = y(x) - x`` (world RAS mm, ``[dim, *fixed.shape]``) for every voxel ``x`` of the original fixed grid.

    ``x`` -> fixed network voxel (``fixed_net_affine^-1``) -> normalized -> ``phi`` -> moving network voxel ->
    world ``y`` (``moving_net_affine``). Outside the network box ``phi`` uses its border values.
    """
    dim = fixed.ndim
    n = np.asarray(network_shape, dtype=np.float64)
    to_fixed_net = np.linalg.inv(fixed_net_affine)
    out = np.empty((dim, *fixed.shape), dtype=np.float32)
    per_slice = int(np.prod(fixed.shape[1:]))
    step = max(1, chunk_voxels // max(per_slice, 1))
    for start in range(0, fixed.shape[0], step):
        stop = min(fixed.shape[0], start + step)
        idx = _slab_indices(fixed.shape, start, stop)
        x = fixed.index_to_world(idx)
        p = x @ to_fixed_net[:dim, :dim].T + to_fixed_net[:dim, dim]
        q = p / np.maximum(n - 1, 1)
        pts = torch.from_numpy(np.ascontiguousarray(q)).to(device=device, dtype=torch.float32).movedim(-1, 0)[None]
        with torch.no_grad():
            moved = phi(pts)[0].movedim(0, -1).to(torch.float64).cpu().numpy()
        pm = moved * np.maximum(n - 1, 1)
        y = pm @ moving_net_affine[:dim, :dim].T + moving_net_affine[:dim, dim]
        out[:, start:stop] = np.moveaxis(y - x, -1, 0)
    return out


@dataclass
class RegistrationOutputs:
    """Result of :func:`resample_to_fixed`: arrays on the original fixed grid.

    Attributes:
        warped: ``[*S_fixed]`` float32, the original moving image (its own intensities) warped onto the fixed grid.
        displacement: ``[dim, *S_fixed]`` float32, world RAS mm, fixed point ``x`` -> moving point ``x + u(x)``.
        affine: ``4 x 4`` voxel -> world RAS mm of the fixed image (the affine of both outputs).
        fixed_grid: the fixed grid.
    """

    warped: np.ndarray
    displacement: np.ndarray
    affine: np.ndarray
    fixed_grid: Grid

    def ddf_voxels(self) -> np.ndarray:
        """The field as a MONAI voxel DDF on the fixed grid ``[dim, *S_fixed]`` (see
        :func:`monai_gradicon.resample.displacement_to_ddf`)."""
        return displacement_to_ddf(self.displacement, self.fixed_grid)


def resample_to_fixed(
    prepared: PreparedPair,
    phi: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | str = "cpu",
    padding_mode: str = "border",
) -> RegistrationOutputs:
    """Map ``phi`` to the original fixed grid and warp the original moving image (the "post" step).

    Args:
        padding_mode: moving-image values outside its field of view: ``"border"`` (repeat the edge voxels, as
            :func:`monai_gradicon.registration_api.register_pair`) or ``"zeros"`` (as ITK resampling).
    """
    if padding_mode not in ("zeros", "border"):
        raise RegistrationRequestError(f"padding_mode must be 'zeros' or 'border', got {padding_mode!r}.", 400)
    fixed_grid = Grid.of(prepared.fixed)
    moving_grid = Grid.of(prepared.moving)
    u = physical_displacement_via_affines(
        phi, fixed_grid, prepared.fixed_net_affine, prepared.moving_net_affine, prepared.network_shape, device
    )
    warped = warp_physical(
        np.asarray(prepared.moving.array, dtype=np.float32), moving_grid, u, fixed_grid,
        mode="bilinear", padding_mode=padding_mode, device=device,
    )
    return RegistrationOutputs(warped=warped.astype(np.float32), displacement=u, affine=prepared.fixed.affine,
                               fixed_grid=fixed_grid)


def write_outputs(
    outputs: RegistrationOutputs,
    warped_path: str | os.PathLike,
    ddf_path: str | os.PathLike,
    ddf_units: str = "mm",
) -> dict[str, Any]:
    """Write the warped image (float32 NIfTI, the fixed image's affine) and the field; return their description.

    ``ddf_units="mm"``: :func:`monai_gradicon.io.write_displacement_field` (``(X, Y, Z, 1, 3)``, LPS mm components,
    intent 1007: ITK / ANTs / 3D Slicer displacement field). ``"voxel"``: MONAI DDF ``(X, Y, Z, 3)`` in voxels of
    the fixed grid, channel ``k`` along array axis ``k``.
    """
    if ddf_units not in DDF_UNITS:
        raise RegistrationRequestError(f"ddf_units must be one of {DDF_UNITS}, got {ddf_units!r}.", 400)
    write_nifti(warped_path, outputs.warped.astype(np.float32), outputs.affine)
    if ddf_units == "mm":
        write_displacement_field(ddf_path, outputs.displacement, outputs.affine)
        convention = (
            "physical displacement field on the fixed image's grid: fixed point x maps to moving point x + u(x); "
            "NIfTI (X, Y, Z, 1, 3), intent 1007, vector components in LPS mm (ITK / ANTs / 3D Slicer convention)"
        )
    else:
        ddf = np.moveaxis(outputs.ddf_voxels(), 0, -1).astype(np.float32)
        write_nifti(ddf_path, np.ascontiguousarray(ddf), outputs.affine)
        convention = (
            "MONAI voxel DDF on the fixed image's grid: NIfTI (X, Y, Z, 3), channel k = displacement in voxels "
            "along array axis k; warped = Warp()(moving resampled onto the fixed grid by world coordinates, ddf)"
        )
    u = outputs.displacement
    magnitude = np.sqrt((u.astype(np.float64) ** 2).sum(axis=0))
    return {
        "warped_image": os.fspath(warped_path),
        "ddf": os.fspath(ddf_path),
        "ddf_units": ddf_units,
        "ddf_convention": convention,
        "fixed_shape": list(outputs.fixed_grid.shape),
        "displacement_mm_mean": round(float(magnitude.mean()), 4),
        "displacement_mm_max": round(float(magnitude.max()), 4),
    }


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise RegistrationRequestError(f"{name} must be true or false, got {value!r}.", 400)


def parse_int(value: Any, name: str, minimum: int = 0, maximum: int | None = None) -> int:
    if value is None or value == "" or (isinstance(value, str) and value.strip().lower() == "none"):
        return 0
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise RegistrationRequestError(f"{name} must be a whole number, got {value!r}.", 400) from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise RegistrationRequestError(f"{name} must be {bound}, got {number}.", 400)
    return number


def register_files(
    bundle: GradICONBundle,
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    warped_path: str | os.PathLike,
    ddf_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    io_iterations: int = 0,
    ddf_units: str = "mm",
    padding_mode: str = "border",
    extras: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """pre -> infer -> post -> write for one pair of files, as the MONAI Label task runs it."""
    prepared = prepare_pair(bundle, moving, fixed, extras)
    phi, info = run_registration_network(bundle, prepared, device, io_iterations)
    outputs = resample_to_fixed(prepared, phi, device, padding_mode)
    result = write_outputs(outputs, warped_path, ddf_path, ddf_units)
    result.update(info)
    return result
