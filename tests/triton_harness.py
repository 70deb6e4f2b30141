"""Running Triton kernel modules in tests: on CUDA as compiled, on CPU under Triton's interpreter.

Triton 3.8 reads TRITON_INTERPRET when a function is decorated with ``@triton.jit``: at ``import
triton`` for its own library functions (``tl.cumsum`` ...) and at import of a kernel module for ours;
the dispatcher reads it again on every call. ``import_kernels`` imports a kernel module with the
variable set and puts it back as it was (other modules see no change); test modules set it again
only while their own tests run (``interpreter_env``). If Triton was already imported in compiled mode
(conftest.py imports it in interpreter mode first when there is no GPU), the kernels cannot run on
CPU in this process: the tests are then skipped and ``run_in_fresh_process`` runs the module again.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def import_kernels(module_name: str, kernel_name: str):
    """The kernel module, with kernels runnable on DEVICE, or None when that is impossible in-process
    (``kernel_name``: one of its ``@triton.jit`` functions, to check how it was decorated)."""
    if not HAS_TRITON:
        return None
    if DEVICE.type == "cuda":
        return importlib.import_module(module_name)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language as tl
        if type(tl.cumsum).__name__ != "InterpretedFunction":
            return None                     # triton came in compiled mode before this module
        module = importlib.import_module(module_name)
        if type(getattr(module, kernel_name)).__name__ != "InterpretedFunction":
            module = importlib.reload(module)
        return module
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def in_process_marker(module):
    return pytest.mark.skipif(module is None, reason=(
        "Triton was imported in compiled mode first; see test_interpreter_suite_in_fresh_process" if HAS_TRITON
        else "Triton is not installed"))


def interpreter_env(monkeypatch, module) -> None:
    """Call from an autouse fixture: the interpreter on while a CPU test of ``module`` runs."""
    if DEVICE.type == "cpu" and module is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# Prepended to every compile script: ``compile_only(module, names)`` replaces those kernels of the
# module by objects whose launches compile the kernel for Hopper instead of running it.
_COMPILE_ONLY = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ELEMENT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

class CompileOnly:
    def __init__(self, kernel):
        self.kernel = kernel
    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **constexprs):
            names = [p.name for p in self.kernel.params if not p.is_constexpr]
            sig = {n: ("*" + ELEMENT[a.dtype] if isinstance(a, torch.Tensor)
                       else "fp32" if isinstance(a, float) else "i32") for n, a in zip(names, args)}
            sig.update({n: "constexpr" for n in constexprs})
            src = ASTSource(self.kernel, sig, constexprs=constexprs)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        return launch

def compile_only(module, names):
    for name in names:
        setattr(module, name, CompileOnly(getattr(module, name)))
"""


def compile_for_hopper(script: str, tmp_path) -> None:
    """Run ``script`` (which calls the kernels after ``compile_only(...)`` and prints 'compiled') with
    real compilation for sm_90, no GPU needed: Triton's lowering and ptxas see every launch."""
    pytest.importorskip("triton")
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)            # compile for real, not from a cache
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ONLY + script], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


def run_in_fresh_process(test_file: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
