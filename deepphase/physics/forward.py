"""The forward model: probe × object → far-field diffraction → counting noise → network input.

Batched in torch so the training stream runs on the same device as the network. The Fourier
convention is the one in DESIGN.md: ``Ψ = fftshift(fft2(ifftshift(ψ)))``, unnormalised, so that
``Σ|Ψ|² = n² Σ|ψ|²`` and the zero frequency sits at ``(n//2, n//2)``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DeepPhaseError, ValueRangeError

_AXES = (-2, -1)


def as_complex_tensor(probe: np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """The probe as a complex64 tensor on ``device``."""
    return torch.as_tensor(np.asarray(probe) if not torch.is_tensor(probe) else probe).to(
        device=device, dtype=torch.complex64
    )


def exit_wave(probe: torch.Tensor, phase: torch.Tensor, amplitude: torch.Tensor | None = None) -> torch.Tensor:
    """Exit wave ``P · A · exp(i φ)`` of a thin object; ``phase`` is (..., n, n) in radians."""
    if phase.is_complex():
        raise DeepPhaseError(f"phase: expected real radians, got a {phase.dtype} tensor (the exit wave is made here)")
    if not phase.is_floating_point():  # (an integer phase image: torch.polar takes floats only)
        phase = phase.to(torch.float32)
    if amplitude is not None and not amplitude.is_floating_point():
        amplitude = amplitude.to(phase.dtype)
    transmission = torch.polar(torch.ones_like(phase) if amplitude is None else amplitude, phase)
    return probe * transmission


def far_field(wave: torch.Tensor) -> torch.Tensor:
    """Far-field (detector-plane) wave of a real-space wave, zero frequency centred, unnormalised."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(wave, dim=_AXES)), dim=_AXES)


def diffraction_intensity(probe: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Noise-free diffraction intensity ``|F(P · exp(iφ))|²`` for a batch of phase windows."""
    return far_field(exit_wave(probe, phase)).abs().square()


def incident_counts(probe: np.ndarray | torch.Tensor) -> float:
    """Total expected counts ``n² Σ|P|²`` of a pattern at the probe's own scale (no object)."""
    p = probe if torch.is_tensor(probe) else torch.as_tensor(np.asarray(probe))
    n = p.shape[-1]
    return float(n * n * p.abs().square().sum())


#: The largest dose simulated: beyond ~1e25 float32 Poisson draws came out wrong, and no detector gets near.
#: Electrons per pattern of the reference experiment: the reference probe's own scale, n²·Σ|P|² (an optics probe,
#: normalised to Σ|P|² = 1, has n²).
REFERENCE_DOSE = 27_881.8
MAX_DOSE = 1e12


def poisson_counts(
    intensity: torch.Tensor,
    dose: float | torch.Tensor,
    probe_counts: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw detector counts at ``dose`` incident electrons per pattern.

    The intensity is scaled *before* sampling so that a pattern of a pure-phase object has
    ``dose`` expected counts; ``probe_counts`` is :func:`incident_counts` of the probe that made it.
    """
    if not bool(torch.all(torch.as_tensor(dose) > 0)):
        raise ValueRangeError(f"dose: expected a positive number of electrons per pattern, got {dose!r}")
    if not bool(torch.all(torch.as_tensor(dose) <= MAX_DOSE)):  # float32 Poisson sampling breaks down beyond
        raise ValueRangeError(f"dose: at most {MAX_DOSE:.0e} electrons per pattern are simulated (float32 counts "
                              f"lose their noise and then their values beyond it), got {float(torch.max(torch.as_tensor(dose))):.3g}")
    return torch.poisson(intensity * (dose / probe_counts), generator=generator)


def diffraction_amplitude(counts: torch.Tensor) -> torch.Tensor:
    """The network's input: the square root of the counts."""
    return counts.clamp_min(0).sqrt()


def dose_per_pattern(dose_per_area: float, step: float) -> float:
    """Electrons per pattern from a dose in e/Å² and a raster step in Å (one step² per pattern)."""
    if not dose_per_area > 0 or not step > 0:
        raise ValueRangeError(
            f"dose_per_area and step: expected positive numbers, got {dose_per_area!r} e/Å² and {step!r} Å"
        )
    return dose_per_area * step * step


def dose_per_area(dose_per_pattern_: float, step: float) -> float:
    """Dose in e/Å² of a raster with ``step`` Å and ``dose_per_pattern_`` electrons per pattern."""
    if not dose_per_pattern_ > 0 or not step > 0:
        raise ValueRangeError(
            f"dose_per_pattern and step: expected positive numbers, got {dose_per_pattern_!r} electrons and {step!r} Å"
        )
    return dose_per_pattern_ / (step * step)
