"""Released GradICON / uniGradICON / multiGradICON weight files <-> :class:`GradICONNetwork` state dicts.

A released ``.trch`` file is the state dict of the reference's nested registration tree (§4.2 of the reference
notes): 47 tensors per UNet2 under one prefix per step, 188 tensors for the 4-step models. Our network keeps its
UNets in a flat list, ``steps.{i}.unet.``, in execution order (coarse to fine). The prefixes below are the whole map.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from monai_gradicon.networks.registration import STEP_LEVELS, GradICONNetwork, gradicon_network

__all__ = [
    "OFFICIAL_PREFIXES",
    "WeightFileError",
    "official_to_network_state",
    "network_to_official_state",
    "load_official_weights",
    "export_official_weights",
    "network_from_official_weights",
    "read_state_dict",
    "is_official_state",
    "load_network_weights",
]

OFFICIAL_PREFIXES: dict[int, tuple[str, ...]] = {
    1: ("net.",),
    2: ("netPhi.net.net.", "netPsi.net."),
    3: ("netPhi.net.netPhi.net.net.", "netPhi.net.netPsi.net.", "netPsi.net."),
    4: (
        "netPhi.netPhi.net.netPhi.net.net.",
        "netPhi.netPhi.net.netPsi.net.",
        "netPhi.netPsi.net.",
        "netPsi.net.",
    ),
}
"""Reference key prefix of UNet i (execution order) in a released weight file, per number of steps."""

_WRAPPER_PREFIXES = ("regis_net.", "module.")


class WeightFileError(ValueError):
    """A weight file does not fit the network: the message lists missing and unexpected keys."""


def _ours_prefix(i: int) -> str:
    return f"steps.{i}.unet."


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _steps_in_official(state: Mapping[str, torch.Tensor]) -> int:
    for n in sorted(OFFICIAL_PREFIXES, reverse=True):
        prefixes = OFFICIAL_PREFIXES[n]
        every_step_present = all(any(k.startswith(p) for k in state) for p in prefixes)
        if every_step_present and all(k.startswith(prefixes) for k in state):
            return n
    raise WeightFileError(
        "The state dict is not a released GradICON weight file: its keys match none of the known layouts "
        f"(1-4 steps). First keys: {_describe(list(state))}"
    )


def is_official_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys look like a released (reference-layout) weight file."""
    state = _strip_wrappers(state)
    return bool(state) and all(k.startswith(("net.", "netPhi.", "netPsi.")) for k in state)


def official_to_network_state(state: Mapping[str, torch.Tensor], num_steps: int | None = None) -> dict[str, torch.Tensor]:
    """Rename a reference-layout state dict to :class:`GradICONNetwork` keys (``steps.{i}.unet.*``)."""
    state = _strip_wrappers(state)
    n = num_steps if num_steps is not None else _steps_in_official(state)
    prefixes = OFFICIAL_PREFIXES[n]
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        for i, p in enumerate(prefixes):
            if key.startswith(p):
                out[_ours_prefix(i) + key[len(p):]] = value
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise WeightFileError(f"Unexpected keys for a {n}-step weight file: {_describe(unexpected)}")
    return out


def network_to_official_state(network: GradICONNetwork) -> dict[str, torch.Tensor]:
    """Our network's state dict in the released layout (to share weights with the reference tools)."""
    n = network.num_steps
    if n not in OFFICIAL_PREFIXES or network.levels != STEP_LEVELS[n]:
        raise ValueError(f"Only the standard 1-4 step schedules have a released layout; this network has levels {network.levels}.")
    out = {}
    for key, value in network.state_dict().items():
        i = int(key.split(".")[1])
        out[OFFICIAL_PREFIXES[n][i] + key[len(_ours_prefix(i)):]] = value.detach().clone()
    return out


def _load_strict(network: GradICONNetwork, state: Mapping[str, torch.Tensor], source: str) -> None:
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        raise WeightFileError(f"{source} does not fit a {network.num_steps}-step network; " + "; ".join(parts))
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        details = ", ".join(f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}" for k in wrong[:6])
        raise WeightFileError(f"{source} has tensors of the wrong shape: {details}")
    network.load_state_dict(state, strict=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file (a plain tensor dict, optionally nested under ``"model"``) with ``weights_only=True``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weight file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code, a truncated file, not a torch file at all
        raise WeightFileError(f"Cannot read {path} as a weights-only torch file: {exc}") from exc
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightFileError(f"{path} does not hold a state dict of tensors.")
    return dict(obj)


def load_official_weights(network: GradICONNetwork, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> GradICONNetwork:
    """Load a released weight file (path or state dict) into ``network``, strictly."""
    state = read_state_dict(source) if not isinstance(source, Mapping) else source
    name = os.fspath(source) if not isinstance(source, Mapping) else "The state dict"
    mapped = official_to_network_state(state, None)
    _load_strict(network, mapped, name)
    return network


def export_official_weights(network: GradICONNetwork, path: str | os.PathLike) -> None:
    """Write ``network``'s weights in the released layout, atomically (temp file + rename)."""
    from monai_gradicon.io_utils import atomic_torch_save

    atomic_torch_save(network_to_official_state(network), path)


def network_from_official_weights(
    source: str | os.PathLike | Mapping[str, torch.Tensor], input_shape=None
) -> GradICONNetwork:
    """Build the network a released weight file describes (steps and 2D/3D from its keys and shapes) and load it."""
    state = _strip_wrappers(read_state_dict(source) if not isinstance(source, Mapping) else source)
    n = _steps_in_official(state)
    first = state[OFFICIAL_PREFIXES[n][0] + "downConvs.0.weight"]
    spatial_dims = first.ndim - 2
    in_channels = first.shape[1] // 2
    network = gradicon_network(n, spatial_dims, input_shape, in_channels)
    return load_official_weights(network, state)


def load_network_weights(network: GradICONNetwork, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> GradICONNetwork:
    """Load either one of our checkpoints (``steps.*``, optionally under ``network.``) or a released weight file,
    recognised by its keys; strict in both cases."""
    state = read_state_dict(source) if not isinstance(source, Mapping) else dict(source)
    name = os.fspath(source) if not isinstance(source, Mapping) else "The state dict"
    stripped = _strip_wrappers(state)
    if stripped and all(k.startswith("network.") for k in stripped):
        stripped = {k[len("network."):]: v for k, v in stripped.items()}
    if is_official_state(stripped):
        return load_official_weights(network, stripped)
    _load_strict(network, stripped, name)
    return network
