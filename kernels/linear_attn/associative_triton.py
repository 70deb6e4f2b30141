"""Fused Triton path of non-causal normalised linear attention: the associative form in two passes.

    S = (1/N) sum_j w_j k'_j^T v_j   (K x V per head)      s = (1/N) sum_j w_j k_j   (K)
    o_i = (q'_i S) / (q_i . s + eps)

Forward, one pass over the keys and one over the queries:

1. ``_state_kernel``, grid (splits, B*H, K tiles * V tiles): each program runs over one split of the
   keys (a run of ``BLOCK_N``-token blocks) and writes its fp32 partial S and s; the partials are
   summed over the split axis by ``torch.sum`` (deterministic, no atomics). The splits are what
   makes the pass parallel over N: at batch 1 with a few heads, B*H programs cannot fill a GPU, so
   there are about ``PROGRAMS_PER_SM`` programs per streaming multiprocessor;
2. ``_output_kernel``, grid (query blocks, B*H, V tiles): o for a block of queries from S and s.

Backward (``torch.autograd``): the inputs and the small S and s are saved. With den_i = q_i . s + eps,
dnum_i = do_i / den_i and dden_i = -(do_i . o_i) / den_i = -(q'_i . do_i S^T) / den_i^2:

    dq'_i = dnum_i S^T      dq_i = dden_i s      dS = sum_i q'_i^T dnum_i      ds = sum_i dden_i q_i
    dk'_j = (w_j/N) v_j dS^T   dk_j = (w_j/N) ds   dv_j = (w_j/N) k'_j dS
    dw_j = (1/N) (k'_j . v_j dS^T + k_j . ds)

(dq and dq', dk and dk' are summed when q_num, k_num are None.) So one pass over the queries
(``_query_grad_kernel``: dq, dq' and each query's 1/den and dden), the state kernel again for dS and
ds (the same sums as S and s with x = q', y = do, per-row weights 1/den and dden), and one pass
over the keys (``_key_grad_kernel``: dk, dk', dv, dw).

Inputs are (B, N, H, D) with arbitrary strides (strides are passed, nothing is copied); queries
may be fewer or more than keys; K, V any of 1 .. ``TRITON_MAX_HEAD_DIM``, in tiles of up to 64
(masked past the head dim); float32/float16/bfloat16, each tile upcast to fp32 right after its load.
Every sum is accumulated in fp32 and S, s are means, so nothing grows with N and 16-bit inputs
cannot overflow. Products of fp32 tiles use TF32 tensor cores for 16-bit inputs and 3xTF32 (about
fp32 accuracy) for float32 inputs.

The op is ``torch.ops.visionlin.linear_attention_triton``, a ``torch.library`` custom op with a fake
implementation and autograd, so ``torch.compile`` keeps it as one opaque node.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import TRITON_DTYPES, TRITON_MAX_HEAD_DIM

BLOCK_N = 64            # tokens per block, in both passes
MAX_TILE = 64           # head-dim tile (K and V)
PROGRAMS_PER_SM = 4     # the key-side reductions are split over N until about this many programs per SM


# ----------------------------------------------------------------------------------------------
# Tile helpers. Row indices are relative to the block's first token t0; every access is masked.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptr, s_n, s_d, t0, rows, cols, N, D):
    """fp32 tile x[t0 + rows, cols]; zero past the sequence end and the head dim."""
    mask = ((t0 + rows) < N)[:, None] & (cols < D)[None, :]
    return tl.load(ptr + (t0 + rows)[:, None] * s_n + cols[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_rows(ptr, s_n, t0, rows, N):
    """fp32 per-token scalars x[t0 + rows]; zero past the sequence end."""
    return tl.load(ptr + (t0 + rows) * s_n, mask=(t0 + rows) < N, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, s_n, s_d, t0, rows, cols, N, D, x):
    mask = ((t0 + rows) < N)[:, None] & (cols < D)[None, :]
    tl.store(ptr + (t0 + rows)[:, None] * s_n + cols[None, :] * s_d, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _state_tile(st, bh, kcols, vcols, K: tl.constexpr, V: tl.constexpr):
    """[BK, BV] tile of a contiguous fp32 (B*H, K, V) state."""
    mask = (kcols < K)[:, None] & (vcols < V)[None, :]
    return tl.load(st + bh.to(tl.int64) * (K * V) + kcols[:, None] * V + vcols[None, :], mask=mask, other=0.0)


@triton.jit
def _vec_tile(sv, bh, kcols, K: tl.constexpr):
    """[BK] tile of a contiguous fp32 (B*H, K) vector."""
    return tl.load(sv + bh.to(tl.int64) * K + kcols, mask=kcols < K, other=0.0)


@triton.jit
def _times_state_t(y, s_n, s_d, t0, rows, N, st, bh, kcols, K: tl.constexpr, V: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VT: tl.constexpr, PREC: tl.constexpr):
    """[BN, BK] tile of y S^T (y: [BN, V] rows, S: (K, V) state), summed over the V tiles."""
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for vt in range(VT):
        vcols = vt * BV + tl.arange(0, BV)
        acc += tl.dot(_load_tile(y, s_n, s_d, t0, rows, vcols, N, V),
                      tl.trans(_state_tile(st, bh, kcols, vcols, K, V)), input_precision=PREC)
    return acc


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _state_kernel(x, y, z, a, c, part_m, part_v,
                  s_xb, s_xn, s_xh, s_xd, s_yb, s_yn, s_yh, s_yd, s_zb, s_zn, s_zh, s_zd,
                  s_ab, s_an, s_ah, s_cb, s_cn, s_ch,
                  N, H, blocks_per_split, scale,
                  HAS_A: tl.constexpr, HAS_C: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, VT: tl.constexpr, PREC: tl.constexpr):
    """One split's partial sums: part_m = scale * sum_j a_j x_j^T y_j (a [BK, BV] tile) and, in the
    first V tile, part_v = scale * sum_j c_j z_j. Forward: (x, y, z, a, c) = (k', v, k, w, w), scale
    1/N; backward: (q', do, q, 1/den, dden), scale 1. a, c are 1 where absent."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    kt = tl.program_id(2) // VT
    vt = tl.program_id(2) % VT
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    x += b * s_xb + h * s_xh
    y += b * s_yb + h * s_yh
    z += b * s_zb + h * s_zh
    a += b * s_ab + h * s_ah
    c += b * s_cb + h * s_ch
    rows = tl.arange(0, BN)
    kcols = kt * BK + tl.arange(0, BK)
    vcols = vt * BV + tl.arange(0, BV)
    acc_m = tl.zeros([BK, BV], dtype=tl.float32)
    acc_v = tl.zeros([BK], dtype=tl.float32)
    for i in range(blocks_per_split):
        t0 = (split * blocks_per_split + i).to(tl.int64) * BN
        xa = _load_tile(x, s_xn, s_xd, t0, rows, kcols, N, K)
        if HAS_A:
            xa *= _load_rows(a, s_an, t0, rows, N)[:, None]
        acc_m += tl.dot(tl.trans(xa), _load_tile(y, s_yn, s_yd, t0, rows, vcols, N, V), input_precision=PREC)
        if vt == 0:
            za = _load_tile(z, s_zn, s_zd, t0, rows, kcols, N, K)
            if HAS_C:
                za *= _load_rows(c, s_cn, t0, rows, N)[:, None]
            acc_v += tl.sum(za, 0)
    part = bh.to(tl.int64) * tl.num_programs(0) + split
    mask = (kcols < K)[:, None] & (vcols < V)[None, :]
    tl.store(part_m + part * (K * V) + kcols[:, None] * V + vcols[None, :], acc_m * scale, mask=mask)
    if vt == 0:
        tl.store(part_v + part * K + kcols, acc_v * scale, mask=kcols < K)


@triton.jit
def _output_kernel(q, qn, st_m, st_v, o,
                   s_qb, s_qn, s_qh, s_qd, s_pb, s_pn, s_ph, s_pd, s_ob, s_on, s_oh, s_od,
                   N, H, eps,
                   HAS_QN: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, KT: tl.constexpr, PREC: tl.constexpr):
    """o = (q' S) / (q . s + eps) for one block of queries and one V tile."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t0 = tl.program_id(0).to(tl.int64) * BN
    q += b * s_qb + h * s_qh
    qn += b * s_pb + h * s_ph
    o += b * s_ob + h * s_oh
    rows = tl.arange(0, BN)
    vcols = tl.program_id(2) * BV + tl.arange(0, BV)
    den = tl.zeros([BN], dtype=tl.float32)
    num = tl.zeros([BN, BV], dtype=tl.float32)
    for kt in range(KT):
        kcols = kt * BK + tl.arange(0, BK)
        qa = _load_tile(q, s_qn, s_qd, t0, rows, kcols, N, K)
        den += tl.sum(qa * _vec_tile(st_v, bh, kcols, K)[None, :], 1)
        if HAS_QN:
            qa = _load_tile(qn, s_pn, s_pd, t0, rows, kcols, N, K)
        num += tl.dot(qa, _state_tile(st_m, bh, kcols, vcols, K, V), input_precision=PREC)
    _store_tile(o, s_on, s_od, t0, rows, vcols, N, V, num / (den + eps)[:, None])


@triton.jit
def _query_grad_kernel(q, qn, do, st_m, st_v, dq, dqn, rden, dden,
                       s_qb, s_qn, s_qh, s_qd, s_pb, s_pn, s_ph, s_pd, s_ob, s_on, s_oh, s_od,
                       s_gb, s_gn, s_gh, s_gd, s_hb, s_hn, s_hh, s_hd, s_rb, s_rn, s_rh,
                       N, H, eps,
                       HAS_QN: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, KT: tl.constexpr, VT: tl.constexpr,
                       PREC: tl.constexpr):
    """dq (and dq') for one block of queries; also stores each query's 1/den and dden (fp32) for the
    dS, ds sums. dden needs the whole K x V form q' S do^T first, so without q_num (dq = dden s +
    do S^T / den) do S^T is formed twice rather than held for every K tile."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t0 = tl.program_id(0).to(tl.int64) * BN
    q += b * s_qb + h * s_qh
    qn += b * s_pb + h * s_ph
    do += b * s_ob + h * s_oh
    dq += b * s_gb + h * s_gh
    dqn += b * s_hb + h * s_hh
    rden += b * s_rb + h * s_rh
    dden += b * s_rb + h * s_rh
    rows = tl.arange(0, BN)
    den = tl.zeros([BN], dtype=tl.float32)
    for kt in range(KT):
        kcols = kt * BK + tl.arange(0, BK)
        den += tl.sum(_load_tile(q, s_qn, s_qd, t0, rows, kcols, N, K) * _vec_tile(st_v, bh, kcols, K)[None, :], 1)
    r = 1.0 / (den + eps)
    form = tl.zeros([BN], dtype=tl.float32)          # q'_i . do_i S^T
    for kt in range(KT):
        kcols = kt * BK + tl.arange(0, BK)
        g = _times_state_t(do, s_on, s_od, t0, rows, N, st_m, bh, kcols, K, V, BN, BK, BV, VT, PREC)
        if HAS_QN:
            form += tl.sum(_load_tile(qn, s_pn, s_pd, t0, rows, kcols, N, K) * g, 1)
            _store_tile(dqn, s_hn, s_hd, t0, rows, kcols, N, K, g * r[:, None])
        else:
            form += tl.sum(_load_tile(q, s_qn, s_qd, t0, rows, kcols, N, K) * g, 1)
    d = -form * r * r
    tl.store(rden + (t0 + rows) * s_rn, r, mask=(t0 + rows) < N)
    tl.store(dden + (t0 + rows) * s_rn, d, mask=(t0 + rows) < N)
    for kt in range(KT):
        kcols = kt * BK + tl.arange(0, BK)
        grad = d[:, None] * _vec_tile(st_v, bh, kcols, K)[None, :]
        if not HAS_QN:
            g = _times_state_t(do, s_on, s_od, t0, rows, N, st_m, bh, kcols, K, V, BN, BK, BV, VT, PREC)
            grad += g * r[:, None]
        _store_tile(dq, s_gn, s_gd, t0, rows, kcols, N, K, grad)


@triton.jit
def _key_grad_kernel(k, kn, v, w, st_m, st_v, dk, dkn, dv, dw,
                     s_kb, s_kn, s_kh, s_kd, s_pb, s_pn, s_ph, s_pd, s_vb, s_vn, s_vh, s_vd,
                     s_wb, s_wn, s_wh, s_gb, s_gn, s_gh, s_gd, s_hb, s_hn, s_hh, s_hd,
                     s_ub, s_un, s_uh, s_ud, s_eb, s_en, s_eh,
                     N, H, inv_n,
                     HAS_KN: tl.constexpr, HAS_W: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KT: tl.constexpr,
                     VT: tl.constexpr, PREC: tl.constexpr):
    """dk (and dk'), dv and dw for one block of keys, from dS (st_m) and ds (st_v)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t0 = tl.program_id(0).to(tl.int64) * BN
    k += b * s_kb + h * s_kh
    kn += b * s_pb + h * s_ph
    v += b * s_vb + h * s_vh
    w += b * s_wb + h * s_wh
    dk += b * s_gb + h * s_gh
    dkn += b * s_hb + h * s_hh
    dv += b * s_ub + h * s_uh
    dw += b * s_eb + h * s_eh
    rows = tl.arange(0, BN)
    if HAS_W:
        wn = _load_rows(w, s_wn, t0, rows, N) * inv_n
    else:
        wn = tl.full([BN], inv_n, dtype=tl.float32)
    dw_acc = tl.zeros([BN], dtype=tl.float32)        # k'_j . v_j dS^T + k_j . ds
    for kt in range(KT):
        kcols = kt * BK + tl.arange(0, BK)
        g = _times_state_t(v, s_vn, s_vd, t0, rows, N, st_m, bh, kcols, K, V, BN, BK, BV, VT, PREC)
        ds = _vec_tile(st_v, bh, kcols, K)[None, :]
        ka = _load_tile(k, s_kn, s_kd, t0, rows, kcols, N, K)
        if HAS_KN:
            dw_acc += tl.sum(_load_tile(kn, s_pn, s_pd, t0, rows, kcols, N, K) * g + ka * ds, 1)
            _store_tile(dkn, s_hn, s_hd, t0, rows, kcols, N, K, g * wn[:, None])
            _store_tile(dk, s_gn, s_gd, t0, rows, kcols, N, K, ds * wn[:, None])
        else:
            dw_acc += tl.sum(ka * (g + ds), 1)
            _store_tile(dk, s_gn, s_gd, t0, rows, kcols, N, K, (g + ds) * wn[:, None])
    for vt in range(VT):
        vcols = vt * BV + tl.arange(0, BV)
        acc = tl.zeros([BN, BV], dtype=tl.float32)
        for kt in range(KT):
            kcols = kt * BK + tl.arange(0, BK)
            if HAS_KN:
                ka = _load_tile(kn, s_pn, s_pd, t0, rows, kcols, N, K)
            else:
                ka = _load_tile(k, s_kn, s_kd, t0, rows, kcols, N, K)
            acc += tl.dot(ka, _state_tile(st_m, bh, kcols, vcols, K, V), input_precision=PREC)
        _store_tile(dv, s_un, s_ud, t0, rows, vcols, N, V, acc * wn[:, None])
    if HAS_W:
        tl.store(dw + (t0 + rows) * s_en, (dw_acc * inv_n).to(dw.dtype.element_ty), mask=(t0 + rows) < N)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def _check_supported(q: torch.Tensor, v: torch.Tensor) -> None:
    for name, dim in (("K", q.shape[-1]), ("V", v.shape[-1])):
        if not 1 <= dim <= TRITON_MAX_HEAD_DIM:
            raise ValueError(f"backend='triton' supports head dims K, V up to {TRITON_MAX_HEAD_DIM}; "
                             f"got {name}={dim} (use backend='torch' for larger ones)")
    if q.dtype not in TRITON_DTYPES:
        names = tuple(str(d).removeprefix("torch.") for d in TRITON_DTYPES)
        raise ValueError(f"backend='triton' supports dtypes {names}; got {q.dtype} (use backend='torch')")


def _tile(dim: int) -> Tuple[int, int]:
    """(tile, tiles) for a head dim: a power of two >= 16 (tl.dot's minimum), at most MAX_TILE."""
    block = min(MAX_TILE, max(16, triton.next_power_of_2(dim)))
    return block, triton.cdiv(dim, block)


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _num_warps(BK: int, BV: int) -> int:
    # 64 x 64 fp32 tiles spill registers on sm_90 with 4 warps (ptxas -v)
    return 8 if BK * BV >= 2048 else 4


def _num_sms(device: torch.device) -> int:
    # under the CPU interpreter: a small "GPU", so that tests see several splits
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(*tensors: torch.Tensor):
    return [s for t in tensors for s in t.stride()]


def _reduce(x, y, z, a, c, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, H, K, V) scale * sum_j a_j x_j^T y_j and (B, H, K) scale * sum_j c_j z_j, in fp32, over
    splits of the N rows (a, c: (B, N, H) or None for 1)."""
    B, N, H, K = x.shape
    V = y.shape[-1]
    BK, KT = _tile(K)
    BV, VT = _tile(V)
    blocks = triton.cdiv(N, BLOCK_N)
    wanted = triton.cdiv(PROGRAMS_PER_SM * _num_sms(x.device), B * H * KT * VT)
    per_split = triton.cdiv(blocks, min(blocks, wanted))
    splits = triton.cdiv(blocks, per_split)
    part_m = torch.empty(B, H, splits, K, V, device=x.device, dtype=torch.float32)
    part_v = torch.empty(B, H, splits, K, device=x.device, dtype=torch.float32)
    a_ = x if a is None else a          # unread when absent; only its strides are passed
    c_ = x if c is None else c
    _state_kernel[(splits, B * H, KT * VT)](
        x, y, z, a_, c_, part_m, part_v, *_strides(x, y, z), *a_.stride()[:3], *c_.stride()[:3],
        N, H, per_split, scale, HAS_A=a is not None, HAS_C=c is not None, K=K, V=V, BN=BLOCK_N, BK=BK,
        BV=BV, VT=VT, PREC=_precision(x.dtype), num_warps=_num_warps(BK, BV))
    return part_m.sum(2), part_v.sum(2)


def _forward(q, k, v, q_num, k_num, key_weight, eps: float):
    B, Nq, H, K = q.shape
    V = v.shape[-1]
    BK, KT = _tile(K)
    BV, VT = _tile(V)
    qn = q if q_num is None else q_num
    o = torch.empty(B, Nq, H, V, device=q.device, dtype=q.dtype)
    with _device_guard(q):
        state, ksum = _reduce(k if k_num is None else k_num, v, k, key_weight, key_weight, 1.0 / k.shape[1])
        _output_kernel[(triton.cdiv(Nq, BLOCK_N), B * H, VT)](
            q, qn, state, ksum, o, *_strides(q, qn, o), Nq, H, eps, HAS_QN=q_num is not None,
            K=K, V=V, BN=BLOCK_N, BK=BK, BV=BV, KT=KT, PREC=_precision(q.dtype), num_warps=_num_warps(BK, BV))
    return o, state, ksum


def _backward(do, q, k, v, q_num, k_num, key_weight, state, ksum, eps: float):
    B, Nq, H, K = q.shape
    N, V = k.shape[1], v.shape[-1]
    BK, KT = _tile(K)
    BV, VT = _tile(V)
    prec = _precision(q.dtype)
    qn = q if q_num is None else q_num
    kn = k if k_num is None else k_num
    w = k if key_weight is None else key_weight          # unread when absent
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=v.dtype)
    # the gradients of absent inputs are not written: any pointer will do
    dqn = dq if q_num is None else torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dkn = dk if k_num is None else torch.empty(k.shape, device=q.device, dtype=k.dtype)
    dw = dk if key_weight is None else torch.empty(key_weight.shape, device=q.device, dtype=key_weight.dtype)
    rden = torch.empty(B, Nq, H, device=q.device, dtype=torch.float32)
    dden = torch.empty_like(rden)
    with _device_guard(q):
        _query_grad_kernel[(triton.cdiv(Nq, BLOCK_N), B * H)](
            q, qn, do, state, ksum, dq, dqn, rden, dden, *_strides(q, qn, do, dq, dqn), *rden.stride(),
            Nq, H, eps, HAS_QN=q_num is not None, K=K, V=V, BN=BLOCK_N, BK=BK, BV=BV, KT=KT, VT=VT, PREC=prec,
            num_warps=_num_warps(BK, BV))
        dstate, dksum = _reduce(qn, do, q, rden, dden, 1.0)
        _key_grad_kernel[(triton.cdiv(N, BLOCK_N), B * H)](
            k, kn, v, w, dstate, dksum, dk, dkn, dv, dw, *_strides(k, kn, v), *w.stride()[:3],
            *_strides(dk, dkn, dv), *dw.stride()[:3], N, H, 1.0 / N,
            HAS_KN=k_num is not None, HAS_W=key_weight is not None, K=K, V=V, BN=BLOCK_N, BK=BK, BV=BV,
            KT=KT, VT=VT, PREC=prec, num_warps=_num_warps(BK, BV))
    # an empty tensor for each absent input (a custom op's outputs must not alias one another)
    optional = [q.new_empty(0) if t is None else g for t, g in ((q_num, dqn), (k_num, dkn), (key_weight, dw))]
    return (dq, dk, dv, *optional)


@torch.library.custom_op("visionlin::linear_attention_triton", mutates_args=())
def _la_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_num: Optional[torch.Tensor],
           k_num: Optional[torch.Tensor], key_weight: Optional[torch.Tensor], eps: float
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, S, s): the output and the fp32 (B, H, K, V) state and (B, H, K) key mean it came from."""
    return _forward(q, k, v, q_num, k_num, key_weight, eps)


@_la_op.register_fake
def _(q, k, v, q_num, k_num, key_weight, eps):
    B, _, H, K = q.shape
    V = v.shape[-1]
    return (q.new_empty(*q.shape[:3], V), q.new_empty(B, H, K, V, dtype=torch.float32),
            q.new_empty(B, H, K, dtype=torch.float32))


@torch.library.custom_op("visionlin::linear_attention_triton_backward", mutates_args=())
def _la_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    q_num: Optional[torch.Tensor], k_num: Optional[torch.Tensor],
                    key_weight: Optional[torch.Tensor], state: torch.Tensor, ksum: torch.Tensor, eps: float
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dq_num, dk_num, dkey_weight); the last three are empty where the input is None."""
    return _backward(do, q, k, v, q_num, k_num, key_weight, state, ksum, eps)


@_la_backward_op.register_fake
def _(do, q, k, v, q_num, k_num, key_weight, state, ksum, eps):
    def like(t):
        return q.new_empty(0) if t is None else t.new_empty(t.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), like(q_num), like(k_num), like(key_weight)


def _setup_context(ctx, inputs, output):
    q, k, v, q_num, k_num, key_weight, eps = inputs
    _, state, ksum = output
    ctx.save_for_backward(q, k, v, q_num, k_num, key_weight, state, ksum)
    ctx.mark_non_differentiable(state, ksum)        # saved for the backward, never returned to users
    ctx.eps = eps


def _la_autograd(ctx, grad_o, _grad_state, _grad_ksum):
    q, k, v, q_num, k_num, key_weight, state, ksum = ctx.saved_tensors
    dq, dk, dv, dqn, dkn, dw = _la_backward_op(grad_o, q, k, v, q_num, k_num, key_weight, state, ksum, ctx.eps)
    return (dq, dk, dv, None if q_num is None else dqn, None if k_num is None else dkn,
            None if key_weight is None else dw, None)


_la_op.register_autograd(_la_autograd, setup_context=_setup_context)


def triton_linear_attention(q, k, v, q_num, k_num, key_weight, eps: float) -> torch.Tensor:
    """Inputs (B, Nq|N, H, K|V), validated by ``linear_attention``; returns o (B, Nq, H, V) in q's dtype."""
    _check_supported(q, v)
    return _la_op(q, k, v, q_num, k_num, key_weight, float(eps))[0]
