#!/usr/bin/env python
"""Where a training step spends its time, for the reference and for ours (``torch.profiler``, CPU).

    python bench/profile_breakdown.py [--size 96] [--threads 2] [--case train_step] [--impls reference ours]

Each implementation runs in its own process: one warm-up iteration, then one profiled iteration. Operator self
times are grouped into categories (UNet convolutions forward / backward, LNCC blur, grid_sample, ...). Profiler
self times are wall times of the calling thread, so with several threads they are comparable between the two
implementations, not a CPU-time budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

CATEGORIES = (
    "UNet conv forward",
    "UNet conv backward",
    "LNCC blur",
    "grid_sample forward",
    "grid_sample backward",
    "upsample (UNet)",
    "batch norm",
    "cat / copies / fills",
    "optimizer (Adam)",
    "other",
)


def categorize(name: str, shapes) -> str:
    flat = str(shapes)
    blur = ", 21]" in flat or ", 21, 1]" in flat or "21, 1, 1]" in flat
    if name in ("aten::mm", "aten::bmm", "aten::matmul") and ("175]" in flat or "96]" in flat or "65]" in flat):
        # the matrix-product blur of ours (banded [N, N] matrices); the deep UNet layers use small products
        square = any(isinstance(s, list) and len(s) >= 2 and s[-1] == s[-2] for s in (shapes or []))
        return "LNCC blur" if square else "UNet conv backward"
    if name in ("aten::convolution_backward",):
        return "LNCC blur" if blur else "UNet conv backward"
    if name in ("aten::mkldnn_convolution", "aten::_convolution", "aten::slow_conv3d_forward", "aten::convolution",
                "aten::conv3d", "aten::conv_transpose3d", "aten::_slow_conv2d_forward"):
        return "LNCC blur" if blur else "UNet conv forward"
    if name.startswith("aten::grid_sampler") and "backward" in name:
        return "grid_sample backward"
    if name.startswith("aten::grid_sampler"):
        return "grid_sample forward"
    if "upsample" in name:
        return "upsample (UNet)"
    if "batch_norm" in name:
        return "batch norm"
    if name in ("aten::cat", "aten::copy_", "aten::fill_", "aten::zero_", "aten::clone", "aten::contiguous",
                "aten::stack", "aten::constant_pad_nd"):
        return "cat / copies / fills"
    if name.startswith("Optimizer") or name in ("aten::lerp_", "aten::addcdiv_", "aten::addcmul_", "aten::_foreach_add_"):
        return "optimizer (Adam)"
    return "other"


def worker(impl: str, case: str, n: int, threads: int, weights: str, out: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cases import build_case

    torch.set_num_threads(threads)
    built = build_case(impl, case, n, weights, "cpu")
    built.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        built.step()
    totals = {c: 0.0 for c in CATEGORIES}
    top = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key.startswith("autograd::") or e.key.startswith("ProfilerStep") or e.key == "Optimizer.step#Adam.step":
            continue
        cat = categorize(e.key, e.input_shapes)
        totals[cat] += e.self_cpu_time_total / 1e6
        top.append((e.self_cpu_time_total / 1e6, e.key, str(e.input_shapes)[:120], cat))
    top.sort(reverse=True)
    with open(out, "w") as f:
        json.dump({"impl": impl, "categories": totals, "top": top[:25]}, f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", default="train_step", choices=["train_step", "inference", "io_step"])
    p.add_argument("--impls", nargs="+", default=["reference", "ours"])
    p.add_argument("--json", default=None)
    p.add_argument("--worker", nargs=6, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        impl, case, n, threads, weights, out = args.worker
        worker(impl, case, int(n), int(threads), weights, out)
        return 0

    import torch

    from cases import random_weights

    workdir = tempfile.mkdtemp(prefix="gradicon_profile_")
    weights = os.path.join(workdir, "weights.pt")
    torch.save(random_weights(seed=1), weights)
    results = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    for impl in args.impls:
        out = os.path.join(workdir, f"{impl}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, args.case, str(args.size),
               str(args.threads), weights, out]
        subprocess.run(cmd, check=True, env=env)
        with open(out) as f:
            results[impl] = json.load(f)
    impls = list(results)
    print(f"{args.case} at {args.size}³, {args.threads} threads: profiler self time (s) by category")
    print(f"{'category':<24}" + "".join(f"{i:>12}" for i in impls) + "".join(f"{i + ' %':>12}" for i in impls))
    sums = {i: sum(results[i]["categories"].values()) for i in impls}
    for c in CATEGORIES:
        vals = [results[i]["categories"][c] for i in impls]
        print(f"{c:<24}" + "".join(f"{v:>12.2f}" for v in vals)
              + "".join(f"{100 * v / sums[i]:>11.1f}%" for v, i in zip(vals, impls)))
    print(f"{'total':<24}" + "".join(f"{sums[i]:>12.2f}" for i in impls))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "threads": args.threads, "case": args.case, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
