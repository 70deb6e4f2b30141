"""linearize(): LinFusion linear attention in diffusers denoisers through the attention-processor seam."""
from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402
from diffusion_zoo import (tiny_dit, tiny_dit_pipeline, tiny_pixart, tiny_pixart_pipeline, tiny_sd_pipeline,  # noqa: E402
                           tiny_sdxl_pipeline, tiny_unet, tiny_vae)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from visionlin.diffusion import LinFusionAttnProcessor, linearize  # noqa: E402
from visionlin.layers.linfusion import GeneralizedLinearAttention  # noqa: E402

SD_LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1", "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
             "up_blocks.1.attentions.1.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0.attn1"]
PARAMS_WITH_MLP = ["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias",
                   *[f"{mlp}.{i}.{p}" for mlp in ("to_q_", "to_k_") for i in (0, 1, 3) for p in ("weight", "bias")]]


def unet_inputs(unet, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor([10, 500]),
              encoder_hidden_states=torch.randn(2, 5, 32, generator=g))
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    return kw


def pixart_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                timestep=torch.tensor([10, 500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


@torch.no_grad()
def run(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).sample


def sd_images(pipe):
    return pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def dit_pipeline():
    """tiny_dit_pipeline in eval mode: in train mode DiT's class-label dropout draws from the global RNG."""
    pipe = tiny_dit_pipeline()
    pipe.transformer.eval()
    return pipe


def dit_images(pipe):
    return pipe(class_labels=[0], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def pixart_images(pipe):
    """A non-square image at exactly the size asked (no aspect-ratio binning)."""
    return pipe("a cat", num_inference_steps=2, height=32, width=48, use_resolution_binning=False, clean_caption=False,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


PIPELINES = {"sd": (tiny_sd_pipeline, sd_images), "sdxl": (tiny_sdxl_pipeline, sd_images),
             "pixart": (lambda tmp: tiny_pixart_pipeline(), pixart_images), "dit": (lambda tmp: dit_pipeline(), dit_images)}


def attentions(model) -> dict[str, Attention]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def perturb(handle) -> None:
    """Stand-in for distillation: move every linear-attention weight away from its initial value."""
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def rewrite(src, dst, edit) -> None:
    """Copy a saved file, letting ``edit(tensors, layers)`` change its tensors and metadata layer config."""
    with safe_open(str(src), framework="pt") as f:
        config = json.loads(f.metadata()["visionlin.linfusion"])
    tensors = load_file(str(src))
    edit(tensors, config["layers"])
    save_file(tensors, str(dst), metadata={"visionlin.linfusion": json.dumps(config)})


# ---------------------------------------------------------------- installation on the supported models

DENOISERS = {"sd": (lambda tmp: tiny_sd_pipeline(tmp), 4), "sdxl": (lambda tmp: tiny_unet(sdxl=True), 8),
             "dit": (lambda tmp: dit_pipeline(), 2), "pixart": (lambda tmp: tiny_pixart(), 2)}


@pytest.mark.parametrize("kind", list(DENOISERS))
def test_every_self_attention_gets_the_processor_and_cross_attention_keeps_softmax(kind, tmp_path):
    build, n_self = DENOISERS[kind]
    target = build(tmp_path)
    model = getattr(target, "unet", None) or getattr(target, "transformer", target)
    handle = linearize(target)
    assert handle.model is model
    found = attentions(model)
    assert sorted(handle.layers) == sorted(n for n in found if n.endswith("attn1")) and len(handle.layers) == n_self
    for name, attn in found.items():
        if name.endswith("attn1"):
            assert isinstance(attn.processor, LinFusionAttnProcessor)
            assert handle.layers[name].dim == attn.query_dim and handle.layers[name].heads == attn.heads
        else:
            assert attn.is_cross_attention and type(attn.processor) is AttnProcessor2_0
    if hasattr(target, "vae"):
        assert all(type(p) is AttnProcessor2_0 for p in target.vae.attn_processors.values())


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_pipelines_generate_finite_images_that_differ_from_the_teacher(kind, tmp_path):
    build, generate = PIPELINES[kind]
    pipe = build(tmp_path)
    teacher = generate(pipe)
    linearize(pipe)
    student = generate(pipe)
    assert student.shape == teacher.shape and torch.isfinite(torch.from_numpy(student)).all()
    assert abs(student - teacher).max() > 1e-4


@pytest.mark.parametrize("kind", ["sdxl", "pixart"])
def test_models_run_finite_and_change_output(kind):
    model, inputs = (tiny_unet(sdxl=True), None) if kind == "sdxl" else (tiny_pixart(), pixart_inputs())
    inputs = inputs or unet_inputs(model)
    teacher = run(model, inputs)
    linearize(model)
    student = run(model, inputs)
    assert torch.isfinite(student).all() and (student - teacher).abs().max() > 1e-4


# ---------------------------------------------------------------- the processor's computation

def test_teacher_init_copies_the_softmax_projections():
    unet = tiny_unet()
    handle = linearize(unet)
    for name, processor in handle.processors.items():
        attn = attentions(unet)[name]
        ours = processor.attention
        for mine, teacher in ((ours.to_q, attn.to_q), (ours.to_k, attn.to_k), (ours.to_v, attn.to_v),
                              (ours.to_out[0], attn.to_out[0])):
            assert torch.equal(mine.weight, teacher.weight) and mine.weight.data_ptr() != teacher.weight.data_ptr()
        assert torch.equal(ours.to_out[0].bias, attn.to_out[0].bias)


def test_fresh_init_does_not_copy_the_teacher():
    unet = tiny_unet()
    handle = linearize(unet, init="fresh")
    for name, processor in handle.processors.items():
        attn = attentions(unet)[name]
        assert not torch.equal(processor.attention.to_q.weight, attn.to_q.weight)
        assert not torch.equal(processor.attention.to_out[0].weight, attn.to_out[0].weight)


def test_processor_output_is_generalized_linear_attention_of_the_layer_input():
    teacher = tiny_unet()
    unet = tiny_unet()
    name = SD_LAYERS[3]
    handle = linearize(unet)
    seen = {}
    attentions(unet)[name].register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    run(unet, unet_inputs(unet))
    by_hand = GeneralizedLinearAttention(64, heads=8, feature_dim=64)
    t_attn = attentions(teacher)[name]
    by_hand.to_q.load_state_dict(t_attn.to_q.state_dict())
    by_hand.to_k.load_state_dict(t_attn.to_k.state_dict())
    by_hand.to_v.load_state_dict(t_attn.to_v.state_dict())
    by_hand.to_out[0].load_state_dict(t_attn.to_out[0].state_dict())
    by_hand.to_q_.load_state_dict(handle.processors[name].attention.to_q_.state_dict())
    by_hand.to_k_.load_state_dict(handle.processors[name].attention.to_k_.state_dict())
    assert seen["x"].shape == (2, 64, 64)  # the mid block sees the 8x8 latent as 64 tokens
    with torch.no_grad():
        torch.testing.assert_close(seen["y"], by_hand(seen["x"]), rtol=1e-5, atol=1e-6)


def test_processor_handles_image_inputs_spatial_norm_group_norm_dropout_residual_and_rescale():
    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8, bias=True, norm_num_groups=4, spatial_norm_dim=3, dropout=1.0,
                     residual_connection=True, rescale_output_factor=2.0).eval()
    processor = LinFusionAttnProcessor.from_attention(attn, feature_dim=8)
    attn.set_processor(processor)
    x, zq = torch.randn(2, 32, 3, 5), torch.randn(2, 3, 2, 2)
    with torch.no_grad():
        got = attn(x, temb=zq)
        h = attn.spatial_norm(x, zq).flatten(2).transpose(1, 2)  # (B, H*W, C), row-major over (H, W)
        h = F.group_norm(h.transpose(1, 2), 4, attn.group_norm.weight, attn.group_norm.bias, attn.group_norm.eps)
        o = processor.attention(h.transpose(1, 2))
        want = (o.transpose(1, 2).reshape(2, 32, 3, 5) + x) / 2.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    attn.train()  # the teacher's output dropout (p = 1 here) applies to the attention branch only
    with torch.no_grad():
        assert torch.equal(attn(x, temb=zq), x / 2.0)


@pytest.mark.parametrize("case", ["cross", "mask", "qk_norm"])
def test_processor_refuses_what_linear_self_attention_cannot_do(case):
    attn = Attention(16, heads=2, dim_head=8, qk_norm="layer_norm" if case == "qk_norm" else None)
    attn.set_processor(LinFusionAttnProcessor.from_attention(attn))
    x = torch.randn(1, 4, 16)
    kwargs = {"cross": {"encoder_hidden_states": x}, "mask": {"attention_mask": torch.ones(1, 4)}, "qk_norm": {}}[case]
    error = NotImplementedError if case == "mask" else ValueError
    with pytest.raises(error, match={"cross": "encoder_hidden_states", "mask": "attention_mask", "qk_norm": "qk-norm"}[case]):
        attn(x, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_processor_follows_dtype_casts_of_the_model(dtype):
    unet = tiny_unet()
    handle = linearize(unet)
    inputs = unet_inputs(unet)
    reference = run(unet, inputs)
    unet.to(dtype)
    assert {p.dtype for p in handle.parameters()} == {dtype}
    out = run(unet, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()})
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("feature_dim, widths", [("d", {32: 32, 64: 64}), ("d/16", {32: 2, 64: 4}), (8, {32: 8, 64: 8}),
                                                 (None, None)])
def test_feature_dim_options_give_the_feature_mlp_widths(feature_dim, widths):
    handle = linearize(tiny_unet(), feature_dim=feature_dim)
    for name, processor in handle.processors.items():
        attention, d = processor.attention, handle.layers[name].dim
        if widths is None:
            assert attention.to_q_ is None and attention.to_k_ is None and handle.layers[name].feature_dim is None
            assert not any("to_q_" in k for k in handle.state_dict())
        else:
            m = widths[d]
            for mlp in (attention.to_q_, attention.to_k_):
                assert mlp[0].weight.shape == (m, d) and mlp[1].weight.shape == (m,) and mlp[3].weight.shape == (d, m)
            assert handle.layers[name].feature_dim == m


@pytest.mark.parametrize("feature_dim", ["x", "d/0", "2d", 0, -3, 2.5, True])
def test_bad_feature_dim_is_rejected(feature_dim):
    with pytest.raises(ValueError, match="feature_dim must be"):
        linearize(tiny_unet(), feature_dim=feature_dim)


def test_feature_dim_that_rounds_to_zero_is_rejected():
    with pytest.raises(ValueError, match="width 32 a feature MLP of width 0"):
        linearize(tiny_unet(), feature_dim="d/64")


def test_bad_init_is_rejected():
    with pytest.raises(ValueError, match="init must be one of"):
        linearize(tiny_unet(), init="teacher_weights")


def test_only_the_linear_attention_parameters_get_gradients_when_the_model_is_frozen():
    unet = tiny_unet()
    handle = linearize(unet)
    unet.requires_grad_(False)
    for p in handle.parameters():
        p.requires_grad_(True)
    unet(**unet_inputs(unet)).sample.square().mean().backward()
    ours = {id(p) for p in handle.parameters()}
    assert ours == {id(p) for n, p in unet.named_parameters() if ".attn1.processor." in n}
    assert len(ours) == len(SD_LAYERS) * len(PARAMS_WITH_MLP)
    for name, p in unet.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (id(p) in ours), name


# ---------------------------------------------------------------- install / remove

def test_remove_restores_the_original_processors_and_outputs():
    unet = tiny_unet()
    inputs = unet_inputs(unet)
    teacher = run(unet, inputs)
    originals = {n: a.processor for n, a in attentions(unet).items()}
    handle = linearize(unet)
    assert not torch.equal(run(unet, inputs), teacher)
    handle.remove()
    assert all(a.processor is originals[n] for n, a in attentions(unet).items())
    assert not any(".processor." in k for k in unet.state_dict())
    assert torch.equal(run(unet, inputs), teacher)
    with pytest.raises(RuntimeError, match="removed"):
        handle.parameters()
    linearize(unet)


def test_linearizing_twice_is_refused():
    unet = tiny_unet()
    linearize(unet)
    with pytest.raises(ValueError, match="already linearized"):
        linearize(unet)


def test_unsupported_models_are_refused():
    with pytest.raises(TypeError, match="got AutoencoderKL"):
        linearize(tiny_vae())


def test_save_pretrained_keeps_the_weights_but_from_pretrained_drops_them(tmp_path):
    """The documented limit of diffusers serialisation: handle.save / linearize(weights=) is the supported path."""
    unet = tiny_unet()
    linearize(unet)
    unet.save_pretrained(tmp_path)
    keys = safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), framework="pt").keys()
    assert f"{SD_LAYERS[0]}.processor.attention.to_q.weight" in keys
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert all(type(p) is AttnProcessor2_0 for p in reloaded.attn_processors.values())


# ---------------------------------------------------------------- save / load

@pytest.fixture
def saved_sd(tmp_path):
    """A perturbed ('distilled') linearized tiny SD UNet and its saved weights file."""
    unet = tiny_unet()
    handle = linearize(unet)
    perturb(handle)
    return unet, handle, handle.save(tmp_path / "student.safetensors")


def test_saved_file_holds_only_the_linear_attention_weights_and_its_config(saved_sd):
    unet, handle, path = saved_sd
    tensors = load_file(str(path))
    assert set(tensors) == {f"{layer}.{p}" for layer in SD_LAYERS for p in PARAMS_WITH_MLP}
    for key, t in handle.state_dict().items():
        assert torch.equal(tensors[key], t)
    config = json.loads(safe_open(str(path), framework="pt").metadata()["visionlin.linfusion"])
    assert config["format_version"] == 1
    assert config["layers"][SD_LAYERS[3]] == {"dim": 64, "inner_dim": 64, "heads": 8, "feature_dim": 64,
                                              "qkv_bias": False, "out_bias": True}
    assert list(config["layers"]) == SD_LAYERS
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("kind, feature_dim", [("sd", "d/16"), ("sdxl", "d"), ("pixart", None), ("dit", 4)])
def test_save_load_round_trip_reproduces_the_pipeline_exactly(kind, feature_dim, tmp_path):
    build, generate = PIPELINES[kind]
    pipe = build(tmp_path / "a")
    handle = linearize(pipe, feature_dim=feature_dim)
    perturb(handle)
    path = handle.save(tmp_path / "student.safetensors")
    pipe2 = build(tmp_path / "b")
    handle2 = linearize(pipe2, weights=path)
    assert handle2.layers == handle.layers
    assert (generate(pipe2) == generate(pipe)).all()


def test_handle_load_replaces_the_installed_weights(saved_sd):
    unet, handle, path = saved_sd
    inputs = unet_inputs(unet)
    want = run(unet, inputs)
    perturb(handle)
    assert not torch.equal(run(unet, inputs), want)
    handle.load(path)
    assert torch.equal(run(unet, inputs), want)


def test_save_is_atomic(saved_sd, monkeypatch):
    unet, handle, path = saved_sd
    before = path.read_bytes()
    module = importlib.import_module("visionlin.diffusion.linfusion")

    def broken_save(tensors, filename, metadata):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        handle.save(path)
    assert path.read_bytes() == before and sorted(path.parent.iterdir()) == [path]


def test_save_needs_a_safetensors_path(saved_sd, tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        saved_sd[1].save(tmp_path / "student.pt")


# ---------------------------------------------------------------- mismatches

def test_sd_weights_do_not_load_into_dit(saved_sd):
    with pytest.raises(ValueError) as err:
        linearize(tiny_dit(), weights=saved_sd[2])
    message = str(err.value)
    assert "the file has 4 layers, DiTTransformer2DModel has 2" in message
    assert "not in the file: transformer_blocks.0.attn1, transformer_blocks.1.attn1" in message
    assert f"not self-attention layers of DiTTransformer2DModel: {SD_LAYERS[0]}" in message


def test_file_with_a_layer_missing_is_refused(saved_sd, tmp_path):
    def drop_up_layer(tensors, layers):
        for key in [k for k in tensors if k.startswith(SD_LAYERS[1])]:
            del tensors[key]
        del layers[SD_LAYERS[1]]

    rewrite(saved_sd[2], tmp_path / "short.safetensors", drop_up_layer)
    with pytest.raises(ValueError, match=f"the file has 3 layers.*has 4.*not in the file: {SD_LAYERS[1]}$"):
        linearize(tiny_unet(), weights=tmp_path / "short.safetensors")


def test_file_missing_a_tensor_is_refused(saved_sd, tmp_path):
    rewrite(saved_sd[2], tmp_path / "holey.safetensors", lambda tensors, layers: tensors.pop(f"{SD_LAYERS[2]}.to_v.weight"))
    with pytest.raises(ValueError, match=f"missing keys: {SD_LAYERS[2]}.to_v.weight"):
        linearize(tiny_unet(), weights=tmp_path / "holey.safetensors")


def test_file_with_other_layer_dims_is_refused(saved_sd, tmp_path):
    rewrite(saved_sd[2], tmp_path / "wide.safetensors", lambda tensors, layers: layers[SD_LAYERS[0]].update(dim=48))
    with pytest.raises(ValueError, match=f"layer {SD_LAYERS[0]} has dim=48 in the file but 32 in UNet2DConditionModel"):
        linearize(tiny_unet(), weights=tmp_path / "wide.safetensors")


def test_file_with_a_wrongly_shaped_tensor_is_refused(saved_sd, tmp_path):
    def shrink(tensors, layers):
        tensors[f"{SD_LAYERS[0]}.to_q_.0.weight"] = torch.zeros(8, 32)

    rewrite(saved_sd[2], tmp_path / "shrunk.safetensors", shrink)
    unet = tiny_unet()
    with pytest.raises(ValueError, match=rf"wrong shapes: {SD_LAYERS[0]}.to_q_.0.weight: expected shape \(32, 32\), got \(8, 32\)"):
        linearize(unet, weights=tmp_path / "shrunk.safetensors")
    assert all(type(a.processor) is AttnProcessor2_0 for a in attentions(unet).values())  # left as it was


def test_handle_load_of_another_feature_width_is_refused(saved_sd, tmp_path):
    other = linearize(tiny_unet(), feature_dim="d/16").save(tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match=r"to_q_.0.weight: expected shape \(32, 32\), got \(2, 32\)"):
        saved_sd[1].load(other)


def test_newer_format_version_is_refused(saved_sd, tmp_path):
    config = json.loads(safe_open(str(saved_sd[2]), framework="pt").metadata()["visionlin.linfusion"])
    save_file(load_file(str(saved_sd[2])), str(tmp_path / "v2.safetensors"),
              metadata={"visionlin.linfusion": json.dumps({**config, "format_version": 2})})
    with pytest.raises(ValueError, match="format version 2"):
        linearize(tiny_unet(), weights=tmp_path / "v2.safetensors")


def test_a_file_of_other_weights_is_refused(tmp_path):
    tiny_unet().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="neither a visionlin linearize file .* nor in the official LinFusion layout"):
        linearize(tiny_unet(), weights=tmp_path / "diffusion_pytorch_model.safetensors")


def test_missing_weights_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        linearize(tiny_unet(), weights=tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="folder without LinFusion weights"):
        linearize(tiny_unet(), weights=tmp_path)


def test_weights_fix_the_shapes_so_feature_dim_and_init_are_refused(saved_sd):
    with pytest.raises(ValueError, match="leave feature_dim and init at their defaults"):
        linearize(tiny_unet(), weights=saved_sd[2], feature_dim="d/16")


# ---------------------------------------------------------------- official LinFusion weights

def official_layer(attn: Attention, mid: int) -> Attention:
    """What the official LinFusion registers per attn1: a default diffusers Attention of the layer's width and
    heads, plus feature MLPs ``to_q_`` / ``to_k_`` = Sequential(Linear, LayerNorm, LeakyReLU, Linear)."""
    d = attn.to_q.weight.shape[0]
    layer = Attention(query_dim=d, out_dim=d, dim_head=d // attn.heads)
    layer.to_q_ = nn.Sequential(nn.Linear(d, mid), nn.LayerNorm(mid), nn.LeakyReLU(), nn.Linear(mid, d))
    layer.to_k_ = nn.Sequential(nn.Linear(d, mid), nn.LayerNorm(mid), nn.LeakyReLU(), nn.Linear(mid, d))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, d ** -0.5)
    return layer.eval()


class OfficialForward(nn.Module):
    """The paper's formula written out, with the sqrt(N) split of the official code; a reference only."""

    def __init__(self, layer: Attention):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        L, x, n = self.layer, hidden_states, hidden_states.shape[1]
        heads = lambda t: t.unflatten(-1, (L.heads, -1)).transpose(1, 2)  # noqa: E731
        q = F.elu(heads(L.to_q(x + L.to_q_(x)))) + 1
        k = F.elu(heads(L.to_k(x + L.to_k_(x)))) + 1
        v = heads(L.to_v(x))
        z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
        kv = (k.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)
        return L.to_out[0]((q @ kv / z).transpose(1, 2).flatten(2))


def hub_snapshot(cache, repo):
    """The snapshot folder huggingface_hub's cache layout gives ``repo`` at main (refs/main -> snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    return folder / "snapshots" / commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode (HF_HUB_OFFLINE=1): no request leaves the machine."""
    import huggingface_hub
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("sdxl, scale, form", [(False, 1, "safetensors"), (True, 16, "repo folder"), (False, 1, "fp16 .bin"),
                                               (True, 16, "hub id")])
def test_official_layout_loads_and_reproduces_the_official_model(sdxl, scale, form, tmp_path, offline_hub):
    reference = tiny_unet(sdxl=sdxl)
    names = [n for n, m in reference.named_modules() if isinstance(m, Attention) and "attn1" in n]  # the official rule
    layers = [official_layer(attentions(reference)[n], attentions(reference)[n].to_q.weight.shape[0] // scale) for n in names]
    if form == "fp16 .bin":
        for p in (p for layer in layers for p in layer.parameters()):
            p.data = p.data.half().float()
    official = nn.Module()
    for i, layer in enumerate(layers):
        official.add_module(str(i), layer)
    state = official.state_dict()
    assert "0.to_q_.3.weight" in state and "0.to_out.0.bias" in state and "0.to_q.bias" not in state
    if form == "safetensors":
        path = tmp_path / "linfusion.safetensors"
        save_file(state, str(path))
    elif form == "fp16 .bin":
        path = tmp_path / "linfusion.bin"
        torch.save({k: t.half() for k, t in state.items()}, path)
    else:
        path = hub_snapshot(offline_hub, "Yuanshi/LinFusion-XL") if form == "hub id" else tmp_path / "LinFusion-XL"
        path.mkdir(exist_ok=True)
        save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
        modules = [{"module_name": n, "dim_n": layer.to_q.weight.shape[0], "heads": layer.heads,
                    "projection_mid_dim": layer.to_q.weight.shape[0] // scale} for n, layer in zip(names, layers)]
        (path / "config.json").write_text(json.dumps({"_class_name": "LinFusion", "modules_list": modules}))
    for name, layer in zip(names, layers):  # the official install: module replacement, fine for a reference
        parent, attr = name.rsplit(".", 1)
        setattr(reference.get_submodule(parent), attr, OfficialForward(layer))

    unet = tiny_unet(sdxl=sdxl)
    handle = linearize(unet, weights="Yuanshi/LinFusion-XL" if form == "hub id" else path)
    assert list(handle.layers) == names
    assert {s.feature_dim for s in handle.layers.values()} == {64 // scale} | ({32 // scale} if not sdxl else set())
    inputs = unet_inputs(unet)
    torch.testing.assert_close(run(unet, inputs), run(reference, inputs), rtol=1e-5, atol=1e-5)


def official_sd_file(tmp_path, unet=None):
    unet = unet or tiny_unet()
    official = nn.Module()
    for i, (name, attn) in enumerate((n, a) for n, a in attentions(unet).items() if "attn1" in n):
        official.add_module(str(i), official_layer(attn, attn.query_dim))
    save_file(official.state_dict(), str(tmp_path / "linfusion.safetensors"))
    return tmp_path / "linfusion.safetensors"


def test_a_hub_id_missing_from_the_offline_cache_is_named(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"'Yuanshi/LinFusion-1-5' are not a local path, and the Hugging Face "
                                                r"hub repo could not be fetched"):
        linearize(tiny_unet(), weights="Yuanshi/LinFusion-1-5")
    with pytest.raises(FileNotFoundError, match=r"official: Yuanshi/LinFusion-1-5, Yuanshi/LinFusion-2-1"):
        linearize(tiny_unet(), weights="someone/not-linfusion")


def test_official_weights_for_another_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match="layer indices 0, 1, 2, 3, but DiTTransformer2DModel has 2 self-attention layers"):
        linearize(tiny_dit(), weights=official_sd_file(tmp_path))


def test_official_config_naming_other_layers_is_refused(tmp_path):
    folder = tmp_path / "LinFusion-1-5"
    folder.mkdir()
    official_sd_file(tmp_path).rename(folder / "diffusion_pytorch_model.safetensors")
    swapped = [SD_LAYERS[0], SD_LAYERS[2], SD_LAYERS[1], SD_LAYERS[3]]
    (folder / "config.json").write_text(json.dumps({"modules_list": [{"module_name": n} for n in swapped]}))
    with pytest.raises(ValueError, match=f"layer 1 is '{SD_LAYERS[2]}', but UNet2DConditionModel's layer 1 is '{SD_LAYERS[1]}'"):
        linearize(tiny_unet(), weights=folder)


def test_official_file_without_feature_mlps_is_refused(tmp_path):
    state = {k: t for k, t in load_file(str(official_sd_file(tmp_path))).items() if "to_q_" not in k and "to_k_" not in k}
    save_file(state, str(tmp_path / "no_mlp.safetensors"))
    with pytest.raises(ValueError, match=r"layer 0 has no feature MLP .*projection_mid_dim=-1"):
        linearize(tiny_unet(), weights=tmp_path / "no_mlp.safetensors")


def test_official_file_with_wrong_dims_is_refused(tmp_path):
    state = load_file(str(official_sd_file(tmp_path)))
    state["3.to_v.weight"] = torch.zeros(32, 64)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=rf"{SD_LAYERS[3]}.to_v.weight: expected shape \(64, 64\), got \(32, 64\)"):
        linearize(tiny_unet(), weights=tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- packaging

def test_import_without_diffusers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    for name in ("visionlin.diffusion", "visionlin.diffusion.linfusion", "visionlin.diffusion.lindit"):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"pip install visionlin\[diffusion\]"):
        importlib.import_module("visionlin.diffusion")
