"""End to end on files: ``python -m monai_gradicon register`` vs the authors' file-level path, same files, same
weights, same cores, interleaved (ours, theirs, ours, theirs, ...), each run in a fresh process for its peak memory.

Cases (real CT from ``../shared/data``):

* ``lung``: pyradiomics lung2 (moving, 512x512x61) -> lung1 (fixed, 512x512x48), with lung masks made once by
  :func:`monai_gradicon.lung_mask.lung_mask` and given to both;
* ``popi``: POPI phase 00 (fixed, 512x512x141) vs a copy resampled onto a coarser, shifted grid (moving).

Weights: a random 4-step network in the authors' exact format (188 tensors, ``lung_model_weights_step_2.trch``; the
reference's own ``make_network``, last layers randomised), so no download is needed. Ours reads the file directly
(its model card: reference axis order, 175³, ``lung_ct``).

Theirs: ``itk.imread`` -> ``lung_network_preprocess`` -> ``itk_wrapper.register_pair`` (both directions) -> write the
forward transform (``itk.transformwrite``, HDF5) and the moving image resampled onto the fixed grid with it
(``itk.resample_image_filter`` + ``itk.imwrite``): what a user of the authors' tools writes. Ours: the CLI with
``--io_iterations 0`` (all files: warped image, mm field and inverse, voxel DDF, det J, overview, summary).

Needs the reference and ITK beside our package (a benchmark environment, not the package's dependencies):
``pip install -c constraints.txt torch==2.13.0 && pip install -c constraints.txt -e . itk matplotlib tqdm &&
pip install --no-deps icon_registration==1.1.9``. Run from the repository root::

    python bench/end_to_end.py --repeats 2 --json bench/end_to_end.json

Per-stage seconds come from each side's own timers; peak memory is the child process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _prepare(work: Path) -> dict:
    """Weights, masks and the POPI pair (written once)."""
    import numpy as np
    import torch
    from icon_registration.pretrained_models import lung_ct

    from monai_gradicon.io import Image, read_image, write_nifti
    from monai_gradicon.lung_mask import lung_mask
    from monai_gradicon.resample import Grid, warp_physical

    torch.manual_seed(0)
    model = lung_ct.make_network()
    model.assign_identity_map([1, 1, 175, 175, 175])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.regis_net.named_parameters():
            if "lastConv.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.07)
    weights = work / "lung_model_weights_step_2.trch"
    torch.save(model.regis_net.state_dict(), weights)

    cases = {}
    lung = SHARED / "lung_ct_pyradiomics"
    masks = {}
    for name in ("lung1", "lung2"):
        ct = read_image(lung / f"{name}_image.nrrd")
        masks[name] = work / f"{name}_mask.nii.gz"
        write_nifti(masks[name], lung_mask(ct, method="threshold").mask.astype(np.uint8), ct.affine)
    cases["lung"] = {"fixed": str(lung / "lung1_image.nrrd"), "moving": str(lung / "lung2_image.nrrd"),
                     "fixed_mask": str(masks["lung1"]), "moving_mask": str(masks["lung2"])}

    popi = read_image(SHARED / "lung_ct_popi_phase00" / "popi_phase00_ct.nii.gz")
    grid = Grid.of(popi)
    shape = (300, 300, 100)
    affine = popi.affine.copy()
    affine[:3, :3] = popi.affine[:3, :3] @ np.diag([512 / 300, 512 / 300, 141 / 100])
    affine[:3, 3] = popi.affine[:3, 3] + np.array([6.0, -4.0, 5.0])
    moving = warp_physical(popi.array.astype(np.float32), grid, np.zeros((3, *shape), np.float32),
                           Grid(shape, affine), padding_mode="zeros")
    write_nifti(work / "popi_moving.nii.gz", moving.astype(np.int16), affine)
    pm = lung_mask(popi, method="threshold").mask
    write_nifti(work / "popi_mask.nii.gz", pm.astype(np.uint8), popi.affine)
    mm = lung_mask(Image(moving.astype(np.int16), affine), method="threshold").mask
    write_nifti(work / "popi_moving_mask.nii.gz", mm.astype(np.uint8), affine)
    cases["popi"] = {"fixed": str(SHARED / "lung_ct_popi_phase00" / "popi_phase00_ct.nii.gz"),
                     "moving": str(work / "popi_moving.nii.gz"), "fixed_mask": str(work / "popi_mask.nii.gz"),
                     "moving_mask": str(work / "popi_moving_mask.nii.gz")}
    return {"weights": str(weights), "cases": cases}


def _theirs(case: dict, weights: str, out: Path) -> dict:
    """The authors' file-level path (in this process); seconds per stage."""
    t0 = time.perf_counter()
    import itk
    import torch
    from icon_registration import itk_wrapper
    from icon_registration.pretrained_models import lung_ct

    timings = {"import": time.perf_counter() - t0}
    t = time.perf_counter()
    fixed, moving = itk.imread(case["fixed"]), itk.imread(case["moving"])
    fixed_mask, moving_mask = itk.imread(case["fixed_mask"]), itk.imread(case["moving_mask"])
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    a = lung_ct.lung_network_preprocess(moving, moving_mask)
    b = lung_ct.lung_network_preprocess(fixed, fixed_mask)
    model = lung_ct.make_network()
    model.regis_net.load_state_dict(torch.load(weights, map_location="cpu"))
    model.assign_identity_map([1, 1, 175, 175, 175])
    model.eval()
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    phi_ab, _ = itk_wrapper.register_pair(model, a, b)
    timings["register"] = time.perf_counter() - t
    t = time.perf_counter()
    itk.transformwrite([phi_ab], str(out / "transform.hdf5"))
    # the interpolator must match the (float) image being resampled, not the file's pixel type (int16 here)
    moving_f = itk.cast_image_filter(moving, ttype=(type(moving), itk.Image[itk.F, 3]))
    interpolator = itk.LinearInterpolateImageFunction.New(moving_f)
    warped = itk.resample_image_filter(moving_f, transform=phi_ab, interpolator=interpolator,
                                       use_reference_image=True, reference_image=fixed)
    timings["warp"] = time.perf_counter() - t
    t = time.perf_counter()
    itk.imwrite(warped, str(out / "warped.nii.gz"))
    timings["write"] = time.perf_counter() - t
    return timings


def _peak_rss_child(args: list[str], env: dict) -> tuple[float, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:5]))} failed:\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=["lung", "popi"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "theirs":
        spec = json.loads(args.spec)
        print("TIMINGS " + json.dumps(_theirs(spec["case"], spec["weights"], Path(spec["out"]))))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads),
               PYTHONWARNINGS="ignore")
    work = Path(tempfile.mkdtemp(prefix="e2e_"))
    prepared = _prepare(work)
    rows = []
    for case in args.cases:
        spec = prepared["cases"][case]
        for rep in range(args.repeats):
            # "ours": the default outputs (both directions, DDF, det J, overview); "ours-matched": the two files the
            # authors' path writes (the forward transform and the warped image), so the inverse is not computed
            for side, extra in (("ours", []), ("ours-matched", ["--outputs", "displacement,warped", "--nooverview"])):
                out = work / f"{side}_{case}_{rep}"
                cmd = [sys.executable, "-m", "monai_gradicon", "register", "--fixed", spec["fixed"], "--moving",
                       spec["moving"], "--fixed_mask", spec["fixed_mask"], "--moving_mask", spec["moving_mask"],
                       "--weights", prepared["weights"], "--io_iterations", "0", "--output_dir", str(out),
                       "--noprogress", "--device", "cpu", *extra]
                wall, rss, _ = _peak_rss_child(cmd, env)
                summary = json.loads((out / "summary.json").read_text())
                rows.append({"case": case, "side": side, "rep": rep, "wall_s": wall, "peak_gib": rss,
                             "stages": summary["timings_seconds"], "load": os.getloadavg()[0]})
            theirs_out = work / f"theirs_{case}_{rep}"
            theirs_out.mkdir()
            job = json.dumps({"case": spec, "weights": prepared["weights"], "out": str(theirs_out)})
            wall, rss, log = _peak_rss_child([sys.executable, __file__, "--worker", "theirs", "--spec", job], env)
            stages = json.loads(next(line for line in log.splitlines() if line.startswith("TIMINGS "))[8:])
            rows.append({"case": case, "side": "theirs", "rep": rep, "wall_s": wall, "peak_gib": rss,
                         "stages": stages, "load": os.getloadavg()[0]})
            for r in rows[-3:]:
                print(f"{r['case']:5s} {r['side']:6s} rep {r['rep']}: {r['wall_s']:6.1f} s, {r['peak_gib']:5.2f} GiB, "
                      f"load {r['load']:.2f}  "
                      + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items()), flush=True)
    print("\ncase   ours wall / theirs wall   ours peak / theirs peak   (medians)")
    summary = {}
    for case in args.cases:
        def med(side, key):
            values = sorted(r[key] for r in rows if r["case"] == case and r["side"] == side)
            return values[len(values) // 2]
        tw, tp = med("theirs", "wall_s"), med("theirs", "peak_gib")
        summary[case] = {"theirs_s": tw, "theirs_gib": tp}
        for side in ("ours", "ours-matched"):
            ow, op = med(side, "wall_s"), med(side, "peak_gib")
            summary[case][side] = {"time_ratio": ow / tw, "memory_ratio": op / tp, "seconds": ow, "gib": op}
            print(f"{case:5s} {side:12s} {ow:6.1f} s / {tw:6.1f} s = {ow / tw:.2f}    {op:5.2f} / {tp:5.2f} GiB = "
                  f"{op / tp:.2f}")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {platform.processor() or platform.machine()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary, "load": load,
                                               "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
