"""Tolerances stated in float32 rounding units, so one CPU's rounding passes where another's does.

Two float32 computations of the same quantity that differ only in the order of their roundings (another summation
order, a fused multiply-add, a different vector width) differ by a few units of float32 rounding *at the magnitude
of the quantity*: ``ulps * EPS32 * scale``. Every tolerance of a float32 comparison in these tests is written that
way, with the number of rounding steps it allows, instead of an absolute epsilon.
"""

from __future__ import annotations

import numpy as np
import torch

EPS32 = float(torch.finfo(torch.float32).eps)
"""2**-23 (about 1.19e-7): the spacing of float32 numbers in [1, 2), i.e. one rounding step relative to 1."""


def f32_tolerance(scale: float, ulps: float) -> float:
    """``ulps`` float32 rounding steps at magnitude ``scale``."""
    return float(ulps) * EPS32 * float(scale)


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def assert_f32_close(actual, expected, ulps: float = 4, scale: float | None = None, what: str = "") -> None:
    """``max |actual - expected| <= ulps * EPS32 * scale``; ``scale`` defaults to ``max |expected|`` (the magnitude
    whose rounding is compared). The message gives the difference in rounding steps."""
    a, e = _as_float64(actual), _as_float64(expected)
    assert a.shape == e.shape, f"{what} shapes differ: {a.shape} vs {e.shape}"
    if scale is None:
        scale = float(np.abs(e).max()) if e.size else 0.0
    scale = max(float(scale), np.finfo(np.float32).tiny)
    err = float(np.abs(a - e).max()) if a.size else 0.0
    allowed = f32_tolerance(scale, ulps)
    assert err <= allowed, (
        f"{what + ': ' if what else ''}max |diff| {err:.3g} is {err / (EPS32 * scale):.1f} float32 rounding steps at "
        f"magnitude {scale:.3g}; allowed {ulps}"
    )
