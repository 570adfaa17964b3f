"""One registry over teachers and students: names, building, input sizes."""

from __future__ import annotations

from torch import nn

from hnd.errors import HndError
from hnd.students import OFFICIAL_CHANNELS, StudentName, build_student, parse_student_name
from hnd.teachers import PAPER_TEACHERS, TEACHERS, build_teacher, teacher_spec


def list_models() -> list[dict]:
    """Every teacher and the students at the official channel counts, as dicts
    (``name``, ``kind``, ``teacher``, ``bottleneck_channels``, ``official``)."""
    rows = [{"name": t, "kind": "teacher", "teacher": t, "bottleneck_channels": None,
             "official": t in PAPER_TEACHERS} for t in TEACHERS]
    for t in TEACHERS:
        for c in OFFICIAL_CHANNELS:
            rows.append({"name": str(StudentName(t, c)), "kind": "student", "teacher": t,
                         "bottleneck_channels": c, "official": t in PAPER_TEACHERS})
    return rows


def resolve(name: str) -> tuple[str, StudentName | None]:
    """(teacher name, student name or None) for any model name; unknown names raise."""
    if name in TEACHERS:
        return name, None
    if "_head_mimic-" in name:
        student = parse_student_name(name)
        return student.teacher, student
    raise HndError(f"unknown model {name!r}; teachers: {', '.join(TEACHERS)}; students: "
                   "<teacher>_head_mimic-ver<2b|1b>-<channels>ch (see `hnd models`)")


def build_model(name: str, *, pretrained: bool = True, num_classes: int = 1000) -> nn.Module:
    """Build the teacher or student called ``name`` (eval mode)."""
    teacher, student = resolve(name)
    if student is None:
        return build_teacher(teacher, pretrained=pretrained, num_classes=num_classes)
    return build_student(student, pretrained=pretrained, num_classes=num_classes)


def input_size(name: str) -> int:
    """Side of the square input that model ``name`` takes (224, or 299 for Inception-v3)."""
    return teacher_spec(resolve(name)[0]).input_size
