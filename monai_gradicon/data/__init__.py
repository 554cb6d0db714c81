"""Data for GradICON registration: synthetic phantoms, dataset layouts, preprocessing and augmentation.

Conventions: images are ``[C, D, H, W]`` per sample (MONAI channel-first, array axes as loaded by ``LoadImage``);
landmarks are (K, 3) float arrays, either 0-based voxel indices in array axis order or world coordinates in mm
(RAS as given by the nibabel affine) — each function states which.
"""

from .augment import affine_warp, augment_pair, random_signed_permutation, random_swap
from .coords import voxel_to_world, world_to_voxel
from .layouts import (
    DATALIST_PATH_KEYS,
    DIRLAB_COPD_CASES,
    DIRLAB_HU_OFFSET,
    NLST_SPLITS,
    OASIS_SPLITS,
    DirLabCase,
    dirlab_affine,
    dirlab_copd_datalist,
    dirlab_copd_to_nifti,
    load_datalist,
    nlst_datalist,
    oasis_datalist,
    read_dirlab_image,
    read_dirlab_landmarks,
    read_landmarks,
)
from .phantom import (
    BRAIN_LABELS,
    BRAIN_TISSUE_INTENSITY,
    DATALIST_NAME,
    BrainPhantom,
    BreathingMotion,
    LungPhantomPair,
    make_brain_phantom,
    make_lung_phantom_pair,
    write_brain_demo_dataset,
    write_lung_demo_dataset,
)
from .preprocessing import (
    PREPROCESSING,
    Preprocessing,
    brain_max_normalize,
    kth_quantile,
    lung_ct_normalize,
    preprocess,
    unigradicon_ct_normalize,
    unigradicon_mr_normalize,
)

__all__ = [
    "BRAIN_LABELS",
    "BRAIN_TISSUE_INTENSITY",
    "DATALIST_NAME",
    "DATALIST_PATH_KEYS",
    "DIRLAB_COPD_CASES",
    "DIRLAB_HU_OFFSET",
    "NLST_SPLITS",
    "OASIS_SPLITS",
    "PREPROCESSING",
    "Preprocessing",
    "BrainPhantom",
    "BreathingMotion",
    "DirLabCase",
    "LungPhantomPair",
    "affine_warp",
    "augment_pair",
    "brain_max_normalize",
    "dirlab_affine",
    "dirlab_copd_datalist",
    "dirlab_copd_to_nifti",
    "kth_quantile",
    "load_datalist",
    "preprocess",
    "lung_ct_normalize",
    "make_brain_phantom",
    "make_lung_phantom_pair",
    "nlst_datalist",
    "oasis_datalist",
    "random_signed_permutation",
    "random_swap",
    "read_dirlab_image",
    "read_dirlab_landmarks",
    "read_landmarks",
    "unigradicon_ct_normalize",
    "unigradicon_mr_normalize",
    "voxel_to_world",
    "world_to_voxel",
    "write_brain_demo_dataset",
    "write_lung_demo_dataset",
]
