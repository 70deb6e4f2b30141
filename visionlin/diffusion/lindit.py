"""LinDiT: DiT's class-conditional adaLN-Zero transformer with LinFusion's generalized linear attention and a
depthwise conv for locality, as a diffusers model that runs inside ``DiTPipeline``.

Papers: DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"), LinFusion (Liu et al.), LiT (Wang et
al., "LiT: Delving into a Simplified Linear Diffusion Transformer"), DiG (Zhu et al., "DiG: Scalable and Efficient
Diffusion Models with Gated Linear Attention").

Block: ``x + g_msa * (attn(h) + dwconv(h))`` with ``h = adaLN(x)``, then DiT's gated MLP. Parameter names are those
of diffusers' ``DiTTransformer2DModel`` everywhere (``attn1.to_q`` ... included) except the feature MLPs
``attn1.to_q_`` / ``attn1.to_k_`` and ``dwconv``, so :meth:`LinDiTTransformer2DModel.from_dit` inherits a DiT's
weights by name (LiT's recipe).

* The conv sits inside the gated attention branch, on the same modulated tokens: like LiT's conv it gives the
  global, low-rank linear attention the local detail it lacks, and unlike DiG's ungated post-block conv it stays
  under the (t, y) modulation and gate.
* The conv and the feature MLPs' output layers start at zero, so a ``from_dit`` student is exactly the teacher
  with softmax attention swapped for linear attention; their inputs are non-zero, so they still learn from step 1.
* Positions: DiT's fixed sin-cos table, recomputed per latent size by diffusers' ``PatchEmbed`` so that each axis
  spans the grid of ``base_sample_size`` (PixArt's interpolation): a larger latent gets finer positions over the
  trained range. ``sample_size`` is only the latent size ``DiTPipeline`` generates, so
  ``LinDiTTransformer2DModel.from_pretrained(path, sample_size=64)`` makes the pipeline sample 2x larger images
  with the trained positions. Setting ``base_sample_size`` to the target size extrapolates positions instead.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormZero
from diffusers.utils import logging
from torch import nn

from ..layers import GeneralizedLinearAttention

__all__ = ["LinDiTTransformer2DModel", "LinDiTBlock", "LINDIT_CONFIGS", "create_lindit", "lindit_s_2", "lindit_b_2",
           "lindit_l_2", "lindit_xl_2"]

logger = logging.get_logger(__name__)

# Config fields that shape a DiT's weights or computation; from_dit copies them and refuses overrides that differ.
DIT_ARCHITECTURE_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
                           "patch_size", "attention_bias", "activation_fn", "num_embeds_ada_norm",
                           "norm_elementwise_affine", "norm_eps")


def depthwise_conv_tokens(conv: nn.Conv2d, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Applies a 2-D conv to row-major tokens (B, H*W, C) laid out on ``grid`` = (H, W)."""
    height, width = grid
    image = x.transpose(1, 2).unflatten(2, (height, width))
    return conv(image).flatten(2).transpose(1, 2)


class LinDiTBlock(nn.Module):
    """DiT's adaLN-Zero block (diffusers' names) with generalized linear attention plus a depthwise conv."""

    def __init__(self, dim: int, num_heads: int, num_embeds_ada_norm: int, *, feature_dim: Optional[int] = None,
                 use_feature_mlp: bool = True, conv_kernel_size: int = 3, attention_bias: bool = True,
                 activation_fn: str = "gelu-approximate", norm_elementwise_affine: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, num_embeds_ada_norm)
        self.attn1 = GeneralizedLinearAttention(dim, num_heads, feature_dim, use_feature_mlp=use_feature_mlp,
                                                qkv_bias=attention_bias, out_bias=True)
        self.dwconv = nn.Conv2d(dim, dim, conv_kernel_size, padding=conv_kernel_size // 2, groups=dim)
        self.norm3 = nn.LayerNorm(dim, norm_eps, norm_elementwise_affine)
        self.ff = FeedForward(dim, activation_fn=activation_fn)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int], timestep: torch.Tensor,
                class_labels: torch.Tensor) -> torch.Tensor:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, timestep, class_labels, hidden_dtype=x.dtype)
        x = x + gate_msa[:, None] * (self.attn1(h) + depthwise_conv_tokens(self.dwconv, h, grid))
        h = self.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


class LinDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """Class-conditional latent diffusion transformer of linear cost in the number of tokens.

    Config fields shared with ``DiTTransformer2DModel`` mean the same (width = heads x head_dim; ``out_channels`` =
    2 x ``in_channels`` for a learned variance; ``DiTPipeline`` uses class ``num_embeds_ada_norm`` = 1000 as the null
    class). Added: ``feature_dim`` (width of the LinFusion feature MLPs, None = the model width),
    ``use_feature_mlp``, ``conv_kernel_size`` (odd) and ``base_sample_size`` (latent size the sin-cos positions
    are laid out for; None = ``sample_size``, stored resolved so a later ``sample_size`` override keeps it).
    Fresh weights follow DiT's recipe (xavier, adaLN modulation and output layer zero: every block starts as the
    identity and the output as zero).
    """

    _supports_gradient_checkpointing = True
    _supports_group_offloading = False  # the output layer reuses block 0's conditioning embedder after the loop
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 72, in_channels: int = 4,
                 out_channels: Optional[int] = None, num_layers: int = 28, sample_size: int = 32, patch_size: int = 2,
                 attention_bias: bool = True, activation_fn: str = "gelu-approximate",
                 num_embeds_ada_norm: int = 1000, norm_elementwise_affine: bool = False, norm_eps: float = 1e-5,
                 feature_dim: Optional[int] = None, use_feature_mlp: bool = True, conv_kernel_size: int = 3,
                 base_sample_size: Optional[int] = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        base_sample_size = sample_size if base_sample_size is None else base_sample_size
        for name, size in (("sample_size", sample_size), ("base_sample_size", base_sample_size)):
            if size < 1 or size % patch_size:
                raise ValueError(f"{name} must be a positive multiple of patch_size={patch_size}, got {size}")
        if conv_kernel_size < 1 or conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be a positive odd integer (same-size padding), "
                             f"got {conv_kernel_size}")
        if feature_dim is not None and feature_dim < 1:
            raise ValueError(f"feature_dim must be None (= the model width) or >= 1, got {feature_dim}; "
                             f"use_feature_mlp=False drops the feature MLPs")
        # store the resolved values, and take them off the used-defaults list that from_config(model.config)
        # would otherwise re-default (base_sample_size must not follow a later sample_size override)
        resolved = {"out_channels": out_channels, "base_sample_size": base_sample_size}
        used_defaults = [k for k in self.config.get("_use_default_values", []) if k not in resolved]
        self.register_to_config(**resolved, _use_default_values=used_defaults)

        self.inner_dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed(height=base_sample_size, width=base_sample_size, patch_size=patch_size,
                                    in_channels=in_channels, embed_dim=self.inner_dim)
        self.transformer_blocks = nn.ModuleList([
            LinDiTBlock(self.inner_dim, num_attention_heads, num_embeds_ada_norm, feature_dim=feature_dim,
                        use_feature_mlp=use_feature_mlp, conv_kernel_size=conv_kernel_size,
                        attention_bias=attention_bias, activation_fn=activation_fn,
                        norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps)
            for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(self.inner_dim, 2 * self.inner_dim)
        self.proj_out_2 = nn.Linear(self.inner_dim, patch_size * patch_size * out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.pos_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        zero_init = [self.proj_out_1, self.proj_out_2]
        for block in self.transformer_blocks:
            emb = block.norm1.emb
            nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
            zero_init += [block.norm1.linear, block.dwconv]
            zero_init += [mlp[-1] for mlp in (block.attn1.to_q_, block.attn1.to_k_) if mlp is not None]
        for module in zero_init:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                return_dict: bool = True) -> Union[Transformer2DModelOutput, Tuple[torch.Tensor]]:
        """Latents (B, in_channels, H, W), H and W multiples of patch_size -> (B, out_channels, H, W)."""
        if hidden_states.dim() != 4 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(f"hidden_states must be latents (B, {self.config.in_channels}, H, W), "
                             f"got shape {tuple(hidden_states.shape)}")
        height, width = hidden_states.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height and width must be multiples of patch_size={p}, got {height}x{width}")
        grid = (height // p, width // p)

        x = self.pos_embed(hidden_states)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, grid, timestep, class_labels)
            else:
                x = block(x, grid, timestep, class_labels)

        # DiT's output layer: adaLN on the first block's (t, y) embedding, as diffusers' DiT does
        conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        x = self.proj_out_2(self.norm_out(x) * (1 + scale[:, None]) + shift[:, None])

        x = x.reshape(-1, *grid, p, p, self.out_channels)
        output = torch.einsum("nhwpqc->nchpwq", x).reshape(-1, self.out_channels, height, width)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    @classmethod
    def from_dit(cls, dit: DiTTransformer2DModel, *, inherit_attention: bool = True,
                 output_loading_info: bool = False, **overrides: Any
                 ) -> Union["LinDiTTransformer2DModel", Tuple["LinDiTTransformer2DModel", Dict[str, list]]]:
        """A LinDiT with every weight of ``dit`` except, unless ``inherit_attention``, the attention projections.

        LiT inherits all non-attention weights; LinFusion found starting q/k/v/out from the softmax teacher better,
        hence the default. The feature MLPs and the conv start fresh (zero output). ``overrides`` set the LinDiT-only
        fields and ``sample_size``; architecture fields may be repeated but must equal the DiT's. The student is
        built in the default dtype on the DiT's device. With ``output_loading_info`` returns
        ``(model, {"missing_keys": [names not inherited]})`` like ``from_pretrained``.
        """
        if not isinstance(dit, DiTTransformer2DModel):
            raise TypeError(f"from_dit takes a diffusers DiTTransformer2DModel, got {type(dit).__name__}")
        teacher = {name: dit.config[name] for name in DIT_ARCHITECTURE_FIELDS}
        teacher["out_channels"] = dit.out_channels  # the DiT config may leave it None (= in_channels)
        mismatches = [f"{name}={overrides[name]!r} but the DiT has {value!r}" for name, value in teacher.items()
                      if name in overrides and overrides[name] != value]
        if mismatches:
            raise ValueError("LinDiT architecture does not match the DiT: " + "; ".join(mismatches))
        # positions stay laid out for the teacher's training size whatever sample_size is asked for
        config = {**teacher, "sample_size": dit.config.sample_size, "base_sample_size": dit.config.sample_size,
                  **overrides}
        model = cls(**config).to(dit.device)  # default dtype: a student trains in full precision

        state = {k: v for k, v in dit.state_dict().items() if inherit_attention or ".attn1." not in k}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"DiT weights with no LinDiT counterpart (diffusers' DiT layout changed?): {unexpected}")
        logger.info(f"from_dit: {len(state)} tensors inherited; fresh: {missing}")
        return (model, {"missing_keys": missing}) if output_loading_info else model


# DiT's 256x256 configs (patch 2, mlp ratio 4, learned sigma); every field is also a DiTTransformer2DModel field.
_DIT_256 = dict(in_channels=4, out_channels=8, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
LINDIT_CONFIGS: Dict[str, Dict[str, Any]] = {
    "lindit_s_2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64, **_DIT_256),
    "lindit_b_2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64, **_DIT_256),
    "lindit_l_2": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64, **_DIT_256),
    "lindit_xl_2": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, **_DIT_256),
}


def create_lindit(name: str, **overrides: Any) -> LinDiTTransformer2DModel:
    """A LinDiT variant by name (``LINDIT_CONFIGS``), with config ``overrides``."""
    if name not in LINDIT_CONFIGS:
        raise ValueError(f"unknown LinDiT variant {name!r}; known: {', '.join(LINDIT_CONFIGS)}")
    return LinDiTTransformer2DModel(**{**LINDIT_CONFIGS[name], **overrides})


def lindit_s_2(**overrides: Any) -> LinDiTTransformer2DModel:
    return create_lindit("lindit_s_2", **overrides)


def lindit_b_2(**overrides: Any) -> LinDiTTransformer2DModel:
    return create_lindit("lindit_b_2", **overrides)


def lindit_l_2(**overrides: Any) -> LinDiTTransformer2DModel:
    return create_lindit("lindit_l_2", **overrides)


def lindit_xl_2(**overrides: Any) -> LinDiTTransformer2DModel:
    return create_lindit("lindit_xl_2", **overrides)
