"""Fused CPU path of the selective scans: a serial recurrence in compiled C, vectorised over channels
(and of ``bidirectional_conv1d_silu``, Vim's two depthwise convs + SiLU in one pass over the tokens, with
each direction's x_proj applied to every block of 8 rows while it is in L1, by a register tile).

The chunked PyTorch path (``chunk.py``) is bounded by memory traffic: it materialises a dozen
(b, d, n, l) tensors, ~100 MB each for Vim-T at 1024^2 (l = 4097, d = 384, n = 16). This path keeps
the (VB channels x n states) state block in registers / L1 and streams each token once:

    for each (batch, block of VB channels), for each route, for each token t in the route's order:
        a = exp(clamp(delta_t A, +-30)); h = a h + delta_t u_t B_t; y_t += (<h, C_t> + D u_t) silu(z_t)

With a delta projection (Mamba's dt_proj, ``delta_proj_weight``) delta_t = W_r dt_t is formed per token
from the rank-wide dt_t and the (rank x VB) weight block kept in L1, so no (b, R, l, d) delta is stored.
Inputs are laid out token-major, (b, [R,] l, d), so a channel block is one contiguous vector load;
routes read tokens by index arithmetic (no flipped / transposed copies), and their input u by a route
stride (0 when u is shared). The library is built once per machine with the system C compiler
(``cc -O3 -march=native -ffast-math -fopenmp``) into ``~/.cache/visionlin`` (override with
``VISIONLIN_CACHE``) and called through ctypes, which drops the GIL. Channel blocks (token rows for
the conv) run in parallel in ``torch.get_num_threads()`` parts on PyTorch's own OpenMP threads: built
by GCC, the library's libgomp dependency resolves to the libgomp PyTorch already loaded, so no second
thread pool competes with PyTorch's workers, which spin-wait for a while after every op (a separate
pool lost ~40% of the scan's time to them). A compiler without OpenMP builds it without, and a Python
thread pool runs the parts.
Where no compiler is available ``auto`` silently keeps the PyTorch path.

Forward only in C: gradients come from the PyTorch paths, recomputed in backward (CPU training is
rare and this keeps one differentiable implementation to trust). Each entry point is a ``torch.library``
custom op (``visionlin::selective_scan_cpu``, ``cross_selective_scan_cpu``, ``bidirectional_conv1d_silu_cpu``)
with a fake implementation, so torch.compile and torch.export see one opaque node and never the ctypes
calls; its backward is a custom op too (``*_backward``), which reruns the PyTorch path under autograd. float32 compute; 16-bit inputs are
upcast, float64 inputs stay on the PyTorch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .chunk import GATE_CLAMP, chunk_cross_selective_scan, chunk_selective_scan, project_delta
from .conv import torch_bidirectional_conv1d_silu

VB = 32  # channels per block: two AVX-512 vectors of float32, four AVX2 vectors
PROJ_COLS = 48  # projection columns per register tile (three 16-float vectors); weights are padded to a multiple

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define VB %(VB)d
/* projection tile: TB tokens x PG vectors of 16 columns, TB PG accumulators in registers (24 of the 32
   AVX-512 registers; fewer tokens where vectors are narrower or registers fewer) */
#ifdef __AVX512F__
#define TB 8
#else
#define TB 2
#endif
#define PG (%(PROJ_COLS)d / 16)  /* projection columns per tile, in 16-float vectors */
#define CLAMP %(CLAMP)ff
#define LOG2E 1.4426950408889634f

/* 2^t for |t| <= CLAMP log2(e): 2^f 2^i with i = rint(t), f in [-1/2, 1/2]; 2^f by a degree-5
   polynomial (least squares on Chebyshev nodes, reweighted toward minimax: max relative error 2.4e-7 in
   float32, i.e. ~4 ulp, on par with the ex2.approx instruction Mamba's CUDA kernel uses), 2^i added to
   its exponent bits (an integer add, no multiply). Inlines and vectorises, unlike a libm call. */
static inline float exp2_clamped(float t) {
    const float i = rintf(t);
    const float f = t - i;
    float p = 1.3276471291e-3f;
    p = p * f + 9.6755409613e-3f; p = p * f + 5.5507130921e-2f; p = p * f + 2.4022120237e-1f;
    p = p * f + 6.9314694405e-1f; p = p * f + 1.0000001192f;
    union { float f; int32_t i; } q;
    q.f = p;
    q.i += (int32_t)i << 23;
    return q.f;
}

/* exp(x) for |x| <= CLAMP */
static inline float exp_clamped(float x) { return exp2_clamped(x * LOG2E); }

/* spatial (raster) index of the token scanned at step i in order k (0 raster, 1 column-major, 2 and 3
   reversed) on an H x W grid */
static inline int64_t route_pos(int64_t i, int64_t k, int64_t H, int64_t W, int64_t L) {
    int64_t j = k >= 2 ? L - 1 - i : i;
    return (k & 1) ? (j %% H) * W + j / H : j;
}

/* log(1 + e) for e in [0, 1]: e q(e), q a degree-8 polynomial fitted to log1p(e) / e (max relative
   error 2.1e-7 in float32); no division */
static inline float log1p_unit(float e) {
    float p = 5.1058256067e-3f;
    p = p * e - 2.8991956264e-2f; p = p * e + 7.7380739152e-2f; p = p * e - 1.3590599597e-1f;
    p = p * e + 1.9071309268e-1f; p = p * e - 2.4833945930e-1f; p = p * e + 3.3317935467e-1f;
    p = p * e - 4.9999436736e-1f; p = p * e + 9.9999994040e-1f;
    return e * p;
}

/* Strides, in elements, of the inputs (st[]): u (b, r, t, c) (U_R = 0: shared by the routes),
   delta (b, r, t, c) (with a delta projection: its low-rank input, (b, r, t, q)), B (b, r, t, n),
   C (b, r, t, n), z (b, t, c). Tokens t index the raster (row-major)
   grid. out is (b, L, d) contiguous. */
enum { U_B, U_R, U_T, U_C, D_B, D_R, D_T, D_C, B_B, B_R, B_T, B_N, C_B, C_R, C_T, C_N, Z_B, Z_T, Z_C, N_STRIDES };

/* One block of nv <= VB channels from c0, every route, every token. Its inputs are gathered into
   VB-wide local arrays (zero padded), so the n-state update is a fixed-width vector loop whatever the
   input layouts; the state block (n x VB) stays in L1. ``fast`` (a full block, unit channel strides)
   is a compile-time constant in each inlined copy: its gathers become plain vector loads. With a
   delta projection (rank > 0, Wdt (R, d, rank)), delta_t = Wdt_r dt_t is formed per token from the
   rank-wide input dt_t (Mamba's dt_proj, fused: no (b, R, L, d) delta in memory). */
static inline __attribute__((always_inline)) void block(const int fast, const float *u, const float *delta,
                  const float *bias, const float *A, const float *Bm,
                  const float *Cm, const float *D, const float *z, const float *Wdt, float *out, float *last, float *h,
                  const int64_t *st, int64_t softplus, int64_t nv, int64_t c0, int64_t d, int64_t n, int64_t rank,
                  int64_t H, int64_t W, int64_t R, int64_t bi) {
    const int64_t L = H * W;
    float *Ab = h + n * VB;                                   /* this route's A block, (n, VB) */
    float *Wb = Ab + n * VB;                                  /* and its delta projection, (rank, VB) */
    for (int64_t r = 0; r < R; r++) {
        const int64_t order = r * (4 / R);                    /* R = 2: raster and reversed raster */
        const float *ur = u + bi * st[U_B] + r * st[U_R] + c0 * st[U_C];
        const float *dr = delta + bi * st[D_B] + r * st[D_R] + (rank ? 0 : c0 * st[D_C]);
        const float *Br = Bm + bi * st[B_B] + r * st[B_R], *Cr = Cm + bi * st[C_B] + r * st[C_R];
        const float *zr = z ? z + bi * st[Z_B] + c0 * st[Z_C] : 0;
        float Dv[VB], bv[VB];
        for (int64_t j = 0; j < VB; j++) {
            Dv[j] = (D && j < nv) ? D[r * d + c0 + j] : 0.f;
            bv[j] = (bias && j < nv) ? bias[r * d + c0 + j] : 0.f;
        }
        for (int64_t k = 0; k < n; k++)                       /* A: (R, n, d), kept as A log2(e) */
            for (int64_t j = 0; j < VB; j++) Ab[k * VB + j] = j < nv ? A[(r * n + k) * d + c0 + j] * LOG2E : 0.f;
        for (int64_t q = 0; q < rank; q++)                    /* Wdt: (R, d, rank) */
            for (int64_t j = 0; j < VB; j++) Wb[q * VB + j] = j < nv ? Wdt[(r * d + c0 + j) * rank + q] : 0.f;
        for (int64_t k = 0; k < n * VB; k++) h[k] = 0.f;
        for (int64_t i = 0; i < L; i++) {
            const int64_t p = route_pos(i, order, H, W, L);
            const float *dt = dr + p * st[D_T], *ut = ur + p * st[U_T];
            const float *Bt = Br + p * st[B_T], *Ct = Cr + p * st[C_T];
            float dtv[VB], uv[VB], du[VB], y[VB];
            if (fast) for (int64_t j = 0; j < VB; j++) uv[j] = ut[j];
            else for (int64_t j = 0; j < VB; j++) uv[j] = j < nv ? ut[j * st[U_C]] : 0.f;
            if (rank) {                                /* delta = Wdt dt + bias */
                for (int64_t j = 0; j < VB; j++) dtv[j] = bv[j];
                for (int64_t q = 0; q < rank; q++) {
                    const float dq = dt[q * st[D_C]];
                    #pragma omp simd
                    for (int64_t j = 0; j < VB; j++) dtv[j] += Wb[q * VB + j] * dq;
                }
            } else if (fast) {
                for (int64_t j = 0; j < VB; j++) dtv[j] = dt[j] + bv[j];
            } else {
                for (int64_t j = 0; j < VB; j++) dtv[j] = (j < nv ? dt[j * st[D_C]] : 0.f) + bv[j];
            }
            if (softplus)                          /* max(x, 0) + log(1 + exp(-|x|)); padded lanes unused */
                #pragma omp simd
                for (int64_t j = 0; j < VB; j++)
                    dtv[j] = fmaxf(dtv[j], 0.f) + log1p_unit(exp_clamped(fmaxf(-fabsf(dtv[j]), -CLAMP)));
            for (int64_t j = 0; j < VB; j++) {
                du[j] = dtv[j] * uv[j];
                y[j] = Dv[j] * uv[j];
            }
            for (int64_t k = 0; k < n; k++) {
                const float bk = Bt[k * st[B_N]], ck = Ct[k * st[C_N]];
                const float *restrict Ak = Ab + k * VB;
                float *restrict hk = h + k * VB;
                #pragma omp simd
                for (int64_t j = 0; j < VB; j++) {
                    /* exp(clamp(delta A, +-CLAMP)) = 2^clamp(delta A log2(e), +-CLAMP log2(e)) */
                    const float t = fminf(fmaxf(dtv[j] * Ak[j], -CLAMP * LOG2E), CLAMP * LOG2E);
                    const float hj = exp2_clamped(t) * hk[j] + du[j] * bk;
                    hk[j] = hj;
                    y[j] += hj * ck;
                }
            }
            if (z) {                                   /* y *= silu(z) */
                const float *zt = zr + p * st[Z_T];
                float zv[VB];
                if (fast) for (int64_t j = 0; j < VB; j++) zv[j] = zt[j];
                else for (int64_t j = 0; j < VB; j++) zv[j] = j < nv ? zt[j * st[Z_C]] : 0.f;
                #pragma omp simd
                for (int64_t j = 0; j < VB; j++)
                    y[j] *= zv[j] / (1.f + exp_clamped(fminf(fmaxf(-zv[j], -CLAMP), CLAMP)));
            }
            float *restrict o = out + (bi * L + p) * d + c0;    /* the first route stores, the others add */
            if (r == 0) for (int64_t j = 0; j < nv; j++) o[j] = y[j];
            else for (int64_t j = 0; j < nv; j++) o[j] += y[j];
        }
        if (last)                                            /* last state: (b, d, n), one route */
            for (int64_t j = 0; j < nv; j++)
                for (int64_t k = 0; k < n; k++) last[(bi * d + c0 + j) * n + k] = h[k * VB + j];
    }
}

/* Work split: items [0, total) in ``parts`` equal parts; a call runs parts [p0, p1). Built with OpenMP, a
   call for all parts runs on ``parts`` of the process' OpenMP threads, which are PyTorch's own (the loader
   shares the libgomp PyTorch loaded): no second thread pool competing with PyTorch's spin-waiting
   workers; the items are handed out dynamically. Without OpenMP the caller runs each part on a thread
   of its own. */
int has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Item q of the flattened (batch, channel block) range on work row h */
static void scan_item(const float *u, const float *delta, const float *bias, const float *A, const float *Bm,
                      const float *Cm, const float *D, const float *z, const float *Wdt, float *out, float *last,
                      float *h, const int64_t *st, int64_t softplus, int64_t d, int64_t n, int64_t rank, int64_t H,
                      int64_t W, int64_t R, int64_t q) {
    const int64_t nblk = (d + VB - 1) / VB;
    const int64_t c0 = (q %% nblk) * VB, nv = d - c0 < VB ? d - c0 : VB;
    if (nv == VB && st[U_C] == 1 && (rank || st[D_C] == 1) && (!z || st[Z_C] == 1))
        block(1, u, delta, bias, A, Bm, Cm, D, z, Wdt, out, last, h, st, softplus, nv, c0, d, n, rank, H, W, R,
              q / nblk);
    else
        block(0, u, delta, bias, A, Bm, Cm, D, z, Wdt, out, last, h, st, softplus, nv, c0, d, n, rank, H, W, R,
              q / nblk);
}

/* items: the flattened (batch, channel block) range, total = b * ceil(d / VB); part p uses work row
   work + (2 n + rank) VB p. A call for all parts on OpenMP threads hands out the items one at a time
   (dynamic schedule: a thread slowed down by the machine leaves its remaining blocks to the others). */
void scan_fwd(const float *u, const float *delta, const float *bias, const float *A, const float *Bm,
              const float *Cm, const float *D, const float *z, const float *Wdt, float *out, float *last,
              float *work, const int64_t *st, int64_t softplus, int64_t d, int64_t n, int64_t rank, int64_t H,
              int64_t W, int64_t R, int64_t total, int64_t parts, int64_t p0, int64_t p1) {
    const int64_t row = (2 * n + rank) * VB;
#ifdef _OPENMP
    if (p0 == 0 && p1 == parts) {
        #pragma omp parallel num_threads(parts)
        {
            float *h = work + row * omp_get_thread_num();
            #pragma omp for schedule(dynamic, 1)
            for (int64_t q = 0; q < total; q++)
                scan_item(u, delta, bias, A, Bm, Cm, D, z, Wdt, out, last, h, st, softplus, d, n, rank, H, W, R, q);
        }
        return;
    }
#endif
    for (int64_t p = p0; p < p1; p++)          /* without OpenMP: this call's parts, on the caller's thread */
        for (int64_t q = total * p / parts; q < total * (p + 1) / parts; q++)
            scan_item(u, delta, bias, A, Bm, Cm, D, z, Wdt, out, last, work + row * p, st, softplus, d, n, rank, H, W,
                      R, q);
}

static inline float silu(float v) { return v / (1.f + exp_clamped(fminf(fmaxf(-v, -CLAMP), CLAMP))); }

/* Route r of token row t of the bidirectional depthwise conv + SiLU: route 0 = silu(b_0 + sum_k w_0[k] x[t-(K-1)+k]),
   route 1 = silu(b_1 + sum_k w_1[k] x[t+(K-1)-k]), zero padded, into o (d floats). x (b, l, d) with strides
   xs (in elements), w (2, K, d) and bias (2, d) contiguous. ``unit`` (unit channel stride) is a
   compile-time constant in each inlined copy, so that the channel loops are plain vector loops. */
static inline __attribute__((always_inline)) void conv_row(const int unit, const float *x, const float *w,
                  const float *bias, float *restrict o, const int64_t *xs, int64_t bi, int64_t t, int64_t r,
                  int64_t l, int64_t d, int64_t K) {
    for (int64_t c = 0; c < d; c++) o[c] = bias ? bias[r * d + c] : 0.f;
    for (int64_t k = 0; k < K; k++) {
        const int64_t s = r == 0 ? t - (K - 1) + k : t + (K - 1) - k;
        if (s < 0 || s >= l) continue;                       /* zero padding */
        const float *restrict xk = x + bi * xs[0] + s * xs[1];
        const float *restrict wk = w + (r * K + k) * d;
        if (unit)
            #pragma omp simd
            for (int64_t c = 0; c < d; c++) o[c] += wk[c] * xk[c];
        else
            for (int64_t c = 0; c < d; c++) o[c] += wk[c] * xk[c * xs[2]];
    }
    #pragma omp simd
    for (int64_t c = 0; c < d; c++) o[c] = silu(o[c]);
}

/* The per-route projection (Vim's x_proj) of TB conv output rows, fused so that the rows are read back
   from L1: columns [g, g + 16 PG) of proj rows i < nt, proj[i] = Wt_r^T u[i]. u rows at stride us,
   Wt (d, NP) (the route's weight, transposed and zero padded to NP columns), o rows at stride os with
   N columns. A register tile: TB x PG vectors of 16 float32 accumulators (GNU vector extensions, lowered
   to the machine's SIMD width); per k, PG weight vectors and TB broadcasts of u. */
typedef float vec16 __attribute__((vector_size(64)));
static inline void proj_tile(const float *u, int64_t us, const float *Wt, float *o, int64_t os, int64_t nt,
                             int64_t d, int64_t NP, int64_t g, int64_t N) {
    vec16 acc[TB][PG];
    for (int i = 0; i < TB; i++)
        for (int p = 0; p < PG; p++) acc[i][p] = (vec16){0};
    for (int64_t k = 0; k < d; k++) {
        vec16 wv[PG];
        for (int p = 0; p < PG; p++) memcpy(&wv[p], Wt + k * NP + g + 16 * p, sizeof(vec16));
        #pragma GCC unroll 8
        for (int i = 0; i < TB; i++) {
            const float s = i < nt ? u[i * us + k] : 0.f;
            for (int p = 0; p < PG; p++) acc[i][p] += s * wv[p];
        }
    }
    const int64_t m = N - g < 16 * PG ? N - g : 16 * PG;
    for (int64_t i = 0; i < nt; i++) {
        float row[16 * PG];
        memcpy(row, acc[i], sizeof(row));
        for (int64_t j = 0; j < m; j++) o[i * os + g + j] = row[j];
    }
}

/* Item q of the flattened (batch, block of TB tokens) range: the block's conv rows of both routes into
   out (b, l, 2, d) contiguous; with Wt (2, d, NP) also their projections into proj (b, l, 2, N). */
static void conv_item(const float *x, const float *w, const float *bias, const float *Wt, float *out, float *proj,
                      const int64_t *xs, int64_t l, int64_t d, int64_t K, int64_t N, int64_t NP, int64_t q) {
    const int64_t nb = (l + TB - 1) / TB, t0 = (q %% nb) * TB, bi = q / nb;
    const int64_t nt = l - t0 < TB ? l - t0 : TB;
    float *u = out + (bi * l + t0) * 2 * d;                   /* route r of row i at u + (2 i + r) d */
    for (int64_t i = 0; i < nt; i++)
        for (int64_t r = 0; r < 2; r++) {
            if (xs[2] == 1) conv_row(1, x, w, bias, u + (2 * i + r) * d, xs, bi, t0 + i, r, l, d, K);
            else conv_row(0, x, w, bias, u + (2 * i + r) * d, xs, bi, t0 + i, r, l, d, K);
        }
    if (Wt)
        for (int64_t r = 0; r < 2; r++)
            for (int64_t g = 0; g < NP; g += 16 * PG)
                proj_tile(u + r * d, 2 * d, Wt + r * d * NP, proj + ((bi * l + t0) * 2 + r) * N, 2 * N, nt, d, NP,
                          g, N);
}

int64_t conv_tokens_per_item(void) { return TB; }

/* items: the flattened (batch, token block) range, total = b ceil(l / TB); on OpenMP threads in dynamic
   chunks of 8 items */
void conv_fwd(const float *x, const float *w, const float *bias, const float *Wt, float *out, float *proj,
              const int64_t *xs, int64_t l, int64_t d, int64_t K, int64_t N, int64_t NP, int64_t total,
              int64_t parts, int64_t p0, int64_t p1) {
#ifdef _OPENMP
    if (p0 == 0 && p1 == parts) {
        #pragma omp parallel for num_threads(parts) schedule(dynamic, 8)
        for (int64_t q = 0; q < total; q++) conv_item(x, w, bias, Wt, out, proj, xs, l, d, K, N, NP, q);
        return;
    }
#endif
    for (int64_t p = p0; p < p1; p++)
        for (int64_t q = total * p / parts; q < total * (p + 1) / parts; q++)
            conv_item(x, w, bias, Wt, out, proj, xs, l, d, K, N, NP, q);
}
"""

_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11"]
_OPENMP = "-fopenmp"  # used where the compiler has it
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_load_error: Optional[str] = None
_pool: Optional[ThreadPoolExecutor] = None


def _cache_dir() -> Path:
    return Path(os.environ.get("VISIONLIN_CACHE", Path.home() / ".cache" / "visionlin")) / "cpu_kernels"


def _machine_tag() -> str:
    """What -march=native depends on: the architecture and the CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _build() -> ctypes.CDLL:
    source = _SOURCE % dict(VB=VB, CLAMP=GATE_CLAMP, PROJ_COLS=PROJ_COLS)
    compiler = shlex.split(os.environ.get("CC", "")) or [c for c in ("cc", "gcc", "clang") if shutil.which(c)][:1]
    if not compiler or shutil.which(compiler[0]) is None:
        raise RuntimeError(f"no C compiler found (CC={os.environ.get('CC', '')!r}; cc, gcc, clang not on PATH)")
    errors = []
    for flags in ([*_FLAGS, _OPENMP], _FLAGS):
        key = hashlib.sha256("\0".join([source, *compiler, *flags, _machine_tag()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"selective_scan_{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src = Path(tmp) / "scan.c"
                src.write_text(source)
                built = Path(tmp) / target.name
                proc = subprocess.run([*compiler, *flags, str(src), "-o", str(built), "-lm"], capture_output=True,
                                      text=True)
                if proc.returncode != 0:
                    errors.append(proc.stderr[-2000:])
                    continue
                os.replace(built, target)  # atomic: concurrent builders never see a half-written library
        lib = ctypes.CDLL(str(target))
        lib.has_openmp.restype = ctypes.c_int
        lib.scan_fwd.restype = None
        lib.scan_fwd.argtypes = [ctypes.c_void_p] * 13 + [ctypes.c_int64] * 11
        lib.conv_fwd.restype = None
        lib.conv_fwd.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 9
        lib.conv_tokens_per_item.restype = ctypes.c_int64
        return lib
    raise RuntimeError(f"{compiler[0]} failed to build the CPU scan kernel:\n{errors[-1]}")


@torch.compiler.assume_constant_result
def cpu_kernel_available() -> bool:
    """True when the compiled CPU scan is (or can be) built on this machine; builds it on first call.
    A constant to torch.compile (it builds, or reads the cached answer, while the graph is traced)."""
    global _lib, _load_error
    with _lock:
        if _lib is None and _load_error is None:
            try:
                _lib = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _load_error = str(e)
    return _lib is not None


def cpu_supports(*tensors: Optional[torch.Tensor]) -> bool:
    """The compiled path takes CPU tensors in float32/16/bf16 (float64 stays on the exact PyTorch path)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype != torch.float64) for t in tensors)


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _f32(t: Optional[torch.Tensor], contiguous: bool = False) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.detach().float()
    return t.contiguous() if contiguous else t


def _parallel(fn, args, total: int) -> None:
    """fn(*args, total, parts, p0, p1) (a kernel of the library) over items [0, total) in
    torch.get_num_threads() parts: one call on the OpenMP threads PyTorch uses where the library has
    OpenMP, else one call per part on a thread pool (ctypes drops the GIL)."""
    global _pool
    parts = max(1, min(torch.get_num_threads(), total))
    if parts == 1 or _lib.has_openmp():
        fn(*args, total, parts, 0, parts)
        return
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="visionlin-scan")
    list(_pool.map(lambda p: fn(*args, total, parts, p, p + 1), range(parts)))


def _require_kernel() -> None:
    if not cpu_kernel_available():
        raise RuntimeError(f"the compiled CPU scan is unavailable: {_load_error}")


def _run(u, delta, delta_bias, delta_softplus, A, B, C, D, z, R, H, W, last_state, delta_proj_weight=None):
    """u (b, 1 or R, L, d) (one input shared by the routes, or one per route), delta (b, R, L, d) (or,
    with delta_proj_weight (R, d, rank), the low-rank (b, R, L, rank)), B/C (b, R, L, n), z (b, L, d) or
    None: any strides (read in place); delta_bias (R, d), A (R, n, d), D (R, d), delta_proj_weight: made
    contiguous. Returns out (b, L, d), contiguous; fills last_state (b, d, n) when given."""
    _require_kernel()
    u, delta, B, C, z = (_f32(t) for t in (u, delta, B, C, z))
    delta_bias, A, D, Wdt = (_f32(t, contiguous=True) for t in (delta_bias, A, D, delta_proj_weight))
    b, L, d = u.shape[0], u.shape[2], u.shape[3]
    n, rank = A.shape[1], 0 if Wdt is None else Wdt.shape[-1]
    out = torch.empty(b, L, d, dtype=torch.float32)
    su = u.stride()
    strides = torch.tensor([su[0], su[1] if u.shape[1] > 1 else 0, su[2], su[3], *delta.stride(), *B.stride(),
                            *C.stride(), *(z.stride() if z is not None else (0, 0, 0))], dtype=torch.int64)
    total = b * -(-d // VB)
    work = torch.empty(min(torch.get_num_threads(), total), (2 * n + rank) * VB, dtype=torch.float32)  # a row per part
    args = [_ptr(t) for t in (u, delta, delta_bias, A, B, C, D, z, Wdt, out, last_state, work, strides)]
    _parallel(_lib.scan_fwd, [*args, int(delta_softplus), d, n, rank, H, W, R], total)
    return out


def _conv(x, weight, bias, proj_weight=None):
    """x (b, l, d) any strides (read in place), weight (2, d, K), bias (2, d) or None, proj_weight (2, N, d) or
    None -> u (b, l, 2, d) float32 and, with proj_weight, its per-route projection (b, l, 2, N) float32
    (else None); both contiguous."""
    _require_kernel()
    x = _f32(x)
    wt, bias = _f32(weight.transpose(1, 2), contiguous=True), _f32(bias, contiguous=True)   # wt: (2, K, d)
    b, l, d = x.shape
    out = torch.empty(b, l, 2, d, dtype=torch.float32)
    N, Wt, proj = 0, None, None
    if proj_weight is not None:           # (2, d, NP): transposed, columns zero padded to whole tiles
        N = proj_weight.shape[1]
        Wt = torch.zeros(2, d, -(-N // PROJ_COLS) * PROJ_COLS, dtype=torch.float32)
        Wt[:, :, :N] = proj_weight.detach().transpose(1, 2)
        proj = torch.empty(b, l, 2, N, dtype=torch.float32)
    strides = torch.tensor(x.stride(), dtype=torch.int64)
    tb = _lib.conv_tokens_per_item()
    args = [*(_ptr(t) for t in (x, wt, bias, Wt, out, proj, strides)), l, d, weight.shape[2], N,
            0 if Wt is None else Wt.shape[2]]
    _parallel(_lib.conv_fwd, args, b * -(-l // tb))
    return out, proj


def _recomputed_grads(fn, inputs, douts, *extra) -> List[torch.Tensor]:
    """Backward of a compiled forward: rerun the PyTorch path ``fn(*inputs, *extra)`` with autograd and
    differentiate it by ``douts`` (one per output of fn; None for an output without gradient). One gradient per
    input, in order: zeros where the outputs do not depend on it, an empty tensor for an absent (None) input
    (custom ops return tensors only).

    Called inside a custom op, where the dispatcher has switched autograd off for this thread (the op's own
    autograd formula is the one registered): the recomputation runs on a fresh thread, whose dispatch state is
    the default one, and this thread waits for it."""
    result = {}

    def recompute():
        try:
            leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
            ys = fn(*leaves, *extra)
            ys = ys if isinstance(ys, tuple) else (ys,)
            pairs = [(y, g) for y, g in zip(ys, douts) if g is not None and y.requires_grad]
            present = [t for t in leaves if t is not None]
            grads = (torch.autograd.grad([y for y, _ in pairs], present, [g for _, g in pairs], allow_unused=True)
                     if pairs else [None] * len(present))
            result["grads"] = iter(grads)
            result["leaves"] = leaves
        except BaseException as e:  # re-raised on the caller's thread
            result["error"] = e

    worker = threading.Thread(target=recompute, name="visionlin-cpu-backward")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    out = []
    for t in result["leaves"]:
        g = None if t is None else next(result["grads"])
        # contiguous, as the fake implementation says (autograd may hand back an input's strides)
        out.append(inputs[0].new_empty(0) if t is None else (t.new_zeros(t.shape) if g is None else g.contiguous()))
    return out


def _fake_grads(inputs) -> List[torch.Tensor]:
    return [inputs[0].new_empty(0) if t is None else t.new_empty(t.shape) for t in inputs]


def _present(grads, inputs) -> list:
    """The custom ops' gradient list back to autograd's: None for absent inputs."""
    return [None if t is None else g for g, t in zip(grads, inputs)]


# ----------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile / torch.export (fake implementations give the
# output metadata), differentiated through a backward op that recomputes the PyTorch path.
# ----------------------------------------------------------------------------------------------
def _selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    b, d, l = u.shape
    n = A.shape[1]
    gB = 1 if B.ndim == 3 else B.shape[1]
    gC = 1 if C.ndim == 3 else C.shape[1]
    G = gB if gB == gC else d  # B and C with different group counts: per-channel groups
    dg = d // G

    def group(M, g):  # group g's (b, n, l) B or C as a (b, 1, l, n) view
        M = M.unsqueeze(1) if M.ndim == 3 else M
        return M[:, g * M.shape[1] // G].transpose(1, 2).unsqueeze(1)

    tokens = lambda t, cs: None if t is None else t[:, cs].transpose(1, 2)  # noqa: E731  (b, l, dg) views
    per_channel = lambda t, cs: None if t is None else t[cs].view(1, -1)  # noqa: E731  (1, dg)
    outs, lasts = [], []
    for g in range(G):  # groups run on their channel slice (one call when ungrouped)
        cs = slice(g * dg, (g + 1) * dg)
        last = torch.zeros(b, dg, n, dtype=torch.float32) if return_last_state else None
        outs.append(_run(tokens(u, cs).unsqueeze(1), tokens(delta, cs).unsqueeze(1), per_channel(delta_bias, cs),
                         delta_softplus, A[cs].t().unsqueeze(0), group(B, g), group(C, g), per_channel(D, cs),
                         tokens(z, cs), 1, 1, l, last))
        lasts.append(last)
    y = (outs[0] if G == 1 else torch.cat(outs, dim=-1)).transpose(1, 2).to(u.dtype)   # (b, d, l), token-major
    if not return_last_state:
        return y, u.new_empty(0, dtype=torch.float32)
    return y, lasts[0] if G == 1 else torch.cat(lasts, dim=1)


@torch.library.custom_op("visionlin::selective_scan_cpu", mutates_args=())
def _ss_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
           delta_softplus: bool, return_last_state: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _selective_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


@_ss_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    b, d, l = u.shape
    last = u.new_empty((b, d, A.shape[1]) if return_last_state else (0,), dtype=torch.float32)
    return u.new_empty(b, l, d).transpose(1, 2), last


@torch.library.custom_op("visionlin::selective_scan_cpu_backward", mutates_args=())
def _ss_backward_op(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                    delta_bias: Optional[torch.Tensor], delta_softplus: bool) -> List[torch.Tensor]:
    return _recomputed_grads(chunk_selective_scan, [u, delta, A, B, C, D, z, delta_bias], [dy], delta_softplus)


@_ss_backward_op.register_fake
def _(dy, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return _fake_grads([u, delta, A, B, C, D, z, delta_bias])


def _ss_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.delta_softplus = inputs[8]


def _ss_backward(ctx, dy, dlast):  # the last state is an output only: its gradient is not propagated
    saved = ctx.saved_tensors
    dy = torch.zeros_like(saved[0]) if dy is None else dy
    return (*_present(_ss_backward_op(dy, *saved, ctx.delta_softplus), saved), None, None)


_ss_op.register_autograd(_ss_backward, setup_context=_ss_setup)


@torch.library.custom_op("visionlin::cross_selective_scan_cpu", mutates_args=())
def _cross_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], z: Optional[torch.Tensor],
              delta_proj_weight: Optional[torch.Tensor], delta_softplus: bool, routes: int) -> torch.Tensor:
    H, W = u.shape[-2:]
    tokens = lambda t: t.flatten(-2).transpose(-1, -2)  # noqa: E731  (..., c, H, W) -> (..., L, c) view
    o = _run(tokens(u if u.ndim == 5 else u.unsqueeze(1)), tokens(delta), delta_bias, delta_softplus,
             A.transpose(1, 2), tokens(B), tokens(C), D, None if z is None else tokens(z), routes, H, W, None,
             delta_proj_weight)
    return o.transpose(1, 2).unflatten(-1, (H, W)).to(u.dtype)


@_cross_op.register_fake
def _(u, delta, A, B, C, D, delta_bias, z, delta_proj_weight, delta_softplus, routes):
    H, W = u.shape[-2:]
    return u.new_empty(u.shape[0], H, W, u.shape[-3]).permute(0, 3, 1, 2)   # channels-last, as the kernel writes


def _chunk_cross(u, delta, A, B, C, D, delta_bias, z, delta_proj_weight, delta_softplus, routes):
    """``chunk_cross_selective_scan`` with the op's argument order."""
    return chunk_cross_selective_scan(u, project_delta(delta, delta_proj_weight), A, B, C, D, delta_bias,
                                      delta_softplus, routes, z)


@torch.library.custom_op("visionlin::cross_selective_scan_cpu_backward", mutates_args=())
def _cross_backward_op(dy: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor, D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                       z: Optional[torch.Tensor], delta_proj_weight: Optional[torch.Tensor], delta_softplus: bool,
                       routes: int) -> List[torch.Tensor]:
    return _recomputed_grads(_chunk_cross, [u, delta, A, B, C, D, delta_bias, z, delta_proj_weight], [dy],
                             delta_softplus, routes)


@_cross_backward_op.register_fake
def _(dy, u, delta, A, B, C, D, delta_bias, z, delta_proj_weight, delta_softplus, routes):
    return _fake_grads([u, delta, A, B, C, D, delta_bias, z, delta_proj_weight])


def _cross_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.delta_softplus, ctx.routes = inputs[9], inputs[10]


def _cross_backward(ctx, dy):
    saved = ctx.saved_tensors
    return (*_present(_cross_backward_op(dy, *saved, ctx.delta_softplus, ctx.routes), saved), None, None)


_cross_op.register_autograd(_cross_backward, setup_context=_cross_setup)


@torch.library.custom_op("visionlin::bidirectional_conv1d_silu_cpu", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             proj_weight: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    u, proj = _conv(x, weight, bias, proj_weight)
    return u.to(x.dtype), (x.new_empty(0) if proj is None else proj.to(x.dtype))


@_conv_op.register_fake
def _(x, weight, bias, proj_weight):
    b, l, d = x.shape
    return x.new_empty(b, l, 2, d), x.new_empty(0 if proj_weight is None else (b, l, 2, proj_weight.shape[1]))


@torch.library.custom_op("visionlin::bidirectional_conv1d_silu_cpu_backward", mutates_args=())
def _conv_backward_op(du: torch.Tensor, dproj: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], proj_weight: Optional[torch.Tensor]) -> List[torch.Tensor]:
    douts = [du] if proj_weight is None else [du, dproj]
    return _recomputed_grads(torch_bidirectional_conv1d_silu, [x, weight, bias, proj_weight], douts)


@_conv_backward_op.register_fake
def _(du, dproj, x, weight, bias, proj_weight):
    return _fake_grads([x, weight, bias, proj_weight])


def _conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, du, dproj):
    saved = ctx.saved_tensors
    x, proj_weight = saved[0], saved[3]
    du = x.new_zeros(x.shape[0], x.shape[1], 2, x.shape[2]) if du is None else du
    dproj = None if proj_weight is None else dproj
    return tuple(_present(_conv_backward_op(du, dproj, *saved), saved))


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def _check_supported(op: str, *tensors) -> None:
    if not cpu_supports(*tensors):
        got = sorted({f"{t.device.type}/{t.dtype}" for t in tensors if t is not None})
        raise ValueError(f"{op}: backend='cpu' takes CPU tensors in float32, float16 or bfloat16 (it computes in "
                         f"float32), got {got}; use backend='torch' for float64")


def cpu_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Inputs validated by ``selective_scan``; same returns (last state in float32)."""
    _check_supported("selective_scan", u, delta, A, B, C, D, z, delta_bias)
    y, last = _ss_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state))
    return (y, last) if return_last_state else y


def cpu_cross_selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, routes=4, z=None,
                             delta_proj_weight=None):
    """Inputs validated by ``cross_selective_scan``; returns (b, d, H, W) in u's dtype (channels-last).
    With delta_proj_weight the projection runs inside the scan (delta is its low-rank input)."""
    _check_supported("cross_selective_scan", u, delta, A, B, C, D, delta_bias, z, delta_proj_weight)
    return _cross_op(u, delta, A, B, C, D, delta_bias, z, delta_proj_weight, bool(delta_softplus), int(routes))


def cpu_bidirectional_conv1d_silu(x, weight, bias=None, proj_weight=None):
    """Inputs validated by ``bidirectional_conv1d_silu``; returns (b, l, 2, d) in x's dtype, contiguous, and
    with proj_weight also the (b, l, 2, N) projection (computed from the rows just written, in L1)."""
    _check_supported("bidirectional_conv1d_silu", x, weight, bias, proj_weight)
    u, proj = _conv_op(x, weight, bias, proj_weight)
    return u if proj_weight is None else (u, proj)
