"""Backend selection shared by every operator in ``visionlin.kernels``.

Each operator has a vectorised PyTorch path (runs everywhere and is the oracle the tests compare
against) and, where written, a fused Triton path (CUDA) and a compiled CPU path ('cpu', built with
the system C compiler on first use). ``auto`` picks Triton for CUDA tensors when it is available,
the compiled CPU path for CPU tensors when the op has one that takes the call and it builds, and
the PyTorch path otherwise. A backend can be forced per call
(``backend=``), for a block of code (``with use_backend('torch'):``) or for the process
(``VISIONLIN_KERNEL_BACKEND=torch``). ``last_backend(op)`` says which path an op took last.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Dict, Iterator, Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cpu")
_ENV_VAR = "VISIONLIN_KERNEL_BACKEND"

_state = threading.local()
_last: Dict[str, str] = {}


def _check_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_available() -> bool:
    """True when Triton can be imported (a GPU driver or TRITON_INTERPRET=1 is still needed)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tracing() -> bool:
    """True while torch.compile, torch.export or the ONNX exporter trace the call. The PyTorch paths then take
    their static branch (the one exact for every input) instead of choosing by a tensor's values, so that one
    traced graph holds for all inputs. TorchScript (control flow in the graph) keeps the value-based choice."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def onnx_exporting() -> bool:
    """True inside ``torch.onnx.export``: the PyTorch paths then pass chunk states with ``torch.scan`` (an ONNX Scan
    op, one loop body) instead of a Python loop that the exported graph would unroll (thousands of steps at 1024²)."""
    if torch.jit.is_scripting():
        return False
    return torch.onnx.is_in_onnx_export()


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Force a backend for every visionlin kernel called inside the block (thread-local)."""
    _check_name(backend)
    previous = getattr(_state, "backend", None)
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = previous


def requested_backend(backend: Optional[str]) -> str:
    """The backend asked for: the call's argument, else the innermost ``use_backend``, else the env."""
    if backend is None:
        backend = getattr(_state, "backend", None)
    if backend is None:
        backend = os.environ.get(_ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{_ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    return _check_name(backend)


def resolve_backend(op: str, backend: Optional[str], device: torch.device, has_triton_impl: bool,
                    triton_supports: bool = True, cpu_impl: Optional[Callable[[], bool]] = None,
                    cpu_supports: bool = False) -> str:
    """Decide the path for one call of ``op`` on tensors living on ``device``.

    ``triton_supports`` / ``cpu_supports`` say whether the fused paths handle this call's shapes and
    dtypes: 'auto' then falls back to the PyTorch path, while an explicit request lets the kernel
    raise its error. ``cpu_impl`` is the op's compiled-CPU availability check (None: it has none).
    """
    wanted = requested_backend(backend)
    if wanted == "auto" and torch.onnx.is_in_onnx_export():
        wanted = "torch"  # ONNX holds standard ops only: the PyTorch path is what gets exported
    if wanted == "auto":
        use_triton = has_triton_impl and triton_supports and device.type == "cuda" and triton_available()
        use_cpu = cpu_impl is not None and cpu_supports and device.type == "cpu" and cpu_impl()
        wanted = "triton" if use_triton else "cpu" if use_cpu else "torch"
    elif wanted == "cpu":
        if cpu_impl is None:
            raise ValueError(f"{op}: no compiled CPU implementation; use backend='torch'")
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpu' needs CPU tensors (got {device.type})")
    elif wanted == "triton":
        if not has_triton_impl:
            raise ValueError(f"{op}: no Triton implementation is available; use backend='torch'")
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' was requested but Triton is not installed "
                               "(pip install 'visionlin[triton]')")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(f"{op}: backend='triton' needs CUDA tensors (got {device.type}); "
                             "set TRITON_INTERPRET=1 to run the Triton kernels on CPU for testing")
    _last[op] = wanted
    return wanted


def last_backend(op: str) -> Optional[str]:
    """The backend the last call of ``op`` used in this process ('torch', 'triton' or 'cpu'), or None."""
    return _last.get(op)
