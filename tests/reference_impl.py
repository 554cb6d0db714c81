"""Builders for the reference implementation (icon_registration 1.1.9), used only to compare numbers.

The reference's ``pretrained_models`` module imports itk, so the released tree is assembled here from its public
building blocks exactly as its ``make_network`` does (reference notes §4.2).
"""

from __future__ import annotations

import pytest

icon = pytest.importorskip("icon_registration", reason="the reference implementation is a test dependency")
from icon_registration import losses as ref_losses  # noqa: E402
from icon_registration import network_wrappers as ref_wrappers  # noqa: E402
from icon_registration import networks as ref_networks  # noqa: E402


def reference_tree(num_steps: int, dim: int = 3):
    """The reference registration tree with 1-4 tallUNet2 steps (random default init, zero last layers)."""

    def unet():
        return ref_wrappers.FunctionFromVectorField(ref_networks.tallUNet2(dimension=dim))

    if num_steps == 1:
        return unet()
    net = ref_wrappers.TwoStepRegistration(ref_wrappers.DownsampleRegistration(unet(), dimension=dim), unet())
    if num_steps == 2:
        return net
    net = ref_wrappers.TwoStepRegistration(ref_wrappers.DownsampleRegistration(net, dimension=dim), unet())
    if num_steps == 3:
        return net
    return ref_wrappers.TwoStepRegistration(net, unet())


def randomize_last_layers(module, generator, scale: float = 0.3) -> None:
    """Give every zero-initialised last conv random weights so the maps are not the identity."""
    import torch

    for name, p in module.named_parameters():
        if "lastConv" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * scale / (p[0].numel() ** 0.5))


def randomize_batchnorm_stats(module, generator) -> None:
    import torch

    for name, b in module.named_buffers():
        with torch.no_grad():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=generator) + 0.5)


def reference_loss(kind: str, network, similarity, lmbda: float, shape):
    """A reference loss module (``gradicon_sparse``, ``gradicon``, ``icon``) with its identity map assigned."""
    cls = {
        "gradicon_sparse": ref_losses.GradientICONSparse,
        "gradicon": ref_losses.GradientICON,
        "icon": ref_losses.InverseConsistentNet,
    }[kind]
    model = cls(network, similarity, lmbda)
    model.assign_identity_map([1, 1, *shape])
    return model
