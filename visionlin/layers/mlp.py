"""MLP sizing shared by the families (the layer itself is timm's ``GluMlp``)."""
import math

from timm.layers import GluMlp
from torch import nn


def swiglu_hidden_dim(dim: int, multiple_of: int, ratio: float = 4.0) -> int:
    """LLaMA-style SwiGLU width: int(ratio * 2/3 * dim) rounded up to ``multiple_of``."""
    return multiple_of * math.ceil(int(dim * ratio * 2 / 3) / multiple_of)


def swiglu_mlp(dim: int, hidden: int, drop: float = 0.0) -> nn.Module:
    """Packed SwiGLU: fc1 (dim -> 2*hidden, gate half first), silu(gate) * value, fc2 (hidden -> dim)."""
    return GluMlp(dim, 2 * hidden, dim, act_layer=nn.SiLU, gate_last=False, bias=False, drop=drop)
