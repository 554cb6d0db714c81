"""Loading and validating the project's JSON datalists.

Format: ``{"training": [entry, ...], "validation": [entry, ...], ...}``. A pair entry holds ``fixed_image`` and
``moving_image`` and optionally ``fixed_label``, ``moving_label`` (lung masks / label maps), ``fixed_landmarks``,
``moving_landmarks`` (CSV, world mm unless the datalist's top-level ``landmark_coordinates`` says otherwise). A
subject entry holds ``image`` and optionally ``label``. Relative paths are resolved against the JSON's folder; other
keys (e.g. ``case``) are passed through unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["DATALIST_PATH_KEYS", "is_path_key", "load_datalist", "resolve_entry_paths", "read_json_file"]

#: keys whose values are file paths
DATALIST_PATH_KEYS = frozenset(
    {"image", "label", "mask", "landmarks"}
    | {f"{role}_{kind}" for role in ("fixed", "moving") for kind in ("image", "label", "mask", "landmarks")}
)

_PAIR_KEYS = ("fixed_image", "moving_image")
_SUBJECT_KEYS = ("image",)


def is_path_key(key: str) -> bool:
    """Whether a datalist key holds a file path (see :data:`DATALIST_PATH_KEYS`)."""
    return key in DATALIST_PATH_KEYS


def read_json_file(path: Path) -> Any:
    """Parse a JSON file; FileNotFoundError when missing, ValueError naming the file when malformed."""
    if not path.is_file():
        raise FileNotFoundError(f"datalist JSON not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"malformed JSON in {path}: {err}") from None


def resolve_entry_paths(entry: dict[str, Any], base: Path, where: str) -> dict[str, Any]:
    """Copy ``entry`` with its path values made absolute (relative to ``base``) and checked to exist.

    Raises:
        ValueError: a path value is not a non-empty string. FileNotFoundError: a referenced file is missing.
    """
    resolved: dict[str, Any] = {}
    for key, value in entry.items():
        if not is_path_key(key):
            resolved[key] = value
            continue
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: key {key!r} must be a file path string, got {value!r}")
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{where}: {key} file not found: {path}")
        resolved[key] = str(path)
    return resolved


def load_datalist(
    path_or_dir: str | Path,
    split: str = "training",
    required_keys: Sequence[str] | None = None,
    datalist_name: str = "datalist.json",
) -> list[dict[str, Any]]:
    """Load one split of a JSON datalist with absolute, existence-checked paths.

    Args:
        path_or_dir: the JSON file, or a folder holding ``datalist_name``.
        split: top-level key to read (``"training"``, ``"validation"``, ...).
        required_keys: keys every entry must have; default: ``fixed_image`` and ``moving_image`` for pair entries,
            ``image`` for subject entries (an entry must be one of the two).
        datalist_name: JSON file name used when ``path_or_dir`` is a folder.

    Returns:
        A list of dicts (copies); path values (see :data:`DATALIST_PATH_KEYS`) are absolute path strings.

    Raises:
        FileNotFoundError: the JSON or a file it references does not exist (the message names it).
        ValueError: malformed JSON, missing split, an entry that is not an object or lacks a required key.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / datalist_name
    content = read_json_file(path)
    if not isinstance(content, dict):
        raise ValueError(f"{path}: top level must be an object with split keys, got {type(content).__name__}")
    if split not in content:
        raise ValueError(f"{path}: missing split key {split!r} (found keys: {sorted(content)})")
    entries = content[split]
    if not isinstance(entries, list):
        raise ValueError(f"{path}: {split!r} must be a list of entries, got {type(entries).__name__}")
    base = path.parent.resolve()
    result = []
    for index, entry in enumerate(entries):
        where = f"{path} [{split}][{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: entry must be an object, got {type(entry).__name__}")
        if required_keys is not None:
            missing = [k for k in required_keys if k not in entry]
        elif any(k in entry for k in _PAIR_KEYS) or not all(k in entry for k in _SUBJECT_KEYS):
            missing = [k for k in _PAIR_KEYS if k not in entry]
        else:
            missing = []
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing} (a pair entry needs {list(_PAIR_KEYS)}, "
                             f"a subject entry needs {list(_SUBJECT_KEYS)})")
        result.append(resolve_entry_paths(entry, base, where))
    return result
