"""Bytes on the wire: how an edge device serializes one image's tensor or the image itself.

Tensors (a bottleneck ``z`` or any intermediate activation) are sent per image in one of
:data:`TENSOR_FORMATS` (fp32, fp16, int8, int8+zlib), defined once on numpy arrays in
:mod:`hnd.tensor_codec`, which an edge device imports without torch; the functions here take
and give torch tensors.

An entropic student's bottleneck has one more format, ``entropy``,
which needs the model's entropy tables on both sides (:func:`encode_coded`,
:func:`decode_coded`; defined in :mod:`hnd.range_coder`).

Images are sent in one of :data:`IMAGE_CODECS` (Pillow's JPEG, WebP and PNG encoders).
The receiver must know the tensor's shape and format; they are fixed by the model and the
protocol, so nothing but the values travels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import PIL.features
import torch
from PIL import Image, UnidentifiedImageError

from hnd.entropy import FactorizedPrior, require_tables
from hnd.errors import HndError
from hnd.tensor_codec import check_tensor_format, decode_array, encode_array

IMAGE_CODECS = ("jpeg", "webp", "png")
_PIL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}


# --- tensors -------------------------------------------------------------------------------

def encode_tensor(z: torch.Tensor, fmt: str) -> bytes:
    """Serialize one image's tensor (any shape, e.g. [C, H, W]) in ``fmt``."""
    return encode_array(z.detach().to("cpu", torch.float32).numpy(), fmt)


def decode_tensor(data: bytes, fmt: str, shape: Sequence[int]) -> torch.Tensor:
    """The float32 tensor of ``shape`` that ``encode_tensor(z, fmt)`` produced ``data`` from."""
    return torch.from_numpy(decode_array(data, fmt, shape))


def tensor_roundtrip(z: torch.Tensor, fmt: str) -> tuple[torch.Tensor, list[int]]:
    """Send every image of the batch ``z`` [N, ...] on its own, as a device would: returns the
    decoded batch (float32, on ``z``'s device) and the bytes of each image."""
    check_tensor_format(fmt)
    decoded, sizes = [], []
    for item in z:  # [...] per image
        data = encode_tensor(item, fmt)
        sizes.append(len(data))
        decoded.append(decode_tensor(data, fmt, item.shape))
    if not decoded:
        return z.detach().float().clone(), sizes
    return torch.stack(decoded).to(z.device), sizes  # [N, ...]


def encode_coded(prior: FactorizedPrior, z: torch.Tensor) -> bytes:
    """One image's bottleneck ``z`` [C, H, W] in the ``entropy`` format
    (:meth:`hnd.range_coder.CodingTables.encode` with ``prior``'s tables)."""
    return require_tables(prior).encode(z.detach().to("cpu", torch.float32).numpy())


def decode_coded(prior: FactorizedPrior, data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """The rounded bottleneck [C, H, W] (float32) that :func:`encode_coded` wrote; decoding
    work is bounded by the shape, and damaged data raises a one-line :class:`HndError`."""
    return torch.from_numpy(require_tables(prior).decode(data, shape))


def coded_roundtrip(prior: FactorizedPrior, z: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Like :func:`tensor_roundtrip` in the ``entropy`` format: every image of ``z`` [N, C, H, W]
    coded and decoded on its own; returns the decoded batch (on ``z``'s device) and the bytes."""
    decoded, sizes = [], []
    for item in z:  # [C, H, W]
        data = encode_coded(prior, item)
        sizes.append(len(data))
        decoded.append(decode_coded(prior, data, item.shape))
    if not decoded:
        return z.detach().float().clone(), sizes
    return torch.stack(decoded).to(z.device), sizes


# --- images --------------------------------------------------------------------------------

def check_image_codec(codec: str) -> str:
    """Return ``codec`` if it is one of :data:`IMAGE_CODECS` and Pillow can write it."""
    if codec not in IMAGE_CODECS:
        raise HndError(f"unknown image codec {codec!r}; valid: {', '.join(IMAGE_CODECS)}")
    if codec == "webp" and not PIL.features.check("webp"):
        raise HndError("this Pillow was built without WebP support; use jpeg or png, or install a "
                       "Pillow with libwebp")
    return codec


def check_quality(quality: object) -> int:
    """Return ``quality`` if it is an integer from 1 to 100, else raise a one-line error."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise HndError(f"image quality must be an integer from 1 to 100, got {quality!r}")
    return quality


def encode_image(img: Image.Image, codec: str, quality: int | None = None) -> bytes:
    """Compress an image with ``codec``. ``quality`` (1..100) applies to jpeg and webp;
    ``None`` takes Pillow's default (75 for JPEG, 80 for WebP). PNG is lossless and ignores it."""
    check_image_codec(codec)
    options: dict = {}
    if codec == "png":
        options["compress_level"] = 9
    elif quality is not None:
        options["quality"] = check_quality(quality)
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, _PIL_FORMATS[codec], **options)
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Decompress image bytes of any codec Pillow reads into an RGB image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise HndError(f"cannot decode {len(data)} bytes as an image ({type(exc).__name__}); "
                       f"expected {', '.join(IMAGE_CODECS)} data") from None
