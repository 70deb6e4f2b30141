"""Training and evaluation on mmengine (optional extra ``[train]``).

Importing this module registers with mmengine's registries everything the configs in ``configs/``
name: ``TimmClassifier`` (any timm model, visionlin's included), ``ImageFolderDataset`` and
``collate_skipping_unreadable``, ``RepeatedAugmentationSampler``, ``TopKAccuracy``,
``TimmParamGroupsConstructor`` (AdamW groups without weight decay where the model says so),
``ProgressHook``, ``EpochSeedHook`` and ``seed_worker_from_torch``, the ``local_atomic`` file backend (checkpoints written
atomically), ``WeightsOnlyCheckpointHook`` and a checkpoint loader that together keep mmengine
checkpoints loadable with ``weights_only=True``.
"""
try:
    import mmengine  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("visionlin.training needs mmengine: pip install 'visionlin[train]'") from e

from .checkpoint import WeightsOnlyCheckpointHook, latest_checkpoint, load_model_weights, read_checkpoint
from .data import ImageFolderDataset, RepeatedAugmentationSampler, collate_skipping_unreadable
from .hooks import EpochSeedHook, ProgressHook, seed_worker_from_torch
from .metrics import TopKAccuracy
from .model import TimmClassifier
from .optim import TimmParamGroupsConstructor

__all__ = ["ImageFolderDataset", "RepeatedAugmentationSampler", "collate_skipping_unreadable", "ProgressHook",
           "EpochSeedHook", "seed_worker_from_torch", "TopKAccuracy", "TimmClassifier", "TimmParamGroupsConstructor", "latest_checkpoint",
           "load_model_weights", "read_checkpoint", "WeightsOnlyCheckpointHook"]
