"""Worker for ``tools/benchmark.py``: measures ONE (model, resolution) point in a fresh process.

Not meant to be run by hand. ``tools/benchmark.py`` starts it as::

    python tools/_bench_worker.py '<spec as JSON>' /path/to/result.json

and reads the result JSON back (written atomically, also on failure). The spec keys are:

    model, resolution, batch_size, mode ("forward"|"train"), device ("cpu"|"cuda"),
    amp (null|"bf16"|"fp16"), channels_last (bool), threads (int), warmup (int), iters (int),
    measure ("time" | "memory" | "both"), count_flops (bool),
    test_alloc_mib (float, TESTING ONLY: allocate and touch a tensor of this many MiB inside
    every measured iteration, to prove the memory number is measured and not hard-coded)

How memory is measured (see the module docstring of ``tools/benchmark.py`` for the rationale):

* CPU: the parent starts this process with ``MALLOC_MMAP_THRESHOLD_=65536`` and
  ``MALLOC_TRIM_THRESHOLD_=0`` so glibc hands freed buffers back to the OS and RSS follows live
  memory. After the warm-up, VmRSS is read as the baseline, ``5`` is written to
  ``/proc/self/clear_refs`` (this resets the VmHWM high-water mark to the current RSS), the
  measured iterations run, and ``peak_act_mem = VmHWM - baseline``. If ``clear_refs`` is not
  writable (or the environment variable ``VISIONLIN_BENCH_NO_CLEAR_REFS=1`` is set, for tests),
  a background thread samples RSS with psutil every millisecond instead; that can miss very
  short spikes and is labelled as such in ``memory_method``.
* CUDA: ``torch.cuda.reset_peak_memory_stats()`` after the warm-up, baseline =
  ``torch.cuda.memory_allocated()``, ``peak_act_mem = max_memory_allocated() - baseline``.

In ``train`` mode the parameter gradients are allocated during the warm-up and kept (they
accumulate; there is no optimizer), so they are part of the baseline: the peak is the memory
of activations and backward temporaries on top of parameters + gradients.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import threading
import time
import traceback

MIB = 2.0 ** 20


# ----------------------------------------------------------------------------- memory probes
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def _try_reset_hwm() -> bool:
    if os.environ.get("VISIONLIN_BENCH_NO_CLEAR_REFS") == "1":
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


class _RssSampler:
    """Fallback when VmHWM cannot be reset: sample RSS in a thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.001):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


# ----------------------------------------------------------------------------- model helpers
def build_model(timm, name: str, res: int):
    """img_size=res (resamples pos-embeds of fixed-size models); models without img_size fall back."""
    try:
        return timm.create_model(name, img_size=res, num_classes=1000), True
    except TypeError:
        pass
    try:
        return timm.create_model(name, num_classes=1000), False
    except TypeError:
        return timm.create_model(name), False


def check_patch_size(model, res: int, name: str):
    """Clear message for resolutions a fixed patch embedding cannot take (instead of a deep assert)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "dynamic_img_pad", False):
        return
    ps = getattr(pe, "patch_size", None)
    if isinstance(ps, int):
        ps = (ps, ps)
    if not (isinstance(ps, (tuple, list)) and len(ps) == 2 and all(isinstance(p, int) for p in ps)):
        return
    bad = [p for p in ps if res % p]
    if bad:
        raise ValueError(f"resolution {res} is not divisible by the patch size {ps[0]}x{ps[1]} of {name}")


def _first_tensor(out):
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    return out


def classify_exception(e: BaseException) -> str:
    import torch

    if isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return "oom"
    msg = str(e).lower()
    if isinstance(e, RuntimeError) and ("out of memory" in msg or "not enough memory" in msg):
        return "oom"
    return "error"


def short_error(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- measurement
def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    import timm

    import visionlin  # noqa: F401  (registers our models with timm)

    out: dict = {
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "num_threads": torch.get_num_threads(),
    }
    name, res, bs = spec["model"], int(spec["resolution"]), int(spec["batch_size"])
    device = torch.device(spec["device"])
    is_cuda = device.type == "cuda"
    train = spec["mode"] == "train"
    measure = spec["measure"]

    if is_cuda:
        out["gpu"] = torch.cuda.get_device_name(device)
    model, used_img_size = build_model(timm, name, res)
    out["img_size_kwarg"] = used_img_size
    params = list(model.parameters())
    out["param_count"] = sum(p.numel() for p in params)
    out["params_mib"] = (
        sum(p.numel() * p.element_size() for p in params)
        + sum(b.numel() * b.element_size() for b in model.buffers())
    ) / MIB
    check_patch_size(model, res, name)

    memory_format = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    model.train(train)
    x = torch.randn(bs, 3, res, res, device=device).contiguous(memory_format=memory_format)

    amp = spec.get("amp")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if amp else None

    def amp_ctx():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    test_alloc = float(spec.get("test_alloc_mib") or 0.0) if measure in ("memory", "both") else 0.0

    def step(measured: bool):
        with amp_ctx():
            y = model(x)
        if measured and test_alloc:  # TESTING ONLY: a known, touched allocation inside the measured section
            buf = torch.ones(int(test_alloc * MIB) // 4, dtype=torch.float32, device=device)
            del buf
        if train:
            _first_tensor(y).float().mean().backward()
        del y

    with contextlib.nullcontext() if train else torch.inference_mode():
        lat = measure_steps(step, spec, device, out)

    if spec.get("count_flops"):
        # after all measurements, so the counting (a TorchDispatchMode) cannot disturb them
        out["gmacs"] = count_gmacs(model, x, amp_ctx, bs)

    lat_ms = [t * 1000.0 for t in lat]
    out["latencies_ms"] = lat_ms
    med = statistics.median(lat_ms)
    out["latency_ms_median"] = med
    out["latency_ms_min"] = min(lat_ms)
    out["latency_ms_max"] = max(lat_ms)
    out["throughput_img_s"] = bs / (med / 1000.0) if med > 0 else None
    out["status"] = "ok"
    return out


def measure_steps(step, spec: dict, device, out: dict) -> list:
    """Run ``step(False)`` spec["warmup"] times, then time ``step(True)`` spec["iters"] times (fewer once
    spec.get("max_seconds") are spent), synchronising CUDA around each; when spec["measure"] is "memory" or
    "both" (always on CUDA) also the peak memory those timed iterations need, written to ``out``
    (peak_act_mem_mib, peak_total_mem_mib, baseline_mem_mib, memory_method). Returns the latencies in seconds.
    Shared by this worker and tools/benchmark_diffusion.py."""
    import torch

    is_cuda = device.type == "cuda"
    measure = spec["measure"]

    def sync():
        if is_cuda:
            torch.cuda.synchronize(device)

    for _ in range(int(spec["warmup"])):
        step(False)
    sync()
    gc.collect()
    sampler = None
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out["memory_method"] = "torch.cuda.max_memory_allocated"
    elif measure in ("memory", "both"):
        base = _rss_bytes()
        if _try_reset_hwm():
            out["memory_method"] = "VmHWM after clear_refs (malloc mmap threshold 64 KiB)"
        else:
            sampler = _RssSampler()
            out["memory_method"] = "psutil RSS sampled every 1 ms (clear_refs unavailable; may miss short spikes)"
            sampler.__enter__()
    latencies = []
    budget = spec.get("max_seconds")
    try:
        while len(latencies) < int(spec["iters"]) and not (budget and latencies and sum(latencies) >= budget):
            sync()
            t0 = time.perf_counter()
            step(True)
            sync()
            latencies.append(time.perf_counter() - t0)
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
    if is_cuda or measure in ("memory", "both"):
        if is_cuda:
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = sampler.peak if sampler is not None else _proc_status_kib("VmHWM") * 1024
        out["peak_act_mem_mib"] = max(0.0, (peak - base) / MIB)
        out["peak_total_mem_mib"] = peak / MIB
        out["baseline_mem_mib"] = base / MIB
    return latencies


def count_gmacs(model, x, amp_ctx, bs: int):
    """Forward GMACs per image, counted as in tools/count_flops.py; None if it cannot count."""
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from count_flops import count_macs

        with amp_ctx():
            return count_macs(model, x.shape[-1], in_chans=x.shape[1])["total"]
    except Exception:
        return None


def _write_json_atomic(path: str, obj: dict):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: _bench_worker.py '<spec json>' RESULT_PATH  (internal helper of tools/benchmark.py)",
              file=sys.stderr)
        return 2
    spec, result_path = json.loads(argv[0]), argv[1]
    try:
        result = run(spec)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a status in the result file
        traceback.print_exc()
        try:
            status = classify_exception(e)
        except Exception:
            status = "error"
        result = {"status": status, "error": short_error(e)}
        if isinstance(e, KeyboardInterrupt):
            result = {"status": "error", "error": "interrupted"}
    _write_json_atomic(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
