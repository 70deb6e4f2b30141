"""Bidirectional gated linear attention (ViG's mixer core).

    h_t  = diag(exp(g_fwd_t)) h_{t-1}  + k_t^T v_t      o_fwd_t = scale * q_t h_t     (t = 0 .. N-1)
    h'_t = diag(exp(g_bwd_t)) h'_{t+1} + k_t^T v_t      o_bwd_t = scale * q_t h'_t    (t = N-1 .. 0)
    o = (o_fwd + o_bwd) / 2          (both directions include the current token)
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .._checks import check_same_device, check_shape, check_tensor
from .._dispatch import resolve_backend
from .chunk import chunk_bidirectional_gla
from .naive import naive_bidirectional_gla

__all__ = ["bidirectional_gla", "naive_bidirectional_gla", "chunk_bidirectional_gla"]

_OP = "bidirectional_gla"
_HAS_TRITON_IMPL = importlib.util.find_spec(__name__ + ".chunk_triton") is not None


# what the fused kernel takes (chunk_triton raises a clear error for anything else)
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_supports(q, v, g_fwd, g_bwd) -> bool:
    return (q.shape[-1] in TRITON_HEAD_DIMS and v.shape[-1] in TRITON_HEAD_DIMS
            and all(t.dtype in TRITON_DTYPES for t in (q, g_fwd, g_bwd)))


def _triton_impl():
    from .chunk_triton import triton_bidirectional_gla  # imported on first use: Triton is optional
    return triton_bidirectional_gla


def _validate(q, k, v, g_fwd, g_bwd) -> None:
    for name, t in (("q", q), ("k", k), ("g_fwd", g_fwd), ("g_bwd", g_bwd)):
        check_tensor(name, t, 4, "(B, N, H, K)")
    check_tensor("v", v, 4, "(B, N, H, V)")
    names = ("q", "k", "v", "g_fwd", "g_bwd")
    check_same_device(names, (q, k, v, g_fwd, g_bwd))
    for name, t in (("k", k), ("g_fwd", g_fwd), ("g_bwd", g_bwd)):
        check_shape(name, t, q.shape, "(B, N, H, K) like q")
    check_shape("v", v, (*q.shape[:3], v.shape[-1]), "(B, N, H, V) with B, N, H of q")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if q.shape[1] == 0:
        raise ValueError("q has N = 0 tokens; bidirectional_gla needs N >= 1")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be >= 1, got K={q.shape[-1]} (q) and V={v.shape[-1]} (v)")


def bidirectional_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor,
                      g_bwd: torch.Tensor, scale: Optional[float] = None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Bidirectional GLA over a token sequence.

    Args:
        q, k: (B, N, H, K) queries and keys. v: (B, N, H, V) values (same dtype as q).
        g_fwd, g_bwd: (B, N, H, K) log-decays (<= 0; -inf allowed) of the forward/backward scans.
        scale: query scale, K ** -0.5 by default.
        backend: 'auto' (Triton on CUDA, PyTorch elsewhere), 'torch' or 'triton'; see
            ``visionlin.kernels.use_backend`` and ``last_backend``.
    Returns:
        o: (B, N, H, V) in q's dtype.
    """
    if torch.jit.is_scripting():  # TorchScript runs the PyTorch path (compiled statically: nothing below is)
        return chunk_bidirectional_gla(q, k, v, g_fwd, g_bwd, q.shape[-1] ** -0.5 if scale is None else scale)
    _validate(q, k, v, g_fwd, g_bwd)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.numel() == 0:  # an empty batch or no heads
        return v.new_zeros(v.shape)
    path = resolve_backend(_OP, backend, q.device, _HAS_TRITON_IMPL, _triton_supports(q, v, g_fwd, g_bwd))
    if path == "triton":
        return _triton_impl()(q, k, v, g_fwd, g_bwd, scale)
    return chunk_bidirectional_gla(q, k, v, g_fwd, g_bwd, scale)
