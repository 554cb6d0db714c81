"""Tests for dataset layout readers, datalist loading and landmark files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_gradicon.data import (
    DIRLAB_COPD_CASES,
    DirLabCase,
    dirlab_copd_datalist,
    dirlab_copd_to_nifti,
    load_datalist,
    nlst_datalist,
    oasis_datalist,
    read_dirlab_image,
    read_dirlab_landmarks,
    read_landmarks,
    voxel_to_world,
)

FAKE_CASE = DirLabCase(shape=(6, 5, 4), spacing_mm=(0.5, 0.75, 2.5))
FAKE_TABLE = {"copd1": FAKE_CASE, "copd2": DirLabCase((3, 3, 2), (1.0, 1.0, 2.0))}


def _fake_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """[X, Y, Z] int16 volume whose value encodes its index: 100 i + 10 j + k."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (100 * i + 10 * j + k).astype(np.int16)


def _write_raw(path: Path, volume_xyz: np.ndarray) -> None:
    """Write as DIR-Lab does: int16 little-endian, x fastest, then y, then z."""
    path.parent.mkdir(parents=True, exist_ok=True)
    volume_xyz.transpose(2, 1, 0).astype("<i2").tofile(path)


def _write_dirlab_case(folder: Path, name: str, case: DirLabCase) -> None:
    volume = _fake_volume(case.shape)
    _write_raw(folder / f"{name}_iBHCT.img", volume)
    _write_raw(folder / f"{name}_eBHCT.img", volume + 1)
    (folder / f"{name}_300_iBH_xyz_r1.txt").write_text("1\t1\t1\n2\t3\t4\n")
    (folder / f"{name}_300_eBH_xyz_r1.txt").write_text("1\t2\t1\n3\t3\t2\n")


# ----------------------------------------------------------------------------------------------------- DIR-Lab


def test_dirlab_case_table():
    assert len(DIRLAB_COPD_CASES) == 10
    assert DIRLAB_COPD_CASES["copd1"] == DirLabCase((512, 512, 121), (0.625, 0.625, 2.5))
    assert DIRLAB_COPD_CASES["copd10"] == DirLabCase((512, 512, 135), (0.742, 0.742, 2.5))
    assert all(c.shape[:2] == (512, 512) and c.spacing_mm[2] == 2.5 for c in DIRLAB_COPD_CASES.values())


def test_read_dirlab_image_axis_order_and_hu(tmp_path):
    path = tmp_path / "copd1_iBHCT.img"
    volume = _fake_volume(FAKE_CASE.shape)
    _write_raw(path, volume)
    image, affine = read_dirlab_image(path, "copd1", cases=FAKE_TABLE, hu_offset=0.0)
    assert image.shape == (6, 5, 4) and image.dtype == np.float32
    np.testing.assert_array_equal(image, volume)
    # explicit check against the file layout: value at (x, y, z) is the (z * Y + y) * X + x-th int16
    raw = np.fromfile(path, dtype="<i2")
    x, y, z = 4, 2, 3
    assert image[x, y, z] == raw[(z * 5 + y) * 6 + x]
    np.testing.assert_allclose(affine, np.diag([0.5, 0.75, 2.5, 1.0]))
    shifted, _ = read_dirlab_image(path, FAKE_CASE)  # default offset -1024 (raw = HU + 1024)
    np.testing.assert_array_equal(shifted, volume.astype(np.float32) - 1024)


def test_read_dirlab_image_errors(tmp_path):
    path = tmp_path / "case.img"
    _write_raw(path, _fake_volume((6, 5, 3)))
    with pytest.raises(ValueError, match="bytes"):
        read_dirlab_image(path, FAKE_CASE)
    with pytest.raises(ValueError, match="unknown DIR-Lab case"):
        read_dirlab_image(path, "copd99")
    with pytest.raises(FileNotFoundError, match="missing.img"):
        read_dirlab_image(tmp_path / "missing.img", FAKE_CASE)


def test_read_dirlab_landmarks_consistent_with_affine(tmp_path):
    path = tmp_path / "lm.txt"
    path.write_text("1\t1\t1\n6\t5\t4\n2\t3\t1\t\n")
    points = read_dirlab_landmarks(path, "copd1", cases=FAKE_TABLE)
    np.testing.assert_allclose(points, [[0, 0, 0], [2.5, 3.0, 7.5], [0.5, 1.5, 0.0]])
    # the same point through the image affine: 1-based index -> 0-based array index -> world
    image_path = tmp_path / "img.img"
    _write_raw(image_path, _fake_volume(FAKE_CASE.shape))
    _, affine = read_dirlab_image(image_path, FAKE_CASE)
    np.testing.assert_allclose(voxel_to_world(np.array([[5.0, 4.0, 3.0]]), affine), points[1:2])
    path.write_text("1\t1\t1\n7\t1\t1\n")
    with pytest.raises(ValueError, match="outside"):
        read_dirlab_landmarks(path, FAKE_CASE)


def test_dirlab_copd_datalist_layouts(tmp_path):
    _write_dirlab_case(tmp_path / "copd1" / "copd1", "copd1", FAKE_TABLE["copd1"])  # nested archive layout
    _write_dirlab_case(tmp_path / "copd2", "copd2", FAKE_TABLE["copd2"])  # flat layout
    entries = dirlab_copd_datalist(tmp_path, cases=FAKE_TABLE)
    assert [e["case"] for e in entries] == ["copd1", "copd2"]
    assert entries[0]["fixed_image"] == str((tmp_path / "copd1" / "copd1" / "copd1_iBHCT.img").resolve())
    assert entries[1]["moving_landmarks"] == str((tmp_path / "copd2" / "copd2_300_eBH_xyz_r1.txt").resolve())
    assert all(Path(v).is_absolute() for e in entries for k, v in e.items() if k != "case")

    (tmp_path / "copd2" / "copd2_300_eBH_xyz_r1.txt").unlink()
    with pytest.raises(FileNotFoundError, match="copd2_300_eBH_xyz_r1.txt"):
        dirlab_copd_datalist(tmp_path, cases=FAKE_TABLE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no DIR-Lab case"):
        dirlab_copd_datalist(tmp_path / "empty", cases=FAKE_TABLE)
    with pytest.raises(FileNotFoundError):
        dirlab_copd_datalist(tmp_path / "absent")


def test_dirlab_copd_to_nifti(tmp_path):
    _write_dirlab_case(tmp_path / "raw" / "copd1", "copd1", FAKE_CASE)
    datalist = dirlab_copd_to_nifti(tmp_path / "raw", tmp_path / "nii", cases={"copd1": FAKE_CASE}, hu_offset=0.0)
    (entry,) = load_datalist(datalist, "test")
    nifti = nib.load(entry["fixed_image"])
    np.testing.assert_array_equal(np.asarray(nifti.dataobj), _fake_volume(FAKE_CASE.shape))
    np.testing.assert_allclose(nifti.affine, np.diag([0.5, 0.75, 2.5, 1.0]))
    np.testing.assert_allclose(read_landmarks(entry["fixed_landmarks"]), [[0, 0, 0], [0.5, 1.5, 7.5]])
    with pytest.raises(FileExistsError):
        dirlab_copd_to_nifti(tmp_path / "raw", tmp_path / "nii", cases={"copd1": FAKE_CASE})


# ----------------------------------------------------------------------------------------------------- Learn2Reg


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture()
def nlst_root(tmp_path):
    root = tmp_path / "NLST"
    pairs = {"training_paired_images": [1, 2], "registration_val": [3]}
    content: dict = {"name": "NLST"}
    for key, ids in pairs.items():
        content[key] = []
        for i in ids:
            names = [f"NLST_{i:04d}_0000", f"NLST_{i:04d}_0001"]
            for name in names:
                _touch(root / "imagesTr" / f"{name}.nii.gz")
                _touch(root / "masksTr" / f"{name}.nii.gz")
                (root / "keypointsTr").mkdir(parents=True, exist_ok=True)
                (root / "keypointsTr" / f"{name}.csv").write_text("1.0,2.0,3.0\n4.0,5.0,6.0\n")
            content[key].append({"fixed": f"./imagesTr/{names[0]}.nii.gz", "moving": f"./imagesTr/{names[1]}.nii.gz"})
    (root / "NLST_dataset.json").write_text(json.dumps(content))
    return root


def test_nlst_datalist_paths(nlst_root):
    training = nlst_datalist(nlst_root, "training")
    assert len(training) == 2
    first = training[0]
    root = nlst_root.resolve()
    assert first["fixed_image"] == str(root / "imagesTr" / "NLST_0001_0000.nii.gz")
    assert first["moving_image"] == str(root / "imagesTr" / "NLST_0001_0001.nii.gz")
    assert first["fixed_label"] == str(root / "masksTr" / "NLST_0001_0000.nii.gz")
    assert first["moving_label"] == str(root / "masksTr" / "NLST_0001_0001.nii.gz")
    assert first["fixed_landmarks"] == str(root / "keypointsTr" / "NLST_0001_0000.csv")
    assert first["moving_landmarks"] == str(root / "keypointsTr" / "NLST_0001_0001.csv")
    assert first["landmark_coordinates"] == "voxel"
    np.testing.assert_allclose(read_landmarks(first["fixed_landmarks"]), [[1, 2, 3], [4, 5, 6]])
    (validation,) = nlst_datalist(nlst_root, "validation")
    assert validation["fixed_image"].endswith("NLST_0003_0000.nii.gz")


def test_nlst_datalist_errors(nlst_root):
    with pytest.raises(ValueError, match="split"):
        nlst_datalist(nlst_root, "train")
    (nlst_root / "masksTr" / "NLST_0002_0001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="NLST_0002_0001.nii.gz"):
        nlst_datalist(nlst_root, "training")
    for name in ("NLST_0003_0000", "NLST_0003_0001"):
        (nlst_root / "keypointsTr" / f"{name}.csv").unlink()
    with pytest.raises(FileNotFoundError, match="NLST_0003_0000.csv"):
        nlst_datalist(nlst_root, "validation")
    (entry,) = nlst_datalist(nlst_root, "validation", require_keypoints=False)
    assert "fixed_landmarks" not in entry and "fixed_label" in entry
    with pytest.raises(ValueError, match="registration_test"):
        nlst_datalist(nlst_root, "test")
    (nlst_root / "NLST_dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed JSON"):
        nlst_datalist(nlst_root, "training")
    (nlst_root / "NLST_dataset.json").write_text(json.dumps({"training_paired_images": [{"fixed": "./a.nii.gz"}]}))
    with pytest.raises(ValueError, match="moving"):
        nlst_datalist(nlst_root, "training")
    (nlst_root / "NLST_dataset.json").unlink()
    with pytest.raises(FileNotFoundError, match="NLST_dataset.json"):
        nlst_datalist(nlst_root, "training")


def test_oasis_datalist(tmp_path):
    root = tmp_path / "OASIS"
    for i in (1, 2, 438, 439):
        _touch(root / "imagesTr" / f"OASIS_{i:04d}_0000.nii.gz")
        _touch(root / "labelsTr" / f"OASIS_{i:04d}_0000.nii.gz")
    content = {
        "training": [
            {"image": f"./imagesTr/OASIS_{i:04d}_0000.nii.gz", "label": f"./labelsTr/OASIS_{i:04d}_0000.nii.gz"}
            for i in (1, 2)
        ],
        "registration_val": [
            {"fixed": "./imagesTr/OASIS_0438_0000.nii.gz", "moving": "./imagesTr/OASIS_0439_0000.nii.gz"}
        ],
    }
    (root / "OASIS_dataset.json").write_text(json.dumps(content))
    training = oasis_datalist(root, "training")
    assert training == [
        {
            "image": str(root.resolve() / "imagesTr" / f"OASIS_{i:04d}_0000.nii.gz"),
            "label": str(root.resolve() / "labelsTr" / f"OASIS_{i:04d}_0000.nii.gz"),
        }
        for i in (1, 2)
    ]
    (pair,) = oasis_datalist(root, "validation")
    assert pair["fixed_label"] == str(root.resolve() / "labelsTr" / "OASIS_0438_0000.nii.gz")
    assert pair["moving_image"] == str(root.resolve() / "imagesTr" / "OASIS_0439_0000.nii.gz")
    (root / "labelsTr" / "OASIS_0439_0000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="OASIS_0439_0000.nii.gz"):
        oasis_datalist(root, "validation")
    with pytest.raises(FileNotFoundError):
        oasis_datalist(tmp_path / "nowhere", "training")


# ----------------------------------------------------------------------------------------------------- datalists


@pytest.fixture()
def datalist_dir(tmp_path):
    folder = tmp_path / "data"
    for name in ("f.nii.gz", "m.nii.gz", "fl.nii.gz", "sub/s.nii.gz"):
        _touch(folder / name)
    content = {
        "training": [
            {"fixed_image": "f.nii.gz", "moving_image": "./m.nii.gz", "fixed_label": "fl.nii.gz", "case": "c1"}
        ],
        "validation": [{"image": "sub/s.nii.gz"}],
    }
    (folder / "datalist.json").write_text(json.dumps(content))
    return folder


def test_load_datalist_resolves_relative_to_json_folder(datalist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    (entry,) = load_datalist(datalist_dir / "datalist.json", "training")
    assert entry == {
        "fixed_image": str((datalist_dir / "f.nii.gz").resolve()),
        "moving_image": str((datalist_dir / "m.nii.gz").resolve()),
        "fixed_label": str((datalist_dir / "fl.nii.gz").resolve()),
        "case": "c1",
    }
    assert load_datalist(datalist_dir, "validation") == [{"image": str((datalist_dir / "sub" / "s.nii.gz").resolve())}]
    # absolute paths are kept
    absolute = {"training": [{"fixed_image": entry["fixed_image"], "moving_image": entry["moving_image"]}]}
    (tmp_path / "abs.json").write_text(json.dumps(absolute))
    assert load_datalist(tmp_path / "abs.json")[0]["fixed_image"] == entry["fixed_image"]


@pytest.mark.parametrize(
    "content, error, match",
    [
        ({"training": [{"fixed_image": "f.nii.gz", "moving_image": "gone.nii.gz"}]}, FileNotFoundError, "gone.nii.gz"),
        ({"validation": []}, ValueError, "'training'"),
        ({"training": [{"fixed_image": "f.nii.gz"}]}, ValueError, "moving_image"),
        ({"training": [{"label": "f.nii.gz"}]}, ValueError, "fixed_image"),
        ({"training": ["f.nii.gz"]}, ValueError, r"\[training\]\[0\]"),
        ({"training": {"fixed_image": "f.nii.gz"}}, ValueError, "list"),
        ({"training": [{"fixed_image": "f.nii.gz", "moving_image": 3}]}, ValueError, "moving_image"),
        ([1, 2], ValueError, "object"),
    ],
)
def test_load_datalist_errors(datalist_dir, content, error, match):
    path = datalist_dir / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(error, match=match):
        load_datalist(path, "training")


def test_load_datalist_missing_and_malformed_files(datalist_dir):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_datalist(datalist_dir / "nothing.json")
    (datalist_dir / "broken.json").write_text('{"training": [')
    with pytest.raises(ValueError, match="broken.json"):
        load_datalist(datalist_dir / "broken.json")
    with pytest.raises(ValueError, match="label"):
        load_datalist(datalist_dir, "training", required_keys=["fixed_image", "moving_label"])


# ----------------------------------------------------------------------------------------------------- landmarks


@pytest.mark.parametrize(
    "text",
    [
        "x_mm,y_mm,z_mm\n1,2,3\n4.5,-5,6e1\n",
        "1\t2\t3\n4.5\t-5\t60\n",
        "# comment\n1 2 3\n\n4.5  -5   60\n",
        "id,z,y,x\n0,3,2,1\n1,60,-5,4.5\n",
        "1, 2, 3\r\n4.5, -5, 60\r\n",
    ],
)
def test_read_landmarks_formats(tmp_path, text):
    path = tmp_path / "points.csv"
    path.write_text(text)
    np.testing.assert_allclose(read_landmarks(path), [[1, 2, 3], [4.5, -5, 60]])


@pytest.mark.parametrize(
    "text, match",
    [("", "no landmarks"), ("x,y,z\n", "only a header"), ("1,2,3\n4,5\n", "line 2"), ("1,2,3\n4,a5,6\n", "line 2"),
     ("a,b,c,d\n1,2,3,4\n", "header"), ("1,2,3,4\n", "expected 3"), ("1,nan,3\n", "NaN")],
)
def test_read_landmarks_errors(tmp_path, text, match):
    path = tmp_path / "points.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_landmarks(path)
    with pytest.raises(FileNotFoundError):
        read_landmarks(tmp_path / "absent.csv")
