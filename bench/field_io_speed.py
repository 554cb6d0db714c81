"""Time and memory of one field-level instance-optimization step against one network-weight IO step.

Both start from the same random 4-step GradICON network (``gradicon_network(4, 3, (n, n, n))``, PyTorch's default
initialisation, the last convolution of every UNet randomised a little so the maps are not the identity) on the same
images (the POPI breathing case of ``field_cases.py`` at ``n³``):

* ``network_io``: one step of :func:`monai_gradicon.instance_optimization.instance_optimize` -- the loop body of that
  function run directly (eval mode, every weight trainable, Adam lr 2e-5, ``GradICONObjective`` LNCC sigma 5 +
  1.5 GradICON-sparse, forward of both directions + backward + Adam step), so the final no-grad forward pass that
  ``instance_optimize`` adds after its loop is not counted;
* ``field_io``: :func:`monai_gradicon.field_optimization.optimize_fields` started from the network's two maps with
  its IO defaults; a step's time is the mean spacing of the per-step timestamps of its history after the first step
  (the whole call divided by the steps, setup included, is also reported).

Timing: one worker process, the two methods interleaved (network step, field steps, network step, ...), ``--warmup``
untimed rounds then ``--repeats`` timed ones; the median is reported with the ``uptime`` load average read before
every timed round, so a busy machine is visible in the output. Peak memory: each method again alone in a fresh
process (peak RSS from ``getrusage``, and the RSS before the measured work, so the difference is what the method
adds; ``torch.cuda.max_memory_allocated`` on a GPU).

    python bench/field_io_speed.py                       # 175³, 2 threads, 1 warm-up + 3 timed rounds
    python bench/field_io_speed.py --size 96 --repeats 2 --json /tmp/speed96.json

Nothing is written except ``--json`` and a temporary directory (removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cases import current_rss_bytes, load_average, peak_rss_bytes
from field_cases import DEFAULT_DATA, breathing_case

IO_LR = 2e-5




def random_network(n: int, seed: int = 0):
    """The 4-step network with default initialisation and slightly randomised last layers (eval mode)."""
    from monai_gradicon.networks import gradicon_network

    torch.manual_seed(seed)
    net = gradicon_network(4, 3, (n, n, n))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lastConv" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / (p[0].numel() ** 0.5))
    return net.eval()


def prepare(args, workdir: str) -> None:
    """Images, network weights and the network's two maps, saved for the workers."""
    case = breathing_case(args.data, (args.size,) * 3)
    net = random_network(args.size)
    with torch.no_grad():
        phi_ab = net(case.moving, case.fixed).on_grid(case.shape)
        phi_ba = net(case.fixed, case.moving).on_grid(case.shape)
    torch.save({"moving": case.moving, "fixed": case.fixed, "phi_ab": phi_ab, "phi_ba": phi_ba},
               os.path.join(workdir, "inputs.pt"))
    torch.save(net.state_dict(), os.path.join(workdir, "network.pt"))


class NetworkIO:
    """One instance-optimization step (the loop body of ``instance_optimize``)."""

    def __init__(self, workdir: str, size: int, device: torch.device) -> None:
        from monai_gradicon.losses.objective import GradICONObjective

        data = torch.load(os.path.join(workdir, "inputs.pt"))
        self.moving, self.fixed = data["moving"].to(device), data["fixed"].to(device)
        self.net = random_network(size).to(device)
        self.net.load_state_dict(torch.load(os.path.join(workdir, "network.pt")))
        self.net.eval()
        params = list(self.net.parameters())
        for p in params:
            p.requires_grad_(True)
        self.objective = GradICONObjective(self.net)
        self.optimizer = torch.optim.Adam(params, lr=IO_LR)
        self.generator = torch.Generator().manual_seed(0)

    def step(self) -> float:
        t = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.objective(self.moving, self.fixed, generator=self.generator)
        out.loss.backward()
        self.optimizer.step()
        _sync(self.moving.device)
        return time.perf_counter() - t


class FieldIO:
    """``optimize_fields`` from the network's maps (IO defaults), ``steps`` steps per call."""

    def __init__(self, workdir: str, device: torch.device, steps: int) -> None:
        data = torch.load(os.path.join(workdir, "inputs.pt"))
        self.moving, self.fixed = data["moving"].to(device), data["fixed"].to(device)
        self.phi_ab, self.phi_ba = data["phi_ab"].to(device), data["phi_ba"].to(device)
        self.steps = steps

    def run(self) -> tuple[float, float]:
        """(seconds per step from the history's timestamps after the first step, whole call / steps)."""
        from monai_gradicon.field_optimization import optimize_fields

        t = time.perf_counter()
        res = optimize_fields(self.moving, self.fixed, init_ab=self.phi_ab, init_ba=self.phi_ba,
                              iterations=self.steps)
        _sync(self.moving.device)
        total = time.perf_counter() - t
        stamps = [h["seconds"] for h in res.history]
        per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else stamps[0]
        return per_step, total / len(stamps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_time(args, workdir: str) -> dict:
    device = torch.device(args.device)
    net_io = NetworkIO(workdir, args.size, device)
    field_io = FieldIO(workdir, device, args.field_steps)
    rounds = []
    for r in range(args.warmup + args.repeats):
        load = load_average()
        t_net = net_io.step()
        t_field, t_field_call = field_io.run()
        if r >= args.warmup:
            rounds.append({"load": load, "network_io_s": t_net, "field_io_s": t_field,
                           "field_io_call_per_step_s": t_field_call})
        print(f"  round {r}{' (warm-up)' if r < args.warmup else ''}: network IO step {t_net:.2f} s, field IO step "
              f"{t_field:.3f} s ({t_field_call:.3f} s with setup), load {load}", flush=True)
    return {"rounds": rounds, "load_after": load_average()}


def worker_memory(args, workdir: str, method: str) -> dict:
    device = torch.device(args.device)
    if method == "network_io":
        runner = NetworkIO(workdir, args.size, device)
        run = runner.step
    else:
        runner = FieldIO(workdir, device, args.field_steps)
        run = runner.run
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = current_rss_bytes()
    run()
    if method == "network_io":
        run()  # Adam's moments exist from the second step on
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes()
    return {"method": method, "before_bytes": before, "peak_bytes": peak,
            "kind": "cuda max allocated" if device.type == "cuda" else "peak RSS"}


def _spawn(args, workdir: str, mode: str) -> dict:
    out = os.path.join(workdir, f"{mode}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--workdir", workdir, "--out", out,
           "--size", str(args.size), "--threads", str(args.threads), "--device", args.device,
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--field-steps", str(args.field_steps)]
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=175, help="network grid size per axis (default 175)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--field-steps", type=int, default=4, help="field IO steps per timed call (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=DEFAULT_DATA, help="the shared data folder (POPI CT)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--skip-memory", action="store_true", help="timing only")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.worker is not None:
        if args.worker == "time":
            result = worker_time(args, args.workdir)
        else:
            result = worker_memory(args, args.workdir, args.worker)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0

    with tempfile.TemporaryDirectory(prefix="field_io_speed_") as workdir:
        t0 = time.perf_counter()
        print(f"preparing {args.size}³ case and network ... (load {load_average()})", flush=True)
        prepare(args, workdir)
        print("timing (interleaved):", flush=True)
        timing = _spawn(args, workdir, "time")
        memory = {}
        if not args.skip_memory:
            for method in ("network_io", "field_io"):
                print(f"peak memory of {method} (own process) ...", flush=True)
                memory[method] = _spawn(args, workdir, method)
        elapsed = time.perf_counter() - t0

    rounds = timing["rounds"]
    net = statistics.median(r["network_io_s"] for r in rounds)
    fld = statistics.median(r["field_io_s"] for r in rounds)
    fld_call = statistics.median(r["field_io_call_per_step_s"] for r in rounds)
    gib = 1024.0**3
    print()
    print(f"size {args.size}³, {args.threads} threads, device {args.device}, torch {torch.__version__}, "
          f"{args.repeats} timed rounds (median); loads before each round: {[r['load'] for r in rounds]}")
    print(f"{'method':12s} {'s / step':>10s} {'peak GiB':>9s} {'added GiB':>9s}")
    for name, t in (("network_io", net), ("field_io", fld)):
        m = memory.get(name)
        peak = f"{m['peak_bytes'] / gib:9.2f}" if m else f"{'-':>9s}"
        added = f"{(m['peak_bytes'] - m['before_bytes']) / gib:9.2f}" if m else f"{'-':>9s}"
        print(f"{name:12s} {t:10.3f} {peak} {added}")
    print(f"speed-up per step: {net / fld:.1f}x (field IO call incl. setup: {fld_call:.3f} s/step, "
          f"{net / fld_call:.1f}x); total {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "threads": args.threads, "device": args.device,
                       "torch": torch.__version__, "timing": timing, "memory": memory,
                       "median_network_io_s": net, "median_field_io_s": fld, "speedup": net / fld,
                       "seconds": elapsed}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
