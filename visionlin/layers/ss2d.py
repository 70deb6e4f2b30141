"""VMamba's mixer: SS2D (2-D selective scan over four routes), version 2 with forward type "v05_noz".

Channels-first (B, C, H, W): x = SiLU(dwconv3x3(in_proj x)) (no z gate); per route k of 4 (raster,
column-major and their reverses) and per token, dt | B | C = x_proj_k x, delta = dt_proj_k dt;
y = sum over routes of the selective scan of x in route k's order, placed back on the grid
(``visionlin.kernels.cross_selective_scan``, which reads each route by index, no copies on the
fused path); out = out_proj(LayerNorm2d(y)).
"""
import math

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, register_notrace_module
from torch import nn

from ..kernels import cross_selective_scan


class Linear2d(nn.Linear):
    """A Linear applied over the channels of a (B, C, H, W) map (a 1x1 conv keeping Linear's weight shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


@register_notrace_module  # FX leaf: shapes drive the kernel call
class SS2D(nn.Module):
    __constants__ = ['routes']
    routes = 4

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        K = self.routes
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = Linear2d(dim, d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=False)
        # per-route parameters, stacked as the official layout: (K, ...), A_logs/Ds flattened over (K, d_inner)
        self.x_proj_weight = nn.Parameter(torch.empty(K, self.dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d_inner))
        self.A_logs = nn.Parameter(torch.empty(K * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(K * d_inner))
        self.out_norm = LayerNorm2d(d_inner, eps=1e-5)
        self.out_proj = Linear2d(d_inner, dim, bias=False)
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba's init per route: x_proj U(+-d_inner^-0.5) (nn.Linear's), dt_proj weight U(+-dt_rank^-0.5),
        dt bias = softplus^-1 of dt ~ logU(dt_min, dt_max), A = -[1..d_state], D = 1."""
        dt_min, dt_max, floor = self._dt_range
        with torch.no_grad():
            bound = self.d_inner ** -0.5
            self.x_proj_weight.uniform_(-bound, bound)
            self.dt_projs_weight.uniform_(-self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(self.routes, self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=floor)
            self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.A_logs.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(
                self.routes * self.d_inner, 1))
            self.Ds.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, D, N, R = self.routes, self.d_inner, self.d_state, self.dt_rank
        x = F.silu(self.conv2d(self.in_proj(x)))
        # token-wise projections do not depend on the scan order: compute them on the grid
        x_dbl = torch.einsum("kcd,bdhw->bkchw", self.x_proj_weight, x)
        dts, Bs, Cs = x_dbl.split((R, N, N), dim=2)
        # delta = dt_projs_weight @ dts per route, formed by the scan (inside it on the compiled CPU path)
        y = cross_selective_scan(x, dts, -torch.exp(self.A_logs.float()).view(K, D, N), Bs, Cs,
                                 self.Ds.float().view(K, D), self.dt_projs_bias.float(), delta_softplus=True,
                                 routes=K, delta_proj_weight=self.dt_projs_weight)
        return self.out_proj(self.out_norm(y.to(x.dtype)))
