"""Time bidirectional GLA on ViG shapes: forward and forward+backward, and effective HBM bandwidth.

Implementations (``--impls``):
  torch   the vectorised PyTorch path (``backend='torch'``), the CPU path;
  triton  the fused Triton kernels (``backend='triton'``); on CPU only under Triton's interpreter,
          which this script switches on when asked for it there (tiny sizes: ~10 ms per chunk);
  fla     flash-linear-attention's ``chunk_gla`` applied ViG's way: [x, flip(x)] concatenated on the
          batch axis, one causal pass, outputs un-flipped and averaged (when ``fla`` imports).

Shapes: ViG-T/S/B heads (H = 3/6/12) with K = 32, V = 64; N tokens in ``--tokens``; batch 1 and
``auto`` = max(1, round(128 * 196 / N)) (a 128-image batch at 224^2, same token count at other N).

Bandwidth: the fused minimum traffic divided by the measured time ("effective", not a DRAM counter).
Forward: s * B * N * H * (4K + 2V) bytes (q, k, both gates and v read once, o written once; s bytes
per element); forward+backward: s * B * N * H * (12K + 5V) (the forward, then q, k, v, both gates
and do read, dq, dk, dv and both dg written). The roofline time is that traffic at ``--hbm-tbps``
(3.35 TB/s, an H100 SXM, by default) or at a device-to-device copy's measured bandwidth
(``--measure-hbm``).

Prints a markdown table and writes ``kernels.csv`` and ``kernels.png`` (time vs N, log-log, one line
per implementation and pass, one panel per model and batch rule) atomically into ``--out``.

  python tools/benchmark_kernels.py --out benchmark_results/kernels            # CUDA, all shapes
  python tools/benchmark_kernels.py --device cpu --impls torch --tokens 196 784 --out /tmp/k
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"T": 3, "S": 6, "B": 12}     # ViG variant -> heads; every variant has K = 32, V = 64
HEAD_K, HEAD_V = 32, 64
DEFAULT_TOKENS = (196, 784, 4096, 16384)
IMPLS = ("torch", "triton", "fla")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FIELDS = ("model", "H", "K", "V", "batch_rule", "B", "N", "dtype", "impl", "pass", "status", "ms",
          "GB/s", "roofline_ms", "pct_of_roofline")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                   help="default: torch, triton and fla (if importable) on CUDA; torch on CPU")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
    p.add_argument("--batches", nargs="+", default=["1", "auto"],
                   help="batch sizes: integers and/or 'auto' = max(1, round(128*196/N))")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    p.add_argument("--warmup", type=int, default=3, help="CPU: untimed calls (CUDA: do_bench's 25 ms)")
    p.add_argument("--iters", type=int, default=10, help="CPU: timed calls, median reported")
    p.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth for the roofline (TB/s)")
    p.add_argument("--measure-hbm", action="store_true",
                   help="use a device-to-device copy's measured bandwidth for the roofline instead")
    p.add_argument("--out", type=Path, default=Path("benchmark_results/kernels"))
    args = p.parse_args(argv)
    for b in args.batches:
        if b != "auto" and not (b.isdigit() and int(b) > 0):
            p.error(f"--batches takes positive integers or 'auto', got {b!r}")
    if any(n < 1 for n in args.tokens):
        p.error("--tokens must be positive")
    return args


def batch_size(rule: str, n_tokens: int) -> int:
    return max(1, round(128 * 196 / n_tokens)) if rule == "auto" else int(rule)


def traffic_bytes(pass_: str, elem: int, B: int, N: int, H: int) -> int:
    per_token_head = 4 * HEAD_K + 2 * HEAD_V if pass_ == "fwd" else 12 * HEAD_K + 5 * HEAD_V
    return elem * B * N * H * per_token_head


def fla_chunk_gla():
    try:
        from fla.ops.gla import chunk_gla
    except Exception:  # fla missing or broken for this Triton: leave it out
        return None
    return chunk_gla


def make_impl(name: str):
    import torch

    from visionlin.kernels import bidirectional_gla

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


def make_inputs(B, N, H, dtype, device, requires_grad):
    import torch
    import torch.nn.functional as F

    q, k = (torch.randn(B, N, H, HEAD_K, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(B, N, H, HEAD_V, device=device, dtype=dtype)
    g_f, g_b = (F.logsigmoid(torch.randn(B, N, H, HEAD_K, device=device)).div(16).to(dtype) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v, g_f, g_b)]


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


def bench_point(impl_fn, pass_, B, N, H, dtype, device, args):
    import torch

    inputs = make_inputs(B, N, H, dtype, device, requires_grad=(pass_ == "fwd+bwd"))
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                impl_fn(*inputs)
    else:
        grad_out = torch.randn(B, N, H, HEAD_V, device=device, dtype=dtype)

        def fn():
            torch.autograd.grad(impl_fn(*inputs), inputs, grad_out)
    return time_ms(fn, device, args.warmup, args.iters)


def measure(model, rule, N, impl, pass_, dtype, device, tbps, args) -> dict:
    """One CSV row: time, effective bandwidth and the roofline for one shape, implementation and pass."""
    import torch

    H, B = MODELS[model], batch_size(rule, N)
    nbytes = traffic_bytes(pass_, torch.empty((), dtype=dtype).element_size(), B, N, H)
    roofline_ms = nbytes / (tbps * 1e12) * 1e3
    row = {"model": model, "H": H, "K": HEAD_K, "V": HEAD_V, "batch_rule": rule, "B": B, "N": N,
           "dtype": str(dtype).removeprefix("torch."), "impl": impl, "pass": pass_, "status": "oom", "ms": "",
           "GB/s": "", "roofline_ms": f"{roofline_ms:.4f}", "pct_of_roofline": ""}
    try:
        ms = bench_point(make_impl(impl), pass_, B, N, H, dtype, device, args)
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)       # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv(rows, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    _atomic_write(path, write)


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
        ax.set_title(f"ViG-{model}, batch {rule}")
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
        impls = ["torch", "triton"] + (["fla"] if fla_chunk_gla() else [])
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
                        row = measure(model, rule, N, impl, pass_, dtype, device, tbps, args)
                        rows.append(row)
                        print(f"ViG-{model} B={row['B']} N={N} {impl} {pass_}: {row['status']} {row['ms']} ms",
                              file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    title = (f"bidirectional GLA, {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
             f"{dtype_name}, K={HEAD_K} V={HEAD_V}; roofline at {tbps:.2f} TB/s")
    write_csv(rows, args.out / "kernels.csv")
    write_plot(rows, args.out / "kernels.png", title)
    print(f"## {title}\n")
    print(markdown_table(rows))
    print(f"\nwrote {args.out / 'kernels.csv'} and {args.out / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
