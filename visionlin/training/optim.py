"""AdamW parameter groups the timm way: no weight decay for biases, norms and whatever the model's
``no_weight_decay()`` names (position embeddings, SSM A_log/D, ...)."""
from __future__ import annotations

import copy

from mmengine.model import is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS
from timm.optim import param_groups_weight_decay


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TimmParamGroupsConstructor(DefaultOptimWrapperConstructor):
    """Two groups: decayed weights, and 1-D parameters plus ``model.no_weight_decay()`` at zero decay."""

    def __call__(self, model):
        model = model.module if is_model_wrapper(model) else model
        net = getattr(model, "model", model)
        optimizer_cfg = copy.deepcopy(self.optimizer_cfg)
        weight_decay = optimizer_cfg.pop("weight_decay", 0.0)
        no_decay = set(net.no_weight_decay()) if hasattr(net, "no_weight_decay") else set()
        optimizer_cfg["params"] = param_groups_weight_decay(net, weight_decay, no_weight_decay_list=no_decay)
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        wrapper_cfg = dict(self.optim_wrapper_cfg)
        wrapper_cfg.setdefault("type", "OptimWrapper")
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))
