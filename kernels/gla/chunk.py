"""Vectorised PyTorch path of bidirectional GLA: chunked matmuls and log-space cumulative gates.

Per direction (the backward direction runs on the flipped sequence, stacked with the forward one
so that both share every op):

* tokens are grouped in chunks of ``CHUNK`` = 2 sub-chunks of ``SUB`` tokens;
* ``P`` is the inclusive cumulative log-decay inside a sub-chunk and ``T`` a sub-chunk's total, so
  every decay factor is ``exp`` of a sum of gates between two tokens and every exponent is <= 0 —
  except inside a diagonal sub-block, where the factorised form q*exp(P_i) . k*exp(-P_j) is masked
  to j <= i; it runs in float32 while every |P| <= DIAG_FLOAT32_RANGE (exp(40) and exp(-40) are
  normal float32 numbers) and in float64 otherwise (|P| <= SUB * GATE_FLOOR = 480 fits float64).
  Traced graphs (torch.compile, torch.export, ONNX) always take float64 here: one graph, exact for
  every gate, with no branch on a tensor's values;
* chunk states are passed by a loop over chunks (N / CHUNK steps of one fused op each); queries
  read the state at their chunk's start.

Gates are clamped at ``-GATE_FLOOR``: a per-token decay of exp(-30) ~ 1e-13 is already zero at
float32 precision, and the clamp keeps -inf out of the cumulative sums (where -inf - -inf = NaN).
"""

import torch

from .._dispatch import onnx_exporting, tracing

SUB = 16
CHUNK = 2 * SUB
GATE_FLOOR = 30.0
DIAG_FLOAT32_RANGE = 40.0


def _diag_float64(q, k, P):
    """The diagonal sub-blocks' q_i exp(P_i) . k_j exp(-P_j) in float64 (unmasked)."""
    P64 = P.double()
    return (q.double() * P64.exp()) @ (k.double() * (-P64).exp()).transpose(-1, -2)


def _causal_chunk_gla(q, k, v, g, SUB: int = SUB, DIAG_FLOAT32_RANGE: float = DIAG_FLOAT32_RANGE):
    """Causal GLA o_t = q_t h_t on (G, N, K) / (G, N, V) inputs, N a multiple of CHUNK. (The module's
    constants come in as defaults: TorchScript reads no globals.)"""
    CHUNK = 2 * SUB
    G, N, K = q.shape
    V = v.shape[-1]
    nc = N // CHUNK
    q, k, g = q.reshape(G, nc, 2, SUB, K), k.reshape(G, nc, 2, SUB, K), g.reshape(G, nc, 2, SUB, K)
    v = v.reshape(G, nc, 2, SUB, V)

    P = g.cumsum(dim=3)                                     # (G, nc, 2, SUB, K), <= 0
    del g  # large temporaries are dropped as soon as they are used: at 1024^2 this halves the peak
    T = P[:, :, :, -1:]                                     # (G, nc, 2, 1, K) sub-chunk totals
    exp_T = T.exp()
    q_dec = q * P.exp()                                     # decay from the sub-chunk start to i
    k_dec = k * (T - P).exp()                               # decay from j to the sub-chunk end

    # Diagonal sub-blocks: q_i exp(P_i) . k_j exp(-P_j), masked to j <= i. exp(-P) may be huge:
    # float32 holds it while P >= -DIAG_FLOAT32_RANGE (the usual case), float64 always (and traced).
    causal = torch.ones(SUB, SUB, dtype=torch.bool, device=q.device).tril()
    if q.dtype == torch.float64 or (not tracing() and bool(P.amin() >= -DIAG_FLOAT32_RANGE)):
        a_diag = q_dec @ (k * (-P).exp()).transpose(-1, -2)
    else:
        a_diag = _diag_float64(q, k, P)
    del q, k, P
    a_diag = torch.where(causal, a_diag, 0.0).to(q_dec.dtype)   # (G, nc, 2, SUB, SUB)
    out = a_diag @ v                                        # (G, nc, 2, SUB, V)
    del a_diag

    # Second sub-chunk reading the first: exp(P_i) . exp(T_0 - P_j), both exponents <= 0.
    out[:, :, 1] += (q_dec[:, :, 1] @ k_dec[:, :, 0].transpose(-1, -2)) @ v[:, :, 0]

    # Inter-chunk: the chunk's state enters sub-chunk 1 after sub-chunk 0's decay, and the chunk's
    # update decays sub-chunk 0's keys through sub-chunk 1.
    ones = torch.ones_like(exp_T[:, :, :1])
    k_st = (k_dec * torch.cat((exp_T[:, :, 1:], ones), dim=2)).reshape(G, nc, CHUNK, K)
    del k_dec
    updates = k_st.transpose(-1, -2) @ v.reshape(G, nc, CHUNK, V)   # (G, nc, K, V)
    del k_st, v
    q_in = (q_dec * torch.cat((ones, exp_T[:, :, :1]), dim=2)).reshape(G * nc, CHUNK, K)
    del q_dec
    decay = (exp_T[:, :, 0] * exp_T[:, :, 1]).transpose(-1, -2)     # (G, nc, K, 1)
    if onnx_exporting():
        states = _scan_chunk_states(updates, decay).reshape(G * nc, K, V)
    else:
        entry = [updates.new_zeros(G, K, V)]
        for c in range(nc - 1):
            entry.append(torch.addcmul(updates[:, c], entry[-1], decay[:, c]))
        states = torch.stack(entry, dim=1).reshape(G * nc, K, V)
    del updates
    out = torch.baddbmm(out.reshape(G * nc, CHUNK, V), q_in, states)
    return out.reshape(G, N, V)


def _state_step(carry, x):
    update, decay = x
    return torch.addcmul(update, carry, decay), carry.clone()


@torch.jit.unused
def _scan_chunk_states(updates, decay):
    """The chunk-entry states (G, nc, K, V) by ``torch.scan`` over the chunks (an ONNX Scan op when exported)."""
    from torch._higher_order_ops.scan import scan
    _, entry = scan(_state_step, torch.zeros_like(updates[:, 0]), (updates.movedim(1, 0), decay.movedim(1, 0)))
    return entry.movedim(0, 1)


def _stacked(x_f, x_b, n_pad: int):
    """Forward sequence and flipped backward sequence, (B, N, H, D) each, as one (2*B*H, N + n_pad, D) batch."""
    B, N, H, D = x_f.shape
    x = torch.stack((x_f.transpose(1, 2), x_b.transpose(1, 2).flip(2)))
    if n_pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, n_pad))
    return x.reshape(2 * B * H, N + n_pad, D)


def chunk_bidirectional_gla(q, k, v, g_fwd, g_bwd, scale: float, CHUNK: int = CHUNK, GATE_FLOOR: float = GATE_FLOOR):
    """Inputs (B, N, H, K|V), already validated; returns o (B, N, H, V) in q's dtype."""
    B, N, H, _ = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_pad = -N % CHUNK
    q, k, v, g_fwd, g_bwd = q.to(compute), k.to(compute), v.to(compute), g_fwd.to(compute), g_bwd.to(compute)
    qs = q * scale  # after the cast: no extra rounding of half-precision queries
    o = _causal_chunk_gla(_stacked(qs, qs, n_pad), _stacked(k, k, n_pad), _stacked(v, v, n_pad),
                          _stacked(g_fwd, g_bwd, n_pad).clamp(min=-GATE_FLOOR))
    o = o[:, :N].reshape(2, B, H, N, V)
    o = (o[0] + o[1].flip(2)) * 0.5
    return o.transpose(1, 2).to(out_dtype)
