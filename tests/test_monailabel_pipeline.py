"""The MONAI Label task's pre / infer / post logic, without monailabel and without a server (always runs)."""

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
    inference_config,
    make_network,
    write_bundle,
    write_nifti,
    write_pair,
)
from monai_gradicon.io import read_displacement_field
from monai_gradicon.monailabel import (
    RegistrationRequestError,
    find_bundles,
    load_bundle,
    prepare_pair,
    register_files,
    resample_to_fixed,
    run_registration_network,
    write_outputs,
)
from monai_gradicon.resample import Grid, displacement_to_ddf, physical_displacement
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


def test_load_bundle_discovers_keys(tiny):
    assert (tiny.moving_key, tiny.fixed_key, tiny.input_key) == ("moving_image", "fixed_image", "image")
    assert tiny.extra_keys == () and tiny.optional_keys == ()
    assert tiny.spatial_dims == 3 and tiny.network_shape == NETWORK_SHAPE
    assert not tiny.network.training
    assert all(not p.requires_grad for p in tiny.network.parameters())
    # the weights are the file's, not a fresh initialisation
    saved = torch.load(os.path.join(tiny.root, "models", "model.pt"), weights_only=True)
    for k, v in tiny.network.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_optional_and_required_keys(tmp_path):
    cfg = inference_config()
    cfg["preprocessing"]["transforms"].insert(
        0, {"_target_": "LoadImaged", "keys": ["fixed_label", "moving_label"], "ensure_channel_first": True,
            "allow_missing_keys": True})
    write_bundle(str(tmp_path / "opt"), make_network(), config=cfg)
    b = load_bundle(tmp_path / "opt")
    assert b.optional_keys == ("fixed_label", "moving_label") and b.extra_keys == ()


def test_required_extra_key_missing_is_400(tmp_path, workdir):
    cfg = inference_config()
    load_mask = {"_target_": "LoadImaged", "keys": "fixed_mask", "ensure_channel_first": True}
    cfg["preprocessing"]["transforms"].insert(0, load_mask)
    write_bundle(str(tmp_path / "req"), make_network(), config=cfg)
    b = load_bundle(tmp_path / "req")
    assert b.extra_keys == ("fixed_mask",)
    with pytest.raises(RegistrationRequestError, match="fixed_mask") as err:
        prepare_pair(b, workdir["moving"], workdir["fixed"])
    assert err.value.status_code == 400


def test_weights_are_loaded_strictly(tmp_path):
    folder = write_bundle(str(tmp_path / "bad"), make_network())
    state = torch.load(os.path.join(folder, "models", "model.pt"), weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, os.path.join(folder, "models", "model.pt"))
    with pytest.raises(WeightFileError, match="missing"):
        load_bundle(folder)


def test_missing_weights_are_named(tmp_path):
    folder = write_bundle(str(tmp_path / "noweights"), make_network())
    os.remove(os.path.join(folder, "models", "model.pt"))
    with pytest.raises(FileNotFoundError, match="model.pt"):
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
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-6)
    assert np.isfinite(np.asarray(warped.dataobj)).all()
    u, affine = read_displacement_field(ddf_path)
    assert u.shape == (3, *fixed.shape)
    np.testing.assert_allclose(affine, fixed.affine, atol=1e-6)
    assert info["ddf_units"] == "mm" and info["ddf"] == os.fspath(ddf_path)
    assert "LPS" in info["ddf_convention"] and info["instance_optimization_steps"] == 0
    assert info["displacement_mm_max"] > 0
    json.dumps(info)  # the result JSON must be serialisable


def test_matches_register_pair_geometry(tiny, workdir):
    """With a plain Resized(align_corners=False) preprocessing, the affine-based mapping gives exactly the project's
    physical displacement (monai_gradicon.resample.physical_displacement, used by register_pair)."""
    prepared = prepare_pair(tiny, workdir["moving"], workdir["fixed"])
    phi, _ = run_registration_network(tiny, prepared)
    out = resample_to_fixed(prepared, phi)
    ref = physical_displacement(phi, Grid.of(prepared.fixed), Grid.of(prepared.moving), prepared.network_shape)
    np.testing.assert_allclose(out.displacement, ref, atol=2e-4)


def test_matches_register_pair(tiny, workdir):
    registration_api = pytest.importorskip("monai_gradicon.registration_api")
    prepared = prepare_pair(tiny, workdir["moving"], workdir["fixed"])
    phi, _ = run_registration_network(tiny, prepared)
    out = resample_to_fixed(prepared, phi, padding_mode="border")
    res = registration_api.register_pair(
        workdir["fixed"], workdir["moving"], tiny.registration_network,
        preprocess=lambda x: np.clip(x / 100.0, 0.0, 1.0), input_shape=NETWORK_SHAPE, inverse=False,
        device="cpu", progress=False,
        reference_axis_order=False,  # the MONAI Label pipeline feeds the network the file's index order
    )
    np.testing.assert_allclose(out.displacement, res.displacement, atol=1e-3)
    np.testing.assert_allclose(out.warped, res.warped_moving, atol=1e-2)


def test_identity_network_on_matching_boxes_is_world_identity(identity, tmp_path):
    """Zero network output + images whose bounding boxes coincide: fixed point x maps to x, and the warped moving
    image is the moving image resampled by world coordinates (here: the same blob as the fixed image)."""
    fa = grid_affine((1.5, 1.5, 1.5), (-30.0, -27.0, -24.0))
    # same box: first voxel edge at origin - spacing / 2 and the same extent (40 * 1.5 = 30 * 2 = 60 mm, ...)
    ma = grid_affine((2.0, 2.0, 2.0), (-30.0 - 0.75 + 1.0, -27.0 - 0.75 + 1.0, -24.0 - 0.75 + 1.0))
    fixed = write_nifti(str(tmp_path / "f.nii.gz"), blob_volume((40, 40, 32), (0, 0, 0), fa), fa)
    moving = write_nifti(str(tmp_path / "m.nii.gz"), blob_volume((30, 30, 24), (0, 0, 0), ma), ma)
    prepared = prepare_pair(identity, moving, fixed)
    phi, _ = run_registration_network(identity, prepared)
    out = resample_to_fixed(prepared, phi)
    assert np.abs(out.displacement).max() < 1e-3
    ref = blob_volume((40, 40, 32), (0, 0, 0), fa)
    inner = (slice(2, -2),) * 3
    assert np.abs(out.warped[inner] - ref[inner]).max() < 3.0  # linear interpolation of a 12 mm blob at 2 mm


def test_ddf_voxel_units(tiny, workdir, tmp_path):
    prepared = prepare_pair(tiny, workdir["moving"], workdir["fixed"])
    phi, _ = run_registration_network(tiny, prepared)
    out = resample_to_fixed(prepared, phi)
    info = write_outputs(out, tmp_path / "w.nii.gz", tmp_path / "ddf_vox.nii.gz", ddf_units="voxel")
    ddf = nib.load(tmp_path / "ddf_vox.nii.gz")
    assert ddf.shape == (*prepared.fixed.shape, 3)
    expected = displacement_to_ddf(out.displacement, Grid.of(prepared.fixed))
    np.testing.assert_allclose(np.moveaxis(np.asarray(ddf.dataobj), -1, 0), expected, atol=1e-5)
    assert info["ddf_units"] == "voxel" and "MONAI" in info["ddf_convention"]
    with pytest.raises(RegistrationRequestError):
        write_outputs(out, tmp_path / "w.nii.gz", tmp_path / "x.nii.gz", ddf_units="cm")


@pytest.mark.slow
def test_instance_optimization_runs_and_restores_weights(tiny, workdir):
    before = {k: v.clone() for k, v in tiny.network.state_dict().items()}
    prepared = prepare_pair(tiny, workdir["moving"], workdir["fixed"])
    phi, info = run_registration_network(tiny, prepared, io_iterations=1)
    assert info["instance_optimization_steps"] == 1 and len(info["instance_optimization_loss"]) == 2
    for k, v in tiny.network.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in tiny.network.parameters())
    out = resample_to_fixed(prepared, phi)
    assert np.isfinite(out.displacement).all()


# ---- bad requests: the errors carry a 4xx status and say what is wrong ------------------------------------------


def test_missing_fixed_image_is_400(tiny, workdir):
    for fixed in (None, "", "  "):
        with pytest.raises(RegistrationRequestError, match="fixed image") as err:
            prepare_pair(tiny, workdir["moving"], fixed)
        assert err.value.status_code == 400


def test_missing_file_is_404(tiny, workdir, tmp_path):
    with pytest.raises(RegistrationRequestError, match="does not exist") as err:
        prepare_pair(tiny, workdir["moving"], tmp_path / "nope.nii.gz")
    assert err.value.status_code == 404


def test_unreadable_file_is_422(tiny, workdir, tmp_path):
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(RegistrationRequestError, match="Cannot read the fixed image") as err:
        prepare_pair(tiny, workdir["moving"], bad)
    assert err.value.status_code == 422


def test_2d_vs_3d_is_422(tiny, workdir, tmp_path):
    flat = write_nifti(str(tmp_path / "slice.nii.gz"), np.random.rand(40, 36).astype(np.float32) * 100, np.eye(4))
    with pytest.raises(RegistrationRequestError, match="2D .* 3D|3D .* 2D") as err:
        prepare_pair(tiny, workdir["moving"], flat)
    assert err.value.status_code == 422
    with pytest.raises(RegistrationRequestError, match="registers 3D images") as err:
        prepare_pair(tiny, flat, flat)
    assert err.value.status_code == 422


def test_constant_image_is_422(tiny, workdir, tmp_path):
    const = write_nifti(str(tmp_path / "c.nii.gz"), np.full((20, 20, 20), 5, np.float32), np.eye(4))
    with pytest.raises(RegistrationRequestError, match="constant") as err:
        prepare_pair(tiny, const, workdir["fixed"])
    assert err.value.status_code == 422


def test_bad_padding_mode_is_400(tiny, workdir):
    prepared = prepare_pair(tiny, workdir["moving"], workdir["fixed"])
    phi, _ = run_registration_network(tiny, prepared)
    with pytest.raises(RegistrationRequestError, match="padding_mode") as err:
        resample_to_fixed(prepared, phi, padding_mode="reflect")
    assert err.value.status_code == 400


def test_real_bundles_load_when_present():
    """The repository's bundles, once they have configs/inference.json and trained weights, load for serving."""
    root = os.path.join(os.path.dirname(__file__), "..", "bundles")
    found = {n: p for n, p in find_bundles([root]).items() if os.path.isfile(os.path.join(p, "models", "model.pt"))}
    if not found:
        pytest.skip("no bundle with configs/inference.json and models/model.pt under bundles/ yet")
    for name, path in found.items():
        b = load_bundle(path)
        assert b.spatial_dims == 3 and b.registration_network is not None, name
        assert {b.moving_key, b.fixed_key} == {"moving_image", "fixed_image"}, name


@pytest.mark.parametrize("name", ["gradicon_lung", "gradicon_brain"])
def test_repository_bundle_configs_serve(name, workdir, tmp_path):
    """The repository's real inference.json / metadata.json work with the task (keys, preprocessing, network_def),
    on a copy with a small network (1 step at 33^3) and stand-in weights, so no trained model.pt is needed."""
    import shutil

    src = os.path.join(os.path.dirname(__file__), "..", "bundles", name)
    if not os.path.isfile(os.path.join(src, "configs", "inference.json")):
        pytest.skip(f"bundles/{name}/configs/inference.json is not there yet")
    dst = tmp_path / name
    shutil.copytree(os.path.join(src, "configs"), dst / "configs")
    cfg = json.loads((dst / "configs" / "inference.json").read_text())
    if "spatial_size" not in cfg or "num_steps" not in cfg:
        pytest.skip(f"bundles/{name}/configs/inference.json has no spatial_size / num_steps to shrink")
    cfg.update({"spatial_size": list(NETWORK_SHAPE), "num_steps": 1})
    (dst / "configs" / "inference.json").write_text(json.dumps(cfg))
    (dst / "models").mkdir()
    torch.save(make_network(scale=0.05).state_dict(), dst / "models" / "model.pt")
    bundle = load_bundle(dst)
    assert {bundle.moving_key, bundle.fixed_key} == {"moving_image", "fixed_image"}
    assert bundle.extra_keys == ()  # masks, if any, are optional
    info = register_files(bundle, workdir["moving"], workdir["fixed"], tmp_path / "w.nii.gz", tmp_path / "d.nii.gz")
    assert nib.load(tmp_path / "w.nii.gz").shape == nib.load(workdir["fixed"]).shape
    assert info["displacement_mm_max"] > 0
    if bundle.optional_keys:  # e.g. the lung masks: given as extra request params
        masks = {}
        for key, image in zip(("fixed_label", "moving_label"), (workdir["fixed"], workdir["moving"])):
            img = nib.load(image)
            mask = (np.asarray(img.dataobj) > 40).astype(np.uint8)
            masks[key] = write_nifti(str(tmp_path / f"{key}.nii.gz"), mask, img.affine)
        assert set(masks) <= set(bundle.optional_keys)
        with_masks = register_files(bundle, workdir["moving"], workdir["fixed"], tmp_path / "wm.nii.gz",
                                    tmp_path / "dm.nii.gz", extras=masks)
        assert with_masks["displacement_mm_max"] != info["displacement_mm_max"]  # the masks reached the network
