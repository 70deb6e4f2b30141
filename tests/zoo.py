"""The registered models under test (official parameter counts, shrunken configs, feature layouts), and
the tools loaded as modules."""
import importlib.util
import sys
from pathlib import Path

import timm

# name -> (official params in millions, feature layout of forward_features, tiny config family)
MODELS = {
    "vig_t": (5.83, "NLC", "vig"), "vig_s": (22.62, "NLC", "vig"), "vig_b": (89.02, "NLC", "vig"),
    "vig_h_t": (28.60, "NHWC", "vig_h"), "vig_h_s": (50.05, "NHWC", "vig_h"), "vig_h_b": (88.90, "NHWC", "vig_h"),
    "ravlt_t": (14.90, "NCHW", "ravlt"), "ravlt_s": (25.59, "NCHW", "ravlt"), "ravlt_b": (48.24, "NCHW", "ravlt"),
    "ravlt_l": (95.24, "NCHW", "ravlt"), "ravlt_s_linear": (25.59, "NCHW", "ravlt"),
    "vmamba_t": (30.25, "NCHW", "vmamba"), "vmamba_s": (49.01, "NCHW", "vmamba"), "vmamba_b": (86.61, "NCHW", "vmamba"),
    "vim_t": (7.15, "NLC", "vim"), "vim_s": (25.80, "NLC", "vim"), "vim_b": (97.60, "NLC", "vim"),
}
ALL = list(MODELS)
TINY_ARGS = {
    "vig": dict(embed_dim=64, depth=3, num_heads=2),
    "vig_h": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    "vim": dict(embed_dim=64, depth=3),
    "vmamba": dict(embed_dim=32, depths=(1, 1, 2, 1)),
    "ravlt": dict(embed_dims=(32, 32, 64, 64), depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), head_hidden_size=48),
}
# variants whose tiny instance is the same network as another's (same parameters, same eval outputs: the variants
# differ only in sizes the tiny config overrides, or in training-only settings); tests/test_deploy.py checks this,
# and runs its slow per-model deploy checks on DISTINCT only
SAME_TINY_NETWORK = {"vig_b": "vig_s", "vig_h_s": "vig_h_t", "vig_h_b": "vig_h_t", "ravlt_s": "ravlt_t",
                     "ravlt_b": "ravlt_t", "ravlt_l": "ravlt_t", "vmamba_s": "vmamba_t", "vmamba_b": "vmamba_t",
                     "vim_s": "vim_t", "vim_b": "vim_t"}
DISTINCT = [n for n in ALL if n not in SAME_TINY_NETWORK]
SMALL = 64  # test resolution: divisible by 32, keeps the full-size models quick on CPU

_models = {}


def layout(name):
    return MODELS[name][1]


def tiny_args(name):
    return TINY_ARGS[MODELS[name][2]]


def get_model(name, **kwargs):
    """Full-size models are cached (building the large ones costs seconds); callers must not mutate them."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _models:
        _models[key] = timm.create_model(name, **kwargs).eval()
    return _models[key]


def tiny(name, **kwargs):
    """A small instance of a variant (its flags kept, its size shrunk) for tests that mutate or train it."""
    return timm.create_model(name, **tiny_args(name), **kwargs)


def load_tool(name):
    """tools/<name>.py as the module ``name`` (the tools are scripts, not a package), registered in sys.modules
    as running the script would make it importable by its siblings (pickling and dataclasses need that too)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
