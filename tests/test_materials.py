"""Atomic specimens and multislice scans (the optional ``sim`` extra: abTEM + ase)."""

import sys

import numpy as np
import pytest

from deepphase.data import materials  # imports without abTEM: it is needed only inside the functions
from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.errors import DeepPhaseError
from deepphase.physics.probe import ProbeParameters, probe_from_parameters
from deepphase.physics.scan import raster_positions


def test_missing_abtem_is_a_user_error_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "abtem", None)  # makes `import abtem` raise ImportError
    with pytest.raises(materials.MissingDependencyError, match=r"pip install -e \"\.\[sim\]\" in deepphase's source folder"):
        materials.material_specimen("hbn", (40, 40))


@pytest.fixture(scope="module")
def sim():
    """Skips a test where the optional ``sim`` extra (abTEM, ase) is missing."""
    pytest.importorskip("abtem")
    pytest.importorskip("ase")


needs_sim = pytest.mark.usefixtures("sim")


@pytest.fixture(scope="module")
def phases(sim):
    return {name: materials.material_specimen(name, (70, 60), seed=3) for name in materials.MATERIAL_SPECIMENS}


@needs_sim
def test_every_specimen_has_the_shape_and_a_plausible_phase(phases):
    for name, phase in phases.items():
        assert phase.shape == (70, 60) and phase.dtype == np.float64, name
        assert np.all(np.isfinite(phase)) and phase.min() >= 0, name
        assert 0.05 < np.ptp(phase) < 12, name
    # hBN at 300 keV: the N peak is ~0.2 rad at 0.2 Å/px; heavier or thicker specimens have more.
    assert 0.05 < phases["hbn"].max() < 1.0
    assert phases["twisted-hbn-bilayer"].mean() == pytest.approx(2 * phases["hbn"].mean(), rel=0.1)
    assert phases["srtio3"].max() > 5 * phases["hbn"].max()
    assert phases["au-on-carbon"].max() > phases["mos2-vacancies"].max() > phases["hbn"].max()


def test_unknown_name_and_bad_shape_are_user_errors():
    with pytest.raises(DeepPhaseError, match="name"):
        materials.material_specimen("unobtainium", (40, 40))
    with pytest.raises(DeepPhaseError, match="shape"):
        materials.material_specimen("hbn", (40, -1))


@needs_sim
def test_seeded_vacancies_are_repeatable_and_remove_atoms(monkeypatch):
    a = materials.material_atoms("mos2-vacancies", (25.0, 30.0), seed=7)
    b = materials.material_atoms("mos2-vacancies", (25.0, 30.0), seed=7)
    c = materials.material_atoms("mos2-vacancies", (25.0, 30.0), seed=8)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert len(a) != len(c) or not np.array_equal(a.positions, c.positions)
    # The same seed without vacancies gives the same lattice with 3 % more S (2 % more C for graphene),
    # and every atom of the defective crop is a site of the perfect one.
    for name, element, fraction in (("mos2-vacancies", "S", 0.03), ("graphene-vacancies", "C", 0.02)):
        defective = materials.material_atoms(name, 30.0, seed=5)
        with monkeypatch.context() as patch:
            patch.setitem(materials._VACANCY_FRACTION, name, (element, 0.0))
            perfect = materials.material_atoms(name, 30.0, seed=5)
        n_sites = perfect.get_chemical_symbols().count(element)
        assert len(perfect) - len(defective) == round(fraction * n_sites) > 0
        sites = {tuple(p) for p in np.round(perfect.positions, 6)}
        assert all(tuple(p) in sites for p in np.round(defective.positions, 6))


@needs_sim
def test_amorphous_carbon_density_and_spacing():
    from scipy.spatial import cKDTree

    atoms = materials.material_atoms("au-on-carbon", 20.0, seed=1)
    carbon = atoms.positions[np.array(atoms.get_chemical_symbols()) == "C"]
    assert cKDTree(carbon).query(carbon, k=2)[0][:, 1].min() >= materials.CARBON_MIN_DISTANCE
    grams_per_cm3 = len(carbon) * 12.011 / 0.60221408 / (20.0 * 20.0 * materials.CARBON_THICKNESS)
    assert grams_per_cm3 == pytest.approx(materials.CARBON_DENSITY, rel=0.01)
    assert "Au" in atoms.get_chemical_symbols()


@needs_sim
def test_abtem_probe_is_the_models_probe():
    """Same optics, same array: abTEM's defocus sign, centring and axes match physics.probe."""
    import abtem

    for defocus in (0.0, 60.0):
        ours = probe_from_parameters(ProbeParameters(300.0, 25.0, defocus, 0.0, 32, 0.2))
        theirs = abtem.Probe(energy=300e3, semiangle_cutoff=25.0, defocus=defocus, soft=False, gpts=32,
                             sampling=0.2).build(scan=abtem.CustomScan([[3.2, 3.2]]), lazy=False).array[0]
        overlap = abs(np.vdot(theirs, ours)) / np.linalg.norm(theirs) / np.linalg.norm(ours)
        assert overlap > 0.9999


@needs_sim
def test_vacuum_disk_matches_the_models_probe(monkeypatch):
    from ase import Atoms

    monkeypatch.setattr(materials, "material_atoms", lambda name, extent, seed=0: Atoms(cell=[*extent, 2.0]))
    positions = np.array([[0.0, 0.0], [1.5, 0.5]])
    pattern = materials.multislice_scan("hbn", positions, dose=1e6).amplitude.astype(float) ** 2
    noise_free = materials._coherent_intensities("hbn", positions, 32, 0.2, 300.0, 25.0, 0.0, 0,
                                                 required_object_shape(positions, 32), 8, False)
    model = np.abs(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(
        probe_from_parameters(ProbeParameters(300.0, 25.0, 0.0, 0.0, 32, 0.2)))))) ** 2

    def radius(i):  # a flat disk: total / peak is its area
        return np.sqrt(i.sum() / i.max() / np.pi)

    for i in noise_free:
        assert abs(radius(i) - radius(model)) < 0.5
        centroid = [np.sum(i.sum(axis=1 - ax) * np.arange(32)) / i.sum() for ax in (0, 1)]
        np.testing.assert_allclose(centroid, [16, 16], atol=1e-3)  # zero frequency at n_px // 2
        assert i.sum() == pytest.approx(1.0, abs=1e-4)
    assert pattern.sum(axis=(1, 2)).mean() == pytest.approx(1e6, rel=0.01)


@needs_sim
def test_small_multislice_scan_shapes_dose_and_cache(tmp_path):
    positions = raster_positions((3, 3), 3.0, fastest="row")
    dose = 2e4
    first = materials.multislice_scan("hbn", positions, dose=dose, seed=2, cache_dir=tmp_path)
    assert first.amplitude.shape == (9, 32, 32) and first.amplitude.dtype == np.float32
    assert first.truth.shape == required_object_shape(positions, 32)
    assert first.dose == dose and first.parameters["semiangle"] == 25.0
    counts = first.amplitude.astype(float) ** 2
    assert np.allclose(counts, np.round(counts), atol=1e-2)  # Poisson counts
    assert counts.sum(axis=(1, 2)).mean() == pytest.approx(dose, rel=0.01)
    np.testing.assert_array_equal(first.truth, materials.material_specimen("hbn", first.truth.shape, seed=2))
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 1
    cached = np.load(files[0])
    second = materials.multislice_scan("hbn", positions, dose=dose, seed=2, cache_dir=tmp_path)
    np.testing.assert_array_equal(second.amplitude, first.amplitude)
    np.testing.assert_array_equal(np.load(files[0]), cached)
    # The cache holds the noise-free patterns: another dose reuses them (no new file).
    materials.multislice_scan("hbn", positions, dose=10 * dose, seed=2, cache_dir=tmp_path)
    assert sorted(tmp_path.glob("*.npy")) == files

    # Thin hBN is nearly a phase object: the patterns vary with position as the model predicts.
    probe = probe_from_parameters(ProbeParameters(300.0, 25.0, 0.0, 0.0, 32, 0.2))
    model = simulate_scan(first.truth, probe, positions, dose=1.0, noise=False).amplitude.astype(float) ** 2
    a, b = cached - cached.mean(axis=0), model - model.mean(axis=0)
    assert np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)) > 0.9


def test_source_blur_is_a_gaussian_filter_on_a_raster():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    grid = rng.random((20, 20, 2, 2))
    step, sigma = 0.1, 0.2
    rr, cc = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    positions = np.column_stack([rr.ravel(), cc.ravel()]) * step
    blurred = materials.source_blur(grid.reshape(400, 2, 2), positions, sigma).reshape(grid.shape)
    expected = gaussian_filter(grid, sigma=(sigma / step, sigma / step, 0, 0), truncate=5.0)
    np.testing.assert_allclose(blurred[10:11, 10:11], expected[10:11, 10:11], rtol=1e-4)
    with pytest.raises(DeepPhaseError, match="source_size"):
        materials.source_blur(grid.reshape(400, 2, 2), positions, 0.05)


# -------------------------------------------------------------------------------------------------
# A measured probe as the incident wave
# -------------------------------------------------------------------------------------------------


def test_probe_resampling_is_exact_at_the_models_pixels():
    """The resampled probe, moved by a whole or half pixel, passes through the probe's own values."""
    from deepphase.physics import reference_probe

    probe = reference_probe()
    os_ = materials.OVERSAMPLING
    assert os_ == 2  # half-pixel shifts then land on simulation pixels
    gpts = (96 * os_, 160 * os_)
    spectrum = materials._probe_spectrum(probe, gpts, os_)
    corners = np.array([[0.0, 0.0], [2.0, 3.0], [2.5, 3.5], [40.5, 101.0]])
    waves = materials._shifted_waves(spectrum, corners * 0.2, 0.2 / os_)
    for wave, (r, c) in zip(waves, corners):
        r0, c0 = int(round(os_ * r)), int(round(os_ * c))
        np.testing.assert_allclose(wave[r0 : r0 + os_ * 32 : os_, c0 : c0 + os_ * 32 : os_], probe,
                                   atol=1e-9 * np.abs(probe).max())
        # Zero (up to the interpolant's ripple) at the model's pixels outside the window.
        assert np.abs(wave[r0 + os_ * 40, c0 + os_ * 40]) < 1e-9 * np.abs(probe).max()
    # Exact resampling keeps the norm: Σ|ψ|² on the finer grid is oversampling² times the probe's.
    assert np.sum(np.abs(waves) ** 2, axis=(1, 2)) == pytest.approx(os_**2 * np.sum(np.abs(probe) ** 2), rel=1e-9)
    assert materials._probe_edge_fraction(probe) < 2e-3  # the reference probe is small at its window's edge


def _pixel_integrated_far_field(probe, b):
    """|F|² of the probe zero-padded to b·n pixels, summed over b × b blocks centred on the model's pixels."""
    n = probe.shape[-1]
    field = np.zeros((b * n, b * n), dtype=complex)
    field[:n, :n] = probe
    fine = np.abs(np.fft.fftshift(np.fft.fft2(field))) ** 2
    padded = np.pad(fine, (b - 1) // 2)  # frequencies beyond the probe's band are zero on abTEM's grid
    return padded[: b * n, : b * n].reshape(n, b, n, b).sum(axis=(1, 3)) / fine.sum()


@needs_sim
def test_custom_probe_in_vacuum_is_the_models_far_field(monkeypatch, tmp_path):
    from ase import Atoms

    from deepphase.physics import reference_probe

    monkeypatch.setattr(materials, "material_atoms", lambda name, extent, seed=0: Atoms(cell=[*extent, 2.0]))
    probe = reference_probe()
    positions = np.array([[0.0, 0.0], [1.5, 0.5], [3.3, 7.71]])
    dose = 1e8
    scan = materials.multislice_scan("hbn", positions, dose=dose, probe=probe, cache_dir=tmp_path)
    assert scan.parameters["semiangle"] is None and scan.parameters["defocus"] is None
    assert scan.parameters["probe"] == "custom" and scan.parameters["probe_edge_fraction"] < 2e-3
    b = scan.parameters["bin_factor"]
    assert b == [3, 3]
    noise_free = np.load(next(tmp_path.glob("*.npy")))
    model = np.abs(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(probe)))) ** 2
    model /= model.sum()
    integrated = _pixel_integrated_far_field(probe, b[0])
    counts = scan.amplitude.astype(float) ** 2
    for i, c in zip(noise_free, counts):
        # abTEM's multislice (float32) reproduces the exact resampling: every detector pixel is the
        # integral of the model's band-limited far field over the pixel ...
        assert np.linalg.norm(i - integrated) / np.linalg.norm(integrated) < 1e-3
        # ... which is the model's point-sampled |F(P)|² up to the pixel integration at the disk's
        # edge (2.75 % measured at b = 3).
        assert np.linalg.norm(i - model) / np.linalg.norm(model) < 0.035
        # The dose keeps its meaning: nothing scattered, so the counts add up to the dose.
        assert c.sum() == pytest.approx(dose, rel=1e-3)
        assert np.linalg.norm(c / dose - model) / np.linalg.norm(model) < 0.035


@needs_sim
def test_custom_probe_on_thin_hbn_matches_the_phase_object_model(tmp_path):
    from deepphase.physics import reference_probe

    probe = reference_probe()
    positions = raster_positions((3, 3), 3.0, fastest="row")
    scan = materials.multislice_scan("hbn", positions, seed=2, probe=probe, cache_dir=tmp_path)
    multislice = np.load(next(tmp_path.glob("*.npy")))
    model = simulate_scan(scan.truth, probe, positions, dose=1.0, noise=False).amplitude.astype(float) ** 2

    def correlation(a, b):
        return np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))

    # The scattering signal: each pattern minus the scan's mean pattern. Measured 0.996; a probe
    # misplaced by 0.25 px gives 0.961, the transposed probe 0.81, the optics probe 0.45.
    a, b = multislice - multislice.mean(axis=0), model - model.mean(axis=0)
    assert correlation(a, b) > 0.98
    assert correlation(multislice, model) > 0.999  # whole patterns (measured 0.9996)


@needs_sim
def test_the_probe_is_part_of_the_cache_key(monkeypatch, tmp_path):
    from deepphase.physics import reference_probe

    calls = []

    def fake(name, positions, n_px, *args, probe=None, **kwargs):
        calls.append(probe)
        return np.full((len(positions), n_px, n_px), 1.0 / n_px**2)

    monkeypatch.setattr(materials, "_coherent_intensities", fake)
    monkeypatch.setattr(materials, "material_specimen", lambda name, shape, **kwargs: np.zeros(shape))
    probe = reference_probe()
    other = probe.copy()
    other[16, 16] *= 1.001
    positions = np.array([[0.0, 0.0]])

    def run(p, **kwargs):
        return materials.multislice_scan("hbn", positions, probe=p, cache_dir=tmp_path, **kwargs).parameters

    files = {run(p)["cache_file"] for p in (None, probe, other)}
    assert len(files) == 3 and len(calls) == 3
    assert run(probe.copy())["cache_file"] in files and len(calls) == 3  # the same probe: a cache hit
    # With a probe the optics are ignored: they neither change the key nor need to be valid.
    assert run(probe, semiangle=-1.0, defocus=50.0)["cache_file"] in files and len(calls) == 3
    assert calls[1] is not None and np.array_equal(calls[1], probe)


def test_a_probe_of_the_wrong_shape_is_a_user_error():
    with pytest.raises(DeepPhaseError, match="probe"):
        materials._check_probe(np.ones((16, 16), complex), 32)
    with pytest.raises(DeepPhaseError, match="probe"):
        materials._check_probe(np.zeros((32, 32), complex), 32)
    with pytest.warns(UserWarning, match="outermost"):
        materials._check_probe(np.ones((32, 32), complex), 32)
