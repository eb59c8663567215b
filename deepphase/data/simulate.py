"""Simulated 4D-STEM scans of a phase object: the forward model applied at every scan position.

Sub-pixel positions: the window is cut at the integer part of the position and the probe is moved
by the fractional part with the Fourier shift theorem, so the illuminated spot sits exactly at
``position + n/2`` on the object grid, which is where the stitcher puts the patch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ShapeError, ValueRangeError
from ..wording import in_callers_words
from ..physics.forward import diffraction_amplitude, far_field, incident_counts, poisson_counts
from ..physics.instrument import check_width, coherent_modes, detector_blur
from ..physics.probe import validate_probe
from ..physics.scan import validate_positions


@dataclass
class SimulatedScan:
    """A simulated scan (:func:`simulate_scan`): what a detector would record, and the truth it was made from."""

    amplitude: np.ndarray  # (N, n, n) float32, sqrt(counts)
    positions: np.ndarray  # (N, 2)
    truth: np.ndarray  # phase image (radians) on the object grid
    dose: float  # incident electrons per pattern
    parameters: dict = field(default_factory=dict)


def required_object_shape(positions: np.ndarray, n_px: int) -> tuple[int, int]:
    """Smallest object that holds every probe window (plus one pixel for the sub-pixel shift)."""
    top = np.floor(positions.max(axis=0)).astype(int)
    return int(top[0]) + n_px + 1, int(top[1]) + n_px + 1


def focal_spread_per_px2(probe: np.ndarray, focal_spread_rad: float) -> float:
    """A focal spread given as rad at the probe's bright-field disk's edge, as rad per detector pixel² (÷ r²)."""
    if not (np.isfinite(focal_spread_rad) and focal_spread_rad >= 0):
        raise ValueRangeError(f"focal_spread_rad: expected a standard deviation ≥ 0 in rad at the disk's edge, "
                              f"got {focal_spread_rad}")
    if not focal_spread_rad:
        return 0.0
    from .calibration import model_disk

    return float(focal_spread_rad) / model_disk(probe)["radius"] ** 2


@in_callers_words()
def simulate_scan(
    phase: np.ndarray,
    probe: np.ndarray,
    positions: np.ndarray,
    dose: float | None = None,
    seed: int = 0,
    batch_size: int = 1024,
    noise: bool = True,
    progress: bool | None = None,
    source_size_px: float = 0.0,
    detector_psf_px: float = 0.0,
    focal_spread_rad: float = 0.0,
) -> SimulatedScan:
    """Diffraction amplitudes of a pure-phase object scanned by ``probe``.

    Parameters
    ----------
    phase : (H, W) phase image in radians.
    probe : complex (n, n) probe.
    positions : (N, 2) top-left corners of the probe windows, real-space pixels.
    dose : incident electrons per pattern (None: the probe's own scale, n²·Σ|P|²).
    seed : seed of the Poisson noise.
    noise : False gives the noise-free amplitude |F(P·O)| scaled to the dose.
    source_size_px : standard deviation of a Gaussian effective source, real-space pixels (0: a coherent
        probe): each pattern is the sum of the intensities of the probe's coherent modes under that source
        (:func:`deepphase.physics.instrument.coherent_modes`), the pattern averaged over the probe's jitter.
    focal_spread_rad : standard deviation of an incoherent Gaussian spread of focus (chromatic: Cc·ΔE/E), as
        the phase it adds at the bright-field disk's edge in rad (0: none); through the same modes.
    detector_psf_px : standard deviation of the detector's Gaussian point spread, detector pixels (0: none);
        applied to the expected counts before the Poisson noise, as a counting detector does.
    batch_size : patterns simulated at a time (default 1024).
    progress : a progress bar (tqdm): None (default) shows one where the output is a terminal.

    Returns
    -------
    SimulatedScan
        ``amplitude`` (N, n, n) float32 √counts, ``positions`` (N, 2) float64 as given, ``truth`` a float64 copy
        of ``phase``, ``dose`` (electrons per pattern) and ``parameters`` (what else was simulated).
    """
    if np.iscomplexobj(phase):
        raise ShapeError("phase: expected a real phase image in rad (the object is exp(i·phase)); got complex values")
    phase = np.asarray(phase, dtype=np.float64)
    if phase.ndim != 2:
        raise ShapeError(f"phase: expected a 2-D image, got shape {phase.shape}")
    if not np.all(np.isfinite(phase)):
        raise ValueRangeError("phase: contains NaN or Inf")
    probe = validate_probe(np.asarray(probe))
    n = probe.shape[-1]
    positions = validate_positions(positions, len(positions))  # (refuses none, too)
    modes = torch.as_tensor(coherent_modes(probe, source_size_px, focal_spread_per_px2(probe, focal_spread_rad)))
    check_width("detector_psf_px", detector_psf_px)  # before the work, not after the first batch
    need = required_object_shape(positions, n)
    if phase.shape[0] < need[0] or phase.shape[1] < need[1]:
        raise ShapeError(
            f"phase: the scan needs an object of at least {need[0]}×{need[1]} pixels, got {phase.shape[0]}×{phase.shape[1]}"
        )
    probe_counts = incident_counts(probe)
    dose = probe_counts if dose is None else float(dose)
    if not dose > 0:
        raise ValueRangeError(f"dose: expected a positive number of electrons per pattern, got {dose}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueRangeError(f"seed: expected a whole number ≥ 0 (the noise's seed, for a scan made again the same), "
                              f"got {seed!r}")
    gen = torch.Generator().manual_seed(int(seed))
    obj = torch.as_tensor(phase)
    modes_k = torch.fft.fft2(modes)
    k = torch.fft.fftfreq(n, dtype=torch.float64)
    rr, cc = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")

    def intensity_at(pos: torch.Tensor) -> torch.Tensor:
        corner = torch.floor(pos).long()
        frac = pos - corner
        ramp = torch.exp(-2j * torch.pi * (frac[:, 0, None, None] * k[None, :, None] + frac[:, 1, None, None] * k[None, None, :]))
        windows = obj[corner[:, 0, None, None] + rr[None], corner[:, 1, None, None] + cc[None]]
        transmission = torch.polar(torch.ones_like(windows), windows)
        return sum(far_field(torch.fft.ifft2(mode_k[None] * ramp) * transmission).abs().square() for mode_k in modes_k)

    out = np.empty((len(positions), n, n), dtype=np.float32)
    for start in tqdm(range(0, len(positions), batch_size), desc="simulating", disable=None if progress is None else not progress,
                      leave=False):
        pos = torch.as_tensor(positions[start : start + batch_size])
        intensity = detector_blur(intensity_at(pos), detector_psf_px)
        if noise:
            counts = poisson_counts(intensity, dose, probe_counts, gen)
        else:
            counts = intensity * (dose / probe_counts)
        out[start : start + len(pos)] = diffraction_amplitude(counts).numpy()
    parameters = {"seed": seed, "noise": noise, "n_px": n}
    if source_size_px or detector_psf_px or focal_spread_rad:
        parameters.update(source_size_px=float(source_size_px), detector_psf_px=float(detector_psf_px),
                          focal_spread_rad=float(focal_spread_rad), coherent_modes=len(modes))
    return SimulatedScan(out, positions, phase, dose, parameters)
