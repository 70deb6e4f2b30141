"""LinDiT: DiT's adaLN-Zero transformer on generalized linear attention + depthwise conv, inside DiTPipeline."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_zoo import tiny_dit, tiny_dit_pipeline  # skips the module without diffusers

from diffusers import DiTPipeline, DiTTransformer2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from visionlin.diffusion.lindit import (LINDIT_CONFIGS, LinDiTTransformer2DModel, create_lindit,  # noqa: E402
                                        lindit_b_2, lindit_l_2, lindit_s_2, lindit_xl_2)
from visionlin.layers import generalized_linear_attention  # noqa: E402

WIDTH, HEADS = 16, 2  # tiny_dit: 2 heads x 8, 2 layers, patch 2, latents 4 x 8 x 8, learned sigma
FRESH = (".attn1.to_q_.", ".attn1.to_k_.", ".dwconv.")


def as_if_trained(model: LinDiTTransformer2DModel, names=FRESH, std: float = 0.2) -> LinDiTTransformer2DModel:
    """Randomises the zero-initialised parts (feature-MLP outputs, convs) so tests exercise every path."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in names):
                p.normal_(0, std)
    return model.eval()


def student(**overrides) -> LinDiTTransformer2DModel:
    return as_if_trained(LinDiTTransformer2DModel.from_dit(tiny_dit(), **overrides))


def inputs(batch: int = 2, height: int = 8, width: int = 8):
    return (torch.randn(batch, 4, height, width), torch.randint(0, 1000, (batch,)),
            torch.tensor([3, 1000, 7, 1000][:batch]))  # class 1000 = DiTPipeline's null class


# --- forward and input checks --------------------------------------------------------------------

def test_forward_maps_latents_to_out_channels_at_any_multiple_of_the_patch_size():
    model = student()
    with torch.no_grad():
        for size in [(8, 8), (16, 16), (8, 12), (6, 10)]:
            x, t, y = inputs(2, *size)
            out = model(x, timestep=t, class_labels=y)
            assert out.sample.shape == (2, 8, *size) and torch.isfinite(out.sample).all()
        (tup,) = model(x, t, y, return_dict=False)
        torch.testing.assert_close(tup, out.sample)


def test_bad_latents_and_configs_are_rejected_naming_the_argument():
    model = student()
    t, y = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(ValueError, match="patch_size=2, got 9x8"):
        model(torch.randn(1, 4, 9, 8), t, y)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        model(torch.randn(1, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="sample_size must be a positive multiple of patch_size=2"):
        LinDiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=9)
    with pytest.raises(ValueError, match="conv_kernel_size must be a positive odd"):
        LinDiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, conv_kernel_size=4)
    with pytest.raises(ValueError, match="feature_dim must be None"):
        LinDiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, feature_dim=0)


def test_fresh_model_is_adaln_zero_every_block_the_identity_and_the_output_zero():
    model = LinDiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=8, num_layers=2, sample_size=8,
                                     out_channels=8).eval()
    x, t, y = inputs()
    tokens = model.pos_embed(x)
    with torch.no_grad():
        for block in model.transformer_blocks:
            torch.testing.assert_close(block(tokens, (4, 4), t, y), tokens, rtol=0, atol=0)
        assert torch.count_nonzero(model(x, t, y).sample) == 0


# --- weight inheritance from DiT ----------------------------------------------------------------

@pytest.mark.parametrize("inherit_attention", [True, False])
def test_from_dit_copies_every_dit_weight_by_name_and_reports_the_fresh_ones(inherit_attention):
    dit = tiny_dit()
    model, info = LinDiTTransformer2DModel.from_dit(dit, inherit_attention=inherit_attention, output_loading_info=True)
    ours, theirs = model.state_dict(), dit.state_dict()
    assert set(theirs) <= set(ours)
    fresh = FRESH + ((".attn1.",) if not inherit_attention else ())
    assert sorted(info["missing_keys"]) == sorted(k for k in ours if any(part in k for part in fresh))
    for name, value in theirs.items():
        if ".attn1." in name and not inherit_attention:
            assert not torch.equal(ours[name], value), name
        else:
            assert torch.equal(ours[name], value), name
    assert model.config.base_sample_size == dit.config.sample_size == 8


class LinearAttentionProcessor:
    """A diffusers attention processor computing generalized linear attention with the layer's own projections."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        o = generalized_linear_attention(attn.to_q(hidden_states), attn.to_k(hidden_states),
                                         attn.to_v(hidden_states), attn.heads)
        return attn.to_out[0](o)


def test_from_dit_student_at_init_is_the_teacher_with_linear_attention_also_inside_dit_pipeline():
    teacher = tiny_dit().eval()
    model = LinDiTTransformer2DModel.from_dit(teacher).eval()
    for module in teacher.modules():
        if isinstance(module, Attention):
            module.set_processor(LinearAttentionProcessor())
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y).sample, teacher(x, timestep=t, class_labels=y).sample)
    # guidance batches cond + null class, learned sigma splits 8 channels: both pipelines must agree
    images = [tiny_dit_pipeline(transformer=m)(class_labels=[0, 1], num_inference_steps=2, output_type="np",
                                               generator=torch.Generator().manual_seed(0)).images
              for m in (model, teacher)]
    assert images[0].shape == (2, 16, 16, 3)
    np.testing.assert_allclose(images[0], images[1], atol=1e-5)


def test_from_dit_rejects_a_mismatched_architecture_and_non_dit_models():
    dit = tiny_dit()
    with pytest.raises(ValueError, match="num_layers=3 but the DiT has 2"):
        LinDiTTransformer2DModel.from_dit(dit, num_layers=3)
    with pytest.raises(ValueError, match=r"num_attention_heads=6 but the DiT has 2.*attention_head_dim=64"):
        LinDiTTransformer2DModel.from_dit(dit, **LINDIT_CONFIGS["lindit_s_2"])
    with pytest.raises(TypeError, match="DiTTransformer2DModel, got LinDiTTransformer2DModel"):
        LinDiTTransformer2DModel.from_dit(student())
    model = LinDiTTransformer2DModel.from_dit(dit, out_channels=8, feature_dim=4, sample_size=16)
    assert model.transformer_blocks[0].attn1.to_q_[0].out_features == 4
    assert (model.config.sample_size, model.config.base_sample_size) == (16, 8)


# --- the block, by hand ---------------------------------------------------------------------------

def hand_block(block, x, grid, t, y):
    """DiT's adaLN-Zero block with LinFusion's attention and a depthwise conv, written out from the papers."""
    (H, W), C, k = grid, x.shape[-1], block.dwconv.kernel_size[0]
    cond = block.norm1.emb(t, y, hidden_dtype=x.dtype)  # DiT's (t, y) embedder, checked against DiT above
    mod = F.linear(F.silu(cond), block.norm1.linear.weight, block.norm1.linear.bias)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, None].chunk(6, dim=-1)
    h = F.layer_norm(x, (C,), eps=1e-6) * (1 + scale_msa) + shift_msa

    a = block.attn1
    phi = lambda mlp, u: mlp[3](F.leaky_relu(mlp[1](mlp[0](u)), 0.01))  # noqa: E731
    heads = lambda u: u.unflatten(-1, (HEADS, -1)).transpose(1, 2)  # noqa: E731  (B, heads, N, d)
    q = F.elu(heads(a.to_q(h + phi(a.to_q_, h)))) + 1
    kk = F.elu(heads(a.to_k(h + phi(a.to_k_, h)))) + 1
    v = heads(a.to_v(h))
    o = (q @ (kk.transpose(-2, -1) @ v / h.shape[1])) / (q @ kk.mean(-2, keepdim=True).transpose(-2, -1) + 1e-4)
    attn = a.to_out[0](o.transpose(1, 2).flatten(2))

    r = k // 2  # depthwise conv as a sum over kernel offsets on the zero-padded (H, W) grid
    padded = F.pad(h.unflatten(1, (H, W)), (0, 0, r, r, r, r))
    w = block.dwconv.weight[:, 0]
    conv = block.dwconv.bias + sum(padded[:, i:i + H, j:j + W] * w[:, i, j] for i in range(k) for j in range(k))

    x = x + gate_msa * (attn + conv.flatten(1, 2))
    h = F.layer_norm(x, (C,), eps=block.norm3.eps) * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * block.ff.net[2](F.gelu(block.ff.net[0].proj(h), approximate="tanh"))


def test_block_equals_the_hand_computation_on_a_non_square_grid():
    model = student(conv_kernel_size=5).double()
    seen = {}
    model.transformer_blocks[1].register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    x, t, y = inputs(2, 8, 12)
    with torch.no_grad():
        model(x.double(), t, y)
        x_in, grid, t_in, y_in = seen["args"]
        assert grid == (4, 6)
        torch.testing.assert_close(seen["out"], hand_block(model.transformer_blocks[1], x_in, grid, t_in, y_in),
                                   rtol=1e-10, atol=1e-10)


def test_conv_branch_mixes_exactly_the_2d_kernel_neighbourhood():
    block = student().double().transformer_blocks[0]
    with torch.no_grad():
        block.attn1.to_out[0].weight.zero_()
        block.attn1.to_out[0].bias.zero_()
        x, t, y = torch.randn(1, 24, WIDTH, dtype=torch.float64), torch.tensor([10]), torch.tensor([3])
        bumped = x.clone()
        bumped[0, 1 * 6 + 5] += torch.randn(WIDTH)  # token (1, 5) of a 4 x 6 grid; (2, 0) follows it in raster order
        changed = (block(bumped, (4, 6), t, y) - block(x, (4, 6), t, y)).abs().amax(-1).view(4, 6) > 0
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    assert torch.equal(changed, ((rows - 1).abs() <= 1) & ((cols - 5).abs() <= 1))


# --- dynamic resolution ----------------------------------------------------------------------------

def test_positions_of_larger_or_non_square_latents_interpolate_the_trained_grid():
    model = student()
    positions = lambda lat: model.pos_embed(lat) - model.pos_embed.proj(lat).flatten(2).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        trained = positions(torch.randn(1, 4, 8, 8)).unflatten(1, (4, 4))
        double = positions(torch.randn(1, 4, 16, 16)).unflatten(1, (8, 8))
        wide = positions(torch.randn(1, 4, 8, 16)).unflatten(1, (4, 8))
    torch.testing.assert_close(double[:, ::2, ::2], trained)
    torch.testing.assert_close(wide[:, :, ::2], trained)
    assert not torch.allclose(double[:, 1::2, 1::2], trained)


def test_pipeline_samples_twice_the_trained_size_after_a_sample_size_override(tmp_path):
    model = student()
    model.save_pretrained(tmp_path)
    big = LinDiTTransformer2DModel.from_pretrained(tmp_path, sample_size=16).eval()
    assert (big.config.sample_size, big.config.base_sample_size) == (16, 8)
    x, t, y = inputs(2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(big(x, t, y).sample, model(x, t, y).sample)
    fresh = LinDiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=8, num_layers=1, sample_size=8)
    assert LinDiTTransformer2DModel.from_config(fresh.config, sample_size=16).config.base_sample_size == 8
    images = tiny_dit_pipeline(transformer=big)(class_labels=[1], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


# --- serialisation, gradients ----------------------------------------------------------------------

def test_save_pretrained_round_trip_gives_identical_outputs(tmp_path):
    model = student(feature_dim=4, conv_kernel_size=5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = LinDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == \
        {k: v for k, v in model.config.items() if not k.startswith("_")}
    x, t, y = inputs(2, 8, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y).sample, model(x, t, y).sample)


def test_dit_pipeline_saves_and_reloads_with_the_lindit_transformer(tmp_path):
    pipe = tiny_dit_pipeline(transformer=student())
    pipe.save_pretrained(tmp_path)
    loaded = DiTPipeline.from_pretrained(tmp_path)
    assert type(loaded.transformer) is LinDiTTransformer2DModel
    for name, value in pipe.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[name], value), name


def test_every_parameter_gets_a_gradient_also_with_gradient_checkpointing():
    model = as_if_trained(LinDiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=8, num_layers=2,
                                                   sample_size=8, out_channels=8), names=("",), std=0.1)
    x, t, y = inputs()
    checkpointed = []

    def checkpoint(block, *args):
        checkpointed.append(block)
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.enable_gradient_checkpointing(checkpoint)
        model(x, t, y).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert checkpointed == list(model.transformer_blocks)
    assert [n for n, g in grads[0].items() if not g.abs().sum() > 0] == []
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


# --- variants and parameter counts -----------------------------------------------------------------

PAPER_PARAMS_M = {"lindit_s_2": 32.9, "lindit_b_2": 130.3, "lindit_l_2": 457.8, "lindit_xl_2": 674.8}
WIDTHS = {"lindit_s_2": (12, 384, 6), "lindit_b_2": (12, 768, 12), "lindit_l_2": (24, 1024, 16),
          "lindit_xl_2": (28, 1152, 16)}


@pytest.mark.parametrize("name, factory", [("lindit_s_2", lindit_s_2), ("lindit_b_2", lindit_b_2),
                                           ("lindit_l_2", lindit_l_2), ("lindit_xl_2", lindit_xl_2)])
def test_parameters_are_dits_plus_the_feature_mlps_and_convs(name, factory):
    with torch.device("meta"):
        ours, dit = factory(), DiTTransformer2DModel(**LINDIT_CONFIGS[name])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    depth, C, heads = WIDTHS[name]
    assert (ours.config.num_layers, ours.inner_dim, ours.config.num_attention_heads) == (depth, C, heads)
    assert (ours.config.patch_size, ours.config.out_channels, ours.config.sample_size) == (2, 8, 32)
    feature_mlp = C * C + C + 2 * C + C * C + C  # Linear(C, C) -> LayerNorm(C) -> Linear(C, C)
    dwconv = C * 9 + C
    assert count(ours) == count(dit) + depth * (2 * feature_mlp + dwconv)
    # diffusers gives every block its own (t, y) embedder (the converted checkpoint repeats DiT's shared one);
    # the paper's count has one, and no fixed position table
    embedder = (256 * C + C) + (C * C + C) + 1001 * C
    assert round((count(dit) - (depth - 1) * embedder) / 1e6, 1) == PAPER_PARAMS_M[name]


def test_create_lindit_names_the_known_variants_for_an_unknown_one():
    with pytest.raises(ValueError, match="known: lindit_s_2, lindit_b_2, lindit_l_2, lindit_xl_2"):
        create_lindit("lindit_h_2")
    with torch.device("meta"):
        assert create_lindit("lindit_s_2", num_layers=2, feature_dim=24).config.feature_dim == 24


class _Denoise(torch.nn.Module):
    """The denoiser as a tensor function (what compile / export / ONNX take): noise and sigma prediction."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latents, timestep, class_labels):
        return self.model(latents, timestep, class_labels, return_dict=False)[0]


def test_compiles_fullgraph_exports_and_runs_in_onnxruntime(tmp_path):
    """LinDiT deploys like the backbones: torch.compile(fullgraph) and torch.export equal eager, and the ONNX file
    runs in onnxruntime within 1e-4. (TorchScript does not apply: diffusers' own blocks are not scriptable.)"""
    import onnxruntime as ort
    model = _Denoise(student()).eval()
    args = inputs()
    with torch.no_grad():
        ref = model(*args)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(*args), ref, rtol=1e-5, atol=1e-5)
        program = torch.export.export(model, args)
        torch.testing.assert_close(program.module()(*args), ref, rtol=1e-5, atol=1e-5)
    torch.onnx.export(model, args, dynamo=True, verbose=False).save(str(tmp_path / "lindit.onnx"))
    session = ort.InferenceSession(str(tmp_path / "lindit.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    assert np.abs(session.run(None, feeds)[0] - ref.numpy()).max() <= 1e-4
