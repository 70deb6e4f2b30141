"""Non-causal normalised linear attention (RALA's and LinFusion's core).

    o_i = sum_j w_j <q'_i, k'_j> v_j / (sum_j w_j <q_i, k_j> + N eps)
        = (q'_i S) / (q_i . s + eps),  S = (1/N) sum_j w_j k'_j^T v_j,  s = (1/N) sum_j w_j k_j

q and k are feature-mapped queries and keys (non-negative, e.g. ELU + 1, so the denominator is
positive); q' and k' are optional numerator-only features (RALA rotates them with RoPE) and w
optional per-token key weights (RALA's alpha). Every reduction is a mean over the N keys, the
overflow-safe form of the sqrt(N) split, and is accumulated in float32 for 16-bit inputs.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .._checks import check_same_device, check_shape, check_tensor
from .._dispatch import resolve_backend
from .associative import associative_linear_attention
from .naive import naive_linear_attention

__all__ = ["linear_attention", "naive_linear_attention", "associative_linear_attention"]

_OP = "linear_attention"
_HAS_TRITON_IMPL = importlib.util.find_spec(__name__ + ".associative_triton") is not None

# what the fused kernel takes (associative_triton raises a clear error for anything else)
TRITON_MAX_HEAD_DIM = 256
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_supports(q, v) -> bool:
    return q.shape[-1] <= TRITON_MAX_HEAD_DIM and v.shape[-1] <= TRITON_MAX_HEAD_DIM and q.dtype in TRITON_DTYPES


def _triton_impl():
    from .associative_triton import triton_linear_attention  # imported on first use: Triton is optional
    return triton_linear_attention


def _validate(q, k, v, q_num, k_num, key_weight, eps) -> None:
    check_tensor("q", q, 4, "(B, Nq, H, K)")
    check_tensor("k", k, 4, "(B, N, H, K)")
    check_tensor("v", v, 4, "(B, N, H, V)")
    named = [("q", q), ("k", k), ("v", v)]
    if q_num is not None:
        check_tensor("q_num", q_num, 4, "(B, Nq, H, K)")
        check_shape("q_num", q_num, q.shape, "(B, Nq, H, K) like q")
        named.append(("q_num", q_num))
    if k_num is not None:
        check_tensor("k_num", k_num, 4, "(B, N, H, K)")
        check_shape("k_num", k_num, k.shape, "(B, N, H, K) like k")
        named.append(("k_num", k_num))
    if key_weight is not None:
        check_tensor("key_weight", key_weight, 3, "(B, N, H)")
        check_shape("key_weight", key_weight, k.shape[:3], "(B, N, H) with B, N, H of k")
        named.append(("key_weight", key_weight))
    check_same_device([n for n, _ in named], [t for _, t in named])
    B, _, H, K = q.shape
    check_shape("k", k, (B, k.shape[1], H, K), "(B, N, H, K) with B, H, K of q")
    check_shape("v", v, (*k.shape[:3], v.shape[-1]), "(B, N, H, V) with B, N, H of k")
    for name, t in named[1:]:
        if t.dtype != q.dtype and not (name == "key_weight" and t.dtype == torch.float32):
            raise ValueError(f"{name} must have q's dtype {q.dtype}"
                             f"{' (or float32)' if name == 'key_weight' else ''}, got {t.dtype}")
    if k.shape[1] == 0:
        raise ValueError("k has N = 0 tokens; linear_attention needs at least one key")
    if K == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be >= 1, got K={K} (q) and V={v.shape[-1]} (v)")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps the denominator positive), got {eps}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_num: Optional[torch.Tensor] = None,
                     k_num: Optional[torch.Tensor] = None, key_weight: Optional[torch.Tensor] = None,
                     eps: float = 1e-6, backend: Optional[str] = None) -> torch.Tensor:
    """Non-causal normalised linear attention, every query against every key.

    Args:
        q: (B, Nq, H, K) feature-mapped queries (non-negative). k: (B, N, H, K) keys (non-negative).
        v: (B, N, H, V) values. All inputs share q's dtype; any strides.
        q_num, k_num: optional numerator-only features, shaped like q and k (e.g. RoPE-rotated);
            q and k themselves are used where they are None.
        key_weight: optional (B, N, H) per-key weights, applied in numerator and denominator; in q's
            dtype or float32 (weights around N, such as N * softmax, can exceed float16's range).
        eps: added to the mean-form denominator q_i . s (> 0).
        backend: 'auto' (Triton on CUDA, PyTorch elsewhere), 'torch' or 'triton'; see
            ``visionlin.kernels.use_backend`` and ``last_backend``.
    Returns:
        o: (B, Nq, H, V) in q's dtype.
    """
    if torch.jit.is_scripting():  # TorchScript runs the PyTorch path (compiled statically: nothing below is)
        return associative_linear_attention(q, k, v, q_num, k_num, key_weight, eps)
    _validate(q, k, v, q_num, k_num, key_weight, eps)
    if q.numel() == 0:  # an empty batch, no heads or no queries
        return v.new_zeros((*q.shape[:3], v.shape[-1]))
    path = resolve_backend(_OP, backend, q.device, _HAS_TRITON_IMPL, _triton_supports(q, v))
    if path == "triton":
        return _triton_impl()(q, k, v, q_num, k_num, key_weight, float(eps))
    return associative_linear_attention(q, k, v, q_num, k_num, key_weight, float(eps))
