"""Random phase objects for training, generated in batches on any torch device.

The original work turned stock photographs into pure-phase objects. Without internet we draw from
two offline sources:

* **natural images** shipped with scikit-image (cameraman, moon, coins, textures, ...), randomly
  cropped, rotated, flipped and zoomed;
* **procedural objects**: smooth random fields, atom-like Gaussian blobs on random lattices (with
  vacancies and a random basis) and in amorphous arrangements, and edges and holes.

Phase range. Every object is scaled to ``[0, φ_max]`` with ``φ_max`` drawn uniformly from
``phase_range`` (default 0.1–1.6 rad). The low end is a single light-atom layer at 300 kV (graphene,
hBN: a few tenths of a radian at an atom column); the high end covers heavy-atom columns and a few
nm of crystal before the phase wraps at π, where a phase object stops being what the detector
distinguishes. A constant phase is invisible in the diffraction pattern, so only the range matters.
``phase_scale="log-uniform"`` draws ``log φ_max`` uniformly instead: as many objects between 0.1 and
0.4 rad as between 0.4 and 1.6. A network regresses towards what it has seen, and with the uniform
draw only 7 % of the objects are as weak as a single hBN layer (0.2 rad): it returned hBN's contrast
9 % too weak even from noise-free data (benchmarks/RESULTS.md, section 14).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ValueRangeError
from ..wording import in_fields_of

# How a value is drawn from its range (CorpusConfig.phase_scale, .lattice_spacing_scale).
DRAW_SCALES = ("uniform", "log-uniform")
# The lattice objects' lattice constant, object pixels (see CorpusConfig.lattice_spacing).
DEFAULT_LATTICE_SPACING_PX = (2.5, 8.0)
CORPUS_KINDS = ("natural", "smooth", "lattice", "amorphous", "edges")
DEFAULT_MIX = {"natural": 0.3, "smooth": 0.15, "lattice": 0.25, "amorphous": 0.15, "edges": 0.15}
# Named corpora for ``deepphase train --corpus`` (and the corpus study): the seed's natural images only,
# procedural objects only, atom-like objects only, and our mix.
CORPUS_PRESETS = {
    "mix": DEFAULT_MIX,
    "natural": {"natural": 1.0},
    "procedural": {"smooth": 0.5, "edges": 0.5},
    "atoms": {"lattice": 0.6, "amorphous": 0.4},
}

# scikit-image images that ship inside the wheel (no download at run time).
_SKIMAGE_IMAGES = (
    "camera", "moon", "coins", "brick", "grass", "gravel", "page", "text", "clock", "cell",
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "shepp_logan_phantom", "microaneurysms",
)
_BANK_PX = 256
_bank_cache: dict[str, torch.Tensor] = {}


#: ``deepphase train``'s corpus options and the :class:`CorpusConfig` fields they set (its refusals name the
#: options on the command line, the fields from Python).
CORPUS_FIELDS = {"phase-range": "phase_range", "phase-scale": "phase_scale", "lattice-spacing": "lattice_spacing",
                 "lattice-spacing-scale": "lattice_spacing_scale"}
OPTION_OF_CORPUS_FIELD = {f: o for o, f in CORPUS_FIELDS.items()}


@dataclass(frozen=True)
class CorpusConfig:
    """What the training objects are made of; stored in model files."""

    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    phase_range: tuple[float, float] = (0.1, 1.6)
    phase_scale: str = "uniform"  # how φ_max is drawn from phase_range: "uniform" or "log-uniform"
    # Range of the ``lattice`` objects' lattice constant in object pixels. At the reference sampling
    # (0.2 Å/px) the default 2.5–8 px is 0.5–1.6 Å, denser than any crystal in projection; 2.5–16 px
    # also reaches hBN (12.5 px) and MoS2 (15.8 px). RESULTS.md section 26.
    lattice_spacing: tuple[float, float] = DEFAULT_LATTICE_SPACING_PX
    # How the lattice constant is drawn from lattice_spacing: "uniform" or "log-uniform" (as many lattices
    # below the range's geometric mean as above it: a wide range that keeps the dense lattices' share).
    lattice_spacing_scale: str = "uniform"

    def __post_init__(self):
        for name in ("phase_scale", "lattice_spacing_scale"):
            if getattr(self, name) not in DRAW_SCALES:
                raise ValueRangeError(in_fields_of(f"{OPTION_OF_CORPUS_FIELD[name]}: expected one of "
                                                   f"{', '.join(DRAW_SCALES)}, got {getattr(self, name)!r}", CORPUS_FIELDS))
        lo, hi = self.phase_range
        if not 0 < lo <= hi:
            raise ValueRangeError(in_fields_of(f"phase-range: expected 0 < MIN ≤ MAX radians, got {lo}, {hi}",
                                               CORPUS_FIELDS))
        lo, hi = self.lattice_spacing
        if not 1.0 <= lo <= hi:
            raise ValueRangeError(in_fields_of(f"lattice-spacing: expected 1 ≤ MIN ≤ MAX object pixels, got {lo}, {hi}",
                                               CORPUS_FIELDS))

    @classmethod
    def from_dict(cls, d: dict) -> "CorpusConfig":
        """The inverse of :meth:`to_dict`; model files written before a field existed get its default."""
        defaults = cls()
        return cls(mix=dict(d.get("mix", defaults.mix)),
                   phase_range=tuple(d.get("phase_range", defaults.phase_range)),
                   phase_scale=d.get("phase_scale", defaults.phase_scale),
                   lattice_spacing=tuple(d.get("lattice_spacing", defaults.lattice_spacing)),
                   lattice_spacing_scale=d.get("lattice_spacing_scale", defaults.lattice_spacing_scale))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["phase_range"] = list(self.phase_range)
        d["lattice_spacing"] = list(self.lattice_spacing)
        return d


def natural_image_bank(device=None) -> torch.Tensor:
    """Grey-scale images from scikit-image, each resized to 256×256, values in [0, 1]; (K, 1, 256, 256)."""
    key = str(device)
    if key not in _bank_cache:
        import skimage.data
        from skimage.color import rgb2gray

        images = []
        for name in _SKIMAGE_IMAGES:
            try:
                img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
            except Exception:  # an image that needs a download is skipped, never fetched
                continue
            if img.ndim == 3:
                img = rgb2gray(img[..., :3] / (255.0 if img.max() > 1 else 1.0))
            img = img - img.min()
            img = img / max(img.max(), 1e-12)
            t = torch.as_tensor(img, dtype=torch.float32)[None, None]
            images.append(F.interpolate(t, size=(_BANK_PX, _BANK_PX), mode="area"))
        _bank_cache[key] = torch.cat(images).to(device)
    return _bank_cache[key]


def _uniform(n, lo, hi, gen, device):
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _draw(n, value_range, scale, gen, device):
    """n values from ``value_range``: uniform, or ``scale == "log-uniform"`` with their logarithm uniform."""
    lo, hi = value_range
    if scale == "log-uniform":
        return torch.exp(_uniform(n, math.log(lo), math.log(hi), gen, device))
    return _uniform(n, lo, hi, gen, device)


def natural(n: int, size: int, gen: torch.Generator, device=None) -> torch.Tensor:
    """Random crops of natural images: rotation, flips, zoom (window covers 5–40 % of an image side)."""
    bank = natural_image_bank(device)
    idx = torch.randint(len(bank), (n,), generator=gen, device=device)
    theta = _uniform(n, 0, 2 * math.pi, gen, device)
    frac = _uniform(n, 0.05, 0.4, gen, device)
    flip = torch.where(torch.rand(n, generator=gen, device=device) < 0.5, -1.0, 1.0)
    centre = _uniform(2 * n, -1, 1, gen, device).view(n, 2) * (1 - frac[:, None] * 1.5).clamp_min(0)
    cos, sin = torch.cos(theta) * frac, torch.sin(theta) * frac
    affine = torch.stack(
        [torch.stack([cos * flip, -sin, centre[:, 0]], 1), torch.stack([sin * flip, cos, centre[:, 1]], 1)], 1
    )
    grid = F.affine_grid(affine, (n, 1, size, size), align_corners=False)
    return F.grid_sample(bank[idx], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[:, 0]


def smooth(n: int, size: int, gen: torch.Generator, device=None) -> torch.Tensor:
    """Gaussian-correlated random fields with correlation lengths of 0.7–8 pixels."""
    noise = torch.randn(n, size, size, generator=gen, device=device)
    k = torch.fft.fftfreq(size, device=device)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    sigma = torch.exp(_uniform(n, math.log(0.7), math.log(8.0), gen, device))
    kernel = torch.exp(-2 * (math.pi**2) * k2[None] * sigma[:, None, None] ** 2)
    field_ = torch.fft.ifft2(torch.fft.fft2(noise) * kernel).real
    return _normalise(field_)


def _gaussian_sum(coords: torch.Tensor, weights: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Sum of Gaussians at ``coords`` (n, K, 2) with ``weights`` (n, K) and widths ``sigma`` (n,)."""
    device = coords.device
    grid = torch.arange(size, device=device, dtype=torch.float32)
    dr = grid[None, None, :] - coords[..., 0:1]  # (n, K, size)
    dc = grid[None, None, :] - coords[..., 1:2]
    s2 = 2 * sigma[:, None, None] ** 2
    gr = torch.exp(-dr.square() / s2) * weights[..., None]
    gc = torch.exp(-dc.square() / s2)
    return torch.einsum("nki,nkj->nij", gr, gc)  # separable: Σ_k w_k g(r - r_k) g(c - c_k)


def lattice(n: int, size: int, gen: torch.Generator, device=None, max_atoms: int = 400,
            spacing_px: tuple[float, float] = DEFAULT_LATTICE_SPACING_PX,
            spacing_scale: str = "uniform") -> torch.Tensor:
    """Atom-like blobs on random 2-D lattices with a random basis, vacancies and rotation.

    The lattice constant is drawn from ``spacing_px``, uniformly or (``spacing_scale="log-uniform"``) with
    its logarithm uniform; the atoms' width scales with it up to 2.4 px (0.5 Å at the reference sampling),
    which the default range never exceeds, so that wide lattices hold atoms rather than smooth bumps."""
    spacing = _draw(n, spacing_px, spacing_scale, gen, device)
    gamma = torch.where(
        torch.rand(n, generator=gen, device=device) < 0.5,
        torch.full((n,), math.pi / 3, device=device),
        _uniform(n, math.pi / 3, math.pi / 2, gen, device),
    )
    rot = _uniform(n, 0, 2 * math.pi, gen, device)
    m = int(math.ceil(math.sqrt(max_atoms / 2)))
    ij = torch.stack(torch.meshgrid(torch.arange(-m, m, device=device), torch.arange(-m, m, device=device),
                                    indexing="ij"), -1).reshape(-1, 2).float()
    a1 = torch.stack([torch.cos(rot), torch.sin(rot)], 1) * spacing[:, None]
    a2 = torch.stack([torch.cos(rot + gamma), torch.sin(rot + gamma)], 1) * spacing[:, None]
    origin = size / 2 + _uniform(2 * n, -4, 4, gen, device).view(n, 2)
    sites = origin[:, None] + ij[None, :, 0:1] * a1[:, None] + ij[None, :, 1:2] * a2[:, None]
    # A second basis atom (honeycomb-like) in half of the lattices, with its own weight.
    basis = (a1 + a2) / 3
    second = sites + basis[:, None]
    has_second = (torch.rand(n, generator=gen, device=device) < 0.5).float()
    coords = torch.cat([sites, second], 1)
    w_main = _uniform(n, 0.5, 1.0, gen, device)
    w_second = _uniform(n, 0.2, 1.0, gen, device) * has_second
    weights = torch.cat([w_main[:, None].expand(-1, sites.shape[1]), w_second[:, None].expand(-1, sites.shape[1])], 1)
    weights = weights * (1 + 0.1 * torch.randn(weights.shape, generator=gen, device=device))
    vacancy_rate = _uniform(n, 0, 0.2, gen, device)
    weights = weights * (torch.rand(weights.shape, generator=gen, device=device) > vacancy_rate[:, None]).float()
    inside = ((coords > -6) & (coords < size + 6)).all(-1)
    weights = weights * inside.float()
    sigma = (spacing * _uniform(n, 0.12, 0.3, gen, device)).clamp_max(2.4)
    return _normalise(_gaussian_sum(coords, weights, sigma, size))


def amorphous(n: int, size: int, gen: torch.Generator, device=None, atoms: int = 160) -> torch.Tensor:
    """Gaussian blobs at random positions (no order), random density and widths."""
    coords = _uniform(n * atoms * 2, -4, size + 4, gen, device).view(n, atoms, 2)
    density = _uniform(n, 0.2, 1.0, gen, device)
    weights = (torch.rand(n, atoms, generator=gen, device=device) < density[:, None]).float()
    weights = weights * _uniform(n * atoms, 0.3, 1.0, gen, device).view(n, atoms)
    sigma = _uniform(n, 0.6, 1.8, gen, device)
    return _normalise(_gaussian_sum(coords, weights, sigma, size))


def edges(n: int, size: int, gen: torch.Generator, device=None) -> torch.Tensor:
    """Smoothed steps (a random half-plane) with up to three holes (discs of lower phase)."""
    grid = torch.arange(size, device=device, dtype=torch.float32) - size / 2
    rr, cc = torch.meshgrid(grid, grid, indexing="ij")
    angle = _uniform(n, 0, 2 * math.pi, gen, device)
    offset = _uniform(n, -8, 8, gen, device)
    width = _uniform(n, 0.3, 2.0, gen, device)
    d = torch.cos(angle)[:, None, None] * rr + torch.sin(angle)[:, None, None] * cc - offset[:, None, None]
    obj = torch.sigmoid(d / width[:, None, None])
    for _ in range(3):
        centre = _uniform(2 * n, -12, 12, gen, device).view(n, 2)
        radius = _uniform(n, 1.0, 6.0, gen, device) * (torch.rand(n, generator=gen, device=device) < 0.6).float()
        dist = torch.sqrt((rr - centre[:, 0, None, None]) ** 2 + (cc - centre[:, 1, None, None]) ** 2)
        obj = obj * torch.sigmoid((dist - radius[:, None, None]) / width[:, None, None])
    return _normalise(obj)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Scale each object to [0, 1]; a flat object stays flat (zero)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


_GENERATORS = {"natural": natural, "smooth": smooth, "lattice": lattice, "amorphous": amorphous, "edges": edges}


def random_phase_objects(
    n: int,
    size: int,
    gen: torch.Generator,
    corpus: CorpusConfig = CorpusConfig(),
    device=None,
) -> torch.Tensor:
    """A batch of ``n`` random phase objects, (n, size, size) float32, in radians.

    Kinds are drawn from ``corpus.mix``; each object is scaled to ``[0, φ_max]`` with
    ``φ_max ~ U(phase_range)`` (or ``log φ_max`` uniform, ``corpus.phase_scale == "log-uniform"``).
    """
    kinds = [k for k, w in corpus.mix.items() if w > 0]
    unknown = set(kinds) - set(_GENERATORS)
    if unknown:
        raise ValueError(f"corpus mix: unknown kinds {sorted(unknown)}; expected some of {CORPUS_KINDS}")
    weights = torch.tensor([corpus.mix[k] for k in kinds], dtype=torch.float32)
    choice = torch.multinomial(weights, n, replacement=True, generator=_cpu_generator(gen)).tolist()
    out = torch.empty(n, size, size, device=device)
    for i, kind in enumerate(kinds):
        sel = [j for j, c in enumerate(choice) if c == i]
        if sel:
            extra = ({"spacing_px": tuple(corpus.lattice_spacing), "spacing_scale": corpus.lattice_spacing_scale}
                     if kind == "lattice" else {})
            out[sel] = _GENERATORS[kind](len(sel), size, gen, device, **extra).to(out.dtype)
    phi_max = _draw(n, corpus.phase_range, corpus.phase_scale, gen, device)
    return out * phi_max[:, None, None]


def _cpu_generator(gen: torch.Generator) -> torch.Generator:
    """multinomial on CPU needs a CPU generator; derive one deterministically from ``gen``."""
    if gen.device.type == "cpu":
        return gen
    seed = int(torch.randint(2**62, (1,), generator=gen, device=gen.device).item())
    return torch.Generator().manual_seed(seed)
