#!/usr/bin/env python
"""Text-to-image (SD, SDXL, PixArt) or class-to-image (DiT, LinDiT) with a linearized pipeline at any resolution;
writes PNGs.

    python tools/generate.py --pipeline sd-1-5/ --weights runs/sd15/student.safetensors \\
        --prompt "a red fox in fresh snow" --height 2048 --width 2048 --vae-tiling --device cuda
    python tools/generate.py --pipeline sd-2-1/ --weights LinFusion-2-1/ --prompt "a lighthouse" "a harbour" \\
        --num-images 4 --out renders/
    python tools/generate.py --pipeline sdxl-base-1.0/ --weights LinFusion-XL/ --prompt "a castle at dusk" \\
        --height 2048 --width 3072 --vae-tiling
    python tools/generate.py --pipeline pixart-alpha-512/ --weights runs/pixart/student.safetensors \\
        --prompt "an astronaut riding a horse" --height 1024 --width 1536
    python tools/generate.py --pipeline dit-xl-2-256/ --weights runs/dit/student.safetensors \\
        --class-labels 207 "golden retriever" --height 512 --width 512
    python tools/generate.py --pipeline my-lindit-pipeline/ --class-labels 1 --height 1024 --width 1024

Pipelines: a local folder (``pipe.save_pretrained``; nothing is downloaded) holding a StableDiffusionPipeline
(SD 1.x / 2.x), a StableDiffusionXLPipeline, a PixArtAlphaPipeline or PixArtSigmaPipeline (all --prompt), or a
DiTPipeline (--class-labels: ids or the pipeline's label names) whose transformer is a DiT or a LinDiT.
--weights are linear-attention weights for ``linearize`` (from tools/distill.py, or an official LinFusion file or
folder); without them the pipeline runs as saved: softmax attention (the teacher), or a LinDiT, whose attention is
linear already.

Sizes: --height and --width must be multiples of the VAE factor (x the patch size for DiT and PixArt; UNet
pipelines also need 8). PixArt generates at exactly the size asked (its aspect-ratio binning is off, captions are
used as given). DiT pipelines generate squares; for another size than the transformer's the transformer is reloaded
with that ``sample_size`` (a LinDiT keeps its trained position layout, see visionlin/diffusion/lindit.py).

Memory: images are generated one at a time (so VAE slicing would change nothing); --vae-tiling decodes in
overlapping tiles (very large images), --cpu-offload (CUDA only) keeps every submodule on the GPU only while it
runs, --dtype float16 / bfloat16 halves the weights and activations.

Written to --out: ``<k>_<prompt or class>_seed<seed>_<W>x<H>.png`` for the k-th image (seed --seed + k, so any
single image can be made again alone) and ``grid.png`` with all of them (shrunk to at most 512 px a side each).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from visionlin.diffusion import LinDiTTransformer2DModel, linearize
from visionlin.diffusion.tools_common import (FAMILIES, InputError, class_id, image_grid, load_pipeline, native_size,
                                              pipeline_family, run_pipeline, save_png, size_multiple,
                                              vae_scale_factor)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRID_TILE = 512  # the grid is an overview: a grid of full-size 16K images would not fit in memory


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--pipeline", required=True, help="local diffusers pipeline folder")
    p.add_argument("--weights", help="linear-attention weights (a distill.py student or official LinFusion)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", nargs="+", help="SD, SDXL, PixArt: one or more prompts")
    what.add_argument("--class-labels", nargs="+", help="DiT: class ids or label names")
    p.add_argument("--height", type=int, help="pixels (default: the denoiser's native size)")
    p.add_argument("--width", type=int, help="pixels (default: the denoiser's native size)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance-scale", type=float,
                   help="CFG scale (default: the pipeline's own: 7.5 SD, 5.0 SDXL, 4.5 PixArt, 4.0 DiT)")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt / class")
    p.add_argument("--out", default="generated", help="output folder")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="weights and activations (default: float16 on CUDA, "
                                                          "float32 on CPU)")
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (memory for very large images)")
    p.add_argument("--cpu-offload", action="store_true",
                   help="sequential CPU offload: least GPU memory, slowest (CUDA only)")
    args = p.parse_args(argv)
    for name in ("steps", "num_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    return args


def check_size(pipe, family: str, height: int, width: int) -> None:
    multiple = size_multiple(pipe, family)
    wrong = [f"--{name} {value}" for name, value in (("height", height), ("width", width))
             if value < multiple or value % multiple]
    if wrong:
        why = ("the VAE factor x the patch size" if FAMILIES[family].denoiser == "transformer"
               else "the VAE factor, and UNet pipelines need 8")
        raise InputError(f"{' and '.join(wrong)}: sizes must be positive multiples of {multiple} ({why})")
    if family == "dit" and height != width:
        raise InputError(f"DiTPipeline generates square images; got --height {height} --width {width}")


def build_pipeline(args: argparse.Namespace):
    """The pipeline on its device, resized (DiT), linearized when --weights are given, memory options on.

    Returns (pipe, family)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if args.cpu_offload and args.device != "cuda":
        raise InputError("--cpu-offload needs --device cuda (it moves submodules to the GPU as they run)")
    dtype = DTYPES[args.dtype]
    pipe = load_pipeline(args.pipeline, dtype=dtype)
    family = pipeline_family(pipe, "generate.py")
    if FAMILIES[family].takes_prompts != (args.prompt is not None):
        given, wanted = ("--prompt", "--class-labels") if args.prompt is not None else ("--class-labels", "--prompt")
        raise InputError(f"{type(pipe).__name__} takes {wanted}, not {given}")
    native = native_size(pipe, family)
    args.height = native if args.height is None else args.height
    args.width = native if args.width is None else args.width
    check_size(pipe, family, args.height, args.width)
    if family == "dit" and args.height != native:
        latent = args.height // vae_scale_factor(pipe)
        pipe.transformer = type(pipe.transformer).from_pretrained(Path(args.pipeline) / "transformer",
                                                                  sample_size=latent, dtype=dtype,
                                                                  local_files_only=True)
    if args.weights is not None:
        try:
            handle = linearize(pipe, weights=args.weights)
        except TypeError as e:  # the denoiser is not one linearize() supports, e.g. a LinDiT
            denoiser = type(getattr(pipe, FAMILIES[family].denoiser)).__name__
            raise InputError(f"--weights: the pipeline's denoiser is a {denoiser}, which has no softmax "
                             "self-attention for linearize() to replace") from e
        except (ValueError, FileNotFoundError) as e:
            raise InputError(f"cannot load --weights {args.weights}: {e}") from e
        print(f"linear attention on {len(handle.layers)} self-attention layers from {args.weights}", flush=True)
    elif family == "dit" and isinstance(pipe.transformer, LinDiTTransformer2DModel):
        print("LinDiT pipeline: its attention is linear already", flush=True)
    else:
        print("no --weights: generating with the pipeline's own softmax attention (the teacher)", flush=True)
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.cpu_offload:
        pipe.enable_sequential_cpu_offload(device=args.device)
    else:
        pipe.to(args.device)
    pipe.set_progress_bar_config(disable=False, leave=False, desc="denoising")
    return pipe, family


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].rstrip("-") or "empty"


def grid_tile(image: Image.Image) -> Image.Image:
    """A copy no larger than GRID_TILE on either side, aspect ratio kept."""
    tile = image.copy()
    tile.thumbnail((GRID_TILE, GRID_TILE))
    return tile


def generate(args: argparse.Namespace) -> list[Path]:
    pipe, family = build_pipeline(args)
    prompts = FAMILIES[family].takes_prompts
    texts = args.prompt if prompts else args.class_labels
    conditions = texts if prompts else [class_id(pipe, text) for text in texts]
    guidance = FAMILIES[family].guidance if args.guidance_scale is None else args.guidance_scale
    out = Path(args.out)
    jobs = [(text, condition) for text, condition in zip(texts, conditions) for _ in range(args.num_images)]
    paths, tiles = [], []
    for k, (text, condition) in enumerate(tqdm(jobs, desc="images", dynamic_ncols=True)):
        seed = args.seed + k
        image = run_pipeline(pipe, family, [condition], height=args.height, width=args.width, steps=args.steps,
                             guidance_scale=guidance, generator=torch.Generator().manual_seed(seed))[0]
        what = slug(text) if prompts else f"class{condition}" + ("" if text.isdigit() else f"-{slug(text)}")
        name = f"{k:03d}_{what}"
        paths.append(save_png(image, out / f"{name}_seed{seed}_{args.width}x{args.height}.png"))
        tiles.append(grid_tile(image))
    save_png(image_grid(tiles), out / "grid.png")
    print(f"wrote {len(paths)} PNG(s) and grid.png to {out}", flush=True)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        generate(args)
    except InputError as e:
        raise SystemExit(f"generate.py: error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
