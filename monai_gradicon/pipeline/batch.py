"""Batch registration: many pairs, one model, one result folder per pair, one summary table.

The pipeline itself is :func:`monai_gradicon.pipeline.register`; this module only decides *which* pairs run *where*
and keeps the books:

1. **Lists** -- :func:`read_pair_list` reads a CSV (header ``fixed,moving[,fixed_mask,moving_mask,name]``) or a JSON
   list of objects with those keys; :func:`learn2reg_batch_pairs` takes the pairs of a split of a Learn2Reg
   ``*_dataset.json`` (each pair named by its Learn2Reg field stem, ``disp_FFFF_MMMM``, so that
   :func:`monai_gradicon.pipeline.learn2reg.evaluate_learn2reg` scores the batch's output folder directly). Relative
   paths are relative to the list's folder (Learn2Reg: the dataset JSON's folder) unless a data root is given.
2. **Plan** -- :func:`plan_batch` checks everything that can be checked without registering, for *all* pairs at
   once, and refuses the batch (:class:`BatchListError`, every problem listed) before any work: names (unique, also
   ignoring case; usable as folder names), every file present and a readable image header, the predicted memory
   (given the settings), and every pair's folder ``<output_root>/<name>`` -- absent or empty; or a complete previous
   result, which is kept with ``skip_existing`` or replaced as a whole with ``overwrite`` (never both); anything else
   is refused, as is a folder holding an input of any pair. :func:`check_batch_memory` then refuses pairs whose
   predicted peak memory exceeds a limit (once the settings are known from the weights' model card).
3. **Run** -- :func:`run_batch` calls a ``register_pair(pair, output_dir)`` callable per pair in list order (the
   command line's ``register-batch`` passes the same per-pair function as ``register``; the model is loaded and moved
   to the device once, by the caller). Each result folder is written as a whole (:func:`write_result_folder`), so a
   pair's folder is complete or absent. An exception in one pair is recorded (type and message) and the next pair
   runs; Ctrl-C stops the batch, marks the rest ``not_run`` and keeps what was written. One line per pair reports
   the count, the outcome and the estimated time left.
4. **Summary** -- ``summary.csv`` and ``summary.json`` in the output root, rewritten atomically after every pair (so
   an interrupted batch still has an accurate table): per pair ``status`` (:data:`STATUSES`), times, folds % and
   SDlogJ, the error; the JSON adds the counts, the settings and the column definitions (:data:`COLUMNS`).

Example (Python API)::

    from monai_gradicon import load_weights
    from monai_gradicon.pipeline import register
    from monai_gradicon.pipeline.batch import plan_batch, read_pair_list, run_batch

    network, card = load_weights("model.pt")
    plan = plan_batch(read_pair_list("pairs.csv"), "results/")
    def one(pair, out):
        result = register(pair.fixed, pair.moving, network, fixed_mask=pair.fixed_mask, moving_mask=pair.moving_mask)
        result.save(out)
        return result
    batch = run_batch(plan, one)          # batch.failed: the records of the pairs that failed
"""

from __future__ import annotations

import csv
import datetime
import gc
import io as _io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from monai_gradicon.io import ImageReadError, read_shape
from monai_gradicon.io_utils import atomic_write_text, jsonable
from monai_gradicon.pipeline.core import RegistrationSettings, predict_peak_memory_gb
from monai_gradicon.pipeline.result import (
    OUTPUT_FILES,
    RegistrationResult,
    check_result_folder,
    is_complete_result,
)

__all__ = [
    "BATCH_SUMMARY_KIND",
    "COLUMNS",
    "LIST_COLUMNS",
    "STATUSES",
    "SUMMARY_FILES",
    "BatchFailuresError",
    "BatchListError",
    "BatchPair",
    "BatchPlan",
    "BatchResult",
    "PairRecord",
    "PlannedPair",
    "check_batch_memory",
    "default_pair_name",
    "learn2reg_batch_pairs",
    "plan_batch",
    "read_pair_list",
    "run_batch",
]

BATCH_SUMMARY_KIND = "monai_gradicon batch summary"
"""``summary.json["kind"]`` of a batch: only such a summary is replaced by a later batch into the same root."""

SUMMARY_FILES = {"csv": "summary.csv", "json": "summary.json"}
"""The batch summary's files in the output root (each pair's own ``summary.json`` lies in its folder)."""

LIST_COLUMNS = ("fixed", "moving", "fixed_mask", "moving_mask", "name")
"""Columns of a CSV pair list (keys of a JSON pair list); ``fixed`` and ``moving`` are required."""

STATUSES = ("ok", "failed", "skipped", "not_run")
"""``ok``: registered and written; ``failed``: an error, recorded, nothing written for the pair; ``skipped``: a
complete previous result was kept (``skip_existing``); ``not_run``: the batch was interrupted before the pair."""

COLUMNS: dict[str, str] = {
    "name": "the pair's name = its result folder under the output root",
    "status": "ok | failed | skipped | not_run (see STATUSES)",
    "seconds": "wall-clock seconds of the pair in this batch (reading, registration, writing; failed pairs: until the "
               "error); empty for skipped pairs",
    "registration_seconds": "seconds from reading the images to the fields on the original grids, without writing "
                            "(the result's timings 'total_before_write'; skipped pairs: from their summary.json)",
    "folds_percent": "percentage of fixed-grid voxels with det J <= 0 of the fixed -> moving map (physical det J on "
                     "the original fixed grid)",
    "log_jacobian_std": "SDlogJ: standard deviation of log(det J) on the original fixed grid, det J clamped at 1e-9 "
                        "(monai_gradicon.metrics.log_jacobian_std)",
    "error": "'ExceptionType: message' of a failed pair",
    "output_dir": "absolute path of the pair's result folder (complete, or absent for a failed / not_run pair)",
    "fixed": "absolute path of the fixed image",
    "moving": "absolute path of the moving image",
    "fixed_mask": "absolute path of the fixed mask, if one was listed",
    "moving_mask": "absolute path of the moving mask, if one was listed",
}
"""The columns of ``summary.csv`` (and the keys of ``summary.json["pairs"]``) and what they mean."""

_NAME = re.compile(r"^\w[\w.+=@-]*$")
_MAX_NAME = 200
_MAX_PROBLEMS = 25


class BatchListError(ValueError):
    """A pair list or output root that cannot be run as a whole; raised before any registration, listing every
    problem found."""

    def __init__(self, problems: Sequence[str], what: str = "the batch"):
        self.problems = list(problems)
        shown = self.problems[:_MAX_PROBLEMS]
        more = len(self.problems) - len(shown)
        super().__init__(
            f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''} with {what}; nothing was "
            "registered:\n  - " + "\n  - ".join(shown) + (f"\n  ... and {more} more" if more else "")
        )


class BatchFailuresError(RuntimeError):
    """Raised by the command line after a batch in which some pairs failed (the others were written; the summary
    says which failed and why)."""


# ----------------------------------------------------------------------------------------------------------------
# pairs and lists
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPair:
    """One pair of a batch.

    Attributes:
        name: the pair's result folder name under the output root.
        fixed, moving: absolute image paths.
        fixed_mask, moving_mask: absolute mask paths, or None.
        source: where the pair was listed (``"pairs.csv row 3"``), for messages.
    """

    name: str
    fixed: str
    moving: str
    fixed_mask: str | None = None
    moving_mask: str | None = None
    source: str = ""

    @property
    def inputs(self) -> list[str]:
        """Every file the pair reads."""
        return [p for p in (self.fixed, self.moving, self.fixed_mask, self.moving_mask) if p is not None]


def _stem(path: str) -> str:
    name = os.path.basename(path)
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[0]


def default_pair_name(fixed: str, moving: str) -> str:
    """``<moving stem>_to_<fixed stem>`` (``.nii.gz`` and other suffixes removed)."""
    return f"{_stem(moving)}_to_{_stem(fixed)}"


def _resolve(value: str, root: str) -> str:
    return os.path.abspath(os.path.join(root, os.path.expanduser(value)))


def _pairs_from_rows(rows: Sequence[tuple[str, Mapping[str, Any]]], root: str, list_path: str) -> list[BatchPair]:
    """Rows ``(where, {column: value})`` -> pairs; every row's problems are collected before raising."""
    problems: list[str] = []
    pairs: list[BatchPair] = []
    for where, row in rows:
        unknown = sorted(str(k) for k in row if k not in LIST_COLUMNS)
        if unknown:
            problems.append(f"{where}: unknown column(s) {unknown}; the columns are {', '.join(LIST_COLUMNS)}.")
            continue
        values: dict[str, str | None] = {}
        bad = False
        for key in LIST_COLUMNS:
            value = row.get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                values[key] = None
            elif isinstance(value, str):
                values[key] = value.strip()
            else:
                problems.append(f"{where}: {key} must be text ({'a name' if key == 'name' else 'a path'}), got "
                                f"{value!r}.")
                bad = True
        if bad:
            continue
        missing = [k for k in ("fixed", "moving") if values[k] is None]
        if missing:
            problems.append(f"{where}: no {' and no '.join(missing)} image.")
            continue
        fixed, moving = values["fixed"], values["moving"]
        assert fixed is not None and moving is not None
        pairs.append(BatchPair(
            name=values["name"] if values["name"] is not None else default_pair_name(fixed, moving),
            fixed=_resolve(fixed, root), moving=_resolve(moving, root),
            fixed_mask=None if values["fixed_mask"] is None else _resolve(values["fixed_mask"], root),
            moving_mask=None if values["moving_mask"] is None else _resolve(values["moving_mask"], root),
            source=where,
        ))
    if problems:
        raise BatchListError(problems, f"the pair list {list_path}")
    if not pairs:
        raise BatchListError([f"{list_path} lists no pairs."], f"the pair list {list_path}")
    return pairs


def read_pair_list(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> list[BatchPair]:
    """Read a pair list: ``.csv`` or ``.json``.

    * CSV: a header row naming the columns (:data:`LIST_COLUMNS`: ``fixed`` and ``moving`` required; ``fixed_mask``,
      ``moving_mask``, ``name`` optional, in any order), then one pair per row; empty cells are absent values, blank
      rows are ignored.
    * JSON: a list of objects with those keys (masks may be ``null``).

    A pair without a name is named :func:`default_pair_name` (``<moving stem>_to_<fixed stem>``). Relative paths are
    relative to ``data_root`` (default: the list file's folder); ``~`` is expanded. Nothing is checked on disk here
    (:func:`plan_batch` does that for all pairs at once).

    Raises:
        FileNotFoundError: no such list. BatchListError (a ValueError): a malformed list, every problem named.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The pair list does not exist: {path}")
    root = os.path.abspath(os.fspath(data_root) if data_root is not None else os.path.dirname(path) or ".")
    lower = path.lower()
    if lower.endswith(".csv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
        reader = csv.reader(_io.StringIO(text))
        header: list[str] | None = None
        rows: list[tuple[str, Mapping[str, Any]]] = []
        problems: list[str] = []
        for number, cells in enumerate(reader, start=1):
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                if "fixed" not in header or "moving" not in header:
                    problem = (f"the first row {cells} must be a header naming the columns, with at least fixed "
                               f"and moving (columns: {', '.join(LIST_COLUMNS)}).")
                    raise BatchListError([problem], f"the pair list {path}")
                repeated = sorted({c for c in header if header.count(c) > 1})
                if repeated:
                    raise BatchListError([f"the header names column(s) {repeated} more than once."],
                                         f"the pair list {path}")
                continue
            if len(cells) != len(header):
                problems.append(f"row {number}: {len(cells)} cells but the header has {len(header)} columns.")
                continue
            rows.append((f"row {number}", dict(zip(header, cells))))
        if header is None:
            raise BatchListError([f"{path} is empty; it needs a header row (fixed,moving,...) and one row per pair."],
                                 f"the pair list {path}")
        if problems:
            raise BatchListError(problems, f"the pair list {path}")
        return _pairs_from_rows(rows, root, path)
    if lower.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                content = json.load(f)
        except ValueError as exc:
            raise ValueError(f"The pair list {path} is not valid JSON: {exc}") from exc
        if isinstance(content, dict) and any(k in content for k in ("registration_val", "registration_test",
                                                                    "training_paired_images")):
            raise ValueError(f"{path} is a Learn2Reg dataset JSON, not a pair list; pass it as --dataset_json with "
                             "--split (training, validation or test).")
        if not isinstance(content, list):
            raise ValueError(f"The pair list {path} must hold a JSON list of objects with keys "
                             f"{', '.join(LIST_COLUMNS)} (fixed and moving required); got a {type(content).__name__}.")
        rows = []
        problems = []
        for index, entry in enumerate(content):
            if not isinstance(entry, dict):
                problems.append(f"entry {index}: must be an object with keys fixed, moving, ..., got {entry!r}.")
            else:
                rows.append((f"entry {index}", entry))
        if problems:
            raise BatchListError(problems, f"the pair list {path}")
        return _pairs_from_rows(rows, root, path)
    raise ValueError(f"A pair list is a .csv or .json file, got {path}.")


def learn2reg_batch_pairs(
    dataset_json: str | os.PathLike, split: str = "validation", data_root: str | os.PathLike | None = None,
    masks: bool = False,
) -> list[BatchPair]:
    """The pairs of a split of a Learn2Reg ``*_dataset.json``
    (:func:`~monai_gradicon.pipeline.learn2reg.read_learn2reg_pairs`).

    Each pair is named by its Learn2Reg field stem (``disp_FFFF_MMMM``,
    :meth:`~monai_gradicon.pipeline.learn2reg.Learn2RegPair.field_stems`), which is where
    :func:`~monai_gradicon.pipeline.learn2reg.evaluate_learn2reg` looks for a result folder: the batch's output root
    is a predictions folder. Paths are relative to ``data_root`` (default: the JSON's folder). ``masks``: use the
    dataset's masks (the image path with ``images`` -> ``masks``, e.g. NLST's lung masks) as fixed / moving masks.
    """
    from monai_gradicon.pipeline.learn2reg import read_learn2reg_pairs

    _, l2r_pairs = read_learn2reg_pairs(dataset_json, split)
    root = os.path.abspath(os.fspath(data_root) if data_root is not None else os.path.dirname(os.fspath(dataset_json)))
    pairs = []
    for index, p in enumerate(l2r_pairs):
        pairs.append(BatchPair(
            name=p.field_stems[0], fixed=_resolve(p.fixed, root), moving=_resolve(p.moving, root),
            fixed_mask=_resolve(p.sibling("fixed", "masks"), root) if masks else None,
            moving_mask=_resolve(p.sibling("moving", "masks"), root) if masks else None,
            source=f"{os.path.basename(os.fspath(dataset_json))} {split} pair {index} ({p.key})",
        ))
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# plan: everything checked before any work
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedPair:
    """A pair, its result folder (absolute), whether it is skipped (a complete result kept), the images' spatial
    shapes from their headers (voxels, file axis order) and the predicted peak memory (GiB; None until
    :func:`check_batch_memory`)."""

    pair: BatchPair
    output_dir: str
    skip: bool
    fixed_shape: tuple[int, ...]
    moving_shape: tuple[int, ...]
    predicted_memory_gb: float | None = None


@dataclass(frozen=True)
class BatchPlan:
    """What :func:`run_batch` runs: the pairs in list order, under ``output_root`` (absolute)."""

    output_root: str
    items: tuple[PlannedPair, ...]
    overwrite: bool
    skip_existing: bool

    @property
    def to_run(self) -> list[PlannedPair]:
        return [item for item in self.items if not item.skip]


def _name_problem(name: str) -> str | None:
    if not _NAME.match(name) or len(name) > _MAX_NAME:
        return (f"the name {name!r} cannot be a folder name: use letters, digits and _ . + = @ - (first a letter, "
                f"digit or _), at most {_MAX_NAME} characters.")
    if name in SUMMARY_FILES.values():
        return f"the name {name!r} is the batch summary's file name."
    return None


def _ancestors(path: str) -> set[str]:
    out = set()
    parent = os.path.dirname(path)
    while parent and parent not in out:
        out.add(parent)
        if os.path.dirname(parent) == parent:
            break
        parent = os.path.dirname(parent)
    return out


def _is_batch_summary(root: str, kind: str) -> bool:
    """Whether ``root``'s summary file of ``kind`` (``csv`` / ``json``) was written by :meth:`BatchResult.write`:
    the JSON carries :data:`BATCH_SUMMARY_KIND`; the CSV starts with the :data:`COLUMNS` header."""
    path = os.path.join(root, SUMMARY_FILES[kind])
    try:
        with open(path, encoding="utf-8") as f:
            if kind == "json":
                content = json.load(f)
                return isinstance(content, dict) and content.get("kind") == BATCH_SUMMARY_KIND
            return f.readline().rstrip("\r\n") == ",".join(COLUMNS)
    except (OSError, ValueError):
        return False


def _summary_problems(root: str, may_replace: bool) -> list[str]:
    """Problems with the summary files already in ``root``: someone else's files are never replaced; a previous
    batch's only with ``may_replace`` (skip_existing or overwrite)."""
    problems = []
    for kind, name in SUMMARY_FILES.items():
        path = os.path.join(root, name)
        if not os.path.lexists(path):
            continue
        if not os.path.isfile(path) or not _is_batch_summary(root, kind):
            problems.append(f"{path} exists and is not a batch summary of this project; choose another output "
                            "folder.")
        elif not may_replace:
            problems.append(f"{path} holds the summary of a previous batch; pass --skip_existing to keep that "
                            "batch's complete results and run the rest, or --overwrite to replace them.")
    return problems


def plan_batch(
    pairs: Sequence[BatchPair],
    output_root: str | os.PathLike,
    *,
    overwrite: bool = False,
    skip_existing: bool = False,
    protect: Sequence[str | os.PathLike] = (),
) -> BatchPlan:
    """Check a whole batch before any work (see the module docstring, step 2) and return its plan.

    Args:
        pairs: the pairs, in the order they will run.
        output_root: the folder that receives ``<name>/`` per pair and the summary files (created if missing).
        overwrite: replace complete previous results (each as a whole, when its pair is written).
        skip_existing: keep complete previous results and skip their pairs.
        protect: further files that must not lie inside any pair's folder (e.g. the weight file).

    Raises:
        BatchListError (a ValueError): every problem found, nothing done.
    """
    if overwrite and skip_existing:
        raise ValueError("--overwrite and --skip_existing contradict each other: choose one (skip keeps complete "
                         "previous results, overwrite replaces them).")
    raw = os.fspath(output_root)
    if not raw.strip():
        raise ValueError("The output folder is empty (''); give a folder for the batch's results.")
    root = os.path.abspath(raw)
    if os.path.exists(root) and not os.path.isdir(root):
        raise NotADirectoryError(f"The output folder {raw} exists and is not a directory.")
    if not pairs:
        raise BatchListError(["the list holds no pairs."])
    problems = _summary_problems(root, overwrite or skip_existing)

    seen: dict[str, BatchPair] = {}
    for pair in pairs:
        problem = _name_problem(pair.name)
        if problem:
            problems.append(f"{pair.source}: {problem}")
            continue
        key = pair.name.lower()  # two names differing only in case are one folder on macOS / Windows
        if key in seen:
            first = seen[key]
            same = "the name" if first.name == pair.name else f"the name (ignoring case; {first.name!r})"
            problems.append(f"{pair.source}: {same} {pair.name!r} is already used by {first.source}; names must be "
                            "unique (add or change the name column).")
        else:
            seen[key] = pair

    # every input of every pair: present, an image file, a readable header
    shapes: dict[str, tuple[int, ...]] = {}
    input_dirs: dict[str, str] = {}
    for pair in pairs:
        for what, path in (("fixed image", pair.fixed), ("moving image", pair.moving),
                           ("fixed mask", pair.fixed_mask), ("moving mask", pair.moving_mask)):
            if path is None:
                continue
            if os.path.isdir(path):
                problems.append(f"{pair.source} ({pair.name}): the {what} {path} is a directory, not an image file.")
                continue
            if not os.path.isfile(path):
                problems.append(f"{pair.source} ({pair.name}): the {what} file does not exist: {path}")
                continue
            real = os.path.realpath(path)
            for folder in _ancestors(real):
                input_dirs.setdefault(folder, path)
            if path not in shapes:
                try:
                    shapes[path] = read_shape(path, what)
                except (ImageReadError, ValueError, OSError) as exc:
                    problems.append(f"{pair.source} ({pair.name}): {exc}")

    items: list[PlannedPair] = []
    for pair in pairs:
        out = os.path.join(root, pair.name)
        if _name_problem(pair.name):
            continue
        real_out = os.path.realpath(out)
        if real_out in input_dirs:
            problems.append(f"{pair.source} ({pair.name}): its result folder {out} holds the input file "
                            f"{input_dirs[real_out]}; choose another output folder or name.")
            continue
        skip = skip_existing and is_complete_result(out)
        if not skip:
            if is_complete_result(out) and not overwrite:
                problems.append(f"{pair.source} ({pair.name}): {out} holds a complete previous result; pass "
                                "--skip_existing to keep it or --overwrite to replace it.")
                continue
            try:
                check_result_folder(out, [*pair.inputs, *protect], overwrite)
            except (ValueError, OSError) as exc:
                problems.append(f"{pair.source} ({pair.name}): {exc}")
                continue
        if pair.fixed in shapes and pair.moving in shapes:
            items.append(PlannedPair(pair, out, skip, shapes[pair.fixed], shapes[pair.moving]))
    if problems:
        raise BatchListError(problems)
    return BatchPlan(root, tuple(items), overwrite, skip_existing)


def check_batch_memory(plan: BatchPlan, settings: RegistrationSettings | Callable[[tuple[int, ...]], RegistrationSettings],
                       memory_limit_gb: float | None) -> BatchPlan:
    """Predict every pair's peak memory (GiB, from the header shapes:
    :func:`~monai_gradicon.pipeline.core.predict_peak_memory_gb`) and refuse, before any work, a batch with a pair to
    run above ``memory_limit_gb`` (None: no limit). Returns the plan with the predictions filled in.

    ``settings``: the batch's settings, or a function of a pair's fixed shape (voxels) giving that pair's settings
    (``method="optimize"`` sizes its working grid from the fixed image).

    Raises:
        BatchListError: every pair above the limit.
    """
    items, problems = [], []
    for item in plan.items:
        pair_settings = settings if isinstance(settings, RegistrationSettings) else settings(item.fixed_shape)
        predicted = predict_peak_memory_gb(item.fixed_shape, item.moving_shape, pair_settings)
        if not item.skip and memory_limit_gb is not None and predicted > memory_limit_gb:
            problems.append(
                f"{item.pair.source} ({item.pair.name}): the predicted peak memory {predicted:.1f} GiB (fixed "
                f"{item.fixed_shape}, moving {item.moving_shape} voxels) is more than the limit {memory_limit_gb:.1f} "
                "GiB; raise --memory_limit_gb if the machine has that much memory, or crop / downsample the images.")
        items.append(replace(item, predicted_memory_gb=predicted))
    if problems:
        raise BatchListError(problems)
    return replace(plan, items=tuple(items))


# ----------------------------------------------------------------------------------------------------------------
# run and summary
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PairRecord:
    """One row of the batch summary (columns and units: :data:`COLUMNS`)."""

    name: str
    status: str
    seconds: float | None
    registration_seconds: float | None
    folds_percent: float | None
    log_jacobian_std: float | None
    error: str | None
    output_dir: str
    fixed: str
    moving: str
    fixed_mask: str | None
    moving_mask: str | None

    def to_dict(self) -> dict[str, Any]:
        return {column: getattr(self, column) for column in COLUMNS}


@dataclass
class BatchResult:
    """The outcome of :func:`run_batch`: one :class:`PairRecord` per pair, in list order."""

    output_root: str
    records: list[PairRecord]
    started: str
    finished: str | None = None
    interrupted: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def _with(self, status: str) -> list[PairRecord]:
        return [r for r in self.records if r.status == status]

    @property
    def ok(self) -> list[PairRecord]:
        return self._with("ok")

    @property
    def failed(self) -> list[PairRecord]:
        return self._with("failed")

    @property
    def skipped(self) -> list[PairRecord]:
        return self._with("skipped")

    def to_dict(self) -> dict[str, Any]:
        """The contents of ``summary.json``."""
        done = self.ok + self.skipped

        def mean(key: str, records: Sequence[PairRecord]) -> float | None:
            values = [getattr(r, key) for r in records if getattr(r, key) is not None]
            return float(sum(values) / len(values)) if values else None

        return {
            "kind": BATCH_SUMMARY_KIND,
            "output_root": self.output_root,
            "started": self.started,
            "finished": self.finished,
            "interrupted": self.interrupted,
            "counts": {"total": len(self.records), **{s: len(self._with(s)) for s in STATUSES}},
            "mean": {"seconds": mean("seconds", self.ok),
                     "registration_seconds": mean("registration_seconds", done),
                     "folds_percent": mean("folds_percent", done),
                     "log_jacobian_std": mean("log_jacobian_std", done)},
            "columns": COLUMNS,
            **self.details,
            "pairs": [r.to_dict() for r in self.records],
        }

    def write(self) -> dict[str, str]:
        """Write ``summary.csv`` and ``summary.json`` into the output root, each atomically; returns their paths."""
        os.makedirs(self.output_root, exist_ok=True)
        buffer = _io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(list(COLUMNS))
        for record in self.records:
            writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
                             for v in record.to_dict().values()])
        paths = {kind: os.path.join(self.output_root, name) for kind, name in SUMMARY_FILES.items()}
        atomic_write_text(paths["csv"], buffer.getvalue())
        atomic_write_text(paths["json"], json.dumps(jsonable(self.to_dict()), indent=2, allow_nan=False) + "\n")
        return paths




def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _clock(seconds: float) -> str:
    """``75.4`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _record(item: PlannedPair, status: str, **values: Any) -> PairRecord:
    p = item.pair
    fields = {"seconds": None, "registration_seconds": None, "folds_percent": None, "log_jacobian_std": None,
              "error": None, **values}
    return PairRecord(name=p.name, status=status, output_dir=item.output_dir, fixed=p.fixed, moving=p.moving,
                      fixed_mask=p.fixed_mask, moving_mask=p.moving_mask, **fields)


def _skipped_record(item: PlannedPair) -> PairRecord:
    """A kept result's numbers from its own ``summary.json`` (None where a field is absent, e.g. an older version)."""
    with open(os.path.join(item.output_dir, OUTPUT_FILES["summary"]), encoding="utf-8") as f:
        summary = json.load(f)

    def number(*keys: str) -> float | None:
        value: Any = summary
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return _record(item, "skipped", registration_seconds=number("timings_seconds", "total_before_write"),
                   folds_percent=number("folds", "percent_voxels_detJ_le_0"),
                   log_jacobian_std=number("log_jacobian_std"))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_batch(
    plan: BatchPlan,
    register_pair: Callable[[BatchPair, str], RegistrationResult],
    *,
    log: Callable[[str], None] = _stderr,
    details: Mapping[str, Any] | None = None,
    before_pair: Callable[[int, int, BatchPair], None] | None = None,
) -> BatchResult:
    """Run a planned batch; returns its :class:`BatchResult` (the summary files are already written).

    Args:
        plan: from :func:`plan_batch`.
        register_pair: ``(pair, output_dir) -> RegistrationResult``: registers one pair and writes its complete result
            folder at ``output_dir`` (e.g. :meth:`RegistrationResult.save`), or raises. Any exception is recorded for
            that pair and the batch goes on; ``KeyboardInterrupt`` stops it (the rest is ``not_run``, the summary is
            written, the interrupt re-raised).
        log: receives one line per pair: ``[k/n] name: ok in 3.2 s (folds 0.0000%, SDlogJ 0.0312) | elapsed 0:07,
            ETA 0:21`` (ETA: the mean seconds of the pairs that succeeded so far -- of those that failed while none
            succeeded -- times the pairs left to run).
        details: JSON-able facts added to ``summary.json`` (settings, weights, device, ...).
        before_pair: called as ``(k, n, pair)`` before a pair is registered (e.g. a header for a progress bar).
    """
    start = time.perf_counter()
    batch = BatchResult(plan.output_root, [_record(item, "not_run") for item in plan.items], _now(),
                        details=dict(details or {}))
    n = len(plan.items)
    left = len(plan.to_run)
    run_seconds: dict[str, list[float]] = {"ok": [], "failed": []}
    for index, item in enumerate(plan.items):
        count = f"[{index + 1}/{n}] {item.pair.name}"
        if item.skip:
            batch.records[index] = _skipped_record(item)
            log(f"{count}: skipped, a complete result is already in {item.output_dir}")
            batch.write()
            continue
        if before_pair is not None:
            before_pair(index + 1, n, item.pair)
        t = time.perf_counter()
        try:
            result = register_pair(item.pair, item.output_dir)
            seconds = time.perf_counter() - t
            record = _record(item, "ok", seconds=seconds,
                             registration_seconds=float(result.timings["total_before_write"]),
                             folds_percent=float(result.folds_percent),
                             log_jacobian_std=float(result.log_jacobian_std))
            outcome = (f"ok in {seconds:.1f} s (folds {record.folds_percent:.4f}%, SDlogJ "
                       f"{record.log_jacobian_std:.4f})")
            del result
        except KeyboardInterrupt:
            batch.interrupted = True
            batch.finished = _now()
            batch.write()
            log(f"{count}: interrupted; {len(batch.ok)} pair(s) written, the rest not run (see "
                f"{os.path.join(plan.output_root, SUMMARY_FILES['csv'])}).")
            raise
        except Exception as exc:  # noqa: BLE001 -- one pair's failure must not lose the others; it is recorded
            seconds = time.perf_counter() - t
            message = " ".join(str(exc).split()) or "(no message)"
            record = _record(item, "failed", seconds=seconds, error=f"{type(exc).__name__}: {message}")
            outcome = f"FAILED after {seconds:.1f} s: {record.error}"
            del exc
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an out-of-memory pair must not starve the next one
        batch.records[index] = record
        run_seconds[record.status].append(seconds)
        left -= 1
        typical = run_seconds["ok"] or run_seconds["failed"]  # a pair failing early says little about the others
        eta = sum(typical) / len(typical) * left
        log(f"{count}: {outcome} | elapsed {_clock(time.perf_counter() - start)}"
            + (f", ETA {_clock(eta)}" if left else ""))
        batch.write()
    batch.finished = _now()
    batch.write()
    return batch
