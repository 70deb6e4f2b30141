"""The package as users get it: nothing in the clone shadows an installed package, and the built wheel works on
its own, outside the clone (every family, every operator's default CPU path, the compiled C path included)."""
import importlib.machinery
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from zoo import tiny_args

ROOT = Path(__file__).resolve().parents[1]

# Run with the working directory as sys.path[0], as `python -m pytest`, `python -c` and notebooks do. Prints
# where `kernels` came from; fails if diffusers' UNet (which imports the PyPI `kernels` through transformers)
# does not import.
SHADOW_CHECK = """
import sys
assert sys.path[0] in ('', '.'), sys.path[:2]
import kernels
print(kernels.__file__)
from diffusers import UNet2DConditionModel
"""


def regular_top_level_modules(folder: Path):
    """Names that Python's own path finder resolves to a regular module or package (not a namespace portion,
    which never shadows an installed package) when ``folder`` is on sys.path."""
    found = []
    for entry in sorted(os.listdir(folder)):
        name = entry.split(".")[0]
        if not name.isidentifier():
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, [str(folder)])
        if spec is not None and spec.origin is not None:
            found.append(f"{name} ({spec.origin})")
    return sorted(set(found))


def run_shadow_check(cwd: Path):
    return subprocess.run([sys.executable, "-c", SHADOW_CHECK], cwd=cwd, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)


def test_repo_root_holds_no_regular_top_level_module_but_visionlin():
    assert [m.split(" ")[0] for m in regular_top_level_modules(ROOT)] == ["visionlin"]


def test_the_finder_used_above_sees_a_regular_package(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "tools").mkdir()                      # a namespace portion: not reported
    (tmp_path / "setup_helpers.py").write_text("")
    assert [m.split(" ")[0] for m in regular_top_level_modules(tmp_path)] == ["kernels", "setup_helpers"]


def test_installed_kernels_package_is_not_shadowed_from_the_repo_root():
    installed = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    result = run_shadow_check(ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.split("\n")[0].strip()).resolve() == installed


def test_shadow_check_fails_on_a_root_with_a_regular_kernels_package(tmp_path):
    # the layout before the fix: a top-level kernels/__init__.py next to where Python starts
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text('"""visionlin\'s operators"""\n')
    result = run_shadow_check(tmp_path)
    assert result.returncode != 0 or str(tmp_path) in result.stdout


# Runs in a fresh interpreter outside the clone with only the installed wheel providing visionlin.
WHEEL_SMOKE = r"""
import json, sys
from pathlib import Path
site, tiny = Path(sys.argv[1]).resolve(), json.loads(sys.argv[2])
# drop the clone's editable-install finder, so a module missing from the wheel cannot come from the clone
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
import torch, timm, visionlin
from visionlin.kernels import (bidirectional_gla, cross_selective_scan, last_backend, linear_attention,
                               selective_scan, use_backend)
from visionlin.kernels.ssm import bidirectional_conv1d_silu, cpu_kernel_available
from visionlin.diffusion import LinDiTTransformer2DModel
torch.manual_seed(0)
out = {}
for name, kwargs in tiny.items():
    model = timm.create_model(name, num_classes=7, **kwargs).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 7) and torch.isfinite(y).all(), name
    out[name] = "ok"
dit = LinDiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8).eval()
with torch.no_grad():
    s = dit(torch.randn(1, 4, 8, 8), timestep=torch.tensor([3]), class_labels=torch.tensor([1])).sample
assert s.shape == (1, 4, 8, 8) and torch.isfinite(s).all()
out["lindit"] = "ok"
out["cpu_kernel_available"] = cpu_kernel_available()
b, n, h, d, L = 1, 37, 2, 16, 9
ops = {
    "bidirectional_gla": lambda: bidirectional_gla(torch.randn(b, n, h, d), torch.randn(b, n, h, d),
                                                   torch.randn(b, n, h, d), -torch.rand(b, n, h, d),
                                                   -torch.rand(b, n, h, d)),
    "linear_attention": lambda: linear_attention(torch.rand(b, n, h, d), torch.rand(b, n, h, d),
                                                 torch.randn(b, n, h, d)),
    "selective_scan": lambda: selective_scan(torch.randn(2, 32, L), torch.rand(2, 32, L), -torch.rand(32, 4),
                                             torch.randn(2, 4, L), torch.randn(2, 4, L), torch.randn(32)),
    "cross_selective_scan": lambda: cross_selective_scan(torch.randn(1, 32, 3, 3), torch.rand(1, 4, 32, 3, 3),
                                                         -torch.rand(4, 32, 4), torch.randn(1, 4, 4, 3, 3),
                                                         torch.randn(1, 4, 4, 3, 3), torch.randn(4, 32)),
    "bidirectional_conv1d_silu": lambda: bidirectional_conv1d_silu(torch.randn(1, L, 32), torch.randn(2, 32, 4),
                                                                   torch.randn(2, 32)),
}
for name, op in ops.items():
    torch.manual_seed(1)
    y = op()
    ran = last_backend(name)
    torch.manual_seed(1)
    with use_backend("torch"):
        ref = op()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    out[name] = ran
out["files"] = sorted({str(Path(m.__file__).resolve()) for k, m in sys.modules.items()
                       if k.split(".")[0] == "visionlin" and getattr(m, "__file__", None)})
out["site"] = str(site)
print("RESULT " + json.dumps(out))
"""


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel --no-deps .`` on a copy of only what the build reads, so the clone gets no build/ folder."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("visionlin", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)], check=True,
                   timeout=600)
    (wheel,) = dist.glob("visionlin-*.whl")
    return wheel


@pytest.mark.slow
def test_built_wheel_works_outside_the_clone(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"visionlin/{p.relative_to(ROOT / 'visionlin').as_posix()}" for p in (ROOT / "visionlin").rglob("*.py")}
    sources |= {f"visionlin/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}" for p in (ROOT / "kernels").rglob("*.py")}
    assert sources - names == set(), "package files missing from the wheel"
    assert not [n for n in names if n.split("/")[0] in ("kernels", "tools", "tests", "configs")], sorted(names)

    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(site), VISIONLIN_CACHE=str(tmp_path / "cache"))
    tiny = {name: tiny_args(name) for name in ("vig_t", "vig_h_t", "ravlt_t", "vim_t", "vmamba_t")}
    result = subprocess.run([sys.executable, "-c", WHEEL_SMOKE, str(site), json.dumps(tiny)], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert all(out[name] == "ok" for name in (*tiny, "lindit"))
    # the C path was compiled from the wheel's sources into the scratch cache and is what ran on CPU
    assert out["cpu_kernel_available"] and list((tmp_path / "cache").rglob("*.so"))
    assert [out[op] for op in ("selective_scan", "cross_selective_scan", "bidirectional_conv1d_silu")] == ["cpu"] * 3
    assert out["bidirectional_gla"] == out["linear_attention"] == "torch"
    outside = [f for f in out["files"] if not f.startswith(str(site.resolve()))]
    assert outside == [], f"visionlin modules loaded from outside the installed wheel: {outside}"


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def lock_pins(text: str) -> dict:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not name==version"
            pins[canonical(name)] = version.strip()
    return pins


def dev_closure() -> dict:
    """Every distribution the installed ``visionlin[dev]`` needs on this platform (markers evaluated), with the
    extras asked of it: name -> installed version."""
    from packaging.requirements import Requirement
    todo, extras_of, versions = [("visionlin", frozenset({"dev"}))], {}, {}
    while todo:
        name, extras = todo.pop()
        if extras_of.get(name, None) is not None and extras <= extras_of[name]:
            continue
        extras_of[name] = extras_of.get(name, frozenset()) | extras
        dist = importlib.metadata.distribution(name)
        versions[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras_of[name] | {""}):
                todo.append((canonical(req.name), frozenset(req.extras)))
    versions.pop("visionlin")
    return versions


def test_lock_parser_rejects_a_range():
    with pytest.raises(AssertionError, match="not name==version"):
        lock_pins("torch>=2.4\n")


def test_lock_pins_exactly_what_the_dev_install_resolved():
    pins = lock_pins((ROOT / "constraints.txt").read_text())
    installed = dev_closure()
    assert {"torch", "timm", "diffusers", "transformers", "kernels", "triton"} <= set(installed)
    assert sorted(set(installed) - set(pins)) == [], "installed for [dev] but not in the lock (python .ci/lock.py)"
    differ = {n: (v, pins[n]) for n, v in installed.items() if v != pins[n]}
    assert differ == {}, "installed version differs from the lock: (installed, locked)"
