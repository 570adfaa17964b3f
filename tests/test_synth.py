"""The generated dataset: layout, determinism, argument checks, safety, and learnability."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.datasets import ImageFolder

from hnd.errors import HndError
from hnd.synth import SYNTH_CLASSES, ensure_synthetic_dataset, write_synthetic_dataset

SMALL = {"classes": 3, "train_per_class": 4, "val_per_class": 2, "image_size": 40}


def hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every image under ``root``, keyed by its relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.JPEG"))}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "small"
    return out, write_synthetic_dataset(out, **SMALL)


def test_class_names_pair_every_shape_with_every_texture():
    assert len(SYNTH_CLASSES) == 10
    assert list(SYNTH_CLASSES) == sorted(set(SYNTH_CLASSES))
    shapes, textures = zip(*(name.split("-") for name in SYNTH_CLASSES))
    assert len(set(shapes)) == 5 and set(textures) == {"spots", "stripes"}
    assert sorted(SYNTH_CLASSES) == sorted(f"{s}-{t}" for s in set(shapes) for t in set(textures))


def test_colour_alone_does_not_tell_the_classes(tmp_path):
    """Every image draws its colours at random: nearest mean colour is near chance (10%)."""
    write_synthetic_dataset(tmp_path / "d", classes=10, train_per_class=30, val_per_class=10, image_size=40)
    def colours(split):
        dataset = ImageFolder(str(tmp_path / "d" / split))
        return (torch.tensor(np.array([np.asarray(dataset[i][0], dtype=np.float32).mean((0, 1))
                                       for i in range(len(dataset))])), torch.tensor(dataset.targets))
    (x, y), (xv, yv) = colours("train"), colours("val")
    centres = torch.stack([x[y == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(xv, centres).argmin(1) == yv).float().mean().item()
    assert accuracy < 0.3, f"nearest mean colour classifies {accuracy:.0%}; chance is 10%"


def test_layout_counts_and_summary(small):
    out, summary = small
    names = list(SYNTH_CLASSES[:3])
    assert summary == {"root": str(out), "classes": names, "counts": {"train": 12, "val": 6},
                       "image_size": 40, "seed": 0}
    assert sorted(p.name for p in out.iterdir()) == ["synth.json", "train", "val"]
    assert json.loads((out / "synth.json").read_text()) == {k: v for k, v in summary.items() if k != "root"}
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == names
        for name in names:
            files = sorted(p.name for p in (out / split / name).iterdir())
            assert files == [f"{name}_{i:05d}.JPEG" for i in range(n)]
    assert siblings(out) == ["small"]  # the temporary folder is gone


def test_images_are_rgb_with_sizes_in_range(small):
    out, _ = small
    sizes = set()
    for path in out.rglob("*.JPEG"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert all(40 <= side <= 52 for side in image.size), (path, image.size)
            sizes.add(image.size)
    assert len(sizes) > 1  # sizes vary, so resize and crop have work to do


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_same_arguments_give_identical_bytes_on_any_number_of_processes(small, tmp_path, processes):
    out, _ = small
    write_synthetic_dataset(tmp_path / "again", **SMALL, processes=processes)
    assert hashes(tmp_path / "again") == hashes(out) and len(hashes(out)) == 18


def test_an_image_depends_on_seed_split_class_and_index_only(small, tmp_path):
    out, _ = small
    write_synthetic_dataset(tmp_path / "two", **{**SMALL, "classes": 2})
    two = hashes(tmp_path / "two")
    assert two and all(hashes(out)[path] == digest for path, digest in two.items())


def test_another_seed_gives_other_images(small, tmp_path):
    out, _ = small
    write_synthetic_dataset(tmp_path / "seed1", **SMALL, seed=1)
    first, other = hashes(out), hashes(tmp_path / "seed1")
    assert first.keys() == other.keys()
    assert not set(first.values()) & set(other.values())


def test_train_and_val_images_differ(small):
    out, _ = small
    train = set(hashes(out / "train").values())
    val = set(hashes(out / "val").values())
    assert len(train) == 12 and len(val) == 6 and not train & val


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": 1}, "classes must be an integer from 2 to 10, got 1"),
    ({"classes": 11}, "classes must be an integer from 2 to 10, got 11"),
    ({"classes": 2.0}, "classes must be an integer from 2 to 10, got 2.0"),
    ({"classes": True}, "classes must be an integer from 2 to 10, got True"),
    ({"train_per_class": 0}, "train_per_class must be an integer >= 1, got 0"),
    ({"val_per_class": -3}, "val_per_class must be an integer >= 1, got -3"),
    ({"image_size": 31}, "image_size must be an integer >= 32, got 31"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    with pytest.raises(HndError, match=message):
        write_synthetic_dataset(tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_existing_data_is_never_overwritten(tmp_path):
    out = tmp_path / "data"
    (out / "train").mkdir(parents=True)
    (out / "train" / "keep.txt").write_text("precious")
    (tmp_path / "file").write_text("also precious")
    for target in (out, tmp_path / "file"):
        with pytest.raises(HndError, match="already exists; choose another --out or delete it"):
            write_synthetic_dataset(target, **SMALL)
    assert [p.relative_to(out).as_posix() for p in sorted(out.rglob("*"))] == ["train", "train/keep.txt"]
    assert (out / "train" / "keep.txt").read_text() == "precious"
    assert (tmp_path / "file").read_text() == "also precious"
    assert siblings(out) == ["data", "file"]


def test_an_empty_folder_and_missing_parents_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    write_synthetic_dataset(tmp_path / "empty", **SMALL)
    write_synthetic_dataset(tmp_path / "a" / "b", **SMALL)
    assert hashes(tmp_path / "empty") == hashes(tmp_path / "a" / "b")
    assert len(hashes(tmp_path / "empty")) == 18


@pytest.mark.parametrize("processes", [1, 2])
def test_progress_and_cleanup_after_a_failure(tmp_path, processes):
    calls = []
    write_synthetic_dataset(tmp_path / "ok", **SMALL, progress=lambda *args: calls.append(args), processes=processes)
    assert calls == [(n, 18) for n in (4, 8, 12, 14, 16, 18)]  # after each class folder: train, then val

    def interrupt(done, total):
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(tmp_path / "stopped", **SMALL, progress=interrupt, processes=processes)
    assert siblings(tmp_path / "ok") == ["ok"]  # neither ``stopped`` nor its temporary folder


def test_imagefolder_loads_it(small):
    out, _ = small
    for split, n in (("train", 12), ("val", 6)):
        dataset = ImageFolder(str(out / split))
        assert dataset.classes == list(SYNTH_CLASSES[:3])
        assert len(dataset) == n
        assert sorted(dataset.targets) == [label for label in range(3) for _ in range(n // 3)]
        image, _ = dataset[0]
        assert image.mode == "RGB"


def _tensors(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    to_tensor = transforms.Compose([transforms.Resize((48, 48)), transforms.ToTensor()])
    dataset = ImageFolder(str(folder), to_tensor)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images) - 0.5, torch.tensor(labels)


def _train_and_validate(x_train, y_train, x_val, y_val) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(30):
        for batch in torch.randperm(len(y_train), generator=order).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(x_val).argmax(1) == y_val).float().mean().item()


def test_a_tiny_cnn_learns_it(tmp_path):
    """Four classes (two shapes, each with both textures) at 48 px: a three-layer CNN trained
    briefly beats chance (25%) by far. It tells the shapes apart; the textures take a real
    network and more images (the book's teacher reaches over 80% on all ten classes)."""
    write_synthetic_dataset(tmp_path / "d", classes=4, train_per_class=80, val_per_class=25, image_size=48)
    x_train, y_train = _tensors(tmp_path / "d" / "train")
    x_val, y_val = _tensors(tmp_path / "d" / "val")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and immune to a busy machine
    try:
        accuracy = _train_and_validate(x_train, y_train, x_val, y_val)
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.4, f"validation accuracy {accuracy:.2f}, chance is 0.25"


def test_ensure_reuses_the_same_dataset_and_refuses_others(tmp_path):
    out = tmp_path / "data"
    first = ensure_synthetic_dataset(out, **SMALL)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.JPEG")}
    assert ensure_synthetic_dataset(out, **SMALL) == first  # reused, not rewritten
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.JPEG")} == stamp
    with pytest.raises(HndError, match=r"other settings \(image_size: 40 there, 48 wanted\); delete it"):
        ensure_synthetic_dataset(out, **{**SMALL, "image_size": 48})
    (tmp_path / "mine" / "train").mkdir(parents=True)
    with pytest.raises(HndError, match="is not a generated dataset"):
        ensure_synthetic_dataset(tmp_path / "mine", **SMALL)
