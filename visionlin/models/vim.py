"""Vim: Vision Mamba, bidirectional Mamba blocks over patch tokens with a middle class token.

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model"
(ICML 2024, arXiv 2401.09417); official code and weights: github.com/hustvl/Vim (Apache-2.0),
huggingface.co/hustvl/Vim-{tiny,small,base}-midclstok.

Stride-16 patch embed, a class token inserted in the middle of the patch sequence (index M // 2),
learned position embedding (resampled for any input size divisible by 16), 24 blocks of
"residual += DropPath(h); h = mixer(RMSNorm(residual))" (the residual stream kept in float32),
final RMSNorm of residual + h, the class token -> Linear. The mixer is
``visionlin.layers.BiMambaMixer``: both directions' convs by ``bidirectional_conv1d_silu`` and one two-route
``cross_selective_scan`` (``visionlin.kernels``), with no flipped copies.
"""
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
from timm.layers import DropPath, RmsNorm, lecun_normal_, register_notrace_function, resample_abs_pos_embed, \
    trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import BiMambaMixer, check_image
from ._helpers import create_model, rename_key, unwrap_state_dict

__all__ = ["Vim"]


class Block(nn.Module):
    """residual = residual + DropPath(h) (residual = h for the first block); h = mixer(RMSNorm(residual))."""

    def __init__(self, dim: int, d_state: int, drop_path: float = 0.0):
        super().__init__()
        self.norm = RmsNorm(dim, eps=1e-5)
        self.mixer = BiMambaMixer(dim, d_state=d_state)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, h: torch.Tensor, residual: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        residual = h.float() if residual is None else residual + self.drop_path(h).float()
        return self.mixer(self.norm(residual.to(h.dtype))), residual


@register_notrace_function  # FX leaf: shape logic
def insert_middle_token(patches: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """(B, M, D) patches -> (B, M + 1, D) with ``token`` at index M // 2."""
    m = patches.shape[1] // 2
    return torch.cat([patches[:, :m], token.expand(patches.shape[0], -1, -1), patches[:, m:]], dim=1)


@register_notrace_function
def middle_pos_embed(pos_embed: torch.Tensor, grid: List[int], trained_grid: List[int]) -> torch.Tensor:
    """A (1, M + 1, D) embedding with the class slot at M // 2, resampled to another patch grid [gh, gw]."""
    if grid[0] == trained_grid[0] and grid[1] == trained_grid[1]:
        return pos_embed
    m = pos_embed.shape[1] // 2
    cls, patches = pos_embed[:, m:m + 1], torch.cat([pos_embed[:, :m], pos_embed[:, m + 1:]], dim=1)
    patches = resample_abs_pos_embed(patches, grid, trained_grid, num_prefix_tokens=0, antialias=False)
    return insert_middle_token(patches, cls)


class Vim(nn.Module):
    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 192,
            depth: int = 24,
            d_state: int = 16,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = self._check_pool(global_pool)
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # as the official code: block i drops the output of block i - 1, the final add uses the full rate
        dpr = [0.0] + torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList([Block(embed_dim, d_state, dpr[i]) for i in range(depth)])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.norm_f = RmsNorm(embed_dim, eps=1e-5)
        self.feature_info = [dict(module=f'layers.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        """The official init: lecun-normal patch conv, trunc-normal(0.02) head, tokens and position
        embedding; every out_proj kaiming-uniform scaled by 1/sqrt(depth); other Linear biases zero."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for blk in self.layers:
            nn.init.kaiming_uniform_(blk.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                blk.mixer.out_proj.weight /= math.sqrt(depth)

    @staticmethod
    def _check_pool(global_pool: str) -> str:
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool must be 'token' (the class token), 'avg' or '', got {global_pool!r}")
        return global_pool

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # patterns (timm matches them with fnmatch against full names): a bare 'A_log' would match nothing
        return {'pos_embed', 'cls_token', '*.A_log', '*.D'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r'^cls_token|pos_embed|patch_embed',
                    blocks=[(r'^layers\.(\d+)', None), (r'^norm_f', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_chans, self.patch_size)
        x = self.patch_embed.proj(x)
        grid = x.shape[-2:]
        x = insert_middle_token(x.flatten(2).transpose(1, 2), self.cls_token)
        return self.pos_drop(x + middle_pos_embed(self.pos_embed, grid, [self.grid_size[0], self.grid_size[1]]))

    def _run(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = x
        residual: Optional[torch.Tensor] = None
        for blk in self.layers:
            if self.grad_checkpointing and not torch.jit.is_scripting() and residual is not None:
                h, residual = checkpoint(blk, h, residual, use_reentrant=False)
            else:
                h, residual = blk(h, residual)
        assert residual is not None  # a model has at least one block (a refinement for TorchScript)
        return h, residual

    def _final(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm_f((residual + self.drop_path(h).float()).to(h.dtype))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The token stream (residual + block output, class token removed) after the selected blocks,
        as NCHW maps or NLC sequences, and optionally the final features."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self._embed(x)
        m = (x.shape[1] - 1) // 2
        layers = self.layers if not stop_early else self.layers[:max_index + 1]
        h, residual = x, None
        intermediates = []
        for i, blk in enumerate(layers):
            h, residual = blk(h, residual)
            if i in take_indices:
                y = self._final(h, residual) if norm else (residual + h.float()).to(h.dtype)
                y = torch.cat([y[:, :m], y[:, m + 1:]], dim=1)
                intermediates.append(y.transpose(1, 2).reshape(y.shape[0], -1, gh, gw) if output_fmt == 'NCHW' else y)
        if intermediates_only:
            return intermediates
        return self._final(h, residual), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, M + 1, D), the class token at index M // 2."""
        h, residual = self._run(self._embed(x))
        return self._final(h, residual)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        m = (x.shape[1] - 1) // 2
        if self.global_pool == 'token':
            x = x[:, m]
        elif self.global_pool == 'avg':
            x = torch.cat([x[:, :m], x[:, m + 1:]], dim=1).mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- official checkpoints -------------------------------------------------------------------------

_RENAMES = [
    (r'^layers\.(\d+)\.mixer\.(conv1d|x_proj|dt_proj)_b\.', r'layers.\1.mixer.bwd.\2.'),
    (r'^layers\.(\d+)\.mixer\.(conv1d|x_proj|dt_proj)\.', r'layers.\1.mixer.fwd.\2.'),
    (r'^layers\.(\d+)\.mixer\.A_b_log$', r'layers.\1.mixer.bwd.A_log'),
    (r'^layers\.(\d+)\.mixer\.D_b$', r'layers.\1.mixer.bwd.D'),
    (r'^layers\.(\d+)\.mixer\.(A_log|D)$', r'layers.\1.mixer.fwd.\2'),
]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official Vim checkpoint (``{'model': ...}`` from hustvl/Vim-*-midclstok) -> this model's state dict:
    per-direction parameters (``conv1d``/``conv1d_b``, ``x_proj``/``x_proj_b``, ``dt_proj``/``dt_proj_b``,
    ``A_log``/``A_b_log``, ``D``/``D_b``) into ``mixer.fwd`` / ``mixer.bwd``; a position embedding trained
    on another grid is resampled around its middle class slot."""
    state_dict = unwrap_state_dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        k = rename_key(k, _RENAMES)
        if k == 'pos_embed' and v.shape != model.pos_embed.shape:
            side = int(round((v.shape[1] - 1) ** 0.5))
            if side * side != v.shape[1] - 1:
                raise ValueError(f"pos_embed in the checkpoint has {v.shape[1] - 1} patch slots, not a square grid")
            v = middle_pos_embed(v, list(model.grid_size), [side, side])
        out[k] = v
    return out


def _create(variant: str, pretrained: bool = False, **kwargs) -> Vim:
    depth = kwargs.get('depth', 24)
    return create_model(Vim, variant, pretrained, checkpoint_filter_fn, tuple(range(-min(4, depth), 0)),
                        'https://huggingface.co/hustvl (Vim-tiny-midclstok, Vim-small-midclstok, Vim-base-midclstok)',
                        **kwargs)


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2401.09417',
        'paper_name': 'Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model',
        'origin_url': 'https://github.com/hustvl/Vim',
        **kwargs,
    }


def _official(repo: str, filename: str) -> Dict:
    return _cfg(hf_hub_id=repo, hf_hub_filename=filename,
                notes=(f'official ImageNet-1k weights ({repo} on the Hugging Face hub, training checkpoints), '
                       'converted on load by checkpoint_filter_fn',))


default_cfgs = generate_default_cfgs({
    'vim_t.in1k': _official('hustvl/Vim-tiny-midclstok', 'vim_t_midclstok_76p1acc.pth'),
    'vim_s.in1k': _official('hustvl/Vim-small-midclstok', 'vim_s_midclstok_80p5acc.pth'),
    'vim_b.in1k': _official('hustvl/Vim-base-midclstok', 'vim_b_midclstok_81p9acc.pth'),
})


@register_model
def vim_t(pretrained: bool = False, **kwargs) -> Vim:
    return _create('vim_t', pretrained, **dict(dict(embed_dim=192, depth=24), **kwargs))


@register_model
def vim_s(pretrained: bool = False, **kwargs) -> Vim:
    return _create('vim_s', pretrained, **dict(dict(embed_dim=384, depth=24), **kwargs))


@register_model
def vim_b(pretrained: bool = False, **kwargs) -> Vim:
    return _create('vim_b', pretrained, **dict(dict(embed_dim=768, depth=24), **kwargs))
