"""hnd.evaluation.head_error: the fraction of the teacher head's output variance a student head misses."""

from __future__ import annotations

import math

import torch
from torch import nn

from hnd.evaluation import head_error

from conftest import error


class Scaled(nn.Module):
    """``scale · teacher(x) + offset``: a head whose error to ``teacher`` is known."""

    def __init__(self, teacher: nn.Module, scale: float, offset: torch.Tensor | float = 0.0):
        super().__init__()
        self.teacher, self.scale, self.offset = teacher, scale, offset

    def forward(self, x):
        return self.scale * self.teacher(x) + self.offset


def batches(n=3, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 12, 12, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(n)] + [None]


def teacher_head():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, stride=2), nn.ReLU(), nn.Conv2d(5, 4, 1)).eval()


def reference(student, teacher, loader):
    """The definition written out over the whole set at once."""
    xs = torch.cat([b[0] for b in loader if b is not None])
    with torch.no_grad():
        s, t = student(xs), teacher(xs)
    return float(((s - t) ** 2).sum() / ((t - t.mean(dim=(0, 2, 3), keepdim=True)) ** 2).sum())


def test_head_error_is_zero_for_the_teacher_and_one_for_channel_means():
    teacher, loader = teacher_head(), batches()
    assert head_error(teacher, teacher, loader, torch.device("cpu"), 4) == 0.0
    xs = torch.cat([b[0] for b in loader if b is not None])
    with torch.no_grad():
        means = teacher(xs).mean(dim=(0, 2, 3), keepdim=True)  # [1, C, 1, 1]
    constant = Scaled(teacher, 0.0, means)
    assert math.isclose(head_error(constant, teacher, loader, torch.device("cpu"), 4), 1.0, rel_tol=1e-5)


def test_head_error_matches_its_definition_across_batches():
    teacher, loader = teacher_head(), batches()
    student = Scaled(teacher, 0.5, 0.3)  # wrong scale and offset
    got = head_error(student, teacher, loader, torch.device("cpu"), 4, channels_last=True)
    assert math.isclose(got, reference(student, teacher, loader), rel_tol=1e-5)
    assert 0.25 < got  # a quarter of the variance from the scale alone, plus the offset


def test_head_error_of_no_image_is_a_clear_error():
    teacher = teacher_head()
    assert error(head_error, teacher, teacher, [None], torch.device("cpu"), 4) == "no image could be evaluated"
