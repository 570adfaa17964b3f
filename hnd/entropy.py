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
- :mod:`hnd.range_coder` runs ``constriction``'s range coder over those tables (handed over
  as numpy arrays, :func:`coding_tables`, so that an edge device codes without torch): one
  categorical model per channel. Its Rust coder is exact (integer arithmetic on probabilities
  quantized the same way on both sides) and installs as a wheel; the usual PyTorch library of
  the field, compressai, needs ``numpy<2``.

The tables are a float32 buffer of the state_dict, so an edge device and a server that load
the same checkpoint build the same coder; :func:`table_fingerprint` names those tables.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hnd.errors import HndError
from hnd.range_coder import CodingTables

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


def coding_tables(prior: FactorizedPrior | None) -> CodingTables | None:
    """``prior``'s coding tables as numpy arrays (what both ends of a link code with), or None
    for a model without an entropy model or without tables yet."""
    if prior is None or not prior.has_tables:
        return None
    return CodingTables(prior.low.detach().cpu().numpy().astype(np.int64),
                        prior.pmf.detach().cpu().numpy().astype(np.float32))


def require_tables(prior: FactorizedPrior | None) -> CodingTables:
    """:func:`coding_tables`, or a one-line error saying how a model gets them."""
    tables = coding_tables(prior)
    if tables is None:
        raise HndError("this model has no entropy-coding tables (train it with --method entropic); it cannot "
                       "be sent with entropy coding")
    return tables


def table_fingerprint(prior: FactorizedPrior) -> int:
    """CRC-32 of the coding tables (0 without): two ends with different tables cannot decode each other."""
    tables = coding_tables(prior)
    return 0 if tables is None else tables.fingerprint
