"""LinFusion's generalized linear attention (Liu et al., "LinFusion: 1 GPU, 1 Minute, 16K Image").

    q = W_q (x + phi_q(x)),  k = W_k (x + phi_k(x)),  v = W_v x
    o_i = (elu(q_i) + 1) [mean_j (elu(k_j) + 1) v_j^T] / ((elu(q_i) + 1) . mean_j (elu(k_j) + 1) + 1e-4)

per head, then ``to_out``. phi is a small residual feature MLP ``Linear(d, m) -> LayerNorm(m) -> LeakyReLU
-> Linear(m, d)`` (m = d by default, d/16 for SDXL; None turns it off). The non-causal core runs on
``visionlin.kernels.linear_attention``, which keeps both reductions as means accumulated in fp32 (the
overflow-safe form of LinFusion's sqrt(N) split). Used by the diffusers processors of
``visionlin.diffusion`` and by LinDiT.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear_attention

__all__ = ["FeatureMLP", "GeneralizedLinearAttention", "generalized_linear_attention", "LINFUSION_EPS"]

LINFUSION_EPS = 1e-4


class FeatureMLP(nn.Sequential):
    """phi(x) = Linear(d, m) -> LayerNorm(m) -> LeakyReLU -> Linear(m, d); applied as x + phi(x).

    A Sequential so its parameters are named ``0.*``, ``1.*``, ``3.*`` like the official LinFusion files.
    """

    def __init__(self, dim: int, hidden: int):
        if hidden < 1:
            raise ValueError(f"FeatureMLP hidden width must be >= 1, got {hidden}")
        super().__init__(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(), nn.Linear(hidden, dim))


def generalized_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                                 eps: float = LINFUSION_EPS) -> torch.Tensor:
    """Multi-head ELU+1 linear attention on projected tokens: q (B, Nq, C), k (B, N, C), v (B, N, Cv)
    -> (B, Nq, Cv). C and Cv must be divisible by ``heads``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be (B, N, C), got shape {tuple(t.shape)}")
        if t.shape[-1] % heads:
            raise ValueError(f"{name} has {t.shape[-1]} channels, not divisible by heads={heads}")
    B, Nq, _ = q.shape
    split = lambda t: t.unflatten(-1, (heads, -1))  # noqa: E731  (B, N, H, D), a view
    o = linear_attention(F.elu(split(q)) + 1, F.elu(split(k)) + 1, split(v), eps=eps)
    return o.flatten(2)


class GeneralizedLinearAttention(nn.Module):
    """Self-attention over tokens (B, N, dim) with LinFusion's generalized linear attention.

    Parameter names follow diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), plus
    ``to_q_`` / ``to_k_`` for the feature MLPs, so teacher projections load by name.
    """

    def __init__(self, dim: int, heads: int, feature_dim: Optional[int] = None, *, use_feature_mlp: bool = True,
                 qkv_bias: bool = False, out_bias: bool = True, inner_dim: Optional[int] = None):
        super().__init__()
        inner_dim = inner_dim or dim
        if inner_dim % heads:
            raise ValueError(f"attention width {inner_dim} is not divisible by heads={heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim, bias=out_bias)])
        m = feature_dim or dim
        self.to_q_ = FeatureMLP(dim, m) if use_feature_mlp else None
        self.to_k_ = FeatureMLP(dim, m) if use_feature_mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"GeneralizedLinearAttention takes tokens (B, N, C), got shape {tuple(x.shape)}")
        xq = x if self.to_q_ is None else x + self.to_q_(x)
        xk = x if self.to_k_ is None else x + self.to_k_(x)
        o = generalized_linear_attention(self.to_q(xq), self.to_k(xk), self.to_v(x), self.heads)
        return self.to_out[0](o)
