"""Errors shared by several layers."""

from __future__ import annotations

__all__ = ["NonFiniteResultError"]


class NonFiniteResultError(ValueError):
    """A registration produced NaN or infinite values (diverging instance optimization, broken weights, extreme
    inputs); nothing is written and the network is restored."""
