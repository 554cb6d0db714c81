#!/usr/bin/env python
"""How far float32 rounding moves the training loss: the reference against itself in another memory layout.

    python bench/layout_deviation.py [--size 175] [--threads 2]

Evaluates the benchmark's training objective (train mode, LNCC sigma 5 + 1.5 * GradICON-sparse, the same weights,
images and jitter as ``compare_reference.py``'s ``train_step``) once, without gradients, four ways:

* the reference, as released;
* the reference with its modules and inputs channels-last (the same sums in another order: oneDNN's other kernels);
* ours in the reference's layout (``set_channels_last(False)``): the first to ~1e-7 (LNCC blurs by matrix products);
* ours by default (channels-last high-resolution layers on CPU): expected to match the second to float32 rounding.

The printed relative differences are the scale of "float32 rounding" for the loss at that size, which the
agreement column of ``compare_reference.py`` should be read against.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (HERE, os.path.dirname(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import cases  # noqa: E402


def reference_loss(state: dict, a: torch.Tensor, b: torch.Tensor, channels_last: bool) -> tuple[float, float, float]:
    """(loss, similarity, regularizer) of the reference objective; ``a``, ``b``: ``[1, 1, N, N, N]`` in [0, 1]."""
    from icon_registration import losses as rl

    net = cases.reference_tree(4)
    net.load_state_dict(state, strict=True)
    model = rl.GradientICONSparse(net, rl.LNCC(cases.LNCC_SIGMA), cases.LAMBDA)
    model.assign_identity_map([1, 1, *a.shape[2:]])
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
        a, b = (t.contiguous(memory_format=torch.channels_last_3d) for t in (a, b))
    with torch.no_grad():
        torch.manual_seed(cases.NOISE_SEED)  # the jitter: first randn after the network passes
        out = model(a, b)
    return float(out.all_loss), float(out.similarity_loss), float(out.inverse_consistency_loss)


def our_loss(state: dict, a: torch.Tensor, b: torch.Tensor, exact: bool) -> tuple[float, float, float]:
    """(loss, similarity, regularizer) of our objective with the same weights and jitter."""
    from monai_gradicon.losses import GradICONObjective, LNCCLoss

    net = cases._ours_network(state, "cpu", "exact" if exact else "default")
    model = GradICONObjective(net, LNCCLoss(cases.LNCC_SIGMA), lmbda=cases.LAMBDA)
    model.train()
    with torch.no_grad():
        torch.manual_seed(cases.NOISE_SEED)
        out = model(a, b)
    return float(out.loss), float(out.similarity), float(out.regularizer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=175, help="cube edge in voxels")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    state = cases.random_weights()
    a, b = cases.make_images(args.size)
    base = reference_loss(state, a, b, channels_last=False)
    rows = [
        ("reference", base),
        ("reference, channels-last", reference_loss(state, a, b, channels_last=True)),
        ("ours, set_channels_last(False)", our_loss(state, a, b, exact=True)),
        ("ours, default", our_loss(state, a, b, exact=False)),
    ]
    print(f"training objective at {args.size}³, train mode, no gradients; relative difference to the reference")
    print(f"{'':32s}{'loss':>14s}{'regularizer':>14s}{'rel loss':>11s}{'rel reg':>10s}")
    for name, (loss, _, reg) in rows:
        rel_loss = abs(loss - base[0]) / abs(base[0])
        rel_reg = abs(reg - base[2]) / abs(base[2])
        print(f"{name:32s}{loss:14.8g}{reg:14.8g}{rel_loss:11.2e}{rel_reg:10.2e}")


if __name__ == "__main__":
    main()
