"""A small generated image-classification dataset in the ImageNet folder layout.

Each class is one of five shapes filled with one of two fine textures (``star-stripes``,
``circle-spots``, ...), so telling classes apart needs both the outline and the texture, as on
ImageNet, never the colour: every image draws its colours at random. The object, shaded and
grainy, lies on a background of coloured fractal noise whose power falls with spatial
frequency as in photographs, then the whole image is slightly blurred and gets sensor noise.
At the book's resolution its JPEG and WebP sizes and its power spectrum match those of real
photographs (measured in :mod:`hnd.book.photographs`). It stands in for ImageNet on a CPU
(tests, the book's default profile), so the same ``ImageFolder`` loading, transforms and
training code run unchanged. Every image is seeded from (seed, split, class, index), so the
same arguments give byte-identical files (with the same NumPy and Pillow).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from hnd.errors import HndError

_SUPERSAMPLE = 2  # outlines and textures are drawn at twice the size and reduced, for smooth edges
_SPLIT_IDS = {"train": 0, "val": 1}
_JPEG_QUALITY = 90
SUMMARY_FILE = "synth.json"  # the generation settings, written inside the dataset folder
_MAX_GROWTH = 1.3  # width and height each lie in [image_size, image_size * _MAX_GROWTH]
SPECTRAL_SLOPE = 2.8  # the noise fields' power falls as 1 / frequency ** SPECTRAL_SLOPE
_TEXTURE_PERIOD = (5.0, 8.0)  # pixels per stripe or dot period, in the stored image

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
# taking its random details (rotation, proportions) from ``rng``.
def _circle(draw, cx, cy, r, rng):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)


def _square(draw, cx, cy, r, rng):
    half = r * 0.85
    draw.polygon(_placed(cx, cy, rng.uniform(-0.25, 0.25), _regular(4, half * math.sqrt(2), math.pi / 4)),
                 fill=255)


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


def _stripes(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.sin(2 * math.pi * (u + rng.uniform())) > 0


def _spots(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round spots on a jittered lattice: one per period cell, each moved at random within it,
    so the texture has a scale but, unlike stripes, no orientation and no strict period."""
    iu, iv = np.round(u).astype(int), np.round(v).astype(int)
    jitter = rng.uniform(-0.2, 0.2, (iu.max() - iu.min() + 1, iv.max() - iv.min() + 1, 2))
    offset = jitter[iu - iu.min(), iv - iv.min()]
    return (u - iu - offset[..., 0]) ** 2 + (v - iv - offset[..., 1]) ** 2 < rng.uniform(0.22, 0.28) ** 2


_SHAPES = {"circle": _circle, "cross": _cross, "square": _square, "star": _star, "triangle": _triangle}
# A texture maps coordinates in units of its period (u across, v along) to where it is dark.
_TEXTURES = {"spots": _spots, "stripes": _stripes}

SYNTH_CLASSES: tuple[str, ...] = tuple(sorted(f"{shape}-{texture}" for shape in _SHAPES for texture in _TEXTURES))
"""The class names in label order (sorted, as ``ImageFolder`` numbers them): shape-texture."""


def fractal_noise(rng: np.random.Generator, height: int, width: int, channels: int = 1,
                  slope: float = SPECTRAL_SLOPE) -> np.ndarray:
    """Gaussian noise fields (channels × height × width) whose power spectrum falls as
    1 / frequency ** ``slope``, each with zero mean and unit standard deviation."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = 1
    amplitude = frequency ** (-slope / 2)
    amplitude[0, 0] = 0
    shape = (channels, height, fx.shape[1])
    spectrum = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) * amplitude
    field = np.fft.irfft2(spectrum, s=(height, width))
    field -= field.mean(axis=(1, 2), keepdims=True)
    return field / field.std(axis=(1, 2), keepdims=True)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A coloured fractal field (height × width × 3, float): mostly brightness, some hue."""
    field = fractal_noise(rng, height, width, 3)
    brightness = field[0] * rng.uniform(15, 35)
    a, b = field[1] * rng.uniform(3, 12), field[2] * rng.uniform(3, 12)  # two colour-opponent axes
    return rng.uniform(30, 225, 3) + brightness[..., None] + np.stack([a, b, -a - b], axis=-1)


def _reduce(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float32)[..., None] / 255


def _object(name: str, rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The object of class ``name``: its soft mask and its pixels (height × width × 1 and × 3)."""
    shape, texture = name.split("-")
    w, h = width * _SUPERSAMPLE, height * _SUPERSAMPLE
    side = min(w, h)
    r = side * rng.uniform(0.33, 0.42)
    margin = r * 1.05 + side * 0.04
    cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
    outline = Image.new("L", (w, h), 0)
    _SHAPES[shape](ImageDraw.Draw(outline), cx, cy, r, rng)
    # The texture in the object's own frame: a random period and orientation.
    period = rng.uniform(*_TEXTURE_PERIOD) * _SUPERSAMPLE
    angle = rng.uniform(0, math.pi)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u = ((x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)) / period
    v = ((y - cy) * math.cos(angle) - (x - cx) * math.sin(angle)) / period
    pattern = _reduce(Image.fromarray(_TEXTURES[texture](u, v, rng).astype(np.uint8) * 255))
    light = rng.uniform(0, 255, 3)
    dark = np.clip(light + rng.normal(size=3) * 40 + rng.choice([-1, 1]) * rng.uniform(80, 140), 0, 255)
    grain = fractal_noise(rng, height, width)[0][..., None] * rng.uniform(8, 20)
    gy, gx = np.mgrid[0:height, 0:width]
    towards = rng.uniform(0, 2 * math.pi)  # shading: lit from one side
    shade = ((gx - cx / _SUPERSAMPLE) * math.cos(towards) + (gy - cy / _SUPERSAMPLE) * math.sin(towards))
    shade = shade / (r / _SUPERSAMPLE) * rng.uniform(0, 25)
    pixels = light * (1 - pattern) + dark * pattern + grain + shade[..., None]
    return _reduce(outline), pixels


def render(name: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class ``name``, all randomness drawn from ``rng``."""
    width, height = (int(v) for v in rng.integers(image_size, round(image_size * _MAX_GROWTH) + 1, 2))
    background = _background(rng, width, height)
    mask, pixels = _object(name, rng, width, height)
    image = background * (1 - mask) + pixels * mask
    image += rng.normal(0, rng.uniform(1, 3), image.shape)  # sensor noise
    image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.45)))  # optics: never perfectly sharp


def _check_int(name: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        valid = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise HndError(f"synthetic dataset: {name} must be an integer {valid}, got {value!r}")


def write_synthetic_dataset(out: str | os.PathLike, *, classes: int = 10, train_per_class: int = 100,
                            val_per_class: int = 20, image_size: int = 72, seed: int = 0,
                            progress: Callable[[int, int], None] | None = None,
                            processes: int | None = None) -> dict:
    """Write ``out/{train,val}/<class>/<class>_<index:05d>.JPEG`` for the first ``classes`` of
    SYNTH_CLASSES and return a summary (root, classes, counts per split, image_size, seed).

    The images are written to a hidden sibling folder renamed to ``out`` at the end, so ``out``
    is either complete or absent; an existing non-empty ``out`` is an error, never overwritten.
    One class folder per task, on ``processes`` processes (None: one per core); the files are
    the same for any number. ``progress(n_done, n_total)`` is called after each class folder.
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
    folders = [(tmp / split / name, split, label, name, count, image_size, seed)
               for split, count in per_class.items() for label, name in enumerate(names)]
    processes = min(len(folders), processes or os.cpu_count() or 1)
    pool = ProcessPoolExecutor(processes) if processes > 1 else None
    try:
        try:
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
            for written in (pool.map if pool else map)(_write_class_folder, folders):  # in order
                done += written
                if progress is not None:
                    progress(done, total)
        finally:
            if pool is not None:  # after a failure: the folders being written finish before the cleanup
                pool.shutdown(cancel_futures=True)
        try:
            os.replace(tmp, out)  # fails if something appeared in ``out`` meanwhile
        except OSError as e:
            raise HndError(f"{out} already exists; choose another --out or delete it "
                           f"({e.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"root": str(out), **summary}


def _write_class_folder(job: tuple) -> int:
    """Render one class folder of one split; returns the number of images written."""
    folder, split, label, name, count, image_size, seed = job
    folder.mkdir(parents=True)
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], label, index])
        render(name, image_size, rng).save(folder / f"{name}_{index:05d}.JPEG", quality=_JPEG_QUALITY)
    return count


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
