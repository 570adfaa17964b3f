"""Students: a small bottleneck head (encoder → decoder) followed by the teacher's tail.

The heads are the original's ImageNet heads (original-hnd.md §2.2–2.4): DenseNet and
ResNet "ver2b", Inception-v3 "ver1b". The encoder (stem, BN, ReLU, bottleneck conv) runs
on the edge device and its raw conv output ``z`` is what is transmitted; the decoder
(BN, ReLU, convs, pool) and the teacher's tail run on the server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from hnd.errors import HndError
from hnd.teachers import TEACHERS, build_teacher, split_teacher, teacher_spec

OFFICIAL_CHANNELS = (3, 6, 9, 12)

# family -> (head version name, stem conv/max-pool padding, decoder convs as (out_channels, padding),
#            stride of the final average pool). All decoder convs are 2x2, stride 1.
_HEAD_DESIGNS = {
    "densenet": ("2b", 3, 1, [(512, 1), (512, 1), (256, 0), (256, 0), (256, 0)], 2),  # -> 256x14x14
    "resnet": ("2b", 3, 1, [(512, 1), (512, 1), (512, 0), (512, 0)], 1),  # -> 512x28x28
    "inception": ("1b", 0, 0, [(256, 1), (256, 0), (192, 0)], 1),  # -> 192x35x35
}

_NAME = re.compile(r"^(?P<teacher>.+)_head_mimic-ver(?P<version>[^-]+)-(?P<channels>.*)ch$")


@dataclass(frozen=True)
class StudentName:
    """A student's identity; ``str()`` gives the original config name."""

    teacher: str
    bottleneck_channels: int

    @property
    def version(self) -> str:
        return _HEAD_DESIGNS[teacher_spec(self.teacher).family][0]

    def __str__(self) -> str:
        return f"{self.teacher}_head_mimic-ver{self.version}-{self.bottleneck_channels}ch"


def check_channels(channels: object) -> int:
    """Return ``channels`` as an int if it is a positive integer, else raise a clear error."""
    if isinstance(channels, str) and re.fullmatch(r"\s*\d+\s*", channels):
        channels = int(channels)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise HndError(f"bottleneck channels must be a positive integer, got {channels!r}")
    return channels


def parse_student_name(name: str) -> StudentName:
    """Parse e.g. ``densenet169_head_mimic-ver2b-3ch``; any positive channel count is valid."""
    match = _NAME.match(name)
    if not match:
        raise HndError(f"not a student name: {name!r}; students are named "
                       "<teacher>_head_mimic-ver<2b|1b>-<channels>ch, e.g. densenet169_head_mimic-ver2b-3ch")
    teacher = match["teacher"]
    if teacher not in TEACHERS:
        raise HndError(f"unknown teacher {teacher!r} in {name!r}; valid teachers: {', '.join(TEACHERS)}")
    student = StudentName(teacher, check_channels(match["channels"]))
    if match["version"] != student.version:
        raise HndError(f"{teacher} students use head version ver{student.version}, not "
                       f"ver{match['version']}: {student}")
    return student


def _conv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)


class StudentHead(nn.Module):
    """The bottleneck head: ``decoder(encoder(x))`` replaces the teacher head."""

    def __init__(self, family: str, bottleneck_channels: int):
        super().__init__()
        _, stem_pad, pool_pad, convs, pool_stride = _HEAD_DESIGNS[family]
        bc = check_channels(bottleneck_channels)
        # x: [N, 3, 224, 224] (Inception: 299)
        self.encoder = nn.Sequential(
            _conv(3, 64, 7, 2, stem_pad), nn.BatchNorm2d(64), nn.ReLU(inplace=True),  # 64x112x112 (147)
            nn.MaxPool2d(3, stride=2, padding=pool_pad),  # 64x56x56 (73)
            nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            _conv(64, bc, 2, 2, 1),  # z: bc x 29x29 (37) -- the bottleneck, sent raw
        )
        layers: list[nn.Module] = [nn.BatchNorm2d(bc), nn.ReLU(inplace=True)]
        cin = bc
        for i, (cout, padding) in enumerate(convs):
            layers.append(_conv(cin, cout, 2, 1, padding))
            if i < len(convs) - 1:
                layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        layers.append(nn.AvgPool2d(2, stride=pool_stride))  # teacher-head shape
        self.decoder = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        """The original's init: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Student(nn.Module):
    """Bottleneck-injected model: student head + the teacher's tail, ``tail(head(x))``."""

    def __init__(self, name: StudentName, head: StudentHead, tail: nn.Sequential):
        super().__init__()
        self.name = name
        self.head = head
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Edge side: image batch -> bottleneck tensor ``z`` [N, bc, H', W']."""
        return self.head.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Server side: bottleneck tensor -> logits [N, classes]."""
        return self.tail(self.head.decoder(z))

    def split(self) -> tuple[nn.Sequential, nn.Sequential]:
        """(edge, server) modules that share this student's parameters."""
        return self.head.encoder, nn.Sequential(self.head.decoder, self.tail)


def student_from_teacher(name: str | StudentName, teacher: nn.Module) -> Student:
    """A student with a fresh head and ``teacher``'s tail (the same modules, not a copy).

    The head takes plainly normalized input, like the original (for Inception-v3 no
    ``transform_input`` is applied).
    """
    if isinstance(name, str):
        name = parse_student_name(name)
    _, tail = split_teacher(name.teacher, teacher, transform_input=False)
    head = StudentHead(teacher_spec(name.teacher).family, name.bottleneck_channels)
    return Student(name, head, tail)


def build_student(name: str | StudentName, *, pretrained: bool = True, num_classes: int = 1000) -> Student:
    """Build a student: a freshly initialised head and the teacher's tail.

    pretrained: take the tail from the teacher's pretrained ImageNet weights (the original's
    starting point for all three methods); otherwise the tail is randomly initialised.
    """
    if isinstance(name, str):
        name = parse_student_name(name)
    teacher = build_teacher(name.teacher, pretrained=pretrained, num_classes=num_classes)
    return student_from_teacher(name, teacher).eval()
