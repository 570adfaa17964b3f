"""Wire format between an edge device and the server: versioned binary frames, never pickle.

Every frame starts with the same 8-byte prefix; all numbers are little-endian.

======  ====================  =========================================================
offset  field                 meaning
======  ====================  =========================================================
0       magic ``4s``          ``b"HND1"``
4       version ``u8``        :data:`VERSION` (1); another version is refused
5       type ``u8``           1 request, 2 result, 3 error
6       a ``u8``              request: tensor format code; result: top-k count k
7       b ``u8``              request: ndim (1..8); result: server batch size (max 255)
======  ====================  =========================================================

A **request** (edge device -> server) carries one image's bottleneck ``z`` [C, H, W]:

=============  ====================  ==================================================
offset         field                 meaning
=============  ====================  ==================================================
8              shape ``ndim × u32``  each dimension >= 1
8+4·ndim       min ``f32``           int8 formats: quantization minimum, else 0
12+4·ndim      scale ``f32``         int8 formats: quantization step, else 0
16+4·ndim      length ``u32``        payload bytes that follow
20+4·ndim      payload               the values (see below)
=============  ====================  ==================================================

Format codes: 1 ``fp32`` (4 bytes per value), 2 ``fp16`` (2 bytes), 3 ``int8`` (one code
0..255 per value, ``value ≈ min + code * scale``, the quantization of :mod:`hnd.codec`),
4 ``int8+zlib`` (the same codes compressed with zlib). For a [C, H, W] bottleneck the
header is 32 bytes; it never exceeds 52.

A **result** (server -> edge device): queue seconds ``f32`` at 8, compute seconds ``f32``
at 12, then k pairs (class index ``u32``, probability ``f32``) from 16, most likely first.
An **error**: message length ``u32`` at 8, then that many bytes of UTF-8 text.

Readers (:func:`read_frame`, :func:`read_frame_async`) check the magic, the version, the
type and every length against a size limit before reading or allocating what follows: a
frame, or a request's uncompressed codes, larger than ``max_bytes`` is refused unread.
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
import zlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import torch

from hnd.codec import check_tensor_format, decode_tensor, encode_tensor, tensor_bytes
from hnd.errors import HndError

MAGIC = b"HND1"
VERSION = 1
REQUEST, RESULT, ERROR = 1, 2, 3
FORMAT_CODES = {"fp32": 1, "fp16": 2, "int8": 3, "int8+zlib": 4}
MAX_NDIM = 8
MAX_ERROR_CHARS = 1000
DEFAULT_MAX_FRAME_BYTES = 16 << 20

_PREFIX = struct.Struct("<4sBBBB")  # magic, version, type, a, b
_QUANT = struct.Struct("<ff")  # min, scale
_U32 = struct.Struct("<I")
_TIMES = struct.Struct("<ff")  # queue s, compute s
_PAIR = struct.Struct("<If")  # class index, probability
_FORMAT_NAMES = {code: name for name, code in FORMAT_CODES.items()}
_ZLIB_LEVEL = 9


class FrameError(HndError):
    """Broken framing (bad magic or version, a length over the limit, a truncated frame):
    the stream cannot be resynchronized, so the connection must be closed."""


@dataclass(frozen=True)
class RequestHeader:
    """A request's header fields, read without touching the payload."""

    fmt: str | None  # None for an unknown format code
    shape: tuple[int, ...]
    qmin: float
    qscale: float
    payload: memoryview


@dataclass(frozen=True)
class Result:
    """The server's answer for one image."""

    topk: list[tuple[int, float]]  # (class index, probability), most likely first
    queue_s: float
    compute_s: float
    batch: int  # images decoded together with this one (capped at 255)


# --- requests ----------------------------------------------------------------------------------

def encode_request(z: torch.Tensor, fmt: str) -> bytes:
    """Frame one image's bottleneck ``z`` [C, H, W] (any 1..8 dims) in tensor format ``fmt``."""
    check_tensor_format(fmt)
    shape = tuple(z.shape)
    if not 1 <= len(shape) <= MAX_NDIM or min(shape) < 1:
        raise HndError(f"a request carries a tensor of 1 to {MAX_NDIM} non-empty dimensions, got shape {list(shape)}")
    qmin = qscale = 0.0
    if fmt in ("fp32", "fp16"):
        data = encode_tensor(z, fmt)
    else:
        data = encode_tensor(z, "int8")
        qmin, qscale = _QUANT.unpack_from(data)
        data = data[_QUANT.size:]
        if fmt == "int8+zlib":
            data = zlib.compress(data, _ZLIB_LEVEL)
    header = (_PREFIX.pack(MAGIC, VERSION, REQUEST, FORMAT_CODES[fmt], len(shape))
              + struct.pack(f"<{len(shape)}I", *shape) + _QUANT.pack(qmin, qscale) + _U32.pack(len(data)))
    return header + data


def request_header(frame: bytes) -> RequestHeader:
    """The fields of a complete request frame (as :func:`read_frame` returns it)."""
    view = memoryview(frame)
    _, _, kind, code, ndim = _check_prefix(view)
    if kind != REQUEST:
        raise HndError(f"expected a request frame, got type {kind}")
    shape = struct.unpack_from(f"<{ndim}I", view, _PREFIX.size)
    at = _PREFIX.size + 4 * ndim
    qmin, qscale = _QUANT.unpack_from(view, at)
    (length,) = _U32.unpack_from(view, at + _QUANT.size)
    payload = view[at + _QUANT.size + _U32.size:]
    if len(payload) != length:
        raise FrameError(f"request payload is {len(payload)} bytes but its header says {length}")
    return RequestHeader(_FORMAT_NAMES.get(code), tuple(shape), qmin, qscale, payload)


def decode_request(frame: bytes) -> tuple[torch.Tensor, str]:
    """(float32 tensor, format) of a complete request frame; damaged payloads raise HndError."""
    head = request_header(frame)
    if head.fmt is None:
        code = _PREFIX.unpack_from(frame)[3]
        raise HndError(f"unknown tensor format code {code}; valid: "
                       + ", ".join(f"{c} {n}" for n, c in FORMAT_CODES.items()))
    numel = math.prod(head.shape)
    data = bytes(head.payload)
    if head.fmt in ("int8", "int8+zlib"):
        if head.fmt == "int8+zlib":
            data = _inflate(data, numel)
        if not (math.isfinite(head.qmin) and math.isfinite(head.qscale)):
            raise HndError("int8 request has a non-finite quantization min or scale")
        data = _QUANT.pack(head.qmin, head.qscale) + data
        return decode_tensor(data, "int8", head.shape), head.fmt
    return decode_tensor(data, head.fmt, head.shape), head.fmt


def _inflate(data: bytes, numel: int) -> bytes:
    """zlib-decompress at most ``numel`` bytes: a small payload cannot expand without bound."""
    inflater = zlib.decompressobj()
    try:
        codes = inflater.decompress(data, numel + 1)
    except zlib.error as exc:
        raise HndError(f"cannot decompress the int8+zlib payload ({exc})") from None
    if len(codes) != numel or not inflater.eof or inflater.unused_data:
        raise HndError(f"int8+zlib payload does not hold exactly {numel} codes")
    return codes


# --- responses ---------------------------------------------------------------------------------

def encode_result(topk: Sequence[tuple[int, float]], queue_s: float, compute_s: float, batch: int = 1) -> bytes:
    """Frame the server's top-k (class index, probability) pairs and its queue/compute seconds."""
    if len(topk) > 255:
        raise HndError(f"a result carries at most 255 classes, got {len(topk)}")
    pairs = b"".join(_PAIR.pack(int(i), float(p)) for i, p in topk)
    return (_PREFIX.pack(MAGIC, VERSION, RESULT, len(topk), max(0, min(int(batch), 255)))
            + _TIMES.pack(queue_s, compute_s) + pairs)


def encode_error(message: str) -> bytes:
    """Frame an error message (one line, cut to :data:`MAX_ERROR_CHARS` characters)."""
    text = " ".join(str(message).split())[:MAX_ERROR_CHARS].encode("utf-8")
    return _PREFIX.pack(MAGIC, VERSION, ERROR, 0, 0) + _U32.pack(len(text)) + text


def decode_response(frame: bytes) -> Result:
    """The :class:`Result` of a complete response frame; an error frame raises HndError with the
    server's message."""
    view = memoryview(frame)
    _, _, kind, k, batch = _check_prefix(view)
    if kind == ERROR:
        (length,) = _U32.unpack_from(view, _PREFIX.size)
        text = bytes(view[_PREFIX.size + _U32.size:_PREFIX.size + _U32.size + length])
        raise HndError(f"server: {text.decode('utf-8', 'replace')}")
    if kind != RESULT:
        raise FrameError(f"expected a result or error frame, got type {kind}")
    if len(view) != _PREFIX.size + _TIMES.size + k * _PAIR.size:
        raise FrameError(f"result frame of {len(view)} bytes does not hold {k} classes")
    queue_s, compute_s = _TIMES.unpack_from(view, _PREFIX.size)
    topk = [_PAIR.unpack_from(view, _PREFIX.size + _TIMES.size + i * _PAIR.size) for i in range(k)]
    return Result([(int(i), float(p)) for i, p in topk], float(queue_s), float(compute_s), batch)


# --- reading frames from a stream --------------------------------------------------------------

def _check_prefix(prefix) -> tuple:
    if len(prefix) < _PREFIX.size:
        raise FrameError(f"frame of {len(prefix)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    fields = _PREFIX.unpack_from(prefix)
    if fields[0] != MAGIC:
        raise FrameError(f"bad magic {bytes(fields[0])!r}; expected {MAGIC!r} (not an hnd peer?)")
    if fields[1] != VERSION:
        raise FrameError(f"protocol version {fields[1]} is not supported; this side speaks {VERSION}")
    if fields[2] not in (REQUEST, RESULT, ERROR):
        raise FrameError(f"unknown frame type {fields[2]}")
    if fields[2] == REQUEST and not 1 <= fields[4] <= MAX_NDIM:
        raise FrameError(f"request ndim {fields[4]} is outside 1..{MAX_NDIM}")
    return fields


def _parser(max_bytes: int) -> Generator[int, bytes, bytes]:
    """Yields how many bytes it needs next and receives them; returns the whole frame. Every
    length is checked against ``max_bytes`` before it is asked for."""
    prefix = yield _PREFIX.size
    _, _, kind, a, b = _check_prefix(prefix)
    if kind == REQUEST:
        rest = yield 4 * b + _QUANT.size + _U32.size
        shape = struct.unpack_from(f"<{b}I", rest)
        (length,) = _U32.unpack_from(rest, 4 * b + _QUANT.size)
        if min(shape) < 1:
            raise FrameError(f"request shape {list(shape)} has an empty dimension")
        numel = math.prod(shape)
        total = _PREFIX.size + len(rest) + length
        if total > max_bytes or numel > max_bytes:
            raise FrameError(f"request of {total} bytes for shape {list(shape)} is over the "
                             f"{max_bytes}-byte limit")
        payload = (yield length) if length else b""
        return bytes(prefix) + bytes(rest) + bytes(payload)
    if kind == RESULT:
        body = yield _TIMES.size + a * _PAIR.size
        return bytes(prefix) + bytes(body)
    raw = yield _U32.size
    (length,) = _U32.unpack(raw)
    if _PREFIX.size + _U32.size + length > max_bytes:
        raise FrameError(f"error frame of {length} bytes is over the {max_bytes}-byte limit")
    text = (yield length) if length else b""
    return bytes(prefix) + bytes(raw) + bytes(text)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise FrameError(f"connection closed {got} bytes into a {n}-byte read")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Read one complete frame from a blocking socket (its timeout applies to each read)."""
    parser = _parser(max_bytes)
    need = next(parser)
    while True:
        try:
            need = parser.send(_recv_exactly(sock, need))
        except StopIteration as done:
            return done.value


async def read_frame_async(reader: asyncio.StreamReader, max_bytes: int = DEFAULT_MAX_FRAME_BYTES, *,
                           first_timeout: float | None = None, timeout: float | None = None) -> bytes | None:
    """Read one complete frame from an asyncio stream; ``None`` on a clean end of stream before a
    frame begins. ``first_timeout`` bounds the wait for a frame to start (idle), ``timeout``
    each later read; running out raises :class:`FrameError`."""
    parser = _parser(max_bytes)
    need = next(parser)
    first = True
    while True:
        try:
            data = await asyncio.wait_for(reader.readexactly(need), first_timeout if first else timeout)
        except asyncio.IncompleteReadError as exc:
            if first and not exc.partial:
                return None
            raise FrameError(f"connection closed {len(exc.partial)} bytes into a {need}-byte read") from None
        except asyncio.TimeoutError:
            raise FrameError("connection idle too long" if first else "timed out in the middle of a frame") from None
        first = False
        try:
            need = parser.send(data)
        except StopIteration as done:
            return done.value


def header_bytes(ndim: int) -> int:
    """Bytes a request adds to its payload: 20 + 4 per dimension (32 for [C, H, W])."""
    return _PREFIX.size + 4 * ndim + _QUANT.size + _U32.size


def request_bytes(shape: Sequence[int], fmt: str) -> int | None:
    """Bytes on the wire for one request of ``shape`` in ``fmt`` (``None`` for int8+zlib)."""
    size = tensor_bytes(shape, fmt)
    if size is None:
        return None
    return header_bytes(len(shape)) + size - (_QUANT.size if fmt == "int8" else 0)
