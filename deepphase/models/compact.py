"""A compact network for live reconstruction: 17× fewer FLOPs per pattern than the seed's U-Net.

Three facts about the task shape it:

* The target is the central ``crop_px × crop_px`` real-space block upsampled by *nearest* neighbours,
  so it is piecewise constant: predicting it at the crop's own resolution (8×8) and repeating each
  value loses nothing. The seed's U-Net spends most of its operations decoding back to 32×32.
* Diffraction amplitude and real-space phase are related by a Fourier transform, a global relation:
  every detector pixel informs every real-space pixel. Convolutions see that only at the coarsest
  level, so the bottleneck (4×4) mixes all positions with an MLP across space (as MLP-Mixer does),
  which costs next to nothing at 16 positions.
* At a few electrons per pattern what is measurable is the first moments of the intensity: the centre
  of mass that DPC and iCoM image is *linear* in I/ΣI. The network's input is the amplitude √I, and
  ReLU layers make squares only approximately, so ``linear_path`` adds a linear map from I/ΣI
  straight to the 8×8 phase (a learned linear estimator, 0.13 MFLOP) that the rest corrects. It
  closed the gap to the seed's U-Net at 30 e/pattern (benchmarks/RESULTS.md section 22).
  ``linear_gate`` lets the network scale that estimate per output pixel, ``(1 + g)·L(I/ΣI)``: the
  shrinkage a Wiener filter applies to a linear estimate depends on the dose and on how well the pattern
  determines each pixel, which a single linear map cannot know. It closed the gap at 300 e/pattern
  (section 23).

A model is trained for one probe, and a crystal's image suffers when the data's probe is out of focus by
a nanometre (RESULTS.md §36). ``aberration_input`` makes a *probe-aware* network: it is told the
difference between the data's probe and its own — the defocus and astigmatism coefficients that the probe
check measures (:mod:`deepphase.data.aberrations`) — and trained over a range of them. The three numbers
scale and shift the features of every stage (FiLM: a small MLP gives a gain and bias per channel) and
blend linear maps of the linear path (to second order in them: the linear estimator is the probe's own);
both start at zero, so an untold network computes what the plain one does.

Layout: stem 3×3 at 32×32 → strided 3×3 convolutions to 16×16, 8×8, 4×4 with residual blocks →
mixer block at 4×4 → 1×1 fuse with the 8×8 skip (the coarse half at 4×4, then upsampled) → residual
block → 1×1 head at 8×8 (+ the linear path, gated) → nearest upsampling to the output grid.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .registry import GRID_MULTIPLE, SIGMA_HEADS, register_model
from .unet import normalise_amplitude


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """conv-BN-ReLU-conv-BN with an identity shortcut (same width)."""

    def __init__(self, c: int, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(c, c), nn.Dropout2d(dropout) if dropout else nn.Identity(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class _SpatialMixer(nn.Module):
    """MLP across the positions of a small feature map, then across channels, each with a shortcut."""

    def __init__(self, channels: int, positions: int, expansion: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.tokens = nn.Sequential(nn.Linear(positions, positions * expansion), nn.GELU(),
                                    nn.Linear(positions * expansion, positions))
        self.norm2 = nn.LayerNorm(channels)
        self.channels = nn.Sequential(nn.Linear(channels, channels * expansion), nn.GELU(),
                                      nn.Linear(channels * expansion, channels))

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, positions, channels)
        t = t + self.tokens(self.norm1(t).transpose(1, 2)).transpose(1, 2)
        t = t + self.channels(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class CompactPhaseNet(nn.Module):
    """(B, C, n, n) diffraction amplitudes → (B, 1, out, out) phase patches, predicted at ``n/4``.

    ``sigma_head`` adds a second output channel, the log of the scale b of a Laplace distribution of
    each pixel's error (σ = √2·b), trained by :func:`deepphase.training.loss.laplace_nll`; channel 0
    stays the phase. ``"shared"`` (or True): the 1×1 head makes both channels from the same features, so
    the likelihood also shapes the features. ``"detached"``: a small branch of its own (1×1 conv, ReLU,
    3×3 conv at 8×8) reads the decoder's features with their gradient stopped, so the phase trains
    exactly as without it (same initial weights too: the branch is made last).

    ``aberration_input``: the network also takes ``aberration`` (B, 3), the data's probe against the model's
    as (c_rr, c_rc, c_cc) in rad at the bright-field disk's edge, ``Δχ = (c_rr q_r² + 2 c_rc q_r q_c +
    c_cc q_c²) / r²`` (see the module docstring). Called with the patterns alone it uses the buffer
    ``aberration`` (3,), zero until set (:meth:`deepphase.models.modelfile.PhaseModel.told`): every engine
    calls ``network(x)``, and the buffer is part of the weights an ONNX export's digest reads.

    ``linear_path`` adds to the phase channel a linear map from the normalised intensity I/ΣI of the
    (centre) pattern to the 8×8 map; zero at initialisation, so training starts from the network alone.
    ``linear_gate`` (with ``linear_path``) multiplies that map by ``1 + g``, ``g`` a 1×1 convolution of the
    decoder's features (zero at initialisation too).

    ``C = in_channels``: 1 for one pattern per position (the seed's input), 9 for the 3×3
    neighbourhood of adjacent scan positions (channel ``3·(dr+1) + (dc+1)`` holds the pattern one
    step ``(dr, dc)`` away; see :mod:`deepphase.reconstruction.neighbourhood`). Only the stem sees
    the channels, so a neighbourhood costs 8·9·16 extra multiply-adds per stem pixel and nothing else.
    """

    def __init__(self, n_px: int = 32, out_px: int = 32, widths=(16, 32, 64, 96), dropout: float = 0.1,
                 in_channels: int = 1, sigma_head: bool = False, linear_path: bool = False,
                 linear_gate: bool = False, aberration_input: bool = False):
        super().__init__()
        if n_px % GRID_MULTIPLE:
            raise ValueError(f"n_px: the compact network needs a multiple of {GRID_MULTIPLE} pixels, got {n_px}")
        if int(in_channels) < 1:
            raise ValueError(f"in_channels: expected a positive number of input patterns, got {in_channels}")
        if linear_gate and not linear_path:
            raise ValueError("linear_gate: scales the linear path, so it needs linear_path=True")
        w0, w1, w2, w3 = widths
        self.out_px = out_px
        self.in_channels = int(in_channels)
        self.sigma_head = SIGMA_HEADS.get(sigma_head) if not isinstance(sigma_head, str) else sigma_head
        if self.sigma_head not in (None, "shared", "detached"):
            raise ValueError(f"sigma_head: expected False, 'shared' or 'detached', got {sigma_head!r}")
        self.stem = _conv_bn_relu(self.in_channels, w0)
        self.down1 = _conv_bn_relu(w0, w1, stride=2)  # n/2
        self.down2 = nn.Sequential(_conv_bn_relu(w1, w2, stride=2), _Residual(w2, dropout))  # n/4
        self.down3 = nn.Sequential(_conv_bn_relu(w2, w3, stride=2), _Residual(w3, dropout))  # n/8
        self.mixer = _SpatialMixer(w3, (n_px // 8) ** 2)
        self.fuse = _conv_bn_relu(w3 + w2, w2, kernel=1)
        self.decode = _Residual(w2, dropout)
        # Channel 1 (with the σ head): log of the Laplace scale of each pixel's error (see training.loss).
        self.head = nn.Conv2d(w2, 2 if self.sigma_head == "shared" else 1, 1)
        if self.sigma_head == "detached":
            # 1×1 to 16 channels, then 3×3 to one: 0.15 MFLOP a pattern, so the network stays ≥ 16× cheaper
            # than the seed's U-Net (a 3×3 64→32 first layer cost 2.4 MFLOP: 15.7×).
            self.sigma_branch = nn.Sequential(nn.Conv2d(w2, 16, 1), nn.ReLU(inplace=True),
                                              nn.Conv2d(16, 1, 3, padding=1))
        self.linear_path = None
        if linear_path:  # made last: the other layers start from the weights they have without it
            self.linear_path = nn.Linear(n_px * n_px, (n_px // 4) ** 2)
            nn.init.zeros_(self.linear_path.weight)
            nn.init.zeros_(self.linear_path.bias)
        self.linear_gate = None
        if linear_gate:  # made after the linear path, for the same reason
            self.linear_gate = nn.Conv2d(w2, 1, 1)
            nn.init.zeros_(self.linear_gate.weight)
            nn.init.zeros_(self.linear_gate.bias)
        self.aberration_input = bool(aberration_input)
        self.linear_aberration = None
        if self.aberration_input:  # made last, for the same reason; zero outputs: untold = the plain network
            self.register_buffer("aberration", torch.zeros(ABERRATION_TERMS))
            self._film_widths = (w0, w1, w2, w3, w2)  # stem, down1, down2, down3, decode
            self.film = nn.Sequential(nn.Linear(ABERRATION_TERMS, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                                      nn.Linear(64, 2 * sum(self._film_widths)))
            nn.init.zeros_(self.film[-1].weight)
            nn.init.zeros_(self.film[-1].bias)
            if self.linear_path is not None:  # one map per term of the second-order expansion in c
                self.linear_aberration = nn.Linear(n_px * n_px, (n_px // 4) ** 2 * len(_SECOND_ORDER), bias=False)
                nn.init.zeros_(self.linear_aberration.weight)

    def _fuse(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``fuse(cat(upsample(coarse), skip))`` without the upsampled copy or the concatenation.

        A 1×1 convolution commutes with nearest upsampling, so the coarse map's share of it runs at
        4×4 (a quarter of the operations) and is upsampled after. ``fuse`` stays one module (and one
        weight in the model file); its convolution may have been folded with its batch norm.
        """
        conv, rest = self.fuse[0], self.fuse[1:]
        c = coarse.shape[1]
        coarse = F.conv2d(coarse, conv.weight[:, :c])
        x = F.conv2d(skip, conv.weight[:, c:], conv.bias) + F.interpolate(coarse, scale_factor=2, mode="nearest")
        return rest(x)

    def _probability(self, amplitude: torch.Tensor) -> torch.Tensor:
        """I / ΣI of the centre pattern, flattened, from the RMS-normalised amplitude (its square is I / mean I).

        I / mean I itself, up to ~30 at a few counts, made a linear path train badly (RESULTS.md §22).
        """
        intensity = amplitude[:, self.in_channels // 2].square().flatten(1)
        return intensity / intensity.shape[1]

    def _linear_estimate(self, amplitude: torch.Tensor, side: int, aberration: torch.Tensor | None = None) -> torch.Tensor:
        """The linear path's (B, 1, side, side) phase from the RMS-normalised amplitude's centre pattern (and for
        a probe-aware network the maps its aberration blends)."""
        probability = self._probability(amplitude)
        linear = self.linear_path(probability)
        if aberration is not None and self.linear_aberration is not None:
            maps = self.linear_aberration(probability).unflatten(1, (len(_SECOND_ORDER), -1))
            linear = linear + (_second_order(aberration)[:, :, None] * maps).sum(1)  # (1, 9) broadcasts too
        return linear.view(-1, 1, side, side)

    def _linear_gain(self, features: torch.Tensor) -> torch.Tensor:
        """The gated linear path's gain at each 8×8 pixel, 1 + g(features)."""
        return 1 + self.linear_gate(features)

    def _output(self, features: torch.Tensor, linear: torch.Tensor | None = None) -> torch.Tensor:
        """The network's output from the decoder's features: the head, ``linear`` (B, 1, side, side) added to
        the phase channel, the detached σ branch appended, nearest upsampling to ``out_px``."""
        x = self.head(features)
        if linear is not None:
            x = torch.cat([x[:, :1] + linear, x[:, 1:]], 1)
        if self.sigma_head == "detached":
            x = torch.cat([x, self.sigma_branch(features.detach())], 1)
        return F.interpolate(x, size=(self.out_px, self.out_px), mode="nearest")

    def _linear_term(self, amplitude: torch.Tensor, features: torch.Tensor,
                     aberration: torch.Tensor | None = None) -> torch.Tensor | None:
        """What the linear path adds to the phase: its estimate, times the gate's gain where there is one
        (None without a linear path)."""
        if self.linear_path is None:
            return None
        linear = self._linear_estimate(amplitude, features.shape[-1], aberration)
        return linear if self.linear_gate is None else self._linear_gain(features) * linear

    def _films(self, aberration: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(gain − 1, bias) per stage, each (B, C, 1, 1), from the aberration (B, 3) (B = 1: one for all)."""
        out, at = [], 0
        values = self.film(aberration)
        for c in self._film_widths:
            gain, bias = values[:, at : at + c], values[:, at + c : at + 2 * c]
            out.append((gain[:, :, None, None], bias[:, :, None, None]))
            at += 2 * c
        return out

    def forward(self, x, aberration: torch.Tensor | None = None):
        amplitude = normalise_amplitude(x)
        films = None
        if self.aberration_input:
            if aberration is None:  # (1, 3), broadcast over the batch: an ONNX export keeps its batch axis dynamic
                aberration = self.aberration[None]
            aberration = aberration.to(amplitude.dtype)
            films = self._films(aberration)
        elif aberration is not None:
            raise ValueError("aberration: this network is not probe-aware (aberration_input=False)")

        def film(x, k):
            return x if films is None else x * (1 + films[k][0]) + films[k][1]

        skip = film(self.down2(film(self.down1(film(self.stem(amplitude), 0)), 1)), 2)
        features = film(self.decode(self._fuse(self.mixer(film(self.down3(skip), 3)), skip)), 4)
        return self._output(features, self._linear_term(amplitude, features, aberration))


# What a probe-aware network is told: (c_rr, c_rc, c_cc), and the products the linear path blends its maps by.
ABERRATION_TERMS = 3
_SECOND_ORDER = ((0,), (1,), (2,), (0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


def _second_order(c: torch.Tensor) -> torch.Tensor:
    """(B, 9): c_rr, c_rc, c_cc and their products, the terms of a second-order expansion in the aberration."""
    return torch.stack([c[:, t[0]] if len(t) == 1 else c[:, t[0]] * c[:, t[1]] for t in _SECOND_ORDER], 1)


@register_model("compact")
def compact(n_px: int = 32, out_px: int = 32, dropout: float = 0.1, in_channels: int = 1,
            sigma_head: bool | str = False, linear_path: bool = False, linear_gate: bool = False,
            aberration_input: bool = False) -> CompactPhaseNet:
    """The compact network (see the module docstring): for live reconstruction on CPUs and GPUs.

    ``in_channels=9`` takes a 3×3 neighbourhood of patterns per position instead of one;
    ``sigma_head`` ("shared" or True, or "detached") also predicts each pixel's log error scale (a
    second output channel; see :class:`CompactPhaseNet`); ``linear_path`` adds the linear estimator
    from the intensity and ``linear_gate`` its per-pixel scale (training turns both on; model files made
    before them have none); ``aberration_input`` makes it probe-aware (told the data's defocus and astigmatism).
    """
    return CompactPhaseNet(n_px, out_px, dropout=dropout, in_channels=in_channels, sigma_head=sigma_head,
                           linear_path=linear_path, linear_gate=linear_gate, aberration_input=aberration_input)


class RepConv(nn.Module):
    """A 3×3 conv-BN trained beside a 1×1 conv-BN (and a BN of its input where shapes allow).

    RepVGG's reparameterisable convolution: the branches are linear, so in inference they are one 3×3
    convolution (:meth:`merged`). Training sees a wider, better-conditioned block for the same
    inference cost (benchmarks/RESULTS.md section 21).
    """

    def __init__(self, conv: nn.Conv2d, norm: nn.BatchNorm2d):
        super().__init__()
        self.conv3, self.bn3 = conv, norm
        self.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(conv.out_channels)
        same = conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1)
        self.bn_id = nn.BatchNorm2d(conv.out_channels) if same else None

    def forward(self, x):
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        return y if self.bn_id is None else y + self.bn_id(x)

    @staticmethod
    def _folded(kernel: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        # The fold the engines use too (torch's; see reconstruction.engines.fold_batch_norm).
        return fuse_conv_bn_weights(kernel, None, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)

    @torch.no_grad()
    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(3×3 kernel, bias) of the single convolution that computes the block in inference mode."""
        kernel, bias = self._folded(self.conv3.weight, self.bn3)
        k1, b1 = self._folded(F.pad(self.conv1.weight, (1, 1, 1, 1)), self.bn1)
        kernel, bias = kernel + k1, bias + b1
        if self.bn_id is not None:
            c = self.conv3.in_channels
            identity = torch.zeros_like(self.conv3.weight)
            identity[torch.arange(c), torch.arange(c), 1, 1] = 1
            ki, bi = self._folded(identity, self.bn_id)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias


class RepCompactPhaseNet(CompactPhaseNet):
    """The compact network's training form with every 3×3 conv-BN a :class:`RepConv`.

    Its model files hold the plain ``compact`` network (:meth:`reparameterised`), which computes the
    same and costs the same as any compact network; only training (and its checkpoints) see the branches.
    """

    deploy_arch = "compact"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plain_config = (args, kwargs)
        for part in (self.stem, self.down1, self.down2, self.down3, self.decode):
            for block in [m for m in part.modules() if isinstance(m, nn.Sequential)]:
                for i in range(len(block) - 1):
                    conv, norm = block[i], block[i + 1]
                    if type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and isinstance(norm, nn.BatchNorm2d):
                        block[i], block[i + 1] = RepConv(conv, norm), nn.Identity()

    def reparameterised(self) -> CompactPhaseNet:
        """The plain compact network (same state-dict keys as ``compact``) that computes what this one does
        in inference mode: each merged (kernel, bias) becomes the convolution and a batch norm that only
        adds the bias (mean 0, variance 1 − eps, gain 1)."""
        merged = copy.deepcopy(self)
        for block in [m for m in merged.modules() if isinstance(m, nn.Sequential)]:
            for i in range(len(block) - 1):
                if isinstance(block[i], RepConv):
                    rep = block[i]
                    kernel, bias = rep.merged()
                    conv = nn.Conv2d(rep.conv3.in_channels, rep.conv3.out_channels, 3, rep.conv3.stride, 1, bias=False)
                    norm = nn.BatchNorm2d(rep.conv3.out_channels)
                    with torch.no_grad():
                        conv.weight.copy_(kernel)
                        norm.bias.copy_(bias)
                        norm.running_var.fill_(1.0 - norm.eps)
                    block[i], block[i + 1] = conv.to(kernel.device), norm.to(kernel.device)
        args, kwargs = self._plain_config
        plain = CompactPhaseNet(*args, **kwargs).to(next(self.parameters()).device)
        plain.load_state_dict(merged.state_dict())
        return plain.train(self.training)


@register_model("compact-rep")
def compact_rep(n_px: int = 32, out_px: int = 32, dropout: float = 0.1, in_channels: int = 1,
                sigma_head: bool | str = False, linear_path: bool = False, linear_gate: bool = False,
                aberration_input: bool = False) -> RepCompactPhaseNet:
    """The compact network trained with reparameterisable convolutions (:class:`RepCompactPhaseNet`);
    saved as, and used as, a plain ``compact`` network."""
    return RepCompactPhaseNet(n_px, out_px, dropout=dropout, in_channels=in_channels, sigma_head=sigma_head,
                              linear_path=linear_path, linear_gate=linear_gate, aberration_input=aberration_input)
