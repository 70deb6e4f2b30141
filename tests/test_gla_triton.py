"""The fused Triton path of bidirectional_gla against the token-serial reference and the PyTorch path.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (see triton_harness.py).
bfloat16 arithmetic is wrong in the interpreter; the kernels upcast right after every load, and
bfloat16 is only smoke-tested (loads are exact there, stores truncate instead of rounding).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from triton_harness import (DEVICE, HAS_TRITON, ROOT, compile_for_hopper, import_kernels,
                            in_process_marker, interpreter_env, run_in_fresh_process)

chunk_triton = import_kernels("visionlin.kernels.gla.chunk_triton", "_chunk_output_kernel")
IN_PROCESS = chunk_triton is not None
in_process = in_process_marker(chunk_triton)

from visionlin.kernels import bidirectional_gla, last_backend  # noqa: E402
from visionlin.kernels.gla import naive_bidirectional_gla  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    interpreter_env(monkeypatch, chunk_triton)


def make_inputs(B=1, N=37, H=2, K=16, V=32, dtype=torch.float32, gate_scale=1.0, gate_dtype=None):
    q, k = torch.randn(B, N, H, K), torch.randn(B, N, H, K)
    v = torch.randn(B, N, H, V)
    g_f = F.logsigmoid(torch.randn(B, N, H, K) * 3) * gate_scale
    g_b = F.logsigmoid(torch.randn(B, N, H, K) * 3) * gate_scale
    gate_dtype = gate_dtype or dtype
    return ([t.to(DEVICE, dtype) for t in (q, k, v)] + [t.to(DEVICE, gate_dtype) for t in (g_f, g_b)])


def triton_gla(*inputs, scale=None):
    return bidirectional_gla(*inputs, scale=scale, backend="triton")


def assert_close_to_reference(out, ref, rel):
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= rel * ref.double().abs().max().item() + 1e-6, f"max error {err}"


def grads_of(fn, inputs, weight, dtype=None):
    """Gradients of sum(fn(inputs) * weight) with respect to every input, cast to dtype."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad((out * weight.to(out.dtype)).sum(), leaves)


def assert_grads_close(grads, ref_grads, rel):
    for name, g, r in zip(("q", "k", "v", "g_fwd", "g_bwd"), grads, ref_grads):
        assert g.shape == r.shape
        err = (g.double() - r.double()).abs().max().item()
        assert err <= rel * r.double().abs().max().item() + 1e-6, f"d{name}: max error {err}"


def check_forward_and_backward(inputs, rel_out=1e-5, rel_grad=1e-4):
    out = triton_gla(*inputs)
    assert out.dtype == inputs[0].dtype and torch.isfinite(out).all()
    assert_close_to_reference(out, naive_bidirectional_gla(*inputs), rel_out)
    weight = torch.randn(out.shape, device=DEVICE)
    grads = grads_of(triton_gla, inputs, weight)
    for g, x in zip(grads, inputs):
        assert g.dtype == x.dtype and torch.isfinite(g).all()
    assert_grads_close(grads, grads_of(naive_bidirectional_gla, inputs, weight, torch.float64), rel_grad)


# ------------------------------------------------------------------ forward
@in_process
@pytest.mark.parametrize("B,N,H", [(2, 1, 2), (2, 17, 2), (2, 100, 2), (1, 257, 1)])
def test_forward_matches_recurrence_for_any_length(B, N, H):
    inputs = make_inputs(B=B, N=N, H=H)
    assert_close_to_reference(triton_gla(*inputs), naive_bidirectional_gla(*inputs), 1e-5)
    assert last_backend("bidirectional_gla") == "triton"


@in_process
@pytest.mark.parametrize("K,V,N", [(16, 64, 40), (32, 16, 40), (64, 32, 40), (128, 16, 9), (16, 128, 9)])
def test_forward_matches_recurrence_for_head_dims(K, V, N):
    inputs = make_inputs(N=N, K=K, V=V)
    assert_close_to_reference(triton_gla(*inputs), naive_bidirectional_gla(*inputs), 1e-5)


@in_process
def test_state_pass_carries_across_groups_of_chunks(monkeypatch):
    monkeypatch.setattr(chunk_triton, "STATE_GROUP", 2)     # 5 chunks -> groups of 2, 2 and 1
    inputs = make_inputs(N=257, H=1, K=16, V=16, gate_scale=0.05)
    check_forward_and_backward(inputs)


@in_process
def test_forward_matches_torch_path_and_custom_scale():
    inputs = make_inputs(B=2, N=70, H=2, K=32, V=16)
    torch.testing.assert_close(triton_gla(*inputs, scale=0.3),
                               bidirectional_gla(*inputs, scale=0.3, backend="torch"), rtol=1e-5, atol=1e-5)


@in_process
def test_half_precision_forward_and_backward_accumulate_in_float32():
    check_forward_and_backward(make_inputs(N=100, K=32, V=32, dtype=torch.float16), 2e-3, 1e-2)


@in_process
def test_bfloat16_inputs_load_and_store_correctly():
    inputs = make_inputs(N=40, dtype=torch.bfloat16)
    out = triton_gla(*inputs)
    assert out.dtype == torch.bfloat16
    assert_close_to_reference(out, naive_bidirectional_gla(*inputs), 2e-2)


# ------------------------------------------------------------------ backward
@in_process
def test_gradients_match_autograd_of_the_recurrence():
    check_forward_and_backward(make_inputs(B=2, N=70, H=1, K=16, V=32))


@in_process
@pytest.mark.parametrize("K,V,N", [(64, 16, 20), (128, 128, 5)])
def test_gradients_match_recurrence_for_large_head_dims(K, V, N):
    check_forward_and_backward(make_inputs(N=N, H=1, K=K, V=V))


@in_process
def test_gradients_match_autograd_of_the_torch_path():
    inputs = make_inputs(B=1, N=100, H=2, K=32, V=16)
    weight = torch.randn(1, 100, 2, 16, device=DEVICE)
    torch_path = lambda *x: bidirectional_gla(*x, backend="torch")  # noqa: E731
    assert_grads_close(grads_of(triton_gla, inputs, weight), grads_of(torch_path, inputs, weight), 1e-4)


@in_process
def test_float32_gates_with_half_precision_qkv_as_under_autocast():
    inputs = make_inputs(N=33, dtype=torch.float16, gate_dtype=torch.float32)
    weight = torch.randn(1, 33, 2, 32, device=DEVICE)
    grads = grads_of(triton_gla, inputs, weight)
    assert [g.dtype for g in grads] == [torch.float16] * 3 + [torch.float32] * 2
    assert_grads_close(grads, grads_of(naive_bidirectional_gla, inputs, weight, torch.float64), 1e-2)
    assert_close_to_reference(triton_gla(*inputs), naive_bidirectional_gla(*inputs), 2e-3)


# ------------------------------------------------------------------ extreme gates
@in_process
def test_zero_gates_give_plain_bidirectional_linear_attention():
    q, k, v, g, _ = make_inputs(N=50)
    zeros = torch.zeros_like(g)
    out = triton_gla(q, k, v, zeros, zeros)
    scores = torch.einsum("bihk,bjhk->bhij", q, k) * q.shape[-1] ** -0.5
    plain = torch.einsum("bhij,bjhv->bihv", scores, v) / 2 + torch.einsum(
        "bihk,bihk,bihv->bihv", q, k, v) * q.shape[-1] ** -0.5 / 2
    assert_close_to_reference(out, plain, 1e-5)
    check_forward_and_backward([q, k, v, zeros, zeros])


@in_process
def test_minus_infinity_gates_reset_the_state_exactly():
    q, k, v, g_f, g_b = make_inputs(N=50)
    all_reset = torch.full_like(g_f, float("-inf"))
    out = triton_gla(q, k, v, all_reset, all_reset)     # only the current token survives
    own = torch.einsum("bihk,bihk,bihv->bihv", q, k, v) * q.shape[-1] ** -0.5
    assert_close_to_reference(out, own, 1e-5)
    resets = torch.rand(g_f.shape, device=DEVICE) < 0.1
    check_forward_and_backward([q, k, v, g_f.masked_fill(resets, float("-inf")),
                                g_b.masked_fill(resets.flip(1), float("-inf"))])


@in_process
@pytest.mark.parametrize("gate_scale", [20.0, 1000.0])
def test_strong_decays_stay_finite_and_exact(gate_scale):
    # logsigmoid(.)*20 reaches ~-20 per token; *1000 goes far below the -30 clamp
    check_forward_and_backward(make_inputs(N=50, gate_scale=gate_scale))


# ------------------------------------------------------------------ layouts
@in_process
def test_strided_inputs_give_the_same_result_as_contiguous_ones():
    B, N, H, K, V = 2, 45, 2, 16, 32
    qkv = torch.randn(B, N, H, 2 * K + V, device=DEVICE)            # a fused projection's output
    q, k, v = qkv.split([K, K, V], dim=-1)
    gates = F.logsigmoid(torch.randn(2, B, H, N, K, device=DEVICE))
    g_f, g_b = gates[0].transpose(1, 2), gates[1].transpose(1, 2)    # (B, N, H, K) views
    strided = [q, k, v, g_f, g_b]
    assert not any(t.is_contiguous() for t in strided)
    dense = [t.contiguous() for t in strided]
    torch.testing.assert_close(triton_gla(*strided), triton_gla(*dense), rtol=1e-6, atol=1e-6)
    weight = torch.randn(B, N, H, V, device=DEVICE)
    for g, r in zip(grads_of(triton_gla, strided, weight), grads_of(triton_gla, dense, weight)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ errors
@in_process
@pytest.mark.parametrize("K,V,dtype,match", [
    (8, 16, torch.float32, r"K, V in \(16, 32, 64, 128\); got K=8"),
    (16, 48, torch.float32, r"K, V in \(16, 32, 64, 128\); got V=48"),
    (256, 16, torch.float32, r"got K=256"),
    (16, 16, torch.float64, r"supports q dtypes \('float32', 'float16', 'bfloat16'\); got torch.float64"),
])
def test_unsupported_shapes_and_dtypes_raise_errors_naming_what_is_supported(K, V, dtype, match):
    with pytest.raises(ValueError, match=match):
        triton_gla(*make_inputs(N=4, K=K, V=V, dtype=dtype))


@in_process
def test_float64_gates_are_rejected_by_the_triton_path():
    with pytest.raises(ValueError, match="g_fwd dtypes"):
        triton_gla(*make_inputs(N=4, gate_dtype=torch.float64))


# ------------------------------------------------------------------ torch.compile / torch.library
@in_process
def test_op_is_a_registered_custom_op_with_fake_and_autograd():
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = torch.ops.visionlin.bidirectional_gla_triton.default
    with FakeTensorMode():
        fake = [torch.empty(2, 7, 3, 32), torch.empty(2, 7, 3, 32), torch.empty(2, 7, 3, 64),
                torch.empty(2, 7, 3, 32), torch.empty(2, 7, 3, 32, dtype=torch.float16)]
        assert op(*fake, 0.5).shape == (2, 7, 3, 64)
        grads = torch.ops.visionlin.bidirectional_gla_triton_backward(torch.empty(2, 7, 3, 64), *fake, 0.5)
        assert [g.shape[-1] for g in grads] == [32, 32, 64, 32, 32] and grads[4].dtype == torch.float16
    inputs = [t.requires_grad_() for t in make_inputs(N=5, K=16, V=16)]
    results = torch.library.opcheck(op, (*inputs, 0.25))   # schema, fake, autograd, aot_dispatch
    assert set(results.values()) == {"SUCCESS"}


@in_process
def test_torch_compile_captures_the_public_op_in_one_graph():
    inputs = [t.requires_grad_() for t in make_inputs(N=9, K=16, V=16)]

    def layer(q, k, v, g_f, g_b):
        return bidirectional_gla(q * 2, k, v, g_f, g_b, backend="triton").sin()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(*inputs)
    torch.testing.assert_close(out, layer(*inputs))
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


@in_process
def test_autocast_reduced_precision_qkv_with_float32_gates():
    x = torch.randn(1, 20, 64, device=DEVICE)
    proj = torch.nn.Linear(64, 2 * 16 + 32).to(DEVICE)
    g_f, g_b = F.logsigmoid(torch.randn(2, 1, 20, 1, 16, device=DEVICE))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        q, k, v = proj(x).unflatten(-1, (1, -1)).split([16, 16, 32], dim=-1)
        out = bidirectional_gla(q, k, v, g_f, g_b, backend="triton")
    assert q.dtype == out.dtype == torch.bfloat16 and g_f.dtype == torch.float32
    assert_close_to_reference(out, naive_bidirectional_gla(q, k, v, g_f, g_b), 2e-2)
    out.float().sum().backward()
    assert torch.isfinite(proj.weight.grad).all() and proj.weight.grad.abs().sum() > 0


# A fresh process (kernels in compiled mode, no GPU needed) runs the real host code with every launch
# replaced by a compile for Hopper (sm_90: Triton's lowering and ptxas), so shapes, layouts and
# types that only the interpreter would accept fail here.
_COMPILE_FOR_HOPPER = r"""
import torch
import visionlin.kernels.gla.chunk_triton as ct

compile_only(ct, ("_chunk_states_kernel", "_pass_states_kernel", "_chunk_output_kernel", "_chunk_dqk_kernel"))
for K, V, dtype in ((32, 64, torch.bfloat16), (128, 16, torch.float32)):
    q, k, g_f, g_b = (torch.zeros(1, 70, 2, K, dtype=dtype) for _ in range(4))
    v = torch.zeros(1, 70, 2, V, dtype=dtype)
    ct._forward(q, k, v, g_f, g_b, 0.5)
    ct._backward(torch.zeros_like(v), q, k, v, g_f.float(), g_b, 0.5)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    compile_for_hopper(_COMPILE_FOR_HOPPER, tmp_path)


# ------------------------------------------------------------------ process-level checks
@pytest.mark.skipif(IN_PROCESS or not HAS_TRITON, reason="the Triton tests ran in this process, or cannot run")
def test_interpreter_suite_in_fresh_process():
    run_in_fresh_process(__file__)


@pytest.mark.slow
def test_kernel_benchmark_runs_on_cpu_with_the_torch_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark_kernels.py"), "--device", "cpu", "--impls", "torch",
         "--models", "T", "--tokens", "196", "--batches", "1", "--warmup", "1", "--iters", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| torch |" in proc.stdout
    with open(tmp_path / "kernels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(float(r["ms"]) > 0 and r["impl"] == "torch" and r["N"] == "196" for r in rows)
    assert (tmp_path / "kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
