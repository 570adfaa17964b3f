"""The autoencoder baseline of the papers: a small autoencoder inserted at a frozen teacher's
split point, trained to reconstruct the teacher head's output (tests/reference/original-hnd-facts.md §3).

Unlike HND, the teacher's own head still runs on the device; the autoencoder's encoder
shrinks its output to a few channels for transmission.
"""

from __future__ import annotations

import torch
from torch import nn

from hnd.errors import HndError
from hnd.teachers import split_teacher


class MiddleAutoencoder(nn.Module):
    """Encoder: four 2×2 stride-1 convs C→128→64→32→bc, BN after each, ReLU after the first
    three; decoder: four 2×2 transposed convs bc→32→64→128→C with BN+ReLU in between.
    Each conv trims one pixel, so a C×H×W input is sent as bc×(H-4)×(W-4)."""

    def __init__(self, in_channels: int, bottleneck_channels: int):
        super().__init__()
        if bottleneck_channels <= 0:
            raise HndError(f"autoencoder bottleneck channels must be positive, got {bottleneck_channels}")
        widths = [in_channels, 128, 64, 32, bottleneck_channels]
        enc: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
            enc += [nn.Conv2d(cin, cout, 2, 1), nn.BatchNorm2d(cout)]
            if i < 3:
                enc.append(nn.ReLU(inplace=True))
        widths = widths[::-1]
        dec: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
            dec.append(nn.ConvTranspose2d(cin, cout, 2, 1))
            if i < 3:
                dec += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*enc)  # C x H x W -> bc x (H-4) x (W-4)
        self.decoder = nn.Sequential(*dec)  # bc x (H-4) x (W-4) -> C x H x W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class AutoencoderModel(nn.Module):
    """Teacher head → autoencoder → teacher tail; only ``ae`` is trained."""

    def __init__(self, spec, head: nn.Module, ae: MiddleAutoencoder, tail: nn.Module):
        super().__init__()
        self.spec = spec  # the teacher's ModelSpec, at the split point
        self.head = head
        self.ae = ae
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.ae(self.head(x)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Edge side: image batch -> bottleneck [N, bc, H-4, W-4]."""
        return self.ae.encoder(self.head(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Server side: bottleneck -> logits."""
        return self.tail(self.ae.decoder(z))


def build_ae_model(spec, teacher: nn.Module, bottleneck_channels: int) -> AutoencoderModel:
    """Insert a fresh autoencoder at the split point of ``spec`` (a teacher's
    :class:`~hnd.registry.ModelSpec`). The head of the papers' families keeps the original's
    plain normalized input (no Inception ``transform_input``); head and tail share the
    teacher's modules."""
    shape = spec.head_output_shape
    if len(shape) != 3 or min(shape[1:]) < 5:
        raise HndError(f"the autoencoder baseline needs a [C, H, W] map of at least 5x5 at the split point; "
                       f"{spec} gives {'x'.join(map(str, shape))}")
    head, tail = split_teacher(spec.teacher, teacher, spec.split_point, transform_input=spec.head_transform_input)
    ae = MiddleAutoencoder(shape[0], bottleneck_channels)
    return AutoencoderModel(spec, head, ae, tail)
