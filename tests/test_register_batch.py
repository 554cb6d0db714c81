"""register-batch: many pairs, one model, a folder per pair, a summary table; a failing pair loses nothing else; a bad
list is refused before any work; --device on every command that computes."""

import csv
import inspect
import json
import os
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import test_cli
from test_cli import SLIM_SHAPE, run

from monai_gradicon import cli
from monai_gradicon.io import write_nifti
from monai_gradicon.pipeline.batch import (
    COLUMNS,
    BatchListError,
    BatchPair,
    plan_batch,
    read_pair_list,
    run_batch,
)
from monai_gradicon.pipeline.result import is_complete_result

slim_weights = test_cli.slim_weights  # the module-scoped fixture: a tiny lung_ct network's weight file

FAST = ["--input_shape", SLIM_SHAPE, "--io_iterations", 0, "--noauto_masks", "--nooverview",
        "--outputs", "displacement,jacobian", "--device", "cpu"]


@pytest.fixture
def images(tmp_path):
    """Three small CT-like volumes on different grids, a constant one (registers with an error) and a mask."""
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(20, 22, 18)).astype(np.float32) * 300 - 500
    write_nifti(tmp_path / "a.nii.gz", vol, np.diag([1.5, 1.5, 2.0, 1.0]))
    write_nifti(tmp_path / "b.nii.gz", vol[::-1].copy(), np.diag([1.2, 1.5, 2.0, 1.0]))
    write_nifti(tmp_path / "c.nii.gz", np.roll(vol, 3, axis=1), np.diag([1.5, 1.5, 2.0, 1.0]))
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((20, 20, 20), np.float32), np.eye(4))
    mask = np.zeros((20, 22, 18), np.uint8)
    mask[3:17, 4:18, 3:15] = 1
    write_nifti(tmp_path / "a_mask.nii.gz", mask, np.diag([1.5, 1.5, 2.0, 1.0]))
    return tmp_path


def write_csv(path, rows, header=("fixed", "moving", "fixed_mask", "moving_mask", "name")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_summary(root):
    with open(root / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((root / "summary.json").read_text())


def test_failing_pair_in_the_middle_and_reruns(images, slim_weights, capsys):
    d = images
    pairs = write_csv(d / "pairs.csv", [("a.nii.gz", "b.nii.gz", "a_mask.nii.gz", "", "first"),
                                        ("flat.nii.gz", "b.nii.gz", "", "", "broken"),
                                        ("c.nii.gz", "a.nii.gz", "", "", "")])  # default name a_to_c
    out = d / "batch"
    code, _, err = run(["register-batch", "--pairs", pairs, "--output_dir", out, "--weights", slim_weights, *FAST],
                       capsys)
    assert code == 1, err
    # one line per pair with the count; an ETA while pairs are left; the failure named, the batch went on
    assert "[1/3] first: ok in" in err and "ETA" in err.split("[1/3]")[1].splitlines()[0]
    assert "[2/3] broken: FAILED" in err and "constant" in err and "[3/3] a_to_c: ok in" in err
    assert err.strip().splitlines()[-1].startswith("error: 1 of 3 pairs failed (broken)")
    # each pair's folder is complete or absent; nothing half-written anywhere
    assert is_complete_result(out / "first") and is_complete_result(out / "a_to_c")
    assert not (out / "broken").exists()
    assert sorted(os.listdir(out)) == ["a_to_c", "first", "summary.csv", "summary.json"]
    assert sorted(os.listdir(out / "first")) == ["displacement_mm.nii.gz", "jacobian_determinant.nii.gz",
                                                 "summary.json"]
    rows, summary = read_summary(out)
    assert list(rows[0]) == list(COLUMNS)
    assert [(r["name"], r["status"]) for r in rows] == [("first", "ok"), ("broken", "failed"), ("a_to_c", "ok")]
    assert rows[1]["error"].startswith("ValueError: The fixed image is constant") and rows[1]["folds_percent"] == ""
    assert rows[0]["fixed_mask"] == str(d / "a_mask.nii.gz") and rows[0]["moving_mask"] == ""
    assert summary["counts"] == {"total": 3, "ok": 2, "failed": 1, "skipped": 0, "not_run": 0}
    assert summary["device"] == "cpu" and summary["settings"]["io_iterations"] == 0
    assert summary["source"]["pair_list"] == str(pairs) and not summary["interrupted"]
    for row, record in zip(rows, summary["pairs"]):
        if row["status"] == "ok":  # the table's numbers are the pair's own
            own = json.loads((out / row["name"] / "summary.json").read_text())
            assert record["folds_percent"] == own["folds"]["percent_voxels_detJ_le_0"]
            assert record["log_jacobian_std"] == pytest.approx(own["log_jacobian_std"])
            assert float(row["log_jacobian_std"]) == pytest.approx(own["log_jacobian_std"], rel=1e-5)
            assert record["registration_seconds"] == pytest.approx(own["timings_seconds"]["total_before_write"],
                                                                   abs=1e-3)
            assert record["seconds"] >= record["registration_seconds"] > 0
            assert own["masks"]["fixed"] == (str(d / "a_mask.nii.gz") if row["name"] == "first" else None)

    # the last pair (after a success and a failure with the same network) equals a single register run
    code, _, err = run(["register", "--fixed", d / "c.nii.gz", "--moving", d / "a.nii.gz", "--output_dir", d / "one",
                        "--weights", slim_weights, *FAST], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(nib.load(d / "one" / "displacement_mm.nii.gz").dataobj),
                                  np.asarray(nib.load(out / "a_to_c" / "displacement_mm.nii.gz").dataobj))

    # a rerun refuses to touch the complete results without being told what to do with them
    before = (out / "first" / "summary.json").stat().st_mtime_ns
    code, _, err = run(["register-batch", "--pairs", pairs, "--output_dir", out, "--weights", slim_weights, *FAST],
                       capsys)
    assert code == 2 and "complete previous result" in err and "--skip_existing" in err and "nothing was registered" \
        in err
    code, _, err = run(["register-batch", "--pairs", pairs, "--output_dir", out, "--weights", slim_weights, *FAST,
                        "--skip_existing", "--overwrite"], capsys)
    assert code == 2 and "contradict" in err
    # --skip_existing: the fixed pair runs, the complete ones are kept (and reported with their own numbers)
    write_nifti(d / "flat.nii.gz", np.asarray(nib.load(d / "c.nii.gz").dataobj), np.diag([1.5, 1.5, 2.0, 1.0]))
    code, _, err = run(["register-batch", "--pairs", pairs, "--output_dir", out, "--weights", slim_weights, *FAST,
                        "--skip_existing"], capsys)
    assert code == 0, err
    assert "[1/3] first: skipped" in err and "[2/3] broken: ok" in err
    assert (out / "first" / "summary.json").stat().st_mtime_ns == before
    new_rows, new_summary = read_summary(out)
    assert [r["status"] for r in new_rows] == ["skipped", "ok", "skipped"]
    assert new_rows[0]["folds_percent"] == rows[0]["folds_percent"] and new_rows[0]["seconds"] == ""
    assert new_summary["counts"]["skipped"] == 2 and is_complete_result(out / "broken")
    # --overwrite replaces every result (each as a whole)
    code, _, err = run(["register-batch", "--pairs", pairs, "--output_dir", out, "--weights", slim_weights, *FAST,
                        "--overwrite"], capsys)
    assert code == 0, err
    assert [r["status"] for r in read_summary(out)[0]] == ["ok", "ok", "ok"]
    assert (out / "first" / "summary.json").stat().st_mtime_ns != before


def test_bad_lists_are_refused_before_any_work(images, slim_weights, capsys, monkeypatch):
    d = images

    def no_model(*args, **kwargs):
        raise AssertionError("the weights were loaded although the list is bad")

    monkeypatch.setattr(cli, "load_weights", no_model)

    def batch(pairs, *extra):
        return run(["register-batch", "--pairs", pairs, "--output_dir", d / "out", "--weights", slim_weights, *FAST,
                    *extra], capsys)

    # every problem of the list at once: a missing file, a duplicate name (also ignoring case), a bad name
    bad = write_csv(d / "bad.csv", [("a.nii.gz", "b.nii.gz", "", "", "p1"),
                                    ("a.nii.gz", "missing.nii.gz", "", "", "p2"),
                                    ("b.nii.gz", "a.nii.gz", "", "", "p1"), ("c.nii.gz", "a.nii.gz", "", "", "P2"),
                                    ("c.nii.gz", "b.nii.gz", "", "", "x/y")])
    code, _, err = batch(bad)
    assert code == 2 and "4 problems" in err and "nothing was registered" in err
    assert f"row 3 (p2): the moving image file does not exist: {d / 'missing.nii.gz'}" in err
    assert "row 4: the name 'p1' is already used by row 2" in err
    assert "row 5: the name (ignoring case; 'p2') 'P2' is already used by row 3" in err
    assert "row 6: the name 'x/y' cannot be a folder name" in err
    assert not (d / "out").exists()
    # a mask that is a directory, an unreadable image
    (d / "junk.nii.gz").write_bytes(b"not an image")
    code, _, err = batch(write_csv(d / "b2.csv", [("a.nii.gz", "junk.nii.gz", "", "", "j"),
                                                  ("a.nii.gz", "b.nii.gz", ".", "", "k")]))
    assert code == 2 and "junk.nii.gz" in err and "is a directory" in err
    # malformed lists
    code, _, err = batch(write_csv(d / "cols.csv", [("a.nii.gz", "b.nii.gz", "x")], header=("fixed", "moving",
                                                                                            "weight")))
    assert code == 2 and "unknown column(s) ['weight']" in err
    code, _, err = batch(write_csv(d / "nohead.csv", [("b.nii.gz", "c.nii.gz")], header=("a.nii.gz", "b.nii.gz")))
    assert code == 2 and "must be a header" in err
    (d / "l.json").write_text(json.dumps([{"fixed": "a.nii.gz", "moving": "b.nii.gz"}, {"fixed": "a.nii.gz"}, 3]))
    code, _, err = batch(d / "l.json")
    assert code == 2 and "entry 2: must be an object" in err
    (d / "l.json").write_text(json.dumps([{"fixed": "a.nii.gz", "moving": "b.nii.gz"}, {"fixed": "a.nii.gz"}]))
    code, _, err = batch(d / "l.json")
    assert code == 2 and "entry 1: no moving image" in err
    (d / "l2r.json").write_text(json.dumps({"registration_val": [{"fixed": "a", "moving": "b"}]}))
    code, _, err = batch(d / "l2r.json")
    assert code == 2 and "Learn2Reg dataset JSON" in err and "--dataset_json" in err
    # a folder in the way that is not a result of ours is never replaced, not even with --overwrite
    good = write_csv(d / "good.csv", [("a.nii.gz", "b.nii.gz", "", "", "p1")])
    (d / "out" / "p1").mkdir(parents=True)
    (d / "out" / "p1" / "notes.txt").write_text("mine")
    code, _, err = batch(good, "--overwrite")
    assert code == 2 and "not a complete monai_gradicon result" in err and (d / "out" / "p1" / "notes.txt").exists()
    # a summary file there that is not ours
    (d / "out2").mkdir()
    (d / "out2" / "summary.json").write_text("{}")
    code, _, err = run(["register-batch", "--pairs", good, "--output_dir", d / "out2", "--weights", slim_weights,
                        *FAST, "--overwrite"], capsys)
    assert code == 2 and "is not a batch summary of this project" in err
    (d / "out3").mkdir()
    (d / "out3" / "summary.csv").write_text("my,own,table\n")
    code, _, err = run(["register-batch", "--pairs", good, "--output_dir", d / "out3", "--weights", slim_weights,
                        *FAST, "--overwrite"], capsys)
    assert code == 2 and "summary.csv exists and is not a batch summary" in err
    assert (d / "out3" / "summary.csv").read_text() == "my,own,table\n"
    # flags: misspelt, contradictory, out of range -- all before work
    code, _, err = batch(good, "--skip_exsting")
    assert code == 2 and "did you mean --skip_existing?" in err
    code, _, err = batch(good, "--split", "test")
    assert code == 2 and "--split and --dataset_masks belong to --dataset_json" in err
    code, _, err = run(["register-batch", "--output_dir", d / "o", "--weights", slim_weights], capsys)
    assert code == 2 and "Give exactly one of --pairs" in err
    code, _, err = batch(good, "--orientation", "lps")
    assert code == 2 and "--orientation must be one of" in err
    code, _, err = batch(good, "--device", "tpu")
    assert code == 2 and "Unknown device 'tpu'" in err


def test_learn2reg_dataset_json_output_is_a_predictions_folder(images, slim_weights, capsys):
    """Pairs of a Learn2Reg split, named disp_FFFF_MMMM, with the dataset's masks: evaluate_learn2reg scores the
    batch's folder directly."""
    from monai_gradicon.pipeline.learn2reg import evaluate_learn2reg

    d = images / "NLST"
    for folder in ("imagesTr", "masksTr"):
        (d / folder).mkdir(parents=True)
    src = nib.load(images / "a.nii.gz")
    vol = np.asarray(src.dataobj)
    mask = np.asarray(nib.load(images / "a_mask.nii.gz").dataobj)
    for subject, shift in (("0001", 0), ("0002", 2)):
        for modality, roll in (("0000", 0), ("0001", 1)):
            name = f"NLST_{subject}_{modality}.nii.gz"
            write_nifti(d / "imagesTr" / name, np.roll(vol, shift + roll, axis=0), src.affine)
            write_nifti(d / "masksTr" / name, mask, src.affine)
    pairs = [{"fixed": f"./imagesTr/NLST_{s}_0000.nii.gz", "moving": f"./imagesTr/NLST_{s}_0001.nii.gz"}
             for s in ("0001", "0002")]
    (d / "NLST_dataset.json").write_text(json.dumps({"name": "NLST", "registration_val": pairs}))
    out = images / "predictions"
    code, _, err = run(["register-batch", "--dataset_json", d / "NLST_dataset.json", "--split", "validation",
                        "--dataset_masks", "--output_dir", out, "--weights", slim_weights, *FAST], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["disp_0001_0001", "disp_0002_0002", "summary.csv", "summary.json"]
    own = json.loads((out / "disp_0002_0002" / "summary.json").read_text())
    assert own["masks"]["moving"] == str(d / "masksTr" / "NLST_0002_0001.nii.gz")
    assert json.loads((out / "summary.json").read_text())["source"]["split"] == "validation"
    scores = evaluate_learn2reg(d / "NLST_dataset.json", out, metrics=["sdlogj"])
    assert set(scores.cases) == {"0001_0000<--0001_0001", "0002_0000<--0002_0001"}
    assert scores.cases["0002_0000<--0002_0001"]["runtime_s"]["mean"] == pytest.approx(
        own["timings_seconds"]["total_before_write"])
    # a split missing from the dataset, and a missing mask: refused before any work
    code, _, err = run(["register-batch", "--dataset_json", d / "NLST_dataset.json", "--split", "test",
                        "--output_dir", images / "p2", "--weights", slim_weights, *FAST], capsys)
    assert code == 2 and "registration_test" in err
    os.remove(d / "masksTr" / "NLST_0001_0000.nii.gz")
    code, _, err = run(["register-batch", "--dataset_json", d / "NLST_dataset.json", "--dataset_masks",
                        "--output_dir", images / "p3", "--weights", slim_weights, *FAST], capsys)
    assert code == 2 and "fixed mask file does not exist" in err and not (images / "p3").exists()


def fake_result(folds):
    return SimpleNamespace(timings={"total_before_write": 0.5}, folds_percent=folds, log_jacobian_std=0.1)


def test_run_batch_records_failures_and_interruptions(tmp_path):
    """The Python API with a stand-in per-pair function: any exception is recorded and the batch goes on; Ctrl-C
    stops it, keeps what was done and marks the rest not_run."""
    for name in ("f.nii.gz", "m.nii.gz"):
        write_nifti(tmp_path / name, np.random.rand(5, 6, 7).astype(np.float32), np.eye(4))
    pairs = [BatchPair(f"p{k}", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), source=f"pair {k}")
             for k in range(4)]
    lines = []

    def one(pair, out):
        if pair.name == "p1":
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        os.makedirs(out)
        return fake_result(float(pair.name[1]))

    result = run_batch(plan_batch(pairs, tmp_path / "out"), one, log=lines.append, details={"note": "x"})
    assert [r.status for r in result.records] == ["ok", "failed", "ok", "ok"]
    assert result.failed[0].error == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"
    assert [line.split(":")[0] for line in lines] == ["[1/4] p0", "[2/4] p1", "[3/4] p2", "[4/4] p3"]
    assert "ETA" in lines[0] and "ETA" not in lines[-1]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["note"] == "x" and summary["mean"]["folds_percent"] == pytest.approx((0 + 2 + 3) / 3)

    def interrupted(pair, out):
        if pair.name == "p2":
            raise KeyboardInterrupt
        return fake_result(0.0)

    with pytest.raises(KeyboardInterrupt):
        run_batch(plan_batch(pairs, tmp_path / "out2"), interrupted, log=lines.append)
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary["interrupted"] and [p["status"] for p in summary["pairs"]] == ["ok", "ok", "not_run", "not_run"]


def test_read_pair_list_paths_and_names(tmp_path):
    (tmp_path / "lists").mkdir()
    write_csv(tmp_path / "lists" / "p.csv", [("../img/F1.nii.gz", "/abs/M1.nrrd", "", "", ""),
                                             ("img/F2.nii", "img/M2.nii.gz", "m.nii.gz", "", " case 2 ")],
              header=("fixed", "moving", "fixed_mask", "moving_mask", "name"))
    p1, p2 = read_pair_list(tmp_path / "lists" / "p.csv")
    assert (p1.name, p1.fixed, p1.moving) == ("M1_to_F1", str(tmp_path / "img" / "F1.nii.gz"), "/abs/M1.nrrd")
    assert p2.name == "case 2" and p2.fixed_mask == str(tmp_path / "lists" / "m.nii.gz") and p2.moving_mask is None
    p1, _ = read_pair_list(tmp_path / "lists" / "p.csv", data_root=tmp_path / "elsewhere")
    assert p1.fixed == str(tmp_path / "img" / "F1.nii.gz")  # '..' from elsewhere/ is tmp_path
    with pytest.raises(BatchListError, match="cannot be a folder name"):
        plan_batch([p2], tmp_path / "out")  # a name with a space; (the files are missing too: all reported)
    # a pair's result folder may not hold an input of another pair (replacing it would destroy that input)
    root = tmp_path / "out"
    (root / "first").mkdir(parents=True)
    write_nifti(root / "first" / "f.nii.gz", np.random.rand(5, 6, 7).astype(np.float32), np.eye(4))
    chained = [BatchPair("first", str(root / "first" / "f.nii.gz"), str(root / "first" / "f.nii.gz"), source="pair 0"),
               BatchPair("second", str(root / "first" / "f.nii.gz"), str(root / "first" / "f.nii.gz"),
                         source="pair 1")]
    with pytest.raises(BatchListError, match="pair 0 \\(first\\): its result folder .* holds the input file"):
        plan_batch(chained, root, overwrite=True)
    with pytest.raises(ValueError, match="a .csv or .json file"):
        (tmp_path / "p.txt").write_text("fixed,moving\n")
        read_pair_list(tmp_path / "p.txt")


def test_device_on_every_command_and_batch_flags_follow_register():
    for name, command in cli.COMMANDS.items():
        # convert-weights reads and writes tensors; export and evaluate-learn2reg convert and score fields with numpy
        # and scipy on the CPU: nothing there runs on a device
        if name in ("convert-weights", "export", "evaluate-learn2reg"):
            continue
        assert "device" in inspect.signature(command).parameters, f"{name} has no --device"
    # register-batch takes every option of register except the one pair's paths (a new register flag must be added
    # to register-batch, or excluded here with a reason)
    # (the segmentations and their Dice weight are one pair's label maps: register only)
    single = set(inspect.signature(cli.register).parameters) - {
        "fixed", "moving", "fixed_mask", "moving_mask", "fixed_segmentation", "moving_segmentation", "io_dice_weight"}
    batch = set(inspect.signature(cli.register_batch).parameters)
    assert single <= batch, f"register-batch lacks {sorted(single - batch)}"


def test_warp_and_evaluate_take_device(images, slim_weights, capsys):
    d = images
    code, _, err = run(["register", "--fixed", d / "a.nii.gz", "--moving", d / "b.nii.gz", "--output_dir", d / "r",
                        "--weights", slim_weights, *FAST], capsys)
    assert code == 0, err
    code, _, err = run(["warp", "--transform_dir", d / "r", "--image", d / "b.nii.gz", "--output", d / "w.nii.gz",
                        "--device", "cpu"], capsys)
    assert code == 0, err
    code, stdout, err = run(["evaluate", "--transform_dir", d / "r", "--device", "cpu"], capsys)
    assert code == 0 and "folds" in stdout, err
    code, _, err = run(["warp", "--transform_dir", d / "r", "--image", d / "b.nii.gz", "--output", d / "w2.nii.gz",
                        "--device", "gpu0"], capsys)
    assert code == 2 and "Unknown device 'gpu0'" in err and not (d / "w2.nii.gz").exists()
