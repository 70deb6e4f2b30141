#!/usr/bin/env python
"""Throughput, latency and peak memory of timm models versus input resolution.

    python tools/benchmark.py                      # the default "main job" (a few minutes on 2 CPU cores):
                                                   # vig_t vs deit_tiny_patch16_224 at 224 and 512, batch 1,
                                                   # forward, CPU, baseline deit_tiny_patch16_224
    python tools/benchmark.py --models vig_t deit_tiny_patch16_224 mambaout_femto \\
        --resolutions 224 512 1024 --mode train --device cuda --amp bf16 --out benchmark_results/

Any timm model name works; ``visionlin`` is imported first so our models are registered. Each model
is built at each resolution with ``timm.create_model(name, img_size=res, num_classes=1000)`` (fixed-size
models such as DeiT then resample their position embeddings); models whose constructor has no
``img_size`` (TypeError) are built with ``timm.create_model(name, num_classes=1000)``. Weights are
random (no download); speed and memory do not depend on them.

Method
------
* Every (model, resolution) point runs in FRESH worker processes (``tools/_bench_worker.py``), so
  allocator caches, oneDNN primitive caches and fragmentation of one point never leak into the next,
  and a crash or an out-of-memory kill of one point cannot take the run down.
* Timing: ``--warmup`` un-timed iterations, then ``--iters`` timed ones (``time.perf_counter``; on CUDA
  with ``torch.cuda.synchronize()`` around each iteration). Reported: median / min / max latency per
  batch in ms and throughput = batch_size / median seconds (img/s). ``forward`` = ``model.eval()`` under
  ``torch.inference_mode()``; ``train`` = ``model.train()``, forward + ``output.float().mean().backward()``
  (no optimizer; gradients accumulate, so they are allocated during the warm-up).
* ``--rounds N`` times every point N times, round-robin over all points (fresh processes each time),
  and reports the median of the N median latencies (min / max over all rounds): on a machine whose
  speed drifts for seconds to minutes (shared VMs), a slow phase then hits every model instead of
  whichever happened to run during it. Memory is measured in the first round only.
* CPU peak memory, the honest way: glibc malloc keeps freed memory in its arenas, so the process RSS
  says little about what a forward pass needs. The memory worker is therefore started with
  ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` (set in its environment before Python
  starts), so every buffer of 64 KiB or more is its own mmap and is returned to the OS when freed: RSS
  tracks live memory. After the warm-up the worker reads VmRSS (baseline), writes ``5`` to
  ``/proc/self/clear_refs`` (resets the VmHWM high-water mark to the current RSS), runs ``--mem-iters``
  iterations and reads VmHWM: ``peak_act_mem_mib = VmHWM - baseline`` -- the extra memory one
  iteration needs on top of the model (parameters, buffers, input, and in train mode gradients).
  Where ``clear_refs`` is not writable the worker samples RSS with psutil every 1 ms instead (may miss
  very short spikes); the ``memory_method`` column says which method produced each number.
  ``peak_total_mem_mib`` is the absolute peak (VmHWM, i.e. including the Python/torch runtime).
* That malloc setting makes CPU timings ~1.5-1.8x slower (every large buffer is a fresh mmap that
  must be page-faulted), so by default each CPU point uses TWO fresh processes: one with the default
  malloc for timing and one with the mmap threshold for memory (``--memory-run separate``).
  ``--memory-run shared`` measures both in the mmap-threshold process (half the wall time, slower
  timings, flagged in the metadata); ``--memory-run off`` skips memory.
* CUDA: one fresh process per point does both; peak memory is ``torch.cuda.max_memory_allocated()``
  after ``reset_peak_memory_stats()`` minus ``memory_allocated()`` after the model was built and
  warmed up. ``--amp bf16|fp16`` runs under ``torch.autocast``; ``--channels-last`` converts model
  and input.
* GMACs (forward, per image) are counted as ``tools/count_flops.py`` does (linear layers and
  convolutions from the ops that run, softmax attention and GLA analytically) on one extra forward
  AFTER all measurements, in the memory process, so it cannot disturb timing or memory.
* Failures never stop the run: out-of-memory (``torch.OutOfMemoryError``, RuntimeErrors saying "out of
  memory", ``MemoryError``, a worker killed by SIGKILL, i.e. the kernel OOM killer, or a worker whose
  RSS passes ``--max-memory-gb``, watched by a psutil watchdog) gives status ``oom``; a worker running
  past ``--timeout`` seconds is killed and gets status ``timeout``; any other exception gives ``error``
  with the message. After an ``oom``/``timeout`` the larger resolutions of that model are marked
  ``skipped`` without running (``--no-skip-larger`` runs them anyway).

Outputs (in ``--out``, written atomically after every point): ``benchmark.csv``, ``benchmark.json``
(``{"meta": {...}, "rows": [...]}``) and ``benchmark.png`` (throughput and peak activation memory versus
resolution, log scales, one line per model, failed points as 'x' at the top of the panel). A markdown
table goes to stdout, with speedup (throughput / baseline throughput) and memory fraction (peak
memory / baseline peak memory) against ``--baseline`` at each resolution; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_bench_worker.py")

DEFAULT_MODELS = ["vig_t", "deit_tiny_patch16_224"]
DEFAULT_RESOLUTIONS = [224, 512]
DEFAULT_BASELINE = "deit_tiny_patch16_224"

MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

COLUMNS = [
    "model", "resolution", "batch_size", "mode", "device", "dtype", "channels_last", "threads",
    "status", "error",
    "latency_ms_median", "latency_ms_min", "latency_ms_max", "throughput_img_s",
    "peak_act_mem_mib", "peak_total_mem_mib", "memory_method",
    "param_count", "params_mib", "gmacs",
    "speedup_vs_baseline", "mem_frac_vs_baseline", "baseline", "img_size_kwarg",
]


# ----------------------------------------------------------------------------- CLI
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s} must be a positive integer")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{s} must be >= 0")
    return v


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _total_ram_gb() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except Exception:
        return None


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("Method\n------")
    epilog = "Method\n------" + doc[1] if len(doc) > 1 else None
    p = argparse.ArgumentParser(
        prog="tools/benchmark.py",
        description=doc[0].strip(),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME",
                   help=f"timm model names, ours or timm's (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--resolutions", nargs="+", type=_positive_int, default=DEFAULT_RESOLUTIONS, metavar="RES",
                   help="square input sizes in pixels (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images per batch (default: 1)")
    p.add_argument("--mode", choices=["forward", "train"], default="forward",
                   help="forward: eval + inference_mode; train: forward + backward (default: forward)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype (default: fp32, no autocast)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    p.add_argument("--warmup", type=_nonneg_int, default=None,
                   help="un-timed warm-up iterations (default: 2 on cpu, 10 on cuda)")
    p.add_argument("--iters", type=_positive_int, default=None,
                   help="timed iterations (default: 5 on cpu, 50 on cuda)")
    p.add_argument("--rounds", type=_positive_int, default=1,
                   help="time every point this many times, round-robin over the points (each round in fresh "
                        "processes; memory in the first round only), and report the median of the rounds' "
                        "median latencies (min/max over all rounds): on a noisy machine a slow phase then hits "
                        "every model instead of whichever ran during it (default: 1)")
    p.add_argument("--mem-iters", type=_positive_int, default=1,
                   help="iterations inside the CPU memory window of the separate memory process (default: 1; "
                        "the peak of a deterministic iteration does not change with repetition)")
    p.add_argument("--memory-run", choices=["separate", "shared", "off"], default="separate",
                   help="CPU only. separate: one fresh process for timing (default malloc) and one for memory "
                        "(mmap-threshold malloc), the honest default; shared: one mmap-threshold process does both "
                        "(faster run, ~1.5x slower timings); off: timing only (default: separate)")
    p.add_argument("--threads", type=_positive_int, default=_default_threads(),
                   help="torch.set_num_threads in the workers (default: all usable cores, %(default)s here)")
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="model the ratio columns compare against; 'none' disables them (default: "
                        f"{DEFAULT_BASELINE} if it is benchmarked, else the last of two or more models)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds per worker process before it is killed and the point marked 'timeout' (default: 600)")
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="kill a worker whose RSS exceeds this many GiB and mark the point 'oom' "
                        "(default: 85%% of the machine's RAM; 0 disables the watchdog)")
    p.add_argument("--no-skip-larger", action="store_true",
                   help="also run the larger resolutions of a model after it hit oom/timeout")
    p.add_argument("--no-flops", action="store_true", help="do not count GMACs")
    p.add_argument("--no-plot", action="store_true", help="do not write benchmark.png")
    p.add_argument("--out", default="benchmark_results", help="output folder (default: %(default)s/)")
    # TESTING ONLY: every measured iteration of the memory run also allocates and touches this many MiB.
    p.add_argument("--_test-alloc-mib", dest="test_alloc_mib", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------- validation
def check_models(names: list[str]) -> None:
    import timm

    import visionlin  # noqa: F401  (registers our models)

    unknown = [n for n in names if not timm.is_model(n)]
    if not unknown:
        return
    all_models = timm.list_models()
    lines = []
    for n in unknown:
        base = n.split(".")[0]
        parts = [t for t in base.replace("-", "_").split("_") if len(t) >= 3]
        near = list(difflib.get_close_matches(base, all_models, n=6, cutoff=0.6))
        for part in parts[:2]:
            for m in timm.list_models(f"*{part}*"):
                if m not in near and len(near) < 10:
                    near.append(m)
        hint = ", ".join(near) if near else "(no similar names)"
        lines.append(f"unknown model {n!r}; close matches: {hint}")
    raise SystemExit("error: " + "\n       ".join(lines) +
                     "\n       (list all with: python -c \"import visionlin, timm; print(timm.list_models())\")")


def check_out_dir(out: str) -> str:
    out = os.path.abspath(out)
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: --out {out!r} is not a writable folder ({e.strerror or e})")
    return out


# ----------------------------------------------------------------------------- metadata
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_rev() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return None


def make_meta(args, baseline, dtype, warmup, iters, max_mem_gb) -> dict:
    import timm
    import torch

    import visionlin

    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]) if sys.argv else None,
        "models": args.models,
        "resolutions": args.resolutions,
        "batch_size": args.batch_size,
        "mode": args.mode,
        "device": args.device,
        "dtype": dtype,
        "channels_last": args.channels_last,
        "warmup": warmup,
        "iters": iters,
        "rounds": args.rounds,
        "mem_iters": args.mem_iters if args.device == "cpu" else None,
        "memory_run": args.memory_run if args.device == "cpu" else "shared (cuda)",
        "timing_malloc": ("default" if args.memory_run != "shared" else "mmap threshold 64 KiB (slower)")
        if args.device == "cpu" else None,
        "threads": args.threads,
        "baseline": baseline,
        "timeout_s": args.timeout,
        "max_memory_gb": max_mem_gb,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": None,  # filled in from the first CUDA worker (the parent never creates a CUDA context)
        "torch": torch.__version__,
        "timm": timm.__version__,
        "visionlin": getattr(visionlin, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_rev(),
    }
    if args.test_alloc_mib:
        meta["test_alloc_mib"] = args.test_alloc_mib
    return meta


# ----------------------------------------------------------------------------- worker runs
def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def run_worker(spec: dict, extra_env: dict, timeout: float, max_mem_bytes: int | None, worker: str = WORKER) -> dict:
    """Run one worker process (``python <worker> '<spec json>' <result path>``, which writes the result JSON also
    on failure) under a timeout and an RSS watchdog; always returns a result dict."""
    env = dict(os.environ)
    for k in MEM_ENV:
        env.pop(k, None)  # timing processes get the default malloc
    env.update(extra_env)
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    with tempfile.TemporaryDirectory(prefix="visionlin_bench_") as td:
        result_path = os.path.join(td, "result.json")
        log_path = os.path.join(td, "worker.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, worker, json.dumps(spec), result_path],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        ps_proc = None
        if max_mem_bytes:
            try:
                import psutil

                ps_proc = psutil.Process(proc.pid)
            except Exception:
                ps_proc = None
        killed_for = None
        t0 = time.monotonic()
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    killed_for = "timeout"
                    proc.kill()
                    break
                if ps_proc is not None:
                    try:
                        rss = ps_proc.memory_info().rss
                    except Exception:
                        rss = 0
                    if rss > max_mem_bytes:
                        killed_for = f"rss {rss / 2**30:.2f} GiB"
                        proc.kill()
                        break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        wall = time.monotonic() - t0

        if killed_for == "timeout":
            return {"status": "timeout", "error": f"worker killed after {timeout:g} s (--timeout)", "wall_s": wall}
        if killed_for is not None:
            return {"status": "oom",
                    "error": f"worker killed by the watchdog: {killed_for} > --max-memory-gb "
                             f"{max_mem_bytes / 2**30:g}", "wall_s": wall}
        result = None
        if os.path.exists(result_path):
            try:
                with open(result_path) as f:
                    result = json.load(f)
            except (OSError, ValueError):
                result = None
        if result is None:
            try:
                with open(log_path, errors="replace") as f:
                    tail = [ln.strip() for ln in f.read().splitlines() if ln.strip()][-3:]
            except OSError:
                tail = []
            rc = proc.returncode
            if rc is not None and rc < 0:
                sig = _signal_name(-rc)
                status = "oom" if -rc == signal.SIGKILL else "error"
                why = " (likely the kernel OOM killer)" if status == "oom" else ""
                result = {"status": status, "error": f"worker killed by {sig}{why}"}
            else:
                result = {"status": "error", "error": f"worker exited with code {rc}: " + " | ".join(tail)}
        result["wall_s"] = wall
        return result


def _spec(args, model: str, res: int, warmup: int, iters: int) -> dict:
    return {
        "model": model, "resolution": res, "batch_size": args.batch_size, "mode": args.mode,
        "device": args.device, "amp": args.amp, "channels_last": args.channels_last,
        "threads": args.threads, "warmup": warmup, "iters": iters,
        "count_flops": not args.no_flops, "test_alloc_mib": args.test_alloc_mib,
    }


def time_point(args, model: str, res: int, warmup: int, iters: int, max_mem_bytes) -> dict:
    """One timing-only worker (default malloc), as the timing half of a separate-memory point."""
    spec = {**_spec(args, model, res, warmup, iters), "count_flops": False, "test_alloc_mib": 0.0}
    return run_worker({**spec, "measure": "time"}, {}, args.timeout, max_mem_bytes)


def merge_rounds(row: dict, extra: list[dict]) -> None:
    """Fold further timing rounds of an ok point into its row: latency = the median of the rounds'
    medians, min/max over all rounds, throughput from that median."""
    rounds = [row] + [e for e in extra if e.get("status") == "ok"]
    row["latency_ms_median"] = statistics.median(r["latency_ms_median"] for r in rounds)
    row["latency_ms_min"] = min(r["latency_ms_min"] for r in rounds)
    row["latency_ms_max"] = max(r["latency_ms_max"] for r in rounds)
    row["throughput_img_s"] = row["batch_size"] / (row["latency_ms_median"] / 1000.0)
    row["rounds"] = len(rounds)


def measure_point(args, model: str, res: int, warmup: int, iters: int, max_mem_bytes) -> dict:
    spec = _spec(args, model, res, warmup, iters)
    if args.device == "cuda" or args.memory_run == "shared":
        env = MEM_ENV if args.device == "cpu" else {}
        return run_worker({**spec, "measure": "both"}, env, args.timeout, max_mem_bytes)
    if args.memory_run == "off":
        return run_worker({**spec, "measure": "time"}, {}, args.timeout, max_mem_bytes)
    # separate: memory first (fewer iterations, finds oom/errors sooner), then timing with default malloc
    mem = run_worker({**spec, "measure": "memory", "iters": args.mem_iters}, MEM_ENV, args.timeout, max_mem_bytes)
    if mem.get("status") != "ok":
        return mem
    tim = time_point(args, model, res, warmup, iters, max_mem_bytes)
    if tim.get("status") != "ok":
        for k in ("peak_act_mem_mib", "peak_total_mem_mib", "memory_method", "gmacs"):
            if k in mem:
                tim.setdefault(k, mem[k])
        return tim
    for k in ("peak_act_mem_mib", "peak_total_mem_mib", "baseline_mem_mib", "memory_method", "gmacs"):
        if mem.get(k) is not None:
            tim[k] = mem[k]
    tim["wall_s"] = tim.get("wall_s", 0.0) + mem.get("wall_s", 0.0)
    return tim


# ----------------------------------------------------------------------------- outputs
def apply_baseline(rows: list[dict], baseline: str | None) -> None:
    base = {r["resolution"]: r for r in rows if r["model"] == baseline and r["status"] == "ok"}
    for r in rows:
        r["baseline"] = baseline
        r["speedup_vs_baseline"] = None
        r["mem_frac_vs_baseline"] = None
        b = base.get(r["resolution"])
        if baseline is None or b is None or r["status"] != "ok":
            continue
        if r.get("throughput_img_s") and b.get("throughput_img_s"):
            r["speedup_vs_baseline"] = r["throughput_img_s"] / b["throughput_img_s"]
        if r.get("peak_act_mem_mib") is not None and b.get("peak_act_mem_mib"):
            r["mem_frac_vs_baseline"] = r["peak_act_mem_mib"] / b["peak_act_mem_mib"]


def _atomic_write(path: str, write_fn, mode: str = "w") -> None:
    """``write_fn(f)`` on a file opened in ``mode``, written atomically (``visionlin._io.atomic_file``)."""
    from visionlin._io import atomic_file  # here: the orchestrator itself imports no torch
    with atomic_file(path) as tmp:
        with open(tmp, mode, **({"newline": ""} if mode == "w" else {})) as f:
            write_fn(f)


def write_tables(out: str, meta: dict, rows: list[dict], columns: list[str] = COLUMNS,
                 name: str = "benchmark") -> None:
    """``<name>.csv`` (the ``columns`` of every row) and ``<name>.json`` (``{"meta": ..., "rows": [...]}``)."""
    def _csv(f):
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})

    def _json(f):
        json.dump({"meta": meta, "rows": [{k: r.get(k) for k in columns} for r in rows]}, f, indent=2)
        f.write("\n")

    _atomic_write(os.path.join(out, f"{name}.csv"), _csv)
    _atomic_write(os.path.join(out, f"{name}.json"), _json)


def plain_log_ticks(ax) -> None:
    """Label a log y axis with plain numbers (0.1, 20, 3000 instead of 1e-01 / 2x10^1), majors and minors."""
    import matplotlib.ticker

    class _PlainLogFormatter(matplotlib.ticker.LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.6)))


def plot(out: str, meta: dict, rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.transforms import blended_transform_factory

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    panels = [("throughput_img_s", "throughput (img/s, log)", "Throughput vs resolution"),
              ("peak_act_mem_mib", "peak activation memory (MiB, log)", "Peak activation memory vs resolution")]
    resolutions = sorted({r["resolution"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    for ax, (key, ylabel, title) in zip(axes, panels):
        for i, m in enumerate(models):
            c = colors[i % len(colors)]
            pts = [r for r in rows if r["model"] == m]
            ok = [(r["resolution"], r[key]) for r in pts if r["status"] == "ok" and r.get(key) is not None]
            ok = [(x, max(float(y), 1e-2)) for x, y in ok]  # log axis: clamp 0 to 0.01
            label = m + (" (baseline)" if m == meta.get("baseline") else "")
            if ok:
                ax.plot([x for x, _ in ok], [y for _, y in ok], "o-", color=c, label=label, lw=2, ms=6)
            else:
                ax.plot([], [], "o-", color=c, label=label)
        ax.set_yscale("log")
        ys = [max(float(r[key]), 1e-2) for r in rows if r["status"] == "ok" and r.get(key) is not None]
        if ys:  # headroom on top for the failure markers, and at least one decade so log ticks show
            lo, hi = min(ys) / 1.6, max(ys) * 4.0
            if hi / lo < 10:
                mid = math.sqrt(hi * lo)
                lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
            ax.set_ylim(lo, hi)
        else:
            ax.set_ylim(0.1, 10)
        plain_log_ticks(ax)
        ax.set_xscale("log", base=2)
        ax.set_xticks(resolutions)
        ax.set_xticklabels([str(r) for r in resolutions])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("input resolution (px, square, log2)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=11)
        ax.grid(True, which="major", alpha=0.35)
        ax.set_xlim(resolutions[0] / 1.25, resolutions[-1] * 1.25)
        # failed points: 'x' near the top of the panel (no value exists), annotated with the status
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        for i, m in enumerate(models):
            c = colors[i % len(colors)]
            bad = [r for r in rows if r["model"] == m and r["status"] != "ok"]
            for j, r in enumerate(bad):
                y = 0.93 - 0.07 * (i % 4)
                ax.plot([r["resolution"]], [y], marker="x", color=c, ms=11, mew=2.5, transform=trans, clip_on=False)
                last = r["resolution"] == resolutions[-1] and len(resolutions) > 1
                ax.annotate(r["status"].upper(), (r["resolution"], y), xycoords=trans,
                            xytext=(-8 if last else 8, -4), ha="right" if last else "left",
                            textcoords="offset points", color=c, fontsize=9, fontweight="bold")
    dev = meta.get("gpu") if meta.get("device") == "cuda" else meta.get("cpu")
    fig.suptitle(f"{meta['mode']} | batch {meta['batch_size']} | {meta['dtype']} | {meta['device']}: {dev} | "
                 f"{meta['threads']} threads | torch {meta['torch']} | timm {meta['timm']}", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    path = os.path.join(out, "benchmark.png")
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def markdown_table(rows: list[dict], baseline: str | None) -> str:
    hdr = ["model", "res", "status", "latency ms (median)", "img/s", "peak act. MiB", "params (M)", "GMACs"]
    if baseline:
        hdr += [f"speedup vs {baseline}", f"memory vs {baseline}"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(hdr) - 3)) + "|"]
    for r in sorted(rows, key=lambda r: (r["resolution"], r["model"] != baseline)):
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        cells = [r["model"], str(r["resolution"]), status, _fmt(r.get("latency_ms_median"), ".1f"),
                 _fmt(r.get("throughput_img_s"), ".2f"), _fmt(r.get("peak_act_mem_mib"), ".1f"),
                 _fmt(r["param_count"] / 1e6 if r.get("param_count") else None, ".2f"), _fmt(r.get("gmacs"), ".2f")]
        if baseline:
            sp, mf = r.get("speedup_vs_baseline"), r.get("mem_frac_vs_baseline")
            cells += [_fmt(sp, ".2f") + ("x" if sp is not None else ""), _fmt(mf, ".2f") + ("x" if mf is not None else "")]
        lines.append("| " + " | ".join(cells) + " |")
    errs = [r for r in rows if r["status"] != "ok" and r.get("error")]
    if errs:
        lines.append("")
        lines += [f"- {r['model']} @ {r['resolution']}: {r['status']}: {r['error']}" for r in errs]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.models = list(dict.fromkeys(args.models))
    args.resolutions = list(dict.fromkeys(args.resolutions))
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if args.rounds > 1 and args.device == "cpu" and args.memory_run == "shared":
        parser.error("--rounds > 1 times later rounds with the default malloc: use --memory-run separate or off")
    cuda = args.device == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    iters = args.iters if args.iters is not None else (50 if cuda else 5)

    if args.baseline is None:
        if DEFAULT_BASELINE in args.models and len(args.models) >= 2:
            baseline = DEFAULT_BASELINE
        else:
            baseline = args.models[-1] if len(args.models) >= 2 else None
    elif args.baseline.lower() == "none":
        baseline = None
    else:
        baseline = args.baseline
        if baseline not in args.models:
            parser.error(f"--baseline {baseline!r} is not one of --models ({' '.join(args.models)}); "
                         "it has to be measured in the same run")

    if args.max_memory_gb is None:
        total = _total_ram_gb()
        max_mem_gb = round(0.85 * total, 2) if total else None
    else:
        max_mem_gb = args.max_memory_gb if args.max_memory_gb > 0 else None
    if max_mem_gb is not None and args.max_memory_gb is not None:
        try:
            import psutil  # noqa: F401
        except ImportError:
            parser.error("--max-memory-gb needs psutil (pip install psutil)")
    max_mem_bytes = int(max_mem_gb * 2**30) if max_mem_gb else None

    out = check_out_dir(args.out)  # before any work
    check_models(args.models)      # fails fast, listing close matches
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")

    dtype = f"amp-{args.amp}" if args.amp else "fp32"
    meta = make_meta(args, baseline, dtype, warmup, iters, max_mem_gb)

    points = [(m, r) for r in sorted(args.resolutions) for m in args.models]  # side by side per resolution
    n = len(points)
    rows: list[dict] = []
    failed_at: dict[str, tuple[int, str]] = {}
    t_start = time.monotonic()
    print(f"benchmark: {n} points ({len(args.models)} models x {len(args.resolutions)} resolutions), {args.mode}, "
          f"batch {args.batch_size}, {args.device} ({'GPU 0' if cuda else meta['cpu']}), {args.threads} threads, "
          f"{dtype}, warmup {warmup}, iters {iters}, out {out}", file=sys.stderr, flush=True)
    for i, (model, res) in enumerate(points, 1):
        tag = f"[{i}/{n}] {model} @ {res}x{res} {args.mode}"
        row = {"model": model, "resolution": res, "batch_size": args.batch_size, "mode": args.mode,
               "device": args.device, "dtype": dtype, "channels_last": args.channels_last, "threads": args.threads}
        if model in failed_at and not args.no_skip_larger:
            r0, st = failed_at[model]
            row.update(status="skipped", error=f"not run: {st} at {r0}x{r0}")
            print(f"{tag} ... skipped ({st} at {r0})", file=sys.stderr, flush=True)
        else:
            print(f"{tag} ...", file=sys.stderr, flush=True)
            res_d = measure_point(args, model, res, warmup, iters, max_mem_bytes)
            row.update({k: v for k, v in res_d.items() if k in COLUMNS and k not in row})
            row["status"] = res_d.get("status", "error")
            if res_d.get("gpu") and not meta.get("gpu"):
                meta["gpu"] = res_d["gpu"]
            if row["status"] == "ok":
                mem = row.get("peak_act_mem_mib")
                msg = (f"{row['throughput_img_s']:.2f} img/s, {row['latency_ms_median']:.1f} ms"
                       + (f", {mem:.1f} MiB" if mem is not None else ""))
            else:
                msg = f"{row['status'].upper()}: {row.get('error') or ''}"
                if row["status"] in ("oom", "timeout"):
                    failed_at[model] = (res, row["status"])
            print(f"{tag} ... {msg}  ({res_d.get('wall_s', 0):.0f} s)", file=sys.stderr, flush=True)
        rows.append(row)
        apply_baseline(rows, baseline)
        write_tables(out, meta, rows)

    extra: dict[int, list[dict]] = {i: [] for i, r in enumerate(rows) if r["status"] == "ok"}
    for rnd in range(2, args.rounds + 1):  # round-robin: a slow phase of the machine hits every model
        for i in extra:
            model, res = rows[i]["model"], rows[i]["resolution"]
            t = time_point(args, model, res, warmup, iters, max_mem_bytes)
            extra[i].append(t)
            msg = f"{t['latency_ms_median']:.1f} ms" if t.get("status") == "ok" else t.get("status", "error").upper()
            print(f"[round {rnd}/{args.rounds}] {model} @ {res}x{res} {args.mode} ... {msg}", file=sys.stderr,
                  flush=True)
    if args.rounds > 1:
        for i, e in extra.items():
            merge_rounds(rows[i], e)
        apply_baseline(rows, baseline)

    meta["wall_s"] = round(time.monotonic() - t_start, 1)
    write_tables(out, meta, rows)
    files = [os.path.join(out, "benchmark.csv"), os.path.join(out, "benchmark.json")]
    if not args.no_plot:
        try:
            files.append(plot(out, meta, rows))
        except Exception as e:  # a plotting problem must not lose the measurements
            print(f"warning: could not write the plot: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    print(markdown_table(rows, baseline), flush=True)
    note = "" if args.memory_run == "separate" or cuda else f" (memory run: {args.memory_run})"
    print(f"wrote {', '.join(files)}{note}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
