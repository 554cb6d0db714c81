"""The BasicInferTask subclass and the sample app in-process (no HTTP server); needs ``monailabel``.

Run in the MONAI Label environment: ``.venv-monailabel/bin/python -m pytest tests/test_monailabel_task.py``.
"""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("monailabel", reason="monailabel is not installed (optional extra monai-gradicon[monailabel])")

from monailabel_helpers import make_network, write_bundle, write_nifti, write_pair  # noqa: E402

from monai_gradicon.monailabel import RegistrationRequestError  # noqa: E402
from monai_gradicon.monailabel.task import GradICONRegistrationTask  # noqa: E402

APP_DIR = os.path.join(os.path.dirname(__file__), "..", "apps", "gradicon_monailabel")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel_task")
    bundle = write_bundle(str(root / "bundles" / "tiny"), make_network(scale=0.05))
    fixed, moving = write_pair(str(root / "studies"))
    task = GradICONRegistrationTask(bundle, output_dir=str(root / "out"))
    return {"root": root, "bundle": bundle, "fixed": fixed, "moving": moving, "task": task}


def test_task_info(setup):
    info = setup["task"].info()
    assert info["type"] == "registration" and info["dimension"] == 3 and info["labels"] == []
    assert info["network_shape"] == [33, 33, 33]
    assert "fixed_image" in info["inputs"]


def test_task_call_returns_warped_and_ddf(setup):
    task = setup["task"]
    file, result = task({"image": setup["moving"], "fixed_image": setup["fixed"], "device": "cpu"})
    fixed = nib.load(setup["fixed"])
    warped = nib.load(file)
    assert warped.shape == fixed.shape and warped.get_data_dtype() == np.float32
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-6)
    assert os.path.isfile(result["ddf"]) and os.path.isfile(result["warped_image"])
    np.testing.assert_array_equal(np.asarray(warped.dataobj), np.asarray(nib.load(result["warped_image"]).dataobj))
    assert nib.load(result["ddf"]).shape == (*fixed.shape, 1, 3)
    assert result["ddf_units"] == "mm" and result["model"] == "tiny"
    assert "latencies" in result


def test_task_streams_ddf_on_request(setup):
    file, result = setup["task"]({"image": setup["moving"], "fixed_image": setup["fixed"], "result": "ddf",
                                  "ddf_units": "voxel", "device": "cpu"})
    assert nib.load(file).shape == (*nib.load(setup["fixed"]).shape, 3)
    assert result["ddf_units"] == "voxel"


def test_task_never_restores_the_field(setup):
    names = [type(t).__name__ for t in setup["task"].post_transforms({})]
    assert "Restored" not in names and setup["task"].inverse_transforms({}) is None


def test_resolve_request(setup):
    task = setup["task"]
    ids = {"fixed": setup["fixed"], "moving": setup["moving"]}
    resolve = lambda i: ids.get(i, "")  # noqa: E731
    r = task.resolve_request({"image": "moving", "fixed_image": "fixed"}, resolve)
    assert (r["image"], r["fixed_image"]) == (setup["moving"], setup["fixed"])
    r = task.resolve_request({"image": "moving", "label": setup["fixed"]}, resolve)
    assert r["fixed_image"] == setup["fixed"]
    with pytest.raises(RegistrationRequestError, match="No fixed image") as err:
        task.resolve_request({"image": "moving"}, resolve)
    assert err.value.status_code == 400
    with pytest.raises(RegistrationRequestError, match="'nope'") as err:
        task.resolve_request({"image": "moving", "fixed_image": "nope"}, resolve)
    assert err.value.status_code == 404


def test_bad_request_params(setup):
    task = setup["task"]
    base = {"image": setup["moving"], "fixed_image": setup["fixed"], "device": "cpu"}
    for extra, pattern in (({"io_iterations": "x"}, "whole number"), ({"io_iterations": 10**6}, "between"),
                           ({"ddf_units": "cm"}, "ddf_units"), ({"result": "both"}, "result")):
        with pytest.raises(RegistrationRequestError, match=pattern) as err:
            task({**base, **extra})
        assert err.value.status_code == 400


def _app(setup, tmp_path, conf=None):
    from monailabel.interfaces.utils.app import app_instance

    app_dir = tmp_path / "app"
    shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("model", "lib", "logs", "bin", "__pycache__"))
    conf = {"models": "tiny", "bundle_dirs": str(setup["root"] / "bundles"), "output_dir": str(tmp_path / "out"),
            **(conf or {})}
    return app_instance(str(app_dir), str(setup["root"] / "studies"), conf)


def test_app_resolves_ids_and_maps_errors_to_http(setup, tmp_path):
    from fastapi import HTTPException

    app = _app(setup, tmp_path)
    assert list(app.info()["models"]) == ["tiny"]
    res = app.infer({"model": "tiny", "image": "moving", "fixed_image": "fixed", "device": "cpu"})
    assert nib.load(res["file"]).shape == nib.load(setup["fixed"]).shape
    assert res["params"]["fixed_image"] == os.path.realpath(setup["fixed"])
    flat = write_nifti(str(tmp_path / "flat.nii.gz"), np.random.rand(30, 30).astype(np.float32), np.eye(4))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"junk")
    for request, status in (
        ({"model": "tiny", "image": "moving"}, 400),
        ({"model": "tiny", "image": "moving", "fixed_image": "nope"}, 404),
        ({"model": "tiny", "image": "moving", "fixed_image": flat}, 422),
        ({"model": "tiny", "image": "moving", "fixed_image": str(bad)}, 422),
        ({"model": "other", "image": "moving", "fixed_image": "fixed"}, 404),
    ):
        with pytest.raises(HTTPException) as err:
            app.infer(request)
        assert err.value.status_code == status, (request, err.value.detail)
        assert err.value.detail
    # and it still serves
    res = app.infer({"model": "tiny", "image": "moving", "fixed_image": "fixed", "device": "cpu"})
    assert os.path.isfile(res["file"])


def test_app_skips_bundles_without_weights(setup, tmp_path):
    folder = write_bundle(str(tmp_path / "bundles" / "untrained"), make_network())
    os.remove(os.path.join(folder, "models", "model.pt"))
    from monailabel.interfaces.utils.app import app_instance

    app_dir = tmp_path / "app2"
    shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("model", "lib", "logs", "bin", "__pycache__"))
    app = app_instance(str(app_dir), str(setup["root"] / "studies"), {"bundle_dirs": str(tmp_path / "bundles")})
    assert app.info()["models"] == {}
    with pytest.raises(FileNotFoundError, match="model.pt"):
        app_instance(str(tmp_path / "app2"), str(setup["root"] / "studies") + "_x",
                     {"models": "untrained", "bundle_dirs": str(tmp_path / "bundles")})



def test_old_results_are_pruned_but_nothing_else(setup, tmp_path):
    out = tmp_path / "pruned"
    task = GradICONRegistrationTask(bundle=setup["task"].bundle, output_dir=str(out))
    out.mkdir()
    old_result, foreign = out / "tiny_old_ddf.nii.gz", out / "notes_ddf.txt"
    for p in (old_result, foreign):
        p.write_text("x")
        os.utime(p, (1, 1))
    task({"image": setup["moving"], "fixed_image": setup["fixed"], "device": "cpu"})
    assert not old_result.exists() and foreign.exists()
