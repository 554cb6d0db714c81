"""The two-stage GradICON training protocol as an Ignite handler.

Stage 1 trains a 3-step network; stage 2 appends a fourth, zero-initialised full-resolution step
(:meth:`~monai_gradicon.GradICONNetwork.with_final_step`, so training resumes exactly at the stage-1 solution) and
trains all weights with a **new** Adam (fresh moments, the configured learning rate). Both stages run inside one
``SupervisedTrainer`` whose ``max_epochs`` is the sum of the two stages; the switch happens when the first epoch of
stage 2 starts, and on resume (the stage is part of the checkpoint, see :class:`TwoStageHandler.state_dict`).
"""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.engines.workflow import Workflow
from torch import nn

from monai_gradicon.config import config_bool
from monai_gradicon.engines.module import GradICONTrainingModule
from monai_gradicon.networks.registration import STEP_LEVELS

__all__ = ["TwoStageHandler", "reset_optimizer", "unwrap"]

logger = logging.getLogger(__name__)


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (or the module itself)."""
    while isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    return network


def reset_optimizer(optimizer: torch.optim.Optimizer, parameters, lr: float | None = None) -> torch.optim.Optimizer:
    """Turn ``optimizer`` into a freshly constructed one over ``parameters``, in place: its state (Adam moments,
    step counts) is dropped and a single parameter group with the constructor's hyper-parameters
    (``optimizer.defaults``, e.g. the configured learning rate, or ``lr`` when given) is created. Objects holding a
    reference to the optimizer (checkpoint handlers, the trainer) keep working."""
    optimizer.state.clear()
    optimizer.param_groups.clear()
    group: dict = {"params": [p for p in parameters if p.requires_grad]}
    if lr is not None:
        group["lr"] = float(lr)
    optimizer.add_param_group(group)
    return optimizer


def _rewrap(old: nn.Module, module: nn.Module) -> nn.Module:
    """Wrap ``module`` the way ``old`` was wrapped (DDP / DataParallel with the same options)."""
    if isinstance(old, nn.parallel.DistributedDataParallel):
        kwargs = {"device_ids": old.device_ids, "output_device": old.output_device,
                  "find_unused_parameters": old.find_unused_parameters}
        if not old.broadcast_buffers:  # only pass the (deprecated in torch 2.13) non-default
            kwargs["broadcast_buffers"] = False
        return nn.parallel.DistributedDataParallel(module, **kwargs)
    if isinstance(old, nn.DataParallel):
        return nn.DataParallel(module, device_ids=old.device_ids, output_device=old.output_device)
    return module


class TwoStageHandler:
    """Switch a :class:`~monai_gradicon.engines.GradICONTrainingModule` from stage 1 to stage 2.

    Attach it to the trainer (``train_handlers``). When epoch ``stage1_epochs + 1`` starts, it

    1. replaces the module's network by ``network.with_final_step()``,
    2. resets ``optimizer`` in place to a new optimizer of the same type and hyper-parameters over the new
       parameters (:func:`reset_optimizer`),
    3. re-wraps the trainer's (and ``evaluator``'s) network if it is ``DistributedDataParallel``/``DataParallel``.

    It has ``state_dict``/``load_state_dict`` (``{"stage": 1 | 2}``): put it *first* in the checkpoint's
    ``save_dict`` so that loading a stage-2 checkpoint grows the network before the weights are loaded.

    Args:
        module: the training module (the trainer's network, or the module inside its DDP wrapper).
        optimizer: the trainer's optimizer.
        stage1_epochs: epochs of stage 1 (``stage1_iterations // epoch_length``). 0 skips stage 1.
        evaluator: optional validation engine that shares the trainer's network (updated on re-wrap).
        enabled: False keeps a single stage (the network is trained as built).
        stage2_lr: learning rate of the new optimizer (default: the optimizer's constructor value, as the paper).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, stage1_epochs: int,
                 evaluator: Engine | None = None, enabled: bool = True, stage2_lr: float | None = None) -> None:
        module = unwrap(module)
        if not isinstance(module, GradICONTrainingModule):
            raise TypeError(f"TwoStageHandler needs a GradICONTrainingModule, got {type(module).__name__}.")
        if int(stage1_epochs) != stage1_epochs or stage1_epochs < 0:
            raise ValueError(
                f"stage1_epochs must be a whole number >= 0, got {stage1_epochs}; make stage1_iterations a multiple "
                "of epoch_length."
            )
        self.module = module
        self.optimizer = optimizer
        self.stage1_epochs = int(stage1_epochs)
        self.evaluator = evaluator
        self.enabled = config_bool(enabled, "two_stage")
        self.stage2_lr = None if stage2_lr is None else float(stage2_lr)
        self.stage = 1
        self.trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)

    def _on_epoch_started(self, engine: Engine) -> None:
        if self.enabled and self.stage == 1 and engine.state.epoch > self.stage1_epochs:
            self.switch()

    def switch(self) -> None:
        """Grow the network, reset the optimizer and re-wrap the engines' networks (stage 1 -> stage 2)."""
        if self.stage != 1:
            return
        before = self.module.num_steps
        self.module.grow()
        reset_optimizer(self.optimizer, self.module.parameters(), lr=self.stage2_lr)
        for engine in (self.trainer, self.evaluator):
            if isinstance(engine, Workflow) and engine.network is not None:  # MONAI engines hold their network
                if unwrap(engine.network) is self.module and engine.network is not self.module:
                    engine.network = _rewrap(engine.network, self.module)
        self.stage = 2
        levels = self.module.network.levels
        if STEP_LEVELS.get(len(levels)) != levels:
            logger.warning(
                f"The stage-2 network has pyramid levels {levels}, not the standard {len(levels)}-step schedule "
                f"{STEP_LEVELS.get(len(levels))}: gradicon_network({len(levels)}) (e.g. inference.json) would build a "
                "different network for these weights. The paper protocol grows 3 steps (2, 1, 0) to 4 (2, 1, 0, 0)."
            )
        epoch = self.trainer.state.epoch if self.trainer is not None else "?"
        logger.info(
            f"GradICON stage 2 starts at epoch {epoch}: network grown from {before} to {self.module.num_steps} steps, "
            f"new {type(self.optimizer).__name__} (lr={self.optimizer.param_groups[0]['lr']})."
        )

    def state_dict(self) -> dict[str, int]:
        return {"stage": self.stage}

    def load_state_dict(self, state: dict) -> None:
        stage = int(state.get("stage", 1))
        if stage == 2 and self.stage == 1:
            self.switch()
        elif stage == 1 and self.stage == 2:
            raise ValueError("Cannot load a stage-1 checkpoint after the network was grown to stage 2.")
