"""Cutting any classifier at any layer, through its ``torch.fx`` graph.

A teacher is traced in eval mode with torchvision's ``NodePathTracer`` (the tracer of
``torchvision.models.feature_extraction``, with its defaults: ``math`` and
``torchvision.ops`` functions wrapped, ``torchvision.ops`` modules kept whole; for timm's
models also the modules and functions that timm registers for its own FX feature
extraction), so every node carries a qualified name such as ``layer2.1.relu_1`` or
``features.3``.

A *split point* is a node after which exactly one value crosses from head to tail: that
node's output, a tensor rather than a tuple (parameters and buffers do not count; they stay
with the module that owns them). Inside a residual block the skip connection also crosses, so no point there is
valid. A module whose last node is a valid point names that point too (``layer2`` for the
node that ends ResNet's ``layer2``); the shortest such name is the point's display name.

:func:`cut` turns a traced teacher and one point into a head and a tail ``GraphModule``
that share the teacher's modules; ``tail(head(x)) == teacher(x)`` exactly in eval mode.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer

from hnd.errors import HndError

_CALLS = ("call_module", "call_function", "call_method")
NAME_KEY = "hnd_name"  # node.meta key holding the node's qualified name


def _leaf_modules() -> list[type]:
    """``torchvision.ops`` modules stay single nodes, as torchvision's feature extraction has it."""
    return [obj for obj in vars(torchvision.ops).values()
            if isinstance(obj, type) and issubclass(obj, nn.Module)]


def _timm_notrace() -> tuple[list, list]:
    """(modules, functions) that timm's own FX feature extraction keeps whole, when timm is
    loaded (a timm teacher was built); nothing otherwise, without importing timm."""
    layers = sys.modules.get("timm.layers")
    if layers is None:
        return [], []
    return list(layers.get_notrace_modules()), list(layers.get_notrace_functions())


def trace(model: nn.Module) -> fx.GraphModule:
    """The eval-mode graph of ``model``; each node's qualified name is in ``node.meta[NAME_KEY]``.
    The GraphModule shares ``model``'s modules (no copies)."""
    was_training = model.training
    timm_modules, timm_functions = _timm_notrace()
    tracer = NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=_leaf_modules() + timm_modules,
                            autowrap_functions=tuple(timm_functions))
    try:
        graph = tracer.trace(model.eval())
    except Exception as exc:  # fx raises many types for untraceable Python
        text = str(exc).strip().splitlines()
        raise HndError(f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
                       f"{text[0] if text else ''}); a teacher must be symbolically traceable "
                       "(no data-dependent control flow in forward)") from None
    finally:
        model.train(was_training)
    for node in graph.nodes:
        node.meta[NAME_KEY] = tracer.node_to_qualname.get(node, node.name)
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def node_name(node: fx.Node) -> str:
    return node.meta.get(NAME_KEY, node.name)


@dataclass(frozen=True)
class SplitPoint:
    """One valid cut of a traced teacher."""

    name: str  # display name: the shortest module name ending here, else the node's name
    node: str  # the node's qualified name
    index: int  # position among the graph's nodes
    aliases: tuple[str, ...]  # every name that selects this point


def _indexed(node: fx.Node) -> bool:
    """Whether ``node``'s users take items of it: a tuple (e.g. ``x.chunk(2)``), not one tensor."""
    return any(u.op == "call_function" and u.target is operator.getitem for u in node.users)


def stage_ends(points: list[str]) -> list[str]:
    """The split points (in the order run) that end a stage, where a reader would cut: a point's
    stage is its name up to the first part ending in a digit (``layer2.1.add`` -> ``layer2``,
    ``features.4.conv.0`` -> ``features.4``, ``denseblock1.denselayer3`` -> ``denseblock1``,
    ``stage3.2`` -> ``stage3``), else the whole name; the other points lie inside a stage."""
    def stage(point: str) -> str:
        parts = point.split(".")
        return ".".join(parts[:next((i + 1 for i, p in enumerate(parts) if p[-1:].isdigit()), len(parts))])

    return [p for p, after in zip(points, points[1:] + [None]) if after is None or stage(after) != stage(p)]


def split_points(gm: fx.GraphModule) -> list[SplitPoint]:
    """Every valid cut of ``gm`` in graph order (not after the last computing node: that
    would leave no tail)."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    final = max(i for i, n in enumerate(nodes) if n.op in _CALLS)
    live: set[fx.Node] = set()
    clean: list[fx.Node] = []
    ends: dict[int, list[fx.Node]] = {}
    for i, n in enumerate(nodes):
        for done in ends.pop(i, ()):
            live.discard(done)
        if n.op != "get_attr" and last_use[n] > i:
            live.add(n)
            ends.setdefault(last_use[n], []).append(n)
        if n.op in _CALLS and i < final and live == {n} and not _indexed(n):
            clean.append(n)
    # Module names: the last node inside each module names a point if that node is clean.
    last_in_module: dict[str, fx.Node] = {}
    for n in nodes:
        if n.op not in _CALLS:
            continue
        parts = node_name(n).split(".")
        for k in range(1, len(parts) + 1):
            last_in_module[".".join(parts[:k])] = n
    aliases: dict[fx.Node, list[str]] = {n: [] for n in clean}
    for module, n in last_in_module.items():
        if n in aliases and module != node_name(n):
            aliases[n].append(module)
    points = []
    for n in clean:
        names = sorted(aliases[n], key=lambda a: (a.count("."), len(a), a))
        display = names[0] if names else node_name(n)
        points.append(SplitPoint(display, node_name(n), index[n], tuple(dict.fromkeys([display, *names,
                                                                                          node_name(n)]))))
    return points


def find_split_point(gm: fx.GraphModule, name: str, points: list[SplitPoint] | None = None,
                     teacher: str = "the model") -> SplitPoint:
    """The point called ``name``; otherwise a one-line error naming the nearest valid points."""
    points = split_points(gm) if points is None else points
    for p in points:
        if name in p.aliases:
            return p
    nodes = [n for n in gm.graph.nodes if n.op in _CALLS]
    positions = {node_name(n): i for i, n in enumerate(gm.graph.nodes)}
    modules = {}
    for n in nodes:  # a module name selects its last node
        parts = node_name(n).split(".")
        for k in range(1, len(parts) + 1):
            modules[".".join(parts[:k])] = positions[node_name(n)]
    if name not in positions and name not in modules:
        sample = ", ".join(p.name for p in points[:8])
        raise HndError(f"{name!r} is not a layer of {teacher}; valid split points include {sample} "
                       f"(all {len(points)}: `hnd inspect {teacher} --split-points`)")
    at = positions.get(name, modules.get(name))
    if at == max(positions[node_name(n)] for n in nodes):
        raise HndError(f"{name!r} is the last layer of {teacher} (the classifier): a split there leaves no tail; "
                       f"the last valid split point is {points[-1].name}" if points else
                       f"{name!r} is the last layer of {teacher}: a split there leaves no tail")
    before = [p.name for p in points if p.index < at][-1:]
    after = [p.name for p in points if p.index > at][:1]
    nearest = " or ".join(before + after) or "none"
    raise HndError(f"{name!r} is not a clean cut of {teacher}: more than one tensor crosses there (e.g. inside a "
                   f"residual block); nearest valid split points: {nearest}")


def cut(gm: fx.GraphModule, point: SplitPoint) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(head, tail) of ``gm`` at ``point``; both share ``gm``'s modules."""
    nodes = list(gm.graph.nodes)
    at = nodes[point.index]
    head_graph, tail_graph = fx.Graph(), fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[:point.index + 1]:
        env[n] = head_graph.node_copy(n, lambda a: env[a])
    head_graph.output(env[at])

    tail_env: dict[fx.Node, fx.Node] = {}
    x = tail_graph.placeholder("x")
    x.meta[NAME_KEY] = "x"
    tail_env[at] = x

    def arg(a: fx.Node) -> fx.Node:
        if a not in tail_env:  # a parameter or buffer read before the cut: read it again here
            if a.op != "get_attr":
                raise AssertionError(f"{a} crosses the cut {point.name}")
            tail_env[a] = tail_graph.node_copy(a, arg)
        return tail_env[a]

    for n in nodes[point.index + 1:]:
        tail_env[n] = tail_graph.node_copy(n, arg)
    parts = []
    for graph, name in ((head_graph, "Head"), (tail_graph, "Tail")):
        part = fx.GraphModule(gm, graph, class_name=name)
        part.graph.eliminate_dead_code()
        part.recompile()
        parts.append(part)
    return parts[0], parts[1]


class NodeSteps(fx.Interpreter):
    """Runs a GraphModule node by node, handing each computing node to
    ``step(name, type_name, module_or_None, thunk)``, which must return ``thunk()``'s value
    (profiling wraps it in a FLOP counter, timing repeats it)."""

    def __init__(self, gm: fx.GraphModule, prefix: str, step: Callable):
        super().__init__(gm)
        self.prefix, self.step = prefix, step

    def run_node(self, n: fx.Node):
        if n.op not in _CALLS:
            return super().run_node(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        kind = type(module).__name__ if module is not None else (
            n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
        return self.step(f"{self.prefix}.{node_name(n)}", kind, module, lambda: super(NodeSteps, self).run_node(n))

