"""Selective scan (Mamba's S6) and its multi-route cross scan over an image grid (Vim, VMamba).

    delta <- delta + delta_bias, then softplus(delta) if delta_softplus
    x_t = exp(delta_t A) * x_{t-1} + delta_t B_t u_t          (x: (b, d, n), t = 0 .. l-1)
    y_t = <x_t, C_t> over the n states;  out = y + D u;  out *= silu(z) if z is given

``selective_scan`` has mamba_ssm's ``selective_scan_ref`` signature and semantics in the (b, d, l)
layout (real A only). ``cross_selective_scan`` runs R routes over an (H, W) grid — 1: raster;
2: raster and reversed raster (Vim, on a 1 x L grid); 4: raster, column-major, reversed raster,
reversed column-major (VMamba's CrossScan order) — each with its own delta/A/B/C/D and either a
shared input u or its own, sums the route outputs placed back on the grid (VMamba's CrossMerge) and
optionally gates the sum by silu(z). Per-route tensors stay in the spatial layout: the route only
sets the order in which the tokens are scanned.

Paths: the vectorised PyTorch path (``chunk.py``), a fused Triton path (``scan_triton.py``, all
routes in one launch, forward and backward) and a compiled CPU path (``scan_cpu.py``, a serial
recurrence in C vectorised over channels; forward compiled, backward by the PyTorch path);
``naive.py`` holds the float64 token-serial references the tests compare against.

``bidirectional_conv1d_silu`` is bidirectional Mamba's pair of depthwise convolutions + SiLU in the
original token order (route 0 causal, route 1 anti-causal, i.e. causal over the reversed sequence),
producing a per-route u for a two-route ``cross_selective_scan`` (Vim) with no flipped copies: a
PyTorch path (``conv.py``) and a compiled CPU path (``scan_cpu.py``).
"""
from __future__ import annotations

import importlib.util
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .._checks import check_same_device, check_shape, check_tensor
from .._dispatch import requested_backend, resolve_backend
from .chunk import _chunk_scan, chunk_cross_selective_scan, chunk_selective_scan, project_delta
from .conv import torch_bidirectional_conv1d_silu
from .naive import naive_cross_selective_scan, naive_selective_scan
from .scan_cpu import (cpu_bidirectional_conv1d_silu, cpu_cross_selective_scan, cpu_kernel_available,
                       cpu_selective_scan, cpu_supports)

__all__ = ["selective_scan", "cross_selective_scan", "bidirectional_conv1d_silu", "naive_selective_scan",
           "naive_cross_selective_scan", "chunk_selective_scan", "chunk_cross_selective_scan", "cpu_selective_scan",
           "cpu_cross_selective_scan", "torch_bidirectional_conv1d_silu", "cpu_bidirectional_conv1d_silu",
           "cpu_kernel_available", "ROUTES"]

ROUTES = (1, 2, 4)
_HAS_TRITON_IMPL = importlib.util.find_spec(__name__ + ".scan_triton") is not None

# what the fused kernel takes (scan_triton raises a clear error for anything else)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_STATE = 256


def _triton_impl(name: str):
    from . import scan_triton  # imported on first use: Triton is optional
    return getattr(scan_triton, name)


def _triton_supports(u, delta, A, B, C, *optional) -> bool:
    return (A.shape[-1] <= TRITON_MAX_STATE
            and all(t.dtype in TRITON_DTYPES for t in (u, delta, A, B, C, *optional) if t is not None))


def _check_dtype(name, t, u, params_may_be_float32: bool, ref: str = "u") -> None:
    if t.dtype == u.dtype or (params_may_be_float32 and t.dtype == torch.float32):
        return
    extra = " (or float32)" if params_may_be_float32 else ""
    raise ValueError(f"{name} must have {ref}'s dtype {u.dtype}{extra}, got {t.dtype}")


def _check_group(name, M, b, d, n, l_shape, l_layout):
    if M.ndim == 3 + len(l_shape) - 1:
        check_shape(name, M, (b, n, *l_shape), f"(b, n, {l_layout})")
        return
    if M.ndim != 4 + len(l_shape) - 1:
        raise ValueError(f"{name} must have shape (b, n, {l_layout}) or (b, g, n, {l_layout}), got {tuple(M.shape)}")
    g = M.shape[1]
    if g == 0 or d % g:
        raise ValueError(f"{name} has g = {g} groups, which must divide d = {d}; got {tuple(M.shape)}")
    check_shape(name, M, (b, g, n, *l_shape), f"(b, g, n, {l_layout})")


def _validate_scan(u, delta, A, B, C, D, z, delta_bias) -> None:
    check_tensor("u", u, 3, "(b, d, l)")
    check_tensor("delta", delta, 3, "(b, d, l)")
    check_tensor("A", A, 2, "(d, n)")
    for name, M in (("B", B), ("C", C)):
        if not isinstance(M, torch.Tensor) or M.ndim not in (3, 4):
            check_tensor(name, M, 3, "(b, n, l) or (b, g, n, l)")
        check_tensor(name, M, M.ndim, "(b, n, l) or (b, g, n, l)")
    named = [("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)]
    for name, t, nd, layout in (("D", D, 1, "(d,)"), ("z", z, 3, "(b, d, l)"), ("delta_bias", delta_bias, 1, "(d,)")):
        if t is not None:
            check_tensor(name, t, nd, layout)
            named.append((name, t))
    check_same_device([nm for nm, _ in named], [t for _, t in named])
    b, d, l = u.shape
    n = A.shape[1]
    check_shape("delta", delta, u.shape, "(b, d, l) like u")
    check_shape("A", A, (d, n), "(d, n) with d of u")
    if z is not None:
        check_shape("z", z, u.shape, "(b, d, l) like u")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_shape(name, t, (d,), "(d,) with d of u")
    for name, M in (("B", B), ("C", C)):
        _check_group(name, M, b, d, n, (l,), "l")
    for name, t in named[1:]:
        _check_dtype(name, t, u, name in ("A", "D", "delta_bias"))
    if l == 0:
        raise ValueError("u has l = 0 tokens; selective_scan needs l >= 1")
    if n == 0:
        raise ValueError("A has n = 0 states; the state size must be >= 1")


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: Optional[str] = None
                   ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Selective scan with mamba_ssm's ``selective_scan_ref`` semantics.

    Args:
        u, delta: (b, d, l). A: (d, n), real (normally negative: A = -exp(A_log)).
        B, C: (b, n, l), or grouped (b, g, n, l) with g dividing d (channel c reads group c // (d // g)).
        D: optional (d,) skip. z: optional (b, d, l) gate, out *= silu(z). delta_bias: optional (d,).
        delta_softplus: apply softplus to delta (after adding delta_bias).
        return_last_state: also return the state after the last token, (b, d, n).
        backend: 'auto' (Triton on CUDA, the compiled CPU path on CPU where it builds, PyTorch otherwise),
            'torch', 'triton' or 'cpu'; see ``use_backend``.
        u, delta, B, C, z share u's dtype; A, D, delta_bias may also be float32. Any strides.
    Returns:
        out (b, d, l) in u's dtype, computed in float32 (float64 for float64 inputs); with
        return_last_state, (out, last_state) with last_state in the compute dtype.
    Numerics: the per-token log-decay delta*A is clamped to [-30, 30] (see ``chunk.py``).
    """
    if torch.jit.is_scripting():  # TorchScript runs the PyTorch path (compiled statically: nothing below is)
        out, last = _chunk_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, None)
        if last is not None:
            return out, last
        return out
    _validate_scan(u, delta, A, B, C, D, z, delta_bias)
    path = resolve_backend("selective_scan", backend, u.device, _HAS_TRITON_IMPL,
                           _triton_supports(u, delta, A, B, C, D, z, delta_bias), cpu_kernel_available,
                           cpu_supports(u, delta, A, B, C, D, z, delta_bias))
    if u.numel() == 0:  # an empty batch or no channels
        out = u.new_zeros(u.shape)
        cd = torch.float64 if u.dtype == torch.float64 else torch.float32
        return (out, u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=cd)) if return_last_state else out
    if path == "triton":
        return _triton_impl("triton_selective_scan")(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if path == "cpu":
        return cpu_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return chunk_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _validate_cross(u, delta, A, B, C, D, delta_bias, z, routes, delta_proj_weight=None) -> None:
    if isinstance(routes, bool) or routes not in ROUTES:
        raise ValueError(f"routes must be one of {ROUTES}, got {routes!r}")
    if not isinstance(u, torch.Tensor) or u.ndim not in (4, 5):
        check_tensor("u", u, 4, "(b, d, H, W) or (b, R, d, H, W)")
    check_tensor("u", u, u.ndim, "(b, d, H, W) or (b, R, d, H, W)")
    check_tensor("delta", delta, 5, "(b, R, d, H, W)")
    check_tensor("A", A, 3, "(R, d, n)")
    check_tensor("B", B, 5, "(b, R, n, H, W)")
    check_tensor("C", C, 5, "(b, R, n, H, W)")
    named = [("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)]
    for name, t, nd, layout in (("D", D, 2, "(R, d)"), ("delta_bias", delta_bias, 2, "(R, d)"),
                                ("z", z, 4, "(b, d, H, W)"),
                                ("delta_proj_weight", delta_proj_weight, 3, "(R, d, rank)")):
        if t is not None:
            check_tensor(name, t, nd, layout)
            named.append((name, t))
    check_same_device([nm for nm, _ in named], [t for _, t in named])
    b, (d, H, W) = u.shape[0], u.shape[-3:]
    R, n = routes, A.shape[-1]
    if u.ndim == 5:
        check_shape("u", u, (b, R, d, H, W), f"(b, R, d, H, W) with R = routes = {R}")
    if delta_proj_weight is None:
        check_shape("delta", delta, (b, R, d, H, W), f"(b, R, d, H, W) with R = routes = {R}")
    else:
        rank = delta.shape[2]
        check_shape("delta", delta, (b, R, rank, H, W),
                    f"(b, R, rank, H, W) (the low-rank input of delta_proj_weight) with R = routes = {R}")
        check_shape("delta_proj_weight", delta_proj_weight, (R, d, rank),
                    f"(R, d, rank) with R = routes = {R}, d of u and rank = delta.shape[2]")
        if rank == 0:
            raise ValueError("delta has rank = 0 channels; the low-rank delta input needs rank >= 1")
    check_shape("A", A, (R, d, n), f"(R, d, n) with R = routes = {R} and d of u")
    for name, M in (("B", B), ("C", C)):
        check_shape(name, M, (b, R, n, H, W), f"(b, R, n, H, W) with R = routes = {R} and n of A")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_shape(name, t, (R, d), f"(R, d) with R = routes = {R} and d of u")
    if z is not None:
        check_shape("z", z, (b, d, H, W), "(b, d, H, W) with b, d, H, W of u")
    for name, t in named[1:]:
        _check_dtype(name, t, u, name in ("A", "D", "delta_bias", "delta_proj_weight"))
    if H == 0 or W == 0:
        raise ValueError(f"u has an empty grid H x W = {H} x {W}; cross_selective_scan needs H, W >= 1")
    if n == 0:
        raise ValueError("A has n = 0 states; the state size must be >= 1")


def cross_selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor, D: Optional[torch.Tensor] = None,
                         delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = True,
                         routes: int = 4, z: Optional[torch.Tensor] = None,
                         delta_proj_weight: Optional[torch.Tensor] = None,
                         backend: Optional[str] = None) -> torch.Tensor:
    """Multi-route selective scan over an image grid, merged back onto the grid (VMamba's SS2D core;
    Vim's two directions with routes=2 on a 1 x L grid).

    Args:
        u: (b, d, H, W) input shared by every route, or (b, R, d, H, W): route r scans u[:, r]
            (and its D multiplies u[:, r]).
        delta: (b, R, d, H, W); B, C: (b, R, n, H, W) — per-route, in the spatial layout.
        A: (R, d, n). D, delta_bias: optional (R, d). delta_softplus as in ``selective_scan``.
        routes: R in (1, 2, 4). With 4, route 0 scans in raster order (row by row), route 1 column by
            column, routes 2 and 3 are routes 0 and 1 reversed; with 2, raster and reversed raster;
            with 1, raster.
        z: optional (b, d, H, W) gate: the summed output is multiplied by silu(z).
        delta_proj_weight: optional (R, d, rank), Mamba's dt_proj weight per route (its bias is
            delta_bias). Given it, delta is the low-rank (b, R, rank, H, W) input and route r's delta is
            delta_proj_weight[r] @ delta[:, r] per token. The compiled CPU path projects inside the scan
            (no (b, R, d, H, W) delta in memory); the other paths project first.
        backend: 'auto', 'torch', 'triton' or 'cpu', as for ``selective_scan``.
        u, delta, B, C, z share u's dtype; A, D, delta_bias, delta_proj_weight may also be float32.
        Any strides.
    Returns:
        y: (b, d, H, W) in u's dtype = silu(z) * the sum over routes of selective_scan on the route's
        token order (including D*u per route), each output placed back at its token's grid position.
        The compiled CPU and Triton paths return it channels-last (a (b, H, W, d) buffer, permuted).
    """
    if torch.jit.is_scripting():  # TorchScript runs the PyTorch path (compiled statically: nothing below is)
        return chunk_cross_selective_scan(u, project_delta(delta, delta_proj_weight), A, B, C, D, delta_bias,
                                          delta_softplus, routes, z)
    _validate_cross(u, delta, A, B, C, D, delta_bias, z, routes, delta_proj_weight)
    path = resolve_backend("cross_selective_scan", backend, u.device, _HAS_TRITON_IMPL,
                           _triton_supports(u, delta, A, B, C, D, delta_bias, z, delta_proj_weight),
                           cpu_kernel_available, cpu_supports(u, delta, A, B, C, D, delta_bias, z, delta_proj_weight))
    if u.numel() == 0:
        return u.new_zeros(u.shape[:1] + u.shape[-3:])
    if path == "cpu":
        return cpu_cross_selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, routes, z, delta_proj_weight)
    delta = project_delta(delta, delta_proj_weight)
    if path == "triton":
        return _triton_impl("triton_cross_selective_scan")(u, delta, A, B, C, D, delta_bias, delta_softplus, routes, z)
    return chunk_cross_selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, routes, z)


def _validate_conv(x, weight, bias, proj_weight) -> None:
    check_tensor("x", x, 3, "(b, l, d)")
    check_tensor("weight", weight, 3, "(2, d, K)")
    named = [("x", x), ("weight", weight)]
    if bias is not None:
        check_tensor("bias", bias, 2, "(2, d)")
        named.append(("bias", bias))
    if proj_weight is not None:
        check_tensor("proj_weight", proj_weight, 3, "(2, N, d)")
        named.append(("proj_weight", proj_weight))
    check_same_device([nm for nm, _ in named], [t for _, t in named])
    d = x.shape[2]
    if weight.shape[0] != 2 or weight.shape[1] != d or weight.shape[2] == 0:
        raise ValueError(f"weight must have shape (2, d, K) with d = {d} of x and K >= 1, got {tuple(weight.shape)}")
    if bias is not None:
        check_shape("bias", bias, (2, d), "(2, d) with d of x")
    if proj_weight is not None and (proj_weight.shape[0] != 2 or proj_weight.shape[2] != d
                                    or proj_weight.shape[1] == 0):
        raise ValueError(f"proj_weight must have shape (2, N, d) with d = {d} of x and N >= 1, "
                         f"got {tuple(proj_weight.shape)}")
    for name, t in named[1:]:
        _check_dtype(name, t, x, True, ref="x")


def bidirectional_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                              proj_weight: Optional[torch.Tensor] = None, backend: Optional[str] = None
                              ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Bidirectional Mamba's two depthwise convolutions + SiLU, both in the original token order, and
    optionally each route's bias-free projection of its output (Vim's x_proj).

    Args:
        x: (b, l, d) token-major input, any strides (e.g. a slice of the input projection's output).
        weight: (2, d, K) depthwise kernels (``nn.Conv1d(d, d, K, groups=d).weight[:, 0]`` per route);
            bias: optional (2, d). Both may be float32 with 16-bit x.
        proj_weight: optional (2, N, d), per route ``nn.Linear(d, N, bias=False).weight`` (float32
            allowed with 16-bit x). The compiled CPU path projects each block of rows right after
            writing it (read back from L1, not memory).
        backend: 'auto' (the compiled CPU path for CPU tensors where it builds, PyTorch otherwise),
            'torch' or 'cpu'; 'triton' runs as 'auto' (no Triton kernel: on CUDA the PyTorch path).
    Returns:
        (b, l, 2, d) in x's dtype, contiguous: route 0 = silu(causal conv of x) (Mamba's conv1d),
        y_0[t] = silu(b_0 + sum_k w_0[k] x[t-(K-1)+k]); route 1 = the causal conv over the reversed
        sequence, put back in this order: y_1[t] = silu(b_1 + sum_k w_1[k] x[t+(K-1)-k]) (zero padding
        outside the sequence). With proj_weight a tuple of it and the (b, l, 2, N) projections
        proj[:, t, r] = proj_weight[r] @ y_r[t], in x's dtype, contiguous.
    """
    if torch.jit.is_scripting():  # TorchScript runs the PyTorch path (compiled statically: nothing below is)
        return torch_bidirectional_conv1d_silu(x, weight, bias, proj_weight)
    _validate_conv(x, weight, bias, proj_weight)
    wanted = requested_backend(backend)
    path = resolve_backend("bidirectional_conv1d_silu", "auto" if wanted == "triton" else wanted, x.device, False,
                           False, cpu_kernel_available, cpu_supports(x, weight, bias, proj_weight))
    if x.numel() == 0:
        y = x.new_zeros(x.shape[0], x.shape[1], 2, x.shape[2])
        return y if proj_weight is None else (y, x.new_zeros(x.shape[0], x.shape[1], 2, proj_weight.shape[1]))
    if path == "cpu":
        return cpu_bidirectional_conv1d_silu(x, weight, bias, proj_weight)
    return torch_bidirectional_conv1d_silu(x, weight, bias, proj_weight)
