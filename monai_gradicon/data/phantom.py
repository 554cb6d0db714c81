"""Synthetic data for training and testing without any data of one's own.

* :func:`make_lung_phantom_pair` / :func:`make_brain_phantom`: in-memory phantoms (see ``phantom_lung`` and
  ``phantom_brain`` for the anatomy, axes and intensity conventions).
* :func:`write_lung_demo_dataset` / :func:`write_brain_demo_dataset`: NIfTI + CSV + datalist JSON on disk, in the
  format read by :func:`monai_gradicon.data.layouts.load_datalist`.

Both writers are deterministic (same arguments -> byte-identical files) and idempotent: a folder that already holds
the complete dataset is left untouched, and a folder holding anything else raises ``FileExistsError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ._demo_io import begin_dataset, dataset_is_complete, finish_dataset, save_json, save_landmarks_csv, save_nifti
from .phantom_brain import BRAIN_LABELS, BRAIN_TISSUE_INTENSITY, BrainPhantom, make_brain_phantom
from .phantom_lung import (
    HU_AIR,
    HU_LUNG,
    HU_SOFT_TISSUE,
    HU_VESSEL,
    LUNG_TEXTURE_MAX_HU,
    BreathingMotion,
    LungPhantomPair,
    make_lung_phantom_pair,
)

__all__ = [
    "BRAIN_LABELS",
    "BRAIN_TISSUE_INTENSITY",
    "HU_AIR",
    "HU_LUNG",
    "HU_SOFT_TISSUE",
    "HU_VESSEL",
    "LUNG_TEXTURE_MAX_HU",
    "DATALIST_NAME",
    "BreathingMotion",
    "BrainPhantom",
    "LungPhantomPair",
    "make_brain_phantom",
    "make_lung_phantom_pair",
    "write_brain_demo_dataset",
    "write_lung_demo_dataset",
]

#: file name of the datalist JSON written into a demo dataset folder
DATALIST_NAME = "datalist.json"


def _check_counts(n_items: int, n_validation: int, what: str) -> None:
    if n_items < 1:
        raise ValueError(f"{what} must be >= 1, got {n_items}")
    if not 0 <= n_validation < n_items:
        raise ValueError(f"n_validation must be in [0, {what}) so that training is not empty, got {n_validation}")


def _lung_case_files(index: int) -> dict[str, str]:
    stem = f"lung_{index:03d}"
    return {
        "fixed_image": f"{stem}_insp.nii.gz",
        "moving_image": f"{stem}_exp.nii.gz",
        "fixed_label": f"{stem}_insp_mask.nii.gz",
        "moving_label": f"{stem}_exp_mask.nii.gz",
        "fixed_landmarks": f"{stem}_insp_landmarks.csv",
        "moving_landmarks": f"{stem}_exp_landmarks.csv",
    }


def write_lung_demo_dataset(
    out_dir: str | Path,
    n_pairs: int = 4,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    spacing_mm: float = 2.5,
    breathing_amplitude_mm: float = 12.0,
    n_landmarks: int = 80,
    n_validation: int = 1,
) -> Path:
    """Write ``n_pairs`` synthetic inspiration/expiration CT pairs and return the path of the datalist JSON.

    Files (``i`` = 000, 001, ...): ``lung_{i}_insp.nii.gz`` / ``lung_{i}_exp.nii.gz`` (int16 HU),
    ``lung_{i}_insp_mask.nii.gz`` / ``lung_{i}_exp_mask.nii.gz`` (uint8 lung masks), ``lung_{i}_insp_landmarks.csv``
    / ``lung_{i}_exp_landmarks.csv`` (K corresponding points, world mm, header ``x_mm,y_mm,z_mm``), and
    ``datalist.json`` with ``{"training": [...], "validation": [...]}`` entries holding ``fixed_image`` (inspiration),
    ``moving_image`` (expiration), ``fixed_label``, ``moving_label``, ``fixed_landmarks``, ``moving_landmarks`` as
    paths relative to the JSON's folder. The last ``n_validation`` pairs form the validation split. Pair ``i`` is
    generated from the seed ``[seed, i]`` with a breathing amplitude drawn in [0.7, 1.2] x ``breathing_amplitude_mm``.

    Raises:
        FileExistsError: ``out_dir`` holds unrelated files or a demo dataset made with other arguments.
        ValueError: invalid counts or phantom parameters.
    """
    _check_counts(n_pairs, n_validation, "n_pairs")
    out = Path(out_dir)
    generator = "monai_gradicon.data.phantom.write_lung_demo_dataset"
    params = {
        "n_pairs": int(n_pairs),
        "shape": [int(s) for s in shape],
        "seed": int(seed),
        "spacing_mm": float(spacing_mm),
        "breathing_amplitude_mm": float(breathing_amplitude_mm),
        "n_landmarks": int(n_landmarks),
        "n_validation": int(n_validation),
    }
    cases = [_lung_case_files(i) for i in range(n_pairs)]
    file_names = [name for case in cases for name in case.values()] + [DATALIST_NAME]
    if dataset_is_complete(out, generator, params, file_names):
        return out / DATALIST_NAME

    begin_dataset(out, generator, params, file_names)
    for i, case in enumerate(cases):
        amplitude = breathing_amplitude_mm * float(np.random.default_rng([seed, i, 1]).uniform(0.7, 1.2))
        pair = make_lung_phantom_pair(
            shape, seed=[seed, i], breathing_amplitude_mm=amplitude, spacing_mm=spacing_mm, n_landmarks=n_landmarks
        )
        save_nifti(out / case["fixed_image"], np.rint(pair.inspiration), pair.affine, np.int16)
        save_nifti(out / case["moving_image"], np.rint(pair.expiration), pair.affine, np.int16)
        save_nifti(out / case["fixed_label"], pair.inspiration_mask, pair.affine, np.uint8)
        save_nifti(out / case["moving_label"], pair.expiration_mask, pair.affine, np.uint8)
        save_landmarks_csv(out / case["fixed_landmarks"], pair.inspiration_landmarks_mm)
        save_landmarks_csv(out / case["moving_landmarks"], pair.expiration_landmarks_mm)
    n_train = n_pairs - n_validation
    save_json(
        out / DATALIST_NAME,
        {
            "description": "synthetic lung CT pairs (monai_gradicon); fixed = inspiration, moving = expiration",
            "landmark_coordinates": "world_mm",
            "training": cases[:n_train],
            "validation": cases[n_train:],
        },
    )
    finish_dataset(out, generator, params, file_names)
    return out / DATALIST_NAME


def write_brain_demo_dataset(
    out_dir: str | Path,
    n_subjects: int = 6,
    shape: Sequence[int] = (64, 72, 64),
    seed: int = 0,
    spacing_mm: float = 2.0,
    n_validation: int = 2,
) -> Path:
    """Write ``n_subjects`` synthetic T1-like brains with label maps and return the path of the datalist JSON.

    Files: ``brain_{i}_t1.nii.gz`` (int16, the phantom intensities rounded) and ``brain_{i}_label.nii.gz``
    (uint8, labels of :data:`BRAIN_LABELS`), and ``datalist.json`` with ``{"training": [...], "validation": [...]}``
    lists of ``{"image": ..., "label": ...}`` subjects (paths relative to the JSON's folder; registration pairs
    are drawn from a split at training time). Subject ``i`` uses the seed ``[seed, i]``; the last ``n_validation``
    subjects form the validation split.

    Raises:
        FileExistsError: ``out_dir`` holds unrelated files or a demo dataset made with other arguments.
        ValueError: invalid counts or phantom parameters.
    """
    _check_counts(n_subjects, n_validation, "n_subjects")
    out = Path(out_dir)
    generator = "monai_gradicon.data.phantom.write_brain_demo_dataset"
    params = {
        "n_subjects": int(n_subjects),
        "shape": [int(s) for s in shape],
        "seed": int(seed),
        "spacing_mm": float(spacing_mm),
        "n_validation": int(n_validation),
    }
    subjects = [
        {"image": f"brain_{i:03d}_t1.nii.gz", "label": f"brain_{i:03d}_label.nii.gz"} for i in range(n_subjects)
    ]
    file_names = [name for subject in subjects for name in subject.values()] + [DATALIST_NAME]
    if dataset_is_complete(out, generator, params, file_names):
        return out / DATALIST_NAME

    begin_dataset(out, generator, params, file_names)
    for i, subject in enumerate(subjects):
        brain: BrainPhantom = make_brain_phantom(shape, seed=[seed, i], spacing_mm=spacing_mm)
        save_nifti(out / subject["image"], np.rint(brain.image), brain.affine, np.int16)
        save_nifti(out / subject["label"], brain.label, brain.affine, np.uint8)
    n_train = n_subjects - n_validation
    save_json(
        out / DATALIST_NAME,
        {
            "description": "synthetic T1-like brains (monai_gradicon)",
            "labels": {str(k): v for k, v in BRAIN_LABELS.items()},
            "training": subjects[:n_train],
            "validation": subjects[n_train:],
        },
    )
    finish_dataset(out, generator, params, file_names)
    return out / DATALIST_NAME
