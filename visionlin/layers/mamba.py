"""Vim's mixer: bidirectional Mamba ("bimamba v2") on a token sequence (B, L, D).

One input projection to x | z (expand 2) is shared; each direction has its own causal depthwise
conv1d (k4) + SiLU, x_proj (-> dt_rank | B | C), dt_proj (softplus with bias), A = -exp(A_log) and D;
the backward direction scans the reversed sequence. Each direction's output is gated by SiLU(z)
(of its own token order); out = out_proj((y_fwd + flip(y_bwd)) / 2). Both directions run on every
path (the official non-fused path silently runs only the forward one).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from ..kernels import selective_scan


class _Direction(nn.Module):
    """One scan direction's parameters (conv1d, x_proj, dt_proj, A_log, D)."""

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, d_conv: int):
        super().__init__()
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))


@register_notrace_module  # FX leaf: shapes drive the kernel call
class BiMambaMixer(nn.Module):
    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        self.d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        self.fwd = _Direction(self.d_inner, d_state, self.dt_rank, d_conv)
        self.bwd = _Direction(self.d_inner, d_state, self.dt_rank, d_conv)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba's init: dt_proj weight U(+-dt_rank^-0.5), bias = softplus^-1 of dt ~ logU(dt_min, dt_max)."""
        dt_min, dt_max, floor = self._dt_range
        for d in (self.fwd, self.bwd):
            std = self.dt_rank ** -0.5
            nn.init.uniform_(d.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=floor)
            with torch.no_grad():
                d.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                d.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
                d.D.fill_(1.0)

    def _scan(self, d: _Direction, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: (B, L, d_inner) in this direction's order -> gated output (B, L, d_inner).

        Token-major throughout: the conv is a sum of shifted slices (no (B, d, L) copies), and the
        scan reads its inputs as transposed views, which the compiled CPU scan takes in place."""
        L, K = x.shape[1], d.conv1d.kernel_size[0]
        w = d.conv1d.weight.squeeze(1)                        # (d_inner, K), causal: pad K-1 on the left
        xp = F.pad(x, (0, 0, K - 1, 0))
        xc = torch.addcmul(d.conv1d.bias, xp[:, :L], w[:, 0])
        for k in range(1, K):
            xc = xc.addcmul_(xp[:, k:k + L], w[:, k])
        x = F.silu(xc)
        dt, B, C = d.x_proj(x).split((self.dt_rank, self.d_state, self.d_state), dim=-1)
        delta = F.linear(dt, d.dt_proj.weight)
        A = -torch.exp(d.A_log.float())
        y = selective_scan(x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                           d.D.float(), z=z.transpose(1, 2), delta_bias=d.dt_proj.bias.float(), delta_softplus=True)
        return y.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in, z = self.in_proj(x).chunk(2, dim=-1)              # (B, L, d_inner) each
        y = self._scan(self.fwd, x_in, z)
        y_b = self._scan(self.bwd, x_in.flip(1), z.flip(1)).flip(1)
        return self.out_proj((y + y_b) / 2)
