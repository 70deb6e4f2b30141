"""Backend selection shared by every operator in ``visionlin.kernels``.

Each operator has a vectorised PyTorch path (runs everywhere, is the CPU path and the oracle the
tests compare against) and, where written, a fused Triton path. ``auto`` picks Triton for CUDA
tensors when it is available and the PyTorch path otherwise. A backend can be forced per call
(``backend=``), for a block of code (``with use_backend('torch'):``) or for the process
(``VISIONLIN_KERNEL_BACKEND=torch``). ``last_backend(op)`` says which path an op took last.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, Optional

import torch

BACKENDS = ("auto", "torch", "triton")
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
                    triton_supports: bool = True) -> str:
    """Decide the path for one call of ``op`` on tensors living on ``device``.

    ``triton_supports`` says whether the Triton path handles this call's shapes and dtypes: 'auto'
    then falls back to the PyTorch path, while an explicit 'triton' lets the kernel raise its error.
    """
    wanted = requested_backend(backend)
    if wanted == "auto":
        use_triton = has_triton_impl and triton_supports and device.type == "cuda" and triton_available()
        wanted = "triton" if use_triton else "torch"
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
    """The backend the last call of ``op`` used in this process ('torch' or 'triton'), or None."""
    return _last.get(op)
