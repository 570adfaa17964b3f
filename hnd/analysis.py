"""Per-layer sizes and costs of teachers and students, and where the split leaves them.

A model is flattened into the layers that run one after another: ``nn.Sequential``
containers are opened (DenseNet blocks become one concatenating step per dense layer), and
a traced part (``GraphModule``, :mod:`hnd.tracing`) runs node by node. A dummy batch of one
image is run through them while ``torch.utils.flop_counter`` counts multiply-accumulates
(convolutions and linear layers, as the original did). By default this runs on the ``meta``
device: no weights, no real arithmetic, instant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from math import prod

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.densenet import _DenseBlock

from hnd import tracing
from hnd.models import create_model
from hnd.registry import ModelSpec
from hnd.students import Student
from hnd.teachers import on_meta, split_teacher, teacher_stages

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


# step(name, type name, module or None, part, thunk) -> thunk's value
Step = Callable[[str, str, "nn.Module | None", str, Callable], object]


def walk_layers(parts: list[tuple[str, nn.Module]], x: torch.Tensor, step: Step) -> torch.Tensor:
    """Run ``x`` through each part layer by layer, handing each layer to ``step``: the
    sequential layers of a module, the computing nodes of a ``GraphModule``."""
    for part, module in parts:
        if isinstance(module, fx.GraphModule):
            x = tracing.NodeSteps(module, part, lambda n, t, m, thunk, part=part: step(n, t, m, part, thunk)).run(x)
            continue
        for name, layer in sequential_layers(module, part):
            x = step(name, type(getattr(layer, "layer", layer)).__name__, layer, part, lambda: layer(x))
    return x


@dataclass(frozen=True)
class LayerRow:
    """One layer: what it outputs per image and what it costs."""

    name: str
    type: str
    part: str  # teacher: head | tail; student: encoder | decoder | tail
    output_shape: tuple[int, ...]  # per image, e.g. (C, H, W)
    params: int
    macs: int
    cum_macs: int
    cut: bool = True  # the model can be split after this layer (one tensor crosses)

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
    """Run ``x`` (one image) through each part's layers, recording rows. A parameter used
    twice (a module called twice) is counted once."""
    rows: list[LayerRow] = []
    seen: set[int] = set()  # ids of parameters counted (they live as long as the model)
    cuts = {part: {f"{part}.{p.node}" for p in tracing.split_points(m)}
            for part, m in parts if isinstance(m, fx.GraphModule)}

    def step(name, kind, module, part, thunk):
        with FlopCounterMode(display=False) as counter:
            out = thunk()
        params = 0
        if module is not None:
            fresh = [p for p in module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in fresh)
            params = sum(p.numel() for p in fresh)
        if isinstance(out, torch.Tensor):
            macs = counter.get_total_flops() // 2
            rows.append(LayerRow(name, kind, part, tuple(out.shape[1:]), params, macs,
                                 (rows[-1].cum_macs if rows else 0) + macs,
                                 part not in cuts or name in cuts[part]))
        return out

    walk_layers(parts, x, step)
    # The end of each part is a cut by construction.
    ends = {r.part: i for i, r in enumerate(rows)}
    return [r if r.cut or ends[r.part] != i else LayerRow(**{**asdict(r), "cut": True}) for i, r in enumerate(rows)]


def _totals(rows: list[LayerRow], parts: set[str]) -> tuple[int, int]:
    chosen = [r for r in rows if r.part in parts]
    return sum(r.params for r in chosen), sum(r.macs for r in chosen)


def analyze_model(spec: ModelSpec, model: nn.Module, split_point: str | None = None) -> Analysis:
    """Analyse an already built model (a teacher cut at ``split_point``, default the spec's,
    or a :class:`Student`) on the device its parameters live on."""
    size = spec.input_size
    x = torch.zeros(1, 3, size, size, device=_device_of(model))
    if spec.is_student:
        if not isinstance(model, Student):
            raise TypeError(f"{spec} is a student but the model is a {type(model).__name__}")
        rows = profile_layers([("encoder", model.head.encoder), ("decoder", model.head.decoder),
                               ("tail", model.tail)], x)
        device_parts, head_parts, split = {"encoder"}, {"encoder", "decoder"}, "bottleneck"
    else:
        split = split_point or spec.split_point
        head, tail = split_teacher(spec.teacher, model, split)
        rows = profile_layers([("head", head), ("tail", tail)], x)
        device_parts = head_parts = {"head"}
    last_device = [r for r in rows if r.part in device_parts][-1]
    last_head = [r for r in rows if r.part in head_parts][-1]
    head_params, head_macs = _totals(rows, head_parts)
    encoder_params, encoder_macs = _totals(rows, device_parts)
    tail_params, tail_macs = _totals(rows, {"tail"})
    name = str(spec) if spec.is_student or split == spec.split_point else f"{spec.teacher.name}@{split}"
    summary = Summary(
        model=name, kind=spec.kind, teacher=spec.teacher.name, split_point=split,
        input_shape=(3, size, size),
        params=sum(r.params for r in rows), macs=rows[-1].cum_macs,
        head_params=head_params, head_macs=head_macs, head_output_shape=last_head.output_shape,
        encoder_params=encoder_params, encoder_macs=encoder_macs,
        tail_params=tail_params, tail_macs=tail_macs,
        bottleneck_shape=last_device.output_shape,
        bottleneck_bytes={k: last_device.bytes(k) for k in DTYPE_BYTES},
    )
    return Analysis(summary, rows)


def analyze(spec: ModelSpec, split_point: str | None = None) -> Analysis:
    """Analyse the model ``spec`` without weights (built on the meta device). The result depends on the
    architecture only, so it is computed once per model and split point (the planner and the
    explorer ask for the same ones on every change)."""
    return _analyze(spec, split_point)


@functools.lru_cache(maxsize=256)
def _analyze(spec: ModelSpec, split_point: str | None) -> Analysis:
    return analyze_model(spec, on_meta(lambda: create_model(spec, pretrained=False)), split_point)


@dataclass(frozen=True)
class SplitPointRow:
    """One place a teacher can be cut: what crosses the network there and what runs before it."""

    name: str
    kind: str  # stage (a paper family's stage list) | traced (a node of the traced graph)
    output_shape: tuple[int, ...]
    cum_macs: int  # device MACs: the teacher up to and including this point
    pct_macs: float
    pct_of_input: float

    def bytes(self, dtype: str = "fp32") -> int:
        return prod(self.output_shape) * DTYPE_BYTES[dtype]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output_shape"] = list(self.output_shape)
        d["bytes"] = {k: self.bytes(k) for k in DTYPE_BYTES}
        return d


def split_point_rows(spec: ModelSpec) -> list[SplitPointRow]:
    """Every valid split point of ``model``'s teacher, in order: a paper family's stages
    first, then every point of the traced graph (any of these names is a valid ``@POINT``)."""
    teacher = on_meta(lambda: create_model(spec.as_teacher(), pretrained=False))
    size = spec.input_size
    x = torch.zeros(1, 3, size, size, device=_device_of(teacher))
    n_input = 3 * size * size
    out: list[SplitPointRow] = []

    def row(name: str, kind: str, shape: tuple, cum: int, total: int) -> SplitPointRow:
        return SplitPointRow(name, kind, shape, cum, 100.0 * cum / total, 100.0 * prod(shape) / n_input)

    if spec.teacher.staged:
        stages = [(n, m) for n, m in teacher_stages(spec.teacher, teacher) if n != "transform_input"]
        rows = profile_layers(stages, x)
        total = rows[-1].cum_macs
        for name, _ in stages[:-1]:
            last = [r for r in rows if r.part == name][-1]
            out.append(row(name, "stage", last.output_shape, last.cum_macs, total))
    gm = tracing.trace(teacher)
    rows = {r.name.split(".", 1)[1]: r for r in profile_layers([("t", gm)], x)}
    total = max(r.cum_macs for r in rows.values())
    for p in tracing.split_points(gm):
        r = rows.get(p.node)
        if r is None:  # not a tensor (e.g. a size)
            continue
        out.append(row(p.name, "traced", r.output_shape, r.cum_macs, total))
    return out
