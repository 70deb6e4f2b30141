"""Export a registered model to ONNX, a torch.export program (.pt2) or TorchScript (.pt), verified against eager.

Builds the model (random weights, or ``--checkpoint``: ours, a converted safetensors file or an official
file the family's filter understands), exports it on a (batch, 3, N, N) example, reloads the artefact
(onnxruntime for ONNX, ``torch.export.load`` for .pt2, ``torch.jit.load`` for TorchScript), runs it on the
example (and, with ``--dynamic``, on a second batch size) and prints the max |artefact - eager|. The file is
written atomically, and removed again if the check fails. ``--dynamic`` makes the batch dynamic, and H/W too
where the model's graph allows it (see ``visionlin.deploy``); a TorchScript graph keeps its control flow, so
batch and H/W are always free there (and the check always runs a second batch size).

``--benchmark`` (ONNX or TorchScript) then times the artefact (onnxruntime, or the loaded script) against
eager PyTorch on the CPU at each ``--sizes`` resolution (one ONNX file per size unless H/W are dynamic): both
in this process, interleaved round by round after ``--warmup`` runs, each round the median of ``--iters`` runs; the
table reports the median over ``--rounds`` rounds and the eager / exported ratio, and is also written as JSON
and PNG next to the output (``<out>.benchmark.json`` / ``.png``).

    python tools/export.py vig_t --format onnx --img-size 224
    python tools/export.py vim_t --format pt2 --dynamic
    python tools/export.py ravlt_t --format torchscript       # ravlt_t_224.pt, loads without visionlin
    python tools/export.py vmamba_t --format onnx --benchmark --sizes 224 1024 --rounds 5
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import visionlin  # noqa: F401  (registers the models and operators)
from visionlin import deploy
from visionlin.layers.image import check_image

TOLERANCE = 1e-4  # max |artefact - eager| accepted for fp32 on CPU
SUFFIX = {"onnx": "onnx", "pt2": "pt2", "torchscript": "pt"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a registered model name, e.g. vig_t")
    p.add_argument("--format", choices=tuple(SUFFIX), required=True)
    p.add_argument("--img-size", type=int, default=224, help="example resolution (default 224)")
    p.add_argument("--batch-size", type=int, default=1, help="example batch (default 1)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, and H/W where the model allows")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--checkpoint", help="weights to load (default: random initialisation)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model arguments, values as Python literals (e.g. depth=3)")
    p.add_argument("--out", help="output file (default: <model>_<img-size>.<format> in the current folder)")
    p.add_argument("--benchmark", action="store_true", help="time onnxruntime against eager PyTorch (ONNX)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="benchmark resolutions (default: --img-size)")
    p.add_argument("--rounds", type=int, default=5, help="benchmark rounds (default 5)")
    p.add_argument("--iters", type=int, default=3, help="timed runs per round and side (default 3)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed runs per side before timing (default 2; TorchScript optimises its graph on them)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (default: torch's)")
    return p


def fail(message: str) -> None:
    raise SystemExit(f"export.py: error: {message}")


def build_model(args) -> torch.nn.Module:
    if args.model not in timm.list_models():
        close = [m for m in timm.list_models(f"*{args.model.split('_')[0]}*")][:8]
        fail(f"unknown model {args.model!r}" + (f"; similar registered models: {', '.join(close)}" if close else ""))
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    for item in args.model_kwargs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--model-kwargs takes KEY=VALUE items, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a plain string
    try:
        with timm.layers.set_layer_config(scriptable=args.format == "torchscript"):  # as timm builds for scripting
            model = timm.create_model(args.model, **kwargs)
    except TypeError as e:
        fail(f"{args.model} does not take these arguments ({e})")
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            fail(f"checkpoint not found: {args.checkpoint}")
        from visionlin.training import load_model_weights
        load_model_weights(model, args.checkpoint)
    return model.eval()


def check_size(model, size: int, batch: int) -> torch.Tensor:
    """An example image batch, after checking that the model takes the size (its own error otherwise)."""
    if size <= 0 or batch <= 0:
        fail(f"--img-size and --batch-size must be positive, got {size} and {batch}")
    stride, chans = deploy.stride_of(model), model.pretrained_cfg.get("input_size", (3,))[0]
    try:  # the models' own input check, on a shape-only tensor
        check_image(torch.empty(batch, chans, size, size, device="meta"), chans, stride)
    except ValueError as e:
        fail(f"{type(model).__name__}: {e} (--img-size {size}; nearest allowed: "
             f"{max(stride, size // stride * stride)} or {(size // stride + 1) * stride})")
    return torch.randn(batch, chans, size, size)


def verify(args, model, path: Path, example: torch.Tensor) -> float:
    """max |artefact - eager| on the example (and on a second batch size when the batch is dynamic)."""
    inputs = [example]
    if args.dynamic or args.format == "torchscript":
        inputs.append(torch.randn(example.shape[0] + 1, *example.shape[1:]))
    if args.format == "onnx":
        session = deploy.onnx_session(path, args.threads)
        run = lambda x: deploy.run_onnx(session, x)  # noqa: E731
    elif args.format == "torchscript":
        run = deploy.load_script(path)
    else:
        program = deploy.load_program(path).module()
        run = lambda x: program(x)  # noqa: E731
    error = 0.0
    with torch.no_grad():
        for x in inputs:
            error = max(error, deploy.max_abs_error(run(x), model(x)))
    return error


def _median_time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


RUNTIME = {"onnx": "onnxruntime", "torchscript": "torchscript"}  # the formats --benchmark times


def benchmark(args, model, path: Path, dims) -> list:
    rows = []
    runtime = RUNTIME[args.format]
    scripted = deploy.load_script(path) if args.format == "torchscript" else None  # takes every size
    with tempfile.TemporaryDirectory(prefix="visionlin_export_") as scratch:
        for size in args.sizes or [args.img_size]:
            x = check_size(model, size, args.batch_size)
            if scripted is not None:
                exported = lambda: scripted(x)  # noqa: E731
            else:
                file = path
                if size != args.img_size and "height" not in dims:
                    print(f"[benchmark] exporting {args.model} at {size}x{size} ...", flush=True)
                    file, _ = deploy.export_onnx(model, x, Path(scratch) / f"{size}.onnx", opset=args.opset)
                session = deploy.onnx_session(file, args.threads)
                exported = lambda: deploy.run_onnx(session, x)  # noqa: E731
            with torch.no_grad():
                eager = lambda: model(x)  # noqa: E731
                error = deploy.max_abs_error(exported(), eager())
                for _ in range(args.warmup - 1):
                    exported(), eager()
                eager_t, exported_t = [], []
                for r in range(args.rounds):  # interleaved: both sides see the same machine state
                    eager_t.append(_median_time(eager, args.iters))
                    exported_t.append(_median_time(exported, args.iters))
                    print(f"[benchmark] {size}: round {r + 1}/{args.rounds}: eager {eager_t[-1] * 1e3:.1f} ms, "
                          f"{runtime} {exported_t[-1] * 1e3:.1f} ms", flush=True)
            rows.append(dict(model=args.model, size=size, batch=args.batch_size, runtime=runtime,
                             eager_ms=statistics.median(eager_t) * 1e3, exported_ms=statistics.median(exported_t) * 1e3,
                             max_abs_error=error))
            rows[-1]["eager_over_exported"] = rows[-1]["eager_ms"] / rows[-1]["exported_ms"]
    return rows


def write_benchmark(path: Path, meta: dict, rows: list) -> None:
    json_path, png_path = (path.with_name(f"{path.name}.benchmark.{ext}") for ext in ("json", "png"))
    deploy.write_atomic(json_path, json.dumps(dict(meta=meta, rows=rows), indent=2).encode())
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[benchmark] matplotlib not installed: no PNG (pip install 'visionlin[bench]')", flush=True)
        return
    import io
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sizes = [str(r["size"]) for r in rows]
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["eager_ms"] for r in rows], 0.4, label="eager PyTorch")
    ax.bar([i + 0.2 for i in xs], [r["exported_ms"] for r in rows], 0.4, label=meta["runtime"])
    ax.set_xticks(list(xs), sizes)
    ax.set_xlabel("resolution (px)")
    ax.set_ylabel(f"ms per batch of {meta['batch']}")
    ax.set_yscale("log")
    ax.set_title(f"{meta['model']}: CPU latency, {meta['threads']} threads")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    deploy.write_atomic(png_path, buf.getvalue())


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.benchmark and args.format not in RUNTIME:
        fail("--benchmark times onnxruntime or TorchScript against eager: use it with --format onnx or torchscript")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    example = check_size(model, args.img_size, args.batch_size)
    for size in args.sizes or []:
        check_size(model, size, args.batch_size)
    out = Path(args.out or f"{args.model}_{args.img_size}.{SUFFIX[args.format]}")
    try:
        print(f"exporting {args.model} ({args.format}, {args.img_size}x{args.img_size}, batch {args.batch_size}"
              f"{', dynamic' if args.dynamic else ''}) ...", flush=True)
        t0 = time.perf_counter()
        if args.format == "onnx":
            path, dims = deploy.export_onnx(model, example, out, dynamic=args.dynamic, opset=args.opset)
        elif args.format == "torchscript":
            path, dims = deploy.save_script(deploy.script_model(model), out), ("batch", "height", "width")
        else:
            program, dims = deploy.export_program(model, example, dynamic=args.dynamic)
            path = deploy.save_program(program, out)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        fail(str(e))
    export_s = time.perf_counter() - t0
    error = verify(args, model, path, example)
    if not error <= TOLERANCE:
        path.unlink(missing_ok=True)
        fail(f"the exported {args.format} file differs from eager by {error:.2e} (> {TOLERANCE:g}); removed {path}")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {export_s:.1f} s; dynamic dims: "
          f"{', '.join(dims) if dims else 'none'}; max |{args.format} - eager| = {error:.2e}", flush=True)
    result = dict(path=str(path), dynamic=list(dims), max_abs_error=error)
    if args.benchmark:
        rows = benchmark(args, model, path, dims)
        runtime = RUNTIME[args.format]
        meta = dict(model=args.model, batch=args.batch_size, threads=torch.get_num_threads(), rounds=args.rounds,
                    iters=args.iters, warmup=args.warmup, runtime=runtime, torch=torch.__version__)
        if args.format == "onnx":
            meta["onnxruntime"] = _ort_version()
        write_benchmark(path, meta, rows)
        print(f"| size | eager ms | {runtime} ms | eager / {runtime} | max abs error |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['size']} | {r['eager_ms']:.1f} | {r['exported_ms']:.1f} | "
                  f"{r['eager_over_exported']:.2f} | {r['max_abs_error']:.1e} |")
        result["benchmark"] = rows
    return result


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
