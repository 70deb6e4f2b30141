"""RAVLT specifics: RALA and its softmax sibling against explicit N x N forms, 2-D RoPE, the official
layout (stage kinds, layer-scale inits, converted checkpoints) and input sizes.
(timm conventions for every model: test_timm_conventions.py.)"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import visionlin  # noqa: F401  (registers the models)
from visionlin.layers import RankAugmentedAttention, rope_2d
from visionlin.models.ravlt import checkpoint_filter_fn

from zoo import SMALL, get_model, load_tool, tiny, tiny_args


def explicit_rope(x, height, width):
    """RoPE written from the paper's definition, position by position: channel pair p of a head of
    size d is rotated by row * theta_p (p < d/4) or col * theta_(p - d/4), theta = 10000^-linspace(0,1,d/4).
    x: (..., N, d) in raster order."""
    d = x.shape[-1]
    theta = 1.0 / 10000 ** torch.linspace(0, 1, d // 4, dtype=torch.float64)
    out = torch.empty_like(x)
    for n in range(height * width):
        row, col = divmod(n, width)
        for p in range(d // 2):
            angle = (row if p < d // 4 else col) * theta[p % (d // 4)]
            c, s = math.cos(angle), math.sin(angle)
            x0, x1 = x[..., n, 2 * p], x[..., n, 2 * p + 1]
            out[..., n, 2 * p] = c * x0 - s * x1
            out[..., n, 2 * p + 1] = s * x0 + c * x1
    return out


def split_heads(attn, x):
    """qkvo of x (B, C, H, W) -> q, k, v (B, heads, N, d) and o (B, C, H, W), official channel order."""
    B, C, H, W = x.shape
    q, k, v, o = attn.qkvo(x).chunk(4, dim=1)
    heads = [t.reshape(B, attn.num_heads, attn.head_dim, H * W).transpose(-1, -2) for t in (q, k, v)]
    return (*heads, o, attn.lepe(v))


def finish(attn, out, o, lepe):
    B, nh, N, d = out.shape
    out = out.transpose(-1, -2).reshape(lepe.shape)
    return attn.proj((out + lepe) * o)


def explicit_rala(attn, x):
    """RALA as the paper writes it, with the N x N score matrices materialised (float64)."""
    B, C, H, W = x.shape
    N = H * W
    q, k, v, o, lepe = split_heads(attn, x)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    alpha = N * torch.softmax(q.mean(dim=2, keepdim=True) @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
    k = k * alpha.transpose(-1, -2)                                   # k_j <- alpha_j k_j
    numerator = explicit_rope(q, H, W) @ explicit_rope(k, H, W).transpose(-1, -2)   # <R q_i, R k_j>
    denominator = (q @ k.transpose(-1, -2)).sum(-1, keepdim=True) + N * attn.eps   # sum_j <q_i, k_j>
    return finish(attn, (numerator @ v) / denominator, o, lepe)


def explicit_softmax_attention(attn, x):
    B, C, H, W = x.shape
    q, k, v, o, lepe = split_heads(attn, x)
    scores = explicit_rope(q, H, W) @ explicit_rope(k, H, W).transpose(-1, -2) / math.sqrt(attn.head_dim)
    return finish(attn, torch.softmax(scores, dim=-1) @ v, o, lepe)


@pytest.mark.parametrize("size", [(4, 4), (3, 5)])
@pytest.mark.parametrize("linear,explicit", [(True, explicit_rala), (False, explicit_softmax_attention)])
def test_mixer_equals_its_explicit_n_by_n_form_in_float64(size, linear, explicit):
    attn = RankAugmentedAttention(16, 2, linear=linear).double()
    for p in attn.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    sin, cos = rope_2d(*size, attn.head_dim, x.device, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, sin, cos), explicit(attn, x), rtol=1e-5, atol=1e-6)


def test_rope_2d_table_follows_rows_then_columns():
    sin, cos = rope_2d(3, 5, 8, torch.device("cpu"))
    x = torch.randn(15, 8, dtype=torch.float64)
    from visionlin.layers import apply_rope
    torch.testing.assert_close(apply_rope(x, sin.double(), cos.double()), explicit_rope(x, 3, 5), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(2, 2, 6, torch.device("cpu"))


def test_rope_scores_depend_only_on_relative_position():
    sin, cos = rope_2d(6, 6, 16, torch.device("cpu"), torch.float64)
    from visionlin.layers import apply_rope
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rq, rk = apply_rope(q.expand(36, 16), sin, cos), apply_rope(k.expand(36, 16), sin, cos)
    score = lambda a, b: rq[a[0] * 6 + a[1]] @ rk[b[0] * 6 + b[1]]  # noqa: E731
    torch.testing.assert_close(score((1, 2), (3, 1)), score((2, 4), (4, 3)))
    assert not torch.allclose(score((1, 2), (3, 1)), score((1, 2), (1, 3)))


def test_official_variants_use_rala_in_stages_1_2_and_softmax_in_3_4_and_linear_variant_everywhere():
    kinds = lambda m: [{b.attn.linear for b in s.blocks} for s in m.stages]  # noqa: E731
    for name in ("ravlt_t", "ravlt_s", "ravlt_b", "ravlt_l"):
        assert kinds(get_model(name)) == [{True}, {True}, {False}, {False}]
    assert kinds(get_model("ravlt_s_linear")) == [{True}] * 4
    assert "not an official configuration" in timm.get_pretrained_cfg("ravlt_s_linear").notes[0]


@pytest.mark.parametrize("name,inits", [("ravlt_t", [1.0] * 4), ("ravlt_b", [1.0, 1.0, 1e-6, 1e-6]),
                                        ("ravlt_l", [1e-6] * 4)])
def test_layer_scale_inits_per_variant(name, inits):
    model = get_model(name)
    for stage, init in zip(model.stages, inits):
        for blk in stage.blocks:
            assert blk.gamma_1.shape == (1, blk.gamma_1.shape[1], 1, 1)
            assert torch.all(blk.gamma_1 == init) and torch.all(blk.gamma_2 == init)


def test_runs_at_any_size_divisible_by_32_and_rejects_others():
    model = tiny("ravlt_t").eval()
    with torch.no_grad():
        for size in [(64, 64), (96, 160), (32, 224)]:
            feats = model.forward_features(torch.randn(1, 3, *size))
            assert feats.shape == (1, 64, size[0] // 32, size[1] // 32)
        with pytest.raises(ValueError, match="not divisible by 32"):
            model(torch.randn(1, 3, 64, 80))


def test_bfloat16_autocast_forward_and_backward_stay_finite():
    model = tiny("ravlt_s_linear", num_classes=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, SMALL, SMALL))
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- official checkpoints ------------------------------------------------------------------------

def official_ravlt_state_dict(model):
    """A state dict in the official qhfan/RALA layout (names from the release) from our model:
    patch_embed.proj.{i}, layers.{s}.blocks.{j}.{norm1.norm, attn, ...}, layers.{s}.RoPE.angle,
    layers.{s}.downsample.{reduction,norm} at the END of stage s, proj, norm and a 1x1-conv head."""
    out = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if parts[0] == "stem":
            out["patch_embed.proj." + ".".join(parts[1:])] = v
        elif parts[0] == "stages" and parts[2] == "downsample":
            name = {"0": "reduction", "1": "norm"}[parts[3]]
            out[f"layers.{int(parts[1]) - 1}.downsample.{name}.{'.'.join(parts[4:])}"] = v
        elif parts[0] == "stages":
            rest = ".".join(parts[4:])
            rest = rest.replace("norm1.", "norm1.norm.").replace("norm2.", "norm2.norm.")
            out[f"layers.{parts[1]}.blocks.{parts[3]}.{rest}"] = v
        elif k.startswith("head.fc."):
            out["head." + parts[2]] = v[:, :, None, None] if parts[2] == "weight" else v
        else:
            out[k[len("head."):]] = v
    for s, stage in enumerate(model.stages):
        d = stage.head_dim
        out[f"layers.{s}.RoPE.angle"] = (1.0 / 10000 ** torch.linspace(0, 1, d // 4)).unsqueeze(-1).repeat(1, 2).flatten()
    return out


def test_official_ravlt_t_layout_has_the_documented_keys():
    keys = set(official_ravlt_state_dict(get_model("ravlt_t")))
    documented = {"layers.0.blocks.0.gamma_1", "layers.0.blocks.0.norm1.norm.weight", "layers.0.blocks.0.attn.qkvo.weight",
                  "layers.0.blocks.0.attn.lepe.bias", "layers.0.blocks.0.attn.proj.weight", "layers.0.blocks.0.ffn.fc1.weight",
                  "layers.0.blocks.0.ffn.dwconv.weight", "layers.0.blocks.0.ffn.fc2.weight", "layers.0.blocks.0.pos.weight",
                  "layers.0.RoPE.angle", "layers.0.downsample.reduction.weight", "layers.2.downsample.norm.running_var",
                  "patch_embed.proj.10.num_batches_tracked", "proj.weight", "norm.running_mean", "head.weight"}
    assert documented <= keys
    assert not any(k.startswith("layers.3.downsample") for k in keys)
    state = get_model("ravlt_t").state_dict()
    assert state["stages.0.blocks.0.ffn.fc1.weight"].shape == (224, 64, 1, 1)
    assert state["stages.0.blocks.0.attn.qkvo.weight"].shape == (256, 64, 1, 1)


@pytest.mark.parametrize("name", ["ravlt_t", "ravlt_b"])
def test_official_checkpoint_loads_through_timm_and_reproduces_outputs(tmp_path, name):
    source = tiny(name).eval()
    for m in source.modules():        # non-trivial BN statistics, so misplaced BN keys would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "RAVLT.pth"
    raw = {k: v + 1.0 if v.is_floating_point() else v for k, v in official_ravlt_state_dict(source).items()}
    torch.save({"model": raw, "model_ema": official_ravlt_state_dict(source), "epoch": 299}, path)
    loaded = tiny(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_full_size_official_checkpoints_convert_with_all_keys():
    for name in ("ravlt_s", "ravlt_l"):
        model = get_model(name)
        converted = checkpoint_filter_fn({"model": official_ravlt_state_dict(model)}, model)
        assert set(converted) == set(model.state_dict())
        assert all(v.shape == model.state_dict()[k].shape for k, v in converted.items())


def test_checkpoint_with_other_rope_angles_is_rejected():
    model = tiny("ravlt_t")
    state = official_ravlt_state_dict(model)
    state["layers.1.RoPE.angle"] = state["layers.1.RoPE.angle"] * 2
    with pytest.raises(ValueError, match=r"layers\.1\.RoPE\.angle.*RoPE angles"):
        checkpoint_filter_fn(state, model)


def test_mismatched_checkpoint_fails_naming_the_keys(tmp_path):
    state = official_ravlt_state_dict(tiny("ravlt_t"))
    del state["layers.1.blocks.0.attn.qkvo.weight"]
    state["layers.0.blocks.0.attn.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*stages\.1\.blocks\.0\.attn\.qkvo\.weight.*Unexpected.*extra"):
        tiny("ravlt_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))



def test_convert_checkpoint_tool_writes_a_file_timm_loads(tmp_path):
    convert = load_tool("convert_checkpoint")
    source = tiny("ravlt_t").eval()
    src, dest = tmp_path / "RAVLT_T.pth", tmp_path / "ravlt_t.safetensors"
    torch.save({"model": official_ravlt_state_dict(source)}, src)
    convert.convert("ravlt_t", str(src), str(dest), **tiny_args("ravlt_t"))
    loaded = tiny("ravlt_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(dest))).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))

