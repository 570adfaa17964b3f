"""Rate–accuracy: top-1/top-5 against the bytes per image that an edge device sends.

Three things a device could send, each measured on the same images:

- ``bottleneck``: a student's (or autoencoder's) bottleneck ``z`` in one of
  :data:`hnd.codec.TENSOR_FORMATS`, or an entropic student's range-coded in ``entropy``; the
  server decodes it and runs the decoder and tail.
- ``input``: the image itself, cropped as for evaluation and compressed with an image codec
  (plus the uncompressed RGB crop, setting ``raw``); the server runs the whole teacher.
- ``teacher_split``: the unmodified teacher cut after one of its stages (a paper family's
  stage list) or split points (any other teacher's traced graph), the tensor there sent in a
  tensor format; the server runs the rest.

Every tensor or image is encoded and decoded on its own, exactly as it would travel, so the
accuracy includes the codec's loss and the bytes are real payload sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from hnd import tracing
from hnd.codec import check_image_codec, check_quality, coded_roundtrip, decode_image, encode_image, tensor_roundtrip
from hnd.range_coder import ENTROPY_FORMAT
from hnd.tensor_codec import TENSOR_FORMATS, check_tensor_format
from hnd.data import ImageDataset
from hnd.image_folders import load_image
from hnd.distributed import pick_device
from hnd.evaluation import eval_loader
from hnd.errors import HndError
from hnd.registry import ModelSpec
from hnd.teachers import teacher_stages, traced_facts

KINDS = ("bottleneck", "input", "teacher_split")


@dataclass
class RatePoint:
    """One point of a rate–accuracy curve."""

    kind: str  # one of KINDS
    label: str  # what is evaluated: a model name, "<teacher> <codec>", "<teacher> raw"
    setting: str  # tensor format, codec quality ("q75", "lossless", "raw") or split stage / point
    bytes: float  # mean bytes sent per image
    top1: float  # percent
    top5: float  # percent, top-k with k = min(5, classes)
    images: int

    def to_dict(self) -> dict:
        return asdict(self)


class _Tally:
    """Running top-1/top-5 hits and bytes for one point."""

    def __init__(self) -> None:
        self.top1 = self.top5 = self.images = 0
        self.bytes = 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, sizes: Sequence[float]) -> None:
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]  # [N, k]
        self.top1 += int(hits[:, 0].sum())
        self.top5 += int(hits.any(dim=1).sum())
        self.images += len(labels)
        self.bytes += float(sum(sizes))

    def point(self, kind: str, label: str, setting: str) -> RatePoint:
        if self.images == 0:
            raise HndError("no image could be evaluated")
        n = self.images
        return RatePoint(kind, label, setting, self.bytes / n, 100 * self.top1 / n, 100 * self.top5 / n, n)


def select_samples(samples: Sequence[tuple[str, int]], max_images: int | None) -> list[tuple[str, int]]:
    """The first ``max_images`` samples in class-balanced order: the first image of every
    class, then the second of every class, and so on (classes in order of first appearance),
    kept in their original order. ``None`` keeps all. The choice depends only on the list."""
    samples = list(samples)
    if not samples:
        raise HndError("no images to evaluate: the sample list is empty")
    if max_images is None:
        return samples
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images <= 0:
        raise HndError(f"max_images must be a positive integer or None, got {max_images!r}")
    rank: dict[int, int] = {}  # label -> images of it seen so far
    order = []
    for index, (_, label) in enumerate(samples):
        order.append((rank.get(label, 0), index))
        rank[label] = rank.get(label, 0) + 1
    chosen = sorted(index for _, index in sorted(order)[:max_images])
    return [samples[i] for i in chosen]


def _prepare(model: nn.Module, device: str | torch.device) -> tuple[nn.Module, torch.device]:
    device = pick_device(device) if isinstance(device, str) else torch.device(device)
    return model.to(device).eval(), device


@torch.no_grad()
def bottleneck_rate(model: nn.Module, spec: ModelSpec, samples: Sequence[tuple[str, int]],
                    formats: Sequence[str] = TENSOR_FORMATS, *, resize_size: int | None = None,
                    label: str | None = None, device: str | torch.device = "auto", batch_size: int = 32,
                    num_workers: int = -1, max_images: int | None = None) -> list[RatePoint]:
    """Accuracy and bytes of ``model``'s bottleneck sent in each of ``formats``.

    model: anything with ``encode(x) -> z`` and ``decode(z) -> logits`` (a Student, an
    AutoencoderModel). spec: the model's (or its teacher's) spec: its evaluation transform,
    at its input size, feeds the model.
    The encoder runs once per batch; ``decode(roundtrip(z))`` runs once per format. label:
    defaults to the model's canonical name. max_images: see :func:`select_samples`.
    ``entropy`` (an entropic student's range coder, one image at a time) needs a model with
    coding tables (``model.prior``).
    """
    prior = getattr(model, "prior", None)
    formats = list(dict.fromkeys(f if f == ENTROPY_FORMAT else check_tensor_format(f) for f in formats))
    if not formats:
        raise HndError(f"no tensor format given; valid: {', '.join(TENSOR_FORMATS)}, {ENTROPY_FORMAT}")
    if ENTROPY_FORMAT in formats and (prior is None or not prior.has_tables):
        raise HndError(f"{spec} has no entropy coding tables; format {ENTROPY_FORMAT} needs an entropic student "
                       "(trained with --method entropic)")
    model, device = _prepare(model, device)
    dataset = ImageDataset(select_samples(samples, max_images), spec.transforms(resize_size=resize_size))
    tallies = {fmt: _Tally() for fmt in formats}
    for x, y in eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda"):
        x, y = x.to(device), y.to(device)
        z = model.encode(x)  # [N, bc, H', W']
        for fmt in formats:
            received, sizes = coded_roundtrip(prior, z) if fmt == ENTROPY_FORMAT else tensor_roundtrip(z, fmt)
            tallies[fmt].add(model.decode(received), y, sizes)
    return [tallies[fmt].point("bottleneck", label or str(spec), fmt) for fmt in formats]


class _CodedImages(Dataset):
    """Per sample: the evaluation crop as sent raw and after each quality of ``codec``, as
    normalized tensors [1 + Q, 3, S, S], their sizes in bytes [1 + Q], and the label. The
    encoding runs here, in the loader's workers."""

    def __init__(self, samples: list[tuple[str, int]], geometry, to_tensor, codec: str,
                 qualities: list[int | None]):
        self.samples, self.geometry, self.to_tensor = samples, geometry, to_tensor
        self.codec, self.qualities = codec, qualities

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        crop = self.geometry(load_image(path))  # PIL, S x S
        images, sizes = [self.to_tensor(crop)], [crop.width * crop.height * 3]
        for quality in self.qualities:
            data = encode_image(crop, self.codec, quality)
            images.append(self.to_tensor(decode_image(data)))
            sizes.append(len(data))
        return torch.stack(images), torch.tensor(sizes, dtype=torch.float64), label


@torch.no_grad()
def input_rate(teacher: nn.Module, spec: ModelSpec, samples: Sequence[tuple[str, int]], codec: str,
               qualities: Sequence[int], *, resize_size: int | None = None,
               device: str | torch.device = "auto", batch_size: int = 32, num_workers: int = -1,
               max_images: int | None = None) -> list[RatePoint]:
    """Accuracy of ``teacher`` on images sent with ``codec`` at each of ``qualities``.

    Each image is resized and centre-cropped as ``spec.transforms()`` does, then compressed,
    decompressed, normalized and classified; bytes are the compressed crop's size. The first
    point is the reference: the uncompressed RGB crop (S*S*3 bytes, setting ``raw``, label
    ``"<teacher> raw"``), whose accuracy is plain evaluation. PNG is lossless, so it gives
    one point (setting ``lossless``) whatever ``qualities`` holds; jpeg/webp points have
    settings ``q<quality>``. spec: the teacher's (or a model's) spec; labels name the
    teacher. max_images: see :func:`select_samples`.
    """
    label = spec.teacher.name
    check_image_codec(codec)
    if codec == "png":
        settings, sent = ["lossless"], [None]
    else:
        sent = list(dict.fromkeys(check_quality(q) for q in qualities))
        if not sent:
            raise HndError(f"no quality given for {codec}; give integers from 1 to 100")
        settings = [f"q{q}" for q in sent]
    teacher, device = _prepare(teacher, device)
    preprocessing = spec.preprocessing(resize_size)
    geometry, to_tensor = preprocessing.geometry(), preprocessing.to_tensor()
    dataset = _CodedImages(select_samples(samples, max_images), geometry, to_tensor, codec, sent)
    tallies = [_Tally() for _ in range(1 + len(sent))]
    for x, sizes, y in eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda"):
        x, y = x.to(device), y.to(device)  # x: [N, 1 + Q, 3, S, S]
        for i, tally in enumerate(tallies):
            tally.add(teacher(x[:, i].contiguous()), y, sizes[:, i].tolist())  # [N, 3, S, S]
    points = [tallies[0].point("input", f"{label} raw", "raw")]
    points += [t.point("input", f"{label} {codec}", s) for t, s in zip(tallies[1:], settings)]
    return points


def split_stages(spec: ModelSpec, teacher: nn.Module) -> list[str]:
    """Where ``teacher`` can be split for transmission. A paper family's staged teacher: its
    stages before the flatten that feeds the classifier. Any other teacher: the split points
    of its traced graph whose output is a tensor (:func:`hnd.tracing.split_points`, display
    names; ``hnd inspect TEACHER --split-points``)."""
    if spec.teacher.staged:
        names = [n for n, _ in teacher_stages(spec.teacher, teacher)]
        return names[:names.index("flatten")]
    shapes = traced_facts(spec.teacher, spec.input_size).shapes
    return [p.name for p in tracing.split_points(tracing.trace(teacher)) if shapes.get(p.name) is not None]


@torch.no_grad()
def teacher_split_rate(teacher: nn.Module, spec: ModelSpec, samples: Sequence[tuple[str, int]],
                       fmt: str = "int8+zlib", *, stages: Sequence[str] | None = None,
                       resize_size: int | None = None,
                       device: str | torch.device = "auto", batch_size: int = 32, num_workers: int = -1,
                       max_images: int | None = None) -> list[RatePoint]:
    """Accuracy and bytes of the unmodified teacher split after each of ``stages`` (default:
    every place of :func:`split_stages`), the tensor at the split point sent in ``fmt``.

    The head runs once per batch: after each split, the activation is sent and the rest of
    the teacher (the tail) runs on what was received. A staged teacher runs stage by stage;
    any other runs its traced graph node by node, each point's tail cut from the same graph.
    Points come in the teacher's order; label the teacher's name, setting the stage or split
    point. max_images: see :func:`select_samples`.
    """
    check_tensor_format(fmt)
    name = spec.teacher.name
    teacher, device = _prepare(teacher, device)
    valid = split_stages(spec, teacher)
    wanted = list(valid if stages is None else [stages] if isinstance(stages, str) else stages)
    unknown = [s for s in wanted if s not in valid]
    if unknown or not wanted:
        problem = f"unknown split stage {unknown[0]!r}" if unknown else "no split stage given"
        raise HndError(f"{problem} for {name}; valid: {', '.join(valid)}")
    chosen = [s for s in valid if s in wanted]  # the teacher's order
    walk = _stage_walk(spec, teacher, chosen) if spec.teacher.staged else _traced_walk(teacher, chosen)
    tallies = {s: _Tally() for s in chosen}
    dataset = ImageDataset(select_samples(samples, max_images), spec.transforms(resize_size=resize_size))
    for x, y in eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda"):
        y = y.to(device)

        def send(point: str, h: torch.Tensor, tail: nn.Module) -> None:
            # Called before the head goes on: in-place modules (ReLU) may overwrite h later.
            received, sizes = tensor_roundtrip(h, fmt)
            tallies[point].add(tail(received), y, sizes)

        walk(x.to(device), send)
    return [tallies[s].point("teacher_split", name, s) for s in chosen]


def _stage_walk(spec: ModelSpec, teacher: nn.Module, chosen: list[str]):
    """``walk(x, send)`` for a staged teacher: runs the stages up to the last chosen one and
    calls ``send(stage, activation, tail)`` after each chosen stage."""
    named = teacher_stages(spec.teacher, teacher)
    names = [n for n, _ in named]
    tails = {n: nn.Sequential(*[m for _, m in named[names.index(n) + 1:]]) for n in chosen}
    last = max(names.index(n) for n in chosen)

    def walk(h: torch.Tensor, send) -> None:
        for n, stage in named[:last + 1]:
            h = stage(h)  # activation after this stage, e.g. [N, C, H, W]
            if n in tails:
                send(n, h, tails[n])

    return walk


class _WalkDone(Exception):
    """Ends a traced walk after its last chosen split point."""


def _traced_walk(teacher: nn.Module, chosen: list[str]):
    """``walk(x, send)`` for a traced teacher: runs its graph node by node up to the last
    chosen split point and calls ``send(point, activation, tail)`` after each chosen one."""
    gm = tracing.trace(teacher)
    points = {p.node: (p.name, tracing.cut(gm, p)[1]) for p in tracing.split_points(gm) if p.name in chosen}
    last = [name for name, _ in points.values()][-1]

    def walk(h: torch.Tensor, send) -> None:
        def step(name, kind, module, thunk):
            out = thunk()
            hit = points.get(name.split(".", 1)[1])
            if hit is not None:
                send(hit[0], out, hit[1])
                if hit[0] == last:
                    raise _WalkDone
            return out

        try:
            tracing.NodeSteps(gm, "t", step).run(h)
        except _WalkDone:
            pass

    return walk
