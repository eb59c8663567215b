"""Per-pixel uncertainty: Monte Carlo dropout with a fitted σ factor, and ensembles of models."""

import json
import shutil

import numpy as np
import pytest

from deepphase.data.simulate import simulate_scan
from deepphase.data.specimens import twisted_hbn
from deepphase.errors import ValueRangeError
from deepphase.models.modelfile import load_model, packaged_model_path
from deepphase.physics import raster_positions
from deepphase.reconstruction.uncertainty import fit_sigma_scale, save_sigma_scale, sigma_scale_at

from .conftest import unchecked_reconstruct as reconstruct


@pytest.fixture(scope="module")
def scan(probe):
    positions = raster_positions((16, 16), 0.86995916)
    return simulate_scan(twisted_hbn((50, 50), seed=4), probe, positions, seed=1)


def test_fitted_factor_covers_68_percent_of_its_scans_and_is_applied(tmp_path):
    result = fit_sigma_scale(None, n_scans=2, side=12, samples=3, seed=5)
    # By construction k·σ covers 68 % on the fitting scans; raw dropout σ covers far less (measured: ~1 %).
    assert result["sigma_scale"] > 1 and result["within_1sigma_raw"] < 0.5
    assert result["within_2sigma_scaled"] > 0.6827
    folder = tmp_path / "model"
    shutil.copytree(packaged_model_path("default"), folder)
    save_sigma_scale(folder, result)
    assert json.loads((folder / "model.json").read_text())["uncertainty"]["sigma_scale"] == result["sigma_scale"]
    model = load_model(folder)
    scan = simulate_scan(twisted_hbn((40, 40)), model.probe, raster_positions((4, 4), 0.87), seed=0)
    raw = reconstruct(scan.amplitude, scan.positions, model, uncertainty_samples=2, sigma_scale=1.0, progress=False)
    fitted = reconstruct(scan.amplitude, scan.positions, model, uncertainty_samples=2, progress=False)
    # The scan's counts give its dose (27,882 e/pattern): the factor is the one fitted for that dose.
    factor, source = sigma_scale_at(model, fitted.processing["electrons_per_pattern"])
    assert "e/pattern" in source and factor != result["sigma_scale"]
    np.testing.assert_allclose(fitted.uncertainty, factor * raw.uncertainty, rtol=1e-5)
    assert fitted.processing["uncertainty"]["sigma_scale"] == pytest.approx(factor)


def test_the_factor_follows_a_smooth_curve_in_log_dose():
    class Model:
        info = {"uncertainty": {"sigma_scale": 5.0, "sigma_scale_by_dose": [[100.0, 2.0], [10_000.0, 8.0]]}}

    assert sigma_scale_at(Model, 100.0)[0] == pytest.approx(2.0)
    assert sigma_scale_at(Model, 1000.0)[0] == pytest.approx(4.0)  # halfway in log dose: the geometric mean
    assert sigma_scale_at(Model, 1e6)[0] == pytest.approx(8.0)  # held beyond the fitted doses
    assert sigma_scale_at(Model, None) == (5.0, "fitted for the model on simulated scans (model.json)")
    # a scattered table of factors that fall as a power of the dose: the curve, not the scatter
    doses = np.geomspace(10, 1e6, 12)
    scatter = np.where(np.arange(12) % 2, 1.6, 1 / 1.6)
    Model.info = {"uncertainty": {"sigma_scale": 5.0,
                                  "sigma_scale_by_dose": [[d, 100 * d**-0.3 * s] for d, s in zip(doses, scatter)]}}
    for d in (30.0, 3000.0, 300_000.0):
        assert sigma_scale_at(Model, d)[0] == pytest.approx(100 * d**-0.3, rel=0.25)


def test_an_ensemble_of_the_same_weights_is_refused(scan, tmp_path):
    """Its σ map was 0 everywhere, with no word (the outputs audit, s40): a copy of the model spreads nothing."""
    from deepphase.models.modelfile import load_model, save_model

    save_model(load_model("default"), tmp_path / "copy")
    for ensemble, said in ((["default"], "'default' has the same weights as 'default'"),
                           (["unet-small", str(tmp_path / "copy")], "'copy' has the same weights as 'default'")):
        with pytest.raises(ValueRangeError, match=said):
            reconstruct(scan.amplitude, scan.positions, ensemble=ensemble, progress=False)


def test_ensemble_of_two_models_is_their_mean_with_their_spread(scan):
    a = reconstruct(scan.amplitude, scan.positions, "default", progress=False).phase
    b = reconstruct(scan.amplitude, scan.positions, "unet-small", progress=False).phase
    both = reconstruct(scan.amplitude, scan.positions, "default", ensemble=["unet-small"], progress=False)
    a, b = a - a.mean(), b - b.mean()
    np.testing.assert_allclose(both.phase - both.phase.mean(), (a + b) / 2, atol=1e-5)
    np.testing.assert_allclose(both.uncertainty, np.abs(a - b) / 2, atol=1e-5)  # population std of two values
    assert both.processing["uncertainty"]["method"] == "ensemble"


def test_ensemble_refuses_dropout_at_the_same_time(scan):
    with pytest.raises(ValueRangeError, match="not both"):
        reconstruct(scan.amplitude, scan.positions, ensemble=["unet-small"], uncertainty_samples=2, progress=False)
