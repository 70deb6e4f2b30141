"""VMamba specifics: SS2D against an explicit cross-scan / merge with materialised copies, weight-decay
patterns, official checkpoints, input sizes. (timm conventions: test_timm_conventions.py.)"""
import pytest
import timm
import torch
import torch.nn.functional as F

import visionlin  # noqa: F401  (registers the models)
from visionlin.kernels.ssm import naive_selective_scan
from visionlin.layers import SS2D
from visionlin.models.vmamba import checkpoint_filter_fn

from zoo import SMALL, get_model, tiny


def explicit_ss2d(m, x):
    """SS2D as the official code runs it: the four routes materialised as (B, 4, D, L) copies
    (raster, column-major, their flips), a token-serial scan per route, then un-flip, un-transpose, sum."""
    B, _, H, W = x.shape
    K, D, N, R = 4, m.d_inner, m.d_state, m.dt_rank
    x = F.silu(m.conv2d(m.in_proj(x)))
    rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)
    xs = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)           # (B, 4, D, L)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, m.x_proj_weight)
    dts, Bs, Cs = x_dbl.split((R, N, N), dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, m.dt_projs_weight)
    A = -torch.exp(m.A_logs).view(K, D, N)
    ys = [naive_selective_scan(xs[:, k], dts[:, k], A[k], Bs[:, k], Cs[:, k], m.Ds.view(K, D)[k],
                               delta_bias=m.dt_projs_bias[k], delta_softplus=True) for k in range(K)]
    col_to_grid = lambda y: y.view(B, D, W, H).transpose(2, 3).reshape(B, D, H * W)  # noqa: E731
    y = ys[0] + col_to_grid(ys[1]) + ys[2].flip(-1) + col_to_grid(ys[3].flip(-1))
    return m.out_proj(m.out_norm(y.view(B, D, H, W)))


@pytest.mark.parametrize("size", [(4, 4), (3, 5)])
def test_ss2d_equals_the_explicit_four_route_cross_scan(size):
    m = SS2D(16, d_state=2).double()
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), explicit_ss2d(m, x), rtol=1e-6, atol=1e-8)


def test_no_weight_decay_patterns_exempt_every_a_logs_and_ds_in_timms_optimizer():
    from timm.optim import param_groups_weight_decay
    model = tiny("vmamba_t")
    groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    exempt = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    a_logs = [p for n, p in model.named_parameters() if n.endswith(".A_logs")]
    assert len(a_logs) == 5 and all(id(p) in exempt for p in a_logs)        # 2-D: decayed without the pattern
    assert all(id(p) in exempt for n, p in model.named_parameters() if n.endswith(".Ds"))


def test_runs_at_any_size_divisible_by_32_and_rejects_others():
    model = tiny("vmamba_t").eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 96, 160)).shape == (1, 256, 3, 5)
        with pytest.raises(ValueError, match="not divisible by 32"):
            model(torch.randn(1, 3, 64, 80))


def official_vmamba_state_dict(model):
    """The MzeroMiko/VMamba v2 layout (channel-first): patch_embed.{0,2,5,7}, layers.s.blocks.j.*,
    layers.s.downsample.{1,3} at the END of stage s, classifier.{norm,head}."""
    stem = {0: 0, 1: 2, 3: 5, 4: 7}
    out = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if parts[0] == "stem":
            out[f"patch_embed.{stem[int(parts[1])]}.{parts[2]}"] = v
        elif parts[0] == "stages" and parts[2] == "downsample":
            out[f"layers.{int(parts[1]) - 1}.downsample.{ {0: 1, 1: 3}[int(parts[3])] }.{parts[4]}"] = v
        elif parts[0] == "stages":
            out["layers." + ".".join(parts[1:])] = v
        else:
            out["classifier." + k] = v
    return out


def test_official_checkpoint_loads_through_timm_and_reproduces_outputs(tmp_path):
    source = tiny("vmamba_t").eval()
    state = official_vmamba_state_dict(source)
    assert {"patch_embed.7.weight", "layers.0.downsample.1.weight", "layers.2.downsample.3.bias",
            "layers.0.blocks.0.op.x_proj_weight", "layers.0.blocks.0.op.A_logs", "layers.1.blocks.0.op.dt_projs_bias",
            "layers.3.blocks.0.mlp.fc2.weight", "classifier.norm.weight", "classifier.head.bias"} <= set(state)
    path = tmp_path / "vssm1_tiny.pth"
    torch.save({"model": state}, path)
    loaded = tiny("vmamba_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_full_size_official_checkpoint_converts_with_all_keys():
    model = get_model("vmamba_s")
    converted = checkpoint_filter_fn({"model": official_vmamba_state_dict(model)}, model)
    assert set(converted) == set(model.state_dict())
    assert converted["stages.0.blocks.0.op.A_logs"].shape == (4 * 96, 1)

