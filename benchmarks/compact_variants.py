"""Experimental variants of the compact network (issue 4 item 2; RESULTS.md sections 21–25, 30). Not shipped.

Registers these architectures beside the package's, then runs the ``deepphase`` CLI with the arguments
given, so that they train and evaluate exactly as the shipped ones do::

    python benchmarks/compact_variants.py train --arch x-compact-rep --epochs 8 --steps-per-epoch 500 \\
        --batch-size 32 --corpus atoms --seed 0 --dose 10 1000000 --sigma-head detached --out s0-rep
    python benchmarks/compact_variants.py evaluate --preset fast --methods rep-s0 --model rep-s0=s0-rep --out eval

Model folders of these architectures load only where this module has been imported.

* ``x-compact-conv``: the MLP across the 16 positions of the 4×4 map replaced by a 3×3 conv-BN with an
  identity shortcut (translation-equivariant everywhere, as the U-Net is).
* ``x-compact-dose``: FiLM (a per-channel scale and shift) of the 4×4 map and of the fused 8×8 map from
  log of the pattern's total counts; the RMS-normalised input hides the dose but for its graininess.
* ``x-compact-dense``: the 4×4 mixer replaced by one MLP over the flattened 4×4×96 map (1,536 → 512 →
  1,536, LayerNorm, shortcut): 1.57 M parameters where the default has 16 k, for 34.99 MFLOP in all
  (16.2× fewer than the seed U-Net). Where parameters are cheapest: does capacity, which the seed U-Net
  has 6.6× more of, close the low-dose gap?
* ``x-compact-bilinear``: a trained compact model's 8×8 map upsampled bilinearly instead of repeated (set a
  copy's ``arch`` in model.json to this name; no training).
* ``x-compact-intensity``: the stem sees I / mean I (the amplitude squared) beside the amplitude;
  ``x-compact-linear`` adds a linear map from I / ΣI to the 8×8 phase. That map alone, without the
  intensity channel, is the package's ``compact`` network since section 22 (``linear_path``).
* ``x-compact-stem7``: a 7×7 stem; ``x-compact-dpc7``: the package's compact network with a 7×7 stem.
* ``x-compact-lpfeat``: section 22's compact network (linear path included) whose decoder also reads
  four more linear maps of I / ΣI at 8×8 (batch-normed, then a zero-initialised 1×1 convolution into the
  fused map): linear, DPC-like estimates that the decoder's 3×3 convolutions can denoise (0.56 MFLOP).
* ``x-compact-lpgatefeat``: the linear features of ``x-compact-lpfeat`` and the gate of ``x-compact-lpgate``
  together: −0.001 at 300, +0.006 at 30 (four seeds; RESULTS §25). Not kept.
* ``x-compact-lpgate``: section 22's compact network whose linear estimate is also scaled per 8×8 pixel,
  ``phase = head + (1 + g)·L(I/ΣI)`` with ``g`` a zero-initialised 1×1 convolution of the decoder's
  features: the shrinkage a Wiener-like estimator applies by dose and by how well the pattern determines
  each pixel. The package's ``compact`` since section 23 (``linear_gate``), which this name now builds.
* ``x-compact-lpgate1``: the gate as one number per pattern, from the decoder's features averaged over
  the 8×8 map: the shrinkage by dose alone, without the per-pixel part (less noise at a few electrons).
* ``x-compact-dw``: the package's compact network with depthwise-separable residual blocks (3×3
  depthwise conv-BN-ReLU, 1×1 conv-BN, identity shortcut) where it has least capacity against the seed
  U-Net: one at 16×16 after ``down1`` (the detector plane at half resolution, where the U-Net has a full
  residual block and the compact network one strided convolution) and two at 8×8 after the decoder (a
  wider field for denoising the output). Made last, the last BN of each zero-initialised: training starts
  from exactly the package's network of the same seed. Aimed at 300 e/pattern (RESULTS §24); level there,
  +0.003 at 30 (six seeds, three harness seeds; RESULTS §25). Not kept.
* ``x-compact-lpmix``: the gated linear path plus three more linear maps of I/ΣI, each scaled per 8×8
  pixel by its own 1×1 convolution of the decoder's features: a mixture of linear estimators that the
  network chooses between by dose and pattern (a Wiener filter's spatial weighting changes with dose,
  which one map times a gain cannot follow). Maps zero-initialised, so training starts from the package's
  network of the same seed. −0.002 at 300 (RESULTS §25). Not kept.
* ``x-compact-drop2``: dropout 0.2 (the U-Net's) instead of 0.1; ``x-compact-lpgate-drop2`` the same for the
  package's network (gated linear path): does the U-Net's stronger regularisation explain its lead on
  monolayer hBN at 300 e/pattern? No: +0.012 at 30, −0.006 at 300 (RESULTS §25).
* ``x-compact-ir``: the package's network with each residual block (two dense 3×3 convolutions; at 8×8 in the
  encoder and the decoder, at 4×4 before the mixer) replaced by four MobileNetV2 inverted residual blocks of
  expansion 2 (1×1 expansion, 3×3 depthwise, linear 1×1 projection): about the same operations (32.1 MFLOP,
  17.7× fewer than the seed U-Net), twice the depth, a 9×9 field at 8×8. RESULTS §30: +0.006 at 300, −0.004
  to −0.006 at 3,000 and 27,882, half the speed in PyTorch on a CPU. Not kept.
* ``x-compact-irdec``: only the decoder's residual block so replaced (32.9 MFLOP, 17.2×). RESULTS §30.
* ``x-compact-hybrid``: the dense 8×8 blocks kept, two such blocks added after the decoder's, the 4×4 block
  before the mixer as two of them (35.0 MFLOP, 16.2×). RESULTS §30.
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
        return self._output(features)


class DenseMixer(nn.Module):
    """One MLP over the whole flattened map (every position and channel at once), with a shortcut.

    At 4×4 a parameter costs two operations per pattern (one position), so this is where parameters are
    cheapest: H=512 gives 1.57 M of them for 3.1 MFLOP (the default's mixer: 16 k for 1.4 MFLOP).
    """

    def __init__(self, channels: int, positions: int, hidden: int = 512):
        super().__init__()
        features = channels * positions
        self.norm = nn.LayerNorm(features)
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, features))

    def forward(self, x):
        t = x.flatten(1)
        return (t + self.mlp(self.norm(t))).view_as(x)


@register_model("x-compact-dense")
def compact_dense(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    network = CompactPhaseNet(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)
    network.mixer = DenseMixer(network.mixer.norm1.normalized_shape[0], (n_px // 8) ** 2)
    return network


class CompactSmoothOutput(CompactPhaseNet):
    """The compact network with its 8×8 prediction upsampled bilinearly instead of by repetition."""

    def forward(self, x):
        size = self.out_px
        self.out_px = x.shape[-1] // 4  # the 8×8 map itself
        try:
            x = super().forward(x)
        finally:
            self.out_px = size
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@register_model("x-compact-bilinear")
def compact_bilinear(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    # Same weights as ``compact``: a model folder's arch set to this name reads a trained compact model.
    return CompactSmoothOutput(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


class CompactIntensity(CompactPhaseNet):
    """The stem sees the normalised intensity (the amplitude squared: I / mean I) beside the amplitude.

    The detector counts intensity, and the estimators that work at a few electrons per pattern (centre
    of mass, DPC) are linear in it; a ReLU network makes squares only approximately. ``linear``
    also adds a linear map from that intensity straight to the 8×8 phase (a learned DPC-like estimator)
    to the head's output.
    """

    def __init__(self, n_px=32, out_px=32, in_channels=1, sigma_head=False, linear=False):
        super().__init__(n_px, out_px, in_channels=2 * in_channels, sigma_head=sigma_head)
        self.in_channels = in_channels  # patterns per position, as the pipeline reads it
        self.linear = nn.Linear(n_px * n_px, (n_px // 4) ** 2) if linear else None
        if linear:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        a = normalise_amplitude(x)
        intensity = a.square()
        x = self.stem(torch.cat([a, intensity], 1))
        skip = self.down2(self.down1(x))
        features = self.decode(self._fuse(self.mixer(self.down3(skip)), skip))
        direct = None
        if self.linear is not None:
            side = features.shape[-1]
            # I / ΣI, a probability over the detector (the centre of mass is linear in it); I / mean I
            # made this path's input so large at a few counts that training stalled (0.17 rad after 4 epochs).
            probability = intensity.mean(1).flatten(1) / intensity[0, 0].numel()
            direct = self.linear(probability).view(-1, 1, side, side)
        return self._output(features, direct)


@register_model("x-compact-intensity")
def compact_intensity(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactIntensity(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


@register_model("x-compact-linear")
def compact_linear(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactIntensity(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head, linear=True)


@register_model("x-compact-stem7")
def compact_stem7(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    # A 7×7 stem: each first feature integrates the counts of a 7×7 detector area (a few electrons per
    # pattern leave most pixels empty), for 1.3 MFLOP more.
    network = CompactPhaseNet(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)
    network.stem[0] = nn.Conv2d(in_channels, network.stem[0].out_channels, 7, padding=3, bias=False)
    return network


@register_model("x-compact-dpc7")
def compact_dpc7(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    # The package's compact network with its linear path (section 22) and a 7×7 stem, the layers made in
    # the order its section-22 run made them (the same initial weights).
    network = compact_stem7(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)
    network.linear_path = nn.Linear(n_px * n_px, (n_px // 4) ** 2)
    nn.init.zeros_(network.linear_path.weight)
    nn.init.zeros_(network.linear_path.bias)
    return network


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


class CompactLinearFeatures(CompactPhaseNet):
    """The compact network with its linear path, and ``maps`` more linear maps of I / ΣI fed to the decoder."""

    def __init__(self, n_px=32, out_px=32, in_channels=1, sigma_head=False, maps=4, linear_gate=False):
        super().__init__(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head, linear_path=True,
                         linear_gate=linear_gate)
        width = self.decode.body[0][0].in_channels
        self.maps = maps
        # Made after every other layer (the same initial weights as the package's network); the
        # projection starts at zero, so training starts from that network.
        self.linear_features = nn.Linear(n_px * n_px, maps * (n_px // 4) ** 2)
        self.feature_norm = nn.BatchNorm2d(maps)
        self.feature_projection = nn.Conv2d(maps, width, 1)
        nn.init.zeros_(self.feature_projection.weight)
        nn.init.zeros_(self.feature_projection.bias)

    def forward(self, x):
        amplitude = normalise_amplitude(x)
        skip = self.down2(self.down1(self.stem(amplitude)))
        fused = self._fuse(self.mixer(self.down3(skip)), skip)
        side = fused.shape[-1]
        probability = self._probability(amplitude)
        estimates = self.linear_features(probability).view(-1, self.maps, side, side)
        features = self.decode(fused + self.feature_projection(self.feature_norm(estimates)))
        return self._output(features, self._linear_term(amplitude, features))


@register_model("x-compact-lpfeat")
def compact_linear_features(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactLinearFeatures(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


@register_model("x-compact-lpgatefeat")
def compact_gated_linear_features(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactLinearFeatures(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head, linear_gate=True)


@register_model("x-compact-lpgate")
def compact_linear_gate(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    # Trained under this name in section 23 before it was the package's ``linear_gate`` (same layers and
    # order; the folders' layer "gate" was renamed "linear_gate" in their model files).
    return CompactPhaseNet(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head, linear_path=True,
                           linear_gate=True)


@register_model("x-compact-lpgate-drop2")
def compact_linear_gate_dropout_02(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactPhaseNet(n_px, out_px, dropout=0.2, in_channels=in_channels, sigma_head=sigma_head, linear_path=True,
                           linear_gate=True)


class CompactPatternGate(CompactPhaseNet):
    """The package's gated linear path with one gain per pattern (the gate reads the features' 8×8 mean)."""

    def __init__(self, n_px=32, out_px=32, in_channels=1, sigma_head=False):
        super().__init__(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head, linear_path=True,
                         linear_gate=True)

    def _linear_gain(self, features):
        return 1 + self.linear_gate(features.mean((-2, -1), keepdim=True))


@register_model("x-compact-lpgate1")
def compact_pattern_gate(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactPatternGate(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


class _DepthwiseResidual(nn.Module):
    """3×3 depthwise conv-BN-ReLU, 1×1 conv-BN, identity shortcut, ReLU; starts as the identity (then ReLU)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(inplace=True), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        nn.init.zeros_(self.body[-1].weight)

    def forward(self, x):
        return F.relu(x + self.body(x))


class CompactDepthwise(CompactPhaseNet):
    """The package's compact network with cheap depthwise-separable blocks at 16×16 and 8×8."""

    def __init__(self, n_px=32, out_px=32, in_channels=1, sigma_head=False):
        super().__init__(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head, linear_path=True,
                         linear_gate=True)
        w1, w2 = self.down1[0].out_channels, self.decode.body[0][0].in_channels
        self.refine16 = _DepthwiseResidual(w1)
        self.refine8 = nn.Sequential(_DepthwiseResidual(w2), _DepthwiseResidual(w2))

    def forward(self, x):
        amplitude = normalise_amplitude(x)
        skip = self.down2(self.refine16(self.down1(self.stem(amplitude))))
        features = self.refine8(self.decode(self._fuse(self.mixer(self.down3(skip)), skip)))
        return self._output(features, self._linear_term(amplitude, features))


@register_model("x-compact-dw")
def compact_depthwise(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactDepthwise(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


class CompactLinearMixture(CompactPhaseNet):
    """The gated linear path plus ``maps`` more linear estimators, each with its own per-pixel gate."""

    def __init__(self, n_px=32, out_px=32, in_channels=1, sigma_head=False, maps=3):
        super().__init__(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head, linear_path=True,
                         linear_gate=True)
        width = self.decode.body[0][0].in_channels
        self.maps = maps
        self.more_linear = nn.Linear(n_px * n_px, maps * (n_px // 4) ** 2)
        nn.init.zeros_(self.more_linear.weight)
        nn.init.zeros_(self.more_linear.bias)
        # Gates keep torch's initialisation: with the maps at zero a zero gate would give neither a gradient.
        self.more_gates = nn.Conv2d(width, maps, 1)

    def forward(self, x):
        amplitude = normalise_amplitude(x)
        skip = self.down2(self.down1(self.stem(amplitude)))
        features = self.decode(self._fuse(self.mixer(self.down3(skip)), skip))
        side = features.shape[-1]
        estimates = self.more_linear(self._probability(amplitude)).view(-1, self.maps, side, side)
        linear = self._linear_term(amplitude, features) + (self.more_gates(features) * estimates).sum(1, keepdim=True)
        return self._output(features, linear)


@register_model("x-compact-lpmix")
def compact_linear_mixture(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactLinearMixture(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expansion-BN-ReLU, 3×3 depthwise-BN-ReLU, 1×1 projection-BN (linear), identity
    shortcut, no activation after the sum."""

    def __init__(self, c: int, expansion: int, dropout: float = 0.0):
        super().__init__()
        hidden = c * expansion
        self.body = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                  nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                  nn.Dropout2d(dropout) if dropout else nn.Identity(),
                                  nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


def _inverted_stack(c: int, blocks: int, expansion: int, dropout: float) -> nn.Sequential:
    """``blocks`` inverted residual blocks, dropout in the first only (one per stack, as one per residual block)."""
    return nn.Sequential(*[_InvertedResidual(c, expansion, dropout if k == 0 else 0.0) for k in range(blocks)])


class CompactInverted(CompactPhaseNet):
    """The package's network (gated linear path) with each residual block (two dense 3×3 convolutions) replaced
    by ``blocks`` inverted residual blocks of expansion ``expansion``, at about the same operations: four of
    expansion 2 cost 9.0 MFLOP at 8×8 × 64 where the residual block costs 9.4, and see a 9×9 field (the
    whole 8×8 map) instead of 5×5."""

    def __init__(self, n_px=32, out_px=32, in_channels=1, sigma_head=False, blocks=4, expansion=2, dropout=0.1):
        super().__init__(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head, linear_path=True,
                         linear_gate=True, dropout=dropout)
        w2, w3 = self.decode.body[0][0].in_channels, self.mixer.norm1.normalized_shape[0]
        self.down2[1] = _inverted_stack(w2, blocks, expansion, dropout)
        self.down3[1] = _inverted_stack(w3, blocks, expansion, dropout)
        self.decode = _inverted_stack(w2, blocks, expansion, dropout)


@register_model("x-compact-ir")
def compact_inverted(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactInverted(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


class CompactInvertedDecoder(CompactPhaseNet):
    """The package's network (gated linear path) with only the decoder's residual block replaced by four
    inverted residual blocks of expansion 2 (9.0 MFLOP for 9.4): the encoder's dense blocks, which ``x-compact-ir``
    lost at high dose, stay; the decoder sees the whole 8×8 map (9×9 field), where ``x-compact-ir`` gained at
    300 e/pattern on hBN."""

    def __init__(self, n_px=32, out_px=32, in_channels=1, sigma_head=False, dropout=0.1):
        super().__init__(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head, linear_path=True,
                         linear_gate=True, dropout=dropout)
        self.decode = _inverted_stack(self.decode.body[0][0].in_channels, 4, 2, dropout)


@register_model("x-compact-irdec")
def compact_inverted_decoder(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactInvertedDecoder(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


class CompactHybrid(CompactPhaseNet):
    """The package's network (gated linear path) keeping its dense residual blocks at 8×8 and adding two inverted
    residual blocks of expansion 2 after the decoder's (4.5 MFLOP), paid for by the 4×4 block before the mixer
    becoming two inverted residual blocks of expansion 2 (2.5 MFLOP for 5.3): 35.0 MFLOP, 16.2× fewer than the
    seed U-Net. The dense blocks that fit the high doses, and the decoder's wider field that helped at 300."""

    def __init__(self, n_px=32, out_px=32, in_channels=1, sigma_head=False, dropout=0.1):
        super().__init__(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head, linear_path=True,
                         linear_gate=True, dropout=dropout)
        w2, w3 = self.decode.body[0][0].in_channels, self.mixer.norm1.normalized_shape[0]
        self.down3[1] = _inverted_stack(w3, 2, 2, dropout)
        self.decode = nn.Sequential(self.decode, _inverted_stack(w2, 2, 2, 0.0))


@register_model("x-compact-hybrid")
def compact_hybrid(n_px=32, out_px=32, in_channels=1, sigma_head=False):
    return CompactHybrid(n_px, out_px, in_channels=in_channels, sigma_head=sigma_head)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
