"""Model names, resolved once into a :class:`ModelSpec` that travels with the model.

Name grammar (``hnd models --help``):

- ``TEACHER``: a teacher at its default split point, e.g. ``resnet152``, ``mobilenet_v3_large``;
- ``TEACHER@POINT``: a teacher cut at another split point, e.g. ``resnet18@layer3``;
- ``TEACHER@POINT-Cch``: a student with a ``C``-channel bottleneck replacing the teacher's
  layers up to ``POINT``, e.g. ``resnet18@layer2-3ch``; ``TEACHER-Cch`` takes the default point;
- ``TEACHER_head_mimic-verV-Cch``: the original's students of the papers' families
  (``densenet169_head_mimic-ver2b-3ch``, ``inception_v3_head_mimic-ver1b-12ch``); at their
  official point the ``@`` form names the same student;
- any student name ending in ``-entropic``: the same student with a learned entropy model on
  its bottleneck, trained with ``--method entropic`` and sent range-coded
  (``resnet18@layer2-3ch-entropic``, ``densenet169_head_mimic-ver2b-3ch-entropic``).

``TEACHER`` is any torchvision image classifier, a timm model as ``timm/NAME[.TAG]``
(``timm/resnet50.a1_in1k``; ``timm/resnet50`` takes timm's default tag, and the canonical name
carries it), or a teacher registered with :func:`hnd.teachers.register_teacher`; ``POINT`` is a
split point of ``hnd inspect TEACHER --split-points``. ``str(spec)`` gives the canonical name,
and resolving it gives the spec back.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

from hnd.errors import HndError
from hnd.preprocessing import Preprocessing
from hnd.students import (OFFICIAL_CHANNELS, OFFICIAL_DESIGNS, GenericHead, Student, StudentHead, check_channels,
                          head_version)
from hnd.teachers import (PAPER_TEACHERS, TEACHERS, TeacherSpec, build_teacher, canonical_split_point,
                          default_split_point, meta_teacher,
                          split_teacher, teacher_spec, torchvision_classifiers)
from hnd.timm_teachers import timm_teachers

_OFFICIAL = re.compile(r"^(?P<teacher>[A-Za-z][\w.]*?)_head_mimic-ver(?P<version>[^-]+)-(?P<channels>.*?)ch"
                       r"(?P<entropic>-entropic)?$")
_GENERAL = re.compile(r"^(?P<teacher>(?:timm/)?[A-Za-z][\w.]*?)(?:@(?P<point>[^@\s]*?))?"
                      r"(?:-(?P<channels>.*?)ch(?P<entropic>-entropic)?)?$")
ENTROPIC_SUFFIX = "-entropic"
GRAMMAR = ("TEACHER (torchvision's or timm/NAME[.TAG]) | TEACHER@POINT | TEACHER@POINT-<C>ch | TEACHER-<C>ch | "
           "<paper teacher>_head_mimic-ver<2b|1b>-<C>ch; a student name + '-entropic': its entropy-coded twin")


@dataclass(frozen=True)
class ModelSpec:
    """Everything a model name means: its teacher, split point, bottleneck and sizes.

    Resolve a name once with :func:`resolve`; pass the spec on. ``design`` is ``None`` for a
    teacher, ``"ver2b"``/``"ver1b"`` for the original's students, ``"generic"`` for
    :class:`hnd.students.GenericHead` students.
    """

    teacher: TeacherSpec
    split_point: str
    input_size: int
    head_output_shape: tuple[int, ...]  # the teacher head's output per image, at input_size
    channels: int | None = None  # bottleneck channels (students)
    design: str | None = None
    stem: tuple[int, int] = (64, 7)  # generic students: (channels, kernel) of the teacher's first conv
    entropy: bool = False  # students: a learned entropy model codes the bottleneck (method entropic)

    @property
    def kind(self) -> str:
        return "teacher" if self.design is None else "student"

    @property
    def is_student(self) -> bool:
        return self.design is not None

    @property
    def official(self) -> bool:
        """One of the original's designs (ver2b/ver1b) at a paper family's official split."""
        return self.design in ("ver2b", "ver1b")

    @property
    def head_transform_input(self) -> bool | None:
        return _head_transform_input(self.teacher, self.design)

    @property
    def resize_size(self) -> int:
        """Evaluation resize side: the teacher's ratio, at this spec's input size."""
        t = self.teacher
        return t.resize_size if self.input_size == t.input_size else round(self.input_size * t.resize_size
                                                                            / t.input_size)

    def preprocessing(self, resize_size: int | None = None) -> Preprocessing:
        """The evaluation preprocessing at this spec's input size (``resize_size``: another
        resize side than the teacher's ratio gives)."""
        t = self.teacher
        return Preprocessing(self.input_size, resize_size or self.resize_size, t.interpolation, t.mean, t.std)

    def transforms(self, decoder: str = "pil", *, resize_size: int | None = None):
        """The evaluation transform: an image as ``decoder`` reads it -> normalized [3, S, S]."""
        return self.preprocessing(resize_size).transform(decoder)

    @property
    def teacher_name(self) -> str:
        return self.teacher.name

    def __str__(self) -> str:
        t = self.teacher.name
        suffix = ENTROPIC_SUFFIX if self.entropy else ""
        if self.official:
            return f"{t}_head_mimic-{self.design}-{self.channels}ch{suffix}"
        if self.is_student:
            return f"{t}@{self.split_point}-{self.channels}ch{suffix}"
        return t if self.split_point == default_split_point(self.teacher) else f"{t}@{self.split_point}"

    @property
    def name(self) -> str:
        return str(self)

    def as_teacher(self) -> ModelSpec:
        """The spec of this model's teacher at the same split point and input size."""
        return dataclasses.replace(self, channels=None, design=None, entropy=False)

    def with_entropy(self, entropy: bool = True) -> ModelSpec:
        """This student with (or without) an entropy-coded bottleneck."""
        if not self.is_student:
            raise HndError(f"{self} is a teacher; only students have a bottleneck to entropy-code")
        return dataclasses.replace(self, entropy=entropy)

    def at_input_size(self, size: int | None) -> ModelSpec:
        """The same model for another input side (head output shapes follow)."""
        if size is None or size == self.input_size:
            return self
        return _spec(self.teacher, self.split_point, self.channels, self.design, size, self.entropy)

    def as_saved(self, doc: dict | None) -> ModelSpec:
        """This model as a file saved it (``doc``: :meth:`to_dict` of the same name): at its
        input size and with its head design."""
        if not isinstance(doc, dict) or doc.get("name") != str(self):
            return self
        design = doc.get("design") if self.is_student and doc.get("design") else self.design
        size = doc.get("input_size") or self.input_size
        if (design, size) == (self.design, self.input_size):
            return self
        return _spec(self.teacher, self.split_point, self.channels, design, size, self.entropy)

    def build(self, *, pretrained: bool = True, num_classes: int | None = None) -> nn.Module:
        """Build the model (eval mode); it carries this spec as ``.spec``.

        pretrained: the teacher (and a student's tail) from the teacher's pretrained weights
        (the original's starting point for all methods); otherwise randomly initialised.
        """
        teacher = build_teacher(self.teacher, pretrained=pretrained, num_classes=num_classes,
                                input_size=self.input_size)
        if not self.is_student:
            teacher.spec = self
            return teacher
        return student_from_teacher(self, teacher).eval()

    def to_dict(self) -> dict:
        """Plain data for checkpoints and JSON (the teacher by name)."""
        return {"name": str(self), "teacher": self.teacher.name, "split_point": self.split_point,
                "channels": self.channels, "design": self.design, "input_size": self.input_size,
                "head_output_shape": list(self.head_output_shape), "stem": list(self.stem), "entropy": self.entropy}


def student_from_teacher(spec: ModelSpec, teacher: nn.Module) -> Student:
    """A student with a fresh head and ``teacher``'s tail (the same modules, not a copy).

    The original's students take plainly normalized input, like the original (no Inception
    ``transform_input``); generic students cut the teacher as it is.
    """
    if not spec.is_student:
        raise HndError(f"{spec} is a teacher, not a student")
    _, tail = split_teacher(spec.teacher, teacher, spec.split_point, transform_input=spec.head_transform_input)
    if spec.official:
        head = StudentHead(spec.teacher.family, spec.channels, entropy=spec.entropy)
    else:
        head = GenericHead(spec.channels, spec.head_output_shape, spec.input_size, stem_channels=spec.stem[0],
                           stem_kernel=spec.stem[1], entropy=spec.entropy)
    return Student(spec, head, tail)


def _head_transform_input(teacher: TeacherSpec, design: str | None) -> bool | None:
    """Inception's ``transform_input`` in the teacher head a student replaces (or an
    autoencoder follows): the original never applied it, so the paper families' teachers and
    official students drop it (``False``); generic students keep the teacher's own (``None``)."""
    return False if teacher.staged and design in (None, "ver2b", "ver1b") else None


@functools.lru_cache(maxsize=256)
def _head_facts(teacher: TeacherSpec, split_point: str, input_size: int,
                transform_input: bool | None) -> tuple[tuple[int, ...], tuple[int, int]]:
    """(teacher head output shape per image, (channels, kernel) of the teacher's first conv),
    computed on the meta device. Invalid split points raise here, once per resolution."""
    model = meta_teacher(teacher, input_size)
    head, _ = split_teacher(teacher, model, split_point, transform_input=transform_input)
    device = next(iter(model.parameters())).device
    with torch.no_grad():
        try:
            out = head(torch.zeros(1, 3, input_size, input_size, device=device))
        except RuntimeError as exc:
            raise HndError(f"input size {input_size} does not fit {teacher.name} up to {split_point} "
                           f"({str(exc).splitlines()[0]})") from None
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    stem = (first.out_channels, first.kernel_size[0]) if first is not None else (64, 7)
    return tuple(out.shape[1:]), stem


def _spec(teacher: TeacherSpec, point: str | None, channels: int | None, design: str | None,
          input_size: int | None = None, entropy: bool = False) -> ModelSpec:
    """Check and complete one spec (point default, sizes, head facts)."""
    size = input_size or teacher.input_size
    point = canonical_split_point(teacher, point, size) if point else default_split_point(teacher)
    if channels is not None:
        channels = check_channels(channels)
        if design is None:
            design = (f"ver{head_version(teacher.family)}" if teacher.staged and point == teacher.split_point
                      else "generic")
    generic = design == "generic"
    if design is not None and not generic and design not in ("ver2b", "ver1b"):
        raise HndError(f"unknown student design {design!r}; designs are ver2b, ver1b, generic")
    shape, stem = _head_facts(teacher, point, size, _head_transform_input(teacher, design))
    if generic and len(shape) != 3:
        raise HndError(f"a student of {teacher.name} at {point!r} would have to produce a "
                       f"{'x'.join(map(str, shape))} tensor; student heads need a split point whose output is a "
                       f"[C, H, W] feature map (see `hnd inspect {teacher.name} --split-points`)")
    if generic and min(shape[1:]) < 1:
        raise HndError(f"{teacher.name} at {point!r} outputs {shape} at input size {size}")
    if entropy and channels is None:
        raise HndError(f"{teacher.name}{ENTROPIC_SUFFIX}: only students (names with -<C>ch) have an entropy-coded "
                       f"bottleneck, e.g. {teacher.name}-3ch{ENTROPIC_SUFFIX}")
    return ModelSpec(teacher, point, size, shape, channels, design, stem, bool(entropy))


def parse_name(name: str) -> ModelSpec:
    """Resolve a model name (see the module docstring) into its spec."""
    if not isinstance(name, str) or not name:
        raise HndError(f"a model name must be a non-empty string, got {name!r}")
    if "_head_mimic-" in name:
        match = _OFFICIAL.match(name)
        if not match:
            raise HndError(f"not a student name: {name!r}; the original's students are named "
                           "<teacher>_head_mimic-ver<2b|1b>-<channels>ch, e.g. densenet169_head_mimic-ver2b-3ch")
        teacher = match["teacher"]
        if teacher not in TEACHERS:
            raise HndError(f"unknown teacher {teacher!r} in {name!r}; the original's students exist for "
                           f"{', '.join(TEACHERS)}; other teachers use {teacher}@POINT-<C>ch")
        spec = TEACHERS[teacher]
        channels = check_channels(match["channels"])
        version = head_version(spec.family)
        if match["version"] != version:
            raise HndError(f"{teacher} students use head version ver{version}, not ver{match['version']}: "
                           f"{teacher}_head_mimic-ver{version}-{channels}ch")
        return _spec(spec, None, channels, f"ver{version}", entropy=bool(match["entropic"]))
    match = _GENERAL.match(name)
    if not match:
        raise HndError(f"cannot read model name {name!r}; names are {GRAMMAR} (see `hnd models --help`)")
    if match["point"] == "":
        raise HndError(f"no split point after '@' in {name!r}; e.g. resnet18@layer2-3ch")
    channels = match["channels"]
    return _spec(teacher_spec(match["teacher"]), match["point"], None if channels is None else channels, None,
                 entropy=bool(match["entropic"]))


def resolve(model: str | ModelSpec) -> ModelSpec:
    """A spec from a name (parsed once) or the spec itself."""
    return model if isinstance(model, ModelSpec) else parse_name(model)


def student_spec(teacher: str | ModelSpec, channels: int, *, entropy: bool = False) -> ModelSpec:
    """The student of ``teacher`` (a teacher name or spec, maybe with ``@POINT``) with a
    ``channels``-channel bottleneck at the teacher's split point (``entropy``: entropy-coded)."""
    spec = resolve(teacher)
    if spec.is_student:
        raise HndError(f"expected a teacher such as resnet152 or resnet18@layer2, got the student {spec}")
    return _spec(spec.teacher, spec.split_point, check_channels(channels), None, spec.input_size, entropy)


def spec_from_dict(doc: dict) -> ModelSpec:
    """Rebuild a spec saved with :meth:`ModelSpec.to_dict` (checkpoints)."""
    try:
        teacher = teacher_spec(doc["teacher"])
        return _spec(teacher, doc["split_point"], doc.get("channels"), doc.get("design"), doc.get("input_size"),
                     bool(doc.get("entropy", False)))
    except (KeyError, TypeError):
        raise HndError(f"damaged model spec {doc!r}") from None


def list_models(all_teachers: bool = False, timm: bool = False) -> list[dict]:
    """The paper families' teachers and their official students (``all_teachers``: every
    torchvision classifier too; ``timm``: every timm model with pretrained weights, when timm
    is installed), as dicts (``name``, ``kind``, ``teacher``, ``bottleneck_channels``,
    ``official``)."""
    rows = [{"name": t, "kind": "teacher", "teacher": t, "bottleneck_channels": None,
             "official": t in PAPER_TEACHERS} for t in TEACHERS]
    for t, spec in TEACHERS.items():
        for c in OFFICIAL_CHANNELS:
            rows.append({"name": f"{t}_head_mimic-ver{head_version(spec.family)}-{c}ch", "kind": "student",
                         "teacher": t, "bottleneck_channels": c, "official": t in PAPER_TEACHERS})
    if all_teachers:
        rows += [{"name": t, "kind": "teacher", "teacher": t, "bottleneck_channels": None, "official": False}
                 for t in torchvision_classifiers() if t not in TEACHERS]
    if timm:
        rows += [{"name": t, "kind": "teacher", "teacher": t, "bottleneck_channels": None, "official": False}
                 for t in timm_teachers()]
    return rows


assert set(OFFICIAL_DESIGNS) == {spec.family for spec in TEACHERS.values()}
