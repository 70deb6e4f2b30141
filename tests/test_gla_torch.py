"""The PyTorch path of bidirectional_gla against the token-serial reference, and its input checks."""
import math

import pytest
import torch
import torch.nn.functional as F

from visionlin.kernels import bidirectional_gla, last_backend, use_backend
from visionlin.kernels.gla import naive_bidirectional_gla


def make_inputs(B=2, N=37, H=3, K=16, V=32, dtype=torch.float32, gate_scale=1.0):
    q, k = torch.randn(B, N, H, K), torch.randn(B, N, H, K)
    v = torch.randn(B, N, H, V)
    g_f = F.logsigmoid(torch.randn(B, N, H, K) * 3) * gate_scale
    g_b = F.logsigmoid(torch.randn(B, N, H, K) * 3) * gate_scale
    return [t.to(dtype) for t in (q, k, v, g_f, g_b)]


def assert_close_to_reference(out, ref, rel):
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= rel * ref.double().abs().max().item() + 1e-6, f"max error {err}"


@pytest.mark.parametrize("N", [1, 2, 17, 31, 32, 33, 100, 257])
def test_matches_recurrence_for_any_length(N):
    inputs = make_inputs(N=N)
    assert_close_to_reference(bidirectional_gla(*inputs), naive_bidirectional_gla(*inputs), 1e-5)


@pytest.mark.parametrize("K,V", [(16, 16), (32, 64), (64, 32), (128, 16)])
def test_matches_recurrence_for_head_dims(K, V):
    inputs = make_inputs(B=1, N=70, H=2, K=K, V=V)
    assert_close_to_reference(bidirectional_gla(*inputs), naive_bidirectional_gla(*inputs), 1e-5)


def test_zero_gates_give_plain_bidirectional_linear_attention():
    q, k, v, g, _ = make_inputs(B=1, N=23, H=1)
    g = torch.zeros_like(g)
    scores = (q[0, :, 0] @ k[0, :, 0].T) * q.shape[-1] ** -0.5
    full = scores @ v[0, :, 0]
    expected = (torch.tril(scores) @ v[0, :, 0] + torch.triu(scores) @ v[0, :, 0]) / 2
    out = bidirectional_gla(q, k, v, g, g)[0, :, 0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, full / 2)


def test_minus_infinity_gates_reset_the_state_exactly():
    q, k, v, g_f, g_b = make_inputs(B=1, N=50, H=2)
    g_f[:, 20] = -math.inf
    g_b[:, 35] = -math.inf
    out = bidirectional_gla(q, k, v, g_f, g_b)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, naive_bidirectional_gla(q, k, v, g_f, g_b), 1e-5)
    # with every gate -inf each token only sees itself in both directions
    inf = torch.full_like(g_f, -math.inf)
    self_only = (q * k).sum(-1, keepdim=True) * q.shape[-1] ** -0.5 * v
    torch.testing.assert_close(bidirectional_gla(q, k, v, inf, inf), self_only, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate_scale", [20.0, 200.0])
def test_strong_decays_stay_finite_and_exact(gate_scale):
    inputs = make_inputs(N=90, gate_scale=gate_scale)
    out = bidirectional_gla(*inputs)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, naive_bidirectional_gla(*inputs), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    inputs = make_inputs(N=65, dtype=dtype)
    out = bidirectional_gla(*inputs)
    assert out.dtype == dtype
    assert_close_to_reference(out, naive_bidirectional_gla(*inputs), 2e-2)


def test_long_sequence_16k_tokens_matches_recurrence():
    q, k, v, g_f, g_b = make_inputs(B=1, N=16384, H=1, K=16, V=16, gate_scale=0.05)
    out = bidirectional_gla(q, k, v, g_f, g_b)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out, naive_bidirectional_gla(q, k, v, g_f, g_b), 1e-4)


def test_custom_scale_is_applied_to_queries():
    q, k, v, g_f, g_b = make_inputs(N=20)
    torch.testing.assert_close(bidirectional_gla(q, k, v, g_f, g_b, scale=0.5),
                               bidirectional_gla(q * 0.5 / q.shape[-1] ** -0.5, k, v, g_f, g_b))


def test_strided_inputs_give_the_same_result():
    B, N, H, K, V = 2, 40, 2, 16, 32
    qkv = torch.randn(B, N, H * (2 * K + V))
    q, k, v = qkv.split((H * K, H * K, H * V), -1)
    q, k, v = q.view(B, N, H, K), k.view(B, N, H, K), v.view(B, N, H, V)
    g = F.logsigmoid(torch.randn(B, N, H, K))
    torch.testing.assert_close(bidirectional_gla(q, k, v, g, g),
                               bidirectional_gla(q.contiguous(), k.contiguous(), v.contiguous(), g, g))


def test_gradients_match_autograd_of_the_recurrence():
    inputs = [t.double().requires_grad_() for t in make_inputs(B=1, N=45, H=2, K=16, V=16)]
    out = bidirectional_gla(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref = naive_bidirectional_gla(*inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    for name, g, r in zip(("q", "k", "v", "g_fwd", "g_bwd"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_gradcheck_in_float64():
    q, k, v, a, b = (torch.randn(1, 20, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(5))

    def fn(q, k, v, a, b):
        return bidirectional_gla(q, k, v, F.logsigmoid(a), F.logsigmoid(b), backend="torch")

    assert torch.autograd.gradcheck(fn, (q, k, v, a, b))


def test_cpu_tensors_take_the_torch_path_and_it_can_be_forced():
    inputs = make_inputs(N=8)
    bidirectional_gla(*inputs)
    assert last_backend("bidirectional_gla") == "torch"
    with use_backend("torch"):
        bidirectional_gla(*inputs)
    assert last_backend("bidirectional_gla") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        bidirectional_gla(*inputs, backend="cuda")


@pytest.mark.parametrize("arg,bad,match", [
    (0, torch.randn(2, 37, 3), "q must have shape"),
    (1, torch.randn(2, 36, 3, 16), "k must have shape"),
    (2, torch.randn(2, 37, 4, 32), "v must have shape"),
    (3, torch.randn(2, 37, 3, 8), "g_fwd must have shape"),
    (4, torch.randint(0, 3, (2, 37, 3, 16)), "g_bwd must be a floating-point"),
    (1, torch.randn(2, 37, 3, 16, dtype=torch.float64), "k must have q's dtype"),
    (0, "not a tensor", "q must be a torch.Tensor"),
])
def test_bad_inputs_raise_errors_naming_the_argument(arg, bad, match):
    inputs = make_inputs()
    inputs[arg] = bad
    with pytest.raises(ValueError, match=match):
        bidirectional_gla(*inputs)


def test_empty_batch_or_no_heads_give_empty_output():
    for B, H in ((0, 3), (2, 0)):
        q, k, v, g_f, g_b = make_inputs(B=B, H=H, N=10)
        assert bidirectional_gla(q, k, v, g_f, g_b).shape == v.shape


def test_zero_head_dim_is_rejected():
    q, k, v, g_f, g_b = make_inputs(K=16)
    with pytest.raises(ValueError, match="head dims must be >= 1"):
        bidirectional_gla(q[..., :0], k[..., :0], v, g_f[..., :0], g_b[..., :0])


def test_triton_support_covers_head_dims_and_every_dtype_the_kernel_checks():
    from visionlin.kernels.gla import _triton_supports
    q, k, v, g_f, g_b = make_inputs(K=32, V=64)
    assert _triton_supports(q, v, g_f, g_b)
    assert not _triton_supports(q[..., :24], v, g_f, g_b)
    assert not _triton_supports(q, v, g_f.double(), g_b)
    assert not _triton_supports(q.double(), v.double(), g_f, g_b)


def test_auto_falls_back_to_torch_where_triton_does_not_support_the_call():
    from visionlin.kernels._dispatch import resolve_backend, triton_available
    cuda = torch.device("cuda")
    assert resolve_backend("op", "auto", cuda, True, triton_supports=False) == "torch"
    if triton_available():
        assert resolve_backend("op", "auto", cuda, True, triton_supports=True) == "triton"
    assert resolve_backend("op", "auto", torch.device("cpu"), True, triton_supports=True) == "torch"


def test_bad_backend_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("VISIONLIN_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="VISIONLIN_KERNEL_BACKEND"):
        bidirectional_gla(*make_inputs(N=4))
