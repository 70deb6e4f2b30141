"""Pieces every family file shares: the classifier-pool check, official-checkpoint unwrapping, renames
and model creation through timm's builder (pretrained weights through timm's loader: the official files'
hub or release locations, a local file, or a ``local-dir:`` folder)."""
import argparse
import collections
import os
import re
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import nn


class StagedBackbone:
    """timm's stage-level interface shared by the hierarchical families: ``self.stages`` holds modules
    with a ``grad_checkpointing`` flag after ``_stem(x)``, ``self.norm`` normalises the last stage's
    output (``nn.Identity`` where the family has no feature norm); ``_native_fmt`` is the stages'
    layout ('NCHW' or channels-last 'NHWC'); ``_head_pattern`` names the parameters that group with
    the last stage (final norm or head projection)."""
    _head_pattern: str
    _native_fmt: str = 'NCHW'

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the selected stages (NCHW, or the native NHWC), and optionally the final features."""
        formats = ('NCHW', self._native_fmt) if self._native_fmt != 'NCHW' else ('NCHW',)
        if output_fmt not in formats:
            raise ValueError(f"output_fmt must be {' or '.join(repr(f) for f in formats)}, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self._stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == len(self.stages) - 1 else x
                if output_fmt != self._native_fmt:
                    y = y.permute(0, 3, 1, 2).contiguous()
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < len(self.feature_info) - 1:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled, normalised last-stage features in the native layout."""
        return self.norm(self.stages(self._stem(x)))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (self._head_pattern, (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable


class PooledLinearHead:
    """timm's classifier interface for models whose head is an average pool over ``_pool_dims`` then a
    Linear (needs ``num_features``, ``global_pool``, ``head_drop`` and ``head``)."""
    __constants__ = ['_pool_dims']  # a class attribute of each model: a constant to TorchScript

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=self._pool_dims)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def check_global_pool(global_pool: str) -> str:
    if global_pool not in ('avg', ''):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
    return global_pool


def unwrap_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official files hold {'model': ..., 'model_ema': ..., 'optimizer': ...}; take the weights,
    EMA first as timm's loader does."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(state_dict.get(key), dict) and state_dict[key]:
            return state_dict[key]
    return state_dict


def rename_key(key: str, rules: Sequence[Tuple[str, str]]) -> str:
    """Apply the first regex rule that matches ``key``."""
    for pattern, repl in rules:
        new_key, n = re.subn(pattern, repl, key)
        if n:
            return new_key
    return key


class PickledConfig:
    """Stands in for yacs' ``CfgNode`` (the config VMamba's training checkpoints pickle beside the weights) while
    unpickling: each node becomes an ``OrderedDict`` of its values (its attributes on the dict's ``__dict__``), the one
    mapping type ``weights_only`` loading both fills and builds. Nothing of yacs runs or needs to be installed."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()


def official_pickle_globals() -> list:
    """The non-tensor classes official training checkpoints pickle (their configs and metrics), allowed by name for
    ``torch.load(weights_only=True)``: argparse's ``Namespace`` (RAVLT, Vim), yacs' ``CfgNode`` read as a plain dict
    (VMamba) and numpy scalars. Plain value holders: their unpickling runs no code beyond setting attributes."""
    import numpy as np
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return [argparse.Namespace, (PickledConfig, "yacs.config.CfgNode"), (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar"), np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.int64))]


def weights_location(cfg) -> str:
    """Where ``pretrained=True`` reads the weights for a resolved pretrained cfg, with the local cached copy."""
    if cfg.file:
        return f"file {cfg.file}"
    if cfg.hf_hub_id:
        where = f"Hugging Face hub repo {cfg.hf_hub_id}, file {cfg.hf_hub_filename or 'model.safetensors'}"
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors")
        except ImportError:
            cached = None
        return where + (f" (cached at {cached})" if isinstance(cached, str) else "")
    if cfg.url:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        return f"{cfg.url}" + (f" (cached at {cached})" if os.path.isfile(cached) else "")
    return "no location"


def _raised_while_loading(e: BaseException) -> bool:
    return any(frame.name == "load_pretrained" for frame in traceback.extract_tb(e.__traceback__))


def create_model(cls, variant: str, pretrained: bool, filter_fn: Callable, out_indices: Tuple[int, ...],
                 weights_hint: str, **kwargs) -> nn.Module:
    """``build_model_with_cfg`` with the family's checkpoint filter and ``features_only`` through
    ``forward_intermediates``. ``pretrained=True`` goes through timm's loader (download and cache, HF_HUB_OFFLINE,
    ``pretrained_cfg_overlay``), reading official training checkpoints with ``weights_only=True`` and only their
    config classes allowed (``official_pickle_globals``); the family's filter converts them. A failed load names the
    variant and the file (and the cached copy to delete if the download was cut short)."""
    if not pretrained:
        return build_model_with_cfg(cls, variant, False, pretrained_filter_fn=filter_fn,
                                    feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **kwargs)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if not (cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id):
        raise ValueError(
            f"{variant}: no official weights are published for it; train it or pass a checkpoint with "
            f"pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth') ({weights_hint})")
    try:
        with torch.serialization.safe_globals(official_pickle_globals()):
            return build_model_with_cfg(cls, variant, True, pretrained_filter_fn=filter_fn,
                                        feature_cfg=dict(feature_cls='getter', out_indices=out_indices), **kwargs)
    except Exception as e:
        if not _raised_while_loading(e):
            raise
        kind = next((c for c in (FileNotFoundError, ValueError) if isinstance(e, c)), RuntimeError)
        hint = "" if cfg.file else "\n(a download cut short leaves a broken cached file: delete it to download again)"
        raise kind(f"{variant}: could not load its pretrained weights from {weights_location(cfg)}: "
                   f"{type(e).__name__}: {e}{hint}") from e
