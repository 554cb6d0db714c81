"""Hostile inputs through the command line: every case gets a one-line ``error: ...`` naming the problem, the
documented exit status, and no file written. ``docs/hostile_inputs.md`` is the table of these cases (a test checks
that it lists every one of them).

Exit status: 2 for bad input (before any work), 3 for a result that is not finite (nothing written).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_gradicon.cli import main
from monai_gradicon.io import write_nifti
from monai_gradicon.weights import network_to_official_state, save_weights
from test_instance_optimization import slim_network

DOC = Path(__file__).resolve().parents[1] / "docs" / "hostile_inputs.md"


class Evil:
    """A pickle that would run code when loaded without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    vol = (rng.normal(size=(20, 22, 18)) * 300 - 500).astype(np.float32)
    aff = np.diag([1.5, 1.5, 2.0, 1.0])
    write_nifti(d / "a.nii.gz", vol, aff)
    write_nifti(d / "b.nii.gz", vol[::-1].copy(), np.diag([1.2, 1.5, 2.0, 1.0]))
    write_nifti(d / "flat.nii.gz", rng.random((20, 22)).astype(np.float32), np.eye(4))
    nan = vol.copy()
    nan[1, 2, 3] = np.nan
    write_nifti(d / "nan.nii.gz", nan, aff)
    write_nifti(d / "const.nii.gz", np.zeros((20, 22, 18), np.float32), aff)
    write_nifti(d / "time.nii.gz", rng.random((20, 22, 18, 3)).astype(np.float32), aff)
    write_nifti(d / "thin.nii.gz", rng.random((1, 22, 18)).astype(np.float32), aff)
    rgb = np.zeros((20, 22, 18), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, aff), str(d / "rgb.nii.gz"))
    (d / "truncated.nii.gz").write_bytes(open(d / "a.nii.gz", "rb").read()[:200])
    (d / "empty.nii.gz").write_bytes(b"")
    (d / "text.nii").write_text("not an image")
    write_nifti(d / "small_mask.nii.gz", np.ones((5, 5, 5), np.uint8), aff)
    write_nifti(d / "empty_mask.nii.gz", np.zeros((20, 22, 18), np.uint8), aff)
    nan_mask = np.ones((20, 22, 18), np.float32)
    nan_mask[0, 0, 0] = np.nan
    write_nifti(d / "nan_mask.nii.gz", nan_mask, aff)
    write_nifti(d / "labels_float.nii.gz", vol / 7.0, aff)
    write_nifti(d / "vol2d.nii.gz", rng.random((8, 8)).astype(np.float32), np.eye(4))
    (d / "a_file").write_text("a file, not a folder")

    torch.manual_seed(0)
    save_weights(slim_network(1, (24, 24, 24), preprocessing="lung_ct", modality="ct"), d / "w.pt")
    (d / "junk.pt").write_bytes(b"not a torch file")
    with open(d / "evil.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    cardless = {k: v for k, v in slim_network(1, (24, 24, 24)).state_dict().items() if k != "model_card"}
    torch.save(cardless, d / "cardless.pt")
    nan_net = slim_network(1, (24, 24, 24), preprocessing="lung_ct")
    with torch.no_grad():
        nan_net.steps[0].unet.lastConv.bias.fill_(float("nan"))
    save_weights(nan_net, d / "nan_weights.pt")
    official = network_to_official_state(slim_network(1, (24, 24, 24)))
    official.pop(next(k for k in official if k.endswith("lastConv.bias")))
    torch.save(official, d / "lung_model_weights_step_2.trch")
    torch.save({"net.lastConv.weight": torch.tensor(1.0)}, d / "scalar.trch")
    brain_card = slim_network(1, (24, 24, 24), preprocessing="brain", modality="mri")
    save_weights(brain_card, d / "brain.pt")

    # a finished result folder (2 voxels of work: fast) for warp / evaluate
    code = main(["register", "--fixed", d / "a.nii.gz", "--moving", d / "b.nii.gz", "--output_dir", d / "result",
                 "--weights", d / "w.pt", "--io_iterations", "0", "--noauto_masks", "--nooverview", "--noprogress"])
    assert code == 0
    np.savetxt(d / "f.csv", [[5, 5, 5], [10, 12, 8]], delimiter=",")
    np.savetxt(d / "m.csv", [[6, 5, 5], [10, 11, 8]], delimiter=",")
    np.savetxt(d / "far.csv", [[5, 5, 5], [10, 12, 90]], delimiter=",")
    (d / "header.csv").write_text("point id,x,y,z\n1,5,5,5\n2,10,12,8\n")
    (d / "binary.csv").write_bytes(bytes(range(256)))
    (d / "one.csv").write_text("1,2\n")
    write_nifti(d / "fixed_labels_other_grid.nii.gz", np.ones((10, 10, 10), np.uint8), aff)
    (d / "bundle" / "models").mkdir(parents=True)
    (d / "notabundle").mkdir()
    (d / "bundle" / "configs").mkdir()
    (d / "bundle" / "configs" / "metadata.json").write_text(json.dumps(
        {"model_card": {"axis_order": "reference", "preprocessing": "lung_ct", "modality": "ct"}}))
    return d


def R(d, *extra, fixed="a.nii.gz", moving="b.nii.gz", out="out", weights="w.pt"):
    """A register command on the fixture's files."""
    args = ["register"]
    if fixed is not None:
        args += ["--fixed", d / fixed]
    if moving is not None:
        args += ["--moving", d / moving]
    if out is not None:
        args += ["--output_dir", d / out if out else ""]
    if weights is not None:
        args += ["--weights", d / weights]
    return args + ["--io_iterations", "0", "--noauto_masks", "--noprogress", *extra]


def W(d, *extra, image="b.nii.gz", output="warped.nii.gz", tdir="result"):
    return ["warp", "--transform_dir", d / tdir, "--image", d / image, "--output", d / output, *extra]


def E(d, *extra):
    return ["evaluate", "--transform_dir", d / "result", *extra]


def C(d, *extra):
    return ["convert-weights", *extra]


# (case id, what the user did, command, exit status, what the message must say)
CASES = [
    ("register-missing-fixed", "no --fixed", lambda d: R(d, fixed=None), 2, "--fixed is required"),
    ("register-fixed-not-found", "fixed file does not exist", lambda d: R(d, fixed="nope.nii.gz"), 2,
     "fixed image file does not exist"),
    ("register-fixed-is-directory", "a directory as --fixed", lambda d: R(d, fixed="result"), 2, "is a directory"),
    ("register-truncated", "truncated gzip file", lambda d: R(d, moving="truncated.nii.gz"), 2,
     "Cannot read the moving image"),
    ("register-empty-file", "0-byte file", lambda d: R(d, moving="empty.nii.gz"), 2, "Cannot read the moving image"),
    ("register-not-an-image", "a text file named .nii", lambda d: R(d, moving="text.nii"), 2, "Cannot read the moving"),
    ("register-2d-vs-3d", "2D moving, 3D fixed", lambda d: R(d, moving="flat.nii.gz"), 2, "both must be 2D or both 3D"),
    ("register-nan-voxel", "a NaN voxel", lambda d: R(d, fixed="nan.nii.gz"), 2, "contains 1 NaN or infinite voxel"),
    ("register-constant", "a constant image", lambda d: R(d, moving="const.nii.gz"), 2, "is constant"),
    ("register-rgb", "an RGB NIfTI", lambda d: R(d, moving="rgb.nii.gz"), 2, "colour/RGB"),
    ("register-4d", "a 4D time series", lambda d: R(d, moving="time.nii.gz"), 2, "multi-channel or time-series"),
    ("register-one-voxel-axis", "an axis of one voxel in a 3D header", lambda d: R(d, moving="thin.nii.gz"), 2,
     "every spatial axis needs at least 2 voxels"),
    ("register-mask-wrong-grid", "fixed mask on another grid",
     lambda d: R(d, "--fixed_mask", d / "small_mask.nii.gz"), 2, "fixed mask has shape"),
    ("register-mask-empty", "an empty fixed mask", lambda d: R(d, "--fixed_mask", d / "empty_mask.nii.gz"), 2,
     "fixed mask is empty"),
    ("register-mask-nan", "a mask with NaN", lambda d: R(d, "--fixed_mask", d / "nan_mask.nii.gz"), 2,
     "fixed mask contains NaN"),
    ("register-flag-typo", "--fixed_msk (typo)", lambda d: R(d, "--fixed_msk", d / "a.nii.gz"), 2,
     "did you mean --fixed_mask?"),
    ("register-unknown-flag", "an unknown flag", lambda d: R(d, "--foo", "1"), 2, "unknown flag --foo"),
    ("register-removed-flag", "a flag of an older release", lambda d: R(d, "--reference_axis_order"), 2,
     "unknown flag --reference_axis_order"),
    ("register-bad-modality", "--modality pet", lambda d: R(d, "--modality", "pet"), 2, "--modality must be one of"),
    ("register-modality-vs-card", "--modality mri with CT weights", lambda d: R(d, "--modality", "mri"), 2,
     "the model card of"),
    ("register-preprocess-vs-card", "--preprocess brain with lung weights", lambda d: R(d, "--preprocess", "brain"),
     2, "the card says 'lung_ct', you asked for 'brain'"),
    ("register-unknown-preprocess", "--preprocess ct", lambda d: R(d, "--preprocess", "ct"), 2,
     "--preprocess must be one of"),
    ("register-bad-shape", "--input_shape abc", lambda d: R(d, "--input_shape", "abc"), 2,
     "--input_shape must be sizes"),
    ("register-shape-vs-card", "--input_shape 8,8,8 with 24^3 weights", lambda d: R(d, "--input_shape", "8,8,8"),
     2, "input_shape: the card says"),
    ("register-negative-io", "--io_iterations -1", lambda d: R(d)[:-4] + ["--io_iterations", "-1"], 2,
     "--io_iterations must be a whole number >= 0"),
    ("register-text-io", "--io_iterations abc", lambda d: R(d)[:-4] + ["--io_iterations", "abc"], 2,
     "--io_iterations must be a whole number"),
    ("register-bad-lr", "--io_lr abc", lambda d: R(d, "--io_lr", "abc"), 2, "--io_lr must be a positive number"),
    ("register-zero-lr", "--io_lr 0", lambda d: R(d, "--io_lr", "0"), 2, "--io_lr must be a positive number"),
    ("register-bad-seed", "--seed abc", lambda d: R(d, "--seed", "abc"), 2, "--seed must be a whole number"),
    ("register-bad-orientation", "--orientation lps", lambda d: R(d, "--orientation", "lps"), 2,
     "--orientation must be one of"),
    ("register-bad-scheme", "--transform_scheme spline", lambda d: R(d, "--transform_scheme", "spline"), 2,
     "--transform_scheme must be one of"),
    ("register-bad-padding", "--padding_mode reflect", lambda d: R(d, "--padding_mode", "reflect"), 2,
     "--padding_mode must be one of"),
    ("register-bad-device", "--device tpu", lambda d: R(d, "--device", "tpu"), 2, "Unknown device"),
    ("register-no-cuda", "--device cuda without CUDA", lambda d: R(d, "--device", "cuda"), 2,
     "CUDA is not available"),
    ("register-switch-value", "--inverse maybe", lambda d: R(d, "--inverse", "maybe"), 2, "is a switch"),
    ("register-empty-output", "--output_dir ''", lambda d: R(d, out=""), 2, "--output_dir is empty"),
    ("register-output-is-file", "--output_dir names a file", lambda d: R(d, out="a_file"), 2,
     "exists and is not a directory"),
    ("register-output-holds-input", "--output_dir holds the fixed image", lambda d: R(d, out="."), 2,
     "contains the input file"),
    ("register-output-has-results", "a previous result, no --overwrite", lambda d: R(d, out="result"), 2,
     "--overwrite"),
    ("register-output-foreign-files", "--overwrite on a folder with other files", lambda d: R(d, "--overwrite",
                                                                                              out="bundle"),
     2, "not a complete monai_gradicon result"),
    ("register-missing-weights", "--weights does not exist", lambda d: R(d, weights="nope.pt"), 2,
     "weight file does not exist"),
    ("register-junk-weights", "--weights is not a torch file", lambda d: R(d, weights="junk.pt"), 2,
     "Cannot read"),
    ("register-code-pickle", "--weights runs code when unpickled", lambda d: R(d, weights="evil.pt"), 2,
     "weights-only"),
    ("register-cardless-weights", "weights written before model cards", lambda d: R(d, weights="cardless.pt"), 2,
     "no model card"),
    ("register-nan-weights", "weights holding NaN", lambda d: R(d, weights="nan_weights.pt"), 2, "non-finite"),
    ("register-released-missing-key", "a released file missing a tensor",
     lambda d: R(d, weights="lung_model_weights_step_2.trch"), 2, "missing keys"),
    ("register-scalar-tensor", "a released-layout file with a scalar tensor", lambda d: R(d, weights="scalar.trch"),
     2, "lacks the UNet tensor"),
    ("register-bad-outputs", "--outputs ddf,foo", lambda d: R(d, "--outputs", "ddf,foo"), 2,
     "--outputs must be a comma-separated list"),
    ("register-memory-limit", "a registration above --memory_limit_gb",
     lambda d: R(d, "--memory_limit_gb", "0.01"), 2, "predicted peak memory"),
    ("register-non-ct-auto-mask", "lung weights, a non-CT image, no masks",
     lambda d: [a for a in R(d, fixed="labels_float.nii.gz", moving="labels_float.nii.gz") if a != "--noauto_masks"], 2,
     "does not look like a CT"),
    ("register-diverging-io", "instance optimization with --io_lr 1e6",
     lambda d: R(d, out="io_out")[:-4] + ["--io_iterations", "3", "--io_lr", "1e6", "--noauto_masks"], 3,
     "Instance optimization diverged"),
    ("warp-output-is-directory", "warp --output names a directory", lambda d: W(d, "--overwrite", output="bundle"),
     2, "must be a file name ending in"),
    ("warp-output-directory-nii", "warp --output is a directory called x.nii.gz",
     lambda d: W(d, "--overwrite", output="dir.nii.gz"), 2, "is a directory"),
    ("warp-output-is-input", "warp --output is the image to warp",
     lambda d: W(d, "--overwrite", output="b.nii.gz"), 2, "is one of the inputs"),
    ("warp-output-in-result", "warp --output inside the result folder",
     lambda d: W(d, "--overwrite", output="result/warped_moving.nii.gz"), 2, "inside the result folder"),
    ("warp-output-suffix", "warp --output without .nii/.nii.gz", lambda d: W(d, output="w.png"), 2,
     "must be a file name ending in"),
    ("warp-float-labels", "warp --labels on an intensity image", lambda d: W(d, "--labels", image="labels_float.nii.gz"),
     2, "non-integer values"),
    ("warp-missing-result", "warp with a folder that does not exist", lambda d: W(d, tdir="nope"), 2,
     "transform directory does not exist"),
    ("warp-dimension", "warp a 2D image with a 3D transform", lambda d: W(d, image="vol2d.nii.gz", output="w2.nii.gz"),
     2, "2D but the transform is 3D"),
    ("evaluate-no-frame", "landmarks without --landmarks_in",
     lambda d: E(d, "--fixed_landmarks", d / "f.csv", "--moving_landmarks", d / "m.csv"), 2, "landmark frame"),
    ("evaluate-bad-frame", "--landmarks_in xyz",
     lambda d: E(d, "--fixed_landmarks", d / "f.csv", "--moving_landmarks", d / "m.csv", "--landmarks_in", "xyz"), 2,
     "--landmarks_in must be one of"),
    ("evaluate-binary-landmarks", "a binary file as landmarks",
     lambda d: E(d, "--fixed_landmarks", d / "binary.csv", "--moving_landmarks", d / "m.csv", "--landmarks_in",
                 "voxel"), 2, "binary.csv is not a text landmark file"),
    ("evaluate-short-rows", "landmark rows with 2 values",
     lambda d: E(d, "--fixed_landmarks", d / "one.csv", "--moving_landmarks", d / "m.csv", "--landmarks_in", "voxel"),
     2, "expected 3 values"),
    ("evaluate-outside", "a landmark outside the image",
     lambda d: E(d, "--fixed_landmarks", d / "far.csv", "--moving_landmarks", d / "m.csv", "--landmarks_in", "voxel"),
     2, "outside the image"),
    ("evaluate-index-base", "--index_base 2",
     lambda d: E(d, "--fixed_landmarks", d / "f.csv", "--moving_landmarks", d / "m.csv", "--landmarks_in", "voxel",
                 "--index_base", "2"), 2, "--index_base must be 0 or 1"),
    ("evaluate-one-side", "only fixed landmarks", lambda d: E(d, "--fixed_landmarks", d / "f.csv", "--landmarks_in",
                                                              "voxel"), 2, "Give both"),
    ("evaluate-output-is-input", "--output is a landmark file",
     lambda d: E(d, "--fixed_landmarks", d / "f.csv", "--moving_landmarks", d / "m.csv", "--landmarks_in", "voxel",
                 "--output", d / "f.csv", "--overwrite"), 2, "must be a file name ending in .json"),
    ("evaluate-output-in-result", "--output is the result's summary.json",
     lambda d: E(d, "--output", d / "result" / "summary.json", "--overwrite"), 2, "inside the result folder"),
    ("evaluate-labels-other-grid", "fixed labels on another grid",
     lambda d: E(d, "--fixed_labels", d / "fixed_labels_other_grid.nii.gz", "--moving_labels", d / "b.nii.gz"), 2,
     "not on the fixed image's grid"),
    ("convert-output-exists", "convert onto an existing file",
     lambda d: C(d, "--input", d / "w.pt", "--output", d / "cardless.pt"), 2, "already exists"),
    ("convert-output-is-input", "convert onto its input, with --overwrite",
     lambda d: C(d, "--input", d / "w.pt", "--output", d / "w.pt", "--overwrite"), 2, "is the input file"),
    ("convert-not-a-bundle", "--bundle_dir without configs/metadata.json",
     lambda d: C(d, "--input", d / "w.pt", "--bundle_dir", d / "notabundle"), 2, "is not a bundle folder"),
    ("convert-cardless", "a file without card and no --axis_order etc.",
     lambda d: C(d, "--input", d / "cardless.pt", "--output", d / "new.pt"), 2, "has no model card; state how"),
    ("convert-output-directory", "--output is a directory",
     lambda d: C(d, "--input", d / "w.pt", "--output", d / "bundle"), 2, "is a directory"),
    ("convert-wrong-bundle", "brain weights into a lung bundle",
     lambda d: C(d, "--input", d / "brain.pt", "--bundle_dir", d / "bundle"), 2, "the card says 'brain'"),
    ("convert-both-targets", "--output and --bundle_dir",
     lambda d: C(d, "--input", d / "w.pt", "--output", d / "x.pt", "--bundle_dir", d / "bundle"), 2,
     "exactly one of --output and --bundle_dir"),
]


@pytest.mark.parametrize("case,what,command,status,message", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(files, capsys, case, what, command, status, message):
    (files / "dir.nii.gz").mkdir(exist_ok=True)
    before = sorted(p.name for p in files.iterdir())
    code = main([str(a) for a in command(files)])
    err = capsys.readouterr().err
    assert code == status, (case, err)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert lines and message in err, (case, err)
    assert "Traceback" not in err
    assert sorted(p.name for p in files.iterdir()) == before, f"{case} left files behind"


def test_the_table_of_hostile_cases_is_documented():
    text = DOC.read_text(encoding="utf-8")
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in text]
    assert not missing, f"docs/hostile_inputs.md does not list {missing}"
    assert len(CASES) >= 60
