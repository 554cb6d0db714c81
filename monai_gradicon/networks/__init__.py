"""Networks: the UNet2 backbone, its CPU kernels (:mod:`~monai_gradicon.networks.cpu_kernels`) and the multi-step
GradICON registration network."""

from monai_gradicon.networks.registration import (
    PRESET_SHAPES,
    STEP_LEVELS,
    DownsampleStep,
    GradICONDDFNet,
    GradICONNetwork,
    TwoStepRegistration,
    VectorFieldStep,
    downsample,
    gradicon_network,
    gradicon_preset,
    min_input_size,
)
from monai_gradicon.networks.unet2 import UNet2, match_channels, unet2_min_size

__all__ = [
    "PRESET_SHAPES",
    "STEP_LEVELS",
    "DownsampleStep",
    "GradICONDDFNet",
    "GradICONNetwork",
    "TwoStepRegistration",
    "VectorFieldStep",
    "downsample",
    "gradicon_network",
    "gradicon_preset",
    "min_input_size",
    "UNet2",
    "match_channels",
    "unet2_min_size",
]
