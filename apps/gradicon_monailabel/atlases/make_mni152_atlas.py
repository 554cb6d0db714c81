"""Build the shipped example atlas ``mni152_2009a_2mm`` from the MNI ICBM152 2009a symmetric template.

    python apps/gradicon_monailabel/atlases/make_mni152_atlas.py ../shared/data/brain_mni152_2009a_sym

Input (the folder of the three files below, 197 x 233 x 189 voxels, 1 mm, RAS, uint8 0..255):
``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` (T1), ``..._gm_...`` and ``..._wm_...`` (grey / white matter
probability maps x 255).

Output (next to this script, ``mni152_2009a_2mm/``): the T1 and a label map on a 2 mm grid (each output voxel the
mean of a 2 x 2 x 2 block: 98 x 116 x 94 voxels, origin at the first block's centre), with
``label = argmax(background, grey matter, white matter)`` of the block-mean probabilities, ``background = 1 - GM -
WM`` (CSF and everything outside the brain): 0 background, 1 grey matter, 2 white matter. The output is
deterministic (no randomness, no resampling beyond block means).
"""

from __future__ import annotations

import json
import os
import sys

import nibabel as nib
import numpy as np

NAME = "mni152_2009a_2mm"
FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
LABEL_NAMES = {"gray matter": 1, "white matter": 2}


def block_mean(a: np.ndarray, f: int = 2) -> np.ndarray:
    """``[X, Y, Z]`` -> ``[X // f, Y // f, Z // f]`` means of ``f^3`` blocks (trailing voxels dropped)."""
    x, y, z = (n // f * f for n in a.shape)
    a = a[:x, :y, :z].astype(np.float64)
    return a.reshape(x // f, f, y // f, f, z // f, f).mean(axis=(1, 3, 5))


def main(source: str) -> str:
    imgs = {k: nib.load(os.path.join(source, f)) for k, f in FILES.items()}
    affine = imgs["t1"].affine
    for k, img in imgs.items():
        if img.shape != imgs["t1"].shape or not np.allclose(img.affine, affine):
            raise ValueError(f"{FILES[k]} is not on the T1's grid.")
    t1 = block_mean(np.asarray(imgs["t1"].dataobj))
    gm = block_mean(np.asarray(imgs["gm"].dataobj)) / 255.0
    wm = block_mean(np.asarray(imgs["wm"].dataobj)) / 255.0
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    label = np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)
    out_affine = affine.copy()
    out_affine[:3, :3] = affine[:3, :3] * 2.0
    out_affine[:3, 3] = affine[:3, :3] @ np.full(3, 0.5) + affine[:3, 3]  # centre of the first 2x2x2 block
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), NAME)
    os.makedirs(folder, exist_ok=True)
    for name, array in (("image.nii.gz", np.rint(t1).astype(np.uint8)), ("label.nii.gz", label)):
        img = nib.Nifti1Image(array, out_affine)
        img.set_sform(out_affine, code=1)
        img.set_qform(out_affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, os.path.join(folder, name))
    spec = {
        "image": "image.nii.gz",
        "label": "label.nii.gz",
        "label_names": LABEL_NAMES,
        "description": "MNI ICBM152 2009a symmetric T1 template at 2 mm with grey / white matter labels (argmax of "
                       "the template's tissue probability maps). Copyright (C) 1993-2009 Louis Collins, McConnell "
                       "Brain Imaging Centre, Montreal Neurological Institute, McGill University (see NOTICE.md).",
    }
    with open(os.path.join(folder, "atlas.json"), "w") as f:
        json.dump(spec, f, indent=2)
        f.write("\n")
    counts = {n: int((label == v).sum()) for n, v in LABEL_NAMES.items()}
    print(f"{folder}: {label.shape}, 2 mm, voxels per label {counts}")
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
