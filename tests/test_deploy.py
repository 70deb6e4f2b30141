"""Every registered model compiles and deploys (CPU, fp32): torch.compile with fullgraph=True, torch.export
with dynamic dims and a .pt2 round trip, ONNX files run by onnxruntime, TorchScript, and the operators' custom
ops under torch.library.opcheck. Tiny instances of every variant (flags kept, sizes shrunk); the per-model checks
run once per distinct tiny network (``zoo.DISTINCT``), and every other variant is checked to be one of those."""
import subprocess
import sys
import warnings

import pytest
import timm
import torch

import visionlin  # noqa: F401  (registers the models and the operators)
from visionlin import deploy
from visionlin.kernels import use_backend
from visionlin.kernels.ssm import cpu_kernel_available
from zoo import DISTINCT, MODELS, SAME_TINY_NETWORK, SMALL, tiny

# families whose exported graphs take any H/W on CPU: the scans' compiled CPU operators (Vim, VMamba) and
# RAVLT's loop-free linear attention; ViG's PyTorch GLA path loops over chunks (deploy.py explains)
DYNAMIC_HW = {"ravlt", "vim", "vmamba"}


def family(name):
    return MODELS[name][2]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _eager(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", sorted(SAME_TINY_NETWORK))
def test_variant_without_its_own_deploy_run_is_the_same_tiny_network_as_its_representative(name):
    torch.manual_seed(0)
    model, twin = tiny(name).eval(), tiny(SAME_TINY_NETWORK[name]).eval()
    assert type(model) is type(twin)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    twin.load_state_dict(model.state_dict())
    for size in (SMALL, 2 * SMALL):
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(_eager(twin, x), _eager(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("name", DISTINCT)
def test_compile_fullgraph_traces_without_graph_breaks_and_matches_eager(name):
    """aot_eager: Dynamo with fullgraph=True (a graph break raises) plus AOTAutograd's fake-tensor trace."""
    torch._dynamo.reset()
    model = tiny(name).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(_eager(compiled, x), _eager(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vig_t", "ravlt_t", "vim_t"])  # one per operator kind: GLA, linear attention, scans
def test_inductor_compiled_model_matches_eager_forward_and_backward(name):
    torch._dynamo.reset()
    model = tiny(name).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(_eager(compiled, x), _eager(model, x), rtol=1e-4, atol=1e-4)
    compiled(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x).square().mean().backward()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", DISTINCT)
def test_export_dynamic_dims_match_eager_before_and_after_a_pt2_round_trip(tmp_path, name):
    model = tiny(name).eval()
    program, dims = deploy.export_program(model, torch.randn(2, 3, SMALL, SMALL), dynamic=True)
    expected = ("batch", "height", "width") if family(name) in DYNAMIC_HW else ("batch",)
    assert dims == expected
    loaded = deploy.load_program(deploy.save_program(program, tmp_path / "model.pt2")).module()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]  # the temporary file is gone
    sizes = [(SMALL, SMALL), (2 * SMALL, SMALL + 32)] if "height" in dims else [(SMALL, SMALL)]
    for batch in (1, 3):
        for h, w in sizes:
            x = torch.randn(batch, 3, h, w)
            ref = _eager(model, x)
            torch.testing.assert_close(program.module()(x), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DISTINCT)
def test_onnx_file_runs_in_onnxruntime_within_1e4_at_two_resolutions(tmp_path, name):
    model = tiny(name).eval()
    for size in (SMALL, 2 * SMALL):
        x = torch.randn(2, 3, size, size)
        path, _ = deploy.export_onnx(model, x, tmp_path / f"{size}.onnx")
        session = deploy.onnx_session(path)
        error = deploy.max_abs_error(deploy.run_onnx(session, x), _eager(model, x))
        assert error <= 1e-4, f"{name} at {size}: max |onnxruntime - eager| = {error:.2e}"


def test_onnx_file_holds_only_standard_onnx_ops(tmp_path):
    """The operators' PyTorch paths are decomposed: no custom (visionlin / torch) domain is left in the file."""
    import onnx
    for name in ("vim_t", "vmamba_t", "vig_t"):
        path, _ = deploy.export_onnx(tiny(name).eval(), torch.randn(1, 3, SMALL, SMALL), tmp_path / f"{name}.onnx")
        graph = onnx.load(str(path))
        domains = {n.domain for n in graph.graph.node} | {n.domain for f in graph.functions for n in f.node}
        assert domains <= {"", "ai.onnx", "pkg.onnxscript.torch_lib.common"}, (name, domains)


@pytest.mark.parametrize("name", ["vig_t", "vim_t", "vmamba_t"])
def test_onnx_graph_does_not_grow_with_the_image_the_chunk_states_are_one_scan(tmp_path, name):
    """The chunk-state pass is an ONNX Scan op, not a Python loop unrolled per chunk: at 128² (4x the tokens, 4x the
    chunks) the graph is about as large as at 64² (a few shape-dependent nodes differ, e.g. padding), so
    high-resolution files stay small and quick to export."""
    import onnx
    model = tiny(name).eval()
    counts = []
    for size in (SMALL, 2 * SMALL):
        path, _ = deploy.export_onnx(model, torch.randn(1, 3, size, size), tmp_path / f"{size}.onnx")
        graph = onnx.load(str(path)).graph
        assert "Scan" in {n.op_type for n in graph.node}
        counts.append(len(graph.node))
    assert abs(counts[1] - counts[0]) <= 0.05 * counts[0], counts


def test_plain_torch_onnx_export_needs_no_helper(tmp_path):
    """A user's own torch.onnx.export call also gets the PyTorch paths (the dispatch sees the ONNX export)."""
    model = tiny("vim_t").eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    torch.onnx.export(model, (x,), dynamo=True).save(str(tmp_path / "m.onnx"))
    error = deploy.max_abs_error(deploy.run_onnx(deploy.onnx_session(tmp_path / "m.onnx"), x), _eager(model, x))
    assert error <= 1e-4


def test_ravlt_onnx_file_with_dynamic_batch_and_size(tmp_path):
    model = tiny("ravlt_t").eval()
    path, dims = deploy.export_onnx(model, torch.randn(2, 3, SMALL, SMALL), tmp_path / "m.onnx", dynamic=True)
    assert dims == ("batch", "height", "width")
    session = deploy.onnx_session(path)
    for shape in ((1, 3, SMALL, SMALL), (3, 3, 2 * SMALL, SMALL)):
        x = torch.randn(shape)
        assert deploy.max_abs_error(deploy.run_onnx(session, x), _eager(model, x)) <= 1e-4


def test_forcing_a_fused_backend_in_an_onnx_export_is_an_error(tmp_path):
    with use_backend("cpu"), pytest.raises(Exception, match="cannot be exported to ONNX"):
        deploy.export_onnx(tiny("vim_t").eval(), torch.randn(1, 3, SMALL, SMALL), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_output_folder_is_named_and_nothing_is_written(tmp_path):
    model = tiny("ravlt_t").eval()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        deploy.export_onnx(model, torch.randn(1, 3, SMALL, SMALL), tmp_path / "missing" / "m.onnx")
    with pytest.raises(FileNotFoundError, match="no exported program"):
        deploy.load_program(tmp_path / "none.pt2")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# torch.library.opcheck on the compiled CPU operators (schema, fake tensors, autograd registration)
# ---------------------------------------------------------------------------------------------------
needs_cpu_kernel = pytest.mark.skipif(not cpu_kernel_available(), reason="no C compiler to build the CPU scan")


def _grad(tensors):
    return [None if t is None else t.detach().requires_grad_() for t in tensors]


@needs_cpu_kernel
@pytest.mark.parametrize("last_state", [False, True])
def test_opcheck_selective_scan_cpu(last_state):
    from test_selective_scan_torch import scan_inputs
    u, delta, A, B, C, D, z, bias = _grad(scan_inputs(b=2, d=6, l=21, n=4))
    torch.library.opcheck(torch.ops.visionlin.selective_scan_cpu.default,
                          (u, delta, A, B, C, D, z, bias, True, last_state))
    torch.library.opcheck(torch.ops.visionlin.selective_scan_cpu.default,
                          (u, delta, A, B, C, None, None, None, False, last_state))


@needs_cpu_kernel
@pytest.mark.parametrize("per_route_u", [False, True])
def test_opcheck_cross_selective_scan_cpu(per_route_u):
    from test_selective_scan_torch import cross_inputs
    u, delta, A, B, C, D, bias = _grad(cross_inputs(b=2, d=5, H=3, W=4, n=4, R=4, per_route_u=per_route_u))
    z = torch.randn(2, 5, 3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.visionlin.cross_selective_scan_cpu.default,
                          (u, delta, A, B, C, D, bias, z, None, True, 4))
    rank = 3  # the low-rank delta with its per-route projection (Vim's dt_proj inside the scan)
    low = torch.randn(2, 4, rank, 3, 4, requires_grad=True)
    weight = torch.randn(4, 5, rank, requires_grad=True)
    torch.library.opcheck(torch.ops.visionlin.cross_selective_scan_cpu.default,
                          (u, low, A, B, C, D, bias, None, weight, True, 4))


@needs_cpu_kernel
@pytest.mark.parametrize("with_proj", [False, True])
def test_opcheck_bidirectional_conv1d_silu_cpu(with_proj):
    x, weight, bias = (torch.randn(2, 19, 8, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True),
                       torch.randn(2, 8, requires_grad=True))
    proj = torch.randn(2, 6, 8, requires_grad=True) if with_proj else None
    torch.library.opcheck(torch.ops.visionlin.bidirectional_conv1d_silu_cpu.default, (x, weight, bias, proj))


# ---------------------------------------------------------------------------------------------------
# TorchScript: the scripted operators run their PyTorch paths; scripted models need no visionlin to load
# ---------------------------------------------------------------------------------------------------
def _scripted(fn):
    return torch.jit.script(fn)


@pytest.mark.parametrize("gate_scale", [1.0, 40.0])  # 40: |P| beyond float32's range, the float64 diagonal blocks
def test_scripted_bidirectional_gla_matches_the_reference(gate_scale):
    from test_gla_torch import make_inputs
    from visionlin.kernels.gla import bidirectional_gla, naive_bidirectional_gla
    inputs = make_inputs(N=45, gate_scale=gate_scale)
    out = _scripted(bidirectional_gla)(*inputs)
    torch.testing.assert_close(out, bidirectional_gla(*inputs, backend="torch"), rtol=0, atol=0)
    torch.testing.assert_close(out, naive_bidirectional_gla(*inputs), rtol=1e-4, atol=1e-4)


def test_scripted_linear_attention_matches_the_reference():
    from visionlin.kernels.linear_attn import linear_attention, naive_linear_attention
    q, k = torch.rand(2, 9, 2, 8), torch.rand(2, 13, 2, 8)
    v, w = torch.randn(2, 13, 2, 4), torch.rand(2, 13, 2) * 13
    out = _scripted(linear_attention)(q, k, v, None, k.flip(1), w)
    torch.testing.assert_close(out, naive_linear_attention(q, k, v, None, k.flip(1), w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("A_scale", [1.0, 30.0])  # 30: strong decays, the clamp and float64 chunk exponentials
def test_scripted_selective_scan_matches_the_reference_with_and_without_the_last_state(A_scale):
    from test_selective_scan_torch import scan_inputs
    from visionlin.kernels.ssm import naive_selective_scan, selective_scan
    inputs = scan_inputs(l=37, A_scale=A_scale)
    scripted = _scripted(selective_scan)
    out, last = scripted(*inputs, delta_softplus=True, return_last_state=True)
    ref, ref_last = naive_selective_scan(*inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, ref_last.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scripted(*inputs), selective_scan(*inputs, backend="torch"), rtol=0, atol=0)


@pytest.mark.parametrize("routes", [1, 2, 4])
def test_scripted_cross_selective_scan_matches_the_reference(routes):
    from test_selective_scan_torch import cross_inputs
    from visionlin.kernels.ssm import cross_selective_scan, naive_cross_selective_scan
    u, delta, A, B, C, D, bias = cross_inputs(H=5, W=7, R=routes, per_route_u=routes == 2)
    z = torch.randn(2, 5, 5, 7)
    out = _scripted(cross_selective_scan)(u, delta, A, B, C, D, bias, True, routes, z)
    torch.testing.assert_close(out, naive_cross_selective_scan(u, delta, A, B, C, D, bias, True, routes, z),
                               rtol=1e-4, atol=1e-4)


def test_scripted_bidirectional_conv1d_silu_matches_the_pytorch_path():
    from visionlin.kernels.ssm import bidirectional_conv1d_silu
    x, weight, bias, proj = torch.randn(2, 19, 8), torch.randn(2, 8, 4), torch.randn(2, 8), torch.randn(2, 6, 8)
    scripted = _scripted(bidirectional_conv1d_silu)
    torch.testing.assert_close(scripted(x, weight, bias), bidirectional_conv1d_silu(x, weight, bias, backend="torch"))
    y, p = scripted(x, weight, bias, proj)
    y_ref, p_ref = bidirectional_conv1d_silu(x, weight, bias, proj, backend="torch")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(p, p_ref)


@pytest.mark.parametrize("name", DISTINCT)
def test_torchscript_model_matches_eager_at_two_sizes(name):
    """As timm's torchscript test builds it (scriptable layers), compared with eager (the fused CPU paths where
    eager takes them), at the default size and a larger one."""
    with timm.layers.set_layer_config(scriptable=True):
        model = tiny(name).eval()
    scripted = torch.jit.script(model)
    for batch, size in ((2, SMALL), (1, 2 * SMALL)):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vig_t", "vig_h_t", "ravlt_t", "vim_t", "vmamba_t"])
def test_torchscript_file_loads_and_runs_in_a_process_without_visionlin(tmp_path, name):
    """A saved script holds aten ops only: a fresh interpreter that never imports visionlin (nor timm) runs it,
    and its gradients flow (training a scripted model)."""
    model = tiny(name).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            "m = torch.jit.load(sys.argv[1] + '/m.pt'); x = torch.load(sys.argv[1] + '/x.pt')\n"
            "y = m(x); y.square().mean().backward()\n"
            "assert all(p.grad is not None for p in m.parameters() if p.requires_grad)\n"
            "torch.save(y.detach(), sys.argv[1] + '/y.pt')\n"
            "assert not any(n.split('.')[0] in ('visionlin', 'timm') for n in sys.modules), 'imported visionlin'\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=tmp_path, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), _eager(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vig_t", "vig_h_t", "ravlt_t", "vim_t", "vmamba_t"])
def test_fx_traced_then_scripted_model_matches_eager(name):
    """timm's FX + TorchScript path: the FX graph (mixers as leaves) scripts and runs the same network."""
    from torchvision.models.feature_extraction import create_feature_extractor
    with timm.layers.set_layer_config(scriptable=True):
        model = tiny(name).eval()
    leaves = timm.models.get_notrace_modules()
    fns = timm.models.get_notrace_functions()
    fx = create_feature_extractor(model, return_nodes=["head"] if hasattr(model, "head") else None,
                                  tracer_kwargs=dict(leaf_modules=leaves, autowrap_functions=fns))
    scripted = torch.jit.script(fx)
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x)["head"], model(x), rtol=1e-4, atol=1e-4)
