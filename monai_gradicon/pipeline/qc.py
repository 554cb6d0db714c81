"""Quality control of one registration: inverse consistency, folds, SDlogJ, NDV, and pictures through the anatomy.

:func:`write_qc_report` writes, for a :class:`~monai_gradicon.pipeline.result.RegistrationResult` computed with its
inverse (``inverse=True``), into a folder (:data:`QC_FILES`):

* ``qc_inverse_consistency_mm.nii.gz``: the inverse-consistency error on the fixed grid, float32 mm
  (:func:`inverse_consistency_error`);
* ``qc_overview.png``: the overview figure (fixed, moving box-aligned, warped, difference, deformation grid, det J)
  through slices chosen on the anatomy (:func:`anatomy_slices`), and ``qc_inverse_consistency.png``: the error map
  on the same slices;
* ``qc.json``: the numbers (:func:`qc_summary`), and ``qc_report.html``: one self-contained page with the numbers and
  both pictures embedded (base64 PNG; no external files, scripts or styles).

**Inverse consistency, exactly what is composed.** For every voxel ``x`` of the fixed image's stored grid (world
RAS mm): ``y = x + u(x)`` is ``Phi_AB`` (fixed -> moving) at ``x`` -- ``u`` is the result's ``displacement``, the
transform evaluated at each fixed voxel by stage 4 -- and ``z = Phi_BA(y)`` is the result's moving -> fixed point
mapping evaluated at the point ``y`` itself (:meth:`RegistrationResult.moving_to_fixed`: the transform, no
interpolated field). The error is ``|z - x| = |Phi_BA(Phi_AB(x)) - x|`` in mm: 0 for an exactly inverse pair. Both
transforms are the result's own (``settings.transform_scheme``), in physical space, so the number does not depend
on the images' grids. ``grid="moving"`` gives the other composition, ``|Phi_AB(Phi_BA(y)) - y|`` on the moving
image's stored grid.

**Slices through the anatomy.** The central slice of each axis can miss the organ (between the two lungs on a
sagittal CT slice). :func:`qc_slices` takes, per axis, the slice holding the most of a weight volume: the fixed
image's mask when there is one (given, or the automatic lung mask of ``lung_ct`` weights) -- the slice with the most
mask voxels; otherwise the fixed intensities above their 1st percentile -- the slice with the most intensity mass
(for a CT without a mask that is the body, not specifically the lungs).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from monai_gradicon.io import write_nifti
from monai_gradicon.io_utils import atomic_write_text, jsonable
from monai_gradicon.metrics import learn2reg_sdlogj, non_diffeomorphic_volume
from monai_gradicon.pipeline.result import RegistrationResult
from monai_gradicon.resample import DEFAULT_CHUNK_VOXELS, Grid

__all__ = [
    "QC_FILES",
    "IC_GRIDS",
    "inverse_consistency_error",
    "error_statistics",
    "anatomy_slices",
    "qc_slices",
    "qc_summary",
    "inverse_consistency_figure",
    "write_qc_report",
]

QC_FILES = {
    "error_map": "qc_inverse_consistency_mm.nii.gz",
    "overview": "qc_overview.png",
    "inverse_consistency": "qc_inverse_consistency.png",
    "summary": "qc.json",
    "report": "qc_report.html",
}
"""File names :func:`write_qc_report` writes (the HTML page last)."""

IC_GRIDS = ("fixed", "moving")

IC_DEFINITION = (
    "|Phi_BA(Phi_AB(x)) - x| in mm for every voxel x of the fixed grid: Phi_AB at x is x + u(x) (the result's "
    "displacement field, evaluated at each fixed voxel), Phi_BA is the result's moving -> fixed point mapping "
    "evaluated at that point; world RAS coordinates"
)


def inverse_consistency_error(
    result: RegistrationResult, grid: str = "fixed", chunk_voxels: int = DEFAULT_CHUNK_VOXELS
) -> np.ndarray:
    """The inverse-consistency error of a result, per voxel, in mm (see the module docstring for what is composed).

    Args:
        result: a result computed with ``inverse=True``.
        grid: ``"fixed"``: ``|Phi_BA(Phi_AB(x)) - x|`` on the fixed image's grid; ``"moving"``:
            ``|Phi_AB(Phi_BA(y)) - y|`` on the moving image's stored grid.
        chunk_voxels: voxels mapped at once (memory bound).

    Returns:
        ``[*S]`` float32 mm on the chosen grid.
    """
    if grid not in IC_GRIDS:
        raise ValueError(f"grid must be one of {IC_GRIDS}, got {grid!r}.")
    if result.phi_ba is None or result.inverse_displacement is None:
        raise ValueError("The inverse-consistency error needs the inverse transform: register with inverse=True.")
    if grid == "fixed":
        target, field, back = Grid.of(result.fixed), result.displacement, result.moving_to_fixed
    else:
        target, field, back = Grid.of(result.moving), result.inverse_displacement, result.fixed_to_moving
    out = np.empty(target.shape, dtype=np.float32)
    rows_per_slab = max(1, int(chunk_voxels) // max(1, int(np.prod(target.shape[1:]))))
    others = [np.arange(n, dtype=np.float64) for n in target.shape[1:]]
    for start in range(0, target.shape[0], rows_per_slab):
        stop = min(start + rows_per_slab, target.shape[0])
        index = np.stack(np.meshgrid(np.arange(start, stop, dtype=np.float64), *others, indexing="ij"), axis=-1)
        # index -> world (RAS mm); einsum: numpy's matmul of a [K, 3] by a 3 x 3 matrix is several times slower
        world = np.einsum("kj,ij->ki", index.reshape(-1, target.ndim), target.matrix) + target.offset
        moved = world + np.moveaxis(field[:, start:stop], 0, -1).reshape(-1, target.ndim)
        returned = back(moved)
        out[start:stop] = np.linalg.norm(returned - world, axis=1).reshape(stop - start, *target.shape[1:])
    return out


def error_statistics(error: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """``mean_mm``, ``median_mm``, ``p95_mm`` (``numpy.percentile``, linear), ``max_mm`` and ``voxels`` of an error
    map, over the voxels where ``mask`` is nonzero (all voxels without a mask)."""
    values = np.asarray(error, dtype=np.float64)
    if mask is not None:
        m = np.asarray(mask) != 0
        if m.shape != values.shape:
            raise ValueError(f"mask shape {m.shape} does not match the error map {values.shape}.")
        values = values[m]
    values = values.ravel()
    if values.size == 0:
        raise ValueError("No voxel to summarise (empty mask).")
    return {"mean_mm": float(values.mean()), "median_mm": float(np.median(values)),
            "p95_mm": float(np.percentile(values, 95)), "max_mm": float(values.max()), "voxels": int(values.size)}


def anatomy_slices(weights: np.ndarray) -> tuple[int, ...]:
    """Per axis of a 3D weight volume ``[*S]`` (>= 0), the slice index with the largest total weight (ties: the
    one nearest the centre ``N // 2``). A volume without weight gives the central slices."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 3:
        raise ValueError(f"anatomy_slices needs a 3D weight volume, got shape {w.shape}.")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("The slice weights must be finite and >= 0.")
    chosen = []
    for axis, n in enumerate(w.shape):
        per_slice = w.sum(axis=tuple(a for a in range(3) if a != axis))
        best = per_slice.max()
        if best <= 0:
            chosen.append(n // 2)
            continue
        candidates = np.nonzero(per_slice == best)[0]
        chosen.append(int(candidates[np.argmin(np.abs(candidates - n // 2))]))
    return tuple(chosen)


def qc_slices(result: RegistrationResult) -> tuple[tuple[int, ...] | None, str]:
    """``(slices, how)`` for a result's pictures: :func:`anatomy_slices` of the fixed mask (given or automatic) or,
    without one, of the fixed intensities above their 1st percentile; ``(None, ...)`` for a 2D result."""
    fixed = result.fixed
    if fixed.ndim != 3:
        return None, "2D image: its single plane"
    mask = result.prepared.inputs.fixed_mask
    if mask is not None:
        source = result.prepared.inputs.fixed_mask_source or "given"
        return anatomy_slices(mask.astype(np.float32)), f"most fixed-mask voxels per slice (mask: {source})"
    values = np.asarray(fixed.array, dtype=np.float32)
    floor = float(np.percentile(values, 1.0))
    return (anatomy_slices(np.clip(values - floor, 0.0, None)),
            "most fixed-image intensity above its 1st percentile per slice (no mask)")


def qc_summary(result: RegistrationResult, error: np.ndarray, slices: tuple[int, ...] | None,
               slices_how: str) -> dict[str, Any]:
    """The numbers of the QC report (what ``qc.json`` holds).

    Args:
        result: the registration.
        error: :func:`inverse_consistency_error` on the fixed grid.
        slices, slices_how: from :func:`qc_slices`.
    """
    if error.shape != result.fixed.shape:
        raise ValueError(f"The error map {error.shape} is not on the fixed grid {result.fixed.shape}.")
    mask = result.prepared.inputs.fixed_mask
    summary: dict[str, Any] = {
        "fixed": result.fixed.path or "in-memory image",
        "moving": result.moving.path or "in-memory image",
        "inverse_consistency": {
            "definition": IC_DEFINITION,
            "transform_scheme": result.settings.transform_scheme,
            "all_voxels": error_statistics(error),
            "fixed_mask": error_statistics(error, mask) if mask is not None else None,
        },
        "folds": {
            "percent": result.folds_percent,
            "count": int(np.count_nonzero(result.jacobian <= 0)),
            "definition": "voxels of the fixed grid with det J <= 0 (physical Jacobian of x -> x + u(x), central "
                          "differences)",
        },
        "log_jacobian_std": result.log_jacobian_std,
        "jacobian_min": float(result.jacobian.min()),
        "jacobian_max": float(result.jacobian.max()),
        "displacement_mm_max": result.displacement_mm_max,
        "slices": {"indices": list(slices) if slices is not None else None,
                   "centre": [n // 2 for n in result.fixed.shape], "chosen_by": slices_how},
    }
    if result.fixed.ndim == 3 and min(result.fixed.shape) >= 5:
        ddf = result.ddf  # computed from the mm field on each access: once here
        ndv = non_diffeomorphic_volume(ddf)
        summary["learn2reg"] = {
            "field": "the fixed-grid voxel DDF (the Learn2Reg field when both images share one grid)",
            "SDlogJ": learn2reg_sdlogj(ddf),
            "NDV_percent": ndv["ndv_percent"],
            "NDP_percent": ndv["ndp_percent"],
        }
    return summary


def inverse_consistency_figure(result: RegistrationResult, error: np.ndarray, slices: Sequence[int] | None,
                               panel_size: float = 2.6, dpi: int = 100):
    """Figure (Agg canvas): per plane, the fixed image and the inverse-consistency error (mm, ``magma``, 0 to the
    99th percentile of the map) through ``slices`` (3D) or the single plane (2D); pixel aspect from the spacing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fixed = np.asarray(result.fixed.array, dtype=np.float32)
    spacing = result.fixed.spacing
    if fixed.ndim == 3:
        planes = [(axis, int(slices[axis]), tuple(a for a in range(3) if a != axis)) for axis in range(3)]
    else:
        planes = [(None, None, (0, 1))]
    lo, hi = (float(v) for v in np.percentile(fixed, [1.0, 99.0]))
    hi = hi if hi > lo else lo + 1.0
    top = max(float(np.percentile(error, 99.0)), 1e-6)
    fig = Figure(figsize=(2 * panel_size + 0.6, len(planes) * panel_size + 0.5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(planes), 2, squeeze=False)
    image = None
    for row, (axis, index, (a, b)) in enumerate(planes):
        take = (lambda v: v) if axis is None else (lambda v, ax=axis, i=index: np.take(v, i, axis=ax))
        axes[row, 0].imshow(take(fixed), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        image = axes[row, 1].imshow(take(error), cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
        axes[row, 0].set_ylabel("2D" if axis is None else f"axis {axis} = {index}", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect(float(spacing[a] / spacing[b]))
    axes[0, 0].set_title("fixed", fontsize=8)
    axes[0, 1].set_title("|Phi_BA(Phi_AB(x)) - x| (mm)", fontsize=8)
    fig.colorbar(image, ax=axes[:, 1].tolist(), shrink=0.8, label="mm")
    stats = error_statistics(error)
    fig.suptitle(f"inverse consistency: mean {stats['mean_mm']:.3g} mm, p95 {stats['p95_mm']:.3g} mm, "
                 f"max {stats['max_mm']:.3g} mm", fontsize=9)
    return fig




def _number(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    return f"{value}{unit}"


def _html(summary: dict[str, Any], images: dict[str, bytes]) -> str:
    ic = summary["inverse_consistency"]
    rows = [
        ("moving -> fixed", f"{summary['moving']} -> {summary['fixed']}"),
        ("inverse consistency, all voxels: mean / p95 / max",
         " / ".join(_number(ic["all_voxels"][k], " mm") for k in ("mean_mm", "p95_mm", "max_mm"))),
    ]
    if ic["fixed_mask"] is not None:
        rows.append(("inverse consistency, in the fixed mask: mean / p95 / max",
                     " / ".join(_number(ic["fixed_mask"][k], " mm") for k in ("mean_mm", "p95_mm", "max_mm"))))
    rows += [
        ("folds (det J <= 0)", f"{_number(summary['folds']['percent'], ' %')} ({summary['folds']['count']} voxels)"),
        ("std log det J", _number(summary["log_jacobian_std"])),
        ("det J min / max", f"{_number(summary['jacobian_min'])} / {_number(summary['jacobian_max'])}"),
        ("largest displacement", _number(summary["displacement_mm_max"], " mm")),
    ]
    if "learn2reg" in summary:
        l2r = summary["learn2reg"]
        rows += [("Learn2Reg SDlogJ", _number(l2r["SDlogJ"])),
                 ("Learn2Reg NDV / NDP", f"{_number(l2r['NDV_percent'], ' %')} / {_number(l2r['NDP_percent'], ' %')}")]
    sl = summary["slices"]
    rows.append(("slices shown", f"{sl['indices']} (centre {sl['centre']}): {sl['chosen_by']}"))
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    pictures = "\n".join(
        f"<h2>{html.escape(title)}</h2>\n<img alt=\"{html.escape(title)}\" "
        f"src=\"data:image/png;base64,{base64.b64encode(data).decode('ascii')}\">"
        for title, data in images.items())
    definitions = html.escape(ic["definition"])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Registration QC</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f2f2f2; font-weight: normal; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style>
</head>
<body>
<h1>Registration QC</h1>
<table>
{table}
</table>
<p><small>Inverse consistency: {definitions}.</small></p>
{pictures}
</body>
</html>
"""


def write_qc_report(result: RegistrationResult, folder: str | os.PathLike, overwrite: bool = False,
                    chunk_voxels: int = DEFAULT_CHUNK_VOXELS) -> dict[str, str]:
    """Write the QC files of one registration into ``folder`` (created if missing); returns ``{key of
    QC_FILES: path}``.

    Args:
        result: a result computed with ``inverse=True``.
        folder: where to write; its other files are left alone.
        overwrite: replace QC files already there (otherwise an existing one is an error, before any work).
        chunk_voxels: voxels mapped at once for the error map.

    Each file is written atomically (temporary file + rename); the HTML page last.
    """
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"The QC folder {folder} exists and is not a directory.")
    paths = {key: os.path.join(folder, name) for key, name in QC_FILES.items()}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds QC files ({', '.join(os.path.basename(p) for p in existing)});"
                              " pass overwrite=True to replace them, or choose another folder.")
    if result.phi_ba is None:
        raise ValueError("The QC report needs the inverse transform: register with inverse=True.")
    os.makedirs(folder, exist_ok=True)
    error = inverse_consistency_error(result, "fixed", chunk_voxels)
    slices, how = qc_slices(result)
    summary = qc_summary(result, error, slices, how)
    write_nifti(paths["error_map"], error, result.fixed.affine)
    result.save_overview(paths["overview"], slices=slices)

    from monai_gradicon.visualize import save_figure_png

    save_figure_png(inverse_consistency_figure(result, error, slices), paths["inverse_consistency"])
    summary["files"] = {key: os.path.basename(p) for key, p in paths.items()}
    atomic_write_text(paths["summary"], json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    images = {}
    for key, title in (("overview", "Overview"), ("inverse_consistency", "Inverse consistency")):
        with open(paths[key], "rb") as f:
            images[title] = f.read()
    atomic_write_text(paths["report"], _html(summary, images))
    return paths
