"""Checkpoints: the three original formats and ours, loaded safely; clear failures."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import torch.serialization as ser

from hnd.checkpoints import FORMAT_VERSION, atomic_save, load_model, read_checkpoint, save_checkpoint
from hnd.errors import HndError
from hnd.models import create_student
from hnd.registry import resolve

from conftest import PAPER_TEACHERS, randomize
from hnd.teachers import on_meta
from original_layout import (hnd_checkpoint, kd_checkpoint, naive_checkpoint, original_head_state,
                             original_model_state)

STUDENT = {t: f"{t}_head_mimic-ver{'1b' if t == 'inception_v3' else '2b'}-3ch" for t in PAPER_TEACHERS}
# Whole-model key counts of the original code's checkpoints (tests/reference/original-checkpoint-keys/).
ORIGINAL_KEYS = {"densenet169": 823, "densenet201": 1015, "resnet152": 752, "inception_v3": 566}


@pytest.fixture(scope="module")
def students():
    """One randomized student per paper teacher (built once)."""
    made = {}
    for i, (teacher, name) in enumerate(STUDENT.items()):
        s = create_student(name, pretrained=False)
        randomize(s, seed=i)
        made[teacher] = s
    return made


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("teacher", PAPER_TEACHERS)
@pytest.mark.parametrize("fmt, maker", [("original-naive", naive_checkpoint), ("original-kd", kd_checkpoint)])
def test_original_whole_model_formats(teacher, fmt, maker, students, tmp_path):
    student = students[teacher]
    ckpt = maker(student)
    assert len(ckpt["model"]) == ORIGINAL_KEYS[teacher]
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    assert read_checkpoint(path).format == fmt
    loaded = load_model(resolve(STUDENT[teacher]), path)
    assert_same_weights(loaded, student)
    x = torch.randn(1, 3, 299 if teacher == "inception_v3" else 224, 299 if teacher == "inception_v3" else 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), student.eval()(x))


@pytest.mark.parametrize("teacher", PAPER_TEACHERS)
def test_original_hnd_head_takes_pretrained_tail(teacher, students, pretrained, tmp_path):
    pretrained(teacher)
    student = students[teacher]
    path = tmp_path / "head.pt"
    torch.save(hnd_checkpoint(student), path)
    loaded = load_model(resolve(STUDENT[teacher]), path)
    assert read_checkpoint(path).format == "original-hnd"
    assert_same_weights(loaded.head, student.head)
    reference = create_student(STUDENT[teacher])  # pretrained tail
    assert_same_weights(loaded.tail, reference.tail)


def test_legacy_serialization_and_gpu_saved_tensors(students, tmp_path):
    """Files written by torch 1.4 (legacy format) from CUDA tensors load on a CPU machine."""
    student = students["densenet169"]
    tagger = lambda storage: "cuda:0" if storage.device.type == "cpu" else None  # noqa: E731
    ser.register_package(1, tagger, lambda obj, location: None)
    try:
        for legacy in (True, False):
            torch.save(naive_checkpoint(student), tmp_path / f"gpu{legacy}.pt",
                       _use_new_zipfile_serialization=not legacy)
    finally:
        ser._package_registry[:] = [e for e in ser._package_registry if e[1] is not tagger]
    for legacy in (True, False):
        path = tmp_path / f"gpu{legacy}.pt"
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # proves the file really names a CUDA device
        assert_same_weights(load_model(resolve(STUDENT["densenet169"]), path), student)


def test_own_format_round_trip_student_and_head(students, pretrained, tmp_path):
    pretrained("resnet152")
    student = students["resnet152"]
    save_checkpoint(tmp_path / "s.pt", resolve(STUDENT["resnet152"]), student, epoch=3)
    ckpt = read_checkpoint(tmp_path / "s.pt")
    assert (ckpt.format, ckpt.part, ckpt.model, ckpt.meta["epoch"]) == ("hnd", "student", STUDENT["resnet152"], 3)
    assert_same_weights(load_model(resolve(STUDENT["resnet152"]), tmp_path / "s.pt"), student)
    save_checkpoint(tmp_path / "h.pt", resolve(STUDENT["resnet152"]), student, part="head")
    loaded = load_model(resolve(STUDENT["resnet152"]), tmp_path / "h.pt")
    assert_same_weights(loaded.head, student.head)
    assert not torch.equal(loaded.tail.fc.weight, student.tail.fc.weight)  # tail: pretrained teacher


def test_own_format_rebuilds_from_the_file_alone(students, tmp_path):
    """Our checkpoints record the model's spec: ``load_model(None, path)`` rebuilds it, and a
    :class:`Checkpoint` already read loads the same (no second read)."""
    student = students["inception_v3"]
    name = STUDENT["inception_v3"]
    save_checkpoint(tmp_path / "s.pt", resolve(name), student, epoch=1)
    ckpt = read_checkpoint(tmp_path / "s.pt")
    assert ckpt.meta["spec"]["name"] == name and ckpt.meta["spec"]["design"] == "ver1b"
    for loaded in (load_model(None, tmp_path / "s.pt"), load_model(None, ckpt), load_model(resolve(name), ckpt)):
        assert loaded.spec == resolve(name)
        assert_same_weights(loaded, student)
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        assert torch.equal(load_model(None, ckpt)(x), student.eval()(x))


def test_own_format_before_specs_still_loads(students, tmp_path):
    """hnd checkpoints written before specs were recorded (name only) load by name, or with
    ``model=None`` from the recorded name."""
    student = students["densenet169"]
    name = STUDENT["densenet169"]
    torch.save({"format": "hnd", "version": FORMAT_VERSION, "model": name, "part": "student",
                "state_dict": student.state_dict(), "epoch": 4}, tmp_path / "old.pt")
    for model in (resolve(name), None):
        loaded = load_model(model, tmp_path / "old.pt")
        assert str(loaded.spec) == name
        assert_same_weights(loaded, student)


def test_recorded_input_size_is_kept(tmp_path):
    """A student trained at another input size rebuilds at that size (its generic head is
    sized for it)."""
    spec = resolve("resnet18-3ch").at_input_size(64)
    student = spec.build(pretrained=False)
    randomize(student, 7)
    save_checkpoint(tmp_path / "small.pt", spec, student)
    for model in (None, resolve("resnet18@layer2-3ch")):
        loaded = load_model(model, tmp_path / "small.pt")
        assert loaded.spec == spec and loaded.spec.input_size == 64 and spec.head_output_shape == (128, 8, 8)
        assert_same_weights(loaded, student)


def test_teacher_checkpoint_plain_or_wrapped(tmp_path):
    from hnd.teachers import build_teacher

    teacher = build_teacher("resnet50", pretrained=False)
    randomize(teacher, 5)
    torch.save(teacher.state_dict(), tmp_path / "raw.pt")
    torch.save({"type": "resnet50", "model": teacher.state_dict(), "acc": 76.0, "epoch": 1}, tmp_path / "org.pt")
    for f in ("raw.pt", "org.pt"):
        assert_same_weights(load_model(resolve("resnet50"), tmp_path / f), teacher)
    with pytest.raises(HndError, match="looks like resnet50"):
        load_model(resolve("resnet101"), tmp_path / "raw.pt")


def test_other_model_is_named_with_first_mismatching_keys(students, tmp_path):
    torch.save(naive_checkpoint(students["densenet201"]), tmp_path / "d201.pt")
    with pytest.raises(HndError) as err:
        load_model(resolve("densenet169_head_mimic-ver2b-3ch"), tmp_path / "d201.pt")
    message = str(err.value)
    assert "looks like densenet201_head_mimic-ver2b-3ch" in message
    assert "tail.transition3.norm.weight [1792] vs model [1280]" in message
    assert "\n" not in message

    big = create_student("densenet169_head_mimic-ver2b-12ch", pretrained=False)
    torch.save(naive_checkpoint(big), tmp_path / "d169_12.pt")
    with pytest.raises(HndError, match=r"looks like densenet169_head_mimic-ver2b-12ch.*head.encoder.6.weight \[12, 64, 2, 2\] vs model \[3, 64, 2, 2\]"):
        load_model(resolve("densenet169_head_mimic-ver2b-3ch"), tmp_path / "d169_12.pt")

    torch.save(hnd_checkpoint(students["inception_v3"]), tmp_path / "inc_head.pt")
    with pytest.raises(HndError, match="looks like inception_v3_head_mimic-ver1b-3ch"):
        load_model(resolve("resnet152_head_mimic-ver2b-3ch"), tmp_path / "inc_head.pt")

    save_checkpoint(tmp_path / "own.pt", resolve(STUDENT["resnet152"]), students["resnet152"])
    with pytest.raises(HndError, match="does not fit densenet169"):
        load_model(resolve("densenet169_head_mimic-ver2b-3ch"), tmp_path / "own.pt")


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"w": torch.ones(1)}, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(HndError, match=r"refused .*evil.pt: loading it would run code.*\(\w+\.system\)"):
        read_checkpoint(tmp_path / "evil.pt")
    torch.save({"extra": Payload()}, tmp_path / "evil4.pt", pickle_protocol=4)  # STACK_GLOBAL form
    with pytest.raises(HndError, match="cannot read"):
        read_checkpoint(tmp_path / "evil4.pt")
    assert not marker.exists()


class Harmless:
    """A class of no danger that torch's weights-only list still does not know."""


def test_kd_namespace_is_the_only_extra_class_allowed(tmp_path):
    import argparse

    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(a=1)}, tmp_path / "ok.pt")
    assert read_checkpoint(tmp_path / "ok.pt").meta["args"].a == 1
    torch.save({"model": {"w": torch.ones(1)}, "x": Harmless()}, tmp_path / "no.pt")
    with pytest.raises(HndError, match="would run code or build objects.*Harmless"):
        read_checkpoint(tmp_path / "no.pt")


@pytest.mark.parametrize("legacy", [True, False])
def test_truncated_and_foreign_files(students, tmp_path, legacy):
    path = tmp_path / "full.pt"
    torch.save(hnd_checkpoint(students["resnet152"]), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(HndError, match="truncated, or not a weights-only PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(HndError, match="cannot read"):
        read_checkpoint(tmp_path / "text.pt")
    with pytest.raises(HndError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": {"student_model.weird": torch.ones(1)}}, tmp_path / "odd.pt")
    with pytest.raises(HndError, match="keys do not follow the original layout"):
        read_checkpoint(tmp_path / "odd.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(HndError, match="not a checkpoint hnd understands"):
        read_checkpoint(tmp_path / "list.pt")


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_save({"v": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"v": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_original_head_keys_convert_one_to_one(students):
    from hnd.checkpoints import convert_original_head, convert_original_model

    student = students["densenet169"]
    assert convert_original_head(original_head_state(student)).keys() == student.head.state_dict().keys()
    assert convert_original_model(original_model_state(student)).keys() == student.state_dict().keys()


REFERENCE_KEYS = Path(__file__).parent / "reference" / "original-checkpoint-keys"
MAKERS = {"naive": naive_checkpoint, "kd": kd_checkpoint, "hnd": hnd_checkpoint}


def _reference(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """(top-level keys, {weight key: shape}) of one file the original code's checkpoint was listed in."""
    first, *lines = path.read_text().splitlines()
    top = ast.literal_eval(first.removeprefix("# top-level keys: "))
    keys = {}
    for line in lines:
        key, shape = line.split("\t")
        keys[key] = tuple(ast.literal_eval(shape))
    return top, keys


@pytest.mark.parametrize("path", sorted(REFERENCE_KEYS.glob("*.txt")), ids=lambda p: p.stem)
def test_original_layout_has_the_keys_and_shapes_the_original_code_writes(path):
    """The checkpoints these tests load as "original" match, key for key and shape for shape,
    what the original code itself wrote for the same student and format."""
    name, fmt = path.stem.split("__")
    top, keys = _reference(path)
    student = on_meta(lambda: create_student(name, pretrained=False))
    made = MAKERS[fmt](student)
    assert list(made) == top
    assert {k: tuple(v.shape) for k, v in made["model"].items()} == keys
    if fmt != "hnd":
        assert len(keys) == ORIGINAL_KEYS[student.spec.teacher.name]
