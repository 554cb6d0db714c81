"""Where the bundles' data comes from: datalists per layout, the embedded demo dataset, and random pairs.

:func:`registration_datalist` is what the bundle configs call. It accepts

* a JSON datalist (``datalist``; our format, :func:`monai_gradicon.data.load_datalist`), or
* a dataset folder (``dataset_dir``) holding ``datalist.json`` (our format), ``NLST_dataset.json`` (Learn2Reg
  NLST), ``OASIS_dataset.json`` (Learn2Reg OASIS) or DIR-Lab COPDGene case folders (``copd1``...; converted once
  to NIfTI + world-mm landmark CSVs in ``convert_dir``).

When ``dataset_dir`` is the bundle's demo folder and it is missing, the deterministic synthetic demo dataset is
written there first (:func:`ensure_demo_dataset`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from monai.transforms import Randomizable, apply_transform
from torch.utils.data import Dataset as TorchDataset

from monai_gradicon.data import (
    dirlab_copd_datalist,
    dirlab_copd_to_nifti,
    load_datalist,
    nlst_datalist,
    oasis_datalist,
    write_brain_demo_dataset,
    write_lung_demo_dataset,
)
from monai_gradicon.engines.distributed import is_main_process

__all__ = [
    "DatalistError",
    "registration_datalist",
    "ensure_demo_dataset",
    "pairs_from_subjects",
    "SubjectPairDataset",
    "DEMO_WRITERS",
]

logger = logging.getLogger(__name__)

DEMO_WRITERS = {"lung": write_lung_demo_dataset, "brain": write_brain_demo_dataset}
"""Demo dataset writer per task."""

_HELP = (
    "Point the bundle at your data with --dataset_dir <folder> (a folder with datalist.json, a Learn2Reg "
    "NLST/OASIS folder, or DIR-Lab COPDGene case folders) or --datalist <file.json>; see the bundle's docs/README.md."
)


class DatalistError(ValueError):
    """The configured data cannot be turned into a datalist (the message says why and how to fix it)."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def ensure_demo_dataset(demo_dir: str | os.PathLike, task: str, **kwargs: Any) -> Path:
    """Write the synthetic demo dataset of ``task`` (``"lung"`` or ``"brain"``) into ``demo_dir`` unless it is
    already complete; return the datalist path. Deterministic (same files every time); under
    ``torch.distributed`` rank 0 writes and the others wait."""
    if task not in DEMO_WRITERS:
        raise ValueError(f"task must be one of {sorted(DEMO_WRITERS)}, got {task!r}.")
    writer = DEMO_WRITERS[task]
    path = None
    if is_main_process():
        existed = (Path(demo_dir) / "datalist.json").is_file()
        path = writer(demo_dir, **kwargs)
        if not existed:
            logger.info(f"Wrote the synthetic {task} demo dataset to {demo_dir}.")
    _barrier()
    return Path(path) if path is not None else Path(demo_dir) / "datalist.json"


def _with_top_level_fields(json_path: Path, entries: list[dict]) -> list[dict]:
    """Copy the datalist's top-level ``landmark_coordinates`` into every entry that lacks it."""
    try:
        content = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return entries
    frame = content.get("landmark_coordinates") if isinstance(content, dict) else None
    if frame is not None:
        for entry in entries:
            entry.setdefault("landmark_coordinates", frame)
    return entries


def _load_json_datalist(path: Path, split: str) -> list[dict]:
    try:
        entries = load_datalist(path, split=split)
    except FileNotFoundError as exc:
        raise DatalistError(f"{exc}. {_HELP}") from exc
    except ValueError as exc:
        raise DatalistError(f"Invalid datalist: {exc}. {_HELP}") from exc
    if not entries:
        raise DatalistError(f"{path}: split {split!r} is empty. {_HELP}")
    return _with_top_level_fields(path, entries)


def _is_dirlab(folder: Path) -> bool:
    try:
        dirlab_copd_datalist(folder)
    except (FileNotFoundError, ValueError):
        return False
    return True


def registration_datalist(
    split: str = "training",
    task: str = "lung",
    dataset_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    demo_dir: str | os.PathLike | None = None,
    demo_kwargs: Mapping[str, Any] | None = None,
    convert_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """The entries of one split (``"training"``, ``"validation"``, ``"test"``) with absolute paths.

    Args:
        split: the split to read.
        task: ``"lung"`` or ``"brain"`` (which layouts are recognised and which demo dataset is written).
        dataset_dir: dataset folder (see the module docstring); ignored when ``datalist`` is given.
        datalist: a JSON datalist file (our format); wins over ``dataset_dir``.
        demo_dir: the bundle's demo folder: when ``dataset_dir`` is this folder the demo dataset is written there if
            needed (and only then: another missing folder is an error).
        demo_kwargs: arguments of the demo writer (:func:`monai_gradicon.data.write_lung_demo_dataset` /
            :func:`~monai_gradicon.data.write_brain_demo_dataset`).
        convert_dir: where DIR-Lab raw images are converted to NIfTI (default ``<dataset_dir>_nifti``).

    Raises:
        DatalistError: missing/malformed datalist, unknown layout, missing split or files (a clear message).
    """
    if task not in DEMO_WRITERS:
        raise ValueError(f"task must be one of {sorted(DEMO_WRITERS)}, got {task!r}.")
    if datalist not in (None, "", "None"):
        return _load_json_datalist(Path(datalist).expanduser(), split)
    if dataset_dir in (None, "", "None"):
        raise DatalistError(f"Neither dataset_dir nor datalist is set. {_HELP}")
    folder = Path(dataset_dir).expanduser()
    if demo_dir is not None and folder.resolve() == Path(demo_dir).expanduser().resolve():
        ensure_demo_dataset(folder, task, **dict(demo_kwargs or {}))
    if not folder.is_dir():
        raise DatalistError(f"dataset_dir {folder} does not exist. {_HELP}")
    if (folder / "datalist.json").is_file():
        return _load_json_datalist(folder / "datalist.json", split)
    try:
        if task == "lung" and (folder / "NLST_dataset.json").is_file():
            return nlst_datalist(folder, split=split, require_keypoints=False)
        if task == "brain" and (folder / "OASIS_dataset.json").is_file():
            return oasis_datalist(folder, split=split)
    except (FileNotFoundError, ValueError) as exc:
        raise DatalistError(f"{exc}. {_HELP}") from exc
    if task == "lung" and _is_dirlab(folder):
        target = (Path(convert_dir) if convert_dir not in (None, "", "None")
                  else folder.parent / (folder.name + "_nifti"))
        if not (target / "datalist.json").is_file():
            if is_main_process():
                logger.info(f"Converting DIR-Lab COPDGene {folder} to NIfTI in {target} (once).")
                dirlab_copd_to_nifti(folder, target, split="all")
            _barrier()
        entries = _load_json_datalist(target / "datalist.json", "all")
        return entries
    layouts = "datalist.json, NLST_dataset.json, DIR-Lab copd*/ folders" if task == "lung" else (
        "datalist.json, OASIS_dataset.json")
    raise DatalistError(f"dataset_dir {folder} holds none of the known layouts ({layouts}). {_HELP}")


def pairs_from_subjects(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Deterministic registration pairs from subject entries (``image``/``label``): subject i is moving and subject
    i+1 fixed, cyclically (both directions when there are two subjects). Pair entries (``fixed_image``) are returned
    unchanged, so a validation split may hold either."""
    entries = [dict(e) for e in entries]
    if not entries or all("fixed_image" in e for e in entries):
        return entries
    if any("image" not in e for e in entries):
        raise DatalistError("Subject entries need an 'image' key (and optionally 'label').")
    if len(entries) < 2:
        raise DatalistError("At least two subjects are needed to form registration pairs.")
    n = len(entries)
    order = [(0, 1), (1, 0)] if n == 2 else [(i, (i + 1) % n) for i in range(n)]
    pairs = []
    for m, f in order:
        pair = {"moving_image": entries[m]["image"], "fixed_image": entries[f]["image"]}
        if "label" in entries[m] and "label" in entries[f]:
            pair["moving_label"], pair["fixed_label"] = entries[m]["label"], entries[f]["label"]
        stems = [Path(entries[i]["image"]).name.split(".")[0] for i in (m, f)]
        pair["case"] = f"{stems[0]}_to_{stems[1]}"
        pairs.append(pair)
    return pairs


class SubjectPairDataset(TorchDataset, Randomizable):
    """Random inter-subject registration pairs drawn from a dataset of preprocessed subjects.

    Item ``i`` draws two different subjects at random and returns ``{"moving_image", "fixed_image"}`` (and
    ``moving_label``/``fixed_label`` when the subjects have ``label`` and ``keep_labels``), then applies
    ``transform``. Wrap the subjects in a ``CacheDataset`` to preprocess each volume once.

    Args:
        subjects: a dataset (or list) whose items are dicts with ``image`` (and optionally ``label``).
        num_pairs: items per pass (default: the number of subjects).
        transform: pair-level transform applied to each drawn pair.
        keep_labels: also return the label maps.
        seed: seed of the pair sampler (use a different one per rank under DDP).
    """

    def __init__(self, subjects: Sequence, num_pairs: int | None = None, transform=None, keep_labels: bool = False,
                 seed: int = 0) -> None:
        if len(subjects) < 2:
            raise DatalistError(f"Random pairs need at least two subjects, got {len(subjects)}.")
        self.subjects = subjects
        self.num_pairs = int(num_pairs) if num_pairs else len(subjects)
        self.transform = transform
        self.keep_labels = keep_labels
        self.set_random_state(seed=seed)

    def __len__(self) -> int:
        return self.num_pairs

    def randomize(self, data: Any = None) -> tuple[int, int]:
        moving, fixed = self.R.choice(len(self.subjects), size=2, replace=False)
        return int(moving), int(fixed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        moving_idx, fixed_idx = self.randomize()
        moving, fixed = self.subjects[moving_idx], self.subjects[fixed_idx]
        pair = {"moving_image": moving["image"], "fixed_image": fixed["image"]}
        if self.keep_labels and "label" in moving and "label" in fixed:
            pair["moving_label"], pair["fixed_label"] = moving["label"], fixed["label"]
        return apply_transform(self.transform, pair) if self.transform is not None else pair
