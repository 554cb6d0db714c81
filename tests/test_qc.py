"""QC report: inverse-consistency error of known transform pairs, slices through real anatomy, the written files."""

import base64
import json
import os
import re

import numpy as np
import pytest
import torch
from test_register_pair import image, random_network
from tolerance import f32_tolerance

from monai_gradicon.coordinate_transforms import CoordinateTransform
from monai_gradicon.io import Image, read_image
from monai_gradicon.model_card import ModelCard
from monai_gradicon.pipeline import register as register_pair
from monai_gradicon.pipeline.core import (
    NetworkTransforms,
    RegistrationSettings,
    prepare_pair,
    read_pair,
    to_original_grids,
)
from monai_gradicon.pipeline.qc import (
    QC_FILES,
    anatomy_slices,
    error_statistics,
    inverse_consistency_error,
    qc_slices,
    write_qc_report,
)
from monai_gradicon.pipeline.result import RegistrationResult
from monai_gradicon.resample import Grid, _axis_coefficients

SHAPE = (20, 22, 18)  # network grid, file axis order (axis_order "file")


class AffineMap(CoordinateTransform):
    """``x -> M x + t`` in normalized network coordinates (an analytic transform, exact everywhere)."""

    def __init__(self, matrix, offset):
        self.matrix = torch.as_tensor(np.asarray(matrix), dtype=torch.float32)
        self.offset = torch.as_tensor(np.asarray(offset), dtype=torch.float32)

    def __call__(self, points):
        m, t = self.matrix.to(points), self.offset.to(points)
        return torch.einsum("ij,bj...->bi...", m, points) + t.view(1, -1, *([1] * (points.ndim - 2)))

    def _reference_tensor(self):
        return self.matrix


def result_with(phi_ab, phi_ba, fixed, moving, fixed_mask=None):
    """A RegistrationResult whose transforms are the given ones (stages 1, 2 and 4 of the pipeline)."""
    settings = RegistrationSettings(preprocessing="none", input_shape=SHAPE, axis_order="file")
    prepared = prepare_pair(read_pair(fixed, moving, fixed_mask), settings)
    transforms = NetworkTransforms(phi_ab, phi_ba)
    fields = to_original_grids(prepared, transforms)
    return RegistrationResult(prepared, transforms, fields,
                              ModelCard(axis_order="file", input_shape=SHAPE, preprocessing="none"))


def pair_on_different_grids():
    fixed = image((24, 26, 20), np.array([[1.5, 0, 0, -10], [0, 1.2, 0, 5], [0, 0, 2.0, 3], [0, 0, 0, 1]]), seed=0)
    moving = image((30, 21, 23), np.array([[2.2, 0, 0, -30], [0, 1.6, 0, 2], [0, 0, 1.7, -4], [0, 0, 0, 1]]), seed=1)
    return fixed, moving


def test_exactly_inverse_pair_has_no_inverse_consistency_error():
    fixed, moving = pair_on_different_grids()
    m = np.array([[1.05, 0.03, -0.02], [-0.04, 0.97, 0.05], [0.02, -0.03, 1.02]])
    t = np.array([0.02, -0.03, 0.015])
    m_inv = np.linalg.inv(m)
    result = result_with(AffineMap(m, t), AffineMap(m_inv, -m_inv @ t), fixed, moving)
    scale = float(np.abs(Grid.of(fixed).index_to_world(np.array(fixed.shape, float) - 1)).max())  # mm magnitude
    for grid in ("fixed", "moving"):
        err = inverse_consistency_error(result, grid)
        assert err.shape == (fixed if grid == "fixed" else moving).shape
        # float32 evaluation of world coordinates of ~scale mm: a few dozen rounding steps at that magnitude
        assert err.max() <= f32_tolerance(scale, 64), (grid, float(err.max()))


def test_known_inconsistency_is_measured_in_mm_on_each_grid():
    """phi_ab(q) = q + t, phi_ba(q) = q - t + s: Phi_BA(Phi_AB(x)) - x = s in the fixed image's normalized network
    coordinates, Phi_AB(Phi_BA(y)) - y = s in the moving image's: the mm values differ by the grids' geometry."""
    fixed, moving = pair_on_different_grids()
    t = np.array([0.03, -0.02, 0.04])
    s = np.array([0.02, 0.005, -0.01])
    result = result_with(AffineMap(np.eye(3), t), AffineMap(np.eye(3), s - t), fixed, moving)
    expected = {}
    for name, img in (("fixed", fixed), ("moving", moving)):
        scale, _ = _axis_coefficients(img.shape, SHAPE)  # index = scale * q + offset
        expected[name] = float(np.linalg.norm(Grid.of(img).matrix @ (s * scale)))
    assert expected["moving"] > 1.5 * expected["fixed"]  # the two compositions are really different numbers
    for grid in ("fixed", "moving"):
        err = inverse_consistency_error(result, grid)
        stats = error_statistics(err)
        for key in ("mean_mm", "p95_mm", "max_mm"):
            assert stats[key] == pytest.approx(expected[grid], abs=f32_tolerance(100.0, 64)), (grid, key)


def test_error_map_is_the_composition_of_the_point_mappings():
    """On a real (network) registration the dense map equals Phi_BA(Phi_AB(x)) evaluated point by point."""
    fixed, moving = pair_on_different_grids()
    result = register_pair(fixed, moving, random_network(2, (33, 33, 33)), preprocessing="none")
    err = inverse_consistency_error(result, "fixed")
    idx = np.array([[0, 0, 0], [5, 7, 3], [12, 13, 10], [23, 25, 19], [17, 2, 15]])
    world = Grid.of(fixed).index_to_world(idx.astype(float))
    composed = result.moving_to_fixed(result.fixed_to_moving(world))
    # the dense map takes Phi_AB from the displacement field (the same transform at the voxel centres)
    np.testing.assert_allclose(err[tuple(idx.T)], np.linalg.norm(composed - world, axis=1), atol=2e-3)
    assert err.max() > 1e-3  # a network's pair is not exactly inverse


def test_slices_land_on_the_lungs_of_a_real_ct(shared_data):
    from monai_gradicon.lung_mask import lung_mask

    ct = read_image(os.path.join(shared_data, "lung_ct_pyradiomics", "lung1_image.nrrd"))
    lungs = lung_mask(ct, method="threshold").mask
    slices = anatomy_slices(lungs)
    for axis in range(3):
        area = lungs.sum(axis=tuple(a for a in range(3) if a != axis))
        assert area[slices[axis]] == area.max()
    # the left-right axis (array axis 0 here): the central slice falls between the lungs, the chosen one through one
    lr_area = lungs.sum(axis=(1, 2))
    centre = ct.shape[0] // 2
    assert lr_area[centre] < 0.2 * lr_area.max() and lr_area[slices[0]] > 5 * lr_area[centre]


def test_qc_slices_use_the_fixed_mask_or_the_intensity_mass():
    fixed, moving = pair_on_different_grids()
    mask = np.zeros(fixed.shape, np.uint8)
    mask[3:8, 20:24, 14:17] = 1
    with_mask = result_with(AffineMap(np.eye(3), [0, 0, 0]), AffineMap(np.eye(3), [0, 0, 0]), fixed, moving,
                            fixed_mask=Image(mask, fixed.affine))
    slices, how = qc_slices(with_mask)
    assert all(lo <= i < hi for i, (lo, hi) in zip(slices, [(3, 8), (20, 24), (14, 17)])) and "mask" in how
    bright = np.zeros(fixed.shape, np.float32)
    bright[19, 4, 2] = 1000.0
    bright[:, :, :] += np.linspace(0, 1, fixed.shape[2])[None, None, :]
    no_mask = result_with(AffineMap(np.eye(3), [0, 0, 0]), AffineMap(np.eye(3), [0, 0, 0]),
                          Image(bright, fixed.affine), moving)
    slices, how = qc_slices(no_mask)
    assert slices[:2] == (19, 4) and "intensity" in how


def test_write_qc_report(tmp_path):
    fixed, moving = pair_on_different_grids()
    t = np.array([0.03, -0.02, 0.04])
    s = np.array([0.01, 0.0, 0.0])
    result = result_with(AffineMap(np.eye(3), t), AffineMap(np.eye(3), s - t), fixed, moving)
    paths = write_qc_report(result, tmp_path / "qc")
    assert set(paths) == set(QC_FILES) and all(os.path.isfile(p) for p in paths.values())
    with open(paths["summary"], encoding="utf-8") as f:
        summary = json.load(f)
    error = read_image(paths["error_map"]).array
    assert error.shape == fixed.shape
    assert summary["inverse_consistency"]["all_voxels"]["max_mm"] == pytest.approx(float(error.max()), rel=1e-6)
    scale, _ = _axis_coefficients(fixed.shape, SHAPE)
    assert float(error.mean()) == pytest.approx(1.5 * 0.01 * scale[0], rel=1e-4)
    assert summary["folds"]["count"] == 0 and summary["learn2reg"]["NDV_percent"] == 0.0
    with open(paths["report"], encoding="utf-8") as f:
        page = f.read()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http" not in page and "<script" not in page and "<link" not in page
    with pytest.raises(FileExistsError, match="overwrite"):
        write_qc_report(result, tmp_path / "qc")
    write_qc_report(result, tmp_path / "qc", overwrite=True)


def test_qc_needs_the_inverse():
    fixed, moving = pair_on_different_grids()
    result = register_pair(fixed, moving, random_network(), preprocessing="none", inverse=False)
    with pytest.raises(ValueError, match="inverse=True"):
        inverse_consistency_error(result)
    with pytest.raises(ValueError, match="grid must be"):
        inverse_consistency_error(result, "network")
