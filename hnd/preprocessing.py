"""How an image becomes a network input at evaluation: the preprocessing a model's spec carries
(``spec.preprocessing()``, ``spec.transforms()``; cf. torchvision's ``Weights.transforms``).

:class:`Preprocessing` is plain data (shorter side resized to ``resize_size``, centre crop to
``input_size``, mean/std normalization), so that it can be saved beside an exported encoder and
read where torch is not installed. Its torchvision transforms are built on demand, for the two
image decoders: Pillow (``pil``: classic transforms on PIL images) and torchvision.io
(``torchvision``: ``transforms.v2`` on uint8 tensors).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hnd.errors import HndError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODERS = ("pil", "torchvision")  # who turns files into pixels: Pillow, or torchvision.io (uint8 tensors)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def transform_ops(decoder: str):
    """The transforms module for what a decoder returns: torchvision's classic transforms on PIL
    images (``pil``), ``transforms.v2`` on uint8 tensors (``torchvision``; its uint8 resize is the
    fast path). Both draw the same random numbers for a crop or flip."""
    if decoder not in DECODERS:
        raise HndError(f"unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    from torchvision import transforms
    from torchvision.transforms import v2
    return transforms if decoder == "pil" else v2


def normalize_steps(decoder: str, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list:
    """Pixels -> normalized float [3, H, W]."""
    import torch
    ops = transform_ops(decoder)
    to_float = ops.ToTensor() if decoder == "pil" else ops.ToDtype(torch.float32, scale=True)
    return [to_float, ops.Normalize(mean, std)]


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation preprocessing of one model at one input size."""

    input_size: int  # centre-crop side: the network's input is [3, input_size, input_size]
    resize_size: int  # the shorter side is resized to this first
    interpolation: str = "bilinear"  # of that resize
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def geometry(self, decoder: str = "pil"):
        """Resize the shorter side, then centre-crop (PIL -> PIL, or uint8 tensor -> tensor)."""
        ops = transform_ops(decoder)
        return ops.Compose([ops.Resize(self.resize_size, interpolation=ops.InterpolationMode(self.interpolation)),
                            ops.CenterCrop(self.input_size)])

    def to_tensor(self, decoder: str = "pil"):
        """Cropped pixels -> normalized float [3, S, S]."""
        return transform_ops(decoder).Compose(normalize_steps(decoder, self.mean, self.std))

    def transform(self, decoder: str = "pil"):
        """The whole evaluation transform: an image as ``decoder`` gives it -> [3, S, S]."""
        return transform_ops(decoder).Compose([*self.geometry(decoder).transforms,
                                               *self.to_tensor(decoder).transforms])

    def array(self, image) -> np.ndarray:
        """The evaluation transform with Pillow and numpy alone (an edge device without torch):
        a PIL image -> normalized float32 [3, S, S], the ``pil`` decoder's
        :meth:`transform` up to float rounding (the same resize, crop and arithmetic)."""
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)  # torchvision's rule
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
        image = image.resize(size, resample[self.interpolation])
        top, left = int(round((size[1] - self.input_size) / 2.0)), int(round((size[0] - self.input_size) / 2.0))
        image = image.crop((left, top, left + self.input_size, top + self.input_size))
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)  # [3, S, S]
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (pixels - mean) / std

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, doc: dict) -> Preprocessing:
        """Read :meth:`to_dict`'s output back; a damaged record is a one-line error."""
        try:
            made = cls(int(doc["input_size"]), int(doc["resize_size"]), str(doc["interpolation"]),
                       tuple(float(v) for v in doc["mean"]), tuple(float(v) for v in doc["std"]))
        except (KeyError, TypeError, ValueError):
            raise HndError(f"damaged preprocessing record {doc!r}; it needs input_size, resize_size, "
                           "interpolation, mean and std") from None
        if made.interpolation not in INTERPOLATIONS or len(made.mean) != 3 or len(made.std) != 3:
            raise HndError(f"damaged preprocessing record {doc!r}; interpolation is one of "
                           f"{', '.join(INTERPOLATIONS)} and mean/std have 3 values")
        return made
