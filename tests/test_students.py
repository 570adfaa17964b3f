"""Student heads (original-hnd.md §2.2-2.5), names, encoder/decoder split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hnd.errors import HndError
from hnd.students import StudentHead, build_student, check_channels, parse_student_name
from hnd.teachers import TEACHERS, teacher_spec

from conftest import OFFICIAL_STUDENTS

# Original head state_dict key counts and decoder conv shapes (original-hnd.md §2.7), bc = 3.
ORIGINAL_HEAD = {
    "densenet": (42, [[512, 3, 2, 2], [512, 512, 2, 2], [256, 512, 2, 2], [256, 256, 2, 2], [256, 256, 2, 2]]),
    "resnet": (36, [[512, 3, 2, 2], [512, 512, 2, 2], [512, 512, 2, 2], [512, 512, 2, 2]]),
    "inception": (30, [[256, 3, 2, 2], [256, 256, 2, 2], [192, 256, 2, 2]]),
}


@pytest.mark.parametrize("family", list(ORIGINAL_HEAD))
def test_head_layout_matches_original(family):
    head = StudentHead(family, 3)
    keys, conv_shapes = ORIGINAL_HEAD[family]
    assert len(head.state_dict()) == keys
    assert list(head.encoder[0].weight.shape) == [64, 3, 7, 7]
    assert list(head.encoder[6].weight.shape) == [3, 64, 2, 2]
    convs = [list(m.weight.shape) for m in head.decoder if isinstance(m, nn.Conv2d)]
    assert convs == conv_shapes
    assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(head.decoder[-1], nn.AvgPool2d)


def test_original_weight_init():
    torch.manual_seed(0)
    head = StudentHead("resnet", 12)
    conv = head.decoder[5]  # 512 -> 512, 2x2: kaiming normal, fan_out = 512 * 4
    assert conv.weight.std().item() == pytest.approx((2 / (512 * 4)) ** 0.5, rel=0.02)
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("name", OFFICIAL_STUDENTS)
def test_official_students_shapes_and_split(name):
    torch.manual_seed(0)
    student = build_student(name, pretrained=False)
    assert str(student.name) == name
    size = teacher_spec(student.name.teacher).input_size
    x = torch.randn(1, 3, size, size)
    bc = student.name.bottleneck_channels
    side = 37 if size == 299 else 29
    with torch.no_grad():
        z = student.encode(x)
        assert tuple(z.shape) == (1, bc, side, side)
        logits = student(x)
        assert logits.shape == (1, 1000)
        assert torch.equal(student.decode(z), logits)
        edge, server = student.split()
        assert torch.equal(server(edge(x)), logits)
    # The tail is the teacher's own: same keys as the teacher from the split point on.
    assert not any(k.startswith(("conv1", "Conv2d_1a", "features.conv0")) for k in student.tail.state_dict())


def test_smaller_family_members_share_the_head():
    for teacher in ("densenet121", "resnet50", "resnet101"):
        student = build_student(f"{teacher}_head_mimic-ver2b-6ch", pretrained=False)
        with torch.no_grad():
            assert student(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_any_positive_channel_count():
    name = parse_student_name("densenet169_head_mimic-ver2b-17ch")
    assert name.bottleneck_channels == 17 and str(name) == "densenet169_head_mimic-ver2b-17ch"
    assert StudentHead("inception", 1).encoder[6].out_channels == 1


@pytest.mark.parametrize("bad, message", [
    ("densenet169_head_mimic-ver2b-0ch", "positive integer"),
    ("densenet169_head_mimic-ver2b--3ch", "positive integer"),
    ("densenet169_head_mimic-ver2b-2.5ch", "positive integer"),
    ("densenet169_head_mimic-ver2b-xch", "positive integer"),
    ("densenet169_head_mimic-ver1b-3ch", "use head version ver2b"),
    ("vgg16_head_mimic-ver2b-3ch", "valid teachers"),
    ("densenet169", "not a student name"),
])
def test_bad_student_names(bad, message):
    with pytest.raises(HndError, match=message):
        parse_student_name(bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "3.5", True, None])
def test_bad_channel_values(bad):
    with pytest.raises(HndError, match="positive integer"):
        check_channels(bad)


def test_every_teacher_has_a_student_design():
    for teacher in TEACHERS:
        assert parse_student_name(f"{teacher}_head_mimic-ver{'1b' if teacher == 'inception_v3' else '2b'}-3ch")
