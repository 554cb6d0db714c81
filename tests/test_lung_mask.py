"""Automatic lung masks (monai_gradicon.lung_mask): a synthetic chest with known anatomy, the three real chest CTs of
../shared/data (plausibility, airway exclusion, stability), and clear errors for inputs that are not chest CTs."""

import functools
import json
import os
import sys
import types

import numpy as np
import pytest
from scipy import ndimage

from monai_gradicon import lung_mask as lung_mask_module
from monai_gradicon.io import Image, read_image
from monai_gradicon.lung_mask import LungMaskError, LungMaskResult, LungMaskWarning, lung_mask

# ----------------------------------------------------------------------------------------------------------------
# synthetic chest: body, two lungs with vessels, trachea and main bronchi with walls, stomach gas, table
# ----------------------------------------------------------------------------------------------------------------

LUNG_CENTRES_MM = ((75.0, 0.0, 10.0), (-75.0, 0.0, 10.0))  # RAS: right lung at +x, left lung at -x
LUNG_SEMI_AXES_MM = (55.0, 80.0, 100.0)
LUNG_VOLUME_ML = 2 * 4.0 / 3.0 * np.pi * np.prod(LUNG_SEMI_AXES_MM) / 1000.0  # 3686 mL
CARINA_MM = (0.0, 30.0, 60.0)
BRONCHUS_ENDS_MM = ((60.0, 20.0, 30.0), (-60.0, 20.0, 30.0))


def _segment_distance(points: np.ndarray, a, b) -> np.ndarray:
    """Distance (mm) of world points ``[..., 3]`` to the segment ``a``-``b``."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    ab = b - a
    t = np.clip(((points - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[..., None] * ab), axis=-1)


@functools.cache
def chest_phantom(spacing=(2.0, 2.0, 4.0), trachea=True, bridge=False, seed=0):
    """A chest CT in HU, ``[X, Y, Z]`` with an LPS-like affine (file x towards the patient's left, as DICOM/NRRD),
    and its truth masks (bool ``[X, Y, Z]``): body, lungs (ellipsoids, vessels included), airway lumen, gas, and
    the world x and z (mm) of every voxel. Cached: callers must not modify what it returns."""
    sx, sy, sz = spacing
    shape = (int(360 / sx), int(280 / sy), int(300 / sz))
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [180.0 - sx / 2, 140.0 - sy / 2, -150.0 + sz / 2]
    axes = [affine[a, a] * np.arange(n, dtype=np.float32) + affine[a, 3] for a, n in enumerate(shape)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    world = np.stack([x, y, z], axis=-1)

    hu = np.full(shape, -1000.0)
    body = (x / 150.0) ** 2 + (y / 110.0) ** 2 <= 1.0
    hu[body] = 40.0
    table = (np.abs(x) <= 170.0) & (((y >= -138.0) & (y <= -134.0)) | ((y >= -126.0) & (y <= -122.0)))
    table |= (np.abs(np.abs(x) - 168.0) <= 2.0) & (y >= -138.0) & (y <= -122.0)  # a hollow table: air inside
    hu[table] = 300.0
    lungs = np.zeros(shape, dtype=bool)
    for cx, cy, cz in LUNG_CENTRES_MM:
        lungs |= ((x - cx) / LUNG_SEMI_AXES_MM[0]) ** 2 + ((y - cy) / LUNG_SEMI_AXES_MM[1]) ** 2 + (
            (z - cz) / LUNG_SEMI_AXES_MM[2]) ** 2 <= 1.0
    if bridge:  # a thin anterior junction joining the two lungs
        lungs |= (np.abs(x) <= 45.0) & (y >= 50.0) & (y <= 56.0) & (z >= -20.0) & (z <= 40.0)
    hu[lungs] = -850.0
    vessels = np.zeros(shape, dtype=bool)
    for cx, _, _ in LUNG_CENTRES_MM:
        vessels |= ((x - cx) ** 2 + (y + 20.0) ** 2 <= 5.0 ** 2) & lungs
    hu[vessels] = 40.0
    airway = np.zeros(shape, dtype=bool)
    if trachea:
        top = (0.0, 30.0, 200.0)
        hu[_segment_distance(world, CARINA_MM, top) <= 11.0] = 40.0  # wall
        airway |= _segment_distance(world, CARINA_MM, top) <= 9.0
        for end in BRONCHUS_ENDS_MM:
            wall_end = np.asarray(CARINA_MM) + 0.85 * (np.asarray(end) - np.asarray(CARINA_MM))
            hu[_segment_distance(world, CARINA_MM, wall_end) <= 8.0] = 40.0  # open end: the lumen leaves the wall
            airway |= _segment_distance(world, CARINA_MM, end) <= 6.0
        hu[airway] = -1000.0
    gas = ((x + 70.0) / 45.0) ** 2 + ((y - 10.0) / 40.0) ** 2 + ((z + 125.0) / 20.0) ** 2 <= 1.0
    hu[gas] = -1000.0
    hu += np.random.default_rng(seed).normal(0.0, 15.0, shape)
    truth = {"body": body, "lungs": lungs, "airway": airway, "gas": gas, "vessels": vessels, "x": x, "z": z}
    return Image(array=np.round(hu).astype(np.int16), affine=affine), truth


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def test_synthetic_chest_lungs_airways_gas_and_vessels():
    ct, truth = chest_phantom()
    result = lung_mask(ct, method="threshold")
    assert isinstance(result, LungMaskResult)
    mask = result.mask
    assert mask.dtype == np.bool_ and mask.shape == ct.array.shape
    assert result.method == "threshold" and result.components == 2
    assert abs(result.volume_ml - LUNG_VOLUME_ML) < 0.04 * LUNG_VOLUME_ML, (result.volume_ml, LUNG_VOLUME_ML)
    assert _dice(mask, truth["lungs"]) > 0.97
    # the trachea and the extrapulmonary bronchi are excluded; the stomach gas too; vessels inside are included
    assert result.details["airway"]["found"]
    assert not np.any(mask & truth["airway"] & (np.abs(truth["x"]) < 25.0))
    assert not np.any(mask & truth["gas"])
    assert any(abs(d["volume_ml"] - 151.0) < 15.0 and not d["reaches_apex"] for d in result.details["dropped"])
    inner_vessels = truth["vessels"] & (np.abs(truth["z"] - 10.0) < 80.0)
    assert np.count_nonzero(mask & inner_vessels) > 0.99 * np.count_nonzero(inner_vessels)
    assert not np.any(mask & ~truth["body"])
    sides = sorted(k["side"] for k in result.details["kept"])
    assert sides == ["left", "right"]
    right = mask & (truth["x"] > 0)
    assert abs(np.count_nonzero(right) / np.count_nonzero(mask) - 0.5) < 0.02
    json.dumps(result.details)  # JSON-serialisable


def test_synthetic_chest_touching_lungs_are_split():
    ct, truth = chest_phantom(bridge=True)
    result = lung_mask(ct, method="threshold")
    assert result.details["lungs_split"] and result.components == 2
    kept = sorted(result.details["kept"], key=lambda k: k["side"])
    assert [k["side"] for k in kept] == ["left", "right"]
    assert min(k["volume_ml"] for k in kept) > 0.9 * max(k["volume_ml"] for k in kept)
    assert _dice(result.mask, truth["lungs"]) > 0.97


def test_synthetic_chest_without_trachea_warns_and_still_masks_the_lungs():
    ct, truth = chest_phantom(trachea=False)
    with pytest.warns(LungMaskWarning, match="trachea was not found"):
        result = lung_mask(ct, method="threshold")
    assert not result.details["airway"]["found"]
    assert result.components == 2 and _dice(result.mask, truth["lungs"]) > 0.97


def test_voxel_order_does_not_matter():
    """The slice axis is found from the affine: a z-flipped CT and a slice-first CT get the same lungs."""
    ct, _ = chest_phantom()
    reference = lung_mask(ct, method="threshold").mask
    n_z = ct.array.shape[2]
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = n_z - 1.0  # voxel k of the flipped array is voxel n_z - 1 - k of the original
    flipped = Image(array=ct.array[:, :, ::-1].copy(), affine=ct.affine @ flip)
    assert _dice(lung_mask(flipped, method="threshold").mask[:, :, ::-1], reference) > 0.999
    order = (2, 0, 1)  # file axes (z, x, y)
    permute = np.eye(4)[:, list(order) + [3]]
    slice_first = Image(array=np.ascontiguousarray(np.transpose(ct.array, order)), affine=ct.affine @ permute)
    result = lung_mask(slice_first, method="threshold")
    assert result.details["slice_axis"] == 0
    assert _dice(np.transpose(result.mask, np.argsort(order)), reference) > 0.999


def test_parameters_change_the_mask_as_documented():
    ct, truth = chest_phantom()
    no_fill = lung_mask(ct, method="threshold", closing_radius_mm=0.0, max_hole_cm2=0.01)
    inner_vessels = truth["vessels"] & (np.abs(truth["z"] - 10.0) < 80.0)
    assert np.count_nonzero(no_fill.mask & inner_vessels) < 0.05 * np.count_nonzero(inner_vessels)
    full = lung_mask(ct, method="threshold", working_spacing_mm=0.0)
    assert full.details["working_block"] == [1, 1, 1]
    assert _dice(full.mask, lung_mask(ct, method="threshold").mask) > 0.99


# ----------------------------------------------------------------------------------------------------------------
# real chest CTs
# ----------------------------------------------------------------------------------------------------------------

REAL_CTS = {
    # name: (file, plausible total volume in mL, trachea lumen points (i, j, k) located by eye on the images)
    "lung1": ("lung_ct_pyradiomics/lung1_image.nrrd", (1500.0, 9000.0), [(261, 351, 24), (270, 330, 32)]),
    "lung2": ("lung_ct_pyradiomics/lung2_image.nrrd", (1500.0, 9000.0), [(257, 276, 40), (250, 265, 44)]),
    "popi": ("lung_ct_popi_phase00/popi_phase00_ct.nii.gz", (2500.0, 9000.0), [(238, 242, 90), (242, 240, 100)]),
}
_CACHE: dict = {}


def _real(shared_data: str, name: str) -> tuple[Image, LungMaskResult]:
    if name not in _CACHE:
        ct = read_image(os.path.join(shared_data, REAL_CTS[name][0]), "chest CT")
        _CACHE[name] = (ct, lung_mask(ct, method="threshold"))
    return _CACHE[name]


@pytest.mark.parametrize("name", sorted(REAL_CTS))
def test_real_ct_lung_masks_are_plausible(shared_data, name):
    """Full-resolution real CTs: volume, two lungs of similar size, inside the body, air-like, trachea excluded."""
    ct, result = _real(shared_data, name)
    _, (low, high), trachea_points = REAL_CTS[name]
    mask, hu = result.mask, ct.array
    assert mask.shape == hu.shape and mask.any()
    assert low <= result.volume_ml <= high, result.volume_ml
    assert result.components == 2
    volumes = [k["volume_ml"] for k in result.details["kept"]]
    assert min(volumes) > 0.5 * max(volumes)
    assert sorted(k["side"] for k in result.details["kept"]) == ["left", "right"]
    assert float(hu[mask].mean()) < -500.0
    # inside the body: no mask voxel in the air connected to the in-plane image border of its slice
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    air = hu[::2, ::2, :] < -400
    labels, _ = ndimage.label(air, structure=in_plane)
    border = np.unique(np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(),
                                       labels[:, -1].ravel()]))
    outside = np.isin(labels, border[border > 0])
    assert not np.any(mask[::2, ::2, :] & outside)
    # the trachea: points in its lumen, and a 6 mm disc around them, are outside the mask
    spacing = ct.spacing
    for i, j, k in trachea_points:
        assert hu[i, j, k] < -900, (name, i, j, k)
        ri, rj = int(np.ceil(6.0 / spacing[0])), int(np.ceil(6.0 / spacing[1]))
        assert not mask[i - ri:i + ri + 1, j - rj:j + rj + 1, k].any(), (name, i, j, k)
    assert result.details["airway"]["found"]
    assert 10.0 < result.details["airway"]["volume_ml"] < 150.0
    json.dumps(result.details)


def test_real_ct_coverage(shared_data):
    """What the CTs cover in z: lung1 cuts the lung bases, lung2 holds apex to base, POPI the apices and all of the
    bases but their posterior recesses."""
    slices = {name: np.flatnonzero(_real(shared_data, name)[1].mask.any(axis=(0, 1))) for name in REAL_CTS}
    assert slices["lung1"][0] == 0  # lung bases cut by the first slice (5 mm slices, 240 mm of coverage)
    assert slices["lung1"][-1] < 47
    assert slices["lung2"][0] > 0 and slices["lung2"][-1] < 60  # apex to base inside its 300 mm
    assert slices["popi"][-1] < 140  # apex inside; the trachea leaves through the top slice
    assert slices["popi"][0] == 0  # the posterior costophrenic recesses reach the first slice


def test_popi_mask_is_stable_under_a_one_voxel_shift(shared_data):
    ct, result = _real(shared_data, "popi")
    shifted_affine = ct.affine.copy()
    shifted_affine[:3, 3] = ct.affine[:3, :3] @ np.array([1.0, 0.0, 1.0]) + ct.affine[:3, 3]
    shifted = Image(array=ct.array[1:, :, 1:], affine=shifted_affine)
    moved = lung_mask(shifted, method="threshold")
    assert moved.components == 2
    dice = _dice(moved.mask, result.mask[1:, :, 1:])
    assert dice > 0.95, dice
    assert abs(moved.volume_ml - result.volume_ml) < 0.03 * result.volume_ml


# ----------------------------------------------------------------------------------------------------------------
# inputs that are not chest CTs
# ----------------------------------------------------------------------------------------------------------------


def test_brain_mr_is_rejected_with_its_name(shared_data):
    path = os.path.join(shared_data, "brain_mni152_2009a_sym", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    mr = read_image(path, "moving image")
    with pytest.raises(LungMaskError, match="does not look like a CT in Hounsfield units") as info:
        lung_mask(mr, method="threshold")
    assert path in str(info.value)


def test_ct_without_lungs_is_rejected(shared_data):
    ct, _ = _real(shared_data, "lung2")
    abdomen = Image(array=ct.array[:, :, :6], affine=ct.affine)  # below the lung bases: stomach gas only
    with pytest.warns(LungMaskWarning, match="trachea was not found"), pytest.raises(
        LungMaskError, match="No lung found.*gas pockets"
    ):
        lung_mask(abdomen, method="threshold")
    raw = Image(array=(ct.array.astype(np.int32) + 1024), affine=ct.affine)  # stored values without the intercept
    with pytest.raises(LungMaskError, match="does not look like a CT"):
        lung_mask(raw, method="threshold")


def test_bad_inputs_raise_clear_errors():
    ct, _ = chest_phantom()
    with pytest.raises(LungMaskError, match="needs a 3D CT.*2D"):
        lung_mask(Image(array=ct.array[:, :, 30], affine=ct.affine), method="threshold")
    nan = ct.array.astype(np.float32)
    nan[5, 5, 5] = np.nan
    with pytest.raises(LungMaskError, match="1 non-finite voxels"):
        lung_mask(Image(array=nan, affine=ct.affine), method="threshold")
    with pytest.raises(LungMaskError, match="needs a monai_gradicon.io.Image"):
        lung_mask(ct.array, method="threshold")
    with pytest.raises(LungMaskError, match="Unknown lung mask method 'otsu'"):
        lung_mask(ct, method="otsu")
    with pytest.raises(LungMaskError, match="closing_radius_mm=-1.0 must be zero or positive"):
        lung_mask(ct, method="threshold", closing_radius_mm=-1.0)
    with pytest.raises(LungMaskError, match="airway_max_threshold_hu"):
        lung_mask(ct, method="threshold", airway_max_threshold_hu=-300.0)
    with pytest.raises(LungMaskError, match="outside any CT"):
        lung_mask(Image(array=ct.array.astype(np.float32) * 100.0, affine=ct.affine), method="threshold")
    body_only = np.where(chest_phantom()[1]["body"], 40, -1000).astype(np.int16)
    with pytest.raises(LungMaskError, match="No lung found"):
        lung_mask(Image(array=body_only, affine=ct.affine), method="threshold")


# ----------------------------------------------------------------------------------------------------------------
# external segmenters (never installed here: a stand-in package checks the orientation contract)
# ----------------------------------------------------------------------------------------------------------------


def test_external_method_missing_is_an_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(lung_mask_module, "_external_available", lambda name: False)
    ct, _ = chest_phantom()
    with pytest.raises(LungMaskError, match="needs the 'lungmask' package"):
        lung_mask(ct, method="lungmask")
    result = lung_mask(ct, method="auto")
    assert result.method == "threshold" and result.details["requested_method"] == "auto"


def test_auto_uses_lungmask_in_lps_slice_first_order(monkeypatch):
    """lungmask reads numpy volumes as [z, y, x] in LPS (x towards the patient's left, y posterior, z superior)."""
    ct, truth = chest_phantom()  # [X, Y, Z] with x towards the left and y posterior: LPS already
    seen = {}

    class FakeInferer:
        def __init__(self, tqdm_disable):
            pass

        def apply(self, volume):
            seen["volume"] = volume.copy()
            labels = np.zeros(volume.shape, dtype=np.uint8)
            half = volume.shape[2] // 2
            air = volume < -500
            labels[:, :, :half][air[:, :, :half]] = 1  # lungmask's label 1: the right lung, low x in LPS
            labels[:, :, half:][air[:, :, half:]] = 2
            return labels

    monkeypatch.setitem(sys.modules, "lungmask", types.SimpleNamespace(LMInferer=FakeInferer))
    # the same CT stored in RAS voxel order (both in-plane axes reversed)
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    affine[:3, 3] = ct.affine[:3, :3] @ (np.array(ct.array.shape) - 1.0) * [1, 1, 0] + ct.affine[:3, 3]
    ras = Image(array=ct.array[::-1, ::-1, :].copy(), affine=affine)
    result = lung_mask(ras, method="auto")
    assert result.method == "lungmask" and result.components == 2
    assert np.array_equal(seen["volume"], np.transpose(ct.array, (2, 1, 0)))
    assert np.array_equal(result.mask, ras.array < -500)
    right = (ras.array < -500) & (truth["x"][::-1, ::-1, :] > 0)
    assert result.details["label_volumes_ml"]["1"] == pytest.approx(np.count_nonzero(right) * 16.0 / 1000.0, abs=0.1)
