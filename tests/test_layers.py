"""Shared layers: the BiGLA mixer against its formula, the fast log-sigmoid, SwiGLU sizing."""
import torch
import torch.nn.functional as F

from visionlin.kernels.gla import naive_bidirectional_gla
from visionlin.layers import BidirectionalGLA2d, swiglu_hidden_dim
from visionlin.layers.gla import log_sigmoid


def test_log_sigmoid_matches_float64_reference_over_the_whole_range():
    x = torch.linspace(-500, 60, 20001)
    ref = F.logsigmoid(x.double())
    assert (log_sigmoid(x).double() - ref).abs().max() < 1e-6
    assert log_sigmoid(torch.tensor([-float("inf")])).item() == -float("inf")


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_mixer_equals_the_written_out_vig_formula():
    torch.manual_seed(0)
    dim, heads, H, W = 32, 2, 5, 6
    mixer = BidirectionalGLA2d(dim, heads, conv_act=True, out_act=True).double()
    for p in mixer.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, H, W, dim, dtype=torch.float64)
    N, dk, dv = H * W, dim // 2, dim
    xs = F.silu(F.conv2d(x.permute(0, 3, 1, 2), mixer.in_proj[0].weight, padding=1, groups=dim))
    xs = xs.flatten(2).transpose(1, 2)                     # (B, N, D) raster order
    q, k, v = (xs @ mixer.qkv_proj.weight.T).split((dk, dk, dv), -1)
    gk = (xs @ mixer.gk_proj[0].weight.T) @ mixer.gk_proj[1].weight.T + mixer.gk_proj[1].bias
    g_f, g_b = (F.logsigmoid(gk) / 16).split((dk, dk), -1)
    heads_of = lambda t: t.reshape(2, N, heads, -1)        # noqa: E731
    o = naive_bidirectional_gla(heads_of(q), heads_of(k), heads_of(v), heads_of(g_f), heads_of(g_b))
    gate = torch.sigmoid(xs @ mixer.g_proj.weight.T + mixer.g_proj.bias)
    o = heads_of(gate) * rms_norm(o, mixer.g_norm.weight) + (1 - heads_of(gate)) * rms_norm(heads_of(xs), mixer.l_norm.weight)
    expected = F.silu(o.reshape(2, N, dv)) @ mixer.o_proj.weight.T
    torch.testing.assert_close(mixer(x), expected.reshape(2, H, W, dim), rtol=1e-9, atol=1e-9)


def test_swiglu_widths_follow_the_official_rounding():
    assert [swiglu_hidden_dim(d, 256) for d in (192, 384, 768)] == [512, 1024, 2048]
    assert [swiglu_hidden_dim(d, 32) for d in (96, 192, 384, 768)] == [256, 512, 1024, 2048]
    assert swiglu_hidden_dim(128, 32) == 352


def test_log_sigmoid_gradient_stays_finite_for_very_negative_logits():
    x = torch.tensor([-50.0, -90.0, -103.0, -200.0, 3.0], requires_grad=True)
    log_sigmoid(x).sum().backward()
    ref = torch.autograd.grad(F.logsigmoid(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, ref)


def test_generalized_linear_attention_equals_linfusions_written_out_formula():
    """q = W_q(x + phi_q(x)), k = W_k(x + phi_k(x)), per-head ELU+1, o = q kv / (q . mean k + 1e-4), kv = K^T V / N."""
    from visionlin.layers import GeneralizedLinearAttention
    m = GeneralizedLinearAttention(24, heads=3, feature_dim=6).double()
    for p in m.parameters():  # the zero-init-free default leaves LayerNorm at identity; randomise everything
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 37, 24, dtype=torch.float64)
    heads = lambda t: t.unflatten(-1, (3, 8)).transpose(1, 2)  # noqa: E731  (B, H, N, D)
    phi = lambda mlp, t: mlp[3](F.leaky_relu(mlp[1](mlp[0](t)), 0.01))  # noqa: E731
    q = F.elu(heads(m.to_q(x + phi(m.to_q_, x)))) + 1
    k = F.elu(heads(m.to_k(x + phi(m.to_k_, x)))) + 1
    v = heads(m.to_v(x))
    o = (q @ (k.transpose(-2, -1) @ v / 37)) / (q @ k.mean(-2, keepdim=True).transpose(-2, -1) + 1e-4)
    ref = m.to_out[0](o.transpose(1, 2).flatten(2))
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)
    assert [n for n, _ in m.to_q_.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    plain = GeneralizedLinearAttention(24, heads=3, use_feature_mlp=False)
    assert plain.to_q_ is None and plain(x.float()).shape == (2, 37, 24)
