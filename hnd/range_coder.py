"""The ``entropy`` wire format on numpy arrays: an entropic student's coding tables and the
range coder that uses them (``constriction``), without torch, so that an edge device codes its
bottleneck as the server decodes it. :class:`hnd.entropy.FactorizedPrior` (torch) learns the
density and hands its tables over as :class:`CodingTables`; both ends code through here.

Payload: the CRC-32 of the symbols (``u32``) followed by the range-coded symbols (whole 32-bit
words), one categorical model per channel. The checksum turns a truncated or damaged payload,
or one coded with other tables, into an error instead of a wrong answer.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hnd.errors import HndError

ENTROPY_FORMAT = "entropy"  # the wire format's name
_CHECKSUM = struct.Struct("<I")


def _require_constriction():
    try:
        import constriction
    except ImportError:
        raise HndError("the entropy coder needs the constriction package: pip install constriction") from None
    return constriction


@dataclass(frozen=True, eq=False)
class CodingTables:
    """Per channel ``c``: the coded symbols ``low[c] .. low[c] + K - 1`` and their
    probabilities ``pmf[c]`` (float32 [C, K])."""

    low: np.ndarray  # int64 [C]
    pmf: np.ndarray  # float32 [C, K]

    @property
    def channels(self) -> int:
        return len(self.low)

    @property
    def fingerprint(self) -> int:
        """CRC-32 of the tables: two ends with different tables cannot decode each other."""
        return zlib.crc32(self.low.astype("<i8").tobytes() + self.pmf.astype("<f4").tobytes())

    def to_dict(self) -> dict:
        """Plain data (JSON) that :meth:`from_dict` reads back bit for bit."""
        return {"low": [int(v) for v in self.low], "symbols": int(self.pmf.shape[1]),
                "pmf_f32le_base64": base64.b64encode(self.pmf.astype("<f4").tobytes()).decode("ascii"),
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, doc: dict) -> CodingTables:
        """The tables :meth:`to_dict` wrote; damaged or mismatched data is a one-line error."""
        try:
            low = np.asarray(doc["low"], dtype=np.int64)
            pmf = np.frombuffer(base64.b64decode(doc["pmf_f32le_base64"]), dtype="<f4").astype(np.float32)
            tables = cls(low, pmf.reshape(len(low), int(doc["symbols"])))
            expected = int(doc["fingerprint"])
        except (KeyError, TypeError, ValueError):
            raise HndError("damaged entropy tables: they need low, symbols, pmf_f32le_base64 and fingerprint") from None
        if tables.fingerprint != expected:
            raise HndError(f"damaged entropy tables: fingerprint {tables.fingerprint} does not match the recorded "
                           f"{expected}")
        return tables

    def _models(self) -> list:
        c = _require_constriction()
        return [c.stream.model.Categorical(row, perfect=False) for row in self.pmf.astype(np.float64)]

    def symbols(self, z: np.ndarray) -> np.ndarray:
        """One image's bottleneck [C, H, W] -> symbol indices [C, H*W] (int32): rounded half to
        even, as torch.round, and clamped into each channel's coded range."""
        y = np.rint(np.asarray(z, dtype=np.float32))
        if np.isnan(y).any():  # inf is clamped into the coded range, nan has no symbol
            raise HndError("entropy coding needs numbers, but the bottleneck holds nan")
        low = self.low.reshape(-1, 1, 1)
        y = np.clip(y, low, low + self.pmf.shape[1] - 1)
        return (y.astype(np.int64) - low).reshape(self.channels, -1).astype(np.int32)

    def values(self, symbols: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Symbol indices [C, H*W] -> the rounded bottleneck [C, H, W] (float32)."""
        return (symbols.astype(np.int64).reshape(shape) + self.low.reshape(-1, 1, 1)).astype(np.float32)

    def encode_symbols(self, symbols: np.ndarray) -> bytes:
        """Range-code symbol indices [C, M] with each channel's table (little-endian 32-bit words)."""
        encoder = _require_constriction().stream.queue.RangeEncoder()
        for row, model in zip(symbols, self._models()):
            encoder.encode(np.ascontiguousarray(row), model)
        return encoder.get_compressed().astype("<u4").tobytes()

    def decode_symbols(self, data: bytes, per_channel: int) -> np.ndarray:
        """Decode exactly ``per_channel`` symbols per channel -> [C, per_channel] int32. The work is
        bounded by the symbol count, not by the data; anything but the exact coding of the
        decoded symbols raises :class:`HndError`."""
        c = _require_constriction()
        models = self._models()
        if len(data) % 4:
            raise HndError(f"an entropy-coded payload is whole 32-bit words, got {len(data)} bytes")
        decoder = c.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
        out = np.empty((len(models), per_channel), dtype=np.int32)
        try:
            for ch, model in enumerate(models):
                out[ch] = decoder.decode(model, per_channel)
        except (ValueError, RuntimeError, AssertionError) as exc:
            raise HndError(f"damaged entropy-coded payload ({exc})") from None
        # The coder cannot always tell the end of its data (trailing zero words decode as
        # padding): accept only the exact coding of the decoded symbols, which is deterministic.
        if not decoder.maybe_exhausted() or self.encode_symbols(out) != data:
            raise HndError(f"damaged entropy-coded payload: its {len(data)} bytes are not the coding of "
                           f"{per_channel} symbols per channel (truncated, altered or with extra data)")
        return out

    def encode(self, z: np.ndarray) -> bytes:
        """One image's bottleneck [C, H, W] as an ``entropy`` payload: checksum, then the coding."""
        symbols = self.symbols(z)  # [C, H*W]
        return _CHECKSUM.pack(zlib.crc32(symbols.tobytes())) + self.encode_symbols(symbols)

    def decode(self, data: bytes, shape: Sequence[int]) -> np.ndarray:
        """The rounded bottleneck [C, H, W] (float32) that :meth:`encode` wrote; decoding work is
        bounded by the shape, and damaged data raises a one-line :class:`HndError`."""
        channels, h, w = (int(s) for s in shape)
        if channels != self.channels:
            raise HndError(f"an entropy-coded tensor of {channels} channels does not fit this model's "
                           f"{self.channels}")
        if len(data) < _CHECKSUM.size:
            raise HndError(f"an entropy-coded payload starts with a {_CHECKSUM.size}-byte checksum, got "
                           f"{len(data)} bytes")
        (checksum,) = _CHECKSUM.unpack_from(data)
        symbols = self.decode_symbols(data[_CHECKSUM.size:], h * w)
        if zlib.crc32(symbols.tobytes()) != checksum:
            raise HndError("entropy-coded payload fails its checksum (damaged, truncated, or coded with another "
                           "model's tables)")
        return self.values(symbols, (channels, h, w))
