"""Helpers around the GradICON MONAI bundles (``bundles/gradicon_lung``, ``bundles/gradicon_brain``).

* :func:`load_bundle_network`: ``monai.bundle.load`` plus a check that **every** tensor of the network came from
  the checkpoint (MONAI's loader copies matching keys only and silently skips the rest).
* :func:`bundle_model_card`: the model card a bundle's ``metadata.json`` requires of its weights.
* :func:`run_pairs`: run a dataset that registers and saves each pair (the bundles' ``optimize.json``), with progress.
* Command line (the same conversion as ``python -m monai_gradicon convert-weights --bundle_dir``)::

      python -m monai_gradicon.bundle_utils convert \\
          --weights bundles/gradicon_lung/models/lung_model_weights_step_2.trch --bundle_dir bundles/gradicon_lung
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_gradicon.model_card import CardError
from monai_gradicon.weights import WeightFileError, convert_weights, read_state_dict

__all__ = ["load_bundle_network", "check_all_weights_loaded", "bundle_model_card", "require_file", "run_pairs",
           "main"]


def require_file(path: str | os.PathLike, hint: str = "") -> str:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` with ``hint`` (used in bundle configs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found. {hint}".strip())
    return os.fspath(path)


def run_pairs(dataset: Sequence[Mapping[str, Any]], result_key: str = "registration") -> list[dict[str, str]]:
    """Run a dataset whose transform registers and saves each pair (e.g. a bundle's ``optimize.json``: load ->
    :class:`~monai_gradicon.pipeline.transforms.OptimizeRegistrationd` -> ``SaveRegistrationd``), one pair at a
    time, logging each pair's case name, seconds and folds; returns each pair's ``{output name: path}``. An error
    names the pair (0-based index) it happened at; pairs finished before it keep their files."""
    import time

    written = []
    for i in range(len(dataset)):
        start = time.perf_counter()
        try:
            item = dataset[i]
        except Exception as exc:
            raise RuntimeError(f"pair {i} of {len(dataset)} failed: {exc}") from exc
        result = item[result_key]
        written.append(result.get("files", {}))
        print(f"pair {i + 1}/{len(dataset)} {result['case']}: {time.perf_counter() - start:.1f} s, folds "
              f"{result['fields'].folds_percent:.4f}% of fixed voxels", flush=True)
    return written


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


def bundle_model_card(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``model_card`` a bundle's ``configs/metadata.json`` requires of its weights (axis order, input shape,
    preprocessing, modality): what :func:`monai_gradicon.weights.convert_weights` checks a converted file against.

    Raises:
        FileNotFoundError: no metadata. ValueError: invalid JSON or no ``model_card`` object.
    """
    meta = Path(bundle_dir) / "configs" / "metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle folder: {meta} does not exist.")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{meta} is not valid JSON: {exc}") from exc
    card = data.get("model_card")
    if not isinstance(card, Mapping):
        raise ValueError(f"{meta} has no \"model_card\" object (axis_order, input_shape, preprocessing, modality).")
    out = dict(card)
    if out.get("input_shape") is not None:
        out["input_shape"] = tuple(out["input_shape"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_gradicon.bundle_utils", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="released weight file -> <bundle>/models/model.pt (with its model card)")
    conv.add_argument("--weights", required=True, help="released .trch file (or one of our weight files)")
    group = conv.add_mutually_exclusive_group(required=True)
    group.add_argument("--bundle_dir", help="bundle folder; writes <bundle_dir>/models/model.pt")
    group.add_argument("--output", help="explicit output file")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output file (never the input)")
    check = sub.add_parser("check", help="load <bundle>/models/model.pt into the inference network, verify all keys")
    check.add_argument("--bundle_dir", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            expect = bundle_model_card(args.bundle_dir) if args.bundle_dir else None
            out = args.output or os.path.join(args.bundle_dir, "models", "model.pt")
            path, card = convert_weights(args.weights, out, overwrite=args.overwrite, expect=expect)
            print(f"wrote {path} ({len(read_state_dict(path))} tensors; card: {card.to_dict()})")
        else:
            net = load_bundle_network(args.bundle_dir)
            print(f"{args.bundle_dir}: all {len(net.state_dict())} tensors of network_def loaded from models/model.pt")
    except (FileNotFoundError, FileExistsError, IsADirectoryError, WeightFileError, CardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
