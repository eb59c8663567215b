"""What a real microscope adds to the coherent forward model: a finite source, a spread of focus, a detector's blur.

* **Partial spatial coherence.** The electron source has a finite size, demagnified onto the specimen: the
  probe's position jitters about the nominal one, incoherently, so every recorded pattern is the *intensity*
  average of the patterns of probes moved by that jitter (Gaussian, standard deviation ``source_size_px``
  real-space pixels; FWHM = 2.355 σ). In the scan's own Fourier space that is a damping envelope
  ``exp(−2π² σ² |g|²)`` on every component at spatial frequency g.
* **Partial temporal coherence.** The electrons' energies spread (0.3–0.8 eV for field emitters), and the
  objective's chromatic aberration turns that into a spread of focus, again incoherent: a Gaussian spread of
  the defocus coefficient, standard deviation ``focal_spread_rad_per_px2`` (Δχ = a·|q|², q in detector pixels;
  the data layer speaks of rad at the bright-field disk's edge, a·r²). 1 rad at the edge is about 1 nm of
  defocus at 300 kV and 25 mrad, and Cc·ΔE/E is 1–4 nm.
* Both average patterns, not waves: the probe's mutual intensity in reciprocal space is
  ``P̂(k) P̂*(k′) Γ(k, k′)`` with ``Γ = exp(−2π² σ² |k − k′|²) · exp(−½ s² (|q|² − |q′|²)²)``, whose
  eigenvectors are coherent modes (:func:`coherent_modes`, as mixed-state ptychography uses them) and whose
  eigenvalues are their shares of the current; a pattern is the sum of the modes' intensities, exact
  whatever the object. A few modes hold almost all of it (the reference probe's source alone, to 0.1 % of
  the current: 5 at σ = 0.25 px, 30 at 1 px, 108 at 2 px), where a quadrature over the jitter would need
  hundreds of probes to damp the pattern's finest interference.
* **The detector's point spread.** An electron is counted where it lands, give or take the spread of its
  charge (Merlin/Medipix) or of its scattering in the sensor: for a counting detector the expected counts
  are the intensity convolved with the point spread function (a Gaussian of ``detector_psf_px`` detector
  pixels here), and the counts are Poisson about that. (An integrating detector blurs the noise too; not
  modelled.) The convolution is circular, on the pattern's own grid, so counts are conserved exactly; the
  bright-field disk sits far enough from the edges for the wrap to be negligible.

abTEM models the first by blurring a simulated 4D dataset over its scan axes
(``DiffractionPatterns.gaussian_source_size``, as the harness's multislice cases do), which needs a scan finer
than σ; the modes work at any scan step, and for the training stream's single patterns.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ValueRangeError

# FWHM of a Gaussian over its standard deviation, 2·sqrt(2·ln 2).
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
# Share of the probe's current the pixels left out of the mutual intensity may hold (far below counting noise).
_DARK = 1e-9
# The largest number of lit spectrum pixels coherent_modes decomposes: an 8,192² complex matrix is 1 GiB.
MAX_LIT_PIXELS = 8192


def check_width(name: str, value: float) -> float:
    """``value`` as a float, refused unless a finite standard deviation ≥ 0 (the error names ``name``)."""
    value = float(value)
    if not (np.isfinite(value) and value >= 0):
        raise ValueRangeError(f"{name}: expected a finite standard deviation ≥ 0, got {value}")
    return value


def coherent_modes(probe: np.ndarray, source_size_px: float = 0.0, focal_spread_rad_per_px2: float = 0.0,
                   tolerance: float = 1e-3) -> np.ndarray:
    """The coherent modes of ``probe`` under a Gaussian source and focal spread, each scaled by the root of its share.

    Parameters
    ----------
    probe : (n, n) complex probe.
    source_size_px : standard deviation σ of the effective source on the specimen, real-space pixels.
    focal_spread_rad_per_px2 : standard deviation s of the defocus coefficient a (Δχ = a·|q|², q the frequency in
        detector pixels about the zero frequency, DESIGN.md's centring).
    tolerance : share of the current the dropped modes may hold (the kept ones are scaled up to carry it all).

    Returns
    -------
    (M, n, n) complex128 modes, strongest first: ``Σ_m |F(mode_m · O)|²`` is the pattern averaged over the
    source and the focus, with the probe's total current ``Σ_m Σ|mode_m|² = Σ|probe|²``. ``probe`` itself
    (M = 1) when both are 0. The modes are moved over the scan as the probe is (the jitter commutes with the shift).
    """
    sigma = check_width("source_size_px", source_size_px)
    spread = check_width("focal_spread_rad_per_px2", focal_spread_rad_per_px2)
    if not 0 < tolerance < 1:
        raise ValueRangeError(f"tolerance: expected a share of the current in (0, 1), got {tolerance}")
    probe = np.asarray(probe, dtype=np.complex128)
    if sigma == 0 and spread == 0:
        return probe[None].copy()
    n_r, n_c = probe.shape
    spectrum = np.fft.fft2(probe).ravel()  # the convention of simulate_scan's Fourier shift
    # Only where the probe has current: an aperture's probe lights a disk of its spectrum (213 of a 64-px grid's
    # 4,096 pixels at 25 mrad), and the mutual intensity is zero wherever either side is dark.
    power = np.abs(spectrum) ** 2
    order = np.argsort(power)[::-1]
    lit = np.sort(order[: int(np.searchsorted(np.cumsum(power[order]), (1 - _DARK) * power.sum())) + 1])
    if len(lit) > MAX_LIT_PIXELS:
        raise ValueRangeError(f"probe: its spectrum lights {len(lit):,} pixels; partial coherence needs the "
                              f"eigenvectors of a {len(lit):,}² matrix, and {MAX_LIT_PIXELS:,} is the most done here "
                              "(a smaller grid or a probe with a sharper aperture)")
    kr, kc = (k.ravel()[lit] for k in np.meshgrid(np.fft.fftfreq(n_r), np.fft.fftfreq(n_c), indexing="ij"))
    coherence = np.exp(-2 * np.pi**2 * sigma**2 * ((kr[:, None] - kr[None]) ** 2 + (kc[:, None] - kc[None]) ** 2))
    if spread:
        q2 = (kr * n_r) ** 2 + (kc * n_c) ** 2  # |q|² in detector pixels (fftfreq order, zero frequency at 0)
        coherence *= np.exp(-0.5 * spread**2 * (q2[:, None] - q2[None]) ** 2)
    shares, vectors = np.linalg.eigh(np.outer(spectrum[lit], spectrum[lit].conj()) * coherence)
    shares, vectors = shares[::-1].clip(min=0), vectors[:, ::-1]
    kept = int(np.searchsorted(np.cumsum(shares), (1 - tolerance) * shares.sum())) + 1
    spectra = np.zeros((kept, n_r * n_c), dtype=np.complex128)
    spectra[:, lit] = (vectors[:, :kept] * np.sqrt(shares[:kept])).T
    modes = np.fft.ifft2(spectra.reshape(kept, n_r, n_c))
    return modes * np.sqrt(np.sum(np.abs(probe) ** 2) / np.sum(np.abs(modes) ** 2))


def detector_blur(intensity: torch.Tensor, detector_psf_px: float) -> torch.Tensor:
    """Expected counts of a counting detector whose point spread is a Gaussian of σ = ``detector_psf_px`` pixels.

    ``intensity`` is (..., n, n), real; the result has the same shape and the same sum over each pattern.
    The kernel is the Gaussian sampled at the pixel centres (wrapped around the pattern) and normalised:
    positive, so no count is made or lost (its transfer function cut at the Nyquist frequency would ring).
    """
    sigma = check_width("detector_psf_px", detector_psf_px)
    if sigma == 0:
        return intensity
    kernel = torch.ones((), dtype=torch.float64, device=intensity.device)
    for size in intensity.shape[-2:]:
        d = torch.arange(size, dtype=torch.float64, device=intensity.device)
        d = torch.minimum(d, size - d)  # distance from pixel 0 around the circle
        profile = torch.exp(-0.5 * (d / sigma) ** 2)
        kernel = kernel[..., None] * (profile / profile.sum())
    blurred = torch.fft.ifft2(torch.fft.fft2(intensity.to(torch.float64)) * torch.fft.fft2(kernel)).real
    return blurred.clamp_min(0).to(intensity.dtype)
