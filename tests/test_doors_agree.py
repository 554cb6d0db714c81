"""Every door runs one pipeline: the command line, the bundle's inference workflow, the MONAI Label door and the
Python API give the same field for the same real pair and weights.

The pair is real chest CT (``../shared/data``, pyradiomics lung1 / lung2 crops) with lung masks made by
thresholding: the fixed image is stored with a **permuted** direction matrix (voxel axis 0 runs along world z), the
moving image as NRRD in LPS space; different sizes, spacings, origins and orientations. The weights are a small
random 1-step network with a model card (reference axis order, ``lung_ct``), in a copy of the repository's
``gradicon_lung`` bundle, so the bundle's real ``inference.json`` runs.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from monai_gradicon.cli import main as cli_main
from monai_gradicon.io import read_displacement_field, read_image, write_nifti
from monai_gradicon.monailabel import load_bundle, register_files
from monai_gradicon.networks.registration import gradicon_network
from monai_gradicon.pipeline import register
from monai_gradicon.weights import save_weights
from bundle_helpers import BUNDLES, quiet
from test_io import _nrrd_bytes

NET_SHAPE = [33, 33, 33]
SLIM = {"down_channels": (8, 16, 16, 32, 32), "up_channels": (8, 16, 16, 16, 16)}
TOLERANCE_MM = 1e-3  # the bar; the doors share the code, so they agree to float32 rounding of ~300 mm


def _crop(shared, name, step, z):
    img = read_image(os.path.join(shared, "lung_ct_pyradiomics", name))
    sl = (slice(96, 416, step), slice(96, 416, step), z)
    aff = img.affine.copy()
    aff[:3, :3] = img.affine[:3, :3] @ np.diag([step, step, 1])
    aff[:3, 3] = img.affine[:3, :3] @ np.array([96, 96, z.start]) + img.affine[:3, 3]
    return img.array[sl].astype(np.int16), aff


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from conftest import SHARED_DATA

    shared = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(os.path.join(shared, "lung_ct_pyradiomics")):
        pytest.skip("../shared/data is not present")
    d = tmp_path_factory.mktemp("doors")
    f_arr, f_aff = _crop(shared, "lung1_image.nrrd", 8, slice(8, 44))
    # fixed: stored with a permuted direction matrix (array axes (k, i, j) of the crop)
    perm = (2, 0, 1)
    f_arr_p = np.ascontiguousarray(np.transpose(f_arr, perm))
    f_aff_p = f_aff.copy()
    f_aff_p[:, :3] = f_aff[:, list(perm)]
    write_nifti(d / "fixed.nii.gz", f_arr_p, f_aff_p)
    write_nifti(d / "fixed_mask.nii.gz", (f_arr_p < -400).astype(np.uint8), f_aff_p)
    m_arr, m_aff = _crop(shared, "lung2_image.nrrd", 10, slice(16, 56))
    lps = m_aff.copy()
    lps[:2] *= -1  # RAS -> LPS rows for the NRRD header
    (d / "moving.nrrd").write_bytes(_nrrd_bytes(m_arr, [lps[:3, k] for k in range(3)], lps[:3, 3]))
    write_nifti(d / "moving_mask.nii.gz", (m_arr < -400).astype(np.uint8), m_aff)

    torch.manual_seed(0)
    net = gradicon_network(1, 3, NET_SHAPE, preprocessing="lung_ct", modality="ct", **SLIM)
    with torch.no_grad():
        net.steps[0].unet.lastConv.weight.normal_(0, 3e-3)
    bundle = d / "gradicon_lung"
    shutil.copytree(BUNDLES / "gradicon_lung" / "configs", bundle / "configs")
    save_weights(net, bundle / "models" / "model.pt")
    datalist = {"validation": [{"fixed_image": "fixed.nii.gz", "moving_image": "moving.nrrd",
                                "fixed_label": "fixed_mask.nii.gz", "moving_label": "moving_mask.nii.gz",
                                "case": "pair"}]}
    (d / "datalist.json").write_text(json.dumps(datalist))
    return d, bundle, net


def _bundle_inference(bundle, datalist, out_dir, net):
    from monai.bundle import ConfigWorkflow

    quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inference = json.loads((bundle / "configs" / "inference.json").read_text())
        inference["network_def"]["network"].update(SLIM)  # the slim test network (widths are not config values)
        (bundle / "configs" / "inference.json").write_text(json.dumps(inference))
        wf = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"), workflow_type="infer",
                            meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                            bundle_root=str(bundle), datalist=str(datalist), output_dir=str(out_dir),
                            spatial_size=NET_SHAPE, num_steps=1)
        wf.initialize()
        assert wf.check_properties() == []
        wf.run()
        wf.finalize()


def test_all_doors_give_the_same_field(case, tmp_path, capsys):
    d, bundle, net = case
    fixed, moving, fmask, mmask = d / "fixed.nii.gz", d / "moving.nrrd", d / "fixed_mask.nii.gz", d / "moving_mask.nii.gz"
    fields = {}
    # Python API
    api = register(fixed, moving, net, fixed_mask=fmask, moving_mask=mmask, inverse=False, device="cpu")
    fields["python"] = api.displacement
    assert np.abs(api.displacement).max() > 0.5  # a real deformation, not the identity
    # command line
    code = cli_main(["register", "--fixed", fixed, "--moving", moving, "--fixed_mask", fmask, "--moving_mask", mmask,
                     "--weights", bundle / "models" / "model.pt", "--io_iterations", "0", "--output_dir",
                     tmp_path / "cli", "--noinverse", "--nooverview", "--noprogress"])
    assert code == 0, capsys.readouterr().err
    fields["cli"] = read_displacement_field(tmp_path / "cli" / "displacement_mm.nii.gz")[0]
    # MONAI Label door
    served = load_bundle(bundle)
    register_files(served, moving, fixed, tmp_path / "ml_warped.nii.gz", tmp_path / "ml_field.nii.gz",
                   masks={"fixed_mask": fmask, "moving_mask": mmask})
    fields["monailabel"] = read_displacement_field(tmp_path / "ml_field.nii.gz")[0]
    # bundle inference (MONAI ConfigWorkflow with the repository's inference.json)
    _bundle_inference(bundle, d / "datalist.json", tmp_path / "bundle", net)
    fields["bundle"] = read_displacement_field(tmp_path / "bundle" / "pair_displacement_mm.nii.gz")[0]
    ref = fields["python"]
    for door, u in fields.items():
        assert u.shape == ref.shape, door
        diff = float(np.abs(u - ref).max())
        print(f"{door}: max |u - u_python| = {diff:.2e} mm")
        assert diff <= TOLERANCE_MM, (door, diff)
    # the same warped image from the bundle and the command line
    import nibabel as nib

    w_cli = np.asarray(nib.load(tmp_path / "cli" / "warped_moving.nii.gz").dataobj)
    w_bundle = np.asarray(nib.load(tmp_path / "bundle" / "pair_warped.nii.gz").dataobj)
    assert np.abs(w_cli - w_bundle).max() <= 0.5  # HU; slopes up to ~1000 HU/mm times the 1e-4 mm field rounding


def test_prealigned_doors_agree(case, tmp_path, capsys):
    """With an affine pre-alignment the bundle's inference (its config's ``prealign`` override) and the command line
    give the Python API's field: the pre-alignment is one stage of the one pipeline, not a door's own step."""
    d, bundle, net = case
    fixed, moving, fmask, mmask = d / "fixed.nii.gz", d / "moving.nrrd", d / "fixed_mask.nii.gz", d / "moving_mask.nii.gz"
    api = register(fixed, moving, net, fixed_mask=fmask, moving_mask=mmask, inverse=False, device="cpu",
                   prealign="rigid")
    assert api.prepared.prealign is not None
    fields = {}
    code = cli_main(["register", "--fixed", fixed, "--moving", moving, "--fixed_mask", fmask, "--moving_mask", mmask,
                     "--weights", bundle / "models" / "model.pt", "--io_iterations", "0", "--output_dir",
                     tmp_path / "cli", "--noinverse", "--nooverview", "--noprogress", "--prealign", "rigid"])
    assert code == 0, capsys.readouterr().err
    fields["cli"] = read_displacement_field(tmp_path / "cli" / "displacement_mm.nii.gz")[0]
    config = bundle / "configs" / "inference.json"
    original = config.read_text()
    try:
        inference = json.loads(original)
        inference["prealign"] = "rigid"
        config.write_text(json.dumps(inference))
        _bundle_inference(bundle, d / "datalist.json", tmp_path / "bundle", net)
    finally:
        config.write_text(original)
    fields["bundle"] = read_displacement_field(tmp_path / "bundle" / "pair_displacement_mm.nii.gz")[0]
    assert np.abs(api.displacement).max() > 0.5
    for door, u in fields.items():
        diff = float(np.abs(u - api.displacement).max())
        print(f"prealigned {door}: max |u - u_python| = {diff:.2e} mm")
        assert diff <= TOLERANCE_MM, (door, diff)
