"""Student heads: a small encoder, a narrow bottleneck, a decoder back to the teacher head's
output; the student is that head followed by the teacher's unchanged tail.

Two designs:

- the original's ImageNet heads (tests/reference/original-hnd-facts.md §1) for the papers' families at their
  official split: DenseNet and ResNet "ver2b", Inception-v3 "ver1b" (:class:`StudentHead`);
- a generic head for any teacher and split point (:class:`GenericHead`), documented there.

The encoder runs on the edge device and its raw conv output ``z`` is what is transmitted;
the decoder and the teacher's tail run on the server. An *entropic* head (``entropy=True``)
also holds a learned :class:`hnd.entropy.FactorizedPrior` between them: ``z`` is rounded to
integers and range-coded with the prior's tables (the Entropic Student of Matsubara et al.,
WACV 2022).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from hnd.entropy import FactorizedPrior
from hnd.errors import HndError

OFFICIAL_CHANNELS = (3, 6, 9, 12)

# family -> (head version name, stem conv/max-pool padding, decoder convs as (out_channels, padding),
#            stride of the final average pool). All decoder convs are 2x2, stride 1.
OFFICIAL_DESIGNS = {
    "densenet": ("2b", 3, 1, [(512, 1), (512, 1), (256, 0), (256, 0), (256, 0)], 2),  # -> 256x14x14
    "resnet": ("2b", 3, 1, [(512, 1), (512, 1), (512, 0), (512, 0)], 1),  # -> 512x28x28
    "inception": ("1b", 0, 0, [(256, 1), (256, 0), (192, 0)], 1),  # -> 192x35x35
}


def head_version(family: str) -> str:
    """The original's head version of a paper family: ``2b`` (DenseNet, ResNet), ``1b`` (Inception-v3)."""
    return OFFICIAL_DESIGNS[family][0]


def check_channels(channels: object) -> int:
    """Return ``channels`` as an int if it is a positive integer, else raise a clear error."""
    if isinstance(channels, str) and re.fullmatch(r"\s*\d+\s*", channels):
        channels = int(channels)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise HndError(f"bottleneck channels must be a positive integer, got {channels!r}")
    return channels


def _conv(cin: int, cout: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)


def init_head(head: nn.Module) -> None:
    """The original's init: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 and bias 0."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _decoder(channels: int, convs: list[tuple[int, int]], pool: nn.Module) -> nn.Sequential:
    """BN, ReLU, then 2x2 convs with BN+ReLU between them, then ``pool``."""
    layers: list[nn.Module] = [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
    cin = channels
    for i, (cout, padding) in enumerate(convs):
        layers.append(_conv(cin, cout, 2, 1, padding))
        if i < len(convs) - 1:
            layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    layers.append(pool)
    return nn.Sequential(*layers)


class BottleneckHead(nn.Module):
    """``encoder`` -> bottleneck -> ``decoder``; with a ``prior`` the bottleneck is rounded
    (evaluation) or noised (training) and has a rate in bits."""

    def _add_prior(self, entropy: bool, channels: int) -> None:
        self.prior = FactorizedPrior(channels) if entropy else None

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """What the decoder receives for encoder output ``z``: ``z`` itself, or with a prior its
        rounded (evaluation) or noisy (training) value."""
        return z if self.prior is None else self.prior(z)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(self.encoder(x)))

    def forward_with_rate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head output, rate in bits per image [N]) of an entropic head."""
        if self.prior is None:
            raise HndError("this head has no entropy model; only entropic students have a rate")
        y_hat, bits = self.prior(self.encoder(x))
        return self.decoder(y_hat), bits


class StudentHead(BottleneckHead):
    """The original's bottleneck head of a paper family: ``decoder(encoder(x))`` replaces the
    teacher head at the official split point."""

    def __init__(self, family: str, bottleneck_channels: int, *, entropy: bool = False):
        super().__init__()
        _, stem_pad, pool_pad, convs, pool_stride = OFFICIAL_DESIGNS[family]
        bc = check_channels(bottleneck_channels)
        # x: [N, 3, 224, 224] (Inception: 299)
        self.encoder = nn.Sequential(
            _conv(3, 64, 7, 2, stem_pad), nn.BatchNorm2d(64), nn.ReLU(inplace=True),  # 64x112x112 (147)
            nn.MaxPool2d(3, stride=2, padding=pool_pad),  # 64x56x56 (73)
            nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            _conv(64, bc, 2, 2, 1),  # z: bc x 29x29 (37) -- the bottleneck, sent raw
        )
        self.decoder = _decoder(bc, convs, nn.AvgPool2d(2, stride=pool_stride))  # teacher-head shape
        init_head(self)
        self._add_prior(entropy, bc)


class GenericHead(BottleneckHead):
    """The bottleneck head for any teacher and split point.

    Encoder (the ver2b layout, with the teacher's own stem): a ``stem_kernel`` conv, stride 2,
    to ``stem_channels`` (the teacher's first conv), BN, ReLU, 3x3 max-pool stride 2 (input
    stride 4), BN, ReLU, and the bottleneck conv to ``C`` channels: 2x2 stride 2 when the
    teacher head's output stride is about 8 or more (S >= 6·H; z is C x (S/8+1)^2, as in the
    papers), else 3x3 stride 1. Decoder: BN, ReLU, four 2x2 convs (padding 1, 1, 0, 0; width
    ``min(512, max(64, 2·C_out))`` as DenseNet's ver2b, the last two to ``C_out``) with BN+ReLU
    between them, and an adaptive average pool to the teacher head's [C_out, H, W] at the spec's
    input size, which is at most a 2x2 stride-1 average where the strides agree.
    """

    def __init__(self, bottleneck_channels: int, output_shape: tuple[int, int, int], input_size: int, *,
                 stem_channels: int = 64, stem_kernel: int = 7, entropy: bool = False):
        super().__init__()
        bc = check_channels(bottleneck_channels)
        c_out, h, w = output_shape
        downsample = input_size >= 6 * h  # output stride about 8 or more
        k = max(3, min(stem_kernel, 7))
        # x: [N, 3, S, S]
        self.encoder = nn.Sequential(
            _conv(3, stem_channels, k, 2, k // 2), nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True),  # S/2
            nn.MaxPool2d(3, stride=2, padding=1),  # S/4
            nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True),
            _conv(stem_channels, bc, 2, 2, 1) if downsample else _conv(stem_channels, bc, 3, 1, 1),  # z: S/8+1 or S/4
        )
        width = min(512, max(64, 2 * c_out))
        convs = [(width, 1), (width, 1), (c_out, 0), (c_out, 0)]
        self.decoder = _decoder(bc, convs, nn.AdaptiveAvgPool2d((h, w)))  # [C_out, H, W]
        init_head(self)
        self._add_prior(entropy, bc)


class Student(nn.Module):
    """Bottleneck-injected model: student head + the teacher's tail, ``tail(head(x))``.
    ``spec`` is the :class:`hnd.registry.ModelSpec` it was built from."""

    def __init__(self, spec, head: nn.Module, tail: nn.Module):
        super().__init__()
        self.spec = spec
        self.head = head
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Edge side: image batch -> bottleneck tensor ``z`` [N, bc, H', W']."""
        return self.head.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Server side: bottleneck tensor -> logits [N, classes] (an entropic student rounds
        ``z`` first, as its decoder was trained on, so a decoded ``z`` gives ``forward``'s logits)."""
        return self.tail(self.head.decoder(self.quantize(z)))

    @property
    def prior(self) -> FactorizedPrior | None:
        """The entropy model of an entropic student, else ``None``."""
        return self.head.prior

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` as the decoder receives it in evaluation (rounded and clamped if entropic)."""
        return z if self.head.prior is None else self.head.prior.quantize(z)

    def split(self) -> tuple[nn.Module, nn.Module]:
        """(edge, server) modules that share this student's parameters; the server part of an
        entropic student rounds its input (the range coding runs outside both, on the tables)."""
        if self.head.prior is None:
            return self.head.encoder, nn.Sequential(self.head.decoder, self.tail)
        return self.head.encoder, nn.Sequential(_Rounding(self.head.prior), self.head.decoder, self.tail)


class _Rounding(nn.Module):
    """The evaluation-time rounding (and clamping) of an entropy model, as a module."""

    def __init__(self, prior: FactorizedPrior):
        super().__init__()
        self.register_buffer("low", prior.low.clone(), persistent=False)
        self.register_buffer("high", prior.low + max(prior.pmf.shape[1] - 1, 0), persistent=False)
        self.clamp = prior.has_tables

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = torch.round(z)
        if self.clamp:
            z = torch.maximum(torch.minimum(z, self.high.view(1, -1, 1, 1).to(z.dtype)), self.low.view(1, -1, 1, 1).to(z.dtype))
        return z
