"""Training never trains on, and never saves, a non-finite or diverged model.

:class:`NonFiniteGuard` runs after every backward pass and **before** the optimizer step (MONAI's
``IterationEvents.BACKWARD_COMPLETED``): when the loss is not finite, exceeds ``loss_limit`` or a gradient is not
finite, the gradients are dropped so the step changes nothing (Adam skips parameters without a gradient), the
buffers the forward pass updated (BatchNorm running statistics) are put back as they were, and after
more than ``patience`` such iterations in a row training stops with :class:`NonFiniteTrainingError`, naming the
iteration and the loss terms. The weights, ``models/model.pt`` and the resumable checkpoint are therefore those of
the last good iteration. Optionally it clips the gradient norm of good iterations (``grad_clip_norm``).

:func:`check_finite_state` is the last line of defence of every writer of weights: a state dict with a non-finite
tensor is never written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["NonFiniteGuard", "NonFiniteTrainingError", "check_finite_state"]

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training produced a non-finite or diverged loss or gradient for too many iterations in a row."""


def check_finite_state(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteTrainingError` if a floating tensor of ``state`` holds NaN or infinity."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteTrainingError(
            f"Refusing to write {what}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}). The files written before are kept."
        )


def _scalar(value: Any) -> float | None:
    if torch.is_tensor(value) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, (int, float)):
        return float(value)
    return None


class NonFiniteGuard:
    """Skip the optimizer step of a bad iteration; stop training after too many bad iterations in a row.

    Args:
        patience: how many bad iterations in a row are skipped before training stops (0: stop at the first).
        loss_limit: a finite loss above this counts as diverged (GradICON's loss is about 0-4 for images in [0, 1];
            a diverging learning rate drives it to 1e10 and beyond).
        grad_clip_norm: if set, the total gradient norm of good iterations is clipped to it
            (``torch.nn.utils.clip_grad_norm_``); ``None`` leaves the gradients as they are (the paper's protocol).
    """

    def __init__(self, patience: int = 3, loss_limit: float = 1e4, grad_clip_norm: float | None = None) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a whole number >= 0, got {patience!r}.")
        if not (isinstance(loss_limit, (int, float)) and loss_limit > 0):
            raise ValueError(f"loss_limit must be a positive number, got {loss_limit!r}.")
        if grad_clip_norm is not None and not (isinstance(grad_clip_norm, (int, float)) and grad_clip_norm > 0):
            raise ValueError(f"grad_clip_norm must be a positive number or null, got {grad_clip_norm!r}.")
        self.patience = patience
        self.loss_limit = float(loss_limit)
        self.grad_clip_norm = grad_clip_norm
        self.bad_in_a_row = 0
        self.skipped: list[int] = []
        self._buffers: dict[str, torch.Tensor] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._keep_buffers)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def _keep_buffers(self, engine: Engine) -> None:
        """The buffers before the forward pass (BatchNorm statistics and counters: a few kB), to undo a bad one."""
        self._buffers = {n: b.detach().clone() for n, b in engine.network.named_buffers()}

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        loss = _scalar(output.get("loss")) if isinstance(output, Mapping) else None
        params = [p for p in engine.network.parameters() if p.grad is not None]
        problem = None
        if loss is None or not math.isfinite(loss):
            problem = f"the loss is {loss}"
        elif abs(loss) > self.loss_limit:
            problem = f"the loss {loss:.4g} exceeds loss_limit {self.loss_limit:.4g} (diverged)"
        elif not all(bool(torch.isfinite(p.grad).all()) for p in params):
            problem = "a gradient is not finite"
        if problem is None:
            self.bad_in_a_row = 0
            if self.grad_clip_norm is not None and params:
                torch.nn.utils.clip_grad_norm_(params, float(self.grad_clip_norm))
            return
        for p in params:  # the optimizer step of this iteration changes nothing
            p.grad = None
        with torch.no_grad():  # nor do the running statistics its forward pass updated
            for name, buffer in engine.network.named_buffers():
                if name in self._buffers:
                    buffer.copy_(self._buffers[name])
        self.bad_in_a_row += 1
        iteration = int(engine.state.iteration)
        self.skipped.append(iteration)
        terms = self._terms(output)
        if self.bad_in_a_row > self.patience:
            raise NonFiniteTrainingError(
                f"Training stopped at iteration {iteration} (epoch {engine.state.epoch}): {problem} ({terms}) for "
                f"{self.bad_in_a_row} iteration(s) in a row (patience {self.patience}). The weights were not updated "
                "by these iterations: models/model.pt and the resumable checkpoint hold the last good state. Check "
                "the data for NaN / extreme values, or lower the learning rate (grad_clip_norm can help)."
            )
        logger.warning(f"Iteration {iteration}: {problem} ({terms}); optimizer step skipped "
                       f"({self.bad_in_a_row} of at most {self.patience} in a row).")

    @staticmethod
    def _terms(output: Any) -> str:
        pred = output.get("pred") if isinstance(output, Mapping) else None
        if not isinstance(pred, Mapping):
            return "no loss terms"
        parts = []
        for key in ("similarity", "regularizer", "transform_magnitude"):
            value = _scalar(pred.get(key))
            if value is not None:
                parts.append(f"{key} {value:.4g}")
        return ", ".join(parts) or "no loss terms"
