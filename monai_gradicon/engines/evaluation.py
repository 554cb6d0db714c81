"""Evaluator helpers: metric averaging over the per-case values of
:class:`~monai_gradicon.engines.transforms.RegistrationEvalOutputd`, and CSV/JSON metric reports.

Per-case values are computed once, in the evaluator's postprocessing, with :mod:`monai_gradicon.metrics`
(``landmark_tre``, ``dice_per_label``, ``folding_percentage``, ``log_jacobian_std``). :class:`CaseMetricAverage`
averages one of them for Ignite (``key_val_metric`` / ``additional_metrics``, TensorBoard, ``StatsHandler``) and
:class:`MetricsReportHandler` writes them per case (CSV) and summarised (JSON).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from monai_gradicon.engines.module import SCALAR_KEYS
from monai_gradicon.engines.transforms import CASE_METRICS
from monai_gradicon.io_utils import atomic_write_text
from monai_gradicon.engines.distributed import is_main_process

__all__ = ["eval_outputs", "train_scalars", "CaseMetricAverage", "MetricsReportHandler", "summarize"]

logger = logging.getLogger(__name__)


def _per_sample(output: Any) -> list[Mapping]:
    if isinstance(output, Mapping):
        return [output]
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [o for o in output if isinstance(o, Mapping)]
    raise ValueError(f"Unexpected engine output of type {type(output).__name__}.")


def eval_outputs(output: Any, key: str = "eval") -> list[Mapping]:
    """The per-sample ``eval`` dicts of a (decollated) evaluator output: ``case``, ``fixed``, ``moving``,
    ``warped``, ``ddf``, ``metrics`` (the ``output_transform`` of image handlers and metrics)."""
    samples = [o[key] for o in _per_sample(output) if key in o]
    if not samples:
        raise ValueError(
            f"The evaluator output has no {key!r} entries; add monai_gradicon.engines.RegistrationEvalOutputd to "
            "the evaluator's postprocessing."
        )
    return samples


def train_scalars(output: Any) -> dict[str, float]:
    """Training scalars of a decollated trainer output averaged over the batch (``loss``, ``similarity``,
    ``regularizer``, ``transform_magnitude``, ``folds_percent``), for ``StatsHandler``/``TensorBoardStatsHandler``."""
    samples = _per_sample(output)
    values: dict[str, list[float]] = {}
    for sample in samples:
        pred = sample.get("pred", sample)
        if not isinstance(pred, Mapping):
            continue
        for key in SCALAR_KEYS:
            if key in pred:
                values.setdefault(key, []).append(float(pred[key]))
    if not values and "loss" in samples[0]:
        values["loss"] = [float(samples[0]["loss"])]
    return {f"train_{k}": float(np.mean(v)) for k, v in values.items()}


class CaseMetricAverage(Metric):
    """Mean over cases of one per-case value (``metrics[name]`` of the ``eval`` output), NaN cases skipped.

    ``compute`` returns NaN when no case had a value (e.g. no landmarks), instead of raising, so it can be a
    key metric for any dataset. Sums are all-reduced across processes under ``torch.distributed``.

    Args:
        name: one of :data:`~monai_gradicon.engines.transforms.CASE_METRICS`.
        eval_key: output key of :class:`~monai_gradicon.engines.RegistrationEvalOutputd`.
    """

    def __init__(self, name: str, eval_key: str = "eval", output_transform: Callable = lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        if name not in CASE_METRICS:
            raise ValueError(f"Unknown case metric {name!r}; choose one of {CASE_METRICS}.")
        self.name = name
        self.eval_key = eval_key
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0.0, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        for sample in eval_outputs(output, self.eval_key):
            value = float(sample["metrics"][self.name])
            if not math.isnan(value):
                self._sum += value
                self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if float(self._count) == 0:
            return float("nan")
        return float(self._sum / self._count)


def summarize(rows: Sequence[Mapping[str, Any]], names: Sequence[str] = CASE_METRICS) -> dict[str, dict[str, float]]:
    """``{name: {"mean", "std", "median", "min", "max", "n"}}`` over the non-NaN values of each metric."""
    summary = {}
    for name in names:
        values = np.array([float(r[name]) for r in rows if name in r], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            continue
        summary[name] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "median": float(np.median(values)),
            "min": float(values.min()),
            "max": float(values.max()),
            "n": int(values.size),
        }
    return summary


def _gather(rows: list[dict]) -> list[dict]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        return [row for part in gathered for row in part]
    return rows


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class MetricsReportHandler:
    """Write an evaluator's per-case metrics to CSV and their summary to JSON (atomically, rank 0).

    After every evaluator run (``Events.COMPLETED``):

    * ``<output_dir>/<prefix>metrics_per_case.csv``: one row per case: ``case``, ``epoch`` and every
      :data:`~monai_gradicon.engines.transforms.CASE_METRICS` value;
    * ``<output_dir>/<prefix>metrics.json``: ``{"epoch", "num_cases", "summary": {metric: {mean, std, median, min,
      max, n}}, "engine_metrics": engine.state.metrics, "cases": [...]}``;
    * with ``history=True``, ``<output_dir>/<prefix>metrics_history.json`` gains one entry per run (for validation
      during training: the metrics at each validation epoch).

    Args:
        output_dir: folder of the reports.
        prefix: file name prefix (e.g. ``"validation_"``).
        eval_key: output key of :class:`~monai_gradicon.engines.RegistrationEvalOutputd`.
        history: keep the history file.
        log: log a one-line summary.
    """

    def __init__(self, output_dir: str | os.PathLike, prefix: str = "", eval_key: str = "eval",
                 history: bool = False, log: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.eval_key = eval_key
        self.history = history
        self.log = log
        self.rows: list[dict] = []
        self.last_report: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        for sample in eval_outputs(engine.state.output, self.eval_key):
            row = {"case": str(sample.get("case", f"case_{len(self.rows)}"))}
            row.update({k: float(v) for k, v in sample["metrics"].items()})
            self.rows.append(row)

    def path(self, name: str) -> Path:
        return self.output_dir / f"{self.prefix}{name}"

    def _write(self, engine: Engine) -> None:
        rows = _gather(self.rows)
        epoch = int(engine.state.epoch)
        engine_metrics = {k: (float(v) if isinstance(v, (int, float, np.floating)) else str(v))
                          for k, v in engine.state.metrics.items()}
        report = {"epoch": epoch, "num_cases": len(rows), "summary": summarize(rows),
                  "engine_metrics": engine_metrics, "cases": rows}
        self.last_report = report
        if not is_main_process():
            return
        columns = ["case", "epoch", *CASE_METRICS]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()},
                             "epoch": epoch})
        atomic_write_text(self.path("metrics_per_case.csv"), buffer.getvalue())
        atomic_write_text(self.path("metrics.json"), json.dumps(_json_safe(report), indent=2) + "\n")
        if self.history:
            history_path = self.path("metrics_history.json")
            history = []
            if history_path.is_file():
                try:
                    history = json.loads(history_path.read_text(encoding="utf-8"))
                except ValueError:
                    history = []
            history = [h for h in history if h.get("epoch") != epoch]
            history.append(_json_safe({k: report[k] for k in ("epoch", "num_cases", "summary", "engine_metrics")}))
            atomic_write_text(history_path, json.dumps(history, indent=2) + "\n")
        if self.log:
            parts = [f"{k}={v['mean']:.4g}" for k, v in report["summary"].items()]
            logger.info(f"Metrics over {len(rows)} case(s) at epoch {epoch}: " + ", ".join(parts) +
                        f" -> {self.path('metrics.json')}")
