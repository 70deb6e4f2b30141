"""What ``tools/distill.py`` and ``tools/generate.py`` share: loading a local pipeline folder, telling the supported
pipeline families apart (SD 1.x / 2.x, SDXL, PixArt-alpha / -Sigma, DiT), image sizes, DiT class labels, calling a
pipeline, and writing PNGs atomically."""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence, Union

import torch
from diffusers import (DiffusionPipeline, DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)
from PIL import Image

__all__ = ["InputError", "Family", "FAMILIES", "load_pipeline", "pipeline_family", "vae_scale_factor",
           "size_multiple", "native_size", "class_id", "run_pipeline", "image_grid", "atomic_write", "save_png"]


class Family(NamedTuple):
    """What the tools need to know of a kind of pipeline."""
    pipelines: tuple  # the pipeline classes
    denoiser: str  # the attribute holding the denoiser: "unet" or "transformer"
    text_encoders: tuple  # the attributes holding text encoders; none: class-conditional (DiT)
    guidance: float  # the pipelines' own default CFG scale

    @property
    def takes_prompts(self) -> bool:
        return bool(self.text_encoders)


FAMILIES = {
    "sd": Family((StableDiffusionPipeline,), "unet", ("text_encoder",), 7.5),  # SD 1.x / 2.x
    "sdxl": Family((StableDiffusionXLPipeline,), "unet", ("text_encoder", "text_encoder_2"), 5.0),
    "pixart": Family((PixArtAlphaPipeline, PixArtSigmaPipeline), "transformer", ("text_encoder",), 4.5),
    "dit": Family((DiTPipeline,), "transformer", (), 4.0),  # DiT or LinDiT transformers
}


class InputError(ValueError):
    """A bad command-line input; the tools turn it into an error message and a non-zero exit."""


def load_pipeline(path: Union[str, os.PathLike], *, drop_safety_checker: bool = False, **kwargs) -> DiffusionPipeline:
    """A pipeline from a local folder written by ``save_pretrained``, without touching the network.

    ``drop_safety_checker`` skips loading an SD safety checker (it would black out training sample grids)."""
    folder = Path(path)
    index = folder / "model_index.json"
    if not index.is_file():
        what = "does not exist" if not folder.exists() else "is not a diffusers pipeline folder (no model_index.json)"
        raise InputError(f"--pipeline {folder} {what}; pass a folder written by pipe.save_pretrained(...)")
    if drop_safety_checker and "safety_checker" in json.loads(index.read_text()):
        kwargs["safety_checker"] = None
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as e:  # diffusers raises many types here; the user needs the folder and the reason
        raise InputError(f"--pipeline {folder}: could not load the pipeline ({type(e).__name__}: {e})") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_family(pipe: DiffusionPipeline, tool: str) -> str:
    """The key of ``pipe``'s kind in FAMILIES: ``'sd'``, ``'sdxl'``, ``'pixart'`` (text-to-image) or ``'dit'``."""
    for name, family in FAMILIES.items():
        if isinstance(pipe, family.pipelines):
            return name
    supported = ", ".join(cls.__name__ for family in FAMILIES.values() for cls in family.pipelines)
    raise InputError(f"{tool} does not support {type(pipe).__name__} pipelines; supported: {supported}")


def vae_scale_factor(pipe: DiffusionPipeline) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def size_multiple(pipe: DiffusionPipeline, family: str) -> int:
    """Image sides must be multiples of this: the VAE factor times a transformer's patch (UNet pipelines also ask
    for 8)."""
    factor = vae_scale_factor(pipe)
    denoiser = FAMILIES[family].denoiser
    if denoiser == "unet":
        return math.lcm(8, factor)
    return factor * getattr(pipe, denoiser).config.patch_size


def native_size(pipe: DiffusionPipeline, family: str) -> int:
    """The image side the denoiser was configured for (``sample_size`` latents)."""
    return getattr(pipe, FAMILIES[family].denoiser).config.sample_size * vae_scale_factor(pipe)


def class_id(pipe: DiTPipeline, text: str) -> int:
    """A DiT class from an id (``'207'``) or one of the pipeline's label names (``'golden retriever'``)."""
    text = text.strip()
    num_classes = pipe.transformer.config.num_embeds_ada_norm
    if text.isdigit():
        if int(text) >= num_classes:
            raise InputError(f"class id {text} is out of range: the model has classes 0..{num_classes - 1}")
        return int(text)
    if text in pipe.labels:
        return pipe.labels[text]
    known = ", ".join(list(pipe.labels)[:5]) + (", ..." if len(pipe.labels) > 5 else "")
    names = f"one of its label names ({known})" if pipe.labels else "(this pipeline has no label names)"
    raise InputError(f"{text!r} is not a class of the pipeline: use an id 0..{num_classes - 1} or {names}")


def run_pipeline(pipe: DiffusionPipeline, family: str, conditions: Sequence[Union[str, int]], *, height: int,
                 width: int, steps: int, guidance_scale: float,
                 generator: Union[torch.Generator, list[torch.Generator]], output_type: str = "pil"):
    """One batch: prompts at ``height`` x ``width`` (PixArt exactly so: no snapping to its aspect-ratio bins, and
    captions as given); class ids for DiT, which generates at the size of its denoiser's ``sample_size`` (the
    caller checks it). ``generator``: one, or one per image."""
    common = dict(num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                  output_type=output_type)
    if family == "dit":
        return pipe(class_labels=list(conditions), **common).images
    if family == "pixart":
        common.update(use_resolution_binning=False, clean_caption=False)
    return pipe(prompt=list(conditions), height=height, width=width, **common).images


def image_grid(images: Sequence[Image.Image]) -> Image.Image:
    """Images of one size tiled row by row, about as many columns as rows."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


@contextmanager
def atomic_write(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` that replaces it on success, so a crash leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_png(image: Image.Image, path: Union[str, os.PathLike]) -> Path:
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
