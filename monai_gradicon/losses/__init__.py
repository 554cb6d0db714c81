"""Losses: image similarity, inverse-consistency regularizers and the GradICON objective."""

from monai_gradicon.losses.objective import REGULARIZERS, GradICONObjective, ObjectiveOutput
from monai_gradicon.losses.regularizers import (
    draw_noise,
    folds_count,
    gradicon_regularizer,
    icon_regularizer,
    jitter_points,
    sparse_jitter_points,
)
from monai_gradicon.losses.similarity import (
    IO_SIMILARITIES,
    LNCCLoss,
    MINDSSCLoss,
    SSDLoss,
    SquaredLNCCLoss,
    gaussian_blur,
    gaussian_kernel1d,
    local_ncc,
    masked_mean,
    mind_ssc,
    similarity_from_name,
    soft_dice_loss,
)
