"""Registration accuracy side by side: GradICON field optimization, ANTs SyN, FireANTs, ConvexAdam, on real anatomy.

Cases (``--case``, ``field_cases.make_case``; ``--case all`` runs the first four, one table each): every method
registers the same pair (A = moving, B = fixed) on the same ``--size``³ grid and returns the two maps ``Phi_AB``
(fixed -> moving) and ``Phi_BA`` (moving -> fixed) as normalized maps on that grid; all metrics come from those maps.

==================  ===================================================================================================
``popi-breathing``  (default) POPI phase-00 CT resized to the grid, lung window, pulled through a known smooth
                    exhale-like field (15 mm S-I); TRE at ``--points`` lung landmarks
``mni-synthetic``   MNI152 2009a T1 (brain-masked), MR intensities to [0, 1], pulled through a known smooth
                    inter-subject-like field (two random Gaussian-filtered scales, at most 7 mm in the brain); TRE at
                    ``--points`` landmarks in the brain (GM + WM > 0.5, eroded)
``mni-colin``       MNI152 2009a T1 (fixed) and Colin27 ``ch2bet`` (moving), both skull-stripped, in the MNI
                    file's field of view; Dice of the brain masks (non-zero region of each); no known truth
``lung-pair``       pyradiomics lung1 (fixed) and lung2 (moving), two patients, each centred on its lung-mask centroid
                    in one box, lung window; Dice of the lung masks (``monai_gradicon.lung_mask``, threshold method);
                    no known truth
``mni-shift``       the convention check: the MNI T1 and a copy shifted by (3, -2, 1) voxels; ``--self-test`` runs it
==================  ===================================================================================================

Metrics (``-`` where a case has no such thing):

* TRE (mm, mean and 95th percentile), synthetic cases: ``Phi_AB`` at the fixed landmarks, ``Phi_BA`` at the moving
  ones;
* Dice, pair cases: the moving mask pulled through ``Phi_AB`` (trilinear, > 0.5) against the fixed mask (A→B), the
  fixed mask through ``Phi_BA`` against the moving mask (B→A);
* % folds: voxels with det J <= 0 (central differences, ``metrics.folding_percentage``) of each map;
* SDlogJ of ``Phi_AB`` (``metrics.log_jacobian_std``);
* inverse consistency ``|Phi_AB(Phi_BA(x)) - x|`` in mm over every voxel (mean and maximum);
* wall time, process CPU time and peak RSS of the method (both directions), each method alone in a fresh process
  that loads the case, built once in a process of its own (the load average is printed before each method).

Methods (``--methods``):

==================  ===================================================================================================
``identity``        both maps the identity
``field``           ``optimize_fields`` from scratch with its defaults (``--field-args`` JSON overrides them)
``surrogate``       a stand-in for a network's output: the true maps plus independent smooth errors of up to
                    ``--surrogate-error`` mm (``field_cases.surrogate_init``), unoptimized (synthetic cases only)
``field-io``        ``optimize_fields`` started from ``surrogate`` with its IO defaults (``--io-args`` overrides them)
``ants-syn``        ANTsPy ``registration(type_of_transform="SyN")`` with its defaults (affine, then SyN with
                    mattes MI, iterations 40x20x0 at shrink 4x2x1: no full-resolution iterations)
``ants-syn-fine``   ANTsPy SyN like ``antsRegistrationSyN.sh``: affine, then SyN with CC radius 4,
                    iterations 100x70x50x20 at shrink 8x4x2x1, gradient step 0.1 (full-resolution iterations)
``fireants``        FireANTs 1.5 ``SyNRegistration`` on the CPU with the settings of its own pairwise brain script
                    (``FIREANTS_DEFAULTS``: scales 4, 2, 1; iterations 100, 75, 50; CC window 5; Adam lr 0.5;
                    no affine stage); ``--fireants-args`` JSON overrides them. Its SyN has no inverse in the API, so
                    ``Phi_BA`` is a second registration the other way (``--fireants-inverse separate``, default) or
                    SyN's two half-way warps composed the other way round (``syn``)
``convexadam``      ConvexAdam 0.2 ``convex_adam_pt`` (MIND features) on the CPU, float32, its defaults, once per
                    direction; ``--convexadam-args`` JSON overrides them
``network``         with ``--weights PATH`` (a released lung model): the 4-step network's maps
``network-io``      its ``instance_optimize`` (``--io-steps``, default 50)
``network-field-io`` ``optimize_fields`` from the network's maps with its IO defaults
==================  ===================================================================================================

Conversions to our normalized maps (channel k = array axis k, ``[0, 1]`` = first to last voxel centre):
ANTs gets the images with their voxel size (mm per grid voxel), origin 0 and identity direction; its forward and
inverse transforms are composed into displacement fields (``apply_transforms(..., compose=)``, mm along array axes)
and divided by the voxel size; its affine stage's random sampling is seeded (``--ants-seed``). FireANTs gets SimpleITK
images of the arrays (sitk x, y, z = array axes 2, 1, 0) with the voxel size; ``get_warped_coordinates`` gives
``grid_sample`` coordinates ``[1, *n, 3]`` in ``[-1, 1]`` (``align_corners=True``, last axis x, y, z), flipped and
rescaled (``grid_coords_to_map``). ConvexAdam returns a voxel displacement ``(*n, 3)`` along array axes with the moving
image read at ``i + disp[i]`` (its ``apply_convex``), made a map by ``ddf_to_map`` (``voxel_disp_to_map``).
``--self-test`` prints both conversions on known inputs, then runs ``mni-shift`` and prints the recovered shift of
every method next to the true one (use ``--size 48``).

ANTs, FireANTs and ConvexAdam run only if they import (``antspyx``, ``fireants``, ``convexadam``: benchmark-only
dependencies in a separate venv, never package dependencies); ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` and
``OMP_NUM_THREADS`` are set to ``--threads`` for every worker and ``torch.set_num_threads(--threads)``. A method
that fails or runs past ``--timeout`` seconds gets a row saying so and the run goes on.

    python bench/field_accuracy.py                                   # POPI at 175³, default methods
    python bench/field_accuracy.py --case all --size 96 --json /tmp/acc96.json
    python bench/field_accuracy.py --self-test --size 48 --threads 1 --field-args '{"levels": 2}'
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
from field_cases import (
    CASES,
    DEFAULT_DATA,
    Case,
    dice,
    make_case,
    surrogate_init,
    tre_mm,
)

METHODS = ("identity", "field", "surrogate", "field-io", "ants-syn", "ants-syn-fine", "fireants", "convexadam",
           "network", "network-io", "network-field-io")
DEFAULT_METHODS = ("identity", "field", "surrogate", "field-io", "ants-syn", "ants-syn-fine", "fireants",
                   "convexadam")
ALL_CASES = ("popi-breathing", "mni-synthetic", "mni-colin", "lung-pair")  # --case all
TRUTH_METHODS = ("surrogate", "field-io")  # start from the true maps: only where the truth is known
# which import each optional method needs (benchmark-only packages, never package dependencies)
NEEDS = {"ants-syn": "ants", "ants-syn-fine": "ants", "fireants": "fireants", "convexadam": "convexAdam"}
PACKAGES = {"ants": "antspyx", "fireants": "fireants", "convexAdam": "convexadam"}

# FireANTs SyN as in its own pairwise brain scripts (fireants/scripts/pairwise/test_lpba40.py, algo "syn"), without
# their affine stage: scales 4, 2, 1; iterations 100, 75, 50; CC window 5; compositive warps; Adam lr 0.5; gradient
# smoothing sigma 1 (warp smoothing: the class default, 0.5).
FIREANTS_DEFAULTS = {"scales": [4, 2, 1], "iterations": [100, 75, 50], "loss_type": "cc", "cc_kernel_size": 5,
                     "deformation_type": "compositive", "optimizer": "Adam", "optimizer_lr": 0.5,
                     "smooth_grad_sigma": 1.0}


def have_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def have_ants() -> bool:
    return have_module("ants")


def package_versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("torch", "antspyx", "fireants", "convexadam", "SimpleITK"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


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


def run_ants(case, fine: bool, threads: int, workdir: str, overrides: dict | None = None, seed: int | None = 1):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants

    # antsRegistration --random-seed (what ants.set_ants_deterministic sets, without forcing one thread): the affine
    # stage's MI samples 20 % of the voxels at random, and at small sizes its result varied from run to run
    ants.config._random_seed = seed

    spacing = tuple(float(s) for s in case.spacing_mm)
    fixed = ants.from_numpy(case.fixed[0, 0].numpy(), origin=(0.0, 0.0, 0.0), spacing=spacing)
    moving = ants.from_numpy(case.moving[0, 0].numpy(), origin=(0.0, 0.0, 0.0), spacing=spacing)
    prefix = os.path.join(workdir, "ants_")
    if fine:
        kwargs = {"syn_metric": "CC", "syn_sampling": 4, "reg_iterations": (100, 70, 50, 20), "grad_step": 0.1,
                  "flow_sigma": 3, "total_sigma": 0}
    else:
        kwargs = {}
    kwargs.update(overrides or {})
    reg = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=prefix, **kwargs)
    return reg["fwdtransforms"], reg["invtransforms"]


# ------------------------------------------------------------------------------------------------------ FireANTs
def grid_coords_to_map(coords: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` coordinates ``[1, *n, 3]`` (``[-1, 1]``, ``align_corners=True``, last axis (x, y, z) = array
    axes (2, 1, 0)) -> our normalized map ``[1, 3, *n]`` (``[0, 1]``, channel k = array axis k)."""
    return ((coords.detach().flip(-1).float() + 1.0) / 2.0).movedim(-1, 1).contiguous()


def _fireants_batch(array: torch.Tensor, spacing_mm):
    """A ``[*n]`` array as a FireANTs batch of one: sitk's (x, y, z) = array axes (2, 1, 0), origin 0, identity
    direction, our voxel size."""
    import SimpleITK as sitk
    from fireants.io import BatchedImages, Image

    img = sitk.GetImageFromArray(array.numpy().astype("float32"))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_mm)))
    return BatchedImages([Image(img, device="cpu")])


def run_fireants(case, settings: dict, inverse: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """FireANTs ``SyNRegistration`` on the CPU; ``Phi_AB`` from ``get_warped_coordinates``. FireANTs 1.5's SyN has
    no inverse (``get_inverse_warp_parameters`` raises ``NotImplementedError``), so ``Phi_BA`` comes from
    ``inverse="separate"``: a second registration with the roles swapped, or ``inverse="syn"``: SyN's own two
    half-way warps the other way round, ``rev o fwd^-1`` (the mirror of what its ``get_warp_parameters`` does for
    ``fwd o rev^-1``, with its ``compositive_warp_inverse``)."""
    import logging

    import fireants.utils.warputils  # noqa: F401  (creates its loggers)
    from fireants.registration.syn import SyNRegistration

    for name in list(logging.root.manager.loggerDict):  # FireANTs sets INFO on its module loggers (a line per stage)
        if name.startswith("fireants"):  # and WARNING "fireants_fused_ops is not found" (its CUDA ops) per level
            logging.getLogger(name).setLevel(logging.ERROR)
    fixed = _fireants_batch(case.fixed[0, 0], case.spacing_mm)
    moving = _fireants_batch(case.moving[0, 0], case.spacing_mm)
    reg = SyNRegistration(fixed_images=fixed, moving_images=moving, progress_bar=False, **settings)
    reg.optimize()
    with torch.no_grad():
        phi_ab = grid_coords_to_map(reg.get_warped_coordinates(fixed, moving))
    extra = {"fireants_inverse": inverse}
    if inverse == "separate":
        reg_ba = SyNRegistration(fixed_images=moving, moving_images=fixed, progress_bar=False, **settings)
        reg_ba.optimize()
        with torch.no_grad():
            phi_ba = grid_coords_to_map(reg_ba.get_warped_coordinates(moving, fixed))
    elif inverse == "syn":
        phi_ba = grid_coords_to_map(_fireants_syn_inverse(reg, moving))
    else:
        raise ValueError(f"--fireants-inverse must be 'separate' or 'syn', got {inverse!r}")
    return phi_ab, phi_ba, extra


def _fireants_syn_inverse(reg, moving) -> torch.Tensor:
    """``[1, *n, 3]`` grid coordinates of ``rev o fwd^-1`` on the moving grid (both images share one grid and no
    affine was used, so the affine part is the identity)."""
    import torch.nn.functional as F
    from fireants.utils.util import compose_warp
    from fireants.utils.warputils import compositive_warp_inverse

    shape = tuple(moving().shape[2:])

    def full(w: torch.Tensor) -> torch.Tensor:  # [1, *m, 3] displacement -> on the image grid
        if tuple(w.shape[1:-1]) == shape:
            return w
        return F.interpolate(w.movedim(-1, 1), size=shape, mode="trilinear", align_corners=True).movedim(1, -1)

    fwd = full(reg.fwd_warp.get_warp().detach())
    rev = full(reg.rev_warp.get_warp().detach())
    fwd_inv = compositive_warp_inverse(moving, fwd, displacement=True, scales=reg.scales, iterations=reg.iterations,
                                       progress_bar=False).detach()
    with torch.no_grad():
        disp = compose_warp(rev, full(fwd_inv))
        ident = F.affine_grid(torch.eye(3, 4)[None], [1, 1, *shape], align_corners=True)
    return ident + disp


# ---------------------------------------------------------------------------------------------------- ConvexAdam
def voxel_disp_to_map(disp) -> torch.Tensor:
    """ConvexAdam's ``(*n, 3)`` voxel displacement along array axes (the moving image is sampled at ``i + disp[i]``)
    -> our normalized map ``[1, 3, *n]``."""
    from monai_gradicon.maps import ddf_to_map

    return ddf_to_map(torch.as_tensor(disp, dtype=torch.float32).movedim(-1, 0)[None].contiguous())


def run_convexadam(case, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``convex_adam_pt`` (ConvexAdam with MIND features) on the CPU in float32, once per direction."""
    from convexAdam.convex_adam_MIND import convex_adam_pt

    fixed, moving = case.fixed[0, 0].numpy(), case.moving[0, 0].numpy()
    kw = dict(device=torch.device("cpu"), dtype=torch.float32, **settings)
    disp_ab = convex_adam_pt(fixed, moving, **kw)
    disp_ba = convex_adam_pt(moving, fixed, **kw)
    return voxel_disp_to_map(disp_ab), voxel_disp_to_map(disp_ba)


# ----------------------------------------------------------------------------------------------------- self-test
def conversion_self_test(shape=(20, 24, 28), shift=(1.5, -2.0, 0.75)) -> list[str]:
    """The two output conversions on known inputs, without the libraries (no asserts: lines to read).

    * ``grid_coords_to_map``: ``F.affine_grid`` of a translation by ``shift`` voxels along array axes (0, 1, 2)
      (what ``grid_sample`` would use to read ``image(x + t)``) must become ``x + t``, and ``warp_image`` through the
      converted map must equal ``F.grid_sample`` through the coordinates.
    * ``voxel_disp_to_map``: a constant ConvexAdam-style displacement ``t`` must become ``x + t``, and ``warp_image``
      through it must equal ``scipy.ndimage.map_coordinates(image, i + disp)`` (ConvexAdam's ``apply_convex``).
    """
    import numpy as np
    import torch.nn.functional as F
    from scipy import ndimage

    from monai_gradicon.maps import identity_map, warp_image

    n = torch.tensor(shape, dtype=torch.float32)
    t = torch.tensor(shift, dtype=torch.float32)
    expected = identity_map(shape) + (t / (n - 1)).view(1, 3, 1, 1, 1)
    theta = torch.eye(3, 4)[None]
    theta[0, :, 3] = (2.0 * t / (n - 1)).flip(0)  # grid axes (x, y, z) = array axes (2, 1, 0)
    coords = F.affine_grid(theta, [1, 1, *shape], align_corners=True)
    gen = torch.Generator().manual_seed(0)
    image = F.interpolate(torch.rand((1, 1, 5, 6, 7), generator=gen), size=shape, mode="trilinear",
                          align_corners=True)
    phi = grid_coords_to_map(coords)
    sampled = F.grid_sample(image, coords, padding_mode="border", align_corners=True)
    lines = [(f"grid_coords_to_map: max |map - (x + t)| = {float((phi - expected).abs().max()):.2e}; "
              f"max |warp_image - grid_sample| = {float((warp_image(image, phi) - sampled).abs().max()):.2e}")]
    disp = np.broadcast_to(np.asarray(shift, dtype=np.float32), (*shape, 3)).copy()
    phi = voxel_disp_to_map(disp)
    ident = np.stack(np.meshgrid(*[np.arange(k) for k in shape], indexing="ij"))
    moved = ndimage.map_coordinates(image[0, 0].numpy(), ident + disp.transpose(3, 0, 1, 2), order=1, mode="nearest")
    interior = tuple(slice(3, k - 3) for k in shape)  # away from the border, where the paddings differ
    lines.append(f"voxel_disp_to_map: max |map - (x + t)| = {float((phi - expected).abs().max()):.2e}; max |warp_image"
                 f" - map_coordinates| (interior) = "
                 f"{float(np.abs(warp_image(image, phi)[0, 0].numpy() - moved)[interior].max()):.2e}")
    return lines


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
        fine = method == "ants-syn-fine"
        overrides = json.loads(args.ants_fine_args if fine else args.ants_args)
        seed = None if args.ants_seed < 0 else args.ants_seed
        fwd, inv = run_ants(case, fine, args.threads, workdir, overrides, seed)
        phi_ab, phi_ba = _ants_maps(case, fwd, inv, workdir)
        return phi_ab, phi_ba, extra
    if method == "fireants":
        settings = dict(FIREANTS_DEFAULTS, **json.loads(args.fireants_args))
        return run_fireants(case, settings, args.fireants_inverse)
    if method == "convexadam":
        phi_ab, phi_ba = run_convexadam(case, json.loads(args.convexadam_args))
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

    out: dict = {}
    if case.has_truth:
        out.update(tre_mm(case, phi_ab, phi_ba))
    if case.has_masks:
        out.update(dice(case, phi_ab, phi_ba))
    if case.name == "mni-shift":  # the convention check: the recovered constant shift, voxels per array axis
        out.update(recovered_shift(case, phi_ab, phi_ba))
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


def recovered_shift(case, phi_ab: torch.Tensor, phi_ba: torch.Tensor) -> dict:
    """Median displacement (voxels, per array axis) of ``Phi_AB`` at the fixed landmarks and of ``Phi_BA`` at the
    moving ones, and the true shift ``t`` (``Phi_AB = x + t``, ``Phi_BA = y - t``)."""
    from field_cases import map_at_points

    ab = (map_at_points(phi_ab, case.points_fixed) - case.points_fixed).median(0).values
    ba = (map_at_points(phi_ba, case.points_moving) - case.points_moving).median(0).values
    return {"shift_true_vox": [-float(v) for v in case.displacement[0, :, 0, 0, 0]],
            "shift_ab_vox": [round(float(v), 3) for v in ab], "shift_ba_vox": [round(float(v), 3) for v in ba]}


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    case = Case.load(args.case_file)
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
WORKER_OPTIONS = ("surrogate_error", "field_args", "io_args", "io_steps", "ants_args", "ants_fine_args",
                  "ants_seed", "fireants_args", "fireants_inverse", "convexadam_args", "threads")


def build_case(args) -> dict:
    """The ``--build`` worker: make the case, save it to ``--case-file``, return what the tables need."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    case = make_case(args.build, args.data, args.size, count=args.points, amplitude_mm=args.amplitude)
    build_seconds = time.perf_counter() - t0
    case.save(args.case_file)
    return {"case": args.build, "info": case.info, "shape": list(case.shape), "spacing_mm": list(case.spacing_mm),
            "points": int(case.points_fixed.shape[0]) if case.has_truth else 0, "mask": case.mask_name,
            "has_truth": case.has_truth, "build_seconds": build_seconds}


def run_case(name: str, args, tmp: str) -> dict:
    """Build the case once (in its own process, saved for the workers, not timed), run every method in its own
    process. The main process never holds a case: a child process starts with its parent's peak RSS as its own
    (Linux keeps the high-water mark across fork and exec), so every worker's peak would include it."""
    case_file = os.path.join(tmp, f"{name}.pt")
    meta_file = os.path.join(tmp, f"{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--build", name, "--case-file", case_file, "--out", meta_file,
           "--size", str(args.size), "--points", str(args.points), "--threads", str(args.threads), "--data", args.data]
    if args.amplitude is not None:
        cmd += ["--amplitude", str(args.amplitude)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    with open(meta_file) as f:
        meta = json.load(f)
    print(f"== case {name} at {args.size}³ (built in {meta['build_seconds']:.1f} s; voxel "
          f"{' x '.join(f'{s:.2f}' for s in meta['spacing_mm'])} mm)", flush=True)
    results = []
    for method in args.methods:
        need = NEEDS.get(method)
        if need and not have_module(need):
            print(f"skipping {method}: `import {need}` fails in this interpreter (pip install {PACKAGES[need]} in a "
                  "bench venv)", flush=True)
            continue
        if method in TRUTH_METHODS and not meta["has_truth"]:
            print(f"skipping {method}: case {name} has no known maps to start from", flush=True)
            continue
        out = os.path.join(tmp, f"{name}_{method}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--out", out, "--case-file", case_file]
        for opt in WORKER_OPTIONS:
            cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
        if args.weights:
            cmd += ["--weights", args.weights]
        # TQDM_DISABLE: FireANTs' SyN inverts a warp with a progress bar that its API cannot switch off
        env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads),
                   OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
        load = load_average()
        print(f"{method} ... (load {load})", flush=True)
        t = time.perf_counter()
        try:
            subprocess.run(cmd, check=True, env=env, timeout=args.timeout)
            with open(out) as f:
                r = json.load(f)
        except subprocess.TimeoutExpired:
            r = {"method": method, "error": f"stopped after {args.timeout:.0f} s (--timeout)", "load_before": load}
        except subprocess.CalledProcessError as e:
            r = {"method": method, "error": f"worker exited with status {e.returncode} after "
                                            f"{time.perf_counter() - t:.0f} s", "load_before": load}
        results.append(r)
        print("  " + (r["error"] if "error" in r else _summary(r)), flush=True)
    return dict(meta, results=results)


def _summary(r: dict) -> str:
    parts = [f"{r['seconds']:.1f} s"]
    if "tre_ab_mm" in r:
        parts.append(f"TRE {r['tre_ab_mm']:.2f} / {r['tre_ba_mm']:.2f} mm")
    if "dice_ab" in r:
        parts.append(f"Dice {r['dice_ab']:.4f} / {r['dice_ba']:.4f}")
    if "shift_ab_vox" in r:
        parts.append(f"shift AB {r['shift_ab_vox']} BA {r['shift_ba_vox']} (true AB {r['shift_true_vox']})")
    parts.append(f"folds {r['folds_ab_pct']:.4f} / {r['folds_ba_pct']:.4f} %")
    return ", ".join(parts)


def _fmt(r: dict, key: str, spec: str) -> str:
    return "-" if key not in r or r[key] is None else format(r[key], spec)


COLUMNS = (("TRE A→B mean", "tre_ab_mm", ".2f"), ("p95", "tre_ab_p95_mm", ".2f"),
           ("TRE B→A mean", "tre_ba_mm", ".2f"), ("p95", "tre_ba_p95_mm", ".2f"),
           ("Dice A→B", "dice_ab", ".4f"), ("Dice B→A", "dice_ba", ".4f"),
           ("folds AB %", "folds_ab_pct", ".4f"), ("folds BA %", "folds_ba_pct", ".4f"),
           ("SDlogJ AB", "sdlogj_ab", ".3f"),
           ("IC mean mm", "ic_mean_mm", ".3f"), ("IC max mm", "ic_max_mm", ".2f"), ("time s", "seconds", ".1f"),
           ("CPU s", "cpu_seconds", ".1f"))


def markdown_table(case_result: dict, args) -> str:
    gib = 1024.0**3
    c = case_result
    truth = f"{c['points']} landmarks" if c["points"] else "no known truth"
    mask = f"{c['mask']} masks (Dice)" if c["mask"] else "no masks"
    voxel = " x ".join(f"{s:.2f}" for s in c["spacing_mm"])
    lines = [(f"### {c['case']}, {args.size}³ (voxel {voxel} mm; {truth}; {mask}), {args.threads} threads, "
              f"torch {torch.__version__}"), ""]
    head = ["method"] + [h for h, _, _ in COLUMNS] + ["peak RSS GiB", "load before (1/5/15 min)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|" + "---:|" * (len(head) - 2) + "---|")
    for r in c["results"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} |" + " |" * (len(head) - 3) + f" {r['load_before']} |")
            continue
        cells = [r["method"]] + [_fmt(r, k, f) for _, k, f in COLUMNS]
        cells += [f"{r['peak_rss_bytes'] / gib:.2f}", r["load_before"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("TRE / IC in mm; Dice: the moving mask through Phi_AB against the fixed mask (A→B) and the fixed "
                 "mask through Phi_BA against the moving mask (B→A); folds: % voxels with det J <= 0; time: wall "
                 "seconds of the registration alone (both directions); peak RSS: that method's process (includes the "
                 "loaded case)")
    if any("shift_ab_vox" in r for r in c["results"]):
        lines.append("")
        lines.append("Recovered shift (median displacement at the landmarks, voxels along array axes 0 / 1 / 2):")
        lines.append("")
        lines.append("| method | Phi_AB | Phi_BA | true Phi_AB (Phi_BA: its negative) |")
        lines.append("|---|---|---|---|")
        for r in c["results"]:
            if "shift_ab_vox" in r:
                lines.append(f"| {r['method']} | {r['shift_ab_vox']} | {r['shift_ba_vox']} | {r['shift_true_vox']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs="+", default=["popi-breathing"], choices=CASES + ("all",),
                        help=f"case(s); 'all' = {' '.join(ALL_CASES)} (mni-shift: the convention check)")
    parser.add_argument("--size", type=int, default=175)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--points", type=int, default=300, help="landmarks of the synthetic cases (default 300)")
    parser.add_argument("--amplitude", type=float, default=None,
                        help="largest displacement of the synthetic cases in mm (default: 15 POPI S-I, 7 MNI)")
    parser.add_argument("--surrogate-error", type=float, default=5.0, help="largest error of the surrogate (mm)")
    parser.add_argument("--field-args", default="{}", help="JSON keyword arguments for optimize_fields (scratch)")
    parser.add_argument("--io-args", default="{}", help="JSON keyword arguments for optimize_fields (IO)")
    parser.add_argument("--ants-args", default="{}", help="JSON keyword arguments for ants.registration of "
                        "ants-syn (override its settings, e.g. '{\"reg_iterations\": [10, 5, 0]}')")
    parser.add_argument("--ants-fine-args", default="{}", help="likewise for ants-syn-fine")
    parser.add_argument("--ants-seed", type=int, default=1, help="antsRegistration --random-seed (-1: none)")
    parser.add_argument("--fireants-args", default="{}", help="JSON overrides of the FireANTs SyN settings "
                        f"{json.dumps(FIREANTS_DEFAULTS)}")
    parser.add_argument("--fireants-inverse", choices=("separate", "syn"), default="separate",
                        help="Phi_BA of FireANTs: a second registration (default) or SyN's half-way warps")
    parser.add_argument("--convexadam-args", default="{}", help="JSON keyword arguments for convex_adam_pt")
    parser.add_argument("--weights", default=None, help="released lung weights for the network methods")
    parser.add_argument("--io-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=None, help="stop a method after this many seconds")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--json", default=None)
    parser.add_argument("--self-test", action="store_true",
                        help="the convention check: the conversions on known inputs, then case mni-shift (use a small "
                        "--size such as 48)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None or args.build is not None:
        result = worker(args) if args.worker is not None else build_case(args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0

    torch.set_num_threads(args.threads)
    if args.self_test:
        print("\n".join(conversion_self_test()), flush=True)
        args.case = ["mni-shift"]
        if args.methods == list(DEFAULT_METHODS):
            args.methods = ["identity", "field", "ants-syn", "fireants", "convexadam"]
    names = list(dict.fromkeys(n for c in args.case for n in (ALL_CASES if c == "all" else (c,))))
    summary = {"size": args.size, "threads": args.threads, "versions": package_versions(),
               "command": " ".join(sys.argv), "cases": []}
    with tempfile.TemporaryDirectory(prefix="field_accuracy_main_") as tmp:
        for name in names:
            summary["cases"].append(run_case(name, args, tmp))
            if args.json:  # after every case, so a stopped run keeps what finished
                with open(args.json, "w") as f:
                    json.dump(summary, f, indent=1)
    print()
    for c in summary["cases"]:
        print(markdown_table(c, args))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
