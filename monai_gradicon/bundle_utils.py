"""Helpers around the GradICON MONAI bundles (``bundles/gradicon_lung``, ``bundles/gradicon_brain``).

* :func:`load_bundle_network`: ``monai.bundle.load`` plus a check that **every** tensor of the network came from
  the checkpoint (MONAI's loader copies matching keys only and silently skips the rest).
* :func:`convert_released_weights`: turn an authors' released weight file (``*_model_weights_step_2.trch``) into
  the bundle's ``models/model.pt`` with the core's strict loader. Command line::

      python -m monai_gradicon.bundle_utils convert \\
          --weights bundles/gradicon_lung/models/lung_model_weights_step_2.trch --bundle_dir bundles/gradicon_lung
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_gradicon.io_utils import atomic_torch_save
from monai_gradicon.networks.registration import GradICONDDFNet
from monai_gradicon.weights import WeightFileError, network_from_official_weights, read_state_dict

__all__ = ["load_bundle_network", "check_all_weights_loaded", "convert_released_weights", "require_file", "main"]


def require_file(path: str | os.PathLike, hint: str = "") -> str:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` with ``hint`` (used in bundle configs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found. {hint}".strip())
    return os.fspath(path)


def check_all_weights_loaded(network: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor], source: str = "") -> int:
    """Raise :class:`~monai_gradicon.WeightFileError` unless ``network``'s state dict has exactly the keys of
    ``checkpoint`` and every tensor equals the checkpoint's; return the number of tensors."""
    own = network.state_dict()
    missing = sorted(set(own) - set(checkpoint))
    unexpected = sorted(set(checkpoint) - set(own))
    if missing or unexpected:
        raise WeightFileError(
            f"{source or 'The checkpoint'} does not match the bundle network: {len(own) - len(missing)} of {len(own)} "
            f"tensors loaded; missing {missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}."
        )
    differing = [k for k, v in own.items() if v.shape != checkpoint[k].shape
                 or not torch.equal(v.detach().cpu(), checkpoint[k].detach().cpu().to(v.dtype))]
    if differing:
        raise WeightFileError(
            f"{len(differing)} of {len(own)} tensors of the bundle network differ from {source or 'the checkpoint'} "
            f"after loading: {differing[:6]}"
        )
    return len(own)


def load_bundle_network(
    bundle_dir: str | os.PathLike,
    workflow_type: str = "inference",
    device: str | torch.device = "cpu",
    model_file: str | None = None,
    net_override: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Load a bundle's ``network_def`` with its ``models/model.pt`` through ``monai.bundle.load`` and verify that
    every tensor came from the file.

    Args:
        bundle_dir: the bundle folder (e.g. ``bundles/gradicon_lung``).
        workflow_type: config file to take ``network_def`` from (``"inference"`` -> ``configs/inference.json``).
        device: where the network is put.
        model_file: weights file relative to the bundle (default ``models/model.pt``).
        net_override: overrides of ``network_def`` items, e.g. ``{"network#num_steps": 3}`` (as
            ``monai.bundle.load``).

    Raises:
        FileNotFoundError: no weights file; WeightFileError: the file does not fill the whole network.
    """
    import monai.bundle

    bundle = Path(bundle_dir).resolve()
    weights = bundle / (model_file or os.path.join("models", "model.pt"))
    require_file(weights, "Train the bundle first or convert released weights (see the bundle's docs/README.md).")
    net = monai.bundle.load(
        name=bundle.name,
        bundle_dir=str(bundle.parent),
        source="github",
        workflow_type=workflow_type,
        device=str(device),
        model_file=os.path.relpath(weights, bundle),
        net_override=dict(net_override or {}),
    )
    if not isinstance(net, torch.nn.Module):
        raise WeightFileError(f"monai.bundle.load returned {type(net).__name__}, not a network (workflow_type "
                              f"{workflow_type!r} must name a configs/<workflow_type>.json file).")
    check_all_weights_loaded(net, read_state_dict(weights), str(weights))
    return net


def convert_released_weights(
    weights: str | os.PathLike,
    bundle_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
) -> Path:
    """Convert a released GradICON weight file to a bundle ``models/model.pt`` (a bare state dict of the
    inference ``network_def``, :class:`~monai_gradicon.GradICONDDFNet`: keys ``network.steps.{i}.unet.*``).

    The file is read with the core's loader (:func:`monai_gradicon.network_from_official_weights`: weights-only,
    strict, every key mapped); files that are already in our layout are accepted too. Written atomically.

    Args:
        weights: the released file (e.g. ``lung_model_weights_step_2.trch``) or one of our checkpoints.
        bundle_dir: the bundle folder; the output is ``<bundle_dir>/models/model.pt``.
        output: explicit output path (instead of ``bundle_dir``).

    Returns:
        the written path.
    """
    if (bundle_dir is None) == (output is None):
        raise ValueError("Give exactly one of bundle_dir and output.")
    target = Path(output) if output is not None else Path(bundle_dir) / "models" / "model.pt"
    try:
        network = network_from_official_weights(weights)
    except WeightFileError:
        # already our layout (steps.* or network.steps.*): load strictly into a network of the right size
        from monai_gradicon.weights import load_network_weights
        from monai_gradicon.networks.registration import gradicon_network

        state = read_state_dict(weights)
        steps = {int(k.split("steps.")[1].split(".")[0]) for k in state if "steps." in k}
        if not steps:
            raise
        first = next(v for k, v in state.items() if k.endswith("steps.0.unet.downConvs.0.weight"))
        network = gradicon_network(max(steps) + 1, first.ndim - 2, in_channels=first.shape[1] // 2)
        load_network_weights(network, state)
    export = GradICONDDFNet(network)
    state = {k: v.detach().cpu().contiguous() for k, v in export.state_dict().items()}
    atomic_torch_save(state, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_gradicon.bundle_utils", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="released weight file -> <bundle>/models/model.pt")
    conv.add_argument("--weights", required=True, help="released .trch file (or one of our checkpoints)")
    group = conv.add_mutually_exclusive_group(required=True)
    group.add_argument("--bundle_dir", help="bundle folder; writes <bundle_dir>/models/model.pt")
    group.add_argument("--output", help="explicit output file")
    check = sub.add_parser("check", help="load <bundle>/models/model.pt into the inference network, verify all keys")
    check.add_argument("--bundle_dir", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            path = convert_released_weights(args.weights, bundle_dir=args.bundle_dir, output=args.output)
            n = len(read_state_dict(path))
            print(f"wrote {path} ({n} tensors)")
        else:
            net = load_bundle_network(args.bundle_dir)
            print(f"{args.bundle_dir}: all {len(net.state_dict())} tensors of network_def loaded from models/model.pt")
    except (FileNotFoundError, WeightFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
