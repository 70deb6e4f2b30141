"""Fused Triton path of the selective scan and of its multi-route cross scan.

One kernel family serves both ops. A program owns (channel block, route, batch) and walks the tokens
of its route sequentially, holding the (BLOCK_D, n) state tile in fp32 registers:

    x_t = exp(clamp(delta_t A)) * x_{t-1} + delta_t u_t B_t,    y_t = <x_t, C_t> (+ D u_t) (* silu(z_t))

The recurrence is sequential in t; the parallelism is batch x routes x channel blocks. A route's
token order is index arithmetic on the (H, W) grid: route r of R scans in order k = r * 4 // R
(R = 2: raster and reversed raster), and step t of order k reads token tt = t (orders 0, 1) or
L-1-t (orders 2, 3) at (tt // W, tt % W) for raster orders (0, 2) and (tt % H, tt // H) for
column-major orders (1, 3). Nothing is flipped, transposed or gathered on the host: every tensor is
read through its own strides (no ``.contiguous()`` copies); a per-route input u (b, R, d, H, W) is
read through its route stride, a shared one with route stride 0. ``selective_scan`` is the one-route
raster case with H = 1, W = l, plus grouped B/C (a channel block never straddles a group, so
B_t/C_t are one n-vector per block). The z gate multiplies every route's output by silu(z_t).

Merging routes: every route adds its output at the token's grid position, with fp32 ``atomic_add``
into an fp32 channels-last (b, H, W, d) buffer (no (b, R, d, H, W) intermediate); with one route
the output is stored directly in u's dtype. The float atomics make the sum over routes
order-nondeterministic at the ulp level.

Backward (reverse-time pass, recomputing the states; only the inputs are saved). The adjoint state
g_t = dL/dx_t obeys g_t = a_{t+1} g_{t+1} + dy_t C_t, and with x_{t-1} known:
    dB_t = sum_d g_t delta_t u_t,  du_t = sum_n g_t delta_t B_t (+ D dy_t),
    d(delta_t) = sum_n g_t (u_t B_t + a_t x_{t-1} A),  dA = sum_t g_t a_t x_{t-1} delta_t,
    dC_t = sum_d dy_t x_t,  (the a_t terms only where delta_t A lies inside the clamp).
States are needed in reverse order. Each program first runs the forward recurrence storing a
checkpoint of its state every K ~ sqrt(L) tokens (fp32, in global memory); then, chunk by chunk from
the end, it recomputes the K states of the chunk from its checkpoint into a K-token scratch and walks
them backwards. Memory is ~2 sqrt(L) states per program instead of L; compute is two forward
recurrences plus one backward. (Inverting x_{t-1} = (x_t - b_t) / a_t instead would blow up for
strongly decaying a_t.) The scratch is written and read back by the same program, separated by
``tl.debug_barrier``. dB/dC (shared by the channels of a group or route), a shared u's du and, with
several routes, dz (shared by the routes) are reduced with fp32 atomics; a per-route u's du is stored;
dA, dD, d(delta_bias) are per-program partials summed over the batch in torch (deterministic).

Numerics: the per-token log-decay delta*A is clamped to [-GATE_CLAMP, GATE_CLAMP] as in the PyTorch
path (gradient zero outside, as through ``torch.clamp``); softplus has PyTorch's threshold 20.
Inputs may be float32/float16/bfloat16 (each tile is upcast to fp32 right after its load).

The ops are ``torch.ops.visionlin.selective_scan_triton`` and ``cross_selective_scan_triton``,
``torch.library`` custom ops with fake implementations and autograd.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import TRITON_DTYPES, TRITON_MAX_STATE
from .chunk import GATE_CLAMP

MAX_CHUNK = 64


# ----------------------------------------------------------------------------------------------
# Kernel helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _route_pos(t, r, R, H, W):
    """Grid position (row, col) of the token scanned at step t of route r of R, in order r * 4 // R
    (0 raster, 1 column-major, 2 and 3 reversed), by integer arithmetic so that r can be a runtime
    program id."""
    L = H * W
    k = r * (4 // R)
    rev = k // 2
    col = k % 2
    tt = t + rev * (L - 1 - 2 * t)
    h = (1 - col) * (tt // W) + col * (tt % H)
    w = (1 - col) * (tt % W) + col * (tt // H)
    return h, w


@triton.jit
def _gate(dt_raw, bias_v, A_t, valid, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr):
    """From the raw delta [BD]: the pre-softplus delta, the step size (0 on invalid rows, so that
    padding tokens decay by exp(0) = 1 and add nothing), the decay a [BD, BN] and the clamp mask."""
    dt = dt_raw
    if HAS_BIAS:
        dt = dt + bias_v
    if SOFTPLUS:
        # log1p(exp(x)) written overflow-free; PyTorch's threshold: x > 20 -> x
        dts = tl.where(dt > 20.0, dt, tl.maximum(dt, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(dt))))
    else:
        dts = dt
    dts = tl.where(valid, dts, 0.0)
    la = dts[:, None] * A_t
    inside = (la >= -CLAMP) & (la <= CLAMP)
    a = tl.exp(tl.minimum(tl.maximum(la, -CLAMP), CLAMP))
    return dt, dts, a, inside


@triton.jit
def _scan_fwd_kernel(u, dl, A, Bm, Cm, Dv, bias, z, out, last,
                     su_b, su_r, su_d, su_h, su_w,
                     sd_b, sd_r, sd_d, sd_h, sd_w,
                     sA_r, sA_d, sA_n,
                     sB_b, sB_r, sB_g, sB_n, sB_h, sB_w, gsB,
                     sC_b, sC_r, sC_g, sC_n, sC_h, sC_w, gsC,
                     sD_r, sD_d, sbi_r, sbi_d,
                     sz_b, sz_d, sz_h, sz_w,
                     so_b, so_d, so_h, so_w,
                     d, n, H, W, R,
                     HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr,
                     SOFTPLUS: tl.constexpr, ACCUMULATE: tl.constexpr, STORE_LAST: tl.constexpr,
                     BD: tl.constexpr, BN: tl.constexpr, CLAMP: tl.constexpr):
    pid_d = tl.program_id(0)
    r = tl.program_id(1)
    bb = tl.program_id(2).to(tl.int64)          # batch offsets can pass 2**31 elements
    cols = pid_d * BD + tl.arange(0, BD)
    ns = tl.arange(0, BN)
    cm = cols < d
    nm = ns < n
    m2 = cm[:, None] & nm[None, :]
    A_t = tl.load(A + r * sA_r + cols[:, None] * sA_d + ns[None, :] * sA_n, mask=m2, other=0.0).to(tl.float32)
    if HAS_D:
        D_v = tl.load(Dv + r * sD_r + cols * sD_d, mask=cm, other=0.0).to(tl.float32)
    else:
        D_v = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        bias_v = tl.load(bias + r * sbi_r + cols * sbi_d, mask=cm, other=0.0).to(tl.float32)
    else:
        bias_v = tl.zeros([BD], dtype=tl.float32)
    # a channel block lies inside one group of B (and of C): B_t, C_t are n-vectors per block
    B_b = Bm + bb * sB_b + r * sB_r + ((pid_d * BD) // gsB) * sB_g + ns * sB_n
    C_b = Cm + bb * sC_b + r * sC_r + ((pid_d * BD) // gsC) * sC_g + ns * sC_n
    u_b = u + bb * su_b + r * su_r + cols * su_d
    d_b = dl + bb * sd_b + r * sd_r + cols * sd_d
    z_b = z + bb * sz_b + cols * sz_d
    o_b = out + bb * so_b + cols * so_d
    x = tl.zeros([BD, BN], dtype=tl.float32)
    for t in range(0, H * W):
        h, w = _route_pos(t, r, R, H, W)
        u_t = tl.load(u_b + h * su_h + w * su_w, mask=cm, other=0.0).to(tl.float32)
        dt_raw = tl.load(d_b + h * sd_h + w * sd_w, mask=cm, other=0.0).to(tl.float32)
        B_t = tl.load(B_b + h * sB_h + w * sB_w, mask=nm, other=0.0).to(tl.float32)
        C_t = tl.load(C_b + h * sC_h + w * sC_w, mask=nm, other=0.0).to(tl.float32)
        _, dts, a, _ = _gate(dt_raw, bias_v, A_t, cm, HAS_BIAS, SOFTPLUS, CLAMP)
        x = a * x + (dts * u_t)[:, None] * B_t[None, :]
        y = tl.sum(x * C_t[None, :], 1)
        if HAS_D:
            y += D_v * u_t
        if HAS_Z:
            z_t = tl.load(z_b + h * sz_h + w * sz_w, mask=cm, other=0.0).to(tl.float32)
            y = y * z_t * tl.sigmoid(z_t)
        o_p = o_b + h * so_h + w * so_w
        if ACCUMULATE:  # several routes add into the same fp32 grid position
            tl.atomic_add(o_p, y, mask=cm, sem="relaxed")
        else:
            tl.store(o_p, y.to(out.dtype.element_ty), mask=cm)
    if STORE_LAST:  # last: (b, d, n) contiguous fp32 (one route)
        tl.store(last + (bb * d + cols)[:, None] * n + ns[None, :], x, mask=m2)


@triton.jit
def _scan_bwd_kernel(u, dl, A, Bm, Cm, Dv, bias, z, dout, dlast,
                     du, ddl, dA_p, dBm, dCm, dD_p, dbias_p, dz, ckpt, scratch,
                     su_b, su_r, su_d, su_h, su_w,
                     sd_b, sd_r, sd_d, sd_h, sd_w,
                     sA_r, sA_d, sA_n,
                     sB_b, sB_r, sB_g, sB_n, sB_h, sB_w, gsB,
                     sC_b, sC_r, sC_g, sC_n, sC_h, sC_w, gsC,
                     sD_r, sD_d, sbi_r, sbi_d,
                     sz_b, sz_d, sz_h, sz_w,
                     so_b, so_d, so_h, so_w,
                     sdu_b, sdu_r, sdu_d, sdu_h, sdu_w,
                     sdd_b, sdd_r, sdd_d, sdd_h, sdd_w,
                     sdB_b, sdB_r, sdB_g, sdB_n, sdB_h, sdB_w,
                     sdC_b, sdC_r, sdC_g, sdC_n, sdC_h, sdC_w,
                     sdz_b, sdz_d, sdz_h, sdz_w,
                     d, n, H, W, R, NC,
                     HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr,
                     SOFTPLUS: tl.constexpr, DU_ATOMIC: tl.constexpr, DZ_ATOMIC: tl.constexpr,
                     HAS_DLAST: tl.constexpr,
                     K: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, CLAMP: tl.constexpr):
    pid_d = tl.program_id(0)
    r = tl.program_id(1)
    bb = tl.program_id(2).to(tl.int64)
    prog = (bb * R + r) * tl.num_programs(0) + pid_d
    L = H * W
    cols = pid_d * BD + tl.arange(0, BD)
    ns = tl.arange(0, BN)
    cm = cols < d
    nm = ns < n
    m2 = cm[:, None] & nm[None, :]
    tile = tl.arange(0, BD)[:, None] * BN + ns[None, :]     # offsets inside a [BD, BN] state slot
    A_t = tl.load(A + r * sA_r + cols[:, None] * sA_d + ns[None, :] * sA_n, mask=m2, other=0.0).to(tl.float32)
    if HAS_D:
        D_v = tl.load(Dv + r * sD_r + cols * sD_d, mask=cm, other=0.0).to(tl.float32)
    else:
        D_v = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        bias_v = tl.load(bias + r * sbi_r + cols * sbi_d, mask=cm, other=0.0).to(tl.float32)
    else:
        bias_v = tl.zeros([BD], dtype=tl.float32)
    gB = (pid_d * BD) // gsB
    gC = (pid_d * BD) // gsC
    B_b = Bm + bb * sB_b + r * sB_r + gB * sB_g + ns * sB_n
    C_b = Cm + bb * sC_b + r * sC_r + gC * sC_g + ns * sC_n
    dB_b = dBm + bb * sdB_b + r * sdB_r + gB * sdB_g + ns * sdB_n
    dC_b = dCm + bb * sdC_b + r * sdC_r + gC * sdC_g + ns * sdC_n
    u_b = u + bb * su_b + r * su_r + cols * su_d
    d_b = dl + bb * sd_b + r * sd_r + cols * sd_d
    z_b = z + bb * sz_b + cols * sz_d
    go_b = dout + bb * so_b + cols * so_d
    du_b = du + bb * sdu_b + r * sdu_r + cols * sdu_d
    dd_b = ddl + bb * sdd_b + r * sdd_r + cols * sdd_d
    dz_b = dz + bb * sdz_b + cols * sdz_d
    ck_b = ckpt + prog * NC * (BD * BN) + tile
    sc_b = scratch + prog * K * (BD * BN) + tile

    # 1. forward recurrence, keeping the state entering every K-th token
    x = tl.zeros([BD, BN], dtype=tl.float32)
    for t in range(0, L):
        h, w = _route_pos(t, r, R, H, W)
        tl.store(ck_b + (t // K) * (BD * BN), x, mask=(t % K) == 0)
        u_t = tl.load(u_b + h * su_h + w * su_w, mask=cm, other=0.0).to(tl.float32)
        dt_raw = tl.load(d_b + h * sd_h + w * sd_w, mask=cm, other=0.0).to(tl.float32)
        B_t = tl.load(B_b + h * sB_h + w * sB_w, mask=nm, other=0.0).to(tl.float32)
        _, dts, a, _ = _gate(dt_raw, bias_v, A_t, cm, HAS_BIAS, SOFTPLUS, CLAMP)
        x = a * x + (dts * u_t)[:, None] * B_t[None, :]
    tl.debug_barrier()   # the checkpoints are read back (by other threads) below

    # 2. chunks from the last: recompute the chunk's states, then walk them backwards
    if HAS_DLAST:  # dlast: (b, d, n) contiguous fp32 (one route)
        g = tl.load(dlast + (bb * d + cols)[:, None] * n + ns[None, :], mask=m2, other=0.0)
    else:
        g = tl.zeros([BD, BN], dtype=tl.float32)
    dA_acc = tl.zeros([BD, BN], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)
    for ci in range(0, NC):
        t0 = (NC - 1 - ci) * K
        x = tl.load(ck_b + (NC - 1 - ci) * (BD * BN))
        for k in range(0, K):
            t = t0 + k
            valid = cm & (t < L)
            h, w = _route_pos(t, r, R, H, W)
            tl.store(sc_b + k * (BD * BN), x)           # the state entering token t
            u_t = tl.load(u_b + h * su_h + w * su_w, mask=valid, other=0.0).to(tl.float32)
            dt_raw = tl.load(d_b + h * sd_h + w * sd_w, mask=valid, other=0.0).to(tl.float32)
            B_t = tl.load(B_b + h * sB_h + w * sB_w, mask=nm & (t < L), other=0.0).to(tl.float32)
            _, dts, a, _ = _gate(dt_raw, bias_v, A_t, valid, HAS_BIAS, SOFTPLUS, CLAMP)
            x = a * x + (dts * u_t)[:, None] * B_t[None, :]
        tl.debug_barrier()   # scratch written above, read below
        for kk in range(0, K):
            k = K - 1 - kk
            t = t0 + k
            valid = cm & (t < L)
            vt = nm & (t < L)
            h, w = _route_pos(t, r, R, H, W)
            xp = tl.load(sc_b + k * (BD * BN))
            u_t = tl.load(u_b + h * su_h + w * su_w, mask=valid, other=0.0).to(tl.float32)
            dt_raw = tl.load(d_b + h * sd_h + w * sd_w, mask=valid, other=0.0).to(tl.float32)
            B_t = tl.load(B_b + h * sB_h + w * sB_w, mask=vt, other=0.0).to(tl.float32)
            C_t = tl.load(C_b + h * sC_h + w * sC_w, mask=vt, other=0.0).to(tl.float32)
            go = tl.load(go_b + h * so_h + w * so_w, mask=valid, other=0.0).to(tl.float32)
            dt, dts, a, inside = _gate(dt_raw, bias_v, A_t, valid, HAS_BIAS, SOFTPLUS, CLAMP)
            x = a * xp + (dts * u_t)[:, None] * B_t[None, :]
            if HAS_Z:
                z_t = tl.load(z_b + h * sz_h + w * sz_w, mask=valid, other=0.0).to(tl.float32)
                sg = tl.sigmoid(z_t)
                o = tl.sum(x * C_t[None, :], 1) + D_v * u_t
                dz_t = go * o * sg * (1.0 + z_t * (1.0 - sg))
                if DZ_ATOMIC:  # z gates every route
                    tl.atomic_add(dz_b + h * sdz_h + w * sdz_w, dz_t, mask=valid, sem="relaxed")
                else:
                    tl.store(dz_b + h * sdz_h + w * sdz_w, dz_t, mask=valid)
                go = go * z_t * sg
            dD_acc += go * u_t
            # dC_t sums over the block's channels (one group); other blocks add theirs
            tl.atomic_add(dC_b + h * sdC_h + w * sdC_w, tl.sum(go[:, None] * x, 0), mask=vt, sem="relaxed")
            g = g + go[:, None] * C_t[None, :]                      # dL/dx_t
            tl.atomic_add(dB_b + h * sdB_h + w * sdB_w, tl.sum(g * (dts * u_t)[:, None], 0), mask=vt,
                          sem="relaxed")
            du_t = tl.sum(g * B_t[None, :], 1) * dts + D_v * go
            gax = tl.where(inside, g * a * xp, 0.0)                 # no gradient through the clamp
            ddts = tl.sum(g * B_t[None, :], 1) * u_t + tl.sum(gax * A_t, 1)
            dA_acc += gax * dts[:, None]
            if SOFTPLUS:
                ddt = ddts * tl.where(dt > 20.0, 1.0, tl.sigmoid(dt))
            else:
                ddt = ddts
            ddt = tl.where(valid, ddt, 0.0)
            dbias_acc += ddt
            tl.store(dd_b + h * sdd_h + w * sdd_w, ddt, mask=valid)
            if DU_ATOMIC:  # u is shared by the routes
                tl.atomic_add(du_b + h * sdu_h + w * sdu_w, du_t, mask=valid, sem="relaxed")
            else:
                tl.store(du_b + h * sdu_h + w * sdu_w, du_t, mask=valid)
            g = a * g                                               # carried to token t-1
        tl.debug_barrier()   # the next chunk overwrites the scratch
    # per-(batch, route) partials, summed over the batch on the host
    pr = (bb * R + r) * d + cols
    tl.store(dA_p + pr[:, None] * n + ns[None, :], dA_acc, mask=m2)
    tl.store(dD_p + pr, dD_acc, mask=cm)
    tl.store(dbias_p + pr, dbias_acc, mask=cm)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _check_supported(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is not None and t.dtype not in TRITON_DTYPES:
            raise ValueError(f"backend='triton' supports {name} dtypes {tuple(_NAMES.values())}; "
                             f"got {t.dtype} (use backend='torch')")
    n = A.shape[-1]
    if n > TRITON_MAX_STATE:
        raise ValueError(f"backend='triton' supports state sizes n <= {TRITON_MAX_STATE}; got n={n} "
                         "(use backend='torch')")


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# Strides in the kernels' generic layouts. selective_scan is one raster route over H = 1, W = l.
def _s_in(t, cross):       # (b, R, d, H, W); route stride 0 for a shared (b, d, H, W) input
    s = t.stride()
    if not cross:
        return [s[0], 0, s[1], 0, s[2]]
    return list(s) if t.ndim == 5 else [s[0], 0, *s[1:]]


def _s_u(t, cross):        # (b, d, H, W)
    s = t.stride()
    return list(s) if cross else [s[0], s[1], 0, s[2]]


def _s_delta(t, cross):    # (b, R, d, H, W)
    s = t.stride()
    return list(s) if cross else [s[0], 0, s[1], 0, s[2]]


def _s_bc(t, cross):       # (b, R, g, n, H, W)
    s = t.stride()
    if cross:
        return [s[0], s[1], 0, s[2], s[3], s[4]]
    if t.ndim == 3:
        return [s[0], 0, 0, s[1], 0, s[2]]
    return [s[0], 0, s[1], s[2], 0, s[3]]


def _s_A(t, cross):        # (R, d, n)
    s = t.stride()
    return list(s) if cross else [0, s[0], s[1]]


def _s_vec(t, cross):      # (R, d)
    if t is None:
        return [0, 0]
    s = t.stride()
    return list(s) if cross else [0, s[0]]


def _group_size(M, d, cross) -> int:
    return d // M.shape[1] if (not cross and M.ndim == 4) else max(d, 1)


def _blocks(d: int, n: int, M_group_sizes) -> Tuple[int, int]:
    """(BLOCK_D, BLOCK_N): the [BD, BN] state tile, at most 2048 elements; BD divides every group
    size of grouped B/C, so that a block never straddles two groups."""
    BN = triton.next_power_of_2(n)
    BD = min(triton.next_power_of_2(d), max(1, 2048 // BN), 64)
    for gs in M_group_sizes:
        BD = min(BD, gs & -gs)          # the largest power of two dividing gs
    return BD, BN


def _dims(u, cross):
    """(b, d, H, W) of the call: selective_scan is a 1 x l grid; a cross scan's u may have a route axis."""
    if cross:
        return (u.shape[0], *u.shape[-3:])
    return u.shape[0], u.shape[1], 1, u.shape[2]


def _plan(d, A, B, C, cross):
    n = A.shape[-1]
    grouped = [] if cross else [_group_size(M, d, cross) for M in (B, C) if M.ndim == 4]
    return _blocks(d, n, grouped)


def _new_out(u, cross, dtype, zero: bool) -> torch.Tensor:
    """The output: (b, d, l) for selective_scan, channels-last (b, d, H, W) for a cross scan."""
    b, d, H, W = _dims(u, cross)
    new = torch.zeros if zero else torch.empty
    if not cross:
        return new(b, d, W, device=u.device, dtype=dtype)
    return new(b, H, W, d, device=u.device, dtype=dtype).permute(0, 3, 1, 2)


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus: bool, R: int, cross: bool):
    b, d, H, W = _dims(u, cross)
    n = A.shape[-1]
    BD, BN = _plan(d, A, B, C, cross)
    accumulate = R > 1
    out = _new_out(u, cross, torch.float32 if accumulate else u.dtype, zero=accumulate)
    last = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
    zz = z if z is not None else u
    with _device_guard(u):
        _scan_fwd_kernel[(triton.cdiv(d, BD), R, b)](
            u, delta, A, B, C, D if D is not None else u, delta_bias if delta_bias is not None else u, zz,
            out, last,
            *_s_in(u, cross), *_s_delta(delta, cross), *_s_A(A, cross),
            *_s_bc(B, cross), _group_size(B, d, cross), *_s_bc(C, cross), _group_size(C, d, cross),
            *_s_vec(D, cross), *_s_vec(delta_bias, cross), *(_s_u(z, cross) if z is not None else [0] * 4),
            *_s_u(out, cross), d, n, H, W, R,
            HAS_D=D is not None, HAS_BIAS=delta_bias is not None, HAS_Z=z is not None, SOFTPLUS=bool(softplus),
            ACCUMULATE=accumulate, STORE_LAST=not cross, BD=BD, BN=BN, CLAMP=GATE_CLAMP)
    return out.to(u.dtype), last


def _chunk_len(L: int) -> int:
    """Checkpoint spacing K ~ sqrt(L): ~2 sqrt(L) stored states per program."""
    return min(MAX_CHUNK, triton.next_power_of_2(max(1, math.isqrt(L - 1) + 1)))


def _backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus: bool, R: int, cross: bool):
    b, d, H, W = _dims(u, cross)
    n, L = A.shape[-1], H * W
    BD, BN = _plan(d, A, B, C, cross)
    K = _chunk_len(L)
    NC = triton.cdiv(L, K)
    nDB = triton.cdiv(d, BD)
    dev, f32 = u.device, torch.float32
    du_atomic = R > 1 and u.ndim == 4        # a cross scan's u shared by the routes
    if dlast is not None:   # a gradient, not an input: the kernel reads it as (b, d, n) contiguous fp32
        dlast = dlast.to(torch.float32).contiguous()
    du = (torch.zeros if du_atomic else torch.empty)(u.shape, device=dev, dtype=f32)
    ddelta = torch.empty(delta.shape, device=dev, dtype=f32)
    dB = torch.zeros(B.shape, device=dev, dtype=f32)
    dC = torch.zeros(C.shape, device=dev, dtype=f32)
    dz = (torch.zeros if R > 1 else torch.empty)(z.shape, device=dev, dtype=f32) if z is not None else None
    dA_p = torch.empty(b, R, d, n, device=dev, dtype=f32)
    dD_p = torch.empty(b, R, d, device=dev, dtype=f32)
    dbias_p = torch.empty(b, R, d, device=dev, dtype=f32)
    ckpt = torch.empty(b * R * nDB, NC, BD, BN, device=dev, dtype=f32)
    scratch = torch.empty(b * R * nDB, K, BD, BN, device=dev, dtype=f32)
    with _device_guard(u):
        _scan_bwd_kernel[(nDB, R, b)](
            u, delta, A, B, C, D if D is not None else u, delta_bias if delta_bias is not None else u,
            z if z is not None else u, dout, dlast if dlast is not None else u,
            du, ddelta, dA_p, dB, dC, dD_p, dbias_p, dz if dz is not None else du, ckpt, scratch,
            *_s_in(u, cross), *_s_delta(delta, cross), *_s_A(A, cross),
            *_s_bc(B, cross), _group_size(B, d, cross), *_s_bc(C, cross), _group_size(C, d, cross),
            *_s_vec(D, cross), *_s_vec(delta_bias, cross), *(_s_u(z, cross) if z is not None else [0] * 4),
            *_s_u(dout, cross), *_s_in(du, cross), *_s_delta(ddelta, cross), *_s_bc(dB, cross),
            *_s_bc(dC, cross), *(_s_u(dz, cross) if dz is not None else [0] * 4),
            d, n, H, W, R, NC,
            HAS_D=D is not None, HAS_BIAS=delta_bias is not None, HAS_Z=z is not None, SOFTPLUS=bool(softplus),
            DU_ATOMIC=du_atomic, DZ_ATOMIC=R > 1, HAS_DLAST=dlast is not None, K=K, BD=BD, BN=BN, CLAMP=GATE_CLAMP)
    dA = dA_p.sum(0)
    if not cross:
        dA = dA[0]
    grads = [du.to(u.dtype), ddelta.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype)]
    dD = dD_p.sum(0) if cross else dD_p.sum(0)[0]
    dbias = dbias_p.sum(0) if cross else dbias_p.sum(0)[0]
    grads.append(dD.to(D.dtype) if D is not None else u.new_empty(0))
    grads.append(dz.to(z.dtype) if z is not None else u.new_empty(0))
    grads.append(dbias.to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0))
    return grads


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("visionlin::selective_scan_triton", mutates_args=())
def _ss_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
           delta_softplus: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, 1, False)


@_ss_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return u.new_empty(u.shape), u.new_empty(u.shape[0], u.shape[1], A.shape[-1], dtype=torch.float32)


@torch.library.custom_op("visionlin::selective_scan_triton_backward", mutates_args=())
def _ss_backward_op(dout: torch.Tensor, dlast: Optional[torch.Tensor], u: torch.Tensor, delta: torch.Tensor,
                    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                    z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                    delta_softplus: bool) -> List[torch.Tensor]:
    return _backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, 1, False)


def _fake_grads(u, delta, A, B, C, D, z, delta_bias):
    like = [u, delta, A, B, C]
    grads = [t.new_empty(t.shape) for t in like]
    for t in (D, z, delta_bias):
        grads.append(t.new_empty(t.shape) if t is not None else u.new_empty(0))
    return grads


@_ss_backward_op.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return _fake_grads(u, delta, A, B, C, D, z, delta_bias)


def _ss_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.softplus = softplus


def _ss_autograd(ctx, dout, dlast):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    g = _ss_backward_op(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ctx.softplus)
    opt = [g[5] if D is not None else None, g[6] if z is not None else None,
           g[7] if delta_bias is not None else None]
    return (*g[:5], *opt, None)


_ss_op.register_autograd(_ss_autograd, setup_context=_ss_setup)


@torch.library.custom_op("visionlin::cross_selective_scan_triton", mutates_args=())
def _cross_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
              delta_softplus: bool, routes: int) -> torch.Tensor:
    return _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, routes, True)[0]


@_cross_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, routes):
    return _new_out(u, True, u.dtype, zero=False)


@torch.library.custom_op("visionlin::cross_selective_scan_triton_backward", mutates_args=())
def _cross_backward_op(dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                       B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                       delta_bias: Optional[torch.Tensor], delta_softplus: bool,
                       routes: int) -> List[torch.Tensor]:
    return _backward(dout, None, u, delta, A, B, C, D, z, delta_bias, delta_softplus, routes, True)


@_cross_backward_op.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, routes):
    return _fake_grads(u, delta, A, B, C, D, z, delta_bias)


def _cross_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, routes = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.softplus, ctx.routes = softplus, routes


def _cross_autograd(ctx, dout):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    g = _cross_backward_op(dout, u, delta, A, B, C, D, z, delta_bias, ctx.softplus, ctx.routes)
    opt = [g[5] if D is not None else None, g[6] if z is not None else None,
           g[7] if delta_bias is not None else None]
    return (*g[:5], *opt, None, None)


_cross_op.register_autograd(_cross_autograd, setup_context=_cross_setup)


# ----------------------------------------------------------------------------------------------
# Entry points (inputs validated by the public functions in ``__init__``)
# ----------------------------------------------------------------------------------------------
def triton_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """Shapes as in ``selective_scan``; returns out (b, d, l) in u's dtype (and the fp32 last state)."""
    _check_supported(u, delta, A, B, C, D, z, delta_bias)
    out, last = _ss_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (out, last) if return_last_state else out


def triton_cross_selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, routes=4, z=None):
    """Shapes as in ``cross_selective_scan``; returns (b, d, H, W) in u's dtype (channels-last)."""
    _check_supported(u, delta, A, B, C, D, z, delta_bias)
    return _cross_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), int(routes))
