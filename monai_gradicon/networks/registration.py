"""Multi-step, multi-resolution GradICON registration networks.

A step is a UNet2 that predicts a displacement field at one pyramid level (0 = full resolution, level L = the images
average-pooled L times with ``kernel 2, ceil_mode=True``). Steps run coarse to fine: each step sees the *original*
moving image at its level warped by the composition of all previous steps, and the fixed image at its level. The
result is the composition ``Phi = Phi_1 o Phi_2 o ... o Phi_n`` (the last, finest step acts on the coordinates first).

This is exactly the reference's tree ``TwoStep(Downsample(TwoStep(Downsample(U1), U2)), U3)`` (+ ``TwoStep(., U4)``):

==========  ===============  =====================================================
steps       levels           reference
==========  ===============  =====================================================
1           (0,)             ``U1``
2           (1, 0)           ``TwoStep(Downsample(U1), U2)``
3           (2, 1, 0)        stage 1: U1 @ N/4, U2 @ N/2, U3 @ N
4           (2, 1, 0, 0)     stage 2: stage 1 plus U4 @ N (the released models)
==========  ===============  =====================================================

The coarse grids are ``[0, 1]`` grids of the pooled size, so a coarse voxel j sits at ``j / (n - 1)`` while its pooled
support is centred at ``(2j + 0.5) / (N - 1)``. The released weights were trained with this offset; it is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_gradicon.coordinate_transforms import (
    AxisReversedTransform,
    ComposedTransform,
    CoordinateTransform,
    DisplacementTransform,
)
from monai_gradicon.maps import map_to_ddf, sample
from monai_gradicon.model_card import CardError, ModelCard
from monai_gradicon.networks.unet2 import DOWN_CHANNELS, UP_CHANNELS, UNet2, unet2_min_size
from monai_gradicon.recompute import checkpoint_call, is_recomputing

__all__ = [
    "VectorFieldStep",
    "DownsampleStep",
    "TwoStepRegistration",
    "GradICONNetwork",
    "GradICONDDFNet",
    "STEP_LEVELS",
    "PRESET_SHAPES",
    "gradicon_network",
    "gradicon_preset",
    "downsample",
    "min_input_size",
    "to_network_axes",
    "file_order_transform",
    "map_to_file_order",
]

STEP_LEVELS: dict[int, tuple[int, ...]] = {1: (0,), 2: (1, 0), 3: (2, 1, 0), 4: (2, 1, 0, 0)}
"""Pyramid level of each UNet for the 1- to 4-step models."""

PRESET_SHAPES: dict[str, tuple[int, ...]] = {
    "lung": (175, 175, 175),
    "brain": (130, 155, 130),
    "knee": (80, 192, 192),
    "unigradicon": (175, 175, 175),
    "multigradicon": (175, 175, 175),
}
"""Network input shapes of the released models (array order)."""


def downsample(image: torch.Tensor) -> torch.Tensor:
    """Halve ``[B, C, *S]`` with a 2-voxel average pool, ``ceil_mode=True`` (size N -> ceil(N / 2))."""
    pool = F.avg_pool3d if image.ndim == 5 else F.avg_pool2d
    return pool(image, 2, ceil_mode=True)


def to_network_axes(images: torch.Tensor, axis_order: str) -> torch.Tensor:
    """Present ``[B, C, *S]`` images (file voxel order) in a network's axis order: unchanged for ``"file"``, the
    spatial axes reversed for ``"reference"`` (file ``(i, j, k)`` -> network ``(k, j, i)``, ITK's numpy order)."""
    if axis_order == "file":
        return images
    if axis_order != "reference":
        raise ValueError(f"axis_order must be 'reference' or 'file', got {axis_order!r}.")
    spatial = list(range(2, images.ndim))
    return images.permute(0, 1, *spatial[::-1]).contiguous()


def map_to_file_order(phi: torch.Tensor, axis_order: str) -> torch.Tensor:
    """A map ``[B, dim, *S_network]`` on a network's grid (its axis order) as a map on the file-order grid
    ``[B, dim, *S_file]``: for ``"reference"`` the spatial axes and the coordinate channels are reversed (exact, no
    interpolation)."""
    if axis_order == "file":
        return phi
    return to_network_axes(phi, axis_order).flip(1)


def file_order_transform(transform: CoordinateTransform, axis_order: str) -> CoordinateTransform:
    """A network's transform (normalized coordinates in its axis order) expressed in the file's axis order."""
    if axis_order == "file":
        return transform
    if axis_order != "reference":
        raise ValueError(f"axis_order must be 'reference' or 'file', got {axis_order!r}.")
    return AxisReversedTransform(transform)


def min_input_size(levels: Sequence[int], num_unet_levels: int = 5) -> int:
    """Smallest axis size accepted by a network whose coarsest step runs at pyramid level ``max(levels)``.

    Every UNet2 needs ``unet2_min_size`` (17) voxels at its own level, hence 17, 33 and 65 for levels 0, 1, 2.
    """
    return (unet2_min_size(num_unet_levels) - 1) * 2 ** max(levels) + 1


class VectorFieldStep(nn.Module):
    """One registration step: ``forward(moving, fixed) -> x + u(x)`` with ``u = unet(moving, fixed)``.

    Args:
        unet: a module mapping ``(moving [B, c, *S], fixed [B, c, *S])`` to a displacement ``[B, dim, *S]`` in
            normalized [0, 1] units.
        level: pyramid level this step runs at inside a :class:`GradICONNetwork` (0 = input resolution).
        padding_mode: how the field is extended beyond its grid when evaluated off-grid ("border" as the reference).
    """

    def __init__(self, unet: nn.Module, level: int = 0, padding_mode: str = "border") -> None:
        super().__init__()
        self.unet = unet
        self.level = int(level)
        self.padding_mode = padding_mode

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> DisplacementTransform:
        return DisplacementTransform(self.unet(moving, fixed), padding_mode=self.padding_mode)


class DownsampleStep(nn.Module):
    """Run a registration module on both images halved by :func:`downsample`; its transform is returned unchanged
    (normalized coordinates make a coarse transform valid on the fine grid)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> CoordinateTransform:
        return self.inner(downsample(moving), downsample(fixed))


class TwoStepRegistration(nn.Module):
    """``first`` registers the pair; ``second`` registers the moving image warped by it to the fixed image; the
    result is ``Phi_first o Phi_second``. Composable building block for custom trees; :class:`GradICONNetwork`
    computes the same thing for the standard step schedules."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> CoordinateTransform:
        phi = self.first(moving, fixed)
        warped = sample(moving, phi.on_grid(moving.shape[2:]))
        return phi @ self.second(warped, fixed)


class GradICONNetwork(nn.Module):
    """The GradICON registration network: ``forward(moving, fixed) -> Phi`` (a :class:`CoordinateTransform`).

    ``Phi`` maps normalized coordinates of the fixed image to normalized coordinates of the moving image, so
    ``sample(moving, Phi.on_grid(fixed.shape[2:]))`` is the moving image warped onto the fixed one.

    Args:
        spatial_dims: 2 or 3.
        levels: pyramid level of each step, coarse to fine (see :data:`STEP_LEVELS`).
        input_shape: the spatial shape images are resized to before registration (e.g. ``(175, 175, 175)`` for
            lung). The network itself accepts any shape whose axes reach :attr:`min_size`; this attribute records
            the shape the weights were trained at, for pipelines.
        in_channels: channels per image.
        checkpointing: activation checkpointing (less memory, same numbers, about one more forward pass of time):
            each step -- the warp of its input by the previous steps and its UNet -- keeps only its displacement
            field for the backward pass and is recomputed there.
        card: the :class:`~monai_gradicon.model_card.ModelCard` (axis order, preprocessing, ...). It is stored in the
            persistent buffer ``model_card`` and so travels inside every state dict; loading a weight file replaces
            it with the file's. Default: the reference axis order, this structure and ``input_shape``, preprocessing
            unknown. Its structural fields must agree with the arguments.
        down_channels, up_channels: UNet2 widths (the released models': :data:`~monai_gradicon.networks.unet2.DOWN_CHANNELS`,
            :data:`~monai_gradicon.networks.unet2.UP_CHANNELS`; slimmer for tests and demos).
        recompute_compositions: opt-in (default ``False``): the compositions of the steps' fields -- the returned
            ``Phi`` and the warps between steps -- are built with ``ComposedTransform(..., recompute_in_backward=True)``
            (intermediate points recomputed in the backward pass: less memory, same numbers). Also
            :meth:`set_recompute_compositions`.

    Other performance switches (each UNet2's attributes, set through these methods): :meth:`set_checkpointing`,
    :meth:`set_channels_last`, :meth:`set_mixed_precision`, :meth:`compile_unets`.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        levels: Sequence[int] = STEP_LEVELS[4],
        input_shape: Sequence[int] | None = None,
        in_channels: int = 1,
        checkpointing: bool = False,
        card: ModelCard | None = None,
        down_channels: Sequence[int] = DOWN_CHANNELS,
        up_channels: Sequence[int] = UP_CHANNELS,
        recompute_compositions: bool = False,
    ) -> None:
        super().__init__()
        levels = tuple(int(v) for v in levels)
        if not levels or any(b > a for a, b in zip(levels, levels[1:])) or min(levels) < 0:
            raise ValueError(f"levels must be a non-empty, non-increasing sequence of levels >= 0, got {levels}.")
        if input_shape is not None and len(input_shape) != spatial_dims:
            raise ValueError(f"input_shape {tuple(input_shape)} does not have {spatial_dims} spatial dimensions.")
        self.spatial_dims = spatial_dims
        self.levels = levels
        self.in_channels = in_channels
        self.steps = nn.ModuleList(
            [VectorFieldStep(UNet2(spatial_dims, in_channels, down_channels, up_channels), level=lv) for lv in levels]
        )
        self.checkpointing = bool(checkpointing)
        self.recompute_compositions = bool(recompute_compositions)
        if card is None:
            card = ModelCard(
                input_shape=tuple(input_shape) if input_shape is not None else None,
                num_steps=len(levels),
                spatial_dims=spatial_dims,
                in_channels=in_channels,
            )
        elif input_shape is not None and card.input_shape is not None and tuple(input_shape) != card.input_shape:
            raise CardError(f"input_shape {tuple(input_shape)} contradicts the card's {card.input_shape}.")
        elif input_shape is not None and card.input_shape is None:
            card = card.replace(input_shape=tuple(input_shape))
        self.register_buffer("model_card", torch.zeros(0, dtype=torch.uint8), persistent=True)
        self.card = card

    @property
    def card(self) -> ModelCard:
        """The model card (parsed from the ``model_card`` buffer, so it is the loaded weight file's)."""
        return ModelCard.from_tensor(self.model_card, "the network's model card")

    @card.setter
    def card(self, card: ModelCard) -> None:
        self.check_card(card)
        self.model_card = card.to_tensor().to(self.model_card.device)

    def check_card(self, card: ModelCard, source: str = "the model card") -> None:
        """Raise :class:`~monai_gradicon.model_card.CardError` if ``card`` contradicts this network's structure."""
        problems = []
        if card.spatial_dims != self.spatial_dims:
            problems.append(f"spatial_dims {card.spatial_dims} vs the network's {self.spatial_dims}")
        if card.in_channels != self.in_channels:
            problems.append(f"in_channels {card.in_channels} vs the network's {self.in_channels}")
        if card.num_steps is not None and card.num_steps != self.num_steps:
            problems.append(f"num_steps {card.num_steps} vs the network's {self.num_steps}")
        if card.input_shape is not None and min(card.input_shape) < self.min_size:
            problems.append(
                f"input_shape {card.input_shape} is below the minimum of {self.min_size} voxels per axis for a "
                f"{self.num_steps}-step network"
            )
        if problems:
            raise CardError(f"{source} does not fit this network: " + "; ".join(problems) + ".")

    @property
    def unet_channels(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(down_channels, up_channels)`` of the steps' UNet2s."""
        unet = self.steps[0].unet
        return tuple(unet.down_channels), tuple(unet.up_channels)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The shape images are resized to, in the network's axis order (from the card)."""
        return self.card.input_shape

    @property
    def axis_order(self) -> str:
        """How the network sees an image's voxel axes (from the card): ``"reference"`` or ``"file"``."""
        return self.card.axis_order

    def register_file_order(self, moving: torch.Tensor, fixed: torch.Tensor) -> CoordinateTransform:
        """``Phi_AB`` for images given in the **file's** voxel axis order ``[B, C, *S]``: they are shown to the
        network in its axis order (:func:`to_network_axes` with the card's) and the transform is returned in the
        file's axis order (normalized coordinates of the ``[*S]`` grid)."""
        order = self.axis_order
        return file_order_transform(self(to_network_axes(moving, order), to_network_axes(fixed, order)), order)

    @property
    def min_size(self) -> int:
        """Smallest size per spatial axis this network accepts."""
        return min_input_size(self.levels)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def set_checkpointing(self, enabled: bool) -> None:
        """Switch activation checkpointing (see the class docstring) on or off."""
        self.checkpointing = bool(enabled)
        for step in self.steps:  # the step-level recomputation already covers the UNets
            if isinstance(step.unet, UNet2):
                step.unet.checkpointing = False

    def set_recompute_compositions(self, enabled: bool) -> None:
        """Switch the recomputation of composition points in the backward pass on or off (``recompute_compositions``
        in the class docstring); it applies to the transforms returned from then on."""
        self.recompute_compositions = bool(enabled)

    def set_channels_last(self, enabled: bool | None) -> None:
        """Set every UNet's ``channels_last`` switch (see :class:`UNet2`): ``None`` automatic (on for 3D float32 CPU,
        maps to float32 rounding), ``False`` the reference's exact forward operations (bit-identical maps in
        training, slower on CPU; CPU inference still computes the small deep transposed convolutions as matrix
        products, see :mod:`~monai_gradicon.networks.cpu_kernels`)."""
        for step in self.steps:
            if isinstance(step.unet, UNet2):
                step.unet.channels_last = enabled

    def set_mixed_precision(self, dtype: torch.dtype | None = torch.bfloat16) -> None:
        """Opt-in reduced precision: set every UNet's ``autocast_dtype``, i.e. run the UNet bodies under
        ``torch.autocast(dtype)`` (``None`` switches it off).

        Only the UNet bodies change precision; each UNet's last convolution (the displacement), the warps, the
        compositions and the losses stay float32. This changes the numbers (``bench/RESULTS.md`` reports by how
        much); it is off by default.
        """
        for step in self.steps:
            if isinstance(step.unet, UNet2):
                step.unet.autocast_dtype = dtype

    def compile_unets(self, **kwargs) -> None:
        """Opt-in: compile every UNet's down and up paths with ``torch.compile(**kwargs)`` (``UNet2.compile_body``,
        which sets its ``compiled_body``; needs a C++ compiler on CPU; the first calls at each new shape are slow)."""
        for step in self.steps:
            if isinstance(step.unet, UNet2):
                step.unet.compile_body(**kwargs)

    def check_pair(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem if the pair cannot be registered (shape checks only)."""
        expected = 2 + self.spatial_dims
        for name, t in (("moving", moving), ("fixed", fixed)):
            if t.ndim != expected:
                raise ValueError(
                    f"{name} image must be a {self.spatial_dims}D batch [B, C, *spatial] ({expected} dims) for this "
                    f"{self.spatial_dims}D network, got shape {tuple(t.shape)}."
                )
            if t.shape[1] != self.in_channels:
                raise ValueError(f"{name} image must have {self.in_channels} channel(s), got shape {tuple(t.shape)}.")
        if moving.shape != fixed.shape:
            raise ValueError(
                f"moving and fixed images must have the same shape (resample them to the network shape first), got "
                f"{tuple(moving.shape)} and {tuple(fixed.shape)}."
            )
        if min(moving.shape[2:]) < self.min_size:
            raise ValueError(
                f"spatial shape {tuple(moving.shape[2:])} is below the minimum of {self.min_size} voxels per axis for "
                f"a {self.num_steps}-step network."
            )

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> CoordinateTransform:
        self.check_pair(moving, fixed)
        pyramid_m, pyramid_f = [moving], [fixed]
        for _ in range(max(self.levels)):
            pyramid_m.append(downsample(pyramid_m[-1]))
            pyramid_f.append(downsample(pyramid_f[-1]))
        recompute = self.checkpointing and torch.is_grad_enabled() and not is_recomputing()
        fields: list[torch.Tensor] = []
        for i, step in enumerate(self.steps):
            m, f = pyramid_m[step.level], pyramid_f[step.level]
            if recompute:
                fields.append(checkpoint_call(self._step_displacement, i, m, f, *fields))
            else:
                fields.append(self._step_displacement(i, m, f, *fields))
        return self._compose(fields)

    def _compose(self, fields: Sequence[torch.Tensor]) -> CoordinateTransform:
        """``Phi_1 o ... o Phi_k`` for the displacement fields of the first ``k`` steps."""
        phi: CoordinateTransform | None = None
        for step, u in zip(self.steps, fields):
            psi = DisplacementTransform(u, padding_mode=step.padding_mode)
            phi = psi if phi is None else ComposedTransform(phi, psi, recompute_in_backward=self.recompute_compositions)
        assert phi is not None
        return phi

    def _step_displacement(self, i: int, moving: torch.Tensor, fixed: torch.Tensor, *previous: torch.Tensor):
        """Step ``i``'s displacement: its UNet on the moving image warped by the previous steps, and the fixed one."""
        if previous:
            moving = sample(moving, self._compose(previous).on_grid(moving.shape[2:]))
        return self.steps[i](moving, fixed).displacement

    def with_final_step(self) -> GradICONNetwork:
        """A copy with one more full-resolution step appended (stage 1 -> stage 2 of the training protocol).

        The new step's last layer is zero, so the new network starts exactly at this network's solution.
        """
        new = GradICONNetwork(
            self.spatial_dims, (*self.levels, 0), None, self.in_channels,
            checkpointing=self.checkpointing, card=self.card.replace(num_steps=self.num_steps + 1),
            down_channels=self.unet_channels[0], up_channels=self.unet_channels[1],
            recompute_compositions=self.recompute_compositions,
        )
        for dst, src in zip(new.steps, self.steps):
            dst.load_state_dict(copy.deepcopy(src.state_dict()))
        first = self.steps[0].unet
        if isinstance(first, UNet2) and first.autocast_dtype is not None:
            new.set_mixed_precision(first.autocast_dtype)
        return new.to(next(self.parameters()).device)


class GradICONDDFNet(nn.Module):
    """Tensor-to-tensor export network for MONAI tools (``verify_net_in_out``, ``ckpt_export``, MONAI Label).

    ``forward(x [B, 2c, *S]) -> ddf [B, dim, *S]``: channels ``[:c]`` are the moving image and ``[c:]`` the fixed
    image, both already preprocessed and resized to the network shape, **in the file's voxel axis order** (as MONAI
    ``LoadImage`` gives them; ``S`` is the card's ``file_order_shape``). The network sees them in its own axis order
    (the model card's, applied inside), and the output is the displacement of ``Phi_AB`` in **voxels** of the
    ``[*S]`` grid, channel ``k`` along array axis ``k`` (MONAI ``Warp`` convention: ``warped = Warp()(moving, ddf)``).
    The wrapped network is stored as ``network`` so checkpoints of the training wrapper load here too.
    """

    def __init__(self, network: GradICONNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.network.in_channels
        if x.ndim != 2 + self.network.spatial_dims or x.shape[1] != 2 * c:
            raise ValueError(
                f"GradICONDDFNet expects [B, {2 * c}, *spatial] (moving and fixed stacked on the channel axis), "
                f"got shape {tuple(x.shape)}."
            )
        order = self.network.axis_order
        moving, fixed = to_network_axes(x[:, :c], order), to_network_axes(x[:, c:], order)
        phi = self.network(moving, fixed).on_grid(moving.shape[2:])
        return map_to_ddf(map_to_file_order(phi, order))


def gradicon_network(
    num_steps: int = 4,
    spatial_dims: int = 3,
    input_shape: Sequence[int] | None = None,
    in_channels: int = 1,
    checkpointing: bool = False,
    axis_order: str = "reference",
    preprocessing: str | None = None,
    modality: str | None = None,
    name: str | None = None,
    down_channels: Sequence[int] = DOWN_CHANNELS,
    up_channels: Sequence[int] = UP_CHANNELS,
) -> GradICONNetwork:
    """Build a 1- to 4-step GradICON network (levels from :data:`STEP_LEVELS`) with its model card.

    ``axis_order``, ``preprocessing``, ``modality`` and ``name`` go into the card (see
    :mod:`monai_gradicon.model_card`): how the network will be trained and must be used.
    """
    if num_steps not in STEP_LEVELS:
        raise ValueError(f"num_steps must be one of {sorted(STEP_LEVELS)}, got {num_steps}.")
    card = ModelCard(
        axis_order=axis_order,
        input_shape=tuple(input_shape) if input_shape is not None else None,
        num_steps=num_steps,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        preprocessing=preprocessing,
        modality=modality,
        name=name,
    )
    return GradICONNetwork(spatial_dims, STEP_LEVELS[num_steps], None, in_channels, checkpointing, card=card,
                           down_channels=down_channels, up_channels=up_channels)


PRESET_CARDS: dict[str, dict] = {
    "lung": {"preprocessing": "lung_ct", "modality": "ct"},
    "brain": {"preprocessing": "brain", "modality": "mri"},
    "knee": {"preprocessing": None, "modality": "mri"},
    "unigradicon": {"preprocessing": None, "modality": None},
    "multigradicon": {"preprocessing": None, "modality": None},
}


def gradicon_preset(name: str, num_steps: int = 4, checkpointing: bool = False) -> GradICONNetwork:
    """The network of a released model: ``"lung"``, ``"brain"``, ``"knee"``, ``"unigradicon"``, ``"multigradicon"``
    (the reference axis order, its input shape and, where one applies, its preprocessing in the card)."""
    if name not in PRESET_SHAPES:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESET_SHAPES)}.")
    return gradicon_network(num_steps, 3, PRESET_SHAPES[name], checkpointing=checkpointing, **PRESET_CARDS[name])
