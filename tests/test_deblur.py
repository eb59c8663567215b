"""The blend's sub-pixel blur and its inverse, tested on analytic objects sampled exactly."""

import numpy as np
import pytest

from deepphase.errors import DeepPhaseError, ShapeError
from deepphase.physics.geometry import Geometry, upsample_nearest
from deepphase.physics.scan import raster_positions
from deepphase.reconstruction.deblur import blend_transfer_function, deblur_blend
from deepphase.reconstruction.stitching import PairwiseStitcher

GEOMETRY = Geometry()


def _disc_mask(geometry=GEOMETRY):
    c = geometry.crop_px
    r, q = np.indices((c, c)) - (c - 1) / 2
    return upsample_nearest(r**2 + q**2 <= (0.4 * c) ** 2, geometry.upsample)


def _band_limited_object(seed=0, n_waves=40, max_freq=0.3):
    """A sum of cosines below ``max_freq`` cycles/px: its value at any real coordinate is known exactly."""
    rng = np.random.default_rng(seed)
    k = rng.uniform(-max_freq, max_freq, size=(n_waves, 2))
    phase0 = rng.uniform(0, 2 * np.pi, n_waves)
    amp = rng.uniform(0.02, 0.1, n_waves)

    def at(rows, cols):
        arg = 2 * np.pi * (rows[..., None] * k[:, 0] + cols[..., None] * k[:, 1]) + phase0
        return (amp * np.cos(arg)).sum(-1)

    return at


def _exact_patches(obj, positions, geometry=GEOMETRY):
    """What a perfect network returns: the object at y = position + crop_start + k (upsampled)."""
    k = np.arange(geometry.crop_px)
    y = positions[:, 0, None] + geometry.crop_start + k
    x = positions[:, 1, None] + geometry.crop_start + k
    patches = obj(y[:, :, None], x[:, None, :])
    return upsample_nearest(patches, geometry.upsample).astype(np.float64)


def _errors(positions, seed=0):
    obj = _band_limited_object(seed)
    mask = _disc_mask()
    stitcher = PairwiseStitcher(positions, mask, GEOMETRY)
    stitcher.add(_exact_patches(obj, positions))
    blended = stitcher.image()
    sharp = deblur_blend(blended, positions, GEOMETRY)
    rows, cols = np.indices(blended.shape)
    truth = obj(rows.astype(float), cols.astype(float))
    # the interior: every pixel there is covered by many patches of every sub-pixel phase
    inner = np.zeros(blended.shape, bool)
    inner[20:-20, 20:-20] = True
    inner &= np.isfinite(blended)

    def fit(image):
        a, b = image[inner] - image[inner].mean(), truth[inner] - truth[inner].mean()
        scale = (a @ b) / (a @ a)
        return np.sqrt(np.mean((scale * a - b) ** 2)), scale

    return fit(blended), fit(sharp), blended, sharp


def test_transfer_function_is_one_on_the_object_grid():
    positions = raster_positions((12, 12), 1.0)
    transfer = blend_transfer_function(positions, GEOMETRY, (40, 36))
    np.testing.assert_allclose(transfer, 1.0, atol=1e-12)


def test_transfer_function_of_a_half_pixel_offset_is_a_cosine():
    # Every sample half a pixel past a pixel: splatted 50/50 onto two pixels, K̂(ν) = cos(πν) along rows.
    positions = raster_positions((6, 6), 1.0) + np.array([0.5, 0.0])
    transfer = blend_transfer_function(positions, GEOMETRY, (32, 8))
    nu = np.fft.fftfreq(32)
    np.testing.assert_allclose(transfer[:, 0], np.cos(np.pi * nu), atol=1e-12)
    np.testing.assert_allclose(transfer[0, :], 1.0, atol=1e-12)


def test_transfer_function_checks_positions():
    with pytest.raises(ShapeError, match="positions"):
        blend_transfer_function(np.zeros((5, 3)), GEOMETRY, (8, 8))


def test_deblurring_a_half_pixel_step_recovers_the_object():
    # Two sub-pixel phases per axis, mixed the same way under every pixel: the blend is exactly a
    # convolution with K̂ and dividing it out recovers the object.
    positions = raster_positions((48, 48), 0.5)
    (rmse_box, scale_box), (rmse_sharp, scale_sharp), *_ = _errors(positions)
    assert scale_box > 1.1
    assert abs(scale_sharp - 1) < 0.01
    assert rmse_sharp < rmse_box / 10


def test_deblurring_restores_the_contrast_at_the_reference_step():
    # At 0.87 px the mixture of sub-pixel phases drifts slowly across the scan (a beat of ~7 steps), so
    # the blur is only on average the global K̂: the contrast comes back, most of the error goes.
    positions = raster_positions((48, 48), 0.87)
    (rmse_box, scale_box), (rmse_sharp, scale_sharp), *_ = _errors(positions)
    assert scale_box > 1.1  # the blend weakens the contrast ...
    assert abs(scale_sharp - 1) < 0.01  # ... and dividing K̂ out restores it
    assert rmse_sharp < rmse_box / 2.5


def test_deblurring_keeps_integer_steps_and_nan_edges():
    positions = raster_positions((24, 24), 1.0)
    (rmse_box, _), (rmse_sharp, scale_sharp), blended, sharp = _errors(positions, seed=1)
    np.testing.assert_allclose(sharp[np.isfinite(sharp)], blended[np.isfinite(blended)], atol=1e-9)
    np.testing.assert_array_equal(np.isnan(sharp), np.isnan(blended))
    assert rmse_box < 1e-6 and abs(scale_sharp - 1) < 1e-6  # float32 reductions in the stitcher


def test_auto_deblurs_counted_data_by_their_dose():
    from deepphase.reconstruction.deblur import AUTO_MIN_ELECTRONS, electrons_per_pattern, resolve_deblur

    rng = np.random.default_rng(0)
    for dose in (300.0, 30_000.0):
        counts = rng.poisson(dose / 1024, size=(500, 32, 32))
        amplitudes = np.sqrt(counts).astype(np.float32)  # what a counting detector's file becomes
        assert electrons_per_pattern(amplitudes) == pytest.approx(dose, rel=0.02)
        on, why = resolve_deblur("auto", electrons_per_pattern(amplitudes))
        assert on is (dose >= AUTO_MIN_ELECTRONS) and "electrons per pattern" in why
    scaled = np.sqrt(rng.poisson(30.0, size=(50, 32, 32)) * 0.37).astype(np.float32)  # not whole counts
    assert electrons_per_pattern(scaled) is None and resolve_deblur("auto", None)[0] is True
    assert resolve_deblur(False, 30_000.0) == (False, "as asked")
    with pytest.raises(DeepPhaseError, match="deblur"):
        resolve_deblur("sometimes", None)


def test_dividing_out_a_known_source_recovers_the_object():
    from deepphase.reconstruction.deblur import deconvolve_source, source_regularisation

    assert source_regularisation(27881.8) == pytest.approx(0.01) == source_regularisation(1e6)
    assert source_regularisation(278.818) == pytest.approx(0.1)  # growing as 1/√dose below the reference dose
    rng = np.random.default_rng(3)
    k = rng.uniform(-0.2, 0.2, size=(30, 2))
    phase0 = rng.uniform(0, 2 * np.pi, 30)
    r, c = np.indices((72, 72)).astype(float)

    def values(gain):
        g = gain(k)
        return sum(g[i] * np.cos(2 * np.pi * (k[i, 0] * r + k[i, 1] * c) + phase0[i]) for i in range(len(k)))

    truth = values(lambda k: np.ones(len(k)))
    blurred = values(lambda k: np.exp(-2 * np.pi**2 * 1.2**2 * (k**2).sum(1)))  # exactly: each cosine damped
    inner = (slice(12, -12), slice(12, -12))  # the reflected padding is not the object's continuation
    sharp = deconvolve_source(blurred, 1.2, regularisation=1e-4)
    error_before = np.abs(blurred - truth)[inner].std()
    assert np.abs(sharp - truth)[inner].std() < 0.1 * error_before
    # the dose picks λ: more regularisation for low-dose (or unknown) data, so less of the blur divided out
    high, low = deconvolve_source(blurred, 1.2, 27882.0), deconvolve_source(blurred, 1.2, 1000.0)
    assert np.abs(high - truth)[inner].std() < np.abs(low - truth)[inner].std() < error_before
    assert np.array_equal(deconvolve_source(blurred, 1.2), deconvolve_source(blurred, 1.2, regularisation=0.03))
    assert np.array_equal(deconvolve_source(blurred, 0.0), blurred)


def test_dividing_out_a_source_keeps_nan_edges_and_the_mean_and_refuses_bad_sizes():
    from deepphase.reconstruction.deblur import deconvolve_source

    image = np.random.default_rng(0).normal(size=(40, 40)) + 5.0
    image[:3] = np.nan
    sharp = deconvolve_source(image, 1.0)
    assert np.array_equal(np.isnan(sharp), np.isnan(image))
    assert np.nanmean(sharp) == pytest.approx(np.nanmean(image), abs=0.05)
    for bad in (-1.0, float("inf")):
        with pytest.raises(DeepPhaseError, match="source_size_px"):
            deconvolve_source(image, bad)
    with pytest.raises(DeepPhaseError, match="regularisation"):
        deconvolve_source(image, 1.0, regularisation=0.0)
