"""Released-format weights give the authors' file-level result through our pipeline (marked ``itk``: it needs the
reference's ITK path, ``pip install itk`` beside ``icon_registration==1.1.9``; run with ``python -m pytest -m itk``).

A random weight file in the authors' exact format (the reference's own 4-step lung network, 188 tensors, last layers
randomised so the maps are far from the identity) registers the real CT pair pyradiomics lung2 (moving) -> lung1
(fixed) with lung masks, once through the authors' file-level path (``lung_network_preprocess`` +
``itk_wrapper.register_pair``) and once through ours (:func:`monai_gradicon.pipeline.register`, which every door
runs -- ``tests/test_doors_agree.py`` shows the doors give identical fields). The fields are compared at fixed-image
voxel centres (a random sample plus the corners), in world mm.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.itk

SHAPE = (175, 175, 175)
SAMPLES = 3000


@pytest.fixture(scope="module")
def reference_case(tmp_path_factory):
    itk = pytest.importorskip("itk", reason="the reference file-level path needs itk (pip install itk)")
    from icon_registration import itk_wrapper
    from icon_registration.pretrained_models import lung_ct

    from conftest import SHARED_DATA
    from monai_gradicon.io import read_image, write_nifti
    from monai_gradicon.lung_mask import lung_mask

    shared = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(os.path.join(shared, "lung_ct_pyradiomics")):
        pytest.skip("../shared/data is not present")
    d = tmp_path_factory.mktemp("reference")
    fixed_path = os.path.join(shared, "lung_ct_pyradiomics", "lung1_image.nrrd")
    moving_path = os.path.join(shared, "lung_ct_pyradiomics", "lung2_image.nrrd")
    masks = {}
    for name, path in (("fixed", fixed_path), ("moving", moving_path)):
        ct = read_image(path)
        masks[name] = str(d / f"{name}_mask.nii.gz")
        write_nifti(masks[name], lung_mask(ct, method="threshold").mask.astype(np.uint8), ct.affine)

    torch.manual_seed(0)
    model = lung_ct.make_network()
    model.assign_identity_map([1, 1, *SHAPE])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.regis_net.named_parameters():
            if "lastConv.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.07)
    model.eval()
    weights = d / "lung_model_weights_step_2.trch"  # the release's name: our card says reference axes, 175^3, lung_ct
    torch.save(model.regis_net.state_dict(), weights)

    fixed_itk = lung_ct.lung_network_preprocess(itk.imread(fixed_path), itk.imread(masks["fixed"]))
    moving_itk = lung_ct.lung_network_preprocess(itk.imread(moving_path), itk.imread(masks["moving"]))
    phi_ab, _ = itk_wrapper.register_pair(model, moving_itk, fixed_itk)

    fixed = read_image(fixed_path)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, n, SAMPLES) for n in fixed.shape], axis=1)
    corners = np.array([[i, j, k] for i in (0, fixed.shape[0] - 1) for j in (0, fixed.shape[1] - 1)
                        for k in (0, fixed.shape[2] - 1)])
    idx = np.concatenate([idx, corners])
    image = itk.imread(fixed_path)
    u_ref = np.empty((len(idx), 3))
    for n, (i, j, k) in enumerate(idx):
        x = np.array(image.TransformIndexToPhysicalPoint([int(i), int(j), int(k)]))  # LPS
        y = np.array(phi_ab.TransformPoint(x))
        u_ref[n] = (y - x) * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS
    # the part of the field the network adds to matching the two images' boxes (what the identity network gives)
    from monai_gradicon.resample import Grid, physical_displacement

    moving = read_image(moving_path)

    class Identity:
        def __call__(self, points):
            return points

    box = physical_displacement(Identity(), Grid.of(fixed), Grid.of(moving), SHAPE)
    u_box = box[(slice(None), *idx.T)].T
    return {"weights": weights, "fixed": fixed_path, "moving": moving_path, "masks": masks, "idx": idx,
            "u_ref": u_ref, "u_box": u_box}


@pytest.mark.parametrize("scheme,tolerance_mm", [("grid", 1e-3), ("exact", None)])
def test_released_format_weights_match_the_authors_file_level_path(reference_case, scheme, tolerance_mm):
    from monai_gradicon.pipeline import register
    from monai_gradicon.weights import load_weights

    c = reference_case
    network, card = load_weights(c["weights"])
    assert (card.axis_order, card.input_shape, card.preprocessing) == ("reference", SHAPE, "lung_ct")
    r = register(c["fixed"], c["moving"], network, fixed_mask=c["masks"]["fixed"], moving_mask=c["masks"]["moving"],
                 transform_scheme=scheme, inverse=False, device="cpu")
    ours = r.displacement[(slice(None), *c["idx"].T)].T
    diff = np.linalg.norm(ours - c["u_ref"], axis=1)
    magnitude = np.linalg.norm(c["u_ref"] - c["u_box"], axis=1)  # the network's deformation beyond box matching
    print(f"{scheme}: |u_ours - u_reference| mean {diff.mean():.2e} mm, max {diff.max():.2e} mm; network "
          f"deformation mean {magnitude.mean():.2f} mm, max {magnitude.max():.2f} mm")
    assert magnitude.mean() > 1.0  # a real deformation
    if tolerance_mm is not None:
        assert diff.max() <= tolerance_mm
    else:  # the exact composition differs from the interpolated map between the network's nodes (documented)
        assert diff.mean() <= 0.25 * magnitude.mean()
