"""The MONAI Label door: bundle loading and the pre / infer / post / write steps of a request, without monailabel
and without a server (always runs). The registration is the shared pipeline, so a request gives exactly the
command line's field."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from monailabel_helpers import (
    NETWORK_SHAPE,
    blob_volume,
    grid_affine,
    make_network,
    write_bundle,
    write_nifti,
    write_pair,
)
from monai_gradicon.io import read_displacement_field
from monai_gradicon.model_card import CardError
from monai_gradicon.monailabel import (
    RegistrationRequestError,
    RequestDeadline,
    RequestQueue,
    check_input_size,
    find_atlases,
    find_bundles,
    finish_registration,
    load_atlas,
    load_bundle,
    prepare_request,
    propagate_labels,
    prune_outputs,
    register_files,
    run_registration,
    write_label_map,
    write_outputs,
)
from monai_gradicon.pipeline import register
from monai_gradicon.resample import Grid, displacement_to_ddf
from monai_gradicon.weights import WeightFileError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel_pipeline")
    write_bundle(str(root / "bundles" / "tiny"), make_network(scale=0.05))
    write_bundle(str(root / "bundles" / "identity"), make_network(scale=0.0))
    fixed, moving = write_pair(str(root / "images"))
    return {"root": root, "fixed": fixed, "moving": moving}


@pytest.fixture(scope="module")
def tiny(workdir):
    return load_bundle(workdir["root"] / "bundles" / "tiny")


@pytest.fixture(scope="module")
def identity(workdir):
    return load_bundle(workdir["root"] / "bundles" / "identity")


def test_import_does_not_pull_monailabel():
    code = (
        "import sys, monai_gradicon, monai_gradicon.monailabel as m; "
        "assert 'monailabel' not in sys.modules, 'monailabel imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_lazy_task_attribute_names_the_extra():
    import monai_gradicon.monailabel as m

    if m.monailabel_available():
        assert m.GradICONRegistrationTask.__name__ == "GradICONRegistrationTask"
    else:
        with pytest.raises(ImportError, match=r"monai-gradicon\[monailabel\]"):
            m.GradICONRegistrationTask  # noqa: B018


def test_load_bundle_reads_the_weights_and_card(tiny):
    assert tiny.spatial_dims == 3 and tiny.network_shape == NETWORK_SHAPE
    assert tiny.card.preprocessing == "none" and tiny.card.axis_order == "reference"
    assert not tiny.network.training
    assert all(not p.requires_grad for p in tiny.network.parameters())
    # the weights are the file's, not a fresh initialisation
    saved = torch.load(os.path.join(tiny.root, "models", "model.pt"), weights_only=True)
    for k, v in tiny.network.state_dict().items():
        assert torch.equal(v, saved["network." + k]), k


def test_card_must_agree_with_the_bundle_metadata(tmp_path):
    folder = write_bundle(str(tmp_path / "b"), make_network(), card={"axis_order": "reference",
                                                                     "preprocessing": "lung_ct", "modality": "ct"})
    with pytest.raises(CardError, match="preprocessing: the card says 'none'"):
        load_bundle(folder)


def test_weights_are_loaded_strictly(tmp_path):
    folder = write_bundle(str(tmp_path / "bad"), make_network())
    state = torch.load(os.path.join(folder, "models", "model.pt"), weights_only=True)
    state.pop("network.steps.0.unet.lastConv.bias")
    torch.save(state, os.path.join(folder, "models", "model.pt"))
    with pytest.raises(WeightFileError, match="missing"):
        load_bundle(folder)


def test_missing_weights_are_named(tmp_path):
    folder = write_bundle(str(tmp_path / "noweights"), make_network())
    os.remove(os.path.join(folder, "models", "model.pt"))
    with pytest.raises(FileNotFoundError, match="model.pt.*convert-weights"):
        load_bundle(folder)


def test_find_bundles(workdir, tmp_path):
    found = find_bundles([tmp_path / "nowhere", workdir["root"] / "bundles"])
    assert set(found) == {"tiny", "identity"}
    assert find_bundles([workdir["root"] / "bundles"], ["tiny"]) == {"tiny": found["tiny"]}
    with pytest.raises(FileNotFoundError, match="gradicon_lung"):
        find_bundles([workdir["root"] / "bundles"], ["gradicon_lung"])


def test_register_files_outputs_on_fixed_grid(tiny, workdir, tmp_path):
    warped_path, ddf_path = tmp_path / "w.nii.gz", tmp_path / "d.nii.gz"
    info = register_files(tiny, workdir["moving"], workdir["fixed"], warped_path, ddf_path)
    fixed = nib.load(workdir["fixed"])
    warped = nib.load(warped_path)
    assert warped.shape == fixed.shape
    assert warped.get_data_dtype() == np.float32
    np.testing.assert_allclose(warped.affine, fixed.affine, rtol=0, atol=0)
    assert np.isfinite(np.asarray(warped.dataobj)).all()
    u, affine = read_displacement_field(ddf_path)
    assert u.shape == (3, *fixed.shape)
    np.testing.assert_allclose(affine, fixed.affine, rtol=0, atol=0)
    assert info["ddf_units"] == "mm" and info["ddf"] == os.fspath(ddf_path)
    assert "LPS" in info["ddf_convention"] and info["instance_optimization_steps"] == 0
    assert info["displacement_mm_max"] > 0 and info["settings"]["transform_scheme"] == "grid"
    json.dumps(info)  # the result JSON must be serialisable


def test_same_field_as_the_command_line_pipeline(tiny, workdir, tmp_path):
    """The door runs the shared pipeline: bit-for-bit the field of monai_gradicon.pipeline.register (the command
    line's), for both transform schemes."""
    for scheme in ("grid", "exact"):
        register_files(tiny, workdir["moving"], workdir["fixed"], tmp_path / "w.nii.gz", tmp_path / f"{scheme}.nii.gz",
                       transform_scheme=scheme)
        u, _ = read_displacement_field(tmp_path / f"{scheme}.nii.gz")
        res = register(workdir["fixed"], workdir["moving"], tiny.network, transform_scheme=scheme, inverse=False,
                       device="cpu")
        np.testing.assert_array_equal(u, res.displacement.astype(np.float32))
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "w.nii.gz").dataobj), res.warped_moving)


def test_identity_network_on_matching_boxes_is_world_identity(identity, tmp_path):
    """Zero network output + images whose bounding boxes coincide: fixed point x maps to x, and the warped moving
    image is the moving image resampled by world coordinates (here: the same blob as the fixed image)."""
    fa = grid_affine((1.5, 1.5, 1.5), (-30.0, -27.0, -24.0))
    # same box: first voxel edge at origin - spacing / 2 and the same extent (40 * 1.5 = 30 * 2 = 60 mm, ...)
    ma = grid_affine((2.0, 2.0, 2.0), (-30.0 - 0.75 + 1.0, -27.0 - 0.75 + 1.0, -24.0 - 0.75 + 1.0))
    fixed = write_nifti(str(tmp_path / "f.nii.gz"), blob_volume((40, 40, 32), (0, 0, 0), fa), fa)
    moving = write_nifti(str(tmp_path / "m.nii.gz"), blob_volume((30, 30, 24), (0, 0, 0), ma), ma)
    prepared = prepare_request(identity, moving, fixed)
    fields = finish_registration(prepared, run_registration(identity, prepared))
    assert np.abs(fields.displacement).max() < 1e-3
    ref = blob_volume((40, 40, 32), (0, 0, 0), fa)
    inner = (slice(2, -2),) * 3
    assert np.abs(fields.warped_moving[inner] - ref[inner]).max() < 3.0  # linear interpolation of a 12 mm blob at 2 mm


def test_ddf_voxel_units(tiny, workdir, tmp_path):
    prepared = prepare_request(tiny, workdir["moving"], workdir["fixed"])
    fields = finish_registration(prepared, run_registration(tiny, prepared))
    info = write_outputs(prepared, fields, tmp_path / "w.nii.gz", tmp_path / "ddf_vox.nii.gz", ddf_units="voxel")
    ddf = nib.load(tmp_path / "ddf_vox.nii.gz")
    assert ddf.shape == (*prepared.inputs.fixed.shape, 3)
    expected = displacement_to_ddf(fields.displacement, Grid.of(prepared.inputs.fixed))
    np.testing.assert_array_equal(np.moveaxis(np.asarray(ddf.dataobj), -1, 0), expected)
    assert info["ddf_units"] == "voxel" and "MONAI" in info["ddf_convention"]
    with pytest.raises(RegistrationRequestError):
        write_outputs(prepared, fields, tmp_path / "w.nii.gz", tmp_path / "x.nii.gz", ddf_units="cm")


def test_masks_reach_the_network(tiny, workdir, tmp_path):
    masks = {}
    for key, image in zip(("fixed_mask", "moving_mask"), (workdir["fixed"], workdir["moving"])):
        img = nib.load(image)
        masks[key] = write_nifti(str(tmp_path / f"{key}.nii.gz"), (np.asarray(img.dataobj) > 40).astype(np.uint8),
                                 img.affine)
    plain = register_files(tiny, workdir["moving"], workdir["fixed"], tmp_path / "w.nii.gz", tmp_path / "d.nii.gz")
    masked = register_files(tiny, workdir["moving"], workdir["fixed"], tmp_path / "wm.nii.gz", tmp_path / "dm.nii.gz",
                            masks=masks)
    assert masked["displacement_mm_max"] != plain["displacement_mm_max"]
    with pytest.raises(RegistrationRequestError, match="Unknown mask parameters") as err:
        prepare_request(tiny, workdir["moving"], workdir["fixed"], {"fixed_label": masks["fixed_mask"]})
    assert err.value.status_code == 400
    small = write_nifti(str(tmp_path / "small.nii.gz"), np.ones((5, 5, 5), np.uint8), np.eye(4))
    with pytest.raises(RegistrationRequestError, match="fixed mask has shape") as err:
        prepare_request(tiny, workdir["moving"], workdir["fixed"], {"fixed_mask": small})
    assert err.value.status_code == 422


@pytest.mark.slow
def test_instance_optimization_runs_and_restores_weights(tiny, workdir):
    before = {k: v.clone() for k, v in tiny.network.state_dict().items()}
    prepared = prepare_request(tiny, workdir["moving"], workdir["fixed"], io_iterations=1)
    transforms = run_registration(tiny, prepared)
    assert len(transforms.io_history) == 1
    for k, v in tiny.network.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in tiny.network.parameters())
    assert np.isfinite(finish_registration(prepared, transforms).displacement).all()


# ---- bad requests: the errors carry a 4xx status and say what is wrong ------------------------------------------


def test_missing_fixed_image_is_400(tiny, workdir):
    for fixed in (None, "", "  "):
        with pytest.raises(RegistrationRequestError, match="fixed image") as err:
            prepare_request(tiny, workdir["moving"], fixed)
        assert err.value.status_code == 400


def test_missing_file_is_404(tiny, workdir, tmp_path):
    with pytest.raises(RegistrationRequestError, match="does not exist") as err:
        prepare_request(tiny, workdir["moving"], tmp_path / "nope.nii.gz")
    assert err.value.status_code == 404


def test_unreadable_file_is_422(tiny, workdir, tmp_path):
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(RegistrationRequestError, match="Cannot read the fixed image") as err:
        prepare_request(tiny, workdir["moving"], bad)
    assert err.value.status_code == 422


def test_2d_vs_3d_is_422(tiny, workdir, tmp_path):
    flat = write_nifti(str(tmp_path / "slice.nii.gz"), np.random.rand(40, 36).astype(np.float32) * 100, np.eye(4))
    with pytest.raises(RegistrationRequestError, match="2D .* 3D|3D .* 2D") as err:
        prepare_request(tiny, workdir["moving"], flat)
    assert err.value.status_code == 422
    with pytest.raises(RegistrationRequestError, match="registers 3D images") as err:
        prepare_request(tiny, flat, flat)
    assert err.value.status_code == 422


def test_constant_image_is_422(tiny, workdir, tmp_path):
    const = write_nifti(str(tmp_path / "c.nii.gz"), np.full((20, 20, 20), 5, np.float32), np.eye(4))
    with pytest.raises(RegistrationRequestError, match="constant") as err:
        prepare_request(tiny, const, workdir["fixed"])
    assert err.value.status_code == 422


def test_bad_parameters_are_400_before_the_network_runs(tiny, workdir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network ran for a bad request")

    monkeypatch.setattr("monai_gradicon.monailabel.pipeline.run_network", no_network)
    for kwargs, word in (({"padding_mode": "reflect"}, "padding_mode"), ({"ddf_units": "cm"}, "ddf_units"),
                         ({"orientation": "lps"}, "orientation"),
                         ({"transform_scheme": "bspline"}, "transform_scheme")):
        with pytest.raises(RegistrationRequestError, match=word) as err:
            register_files(tiny, workdir["moving"], workdir["fixed"], "/tmp/never_w.nii.gz", "/tmp/never_d.nii.gz",
                           **kwargs)
        assert err.value.status_code == 400


def test_real_bundles_load_when_present():
    """The repository's bundles, once they have trained or converted weights, load for serving."""
    root = os.path.join(os.path.dirname(__file__), "..", "bundles")
    found = {n: p for n, p in find_bundles([root]).items() if os.path.isfile(os.path.join(p, "models", "model.pt"))}
    if not found:
        pytest.skip("no bundle with models/model.pt under bundles/ yet (the README's main command trains one)")
    for name, path in found.items():
        b = load_bundle(path)
        assert b.spatial_dims == 3 and b.card.axis_order == "reference", name


# ---- bounds: input size, wall time, queue, result files ---------------------------------------------------------


def _truncated_copy(src, dst):
    """A NIfTI whose header is intact but whose voxel data is cut off: reading it fails, its header does not."""
    import gzip

    raw = gzip.decompress(open(src, "rb").read())
    dst.write_bytes(gzip.compress(raw[: 352 + 100]))
    return dst


def test_input_size_is_checked_from_the_header_before_reading(tiny, workdir, tmp_path):
    shape = nib.load(workdir["fixed"]).shape
    assert check_input_size(workdir["fixed"], "fixed image", int(np.prod(shape))) == shape
    cut = _truncated_copy(workdir["fixed"], tmp_path / "cut.nii.gz")
    with pytest.raises(RegistrationRequestError, match=r"fixed image has 46080 voxels .* at most 1000") as err:
        check_input_size(cut, "fixed image", 1000)
    assert err.value.status_code == 413
    # the same limit stops prepare_request before the (unreadable) data is touched: 413, not 422
    with pytest.raises(RegistrationRequestError) as err:
        prepare_request(tiny, workdir["moving"], cut, max_voxels=1000)
    assert err.value.status_code == 413
    with pytest.raises(RegistrationRequestError) as err:
        prepare_request(tiny, workdir["moving"], cut, max_voxels=10**9)
    assert err.value.status_code == 422  # within the limit: read, and the truncated data is named
    with pytest.raises(RegistrationRequestError) as err:
        check_input_size(tmp_path / "nope.nii.gz", "fixed image", 10)
    assert err.value.status_code == 404 and "nope" not in str(err.value)


def test_deadline_stops_instance_optimization_and_restores_weights(tiny, workdir):
    before = {k: v.clone() for k, v in tiny.network.state_dict().items()}
    prepared = prepare_request(tiny, workdir["moving"], workdir["fixed"], io_iterations=3)
    deadline = RequestDeadline(1e-6)
    import time

    time.sleep(0.01)
    with pytest.raises(RegistrationRequestError, match="ran out of time before the network") as err:
        run_registration(tiny, prepared, "cpu", deadline)
    assert err.value.status_code == 503
    # a deadline that passes during instance optimization: the objective refuses the next step
    deadline = RequestDeadline(60.0)
    from monai_gradicon.monailabel import pipeline as door

    calls = []
    original = door._DeadlineObjective.forward

    def count_then_expire(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            deadline.start -= 3600.0  # the second step finds the budget spent
        return original(self, *args, **kwargs)

    door._DeadlineObjective.forward = count_then_expire
    try:
        with pytest.raises(RegistrationRequestError, match="during instance optimization"):
            run_registration(tiny, prepared, "cpu", deadline)
    finally:
        door._DeadlineObjective.forward = original
    assert len(calls) == 2
    for k, v in tiny.network.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in tiny.network.parameters())
    with pytest.raises(ValueError, match="positive"):
        RequestDeadline(0)


def test_request_queue_is_first_come_first_served_and_bounded():
    import threading
    import time

    queue = RequestQueue(slots=1, max_waiting=3)
    order, started = [], threading.Event()
    release = threading.Event()

    def first():
        with queue.admit():
            started.set()
            release.wait(10)
            order.append(0)

    def later(i):
        with queue.admit():
            order.append(i)

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert started.wait(10)
    for i in (1, 2, 3):
        t = threading.Thread(target=later, args=(i,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 10
        while queue.status()["waiting"] < i and time.monotonic() < deadline:
            time.sleep(0.005)
    assert queue.status() == {"running": 1, "waiting": 3, "slots": 1, "max_waiting": 3}
    with pytest.raises(RegistrationRequestError, match="busy: 1 .* 3 waiting") as err:
        with queue.admit():
            pass
    assert err.value.status_code == 503
    release.set()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3]
    assert queue.status()["running"] == 0 and queue.status()["waiting"] == 0


def test_request_queue_wait_limit():
    import threading

    queue = RequestQueue(slots=1, max_waiting=2, max_wait_s=0.05)
    hold, holding = threading.Event(), threading.Event()

    def holder():
        with queue.admit():
            holding.set()
            hold.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(10)
    with pytest.raises(RegistrationRequestError, match="waited 0.05 s") as err:
        with queue.admit("tiny"):
            pass
    assert err.value.status_code == 503 and queue.status()["waiting"] == 0
    hold.set()
    t.join(10)
    with queue.admit():  # free again
        assert queue.status()["running"] == 1


def test_prune_outputs_by_age_and_size_only_touches_result_files(tmp_path):
    import time

    now = time.time()
    files = {}
    for name, age, size in (("a_warped.nii.gz", 5000, 10), ("b_ddf.nii.gz", 30, 400), ("c_labels.nrrd", 20, 400),
                            ("d_labels.nrrd", 10, 400), ("notes.txt", 9000, 10)):
        p = tmp_path / name
        p.write_bytes(b"x" * size)
        os.utime(p, (now - age, now - age))
        files[name] = p
    removed = prune_outputs(tmp_path, ("_warped.nii.gz", "_ddf.nii.gz", "_labels.nrrd"), max_age_s=600,
                            max_bytes=900, now=now)
    assert sorted(os.path.basename(p) for p in removed) == ["a_warped.nii.gz", "b_ddf.nii.gz"]
    assert not files["a_warped.nii.gz"].exists() and not files["b_ddf.nii.gz"].exists()  # too old; oldest over size
    assert files["c_labels.nrrd"].exists() and files["d_labels.nrrd"].exists() and files["notes.txt"].exists()


# ---- label propagation ---------------------------------------------------------------------------------------


def test_atlas_is_checked_when_loaded(tmp_path):
    from monailabel_helpers import LABEL_NAMES, write_atlas

    folder = write_atlas(str(tmp_path))
    ref = load_atlas(folder)
    assert ref.name == "atlas:blobatlas" and ref.label_names == LABEL_NAMES
    assert find_atlases([tmp_path / "none", tmp_path]) == {"atlas:blobatlas": ref}
    spec = json.load(open(os.path.join(folder, "atlas.json")))
    for names, pattern in (({"core": 1, "shell": 2}, r"values \[3\] that label_names does not name"),
                           ({"core": 1, "shell": 1, "far corner": 3}, "share a value"),
                           ({"background": 1, "shell": 2, "far corner": 3}, "other than 'background'"),
                           ({"core": 256, "shell": 2, "far corner": 3}, "1..255")):
        json.dump({**spec, "label_names": names}, open(os.path.join(folder, "atlas.json"), "w"))
        with pytest.raises(ValueError, match=pattern):
            load_atlas(folder)
    json.dump(spec, open(os.path.join(folder, "atlas.json"), "w"))
    img = nib.load(os.path.join(folder, "label.nii.gz"))
    write_nifti(os.path.join(folder, "label.nii.gz"), np.asarray(img.dataobj), img.affine + np.eye(4) * 0.1)
    with pytest.raises(ValueError, match="not on the image's grid"):
        load_atlas(folder)


def test_propagated_labels_are_the_pipelines_nearest_neighbour_warp(tiny, workdir, tmp_path):
    """The reference is the moving image, the scan the fixed one: the labels are exactly what the pipeline's
    RegistrationResult.warp(labels=True) gives for that registration (the command line's `warp --labels`)."""
    from monailabel_helpers import write_atlas

    ref = load_atlas(write_atlas(str(tmp_path)))
    prepared = prepare_request(tiny, ref.image, workdir["fixed"])
    fields = finish_registration(prepared, run_registration(tiny, prepared))
    labels, names = propagate_labels(prepared, fields, ref)
    res = register(workdir["fixed"], ref.image, tiny.network, inverse=False, device="cpu")
    expected = res.warp(ref.label, labels=True)
    np.testing.assert_array_equal(labels, expected)
    assert labels.shape == nib.load(workdir["fixed"]).shape and labels.dtype == np.uint8
    present = {int(v) for v in np.unique(labels)} - {0}
    assert {1, 2} <= present and names == {n: v for n, v in ref.label_names.items() if v in present}


def test_label_names_list_only_the_segments_present(tmp_path):
    """A segment that falls outside the scan is left out of the names, so value-ordered import stays aligned."""
    from types import SimpleNamespace

    from monai_gradicon.io import read_image
    from monailabel_helpers import write_atlas

    ref = load_atlas(write_atlas(str(tmp_path)))
    label = read_image(ref.label)
    scan = SimpleNamespace(inputs=SimpleNamespace(fixed=label))
    zero = SimpleNamespace(displacement=np.zeros((3, *label.shape)))
    labels, names = propagate_labels(scan, zero, ref)
    np.testing.assert_array_equal(labels, label.array)  # zero displacement on the reference's own grid: identity
    assert names == ref.label_names
    inner = read_image(ref.label)
    inner.array = inner.array[:-3, :-3, :-3]  # a scan grid that does not reach the far corner
    scan = SimpleNamespace(inputs=SimpleNamespace(fixed=inner))
    labels, names = propagate_labels(scan, SimpleNamespace(displacement=np.zeros((3, *inner.shape))), ref)
    assert 3 not in labels and names == {"core": 1, "shell": 2}


def test_label_map_files_nifti_and_nrrd_agree(tmp_path):
    from monai_gradicon.io import read_image

    affine = np.array([[0.0, -1.2, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0, 5.5], [0, 0, 0, 1]])
    labels = np.random.default_rng(0).integers(0, 4, size=(7, 6, 5)).astype(np.int32)
    nii = read_image(write_label_map(tmp_path / "l.nii.gz", labels, affine))
    nrrd = read_image(write_label_map(tmp_path / "l.nrrd", labels, affine))
    for img in (nii, nrrd):
        np.testing.assert_array_equal(img.array, labels)
        np.testing.assert_allclose(img.affine, affine, atol=1e-12)
    assert nib.load(tmp_path / "l.nii.gz").get_data_dtype() == np.uint8
    for bad, status, pattern in (((tmp_path / "l.nrrd", labels + 300, affine, "uint8"), 422, "do not fit"),
                                 ((tmp_path / "l.mha", labels, affine, "uint8"), 400, "result_extension"),
                                 ((tmp_path / "l.nrrd", labels, affine, "int64"), 400, "result_dtype")):
        with pytest.raises(RegistrationRequestError, match=pattern) as err:
            write_label_map(*bad)
        assert err.value.status_code == status


def test_shipped_atlas_loads():
    atlases = find_atlases([os.path.join(os.path.dirname(__file__), "..", "apps", "gradicon_monailabel", "atlases")])
    ref = atlases["atlas:mni152_2009a_2mm"]
    assert ref.label_names == {"gray matter": 1, "white matter": 2}
    img = nib.load(ref.label)
    assert img.shape == (98, 116, 94) and np.allclose(np.diag(img.affine)[:3], 2.0)
    counts = np.bincount(np.asarray(img.dataobj).ravel())
    assert counts[1] > 100_000 and counts[2] > 50_000  # real grey and white matter, not an empty map
