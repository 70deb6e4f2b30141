"""VMamba (v2): hierarchical vision backbone on SS2D, the 4-route 2-D selective scan.

Paper: "VMamba: Visual State Space Model" (NeurIPS 2024, arXiv 2401.10166); official code and
weights: github.com/MzeroMiko/VMamba (MIT).

Channels-first (B, C, H, W) with LayerNorm2d (eps 1e-5), as the released "vmambav2v" models:
stem Conv3x3 s2 -> LN2d -> GELU -> Conv3x3 s2 -> LN2d (stride 4); four stages, stage s > 0
opening with Conv3x3 s2 + LN2d; blocks x += DropPath(SS2D(LN2d(x))); x += DropPath(MLP(LN2d(x)))
(1x1 Linear2d, GELU, ratio 4); final LN2d, average pool, Linear. SS2D: forward type "v05_noz",
d_state 1, ssm_ratio 1, on ``visionlin.kernels.cross_selective_scan``.
"""
import re
from typing import Dict, Sequence

import torch
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from ..layers import SS2D, Linear2d, check_image
from ._helpers import PooledLinearHead, StagedBackbone, check_global_pool, create_model, rename_key, unwrap_state_dict

__all__ = ["VMamba"]


def _norm(dim: int) -> nn.Module:
    return LayerNorm2d(dim, eps=1e-5)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear2d(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear2d(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, d_state: int, ssm_ratio: float, mlp_ratio: float, drop_path: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.norm = _norm(dim)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio)
        self.norm2 = _norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VMambaStage(nn.Module):
    def __init__(self, dim: int, dim_out: int, depth: int, downsample: bool, d_state: int, ssm_ratio: float,
                 mlp_ratio: float, drop_path: Sequence[float], proj_drop: float = 0.0):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = nn.Sequential(nn.Conv2d(dim, dim_out, 3, stride=2, padding=1), _norm(dim_out)) \
            if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim_out, d_state, ssm_ratio, mlp_ratio, drop_path[i], proj_drop)
                                      for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class VMamba(PooledLinearHead, StagedBackbone, nn.Module):
    _pool_dims = (2, 3)          # NCHW
    _head_pattern = r'^norm'

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 8, 2),
            d_state: int = 1,
            ssm_ratio: float = 1.0,
            mlp_ratio: float = 4.0,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = check_global_pool(global_pool)
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.num_features = self.head_hidden_size = dims[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1), _norm(embed_dim // 2), nn.GELU(),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1), _norm(embed_dim),
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).split(list(depths))
        self.stages = nn.Sequential()
        self.feature_info = []
        prev = embed_dim
        for i, depth in enumerate(depths):
            self.stages.append(VMambaStage(prev, dims[i], depth, i > 0, d_state, ssm_ratio, mlp_ratio,
                                           dpr[i].tolist(), proj_drop_rate))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
            prev = dims[i]
        self.norm = _norm(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the official init: trunc-normal(0.02) for every Linear (the 1x1 Linear2d projections included)
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # fnmatch patterns over full names (timm's optimizer factory): the SSM decay rates and skip weights
        return {'*.A_logs', '*.Ds'}

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_chans, 1 << (len(self.stages) + 1))
        return self.stem(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- official checkpoints -------------------------------------------------------------------------

_STEM = {0: 0, 2: 1, 5: 3, 7: 4}          # official patch_embed (channel-first v2) -> our stem indices
_RENAMES = [
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'^classifier\.norm\.', 'norm.'),
    (r'^classifier\.head\.', 'head.'),
]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official VMamba v2 checkpoint (``{'model': ...}``, EMA first) -> this model's state dict: stem
    indices, each stage's closing downsample (``layers.s.downsample.{1,3}``) moved to the start of
    stage s + 1, ``classifier.{norm,head}`` -> ``norm``/``head``; SS2D parameters keep their names."""
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith('stages.') for k in state_dict):
        return state_dict
    out = {}
    for k, v in state_dict.items():
        m = re.match(r'^patch_embed\.(\d+)\.(.*)$', k)
        d = re.match(r'^layers\.(\d+)\.downsample\.(\d+)\.(.*)$', k)
        if m:
            k = f"stem.{_STEM[int(m.group(1))]}.{m.group(2)}"
        elif d:
            k = f"stages.{int(d.group(1)) + 1}.downsample.{ {1: 0, 3: 1}[int(d.group(2))] }.{d.group(3)}"
        else:
            k = rename_key(k, _RENAMES)
        out[k] = v
    return out


def _create(variant: str, pretrained: bool = False, **kwargs) -> VMamba:
    out_indices = tuple(range(len(kwargs.get('depths', (2, 2, 8, 2)))))
    return create_model(VMamba, variant, pretrained, checkpoint_filter_fn, out_indices,
                        'https://github.com/MzeroMiko/VMamba/releases (vssm1_{tiny_0230s,small_0229s,base_0229s})',
                        **kwargs)


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'stem.0', 'classifier': 'head',
        'license': 'mit', 'paper_ids': 'arXiv:2401.10166', 'paper_name': 'VMamba: Visual State Space Model',
        'origin_url': 'https://github.com/MzeroMiko/VMamba',
        **kwargs,
    }


_RELEASE = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/'  # the '#v2cls' release's assets
_WEIGHTS = 'official ImageNet-1k weights (a MzeroMiko/VMamba release asset), converted on load by checkpoint_filter_fn'

default_cfgs = generate_default_cfgs({
    'vmamba_t.in1k': _cfg(url=_RELEASE + 'vssm1_tiny_0230s_ckpt_epoch_264.pth', notes=(_WEIGHTS,)),
    'vmamba_s.in1k': _cfg(url=_RELEASE + 'vssm1_small_0229s_ckpt_epoch_240.pth', notes=(_WEIGHTS,)),
    'vmamba_b.in1k': _cfg(url=_RELEASE + 'vssm1_base_0229s_ckpt_epoch_225.pth', notes=(_WEIGHTS,)),
})


@register_model
def vmamba_t(pretrained: bool = False, **kwargs) -> VMamba:
    args = dict(embed_dim=96, depths=(2, 2, 8, 2), drop_path_rate=0.2)
    return _create('vmamba_t', pretrained, **dict(args, **kwargs))


@register_model
def vmamba_s(pretrained: bool = False, **kwargs) -> VMamba:
    args = dict(embed_dim=96, depths=(2, 2, 20, 2), drop_path_rate=0.3)
    return _create('vmamba_s', pretrained, **dict(args, **kwargs))


@register_model
def vmamba_b(pretrained: bool = False, **kwargs) -> VMamba:
    args = dict(embed_dim=128, depths=(2, 2, 20, 2), drop_path_rate=0.5)
    return _create('vmamba_b', pretrained, **dict(args, **kwargs))
