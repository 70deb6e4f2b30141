#!/usr/bin/env python
"""Forward time and peak memory of softmax diffusion denoisers against their linear-attention versions,
versus the number of latent tokens, in one run.

    python tools/benchmark_diffusion.py            # the small default: every model at 256² and 512²
                                                   # images (small latents), fp32, batch 1, CPU
    python tools/benchmark_diffusion.py --image-sizes 512 1024 2048 --threads 2 --timeout 400 \\
        --max-memory-gb 12 --out benchmark_results/diffusion     # the full 512² / 1024² / 2048² run

Three levels, each a teacher (softmax) and its linear-attention student; image sizes are pixels, the latent
is 1/8 of them (SD's VAE), so 512², 1024², 2048² images give 64², 128², 256² latents:

  layer  one self-attention layer at SD dims (default query_dim 320, 8 heads of 40: SD 1.5's first level) on
         the latent's tokens (4096 / 16384 / 65536): ``attn_softmax`` = diffusers ``Attention`` with its
         default ``AttnProcessor2_0`` (``scaled_dot_product_attention``), ``attn_softmax_matmul`` = the same
         with ``AttnProcessor`` (explicit N x N scores, the textbook O(N^2)-memory attention),
         ``attn_linfusion`` = the same layer with ``LinFusionAttnProcessor.from_attention(attn)``
         (teacher init, feature MLPs of width ``--feature-dim``).
  unet   a small SD-style ``UNet2DConditionModel`` (default: 2 levels of 64 / 128 channels, one transformer
         per block, head dim 64, 77 text tokens of width 256; attention at every level, so the first level
         sees the latent's tokens): ``unet_softmax`` as built, ``unet_linfusion`` after
         ``visionlin.diffusion.linearize(unet)`` (attn1 linear, cross-attention softmax). The linearized
         model keeps the teacher's unused attn1 projections, so its parameter count is teacher + students.
  dit    ``dit`` = diffusers ``DiTTransformer2DModel`` and ``lindit`` = ``LinDiTTransformer2DModel`` of the
         same config (default DiT-S/2: 12 blocks of width 384, 6 heads; ``--dit-depth`` fewer), patch 2, so
         a 2048² image is 128² = 16384 tokens.

Weights are random (no download); speed and memory do not depend on them.

Method
------
* Every (model, image size) point runs in FRESH processes started and watched by ``run_worker`` of
  ``tools/benchmark.py`` (timeout, RSS watchdog, oom / timeout / error statuses); the worker is this file.
  Points run in order of size with the models side by side, so a teacher and its student are measured
  minutes apart, in the same run.
* Inference: ``model.eval()`` under ``torch.inference_mode()``, fp32, batch 1. ``--warmup`` un-timed
  forwards, then up to ``--iters`` timed ones, stopping early once the timed forwards have taken
  ``--max-seconds`` (at least one always runs; ``iters_timed`` says how many did). Reported: median, min
  and max latency. CUDA: synchronised around each forward.
* CPU peak memory as ``tools/benchmark.py`` measures it: a separate process with glibc's
  ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` so RSS follows live memory; after the warm-up,
  VmRSS is the baseline, ``/proc/self/clear_refs`` resets VmHWM, one forward runs, and
  ``peak_act_mem_mib = VmHWM - baseline``: the memory a forward needs on top of the weights and inputs
  (psutil sampling every 1 ms where clear_refs is not writable; ``memory_method`` says which).
  ``--memory-run separate`` (default) then times the point in a second process with the default malloc;
  a point whose forward took ``--max-seconds`` or longer in the memory process is not run again: its
  latency is taken from there, where the malloc setting adds page-fault time (``timing_run`` = ``memory``
  flags it). ``shared`` measures both in one process (timings flagged the same way);
  ``off`` skips memory. CUDA: one process per point, ``max_memory_allocated`` over the baseline.
* Failures never stop the run: ``oom`` (an out-of-memory exception, a worker killed by SIGKILL or by the
  ``--max-memory-gb`` watchdog), ``timeout`` (``--timeout`` seconds per process) and ``error`` are table
  rows; after an oom / timeout the larger sizes of that model are ``skipped`` (``--no-skip-larger`` runs
  them anyway).
* Scaling: for every model, the least-squares slope of log(latency) and log(peak memory) against
  log(tokens) over its ok points, and the slope between its two largest ok points. 1 = linear in the number
  of tokens; softmax attention tends to 2 once its N^2 term dominates.

Outputs in ``--out`` (written atomically after every point): ``benchmark_diffusion.csv``,
``benchmark_diffusion.json`` (``{"meta": {...}, "rows": [...]}``; meta holds the configs, the load average
before and after the run and the slopes) and ``benchmark_diffusion.png`` (per level: latency and peak
memory versus tokens, log-log, with slope-1 and slope-2 guide lines; failed points as 'x' at the top). A
markdown table and the slope table go to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the sibling tools (scripts, not a package)
import _bench_worker as _worker  # noqa: E402
import benchmark as _bench  # noqa: E402

LATENT_FACTOR = 8  # SD's VAE: latent side = image side / 8
LEVELS = ("layer", "unet", "dit")
# model -> (level, teacher it is compared against or None, what is measured)
MODELS = {
    "attn_softmax": ("layer", None, "diffusers Attention, AttnProcessor2_0 (scaled_dot_product_attention)"),
    "attn_softmax_matmul": ("layer", None, "diffusers Attention, AttnProcessor (explicit N x N scores)"),
    "attn_linfusion": ("layer", "attn_softmax", "the same Attention with LinFusionAttnProcessor (teacher init)"),
    "unet_softmax": ("unet", None, "UNet2DConditionModel, default processors"),
    "unet_linfusion": ("unet", "unet_softmax", "the same UNet after visionlin.diffusion.linearize"),
    "dit": ("dit", None, "DiTTransformer2DModel"),
    "lindit": ("dit", "dit", "LinDiTTransformer2DModel of the same config"),
}
DEFAULT_IMAGE_SIZES = [256, 512]
DIT_SIZES = ("S", "B", "L", "XL")
FEATURE_DIM_PATTERN = r"d(/[1-9][0-9]*)?|[1-9][0-9]*|none"

COLUMNS = [
    "level", "model", "teacher", "image_size", "latent_size", "tokens", "batch_size", "device", "dtype", "threads",
    "status", "error", "latency_ms_median", "latency_ms_min", "latency_ms_max", "iters_timed", "timing_run",
    "peak_act_mem_mib", "peak_total_mem_mib", "memory_method", "param_count", "params_mib",
    "speedup_vs_teacher", "mem_frac_vs_teacher", "load_1min",
]
OUT_NAME = "benchmark_diffusion"


# ----------------------------------------------------------------------------- configs
def unet_config(channels: list[int], head_dim: int, cross_attention_dim: int) -> dict:
    """A small SD-style UNet: one cross-attention transformer per block at every level, SD's conv stack."""
    return dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * len(channels),
                up_block_types=("CrossAttnUpBlock2D",) * len(channels), cross_attention_dim=cross_attention_dim,
                attention_head_dim=tuple(c // head_dim for c in channels))  # diffusers' name for the head count


def dit_config(size: str, depth: int | None) -> dict:
    """DiT-<size>/2's config (every field is a DiTTransformer2DModel field), optionally with fewer blocks."""
    from visionlin.diffusion import LINDIT_CONFIGS

    config = dict(LINDIT_CONFIGS[f"lindit_{size.lower()}_2"])
    if depth is not None:
        config["num_layers"] = depth
    return config


def feature_dim_value(text: str):
    """--feature-dim as linearize takes it: 'd', 'd/<k>', an int, or None."""
    if text == "none":
        return None
    return int(text) if text.isdigit() else text


def tokens_of(level: str, image_size: int, patch_size: int = 2) -> int:
    latent = image_size // LATENT_FACTOR
    return (latent // patch_size) ** 2 if level == "dit" else latent ** 2


def point_config(args) -> dict:
    """Everything a worker needs to build any model of the run (also recorded in the metadata)."""
    return {
        "layer": dict(dim=args.layer_dim, heads=args.layer_heads, feature_dim=feature_dim_value(args.feature_dim)),
        "unet": dict(config=unet_config(args.unet_channels, args.unet_head_dim, args.cross_attention_dim),
                     text_tokens=args.text_tokens, feature_dim=feature_dim_value(args.feature_dim)),
        "dit": dict(config=dit_config(args.dit_size, args.dit_depth), name=f"DiT-{args.dit_size}/2"
                    + (f" ({args.dit_depth} blocks)" if args.dit_depth is not None else "")),
    }


# ----------------------------------------------------------------------------- worker side
def build(spec: dict, device):
    """(module, forward) for one point; forward() runs the module once on fixed random inputs."""
    import torch

    name, level = spec["model"], MODELS[spec["model"]][0]
    cfg = spec["config"][level]
    latent = int(spec["image_size"]) // LATENT_FACTOR
    if level == "layer":
        from diffusers.models.attention_processor import Attention, AttnProcessor

        from visionlin.diffusion import LinFusionAttnProcessor

        attn = Attention(query_dim=cfg["dim"], heads=cfg["heads"], dim_head=cfg["dim"] // cfg["heads"], bias=False,
                         out_bias=True)  # SD's attn1
        if name == "attn_softmax_matmul":
            attn.set_processor(AttnProcessor())
        elif name == "attn_linfusion":
            attn.set_processor(LinFusionAttnProcessor.from_attention(attn, feature_dim=cfg["feature_dim"]))
        x = torch.randn(1, latent * latent, cfg["dim"], device=device)
        model = attn.to(device)
        return model, lambda: model(x)
    if level == "unet":
        from diffusers import UNet2DConditionModel

        from visionlin.diffusion import linearize

        model = UNet2DConditionModel(**cfg["config"])
        if name == "unet_linfusion":
            linearize(model, feature_dim=cfg["feature_dim"])
        model = model.to(device)
        sample = torch.randn(1, 4, latent, latent, device=device)
        text = torch.randn(1, cfg["text_tokens"], cfg["config"]["cross_attention_dim"], device=device)
        t = torch.tensor([500], device=device)
        return model, lambda: model(sample, t, encoder_hidden_states=text).sample
    from diffusers import DiTTransformer2DModel

    from visionlin.diffusion import LinDiTTransformer2DModel

    cls = LinDiTTransformer2DModel if name == "lindit" else DiTTransformer2DModel
    model = cls(**cfg["config"]).to(device)
    sample = torch.randn(1, 4, latent, latent, device=device)
    t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)
    return model, lambda: model(sample, timestep=t, class_labels=y).sample


def classify_exception(e: BaseException) -> str:
    """tools/_bench_worker.py's classification, plus the CPU allocator's refusal of an allocation."""
    if isinstance(e, RuntimeError) and "can't allocate memory" in str(e).lower():
        return "oom"
    return _worker.classify_exception(e)


def run_point(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    out: dict = {"num_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    if spec.get("test_fail"):
        raise RuntimeError("failure requested by --_test-fail")
    model, forward = build(spec, device)
    model.eval()
    out["param_count"] = sum(p.numel() for p in model.parameters())
    out["params_mib"] = sum(t.numel() * t.element_size()
                            for t in [*model.parameters(), *model.buffers()]) / _worker.MIB

    with torch.inference_mode():
        latencies = _worker.measure_steps(lambda measured: forward(), spec, device, out)

    ms = [t * 1000.0 for t in latencies]
    out.update(latency_ms_median=statistics.median(ms), latency_ms_min=min(ms), latency_ms_max=max(ms),
               iters_timed=len(ms), status="ok")
    return out


def worker_main(spec_json: str, result_path: str) -> int:
    """One point in this process; the result JSON is written also on failure (run_worker reads it)."""
    import traceback

    spec = json.loads(spec_json)
    try:
        result = run_point(spec)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a status in the result file
        traceback.print_exc()
        result = {"status": "error" if isinstance(e, KeyboardInterrupt) else classify_exception(e),
                  "error": "interrupted" if isinstance(e, KeyboardInterrupt) else _worker.short_error(e)}
    _worker._write_json_atomic(result_path, result)
    return 0


# ----------------------------------------------------------------------------- CLI
def _feature_dim_arg(s: str) -> str:
    if not re.fullmatch(FEATURE_DIM_PATTERN, s):
        raise argparse.ArgumentTypeError(f"{s!r} is not 'd', 'd/<k>' (e.g. d/16), a positive integer or 'none'")
    return s


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("Method\n------")
    p = argparse.ArgumentParser(prog="tools/benchmark_diffusion.py", description=doc[0].strip(),
                                epilog="Method\n------" + doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="NAME",
                   help=f"models to measure, from: {', '.join(MODELS)} (default: all)")
    p.add_argument("--image-sizes", nargs="+", type=_bench._positive_int, default=DEFAULT_IMAGE_SIZES, metavar="PX",
                   help="square image sizes in pixels, multiples of 16; the latent is 1/8 of them "
                        "(default: %(default)s)")
    g = p.add_argument_group("model configs")
    g.add_argument("--layer-dim", type=_bench._positive_int, default=320,
                   help="layer level: query_dim (default: 320, SD's first level)")
    g.add_argument("--layer-heads", type=_bench._positive_int, default=8,
                   help="layer level: heads, dividing --layer-dim (default: 8, SD 1.5; SD 2.x uses 5)")
    g.add_argument("--feature-dim", type=_feature_dim_arg, default="d",
                   help="LinFusion feature-MLP width: d, d/<k>, an integer or none (default: d, LinFusion-1-5's)")
    g.add_argument("--unet-channels", nargs="+", type=_bench._positive_int, default=[64, 128], metavar="C",
                   help="unet level: channels per level, multiples of 32 and of --unet-head-dim (default: 64 128)")
    g.add_argument("--unet-head-dim", type=_bench._positive_int, default=64, help="unet level: head dim (default: 64)")
    g.add_argument("--cross-attention-dim", type=_bench._positive_int, default=256,
                   help="unet level: text embedding width (default: 256)")
    g.add_argument("--text-tokens", type=_bench._positive_int, default=77,
                   help="unet level: text tokens (default: 77, CLIP's)")
    g.add_argument("--dit-size", choices=DIT_SIZES, default="S", help="dit level: DiT-<size>/2 (default: S)")
    g.add_argument("--dit-depth", type=_bench._positive_int, default=None,
                   help="dit level: number of blocks (default: the size's, 12 for S)")
    g = p.add_argument_group("measurement")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    g.add_argument("--threads", type=_bench._positive_int, default=_bench._default_threads(),
                   help="torch.set_num_threads in the workers (default: all usable cores, %(default)s here)")
    g.add_argument("--warmup", type=_bench._nonneg_int, default=None,
                   help="un-timed forwards (default: 1 on cpu, 10 on cuda)")
    g.add_argument("--iters", type=_bench._positive_int, default=None,
                   help="timed forwards at most (default: 3 on cpu, 50 on cuda)")
    g.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop timing once the timed forwards took this long; at least one runs (default: 20)")
    g.add_argument("--memory-run", choices=["separate", "shared", "off"], default="separate",
                   help="CPU: separate memory and timing processes (default), one for both, or no memory")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per worker process before the point is marked 'timeout' (default: 600)")
    g.add_argument("--max-memory-gb", type=float, default=None,
                   help="kill a worker whose RSS exceeds this and mark the point 'oom' "
                        "(default: 85%% of the machine's RAM; 0 disables the watchdog)")
    g.add_argument("--no-skip-larger", action="store_true",
                   help="also run the larger sizes of a model after it hit oom/timeout")
    p.add_argument("--no-plot", action="store_true", help=f"do not write {OUT_NAME}.png")
    p.add_argument("--out", default=os.path.join("benchmark_results", "diffusion"),
                   help="output folder (default: %(default)s/)")
    # TESTING ONLY: the worker of this model raises instead of measuring.
    p.add_argument("--_test-fail", dest="test_fail", choices=list(MODELS), default=None, help=argparse.SUPPRESS)
    return p


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Shape errors at the boundary, naming the flag, before any work."""
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0, got {args.timeout:g}")
    if args.max_seconds <= 0:
        parser.error(f"--max-seconds must be > 0, got {args.max_seconds:g}")
    levels = {MODELS[m][0] for m in args.models}
    if "layer" in levels and args.layer_dim % args.layer_heads:
        parser.error(f"--layer-dim {args.layer_dim} is not divisible by --layer-heads {args.layer_heads}")
    multiple, why = LATENT_FACTOR, [f"the VAE's factor {LATENT_FACTOR}"]
    if "dit" in levels:
        multiple, why = LATENT_FACTOR * 2, why + ["DiT's patch 2"]
    if "unet" in levels:
        bad = [c for c in args.unet_channels if c % 32 or c % args.unet_head_dim]
        if bad:
            parser.error(f"--unet-channels {' '.join(map(str, bad))}: every level's channels must be a multiple of "
                         f"32 (GroupNorm groups) and of --unet-head-dim {args.unet_head_dim}")
        if len(args.unet_channels) > 1:
            multiple = max(multiple, LATENT_FACTOR * 2 ** (len(args.unet_channels) - 1))
            n = len(args.unet_channels) - 1
            why.append(f"the UNet's {n} downsampling{'s' if n > 1 else ''}")
    bad = [s for s in args.image_sizes if s % multiple]
    if bad:
        parser.error(f"--image-sizes {' '.join(map(str, bad))}: must be multiples of {multiple} ({', '.join(why)})")


def check_models_build(args, config: dict) -> None:
    """Build every requested model on the meta device (no memory, no compute) so a bad config fails now."""
    import torch

    spec = {"config": config, "image_size": min(args.image_sizes)}
    for name in args.models:
        try:
            with torch.device("meta"):
                build({**spec, "model": name}, torch.device("meta"))
        except Exception as e:
            raise SystemExit(f"error: cannot build {name} from the given config: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- parent side
def make_meta(args, config: dict, warmup: int, iters: int, max_mem_gb) -> dict:
    import diffusers
    import torch

    import visionlin

    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if sys.argv else None,
        "models": {m: MODELS[m][2] for m in args.models}, "image_sizes": args.image_sizes, "configs": config,
        "batch_size": 1, "device": args.device, "dtype": "fp32", "warmup": warmup, "iters": iters,
        "max_seconds": args.max_seconds, "memory_run": args.memory_run if args.device == "cpu" else "shared (cuda)",
        "threads": args.threads, "timeout_s": args.timeout, "max_memory_gb": max_mem_gb,
        "cpu": _bench.cpu_name(), "cpu_count": os.cpu_count(), "gpu": None,
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "visionlin": getattr(visionlin, "__version__", None), "python": platform.python_version(),
        "platform": platform.platform(), "git": _bench.git_rev(),
    }


def measure_point(args, spec: dict, max_mem_bytes) -> dict:
    run = lambda measure, env: _bench.run_worker({**spec, "measure": measure}, env, args.timeout,  # noqa: E731
                                                 max_mem_bytes, worker=os.path.abspath(__file__))
    if args.device == "cuda":
        return {**run("both", {}), "timing_run": "both"}
    if args.memory_run == "shared":
        return {**run("both", _bench.MEM_ENV), "timing_run": "memory"}
    if args.memory_run == "off":
        return {**run("time", {}), "timing_run": "time"}
    mem = run("memory", _bench.MEM_ENV)  # first: one forward fewer, finds oom / errors sooner
    if mem.get("status") != "ok" or mem["latency_ms_median"] >= 1000 * args.max_seconds:
        return {**mem, "timing_run": "memory"}
    tim = run("time", {})
    for k in ("peak_act_mem_mib", "peak_total_mem_mib", "memory_method"):
        tim[k] = mem.get(k)
    tim["wall_s"] = tim.get("wall_s", 0.0) + mem.get("wall_s", 0.0)
    return {**tim, "timing_run": "time"}


def apply_teachers(rows: list[dict]) -> None:
    ok = {(r["model"], r["image_size"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        r["speedup_vs_teacher"] = r["mem_frac_vs_teacher"] = None
        t = ok.get((r["teacher"], r["image_size"]))
        if t is None or r["status"] != "ok":
            continue
        r["speedup_vs_teacher"] = t["latency_ms_median"] / r["latency_ms_median"]
        if r.get("peak_act_mem_mib") is not None and t.get("peak_act_mem_mib"):
            r["mem_frac_vs_teacher"] = r["peak_act_mem_mib"] / t["peak_act_mem_mib"]


def loglog_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(y) against log(x); None for fewer than two distinct x or a y <= 0."""
    pts = [(math.log(x), math.log(y)) for x, y in points if y is not None and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def scaling_slopes(rows: list[dict]) -> list[dict]:
    """Per model: fitted log-log slopes of latency and peak memory against tokens, and the largest-pair slope."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = sorted((r for r in rows if r["model"] == model and r["status"] == "ok"), key=lambda r: r["tokens"])
        time_pts = [(r["tokens"], r["latency_ms_median"]) for r in ok]
        mem_pts = [(r["tokens"], r.get("peak_act_mem_mib")) for r in ok]
        out.append({
            "model": model, "level": MODELS[model][0], "tokens": [r["tokens"] for r in ok],
            "time_slope_fit": loglog_slope(time_pts),
            "time_slope_last_pair": loglog_slope(time_pts[-2:]) if len(ok) >= 2 else None,
            "memory_slope_fit": loglog_slope(mem_pts),
        })
    return out


def plot(out: str, meta: dict, rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.transforms import blended_transform_factory

    levels = [lv for lv in LEVELS if any(r["level"] == lv for r in rows)]
    fig, axes = plt.subplots(len(levels), 2, figsize=(13, 4.6 * len(levels)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    titles = {"layer": "one self-attention layer", "unet": "SD-style UNet forward", "dit": "DiT / LinDiT forward"}
    for axrow, level in zip(axes, levels):
        lrows = [r for r in rows if r["level"] == level]
        models = list(dict.fromkeys(r["model"] for r in lrows))
        tokens = sorted({r["tokens"] for r in lrows})
        sizes = {r["tokens"]: r["image_size"] for r in lrows}
        for ax, key, ylabel in ((axrow[0], "latency_ms_median", "forward latency (ms, log)"),
                                (axrow[1], "peak_act_mem_mib", "peak activation memory (MiB, log)")):
            curves = {m: sorted((r["tokens"], max(float(r[key]), 1e-2)) for r in lrows
                                if r["model"] == m and r["status"] == "ok" and r.get(key) is not None)
                      for m in models}
            for i, (m, ok) in enumerate(curves.items()):
                ax.plot([x for x, _ in ok], [y for _, y in ok], "o-", color=colors[i % len(colors)], lw=2, ms=6,
                        label=m)
            # guides through the first point of the first student (∝ N) and of the first teacher (∝ N²)
            for slope, students in ((1, True), (2, False)):
                anchor = next((m for m in models if bool(MODELS[m][1]) == students and curves[m]), None)
                if anchor is not None and len(tokens) > 1:
                    x0, y0 = curves[anchor][0]
                    ax.plot(tokens, [y0 * (x / x0) ** slope for x in tokens], ls="--" if slope == 1 else ":",
                            color="0.45", lw=1.2, label=f"∝ N{'²' if slope == 2 else ''} (through {anchor})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ys = [y for ok in curves.values() for _, y in ok]
            ax.set_ylim(*((min(ys) / 1.6, max(ys) * 4.0) if ys else (0.1, 10)))  # headroom for failure marks
            _bench.plain_log_ticks(ax)
            ax.set_xticks(tokens)
            ax.set_xticklabels([f"{n}\n({sizes[n]}²)" for n in tokens])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("tokens at full latent resolution (image size)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{titles[level]}: {'latency' if ax is axrow[0] else 'peak memory'}", fontsize=11)
            ax.grid(True, which="major", alpha=0.35)
            ax.set_xlim(tokens[0] / 1.4, tokens[-1] * 1.4)
            ax.legend(fontsize=8, loc="best")
            trans = blended_transform_factory(ax.transData, ax.transAxes)
            for i, m in enumerate(models):
                for r in (r for r in lrows if r["model"] == m and r["status"] != "ok"):
                    y = 0.95 - 0.07 * i
                    ax.plot([r["tokens"]], [y], marker="x", color=colors[i % len(colors)], ms=10, mew=2.5,
                            transform=trans, clip_on=False)
                    ax.annotate(r["status"].upper(), (r["tokens"], y), xycoords=trans, xytext=(-8, -4), ha="right",
                                textcoords="offset points", color=colors[i % len(colors)], fontsize=8,
                                fontweight="bold")
    dev = meta.get("gpu") if meta.get("device") == "cuda" else meta.get("cpu")
    fig.suptitle(f"inference | batch 1 | fp32 | {meta['device']}: {dev} | {meta['threads']} threads | "
                 f"torch {meta['torch']} | diffusers {meta['diffusers']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = os.path.join(out, f"{OUT_NAME}.png")
    _bench._atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return path


def markdown_table(rows: list[dict]) -> str:
    fmt = _bench._fmt
    hdr = ["level", "model", "image", "latent", "tokens", "status", "ms (median)", "timed", "peak act. MiB",
           "params (M)", "speed vs teacher", "memory vs teacher"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 3 + ["---"] + ["---:"] * 6) + "|"]
    for r in sorted(rows, key=lambda r: (LEVELS.index(r["level"]), r["image_size"], list(MODELS).index(r["model"]))):
        sp, mf = r.get("speedup_vs_teacher"), r.get("mem_frac_vs_teacher")
        lines.append("| " + " | ".join([
            r["level"], r["model"], f"{r['image_size']}²", f"{r['latent_size']}²", str(r["tokens"]),
            r["status"] if r["status"] == "ok" else f"**{r['status']}**", fmt(r.get("latency_ms_median"), ".1f"),
            str(r.get("iters_timed") or "-"), fmt(r.get("peak_act_mem_mib"), ".1f"),
            fmt(r["param_count"] / 1e6 if r.get("param_count") else None, ".2f"),
            fmt(sp, ".2f") + ("x" if sp is not None else ""), fmt(mf, ".2f") + ("x" if mf is not None else ""),
        ]) + " |")
    errs = [r for r in rows if r["status"] != "ok" and r.get("error")]
    if errs:
        lines.append("")
        lines += [f"- {r['model']} @ {r['image_size']}²: {r['status']}: {r['error']}" for r in errs]
    return "\n".join(lines)


def slope_table(slopes: list[dict]) -> str:
    fmt = _bench._fmt
    lines = ["log-log slope against tokens (1 = linear, 2 = quadratic):", "",
             "| model | tokens | time (fit) | time (largest two) | peak memory (fit) |", "|---|---|---:|---:|---:|"]
    for s in slopes:
        lines.append(f"| {s['model']} | {', '.join(map(str, s['tokens'])) or '-'} | {fmt(s['time_slope_fit'], '.2f')} "
                     f"| {fmt(s['time_slope_last_pair'], '.2f')} | {fmt(s['memory_slope_fit'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0].startswith("{"):  # run_worker's calling convention: '<spec json>' RESULT
        return worker_main(*argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.models = list(dict.fromkeys(args.models))
    args.image_sizes = sorted(dict.fromkeys(args.image_sizes))
    check_args(parser, args)
    cuda = args.device == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    iters = args.iters if args.iters is not None else (50 if cuda else 3)
    if args.max_memory_gb is None:
        total = _bench._total_ram_gb()
        max_mem_gb = round(0.85 * total, 2) if total else None
    else:
        max_mem_gb = args.max_memory_gb if args.max_memory_gb > 0 else None
    max_mem_bytes = int(max_mem_gb * 2**30) if max_mem_gb else None

    out = _bench.check_out_dir(args.out)
    config = point_config(args)
    check_models_build(args, config)
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    meta = make_meta(args, config, warmup, iters, max_mem_gb)

    points = [(s, m) for s in args.image_sizes for m in args.models]
    rows: list[dict] = []
    failed_at: dict[str, tuple[int, str]] = {}
    t_start = time.monotonic()
    print(f"benchmark_diffusion: {len(points)} points ({len(args.models)} models x {len(args.image_sizes)} image "
          f"sizes), {args.device}, {args.threads} threads, fp32, warmup {warmup}, iters {iters}, out {out}",
          file=sys.stderr, flush=True)
    for i, (size, model) in enumerate(points, 1):
        level, teacher, _ = MODELS[model]
        row = {"level": level, "model": model, "teacher": teacher, "image_size": size,
               "latent_size": size // LATENT_FACTOR, "tokens": tokens_of(level, size), "batch_size": 1,
               "device": args.device, "dtype": "fp32", "threads": args.threads,
               "load_1min": round(os.getloadavg()[0], 2)}
        tag = f"[{i}/{len(points)}] {model} @ {size}² ({row['tokens']} tokens)"
        if model in failed_at and not args.no_skip_larger:
            s0, st = failed_at[model]
            row.update(status="skipped", error=f"not run: {st} at {s0}²")
            print(f"{tag} ... skipped ({st} at {s0}²)", file=sys.stderr, flush=True)
        else:
            print(f"{tag} ...", file=sys.stderr, flush=True)
            spec = {"model": model, "image_size": size, "config": config, "device": args.device,
                    "threads": args.threads, "warmup": warmup, "iters": iters, "max_seconds": args.max_seconds,
                    "test_fail": args.test_fail == model}
            res = measure_point(args, spec, max_mem_bytes)
            row.update({k: v for k, v in res.items() if k in COLUMNS and k not in row})
            row["status"] = res.get("status", "error")
            if res.get("gpu") and not meta["gpu"]:
                meta["gpu"] = res["gpu"]
            if row["status"] == "ok":
                mem = row.get("peak_act_mem_mib")
                msg = f"{row['latency_ms_median']:.1f} ms" + (f", {mem:.1f} MiB" if mem is not None else "")
            else:
                msg = f"{row['status'].upper()}: {row.get('error') or ''}"
                if row["status"] in ("oom", "timeout"):
                    failed_at[model] = (size, row["status"])
            print(f"{tag} ... {msg}  ({res.get('wall_s', 0):.0f} s)", file=sys.stderr, flush=True)
        rows.append(row)
        apply_teachers(rows)
        _bench.write_tables(out, meta, rows, COLUMNS, OUT_NAME)

    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    meta["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["slopes"] = scaling_slopes(rows)
    _bench.write_tables(out, meta, rows, COLUMNS, OUT_NAME)
    files = [os.path.join(out, f"{OUT_NAME}.{ext}") for ext in ("csv", "json")]
    if not args.no_plot:
        try:
            files.append(plot(out, meta, rows))
        except Exception as e:  # a plotting problem must not lose the measurements
            print(f"warning: could not write the plot: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    print(markdown_table(rows), flush=True)
    print("", flush=True)
    print(slope_table(meta["slopes"]), flush=True)
    print(f"load average (1/5/15 min): {meta['load_avg_start']} at the start, {meta['load_avg_end']} at the end",
          flush=True)
    print(f"wrote {', '.join(files)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
