"""The fused multi-route scan against VMamba's way: four single-route scans on materialised copies.

    python tools/benchmark_scan.py                         # CUDA if available, else CPU
    python tools/benchmark_scan.py --device cpu --sizes 56 112 --dims 192

For each grid side S (S x S tokens) and width d, with the SS2D shapes (4 routes, d_state 1, batch 1):
  * fused:  ``cross_selective_scan(u, delta, A, B, C, D, bias, routes=4)`` — every route read by index
    arithmetic, the merged output accumulated in place;
  * copies: the official layout — cross-scan u, delta, B, C into (b, 4, ., L) copies (flip / transpose),
    one grouped ``selective_scan`` over 4*d channels, then cross-merge (un-flip, un-transpose, sum).
Both run on the same backend (``--backend``; auto = Triton on CUDA, the compiled path on CPU), forward
and forward + backward, median of ``--iters`` after ``--warmup``. Reported: ms and the speed-up of fused
over copies (a ratio measured side by side, interleaved, in one process), as a table, CSV and PNG.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visionlin.kernels import BACKENDS, cross_selective_scan, last_backend, selective_scan, use_backend  # noqa: E402


def cross_scan_copies(t: torch.Tensor) -> torch.Tensor:
    """(b, R=4, c, H, W) per-route tensors -> (b, 4, c, L) in each route's scan order (materialised)."""
    raster = t[:, 0].flatten(-2)
    cols = t[:, 1].transpose(-1, -2).flatten(-2)
    return torch.stack([raster, cols, t[:, 2].flatten(-2).flip(-1), t[:, 3].transpose(-1, -2).flatten(-2).flip(-1)], 1)


def cross_merge(y: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(b, 4, d, L) route-ordered outputs -> (b, d, H, W), the sum of every route put back on the grid."""
    b, _, d, L = y.shape
    raster = y[:, 0] + y[:, 2].flip(-1)
    cols = y[:, 1] + y[:, 3].flip(-1)
    return raster.view(b, d, H, W) + cols.view(b, d, W, H).transpose(-1, -2)


def scan_with_copies(u, delta, A, B, C, D, bias) -> torch.Tensor:
    b, d, H, W = u.shape
    R, n = A.shape[0], A.shape[-1]
    us = cross_scan_copies(u.unsqueeze(1).expand(b, R, d, H, W))
    y = selective_scan(us.reshape(b, R * d, H * W), cross_scan_copies(delta).reshape(b, R * d, H * W),
                       A.reshape(R * d, n), cross_scan_copies(B), cross_scan_copies(C), D.reshape(R * d),
                       delta_bias=bias.reshape(R * d), delta_softplus=True)
    return cross_merge(y.view(b, R, d, H * W), H, W)


def scan_fused(u, delta, A, B, C, D, bias) -> torch.Tensor:
    return cross_selective_scan(u, delta, A, B, C, D, bias, delta_softplus=True, routes=4)


def make_inputs(S: int, d: int, n: int, device: str, dtype: torch.dtype, requires_grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)
    R = 4

    def t(*shape, scale=1.0, shift=0.0):
        x = (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    params = lambda x: x.to(device).requires_grad_(requires_grad)  # noqa: E731  (float32 parameters)
    return (t(1, d, S, S), t(1, R, d, S, S, shift=-1.0), params(-torch.exp(torch.rand(R, d, n, generator=g))),
            t(1, R, n, S, S), t(1, R, n, S, S), params(torch.randn(R, d, generator=g)),
            params(torch.randn(R, d, generator=g) * 0.5))


def time_ms(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def measure(S: int, d: int, n: int, pass_: str, args) -> dict:
    inputs = make_inputs(S, d, n, args.device, args.dtype, pass_ == "fwd+bwd")
    grad = torch.randn(1, d, S, S, device=args.device, dtype=args.dtype)

    def run(impl):
        def fn():
            if pass_ == "fwd":
                with torch.no_grad():
                    impl(*inputs)
            else:
                impl(*inputs).backward(grad)
        return fn

    with use_backend(args.backend):
        torch.testing.assert_close(scan_fused(*inputs).float(), scan_with_copies(*inputs).float(),
                                   rtol=2e-2, atol=2e-2)  # the two ways compute the same thing
        backend = last_backend("cross_selective_scan")
        fns = {"fused": run(scan_fused), "copies": run(scan_with_copies)}
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        times = {k: [] for k in fns}
        for _ in range(args.iters):  # interleaved, so drifts of a noisy machine hit both alike
            for k, fn in fns.items():
                times[k].append(time_ms(fn, args.device))
    fused, copies = (statistics.median(times[k]) for k in ("fused", "copies"))
    return dict(side=S, tokens=S * S, d=d, d_state=n, pass_=pass_, backend=backend, device=args.device,
                dtype=str(args.dtype).replace("torch.", ""), fused_ms=round(fused, 3), copies_ms=round(copies, 3),
                speedup=round(copies / fused, 3))


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--sizes", type=int, nargs="+", default=[56], help="grid sides S (S x S tokens)")
    p.add_argument("--dims", type=int, nargs="+", default=[192], help="channels d")
    p.add_argument("--d-state", type=int, default=1)
    p.add_argument("--passes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=Path("benchmark_results/scan"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if min(args.sizes) < 1 or min(args.dims) < 1 or args.d_state < 1 or args.iters < 1:
        p.error("--sizes, --dims, --d-state and --iters must be positive")
    args.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    return args


def write_outputs(rows: List[dict], out: Path) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scan.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    written = [path]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'visionlin[bench]')")
        return written
    fig, axes = plt.subplots(1, len({r["pass_"] for r in rows}), figsize=(6 * len({r["pass_"] for r in rows}), 4),
                             squeeze=False)
    for ax, pass_ in zip(axes[0], dict.fromkeys(r["pass_"] for r in rows)):
        sel = [r for r in rows if r["pass_"] == pass_]
        labels = [f"{r['side']}²\nd {r['d']}" for r in sel]
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [r["copies_ms"] for r in sel], 0.4, label="4 routes as copies + merge")
        ax.bar([i + 0.2 for i in x], [r["fused_ms"] for r in sel], 0.4, label="fused cross_selective_scan")
        for i, r in zip(x, sel):
            ax.annotate(f"{r['speedup']:.2f}x", (i + 0.2, r["fused_ms"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{pass_}, {sel[0]['device']} / {sel[0]['backend']} / {sel[0]['dtype']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = out / "scan.png"
    fig.savefig(out / "scan.tmp.png", dpi=120)
    os.replace(out / "scan.tmp.png", png)
    plt.close(fig)
    return written + [png]


def main(argv: Sequence[str] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    points = [(S, d, p) for S in args.sizes for d in args.dims for p in args.passes]
    rows = []
    for i, (S, d, pass_) in enumerate(points, 1):
        print(f"[{i}/{len(points)}] {S}x{S} tokens, d {d}, {pass_} ...", flush=True)
        rows.append(measure(S, d, args.d_state, pass_, args))
        r = rows[-1]
        print(f"    fused {r['fused_ms']} ms, copies {r['copies_ms']} ms, speed-up {r['speedup']}x ({r['backend']})")
    print("\n| tokens | d | pass | backend | fused ms | copies ms | speed-up |\n|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['side']}² | {r['d']} | {r['pass_']} | {r['backend']} | {r['fused_ms']} | {r['copies_ms']} | "
              f"{r['speedup']}x |")
    print("wrote " + ", ".join(str(p) for p in write_outputs(rows, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
