"""Instance-optimization options of the Python API: the similarity by name, loss masking, a segmentation Dice term.

:func:`monai_gradicon.pipeline.register` takes ``io_objective``: a factory ``network -> GradICONObjective`` that
stage 3 calls after moving the network to its device, with the images already in the network's axis order. This
module builds such factories:

1. :func:`io_network_inputs` brings masks and label maps given on the images' original grids to the network grid,
   the way the pipeline prepares the images themselves (moving reoriented exactly to the fixed orientation for
   ``orientation="physical"``; resized to ``settings.file_order_shape``), with **nearest-neighbour** resizing as
   the reference does for masks (``icon_registration`` 1.1.9 ``register_pair_with_mask``). Label maps become one-hot
   channels of the labels present in both (background 0 excluded), as uniGradICON's Dice term. Tensors stay in the
   **file axis order** ``[1, C, *settings.file_order_shape]``.
2. :func:`io_objective_factory` makes the factory: ``similarity`` by name (``lncc`` = ``LNCCLoss(5)``, ``lncc2`` =
   ``SquaredLNCCLoss(5)``, ``mind`` = ``MINDSSCLoss(2, 2)``), loss masking with the two masks, a Dice term of weight
   ``dice_weight``; the factory puts the tensors in the network's axis order and on its device.

Example (the same Image objects go to both, so nothing is read twice)::

    fixed, moving = as_image("f.nii.gz"), as_image("m.nii.gz")
    fm, mm = as_image("f_mask.nii.gz"), as_image("m_mask.nii.gz")
    settings = resolve_settings(network.card, io_iterations=50)
    extra = io_network_inputs(fixed, moving, settings, fixed_mask=fm, moving_mask=mm)
    result = register(fixed, moving, network, fixed_mask=fm, moving_mask=mm, settings=settings,
                      io_objective=io_objective_factory("mind", network_inputs=extra, loss_masking=True))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from monai_gradicon.io import Image, as_image
from monai_gradicon.losses.objective import REGULARIZERS, GradICONObjective
from monai_gradicon.losses.similarity import IO_SIMILARITIES, similarity_from_name
from monai_gradicon.networks.registration import GradICONNetwork, to_network_axes
from monai_gradicon.pipeline.core import PairInputs, RegistrationSettings, orient_pair, read_pair
from monai_gradicon.pipeline.result import read_label_image

__all__ = ["IO_SIMILARITIES", "IONetworkInputs", "io_network_inputs", "io_objective_factory"]


@dataclass
class IONetworkInputs:
    """Masks and segmentations on the network grid for instance optimization.

    Attributes:
        fixed_mask, moving_mask: ``[1, 1, *settings.file_order_shape]`` float32 in {0, 1}, file axis order, or None.
        fixed_segmentation, moving_segmentation: one-hot ``[1, K, *file_order_shape]`` float32 (channel ``k`` =
            ``labels[k]``), file axis order, or None.
        labels: the labels of the one-hot channels (present in both label maps, 0 excluded).
        file_order_shape: the network grid in the file's axis order.
    """

    fixed_mask: torch.Tensor | None
    moving_mask: torch.Tensor | None
    fixed_segmentation: torch.Tensor | None
    moving_segmentation: torch.Tensor | None
    labels: tuple[int, ...]
    file_order_shape: tuple[int, ...]


def _nearest(array: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """``[*S]`` -> ``[1, 1, *shape]`` float32 by nearest neighbour (``F.interpolate(mode="nearest")``)."""
    t = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32))[None, None]
    return F.interpolate(t, size=tuple(int(s) for s in shape), mode="nearest")


def _label_map(obj: Any, image: Image, what: str) -> np.ndarray:
    labels = read_label_image(as_image(obj, what), what)
    if labels.shape != image.shape or not np.allclose(labels.affine, image.affine, atol=1e-3, rtol=1e-5):
        raise ValueError(f"The {what} (shape {labels.shape}) is not on its image's grid (shape {image.shape}, same "
                         "affine needed).")
    return np.asarray(labels.array).astype(np.int64)


def io_network_inputs(
    fixed: Any,
    moving: Any,
    settings: RegistrationSettings,
    *,
    fixed_mask: Any = None,
    moving_mask: Any = None,
    fixed_segmentation: Any = None,
    moving_segmentation: Any = None,
) -> IONetworkInputs:
    """Masks and/or label maps of a pair on the network grid (see the module docstring for how).

    Args:
        fixed, moving: the images (paths, :class:`~monai_gradicon.io.Image` or MetaTensors), for their geometry.
        settings: the registration's settings (orientation, network shape, axis order).
        fixed_mask, moving_mask: binary masks on their images' grids (nonzero = inside), both or neither.
        fixed_segmentation, moving_segmentation: integer label maps on their images' grids, both or neither.

    Raises:
        ValueError: one of a pair missing, a map off its image's grid, an empty mask, no shared label.
    """
    if (fixed_mask is None) != (moving_mask is None):
        raise ValueError("Loss masking needs both a fixed and a moving mask, or neither.")
    if (fixed_segmentation is None) != (moving_segmentation is None):
        raise ValueError("The Dice term needs both a fixed and a moving segmentation, or neither.")
    if fixed_mask is None and fixed_segmentation is None:
        raise ValueError("Give masks and/or segmentations; without them the default objective needs no inputs.")
    inputs = read_pair(fixed, moving, fixed_mask, moving_mask)  # checks masks: binary, non-empty, on their grids
    shape = settings.file_order_shape
    _, oriented_mask, _ = orient_pair(inputs, settings.orientation)
    f_mask = m_mask = f_seg = m_seg = None
    if fixed_mask is not None:
        f_mask = _nearest(inputs.fixed_mask, shape)
        m_mask = _nearest(oriented_mask, shape)
        for what, t in (("fixed", f_mask), ("moving", m_mask)):
            if not bool(t.any()):
                raise ValueError(f"The {what} mask vanished when resized to the network grid {shape}: it is "
                                 "smaller than one network voxel.")
    labels: tuple[int, ...] = ()
    if fixed_segmentation is not None:
        f_labels = _label_map(fixed_segmentation, inputs.fixed, "fixed segmentation")
        m_raw = _label_map(moving_segmentation, inputs.moving, "moving segmentation")
        # the moving label map gets the moving image's orientation change (the same exact permutation / flip)
        m_labels = orient_pair(PairInputs(inputs.fixed, inputs.moving, moving_mask=m_raw), settings.orientation)[1]
        f_small = _nearest(f_labels, shape).to(torch.int64)
        m_small = _nearest(m_labels, shape).to(torch.int64)
        shared = sorted(set(torch.unique(f_small).tolist()) & set(torch.unique(m_small).tolist()) - {0})
        if not shared:
            raise ValueError("The fixed and moving segmentations share no label (other than background 0) on the "
                             "network grid; the Dice term needs at least one.")
        labels = tuple(int(v) for v in shared)
        f_seg = torch.cat([(f_small == v).float() for v in labels], dim=1)
        m_seg = torch.cat([(m_small == v).float() for v in labels], dim=1)
    return IONetworkInputs(f_mask, m_mask, f_seg, m_seg, labels, shape)


def io_objective_factory(
    similarity: str = "lncc",
    *,
    network_inputs: IONetworkInputs | None = None,
    loss_masking: bool = False,
    dice_weight: float = 0.0,
    lmbda: float = 1.5,
    regularizer: str = "gradicon_sparse",
    padding_mode: str = "border",
) -> Callable[[GradICONNetwork], GradICONObjective]:
    """A factory ``network -> GradICONObjective`` for :func:`monai_gradicon.pipeline.register`'s ``io_objective``.

    Args:
        similarity: a name of :data:`IO_SIMILARITIES` (``lncc``, ``lncc2``, ``mind``).
        network_inputs: from :func:`io_network_inputs`; needed by ``loss_masking`` and ``dice_weight``.
        loss_masking: mask each similarity comparison with its target image's mask (needs both masks).
        dice_weight: weight of the soft Dice term on the warped one-hot segmentations (needs both segmentations).
        lmbda, regularizer, padding_mode: as :class:`~monai_gradicon.losses.objective.GradICONObjective` (defaults:
            the released models' 1.5, sparse GradICON, border padding).

    Everything is checked here, before any registration work.
    """
    if similarity not in IO_SIMILARITIES:
        raise ValueError(f"Unknown IO similarity {similarity!r}; choose one of {IO_SIMILARITIES}.")
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}.")
    if not isinstance(loss_masking, bool):
        raise ValueError(f"loss_masking must be True or False, got {loss_masking!r}.")
    if isinstance(dice_weight, bool) or not isinstance(dice_weight, (int, float)) or not dice_weight >= 0:
        raise ValueError(f"dice_weight must be a number >= 0, got {dice_weight!r}.")
    if loss_masking and (network_inputs is None or network_inputs.fixed_mask is None):
        raise ValueError("loss_masking needs network_inputs with both masks (io_network_inputs(..., fixed_mask=, "
                         "moving_mask=)).")
    if dice_weight > 0 and (network_inputs is None or network_inputs.fixed_segmentation is None):
        raise ValueError("dice_weight > 0 needs network_inputs with both segmentations (io_network_inputs(..., "
                         "fixed_segmentation=, moving_segmentation=)).")

    def make(network: GradICONNetwork) -> GradICONObjective:
        if not isinstance(network, GradICONNetwork):
            raise TypeError(f"network must be a GradICONNetwork, got {type(network).__name__}.")
        device = next(network.parameters()).device

        def prepared(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else to_network_axes(t, network.axis_order).to(device)

        masks = {}
        if loss_masking:
            masks = {"moving_mask": prepared(network_inputs.moving_mask),
                     "fixed_mask": prepared(network_inputs.fixed_mask)}
        segmentations = {}
        if dice_weight > 0:
            segmentations = {"moving_segmentation": prepared(network_inputs.moving_segmentation),
                             "fixed_segmentation": prepared(network_inputs.fixed_segmentation)}
        return GradICONObjective(network, similarity_from_name(similarity), lmbda=lmbda, regularizer=regularizer,
                                 padding_mode=padding_mode, dice_weight=float(dice_weight), **masks, **segmentations)

    return make
