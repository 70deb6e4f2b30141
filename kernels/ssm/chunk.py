"""Vectorised PyTorch path of the selective scan: chunked, log-space cumulative decays.

Every (batch, channel, state) triple is an independent first-order recurrence

    x_t = a_t x_{t-1} + b_t,   a_t = exp(delta_t A[c, s]),   b_t = delta_t u_t B_t[s]

so no T x T matrix is needed (A is per channel *and* state, which rules out Mamba-2's scalar-decay
SSD matmul form anyway). Tokens are grouped in chunks of ``CHUNK``; inside a chunk, with the
inclusive cumulative log-decay L_t = sum_{tau <= t} delta_tau A,

    x_t = exp(L_t) x_0 + exp(L_t) * cumsum_tau(exp(-L_tau) b_tau)

(x_0 the state entering the chunk) — a handful of elementwise ops and one cumsum over all chunks at
once. Chunk-entry states are passed by a loop over chunks (l / CHUNK steps of one fused op on a
(b, d, n) tensor). y_t = <x_t, C_t> over the states.

Numerics. The factorised form multiplies exp(-L) (large) by exp(L) (small); its rounding error is
eps * sum_tau exp(L_t - L_tau) |b_tau|, the same bound as the serial loop, as long as neither
exponential overflows. The per-token log-decay delta*A is clamped to [-GATE_CLAMP, GATE_CLAMP]
(exp(-30) ~ 1e-13 is already below float32 resolution; a growth of exp(30) per token overflows
float32 within three tokens anyway), so |L| <= CHUNK * GATE_CLAMP = 480 inside a chunk. The chunk
exponentials run in float32 while every |L| <= FLOAT32_RANGE and in float64 otherwise (exp(480)
is a normal float64). Traced graphs (torch.compile, torch.export, ONNX) always clamp and always take
float64 exponentials: one graph, exact for every input, with no branch on a tensor's values.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dispatch import onnx_exporting, tracing
from .naive import route_backward, route_forward

CHUNK = 16
GATE_CLAMP = 30.0
FLOAT32_RANGE = 60.0


def _grouped(M, G: int):
    """B or C, (b, n, l) or (b, g, n, l), as a (b, G, 1 or d/G, n, l) view broadcasting over channels."""
    if M.ndim == 3:
        M = M.unsqueeze(1)
    g = M.shape[1]
    if g != G:  # B and C have different group counts: spell both out per channel (G = d)
        M = M.repeat_interleave(G // g, dim=1)
    return M.unsqueeze(2)


def _range(L, delta, A) -> float:
    """max |L| over the chunked cumulative log-decays L (..., CHUNK)."""
    with torch.no_grad():
        if bool(A.amax() <= 0) and bool(delta.amin() >= 0):  # decays only: L falls monotonically
            return float(-L[..., -1].amin())
        return float(L.abs().amax())


def chunk_selective_scan(u, delta, A, B, C, D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                         delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                         return_last_state: bool = False, out_dtype: Optional[torch.dtype] = None):
    """Inputs already validated (shapes as in ``selective_scan``); returns out (b, d, l) in u's dtype
    (or ``out_dtype``), and the last state (b, d, n) in the compute dtype if asked."""
    y, last = _chunk_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, out_dtype)
    if return_last_state:
        return y, last
    return y


def _chunk_scan(u, delta, A, B, C, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                delta_softplus: bool, return_last_state: bool, out_dtype: Optional[torch.dtype],
                CHUNK: int = CHUNK, GATE_CLAMP: float = GATE_CLAMP,
                FLOAT32_RANGE: float = FLOAT32_RANGE) -> Tuple[Tensor, Optional[Tensor]]:
    """``chunk_selective_scan`` with one return type: (out, the last state or None). (The module's constants come
    in as defaults: TorchScript reads no globals.)"""
    cd = torch.float64 if u.dtype == torch.float64 else torch.float32
    if out_dtype is None:
        out_dtype = u.dtype
    b, d, l = u.shape
    n = A.shape[1]
    gB = 1 if B.ndim == 3 else B.shape[1]
    gC = 1 if C.ndim == 3 else C.shape[1]
    G = gB if gB == gC else d
    dg = d // G

    u_c, delta = u.to(cd), delta.to(cd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.to(cd)
    pad = -l % CHUNK
    lp = l + pad
    nc = lp // CHUNK
    # pad the small inputs so that the (b, d, n, l) tensors are born padded: padded tokens decay by
    # exp(0) and add nothing, so the state is carried unchanged to the end
    delta_p, du = F.pad(delta, (0, pad)), F.pad(delta * u_c, (0, pad))
    Bg = _grouped(F.pad(B.to(cd), (0, pad)), G)                         # (b, G, 1|dg, n, lp)
    Cg = _grouped(C.to(cd), G)                                          # (b, G, 1|dg, n, l)

    # per-token log-decays; a bound from the small tensors decides clamping and precision (traced: static)
    traced = tracing()
    bound = 2 * GATE_CLAMP
    if not traced:
        bound = float(delta.detach().abs().amax()) * float(A.detach().abs().amax())
    dA = delta_p.view(b, G, dg, 1, lp) * A.view(G, dg, n, 1)            # (b, G, dg, n, lp)
    if bound > GATE_CLAMP:
        dA = dA.clamp(-GATE_CLAMP, GATE_CLAMP)
    L = dA.view(b, G, dg, n, nc, CHUNK).cumsum(dim=-1)
    del dA
    bu = (du.view(b, G, dg, 1, lp) * Bg).view(b, G, dg, n, nc, CHUNK)
    if cd == torch.float32 and bound * CHUNK > FLOAT32_RANGE and (traced or _range(L, delta, A) > FLOAT32_RANGE):
        L, bu = L.double(), bu.double()
    exp_L = L.exp()
    # exp(-L), not 1 / exp(L): the reciprocal's gradient -1 / exp(L)^2 overflows for strong decays
    cs = torch.cumsum(bu * torch.exp(-L), dim=-1)                       # x_t = exp(L_t) (x_0 + cs_t)
    del L, bu

    # chunk-entry states: s_{c+1} = exp(L_end,c) (s_c + cs_end,c)
    dec, ends = exp_L[..., -1], cs[..., -1]                             # (b, G, dg, n, nc)
    last: Optional[Tensor] = None
    if onnx_exporting():
        entry, final = _scan_chunk_states(dec, ends)
        if return_last_state:
            last = final.to(cd).reshape(b, d, n)
    else:
        states = [ends.new_zeros(b, G, dg, n)]
        for c in range(nc - 1 + int(return_last_state)):
            states.append(dec[..., c] * (states[-1] + ends[..., c]))
        if return_last_state:
            last = states.pop().to(cd).reshape(b, d, n)
        entry = torch.stack(states, dim=-1)
    x0 = entry.unsqueeze(-1)                                            # (b, G, dg, n, nc, 1)
    x = (exp_L * (cs + x0)).view(b, G, dg, n, lp)[..., :l]
    del cs, exp_L, x0
    y = (x * Cg).sum(3, dtype=cd).reshape(b, d, l)
    if D is not None:
        y = torch.addcmul(y, u_c, D.to(cd)[:, None])
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(out_dtype), last


def _state_step(carry, x):
    dec, end = x
    return dec * (carry + end), carry.clone()


@torch.jit.unused
def _scan_chunk_states(dec, ends) -> Tuple[Tensor, Tensor]:
    """The chunk-entry states (..., nc) and the state after the last chunk, by ``torch.scan`` over the chunks."""
    from torch._higher_order_ops.scan import scan
    final, entry = scan(_state_step, torch.zeros_like(ends[..., 0]), (dec.movedim(-1, 0), ends.movedim(-1, 0)))
    return entry.movedim(0, -1), final


def project_delta(delta, delta_proj_weight: Optional[Tensor] = None):
    """The full per-route delta (b, R, d, H, W) from a low-rank input (b, R, rank, H, W) and the routes'
    delta projections (R, d, rank) (Mamba's dt_proj without its bias); delta itself without a projection."""
    if delta_proj_weight is None:
        return delta
    return torch.einsum("rdk,brkhw->brdhw", delta_proj_weight.to(delta.dtype), delta)


def chunk_cross_selective_scan(u, delta, A, B, C, D: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                               delta_softplus: bool = True, routes: int = 4, z: Optional[Tensor] = None):
    """Inputs already validated (shapes as in ``cross_selective_scan``); returns (b, d, H, W) in u's dtype.

    All routes run as one grouped selective scan over R*d channels (group r = route r), on copies of
    the inputs gathered into each route's order; the outputs are scattered back, summed and gated by
    silu(z) (the gate is per grid position, so gating the sum equals gating every route).
    """
    b, d, H, W = u.shape[0], u.shape[-3], u.shape[-2], u.shape[-1]
    cd = torch.float64 if u.dtype == torch.float64 else torch.float32
    R, n, Lt = routes, A.shape[-1], H * W
    grid = torch.arange(Lt, device=u.device).view(H, W)                          # raster index of each token
    order = torch.stack([route_forward(grid, r, R) for r in range(R)])            # (R, L): index scanned at step t
    u_flat = u.reshape(b, -1, d, Lt).expand(b, R, d, Lt)                          # shared u: a broadcast
    u_r = u_flat.gather(3, order.view(1, R, 1, Lt).expand(b, R, d, Lt))
    delta_r = delta.reshape(b, R, d, Lt).gather(3, order.view(1, R, 1, Lt).expand(b, R, d, Lt))
    B_r = B.reshape(b, R, n, Lt).gather(3, order.view(1, R, 1, Lt).expand(b, R, n, Lt))
    C_r = C.reshape(b, R, n, Lt).gather(3, order.view(1, R, 1, Lt).expand(b, R, n, Lt))
    y = _chunk_scan(u_r.reshape(b, R * d, Lt), delta_r.reshape(b, R * d, Lt), A.reshape(R * d, n),
                    B_r, C_r, None if D is None else D.reshape(R * d), None,
                    None if delta_bias is None else delta_bias.reshape(R * d), delta_softplus, False, cd)[0]
    y = y.view(b, R, d, Lt)
    # un-route: y_spatial[..., order[r, t]] = y[..., r, t], i.e. a gather by each route's inverse order,
    # summed over routes (an index_add with the routes' repeated indices is not exact in onnxruntime)
    inverse = torch.stack([route_backward(grid.flatten(), r, H, W, R).flatten() for r in range(R)])  # (R, L)
    out = y.gather(3, inverse.view(1, R, 1, Lt).expand(b, R, d, Lt)).sum(1)
    if z is not None:
        out = out * F.silu(z.reshape(b, d, Lt).to(cd))
    return out.view(b, d, H, W).to(u.dtype)
