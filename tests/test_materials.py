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
    with pytest.raises(materials.MissingDependencyError, match=r"pip install deepphase\[sim\]"):
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
