"""Student heads (tests/reference/original-hnd-facts.md §1), names, encoder/decoder split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hnd.errors import HndError
from hnd.models import create_student
from hnd.registry import resolve
from hnd.students import GenericHead, Student, StudentHead, check_channels
from hnd.teachers import TEACHERS, teacher_spec

from conftest import OFFICIAL_STUDENTS

# Original head state_dict key counts and decoder conv shapes (tests/reference/original-hnd-facts.md §1), bc = 3.
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
    student = create_student(name, pretrained=False)
    assert isinstance(student, Student) and isinstance(student.head, StudentHead)
    assert str(student.spec) == name and student.spec == resolve(name) and student.spec.official
    size = teacher_spec(student.spec.teacher.name).input_size
    assert student.spec.input_size == size
    x = torch.randn(1, 3, size, size)
    bc = student.spec.channels
    assert bc == int(name.rsplit("-", 1)[1][:-2])
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
        student = create_student(f"{teacher}_head_mimic-ver2b-6ch", pretrained=False)
        assert isinstance(student.head, StudentHead) and student.spec.official
        with torch.no_grad():
            assert student(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_any_positive_channel_count():
    spec = resolve("densenet169_head_mimic-ver2b-17ch")
    assert spec.channels == 17 and str(spec) == "densenet169_head_mimic-ver2b-17ch" and spec.official
    assert StudentHead("inception", 1).encoder[6].out_channels == 1


@pytest.mark.parametrize("bad, message", [
    ("densenet169_head_mimic-ver2b-0ch", "positive integer"),
    ("densenet169_head_mimic-ver2b--3ch", "positive integer"),
    ("densenet169_head_mimic-ver2b-2.5ch", "positive integer"),
    ("densenet169_head_mimic-ver2b-xch", "positive integer"),
    ("densenet169_head_mimic-ver1b-3ch", "use head version ver2b"),
    ("inception_v3_head_mimic-ver2b-3ch", "use head version ver1b"),
    ("vgg16_head_mimic-ver2b-3ch", "the original's students exist for densenet121"),
    ("densenet169_head_mimic-3ch", "not a student name"),
])
def test_bad_student_names(bad, message):
    with pytest.raises(HndError, match=message) as info:
        resolve(bad)
    assert "\n" not in str(info.value)


def test_a_teacher_name_is_not_a_student():
    with pytest.raises(HndError, match="densenet169 is a teacher: split computing here needs a student such as "
                                       "densenet169-3ch"):
        create_student("densenet169", pretrained=False)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "3.5", True, None])
def test_bad_channel_values(bad):
    with pytest.raises(HndError, match="positive integer"):
        check_channels(bad)


def test_every_teacher_has_a_student_design():
    for teacher in TEACHERS:
        spec = resolve(f"{teacher}_head_mimic-ver{'1b' if teacher == 'inception_v3' else '2b'}-3ch")
        assert spec.official and spec.teacher.name == teacher and spec.split_point == TEACHERS[teacher].split_point


# GenericHead (its docstring): a ver2b encoder with the teacher's stem; the bottleneck conv is
# 2x2 stride 2 (z: S/8+1) when the head's output stride is about 8 or more, else 3x3 stride 1 (S/4).
@pytest.mark.parametrize("output, size, z_side", [
    ((128, 28, 28), 224, 29),  # ResNet-18 layer2: stride 8
    ((40, 28, 28), 224, 29),  # MobileNetV3 features.6
    ((1024, 14, 14), 224, 29),  # stride 16: the same bottleneck, pooled down by the decoder
    ((64, 56, 56), 224, 56),  # stride 4: 3x3 stride 1
    ((128, 8, 8), 64, 9),  # a small input
])
def test_generic_head_shapes(output, size, z_side):
    torch.manual_seed(0)
    head = GenericHead(5, output, size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        z = head.encoder(x)
        assert tuple(z.shape) == (2, 5, z_side, z_side)
        assert tuple(head(x).shape) == (2, *output)
        assert torch.equal(head.decoder(z), head(x))
    assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(head.decoder[-1], nn.AdaptiveAvgPool2d)


def test_generic_head_takes_the_teacher_stem():
    head = GenericHead(3, (24, 28, 28), 224, stem_channels=16, stem_kernel=3)  # MobileNet: 16 channels, 3x3
    assert list(head.encoder[0].weight.shape) == [16, 3, 3, 3]
    assert list(head.encoder[6].weight.shape) == [3, 16, 2, 2]
    # With ResNet's stem (64 channels, 7x7) a generic encoder is laid out like the original's
    # ver2b encoder, tensor for tensor.
    generic, official = GenericHead(3, (128, 28, 28), 224), StudentHead("resnet", 3)
    shapes = [tuple(t.shape) for t in generic.encoder.state_dict().values()]
    assert shapes == [tuple(t.shape) for t in official.encoder.state_dict().values()]


def test_generic_head_rejects_no_channels():
    with pytest.raises(HndError, match="positive integer"):
        GenericHead(0, (128, 28, 28), 224)


@pytest.mark.parametrize("name", ["resnet50_head_mimic-ver2b-3ch-entropic", "resnet18@layer2-6ch-entropic"])
def test_entropic_student_rounds_its_bottleneck_and_has_a_rate(name):
    torch.manual_seed(0)
    student = create_student(name, pretrained=False).eval()
    spec = student.spec
    assert spec.entropy and student.prior is not None and student.prior.channels == spec.channels
    size = spec.input_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        student.prior.update_tables()
        z = student.encode(x)  # raw encoder output: what the coder rounds
        assert not torch.equal(z, torch.round(z))
        logits = student(x)
        assert torch.equal(student.decode(z), logits)  # decode rounds as forward does
        assert torch.equal(student.decode(student.quantize(z)), logits)
        edge, server = student.split()
        assert torch.equal(server.eval()(edge(x)), logits)
        out, bits = student.head.forward_with_rate(x)
        assert bits.shape == (2,) and (bits > 0).all() and torch.equal(out, student.head(x))
        low, width = student.prior.low, student.prior.pmf.shape[1]
        y = student.quantize(z * 1e6)  # far outside the coded range: clamped into it
        assert (y >= low.view(1, -1, 1, 1)).all() and (y <= (low + width - 1).view(1, -1, 1, 1)).all()
    student.head.train()  # training: additive uniform noise instead of rounding
    noisy = student.head.prior(z)[0]
    assert not torch.equal(noisy, torch.round(noisy)) and (noisy - z).abs().max() <= 0.5
    plain = create_student(name.removesuffix("-entropic"), pretrained=False)
    assert plain.prior is None and "no entropy model" in str(pytest.raises(HndError, plain.head.forward_with_rate, x).value)
