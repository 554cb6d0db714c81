"""MONAI/Ignite engine components for GradICON training, evaluation and inference (used by the bundles).

* :class:`PairPrepareBatch` + :class:`PairAugmentation`: pair-aware batches, random A/B swap and the
  signed-permutation + affine-noise augmentation on the device.
* :class:`GradICONTrainingModule` + :func:`pick_loss`: the objective as a trainer network returning a dict.
* :class:`TwoStageHandler`: stage 1 (3 steps) -> stage 2 (4 steps, new Adam).
* :class:`ResumableCheckpoint`, :class:`ModelWeightsSaver`: atomic, resumable checkpoints and ``models/model.pt``.
* :class:`RegistrationEvalOutputd`, :class:`CaseMetricAverage`, :class:`MetricsReportHandler`: validation and
  evaluation metrics (mTRE, Dice, folds) with CSV/JSON reports.
* :func:`registration_datalist`, :class:`SubjectPairDataset`: data sources (layouts, demo data, random pairs).
"""

from monai_gradicon.engines.checkpoint import (
    AtomicSaveHandler,
    ModelWeightsSaver,
    ResumableCheckpoint,
    latest_checkpoint,
)
from monai_gradicon.engines.datasets import (
    DatalistError,
    SubjectPairDataset,
    ensure_demo_dataset,
    pairs_from_subjects,
    registration_datalist,
)
from monai_gradicon.engines.distributed import (
    destroy_distributed,
    distributed_device,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from monai_gradicon.engines.guard import NonFiniteGuard, NonFiniteTrainingError, check_finite_state
from monai_gradicon.engines.evaluation import (
    CaseMetricAverage,
    MetricsReportHandler,
    eval_outputs,
    summarize,
    train_scalars,
)
from monai_gradicon.engines.module import SCALAR_KEYS, GradICONTrainingModule, pick_loss, similarity_loss
from monai_gradicon.engines.prepare import PairAugmentation, PairPrepareBatch
from monai_gradicon.engines.stages import TwoStageHandler, reset_optimizer, unwrap
from monai_gradicon.engines.transforms import (
    CASE_METRICS,
    LoadLandmarksd,
    RegistrationEvalOutputd,
)

__all__ = [
    "AtomicSaveHandler",
    "CASE_METRICS",
    "CaseMetricAverage",
    "DatalistError",
    "GradICONTrainingModule",
    "LoadLandmarksd",
    "MetricsReportHandler",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "ModelWeightsSaver",
    "PairAugmentation",
    "PairPrepareBatch",
    "RegistrationEvalOutputd",
    "ResumableCheckpoint",
    "SCALAR_KEYS",
    "SubjectPairDataset",
    "TwoStageHandler",
    "check_finite_state",
    "destroy_distributed",
    "distributed_device",
    "ensure_demo_dataset",
    "eval_outputs",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "latest_checkpoint",
    "pairs_from_subjects",
    "pick_loss",
    "registration_datalist",
    "reset_optimizer",
    "similarity_loss",
    "summarize",
    "train_scalars",
    "unwrap",
]
