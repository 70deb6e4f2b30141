"""Vectorised PyTorch path of bidirectional GLA: chunked matmuls and log-space cumulative gates.

Layout of the computation (per direction; the backward direction runs on the flipped sequence,
stacked with the forward one so both share every op):

* tokens are grouped in chunks of ``CHUNK`` = SUB x NSUB, each chunk in NSUB sub-chunks of SUB;
* ``P`` is the inclusive cumulative log-decay inside a sub-chunk and ``T`` a sub-chunk's total;
* every decay factor is ``exp`` of a sum of gates between two tokens, so every exponent is <= 0,
  except inside a diagonal sub-block, where the factorised form q*exp(P_i) . k*exp(-P_j) runs in
  float64 (|P| <= SUB * GATE_FLOOR fits float64's exponent range) and is masked before use;
* chunk states are passed by a loop over chunks (N / CHUNK steps of a few tensor ops).

Gates are clamped at ``-GATE_FLOOR``: a per-token decay of exp(-30) ~ 1e-13 is already zero at
float32 precision, and the clamp keeps -inf out of the cumulative sums (where -inf - -inf = NaN).
"""
from __future__ import annotations

import torch

SUB = 16
NSUB = 4
CHUNK = SUB * NSUB
GATE_FLOOR = 30.0


def _chunk_view(x: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """(G, N_pad, D) -> (G, n_chunks, NSUB, SUB, D)."""
    return x.reshape(x.shape[0], n_chunks, NSUB, SUB, x.shape[-1])


def _causal_chunk_gla(q, k, v, g):
    """Causal GLA o_t = q_t h_t on (G, N, K)/(G, N, V) inputs, N a multiple of CHUNK, float32/64."""
    G, N, K = q.shape
    V = v.shape[-1]
    nc = N // CHUNK
    q, k, v, g = (_chunk_view(t, nc) for t in (q, k, v, g))

    P = g.cumsum(dim=3)                                     # inclusive, within sub-chunk, <= 0
    T = P[:, :, :, -1]                                      # (G, nc, NSUB, K) sub-chunk totals
    Q = T.cumsum(dim=2) - T                                 # exclusive prefix over sub-chunks
    chunk_total = Q[:, :, -1] + T[:, :, -1]                 # (G, nc, K)

    # Diagonal sub-blocks: exact factorisation in float64, masked to j <= i before leaving float64.
    wide = torch.float64
    q64 = q.to(wide) * P.to(wide).exp()
    k64 = k.to(wide) * (-P.to(wide)).exp()
    a_diag = q64 @ k64.transpose(-1, -2)                    # (G, nc, NSUB, SUB, SUB)
    causal = torch.ones(SUB, SUB, dtype=torch.bool, device=q.device).tril()
    a_diag = torch.where(causal, a_diag, 0.0).to(q.dtype)

    # Off-diagonal sub-blocks (a > b): q_i exp(P_i) . diag(exp(sum_{b<c<a} T_c)) . k_j exp(T_b - P_j).
    between = torch.ones(NSUB, NSUB, NSUB, dtype=q.dtype, device=q.device)
    idx = torch.arange(NSUB, device=q.device)
    between = between * ((idx[None, :, None] < idx[None, None, :]) & (idx[None, None, :] < idx[:, None, None]))
    strictly_lower = idx[:, None] > idx[None, :]
    mid = torch.einsum("abc,gnck->gnabk", between, T)       # (G, nc, NSUB, NSUB, K)
    mid = torch.where(strictly_lower[:, :, None], mid.exp(), 0.0)
    q_dec = q * P.exp()
    k_dec = k * (T.unsqueeze(3) - P).exp()
    k_mid = mid.unsqueeze(4) * k_dec.unsqueeze(2)           # (G, nc, a, b, SUB, K)
    a_off = torch.einsum("gnaik,gnabjk->gnaibj", q_dec, k_mid)

    scores = a_off.reshape(G, nc, CHUNK, CHUNK)
    diag_view = scores.view(G, nc, NSUB, SUB, NSUB, SUB).diagonal(dim1=2, dim2=4)  # (G,nc,SUB,SUB,NSUB)
    diag_view += a_diag.permute(0, 1, 3, 4, 2)
    v_c = v.reshape(G, nc, CHUNK, V)
    out = scores @ v_c                                      # intra-chunk part

    # Inter-chunk: states at chunk starts, by a loop over chunks.
    q_in = (q * (Q.unsqueeze(3) + P).exp()).reshape(G, nc, CHUNK, K)
    k_st = (k * (chunk_total[:, :, None, None] - Q.unsqueeze(3) - P).clamp(max=0.0).exp())
    updates = k_st.reshape(G, nc, CHUNK, K).transpose(-1, -2) @ v_c    # (G, nc, K, V)
    decay = chunk_total.exp().unsqueeze(-1)                 # (G, nc, K, 1)
    states = [q.new_zeros(G, K, V)]
    for c in range(nc - 1):
        states.append(states[-1] * decay[:, c] + updates[:, c])
    states = torch.stack(states, dim=1)                     # (G, nc, K, V)
    out = out + q_in @ states
    return out.reshape(G, N, V)


def chunk_bidirectional_gla(q, k, v, g_fwd, g_bwd, scale: float):
    """Inputs (B, N, H, K|V), already validated; returns o (B, N, H, V) in q's dtype."""
    B, N, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_pad = -N % CHUNK

    def prep(x, flip):
        x = x.to(compute).permute(0, 2, 1, 3)               # (B, H, N, D)
        if flip:
            x = x.flip(2)
        return x

    def stacked(x_f, x_b):
        x = torch.stack((prep(x_f, False), prep(x_b, True)))  # (2, B, H, N, D)
        x = torch.nn.functional.pad(x, (0, 0, 0, n_pad))
        return x.reshape(2 * B * H, N + n_pad, x.shape[-1])

    qs = stacked(q * scale, q * scale)
    ks = stacked(k, k)
    vs = stacked(v, v)
    gs = stacked(g_fwd, g_bwd).clamp(min=-GATE_FLOOR)
    o = _causal_chunk_gla(qs, ks, vs, gs)[:, :N].reshape(2, B, H, N, V)
    o = (o[0] + o[1].flip(2)) * 0.5
    return o.permute(0, 2, 1, 3).to(out_dtype)
