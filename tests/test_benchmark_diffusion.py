"""tools/benchmark_diffusion.py: end to end on micro settings (worker subprocesses), failure handling, argument
errors, the models it builds and the scaling arithmetic. Timings are never asserted beyond their order."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from zoo import load_tool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "benchmark_diffusion.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
bench = load_tool("benchmark_diffusion")

MICRO_LAYER = ["--layer-dim", "64", "--layer-heads", "4", "--warmup", "1", "--iters", "2", "--threads", "1"]


def _run(args, timeout=300):
    proc = subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _rows(out: Path):
    data = json.loads((out / "benchmark_diffusion.json").read_text())
    return data["meta"], {(r["model"], r["image_size"]): r for r in data["rows"]}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The layer level at 128² and 256² images (256 and 1024 tokens); attn_softmax is made to fail."""
    out = tmp_path_factory.mktemp("bench_diffusion")
    proc = _run(["--models", "attn_softmax", "attn_softmax_matmul", "attn_linfusion", "--image-sizes", "256", "128",
                 *MICRO_LAYER, "--memory-run", "shared", "--_test-fail", "attn_softmax", "--out", out])
    return out, proc


@pytest.mark.slow
def test_micro_run_writes_csv_json_png_with_one_row_per_model_and_size(micro):
    out, proc = micro
    meta, rows = _rows(out)
    assert set(rows) == {(m, s) for m in ("attn_softmax", "attn_softmax_matmul", "attn_linfusion") for s in (128, 256)}
    assert [(r["tokens"], r["latent_size"]) for (m, s), r in sorted(rows.items()) if m == "attn_linfusion"] == [
        (256, 16), (1024, 32)]
    with open(out / "benchmark_diffusion.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert {(r["model"], int(r["image_size"])) for r in csv_rows} == set(rows)
    assert list(csv_rows[0]) == bench.COLUMNS
    assert (out / "benchmark_diffusion.png").read_bytes()[:8] == PNG_MAGIC
    assert meta["configs"]["layer"] == {"dim": 64, "heads": 4, "feature_dim": "d"}
    assert meta["threads"] == 1 and meta["image_sizes"] == [128, 256] and len(meta["load_avg_end"]) == 3
    assert "[1/6]" in proc.stderr and "[6/6]" in proc.stderr
    assert "| layer | attn_linfusion | 256² | 32² | 1024 | ok |" in proc.stdout
    assert "log-log slope against tokens" in proc.stdout


@pytest.mark.slow
def test_a_failing_point_is_an_error_row_and_the_run_goes_on(micro):
    out, _ = micro
    _, rows = _rows(out)
    for size in (128, 256):  # an error is not a size limit: the larger size still runs
        assert rows["attn_softmax", size]["status"] == "error"
        assert "--_test-fail" in rows["attn_softmax", size]["error"]
        assert rows["attn_linfusion", size]["speedup_vs_teacher"] is None  # its teacher has no number
    for model in ("attn_softmax_matmul", "attn_linfusion"):
        for size in (128, 256):
            r = rows[model, size]
            assert r["status"] == "ok", r
            assert 0 < r["latency_ms_min"] <= r["latency_ms_median"] <= r["latency_ms_max"]
            assert 1 <= r["iters_timed"] <= 2 and r["timing_run"] == "memory"
            assert r["peak_act_mem_mib"] >= 0 and r["param_count"] > 0


@pytest.mark.slow
def test_explicit_attention_memory_is_at_least_its_score_matrix(micro):
    """heads x N x N fp32 scores must show up in the measured peak: the number is measured, not assumed."""
    out, _ = micro
    meta, rows = _rows(out)
    scores_mib = 4 * 1024 * 1024 * 4 / 2**20  # 4 heads, 1024 tokens
    assert rows["attn_softmax_matmul", 256]["peak_act_mem_mib"] >= scores_mib
    assert rows["attn_linfusion", 256]["peak_act_mem_mib"] < scores_mib
    slopes = {s["model"]: s for s in meta["slopes"]}
    assert slopes["attn_softmax_matmul"]["memory_slope_fit"] > 1.5  # 4x the tokens, > 8x the memory
    assert slopes["attn_softmax"]["time_slope_fit"] is None  # no ok points


@pytest.mark.slow
def test_timeout_marks_the_point_and_skips_the_larger_sizes(tmp_path):
    proc = _run(["--models", "attn_linfusion", "--image-sizes", "128", "256", *MICRO_LAYER, "--timeout", "0.5",
                 "--out", tmp_path])
    _, rows = _rows(tmp_path)
    assert rows["attn_linfusion", 128]["status"] == "timeout"
    assert rows["attn_linfusion", 256]["status"] == "skipped"
    assert "not run: timeout at 128²" in rows["attn_linfusion", 256]["error"]
    assert "**timeout**" in proc.stdout and (tmp_path / "benchmark_diffusion.png").exists()


@pytest.mark.slow
def test_memory_watchdog_marks_oom(tmp_path):
    _run(["--models", "attn_linfusion", "--image-sizes", "128", "256", *MICRO_LAYER, "--max-memory-gb", "0.05",
          "--no-skip-larger", "--no-plot", "--out", tmp_path])
    _, rows = _rows(tmp_path)
    for size in (128, 256):
        assert rows["attn_linfusion", size]["status"] == "oom"
        assert "--max-memory-gb" in rows["attn_linfusion", size]["error"]


@pytest.mark.parametrize("args, message", [
    (["--image-sizes", "200"], "--image-sizes 200: must be multiples of 16"),
    (["--models", "unet_softmax", "--unet-channels", "32", "64", "128", "--unet-head-dim", "32",
      "--image-sizes", "512", "80"], "--image-sizes 80: must be multiples of 32"),
    (["--models", "attn_softmax", "--image-sizes", "100"], "--image-sizes 100: must be multiples of 8"),
    (["--layer-dim", "320", "--layer-heads", "7"], "--layer-dim 320 is not divisible by --layer-heads 7"),
    (["--unet-channels", "48", "64"], "--unet-channels 48: every level's channels must be a multiple of 32"),
    (["--models", "vae"], "argument --models: invalid choice: 'vae'"),
    (["--feature-dim", "d*2"], "'d*2' is not 'd', 'd/<k>'"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--max-seconds", "-1"], "--max-seconds must be > 0"),
    (["--dit-size", "M"], "argument --dit-size: invalid choice: 'M'"),
])
def test_bad_arguments_exit_naming_the_flag(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main([*args, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda but torch.cuda.is_available"):
        bench.main(["--models", "attn_linfusion", "--device", "cuda", "--out", str(tmp_path)])


def _spec(model, **config):
    args = bench.build_parser().parse_args(["--layer-dim", "32", "--layer-heads", "2", "--unet-channels", "32", "64",
                                            "--unet-head-dim", "32", "--cross-attention-dim", "16",
                                            "--text-tokens", "4", "--dit-depth", "1", *config.get("argv", [])])
    return {"model": model, "image_size": 128, "config": bench.point_config(args), "device": "cpu",
            "threads": torch.get_num_threads(), "warmup": 0, "iters": 2, "max_seconds": 1e-9, "measure": "time"}


def test_students_get_linear_attention_in_attn1_only_and_teachers_keep_softmax():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from visionlin.diffusion import LinDiTTransformer2DModel, LinFusionAttnProcessor

    layer = lambda name: bench.build(_spec(name), torch.device("cpu"))[0]  # noqa: E731
    assert type(layer("attn_softmax").processor) is AttnProcessor2_0
    assert type(layer("attn_softmax_matmul").processor) is AttnProcessor
    assert type(layer("attn_linfusion").processor) is LinFusionAttnProcessor
    unet = bench.build(_spec("unet_linfusion"), torch.device("cpu"))[0]
    kinds = {}
    for n, m in unet.named_modules():
        if n.endswith(("attn1", "attn2")):
            kinds.setdefault(n[-5:], set()).add(type(m.processor))
    assert kinds == {"attn1": {LinFusionAttnProcessor}, "attn2": {AttnProcessor2_0}}
    teacher = bench.build(_spec("unet_softmax"), torch.device("cpu"))[0]
    assert {type(m.processor) for m in teacher.modules() if hasattr(m, "processor")} == {AttnProcessor2_0}
    assert isinstance(bench.build(_spec("lindit"), torch.device("cpu"))[0], LinDiTTransformer2DModel)
    feature = bench.build(_spec("attn_linfusion", argv=["--feature-dim", "d/4"]), torch.device("cpu"))[0]
    assert feature.processor.attention.to_q_[0].out_features == 8


@pytest.mark.parametrize("model", list(bench.MODELS))
def test_every_model_runs_a_timed_forward_in_process(model):
    out = bench.run_point(_spec(model))
    assert out["status"] == "ok" and out["iters_timed"] == 1  # max_seconds is already spent after one
    assert out["latency_ms_median"] > 0 and "peak_act_mem_mib" not in out


def test_loglog_slope_recovers_the_exponent():
    assert bench.loglog_slope([(n, 3.0 * n) for n in (256, 1024, 4096)]) == pytest.approx(1.0)
    assert bench.loglog_slope([(n, 1e-3 * n * n + 5) for n in (2**20, 2**22)]) == pytest.approx(2.0, abs=1e-3)
    assert bench.loglog_slope([(1024, 5.0)]) is None
    assert bench.loglog_slope([(1024, 5.0), (1024, 6.0)]) is None


def _row(model, size, status="ok", ms=None, mem=None):
    level, teacher, _ = bench.MODELS[model]
    return {"model": model, "level": level, "teacher": teacher, "image_size": size,
            "tokens": bench.tokens_of(level, size), "status": status, "latency_ms_median": ms, "peak_act_mem_mib": mem}


def test_slopes_use_only_ok_points_and_report_the_largest_pair():
    rows = [_row("dit", 512, ms=10.0, mem=1.0), _row("dit", 1024, ms=40.0, mem=4.0),
            _row("dit", 2048, ms=640.0, mem=16.0), _row("lindit", 512, ms=8.0, mem=2.0),
            _row("lindit", 1024, ms=32.0, mem=8.0), _row("lindit", 2048, status="timeout")]
    slopes = {s["model"]: s for s in bench.scaling_slopes(rows)}
    assert slopes["dit"]["tokens"] == [1024, 4096, 16384]
    assert slopes["dit"]["time_slope_last_pair"] == pytest.approx(2.0)
    assert slopes["dit"]["memory_slope_fit"] == pytest.approx(1.0)
    assert slopes["lindit"]["tokens"] == [1024, 4096] and slopes["lindit"]["time_slope_fit"] == pytest.approx(1.0)


def test_teacher_ratios_compare_the_same_image_size():
    rows = [_row("unet_softmax", 512, ms=300.0, mem=40.0), _row("unet_linfusion", 512, ms=100.0, mem=10.0),
            _row("unet_softmax", 1024, status="oom"), _row("unet_linfusion", 1024, ms=400.0, mem=40.0)]
    bench.apply_teachers(rows)
    assert rows[1]["speedup_vs_teacher"] == pytest.approx(3.0) and rows[1]["mem_frac_vs_teacher"] == pytest.approx(0.25)
    assert rows[3]["speedup_vs_teacher"] is None and rows[0]["speedup_vs_teacher"] is None


def test_cpu_allocator_refusal_counts_as_oom():
    refusal = RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 137438953472 bytes. Error code 12 (Cannot allocate memory)")
    assert bench.classify_exception(refusal) == "oom"
    assert bench.classify_exception(ValueError("bad shape")) == "error"
