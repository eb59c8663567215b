"""Detector calibration: disk, descan, bad pixels, resampling, and a reconstruction through all of it."""

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from deepphase.data.calibration import (bad_pixel_mask, calibrate, find_disk, fit_descan, measure_calibration,
                                        model_disk, overlap_matrix, resample_patterns)
from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.data.specimens import twisted_hbn
from deepphase.errors import DeepPhaseError
from deepphase.evaluation.metrics import correlation
from deepphase.models.modelfile import load_model
from deepphase.physics import raster_positions, reference_probe
from deepphase.physics.geometry import Geometry
from deepphase.physics.probe import ProbeParameters, angular_sampling, probe_from_parameters
from deepphase.reconstruction.pipeline import reconstruct


def disk_image(shape, center, radius, level=100.0, background=2.0, supersample=8):
    """A uniform disk with exact (supersampled) pixel coverage at its edge."""
    h, w = shape
    y = (np.arange(h * supersample) + 0.5) / supersample - 0.5
    x = (np.arange(w * supersample) + 0.5) / supersample - 0.5
    inside = (y[:, None] - center[0]) ** 2 + (x[None] - center[1]) ** 2 < radius**2
    return background + level * inside.reshape(h, supersample, w, supersample).mean(axis=(1, 3))


@pytest.mark.parametrize("shape, center, radius", [((64, 64), (31.37, 33.81), 9.3), ((128, 128), (58.6, 71.25), 27.05),
                                                   ((96, 80), (40.02, 37.5), 17.4)])
def test_disk_centre_and_radius_to_a_tenth_of_a_pixel(shape, center, radius, rng):
    image = disk_image(shape, center, radius)
    noisy = rng.poisson(ndimage.gaussian_filter(image, 0.8) * 20) / 20  # detector blur and counting noise
    for pattern in (image, noisy):
        disk = find_disk(pattern)
        assert np.allclose(disk["center"], center, atol=0.1), disk
        assert disk["radius"] == pytest.approx(radius, abs=0.1)


@pytest.mark.parametrize("g, area_off", [(1.5, 0.06), (2.2, -0.03)])
def test_bragg_discs_beside_the_disk_leave_its_radius_and_are_said(g, area_off, rng):
    """Six 30 % Bragg discs of the disk's size at g radii from it (a crystal's mean pattern; s40's t9_bragg.py): over
    the edge (g = 1.5) they added to the area's weight, in the ring around it (2.2) they raised its background, and the
    area's radius came out +6.5 % and −3.8 % (r = 20 px). The median over angles of each sector's own step is the
    bright-field disk's edge: within 1 %, and said."""
    from deepphase.data.calibration import disk_edge_note

    center, radius = (63.4, 64.2), 20.0
    image = disk_image((128, 128), center, radius, level=100.0, background=0.0)
    for k in range(6):
        angle = 0.1 + k * np.pi / 3
        image += 0.3 * disk_image((128, 128), (center[0] + g * radius * np.sin(angle),
                                               center[1] + g * radius * np.cos(angle)), radius, level=100.0,
                                  background=0.0)
    pattern = rng.poisson(ndimage.gaussian_filter(image, 1.0) * 1.5) / 1.5
    disk = find_disk(pattern)
    assert disk["radius_from"] == "edge" and disk["radius"] == pytest.approx(radius, rel=0.01), disk
    assert disk["radius_area"] / radius - 1 == pytest.approx(area_off, abs=0.015)  # what the area alone gave
    info = {"radius_px": disk["radius"], "radius_from": "edge", "radius_from_area_px": disk["radius_area"]}
    assert "Bragg discs" in disk_edge_note(info)
    # A clean disk keeps the area's radius (and no note)
    clean = find_disk(rng.poisson(ndimage.gaussian_filter(disk_image((128, 128), center, radius), 1.0) * 1.5) / 1.5)
    assert clean["radius_from"] == "area"
    # An edge taken 1 % from the area (counting noise, more likely than discs) is not said
    assert disk_edge_note({"radius_px": 20.0, "radius_from": "edge", "radius_from_area_px": 20.2}) is None


def test_the_disk_of_a_mean_pattern_of_a_few_counts_per_pixel_is_found(rng):
    """A 256×256 detector, a disk of radius 60 px, 3 counts per disk pixel in the sampled mean (a 24×24 scan at
    ~60 e/pattern) and 0.3 around it: the first guess was a fragment of the disk (a 3×3 median's maximum is noise
    there), and the disk refused as "not a disk" or its radius 17 % short (the calibration audit, s39)."""
    center, radius = (125.78, 127.57), 60.0
    expected = ndimage.gaussian_filter(disk_image((256, 256), center, radius, 1.0, 0.0), 0.8)
    for _ in range(6):
        mean = rng.poisson(expected * 3.0 + 0.3) / 576  # (the summed counts of 576 patterns, as their mean)
        disk = find_disk(mean)
        assert np.allclose(disk["center"], center, atol=0.6), disk
        assert disk["radius"] == pytest.approx(radius, abs=1.0)  # (measured: 60.1–60.5)


def test_a_disk_not_found_for_want_of_counts_says_so(rng):
    """At a count per pixel the refusal said only "no bright-field disk found", when what was missing were counts."""
    frames = rng.poisson(0.0004, size=(300, 128, 128)).astype(float)
    with pytest.raises(DeepPhaseError, match=r"no bright-field disk found .* 300 patterns read hold only 1\.0 counts "
                                             "per pixel .* too few to find a disk by"):
        measure_calibration(frames, load_model())


def test_model_disk_of_the_reference_probe():
    disk = model_disk(reference_probe())
    assert 7.3 < disk["radius"] < 8.3  # the half-level contour of the reference probe's aperture
    assert np.allclose(disk["center"], (16, 16), atol=0.5)


@pytest.mark.parametrize("given", [{"mrad_per_px": 1.0}, {}])
def test_a_model_with_known_optics_is_matched_at_its_exact_angular_sampling(given):
    """15 mrad at 300 kV on a 32-pixel, 0.3 Å grid: the model's disk measures 7.51 px where the aperture is
    7.31 px (pixel lattice). Its energy and sampling, not the measured disk, fix the model grid's scale."""
    params = ProbeParameters(energy=300, semiangle_cutoff=15.0, n_px=32, sampling=0.3)
    model = SimpleNamespace(probe=probe_from_parameters(params), geometry=Geometry(),
                            info={"probe": {"source": "parameters", **vars(params)}})
    exact = angular_sampling(32, 0.3, 300)
    frames = np.random.default_rng(0).poisson(disk_image((96, 96), (47.3, 48.2), 15.0, 50.0, 0.5),
                                              size=(40, 96, 96)).astype(np.float64)  # 1 mrad per pixel
    info, _ = measure_calibration(frames, model, energy=300.0, **given)
    assert info["zoom"] == pytest.approx(1.0 / exact, rel=0.003)
    assert info["model_mrad_per_px"] == pytest.approx(exact, rel=0.003)
    assert info["real_space_sampling_angstrom"] == pytest.approx(0.3, rel=0.003)


@pytest.mark.parametrize("pattern, expected", [(np.zeros((64, 64)), "flat"), (np.ones((64, 64)), "flat"),
                                               (disk_image((64, 64), (10, 32), 14), "detector edge")])
def test_no_disk_is_a_clear_error(pattern, expected):
    with pytest.raises(DeepPhaseError, match=expected):
        find_disk(pattern)


def test_bad_pixels_are_found_but_not_the_disk_edge(rng):
    image = rng.poisson(disk_image((128, 128), (60.3, 70.8), 26.4) * 30) / 30
    image[12, 100] = 5e3  # hot, in the dark field
    image[70, 66] = 0  # dead, inside the disk
    image[61, 71] = 900  # hot, inside the disk
    mask = bad_pixel_mask(image)
    assert sorted(map(tuple, np.argwhere(mask))) == [(12, 100), (61, 71), (70, 66)]


def test_a_small_hard_edged_disks_pixels_are_not_hot_but_a_hot_pair_or_block_is(probe):
    """An 80 keV, 20 mrad probe at 0.2 Å has a disk of radius 3 px whose edge pixels stand out of their 3×3
    median (the dark field's): 8 were masked and noted as hot (the training audit, s40)."""
    from deepphase.physics.probe import ProbeParameters, probe_from_parameters

    small = probe_from_parameters(ProbeParameters(80.0, 20.0, n_px=32, sampling=0.2))
    positions = raster_positions((8, 8), 0.87)
    counts = np.square(simulate_scan(np.zeros((40, 40)), small, positions, dose=1e4, seed=0,
                                     progress=False).amplitude.astype(np.float64))
    mean = counts.mean(0)
    assert not bad_pixel_mask(mean, len(counts)).any()
    spoiled = mean.copy()
    spoiled[4, 20:22] = 5 * mean.max()  # two hot pixels side by side
    spoiled[25:27, 6:8] = 5 * mean.max()  # a 2×2 block (a hot pixel binned up, as EMPAD's quarters are)
    assert sorted(map(tuple, np.argwhere(bad_pixel_mask(spoiled, len(counts))))) == [
        (4, 20), (4, 21), (25, 6), (25, 7), (26, 6), (26, 7)]


@pytest.mark.parametrize("width", [1, 2, 3])
@pytest.mark.parametrize("axis", [0, 1])
def test_a_dead_line_across_the_disk_is_masked_but_not_the_disk_edge(width, axis, rng):
    """A dead line 2–3 pixels wide is its own 3×3 median: it went unmasked into every pattern and split the disk
    (centre 1.5 px off, radius 4 % short, the calibration audit, s39)."""
    for radius in (26.4, 3.0):  # (a small disk: its edge must stay unmasked too)
        image = rng.poisson(disk_image((128, 128), (60.3, 70.8), radius) * 30) / 30
        dead = np.zeros(image.shape, bool)
        if axis == 0:
            dead[59 : 59 + width, :] = True
        else:
            dead[:, 70 : 70 + width] = True
        image[dead] = 0
        mask = bad_pixel_mask(image)
        lit = dead & (disk_image((128, 128), (60.3, 70.8), radius, 1.0, 0.0) > 0.9)  # (dead where light falls)
        # (a lit pixel beside the line may look hot against a 3×3 median the line drags down: masked, and filled)
        beside = ndimage.binary_dilation(dead, np.ones((3, 3), bool))
        assert not (mask & ~beside).any(), (radius, np.argwhere(mask & ~beside)[:5])
        if radius > 10:  # (across a disk of 6 px, a line's pixels see too few lit ones across them to be told dead)
            assert mask[lit].all(), np.argwhere(lit & ~mask)[:5]


@pytest.mark.parametrize("zoom", [0.3, 0.77, 1.0, 1.6])
def test_resampling_conserves_the_counts_and_centres_the_disk(zoom):
    center = (60.37, 66.81)
    image = disk_image((128, 128), center, 20.0, background=0.0)
    out = resample_patterns(image[None], np.array([center]), 96, (47.6, 48.2), zoom)[0]
    assert out.sum() == pytest.approx(image.sum(), rel=1e-5)  # the disk stays inside the field of view
    disk = find_disk(out)
    assert np.allclose(disk["center"], (47.6, 48.2), atol=0.1)
    assert disk["radius"] == pytest.approx(20.0 * zoom, abs=0.1)


def test_resampling_is_the_pixel_overlap_matrix_product(rng):
    x = rng.poisson(5, size=(5, 90, 70)).astype(np.float32)
    centres = np.column_stack([rng.uniform(30, 60, 5), rng.uniform(20, 50, 5)])
    for zoom in (0.3, 1.0, 1.6):
        wr = overlap_matrix(32, 90, centres[:, 0], 15.6, zoom)
        wc = overlap_matrix(32, 70, centres[:, 1], 16.1, zoom)
        # Every input pixel inside the output's field of view is shared out completely.
        j = np.arange(90)
        lo, hi = centres[:, :1] - 16.1 / zoom, centres[:, :1] + 15.9 / zoom
        inside = (j[None] - 0.5 >= lo) & (j[None] + 0.5 <= hi)
        assert np.allclose(wr.sum(axis=1)[inside], 1, atol=1e-5) and (wr.sum(axis=1) <= 1 + 1e-5).all()
        expected = wr @ x @ wc.transpose(0, 2, 1)
        assert np.allclose(resample_patterns(x, centres, 32, (15.6, 16.1), zoom), expected, atol=1e-4)


def test_known_linear_descan_is_recovered(rng):
    positions = raster_positions((6, 7), 1.3, fastest="row")
    coefficients = np.array([[50.2, 0.31, -0.12], [61.7, 0.05, 0.22]])  # row/col: [a0, a_row, a_col]
    centres = coefficients[:, 0][None] + positions @ coefficients[:, 1:].T
    frames = np.stack([rng.poisson(disk_image((112, 120), c, 21.5) * 5) for c in centres]).astype(np.float32)
    frames[:, 30, 30] = 1000  # a hot pixel must not pull the centres
    model = load_model()
    view, info = calibrate(frames, model, positions)
    found = np.asarray(info["descan"]["coefficients"])
    assert np.allclose(found[:, 1:], coefficients[:, 1:], atol=0.01), found
    assert np.allclose(found[:, 0], coefficients[:, 0], atol=0.1), found
    assert info["masked_pixels"]["count"] == 1
    # After calibration every pattern has its disk where the model's is.
    target = info["model_disk"]["center_px"]
    for pattern in view.counts(slice(0, len(frames)))[::10]:
        assert np.allclose(find_disk(pattern)["center"], target, atol=0.15)


def test_a_disk_moved_far_by_the_descan_keeps_its_radius(rng):
    """A descan moving the disk 30 px over the scan smeared the plain mean pattern: its radius came out 17.1 px for
    20 and the zoom 15 % off (the calibration audit, s39). It is measured on the realigned mean."""
    positions = raster_positions((16, 16), 1.0, fastest="col")
    coefficients = np.array([[60.3, 2.0, 0.6], [66.7, 0.0, -2.0]])  # 30 px along the rows, 30 px across
    centres = coefficients[:, 0][None] - 15 + positions @ coefficients[:, 1:].T
    frames = np.stack([rng.poisson(disk_image((160, 160), c + 20, 20.0, 40.0, 1.0)) for c in centres]).astype(np.float32)
    info, _ = measure_calibration(frames, load_model(), positions)
    assert info["radius_px"] == pytest.approx(20.0, abs=0.1), info["radius_px"]
    assert info["zoom"] == pytest.approx(info["model_disk"]["radius_px"] / 20.0, rel=0.005)
    found = np.asarray(info["descan"]["coefficients"])
    assert np.allclose(found[:, 1:], coefficients[:, 1:], atol=0.01), found


def test_a_flipped_calibration_is_the_calibration_of_the_mirrored_detector(rng):
    """view.flipped() mirrors in k_row as it resamples: the same patterns as calibrating the detector with its
    rows reversed (descan, bad pixels and all), with the measured calibration left as it was."""
    positions = raster_positions((5, 6), 1.0, fastest="col")
    centres = np.array([40.3, 47.6])[None] + positions @ np.array([[0.3, -0.1], [0.05, 0.2]]).T
    frames = []
    for c in centres:  # a disk with a bright spot above its centre: not symmetric in rows
        image = disk_image((96, 90), c, 18.5) + disk_image((96, 90), (c[0] - 9, c[1] + 4), 3.0, background=0.0)
        frames.append(rng.poisson(image * 4))
    frames = np.stack(frames).astype(np.float32)
    frames[:, 70, 12] = 3000
    model = load_model()
    view, info = calibrate(frames, model, positions)
    mirrored, _ = calibrate(np.ascontiguousarray(frames[:, ::-1]), model, positions)
    flipped = view.flipped()
    expected = mirrored[0:30]
    assert np.allclose(flipped[0:30], expected, atol=1e-4 * expected.max())
    assert not np.allclose(view[0:30], expected, atol=0.05 * expected.max())
    assert flipped.info["flip_patterns"] and "flip_patterns" not in view.info
    assert np.array_equal(flipped.flipped()[0:30], view[0:30])
    before = [list(c) for c in view.info["descan"]["coefficients"]]
    flipped.use_coords(positions * 2.0)  # the flipped view's coordinates are its own
    assert view.info["descan"]["coefficients"] == before


def test_fit_descan_ignores_missing_and_outlying_centres():
    coords = np.stack(np.meshgrid(np.arange(5.0), np.arange(4.0), indexing="ij"), -1).reshape(-1, 2)
    centres = np.column_stack([10 + 0.5 * coords[:, 0], 20 - 0.25 * coords[:, 1]])
    centres[3] = np.nan
    centres[7] += 15  # a dropped frame's nonsense centre
    fit = fit_descan(centres, coords)
    assert np.allclose(fit["coefficients"], [[10, 0.5, 0], [20, 0, -0.25]], atol=1e-9)
    assert fit["n_used"] == len(coords) - 2


def test_calibration_refuses_or_repairs_bad_data(rng):
    model = load_model()
    frames = np.stack([rng.poisson(disk_image((64, 64), (30.2, 33.1), 14.0) * 3) for _ in range(30)]).astype(np.float32)
    bad = frames.copy()
    bad[4, 10, 11] = np.nan  # isolated: replaced by the local median
    bad[6] = 0  # a dropped frame: replaced by the mean pattern
    bad[8, 40, 40] = -3  # dark-subtraction noise: clipped
    view, info = calibrate(bad, model)
    out = view[0:30]
    assert np.isfinite(out).all() and out.shape == (30, 32, 32)
    assert view.counters["zero_patterns_replaced"] == 1 and view.counters["nonfinite_values_replaced"] == 1
    assert view.counters["negative_values_clipped"] == 1
    worse = frames.copy()
    worse[5, :20] = np.inf
    view, _ = calibrate(worse, model)
    with pytest.raises(DeepPhaseError, match="frame 5 has .* NaN or Inf"):
        view[0:10]
    with pytest.raises(DeepPhaseError, match="zero everywhere"):
        calibrate(np.where(np.arange(30)[:, None, None] < 10, 0, frames), model)
    with pytest.raises(DeepPhaseError, match="negative counts"):
        calibrate(frames - 20, model)
    with pytest.raises(DeepPhaseError, match="gain"):
        calibrate(frames, model, gain=0)
    # From a notebook (the evaluation audit, s41): a list of patterns is an array (was "got shape ()"), complex
    # patterns are refused (their imaginary part was dropped with a NumPy warning), a misspelt option is named.
    assert calibrate(list(frames), model)[1]["radius_px"] == calibrate(frames, model)[1]["radius_px"]
    with pytest.raises(DeepPhaseError, match="expected real numeric diffraction patterns, got dtype complex64"):
        calibrate(frames.astype(np.complex64), model)
    with pytest.raises(DeepPhaseError, match="unknown option gian; expected some of png, kind, gain"):
        calibrate(frames, model, gian=2)


def test_headline_detector_scan_reconstructs_as_well_as_the_model_geometry(tmp_path):
    """A 24×24 scan at the model's geometry, and the same scan as a 128×128 detector would record it:
    3.3× finer angular sampling, disk off centre and drifting with the scan, two hot pixels, Poisson
    counts at the same dose. Calibrated, it reconstructs as well as the model-geometry data."""
    probe = reference_probe()
    positions = raster_positions((24, 24), 0.87, fastest="row")
    truth = twisted_hbn(required_object_shape(positions, 32))
    scan = simulate_scan(truth, probe, positions, noise=False, progress=False)
    intensity = scan.amplitude.astype(np.float64) ** 2
    assert intensity.sum(axis=(1, 2)).mean() == pytest.approx(27881.8, rel=1e-4)
    rng = np.random.default_rng(0)
    model_geometry = np.sqrt(rng.poisson(intensity)).astype(np.float32)

    zoom, size = 3.3, 128
    drift = np.array([58.4, 68.7])[None] + positions @ np.array([[0.12, 0.03], [-0.02, -0.10]]).T
    rows, cols = np.indices((size, size), dtype=np.float64)
    detector = np.empty((len(positions), size, size), dtype=np.uint16)
    for i, pattern in enumerate(intensity):
        fine = ndimage.map_coordinates(pattern, [16 + (rows - drift[i, 0]) / zoom, 16 + (cols - drift[i, 1]) / zoom],
                                       order=3, mode="constant", cval=0.0).clip(0)
        detector[i] = rng.poisson(fine * (pattern.sum() / fine.sum()))
    detector[:, 20, 100] = 4000
    detector[:, 64, 70] = 3000

    model = load_model()
    view, info = calibrate(detector, model, positions, png=tmp_path / "calibration.png")
    assert info["masked_pixels"]["count"] == 2
    assert info["zoom"] == pytest.approx(1 / zoom, rel=0.01)
    assert info["radius_px"] == pytest.approx(zoom * model_disk(probe)["radius"], rel=0.01)
    assert (tmp_path / "calibration.png").stat().st_size > 10_000

    def score(amplitudes):
        rec = reconstruct(amplitudes, positions, model, progress=False)
        r0, c0 = rec.origin_px
        return correlation(rec.phase, truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]])

    reference, calibrated = score(model_geometry), score(view)
    print(f"model geometry {reference:.4f}, 128×128 detector calibrated {calibrated:.4f}")
    assert reference > 0.95
    assert calibrated > reference - 0.02


def test_the_rotation_figure_marks_what_the_run_used_beside_what_it_found(tmp_path, monkeypatch):
    """A given 0° that the check disputes (the patterns look mirrored): the figure said "patterns flipped (chosen)"
    and gave the found angle's curl ratio, while the run used 0°, unflipped (the outputs audit, s40)."""
    from deepphase import io_utils
    from deepphase.data.calibration import find_scan_rotation, plot_scan_rotation

    rng = np.random.default_rng(2)
    rr, cc = np.mgrid[0:40, 0:40].astype(float)
    phase = sum(np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / 3.0) for r, c in rng.uniform(0, 40, size=(60, 2)))
    com = np.stack(np.gradient(phase), axis=-1) * [-1, 1]  # mirrored patterns
    drawn = []
    monkeypatch.setattr(io_utils, "save_png", lambda fig, path, **_: drawn.append(fig))
    for given in (0.0, None):  # a given angle checked; then "auto", which uses what it finds
        found = find_scan_rotation(com, given_deg=given)
        plot_scan_rotation(com, None, found, tmp_path / "rotation.png", given_deg=given)
        left = drawn[-1].axes[0]
        labels = [text.get_text() for text in left.get_legend().get_texts()]
        if given is not None:
            assert "as recorded (used)" in labels and "patterns flipped (found)" in labels, labels
            assert "at the 0° used" in left.get_title() and "(chosen)" not in " ".join(labels)
        else:
            assert "patterns flipped (found, used)" in labels and "as recorded" in labels, labels


def test_scan_rotation_of_an_analytic_gradient_field_is_found():
    """CoM = ∇φ (atoms raise the phase) on the scan grid, written in detector axes rotated by θ0."""
    from deepphase.data.calibration import find_scan_rotation

    rng = np.random.default_rng(2)
    rr, cc = np.mgrid[0:40, 0:40].astype(float)
    phase = sum(np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / 3.0) for r, c in rng.uniform(0, 40, size=(60, 2)))
    g_r, g_c = np.gradient(phase)
    for theta0 in (0.0, 37.0, -120.0, 175.0):
        t = np.deg2rad(theta0)  # the inverse of the scan-axes projection of raster_positions' convention
        com = np.stack([np.cos(t) * g_r - np.sin(t) * g_c, np.sin(t) * g_r + np.cos(t) * g_c], axis=-1)
        found = find_scan_rotation(com)
        assert found["rotation_deg"] == pytest.approx(theta0, abs=0.1) and found["curl_ratio"] < 0.01
        assert not found["flip_patterns"] and found["curl_ratio_other"] > 0.25
        # The detector's rows reversed (k_row → −k_row): no rotation removes the curl; flipped, the same angle.
        mirrored = find_scan_rotation(com * [-1, 1])
        assert mirrored["flip_patterns"] and mirrored["rotation_deg"] == pytest.approx(theta0, abs=0.1)
        assert mirrored["curl_ratio"] < 0.01 and mirrored["curl_ratio_other"] > 0.25
        assert find_scan_rotation(com * [-1, 1], handedness="as recorded")["curl_ratio"] > 0.25


def test_scan_rotation_of_rotated_detector_patterns_is_found(probe):
    """Patterns of a simulated scan rotated on the detector: the criterion recovers the angle (± 1°)."""
    from deepphase.data.calibration import rotation_is_clear, scan_rotation_from_patterns
    from deepphase.data.simulate import simulate_scan
    from deepphase.data.specimens import twisted_hbn

    positions = raster_positions((32, 32), 0.87, fastest="col")
    counts = simulate_scan(twisted_hbn((70, 70), seed=3), probe, positions, seed=0).amplitude.astype(float) ** 2
    for alpha in (0.0, 30.0, -50.0):
        rotated = ndimage.rotate(counts, alpha, axes=(1, 2), reshape=False, order=1) if alpha else counts
        found = scan_rotation_from_patterns(np.sqrt(rotated), (32, 32), "col")
        assert found["rotation_deg"] == pytest.approx(alpha, abs=1.0)
    # The frames taken in the wrong order: on a square raster the scan transposed, a mirror, which the flip and
    # a quarter turn undo; on any other the positions scrambled, which nothing undoes (the CLI refuses it).
    transposed = scan_rotation_from_patterns(np.sqrt(counts), (32, 32), "row")
    assert transposed["flip_patterns"] and transposed["rotation_deg"] == pytest.approx(90.0, abs=1.0)
    positions = raster_positions((24, 40), 0.87, fastest="col")
    counts = simulate_scan(twisted_hbn((60, 80), seed=3), probe, positions, seed=0).amplitude.astype(float) ** 2
    assert scan_rotation_from_patterns(np.sqrt(counts), (24, 40), "col")["curl_ratio"] < 0.1
    scrambled = scan_rotation_from_patterns(np.sqrt(counts), (24, 40), "row")
    assert scrambled["curl_ratio"] > 0.25 and scrambled["curl_ratio_other"] > 0.25
    assert not rotation_is_clear(scrambled)  # nor do its quarters agree


def test_a_given_rotation_far_from_the_datas_gets_a_note(probe, tmp_path, capsys):
    """A scan rotated 35° against the detector reconstructed with the default 0°: a note with the angle the
    DPC criterion finds; given that angle (or close to it, within 12°), none; 15° from it, a note; half a turn from it (the same
    curl, the divergence's skew reversed: the phase would come out inverted), a note again."""
    import json

    from deepphase.cli import main

    positions = raster_positions((32, 32), 0.87, 35.0, fastest="col")
    counts = np.square(simulate_scan(twisted_hbn(required_object_shape(positions, 32), seed=4), probe, positions,
                                     seed=0).amplitude, dtype=np.float64).round().astype(np.float32)
    np.save(tmp_path / "scan.npy", counts.reshape(32, 32, 32, 32))
    for rotation, noted in (("0", True), ("35", False), ("29", False), ("20", True), ("80", True), ("215", True)):
        capsys.readouterr()
        assert main(["reconstruct", str(tmp_path / "scan.npy"), "--step", "0.87", "--rotation", rotation,
                     "--out", str(tmp_path / rotation)]) == 0
        err = capsys.readouterr().err
        check = json.loads((tmp_path / rotation / "metadata.json").read_text())["rotation_check"]
        assert check["rotation_deg"] == pytest.approx(35.0, abs=2.0) and not check["flip_patterns"]
        assert ("finds the scan rotated 3" in err) == noted and (check["note"] is not None) == noted, (rotation, err)
        assert ("half a turn away" in err) == (rotation == "215")


def test_frames_in_another_order_than_the_raster_get_a_note_and_hold_back_the_others(probe, tmp_path, capsys):
    """A 24×32 scan whose frames run along the columns, read with the default row-fastest order: a shuffle of the
    scan (correlation 0.09 with the truth), no rotation fits it, so the rotation note said nothing, and the step
    check's advice (--step auto) made it worse. Read as recorded: no note."""
    import json

    from deepphase.cli import main

    positions = raster_positions((24, 32), 0.87, fastest="col")
    amplitude = simulate_scan(twisted_hbn(required_object_shape(positions, 32), seed=4), probe, positions,
                              seed=0).amplitude
    np.save(tmp_path / "scan.npy", amplitude)
    for fastest, noted in (("row", True), ("col", False)):
        capsys.readouterr()
        assert main(["reconstruct", str(tmp_path / "scan.npy"), "--scan-shape", "24", "32", "--step", "0.87",
                     "--fastest", fastest, "--out", str(tmp_path / fastest)]) == 0
        err = capsys.readouterr().err
        assert ("do not fit the raster as given" in err and "--fastest" in err) == noted, err
        metadata = json.loads((tmp_path / fastest / "metadata.json").read_text())
        assert (metadata["rotation_check"]["note"] is not None) == noted
        assert metadata["notes"] == ([metadata["rotation_check"]["note"]] if noted else [])  # (no step advice)


def test_a_hot_pixel_in_patterns_on_the_models_grid_is_named_and_calibrate_masks_it(probe, tmp_path, capsys):
    import json

    from deepphase.cli import main
    from deepphase.evaluation.metrics import correlation

    positions = raster_positions((24, 24), 0.87)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=4)
    counts = np.square(simulate_scan(truth, probe, positions, seed=0).amplitude).round().astype(np.float32)
    np.save(tmp_path / "clean.npy", counts)
    counts[:, 12, 20] = 60000.0
    np.save(tmp_path / "hot.npy", counts)
    scores = {}
    for name, extra in (("clean", []), ("hot", []), ("hot-calibrated", ["--calibrate"])):
        capsys.readouterr()
        assert main(["reconstruct", str(tmp_path / f"{name.split('-')[0]}.npy"), "--scan-shape", "24", "24",
                     "--step", "0.87", *extra, "--out", str(tmp_path / name)]) == 0
        assert ("1 detector pixel of the patterns looks hot or dead (at (12, 20)" in capsys.readouterr().err) == (
            name == "hot")
        metadata = json.loads((tmp_path / name / "metadata.json").read_text())
        phase = np.load(tmp_path / name / "phase.npy")
        r0, c0 = metadata["origin_px"]
        scores[name] = correlation(phase, truth[r0 : r0 + phase.shape[0], c0 : c0 + phase.shape[1]])
    assert scores["hot"] < 0.5 < 0.9 < min(scores["clean"], scores["hot-calibrated"]), scores


def test_a_scan_stored_detector_axes_first_is_named(probe, tmp_path, capsys):
    """(ky, kx, rows, cols) read as (rows, cols, ky, kx) gives noise: its "patterns" are scan images, whose totals
    vary far more than their mean. Noted then, not for the scan stored right, nor for one with a third of its
    frames dark (a blanked beam's flyback)."""
    from deepphase.cli import main
    from deepphase.reconstruction.checks import detector_axes_first_note

    positions = raster_positions((32, 32), 0.87, fastest="col")  # (a C-ordered 4-D array's frame order)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=4)
    counts = np.square(simulate_scan(truth, probe, positions, seed=0).amplitude).round().astype(np.float32)
    scan = counts.reshape(32, 32, 32, 32)
    np.save(tmp_path / "right.npy", scan)
    np.save(tmp_path / "detector-first.npy", np.ascontiguousarray(np.transpose(scan, (2, 3, 0, 1))))
    for name in ("right", "detector-first"):
        capsys.readouterr()
        assert main(["reconstruct", str(tmp_path / f"{name}.npy"), "--step", "0.87", "--out", str(tmp_path / name)]) == 0
        err = capsys.readouterr().err
        assert ("is the array stored detector axes first, (ky, kx, rows, cols)?" in err) == (name == "detector-first")
        assert name == "detector-first" or "note:" not in err, err
    # Arrays from Python: the note ends with the transpose of the patterns to pass.
    from deepphase.models.modelfile import load_model
    from deepphase.reconstruction.checks import check_scan

    swapped = np.sqrt(np.transpose(scan, (2, 3, 0, 1)).reshape(-1, 32, 32))
    notes = check_scan(swapped, positions, load_model())["notes"]
    assert any("Pass the patterns as np.transpose(a, (2, 3, 0, 1)).reshape(-1, ky, kx)" in n for n in notes), notes
    assert not any("scan images" in n for n in check_scan(np.sqrt(counts), positions, load_model())["notes"])
    dark = counts.copy()
    dark[::3] = 0.0
    assert detector_axes_first_note(dark[:256]) is None
    assert detector_axes_first_note(np.transpose(scan, (2, 3, 0, 1)).reshape(-1, 32, 32)[:256]) is not None


def test_checks_on_patterns_read_as_the_other_kind_are_held_back(probe, tmp_path, capsys):
    """Counts at 1,000 e/pattern forced through --input amplitude curl as frames in another order do (curl ratio
    0.35 at the right rotation): the rotation check's note is wrong, kept in the metadata and not said; the note on
    the kind is the one said. Read as counts, the same scan has no note."""
    import json

    from deepphase.cli import main

    positions = raster_positions((32, 32), 0.87, fastest="col")  # (a C-ordered 4-D array's frame order)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=4)
    amplitude = simulate_scan(truth, probe, positions, seed=0, dose=1000).amplitude
    np.save(tmp_path / "counts.npy", np.square(amplitude).round().astype(np.float32).reshape(32, 32, 32, 32))
    for name, extra in (("as-amplitudes", ["--input", "amplitude"]), ("as-counts", [])):
        capsys.readouterr()
        assert main(["reconstruct", str(tmp_path / "counts.npy"), "--step", "0.87", *extra,
                     "--out", str(tmp_path / name)]) == 0
        err = capsys.readouterr().err
        metadata = json.loads((tmp_path / name / "metadata.json").read_text())
        if name == "as-counts":
            assert metadata["notes"] == [] and "note:" not in err, err
            continue
        assert metadata["notes"] == [err.split("note: ")[1].strip()], err
        assert "yet --input amplitude reads them as amplitudes" in metadata["notes"][0]
        held = metadata["rotation_check"]["held_back"]
        assert metadata["rotation_check"]["note"] is None and "do not fit the raster" in held["note"], held
        assert not (tmp_path / name / "rotation.png").exists()


def test_scan_rotation_at_low_dose_is_found_once_the_counting_noise_is_taken_off(probe):
    """At 300 e/pattern counting noise adds curl at every angle: as a ratio to the median the least curl is
    ~0.6, above the 0.25 of a clear minimum. Its Poisson floor (centre_of_mass_noise) taken off, the minimum is
    clear again and each quarter of the scan finds the same angle: the rotation (and a mirror) is found and
    accepted; frames out of order are still refused."""
    from deepphase.data.calibration import (centre_of_mass, centre_of_mass_noise, check_scan_rotation,
                                            find_scan_rotation, rotation_is_clear, scan_rotation_from_patterns)
    from deepphase.data.simulate import simulate_scan
    from deepphase.data.specimens import twisted_hbn
    from deepphase.physics import flip_patterns

    positions = raster_positions((48, 48), 0.87, -40.0, fastest="col")
    amplitudes = simulate_scan(twisted_hbn(required_object_shape(positions, 32), seed=0), probe, positions,
                               dose=300, seed=0).amplitude
    counts = np.square(amplitudes, dtype=np.float64)
    # The floor is the noise's: the CoM of repeated patterns of one position scatters by it.
    repeats = np.random.default_rng(1).poisson(np.repeat(counts[:1], 4000, axis=0))
    spread = centre_of_mass(repeats).var(axis=0).mean()
    assert centre_of_mass_noise(counts[:1])[0] == pytest.approx(spread, rel=0.1)
    raw = find_scan_rotation(centre_of_mass(counts).reshape(48, 48, 2))
    assert raw["curl_ratio"] > 0.4 and not rotation_is_clear(raw)  # without the floor: refused
    for patterns, mirrored in ((amplitudes, False), (flip_patterns(amplitudes), True)):
        found = scan_rotation_from_patterns(patterns, (48, 48), "col")
        assert found["noise_floor"] > 0.4 and found["curl_ratio"] < 0.25 and rotation_is_clear(found)
        check_scan_rotation(found)
        assert found["rotation_deg"] == pytest.approx(-40.0, abs=5.0) and found["flip_patterns"] == mirrored
    shuffled = amplitudes[np.random.default_rng(0).permutation(len(amplitudes))]
    with pytest.raises(DeepPhaseError, match="no clear minimum.*quarters find"):
        check_scan_rotation(scan_rotation_from_patterns(shuffled, (48, 48), "col"))


def test_cli_rotation_auto_records_the_angle_and_refuses_positions_off_a_raster(probe, tmp_path, capsys):
    import json

    from deepphase.cli import main

    positions = raster_positions((24, 24), 0.87, fastest="col")
    counts = simulate_scan(twisted_hbn((60, 60), seed=1), probe, positions, seed=0).amplitude.astype(np.float32) ** 2
    np.save(tmp_path / "scan.npy", counts.reshape(24, 24, 32, 32))
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--step", "0.87", "--rotation", "auto",
                 "--out", str(tmp_path / "rec")]) == 0
    meta = json.loads((tmp_path / "rec" / "metadata.json").read_text())
    assert meta["rotation_found"]["rotation_deg"] == pytest.approx(0.0, abs=2.5)
    assert meta["rotation_deg"] == meta["rotation_found"]["rotation_deg"]
    # positions read from a file that form a raster (here at 40°, which the data contradict): made again at the
    # angle found; positions off a regular grid are refused
    np.save(tmp_path / "pos.npy", raster_positions((24, 24), 0.87, 40.0, "col"))
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--positions", str(tmp_path / "pos.npy"), "--rotation",
                 "auto", "--out", str(tmp_path / "rec2")]) == 0
    again = json.loads((tmp_path / "rec2" / "metadata.json").read_text())
    assert again["rotation_deg"] == meta["rotation_deg"]
    assert again["raster_from_positions"]["rotation_deg"] == pytest.approx(40.0)
    np.save(tmp_path / "pos.npy", positions + np.random.default_rng(0).normal(0, 0.05, positions.shape) + 1)
    capsys.readouterr()
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--positions", str(tmp_path / "pos.npy"), "--rotation",
                 "auto", "--out", str(tmp_path / "rec3")]) == 2
    assert "'auto' needs a raster" in capsys.readouterr().err


@pytest.mark.parametrize("grid", ["detector", "model"])
def test_cli_a_mirrored_detector_is_found_by_rotation_auto_and_undone_by_flip_patterns(grid, probe, tmp_path, capsys):
    """Patterns recorded with the detector's rows reversed: reconstructed as given, every patch is mirrored
    about its own position (a poor image); --rotation auto finds the mirror and flips them, as --flip-patterns
    does when told. Detector frames (calibrated: the rows simply reversed) and model-grid patterns (k_row → −k_row
    about the zero frequency, not calibrated)."""
    import json

    from deepphase.cli import main
    from deepphase.physics import flip_patterns

    positions = raster_positions((24, 24), 0.87, fastest="col")
    truth = twisted_hbn(required_object_shape(positions, 32), seed=1)
    counts = np.square(simulate_scan(truth, probe, positions, seed=0).amplitude, dtype=np.float64).round()
    counts = counts.astype(np.float32)  # whole numbers: read as counts
    mirrored = counts[:, ::-1, :] if grid == "detector" else flip_patterns(counts)
    np.save(tmp_path / "scan.npy", mirrored.reshape(24, 24, 32, 32))
    calibration = ["--calibrate"] if grid == "detector" else []

    def score(name, *extra):
        capsys.readouterr()
        assert main(["reconstruct", str(tmp_path / "scan.npy"), "--step", "0.87", *extra, *calibration,
                     "--out", str(tmp_path / name)]) == 0
        meta = json.loads((tmp_path / name / "metadata.json").read_text())
        phase = np.load(tmp_path / name / "phase.npy")
        r0, c0 = meta["origin_px"]
        return correlation(phase, truth[r0 : r0 + phase.shape[0], c0 : c0 + phase.shape[1]]), meta, capsys.readouterr()

    as_given, meta, said = score("as-given")
    assert as_given < 0.6 and meta["patterns_flipped"] is False
    # The given rotation (0°, the default) is checked: the note says what the criterion finds.
    assert "finds the scan rotated" in said.err and "with the patterns mirrored" in said.err
    assert meta["rotation_check"]["flip_patterns"] and meta["rotation_check"]["note"]
    assert (tmp_path / "as-given" / "rotation.png").stat().st_size > 10_000  # what the criterion saw
    found, meta, said = score("auto", "--rotation", "auto")
    assert found > 0.9 and meta["patterns_flipped"] is True, (as_given, found)
    assert meta["rotation_found"]["flip_patterns"] and abs(meta["rotation_deg"]) < 2.5
    assert (tmp_path / "auto" / "rotation.png").stat().st_size > 10_000
    assert grid == "model" or meta["calibration"]["flip_patterns"] is True
    assert "patterns are mirrored against the scan" in said.err
    told, meta, said = score("told", "--flip-patterns")
    assert told > 0.9 and meta["patterns_flipped"] is True
    assert "finds the scan rotated" not in said.err and meta["rotation_check"]["note"] is None
    assert not (tmp_path / "told" / "rotation.png").exists()  # nothing to show
    if grid == "model":  # flipped twice about the zero frequency: the patterns as simulated, the same image
        np.save(tmp_path / "scan.npy", counts.reshape(24, 24, 32, 32))
        score("unmirrored")
        assert np.array_equal(np.load(tmp_path / "told" / "phase.npy"), np.load(tmp_path / "unmirrored" / "phase.npy"))
        np.save(tmp_path / "scan.npy", mirrored.reshape(24, 24, 32, 32))
    # Told, --rotation auto finds only the angle (of the flipped patterns: no mirror left).
    told_auto, meta, said = score("told-auto", "--flip-patterns", "--rotation", "auto")
    assert told_auto == pytest.approx(found, abs=0.01) and "curl_ratio_other" not in meta["rotation_found"]
    assert "patterns are mirrored" not in said.err
    print(f"{grid}: as given {as_given:.3f}, auto {found:.3f}, told {told:.3f}, told + auto {told_auto:.3f}")


def test_a_refused_rotation_says_which_test_failed():
    """The ratio, the quarters, or both; and, where counting noise makes most of the curl, that a weak or
    low-dose specimen is the likely cause rather than the frame order."""
    from deepphase.data.calibration import check_scan_rotation

    base = {"rotation_deg": 4.0, "flip_patterns": False, "curl_ratio_other": 0.9, "divergence_skew": -0.2}
    check_scan_rotation({**base, "curl_ratio": 0.1, "noise_floor": 0.2, "quarters": [3.0, 8.0, -5.0, 10.0]})
    with pytest.raises(DeepPhaseError) as noisy:
        check_scan_rotation({**base, "curl_ratio": 0.0, "noise_floor": 0.94, "quarters": [-3.0, -20.0, 33.0, -6.0]})
    message = str(noisy.value)
    assert "quarters find -3°, -20°, 33°, -6° against 4°" in message and "curl ratio" not in message
    assert "counting noise makes 94% of the curl" in message and "--fastest" not in message
    with pytest.raises(DeepPhaseError) as disordered:
        check_scan_rotation({**base, "curl_ratio": 0.7, "noise_floor": 0.05, "quarters": [60.0, -40.0, 10.0, 5.0]})
    message = str(disordered.value)
    assert "curl ratio 0.70, at most 0.25 expected" in message and "quarters find" in message
    assert "--fastest" in message and "counting noise" not in message
    with pytest.raises(DeepPhaseError, match=r"divergence's skew -0.04 leaves the sense \(±180°\) unsure"):
        check_scan_rotation({**base, "curl_ratio": 0.05, "noise_floor": 0.6, "divergence_skew": -0.04,
                             "quarters": [3.0, 8.0, -5.0, 10.0]})


def test_a_clear_axis_of_unsure_sense_still_notes_a_wrong_axis_naming_both_senses():
    """The photograph at 1,000 e/pattern: the curl's minimum is clear (the axis), the divergence's skew too weak to
    say which way along it (the sense). A rotation given 20° off the axis, or a mirror, was passed over in silence
    (a cost of 0.065); it is noted now, naming both senses. Half a turn stays unsaid where the sense is unsure."""
    from deepphase.data.calibration import rotation_note

    found = {"rotation_deg": -0.5, "curl_ratio": 0.0, "curl_ratio_given": 0.25, "divergence_skew": -0.02,
             "flip_patterns": False, "quarters": [-1.0, 0.5, 2.0, -3.0]}
    note = rotation_note(found, 20.0)
    assert "rotated -0.5° or 179.5° (which of the two, these data cannot tell)" in note and "not 20° as given" in note
    assert rotation_note(found, 5.0) is None  # within 12°
    assert rotation_note(found, 180.0) is None  # half a turn: which way round is not told
    assert rotation_note({**found, "divergence_skew": -0.3}, 180.0).count("half a turn away") == 1  # told: said
    assert "mirrored" in rotation_note({**found, "flip_patterns": True}, 0.0)
    assert rotation_note({**found, "quarters": [-0.5, 40.0]}, 20.0) is None  # quarters disagree: no clear axis
    assert rotation_note({**found, "curl_ratio": 0.4}, 20.0) is None  # no clear minimum


@pytest.mark.parametrize("units, value", [("1/Å", 0.05), ("Å⁻¹", 0.05), ("A^-1", 0.05), ("1 / angstrom", 0.05),
                                          ("nm⁻¹", 0.5), ("[n_m^-1]", 0.5), ("mrad/px", 0.984374), ("µrad", 984.374)])
def test_a_detector_calibration_is_read_in_the_units_files_spell_it(units, value):
    """'Å⁻¹', 'nm⁻¹' and 'mrad/px' were not recognised: the file's calibration was dropped without a word and the
    disk radii set the scale (the physics audit, s40). 0.05 Å⁻¹ at 300 keV is 0.98437 mrad (λ = 0.019687 Å)."""
    from deepphase.data.calibration import detector_mrad_per_px
    from deepphase.data.io import _is_angle, _is_length

    assert _is_angle({"units": units}) and not _is_length({"units": units})
    assert detector_mrad_per_px(value, units, 300.0) == pytest.approx(0.984374, rel=1e-5)
