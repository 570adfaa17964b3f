"""Export a student's edge or server part to ONNX, for runtimes other than PyTorch.

The encoder (image batch -> bottleneck ``z``) is what an edge device runs; the server part
(``z`` -> logits: decoder + teacher tail) is what the server runs. Both are exported with a
dynamic batch axis and checked against PyTorch with onnxruntime.
"""

from __future__ import annotations

import importlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from hnd.errors import HndError

PARTS = ("encoder", "server")
FORMATS = ("onnx",)
_NAMES = {"encoder": ("image", "z"), "server": ("z", "logits")}


def _require(module: str):
    """Import an optional deploy dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise HndError(f"{module} is not installed; install the deploy extra: "
                       'pip install -e ".[deploy]"') from None


def load_part(name: str, part: str, *, checkpoint: str | os.PathLike | None = None, pretrained: bool = True,
              batch: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """(module, example input) for ``part`` of student ``name``, in eval mode.

    The server part's example input is the encoder's output on a random image batch, so
    its shape is the real bottleneck shape.
    """
    from hnd.models import input_size, resolve

    if part not in PARTS:
        raise HndError(f"unknown part {part!r}; valid parts: {', '.join(PARTS)}")
    if resolve(name)[1] is None:
        raise HndError(f"{name} is a teacher and has no edge/server split; give a student name, "
                       "e.g. densenet169_head_mimic-ver2b-3ch")
    if checkpoint is not None:
        from hnd.checkpoints import load_model

        model = load_model(name, checkpoint)
    else:
        from hnd.models import build_model

        model = build_model(name, pretrained=pretrained)
    model.eval()
    encoder, server = (m.eval() for m in model.split())  # split() makes a new, training-mode wrapper
    size = input_size(name)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    if part == "encoder":
        return encoder, x
    with torch.no_grad():
        return server, encoder(x)


def onnx_bytes(module: nn.Module, x: torch.Tensor, part: str, *, opset: int | None = None) -> bytes:
    """Serialize ``module`` (traced on ``x``) to ONNX with a dynamic batch axis."""
    _require("onnx")
    inp, out = _NAMES[part]
    buffer = io.BytesIO()
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter is deprecated but needs no extra packages and
        # handles these plain conv nets exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=[inp], output_names=[out],
                          dynamic_axes={inp: {0: "batch"}, out: {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True)
    return buffer.getvalue()


def export_onnx(name: str, part: str, out: str | os.PathLike, *, checkpoint: str | None = None,
                pretrained: bool = True, opset: int | None = None) -> Path:
    """Write ``part`` (``encoder`` or ``server``) of student ``name`` to ``out`` as ONNX."""
    from hnd.checkpoints import atomic_write

    _require("onnx")
    module, x = load_part(name, part, checkpoint=checkpoint, pretrained=pretrained)
    data = onnx_bytes(module, x, part, opset=opset)
    out = Path(out)
    atomic_write(out, lambda f: f.write(data))
    return out


def run_onnx(path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """Run the ONNX model at ``path`` on ``x`` with onnxruntime (CPU)."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    return torch.from_numpy(session.run(None, feed)[0])


def check_onnx(path: str | os.PathLike, model_part: nn.Module, x: torch.Tensor) -> float:
    """Max abs difference between onnxruntime on ``path`` and ``model_part`` (PyTorch) on ``x``."""
    model_part.eval()
    with torch.no_grad():
        expected = model_part(x)
    got = run_onnx(path, x)
    if got.shape != expected.shape:
        raise HndError(f"{path} gives shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    return float((got - expected.cpu()).abs().max())
