"""RAVLT: rank-augmented vision linear transformer (RALA in stages 1-2, RoPE softmax attention in 3-4).

Paper: "Breaking the Low-Rank Dilemma of Linear Attention" (CVPR 2025, arXiv 2411.07635);
official code and weights: github.com/qhfan/RALA.

Channels-first (B, C, H, W) throughout, as the official model: conv stem to stride 4, four stages
(stage s > 0 opens with a 3x3 stride-2 conv + BN), blocks x += dwconv3x3(x);
x += DropPath(gamma_1 * mixer(LN(x))); x += DropPath(gamma_2 * ConvFFN(LN(x))); head 1x1 conv to
1024 -> BN -> SiLU -> average pool -> Linear. Mixers: ``visionlin.layers.RankAugmentedAttention``.
Inputs must have H and W divisible by 32; 2-D RoPE is recomputed for every H x W.

``ravlt_s_linear`` (RALA in all four stages) is not an official configuration: a pure-linear
baseline with ravlt_s's sizes, asked for by users; no weights exist for it.
"""
import re
from typing import Dict, List, Optional, Sequence, Union

import torch
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import RankAugmentedAttention, check_image, rope_2d
from ._helpers import StagedBackbone, check_global_pool, create_model, rename_key, unwrap_state_dict

__all__ = ["RAVLT"]


class ConvFFN(nn.Module):
    """1x1 conv -> GELU -> h + dwconv3x3(h) -> 1x1 conv."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        return self.fc2(self.dwconv(x).add_(x))  # in place: the conv's backward does not need its output


class Block(nn.Module):
    """CPE, then pre-norm mixer and FFN residuals with layer scale (official (1, C, 1, 1) gammas)."""

    def __init__(self, dim: int, num_heads: int, linear: bool, mlp_ratio: float, layer_scale_init: float,
                 drop_path: float = 0.0):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.attn = RankAugmentedAttention(dim, num_heads, linear=linear)
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(mlp_ratio * dim))
        self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale_init)))
        self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), sin, cos))
        return x + self.drop_path(self.gamma_2 * self.ffn(self.norm2(x)))


class RAVLTStage(nn.Module):
    """Optional stride-2 downsample (3x3 conv + BN), then blocks sharing one 2-D RoPE table."""

    def __init__(self, dim: int, dim_out: int, depth: int, num_heads: int, linear: bool, downsample: bool,
                 mlp_ratio: float, layer_scale_init: float, drop_path: Sequence[float]):
        super().__init__()
        self.grad_checkpointing = False
        self.head_dim = dim_out // num_heads
        self.downsample = nn.Sequential(
            nn.Conv2d(dim, dim_out, 3, stride=2, padding=1),
            nn.BatchNorm2d(dim_out),
        ) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            Block(dim_out, num_heads, linear, mlp_ratio, layer_scale_init, drop_path[i]) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        sin, cos = rope_2d(x.shape[-2], x.shape[-1], self.head_dim, x.device)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, sin, cos, use_reentrant=False)
            else:
                x = blk(x, sin, cos)
        return x


class ClassifierHead(nn.Module):
    """1x1 conv -> BN -> SiLU at full resolution (none when ``hidden`` is None), average pool, Linear
    (the official classifier is a 1x1 conv on the pooled map)."""

    def __init__(self, in_features: int, hidden: Optional[int], num_classes: int, global_pool: str,
                 drop_rate: float):
        super().__init__()
        self.global_pool = check_global_pool(global_pool)
        self.proj = nn.Conv2d(in_features, hidden, 1) if hidden else nn.Identity()
        self.norm = nn.BatchNorm2d(hidden) if hidden else nn.Identity()
        self.act = nn.SiLU() if hidden else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden or in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act(self.norm(self.proj(x)))
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class RAVLT(StagedBackbone, nn.Module):
    """Hierarchical RAVLT: ``linear_stages[i]`` says whether stage i uses RALA (else softmax attention)."""
    _head_pattern = r'^head\.(?:proj|norm)'

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            linear_stages: Sequence[bool] = (True, True, False, False),
            mlp_ratio: float = 3.5,
            layer_scale_init: Union[float, Sequence[float]] = 1.0,
            head_hidden_size: int = 1024,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        n = len(depths)
        if isinstance(layer_scale_init, (int, float)):
            layer_scale_init = (layer_scale_init,) * n
        for name, value in (("embed_dims", embed_dims), ("num_heads", num_heads),
                            ("linear_stages", linear_stages), ("layer_scale_init", layer_scale_init)):
            if len(value) != n:
                raise ValueError(f"{name} {tuple(value)} must have one entry per stage ({n}, from depths)")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = embed_dims[-1]
        self.head_hidden_size = head_hidden_size
        self.drop_rate = drop_rate

        c = embed_dims[0]
        self.stem = nn.Sequential(  # indices as the official patch_embed.proj
            nn.Conv2d(in_chans, c // 2, 3, stride=2, padding=1), nn.BatchNorm2d(c // 2), nn.GELU(),
            nn.Conv2d(c // 2, c // 2, 3, padding=1), nn.BatchNorm2d(c // 2), nn.GELU(),
            nn.Conv2d(c // 2, c // 2, 3, padding=1), nn.BatchNorm2d(c // 2), nn.GELU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.BatchNorm2d(c),
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).split(list(depths))
        self.stages = nn.Sequential()
        self.feature_info = []
        prev = c
        for i in range(n):
            self.stages.append(RAVLTStage(
                prev, embed_dims[i], depths[i], num_heads[i], linear=bool(linear_stages[i]), downsample=i > 0,
                mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init[i], drop_path=dpr[i].tolist()))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
            prev = embed_dims[i]
        self.norm = nn.Identity()  # no feature norm: the head's BN follows its projection
        self.head = ClassifierHead(self.num_features, head_hidden_size, num_classes, global_pool, drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the official init: trunc-normal(0.02) for every conv (the 1x1 classifier conv included)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.head.global_pool = check_global_pool(global_pool)
        self.head.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_chans, 1 << (len(self.stages) + 1))
        return self.stem(x)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head or max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.num_classes = 0
            self.head = ClassifierHead(self.num_features, None, 0, '', self.drop_rate)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- official checkpoints -------------------------------------------------------------------------

_RENAMES = [
    (r'^patch_embed\.proj\.', 'stem.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.(norm[12])\.norm\.', r'stages.\1.blocks.\2.\3.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'^proj\.', 'head.proj.'),
    (r'^norm\.', 'head.norm.'),
    (r'^head\.', 'head.fc.'),
]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official RAVLT checkpoint (or one of ours) -> this model's state dict.

    Takes the EMA weights of {'model', 'model_ema', ...} files first; moves each stage's closing
    downsample (``layers.s.downsample.{reduction,norm}``) to the start of stage s + 1; checks each
    stage's RoPE buffer ``layers.s.RoPE.angle`` against the angles this model computes, then drops it;
    renames the LayerNorm wrappers, stem and head; squeezes the 1x1-conv classifier to a Linear.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith('stages.') for k in state_dict):
        return state_dict  # already in this layout
    out = {}
    for k, v in state_dict.items():
        m = re.match(r'^layers\.(\d+)\.RoPE\.angle$', k)
        if m:
            stage = model.stages[int(m.group(1))] if int(m.group(1)) < len(model.stages) else None
            head_dim = stage.head_dim if stage is not None else 4 * v.numel() // 2
            expected = (1.0 / 10000 ** torch.linspace(0, 1, head_dim // 4)).repeat_interleave(2)
            if v.shape != expected.shape or not torch.allclose(v.float(), expected, rtol=1e-5):
                raise ValueError(f"{k} in the checkpoint does not hold the 2-D RoPE angles for head dim "
                                 f"{head_dim} that this model computes; the checkpoint is for another layout")
            continue
        m = re.match(r'^layers\.(\d+)\.downsample\.(reduction|norm)\.(.*)$', k)
        if m:
            k = f"stages.{int(m.group(1)) + 1}.downsample.{0 if m.group(2) == 'reduction' else 1}.{m.group(3)}"
        else:
            k = rename_key(k, _RENAMES)
        if k == 'head.fc.weight' and v.ndim == 4:
            v = v.flatten(1)
        out[k] = v
    return out


def _create(variant: str, pretrained: bool = False, **kwargs) -> RAVLT:
    out_indices = tuple(range(len(kwargs.get('depths', (2, 2, 6, 2)))))
    return create_model(RAVLT, variant, pretrained, checkpoint_filter_fn, out_indices,
                        'https://huggingface.co/aldjalkdf/RAVLT', **kwargs)


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'stem.0', 'classifier': 'head.fc',
        'license': 'unknown', 'paper_ids': 'arXiv:2411.07635',
        'paper_name': 'Breaking the Low-Rank Dilemma of Linear Attention',
        'origin_url': 'https://github.com/qhfan/RALA',
        **kwargs,
    }


_WEIGHTS = ('official ImageNet-1k weights (aldjalkdf/RAVLT on the Hugging Face hub, training checkpoints), converted '
            'on load by checkpoint_filter_fn; the official repository states no license')


def _official(filename: str) -> Dict:
    return _cfg(hf_hub_id='aldjalkdf/RAVLT', hf_hub_filename=filename, notes=(_WEIGHTS,))


default_cfgs = generate_default_cfgs({
    'ravlt_t.in1k': _official('RAVLT_T.pth'),
    'ravlt_s.in1k': _official('RAVLT_S.pth'),
    'ravlt_b.in1k': _official('RAVLT_B.pth'),
    'ravlt_l.in1k': _official('RAVLT_L.pth'),
    'ravlt_s_linear': _cfg(notes=('not an official configuration: ravlt_s with RALA in all four stages, '
                                  'a pure-linear baseline; no pretrained weights',)),
})


@register_model
def ravlt_t(pretrained: bool = False, **kwargs) -> RAVLT:
    args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.1)
    return _create('ravlt_t', pretrained, **dict(args, **kwargs))


@register_model
def ravlt_s(pretrained: bool = False, **kwargs) -> RAVLT:
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8), drop_path_rate=0.15)
    return _create('ravlt_s', pretrained, **dict(args, **kwargs))


@register_model
def ravlt_b(pretrained: bool = False, **kwargs) -> RAVLT:
    args = dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 12, 6), num_heads=(1, 2, 6, 8), drop_path_rate=0.4,
                layer_scale_init=(1.0, 1.0, 1e-6, 1e-6))
    return _create('ravlt_b', pretrained, **dict(args, **kwargs))


@register_model
def ravlt_l(pretrained: bool = False, **kwargs) -> RAVLT:
    args = dict(embed_dims=(96, 192, 448, 640), depths=(4, 7, 19, 8), num_heads=(1, 2, 7, 10), drop_path_rate=0.55,
                layer_scale_init=1e-6)
    return _create('ravlt_l', pretrained, **dict(args, **kwargs))


@register_model
def ravlt_s_linear(pretrained: bool = False, **kwargs) -> RAVLT:
    """Not official: ravlt_s with RALA in every stage (a pure-linear baseline)."""
    args = dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8), drop_path_rate=0.15,
                linear_stages=(True, True, True, True))
    return _create('ravlt_s_linear', pretrained, **dict(args, **kwargs))
