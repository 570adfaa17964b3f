"""Top-1/top-5 accuracy of a model on an image folder, and of a checkpoint against its teacher
(the equivalent of the original's ``-test_only`` and ``-student_only``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from hnd.checkpoints import checkpoint_spec, read_checkpoint
from hnd.codec import coded_roundtrip
from hnd.config import TrainConfig, check_method, check_saved_run, config_from_dict, method_spec, preset
from hnd.data import ImageDataset, ShardSampler, collate
from hnd.image_folders import check_layout
from hnd.distributed import Dist, all_reduce_sum, pick_device
from hnd.errors import HndError
from hnd.registry import ModelSpec
from hnd.methods import build_reference_teacher
from hnd.models import create_model
from hnd.teacher_outputs import cache_key, cached_teacher_accuracy
from hnd.teachers import classifier_classes


@dataclass
class Accuracy:
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    loss: float  # mean cross-entropy
    images: int
    bytes_per_image: float | None = None  # entropic students: mean range-coded bytes, one image at a time

    def to_dict(self) -> dict:
        return asdict(self)


def default_workers(num_workers: int) -> int:
    return min(os.cpu_count() or 1, 8) if num_workers < 0 else num_workers


def eval_loader(dataset: ImageDataset, batch_size: int, num_workers: int, dist: Dist = Dist(),
                pin_memory: bool = False) -> DataLoader:
    """In-order loader over this process's shard of ``dataset``."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), dist.rank, dist.world_size),
                      num_workers=default_workers(num_workers), collate_fn=collate, pin_memory=pin_memory)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, *, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, progress: bool = False, desc: str = "eval") -> Accuracy:
    """Accuracy of ``model`` (put in eval mode) over ``loader``, summed over all processes.

    An entropic student with coding tables is evaluated as it is deployed: every image's
    bottleneck is range-coded on its own (batch 1), decoded, and the decoder and tail run on
    the decoded symbols; the mean coded bytes per image are reported."""
    model.eval()
    prior = getattr(model, "prior", None)
    coded = prior is not None and prior.has_tables
    totals = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, images, coded bytes
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        if batch is None:  # every image of the batch was skipped as unreadable
            continue
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if coded:
                received, sizes = coded_roundtrip(prior, model.encode(x).float())  # [N, C, H', W']
                logits = model.decode(received)
                totals[4] += sum(sizes)
            else:
                logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == y[:, None]  # [N, k]
        totals[0] += F.cross_entropy(logits, y, reduction="sum").item()
        totals[1] += hits[:, 0].sum().item()
        totals[2] += hits.any(dim=1).sum().item()
        totals[3] += len(y)
    loss, top1, top5, n, coded_bytes = all_reduce_sum(totals, device)
    if n == 0:
        raise HndError("no image could be evaluated")
    return Accuracy(100 * top1 / n, 100 * top5 / n, loss / n, int(n), coded_bytes / n if coded else None)


@torch.no_grad()
def head_error(head: nn.Module, teacher_head: nn.Module, loader: DataLoader, device: torch.device, channels: int,
               *, channels_last: bool = False) -> float:
    """The fraction of the teacher head's output variance over ``loader``'s images that ``head``'s
    output leaves unexplained: the summed squared error over the sum of squares about each
    channel's mean (in fp32). 0 is a perfect mimic, 1 no better than every channel's mean: how
    closely a student head gives its frozen tail what the tail was trained on. ``channels``: the
    teacher head's output channels (every process sums them, its shard empty or not)."""
    head.eval()
    teacher_head.eval()
    error, count, squares = 0.0, 0.0, 0.0
    sums = torch.zeros(channels, dtype=torch.float64)
    for batch in loader:
        if batch is None:
            continue
        x = batch[0].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        student, teacher = head(x).float(), teacher_head(x).float()  # [N, C, H, W] each
        error += float(((student - teacher) ** 2).sum())
        count += teacher.numel() / teacher.shape[1]  # values per channel
        sums += teacher.sum(dim=(0, 2, 3)).double().cpu()  # [C]
        squares += float((teacher.double() ** 2).sum())
    error, count, squares, *sums = all_reduce_sum([error, count, squares, *sums.tolist()], device)
    if not count:
        raise HndError("no image could be evaluated")
    spread = squares - sum(s * s for s in sums) / count  # sum of squares about each channel's mean
    return error / spread if spread > 0 else float("nan")


def _checkpoint_config(spec: ModelSpec | None, method: str, ckpt) -> TrainConfig:
    """The run's config (hnd checkpoints record it) or the official preset (original files);
    ``spec=None``: the model the file records."""
    if "config" in ckpt.meta:
        doc = ckpt.meta["config"]
        spec = checkpoint_spec(ckpt, None if spec is None else method_spec(spec, method))
        check_saved_run(doc, spec, method, str(ckpt.path))
        return config_from_dict(doc, spec)
    if spec is None:
        raise HndError(f"{ckpt.path} ({ckpt.format}) does not record its model; give the model name")
    return preset(spec, method)


def evaluate_checkpoint(spec: ModelSpec | None, method: str, checkpoint: str | os.PathLike, data: str | os.PathLike, *,
                        student_only: bool = False, batch_size: int = 50, num_workers: int = -1,
                        device: str = "auto", progress: bool = False) -> dict:
    """Top-1/top-5 on ``data``/val of the model in ``checkpoint`` (any supported format) and,
    unless ``student_only``, of the teacher it was trained from."""
    check_method(method)
    ckpt = read_checkpoint(checkpoint)
    config = _checkpoint_config(spec, method, ckpt)
    model = create_model(config.spec, checkpoint=ckpt)
    layout = check_layout(data, splits=("val",))
    classes = classifier_classes(model.state_dict())
    if classes != len(layout.classes):
        raise HndError(f"{checkpoint} classifies {classes} classes but {layout.root}/val has {len(layout.classes)}")
    dev = pick_device(device)
    loader = _val_loader(config, layout, batch_size, num_workers, dev)
    result = {"model": config.model, "method": method, "checkpoint": str(checkpoint), "format": ckpt.format,
              "data": str(layout.root / "val"), "student": None, "teacher": None}
    result["student"] = evaluate(model.to(dev), loader, dev, progress=progress, desc="model").to_dict()
    if not student_only:
        result["teacher"] = _teacher_accuracy(config, len(layout.classes), loader, dev, progress)
    return result


def evaluate_teacher(config: TrainConfig, data: str | os.PathLike, *, batch_size: int = 50, num_workers: int = -1,
                     device: str = "auto", progress: bool = False) -> dict | None:
    """Top-1/top-5 on ``data``/val of the teacher a run of ``config`` learns from (its
    ``teacher_checkpoint`` or pretrained weights); None for a teacher run or an untrained teacher.
    A finished run has tested itself (``result.json``), so this is all its record still needs.
    With a ``teacher_cache`` the accuracy is kept there: every student of a grid measures its
    teacher once."""
    layout = check_layout(data, splits=("val",))
    dev = pick_device(device)

    def measure() -> dict | None:
        loader = _val_loader(config, layout, batch_size, num_workers, dev)
        return _teacher_accuracy(config, len(layout.classes), loader, dev, progress)

    if not config.teacher_cache or not _has_teacher(config):
        return measure()
    key = cache_key(config, layout.samples["val"], config.eval_transform(), 0, f"test/{dev.type}")
    return cached_teacher_accuracy(config.teacher_cache, key, measure)


def _val_loader(config: TrainConfig, layout, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """The val split of ``layout`` as ``config``'s run evaluates it."""
    dataset = ImageDataset(layout.samples["val"], config.eval_transform(), decoder=config.decoder)
    return eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda")


def _has_teacher(config: TrainConfig) -> bool:
    """Whether a run of ``config`` learns from a trained teacher (not a teacher run, not random weights)."""
    return config.method != "teacher" and bool(config.teacher_checkpoint or config.pretrained)


def _teacher_accuracy(config: TrainConfig, classes: int, loader: DataLoader, device: torch.device,
                      progress: bool) -> dict | None:
    if not _has_teacher(config):
        return None
    teacher = build_reference_teacher(config, classes).to(device)
    return evaluate(teacher, loader, device, progress=progress, desc="teacher").to_dict()
