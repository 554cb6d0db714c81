"""The registration methods and instance-optimization options on the command line: ``--method optimize`` (no
network), ``--io_method fields``, ``--io_sim`` / ``--io_mask_loss`` / ``--io_dice_weight``, and their refusals before
any work. The numerics behind each option are tested where they live (tests/test_register_optimize.py,
tests/test_field_optimization.py, tests/test_io_options.py); here: the flags reach the pipeline and the summary says
what ran."""

import json
import os

import pytest
from test_cli import SLIM_SHAPE, lung_files, run, slim_weights  # noqa: F401 (fixtures)

from monai_gradicon.field_optimization import DEFAULT_LMBDA
from monai_gradicon.pipeline import OUTPUT_FILES


def summary_of(folder):
    return json.loads((folder / OUTPUT_FILES["summary"]).read_text())


def test_optimize_needs_no_weights(lung_files, capsys):  # noqa: F811
    out = lung_files / "optimized"
    code, _, err = run(["register", "--fixed", lung_files / "fixed.nii.gz", "--moving", lung_files / "moving.nrrd",
                        "--output_dir", out, "--method", "optimize", "--opt_levels", 2, "--opt_iterations", "8,4",
                        "--noprogress"], capsys)
    assert code == 0, err
    assert "No network (--method optimize)" in err and "optimize" in err.split("Done in", 1)[1]
    summary = summary_of(out)
    settings = summary["settings"]
    assert settings["method"] == "optimize" and settings["preprocessing"] == "unigradicon_ct"  # --modality ct
    assert settings["input_shape"] == [40, 40, 30]  # the fixed image's own grid (under the 175 cap)
    assert settings["field_optimization"]["iterations"] == [8, 4] and settings["field_optimization"]["levels"] == 2
    assert summary["model_card"] is None and summary["weights"] is None
    assert OUTPUT_FILES["inverse_displacement"] in os.listdir(out)


def test_field_io_and_weights_io_options(lung_files, slim_weights, capsys):  # noqa: F811
    common = ["--fixed", lung_files / "fixed.nii.gz", "--moving", lung_files / "moving.nrrd", "--weights",
              slim_weights, "--input_shape", SLIM_SHAPE, "--noprogress", "--noauto_masks", "--nooverview"]
    code, _, err = run(["register", *common, "--output_dir", lung_files / "fields", "--io_method", "fields",
                        "--io_iterations", 3], capsys)
    assert code == 0, err
    settings = summary_of(lung_files / "fields")["settings"]
    assert settings["io_method"] == "fields" and settings["io_lr"] == 0.05  # the fields' default rate
    assert settings["field_optimization"]["iterations"] == [3]
    assert settings["field_optimization"]["lambda"] == DEFAULT_LMBDA  # resolved where the options are checked
    code, _, err = run(["register", *common, "--output_dir", lung_files / "mind", "--io_sim", "mind",
                        "--io_iterations", 2, "--io_lr", 1e-3], capsys)
    assert code == 0, err
    summary = summary_of(lung_files / "mind")
    assert summary["settings"]["io_method"] == "weights" and summary["settings"]["io_lr"] == 1e-3
    assert summary["io_objective"] == {"similarity": "mind", "loss_masking": False, "dice_weight": 0.0}


def test_segmentation_dice_and_loss_masking(lung_files, slim_weights, capsys):  # noqa: F811
    out = lung_files / "dice"
    code, _, err = run(["register", "--fixed", lung_files / "fixed.nii.gz", "--moving", lung_files / "moving.nrrd",
                        "--weights", slim_weights, "--input_shape", SLIM_SHAPE, "--noprogress", "--noauto_masks",
                        "--nooverview", "--output_dir", out, "--io_iterations", 2, "--io_lr", 1e-3,
                        "--fixed_mask", lung_files / "fixed_labels.nii.gz",
                        "--moving_mask", lung_files / "moving_labels.nii.gz", "--io_mask_loss",
                        "--fixed_segmentation", lung_files / "fixed_labels.nii.gz",
                        "--moving_segmentation", lung_files / "moving_labels.nii.gz", "--io_dice_weight", 0.5],
                       capsys)
    assert code == 0, err
    assert summary_of(out)["io_objective"] == {"similarity": "lncc", "loss_masking": True, "dice_weight": 0.5}


@pytest.mark.parametrize("extra, message", [
    (["--method", "optimize", "--weights", "WEIGHTS"], "leave out --weights"),
    (["--method", "optimize", "--io_iterations", 3], "--opt_iterations"),
    (["--method", "optimise"], "--method must be one of"),
    (["--method", "optimize", "--opt_iterations", "5,0"], "at least one step"),
    (["--method", "optimize", "--opt_levels", 6], "too many"),
    (["--method", "optimize", "--opt_lambda", -1], "opt_lambda"),
    (["--method", "optimize", "--opt_similarity", "mind"], "opt_similarity"),
    (["--weights", "WEIGHTS", "--io_sim", "mind", "--io_iterations", 0], "there is none here"),
    (["--weights", "WEIGHTS", "--io_sim", "mind", "--io_method", "fields"], "--opt_similarity"),
    (["--weights", "WEIGHTS", "--io_sim", "ssd"], "--io_sim must be one of"),
    (["--weights", "WEIGHTS", "--io_mask_loss"], "needs both --fixed_mask and --moving_mask"),
    (["--weights", "WEIGHTS", "--io_dice_weight", 1.0], "needs both --fixed_segmentation"),
    (["--weights", "WEIGHTS", "--io_mask_loss", "--prealign", "rigid", "--fixed_mask", "FIXED", "--moving_mask",
      "FIXED"], "cannot be combined with --prealign"),
    (["--weights", "WEIGHTS", "--io_method", "everything"], "--io_method must be one of"),
])
def test_refused_before_any_work(lung_files, slim_weights, capsys, extra, message):  # noqa: F811
    out = lung_files / "refused"
    fixed = str(lung_files / "fixed.nii.gz")
    extra = [slim_weights if a == "WEIGHTS" else fixed if a == "FIXED" else a for a in extra]
    code, _, err = run(["register", "--fixed", fixed, "--moving", lung_files / "moving.nrrd", "--output_dir", out,
                        "--input_shape", SLIM_SHAPE if "--weights" in extra else "40,40,30", "--noprogress",
                        *extra], capsys)
    assert code == 2 and message in err, err
    assert not out.exists()


def test_batch_io_mask_loss_needs_masks_for_every_pair_before_any_work(lung_files, slim_weights, capsys):  # noqa: F811
    pairs = lung_files / "pairs.csv"
    pairs.write_text("fixed,moving,name\nfixed.nii.gz,moving.nrrd,first\n")
    out = lung_files / "batch_refused"
    code, _, err = run(["register-batch", "--pairs", pairs, "--output_dir", out, "--weights", slim_weights,
                        "--input_shape", SLIM_SHAPE, "--io_iterations", 2, "--io_mask_loss"], capsys)
    assert code == 2 and "--io_mask_loss needs both masks for every pair" in err and "first" in err, err
    assert not (out / "first").exists()
