"""One image's tensor as bytes, on numpy arrays: the formats both sides of the wire share.

The edge device imports this module without torch (an exported encoder gives numpy arrays);
:mod:`hnd.codec` wraps it for torch tensors, so every format has one definition:

- ``fp32`` / ``fp16``: the raw little-endian values (4 / 2 bytes per element).
- ``int8``: per-tensor affine quantization to the codes 0..255 with the tensor's own min and
  max; the payload is two little-endian float32 (min, scale) followed by one byte per element,
  and ``value ≈ min + code * scale`` (error at most ``scale / 2``).
- ``int8+zlib``: the ``int8`` bytes compressed losslessly with zlib, level 9.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from hnd.errors import HndError

TENSOR_FORMATS = ("fp32", "fp16", "int8", "int8+zlib")
_QUANT_HEADER = struct.Struct("<ff")  # min, scale
_LEVELS = 255  # int8 codes are 0..255
_ZLIB_LEVEL = 9


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


def encode_array(values: np.ndarray, fmt: str) -> bytes:
    """Serialize one image's tensor (any shape, e.g. [C, H, W], any float dtype) in ``fmt``."""
    check_tensor_format(fmt)
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if fmt == "fp32":
        return values.astype("<f4", copy=False).tobytes()
    if fmt == "fp16":
        return values.astype("<f2").tobytes()
    payload = _quantize(values)
    return payload if fmt == "int8" else zlib.compress(payload, _ZLIB_LEVEL)


def decode_array(data: bytes, fmt: str, shape: Sequence[int]) -> np.ndarray:
    """The float32 array of ``shape`` that ``encode_array(values, fmt)`` produced ``data`` from."""
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
    return values.reshape(shape)
