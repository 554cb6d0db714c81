"""Affine pre-alignment: ``monai_gradicon.affine.register_affine`` against ANTs, on real images moved by known affines.

What is measured
----------------
For each real image of ``../shared/data`` (MNI152 2009a T1, Colin27 T1, POPI phase-00 thorax CT) and each case, the
*moving* image is the real image resampled through a **known** world affine ``M_true`` (fixed RAS mm -> moving RAS
mm) onto a **different grid** (other spacing, an oblique direction and reversed axes, a field of view around the
moved anatomy), plus Gaussian noise. The *fixed* image is the real image on its own grid. Each method estimates
``M``; the **residual** at ``--points`` (1000) fixed points drawn inside the anatomy (brain mask: MNI GM+WM
probability > 0.5, Colin27 ``ch2bet`` > 0; POPI: the body, HU > -500 largest component with holes filled) is
``|M x - M_true x|`` in mm, reported as mean / p95 / max, with the wall time of the registration call (images
already in memory for ours; already read by ANTs for ANTs; file I/O excluded for both).

Cases: ``extreme`` (30 degrees about each of the three axes, translation (40, -40, 40) mm, scales (1.15, 0.85, 1.15))
and ``--random`` random ones (seeded): rotations uniform in [-30, 30] degrees about each axis, translations uniform in
[-40, 40] mm per axis, scales in [0.85, 1.15] per axis, shears in [-0.05, 0.05]; all about the anatomy's centre.
``t2like`` cases (brains, ``--t2like``) also remap the moving intensities (T1 -> ``280 - T1`` inside the head, 0
outside: CSF bright, white matter dark) so that only mutual information can work.

Methods (``--methods``):

* ``ours-lncc``, ``ours-mi``: ``register_affine(fixed, moving, similarity=...)`` with the module defaults (or
  ``--levels/--iterations/--lr``), rigid then affine, centre-of-mass init; torch ``--threads`` threads.
* ``ants-affine``: ``ants.registration(type_of_transform="Affine")`` (antspyx defaults: centre-of-mass init,
  Mattes MI 32 bins 20% regular sampling, Affine[0.25], 2100x1200x1200x10 iterations, shrink 6x4x2x1, smoothing
  3x2x1x0 voxels).
* ``ants-quick``: ``ants.registration(type_of_transform="antsRegistrationSyNQuick[a]")`` (rigid then affine, MI,
  shrink 8x4x2x1; the ANTs script's linear stages).

All run in this one process with ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` and ``torch.set_num_threads`` set to
``--threads`` (default 2). The load average is recorded with every timing (``os.getloadavg``). ANTs' transform file
is read with our ``read_itk_affine`` (MATLAB ``.mat``) and cross-checked against ``ants.apply_ants_transform_to_point``.
``--check-itk`` (needs SimpleITK) additionally resamples the moving image with SimpleITK through our
``write_itk_affine`` file and compares it with ``warp_affine`` (the ITK convention check).

Install (a separate venv: antspyx and SimpleITK are benchmark-only, never package dependencies; always pass the
constraints so that pip never pulls a CUDA torch)::

    python -m venv .venv-bench && source .venv-bench/bin/activate
    pip install -c constraints.txt torch==2.13.0
    pip install -c constraints.txt -e .
    pip install -c constraints.txt antspyx SimpleITK

Run from the repository root::

    python bench/affine_vs_ants.py --quick                    # the extreme case per image, ours-lncc + ants-affine
    python bench/affine_vs_ants.py --json bench/affine.json   # extreme + 2 random cases per image, all methods
    python bench/affine_vs_ants.py --images mni --methods ours-lncc ours-mi --random 4   # ours only (no ANTs needed)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
IMAGES = {
    "mni": "brain_mni152_2009a_sym/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "colin": "brain_colin27_ch2/ch2.nii.gz",
    "popi": "lung_ct_popi_phase00/popi_phase00_ct.nii.gz",
}
METHODS = ("ours-lncc", "ours-mi", "ants-affine", "ants-quick")
# moving grid per image kind: spacing (mm) and an oblique direction (rotation about world axes, degrees)
MOVING_GRID = {"mr": ((1.3, 1.1, 1.2), (12.0, -8.0, 15.0)), "ct": ((1.25, 1.25, 2.5), (5.0, 10.0, -12.0))}


# ------------------------------------------------------------------------------------------------ geometry
def rotation(degrees) -> np.ndarray:
    """Rotation matrix ``R_z R_y R_x`` for angles (degrees) about world x, y, z."""
    ax, ay, az = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def known_affine(centre, degrees, translation, scales, shears=(0.0, 0.0, 0.0)) -> np.ndarray:
    """``(4, 4)`` fixed -> moving world matrix ``y = R S H (x - c) + c + t`` (H: upper-triangular shear)."""
    shear = np.eye(3)
    shear[0, 1], shear[0, 2], shear[1, 2] = shears
    a = rotation(degrees) @ np.diag(scales) @ shear
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = np.asarray(centre) + np.asarray(translation) - a @ np.asarray(centre)
    return m


def case_list(n_random: int, t2like: bool) -> list[dict]:
    cases = [dict(name="extreme", degrees=(30.0, 30.0, 30.0), translation=(40.0, -40.0, 40.0),
                  scales=(1.15, 0.85, 1.15), shears=(0.0, 0.0, 0.0), t2like=False)]
    for seed in range(1, n_random + 1):
        rng = np.random.default_rng(seed)
        cases.append(dict(name=f"random{seed}", degrees=tuple(rng.uniform(-30, 30, 3)),
                          translation=tuple(rng.uniform(-40, 40, 3)), scales=tuple(rng.uniform(0.85, 1.15, 3)),
                          shears=tuple(rng.uniform(-0.05, 0.05, 3)), t2like=False))
    if t2like:
        rng = np.random.default_rng(100)
        cases.append(dict(name="t2like", degrees=tuple(rng.uniform(-30, 30, 3)),
                          translation=tuple(rng.uniform(-40, 40, 3)), scales=tuple(rng.uniform(0.85, 1.15, 3)),
                          shears=tuple(rng.uniform(-0.05, 0.05, 3)), t2like=True))
    return cases


# ------------------------------------------------------------------------------------------------ data
def load_subject(name: str, data_dir: str):
    """The real image, its anatomy mask (bool, same grid), the background value and the kind (``mr``/``ct``)."""
    import scipy.ndimage as ndi

    from monai_gradicon.io import read_image

    image = read_image(os.path.join(data_dir, IMAGES[name]))
    image.array = image.array.astype(np.float32)
    if name == "mni":
        folder = os.path.join(data_dir, "brain_mni152_2009a_sym")
        gm = read_image(os.path.join(folder, "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")).array
        wm = read_image(os.path.join(folder, "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")).array
        return image, (gm.astype(np.float32) + wm.astype(np.float32)) > 0.5, 0.0, "mr"
    if name == "colin":
        bet = read_image(os.path.join(data_dir, "brain_colin27_ch2", "ch2bet.nii.gz")).array
        return image, bet > 0, 0.0, "mr"
    body = image.array > -500
    labels, count = ndi.label(body)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    for k in range(body.shape[2]):  # fill the lungs, slice by slice
        body[:, :, k] = ndi.binary_fill_holes(body[:, :, k])
    return image, body, -1024.0, "ct"


def moving_grid(points_world: np.ndarray, kind: str, margin: float = 15.0):
    """An oblique grid with reversed first two axes covering ``points_world`` plus ``margin`` mm."""
    from monai_gradicon.resample import Grid

    spacing, degrees = MOVING_GRID[kind]
    direction = rotation(degrees) @ np.diag([-1.0, -1.0, 1.0])
    local = points_world @ direction  # coordinates along the grid's axes (direction is orthonormal)
    lo, hi = local.min(0) - margin, local.max(0) + margin
    shape = tuple(int(np.ceil((h - l) / s)) + 1 for l, h, s in zip(lo, hi, spacing))
    aff = np.eye(4)
    aff[:3, :3] = direction @ np.diag(spacing)
    aff[:3, 3] = direction @ lo
    return Grid(shape, aff)


def make_case(subject, case: dict, n_points: int, seed: int = 0):
    """Fixed image, moving image, true matrix and ``[n_points, 3]`` fixed world points inside the anatomy."""
    from monai_gradicon.affine import warp_affine
    from monai_gradicon.io import Image
    from monai_gradicon.resample import Grid

    image, anatomy, background, kind = subject
    fixed_grid = Grid.of(image)
    idx = np.argwhere(anatomy)
    rng = np.random.default_rng(seed)
    points = fixed_grid.index_to_world(idx[rng.choice(len(idx), n_points, replace=False)].astype(np.float64))
    centre = fixed_grid.index_to_world(idx.mean(0))
    m_true = known_affine(centre, case["degrees"], case["translation"], case["scales"], case["shears"])
    # the moving field of view: the moved anatomy (every 7th anatomy voxel is enough for the box)
    sub = fixed_grid.index_to_world(idx[::7].astype(np.float64))
    grid = moving_grid(sub @ m_true[:3, :3].T + m_true[:3, 3], kind)
    source = image.array - background
    if case["t2like"]:
        head = image.array > 0.05 * float(image.array.max())
        source = np.where(head, np.clip(280.0 - image.array, 0, None), 0.0).astype(np.float32)
    src = Image(source.astype(np.float32), image.affine)
    # moving(y) = fixed(M_true^-1 y): resample the fixed image onto the moving grid through the inverse matrix
    moved = warp_affine(src, grid, np.linalg.inv(m_true), padding_mode="zeros") + background
    noise = 10.0 if kind == "ct" else 2.5
    moved = moved + np.random.default_rng(seed + 1).normal(0.0, noise, moved.shape).astype(np.float32)
    moving = Image(moved.astype(np.float32), grid.affine)
    return image, moving, m_true, points


# ------------------------------------------------------------------------------------------------ methods
def residuals(matrix, m_true, points) -> dict:
    d = np.linalg.norm(points @ (matrix[:3, :3] - m_true[:3, :3]).T + (matrix[:3, 3] - m_true[:3, 3]), axis=1)
    return {"mean": float(d.mean()), "p95": float(np.percentile(d, 95)), "max": float(d.max())}


def run_ours(fixed, moving, similarity, args):
    from monai_gradicon.affine import DEFAULT_LEVELS, DEFAULT_LR, register_affine

    kwargs = dict(levels=args.levels or DEFAULT_LEVELS, iterations=args.iterations,
                  lr=args.lr or DEFAULT_LR)
    t0 = time.perf_counter()
    result = register_affine(fixed, moving, similarity=similarity, device=args.device, progress=args.verbose,
                             **kwargs)
    seconds = time.perf_counter() - t0
    return result.matrix, seconds, {"history": result.history, "init": result.stage_matrices["init"].tolist()}


def ants_image(image, folder, name):
    import ants

    from monai_gradicon.io import write_nifti

    path = os.path.join(folder, f"{name}.nii.gz")
    write_nifti(path, image.array.astype(np.float32), image.affine)
    img = ants.image_read(path)
    # the geometry ANTs read must be ours (LPS = flip of RAS)
    lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, :3]
    got = np.asarray(img.direction) @ np.diag(img.spacing)
    assert np.allclose(got, lps, atol=1e-4), (got, lps)
    return img


def run_ants(fixed_img, moving_img, kind, points):
    import ants

    from monai_gradicon.affine import read_itk_affine

    t0 = time.perf_counter()
    out = ants.registration(fixed_img, moving_img, type_of_transform=kind)
    seconds = time.perf_counter() - t0
    files = out["fwdtransforms"]
    assert len(files) == 1, files
    matrix = read_itk_affine(files[0])
    tx = ants.read_transform(files[0])
    # cross-check our reading of the .mat file with ANTs' own point mapping (LPS)
    flip = np.array([-1.0, -1.0, 1.0])
    for p in points[:5]:
        q = np.asarray(ants.apply_ants_transform_to_point(tx, tuple(p * flip))) * flip
        assert np.allclose(q, matrix[:3, :3] @ p + matrix[:3, 3], atol=1e-3), (q, p)
    for f in files:
        os.remove(f)
    return matrix, seconds, {}


def check_itk(fixed, moving, matrix, folder) -> float:
    """Max |SimpleITK resampling through our .tfm - warp_affine| relative to the moving intensity range."""
    import SimpleITK as sitk

    from monai_gradicon.affine import warp_affine, write_itk_affine
    from monai_gradicon.io import write_nifti
    from monai_gradicon.resample import Grid

    path = write_itk_affine(os.path.join(folder, "ours.tfm"), matrix)
    write_nifti(os.path.join(folder, "f.nii.gz"), fixed.array.astype(np.float32), fixed.affine)
    write_nifti(os.path.join(folder, "m.nii.gz"), moving.array.astype(np.float32), moving.affine)
    f = sitk.ReadImage(os.path.join(folder, "f.nii.gz"))
    m = sitk.ReadImage(os.path.join(folder, "m.nii.gz"))
    out = sitk.Resample(m, f, sitk.ReadTransform(path), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    theirs = np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))
    ours = warp_affine(moving, Grid.of(fixed), matrix, padding_mode="zeros")
    # compare where the moving point is well inside the moving image (ITK and torch differ at the very border)
    inside = warp_affine(type(moving)(np.ones(moving.shape, np.float32), moving.affine), Grid.of(fixed), matrix,
                         padding_mode="zeros") > 0.999
    span = float(moving.array.max() - moving.array.min())
    return float(np.abs(theirs - ours)[inside].max() / span)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", default=list(IMAGES), choices=list(IMAGES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--random", type=int, default=2, help="random cases per image (besides 'extreme')")
    p.add_argument("--cases", nargs="+", default=None, help="run only these cases (e.g. extreme random1)")
    p.add_argument("--t2like", action="store_true", help="add a contrast-changed brain case (MI methods only)")
    p.add_argument("--quick", action="store_true", help="the extreme case only, methods ours-lncc and ants-affine")
    p.add_argument("--points", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--levels", type=float, nargs="+", default=None, help="override DEFAULT_LEVELS (mm)")
    p.add_argument("--iterations", type=int, nargs="+", default=None, help="override DEFAULT_ITERATIONS")
    p.add_argument("--lr", type=float, default=None, help="override DEFAULT_LR")
    p.add_argument("--check-itk", action="store_true", help="SimpleITK resampling through our .tfm vs warp_affine")
    p.add_argument("--data", default=DATA)
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.random = 0
        args.methods = [m for m in args.methods if m in ("ours-lncc", "ants-affine")] if argv is None or \
            "--methods" not in (argv or sys.argv) else args.methods
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    uses_ants = any(m.startswith("ants") for m in args.methods)
    if uses_ants:
        import ants  # noqa: F401  (fail early when the bench venv is not active)
    rows = []
    meta = {"machine": platform.platform(), "processor": platform.processor(), "threads": args.threads,
            "torch": torch.__version__, "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if uses_ants:
        import ants

        meta["antspyx"] = getattr(ants, "__version__", "?")
    cases = case_list(args.random, args.t2like)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.images:
            subject = load_subject(name, args.data)
            for case in cases:
                if case["t2like"] and subject[3] != "mr" or args.cases and case["name"] not in args.cases:
                    continue
                fixed, moving, m_true, points = make_case(subject, case, args.points)
                base = {"image": name, "case": case["name"], "fixed_shape": fixed.shape, "moving_shape": moving.shape}
                rows.append({**base, "method": "none", **residuals(np.eye(4), m_true, points), "seconds": 0.0,
                             "load": os.getloadavg()[0]})
                f_ants = m_ants = None
                for method in args.methods:
                    if case["t2like"] and method == "ours-lncc":
                        continue
                    if method.startswith("ours"):
                        matrix, seconds, extra = run_ours(fixed, moving, method.split("-")[1], args)
                        if args.check_itk and method == "ours-lncc":
                            extra["itk_check_rel"] = check_itk(fixed, moving, matrix, folder)
                    else:
                        if f_ants is None:
                            f_ants = ants_image(fixed, folder, "fixed")
                            m_ants = ants_image(moving, folder, "moving")
                        kind = {"ants-affine": "Affine", "ants-quick": "antsRegistrationSyNQuick[a]"}[method]
                        matrix, seconds, extra = run_ants(f_ants, m_ants, kind, points)
                    row = {**base, "method": method, **residuals(matrix, m_true, points), "seconds": seconds,
                           "load": os.getloadavg()[0], "matrix": matrix.tolist(), **extra}
                    rows.append(row)
                    print(f"{name:6s} {case['name']:8s} {method:12s} mean {row['mean']:7.3f}  p95 {row['p95']:7.3f}  "
                          f"max {row['max']:7.3f} mm  {seconds:7.2f} s  load {row['load']:.2f}"
                          + (f"  itk {extra['itk_check_rel']:.1e}" if "itk_check_rel" in extra else ""), flush=True)
    print()
    print(f"residual |M x - M_true x| at {args.points} anatomy points (mm); time of the registration call; "
          f"{args.threads} threads; load = 1-min load average after the call")
    header = "| image | case | method | mean mm | p95 mm | max mm | seconds | load |"
    print(header)
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['image']} | {r['case']} | {r['method']} | {r['mean']:.3f} | {r['p95']:.3f} | {r['max']:.3f} | "
              f"{r['seconds']:.1f} | {r['load']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "rows": rows}, f, indent=1,
                      default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
