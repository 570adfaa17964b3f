"""Image files, and folders of them in the ImageNet layout (``ROOT/train/<class>/*.JPEG`` and
``ROOT/val/<class>/*.JPEG``): opened, checked and listed without torch, so that the commands
that only look at data (the book's runner checking ``--data``, ``hnd data check``) stay light."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from hnd.errors import HndError

SPLITS = ("train", "val")
# The file endings torchvision's ImageFolder takes (torchvision.datasets.folder.IMG_EXTENSIONS,
# torchvision 0.29); a test keeps the two equal.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_WNID = re.compile(r"^n\d{8}$")


@dataclass
class Layout:
    """A checked image folder: its root, class names (sorted = label order) and per-split files."""

    root: Path
    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]  # split -> [(path, label)]

    def counts(self) -> dict[str, int]:
        return {split: len(items) for split, items in self.samples.items()}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def check_layout(root: str | os.PathLike, splits: tuple[str, ...] = SPLITS) -> Layout:
    """Scan ``root`` and check it is an image folder in the ImageNet layout; every problem is
    a one-line error naming the path: a missing split, no classes, an empty class, classes
    that differ between splits, or a folder of ImageNet class ids with a count other than 1000."""
    root = Path(root)
    hint = f"expected {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG"
    if not root.is_dir():
        raise HndError(f"data folder not found: {root}" if not root.exists() else f"not a folder: {root}")
    classes: list[str] | None = None
    samples: dict[str, list[tuple[str, int]]] = {}
    for split in splits:
        folder = root / split
        if not folder.is_dir():
            raise HndError(f"{folder} is missing; {hint} (see `hnd data imagenet`, `hnd data synth`)")
        names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        if not names:
            raise HndError(f"{folder} has no class folders; {hint}")
        if classes is None:
            classes = names
        elif names != classes:
            only = sorted(set(names) ^ set(classes))
            raise HndError(f"{folder} has other classes than {root / splits[0]}: {', '.join(only[:5])}"
                           f"{' ...' if len(only) > 5 else ''} appear in only one of them")
        items = []
        for label, name in enumerate(classes):
            files = sorted(e.path for e in os.scandir(folder / name) if e.is_file() and _is_image(e.name))
            if not files:
                raise HndError(f"class folder {folder / name} holds no images ({', '.join(IMG_EXTENSIONS)})")
            items += [(path, label) for path in files]
        samples[split] = items
    if 2 * sum(bool(_WNID.match(c)) for c in classes) >= len(classes) and len(classes) != 1000:
        raise HndError(f"{root} looks like ImageNet (class folders are WordNet ids) but has {len(classes)} "
                       "classes, not 1000; is the extraction incomplete?")
    return Layout(root, classes, samples)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB; a missing or unreadable file raises a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise HndError(f"image not found: {path}" if not path.exists() else f"image is not a file: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise HndError(f"cannot read {path} as an image ({type(exc).__name__}); "
                       "use a file Pillow can open (JPEG, PNG, ...)") from None
