"""tools/export.py end to end on tiny models: .pt2, ONNX and TorchScript files verified against eager, a checkpoint, the
onnxruntime-vs-eager benchmark (JSON + PNG), and the errors for bad input (nothing left behind)."""
import json

import pytest
import timm
import torch

import visionlin  # noqa: F401
from visionlin import deploy
from zoo import load_tool, tiny_args

export = load_tool("export")


def kwargs_for(name):
    return ["--model-kwargs", *(f"{k}={v!r}".replace(" ", "") for k, v in tiny_args(name).items())]


def test_pt2_with_dynamic_dims_is_verified_and_loads(tmp_path, capsys):
    out = tmp_path / "vim.pt2"
    result = export.main(["vim_t", "--format", "pt2", "--img-size", "64", "--batch-size", "2", "--dynamic",
                          "--out", str(out), *kwargs_for("vim_t")])
    assert result["dynamic"] == ["batch", "height", "width"] and result["max_abs_error"] <= 1e-4
    assert "max |pt2 - eager|" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vim.pt2"]
    program = deploy.load_program(out).module()
    assert program(torch.randn(3, 3, 96, 64)).shape == (3, 1000)


def test_torchscript_file_is_verified_takes_other_sizes_and_benchmarks_from_one_file(tmp_path, capsys):
    out = tmp_path / "vmamba.pt"
    result = export.main(["vmamba_t", "--format", "torchscript", "--img-size", "64", "--out", str(out), "--benchmark",
                          "--sizes", "64", "96", "--rounds", "2", "--iters", "1", *kwargs_for("vmamba_t")])
    assert result["dynamic"] == ["batch", "height", "width"] and result["max_abs_error"] <= 1e-4
    printed = capsys.readouterr().out
    assert "max |torchscript - eager|" in printed and "| 96 |" in printed and "exporting" in printed
    assert [(r["size"], r["runtime"]) for r in result["benchmark"]] == [(64, "torchscript"), (96, "torchscript")]
    assert all(r["max_abs_error"] <= 1e-4 for r in result["benchmark"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmamba.pt", "vmamba.pt.benchmark.json",
                                                          "vmamba.pt.benchmark.png"]
    assert deploy.load_script(out)(torch.randn(3, 3, 96, 64)).shape == (3, 1000)


def test_onnx_from_a_checkpoint_carries_its_weights(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(3)
    model = timm.create_model("ravlt_t", num_classes=7, **tiny_args("ravlt_t")).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "m.onnx"
    export.main(["ravlt_t", "--format", "onnx", "--img-size", "64", "--num-classes", "7", "--checkpoint",
                 str(tmp_path / "w.safetensors"), "--out", str(out), *kwargs_for("ravlt_t")])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert deploy.max_abs_error(deploy.run_onnx(deploy.onnx_session(out), x), model(x)) <= 1e-4


def test_benchmark_reports_both_sides_per_size_and_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    result = export.main(["ravlt_t", "--format", "onnx", "--img-size", "64", "--out", str(out), "--benchmark",
                          "--sizes", "64", "96", "--rounds", "2", "--iters", "1", *kwargs_for("ravlt_t")])
    rows = result["benchmark"]
    assert [r["size"] for r in rows] == [64, 96]
    for r in rows:
        assert r["eager_ms"] > 0 and r["exported_ms"] > 0 and r["max_abs_error"] <= 1e-4
        assert r["runtime"] == "onnxruntime"
        assert r["eager_over_exported"] == pytest.approx(r["eager_ms"] / r["exported_ms"])
    saved = json.loads((tmp_path / "m.onnx.benchmark.json").read_text())
    assert saved["rows"] == rows and saved["meta"]["rounds"] == 2
    assert (tmp_path / "m.onnx.benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 96 |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.benchmark.json", "m.onnx.benchmark.png"]


@pytest.mark.parametrize("argv,message", [
    (["vig_xx", "--format", "onnx"], "unknown model 'vig_xx'"),
    (["vig_t", "--format", "onnx", "--img-size", "100"], "multiples of 16"),
    (["ravlt_t", "--format", "pt2", "--img-size", "48"], "multiples of 32"),
    (["vig_t", "--format", "pt2", "--benchmark"], "use it with --format onnx or torchscript"),
    (["vim_t", "--format", "torchscript", "--img-size", "40"], "multiples of 16"),
    (["vig_t", "--format", "onnx", "--model-kwargs", "depth"], "KEY=VALUE"),
    (["vig_t", "--format", "onnx", "--checkpoint", "missing.pth"], "checkpoint not found: missing.pth"),
])
def test_bad_input_is_one_clear_error(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message):
        export.main(argv)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_missing_output_folder_is_named_and_nothing_is_written(tmp_path, fmt):
    with pytest.raises(SystemExit, match="does not exist"):
        export.main(["ravlt_t", "--format", fmt, "--img-size", "64", "--out", str(tmp_path / "no" / "m.file"),
                     *kwargs_for("ravlt_t")])
    assert list(tmp_path.iterdir()) == []
