"""Data: folder layout checks, the held-out split, seeded augmentation, transforms, sharding."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hnd.data import ImageDataset, ShardSampler, collate, holdout_split, prepare_imagenet, read_image, train_transform
from hnd.image_folders import check_layout
from hnd.preprocessing import Preprocessing
from hnd.book.photographs import reference_photographs
from hnd.registry import resolve
from hnd.synth import write_synthetic_dataset

from conftest import PAPER_TEACHERS, error


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A tiny JPEG of random pixels (structure, so that every crop and flip differs)."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def make_folder(root: Path, classes: dict[str, tuple[int, int]]) -> Path:
    """``root/{train,val}/<class>/*.JPEG`` with (train, val) image counts per class."""
    seed = 0
    for name, counts in classes.items():
        for split, count in zip(("train", "val"), counts):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                write_image(root / split / name / f"img{i:02d}.JPEG", seed)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes, created out of order: 4/2, 3/1, 5/2 images."""
    return make_folder(tmp_path_factory.mktemp("data"), {"zebra": (4, 2), "ant": (3, 1), "moth": (5, 2)})


def test_good_layout(folder):
    (folder / "train" / "ant" / "notes.txt").write_text("not an image")  # ignored
    layout = check_layout(folder)
    assert layout.root == folder
    assert layout.classes == ["ant", "moth", "zebra"]
    assert layout.counts() == {"train": 12, "val": 5}
    labels = [label for _, label in layout.samples["train"]]
    assert labels == [0] * 3 + [1] * 5 + [2] * 4
    for split in ("train", "val"):
        for path, label in layout.samples[split]:
            assert Path(path).parent == folder / split / layout.classes[label]
            assert path.endswith(".JPEG")


def test_layout_of_one_split(folder):
    assert check_layout(folder, splits=("val",)).counts() == {"val": 5}


def test_folders_are_checked_without_torch(folder):
    """The layout check, and `hnd data check --verify` on it, with torch and torchvision
    unavailable (the book's runner checks --data this way before any cell starts); the image
    endings taken are torchvision ImageFolder's."""
    import json
    import subprocess
    import sys

    from torchvision.datasets.folder import IMG_EXTENSIONS

    from hnd import image_folders

    assert image_folders.IMG_EXTENSIONS == IMG_EXTENSIONS
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
            "from hnd.cli import main\n"
            f"code = main(['data', 'check', {str(folder)!r}, '--verify', '--json'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n"
            "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *report, imported = done.stdout.strip().splitlines()
    assert json.loads("\n".join(report))["counts"] == {"train": 12, "val": 5}
    assert imported == "['torch', 'torchvision']"  # only the blocked entries: nothing imported them


def test_missing_root(tmp_path):
    assert str(tmp_path / "absent") in error(check_layout, tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    assert str(tmp_path / "file") in error(check_layout, tmp_path / "file")


def test_missing_split(tmp_path):
    make_folder(tmp_path, {"a": (1, 0)})
    shutil.rmtree(tmp_path / "val")
    message = error(check_layout, tmp_path)
    assert str(tmp_path / "val") in message and "missing" in message


def test_split_without_class_folders(tmp_path):
    write_image(tmp_path / "train" / "loose.JPEG", 1)  # images directly in the split, no class folders
    (tmp_path / "val").mkdir()
    message = error(check_layout, tmp_path)
    assert str(tmp_path / "train") in message and "class" in message


def test_empty_class_folder(tmp_path):
    make_folder(tmp_path, {"a": (2, 1), "b": (2, 1)})
    for f in (tmp_path / "val" / "b").iterdir():
        f.unlink()
    (tmp_path / "val" / "b" / "readme.txt").write_text("no images here")
    message = error(check_layout, tmp_path)
    assert str(tmp_path / "val" / "b") in message


def test_classes_differ_between_splits(tmp_path):
    make_folder(tmp_path, {"a": (2, 1), "b": (2, 1)})
    write_image(tmp_path / "val" / "capybara" / "x.JPEG", 3)
    message = error(check_layout, tmp_path)
    assert str(tmp_path / "val") in message and "capybara" in message


@pytest.mark.parametrize("names", [["n01440764", "n01443537", "n01484850"],
                                   ["n01440764", "n01443537", "cats"]])
def test_incomplete_imagenet(tmp_path, names):
    make_folder(tmp_path, {n: (1, 1) for n in names})
    message = error(check_layout, tmp_path)
    assert str(tmp_path) in message and "1000" in message and "3" in message


def test_few_wordnet_ids_are_not_imagenet(tmp_path):
    make_folder(tmp_path, {"n01440764": (1, 1), "cats": (1, 1), "dogs": (1, 1)})
    assert check_layout(tmp_path).classes == ["cats", "dogs", "n01440764"]


def samples_of(counts: list[int]) -> list[tuple[str, int]]:
    return [(f"c{label}/img{i}.JPEG", label) for label, n in enumerate(counts) for i in range(n)]


def test_holdout_split_is_exact_and_disjoint():
    samples = samples_of([12, 15, 11, 30])
    train, held = holdout_split(samples, 10)
    assert sorted(train + held) == sorted(samples)
    assert not set(train) & set(held)
    for label in range(4):
        assert sum(1 for _, y in held if y == label) == 10
    assert [s for s in samples if s in set(train)] == train  # order kept


def test_holdout_split_is_deterministic():
    samples = samples_of([20, 20, 20])
    first = holdout_split(samples, 5)
    random.seed(123)
    torch.manual_seed(123)
    holdout_split(samples, 3, seed=9)  # other calls in between change nothing
    assert holdout_split(samples, 5) == first
    assert holdout_split(samples, per_class=5, seed=0) == first
    assert holdout_split(samples, 5, seed=1) != first


def test_holdout_split_per_class_independent_of_other_classes():
    """A class's held-out images do not depend on which other classes the list holds."""
    samples = samples_of([20, 20, 20])
    _, held = holdout_split(samples, 5)
    only_first = [s for s in samples if s[1] == 0]
    _, held_first = holdout_split(only_first, 5)
    assert held_first == [s for s in held if s[1] == 0]
    interleaved = [s for pair in zip(samples[:20], samples[20:40]) for s in pair]
    _, held_inter = holdout_split(interleaved, 5)
    assert sorted(held_inter) == sorted(s for s in held if s[1] < 2)


def test_holdout_split_needs_enough_images():
    message = error(holdout_split, samples_of([20, 10, 20]), 10)
    assert "class 1" in message and "10" in message and "holdout_per_class" in message


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[tuple[str, int]]:
    root = tmp_path_factory.mktemp("images")
    return [(str(write_image(root / f"{i}.JPEG", 100 + i, (40 + i, 30))), i % 3) for i in range(6)]


def augmented(images, seed=0, kind="torchvision") -> ImageDataset:
    return ImageDataset(images, train_transform(resolve("resnet50").at_input_size(32), kind), augment=True, seed=seed)


@pytest.mark.parametrize("kind", ["original", "torchvision"])
def test_augmentation_is_seeded_by_seed_epoch_index(images, kind):
    a, b = augmented(images, kind=kind), augmented(images, kind=kind)
    a.set_epoch(3)
    b.set_epoch(3)
    torch.manual_seed(1)
    x, y = a[2]
    torch.manual_seed(2)  # the global RNG plays no part
    assert torch.equal(x, b[2][0]) and y == b[2][1] == images[2][1]
    assert torch.equal(x, a[2][0])
    epochs = []
    for epoch in range(4):
        a.set_epoch(epoch)
        epochs.append(a[2][0])
    assert all(not torch.equal(epochs[0], e) for e in epochs[1:])
    assert not torch.equal(augmented(images, seed=1, kind=kind)[0][0], augmented(images, kind=kind)[0][0])


def test_augmentation_leaves_the_global_rng_alone(images):
    dataset = augmented(images)
    torch.manual_seed(5)
    random.seed(5)
    before, py_before = torch.get_rng_state(), random.getstate()
    dataset[1]
    assert torch.equal(torch.get_rng_state(), before)
    assert random.getstate() == py_before


def test_same_batches_with_any_number_of_workers(images):
    dataset = augmented(images, seed=4, kind="original")
    dataset.set_epoch(2)
    direct = torch.stack([dataset[i][0] for i in range(len(images))])
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate)
        batches = list(loader)
        assert torch.equal(torch.cat([x for x, _ in batches]), direct), workers
        assert torch.cat([y for _, y in batches]).tolist() == [y for _, y in images]


def test_unreadable_image(images, tmp_path):
    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(b"\x00garbage, not a JPEG" * 10)
    samples = [images[0], (str(bad), 1), images[1]]
    transform = resolve("resnet50").at_input_size(32).transforms()
    message = error(ImageDataset(samples, transform).__getitem__, 1)
    assert str(bad) in message and "skip_bad_images" in message
    lenient = ImageDataset(samples, transform, skip_bad_images=True)
    assert lenient[1] is None
    x, y = collate([lenient[i] for i in range(3)])
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [images[0][1], images[1][1]]
    assert collate([None, None]) is None
    x, y = next(iter(DataLoader(lenient, batch_size=3, collate_fn=collate)))
    assert x.shape[0] == 2


LEVEL = 1 / 255 / min(0.229, 0.224, 0.225)  # one grey level, normalized


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    """Photographs as ImageNet-sized JPEGs (quality 90), one saved as CMYK, one as PNG."""
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i, (name, photo) in enumerate(list(reference_photographs().items())[:4]):
        image = photo.convert("RGB").resize((500, 375), Image.BILINEAR)
        path = folder / (f"{name}.png" if i == 3 else f"{name}.JPEG")
        (image.convert("CMYK") if i == 2 else image).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.mark.parametrize("model", ["densenet169", "inception_v3", "resnet50"])
def test_both_decoders_give_the_same_tensors(jpegs, model):
    """decoder=torchvision (torchvision.io, uint8 tensors) against Pillow: the same pixels up to
    JPEG decoder differences, then the same geometry and random draws: within a few grey levels."""
    for path in jpegs:
        pil, tensor = read_image(path, "pil"), read_image(path, "torchvision")
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
        pixels = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        assert tensor.shape == pixels.shape == (3, 375, 500), path.name
        assert (tensor.int() - pixels.int()).abs().max() <= 2, path.name
        spec = resolve(model)
        a, b = spec.transforms()(pil), spec.transforms("torchvision")(tensor)
        assert a.shape == b.shape and (a - b).abs().max() <= 3 * LEVEL and (a - b).abs().mean() <= 0.5 * LEVEL
        for kind in ("original", "torchvision"):  # the same crop and flip from the same seed
            torch.manual_seed(7)
            a = train_transform(spec, kind)(pil)
            torch.manual_seed(7)
            b = train_transform(spec, kind, decoder="torchvision")(tensor)
            assert (a - b).abs().max() <= 3 * LEVEL and (a - b).abs().mean() <= 0.5 * LEVEL, (path.name, kind)
    # Through the dataset, as training reads them; mistakes are one line.
    samples = [(str(p), 0) for p in jpegs]
    dataset = ImageDataset(samples, spec.transforms("torchvision"), decoder="torchvision")
    assert torch.stack([x for x, _ in dataset]).shape[0] == len(jpegs)
    assert "unknown decoder 'turbo'; valid: pil, torchvision" in error(read_image, jpegs[0], "turbo")
    assert "unknown decoder 'turbo'" in error(spec.transforms, "turbo")


def test_torchvision_decoder_errors_are_one_line(tmp_path):
    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a JPEG" * 10)
    assert str(bad) in error(read_image, bad, "torchvision")
    assert "image not found" in error(read_image, tmp_path / "gone.JPEG", "torchvision")


def test_missing_image(tmp_path):
    missing = tmp_path / "gone.JPEG"
    message = error(ImageDataset([(str(missing), 0)], resolve("resnet50").transforms()).__getitem__, 0)
    assert str(missing) in message


@pytest.mark.parametrize("kind", ["original", "torchvision"])
@pytest.mark.parametrize("name, size", [("resnet50", 48), ("inception_v3_head_mimic-ver1b-3ch", 75),
                                        ("densenet169", None)])
def test_train_transform_shape(images, kind, name, size):
    image = Image.open(images[0][0])
    expected = size or (299 if name.startswith("inception") else 224)
    torch.manual_seed(0)
    assert train_transform(resolve(name).at_input_size(size), kind)(image).shape == (3, expected, expected)


def test_unknown_train_transform():
    assert "autoaugment" in error(train_transform, resolve("resnet50"), "autoaugment")


def _sizes(preprocessing: Preprocessing) -> tuple[int, int]:
    return preprocessing.input_size, preprocessing.resize_size


@pytest.mark.parametrize("teacher", PAPER_TEACHERS)
def test_input_sizes(teacher):
    default = (299, 327) if teacher == "inception_v3" else (224, 256)
    assert _sizes(resolve(teacher).preprocessing()) == default
    student = f"{teacher}_head_mimic-ver{'1b' if teacher == 'inception_v3' else '2b'}-6ch"
    assert _sizes(resolve(student).preprocessing()) == default
    assert _sizes(resolve(teacher).at_input_size(64).preprocessing(70)) == (64, 70)


def test_custom_input_sizes():
    assert _sizes(resolve("resnet50").at_input_size(64).preprocessing()) == (64, 73)
    assert _sizes(resolve("inception_v3").at_input_size(96).preprocessing()) == (96, 105)


def test_eval_transform(images):
    image = Image.open(images[3][0])
    transform = resolve("resnet50").at_input_size(64).transforms()
    assert transform.transforms[0].size == 73 and transform.transforms[1].size == (64, 64)
    x = transform(image)
    assert x.shape == (3, 64, 64)
    assert torch.equal(x, transform(image))
    assert resolve("inception_v3").transforms().transforms[0].size == 327
    assert resolve("resnet50").at_input_size(48).transforms(resize_size=60)(image).shape == (3, 48, 48)


def test_preprocessing_travels_as_plain_data():
    """What an exported encoder takes along: read back equal, a damaged record is one line."""
    preprocessing = resolve("inception_v3").at_input_size(96).preprocessing()
    doc = preprocessing.to_dict()
    assert doc == {"input_size": 96, "resize_size": 105, "interpolation": "bilinear",
                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert Preprocessing.from_dict(doc) == preprocessing
    assert "damaged preprocessing record" in error(Preprocessing.from_dict, {**doc, "resize_size": "big"})
    assert "interpolation is one of" in error(Preprocessing.from_dict, {**doc, "interpolation": "lanczos9"})


@pytest.mark.parametrize("length", [0, 1, 7, 10])
def test_shards_cover_without_padding(length):
    for world in (1, 2, 3):
        shards = [list(ShardSampler(length, rank, world)) for rank in range(world)]
        assert [len(ShardSampler(length, rank, world)) for rank in range(world)] == [len(s) for s in shards]
        assert sorted(i for s in shards for i in s) == list(range(length))
        assert all(s == sorted(s) for s in shards)


def test_prepare_imagenet_without_archives(tmp_path):
    message = error(prepare_imagenet, tmp_path)
    assert "ILSVRC2012" in message and "archive" in message


def test_prepare_imagenet_missing_folder(tmp_path):
    message = error(prepare_imagenet, tmp_path / "absent")
    assert str(tmp_path / "absent") in message and "ILSVRC2012" in message


def test_an_evaluation_set_kept_in_memory_is_decoded_once(tmp_path, monkeypatch):
    import hnd.data

    root = write_synthetic_dataset(tmp_path / "d", classes=2, train_per_class=2, val_per_class=3, image_size=40)["root"]
    samples = check_layout(root).samples["val"]
    transform = resolve("resnet18").at_input_size(32).transforms()
    reads = []
    original = hnd.data.read_image
    monkeypatch.setattr(hnd.data, "read_image", lambda *a: reads.append(a) or original(*a))
    kept, plain = (ImageDataset(samples, transform, keep=keep) for keep in (True, False))
    for _ in range(3):  # three epochs
        for i in range(len(samples)):
            (x, label), (y, same_label) = kept[i], plain[i]
            assert torch.equal(x, y) and label == same_label
    assert len(reads) == len(samples) + 3 * len(samples)  # kept: once; plain: every epoch
    assert hnd.data.worth_keeping(500, 80) and not hnd.data.worth_keeping(50_000, 224)
    assert "evaluation set" in error(ImageDataset, samples, transform, augment=True, keep=True)


@pytest.mark.parametrize("name, size", [("densenet169", None), ("inception_v3", None), ("resnet18", 80),
                                        ("efficientnet_b0", None)])
def test_the_device_preprocessing_is_torchvisions_on_photographs(name, size):
    """Pillow and numpy alone (what an edge device without torch runs) give the evaluation
    transform's tensor bit for bit, on real photographs of every aspect (bilinear and bicubic)."""
    pytest.importorskip("skimage")
    from matplotlib import cbook

    from hnd.book.photographs import reference_photographs

    spec = resolve(name).at_input_size(size)
    photos = list(reference_photographs().values())
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as hopper:
        photos.append(hopper.convert("RGB"))
    assert len({p.size for p in photos}) > 2  # landscape, portrait and square
    for photo in photos:
        assert np.array_equal(spec.preprocessing().array(photo), spec.transforms()(photo).numpy())
