"""ViG / ViG-H on timm: official layout (parameter counts, converted checkpoints) and timm conventions."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import visionlin  # noqa: F401  (registers the models)
from visionlin.models.vig import checkpoint_filter_fn

PLAIN = ["vig_t", "vig_s", "vig_b"]
HIER = ["vig_h_t", "vig_h_s", "vig_h_b"]
ALL = PLAIN + HIER
OFFICIAL_PARAMS = {"vig_t": 5.83, "vig_s": 22.62, "vig_b": 89.02,
                   "vig_h_t": 28.60, "vig_h_s": 50.05, "vig_h_b": 88.90}
SMALL = 64  # test resolution: divisible by 32, keeps the full-size models quick on CPU

_models = {}


def get_model(name, **kwargs):
    """Full-size models are cached (building vig_b twice costs seconds); callers must not mutate them."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _models:
        _models[key] = timm.create_model(name, **kwargs).eval()
    return _models[key]


TINY_ARGS = {"plain": dict(embed_dim=64, depth=3, num_heads=2),
             "hier": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))}


def tiny_args(name):
    return TINY_ARGS["plain" if name in PLAIN else "hier"]


def tiny(name, **kwargs):
    """A small instance of a variant (its flags kept, its size shrunk) for tests that mutate or train it."""
    return timm.create_model(name, **tiny_args(name), **kwargs)


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_matches_official(name):
    n = sum(p.numel() for p in get_model(name).parameters())
    assert round(n / 1e6, 2) == OFFICIAL_PARAMS[name]


def test_models_are_registered_with_timm_under_the_family_module():
    assert set(ALL) <= set(timm.list_models("vig*"))
    assert set(ALL) <= set(timm.list_models(module="vig"))
    assert timm.get_pretrained_cfg("vig_s").license == "mit"


@pytest.mark.parametrize("name", ALL)
def test_forward_is_finite_and_grad_checkpointing_keeps_output(name):
    model = get_model(name)
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1000) and torch.isfinite(out).all()
        model.set_grad_checkpointing(True)
        try:
            torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
        finally:
            model.set_grad_checkpointing(False)


@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter_with_new_class_count(name):
    model = tiny(name, num_classes=42)
    out = model(torch.randn(2, 3, SMALL, SMALL))
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", ALL)
def test_default_cfg_and_unpooled_outputs(name):
    model = get_model(name)
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    assert cfg["mean"] and cfg["std"] and cfg["interpolation"] == "bicubic" and cfg["license"] == "mit"
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    x = torch.randn(1, 3, *cfg["input_size"][1:])
    with torch.no_grad():
        feats = model.forward_features(x)
        if name in HIER:
            assert feats.shape[1:3] == cfg["pool_size"]  # NHWC
            assert feats.shape[-1] == model.num_features
        else:
            assert feats.shape == (1, 196, model.num_features)  # NLC
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)


@pytest.mark.parametrize("name", ALL)
def test_reset_classifier_and_num_classes_zero(name):
    x = torch.randn(1, 3, SMALL, SMALL)
    model = tiny(name).eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, "")
        assert model(x).shape == feats.shape
        model.reset_classifier(7, "avg")
        assert model(x).shape == (1, 7)
        created = tiny(name, num_classes=0, global_pool="")
        assert created.eval()(x).shape == created.forward_features(x).shape
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, "max")


@pytest.mark.parametrize("name", ALL)
def test_in_chans_and_num_classes_when_creating(name):
    model = tiny(name, in_chans=1, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, SMALL, SMALL)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, SMALL, SMALL))


@pytest.mark.parametrize("name", ALL)
def test_features_only_channels_and_strides_match_feature_info(name):
    model = timm.create_model(name, features_only=True).eval()
    assert len(model.feature_info.channels()) >= 3
    with torch.no_grad():
        outs = model(torch.randn(1, 3, SMALL * 2, SMALL * 2))
    assert len(outs) == 4
    for out, ch, red in zip(outs, model.feature_info.channels(), model.feature_info.reduction()):
        assert out.shape[1] == ch
        assert out.shape[2] == SMALL * 2 // red and out.shape[3] == SMALL * 2 // red


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates_final_equals_forward_features(name):
    model = tiny(name).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        n_levels = 3 if name in PLAIN else 4
        assert len(inter) == n_levels
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(only) == 2
        torch.testing.assert_close(only[-1], inter[-1])
        pruned = model.prune_intermediate_layers(indices=1)
        assert pruned == [n_levels - 1]
        assert model(x).shape == model.forward_features(x).shape  # head pruned: unpooled


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


def test_no_weight_decay_and_group_matcher_name_real_parameters():
    model = tiny("vig_t")
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    from timm.models import group_parameters
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(names)
    hier = tiny("vig_h_t")
    groups = group_parameters(hier, hier.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(dict(hier.named_parameters()))


@pytest.mark.parametrize("name", ALL)
def test_fx_traced_model_matches_eager(name):
    from timm.models import create_feature_extractor
    model = tiny(name).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    extractor = create_feature_extractor(model, return_nodes={"head": "out"})
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["out"], model(x))


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


def test_pretrained_without_a_weight_file_says_where_to_get_one():
    with pytest.raises(ValueError, match="huggingface.co/hustvl/ViG.*pretrained_cfg_overlay"):
        timm.create_model("vig_t", pretrained=True)


def test_save_for_hf_round_trips_through_local_dir(tmp_path):
    from timm.models import save_for_hf
    model = tiny("vig_t", num_classes=10).eval()
    save_for_hf(model, str(tmp_path), model_config=tiny_args("vig_t"))
    again = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


class TrainingConfig:
    """Stands in for the yacs config the official training checkpoints pickle."""
    epochs = 300


def test_convert_checkpoint_tool_reads_official_training_files(tmp_path):
    tool = Path(__file__).parents[1] / "tools" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", tool)
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)

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
