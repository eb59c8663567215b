"""The py4DSTEM ptychography baseline: its phase lies on our object grid and matches the truth.

py4DSTEM pins numpy<2, so it lives in a separate environment; without it only the missing-package
error is tested. Run with that environment's Python: ``/work/venv-ptycho/bin/python -m pytest -q
tests/test_ptychography.py``.
"""

import sys

import numpy as np
import pytest

from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.data.specimens import twisted_hbn
from deepphase.errors import DeepPhaseError, ShapeError, ValueRangeError
from deepphase.evaluation import metrics
from deepphase.evaluation.ptychography import INSTALL_HINT, ptychography_method, ptychography_phase
from deepphase.physics.scan import raster_positions


@pytest.fixture(scope="module")
def py4dstem():
    return pytest.importorskip("py4DSTEM")


def _smooth_field(shape, seed=3, sigma=1.5, amplitude=0.8):
    """A smooth random phase with no symmetry (a wrong flip, transpose or shift shows).

    Not much smoother than this: ptychography recovers low spatial frequencies slowly, and after a
    dozen iterations the unconverged long-wavelength error of a sigma = 2.5 px field biased the
    registration by up to 0.7 px (60 iterations brought it back under 0.2 px).
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return amplitude * (field - field.min()) / np.ptp(field)


def _interior(phase, margin=4):
    from scipy.ndimage import binary_erosion

    return binary_erosion(np.isfinite(phase), iterations=margin, border_value=0)


def _scan(truth_fn, scan_shape, step, probe, dose=None, noise=False):
    positions = raster_positions(scan_shape, step, fastest="row")
    shape = required_object_shape(positions, probe.shape[-1])
    truth = truth_fn(shape)
    scan = simulate_scan(truth, probe, positions, dose=dose, noise=noise, progress=False)
    return scan, shape


@pytest.fixture(scope="module")
def hbn_result(py4dstem):
    from deepphase.physics import reference_probe

    probe = reference_probe()
    scan, shape = _scan(twisted_hbn, (20, 20), 1.0, probe)
    phase, notes = ptychography_phase(scan.amplitude, scan.positions, probe, shape, num_iter=12)
    return scan, phase, notes


def test_atoms_on_our_grid(hbn_result):
    scan, phase, notes = hbn_result
    assert phase.shape == scan.truth.shape and phase.dtype == np.float64
    region = _interior(phase)
    rec, truth = np.where(region, phase, np.nan), np.where(region, scan.truth, np.nan)
    assert metrics.correlation(rec, truth) > 0.9
    shift = metrics.align(rec, truth)
    assert abs(shift[0]) < 0.5 and abs(shift[1]) < 0.5, shift
    assert notes["py4DSTEM_version"] and notes["fix_probe"] is True and notes["num_iter"] == 12


def test_alignment_check_detects_a_misplaced_grid(hbn_result):
    """The same check flags a reconstruction one pixel off (so passing above means the grids agree)."""
    scan, phase, _ = hbn_result
    region = _interior(phase)
    moved = np.where(region, np.roll(phase, (1, -1), axis=(0, 1)), np.nan)
    shift = metrics.align(moved, np.where(region, scan.truth, np.nan))
    assert shift[0] == pytest.approx(-1, abs=0.3) and shift[1] == pytest.approx(1, abs=0.3)


def test_scanned_area_is_the_probe_centres(hbn_result):
    """Finite over the rectangle of probe centres (position + 16), NaN a few pixels beyond it."""
    scan, phase, _ = hbn_result
    centres = scan.positions + 16
    r0, c0 = centres.min(axis=0).astype(int)
    r1, c1 = centres.max(axis=0).astype(int)
    assert np.all(np.isfinite(phase[r0 : r1 + 1, c0 : c1 + 1]))
    outside = np.ones(phase.shape, bool)
    outside[r0 - 3 : r1 + 4, c0 - 3 : c1 + 4] = False
    assert np.all(np.isnan(phase[outside]))


def test_subpixel_steps_noisy_smooth_object(py4dstem, probe):
    """Non-integer step (the reference 0.87 px), Poisson noise at high dose, an asymmetric smooth object."""
    scan, shape = _scan(_smooth_field, (24, 24), 0.86995916, probe, dose=1e6, noise=True)
    phase, _ = ptychography_phase(scan.amplitude, scan.positions, probe, shape, num_iter=24)
    region = _interior(phase)
    rec, truth = np.where(region, phase, np.nan), np.where(region, scan.truth, np.nan)
    assert metrics.correlation(rec, truth) > 0.95
    shift = metrics.align(rec, truth)
    assert abs(shift[0]) < 0.5 and abs(shift[1]) < 0.5, shift
    # Transposing the reconstruction must break the agreement (rows and columns are not swapped).
    assert metrics.correlation(np.where(region, phase.T, np.nan), truth) < 0.9


def test_harness_method(py4dstem, probe):
    from deepphase.evaluation.harness import Case, MethodResult

    scan, _ = _scan(twisted_hbn, (12, 12), 1.0, probe)
    case = Case("twisted-hbn", float(scan.dose), (12, 12), 1.0, scan, None)
    result = ptychography_method(num_iter=4)(case, probe)
    assert isinstance(result, MethodResult)
    assert result.phase.shape == scan.truth.shape and result.seconds > 0
    assert result.notes["num_iter"] == 4 and "step_size" in result.notes


def test_bad_input(py4dstem, probe):
    scan, shape = _scan(twisted_hbn, (6, 6), 1.0, probe)
    with pytest.raises(ShapeError, match="object_shape"):
        ptychography_phase(scan.amplitude, scan.positions, probe, (shape[0] - 3, shape[1]), num_iter=1)
    with pytest.raises(ValueRangeError, match="settings"):
        ptychography_phase(scan.amplitude, scan.positions, probe, shape, num_iter=1, no_such_setting=1)
    with pytest.raises(ShapeError, match="probe"):
        ptychography_phase(scan.amplitude, scan.positions, probe[:16, :16], shape, num_iter=1)


def test_missing_py4dstem_names_the_fix(monkeypatch, probe):
    monkeypatch.setitem(sys.modules, "py4DSTEM", None)  # makes `import py4DSTEM` raise ImportError
    positions = raster_positions((2, 2), 1.0)
    with pytest.raises(DeepPhaseError, match="py4DSTEM") as err:
        ptychography_phase(np.ones((4, 32, 32)), positions, probe, (40, 40))
    assert INSTALL_HINT in str(err.value)
