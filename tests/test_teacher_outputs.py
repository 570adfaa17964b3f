"""The frozen teacher's outputs computed once per (image, augmentation view) and reused, the
fixed augmentation views they rest on, the stopping rule, and runs trained elsewhere."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import hnd.evaluation
import hnd.training
from conftest import STUDENT, TEACHER, TINY, error
from hnd.registry import resolve
from hnd.config import resolve_config
from hnd.data import ImageDataset, normalize_pixels, train_transform
from hnd.evaluation import evaluate_teacher
from hnd.image_folders import check_layout
from hnd.methods import build_task
from hnd.teacher_outputs import CachedViews, compute_teacher_outputs
from hnd.teachers import build_teacher, split_teacher, teacher_spec
from hnd.training import finished_run, fit, place_task, read_metrics, train_or_resume

VIEWS = ["augment_views=2", "epochs=3"]
SPEC_64 = resolve(STUDENT).at_input_size(64)


def _config(method: str, teacher: Path, *extra: str):
    name = TEACHER if method == "ae" else STUDENT
    return resolve_config(resolve(name), method, None, [*TINY, f"teacher_checkpoint={teacher}", *VIEWS, *extra])


def test_views_repeat_every_v_epochs_and_ignore_the_seed(synth):
    samples = check_layout(synth).samples["train"][:3]
    transform = train_transform(SPEC_64)

    def item(epoch, seed, index=1):
        dataset = ImageDataset(samples, transform, augment=True, seed=seed, views=2)
        dataset.set_epoch(epoch)
        return dataset[index]

    x0, label, key0 = item(0, seed=0)
    assert key0 == 1 * 2 + 0 and item(1, 0)[2] == 1 * 2 + 1 and item(2, 0)[2] == key0
    assert torch.equal(x0, item(2, seed=0)[0]) and torch.equal(x0, item(0, seed=5)[0])
    assert not torch.equal(x0, item(1, seed=0)[0])
    plain = ImageDataset(samples, transform, augment=True, seed=0)
    assert len(plain[1]) == 2  # without views: (image, label), a new draw every epoch


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_cached_views_are_the_decoded_ones_bit_for_bit(decoder, synth):
    samples = check_layout(synth).samples["train"][:5]
    normalized = ImageDataset(samples, train_transform(SPEC_64, decoder=decoder), augment=True,
                              decoder=decoder, views=2)
    pixels = ImageDataset(samples, train_transform(SPEC_64, decoder=decoder, normalize=False),
                          augment=True, decoder=decoder, views=2)
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # a "tail" giving 3 logits
    outputs = compute_teacher_outputs(torch.nn.Identity(), pool, pixels, 2, 0, torch.device("cpu"))
    assert outputs.pixels.dtype == torch.uint8 and outputs.pixels.shape == (10, 3, 64, 64)
    cached = CachedViews(outputs, [label for _, label in samples], 2, decoder)
    for epoch in (0, 1, 2):
        normalized.set_epoch(epoch), cached.set_epoch(epoch)
        for i in range(len(samples)):
            x, label, key = normalized[i]
            y, cached_label, cached_key = cached[i]
            assert torch.equal(x, y) and (label, key) == (cached_label, cached_key)
            assert torch.equal(outputs.head[key], x.half()) and torch.allclose(outputs.logits[key], x.mean((1, 2)))
        batch = torch.stack([normalized[i][0] for i in range(len(samples))])  # [N, 3, S, S]
        keys = [index * 2 + epoch % 2 for index in range(len(samples))]
        assert torch.equal(normalize_pixels(outputs.pixels[keys], decoder), batch)  # a batch at once, the same


def test_cached_logits_are_the_whole_teachers(synth):
    """The head runs once: the logits are tail(head(x)), the whole teacher's bit for bit."""
    samples = check_layout(synth).samples["train"][:6]
    pixels = ImageDataset(samples, train_transform(SPEC_64, normalize=False), augment=True, views=2)
    torch.manual_seed(0)
    teacher = build_teacher(teacher_spec(TEACHER), pretrained=False, num_classes=4, input_size=64).eval()
    head, tail = split_teacher(teacher_spec(TEACHER), teacher)
    for channels_last in (False, True):
        outputs = compute_teacher_outputs(head, tail, pixels, 4, 0, torch.device("cpu"), channels_last=channels_last)
        whole = compute_teacher_outputs(head, tail, pixels, 4, 0, torch.device("cpu"), channels_last=channels_last,
                                        teacher=teacher)
        assert outputs.logits.shape == (12, 4) and torch.equal(outputs.logits, whole.logits)
        assert torch.equal(outputs.head, whole.head)
    cut = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    other = compute_teacher_outputs(head, tail, pixels, 4, 0, torch.device("cpu"), teacher=cut)
    assert other.logits.shape == (12, 3)  # a head that is not the teacher's start: the teacher's own logits


@pytest.mark.parametrize("method", ["naive", "hnd", "kd", "ae"])
def test_cached_run_trains_as_the_uncached_one(method, synth, teacher_ckpt, tmp_path, monkeypatch):
    calls = []
    compute = hnd.training.compute_teacher_outputs
    monkeypatch.setattr(hnd.training, "compute_teacher_outputs", lambda *a, **k: calls.append(1) or compute(*a, **k))
    plain = fit(_config(method, teacher_ckpt, "epochs=2"), synth, tmp_path / "plain", progress=False)
    cache = tmp_path / "cache"
    cached = fit(_config(method, teacher_ckpt, f"teacher_cache={cache}", "epochs=2"), synth, tmp_path / "cached",
                 progress=False)
    again = fit(_config(method, teacher_ckpt, f"teacher_cache={cache}", "seed=1", "epochs=1"), synth,
                tmp_path / "again", progress=False)
    assert calls == [1]  # the second cached run (another seed) read the file
    assert len(list(cache.glob("*.pt"))) == 1
    losses = [[m["train_loss"] for m in read_metrics(tmp_path / run)] for run in ("plain", "cached")]
    # naive reads only the pixels from the cache: the same run, epoch for epoch. The other targets
    # differ in rounding: float16 head outputs (HND, AE), teacher logits from batches of another
    # size (KD, about 1e-6). Within 0.5% after the first epoch; Adam's normalized steps amplify
    # the difference later (KD's second epoch: 1.1% on an AVX-512 machine), so the end of the
    # run is compared by its test top-1.
    if method == "naive":
        assert losses[1] == pytest.approx(losses[0], rel=1e-12)
    else:
        assert losses[1][0] == pytest.approx(losses[0][0], rel=5e-3)
    assert cached["test"]["top1"] == pytest.approx(plain["test"]["top1"], abs=100 / cached["test"]["images"] + 1e-9)
    assert again["test"]["images"] == plain["test"]["images"]


def test_a_new_teacher_or_other_views_make_a_new_cache(synth, teacher_ckpt, tmp_path):
    cache = tmp_path / "cache"
    fit(_config("hnd", teacher_ckpt, f"teacher_cache={cache}", "epochs=1"), synth, tmp_path / "a", progress=False)
    fit(_config("hnd", teacher_ckpt, f"teacher_cache={cache}", "epochs=1", "augment_views=3"), synth, tmp_path / "b",
        progress=False)
    other = tmp_path / "teacher.pt"
    shutil.copy(teacher_ckpt, other)
    fit(_config("hnd", other, f"teacher_cache={cache}", "epochs=1"), synth, tmp_path / "c", progress=False)
    assert len(list(cache.glob("*.pt"))) == 3


def test_the_teachers_test_accuracy_is_measured_once_per_cache(synth, teacher_ckpt, tmp_path, monkeypatch):
    calls = []
    measure = hnd.evaluation._teacher_accuracy
    monkeypatch.setattr(hnd.evaluation, "_teacher_accuracy", lambda *a: calls.append(1) or measure(*a))
    cache = tmp_path / "cache"
    first = evaluate_teacher(_config("hnd", teacher_ckpt, f"teacher_cache={cache}"), synth, num_workers=0)
    again = evaluate_teacher(_config("kd", teacher_ckpt, f"teacher_cache={cache}", "seed=1"), synth, num_workers=0)
    plain = evaluate_teacher(_config("hnd", teacher_ckpt), synth, num_workers=0)  # no cache: measured
    assert calls == [1, 1] and first == again == plain and 0 <= first["top1"] <= 100
    assert len(list(cache.glob("*.json"))) == 1
    other = tmp_path / "teacher.pt"
    shutil.copy(teacher_ckpt, other)  # another teacher file: measured again
    assert evaluate_teacher(_config("hnd", other, f"teacher_cache={cache}"), synth, num_workers=0) == first
    assert len(calls) == 3 and len(list(cache.glob("*.json"))) == 2


def test_patience_stops_a_run_that_no_longer_improves(synth, teacher_ckpt, tmp_path):
    # a learning rate too small to move the selection top-1 after the first epoch
    config = _config("naive", teacher_ckpt, "epochs=6", "patience=2", "lr=1e-12")
    result = train_or_resume(config, synth, tmp_path / "run", progress=False)
    lines = read_metrics(tmp_path / "run")
    assert result["epochs_run"] == len(lines) == 3 and result["best_epoch"] == 1
    assert train_or_resume(config, synth, tmp_path / "run", progress=False) == result  # finished: read back


def test_entropic_patience_counts_from_stage_two():
    config = resolve_config(resolve(STUDENT), "entropic", None, [*TINY, "epochs=10", "stage1_epochs=4", "patience=2"])
    spent = [hnd.training.patience_spent(config, epoch, best_epoch=1) for epoch in range(10)]
    assert spent == [False] * 6 + [True] * 4  # stage 2 starts at epoch index 4; 6 - 4 >= 2


@pytest.mark.parametrize("extra, message", [
    (["teacher_cache=/tmp/c", "augment_views=0"], "teacher_cache needs augment_views > 0 (a fixed set of views "
                                                  "whose teacher outputs can be kept); e.g. augment_views=8"),
    (["patience=-1"], "patience must be 0 (off) or a positive number of epochs, got -1"),
    (["augment_views=-2"], "augment_views must be 0 (off) or a positive number of views per image, got -2"),
])
def test_config_mistakes_are_one_line(extra, message):
    assert error(resolve_config, resolve(STUDENT), "hnd", None, [*TINY, *extra]) == message


def test_a_run_trained_elsewhere_is_tested_again_and_checked(synth, tmp_path):
    config = resolve_config(resolve(TEACHER), "teacher", None, [*TINY, "pretrained=false", "epochs=1"])
    fit(config, synth, tmp_path / "trained", progress=False)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "result.json", "best.pt"):
        shutil.copy(tmp_path / "trained" / name, shipped / name)
    result = finished_run(config, shipped, synth)
    assert result["test"] == result["trained_test"]  # the same weights on the same images
    assert result["checkpoint"] == str(shipped / "best.pt")
    other = resolve_config(resolve(TEACHER), "teacher", None, [*TINY, "pretrained=false", "epochs=1", "lr=0.5"])
    assert error(finished_run, other, shipped, synth) == \
        f"the run in {shipped} was trained with other settings (lr) than asked"
    (shipped / "best.pt").unlink()
    assert error(finished_run, config, shipped, synth) == f"{shipped} holds no finished run (result.json and best.pt)"


@pytest.mark.parametrize("method", ["naive", "entropic"])
def test_the_teacher_that_fills_the_cache_is_placed_like_the_student(method, teacher_ckpt, tmp_path):
    # naive keeps a pristine copy of the teacher and entropic trains a copy of its tail: the
    # teacher itself, which fills the cache, must still go to the device and memory format
    config = _config(method, teacher_ckpt, f"teacher_cache={tmp_path}", "channels_last=true", "stage1_epochs=1")
    task = build_task(config, num_classes=4)
    place_task(task, config, torch.device("cpu"))
    kernels = [m.weight for m in task.teacher.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert kernels and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                           for w in kernels)


def test_inception_logits_keep_the_input_transform_its_student_head_drops(synth, tmp_path):
    """An official Inception-v3 student's head starts without the input transform (the
    original never applied it) while its KD teacher was asked for one: the cached logits are
    the whole teacher's, transform included, and the cached head outputs the head's without it."""
    name = "inception_v3_head_mimic-ver1b-3ch"
    config = resolve_config(resolve(name), "kd", None, ["pretrained=false", "inception_transform_input=true",
                                                        "augment_views=1", "eval_batch_size=2", "num_workers=0",
                                                        f"teacher_cache={tmp_path / 'cache'}"])
    torch.manual_seed(0)
    task = build_task(config, 4)
    assert task.teacher.transform_input and config.spec.head_transform_input is False
    samples = check_layout(synth).samples["train"][:2]
    train_set = ImageDataset(samples, train_transform(config.spec), augment=True, views=1)
    cached = hnd.training._teacher_cache(config, task, train_set, 0, torch.device("cpu"))
    head, tail = split_teacher(config.spec.teacher, task.teacher, config.spec.split_point, transform_input=False)
    x = torch.stack([train_set[i][0] for i in range(2)])  # [2, 3, 299, 299], the views the cache holds
    with torch.no_grad():
        whole, cut = task.teacher(x), head(x)
        assert torch.allclose(cached.logits, whole, atol=1e-4)
        assert not torch.allclose(cached.logits, tail(cut), atol=1e-2)  # what the teacher gives without it
        assert torch.allclose(cached.head.float(), cut.half().float())
