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

from monailabel_helpers import NETWORK_SHAPE, blob_volume, grid_affine, make_network, write_bundle, write_nifti, write_pair
from monai_gradicon.io import read_displacement_field
from monai_gradicon.model_card import CardError
from monai_gradicon.monailabel import (
    RegistrationRequestError,
    find_bundles,
    finish_registration,
    load_bundle,
    prepare_request,
    register_files,
    run_registration,
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
                         ({"orientation": "lps"}, "orientation"), ({"transform_scheme": "bspline"}, "transform_scheme")):
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
