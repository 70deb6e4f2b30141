#!/usr/bin/env python
"""Distil LinFusion linear attention into a diffusers pipeline's denoiser from its own softmax-attention teacher.

    python tools/distill.py --pipeline sd-2-1/ --data laion_aesthetic/ --output-dir runs/linfusion_sd21 \\
        --resolution 768 --batch-size 6 --gradient-accumulation-steps 2 --mixed-precision bf16
    python tools/distill.py --pipeline sd-1-5/ --prompts prompts.txt --output-dir runs/sd15 --teacher-steps 25
    python tools/distill.py --pipeline sdxl-base-1.0/ --prompts prompts.txt --output-dir runs/sdxl --feature-dim d/16 \\
        --resolution 1024 --mixed-precision bf16
    python tools/distill.py --pipeline pixart-alpha-512/ --data captioned_images/ --output-dir runs/pixart
    python tools/distill.py --pipeline dit-xl-2-256/ --prompts classes.txt --output-dir runs/dit   # class ids/names
    python tools/distill.py ... --resume                      # continue from the latest checkpoint in --output-dir
    accelerate launch --num-processes 8 tools/distill.py ... --mixed-precision bf16      # 8 GPUs (DDP)

Student and teacher come from one local pipeline folder (written by ``pipe.save_pretrained``; nothing is
downloaded). The student is its denoiser with LinFusion attention on every self-attention layer
(``visionlin.diffusion.linearize``); only those weights train. The teacher is an untouched, frozen copy.
Supported: StableDiffusionPipeline (SD 1.x / 2.x UNets), StableDiffusionXLPipeline (conditioned as SDXL's own
training does: both text encoders, the pooled embedding, and size/crop time ids of the uncropped square training
image), PixArtAlphaPipeline / PixArtSigmaPipeline (T5 captions with their attention mask, used as given), and
DiTPipeline with a DiTTransformer2DModel (class labels instead of captions). Other pipelines are refused with
their class named.

Loss (LinFusion's): MSE(student, target) + 0.5 MSE(student, teacher) + 0.5 x the mean over self-attention layers
of MSE(student layer output, teacher layer output), at timesteps uniform in [0, num_train_timesteps) and with
target eps or v as the scheduler's prediction_type says. DiT and PixArt predict eps and a learned variance: the
target term takes the eps channels, the teacher term the whole output (LiT's hybrid distillation).

Data, exactly one of:
  --data DIR      images (.png .jpg .jpeg .webp .bmp; sub-folders too) with captions in DIR/metadata.jsonl, one
                  JSON object per image and line, the convention of Hugging Face's imagefolder:
                      {"file_name": "cats/001.png", "text": "a cat asleep on a sofa"}
                  For DiT "text" is a class id or one of the pipeline's label names. Images are resized (shorter
                  side) and centre-cropped to --resolution; --eval-size of them are held out for evaluation.
  --prompts FILE  one prompt per line (DiT: a class id or label name). Before training the teacher generates
                  --samples-per-prompt latents per prompt with --teacher-steps steps, and --eval-size more with
                  another seed for evaluation; they are cached in OUTPUT/teacher_samples.safetensors.

Written to --output-dir (by the main process; every file atomically):
  log.csv                      per optimizer step the loss terms and lr; at step 0 (before training), every
                               --eval-every steps and at the end also eval_mse, the student-teacher MSE of the
                               noise prediction on a fixed held-out batch (fixed latents, timesteps and noise)
  loss_curve.png               those curves (log scale), at the end
  samples/teacher.png          the teacher's images of the first --num-samples prompts/classes (fixed seed), and
  samples/step_XXXXXXXX.png    the student's, every --sample-every steps and at the end
  checkpoints/step_XXXXXXXX/   every --checkpoint-every steps and at the end, the last --keep-checkpoints kept:
                               student.safetensors and training_state.pt (optimizer, lr schedule, step, RNG)
  student.safetensors          the result, for linearize(pipe, weights="student.safetensors")
``--resume`` restores a checkpoint and continues to the same --max-steps with the same data order and random
streams as an uninterrupted run (the options that fix them must not change).
"""
from __future__ import annotations

import argparse
import copy
import csv
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, gather_object
from diffusers import DDPMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from tqdm.auto import tqdm

from visionlin.diffusion import LinearizedAttention, linearize
from visionlin.diffusion.tools_common import (FAMILIES, InputError, atomic_write, class_id, image_grid,
                                              load_pipeline, native_size, pipeline_family, run_pipeline, save_png,
                                              size_multiple)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
TEACHER_CACHE = "teacher_samples.safetensors"
LOG_COLUMNS = ["step", "loss", "loss_target", "loss_teacher", "loss_attention", "lr", "eval_mse"]
LOSS_TERMS = LOG_COLUMNS[1:5]
CHECKPOINT_DIR = re.compile(r"step_(\d+)")
STUDENT_FILE, STATE_FILE = "student.safetensors", "training_state.pt"
# the options that fix the data, their order, the random streams and the optimizer: a resumed run must repeat them
RUN_KEYS = ("pipeline", "data", "prompts", "resolution", "samples_per_prompt", "teacher_steps", "guidance_scale",
            "eval_size", "caption_dropout", "batch_size", "gradient_accumulation_steps", "seed", "num_processes",
            "feature_dim", "lr", "weight_decay", "lr_warmup_steps")
# the denoiser class with softmax self-attention, by pipeline family
TEACHERS = {"sd": UNet2DConditionModel, "sdxl": UNet2DConditionModel, "pixart": PixArtTransformer2DModel,
            "dit": DiTTransformer2DModel}
Condition = Union[str, int]  # a caption or a class id (DiT)


# ----------------------------------------------------------------------------- command line
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def feature_dim(text: str) -> Union[int, str, None]:
    return None if text == "none" else int(text) if text.isdigit() else text


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--pipeline", required=True, help="local diffusers pipeline folder (teacher and student base)")
    p.add_argument("--output-dir", required=True, help="where logs, samples, checkpoints and the student go")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help=f"image folder with captions in {METADATA_FILE}")
    source.add_argument("--prompts", help="text file, one prompt (DiT: class id or name) per line")

    s = p.add_argument_group("student")
    s.add_argument("--feature-dim", type=feature_dim, default="d",
                   help="feature-MLP width: 'd' (default), 'd/<k>' (LinFusion-XL: d/16), an int, or 'none'")
    s.add_argument("--init", choices=("teacher", "fresh"), default="teacher",
                   help="start q/k/v/out from the teacher's attention (default) or from fresh layers")
    s.add_argument("--weights", help="start from these linear-attention weights (ours or official LinFusion)")

    d = p.add_argument_group("data")
    d.add_argument("--resolution", type=positive_int,
                   help="training image side in pixels (default: the denoiser's sample_size x the VAE factor)")
    d.add_argument("--samples-per-prompt", type=positive_int, default=1, help="--prompts: teacher samples per prompt")
    d.add_argument("--teacher-steps", type=positive_int, default=25, help="--prompts: teacher sampling steps")
    d.add_argument("--guidance-scale", type=float, help="CFG scale of teacher samples and sample grids (default: the "
                                                        "pipeline's own: 7.5 SD, 5.0 SDXL, 4.5 PixArt, 4.0 DiT)")
    d.add_argument("--caption-dropout", type=probability, default=0.0,
                   help="probability of training on the empty caption (DiT: the null class) instead")
    d.add_argument("--eval-size", type=positive_int, default=4, help="held-out evaluation batch size")
    d.add_argument("--num-workers", type=non_negative_int, default=2, help="data loader worker processes")

    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=positive_int, default=10000, help="optimizer steps in all")
    o.add_argument("--batch-size", type=positive_int, default=4, help="per process and micro-batch")
    o.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    o.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    o.add_argument("--lr-warmup-steps", type=non_negative_int, default=0, help="linear warm-up, then constant")
    o.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="autocast dtype; the trained weights stay float32 (fp16 needs CUDA)")
    o.add_argument("--seed", type=int, default=0)

    b = p.add_argument_group("bookkeeping")
    b.add_argument("--checkpoint-every", type=positive_int, default=500)
    b.add_argument("--keep-checkpoints", type=positive_int, default=3, help="how many of the latest to keep")
    b.add_argument("--resume", nargs="?", const="latest",
                   help="continue from the latest checkpoint in --output-dir, or from the checkpoint folder given")
    b.add_argument("--eval-every", type=positive_int, default=100)
    b.add_argument("--sample-every", type=non_negative_int, default=500, help="0: no sample grids")
    b.add_argument("--num-samples", type=positive_int, default=4, help="images per sample grid")
    b.add_argument("--sample-steps", type=positive_int, default=25, help="sampling steps of the sample grids")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data
def read_image_folder(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of an imagefolder-style dataset, checked for what would fail mid-training."""
    if not folder.is_dir():
        raise InputError(f"--data {folder} is not a folder")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InputError(f"--data {folder} holds no images ({' '.join(IMAGE_SUFFIXES)})")
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise InputError(f"--data {folder} has no {METADATA_FILE} with the captions (one line per image: "
                         '{"file_name": "001.png", "text": "a caption"})')
    captions: dict[str, str] = {}
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, text = entry["file_name"], entry["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{metadata} line {number}: expected a JSON object with \"file_name\" and \"text\" "
                             f"({type(e).__name__}: {e})") from e
        if not isinstance(name, str) or not isinstance(text, (str, int)):
            raise InputError(f"{metadata} line {number}: \"file_name\" must be a string and \"text\" a string")
        if not (folder / name).is_file():
            raise InputError(f"{metadata} line {number}: {name} is not a file in {folder}")
        captions[Path(name).as_posix()] = str(text)
    uncaptioned = [p.relative_to(folder).as_posix() for p in images if p.relative_to(folder).as_posix() not in captions]
    if uncaptioned:
        shown = ", ".join(uncaptioned[:5]) + (f" (+{len(uncaptioned) - 5} more)" if len(uncaptioned) > 5 else "")
        raise InputError(f"--data {folder}: no caption in {METADATA_FILE} for {shown}")
    for image in images:  # headers only: reading every file in full would hold up the start of a large run
        try:
            Image.open(image).close()
        except Exception as e:  # PIL raises several types for broken files
            raise InputError(f"--data {folder}: unreadable image {image} ({type(e).__name__}: {e})") from e
    return [(image, captions[image.relative_to(folder).as_posix()]) for image in images]


class ImageCaptionDataset(Dataset):
    """Images resized and centre-cropped to a square, in [-1, 1], with their conditions."""

    def __init__(self, files: Sequence[Path], conditions: Sequence[Condition], resolution: int):
        self.files, self.conditions = list(files), list(conditions)
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, index: int) -> torch.Tensor:
        try:
            with Image.open(self.files[index]) as image:
                return self.transform(image.convert("RGB"))
        except OSError as e:  # a file whose header was fine but whose data is broken
            raise InputError(f"unreadable image {self.files[index]} ({e})") from e

    def __getitem__(self, index: int) -> dict:
        return {"pixels": self.pixels(index), "condition": self.conditions[index]}


class LatentDataset(Dataset):
    """Teacher-generated latents with the conditions they were generated for."""

    def __init__(self, latents: torch.Tensor, conditions: Sequence[Condition]):
        self.latents, self.conditions = latents, list(conditions)

    def __len__(self) -> int:
        return len(self.conditions)

    def __getitem__(self, index: int) -> dict:
        return {"latents": self.latents[index], "condition": self.conditions[index]}


class EpochShuffle(Sampler):
    """A permutation per epoch from (seed, epoch) alone, so a resumed run can replay any epoch's order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"--prompts {path} is not a file")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {path} has no prompts (one per line)")
    return prompts


# ----------------------------------------------------------------------------- the two models
@contextmanager
def recorded_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The outputs of the named submodules during the forward passes run inside the block."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: outputs.__setitem__(name, output)) for name in names]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def text_conditioning(pipe, family: str, captions: Sequence[str], size: int, device) -> dict:
    """The denoiser's keyword inputs for ``captions`` on square ``size`` px images, as its pipeline makes them."""
    if family == "sd":
        return {"encoder_hidden_states": pipe.encode_prompt(list(captions), device, 1, False)[0]}
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(list(captions), device=device, do_classifier_free_guidance=False)
        # SDXL's micro-conditioning: original size, crop top-left, target size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=device)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(len(captions), -1)}}
    length = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    embeds, mask, _, _ = pipe.encode_prompt(list(captions), do_classifier_free_guidance=False, device=device,
                                            clean_caption=False, max_sequence_length=length)
    added = {"resolution": None, "aspect_ratio": None}
    if pipe.transformer.use_additional_conditions:  # PixArt-alpha 1024: size and aspect-ratio embeddings
        resolution = torch.tensor([[size, size]], dtype=embeds.dtype, device=device)
        added = {"resolution": resolution.expand(len(captions), -1),
                 "aspect_ratio": torch.ones(len(captions), 1, dtype=embeds.dtype, device=device)}
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "added_cond_kwargs": added}


class EvalBatch(NamedTuple):
    noisy: torch.Tensor
    timesteps: torch.Tensor
    conditioning: dict


class Distiller:
    """The teacher, the student and the pipeline around them: conditioning, losses, evaluation, sample grids."""

    def __init__(self, accelerator: Accelerator, pipe, family: str, teacher: nn.Module, student: nn.Module,
                 handle: LinearizedAttention, generator: torch.Generator, args: argparse.Namespace):
        self.accelerator, self.pipe, self.family = accelerator, pipe, family
        self.teacher, self.student, self.handle = teacher, student, handle
        self.layers = list(handle.layers)
        self.generator, self.args = generator, args
        self.device = accelerator.device
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # add_noise, get_velocity
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.num_timesteps = self.noise_scheduler.config.num_train_timesteps

    def conditioning(self, conditions: Union[Sequence[str], torch.Tensor], drop: torch.Tensor) -> dict:
        """The denoiser's conditioning inputs (text embeddings and what goes with them, or DiT's class ids);
        ``drop`` picks the conditions replaced by the empty caption / null class."""
        drop = drop.tolist()
        if self.family == "dit":
            null = self.teacher.config.num_embeds_ada_norm
            return {"class_labels": torch.tensor([null if dropped else int(c) for c, dropped in zip(conditions, drop)],
                                                 device=self.device)}
        captions = ["" if dropped else caption for caption, dropped in zip(conditions, drop)]
        with torch.no_grad():
            return text_conditioning(self.pipe, self.family, captions, self.args.resolution, self.device)

    @staticmethod
    def denoise(model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        return model(noisy, timestep=timesteps, **conditioning).sample

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, sample: bool) -> torch.Tensor:
        vae = self.pipe.vae
        posterior = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        latents = posterior.sample(generator=self.generator) if sample else posterior.mean
        return latents.float() * vae.config.scaling_factor

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """LinFusion's loss on one micro-batch; every random draw comes from ``self.generator``."""
        if "latents" in batch:
            latents = batch["latents"].to(self.device)
        else:
            latents = self.encode_images(batch["pixels"], sample=True)
        size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        timesteps = torch.randint(0, self.num_timesteps, (size,), generator=self.generator, device=self.device)
        drop = torch.rand(size, generator=self.generator, device=self.device) < self.args.caption_dropout
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise,
                                                                                                   timesteps)
        conditioning = self.conditioning(batch["condition"], drop)
        with torch.no_grad(), self.accelerator.autocast(), recorded_outputs(self.teacher, self.layers) as taught:
            teacher_out = self.denoise(self.teacher, noisy, timesteps, conditioning)
        with self.accelerator.autocast(), recorded_outputs(self.unwrapped, self.layers) as learned:
            student_out = self.denoise(self.student, noisy, timesteps, conditioning)
        loss_target = F.mse_loss(student_out[:, :latents.shape[1]].float(), target.float())
        loss_teacher = F.mse_loss(student_out.float(), teacher_out.float())
        loss_attention = torch.stack([F.mse_loss(learned[n].float(), taught[n].float()) for n in self.layers]).mean()
        return {"loss": loss_target + 0.5 * loss_teacher + 0.5 * loss_attention, "loss_target": loss_target,
                "loss_teacher": loss_teacher, "loss_attention": loss_attention}

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student)

    def eval_batch(self, latents: torch.Tensor, conditions: Sequence[Condition]) -> EvalBatch:
        """Fixed noise and timesteps spread over [0, T) for held-out latents, from the seed alone."""
        generator = torch.Generator().manual_seed(self.args.seed + 1)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        timesteps = torch.linspace(0, self.num_timesteps - 1, len(latents)).round().long().to(self.device)
        keep = torch.zeros(len(latents), dtype=torch.bool)
        noisy = self.noise_scheduler.add_noise(latents.to(self.device), noise, timesteps)
        return EvalBatch(noisy, timesteps, self.conditioning(conditions, keep))

    @torch.no_grad()
    def eval_mse(self, batch: EvalBatch) -> float:
        """Student-teacher MSE of the noise prediction (a DiT's eps channels) on the fixed batch."""
        with self.accelerator.autocast():
            student = self.denoise(self.unwrapped, batch.noisy, batch.timesteps, batch.conditioning)
            teacher = self.denoise(self.teacher, batch.noisy, batch.timesteps, batch.conditioning)
        channels = batch.noisy.shape[1]
        return F.mse_loss(student[:, :channels].float(), teacher[:, :channels].float()).item()


@torch.no_grad()
def sample_grid(accelerator: Accelerator, pipe, family: str, conditions: Sequence[Condition], path: Path,
                args: argparse.Namespace) -> None:
    """The pipeline's images of ``conditions`` with a fixed seed, as one grid PNG."""
    with accelerator.autocast():
        images = run_pipeline(pipe, family, conditions, height=args.resolution, width=args.resolution,
                              steps=args.sample_steps, guidance_scale=args.guidance_scale,
                              generator=torch.Generator().manual_seed(args.seed))
    save_png(image_grid(images), path)


@torch.no_grad()
def teacher_latents(accelerator: Accelerator, pipe, family: str, conditions: Sequence[Condition], seed: int,
                    args: argparse.Namespace, desc: str) -> torch.Tensor:
    """Latents the (still untouched) pipeline generates for ``conditions``, in diffusion space, on the CPU.

    Every process generates its share and receives all of them; sample i has its own seed (drawn from ``seed``),
    so the result does not depend on the number of processes. DiTPipeline has no latent output, so its images are
    encoded back (posterior mean)."""
    seeds = torch.randint(2 ** 62, (len(conditions),), generator=torch.Generator().manual_seed(seed)).tolist()
    chunks = []
    with accelerator.split_between_processes(list(range(len(conditions)))) as mine:
        for start in tqdm(range(0, len(mine), args.batch_size), desc=desc, dynamic_ncols=True,
                          disable=not accelerator.is_main_process):
            batch = mine[start:start + args.batch_size]
            with accelerator.autocast():
                out = run_pipeline(pipe, family, [conditions[i] for i in batch], height=args.resolution,
                                   width=args.resolution, steps=args.teacher_steps,
                                   guidance_scale=args.guidance_scale,
                                   output_type="pt" if family == "dit" else "latent",
                                   generator=[torch.Generator().manual_seed(seeds[i]) for i in batch])
                if family == "dit":
                    vae = pipe.vae
                    out = vae.encode((out * 2 - 1).to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
            chunks.append(out.float().cpu().contiguous())
    return torch.cat([chunk for part in gather_object([chunks]) for chunk in part])


def cached_teacher_samples(accelerator: Accelerator, pipe, family: str, train: Sequence[Condition],
                           evaluation: Sequence[Condition], out: Path, args: argparse.Namespace
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and evaluation latents from the teacher, generated once and cached in the output folder (which
    every process must see)."""
    cache = out / TEACHER_CACHE
    recipe = json.dumps({"pipeline": str(Path(args.pipeline).resolve()), "train": list(train),
                         "eval": list(evaluation), "resolution": args.resolution, "steps": args.teacher_steps,
                         "guidance_scale": args.guidance_scale, "seed": args.seed})
    if cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            stored = (f.metadata() or {}).get("recipe")
        if stored == recipe:
            tensors = load_file(str(cache))
            return tensors["train"], tensors["eval"]
        accelerator.print(f"{cache} was generated with other settings; generating the teacher samples again")
    train_latents = teacher_latents(accelerator, pipe, family, train, args.seed, args, "teacher samples")
    eval_latents = teacher_latents(accelerator, pipe, family, evaluation, args.seed + 1, args, "teacher eval samples")
    if accelerator.is_main_process:
        with atomic_write(cache) as tmp:
            save_file({"train": train_latents, "eval": eval_latents}, str(tmp), metadata={"recipe": recipe})
    return train_latents, eval_latents


# ----------------------------------------------------------------------------- checkpoints and logs
def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` by step (temporary folders start with a dot and never match)."""
    found = []
    for path in root.glob("step_*") if root.is_dir() else ():
        match = CHECKPOINT_DIR.fullmatch(path.name)
        if match and (path / STUDENT_FILE).is_file() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_checkpoint(root: Path, step: int, handle: LinearizedAttention, state: dict, keep: int) -> Path:
    """Build the checkpoint in a temporary folder beside its final name and rename it into place, then prune."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        handle.save(tmp / STUDENT_FILE)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():  # a run resumed from an older checkpoint passes the step again: the new one wins
            stale = tmp.with_suffix(".stale")
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def checkpoint_to_resume(accelerator: Accelerator, out: Path, resume: Optional[str]) -> Optional[Path]:
    checkpoints = list_checkpoints(out / "checkpoints")
    if resume is None:
        if checkpoints:
            raise InputError(f"--output-dir {out} holds checkpoints of an earlier run; pass --resume to continue it "
                             "or choose another --output-dir")
        return None
    if resume == "latest":
        if not checkpoints:
            accelerator.print(f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting from scratch")
            return None
        return checkpoints[-1][1]
    path = Path(resume)
    if not ((path / STUDENT_FILE).is_file() and (path / STATE_FILE).is_file()):
        raise InputError(f"--resume {path} is not a checkpoint folder (expected {STUDENT_FILE} and {STATE_FILE})")
    return path


def read_log(path: Path) -> list[dict[str, Optional[float]]]:
    """The complete rows of a log (a row cut off by a crash is dropped)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({k: float(row[k]) if row[k] else None for k in LOG_COLUMNS})
            except (KeyError, TypeError, ValueError):
                continue
    return rows


class TrainingLog:
    """log.csv: one row per optimizer step (and step 0); a resumed run keeps the rows up to its step."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        kept = []
        if resume_step is not None and path.exists():
            kept = [row for row in read_log(path) if row["step"] <= resume_step]
        with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: self.format(k, v) for k, v in row.items()} for row in kept)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, LOG_COLUMNS, lineterminator="\n")

    @staticmethod
    def format(key: str, value: Optional[float]) -> str:
        if value is None:
            return ""
        return str(int(value)) if key == "step" else f"{value:.6g}"

    def write(self, **row: Optional[float]) -> None:
        self.writer.writerow({k: self.format(k, row.get(k)) for k in LOG_COLUMNS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def plot_log(log: Path, png: Path, title: str) -> None:
    """The loss terms (moving averages) and the held-out eval MSE against the step, log scale."""
    from matplotlib.figure import Figure

    rows = read_log(log)
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    trained = [r for r in rows if r["loss"] is not None]
    window = max(1, len(trained) // 50)
    for key, label in (("loss", "total loss"), ("loss_target", "target MSE"), ("loss_teacher", "teacher-output MSE"),
                       ("loss_attention", "attention-output MSE")):
        values = torch.tensor([r[key] for r in trained])
        if len(values) >= window:
            smooth = values.unfold(0, window, 1).mean(1)
            ax.plot([r["step"] for r in trained][window - 1:], smooth.tolist(), lw=1.2,
                    label=f"{label} (training, mean of {window})" if window > 1 else f"{label} (training)")
    evaluated = [r for r in rows if r["eval_mse"] is not None]
    ax.plot([r["step"] for r in evaluated], [r["eval_mse"] for r in evaluated], "o-", color="black", lw=1.5, ms=4,
            label="held-out student-teacher noise-prediction MSE")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(png) as tmp:
        fig.savefig(tmp, format="png")


# ----------------------------------------------------------------------------- the run
def check_pipeline(pipe, args: argparse.Namespace) -> str:
    """The pipeline's family, after checking what distillation needs of it; fills in the size and CFG defaults."""
    family = pipeline_family(pipe, "distill.py")
    name = FAMILIES[family].denoiser
    denoiser = getattr(pipe, name)
    if not isinstance(denoiser, TEACHERS[family]):
        raise InputError(f"the pipeline's {name} is a {type(denoiser).__name__}, not a "
                         f"{TEACHERS[family].__name__} with softmax self-attention to distil from")
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise InputError(f"the pipeline's scheduler predicts {prediction!r}; distill.py trains 'epsilon' or "
                         "'v_prediction' models")
    native = native_size(pipe, family)
    args.resolution = args.resolution or native
    multiple = size_multiple(pipe, family)
    if args.resolution % multiple:
        raise InputError(f"--resolution {args.resolution} is not a multiple of {multiple} (the VAE factor"
                         f"{' x patch size' if FAMILIES[family].denoiser == 'transformer' else ' and 8'} of this "
                         "pipeline)")
    if family == "dit" and args.prompts and args.resolution != native:
        raise InputError(f"--resolution {args.resolution}: DiTPipeline samples only at its transformer's size, "
                         f"{native} px, so teacher samples (--prompts) are that size")
    args.guidance_scale = FAMILIES[family].guidance if args.guidance_scale is None else args.guidance_scale
    return family


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, skipped when it is float32 already (diffusers warns on every cast)."""
    return model if dtype == torch.float32 else model.to(dtype=dtype)


class TrainingData(NamedTuple):
    train: Dataset  # items: {"latents" or "pixels", "condition"}
    eval_conditions: list[Condition]
    eval_latents: Optional[torch.Tensor] = None  # teacher samples; None: encode eval_images
    eval_images: Optional[ImageCaptionDataset] = None


def training_data(accelerator: Accelerator, pipe, family: str, out: Path, args: argparse.Namespace) -> TrainingData:
    """The image folder (less --eval-size held-out images) or the teacher's samples of the prompts."""
    def conditions_of(texts: Sequence[str]) -> list[Condition]:
        return list(texts) if FAMILIES[family].takes_prompts else [class_id(pipe, text) for text in texts]

    if args.data:
        pairs = read_image_folder(Path(args.data))
        if len(pairs) <= args.eval_size:
            raise InputError(f"--data {args.data} has {len(pairs)} images; more than --eval-size {args.eval_size} "
                             "are needed (that many are held out for evaluation)")
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
        held_out, kept = [pairs[i] for i in order[:args.eval_size]], [pairs[i] for i in sorted(order[args.eval_size:])]
        train = ImageCaptionDataset([f for f, _ in kept], conditions_of([t for _, t in kept]), args.resolution)
        evaluation = ImageCaptionDataset([f for f, _ in held_out], conditions_of([t for _, t in held_out]),
                                         args.resolution)
        return TrainingData(train, evaluation.conditions, eval_images=evaluation)
    prompts = conditions_of(read_prompts(Path(args.prompts)))
    train_conditions = [c for c in prompts for _ in range(args.samples_per_prompt)]
    eval_conditions = [prompts[i % len(prompts)] for i in range(args.eval_size)]
    train_latents, eval_latents = cached_teacher_samples(accelerator, pipe, family, train_conditions, eval_conditions,
                                                         out, args)
    return TrainingData(LatentDataset(train_latents, train_conditions), eval_conditions, eval_latents=eval_latents)


def run_config(args: argparse.Namespace, num_processes: int) -> dict:
    values = {**vars(args), "num_processes": num_processes}
    for key in ("pipeline", "data", "prompts"):  # the same folder or file however the path is spelled
        values[key] = values[key] and str(Path(values[key]).resolve())
    return {key: values[key] for key in RUN_KEYS}


def restore(accelerator: Accelerator, checkpoint: Path, config: dict, handle: LinearizedAttention, optimizer,
            lr_schedule, generator: torch.Generator) -> int:
    """Load a checkpoint's weights and training state into the run; returns its step."""
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    changed = [f"{key}: {state['run'].get(key)!r} in the checkpoint, {config[key]!r} now" for key in RUN_KEYS
               if state["run"].get(key) != config[key]]
    if changed:
        raise InputError(f"--resume {checkpoint}: a resumed run must repeat the options that fix its data, their "
                         f"order, its random streams and its optimizer; changed: {'; '.join(changed)}")
    handle.load(checkpoint / STUDENT_FILE)
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    generator.set_state(state["rng"][accelerator.process_index])
    accelerator.print(f"resuming from {checkpoint} at step {state['step']}")
    return state["step"]


def distill(args: argparse.Namespace) -> Path:
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise InputError("--mixed-precision fp16 needs a CUDA GPU (there is no float16 autocast on the CPU here); "
                         "use bf16 or no")
    if args.weights is not None and not Path(args.weights).exists():
        raise InputError(f"--weights {args.weights} does not exist")
    # gradient_accumulation_steps as a plugin: sync_with_dataloader=False keeps every optimizer step at exactly
    # that many micro-batches across epoch ends, so a step number says how much data was consumed (for --resume)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_plugin=
                              GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps,
                                                         sync_with_dataloader=False))
    main_process, device = accelerator.is_main_process, accelerator.device
    out = Path(args.output_dir)
    resume_from = checkpoint_to_resume(accelerator, out, args.resume)
    pipe = load_pipeline(args.pipeline, drop_safety_checker=True)
    family = check_pipeline(pipe, args)
    denoiser = getattr(pipe, FAMILIES[family].denoiser)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[accelerator.mixed_precision]
    frozen = [pipe.vae, *(getattr(pipe, name) for name in FAMILIES[family].text_encoders)]
    for model in [*frozen, denoiser]:
        model.requires_grad_(False).to(device)
    for model in frozen:
        cast(model, weight_dtype)

    # the data and the teacher's grid come from the pipeline before it is linearized
    data = training_data(accelerator, pipe, family, out, args)
    if len(data.train) < args.batch_size * accelerator.num_processes:
        raise InputError(f"{len(data.train)} training samples are fewer than one batch (--batch-size "
                         f"{args.batch_size} x {accelerator.num_processes} processes)")
    sample_conditions = list(dict.fromkeys(data.train.conditions))[:args.num_samples]
    if main_process and args.sample_every and resume_from is None:
        sample_grid(accelerator, pipe, family, sample_conditions, out / "samples" / "teacher.png", args)

    teacher = cast(copy.deepcopy(denoiser), weight_dtype)
    torch.manual_seed(args.seed)  # fresh linear-attention weights come from the global RNG: same seed, same student
    try:
        handle = linearize(denoiser, weights=args.weights, feature_dim=args.feature_dim, init=args.init)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"cannot linearize the student: {e}") from e
    for parameter in handle.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(handle.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = args.lr_warmup_steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    loader = DataLoader(data.train, batch_size=args.batch_size, sampler=EpochShuffle(len(data.train), args.seed),
                        num_workers=args.num_workers, drop_last=True)
    student, optimizer, loader = accelerator.prepare(denoiser, optimizer, loader)
    generator = torch.Generator(device).manual_seed(args.seed + accelerator.process_index)
    distiller = Distiller(accelerator, pipe, family, teacher, student, handle, generator, args)
    eval_latents = data.eval_latents if data.eval_images is None else torch.cat(
        [distiller.encode_images(data.eval_images.pixels(i)[None], sample=False) for i in range(args.eval_size)])
    eval_batch = distiller.eval_batch(eval_latents, data.eval_conditions)

    config = run_config(args, accelerator.num_processes)
    step = 0
    if resume_from is not None:
        step = restore(accelerator, resume_from, config, handle, optimizer, lr_schedule, generator)
    log = TrainingLog(out / "log.csv", step if resume_from is not None else None) if main_process else None
    if main_process and resume_from is None:
        log.write(step=0, eval_mse=distiller.eval_mse(eval_batch))
    progress = tqdm(total=args.max_steps, initial=step, desc="distill", dynamic_ncols=True, disable=not main_process)
    epoch, skip = divmod(step * args.gradient_accumulation_steps, len(loader))
    running = {key: 0.0 for key in LOSS_TERMS}
    started = time.perf_counter()
    while step < args.max_steps:
        loader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            with accelerator.accumulate(student):
                losses = distiller.losses(batch)
                accelerator.backward(losses["loss"])
                optimizer.step()
                optimizer.zero_grad()
            for key in LOSS_TERMS:
                running[key] += losses[key].detach().float() / args.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            lr = lr_schedule.get_last_lr()[0]
            lr_schedule.step()
            step += 1
            terms = {k: accelerator.reduce(v, "mean").item() for k, v in running.items()}
            running = {key: 0.0 for key in LOSS_TERMS}
            last = step == args.max_steps
            if last or step % args.checkpoint_every == 0:
                rng = gather_object([generator.get_state()])  # every process's stream, in process order
                if main_process:
                    state = {"step": step, "optimizer": optimizer.state_dict(),
                             "lr_schedule": lr_schedule.state_dict(),
                             "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
                             "rng": rng, "run": config}
                    write_checkpoint(out / "checkpoints", step, handle, state, args.keep_checkpoints)
            if main_process:
                eval_mse = distiller.eval_mse(eval_batch) if last or step % args.eval_every == 0 else None
                log.write(step=step, lr=lr, eval_mse=eval_mse, **terms)
                if args.sample_every and (last or step % args.sample_every == 0):
                    sample_grid(accelerator, pipe, family, sample_conditions,
                                out / "samples" / f"step_{step:08d}.png", args)
                shown = {"loss": f"{terms['loss']:.4g}"}
                progress.set_postfix(shown if eval_mse is None else {**shown, "eval": f"{eval_mse:.3g}"})
                progress.update(1)
            if last:
                break
        epoch, skip = epoch + 1, 0
    progress.close()
    accelerator.wait_for_everyone()

    result = out / STUDENT_FILE
    if main_process:
        log.close()
        handle.save(result)
        precision = "float32" if args.mixed_precision == "no" else f"{args.mixed_precision} autocast"
        title = (f"LinFusion distillation of {Path(args.pipeline).resolve().name} ({type(denoiser).__name__}, "
                 f"{'images' if args.data else 'teacher samples'}, {args.resolution} px)\n"
                 f"batch {args.batch_size} x {args.gradient_accumulation_steps} accumulated x "
                 f"{accelerator.num_processes} process(es), AdamW lr {args.lr:g}, {precision}")
        plot_log(out / "log.csv", out / "loss_curve.png", title)
        accelerator.print(f"{step} steps ({time.perf_counter() - started:.0f} s this run); student weights: {result}")
    accelerator.end_training()
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        distill(args)
    except InputError as e:
        raise SystemExit(f"distill.py: error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
