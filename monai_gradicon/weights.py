"""Weight files: the one place that reads, writes and converts them.

Two layouts are read, both strictly (a file that does not fill the whole network is an error listing the missing
and unexpected keys):

* **released** ``.trch`` files of the authors: the state dict of the reference's nested registration tree (§4.2 of
  the reference notes), 47 tensors per UNet2 under one prefix per step (188 tensors for the 4-step models), no
  model card. :data:`OFFICIAL_PREFIXES` maps each prefix to our ``steps.{i}.unet.``; the card comes from
  :func:`monai_gradicon.model_card.released_card` (the reference axis order; shape and preprocessing from the
  release's file name) and records the file name and its SHA-256.
* **ours**: the state dict of a :class:`~monai_gradicon.GradICONNetwork` (``steps.{i}.unet.*`` and ``model_card``),
  optionally under the prefix ``network.`` (what the bundles, :class:`~monai_gradicon.GradICONDDFNet` and the
  training module hold). A file without ``model_card`` was written before cards existed: it is refused with the
  command that adds one (:func:`convert_weights`), never guessed.

Every file this project writes (:func:`save_weights`) has the bundle layout ``network.*`` with the card, so one file
serves ``monai.bundle.load``, Ignite's ``CheckpointLoader``, MONAI Label and the command line.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch

from monai_gradicon.io_utils import atomic_torch_save
from monai_gradicon.model_card import CardError, ModelCard, released_card
from monai_gradicon.networks.registration import STEP_LEVELS, GradICONNetwork, gradicon_network

__all__ = [
    "OFFICIAL_PREFIXES",
    "WeightFileError",
    "official_to_network_state",
    "network_to_official_state",
    "export_official_weights",
    "read_state_dict",
    "is_official_state",
    "load_weights",
    "load_network_weights",
    "save_weights",
    "convert_weights",
    "file_sha256",
    "BUNDLE_PREFIX",
    "parse_shape",
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

BUNDLE_PREFIX = "network."
"""Key prefix of the files this project writes (the bundles' network_def and training module hold the network as
``network``)."""

CARD_KEY = "model_card"

_WRAPPER_PREFIXES = ("regis_net.", "module.")


class WeightFileError(ValueError):
    """A weight file does not fit the network: the message lists missing and unexpected keys."""


def _ours_prefix(i: int) -> str:
    return f"steps.{i}.unet."


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for prefix in (*_WRAPPER_PREFIXES, BUNDLE_PREFIX):
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
    """Rename a reference-layout state dict to :class:`GradICONNetwork` keys (``steps.{i}.unet.*``, no card)."""
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
    """Our network's tensors in the released layout (to share weights with the reference tools; no card)."""
    n = network.num_steps
    if n not in OFFICIAL_PREFIXES or network.levels != STEP_LEVELS[n]:
        raise ValueError(
            f"Only the standard 1-4 step schedules have a released layout; this network has levels {network.levels}."
        )
    out = {}
    for key, value in network.state_dict().items():
        if key == CARD_KEY:
            continue
        i = int(key.split(".")[1])
        out[OFFICIAL_PREFIXES[n][i] + key[len(_ours_prefix(i)):]] = value.detach().clone()
    return out


def export_official_weights(network: GradICONNetwork, path: str | os.PathLike) -> None:
    """Write ``network``'s weights in the released layout, atomically (the card is not part of that layout)."""
    atomic_torch_save(network_to_official_state(network), path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file (a plain tensor dict, optionally nested under ``"model"``) with ``weights_only=True``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Weight file not found: {path}")
    if not os.path.isfile(path):
        raise WeightFileError(f"The weight file path is not a file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code, a truncated file, not a torch file at all
        raise WeightFileError(f"Cannot read {path} as a weights-only torch file: {exc}") from exc
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightFileError(f"{path} does not hold a state dict of tensors.")
    return dict(obj)


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
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightFileError(f"{source} holds non-finite values (NaN or infinity) in {_describe(bad)}.")
    if CARD_KEY in state:
        try:
            network.check_card(ModelCard.from_tensor(state[CARD_KEY], f"the model card of {source}"), source)
        except CardError as exc:
            raise WeightFileError(str(exc)) from exc
    network.load_state_dict(state, strict=True)


def _structure(state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Steps, dimensionality, channels per image and UNet widths of one of our state dicts (no prefix)."""
    steps = sorted({int(k.split(".")[1]) for k in state if k.startswith("steps.") and k.split(".")[1].isdigit()})
    if not steps or steps != list(range(len(steps))) or len(steps) not in STEP_LEVELS:
        raise WeightFileError(
            f"{source} is neither a released GradICON weight file nor a monai_gradicon weight file with 1-4 steps "
            f"(keys steps.<i>.unet.*); first keys: {_describe(list(state))[:300]}"
        )
    try:
        first = state["steps.0.unet.downConvs.0.weight"]
        n_levels = len({k.split(".")[4] for k in state if k.startswith("steps.0.unet.downConvs.")})
        down = [int(state[f"steps.0.unet.downConvs.{d}.weight"].shape[0]) for d in range(n_levels)]
        up = [int(state[f"steps.0.unet.upConvs.{d}.weight"].shape[1]) for d in range(n_levels)]
    except (KeyError, IndexError) as exc:
        raise WeightFileError(f"{source} lacks the UNet tensor {exc} of a monai_gradicon weight file.") from exc
    if first.ndim not in (4, 5):
        raise WeightFileError(f"{source}: steps.0.unet.downConvs.0.weight has shape {tuple(first.shape)}, not a 2D/3D "
                              "convolution kernel.")
    return {"num_steps": len(steps), "spatial_dims": first.ndim - 2, "in_channels": int(first.shape[1]) // 2,
            "down_channels": down, "up_channels": up}


def _source_name(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> str:
    return os.fspath(source) if not isinstance(source, Mapping) else "the state dict"


def load_weights(
    source: str | os.PathLike | Mapping[str, torch.Tensor], file_name: str | None = None
) -> tuple[GradICONNetwork, ModelCard]:
    """Build the network a weight file describes, load it strictly and return it with its model card.

    Args:
        source: a released ``.trch`` file, a file this project wrote, or such a state dict.
        file_name: for a released state dict given in memory, the name of the file it came from (the card of a
            released file depends on it); a path supplies its own.

    Raises:
        FileNotFoundError: no such file. WeightFileError: unreadable, not a weight file, keys or shapes that do not
            fit, non-finite values, a missing or contradictory model card.
    """
    name = _source_name(source)
    state = read_state_dict(source) if not isinstance(source, Mapping) else dict(source)
    stripped = _strip_wrappers(state)
    if is_official_state(stripped):
        mapped = official_to_network_state(stripped)
        info = _structure(mapped, name)
        sha = file_sha256(source) if not isinstance(source, Mapping) else None
        card = released_card(file_name or (None if isinstance(source, Mapping) else name), info["num_steps"],
                             info["spatial_dims"], info["in_channels"], sha)
        network = gradicon_network(info["num_steps"], info["spatial_dims"], None, info["in_channels"],
                                   down_channels=info["down_channels"], up_channels=info["up_channels"])
        network.card = card
        mapped[CARD_KEY] = network.model_card
        _load_strict(network, mapped, name)
        return network, card
    info = _structure(stripped, name)
    if CARD_KEY not in stripped:
        raise WeightFileError(
            f"{name} has no model card (it was written before cards existed), so how to use it -- axis order, input "
            "shape, preprocessing -- is unknown. Add one, stating how it was trained, e.g.:\n"
            f"  python -m monai_gradicon convert-weights --input {name} --output with_card.pt --axis_order file "
            "--input_shape 65,65,65 --preprocessing lung_ct"
        )
    try:
        card = ModelCard.from_tensor(stripped[CARD_KEY], f"the model card of {name}")
    except CardError as exc:
        raise WeightFileError(str(exc)) from exc
    network = GradICONNetwork(info["spatial_dims"], STEP_LEVELS[info["num_steps"]], None, info["in_channels"],
                              card=_checked_card(card, info, name), down_channels=info["down_channels"],
                              up_channels=info["up_channels"])
    _load_strict(network, stripped, name)
    return network, card


def _checked_card(card: ModelCard, info: Mapping[str, Any], name: str) -> ModelCard:
    for key in ("num_steps", "spatial_dims", "in_channels"):
        value = getattr(card, key)
        if value is not None and value != info[key]:
            raise WeightFileError(f"The model card of {name} says {key}={value} but its tensors have {info[key]}.")
    return card


def load_network_weights(
    network: GradICONNetwork, source: str | os.PathLike | Mapping[str, torch.Tensor], file_name: str | None = None
) -> GradICONNetwork:
    """Load a weight file (either layout, recognised by its keys) into an existing ``network``, strictly; the
    network's card becomes the file's (a released file's: :func:`~monai_gradicon.model_card.released_card`)."""
    name = _source_name(source)
    state = read_state_dict(source) if not isinstance(source, Mapping) else dict(source)
    stripped = _strip_wrappers(state)
    if is_official_state(stripped):
        mapped = official_to_network_state(stripped)
        sha = file_sha256(source) if not isinstance(source, Mapping) else None
        card = released_card(file_name or (None if isinstance(source, Mapping) else name), network.num_steps,
                             network.spatial_dims, network.in_channels, sha)
        try:
            network.check_card(card, name)
        except CardError as exc:
            raise WeightFileError(str(exc)) from exc
        mapped[CARD_KEY] = card.to_tensor()
        _load_strict(network, mapped, name)
        return network
    if CARD_KEY not in stripped:
        load_weights(stripped, file_name)  # raises the explanation of the missing card
    _load_strict(network, stripped, name)
    return network


def save_weights(network: GradICONNetwork, path: str | os.PathLike) -> str:
    """Write ``network``'s tensors and card in the bundle layout (``network.steps.*``, ``network.model_card``),
    atomically. Returns the path."""
    state = {BUNDLE_PREFIX + k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    return atomic_torch_save(state, path)


def convert_weights(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    expect: Mapping[str, Any] | None = None,
    **card_fields: Any,
) -> tuple[str, ModelCard]:
    """Turn a weight file (released, ours, or ours without a card) into a file of this project with a model card.

    Args:
        source: the file to convert; never overwritten.
        output: the file to write (bundle layout, see :func:`save_weights`).
        overwrite: replace an existing ``output`` (which must not be ``source``).
        expect: card fields the destination requires (e.g. a bundle's ``metadata.json`` ``model_card``); a card
            that disagrees is an error.
        card_fields: card fields to state (``axis_order``, ``input_shape``, ``preprocessing``, ``modality``,
            ``name``). They fill what the source's card leaves unknown; contradicting a field the source's card
            states is an error. A source without a card (written before cards existed) needs ``axis_order``,
            ``input_shape`` and ``preprocessing``.

    Returns:
        ``(output path, the card written)``.
    """
    source, output = os.fspath(source), os.fspath(output)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"The weight file does not exist: {source}")
    if os.path.exists(output) and os.path.samefile(source, output):
        raise ValueError(f"The output {output} is the input file; choose another name (the input is never replaced).")
    if os.path.isdir(output):
        raise IsADirectoryError(f"The output {output} is a directory; give a file name such as {output}/model.pt.")
    if os.path.lexists(output) and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite (overwrite=True) to replace it.")
    parent = os.path.dirname(os.path.abspath(output))
    probe = parent
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write {output}: {probe} is not writable.")
    fields = {k: v for k, v in card_fields.items() if v is not None}
    if "input_shape" in fields:
        fields["input_shape"] = tuple(int(s) for s in fields["input_shape"])
    state = _strip_wrappers(read_state_dict(source))
    if not is_official_state(state) and CARD_KEY not in state:
        needed = [k for k in ("axis_order", "input_shape", "preprocessing") if k not in fields]
        if needed:
            raise WeightFileError(
                f"{source} has no model card; state how it was trained: {', '.join('--' + k for k in needed)}."
            )
        info = _structure(state, source)
        network = GradICONNetwork(info["spatial_dims"], STEP_LEVELS[info["num_steps"]], None, info["in_channels"],
                                  down_channels=info["down_channels"], up_channels=info["up_channels"])
        card = ModelCard(num_steps=info["num_steps"], spatial_dims=info["spatial_dims"],
                         in_channels=info["in_channels"], source_file=os.path.basename(source),
                         source_sha256=file_sha256(source), **fields)
        network.card = card
        _load_strict(network, {**state, CARD_KEY: network.model_card}, source)
    else:
        network, card = load_weights(source)
        card.check_agrees({k: v for k, v in fields.items() if k != "name"}, source)
        filled = {k: v for k, v in fields.items() if getattr(card, k) is None or k == "name"}
        card = card.replace(**filled)
        network.card = card
    if expect:
        try:
            card.check_agrees(dict(expect), source)
        except CardError as exc:
            raise CardError(f"{exc} (the destination requires {dict(expect)})") from exc
        missing = [k for k, v in expect.items() if v is not None and getattr(card, k) is None]
        if missing:
            card = card.replace(**{k: expect[k] for k in missing})
            network.card = card
    save_weights(network, output)
    return output, card


def parse_shape(value: Any, name: str = "input_shape") -> tuple[int, ...] | None:
    """``"175,175,175"``, ``"175x175x175"``, ``(175, 175, 175)`` or ``None`` -> a shape tuple (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"{name} needs one size per spatial axis, e.g. 175,175,175; got {value!r}.")
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be sizes like 175,175,175, got {value!r}.") from exc
    if len(shape) not in (2, 3) or any(s < 2 for s in shape):
        raise ValueError(f"{name} must be 2 or 3 sizes >= 2, got {shape}.")
    return shape

