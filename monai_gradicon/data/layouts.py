"""Readers turning public dataset layouts and our own JSON datalists into datalists (lists of dicts of paths).

This module gathers the public names of :mod:`.datalist` (our JSON format), :mod:`.dirlab` (DIR-Lab COPDGene),
:mod:`.learn2reg` (NLST, OASIS) and :mod:`.landmarks` (landmark files).
"""

from __future__ import annotations

from .datalist import DATALIST_PATH_KEYS, load_datalist
from .dirlab import (
    DIRLAB_COPD_CASES,
    DIRLAB_HU_OFFSET,
    DirLabCase,
    dirlab_affine,
    dirlab_copd_datalist,
    dirlab_copd_to_nifti,
    read_dirlab_image,
    read_dirlab_landmarks,
)
from .landmarks import read_landmarks
from .learn2reg import NLST_SPLITS, OASIS_SPLITS, nlst_datalist, oasis_datalist

__all__ = [
    "DATALIST_PATH_KEYS",
    "DIRLAB_COPD_CASES",
    "DIRLAB_HU_OFFSET",
    "NLST_SPLITS",
    "OASIS_SPLITS",
    "DirLabCase",
    "dirlab_affine",
    "dirlab_copd_datalist",
    "dirlab_copd_to_nifti",
    "load_datalist",
    "nlst_datalist",
    "oasis_datalist",
    "read_dirlab_image",
    "read_dirlab_landmarks",
    "read_landmarks",
]
