"""The frozen teacher's outputs, computed once per (image, augmentation view) and reused.

A teacher is frozen while its students train, so its head output (the target of HND, AE and
entropic stage 1) and its logits (the soft labels of KD and entropic stage 2) are a fixed
function of the augmented image. With ``augment_views=V`` every epoch shows one of V fixed
views of each image (:class:`hnd.data.ImageDataset`), the same for every run and seed, so
:func:`cached_teacher_outputs` computes both outputs for every view once, keeps them in
``<teacher_cache>/<cache_key>.pt`` with the views' pixels, and every run on the same
teacher, data and views reads them back instead of decoding images and running the teacher:
across epochs, bottleneck widths, methods and seeds (:class:`CachedViews`). Caching teacher
outputs is how torchdistill speeds up distillation too. A file lock makes runs that start
together compute them once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hnd.checkpoints import atomic_save, read_file
from hnd.data import ImageDataset, normalize_pixels, pixels_uint8
from hnd.errors import HndError
from hnd.files import read_json, write_text
from hnd.preprocessing import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from hnd.config import TrainConfig

FORMAT = 2  # bump when what a cache file holds changes


@dataclass
class TeacherOutputs:
    """Row ``index·V + view`` of: the view's pixels [N·V, 3, S, S] (uint8, before
    normalization), the teacher head's output [N·V, C, H, W] (float16: half the memory; a
    student's training loss against it moves by under 0.5%) and the teacher's
    logits [N·V, classes] (float32)."""

    pixels: torch.Tensor
    head: torch.Tensor
    logits: torch.Tensor

    def targets(self, kind: str, keys: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The ``head`` outputs or ``logits`` of a batch's keys, as float32 on ``device``."""
        rows = getattr(self, kind)[keys.cpu()]
        return rows.to(device=device, dtype=torch.float32)


def cache_key(config: TrainConfig, samples: list[tuple[str, int]], transform: object, views: int,
              split: str) -> str:
    """The name of what a cache holds for ``config``'s teacher: it depends on the teacher (its
    checkpoint file's path, size and time, or its pretrained name), the split point (or
    ``split`` names another measurement of it), the images and labels, the augmentation and
    the number of views."""
    doc = {"format": FORMAT, "teacher": _teacher_identity(config), "split": split, "views": views,
           "transform": repr(transform), "samples": [(os.path.abspath(p), label) for p, label in samples]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _teacher_identity(config: TrainConfig) -> str:
    """A teacher checkpoint as path, size and modification time (no second read of the file);
    pretrained teachers by name, random ones by name and the seed that drew them."""
    checkpoint, name = config.teacher_checkpoint, config.spec.teacher.name
    if not checkpoint:
        return f"pretrained:{name}" if config.pretrained else f"random:{name}:{config.seed}"
    stat = Path(checkpoint).stat()
    return f"{os.path.abspath(checkpoint)}:{stat.st_size}:{stat.st_mtime_ns}"


@torch.no_grad()
def compute_teacher_outputs(head: nn.Module, tail: nn.Module, views: ImageDataset, batch_size: int,
                            num_workers: int, device: torch.device, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            channels_last: bool = False, teacher: nn.Module | None = None) -> TeacherOutputs:
    """Run the frozen teacher, split into ``head`` and ``tail``, over every view of every image:
    the logits are ``tail(head(x))``, bit for bit the whole teacher's, without running the head
    twice; or ``teacher(x)`` where the head is not the teacher's own start (an Inception head
    without the input transform its teacher applies). ``views`` gives the augmented images
    before normalization (``train_transform(normalize=False)``)."""
    count, n = views.views, len(views)
    for module in (head, tail, teacher):
        if module is not None:
            module.eval()
    rows: list[tuple[torch.Tensor, ...]] = []
    for view in range(count):
        views.set_epoch(view)
        loader = DataLoader(views, batch_size=batch_size, num_workers=num_workers, collate_fn=_pixels)
        for pixels, keys in loader:
            x = normalize_pixels(pixels, views.decoder, mean, std).to(device)  # [B, 3, S, S]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            h = head(x)  # [B, C, H, W]
            logits = tail(h) if teacher is None else teacher(x)  # [B, classes]
            rows.append((keys, pixels, h.half().cpu(), logits.float().cpu()))
    keys = torch.cat([r[0] for r in rows])
    order = torch.empty_like(keys)
    order[keys] = torch.arange(len(keys))  # row index·V + view
    assert len(keys) == n * count
    return TeacherOutputs(*(torch.cat([r[i] for r in rows])[order] for i in (1, 2, 3)))


def _pixels(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 pixels [B, 3, S, S], keys [B]) of a batch of (image, label, key) views."""
    return torch.stack([pixels_uint8(image) for image, _, _ in batch]), torch.tensor([k for _, _, k in batch])


class CachedViews(Dataset):
    """The training views of a cache as a dataset: (normalized image, label, key) for epoch
    ``e``'s view ``e mod V``, the same tensors :class:`hnd.data.ImageDataset` would decode."""

    def __init__(self, cache: TeacherOutputs, labels: list[int], views: int, decoder: str, *, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.cache, self.labels, self.views, self.decoder = cache, labels, views, decoder
        self.mean, self.std = mean, std  # the teacher's normalization
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        key = index * self.views + self.epoch % self.views
        return normalize_pixels(self.cache.pixels[key], self.decoder, self.mean, self.std), self.labels[index], key


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path`` (created if missing) while inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_teacher_outputs(folder: str | os.PathLike, key: str, compute) -> TeacherOutputs:
    """The outputs stored as ``folder/<key>.pt``, or ``compute()``'s, stored there first. Runs
    asking for the same key at once wait for the first to finish and read its file."""
    def read(path: Path) -> TeacherOutputs:
        doc = read_file(path)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise HndError(f"{path} is not a teacher-output cache of this version; delete it")
        return TeacherOutputs(doc["pixels"], doc["head"], doc["logits"])

    def write(outputs: TeacherOutputs, path: Path) -> None:
        atomic_save({"format": FORMAT, "pixels": outputs.pixels, "head": outputs.head, "logits": outputs.logits},
                    path)

    return _cached(Path(folder) / f"{key}.pt", read, write, compute)


def cached_teacher_accuracy(folder: str | os.PathLike, key: str, compute) -> dict:
    """The teacher's accuracy on a test split stored as ``folder/<key>.json``, or ``compute()``'s
    (a dict), stored there first: every student of a grid shows its teacher's, measured once."""
    return _cached(Path(folder) / f"{key}.json", read_json,
                   lambda value, path: write_text(path, json.dumps(value, indent=1) + "\n"), compute)


def _cached(path: Path, read, write, compute):
    """``read(path)``, or ``compute()`` written with ``write(value, path)`` first, under a lock."""
    with _locked(path.with_suffix(".lock")):
        if path.is_file():
            return read(path)
        value = compute()
        write(value, path)
        return value
