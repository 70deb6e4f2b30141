"""Tiny offline diffusers models and pipelines, built from configs (no hub access), for the diffusion tests.

Every builder seeds torch itself, so two calls give identical weights, and returns eval-mode models
(DiT's class-label dropout would otherwise draw from the global RNG).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel,  # noqa: E402
                       DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)

TEXT_DIM = 32


def tiny_unet(sdxl: bool = False, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    kw = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=TEXT_DIM, attention_head_dim=8)
    if sdxl:  # SDXL's conditioning: pooled text embedding + micro-conditioning time ids
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8,
                  transformer_layers_per_block=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return UNet2DConditionModel(**kw).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4).eval()


def tiny_tokenizer(tmp: Path):
    """A CLIPTokenizer from a hand-written byte-level BPE vocabulary (letters, a few merges)."""
    from transformers import CLIPTokenizer
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *[f"{c}</w>" for c in letters],
                                         "ca", "cat</w>", "do", "dog</w>"])}
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
    return CLIPTokenizer.from_pretrained(tmp, model_max_length=16)


def tiny_text_encoder(vocab_size: int, seed: int = 0, hidden: int = TEXT_DIM, projection: bool = False):
    """A CLIP text encoder; ``projection``: with the pooled-output projection (SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=vocab_size, max_position_embeddings=16, projection_dim=TEXT_DIM)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_sd_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionPipeline:
    tok = tiny_tokenizer(Path(tmp) / "tokenizer")
    pipe = StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=tiny_text_encoder(len(tok), seed), tokenizer=tok,
                                   unet=tiny_unet(seed=seed), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL's layout: two text encoders whose penultimate states are concatenated (TEXT_DIM in all) and whose
    second one's pooled projection conditions the UNet with the size/crop time ids."""
    tok = tiny_tokenizer(Path(tmp) / "tokenizer")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(seed), text_encoder=tiny_text_encoder(len(tok), seed, TEXT_DIM // 2),
                                     text_encoder_2=tiny_text_encoder(len(tok), seed + 1, TEXT_DIM // 2, projection=True),
                                     tokenizer=tok, tokenizer_2=tok, unet=tiny_unet(sdxl=True, seed=seed),
                                     scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero").eval()


def tiny_dit_pipeline(seed: int = 0, transformer=None) -> DiTPipeline:
    pipe = DiTPipeline(transformer=transformer if transformer is not None else tiny_dit(seed), vae=tiny_vae(seed),
                       scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), id2label={0: "cat", 1: "dog"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                                    caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
                                    attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()


def tiny_t5_tokenizer():
    """A T5TokenizerFast on a hand-written unigram vocabulary (pieces of a few words, then single letters)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    pieces = ["<pad>", "</s>", "<unk>", "\u2581a", "\u2581cat", "\u2581dog", "\u2581and", "\u2581", *string.ascii_lowercase]
    model = models.Unigram([(p, 0.0 if i < 3 else -1.0 - 0.01 * i) for i, p in enumerate(pieces)], unk_id=2)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=64)


def tiny_t5_encoder(vocab_size: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()


def tiny_pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    tok = tiny_t5_tokenizer()
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=tiny_t5_encoder(len(tok), seed), vae=tiny_vae(seed),
                               transformer=tiny_pixart(seed), scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
