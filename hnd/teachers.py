"""Teachers: any torchvision image classifier (or timm's, or a user's own), its weights, and its split.

A teacher is resolved once into a :class:`TeacherSpec` that carries its facts: builder,
weights enum, input and resize sizes, interpolation, family. Seven teachers of the papers'
families are written out as ordered *stages* (top-level modules run one after another,
torchvision's functional tail steps turned into modules): their stage names and official
split points are the original's, and their students keep the original key layout. Every
other split, and every other teacher, is cut through its ``torch.fx`` graph
(:mod:`hnd.tracing`). Either way ``tail(head(x)) == teacher(x)`` exactly in eval mode.

One rule names the classifier: it is the teacher's last ``Linear`` layer (a last ``Conv2d``
where there is none, as in SqueezeNet); in a state_dict, the last weight with two or more
dimensions.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import os
import re
import socket
import urllib.error
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.inception import Inception3

from hnd import timm_teachers, tracing
from hnd.errors import HndError, describe_mismatch
from hnd.preprocessing import INTERPOLATIONS
from hnd.teacher_spec import TeacherSpec


def _staged(name: str, weights: tvm.WeightsEnum, size: int, resize: int, split_point: str) -> TeacherSpec:
    builder = getattr(tvm, name)
    return TeacherSpec(name, builder.__module__.rsplit(".", 1)[-1], builder, weights, size, resize,
                       "bilinear", split_point, staged=True)


# The papers' families: IMAGENET1K_V1 weights (what the papers used), the original's input sizes.
TEACHERS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in [
        _staged("densenet121", tvm.DenseNet121_Weights.IMAGENET1K_V1, 224, 256, "transition2"),
        _staged("densenet169", tvm.DenseNet169_Weights.IMAGENET1K_V1, 224, 256, "transition2"),
        _staged("densenet201", tvm.DenseNet201_Weights.IMAGENET1K_V1, 224, 256, "transition2"),
        _staged("resnet50", tvm.ResNet50_Weights.IMAGENET1K_V1, 224, 256, "layer2"),
        _staged("resnet101", tvm.ResNet101_Weights.IMAGENET1K_V1, 224, 256, "layer2"),
        # IMAGENET1K_V1 (78.31% top-1), not torchvision's default V2: the published tails and
        # HND heads were trained against V1.
        _staged("resnet152", tvm.ResNet152_Weights.IMAGENET1K_V1, 224, 256, "layer2"),
        # The original evaluates Inception-v3 at shorter side 327, crop 299 (torchvision uses 342).
        _staged("inception_v3", tvm.Inception_V3_Weights.IMAGENET1K_V1, 299, 327, "maxpool2"),
    ]
}

PAPER_TEACHERS = ("densenet169", "densenet201", "resnet152", "inception_v3")

_USER_TEACHERS: dict[str, TeacherSpec] = {}
_DOWNLOAD_TIMEOUT_S = 60


@functools.cache
def torchvision_classifiers() -> tuple[str, ...]:
    """Names of torchvision's image classification builders (not detection, segmentation,
    video, optical flow or quantized models: those live in submodules)."""
    return tuple(tvm.list_models(module=tvm))


def _from_torchvision(name: str) -> TeacherSpec:
    """A spec from torchvision's own facts: builder, DEFAULT weights and their transform sizes."""
    builder = tvm.get_model_builder(name)
    weights = tvm.get_model_weights(name).DEFAULT
    transform = weights.transforms()
    return TeacherSpec(name, builder.__module__.rsplit(".", 1)[-1], builder, weights,
                       int(transform.crop_size[0]), int(transform.resize_size[0]),
                       transform.interpolation.value)


@functools.cache
def _torchvision_spec(name: str) -> TeacherSpec:
    return _from_torchvision(name)


def _other_tasks() -> dict[str, str]:
    """Builders of torchvision's other tasks, by name, for the error message."""
    found = {}
    for task in ("detection", "segmentation", "video", "optical_flow", "quantization"):
        module = getattr(tvm, task, None)
        if module is not None:
            for n in tvm.list_models(module=module):
                found.setdefault(n, task)
    return found


def teacher_spec(name: str) -> TeacherSpec:
    """The spec of teacher ``name``: a paper family's staged teacher, any torchvision
    classifier, a timm model (``timm/NAME[.TAG]``), or a registered user module. Unknown names
    raise a one-line error."""
    if name in TEACHERS:
        return TEACHERS[name]
    if timm_teachers.is_timm_name(name):
        return timm_teachers.timm_spec(name)
    if name in _USER_TEACHERS:
        return _USER_TEACHERS[name]
    if name in torchvision_classifiers():
        return _torchvision_spec(name)
    task = _other_tasks().get(name)
    if task:
        raise HndError(f"{name} is a torchvision {task} model; teachers are image classifiers "
                       f"(`hnd models --all` lists the {len(torchvision_classifiers())} that work)")
    close = difflib.get_close_matches(name, torchvision_classifiers(), n=5, cutoff=0.6)
    hint = f"; similar: {', '.join(close)}" if close else ""
    raise HndError(f"unknown teacher {name!r}: not a torchvision image classifier{hint} "
                   "(`hnd models --all` lists them)")


def register_teacher(name: str, model: nn.Module, *, input_size: int = 224, resize_size: int | None = None,
                     interpolation: str = "bilinear") -> TeacherSpec:
    """Make a user's own classifier a teacher called ``name`` (Python API). ``model`` carries
    its own weights; each build returns a copy of it. It must be traceable by ``torch.fx``."""
    if not isinstance(model, nn.Module):
        raise HndError(f"a teacher must be an nn.Module, got {type(model).__name__}")
    if not re.fullmatch(r"[A-Za-z][\w.]*", name) or name in TEACHERS or name in torchvision_classifiers():
        raise HndError(f"teacher name {name!r} must be new and made of letters, digits, '_' and '.'")
    if interpolation not in INTERPOLATIONS:
        raise HndError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if not isinstance(input_size, int) or input_size < 16:
        raise HndError(f"input_size must be an integer of at least 16, got {input_size!r}")
    tracing.split_points(tracing.trace(model))  # untraceable modules fail here, in one line
    frozen = copy.deepcopy(model).eval()

    def builder(weights=None, num_classes=None, **_):
        return copy.deepcopy(frozen)

    classes = classifier_classes(frozen.state_dict())
    if classes is None:
        raise HndError(f"{name} has no Linear or Conv2d classifier")
    spec = TeacherSpec(name, "user", builder, None, input_size, resize_size or round(input_size * 256 / 224),
                       interpolation, source="user", num_classes=classes)
    _USER_TEACHERS[name] = spec
    return spec


def weights_path(spec: TeacherSpec) -> Path:
    """Where torchvision's weights API caches ``spec``'s pretrained file (a timm teacher's:
    :func:`hnd.timm_teachers.weights_path`)."""
    if spec.source == "timm":
        return timm_teachers.weights_path(spec)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(spec.weights.url)


def _fetch_weights(spec: TeacherSpec) -> Path:
    """Return the cached weights file, downloading it (hash-checked) when it is missing,
    unless the environment sets ``HND_OFFLINE=1``."""
    path = weights_path(spec)
    if path.is_file():
        return path
    url = spec.weights.url
    if os.environ.get("HND_OFFLINE") == "1":
        raise HndError(f"pretrained weights for {spec.name} are missing and HND_OFFLINE=1 forbids downloading; "
                       f"put torchvision's file {path.name} at {path} (from {url}) or set TORCH_HOME")
    found = re.search(r"-([a-f0-9]+)\.pth$", url)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        # Writes to a temporary file and renames it only after the SHA-256 prefix matched.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=found.group(1) if found else None,
                                       progress=False)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise HndError(
            f"pretrained weights for {spec.name} are missing and could not be downloaded ({exc}); "
            f"put torchvision's file {path.name} at {path} (from {url}) or set TORCH_HOME"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return path


# torchvision's DenseNet files still use the old 'norm.1'-style layer keys.
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")


def load_teacher_state_dict(spec: TeacherSpec) -> dict[str, torch.Tensor]:
    """``spec``'s pretrained state_dict, read safely (``weights_only=True``) on CPU."""
    path = _fetch_weights(spec)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or code-running file
        raise HndError(f"cannot read pretrained weights {path}: {str(exc).splitlines()[0]}; "
                       f"delete the file and fetch {spec.weights.url} again") from None
    if not isinstance(state, dict):
        raise HndError(f"pretrained weights {path} hold a {type(state).__name__}, not a state_dict")
    if spec.family == "densenet":
        state = {(_OLD_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    return state


# Builders whose published files hold auxiliary classifiers (built, loaded, then dropped) and
# an input transform (on with pretrained weights, which expect it).
_AUX_HEADS = {"inception": ("AuxLogits",), "googlenet": ("aux1", "aux2")}


def _build_kwargs(spec: TeacherSpec, pretrained: bool, num_classes: int, transform_input: bool | None,
                  input_size: int) -> dict:
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if spec.family in _AUX_HEADS:
        kwargs["transform_input"] = pretrained if transform_input is None else transform_input
        kwargs["aux_logits"] = pretrained
        kwargs["init_weights"] = not pretrained
    elif transform_input:
        raise HndError(f"transform_input applies to inception_v3 and googlenet only, not {spec.name}")
    if spec.family == "vision_transformer":
        kwargs["image_size"] = input_size  # position embeddings are built for one input side
    return kwargs


# What draws a tensor's initial values: torch.nn.init's initialisers (those that dispatch to a
# torch function mode; the others draw through the random fills) and the random fills that modules
# call themselves (a class token's ``normal_``).
_INITIALISERS = frozenset(getattr(nn.init, name) for name in dir(nn.init)
                          if name.endswith("_") and not name.startswith("_"))
_RANDOM_FILLS = frozenset(getattr(torch.Tensor, name) for name in
                          ("normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "log_normal_",
                           "cauchy_", "random_"))


class no_initial_values(torch.overrides.TorchFunctionMode):
    """Within it, initial values are not drawn (an initialiser leaves its tensor as it is, a
    random fill gives zeros), for builds whose values are never used: on the meta device there
    are none (and torch runs each initialiser through its decompositions, most of a meta
    build's time), and a model that a whole state dict is loaded into strictly next gets every
    value from it (initialising a ResNet-152 costs more than loading it). A torch function mode
    holds for this thread only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        if func in _RANDOM_FILLS:  # zeros: an initialiser that draws until its values fit (trunc_normal_) stops
            return args[0].zero_()
        return func(*args, **kwargs)


def build_teacher(spec: TeacherSpec | str, *, pretrained: bool = True, num_classes: int | None = None,
                  transform_input: bool | None = None, input_size: int | None = None) -> nn.Module:
    """Build the teacher with its builder, in eval mode.

    pretrained: load the spec's ImageNet weights from torchvision's cache (the paper's
    IMAGENET1K_V1 for the staged teachers, torchvision's DEFAULT for the others).
    transform_input: Inception-v3 and GoogLeNet only. ``None`` follows torchvision (on with
    pretrained weights, which expect it; off otherwise). Auxiliary classifiers are dropped.
    input_size: vision transformers only, whose position embeddings depend on it.
    num_classes: ``None`` is the pretrained weights' (1000; a user module's own). A user
    module keeps its weights whatever ``pretrained`` says; another class count gets it a
    fresh classifier.
    """
    spec = teacher_spec(spec) if isinstance(spec, str) else spec
    num_classes = num_classes or spec.num_classes
    if spec.user:
        model = spec.builder()
        if num_classes != spec.num_classes:
            replace_classifier(model, num_classes)
        return model.eval()
    if pretrained and num_classes != spec.num_classes:
        raise HndError(f"pretrained {spec.name} has {spec.num_classes} classes, got num_classes={num_classes}")
    if spec.source == "timm":
        return timm_teachers.build_timm(spec, pretrained=pretrained, num_classes=num_classes,
                                        input_size=input_size or spec.input_size)
    with no_initial_values() if pretrained else contextlib.nullcontext():  # the weights come next
        model = spec.builder(**_build_kwargs(spec, pretrained, num_classes, transform_input,
                                             input_size or spec.input_size))
    if pretrained:
        state = load_teacher_state_dict(spec)
        try:
            model.load_state_dict(state)
        except RuntimeError:
            # Old files lack BatchNorm's num_batches_tracked, which loading fills in.
            expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
            raise HndError(f"pretrained weights {weights_path(spec)} do not fit {spec.name}"
                           f"{'' if (input_size or spec.input_size) == spec.input_size else f' at input size {input_size}'}"
                           f": {describe_mismatch(expected, state)}") from None
    for attr in _AUX_HEADS.get(spec.family, ()):
        model.aux_logits = False
        setattr(model, attr, None)
    return model.eval()


def on_meta(build):
    """``build()`` on the ``meta`` device (no weights, instant) where the builder allows;
    RegNet's computes its widths with tensors, so it is built on the CPU."""
    try:
        with torch.device("meta"), no_initial_values():
            return build()
    except NotImplementedError:
        return build()


def meta_teacher(spec: TeacherSpec, input_size: int | None = None) -> nn.Module:
    """The teacher without weights, for shapes and costs (see :func:`on_meta`); a user's
    module is copied as it is."""
    if spec.user:
        return build_teacher(spec)
    return on_meta(lambda: build_teacher(spec, pretrained=False, input_size=input_size))


def classifier_path(model: nn.Module) -> str:
    """Qualified name of the classifier: the last ``Linear`` (else the last ``Conv2d``)."""
    for kind in (nn.Linear, nn.Conv2d):
        names = [n for n, m in model.named_modules() if isinstance(m, kind)]
        if names:
            return names[-1]
    raise HndError(f"{type(model).__name__} has no Linear or Conv2d layer to classify with")


def replace_classifier(teacher: nn.Module, num_classes: int) -> nn.Module:
    """Give ``teacher`` a freshly initialised classifier for ``num_classes`` classes (fine-tuning
    on another dataset); returns the teacher."""
    path = classifier_path(teacher)
    old = teacher.get_submodule(path)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    parent, _, attr = path.rpartition(".")
    setattr(teacher.get_submodule(parent) if parent else teacher, attr, new)
    return teacher


def classifier_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of a teacher's, student's or autoencoder model's state_dict: the
    first dimension of its last weight with two or more dimensions (the classifier's)."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim >= 2]
    return weights[-1].shape[0] if weights else None


class InceptionInputTransform(nn.Module):
    """Inception-v3's ``transform_input`` step (ImageNet-normalized → the [-1, 1] range of the
    ported weights), as a module so that it can start a teacher head."""

    transform_input = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Inception3._transform_input(self, x)  # torchvision's own arithmetic, bit-exact


def _stage_names(family: str) -> list[str]:
    if family == "resnet":
        return ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    if family == "inception":
        return ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool", "dropout"]
    raise AssertionError(family)


def teacher_stages(spec: TeacherSpec, teacher: nn.Module) -> list[tuple[str, nn.Module]]:
    """A staged teacher's eval-mode forward as named stages; running them in order equals
    ``teacher(x)``.

    The stages share the teacher's modules (no copies). Functional steps of torchvision's
    forward become parameter-free modules: DenseNet's final ReLU/pool, the flatten before the
    classifier, and Inception-v3's ``transform_input`` when the teacher has it on.
    """
    if not spec.staged:
        raise HndError(f"{spec.name} has no stage list; its split points come from its traced graph")
    if spec.family == "densenet":
        stages = list(teacher.features.named_children())
        stages += [("relu", nn.ReLU(inplace=True)), ("pool", nn.AdaptiveAvgPool2d(1)),
                   ("flatten", nn.Flatten(1)), ("classifier", teacher.classifier)]
        return stages
    stages = [(n, getattr(teacher, n)) for n in _stage_names(spec.family)]
    if spec.family == "inception" and teacher.transform_input:
        stages.insert(0, ("transform_input", InceptionInputTransform()))
    return stages + [("flatten", nn.Flatten(1)), ("fc", teacher.fc)]


def stage_split_points(spec: TeacherSpec) -> tuple[str, ...]:
    """The stage names a staged teacher can be cut after (all but the classifier)."""
    return tuple(n for n, _ in teacher_stages(spec, meta_teacher(spec))[:-1] if n != "transform_input")


def _traced(teacher: nn.Module, transform_input: bool | None):
    """The teacher's graph; ``transform_input`` overrides Inception's/GoogLeNet's flag while tracing."""
    if transform_input is None or not hasattr(teacher, "transform_input"):
        return tracing.trace(teacher)
    old = teacher.transform_input
    teacher.transform_input = transform_input
    try:
        return tracing.trace(teacher)
    finally:
        teacher.transform_input = old


def default_split_point(spec: TeacherSpec) -> str:
    """The official split of a staged teacher. Otherwise the end of the last stage at stride 8
    or less: among the traced split points whose output is a [C, H, W] map at the last such
    resolution, the last one named by the shallowest module (ResNet's ``layer2``, MobileNet's
    ``features.6``: the papers' bottleneck-to-input ratio); without square [C, H, W] maps
    (vision transformers), the first shallowest point of the graph's second quarter. Swin's
    stages are channels-last, so its only such map is the patch embedding's conv output."""
    if spec.staged:
        return spec.split_point
    return traced_facts(spec, spec.input_size).default


@dataclass(frozen=True)
class TracedFacts:
    """A traced teacher's split points and their per-image output shapes at one input size."""

    points: tuple[tracing.SplitPoint, ...]
    shapes: dict  # point name -> output shape per image
    default: str


@functools.lru_cache(maxsize=256)
def traced_facts(spec: TeacherSpec, input_size: int) -> TracedFacts:
    """Split points of ``spec``'s traced graph, with their output shapes (on the meta device)."""
    gm = tracing.trace(meta_teacher(spec, input_size))
    points = tracing.split_points(gm)
    node_shape: dict[str, tuple] = {}

    def step(name, kind, module, thunk):
        out = thunk()
        if isinstance(out, torch.Tensor):
            node_shape[name.split(".", 1)[1]] = tuple(out.shape[1:])
        return out

    device = next(iter(gm.parameters()), torch.zeros(())).device
    with torch.no_grad():
        tracing.NodeSteps(gm, "t", step).run(torch.zeros(1, 3, input_size, input_size, device=device))
    shapes = {p.name: node_shape.get(p.node) for p in points}
    maps = [p for p in points if shapes[p.name] is not None and len(shapes[p.name]) == 3
            and shapes[p.name][1] == shapes[p.name][2]  # square [C, H, W] maps, not token grids
            and shapes[p.name][1] * 8 >= 0.9 * input_size]  # stride 8 or less (ceil/floor sizes)
    nodes = len(gm.graph.nodes)
    if maps:  # the points at the last such resolution
        candidates = [p for p in maps if shapes[p.name][1:] == shapes[maps[-1].name][1:]]
    else:  # the second quarter of the graph
        candidates = [p for p in points if nodes // 4 <= p.index < nodes // 2] or points
    depth = min(p.name.count(".") for p in candidates)  # whole stages before blocks inside them
    shallow = [p for p in candidates if p.name.count(".") == depth]
    default = (shallow[-1] if maps else shallow[0]).name
    return TracedFacts(tuple(points), shapes, default)


def canonical_split_point(spec: TeacherSpec, name: str, input_size: int) -> str:
    """The one name of split point ``name``: a staged teacher's stage, else the traced point's
    display name (``layer2`` for ``layer2.1`` or ``layer2.1.relu_1``); invalid names raise."""
    if spec.staged and name in stage_split_points(spec):
        return name
    facts = traced_facts(spec, input_size)
    for p in facts.points:
        if name in p.aliases:
            return p.name
    model = meta_teacher(spec, input_size)
    tracing.find_split_point(tracing.trace(model), name, list(facts.points), teacher=spec.name)  # raises
    raise AssertionError(name)


def split_teacher(spec: TeacherSpec | str, teacher: nn.Module, split_point: str | None = None, *,
                  transform_input: bool | None = None) -> tuple[nn.Module, nn.Module]:
    """Cut the teacher after ``split_point`` (default: :func:`default_split_point`) into (head, tail).

    A staged teacher cut at one of its stages gives ``nn.Sequential`` parts (the original's
    key layout); any other point is cut through the traced graph (``GraphModule`` parts). Both
    share the teacher's modules, and ``tail(head(x)) == teacher(x)`` exactly in eval mode.
    transform_input (Inception-v3, GoogLeNet): ``None`` keeps the teacher's setting in the
    head; ``False`` drops it, which is what the original HND code did for its targets (its
    teacher never applied it).
    """
    spec = teacher_spec(spec) if isinstance(spec, str) else spec
    split_point = split_point or default_split_point(spec)
    if spec.staged and split_point in (names := [n for n, _ in teacher_stages(spec, teacher)]):
        stages = teacher_stages(spec, teacher)
        if transform_input is False:
            stages = [(n, m) for n, m in stages if n != "transform_input"]
        elif transform_input and stages[0][0] != "transform_input":
            stages.insert(0, ("transform_input", InceptionInputTransform()))
        if split_point == names[-1]:
            raise HndError(f"{split_point!r} is the classifier of {spec.name}: a split there leaves no tail; "
                           f"valid stages: {', '.join(n for n in names[:-1] if n != 'transform_input')}")
        cut = [n for n, _ in stages].index(split_point) + 1
        return nn.Sequential(OrderedDict(stages[:cut])), nn.Sequential(OrderedDict(stages[cut:]))
    gm = _traced(teacher, transform_input)
    point = tracing.find_split_point(gm, split_point, teacher=spec.name)
    return tracing.cut(gm, point)
