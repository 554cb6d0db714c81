"""ITK composite transform files (``monai_gradicon.itk_transforms``) and the result folder's ``.h5`` outputs.

Without ITK (always run): the HDF5 layout ITK's ``HDF5TransformIO`` reads (group names, string types, parameter
order, LPS signs; each value located independently of the writer), the round trip through our reader, ITK's
evaluation rules (order, zero displacement outside the field), bad files, and a registration with a known affine
pre-alignment whose two ``.h5`` files reproduce ``displacement_mm`` / ``inverse_displacement_mm``.

With ITK (``@pytest.mark.itk``, ``python -m pytest -m itk`` in an environment with ``pip install itk``): ITK reads the files back and its
``ResampleImageFilter`` gives our warped image; it also reads the ``displacement_mm`` NIfTI fields as displacement
field transforms. float32 comparisons use tests/tolerance.py.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

from monai_gradicon.affine import AffineResult, affine_displacement
from monai_gradicon.io import Image, read_displacement_field
from monai_gradicon.itk_transforms import (
    ITKAffine,
    ITKDisplacementField,
    composite_displacement,
    read_itk_composite,
    transform_points_itk,
    write_itk_composite,
)
from monai_gradicon.pipeline import OUTPUT_FILES, RegistrationResult
from monai_gradicon.pipeline.core import (
    prepare_pair,
    read_pair,
    resolve_settings,
    run_network,
    to_original_grids,
)
from monai_gradicon.pipeline.result import OUTPUT_CHOICES, check_outputs
from monai_gradicon.resample import Grid, warp_physical
from test_instance_optimization import slim_network
from tolerance import EPS32, assert_f32_close

h5py = pytest.importorskip("h5py", reason="h5py is a runtime dependency of monai_gradicon (setup.cfg)")

NET = (17, 17, 17)
LPS = np.array([-1.0, -1.0, 1.0])


def rotation(degrees) -> np.ndarray:
    """``3 x 3`` rotation about x, then y, then z (degrees)."""
    out = np.eye(3)
    for axis, deg in enumerate(degrees):
        a = np.deg2rad(deg)
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def oblique_affine(degrees, spacing, origin) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation(degrees) * np.asarray(spacing)[None, :]
    a[:3, 3] = origin
    return a


def world_of(grid: Grid) -> np.ndarray:
    """``[dim, *shape]`` world coordinates (RAS mm) of every voxel of ``grid``."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid.shape], indexing="ij"), 0)
    return np.einsum("ij,j...->i...", grid.matrix, idx) + grid.offset.reshape(-1, *([1] * grid.ndim))


def smooth_image(shape, affine, centre, seed) -> Image:
    """A smooth, non-symmetric blob phantom (values ~0..1) around the world point ``centre``."""
    rng = np.random.default_rng(seed)
    x = np.einsum("ij,j...->i...", affine[:3, :3],
                  np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))) \
        + affine[:3, 3].reshape(3, 1, 1, 1) - np.asarray(centre).reshape(3, 1, 1, 1)
    img = np.exp(-(x[0] ** 2 / 300 + x[1] ** 2 / 200 + x[2] ** 2 / 250))
    img += 0.5 * np.exp(-((x[0] - 8) ** 2 + (x[1] + 5) ** 2 + (x[2] - 4) ** 2) / 40)
    img += 0.05 * rng.standard_normal(shape)
    return Image(array=img.astype(np.float32), affine=affine)


PREALIGN = np.array([  # fixed RAS mm -> moving RAS mm: rotation ~10 deg, shear, translation (mm)
    [0.98, -0.17, 0.03, 4.0],
    [0.18, 0.97, -0.05, -3.0],
    [-0.02, 0.06, 1.04, 2.5],
    [0.0, 0.0, 0.0, 1.0],
])


def make_result(prealign: bool, inverse: bool = True) -> RegistrationResult:
    """A registration of two small oblique images with different grids through the pipeline's stages, with a known
    affine pre-alignment (``prealign``) and a random-weight network that deforms by about a voxel."""
    fixed = smooth_image((22, 20, 18), oblique_affine((8, -5, 12), (2.0, 2.2, 2.5), (-20.0, -18.0, -22.0)),
                         (0.0, 0.0, 0.0), 0)
    moving = smooth_image((19, 21, 20), oblique_affine((-6, 10, -4), (2.3, 2.0, 2.1), (-18.0, -22.0, -19.0)),
                          PREALIGN[:3, 3], 1)
    net = slim_network(1, NET, seed=3)
    with torch.no_grad():
        net.steps[0].unet.lastConv.weight.normal_(0.0, 5e-2)
    settings = resolve_settings(net.card, preprocessing="none", input_shape=NET, inverse=inverse,
                                prealign="affine" if prealign else "none")
    inputs = read_pair(fixed, moving)
    prealigned = None
    if prealign:
        fixed_grid = Grid.of(fixed)
        aligned = warp_physical(moving.array, Grid.of(moving), affine_displacement(PREALIGN, fixed_grid), fixed_grid)
        result = AffineResult(PREALIGN.copy(), {}, [], 0.0)
        prealigned = (PREALIGN.copy(), result, Image(array=aligned, affine=fixed.affine), None)
    prepared = prepare_pair(inputs, settings, net, "cpu", prealigned=prealigned)
    transforms = run_network(net, prepared, "cpu")
    fields = to_original_grids(prepared, transforms, "cpu", padding_mode="zeros")
    return RegistrationResult(prepared, transforms, fields, net.card)


@pytest.fixture(scope="module")
def with_prealign():
    return make_result(True)


@pytest.fixture(scope="module")
def without_prealign():
    return make_result(False)


# ----------------------------------------------------------------------------------------------------------------
# the file format
# ----------------------------------------------------------------------------------------------------------------


def field_case(ndim=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (5, 4, 3)[:ndim]
    if ndim == 3:
        affine = oblique_affine((20, -10, 35), (1.5, 2.0, 2.5), (3.0, -7.0, 11.0))
    else:
        a = np.deg2rad(25)
        affine = np.array([[1.5 * np.cos(a), -2.0 * np.sin(a), 3.0], [1.5 * np.sin(a), 2.0 * np.cos(a), -7.0],
                           [0.0, 0.0, 1.0]])
    u = (rng.standard_normal((ndim, *shape)) * 3).astype(np.float32)
    return ITKDisplacementField(u, Grid(shape, affine))


def test_composite_file_has_itks_hdf5_layout(tmp_path):
    """Every dataset ITK's HDF5TransformIO reads, at its path, with its type; values located by hand: affine
    parameters (LPS matrix row-major + translation, centre 0), field fixed parameters (size, LPS origin, spacing,
    LPS direction row-major) and the field's vectors in ITK's buffer order (x fastest, LPS)."""
    field = field_case()
    m = PREALIGN
    path = write_itk_composite(tmp_path / "t.h5", [ITKAffine(m), field])
    with h5py.File(path, "r") as f:
        assert sorted(f["TransformGroup"].keys()) == ["0", "1", "2"]
        types = []
        for n in ("0", "1", "2"):
            ds = f[f"TransformGroup/{n}/TransformType"]
            assert ds.shape == (1,) and h5py.check_string_dtype(ds.dtype).encoding == "ascii"
            assert h5py.check_string_dtype(ds.dtype).length is None  # variable length, as ITK writes
            types.append(ds[0].decode())
        assert types == ["CompositeTransform_double_3_3", "AffineTransform_double_3_3",
                         "DisplacementFieldTransform_double_3_3"]
        assert set(f["TransformGroup/0"].keys()) == {"TransformType"}
        affine_params = f["TransformGroup/1/TransformParameters"][()]
        assert f["TransformGroup/1/TransformParameters"].dtype == np.float64
        np.testing.assert_array_equal(f["TransformGroup/1/TransformFixedParameters"][()], np.zeros(3))
        fixed = f["TransformGroup/2/TransformFixedParameters"][()]
        params = f["TransformGroup/2/TransformParameters"][()]
    lps_m = np.diag([-1, -1, 1, 1.0]) @ m @ np.diag([-1, -1, 1, 1.0])
    np.testing.assert_array_equal(affine_params, np.concatenate([lps_m[:3, :3].ravel(), lps_m[:3, 3]]))
    rot = rotation((20, -10, 35))
    np.testing.assert_array_equal(fixed[:3], [5, 4, 3])
    np.testing.assert_allclose(fixed[3:6], [-3.0, 7.0, 11.0], atol=1e-12)
    np.testing.assert_allclose(fixed[6:9], [1.5, 2.0, 2.5], atol=1e-12)
    np.testing.assert_allclose(fixed[9:].reshape(3, 3), LPS[:, None] * rot, atol=1e-12)
    assert params.size == 5 * 4 * 3 * 3
    for i, j, k in [(0, 0, 0), (4, 0, 0), (1, 2, 0), (3, 1, 2), (4, 3, 2)]:
        start = ((k * 4 + j) * 5 + i) * 3
        np.testing.assert_array_equal(params[start:start + 3], LPS * field.displacement[:, i, j, k])


def test_round_trip_is_exact_3d_and_2d(tmp_path):
    for ndim in (3, 2):
        field = field_case(ndim, seed=ndim)
        m = PREALIGN.copy()
        if ndim == 2:
            m = np.eye(4)
            m[:2, :2], m[:2, 3] = [[0.9, -0.2], [0.25, 1.1]], [5.0, -2.0]
        path = write_itk_composite(tmp_path / f"t{ndim}.h5", [field, ITKAffine(m)])
        with h5py.File(path, "r") as f:
            assert f["TransformGroup/2/TransformType"][0].decode() == f"AffineTransform_double_{ndim}_{ndim}"
            assert f["TransformGroup/1/TransformFixedParameters"].shape == (ndim * (ndim + 3),)
        back = read_itk_composite(path)
        assert [type(t) for t in back] == [ITKDisplacementField, ITKAffine]
        np.testing.assert_array_equal(back[0].displacement, field.displacement)
        assert back[0].grid.shape == field.grid.shape
        np.testing.assert_allclose(back[0].grid.affine, field.grid.affine, rtol=0, atol=1e-13)
        np.testing.assert_allclose(back[1].matrix, m, rtol=0, atol=1e-15)


def test_points_follow_itks_order_and_zero_outside_the_field():
    """``[A, F]`` is ``A(F(x))`` (the last component first); at field nodes the displacement is the node's vector;
    more than half a voxel outside the field it is zero, within that half voxel the border vector."""
    field = field_case()
    a = ITKAffine(PREALIGN)
    nodes = np.array([[0, 0, 0], [4, 3, 2], [2, 1, 1]], dtype=np.float64)
    world = field.grid.index_to_world(nodes)
    vectors = field.displacement[:, nodes[:, 0].astype(int), nodes[:, 1].astype(int), nodes[:, 2].astype(int)].T
    moved = world + vectors
    np.testing.assert_allclose(transform_points_itk([a, field], world),
                               moved @ PREALIGN[:3, :3].T + PREALIGN[:3, 3], rtol=0, atol=1e-12)
    first_affine = world @ PREALIGN[:3, :3].T + PREALIGN[:3, 3]
    np.testing.assert_allclose(transform_points_itk([field, a], world),
                               transform_points_itk([field], first_affine), rtol=0, atol=1e-12)
    near = field.grid.index_to_world(np.array([[-0.4, 0.0, 0.0], [4.45, 3.0, 2.0]]))
    np.testing.assert_allclose(transform_points_itk([field], near) - near,
                               field.displacement[:, [0, 4], [0, 3], [0, 2]].T, rtol=0, atol=1e-12)
    far = field.grid.index_to_world(np.array([[-0.6, 0.0, 0.0], [2.0, 3.6, 1.0], [2.0, 1.0, -3.0]]))
    np.testing.assert_array_equal(transform_points_itk([field], far), far)


def _write_raw(path, entries):
    """An HDF5 transform file written here by hand: entries = [(type, fixed, params)]."""
    with h5py.File(path, "w") as f:
        for n, (kind, fixed, params) in enumerate(entries):
            g = f.create_group(f"TransformGroup/{n}")
            g.create_dataset("TransformType", data=np.array([kind.encode()], dtype=h5py.string_dtype("ascii")))
            if fixed is not None:
                g.create_dataset("TransformFixedParameters", data=np.asarray(fixed, dtype=np.float64))
                g.create_dataset("TransformParameters", data=np.asarray(params, dtype=np.float64))
    return path


def test_bad_files_and_arguments_are_named(tmp_path):
    field = field_case()
    with pytest.raises(ValueError, match="must end in .h5"):
        write_itk_composite(tmp_path / "t.tfm", [field])
    with pytest.raises(ValueError, match="at least one component"):
        write_itk_composite(tmp_path / "t.h5", [])
    with pytest.raises(ValueError, match="mixes fields of dimensions"):
        write_itk_composite(tmp_path / "t.h5", [field, field_case(2)])
    with pytest.raises(ValueError, match="must have shape"):
        ITKDisplacementField(field.displacement[:, :-1], field.grid)
    with pytest.raises(ValueError, match="singular"):
        ITKAffine(np.diag([1.0, 0.0, 1.0, 1.0]))
    assert not os.listdir(tmp_path)  # nothing half-written
    with pytest.raises(FileNotFoundError):
        read_itk_composite(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        read_itk_composite(tmp_path / "text.h5")
    bspline = _write_raw(tmp_path / "b.h5", [("BSplineTransform_double_3_3", [0.0] * 18, [0.0] * 3)])
    with pytest.raises(ValueError, match="'BSplineTransform_double_3_3' is not supported"):
        read_itk_composite(bspline)
    short = _write_raw(tmp_path / "s.h5", [("CompositeTransform_double_3_3", None, None),
                                          ("AffineTransform_double_3_3", [0.0] * 3, [1.0] * 11)])
    with pytest.raises(ValueError, match="needs 12 parameters"):
        read_itk_composite(short)
    wrong_size = _write_raw(tmp_path / "w.h5", [("DisplacementFieldTransform_double_3_3",
                                                 [2, 2, 2, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1], [0.0] * 23)])
    with pytest.raises(ValueError, match="has 24 parameters, got 23"):
        read_itk_composite(wrong_size)
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("Other")
    with pytest.raises(ValueError, match="no /TransformGroup"):
        read_itk_composite(tmp_path / "empty.h5")


def test_missing_h5py_is_named_before_any_output_is_written(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        check_outputs(["displacement", "transform"])
    assert check_outputs(["displacement", "warped"]) == ["displacement", "warped"]


# ----------------------------------------------------------------------------------------------------------------
# the result folder's .h5 outputs
# ----------------------------------------------------------------------------------------------------------------


def test_outputs_selection():
    # the .h5 files are asked for by name (or "all"): the default leaves them out (they cost as much as a field)
    assert check_outputs(None) == [o for o in OUTPUT_CHOICES if not o.endswith("transform")]
    assert check_outputs(["all"]) == list(OUTPUT_CHOICES)
    assert "transform" in OUTPUT_CHOICES and "inverse_transform" in OUTPUT_CHOICES
    assert check_outputs(None, inverse=False) == [o for o in OUTPUT_CHOICES
                                                  if not o.startswith("inverse_") and o != "transform"]
    assert check_outputs(["all"], inverse=False) == [o for o in OUTPUT_CHOICES if not o.startswith("inverse_")]
    with pytest.raises(ValueError, match="inverse_transform was asked for but the inverse is not computed"):
        check_outputs(["transform", "inverse_transform"], inverse=False)
    with pytest.raises(ValueError, match="Unknown outputs \\['tfm'\\]"):
        check_outputs(["tfm"])


def test_forward_file_is_the_affine_after_the_deformable_part(with_prealign, tmp_path):
    """The forward file read back: its affine is the pre-alignment, its field the network's part alone (not the
    composed field), and the two together give ``displacement_mm`` at every fixed voxel, to float32 rounding of the
    world coordinates (the composed field was computed in float64 and stored in float32)."""
    r = with_prealign
    paths = r.save(tmp_path / "out", outputs=["displacement", "transform", "inverse_transform"])
    names = {os.path.basename(p) for p in paths.values()}
    assert names == {OUTPUT_FILES[k] for k in ("displacement", "transform", "inverse_transform", "affine", "summary")}
    summary = json.loads((tmp_path / "out" / OUTPUT_FILES["summary"]).read_text())
    assert OUTPUT_FILES["transform"] in summary["outputs"] and OUTPUT_FILES["transform"] in summary["conventions"]
    forward = read_itk_composite(paths[OUTPUT_FILES["transform"]])
    assert [type(t) for t in forward] == [ITKAffine, ITKDisplacementField]
    np.testing.assert_allclose(forward[0].matrix, PREALIGN, rtol=0, atol=1e-14)
    fixed_grid = Grid.of(r.fixed)
    assert forward[1].grid.shape == fixed_grid.shape
    np.testing.assert_allclose(forward[1].grid.affine, fixed_grid.affine, rtol=0, atol=1e-12)
    d = forward[1].displacement
    np.testing.assert_array_equal(d, r.deformable_displacement())
    assert 0.3 < np.abs(d).max() < 10.0  # the network deforms (about a voxel), and d is not the composed field
    assert np.abs(d - r.displacement).max() > 1.0
    # deformable part alone, then the affine, by hand (numpy) ...
    x = world_of(fixed_grid)
    composed = np.einsum("ij,j...->i...", PREALIGN[:3, :3], x + d) + PREALIGN[:3, 3].reshape(3, 1, 1, 1) - x
    scale = np.abs(x).max() + np.abs(d).max()
    assert_f32_close(composed, r.displacement, ulps=8, scale=scale, what="M(x + d(x)) - x vs displacement_mm")
    # ... and as the file's composite evaluated with ITK's rules, and as the NIfTI field on disk
    assert_f32_close(composite_displacement(forward, fixed_grid), r.displacement, ulps=8, scale=scale,
                     what="forward .h5 vs displacement_mm")
    on_disk, _ = read_displacement_field(paths[OUTPUT_FILES["displacement"]])
    assert_f32_close(composite_displacement(forward, fixed_grid), on_disk, ulps=8, scale=scale,
                     what="forward .h5 vs displacement_mm.nii.gz")


def test_inverse_file_is_the_inverse_affine_then_the_inverse_deformation(with_prealign, tmp_path):
    """The inverse file: ``[e on the pre-aligned (fixed) grid, M^-1]``; at the moving voxels it is
    ``inverse_displacement_mm`` up to the linear interpolation of ``e`` between fixed voxels, where ``M^-1 y`` falls
    at least a voxel inside the fixed grid (ITK's field is zero farther out); exactly ``e`` at fixed voxels."""
    r = with_prealign
    comps = r.itk_transform(inverse=True)
    path = write_itk_composite(tmp_path / "inv.h5", comps)
    inverse = read_itk_composite(path)
    assert [type(t) for t in inverse] == [ITKDisplacementField, ITKAffine]
    np.testing.assert_allclose(inverse[1].matrix, np.linalg.inv(PREALIGN), rtol=0, atol=1e-14)
    e, grid = r.inverse_deformable_displacement()
    np.testing.assert_array_equal(inverse[0].displacement, e)
    fixed_grid, moving_grid = Grid.of(r.fixed), Grid.of(r.moving)
    assert grid.shape == fixed_grid.shape and np.allclose(grid.affine, fixed_grid.affine)
    got = composite_displacement(inverse, moving_grid)
    y = world_of(moving_grid).reshape(3, -1).T
    index = fixed_grid.world_to_index(y @ np.linalg.inv(PREALIGN)[:3, :3].T + np.linalg.inv(PREALIGN)[:3, 3])
    inside = np.all((index > 1) & (index < np.array(fixed_grid.shape) - 2), axis=1).reshape(moving_grid.shape)
    assert inside.mean() > 0.2
    diff = np.abs(got - r.inverse_displacement).max(axis=0)[inside]
    # the file interpolates e linearly between fixed voxels, inverse_displacement evaluates Phi_BA at M^-1 y itself:
    # both are values of e within one fixed voxel cell, so they differ by at most e's variation over a cell (the sum
    # over axes of its largest change between neighbouring voxels); typically by far less
    variation = sum(float(np.abs(np.diff(e, axis=k + 1)).max()) for k in range(3))
    assert diff.max() <= variation, (diff.max(), variation)
    assert np.median(diff) < 0.05 * np.abs(e).max(), (np.median(diff), np.abs(e).max())
    # at the moving voxels whose M^-1 y falls on a fixed voxel there is nothing to interpolate: compare e directly
    y_nodes = fixed_grid.index_to_world(np.array([[3.0, 4.0, 5.0], [10.0, 9.0, 8.0]]))
    pts = y_nodes @ PREALIGN[:3, :3].T + PREALIGN[:3, 3]
    expected = y_nodes + e[:, [3, 10], [4, 9], [5, 8]].T
    np.testing.assert_allclose(transform_points_itk(inverse, pts), expected, rtol=0, atol=1e-9)


def test_without_prealign_the_files_equal_the_nifti_fields(without_prealign, tmp_path):
    """No pre-alignment: the affine is the identity and the fields are ``displacement_mm`` and
    ``inverse_displacement_mm`` themselves, on the fixed and moving grids."""
    r = without_prealign
    paths = r.save(tmp_path / "out", outputs=["all"])  # everything, both .h5 files included
    assert {OUTPUT_FILES["transform"], OUTPUT_FILES["inverse_transform"]} <= {os.path.basename(p) for p in paths}
    forward = read_itk_composite(paths[OUTPUT_FILES["transform"]])
    inverse = read_itk_composite(paths[OUTPUT_FILES["inverse_transform"]])
    np.testing.assert_array_equal(forward[0].matrix, np.eye(4))
    np.testing.assert_array_equal(inverse[1].matrix, np.eye(4))
    np.testing.assert_array_equal(forward[1].displacement, r.displacement)
    np.testing.assert_array_equal(inverse[0].displacement, r.inverse_displacement)
    moving_grid = Grid.of(r.moving)
    np.testing.assert_allclose(inverse[0].grid.affine, moving_grid.affine, rtol=0, atol=1e-12)
    scale = np.abs(world_of(moving_grid)).max()
    assert_f32_close(composite_displacement(inverse, moving_grid), r.inverse_displacement, ulps=4, scale=scale,
                     what="inverse .h5 vs inverse_displacement_mm")


def test_inverse_outputs_need_the_inverse(tmp_path):
    r = make_result(False, inverse=False)
    with pytest.raises(ValueError, match="inverse_transform was asked for"):
        r.file_writers(outputs=["transform", "inverse_transform"])
    with pytest.raises(ValueError, match="not computed"):
        r.itk_transform(inverse=True)
    paths = r.save(tmp_path / "out", outputs=["all"])  # "all" without the inverse: the forward file only
    names = {os.path.basename(p) for p in paths}
    assert OUTPUT_FILES["transform"] in names and OUTPUT_FILES["inverse_transform"] not in names


# ----------------------------------------------------------------------------------------------------------------
# ITK reads them (opt-in: -m itk)
# ----------------------------------------------------------------------------------------------------------------


def _itk_image(itk, image: Image):
    """Our Image (RAS affine) as an ITK float image (LPS geometry), array in ITK's [z, y, x] order."""
    out = itk.image_from_array(np.ascontiguousarray(np.asarray(image.array, np.float32).T))
    spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    direction = LPS[:, None] * image.affine[:3, :3] / spacing[None, :]
    out.SetSpacing(spacing.tolist())
    out.SetOrigin((LPS * image.affine[:3, 3]).tolist())
    out.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return out


def _itk_resample(itk, image: Image, reference: Image, transform) -> np.ndarray:
    """ITK ResampleImageFilter (linear, 0 outside) of ``image`` onto ``reference``'s grid -> array in our order."""
    src, ref = _itk_image(itk, image), _itk_image(itk, reference)
    resampler = itk.ResampleImageFilter[type(src), type(src)].New(
        Input=src, Transform=transform, Interpolator=itk.LinearInterpolateImageFunction[type(src), itk.D].New(),
        DefaultPixelValue=0.0)
    resampler.SetReferenceImage(ref)
    resampler.UseReferenceImageOn()
    resampler.Update()
    return itk.array_from_image(resampler.GetOutput()).T


def _inside(grid: Grid, source: Grid, displacement: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """Target voxels whose sampled point lies at least ``margin`` voxels inside the source image (ITK's and our
    linear interpolation differ only at the border: ITK repeats the edge within half a voxel, then gives 0)."""
    pts = (world_of(grid) + displacement).reshape(grid.ndim, -1).T
    index = source.world_to_index(pts)
    return np.all((index > margin) & (index < np.array(source.shape) - 1 - margin), axis=1).reshape(grid.shape)


def _warp_tolerance(image: Image, displacement: np.ndarray) -> float:
    """float32 rounding, in intensity, between ITK's resampling (double throughout) and ours: our sampler rounds the
    normalized coordinates in [0, 1] to float32 (half a step of ``N - 1`` voxels per axis) and our fields are float32
    (half a step of ``|u|`` mm, in voxels of the image); that position error times the largest intensity step between
    neighbouring voxels on each axis, plus two roundings of the interpolated value; doubled as a margin."""
    a = np.asarray(image.array, np.float64)
    step = max(np.abs(np.diff(a, axis=k)).max() for k in range(a.ndim))
    spacing = float(np.linalg.norm(image.affine[:3, :3], axis=0).min())
    position = EPS32 * (max(image.shape) / 2 + np.abs(displacement).max() / spacing)  # voxels per axis
    return 2.0 * (position * a.ndim * step + 2 * EPS32 * np.abs(a).max())


@pytest.mark.itk
@pytest.mark.parametrize("ndim", [3, 2])
def test_itk_maps_points_as_our_reader(ndim, tmp_path):
    """ITK's TransformPoint through our file = our evaluation of it (both double), at points inside, at the border
    and outside the field (where ITK's displacement is zero), 3D and 2D, an oblique field grid and a sheared affine."""
    itk = pytest.importorskip("itk", reason="ITK comparisons need the itk package (-m itk: pip install itk)")
    field = field_case(ndim, seed=5)
    m = PREALIGN.copy()
    if ndim == 2:
        m = np.eye(4)
        m[:2, :2], m[:2, 3] = [[0.9, -0.2], [0.25, 1.1]], [5.0, -2.0]
    for order in ([ITKAffine(m), field], [field, ITKAffine(m)]):
        path = write_itk_composite(tmp_path / f"t{ndim}.h5", order)
        read = itk.transformread(path)
        assert len(read) == 1 and read[0].GetNumberOfTransforms() == 2
        rng = np.random.default_rng(ndim)
        pts = field.grid.index_to_world(rng.uniform(-2.0, np.array(field.grid.shape) + 1.0, size=(500, ndim)))
        flip = LPS[:ndim]
        theirs = np.array([list(read[0].TransformPoint((flip * p).tolist())) for p in pts]) * flip
        np.testing.assert_allclose(theirs, transform_points_itk(order, pts), rtol=0, atol=1e-9)


@pytest.mark.itk
@pytest.mark.parametrize("prealign", [True, False])
def test_itk_reads_both_files_and_resamples_like_us(prealign, with_prealign, without_prealign, tmp_path):
    """ITK reads the forward file and resamples the moving image onto the fixed grid: our warped image, to float32
    rounding; it reads the inverse file and resamples the fixed image onto the moving grid: our resampling through
    the inverse file's displacement; ITK's points equal ours (both in double)."""
    itk = pytest.importorskip("itk", reason="ITK comparisons need the itk package (-m itk: pip install itk)")
    r = with_prealign if prealign else without_prealign
    paths = r.save(tmp_path / "out", outputs=["transform", "inverse_transform", "warped"])
    fixed_grid, moving_grid = Grid.of(r.fixed), Grid.of(r.moving)
    forward_itk = itk.transformread(paths[OUTPUT_FILES["transform"]])
    assert len(forward_itk) == 1 and forward_itk[0].GetNameOfClass() == "CompositeTransform"
    composite = forward_itk[0]
    assert composite.GetNumberOfTransforms() == 2
    assert composite.GetNthTransform(0).GetNameOfClass() == "AffineTransform"
    assert composite.GetNthTransform(1).GetNameOfClass() == "DisplacementFieldTransform"
    # points: ITK's TransformPoint vs our reader's evaluation, at fixed voxels and between them
    ours = read_itk_composite(paths[OUTPUT_FILES["transform"]])
    rng = np.random.default_rng(0)
    pts = fixed_grid.index_to_world(rng.uniform(-1, np.array(fixed_grid.shape), size=(300, 3)))
    theirs = np.array([list(composite.TransformPoint((LPS * p).tolist())) for p in pts]) * LPS
    np.testing.assert_allclose(theirs, transform_points_itk(ours, pts), rtol=0, atol=1e-9)
    # the moving image resampled by ITK through the file vs our warped image (zeros padding, compared inside)
    warped_itk = _itk_resample(itk, r.moving, r.fixed, composite)
    inside = _inside(fixed_grid, moving_grid, r.displacement)
    assert inside.mean() > 0.5
    tol = _warp_tolerance(r.moving, r.displacement)
    err = np.abs(warped_itk - r.warped_moving)[inside].max()
    assert err <= tol, f"ITK vs our warped image: {err:.3g} > {tol:.3g} ({err / EPS32:.1f} float32 steps)"
    # the inverse file: the fixed image onto the moving grid, ITK vs our resampling through the file's field
    inverse_itk = itk.transformread(paths[OUTPUT_FILES["inverse_transform"]])[0]
    assert inverse_itk.GetNthTransform(0).GetNameOfClass() == "DisplacementFieldTransform"
    assert inverse_itk.GetNthTransform(1).GetNameOfClass() == "AffineTransform"
    inverse = composite_displacement(read_itk_composite(paths[OUTPUT_FILES["inverse_transform"]]), moving_grid)
    back_itk = _itk_resample(itk, r.fixed, r.moving, inverse_itk)
    back_ours = warp_physical(r.fixed.array, fixed_grid, inverse.astype(np.float32), moving_grid, "bilinear", "zeros")
    inside = _inside(moving_grid, fixed_grid, inverse)
    assert inside.mean() > 0.2
    tol = _warp_tolerance(r.fixed, inverse)
    err = np.abs(back_itk - back_ours)[inside].max()
    assert err <= tol, f"ITK vs our inverse resampling: {err:.3g} > {tol:.3g} ({err / EPS32:.1f} float32 steps)"


@pytest.mark.itk
def test_itk_reads_the_nifti_displacement_fields(with_prealign, tmp_path):
    """The ``displacement_mm`` / ``inverse_displacement_mm`` NIfTI files as ITK DisplacementFieldTransforms: ITK's
    resampling of the moving image is our warped image (float32 rounding); the inverse field's points equal ours."""
    itk = pytest.importorskip("itk", reason="ITK comparisons need the itk package (-m itk: pip install itk)")
    r = with_prealign
    paths = r.save(tmp_path / "out", outputs=["displacement", "inverse_displacement", "warped"])
    fixed_grid, moving_grid = Grid.of(r.fixed), Grid.of(r.moving)
    for key, grid, source, image, reference, field in [
        ("displacement", fixed_grid, moving_grid, r.moving, r.fixed, r.displacement),
        ("inverse_displacement", moving_grid, fixed_grid, r.fixed, r.moving, r.inverse_displacement),
    ]:
        # ITK's NIfTI reader gives geometry and vectors (float); the transform takes double vectors: copy them over
        reader = itk.ImageFileReader[itk.Image[itk.Vector[itk.F, 3], 3]].New(FileName=paths[OUTPUT_FILES[key]])
        reader.Update()
        read = reader.GetOutput()
        field_image = itk.Image[itk.Vector[itk.D, 3], 3].New()
        field_image.SetRegions(read.GetLargestPossibleRegion())
        field_image.CopyInformation(read)
        field_image.Allocate()
        itk.array_view_from_image(field_image)[:] = itk.array_view_from_image(read)
        transform = itk.DisplacementFieldTransform[itk.D, 3].New()
        transform.SetDisplacementField(field_image)
        pts = (world_of(grid) + 0.0).reshape(3, -1).T[::7]
        theirs = np.array([list(transform.TransformPoint((LPS * p).tolist())) for p in pts]) * LPS
        expected = pts + field.reshape(3, -1).T[::7]
        np.testing.assert_allclose(theirs, expected, rtol=0, atol=EPS32 * 4 * np.abs(expected).max())
        resampled = _itk_resample(itk, image, reference, transform)
        ours = warp_physical(image.array, source, field, grid, "bilinear", "zeros")
        inside = _inside(grid, source, field)
        tol = _warp_tolerance(image, field)
        err = np.abs(resampled - ours)[inside].max()
        assert err <= tol, f"{key}: ITK vs ours {err:.3g} > {tol:.3g} ({err / EPS32:.1f} float32 steps)"
