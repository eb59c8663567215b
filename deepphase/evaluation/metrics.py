"""Quality figures of a reconstructed phase against the truth.

A reconstructed phase has an arbitrary constant offset (the zero frequency is not measured), so every
figure here is offset-invariant. Only pixels finite in both images are compared.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError, ValueRangeError


def _common(reconstruction: np.ndarray, truth: np.ndarray):
    reconstruction, truth = _real(reconstruction, truth)
    if reconstruction.shape != truth.shape:
        raise ShapeError(f"truth: shape {truth.shape} differs from the reconstruction's {reconstruction.shape}")
    valid = np.isfinite(reconstruction) & np.isfinite(truth)
    if valid.sum() < 2:
        raise ShapeError("reconstruction: fewer than two pixels are finite in both images")
    return reconstruction[valid], truth[valid]


def correlation(reconstruction: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation coefficient over the pixels finite in both images; 0 where either is flat (nothing
    in it follows the other)."""
    a, b = _common(reconstruction, truth)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def fitted_scale(reconstruction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The least-squares fit ``truth ≈ scale · reconstruction + offset`` over the pixels finite in both; returns
    (scale, offset)."""
    return _fit(*_common(reconstruction, truth))


def _fit(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    (scale, offset), *_ = np.linalg.lstsq(np.stack([a, np.ones_like(a)], axis=1), b, rcond=None)
    return float(scale), float(offset)


def fitted_rmse(reconstruction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """RMSE (rad) after the least-squares fit ``truth ≈ scale · reconstruction + offset``; returns (rmse, scale).

    The scale tells whether the phase comes out at the right size (1 is right).
    """
    a, b = _common(reconstruction, truth)
    scale, offset = _fit(a, b)
    return float(np.sqrt(np.mean((scale * a + offset - b) ** 2))), scale


def offset_rmse(reconstruction: np.ndarray, truth: np.ndarray) -> float:
    """RMSE (rad) after removing the mean difference only (scale kept as reconstructed)."""
    a, b = _common(reconstruction, truth)
    d = a - b
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)))


# --------------------------------------------------------------------------------------------------
# Registration, Fourier ring correlation, SSIM and a one-call summary.
# --------------------------------------------------------------------------------------------------


def _real(reconstruction, truth) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 arrays; complex values refused (a transmission function was scored by its real part, cos φ,
    with a NumPy warning only: the evaluation audit, s41)."""
    for name, image in (("reconstruction", reconstruction), ("truth", truth)):
        if np.iscomplexobj(image):
            raise ShapeError(f"{name}: expected a real phase image in rad, got complex values (a transmission "
                             "function exp(iφ)? np.angle gives its phase)")
    return np.asarray(reconstruction, dtype=np.float64), np.asarray(truth, dtype=np.float64)


def _pair(reconstruction, truth) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 2-D arrays of one shape (NaN kept)."""
    a, b = _real(reconstruction, truth)
    if a.ndim != 2:
        raise ShapeError(f"reconstruction: expected a 2-D image, got shape {a.shape}")
    if a.shape != b.shape:
        raise ShapeError(f"truth: shape {b.shape} differs from the reconstruction's {a.shape}")
    return a, b


def _finite_box(a: np.ndarray, b: np.ndarray, min_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Crop both images to the bounding box of the pixels finite in both.

    NaN left inside the box are filled with the mean of that image's finite pixels there, which for
    a cross-correlation is the neutral value once the mean is removed.
    """
    valid = np.isfinite(a) & np.isfinite(b)
    if not valid.any():
        raise ShapeError("reconstruction: no pixel is finite in both the reconstruction and the truth")
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    a, b, valid = a[box], b[box], valid[box]
    if min(a.shape) < min_size:
        raise ShapeError(
            f"reconstruction: the area finite in both images is {a.shape[0]}×{a.shape[1]} pixels; "
            f"expected at least {min_size}×{min_size}"
        )
    a = np.where(valid, a, a[valid].mean())
    b = np.where(valid, b, b[valid].mean())
    return a, b


def _hann2d(shape) -> np.ndarray:
    """Separable 2-D Hann window (zero at the first and last pixel)."""
    return np.outer(np.hanning(shape[0]), np.hanning(shape[1]))


#: The largest shift :func:`align` looks for, in pixels. A reconstruction made at the right positions is off by a
#: fraction of a pixel (0.05–0.6 px in the harness's runs); an unbounded search on a noisy lattice jumps whole
#: lattice periods instead and scores below the unaligned image (0.310 → −0.236 on twisted hBN with white noise,
#: RESULTS §45).
MAX_SHIFT_PX = 2.0


def align(reconstruction, truth, upsample: int = 20, max_shift_px: float = MAX_SHIFT_PX) -> tuple[float, float]:
    """Sub-pixel shift, at most ``max_shift_px`` along each axis, that registers the reconstruction onto the truth.

    The peak of the cross-correlation among the shifts within the bound, refined on a grid of ``1 / upsample``
    pixel by evaluating the inverse Fourier transform there alone (the matrix-multiply DFT of Guizar-Sicairos et
    al., 2008).

    Parameters
    ----------
    reconstruction, truth : (H, W) array
        Phase images on the same pixel grid; NaN marks pixels without data. Both are cropped to the
        bounding box of the pixels finite in both, and NaN left inside that box are filled with the
        image's mean.
    upsample : int
        Refinement factor: the shift is found to ``1 / upsample`` of a pixel.
    max_shift_px : float
        The bound on each component (:data:`MAX_SHIFT_PX`).

    Returns
    -------
    (shift_row, shift_col) : (float, float)
        In pixels. ``scipy.ndimage.shift(reconstruction, (shift_row, shift_col))`` lies on the truth,
        i.e. the reconstruction shows each feature at ``truth position − shift``.

    Notes
    -----
    Offset-invariant: each image's mean is removed, then both are apodised with a 2-D Hann window so
    the image edges (which do not wrap around) do not pull the peak towards zero shift. Plain
    (unnormalised) cross-correlation is used rather than phase correlation: phase images are
    band-limited, and whitening would give the empty high frequencies as much weight as the signal.
    """
    if int(upsample) < 1:
        raise ValueRangeError(f"upsample: expected a positive integer, got {upsample!r}")
    if not (np.isfinite(max_shift_px) and max_shift_px >= 0):
        raise ValueRangeError(f"max_shift_px: expected a shift ≥ 0 in pixels, got {max_shift_px!r}")
    a, b = _pair(reconstruction, truth)
    a, b = _finite_box(a, b, min_size=4)
    w = _hann2d(a.shape)
    a = (a - a.mean()) * w
    b = (b - b.mean()) * w
    if not (np.any(a) and np.any(b)):
        return 0.0, 0.0  # a flat image has no shift to find
    cross = np.fft.fft2(b) * np.fft.fft2(a).conj()  # its inverse peaks at s where b(x) ≈ a(x − s)
    kr, kc = np.fft.fftfreq(a.shape[0]), np.fft.fftfreq(a.shape[1])
    whole_r, whole_c = kr * a.shape[0], kc * a.shape[1]
    within = (np.abs(whole_r)[:, None] <= max_shift_px) & (np.abs(whole_c)[None, :] <= max_shift_px)
    peak = np.unravel_index(np.argmax(np.where(within, np.fft.ifft2(cross).real, -np.inf)), a.shape)
    steps = np.arange(-upsample, upsample + 1) / upsample  # ±1 px around the whole-pixel peak
    rows, cols = whole_r[peak[0]] + steps, whole_c[peak[1]] + steps
    fine = (np.exp(2j * np.pi * rows[:, None] * kr[None, :]) @ cross
            @ np.exp(2j * np.pi * kc[:, None] * cols[None, :])).real
    fine[np.abs(rows) > max_shift_px, :] = -np.inf
    fine[:, np.abs(cols) > max_shift_px] = -np.inf
    i, j = np.unravel_index(np.argmax(fine), fine.shape)
    return float(rows[i]), float(cols[j])


def _shifted(image: np.ndarray, shift) -> np.ndarray:
    """``image`` moved by ``shift`` (a Fourier shift); NaN where the result depends on missing data.

    A cubic spline at a sub-pixel shift is a low-pass filter: at half a pixel it keeps 57 % of white noise's
    variance, so "aligned" scored truth plus noise up to 0.08 above the plain correlation with nothing
    misaligned (the evaluation audit, s41). A Fourier shift passes every frequency; with the image mirrored
    at its edges first (so that the shift does not wrap one edge onto the other) it keeps 94 %."""
    from scipy import ndimage

    valid = np.isfinite(image)
    if np.allclose(shift, np.round(shift), rtol=0, atol=1e-9):  # whole pixels: exact, no margin (a zero shift
        # kept one ring fewer than the plain correlation's)
        return ndimage.shift(image, np.round(shift), order=0, mode="constant", cval=np.nan)
    filled = np.where(valid, image, image[valid].mean() if valid.any() else 0.0)
    # Odd sizes: an even grid's Nyquist frequency, moved by half a pixel, is imaginary and its real part lost.
    pad = int(np.ceil(np.abs(shift).max())) + 8
    widths = [(pad, pad + (n + 1) % 2) for n in filled.shape]
    padded = np.pad(filled, widths, mode="symmetric")
    moved = np.fft.ifftn(ndimage.fourier_shift(np.fft.fftn(padded), shift)).real
    moved = moved[pad:pad + filled.shape[0], pad:pad + filled.shape[1]]
    # A pixel is kept if the interpolation read only finite pixels inside the image: shift the
    # validity mask with linear interpolation and zeros outside, and keep what stays fully valid,
    # then drop one more pixel of margin (the shift's ringing is largest beside missing data).
    support = ndimage.shift(valid.astype(np.float64), shift, order=1, mode="constant", cval=0.0)
    keep = ndimage.binary_erosion(support > 1 - 1e-6, iterations=1, border_value=0)
    return np.where(keep, moved, np.nan)


def correlation_aligned(reconstruction, truth, upsample: int = 20) -> float:
    """Pearson correlation after moving the reconstruction by :func:`align`'s shift.

    The comparison is made on the pixels that are finite in the truth and fully covered by the
    shifted reconstruction (the interpolation never reads outside the image or a NaN).
    """
    return _correlation_shifted(reconstruction, truth, align(reconstruction, truth, upsample))


def _correlation_shifted(reconstruction, truth, shift) -> float:
    a, b = _pair(reconstruction, truth)
    return correlation(_shifted(a, shift), b)


_FRC_TUKEY_ALPHA = 0.25


def fourier_ring_correlation(a, b, pixel_size: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fourier ring correlation of two images, one ring per frequency pixel.

    Parameters
    ----------
    a, b : (H, W) array
        Two images of the same field of view on the same grid (e.g. reconstruction and truth). NaN
        marks missing pixels.
    pixel_size : float, optional
        Real-space pixel size in Å. Without it, frequencies are in cycles per pixel.

    Returns
    -------
    spatial_frequency : (N//2,) array
        Ring ``r`` = 1 … N//2 at ``r / (N · pixel_size)`` (1/Å, or 1/px); the last ring is Nyquist.
    frc : (N//2,) array
        ``Re Σ A·B* / sqrt(Σ|A|² Σ|B|²)`` over each ring; 0 where a ring holds no power.

    Notes
    -----
    Both images are cropped to the bounding box of the pixels finite in both, then to the central
    N×N square of it (NaN inside are filled with the mean). Each image is apodised with a separable
    Tukey window (cosine taper over 12.5 % of the width at each edge, ``alpha = 0.25``) after removing
    its window-weighted mean, so the windowed image has no zero frequency and any constant offset
    drops out exactly. Without a window the jump between opposite edges of a non-periodic image puts
    a cross of identical power along the axes of both transforms, which reads as correlation at every
    frequency (a mean FRC of 0.38 above the signal's band in a test with a shared smooth signal
    cropped from a larger field, 0.00 with this window). Tukey rather than Hann: it keeps 84 % of the
    image's weight (Hann 14 %), so the FRC of independent noise keeps nearly the nominal
    ``1/sqrt(ring pixels)`` spread (measured 1.04× that; Hann 1.37×, since its transform correlates
    neighbouring Fourier pixels along the ring). The price is a transition that spreads over ~3 rings
    instead of ~1; the 0.5 crossing of an ideal low-pass at 4 px comes out at 3.97 px either way.
    The ring-0 (zero-frequency) term is left out: it is not measured by a phase reconstruction.
    """
    n, cross, px, py = _ring_sums(a, b)
    return _ring_frequencies(n, pixel_size), _frc(cross, px, py)


def _frc(cross, px, py) -> np.ndarray:
    denom = np.sqrt(px * py)
    scale = max(float(denom.max()), np.finfo(float).tiny)
    ok = denom > 1e-12 * scale
    frc = np.zeros(len(cross))
    frc[ok] = cross[ok] / denom[ok]
    return frc


def _ring_sums(a, b) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(N, Re Σ A·B*, Σ|A|², Σ|B|²) over rings 1 … N//2 of the two images windowed as
    :func:`fourier_ring_correlation` says."""
    from scipy.signal.windows import tukey

    x, y = _pair(a, b)
    x, y = _finite_box(x, y, min_size=8)
    n = min(x.shape)
    r0, c0 = (x.shape[0] - n) // 2, (x.shape[1] - n) // 2
    x, y = x[r0 : r0 + n, c0 : c0 + n], y[r0 : r0 + n, c0 : c0 + n]
    taper = tukey(n, _FRC_TUKEY_ALPHA)
    w = np.outer(taper, taper)
    fx = np.fft.fft2((x - (w * x).sum() / w.sum()) * w)
    fy = np.fft.fft2((y - (w * y).sum() / w.sum()) * w)
    k = np.fft.fftfreq(n) * n
    ring = np.rint(np.hypot(k[:, None], k[None, :])).astype(int).ravel()
    n_rings = n // 2
    cross = np.bincount(ring, (fx * fy.conj()).real.ravel(), minlength=n_rings + 1)[1 : n_rings + 1]
    px = np.bincount(ring, (np.abs(fx) ** 2).ravel(), minlength=n_rings + 1)[1 : n_rings + 1]
    py = np.bincount(ring, (np.abs(fy) ** 2).ravel(), minlength=n_rings + 1)[1 : n_rings + 1]
    return n, cross, px, py


def _ring_frequencies(n: int, pixel_size: float | None) -> np.ndarray:
    freq = np.arange(1, n // 2 + 1) / n
    if pixel_size is not None:
        if not (np.isfinite(pixel_size) and pixel_size > 0):
            raise ValueRangeError(f"pixel_size: expected a positive size in Å, got {pixel_size!r}")
        freq = freq / float(pixel_size)
    return freq


#: The resolutions are searched from the first ring where the truth holds at least this share of its power: below
#: it (below a lattice's first reflection) there is little but the reconstruction's slow drifts, the offset's and
#: plane's business, and a low correlation in ring 1 read as "no resolution at all" (twisted hBN: 33 px where
#: rings 4–12 correlate 0.53–0.97, the quality audit, s36).
FIRST_JUDGED_POWER = 0.01


def ring_transfer(reconstruction, truth, pixel_size: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How much of the truth's signal the reconstruction carries, ring by ring: its transfer function.

    Parameters
    ----------
    reconstruction, truth : (H, W) array
        As for :func:`fourier_ring_correlation` (windowed and cropped as it says).
    pixel_size : float, optional
        Pixel size in Å (frequencies in 1/Å); without it, cycles per pixel.

    Returns
    -------
    spatial_frequency : (N//2,) array
    transfer : (N//2,) array
        The gain ``Re Σ A·B* / Σ|B|²`` of each ring (A the reconstruction's transform, B the truth's), divided by
        the size of the power-weighted gain of the judged rings (from the first holding :data:`FIRST_JUDGED_POWER` of
        the truth's power on), so that a uniformly scaled reconstruction has transfer 1 everywhere, −1 inverted
        (``scale`` reports the size). A blur lowers the high rings (a Gaussian of σ px: ``exp(−2π²σ²f²)`` relative
        to the rings' mean, so the low rings of a blurred image rise above 1); noise does not bias it, unlike the
        FRC, which a blur without noise leaves at 1. NaN where the truth has no power, or where the reconstruction
        does not correlate with it at all.
    truth_power : (N//2,) array
        The share of the truth's (windowed) power in each ring.
    """
    n, cross, _, power = _ring_sums(reconstruction, truth)
    share = _power_share(power)
    return _ring_frequencies(n, pixel_size), _transfer(cross, power, first_judged_ring(share)), share


def _power_share(power) -> np.ndarray:
    total = power.sum()
    return power / total if total > 0 else np.zeros_like(power)


def _transfer(cross, power, first: int) -> np.ndarray:
    transfer = np.full(len(cross), np.nan)
    judged = power[first:].sum()
    mean_gain = cross[first:].sum() / judged if judged > 0 else 0.0
    held = power > 1e-12 * max(float(power.max()), np.finfo(float).tiny)
    if mean_gain != 0:  # (by its size: an inverted contrast transfers −1, not 1)
        transfer[held] = cross[held] / power[held] / abs(mean_gain)
    return transfer


def first_judged_ring(truth_power) -> int:
    """Index of the first ring holding at least :data:`FIRST_JUDGED_POWER` of the truth's power (0 if none does)."""
    judged = np.flatnonzero(np.asarray(truth_power) >= FIRST_JUDGED_POWER)
    return int(judged[0]) if len(judged) else 0


def frc_ring_pixels(n: int) -> np.ndarray:
    """Number of Fourier pixels in rings 1 … n//2 of an n×n image (for the ``3/sqrt(count)`` noise spread)."""
    k = np.fft.fftfreq(int(n)) * int(n)
    ring = np.rint(np.hypot(k[:, None], k[None, :])).astype(int).ravel()
    return np.bincount(ring, minlength=int(n) // 2 + 1)[1 : int(n) // 2 + 1]


def frc_resolution(freq, frc, threshold: float = 0.5, first: int = 0) -> float:
    """Resolution (1 / frequency) where the FRC first drops below ``threshold``.

    Parameters
    ----------
    freq, frc : 1-D arrays
        As returned by :func:`fourier_ring_correlation`.
    threshold : float
        Usually 0.5 or 1/7. Against the *truth* 0.5 is the criterion that corresponds to 1/7
        between two independent half data sets (Rosenthal & Henderson, 2003).
    first : int
        Index of the first ring searched (:func:`first_judged_ring`); the rings before it are not judged.

    Returns
    -------
    float
        In Å if ``freq`` is in 1/Å, in pixels if it is in cycles per pixel. The crossing is
        interpolated linearly between the last ring above and the first ring below the threshold.
        If the FRC never drops below, the resolution is the sampling limit ``1 / freq[-1]``
        (Nyquist: 2 pixels); if the first ring searched is already below, ``1 / freq[first]``.
    """
    freq = np.asarray(freq, dtype=np.float64)
    frc = np.asarray(frc, dtype=np.float64)
    if freq.ndim != 1 or freq.shape != frc.shape or len(freq) < 1:
        raise ShapeError(f"frc: expected two 1-D arrays of one length, got shapes {freq.shape} and {frc.shape}")
    if not np.all(freq > 0):
        raise ValueRangeError("freq: expected positive spatial frequencies (ring 0 left out)")
    if not 0 <= first < len(freq):
        raise ValueRangeError(f"first: expected a ring index in 0…{len(freq) - 1}, got {first}")
    freq, frc = freq[first:], frc[first:]
    below = np.flatnonzero(~(frc >= threshold))  # NaN counts as below
    if len(below) == 0:
        return float(1.0 / freq[-1])
    i = int(below[0])
    if i == 0:
        return float(1.0 / freq[0])
    f0, f1, c0, c1 = freq[i - 1], freq[i], frc[i - 1], frc[i]
    f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0) if np.isfinite(c1) and c0 != c1 else f1
    return float(1.0 / f)


def ssim(reconstruction, truth, win_size: int = 7) -> float:
    """Structural similarity of the reconstruction to the truth after removing the mean offset.

    The offset is the least-squares constant ``mean(truth − reconstruction)`` over the pixels finite
    in both (the scale is *not* fitted: a phase of the wrong size lowers the SSIM). ``data_range`` is
    the truth's peak-to-peak range over those pixels. The SSIM map of
    :func:`skimage.metrics.structural_similarity` is averaged over the pixels whose whole
    ``win_size`` window is finite in both images (without NaN this is exactly skimage's mean SSIM).
    """
    from scipy import ndimage
    from skimage.metrics import structural_similarity

    a, b = _pair(reconstruction, truth)
    valid = np.isfinite(a) & np.isfinite(b)
    if valid.sum() < 2:
        raise ShapeError("reconstruction: fewer than two pixels are finite in both images")
    a = a + (b[valid] - a[valid]).mean()
    data_range = float(np.ptp(b[valid]))
    if data_range == 0:
        return 1.0 if np.allclose(a[valid], b[valid]) else 0.0
    a, b = np.where(valid, a, 0.0), np.where(valid, b, 0.0)
    if min(a.shape) < win_size:
        raise ShapeError(f"reconstruction: SSIM needs at least {win_size}×{win_size} pixels, got {a.shape}")
    _, smap = structural_similarity(a, b, win_size=win_size, data_range=data_range, full=True)
    keep = ndimage.binary_erosion(valid, np.ones((win_size, win_size), bool), border_value=0)
    if not keep.any():
        raise ShapeError(f"reconstruction: no {win_size}×{win_size} window is finite in both images")
    return float(smap[keep].mean())


def evaluate(reconstruction, truth, pixel_size: float | None = None, upsample: int = 20) -> dict:
    """Every figure of :mod:`deepphase.evaluation.metrics` in one dictionary.

    Keys: ``correlation``; ``correlation_aligned`` and ``shift_px`` (row, col) from :func:`align` (a shift of at
    most :data:`MAX_SHIFT_PX`);
    ``fitted_rmse`` (rad) and ``scale`` from :func:`fitted_rmse`; ``offset_rmse`` (rad);
    ``frc_resolution_0.5`` and ``frc_resolution_1/7`` (in ``resolution_unit``: Å with
    ``pixel_size``, else px) of the images as given (not aligned), searched from the first ring that holds
    :data:`FIRST_JUDGED_POWER` of the truth's power (``first_judged_ring``, 0 = ring 1), with
    ``frc_at_sampling_limit_0.5`` and ``..._1/7`` True where the FRC never drops below the threshold (the figure
    is then the finest the sampling can show, a bound, not a measurement); ``transfer_resolution_0.5`` where the
    :func:`ring_transfer` first drops below half (what the FRC cannot see: blur), with
    ``transfer_at_sampling_limit_0.5``; ``ssim``.
    """
    shift = align(reconstruction, truth, upsample)
    rmse, scale = fitted_rmse(reconstruction, truth)
    n, cross, power_rec, power_truth = _ring_sums(reconstruction, truth)  # (one transform pair for both curves)
    freq, frc = _ring_frequencies(n, pixel_size), _frc(cross, power_rec, power_truth)
    first = first_judged_ring(_power_share(power_truth))
    transfer = _transfer(cross, power_truth, first)
    searched = np.isfinite(transfer) & (np.arange(len(transfer)) >= first)  # (NaN: a ring the truth lacks)
    if searched.any():
        transfer_resolution = frc_resolution(freq[searched], transfer[searched], 0.5)
        transfer_bound = bool(np.all(transfer[searched] >= 0.5) and searched[-1])
        transfer_none = bool(not transfer[searched][0] >= 0.5)
    else:  # (no correlation with the truth at all: no transfer to speak of)
        transfer_resolution, transfer_bound, transfer_none = float("nan"), False, False
    return {
        "correlation": correlation(reconstruction, truth),
        "correlation_aligned": _correlation_shifted(reconstruction, truth, shift),
        "shift_px": [shift[0], shift[1]],
        "fitted_rmse": rmse,
        "scale": scale,
        "offset_rmse": offset_rmse(reconstruction, truth),
        "frc_resolution_0.5": frc_resolution(freq, frc, 0.5, first),
        "frc_resolution_1/7": frc_resolution(freq, frc, 1 / 7, first),
        "frc_at_sampling_limit_0.5": bool(np.all(frc[first:] >= 0.5)),
        "frc_at_sampling_limit_1/7": bool(np.all(frc[first:] >= 1 / 7)),
        # Below the threshold from the first ring judged: the "resolution" is that ring's, a lower bound ("13.00 px",
        # the field of view, read as a resolution: the figures audit, s41)
        "frc_below_from_first_0.5": bool(not frc[first] >= 0.5),
        "frc_below_from_first_1/7": bool(not frc[first] >= 1 / 7),
        "first_judged_ring": first + 1,  # (ring number: 1 is the lowest frequency)
        "transfer_resolution_0.5": transfer_resolution,
        "transfer_at_sampling_limit_0.5": transfer_bound,
        "transfer_below_from_first_0.5": transfer_none,
        "resolution_unit": "Å" if pixel_size is not None else "px",
        "ssim": ssim(reconstruction, truth),
    }


def uncertainty_coverage(reconstruction, truth, sigma) -> dict:
    """How well a per-pixel standard deviation describes the actual error.

    The error is ``reconstruction − truth`` after removing its mean (the offset is arbitrary). A
    calibrated Gaussian σ covers 68.3 % of the pixels within ±1σ and 95.4 % within ±2σ.

    Returns
    -------
    dict with ``within_1sigma`` and ``within_2sigma`` (fractions of the pixels finite in all three),
    ``rmse`` (rad) and ``mean_sigma`` (rad): a well-calibrated σ has a mean near the RMSE.
    """
    a, b = _pair(reconstruction, truth)
    s = np.asarray(sigma, dtype=np.float64)
    if s.shape != a.shape:
        raise ShapeError(f"sigma: shape {s.shape} differs from the reconstruction's {a.shape}")
    valid = np.isfinite(a) & np.isfinite(b) & np.isfinite(s)
    if valid.sum() < 2:
        raise ShapeError("sigma: fewer than two pixels are finite in the reconstruction, truth and sigma")
    if np.any(s[valid] < 0):
        raise ValueRangeError("sigma: expected non-negative standard deviations")
    err = (a - b)[valid]
    err = np.abs(err - err.mean())
    return {"within_1sigma": float(np.mean(err <= s[valid])), "within_2sigma": float(np.mean(err <= 2 * s[valid])),
            "rmse": float(np.sqrt(np.mean(err**2))), "mean_sigma": float(np.mean(s[valid]))}
