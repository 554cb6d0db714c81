"""The command line as a user runs it: register / warp / evaluate / convert-weights, and every bad input."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_gradicon import cli
from monai_gradicon.cli import main
from monai_gradicon.pipeline import OUTPUT_FILES
from monai_gradicon.weights import save_weights
from monai_gradicon.io import read_image, write_nifti
from test_instance_optimization import slim_network
from test_io import _nrrd_bytes

SLIM_SHAPE = "24,24,24"


@pytest.fixture(scope="module")
def slim_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "slim.pt"
    save_weights(slim_network(1, (24, 24, 24), preprocessing="lung_ct", modality="ct"), path)
    return str(path)


def lung_crop(shared_data, name, step, z):
    img = read_image(os.path.join(shared_data, "lung_ct_pyradiomics", name))
    sl = (slice(96, 416, step), slice(96, 416, step), z)
    aff = img.affine.copy()
    aff[:3, :3] = img.affine[:3, :3] @ np.diag([step, step, 1])
    aff[:3, 3] = img.affine[:3, :3] @ np.array([96, 96, z.start]) + img.affine[:3, 3]
    return img.array[sl], aff


@pytest.fixture(scope="module")
def lung_files(tmp_path_factory):
    """lung1 (NIfTI) and lung2 (NRRD, LPS) crops: different sizes, spacings and origins, real CT."""
    from conftest import SHARED_DATA

    data = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(os.path.join(data, "lung_ct_pyradiomics")):
        pytest.skip("../shared/data is not present")
    folder = tmp_path_factory.mktemp("lungs")
    f_arr, f_aff = lung_crop(data, "lung1_image.nrrd", 8, slice(10, 40))
    write_nifti(folder / "fixed.nii.gz", f_arr, f_aff)
    m_arr, m_aff = lung_crop(data, "lung2_image.nrrd", 10, slice(20, 50))
    lab, _ = lung_crop(data, "lung2_label.nrrd", 10, slice(20, 50))
    lps = m_aff.copy()
    lps[:2] *= -1  # RAS -> LPS rows for the NRRD header
    directions = [lps[:3, k] for k in range(3)]
    (folder / "moving.nrrd").write_bytes(_nrrd_bytes(m_arr, directions, lps[:3, 3]))
    lab = np.where(m_arr < -400, 1, 0).astype(np.int16) + 2 * lab.astype(np.int16)
    write_nifti(folder / "moving_labels.nii.gz", lab, m_aff)
    write_nifti(folder / "moving_float.nii.gz", m_arr.astype(np.float32) / 7.0, m_aff)
    write_nifti(folder / "fixed_labels.nii.gz", (f_arr < -400).astype(np.uint8), f_aff)
    return folder


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_register_warp_evaluate(lung_files, slim_weights, capsys):
    out = lung_files / "out"
    code, _, err = run(["register", "--fixed", lung_files / "fixed.nii.gz", "--moving", lung_files / "moving.nrrd",
                        "--output_dir", out, "--weights", slim_weights, "--input_shape", SLIM_SHAPE,
                        "--io_iterations", 2, "--io_lr", 1e-3, "--noprogress", "--noauto_masks"], capsys)
    assert code == 0, err
    assert "Done in" in err and "Folds" in err
    # written only when computed (--auto_masks, --prealign) or asked for by name (the .h5 transforms)
    masks = {OUTPUT_FILES["fixed_mask"], OUTPUT_FILES["moving_mask"], OUTPUT_FILES["affine"],
             OUTPUT_FILES["transform"], OUTPUT_FILES["inverse_transform"]}
    assert sorted(os.listdir(out)) == sorted(set(OUTPUT_FILES.values()) - masks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["io_iterations"] == 2 and summary["settings"]["preprocessing"] == "lung_ct"
    assert summary["weights"] == os.path.abspath(slim_weights) and summary["model_card"]["preprocessing"] == "lung_ct"
    stages = {"read", "preprocess", "instance_optimization", "original_grids", "total_before_write"}
    assert stages <= set(summary["timings_seconds"])
    assert summary["instance_optimization"]["steps"] == 2
    fixed = nib.load(lung_files / "fixed.nii.gz")
    warped = nib.load(out / "warped_moving.nii.gz")
    assert warped.shape == fixed.shape and np.allclose(warped.affine, fixed.affine)
    assert nib.load(out / "displacement_mm.nii.gz").shape == (*fixed.shape, 1, 3)
    assert nib.load(out / "inverse_displacement_mm.nii.gz").shape[:3] == (32, 32, 30)

    # warp a label map: nearest neighbour, integer dtype kept
    code, _, err = run(["warp", "--transform_dir", out, "--image", lung_files / "moving_labels.nii.gz",
                        "--output", lung_files / "warped_labels.nii.gz", "--labels"], capsys)
    assert code == 0, err
    lab = nib.load(lung_files / "warped_labels.nii.gz")
    assert lab.get_data_dtype() == np.int16 and set(np.unique(np.asarray(lab.dataobj))) <= {0, 1, 2, 3}
    # the same transform applied to the moving image reproduces warped_moving.nii.gz
    code, _, _ = run(["warp", "--transform_dir", out, "--image", lung_files / "moving.nrrd",
                      "--output", lung_files / "rewarped.nii.gz"], capsys)
    assert code == 0
    np.testing.assert_allclose(np.asarray(nib.load(lung_files / "rewarped.nii.gz").dataobj),
                               np.asarray(warped.dataobj), atol=0.05)
    # a float intensity image passed as labels is refused
    code, _, err = run(["warp", "--transform_dir", out, "--image", lung_files / "moving_float.nii.gz",
                        "--output", lung_files / "bad.nii.gz", "--labels"], capsys)
    assert code == 2 and "non-integer values" in err and not (lung_files / "bad.nii.gz").exists()

    # evaluate: voxel landmarks, labels
    fixed_pts = np.array([[10, 12, 5], [20, 25, 15], [30, 8, 25]], dtype=float)
    moving_pts = np.array([[11, 12, 6], [19, 22, 14], [28, 9, 24]], dtype=float)
    np.savetxt(lung_files / "f.csv", fixed_pts, delimiter=",")
    np.savetxt(lung_files / "m.csv", moving_pts, delimiter=",")
    args = ["evaluate", "--transform_dir", out, "--fixed_landmarks", lung_files / "f.csv",
            "--moving_landmarks", lung_files / "m.csv", "--fixed_labels", lung_files / "fixed_labels.nii.gz",
            "--moving_labels", lung_files / "moving_labels.nii.gz"]
    code, _, err = run(args, capsys)
    assert code == 2 and "landmark frame" in err
    code, stdout, err = run(args + ["--landmarks_in", "voxel", "--output", lung_files / "metrics.json"], capsys)
    assert code == 0, err
    assert "TRE fixed -> moving" in stdout and "TRE moving -> fixed" in stdout and "Dice" in stdout
    metrics = json.loads((lung_files / "metrics.json").read_text())
    assert len(metrics["tre_fixed_to_moving"]["per_landmark_mm"]) == 3 and "1" in metrics["dice"]
    np.savetxt(lung_files / "far.csv", fixed_pts + [[0, 0, 0], [0, 0, 0], [0, 0, 90]], delimiter=",")
    code, _, err = run(["evaluate", "--transform_dir", out, "--fixed_landmarks", lung_files / "far.csv",
                        "--moving_landmarks", lung_files / "m.csv", "--landmarks_in", "voxel"], capsys)
    assert code == 2 and "outside the image" in err and "landmark 2" in err

    # the finished folder is protected
    code, _, err = run(["register", "--fixed", lung_files / "fixed.nii.gz", "--moving", lung_files / "moving.nrrd",
                        "--output_dir", out, "--weights", slim_weights, "--input_shape", SLIM_SHAPE, "--noauto_masks"],
                       capsys)
    assert code == 2 and "--overwrite" in err
    code, _, err = run(["warp", "--transform_dir", out, "--image", lung_files / "moving_labels.nii.gz",
                        "--output", lung_files / "moving_labels.nii.gz", "--labels", "--overwrite"], capsys)
    assert code == 2 and "is one of the inputs" in err


@pytest.fixture
def small_files(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(20, 22, 18)).astype(np.float32) * 300 - 500
    write_nifti(tmp_path / "a.nii.gz", vol, np.diag([1.5, 1.5, 2.0, 1.0]))
    write_nifti(tmp_path / "b.nii.gz", vol[::-1].copy(), np.diag([1.2, 1.5, 2.0, 1.0]))
    return tmp_path


def test_bad_inputs_are_clear_errors(small_files, slim_weights, capsys):
    d = small_files
    base = ["--weights", slim_weights, "--input_shape", SLIM_SHAPE, "--io_iterations", 0, "--noauto_masks"]

    def register(fixed, moving, out="out", extra=()):
        return run(["register", "--fixed", fixed, "--moving", moving, "--output_dir", d / out, *base, *extra], capsys)

    code, _, err = register(d / "missing.nii.gz", d / "b.nii.gz")
    assert code == 2 and "fixed image file does not exist" in err
    (d / "junk.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    code, _, err = register(d / "a.nii.gz", d / "junk.nii.gz")
    assert code == 2 and "Cannot read the moving image" in err and "junk.nii.gz" in err
    write_nifti(d / "flat.nii.gz", np.random.rand(20, 22).astype(np.float32), np.eye(4))
    code, _, err = register(d / "a.nii.gz", d / "flat.nii.gz")
    assert code == 2 and "3D" in err and "2D" in err
    nan = np.asarray(nib.load(d / "a.nii.gz").dataobj).copy()
    nan[1, 2, 3] = np.nan
    write_nifti(d / "nan.nii.gz", nan, np.eye(4))
    code, _, err = register(d / "nan.nii.gz", d / "b.nii.gz")
    assert code == 2 and "NaN" in err
    write_nifti(d / "const.nii.gz", np.zeros((20, 20, 20), np.float32), np.eye(4))
    code, _, err = register(d / "a.nii.gz", d / "const.nii.gz")
    assert code == 2 and "constant" in err
    code, _, err = register(d / "a.nii.gz", d / "b.nii.gz", extra=["--modality", "pet"])
    assert code == 2 and "--modality" in err
    # an output directory holding an input: refused, and the input is untouched
    before = (d / "a.nii.gz").read_bytes()
    code, _, err = run(["register", "--fixed", d / "a.nii.gz", "--moving", d / "b.nii.gz", "--output_dir", d, *base],
                       capsys)
    assert code == 2 and "contains the input file" in err
    assert (d / "a.nii.gz").read_bytes() == before and not (d / "warped_moving.nii.gz").exists()
    # nothing was written by any failed run, not even the output folder
    assert not (d / "out").exists()
    code, _, err = register(d / "a.nii.gz", d / "b.nii.gz")
    assert code == 0, err


def test_pipeline_switches_and_flag_checks(small_files, slim_weights, capsys):
    d = small_files
    base = ["register", "--fixed", d / "a.nii.gz", "--moving", d / "b.nii.gz", "--weights", slim_weights,
            "--io_iterations", 0, "--nooverview", "--noinverse", "--noprogress", "--noauto_masks"]
    for flags, expected in (([], ("physical", "grid")), (["--orientation", "index", "--transform_scheme", "exact"],
                                                          ("index", "exact"))):
        out = d / f"o_{expected[0]}"
        code, _, err = run(base + ["--output_dir", out] + flags, capsys)
        assert code == 0, err
        settings = json.loads((out / "summary.json").read_text())["settings"]
        assert (settings["orientation"], settings["transform_scheme"]) == expected
        assert settings["axis_order"] == "reference"  # from the weights' card, not a flag
    # --outputs writes only what was asked for (and the summary); without the inverse it is not computed
    code, _, err = run(base + ["--output_dir", d / "few", "--outputs", "displacement,jacobian"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(d / "few")) == ["displacement_mm.nii.gz", "jacobian_determinant.nii.gz", "summary.json"]
    assert json.loads((d / "few" / "summary.json").read_text())["settings"]["inverse"] is False
    code, _, err = run(base + ["--output_dir", d / "bad", "--orientation", "lps"], capsys)
    assert code == 2 and "--orientation must be one of physical, index" in err
    # a misspelt or unknown flag fails before anything runs, naming the nearest valid flag
    code, _, err = run(base + ["--output_dir", d / "typo", "--fixed_msk", d / "a.nii.gz"], capsys)
    assert code == 2 and "unknown flag --fixed_msk; did you mean --fixed_mask?" in err
    code, _, err = run(base + ["--output_dir", d / "typo", "--reference_axis_order"], capsys)
    assert code == 2 and "unknown flag --reference_axis_order" in err
    assert not (d / "typo").exists() and not (d / "bad").exists()
    # a card that contradicts explicit settings is an error before the work
    code, _, err = run(base + ["--output_dir", d / "x", "--preprocess", "brain"], capsys)
    assert code == 2 and "the card says 'lung_ct', you asked for 'brain'" in err
    code, _, err = run(base + ["--output_dir", d / "x", "--modality", "mri"], capsys)
    assert code == 2 and "modality 'ct'" in err


def test_default_weights(small_files, slim_weights, capsys, monkeypatch):
    d = small_files
    monkeypatch.setattr(cli, "BUNDLES_DIR", d / "bundles")
    args = ["register", "--fixed", d / "a.nii.gz", "--moving", d / "b.nii.gz", "--output_dir", d / "o",
            "--io_iterations", 0, "--noauto_masks"]
    code, _, err = run(args, capsys)
    assert code == 2 and "default weights for --modality ct are missing" in err and "convert-weights" in err
    models = d / "bundles" / "gradicon_lung" / "models"
    models.mkdir(parents=True)
    (models / "model.pt").write_bytes(open(slim_weights, "rb").read())
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert "Using the default weights for --modality ct" in err and "shape (24, 24, 24) in the reference" in err


def test_convert_weights_and_released_file_directly(small_files, capsys):
    from monai_gradicon.networks.registration import gradicon_network
    from monai_gradicon.weights import network_to_official_state

    d = small_files
    torch.manual_seed(0)
    net = gradicon_network(1, 3)
    with torch.no_grad():
        net.steps[0].unet.lastConv.weight.normal_(0, 1e-3)
    torch.save(network_to_official_state(net), d / "released.trch")
    # an unrecognised release name leaves the card's shape and preprocessing open: state them once, here
    code, _, err = run(["convert-weights", "--input", d / "released.trch", "--output", d / "ours.pt",
                        "--input_shape", SLIM_SHAPE, "--preprocessing", "lung_ct"], capsys)
    assert code == 0 and "1-step 3D" in err and "sha256" in err, err
    converted = torch.load(d / "ours.pt", weights_only=True)
    assert all(torch.equal(v, converted["network." + k]) for k, v in net.state_dict().items() if k != "model_card")
    code, _, err = run(["convert-weights", "--input", d / "released.trch", "--output", d / "ours.pt"], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run(["convert-weights", "--input", d / "released.trch", "--output", d / "released.trch",
                        "--overwrite"], capsys)
    assert code == 2 and "is the input file" in err
    outs = {}
    for name in ("released.trch", "ours.pt"):
        extra = ["--input_shape", SLIM_SHAPE, "--preprocess", "lung_ct"] if name.endswith(".trch") else []
        code, _, err = run(["register", "--fixed", d / "a.nii.gz", "--moving", d / "b.nii.gz", "--output_dir",
                            d / name.split(".")[0], "--weights", d / name, "--io_iterations", 0, "--nooverview",
                            "--noinverse", "--noauto_masks", *extra], capsys)
        assert code == 0, err
        outs[name] = np.asarray(nib.load(d / name.split(".")[0] / "displacement_mm.nii.gz").dataobj)
    assert np.abs(outs["ours.pt"]).max() > 1e-3
    np.testing.assert_array_equal(outs["released.trch"], outs["ours.pt"])


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "monai_gradicon", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PAGER": "cat"}, timeout=120)
    assert proc.returncode == 0
    shown = proc.stdout + proc.stderr  # fire writes help to stderr when not on a terminal
    assert all(c in shown for c in ("register", "warp", "evaluate", "convert-weights"))
    proc = subprocess.run([sys.executable, "-m", "monai_gradicon", "register", "--fixed", "/nonexistent.nii.gz",
                           "--moving", "/nonexistent2.nii.gz", "--output_dir", "/tmp/never"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: The fixed image file does not exist")
    assert "Traceback" not in proc.stderr


def test_2d_jpeg_slices(shared_data, tmp_path, capsys):
    """Two real 2D brain slices (JPEG, read through MONAI LoadImage) with a 2D checkpoint."""
    from monai_gradicon.networks.registration import gradicon_network

    net = gradicon_network(1, 2, preprocessing="brain", modality="mri", down_channels=(8, 16, 16, 32, 32),
                           up_channels=(8, 16, 16, 16, 16))
    with torch.no_grad():
        net.steps[0].unet.lastConv.weight.normal_(0, 1e-3)
    save_weights(net, tmp_path / "net2d.pt")
    slices = os.path.join(shared_data, "antspy")
    code, _, err = run(["register", "--fixed", os.path.join(slices, "r16slice.jpg"), "--moving",
                        os.path.join(slices, "r64slice.jpg"), "--output_dir", tmp_path / "o", "--modality", "mri",
                        "--weights", tmp_path / "net2d.pt", "--input_shape", 32, "--io_iterations", 1,
                        "--noprogress"], capsys)
    assert code == 0, err
    assert nib.load(tmp_path / "o" / "displacement_mm.nii.gz").shape == (256, 256, 1, 1, 2)
    assert nib.load(tmp_path / "o" / "warped_moving.nii.gz").shape == (256, 256)
    code, stdout, err = run(["evaluate", "--transform_dir", tmp_path / "o"], capsys)
    assert code == 0 and "folds" in stdout, err
    # a 3D image with the 2D transform is a clear error
    write_nifti(tmp_path / "vol.nii.gz", np.random.rand(8, 8, 8).astype(np.float32), np.eye(4))
    code, _, err = run(["warp", "--transform_dir", tmp_path / "o", "--image", tmp_path / "vol.nii.gz",
                        "--output", tmp_path / "w.nii.gz"], capsys)
    assert code == 2 and "3D but the transform is 2D" in err


def test_automatic_lung_masks_on_real_ct(shared_data, slim_weights, tmp_path, capsys):
    """No masks given with lung weights: lung masks are computed, used and written next to the results; an image
    that is not a chest CT is a clear error unless --noauto_masks."""
    lungs = os.path.join(shared_data, "lung_ct_pyradiomics")
    out = tmp_path / "auto"
    code, _, err = run(["register", "--fixed", os.path.join(lungs, "lung1_image.nrrd"), "--moving",
                        os.path.join(lungs, "lung2_image.nrrd"), "--output_dir", out, "--weights", slim_weights,
                        "--io_iterations", 0, "--nooverview", "--noinverse", "--noprogress"], capsys)
    assert code == 0, err
    assert "computing automatic lung masks" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["masks"]["fixed"].startswith("automatic lung mask") and summary["settings"]["auto_masks"]
    for name in ("fixed", "moving"):
        mask = nib.load(out / f"{name}_lung_mask.nii.gz")
        assert mask.shape == read_image(os.path.join(lungs, f"lung{1 if name == 'fixed' else 2}_image.nrrd")).shape
        assert 1000 < summary["masks"]["automatic"][name]["volume_ml"] < 9000
        assert np.asarray(mask.dataobj).max() == 1
    brain = os.path.join(shared_data, "brain_mni152_2009a_sym", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    code, _, err = run(["register", "--fixed", brain, "--moving", brain, "--output_dir", tmp_path / "brain",
                        "--weights", slim_weights, "--io_iterations", 0, "--noprogress"], capsys)
    assert code == 2 and "does not look like a CT" in err and not (tmp_path / "brain").exists()
