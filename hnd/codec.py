"""Bytes on the wire: how an edge device serializes one image's tensor or the image itself.

Tensors (a bottleneck ``z`` or any intermediate activation) are sent per image in one of
:data:`TENSOR_FORMATS`:

- ``fp32`` / ``fp16``: the raw little-endian values (4 / 2 bytes per element).
- ``int8``: per-tensor affine quantization to the codes 0..255 with the tensor's own min and
  max; the payload is two little-endian float32 (min, scale) followed by one byte per element,
  and ``value ≈ min + code * scale`` (error at most ``scale / 2``).
- ``int8+zlib``: the ``int8`` bytes compressed losslessly with zlib, level 9.

An entropic student's bottleneck has one more format, :data:`ENTROPY_FORMAT` (``entropy``),
which needs the model's entropy tables on both sides (:func:`encode_coded`,
:func:`decode_coded`): the CRC-32 of the symbols (``u32``) followed by the range-coded
symbols of :mod:`hnd.entropy` (whole 32-bit words). The checksum turns a truncated or damaged
payload, or one coded with other tables, into an error instead of a wrong answer.

Images are sent in one of :data:`IMAGE_CODECS` (Pillow's JPEG, WebP and PNG encoders).
The receiver must know the tensor's shape and format; they are fixed by the model and the
protocol, so nothing but the values travels.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np
import PIL.features
import torch
from PIL import Image, UnidentifiedImageError

from hnd.entropy import FactorizedPrior, decode_symbols, encode_symbols, from_symbols, to_symbols
from hnd.errors import HndError

TENSOR_FORMATS = ("fp32", "fp16", "int8", "int8+zlib")
ENTROPY_FORMAT = "entropy"  # range-coded with an entropic student's tables
_CHECKSUM = struct.Struct("<I")
IMAGE_CODECS = ("jpeg", "webp", "png")

_QUANT_HEADER = struct.Struct("<ff")  # min, scale
_LEVELS = 255  # int8 codes are 0..255
_ZLIB_LEVEL = 9
_PIL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}


# --- tensors -------------------------------------------------------------------------------

def check_tensor_format(fmt: str) -> str:
    """Return ``fmt`` if it is one of :data:`TENSOR_FORMATS`, else raise a one-line error."""
    if fmt not in TENSOR_FORMATS:
        raise HndError(f"unknown tensor format {fmt!r}; valid: {', '.join(TENSOR_FORMATS)}")
    return fmt


def tensor_bytes(shape: Sequence[int], fmt: str) -> int | None:
    """Bytes that one tensor of ``shape`` takes in ``fmt``; ``None`` for ``int8+zlib``, whose
    size depends on the values."""
    numel = math.prod(shape)
    return {"fp32": 4 * numel, "fp16": 2 * numel, "int8": numel + _QUANT_HEADER.size,
            "int8+zlib": None}[check_tensor_format(fmt)]


def _quantize(values: np.ndarray) -> bytes:
    """float32 values -> header (min, scale) + one uint8 code per value."""
    if values.size == 0:
        return _QUANT_HEADER.pack(0.0, 1.0)
    lo, hi = float(values.min()), float(values.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise HndError("int8 quantization needs finite values, but the tensor holds inf or nan; "
                       "use fp32 or fp16")
    # Both numbers travel as float32, so quantize with exactly the values the receiver sees.
    lo32 = np.float32(lo)
    scale = np.float32((hi - lo) / _LEVELS)
    if scale == 0 or not np.isfinite(scale):  # a constant tensor: every code is 0
        scale = np.float32(1.0)
    codes = np.clip(np.rint((values - lo32) / scale), 0, _LEVELS).astype(np.uint8)
    return _QUANT_HEADER.pack(lo32, scale) + codes.tobytes()


def _dequantize(data: bytes, numel: int) -> np.ndarray:
    lo, scale = _QUANT_HEADER.unpack_from(data)
    codes = np.frombuffer(data, dtype=np.uint8, count=numel, offset=_QUANT_HEADER.size)
    return np.float32(lo) + codes.astype(np.float32) * np.float32(scale)


def encode_tensor(z: torch.Tensor, fmt: str) -> bytes:
    """Serialize one image's tensor (any shape, e.g. [C, H, W]) in ``fmt``."""
    check_tensor_format(fmt)
    values = z.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1)
    if fmt == "fp32":
        return values.astype("<f4", copy=False).tobytes()
    if fmt == "fp16":
        return values.astype("<f2").tobytes()
    payload = _quantize(values)
    return payload if fmt == "int8" else zlib.compress(payload, _ZLIB_LEVEL)


def decode_tensor(data: bytes, fmt: str, shape: Sequence[int]) -> torch.Tensor:
    """The float32 tensor of ``shape`` that ``encode_tensor(z, fmt)`` produced ``data`` from."""
    check_tensor_format(fmt)
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if fmt == "int8+zlib":
        try:
            data = zlib.decompress(data)
        except zlib.error as exc:
            raise HndError(f"cannot decompress an int8+zlib tensor ({exc}); the bytes are damaged "
                           "or in another format") from None
        fmt = "int8"
    expected = tensor_bytes(shape, fmt)
    if len(data) != expected:
        raise HndError(f"a {fmt} tensor of shape {list(shape)} takes {expected} bytes, got {len(data)}")
    if fmt == "int8":
        values = _dequantize(data, numel)
    else:
        values = np.frombuffer(data, dtype="<f4" if fmt == "fp32" else "<f2").astype(np.float32)
    return torch.from_numpy(values.reshape(shape))


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
    """One image's bottleneck ``z`` [C, H, W] in the ``entropy`` format: rounded, clamped
    into the coded range, range-coded with ``prior``'s tables, behind a CRC-32 of the symbols."""
    symbols = to_symbols(prior, z)  # [C, H*W]
    return _CHECKSUM.pack(zlib.crc32(symbols.tobytes())) + encode_symbols(prior, symbols)


def decode_coded(prior: FactorizedPrior, data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """The rounded bottleneck [C, H, W] (float32) that :func:`encode_coded` wrote; decoding
    work is bounded by the shape, and damaged data raises a one-line :class:`HndError`."""
    channels, h, w = (int(s) for s in shape)
    if channels != prior.channels:
        raise HndError(f"an entropy-coded tensor of {channels} channels does not fit this model's {prior.channels}")
    if len(data) < _CHECKSUM.size:
        raise HndError(f"an entropy-coded payload starts with a {_CHECKSUM.size}-byte checksum, got {len(data)} bytes")
    (checksum,) = _CHECKSUM.unpack_from(data)
    symbols = decode_symbols(prior, data[_CHECKSUM.size:], h * w)
    if zlib.crc32(symbols.tobytes()) != checksum:
        raise HndError("entropy-coded payload fails its checksum (damaged, truncated, or coded with another "
                       "model's tables)")
    return from_symbols(prior, symbols, (channels, h, w))


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
