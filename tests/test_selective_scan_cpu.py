"""The compiled CPU path of selective_scan / cross_selective_scan (``backend='cpu'``) against the float64
token-serial references and the PyTorch path: odd lengths and widths, grouped B/C, every route, strided
inputs read in place, extreme gates, 16-bit inputs, gradients, threads, dispatch and the build."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from visionlin.kernels import cross_selective_scan, last_backend, selective_scan, use_backend
from visionlin.kernels.ssm import (bidirectional_conv1d_silu, cpu_kernel_available, naive_cross_selective_scan,
                                   naive_selective_scan)

from test_selective_scan_torch import (check_delta_projection, cross_inputs, explicit_bidirectional_conv, low_rank_delta,
                                      max_rel_error, projected_by_hand, scan_inputs)

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason="no C compiler to build the CPU scan")


@pytest.fixture(autouse=True)
def _cpu_path():
    with use_backend("cpu"):
        yield


@pytest.mark.parametrize("l", [1, 2, 17, 65, 300])
@pytest.mark.parametrize("d,n", [(16, 16), (37, 1), (5, 20)])
def test_matches_token_serial_reference(l, d, n):
    args = scan_inputs(d=d, l=l, n=n)
    for softplus in (False, True):
        out, last = selective_scan(*args, delta_softplus=softplus, return_last_state=True)
        assert last_backend("selective_scan") == "cpu"
        ref, ref_last = naive_selective_scan(*args, delta_softplus=softplus, return_last_state=True)
        assert max_rel_error(out, ref) < 1e-5 and max_rel_error(last, ref_last) < 1e-5


@pytest.mark.parametrize("gB,gC", [(2, 2), (3, 1), (6, 6)])
def test_grouped_B_C(gB, gC):
    u, delta, A, _, _, D, z, bias = scan_inputs(d=6, l=40)
    B, C = torch.randn(2, gB, 16, 40), torch.randn(2, gC, 16, 40)
    out = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    assert max_rel_error(out, naive_selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True)) < 1e-5


def test_strided_inputs_are_read_in_place_and_match():
    """Token-major views (Vim's layout), channel-major, and sliced (stride 2) inputs give the same result."""
    u, delta, A, B, C, D, z, bias = scan_inputs(d=24, l=50)
    ref = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    token_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (u, delta, B, C, z)]
    sliced = [torch.stack([t, torch.zeros_like(t)], -1)[..., 0] for t in (u, delta, B, C, z)]  # last stride 2
    for tu, td, tB, tC, tz in (token_major, sliced):
        assert not tu.is_contiguous()
        torch.testing.assert_close(selective_scan(tu, td, A, tB, tC, D, tz, bias, delta_softplus=True), ref,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("H,W", [(6, 7), (1, 9), (9, 1)])
def test_cross_scan_matches_reference_for_every_route(R, H, W):
    u, delta, A, B, C, D, bias = cross_inputs(d=19, H=H, W=W, R=R)
    out = cross_selective_scan(u, delta, A, B, C, D, bias, routes=R)
    assert last_backend("cross_selective_scan") == "cpu"
    assert max_rel_error(out, naive_cross_selective_scan(u, delta, A, B, C, D, bias, routes=R)) < 1e-5


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("H,W", [(6, 7), (1, 9)])
def test_cross_scan_per_route_u_and_z_match_the_reference(R, H, W):
    for per_route_u, gate in ((True, False), (False, True), (True, True)):
        args = cross_inputs(d=19, H=H, W=W, R=R, per_route_u=per_route_u)
        z = torch.randn(2, 19, H, W) if gate else None
        out = cross_selective_scan(*args, routes=R, z=z)
        assert last_backend("cross_selective_scan") == "cpu"
        assert max_rel_error(out, naive_cross_selective_scan(*args, routes=R, z=z)) < 1e-5


def test_cross_scan_reads_vims_token_major_views_in_place():
    """Per-route tensors as Vim hands them: (b, L, R, c) buffers viewed as (b, R, c, 1, L), z a slice."""
    b, L, d, n, R = 2, 29, 40, 4, 2   # d = 40: one full 32-channel block (the fast path) and a partial one
    grid = lambda t: t.movedim(1, -1).unsqueeze(-2)  # noqa: E731
    u, delta = torch.randn(b, L, R, d), torch.rand(b, L, R, d) - 0.5
    BC = torch.randn(b, L, R, 2 * n)
    xz = torch.randn(b, L, 2 * d)
    A, D, bias = -torch.rand(R, d, n) - 0.1, torch.randn(R, d), torch.rand(R, d)
    args = [grid(u), grid(delta), A, grid(BC[..., :n]), grid(BC[..., n:]), D, bias]
    z = grid(xz[..., d:])
    assert not any(t.is_contiguous() for t in (args[0], args[3], z))
    out = cross_selective_scan(*args, routes=2, z=z)
    ref = cross_selective_scan(*(t.contiguous() for t in args), routes=2, z=z.contiguous())
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert out.flatten(2).transpose(1, 2).is_contiguous()     # channels-last: token-major for out_proj


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("d,rank", [(19, 1), (32, 5), (40, 12)])
def test_delta_projection_inside_the_scan_matches_the_projected_reference(R, d, rank):
    """The fused dt_proj (full and partial channel blocks, ranks 1 to Vim-T's 12) equals scanning the
    delta projected beforehand in float64."""
    check_delta_projection(R, rank, "cpu", d=d, H=5, W=6)


def test_delta_projection_reads_vims_token_major_low_rank_input_in_place():
    """dt as Vim hands it: a (b, L, R, rank + 2n) x_proj buffer's slice viewed as (b, R, rank, 1, L)."""
    b, L, d, n, R, rank = 2, 33, 72, 4, 2, 3   # two full channel blocks and a partial one
    x_dbl = torch.randn(b, L, R, rank + 2 * n)
    grid = lambda t: t.movedim(1, -1).unsqueeze(-2)  # noqa: E731  (b, L, R, c) -> (b, R, c, 1, L) view
    dt, Bm, Cm = (grid(t) for t in x_dbl.split((rank, n, n), dim=-1))
    u = torch.randn(b, R, d, 1, L)
    A, D, bias = -torch.exp(torch.rand(R, d, n) * 2), torch.randn(R, d), torch.rand(R, d) * 0.5
    weight = torch.randn(R, d, rank) * 0.5
    assert not dt.is_contiguous()
    out = cross_selective_scan(u, dt, A, Bm, Cm, D, bias, routes=R, delta_proj_weight=weight)
    ref = cross_selective_scan(u, torch.einsum("rdk,brkhw->brdhw", weight, dt), A, Bm.contiguous(), Cm.contiguous(),
                               D, bias, routes=R)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_delta_projection_gradients_and_16bit_inputs():
    cu = [t.clone().requires_grad_() for t in cross_inputs(d=6, H=4, W=5, R=2, per_route_u=True)]
    dt, weight = (t.requires_grad_() for t in low_rank_delta(d=6, H=4, W=5, R=2, rank=2))
    leaves = [cu[0], dt, *cu[2:], weight]
    gy = torch.randn(2, 6, 4, 5)
    run = lambda: cross_selective_scan(cu[0], dt, *cu[2:], routes=2, delta_proj_weight=weight)  # noqa: E731
    g_cpu = torch.autograd.grad(run(), leaves, gy)
    with use_backend("torch"):
        g_ref = torch.autograd.grad(run(), leaves, gy)
    for a, b in zip(g_cpu, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    u, _, A, B, C, D, bias = cross_inputs(d=16, H=3, W=7, R=4)
    dt, weight = low_rank_delta(d=16, H=3, W=7, R=4, rank=4)
    half = [t.to(torch.bfloat16) for t in (u, dt, B, C)]
    out = cross_selective_scan(half[0], half[1], A, half[2], half[3], D, bias, delta_proj_weight=weight)
    assert out.dtype == torch.bfloat16
    ref = naive_cross_selective_scan(*(t.double() for t in (half[0], projected_by_hand(half[1], weight), A, half[2],
                                                             half[3], D, bias)))
    assert max_rel_error(out, ref) < 1e-2


def test_cross_scan_channels_last_inputs():
    u, delta, A, B, C, D, bias = cross_inputs(H=6, W=8)
    u_cl = u.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    torch.testing.assert_close(cross_selective_scan(u_cl, delta, A, B, C, D, bias),
                               cross_selective_scan(u, delta, A, B, C, D, bias), rtol=1e-6, atol=1e-6)


def test_extreme_gates_match_the_pytorch_path():
    """Huge steps (decays clamped at exp(-30), as on the PyTorch path), zero steps (state carried) and
    very negative delta under softplus (step ~ 0) stay finite and agree with the PyTorch path."""
    u, delta, A, B, C, D, z, bias = scan_inputs(d=8, l=70, A_scale=50.0)
    delta = delta * 0
    delta[..., :20] = 1e4
    delta[..., 40:] = -1e4
    for softplus in (False, True):
        d_in = delta.abs() if not softplus else delta
        out = selective_scan(u, d_in, A, B, C, D, z, None, delta_softplus=softplus)
        ref = selective_scan(u, d_in, A, B, C, D, z, None, delta_softplus=softplus, backend="torch")
        assert torch.isfinite(out).all()
        assert max_rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs_compute_in_float32(dtype):
    args = scan_inputs(d=16, l=33, dtype=dtype)
    out = selective_scan(*args, delta_softplus=True)
    assert out.dtype == dtype
    ref = naive_selective_scan(*args, delta_softplus=True)
    assert max_rel_error(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_gradients_equal_the_pytorch_paths():
    args = [None if t is None else t.clone().requires_grad_() for t in scan_inputs(d=20, l=45, n=4)]
    gy = torch.randn(2, 20, 45)
    out = selective_scan(*args, delta_softplus=True)
    g_cpu = torch.autograd.grad(out, args, gy)
    with use_backend("torch"):
        g_ref = torch.autograd.grad(selective_scan(*args, delta_softplus=True), args, gy)
    for a, b in zip(g_cpu, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for R, per_route_u in ((4, False), (2, True)):
        cu = [t.clone().requires_grad_() for t in cross_inputs(d=6, H=4, W=5, R=R, per_route_u=per_route_u)]
        cu.append(torch.randn(2, 6, 4, 5, requires_grad=True))
        gy = torch.randn(2, 6, 4, 5)
        g_cpu = torch.autograd.grad(cross_selective_scan(*cu[:-1], routes=R, z=cu[-1]), cu, gy)
        with use_backend("torch"):
            g_ref = torch.autograd.grad(cross_selective_scan(*cu[:-1], routes=R, z=cu[-1]), cu, gy)
        for a, b in zip(g_cpu, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_thread_count_does_not_change_the_result():
    """Each (batch, channel block) is one thread's work, start to end: no cross-thread reductions."""
    args = scan_inputs(b=3, d=70, l=90)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = selective_scan(*args, delta_softplus=True)
        torch.set_num_threads(max(2, threads))
        many = selective_scan(*args, delta_softplus=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("l,d,K", [(1, 16, 4), (3, 37, 4), (50, 48, 4), (20, 5, 1), (9, 16, 2)])
def test_bidirectional_conv_matches_the_two_causal_convs(l, d, K):
    xz = torch.randn(2, l, 3 * d)
    w, b = torch.randn(2, d, K), torch.randn(2, d)
    for x in (xz[..., d:2 * d], xz[..., ::3]):             # a slice of a projection; channel stride 3
        for bias in (b, None):
            out = bidirectional_conv1d_silu(x, w, bias)
            assert last_backend("bidirectional_conv1d_silu") == "cpu"
            assert out.shape == (2, l, 2, d) and out.is_contiguous()
            torch.testing.assert_close(out, explicit_bidirectional_conv(x, w, bias), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out, bidirectional_conv1d_silu(x, w, bias, backend="torch"), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("l,d,N", [(1, 16, 44), (13, 37, 44), (50, 48, 5), (21, 24, 100), (4097, 384, 44)])
def test_bidirectional_conv_with_projection_matches_per_route_linear_layers(l, d, N):
    """The fused projection: token blocks cut by l (full and partial tiles, on 1 and 2 threads), column
    tiles cut by N (one partial, several), channels not a multiple of the vector width, Vim-T's shapes."""
    xz = torch.randn(2 if l < 1000 else 1, l, 3 * d)
    w, b, P = torch.randn(2, d, 4), torch.randn(2, d), torch.randn(2, N, d) / d ** 0.5
    threads = torch.get_num_threads()
    for x in (xz[..., d:2 * d], xz[..., ::3]):              # a slice of a projection; channel stride 3
        u, proj = bidirectional_conv1d_silu(x, w, b, P)
        assert last_backend("bidirectional_conv1d_silu") == "cpu"
        assert proj.shape == (x.shape[0], l, 2, N) and proj.is_contiguous()
        ref = explicit_bidirectional_conv(x.double(), w.double(), b.double())
        torch.testing.assert_close(u, ref.float(), rtol=1e-5, atol=1e-6)
        for r in range(2):
            torch.testing.assert_close(proj[:, :, r], F.linear(ref[:, :, r], P[r].double()).float(), rtol=1e-5,
                                       atol=1e-5)
        try:
            torch.set_num_threads(1)
            assert torch.equal(bidirectional_conv1d_silu(x, w, b, P)[1], proj)
        finally:
            torch.set_num_threads(threads)


def test_bidirectional_conv_projection_gradients_match_the_pytorch_path():
    x, w, b, P = torch.randn(2, 19, 24), torch.randn(2, 24, 4), torch.randn(2, 24), torch.randn(2, 7, 24)
    gu, gp = torch.randn(2, 19, 2, 24), torch.randn(2, 19, 2, 7)
    for trained in ((0, 1, 2, 3), (3,), (0,)):        # everything; x_proj alone (u unused); x alone
        leaves = [t.clone().requires_grad_(i in trained) for i, t in enumerate((x, w, b, P))]
        wanted = [leaves[i] for i in trained]
        u, proj = bidirectional_conv1d_silu(*leaves)
        u_ref, proj_ref = bidirectional_conv1d_silu(*leaves, backend="torch")
        g = torch.autograd.grad((u * gu).sum() + (proj * gp).sum(), wanted)
        g_ref = torch.autograd.grad((u_ref * gu).sum() + (proj_ref * gp).sum(), wanted)
        for a, r in zip(g, g_ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_bidirectional_conv_16bit_gradients_and_threads():
    x, w, b = torch.randn(2, 33, 24), torch.randn(2, 24, 4), torch.randn(2, 24)
    out = bidirectional_conv1d_silu(x.to(torch.bfloat16), w, b)
    assert out.dtype == torch.bfloat16
    assert max_rel_error(out, explicit_bidirectional_conv(x.to(torch.bfloat16).double(), w.double(), b.double())) < 1e-2
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    gy = torch.randn(2, 33, 2, 24)
    g_cpu = torch.autograd.grad(bidirectional_conv1d_silu(*leaves), leaves, gy)
    g_ref = torch.autograd.grad(bidirectional_conv1d_silu(*leaves, backend="torch"), leaves, gy)
    for a, r in zip(g_cpu, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bidirectional_conv1d_silu(x, w, b)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(one, bidirectional_conv1d_silu(x, w, b))
    finally:
        torch.set_num_threads(threads)


def test_parts_run_alike_on_pytorchs_openmp_threads_and_on_a_thread_pool(monkeypatch):
    """Built with OpenMP, one call runs every part on PyTorch's OpenMP threads; otherwise a Python thread
    pool calls each part: both give the same result."""
    from visionlin.kernels.ssm import scan_cpu
    args = cross_inputs(d=40, H=5, W=7, R=2, per_route_u=True)
    z = torch.randn(2, 40, 5, 7)
    x, w = torch.randn(2, 30, 40), torch.randn(2, 40, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        one_call = cross_selective_scan(*args, routes=2, z=z), bidirectional_conv1d_silu(x, w)
        monkeypatch.setattr(scan_cpu._lib, "has_openmp", lambda: 0)
        pooled = cross_selective_scan(*args, routes=2, z=z), bidirectional_conv1d_silu(x, w)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one_call, pooled):
        assert torch.equal(a, b)


def test_a_compiler_without_openmp_builds_the_kernels_without(tmp_path, monkeypatch):
    from visionlin.kernels.ssm import scan_cpu
    monkeypatch.setenv("VISIONLIN_CACHE", str(tmp_path))
    monkeypatch.setattr(scan_cpu, "_OPENMP", "-fno-such-openmp-flag")
    lib = scan_cpu._build()
    assert lib.has_openmp() == 0
    assert len(list((tmp_path / "cpu_kernels").glob("*.so"))) == 1


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector-width flags")
def test_projection_tile_without_avx512_takes_fewer_tokens_and_agrees(tmp_path, monkeypatch):
    """Built for AVX2 (no AVX-512: 16 vector registers), the projection tile holds 2 tokens instead of 8;
    the results agree with the default build."""
    from visionlin.kernels.ssm import scan_cpu
    x, w, b, P = torch.randn(2, 29, 48)[..., 8:40], torch.randn(2, 32, 4), torch.randn(2, 32), torch.randn(2, 44, 32)
    default = bidirectional_conv1d_silu(x, w, b, P)
    monkeypatch.setenv("VISIONLIN_CACHE", str(tmp_path))
    monkeypatch.setattr(scan_cpu, "_FLAGS", [*scan_cpu._FLAGS, "-mno-avx512f"])
    monkeypatch.setattr(scan_cpu, "_lib", scan_cpu._build())
    assert scan_cpu._lib.conv_tokens_per_item() == 2
    narrow = bidirectional_conv1d_silu(x, w, b, P)
    for a, r in zip(narrow, default):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_dispatch_auto_picks_cpu_and_explicit_cpu_refuses_what_it_cannot_take():
    args = scan_inputs(l=8)
    with use_backend("auto"):
        selective_scan(*args)
        assert last_backend("selective_scan") == "cpu"
        selective_scan(*[None if t is None else t.double() for t in args])
        assert last_backend("selective_scan") == "torch"
    with pytest.raises(ValueError, match=r"backend='cpu' takes CPU tensors in float32.*float64"):
        selective_scan(*[None if t is None else t.double() for t in args])
    from visionlin.kernels._dispatch import resolve_backend
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        resolve_backend("selective_scan", "cpu", torch.device("cuda"), True, True, cpu_kernel_available, True)
    with pytest.raises(ValueError, match="no compiled CPU implementation"):
        resolve_backend("linear_attention", "cpu", torch.device("cpu"), True)


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_build_is_cached_per_machine_and_a_missing_compiler_falls_back(tmp_path):
    probe = """
        import torch
        from visionlin.kernels import selective_scan, last_backend, use_backend
        args = [torch.randn(1, 4, 9), torch.rand(1, 4, 9), -torch.rand(4, 2), torch.randn(1, 2, 9), torch.randn(1, 2, 9)]
        selective_scan(*args)
        print(last_backend("selective_scan"))
        try:
            with use_backend("cpu"):
                selective_scan(*args)
        except RuntimeError as e:
            print("error:", e)
    """
    built = _run_python(probe, {"VISIONLIN_CACHE": str(tmp_path)})
    assert built.returncode == 0, built.stderr
    assert built.stdout.splitlines()[0] == "cpu"
    libs = list((tmp_path / "cpu_kernels").glob("selective_scan_*.so"))
    assert len(libs) == 1 and not list((tmp_path / "cpu_kernels").glob("tmp*"))  # no build leftovers
    again = _run_python(probe, {"VISIONLIN_CACHE": str(tmp_path)})
    assert again.stdout.splitlines()[0] == "cpu" and list((tmp_path / "cpu_kernels").glob("*.so")) == libs
    missing = _run_python(probe, {"VISIONLIN_CACHE": str(tmp_path / "other"), "CC": "/nonexistent/cc"})
    assert missing.returncode == 0, missing.stderr
    first, second = missing.stdout.splitlines()[:2]
    assert first == "torch" and "no C compiler found" in second and "/nonexistent/cc" in second
