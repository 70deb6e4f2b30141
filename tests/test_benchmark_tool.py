"""End-to-end checks of tools/benchmark.py on tiny timm models (CPU, a few worker processes).

Timing values are never asserted beyond "> 0": only structure, statuses and the memory method.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs of the tool in subprocesses

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "benchmark.py"
WORKER = ROOT / "tools" / "_bench_worker.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(args, timeout=240, env=None):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _clear_refs_writable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """2 models x 2 resolutions; test_vit @ 72 is not divisible by its patch size 16 -> an 'error' point."""
    out = tmp_path_factory.mktemp("bench")
    proc = _run(["--models", "test_vit", "test_convnext", "--resolutions", "64", "72",
                 "--warmup", "1", "--iters", "1", "--threads", "1", "--memory-run", "shared",
                 "--baseline", "test_convnext", "--out", out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_outputs_exist_and_are_valid(e2e):
    out, proc = e2e
    assert (out / "benchmark.png").read_bytes()[:8] == PNG_MAGIC
    data = json.loads((out / "benchmark.json").read_text())
    rows = data["rows"]
    assert len(rows) == 2 * 2
    assert {(r["model"], r["resolution"]) for r in rows} == {
        (m, r) for m in ("test_vit", "test_convnext") for r in (64, 72)}
    meta = data["meta"]
    for k in ("torch", "timm", "threads", "cpu", "mode", "device", "batch_size"):
        assert meta.get(k) not in (None, ""), k
    assert meta["threads"] == 1 and meta["baseline"] == "test_convnext"
    with open(out / "benchmark.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"model", "resolution", "status", "throughput_img_s", "peak_act_mem_mib",
            "latency_ms_median", "memory_method", "param_count"} <= set(csv_rows[0])
    # progress lines and the markdown table
    assert "[1/4]" in proc.stderr and "[4/4]" in proc.stderr
    assert "| model | res | status" in proc.stdout and "speedup vs test_convnext" in proc.stdout


def test_ok_points_have_sane_numbers(e2e):
    out, _ = e2e
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    ok = [r for r in rows if not (r["model"] == "test_vit" and r["resolution"] == 72)]
    assert len(ok) == 3
    for r in ok:
        assert r["status"] == "ok", r
        assert r["throughput_img_s"] > 0 and r["latency_ms_median"] > 0
        assert r["latency_ms_min"] <= r["latency_ms_median"] <= r["latency_ms_max"]
        assert r["peak_act_mem_mib"] >= 0 and r["peak_total_mem_mib"] > 0
        assert r["param_count"] > 0 and r["params_mib"] > 0
        assert r["memory_method"]
    by = {(r["model"], r["resolution"]): r for r in rows}
    assert by[("test_vit", 64)]["img_size_kwarg"] is True        # built with img_size=64
    assert by[("test_convnext", 64)]["img_size_kwarg"] is False  # no img_size kwarg: TypeError fallback
    assert by[("test_convnext", 64)]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert by[("test_vit", 64)]["speedup_vs_baseline"] > 0


def test_failing_point_is_marked_not_fatal(e2e):
    out, proc = e2e
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    bad = [r for r in rows if r["model"] == "test_vit" and r["resolution"] == 72]
    assert len(bad) == 1 and bad[0]["status"] == "error"
    assert "divisible" in bad[0]["error"] and bad[0]["throughput_img_s"] is None
    assert "divisible" in proc.stdout + proc.stderr  # the worker's message is shown


def test_unknown_model_fails_fast(tmp_path):
    proc = _run(["--models", "test_vit", "deit_tinyy_patch16_224", "--out", tmp_path / "o"], timeout=120)
    assert proc.returncode != 0
    msg = proc.stderr + proc.stdout
    assert "deit_tinyy_patch16_224" in msg and "deit_tiny_patch16_224" in msg  # names it, lists close matches
    assert "[1/" not in msg  # nothing was measured
    assert not (tmp_path / "o" / "benchmark.json").exists()


def test_memory_is_measured_not_hardcoded(tmp_path):
    """Separate timing/memory processes (the default); the memory run allocates a known 200 MiB tensor
    in every measured iteration (testing-only hook), which must show up in peak_act_mem."""
    out = tmp_path / "mem"
    proc = _run(["--models", "test_vit", "--resolutions", "64", "--warmup", "1", "--iters", "1",
                 "--threads", "1", "--no-flops", "--no-plot", "--_test-alloc-mib", "200", "--out", out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads((out / "benchmark.json").read_text())["rows"]
    assert row["status"] == "ok", row
    assert row["peak_act_mem_mib"] >= 180, row
    assert row["peak_act_mem_mib"] < 1000, row
    assert row["throughput_img_s"] > 0
    if _clear_refs_writable():
        assert "VmHWM" in row["memory_method"]


def test_memory_fallback_sampler(tmp_path):
    """The psutil RSS sampler used where /proc/self/clear_refs is not writable (forced by env var)."""
    spec = {"model": "test_vit", "resolution": 64, "batch_size": 1, "mode": "forward", "device": "cpu",
            "amp": None, "channels_last": False, "threads": 1, "warmup": 1, "iters": 1, "measure": "memory",
            "count_flops": False, "test_alloc_mib": 200}
    env = dict(os.environ, VISIONLIN_BENCH_NO_CLEAR_REFS="1", MALLOC_MMAP_THRESHOLD_="65536",
               MALLOC_TRIM_THRESHOLD_="0")
    res_path = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec), str(res_path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(res_path.read_text())
    assert res["status"] == "ok", res
    assert "psutil" in res["memory_method"]
    assert res["peak_act_mem_mib"] >= 100, res  # sampled every 1 ms while 200 MiB are being filled


def _load_tool():
    """tools/benchmark.py as a module (it imports torch/timm lazily, so this is cheap)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("visionlin_benchmark_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_SPEC = {"model": "test_vit", "resolution": 64, "batch_size": 1, "mode": "forward", "device": "cpu", "amp": None,
         "channels_last": False, "threads": 1, "warmup": 1, "iters": 1, "measure": "both", "count_flops": False,
         "test_alloc_mib": 0}


def test_watchdog_marks_oom():
    """A worker whose RSS passes --max-memory-gb is killed and reported as 'oom' (not an exception)."""
    tool = _load_tool()
    res = tool.run_worker(dict(_SPEC), {}, timeout=120, max_mem_bytes=50 * 2**20)
    assert res["status"] == "oom" and "max-memory-gb" in res["error"], res


def test_timeout_is_marked():
    tool = _load_tool()
    res = tool.run_worker(dict(_SPEC), {}, timeout=0.3, max_mem_bytes=None)
    assert res["status"] == "timeout", res


def test_baseline_ratios_and_table():
    tool = _load_tool()
    rows = [
        {"model": "a", "resolution": 224, "status": "ok", "throughput_img_s": 20.0, "peak_act_mem_mib": 5.0},
        {"model": "b", "resolution": 224, "status": "ok", "throughput_img_s": 10.0, "peak_act_mem_mib": 20.0},
        {"model": "a", "resolution": 512, "status": "oom", "error": "worker killed by SIGKILL"},
        {"model": "b", "resolution": 512, "status": "ok", "throughput_img_s": 1.0, "peak_act_mem_mib": 50.0},
    ]
    tool.apply_baseline(rows, "b")
    assert rows[0]["speedup_vs_baseline"] == pytest.approx(2.0)
    assert rows[0]["mem_frac_vs_baseline"] == pytest.approx(0.25)
    assert rows[1]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert rows[2]["speedup_vs_baseline"] is None
    table = tool.markdown_table(rows, "b")
    assert "2.00x" in table and "0.25x" in table and "**oom**" in table


def test_train_mode_times_forward_and_backward_of_a_visionlin_model(tmp_path):
    out = tmp_path / "train"
    proc = _run(["--models", "vig_t", "--resolutions", "64", "--mode", "train", "--warmup", "1", "--iters", "1",
                 "--threads", "1", "--memory-run", "shared", "--no-plot", "--out", out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads((out / "benchmark.json").read_text())["rows"]
    assert row["status"] == "ok" and row["mode"] == "train", row
    assert row["throughput_img_s"] > 0 and row["peak_act_mem_mib"] > 0
    assert round(row["gmacs"] * (224 / 64) ** 2, 2) == pytest.approx(1.17, abs=0.1)


def test_rounds_report_the_median_of_round_medians():
    tool = _load_tool()
    row = {"model": "a", "resolution": 224, "batch_size": 2, "status": "ok", "latency_ms_median": 100.0,
           "latency_ms_min": 90.0, "latency_ms_max": 400.0, "throughput_img_s": 20.0}
    extra = [{"status": "ok", "latency_ms_median": 50.0, "latency_ms_min": 45.0, "latency_ms_max": 60.0},
             {"status": "timeout"},
             {"status": "ok", "latency_ms_median": 70.0, "latency_ms_min": 65.0, "latency_ms_max": 80.0}]
    tool.merge_rounds(row, extra)
    assert row["latency_ms_median"] == 70.0 and row["rounds"] == 3          # the failed round is left out
    assert (row["latency_ms_min"], row["latency_ms_max"]) == (45.0, 400.0)
    assert row["throughput_img_s"] == pytest.approx(2 / 0.070)


def test_rounds_time_every_ok_point_again_round_robin(tmp_path):
    out = tmp_path / "rounds"
    proc = _run(["--models", "test_vit", "test_convnext", "--resolutions", "64", "--rounds", "3", "--warmup", "1",
                 "--iters", "1", "--threads", "1", "--memory-run", "off", "--no-plot", "--no-flops", "--out", out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    order = [ln.split("] ")[1].split(" @")[0] for ln in proc.stderr.splitlines() if ln.startswith("[round ")]
    assert order == ["test_vit", "test_convnext"] * 2
    data = json.loads((out / "benchmark.json").read_text())
    assert data["meta"]["rounds"] == 3
    for row in data["rows"]:
        assert row["status"] == "ok" and row["latency_ms_min"] <= row["latency_ms_median"] <= row["latency_ms_max"]
    assert "--memory-run separate or off" in _run(["--models", "test_vit", "--rounds", "2", "--memory-run", "shared",
                                                   "--out", tmp_path / "x"]).stderr
