"""Model names resolve once into a ModelSpec: the grammar, canonical names, default split points,
user teachers, generic students' checkpoints, one parse and one file read per call, one HND step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import hnd.registry
from hnd.checkpoints import load_model, read_checkpoint, save_checkpoint
from hnd.cli import main
from hnd.config import resolve_config
from hnd.errors import HndError
from hnd.evaluation import evaluate_checkpoint
from hnd.methods import build_task
from hnd.registry import ModelSpec, resolve, spec_from_dict, student_spec
from hnd.students import GenericHead, StudentHead
from hnd.synth import write_synthetic_dataset
from hnd.teachers import on_meta, register_teacher, split_teacher

from conftest import randomize


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the name grammar

# name -> its canonical form
CANONICAL = {
    "resnet18": "resnet18",
    "resnet18@layer2": "resnet18",  # the default point is left out
    "resnet18@layer3": "resnet18@layer3",
    "resnet18-3ch": "resnet18@layer2-3ch",  # a student always names its point
    "resnet18@layer2-3ch": "resnet18@layer2-3ch",
    "resnet18@layer3-12ch": "resnet18@layer3-12ch",
    "resnet18@layer1.0.add-5ch": "resnet18@layer1.0.add-5ch",
    "mobilenet_v3_large": "mobilenet_v3_large",
    "mobilenet_v3_large-3ch": "mobilenet_v3_large@features.6-3ch",
    "efficientnet_b0-3ch": "efficientnet_b0@features.3-3ch",
    "vit_b_16": "vit_b_16",
    # The papers' families keep the original's names, and at the official point the @ form is the same student.
    "densenet169": "densenet169",
    "densenet169@transition2": "densenet169",
    "densenet169_head_mimic-ver2b-6ch": "densenet169_head_mimic-ver2b-6ch",
    "densenet169@transition2-6ch": "densenet169_head_mimic-ver2b-6ch",
    "densenet169-6ch": "densenet169_head_mimic-ver2b-6ch",
    "densenet169@transition1-6ch": "densenet169@transition1-6ch",  # elsewhere: a generic student
    "resnet152_head_mimic-ver2b-12ch": "resnet152_head_mimic-ver2b-12ch",
    "resnet50@layer2-3ch": "resnet50_head_mimic-ver2b-3ch",
    "inception_v3@maxpool2-9ch": "inception_v3_head_mimic-ver1b-9ch",
    "inception_v3_head_mimic-ver1b-3ch": "inception_v3_head_mimic-ver1b-3ch",
    "inception_v3@maxpool2": "inception_v3",
    "densenet169-6ch-entropic": "densenet169_head_mimic-ver2b-6ch-entropic",
    "resnet18@layer2.1-3ch-entropic": "resnet18@layer2-3ch-entropic",
    "inception_v3_head_mimic-ver1b-12ch-entropic": "inception_v3_head_mimic-ver1b-12ch-entropic",
}


@pytest.mark.parametrize("name", list(CANONICAL))
def test_names_round_trip_through_their_canonical_form(name):
    spec = resolve(name)
    assert isinstance(spec, ModelSpec)
    assert str(spec) == spec.name == CANONICAL[name]
    again = resolve(str(spec))
    assert again == spec and hash(again) == hash(spec) and str(again) == str(spec)
    assert resolve(spec) is spec  # a spec resolves to itself, unparsed
    assert spec_from_dict(spec.to_dict()) == spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.channels = 7  # immutable


def test_official_and_at_forms_are_the_same_student():
    official = resolve("densenet169_head_mimic-ver2b-6ch")
    assert resolve("densenet169@transition2-6ch") == official
    assert (official.design, official.official, official.split_point, official.channels) == ("ver2b", True,
                                                                                             "transition2", 6)
    assert resolve("resnet18-3ch") == resolve("resnet18@layer2-3ch")
    generic = resolve("resnet18-3ch")
    assert (generic.design, generic.official, generic.teacher.name, generic.channels) == ("generic", False,
                                                                                          "resnet18", 3)
    assert generic.as_teacher() == resolve("resnet18") and official.as_teacher() == resolve("densenet169")
    assert student_spec("resnet18", 3) == generic and student_spec("densenet169", 6) == official
    assert student_spec(resolve("resnet18@layer3"), 4) == resolve("resnet18@layer3-4ch")
    assert resolve("resnet18@layer3-3ch") != generic


def test_official_students_build_the_originals_head():
    on = on_meta(lambda: resolve("densenet169@transition2-6ch").build(pretrained=False))
    assert isinstance(on.head, StudentHead)
    generic = on_meta(lambda: resolve("densenet169@transition1-6ch").build(pretrained=False))
    assert isinstance(generic.head, GenericHead)


def test_every_name_of_a_point_gives_one_canonical_spec():
    assert resolve("resnet18@layer2.1-3ch") == resolve("resnet18@layer2-3ch")
    assert str(resolve("resnet18@layer2.1.relu_1")) == "resnet18"


# ---------------------------------------------------------------- default split points

@pytest.mark.parametrize("teacher, point, channels", [
    ("resnet18", "layer2", 128), ("mobilenet_v3_large", "features.6", 40), ("efficientnet_b0", "features.3", 40),
])
def test_default_split_points_and_bottlenecks(teacher, point, channels):
    """The end of the last stride-8 stage (28x28 at 224, like ResNet-50's official layer2); a
    3-channel bottleneck there is 3x29x29, as the papers' students."""
    spec = resolve(teacher)
    assert spec.split_point == point and spec.head_output_shape == (channels, 28, 28)
    student = student_spec(teacher, 3)
    assert str(student) == f"{teacher}@{point}-3ch"
    model = on_meta(lambda: student.build(pretrained=False))
    x = torch.zeros(1, 3, 224, 224, device=next(model.parameters()).device)
    with torch.no_grad():
        assert tuple(model.encode(x).shape) == (1, 3, 29, 29)
        assert tuple(model.head(x).shape) == (1, channels, 28, 28)
        assert tuple(model(x).shape) == (1, 1000)


# ---------------------------------------------------------------- a user's own teacher

def tiny_cnn(classes: int = 10) -> nn.Sequential:
    """Three stride-2 convs (64 px -> 8x8), a Linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes),
    )


@pytest.fixture(scope="module")
def tinynet():
    """A registered user teacher with random weights (the module carries them)."""
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    randomize(model, 3)
    register_teacher("tinynet_registry_test", model, input_size=64)
    return model


def test_user_module_as_teacher(tinynet):
    spec = resolve("tinynet_registry_test")
    assert spec.teacher.user and spec.input_size == 64 and spec.kind == "teacher"
    # Stride 8 at 64 px is the third conv's 8x8 map; the last point there is its ReLU.
    assert spec.split_point == "7" and spec.head_output_shape == (32, 8, 8)
    teacher = spec.build()
    assert teacher is not tinynet  # a copy: training it leaves the registered module alone
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(teacher(x), tinynet(x))
        head, tail = split_teacher(spec.teacher, teacher, spec.split_point)
        assert torch.equal(tail(head(x)), tinynet(x))
        assert tuple(head(x).shape) == (2, 32, 8, 8)
    assert resolve("tinynet_registry_test@4") != spec  # another point: the second BN's 16x16 map
    assert resolve("tinynet_registry_test@4").head_output_shape == (32, 16, 16)


def test_user_module_as_student(tinynet, tmp_path):
    spec = resolve("tinynet_registry_test-2ch")
    assert str(spec) == "tinynet_registry_test@7-2ch" and spec.design == "generic"
    torch.manual_seed(0)
    student = spec.build()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert tuple(student.encode(x).shape) == (2, 2, 9, 9)
        assert tuple(student.head(x).shape) == (2, 32, 8, 8)
        assert tuple(student(x).shape) == (2, 10)
    # The tail is the registered module's classifier end, with its weights.
    assert torch.equal(student.tail.get_submodule("10").weight, tinynet[10].weight)
    save_checkpoint(tmp_path / "tiny.pt", spec, student)
    loaded = load_model(None, tmp_path / "tiny.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))


# ---------------------------------------------------------------- generic students' checkpoints

def test_generic_student_checkpoint_rebuilds_from_the_file(tmp_path):
    spec = resolve("resnet18@layer3-4ch")
    student = spec.build(pretrained=False)
    randomize(student, 11)
    save_checkpoint(tmp_path / "s.pt", spec, student, epoch=2)
    ckpt = read_checkpoint(tmp_path / "s.pt")
    assert ckpt.model == "resnet18@layer3-4ch" and ckpt.meta["spec"] == spec.to_dict()
    loaded = load_model(None, tmp_path / "s.pt")
    assert loaded.spec == spec and isinstance(loaded.head, GenericHead)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), student.eval()(x))
    assert "does not fit resnet18@layer2-4ch" in str(pytest.raises(Exception, load_model, resolve("resnet18-4ch"),
                                                                   tmp_path / "s.pt").value)


def _decoder_widths(student) -> list[int]:
    return [m.out_channels for m in student.head.decoder if isinstance(m, torch.nn.Conv2d)]


def test_generic_heads_decode_at_twice_the_head_outputs_width_and_designs_are_checked():
    spec = resolve("resnet18@layer1-3ch")  # head output 64x56x56
    assert _decoder_widths(spec.build(pretrained=False)) == [128, 128, 64, 64]
    message = str(pytest.raises(HndError, spec_from_dict, {**spec.to_dict(), "design": "generic3"}).value)
    assert message == "unknown student design 'generic3'; designs are ver2b, ver1b, generic"


# ---------------------------------------------------------------- one parse and one read per call

@pytest.fixture(scope="module")
def four_class_run(tmp_path_factory):
    """A 4-class generic student checkpoint (resnet18@layer2-3ch at 64 px) and a tiny dataset."""
    root = tmp_path_factory.mktemp("registry_counts")
    data = write_synthetic_dataset(root / "data", classes=4, train_per_class=1, val_per_class=2, image_size=64,
                                   seed=0)["root"]
    spec = resolve("resnet18-3ch")
    torch.manual_seed(0)
    student = spec.build(pretrained=False, num_classes=4)
    randomize(student, 5)
    save_checkpoint(root / "student.pt", spec, student)
    return Path(data), root / "student.pt"


def test_a_checkpoint_is_read_once(counts, four_class_run):
    data, path = four_class_run
    key = str(path.resolve())
    load_model(None, path)
    assert counts["loads"].get(key) == 1
    counts["loads"].clear()
    load_model(resolve("resnet18-3ch"), path)
    assert counts["loads"].get(key) == 1
    counts["loads"].clear()
    result = evaluate_checkpoint(resolve("resnet18-3ch"), "hnd", path, data, student_only=True, batch_size=4,
                                 num_workers=0)
    assert result["student"]["images"] == 8 and result["teacher"] is None
    assert counts["loads"].get(key) == 1


def test_inspect_parses_the_name_once(counts, capsys):
    assert main(["inspect", "resnet18-3ch"]) == 0
    assert "resnet18@layer2-3ch" in capsys.readouterr().out
    assert counts["parse"] == 1


def test_predict_parses_once_and_reads_once(counts, capsys, four_class_run, image_file):
    _, path = four_class_run
    assert main(["predict", "resnet18-3ch", str(image_file), "--checkpoint", str(path), "--topk", "3", "--json"]) == 0
    assert len(capsys.readouterr().out) > 0
    assert counts["parse"] == 1
    assert counts["loads"].get(str(path.resolve())) == 1


def test_evaluate_parses_once_and_reads_once(counts, capsys, four_class_run):
    data, path = four_class_run
    assert main(["evaluate", "resnet18-3ch", "--method", "hnd", "--checkpoint", str(path), "--data", str(data),
                 "--student-only", "--workers", "0", "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert counts["parse"] == 1
    assert counts["loads"].get(str(path.resolve())) == 1


def test_predict_uses_the_checkpoints_input_size(capsys, tmp_path, image_file):
    import json

    from hnd.data import image_tensor

    spec = resolve("resnet18-3ch").at_input_size(64)
    torch.manual_seed(0)
    student = spec.build(pretrained=False, num_classes=4)
    randomize(student, 9)
    save_checkpoint(tmp_path / "small.pt", spec, student)
    assert main(["predict", "resnet18-3ch", str(image_file), "--checkpoint", str(tmp_path / "small.pt"),
                 "--topk", "2", "--logits", "--json"]) == 0
    logits = torch.tensor(json.loads(capsys.readouterr().out)["logits"])
    with torch.no_grad():
        expected = student.eval()(image_tensor(spec, image_file))[0]  # 64-px input, as trained
    assert torch.allclose(logits, expected, atol=1e-5)


# ---------------------------------------------------------------- one HND step for a generic student

def test_one_hnd_step_for_a_generic_student():
    config = resolve_config(resolve("resnet18-3ch"), "hnd", assignments=["pretrained=false", "input_size=64"])
    assert config.model == "resnet18@layer2-3ch" and config.spec.input_size == 64
    torch.manual_seed(0)
    task = build_task(config, num_classes=1000)
    assert task.trained is task.model.head and isinstance(task.trained, GenericHead)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 2])
    task.train_mode()
    with torch.no_grad():
        target = task.reference(x)
    assert tuple(target.shape) == (2, 128, 8, 8)  # ResNet-18's layer2 at 64 px
    with torch.no_grad():
        out = task.trained(x)  # train mode: batch statistics, as in the step
    assert out.shape == target.shape
    loss, logits = task.loss(task.trained, x, y)
    torch.testing.assert_close(loss.detach(), ((out - target) ** 2).sum())  # summed squared error
    assert logits is None and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = {n: p.grad for n, p in task.trained.named_parameters()}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum().item() for g in grads.values()) > 0
    assert all(p.grad is None for p in task.reference.parameters())  # the teacher head stays frozen


# ---------------------------------------------------------------- every family: one HND step, one predict

# One small member of each torchvision classification family with [C, H, W] maps (the papers'
# families have their own tests).
FAMILY_STUDENTS = ["resnet18-3ch", "resnext50_32x4d-3ch", "mobilenet_v2-3ch", "mobilenet_v3_small-3ch",
                   "efficientnet_b0-3ch", "efficientnet_v2_s-3ch", "regnet_x_400mf-3ch", "mnasnet0_5-3ch",
                   "shufflenet_v2_x0_5-3ch", "squeezenet1_1-3ch", "vgg11-3ch", "alexnet-3ch", "googlenet-3ch",
                   "convnext_tiny-3ch", "densenet121@features.denseblock2-3ch", "swin_t-3ch"]


@pytest.mark.parametrize("name", FAMILY_STUDENTS)
def test_every_family_trains_a_step_and_predicts(name, capsys, tmp_path, image_file):
    """A generic student of each family: one HND step at 96 px moves its head towards the
    teacher head's output (same shape), and ``hnd predict`` with its checkpoint gives the
    student's own logits."""
    config = resolve_config(resolve(name), "hnd", assignments=["pretrained=false", "input_size=96"])
    torch.manual_seed(0)
    task = build_task(config, num_classes=1000)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    task.train_mode()
    with torch.no_grad():
        target = task.reference(x)
    assert task.trained(x).shape == target.shape == (2, *config.spec.head_output_shape)
    loss, _ = task.loss(task.trained, x, torch.tensor([0, 1]))
    loss.backward()
    before = {n: p.detach().clone() for n, p in task.trained.named_parameters()}
    torch.optim.Adam(task.trained.parameters(), 1e-3).step()
    assert all(torch.isfinite(p).all() for p in task.trained.parameters())
    assert any(not torch.equal(before[n], p) for n, p in task.trained.named_parameters())

    student = task.model.eval()
    save_checkpoint(tmp_path / "student.pt", config.spec, student)
    assert main(["predict", name, str(image_file), "--checkpoint", str(tmp_path / "student.pt"),
                 "--topk", "3", "--logits", "--json"]) == 0
    import json

    from hnd.data import image_tensor

    logits = torch.tensor(json.loads(capsys.readouterr().out)["logits"])
    with torch.no_grad():
        expected = student(image_tensor(config.spec, image_file))[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_entropic_students_carry_an_entropy_model():
    plain, coded = resolve("resnet18-3ch"), resolve("resnet18-3ch-entropic")
    assert (plain.entropy, coded.entropy) == (False, True)
    assert coded.with_entropy(False) == plain and plain.with_entropy() == coded
    assert coded.as_teacher() == plain.as_teacher() and not coded.as_teacher().entropy
    assert coded.at_input_size(64).entropy and str(coded.at_input_size(64)) == str(coded)
    model = coded.build(pretrained=False)
    prior_keys = [k for k in model.state_dict() if k.startswith("head.prior.")]
    assert prior_keys and not [k for k in plain.build(pretrained=False).state_dict() if ".prior." in k]
    # The rest of the student is the plain one: same keys and shapes outside the prior.
    shapes = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("head.prior.")}
    assert shapes == {k: v.shape for k, v in plain.build(pretrained=False).state_dict().items()}
    with pytest.raises(hnd.registry.HndError, match="only students"):
        spec_from_dict({**resolve("resnet18").to_dict(), "entropy": True})
    with pytest.raises(hnd.registry.HndError, match="cannot read model name"):
        resolve("resnet18-entropic")
    with pytest.raises(hnd.registry.HndError, match="is a teacher"):
        resolve("resnet18").with_entropy()
