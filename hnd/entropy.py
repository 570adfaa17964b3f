"""A learned entropy model of the bottleneck and the range coder that uses it.

The factorized prior of Ballé et al. ("Variational image compression with a scale
hyperprior", ICLR 2018, appendix 6.1): each bottleneck channel gets its own monotone
cumulative density ``c(x) = sigmoid(f_K(... f_1(x)))`` where every ``f_k`` applies a small
matrix with softplus-positive entries, a bias and (before the last) a ``tanh`` gate, so
that ``c`` is non-decreasing. The probability of an integer symbol ``s`` is the mass of its
unit interval, ``c(s + 1/2) - c(s - 1/2)``.

- Training adds uniform noise U(-1/2, 1/2) to the latents (a differentiable stand-in for
  rounding) and returns the rate ``-log2 p`` in bits.
- Evaluation rounds. After :meth:`FactorizedPrior.update_tables` the model also holds, per
  channel, the integer range ``[low, low + K)`` that carries almost all the mass and the
  probabilities of those ``K`` symbols (buffers saved in the state_dict, so both ends of a
  link build the same coder); rounded values are clamped into that range, so what the coder
  carries is exactly what the model decodes. The buffers have the same shape before and after
  training (the ``K`` probabilities padded to ``_MAX_SYMBOLS``, ``K`` in a buffer of its own),
  so a freshly built model takes a trained one's state_dict like any other module.
- :func:`encode_symbols` / :func:`decode_symbols` run ``constriction``'s range coder over
  those tables: one categorical model per channel. Its Rust coder is exact (integer
  arithmetic on probabilities quantized the same way on both sides) and installs as a wheel;
  the usual PyTorch library of the field, compressai, needs ``numpy<2``.

The tables are a float32 buffer of the state_dict, so an edge device and a server that load
the same checkpoint build the same coder; :func:`table_fingerprint` names those tables.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hnd.errors import HndError

_FILTERS = (3, 3, 3)  # hidden widths of each channel's density network (Ballé et al.'s default)
_INIT_SCALE = 10.0
_TAIL_MASS = 1e-9  # probability left outside a channel's coded range
_MAX_SYMBOLS = 1024  # widest coded range per channel


class FactorizedPrior(nn.Module):
    """A per-channel learned density over a [N, C, H, W] bottleneck (see the module docstring)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        widths = (1, *_FILTERS, 1)
        scale = _INIT_SCALE ** (1 / (len(widths) - 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(widths) - 1):
            init = math.log(math.expm1(1 / scale / widths[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, widths[i + 1], widths[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, widths[i + 1], 1) - 0.5))
            if i < len(widths) - 2:
                self.factors.append(nn.Parameter(torch.zeros(channels, widths[i + 1], 1)))
        # Coding tables (update_tables): the lowest symbol per channel, the probabilities of the
        # first `width` symbols from it (the rest of each row is 0), and `width` (0: no tables).
        self.register_buffer("low", torch.zeros(channels, dtype=torch.int64))
        self.register_buffer("table", torch.zeros(channels, _MAX_SYMBOLS))
        self.register_buffer("width", torch.zeros((), dtype=torch.int64))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Cumulative logits ``f_K(...f_1(x))`` for values ``x`` [C, 1, M] -> [C, 1, M]."""
        for i, (matrix, bias) in enumerate(zip(self.matrices, self.biases)):
            x = torch.matmul(F.softplus(matrix), x) + bias
            if i < len(self.factors):
                x = x + torch.tanh(self.factors[i]) * torch.tanh(x)
        return x

    def _interval_probability(self, values: torch.Tensor) -> torch.Tensor:
        """``c(v + 1/2) - c(v - 1/2)`` for values [C, 1, M] -> [C, 1, M]."""
        lower, upper = self._logits(values - 0.5), self._logits(values + 0.5)
        sign = -torch.sign(lower + upper).detach()  # subtract in the tail where sigmoid is flat
        return torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower))

    def likelihood(self, y: torch.Tensor) -> torch.Tensor:
        """Probability of each value's unit interval, same shape as ``y`` [N, C, H, W]."""
        n, c, h, w = y.shape
        p = self._interval_probability(y.permute(1, 0, 2, 3).reshape(c, 1, -1))  # [C, 1, N*H*W]
        return p.clamp_min(1e-9).reshape(c, n, h, w).permute(1, 0, 2, 3)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ŷ, bits per image [N]): noisy in training, rounded (and clamped to the coded range
        once tables exist) in evaluation."""
        y_hat = y + torch.empty_like(y).uniform_(-0.5, 0.5) if self.training else self.quantize(y)
        bits = -torch.log2(self.likelihood(y_hat)).flatten(1).sum(1)
        return y_hat, bits

    @property
    def has_tables(self) -> bool:
        return int(self.width) > 0

    @property
    def pmf(self) -> torch.Tensor:
        """The coded symbols' probabilities [C, K]: symbol ``low + k`` of each channel has
        probability ``pmf[:, k]`` (K = 0 without tables)."""
        return self.table[:, :int(self.width)]

    def quantize(self, y: torch.Tensor) -> torch.Tensor:
        """Round ``y``; with tables, clamp each channel into its coded range."""
        y = torch.round(y)
        if self.has_tables:
            low = self.low.view(1, -1, 1, 1).to(y.dtype)
            y = torch.maximum(torch.minimum(y, low + int(self.width) - 1), low)
        return y

    @torch.no_grad()
    def update_tables(self) -> None:
        """Find each channel's coded range (all but ``_TAIL_MASS`` of the probability, at most
        ``_MAX_SYMBOLS`` symbols) and store its symbols' probabilities; call after training,
        before coding."""
        device = self.matrices[0].device
        grid = torch.arange(-(_MAX_SYMBOLS // 2), _MAX_SYMBOLS // 2, device=device, dtype=torch.float32)
        values = grid.view(1, 1, -1).expand(self.channels, 1, -1)
        mass_below = torch.sigmoid(self._logits(values - 0.5))[:, 0]  # [C, M]: P(X < s - 1/2)
        mass_upto = torch.sigmoid(self._logits(values + 0.5))[:, 0]  # P(X < s + 1/2)
        first = (mass_upto < _TAIL_MASS / 2).sum(1)  # [C] index of the first coded symbol
        stop = (mass_below < 1 - _TAIL_MASS / 2).sum(1)  # one past the last
        width = int(max((stop - first).max().item(), 1))
        first = first.clamp(max=len(grid) - width)
        low = grid[first].to(torch.int64)
        symbols = low.view(-1, 1, 1).float() + torch.arange(width, device=device).view(1, 1, -1)
        pmf = self._interval_probability(symbols)[:, 0]  # [C, width]
        # In place: the buffers keep their identity (and shape) for anything holding them.
        self.low.copy_(low)
        self.table.zero_()
        self.table[:, :width] = pmf
        self.width.fill_(width)


def _require_constriction():
    try:
        import constriction
    except ImportError:
        raise HndError("the entropy coder needs the constriction package: pip install constriction") from None
    return constriction


def _coder_models(prior: FactorizedPrior) -> list:
    if not prior.has_tables:
        raise HndError("this model has no entropy-coding tables (train it with --method entropic); it cannot "
                       "be sent with entropy coding")
    c = _require_constriction()
    pmf = prior.pmf.detach().cpu().double().numpy()
    return [c.stream.model.Categorical(row, perfect=False) for row in pmf]


def table_fingerprint(prior: FactorizedPrior) -> int:
    """CRC-32 of the coding tables: two ends with different tables cannot decode each other."""
    if not prior.has_tables:
        return 0
    data = prior.low.cpu().numpy().astype("<i8").tobytes() + prior.pmf.detach().cpu().numpy().astype("<f4").tobytes()
    return zlib.crc32(data)


def to_symbols(prior: FactorizedPrior, z: torch.Tensor) -> np.ndarray:
    """One image's bottleneck ``z`` [C, H, W] -> symbol indices [C, H*W] (int32) into each
    channel's table (rounded and clamped as :meth:`FactorizedPrior.quantize`)."""
    if not prior.has_tables:
        _coder_models(prior)  # raises the one-line error
    y_hat = prior.quantize(z.detach().to("cpu", torch.float32)[None])[0]  # [C, H, W]
    if torch.isnan(y_hat).any():  # inf is clamped into the coded range, nan has no symbol
        raise HndError("entropy coding needs numbers, but the bottleneck holds nan")
    symbols = y_hat.to(torch.int64) - prior.low.cpu().view(-1, 1, 1)
    return symbols.reshape(prior.channels, -1).numpy().astype(np.int32)


def encode_symbols(prior: FactorizedPrior, symbols: np.ndarray) -> bytes:
    """Range-code symbol indices [C, M] with each channel's table (little-endian 32-bit words)."""
    c = _require_constriction()
    encoder = c.stream.queue.RangeEncoder()
    for row, model in zip(symbols, _coder_models(prior)):
        encoder.encode(np.ascontiguousarray(row), model)
    return encoder.get_compressed().astype("<u4").tobytes()


def decode_symbols(prior: FactorizedPrior, data: bytes, per_channel: int) -> np.ndarray:
    """Decode exactly ``per_channel`` symbols per channel from what :func:`encode_symbols`
    wrote -> [C, per_channel] int32. The work is bounded by the symbol count, not by the data;
    data left over after the last symbol (anything but the exact coding of the decoded
    symbols) raises :class:`HndError`."""
    c = _require_constriction()
    models = _coder_models(prior)
    if len(data) % 4:
        raise HndError(f"an entropy-coded payload is whole 32-bit words, got {len(data)} bytes")
    decoder = c.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
    out = np.empty((len(models), per_channel), dtype=np.int32)
    try:
        for ch, model in enumerate(models):
            out[ch] = decoder.decode(model, per_channel)
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise HndError(f"damaged entropy-coded payload ({exc})") from None
    # The coder cannot always tell the end of its data (trailing zero words decode as padding):
    # accept only the exact coding of the decoded symbols, which is deterministic.
    if not decoder.maybe_exhausted() or encode_symbols(prior, out) != data:
        raise HndError(f"damaged entropy-coded payload: its {len(data)} bytes are not the coding of "
                       f"{per_channel} symbols per channel (truncated, altered or with extra data)")
    return out


def from_symbols(prior: FactorizedPrior, symbols: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """Symbol indices [C, H*W] -> the rounded bottleneck ``y_hat`` [C, H, W] (float32)."""
    values = torch.from_numpy(symbols.astype(np.int64)).view(shape) + prior.low.cpu().view(-1, 1, 1)
    return values.to(torch.float32)
