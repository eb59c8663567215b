"""A finite source and a detector's point spread, tested against their physics."""

import numpy as np
import pytest
import torch

from deepphase.data.simulate import simulate_scan
from deepphase.errors import ValueRangeError
from deepphase.physics.instrument import FWHM_PER_SIGMA, coherent_modes, detector_blur


def _intensities(phase, probe, positions, **kwargs) -> np.ndarray:
    return simulate_scan(phase, probe, positions, noise=False, progress=False, **kwargs).amplitude.astype(np.float64) ** 2


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_a_source_damps_each_scan_frequency_by_the_gaussian_envelope(probe, sigma):
    # A weak cosine of period 16 px scanned over one period: every detector pixel's first Fourier component
    # over the scan is the object's first-order interference, which a Gaussian jitter of the probe damps by
    # exp(−2π² σ² g²) (the ε² terms sit at 0 and 2g).
    n, period, eps = probe.shape[0], 16, 0.01
    rows = np.arange(period + n + 2)[:, None] * np.ones((1, n + 2))
    phase = eps * np.cos(2 * np.pi * rows / period)
    positions = np.stack([np.arange(period, dtype=float), np.zeros(period)], 1)
    coherent = np.fft.fft(_intensities(phase, probe, positions), axis=0)[1]
    partial = np.fft.fft(_intensities(phase, probe, positions, source_size_px=sigma), axis=0)[1]
    envelope = np.exp(-2 * np.pi**2 * sigma**2 / period**2)
    assert np.abs(partial - envelope * coherent).sum() < 0.005 * np.abs(coherent).sum()
    # and not the coherent data: the envelope is measurable at every σ here
    assert np.abs(partial - coherent).sum() > 3 * np.abs(partial - envelope * coherent).sum()


def test_coherence_modes_carry_the_probes_current_and_no_source_is_the_probe(probe):
    assert np.array_equal(coherent_modes(probe, 0.0)[0], probe.astype(np.complex128))
    modes = coherent_modes(probe, 1.0)
    assert 1 < len(modes) < 100
    assert np.sum(np.abs(modes) ** 2) == pytest.approx(np.sum(np.abs(probe) ** 2), rel=1e-12)
    power = np.sum(np.abs(modes) ** 2, axis=(1, 2))
    assert np.all(np.diff(power) <= 1e-12 * power[0])  # strongest first
    # more jitter, more modes
    assert len(coherent_modes(probe, 0.5)) < len(modes) < len(coherent_modes(probe, 2.0))


def test_a_source_leaves_the_pattern_of_vacuum_unchanged(probe):
    # Moving the probe does not change |F(P)|², so an incoherent mix of moved probes does not either
    # (to the share of the current the dropped modes held, 1e-3).
    positions = np.array([[0.3, 0.6], [1.0, 0.0]])
    vacuum = np.zeros((40, 40))
    coherent = _intensities(vacuum, probe, positions)
    partial = _intensities(vacuum, probe, positions, source_size_px=1.5)
    assert np.abs(partial - coherent).sum() < 2e-3 * coherent.sum()


def test_detector_blur_conserves_counts_and_spreads_a_point_by_its_sigma():
    point = torch.zeros(2, 32, 32, dtype=torch.float64)
    point[:, 16, 16] = 100.0
    blurred = detector_blur(point, 1.0)
    assert blurred.sum().item() == pytest.approx(200.0, rel=1e-12)
    weights = blurred[0] / blurred[0].sum()
    offsets = torch.arange(32, dtype=torch.float64) - 16
    assert (weights.sum(1) * offsets**2).sum().item() == pytest.approx(1.0, rel=1e-6)  # variance along rows
    assert (weights.sum(0) * offsets**2).sum().item() == pytest.approx(1.0, rel=1e-6)
    assert detector_blur(point, 0.0) is point


def test_simulated_counts_are_the_blurred_intensity(probe, rng):
    phase = rng.uniform(-0.5, 0.5, (40, 40))
    positions = np.array([[2.4, 3.1], [5.0, 1.7]])
    sharp = torch.as_tensor(_intensities(phase, probe, positions))
    blurred = _intensities(phase, probe, positions, detector_psf_px=0.8)
    assert np.allclose(blurred, detector_blur(sharp, 0.8).numpy(), rtol=1e-5, atol=1e-3)
    assert not np.allclose(blurred, sharp.numpy(), rtol=1e-2)


@pytest.mark.parametrize("kwargs, name", [({"source_size_px": -1.0}, "source_size_px"),
                                          ({"detector_psf_px": float("nan")}, "detector_psf_px"),
                                          ({"focal_spread_rad": -0.5}, "focal_spread_rad")])
def test_a_bad_width_is_refused_naming_it(probe, kwargs, name):
    with pytest.raises(ValueRangeError, match=name):
        simulate_scan(np.zeros((40, 40)), probe, np.zeros((1, 2)), progress=False, **kwargs)


def test_fwhm_per_sigma():
    x = np.linspace(-5, 5, 200_001)
    above = x[np.exp(-x**2 / 2) >= 0.5]
    assert above[-1] - above[0] == pytest.approx(FWHM_PER_SIGMA, abs=1e-4)


@pytest.mark.parametrize("coherence", [{"source_size_px": 1.2}, {"focal_spread_rad": 1.0}])
def test_a_partially_coherent_stream_simulates_the_pattern_simulate_scan_does_and_targets_the_object(
        probe, monkeypatch, coherence):
    import deepphase.data.stream as stream_module
    from deepphase.data.phase_objects import CorpusConfig
    from deepphase.data.stream import TrainingStream
    from deepphase.physics.geometry import Geometry, crop_window, upsample_nearest

    objects = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1.2
    monkeypatch.setattr(stream_module, "random_phase_objects", lambda size, n, gen, corpus, device: objects[:size])
    monkeypatch.setattr(stream_module, "poisson_counts", lambda intensity, dose, counts, gen: intensity * (dose / counts))
    geometry = Geometry()
    stream = TrainingStream(probe, geometry, CorpusConfig(), 27882.0, **coherence)
    batch = stream.batch(3, torch.Generator().manual_seed(0))
    for k in range(3):
        phase = np.pad(objects[k].double().numpy(), ((0, 1), (0, 1)))  # simulate_scan's sub-pixel margin
        expected = simulate_scan(phase, probe, np.zeros((1, 2)), noise=False, progress=False, **coherence).amplitude[0]
        assert np.allclose(batch.amplitude[k, 0].numpy(), expected, rtol=1e-3, atol=1e-2)
        coherent = simulate_scan(phase, probe, np.zeros((1, 2)), noise=False, progress=False).amplitude[0]
        assert not np.allclose(batch.amplitude[k, 0].numpy(), coherent, rtol=1e-2, atol=1.0)
    target = upsample_nearest(crop_window(objects, geometry), geometry.upsample)
    assert torch.equal(batch.target[:, 0], target)  # the object itself, not its blurred image


def test_a_source_range_draws_its_sizes_and_is_refused_where_it_is_not_simulated(probe):
    from deepphase.data.phase_objects import CorpusConfig
    from deepphase.data.stream import COHERENCE_STEPS, TrainingStream
    from deepphase.physics.geometry import Geometry

    stream = TrainingStream(probe, Geometry(), CorpusConfig(), 1000.0, source_size_px=(0.0, 1.5))
    assert len(stream._coherence_modes) == COHERENCE_STEPS and stream._coherence_modes[0].shape[1] == 1  # σ = 0: the probe
    assert stream.batch(8, torch.Generator().manual_seed(0)).amplitude.shape == (8, 1, 32, 32)
    for kwargs in ({"defocus_spread": 1.0}, {"aberration_range": 1.0}):
        with pytest.raises(ValueRangeError, match="source_size_px"):
            TrainingStream(probe, Geometry(), CorpusConfig(), 1000.0, source_size_px=1.0, **kwargs)
    with pytest.raises(ValueRangeError, match="source_size_px"):
        TrainingStream(probe, Geometry(), CorpusConfig(), 1000.0, source_size_px=(1.0, 0.5))


def test_reconstruct_divides_out_the_source_it_is_told_and_says_so(tmp_path, capsys):
    import json

    from deepphase.cli import main

    data = tmp_path / "scan.npz"
    assert main(["simulate", "--scan-shape", "24", "24", "--source-size", "1", "--seed", "2", "--out", str(data)]) == 0
    with np.load(data) as f:
        assert json.loads(str(f["parameters"]))["source_size_px"] == 1.0
    meta = {}
    for name, options in (("plain", []), ("told", ["--source-size", "1"])):
        assert main(["reconstruct", str(data), "--out", str(tmp_path / name), *options]) == 0
        meta[name] = json.loads((tmp_path / name / "metadata.json").read_text())
    assert "source_deconvolved" not in meta["plain"]["processing"]
    told = meta["told"]["processing"]["source_deconvolved"]
    assert told["source_size_px"] == 1.0 and told["wiener_regularisation"] == pytest.approx(0.01, rel=0.01)  # 27,882 e/pattern
    assert meta["told"]["correlation_with_truth"] > meta["plain"]["correlation_with_truth"] + 0.01
    capsys.readouterr()


def test_a_focal_spread_is_the_average_of_the_patterns_over_the_defocus(probe, rng):
    # The modes against a brute-force Gauss–Hermite average over the defocus, which a 1-D Gaussian integral of
    # a smooth integrand allows: two independent routes to the same incoherent sum.
    from deepphase.data.aberrations import add_aberrations
    from deepphase.data.calibration import model_disk

    spread = 0.8  # rad at the disk's edge
    phase = rng.uniform(-0.6, 0.6, (40, 40))
    positions = np.array([[2.3, 4.1]])
    partial = _intensities(phase, probe, positions, focal_spread_rad=spread)
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    a = nodes * spread / model_disk(probe)["radius"] ** 2
    brute = sum(w * _intensities(phase, add_aberrations(probe, (c, 0.0, c)), positions) for c, w in zip(a, weights))
    brute /= weights.sum()
    assert np.abs(partial - brute).sum() < 2e-3 * brute.sum()
    coherent = _intensities(phase, probe, positions)
    assert np.abs(partial - coherent).sum() > 10 * np.abs(partial - brute).sum()
    # vacuum: a spread of focus does not change |F(P)|²
    vacuum = np.zeros((40, 40))
    assert np.abs(_intensities(vacuum, probe, positions, focal_spread_rad=spread)
                  - _intensities(vacuum, probe, positions)).sum() < 2e-3 * coherent.sum()


def test_modes_of_an_aperture_probe_need_only_its_lit_pixels_and_a_huge_spectrum_is_refused(rng, monkeypatch):
    import deepphase.physics.instrument as instrument
    from deepphase.physics import ProbeParameters, probe_from_parameters

    aperture = probe_from_parameters(ProbeParameters(300, 25, 20.0, 0, 32, 0.2))  # a disk of its spectrum, defocused
    window = np.exp(1j * rng.uniform(-0.6, 0.6, (32, 32)))
    # (a tolerance far below the default's: at 1e-3 the cut may fall inside a degenerate pair, either way)
    restricted = coherent_modes(aperture, 1.0, 0.002, tolerance=1e-5)
    monkeypatch.setattr(instrument, "_DARK", 0.0)  # every pixel of the spectrum
    full = coherent_modes(aperture, 1.0, 0.002, tolerance=1e-5)
    assert len(restricted) == len(full)
    pattern = {name: sum(np.abs(np.fft.fft2(m * window)) ** 2 for m in modes)
               for name, modes in (("restricted", restricted), ("full", full))}
    assert np.abs(pattern["restricted"] - pattern["full"]).sum() < 1e-9 * pattern["full"].sum()
    monkeypatch.setattr(instrument, "_DARK", 1e-9)
    monkeypatch.setattr(instrument, "MAX_LIT_PIXELS", 400)  # the disk's ~210 of 1,024 pixels: decomposed
    assert len(coherent_modes(aperture, 1.0)) > 1
    monkeypatch.setattr(instrument, "MAX_LIT_PIXELS", 100)
    with pytest.raises(ValueRangeError, match="lights"):
        coherent_modes(aperture, 1.0)


def test_a_partially_coherent_neighbourhood_is_each_position_simulate_scan_would_record(probe, monkeypatch):
    import deepphase.data.stream as stream_module
    from deepphase.data.phase_objects import CorpusConfig
    from deepphase.data.stream import TrainingStream, neighbourhood_offsets
    from deepphase.physics.geometry import Geometry

    stream = TrainingStream(probe, Geometry(), CorpusConfig(), 27882.0, neighbourhood=3, source_size_px=1.0)
    side = 32 + 2 * stream.margin
    objects = torch.rand(2, side, side, generator=torch.Generator().manual_seed(2)) * 1.2
    monkeypatch.setattr(stream_module, "random_phase_objects", lambda size, n, gen, corpus, device: objects[:size])
    monkeypatch.setattr(stream_module, "poisson_counts", lambda intensity, dose, counts, gen: intensity * (dose / counts))
    batch = stream.batch(2, torch.Generator().manual_seed(0))
    assert batch.amplitude.shape == (2, 9, 32, 32)
    positions = neighbourhood_offsets(3) * stream.step_px + stream.margin
    for k in range(2):
        phase = np.pad(objects[k].double().numpy(), ((0, 1), (0, 1)))
        expected = simulate_scan(phase, probe, positions, noise=False, progress=False, source_size_px=1.0).amplitude
        assert np.allclose(batch.amplitude[k].numpy(), expected, rtol=1e-3, atol=1e-2)


def test_dividing_the_source_out_of_a_model_trained_with_one_is_pointed_out(tmp_path, capsys):
    import json

    from deepphase.cli import main
    from deepphase.models.modelfile import load_model, save_model

    model = load_model("default")
    model.info = {**model.info, "training": {**model.info["training"], "source_size_px": [0.0, 1.5]}}
    save_model(model, tmp_path / "trained-with-source")
    data = tmp_path / "scan.npz"
    assert main(["simulate", "--scan-shape", "16", "16", "--source-size", "1", "--out", str(data)]) == 0
    assert main(["reconstruct", str(data), "--model", str(tmp_path / "trained-with-source"), "--source-size", "1",
                 "--out", str(tmp_path / "out")]) == 0
    assert "over-sharpens" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["processing"]["source_deconvolved"]
