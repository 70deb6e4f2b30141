"""Vim's mixer: bidirectional Mamba ("bimamba v2") on a token sequence (B, L, D).

One input projection to x | z (expand 2) is shared; each direction has its own causal depthwise
conv1d (k4) + SiLU, x_proj (-> dt_rank | B | C), dt_proj (softplus with bias), A = -exp(A_log) and D;
the backward direction scans the reversed sequence. Each direction's output is gated by SiLU(z)
(of its own token order); out = out_proj((y_fwd + flip(y_bwd)) / 2). Both directions run on every
path (the official non-fused path silently runs only the forward one).

Computed without flipping anything: the backward direction's causal conv over the reversed sequence
is an anti-causal conv over the original order, and x_proj / dt_proj are per token, so both
directions' inputs and x_proj outputs are built in the original order (``bidirectional_conv1d_silu``
with the stacked x_proj weights: on CPU each block of conv rows is projected while still in L1), and
one two-route ``cross_selective_scan`` on a 1 x L grid (route 0 raster = forward, route 1 reversed raster =
backward, each with its own u and parameters, gated by silu(z)) returns y_fwd + flip(y_bwd) directly;
each direction's dt_proj is handed to the scan (``delta_proj_weight``), which forms delta per token.
"""
import math

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from ..kernels.ssm import bidirectional_conv1d_silu, cross_selective_scan


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim) -> (B, L, dim). Per-route tensors are token-major buffers handed to the scan as
        transposed views, which its compiled CPU and Triton paths read in place."""
        f, b = self.fwd, self.bwd  # each direction's parameters, stacked on a route axis: (2, ...)
        x_in, z = self.in_proj(x).chunk(2, dim=-1)              # (B, L, d_inner) views
        f_bias, b_bias = f.conv1d.bias, b.conv1d.bias
        assert f_bias is not None and b_bias is not None  # the convs have biases (a refinement for TorchScript)
        # both directions' conv + SiLU, u (B, L, 2, d_inner), and their x_proj, x_dbl (B, L, 2, .), in one op
        conv = bidirectional_conv1d_silu(x_in, torch.stack((f.conv1d.weight, b.conv1d.weight)).squeeze(2),
                                         torch.stack((f_bias, b_bias)), torch.stack((f.x_proj.weight, b.x_proj.weight)))
        assert isinstance(conv, tuple)  # (u, x_dbl) when given a projection (a refinement for TorchScript)
        u, x_dbl = conv
        dt, B, C = x_dbl.split((self.dt_rank, self.d_state, self.d_state), dim=-1)   # (B, L, 2, .)
        # delta = dt_proj(dt) per direction, formed by the scan (inside it on the compiled CPU path)
        y = cross_selective_scan(_route_grid(u), _route_grid(dt), -torch.exp(torch.stack((f.A_log, b.A_log)).float()),
                                 _route_grid(B), _route_grid(C), torch.stack((f.D, b.D)).float(),
                                 torch.stack((f.dt_proj.bias, b.dt_proj.bias)).float(), delta_softplus=True, routes=2,
                                 z=_grid(z), delta_proj_weight=torch.stack((f.dt_proj.weight, b.dt_proj.weight)))
        # y = y_fwd + flip(y_bwd): (B, d, 1, L); the mean of the two directions: the / 2 folded into the (small)
        # output weight
        return F.linear(y.flatten(2).transpose(1, 2), self.out_proj.weight * 0.5, self.out_proj.bias)


def _grid(t: torch.Tensor) -> torch.Tensor:
    """(..., L, c) -> a (..., c, 1, L) view: a token sequence as a 1 x L grid."""
    return t.movedim(-2, -1).unsqueeze(-2)


def _route_grid(t: torch.Tensor) -> torch.Tensor:
    """Per-route tokens (B, L, 2, c) -> a (B, 2, c, 1, L) view."""
    return _grid(t.movedim(2, 1))
