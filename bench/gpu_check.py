#!/usr/bin/env python
"""One prepared check of monai_gradicon on a GPU (and its CPU-sized twin for CI), in one call, within a time budget.

    python bench/gpu_check.py --device cuda --json OUT/gpu_check.json [--table OUT/gpu_check.txt] [--budget-s 400]
    python bench/gpu_check.py --device cpu --quick --json /tmp/gpu_check.json      # CI-sized, ~1-2 min on 2 cores

On the lent GPU machine this runs through ``bench/gpu_check.sh`` (wheels, data and the exact device call:
``bench/README.md``, "GPU check"). Sections, in priority order (each one is recorded as ``ok``, ``skipped`` with a
reason, or ``error`` with the traceback's tail; a failing section never stops the others):

``inference``               the 4-step network at N³ (175³; quick: 65³), one direction (``Phi_AB`` on the grid, eval,
                            no gradient): float32 and bf16 (``set_mixed_precision(torch.bfloat16)``), on CUDA also with
                            ``cudnn.benchmark``; median of the timed repeats after warm-up (CUDA events), peak memory.
``training``                one training step (GradICONObjective LNCC sigma 5 + 1.5 GradICON-sparse, forward +
                            backward + Adam step; train mode) at batch 1 and 4 (quick: 2 only): ours (default, bf16,
                            no recomputed UNet tails) and the reference (icon_registration 1.1.9, if it imports);
                            time, pairs per second, peak memory, throughput ours / reference.
``agreement``               bf16 against float32 (largest map difference in voxels; relative difference of the eval-mode
                            objective with the same jitter), ours against the reference on this device (map), and on
                            CUDA the CUDA float32 map against the CPU float32 map.
``instance_optimization``   :func:`monai_gradicon.instance_optimization.instance_optimize` with one step (the whole
                            call) and the cost of one more step (difference of a 1-step and a (1+K)-step call).
``field_optimization``      one step of :func:`monai_gradicon.field_optimization.optimize_fields` started from the
                            network's maps (median spacing of its per-step timestamps); skipped with the reason when the
                            module or the function is absent.
``register``                ``python -m monai_gradicon register`` end to end on a real CT pair (``.gpu_data/``,
                            written by ``bench/gpu_wheels.sh``; without it a synthetic lung phantom pair), with
                            released-format random weights (``lung_model_weights_step_2.trch``: its card says 175³,
                            ``lung_ct``); the process' wall time and ``summary.json``'s per-stage timings, with and
                            without IO.
``ddp``                     ``torchrun --standalone --nproc_per_node=1 -m monai.bundle run training`` of the lung bundle
                            with ``multi_gpu_train.json`` merged (NCCL on CUDA, Gloo on CPU), tiny overrides.
``compile``                 ``compile_unets(dynamic=False)`` inference in a child process (bf16, then float32): the
                            first call (compilation) and the median after it. Skipped in ``--quick`` mode.

The JSON holds the machine, the versions, every number, the goals (175³ one direction <= 25 ms in bf16 on an
H100/H200-class GPU; training throughput >= 3x the reference) and the printed table; it is rewritten after every
section, so a run stopped at its time limit still leaves what it measured.

Weights: the 4-step network with PyTorch's default initialisation, random last layers (so the maps are not the
identity) and random BatchNorm running statistics (``random_network``); the reference gets the same tensors in the
released layout (``monai_gradicon.weights.network_to_official_state``). Images: ``bench/cases.make_images``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SECTIONS = ("inference", "training", "agreement", "instance_optimization", "field_optimization", "register", "ddp",
            "compile")
GOALS = {
    "inference_175_bf16_ms": {"limit": 25.0, "op": "<=", "what": "175³ one direction in bf16 (ms), on an "
                                                                  "H100/H200-class GPU"},
    "training_throughput_ratio": {"limit": 3.0, "op": ">=", "what": "training pairs/s ours / reference, same batch "
                                                                    "(largest batch measured), float32"},
}
GPU_CLASS_FOR_GOAL = ("H100", "H200", "H800", "H20", "GH200")
LNCC_SIGMA = 5.0
LAMBDA = 1.5
TRAIN_LR = 1e-4
IO_LR = 2e-5
WEIGHT_SEED = 1
NOISE_SEED = 1234
SCHEMA_VERSION = 1


# ------------------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    """Sizes and repeat counts of one run (``full`` for the GPU, ``quick`` for CI on 2 CPU cores)."""

    size: int = 175
    batches: tuple[int, ...] = (1, 4)
    inference_warmup: int = 3
    inference_repeats: int = 20
    inference_variants: tuple[str, ...] = ("fp32", "bf16", "fp32+cudnn_benchmark", "bf16+cudnn_benchmark")
    train_warmup: int = 2
    train_repeats: int = 5
    train_variants: tuple[str, ...] = ("ours:default", "ours:bf16", "ours:no_recompute", "reference:default")
    io_extra_steps: int = 5
    io_warmup: int = 1
    io_repeats: int = 3
    field_warmup: bool = True
    field_steps: int = 11
    register_io: tuple[int, ...] = (0, 50)
    register_shape: tuple[int, int, int] = (128, 128, 80)  # the synthetic pair, when no real one is carried
    ddp: bool = True
    compile: bool = True
    compile_repeats: int = 10
    cpu_vs_cuda: bool = True
    reserve_s: float = 20.0  # stop timed repeats when less than this is left of the budget


def make_plan(quick: bool, device: str) -> Plan:
    if not quick:
        plan = Plan()
        if device == "cpu":  # a full-size run on a CPU: no cudnn variants, nothing to compare with itself
            plan.inference_variants = ("fp32", "bf16")
            plan.cpu_vs_cuda = False
        return plan
    return Plan(
        size=65,  # the smallest input of the 4-step network (16 * 2^2 + 1)
        batches=(2,),  # one batch > 1: the batched paths, at the cost of about 4 single steps
        inference_warmup=0,
        inference_repeats=1,
        inference_variants=("fp32", "bf16") if device == "cpu" else Plan.inference_variants,
        train_warmup=0,
        train_repeats=1,
        train_variants=("ours:default", "reference:default"),  # bf16 runs in inference and agreement
        io_extra_steps=0,  # the 1-step call only
        io_warmup=0,
        io_repeats=1,
        field_warmup=False,
        field_steps=3,
        register_io=(0,),
        register_shape=(48, 48, 40),
        compile=False,
        compile_repeats=2,
        cpu_vs_cuda=device != "cpu",
        reserve_s=5.0,
    )


class Skip(Exception):
    """A section (or a part of one) that does not apply here; the message is the recorded reason."""


# ------------------------------------------------------------------------------------------------------------ helpers
def _torch():
    import torch

    return torch


def sync(device) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def fmt_s(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_b(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def fmt_e(x) -> str:
    return "-" if x is None else f"{x:.1e}"


class Budget:
    """The run's deadline (``time.perf_counter`` seconds)."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds
        self.deadline = self.start + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Memory:
    """Peak device memory of a region: ``torch.cuda.max_memory_allocated`` above what was allocated at its start
    (weights and inputs made inside the region count); on CPU the process' peak RSS so far (not per region)."""

    def __init__(self, device) -> None:
        self.torch = _torch()
        self.cuda = self.torch.device(device).type == "cuda"
        self.device = device

    def __enter__(self) -> Memory:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        return None

    def record(self) -> dict:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return {"peak_bytes": int(self.torch.cuda.max_memory_allocated(self.device) - self.base),
                    "peak_reserved_bytes": int(self.torch.cuda.max_memory_reserved(self.device)),
                    "allocated_before_bytes": int(self.base)}
        return {"peak_bytes": None, "process_peak_rss_bytes": peak_rss_bytes()}


def peak_rss_bytes() -> int | None:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if platform.system() == "Darwin" else int(peak) * 1024
    except Exception:
        return None


def free_memory() -> None:
    gc.collect()
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(fn: Callable[[], object], device, warmup: int, repeats: int, budget: Budget, reserve_s: float) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then up to ``repeats`` timed times (CUDA events on a GPU, the host clock
    after a synchronisation on a CPU); fewer when the budget runs low (at least one timed run). Returns the times,
    their median and minimum, the first call's wall time and the first result."""
    torch = _torch()
    cuda = torch.device(device).type == "cuda"
    first_result = None
    first_wall = None
    for i in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        if i == 0:
            first_wall, first_result = time.perf_counter() - t0, out
        out = None
        if budget.left() < reserve_s:
            break
    times: list[float] = []
    walls: list[float] = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            out = fn()
            times.append(time.perf_counter() - t0)
        walls.append(time.perf_counter() - t0)
        if first_result is None:
            first_wall, first_result = walls[-1], out
        out = None
        if budget.left() < reserve_s:
            break
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "host_wall_median_s": statistics.median(walls),
        "warmup": warmup,
        "repeats": len(times),
        "repeats_planned": repeats,
        "first_call_s": first_wall,
        "first_result": first_result,
    }


def _strip(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "first_result"}


def random_network(seed: int = WEIGHT_SEED):
    """The 4-step network with default initialisation, random last layers and random BatchNorm statistics (the
    same recipe as ``bench/cases.random_weights``, built from our modules so no reference is needed)."""
    torch = _torch()
    from monai_gradicon.networks import gradicon_network

    torch.manual_seed(seed)
    net = gradicon_network(4, 3)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lastConv" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / (p[0].numel() ** 0.5))
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return net


def reference_available() -> str | None:
    """``None`` when icon_registration imports, else the reason it does not."""
    try:
        import icon_registration  # noqa: F401
        from icon_registration import losses, network_wrappers, networks  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"the reference (icon_registration 1.1.9) does not import: {type(exc).__name__}: {exc}"
    return None


def set_unet_recompute(net, levels: int) -> None:
    from monai_gradicon.networks import UNet2

    for m in net.modules():
        if isinstance(m, UNet2):
            m.recompute_levels = levels


# ------------------------------------------------------------------------------------------------------------ context
@dataclass
class Context:
    device: str
    plan: Plan
    budget: Budget
    workdir: Path
    args: argparse.Namespace
    official_state: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        n = self.plan.size
        return (n, n, n)

    def pair(self, batch: int = 1):
        """``batch`` different smooth image pairs ``[batch, 1, N, N, N]`` on the device (cached)."""
        key = batch
        if key not in self.images:
            torch = _torch()
            from cases import make_images

            pairs = [make_images(self.plan.size, "cpu", seed=7 + 10 * i) for i in range(batch)]
            a = torch.cat([p[0] for p in pairs]).to(self.device)
            b = torch.cat([p[1] for p in pairs]).to(self.device)
            self.images[key] = (a, b)
        return self.images[key]

    def drop_images(self) -> None:
        self.images.clear()
        free_memory()

    def ours(self, device=None):
        """A fresh copy of our network with the shared random weights, on ``device`` (default the run's)."""
        from monai_gradicon.networks import gradicon_network
        from monai_gradicon.weights import load_network_weights

        net = gradicon_network(4, 3)
        load_network_weights(net, self.official_state)
        return net.to(device or self.device)

    def reference(self):
        """The reference tree with the same weights (strict load), on the device."""
        from cases import reference_tree

        tree = reference_tree(4)
        tree.load_state_dict(self.official_state, strict=True)
        return tree.to(self.device)


# ------------------------------------------------------------------------------------------------------------ sections
def section_inference(ctx: Context) -> dict:
    torch = _torch()
    plan, device, shape = ctx.plan, ctx.device, ctx.shape
    a, b = ctx.pair(1)
    net = ctx.ours().eval()
    rows = {}
    bench_before = torch.backends.cudnn.benchmark
    try:
        for variant in plan.inference_variants:
            if ctx.budget.left() < plan.reserve_s:
                rows[variant] = {"status": "skipped", "reason": "time budget"}
                continue
            precision, _, extra = variant.partition("+")
            if extra == "cudnn_benchmark" and torch.device(device).type != "cuda":
                rows[variant] = {"status": "skipped", "reason": "cudnn.benchmark applies to CUDA only"}
                continue
            torch.backends.cudnn.benchmark = extra == "cudnn_benchmark"
            net.set_mixed_precision(torch.bfloat16 if precision == "bf16" else None)

            def infer():
                with torch.inference_mode():
                    return net(a, b).on_grid(shape)

            try:
                with Memory(device) as mem:
                    m = measure(infer, device, plan.inference_warmup, plan.inference_repeats, ctx.budget,
                                plan.reserve_s)
                    rows[variant] = {"status": "ok", **_strip(m), **mem.record(),
                                     "map_finite": bool(torch.isfinite(m["first_result"]).all())}
            except Exception as exc:  # e.g. CUDA out of memory: record and go on with the next variant
                rows[variant] = {"status": "error", "error": _error_text(exc)}
            free_memory()
    finally:
        torch.backends.cudnn.benchmark = bench_before
        net.set_mixed_precision(None)
    return {"size": plan.size, "what": "one direction: Phi_AB on the N³ grid, eval mode, inference_mode",
            "variants": rows}


def _train_builder(ctx: Context, impl: str, variant: str, batch: int):
    """(step function, parameter count) for one training configuration; nothing is run here."""
    torch = _torch()
    a, b = ctx.pair(batch)
    if impl == "reference":
        from icon_registration import losses as rl

        tree = ctx.reference()
        model = rl.GradientICONSparse(tree, rl.LNCC(int(LNCC_SIGMA)), LAMBDA)
        model.assign_identity_map([1, 1, *ctx.shape])
        model.to(ctx.device)
        model.train()
        params = list(tree.parameters())
        opt = torch.optim.Adam(params, lr=TRAIN_LR)

        def step():
            opt.zero_grad(set_to_none=True)
            out = model(a, b)
            out.all_loss.backward()
            opt.step()
            return out.all_loss.detach()
    else:
        from monai_gradicon.losses import GradICONObjective, LNCCLoss

        net = ctx.ours()
        if variant == "bf16":
            net.set_mixed_precision(torch.bfloat16)
        elif variant == "no_recompute":
            set_unet_recompute(net, 0)
        elif variant != "default":
            raise ValueError(f"unknown training variant {variant!r}")
        objective = GradICONObjective(net, LNCCLoss(LNCC_SIGMA), lmbda=LAMBDA)
        objective.train()
        params = list(net.parameters())
        opt = torch.optim.Adam(params, lr=TRAIN_LR)
        generator = torch.Generator().manual_seed(NOISE_SEED)

        def step():
            opt.zero_grad(set_to_none=True)
            out = objective(a, b, generator=generator)
            out.loss.backward()
            opt.step()
            return out.loss.detach()

    return step, sum(p.numel() for p in params)


def section_training(ctx: Context) -> dict:
    torch = _torch()
    plan = ctx.plan
    ref_reason = reference_available()
    rows: list[dict] = []
    for batch in plan.batches:
        for entry in plan.train_variants:
            impl, _, variant = entry.partition(":")
            row = {"impl": impl, "variant": variant, "batch": batch}
            rows.append(row)
            if impl == "reference" and ref_reason:
                row.update(status="skipped", reason=ref_reason)
                continue
            if ctx.budget.left() < plan.reserve_s:
                row.update(status="skipped", reason="time budget")
                continue
            try:
                with Memory(ctx.device) as mem:
                    step, nparams = _train_builder(ctx, impl, variant, batch)
                    m = measure(step, ctx.device, plan.train_warmup, plan.train_repeats, ctx.budget, plan.reserve_s)
                    loss = float(m["first_result"])
                    row.update(status="ok", **_strip(m), **mem.record(), parameters=nparams, first_loss=loss,
                               loss_finite=bool(torch.isfinite(torch.tensor(loss))),
                               pairs_per_s=batch / m["median_s"])
                    del step
            except Exception as exc:
                row.update(status="error", error=_error_text(exc))
            free_memory()
        if batch != 1:  # the batch-1 pair is shared with the later sections
            ctx.images.pop(batch, None)
    free_memory()

    # throughput ours / reference at the same batch
    ratios = {}
    for batch in plan.batches:
        ref = next((r for r in rows if r["impl"] == "reference" and r["batch"] == batch and r["status"] == "ok"), None)
        for r in rows:
            if r["impl"] == "ours" and r["batch"] == batch and r["status"] == "ok" and ref:
                ratios[f"batch{batch}:{r['variant']}"] = r["pairs_per_s"] / ref["pairs_per_s"]

    # the jitter of our objective is drawn on the host each step (as the reference does): its cost at this size
    from monai_gradicon.losses.regularizers import draw_noise

    t0 = time.perf_counter()
    for _ in range(3):
        draw_noise(ctx.shape, generator=torch.Generator().manual_seed(0), device=ctx.device)
    sync(ctx.device)
    noise_s = (time.perf_counter() - t0) / 3
    return {"size": plan.size, "what": "forward (both directions) + backward + Adam step, train mode, LNCC sigma 5 + "
                                       "1.5 GradICON-sparse", "rows": rows, "throughput_ratio_vs_reference": ratios,
            "reference_skipped": ref_reason, "host_noise_draw_s": noise_s}


def section_agreement(ctx: Context) -> dict:
    torch = _torch()
    from monai_gradicon.losses import GradICONObjective, LNCCLoss
    from monai_gradicon.losses.regularizers import draw_noise

    shape, n = ctx.shape, ctx.plan.size
    a, b = ctx.pair(1)
    net = ctx.ours().eval()
    out: dict = {"size": n, "units": "map differences in voxels of the N³ grid (normalized difference x (N - 1))"}

    def map_of(model):
        with torch.inference_mode():
            return model(a, b).on_grid(shape).float()

    noise = draw_noise(shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    objective = GradICONObjective(net, LNCCLoss(LNCC_SIGMA), lmbda=LAMBDA).eval()

    def objective_terms():
        with torch.no_grad():
            o = objective(a, b, noise=noise)
            return {k: float(getattr(o, k)) for k in ("loss", "similarity", "regularizer")}

    fp32_map = map_of(net)
    fp32_terms = objective_terms()
    net.set_mixed_precision(torch.bfloat16)
    bf16_map = map_of(net)
    bf16_terms = objective_terms()
    net.set_mixed_precision(None)
    out["bf16_vs_fp32"] = {
        "max_map_diff_voxels": float((bf16_map - fp32_map).abs().max()) * (n - 1),
        "mean_map_diff_voxels": float((bf16_map - fp32_map).abs().mean()) * (n - 1),
        **{f"rel_diff_{k}": abs(bf16_terms[k] - v) / max(abs(v), 1e-12) for k, v in fp32_terms.items()},
        "fp32_terms": fp32_terms, "bf16_terms": bf16_terms,
        "objective": "eval mode, the same jitter noise, no gradient",
    }
    del bf16_map

    reason = reference_available()
    if reason:
        out["ours_vs_reference"] = {"status": "skipped", "reason": reason}
    else:
        tree = ctx.reference().eval()
        tree.assign_identity_map([1, 1, *shape])
        tree.to(ctx.device)
        with torch.no_grad():
            ident = tree.identity_map
            ident.isIdentity = True
            ref_map = tree(a, b)(ident).float()
        out["ours_vs_reference"] = {"status": "ok", "max_map_diff_voxels": float((ref_map - fp32_map).abs().max())
                                    * (n - 1), "what": "float32, eval mode, the same weights and images"}
        del tree, ref_map

    if torch.device(ctx.device).type == "cuda" and ctx.plan.cpu_vs_cuda:
        if ctx.budget.left() < 4 * ctx.plan.reserve_s:
            out["cuda_vs_cpu"] = {"status": "skipped", "reason": "time budget"}
        else:
            net_cpu = ctx.ours("cpu").eval()
            t0 = time.perf_counter()
            with torch.inference_mode():
                cpu_map = net_cpu(a.cpu(), b.cpu()).on_grid(shape)
            out["cuda_vs_cpu"] = {
                "status": "ok",
                "max_map_diff_voxels": float((cpu_map - fp32_map.cpu()).abs().max()) * (n - 1),
                "cpu_seconds": time.perf_counter() - t0,
                "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                "what": "float32 map on the GPU against the CPU's (TF32 convolutions on the GPU when allowed)",
            }
            del net_cpu, cpu_map
    else:
        out["cuda_vs_cpu"] = {"status": "skipped", "reason": "needs a CUDA device" if torch.device(ctx.device).type
                              != "cuda" else "not planned"}
    free_memory()
    return out


def section_instance_optimization(ctx: Context) -> dict:
    from monai_gradicon.instance_optimization import instance_optimize

    plan = ctx.plan
    a, b = ctx.pair(1)
    net = ctx.ours().eval()
    k = plan.io_extra_steps

    with Memory(ctx.device) as mem:
        one = measure(lambda: instance_optimize(net, a, b, steps=1, lr=IO_LR, progress=False), ctx.device,
                      plan.io_warmup, plan.io_repeats, ctx.budget, plan.reserve_s)
        memory = mem.record()
    out = {"size": plan.size, "one_step_call": _strip(one), **memory,
           "first_step_loss": one["first_result"].history[0]["loss"],
           "what": "instance_optimize(steps=1): eval mode, Adam lr 2e-5 over every weight, objective forward + "
                   "backward + step, plus the state copy/restore and the final forward passes"}
    if k > 0 and ctx.budget.left() > plan.reserve_s:
        more = measure(lambda: instance_optimize(net, a, b, steps=1 + k, lr=IO_LR, progress=False), ctx.device, 0,
                       plan.io_repeats, ctx.budget, plan.reserve_s)
        out[f"{1 + k}_step_call"] = _strip(more)
        out["per_step_s"] = (more["median_s"] - one["median_s"]) / k
        out["per_step_what"] = f"(median of the {1 + k}-step call - median of the 1-step call) / {k}"
    else:
        out["per_step_s"] = None
        out["per_step_what"] = "not measured (quick mode or time budget): only the 1-step call"
    free_memory()
    return out


def section_field_optimization(ctx: Context) -> dict:
    torch = _torch()
    try:
        import monai_gradicon.field_optimization as fo
    except ImportError as exc:
        raise Skip(f"monai_gradicon.field_optimization is not importable: {exc}") from None
    if not hasattr(fo, "optimize_fields"):
        raise Skip("monai_gradicon.field_optimization has no optimize_fields")
    plan, shape = ctx.plan, ctx.shape
    a, b = ctx.pair(1)
    net = ctx.ours().eval()
    with torch.inference_mode():
        phi_ab = net(a, b).on_grid(shape).clone()
        phi_ba = net(b, a).on_grid(shape).clone()
    phi_ab, phi_ba = phi_ab.clone(), phi_ba.clone()  # normal tensors (outside inference mode)
    del net
    free_memory()
    steps = max(plan.field_steps, 2)
    if plan.field_warmup:
        fo.optimize_fields(a, b, init_ab=phi_ab, init_ba=phi_ba, levels=1, iterations=2)
        sync(ctx.device)
    with Memory(ctx.device) as mem:
        t0 = time.perf_counter()
        res = fo.optimize_fields(a, b, init_ab=phi_ab, init_ba=phi_ba, levels=1, iterations=steps)
        sync(ctx.device)
        wall = time.perf_counter() - t0
        memory = mem.record()
    stamps = [h["seconds"] for h in res.history if "seconds" in h]
    spacing = [later - earlier for earlier, later in zip(stamps[1:-1], stamps[2:], strict=True)]  # after step 1
    out = {"size": plan.size, "steps": steps, "call_s": wall, "call_per_step_s": wall / steps, **memory,
           "first_loss": res.history[0].get("loss") if res.history else None,
           "last_loss": res.history[-1].get("loss") if res.history else None,
           "what": "optimize_fields from the network's two maps, one level (the input grid); per_step_s = median "
                   "spacing of the per-step timestamps after the first step"}
    out["per_step_s"] = statistics.median(spacing) if spacing else wall / steps
    free_memory()
    return out


def _pair_files(ctx: Context) -> tuple[Path, Path, str]:
    """The pair for the end-to-end case: ``--data`` (or ``.gpu_data/``) when it holds fixed/moving NIfTI files,
    else a synthetic lung phantom pair written to the work folder."""
    choice = ctx.args.data or ("synthetic" if ctx.args.quick else None)  # quick: the same small pair everywhere
    data = Path(choice) if choice and choice != "synthetic" else ROOT / ".gpu_data"
    fixed, moving = data / "fixed.nii.gz", data / "moving.nii.gz"
    if choice != "synthetic" and fixed.is_file() and moving.is_file():
        return fixed, moving, f"real CT pair from {data}"
    if ctx.args.data and ctx.args.data != "synthetic":
        raise FileNotFoundError(f"--data {ctx.args.data} holds no fixed.nii.gz / moving.nii.gz")
    from monai_gradicon.data.phantom_lung import make_lung_phantom_pair
    from monai_gradicon.io import write_nifti

    folder = ctx.workdir / "phantom"
    folder.mkdir(exist_ok=True)
    pair = make_lung_phantom_pair(shape=ctx.plan.register_shape, seed=0, spacing_mm=2.5, n_landmarks=8)
    write_nifti(folder / "fixed.nii.gz", pair.inspiration[0], pair.affine)
    write_nifti(folder / "moving.nii.gz", pair.expiration[0], pair.affine)
    return folder / "fixed.nii.gz", folder / "moving.nii.gz", f"synthetic lung phantom {ctx.plan.register_shape}"


def _child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH"), str(ROOT)) if p])
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(extra)
    return env


def _run_child(cmd: list[str], ctx: Context, limit_s: float, env: dict | None = None, cwd: Path | None = None) -> dict:
    timeout = min(limit_s, ctx.budget.left() - 5)
    if timeout < 10:
        raise Skip("time budget")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _child_env(),
                              cwd=str(cwd or ROOT), check=False)
    except subprocess.TimeoutExpired as exc:
        tail = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                       for x in (exc.stdout, exc.stderr))
        return {"returncode": None, "timed_out": True, "timeout_s": timeout, "wall_s": time.perf_counter() - t0,
                "log_tail": tail[-3000:]}
    return {"returncode": proc.returncode, "timed_out": False, "wall_s": time.perf_counter() - t0,
            "log": proc.stdout + proc.stderr}


def section_register(ctx: Context) -> dict:
    torch = _torch()
    plan = ctx.plan
    fixed, moving, source = _pair_files(ctx)
    released = plan.size == 175  # the released file name carries the 175³ lung_ct card
    weights = ctx.workdir / ("lung_model_weights_step_2.trch" if released else "random_gradicon_step_2.trch")
    torch.save(ctx.official_state, weights)
    runs = []
    for io in plan.register_io:
        out_dir = ctx.workdir / f"register_io{io}"
        cmd = [sys.executable, "-m", "monai_gradicon", "register", "--fixed", str(fixed), "--moving", str(moving),
               "--output_dir", str(out_dir), "--weights", str(weights), "--device", ctx.device,
               "--io_iterations", str(io), "--noprogress", "--overwrite"]
        if not released:
            cmd += ["--input_shape", ",".join(str(s) for s in ctx.shape), "--preprocess", "lung_ct"]
        run = {"io_iterations": io, "command": " ".join(cmd[1:])}
        runs.append(run)
        try:
            res = _run_child(cmd, ctx, 240)
        except Skip as exc:
            run.update(status="skipped", reason=str(exc))
            continue
        log = res.pop("log", "")
        run.update(res)
        summary_path = out_dir / "summary.json"
        if res["returncode"] == 0 and summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            run.update(status="ok", timings_seconds=summary.get("timings_seconds"), device=summary.get("device"),
                       folds_percent=summary.get("folds", {}).get("percent_voxels_detJ_le_0"),
                       log_jacobian_std=summary.get("log_jacobian_std"),
                       io_steps=summary.get("instance_optimization", {}).get("steps"),
                       files=sorted(os.listdir(out_dir)))
            overview = out_dir / "overview.png"
            if overview.is_file() and ctx.args.json:
                shutil.copy(overview, Path(ctx.args.json).resolve().parent / f"register_io{io}_overview.png")
        else:
            run.update(status="error", error=f"exit {res['returncode']}" + (" (timed out)" if res["timed_out"]
                                                                                else ""),
                       log_tail=(log or res.get("log_tail", ""))[-3000:])
    statuses = {r["status"] for r in runs}
    if "error" in statuses:
        raise SectionError("a register run failed", {"pair": source, "weights": weights.name, "runs": runs})
    return {"pair": source, "fixed": str(fixed), "moving": str(moving), "weights": weights.name, "runs": runs,
            "what": "python -m monai_gradicon register, wall time of the whole process and summary.json's stages"}


class SectionError(Exception):
    """A section that failed but has partial results to keep."""

    def __init__(self, message: str, partial: dict) -> None:
        super().__init__(message)
        self.partial = partial


DDP_OVERRIDES = {  # tests/bundle_helpers.py TRAIN_OVERRIDES + tests/test_bundle.py::test_multi_gpu_train_gloo
    "spatial_size": [17, 17, 17],
    "stage1_num_steps": 1,
    "two_stage": True,
    "stage1_iterations": 1,
    "stage2_iterations": 1,
    "epoch_length": 1,
    "val_interval": 1,
    "ckpt_interval": 1,
    "batch_size": 1,
    "num_workers": 0,
    "cache_rate": 1.0,
    "demo_dataset": {"n_pairs": 2, "shape": [32, 32, 32], "seed": 0, "spacing_mm": 5.0,
                     "breathing_amplitude_mm": 8.0, "n_landmarks": 8, "n_validation": 1},
}


def section_ddp(ctx: Context) -> dict:
    torch = _torch()
    bundle = ctx.workdir / "gradicon_lung"
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(ROOT / "bundles" / "gradicon_lung" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    configs = str([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "multi_gpu_train.json")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=1",
           "-m", "monai.bundle", "run", "training", "--config_file", configs, "--bundle_root", str(bundle)]
    for k, v in DDP_OVERRIDES.items():
        cmd += [f"--{k}", str(v) if isinstance(v, bool) else json.dumps(v)]
    cuda = torch.device(ctx.device).type == "cuda"
    env = _child_env(OMP_NUM_THREADS="1", NCCL_DEBUG="VERSION")
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run must use Gloo even where a GPU is present
    res = _run_child(cmd, ctx, 240, env=env)
    log = res.pop("log", "") or res.pop("log_tail", "")
    expected_backend = "nccl" if cuda else "gloo"
    checks = {
        "exit_0": res["returncode"] == 0,
        "model_written": (bundle / "models" / "model.pt").is_file(),
        "stage_2_started": "GradICON stage 2 starts" in log,
        "epoch_logged": "Epoch: 1/2, Iter: 1/1" in log,
    }
    out = {"backend_expected": expected_backend, **res, "checks": checks, "overrides": DDP_OVERRIDES,
           # informational: NCCL_DEBUG=VERSION prints its version when a communicator is made (one rank may not)
           "nccl_version_logged": next((line.strip() for line in log.splitlines() if "NCCL version" in line), None),
           "command": "torchrun --standalone --nnodes=1 --nproc_per_node=1 -m monai.bundle run training "
                      "--config_file [train.json, multi_gpu_train.json] (overrides above)"}
    if not all(checks.values()):
        out["log_tail"] = log[-4000:]
        raise SectionError("the DDP smoke run failed a check: " + ", ".join(k for k, v in checks.items() if not v),
                           out)
    return out


def planned_skip(name: str, ctx: Context) -> str | None:
    """Why a section does not run in this plan at all (before any time-budget reason)."""
    if name == "compile" and not (ctx.plan.compile or ctx.args.compile):
        return ("--quick: torch.compile takes minutes on a CPU (compilation); measured on CUDA runs (--compile "
                "forces it)" if ctx.args.quick else "not planned")
    if name == "ddp" and not ctx.plan.ddp:
        return "not planned"
    return None


def section_compile(ctx: Context) -> dict:
    weights = ctx.workdir / "weights_official.pt"
    _torch().save(ctx.official_state, weights)
    out_json = ctx.workdir / "compile.json"
    spec = {"device": ctx.device, "size": ctx.plan.size, "weights": str(weights), "out": str(out_json),
            "repeats": ctx.plan.compile_repeats, "reserve_s": ctx.plan.reserve_s, "backend": ctx.args.compile_backend}
    limit = max(ctx.budget.left() - 10, 0)
    spec["budget_s"] = limit - 10
    res = _run_child([sys.executable, str(Path(__file__).resolve()), "--worker-compile", json.dumps(spec)], ctx,
                     limit)
    log = res.pop("log", "") or res.pop("log_tail", "")
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    out = {"process": res, "variants": results,
           "what": "compile_unets(dynamic=False), eval, inference_mode: first call (compilation included), then "
                   "the median of the timed repeats; max_map_diff_voxels against the eager map of the same precision"}
    if res.get("returncode") != 0 and not results:
        out["log_tail"] = log[-4000:]
        raise SectionError("the compile child failed", out)
    if res.get("returncode") != 0:
        out["log_tail"] = log[-2000:]
    return out


def worker_compile(spec_json: str) -> int:
    """Child process of the ``compile`` section: compiled inference, bf16 first, results written after each."""
    import torch
    import torch._dynamo
    from cases import make_images

    from monai_gradicon.networks import gradicon_network
    from monai_gradicon.weights import load_network_weights

    spec = json.loads(spec_json)
    budget = Budget(spec["budget_s"])
    for name in ("recompile_limit", "cache_size_limit"):  # 4 UNets x 3 pyramid shapes: stay compiled
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    device, n = spec["device"], spec["size"]
    shape = (n, n, n)
    a, b = (t.to(device) for t in make_images(n, "cpu"))
    state = torch.load(spec["weights"], map_location="cpu", weights_only=True)
    results: dict = {}
    for precision in ("bf16", "fp32"):
        if budget.left() < 60:
            results[precision] = {"status": "skipped", "reason": "time budget"}
            break
        try:
            torch._dynamo.reset()  # each precision compiles from scratch (no stale graphs or guards)
            net = gradicon_network(4, 3)
            load_network_weights(net, state)
            net = net.to(device).eval()
            net.set_mixed_precision(torch.bfloat16 if precision == "bf16" else None)
            with torch.inference_mode():
                eager = net(a, b).on_grid(shape).float()
            net.compile_unets(dynamic=False, backend=spec.get("backend") or "inductor")
            print(f"compile {precision}: compiling and timing ({budget.left():.0f} s left)", flush=True)

            def infer(net=net):
                with torch.inference_mode():
                    return net(a, b).on_grid(shape)

            m = measure(infer, device, 2, spec["repeats"], budget, spec["reserve_s"])
            diff = float((m["first_result"].float() - eager).abs().max()) * (n - 1)
            results[precision] = {"status": "ok", **_strip(m), "compile_and_first_call_s": m["first_call_s"],
                                  "max_map_diff_voxels": diff, "backend": spec.get("backend") or "inductor"}
            print(f"compile {precision}: first call {m['first_call_s']:.1f} s, median {m['median_s'] * 1000:.1f} ms",
                  flush=True)
        except Exception as exc:
            results[precision] = {"status": "error", "error": _error_text(exc)}
        Path(spec["out"]).write_text(json.dumps(results, indent=1, default=str))
        free_memory()
    Path(spec["out"]).write_text(json.dumps(results, indent=1, default=str))
    return 0


SECTION_FUNCS = {
    "inference": section_inference,
    "training": section_training,
    "agreement": section_agreement,
    "instance_optimization": section_instance_optimization,
    "field_optimization": section_field_optimization,
    "register": section_register,
    "ddp": section_ddp,
    "compile": section_compile,
}
# a section is started only when this much of the budget is left (seconds; the GPU / CPU-quick estimates)
SECTION_MIN_S = {"inference": (15, 5), "training": (30, 10), "agreement": (15, 5), "instance_optimization": (15, 5),
                 "field_optimization": (10, 5), "register": (40, 20), "ddp": (40, 20), "compile": (90, 30)}


# ------------------------------------------------------------------------------------------------------------ report
def _why(rec: dict) -> str:
    """A record's skip reason, or the first line of its error."""
    text = rec.get("reason") or rec.get("error") or ""
    return text.splitlines()[0] if text else ""


def _error_text(exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"{type(exc).__name__}: {exc}\n{tb[-2500:]}"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def source_digest() -> str:
    """SHA-256 over monai_gradicon's .py files (path and content): identifies the code where no git is."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "monai_gradicon").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def machine_info(device: str) -> dict:
    torch = _torch()
    info: dict = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg"] = os.getloadavg()
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count(),
                    cudnn_benchmark_default=bool(torch.backends.cudnn.benchmark),
                    cudnn_allow_tf32=bool(torch.backends.cudnn.allow_tf32),
                    matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
        try:
            query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
            smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20, check=False)
            info["nvidia_smi"] = smi.stdout.strip()
        except Exception as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions() -> dict:
    torch = _torch()
    out = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("monai", "numpy", "nibabel", "pytorch-ignite", "fire", "scipy", "icon_registration", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        import monai_gradicon

        out["monai_gradicon"] = getattr(monai_gradicon, "__version__", None)
        out["monai_gradicon_path"] = os.path.dirname(monai_gradicon.__file__)
    except Exception as exc:
        out["monai_gradicon"] = f"import failed: {exc}"
    out["git_commit"] = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    out["git_dirty_files"] = None if status is None else len([line for line in status.splitlines() if line])
    out["monai_gradicon_source_sha256"] = source_digest()
    return out


def goals(report: dict) -> dict:
    """The issue's two goals, with the value, whether it is met, and why not applicable where not."""
    sections = report["sections"]
    machine = report["machine"]
    out = {}
    g = dict(GOALS["inference_175_bf16_ms"])
    inf = sections.get("inference", {})
    candidates = {}
    for name, row in (inf.get("variants") or {}).items():
        if name.startswith("bf16") and row.get("status") == "ok":
            candidates[f"eager {name}"] = row["median_s"] * 1000
    comp = (sections.get("compile", {}).get("variants") or {}).get("bf16", {})
    if comp.get("status") == "ok":
        candidates[f"compiled bf16 ({comp.get('backend', 'inductor')})"] = comp["median_s"] * 1000
    gpu = machine.get("gpu") or ""
    if not candidates:
        g.update(value=None, met=None, note="no bf16 inference measured")
    else:
        best = min(candidates, key=candidates.get)
        g.update(value=candidates[best], best_mode=best, all_modes=candidates)
        applicable = (report["plan"]["size"] == 175 and report["device"].startswith("cuda")
                      and any(c in gpu for c in GPU_CLASS_FOR_GOAL))
        g["met"] = candidates[best] <= g["limit"] if applicable else None
        if not applicable:
            g["note"] = (f"not applicable: the goal is for 175³ on an H100/H200-class GPU (this run: "
                         f"{report['plan']['size']}³ on {gpu or report['device']})")
    out["inference_175_bf16_ms"] = g

    g = dict(GOALS["training_throughput_ratio"])
    tr = sections.get("training", {})
    ratios = tr.get("throughput_ratio_vs_reference") or {}
    batches = sorted({int(k.split(":")[0][5:]) for k in ratios})
    if not batches:
        g.update(value=None, met=None, note=tr.get("reference_skipped") or "no pair of ours and reference measured")
    else:
        b = batches[-1]
        value = ratios.get(f"batch{b}:default")
        g.update(value=value, batch=b, all_ratios=ratios,
                 met_with=[k for k, v in ratios.items() if v >= g["limit"]])
        applicable = report["device"].startswith("cuda") and report["plan"]["size"] == 175
        g["met"] = (value is not None and value >= g["limit"]) if applicable else None
        if not applicable:
            g["note"] = "not applicable: the goal is for 175³ training on a GPU"
    out["training_throughput_ratio"] = g
    return out


def format_table(report: dict) -> str:
    s = report["sections"]
    m = report["machine"]
    n = report["plan"]["size"]
    lines = [(f"GradICON GPU check on {report['device']} ({m.get('gpu') or m.get('cpu')}), torch "
              f"{report['versions'].get('torch')}, {n}³, {'quick' if report['quick'] else 'full'}, "
              f"{report['duration_s']:.0f} s of a {report['budget_s']:.0f} s budget")]

    def status_line(name):
        sec = s.get(name, {})
        st = sec.get("status", "not run")
        if st == "ok":
            return None
        return f"  [{st}] {_why(sec)[:150]}"

    lines.append(f"\ninference, one direction ({n}³)        median      min        peak mem")
    sl = status_line("inference")
    if sl:
        lines.append(sl)
    for name, row in (s.get("inference", {}).get("variants") or {}).items():
        if row.get("status") == "ok":
            lines.append(f"  {name:<34} {fmt_s(row['median_s']):>9} {fmt_s(row['min_s']):>9} "
                         f"{fmt_b(row.get('peak_bytes')):>10}")
        else:
            lines.append(f"  {name:<34} [{row.get('status')}] {(row.get('reason') or row.get('error') or '')[:80]}")
    comp = s.get("compile", {})
    for name, row in (comp.get("variants") or {}).items():
        if row.get("status") == "ok":
            lines.append(f"  {name + ' compiled':<34} {fmt_s(row['median_s']):>9} {fmt_s(row['min_s']):>9} "
                         f"{'':>10}  (compile + first call {fmt_s(row.get('compile_and_first_call_s'))})")
        else:
            lines.append(f"  {name + ' compiled':<34} [{row.get('status')}] "
                         f"{(row.get('reason') or row.get('error') or '')[:80]}")
    sl = status_line("compile")
    if sl:
        lines.append("  compile" + sl)

    lines.append(f"\ntraining step ({n}³)            batch   median   pairs/s   peak mem   throughput vs reference")
    sl = status_line("training")
    if sl:
        lines.append(sl)
    tr = s.get("training", {})
    ratios = tr.get("throughput_ratio_vs_reference") or {}
    for row in tr.get("rows") or []:
        label = f"{row['impl']} {row['variant']}"
        if row.get("status") == "ok":
            ratio = ratios.get(f"batch{row['batch']}:{row['variant']}") if row["impl"] == "ours" else None
            lines.append(f"  {label:<30} {row['batch']:>4} {fmt_s(row['median_s']):>9} {row['pairs_per_s']:>8.2f} "
                         f"{fmt_b(row.get('peak_bytes')):>10}   {'-' if ratio is None else f'{ratio:.2f}x'}")
        else:
            lines.append(f"  {label:<30} {row['batch']:>4} [{row.get('status')}] "
                         f"{(row.get('reason') or row.get('error') or '')[:80]}")
    if tr.get("host_noise_draw_s") is not None:
        lines.append(f"  (host jitter draw per step: {fmt_s(tr['host_noise_draw_s'])})")

    io = s.get("instance_optimization", {})
    lines.append("\ninstance optimization / field IO")
    if io.get("status") == "ok":
        lines.append(f"  network IO: 1-step call {fmt_s(io['one_step_call']['median_s'])}, one more step "
                     f"{fmt_s(io['per_step_s'])}, peak {fmt_b(io.get('peak_bytes'))}")
    else:
        lines.append("  network IO" + (status_line("instance_optimization") or ""))
    fo = s.get("field_optimization", {})
    if fo.get("status") == "ok":
        lines.append(f"  field IO: one step {fmt_s(fo['per_step_s'])} ({fo['steps']}-step call {fmt_s(fo['call_s'])}),"
                     f" peak {fmt_b(fo.get('peak_bytes'))}")
    else:
        lines.append("  field IO" + (status_line("field_optimization") or ""))

    reg = s.get("register", {})
    lines.append(f"\nregister end to end ({reg.get('pair', '-')})")
    for run in reg.get("runs") or []:
        if run.get("status") == "ok":
            t = run.get("timings_seconds") or {}
            stages = ", ".join(f"{k} {v:.1f}" for k, v in t.items())
            lines.append(f"  --io_iterations {run['io_iterations']:<3} process {run['wall_s']:.1f} s; stages (s): "
                         f"{stages}")
        else:
            lines.append(f"  --io_iterations {run['io_iterations']:<3} [{run.get('status')}] "
                         f"{(run.get('reason') or run.get('error') or '')[:100]}")
    sl = status_line("register")
    if sl and not reg.get("runs"):
        lines.append(sl)

    ag = s.get("agreement", {})
    lines.append("\nagreement (max map difference in voxels; relative loss difference)")
    if ag.get("status") == "ok":
        bf = ag["bf16_vs_fp32"]
        lines.append(f"  bf16 vs float32: map {fmt_e(bf['max_map_diff_voxels'])} vox (mean "
                     f"{fmt_e(bf['mean_map_diff_voxels'])}), loss {fmt_e(bf['rel_diff_loss'])}, similarity "
                     f"{fmt_e(bf['rel_diff_similarity'])}, regularizer {fmt_e(bf['rel_diff_regularizer'])}")
        for key, label in (("ours_vs_reference", "ours vs reference (float32)"), ("cuda_vs_cpu", "CUDA vs CPU")):
            r = ag.get(key, {})
            lines.append(f"  {label}: " + (f"map {fmt_e(r['max_map_diff_voxels'])} vox" if r.get("status") == "ok"
                                           else f"[{r.get('status')}] {r.get('reason', '')[:90]}"))
    else:
        lines.append(status_line("agreement") or "")

    dd = s.get("ddp", {})
    if dd.get("status") == "ok":
        lines.append(f"\nDDP smoke (torchrun, 1 process, {dd['backend_expected']}): ok in {dd['wall_s']:.0f} s")
    else:
        lines.append("\nDDP smoke" + (status_line("ddp") or ""))

    lines.append("\ngoals")
    for key, g in report.get("goals", {}).items():
        met = {True: "met", False: "NOT met", None: "n/a"}[g.get("met")]
        value = "-" if g.get("value") is None else f"{g['value']:.2f}"
        extra = f"  ({g['best_mode']})" if g.get("best_mode") else (f"  (batch {g['batch']})" if g.get("batch")
                                                                    else "")
        lines.append(f"  {key:<28} {value:>8} {g['op']} {g['limit']:<5} {met}{extra}"
                     + (f"  {g['note']}" if g.get("note") else ""))
    counts: dict = {}
    for name in SECTIONS:
        counts.setdefault(s.get(name, {}).get("status", "not run"), []).append(name)
    lines.append("\nsections: " + "; ".join(f"{k} {len(v)} ({', '.join(v)})" for k, v in counts.items()))
    return "\n".join(lines)


def write_json(report: dict, path: str | None) -> None:
    if not path:
        return
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], required=False, default=None,
                   help="cuda (the GPU check) or cpu (with --quick: the CI-sized run)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI on 2 CPU cores)")
    p.add_argument("--json", default=None, help="where to write the JSON report (rewritten after every section)")
    p.add_argument("--table", default=None, help="also write the printed table to this file")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole run (sections that would not fit are skipped with that reason); "
                        "default 400 (quick: 170)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these")
    p.add_argument("--size", type=int, default=None, help="override the cube size (default 175; quick 65)")
    p.add_argument("--data", default=None,
                   help="folder with fixed.nii.gz and moving.nii.gz for the register case (default .gpu_data/ when "
                        "present, else a synthetic phantom; 'synthetic' forces the phantom)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--compile", action="store_true", help="run the compile section in --quick mode too")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile section (default inductor; 'eager' checks the tracing "
                        "only, in seconds)")
    p.add_argument("--worker-compile", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_compile is None and args.device is None:
        p.error("--device is required (cuda or cpu)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker_compile:
        return worker_compile(args.worker_compile)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    budget = Budget(args.budget_s if args.budget_s is not None else (170.0 if args.quick else 400.0))
    torch = _torch()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device == "cuda":
        device = "cuda:0"
        torch.cuda.set_device(0)
    plan = make_plan(args.quick, args.device)
    if args.size:
        plan.size = args.size
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gradicon_gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)

    report: dict = {
        "schema": SCHEMA_VERSION,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "quick": args.quick,
        "budget_s": budget.seconds,
        "args": {k: v for k, v in vars(args).items() if k != "worker_compile"},
        "plan": asdict(plan),
        "goals_defined": GOALS,
        "sections": {},
    }
    print(f"GradICON GPU check: device {device}, {plan.size}³, {'quick' if args.quick else 'full'}, budget "
          f"{budget.seconds:.0f} s, sections {' '.join(args.sections)}", flush=True)
    try:
        report["machine"] = machine_info(device)
        report["versions"] = versions()
    except Exception as exc:
        report.setdefault("machine", {})["error"] = _error_text(exc)
        report.setdefault("versions", {})
    write_json(report, args.json)

    ctx = Context(device=device, plan=plan, budget=budget, workdir=workdir, args=args)
    try:
        from monai_gradicon.weights import network_to_official_state

        ctx.official_state = network_to_official_state(random_network())
    except Exception as exc:  # without weights nothing can run: record why
        report["setup_error"] = _error_text(exc)
        print(report["setup_error"], file=sys.stderr)

    cpu_index = 1 if args.device == "cpu" else 0
    for name in SECTIONS:
        rec: dict
        t0 = time.perf_counter()
        if name not in args.sections:
            rec = {"status": "skipped", "reason": "not selected (--sections)"}
        elif planned_skip(name, ctx):
            rec = {"status": "skipped", "reason": planned_skip(name, ctx)}
        elif not ctx.official_state:
            rec = {"status": "error", "error": "setup failed: " + report.get("setup_error", "")[:500]}
        elif budget.left() < SECTION_MIN_S[name][cpu_index]:
            rec = {"status": "skipped", "reason": f"time budget ({budget.left():.0f} s left, section needs "
                                                  f"~{SECTION_MIN_S[name][cpu_index]} s)"}
        else:
            print(f"[{budget.elapsed():6.1f} s] {name} ...", flush=True)
            try:
                rec = {"status": "ok", **SECTION_FUNCS[name](ctx)}
            except Skip as exc:
                rec = {"status": "skipped", "reason": str(exc)}
            except SectionError as exc:
                rec = {"status": "error", "error": str(exc), **exc.partial}
            except Exception as exc:
                rec = {"status": "error", "error": _error_text(exc)}
            finally:
                free_memory()
        rec["seconds"] = time.perf_counter() - t0
        report["sections"][name] = rec
        if name in args.sections:
            why = _why(rec)[:200] if rec["status"] != "ok" else ""
            print(f"[{budget.elapsed():6.1f} s] {name}: {rec['status']} ({rec['seconds']:.1f} s) {why}", flush=True)
        report["duration_s"] = budget.elapsed()
        write_json(report, args.json)

    ctx.drop_images()
    report["goals"] = goals(report)
    report["duration_s"] = budget.elapsed()
    table = format_table(report)
    report["table_text"] = table
    write_json(report, args.json)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table + "\n")
    if own_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table)
    if args.json:
        print(f"\nJSON written to {os.path.abspath(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
