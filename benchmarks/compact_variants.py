"""Experimental variants of the compact network (issue 4 item 2; RESULTS.md section 21). Not shipped.

Registers four architectures beside the package's, then runs the ``deepphase`` CLI with the arguments
given, so that they train and evaluate exactly as the shipped ones do::

    python benchmarks/compact_variants.py train --arch x-compact-rep --epochs 8 --steps-per-epoch 500 \\
        --batch-size 32 --corpus atoms --seed 0 --dose 10 1000000 --sigma-head detached --out s0-rep
    python benchmarks/compact_variants.py evaluate --preset fast --methods rep-s0 --model rep-s0=s0-rep --out eval

Model folders of these architectures load only where this module has been imported.

* ``x-compact-conv``: the MLP across the 16 positions of the 4×4 map replaced by a 3×3 conv-BN with an
  identity shortcut (translation-equivariant everywhere, as the U-Net is).
* ``x-compact-dose``: FiLM (a per-channel scale and shift) of the 4×4 map and of the fused 8×8 map from
  log of the pattern's total counts; the RMS-normalised input hides the dose but for its graininess.
* ``x-compact-drop2``: dropout 0.2 (the U-Net's) instead of 0.1.
* ``x-compact-rep``: every 3×3 conv-BN trained as RepVGG-style branches (3×3 conv-BN + 1×1 conv-BN +
  identity BN where shapes allow), collapsed for inference into the plain ``compact`` architecture (same
  operations per pattern as the default). Since section 21 it is in the package as ``--arch compact-rep``,
  whose model files hold the collapsed network; this name keeps the training form (its folders of
  section 21 were trained so).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from deepphase.cli import main
from deepphase.models.compact import CompactPhaseNet, RepCompactPhaseNet
from deepphase.models.registry import register_model
from deepphase.models.unet import normalise_amplitude


class ConvShortcut(nn.Module):
    """3×3 conv-BN with an identity shortcut, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return F.relu(x + self.body(x))


class DoseModulation(nn.Module):
    """Per-channel (scale, shift) pairs for feature maps of ``channels``, from log of the total counts.

    Zero-initialised output layer, so training starts from the plain network.
    """

    # log(counts) centred on 1,000 e/pattern and scaled by the training range's half-width (10–10⁶).
    CENTRE = SCALE = math.log(1e3)

    def __init__(self, channels: tuple[int, ...], hidden: int = 32):
        super().__init__()
        self.channels = tuple(channels)
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.GELU(), nn.Linear(hidden, 2 * sum(self.channels)))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, amplitude: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # float32 whatever the input: a float16 sum of 10⁶ counts overflows.
        counts = amplitude.float().square().sum(dim=(-2, -1)).mean(dim=1, keepdim=True)
        out = self.mlp((torch.log1p(counts) - self.CENTRE) / self.SCALE)
        pairs, start = [], 0
        for c in self.channels:
            pairs.append((out[:, start:start + c, None, None], out[:, start + c:start + 2 * c, None, None]))
            start += 2 * c
        return pairs


class CompactDose(CompactPhaseNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dose = DoseModulation((self.mixer.norm1.normalized_shape[0], self.decode.body[0][0].in_channels))

    def forward(self, x):
        (scale4, shift4), (scale8, shift8) = self.dose(x)
        x = self.stem(normalise_amplitude(x))
        skip = self.down2(self.down1(x))
        coarse = self.mixer(self.down3(skip) * (1 + scale4) + shift4)
        features = self.decode(self._fuse(coarse, skip) * (1 + scale8) + shift8)
        x = self.head(features)
        if self.sigma_head == "detached":
            x = torch.cat([x, self.sigma_branch(features.detach())], 1)
        return F.interpolate(x, size=(self.out_px, self.out_px), mode="nearest")


@register_model("x-compact-conv")
def compact_conv(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    network = CompactPhaseNet(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)
    network.mixer = ConvShortcut(network.mixer.norm1.normalized_shape[0])
    return network


@register_model("x-compact-dose")
def compact_dose(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactDose(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


@register_model("x-compact-drop2")
def compact_dropout_02(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactPhaseNet(n_px, out_px, dropout=0.2, in_channels=in_channels, sigma_head=sigma_head)


@register_model("x-compact-rep")
def compact_rep(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    # The package's compact-rep under the name its section-21 folders were trained with (model files of
    # compact-rep itself hold the plain network: see RepCompactPhaseNet.reparameterised).
    return RepCompactPhaseNet(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
