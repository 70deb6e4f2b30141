"""Top-k accuracy over the predictions of ``TimmClassifier`` (mode='predict')."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS


@METRICS.register_module()
class TopKAccuracy(BaseMetric):
    """Percentage of samples whose label is among the top-k predicted classes, for each k in ``topk``."""
    default_prefix = "accuracy"

    def __init__(self, topk: Sequence[int] = (1, 5), collect_device: str = "cpu", prefix=None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        if any(k < 1 or k > 5 for k in topk):
            raise ValueError(f"topk values must be between 1 and 5, got {tuple(topk)}")
        self.topk = tuple(topk)

    def process(self, data_batch, data_samples: Sequence[Dict]) -> None:
        for s in data_samples:   # one result per sample: distributed evaluation drops the padding
            hits = (s["ranked"] == s["label"]).cpu()
            self.results.append(tuple(bool(hits[:k].any()) for k in self.topk))

    def compute_metrics(self, results: List) -> Dict[str, float]:
        hits = torch.tensor(results, dtype=torch.float64)
        return {f"top{k}": 100.0 * hits[:, i].mean().item() for i, k in enumerate(self.topk)}
