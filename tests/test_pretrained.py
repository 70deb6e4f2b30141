"""``pretrained=True`` through timm's own loader, offline: checkpoints in the official layouts (random weights, the
official wrapper keys, pickled training configs) laid out where the real downloads land — a Hugging Face hub cache
(huggingface_hub's folder layout, HF_HUB_OFFLINE=1) and torch.hub's cache for release URLs, or behind a file://
URL — load through the family's filter and give the source model's logits; broken files fail with the variant and
the file named. One worker process (tests/pretrained_worker.py) runs every case in the prepared environment."""
import argparse
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import visionlin  # noqa: F401
from test_ravlt import official_ravlt_state_dict
from test_vig import official_vig_state_dict, official_vigh_state_dict
from test_vim import official_vim_state_dict
from test_vmamba import official_vmamba_state_dict
from zoo import SMALL, tiny, tiny_args

HERE = Path(__file__).parent
COMMIT = "4d2c3a5f6e7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d"  # any 40-hex snapshot id


def hub_cache_file(cache: Path, repo: str, filename: str) -> Path:
    """The path huggingface_hub's cache layout gives ``filename`` of ``repo`` at main (refs/main -> snapshot)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot / filename


def release_cache_file(torch_home: Path, url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url caches ``url`` (so no download is made)."""
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / os.path.basename(url)


def training_extras(model) -> dict:
    """What official training checkpoints hold besides the weights: optimizer, schedule, scaler, epoch, metrics
    and the run's argparse config (which plain weights_only loading refuses)."""
    p = next(iter(model.parameters()))
    return {"optimizer": {"state": {0: {"exp_avg": torch.zeros_like(p)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "lr_scheduler": {"last_epoch": 299}, "scaler": {"scale": 65536.0}, "epoch": 299,
            "max_accuracy": np.float64(80.5), "args": argparse.Namespace(model="tiny", lr=1e-3, epochs=300)}


def pickle_with_a_yacs_config(obj: dict, path: Path) -> None:
    """torch.save with a ``yacs.config.CfgNode`` inside (VMamba's training config), yacs itself absent afterwards."""
    module = types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass
    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode = CfgNode
    package = types.ModuleType("yacs")
    package.config = module
    saved = {k: sys.modules.get(k) for k in ("yacs", "yacs.config")}
    sys.modules.update({"yacs": package, "yacs.config": module})
    try:
        config = CfgNode(MODEL=CfgNode(NAME="vssm1_tiny_0230s"), TRAIN=CfgNode(EPOCHS=300))
        config.__dict__["__immutable__"] = True
        torch.save({**obj, "config": config}, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _RunsCode:
    """Unpickling this would create a file (a stand-in for any code a malicious checkpoint runs)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mknod, (self.path,))


def _source(name, seed):
    torch.manual_seed(seed)
    return tiny(name).eval()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Prepares every case's files, runs the worker once, returns (results, expected logits, paths)."""
    root = tmp_path_factory.mktemp("pretrained")
    hub, torch_home = root / "hf_cache", root / "torch_home"
    x = torch.randn(2, 3, SMALL, SMALL)
    torch.save(x, root / "x.pt")
    cases, expected, files = [], {}, {}

    def case(key, name, model_for_logits, **kwargs):
        out = str(root / f"{key}.pt")
        cases.append({"name": name, "kwargs": {**tiny_args(name), **kwargs}, "out": out})
        if model_for_logits is not None:
            with torch.no_grad():
                expected[key] = model_for_logits(x)
        return out

    # ViG / ViG-H: {'model': weights} files in hustvl/ViG
    for name, convert in (("vig_t", official_vig_state_dict), ("vig_h_t", official_vigh_state_dict)):
        source = _source(name, 1)
        cfg = timm.get_pretrained_cfg(name)
        torch.save({"model": convert(source)}, hub_cache_file(hub, cfg.hf_hub_id, cfg.hf_hub_filename))
        files[name] = case(name, name, source)
    # RAVLT and Vim: full training checkpoints (argparse config, numpy metric); EMA weights are taken first
    for name, convert in (("ravlt_t", official_ravlt_state_dict), ("vim_t", official_vim_state_dict)):
        source, ema = _source(name, 2), _source(name, 3)
        cfg = timm.get_pretrained_cfg(name)
        torch.save({"model": convert(source), "model_ema": convert(ema), **training_extras(source)},
                   hub_cache_file(hub, cfg.hf_hub_id, cfg.hf_hub_filename))
        case(name, name, ema)
    # VMamba: a release URL, already in torch.hub's cache, with a pickled yacs config
    source = _source("vmamba_t", 4)
    url = timm.get_pretrained_cfg("vmamba_t").url
    pickle_with_a_yacs_config({"model": official_vmamba_state_dict(source)}, release_cache_file(torch_home, url))
    case("vmamba_t", "vmamba_t", source)
    # a file:// release URL (torch.hub downloads it into its cache)
    remote = root / "remote" / "vssm_release.pth"
    remote.parent.mkdir()
    torch.save({"model": official_vmamba_state_dict(source)}, remote)
    case("vmamba_file_url", "vmamba_t", source, pretrained_cfg_overlay=dict(url=remote.as_uri()))
    # broken files under the right names: a truncated download, another variant's weights, a missing cache entry
    truncated = release_cache_file(torch_home / "broken", url)
    truncated.write_bytes(release_cache_file(torch_home, url).read_bytes()[:1000])
    other = root / "remote" / "ravlt_weights.pth"
    torch.save({"model": official_ravlt_state_dict(_source("ravlt_t", 5))}, other)
    case("truncated", "vmamba_t", None, pretrained_cfg_overlay=dict(url=url))
    case("wrong_file", "vmamba_t", None, pretrained_cfg_overlay=dict(url=other.as_uri(), file=None))
    case("not_cached", "vig_b", None)
    # a checkpoint that would run code when unpickled is refused (weights_only stays on; nothing runs)
    evil = root / "remote" / "evil.pth"
    torch.save({"model": official_vmamba_state_dict(source), "payload": _RunsCode(str(root / "pwned"))}, evil)
    case("runs_code", "vmamba_t", None, pretrained_cfg_overlay=dict(file=str(evil)))
    (root / "spec.json").write_text(json.dumps(cases))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "TORCH_HOME": str(torch_home)}
    subprocess.run([sys.executable, str(HERE / "pretrained_worker.py"), str(root / "spec.json")], check=True, env=env,
                   timeout=600)
    # the truncated file is read from a second TORCH_HOME: rerun that case there
    broken = [c for c in cases if c["out"].endswith("truncated.pt")]
    (root / "broken_spec.json").write_text(json.dumps(broken))
    subprocess.run([sys.executable, str(HERE / "pretrained_worker.py"), str(root / "broken_spec.json")], check=True,
                   env={**env, "TORCH_HOME": str(torch_home / "broken")}, timeout=600)
    results = {**json.loads((root / "spec.results.json").read_text()),
               **json.loads((root / "broken_spec.results.json").read_text())}
    return results, expected, root


@pytest.mark.parametrize("key", ["vig_t", "vig_h_t", "ravlt_t", "vim_t", "vmamba_t", "vmamba_file_url"])
def test_pretrained_true_loads_the_official_file_and_reproduces_its_logits(loaded, key):
    results, expected, root = loaded
    result = results[str(root / f"{key}.pt")]
    assert result["ok"], result
    torch.testing.assert_close(torch.load(root / f"{key}.pt"), expected[key], rtol=1e-5, atol=1e-5)


def test_file_url_download_lands_in_torch_hub_cache(loaded):
    _, _, root = loaded
    assert (root / "torch_home" / "hub" / "checkpoints" / "vssm_release.pth").is_file()


@pytest.mark.parametrize("key,message", [
    ("truncated", r"(?s)vmamba_t: could not load its pretrained weights from https://github.com/MzeroMiko/VMamba/.*"
                  r"vssm1_tiny_0230s_ckpt_epoch_264\.pth \(cached at .*broken.*\).*delete it"),
    ("wrong_file", r"(?s)vmamba_t: could not load its pretrained weights from file://.*ravlt_weights\.pth.*"
                   r"(Missing key|Unexpected key|size mismatch)"),
    ("runs_code", r"(?s)vmamba_t: could not load its pretrained weights from file .*evil\.pth.*weights_only=True blocked.*mknod"),
    ("not_cached", r"vig_b: could not load its pretrained weights from Hugging Face hub repo hustvl/ViG, "
                   r"file vig_b_82p6acc\.pth"),
])
def test_a_broken_or_missing_file_names_the_variant_and_the_file(loaded, key, message):
    results, _, root = loaded
    result = results[str(root / f"{key}.pt")]
    assert not result["ok"]
    assert not (root / "pwned").exists()
    import re
    assert re.search(message, result["message"]), result["message"]


def test_list_pretrained_lists_every_variant_with_official_weights():
    tagged = {n.split(".")[0] for n in timm.list_pretrained("*") if n.endswith(".in1k")}
    assert tagged >= {"vig_t", "vig_s", "vig_b", "vig_h_t", "vig_h_s", "vig_h_b", "ravlt_t", "ravlt_s", "ravlt_b",
                      "ravlt_l", "vim_t", "vim_s", "vim_b", "vmamba_t", "vmamba_s", "vmamba_b"}
    assert not timm.list_pretrained("ravlt_s_linear*")


def test_every_official_location_is_a_hub_file_or_a_release_url():
    for name in (n.split(".")[0] for n in timm.list_pretrained("*") if n.split(".")[0] in visionlin_models()):
        cfg = timm.get_pretrained_cfg(name)
        assert (cfg.hf_hub_id and cfg.hf_hub_filename) or cfg.url.startswith("https://github.com/"), name


def visionlin_models():
    from zoo import ALL
    return set(ALL)


def test_a_variant_without_official_weights_says_so():
    with pytest.raises(ValueError, match="ravlt_s_linear: no official weights are published"):
        timm.create_model("ravlt_s_linear", pretrained=True)


def test_convert_tool_and_local_files_read_official_training_checkpoints_without_trusting_pickles(tmp_path):
    """The same allow-list serves tools/convert_checkpoint.py and pretrained_cfg_overlay=dict(file=...)."""
    from zoo import load_tool
    source = _source("vim_t", 6)
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    torch.save({"model": official_vim_state_dict(source), **training_extras(source)}, path)
    dest = tmp_path / "vim_t.safetensors"
    load_tool("convert_checkpoint").convert("vim_t", str(path), str(dest), **tiny_args("vim_t"))
    x = torch.randn(1, 3, SMALL, SMALL)
    for file in (path, dest):
        loaded = tiny("vim_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(file))).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), source(x))


def test_hub_dir_is_a_timm_model_folder_that_loads_unchanged(tmp_path):
    from zoo import load_tool
    convert = load_tool("convert_checkpoint")
    source = _source("ravlt_t", 7)
    path = tmp_path / "RAVLT_T.pth"
    torch.save({"model": official_ravlt_state_dict(source), **training_extras(source)}, path)
    hub_dir = tmp_path / "ravlt_t.in1k"
    convert.convert("ravlt_t", str(path), hub_dir=str(hub_dir), **tiny_args("ravlt_t"))
    assert sorted(p.name for p in hub_dir.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RAVLT_T.pth", "ravlt_t.in1k"]  # no partial folder left
    loaded = timm.create_model(f"local-dir:{hub_dir}", pretrained=True).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    readme = (hub_dir / "README.md").read_text()
    assert readme.startswith("---\ntags:\n- image-classification\n- timm\n- visionlin\n")
    assert "RAVLT_T.pth" in readme and "## Compile and deploy" in readme  # timm's card, then the family card
    with pytest.raises(SystemExit, match="exists and is not an empty folder"):
        convert.convert("ravlt_t", str(path), hub_dir=str(hub_dir), **tiny_args("ravlt_t"))
    with pytest.raises(SystemExit, match="either an output .safetensors file or --hub-dir"):
        convert.convert("ravlt_t", str(path), **tiny_args("ravlt_t"))
