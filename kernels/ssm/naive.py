"""Token-serial references for the selective scan (S6) and its multi-route cross scan, in float64.

Slow by design: they are the tests' ground truth. ``naive_selective_scan`` follows mamba_ssm's
``selective_scan_ref`` step by step; ``naive_cross_selective_scan`` builds every route by explicit
flips/transposes of the inputs (the shared or the route's own u, and z), runs the single-route reference
per route (gated by its reordered z), undoes the route and sums (VMamba's CrossScan / CrossMerge).
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


def route_kind(r: int, routes: int = 4) -> int:
    """Scan order of route r of ``routes``: 0 raster, 1 column-major, 2 and 3 their reverses.

    With 4 routes route r has order r; with 2 (Vim) the routes are raster and reversed raster; with 1 raster."""
    return r * (4 // routes)


def route_forward(x, r: int, routes: int = 4):
    """(..., H, W) -> (..., H*W) in the scan order of route r of ``routes`` (see ``route_kind``)."""
    k = route_kind(r, routes)
    seq = x.flatten(-2) if k % 2 == 0 else x.transpose(-1, -2).flatten(-2)
    return seq.flip(-1) if k >= 2 else seq


def route_backward(seq, r: int, H: int, W: int, routes: int = 4):
    """The inverse of ``route_forward``: (..., H*W) in route r's order -> (..., H, W)."""
    k = route_kind(r, routes)
    if k >= 2:
        seq = seq.flip(-1)
    if k % 2 == 0:
        return seq.unflatten(-1, (H, W))
    return seq.unflatten(-1, (W, H)).transpose(-1, -2)


def naive_cross_selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, routes=4, z=None):
    """u: (b, d, H, W) shared or (b, R, d, H, W) per route; delta: (b, R, d, H, W); A: (R, d, n);
    B, C: (b, R, n, H, W); D, delta_bias: (R, d); z: optional (b, d, H, W) gate.

    The sum over routes of the single-route scan (gated by silu(z)) run on each route's explicitly
    reordered copy of the inputs, placed back on the grid. Returns (b, d, H, W) in u's dtype.
    """
    H, W = u.shape[-2:]
    out = 0
    for r in range(routes):
        fwd = lambda t: route_forward(t, r, routes)  # noqa: E731
        y = naive_selective_scan(fwd(u[:, r] if u.ndim == 5 else u), fwd(delta[:, r]), A[r], fwd(B[:, r]),
                                 fwd(C[:, r]), None if D is None else D[r], None if z is None else fwd(z),
                                 None if delta_bias is None else delta_bias[r], delta_softplus)
        out = out + route_backward(y.double(), r, H, W, routes)
    return out.to(u.dtype)
