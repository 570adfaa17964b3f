"""Images in, tensors out: the evaluation transform of each model and safe image loading."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from hnd.errors import HndError
from hnd.models import resolve
from hnd.teachers import teacher_spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(name: str) -> transforms.Compose:
    """The original's evaluation transform for model ``name``: shorter side to 256 (327 for
    Inception-v3, bilinear), centre crop 224 (299), ImageNet mean/std normalization."""
    spec = teacher_spec(resolve(name)[0])
    return transforms.Compose([
        transforms.Resize(spec.resize_size, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(spec.input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


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


def image_tensor(name: str, path: str | os.PathLike) -> torch.Tensor:
    """Image file -> normalized batch of one, [1, 3, S, S], for model ``name``."""
    return eval_transform(name)(load_image(path)).unsqueeze(0)
