"""Convert an official checkpoint into a visionlin safetensors file that timm loads offline, or into a
publishable timm model folder (``--hub-dir``: config.json, model.safetensors and a README model card).

    python tools/convert_checkpoint.py vig_s vig_s_official.pth vig_s.safetensors
    python -c "import timm, visionlin; timm.create_model('vig_s', pretrained=True,
               pretrained_cfg_overlay=dict(file='vig_s.safetensors'))"
    python tools/convert_checkpoint.py vig_s vig_s_81p7acc.pth --hub-dir hub/vig_s.in1k
    python -c "import timm, visionlin; timm.create_model('local-dir:hub/vig_s.in1k', pretrained=True)"

The folder is what ``timm.models.save_for_hf`` writes plus timm's README card (``generate_readme``) with the
family's model card appended; it could be uploaded to the Hugging Face hub as is and loaded with ``hf-hub:``.

Official training checkpoints also pickle their run's config (an argparse ``Namespace``, a yacs
``CfgNode``) and metrics; those are read with ``weights_only=True`` and only these classes allowed
(``visionlin.models._helpers.official_pickle_globals``), as ``pretrained=True`` does. A file pickling
anything else is refused unless ``--trust-pickle`` (which runs code from the file: only for files from
a source you trust).
The family's ``checkpoint_filter_fn`` does the key mapping; the result is checked against the model
(every key present, every shape right) before anything is written, and written atomically.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import timm
import torch
from safetensors.torch import save_file

import visionlin  # noqa: F401  (registers the models)
from visionlin._io import atomic_file
from visionlin.models._helpers import official_pickle_globals

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
WEIGHT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's order


def read_checkpoint(path: str, trust_pickle: bool) -> Dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(official_pickle_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise SystemExit(
                f"{path} pickles objects other than tensors (torch says: {str(err).splitlines()[0]}).\n"
                "Reading it executes code from the file; if you trust its source, rerun with --trust-pickle.")
    return torch.load(path, map_location="cpu", weights_only=False)


def select_weights(checkpoint: Dict, which: str) -> Dict[str, torch.Tensor]:
    """The weight dict of a training checkpoint: ``which`` if given, else EMA first (as timm does)."""
    if not isinstance(checkpoint, dict):
        raise SystemExit(f"expected a checkpoint dict or a state dict, got a pickled {type(checkpoint).__name__}")
    candidates = [which] if which != "auto" else list(WEIGHT_KEYS)
    for key in candidates:
        value = checkpoint.get(key)
        if isinstance(value, dict) and value:
            print(f"using the weights under '{key}' ({len(value)} tensors)")
            return value
    if which != "auto":
        raise SystemExit(f"the checkpoint has no non-empty '{which}' entry; it has {sorted(checkpoint)}")
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        print(f"the file is a bare state dict ({len(checkpoint)} tensors)")
        return checkpoint
    raise SystemExit(f"no weights found under any of {WEIGHT_KEYS}; top-level keys: {sorted(checkpoint)}")


def convert(model_name: str, source: str, dest: Optional[str] = None, which: str = "auto", trust_pickle: bool = False,
            hub_dir: Optional[str] = None, **model_kwargs) -> Dict[str, torch.Tensor]:
    if (dest is None) == (hub_dir is None):
        raise SystemExit("give either an output .safetensors file or --hub-dir DIR")
    if dest is not None and not dest.endswith(".safetensors"):
        raise SystemExit(f"the output must be a .safetensors file, got {dest}")
    if hub_dir is not None and os.path.exists(hub_dir) and (not os.path.isdir(hub_dir) or os.listdir(hub_dir)):
        raise SystemExit(f"--hub-dir {hub_dir} exists and is not an empty folder; choose a new one")
    model = timm.create_model(model_name, **model_kwargs)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        raise SystemExit(f"{model_name} has no checkpoint_filter_fn to convert official checkpoints with")
    weights = select_weights(read_checkpoint(source, trust_pickle), which)
    converted = filter_fn(weights, model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = sorted(k for k in set(expected) & set(converted) if converted[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        lines = [f"{source} does not match {model_name}:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {k} {tuple(converted[k].shape)} != {tuple(expected[k].shape)}" for k in wrong]
        raise SystemExit("\n".join(lines))
    renamed = sum(1 for k in weights if k not in converted)
    print(f"mapped {len(weights)} official tensors to {len(converted)} {model_name} tensors "
          f"({renamed} renamed or reshaped)")
    out = {k: v.contiguous() for k, v in converted.items()}
    if hub_dir is not None:
        model.load_state_dict(out)
        write_hub_dir(model, model_name, source, hub_dir, model_kwargs)
        print(f"wrote {hub_dir}/ (config.json, model.safetensors, README.md)")
        return out
    with atomic_file(dest) as tmp:
        save_file(out, str(tmp), metadata={"source": os.path.basename(source), "model": model_name})
    print(f"wrote {dest}")
    return out


def model_card(model, model_name: str, source: str) -> str:
    """timm's README card for the converted weights, followed by the family's visionlin model card."""
    from timm.models._hub import generate_readme
    cfg = model.pretrained_cfg
    details = {"Model Type": "Image classification / feature backbone",
               "Model Stats": {"Params (M)": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}",
                               "Image size": "x".join(str(s) for s in cfg["input_size"][1:])},
               "Papers": {cfg.get("paper_name", ""): cfg.get("paper_ids", "")},
               "Original": cfg.get("origin_url", ""),
               "Weights": f"official ImageNet-1k checkpoint {os.path.basename(source)}, converted by visionlin",
               "Dataset": "ImageNet-1k"}
    usage = ("```python\nimport timm, visionlin\n"
             f"model = timm.create_model('hf-hub:<this repo>', pretrained=True)  # or 'local-dir:<this folder>'\n```\n")
    text = generate_readme({"tags": ["image-classification", "timm", "visionlin"], "license": cfg.get("license") or "other",
                            "details": details, "usage": usage}, model_name)
    card = CARDS / f"{type(model).__module__.rsplit('.', 1)[-1]}.md"
    if card.is_file():
        text += "\n---\n\n" + card.read_text()
    return text


def write_hub_dir(model, model_name: str, source: str, hub_dir: str, model_args: dict) -> None:
    """The timm model folder, built beside its final name and renamed into place (nothing half-written)."""
    from timm.models import save_for_hf
    final = Path(hub_dir).absolute()
    if not final.parent.is_dir():
        raise SystemExit(f"--hub-dir {hub_dir}: the folder {final.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        save_for_hf(model, str(tmp), model_args=model_args or None, safe_serialization=True)
        (tmp / "README.md").write_text(model_card(model, model_name, source))
        os.chmod(tmp, 0o777 & ~_umask())
        if final.exists():
            final.rmdir()  # empty (checked above)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="registered model name, e.g. vig_s")
    parser.add_argument("source", help="official checkpoint (.pth)")
    parser.add_argument("dest", nargs="?", help="output .safetensors file (or use --hub-dir)")
    parser.add_argument("--hub-dir", help="write a publishable timm model folder here instead (new or empty)")
    parser.add_argument("--weights", default="auto", choices=("auto",) + WEIGHT_KEYS,
                        help="which weights of a training checkpoint to take (auto: EMA first, like timm)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow reading checkpoints that pickle non-tensor objects (runs code from the file)")
    args = parser.parse_args(argv)
    convert(args.model, args.source, args.dest, args.weights, args.trust_pickle, hub_dir=args.hub_dir)


if __name__ == "__main__":
    main()
