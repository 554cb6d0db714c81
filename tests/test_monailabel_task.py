"""The BasicInferTask subclasses and the sample app in-process (no HTTP server); needs ``monailabel``.

Run in the MONAI Label environment: ``.venv-monailabel/bin/python -m pytest tests/test_monailabel_task.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zipfile

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("monailabel", reason="monailabel is not installed (optional extra monai-gradicon[monailabel])")

from monailabel_helpers import (  # noqa: E402
    LABEL_NAMES,
    SlicerPlugin,
    make_network,
    slicer_plugin_path,
    write_atlas,
    write_bundle,
    write_nifti,
    write_pair,
)

from monai_gradicon.monailabel import RegistrationRequestError, load_atlas, load_bundle  # noqa: E402
from monai_gradicon.monailabel.task import (  # noqa: E402
    GradICONPropagationTask,
    GradICONRegistrationTask,
    ServingLimits,
    TrustedInputs,
)
from monai_gradicon.pipeline import register  # noqa: E402

APP_DIR = os.path.join(os.path.dirname(__file__), "..", "apps", "gradicon_monailabel")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel_task")
    bundle_dir = write_bundle(str(root / "bundles" / "tiny"), make_network(scale=0.05))
    fixed, moving = write_pair(str(root / "studies"))
    atlas_dir = write_atlas(str(root / "atlases"))
    bundle = load_bundle(bundle_dir)
    task = GradICONRegistrationTask(bundle=bundle, output_dir=str(root / "out"))
    ids = {"fixed": fixed, "moving": moving}
    return {"root": root, "bundle_dir": bundle_dir, "bundle": bundle, "fixed": fixed, "moving": moving, "task": task,
            "atlas": load_atlas(atlas_dir), "resolve": lambda i: ids.get(i, "")}


# ---- the registration task -------------------------------------------------------------------------------------


def test_task_info(setup):
    info = setup["task"].info()
    assert info["type"] == "registration" and info["dimension"] == 3 and info["labels"] == []
    assert info["network_shape"] == [33, 33, 33]
    assert "fixed_image" in info["inputs"]
    assert info["limits"] == {"max_io_iterations": 5, "max_input_voxels": 40_000_000, "max_request_seconds": 300.0}


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


def test_task_zip_holds_everything_one_request_computed(setup, tmp_path):
    file, result = setup["task"]({"image": setup["moving"], "fixed_image": setup["fixed"], "result": "zip",
                                  "device": "cpu"})
    with zipfile.ZipFile(file) as z:
        assert sorted(z.namelist()) == ["ddf_mm.nii.gz", "summary.json", "warped.nii.gz"]
        z.extractall(tmp_path)
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["displacement_mm_max"] == result["displacement_mm_max"] and summary["ddf_units"] == "mm"
    ref = register(setup["fixed"], setup["moving"], setup["bundle"].network, inverse=False, device="cpu")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "warped.nii.gz").dataobj), ref.warped_moving)
    assert nib.load(tmp_path / "ddf_mm.nii.gz").shape == (*nib.load(setup["fixed"]).shape, 1, 3)


def test_task_never_restores_the_field(setup):
    names = [type(t).__name__ for t in setup["task"].post_transforms({})]
    assert "Restored" not in names and setup["task"].inverse_transforms({}) is None


def test_resolve_request_ids_uploads_and_paths(setup):
    task, resolve = setup["task"], setup["resolve"]
    r = task.resolve_request({"image": "moving", "fixed_image": "fixed"}, resolve)
    assert (r["image"], r["fixed_image"]) == (setup["moving"], setup["fixed"])
    # an uploaded 'label' part is the fixed image (trusted: the server wrote it)
    r = task.resolve_request({"image": "moving", "label": setup["fixed"]}, resolve, trusted=TrustedInputs(label=True))
    assert r["fixed_image"] == setup["fixed"]
    with pytest.raises(RegistrationRequestError, match="No fixed image") as err:
        task.resolve_request({"image": "moving"}, resolve)
    assert err.value.status_code == 400
    with pytest.raises(RegistrationRequestError, match="No moving image") as err:
        task.resolve_request({"fixed_image": "fixed"}, resolve)
    assert err.value.status_code == 400
    # a server path: the same 404 and the same words whether the file exists or not (nothing is revealed)
    answers = []
    for path in (setup["fixed"], str(setup["root"] / "no_such_file.nii.gz")):
        with pytest.raises(RegistrationRequestError) as err:
            task.resolve_request({"image": "moving", "fixed_image": path}, resolve)
        answers.append((err.value.status_code, str(err.value).replace(path, "<path>")))
    assert answers[0] == answers[1] and answers[0][0] == 404 and "server paths are not accepted" in answers[0][1]
    # ... unless the operator allows server paths (local use)
    local = GradICONRegistrationTask(bundle=setup["bundle"], allow_server_paths=True)
    assert local.resolve_request({"image": "moving", "fixed_image": setup["fixed"]}, resolve)["fixed_image"] == \
        setup["fixed"]


def test_bad_parameters_are_rejected_before_any_image_is_looked_up(setup):
    task = setup["task"]
    looked_up = []

    def resolve(image_id):
        looked_up.append(image_id)
        return setup["resolve"](image_id)

    base = {"image": "moving", "fixed_image": "fixed"}
    for extra, pattern in (({"io_iterations": "x"}, "whole number"), ({"io_iterations": 6}, "between 0 and 5"),
                           ({"ddf_units": "cm"}, "ddf_units"), ({"result": "both"}, "result"),
                           ({"padding_mode": "reflect"}, "padding_mode must be one of border, zeros"),
                           ({"orientation": "lps"}, "orientation"), ({"transform_scheme": "bspline"},
                                                                     "transform_scheme"),
                           ({"fixed_label_mask": "fixed"}, "Unknown mask")):
        with pytest.raises(RegistrationRequestError, match=pattern) as err:
            task.resolve_request({**base, **extra}, resolve)
        assert err.value.status_code == 400
    assert looked_up == []
    # and a direct call of the task checks them too, before the network
    with pytest.raises(RegistrationRequestError, match="padding_mode"):
        task({"image": setup["moving"], "fixed_image": setup["fixed"], "padding_mode": "reflect", "device": "cpu"})


def test_input_size_limit_is_413_before_reading(setup):
    task = GradICONRegistrationTask(bundle=setup["bundle"], limits=ServingLimits(max_input_voxels=1000))
    with pytest.raises(RegistrationRequestError, match="at most 1000 voxels") as err:
        task.resolve_request({"image": "moving", "fixed_image": "fixed"}, setup["resolve"])
    assert err.value.status_code == 413


def test_request_time_limit_stops_instance_optimization(setup):
    task = GradICONRegistrationTask(bundle=setup["bundle"], output_dir=str(setup["root"] / "out_deadline"),
                                    limits=ServingLimits(max_request_seconds=0.001))
    before = {k: v.clone() for k, v in setup["bundle"].network.state_dict().items()}
    with pytest.raises(RegistrationRequestError, match="ran out of time") as err:
        task({"image": setup["moving"], "fixed_image": setup["fixed"], "io_iterations": 2, "device": "cpu"})
    assert err.value.status_code == 503
    for k, v in setup["bundle"].network.state_dict().items():
        assert (v == before[k]).all(), k
    assert not os.path.exists(setup["root"] / "out_deadline") or not os.listdir(setup["root"] / "out_deadline")


def test_old_results_are_pruned_but_nothing_else(setup, tmp_path):
    out = tmp_path / "pruned"
    task = GradICONRegistrationTask(bundle=setup["bundle"], output_dir=str(out))
    out.mkdir()
    old_result, foreign = out / "tiny_old_ddf.nii.gz", out / "notes_ddf.txt"
    for p in (old_result, foreign):
        p.write_text("x")
        os.utime(p, (1, 1))
    task({"image": setup["moving"], "fixed_image": setup["fixed"], "device": "cpu"})
    assert not old_result.exists() and foreign.exists()


# ---- the label propagation task --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def propagate(setup):
    return GradICONPropagationTask(bundle=setup["bundle"], name="tiny_propagate", output_dir=str(setup["root"] / "out"),
                                   atlases={setup["atlas"].name: setup["atlas"]})


def test_propagation_info_is_a_segmentation_with_a_reference_option(propagate, setup):
    info = propagate.info()
    assert info["type"] == "segmentation" and info["labels"] == LABEL_NAMES
    assert info["config"]["reference"] == ["atlas:blobatlas"]
    assert info["config"]["result_extension"] == ".nii.gz" and info["config"]["result_dtype"] == "uint8"


def test_propagation_returns_the_reference_labels_on_the_scan(propagate, setup):
    request = propagate.resolve_request({"image": "fixed", "reference": "atlas:blobatlas", "device": "cpu"},
                                        setup["resolve"])
    file, result = propagate(request)
    scan = nib.load(setup["fixed"])
    out = nib.load(file)
    assert out.shape == scan.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, scan.affine, atol=1e-6)
    # the pipeline's registration of the reference (moving) onto the scan (fixed), labels by nearest neighbour
    ref = register(setup["fixed"], setup["atlas"].image, setup["bundle"].network, inverse=False, device="cpu")
    np.testing.assert_array_equal(np.asarray(out.dataobj), ref.warp(setup["atlas"].label, labels=True))
    present = {int(v) for v in np.unique(np.asarray(out.dataobj))} - {0}
    assert result["label_names"] == {n: v for n, v in LABEL_NAMES.items() if v in present}
    assert result["reference"] == "atlas:blobatlas" and result["reference_labels"] == LABEL_NAMES
    assert sum(result["label_voxels"].values()) == int(np.count_nonzero(np.asarray(out.dataobj)))


def test_propagation_writes_nrrd_that_simpleitk_reads_on_the_scan_grid(propagate, setup):
    sitk = pytest.importorskip("SimpleITK")
    request = propagate.resolve_request({"image": "fixed", "reference": "atlas:blobatlas", "device": "cpu",
                                         "result_extension": ".nrrd", "result_dtype": "uint8"}, setup["resolve"])
    file, _ = propagate(request)
    assert file.endswith("_labels.nrrd")
    img = sitk.ReadImage(file)  # what the Slicer plugin does with the result
    nifti_file, _ = propagate(propagate.resolve_request({"image": "fixed", "reference": "atlas:blobatlas",
                                                         "device": "cpu"}, setup["resolve"]))
    expected = np.asarray(nib.load(nifti_file).dataobj)
    assert img.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), expected)
    ref = sitk.ReadImage(setup["fixed"])
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)


def test_propagation_rejects_bad_requests_before_work(propagate, setup):
    cases = (({"image": "fixed", "reference": "atlas:nope"}, 404, "No atlas 'atlas:nope'"),
             ({"image": "fixed", "reference": "moving"}, 404, "reference 'moving'.*atlas:blobatlas"),
             ({"image": "fixed", "reference": ""}, 400, "No reference"),
             ({"reference": "atlas:blobatlas"}, 400, "No image"),
             ({"image": "nope", "reference": "atlas:blobatlas"}, 404, "'nope' is not an image id"),
             ({"image": "fixed", "reference": "atlas:blobatlas", "result_extension": ".mha"}, 400,
              "result_extension"),
             ({"image": "fixed", "reference": "atlas:blobatlas", "result_dtype": "float32"}, 400, "result_dtype"),
             ({"image": "fixed", "reference": "atlas:blobatlas", "io_iterations": 99}, 400, "io_iterations"))
    for request, status, pattern in cases:
        with pytest.raises(RegistrationRequestError, match=pattern) as err:
            propagate.resolve_request(request, setup["resolve"])
        assert err.value.status_code == status, request


# ---- what the 3D Slicer plugin needs (its own code, from the installed monailabel package) ------------------------


def _plugin() -> SlicerPlugin:
    path = slicer_plugin_path(sys.prefix)
    if not os.path.isfile(path):
        pytest.skip(f"the Slicer plugin is not where pip installs it with monailabel: {path}")
    return SlicerPlugin(path)


def test_slicer_plugin_lists_runs_and_names_the_propagation(propagate, setup):
    plugin = _plugin()
    info = propagate.info()
    assert info["type"] in plugin.segmentation_types()
    assert GradICONRegistrationTask.task_type not in plugin.segmentation_types()  # API clients only
    params = plugin.params_from_config(info["config"])
    assert params["reference"] == "atlas:blobatlas"  # the first choice of the option's combo box
    params.update(plugin.infer_params())
    assert params["result_extension"] == ".nrrd" and params["result_dtype"] == "uint8"
    request = propagate.resolve_request({"image": "fixed", "device": "cpu", **params}, setup["resolve"])
    file, result = propagate(request)
    names = plugin.segment_names(json.loads(json.dumps(result)), info)
    # Slicer imports the label values present, in increasing order, as the listed segments
    import SimpleITK as sitk

    values = sorted({int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(file)))} - {0})
    by_value = {v: n for n, v in LABEL_NAMES.items()}
    assert names == [by_value[v] for v in values] and len(names) >= 2


# ---- the app ---------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_datastore_watcher(monkeypatch):
    """MONAI Label's local datastore starts a file watcher by default that refreshes the datastore from its own
    thread when files change; a test that copies a study in and then refreshes raced it (monailabel's
    ``_remove_non_existing``: "dictionary changed size during iteration", about 1 run in 5 of this module).
    The tests refresh explicitly where they add files, so the apps they build do without the watcher."""
    from monailabel.config import settings

    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)


def _app(setup, tmp_path, conf=None):
    from monailabel.interfaces.utils.app import app_instance

    app_dir = tmp_path / "app"
    shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("model", "lib", "logs", "bin", "__pycache__"))
    conf = {"models": "tiny", "bundle_dirs": str(setup["root"] / "bundles"), "output_dir": str(tmp_path / "out"),
            "atlas_dirs": str(setup["root"] / "atlases"), **(conf or {})}
    return app_instance(str(app_dir), str(setup["root"] / "studies"), conf)


def test_app_serves_registration_and_propagation(setup, tmp_path):
    app = _app(setup, tmp_path)
    models = app.info()["models"]
    assert sorted(models) == ["tiny", "tiny_propagate"]
    assert models["tiny_propagate"]["type"] == "segmentation"
    assert models["tiny_propagate"]["config"]["reference"] == ["atlas:blobatlas"]
    res = app.infer({"model": "tiny", "image": "moving", "fixed_image": "fixed", "device": "cpu"})
    assert nib.load(res["file"]).shape == nib.load(setup["fixed"]).shape
    res = app.infer({"model": "tiny_propagate", "image": "fixed", "reference": "atlas:blobatlas", "device": "cpu"})
    assert nib.load(res["file"]).shape == nib.load(setup["fixed"]).shape
    assert set(res["params"]["label_names"]) <= set(LABEL_NAMES)
    app.stop_pruning()


def test_app_offers_labelled_datastore_studies_as_references(setup, tmp_path):
    studies = tmp_path / "studies"
    shutil.copytree(setup["root"] / "studies", studies)
    shutil.copy(setup["atlas"].image, studies / "labelled.nii.gz")
    from monailabel.interfaces.utils.app import app_instance

    app_dir = tmp_path / "app"
    shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("model", "lib", "logs", "bin", "__pycache__"))
    app = app_instance(str(app_dir), str(studies), {"models": "tiny", "bundle_dirs": str(setup["root"] / "bundles"),
                                                    "output_dir": str(tmp_path / "out"),
                                                    "atlas_dirs": str(tmp_path / "no_atlases")})
    # what the Slicer plugin's "Submit label" stores with a label
    app.datastore().save_label("labelled", setup["atlas"].label, "final",
                               {"label_info": [{"name": "core", "idx": 1}, {"name": "shell", "idx": 2},
                                               {"name": "far corner", "idx": 3}]})
    assert app.info()["models"]["tiny_propagate"]["config"]["reference"] == ["labelled"]
    res = app.infer({"model": "tiny_propagate", "image": "fixed", "reference": "labelled", "device": "cpu"})
    expected = register(setup["fixed"], setup["atlas"].image, setup["bundle"].network, inverse=False, device="cpu")
    np.testing.assert_array_equal(np.asarray(nib.load(res["file"]).dataobj),
                                  expected.warp(setup["atlas"].label, labels=True))
    assert set(res["params"]["label_names"]) <= set(LABEL_NAMES)
    app.stop_pruning()


def test_app_maps_errors_to_http(setup, tmp_path):
    from fastapi import HTTPException

    app = _app(setup, tmp_path)
    flat = write_nifti(str(tmp_path / "flat.nii.gz"), np.random.rand(30, 30).astype(np.float32), np.eye(4))
    shutil.copy(flat, setup["root"] / "studies" / "flat2d.nii.gz")
    app.datastore().refresh()
    for request, status in (
        ({"model": "tiny", "image": "moving"}, 400),
        ({"model": "tiny", "image": "moving", "fixed_image": "nope"}, 404),
        ({"model": "tiny", "image": "moving", "fixed_image": flat}, 404),  # a server path, not accepted
        ({"model": "tiny", "image": "moving", "fixed_image": "flat2d"}, 422),
        ({"model": "tiny", "image": "moving", "fixed_image": "fixed", "padding_mode": "reflect"}, 400),
        ({"model": "tiny_propagate", "image": "fixed", "reference": "atlas:none"}, 404),
        ({"model": "other", "image": "moving", "fixed_image": "fixed"}, 404),
    ):
        with pytest.raises(HTTPException) as err:
            app.infer(request)
        assert err.value.status_code == status, (request, err.value.detail)
        assert err.value.detail
    os.remove(setup["root"] / "studies" / "flat2d.nii.gz")
    # and it still serves
    res = app.infer({"model": "tiny", "image": "moving", "fixed_image": "fixed", "device": "cpu"})
    assert os.path.isfile(res["file"])
    app.stop_pruning()


def test_app_queue_refuses_when_full(setup, tmp_path):
    from fastapi import HTTPException

    app = _app(setup, tmp_path, {"max_concurrent": "1", "max_queue": "0"})
    with app.queue.admit("held by the test"):
        with pytest.raises(HTTPException) as err:
            app.infer({"model": "tiny", "image": "moving", "fixed_image": "fixed", "device": "cpu"})
    assert err.value.status_code == 503 and "busy" in err.value.detail and err.value.headers["Retry-After"]
    app.stop_pruning()


def test_app_prunes_results_on_a_timer(setup, tmp_path):
    app = _app(setup, tmp_path, {"prune_interval_seconds": "0.1", "output_max_age_seconds": "0.3"})
    res = app.infer({"model": "tiny", "image": "moving", "fixed_image": "fixed", "device": "cpu", "output": "json"})
    kept = res["params"]["ddf"]
    assert os.path.isfile(kept)
    deadline = time.monotonic() + 10
    while os.path.exists(kept) and time.monotonic() < deadline:  # bounded wait for the timer
        time.sleep(0.1)
    assert not os.path.exists(kept)
    app.stop_pruning()


def test_app_conf_is_checked(setup, tmp_path):
    with pytest.raises(ValueError, match="max_io_iterations must be a int"):
        _app(setup, tmp_path, {"max_io_iterations": "lots"})


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
