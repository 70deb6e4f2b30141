"""Swap the self-attention of a diffusers denoiser for LinFusion's generalized linear attention.

``linearize(pipe)`` gives every self-attention layer (``attn1``; cross-attention keeps softmax) of a
``UNet2DConditionModel`` (SD 1.5 / 2.1 / SDXL), ``DiTTransformer2DModel`` or ``PixArtTransformer2DModel`` a
:class:`LinFusionAttnProcessor` through diffusers' processor seam (``attn.set_processor``; DiT has no
``set_attn_processor`` in diffusers 0.42, so every model is walked with ``named_modules()``). Nothing is
monkey-patched and no module is replaced. The processor is an ``nn.Module``, so its weights live in the model
under ``<layer>.processor.attention.*``: they follow ``.to()`` / dtype casts and appear in ``parameters()``.

``model.save_pretrained`` writes those weights as extra keys, but ``from_pretrained`` drops them (diffusers
logs "Some weights ... were not used") and rebuilds the softmax processors. The supported round trip is
``handle.save(path)`` (a safetensors file with only the linear-attention weights and a config in its metadata)
and ``linearize(pipe, weights=path)``.

Official LinFusion weights (``Yuanshi/LinFusion-1-5``, ``-2-1``, ``-XL``) load with the same call, from the
weight file or the downloaded repo folder. The official ``LinFusion`` (a diffusers ``ModelMixin``) registers
one module per replaced layer under its index ``i`` in ``unet.named_modules()`` order of the ``attn1`` layers
(for SD UNets: down blocks, then up blocks, then the mid block). Each is a diffusers ``Attention`` with default
biases plus two feature MLPs ``Sequential(Linear, LayerNorm, LeakyReLU, Linear)``, so the mapping is

    ==============================  =========================================  =====================
    official key                    ours (``handle.save`` / ``state_dict``)    shape
    ==============================  =========================================  =====================
    ``{i}.to_q.weight``             ``{layer_i}.to_q.weight``                  (d, d)
    ``{i}.to_k.weight``             ``{layer_i}.to_k.weight``                  (d, d)
    ``{i}.to_v.weight``             ``{layer_i}.to_v.weight``                  (d, d)
    ``{i}.to_out.0.weight``/bias    ``{layer_i}.to_out.0.weight``/bias         (d, d) / (d,)
    ``{i}.to_q_.{0,3}.weight``/bias ``{layer_i}.to_q_.{0,3}.weight``/bias      (m, d), (d, m) / ...
    ``{i}.to_q_.1.weight``/bias     ``{layer_i}.to_q_.1.weight``/bias          (m,)  (the LayerNorm)
    ``{i}.to_k_.*``                 ``{layer_i}.to_k_.*``                      as ``to_q_``
    ==============================  =========================================  =====================

where ``layer_i`` is the i-th self-attention layer of the model (``down_blocks.0.attentions.0.
transformer_blocks.0.attn1`` for i = 0), d its width and m the feature-MLP width, read from
``to_q_.0.weight`` (m = d for LinFusion-1-5 / -2-1, m = d // 16 for LinFusion-XL). Files without feature
MLPs (the official ``projection_mid_dim=-1``, whose identity "MLP" makes q = W_q(2x)) are refused; the
released ones all have them. The official files carry no head count: like the official code we use the
model's. When the folder's ``config.json`` is there, its ``modules_list`` names are checked against the
model's layers.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .._io import atomic_file
from ..layers.linfusion import GeneralizedLinearAttention

__all__ = ["linearize", "LinearizedAttention", "LinFusionAttnProcessor", "LinearAttentionSpec", "FeatureDim",
           "SUPPORTED_MODELS", "FORMAT_VERSION"]

SUPPORTED_MODELS = (UNet2DConditionModel, DiTTransformer2DModel, PixArtTransformer2DModel)
FORMAT_VERSION = 1
METADATA_KEY = "visionlin.linfusion"
OFFICIAL_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# the official LinFusion repos on the Hugging Face hub (Huage001/LinFusion's README and model table) and their bases
OFFICIAL_REPOS = {"Yuanshi/LinFusion-1-5": "SD 1.5 and its fine-tunes (e.g. Realistic Vision 4, DreamShaper 8)",
                  "Yuanshi/LinFusion-2-1": "SD 2.1", "Yuanshi/LinFusion-XL": "SDXL"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
INITS = ("teacher", "fresh")

FeatureDim = Union[int, str, None]
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class LinearAttentionSpec:
    """The shape of one linear-attention layer: what a weights file must agree on with the model."""

    dim: int  # token width (the teacher's query_dim)
    inner_dim: int  # heads * head dim
    heads: int
    feature_dim: Optional[int]  # feature-MLP width m; None: no feature MLP
    qkv_bias: bool
    out_bias: bool

    @classmethod
    def of(cls, attn: Attention, feature_dim: Optional[int]) -> "LinearAttentionSpec":
        return cls(dim=attn.query_dim, inner_dim=attn.inner_dim, heads=attn.heads, feature_dim=feature_dim,
                   qkv_bias=attn.to_q.bias is not None, out_bias=attn.to_out[0].bias is not None)

    def build(self) -> GeneralizedLinearAttention:
        return GeneralizedLinearAttention(self.dim, self.heads, self.feature_dim,
                                          use_feature_mlp=self.feature_dim is not None, qkv_bias=self.qkv_bias,
                                          out_bias=self.out_bias, inner_dim=self.inner_dim)


class LinFusionAttnProcessor(nn.Module):
    """A diffusers attention processor that runs self-attention as :class:`GeneralizedLinearAttention`.

    Wraps it the way ``AttnProcessor2_0`` wraps softmax attention (spatial norm, NCHW inputs, group norm,
    the teacher's output dropout, residual, output rescale), so it fits any diffusers ``Attention`` used as
    self-attention.
    """

    def __init__(self, spec: LinearAttentionSpec):
        super().__init__()
        self.spec = spec
        self.attention = spec.build()

    @classmethod
    def from_attention(cls, attn: Attention, feature_dim: FeatureDim = "d",
                       init: str = "teacher") -> "LinFusionAttnProcessor":
        """A processor for ``attn`` on its device and dtype (``feature_dim`` and ``init`` as in :func:`linearize`)."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        width = _feature_width(feature_dim)(attn.query_dim)
        if width == 0:
            raise ValueError(f"feature_dim={feature_dim!r} gives an attention of width {attn.query_dim} a feature MLP "
                             "of width 0")
        processor = cls(LinearAttentionSpec.of(attn, width)).to(attn.to_q.weight)
        if init == "teacher":
            ours = processor.attention
            for mine, teacher in ((ours.to_q, attn.to_q), (ours.to_k, attn.to_k), (ours.to_v, attn.to_v),
                                  (ours.to_out[0], attn.to_out[0])):
                mine.load_state_dict(teacher.state_dict())
        return processor

    # diffusers passes a processor only the keyword arguments its __call__ signature names (temb among them)
    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn: Attention, hidden_states: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("LinFusionAttnProcessor is for self-attention, but the layer got encoder_hidden_states "
                             "(it is used as cross-attention); keep a softmax processor there")
        if attention_mask is not None:
            raise NotImplementedError("LinFusionAttnProcessor does not support attention_mask: LinFusion's linear "
                                      "attention attends to every token")
        if attn.norm_q is not None or attn.norm_k is not None:
            raise ValueError("LinFusionAttnProcessor cannot run a layer with qk-norm (norm_q / norm_k): LinFusion's "
                             "feature map replaces it")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.dim() == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        hidden_states = attn.to_out[1](self.attention(hidden_states))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class LinearizedAttention:
    """What :func:`linearize` installed: list, train, save, load and remove the linear-attention layers.

    To distill, freeze the model and train ``handle.parameters()`` (freezing the model also freezes these,
    since they are its submodules: ``model.requires_grad_(False)`` then ``requires_grad_(True)`` on them).
    """

    def __init__(self, model: nn.Module, attentions: dict[str, Attention],
                 processors: dict[str, LinFusionAttnProcessor]):
        self.model = model
        self._attentions = attentions
        self._originals = {name: attn.processor for name, attn in attentions.items()}
        self._processors = processors
        for name, attn in attentions.items():
            attn.set_processor(processors[name])

    def _installed(self) -> dict[str, LinFusionAttnProcessor]:
        if not self._processors:
            raise RuntimeError("these linear-attention layers were removed; call linearize() again")
        return self._processors

    @property
    def processors(self) -> dict[str, LinFusionAttnProcessor]:
        return dict(self._installed())

    @property
    def layers(self) -> dict[str, LinearAttentionSpec]:
        return {name: p.spec for name, p in self._installed().items()}

    def parameters(self) -> Iterator[nn.Parameter]:
        processors = self._installed()
        return (p for processor in processors.values() for p in processor.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Keyed ``{layer}.{parameter}``, e.g. ``mid_block....attn1.to_q.weight``."""
        return {f"{name}.{key}": t for name, p in self._installed().items()
                for key, t in p.attention.state_dict().items()}

    def save(self, path: PathLike) -> Path:
        """Write the weights and their layer config to a ``.safetensors`` file, atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"save path must end in .safetensors, got {str(path)!r}")
        tensors = {k: t.detach().cpu().contiguous() for k, t in self.state_dict().items()}
        config = {"format_version": FORMAT_VERSION, "layers": {n: asdict(s) for n, s in self.layers.items()}}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(config)})
        return path

    def load(self, path: PathLike) -> None:
        """Load weights saved by :meth:`save` or an official LinFusion file into the installed layers."""
        model_name = type(self.model).__name__
        base = {name: replace(spec, feature_dim=None) for name, spec in self.layers.items()}
        _, state, source = _read_weights(path, base, model_name)
        _load_into(self._installed(), state, source, model_name)

    def remove(self) -> None:
        """Give every layer back its original processor (and drop the linear-attention weights)."""
        self._installed()
        for name, attn in self._attentions.items():
            attn.set_processor(self._originals[name])
        self._processors = {}

    def __repr__(self) -> str:
        return f"LinearizedAttention({type(self.model).__name__}, {len(self._processors)} layers)"


def linearize(pipe_or_model, weights: Optional[PathLike] = None, *, feature_dim: FeatureDim = "d",
              init: str = "teacher") -> LinearizedAttention:
    """Install LinFusion linear attention on every self-attention layer of a pipeline's denoiser (or a model).

    Args:
        pipe_or_model: a pipeline with a supported ``unet`` / ``transformer`` (the VAE is left alone), or a
            supported model (see ``SUPPORTED_MODELS``).
        weights: a file written by :meth:`LinearizedAttention.save`, or official LinFusion weights (a
            ``.safetensors`` / ``.bin`` file, the repo folder holding ``diffusion_pytorch_model.*``, or the hub
            repo id itself, e.g. ``'Yuanshi/LinFusion-1-5'``: see ``OFFICIAL_REPOS``). The
            layer shapes then come from the file, so leave ``feature_dim`` and ``init`` at their defaults.
        feature_dim: feature-MLP width m per layer of width d: ``'d'`` (LinFusion's default), ``'d/<k>'``
            (``'d/16'`` is LinFusion-XL's), a positive int for every layer, or None for no feature MLP.
        init: ``'teacher'`` copies each layer's q/k/v/out projections from its softmax attention (the official
            code starts from fresh layers), ``'fresh'`` keeps nn.Linear's default init.
    """
    model = _denoiser(pipe_or_model)
    attentions = _self_attentions(model)
    already = [name for name, attn in attentions.items() if isinstance(attn.processor, LinFusionAttnProcessor)]
    if already:
        raise ValueError(f"{type(model).__name__} is already linearized (e.g. {already[0]}); call remove() on its "
                         "LinearizedAttention handle first")
    if weights is None:
        processors = {name: LinFusionAttnProcessor.from_attention(attn, feature_dim, init)
                      for name, attn in attentions.items()}
        return LinearizedAttention(model, attentions, processors)
    if feature_dim != "d" or init != "teacher":
        raise ValueError("with weights=..., the layer shapes and values come from the file; leave feature_dim "
                         f"and init at their defaults (got feature_dim={feature_dim!r}, init={init!r})")
    base = {name: LinearAttentionSpec.of(attn, None) for name, attn in attentions.items()}
    specs, state, source = _read_weights(weights, base, type(model).__name__)
    processors = {name: LinFusionAttnProcessor(specs[name]).to(attn.to_q.weight) for name, attn in attentions.items()}
    _load_into(processors, state, source, type(model).__name__)
    return LinearizedAttention(model, attentions, processors)


def _denoiser(pipe_or_model) -> nn.Module:
    if isinstance(pipe_or_model, SUPPORTED_MODELS):
        return pipe_or_model
    for attr in ("unet", "transformer"):
        model = getattr(pipe_or_model, attr, None)
        if isinstance(model, SUPPORTED_MODELS):
            return model
    raise TypeError(f"linearize takes one of {[c.__name__ for c in SUPPORTED_MODELS]} or a pipeline whose unet / "
                    f"transformer is one, got {type(pipe_or_model).__name__}")


def _self_attentions(model: nn.Module) -> dict[str, Attention]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Attention) and not m.is_cross_attention}


def _feature_width(feature_dim: FeatureDim) -> Callable[[int], Optional[int]]:
    if feature_dim is None:
        return lambda d: None
    if isinstance(feature_dim, int) and not isinstance(feature_dim, bool) and feature_dim >= 1:
        return lambda d: feature_dim
    if isinstance(feature_dim, str):
        match = re.fullmatch(r"d(?:/([1-9][0-9]*))?", feature_dim)
        if match:
            divisor = int(match.group(1) or 1)
            return lambda d: d // divisor
    raise ValueError(f"feature_dim must be 'd', 'd/<k>' (e.g. 'd/16'), a positive int or None, got {feature_dim!r}")


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _load_into(processors: dict[str, LinFusionAttnProcessor], state: dict[str, torch.Tensor], source: Path,
               model_name: str) -> None:
    """Copy ``{layer}.{param}`` tensors into the processors, after checking every key and shape first."""
    expected = {f"{name}.{key}": tuple(t.shape) for name, p in processors.items()
                for key, t in p.attention.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: expected shape {expected[k]}, got {tuple(state[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{what}: {_listing(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if problems:
        raise ValueError(f"{source} does not fit the linear-attention layers of {model_name}; " + "; ".join(problems))
    for name, processor in processors.items():
        processor.attention.load_state_dict({key: state[f"{name}.{key}"] for key in processor.attention.state_dict()})


def _read_weights(path: PathLike, base: dict[str, LinearAttentionSpec], model_name: str
                  ) -> tuple[dict[str, LinearAttentionSpec], dict[str, torch.Tensor], Path]:
    """Per-layer specs and our-layout tensors from a weights file, checked against the model's layers.

    ``base`` holds the model's layer specs in named_modules order; their feature_dim is ignored.
    """
    file, official_config = _weights_file(Path(path))
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(file))
        if METADATA_KEY in metadata:
            specs = _specs_from_metadata(metadata[METADATA_KEY], file)
            _check_layers(specs, base, file, model_name)
            return specs, state, file
    elif file.suffix in TORCH_SUFFIXES:
        state = torch.load(file, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{file}: expected a .safetensors file or a torch {'/'.join(TORCH_SUFFIXES)} file")
    specs, state = _from_official(state, base, file, official_config, model_name)
    return specs, state, file


def _from_hub(repo_id: str) -> Path:
    """The local snapshot folder of a hub repo's LinFusion files (downloaded once; HF_HUB_OFFLINE uses the cache)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", *OFFICIAL_WEIGHT_FILES]))
    except Exception as e:
        known = f" (official: {', '.join(OFFICIAL_REPOS)})" if repo_id not in OFFICIAL_REPOS else ""
        raise FileNotFoundError(f"LinFusion weights {repo_id!r} are not a local path, and the Hugging Face hub repo "
                                f"could not be fetched{known}: {type(e).__name__}: {e}") from e


def _weights_file(path: Path) -> tuple[Path, Optional[Path]]:
    """The weights file to read and, for an official repo folder, its config.json (None when absent). A hub repo id
    (``Yuanshi/LinFusion-1-5``) that is not a local path is fetched into the Hugging Face cache first."""
    if not path.exists() and HUB_ID.fullmatch(path.as_posix()):
        path = _from_hub(path.as_posix())
    if not path.exists():
        raise FileNotFoundError(f"LinFusion weights not found: {path}")
    if path.is_file():
        return path, None
    for name in OFFICIAL_WEIGHT_FILES:
        if (path / name).is_file():
            return path / name, (path / "config.json" if (path / "config.json").is_file() else None)
    raise FileNotFoundError(f"{path} is a folder without LinFusion weights (looked for {', '.join(OFFICIAL_WEIGHT_FILES)})")


def _specs_from_metadata(text: str, file: Path) -> dict[str, LinearAttentionSpec]:
    try:
        config = json.loads(text)
        version = config["format_version"]
        layers = config["layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: unreadable {METADATA_KEY} metadata ({e!r})") from e
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: format version {version!r}, this visionlin reads version {FORMAT_VERSION}")
    names = {f.name for f in fields(LinearAttentionSpec)}
    specs = {}
    for layer, spec in layers.items():
        if set(spec) != names:
            raise ValueError(f"{file}: layer {layer} config has fields {sorted(spec)}, expected {sorted(names)}")
        specs[layer] = LinearAttentionSpec(**spec)
    return specs


def _check_layers(specs: dict[str, LinearAttentionSpec], base: dict[str, LinearAttentionSpec], file: Path,
                  model_name: str) -> None:
    missing = [name for name in base if name not in specs]
    extra = [name for name in specs if name not in base]
    if missing or extra:
        parts = [f"the file has {len(specs)} layers, {model_name} has {len(base)} self-attention layers"]
        if missing:
            parts.append(f"not in the file: {_listing(missing)}")
        if extra:
            parts.append(f"not self-attention layers of {model_name}: {_listing(extra)}")
        raise ValueError(f"{file} does not match the model's layers; " + "; ".join(parts))
    for name, spec in specs.items():
        for f in fields(LinearAttentionSpec):
            got, want = getattr(spec, f.name), getattr(base[name], f.name)
            if f.name != "feature_dim" and got != want:
                raise ValueError(f"{file}: layer {name} has {f.name}={got} in the file but {want} in {model_name}")


def _from_official(state: dict, base: dict[str, LinearAttentionSpec], file: Path, config: Optional[Path],
                   model_name: str) -> tuple[dict[str, LinearAttentionSpec], dict[str, torch.Tensor]]:
    """Map the official ``{i}.{param}`` layout to ``{layer_i}.{param}`` (see the module docstring)."""
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{file}: expected a state dict of tensors, got {type(state).__name__}")
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"([0-9]+)\.(.+)", key) if isinstance(tensor, torch.Tensor) else None
        if match is None:
            raise ValueError(f"{file} is neither a visionlin linearize file (no {METADATA_KEY} metadata) nor in the "
                             f"official LinFusion layout ('<index>.<param>' tensors); found key {key!r}")
        groups.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    names = list(base)
    if sorted(groups) != list(range(len(names))):
        raise ValueError(f"{file}: official LinFusion file with layer indices {_listing([str(i) for i in sorted(groups)])}"
                         f", but {model_name} has {len(names)} self-attention layers (indices 0..{len(names) - 1})")
    if config is not None:
        modules = json.loads(config.read_text()).get("modules_list", [])
        listed = [m.get("module_name") for m in modules]
        for i, (theirs, ours) in enumerate(zip(listed, names)):
            if theirs != ours:
                raise ValueError(f"{config}: layer {i} is {theirs!r}, but {model_name}'s layer {i} is {ours!r}")
        if len(listed) != len(names):
            raise ValueError(f"{config} lists {len(listed)} layers, {model_name} has {len(names)}")
    specs, ours = {}, {}
    for i, name in enumerate(names):
        mlp = groups[i].get("to_q_.0.weight")
        if mlp is None:  # projection_mid_dim=-1 makes the MLPs identities, so the official q is W_q(2x)
            raise ValueError(f"{file}: layer {i} has no feature MLP ({i}.to_q_.0.weight); official LinFusion "
                             "weights without feature MLPs (projection_mid_dim=-1) are not supported")
        specs[name] = replace(base[name], feature_dim=mlp.shape[0])
        ours.update({f"{name}.{key}": t for key, t in groups[i].items()})
    return specs, ours
