"""Small stand-in bundle and image pairs for the MONAI Label tests (no download, no training).

The bundle is what the GradICON bundles ship: ``configs/metadata.json`` (with the ``model_card`` the weights must
agree with) and ``models/model.pt`` (the bundle layout ``network.*`` with its model card: a 1-step network at 33^3,
preprocessing ``none``, file axis order).
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch

from monai_gradicon.networks.registration import GradICONNetwork, gradicon_network
from monai_gradicon.weights import save_weights

NETWORK_SHAPE = (33, 33, 33)
CARD = {"axis_order": "reference", "preprocessing": "none", "modality": None}


def metadata(network_shape: Sequence[int] = NETWORK_SHAPE, card: dict | None = None) -> dict:
    return {
        "version": "0.0.1",
        "name": "tiny GradICON test bundle",
        "description": "1-step GradICON network with perturbed last layers, for tests only",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 2, "spatial_shape": list(network_shape)}},
            "outputs": {"pred": {"type": "image", "num_channels": len(network_shape),
                                 "spatial_shape": list(network_shape)}},
        },
        "model_card": dict(CARD if card is None else card),
    }


def make_network(network_shape: Sequence[int] = NETWORK_SHAPE, num_steps: int = 1, scale: float = 0.0,
                 seed: int = 0, **card) -> GradICONNetwork:
    """A ``GradICONNetwork`` with a card (default :data:`CARD`); ``scale > 0`` fills the (zero-initialised) last
    layers with small random weights so the transform is not the identity."""
    torch.manual_seed(seed)
    fields = {k: v for k, v in {**CARD, **card}.items()}
    net = gradicon_network(num_steps, len(network_shape), network_shape, **fields)
    if scale:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for step in net.steps:
                w = step.unet.lastConv.weight
                w.copy_(torch.randn(w.shape, generator=g) * scale)
    return net.eval()


def write_bundle(folder: str, network: GradICONNetwork | None = None, network_shape: Sequence[int] = NETWORK_SHAPE,
                 num_steps: int = 1, card: dict | None = None) -> str:
    os.makedirs(os.path.join(folder, "configs"), exist_ok=True)
    os.makedirs(os.path.join(folder, "models"), exist_ok=True)
    with open(os.path.join(folder, "configs", "metadata.json"), "w") as f:
        json.dump(metadata(network_shape, card), f, indent=2)
    network = network if network is not None else make_network(network_shape, num_steps)
    save_weights(network, os.path.join(folder, "models", "model.pt"))
    return folder


def blob_volume(
    shape: Sequence[int], centre_mm: Sequence[float], affine: np.ndarray, radius_mm: float = 12.0
) -> np.ndarray:
    """A smooth bright ellipsoid-ish blob (values 0..100) at a world position, sampled on a grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    d2 = ((world - np.asarray(centre_mm)) ** 2).sum(-1)
    base = 100.0 * np.exp(-d2 / (2 * radius_mm**2))
    ripple = 10.0 * np.sin(world[..., 0] / 7.0) * np.cos(world[..., 1] / 9.0)  # texture, so nothing is constant
    return np.clip(base + ripple + 10.0, 0, 100).astype(np.float32)


def write_nifti(path: str, array: np.ndarray, affine: np.ndarray) -> str:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)
    return path


def grid_affine(spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    a = np.diag([*spacing, 1.0]).astype(np.float64)
    a[:3, 3] = origin
    return a


def write_pair(folder: str, fixed_name: str = "fixed", moving_name: str = "moving") -> tuple[str, str]:
    """A fixed image (40 x 36 x 32, 1.5 mm) and a moving image on another grid (30 x 34 x 28, 2 mm spacing,
    shifted origin) holding a blob displaced by 4 mm. Returns ``(fixed path, moving path)``."""
    os.makedirs(folder, exist_ok=True)
    fa = grid_affine((1.5, 1.5, 1.5), (-30.0, -27.0, -24.0))
    ma = grid_affine((2.0, 1.8, 2.2), (-29.0, -30.0, -30.0))
    fixed = blob_volume((40, 36, 32), (0.0, 0.0, 0.0), fa)
    moving = blob_volume((30, 34, 28), (4.0, 0.0, 0.0), ma)
    fp = write_nifti(os.path.join(folder, f"{fixed_name}.nii.gz"), fixed, fa)
    mp = write_nifti(os.path.join(folder, f"{moving_name}.nii.gz"), moving, ma)
    return fp, mp


LABEL_NAMES = {"core": 1, "shell": 2, "far corner": 3}


def write_atlas(folder: str, name: str = "blobatlas") -> str:
    """A small label atlas folder ``<folder>/<name>/`` (``atlas.json``, image, label map): the moving image of
    :func:`write_pair` (30 x 34 x 28, 2 / 1.8 / 2.2 mm) with labels 1 = core (blob > 60), 2 = shell (30 < blob <= 60)
    and 3 = a 3-voxel cube in the array's last corner. Returns the atlas folder."""
    root = os.path.join(folder, name)
    os.makedirs(root, exist_ok=True)
    ma = grid_affine((2.0, 1.8, 2.2), (-29.0, -30.0, -30.0))
    image = blob_volume((30, 34, 28), (4.0, 0.0, 0.0), ma)
    label = np.zeros(image.shape, np.uint8)
    label[image > 30] = 2
    label[image > 60] = 1
    label[-3:, -3:, -3:] = 3
    write_nifti(os.path.join(root, "image.nii.gz"), image, ma)
    write_nifti(os.path.join(root, "label.nii.gz"), label, ma)
    with open(os.path.join(root, "atlas.json"), "w") as f:
        json.dump({"image": "image.nii.gz", "label": "label.nii.gz", "label_names": LABEL_NAMES,
                   "description": "synthetic blob atlas for tests"}, f)
    return root


def slicer_plugin_path(prefix: str) -> str:
    """Where pip installs the 3D Slicer plugin with monailabel: a data file under the environment's prefix."""
    return os.path.join(prefix, "monailabel", "plugins", "slicer", "MONAILabel", "MONAILabel.py")


class SlicerPlugin:
    """Pieces of the installed MONAILabel Slicer plugin, taken from its source with ``ast`` (Slicer itself is not
    importable here): the model types of the *Auto segmentation* selector, how options become request params, the
    result format it asks for, and how it names the imported segments."""

    def __init__(self, path: str) -> None:
        with open(path, encoding="utf-8") as f:
            self.tree = ast.parse(f.read())
        self.functions = {n.name: n for n in ast.walk(self.tree) if isinstance(n, ast.FunctionDef)}

    def segmentation_types(self) -> list[str]:
        for node in ast.walk(self.functions["updateGUIFromParameterNode"]):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "updateSelector" and "segmentationModelSelector" in ast.unparse(node.args[0]):
                return ast.literal_eval(node.args[1])
        raise AssertionError("the plugin no longer fills segmentationModelSelector with updateSelector")

    def params_from_config(self, name_config: dict) -> dict:
        fn = self.functions["getParamsFromConfig"]
        ret = [n for n in ast.walk(fn) if isinstance(n, ast.Return)][0]
        return eval(compile(ast.Expression(ret.value), "<plugin>", "eval"), {"nameConfig": name_config})

    def infer_params(self) -> dict:
        fn = [f for f in ast.walk(self.tree) if isinstance(f, ast.FunctionDef) and f.name == "infer"
              and "result_extension" in ast.unparse(f)][0]
        params = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
                params[ast.literal_eval(node.targets[0].slice)] = ast.literal_eval(node.value)
        return params

    def segment_names(self, result_params: dict, model_info: dict) -> list[str]:
        """``onClickSegmentation`` + ``updateSegmentationMask``: the segment names, in import order."""
        fn = self.functions["onClickSegmentation"]
        assigns = [n for n in ast.walk(fn) if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "labels"]
        scope = {"params": result_params, "self": type("S", (), {"models": {"m": model_info}})(), "model": "m"}
        labels = eval(compile(ast.Expression(assigns[0].value), "<plugin>", "eval"), scope)
        if labels and isinstance(labels, dict):
            labels = eval(compile(ast.Expression(assigns[1].value), "<plugin>", "eval"), {"labels": labels})
        return [label for label in labels if label != "background"]
