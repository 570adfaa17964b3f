"""Wire format between an edge device and the server: versioned binary frames, never pickle.

Every frame starts with the same 8-byte prefix; all numbers are little-endian.

======  ====================  =========================================================
offset  field                 meaning
======  ====================  =========================================================
0       magic ``4s``          ``b"HND1"``
4       version ``u8``        1, 2 or 3 (:data:`VERSIONS`); another version is refused
5       type ``u8``           1 request, 2 result, 3 error, 4 hello (version 3)
6       a ``u8``              request: tensor format code; result: top-k count k;
                              error: code (0 refused, 1 busy, 2 not authorized)
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

Format codes (the coding type): 1 ``fp32`` (4 bytes per value), 2 ``fp16`` (2 bytes),
3 ``int8`` (one code 0..255 per value, ``value ≈ min + code * scale``, the quantization of
:mod:`hnd.codec`), 4 ``int8+zlib`` (the same codes compressed with zlib), and since version 2
5 ``entropy``: an entropic student's rounded bottleneck, range-coded with the coding tables of
its checkpoint (the ``entropy`` format of :mod:`hnd.codec`: a CRC-32 of the symbols, then
32-bit words). In an ``entropy`` request the two fields at ``8+4·ndim`` are ``u32``: the
CRC-32 of the sender's coding tables (:attr:`hnd.range_coder.CodingTables.fingerprint`; a server with
other tables refuses the request) and 0 (reserved). For a [C, H, W] bottleneck the header is
32 bytes; it never exceeds 52.

Versions: version 2 adds format code 5; version 3 adds the hello frame (type 4). Every frame
is written with the lowest version that can carry it (1 for all but ``entropy`` requests and
hellos), so a version-1 peer still understands everything except entropy coding and tokens,
and version-1 frames parse unchanged.

A **result** (server -> edge device): queue seconds ``f32`` at 8, compute seconds ``f32``
at 12, then k pairs (class index ``u32``, probability ``f32``) from 16, most likely first.
An **error**: message length ``u32`` at 8, then that many bytes of UTF-8 text; its code (byte
6) says what the client may do: 0 the request was refused (fix it), 1 **busy** (the server is
at a limit: retry later, with backoff), 2 **not authorized** (the connection is closed).
Version-1 and -2 peers wrote 0 there and ignore it, so they read every error as before.

A **hello** (version 3; edge device -> server, first frame of a connection): token length
``u32`` at 8, then that many bytes of UTF-8 (at most :data:`MAX_TOKEN_BYTES`). A server that
requires tokens answers a hello whose token it knows with an empty hello (length 0) and
refuses anything else with a "not authorized" error before reading further; a server without
tokens accepts any hello. A client of versions 1–2 sends no hello, so a server with tokens
answers its first request with that error, not a hang; a version-3 hello to an older server
gets its "protocol version 3 is not supported" error.

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

import numpy as np

from hnd.errors import HndError
from hnd.range_coder import ENTROPY_FORMAT, CodingTables
from hnd.tensor_codec import TENSOR_FORMATS, decode_array, encode_array, tensor_bytes

MAGIC = b"HND1"
VERSION = 3  # the newest; frames are written with the lowest version that carries them
VERSIONS = (1, 2, 3)
REQUEST, RESULT, ERROR, HELLO = 1, 2, 3, 4
REFUSED, BUSY, UNAUTHORIZED = 0, 1, 2  # error codes
MAX_TOKEN_BYTES = 256
FORMAT_CODES = {"fp32": 1, "fp16": 2, "int8": 3, "int8+zlib": 4, ENTROPY_FORMAT: 5}
WIRE_FORMATS = (*TENSOR_FORMATS, ENTROPY_FORMAT)
_FIRST_VERSION = {5: 2}  # format code -> the version that introduced it (others: 1)
MAX_NDIM = 8
MAX_ERROR_CHARS = 1000
DEFAULT_MAX_FRAME_BYTES = 16 << 20

_PREFIX = struct.Struct("<4sBBBB")  # magic, version, type, a, b
_QUANT = struct.Struct("<ff")  # min, scale
_TABLES = struct.Struct("<II")  # entropy: coding tables' CRC-32, reserved
_U32 = struct.Struct("<I")
_TIMES = struct.Struct("<ff")  # queue s, compute s
_PAIR = struct.Struct("<If")  # class index, probability
_FORMAT_NAMES = {code: name for name, code in FORMAT_CODES.items()}
_ZLIB_LEVEL = 9


class FrameError(HndError):
    """Broken framing (bad magic or version, a length over the limit, a truncated frame):
    the stream cannot be resynchronized, so the connection must be closed."""


class ServerError(HndError):
    """An error frame from the server; ``code`` is :data:`REFUSED`, :data:`BUSY` or
    :data:`UNAUTHORIZED`."""

    def __init__(self, message: str, code: int = REFUSED):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RequestHeader:
    """A request's header fields, read without touching the payload."""

    fmt: str | None  # None for an unknown format code
    shape: tuple[int, ...]
    qmin: float
    qscale: float
    payload: memoryview
    tables: int = 0  # entropy: CRC-32 of the sender's coding tables


@dataclass(frozen=True)
class Result:
    """The server's answer for one image."""

    topk: list[tuple[int, float]]  # (class index, probability), most likely first
    queue_s: float
    compute_s: float
    batch: int  # images decoded together with this one (capped at 255)


# --- requests ----------------------------------------------------------------------------------

def check_wire_format(fmt: str, tables: CodingTables | None = None) -> str:
    """``fmt`` if it is one of :data:`WIRE_FORMATS` and, for ``entropy``, the model's coding
    ``tables`` are given; else a one-line error."""
    if fmt == ENTROPY_FORMAT:
        if tables is None:
            raise HndError("entropy coding needs an entropic student with coding tables (a checkpoint trained with "
                           "--method entropic); this model has none: use --bits 8/16/32 instead")
        return fmt
    if fmt not in WIRE_FORMATS:
        raise HndError(f"unknown tensor format {fmt!r}; valid: {', '.join(WIRE_FORMATS)}")
    return fmt


def encode_request(z: np.ndarray, fmt: str, tables: CodingTables | None = None) -> bytes:
    """Frame one image's bottleneck ``z`` [C, H, W] (any 1..8 dims; a numpy array or a CPU
    tensor) in tensor format ``fmt`` (``entropy``: range-coded with the model's ``tables``)."""
    check_wire_format(fmt, tables)
    z = np.asarray(z, dtype=np.float32)
    shape = tuple(z.shape)
    if not 1 <= len(shape) <= MAX_NDIM or min(shape) < 1:
        raise HndError(f"a request carries a tensor of 1 to {MAX_NDIM} non-empty dimensions, got shape {list(shape)}")
    qmin = qscale = 0.0
    fields = None
    if fmt == ENTROPY_FORMAT:
        data = tables.encode(z)
        fields = _TABLES.pack(tables.fingerprint, 0)
    elif fmt in ("fp32", "fp16"):
        data = encode_array(z, fmt)
    else:
        data = encode_array(z, "int8")
        qmin, qscale = _QUANT.unpack_from(data)
        data = data[_QUANT.size:]
        if fmt == "int8+zlib":
            data = zlib.compress(data, _ZLIB_LEVEL)
    code = FORMAT_CODES[fmt]
    header = (_PREFIX.pack(MAGIC, _FIRST_VERSION.get(code, 1), REQUEST, code, len(shape))
              + struct.pack(f"<{len(shape)}I", *shape) + (fields or _QUANT.pack(qmin, qscale)) + _U32.pack(len(data)))
    return header + data


def request_header(frame: bytes) -> RequestHeader:
    """The fields of a complete request frame (as :func:`read_frame` returns it)."""
    view = memoryview(frame)
    _, version, kind, code, ndim = _check_prefix(view)
    if kind != REQUEST:
        raise HndError(f"expected a request frame, got type {kind}")
    shape = struct.unpack_from(f"<{ndim}I", view, _PREFIX.size)
    at = _PREFIX.size + 4 * ndim
    qmin, qscale = _QUANT.unpack_from(view, at)
    tables, _ = _TABLES.unpack_from(view, at)
    (length,) = _U32.unpack_from(view, at + _QUANT.size)
    payload = view[at + _QUANT.size + _U32.size:]
    if len(payload) != length:
        raise FrameError(f"request payload is {len(payload)} bytes but its header says {length}")
    fmt = _FORMAT_NAMES.get(code) if version >= _FIRST_VERSION.get(code, 1) else None
    return RequestHeader(fmt, tuple(shape), qmin, qscale, payload, tables)


def decode_request(frame: bytes, tables: CodingTables | None = None) -> tuple[np.ndarray, str]:
    """(float32 array, format) of a complete request frame; damaged payloads raise HndError.
    ``tables``: the receiving model's coding tables, needed for ``entropy`` requests."""
    head = request_header(frame)
    if head.fmt is None:
        _, version, _, code, _ = _PREFIX.unpack_from(frame)
        raise HndError(f"unknown tensor format code {code} in a version-{version} frame; valid: "
                       + ", ".join(f"{c} {n}" for n, c in FORMAT_CODES.items() if _FIRST_VERSION.get(c, 1) <= version))
    numel = math.prod(head.shape)
    data = bytes(head.payload)
    if head.fmt == ENTROPY_FORMAT:
        if tables is None:
            raise HndError("this server's model has no entropy coding tables; send fp32, fp16, int8 or int8+zlib")
        if head.tables != tables.fingerprint:
            raise HndError("the request was entropy-coded with other coding tables than this server's model "
                           "(edge and server must load the same checkpoint)")
        if len(head.shape) != 3:
            raise HndError(f"an entropy-coded request carries a [C, H, W] bottleneck, got shape {list(head.shape)}")
        return tables.decode(data, head.shape), head.fmt
    if head.fmt in ("int8", "int8+zlib"):
        if head.fmt == "int8+zlib":
            data = _inflate(data, numel)
        if not (math.isfinite(head.qmin) and math.isfinite(head.qscale)):
            raise HndError("int8 request has a non-finite quantization min or scale")
        data = _QUANT.pack(head.qmin, head.qscale) + data
        return decode_array(data, "int8", head.shape), head.fmt
    return decode_array(data, head.fmt, head.shape), head.fmt


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
    return (_PREFIX.pack(MAGIC, 1, RESULT, len(topk), max(0, min(int(batch), 255)))
            + _TIMES.pack(queue_s, compute_s) + pairs)


def encode_error(message: str, code: int = REFUSED) -> bytes:
    """Frame an error message (one line, cut to :data:`MAX_ERROR_CHARS` characters) with its
    ``code`` (:data:`REFUSED`, :data:`BUSY`, :data:`UNAUTHORIZED`)."""
    text = " ".join(str(message).split())[:MAX_ERROR_CHARS].encode("utf-8")
    return _PREFIX.pack(MAGIC, 1, ERROR, code, 0) + _U32.pack(len(text)) + text


def encode_hello(token: str = "") -> bytes:
    """Frame a hello carrying ``token`` (a client's first frame; empty: the server's accept)."""
    data = token.encode("utf-8")
    if len(data) > MAX_TOKEN_BYTES:
        raise HndError(f"a token is at most {MAX_TOKEN_BYTES} bytes, got {len(data)}")
    return _PREFIX.pack(MAGIC, 3, HELLO, 0, 0) + _U32.pack(len(data)) + data


def hello_token(frame: bytes) -> str | None:
    """The token of a complete hello frame; None when ``frame`` is not a hello."""
    view = memoryview(frame)
    if _check_prefix(view)[2] != HELLO:
        return None
    (length,) = _U32.unpack_from(view, _PREFIX.size)
    return bytes(view[_PREFIX.size + _U32.size:_PREFIX.size + _U32.size + length]).decode("utf-8", "replace")


def decode_response(frame: bytes) -> Result:
    """The :class:`Result` of a complete response frame; an error frame raises HndError with the
    server's message."""
    view = memoryview(frame)
    _, _, kind, k, batch = _check_prefix(view)
    if kind == ERROR:
        (length,) = _U32.unpack_from(view, _PREFIX.size)
        text = bytes(view[_PREFIX.size + _U32.size:_PREFIX.size + _U32.size + length])
        raise ServerError(f"server: {text.decode('utf-8', 'replace')}", k)
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
    if fields[1] not in VERSIONS:
        raise FrameError(f"protocol version {fields[1]} is not supported; this side speaks "
                         f"{', '.join(map(str, VERSIONS))}")
    if fields[2] not in (REQUEST, RESULT, ERROR, HELLO) or (fields[2] == HELLO and fields[1] < 3):
        raise FrameError(f"unknown frame type {fields[2]} in a version-{fields[1]} frame")
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
    if kind == HELLO and length > MAX_TOKEN_BYTES:
        raise FrameError(f"hello token of {length} bytes is over the {MAX_TOKEN_BYTES}-byte limit")
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
    """Bytes on the wire for one request of ``shape`` in ``fmt`` (``None`` for int8+zlib and
    entropy, whose sizes depend on the values)."""
    if fmt == ENTROPY_FORMAT:
        return None
    size = tensor_bytes(shape, fmt)
    if size is None:
        return None
    return header_bytes(len(shape)) + size - (_QUANT.size if fmt == "int8" else 0)
