"""Token-serial references for the selective scan (S6) and its multi-route cross scan, in float64.

Slow by design: they are the tests' ground truth. ``naive_selective_scan`` follows mamba_ssm's
``selective_scan_ref`` step by step; ``naive_cross_selective_scan`` builds every route by explicit
flips/transposes of the inputs, runs the single-route reference per route, undoes the route and sums
(VMamba's CrossScan / CrossMerge).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_channel(M, d):
    """(b, n, l) or grouped (b, g, n, l) -> (b, d, n, l); channel c reads group c // (d // g)."""
    if M.ndim == 3:
        return M.unsqueeze(1).expand(M.shape[0], d, *M.shape[1:])
    return M.repeat_interleave(d // M.shape[1], dim=1)


def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,).

    Returns out (b, d, l) in u's dtype (and the float64 last state (b, d, n) if asked).
    """
    dtype = u.dtype
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    b, d, l = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = _per_channel(B, d), _per_channel(C, d)
    x = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        x = torch.exp(delta[:, :, t, None] * A) * x + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((x * C[..., t]).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + u * D.double()[:, None]
    if z is not None:
        out = out * F.silu(z.double())
    out = out.to(dtype)
    return (out, x) if return_last_state else out


def route_forward(x, r):
    """(..., H, W) -> (..., H*W) in route r's scan order: 0 raster, 1 column-major, 2 and 3 reversed."""
    seq = x.flatten(-2) if r % 2 == 0 else x.transpose(-1, -2).flatten(-2)
    return seq.flip(-1) if r >= 2 else seq


def route_backward(seq, r, H, W):
    """The inverse of ``route_forward``: (..., H*W) in route r's order -> (..., H, W)."""
    if r >= 2:
        seq = seq.flip(-1)
    if r % 2 == 0:
        return seq.unflatten(-1, (H, W))
    return seq.unflatten(-1, (W, H)).transpose(-1, -2)


def naive_cross_selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, routes=4):
    """u: (b, d, H, W); delta: (b, R, d, H, W); A: (R, d, n); B, C: (b, R, n, H, W); D, delta_bias: (R, d).

    The sum over routes of the single-route scan run on each route's explicitly reordered copy of the
    inputs, placed back on the grid. Returns (b, d, H, W) in u's dtype.
    """
    H, W = u.shape[-2:]
    out = 0
    for r in range(routes):
        y = naive_selective_scan(route_forward(u, r), route_forward(delta[:, r], r), A[r],
                                 route_forward(B[:, r], r), route_forward(C[:, r], r),
                                 None if D is None else D[r], None,
                                 None if delta_bias is None else delta_bias[r], delta_softplus)
        out = out + route_backward(y.double(), r, H, W)
    return out.to(u.dtype)
