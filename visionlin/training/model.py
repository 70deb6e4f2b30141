"""Any timm model (visionlin's included) as an mmengine model: mixup/cutmix, label smoothing, top-k predictions."""
from __future__ import annotations

import difflib
from typing import Dict, List, Optional

import timm
import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .checkpoint import load_model_weights


def _check_model_name(name: str) -> None:
    import visionlin  # noqa: F401  (registers the visionlin models)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}: not registered with timm or visionlin{hint}")


@MODELS.register_module()
class TimmClassifier(BaseModel):
    """``timm.create_model(model_name, **model_args)`` trained with cross-entropy.

    Args:
        model_name: a timm model name (``import visionlin`` registers ours).
        model_args: keyword arguments of ``timm.create_model`` (num_classes, drop_path_rate, img_size...).
        mixup: keyword arguments of ``timm.data.Mixup`` (mixup_alpha, cutmix_alpha, prob, ...) or None.
        label_smoothing: applied to the (mixed) targets.
        grad_checkpointing: ``set_grad_checkpointing()`` on the model.
        init_checkpoint: weights to start from (ours, a converted safetensors file or an official
            checkpoint the family's filter understands); a classifier of another class count is
            re-initialised (fine-tuning), any other mismatch is an error.
    """

    def __init__(self, model_name: str, model_args: Optional[Dict] = None, mixup: Optional[Dict] = None,
                 label_smoothing: float = 0.0, grad_checkpointing: bool = False,
                 init_checkpoint: Optional[str] = None, data_preprocessor: Optional[Dict] = None):
        super().__init__(data_preprocessor=data_preprocessor)
        _check_model_name(model_name)
        self.model = timm.create_model(model_name, **(model_args or {}))
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if init_checkpoint:
            load_model_weights(self.model, init_checkpoint, drop_mismatched_classifier=True)
        self.num_classes = self.model.num_classes
        self.mixup = Mixup(**mixup, label_smoothing=label_smoothing, num_classes=self.num_classes) if mixup else None
        self.label_smoothing = label_smoothing

    def _loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mixup is not None:
            if len(inputs) % 2:     # timm's Mixup pairs images; a batch shortened by a skipped image loses one more
                inputs, labels = inputs[:-1], labels[:-1]
            inputs, targets = self.mixup(inputs, labels)
            return SoftTargetCrossEntropy()(self.model(inputs), targets)
        logits = self.model(inputs)
        if self.label_smoothing > 0:
            return LabelSmoothingCrossEntropy(self.label_smoothing)(logits, labels)
        return F.cross_entropy(logits, labels)

    def forward(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None, skipped: int = 0,
                mode: str = "tensor"):
        if mode == "loss":
            return dict(loss=self._loss(inputs, labels))
        logits = self.model(inputs)
        if mode == "tensor":
            return logits
        if mode == "predict":
            ranked = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            return [dict(ranked=r, label=l) for r, l in zip(ranked, labels)]
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")


__all__: List[str] = ["TimmClassifier"]
