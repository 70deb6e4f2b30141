"""Scan and linear-attention operators, each with a vectorised PyTorch path and, where written, a
fused Triton path. Shipped as ``visionlin.kernels`` (the folder is ``kernels/`` in the source tree)."""
from ._dispatch import BACKENDS, last_backend, triton_available, use_backend
from .gla import bidirectional_gla
from .linear_attn import linear_attention
from .ssm import cross_selective_scan, selective_scan

__all__ = ["bidirectional_gla", "linear_attention", "selective_scan", "cross_selective_scan", "use_backend",
           "last_backend", "triton_available", "BACKENDS"]
