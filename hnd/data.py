"""Images in, tensors out: training augmentation, image folders in the ImageNet layout, and
loaders (the evaluation transform is the model's own: ``spec.transforms()``,
:mod:`hnd.preprocessing`).

Datasets are image folders in the ImageNet layout, checked by :mod:`hnd.image_folders`
(ImageNet prepared by ``hnd data imagenet``, the generated set of ``hnd data synth``, or any
other). Training transforms are the original's by default
or torchvision's reference recipe. Images are decoded by Pillow
(``pil``, the default) or by torchvision.io (``torchvision``: uint8 tensors through the same
transforms of ``transforms.v2``, more JPEGs per loader worker: ``bench/input_pipeline.py``).
Random augmentation is seeded per (seed, epoch, image), so a batch is the same whatever the
number of workers or processes, and an interrupted epoch can be replayed exactly.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import io as tvio
from torchvision import transforms

from hnd.errors import HndError
from hnd.image_folders import SPLITS, Layout, check_layout, load_image
from hnd.preprocessing import DECODERS, IMAGENET_MEAN, IMAGENET_STD, normalize_steps, transform_ops
from hnd.registry import ModelSpec

_BILINEAR = transforms.InterpolationMode.BILINEAR


def train_transform(spec: ModelSpec, kind: str = "original", resize_size: int | None = None, decoder: str = "pil",
                    *, normalize: bool = True) -> transforms.Compose:
    """Training augmentation at ``spec``'s input size. ``original``: warp the image to the input
    size, resize to the resize side, random crop, horizontal flip (what the original did).
    ``torchvision``: the reference recipe, RandomResizedCrop + flip. ``normalize=False`` stops
    before the pixels become normalized floats (see :func:`normalize_pixels`)."""
    size, resize = spec.input_size, resize_size or spec.resize_size
    ops = transform_ops(decoder)
    if kind == "original":
        steps = [ops.Resize((size, size), interpolation=_BILINEAR), ops.Resize(resize, interpolation=_BILINEAR),
                 ops.RandomCrop(size)]
    elif kind == "torchvision":
        steps = [ops.RandomResizedCrop(size, interpolation=_BILINEAR)]
    else:
        raise HndError(f"unknown transforms {kind!r}; valid: original, torchvision")
    norm = normalize_steps(decoder, spec.teacher.mean, spec.teacher.std) if normalize else []
    return ops.Compose([*steps, ops.RandomHorizontalFlip(), *norm])


def pixels_uint8(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """An augmented image before normalization (PIL image or uint8 tensor) as uint8 [3, H, W]."""
    return image if isinstance(image, torch.Tensor) else transforms.functional.pil_to_tensor(image)


def normalize_pixels(pixels: torch.Tensor, decoder: str = "pil", mean=IMAGENET_MEAN,
                     std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [..., 3, H, W], one image or a batch -> the normalized float tensor that the
    training transform gives for the same pixels, bit for bit: the transform's own last steps
    (``mean``/``std``: the teacher's), applied to the whole batch at once."""
    to_float, normalize = normalize_steps(decoder, mean, std)
    if decoder == "pil":  # ToTensor's arithmetic (float, then / 255); it takes one image, not a batch
        return normalize(pixels.to(torch.get_default_dtype()).div(255))
    return normalize(to_float(pixels))


def read_image(path: str | os.PathLike, decoder: str = "pil") -> Image.Image | torch.Tensor:
    """An image file's RGB pixels: a PIL image (``pil``) or a uint8 tensor [3, H, W] decoded by
    torchvision.io (``torchvision``; a file it cannot decode, such as a CMYK JPEG, goes
    through Pillow instead). Missing or unreadable files raise a one-line error."""
    if decoder == "pil":
        return load_image(path)
    if decoder not in DECODERS:
        raise HndError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    try:
        return tvio.decode_image(tvio.read_file(str(path)), mode=tvio.ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return transforms.functional.pil_to_tensor(load_image(path))


def image_tensor(spec: ModelSpec, path: str | os.PathLike) -> torch.Tensor:
    """Image file -> normalized batch of one, [1, 3, S, S], at ``spec``'s input size."""
    return spec.transforms()(load_image(path)).unsqueeze(0)


def holdout_split(samples: list[tuple[str, int]], per_class: int, seed: int = 0) -> tuple[list, list]:
    """Split train samples into (train, held out): ``per_class`` images of every class, chosen
    with a fixed seed independent of the run's seed, so that every run selects on the same slice."""
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    held = set()
    for label, indices in by_class.items():
        if len(indices) <= per_class:
            raise HndError(f"class {label} has {len(indices)} training images; holdout_per_class={per_class} "
                           "must leave some for training (lower it, or use selection=val)")
        held.update(random.Random(f"{seed}/{label}").sample(indices, per_class))
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


_VIEW_SEED = 0x5EED  # augmentation views are drawn from (this, view, index): the same for every run
KEEP_BYTES = 256 << 20  # an evaluation set up to this size (as float32 tensors) is decoded once per run


def worth_keeping(images: int, size: int) -> bool:
    """Whether an evaluation set of ``images`` at ``size`` px is small enough to keep decoded."""
    return images * 3 * size * size * 4 <= KEEP_BYTES


class ImageDataset(Dataset):
    """(image, label) pairs from a list of files. With ``augment``, the transform's random draws
    are seeded by (seed, epoch, index): call :meth:`set_epoch` before each epoch. With ``views``
    = V > 0 they are seeded by (view, index) instead, view = epoch mod V, and each item is
    (image, label, key) with key = index·V + view: the key of the teacher's cached outputs. With
    ``keep`` (evaluation sets read every epoch) an item is decoded once and kept in memory."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, *, augment: bool = False,
                 seed: int = 0, skip_bad_images: bool = False, decoder: str = "pil", views: int = 0,
                 keep: bool = False):
        if keep and augment:
            raise HndError("only an evaluation set (no augmentation) can be kept in memory")
        self.samples = samples
        self.kept: dict[int, tuple] | None = {} if keep else None
        self.transform = transform  # built for the same decoder
        self.decoder = decoder
        self.augment = augment
        self.seed = seed
        self.views = views
        self.epoch = 0
        self.skip_bad_images = skip_bad_images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        if self.kept is not None:
            if index not in self.kept:
                self.kept[index] = self._read(index)
            return self.kept[index]
        return self._read(index)

    def _read(self, index: int):
        path, label = self.samples[index]
        try:
            image = read_image(path, self.decoder)
        except HndError as exc:
            if not self.skip_bad_images:
                raise HndError(f"{exc}; pass skip_bad_images=true to skip such files") from None
            print(f"hnd: warning: skipped unreadable image {path}", file=sys.stderr)
            return None
        if not self.augment:
            return self.transform(image), label
        draw = (self.seed, self.epoch, index) if not self.views else (_VIEW_SEED, self.epoch % self.views, index)
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: torch.manual_seed would also
            torch.random.default_generator.manual_seed(hash(draw) & 0x7FFF_FFFF)  # queue a CUDA seed per image
            x = self.transform(image)
        return (x, label) if not self.views else (x, label, index * self.views + self.epoch % self.views)


def collate(batch: list):
    """Default collation, dropping the images that were skipped as unreadable."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: each process evaluates a disjoint shard and
    no image is counted twice (unlike DistributedSampler, which pads)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def prepare_imagenet(root: str | os.PathLike) -> Layout:
    """Extract the official ILSVRC2012 archives found in ``root`` (``ILSVRC2012_img_train.tar``,
    ``ILSVRC2012_img_val.tar``, ``ILSVRC2012_devkit_t12.tar.gz``) into ``root/train/<wnid>/`` and
    ``root/val/<wnid>/`` with :class:`torchvision.datasets.ImageNet`, which checks each archive's
    MD5 and sorts the validation images into class folders; then check the layout."""
    from torchvision.datasets import ImageNet

    root = Path(root)
    if not root.is_dir():
        raise HndError(f"folder not found: {root}; put the three ILSVRC2012 archives in it")
    needed = [] if (root / "meta.bin").is_file() else ["ILSVRC2012_devkit_t12.tar.gz"]
    needed += [f"ILSVRC2012_img_{split}.tar" for split in SPLITS if not (root / split).is_dir()]
    missing = [name for name in needed if not (root / name).is_file()]
    if missing:
        raise HndError(f"{root} lacks {', '.join(missing)}; download the ILSVRC2012 archives from "
                       "image-net.org into it")
    for split in SPLITS:
        try:
            ImageNet(str(root), split=split)
        except ImportError as exc:  # the devkit's meta.mat is read with scipy
            raise HndError(f"preparing ImageNet needs {exc.name or 'scipy'}: pip install scipy") from None
        except RuntimeError as exc:
            raise HndError(str(exc).splitlines()[0]) from None
    return check_layout(root)
