"""Atomic, resumable checkpoints for the GradICON trainer, and the bundle's ``models/model.pt`` writer.

* :class:`AtomicSaveHandler`: an Ignite ``BaseSaveHandler`` writing through a temporary file and ``os.replace``, so a
  crash never leaves a truncated checkpoint (rank 0 only under ``torch.distributed``).
* :class:`ResumableCheckpoint`: Ignite ``Checkpoint`` of ``save_dict`` (stage, model, optimizer, trainer) every
  ``interval`` epochs and at completion, keeping the ``n_saved`` latest; at ``Events.STARTED`` it resumes from the
  latest file in its folder (MONAI ``CheckpointLoader`` semantics: the configured ``max_epochs`` wins).
* :class:`ModelWeightsSaver`: writes the bare network state dict (keys ``network.steps.*``) that
  ``monai.bundle.load``, ``ckpt_export``, ``CheckpointLoader`` and MONAI Label read, atomically.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler

from monai_gradicon.engines.stages import unwrap
from monai_gradicon.io_utils import atomic_torch_save
from monai_gradicon.engines.distributed import is_main_process
from monai_gradicon.config import config_bool
from monai_gradicon.engines.guard import check_finite_state

__all__ = ["AtomicSaveHandler", "ResumableCheckpoint", "ModelWeightsSaver", "latest_checkpoint"]

logger = logging.getLogger(__name__)


class AtomicSaveHandler(BaseSaveHandler):
    """Save Ignite checkpoints to ``dirname`` atomically (temporary file + ``os.replace``); rank 0 only."""

    def __init__(self, dirname: str | os.PathLike) -> None:
        self.dirname = Path(dirname)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if not is_main_process():
            return
        for key, value in checkpoint.items():
            if isinstance(value, Mapping) and key in ("model", "network"):
                check_finite_state(value, f"the checkpoint {self.dirname / filename}")
        self.dirname.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(dict(checkpoint), self.dirname / filename)

    def remove(self, filename: str) -> None:
        if not is_main_process():
            return
        path = self.dirname / filename
        if path.exists():
            path.unlink()


def latest_checkpoint(dirname: str | os.PathLike, name: str = "checkpoint") -> Path | None:
    """The file ``{name}_{iteration}.pt`` with the highest iteration in ``dirname`` (None if there is none)."""
    folder = Path(dirname)
    if not folder.is_dir():
        return None
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)\.pt$")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return max(found)[1] if found else None


class ResumableCheckpoint:
    """Atomic, resumable training checkpoints (Ignite ``Checkpoint`` + :class:`AtomicSaveHandler`).

    Files are ``{save_dir}/{name}_{iteration}.pt`` holding the state dicts of ``save_dict``. Order matters when
    loading: put the :class:`~monai_gradicon.engines.TwoStageHandler` first so a stage-2 checkpoint grows the
    network before its weights are loaded.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects with ``state_dict``/``load_state_dict``, e.g.
            ``{"stage": ..., "model": ..., "optimizer": ...}`` (the engine is added as ``"trainer"``).
        interval: save every ``interval`` epochs (and always when training completes); 0 saves only at completion.
        n_saved: how many of this run's latest checkpoints to keep (its older files are removed; files of other runs
            are never touched).
        resume: at ``Events.STARTED``, load the latest checkpoint of ``save_dir`` if there is one (and continue that
            run). With ``False``, checkpoints of an earlier run found there are moved, untouched, into
            ``<save_dir>/previous_run_<n>/`` so this run starts over without losing them and a later resume
            continues this run.
        name: file name stem.
        map_location: device the checkpoint tensors are loaded to (default: CPU, then copied by ``load_state_dict``).
        include_engine: add the engine the handler is attached to as ``"trainer"`` (epoch and iteration), which a
            config cannot reference without a cycle.
    """

    def __init__(self, save_dir: str | os.PathLike, save_dict: Mapping, interval: int = 1, n_saved: int = 1,
                 resume: bool = True, name: str = "checkpoint", map_location: str | torch.device | None = "cpu",
                 include_engine: bool = True) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object to checkpoint.")
        if n_saved < 1:
            raise ValueError(f"n_saved must be >= 1, got {n_saved}.")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.interval = int(interval)
        self.n_saved = int(n_saved)
        self.resume = config_bool(resume, "resume")
        self.name = name
        self.map_location = map_location
        self.include_engine = bool(include_engine)
        self.checkpoint: Checkpoint | None = None
        self.loaded_from: Path | None = None
        self.archived_to: Path | None = None
        self._own: set[str] = set()  # file names this run wrote or resumed from

    def attach(self, engine: Engine) -> None:
        if self.include_engine and "trainer" not in self.save_dict:
            self.save_dict["trainer"] = engine
        self.checkpoint = Checkpoint(
            self.save_dict,
            AtomicSaveHandler(self.save_dir),
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.iteration,
            filename_pattern=f"{self.name}_{{global_step}}.{{ext}}",
        )
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load_latest)
        else:
            engine.add_event_handler(Events.STARTED, self.archive_previous_run)
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        if self.checkpoint is None:
            raise RuntimeError("ResumableCheckpoint.attach(engine) must be called before saving.")
        self.checkpoint(engine)
        if self.checkpoint.last_checkpoint is not None:
            self._own.add(os.path.basename(str(self.checkpoint.last_checkpoint)))
        self._remove_stale()

    def _files(self) -> list[tuple[int, Path]]:
        pattern = re.compile(rf"^{re.escape(self.name)}_(\d+)\.pt$")
        if not self.save_dir.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.save_dir.iterdir() if (m := pattern.match(p.name)))

    def _remove_stale(self) -> None:
        """Keep only the ``n_saved`` newest files of **this run** (written or resumed from); never touch others."""
        if not is_main_process():
            return
        own = [(it, p) for it, p in self._files() if p.name in self._own]
        for _, path in own[: max(0, len(own) - self.n_saved)]:
            path.unlink(missing_ok=True)
            self._own.discard(path.name)

    def archive_previous_run(self, engine: Engine) -> None:
        """Starting over (``resume=False``): move checkpoints of an earlier run into ``previous_run_<n>/``."""
        files = self._files()
        if not files or not is_main_process():
            return
        n = 1
        while (self.save_dir / f"previous_run_{n}").exists():
            n += 1
        target = self.save_dir / f"previous_run_{n}"
        target.mkdir()
        for _, path in files:
            os.replace(path, target / path.name)
        self.archived_to = target
        logger.info(f"Starting over (resume off): moved {len(files)} checkpoint(s) of an earlier run to {target}.")

    def load_latest(self, engine: Engine) -> None:
        path = latest_checkpoint(self.save_dir, self.name)
        if path is None:
            return
        try:
            state = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as exc:
            raise RuntimeError(f"Cannot read the resume checkpoint {path}: {exc}. Delete it to start over.") from exc
        missing = [k for k in self.save_dict if k not in state]
        if missing:
            raise RuntimeError(f"Resume checkpoint {path} lacks {missing}; delete it (or the folder) to start over.")
        prior_max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=self.save_dict, checkpoint=state, strict=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RuntimeError(
                f"Resume checkpoint {path} does not match this configuration ({exc}). It was written by a run with "
                f"other settings: delete {self.save_dir} or pass --resume False to start over."
            ) from exc
        if prior_max_epochs is not None:
            if engine.state.epoch > prior_max_epochs:
                raise ValueError(
                    f"Resume checkpoint {path} is at epoch {engine.state.epoch}, beyond max_epochs {prior_max_epochs}."
                )
            engine.state.max_epochs = prior_max_epochs
        self.loaded_from = path
        self._own.add(path.name)
        logger.info(f"Resumed training from {path} (epoch {engine.state.epoch}, iteration {engine.state.iteration}).")


class ModelWeightsSaver:
    """Write the registration network's weights as a bare state dict (``network.steps.{i}.unet.*``), atomically.

    While the :class:`~monai_gradicon.engines.TwoStageHandler` is in stage 1 the file is ``stage1_filename`` (a
    3-step network does not fit the 4-step inference network); in the final stage it is ``filename``
    (``models/model.pt``). Saved every ``interval`` epochs, at the last epoch of stage 1 and at completion, on rank 0.

    Args:
        module: the training module (or its DDP wrapper); its state dict is saved.
        save_dir: target folder (the bundle's ``models``).
        stage_handler: the trainer's :class:`TwoStageHandler` (None: always ``filename``).
        filename: final weights file name.
        stage1_filename: stage-1 weights file name.
        interval: epochs between saves (0: only at completion).
    """

    def __init__(self, module: torch.nn.Module, save_dir: str | os.PathLike, stage_handler=None,
                 filename: str = "model.pt", stage1_filename: str = "model_stage1.pt", interval: int = 1) -> None:
        self.module = module
        self.save_dir = Path(save_dir)
        self.stage_handler = stage_handler
        self.filename = filename
        self.stage1_filename = stage1_filename
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._end_of_stage1)
        engine.add_event_handler(Events.COMPLETED, self)

    def _end_of_stage1(self, engine: Engine) -> None:
        """Always keep the final stage-1 weights, whatever the interval."""
        handler = self.stage_handler
        if handler is None or not handler.enabled or handler.stage != 1:
            return
        if engine.state.epoch == handler.stage1_epochs:
            if self.interval <= 0 or engine.state.epoch % self.interval != 0:
                self(engine)

    def target(self) -> Path:
        in_stage1 = self.stage_handler is not None and self.stage_handler.enabled and self.stage_handler.stage == 1
        return self.save_dir / (self.stage1_filename if in_stage1 else self.filename)

    def __call__(self, engine: Engine | None = None) -> None:
        if not is_main_process():
            return
        state = {k: v.detach().cpu() for k, v in unwrap(self.module).state_dict().items()}
        path = self.target()
        check_finite_state(state, str(path))
        atomic_torch_save(state, path)
        logger.info(f"Saved network weights ({len(state)} tensors) to {path}.")
