"""Explicit N x N form of non-causal normalised linear attention, in float64: the oracle for tests."""
from __future__ import annotations

from typing import Optional

import torch


def naive_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           q_num: Optional[torch.Tensor] = None, k_num: Optional[torch.Tensor] = None,
                           key_weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """o_i = sum_j w_j <q'_i, k'_j> v_j / (sum_j w_j <q_i, k_j> + N eps), with the N x N score matrices
    written out (q' = q_num or q, k' = k_num or k, w = key_weight or 1). Returns q's dtype."""
    f = torch.float64
    n_keys = k.shape[1]
    qn = q if q_num is None else q_num
    kn = k if k_num is None else k_num
    w = torch.ones(k.shape[:3], dtype=f, device=k.device) if key_weight is None else key_weight.to(f)
    scores_num = torch.einsum("bihk,bjhk->bhij", qn.to(f), kn.to(f)) * w.permute(0, 2, 1)[:, :, None, :]
    scores_den = torch.einsum("bihk,bjhk->bhij", q.to(f), k.to(f)) * w.permute(0, 2, 1)[:, :, None, :]
    num = torch.einsum("bhij,bjhv->bihv", scores_num, v.to(f))
    den = scores_den.sum(-1).permute(0, 2, 1) + n_keys * eps
    return (num / den[..., None]).to(q.dtype)
