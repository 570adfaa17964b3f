"""Export a student's edge or server part to ONNX, for runtimes other than PyTorch.

The encoder (image batch -> bottleneck ``z``) is what an edge device runs; the server part
(``z`` -> logits: decoder + teacher tail) is what the server runs. Both are exported with a
dynamic batch axis and checked against PyTorch with onnxruntime.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hnd.encoder_bundle import EncoderBundle, sidecar_path
from hnd.entropy import coding_tables
from hnd.errors import HndError
from hnd.files import atomic_write
from hnd.students import Student

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


def example_part(model: Student, part: str, *, batch: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """(module, example input) for ``part`` of ``model``, in eval mode.

    The example image batch has the model's input size (``model.spec``: a checkpoint's own);
    the server part's example input is the encoder's output on it, so its shape is the real
    bottleneck shape.
    """
    if part not in PARTS:
        raise HndError(f"unknown part {part!r}; valid parts: {', '.join(PARTS)}")
    model.eval()
    encoder, server = (m.eval() for m in model.split())  # split() makes a new, training-mode wrapper
    size = model.spec.input_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))  # [B, 3, S, S]
    if part == "encoder":
        return encoder, x
    with torch.no_grad():
        return server, encoder(x)  # z: [B, C, H', W']


def _windows(size: int, out: int) -> tuple[int, int] | None:
    """(kernel, stride) of the fixed average pool that equals adaptive average pooling from
    ``size`` to ``out`` values, if its windows are all alike (e.g. 29 -> 28: 2, 1); else None."""
    starts = [j * size // out for j in range(out)]
    ends = [-(-(j + 1) * size // out) for j in range(out)]
    kernel, stride = ends[0] - starts[0], (starts[1] - starts[0]) if out > 1 else 1
    same = all(e - b == kernel and b == j * stride for j, (b, e) in enumerate(zip(starts, ends)))
    return (kernel, stride) if same and stride > 0 and (size - kernel) // stride + 1 == out else None


def fixed_pools(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """``module``, or a copy of it in which every adaptive average pool whose input size on
    ``x`` is not a multiple of its output size is the equal fixed :class:`~torch.nn.AvgPool2d`.

    The ONNX exporter refuses such adaptive pools (a generic student's decoder pools 29x29 to
    the teacher head's 28x28), but at a fixed input size they are plain average pools. The
    module itself is left as it is.
    """
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_, args) -> None:  # a pre-hook returning a value would replace the input
            seen.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in module.named_modules()
             if isinstance(m, nn.AdaptiveAvgPool2d)]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for hook in hooks:
            hook.remove()
    swaps = {}
    for name, sizes in seen.items():
        out = module.get_submodule(name).output_size
        out = (out, out) if isinstance(out, int) else out
        out = tuple(size if o is None else o for size, o in zip(sizes, out))
        if all(size % o == 0 for size, o in zip(sizes, out)):
            continue  # the exporter handles these
        found = [_windows(size, o) for size, o in zip(sizes, out)]
        if None not in found:
            swaps[name] = nn.AvgPool2d(tuple(k for k, _ in found), tuple(s for _, s in found))
    if not swaps:
        return module
    module = copy.deepcopy(module)
    for name, pool in swaps.items():
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, pool)
    return module


def onnx_bytes(module: nn.Module, x: torch.Tensor, part: str, *, opset: int | None = None) -> bytes:
    """Serialize ``module`` (traced on ``x``) to ONNX with a dynamic batch axis; adaptive
    pools are exported as the fixed pools they are at ``x``'s size (:func:`fixed_pools`)."""
    _require("onnx")
    inp, out = _NAMES[part]
    buffer = io.BytesIO()
    module.eval()
    module = fixed_pools(module, x)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter is deprecated but needs no extra packages and
        # handles these plain conv nets exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=[inp], output_names=[out],
                          dynamic_axes={inp: {0: "batch"}, out: {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class OnnxExport:
    """A written ONNX file and its check against PyTorch on an example batch."""

    path: Path
    size_bytes: int
    max_abs_diff: float  # onnxruntime vs PyTorch
    batch: int


def export_onnx(model: Student, part: str, out: str | os.PathLike, *, opset: int | None = None) -> OnnxExport:
    """Write ``part`` (``encoder`` or ``server``) of ``model`` to ``out`` as ONNX (atomically)
    and check it with onnxruntime against PyTorch. An encoder gets its sidecar beside it
    (:class:`hnd.encoder_bundle.EncoderBundle`: what the device needs besides the file)."""
    module, x = example_part(model, part)
    data = onnx_bytes(module, x, part, opset=opset)
    out = Path(out)
    atomic_write(out, lambda f: f.write(data))
    done = OnnxExport(out, len(data), check_onnx(out, module, x), x.shape[0])
    if part == "encoder":
        with torch.no_grad():
            shape = tuple(module(x).shape[1:])  # [C, H', W']
        bundle = EncoderBundle(out, str(model.spec), model.spec.to_dict(), model.spec.preprocessing(), shape,
                               coding_tables(model.prior))
        text = json.dumps(bundle.to_dict(), indent=1) + "\n"
        atomic_write(sidecar_path(out), lambda f: f.write(text.encode()))
    return done


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
