"""Residual U-Nets: the seed's architecture (PRL 130, 016101) and a narrower variant.

Built as the paper describes it: a 3×3 stem to 16 channels at 32×32, encoder levels of 32, 64,
128 and 256 channels (max-pooling between levels), a decoder that upsamples and concatenates the
encoder's skip connections, and a head 32 → 1. Residual blocks are
BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3 with a 3×3 convolution as shortcut.

Each pattern is first scaled by its own RMS amplitude (``sqrt(counts · n² / Σcounts)``), so the
network sees the same numbers at any dose and does not need to know the detector's gain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import GRID_MULTIPLE, register_model


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.Dropout2d(dropout) if dropout else nn.Identity(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


def normalise_amplitude(x: torch.Tensor) -> torch.Tensor:
    """Divide each pattern by its RMS amplitude (dose-independent input)."""
    rms = x.square().mean(dim=(-2, -1), keepdim=True).sqrt()
    return x / rms.clamp_min(1e-6)


class ResUNet(nn.Module):
    """Residual U-Net from (B, in_channels, n, n) amplitudes to (B, 1, out, out) phase patches.

    ``out_px`` may differ from ``n_px`` (the final feature map is resampled); for the seed geometry
    both are 32.
    """

    def __init__(self, stem: int = 16, channels=(32, 64, 128, 256), head: int = 32, dropout: float = 0.2,
                 n_px: int = 32, out_px: int = 32, in_channels: int = 1, sigma_head: bool = False):
        super().__init__()
        if n_px % GRID_MULTIPLE:  # (else the skips and the upsampled maps differ in size)
            raise ValueError(f"n_px: the U-Net needs a multiple of {GRID_MULTIPLE} pixels, got {n_px}")
        self.out_px = out_px
        self.in_channels = int(in_channels)
        # A second output channel: the log error scale (see compact.py); only the shared form here.
        if sigma_head not in (False, None, True, "shared"):
            raise ValueError(f"the U-Nets have a shared σ head only (--sigma-head, or sigma_head='shared' from "
                             f"Python), not {sigma_head!r}; a detached one is the compact networks'")
        self.sigma_head = "shared" if sigma_head else None
        self.stem = nn.Conv2d(self.in_channels, stem, 3, padding=1)
        self.encoder = nn.ModuleList()
        c = stem
        for co in channels:
            self.encoder.append(ResidualBlock(c, co, dropout))
            c = co
        self.decoder = nn.ModuleList()
        for co in reversed(channels[:-1]):
            self.decoder.append(ResidualBlock(c + co, co, dropout))
            c = co
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, head, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(head, 2 if self.sigma_head else 1, 1))

    def forward(self, x):
        x = self.stem(normalise_amplitude(x))
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.decoder:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, skips.pop()], 1))
        x = self.head(x)
        if x.shape[-1] != self.out_px:
            x = F.interpolate(x, size=(self.out_px, self.out_px), mode="bilinear", align_corners=False)
        return x


@register_model("seed-unet")
def seed_unet(n_px: int = 32, out_px: int = 32, dropout: float = 0.2, in_channels: int = 1,
              sigma_head: bool = False) -> ResUNet:
    """The seed's residual U-Net: 16 → 32, 64, 128, 256 → 32 → 1 (``in_channels`` patterns per position;
    ``sigma_head``: a second output channel, the log error scale)."""
    return ResUNet(16, (32, 64, 128, 256), 32, dropout, n_px, out_px, in_channels, sigma_head)


@register_model("unet-small")
def unet_small(n_px: int = 32, out_px: int = 32, dropout: float = 0.1, in_channels: int = 1,
               sigma_head: bool = False) -> ResUNet:
    """Half the seed's width (8 → 16, 32, 64, 128 → 16 → 1): about 4× fewer FLOPs."""
    return ResUNet(8, (16, 32, 64, 128), 16, dropout, n_px, out_px, in_channels, sigma_head)
