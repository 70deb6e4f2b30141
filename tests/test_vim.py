"""Vim specifics: both scan directions, the middle class token, weight-decay patterns, official
checkpoints and position-embedding resampling. (timm conventions: test_timm_conventions.py.)"""
import pytest
import timm
import torch
import torch.nn.functional as F

import visionlin  # noqa: F401  (registers the models)
from visionlin.kernels.ssm import naive_selective_scan
from visionlin.layers import BiMambaMixer
from visionlin.models.vim import checkpoint_filter_fn

from zoo import SMALL, get_model, tiny


def explicit_bimamba(mixer, x):
    """Bimamba v2 written out: each direction on its own explicitly reversed copy, token-serial scans."""
    xz = (x @ mixer.in_proj.weight.T).transpose(1, 2)
    outs = []
    for d, flip in ((mixer.fwd, False), (mixer.bwd, True)):
        seq = xz.flip(-1) if flip else xz
        u, z = seq.chunk(2, dim=1)
        L = u.shape[-1]
        u = F.silu(F.conv1d(u, d.conv1d.weight, d.conv1d.bias, padding=3, groups=u.shape[1])[..., :L])
        dt, B, C = (u.transpose(1, 2) @ d.x_proj.weight.T).split((mixer.dt_rank, mixer.d_state, mixer.d_state), -1)
        y = naive_selective_scan(u, (dt @ d.dt_proj.weight.T).transpose(1, 2), -torch.exp(d.A_log), B.transpose(1, 2),
                                 C.transpose(1, 2), d.D, z=z, delta_bias=d.dt_proj.bias, delta_softplus=True)
        outs.append(y.flip(-1) if flip else y)
    return ((outs[0] + outs[1]) / 2).transpose(1, 2) @ mixer.out_proj.weight.T


def test_mixer_runs_both_directions_as_written_out():
    mixer = BiMambaMixer(32, d_state=4).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    before = mixer(x)
    torch.testing.assert_close(before, explicit_bimamba(mixer, x), rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        mixer.bwd.D.add_(1.0)        # a backward-direction parameter changes the output
        assert not torch.allclose(mixer(x), before)


def test_head_reads_the_middle_class_token():
    model = tiny("vim_t").eval()
    x = torch.randn(1, 3, 64, 80)                   # 4 x 5 = 20 patches: class token at index 10
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 21, 64)
        torch.testing.assert_close(model.forward_head(feats), model.head(feats[:, 10]))
        model.reset_classifier(7, "avg")
        assert model(x).shape == (1, 7)


def test_no_weight_decay_patterns_exempt_every_a_log_and_d_in_timms_optimizer():
    from timm.optim import param_groups_weight_decay
    model = tiny("vim_t")
    groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    exempt = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    targets = [n for n, _ in model.named_parameters() if n.endswith((".A_log", ".D"))]
    assert len(targets) == 2 * 2 * 3               # two directions, A_log and D, three layers
    assert all(id(p) in exempt for n, p in model.named_parameters() if n in targets or n in ("pos_embed", "cls_token"))
    bare = param_groups_weight_decay(model, 0.05, no_weight_decay_list={"A_log"})
    assert not any(p.ndim == 2 and p.shape[-1] == 16 for g in bare if g["weight_decay"] == 0 for p in g["params"])


def test_runs_at_any_size_divisible_by_16_and_rejects_others():
    model = tiny("vim_t").eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 96, 160)).shape == (1, 61, 64)
        with pytest.raises(ValueError, match="not divisible by 16"):
            model(torch.randn(1, 3, 64, 72))


def official_vim_state_dict(model):
    """The hustvl/Vim key layout: per-direction parameters flat in the mixer, '_b' for the backward one."""
    out = {}
    for k, v in model.state_dict().items():
        for direction, suffix in (("fwd", ""), ("bwd", "_b")):
            marker = f".mixer.{direction}."
            if marker in k:
                head, name = k.split(marker)
                if name in ("A_log", "D"):
                    name = {"A_log": "A_b_log" if suffix else "A_log", "D": "D" + suffix}[name]
                else:
                    module, param = name.split(".")
                    name = f"{module}{suffix}.{param}"
                k = f"{head}.mixer.{name}"
        out[k] = v
    return out


def test_official_checkpoint_loads_through_timm_and_reproduces_outputs(tmp_path):
    source = tiny("vim_t").eval()
    state = official_vim_state_dict(source)
    assert {"layers.0.mixer.conv1d_b.weight", "layers.0.mixer.A_b_log", "layers.2.mixer.D_b", "layers.1.mixer.x_proj.weight",
            "layers.0.mixer.dt_proj_b.bias", "layers.0.norm.weight", "norm_f.weight", "cls_token", "pos_embed"} <= set(state)
    path = tmp_path / "vim_t_midclstok.pth"
    torch.save({"model": state, "epoch": 299}, path)
    loaded = tiny("vim_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_full_size_official_checkpoint_converts_with_all_keys():
    model = get_model("vim_s")
    converted = checkpoint_filter_fn({"model": official_vim_state_dict(model)}, model)
    assert set(converted) == set(model.state_dict())


def test_position_embedding_trained_elsewhere_is_resampled_around_the_class_slot(tmp_path):
    source = tiny("vim_t")
    path = tmp_path / "ckpt.pth"
    torch.save({"model": official_vim_state_dict(source)}, path)
    loaded = tiny("vim_t", pretrained=True, img_size=128, pretrained_cfg_overlay=dict(file=str(path)))
    assert loaded.pos_embed.shape == (1, 65, 64)
    m_old, m_new = source.pos_embed.shape[1] // 2, 32
    torch.testing.assert_close(loaded.pos_embed[:, m_new], source.pos_embed[:, m_old])


def test_pretrained_without_a_weight_file_says_where_to_get_one():
    with pytest.raises(ValueError, match="Vim-tiny-midclstok.*pretrained_cfg_overlay"):
        timm.create_model("vim_t", pretrained=True)
