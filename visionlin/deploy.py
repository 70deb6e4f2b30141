"""Deploying a visionlin model: ``torch.export`` programs (``.pt2``) and ONNX files, each verified against
the eager model. ``tools/export.py`` is the command line on top of these functions.

* ``export_program`` traces with a dynamic batch and, where the model's graph allows any size, dynamic
  H and W (multiples of the model's stride); it says which dims came out dynamic.
* ``export_onnx`` runs ``torch.onnx.export(..., dynamo=True)``. Inside the ONNX exporter every
  visionlin operator takes its PyTorch path (see ``visionlin.kernels``), so the file holds standard
  ONNX ops only and runs in onnxruntime.
* ``script_model`` / ``save_script``: ``torch.jit.script`` (timm's scriptable layers). Scripted operators
  run their PyTorch paths (``torch.jit.is_scripting()`` selects them statically), so a saved script holds
  aten ops only and loads with plain ``torch.jit.load`` (or libtorch) without visionlin; its graph keeps the
  control flow, so batch and H/W stay free.

Which dims can be dynamic depends on the path traced. The PyTorch paths of the scans (GLA, selective
scan) pass chunk states in a loop whose length is tokens / chunk, which a graph fixes; the compiled
CPU and Triton operators are opaque to the trace and take any length. So ViG / ViG-H programs have a
dynamic batch only, Vim / VMamba programs also dynamic H/W (their CPU and Triton operators), RAVLT
both everywhere, and every ONNX file but RAVLT's has a fixed H/W (export one per resolution).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from ._io import atomic_file
from .kernels._dispatch import requested_backend

__all__ = ["stride_of", "export_program", "atomic_file", "write_atomic", "save_program", "load_program", "export_onnx",
           "onnx_session", "run_onnx", "script_model", "save_script", "load_script", "max_abs_error"]

MAX_BATCH = 1024
MAX_BLOCKS = 256  # dynamic H/W up to 256 strides (8192 px at stride 32)


def stride_of(model: nn.Module) -> int:
    """The factor H and W must be multiples of: the model's largest feature reduction (its patch stride)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no feature_info: not a visionlin / timm backbone")
    return max(int(i["reduction"]) for i in info)


def _dynamic_shapes(model: nn.Module, spatial: bool):
    dims: Dict[int, object] = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    if spatial:
        s = stride_of(model)
        dims[2] = s * torch.export.Dim("h_blocks", min=1, max=MAX_BLOCKS)
        dims[3] = s * torch.export.Dim("w_blocks", min=1, max=MAX_BLOCKS)
    return (dims,)


def export_program(model: nn.Module, example: torch.Tensor, dynamic: bool = True
                   ) -> Tuple[torch.export.ExportedProgram, Tuple[str, ...]]:
    """``torch.export`` the model on ``example`` (B, C, H, W). With ``dynamic``, the batch is dynamic and so
    are H and W where the traced graph allows any size (otherwise they stay fixed at the example's).
    Returns the program and the names of its dynamic dims."""
    model.eval()
    if not dynamic:
        return torch.export.export(model, (example,)), ()
    program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(model, True))
    # A graph whose loops run tokens / chunk times still exports, but with guards that pin the token count:
    # H/W count as dynamic only if the program also runs at twice the example's size.
    h, w = example.shape[-2:]
    try:
        program.module()(example.new_zeros(1, example.shape[1], 2 * h, 2 * w))
        return program, ("batch", "height", "width")
    except (AssertionError, RuntimeError):
        return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(model, False)), ("batch",)


def write_atomic(path: Union[str, Path], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_program(program: torch.export.ExportedProgram, path: Union[str, Path]) -> Path:
    """``torch.export.save`` written atomically (nothing half-written is left under ``path``)."""
    with atomic_file(path) as tmp:
        torch.export.save(program, tmp)
    return Path(path)


def load_program(path: Union[str, Path]) -> torch.export.ExportedProgram:
    """A saved ``.pt2`` program (``import visionlin`` registers the operators it may call)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no exported program at {str(path)!r}")
    return torch.export.load(path)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Union[str, Path], dynamic: bool = False,
                opset: Optional[int] = None) -> Tuple[Path, Tuple[str, ...]]:
    """Write the model as an ONNX file (atomically). With ``dynamic`` the batch is dynamic, and H/W too where
    the graph allows. Returns the path and the dynamic dims."""
    forced = requested_backend(None)
    if forced not in ("auto", "torch"):
        raise ValueError(f"backend {forced!r} is forced (use_backend / VISIONLIN_KERNEL_BACKEND), but its operators "
                         "cannot be exported to ONNX: the export decomposes the PyTorch paths ('auto' or 'torch')")
    model.eval()
    names: Tuple[str, ...] = ()
    with atomic_file(path) as tmp:
        kwargs = dict(dynamo=True, opset_version=opset, input_names=["image"], output_names=["output"],
                      verbose=False)
        program = None
        if dynamic:
            program, names = export_program(model, example, dynamic=True)
        onnx_program = torch.onnx.export(program if program is not None else model, (example,), **kwargs)
        onnx_program.save(str(tmp))
    return Path(path), names


def onnx_session(path: Union[str, Path], threads: Optional[int] = None):
    """An onnxruntime CPU session for the file."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("running ONNX files needs onnxruntime: pip install 'visionlin[deploy]'") from e
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, x: torch.Tensor) -> torch.Tensor:
    """One run of the session's single input on x (float32)."""
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().float().cpu().numpy()})[0])


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of an eval-mode model (build it under ``timm.layers.set_scriptable(True)`` as timm
    does for scripting); its operators run their PyTorch paths."""
    return torch.jit.script(model.eval())


def save_script(scripted: torch.jit.ScriptModule, path: Union[str, Path]) -> Path:
    """``torch.jit.save`` written atomically."""
    with atomic_file(path) as tmp:
        torch.jit.save(scripted, str(tmp))
    return Path(path)


def load_script(path: Union[str, Path]) -> torch.jit.ScriptModule:
    """A saved script (no visionlin needed to run it)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no TorchScript file at {str(path)!r}")
    return torch.jit.load(str(path))


def max_abs_error(out, ref) -> float:
    """max |out - ref| over a tensor or a sequence of tensors."""
    if isinstance(out, (list, tuple)):
        return max(max_abs_error(o, r) for o, r in zip(out, ref))
    return float((out.detach().double() - ref.detach().double()).abs().max())

