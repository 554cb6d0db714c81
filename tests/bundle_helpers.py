"""Shared helpers of the model-zoo style bundle tests (tiny, CPU-sized overrides; everything in tmp dirs)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = BUNDLES / "schema" / "meta_schema_20240725.json"

TINY_SIZE = [33, 33, 33]
TINY_STEPS = 2

# single stage with the standard 2-step network at 33^3, one iteration per workflow (the two-stage switch itself is
# covered by tests/test_engines.py)
TRAIN_OVERRIDES = {
    "spatial_size": TINY_SIZE,
    "stage1_num_steps": TINY_STEPS,
    "two_stage": False,
    "stage1_iterations": 1,
    "stage2_iterations": 0,
    "epoch_length": 1,
    "val_interval": 1,
    "ckpt_interval": 1,
    "batch_size": 1,
    "num_workers": 0,
    "cache_rate": 1.0,
}
INFER_OVERRIDES = {"spatial_size": TINY_SIZE, "num_steps": TINY_STEPS}
DEMO_DATA = {
    "gradicon_lung": {"n_pairs": 3, "shape": [32, 32, 32], "seed": 0, "spacing_mm": 5.0, "breathing_amplitude_mm": 8.0,
                      "n_landmarks": 8, "n_validation": 1},
    "gradicon_brain": {"n_subjects": 4, "shape": [24, 28, 24], "seed": 0, "spacing_mm": 5.0, "n_validation": 2},
}


def make_tmp_bundle(name: str, root: Path) -> Path:
    """Copy the bundle's configs (not models/ or outputs) to ``root/name`` and shrink metadata shapes for tests."""
    src = BUNDLES / name
    dst = root / name
    shutil.copytree(src / "configs", dst / "configs")
    (dst / "models").mkdir(parents=True)
    meta_path = dst / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for section in ("inputs", "outputs"):
        for spec in meta["network_data_format"][section].values():
            spec["spatial_shape"] = list(TINY_SIZE)
    meta_path.write_text(json.dumps(meta, indent=4))
    return dst


def quiet():
    """Filter the warnings MONAI 1.6.1 / torch 2.13 emit on normal use."""
    warnings.filterwarnings("ignore", message=".*any `_target_` value.*")
    warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
    warnings.filterwarnings("ignore", message=".*No hash value provided.*")
    warnings.filterwarnings("ignore", message=".*hash_val.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
    warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=".*check_worker_number_rationality.*")
