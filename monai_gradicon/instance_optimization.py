"""Instance optimization (IO): fine-tune the whole network on one image pair, then put the weights back.

As in the reference (``itk_wrapper.finetune_execute``, icon_registration 1.1.9): every network weight is trained with
Adam (lr ``2e-5``) on the training objective (bidirectional similarity + lambda * GradICON-sparse, fresh jitter each
step) for the single pair at network resolution, with the network in ``eval()`` mode (BatchNorm uses its running
statistics; only its affine parameters train). The result is the transforms of one final ``no_grad`` forward pass.

Unlike reference version 1.1.7, the network's weights, buffers, ``requires_grad`` flags and train/eval mode are
always restored afterwards (also on error or Ctrl-C), and the jitter noise comes from a seeded generator, so
registering the same pair twice gives the same result. A step whose loss or gradients are not finite (a diverging
learning rate, broken inputs) stops IO with :class:`~monai_gradicon.errors.NonFiniteResultError` before it changes
the weights; the network is restored as always.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from monai_gradicon.coordinate_transforms import CoordinateTransform
from monai_gradicon.errors import NonFiniteResultError
from monai_gradicon.losses.objective import GradICONObjective

__all__ = ["InstanceOptimizationResult", "preserved_state", "instance_optimize", "DEFAULT_IO_LR", "DEFAULT_IO_STEPS"]

DEFAULT_IO_LR = 2e-5
DEFAULT_IO_STEPS = 50


@dataclass
class InstanceOptimizationResult:
    """Transforms after IO and the optimisation history.

    Attributes:
        phi_ab: fixed -> moving normalized coordinates (``sample(moving, phi_ab.on_grid(S)) ~ fixed``).
        phi_ba: moving -> fixed normalized coordinates.
        history: per step, the objective's scalars *before* that step's update (``loss``, ``similarity``,
            ``regularizer``, ``transform_magnitude``, ``folds``).
        seconds: wall time of the optimisation and the final forward pass.
    """

    phi_ab: CoordinateTransform
    phi_ba: CoordinateTransform
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@contextmanager
def preserved_state(network: nn.Module) -> Iterator[nn.Module]:
    """Restore ``network``'s parameters, buffers, ``requires_grad`` flags and train/eval modes on exit."""
    state = copy.deepcopy(network.state_dict())
    requires_grad = {name: p.requires_grad for name, p in network.named_parameters()}
    modes = {name: m.training for name, m in network.named_modules()}
    try:
        yield network
    finally:
        with torch.no_grad():
            network.load_state_dict(state)
        for name, p in network.named_parameters():
            p.requires_grad_(requires_grad[name])
        for name, m in network.named_modules():
            m.training = modes[name]


def instance_optimize(
    network: nn.Module,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    steps: int = DEFAULT_IO_STEPS,
    lr: float = DEFAULT_IO_LR,
    objective: GradICONObjective | None = None,
    seed: int = 0,
    progress: bool = True,
) -> InstanceOptimizationResult:
    """Fine-tune ``network`` on one pair and return the transforms; the network is unchanged afterwards.

    Args:
        network: a registration network, ``forward(moving, fixed) -> CoordinateTransform``.
        moving: ``[1, C, *n]`` moving image A at network resolution, preprocessed (intensities ~[0, 1]).
        fixed: ``[1, C, *n]`` fixed image B, same shape, on the same device as the network.
        steps: number of Adam steps (>= 1).
        lr: Adam learning rate (2e-5 as the reference).
        objective: the loss; default ``GradICONObjective(network)`` (LNCC sigma 5, lambda 1.5, GradICON-sparse,
            border padding). It must wrap ``network``.
        seed: seed of the jitter noise generator (identical runs give identical results).
        progress: show a tqdm progress bar.

    Returns:
        :class:`InstanceOptimizationResult` with the transforms of the fine-tuned network.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"Instance optimization needs a whole number of steps >= 1, got {steps!r} (use 0 / None "
                         "in register_pair to skip IO).")
    if not lr > 0:
        raise ValueError(f"The IO learning rate must be positive, got {lr}.")
    if objective is None:
        objective = GradICONObjective(network)
    elif objective.network is not network:
        raise ValueError("The IO objective must wrap the network being optimized.")
    generator = torch.Generator().manual_seed(int(seed))
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    with preserved_state(network):
        network.eval()  # BatchNorm: running statistics, as the reference (the loaded model is in eval mode)
        params = list(network.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        bar = tqdm(range(steps), desc="instance optimization", unit="step", disable=not progress, leave=False)
        for _ in bar:
            optimizer.zero_grad(set_to_none=True)
            out = objective(moving, fixed, generator=generator)
            out.loss.backward()
            scalars = out.scalars()
            finite_grads = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
            if not (torch.isfinite(out.loss.detach()) and finite_grads):
                terms = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())
                raise NonFiniteResultError(
                    f"Instance optimization diverged at step {len(history) + 1} of {steps} (lr {lr}): "
                    f"{'the loss' if finite_grads else 'a gradient'} is not finite ({terms}). The network was "
                    "restored; lower --io_lr or check the inputs."
                )
            optimizer.step()
            history.append(scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", sim=f"{scalars['similarity']:.4f}")
        bar.close()
        with torch.no_grad():
            phi_ab = network(moving, fixed)
            phi_ba = network(fixed, moving)
    return InstanceOptimizationResult(phi_ab, phi_ba, history, time.perf_counter() - start)
