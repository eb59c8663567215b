"""The on-the-fly training stream: random phase objects → noisy diffraction amplitudes and targets.

Nothing is stored on disk. Batches are simulated on the device of the model (so a GPU never waits
for the CPU) from a seeded generator: the same seed and epoch give the same batches, which is what
makes ``--resume`` continue exactly.

Neighbourhood input (``neighbourhood=3``): each sample is the pattern at the centre position and
the 8 patterns one scan step ``step_px`` away along the rows, the columns and the diagonals, all from
the same random object (simulated ``2·margin`` pixels larger than a window), in the channel order of
:func:`neighbourhood_offsets`; the target stays the centre window's crop. Sub-pixel steps are made as
:func:`deepphase.data.simulate.simulate_scan` makes them: each window is cut at the integer part of
its offset and the probe is moved by the fractional part with the Fourier shift theorem. That is
exact (the probe is band-limited by its aperture; the object, which has sharp edges, would ring if it
were Fourier-shifted instead) and it is what a scan of the reference step (0.87 px) looks like, where
rounding the step to 1 px would train on 15 % more separation than the data has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..physics.forward import as_complex_tensor, diffraction_amplitude, diffraction_intensity, incident_counts, poisson_counts
from ..errors import ValueRangeError
from ..physics.geometry import Geometry, crop_window, upsample_nearest
from ..physics.instrument import coherent_modes
from ..physics.scan import REFERENCE_STEP_PX
from .phase_objects import CorpusConfig, random_phase_objects


def neighbourhood_offsets(size: int = 3) -> np.ndarray:
    """Scan-step offsets ``(dr, dc)`` of the channels of a ``size × size`` neighbourhood, (size², 2) int.

    Row-major: channel ``k`` is ``(k // size - size // 2, k % size - size // 2)``, so the centre pattern
    is channel ``size² // 2`` (4 for 3×3), channel 3 is one step back along the columns and channel 1
    one step back along the rows.
    """
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise ValueRangeError(f"neighbourhood: expected an odd number of positions per side (1 or 3), got {size}")
    half = size // 2
    dr, dc = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1), indexing="ij")
    return np.stack([dr.ravel(), dc.ravel()], axis=1)


@dataclass
class Batch:
    amplitude: torch.Tensor  # (B, C, n, n): sqrt(counts); C = 1, or size² for a neighbourhood
    target: torch.Tensor  # (B, 1, out, out): phase of the central crop, upsampled
    phase: torch.Tensor  # (B, n, n): the whole phase window (the centre one for a neighbourhood)
    # (B, 3): each pattern's probe aberration against the stream's probe, (c_rr, c_rc, c_cc) in rad at the
    # bright-field disk's edge (``aberration_range`` streams only; see TrainingStream)
    aberration: torch.Tensor | None = None

    def rows(self, lo: int, hi: int) -> "Batch":
        """Samples ``lo:hi`` of the batch."""
        return Batch(self.amplitude[lo:hi], self.target[lo:hi], self.phase[lo:hi],
                     None if self.aberration is None else self.aberration[lo:hi])


# Share of an ``aberration_range`` stream's patterns simulated with the probe as given (told zero): the model's
# own probe is the commonest case (a probe adjusted to the model's focus), and the one it must not lose.
MATCHED_SHARE = 0.25
# Values a ``source_size_px`` or ``focal_spread_rad`` range draws from (each its own coherent modes, made once; both
# ranges: every pair).
COHERENCE_STEPS = 7


def _range(name: str, value) -> tuple[float, float]:
    """A value or a (lo, hi) range of a partial-coherence option, as (lo, hi)."""
    lo, hi = (value, value) if np.isscalar(value) else (float(v) for v in value)
    if not (0 <= lo <= hi and np.isfinite(hi)):
        raise ValueRangeError(f"{name}: expected a value ≥ 0 or a range lo ≤ hi, got {value}")
    return float(lo), float(hi)


class TrainingStream:
    """Simulated training pairs for one probe, geometry, corpus and dose.

    Parameters
    ----------
    probe : complex array (n, n)
    geometry : Geometry
    corpus : CorpusConfig
    dose : float or (float, float)
        Incident electrons per pattern; a pair ``(lo, hi)`` draws each pattern's dose log-uniformly
        (the patterns of one neighbourhood share their dose, as a scan does).
    device : torch device for the simulation.
    neighbourhood : int
        1 (default): one pattern per sample. 3: the 3×3 neighbourhood of patterns around each sample's
        centre position (9 channels, see :func:`neighbourhood_offsets`).
    step_px : float
        Scan step of the neighbourhood in real-space pixels (default: the reference scan's 0.87 px).
    defocus_spread : float
        0 (default): every pattern with ``probe``. Otherwise each pattern's probe gets a defocus of its own,
        drawn uniformly so that it adds up to this many rad at the bright-field disk's edge either way (a
        model for data whose focus is known only so well; :mod:`deepphase.data.aberrations`). One pattern
        per sample only.
    aberration_range : float
        0 (default): as above. Otherwise each pattern's probe gets a defocus and astigmatism of its own and the
        batch says which (``Batch.aberration``, what a probe-aware network is told): a defocus adding up to this
        many rad at the disk's edge either way and an astigmatism of up to half that, at any angle;
        ``MATCHED_SHARE`` of the patterns keep the probe as given. One pattern per sample only.
    source_size_px : float or (float, float)
        0 (default): a coherent probe. Otherwise the standard deviation (real-space pixels) of a Gaussian
        effective source (:mod:`deepphase.physics.instrument`): each pattern is the sum of the intensities of
        the probe's coherent modes under it, and the target stays the object itself. A pair ``(lo, hi)``
        gives each sample one of ``COHERENCE_STEPS`` sizes evenly spaced from lo to hi (a neighbourhood's patterns
        share it). With the probe as given.
    focal_spread_rad : float or (float, float)
        Likewise an incoherent Gaussian spread of focus (standard deviation in rad at the bright-field disk's
        edge), or a range; with ``source_size_px`` too, the modes of both.
    """

    def __init__(self, probe: np.ndarray, geometry: Geometry, corpus: CorpusConfig, dose, device="cpu",
                 neighbourhood: int = 1, step_px: float = REFERENCE_STEP_PX, defocus_spread: float = 0.0,
                 aberration_range: float = 0.0, source_size_px: float | tuple[float, float] = 0.0,
                 focal_spread_rad: float | tuple[float, float] = 0.0):
        self.geometry = geometry
        self.corpus = corpus
        self.dose = dose
        self.device = torch.device(device)
        self.probe = as_complex_tensor(probe, self.device)
        self.probe_counts = incident_counts(probe)
        self.neighbourhood = int(neighbourhood)
        self.step_px = float(step_px)
        offsets = neighbourhood_offsets(self.neighbourhood) * self.step_px  # validates the size
        if self.neighbourhood > 1 and not 0 < self.step_px <= geometry.n_px / 4:
            raise ValueRangeError(f"step_px: expected a scan step in (0, {geometry.n_px / 4:g}] pixels for a "
                                  f"neighbourhood, got {step_px}")
        corners = np.floor(offsets + 1e-9).astype(int)  # an integer step stays an integer shift
        self.margin = int(max(0, -corners.min(), corners.max()))
        self._corners = corners + self.margin  # top-left corner of each window in the larger object
        self.probes = self._shifted_probes(offsets - corners)  # (C, n, n)
        self.defocus_spread = float(defocus_spread)
        self.aberration_range = float(aberration_range)
        for name, value in (("defocus_spread", self.defocus_spread), ("aberration_range", self.aberration_range)):
            if value and (not (np.isfinite(value) and value > 0) or self.neighbourhood != 1):
                raise ValueRangeError(f"{name}: expected a positive number of rad for single patterns, got {value} "
                                      f"with a neighbourhood of {self.neighbourhood}")
        if self.defocus_spread and self.aberration_range:
            raise ValueRangeError("defocus_spread and aberration_range: a stream draws its probes one way; give one")
        if self.defocus_spread or self.aberration_range:
            from .calibration import model_disk

            q = torch.fft.fftfreq(geometry.n_px, d=1.0 / geometry.n_px, dtype=torch.float64)  # FFT order, pixels
            qr, qc = q[:, None].expand(-1, geometry.n_px), q[None, :].expand(geometry.n_px, -1)
            # Δχ = (c_rr q_r² + 2 c_rc q_r q_c + c_cc q_c²) / r² about the zero frequency, c in rad at the edge
            # (DESIGN.md's centring only adds a shift, which commutes with it)
            terms = torch.stack([qr**2, 2 * qr * qc, qc**2]) / model_disk(probe)["radius"] ** 2
            self._aberration_terms = terms.to(self.device)
            self._probe_k = torch.fft.fft2(self.probe.to(torch.complex128))
        self.source_size_px = _range("source_size_px", source_size_px)
        self.focal_spread_rad = _range("focal_spread_rad", focal_spread_rad)
        self._coherence_modes = None
        if self.source_size_px[1] > 0 or self.focal_spread_rad[1] > 0:
            if self.defocus_spread or self.aberration_range:
                raise ValueRangeError("source_size_px, focal_spread_rad: partial coherence is simulated with the "
                                      "probe as given (no defocus_spread or aberration_range)")
            from .simulate import focal_spread_per_px2

            sizes, spreads = (np.linspace(lo, hi, COHERENCE_STEPS) if hi > lo else [lo]
                              for lo, hi in (self.source_size_px, self.focal_spread_rad))
            # each table entry: the modes moved to every channel's position, (C, M, n, n)
            self._coherence_modes = [
                self._shifted(torch.as_tensor(coherent_modes(probe, size, focal_spread_per_px2(probe, spread))),
                              offsets - corners) for size in sizes for spread in spreads]

    @property
    def channels(self) -> int:
        """Patterns per sample."""
        return self.neighbourhood**2

    def _shifted_probes(self, fractions: np.ndarray) -> torch.Tensor:
        """The probe moved by each sub-pixel ``(row, col)`` fraction (Fourier shift), (C, n, n) complex64."""
        return self._shifted(self.probe, fractions)

    def _shifted(self, waves: torch.Tensor, fractions: np.ndarray) -> torch.Tensor:
        """``waves`` (..., n, n) moved by each sub-pixel fraction (Fourier shift), (C, ..., n, n) complex64."""
        n = self.geometry.n_px
        k = torch.fft.fftfreq(n, dtype=torch.float64)
        frac = torch.as_tensor(fractions, dtype=torch.float64)
        ramp = torch.exp(-2j * torch.pi * (frac[:, 0, None, None] * k[None, :, None]
                                           + frac[:, 1, None, None] * k[None, None, :]))
        waves_k = torch.fft.fft2(waves.cpu().to(torch.complex128))
        ramp = ramp.view(len(frac), *([1] * (waves_k.dim() - 2)), n, n)
        return torch.fft.ifft2(waves_k[None] * ramp).to(self.device, torch.complex64)

    def aberrated_probes(self, aberration: torch.Tensor) -> torch.Tensor:
        """The probe with each row's aberration (c_rr, c_rc, c_cc) in rad at the disk's edge (see
        :func:`deepphase.data.aberrations.add_aberrations`), (B, n, n) complex64 (``defocus_spread`` and
        ``aberration_range`` streams only)."""
        phase = torch.einsum("bk,kij->bij", aberration.to(torch.float64), self._aberration_terms)
        return torch.fft.ifft2(self._probe_k[None] * torch.exp(1j * phase)).to(torch.complex64)

    def defocused_probes(self, edge: torch.Tensor) -> torch.Tensor:
        """The probe with a defocus adding ``edge`` rad at the disk's edge, for each value, (B, n, n) complex64."""
        edge = edge.to(torch.float64)
        return self.aberrated_probes(torch.stack([edge, torch.zeros_like(edge), edge], 1))

    def random_aberrations(self, size: int, gen: torch.Generator) -> torch.Tensor:
        """``size`` draws of (c_rr, c_rc, c_cc) for an ``aberration_range`` stream, (B, 3) float64 (see the class)."""
        u = torch.rand(size, 4, generator=gen, device=self.device, dtype=torch.float64)
        defocus = self.aberration_range * (2 * u[:, 0] - 1)
        astigmatism, angle = 0.5 * self.aberration_range * u[:, 1], torch.pi * u[:, 2]
        c = torch.stack([defocus + astigmatism * torch.cos(2 * angle), astigmatism * torch.sin(2 * angle),
                         defocus - astigmatism * torch.cos(2 * angle)], 1)
        return c * (u[:, 3:] >= MATCHED_SHARE)

    def neighbour_windows(self, objects: torch.Tensor) -> torch.Tensor:
        """The probe windows of every channel cut from objects (B, n + 2·margin, n + 2·margin) → (B, C, n, n)."""
        n = self.geometry.n_px
        return torch.stack([objects[:, r : r + n, c : c + n] for r, c in self._corners], dim=1)

    def noise_free_intensity(self, objects: torch.Tensor) -> torch.Tensor:
        """Expected diffraction intensity of every channel at the probe's own scale, (B, C, n, n)."""
        return diffraction_intensity(self.probes, self.neighbour_windows(objects))

    def batch(self, size: int, gen: torch.Generator) -> Batch:
        n = self.geometry.n_px
        phase = random_phase_objects(size, n + 2 * self.margin, gen, self.corpus, self.device)
        aberration = None
        if self.neighbourhood == 1 and self.aberration_range:
            aberration = self.random_aberrations(size, gen)
            intensity = diffraction_intensity(self.aberrated_probes(aberration), phase)
        elif self.neighbourhood == 1 and self.defocus_spread:
            edge = self.defocus_spread * (2 * torch.rand(size, generator=gen, device=self.device, dtype=torch.float64) - 1)
            intensity = diffraction_intensity(self.defocused_probes(edge), phase)
        elif self._coherence_modes is not None:  # (C, M, n, n) modes × (b, C, 1, n, n) windows, summed over the modes
            which = torch.randint(len(self._coherence_modes), (size,), generator=gen, device=self.device)
            windows = self.neighbour_windows(phase)
            intensity = torch.empty(size, self.channels, n, n, device=self.device)
            for i, modes in enumerate(self._coherence_modes):
                chosen = which == i
                if chosen.any():
                    intensity[chosen] = diffraction_intensity(modes, windows[chosen, :, None]).sum(2)
            if self.neighbourhood == 1:
                intensity = intensity[:, 0]
            else:
                phase = phase[:, self.margin : self.margin + n, self.margin : self.margin + n]
        elif self.neighbourhood == 1:
            intensity = diffraction_intensity(self.probe, phase)
        else:
            intensity = self.noise_free_intensity(phase)  # (B, C, n, n)
            phase = phase[:, self.margin : self.margin + n, self.margin : self.margin + n]
        if isinstance(self.dose, (tuple, list)):
            lo, hi = np.log(self.dose[0]), np.log(self.dose[1])
            dose = torch.exp(lo + (hi - lo) * torch.rand(size, generator=gen, device=self.device))
            dose = dose.view(size, *([1] * (intensity.dim() - 1)))
        else:
            dose = float(self.dose)
        counts = poisson_counts(intensity, dose, self.probe_counts, gen)
        target = upsample_nearest(crop_window(phase, self.geometry), self.geometry.upsample)
        amplitude = diffraction_amplitude(counts)
        return Batch(amplitude[:, None] if self.neighbourhood == 1 else amplitude, target[:, None], phase,
                     None if aberration is None else aberration.to(torch.float32))

    def generator(self, seed: int, epoch: int = 0) -> torch.Generator:
        """A generator whose state depends only on (seed, epoch): epochs can be replayed exactly."""
        return torch.Generator(device=self.device).manual_seed(int(seed) * 1_000_003 + int(epoch))

    def epoch(self, seed: int, epoch: int, steps: int, batch_size: int):
        """Yield ``steps`` batches of epoch ``epoch``."""
        gen = self.generator(seed, epoch)
        for _ in range(steps):
            yield self.batch(batch_size, gen)

    def fixed_set(self, seed: int, size: int, batch_size: int = 256) -> list[Batch]:
        """A validation set drawn once per run from its own seed (never seen in training)."""
        gen = torch.Generator(device=self.device).manual_seed(int(seed) + 987_654_321)
        out, left = [], size
        while left > 0:
            out.append(self.batch(min(batch_size, left), gen))
            left -= batch_size
        return out
