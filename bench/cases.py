"""Measurement cases shared by ``compare_reference.py`` (one case per worker process) and the smoke test.

Each case builds one implementation ("reference" = icon_registration 1.1.9, "ours" = monai_gradicon) with the same
weights (a reference state dict saved once by the orchestrator) on the same deterministic inputs, runs ``warmup``
untimed and ``repeats`` timed iterations, and returns a JSON-able dict with the times, the process' peak memory and a
few output values used to check that both implementations computed the same thing.

Cases (``N`` = spatial size, 4-step model, batch 1):

* ``inference``  one direction, no gradient, eval mode: the map ``Phi_AB`` on the ``N³`` grid.
* ``train_step`` both directions, LNCC sigma 5, GradICON-sparse (lambda 1.5), backward, Adam step; train mode.
* ``lncc``       LNCC sigma 5 loss forward + backward w.r.t. the warped image (``[1, 1, N, N, N]``).
* ``io_step``    one instance-optimization step: eval mode, Adam lr 2e-5 over all parameters, objective
  forward + backward + step.

Variants of ours (opt-in modes): ``exact`` (no channels-last layers: the reference's exact operations),
``checkpointing`` (activation checkpointing, same numbers), ``lean``
(checkpointing plus recomputed compositions, ``net.set_recompute_compositions(True)``, in a process whose glibc
allocator returns every block of 1 MiB or more to the system when it is freed, ``MALLOC_MMAP_THRESHOLD_=1048576``;
the reference can be run with the same allocator setting), ``bf16`` (UNets under
bfloat16 autocast, numbers change: the deviation from float32 is reported), ``compile`` (``torch.compile`` of the
UNets).
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch

IMPLS = ("reference", "ours")
CASES = ("inference", "train_step", "lncc", "io_step")
VARIANTS = ("default", "exact", "checkpointing", "lean", "bf16", "compile")
# environment of the worker process per variant (must be set before the process starts)
VARIANT_ENV = {"lean": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}
NOISE_SEED = 1234
IMAGE_SEED = 7
LNCC_SIGMA = 5
LAMBDA = 1.5
TRAIN_LR = 1e-4
IO_LR = 2e-5


# ----------------------------------------------------------------------------------------------------- inputs
def make_images(n: int, device: torch.device | str = "cpu", seed: int = IMAGE_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Two different smooth random images in [0, 1], ``[1, 1, n, n, n]`` (deterministic, CPU-generated)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((2, 1, 12, 12, 12), generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(n, n, n), mode="trilinear", align_corners=True)
    img = img + 0.05 * torch.rand(img.shape, generator=g)  # some fine texture for LNCC
    img = (img - img.min()) / (img.max() - img.min())
    return img[:1].contiguous().to(device), img[1:].contiguous().to(device)


# ----------------------------------------------------------------------------------------------------- weights
def reference_tree(num_steps: int = 4):
    """The reference 4-step tree (reference notes §4.2), built from icon_registration's public building blocks
    (its ``pretrained_models`` module needs itk)."""
    from icon_registration import network_wrappers as rw
    from icon_registration import networks as rn

    def unet():
        return rw.FunctionFromVectorField(rn.tallUNet2(dimension=3))

    net = unet()
    for _ in range(min(num_steps, 3) - 1):
        net = rw.TwoStepRegistration(rw.DownsampleRegistration(net, dimension=3), unet())
    if num_steps == 4:
        net = rw.TwoStepRegistration(net, unet())
    return net


def random_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    """A reference-layout state dict (188 tensors) with default init, random last layers (so the maps are not the
    identity) and random BatchNorm running statistics (so eval mode differs from train mode)."""
    torch.manual_seed(seed)
    tree = reference_tree(4)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in tree.named_parameters():
            if "lastConv" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / (p[0].numel() ** 0.5))
        for name, b in tree.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return {k: v.clone() for k, v in tree.state_dict().items()}


def _load_state(path: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except TypeError:  # older torch without mmap
        return torch.load(path, map_location="cpu")


# ----------------------------------------------------------------------------------------------------- memory
def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages (as ``uptime`` prints them), or ``n/a``."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if platform.system() == "Darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


# ----------------------------------------------------------------------------------------------------- builders
class _Built:
    """What a case needs: ``step()`` runs one timed iteration and returns a dict of output values (floats), or
    tensors under the key ``"map"`` (saved for the orchestrator's comparison)."""

    def __init__(self, step: Callable[[], dict]) -> None:
        self.step = step


def _ours_network(state: dict, device, variant: str):
    from monai_gradicon.networks import gradicon_network
    from monai_gradicon.weights import load_network_weights

    net = gradicon_network(4, 3, checkpointing=variant in ("checkpointing", "lean"))
    net.set_recompute_compositions(variant == "lean")
    load_network_weights(net, state)
    net = net.to(device)
    if variant == "exact":
        net.set_channels_last(False)
    elif variant == "bf16":
        net.set_mixed_precision(torch.bfloat16)
    elif variant == "compile":
        net.compile_unets()
    return net


def _reference_network(state: dict, device):
    tree = reference_tree(4)
    tree.load_state_dict(state, strict=True)
    return tree.to(device)


def build_case(impl: str, case: str, n: int, state_path: str | None, device, variant: str = "default") -> _Built:
    """Construct models and inputs for one measurement; nothing is timed here."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    if impl == "reference" and variant not in ("default", "lean"):
        raise ValueError("the reference has no modes (only the allocator setting of 'lean')")
    device = torch.device(device)
    shape = (n, n, n)
    a, b = make_images(n, device)

    if case == "lncc":
        g = torch.Generator().manual_seed(IMAGE_SEED + 1)
        warped = (a + 0.1 * torch.rand(a.shape, generator=g).to(device)).clamp(0, 1)
        if impl == "reference":
            from icon_registration import losses as rl

            loss_fn = rl.LNCC(LNCC_SIGMA)
        else:
            from monai_gradicon.losses import LNCCLoss

            loss_fn = LNCCLoss(LNCC_SIGMA)

        def lncc_step():
            x = warped.clone().requires_grad_(True)
            loss = loss_fn(x, b)
            loss.backward()
            return {"loss": float(loss.detach()), "grad_abs_sum": float(x.grad.abs().sum())}

        return _Built(lncc_step)

    state = _load_state(state_path)
    if impl == "reference":
        net = _reference_network(state, device)
    else:
        net = _ours_network(state, device, variant)
    del state
    gc.collect()

    if case == "inference":
        net.eval()
        if impl == "reference":
            net.assign_identity_map([1, 1, *shape])
            net.to(device)
            ident = net.identity_map

            def ref_infer():
                with torch.no_grad():
                    ident.isIdentity = True
                    return {"map": net(a, b)(ident)}

            return _Built(ref_infer)

        def ours_infer():
            with torch.inference_mode():
                return {"map": net(a, b).on_grid(shape)}

        return _Built(ours_infer)

    # train_step / io_step: the full objective with an Adam step
    if impl == "reference":
        from icon_registration import losses as rl

        model = rl.GradientICONSparse(net, rl.LNCC(LNCC_SIGMA), LAMBDA)
        model.assign_identity_map([1, 1, *shape])
        model.to(device)

        def loss_of():
            out = model(a, b)
            return out.all_loss, out.similarity_loss, out.inverse_consistency_loss
    else:
        from monai_gradicon.losses import GradICONObjective, LNCCLoss

        model = GradICONObjective(net, LNCCLoss(LNCC_SIGMA), lmbda=LAMBDA)

        def loss_of():
            out = model(a, b)
            return out.loss, out.similarity, out.regularizer

    if case == "train_step":
        model.train()
        params, lr = list(net.parameters()), TRAIN_LR
    else:  # io_step: what instance optimization does per step
        model.eval()
        params = list(net.parameters())
        for p in params:
            p.requires_grad_(True)
        lr = IO_LR
    optimizer = torch.optim.Adam(params, lr=lr)

    def train_step():
        torch.manual_seed(NOISE_SEED)  # the same jitter for both implementations (first randn after the passes)
        optimizer.zero_grad(set_to_none=True)
        loss, sim, reg = loss_of()
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach()), "similarity": float(sim.detach()), "regularizer": float(reg.detach())}

    return _Built(train_step)


# ----------------------------------------------------------------------------------------------------- runner
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_case(
    impl: str,
    case: str,
    n: int,
    state_path: str | None,
    device="cpu",
    repeats: int = 3,
    warmup: int = 1,
    variant: str = "default",
    threads: int | None = None,
    save_map: str | None = None,
) -> dict:
    """Build and time one case in this process; returns times (s), peak memory (bytes) and output values.

    The output values are those of the *first* iteration (warm-up if any), which starts from the shared weights
    for both implementations, so they can be compared across implementations.
    """
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    built = build_case(impl, case, n, state_path, device, variant)
    rss_setup = current_rss_bytes()
    first: dict | None = None
    times: list[float] = []
    cpu_times: list[float] = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for i in range(warmup + repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = built.step()
        _sync(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if first is None:
            first = out
        if i >= warmup:
            times.append(dt)
            cpu_times.append(dc)
        out = None
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    assert first is not None
    values = {k: v for k, v in first.items() if not isinstance(v, torch.Tensor)}
    if "map" in first and save_map:
        torch.save(first["map"].detach().float().cpu(), save_map)
    result = {
        "impl": impl,
        "variant": variant,
        "case": case,
        "size": n,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "times_s": times,
        "median_s": statistics.median(times) if times else None,
        "min_s": min(times) if times else None,
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times) if cpu_times else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_setup_bytes": rss_setup,
        "values": values,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    if device.type == "cuda":
        result["peak_cuda_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    result["peak_memory_bytes"] = result.get("peak_cuda_allocated_bytes", result["peak_rss_bytes"])
    return result


def run_interleaved(
    entries: list[tuple[str, str]],
    case: str,
    n: int,
    state_path: str | None,
    device="cpu",
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    save_maps: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Time several (implementation, variant) entries of one case **in one process, iteration by iteration in
    turn** (A, B, C, A, B, C, ...), so that a change of load on a shared machine hits all of them alike. Peak
    memory is not measured here (see :func:`run_case`). Returns, per ``"impl:variant"``, the timed iterations and
    the output values of the first iteration."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    built = {f"{impl}:{variant}": build_case(impl, case, n, state_path, device, variant) for impl, variant in entries}
    out: dict[str, dict] = {
        key: {"times_s": [], "cpu_times_s": [], "values": None} for key in built
    }
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for i in range(warmup + repeats):
        for key, b in built.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            result = b.step()
            _sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if out[key]["values"] is None:
                out[key]["values"] = {k: v for k, v in result.items() if not isinstance(v, torch.Tensor)}
                if "map" in result and save_maps and key in save_maps:
                    torch.save(result["map"].detach().float().cpu(), save_maps[key])
            if i >= warmup:
                out[key]["times_s"].append(dt)
                out[key]["cpu_times_s"].append(dc)
            result = None
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for key, r in out.items():
        r["median_s"] = statistics.median(r["times_s"]) if r["times_s"] else None
        r["median_cpu_s"] = statistics.median(r["cpu_times_s"]) if r["cpu_times_s"] else None
        r["loadavg_before"], r["loadavg_after"] = load_before, load_after
        r["threads"] = torch.get_num_threads()
    return out
