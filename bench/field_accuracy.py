"""Accuracy on a known deformation: GradICON field optimization against identity and ANTs SyN.

The case (``field_cases.breathing_case``): POPI phase-00 CT resized to the network grid (175³ by default),
lung-windowed HU [-1000, 0] -> [0, 1], deformed by a known smooth exhale-like field (up to ~15 mm). Every method
registers the same pair (A = moving, B = fixed) on the same grid and returns the two maps ``Phi_AB`` (fixed -> moving)
and ``Phi_BA`` (moving -> fixed) as normalized maps on that grid; all metrics are computed from those maps:

* TRE (mm, mean and 95th percentile) at ``--points`` random landmarks inside the lungs (threshold < -500 HU,
  eroded), for ``Phi_AB`` at the fixed landmarks and ``Phi_BA`` at the moving ones;
* % folds: voxels with det J <= 0 (central differences, ``metrics.folding_percentage``) of each map;
* SDlogJ of ``Phi_AB`` (``metrics.log_jacobian_std``);
* inverse consistency ``|Phi_AB(Phi_BA(x)) - x|`` in mm over every voxel (mean and maximum);
* wall time, process CPU time and peak RSS of the method, each method alone in a fresh process (the load average is
  printed before each method).

Methods (``--methods``):

==================  ===================================================================================================
``identity``        both maps the identity
``field``           ``optimize_fields`` from scratch with its defaults (``--field-args`` JSON overrides them)
``surrogate``       a stand-in for a network's output: the true maps plus independent smooth errors of up to
                    ``--surrogate-error`` mm (``field_cases.surrogate_init``), unoptimized
``field-io``        ``optimize_fields`` started from ``surrogate`` with its IO defaults (``--io-args`` overrides them)
``ants-syn``        ANTsPy ``registration(type_of_transform="SyN")`` with its defaults (affine, then SyN with
                    mattes MI, iterations 40x20x0 at shrink 4x2x1: no full-resolution iterations)
``ants-syn-fine``   ANTsPy SyN like ``antsRegistrationSyN.sh``: affine, then SyN with CC radius 4,
                    iterations 100x70x50x20 at shrink 8x4x2x1, gradient step 0.1 (full-resolution iterations)
``network``         with ``--weights PATH`` (a released lung model): the 4-step network's maps
``network-io``      its ``instance_optimize`` (``--io-steps``, default 50)
``network-field-io`` ``optimize_fields`` from the network's maps with its IO defaults
==================  ===================================================================================================

ANTs gets the images with their physical voxel size (mm per network voxel), origin 0 and identity direction; its
forward and inverse transforms are composed into displacement fields (``apply_transforms(..., compose=)``) and
converted to normalized maps. ANTs methods run only if ``import ants`` works (``antspyx``, a benchmark-only
dependency installed in a separate venv, never a package dependency); ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` is set
to ``--threads``.

    python bench/field_accuracy.py                                  # 175³: identity, field, surrogate, field-io, ANTs
    python bench/field_accuracy.py --size 96 --methods identity field --json /tmp/acc96.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cases import current_rss_bytes, load_average, peak_rss_bytes
from field_cases import DEFAULT_DATA, breathing_case, surrogate_init, tre_mm

METHODS = ("identity", "field", "surrogate", "field-io", "ants-syn", "ants-syn-fine", "network", "network-io",
           "network-field-io")
DEFAULT_METHODS = ("identity", "field", "surrogate", "field-io", "ants-syn", "ants-syn-fine")




def have_ants() -> bool:
    try:
        import ants  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------------------ ANTs
def _ants_maps(case, fwd: list[str], inv: list[str], workdir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose ANTs transform lists into displacement fields and turn them into normalized maps ``[1, 3, *n]``."""
    import ants
    import numpy as np

    spacing = tuple(float(s) for s in case.spacing_mm)
    fixed = ants.from_numpy(case.fixed[0, 0].numpy(), origin=(0.0, 0.0, 0.0), spacing=spacing)
    moving = ants.from_numpy(case.moving[0, 0].numpy(), origin=(0.0, 0.0, 0.0), spacing=spacing)
    # fixed -> moving points (ITK: the transform that resamples moving onto the fixed grid)
    ab_file = ants.apply_transforms(fixed, moving, fwd, compose=os.path.join(workdir, "ab_"))
    # moving -> fixed points: the inverse list (affine inverted, inverse warp)
    invert = ["Affine" in t or t.endswith(".mat") for t in inv]
    ba_file = ants.apply_transforms(moving, fixed, inv, whichtoinvert=invert, compose=os.path.join(workdir, "ba_"))
    maps = []
    shape = case.shape
    ident_vox = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), 0)
    for path in (ab_file, ba_file):
        field = ants.image_read(path).numpy()  # (*n, 3): physical displacement (mm) along array axes 0, 1, 2
        disp_vox = np.moveaxis(field, -1, 0) / np.asarray(spacing).reshape(3, 1, 1, 1)
        points = ident_vox + disp_vox
        norm = points / np.asarray([n - 1 for n in shape], dtype=np.float64).reshape(3, 1, 1, 1)
        maps.append(torch.from_numpy(norm.astype(np.float32))[None])
    return maps[0], maps[1]


def run_ants(case, fine: bool, threads: int, workdir: str):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    spacing = tuple(float(s) for s in case.spacing_mm)
    fixed = ants.from_numpy(case.fixed[0, 0].numpy(), origin=(0.0, 0.0, 0.0), spacing=spacing)
    moving = ants.from_numpy(case.moving[0, 0].numpy(), origin=(0.0, 0.0, 0.0), spacing=spacing)
    prefix = os.path.join(workdir, "ants_")
    if fine:
        reg = ants.registration(fixed, moving, type_of_transform="SyN", syn_metric="CC", syn_sampling=4,
                                reg_iterations=(100, 70, 50, 20), grad_step=0.1, flow_sigma=3, total_sigma=0,
                                outprefix=prefix)
    else:
        reg = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=prefix)
    return reg["fwdtransforms"], reg["invtransforms"]


# ------------------------------------------------------------------------------------------------------------ worker
def prepare_method(method: str, case, args) -> dict:
    """What a method starts from (not timed): the surrogate's maps, or a loaded network."""
    if method in ("surrogate", "field-io"):
        init_ab, init_ba = surrogate_init(case, args.surrogate_error)
        return {"init_ab": init_ab, "init_ba": init_ba}
    if method.startswith("network"):
        from monai_gradicon.networks import gradicon_network
        from monai_gradicon.weights import load_network_weights

        if not args.weights:
            raise SystemExit(f"method {method} needs --weights (a released lung model file).")
        net = gradicon_network(4, 3, case.shape)
        load_network_weights(net, args.weights)
        return {"network": net.eval()}
    return {}


def run_method(method: str, case, args, workdir: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run one method (the timed part); returns the two maps ``[1, 3, *n]`` (normalized) and extra numbers."""
    from monai_gradicon.field_optimization import optimize_fields
    from monai_gradicon.maps import identity_map

    extra: dict = {}
    if method == "identity":
        ident = identity_map(case.shape)
        return ident, ident.clone(), extra
    if method == "surrogate":
        return inputs["init_ab"], inputs["init_ba"], extra
    if method in ("field", "field-io"):
        if method == "field":
            res = optimize_fields(case.moving, case.fixed, **json.loads(args.field_args))
        else:
            res = optimize_fields(case.moving, case.fixed, init_ab=inputs["init_ab"], init_ba=inputs["init_ba"],
                                  **json.loads(args.io_args))
        stamps = [h["seconds"] for h in res.history]
        extra["steps"] = len(stamps)
        extra["seconds_per_step_last_level"] = _last_level_step_seconds(res.history)
        return res.phi_ab.on_grid(case.shape), res.phi_ba.on_grid(case.shape), extra
    if method in ("ants-syn", "ants-syn-fine"):
        fwd, inv = run_ants(case, method == "ants-syn-fine", args.threads, workdir)
        phi_ab, phi_ba = _ants_maps(case, fwd, inv, workdir)
        return phi_ab, phi_ba, extra
    if method.startswith("network"):
        from monai_gradicon.instance_optimization import instance_optimize

        net = inputs["network"]
        if method == "network-io":
            res = instance_optimize(net, case.moving, case.fixed, steps=args.io_steps, progress=False)
            return res.phi_ab.on_grid(case.shape), res.phi_ba.on_grid(case.shape), extra
        with torch.no_grad():
            phi_ab = net(case.moving, case.fixed).on_grid(case.shape)
            phi_ba = net(case.fixed, case.moving).on_grid(case.shape)
        if method == "network":
            return phi_ab, phi_ba, extra
        res = optimize_fields(case.moving, case.fixed, init_ab=phi_ab, init_ba=phi_ba, **json.loads(args.io_args))
        return res.phi_ab.on_grid(case.shape), res.phi_ba.on_grid(case.shape), extra
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _last_level_step_seconds(history: list[dict]) -> float:
    """Mean wall time of a step of the finest level (from the history's timestamps, its first step excluded)."""
    last = [h["seconds"] for h in history if h["level"] == 0.0]
    if len(last) < 2:
        return float("nan")
    return (last[-1] - last[0]) / (len(last) - 1)


def metrics(case, phi_ab: torch.Tensor, phi_ba: torch.Tensor) -> dict:
    from monai_gradicon.coordinate_transforms import DisplacementTransform
    from monai_gradicon.maps import identity_map, map_to_ddf
    from monai_gradicon.metrics import folding_percentage, log_jacobian_std

    out = tre_mm(case, phi_ab, phi_ba)
    ddf_ab, ddf_ba = map_to_ddf(phi_ab), map_to_ddf(phi_ba)
    out["folds_ab_pct"] = float(folding_percentage(ddf_ab)[0])
    out["folds_ba_pct"] = float(folding_percentage(ddf_ba)[0])
    out["sdlogj_ab"] = float(log_jacobian_std(ddf_ab)[0])
    ident = identity_map(case.shape)
    mm = torch.tensor([(s - 1) * sp for s, sp in zip(case.shape, case.spacing_mm)]).view(1, 3, 1, 1, 1)
    err = ((DisplacementTransform(phi_ab - ident)(phi_ba) - ident) * mm).norm(dim=1)
    out["ic_mean_mm"] = float(err.mean())
    out["ic_max_mm"] = float(err.max())
    return out


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    case = breathing_case(args.data, (args.size,) * 3, count=args.points, amplitude_mm=args.amplitude)
    with tempfile.TemporaryDirectory(prefix="field_accuracy_") as workdir:
        inputs = prepare_method(args.worker, case, args)
        rss_before = current_rss_bytes()
        load = load_average()
        t, c = time.perf_counter(), time.process_time()
        phi_ab, phi_ba, extra = run_method(args.worker, case, args, workdir, inputs)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        peak = peak_rss_bytes()
    result = {"method": args.worker, "seconds": wall, "cpu_seconds": cpu, "load_before": load,
              "load_after": load_average(), "rss_before_bytes": rss_before, "peak_rss_bytes": peak, **extra}
    result.update(metrics(case, phi_ab, phi_ba))
    return result


# ------------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=175)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--points", type=int, default=300, help="lung landmarks (default 300)")
    parser.add_argument("--amplitude", type=float, default=15.0, help="S-I amplitude of the deformation in mm")
    parser.add_argument("--surrogate-error", type=float, default=5.0, help="largest error of the surrogate (mm)")
    parser.add_argument("--field-args", default="{}", help="JSON keyword arguments for optimize_fields (scratch)")
    parser.add_argument("--io-args", default="{}", help="JSON keyword arguments for optimize_fields (IO)")
    parser.add_argument("--weights", default=None, help="released lung weights for the network methods")
    parser.add_argument("--io-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        result = worker(args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0

    ants_ok = have_ants()
    results = []
    with tempfile.TemporaryDirectory(prefix="field_accuracy_main_") as tmp:
        for method in args.methods:
            if method.startswith("ants") and not ants_ok:
                print(f"skipping {method}: `import ants` fails in this interpreter (pip install antspyx in a bench "
                      "venv)", flush=True)
                continue
            out = os.path.join(tmp, f"{method}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--out", out]
            for name in ("size", "points", "amplitude", "surrogate_error", "field_args", "io_args", "io_steps",
                         "threads", "data"):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            if args.weights:
                cmd += ["--weights", args.weights]
            env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads),
                       OMP_NUM_THREADS=str(args.threads))
            print(f"{method} ... (load {load_average()})", flush=True)
            subprocess.run(cmd, check=True, env=env)
            with open(out) as f:
                r = json.load(f)
            results.append(r)
            print(f"  {r['seconds']:.1f} s, TRE {r['tre_ab_mm']:.2f} / {r['tre_ba_mm']:.2f} mm, folds "
                  f"{r['folds_ab_pct']:.4f} / {r['folds_ba_pct']:.4f} %", flush=True)

    gib = 1024.0**3
    print()
    print(f"POPI breathing case at {args.size}³ ({args.points} lung landmarks, amplitude {args.amplitude} mm), "
          f"{args.threads} threads, torch {torch.__version__}")
    header = (f"{'method':17s} {'TRE AB':>7s} {'p95':>6s} {'TRE BA':>7s} {'p95':>6s} {'fold AB%':>9s} "
              f"{'fold BA%':>9s} {'SDlogJ':>7s} {'IC mean':>8s} {'IC max':>7s} {'time s':>7s} {'peak GiB':>8s}  load")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['method']:17s} {r['tre_ab_mm']:7.2f} {r['tre_ab_p95_mm']:6.2f} {r['tre_ba_mm']:7.2f} "
              f"{r['tre_ba_p95_mm']:6.2f} {r['folds_ab_pct']:9.4f} {r['folds_ba_pct']:9.4f} {r['sdlogj_ab']:7.3f} "
              f"{r['ic_mean_mm']:8.3f} {r['ic_max_mm']:7.2f} {r['seconds']:7.1f} {r['peak_rss_bytes'] / gib:8.2f}  "
              f"{r['load_before']}")
    print("TRE / IC in mm; time = wall seconds of the registration alone; peak = peak RSS of its process "
          "(includes the case itself)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "threads": args.threads, "torch": torch.__version__, "results": results},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
