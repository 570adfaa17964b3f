"""A small generated image-classification dataset in the ImageNet folder layout.

Each class is a shape or texture drawn on a noisy background, with random colours (sometimes
low contrast), position, scale, rotation, pixel noise and distractor blobs. It stands in for
ImageNet on a CPU (tests, the book's default profile) so the same ``ImageFolder`` loading,
transforms and training code run unchanged. Every image is seeded from (seed, split, class,
index), so the same arguments give byte-identical files (with the same NumPy and Pillow).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from hnd.errors import HndError

_SUPERSAMPLE = 2  # shapes are drawn at twice the size and reduced, for smooth edges
_SPLIT_IDS = {"train": 0, "val": 1}
_JPEG_QUALITY = 90
SUMMARY_FILE = "synth.json"  # the generation settings, written inside the dataset folder
_MAX_GROWTH = 1.3  # width and height each lie in [image_size, image_size * _MAX_GROWTH]

Point = tuple[float, float]


def _placed(cx: float, cy: float, angle: float, points: list[Point]) -> list[Point]:
    """``points`` (relative to the centre) rotated by ``angle`` radians and moved to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _regular(n: int, radius: float, start: float = -math.pi / 2) -> list[Point]:
    """The corners of a regular ``n``-gon around the origin, the first at angle ``start`` (top)."""
    return [(radius * math.cos(start + 2 * math.pi * k / n), radius * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)]


# Each drawer paints one object of radius about ``r`` centred at (cx, cy) in 255 on an 'L' canvas,
# taking its random details (rotation, proportions, phase) from ``rng``.
def _circle(draw, cx, cy, r, rng):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)


def _ring(draw, cx, cy, r, rng):
    inner = r * rng.uniform(0.45, 0.65)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)


def _square(draw, cx, cy, r, rng):
    half = r * 0.85
    draw.polygon(_placed(cx, cy, rng.uniform(-0.25, 0.25), _regular(4, half * math.sqrt(2), math.pi / 4)),
                 fill=255)


def _diamond(draw, cx, cy, r, rng):
    aspect = rng.uniform(1.2, 1.5)  # taller than wide, so it is not just a turned square
    points = [(0, -r), (r / aspect, 0), (0, r), (-r / aspect, 0)]
    draw.polygon(_placed(cx, cy, rng.uniform(-0.2, 0.2), points), fill=255)


def _triangle(draw, cx, cy, r, rng):
    draw.polygon(_placed(cx, cy + r * 0.2, rng.uniform(-0.35, 0.35), _regular(3, r * 1.1)), fill=255)


def _star(draw, cx, cy, r, rng):
    inner = rng.uniform(0.38, 0.5)
    points = [(x * (1 if k % 2 == 0 else inner), y * (1 if k % 2 == 0 else inner))
              for k, (x, y) in enumerate(_regular(10, r))]
    draw.polygon(_placed(cx, cy, rng.uniform(0, 2 * math.pi), points), fill=255)


def _cross(draw, cx, cy, r, rng):
    a = r * rng.uniform(0.28, 0.4)
    arms = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r),
            (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
    draw.polygon(_placed(cx, cy, rng.uniform(-0.3, 0.3), arms), fill=255)


def _stripes(draw, cx, cy, r, rng):
    period, angle, phase = r * rng.uniform(0.45, 0.65), rng.uniform(0, math.pi), rng.uniform(0, 1)
    reach = r * 1.5
    for k in range(-math.ceil(reach / period) - 1, math.ceil(reach / period) + 1):
        u = (k + phase) * period
        draw.polygon(_placed(cx, cy, angle, [(u, -reach), (u + period / 2, -reach),
                                             (u + period / 2, reach), (u, reach)]), fill=255)


def _checker(draw, cx, cy, r, rng):
    cell, angle = r * rng.uniform(0.4, 0.6), rng.uniform(0, math.pi / 2)
    n = math.ceil(r * 1.5 / cell)
    for i in range(-n, n):
        for j in range(-n, n):
            if (i + j) % 2 == 0:
                square = [(i * cell, j * cell), ((i + 1) * cell, j * cell),
                          ((i + 1) * cell, (j + 1) * cell), (i * cell, (j + 1) * cell)]
                draw.polygon(_placed(cx, cy, angle, square), fill=255)


def _dots(draw, cx, cy, r, rng):
    period, angle = r * rng.uniform(0.5, 0.7), rng.uniform(0, math.pi / 2)
    radius = period * rng.uniform(0.22, 0.32)
    n = math.ceil(r * 1.5 / period)
    grid = [(i * period, j * period) for i in range(-n, n + 1) for j in range(-n, n + 1)]
    for x, y in _placed(cx, cy, angle, grid):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)


_SHAPES = {"circle": _circle, "ring": _ring, "square": _square, "diamond": _diamond,
           "triangle": _triangle, "star": _star, "cross": _cross}
_TEXTURES = {"stripes": _stripes, "checker": _checker, "dots": _dots}

SYNTH_CLASSES: tuple[str, ...] = tuple(sorted({**_SHAPES, **_TEXTURES}))
"""The class names in label order (sorted, as ``ImageFolder`` numbers them)."""


def _mask(name: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """The object of class ``name`` as a soft 'L' mask: a shape, or a texture inside a disk
    or a turned square patch (so the outline alone does not tell textures from shapes)."""
    w, h = size[0] * _SUPERSAMPLE, size[1] * _SUPERSAMPLE
    side = min(w, h)
    r = side * rng.uniform(0.3, 0.4)
    margin = r * 1.05 + side * 0.04
    cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
    mask = Image.new("L", (w, h), 0)
    if name in _SHAPES:
        _SHAPES[name](ImageDraw.Draw(mask), cx, cy, r, rng)
    else:
        _TEXTURES[name](ImageDraw.Draw(mask), cx, cy, r, rng)
        patch = Image.new("L", (w, h), 0)
        if rng.random() < 0.5:
            _circle(ImageDraw.Draw(patch), cx, cy, r, rng)
        else:
            ImageDraw.Draw(patch).polygon(
                _placed(cx, cy, rng.uniform(0, math.pi / 2), _regular(4, r * 1.1, math.pi / 4)), fill=255)
        mask = ImageChops.multiply(mask, patch)
    return mask.reduce(_SUPERSAMPLE)


def _blotches(rng: np.random.Generator, size: tuple[int, int], base: np.ndarray,
              amplitude: float) -> np.ndarray:
    """A smooth random colour field around ``base`` (float32, height × width × 3)."""
    k = int(rng.integers(2, 7))
    small = np.clip(base + rng.uniform(-amplitude, amplitude, (k, k, 3)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), dtype=np.float32)


def _foreground_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A colour far from ``background``, or, one time in ten, only a little different."""
    low_contrast = rng.random() < 0.1
    while True:
        if low_contrast:
            step = rng.normal(size=3)
            colour = np.clip(background + step / np.linalg.norm(step) * rng.uniform(25, 50), 0, 255)
        else:
            colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - background) >= (20 if low_contrast else 90):
            return colour


def render(name: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class ``name``, all randomness drawn from ``rng``."""
    size = tuple(int(v) for v in rng.integers(image_size, round(image_size * _MAX_GROWTH) + 1, 2))
    background = rng.uniform(0, 255, 3)
    foreground = _foreground_colour(rng, background)
    mask = np.asarray(_mask(name, size, rng), dtype=np.float32)[..., None] / 255
    pixels = (_blotches(rng, size, background, rng.uniform(10, 50)) * (1 - mask)
              + _blotches(rng, size, foreground, rng.uniform(5, 25)) * mask)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 3))):  # distractors: small blobs anywhere
        br = min(size) * rng.uniform(0.04, 0.09)
        bx, by = rng.uniform(br, size[0] - br), rng.uniform(br, size[1] - br)
        draw.ellipse([bx - br, by - br * rng.uniform(0.6, 1.4), bx + br, by + br],
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 10), (size[1], size[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        valid = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise HndError(f"synthetic dataset: {name} must be an integer {valid}, got {value!r}")


def write_synthetic_dataset(out: str | os.PathLike, *, classes: int = 10, train_per_class: int = 100,
                            val_per_class: int = 20, image_size: int = 72, seed: int = 0,
                            progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ``out/{train,val}/<class>/<class>_<index:05d>.JPEG`` for the first ``classes`` of
    SYNTH_CLASSES and return a summary (root, classes, counts per split, image_size, seed).

    The images are written to a hidden sibling folder renamed to ``out`` at the end, so ``out``
    is either complete or absent; an existing non-empty ``out`` is an error, never overwritten.
    ``progress(n_done, n_total)`` is called after each image.
    """
    _check_int("classes", classes, 2, len(SYNTH_CLASSES))
    _check_int("train_per_class", train_per_class, 1)
    _check_int("val_per_class", val_per_class, 1)
    _check_int("image_size", image_size, 32)
    _check_int("seed", seed, 0)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HndError(f"{out} already exists; choose another --out or delete it")
    names = list(SYNTH_CLASSES[:classes])
    per_class = {"train": train_per_class, "val": val_per_class}
    total, done = classes * (train_per_class + val_per_class), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    summary = {"classes": names, "counts": {s: classes * n for s, n in per_class.items()},
               "image_size": image_size, "seed": seed}
    try:
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        for split, count in per_class.items():
            for label, name in enumerate(names):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for index in range(count):
                    rng = np.random.default_rng([seed, _SPLIT_IDS[split], label, index])
                    image = render(name, image_size, rng)
                    image.save(folder / f"{name}_{index:05d}.JPEG", quality=_JPEG_QUALITY)
                    done += 1
                    if progress is not None:
                        progress(done, total)
        try:
            os.replace(tmp, out)  # fails if something appeared in ``out`` meanwhile
        except OSError as e:
            raise HndError(f"{out} already exists; choose another --out or delete it "
                           f"({e.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"root": str(out), **summary}


def ensure_synthetic_dataset(out: str | os.PathLike, *, classes: int = 10, train_per_class: int = 100,
                             val_per_class: int = 20, image_size: int = 72, seed: int = 0) -> dict:
    """Like :func:`write_synthetic_dataset`, but reuse ``out`` if it already holds the dataset
    these arguments generate (checked against its ``synth.json``); anything else there is an error."""
    out = Path(out)
    summary_file = out / SUMMARY_FILE
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return write_synthetic_dataset(out, classes=classes, train_per_class=train_per_class,
                                       val_per_class=val_per_class, image_size=image_size, seed=seed)
    if not summary_file.is_file():
        raise HndError(f"{out} exists but is not a generated dataset (no {SUMMARY_FILE}); delete it or choose "
                       f"another folder")
    saved = json.loads(summary_file.read_text())
    wanted = {"classes": list(SYNTH_CLASSES[:classes]),
              "counts": {"train": classes * train_per_class, "val": classes * val_per_class},
              "image_size": image_size, "seed": seed}
    if saved != wanted:
        diff = ", ".join(f"{k}: {saved.get(k)} there, {v} wanted" for k, v in wanted.items() if saved.get(k) != v)
        raise HndError(f"{out} holds a generated dataset with other settings ({diff}); delete it or choose "
                       f"another folder")
    return {"root": str(out), **saved}
