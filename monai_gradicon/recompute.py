"""Activation checkpointing ("recompute in the backward pass") shared by the networks and the transforms.

Recomputed regions keep only their inputs for the backward pass and run again there. The numbers do not change (the
same deterministic forward ops run twice); what changes is peak memory and time. Two flags let layers behave during
the second run: :func:`is_recomputing` (BatchNorm must not update its running statistics twice) and
:func:`is_checkpointed` (a region inside a recomputed region does not checkpoint itself again).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager

from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_call", "is_checkpointed", "is_recomputing"]

class _RecomputeState(threading.local):
    """Per-thread state of the recomputation contexts (every field set here, for every thread)."""

    def __init__(self) -> None:
        self.recomputing = False
        self.checkpointed = 0


_STATE = _RecomputeState()


def is_recomputing() -> bool:
    """True while activation checkpointing recomputes a forward pass inside the backward pass."""
    return _STATE.recomputing


def is_checkpointed() -> bool:
    """True inside a function run by :func:`checkpoint_call` (its first run or its recomputation)."""
    return _STATE.checkpointed > 0 or is_recomputing()


@contextmanager
def _recompute_context():
    previous = is_recomputing()
    _STATE.recomputing = True
    try:
        yield
    finally:
        _STATE.recomputing = previous


@contextmanager
def _checkpointed_context():
    _STATE.checkpointed += 1
    try:
        yield
    finally:
        _STATE.checkpointed -= 1


def checkpoint_call(fn: Callable, *args):
    """``fn(*args)`` with activation checkpointing: nothing inside is kept for the backward pass, which runs ``fn``
    again. During that second run :func:`is_recomputing` is true, so BatchNorm layers do not update their running
    statistics a second time (the output is the same: training mode uses the batch statistics either way).
    Tensors ``fn`` reads from its closure receive their gradients as usual (non-reentrant checkpointing)."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (_checkpointed_context(), _recompute_context()))
