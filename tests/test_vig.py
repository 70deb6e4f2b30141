"""ViG / ViG-H specifics: dynamic image size, position embeddings, official checkpoints and the converter
(timm conventions for every model: test_timm_conventions.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import visionlin  # noqa: F401  (registers the models)
from visionlin.models.vig import checkpoint_filter_fn

from zoo import SMALL, get_model, load_tool, tiny, tiny_args


def test_plain_vig_runs_at_any_size_divisible_by_16_and_rejects_others():
    model = tiny("vig_t").eval()
    with torch.no_grad():
        for size in [(64, 64), (96, 48), (240, 160)]:
            out = model.forward_features(torch.randn(1, 3, *size))
            assert out.shape == (1, size[0] // 16 * size[1] // 16, 64)
        with pytest.raises(ValueError, match="not divisible by 16"):
            model(torch.randn(1, 3, 64, 72))
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny("vig_h_t")(torch.randn(1, 3, 80, 80))


def test_position_embedding_is_resampled_not_ignored():
    model = tiny("vig_t").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        before = model(x)
        model.pos_embed.add_(torch.randn_like(model.pos_embed))
        assert not torch.allclose(model(x), before)


# --- official checkpoints ------------------------------------------------------------------------

def official_vig_state_dict(model):
    """A state dict in the official hustvl/ViG layout (key names from the release), from our model."""
    ours = model.state_dict()
    out = {"pos_embed": ours["pos_embed"]}
    for k, v in ours.items():
        if k.startswith("patch_embed.") or k in ("norm.weight", "head.weight", "head.bias"):
            out[k] = v
    for i in range(len(model.blocks)):
        p = f"blocks.{i}."
        out[p + "attn_norm.weight"] = ours[p + "norm1.weight"]
        out[p + "mlp_norm.weight"] = ours[p + "norm2.weight"]
        out[p + "mlp.gate_proj.weight"] = ours[p + "mlp.fc1.weight"]
        out[p + "mlp.down_proj.weight"] = ours[p + "mlp.fc2.weight"]
        for name in ("in_proj.0.weight", "qkv_proj.weight", "gk_proj.0.weight", "gk_proj.1.weight",
                     "gk_proj.1.bias", "o_proj.weight", "g_norm.weight", "l_norm.weight",
                     "g_proj.weight", "g_proj.bias"):
            out[p + "attn." + name] = ours[p + "attn." + name]
    return out


def official_vigh_state_dict(model):
    """Official ViG-H layout: patch_embed.{0,2,5,7}, layers.{s}.blocks.{j}.{norm,op,norm2,mlp},
    layers.{s}.downsample.{1,3} at the END of stage s, classifier.{norm,head}, 1x1-conv projections."""
    ours = model.state_dict()
    out = {}
    for ours_i, off_i in ((0, 0), (1, 2), (3, 5), (4, 7)):
        for t in ("weight", "bias"):
            out[f"patch_embed.{off_i}.{t}"] = ours[f"stem.{ours_i}.{t}"]
    for k, v in ours.items():
        if not k.startswith("stages."):
            continue
        parts = k.split(".")
        s = int(parts[1])
        if parts[2] == "downsample":
            out[f"layers.{s - 1}.downsample.{ {0: 1, 1: 3}[int(parts[3])] }.{parts[4]}"] = v
            continue
        rest = ".".join(parts[4:])
        rest = rest.replace("norm1.", "norm.", 1) if rest.startswith("norm1.") else rest
        rest = "op." + rest[len("attn."):] if rest.startswith("attn.") else rest
        if rest.endswith(("qkv_proj.weight", "g_proj.weight", "gk_proj.0.weight", "gk_proj.1.weight")):
            v = v[:, :, None, None]
        out[f"layers.{s}.blocks.{parts[3]}.{rest}"] = v
    for t in ("weight", "bias"):
        out[f"classifier.norm.{t}"] = ours[f"norm.{t}"]
        out[f"classifier.head.{t}"] = ours[f"head.{t}"]
    return out


def test_official_vig_s_layout_has_the_documented_180_keys():
    keys = official_vig_state_dict(get_model("vig_s")).keys()
    assert len(keys) == 180
    assert {"pos_embed", "patch_embed.proj.0.weight", "patch_embed.proj.4.bias", "blocks.11.attn.gk_proj.1.bias",
            "blocks.0.mlp.gate_proj.weight", "norm.weight", "head.bias"} <= set(keys)


@pytest.mark.parametrize("name,official", [("vig_t", official_vig_state_dict), ("vig_h_t", official_vigh_state_dict)])
def test_official_checkpoint_loads_through_timm_and_reproduces_outputs(tmp_path, name, official):
    source = tiny(name).eval()
    path = tmp_path / "official.pth"
    raw = {k: v + 1.0 for k, v in official(source).items()}  # 'model' differs: timm prefers 'model_ema'
    torch.save({"model": raw, "model_ema": official(source), "optimizer": {}, "epoch": 299}, path)
    loaded = tiny(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


@pytest.mark.parametrize("name,official", [("vig_t", official_vig_state_dict), ("vig_h_t", official_vigh_state_dict)])
def test_official_best_file_with_model_key_only_loads(tmp_path, name, official):
    source = tiny(name).eval()
    path = tmp_path / "best.pth"
    torch.save({"model": official(source)}, path)
    loaded = tiny(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_official_vig_h_s_checkpoint_converts_with_all_keys():
    model = get_model("vig_h_s")
    state = official_vigh_state_dict(model)
    converted = checkpoint_filter_fn({"model": state}, model)
    assert set(converted) == set(model.state_dict())
    for k, v in converted.items():
        assert v.shape == model.state_dict()[k].shape, k


def test_checkpoint_at_another_resolution_has_its_pos_embed_resampled(tmp_path):
    source = tiny("vig_t")
    path = tmp_path / "ckpt.pth"
    torch.save({"model": official_vig_state_dict(source)}, path)
    loaded = tiny("vig_t", pretrained=True, img_size=128, pretrained_cfg_overlay=dict(file=str(path)))
    assert loaded.pos_embed.shape == (1, 64, 64)
    assert not torch.equal(loaded.pos_embed[:, :3], torch.zeros(1, 3, 64))


def test_mismatched_checkpoint_fails_naming_the_keys(tmp_path):
    state = official_vig_state_dict(tiny("vig_t"))
    del state["blocks.1.attn.qkv_proj.weight"]
    state["blocks.0.attn.unknown_thing"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*blocks\.1\.attn\.qkv_proj\.weight.*Unexpected.*unknown_thing"):
        tiny("vig_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))



class TrainingConfig:
    """Stands in for the yacs config the official training checkpoints pickle."""
    epochs = 300


def test_convert_checkpoint_tool_reads_official_training_files(tmp_path):
    tool = Path(__file__).parents[1] / "tools" / "convert_checkpoint.py"
    convert = load_tool("convert_checkpoint")

    source = tiny("vig_h_t").eval()
    src = tmp_path / "ckpt_epoch_299.pth"
    torch.save({"model": official_vigh_state_dict(source), "config": TrainingConfig(), "epoch": 299}, src)
    dest = tmp_path / "vig_h_t.safetensors"
    with pytest.raises(SystemExit, match="--trust-pickle"):
        convert.convert("vig_h_t", str(src), str(dest), **tiny_args("vig_h_t"))
    assert not dest.exists()
    convert.convert("vig_h_t", str(src), str(dest), trust_pickle=True, **tiny_args("vig_h_t"))
    loaded = tiny("vig_h_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(dest))).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    bad = tmp_path / "bad.pth"
    state = official_vigh_state_dict(source)
    state.pop("layers.0.downsample.1.weight")
    torch.save({"model": state}, bad)
    with pytest.raises(SystemExit, match=r"missing: stages\.1\.downsample\.0\.weight"):
        convert.convert("vig_h_t", str(bad), str(tmp_path / "bad.safetensors"), **tiny_args("vig_h_t"))
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask
    whole = tmp_path / "whole_model.pth"
    torch.save([1, 2], whole)
    with pytest.raises(SystemExit, match="got a pickled list"):
        convert.convert("vig_h_t", str(whole), str(tmp_path / "w.safetensors"), trust_pickle=True, **tiny_args("vig_h_t"))
    result = subprocess.run([sys.executable, str(tool), "vig_t", str(tmp_path / "nope.pth"), str(dest)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "checkpoint not found" in result.stderr


def test_features_only_defaults_fit_shallow_custom_models():
    plain = timm.create_model("vig_t", features_only=True, embed_dim=64, depth=2, num_heads=2).eval()
    assert len(plain.feature_info.channels()) == 2
    hier = timm.create_model("vig_h_t", features_only=True, embed_dim=32, depths=(1, 1), num_heads=(1, 2)).eval()
    with torch.no_grad():
        assert [o.shape[1] for o in hier(torch.randn(1, 3, 64, 64))] == [32, 64]


def test_filter_takes_ema_weights_first_like_timm():
    model = tiny("vig_t")
    ema = official_vig_state_dict(model)
    raw = {k: v + 1 for k, v in ema.items()}
    converted = checkpoint_filter_fn({"model": raw, "model_ema": ema}, model)
    assert torch.equal(converted["head.weight"], model.state_dict()["head.weight"])
    converted = checkpoint_filter_fn({"model": raw, "model_ema": {}}, model)
    assert torch.equal(converted["head.weight"], raw["head.weight"])
