import numpy as np
import pytest
import torch

from deepphase.errors import DeepPhaseError, ShapeError
from deepphase.physics import (Geometry, ProbeParameters, angular_sampling, diffraction_intensity, electron_wavelength,
                               far_field, flip_patterns, illuminated_mask, incident_counts, output_mask, poisson_counts,
                               probe_from_parameters, raster_positions, real_space_sampling, shift_probe)
from deepphase.physics.forward import as_complex_tensor

from .conftest import SHARED_PROBE


def test_packaged_reference_probe_is_the_seed_probe(probe):
    if not SHARED_PROBE.exists():
        pytest.skip("../shared is not beside this checkout")
    np.testing.assert_array_equal(probe, np.load(SHARED_PROBE))


def test_parseval_with_our_fft_convention(rng):
    n = 32
    psi = torch.as_tensor(rng.normal(size=(3, n, n)) + 1j * rng.normal(size=(3, n, n)))
    psi_k = far_field(psi)
    np.testing.assert_allclose(psi_k.abs().square().sum((-2, -1)), n * n * psi.abs().square().sum((-2, -1)), rtol=1e-10)


@pytest.mark.parametrize("n", [32, 33])
def test_zero_frequency_is_at_the_centre(n):
    """At pixel n // 2 (DESIGN.md), on odd grids too, which fftshift and ifftshift put in different places."""
    wave = torch.ones(n, n, dtype=torch.complex128)
    pattern = far_field(wave).abs()
    assert np.unravel_index(int(pattern.argmax()), pattern.shape) == (n // 2, n // 2)
    assert pattern.sum() == pytest.approx(pattern[n // 2, n // 2])


def test_constant_phase_leaves_the_pattern_unchanged(probe, rng):
    p = as_complex_tensor(probe)
    phase = torch.as_tensor(rng.normal(size=(32, 32)), dtype=torch.float32)
    a = diffraction_intensity(p, phase)
    b = diffraction_intensity(p, phase + 1.234)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_an_integer_phase_is_radians_and_a_complex_one_is_refused(probe):
    """A whole-radian phase image (int64) gave torch.polar's "Expected both inputs to be Half, Float or Double"
    (s40's physics audit): a phase of 3 rad everywhere is the flat phase's pattern."""
    p = as_complex_tensor(probe)
    whole = diffraction_intensity(p, torch.full((32, 32), 3, dtype=torch.int64))
    torch.testing.assert_close(whole, diffraction_intensity(p, torch.zeros(32, 32)))
    with pytest.raises(DeepPhaseError, match="expected real radians"):
        diffraction_intensity(p, torch.zeros(32, 32, dtype=torch.complex64))


@pytest.mark.parametrize("shift", [(3, -2), (-5, 7), (0, 4)])
def test_phase_ramp_shifts_the_pattern(probe, shift):
    n = 32
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ramp = torch.as_tensor(2 * np.pi * (shift[0] * r + shift[1] * c) / n)
    p = torch.as_tensor(probe)
    flat = diffraction_intensity(p, torch.zeros(n, n, dtype=torch.float64)).numpy()
    tilted = diffraction_intensity(p, ramp).numpy()
    # The shift theorem: multiplying by exp(2πi k0·r/n) moves the far field by +k0 pixels.
    np.testing.assert_allclose(tilted, np.roll(flat, shift, axis=(0, 1)), rtol=1e-8, atol=1e-8 * flat.max())


@pytest.mark.parametrize("n", [32, 31])
def test_flipped_patterns_are_the_far_field_of_the_mirrored_exit_wave(n, probe, rng):
    """|F(ψ)|(−k_row, k_col) = |F(ψ mirrored in rows)|(k): the mirror about the zero frequency at n//2 is the
    far field of the exit wave mirrored in rows (row i → (n − i) mod n; a shift does not change |F|). On an odd
    grid too, where the old flip moved the centre row by one."""
    illumination = probe if n == 32 else rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))
    phase = rng.normal(size=(3, n, n))
    exit_wave = illumination * np.exp(1j * phase)
    mirrored = np.roll(exit_wave[:, ::-1, :], 1, axis=1)
    amplitude = far_field(torch.as_tensor(exit_wave)).abs().numpy()
    expected = far_field(torch.as_tensor(mirrored)).abs().numpy()
    np.testing.assert_allclose(flip_patterns(amplitude), expected, rtol=1e-9, atol=1e-9 * expected.max())
    assert not np.allclose(amplitude, expected, atol=1e-3 * expected.max())  # the probe and phase are not symmetric
    np.testing.assert_array_equal(flip_patterns(flip_patterns(amplitude)), amplitude)
    c = n // 2
    centre = np.zeros((n, n))
    centre[c, c], centre[c + 3, c - 2] = 1.0, 2.0
    flipped = flip_patterns(centre)
    assert flipped[c, c] == 1.0 and flipped[c - 3, c - 2] == 2.0


def test_physics_helpers_refuse_what_has_no_meaning_with_a_named_error():
    """Zero or missing values gave ZeroDivisionError, numpy's reduction errors or a silent (0, 0) array."""
    from deepphase.physics import bin_image, dose_per_area, real_space_sampling, shift_probe, upsample_nearest
    from deepphase.physics.scan import validate_positions

    for call, match in ((lambda: validate_positions(np.zeros((0, 2)), 0), "no scan positions"),
                        (lambda: dose_per_area(1000.0, 0.0), "step"), (lambda: dose_per_area(0.0, 1.0), "dose"),
                        (lambda: angular_sampling(0, 0.2, 300.0), "n_px"),
                        (lambda: real_space_sampling(32, 0.0, 300.0), "mrad_per_px"),
                        (lambda: bin_image(np.ones((8, 8)), 0), "factor"),
                        (lambda: upsample_nearest(np.ones((8, 8)), 0), "factor"),
                        (lambda: shift_probe(np.ones((8, 8), complex), 0.5), "shift"),
                        (lambda: raster_positions((4, 4), step_px=0.0), "^step_px: expected a positive step in pixels"),
                        (lambda: raster_positions((4, 4), step_px="0.87"), "^step_px: expected a step in pixels")):
        with pytest.raises(DeepPhaseError, match=match):
            call()


def test_mean_counts_match_the_dose_within_poisson_error(probe):
    dose, m = 5000.0, 400
    p = as_complex_tensor(probe)
    gen = torch.Generator().manual_seed(0)
    phase = torch.rand(m, 32, 32, generator=gen)
    counts = poisson_counts(diffraction_intensity(p, phase), dose, incident_counts(probe), gen)
    totals = counts.sum((-2, -1)).double()
    assert abs(totals.mean().item() - dose) < 4 * np.sqrt(dose / m)
    # The spread of the totals is the Poisson spread of the dose (sum of Poisson variables).
    assert totals.var().item() == pytest.approx(dose, rel=0.25)
    assert torch.all(counts == counts.round())


def test_a_noise_free_scan_is_scaled_to_the_dose_asked(probe):
    """simulate_scan(noise=False): the expected counts of the dose asked, not the probe's own scale."""
    from deepphase.data.simulate import simulate_scan

    positions = np.array([[0.0, 0.0], [1.5, 2.25]])
    scan = simulate_scan(np.random.default_rng(0).uniform(0, 1, (36, 36)), probe, positions, dose=1000.0, noise=False,
                         progress=False)
    np.testing.assert_allclose((scan.amplitude.astype(np.float64) ** 2).sum((-2, -1)), 1000.0, rtol=1e-4)


def test_reference_probe_scale_is_the_seed_dose(probe):
    assert incident_counts(probe) == pytest.approx(27_882, abs=1)


def test_nonpositive_dose_is_refused(probe):
    with pytest.raises(DeepPhaseError, match="dose"):
        poisson_counts(torch.ones(2, 2), 0.0, 1.0)


def test_reference_mask_is_the_3x3_centre(probe):
    mask = illuminated_mask(probe, 0.16)
    assert mask.sum() == 9
    assert np.array_equal(np.argwhere(mask).min(0), [15, 15]) and np.array_equal(np.argwhere(mask).max(0), [17, 17])
    out = output_mask(probe, Geometry())
    assert out.shape == (32, 32) and out.sum() == 144
    assert out[12:24, 12:24].all()


@pytest.mark.parametrize("energy, wavelength", [(80, 0.041757), (200, 0.025079), (300, 0.019687)])
def test_electron_wavelength(energy, wavelength):
    assert electron_wavelength(energy) == pytest.approx(wavelength, rel=2e-4)


def test_sampling_relations_are_inverse():
    n, dx, e = 64, 0.15, 300.0
    mrad = angular_sampling(n, dx, e)
    assert mrad == pytest.approx(1e3 * electron_wavelength(e) / (n * dx))
    assert real_space_sampling(n, mrad, e) == pytest.approx(dx)


def test_probe_from_parameters_has_the_right_aperture():
    params = ProbeParameters(energy=300, semiangle_cutoff=20, defocus=50, n_px=64, sampling=0.1)
    probe = probe_from_parameters(params)
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(1.0)
    disk = np.abs(far_field(torch.as_tensor(probe)).numpy()) > 1e-6
    radius_px = 20 / angular_sampling(64, 0.1, 300)
    assert disk.sum() == pytest.approx(np.pi * radius_px**2, rel=0.1)
    # Defocus changes the phase of the far field, not its modulus.
    flat = probe_from_parameters(ProbeParameters(300, 20, 0, 0, 64, 0.1))
    np.testing.assert_allclose(np.abs(far_field(torch.as_tensor(flat)).numpy()),
                               np.abs(far_field(torch.as_tensor(probe)).numpy()), atol=1e-9)


def test_probe_aperture_larger_than_the_grid_is_refused():
    with pytest.raises(DeepPhaseError, match="semiangle"):
        probe_from_parameters(ProbeParameters(300, 200, 0, 0, 32, 0.5))


def test_integer_probe_shift_is_a_roll(probe):
    np.testing.assert_allclose(shift_probe(probe, (2, -3)), np.roll(probe, (2, -3), axis=(0, 1)), atol=1e-12)


def test_raster_positions_order_and_step():
    pos = raster_positions((3, 4), 0.5, fastest="row")
    assert pos.shape == (12, 2)
    np.testing.assert_allclose(pos[:3], [[0, 0], [0.5, 0], [1.0, 0]])
    pos_c = raster_positions((3, 4), 0.5, fastest="col")
    np.testing.assert_allclose(pos_c[:4], [[0, 0], [0, 0.5], [0, 1.0], [0, 1.5]])
    rotated = raster_positions((3, 4), 0.5, rotation_deg=30)
    # Counter-clockwise as displayed (row down, col right): the scan's row axis turns towards +col.
    np.testing.assert_allclose(np.diff(rotated[:3], axis=0), [[0.5 * np.cos(np.pi / 6), 0.5 * np.sin(np.pi / 6)]] * 2)
    np.testing.assert_allclose(rotated[3] - rotated[0], [-0.5 * np.sin(np.pi / 6), 0.5 * np.cos(np.pi / 6)])
    assert rotated.min(axis=0) == pytest.approx([0, 0])


def test_an_object_taken_into_a_scan_frame_is_the_affine_map_between_the_positions():
    """Recorded positions R·s + t (a 15° turn, ×1.1, a shift) against the positions s a reconstruction was given:
    the object sampled at the fitted map of each pixel, exactly for a linear object (the cubic spline is exact on
    it) and within 1 % for a lattice of 7–9 px periods (linear interpolation: off by up to 14 %), the map recovered, the windows' centres kept in register; the same positions give the
    plain crop (NaN beyond the object); frames in another order leave a large residual."""
    from deepphase.physics import object_in_scan_frame

    rows, cols = np.mgrid[0:120, 0:120].astype(float)
    obj = 0.3 * rows - 0.7 * cols + 2.0
    given = raster_positions((6, 7), 1.5)
    theta = np.radians(15.0)
    turn = 1.1 * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    shift = np.array([30.0, 25.0])
    recorded = given @ turn.T + shift
    n, origin, shape = 32, (1.0, 2.0), (20, 24)
    image, info = object_in_scan_frame(obj, recorded, given, origin, shape, n)
    np.testing.assert_allclose(info["matrix"], turn, atol=1e-9)
    assert info["residual_px"] < 1e-9
    centre = (n - 1) / 2
    u = np.stack(np.mgrid[0:shape[0], 0:shape[1]], axis=-1) + np.array(origin)
    x = (u - centre) @ turn.T + shift + centre  # a pixel at a window's centre lands on that window's centre
    np.testing.assert_allclose(image, 0.3 * x[..., 0] - 0.7 * x[..., 1] + 2.0, atol=1e-9)
    lattice = np.sin(2 * np.pi * rows / 7) * np.cos(2 * np.pi * cols / 9)
    image = object_in_scan_frame(lattice, recorded, given, origin, shape, n)[0]
    expected = np.sin(2 * np.pi * x[..., 0] / 7) * np.cos(2 * np.pi * x[..., 1] / 9)
    assert np.max(np.abs(image - expected)) < 0.01

    same, info = object_in_scan_frame(obj, given, given, (110, 3), (15, 5), n)
    assert info["matrix"] == np.eye(2).tolist() and info["residual_px"] == 0.0
    np.testing.assert_array_equal(same[:10], obj[110:, 3:8])
    assert np.isnan(same[10:]).all()
    shuffled = np.random.default_rng(0).permutation(recorded)
    assert object_in_scan_frame(obj, shuffled, given, origin, shape, n)[1]["residual_px"] > 1.0
    with pytest.raises(ShapeError, match="recorded"):
        object_in_scan_frame(obj, recorded[:-1], given, origin, shape, n)
