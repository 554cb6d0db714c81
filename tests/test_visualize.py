import os
import struct

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from matplotlib.figure import Figure

from monai_gradicon.visualize import (
    COLUMNS,
    RegistrationImageHandler,
    figure_to_array,
    overview_figure,
    save_figure_png,
    save_overview_png,
)

SHAPE = (12, 14, 16)


def png_size(path):
    """(width, height) from the PNG IHDR chunk."""
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def volumes(shape=SHAPE):
    rng = np.random.default_rng(0)
    fixed = rng.random(shape).astype(np.float32)
    moving = np.roll(fixed, 1, axis=-1)
    return fixed, moving, moving.copy()


def folded_ddf(shape=SHAPE):
    """[3, *S] ddf whose map along axis 0 reverses for rows >= N0/2 (det J <= 0 there)."""
    n0 = shape[0]
    target = np.concatenate([np.arange(n0 // 2), n0 // 2 - 1 - np.arange(n0 - n0 // 2)]).astype(np.float32)
    ddf = np.zeros((3, *shape), dtype=np.float32)
    ddf[0] = (target - np.arange(n0))[:, None, None]
    return ddf


def test_overview_figure_3d_layout_and_size():
    fixed, moving, warped = volumes()
    fig = overview_figure(torch.from_numpy(fixed)[None], moving, warped, torch.zeros(1, 3, *SHAPE), title="t")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3 * len(COLUMNS) == 18
    titles = [ax.get_title() for ax in fig.axes[: len(COLUMNS)]]
    for title, name in zip(titles, COLUMNS):
        assert title.startswith(name)
    image = figure_to_array(fig)
    assert image.dtype == np.uint8 and image.shape == (700, 1320, 3)  # (3 * 2.2 + 0.4, 6 * 2.2) inches at 100 dpi
    assert image.min() < 50 and image.max() > 200  # something was drawn


def test_overview_figure_2d_single_row():
    fixed, moving, warped = (v[0] for v in volumes())
    fig = overview_figure(fixed, moving, warped, np.zeros((2, *SHAPE[1:]), np.float32), dpi=50)
    assert len(fig.axes) == len(COLUMNS)
    assert figure_to_array(fig).shape == (110, 660, 3)


def test_spacing_draws_panels_to_physical_scale():
    """With a voxel spacing each panel's drawn box has the physical proportions of its slice."""
    fixed, moving, warped = volumes()
    spacing = (2.0, 1.0, 0.5)
    fig = overview_figure(fixed, moving, warped, np.zeros((3, *SHAPE), np.float32), spacing=spacing)
    fig.canvas.draw()
    axes = np.array(fig.axes).reshape(3, len(COLUMNS))
    for r, (a, b) in enumerate(((1, 2), (0, 2), (0, 1))):  # in-plane (row, column) tensor axes of each plane
        physical_height, physical_width = SHAPE[a] * spacing[a], SHAPE[b] * spacing[b]
        for c in (0, 4, 5):  # image, deformation grid, Jacobian panels
            box = axes[r, c].get_window_extent()
            assert box.height / box.width == pytest.approx(physical_height / physical_width, rel=0.03), (r, c)
    square = overview_figure(fixed, moving, warped, np.zeros((3, *SHAPE), np.float32))
    square.canvas.draw()
    box = np.array(square.axes).reshape(3, -1)[1, 0].get_window_extent()  # plane (0, 2): 12 x 16 voxels
    assert box.height / box.width == pytest.approx(SHAPE[0] / SHAPE[2], rel=0.03)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0)])
def test_bad_spacing_is_named(spacing):
    fixed, moving, warped = volumes()
    with pytest.raises(ValueError, match="spacing"):
        overview_figure(fixed, moving, warped, np.zeros((3, *SHAPE), np.float32), spacing=spacing)


def test_jacobian_panel_highlights_folds():
    fixed, moving, warped = volumes()
    ddf = folded_ddf()
    fig = overview_figure(fixed, moving, warped, ddf)
    axes = np.array(fig.axes).reshape(3, len(COLUMNS))
    assert "folds 50.00%" in axes[0, 5].get_title()
    # row 0 is the plane normal to axis 0 through the centre row 6, which is folded everywhere;
    # rows 1 and 2 show axis 0 vertically: the lower half (rows >= 6) is folded
    for r, expected in ((0, SHAPE[1] * SHAPE[2]), (1, 6 * SHAPE[2]), (2, 6 * SHAPE[1])):
        overlay = axes[r, 5].get_images()[1].get_array()
        assert int(np.ma.count(overlay)) == expected
    unfolded = overview_figure(fixed, moving, warped, np.zeros_like(ddf))
    overlay = np.array(unfolded.axes).reshape(3, -1)[0, 5].get_images()[1].get_array()
    assert int(np.ma.count(overlay)) == 0
    assert "folds 0.00%" in unfolded.axes[5].get_title()


def test_deformation_grid_follows_in_plane_displacement():
    fixed, moving, warped = volumes()
    ddf = np.zeros((3, *SHAPE), dtype=np.float32)
    ddf[0], ddf[1], ddf[2] = 0.5, 1.5, -2.0
    fig = overview_figure(fixed, moving, warped, ddf, grid_step=4)
    axes = np.array(fig.axes).reshape(3, len(COLUMNS))
    # row 0: plane normal to axis 0, in-plane axes (1, 2) drawn as (vertical, horizontal)
    lines = axes[0, 4].get_lines()
    assert len(lines) == len(range(0, SHAPE[1], 4)) + 1 + len(range(0, SHAPE[2], 4)) + 1
    first_row_line = lines[0]
    np.testing.assert_allclose(first_row_line.get_ydata(), np.full(SHAPE[2], 0 + 1.5))
    np.testing.assert_allclose(first_row_line.get_xdata(), np.arange(SHAPE[2]) - 2.0)
    # row 2: plane normal to axis 2, in-plane axes (0, 1)
    first_row_line = axes[2, 4].get_lines()[0]
    np.testing.assert_allclose(first_row_line.get_ydata(), np.full(SHAPE[1], 0.5))
    np.testing.assert_allclose(first_row_line.get_xdata(), np.arange(SHAPE[1]) + 1.5)


def test_overview_input_errors():
    fixed, moving, warped = volumes()
    with pytest.raises(ValueError, match="ddf must have shape"):
        overview_figure(fixed, moving, warped, np.zeros((2, *SHAPE)))
    with pytest.raises(ValueError, match="moving has spatial shape"):
        overview_figure(fixed, moving[:-1], warped, np.zeros((3, *SHAPE)))
    with pytest.raises(ValueError, match="jacobian has spatial shape"):
        overview_figure(fixed, moving, warped, np.zeros((3, *SHAPE)), jacobian=np.ones((2, 2, 2)))


def test_save_overview_png_atomic(tmp_path, monkeypatch):
    fixed, moving, warped = volumes()
    target = tmp_path / "sub" / "overview.png"
    out = save_overview_png(target, fixed, moving, warped, folded_ddf(), title="x", dpi=40)
    assert out == target and target.is_file()
    assert png_size(target) == (528, 280)  # 13.2 x 7.0 inches at 40 dpi
    assert sorted(os.listdir(target.parent)) == ["overview.png"]  # no temporary left behind

    # a failing rename leaves the previous file untouched and removes the temporary
    before = target.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_figure_png(overview_figure(fixed[0], moving[0], warped[0], np.zeros((2, *SHAPE[1:]))), target)
    assert target.read_bytes() == before
    assert sorted(os.listdir(target.parent)) == ["overview.png"]


class RecordingWriter:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image, step, dataformats))

    def flush(self):
        pass


def _engine_output(batch_size=2, shape=SHAPE):
    fixed, moving, warped = volumes(shape)
    stack = lambda v: torch.from_numpy(np.stack([v] * batch_size))[:, None]  # noqa: E731
    return {
        "fixed": stack(fixed),
        "moving": stack(moving),
        "warped": stack(warped),
        "ddf": torch.from_numpy(np.stack([folded_ddf(shape)] * batch_size)),
    }


def test_image_handler_logs_each_epoch(tmp_path):
    writer = RecordingWriter()
    handler = RegistrationImageHandler(summary_writer=writer, png_dir=tmp_path, interval=1, figure_kwargs={"dpi": 30})
    engine = Engine(lambda e, batch: _engine_output())
    handler.attach(engine)
    engine.run([0, 1], max_epochs=2)
    assert [(tag, step, fmt) for tag, _, step, fmt in writer.images] == [
        ("registration/overview", 1, "HWC"),
        ("registration/overview", 2, "HWC"),
    ]
    image = writer.images[0][1]
    assert image.dtype == np.uint8 and image.shape == (round(7.0 * 30), round(13.2 * 30), 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "registration_overview_epoch0001.png",
        "registration_overview_epoch0002.png",
    ]


def test_image_handler_interval_and_decollated_output():
    batched = _engine_output(batch_size=1, shape=(6, 6, 6))
    decollated = [{k: v[0] for k, v in batched.items()}]  # MONAI-style list of per-sample dicts
    writer = RecordingWriter()
    handler = RegistrationImageHandler(summary_writer=writer, interval=2, figure_kwargs={"dpi": 20})
    engine = Engine(lambda e, batch: decollated)
    handler.attach(engine)
    engine.run([0], max_epochs=5)
    assert [step for _, _, step, _ in writer.images] == [2, 4]

    fake_engine = type("E", (), {"state": type("S", (), {"output": {"fixed": 1}, "epoch": 1})})()
    with pytest.raises(ValueError, match="missing key"):
        RegistrationImageHandler(summary_writer=RecordingWriter())(fake_engine)


def test_image_handler_writes_tensorboard_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    handler = RegistrationImageHandler(log_dir=tmp_path / "tb", tag="val/overview", figure_kwargs={"dpi": 20})
    engine = Engine(lambda e, batch: _engine_output(batch_size=1, shape=(6, 6, 6)))
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    handler.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["val/overview"]
    (image,) = events.Images("val/overview")
    assert (image.step, image.width, image.height) == (1, round(13.2 * 20), round(7.0 * 20))


def test_no_pyplot_figures_are_registered():
    fixed, moving, warped = volumes((6, 6, 6))
    pyplot = pytest.importorskip("matplotlib.pyplot")
    before = pyplot.get_fignums()
    figure_to_array(overview_figure(fixed, moving, warped, np.zeros((3, 6, 6, 6)), dpi=20))
    assert pyplot.get_fignums() == before
