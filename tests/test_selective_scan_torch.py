"""The PyTorch paths of selective_scan and cross_selective_scan against the float64 token-serial
references (mamba_ssm's selective_scan_ref semantics; VMamba's cross-scan/merge), and their checks."""
import pytest
import torch
import torch.nn.functional as F

from visionlin.kernels import cross_selective_scan, last_backend, selective_scan, use_backend
from visionlin.kernels.ssm import (bidirectional_conv1d_silu, cpu_kernel_available, naive_cross_selective_scan,
                                   naive_selective_scan)
from visionlin.kernels.ssm.naive import route_backward, route_forward


@pytest.fixture(autouse=True)
def _torch_path():
    """These tests are about the PyTorch path, which 'auto' leaves for the compiled one on CPU."""
    with use_backend("torch"):
        yield


def scan_inputs(b=2, d=6, l=37, n=16, g=None, dtype=torch.float32, A_scale=1.0, D=True, z=True, bias=True):
    """u, delta, A, B, C, D, z, delta_bias as in mamba (A = -exp(A_log), B/C optionally grouped).

    delta and delta_bias are >= 0 so that delta is a step size with or without softplus."""
    bc = (b, n, l) if g is None else (b, g, n, l)
    A = -torch.exp(torch.rand(d, n) * 2.5) * A_scale
    args = [torch.randn(b, d, l), torch.rand(b, d, l) * 1.5, A, torch.randn(*bc), torch.randn(*bc),
            torch.randn(d) if D else None, torch.randn(b, d, l) if z else None,
            torch.rand(d) * 0.5 if bias else None]
    return [None if t is None else (t.to(dtype) if i not in (2, 5, 7) else t) for i, t in enumerate(args)]


def cross_inputs(b=2, d=5, H=6, W=7, n=4, R=4, dtype=torch.float32, per_route_u=False):
    """u (shared, or per route), delta, A, B, C, D, delta_bias of a cross scan."""
    u = torch.randn(b, R, d, H, W) if per_route_u else torch.randn(b, d, H, W)
    return [u.to(dtype), torch.randn(b, R, d, H, W).to(dtype) - 1.0,
            -torch.exp(torch.rand(R, d, n) * 2), torch.randn(b, R, n, H, W).to(dtype),
            torch.randn(b, R, n, H, W).to(dtype), torch.randn(R, d), torch.randn(R, d) * 0.5]


def explicit_bidirectional(u, delta, A, B, C, D, bias, z=None):
    """Two routes written out with flips (Vim's formula): scan(route 0) + flip(scan(flipped route 1)) on
    the grid's raster sequence, each direction gated by silu(z) in its own order."""
    seq = lambda t: None if t is None else t.flatten(-2)  # noqa: E731  (..., H, W) -> (..., H*W), raster
    flip = lambda t: None if t is None else seq(t).flip(-1)  # noqa: E731
    u0, u1 = (u[:, 0], u[:, 1]) if u.ndim == 5 else (u, u)
    fwd = selective_scan(seq(u0), seq(delta[:, 0]), A[0], seq(B[:, 0]), seq(C[:, 0]), D[0], seq(z), bias[0], True)
    bwd = selective_scan(flip(u1), flip(delta[:, 1]), A[1], flip(B[:, 1]), flip(C[:, 1]), D[1], flip(z), bias[1], True)
    return (fwd + bwd.flip(-1)).view(u0.shape)


def max_rel_error(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("l", [1, 2, 17, 63, 64, 65, 200])
@pytest.mark.parametrize("n", [1, 16])
def test_matches_token_serial_reference_for_any_length_and_state_size(l, n):
    args = scan_inputs(l=l, n=n)
    for softplus in (False, True):
        out = selective_scan(*args, delta_softplus=softplus)
        assert out.shape == (2, 6, l) and out.dtype == torch.float32
        assert max_rel_error(out, naive_selective_scan(*args, delta_softplus=softplus)) < 1e-5


@pytest.mark.parametrize("g", [None, 1, 2, 6])
def test_grouped_B_and_C_give_each_channel_its_group(g):
    args = scan_inputs(l=40, n=4, g=g)
    assert max_rel_error(selective_scan(*args), naive_selective_scan(*args)) < 1e-5
    if g is not None and g > 1:  # channel c reads group c // (d // g): differs from using group 0 everywhere
        u, delta, A, B, C = args[:5]
        first = selective_scan(u, delta, A, B[:, 0], C[:, 0])
        assert not torch.allclose(selective_scan(u, delta, A, B, C), first)
        per_channel = B.repeat_interleave(6 // g, dim=1)
        torch.testing.assert_close(selective_scan(u, delta, A, per_channel, C), selective_scan(u, delta, A, B, C))


def test_B_and_C_with_different_group_counts():
    u, delta, A, B, _, D, z, bias = scan_inputs(l=30, n=3, g=3)
    C = torch.randn(2, 2, 3, 30)
    assert max_rel_error(selective_scan(u, delta, A, B, C, D, z, bias),
                         naive_selective_scan(u, delta, A, B, C, D, z, bias)) < 1e-5


@pytest.mark.parametrize("D,z,bias", [(False, False, False), (True, False, False), (False, True, False),
                                      (False, False, True), (True, True, True)])
def test_optional_D_z_and_delta_bias_each_enter_the_output(D, z, bias):
    args = scan_inputs(l=33, n=2, D=D, z=z, bias=bias)
    out = selective_scan(*args, delta_softplus=True)
    assert max_rel_error(out, naive_selective_scan(*args, delta_softplus=True)) < 1e-5
    bare = selective_scan(*args[:5], delta_softplus=True)
    assert torch.allclose(out, bare) == (not (D or z or bias))


def test_last_state_matches_the_reference():
    args = scan_inputs(l=45, n=8)
    out, last = selective_scan(*args, delta_softplus=True, return_last_state=True)
    ref, ref_last = naive_selective_scan(*args, delta_softplus=True, return_last_state=True)
    assert last.shape == (2, 6, 8)
    assert max_rel_error(last, ref_last) < 1e-5 and max_rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    args = scan_inputs(l=70, n=16, dtype=dtype)
    out = selective_scan(*args, delta_softplus=True)
    assert out.dtype == dtype
    # the only errors left are the final rounding to the half dtype
    exact = naive_selective_scan(*[t if t is None else t.double() for t in args], delta_softplus=True)
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    assert max_rel_error(out, exact) < tol
    assert max_rel_error(out.double(), exact.to(dtype).double()) < tol


def test_long_sequence_4096_tokens():
    args = scan_inputs(b=1, d=4, l=4096, n=16, A_scale=0.05)
    out = selective_scan(*args, delta_softplus=True)
    assert max_rel_error(out, naive_selective_scan(*args, delta_softplus=True)) < 1e-5


def test_huge_delta_resets_the_state_to_the_current_token():
    u, delta, A, B, C = scan_inputs(l=50, n=4, D=False, z=False, bias=False)[:5]
    delta = torch.full_like(delta, 1e4)
    out = selective_scan(u, delta, A, B, C)
    assert torch.isfinite(out).all()
    assert max_rel_error(out, naive_selective_scan(u, delta, A, B, C)) < 1e-5
    # x_t = delta * B_t u_t only: y_t = delta u_t <B_t, C_t>
    expected = delta * u * (B * C).sum(1, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-2)


def test_zero_delta_carries_the_state_unchanged():
    u, delta, A, B, C = scan_inputs(l=40, n=4, D=False, z=False, bias=False)[:5]
    delta[:, :, 10:] = 0.0  # after token 9 nothing decays and nothing enters
    out, last = selective_scan(u, delta, A, B, C, return_last_state=True)
    _, state10 = selective_scan(u[..., :10], delta[..., :10], A, B[..., :10], C[..., :10], return_last_state=True)
    torch.testing.assert_close(last, state10)
    torch.testing.assert_close(out[..., 10:], torch.einsum("bdn,bnl->bdl", state10, C[..., 10:]))
    assert max_rel_error(out, naive_selective_scan(u, delta, A, B, C)) < 1e-5


@pytest.mark.parametrize("A_scale", [30.0, 1e3, 1e6])
def test_very_negative_A_stays_finite_and_exact(A_scale):
    for n in (1, 16):
        args = scan_inputs(l=90, n=n, A_scale=A_scale)
        out = selective_scan(*args, delta_softplus=True)
        assert torch.isfinite(out).all()
        assert max_rel_error(out, naive_selective_scan(*args, delta_softplus=True)) < 1e-5


def test_decays_needing_float64_chunk_exponentials():
    # per-token log-decays around -20: |cumulative| within a 16-token chunk exceeds float32's exp range
    u, delta, A, B, C = scan_inputs(l=64, n=2, D=False, z=False, bias=False)[:5]
    delta = torch.full_like(delta, 20.0)
    A = -torch.ones(6, 2) * torch.tensor([1.0, 0.05])
    u = u * torch.exp(torch.linspace(-5, 5, 64))  # inputs over ten orders of magnitude
    assert max_rel_error(selective_scan(u, delta, A, B, C), naive_selective_scan(u, delta, A, B, C)) < 1e-5


def test_positive_A_growth_matches_the_reference():
    u, delta, A, B, C = scan_inputs(l=30, n=3, D=False, z=False, bias=False)[:5]
    A = A.abs() * 0.1
    delta = delta.abs() * 0.2
    assert max_rel_error(selective_scan(u, delta, A, B, C), naive_selective_scan(u, delta, A, B, C)) < 1e-5


def test_strided_inputs_give_the_same_result():
    b, d, l, n = 2, 6, 41, 4
    big = torch.randn(b, 3 * d, l)
    u, delta, z = big[:, :d], big[:, d:2 * d] - 1, big[:, 2 * d:]
    bc = torch.randn(b, l, 2 * n).transpose(1, 2)
    B, C = bc[:, :n], bc[:, n:]
    A = -torch.rand(n, d).t() - 0.1
    assert not (u.is_contiguous() or B.is_contiguous() or A.is_contiguous())
    out = selective_scan(u, delta, A, B, C, z=z, delta_softplus=True)
    ref = selective_scan(*(t.contiguous() for t in (u, delta, A, B, C)), z=z.contiguous(), delta_softplus=True)
    torch.testing.assert_close(out, ref)
    u_t = torch.randn(b, l, d).transpose(1, 2)  # channels-last
    torch.testing.assert_close(selective_scan(u_t, delta, A, B, C), selective_scan(u_t.contiguous(), delta, A, B, C))


def test_gradients_match_autograd_of_the_reference():
    args = [None if t is None else t.double().requires_grad_()
            for t in scan_inputs(b=1, d=4, l=37, n=3, g=2)]
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    grads = torch.autograd.grad(selective_scan(*args, delta_softplus=True).square().sum(), args)
    ref = torch.autograd.grad(naive_selective_scan(*args, delta_softplus=True).square().sum(), args)
    for name, g, r in zip(names, grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_float32_gradients_are_close_to_the_float64_reference():
    args32 = scan_inputs(b=1, d=4, l=100, n=16)
    args = [t.requires_grad_() for t in args32]
    grads = torch.autograd.grad(selective_scan(*args, delta_softplus=True).square().sum(), args)
    args64 = [t.detach().double().requires_grad_() for t in args32]
    ref = torch.autograd.grad(naive_selective_scan(*args64, delta_softplus=True).square().sum(), args64)
    for g, r in zip(grads, ref):
        assert g.dtype == torch.float32 and max_rel_error(g, r) < 1e-4


def test_gradcheck_in_float64():
    torch.manual_seed(1)
    b, d, l, n, g = 1, 2, 19, 2, 2
    u, delta, z = (torch.randn(b, d, l, dtype=torch.float64, requires_grad=True) for _ in range(3))
    A_log = torch.rand(d, n, dtype=torch.float64, requires_grad=True)
    B, C = (torch.randn(b, g, n, l, dtype=torch.float64, requires_grad=True) for _ in range(2))
    D, bias = (torch.randn(d, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def fn(u, delta, A_log, B, C, D, z, bias):
        return selective_scan(u, delta, -A_log.exp(), B, C, D, z, bias, delta_softplus=True, backend="torch")

    assert torch.autograd.gradcheck(fn, (u, delta, A_log, B, C, D, z, bias))


# ------------------------------------------------------------------ cross scan

def test_routes_visit_the_grid_in_vmamba_cross_scan_order():
    x = torch.arange(6.0).view(1, 2, 3)  # [[0 1 2], [3 4 5]]
    expected = [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    for r in range(4):
        assert route_forward(x, r)[0].tolist() == expected[r]
        assert torch.equal(route_backward(route_forward(x, r), r, 2, 3), x)
    for R, orders in ((2, [0, 2]), (1, [0])):  # two routes: raster and reversed raster (Vim)
        for r, k in enumerate(orders):
            assert route_forward(x, r, R)[0].tolist() == expected[k]
            assert torch.equal(route_backward(route_forward(x, r, R), r, 2, 3, R), x)


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("H,W", [(6, 7), (5, 5), (1, 9), (13, 3)])
def test_cross_scan_equals_single_route_scans_of_flipped_copies_summed(R, H, W):
    args = cross_inputs(H=H, W=W, R=R)
    out = cross_selective_scan(*args, routes=R)
    assert out.shape == (2, 5, H, W)
    assert max_rel_error(out, naive_cross_selective_scan(*args, routes=R)) < 1e-5
    # the same through the public single-route op on explicitly reordered copies
    u, delta, A, B, C, D, bias = args
    fwd = lambda t, r: route_forward(t, r, R)  # noqa: E731
    total = sum(route_backward(selective_scan(fwd(u, r), fwd(delta[:, r], r), A[r], fwd(B[:, r], r), fwd(C[:, r], r),
                                              D[r], delta_bias=bias[r], delta_softplus=True), r, H, W, R)
                for r in range(R))
    torch.testing.assert_close(out, total, rtol=1e-5, atol=1e-5)


def test_cross_scan_routes_differ_and_a_single_route_is_a_raster_scan():
    u, delta, A, B, C, D, bias = cross_inputs(R=1, n=1)
    out = cross_selective_scan(u, delta, A, B, C, D, bias, routes=1)
    flat = selective_scan(u.flatten(2), delta[:, 0].flatten(2), A[0], B[:, 0].flatten(2), C[:, 0].flatten(2),
                          D[0], delta_bias=bias[0], delta_softplus=True)
    torch.testing.assert_close(out, flat.view_as(u))
    args4 = cross_inputs(n=1)
    per_route = [cross_selective_scan(*(t[:, r:r + 1] if t.ndim == 5 else t[r:r + 1] if t.ndim in (2, 3) else t
                                        for t in args4), routes=1) for r in range(4)]
    assert not torch.allclose(per_route[0], per_route[2], atol=1e-3)


def test_cross_scan_gradients_match_the_reference():
    args = [t.double().requires_grad_() for t in cross_inputs(b=1, d=3, H=5, W=4, n=2, R=4)]
    grads = torch.autograd.grad(cross_selective_scan(*args).square().sum(), args)
    ref = torch.autograd.grad(naive_cross_selective_scan(*args).square().sum(), args)
    for name, g, r in zip(("u", "delta", "A", "B", "C", "D", "delta_bias"), grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_cross_scan_gradcheck_in_float64():
    args = [t.double().requires_grad_() for t in cross_inputs(b=1, d=2, H=3, W=4, n=2, R=2)]
    assert torch.autograd.gradcheck(lambda *a: cross_selective_scan(*a, routes=2), args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_scan_half_precision(dtype):
    args = cross_inputs(H=8, W=6, n=1, dtype=dtype)
    out = cross_selective_scan(*args)
    assert out.dtype == dtype
    exact = naive_cross_selective_scan(*[t.double() for t in args])
    assert max_rel_error(out, exact) < (4e-3 if dtype == torch.float16 else 2e-2)


def test_cross_scan_without_D_or_bias_and_without_softplus():
    u, delta, A, B, C, _, _ = cross_inputs(R=2)
    delta = delta.abs()
    out = cross_selective_scan(u, delta, A, B, C, delta_softplus=False, routes=2)
    assert max_rel_error(out, naive_cross_selective_scan(u, delta, A, B, C, delta_softplus=False, routes=2)) < 1e-5


def test_cross_scan_strided_inputs():
    u, delta, A, B, C, D, bias = cross_inputs(H=6, W=8)
    u_cl = u.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    delta_t = delta.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not (u_cl.is_contiguous() or delta_t.is_contiguous())
    torch.testing.assert_close(cross_selective_scan(u_cl, delta_t, A, B, C, D, bias),
                               cross_selective_scan(u, delta, A, B, C, D, bias))


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("H,W", [(5, 7), (1, 9)])
@pytest.mark.parametrize("per_route_u,gate", [(True, False), (False, True), (True, True)])
def test_cross_scan_per_route_u_and_z_gate_match_the_reference(R, H, W, per_route_u, gate):
    args = cross_inputs(H=H, W=W, R=R, per_route_u=per_route_u)
    z = torch.randn(2, 5, H, W) if gate else None
    out = cross_selective_scan(*args, routes=R, z=z)
    assert out.shape == (2, 5, H, W)
    assert max_rel_error(out, naive_cross_selective_scan(*args, routes=R, z=z)) < 1e-5


@pytest.mark.parametrize("H,W", [(1, 23), (3, 5)])
def test_two_routes_are_the_forward_scan_plus_the_flipped_backward_scan(H, W):
    for per_route_u in (False, True):
        args = cross_inputs(H=H, W=W, R=2, per_route_u=per_route_u)
        z = torch.randn(2, 5, H, W)
        torch.testing.assert_close(cross_selective_scan(*args, routes=2, z=z), explicit_bidirectional(*args, z=z),
                                   rtol=1e-5, atol=1e-5)


def test_a_shared_u_equals_the_same_u_given_per_route_and_z_gates_the_sum():
    args = cross_inputs(R=4)
    per_route = [args[0].unsqueeze(1).expand(-1, 4, -1, -1, -1), *args[1:]]
    torch.testing.assert_close(cross_selective_scan(*per_route), cross_selective_scan(*args))
    z = torch.randn(2, 5, 6, 7)
    torch.testing.assert_close(cross_selective_scan(*per_route, z=z), cross_selective_scan(*args) * F.silu(z))


@pytest.mark.parametrize("R", [2, 4])
def test_cross_scan_per_route_u_and_z_gradients_match_the_reference(R):
    args = [t.double().requires_grad_() for t in cross_inputs(b=2, d=3, H=3, W=5, n=2, R=R, per_route_u=True)]
    z = torch.randn(2, 3, 3, 5, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(cross_selective_scan(*args, routes=R, z=z).square().sum(), [*args, z])
    ref = torch.autograd.grad(naive_cross_selective_scan(*args, routes=R, z=z).square().sum(), [*args, z])
    for name, g, r in zip(("u", "delta", "A", "B", "C", "D", "delta_bias", "z"), grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_cross_scan_gradcheck_with_per_route_u_and_z():
    args = [t.double().requires_grad_() for t in cross_inputs(b=1, d=2, H=1, W=5, n=2, R=2, per_route_u=True)]
    z = torch.randn(1, 2, 1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: cross_selective_scan(*a[:-1], routes=2, z=a[-1]), [*args, z])


def low_rank_delta(b=2, d=5, H=6, W=7, R=4, rank=3, dtype=torch.float32):
    """A low-rank delta input (b, R, rank, H, W) and its projection (R, d, rank) (Mamba's dt_proj)."""
    return torch.randn(b, R, rank, H, W).to(dtype), torch.randn(R, d, rank) * 0.5


def projected_by_hand(dt, weight):
    """delta[b, r, c, h, w] = sum_k weight[r, c, k] dt[b, r, k, h, w], one route and channel at a time."""
    b, R, _, H, W = dt.shape
    out = torch.empty(b, R, weight.shape[1], H, W, dtype=torch.float64)
    for r in range(R):
        for c in range(weight.shape[1]):
            out[:, r, c] = (weight[r, c].double().view(1, -1, 1, 1) * dt[:, r].double()).sum(1)
    return out


def check_delta_projection(R, rank, path, d=5, H=6, W=7):
    """cross_selective_scan with delta_proj_weight on the active path equals the float64 reference run on
    the delta projected by hand (per-route u for two routes, a z gate)."""
    u, _, A, B, C, D, bias = cross_inputs(d=d, H=H, W=W, R=R, per_route_u=R == 2)
    dt, weight = low_rank_delta(d=d, H=H, W=W, R=R, rank=rank)
    z = torch.randn(2, d, H, W)
    out = cross_selective_scan(u, dt, A, B, C, D, bias, routes=R, z=z, delta_proj_weight=weight)
    assert last_backend("cross_selective_scan") == path
    ref = naive_cross_selective_scan(u.double(), projected_by_hand(dt, weight), A, B.double(), C.double(), D, bias,
                                     routes=R, z=z.double())
    assert max_rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("rank", [1, 3])
def test_delta_projection_equals_scanning_the_projected_delta(R, rank):
    """delta_proj_weight: delta is the low-rank input, each route's delta its projection (per token)."""
    check_delta_projection(R, rank, "torch")


def test_delta_projection_gradients_match_the_projected_reference():
    u, _, A, B, C, D, bias = (t.double() for t in cross_inputs(b=1, d=3, H=3, W=4, n=2, R=2))
    dt, weight = (t.double() for t in low_rank_delta(b=1, d=3, H=3, W=4, R=2, rank=2))
    leaves = [t.requires_grad_() for t in (u, dt, A, B, C, D, bias, weight)]
    grads = torch.autograd.grad(cross_selective_scan(*leaves[:7], routes=2, delta_proj_weight=weight).square().sum(),
                                leaves)
    delta = torch.einsum("rdk,brkhw->brdhw", weight, dt)
    ref = torch.autograd.grad(naive_cross_selective_scan(u, delta, A, B, C, D, bias, routes=2).square().sum(), leaves)
    for name, g, r in zip(("u", "dt", "A", "B", "C", "D", "delta_bias", "delta_proj_weight"), grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dt,weight,match", [
    (torch.randn(2, 4, 3, 6, 7), torch.randn(4, 5, 2), r"delta_proj_weight must have shape \(R, d, rank\) with R = "
                                                         r"routes = 4, d of u and rank = delta.shape\[2\]"),
    (torch.randn(2, 4, 3, 6, 7), torch.randn(2, 5, 3), "delta_proj_weight must have shape"),
    (torch.randn(2, 4, 3, 6, 7), torch.randn(4, 5), r"delta_proj_weight must have shape \(R, d, rank\)"),
    (torch.randn(2, 2, 3, 6, 7), torch.randn(4, 5, 3), r"delta must have shape \(b, R, rank, H, W\)"),
    (torch.randn(2, 4, 0, 6, 7), torch.randn(4, 5, 0), "rank = 0"),
    (torch.randn(2, 4, 3, 6, 7), torch.randn(4, 5, 3, dtype=torch.float64), "delta_proj_weight must have u's dtype"),
])
def test_delta_projection_bad_inputs_raise_errors_naming_them(dt, weight, match):
    u, _, A, B, C, D, bias = cross_inputs()
    with pytest.raises(ValueError, match=match):
        cross_selective_scan(u, dt, A, B, C, D, bias, delta_proj_weight=weight)


# ------------------------------------------------------------------ bidirectional conv1d + SiLU

def explicit_bidirectional_conv(x, weight, bias):
    """nn.Conv1d's causal depthwise conv + SiLU on x and on flip(x) (flipped back): (b, l, 2, d)."""
    L, d, K = x.shape[1], x.shape[2], weight.shape[-1]
    outs = []
    for r, seq in enumerate((x, x.flip(1))):
        y = F.conv1d(seq.transpose(1, 2), weight[r].unsqueeze(1), None if bias is None else bias[r],
                     padding=K - 1, groups=d)[..., :L]
        y = F.silu(y).transpose(1, 2)
        outs.append(y.flip(1) if r else y)
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("l,K", [(1, 4), (3, 4), (37, 4), (20, 1), (9, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_bidirectional_conv_is_the_causal_conv_of_both_directions(l, K, bias):
    big = torch.randn(2, l, 14, dtype=torch.float64)
    x = big[..., 3:9]                                   # a strided slice, as of the input projection
    w = torch.randn(2, 6, K, dtype=torch.float64)
    b = torch.randn(2, 6, dtype=torch.float64) if bias else None
    out = bidirectional_conv1d_silu(x, w, b)
    assert last_backend("bidirectional_conv1d_silu") == "torch"
    assert out.shape == (2, l, 2, 6) and out.is_contiguous()
    torch.testing.assert_close(out, explicit_bidirectional_conv(x, w, b))


@pytest.mark.parametrize("l,N", [(1, 3), (11, 44), (6, 50)])
def test_bidirectional_conv_projects_each_route_with_its_own_weight(l, N):
    x = torch.randn(2, l, 20, dtype=torch.float64)[..., 4:13]
    w, b, P = torch.randn(2, 9, 4, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64), \
        torch.randn(2, N, 9, dtype=torch.float64)
    u, proj = bidirectional_conv1d_silu(x, w, b, P)
    ref = explicit_bidirectional_conv(x, w, b)
    torch.testing.assert_close(u, ref)
    assert proj.shape == (2, l, 2, N) and proj.is_contiguous()
    for r in range(2):   # route r's rows through its own nn.Linear
        torch.testing.assert_close(proj[:, :, r], F.linear(ref[:, :, r], P[r]))
    empty = bidirectional_conv1d_silu(x[:, :0], w, b, P)
    assert [t.shape for t in empty] == [(2, 0, 2, 9), (2, 0, 2, N)]


def test_bidirectional_conv_gradcheck_and_float32_parameters_for_half_inputs():
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bidirectional_conv1d_silu, (x, w, b))
    P = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bidirectional_conv1d_silu, (x, w, b, P))
    x16 = x.detach().to(torch.bfloat16)
    out = bidirectional_conv1d_silu(x16, w.detach().float(), b.detach().float())
    assert out.dtype == torch.bfloat16
    ref = explicit_bidirectional_conv(x16.double(), w.detach(), b.detach())
    assert max_rel_error(out, ref) < 3e-2


@pytest.mark.parametrize("x,w,b,proj,match", [
    (torch.randn(2, 6), None, None, None, r"x must have shape \(b, l, d\)"),
    (None, torch.randn(6, 4), None, None, r"weight must have shape \(2, d, K\)"),
    (None, torch.randn(3, 6, 4), None, None, r"weight must have shape \(2, d, K\) with d = 6 of x"),
    (None, torch.randn(2, 5, 4), None, None, r"weight must have shape \(2, d, K\) with d = 6 of x"),
    (None, torch.randn(2, 6, 0), None, None, "K >= 1"),
    (None, None, torch.randn(6), None, r"bias must have shape \(2, d\)"),
    (None, None, torch.randn(2, 5), None, r"bias must have shape \(2, d\) with d of x"),
    (None, torch.randn(2, 6, 4, dtype=torch.float64), None, None, "weight must have x's dtype"),
    (torch.randint(0, 3, (2, 9, 6)), None, None, None, "x must be a floating-point"),
    (None, None, None, torch.randn(44, 6), r"proj_weight must have shape \(2, N, d\)"),
    (None, None, None, torch.randn(2, 44, 5), r"proj_weight must have shape \(2, N, d\) with d = 6 of x"),
    (None, None, None, torch.randn(1, 44, 6), r"proj_weight must have shape \(2, N, d\) with d = 6 of x"),
    (None, None, None, torch.randn(2, 0, 6), "N >= 1"),
    (None, None, None, torch.randn(2, 44, 6, dtype=torch.float64), "proj_weight must have x's dtype"),
])
def test_bidirectional_conv_bad_inputs_raise_errors_naming_the_argument(x, w, b, proj, match):
    args = [torch.randn(2, 9, 6), torch.randn(2, 6, 4), torch.randn(2, 6), proj]
    for i, t in enumerate((x, w, b)):
        if t is not None:
            args[i] = t
    with pytest.raises(ValueError, match=match):
        bidirectional_conv1d_silu(*args)


# ------------------------------------------------------------------ dispatch and checks

def test_auto_on_cpu_takes_the_compiled_path_where_it_builds_and_triton_is_refused_clearly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = scan_inputs(l=8)
    with use_backend("auto"):
        selective_scan(*args)
        assert last_backend("selective_scan") == ("cpu" if cpu_kernel_available() else "torch")
        selective_scan(*[None if t is None else t.double() for t in args])  # float64: the exact PyTorch path
        assert last_backend("selective_scan") == "torch"
    if not torch.cuda.is_available():
        with pytest.raises((ValueError, RuntimeError), match="^selective_scan: backend='triton'"):
            selective_scan(*args, backend="triton")
        with pytest.raises((ValueError, RuntimeError), match="^cross_selective_scan: backend='triton'"):
            cross_selective_scan(*cross_inputs(), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(*args, backend="cuda")
    cross_selective_scan(*cross_inputs(), backend="torch")
    assert last_backend("cross_selective_scan") == "torch"


@pytest.mark.parametrize("arg,bad,match", [
    (0, torch.randn(2, 6), "u must have shape"),
    (1, torch.randn(2, 6, 36), "delta must have shape"),
    (2, torch.randn(5, 16), "A must have shape"),
    (3, torch.randn(2, 15, 37), "B must have shape"),
    (4, torch.randn(2, 4, 16, 37), "C has g = 4 groups, which must divide d = 6"),
    (4, torch.randn(2, 16), "C must have shape"),
    (5, torch.randn(5), "D must have shape"),
    (6, torch.randn(2, 6, 38), "z must have shape"),
    (7, torch.randn(6, 1), "delta_bias must have shape"),
    (0, torch.randint(0, 3, (2, 6, 37)), "u must be a floating-point"),
    (1, torch.randn(2, 6, 37, dtype=torch.float64), "delta must have u's dtype"),
    (2, torch.randn(6, 16, dtype=torch.float64), r"A must have u's dtype torch.float32 \(or float32\)"),
    (3, "not a tensor", "B must be a torch.Tensor"),
])
def test_bad_inputs_raise_errors_naming_the_argument(arg, bad, match):
    args = scan_inputs()
    args[arg] = bad
    with pytest.raises(ValueError, match=match):
        selective_scan(*args)


def test_half_inputs_take_float32_parameters_but_not_float32_activations():
    args = scan_inputs(l=20, dtype=torch.bfloat16)
    assert args[2].dtype == torch.float32  # A, D, delta_bias may stay float32
    selective_scan(*args)
    args[3] = args[3].float()
    with pytest.raises(ValueError, match="B must have u's dtype torch.bfloat16"):
        selective_scan(*args)


def test_inputs_on_another_device_are_rejected():
    args = scan_inputs(l=10)
    args[3] = args[3].to("meta")
    with pytest.raises(ValueError, match="B is on meta but u is on cpu"):
        selective_scan(*args)


def test_zero_length_and_zero_state_are_rejected_and_empty_batches_allowed():
    u, delta, A, B, C = scan_inputs(l=10)[:5]
    with pytest.raises(ValueError, match="l = 0 tokens"):
        selective_scan(u[..., :0], delta[..., :0], A, B[..., :0], C[..., :0])
    with pytest.raises(ValueError, match="n = 0 states"):
        selective_scan(u, delta, A[:, :0], B[:, :0], C[:, :0])
    assert selective_scan(u[:0], delta[:0], A, B[:0], C[:0]).shape == (0, 6, 10)
    out, last = selective_scan(u[:, :0], delta[:, :0], A[:0], B, C, return_last_state=True)
    assert out.shape == (2, 0, 10) and last.shape == (2, 0, 16)


@pytest.mark.parametrize("arg,bad,match", [
    (0, torch.randn(2, 5, 6), "u must have shape"),
    (1, torch.randn(2, 2, 5, 6, 7), r"delta must have shape \(b, R, d, H, W\) with R = routes = 4"),
    (2, torch.randn(4, 5), "A must have shape"),
    (3, torch.randn(2, 4, 4, 7, 6), "B must have shape"),
    (4, torch.randn(2, 4, 3, 6, 7), "C must have shape"),
    (5, torch.randn(2, 5), "D must have shape"),
    (6, torch.randn(4, 6), "delta_bias must have shape"),
    (1, torch.randn(2, 4, 5, 6, 7, dtype=torch.float64), "delta must have u's dtype"),
])
def test_cross_scan_bad_inputs_raise_errors_naming_the_argument(arg, bad, match):
    args = cross_inputs()
    args[arg] = bad
    with pytest.raises(ValueError, match=match):
        cross_selective_scan(*args)


@pytest.mark.parametrize("u,z,match", [
    (torch.randn(2, 5, 6), None, r"u must have shape \(b, d, H, W\) or \(b, R, d, H, W\)"),
    (torch.randn(1, 2, 4, 5, 6, 7), None, r"u must have shape \(b, d, H, W\) or \(b, R, d, H, W\)"),
    (torch.randn(2, 2, 5, 6, 7), None, r"u must have shape \(b, R, d, H, W\) with R = routes = 4"),
    (torch.randint(0, 3, (2, 4, 5, 6, 7)), None, "u must be a floating-point"),
    (None, torch.randn(2, 5, 42), r"z must have shape \(b, d, H, W\)"),
    (None, torch.randn(2, 5, 7, 6), r"z must have shape \(b, d, H, W\) with b, d, H, W of u = \(2, 5, 6, 7\)"),
    (None, torch.randn(2, 4, 5, 6, 7), r"z must have shape \(b, d, H, W\)"),
    (None, torch.randn(2, 5, 6, 7, dtype=torch.float64), "z must have u's dtype"),
    (None, torch.randn(2, 5, 6, 7, device="meta"), "z is on meta but u is on cpu"),
])
def test_cross_scan_bad_u_or_z_raise_errors_naming_them(u, z, match):
    args = cross_inputs()
    if u is not None:
        args[0] = u
    with pytest.raises(ValueError, match=match):
        cross_selective_scan(*args, z=z)


@pytest.mark.parametrize("routes", [0, 3, 8, "4", True])
def test_unsupported_route_counts_are_rejected(routes):
    with pytest.raises(ValueError, match=r"routes must be one of \(1, 2, 4\)"):
        cross_selective_scan(*cross_inputs(), routes=routes)


def test_cross_scan_route_count_must_match_the_parameters():
    with pytest.raises(ValueError, match="R = routes = 2"):
        cross_selective_scan(*cross_inputs(R=4), routes=2)


@pytest.mark.parametrize("A_scale", [5.0, 30.0])
def test_gradients_stay_finite_and_correct_under_strong_decays(A_scale):
    # |delta * A| of ~10-60 per token: |L| within a chunk reaches hundreds (the float64 chunk path),
    # where the gradient of 1 / exp(L) would overflow
    u, delta, A, B, C, D, z, bias = scan_inputs(b=1, d=4, l=40, n=4, A_scale=A_scale)
    delta = delta + 2.0
    leaves = [t.detach().clone().requires_grad_() for t in (u, delta, B, C)]
    out = selective_scan(leaves[0], leaves[1], A, leaves[2], leaves[3], D, z, bias, False, backend="torch")
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in (u, delta, B, C)]
    ref = naive_selective_scan(ref_leaves[0], ref_leaves[1], A.double(), ref_leaves[2], ref_leaves[3], D.double(),
                               z.double(), bias.double(), False)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert max_rel_error(g, r) < 1e-4
