"""RAVLT's token mixers: rank-augmented linear attention (RALA) and its softmax sibling.

Both run channels-first (B, C, H, W) with the same parameters: ``qkvo`` (1x1 conv to q | k | v | o),
``lepe`` (5x5 depthwise conv on v) and ``proj`` (1x1 conv); the output is proj((attn + lepe) * o).
2-D RoPE (first half of a head's channels: row index, second half: column index) is recomputed for
any H x W, so both mixers are resolution-free.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, register_notrace_module
from torch import nn

from ..kernels import linear_attention


@register_notrace_function  # FX leaf: sizes drive arange
def rope_2d(height: int, width: int, head_dim: int, device: torch.device,
            dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos), each (H * W, head_dim) in raster order, for RoPE with rotate-every-two pairs.

    Angles 1 / 10000 ** linspace(0, 1, head_dim / 4), each repeated for the two channels of a pair;
    the row index drives the first head_dim / 2 channels, the column index the last head_dim / 2.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    angle = (1.0 / 10000 ** torch.linspace(0, 1, head_dim // 4, device=device)).repeat_interleave(2)
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * angle   # (H, d/2)
    cols = torch.arange(width, device=device, dtype=torch.float32)[:, None] * angle    # (W, d/2)
    phase = torch.cat([rows[:, None, :].expand(height, width, -1),
                       cols[None, :, :].expand(height, width, -1)], dim=-1).reshape(height * width, head_dim)
    return phase.sin().to(dtype), phase.cos().to(dtype)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); sin/cos broadcast to x."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x1, x0), dim=-1).flatten(-2)
    return x * cos + rotated * sin


@register_notrace_module  # FX leaf: shapes drive the kernel call
class RankAugmentedAttention(nn.Module):
    """RALA (``linear=True``) or RoPE softmax attention (``linear=False``) on (B, C, H, W).

    RALA: q, k = ELU + 1; KV-buffer rank augmentation alpha_j = N softmax_j(mean_i(q_i) . k_j / sqrt(d));
    o_i = sum_j alpha_j <R q_i, R k_j> v_j / (sum_j alpha_j <q_i, k_j> + N eps) with RoPE R in the
    numerator only (``visionlin.kernels.linear_attention``). Softmax: softmax(R q (R k)^T / sqrt(d)) v.
    """

    def __init__(self, dim: int, num_heads: int, linear: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.linear = linear
        self.eps = eps
        self.qkvo = nn.Conv2d(dim, 4 * dim, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, linear={self.linear}"

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N, nh, d = H * W, self.num_heads, self.head_dim
        q, k, v, o = self.qkvo(x).chunk(4, dim=1)
        lepe = self.lepe(v)
        # (B, C, H, W) -> (B, N, heads, d) views: channel c = head * d + i, as the official layout
        q, k, v = (t.reshape(B, nh, d, N).permute(0, 3, 1, 2) for t in (q, k, v))
        if self.linear:
            q, k = F.elu(q).add_(1.0), F.elu(k).add_(1.0)  # ELU's backward reads its input, not output
            logits = torch.einsum("bhd,bnhd->bnh", q.mean(dim=1), k) * d ** -0.5
            alpha = torch.softmax(logits.float(), dim=1) * N    # float32: N * softmax can pass fp16's max
            sin, cos = sin[:, None, :], cos[:, None, :]
            out = linear_attention(q, k, v, q_num=apply_rope(q, sin, cos).to(q.dtype),
                                   k_num=apply_rope(k, sin, cos).to(q.dtype), key_weight=alpha,
                                   eps=self.eps)
            out = out.permute(0, 2, 3, 1)                                       # (B, heads, d, N)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))                    # (B, heads, N, d)
            q, k = apply_rope(q, sin, cos).to(v.dtype), apply_rope(k, sin, cos).to(v.dtype)
            out = F.scaled_dot_product_attention(q, k, v)
            out = out.transpose(-1, -2)                                         # (B, heads, d, N)
        out = out.reshape(B, C, H, W)
        return self.proj((out + lepe) * o)
