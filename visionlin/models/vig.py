"""ViG and ViG-H: vision backbones on bidirectional gated linear attention.

Paper: "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention"
(arXiv 2405.18425); official code and weights: github.com/hustvl/ViG (MIT).

Both families run channels-last (B, H, W, C) inside; the mixer is
``visionlin.layers.BidirectionalGLA2d`` over the raster token order, on
``visionlin.kernels.bidirectional_gla`` (Triton on CUDA, vectorised PyTorch elsewhere).

* ``ViG``: plain, DeiT-like: overlapping stride-16 patch embed, learned absolute position
  embedding (resampled for any input size divisible by 16), 12 blocks, RMSNorm, average pool.
* ``ViGH``: hierarchical, four stages at strides 4/8/16/32 with LayerNorm.
"""
import re
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import DropPath, LayerNorm2d, RmsNorm, resample_abs_pos_embed, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ..layers import BidirectionalGLA2d, add_pos_embed, check_image, swiglu_hidden_dim, swiglu_mlp
from ._helpers import PooledLinearHead, StagedBackbone, check_global_pool, create_model, rename_key, unwrap_state_dict

__all__ = ["ViG", "ViGH"]


class Block(nn.Module):
    """Pre-norm residual block: x + DropPath(mixer(norm1(x))), x + DropPath(SwiGLU(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, norm_layer, conv_act: bool = False,
                 out_act: bool = False, drop_path: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = BidirectionalGLA2d(dim, num_heads, conv_act=conv_act, out_act=out_act)
        self.norm2 = norm_layer(dim)
        self.mlp = swiglu_mlp(dim, mlp_hidden, drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ViG(PooledLinearHead, nn.Module):
    """Plain ViG: stride-16 tokens, ``depth`` blocks of one width, global average pooling."""
    _pool_dims = (1,)  # tokens (B, N, D)

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            conv_act: bool = False,
            out_act: bool = False,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if patch_size != 16:
            raise ValueError(f"ViG's overlapping patch embed has stride 16; got patch_size={patch_size}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by the patch stride {patch_size}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = check_global_pool(global_pool)
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)

        # overlapping stem: 224 -> 28 (k9 s8 p1) -> 14 (k3 s2 p1); keys as in the official layout
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=9, stride=8, padding=1),
            LayerNorm2d(embed_dim // 2, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(embed_dim, eps=1e-5),
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        mlp_hidden = swiglu_hidden_dim(embed_dim, multiple_of=256)
        norm_layer = partial(RmsNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_hidden, norm_layer, conv_act=conv_act, out_act=out_act,
                  drop_path=dpr[i], proj_drop=proj_drop_rate)
            for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(_init_linear)
        for m in self.modules():
            if isinstance(m, BidirectionalGLA2d):
                m.reset_parameters()
        trunc_normal_(self.pos_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r'^pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> position-embedded tokens, channels-last (B, H/16, W/16, D)."""
        check_image(x, self.in_chans, self.patch_size)
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        return self.pos_drop(add_pos_embed(x, self.pos_embed, self.grid_size))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features after the selected blocks (NCHW or NLC), and optionally the final tokens."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y.flatten(1, 2))
        if intermediates_only:
            return intermediates
        return self.norm(x).flatten(1, 2), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled, normalised tokens (B, N, D) in raster order."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x).flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ViGHStage(nn.Module):
    """Optional stride-2 downsample (Conv k3 s2 + LayerNorm), then ViG blocks; channels-last."""

    def __init__(self, dim: int, dim_out: int, depth: int, num_heads: int, downsample: bool,
                 drop_path: Sequence[float], proj_drop: float = 0.0):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = nn.Sequential(
            nn.Conv2d(dim, dim_out, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(dim_out, eps=1e-5),
        ) if downsample else None
        norm_layer = partial(nn.LayerNorm, eps=1e-5)
        mlp_hidden = swiglu_hidden_dim(dim_out, multiple_of=32)
        self.blocks = nn.Sequential(*[
            Block(dim_out, num_heads, mlp_hidden, norm_layer, drop_path=drop_path[i], proj_drop=proj_drop)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class ViGH(PooledLinearHead, StagedBackbone, nn.Module):
    """Hierarchical ViG: stem to stride 4, four stages, LayerNorm, average-pooled head."""
    _pool_dims = (1, 2)  # channels-last map (B, H, W, C)
    _head_pattern = r'^norm'
    _native_fmt = 'NHWC'

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 5, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = check_global_pool(global_pool)
        self.output_fmt = 'NHWC'
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(embed_dim // 2, eps=1e-5),
            nn.GELU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(embed_dim, eps=1e-5),
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).split(list(depths))
        self.stages = nn.Sequential()
        self.feature_info = []
        prev_dim, stride = embed_dim, 4
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stride *= 2 if i > 0 else 1
            self.stages.append(ViGHStage(prev_dim, dims[i], depth, heads, downsample=i > 0,
                                         drop_path=dpr[i].tolist(), proj_drop=proj_drop_rate))
            self.feature_info.append(dict(num_chs=dims[i], reduction=stride, module=f'stages.{i}'))
            prev_dim = dims[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-5)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        # as in the official ViG-H: the mixers' xavier init is overridden for every Linear (1x1)
        # projection by trunc-normal(0.02); the depthwise convs keep theirs
        self.apply(_init_linear)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_chans, 1 << (len(self.stages) + 1))
        return self.stem(x).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- official checkpoints -------------------------------------------------------------------------

_VIG_RENAMES = [
    (r'^blocks\.(\d+)\.attn_norm\.', r'blocks.\1.norm1.'),
    (r'^blocks\.(\d+)\.mlp_norm\.', r'blocks.\1.norm2.'),
    (r'^blocks\.(\d+)\.mlp\.gate_proj\.', r'blocks.\1.mlp.fc1.'),
    (r'^blocks\.(\d+)\.mlp\.down_proj\.', r'blocks.\1.mlp.fc2.'),
]

_VIGH_RENAMES = [
    (r'^patch_embed\.0\.', 'stem.0.'),
    (r'^patch_embed\.2\.', 'stem.1.'),
    (r'^patch_embed\.5\.', 'stem.3.'),
    (r'^patch_embed\.7\.', 'stem.4.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.norm\.', r'stages.\1.blocks.\2.norm1.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.norm2\.', r'stages.\1.blocks.\2.norm2.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.op\.', r'stages.\1.blocks.\2.attn.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.mlp\.', r'stages.\1.blocks.\2.mlp.'),
    (r'^classifier\.norm\.', 'norm.'),
    (r'^classifier\.head\.', 'head.'),
]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official ViG / ViG-H checkpoint (or one of ours) -> this model's state dict.

    Handles the {'model', 'model_ema', ...} wrappers, the official key names, ViG-H's 1x1-conv
    projections (squeezed to Linear weights) and its downsample placement (end of stage s in the
    official layout, start of stage s + 1 here), and resamples a plain ViG position embedding
    trained at another resolution to this model's grid.
    """
    state_dict = unwrap_state_dict(state_dict)
    hierarchical = isinstance(model, ViGH)
    out = {}
    for k, v in state_dict.items():
        if hierarchical:
            m = re.match(r'^layers\.(\d+)\.downsample\.(\d+)\.(.*)$', k)
            if m:
                stage, idx, rest = int(m.group(1)), int(m.group(2)), m.group(3)
                k = f'stages.{stage + 1}.downsample.{ {1: 0, 3: 1}.get(idx, idx) }.{rest}'
            else:
                k = rename_key(k, _VIGH_RENAMES)
            if k.endswith(('qkv_proj.weight', 'g_proj.weight', 'gk_proj.0.weight', 'gk_proj.1.weight',
                           'mlp.fc1.weight', 'mlp.fc2.weight')) and v.ndim == 4:
                v = v.flatten(1)
        else:
            k = rename_key(k, _VIG_RENAMES)
            if k == 'pos_embed' and v.shape != model.pos_embed.shape:
                old = v.shape[1]
                side = int(round(old ** 0.5))
                if side * side != old:
                    raise ValueError(f"pos_embed in the checkpoint has {old} tokens, not a square grid")
                v = resample_abs_pos_embed(v, model.grid_size, (side, side), num_prefix_tokens=0,
                                           antialias=False)
        out[k] = v
    return out


def _default_out_indices(cls, kwargs) -> Tuple[int, ...]:
    """features_only taps: every ViG-H stage, or the last (up to) four plain ViG blocks."""
    if cls is ViGH:
        return tuple(range(len(kwargs['depths'])))
    return tuple(range(-min(4, kwargs['depth']), 0))


def _create(cls, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    return create_model(cls, variant, pretrained, checkpoint_filter_fn, _default_out_indices(cls, kwargs),
                        'https://huggingface.co/hustvl/ViG', **kwargs)


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'patch_embed.proj.0', 'classifier': 'head',
        'license': 'mit', 'paper_ids': 'arXiv:2405.18425', 'paper_name': 'ViG: Linear-complexity Visual '
        'Sequence Learning with Gated Linear Attention',
        'origin_url': 'https://github.com/hustvl/ViG',
        **kwargs,
    }


_WEIGHTS = 'official ImageNet-1k weights (hustvl/ViG on the Hugging Face hub), converted on load by checkpoint_filter_fn'


def _official(filename: str, **kwargs) -> Dict:
    return _cfg(hf_hub_id='hustvl/ViG', hf_hub_filename=filename, notes=(_WEIGHTS,), **kwargs)


default_cfgs = generate_default_cfgs({
    'vig_t.in1k': _official('vig_t_77p2acc.pth'),
    'vig_s.in1k': _official('vig_s_81p7acc.pth'),
    'vig_b.in1k': _official('vig_b_82p6acc.pth'),
    'vig_h_t.in1k': _official('vig_h_t_82p8acc.pth', first_conv='stem.0', pool_size=(7, 7)),
    'vig_h_s.in1k': _official('vig_h_s_83p8acc.pth', first_conv='stem.0', pool_size=(7, 7)),
    'vig_h_b.in1k': _official('vig_h_b_84p2acc.pth', first_conv='stem.0', pool_size=(7, 7)),
})


@register_model
def vig_t(pretrained: bool = False, **kwargs) -> ViG:
    args = dict(embed_dim=192, depth=12, num_heads=3, conv_act=True, out_act=True)
    return _create(ViG, 'vig_t', pretrained, **dict(args, **kwargs))


@register_model
def vig_s(pretrained: bool = False, **kwargs) -> ViG:
    args = dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.2)
    return _create(ViG, 'vig_s', pretrained, **dict(args, **kwargs))


@register_model
def vig_b(pretrained: bool = False, **kwargs) -> ViG:
    args = dict(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.5)
    return _create(ViG, 'vig_b', pretrained, **dict(args, **kwargs))


@register_model
def vig_h_t(pretrained: bool = False, **kwargs) -> ViGH:
    args = dict(embed_dim=96, depths=(2, 2, 5, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
    return _create(ViGH, 'vig_h_t', pretrained, **dict(args, **kwargs))


@register_model
def vig_h_s(pretrained: bool = False, **kwargs) -> ViGH:
    args = dict(embed_dim=96, depths=(2, 2, 17, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
    return _create(ViGH, 'vig_h_s', pretrained, **dict(args, **kwargs))


@register_model
def vig_h_b(pretrained: bool = False, **kwargs) -> ViGH:
    args = dict(embed_dim=128, depths=(2, 2, 17, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.6)
    return _create(ViGH, 'vig_h_b', pretrained, **dict(args, **kwargs))
