"""Time bidirectional GLA on ViG shapes (or linear attention on RALA and LinFusion shapes): forward and
forward+backward, and effective HBM bandwidth.

Operators (``--op``):
  bidirectional_gla  (default) ViG's mixer core;
  linear_attention   non-causal normalised linear attention, on RALA and LinFusion shapes.

Implementations (``--impls``):
  torch   the vectorised PyTorch path (``backend='torch'``), the CPU path;
  triton  the fused Triton kernels (``backend='triton'``); on CPU only under Triton's interpreter,
          which this script switches on when asked for it there (tiny sizes: ~10 ms per chunk);
  fla     flash-linear-attention's ``chunk_gla`` applied ViG's way: [x, flip(x)] concatenated on the
          batch axis, one causal pass, outputs un-flipped and averaged (when ``fla`` imports);
          bidirectional_gla only.

Shapes (``--models``), N tokens in ``--tokens``, batches in ``--batches`` (integers and ``auto`` =
max(1, round(128 * 196 / N)), a 128-image batch at 224^2, same token count at other N):
  bidirectional_gla: ViG-T/S/B heads (H = 3/6/12) with K = 32, V = 64; N = 196 .. 16384, batch 1
      and auto;
  linear_attention: RALA stages (H = 1/2/5/8, K = V = 64, with RoPE'd numerator features q_num,
      k_num and key weights) and LinFusion's SD-1.5 (H = 8, K = V = 40/80/160) and SDXL (H = 10,
      K = V = 64) attention layers (plain q, k, v); N = 4096 .. 65536 (queries = keys), batch 1
      and 2 (LinFusion's classifier-free guidance pair).

Bandwidth: the fused minimum traffic divided by the measured time ("effective", not a DRAM counter).
With I the input elements per token and head (bidirectional_gla: q, k, both gates and v, I = 4K + V;
linear_attention: q, k and v, I = 2K + V, plus q_num, k_num and the key weight, 2K + 1, on RALA
shapes) and s bytes per element: forward s * B * N * H * (I + V) bytes (inputs read once, o written
once); forward+backward s * B * N * H * (3I + 2V) (the forward, then the inputs and do read and
every input's gradient written); bidirectional_gla: 4K + 2V and 12K + 5V. The roofline time is that
traffic at ``--hbm-tbps``
(3.35 TB/s, an H100 SXM, by default) or at a device-to-device copy's measured bandwidth
(``--measure-hbm``).

Prints a markdown table and writes ``kernels.csv`` and ``kernels.png`` (``linear_attention.csv`` and
``.png`` for that op; time vs N, log-log, one line per implementation and pass, one panel per shape
and batch rule) atomically into ``--out``.

  python tools/benchmark_kernels.py --out benchmark_results/kernels            # CUDA, all shapes
  python tools/benchmark_kernels.py --op linear_attention --out benchmark_results/kernels
  python tools/benchmark_kernels.py --device cpu --impls torch --tokens 196 784 --out /tmp/k
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

MODELS = {"T": 3, "S": 6, "B": 12}     # ViG variant -> heads; every variant has K = 32, V = 64
HEAD_K, HEAD_V = 32, 64
DEFAULT_TOKENS = (196, 784, 4096, 16384)
# linear_attention shapes: name -> (H, K = V, numerator features and key weights as in RALA)
LA_SHAPES = {"RALA-1": (1, 64, True), "RALA-2": (2, 64, True), "RALA-5": (5, 64, True), "RALA-8": (8, 64, True),
             "LinFusion-40": (8, 40, False), "LinFusion-80": (8, 80, False), "LinFusion-160": (8, 160, False),
             "LinFusion-XL": (10, 64, False)}
LA_TOKENS = (4096, 16384, 65536)
OPS = ("bidirectional_gla", "linear_attention")
IMPLS = ("torch", "triton", "fla")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FIELDS = ("model", "H", "K", "V", "batch_rule", "B", "N", "dtype", "impl", "pass", "status", "ms",
          "GB/s", "roofline_ms", "pct_of_roofline")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--op", choices=OPS, default="bidirectional_gla")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                   help="default: torch, triton and fla (if importable) on CUDA; torch on CPU")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS) + tuple(LA_SHAPES), default=None,
                   help="shapes: ViG T/S/B (default: all) for bidirectional_gla; RALA-* and LinFusion-* "
                        "(default: all) for linear_attention")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help=f"default: {' '.join(map(str, DEFAULT_TOKENS))} (bidirectional_gla), "
                        f"{' '.join(map(str, LA_TOKENS))} (linear_attention)")
    p.add_argument("--batches", nargs="+", default=None,
                   help="batch sizes: integers and/or 'auto' = max(1, round(128*196/N)); default: 1 and auto "
                        "(bidirectional_gla), 1 and 2 (linear_attention)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    p.add_argument("--warmup", type=int, default=3, help="CPU: untimed calls (CUDA: do_bench's 25 ms)")
    p.add_argument("--iters", type=int, default=10, help="CPU: timed calls, median reported")
    p.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth for the roofline (TB/s)")
    p.add_argument("--measure-hbm", action="store_true",
                   help="use a device-to-device copy's measured bandwidth for the roofline instead")
    p.add_argument("--out", type=Path, default=Path("benchmark_results/kernels"))
    args = p.parse_args(argv)
    gla = args.op == "bidirectional_gla"
    shapes = MODELS if gla else LA_SHAPES
    args.models = args.models or list(shapes)
    args.tokens = args.tokens or list(DEFAULT_TOKENS if gla else LA_TOKENS)
    args.batches = args.batches or (["1", "auto"] if gla else ["1", "2"])
    if any(m not in shapes for m in args.models):
        p.error(f"--op {args.op} takes --models from {tuple(shapes)}, got {args.models}")
    if not gla and args.impls and "fla" in args.impls:
        p.error("--impls fla: fla has no non-causal normalised linear attention; use torch and triton")
    for b in args.batches:
        if b != "auto" and not (b.isdigit() and int(b) > 0):
            p.error(f"--batches takes positive integers or 'auto', got {b!r}")
    if any(n < 1 for n in args.tokens):
        p.error("--tokens must be positive")
    return args


def batch_size(rule: str, n_tokens: int) -> int:
    return max(1, round(128 * 196 / n_tokens)) if rule == "auto" else int(rule)


def shape_of(op: str, model: str):
    """(H, K, V, extras): heads, head dims and whether linear_attention gets q_num, k_num, key_weight."""
    if op == "bidirectional_gla":
        return MODELS[model], HEAD_K, HEAD_V, False
    H, D, extras = LA_SHAPES[model]
    return H, D, D, extras


def traffic_bytes(op: str, pass_: str, elem: int, B: int, N: int, H: int, K: int, V: int, extras: bool) -> int:
    if op == "bidirectional_gla":
        inputs = 4 * K + V
    else:
        inputs = 2 * K + V + (2 * K + 1 if extras else 0)
    per_token_head = inputs + V if pass_ == "fwd" else 3 * inputs + 2 * V
    return elem * B * N * H * per_token_head


def fla_chunk_gla():
    try:
        from fla.ops.gla import chunk_gla
    except Exception:  # fla missing or broken for this Triton: leave it out
        return None
    return chunk_gla


def make_impl(op: str, name: str):
    import torch

    from visionlin.kernels import bidirectional_gla, linear_attention

    if op == "linear_attention":
        return lambda *inputs: linear_attention(*inputs, backend=name)
    if name in ("torch", "triton"):
        return lambda q, k, v, g_f, g_b: bidirectional_gla(q, k, v, g_f, g_b, backend=name)
    chunk_gla = fla_chunk_gla()
    import inspect
    # fla 0.6 takes (B, T, H, K); older releases defaulted to head-first (B, H, T, K)
    layout = {"head_first": False} if "head_first" in inspect.signature(chunk_gla).parameters else {}

    def vig_way(q, k, v, g_f, g_b):
        both = [torch.cat((a, b.flip(1))) for a, b in ((q, q), (k, k), (v, v), (g_f, g_b))]
        o, _ = chunk_gla(*both, scale=q.shape[-1] ** -0.5, **layout)
        o_f, o_b = o.chunk(2)
        return (o_f + o_b.flip(1)) / 2
    return vig_way


def make_inputs(op, B, N, H, K, V, extras, dtype, device, requires_grad):
    """The op's positional arguments (None for an absent optional one)."""
    import torch
    import torch.nn.functional as F

    if op == "linear_attention":
        q, k = (F.elu(torch.randn(B, N, H, K, device=device)).add(1).to(dtype) for _ in range(2))
        v = torch.randn(B, N, H, V, device=device, dtype=dtype)
        q_num = k_num = key_weight = None
        if extras:
            q_num, k_num = (torch.randn(B, N, H, K, device=device, dtype=dtype) for _ in range(2))
            key_weight = torch.rand(B, N, H, device=device).add(0.5).to(dtype)
        inputs = [q, k, v, q_num, k_num, key_weight]
    else:
        q, k = (torch.randn(B, N, H, K, device=device, dtype=dtype) for _ in range(2))
        v = torch.randn(B, N, H, V, device=device, dtype=dtype)
        g_f, g_b = (F.logsigmoid(torch.randn(B, N, H, K, device=device)).div(16).to(dtype) for _ in range(2))
        inputs = [q, k, v, g_f, g_b]
    return [None if t is None else t.requires_grad_(requires_grad) for t in inputs]


def time_ms(fn, device: str, warmup: int, iters: int) -> float:
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measured_hbm_tbps(device: str) -> float:
    """Read+write bandwidth of a 1 GiB device-to-device copy (CUDA) or 256 MiB memcpy (CPU)."""
    import torch

    n = (1 << 30 if device == "cuda" else 1 << 28) // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, 2, 5)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e12


def bench_point(op, impl_fn, pass_, B, N, H, K, V, extras, dtype, device, args):
    import torch

    inputs = make_inputs(op, B, N, H, K, V, extras, dtype, device, requires_grad=(pass_ == "fwd+bwd"))
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                impl_fn(*inputs)
    else:
        grad_out = torch.randn(B, N, H, V, device=device, dtype=dtype)
        leaves = [t for t in inputs if t is not None]

        def fn():
            torch.autograd.grad(impl_fn(*inputs), leaves, grad_out)
    return time_ms(fn, device, args.warmup, args.iters)


def measure(op, model, rule, N, impl, pass_, dtype, device, tbps, args) -> dict:
    """One CSV row: time, effective bandwidth and the roofline for one shape, implementation and pass."""
    import torch

    (H, K, V, extras), B = shape_of(op, model), batch_size(rule, N)
    nbytes = traffic_bytes(op, pass_, torch.empty((), dtype=dtype).element_size(), B, N, H, K, V, extras)
    roofline_ms = nbytes / (tbps * 1e12) * 1e3
    row = {"model": model, "H": H, "K": K, "V": V, "batch_rule": rule, "B": B, "N": N,
           "dtype": str(dtype).removeprefix("torch."), "impl": impl, "pass": pass_, "status": "oom", "ms": "",
           "GB/s": "", "roofline_ms": f"{roofline_ms:.4f}", "pct_of_roofline": ""}
    try:
        ms = bench_point(op, make_impl(op, impl), pass_, B, N, H, K, V, extras, dtype, device, args)
    except torch.cuda.OutOfMemoryError:
        return row
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    row.update({"status": "ok", "ms": f"{ms:.4f}", "GB/s": f"{nbytes / (ms * 1e-3) / 1e9:.1f}",
                "pct_of_roofline": f"{100 * roofline_ms / ms:.1f}"})
    return row


def markdown_table(rows) -> str:
    cols = ("model", "B", "N", "impl", "pass", "status", "ms", "GB/s", "pct_of_roofline")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` on a temporary sibling that becomes ``path`` atomically (``visionlin._io.atomic_file``)."""
    from visionlin._io import atomic_file  # here: the orchestrator itself imports no torch
    with atomic_file(path) as tmp:
        write(str(tmp))


def write_csv(rows, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    _atomic_write(path, write)


def panel_name(model: str) -> str:
    return f"ViG-{model}" if model in MODELS else model


def write_plot(rows, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["batch_rule"]) for r in rows))
    ncols = len({rule for _, rule in panels})
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (model, rule) in zip(axes.flat, panels):
        for color, impl in enumerate(IMPLS):
            for pass_, style in (("fwd", "-o"), ("fwd+bwd", "--s")):
                pts = sorted((r["N"], float(r["ms"])) for r in rows if r["model"] == model
                             and r["batch_rule"] == rule and r["impl"] == impl and r["pass"] == pass_
                             and r["status"] == "ok")
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{color}", label=f"{impl} {pass_}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel("ms")
        ax.set_title(f"{panel_name(model)}, batch {rule}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.impls:
        impls = args.impls
    elif device == "cuda":
        impls = ["torch", "triton"] + (["fla"] if args.op == "bidirectional_gla" and fla_chunk_gla() else [])
    else:
        impls = ["torch"]
    if "fla" in impls and fla_chunk_gla() is None:
        raise SystemExit("--impls fla: flash-linear-attention (fla) cannot be imported")
    if "fla" in impls and device == "cpu":
        raise SystemExit("--impls fla needs CUDA")
    if "triton" in impls and device == "cpu":
        # Triton reads this when kernels are decorated, i.e. at import, which has not happened yet
        os.environ["TRITON_INTERPRET"] = "1"
        print("note: Triton runs under its CPU interpreter; its timings say nothing about a GPU", file=sys.stderr)
    dtype_name = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    dtype = getattr(torch, dtype_name)
    tbps = measured_hbm_tbps(device) if args.measure_hbm else args.hbm_tbps
    torch.manual_seed(0)

    rows = []
    for model in args.models:
        for rule in args.batches:
            for N in args.tokens:
                for impl in impls:
                    for pass_ in args.passes:
                        row = measure(args.op, model, rule, N, impl, pass_, dtype, device, tbps, args)
                        rows.append(row)
                        print(f"{panel_name(model)} B={row['B']} N={N} {impl} {pass_}: {row['status']} "
                              f"{row['ms']} ms", file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    gla = args.op == "bidirectional_gla"
    where = f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), {dtype_name}"
    if gla:
        title = f"bidirectional GLA, {where}, K={HEAD_K} V={HEAD_V}; roofline at {tbps:.2f} TB/s"
    else:
        title = f"linear attention (queries = keys), {where}; roofline at {tbps:.2f} TB/s"
    stem = "kernels" if gla else "linear_attention"
    write_csv(rows, args.out / f"{stem}.csv")
    write_plot(rows, args.out / f"{stem}.png", title)
    print(f"## {title}\n")
    print(markdown_table(rows))
    print(f"\nwrote {args.out / f'{stem}.csv'} and {args.out / f'{stem}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
