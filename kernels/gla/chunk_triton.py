"""Fused Triton path of bidirectional GLA: both scan directions in the same launches, chunked.

Tokens are grouped in chunks of ``CHUNK`` = 64, each chunk in row blocks of ``SUB`` = 16. Every decay
factor is ``exp`` of a sum of (clamped) gates between two tokens, obtained by scanning the gates that
lie between them, so every exponent is <= 0 and no factorisation needs a positive exponent:

* a row block against the rest of its chunk factors through the block's edge:
  exp(gates between the row and the edge) * exp(gates between the edge and the partner);
* pairs inside a row block (the diagonal 16 x 16 block) are computed element-wise over K; their
  exponent is a difference of two scans over at most 16 clamped gates (|.| <= 480), the one place
  where rounding reaches ~ulp(480) = 3e-5 in an exponent (the PyTorch path uses float64 there);
* pairs in different chunks go through fp32 chunk states.

Gates are clamped at ``-GATE_FLOOR`` (the PyTorch path's constant): exp(-30) ~ 1e-13 is zero at fp32
precision and the clamp keeps -inf out of the scans; the gradient is zero below the floor, as
through ``torch.clamp``.

Forward, three launches, each covering both directions by index arithmetic (no flipped copies, no
doubled batch):

1. ``_chunk_states_kernel``, grid (chunks, B*H, K tiles): each chunk's own contribution to the state
   leaving it (through its right edge for the forward scan, its left edge for the backward scan);
2. ``_pass_states_kernel``, grid (B*H*streams, state tiles): the pass over chunks, element-wise on
   the K x V state, ``STATE_GROUP`` chunks at a time in closed form (N / (64 * 16) sequential
   steps), turning the contributions into the state leaving each chunk;
3. ``_chunk_output_kernel``, grid (chunks, B*H): o = (o_fwd + o_bwd) / 2 for the chunk's tokens,
   both directions from one read of q, k, v and the gates, with the states of the neighbour chunks.

Backward (``torch.autograd``): only the five inputs are saved (references, no copies). The states
(the scans' states and the gradient states that carry q^T do against each scan) are recomputed by
the same two state kernels with four streams; ``_chunk_dqk_kernel`` (grid chunks x B*H x K tiles)
computes dq, dk and both gate gradients; ``_chunk_output_kernel`` is reused for dv. The gate
gradient is the GLA identity dg_s = sum_{t >= s} (q_t dq_t - k_t dk_t) for the forward scan
(t <= s for the backward scan); its part beyond a chunk boundary is sum_V(state * gradient state)
at the boundary, so no pass over the whole sequence is needed.

Inputs are (B, N, H, D) with arbitrary strides (strides are passed, nothing is copied); any N;
K, V in ``TRITON_HEAD_DIMS``; q/k/v in float32/float16/bfloat16 and gates in any of those (each
tensor is upcast to fp32 right after its load). Accumulation is fp32; products of fp32 tiles use TF32
tensor cores for 16-bit inputs and 3xTF32 (about fp32 accuracy) for float32 inputs.

The op is ``torch.ops.visionlin.bidirectional_gla_triton``, a ``torch.library`` custom op with a fake
implementation and autograd, so ``torch.compile`` keeps it as one opaque node.
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import torch
import triton
import triton.language as tl

from . import TRITON_DTYPES, TRITON_HEAD_DIMS
from .chunk import GATE_FLOOR

CHUNK = 64
SUB = 16
STATE_GROUP = 16
# State streams, each holding the state *leaving* every chunk in its own direction:
# 0 forward scan (left to right), 1 backward scan (right to left), 2 and 3 their gradient states,
# passed against their scan (right to left, left to right).
_H_FWD, _H_BWD, _D_FWD, _D_BWD = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------
# Tile helpers. Row indices are relative to the chunk's first token t0; every access is masked.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptr, s_n, s_d, t0, rows, cols, N, D):
    """fp32 tile x[t0 + rows, cols]; zero past the sequence end."""
    mask = ((t0 + rows) < N)[:, None] & (cols < D)[None, :]
    return tl.load(ptr + (t0 + rows)[:, None] * s_n + cols[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gate_tile(g, s_n, s_d, t0, rows, cols, N, K, FLOOR: tl.constexpr):
    """Gates clamped at -FLOOR (so -inf never enters a scan); zero past the sequence end."""
    return tl.maximum(_load_tile(g, s_n, s_d, t0, rows, cols, N, K), -FLOOR)


@triton.jit
def _scan(g, FORWARD: tl.constexpr, INCLUSIVE: tl.constexpr):
    """Running sums of g over rows, from the first row (FORWARD) or the last. The exclusive form
    subtracts the row's own term: one clamped gate (|g| <= FLOOR), never a long prefix sum, so no
    cancellation between large sums."""
    if FORWARD:
        s = tl.cumsum(g, 0)
    else:
        s = tl.cumsum(g, 0, reverse=True)
    if not INCLUSIVE:
        s -= g
    return s


@triton.jit
def _factors(g_c, g_a, a, RIGHT: tl.constexpr, ROW_EXCL: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Log-decays of one scan for row block a (rows a*BC ..), from the chunk's gates g_c [BT, BK] and
    the block's g_a [BC, BK]; the scan couples each row i to partners j >= i if RIGHT, else j <= i.

    A pair's log-decay is rowf_i + colf_j for a partner in ``region`` (the chunk outside the block on
    the partner side; rowf: gates between row and block edge, colf: between edge and partner),
    rowf_i - rowf_j inside the block, and rowf_i + edge against the neighbour chunk's state. The
    row's own gate counts iff not ROW_EXCL, the partner's iff ROW_EXCL. All are <= 0 for gates <= 0.
    """
    rows = tl.arange(0, BT)
    if RIGHT:
        region = rows >= a * BC + BC
    else:
        region = rows < a * BC
    g_out = tl.where(region[:, None], g_c, 0.0)
    colf = _scan(g_out, RIGHT, ROW_EXCL)
    rowf = _scan(g_a, not RIGHT, not ROW_EXCL)
    return rowf, colf, region, tl.sum(g_out, 0)


@triton.jit
def _diag_mask(RIGHT: tl.constexpr, BC: tl.constexpr):
    """Pairs (i, j) of a row block that a scan couples: j >= i if RIGHT, else j <= i."""
    i = tl.arange(0, BC)[:, None]
    j = tl.arange(0, BC)[None, :]
    if RIGHT:
        keep = j >= i
    else:
        keep = j <= i
    return keep


@triton.jit
def _diag_decay(rowf, keep):
    """exp(rowf_i - rowf_j) [BC, BC, BK] on kept pairs (where the exponent is <= 0), 0 elsewhere."""
    e = rowf[:, None, :] - rowf[None, :, :]
    return tl.exp(tl.where(keep[:, :, None], e, float("-inf")))


@triton.jit
def _state_ptrs(st, bh, s, c, NS: tl.constexpr, NC, cols, K: tl.constexpr, V: tl.constexpr):
    """Pointers and mask of rows ``cols`` of stream s's state for chunk c (masked outside 0..NC-1)."""
    vcols = tl.arange(0, V)
    base = st + ((bh * NS + s) * NC + c).to(tl.int64) * (K * V)
    mask = (cols < K)[:, None] & (vcols < V)[None, :] & (c >= 0) & (c < NC)
    return base + cols[:, None] * V + vcols[None, :], mask


@triton.jit
def _load_state(st, bh, s, c, NS: tl.constexpr, NC, cols, K: tl.constexpr, V: tl.constexpr):
    """[BK, V] rows ``cols`` of the state stream s leaves chunk c with (zero outside the sequence)."""
    ptrs, mask = _state_ptrs(st, bh, s, c, NS, NC, cols, K, V)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _neighbour_state(st, bh, s, c, NS: tl.constexpr, NC, cols, RIGHT: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr):
    """The state entering chunk c from the partner side: the one leaving chunk c+1 if RIGHT, else c-1."""
    if RIGHT:
        state = _load_state(st, bh, s, c + 1, NS, NC, cols, K, V)
    else:
        state = _load_state(st, bh, s, c - 1, NS, NC, cols, K, V)
    return state


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _state_contribution(x_c, y_c, g_c, st, bh, s, c, NS: tl.constexpr, NC, cols, RIGHT: tl.constexpr,
                        ROW_EXCL: tl.constexpr, K: tl.constexpr, V: tl.constexpr, PREC: tl.constexpr):
    """Store sum_j (x_j decay_j)^T y_j of one chunk into stream s, decay_j being the gates between
    row j and the edge the state leaves through (the left edge if RIGHT)."""
    w = _scan(g_c, RIGHT, ROW_EXCL)
    ptrs, mask = _state_ptrs(st, bh, s, c, NS, NC, cols, K, V)
    tl.store(ptrs, tl.dot(tl.trans(x_c * tl.exp(w)), y_c, input_precision=PREC), mask=mask)


@triton.jit
def _chunk_states_kernel(k, v, q, do, gf, gb, st, tot,
                         s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd,
                         s_qb, s_qn, s_qh, s_qd, s_ob, s_on, s_oh, s_od,
                         s_fb, s_fn, s_fh, s_fd, s_bb, s_bn, s_bh, s_bd,
                         N, H, NC,
                         NS: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr, FLOOR: tl.constexpr, PREC: tl.constexpr):
    """Per chunk: its contribution to each stream's state and its total log-decay per scan."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    cols = tl.program_id(2) * BK + tl.arange(0, BK)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t0 = c.to(tl.int64) * BT
    rows = tl.arange(0, BT)
    vcols = tl.arange(0, V)
    g_f = _gate_tile(gf + b * s_fb + h * s_fh, s_fn, s_fd, t0, rows, cols, N, K, FLOOR)
    g_b = _gate_tile(gb + b * s_bb + h * s_bh, s_bn, s_bd, t0, rows, cols, N, K, FLOOR)
    k_c = _load_tile(k + b * s_kb + h * s_kh, s_kn, s_kd, t0, rows, cols, N, K)
    v_c = _load_tile(v + b * s_vb + h * s_vh, s_vn, s_vd, t0, rows, vcols, N, V)
    _state_contribution(k_c, v_c, g_f, st, bh, 0, c, NS, NC, cols, False, False, K, V, PREC)
    _state_contribution(k_c, v_c, g_b, st, bh, 1, c, NS, NC, cols, True, False, K, V, PREC)
    if NS == 4:
        q_c = _load_tile(q + b * s_qb + h * s_qh, s_qn, s_qd, t0, rows, cols, N, K)
        do_c = _load_tile(do + b * s_ob + h * s_oh, s_on, s_od, t0, rows, vcols, N, V)
        _state_contribution(q_c, do_c, g_f, st, bh, 2, c, NS, NC, cols, True, True, K, V, PREC)
        _state_contribution(q_c, do_c, g_b, st, bh, 3, c, NS, NC, cols, False, True, K, V, PREC)
    kmask = cols < K
    tl.store(tot + ((bh * 2) * NC + c).to(tl.int64) * K + cols, tl.sum(g_f, 0), mask=kmask)
    tl.store(tot + ((bh * 2 + 1) * NC + c).to(tl.int64) * K + cols, tl.sum(g_b, 0), mask=kmask)


@triton.jit
def _pass_states_kernel(st, tot, NC, NS: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                        BLOCK: tl.constexpr, CG: tl.constexpr):
    """In place, per stream: chunk contributions -> state leaving each chunk, in the stream's order.

    leaving_i = exp(total_i) leaving_(i-1) + own_i, element-wise on the K x V state. CG chunks at a
    time in closed form, leaving_i = sum_(j <= i) exp(total_(j+1) + .. + total_i) own_j
    + exp(total_g0 + .. + total_i) carry, every exponent a sum of chunk totals (no differences of
    prefix sums); so the sequential chain is N / (CHUNK * CG) steps, not N / CHUNK.
    """
    pid = tl.program_id(0)
    bh = pid // NS
    s = pid % NS
    d = s % 2                                   # gates: 0 forward scan, 1 backward scan
    rev = (s == 1) | (s == 2)                   # streams passed right to left
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    emask = e < K * V
    kidx = e // V
    base = st + (bh * NS + s).to(tl.int64) * NC * (K * V)
    tbase = tot + (bh * 2 + d).to(tl.int64) * NC * K
    r = tl.arange(0, CG)
    earlier = r[None, :] < r[:, None]           # [i, j]: j before i in the stream
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    for grp in range(0, tl.cdiv(NC, CG)):
        i = grp * CG + r                        # position in the stream's order
        c = tl.where(rev, NC - 1 - i, i).to(tl.int64)
        c_next = tl.where(rev, NC - 2 - i, i + 1).to(tl.int64)
        mask = (i < NC)[:, None] & emask[None, :]
        ptrs = base + c[:, None] * (K * V) + e[None, :]
        own = tl.load(ptrs, mask=mask, other=0.0)
        total = tl.load(tbase + c[:, None] * K + kidx[None, :], mask=mask, other=0.0)
        total_next = tl.load(tbase + c_next[:, None] * K + kidx[None, :],
                             mask=((i + 1) < NC)[:, None] & emask[None, :], other=0.0)
        between = tl.cumsum(tl.where(earlier[:, :, None], total_next[None, :, :], 0.0), 1, reverse=True)
        weight = tl.where((earlier | (r[None, :] == r[:, None]))[:, :, None], tl.exp(between), 0.0)
        leaving = tl.sum(weight * own[None, :, :], 1) + tl.exp(tl.cumsum(total, 0)) * carry[None, :]
        tl.store(ptrs, leaving, mask=mask)
        carry = tl.sum(tl.where((r == CG - 1)[:, None], leaving, 0.0), 0)


@triton.jit
def _scores_one_direction(g_c, g_a, keep, state, x_a, y_c, y_a, a, RIGHT: tl.constexpr,
                          ROW_EXCL: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """One scan's S [BC, BT] (partners outside the block), S_diag [BC, BC] and state term [BC, V]
    for one K tile, S_ij = sum_k x_ik y_jk decay_ijk."""
    rowf, colf, region, edge = _factors(g_c, g_a, a, RIGHT, ROW_EXCL, BT, BC)
    xr = x_a * tl.exp(rowf)
    yr = tl.where(region[:, None], y_c * tl.exp(colf), 0.0)
    s_off = tl.dot(xr, tl.trans(yr), input_precision=PREC)
    inter = tl.dot(xr * tl.exp(edge)[None, :], state, input_precision=PREC)
    s_diag = tl.sum(x_a[:, None, :] * y_a[None, :, :] * _diag_decay(rowf, keep), 2)
    return s_off, s_diag, inter


@triton.jit
def _chunk_output_kernel(x, y, z, gf, gb, st, out,
                         s_xb, s_xn, s_xh, s_xd, s_yb, s_yn, s_yh, s_yd, s_zb, s_zn, s_zh, s_zd,
                         s_fb, s_fn, s_fh, s_fd, s_bb, s_bn, s_bh, s_bd, s_ob, s_on, s_oh, s_od,
                         N, H, NC, mul,
                         NS: tl.constexpr, SI_F: tl.constexpr, SI_B: tl.constexpr, RIGHT_F: tl.constexpr,
                         ROW_EXCL: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         BC: tl.constexpr, BK: tl.constexpr, FLOOR: tl.constexpr, PREC: tl.constexpr):
    """out_i = mul * sum over both scans of [sum_j (x_i . decay_ij . y_j) z_j + (x_i decay) state].

    Forward output: (x, y, z) = (q, k, v) with the scans' states (the forward scan couples j <= i).
    dv: (x, y, z) = (k, q, do) with the gradient states (the forward scan couples j >= i, and the
    row's own gate is excluded).
    """
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t0 = c.to(tl.int64) * BT
    x += b * s_xb + h * s_xh
    y += b * s_yb + h * s_yh
    z += b * s_zb + h * s_zh
    gf += b * s_fb + h * s_fh
    gb += b * s_bb + h * s_bh
    out += b * s_ob + h * s_oh
    rows_c = tl.arange(0, BT)
    vcols = tl.arange(0, V)
    keep_f = _diag_mask(RIGHT_F, BC)
    keep_b = _diag_mask(not RIGHT_F, BC)
    z_c = _load_tile(z, s_zn, s_zd, t0, rows_c, vcols, N, V)
    for a in range(BT // BC):
        rows = a * BC + tl.arange(0, BC)
        s_off = tl.zeros([BC, BT], dtype=tl.float32)
        s_diag = tl.zeros([BC, BC], dtype=tl.float32)
        acc = tl.zeros([BC, V], dtype=tl.float32)
        for kt in range(K // BK):
            cols = kt * BK + tl.arange(0, BK)
            x_a = _load_tile(x, s_xn, s_xd, t0, rows, cols, N, K)
            y_a = _load_tile(y, s_yn, s_yd, t0, rows, cols, N, K)
            y_c = _load_tile(y, s_yn, s_yd, t0, rows_c, cols, N, K)
            o1, d1, i1 = _scores_one_direction(
                _gate_tile(gf, s_fn, s_fd, t0, rows_c, cols, N, K, FLOOR),
                _gate_tile(gf, s_fn, s_fd, t0, rows, cols, N, K, FLOOR), keep_f,
                _neighbour_state(st, bh, SI_F, c, NS, NC, cols, RIGHT_F, K, V),
                x_a, y_c, y_a, a, RIGHT_F, ROW_EXCL, BT, BC, PREC)
            o2, d2, i2 = _scores_one_direction(
                _gate_tile(gb, s_bn, s_bd, t0, rows_c, cols, N, K, FLOOR),
                _gate_tile(gb, s_bn, s_bd, t0, rows, cols, N, K, FLOOR), keep_b,
                _neighbour_state(st, bh, SI_B, c, NS, NC, cols, not RIGHT_F, K, V),
                x_a, y_c, y_a, a, not RIGHT_F, ROW_EXCL, BT, BC, PREC)
            s_off += o1 + o2
            s_diag += d1 + d2
            acc += i1 + i2
        z_a = _load_tile(z, s_zn, s_zd, t0, rows, vcols, N, V)
        acc += tl.dot(s_off, z_c, input_precision=PREC) + tl.dot(s_diag, z_a, input_precision=PREC)
        mask = ((t0 + rows) < N)[:, None] & (vcols < V)[None, :]
        tl.store(out + (t0 + rows)[:, None] * s_on + vcols[None, :] * s_od,
                 (acc * mul).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _decay_one_direction(g_c, g_a, keep, state, z_a, scores, scores_diag, y_c, y_a, a,
                         RIGHT: tl.constexpr, ROW_EXCL: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                         PREC: tl.constexpr):
    """One scan's out_ik = sum_j scores_ij y_jk decay_ijk + decay_ik (z_i . state_k): dq (scores =
    do_i . v_j, y = k, z = do, the scan's states) or dk (v_i . do_j, q, v, gradient states)."""
    rowf, colf, region, edge = _factors(g_c, g_a, a, RIGHT, ROW_EXCL, BT, BC)
    inner = tl.dot(z_a, tl.trans(state * tl.exp(edge)[:, None]), input_precision=PREC)
    yr = tl.where(region[:, None], y_c * tl.exp(colf), 0.0)
    inner += tl.dot(scores, yr, input_precision=PREC)
    diag = tl.sum(scores_diag[:, :, None] * y_a[None, :, :] * _diag_decay(rowf, keep), 1)
    return tl.exp(rowf) * inner + diag


@triton.jit
def _chunk_dqk_kernel(q, k, v, do, gf, gb, st, dq, dk, dgf, dgb,
                      s_qb, s_qn, s_qh, s_qd, s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd,
                      s_ob, s_on, s_oh, s_od, s_fb, s_fn, s_fh, s_fd, s_bb, s_bn, s_bh, s_bd,
                      N, H, NC, mul,
                      K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                      BK: tl.constexpr, FLOOR: tl.constexpr, PREC: tl.constexpr):
    """dq, dk (both scans summed) and both gate gradients for one chunk and K tile; the outputs
    are contiguous (B, N, H, K)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    cols = tl.program_id(2) * BK + tl.arange(0, BK)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t0 = c.to(tl.int64) * BT
    q += b * s_qb + h * s_qh
    k += b * s_kb + h * s_kh
    v += b * s_vb + h * s_vh
    do += b * s_ob + h * s_oh
    gf += b * s_fb + h * s_fh
    gb += b * s_bb + h * s_bh
    out_base = (b * N * H + h) * K
    rows_c = tl.arange(0, BT)
    vcols = tl.arange(0, V)
    lower = _diag_mask(False, BC)
    upper = _diag_mask(True, BC)

    h_f = _neighbour_state(st, bh, 0, c, 4, NC, cols, False, K, V)
    h_b = _neighbour_state(st, bh, 1, c, 4, NC, cols, True, K, V)
    d_f = _neighbour_state(st, bh, 2, c, 4, NC, cols, True, K, V)
    d_b = _neighbour_state(st, bh, 3, c, 4, NC, cols, False, K, V)
    # gate-gradient mass on the far side of the chunk's left edge: sum_V(state * gradient state) there
    beyond_f = tl.sum(h_f * _load_state(st, bh, 2, c, 4, NC, cols, K, V), 1) * mul
    before_b = tl.sum(_load_state(st, bh, 1, c, 4, NC, cols, K, V) * d_b, 1) * mul

    q_c = _load_tile(q, s_qn, s_qd, t0, rows_c, cols, N, K)
    k_c = _load_tile(k, s_kn, s_kd, t0, rows_c, cols, N, K)
    v_c = _load_tile(v, s_vn, s_vd, t0, rows_c, vcols, N, V)
    do_c = _load_tile(do, s_on, s_od, t0, rows_c, vcols, N, V)
    gf_c = _gate_tile(gf, s_fn, s_fd, t0, rows_c, cols, N, K, FLOOR)
    gb_c = _gate_tile(gb, s_bn, s_bd, t0, rows_c, cols, N, K, FLOOR)
    done_f = tl.zeros([BK], dtype=tl.float32)
    done_b = tl.zeros([BK], dtype=tl.float32)
    for a in range(BT // BC):
        rows = a * BC + tl.arange(0, BC)
        q_a = _load_tile(q, s_qn, s_qd, t0, rows, cols, N, K)
        k_a = _load_tile(k, s_kn, s_kd, t0, rows, cols, N, K)
        v_a = _load_tile(v, s_vn, s_vd, t0, rows, vcols, N, V)
        do_a = _load_tile(do, s_on, s_od, t0, rows, vcols, N, V)
        raw_f = _load_tile(gf, s_fn, s_fd, t0, rows, cols, N, K)
        raw_b = _load_tile(gb, s_bn, s_bd, t0, rows, cols, N, K)
        gf_a = tl.maximum(raw_f, -FLOOR)
        gb_a = tl.maximum(raw_b, -FLOOR)
        p = tl.dot(do_a, tl.trans(v_c), input_precision=PREC)          # do_i . v_j
        p_diag = tl.dot(do_a, tl.trans(v_a), input_precision=PREC)
        r = tl.dot(v_a, tl.trans(do_c), input_precision=PREC)          # v_i . do_j
        r_diag = tl.dot(v_a, tl.trans(do_a), input_precision=PREC)
        dq_f = _decay_one_direction(gf_c, gf_a, lower, h_f, do_a, p, p_diag, k_c, k_a, a,
                                    False, False, BT, BC, PREC) * mul
        dq_b = _decay_one_direction(gb_c, gb_a, upper, h_b, do_a, p, p_diag, k_c, k_a, a,
                                    True, False, BT, BC, PREC) * mul
        dk_f = _decay_one_direction(gf_c, gf_a, upper, d_f, v_a, r, r_diag, q_c, q_a, a,
                                    True, True, BT, BC, PREC) * mul
        dk_b = _decay_one_direction(gb_c, gb_a, lower, d_b, v_a, r, r_diag, q_c, q_a, a,
                                    False, True, BT, BC, PREC) * mul
        # d(log-decay)_t = q_t dq_t - k_t dk_t per scan; dg_fwd is its suffix sum, dg_bwd its prefix sum
        dlog_f = q_a * dq_f - k_a * dk_f
        dlog_b = q_a * dq_b - k_a * dk_b
        grad_f = (beyond_f - done_f)[None, :] - _scan(dlog_f, True, False)
        grad_b = (before_b + done_b)[None, :] + _scan(dlog_b, True, True)
        done_f += tl.sum(dlog_f, 0)
        done_b += tl.sum(dlog_b, 0)
        mask = ((t0 + rows) < N)[:, None] & (cols < K)[None, :]
        offs = out_base + (t0 + rows)[:, None] * (H * K) + cols[None, :]
        tl.store(dq + offs, (dq_f + dq_b).to(dq.dtype.element_ty), mask=mask)
        tl.store(dk + offs, (dk_f + dk_b).to(dk.dtype.element_ty), mask=mask)
        # gates below the clamp get no gradient, as through torch.clamp
        tl.store(dgf + offs, tl.where(raw_f >= -FLOOR, grad_f, 0.0).to(dgf.dtype.element_ty), mask=mask)
        tl.store(dgb + offs, tl.where(raw_b >= -FLOOR, grad_b, 0.0).to(dgb.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
# The state pass takes big tiles under Triton's CPU interpreter (less Python overhead per element)
# and small ones when compiled (registers, and programs to fill a GPU at batch 1).
_INTERPRETED = not isinstance(_pass_states_kernel, triton.runtime.JITFunction)


def _check_supported(q: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor) -> None:
    K, V = q.shape[-1], v.shape[-1]
    for name, dim in (("K", K), ("V", V)):
        if dim not in TRITON_HEAD_DIMS:
            raise ValueError(f"backend='triton' supports head dims K, V in {TRITON_HEAD_DIMS}; "
                             f"got {name}={dim} (use backend='torch' for other sizes)")
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    for name, t in (("q", q), ("g_fwd", g_fwd), ("g_bwd", g_bwd)):
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"backend='triton' supports {name} dtypes {tuple(names.values())}; "
                             f"got {t.dtype} (use backend='torch')")


def _block_k(K: int, kernel: str) -> int:
    """K tile: 16 for the output kernel, 32 elsewhere (what keeps sm_90 register spills lowest)."""
    return min(K, 16 if kernel == "output" else 32)


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _num_warps(K: int, V: int) -> int:
    return 8 if K * V >= 2048 else 4


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _strides(*tensors: torch.Tensor):
    return [s for t in tensors for s in t.stride()]


def _chunk_states(q, k, v, do, g_fwd, g_bwd):
    """fp32 (B*H, streams, chunks, K, V): the state leaving each chunk, per stream; the gradient
    streams 2 and 3 only when ``do`` is given."""
    B, N, H, K = q.shape
    V = v.shape[-1]
    NC = triton.cdiv(N, CHUNK)
    NS = 2 if do is None else 4
    BK = _block_k(K, "states")
    st = torch.empty(B * H, NS, NC, K, V, device=q.device, dtype=torch.float32)
    tot = torch.empty(B * H, 2, NC, K, device=q.device, dtype=torch.float32)
    do = v if do is None else do            # unread with two streams
    _chunk_states_kernel[(NC, B * H, K // BK)](
        k, v, q, do, g_fwd, g_bwd, st, tot, *_strides(k, v, q, do, g_fwd, g_bwd), N, H, NC,
        NS=NS, K=K, V=V, BT=CHUNK, BK=BK, FLOOR=GATE_FLOOR, PREC=_precision(q.dtype),
        num_warps=_num_warps(K, V))
    block = min(K * V, 2048) if _INTERPRETED else 64
    _pass_states_kernel[(B * H * NS, triton.cdiv(K * V, block))](
        st, tot, NC, NS=NS, K=K, V=V, BLOCK=block, CG=STATE_GROUP)
    return st


def _output(x, y, z, g_fwd, g_bwd, st, out, mul: float, streams: Tuple[int, int], forward_output: bool):
    """The chunk output kernel: o from (q, k, v) and the scans' states if forward_output, else dv
    from (k, q, do) and the gradient states."""
    B, N, H, K = x.shape
    V = z.shape[-1]
    NC = triton.cdiv(N, CHUNK)
    _chunk_output_kernel[(NC, B * H)](
        x, y, z, g_fwd, g_bwd, st, out, *_strides(x, y, z, g_fwd, g_bwd, out), N, H, NC, mul,
        NS=st.shape[1], SI_F=streams[0], SI_B=streams[1], RIGHT_F=not forward_output,
        ROW_EXCL=not forward_output, K=K, V=V, BT=CHUNK, BC=SUB, BK=_block_k(K, "output"), FLOOR=GATE_FLOOR,
        PREC=_precision(x.dtype), num_warps=_num_warps(K, V))


def _forward(q, k, v, g_fwd, g_bwd, scale: float) -> torch.Tensor:
    B, N, H, _ = q.shape
    o = torch.empty(B, N, H, v.shape[-1], device=q.device, dtype=q.dtype)
    with _device_guard(q):
        st = _chunk_states(q, k, v, None, g_fwd, g_bwd)
        _output(q, k, v, g_fwd, g_bwd, st, o, 0.5 * scale, (_H_FWD, _H_BWD), forward_output=True)
    return o


def _backward(do, q, k, v, g_fwd, g_bwd, scale: float):
    B, N, H, K = q.shape
    V = v.shape[-1]
    NC = triton.cdiv(N, CHUNK)
    BK = _block_k(K, "dqk")
    mul = 0.5 * scale
    dq = torch.empty(B, N, H, K, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, N, H, K, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, N, H, V, device=q.device, dtype=v.dtype)
    dgf = torch.empty(B, N, H, K, device=q.device, dtype=g_fwd.dtype)
    dgb = torch.empty(B, N, H, K, device=q.device, dtype=g_bwd.dtype)
    with _device_guard(q):
        st = _chunk_states(q, k, v, do, g_fwd, g_bwd)
        _chunk_dqk_kernel[(NC, B * H, K // BK)](
            q, k, v, do, g_fwd, g_bwd, st, dq, dk, dgf, dgb, *_strides(q, k, v, do, g_fwd, g_bwd),
            N, H, NC, mul, K=K, V=V, BT=CHUNK, BC=SUB, BK=BK, FLOOR=GATE_FLOOR, PREC=_precision(q.dtype),
            num_warps=_num_warps(K, V))
        # dv_j = sum_t (k_j . decay_jt . q_t) do_t: the output kernel with (x, y, z) = (k, q, do)
        _output(k, q, do, g_fwd, g_bwd, st, dv, mul, (_D_FWD, _D_BWD), forward_output=False)
    return dq, dk, dv, dgf, dgb


@torch.library.custom_op("visionlin::bidirectional_gla_triton", mutates_args=())
def _gla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
            scale: float) -> torch.Tensor:
    return _forward(q, k, v, g_fwd, g_bwd, scale)


@_gla_op.register_fake
def _(q, k, v, g_fwd, g_bwd, scale):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("visionlin::bidirectional_gla_triton_backward", mutates_args=())
def _gla_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     g_fwd: torch.Tensor, g_bwd: torch.Tensor, scale: float
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, g_fwd, g_bwd, scale)


@_gla_backward_op.register_fake
def _(do, q, k, v, g_fwd, g_bwd, scale):
    shape = q.shape
    return (q.new_empty(shape), k.new_empty(shape), v.new_empty(v.shape), g_fwd.new_empty(shape),
            g_bwd.new_empty(shape))


def _setup_context(ctx, inputs, output):
    q, k, v, g_fwd, g_bwd, scale = inputs
    ctx.save_for_backward(q, k, v, g_fwd, g_bwd)
    ctx.scale = scale


def _gla_autograd(ctx, grad_o):
    q, k, v, g_fwd, g_bwd = ctx.saved_tensors
    return (*_gla_backward_op(grad_o, q, k, v, g_fwd, g_bwd, ctx.scale), None)


_gla_op.register_autograd(_gla_autograd, setup_context=_setup_context)


def triton_bidirectional_gla(q, k, v, g_fwd, g_bwd, scale: float) -> torch.Tensor:
    """Inputs (B, N, H, K|V), validated by ``bidirectional_gla``; returns o (B, N, H, V) in q's dtype."""
    _check_supported(q, v, g_fwd, g_bwd)
    return _gla_op(q, k, v, g_fwd, g_bwd, float(scale))
