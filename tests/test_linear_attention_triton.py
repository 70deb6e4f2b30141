"""The fused Triton path of linear_attention against the float64 N x N oracle and the PyTorch path.

Without a GPU the kernels run on CPU tensors under Triton's interpreter, imported the way
tests/test_gla_triton.py imports its kernels: Triton 3.8 reads TRITON_INTERPRET when a function is
decorated with ``@triton.jit`` (at ``import triton`` for its own library functions, at import of
``associative_triton`` for ours), so this module imports both with the variable set, puts the
variable back as it was, and sets it again only while its own tests run. If Triton was already
imported in compiled mode when this module is collected, the interpreter tests are skipped here and
run in a fresh process. bfloat16 arithmetic is wrong in the interpreter; the kernels upcast right
after every load, and bfloat16 is only smoke-tested.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from triton_harness import (DEVICE, HAS_TRITON, ROOT, compile_for_hopper, import_kernels,  # noqa: E402
                            in_process_marker, interpreter_env, run_in_fresh_process)
MODULE = "visionlin.kernels.linear_attn.associative_triton"


associative_triton = import_kernels("visionlin.kernels.linear_attn.associative_triton", "_output_kernel")
IN_PROCESS = associative_triton is not None
in_process = in_process_marker(associative_triton)

from visionlin.kernels import last_backend, linear_attention  # noqa: E402
from visionlin.kernels.linear_attn import associative_linear_attention, naive_linear_attention  # noqa: E402

NAMES = ("q", "k", "v", "q_num", "k_num", "key_weight")


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    interpreter_env(monkeypatch, associative_triton)


def make_inputs(B=1, Nq=37, N=37, H=2, K=16, V=32, dtype=torch.float32, q_num=False, k_num=False,
                key_weight=False):
    """[q, k, v, q_num, k_num, key_weight]: ELU+1 features, N(0, 1) values, signed numerator features
    (as after RoPE) and positive key weights; the optional ones None unless asked for."""
    inputs = [F.elu(torch.randn(B, Nq, H, K)) + 1, F.elu(torch.randn(B, N, H, K)) + 1, torch.randn(B, N, H, V),
              torch.randn(B, Nq, H, K) if q_num else None, torch.randn(B, N, H, K) if k_num else None,
              torch.rand(B, N, H) + 0.5 if key_weight else None]
    return [None if t is None else t.to(DEVICE, dtype) for t in inputs]


def triton_la(*inputs, eps=1e-6):
    return linear_attention(*inputs, eps=eps, backend="triton")


def torch_la(*inputs, eps=1e-6):
    return linear_attention(*inputs, eps=eps, backend="torch")


def assert_close_to_reference(out, ref, rel, name="o"):
    assert out.shape == ref.shape
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= rel * ref.double().abs().max().item() + 1e-7, f"{name}: max error {err}"


def grads_of(fn, inputs, weight, dtype=None):
    """Gradients of sum(fn(inputs) * weight) for every input given (None where it is None)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    given = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((out * weight.to(out.dtype)).sum(), given))
    return [None if t is None else next(grads) for t in leaves]


def assert_grads_close(grads, ref_grads, rel):
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert_close_to_reference(g, r, rel, "d" + name)


def check_forward_and_backward(inputs, rel_out=1e-5, rel_grad=1e-5, eps=1e-6):
    out = triton_la(*inputs, eps=eps)
    assert out.dtype == inputs[0].dtype and torch.isfinite(out).all()
    assert_close_to_reference(out, naive_linear_attention(*inputs, eps=eps), rel_out)
    weight = torch.randn(out.shape, device=DEVICE)
    grads = grads_of(lambda *x: triton_la(*x, eps=eps), inputs, weight)
    for g, x in zip(grads, inputs):
        if x is not None:
            assert g.dtype == x.dtype and g.shape == x.shape and torch.isfinite(g).all()
    ref = grads_of(lambda *x: naive_linear_attention(*x, eps=eps), inputs, weight, torch.float64)
    assert_grads_close(grads, ref, rel_grad)


class GridSpy:
    """Stands in for a kernel: records each launch grid and launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


# ------------------------------------------------------------------ forward
@in_process
@pytest.mark.parametrize("B,Nq,N,H", [(2, 1, 1, 2), (2, 17, 17, 2), (1, 33, 100, 2), (2, 100, 33, 1),
                                      (1, 130, 257, 1)])
def test_forward_matches_oracle_for_any_query_and_key_count(B, Nq, N, H):
    inputs = make_inputs(B=B, Nq=Nq, N=N, H=H)
    assert_close_to_reference(triton_la(*inputs), naive_linear_attention(*inputs), 1e-5)
    assert last_backend("linear_attention") == "triton"


@in_process
@pytest.mark.parametrize("K,V", [(16, 16), (40, 80), (64, 64), (3, 5), (100, 24), (160, 160), (256, 17)])
def test_forward_matches_oracle_for_any_head_dims(K, V):
    inputs = make_inputs(Nq=20, N=70, H=1, K=K, V=V)
    assert_close_to_reference(triton_la(*inputs), naive_linear_attention(*inputs), 1e-5)


@in_process
def test_forward_matches_torch_path():
    inputs = make_inputs(B=2, Nq=50, N=90, H=2, K=40, V=80, q_num=True, k_num=True, key_weight=True)
    torch.testing.assert_close(triton_la(*inputs), torch_la(*inputs), rtol=1e-5, atol=1e-6)


@in_process
def test_eps_enters_the_denominator():
    inputs = make_inputs(Nq=20, N=30)
    inputs[0] = inputs[0] * 1e-3                 # small queries: q . s is comparable to eps
    for eps in (1e-6, 0.05):
        assert_close_to_reference(triton_la(*inputs, eps=eps), naive_linear_attention(*inputs, eps=eps), 1e-5)


@in_process
def test_key_reduction_is_the_same_for_any_number_of_splits(monkeypatch):
    # 5 key blocks: the default split runs them one per program; with one program per SM and a
    # two-SM device they are split 3 + 2 (several blocks per program, a shorter last split)
    inputs = make_inputs(N=300, Nq=10, H=1, k_num=True, key_weight=True)
    spy = GridSpy(associative_triton._state_kernel)
    monkeypatch.setattr(associative_triton, "_state_kernel", spy)
    monkeypatch.setattr(associative_triton, "_num_sms", lambda device: 2)
    by_split = triton_la(*inputs)
    monkeypatch.setattr(associative_triton, "PROGRAMS_PER_SM", 1)
    by_pairs = triton_la(*inputs)
    assert [grid[0] for grid in spy.grids] == [5, 2]
    assert_close_to_reference(by_split, naive_linear_attention(*inputs), 1e-5)
    torch.testing.assert_close(by_pairs, by_split, rtol=1e-6, atol=1e-7)


@in_process
def test_half_precision_forward_and_backward_accumulate_in_float32():
    inputs = make_inputs(Nq=40, N=100, K=40, V=32, dtype=torch.float16, q_num=True, key_weight=True)
    check_forward_and_backward(inputs, 2e-3, 1e-2)


@in_process
def test_bfloat16_inputs_load_and_store_correctly():
    inputs = make_inputs(N=40, dtype=torch.bfloat16, k_num=True, key_weight=True)
    out = triton_la(*inputs)
    assert out.dtype == torch.bfloat16
    assert_close_to_reference(out, naive_linear_attention(*inputs), 2e-2)


# ------------------------------------------------------------------ backward
@in_process
@pytest.mark.parametrize("q_num,k_num,key_weight", [
    (False, False, False), (True, False, False), (False, True, False), (False, False, True), (True, True, True)])
def test_gradients_of_every_input_match_the_oracle(q_num, k_num, key_weight):
    inputs = make_inputs(B=2, Nq=33, N=70, H=2, K=16, V=32, q_num=q_num, k_num=k_num, key_weight=key_weight)
    check_forward_and_backward(inputs, eps=0.01)


@in_process
@pytest.mark.parametrize("K,V,with_options", [(40, 80, True), (160, 24, False), (5, 256, True)])
def test_gradients_match_the_oracle_for_tiled_and_padded_head_dims(K, V, with_options):
    inputs = make_inputs(Nq=20, N=70, H=1, K=K, V=V, q_num=with_options, k_num=with_options,
                         key_weight=with_options)
    check_forward_and_backward(inputs)


@in_process
def test_gradients_match_autograd_of_the_torch_path():
    inputs = make_inputs(B=1, Nq=100, N=65, H=2, K=64, V=64, q_num=True, key_weight=True)
    weight = torch.randn(1, 100, 2, 64, device=DEVICE)
    assert_grads_close(grads_of(triton_la, inputs, weight), grads_of(torch_la, inputs, weight), 1e-5)


@in_process
def test_query_gradient_vanishes_where_the_output_cannot_change():
    # equal values: o_i = v for any q, so dq must cancel to zero (do S^T / den against (do . o) s / den)
    q, k, v, *_ = make_inputs(Nq=30, N=50, K=16, V=16)
    v = v[:, :1].expand_as(v).contiguous()
    dq, dk = torch.autograd.grad(triton_la(q.requires_grad_(), k.requires_grad_(), v).sum(), (q, k))
    scale = (v.abs().max() / q.abs().max()).item()
    assert dq.abs().max().item() < 1e-5 * scale and dk.abs().max().item() < 1e-5 * scale


# ------------------------------------------------------------------ layouts
@in_process
def test_strided_inputs_give_the_same_result_as_contiguous_ones():
    B, N, H, K, V = 2, 45, 2, 16, 40
    feats = F.elu(torch.randn(B, H, 2 * K, N, device=DEVICE)) + 1     # NCHW-style: tokens last
    q, k = feats.permute(0, 3, 1, 2).split(K, dim=-1)                 # (B, N, H, K) views, token stride 1
    v = torch.randn(B, H, V, N, device=DEVICE).permute(0, 3, 1, 2)
    fused = torch.randn(B, N, H, 3 * K, device=DEVICE)                 # a fused projection's output
    q_num, k_num = fused[..., :K], fused[..., 2 * K:]
    key_weight = (torch.rand(B, H, N, device=DEVICE) + 0.5).transpose(1, 2)
    strided = [q, k, v, q_num, k_num, key_weight]
    assert not any(t.is_contiguous() for t in strided)
    dense = [t.contiguous() for t in strided]
    torch.testing.assert_close(triton_la(*strided), triton_la(*dense), rtol=1e-6, atol=1e-7)
    weight = torch.randn(B, N, H, V, device=DEVICE)
    for g, r in zip(grads_of(triton_la, strided, weight), grads_of(triton_la, dense, weight)):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ long sequences
@in_process
def test_half_precision_at_65536_tokens_neither_overflows_nor_loses_accuracy(monkeypatch):
    """Realistic activations at N = 65,536 in float16: ELU+1 features of a 2x-scaled Gaussian and
    values of scale 4, where the unnormalised sums (sum_j k_j, sum_j k_j^T v_j) are far beyond float16's
    range. Under the interpreter the token block is raised from 64 to 16,384 (the accumulation and
    scaling that matter here do not depend on it; the other tests cover small blocks)."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(associative_triton, "BLOCK_N", 16384)
    B, N, H, K, V = 1, 65536, 2, 16, 16
    q, k = (F.elu(2 * torch.randn(B, N, H, K, device=DEVICE)) + 1 for _ in range(2))
    v = 4 * torch.randn(B, N, H, V, device=DEVICE)
    key_weight = torch.rand(B, N, H, device=DEVICE) + 0.5
    inputs = [t.half() for t in (q, k, v)] + [None, None, key_weight.half()]
    assert k.sum(1).min().item() > torch.finfo(torch.float16).max
    out = triton_la(*inputs)
    assert torch.isfinite(out).all()
    reference = associative_linear_attention(*[None if t is None else t.double() for t in inputs])
    assert_close_to_reference(out, reference, 2e-3)
    weight = torch.randn(out.shape, device=DEVICE)
    grads = grads_of(triton_la, inputs, weight)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert_grads_close(grads, grads_of(associative_linear_attention, inputs, weight, torch.float64), 3e-3)


# ------------------------------------------------------------------ errors
@in_process
@pytest.mark.parametrize("K,V,dtype,match", [
    (257, 16, torch.float32, r"head dims K, V up to 256; got K=257"),
    (16, 300, torch.float32, r"up to 256; got V=300"),
    (16, 16, torch.float64, r"supports dtypes \('float32', 'float16', 'bfloat16'\); got torch.float64"),
])
def test_unsupported_head_dims_and_dtypes_raise_errors_naming_what_is_supported(K, V, dtype, match):
    with pytest.raises(ValueError, match=match):
        triton_la(*make_inputs(Nq=4, N=4, K=K, V=V, dtype=dtype))


@in_process
def test_auto_backend_falls_back_to_torch_where_the_kernel_cannot_run():
    inputs = make_inputs(Nq=4, N=4, K=300, V=16)
    linear_attention(*inputs, backend="auto")
    assert last_backend("linear_attention") == "torch"


# ------------------------------------------------------------------ torch.compile / torch.library
@in_process
def test_ops_are_registered_custom_ops_with_fake_and_autograd():
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = torch.ops.visionlin.linear_attention_triton.default
    with FakeTensorMode():
        q, k, v = torch.empty(2, 7, 3, 40), torch.empty(2, 9, 3, 40), torch.empty(2, 9, 3, 80)
        o, state, ksum = op(q, k, v, None, None, torch.empty(2, 9, 3), 1e-6)
        assert o.shape == (2, 7, 3, 80) and state.shape == (2, 3, 40, 80) and ksum.shape == (2, 3, 40)
        grads = torch.ops.visionlin.linear_attention_triton_backward(
            o, q, k, v, None, None, torch.empty(2, 9, 3), state, ksum, 1e-6)
        assert [tuple(g.shape) for g in grads] == [(2, 7, 3, 40), (2, 9, 3, 40), (2, 9, 3, 80), (0,), (0,), (2, 9, 3)]
    for options in (False, True):
        inputs = [None if t is None else t.requires_grad_()
                  for t in make_inputs(Nq=5, N=6, K=16, V=16, q_num=options, k_num=options, key_weight=options)]
        results = torch.library.opcheck(op, (*inputs, 1e-3))   # schema, fake, autograd, aot_dispatch
        assert set(results.values()) == {"SUCCESS"}


@in_process
def test_torch_compile_captures_the_public_op_in_one_graph():
    inputs = [t.requires_grad_() for t in make_inputs(Nq=9, N=11, K=16, V=16, q_num=True, key_weight=True)
              if t is not None]

    def layer(q, k, v, q_num, key_weight):
        return linear_attention(q * 2, k, v, q_num, None, key_weight, backend="triton").sin()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(*inputs)
    torch.testing.assert_close(out, layer(*inputs))
    grads = torch.autograd.grad(out.sum(), inputs)
    torch.testing.assert_close(grads, torch.autograd.grad(layer(*inputs).sum(), inputs))


# A fresh process (kernels in compiled mode, no GPU needed) runs the real host code with every launch
# replaced by a compile for Hopper (sm_90: Triton's lowering and ptxas), so shapes, layouts and
# types that only the interpreter would accept fail here.
_COMPILE_FOR_HOPPER = r"""
import importlib, torch
at = importlib.import_module("visionlin.kernels.linear_attn.associative_triton")

compile_only(at, ("_state_kernel", "_output_kernel", "_query_grad_kernel", "_key_grad_kernel"))
for K, V, dtype, options in ((64, 64, torch.bfloat16, True), (40, 160, torch.float32, False)):
    q, k = torch.zeros(1, 70, 2, K, dtype=dtype), torch.zeros(1, 90, 2, K, dtype=dtype)
    v = torch.zeros(1, 90, 2, V, dtype=dtype)
    extra = (q.clone(), k.clone(), torch.zeros(1, 90, 2, dtype=dtype)) if options else (None, None, None)
    at._forward(q, k, v, *extra, 1e-6)
    at._backward(torch.zeros(1, 70, 2, V, dtype=dtype), q, k, v, *extra, torch.zeros(1, 2, K, V),
                 torch.zeros(1, 2, K), 1e-6)
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
def test_kernel_benchmark_times_linear_attention_on_cpu(tmp_path):
    impls = ["torch", "triton"] if HAS_TRITON else ["torch"]     # triton under the interpreter on CPU
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark_kernels.py"), "--op", "linear_attention", "--device",
         "cpu", "--impls", *impls, "--models", "RALA-2", "LinFusion-40", "--tokens", "100", "--batches", "2",
         "--warmup", "0", "--iters", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "linear_attention.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["H"], r["K"], r["impl"], r["pass"]) for r in rows} == {
        (m, h, d, i, p) for m, h, d in (("RALA-2", "2", "64"), ("LinFusion-40", "8", "40"))
        for i in impls for p in ("fwd", "fwd+bwd")}
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 and r["B"] == "2" for r in rows)
    assert (tmp_path / "linear_attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "kernels.csv").exists()
