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
  identity BN where shapes allow); :func:`to_plain_compact` collapses them into the plain ``compact``
  architecture, same operations per pattern as the default.
"""

from __future__ import annotations

import copy
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from deepphase.cli import main
from deepphase.models.compact import CompactPhaseNet
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


class RepConv(nn.Module):
    """A 3×3 conv-BN trained with a parallel 1×1 conv-BN (and a BN of the input where shapes allow)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.BatchNorm2d):
        super().__init__()
        self.conv3, self.bn3 = conv, norm  # the names of the trained folders of section 21
        self.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(conv.out_channels)
        same = conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1)
        self.bn_id = nn.BatchNorm2d(conv.out_channels) if same else None

    def forward(self, x):
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        return y if self.bn_id is None else y + self.bn_id(x)

    @staticmethod
    def _folded(kernel: torch.Tensor, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        gain = norm.weight / (norm.running_var + norm.eps).sqrt()
        return kernel * gain[:, None, None, None], norm.bias - norm.running_mean * gain

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(3×3 kernel, bias) of the one convolution that computes the same (eval mode)."""
        kernel, bias = self._folded(self.conv3.weight, self.bn3)
        k1, b1 = self._folded(F.pad(self.conv1.weight, (1, 1, 1, 1)), self.bn1)
        kernel, bias = kernel + k1, bias + b1
        if self.bn_id is not None:
            c = self.conv3.in_channels
            identity = torch.zeros_like(self.conv3.weight)
            identity[torch.arange(c), torch.arange(c), 1, 1] = 1
            ki, bi = self._folded(identity, self.bn_id)
            kernel, bias = kernel + ki, bias + bi
        return kernel.detach(), bias.detach()


def _with_rep_convs(network: nn.Module) -> nn.Module:
    for block in [m for m in network.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(block) - 1):
            conv, norm = block[i], block[i + 1]
            if type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and type(norm) is nn.BatchNorm2d:
                block[i], block[i + 1] = RepConv(conv, norm), nn.Identity()
    return network


def to_plain_compact(network: CompactPhaseNet) -> CompactPhaseNet:
    """The plain ``compact`` network that computes what an eval-mode ``x-compact-rep`` computes.

    Each merged (kernel, bias) becomes the convolution's weight and a batch norm that only adds the bias
    (mean 0, variance 1 − eps, gain 1), so the result loads as the shipped architecture.
    """
    plain = copy.deepcopy(network).eval()
    for block in [m for m in plain.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(block) - 1):
            if isinstance(block[i], RepConv):
                rep = block[i]
                kernel, bias = rep.merged()
                conv = nn.Conv2d(rep.conv3.in_channels, rep.conv3.out_channels, 3, rep.conv3.stride, 1, bias=False)
                norm = nn.BatchNorm2d(rep.conv3.out_channels).eval()
                with torch.no_grad():
                    conv.weight.copy_(kernel)
                    norm.bias.copy_(bias)
                    norm.running_var.fill_(1.0 - norm.eps)
                block[i], block[i + 1] = conv, norm
    return plain


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
    network = CompactPhaseNet(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)
    for part in (network.stem, network.down1, network.down2, network.down3, network.decode):
        _with_rep_convs(part)
    return network


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
