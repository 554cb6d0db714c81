"""Golden values produced by the released reference code (icon_registration 1.1.9, CPU, float32), reference notes §8.3.

These need no pretrained weights: the "network" is a fixed function of the two images, and the jitter is the first
``torch.randn`` after ``torch.manual_seed(0)``, exactly as in the runs that produced the numbers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_gradicon.losses import GradICONObjective, LNCCLoss, SSDLoss, SquaredLNCCLoss, gaussian_kernel1d
from monai_gradicon.networks import VectorFieldStep
from tolerance import assert_f32_close


class FixedDisplacement(nn.Module):
    """disp(a, b) = concat(0.05 (a - b), 0.03 (ab - b)[, 0.04 (a² - b)]) in normalized units."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        parts = [0.05 * (a - b), 0.03 * (a * b - b)]
        if a.ndim == 5:
            parts.append(0.04 * (a**2 - b))
        return torch.cat(parts, dim=1)


def golden_images(dim: int):
    n = 32 if dim == 2 else 12
    x = torch.arange(n, dtype=torch.float32) / (n - 1)
    if dim == 2:
        X, Y = torch.meshgrid(x, x, indexing="ij")
        a = torch.exp(-((X - 0.45) ** 2 + (Y - 0.5) ** 2) / 0.05)
        b = torch.exp(-((X - 0.55) ** 2 + (Y - 0.5) ** 2) / 0.06)
    else:
        X, Y, Z = torch.meshgrid(x, x, x, indexing="ij")
        a = torch.exp(-((X - 0.45) ** 2 + (Y - 0.5) ** 2 + (Z - 0.5) ** 2) / 0.05)
        b = torch.exp(-((X - 0.55) ** 2 + (Y - 0.5) ** 2 + (Z - 0.45) ** 2) / 0.06)
    return a[None, None], b[None, None]


CASES = [
    # dim, regularizer, similarity, lambda, padding, (all_loss, inverse_consistency, similarity, transform_magnitude)
    (2, "gradicon", SSDLoss(), 1.0, "border", (0.0294401, 0.00114403, 0.0282961, 3.01113e-5)),
    (2, "icon", SSDLoss(), 1.0, "border", (0.0283528, 5.66555e-5, 0.0282961, 3.01113e-5)),
    (2, "gradicon_sparse", LNCCLoss(3), 1.5, "border", (0.198511, 0.00110472, 0.196854, 3.01113e-5)),
    (3, "gradicon", SSDLoss(), 1.0, "border", (0.00985848, 0.000705921, 0.00915256, 1.24530e-5)),
    (3, "gradicon_sparse", LNCCLoss(2), 1.5, "border", (0.189513, 0.000552281, 0.188685, 1.24530e-5)),
    (3, "gradicon_sparse", LNCCLoss(2), 1.5, "zeros", (0.189511, 0.000552281, 0.188682, 1.24530e-5)),
]


@pytest.mark.parametrize("dim,regularizer,similarity,lmbda,padding,expected", CASES)
def test_objective_golden_values(dim, regularizer, similarity, lmbda, padding, expected):
    a, b = golden_images(dim)
    objective = GradICONObjective(
        VectorFieldStep(FixedDisplacement()), similarity, lmbda=lmbda, regularizer=regularizer, padding_mode=padding
    )
    torch.manual_seed(0)
    out = objective(a, b)
    got = (out.loss, out.regularizer, out.similarity, out.transform_magnitude)
    for name, value, want in zip(("all_loss", "regularizer", "similarity", "transform_magnitude"), got, expected):
        # the golden values are printed with 6 significant digits
        assert float(value) == pytest.approx(want, rel=2e-5), name
    assert float(out.folds) == 0


@pytest.mark.parametrize(
    "loss,expected",
    [(SSDLoss(), 0.0153082), (LNCCLoss(3), 0.1003901), (SquaredLNCCLoss(3), 0.1753047), (LNCCLoss(5), 0.0809489)],
)
def test_similarity_golden_values(loss, expected):
    a, b = golden_images(2)
    assert float(loss(a, b)) == pytest.approx(expected, rel=2e-6)


def test_gaussian_kernel_sigma5():
    k = gaussian_kernel1d(5)
    assert k.numel() == 21
    centre_out = [0.082718, 0.081081, 0.076359, 0.069092, 0.060066, 0.050171, 0.040263, 0.031045, 0.022999,
                  0.016370, 0.011195]
    assert torch.allclose(k[10:], torch.tensor(centre_out), atol=5e-7)  # the golden values have 6 decimals
    assert torch.allclose(k, k.flip(0))
    assert_f32_close(k.sum(), 1.0, ulps=k.numel())  # one rounding per summed tap


def test_fresh_network_is_identity_and_regularizer_zero():
    """A fresh network (zero last layers) gives identity maps: zero regularizer and similarity = 2 (1 - LNCC)."""
    from monai_gradicon.networks import gradicon_network

    net = gradicon_network(2, 2)
    a, b = golden_images(2)
    a = torch.nn.functional.interpolate(a, size=(40, 40), mode="bilinear", align_corners=True)
    b = torch.nn.functional.interpolate(b, size=(40, 40), mode="bilinear", align_corners=True)
    with torch.no_grad():
        out = GradICONObjective(net, LNCCLoss(5))(a, b)
    assert float(out.regularizer) == 0.0
    assert float(out.similarity) == pytest.approx(2 * float(LNCCLoss(5)(a, b)), rel=1e-6)
