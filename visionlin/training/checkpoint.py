"""Checkpoint files: atomic writes, weights-only reads, and loading weights into a timm model.

* ``local_atomic`` (an mmengine file backend): every file is written to a temporary file in the
  target folder, flushed to disk and renamed over the target, so a run killed mid-write never leaves
  a half-written checkpoint under a checkpoint's name.
* Reading: torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10's resume
  then fails on the non-tensor objects its checkpoints hold: the message hub's ``HistoryBuffer``s
  and numpy arrays and scalars, whose pickles need ``getattr`` and numpy's reconstructors.
  Allow-listing those would let a checkpoint call ``getattr`` on whatever it reaches, so instead
  ``WeightsOnlyCheckpointHook`` stores the message hub as tensors and plain Python values (and
  rebuilds it on load), and the loader registered here reads with ``weights_only=True`` and
  nothing added to the allow-list.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import Hook
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.registry import HOOKS
from mmengine.runner.checkpoint import CheckpointLoader

from .._io import atomic_file


def _atomic_write(data, filepath, mode: str, encoding: Optional[str] = None) -> None:
    filepath = os.path.abspath(os.fspath(filepath))
    os.makedirs(os.path.dirname(filepath), exist_ok=True)
    with atomic_file(filepath) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            f.write(data)


@register_backend("local_atomic")
class AtomicLocalBackend(LocalBackend):
    """mmengine's local backend with atomic ``put``/``put_text`` (temporary file, fsync, rename)."""

    def put(self, obj: bytes, filepath) -> None:
        _atomic_write(obj, filepath, "wb")

    def put_text(self, obj: str, filepath, encoding: str = "utf-8") -> None:
        _atomic_write(obj, filepath, "w", encoding=encoding)


def to_plain(obj):
    """HistoryBuffers and numpy values -> tensors and plain Python values (loadable with weights_only)."""
    if isinstance(obj, HistoryBuffer):
        return {"__history_buffer__": True, "log": torch.from_numpy(np.asarray(obj._log_history)),
                "count": torch.from_numpy(np.asarray(obj._count_history)), "max_length": obj.max_length}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(obj)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return type(obj)((k, to_plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def from_plain(obj):
    """The inverse of ``to_plain``."""
    if isinstance(obj, dict):
        if obj.get("__history_buffer__") is True:
            return HistoryBuffer(obj["log"].numpy().tolist(), obj["count"].numpy().tolist(), obj["max_length"])
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return type(obj)((k, from_plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_plain(v) for v in obj)
    return obj


@HOOKS.register_module()
class WeightsOnlyCheckpointHook(Hook):
    """Keeps mmengine checkpoints loadable with ``weights_only=True``: the message hub is saved in
    plain form (after every other hook has added to the checkpoint) and rebuilt on load."""
    priority = "LOWEST"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            checkpoint["message_hub"] = to_plain(checkpoint["message_hub"])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            checkpoint["message_hub"] = from_plain(checkpoint["message_hub"])


def read_checkpoint(path: str, map_location="cpu") -> Dict:
    """A checkpoint file as a dict: safetensors, or a torch file read with ``weights_only=True``."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device=str(map_location))
    from ..models._helpers import official_pickle_globals
    try:  # official training checkpoints' configs are allowed by class, as for pretrained=True
        with torch.serialization.safe_globals(official_pickle_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"could not read checkpoint {path} with weights_only=True: {e}. If it is a "
                           "trusted checkpoint that pickles other objects, convert it first with "
                           "tools/convert_checkpoint.py --trust-pickle") from e


@CheckpointLoader.register_scheme(prefixes="", force=True)
def load_from_local(filename, map_location):
    """mmengine's loader for local paths (resume, ``load_from``), reading with ``weights_only=True``."""
    return read_checkpoint(filename, map_location)


def latest_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint of the highest epoch or iteration in ``work_dir`` (files are complete: they are
    written atomically), or None."""
    best, best_step = None, -1
    for p in Path(work_dir).glob("*.pth"):
        m = re.fullmatch(r"(?:epoch|iter)_(\d+)\.pth", p.name)
        if m and int(m.group(1)) > best_step:
            best, best_step = str(p), int(m.group(1))
    return best


def _model_state(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """Weights of the timm model inside a checkpoint: ours (mmengine, 'state_dict' holds the EMA
    weights when EMA was on, keys prefixed 'model.'), a converted safetensors file, or an official
    file that the family's filter understands."""
    if isinstance(checkpoint.get("state_dict"), dict) and "meta" in checkpoint:
        state = checkpoint["state_dict"]
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return checkpoint


def load_model_weights(net: torch.nn.Module, path: str, drop_mismatched_classifier: bool = False) -> None:
    """Load a checkpoint file into the timm model ``net`` through its family's ``checkpoint_filter_fn``.

    With ``drop_mismatched_classifier`` (fine-tuning on a new class count), classifier weights whose
    shapes differ from ``net``'s are skipped and the new classifier keeps its initialisation; any other
    missing, unexpected or mis-shaped key raises an error naming it.
    """
    state = _model_state(read_checkpoint(path))
    filter_fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, net)
    own = net.state_dict()
    skipped = []
    if drop_mismatched_classifier:
        classifier = net.pretrained_cfg.get("classifier", "head") if hasattr(net, "pretrained_cfg") else "head"
        for k in [k for k in state if k.startswith(classifier + ".")]:
            if k not in own or own[k].shape != state[k].shape:
                skipped.append(state.pop(k))
    bad_shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not (skipped and k.startswith(classifier + "."))]
    unexpected = [k for k in state if k not in own]
    if bad_shapes or missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match {type(net).__name__}: "
                           f"missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                           f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, "
                           f"shape mismatches {bad_shapes[:10]}")
    net.load_state_dict(state, strict=not skipped)
