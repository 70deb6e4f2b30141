"""The PyTorch path of linear_attention against the explicit N x N form, and its boundary checks."""
import pytest
import torch
import torch.nn.functional as F

from visionlin.kernels import last_backend, linear_attention
from visionlin.kernels.linear_attn import naive_linear_attention


def features(*shape, dtype=torch.float64, scale=1.0):
    return F.elu(scale * torch.randn(*shape, dtype=torch.float64)).add(1.0).to(dtype)


def inputs(B=2, N=37, H=3, K=16, V=24, Nq=None, dtype=torch.float64, numerator=True, weights=True):
    Nq = N if Nq is None else Nq
    q, k = features(B, Nq, H, K, dtype=dtype), features(B, N, H, K, dtype=dtype)
    v = torch.randn(B, N, H, V, dtype=dtype)
    q_num = torch.randn(B, Nq, H, K, dtype=dtype) if numerator else None
    k_num = torch.randn(B, N, H, K, dtype=dtype) if numerator else None
    w = (torch.rand(B, N, H, dtype=dtype) * 3) if weights else None
    return q, k, v, q_num, k_num, w


@pytest.mark.parametrize("N,Nq", [(1, 1), (17, 17), (37, 5), (300, 300)])
@pytest.mark.parametrize("numerator,weights", [(False, False), (True, False), (False, True), (True, True)])
def test_matches_explicit_n_by_n_form(N, Nq, numerator, weights):
    args = inputs(N=N, Nq=Nq, numerator=numerator, weights=weights)
    out = linear_attention(*args, backend="torch")
    assert out.shape == (2, Nq, 3, 24)
    torch.testing.assert_close(out, naive_linear_attention(*args), rtol=1e-12, atol=1e-12)
    assert last_backend("linear_attention") == "torch"


def test_eps_enters_as_n_eps_in_the_sum_form():
    q, k, v, *_ = inputs(N=50, numerator=False, weights=False)
    a = linear_attention(q, k, v, eps=1e-2, backend="torch")
    torch.testing.assert_close(a, naive_linear_attention(q, k, v, eps=1e-2), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a, linear_attention(q, k, v, eps=1e-6, backend="torch"))


def test_gradients_match_autograd_of_the_explicit_form():
    args = [t.requires_grad_() for t in inputs(N=23, Nq=19, K=8, V=8)]
    torch.autograd.gradcheck(lambda *a: linear_attention(*a, backend="torch"), args)
    out = linear_attention(*args, backend="torch")
    grads = torch.autograd.grad(out.square().sum(), args)
    ref = naive_linear_attention(*args)
    ref_grads = torch.autograd.grad(ref.square().sum(), args)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_at_65536_tokens_stays_finite_and_accurate(dtype):
    # realistic activations: ELU+1 features of pre-activations with std 3, values with std 4
    B, N, H, D = 1, 65536, 2, 64
    q, k = features(B, N, H, D, dtype=dtype, scale=3.0), features(B, N, H, D, dtype=dtype, scale=3.0)
    v = (4 * torch.randn(B, N, H, D)).to(dtype)
    q_num, k_num = q.flip(-1), k.flip(-1)     # numerator features with sign-free content, as after RoPE
    w = torch.softmax(torch.randn(B, N, H, dtype=torch.float64) * 2, dim=1).mul(N).to(dtype)
    out = linear_attention(q, k, v, q_num, k_num, w, backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = linear_attention(*(t.double() for t in (q, k, v, q_num, k_num, w)), backend="torch")
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_accepts_strided_inputs_from_channels_first_maps():
    B, H, D, Hh, Ww = 2, 2, 8, 5, 7
    qkv = features(B, 3 * H * D, Hh, Ww)           # (B, 3C, H, W) from a 1x1 conv
    q, k, v = (t.reshape(B, H, D, Hh * Ww).permute(0, 3, 1, 2) for t in qkv.chunk(3, dim=1))
    assert not q.is_contiguous()
    torch.testing.assert_close(linear_attention(q, k, v, backend="torch"),
                               naive_linear_attention(q.contiguous(), k.contiguous(), v.contiguous()))


def test_empty_batch_gives_empty_output():
    q, k, v, *_ = inputs(B=0, numerator=False, weights=False)
    assert linear_attention(q, k, v).shape == (0, 37, 3, 24)


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.zeros(2, 5, 3)), r"q must have shape \(B, Nq, H, K\)"),
    (dict(k=torch.zeros(2, 5, 3, 8, dtype=torch.float64)), r"k must have shape \(B, N, H, K\) with B, H, K of q"),
    (dict(v=torch.zeros(2, 6, 3, 8, dtype=torch.float64)), r"v must have shape \(B, N, H, V\) with B, N, H of k"),
    (dict(v=torch.zeros(2, 5, 3, 8, dtype=torch.float32)), "v must have q's dtype"),
    (dict(key_weight=torch.ones(2, 5, 3, 1, dtype=torch.float64)), r"key_weight must have shape \(B, N, H\)"),
    (dict(q_num=torch.ones(2, 4, 3, 16, dtype=torch.float64)), "q_num must have shape"),
    (dict(k=torch.zeros(2, 0, 3, 16, dtype=torch.float64), v=torch.zeros(2, 0, 3, 8, dtype=torch.float64)),
     "N = 0"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(v=torch.zeros(2, 5, 3, 8, dtype=torch.int64)), "floating-point"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_inputs_raise_errors_naming_the_argument(change, message):
    args = dict(q=torch.ones(2, 5, 3, 16, dtype=torch.float64), k=torch.ones(2, 5, 3, 16, dtype=torch.float64),
                v=torch.ones(2, 5, 3, 8, dtype=torch.float64))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        linear_attention(**args)


def test_float32_key_weights_beyond_float16_range_work_with_half_inputs():
    q, k, v, *_ = inputs(N=64, numerator=False, weights=False, dtype=torch.float16)
    w = torch.full((2, 64, 3), 1e-3)
    w[:, 0] = 1e5                                    # > 65504: not representable in float16
    out = linear_attention(q, k, v, key_weight=w, backend="torch")
    ref = naive_linear_attention(q.double(), k.double(), v.double(), key_weight=w.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)
