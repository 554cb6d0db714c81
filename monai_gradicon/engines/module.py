"""The training module a MONAI ``SupervisedTrainer`` drives, and the loss picker.

``SupervisedTrainer`` computes ``pred = inferer(inputs, network, *args)`` and then ``loss_function(pred, targets)``.
With :class:`~monai_gradicon.engines.prepare.PairPrepareBatch` that is ``network(moving, fixed)``; the GradICON
objective already produces the loss, so :class:`GradICONTrainingModule` returns it inside a dict and
:func:`pick_loss` hands it to the trainer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from monai_gradicon.losses.objective import GradICONObjective
from monai_gradicon.losses.similarity import LNCCLoss, SquaredLNCCLoss, SSDLoss
from monai_gradicon.maps import map_to_ddf
from monai_gradicon.networks.registration import GradICONNetwork

__all__ = ["GradICONTrainingModule", "pick_loss", "similarity_loss", "SCALAR_KEYS"]

SCALAR_KEYS = ("loss", "similarity", "regularizer", "transform_magnitude", "folds_percent")
"""Per-iteration scalars in the module's output (0-d tensors; floats after MONAI decollation)."""


def similarity_loss(name: str = "lncc", sigma: float = 5.0) -> nn.Module:
    """The image similarity by name: ``"lncc"`` (GradICON, ``LNCCLoss(sigma)``), ``"squared_lncc"`` or ``"ssd"``."""
    name = str(name).lower()
    if name == "lncc":
        return LNCCLoss(sigma=sigma)
    if name in ("squared_lncc", "lncc2"):
        return SquaredLNCCLoss(sigma=sigma)
    if name in ("ssd", "mse"):
        return SSDLoss()
    raise ValueError(f"Unknown similarity {name!r}; choose 'lncc', 'squared_lncc' or 'ssd'.")


class GradICONTrainingModule(GradICONObjective):
    """``forward(moving, fixed) -> dict``: the GradICON objective in the form MONAI engines consume.

    The registration network is the attribute ``network`` (as in :class:`~monai_gradicon.GradICONDDFNet`), so the
    state dict of this module has exactly the keys ``network.steps.{i}.unet.*`` and a checkpoint of it loads into the
    export network and vice versa. The similarity has no parameters.

    Output keys (batch first):

    * ``loss``, ``similarity``, ``regularizer``, ``transform_magnitude``: 0-d tensors (``loss`` carries gradient);
    * ``folds_percent``: 0-d, folded cells of ``Phi_BA`` per batch element in percent of the voxels (the
      reference's ``flips / prod(shape) * 100``, the paper's %|J|<0);
    * ``warped``: ``[B, C, *S]`` moving image warped onto the fixed one (``A o Phi_AB``);
    * ``ddf``: ``[B, dim, *S]`` voxel displacement of ``Phi_AB`` on the fixed grid (MONAI ``Warp`` convention),
      only in ``eval()`` mode or with ``return_ddf_in_training=True`` (it is not needed for the loss).

    Args:
        network: the registration network (stage 1: 3 steps in the paper protocol).
        similarity: image loss module; default ``LNCCLoss(sigma=5)``.
        lmbda: weight of the inverse-consistency term (1.5).
        regularizer: ``"gradicon_sparse"`` (the released models), ``"gradicon"`` or ``"icon"``.
        padding_mode: ``"border"`` (GradICON) or ``"zeros"``.
        return_ddf_in_training: also return ``ddf`` in training mode (e.g. to log training images).
    """

    def __init__(
        self,
        network: GradICONNetwork,
        similarity: nn.Module | None = None,
        lmbda: float = 1.5,
        regularizer: str = "gradicon_sparse",
        padding_mode: str = "border",
        return_ddf_in_training: bool = False,
    ) -> None:
        if not isinstance(network, GradICONNetwork):
            raise TypeError(f"network must be a GradICONNetwork, got {type(network).__name__}.")
        super().__init__(network, similarity=similarity, lmbda=float(lmbda), regularizer=regularizer,
                         padding_mode=padding_mode)
        self.return_ddf_in_training = return_ddf_in_training

    @property
    def num_steps(self) -> int:
        return self.network.num_steps

    def grow(self) -> GradICONNetwork:
        """Stage 1 -> stage 2: replace ``network`` by ``network.with_final_step()`` (a new zero-initialised
        full-resolution step) and return it. The caller must give the optimizer the new parameters."""
        training = self.network.training
        self.network = self.network.with_final_step()
        self.network.train(training)
        return self.network

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        out = super().forward(moving, fixed)
        voxels = math.prod(int(s) for s in moving.shape[2:])
        result = {
            "loss": out.loss,
            "similarity": out.similarity.detach(),
            "regularizer": out.regularizer.detach(),
            "transform_magnitude": out.transform_magnitude.detach(),
            "folds_percent": out.folds.detach().to(moving.dtype) * (100.0 / voxels),
            "warped": out.warped_moving.detach(),
        }
        if not self.training or self.return_ddf_in_training:
            result["ddf"] = map_to_ddf(out.phi_ab.detach())
        return result


def pick_loss(pred: dict, target: object = None) -> torch.Tensor:
    """``loss_function`` for ``SupervisedTrainer``: the objective already computed the loss, take it from ``pred``."""
    if not isinstance(pred, dict) or "loss" not in pred:
        raise ValueError(
            "pick_loss expects the network output to be a dict with a 'loss' entry (use "
            "monai_gradicon.engines.GradICONTrainingModule as the trainer's network)."
        )
    return pred["loss"]
