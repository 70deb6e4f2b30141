"""The fused Triton path of selective_scan / cross_selective_scan against the float64 token-serial
references and the PyTorch path, forward and every gradient.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (see triton_harness.py).
bfloat16 arithmetic is wrong in the interpreter; the kernels upcast right after every load, and
bfloat16 is only smoke-tested.
"""
from __future__ import annotations


import pytest
import torch

from triton_harness import (DEVICE, HAS_TRITON, compile_for_hopper, import_kernels,
                            in_process_marker, interpreter_env, run_in_fresh_process)

scan_triton = import_kernels("visionlin.kernels.ssm.scan_triton", "_scan_fwd_kernel")
IN_PROCESS = scan_triton is not None
in_process = in_process_marker(scan_triton)

from visionlin.kernels import cross_selective_scan, last_backend, selective_scan  # noqa: E402
from visionlin.kernels.ssm import naive_cross_selective_scan, naive_selective_scan  # noqa: E402
from visionlin.kernels.ssm.naive import route_backward, route_forward  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    interpreter_env(monkeypatch, scan_triton)


def scan_inputs(b=1, d=6, l=17, n=16, gB=None, gC=None, dtype=torch.float32, D=True, z=True, bias=True,
                delta_scale=1.5):
    """u, delta, A, B, C, D, z, delta_bias as in mamba; A, D, delta_bias stay float32."""
    bcB = (b, n, l) if gB is None else (b, gB, n, l)
    bcC = (b, n, l) if gC is None else (b, gC, n, l)
    A = -torch.exp(torch.rand(d, n) * 2.5)
    args = [torch.randn(b, d, l), torch.rand(b, d, l) * delta_scale, A, torch.randn(*bcB), torch.randn(*bcC),
            torch.randn(d) if D else None, torch.randn(b, d, l) if z else None,
            torch.rand(d) * 0.5 if bias else None]
    return [None if t is None else t.to(DEVICE, t.dtype if i in (2, 5, 7) else dtype) for i, t in enumerate(args)]


def cross_inputs(b=1, d=3, H=3, W=5, n=4, R=4, dtype=torch.float32, D=True, bias=True, per_route_u=False,
                 z=False):
    """u (shared or per route), delta, A, B, C, D, delta_bias, and a z gate (or None) last."""
    u = torch.randn(b, R, d, H, W) if per_route_u else torch.randn(b, d, H, W)
    args = [u, torch.randn(b, R, d, H, W) - 1.0, -torch.exp(torch.rand(R, d, n) * 2),
            torch.randn(b, R, n, H, W), torch.randn(b, R, n, H, W),
            torch.randn(R, d) if D else None, torch.randn(R, d) * 0.5 if bias else None,
            torch.randn(b, d, H, W) if z else None]
    return [None if t is None else t.to(DEVICE, t.dtype if i in (2, 5, 6) else dtype) for i, t in enumerate(args)]


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


def grads_of(fn, inputs, weight, dtype=None):
    """Gradients of sum(fn(inputs) * weight) with respect to every tensor input (None stays None)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((out * weight.to(out.dtype)).sum(), present))
    return [None if t is None else next(grads) for t in leaves]


def assert_grads_close(grads, ref_grads, rel, names):
    for name, g, r in zip(names, grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is None:
            continue
        assert g.shape == r.shape and torch.isfinite(g).all(), name
        err = (g.double() - r.double()).abs().max().item()
        assert err <= rel * r.double().abs().max().item() + 1e-6, f"d{name}: max error {err}"


SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
CROSS_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias", "z")


def check_scan(args, softplus, rel_out=1e-5, rel_grad=1e-4, against_torch=True):
    tri = lambda *x: selective_scan(*x, delta_softplus=softplus, backend="triton")  # noqa: E731
    out = tri(*args)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    assert last_backend("selective_scan") == "triton"
    ref = naive_selective_scan(*args, delta_softplus=softplus)
    assert rel_err(out, ref) <= rel_out, rel_err(out, ref)
    weight = torch.randn(args[0].shape, device=DEVICE)
    grads = grads_of(tri, args, weight)
    for g, x in zip(grads, args):
        assert g is None or g.dtype == x.dtype
    ref64 = lambda *x: naive_selective_scan(*x, delta_softplus=softplus)  # noqa: E731
    assert_grads_close(grads, grads_of(ref64, args, weight, torch.float64), rel_grad, SCAN_NAMES)
    if against_torch:
        tp = lambda *x: selective_scan(*x, delta_softplus=softplus, backend="torch")  # noqa: E731
        torch.testing.assert_close(out, tp(*args), rtol=1e-5, atol=1e-5)
        assert_grads_close(grads, grads_of(tp, args, weight), rel_grad, SCAN_NAMES)


def cross_of(fn, **kw):
    """fn(u, delta, A, B, C, D, delta_bias, z) with z by keyword, as cross_inputs orders them."""
    return lambda *x: fn(*x[:7], z=x[7], **kw)


def check_cross(args, routes, softplus=True, rel_out=1e-5, rel_grad=1e-4, torch_grads=False):
    tri = cross_of(cross_selective_scan, delta_softplus=softplus, routes=routes, backend="triton")
    out = tri(*args)
    shape = args[0].shape[:1] + args[0].shape[-3:]
    assert out.dtype == args[0].dtype and out.shape == shape
    assert last_backend("cross_selective_scan") == "triton"
    ref64 = cross_of(naive_cross_selective_scan, delta_softplus=softplus, routes=routes)
    assert rel_err(out, ref64(*args)) <= rel_out
    weight = torch.randn(shape, device=DEVICE)
    grads = grads_of(tri, args, weight)
    assert_grads_close(grads, grads_of(ref64, args, weight, torch.float64), rel_grad, CROSS_NAMES)
    tp = cross_of(cross_selective_scan, delta_softplus=softplus, routes=routes, backend="torch")
    torch.testing.assert_close(out, tp(*args), rtol=1e-5, atol=1e-5)
    if torch_grads:  # see test_cross_scan_gradients_match_the_torch_path
        assert_grads_close(grads, grads_of(tp, args, weight), rel_grad, CROSS_NAMES)


# ------------------------------------------------------------------ selective_scan
@in_process
@pytest.mark.parametrize("l", [1, 17, 33])
@pytest.mark.parametrize("n", [1, 16])
def test_forward_and_gradients_for_any_length_and_state_size(l, n):
    check_scan(scan_inputs(b=2 if l == 17 else 1, l=l, n=n), softplus=True)


@in_process
@pytest.mark.parametrize("D,z,bias,softplus", [(False, False, False, False), (True, False, True, False),
                                                (False, True, False, True)])
def test_optional_inputs_and_softplus(D, z, bias, softplus):
    # Without softplus these steps reach delta*A ~ -18 per token, where the PyTorch path's *backward*
    # returns non-finite ddelta/dA (the gradient of exp(L).reciprocal() overflows float32), so its
    # gradients are not compared there; the float64 reference is.
    check_scan(scan_inputs(l=9, n=4, D=D, z=z, bias=bias), softplus=softplus, against_torch=softplus)


@in_process
@pytest.mark.parametrize("d,gB,gC", [(8, 2, 2), (6, 2, 3), (8, 4, 1)])
def test_grouped_B_and_C(d, gB, gC):
    # (6, 2, 3): group sizes 3 and 2, so channel blocks of one channel; (8, 4, 1): only B grouped
    check_scan(scan_inputs(d=d, l=7, n=4, gB=gB, gC=None if gC == 1 else gC), softplus=True)


@in_process
def test_many_channel_blocks_share_B_and_C_through_atomics(monkeypatch):
    monkeypatch.setattr(scan_triton, "_blocks", lambda d, n, g: (2, triton_pow2(n)))
    check_scan(scan_inputs(b=1, d=7, l=11, n=3, gB=None), softplus=True)


def triton_pow2(n):
    import triton
    return triton.next_power_of_2(n)


@in_process
def test_last_state_and_its_gradient():
    args = scan_inputs(l=13, n=4)
    out, last = selective_scan(*args, delta_softplus=True, return_last_state=True, backend="triton")
    ref_out, ref_last = naive_selective_scan(*args, delta_softplus=True, return_last_state=True)
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(last, ref_last) <= 1e-5
    wo, wl = torch.randn(out.shape, device=DEVICE), torch.randn(last.shape, device=DEVICE)

    def loss_of(path, dtype=None):
        leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in args]
        fn = naive_selective_scan if path == "naive" else selective_scan
        kw = {} if path == "naive" else {"backend": path}
        o, s = fn(*leaves, delta_softplus=True, return_last_state=True, **kw)
        grads = torch.autograd.grad((o * wo.to(o.dtype)).sum() + (s * wl.to(s.dtype)).sum(),
                                    [t for t in leaves if t is not None])
        return list(grads)

    assert_grads_close(loss_of("triton"), loss_of("naive", torch.float64), 1e-4, SCAN_NAMES)


@in_process
def test_half_precision_accumulates_in_float32():
    args = scan_inputs(l=17, n=16, dtype=torch.float16)
    check_scan(args, softplus=True, rel_out=3e-3, rel_grad=1e-2, against_torch=False)


@in_process
def test_bfloat16_smoke():
    args = scan_inputs(l=9, n=4, dtype=torch.bfloat16)
    out = selective_scan(*args, delta_softplus=True, backend="triton")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, naive_selective_scan(*args, delta_softplus=True)) <= 3e-2


@in_process
@pytest.mark.parametrize("scale", [0.0, 1e4])
def test_extreme_step_sizes(scale):
    # delta = 0: no decay and no input (out = D u gated); delta huge: decays far past the clamp
    args = scan_inputs(l=9, n=4, bias=False, delta_scale=scale)
    check_scan(args, softplus=False)
    if scale == 0.0:
        u, _, _, _, _, D, z, _ = args
        out = selective_scan(*args, backend="triton")
        torch.testing.assert_close(out, u * D[:, None] * z * torch.sigmoid(z))


@in_process
def test_strided_inputs_give_the_same_result_as_contiguous_ones():
    b, d, l, n = 2, 4, 7, 4
    xz = torch.randn(b, l, 3 * d, device=DEVICE)                      # a fused projection's output
    u, delta, z = (t.transpose(1, 2) for t in xz.split(d, dim=-1))    # (b, d, l) views
    delta = delta.abs()
    bc = torch.randn(b, l, 2 * n, device=DEVICE)
    B, C = (t.transpose(1, 2) for t in bc.split(n, dim=-1))
    A = -torch.rand(n, d, device=DEVICE).t()
    D, bias = torch.randn(2, d, device=DEVICE)[:, 0::1].unbind(0)
    strided = [u, delta, A, B, C, D, z, bias]
    assert not any(t.is_contiguous() for t in (u, delta, A, B, C, z))
    dense = [t.contiguous() for t in strided]
    run = lambda *x: selective_scan(*x, delta_softplus=True, backend="triton")  # noqa: E731
    torch.testing.assert_close(run(*strided), run(*dense), rtol=1e-6, atol=1e-6)
    weight = torch.randn(b, d, l, device=DEVICE)
    for g, r in zip(grads_of(run, strided, weight), grads_of(run, dense, weight)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ cross_selective_scan
@in_process
@pytest.mark.parametrize("routes", [1, 2, 4])
def test_cross_scan_matches_explicit_flips_and_transposes(routes):
    check_cross(cross_inputs(b=2 if routes == 2 else 1, R=routes), routes)


@in_process
@pytest.mark.parametrize("routes", [1, 2, 4])
def test_cross_scan_per_route_u_and_z_gate(routes):
    # one launch for all routes: each reads its own u by the route stride; dz sums over the routes
    check_cross(cross_inputs(d=3, H=3, W=3, n=2, R=routes, per_route_u=True, z=True), routes, torch_grads=True)
    check_cross(cross_inputs(d=2, H=1, W=5, n=2, R=routes, z=True), routes, torch_grads=True)


@in_process
def test_cross_scan_reads_vims_token_major_views():
    b, L, d, n, R = 1, 6, 4, 2, 2
    grid = lambda t: t.movedim(1, -1).unsqueeze(-2)  # noqa: E731  (b, L, [R,] c) -> (b, [R,] c, 1, L)
    xz = torch.randn(b, L, 2 * d, device=DEVICE)
    BC = torch.randn(b, L, R, 2 * n, device=DEVICE)
    strided = [grid(torch.randn(b, L, R, d, device=DEVICE)), grid(torch.rand(b, L, R, d, device=DEVICE) - 0.5),
               -torch.rand(R, d, n, device=DEVICE) - 0.1, grid(BC[..., :n]), grid(BC[..., n:]),
               torch.randn(R, d, device=DEVICE), torch.rand(R, d, device=DEVICE), grid(xz[..., d:])]
    dense = [t.contiguous() for t in strided]
    run = cross_of(cross_selective_scan, routes=2, backend="triton")
    out = run(*strided)
    torch.testing.assert_close(out, run(*dense), rtol=1e-6, atol=1e-6)
    assert out.flatten(2).transpose(1, 2).is_contiguous()          # channels-last: token-major for out_proj
    weight = torch.randn(out.shape, device=DEVICE)
    for g, r in zip(grads_of(run, strided, weight), grads_of(run, dense, weight)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@in_process
def test_cross_scan_with_a_delta_projection():
    """delta_proj_weight on the Triton path (projected before the launch): forward and every gradient,
    the weight's included, against the float64 reference on the explicitly projected delta."""
    u, _, A, B, C, D, bias, z = cross_inputs(d=3, H=2, W=3, n=2, R=2, per_route_u=True, z=True)
    dt = torch.randn(1, 2, 2, 2, 3, device=DEVICE)
    proj = torch.randn(2, 3, 2, device=DEVICE) * 0.5
    args = [u, dt, A, B, C, D, bias, z, proj]
    tri = lambda *x: cross_selective_scan(*x[:7], routes=2, z=x[7], delta_proj_weight=x[8], backend="triton")  # noqa: E731
    out = tri(*args)
    assert last_backend("cross_selective_scan") == "triton"

    def ref64(u, dt, A, B, C, D, bias, z, proj):
        return naive_cross_selective_scan(u, torch.einsum("rdk,brkhw->brdhw", proj, dt), A, B, C, D, bias, routes=2,
                                          z=z)
    assert rel_err(out, ref64(*args)) <= 1e-5
    weight = torch.randn(out.shape, device=DEVICE)
    assert_grads_close(grads_of(tri, args, weight), grads_of(ref64, args, weight, torch.float64), 1e-4,
                       ("u", "dt", "A", "B", "C", "D", "delta_bias", "z", "delta_proj_weight"))


@in_process
def test_cross_scan_gradients_match_the_torch_path():
    # mild decays only: for strong ones (|delta*A| ~ 10 per token) the PyTorch path's autograd returns
    # non-finite ddelta/dA (the gradient of exp(L).reciprocal() overflows float32); the float64
    # reference is the oracle there (test_cross_scan_matches_explicit_flips_and_transposes)
    args = cross_inputs(R=4)
    args[2] = args[2] * 0.1
    check_cross(args, 4, torch_grads=True)


@in_process
def test_cross_scan_route_order_on_a_non_square_grid():
    # route r of the fused kernel equals selective_scan on route_forward(...) copies, put back
    b, d, H, W, n = 1, 2, 3, 5, 2
    args = cross_inputs(b=b, d=d, H=H, W=W, n=n, R=4, D=False, bias=False)
    u, delta, A, B, C = args[:5]
    for r in range(4):
        only = [t.clone() for t in (delta, B)]
        for t in only:
            t[:, [q for q in range(4) if q != r]] = 0     # other routes read zero input
        out = cross_selective_scan(u, only[0], A, only[1], C, routes=4, delta_softplus=False, backend="triton")
        single = selective_scan(route_forward(u, r), route_forward(delta[:, r], r), A[r],
                                route_forward(B[:, r], r), route_forward(C[:, r], r), backend="torch")
        torch.testing.assert_close(out, route_backward(single, r, H, W), rtol=1e-5, atol=1e-5)


@in_process
def test_cross_scan_without_D_and_bias_and_without_softplus():
    args = cross_inputs(R=2, D=False, bias=False, n=1)
    args[1] = args[1].abs()          # a step size without softplus
    check_cross(args, 2, softplus=False)


@in_process
def test_cross_scan_half_precision():
    args = cross_inputs(R=4, dtype=torch.float16, z=True)
    out = cross_selective_scan(*args[:7], z=args[7], backend="triton")
    assert out.dtype == torch.float16
    assert rel_err(out, naive_cross_selective_scan(*args[:7], z=args[7])) <= 3e-3


@in_process
def test_cross_scan_strided_inputs():
    b, d, H, W, n, R = 1, 2, 2, 3, 2, 4
    u_cl = torch.randn(b, H, W, d, device=DEVICE).permute(0, 3, 1, 2)             # channels-last
    delta = (torch.randn(b, H, W, R, d, device=DEVICE) - 1).permute(0, 3, 4, 1, 2)
    BC = torch.randn(b, H, W, R, 2 * n, device=DEVICE).permute(0, 3, 4, 1, 2)
    B, C = BC[:, :, :n], BC[:, :, n:]
    A = -torch.rand(n, d, R, device=DEVICE).permute(2, 1, 0)
    strided = [u_cl, delta, A, B, C, torch.randn(R, d, device=DEVICE), torch.rand(R, d, device=DEVICE)]
    dense = [t.contiguous() for t in strided]
    run = lambda *x: cross_selective_scan(*x, backend="triton")  # noqa: E731
    torch.testing.assert_close(run(*strided), run(*dense), rtol=1e-6, atol=1e-6)
    weight = torch.randn(b, d, H, W, device=DEVICE)
    for g, r in zip(grads_of(run, strided, weight), grads_of(run, dense, weight)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ dispatch and errors
@in_process
def test_unsupported_calls_raise_clear_errors():
    args = scan_inputs(l=4, n=4)
    f64 = [None if t is None else t.double() for t in args]
    with pytest.raises(ValueError, match=r"supports u dtypes \('float32', 'float16', 'bfloat16'\)"):
        selective_scan(*f64, backend="triton")
    with pytest.raises(ValueError, match="state sizes n <= 256; got n=300"):
        selective_scan(*scan_inputs(l=2, n=300, d=2, z=False), backend="triton")
    c = [t.double() for t in cross_inputs(b=1, R=2)[:7]]
    with pytest.raises(ValueError, match="supports u dtypes"):
        cross_selective_scan(*c, routes=2, backend="triton")


def test_auto_never_takes_triton_on_cpu():
    """Even under the interpreter: on CPU, auto takes the compiled CPU path (or PyTorch without a compiler)."""
    if DEVICE.type == "cuda":
        pytest.skip("auto picks Triton on CUDA")
    from visionlin.kernels.ssm import cpu_kernel_available
    expected = "cpu" if cpu_kernel_available() else "torch"
    selective_scan(*scan_inputs(l=4, n=2))
    assert last_backend("selective_scan") == expected
    cross_selective_scan(*cross_inputs(R=2)[:7], routes=2)
    assert last_backend("cross_selective_scan") == expected


@in_process
def test_auto_falls_back_to_torch_for_unsupported_dtypes():
    args = [None if t is None else t.double() for t in scan_inputs(l=4, n=2)]
    selective_scan(*args)
    assert last_backend("selective_scan") == "torch"


@in_process
def test_ops_are_registered_custom_ops_with_fake_and_autograd():
    args = [None if t is None else t.requires_grad_() for t in scan_inputs(b=1, d=4, l=5, n=2)]
    res = torch.library.opcheck(torch.ops.visionlin.selective_scan_triton.default, (*args, True))
    assert set(res.values()) == {"SUCCESS"}
    u, delta, A, B, C, D, bias, z = (t.requires_grad_() for t in cross_inputs(b=1, d=2, H=2, W=3, n=2, R=2,
                                                                              per_route_u=True, z=True))
    res = torch.library.opcheck(torch.ops.visionlin.cross_selective_scan_triton.default,
                                (u, delta, A, B, C, D, z, bias, True, 2))
    assert set(res.values()) == {"SUCCESS"}


# A fresh process (kernels in compiled mode, no GPU needed) runs the real host code with every launch
# replaced by a compile for Hopper (sm_90: Triton's lowering and ptxas), so shapes, layouts and
# types that only the interpreter would accept fail here.
_COMPILE_FOR_HOPPER = r"""
import torch
import visionlin.kernels.ssm.scan_triton as st

compile_only(st, ("_scan_fwd_kernel", "_scan_bwd_kernel"))
for n, dtype, g in ((16, torch.bfloat16, None), (1, torch.float32, 2), (4, torch.float16, None)):
    b, d, l = 2, 8, 37
    u, delta, z = (torch.zeros(b, d, l, dtype=dtype) for _ in range(3))
    A, D, bias = torch.zeros(d, n), torch.zeros(d), torch.zeros(d)
    B = torch.zeros((b, n, l) if g is None else (b, g, n, l), dtype=dtype)
    st._forward(u, delta, A, B, B, D, z, bias, True, 1, False)
    st._backward(u, torch.zeros(b, d, n), u, delta, A, B, B, D, z, bias, True, 1, False)
    H, W, R = 3, 5, 4
    u = torch.zeros(b, d, H, W, dtype=dtype)
    delta = torch.zeros(b, R, d, H, W, dtype=dtype)
    Bc = torch.zeros(b, R, n, H, W, dtype=dtype)
    st._forward(u, delta, torch.zeros(R, d, n), Bc, Bc, None, None, None, False, R, True)
    st._backward(u, None, u, delta, torch.zeros(R, d, n), Bc, Bc, torch.zeros(R, d), None, torch.zeros(R, d),
                 True, R, True)
    R = 2                                     # Vim: per-route u and the z gate
    u = torch.zeros(b, R, d, 1, l, dtype=dtype)
    delta, Bc, z = torch.zeros(b, R, d, 1, l, dtype=dtype), torch.zeros(b, R, n, 1, l, dtype=dtype), u[:, 0]
    st._forward(u, delta, torch.zeros(R, d, n), Bc, Bc, torch.zeros(R, d), z, torch.zeros(R, d), True, R, True)
    st._backward(z, None, u, delta, torch.zeros(R, d, n), Bc, Bc, torch.zeros(R, d), z, torch.zeros(R, d),
                 True, R, True)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    compile_for_hopper(_COMPILE_FOR_HOPPER, tmp_path)


# ------------------------------------------------------------------ process-level checks
@pytest.mark.skipif(IN_PROCESS or not HAS_TRITON, reason="the Triton tests ran in this process, or cannot run")
def test_interpreter_suite_in_fresh_process():
    run_in_fresh_process(__file__)
