"""PyTorch path of non-causal normalised linear attention: the associative (k^T v first) form.

    S = (1/N) sum_j w_j k'_j^T v_j      (K x V per head)      s = (1/N) sum_j w_j k_j      (K)
    o_i = (q'_i S) / (q_i . s + eps)

Cost O(N K V) per head. Both reductions are means, not sums (the sqrt(N) split of RALA and
LinFusion, taken to its end), so no intermediate grows with N; 16-bit inputs are computed in
float32 and the result cast back, so nothing overflows or loses the denominator's precision at any N.
"""
from __future__ import annotations

from typing import Optional

import torch


def associative_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 q_num: Optional[torch.Tensor] = None, k_num: Optional[torch.Tensor] = None,
                                 key_weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    out_dtype = q.dtype
    f = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(f), k.to(f), v.to(f)
    qn = q if q_num is None else q_num.to(f)
    kn = k if k_num is None else k_num.to(f)
    n_keys = k.shape[1]
    if key_weight is not None:
        w = key_weight.to(f).unsqueeze(-1) / n_keys
        k_den = k * w
        k_num_w = k_den if k_num is None else kn * w
    else:
        k_den = k / n_keys
        k_num_w = k_den if k_num is None else kn / n_keys
    s = k_den.sum(1)                                                   # (B, H, K)
    state = torch.einsum("bnhk,bnhv->bhkv", k_num_w, v)               # (B, H, K, V)
    num = torch.einsum("bnhk,bhkv->bnhv", qn, state)
    den = torch.einsum("bnhk,bhk->bnh", q, s) + eps
    return (num / den.unsqueeze(-1)).to(out_dtype)
