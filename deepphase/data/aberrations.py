"""The data's probe against the model's: defocus and astigmatism measured from a raster scan.

A network is trained for one probe, and it is very sensitive to that probe's phase: on a simulated
twisted-hBN scan at the reference dose, a defocus that adds 0.6 rad of phase at the edge of the
bright-field disk takes the packaged default's correlation with the truth from 0.974 to 0.930, 1.1 rad
to 0.83, 2.2 rad to 0.36 (benchmarks/RESULTS.md §36) — and 1.1 rad is 1.1 nm of defocus at 300 kV and
25 mrad. Nothing in a single pattern tells the two probes apart, but the whole scan does. A thick
specimen shows the same: a probe focused on its entrance surface is out of focus in its middle
(multislice SrTiO₃, 3.9 nm: −1.7 rad of defocus, and a model trained for that probe does better on it).

Method (the weak-phase transfer of the scan's Fourier transform). For a weak-phase object the
patterns' Fourier transform over the probe positions, at the specimen's spatial frequency ``g``, is

    G(q, g) = i φ̂(g) · T(q, g),   T(q, g) = Φ*(q) Φ(q − g) − Φ(q) Φ*(q + g),

with ``Φ`` the probe's far field and ``q`` the detector pixel: ``T`` lives where the bright-field disk
overlaps its copies shifted by ±g (the "trotters"). The specimen sets one complex factor per frequency;
the shape of ``T`` across the detector is set by the probe alone. So the model's far field times
``exp(iΔχ(q))``, with ``Δχ = a_rr q_r² + 2 a_rc q_r q_c + a_cc q_c²`` (``q`` in detector pixels from the
grid centre ``n // 2``), is fitted by maximising the share of ``G`` that ``T`` explains, summed over the
strongest frequencies. ``Δχ`` is the defocus and astigmatism of the data's probe relative to the
model's, as the phase *added* to the far field: with :mod:`deepphase.physics.probe`'s aberration function
(far field ``A·exp(−iχ)``, abTEM's and Kirkland's sign) the data's ``χ`` is the model's **minus** ``Δχ``, so an
underfocus (Δf > 0, χ < 0) adds a positive ``Δχ``. The figure says "phase added" for that reason. The specimen need not be known, nor weak for the fit to hold: on the simulated twisted bilayer
(0.56 rad peak to peak) the coefficients come out within 0.0006 rad/px² of those put in, at 1,000
e/pattern as without noise (RESULTS §36).

Units: ``a`` in rad per detector pixel² of the model's grid. With the model grid's angular sampling
``s`` (mrad per pixel) and the wavelength ``λ`` (Å), a defocus ``Δf`` (Å, abTEM's sign: positive is
underfocus) adds ``a = π λ Δf (s / 1000 λ)²`` (:func:`defocus_angstrom` inverts it).
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy.optimize import minimize

from ..errors import ShapeError, ValueRangeError
from ..physics.probe import electron_wavelength
from ..physics.scan import raster_positions

__all__ = ["add_aberrations", "scan_spectrum", "weak_phase_transfer", "fit_probe_mismatch", "measure_probe_mismatch",
           "probe_mismatch_from_block", "probe_check_report", "model_grid_optics", "defocus_angstrom",
           "probe_mismatch_note", "hold_back_for_geometry", "plot_probe_mismatch", "plot_scan_step", "probe_difference",
           "edge_phase", "told_to_probe_aware", "told_for_scan", "scan_sense", "sense_from_block", "scan_step_from_block",
           "measure_scan_step", "find_scan_step", "check_scan_step", "step_check_from_block", "probe_check_from_block",
           "central_counts", "step_note", "STEP_REMEDY", "POSITIONS_STEP_REMEDY", "hold_back_for_step", "STEP_SEARCH_PX", "STEP_PROBE", "STEP_MISMATCH",
           "STEP_RATIO", "PROBE_CHECK_BLOCK", "PROBE_CHECK_MIN_PX", "MISMATCH_NOTE_RAD", "MIN_EXPLAINED",
           "SENSE_RATIO"]

#: The check reads the central block of this many positions a side (about 1 s on a 2-core CPU).
PROBE_CHECK_BLOCK = 64
#: Scans with fewer positions a side than this are not checked (too few frequencies).
PROBE_CHECK_MIN_PX = 16
#: A note when the fitted Δχ reaches this many rad at the disk edge (on simulated twisted hBN the default
#: loses 0.009 of correlation at +0.3 rad and 0.044 at +0.6, RESULTS §36).
MISMATCH_NOTE_RAD = 0.4
#: Below this share of the scan's spectrum explained, the fit is of counting noise: a scan of pure noise gives
#: 0.004–0.007 (24×24 to 64×64 positions; hBN at 30–300 e/pattern), where the fit can land anywhere, up to ±10 rad
#: at the edge with a small scatter between the halves. From 0.01 up the finding held within 0.3 rad of the truth
#: on the simulated scans of RESULTS §37. Weaker fits give no note and tell a probe-aware model nothing.
MIN_EXPLAINED = 0.01
#: Frequencies used: the strongest ones in the scan's spectrum, from 1.5 px up to the disk's diameter.
N_FREQUENCIES = 128
#: Largest |a| searched (rad/px²): beyond it a probe spreads past a 32-pixel window (its far field aliases).
A_MAX = 0.15


def _far_field(probe: np.ndarray) -> np.ndarray:
    # The forward model's convention (DESIGN.md): fftshift(fft2(ifftshift(·))), over the last two axes.
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(probe, axes=(-2, -1))), axes=(-2, -1))


def _centred(n: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.arange(n) - n // 2
    return np.meshgrid(d, d, indexing="ij")


def _delta_chi(coefficients, n: int) -> np.ndarray:
    a_rr, a_rc, a_cc = (float(c) for c in coefficients)
    qr, qc = _centred(n)
    return a_rr * qr**2 + 2 * a_rc * qr * qc + a_cc * qc**2


def add_aberrations(probe: np.ndarray, coefficients) -> np.ndarray:
    """The probe with ``exp(iΔχ(q))`` applied to its far field, ``Δχ = a_rr q_r² + 2 a_rc q_r q_c + a_cc q_c²``.

    Parameters
    ----------
    probe : (n, n) complex array, the model's probe.
    coefficients : (a_rr, a_rc, a_cc) in rad per detector pixel² (``q`` from the grid centre ``n // 2``).

    Returns
    -------
    (n, n) complex128 probe with the same total intensity (Parseval), hence the same dose scale.
    """
    probe = np.asarray(probe, dtype=np.complex128)
    if probe.ndim != 2 or probe.shape[0] != probe.shape[1]:
        raise ShapeError(f"probe: expected a square 2-D complex array, got shape {probe.shape}")
    if len(coefficients) != 3 or not np.all(np.isfinite(coefficients)):
        raise ValueRangeError(f"coefficients: expected three finite numbers (a_rr, a_rc, a_cc), got {coefficients!r}")
    far = _far_field(probe) * np.exp(1j * _delta_chi(coefficients, probe.shape[0]))
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(far)))


def weak_phase_transfer(far_field: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``T(q, g) = Φ*(q) Φ(q − g) − Φ(q) Φ*(q + g)`` for each frequency ``g`` (K, 2) in detector pixels.

    ``Φ(q ∓ g)`` off the pixel grid is the far field of the probe times a phase ramp (exact for the
    finite probe window, no interpolation). Returns (K, n, n) complex.
    """
    far_field = np.asarray(far_field, dtype=np.complex128)
    n = far_field.shape[-1]
    transfer = _transfer(_unshift(far_field), _unshift(_ramps(g, n)), np.complex128)
    return np.fft.fftshift(transfer, axes=(-2, -1))


# The fit works in FFT order (zero frequency and the real-space origin at index 0, DESIGN.md's arrays
# ifftshift-ed): its sums over the detector do not depend on the order, and no array is rolled per evaluation.
def _unshift(array: np.ndarray) -> np.ndarray:
    return np.fft.ifftshift(array, axes=(-2, -1))


def _ramps(g: np.ndarray, n: int) -> np.ndarray:
    r = np.stack(_centred(n))
    return np.exp(2j * np.pi * np.einsum("kc,cij->kij", np.asarray(g, dtype=np.float64), r) / n)


def _ramp_pairs(ramps: np.ndarray, dtype=np.complex64) -> np.ndarray:
    """The ramps and their conjugates, (2, K, n, n): made once per fit, not at every evaluation."""
    return np.stack([ramps, np.conj(ramps)]).astype(dtype)


def _transfer(far_field: np.ndarray, ramps: np.ndarray, dtype=np.complex64, pairs: np.ndarray | None = None
              ) -> np.ndarray:
    """T in FFT order from the far field and the ramps in FFT order (``pairs``: :func:`_ramp_pairs` of them)."""
    far_field = far_field.astype(dtype)
    probe = scipy.fft.ifft2(far_field)
    pairs = _ramp_pairs(ramps, dtype) if pairs is None else pairs
    # (the two shifted far fields in one batched FFT, on every core, in the product's own buffer)
    shifted = scipy.fft.fft2(probe * pairs, workers=-1, overwrite_x=True)
    return np.conj(far_field) * shifted[0] - far_field * np.conj(shifted[1])


def _scan_vectors(step_px, rotation_deg: float, fastest: str) -> np.ndarray:
    """Object-pixel displacement of one step along the scan rows and along the scan columns (2×2, as rows)."""
    corners = raster_positions((2, 2), step_px, rotation_deg, fastest, origin=(0.0, 0.0))
    order = {"row": (0, 1, 2), "col": (0, 2, 1)}[fastest]  # frames of (0,0), (1,0), (0,1) in frame order
    first, down, right = (corners[i] for i in order)
    return np.stack([down - first, right - first])


def scan_spectrum(amplitudes, scan_shape, step_px, rotation_deg: float = 0.0, fastest: str = "row",
                  block: int = PROBE_CHECK_BLOCK, n_frequencies: int = N_FREQUENCIES,
                  g_range: tuple[float, float] = (1.5, 15.0)):
    """The strongest frequencies of the central ``block × block`` positions' Fourier transform over the scan.

    Parameters
    ----------
    amplitudes : sliceable (N, n, n)
        Diffraction amplitudes ``sqrt(counts)`` on the model's grid (calibrated, flipped if needed), in
        frame order.
    scan_shape : (rows, cols); step_px : float or (row step, col step) in object pixels;
    rotation_deg, fastest : as for :func:`deepphase.physics.raster_positions`.
    block : side of the central block read. n_frequencies : how many frequencies are kept (those with the
        most power, one of each ±g pair). g_range : their lengths in detector pixels (at most the disk's
        diameter: beyond it the trotters are empty).

    Returns
    -------
    (G, g, noise): G (K, n, n) complex, the spectrum at each kept frequency; g (K, 2) the frequency in
    detector pixels (row, col); noise (n, n) the variance Poisson counting adds to each |G|² (the summed
    counts of each detector pixel).
    """
    counts = central_counts(amplitudes, scan_shape, fastest, block)
    return _spectrum(counts, step_px, rotation_deg, fastest, n_frequencies, g_range)


def central_counts(amplitudes, scan_shape, fastest: str, block: int = PROBE_CHECK_BLOCK) -> np.ndarray:
    """The squared amplitudes of the central ``block × block`` positions on the scan grid, (rows, cols, n, n)."""
    from .calibration import central_block_lines

    (br, bc), lines = central_block_lines(amplitudes, scan_shape, fastest, block)
    if min(br, bc) < 4:
        raise ShapeError(f"scan_shape: expected at least 4×4 positions for a spectrum, got {scan_shape[0]}×{scan_shape[1]}")
    counts = np.empty((br, bc, amplitudes.shape[-1], amplitudes.shape[-1]))
    for where, line in lines:
        counts[where] = line
    return counts


def _spectrum(counts: np.ndarray, step_px, rotation_deg: float, fastest: str, n_frequencies: int,
              g_range: tuple[float, float]):
    transform = _scan_transform(counts)
    order, g = _strongest(transform, step_px, rotation_deg, fastest, n_frequencies, g_range)
    return transform[0].reshape(-1, *counts.shape[-2:])[order], g, transform[2]


def _scan_transform(counts: np.ndarray):
    """The patterns' Fourier transform over the scan positions (one of each ±ν pair), the scan frequencies ν
    (cycles per step along the scan rows and columns) and the summed counts (the noise's spectrum)."""
    br, bc = counts.shape[0], counts.shape[1]
    noise = counts.sum(axis=(0, 1))
    # (real counts: the half plane of scan frequencies with ν_col ≥ 0 holds one of each ±ν pair)
    spectrum = scipy.fft.rfft2((counts - counts.mean(axis=(0, 1))).astype(np.float32), axes=(0, 1), workers=-1)
    nu = np.stack(np.meshgrid(np.fft.fftfreq(br), np.fft.rfftfreq(bc), indexing="ij"), axis=-1)
    return spectrum, nu, noise


def _detector_offsets(nu: np.ndarray, n: int, step_px: float, rotation_deg: float, fastest: str) -> np.ndarray:
    """Where scan frequencies ν sit on the detector: g = n·f (pixels), with f the object frequency that has
    f·e_row = ν_row, f·e_col = ν_col for the raster's step vectors e."""
    return n * nu @ np.linalg.inv(_scan_vectors(step_px, rotation_deg, fastest)).T


def _strongest(transform, step_px, rotation_deg: float, fastest: str, n_frequencies: int,
               g_range: tuple[float, float], factors: tuple[float, float] = (1.0, 1.0)):
    """The flat indices of the ``n_frequencies`` strongest scan frequencies whose detector offset lies in
    ``g_range`` and is not folded, and those offsets at ``step_px`` (one step or the rows' and the columns').
    ``factors`` (low, high): only frequencies that qualify at every step ``step_px × f`` for f in that range (so
    that a search over the step compares the same ones); their offset at ``step_px × f`` is the one returned / f."""
    spectrum, nu, _ = transform
    n = spectrum.shape[-1]
    low, high = factors
    offsets = _detector_offsets(nu, n, step_px, rotation_deg, fastest)
    length = np.hypot(offsets[..., 0], offsets[..., 1])
    # One of each ±ν pair (G(−ν) is G(ν)'s conjugate): ν_col > 0, and on ν_col = 0 or ½ (both signs there) ν_row > 0.
    half = ((nu[..., 1] > 0) & (nu[..., 1] < 0.5)) | (((nu[..., 1] == 0) | (nu[..., 1] == 0.5)) & (nu[..., 0] > 0))
    # A coarse step folds object frequencies g + K (K: the raster's reciprocal lattice, |K| ≥ n / the longer step)
    # onto g; they add trotters of their own unless |g + K| ≥ g_range[1] for all of them.
    steps = _scan_vectors(step_px, rotation_deg, fastest)
    unfolded = n / (high * np.max(np.hypot(steps[:, 0], steps[:, 1]))) - g_range[1]
    keep = half & (length / high >= g_range[0]) & (length / low <= min(g_range[1], unfolded))
    power = np.where(keep, np.sum(np.abs(spectrum) ** 2, axis=(2, 3)), -1.0)
    order = np.argsort(power.ravel())[::-1][: int(n_frequencies)]
    order = order[power.ravel()[order] > 0]
    return order, offsets.reshape(-1, 2)[order]


def _explained(coefficients, spectrum, ramps, far_field, pairs: np.ndarray | None = None) -> float:
    """Share of the spectrum's power that the weak-phase transfer with ``Δχ`` explains (one free complex
    factor per frequency: the specimen's). Every array in FFT order; ``pairs``: :func:`_ramp_pairs` of ``ramps``."""
    n = far_field.shape[-1]
    transfer = _transfer(far_field * np.exp(1j * _unshift(_delta_chi(coefficients, n))), ramps, pairs=pairs)
    projection = np.abs(np.sum(spectrum * np.conj(transfer), axis=(1, 2), dtype=np.complex128)) ** 2
    norm = np.sum(np.abs(transfer) ** 2, axis=(1, 2), dtype=np.float64) + 1e-300
    total = np.sum(np.abs(spectrum) ** 2, dtype=np.float64)
    return float(np.sum(projection / norm) / total) if total > 0 else 0.0  # (no contrast at all: nothing explained)


#: The coarse search uses the strongest few frequencies only (it needs the peak, not its position to 1e-4).
N_COARSE = 32


def fit_probe_mismatch(spectrum: np.ndarray, g: np.ndarray, probe: np.ndarray, start=None,
                       tolerance: float = 1e-4) -> dict:
    """Fit ``Δχ`` (defocus and astigmatism against ``probe``) to a :func:`scan_spectrum`.

    A coarse search over round defocus in ±``A_MAX`` rad/px² on the strongest frequencies (the objective
    has side maxima a wrong start can fall into), then Nelder–Mead over the three coefficients from the
    best, on all of them. ``start``: skip the search and refine from these coefficients. Returns
    ``{"coefficients": [a_rr, a_rc, a_cc], "explained": share of the spectrum's power explained}``.
    """
    far_field = _unshift(_far_field(np.asarray(probe, dtype=np.complex128)))
    ramps = _unshift(_ramps(g, far_field.shape[-1])).astype(np.complex64)
    spectrum = _unshift(spectrum).astype(np.complex64)
    pairs = _ramp_pairs(ramps)
    search = None
    if start is None:
        grid = np.linspace(-A_MAX, A_MAX, 61)
        few = slice(0, N_COARSE)  # (the spectrum is sorted by power)
        few_pairs = np.ascontiguousarray(pairs[:, few])
        scores = [_explained((a, 0.0, a), spectrum[few], ramps[few], far_field, few_pairs) for a in grid]
        a0 = float(grid[int(np.argmax(scores))])
        start, size = np.array([a0, 0.0, a0]), 0.005
        search = {"defocus_rad_per_px2": [float(a) for a in grid], "explained": scores}
    else:
        start, size = np.asarray(start, dtype=np.float64), 0.002
    simplex = np.vstack([start, start + [size, 0, 0], start + [0, size, 0], start + [0, 0, size]])
    result = minimize(lambda c: -_explained(c, spectrum, ramps, far_field, pairs), start, method="Nelder-Mead",
                      options={"initial_simplex": simplex, "xatol": tolerance, "fatol": 1e-4 * tolerance,
                               "maxiter": 400})
    return {"coefficients": [float(c) for c in result.x], "explained": float(-result.fun), "search": search}


def edge_phase(coefficients, radius: float) -> float:
    """The largest |Δχ| on the bright-field disk's edge (rad) for coefficients (a_rr, a_rc, a_cc) in rad per pixel²
    and a disk of ``radius`` pixels: |defocus| + astigmatism, the largest size of the form's eigenvalues, times r²."""
    a_rr, a_rc, a_cc = (float(c) for c in coefficients)
    return (abs(a_rr + a_cc) / 2 + float(np.hypot((a_rr - a_cc) / 2, a_rc))) * radius**2


def _summary(coefficients, radius: float) -> dict:
    a_rr, a_rc, a_cc = coefficients
    return {"defocus_rad_per_px2": float((a_rr + a_cc) / 2),
            "astigmatism_rad_per_px2": float(np.hypot((a_rr - a_cc) / 2, a_rc)),
            "astigmatism_angle_deg": float(np.degrees(0.5 * np.arctan2(2 * a_rc, a_rr - a_cc))),
            "edge_phase_rad": edge_phase(coefficients, radius)}


def measure_probe_mismatch(amplitudes, scan_shape, probe: np.ndarray, step_px, rotation_deg: float = 0.0,
                           fastest: str = "row", block: int = PROBE_CHECK_BLOCK) -> dict:
    """The defocus and astigmatism of the data's probe against ``probe`` (the model's), from a raster scan.

    Parameters
    ----------
    amplitudes, scan_shape, step_px, rotation_deg, fastest, block : as for :func:`scan_spectrum`.
    probe : (n, n) complex, the model's probe.

    Returns
    -------
    dict with ``coefficients`` (a_rr, a_rc, a_cc in rad/px²: the data's probe is
    ``add_aberrations(probe, coefficients)``), ``defocus_rad_per_px2``, ``astigmatism_rad_per_px2`` and its
    axis ``astigmatism_angle_deg``, ``edge_phase_rad`` (the largest |Δχ| on the disk's edge), ``halves``
    (the coefficients found on the left and right halves of the block alone) and ``uncertainty_rad`` (the
    largest |Δχ| on the disk's edge of half their difference: the fit's scatter from counting noise and
    specimen together), ``explained`` (the share of the spectrum's power the fitted transfer explains:
    0.8–0.9 for a noise-free crystal, 0.2 at 1,000 e/pattern), ``noise_share`` (the share counting noise
    alone makes of that power, if the patterns are counts), ``disk_radius_px``, ``block``,
    ``at_search_edge`` (the fit stopped at ±``A_MAX``: the probes differ by that or more), ``search`` (the
    coarse search over round defocus, for :func:`plot_probe_mismatch`).
    """
    return probe_mismatch_from_block(central_counts(amplitudes, scan_shape, fastest, block), probe, step_px,
                                     rotation_deg, fastest)


def _checked_block(counts, probe) -> tuple[np.ndarray, np.ndarray, float]:
    """A block of counts on the scan grid and the model's probe, checked; and the probe's disk radius (px)."""
    from .calibration import model_disk

    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 4 or counts.shape[-2:] != np.shape(probe):
        raise ShapeError(f"counts: expected (scan rows, scan cols, {np.shape(probe)[0]}, {np.shape(probe)[1]}), "
                         f"got shape {counts.shape}")
    if not np.all(np.isfinite(counts)):
        raise ValueRangeError("counts: the block of patterns contains NaN or Inf")
    probe = np.asarray(probe, dtype=np.complex128)
    return counts, probe, float(model_disk(probe)["radius"])

def probe_mismatch_from_block(counts: np.ndarray, probe: np.ndarray, step_px, rotation_deg: float = 0.0,
                              fastest: str = "row") -> dict:
    """:func:`measure_probe_mismatch` of a block of counts already on the scan grid, (scan rows, scan cols, n, n)
    (e.g. read by another executor: LiberTEM's). ``fastest`` only orients the raster's axes."""
    counts, probe, radius = _checked_block(counts, probe)
    g_range = (1.5, 2 * radius)
    spectrum, g, noise = _spectrum(counts, step_px, rotation_deg, fastest, N_FREQUENCIES, g_range)
    if len(g) < 8 or min(counts.shape[:2]) < PROBE_CHECK_MIN_PX:
        n = counts.shape[-1]
        raise ShapeError(f"scan: {counts.shape[0]}×{counts.shape[1]} positions give {len(g)} usable frequencies; the "
                         f"probe check needs a raster of at least {PROBE_CHECK_MIN_PX}×{PROBE_CHECK_MIN_PX} positions "
                         f"at a step under {n / (2 * radius + 4):.2f} px (coarser steps fold the specimen's "
                         "frequencies onto each other)")
    whole = fit_probe_mismatch(spectrum, g, probe)
    half = counts.shape[1] // 2
    halves = [fit_probe_mismatch(*_spectrum(part, step_px, rotation_deg, fastest, N_FREQUENCIES, g_range)[:2], probe,
                                 start=whole["coefficients"])["coefficients"]
              for part in (counts[:, :half], counts[:, half:])]
    scatter = _summary(np.subtract(*halves) / 2, radius)["edge_phase_rad"]
    noise_share = float(len(g) * np.sum(noise) / np.sum(np.abs(spectrum) ** 2))
    return {"coefficients": whole["coefficients"], **_summary(whole["coefficients"], radius), "halves": halves,
            "search": whole["search"],
            "uncertainty_rad": scatter, "explained": whole["explained"], "noise_share": min(noise_share, 1.0),
            "disk_radius_px": radius, "block": list(counts.shape[:2]),
            "at_search_edge": bool(abs(whole["coefficients"][0] + whole["coefficients"][2]) / 2 >= 0.98 * A_MAX)}


def probe_check_from_block(counts: np.ndarray, model, step_px, rotation_deg: float = 0.0, fastest: str = "row",
                           calibration_info: dict | None = None, semi_angle: float | None = None,
                           energy_kev: float | None = None, rotation_note: str | None = None,
                           check_step: bool = True, step_remedy: str | None = None) -> dict:
    """What ``reconstruct`` records as ``probe_check``, from a block of counts on the scan grid (read by the
    pipeline, :func:`central_counts`, or by LiberTEM): the probe mismatch (:func:`probe_check_report`) and, with
    ``check_step``, one step for rows and columns and no ``rotation_note``, the step check
    (:func:`step_check_from_block`), which holds
    the probe's note back when the step looks wrong (:func:`hold_back_for_step`; ``step_remedy``: how its note ends,
    :data:`STEP_REMEDY` by default)."""
    found = probe_mismatch_from_block(counts, model.probe, step_px, rotation_deg, fastest)
    check = probe_check_report(found, model, calibration_info, semi_angle, energy_kev, rotation_note)
    if not check_step:
        return check
    if rotation_note:  # (a wrong geometry moves the step's fit too: half a turn read 0.87 px as 0.69)
        return {**check, "step_check": {"skipped": "the rotation check contradicts the scan's geometry, which the "
                                                   "step's fit assumes"}}
    steps = np.atleast_1d(np.asarray(step_px, dtype=np.float64))  # (a raster found in positions: rows', columns')
    if steps.max() > 1.01 * steps.min():
        return {**check, "step_check": {"skipped": "the raster's rows and columns have different steps"}}
    try:
        return hold_back_for_step(check, step_check_from_block(counts, model.probe, float(steps.mean()), rotation_deg,
                                                               fastest), step_remedy or STEP_REMEDY)
    except (ValueRangeError, ShapeError) as exc:
        return {**check, "step_check": {"skipped": str(exc)}}


def model_grid_optics(model, calibration_info: dict | None = None, semi_angle: float | None = None,
                      energy_kev: float | None = None) -> tuple[float | None, float | None]:
    """The model grid's mrad per pixel and the beam energy in keV, for a defocus in Å: from the calibration (the
    data's angles resampled onto the model's grid), else what the model records, else the data's convergence
    semi-angle over the model disk's radius; the energy as given, else the model's. None where unknown."""
    from .calibration import _model_optics, model_disk

    optics = _model_optics(model)
    mrad = (calibration_info or {}).get("model_mrad_per_px") or optics.get("mrad_per_px")
    if mrad is None and semi_angle:
        mrad = float(semi_angle) / float(model_disk(model.probe)["radius"])
    return mrad, energy_kev or optics.get("energy")


def probe_check_report(found: dict, model, calibration_info: dict | None = None, semi_angle: float | None = None,
                       energy_kev: float | None = None, rotation_note: str | None = None) -> dict:
    """What ``reconstruct`` records as ``probe_check``: the fit, the model grid's optics
    (:func:`model_grid_optics`) and the note (:func:`probe_mismatch_note`, held back by
    :func:`hold_back_for_geometry` when the rotation check has ``rotation_note``)."""
    mrad, energy = model_grid_optics(model, calibration_info, semi_angle, energy_kev)
    check = {**found, "model_mrad_per_px": mrad, "energy_kev": energy, "note": probe_mismatch_note(found, mrad, energy)}
    return hold_back_for_geometry(check, rotation_note)


def defocus_angstrom(a: float, mrad_per_px: float, energy_kev: float) -> float:
    """The defocus in Å (positive: underfocus, abTEM's sign) that adds ``a`` rad per detector pixel² on a grid
    of ``mrad_per_px``: ``Δf = a λ / (π (mrad_per_px / 1000)²)``."""
    if not mrad_per_px > 0:
        raise ValueRangeError(f"mrad_per_px: expected a positive angular sampling, got {mrad_per_px!r}")
    return float(a * electron_wavelength(energy_kev) / (np.pi * (mrad_per_px * 1e-3) ** 2))


def probe_difference(found: dict, mrad_per_px: float | None = None, energy_kev: float | None = None) -> str:
    """The difference found, in words: "the data's probe differs from the model's by defocus … at the bright-field
    disk's edge (about … Å of defocus …) (±… rad; fitted on …)"."""
    what = [f"defocus {found['defocus_rad_per_px2'] * found['disk_radius_px'] ** 2:+.2f} rad"]
    if found["astigmatism_rad_per_px2"] * found["disk_radius_px"] ** 2 >= 0.1:
        what.append(f"astigmatism {found['astigmatism_rad_per_px2'] * found['disk_radius_px'] ** 2:.2f} rad "
                    f"along {found['astigmatism_angle_deg']:.0f}°")
    in_angstrom = ""
    if mrad_per_px and energy_kev:
        in_angstrom = (f" (about {defocus_angstrom(found['defocus_rad_per_px2'], mrad_per_px, energy_kev):+.0f} Å "
                       "of defocus, positive = underfocus)")
    more = " or more: the probes are far apart" if found["at_search_edge"] else ""
    return (f"the data's probe differs from the model's by {' and '.join(what)} at the bright-field disk's edge"
            f"{in_angstrom}{more} (±{found['uncertainty_rad']:.2f} rad; fitted on the central {found['block'][0]}×"
            f"{found['block'][1]} positions)")


def probe_mismatch_note(found: dict, mrad_per_px: float | None = None, energy_kev: float | None = None) -> str | None:
    """A note when the data's probe clearly differs from the model's (edge phase ≥ ``MISMATCH_NOTE_RAD`` and
    three times its uncertainty, on a fit of more than noise: ``MIN_EXPLAINED``); None otherwise."""
    edge, unc = found["edge_phase_rad"], found["uncertainty_rad"]
    if edge < MISMATCH_NOTE_RAD or edge < 3 * unc or found["explained"] < MIN_EXPLAINED:
        return None
    return (f"{probe_difference(found, mrad_per_px, energy_kev)}. A model loses quality on data whose probe is not "
            "its own (simulated twisted hBN, the default: correlation 0.97 → 0.93 at +0.6 rad, 0.83 at +1.1, 0.36 at "
            "+2.2); on a thick specimen part of the difference is its depth (a probe focused on the entrance surface "
            "is out of focus in the middle); a scan step given wrongly shows up here too (a 0.87 px raster given "
            "as 1.2 px: 0.3–0.5 rad at the edge). Check --step, then focus as for the model's probe, or train a model for "
            "this one")


#: The scan's sense (a half turn) is taken from the probe when the weak-phase transfer at one sense explains this
#: many times the scan spectrum's power that it explains at the other. Simulated twisted hBN, hBN, MoS₂ and a
#: photograph, 48² positions, the reference probe (also 0.8 rad out of focus), coherent or a 1–1.5 px source,
#: 1,000–27,882 e/pattern: 1.8–4.1× in favour of the true sense in 60 of 60 scans, never the other way; an
#: aberration-free probe: 1.00–1.06 (RESULTS §39).
SENSE_RATIO = 1.5


def sense_from_block(counts: np.ndarray, probe: np.ndarray, step_px, rotation_deg: float, fastest: str = "row") -> dict:
    """Whether a raster runs at ``rotation_deg`` or half a turn from it, told by the probe.

    Half a turn inverts the patterns against the scan (k → −k): the data then look like those of the
    negated phase seen through the conjugate probe ``P*``. The scan's curl cannot tell the two apart, and the
    specimen's contrast (the divergence's skew) only where its atoms are resolved: a honeycomb such as hBN seen
    through a finite source keeps only its first-order reflections, whose image is the negative of a triangular
    lattice, and the skew then points the wrong way. A probe with any aberration is not its own conjugate, so the
    weak-phase transfer with the model's probe explains the scan's spectrum far better at the true sense
    (:func:`probe_mismatch_from_block` at both). An aberration-free probe tells nothing (``decided`` False).

    Returns
    -------
    dict with ``rotation_deg`` (the sense that fits better, in (−180, 180]), ``half_turn`` (whether that is half a
    turn from ``rotation_deg``), ``explained`` (the share at ``rotation_deg`` and at half a turn from it),
    ``edge_phase_rad`` (the probe mismatch fitted at each) and ``decided`` (one explains at least ``SENSE_RATIO``
    times the other, and more than ``MIN_EXPLAINED``).
    """
    counts, probe, radius = _checked_block(counts, probe)
    fits = []
    for turn in (0.0, 180.0):  # (the fit of the whole block only: its halves' scatter is not needed here)
        spectrum, g, _ = _spectrum(counts, step_px, rotation_deg + turn, fastest, N_FREQUENCIES, (1.5, 2 * radius))
        if len(g) < 8:
            raise ShapeError(f"scan: {len(g)} usable frequencies; too few to tell the scan's sense")
        fit = fit_probe_mismatch(spectrum, g, probe)
        fits.append({"explained": fit["explained"], "edge_phase_rad": edge_phase(fit["coefficients"], radius)})
    explained = [f["explained"] for f in fits]
    half_turn = explained[1] > explained[0]
    best, other = max(explained), min(explained)
    angle = float((rotation_deg + (180.0 if half_turn else 0.0) + 180.0) % 360.0 - 180.0)
    return {"rotation_deg": 180.0 if angle == -180.0 else angle, "half_turn": bool(half_turn),
            "explained": explained, "edge_phase_rad": [f["edge_phase_rad"] for f in fits],
            "decided": bool(best > MIN_EXPLAINED and best >= SENSE_RATIO * max(other, 1e-12))}


def scan_sense(amplitudes, scan_shape, probe: np.ndarray, step_px, rotation_deg: float, fastest: str = "row",
               block: int = PROBE_CHECK_BLOCK) -> dict:
    """:func:`sense_from_block` on the central ``block × block`` positions of a raster (as
    :func:`measure_probe_mismatch` reads them)."""
    return sense_from_block(central_counts(amplitudes, scan_shape, fastest, block), probe, step_px, rotation_deg,
                            fastest)


#: The raster steps (real-space pixels of the probe's grid) :func:`scan_step_from_block` searches: finer scans
#: than a quarter pixel are not made; the upper end is also held below n / (2 r + 4) (1.67 px on a 32-pixel grid with
#: the reference probe's disk, r = 7.6 px), beyond which the scan folds the frequencies the fit uses onto others (as
#: the probe check says). A coarser raster is out of reach: 2.0 px was found as 1.70, 2.5 px as 0.48 before this
#: limit (RESULTS §40).
STEP_SEARCH_PX = (0.25, 2.0)
#: ... and a step found above this fraction of that limit (1.42 px there) is not trusted: the frequencies left are
#: few and low, and pull it down (on 32² positions 1.4 px was found as 1.30 and 2.0 as 1.55). A raster far beyond
#: the limit can alias onto a step inside it (2.5 px found as 1.24): coarser than ~1.4 px, give the step.
STEP_TRUSTED = 0.85
#: The search grid's fits use the strongest ``GRID_FREQUENCIES`` frequencies and stop at a simplex of
#: ``GRID_TOLERANCE`` (the Brent search after them: all ``N_FREQUENCIES``, 1e-4): the grid needs the peak, not the
#: share to 1e-8. On 12 phase-object scans the step found moved by at most 0.12 % and the search took 1.93 s
#: instead of 2.96 s; on a multislice hBN monolayer (32²), whose 128 frequencies are mostly noise and showed no
#: peak, the strongest 32 (its lattice's) show one: found 3.6 % low instead of refused (RESULTS §41).
GRID_TOLERANCE = 3e-3
GRID_FREQUENCIES = 32
#: :func:`scan_step_from_block` refines the step within this factor either side of the grid's peak.
STEP_BRACKET = 1.12
#: ... and decides only when the grid's peak lies inside the range and the share explained falls by this fraction
#: of it on one side at least: a monolayer simulated by multislice (hBN, 32² positions) explains 5–9 % of its spectrum
#: at every step, most at the finest, with no peak at the true one (RESULTS §40).
STEP_PEAK_DROP = 0.05


def _clear_peak(scores: np.ndarray, k: int) -> bool:
    """Whether the grid's shares explained have a peak at ``k`` inside the range that falls off on one side at least."""
    usable = np.flatnonzero(scores > 0)
    if k <= usable[0] or k >= usable[-1]:
        return False
    floor = (1 - STEP_PEAK_DROP) * scores[k]
    return bool(scores[usable[0] : k].min() <= floor or scores[k + 1 : usable[-1] + 1].min() <= floor)


def scan_step_from_block(counts: np.ndarray, probe: np.ndarray, rotation_deg: float, fastest: str = "row",
                         given_step_px: float | None = None) -> dict:
    """The raster's step that the weak-phase transfer with the model's probe explains best.

    The step turns a scan frequency into the detector offset ``g`` where its trotters lie; given wrongly, every
    frequency's trotters are looked for at the wrong offset, and the fit explains less of the spectrum
    (a fitted defocus makes up part of it: a 0.87 px raster given as 1.2 px looks like 0.3–0.5 rad of
    defocus at the disk's edge). So the share explained, with the probe's defocus and astigmatism fitted at
    every step, peaks at the true step: simulated twisted hBN and a photograph, 64² positions at 0.87 px,
    0.909 and 0.864 there against 0.82–0.88 at ±10 % (RESULTS §40). A search over ``STEP_SEARCH_PX`` on a
    logarithmic grid, then a bounded Brent search between the best point's neighbours.

    Parameters
    ----------
    counts : (scan rows, scan cols, n, n) block of counts on the scan grid (:func:`scan_sense`'s).
    probe : (n, n) complex, the model's probe.
    rotation_deg, fastest : the raster's rotation and fastest axis (the rotation must be right: the check of a
        given rotation, or ``rotation auto``, comes first).
    given_step_px : the step as given, to compare with (optional).

    Returns
    -------
    dict with ``step_px`` (the best), ``explained`` (the share at it), ``coefficients`` and ``edge_phase_rad``
    (the probe mismatch fitted there), ``search`` (the grid's steps and shares), ``decided`` (the best explains
    more than ``MIN_EXPLAINED``, the grid has a clear interior peak, ``STEP_PEAK_DROP``, and the step is at most
    ``STEP_TRUSTED`` of the folding limit), and with ``given_step_px``: it, ``explained_given`` and
    ``edge_phase_given_rad``.
    """
    from scipy.optimize import minimize_scalar

    counts, probe, radius = _checked_block(counts, probe)
    g_range = (1.5, 2 * radius)
    transform = _scan_transform(counts)  # (the step only moves where each frequency's trotters are looked for)
    patterns = transform[0].reshape(-1, *counts.shape[-2:])

    def fit_at(step: float, start=None, among=None, tolerance: float = 1e-4, n_frequencies: int = N_FREQUENCIES
               ) -> dict | None:
        """The fit at ``step``: on its own strongest frequencies, or on those chosen for the range ``among``."""
        base = step if among is None else among[0]
        order, g = _strongest(transform, base, rotation_deg, fastest, n_frequencies, g_range,
                              (1.0, 1.0) if among is None else (1.0, among[1] / among[0]))
        g = g * base / step
        return fit_probe_mismatch(patterns[order], g, probe, start=start, tolerance=tolerance) if len(g) >= 8 else None

    folding = counts.shape[-1] / (2 * radius + 4)  # (the step beyond which the scan folds the frequencies used)
    upper = min(STEP_SEARCH_PX[1], folding)
    grid = np.geomspace(STEP_SEARCH_PX[0], upper, 10)
    fits = [fit_at(step, tolerance=GRID_TOLERANCE, n_frequencies=GRID_FREQUENCIES) for step in grid]
    scores = np.array([f["explained"] if f is not None else 0.0 for f in fits])
    k = int(np.argmax(scores))
    if fits[k] is None:
        raise ShapeError(f"scan: {counts.shape[0]}×{counts.shape[1]} positions give too few usable frequencies at "
                         f"any step from {STEP_SEARCH_PX[0]} to {upper:.2f} px to find the step")
    # Near the grid's peak (a parabola through it and its neighbours), on the same frequencies at every step: a
    # set that changed with the step would move the peak (at 1,000 e/pattern by 9 %), and a narrow range keeps
    # the set large (a coarse step folds the high frequencies).
    step = float(grid[k])
    if 0 < k < len(grid) - 1 and scores[k - 1] > 0 and scores[k + 1] > 0:
        curvature = scores[k - 1] - 2 * scores[k] + scores[k + 1]
        if curvature < 0:
            step *= float(np.exp(0.5 * (scores[k - 1] - scores[k + 1]) / curvature * np.log(grid[1] / grid[0])))
    start = fits[k]["coefficients"]
    for _ in range(3):  # (again around the edge of a range the peak lay beyond)
        bracket = (max(step / STEP_BRACKET, STEP_SEARCH_PX[0]), min(step * STEP_BRACKET, upper))

        def share(log_step: float) -> float:
            fit = fit_at(float(np.exp(log_step)), start, bracket)
            return fit["explained"] if fit is not None else 0.0

        step = float(np.exp(minimize_scalar(lambda x: -share(x), bounds=np.log(bracket), method="bounded",
                                            options={"xatol": 0.002}).x))
        if bracket[0] * 1.01 < step < bracket[1] / 1.01 or not STEP_SEARCH_PX[0] * 1.01 < step < upper / 1.01:
            break
    best = fit_at(step, start, bracket) or fits[k]
    found = {"step_px": step, "explained": best["explained"], "coefficients": best["coefficients"],
             "edge_phase_rad": edge_phase(best["coefficients"], radius),
             "search": {"steps_px": [float(x) for x in grid], "explained": [float(x) for x in scores]},
             "decided": bool(best["explained"] > MIN_EXPLAINED and _clear_peak(scores, k)
                             and step <= STEP_TRUSTED * folding)}
    if given_step_px is not None:  # both on the frequencies that qualify at both steps, where there are enough
        both = (min(step, given_step_px), max(step, given_step_px))
        at_best, at_given = fit_at(step, start, both), fit_at(float(given_step_px), None, both)
        if at_best is None or at_given is None:
            at_best, at_given = best, fit_at(float(given_step_px))
        found.update({"given_step_px": float(given_step_px), "explained": at_best["explained"],
                      "explained_given": at_given["explained"] if at_given is not None else 0.0,
                      "edge_phase_given_rad": edge_phase(at_given["coefficients"], radius)
                      if at_given is not None else None})
    return found


#: :func:`check_scan_step` first fits this share either side of the given step.
STEP_PROBE = 0.05


def step_check_from_block(counts: np.ndarray, probe: np.ndarray, step_px: float, rotation_deg: float,
                          fastest: str = "row") -> dict:
    """Whether a given raster step is the one the patterns fit best: the weak-phase fit at it and ``STEP_PROBE``
    either side, on the same frequencies (three fits, ~0.8 s on the central 64² positions); only when a side
    explains more of the spectrum, the whole search (:func:`scan_step_from_block`, ~2–3 s).

    Returns ``given_step_px``, ``explained_near_given`` (the shares at the given step, ``STEP_PROBE`` below and
    above it, on the same frequencies) and ``searched``; with ``searched``, also what
    :func:`scan_step_from_block` returns.
    """
    counts, probe, radius = _checked_block(counts, probe)
    transform = _scan_transform(counts)
    factors = (1.0, 1 - STEP_PROBE, 1 + STEP_PROBE)
    order, g = _strongest(transform, step_px, rotation_deg, fastest, N_FREQUENCIES, (1.5, 2 * radius),
                          (factors[1], factors[2]))
    if len(g) < 8:
        raise ShapeError(f"scan: {len(g)} usable frequencies; too few to check the scan's step")
    patterns = transform[0].reshape(-1, *counts.shape[-2:])[order]
    shares = [fit_probe_mismatch(patterns, g / f, probe)["explained"] for f in factors]
    checked = {"given_step_px": float(step_px), "explained_near_given": shares}
    if max(shares[1:]) <= shares[0]:
        return {**checked, "searched": False}
    return {**checked, **scan_step_from_block(counts, probe, rotation_deg, fastest, given_step_px=step_px),
            "searched": True}


def check_scan_step(amplitudes, scan_shape, probe: np.ndarray, step_px: float, rotation_deg: float,
                    fastest: str = "row", block: int = PROBE_CHECK_BLOCK) -> dict:
    """:func:`step_check_from_block` on the central ``block × block`` positions of a raster (as
    :func:`measure_probe_mismatch` reads them)."""
    return step_check_from_block(central_counts(amplitudes, scan_shape, fastest, block), probe, step_px,
                                 rotation_deg, fastest)


def measure_scan_step(amplitudes, scan_shape, probe: np.ndarray, rotation_deg: float, fastest: str = "row",
                      given_step_px: float | None = None, block: int = PROBE_CHECK_BLOCK) -> dict:
    """:func:`scan_step_from_block` on the central ``block × block`` positions of a raster (as
    :func:`measure_probe_mismatch` reads them)."""
    return scan_step_from_block(central_counts(amplitudes, scan_shape, fastest, block), probe, rotation_deg,
                                fastest, given_step_px)


def check_step_raster(scan_shape) -> None:
    """Refuse a raster too small for step "auto" (before its patterns are read)."""
    if min(scan_shape) < PROBE_CHECK_MIN_PX:
        raise ValueRangeError(f"step: 'auto' needs a raster of at least {PROBE_CHECK_MIN_PX}×{PROBE_CHECK_MIN_PX} "
                              f"positions, got {scan_shape[0]}×{scan_shape[1]}; give --step S")


def find_scan_step(counts: np.ndarray, probe: np.ndarray, rotation_deg: float, fastest: str = "row") -> dict:
    """The step "auto" takes (:func:`scan_step_from_block` on a block of counts on the scan grid), or a
    :class:`~deepphase.errors.ValueRangeError` saying why the patterns do not tell it: too few positions a side
    (``PROBE_CHECK_MIN_PX``), too few usable frequencies, or no clear peak (``decided`` false). Read by the
    pipeline (:func:`central_counts`) or by LiberTEM; ``wall_s`` added."""
    import time

    check_step_raster(counts.shape[:2])
    t0 = time.perf_counter()
    try:
        found = scan_step_from_block(counts, probe, rotation_deg, fastest)
    except (ValueRangeError, ShapeError) as exc:
        raise ValueRangeError(f"step: 'auto' could not find the step ({exc}); give --step S") from exc
    if not found["decided"]:
        shares = [x for x in found["search"]["explained"] if x > 0]
        raise ValueRangeError(f"step: the patterns do not tell the scan's step (the weak-phase fit with the model's "
                              f"probe explains {min(shares):.3f}–{max(shares):.3f} of the scan's spectrum from "
                              f"{found['search']['steps_px'][0]:g} to {found['search']['steps_px'][-1]:.2f} px, without "
                              "a clear peak: counting noise, a weak specimen, one the weak-phase transfer does not "
                              "describe, or a raster coarser than the steps searched); give --step S")
    return {**found, "wall_s": round(time.perf_counter() - t0, 3)}


def step_found_message(found: dict, block_shape) -> str:
    """What step "auto" says it found."""
    return (f"scan step {found['step_px']:.4f} px (the weak-phase transfer's best fit on the central "
            f"{block_shape[0]}×{block_shape[1]} positions: it explains {found['explained']:.3f} of the scan's "
            "spectrum)")


#: A given scan step is noted as wrong when the step that fits best (:func:`scan_step_from_block`) is more than this
#: share from it (the search's error: 3.1 % at most on 36 phase-object scans, −3.4 to +0.9 % on multislice scans of 48²
#: positions, +8.1 % on SrTiO₃ at 32²) and explains ``STEP_RATIO`` times the given step's share of the spectrum or
#: more: a 0.87 px raster given as 0.78 or 0.70 px, 1.02–1.05× and 1.09–1.18×; the ratio only guards against a
#: search that found nothing better (RESULTS §40).
STEP_MISMATCH = 0.08
STEP_RATIO = 1.01


#: How :func:`step_note` ends for a raster given by its step; and for one read from positions given, which have no
#: step to set (a user's positions in Å on a 0.2 Å grid form a raster of 0.17 px that fits worse than 0.87 px).
STEP_REMEDY = ": check --step, or give --step auto"
POSITIONS_STEP_REMEDY = (": check the positions' scale (real-space pixels of the model's grid; positions in Å divided "
                         "by the pixel size)")


def step_note(found: dict, remedy: str = STEP_REMEDY) -> str | None:
    """What to say when :func:`scan_step_from_block` (with ``given_step_px``) finds the given step clearly wrong
    (ending in ``remedy``); None when it does not."""
    given, best = found.get("given_step_px"), found.get("step_px")
    if given is None or best is None or not found["decided"] or abs(best / given - 1) <= STEP_MISMATCH \
            or found["explained"] < STEP_RATIO * found["explained_given"]:
        return None
    at_given = found.get("edge_phase_given_rad")
    # (the probe difference only where it is one worth a note: "0.06 rad" beside a wrong step read as a finding, the
    # figures audit, s41)
    shows = at_given is not None and at_given >= MISMATCH_NOTE_RAD
    return (f"the scan step looks wrong: the patterns fit a raster step of {best:.3f} px better than the {given:g} px "
            f"given (the weak-phase transfer with the model's probe explains {found['explained']:.2f} of the scan's "
            f"spectrum there against {found['explained_given']:.2f})"
            + (f"; a wrong step shows up as a probe difference ({at_given:.2f} rad at the disk's edge at the given "
               f"step, {found['edge_phase_rad']:.2f} at the one found)" if shows else "")
            + remedy)


def hold_back_for_step(check: dict, found: dict, remedy: str = STEP_REMEDY) -> dict:
    """The probe check with ``step_check`` (what :func:`step_check_from_block` found) and, when the scan step looks
    wrong (:func:`step_note`), ``step_note`` added and its own note held back (as :func:`hold_back_for_geometry`
    does)."""
    note = step_note(found, remedy)
    if note is None:
        return {**check, "step_check": found}
    if not check.get("note"):
        return {**check, "step_check": found, "step_note": note}
    return {**check, "note": None, "step_check": found,
            "step_note": note + " (the probe check's finding, which assumes the step, is held back)",
            "held_back": check["note"] + " — held back: the scan step looks wrong, and this fit assumes it"}


def hold_back_for_geometry(check: dict, rotation_note: str | None) -> dict:
    """The probe check with its note held back (``note`` None, the text in ``held_back``) when the rotation check
    contradicts the scan's geometry: the fit assumes it, and a wrong rotation, a mirrored detector or half a turn
    makes the transfer look like a large defocus (simulated twisted hBN with the model's own probe: 1.5, 2.4 and
    3.0 rad). Fix the geometry first; the probe is then checked on data it fits."""
    if not rotation_note or not check.get("note"):
        return check
    return {**check, "note": None, "held_back": check["note"] + " — held back: the rotation check contradicts the "
                                                               "scan's geometry, which this fit assumes"}


def told_to_probe_aware(model, check: dict | None, unavailable: str | None = None) -> dict:
    """What ``reconstruct`` tells a probe-aware model (:meth:`~deepphase.models.modelfile.PhaseModel.told`), and why.

    The probe check's coefficients when it has them, they fit more than noise (``MIN_EXPLAINED``) and its note is
    not held back for the scan's geometry; zeros
    (the model's own probe) otherwise, or when ``unavailable`` says why it cannot be told. Returns
    ``probe_aware`` for the metadata: ``told_coefficients_rad_per_px2``, ``told_edge_phase_rad``, ``from``,
    ``training_range_rad`` and ``note`` (None, or why the image may suffer: told nothing, or beyond the range).
    """
    from .calibration import model_disk

    check = check or {}
    coefficients, source = [0.0, 0.0, 0.0], "the probe check"
    if unavailable:
        source = f"nothing: {unavailable}"
    elif check.get("held_back"):
        source = "nothing: the probe check's finding is held back until the scan's geometry is right"
    elif "coefficients" in check and check["explained"] < MIN_EXPLAINED:
        source = (f"nothing: the probe check's fit explains {check['explained']:.3f} of the scan's spectrum, that of "
                  f"counting noise (under {MIN_EXPLAINED}: a weak specimen or a low dose)")
    elif "coefficients" in check:
        coefficients = [float(c) for c in check["coefficients"]]
    else:
        source = "nothing: " + (f"the probe check was skipped ({check['skipped']})" if "skipped" in check else
                                "no probe check (--no-probe-check, or positions that are not a raster)")
    edge = edge_phase(coefficients, model_disk(model.probe)["radius"])
    limit = model.aberration_range
    note = None
    if source != "the probe check":
        note = (f"the probe-aware model was told {source[len('nothing: '):]}, so it assumes its own probe and is "
                "no better than a model for that probe on data whose probe differs")
    elif limit is not None and edge > limit:
        note = (f"the probe check found {edge:.2f} rad at the bright-field disk's edge, beyond the ±{limit:g} rad the "
                "probe-aware model was trained for: it was told so, but expect a poorer image; focus closer to the "
                "model's probe, or train a model for this one (probe_estimate.npy)")
    return {"told_coefficients_rad_per_px2": coefficients, "told_edge_phase_rad": round(edge, 4), "from": source,
            "training_range_rad": limit, "note": note}


def told_for_scan(model, amplitudes, positions) -> tuple:
    """A probe-aware model told the data's probe from the scan itself, as ``deepphase reconstruct`` tells it: the
    probe check on the central positions when ``positions`` form a raster large enough
    (:func:`deepphase.physics.raster_from_positions`), else nothing (its own probe).

    For the Python API: ``model, told = told_for_scan(load_model("probe-aware"), amplitudes, positions)`` then
    ``reconstruct(amplitudes, positions, model)``. Returns the told copy and what it was told
    (:func:`told_to_probe_aware`, with the check under ``probe_check``).
    """
    from ..physics.scan import raster_from_positions

    raster = raster_from_positions(positions)
    check = None
    if raster is not None and min(raster["scan_shape"]) >= PROBE_CHECK_MIN_PX:
        try:
            check = measure_probe_mismatch(amplitudes, tuple(raster["scan_shape"]), model.probe, raster["step_px"],
                                           raster["rotation_deg"], raster["fastest"])
        except (ValueRangeError, ShapeError) as exc:  # NaN/Inf (reconstruct names the frame), too few frequencies
            check = {"skipped": str(exc)}
    info = told_to_probe_aware(model, check)
    return model.told(info["told_coefficients_rad_per_px2"]), {**info, "probe_check": check}


def plot_scan_step(found: dict, path) -> None:
    """A PNG of what the step search saw (:func:`scan_step_from_block`'s result): the share of the scan's spectrum
    the weak-phase fit explains against the raster step, the step found and, where there was one, the step given."""
    from ..io_utils import new_figure, save_png

    fig, axis = new_figure(1, 1, figsize=(7.0, 4.8))
    search = found["search"]
    steps, shares = np.asarray(search["steps_px"]), np.asarray(search["explained"])
    usable = shares > 0
    # The grid's shares are each on that step's own strongest frequencies; the found and the given step are
    # compared on one set both use, so their shares are on another scale than the curve's: said apart.
    axis.plot(steps[usable], shares[usable], "o-", color="tab:blue",
              label=f"coarse search grid: each step's fit on its own {GRID_FREQUENCIES} strongest frequencies "
                    "(the step found is refined between its points)")
    given = found.get("given_step_px")
    axis.axvline(found["step_px"], color="k", lw=1, label=f"found: {found['step_px']:.4f} px"
                 + ("" if given is not None else f" (explains {found['explained']:.3f} of its frequencies)"))
    if given is not None:
        axis.axvline(given, color="tab:red", ls="--", lw=1,
                     label=f"given: {given:g} px; on the frequencies both use, the found step explains "
                           f"{found['explained']:.3f}, the given {found['explained_given']:.3f}")
    axis.set_xscale("log")
    ticks = [t for t in (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0) if steps.min() / 1.05 <= t <= steps.max() * 1.05]
    axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axis.minorticks_off()
    axis.set_xlabel("raster step (real-space px of the model's grid)")
    axis.set_ylabel("share of the scan's spectrum explained")
    axis.set_title("the scan step: coarse search, then refined" + ("" if found.get("decided", True) else
                                                                       " (no clear peak: not decided)")
                   + "\n(the weak-phase transfer with the model's probe fits best at the true step)", fontsize=9)
    # below the axes: over them it hid points (the figures audit, s41)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.set_layout_engine("constrained")
    save_png(fig, path, dpi=100)


def plot_probe_mismatch(found: dict, path) -> None:
    """A PNG of what the probe check saw: the share of the scan's spectrum explained against a round defocus
    relative to the model's probe (the model's at 0, the fit marked), and the fitted Δχ over the bright-field
    disk."""
    from ..io_utils import new_figure, save_png

    radius2 = found["disk_radius_px"] ** 2
    fig, (left, right) = new_figure(1, 2, figsize=(10.0, 4.0), gridspec_kw={"width_ratios": [1.4, 1]})
    search = found.get("search")
    if search:
        left.plot(np.asarray(search["defocus_rad_per_px2"]) * radius2, search["explained"], color="tab:blue",
                  label=f"round defocus (coarse search, strongest {N_COARSE} frequencies)")
    left.axvline(0.0, color="tab:red", ls="--", lw=1, label="the model's probe")
    left.axvline(found["defocus_rad_per_px2"] * radius2, color="k", lw=1,
                 label=f"fitted: defocus {found['defocus_rad_per_px2'] * radius2:+.2f} rad")
    left.set_xlabel("defocus against the model's probe: phase added at the disk's edge (rad; + = underfocus)")
    left.set_ylabel("share of the scan's spectrum explained")
    left.legend(fontsize=8, loc="best")
    left.set_title(f"probe check on {found['block'][0]}×{found['block'][1]} positions: largest phase added on the edge "
                   f"{found['edge_phase_rad']:.2f} ± {found['uncertainty_rad']:.2f} rad", fontsize=9)
    n = 2 * int(np.ceil(found["disk_radius_px"])) + 3
    delta = _delta_chi(found["coefficients"], n)
    qr, qc = _centred(n)
    image = right.imshow(np.where(qr**2 + qc**2 <= radius2, delta, np.nan), cmap="RdBu_r",
                         vmin=-max(np.nanmax(np.abs(delta[qr**2 + qc**2 <= radius2])), 0.1),
                         vmax=max(np.nanmax(np.abs(delta[qr**2 + qc**2 <= radius2])), 0.1),
                         extent=(qc.min() - 0.5, qc.max() + 0.5, qr.max() + 0.5, qr.min() - 0.5))
    fig.colorbar(image, ax=right, label="phase added to the far field (rad)")
    # (labelled Δχ before, with the sign opposite to physics.probe's χ: an underfocus showed as +1.05 rad, the
    # figures audit, s41)
    right.set_title("the data's probe far-field phase less the model's (= −Δχ in χ's sign)", fontsize=9)
    right.set_xlabel("k_col (detector px)")
    right.set_ylabel("k_row (detector px)")
    fig.tight_layout()
    save_png(fig, path, dpi=100)
