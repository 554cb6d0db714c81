"""Evaluation on the command line: ``export --format learn2reg``, ``evaluate-learn2reg`` and ``register --qc``.

The exported field is checked independently: ``scipy.ndimage.map_coordinates`` of the moving image at ``x + d(x)``
(the Learn2Reg convention) must give the warped image ``register`` wrote. The CLI's metrics must be the Python
evaluator's (tests/test_learn2reg.py checks that one against the official formulas)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from test_cli import run
from test_learn2reg import make_dataset
from test_instance_optimization import slim_network

from monai_gradicon.pipeline import OUTPUT_FILES
from monai_gradicon.pipeline.learn2reg import evaluate_learn2reg, read_learn2reg_pairs
from monai_gradicon.pipeline.qc import QC_FILES
from monai_gradicon.weights import save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random.pt"
    net = slim_network(1, (24, 24, 24), 0, preprocessing="none")
    with torch.no_grad():
        net.steps[0].unet.lastConv.weight.normal_(0.0, 2e-3)  # a non-trivial transform
    save_weights(net, path)
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, weights):
    """The small Learn2Reg layout of tests/test_learn2reg.py, every pair registered by register-batch."""
    root = tmp_path_factory.mktemp("l2r")
    dataset_json = make_dataset(root / "data")
    code = run_quiet(["register-batch", "--dataset_json", dataset_json, "--output_dir", root / "pred",
                      "--weights", weights, "--io_iterations", 0, "--nooverview", "--device", "cpu"])
    assert code == 0
    return root, dataset_json


def run_quiet(args):
    from monai_gradicon.cli import main

    return main([str(a) for a in args])


def test_export_is_the_map_coordinates_field(dataset, capsys):
    root, dataset_json = dataset
    _, pairs = read_learn2reg_pairs(dataset_json, "validation")
    result = root / "pred" / pairs[0].field_stems[0]
    out = root / "exported" / pairs[0].field_name()
    out.parent.mkdir(exist_ok=True)
    code, _, err = run(["export", "--transform_dir", result, "--output", out, "--format", "learn2reg"], capsys)
    assert code == 0, err
    d = np.moveaxis(np.asarray(nib.load(str(out)).dataobj, dtype=np.float64), -1, 0)  # [3, X, Y, Z] voxels
    moving = np.asarray(nib.load(str(root / "data" / pairs[0].moving)).dataobj, dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in d.shape[1:]], indexing="ij"))
    points = grid + d
    warped = ndimage.map_coordinates(moving, points, order=1, mode="nearest")
    ours = np.asarray(nib.load(str(result / OUTPUT_FILES["warped"])).dataobj, dtype=np.float64)
    inside = np.all((points > 0) & (points < np.array(moving.shape).reshape(3, 1, 1, 1) - 1), axis=0)
    assert inside.mean() > 0.5
    # both interpolate linearly at the same points; the points differ by float32 rounding of world coordinates
    np.testing.assert_allclose(warped[inside], ours[inside], rtol=0, atol=1e-4 * np.ptp(moving))
    # refused: an existing file without --overwrite, a field inside the result folder, an unknown format
    for extra, message in ((["--output", out], "already exists"),
                           (["--output", result / "disp.nii.gz"], "inside the result folder"),
                           (["--output", root / "x.nii.gz", "--format", "itk"], "--format must be one of")):
        code, _, err = run(["export", "--transform_dir", result, *extra], capsys)
        assert code == 2 and message in err, err


def test_evaluate_learn2reg_command_is_the_python_evaluator(dataset, capsys):
    root, dataset_json = dataset
    out = root / "metrics"
    args = ["evaluate-learn2reg", "--dataset_json", dataset_json, "--predictions", root / "pred", "--output_dir", out,
            "--metrics", "tre,dice,sdlogj,ndv", "--labels", "1-2", "--noprogress"]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert "TRE_mm: mean" in stdout
    written = json.loads((out / "metrics.json").read_text())
    expected = evaluate_learn2reg(dataset_json, root / "pred", metrics=("tre", "dice", "sdlogj", "ndv"),
                                  labels=[1, 2])
    assert set(written["cases"]) == set(expected.cases)
    for column, agg in expected.aggregates.items():
        assert written["aggregates"][column]["mean"] == pytest.approx(agg["mean"], rel=1e-12, abs=1e-12), column
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("case,fixed,moving")
    code, _, err = run(args, capsys)
    assert code == 2 and "already exists" in err  # nothing replaced without --overwrite
    code, _, err = run(args[:-5] + ["--noprogress"], capsys)
    assert code == 2 and "--metrics is required" in err


def test_register_qc_report(dataset, weights, capsys):
    root, dataset_json = dataset
    _, pairs = read_learn2reg_pairs(dataset_json, "validation")
    fixed, moving = root / "data" / pairs[1].fixed, root / "data" / pairs[1].moving
    out = root / "qc_result"
    args = ["register", "--fixed", fixed, "--moving", moving, "--output_dir", out, "--weights", weights,
            "--io_iterations", 0, "--qc", "--noprogress"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    files = set(os.listdir(out))
    assert set(QC_FILES.values()) <= files
    summary = json.loads((out / OUTPUT_FILES["summary"]).read_text())
    assert set(QC_FILES.values()) <= set(summary["outputs"])
    qc = json.loads((out / QC_FILES["summary"]).read_text())
    assert "<img" in (out / QC_FILES["report"]).read_text()
    error = np.asarray(nib.load(str(out / QC_FILES["error_map"])).dataobj)
    assert error.shape == nib.load(str(fixed)).shape and np.isfinite(error).all() and error.max() > 0
    assert json.dumps(qc)  # JSON-able statistics
    code, _, err = run(args + ["--overwrite"], capsys)  # a folder with a QC report is a complete result
    assert code == 0, err
    code, _, err = run(["register", "--fixed", fixed, "--moving", moving, "--output_dir", root / "qc2", "--weights",
                        weights, "--io_iterations", 0, "--qc", "--noinverse"], capsys)
    assert code == 2 and "--qc" in err and not (root / "qc2").exists()


def test_register_batch_writes_learn2reg_predictions(dataset):
    root, dataset_json = dataset
    _, pairs = read_learn2reg_pairs(dataset_json, "validation")
    assert all((root / "pred" / p.field_stems[0] / OUTPUT_FILES["displacement"]).is_file() for p in pairs)
