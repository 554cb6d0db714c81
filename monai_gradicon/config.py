"""Parsing of configuration values that arrive as text (bundle configs overridden on the command line)."""

from __future__ import annotations

from typing import Any

__all__ = ["config_bool"]


def config_bool(value: Any, name: str) -> bool:
    """A boolean setting: ``True``/``False``, the strings ``true``/``false`` in any case, ``1``/``0``.

    ``python -m monai.bundle run ... --two_stage false`` passes the *string* ``'false'``, which Python would treat as
    true; every boolean a bundle config hands to this package goes through here. Anything else is an error naming
    the setting.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"{name} must be true or false, got {value!r}.")
