"""Vim specifics: both scan directions, the middle class token, weight-decay patterns, official
checkpoints and position-embedding resampling. (timm conventions: test_timm_conventions.py.)"""
import pytest
import timm
import torch
import torch.nn.functional as F

import visionlin  # noqa: F401  (registers the models)
from visionlin.kernels import last_backend, selective_scan, use_backend
from visionlin.kernels.ssm import cpu_kernel_available, naive_selective_scan
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


def flipped_bimamba(mixer, x):
    """The official two-call formula: each direction's conv + scan on its own order, the backward one on
    flipped copies of x and z, out_proj((y_fwd + flip(y_bwd)) / 2); scans through the public op."""
    x_in, z = mixer.in_proj(x).chunk(2, dim=-1)

    def direction(d, x, z):
        u = F.silu(d.conv1d(x.transpose(1, 2))[..., :x.shape[1]])            # causal: (B, d_inner, L)
        dt, B, C = d.x_proj(u.transpose(1, 2)).split((mixer.dt_rank, mixer.d_state, mixer.d_state), dim=-1)
        delta = F.linear(dt, d.dt_proj.weight).transpose(1, 2)               # bias added inside the scan
        y = selective_scan(u, delta, -torch.exp(d.A_log.float()), B.transpose(1, 2), C.transpose(1, 2), d.D.float(),
                           z.transpose(1, 2), d.dt_proj.bias.float(), delta_softplus=True)
        return y.transpose(1, 2)

    y_b = direction(mixer.bwd, x_in.flip(1), z.flip(1)).flip(1)
    return mixer.out_proj((direction(mixer.fwd, x_in, z) + y_b) / 2)


def perturbed_mixer(dim=32, d_state=4):
    mixer = BiMambaMixer(dim, d_state=d_state)
    with torch.no_grad():              # every parameter away from its init (D = 1, zero conv bias ...)
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mixer


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_one_two_route_scan_equals_the_two_flipped_scans_forward_and_gradients(backend):
    if backend == "cpu" and not cpu_kernel_available():
        pytest.skip("no C compiler to build the CPU scan")
    mixer = perturbed_mixer()
    x = torch.randn(3, 11, 32, requires_grad=True)          # batch > 1, odd length
    with use_backend(backend):
        out = mixer(x)
        assert last_backend("cross_selective_scan") == backend
        assert last_backend("bidirectional_conv1d_silu") == backend
        ref = flipped_bimamba(mixer, x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        gy = torch.randn_like(out)
        leaves = [x, *mixer.parameters()]
        grads = torch.autograd.grad(out, leaves, gy)
        ref_grads = torch.autograd.grad(ref, leaves, gy)
    names = ["x", *(n for n, _ in mixer.named_parameters())]
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_one_two_route_scan_equals_the_two_flipped_scans_in_float64():
    mixer = perturbed_mixer().double()
    x = torch.randn(2, 13, 32, dtype=torch.float64, requires_grad=True)
    with use_backend("torch"):
        out, ref = mixer(x), flipped_bimamba(mixer, x)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        leaves = [x, *mixer.parameters()]
        gy = torch.randn_like(out)
        for g, r in zip(torch.autograd.grad(out, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


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

