"""Token-serial reference for bidirectional GLA. Slow by design: it is the tests' ground truth."""
from __future__ import annotations

import torch


def _causal_recurrence(q, k, v, g):
    """h_t = diag(exp(g_t)) h_{t-1} + k_t^T v_t ; o_t = q_t h_t, for (B, N, H, *) inputs."""
    B, N, H, K = q.shape
    h = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(N):
        h = h * g[:, t].exp().unsqueeze(-1) + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], h))
    return torch.stack(out, dim=1)


def naive_bidirectional_gla(q, k, v, g_fwd, g_bwd, scale=None):
    """Bidirectional GLA by explicit recurrence in float64; returns o in q's dtype."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g_fwd, g_bwd = (t.double() for t in (q, k, v, g_fwd, g_bwd))
    q = q * scale
    o_f = _causal_recurrence(q, k, v, g_fwd)
    o_b = _causal_recurrence(*(t.flip(1) for t in (q, k, v, g_bwd))).flip(1)
    return ((o_f + o_b) / 2).to(dtype)
