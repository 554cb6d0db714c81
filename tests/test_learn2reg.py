"""Learn2Reg-compatible metrics, submission files and the evaluator, against independent computations."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree
from test_register_pair import image, random_network
from tolerance import assert_f32_close

from monai_gradicon.io import read_image
from monai_gradicon.metrics import (
    LEARN2REG_QUANTILE,
    TETRAHEDRA,
    hausdorff_distance_95,
    learn2reg_aggregate,
    learn2reg_dice,
    learn2reg_hd95,
    learn2reg_jacobian_determinant,
    learn2reg_sdlogj,
    learn2reg_tre,
    log_jacobian_std,
    non_diffeomorphic_volume,
    sample_ddf_at_points,
    surface_voxels,
    tetrahedra_jacobian_determinants,
)
from monai_gradicon.pipeline import register as register_pair
from monai_gradicon.pipeline.learn2reg import (
    Learn2RegPair,
    evaluate_learn2reg,
    evaluate_learn2reg_pair,
    export_learn2reg,
    export_saved_learn2reg,
    read_learn2reg_field,
    read_learn2reg_pairs,
    warp_labels,
)

rng = np.random.default_rng(0)


def smooth_field(shape, amplitude, seed=0):
    """[3, *shape] smooth random displacement (voxels)."""
    g = np.random.default_rng(seed)
    return np.stack([ndimage.gaussian_filter(g.normal(size=shape), 2.0) for _ in range(3)]) * amplitude


def identity(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------


def test_tre_is_the_official_formula():
    shape = (20, 22, 18)
    d = smooth_field(shape, 30.0)
    spacing = (1.5, 0.8, 2.0)
    fixed = np.array([[3, 4, 5], [10, 11, 9], [16, 20, 14], [0, 0, 0]], dtype=float)
    moving = fixed + rng.normal(size=fixed.shape) * 2
    # at integer keypoints the cubic spline interpolates: d(f) is the stored value
    expected = np.linalg.norm((fixed + d[(slice(None), *fixed.astype(int).T)].T - moving) * spacing, axis=1)
    np.testing.assert_allclose(learn2reg_tre(fixed, moving, d, spacing), expected, rtol=1e-9, atol=1e-9)
    # off the grid nodes, order 1 is trilinear interpolation (the project's sample_ddf_at_points)
    off = fixed[:3] + [[0.3, 0.5, 0.1], [0.7, 0.2, 0.9], [0.5, 0.5, 0.5]]
    lin = sample_ddf_at_points(d[None], off).numpy()[0]
    np.testing.assert_allclose(learn2reg_tre(off, moving[:3], d, spacing, order=1),
                               np.linalg.norm((off + lin - moving[:3]) * spacing, axis=1), rtol=1e-9)
    with pytest.raises(ValueError, match="outside"):
        learn2reg_tre(fixed + [0, 0, 30], moving, d, spacing)


def test_dice_label_rules():
    fixed = np.zeros((6, 6, 6), int)
    moving = np.zeros_like(fixed)
    fixed[:3], moving[:2] = 1, 1
    fixed[4:, :2] = 2  # label 2 absent from the moving map: NaN
    moving[5, 5, 5] = 3  # label 3 absent from the fixed map: NaN
    warped = moving.copy()
    mean, per = learn2reg_dice(fixed, moving, warped, [1, 2, 3, 4])
    assert per[0] == pytest.approx(2 * 72 / (108 + 72)) and np.isnan(per[1:]).all() and mean == per[0]


def _surface_points(mask, spacing):
    return np.argwhere(surface_voxels(mask)) * np.asarray(spacing)


def test_hd95_on_real_brain_labels_matches_independent_computations(shared_data):
    """GM/WM of the MNI152 template as labels, warped by a known smooth field: our HD95 equals a k-d tree search
    over the surface points and MONAI's compute_hausdorff_distance(percentile=95)."""
    from monai.metrics import compute_hausdorff_distance

    folder = os.path.join(shared_data, "brain_mni152_2009a_sym")
    gm = read_image(os.path.join(folder, "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")).array
    wm = read_image(os.path.join(folder, "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")).array
    box = (slice(40, 160), slice(50, 190), slice(60, 150))  # a real sub-volume: keeps the test fast
    labels = np.zeros(gm[box].shape, np.int16)
    labels[gm[box] > 127] = 1
    labels[wm[box] > 127] = 2
    d = smooth_field(labels.shape, 40.0, seed=3)
    d[0] += 2.0  # a shift of two voxels on top
    warped = warp_labels(labels, d)
    spacing = (1.0, 1.3, 0.7)  # anisotropic on purpose
    mean, per = learn2reg_hd95(labels, labels, warped, [1, 2], spacing)
    for lab, value in zip((1, 2), per):
        a, b = labels == lab, warped == lab
        pa, pb = _surface_points(a, spacing), _surface_points(b, spacing)
        kd = max(np.percentile(cKDTree(pb).query(pa)[0], 95), np.percentile(cKDTree(pa).query(pb)[0], 95))
        monai = float(compute_hausdorff_distance(b[None, None], a[None, None], include_background=True,
                                                 percentile=95, spacing=spacing)[0, 0])
        assert value == pytest.approx(kd, rel=1e-9, abs=1e-9)
        assert value == pytest.approx(monai, rel=1e-5)
        assert 1.0 < value < 15.0
    assert mean == pytest.approx(np.mean(per))
    # a pure shift of k voxels along axis 0: surfaces move by k * spacing[0]
    shifted = np.zeros_like(labels)
    shifted[3:] = labels[:-3]
    assert hausdorff_distance_95(labels == 2, shifted == 2, (1.0, 1.0, 1.0)) == pytest.approx(3.0, abs=0.5)
    assert np.isinf(hausdorff_distance_95(labels == 2, np.zeros_like(labels), (1, 1, 1)))


def test_sdlogj_is_the_official_formula():
    d = smooth_field((14, 15, 16), 30.0, seed=1)
    grads = np.stack([np.stack([np.gradient(d[c], axis=a) for a in range(3)]) for c in range(3)])  # [c, a, ...]
    jac = grads + np.eye(3)[:, :, None, None, None]
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))[2:-2, 2:-2, 2:-2]
    np.testing.assert_allclose(learn2reg_jacobian_determinant(d), det, rtol=1e-12, atol=1e-12)
    assert (det <= 0).any()  # the field folds: the clip and the +3 matter
    official = np.log(np.clip(det + 3.0, 1e-9, 1e9))
    assert learn2reg_sdlogj(d) == pytest.approx(official.std(), rel=1e-12)
    assert learn2reg_sdlogj(d, slab_rows=1) == pytest.approx(official.std(), rel=1e-12)
    mask = np.zeros(d.shape[1:], bool)
    mask[4:10, 3:12, 5:9] = True
    assert learn2reg_sdlogj(d, mask) == pytest.approx(official[mask[2:-2, 2:-2, 2:-2]].std(), rel=1e-12)
    # the leaderboard number is not the textbook std(log det J)
    assert abs(learn2reg_sdlogj(d) - float(log_jacobian_std(d[None])[0])) > 0.1


def _official_style_tetrahedra(d):
    """The Jacobians of Liu et al. written the way the LUMIR evaluation computes them: correlation kernels on the
    edge-replicated deformation, border voxels dropped (an independent formulation of the same definitions)."""
    t = d + identity(d.shape[1:])
    one = {"+": np.array([0.0, -1.0, 1.0]), "-": np.array([-1.0, 1.0, 0.0]), "0": np.array([-0.5, 0.0, 0.5])}

    def kernel(values, axes):
        k = np.zeros((3, 3, 3))
        index = [1, 1, 1]
        for v, pos in zip(values, range(3)):
            index[axes] = pos
            k[tuple(index)] = v
        return k

    def det_of(kernels):
        cols = [np.stack([ndimage.correlate(t[c], k, mode="nearest") for c in range(3)]) for k in kernels]
        m = np.stack(cols, axis=1)  # [component, edge, ...]
        return np.linalg.det(np.moveaxis(m, (0, 1), (-2, -1)))[1:-1, 1:-1, 1:-1]

    out = {}
    for name in ("000", *TETRAHEDRA[:8]):
        out[name] = det_of([kernel(one[s], axis) for axis, s in enumerate(name)])
    for name, offsets in (("star1", [(-1, -1, 0), (-1, 0, -1), (0, -1, -1)]),
                          ("star2", [(1, 1, 0), (0, 1, 1), (1, 0, 1)])):
        kernels = []
        for off in offsets:
            k = np.zeros((3, 3, 3))
            k[1, 1, 1] = -1.0
            k[tuple(1 + o for o in off)] += 1.0
            kernels.append(k)
        out[name] = det_of(kernels)
    return out


def test_tetrahedra_and_ndv_match_an_independent_formulation():
    d = smooth_field((12, 13, 11), 12.0, seed=2)
    ours = tetrahedra_jacobian_determinants(d)
    theirs = _official_style_tetrahedra(d)
    np.testing.assert_allclose(ours["central"], theirs["000"], rtol=1e-10, atol=1e-10)
    for name in TETRAHEDRA:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-10, atol=1e-10, err_msg=name)
    ndv = non_diffeomorphic_volume(d)
    expected = sum(-0.5 * np.minimum(theirs[n], 0) / 6 for n in TETRAHEDRA).sum()
    assert ndv["ndv_voxels"] == pytest.approx(expected, rel=1e-10) and ndv["ndv_percent"] > 0
    assert ndv["ndp_percent"] == pytest.approx(100 * np.mean(theirs["000"] <= 0))
    assert non_diffeomorphic_volume(d, slab_rows=1) == pytest.approx(ndv, rel=1e-12)  # only the summation order
    mask = np.zeros(d.shape[1:], bool)
    mask[2:7] = True
    masked = non_diffeomorphic_volume(d, mask)
    inner = mask[1:-1, 1:-1, 1:-1]
    assert masked["ndv_voxels"] == pytest.approx(
        sum(-0.5 * np.minimum(theirs[n], 0) / 6 for n in TETRAHEDRA)[inner].sum(), rel=1e-10)


def test_ndv_of_known_folds():
    shape = (12, 9, 10)
    grid = identity(shape)
    assert non_diffeomorphic_volume(np.zeros((3, *shape)))["ndv_percent"] == 0.0
    mirror = np.zeros((3, *shape))
    mirror[0] = -2 * grid[0]  # x0 -> -x0: every tetrahedron inverted
    assert non_diffeomorphic_volume(mirror)["ndv_percent"] == pytest.approx(100.0)
    # a fold at plane x0 = k: x0 -> x0 for x0 <= k, 2k - x0 beyond; the plane row is half inverted (4 corner
    # tetrahedra of volume 1/6 and one central of volume 1/3, each counted 1/2), every row beyond it fully
    k = 5
    fold = np.zeros((3, *shape))
    fold[0] = np.where(grid[0] > k, 2 * k - 2 * grid[0], 0.0)
    rows_beyond = shape[0] - 2 - k  # interior rows k + 1 .. X - 2
    expected = (0.5 + rows_beyond) * (shape[1] - 2) * (shape[2] - 2)
    assert non_diffeomorphic_volume(fold)["ndv_voxels"] == pytest.approx(expected)


def test_aggregate_is_the_quantile_over_cases():
    values = [3.0, 1.0, 7.0, 2.0, 5.0]
    agg = learn2reg_aggregate(values)
    assert LEARN2REG_QUANTILE == 0.3
    assert agg == {"mean": 3.6, "std": pytest.approx(np.std(values)), "30": pytest.approx(np.quantile(values, 0.3))}
    assert agg["30"] == pytest.approx(2.2)  # sorted 1, 2, 3, 5, 7: position 1.2 -> 2 + 0.2 * (3 - 2)


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------


def test_pair_names():
    nlst = Learn2RegPair("./imagesTr/NLST_0101_0000.nii.gz", "./imagesTr/NLST_0101_0001.nii.gz")
    assert nlst.key == "0101_0000<--0101_0001" and nlst.field_name() == "disp_0101_0101.nii.gz"
    assert nlst.sibling("moving", "keypoints", ".csv") == "./keypointsTr/NLST_0101_0001.csv"
    multi = Learn2RegPair("./imagesTr/X_0003_0002.nii.gz", "./imagesTr/X_0007_0000.nii.gz")
    assert multi.field_stems == ("disp_0003_0002_0007_0000",) and multi.field_name(".npz").endswith(".npz")
    with pytest.raises(ValueError, match="Learn2Reg image"):
        Learn2RegPair("fixed.nii.gz", "./imagesTr/NLST_0101_0001.nii.gz")


def test_export_follows_map_coordinates_convention(tmp_path):
    """The exported field, read back, warps the stored moving array with scipy exactly as the pipeline did."""
    fixed = image((24, 26, 20), np.array([[1.5, 0, 0, -10], [0, 1.2, 0, 5], [0, 0, 2.0, 3], [0, 0, 0, 1]]), seed=0)
    moving = image((30, 21, 23), np.array([[1.1, 0, 0, -12], [0, 1.6, 0, 2], [0, 0, 1.7, -4], [0, 0, 0, 1]]), seed=1)
    result = register_pair(fixed, moving, random_network(2, (33, 33, 33)), preprocessing="none")
    nii = export_learn2reg(result, tmp_path / "disp_0001_0001.nii.gz")
    stored = nib.load(nii)
    assert stored.shape == (*fixed.shape, 3) and stored.get_data_dtype() == np.float32
    np.testing.assert_allclose(stored.affine, fixed.affine)
    d = read_learn2reg_field(nii, fixed.shape)
    coords = identity(fixed.shape) + d
    # linear interpolation, edge values outside (mode "nearest" = the pipeline's border padding)
    warped = ndimage.map_coordinates(moving.array.astype(np.float64), coords, order=1, mode="nearest")
    inside = np.all((coords >= 0) & (coords <= np.array(moving.shape)[:, None, None, None] - 1), axis=0)
    assert 0.05 < inside.mean() < 0.95  # a wild transform: points inside and outside the moving image
    assert_f32_close(warped, result.warped_moving, ulps=16, scale=float(np.abs(moving.array).max()),
                     what="map_coordinates(moving, id + d) vs the pipeline's warped image")
    npz = export_learn2reg(result, tmp_path / "disp_0001_0001.npz", dtype="float16")
    with np.load(npz) as f:
        assert f.files == ["arr_0"] and f["arr_0"].shape == (*fixed.shape, 3) and f["arr_0"].dtype == np.float16
    np.testing.assert_allclose(read_learn2reg_field(npz), d, atol=0.02)
    # on a shared grid the Learn2Reg field is the MONAI DDF of the result
    same = register_pair(fixed, image((24, 26, 20), fixed.affine, seed=2), random_network(), preprocessing="none")
    export_learn2reg(same, tmp_path / "same.nii.gz")
    np.testing.assert_allclose(read_learn2reg_field(tmp_path / "same.nii.gz"), same.ddf, atol=1e-4)
    with pytest.raises(ValueError, match="nii.gz or .npz"):
        export_learn2reg(result, tmp_path / "disp.nii")
    with pytest.raises(ValueError, match="no float16"):
        export_learn2reg(result, tmp_path / "half.nii.gz", dtype="float16")
    # a saved result folder exports the same field (world field stored as float32 LPS, read back)
    result.save(tmp_path / "saved")
    again = export_saved_learn2reg(tmp_path / "saved", tmp_path / "again.nii.gz")
    assert_f32_close(read_learn2reg_field(again), d, ulps=64, scale=float(np.abs(d).max()), what="saved vs in memory")


# ----------------------------------------------------------------------------------------------------------------
# the evaluator
# ----------------------------------------------------------------------------------------------------------------

SHAPE = (16, 18, 14)
SPACING = (1.5, 1.5, 1.5)


def make_dataset(root, n_pairs=3):
    """A small Learn2Reg layout (NLST-like keypoints, OASIS-like labels, masks) with 3 validation pairs."""
    affine = np.diag([*SPACING, 1.0])
    pairs = []
    for case in range(1, n_pairs + 1):
        entry = {}
        for phase in (0, 1):
            name = f"TASK_{case:04d}_{phase:04d}.nii.gz"
            vol = ndimage.gaussian_filter(np.random.default_rng(10 * case + phase).normal(size=SHAPE), 2) * 100 + 50
            for folder, array in (("imagesTr", vol.astype(np.float32)),
                                  ("labelsTr", (vol > 50).astype(np.uint8) + (vol > 60).astype(np.uint8)),
                                  ("masksTr", np.ones(SHAPE, np.uint8))):
                os.makedirs(root / folder, exist_ok=True)
                nib.save(nib.Nifti1Image(array, affine), str(root / folder / name))
            points = np.array([[4, 5, 6], [8, 9, 7], [11, 12, 3]], float) + phase * case
            os.makedirs(root / "keypointsTr", exist_ok=True)
            np.savetxt(root / "keypointsTr" / name.replace(".nii.gz", ".csv"), points, delimiter=",", fmt="%.1f")
            entry["fixed" if phase == 0 else "moving"] = f"./imagesTr/{name}"
        pairs.append(entry)
    (root / "TASK_dataset.json").write_text(json.dumps({"name": "TASK", "registration_val": pairs}))
    return root / "TASK_dataset.json"


def test_evaluator_scores_fields_and_result_folders(tmp_path):
    dataset = make_dataset(tmp_path / "data")
    name, pairs = read_learn2reg_pairs(dataset, "validation")
    assert name == "TASK" and [p.key for p in pairs] == [f"000{i}_0000<--000{i}_0001" for i in (1, 2, 3)]
    predictions = tmp_path / "pred"
    predictions.mkdir()
    # pair 1: a constant field moving every keypoint exactly onto its partner (offset 1): TRE 0
    d1 = np.ones((3, *SHAPE))
    nib.save(nib.Nifti1Image(np.moveaxis(d1, 0, -1).astype(np.float32), np.eye(4)),
             str(predictions / pairs[0].field_name()))
    # pair 2: zero field (offset 2 per axis): TRE = |(2, 2, 2) * 1.5|
    np.savez(predictions / pairs[1].field_name(".npz"), np.zeros((*SHAPE, 3), np.float32))
    # pair 3: this project's result folder, registered by the pipeline
    root = tmp_path / "data"
    result = register_pair(str(root / pairs[2].fixed), str(root / pairs[2].moving), random_network(),
                           preprocessing="none")
    result.save(predictions / pairs[2].field_stems[0])

    evaluation = evaluate_learn2reg(dataset, predictions, metrics=("tre", "dice", "hd95", "sdlogj", "ndv"),
                                    labels=[1, 2, 3], masked_evaluation=True)
    cases = evaluation.cases
    assert cases[pairs[0].key]["TRE_mm"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert cases[pairs[1].key]["TRE_mm"]["mean"] == pytest.approx(np.sqrt(3) * 3.0)
    assert np.isnan(cases[pairs[0].key]["DSC"]["detailed"][2])  # label 3 exists in no map
    assert cases[pairs[0].key]["SDlogJ"]["mean"] == 0.0 and cases[pairs[0].key]["NDV_percent"]["mean"] == 0.0
    # the result folder is scored like its exported Learn2Reg field, and carries its runtime
    exported = export_learn2reg(result, tmp_path / "check" / "disp.nii.gz")
    fixed_kp = np.loadtxt(root / "keypointsTr" / "TASK_0003_0000.csv", delimiter=",")
    moving_kp = np.loadtxt(root / "keypointsTr" / "TASK_0003_0001.csv", delimiter=",")
    direct = evaluate_learn2reg_pair(read_learn2reg_field(exported), metrics=("tre", "ndv"),
                                     fixed_keypoints=fixed_kp, moving_keypoints=moving_kp, moving_spacing=SPACING)
    assert cases[pairs[2].key]["TRE_mm"]["mean"] == pytest.approx(direct["TRE_mm"]["mean"], abs=1e-4)
    assert cases[pairs[2].key]["runtime_s"]["mean"] == pytest.approx(result.timings["total_before_write"], abs=1e-3)
    for column in ("TRE_mm", "DSC", "HD95_mm", "SDlogJ", "NDV_percent"):
        values = [cases[p.key][column]["mean"] for p in pairs]
        assert evaluation.aggregates[column]["30"] == pytest.approx(np.quantile(values, 0.3))
        assert evaluation.aggregates[column]["mean"] == pytest.approx(np.mean(values))
    assert set(evaluation.aggregates["runtime_s"]) == {"mean", "std", "30"}

    json_path = evaluation.write_json(tmp_path / "metrics.json")
    with open(json_path, encoding="utf-8") as f:
        stored = json.load(f)
    assert stored["name"] == "TASK" and set(stored["cases"]) == {p.key for p in pairs}
    assert stored["cases"][pairs[0].key]["DSC"]["detailed"][2] is None  # NaN -> null
    csv_path = evaluation.write_csv(tmp_path / "metrics.csv")
    with open(csv_path, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["case", "fixed", "moving", "TRE_mm"] and [r[0] for r in rows[-3:]] == ["mean", "std", "30"]
    assert float(rows[2][3]) == pytest.approx(np.sqrt(3) * 3.0)


def test_evaluator_refuses_missing_ambiguous_and_unlabelled(tmp_path):
    dataset = make_dataset(tmp_path / "data", n_pairs=1)
    predictions = tmp_path / "pred"
    predictions.mkdir()
    with pytest.raises(FileNotFoundError, match="disp_0001_0001.nii.gz"):
        evaluate_learn2reg(dataset, predictions, metrics=["tre"])
    np.savez(predictions / "disp_0001_0001.npz", np.zeros((*SHAPE, 3), np.float32))
    with pytest.raises(ValueError, match="label list"):
        evaluate_learn2reg(dataset, predictions, metrics=["dice"])
    with pytest.raises(ValueError, match="metrics must be"):
        evaluate_learn2reg(dataset, predictions, metrics=["mse"])
    np.savez(predictions / "disp_0001_0000_0001_0001.npz", np.zeros((*SHAPE, 3), np.float32))
    with pytest.raises(ValueError, match="several predictions"):
        evaluate_learn2reg(dataset, predictions, metrics=["tre"])
    os.remove(predictions / "disp_0001_0000_0001_0001.npz")
    np.savez(predictions / "disp_0001_0001.npz", np.zeros((*SHAPE[:2], 9, 3), np.float32))
    with pytest.raises(ValueError, match="fixed image"):
        evaluate_learn2reg(dataset, predictions, metrics=["tre"])
