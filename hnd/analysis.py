"""Per-layer sizes and costs of teachers and students, and where the split leaves them.

A model is flattened into the modules that run one after another (``nn.Sequential``
containers are opened; DenseNet blocks become one concatenating step per dense layer),
and a dummy batch of one image is run through them while ``torch.utils.flop_counter``
counts multiply-accumulates (convolutions and linear layers, as the original did).
By default this runs on the ``meta`` device: no weights, no real arithmetic, instant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import prod

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.densenet import _DenseBlock

from hnd.models import build_model, input_size, resolve
from hnd.students import Student
from hnd.teachers import split_teacher, teacher_spec

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


class DenseLayerStep(nn.Module):
    """One dense layer as a sequential step: ``cat([x, layer(x)])``, as its block does."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layer(x)], 1)


def sequential_layers(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs that, run in order, compute ``module(x)``."""
    if isinstance(module, nn.Sequential):
        return [row for n, m in module.named_children() for row in sequential_layers(m, f"{prefix}.{n}")]
    if isinstance(module, _DenseBlock):
        return [(f"{prefix}.{n}", DenseLayerStep(m)) for n, m in module.named_children()]
    return [(prefix, module)]


@dataclass(frozen=True)
class LayerRow:
    """One sequential layer: what it outputs per image and what it costs."""

    name: str
    type: str
    part: str  # teacher: head | tail; student: encoder | decoder | tail
    output_shape: tuple[int, ...]  # per image, e.g. (C, H, W)
    params: int
    macs: int
    cum_macs: int

    @property
    def numel(self) -> int:
        return prod(self.output_shape)

    def bytes(self, dtype: str = "fp32") -> int:
        return self.numel * DTYPE_BYTES[dtype]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output_shape"] = list(self.output_shape)
        d["bytes"] = {k: self.bytes(k) for k in DTYPE_BYTES}
        return d


@dataclass(frozen=True)
class Summary:
    """Totals for a model split in two.

    For a student, the device runs the encoder and sends the bottleneck ``z``; the head is
    encoder + decoder. For a teacher split at ``split_point``, the device runs the teacher
    head and sends its output, so ``encoder_*`` equal ``head_*`` and ``bottleneck_shape``
    is the head's output shape.
    """

    model: str
    kind: str  # teacher | student
    teacher: str
    split_point: str
    input_shape: tuple[int, ...]
    params: int
    macs: int
    head_params: int
    head_macs: int
    head_output_shape: tuple[int, ...]
    encoder_params: int
    encoder_macs: int
    tail_params: int
    tail_macs: int
    bottleneck_shape: tuple[int, ...]
    bottleneck_bytes: dict = field(default_factory=dict)  # per image, by dtype

    @property
    def bottleneck_pct_of_input(self) -> float:
        """Bottleneck size as % of the input tensor's (same dtype for both)."""
        return 100.0 * prod(self.bottleneck_shape) / prod(self.input_shape)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["bottleneck_pct_of_input"] = self.bottleneck_pct_of_input
        return d


@dataclass(frozen=True)
class Analysis:
    summary: Summary
    rows: list[LayerRow]

    def to_dict(self) -> dict:
        return {"summary": self.summary.to_dict(), "layers": [r.to_dict() for r in self.rows]}

    def smaller_than_input(self) -> list[LayerRow]:
        """Candidate split points: layers whose output holds fewer values than the input."""
        return [r for r in self.rows if r.numel < prod(self.summary.input_shape)]


def compare_heads(teacher: Analysis, student: Analysis) -> dict:
    """What running the student's encoder instead of the teacher head changes on the device."""
    t, s = teacher.summary, student.summary
    return {
        "teacher": t.teacher, "channels": s.bottleneck_shape[0],
        "teacher_head_params": t.head_params, "teacher_head_macs": t.head_macs,
        "encoder_params": s.encoder_params, "encoder_macs": s.encoder_macs,
        "macs_reduction_pct": 100.0 * (1 - s.encoder_macs / t.head_macs),
        "bottleneck_shape": "x".join(map(str, s.bottleneck_shape)),
        **{f"bytes_{k}": v for k, v in s.bottleneck_bytes.items()},
        "pct_of_input": s.bottleneck_pct_of_input,
        "teacher_split_bytes_fp32": t.bottleneck_bytes["fp32"],
    }


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def profile_layers(parts: list[tuple[str, nn.Module]], x: torch.Tensor) -> list[LayerRow]:
    """Run ``x`` (one image) through each part's sequential layers, recording rows."""
    rows, cum = [], 0
    for part, module in parts:
        for name, layer in sequential_layers(module, part):
            with FlopCounterMode(display=False) as counter:
                x = layer(x)
            macs = counter.get_total_flops() // 2
            cum += macs
            rows.append(LayerRow(name, type(getattr(layer, "layer", layer)).__name__, part,
                                 tuple(x.shape[1:]), sum(p.numel() for p in layer.parameters()), macs, cum))
    return rows


def _totals(rows: list[LayerRow], parts: set[str]) -> tuple[int, int]:
    chosen = [r for r in rows if r.part in parts]
    return sum(r.params for r in chosen), sum(r.macs for r in chosen)


def analyze_model(name: str, model: nn.Module, split_point: str | None = None) -> Analysis:
    """Analyse an already built model ``name`` (a teacher cut at ``split_point``, default
    the official one, or a :class:`Student`) on the device its parameters live on."""
    teacher, student = resolve(name)
    size = input_size(name)
    x = torch.zeros(1, 3, size, size, device=_device_of(model))
    if student is not None:
        if not isinstance(model, Student):
            raise TypeError(f"{name} is a student name but the model is a {type(model).__name__}")
        rows = profile_layers([("encoder", model.head.encoder), ("decoder", model.head.decoder),
                               ("tail", model.tail)], x)
        device_parts, head_parts, split = {"encoder"}, {"encoder", "decoder"}, "bottleneck"
    else:
        split = split_point or teacher_spec(teacher).split_point
        head, tail = split_teacher(teacher, model, split)
        rows = profile_layers([("head", head), ("tail", tail)], x)
        device_parts = head_parts = {"head"}
    last_device = [r for r in rows if r.part in device_parts][-1]
    last_head = [r for r in rows if r.part in head_parts][-1]
    head_params, head_macs = _totals(rows, head_parts)
    encoder_params, encoder_macs = _totals(rows, device_parts)
    tail_params, tail_macs = _totals(rows, {"tail"})
    summary = Summary(
        model=name, kind="student" if student else "teacher", teacher=teacher, split_point=split,
        input_shape=(3, size, size),
        params=sum(r.params for r in rows), macs=rows[-1].cum_macs,
        head_params=head_params, head_macs=head_macs, head_output_shape=last_head.output_shape,
        encoder_params=encoder_params, encoder_macs=encoder_macs,
        tail_params=tail_params, tail_macs=tail_macs,
        bottleneck_shape=last_device.output_shape,
        bottleneck_bytes={k: last_device.bytes(k) for k in DTYPE_BYTES},
    )
    return Analysis(summary, rows)


def analyze(name: str, split_point: str | None = None) -> Analysis:
    """Analyse model ``name`` without weights (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(name, pretrained=False)
    return analyze_model(name, model, split_point)
