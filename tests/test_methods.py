"""Losses and training methods (tests/reference/original-hnd-facts.md §3): what each method trains, what stays frozen."""

from __future__ import annotations

import copy
import hashlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hnd.autoencoder import MiddleAutoencoder, build_ae_model
from hnd.config import AE_CHANNELS, TrainConfig
from hnd.errors import HndError
from hnd.losses import head_mse_loss, kd_loss
import hnd.methods
from hnd.methods import build_reference_teacher, build_task, check_input_size, make_optimizer
from hnd.registry import resolve
from hnd.teachers import build_teacher

from conftest import PAPER_TEACHERS

STUDENT = {t: f"{t}_head_mimic-ver{'1b' if t == 'inception_v3' else '2b'}-3ch" for t in PAPER_TEACHERS}
METHODS = ["naive", "kd", "hnd", "ae", "head_kd"]
# Small inputs the models take comfortably; a DenseNet's 4x4 head output is too small for the AE.
SMALL = {"densenet169": 64, "densenet201": 64, "resnet152": 64, "inception_v3": 75}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches through deep nets: one thread is as fast, and immune to busy neighbours
    (two OpenMP threads on a shared 2-core machine ran these tests ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_input(teacher: str, method: str) -> int:
    return 96 if method == "ae" and teacher.startswith("densenet") else SMALL[teacher]


def model_for(teacher: str, method: str) -> str:
    return teacher if method in ("ae", "teacher") else STUDENT[teacher]


# ---------------------------------------------------------------- losses

def test_kd_loss_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.tensor([0, 3, 6, 2, 2])
    for temperature, alpha in [(1.0, 0.5), (4.0, 0.3), (2.0, 0.0)]:
        p_t = torch.softmax(t / temperature, dim=1)
        log_p_s = torch.log_softmax(s / temperature, dim=1)
        kl = (p_t * (p_t.log() - log_p_s)).sum() / 5  # batchmean
        ce = -torch.log_softmax(s, dim=1)[torch.arange(5), y].mean()
        expected = alpha * ce + (1 - alpha) * temperature ** 2 * kl
        got = kd_loss(s, t, y, temperature=temperature, alpha=alpha)
        torch.testing.assert_close(got, expected)
    assert kd_loss(s, t, y).item() == pytest.approx(kd_loss(s, t, y, temperature=1.0, alpha=0.5).item())


def test_kd_loss_alpha_one_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    y = torch.tensor([1, 9, 0, 4])
    torch.testing.assert_close(kd_loss(s, t, y, temperature=3.0, alpha=1.0), F.cross_entropy(s, y))


def test_kd_loss_is_zero_kl_for_equal_logits():
    s = torch.randn(3, 5)
    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(kd_loss(s, s.clone(), y, alpha=0.0), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_head_mse_loss_is_a_sum():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    torch.testing.assert_close(head_mse_loss(a, b), ((a - b) ** 2).sum())
    assert head_mse_loss(a, b).item() == pytest.approx(2 * 3 * 4 * 4 * F.mse_loss(a, b).item(), rel=1e-5)


# ---------------------------------------------------------------- one training step per method

def tensors(module: nn.Module):
    return itertools.chain(module.named_parameters(), module.named_buffers())


def digest(t: torch.Tensor) -> bytes:
    """A hash of the tensor's bytes: any changed bit changes it (cheaper than keeping a clone)."""
    return hashlib.blake2b(t.detach().contiguous().numpy()).digest()


def snapshot(module: nn.Module, skip: set[int] = frozenset()) -> dict[str, bytes]:
    """Digests of every parameter and buffer of ``module`` but those (by identity) in ``skip``."""
    return {name: digest(t) for name, t in tensors(module) if id(t) not in skip}


def changed(before: dict[str, bytes], module: nn.Module) -> set[str]:
    now = dict(tensors(module))
    return {name for name, d in before.items() if digest(now[name]) != d}


@pytest.fixture(scope="module")
def teachers():
    """``build_task`` gets copies of teachers built once per module (building is the slow part)."""
    built: dict[tuple, nn.Module] = {}

    def cached(name, **kwargs):
        key = (name, *sorted(kwargs.items()))
        if key not in built:
            built[key] = build_teacher(name, **kwargs)
        return copy.deepcopy(built[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hnd.methods, "build_teacher", cached)
        yield built


def expected_loss(task, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """The HND/AE loss written out by hand from the task's modules (tests/reference/original-hnd-facts.md §3);
    None for naive/KD/head_kd, whose expected loss needs the logits of the same forward."""
    with torch.no_grad():
        if task.method in ("naive", "kd", "head_kd"):
            return None
        if task.method == "hnd":
            return ((task.trained(x) - task.reference(x)) ** 2).sum()
        target = task.model.head(x)
        return ((task.model.ae(target) - target) ** 2).sum()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("teacher", PAPER_TEACHERS)
def test_one_training_step(teacher, method, pretrained, teachers):
    """One optimizer step changes exactly the trained part; the frozen parts stay bit-identical,
    BatchNorm statistics included."""
    pretrained(teacher)
    size = small_input(teacher, method)
    config = TrainConfig(model=model_for(teacher, method), method=method, input_size=size)
    torch.manual_seed(0)
    task = build_task(config, num_classes=1000)
    assert task.summed_loss == (method in ("hnd", "ae"))
    assert task.part == ("ae" if method == "ae" else "student")
    assert task.trained is {"naive": task.model, "kd": task.model, "hnd": task.model.head,
                            "ae": getattr(task.model, "ae", None), "head_kd": task.model.head}[method]
    assert (task.reference is None) == (method == "naive")
    if method == "ae":
        assert task.reference is task.model.head
    if method == "kd":  # the student's tail is its own copy of the teacher's
        teacher_ptrs = {t.data_ptr() for t in task.reference.state_dict().values()}
        assert not teacher_ptrs & {t.data_ptr() for t in task.model.tail.state_dict().values()}
    reference = task.reference or nn.Identity().eval()  # naive: nothing frozen

    trained_ids = {id(t) for _, t in tensors(task.trained)}
    frozen = {"model": snapshot(task.model, trained_ids), "reference": snapshot(reference, trained_ids)}
    trained = snapshot(task.trained)
    assert all(p.requires_grad for p in task.trained.parameters())
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(not p.requires_grad for p in task.model.parameters() if id(p) not in trained_ids)

    task.train_mode()
    assert all(m.training for m in task.trained.modules())
    trained_modules = {id(m) for m in task.trained.modules()}
    others = [m for m in itertools.chain(task.model.modules(), reference.modules())
              if id(m) not in trained_modules]
    assert not any(m.training for m in others)  # frozen heads/tails/teachers stay in eval mode

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, size, size, generator=g), torch.tensor([3, 997])
    expected = expected_loss(task, x, y)
    optimizer = make_optimizer(config, task.trained)[0]
    optimizer.zero_grad()
    loss, logits = task.loss(task.trained, x, y)
    assert torch.isfinite(loss)
    assert (logits is None) == (method in ("hnd", "ae"))
    if logits is not None:
        assert logits.shape == (2, 1000)
    if method == "naive":
        expected = F.cross_entropy(logits.detach(), y)
    if method in ("kd", "head_kd"):  # head_kd: the logits of the head through the teacher's frozen tail
        with torch.no_grad():
            teacher_logits = task.reference(x)
            if method == "head_kd":
                torch.testing.assert_close(logits, task.model.tail(task.model.head(x)))
        expected = kd_loss(logits.detach(), teacher_logits, y, temperature=1.0, alpha=0.5)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    loss.backward()
    optimizer.step()

    assert not changed(frozen["model"], task.model)
    assert not changed(frozen["reference"], reference)
    assert not any(m.training for m in others)
    moved = changed(trained, task.trained)
    params = [n for n, _ in task.trained.named_parameters()]
    assert len(moved & set(params)) >= 0.9 * len(params)
    assert any(n.endswith("running_mean") for n in moved)  # the trained part's BN statistics do move
    if method in ("naive", "kd"):
        assert any(n.startswith("head.") for n in moved) and any(n.startswith("tail.") for n in moved)


@pytest.mark.parametrize("optimizer, stage", [("adam", 1), ("sgd", 1), ("adam", 2)])
def test_optimizers_take_one_fused_step_with_the_same_result(optimizer, stage):
    """On the CPU each optimizer steps fused (one kernel over all tensors), as the unfused step
    would; parameters on another device (meta here) get the unfused one."""
    config = TrainConfig(model="resnet18-3ch", method="entropic" if stage == 2 else "hnd", optimizer=optimizer,
                         lr=0.01, weight_decay=1e-4, stage2_lr=0.01)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    twin = copy.deepcopy(module)
    fused, _ = make_optimizer(config, module, stage)
    plain = type(fused)(twin.parameters(), **{**fused.defaults, "fused": False})
    assert type(fused).__name__ == ("Adam" if optimizer == "adam" and stage == 1 else "SGD")
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for m, opt in ((module, fused), (twin, plain)):
            opt.zero_grad()
            m(torch.arange(8.0).view(2, 4)).square().sum().backward()
            opt.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(module.parameters(), twin.parameters()))
    assert not make_optimizer(config, nn.Linear(4, 3, device="meta"), stage)[0].defaults["fused"]


# ---------------------------------------------------------------- input sizes and the AE bottleneck

def test_too_small_input_for_the_autoencoder():
    config = TrainConfig(model="resnet50", method="ae", pretrained=False, input_size=32)
    message = str(pytest.raises(HndError, build_task, config, num_classes=1000).value)
    assert "5x5" in message and "512x4x4" in message and "\n" not in message  # layer2 is 4x4 at 32 px
    config = TrainConfig(model="resnet50", method="ae", pretrained=False, input_size=64)
    check_input_size(build_task(config, num_classes=1000), 64)  # 8x8 head output: the AE trims it to 4x4


@pytest.mark.parametrize("teacher, size, side", [("densenet169", 224, 10), ("densenet201", 224, 10),
                                                 ("resnet152", 224, 24), ("inception_v3", 299, 31)])
def test_autoencoder_bottleneck_at_official_sizes(teacher, size, side):
    """bc x 10 x 10 (DenseNets), 24 x 24 (ResNet-152), 31 x 31 (Inception-v3), §3.5; shapes only."""
    with torch.device("meta"):
        model = build_ae_model(resolve(teacher), build_teacher(teacher, pretrained=False), 3)
        x = torch.empty(2, 3, size, size)
        assert model.encode(x).shape == (2, 3, side, side)
        h = model.head(x)
        for bc in AE_CHANNELS:
            ae = MiddleAutoencoder(h.shape[1], bc)
            assert ae.encoder(h).shape == (2, bc, side, side)
            assert ae(h).shape == h.shape
        assert model.decode(model.encode(x)).shape == (2, 1000)


def test_autoencoder_rejects_no_channels():
    with pytest.raises(HndError):
        MiddleAutoencoder(256, 0)


# ---------------------------------------------------------------- the reference teacher for other datasets

@pytest.mark.parametrize("teacher, attr", [("densenet169", "classifier"), ("resnet152", "fc"),
                                           ("inception_v3", "fc")])
def test_naive_replaces_the_classifier(teacher, attr, pretrained):
    state = pretrained(teacher)
    model = build_reference_teacher(TrainConfig(model=STUDENT[teacher], method="naive"), num_classes=10)
    assert getattr(model, attr).out_features == 10 and not model.training
    first = next(k for k in model.state_dict() if k.endswith("weight"))
    assert torch.equal(model.state_dict()[first], state[first])  # the rest is pretrained


@pytest.mark.parametrize("method", ["hnd", "kd", "ae"])
def test_distillation_needs_a_teacher_for_the_classes(method, pretrained):
    pretrained("resnet152")
    config = TrainConfig(model=model_for("resnet152", method), method=method)
    with pytest.raises(HndError) as info:
        build_reference_teacher(config, num_classes=10)
    message = str(info.value)
    assert "--method teacher" in message and "teacher_checkpoint=" in message and "10" in message
    assert "\n" not in message


def test_random_teacher_for_other_classes(pretrained):
    state = pretrained("resnet152")
    config = TrainConfig(model="resnet152", method="teacher", pretrained=False)
    model = build_reference_teacher(config, num_classes=10)
    assert model.fc.out_features == 10 and not model.training
    assert not torch.equal(model.conv1.weight, state["conv1.weight"])
    task = build_task(config, num_classes=10)
    assert task.trained is task.model and task.reference is None and task.part == "teacher"
    assert task.model.fc.out_features == 10


def test_pretrained_teacher_fine_tuned_on_other_classes(pretrained):
    state = pretrained("resnet152")
    model = build_reference_teacher(TrainConfig(model="resnet152", method="teacher"), num_classes=10)
    assert model.fc.out_features == 10
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_hnd_input_size_where_head_shapes_differ_is_a_clear_error():
    """At 66 px a ResNet student head outputs 512x8x8 but the teacher's layer2 512x9x9: caught
    before training, with a one-line message."""
    config = TrainConfig(model="resnet50_head_mimic-ver2b-3ch", method="hnd", pretrained=False, input_size=66)
    task = build_task(config, num_classes=1000)
    message = str(pytest.raises(HndError, check_input_size, task, 66).value)
    assert "student head outputs" in message and "\n" not in message
    check_input_size(task, 64)  # 8x8 on both sides
