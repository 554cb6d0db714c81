#!/usr/bin/env python
"""Benchmark monai_gradicon against the reference implementation (icon_registration 1.1.9), side by side.

    python bench/compare_reference.py [--quick] [--json FILE] [--device cpu|cuda] [--sizes 96 175] ...

Both implementations run the same 4-step GradICON network with the same random weights (a reference state dict,
loaded into ours with ``monai_gradicon.weights.load_network_weights``) on the same random smooth images.

* **Time**: for each (size, case) one process builds the reference and every mode of ours and runs their iterations
  in turn (ref, ours, ours-mode, ref, ours, ...): ``--warmup`` untimed rounds, then ``--repeats`` timed ones; the
  median is reported. Interleaving makes the ratio robust to other jobs on a shared machine.
* **Peak memory**: each (implementation, mode) runs again alone in a fresh process (one warm-up and one measured
  iteration, so Adam's moments exist), and reports peak RSS on CPU or ``torch.cuda.max_memory_allocated`` on GPU.
* **Agreement**: the first iteration's outputs are compared (map difference in voxels, relative loss difference),
  so a speed-up cannot come from computing something else.

``--quick``: 96³ only, plus activation checkpointing (and the ``lean`` allocator setting) for the training step;
about 7 minutes on 2 otherwise idle CPU cores. Default (full): 96³ and 175³, plus bf16. The JSON holds every raw
measurement and, at top level, the ratios ours/reference at the largest size run: ``train_step_time_ratio``,
``train_step_memory_ratio``, ``inference_time_ratio``, ``lncc_time_ratio`` (and ``io_step_time_ratio``, and
``..._checkpointing`` / ``..._lean`` / ``..._bf16`` ratios where those modes ran).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

TARGETS = {  # ratio ours / reference must be <= this (issue 6)
    "train_step_time_ratio": 0.5,
    "train_step_memory_ratio": 0.5,
    "inference_time_ratio": 0.7,
    "lncc_time_ratio": 0.3,
}

# which opt-in modes of ours are measured, per case
QUICK_VARIANTS = {"train_step": ["checkpointing", "lean"]}
FULL_VARIANTS = {"train_step": ["checkpointing", "lean", "bf16"], "inference": ["bf16"]}
# modes the reference is also run in (only the allocator setting applies to it)
REFERENCE_VARIANTS = {"lean"}


# ----------------------------------------------------------------------------------------------------- helpers
def _fmt_s(x):
    return "-" if x is None else (f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s")


def _fmt_b(x):
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def _fmt_r(x):
    return "-" if x is None else f"{x:.2f}"


def machine_info(device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "device": device,
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        from importlib.metadata import version

        info["icon_registration"] = version("icon_registration")
    except Exception:
        info["icon_registration"] = None
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
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


# ----------------------------------------------------------------------------------------------------- worker
def worker_main(spec_json: str, out_path: str) -> int:
    spec = json.loads(spec_json)
    from cases import run_case, run_interleaved

    mode = spec.pop("mode")
    if mode == "time":
        spec["entries"] = [tuple(e) for e in spec["entries"]]
        result = run_interleaved(**spec)
    else:
        result = run_case(**spec)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


def run_worker(spec: dict, workdir: str, timeout: float) -> dict:
    from cases import VARIANT_ENV

    out = tempfile.NamedTemporaryFile(dir=workdir, suffix=".json", delete=False).name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec), "--worker-out", out]
    env = dict(os.environ)
    env.update(VARIANT_ENV.get(spec.get("variant", "default"), {}))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"error": f"worker exited with {proc.returncode}: {tail}", "process_wall_s": wall}
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    result["process_wall_s"] = wall
    return result


# ----------------------------------------------------------------------------------------------------- comparison
def _rel(a, b):
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-12)


def agreement(case: str, ours: dict, ref: dict, n: int) -> dict:
    """How closely ours reproduced the reference's first iteration."""
    if "error" in ours or "error" in ref:
        return {}
    if case == "inference":
        import torch

        if not (ours.get("save_map") and ref.get("save_map")):
            return {}
        if not (os.path.exists(ours["save_map"]) and os.path.exists(ref["save_map"])):
            return {}
        a = torch.load(ours["save_map"])
        b = torch.load(ref["save_map"])
        diff = float((a - b).abs().max()) * (n - 1)  # normalized units -> voxels
        return {"max_map_diff_voxels": diff}
    vo, vr = ours.get("values", {}), ref.get("values", {})
    out = {f"rel_diff_{k}": _rel(vo.get(k), vr.get(k)) for k in vr if k in vo}
    return out


def _agreement_text(ag: dict) -> str:
    if not ag:
        return "-"
    if "max_map_diff_voxels" in ag:
        return f"map {ag['max_map_diff_voxels']:.1e} vox"
    if "rel_diff_loss" in ag:
        return f"loss rel {ag['rel_diff_loss']:.1e}"
    return "-"


def build_rows(results: list[dict], sizes: list[int], cases: list[str]) -> list[dict]:
    rows = []
    for n in sizes:
        for case in cases:
            ref = next((r for r in results if r.get("impl") == "reference" and r["case"] == case and r["size"] == n
                        and r.get("variant", "default") == "default"), None)
            for r in results:
                if r["case"] != case or r["size"] != n or r is ref:
                    continue
                row = {
                    "size": n,
                    "case": case,
                    "variant": r["variant"] if r.get("impl") == "ours" else f"ref:{r['variant']}",
                    "ours_s": r.get("median_s"),
                    "ours_peak_bytes": r.get("peak_memory_bytes"),
                    "ref_s": ref.get("median_s") if ref else None,
                    "ref_peak_bytes": ref.get("peak_memory_bytes") if ref else None,
                    "error": r.get("error") or (ref.get("error") if ref else None),
                    "timing": r.get("timing"),
                }
                row["time_ratio"] = (
                    row["ours_s"] / row["ref_s"] if row["ours_s"] and row["ref_s"] else None
                )
                row["memory_ratio"] = (
                    row["ours_peak_bytes"] / row["ref_peak_bytes"]
                    if row["ours_peak_bytes"] and row["ref_peak_bytes"]
                    else None
                )
                row["agreement"] = agreement(case, r, ref, n) if ref else {}
                rows.append(row)
    return rows


def format_table(rows: list[dict], memory_label: str) -> str:
    head = (
        f"{'size':>5} {'case':<11} {'mode':<13} {'reference':>10} {'ours':>10} {'ratio':>6} "
        f"{'ref ' + memory_label:>14} {'ours ' + memory_label:>14} {'ratio':>6}  agreement"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['size']:>5} {r['case']:<11} {r['variant']:<13} ERROR {r['error'][:160]!r}")
            continue
        own = "*" if r.get("timing") == "own process" else ""
        lines.append(
            f"{r['size']:>5} {r['case']:<11} {r['variant']:<13} {_fmt_s(r['ref_s']):>10} {_fmt_s(r['ours_s']) + own:>10} "
            f"{_fmt_r(r['time_ratio']):>6} {_fmt_b(r['ref_peak_bytes']):>14} {_fmt_b(r['ours_peak_bytes']):>14} "
            f"{_fmt_r(r['memory_ratio']):>6}  {_agreement_text(r['agreement'])}"
        )
    if any(r.get("timing") == "own process" for r in rows):
        lines.append("* timed in its own process (its allocator setting), not interleaved with the reference")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    """Top-level ratios at the largest size that has each case."""
    out: dict = {}

    def pick(case, variant):
        cands = [r for r in rows if r["case"] == case and r["variant"] == variant and r.get("time_ratio") is not None]
        return max(cands, key=lambda r: r["size"]) if cands else None

    for case in ("train_step", "inference", "lncc", "io_step"):
        for variant in ("default", "checkpointing", "lean", "ref:lean", "bf16", "compile"):
            r = pick(case, variant)
            suffix = "" if variant == "default" else "_" + variant.replace("ref:", "reference_")
            if r is None:
                if variant == "default":
                    out[f"{case}_time_ratio"] = None
                continue
            out[f"{case}_time_ratio{suffix}"] = r["time_ratio"]
            out[f"{case}_size{suffix}"] = r["size"]
            if case in ("train_step", "io_step", "inference"):
                out[f"{case}_memory_ratio{suffix}"] = r["memory_ratio"]
    out.setdefault("train_step_memory_ratio", None)
    return out


def targets_report(top: dict) -> dict:
    rep = {}
    for key, limit in TARGETS.items():
        value = top.get(key)
        rep[key] = {"target": limit, "value": value, "met": (value is not None and value <= limit)}
    # the memory target is also met by the opt-in checkpointing mode when it is not met by default
    for mode in ("checkpointing", "lean"):
        mem = top.get(f"train_step_memory_ratio_{mode}")
        if mem is not None:
            rep["train_step_memory_ratio"][f"value_{mode}"] = mem
            rep["train_step_memory_ratio"][f"met_with_{mode}"] = mem <= TARGETS["train_step_memory_ratio"]
            rep["train_step_time_ratio"][f"value_{mode}"] = top.get(f"train_step_time_ratio_{mode}")
    return rep


# ----------------------------------------------------------------------------------------------------- plan
def measure_case(args, case: str, n: int, variants: list[str], weights: str, workdir: str, threads) -> list[dict]:
    """Time the entries of one case interleaved in one process, then measure each one's peak memory alone."""
    from cases import VARIANT_ENV

    timed = [(impl, "default") for impl in args.impls]
    timed += [("ours", v) for v in variants if v != "default" and v not in VARIANT_ENV and "ours" in args.impls]
    solo = []  # modes that need their own process environment: timed alone, in their memory run
    for v in variants:
        if v in VARIANT_ENV:
            solo += [(impl, v) for impl in ("ours", "reference") if impl in args.impls and
                     (impl == "ours" or v in REFERENCE_VARIANTS)]
    common = {"case": case, "n": n, "state_path": None if case == "lncc" else weights, "device": args.device,
              "threads": threads}
    maps = {f"{i}:{v}": os.path.join(workdir, f"map_{i}_{v}_{n}.pt") for i, v in timed + solo} \
        if case == "inference" else {}
    records = {f"{i}:{v}": {"impl": i, "variant": v, "case": case, "size": n, "device": args.device,
                            "save_map": maps.get(f"{i}:{v}")} for i, v in timed + solo}

    t0 = time.perf_counter()
    timing = run_worker({"mode": "time", "entries": timed, "repeats": args.repeats, "warmup": args.warmup,
                         "save_maps": maps or None, **common}, workdir, args.timeout)
    if "error" in timing:
        for key in records:
            if tuple(key.split(":")) in timed:
                records[key]["error"] = timing["error"]
    else:
        for key, r in timing.items():
            if key in records:
                records[key].update({**r, "timing": "interleaved"})
    print(f"  {n:>4}³ {case:<11} timed {', '.join(f'{i}:{v}' for i, v in timed)} in turn "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    if args.memory_runs:
        for impl, variant in timed + solo:
            key = f"{impl}:{variant}"
            t0 = time.perf_counter()
            own = (impl, variant) in solo
            mem = run_worker({"mode": "memory", "impl": impl, "variant": variant, "repeats": args.repeats if own
                              else 1, "warmup": args.warmup if own else 1, "save_map": maps.get(key), **common},
                             workdir, args.timeout)
            rec = records[key]
            if "error" in mem:
                rec.setdefault("error", mem["error"])
            else:
                rec["peak_memory_bytes"] = mem["peak_memory_bytes"]
                rec["peak_rss_bytes"] = mem["peak_rss_bytes"]
                rec["memory_run"] = {k: mem[k] for k in ("times_s", "median_s", "loadavg_before", "loadavg_after")}
                if own:  # no interleaved timing for this mode: its own run's times
                    rec.update({k: mem[k] for k in ("times_s", "median_s", "cpu_times_s", "median_cpu_s", "values")})
                    rec["timing"] = "own process"
            status = rec.get("error", "")[:200] if "error" in rec else (
                f"median {_fmt_s(rec.get('median_s'))}, peak {_fmt_b(rec.get('peak_memory_bytes'))}")
            print(f"  {n:>4}³ {case:<11} {impl:<9} {variant:<13} {status}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return list(records.values())


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="96³ only, default mode + checkpointing train step")
    p.add_argument("--json", default=os.path.join(HERE, "last_run.json"), help="where to write the JSON results")
    p.add_argument("--sizes", type=int, nargs="+", help="spatial sizes (cubes); default 96 175 (quick: 96)")
    p.add_argument("--cases", nargs="+", default=["inference", "train_step", "lncc", "io_step"],
                   choices=["inference", "train_step", "lncc", "io_step"])
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads in every worker (default 2, as the documented baseline; 0 = torch default)")
    p.add_argument("--variants", nargs="*", default=None,
                   help="opt-in modes of ours to add for every case (checkpointing, bf16, compile); "
                        "default: quick = checkpointing for train_step; full = checkpointing + bf16")
    p.add_argument("--impls", nargs="+", default=["reference", "ours"], choices=["reference", "ours"])
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--no-memory-runs", dest="memory_runs", action="store_false",
                   help="skip the separate peak-memory processes (times only)")
    p.add_argument("--workdir", default=None, help="scratch folder (weights, maps); default a temp folder")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.worker_out)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = args.sizes or ([96] if args.quick else [96, 175])
    if args.variants is None:
        variant_map = QUICK_VARIANTS if args.quick else FULL_VARIANTS
    else:
        variant_map = {c: list(args.variants) for c in args.cases}
    if "reference" in args.impls:
        try:
            import icon_registration  # noqa: F401
        except ImportError:
            print("The reference is not installed: pip install --no-deps icon_registration==1.1.9 "
                  "(or run with --impls ours)", file=sys.stderr)
            return 2
    threads = args.threads if args.threads > 0 else None
    workdir = args.workdir or tempfile.mkdtemp(prefix="gradicon_bench_")
    os.makedirs(workdir, exist_ok=True)

    # one set of random weights, reference layout, shared by every worker
    from cases import random_weights

    weights = os.path.join(workdir, "weights.pt")
    torch.save(random_weights(seed=1), weights)

    started = _dt.datetime.now()
    print(f"GradICON benchmark: sizes {sizes}, cases {args.cases}, device {args.device}, threads "
          f"{threads or torch.get_num_threads()}, repeats {args.repeats} (+{args.warmup} warm-up)", flush=True)
    results: list[dict] = []
    for n in sizes:
        for case in args.cases:
            results += measure_case(args, case, n, variant_map.get(case, []), weights, workdir, threads)

    rows = build_rows(results, sizes, args.cases)
    mem_label = "max alloc" if args.device.startswith("cuda") else "peak RSS"
    table = format_table(rows, mem_label)
    top = summary(rows)
    report = {
        **top,
        "targets": targets_report(top),
        "date": started.isoformat(timespec="seconds"),
        "duration_s": (_dt.datetime.now() - started).total_seconds(),
        "machine": machine_info(args.device),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "sizes": sizes,
        "table_text": table,
        "rows": rows,
        "results": results,
    }
    print()
    print(table)
    print()
    for key, t in report["targets"].items():
        extra = "".join(
            f"; {mode} mode {_fmt_r(t['value_' + mode])}" for mode in ("checkpointing", "lean") if "value_" + mode in t
        )
        print(f"{key:<26} {_fmt_r(t['value']):>6}  target <= {t['target']}  {'met' if t['met'] else 'NOT met'}{extra}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nJSON written to {args.json} ({report['duration_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
