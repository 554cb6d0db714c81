"""Transforms as functions of coordinates.

A registration network returns a :class:`CoordinateTransform` ``Phi_AB``: a callable that maps a tensor of normalized
coordinates ``[B, dim, *P]`` (points of the fixed image B) to the matching coordinates in the moving image A, so that
``sample(A, Phi_AB(id)) ~ B``. Transforms compose by evaluation, without resampling fields: ``(f o g)(x) = f(g(x))``.

They hold tensors only (no device): what they compute depends on their inputs alone. The one flag,
:class:`ComposedTransform`'s ``recompute_in_backward``, changes what is kept for the backward pass, not the values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monai_gradicon.maps import identity_map, sample
from monai_gradicon.recompute import checkpoint_call, is_checkpointed

__all__ = ["CoordinateTransform", "DisplacementTransform", "ComposedTransform", "AxisReversedTransform"]


class CoordinateTransform:
    """Base class: ``__call__(points [B, dim, *P]) -> [B, dim, *P]``, both in normalized [0, 1] coordinates."""

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def on_grid(self, spatial_shape: Sequence[int]) -> torch.Tensor:
        """The transform evaluated at every voxel of a grid: a map ``[B, dim, *spatial_shape]``."""
        ref = self._reference_tensor()
        return self(identity_map(spatial_shape, dtype=ref.dtype, device=ref.device))

    def _reference_tensor(self) -> torch.Tensor:
        raise NotImplementedError

    def __matmul__(self, inner: CoordinateTransform) -> ComposedTransform:
        """``outer @ inner`` is the composition ``outer o inner`` (``inner`` acts on the coordinates first)."""
        return ComposedTransform(self, inner)


class DisplacementTransform(CoordinateTransform):
    """``x -> x + u(x)`` for a displacement field ``u`` ``[B, dim, *S]`` in normalized units, interpolated
    (trilinear, ``align_corners=True``) with the given padding where ``x`` is off the field's grid."""

    def __init__(self, displacement: torch.Tensor, padding_mode: str = "border") -> None:
        if displacement.ndim - 2 != displacement.shape[1]:
            raise ValueError(
                f"A displacement field must be [B, dim, *S] with dim = len(S), got shape {tuple(displacement.shape)}."
            )
        self.displacement = displacement
        self.padding_mode = padding_mode

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return points + sample(self.displacement, points, padding_mode=self.padding_mode)

    def on_grid(self, spatial_shape: Sequence[int]) -> torch.Tensor:
        # On the field's own grid the interpolation is exact: add the field directly (as the reference does).
        if tuple(int(s) for s in spatial_shape) == tuple(self.displacement.shape[2:]):
            ref = self.displacement
            return identity_map(spatial_shape, dtype=ref.dtype, device=ref.device) + ref
        return super().on_grid(spatial_shape)

    def _reference_tensor(self) -> torch.Tensor:
        return self.displacement


class ComposedTransform(CoordinateTransform):
    """``outer o inner``: ``inner`` is applied to the coordinates first.

    Args:
        outer, inner: the transforms.
        recompute_in_backward: opt-in (default ``False``): when gradients are recorded, evaluating a composition of
            two or more displacement fields keeps only its input points (the fields are kept by whoever made them)
            and recomputes the intermediate points in the backward pass, instead of keeping a ``[B, *P, dim]`` grid
            per interpolation. Same values and gradients; at 175³ on 2 CPU cores it lowered the live peak of a
            training step by ~0.8 GB for ~3 s (~7%) more time, hence off by default. It applies to this composition
            only (compositions built with ``@`` leave it off); a
            :class:`~monai_gradicon.networks.GradICONNetwork` sets it on the compositions it returns with
            ``set_recompute_compositions(True)`` (``bench/`` mode ``lean``).
    """

    def __init__(
        self, outer: CoordinateTransform, inner: CoordinateTransform, recompute_in_backward: bool = False
    ) -> None:
        self.outer = outer
        self.inner = inner
        self.recompute_in_backward = bool(recompute_in_backward)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        if self._recompute():
            return checkpoint_call(self._evaluate, points)
        return self._evaluate(points)

    def _evaluate(self, points: torch.Tensor) -> torch.Tensor:
        return self.outer(self.inner(points))

    def on_grid(self, spatial_shape: Sequence[int]) -> torch.Tensor:
        shape = tuple(int(s) for s in spatial_shape)
        if self._recompute():
            return checkpoint_call(lambda: self._on_grid(shape))
        return self._on_grid(shape)

    def _on_grid(self, spatial_shape: Sequence[int]) -> torch.Tensor:
        return self.outer(self.inner.on_grid(spatial_shape))

    def _fields(self) -> list[torch.Tensor]:
        out = []
        for part in (self.outer, self.inner):
            if isinstance(part, ComposedTransform):
                out += part._fields()
            elif isinstance(part, DisplacementTransform):
                out.append(part.displacement)
            else:
                return []  # an unknown kind of transform: do not assume anything about it
        return out

    def _recompute(self) -> bool:
        if not (self.recompute_in_backward and torch.is_grad_enabled()) or is_checkpointed():
            return False
        fields = self._fields()
        return len(fields) >= 2 and any(f.requires_grad for f in fields)

    def _reference_tensor(self) -> torch.Tensor:
        return self.inner._reference_tensor()


class AxisReversedTransform(CoordinateTransform):
    """A transform seen with the order of the spatial axes reversed: points ``[B, dim, *P]`` in one axis order have
    their coordinate channels reversed, ``inner`` is evaluated, and its output channels are reversed back.

    This expresses a network's transform in the file's axis order when the network saw the arrays with their axes
    reversed (the reference order). Evaluation is pointwise, so the layout of ``P`` needs no change.
    """

    def __init__(self, inner: CoordinateTransform) -> None:
        self.inner = inner

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return self.inner(points.flip(1)).flip(1)

    def _reference_tensor(self) -> torch.Tensor:
        return self.inner._reference_tensor()
