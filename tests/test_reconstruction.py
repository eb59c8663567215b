"""Reconstruction of scans simulated independently of deepphase's own simulator."""

import numpy as np
import pytest
from scipy import ndimage

from deepphase.data.specimens import twisted_hbn
from deepphase.evaluation.metrics import correlation
from deepphase.physics import raster_positions

from .conftest import unchecked_reconstruct as reconstruct


def independent_scan(probe, truth, positions, seed=0):
    """The seed's forward model written out with NumPy only: the object is interpolated at each
    sub-pixel window (cubic splines) instead of shifting the probe as deepphase.simulate does."""
    n = probe.shape[0]
    rr, cc = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    rng = np.random.default_rng(seed)
    out = np.empty((len(positions), n, n))
    for i, (r, c) in enumerate(positions):
        window = ndimage.map_coordinates(truth, [rr + r, cc + c], order=3, mode="nearest")
        psi = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(probe * np.exp(1j * window))))
        out[i] = np.sqrt(rng.poisson(np.abs(psi) ** 2))  # the reference probe's scale is the seed's dose
    return out


@pytest.fixture(scope="module")
def scan(probe):
    positions = raster_positions((40, 40), 0.86995916, fastest="row")
    truth = twisted_hbn((70, 70), seed=3)
    return independent_scan(probe, truth, positions), positions, truth


@pytest.mark.parametrize("stitching", ["pairwise", "least-squares", "seed"])
def test_packaged_model_reconstructs_an_independent_simulation(scan, stitching):
    amplitudes, positions, truth = scan
    rec = reconstruct(amplitudes, positions, stitching=stitching, progress=False)
    r0, c0 = rec.origin_px
    # The probe's illuminated 3×3 centre of the first window is at rows/cols 15-17: that is where coverage starts.
    assert (r0, c0) == (15, 15)
    crop = truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]]
    corr = correlation(rec.phase, crop)
    print(f"{stitching}: correlation {corr:.3f}")
    assert corr > 0.8
    # The image is aligned with the truth: a one-pixel shift correlates worse.
    assert corr > correlation(rec.phase[1:], crop[:-1]) and corr > correlation(rec.phase[:, 1:], crop[:, :-1])


def test_deblurring_restores_atomic_contrast(scan):
    from deepphase.evaluation.metrics import fitted_rmse

    amplitudes, positions, truth = scan
    figures = {}
    for deblur in (False, True):
        rec = reconstruct(amplitudes, positions, deblur=deblur, progress=False)
        assert rec.processing["deblurred"] is deblur
        r0, c0 = rec.origin_px
        crop = truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]]
        inner = (slice(4, -4), slice(4, -4))  # away from the scan edge, where the filter sees one side
        figures[deblur] = correlation(rec.phase[inner], crop[inner]), fitted_rmse(rec.phase[inner], crop[inner])[1]
    print(figures)
    (corr_box, scale_box), (corr_sharp, scale_sharp) = figures[False], figures[True]
    # The blend shrinks the lattice's contrast; dividing out its blur brings the scale towards 1 ...
    assert abs(scale_sharp - 1) < abs(scale_box - 1) - 0.05
    # ... and does not cost correlation at the seed's dose.
    assert corr_sharp > corr_box
    assert reconstruct(amplitudes[:200], positions[:200], stitching="seed", progress=False).processing["deblurred"] is False


@pytest.mark.parametrize("uncertainty", [None, 2])
def test_patterns_zero_everywhere_are_counted_and_said(scan, uncertainty, capsys):
    """Frames never written (a pre-allocated HDF5 dataset, a zarr store missing chunk files) read as zeros, and the
    image came out 0.22-0.36 rad off with no note (the scale audit, s41). Counted once, whatever the draws, across
    chunks, and the progress bar counts whole predictions (it showed "2236.0/2304")."""
    from deepphase.errors import DeepPhaseNote

    amplitudes, positions, _ = scan
    holed = amplitudes.copy()
    holed[300:340] = 0
    holed[1500] = 0
    with pytest.warns(DeepPhaseNote, match=r"^41 of the 1,600 patterns read are zero everywhere \(frames 300, 301, "):
        rec = reconstruct(holed, positions, progress=True, chunk_size=512, uncertainty=uncertainty)
    assert rec.processing["empty_patterns"] == {"count": 41, "first": [*range(300, 340), 1500]}
    # positions per second, whatever the draws (predictions were counted: the figures audit, s41)
    draws_ = 1 if uncertainty is None else 3
    assert rec.timings["patterns_per_second"] == pytest.approx(1600 / rec.timings["predict_s"], rel=0.02)
    assert rec.timings.get("predictions_per_second", rec.timings["patterns_per_second"]) == pytest.approx(
        draws_ * rec.timings["patterns_per_second"], rel=1e-3)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    draws = 1 if uncertainty is None else 3
    assert any(f"{1600 * draws}/{1600 * draws}" in line for line in bar) and not any(".0/" in line for line in bar)
    assert "empty_patterns" not in reconstruct(amplitudes[:64], positions[:64], progress=False).processing


def test_patterns_empty_by_counting_noise_alone_are_not_called_unwritten():
    """At 5 e/pattern ~440 of 65,536 patterns hold no electron by chance (exp(−5)); they were said to be frames never
    written (the review, s41)."""
    from deepphase.reconstruction.pipeline import more_empty_than_chance

    rng = np.random.default_rng(0)
    chance = int((rng.poisson(5.0, 65536) == 0).sum())
    assert 350 < chance < 550 and not more_empty_than_chance(chance, 65536, 5.0)
    assert more_empty_than_chance(chance + 300, 65536, 5.0)  # a block never written, beside them
    assert more_empty_than_chance(1, 65536, 27882.0) and more_empty_than_chance(1, 100, None)
    assert not more_empty_than_chance(0, 100, None)
