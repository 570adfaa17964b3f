"""Teachers: torchvision builders, the paper's weights, and exact head/tail splits."""

from __future__ import annotations

import os

import pytest
import torch

from hnd.errors import HndError
from hnd.teachers import (TEACHERS, build_teacher, default_split_point, split_teacher, teacher_spec, teacher_stages,
                          weights_path)

from conftest import PAPER_TEACHERS

# Official cut (tests/reference/original-hnd-facts.md §1): head output per image.
HEAD_OUTPUT = {"densenet": (256, 14, 14), "resnet": (512, 28, 28), "inception": (192, 35, 35)}


def assert_loaded_from_file(loaded: dict, state: dict) -> None:
    """Every tensor of the built teacher is the file's (DenseNet files use old 'norm.1' keys)."""
    file_values = {k.replace("norm.1", "norm1").replace("norm.2", "norm2").replace("conv.1", "conv1")
                   .replace("conv.2", "conv2"): v for k, v in state.items()}
    for key, value in loaded.items():
        if key.endswith("num_batches_tracked") and key not in file_values:
            continue  # absent from old DenseNet files
        assert torch.equal(value, file_values[key]), key


@pytest.mark.parametrize("name", list(TEACHERS))
def test_head_then_tail_equals_teacher(name):
    torch.manual_seed(0)
    teacher = build_teacher(name, pretrained=False)
    size = teacher_spec(name).input_size
    x = torch.randn(2, 3, size, size)
    head, tail = split_teacher(name, teacher)
    with torch.no_grad():
        h = head(x)
        assert tuple(h.shape[1:]) == HEAD_OUTPUT[teacher_spec(name).family]
        assert torch.equal(tail(h), teacher(x))


@pytest.mark.parametrize("name", ["densenet121", "resnet50", "inception_v3"])
def test_every_split_point_is_exact(name):
    teacher = build_teacher(name, pretrained=False, transform_input=name == "inception_v3" or None)
    size = teacher_spec(name).input_size
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = teacher(x)
        for stage, _ in teacher_stages(teacher_spec(name), teacher)[:-1]:
            head, tail = split_teacher(name, teacher, stage)
            assert torch.equal(tail(head(x)), expected), stage


def test_inception_transform_input_in_head_only_when_teacher_has_it():
    teacher = build_teacher("inception_v3", pretrained=False, transform_input=True)
    head, tail = split_teacher("inception_v3", teacher)
    assert list(head.named_children())[0][0] == "transform_input"
    plain_head, _ = split_teacher("inception_v3", teacher, transform_input=False)
    assert "transform_input" not in dict(plain_head.named_children())
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        assert torch.equal(tail(head(x)), teacher(x))
        assert not torch.allclose(plain_head(x), head(x))  # the original's target differs


def test_paper_weights_are_imagenet1k_v1():
    for name in TEACHERS:
        assert teacher_spec(name).weights.name == "IMAGENET1K_V1"
    # ResNet-152 V1 (78.31%) rather than torchvision's default V2 (82.3%).
    assert weights_path(teacher_spec("resnet152")).name == "resnet152-394f9c45.pth"
    assert teacher_spec("resnet152").weights.meta["_metrics"]["ImageNet-1K"]["acc@1"] == pytest.approx(78.312)


@pytest.mark.parametrize("name", PAPER_TEACHERS)
def test_pretrained_weights_load_from_torch_cache(name, pretrained, torch_home):
    state = pretrained(name)
    assert str(weights_path(teacher_spec(name))).startswith(str(torch_home))
    teacher = build_teacher(name)
    loaded = teacher.state_dict()
    assert not teacher.training
    assert_loaded_from_file(loaded, state)
    if name == "inception_v3":
        assert teacher.transform_input and teacher.AuxLogits is None
        assert not any(k.startswith("AuxLogits") for k in loaded)
    size = teacher_spec(name).input_size
    x = torch.randn(1, 3, size, size)
    head, tail = split_teacher(name, teacher)
    with torch.no_grad():
        assert torch.equal(tail(head(x)), teacher(x))


def test_missing_weights_name_the_file_and_place(torch_home):
    path = weights_path(teacher_spec("densenet121"))
    assert not path.exists()
    with pytest.raises(HndError) as err:
        build_teacher("densenet121")
    assert path.name in str(err.value) and str(path.parent) in str(err.value)


def test_wrong_or_unsafe_weights_file_is_a_clear_error(pretrained, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = weights_path(teacher_spec("resnet101"))
    path.parent.mkdir(parents=True)
    torch.save(build_teacher("resnet50", pretrained=False).state_dict(), path)  # a resnet50 file
    with pytest.raises(HndError, match="do not fit resnet101"):
        build_teacher("resnet101")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"x": Payload()}, path)
    with pytest.raises(HndError, match="cannot read pretrained weights"):
        build_teacher("resnet101")
    assert not (tmp_path / "ran").exists()


def test_unknown_teacher_and_split_point():
    with pytest.raises(HndError, match="unknown teacher 'vgg17'.*similar: .*vgg11"):
        teacher_spec("vgg17")
    teacher = build_teacher("resnet50", pretrained=False)
    with pytest.raises(HndError, match="'layer9' is not a layer of resnet50; valid split points include conv1"):
        split_teacher("resnet50", teacher, "layer9")
    with pytest.raises(HndError, match="'fc' is the classifier of resnet50"):
        split_teacher("resnet50", teacher, "fc")


def test_any_torchvision_classifier_is_a_teacher():
    spec = teacher_spec("mobilenet_v3_large")
    assert (spec.family, spec.input_size, spec.staged) == ("mobilenetv3", 224, False)
    assert spec.weights is not None and spec.top1 is not None
    assert teacher_spec("vit_h_14").input_size == 518  # torchvision's SWAG weights: 518 px
    assert teacher_spec("efficientnet_b7").input_size == 600
    assert teacher_spec("inception_v3").input_size == 299 and teacher_spec("inception_v3").resize_size == 327


# Teachers off the papers' stage lists, in torchvision's file layout (conftest): GoogLeNet with its
# auxiliary classifiers, densenet161 with old 'norm.1' keys, a vision transformer whose position
# embedding fits its input size, and two common mobile networks.
OTHER_TEACHERS = ["resnet18", "mobilenet_v3_large", "googlenet", "densenet161", "vit_b_32"]


@pytest.mark.parametrize("name", OTHER_TEACHERS)
def test_any_teacher_loads_its_torchvision_file(name, pretrained):
    state = pretrained(name)
    spec = teacher_spec(name)
    assert weights_path(spec).name == spec.weights.url.rsplit("/", 1)[1]
    teacher = build_teacher(name)
    assert not teacher.training
    loaded = teacher.state_dict()
    assert_loaded_from_file(loaded, state)
    if name == "googlenet":  # the file's auxiliary classifiers are dropped, its input transform is on
        assert any(k.startswith("aux1.") for k in state) and not any(k.startswith("aux") for k in loaded)
        assert teacher.transform_input
    size = spec.input_size
    x = torch.randn(1, 3, size, size)
    head, tail = split_teacher(spec, teacher)
    with torch.no_grad():
        assert torch.equal(tail(head(x)), teacher(x))
    if name in ("resnet18", "mobilenet_v3_large"):  # the last stage at stride 8 (28x28 at 224)
        assert default_split_point(spec) == {"resnet18": "layer2", "mobilenet_v3_large": "features.6"}[name]


def test_pretrained_needs_a_thousand_classes(pretrained):
    pretrained("resnet18")
    with pytest.raises(HndError, match="1000 classes"):
        build_teacher("resnet18", num_classes=10)
    assert build_teacher("resnet18", pretrained=False, num_classes=10).fc.out_features == 10


def test_no_initial_values_skips_initialisers_in_its_thread_only():
    """Within ``no_initial_values`` initialisers leave a tensor as it is and random fills give
    zeros (a build whose values come from a file or do not exist); another thread initialises
    as usual."""
    import threading

    from torch import nn

    from hnd.teachers import no_initial_values

    other = torch.zeros(1000)
    layer = nn.Linear(64, 64)
    before = layer.weight.detach().clone()
    with no_initial_values():
        filled = torch.full((8, 8), 7.0)
        for init in (nn.init.kaiming_uniform_, lambda t: nn.init.uniform_(t, -1, 1), nn.init.normal_):
            assert init(filled) is filled
        drawn = torch.full((8, 8), 7.0)
        for init in (nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.trunc_normal_,
                     lambda t: t.normal_(), lambda t: t.uniform_()):
            assert init(drawn) is drawn and not drawn.any()  # the draw gives zeros; a rejection loop ends
            drawn.fill_(7.0)
        layer.reset_parameters()
        thread = threading.Thread(target=lambda: nn.init.normal_(other))
        thread.start()
        thread.join()
    assert torch.equal(filled, torch.full((8, 8), 7.0)) and torch.equal(layer.weight, before)
    assert other.std() > 0.5  # the other thread's initialiser ran
    nn.init.zeros_(filled)
    assert not filled.any()  # and after it, this thread's again
