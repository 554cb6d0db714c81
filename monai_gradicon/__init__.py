"""monai-gradicon: GradICON deformable registration (Tian, Greer et al., CVPR 2023) as MONAI components.

Coordinate conventions: maps are normalized [0, 1] coordinates (voxel i of N at i / (N - 1)); DDFs are MONAI voxel
displacements; physical fields are millimetres. See ``docs/architecture.md``.
"""

from monai_gradicon.coordinate_transforms import ComposedTransform, CoordinateTransform, DisplacementTransform
from monai_gradicon.losses import (
    GradICONObjective,
    LNCCLoss,
    ObjectiveOutput,
    SquaredLNCCLoss,
    SSDLoss,
    gradicon_regularizer,
    icon_regularizer,
)
from monai_gradicon.maps import ddf_to_map, identity_map, map_to_ddf, sample, warp_image
from monai_gradicon.networks import (
    PRESET_SHAPES,
    GradICONDDFNet,
    GradICONNetwork,
    UNet2,
    gradicon_network,
    gradicon_preset,
)
from monai_gradicon.model_card import ModelCard
from monai_gradicon.weights import (
    WeightFileError,
    convert_weights,
    export_official_weights,
    load_network_weights,
    load_weights,
    save_weights,
)

__version__ = "0.1.0"
