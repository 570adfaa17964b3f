"""Tracing: every torchvision classifier is cut through its torch.fx graph, exactly; bad split
points and untraceable teachers are one-line errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torchvision.models.regnet as regnet
from torch import nn

from hnd import tracing
from hnd.registry import resolve, student_spec
from hnd.teachers import (TeacherSpec, build_teacher, default_split_point, meta_teacher, on_meta, register_teacher,
                          split_teacher, teacher_spec, torchvision_classifiers, traced_facts)

from conftest import error, random_build

CLASSIFIERS = torchvision_classifiers()
_BLOCK_PARAMS = regnet.BlockParams.__dict__["from_init_params"]  # torchvision's, unpatched


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small inputs through deep nets: one thread is as fast, and immune to busy neighbours on a
    shared 2-core machine (two OpenMP threads there ran several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def regnet_widths_on_cpu():
    """RegNet's builders compute their stage widths with tensors (``.tolist()``), which the meta
    device cannot, so ``on_meta`` falls back to a full CPU build that initialises every weight
    (regnet_y_128gf: about 50 s, once per shape query). Computing only the widths on the CPU
    lets the 13 RegNets build on meta like the other models. The fallback itself is tested
    unpatched in :func:`test_regnet_builds_without_the_patch`."""

    def widths_on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return _BLOCK_PARAMS.__func__(cls, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(regnet.BlockParams, "from_init_params", classmethod(widths_on_cpu))
        yield


@pytest.fixture(scope="module", autouse=True)
def no_weight_init():
    """Weight initialisers do nothing in this module: every model here is built on the meta
    device (no values to initialise; torch runs meta initialisers through slow decompositions,
    most of a meta build's time) or is filled with random values afterwards (``random_build``)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in dir(torch.nn.init):
            if name.endswith("_") and not name.startswith("_") and callable(getattr(torch.nn.init, name)):
                patch.setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield


def exact_input_size(name: str) -> int:
    """The smallest square input (about) that the model's real forward accepts: 32 px for the
    CNNs (and Swin, which pads its windows), 75 for Inception-v3, 224 for MaxViT (its
    partitions need 7x7 windows at every stage, so no smaller input works), 63 for AlexNet (three
    3x3 stride-2 max-pools), and for vision transformers one patch per side (they are built
    for the input size they get: ``build_teacher(..., input_size=)``)."""
    spec = teacher_spec(name)
    if spec.family == "vision_transformer":
        return int(name.rsplit("_", 1)[1])  # vit_h_14: 14 px, one patch
    return {"maxvit": 224, "inception": 75, "alexnet": 63}.get(spec.family, 32)


# ---------------------------------------------------------------- (a) split points on meta

@dataclass
class Traced:
    """One classifier on the meta device: its spec, model, traced graph and split points."""

    name: str
    spec: TeacherSpec
    model: nn.Module
    gm: torch.fx.GraphModule
    points: list[tracing.SplitPoint]


@pytest.fixture(scope="module", params=CLASSIFIERS)
def classifier(request) -> Traced:
    """Module-scoped, so pytest runs this module's tests model by model: the package's per-model
    caches (traced shapes, head facts) are hit rather than thrashed."""
    spec = teacher_spec(request.param)
    model = meta_teacher(spec)
    gm = tracing.trace(model)
    return Traced(request.param, spec, model, gm, tracing.split_points(gm))


def test_split_points_on_meta(classifier):
    """Every classifier traces on the meta device, has valid split points in graph order, and
    its default split point resolves (also when written out as ``@POINT``)."""
    name, spec, gm, points = classifier.name, classifier.spec, classifier.gm, classifier.points
    assert all(p.is_meta for p in classifier.model.parameters())
    names = [p.name for p in points]
    assert len(points) >= 5 and len(set(names)) == len(names)
    assert [p.index for p in points] == sorted({p.index for p in points})
    nodes = list(gm.graph.nodes)
    last = max(i for i, n in enumerate(nodes) if n.op in ("call_module", "call_function", "call_method"))
    assert all(p.index < last for p in points)  # never after the classifier
    for p in (points[0], points[len(points) // 2], points[-1]):
        assert all(tracing.find_split_point(gm, alias, points) == p for alias in p.aliases)

    default = default_split_point(spec)
    assert spec.staged or default in names
    resolved = resolve(name)
    assert (resolved.teacher, resolved.split_point, resolved.is_student) == (spec, default, False)
    assert str(resolved) == name and resolve(f"{name}@{default}") == resolved
    assert resolved.input_size == spec.input_size


def test_every_split_point_outputs_one_tensor(classifier):
    """A split point's output is what the device sends and what a student reproduces: one
    tensor, not a tuple (shapes from the traced teacher on meta)."""
    shapes = traced_facts(classifier.spec, classifier.spec.input_size).shapes
    assert [p.name for p in classifier.points] == list(shapes)
    assert [name for name, shape in shapes.items() if shape is None] == []


def test_default_split_point_follows_its_rule(classifier):
    """Off the papers' stage lists, the default split is the end of the last stage at stride 8:
    a square [C, H, W] map of side about input/8 (ResNet's layer2: 28x28 at 224). Vision
    transformers have no such maps and take the first shallowest point of the graph's second
    quarter; Swin's stages are channels-last, so its one square map is the patch embedding's."""
    spec, gm, points = classifier.spec, classifier.gm, classifier.points
    if spec.staged:
        pytest.skip("a paper family: the original's split")
    default = next(p for p in points if default_split_point(spec) in p.aliases)
    shape = resolve(classifier.name).head_output_shape
    if spec.family == "vision_transformer":
        n = len(gm.graph.nodes)
        quarter = [p for p in points if n // 4 <= p.index < n // 2]
        depth = min(p.name.count(".") for p in quarter)
        assert default == next(p for p in quarter if p.name.count(".") == depth)
        return
    if spec.family == "swin_transformer":
        assert default.name == "features.0.0" and shape[1] == shape[2] == spec.input_size // 4
        return
    side = spec.input_size / 8
    assert len(shape) == 3 and shape[1] == shape[2] and 0.9 * side <= shape[1] <= side + 1, shape


def test_regnet_builds_without_the_patch(monkeypatch):
    """torchvision's own RegNet builder (no width patch): ``meta_teacher`` still works (on the CPU
    where the meta device cannot) and gives the same graph."""
    spec = teacher_spec("regnet_x_400mf")
    patched = [p.name for p in tracing.split_points(tracing.trace(meta_teacher(spec)))]
    monkeypatch.setattr(regnet.BlockParams, "from_init_params", _BLOCK_PARAMS)
    model = meta_teacher(spec)
    assert [p.name for p in tracing.split_points(tracing.trace(model))] == patched
    assert "trunk_output.block2" in patched


# ---------------------------------------------------------------- (b) exact cuts, real arithmetic

# The two largest classifiers (632M and 644M weights): real arithmetic would take most of this
# module's time, so their cuts are checked for shapes on meta. Their architectures are tested
# with real arithmetic through their smaller siblings (vit_l_16, vit_b_16; regnet_y_32gf ...).
HUGE = ("vit_h_14", "regnet_y_128gf")


def check_cuts_on_meta(classifier: Traced) -> None:
    """The middle and default cuts of a meta teacher: the tail takes the head's output and gives
    the teacher's output shape."""
    spec, gm, points = classifier.spec, classifier.gm, classifier.points
    x = torch.zeros(2, 3, spec.input_size, spec.input_size, device="meta")
    for point in dict.fromkeys([points[len(points) // 2].name, default_split_point(spec)]):
        head, tail = tracing.cut(gm, tracing.find_split_point(gm, point, points))
        with torch.no_grad():
            assert tail(head(x)).shape == (2, 1000), point


def test_cut_is_exact(classifier):
    """With random weights in eval mode, ``tail(head(x))`` equals ``teacher(x)`` bit for bit at
    a point in the middle of the graph and at the default split point; head and tail share the
    teacher's modules."""
    name, spec = classifier.name, classifier.spec
    if name in HUGE:
        return check_cuts_on_meta(classifier)
    size = exact_input_size(name)
    model = random_build(lambda: build_teacher(spec, pretrained=False, input_size=size),
                         seed=CLASSIFIERS.index(name))
    batch = 1 if size >= 224 else 2  # MaxViT: one 224-px image is enough work
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (batch, 1000) and torch.isfinite(expected).all() and expected.std() > 0
    if batch == 2:
        assert not torch.equal(expected[0], expected[1])  # the output depends on the input
    gm = tracing.trace(model)
    points = tracing.split_points(gm)
    middle = points[len(points) // 2]
    default = default_split_point(spec)
    cuts = {middle.name: tracing.cut(gm, middle)}
    if spec.staged:  # the public API: a stage list
        cuts[default] = split_teacher(spec, model, default)
    else:
        cuts[default] = tracing.cut(gm, tracing.find_split_point(gm, default, points))
    teacher_params = {p.data_ptr() for p in model.parameters()}
    for point, (head, tail) in cuts.items():
        with torch.no_grad():
            assert torch.equal(tail(head(x)), expected), point
        shared = {p.data_ptr() for p in [*head.parameters(), *tail.parameters()]}
        assert shared == teacher_params, point


# ---------------------------------------------------------------- (c) default students

def test_default_student_reproduces_the_teacher_head_shape(classifier):
    """The 3-channel student at the default split point (built on meta): its head outputs what
    the teacher head does at the teacher's input size; without a [C, H, W] map there (vision
    transformers) the student is a one-line error."""
    name, teacher_spec_ = classifier.name, classifier.spec
    teacher = resolve(name)
    if len(teacher.head_output_shape) != 3:
        assert "[C, H, W]" in error(student_spec, name, 3)
        return
    spec = student_spec(name, 3)
    assert (spec.teacher, spec.split_point, spec.channels, spec.is_student) == (teacher_spec_, teacher.split_point,
                                                                                3, True)
    student = on_meta(lambda: spec.build(pretrained=False))
    size = spec.input_size
    x = torch.zeros(2, 3, size, size, device=next(student.parameters()).device)
    if teacher_spec_.staged:  # the stage list, run up to the official split
        head, _ = split_teacher(teacher_spec_, classifier.model, spec.split_point,
                                transform_input=spec.head_transform_input)
        with torch.no_grad():
            expected = tuple(head(x.to("meta")).shape[1:])
    else:  # the output shape of the traced point, recorded while the whole teacher ran on meta
        expected = traced_facts(teacher_spec_, size).shapes[spec.split_point]
    with torch.no_grad():
        assert tuple(student.head(x).shape) == (2, *expected)
        assert student.encode(x).shape[:2] == (2, 3)
    assert spec.head_output_shape == teacher.head_output_shape == expected


# ---------------------------------------------------------------- bad split points and teachers

def test_point_inside_a_residual_block_names_the_nearest_valid_points():
    # Inside block layer1.0 the skip connection crosses too; before it, maxpool's output is the
    # only value alive, and the block's addition is the first node after which one value is.
    message = error(resolve, "resnet18@layer1.0.conv1")
    assert "layer1.0.conv1" in message and "maxpool" in message and "layer1.0.add" in message


@pytest.mark.parametrize("name, words", [
    ("resnet18@fc", ["'fc'", "classifier", "no tail"]),
    ("resnet50@fc", ["'fc'", "classifier", "no tail"]),  # a staged teacher: its stage list
    ("resnet18@layer9", ["'layer9'", "not a layer of resnet18", "layer1"]),
    ("resnet18@", ["no split point after '@'"]),
    ("fasterrcnn_resnet50_fpn", ["detection model", "image classifiers"]),
    ("fasterrcnn_resnet50_fpn@backbone-3ch", ["detection model"]),
    ("deeplabv3_resnet50", ["segmentation model"]),
    ("nosuchnet", ["unknown teacher 'nosuchnet'"]),
    ("resnet1", ["unknown teacher 'resnet1'", "resnet18"]),
    ("resnet18@layer2-0ch", ["positive integer"]),
    ("resnet18-0ch", ["positive integer"]),
    ("resnet18@layer2--3ch", ["positive integer"]),
    ("resnet18@layer2-2.5ch", ["positive integer"]),
    ("vit_b_16-3ch", ["vit_b_16", "[C, H, W]"]),
    ("resnet18@flatten-3ch", ["[C, H, W]"]),
    ("shufflenet_v2_x1_0@stage3.4.chunk", ["'stage3.4.chunk'", "stage3.4.cat"]),  # a tuple crosses: not a point
    ("quantized_resnet18", ["quantization model"]),
])
def test_bad_names_are_one_line_errors(name, words):
    message = error(resolve, name)
    for word in words:
        assert word in message, (word, message)


class DataDependent(nn.Module):
    """A classifier whose forward branches on a tensor's value: not symbolically traceable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = torch.relu(x)
        return self.fc(x.mean((2, 3)))


def test_untraceable_user_teacher_is_refused_in_one_line():
    message = error(register_teacher, "data_dependent_net", DataDependent(), input_size=32)
    assert "DataDependent" in message and "trace" in message
    assert "unknown teacher" in error(resolve, "data_dependent_net")  # nothing was registered
