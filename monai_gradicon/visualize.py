# Copyright (c) monai-gradicon contributors
# Licensed under the Apache License, Version 2.0
"""
Registration overview figures (matplotlib, Agg canvas) and an Ignite handler that logs them to TensorBoard.

No ``matplotlib.pyplot`` is used: figures are :class:`matplotlib.figure.Figure` objects rendered with
:class:`matplotlib.backends.backend_agg.FigureCanvasAgg`, so nothing is registered in pyplot's global figure
manager and the process-wide backend is left untouched.

Conventions: images are ``[D, H, W]`` (3D) or ``[H, W]`` (2D), numpy arrays or torch tensors, optionally with
leading singleton (batch/channel) dimensions; the DDF is ``[dim, *S]`` in voxels of the fixed grid
(:class:`monai.networks.blocks.Warp` convention, channel ``i`` = displacement along tensor spatial axis ``i``).
Slices are shown without reorientation: the first in-plane tensor axis runs down the panel, the second runs to the
right. Pixels are square (voxel units) unless a voxel ``spacing`` is given, which draws each panel to physical scale.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure

from monai_gradicon.io_utils import atomic_write
from monai_gradicon.metrics import jacobian_determinant

__all__ = [
    "overview_figure",
    "figure_to_array",
    "save_figure_png",
    "save_overview_png",
    "RegistrationImageHandler",
]

#: column titles of :func:`overview_figure`, in order.
COLUMNS = ("fixed", "moving", "warped", "warped - fixed", "deformation grid", "det J")
#: colour used to highlight folded voxels (det J <= 0) in the Jacobian panel.
FOLD_COLOR = "#00ff00"
#: colour of the deformation grid lines (visible on both dark and bright backgrounds).
GRID_COLOR = "#ff6600"
#: display range of the Jacobian determinant panel (values outside are clipped; folds are overlaid).
JACOBIAN_RANGE = (0.0, 2.0)

ArrayLike = torch.Tensor | np.ndarray


# ----------------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Detach/copy a tensor or array to a float32 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    try:
        return np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}.") from e


def _drop_leading_singletons(x: np.ndarray, ndim: int, name: str, expected: str) -> np.ndarray:
    """Remove leading size-1 axes until ``x.ndim == ndim``; raise ValueError if that is impossible."""
    while x.ndim > ndim and x.shape[0] == 1:
        x = x[0]
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {expected} (leading singleton axes allowed), got {x.shape}.")
    return x


def _prepare_inputs(
    fixed: Any, moving: Any, warped: Any, ddf: Any, jacobian: Any | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate shapes and return numpy ``fixed, moving, warped [*S]``, ``ddf [dim, *S]`` and ``jacobian [*S]``."""
    ddf_np = _to_numpy(ddf, "ddf")
    while ddf_np.ndim > 3 and ddf_np.shape[0] == 1 and ddf_np.ndim - 1 != ddf_np.shape[0]:
        ddf_np = ddf_np[0]
    dim = ddf_np.ndim - 1
    if dim not in (2, 3) or ddf_np.shape[0] != dim:
        raise ValueError(f"ddf must have shape [2, H, W] or [3, D, H, W] (displacement in voxels), got {ddf_np.shape}.")
    spatial = ddf_np.shape[1:]
    expected = "[H, W]" if dim == 2 else "[D, H, W]"
    images = []
    for name, img in (("fixed", fixed), ("moving", moving), ("warped", warped)):
        arr = _drop_leading_singletons(_to_numpy(img, name), dim, name, expected)
        if arr.shape != spatial:
            raise ValueError(f"{name} has spatial shape {arr.shape} but ddf has {spatial}; they must match.")
        images.append(arr)
    if jacobian is None:
        jac = jacobian_determinant(torch.from_numpy(ddf_np)[None])[0].numpy()
    else:
        jac = _drop_leading_singletons(_to_numpy(jacobian, "jacobian"), dim, "jacobian", expected)
        if jac.shape != spatial:
            raise ValueError(f"jacobian has spatial shape {jac.shape} but ddf has {spatial}; they must match.")
    return images[0], images[1], images[2], ddf_np, jac


def _planes(spatial: Sequence[int], slices: Sequence[int] | None = None) -> list[tuple[int | None, int | None,
                                                                                      tuple[int, ...]]]:
    """
    Orthogonal planes as ``(normal_axis, index, in_plane_axes)``.

    3D: one plane per axis, through ``slices[axis]`` (default the central voxel ``N // 2``). 2D: a single plane
    ``(None, None, (0, 1))`` (``slices`` must then be None).
    """
    if len(spatial) == 2:
        if slices is not None:
            raise ValueError("slices selects planes of a 3D volume; a 2D image has a single plane.")
        return [(None, None, (0, 1))]
    if slices is None:
        slices = [n // 2 for n in spatial]
    index = [int(s) for s in slices]
    if len(index) != 3 or any(not 0 <= i < n for i, n in zip(index, spatial)):
        raise ValueError(f"slices must give one index per axis within the volume {tuple(spatial)}, got {list(slices)}.")
    return [(ax, index[ax], tuple(a for a in range(3) if a != ax)) for ax in range(3)]


def _slice(vol: np.ndarray, axis: int | None, index: int | None) -> np.ndarray:
    """2D slice of a ``[*S]`` array (or the array itself for 2D)."""
    return vol if axis is None else np.take(vol, index, axis=axis)


def _intensity_range(*images: np.ndarray) -> tuple[float, float]:
    """Robust shared display range (1st-99th percentile) of intensity images."""
    values = np.concatenate([im[np.isfinite(im)].ravel() for im in images])
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [1.0, 99.0]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


# ----------------------------------------------------------------------------------------------------------------
# panels
# ----------------------------------------------------------------------------------------------------------------


def _draw_grid(ax: Any, background: np.ndarray, disp_rows: np.ndarray, disp_cols: np.ndarray, step: int,
               vrange: tuple[float, float]) -> None:
    """
    Deformed grid over a fixed slice.

    Grid node ``(i, j)`` of the fixed slice is drawn at ``(i + disp_rows, j + disp_cols)`` (voxels), i.e. where it
    lands in the moving image under the pull-back ``x -> x + ddf(x)``. Out-of-plane displacement is ignored.
    """
    rows, cols = background.shape
    ax.imshow(background, cmap="gray", vmin=vrange[0], vmax=vrange[1], interpolation="nearest")
    ii, jj = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    y, x = ii + disp_rows, jj + disp_cols
    row_lines = sorted(set(range(0, rows, step)) | {rows - 1})
    col_lines = sorted(set(range(0, cols, step)) | {cols - 1})
    for i in row_lines:
        ax.plot(x[i, :], y[i, :], color=GRID_COLOR, linewidth=0.6)
    for j in col_lines:
        ax.plot(x[:, j], y[:, j], color=GRID_COLOR, linewidth=0.6)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)


def _draw_jacobian(ax: Any, jac: np.ndarray) -> Any:
    """Jacobian determinant with a diverging map centred at 1 and folds (det J <= 0) overlaid in FOLD_COLOR."""
    norm = TwoSlopeNorm(vmin=JACOBIAN_RANGE[0], vcenter=1.0, vmax=JACOBIAN_RANGE[1])
    image = ax.imshow(jac, cmap=matplotlib.colormaps["RdBu_r"], norm=norm, interpolation="nearest")
    folds = np.ma.masked_where(~(jac <= 0), np.ones_like(jac))
    ax.imshow(folds, cmap=ListedColormap([FOLD_COLOR]), vmin=0, vmax=1, interpolation="nearest")
    return image


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray | None:
    """``spacing`` as a float array of ``ndim`` positive finite voxel sizes, or None."""
    if spacing is None:
        return None
    values = np.asarray([float(v) for v in spacing], dtype=np.float64)
    if values.shape != (ndim,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(
            f"spacing must hold {ndim} positive finite voxel sizes (one per spatial axis), got {tuple(spacing)}."
        )
    return values


def _auto_grid_step(spatial: Sequence[int], lines: int = 20) -> int:
    """Grid line spacing (voxels) giving about ``lines`` lines along the longest axis."""
    return max(1, int(round(max(spatial) / lines)))


def overview_figure(
    fixed: ArrayLike,
    moving: ArrayLike,
    warped: ArrayLike,
    ddf: ArrayLike,
    jacobian: ArrayLike | None = None,
    title: str | None = None,
    grid_step: int | None = None,
    panel_size: float = 2.2,
    dpi: int = 100,
    spacing: Sequence[float] | None = None,
    slices: Sequence[int] | None = None,
) -> Figure:
    """
    Overview of one registration result.

    Rows: three orthogonal planes of a 3D volume (normal to tensor axes 0, 1, 2; slice indices ``slices``, default
    the central ``N // 2``), or a single row for 2D. Columns (:data:`COLUMNS`): fixed, moving, warped (shared grey
    range,
    1st-99th percentile of fixed and moving), difference ``warped - fixed`` (diverging, symmetric), deformation grid
    (fixed slice with grid lines moved by the in-plane DDF components) and the Jacobian determinant (``RdBu_r``
    centred at 1 over :data:`JACOBIAN_RANGE`, folded voxels with ``det J <= 0`` in :data:`FOLD_COLOR`).

    Args:
        fixed: fixed image ``[D, H, W]`` or ``[H, W]`` (leading singleton axes allowed), numpy or torch.
        moving: moving image, same shape (on the same grid, as for :class:`monai.networks.blocks.Warp`).
        warped: moving image warped into the fixed frame, same shape.
        ddf: ``[3, D, H, W]`` or ``[2, H, W]`` displacement in voxels.
        jacobian: optional precomputed ``det J`` ``[*S]``; computed from ``ddf`` when omitted.
        title: optional figure title.
        grid_step: distance between drawn grid lines in voxels; default about 20 lines along the longest axis.
        panel_size: size of one panel in inches.
        dpi: figure resolution; the rendered image is ``6 * panel_size * dpi`` pixels wide and
            ``rows * panel_size * dpi`` high (plus ``0.4 * dpi`` with a title).
        spacing: optional voxel size along each tensor spatial axis (any unit, e.g. mm): each panel is drawn with
            pixel aspect ``spacing[row axis] / spacing[column axis]``, so anisotropic volumes keep their physical
            proportions. Default: square voxels.
        slices: 3D only: the slice index along each tensor axis, e.g. chosen through the anatomy
            (:func:`monai_gradicon.pipeline.qc.anatomy_slices`); default the central slices.

    Returns:
        a :class:`matplotlib.figure.Figure` with an Agg canvas and ``rows * 6`` axes.
    """
    fixed_np, moving_np, warped_np, ddf_np, jac = _prepare_inputs(fixed, moving, warped, ddf, jacobian)
    spatial = fixed_np.shape
    spacing_np = _check_spacing(spacing, len(spatial))
    planes = _planes(spatial, slices)
    step = grid_step if grid_step is not None else _auto_grid_step(spatial)
    if step < 1:
        raise ValueError(f"grid_step must be a positive number of voxels, got {grid_step}.")

    vrange = _intensity_range(fixed_np, moving_np)
    diff = warped_np - fixed_np
    dmax = float(np.nanmax(np.abs(diff))) if diff.size else 0.0
    dmax = dmax if dmax > 0 else 1.0
    fold_pct = 100.0 * float(np.mean(jac <= 0))

    nrows, ncols = len(planes), len(COLUMNS)
    height = nrows * panel_size + (0.4 if title else 0.0)
    fig = Figure(figsize=(ncols * panel_size, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for r, (axis, index, (a, b)) in enumerate(planes):
        row = axes[r]
        for ax, img in zip(row[:3], (fixed_np, moving_np, warped_np)):
            ax.imshow(_slice(img, axis, index), cmap="gray", vmin=vrange[0], vmax=vrange[1], interpolation="nearest")
        row[3].imshow(_slice(diff, axis, index), cmap="bwr", vmin=-dmax, vmax=dmax, interpolation="nearest")
        _draw_grid(row[4], _slice(fixed_np, axis, index), _slice(ddf_np[a], axis, index),
                   _slice(ddf_np[b], axis, index), step, vrange)
        _draw_jacobian(row[5], _slice(jac, axis, index))
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            if spacing_np is not None:
                ax.set_aspect(float(spacing_np[a] / spacing_np[b]))
        row[0].set_ylabel("2D" if axis is None else f"axis {axis} = {index}", fontsize=8)
    for c, name in enumerate(COLUMNS):
        label = name
        if name == "warped - fixed":
            label = f"{name} (±{dmax:.3g})"
        elif name == "det J":
            label = f"{name} (folds {fold_pct:.2f}%)"
        axes[0, c].set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------


def _agg_canvas(fig: Figure) -> FigureCanvasAgg:
    """The figure's Agg canvas, attaching one if the figure has another canvas."""
    return fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)


def figure_to_array(fig: Figure) -> np.ndarray:
    """
    Render a figure to an RGB array for ``SummaryWriter.add_image(tag, array, step, dataformats="HWC")``.

    Returns:
        ``uint8`` array ``[H, W, 3]`` with ``H, W`` = figure size in inches times dpi.
    """
    canvas = _agg_canvas(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba(), dtype=np.uint8)[..., :3].copy()


def save_figure_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG atomically (:func:`monai_gradicon.io_utils.atomic_write`): readers never see a partially
    written file. Parent folders are created. Returns the final path."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            _agg_canvas(fig).print_png(f)

    atomic_write(path, write)
    return path


def save_overview_png(
    path: str | os.PathLike,
    fixed: ArrayLike,
    moving: ArrayLike,
    warped: ArrayLike,
    ddf: ArrayLike,
    jacobian: ArrayLike | None = None,
    title: str | None = None,
    **kwargs: Any,
) -> Path:
    """
    Build :func:`overview_figure` (extra ``kwargs`` are forwarded to it) and save it atomically as PNG.

    Returns:
        the written path.
    """
    fig = overview_figure(fixed, moving, warped, ddf, jacobian=jacobian, title=title, **kwargs)
    return save_figure_png(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Ignite handler
# ----------------------------------------------------------------------------------------------------------------


class RegistrationImageHandler:
    """
    Ignite handler that renders :func:`overview_figure` for the first sample of the engine's last output.

    It runs on ``Events.EPOCH_COMPLETED`` every ``interval`` epochs, logs the figure to TensorBoard with
    ``add_image(tag, image, epoch, dataformats="HWC")`` and optionally saves ``<png_dir>/<tag>_epoch<NNNN>.png``.

    The transformed engine output must be one of:

    * a mapping with keys ``keys`` (default ``"fixed", "moving", "warped", "ddf"``) holding batched tensors
      (images ``[B, 1, *S]``, ddf ``[B, dim, *S]`` in voxels); sample 0 is used;
    * a list of such mappings with unbatched values (MONAI's decollated output); the first one is used;
    * a tuple ``(fixed, moving, warped, ddf)`` of batched tensors; sample 0 is used.

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``; if None and ``log_dir`` is set, one is created
            lazily (and closed by :meth:`close`). With neither, nothing goes to TensorBoard.
        log_dir: TensorBoard folder for the writer created when ``summary_writer`` is None.
        output_transform: maps ``engine.state.output`` to one of the structures above.
        interval: log every ``interval`` epochs.
        tag: TensorBoard image tag (also used, sanitized, for PNG file names).
        png_dir: optional folder for PNG copies.
        keys: output keys for fixed, moving, warped and ddf.
        figure_kwargs: extra arguments for :func:`overview_figure`.
    """

    def __init__(
        self,
        summary_writer: Any | None = None,
        log_dir: str | os.PathLike | None = "./runs",
        output_transform: Callable[[Any], Any] = lambda x: x,
        interval: int = 1,
        tag: str = "registration/overview",
        png_dir: str | os.PathLike | None = None,
        keys: Sequence[str] = ("fixed", "moving", "warped", "ddf"),
        figure_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be a positive number of epochs, got {interval}.")
        if len(keys) != 4:
            raise ValueError(f"keys must name fixed, moving, warped and ddf (4 keys), got {list(keys)}.")
        self._writer = summary_writer
        self._owns_writer = False
        self.log_dir = log_dir
        self.output_transform = output_transform
        self.interval = interval
        self.tag = tag
        self.png_dir = None if png_dir is None else Path(png_dir)
        self.keys = tuple(keys)
        self.figure_kwargs = dict(figure_kwargs or {})

    def attach(self, engine: Any) -> None:
        """Register the handler on ``Events.EPOCH_COMPLETED(every=interval)`` of ``engine``."""
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    @property
    def writer(self) -> Any | None:
        """The TensorBoard writer, created on first access when only ``log_dir`` was given."""
        if self._writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
            self._owns_writer = True
        return self._writer

    def _first_sample(self, output: Any) -> tuple[Any, Any, Any, Any]:
        """Pick ``(fixed, moving, warped, ddf)`` of the first sample from the transformed engine output."""
        if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
            sample, batched = output[0], False
        elif isinstance(output, Mapping):
            sample, batched = output, True
        elif isinstance(output, Sequence) and len(output) == 4:
            return tuple(v[0] for v in output)  # type: ignore[return-value]
        else:
            raise ValueError(
                f"{type(self).__name__}: engine output must be a mapping with keys {list(self.keys)}, a list of such "
                f"mappings or a (fixed, moving, warped, ddf) tuple; got {type(output).__name__}."
            )
        missing = [k for k in self.keys if k not in sample]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: engine output is missing key(s) {missing}; got {list(sample.keys())}."
            )
        values = tuple(sample[k] for k in self.keys)
        return tuple(v[0] for v in values) if batched else values  # type: ignore[return-value]

    def __call__(self, engine: Any) -> None:
        fixed, moving, warped, ddf = self._first_sample(self.output_transform(engine.state.output))
        epoch = int(engine.state.epoch)
        fig = overview_figure(fixed, moving, warped, ddf, title=f"{self.tag} epoch {epoch}", **self.figure_kwargs)
        writer = self.writer
        if writer is not None:
            writer.add_image(self.tag, figure_to_array(fig), epoch, dataformats="HWC")
            writer.flush()
        if self.png_dir is not None:
            safe_tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.tag).strip("_") or "overview"
            save_figure_png(fig, self.png_dir / f"{safe_tag}_epoch{epoch:04d}.png")

    def close(self) -> None:
        """Close the writer if this handler created it."""
        if self._owns_writer and self._writer is not None:
            self._writer.close()
            self._writer = None
            self._owns_writer = False
