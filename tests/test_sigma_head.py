"""A network head that predicts σ: its likelihood, what it learns, and σ maps from reconstruction."""

import json

import numpy as np
import pytest
import torch

from deepphase.data.phase_objects import CorpusConfig
from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.data.specimens import twisted_hbn
from deepphase.errors import DeepPhaseError
from deepphase.models import create_model
from deepphase.models.modelfile import load_model, save_model
from deepphase.models.registry import has_sigma_head, sigma_from_log_scale
from deepphase.physics import Geometry, output_mask, raster_positions
from deepphase.training.loop import TrainConfig, train
from deepphase.training.loss import laplace_nll, masked_l1, remove_masked_mean

from .conftest import unchecked_reconstruct as reconstruct

LATTICE = CorpusConfig(mix={"lattice": 1.0}, phase_range=(0.8, 1.0))


@pytest.fixture(scope="module")
def head_model(probe, tmp_path_factory):
    """A compact σ-head model after a few steps (enough for finite, non-trivial outputs), and its folder."""
    folder = tmp_path_factory.mktemp("head") / "model"
    config = TrainConfig(arch="compact", epochs=1, steps_per_epoch=10, batch_size=8, corpus=LATTICE, val_size=16,
                         device="cpu", seed=3, sigma_head="shared")
    model, _ = train(probe, folder, config, progress=False, log=lambda *_: None)
    return model, folder


@pytest.fixture(scope="module")
def scan(probe):
    positions = raster_positions((12, 12), 0.87, fastest="row")
    return simulate_scan(twisted_hbn(required_object_shape(positions, 32), seed=2), probe, positions, seed=1,
                         progress=False)


def test_laplace_likelihood_is_least_at_the_mean_absolute_offset_free_residual(probe):
    """For one b shared by every pixel, d/db Σ(|r|/b + log b) = 0 at b = mean |r|: the NLL's minimiser."""
    mask = torch.as_tensor(output_mask(probe, Geometry()))
    g = torch.Generator().manual_seed(0)
    target = torch.rand(6, 1, 32, 32, generator=g)
    noise = torch.distributions.Laplace(0.0, 0.05).sample((6, 1, 32, 32))
    phase = target + noise + 0.9  # a constant offset is no error: the residual is offset-free
    residual = remove_masked_mean(phase, mask) - remove_masked_mean(target, mask)
    expected = (residual.abs() * mask).sum() / (mask.sum() * 6)
    log_b = torch.linspace(-6, 0, 601)
    nll = torch.stack([laplace_nll(phase, torch.full_like(phase, v), target, mask) for v in log_b])
    best = float(torch.exp(log_b[int(torch.argmin(nll))]))
    assert best == pytest.approx(float(expected), rel=0.02)
    assert float(expected) == pytest.approx(0.05, rel=0.1)  # the Laplace scale the noise was drawn with
    # The L1 of the phase is that same mean absolute residual: b estimates the expected L1 error.
    assert float(masked_l1(phase, target, mask)) == pytest.approx(float(expected), rel=1e-5)


def test_the_likelihood_does_not_pull_on_the_phase_and_clamps_the_scale(probe):
    mask = torch.as_tensor(output_mask(probe, Geometry()))
    phase = torch.rand(2, 1, 32, 32, requires_grad=True)
    log_scale = torch.full((2, 1, 32, 32), -30.0, requires_grad=True)  # b far below the clamp
    value = laplace_nll(phase, log_scale, torch.zeros(2, 1, 32, 32), mask)
    assert torch.isfinite(value)
    value.backward()
    assert phase.grad is None or not phase.grad.any()  # detached: the phase learns from L1 alone
    phase.grad = None
    laplace_nll(phase, torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32), mask, detach_phase=False).backward()
    assert phase.grad.abs().sum() > 0
    assert float(sigma_from_log_scale(torch.tensor(0.0))) == pytest.approx(2 ** 0.5)  # σ of a Laplace = √2·b


@pytest.mark.parametrize("arch, form", [("compact", "shared"), ("compact", "detached"), ("unet-small", "shared")])
def test_the_head_is_a_second_channel_and_the_model_file_restores_it(probe, tmp_path, arch, form):
    with pytest.raises(DeepPhaseError, match="sigma_head"):
        create_model("unet-small", sigma_head="detached")  # the U-Nets have the shared form only
    net = create_model(arch, sigma_head=form).eval()
    assert has_sigma_head(net) and not has_sigma_head(create_model(arch))
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert net(x).shape == (3, 2, 32, 32)
    from deepphase.models.modelfile import PhaseModel

    save_model(PhaseModel(net, arch, {"n_px": 32, "out_px": 32, "sigma_head": form}, probe, Geometry()), tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model.json").read_text())["arch_config"]["sigma_head"] == form
    assert has_sigma_head(loaded.network)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), net(x))


def test_a_detached_head_leaves_the_phase_network_exactly_as_trained_without_it(probe, tmp_path):
    config = dict(arch="compact", epochs=1, steps_per_epoch=6, batch_size=8, corpus=LATTICE, val_size=8, device="cpu",
                  seed=4)
    quiet = dict(progress=False, log=lambda *_: None)
    plain, _ = train(probe, tmp_path / "plain", TrainConfig(**config), **quiet)
    head, history = train(probe, tmp_path / "head", TrainConfig(**config, sigma_head="detached"), **quiet)
    a, b = plain.network.state_dict(), head.network.state_dict()
    assert set(b) - set(a) and all(k.startswith("sigma_branch.") for k in set(b) - set(a))
    # Except the phase head's bias: a constant on every patch, which the offset-free loss cannot see, so its
    # gradient is rounding noise that Adam scales up to full steps (and reconstruction removes it anyway).
    for key in sorted(set(a) - {"head.bias"}):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    assert np.isfinite(history[-1]["train_nll"])


def test_trained_head_predicts_larger_sigma_where_the_noise_is_larger():
    """Heteroscedastic learnable case: two kinds of input (a disk at 20 or at 20,000 counts, told apart by
    their Poisson noise) whose targets carry Laplace noise of scale 0.3 or 0.03 rad that no network can
    predict. The phase learns the median (0) and the head must learn each kind's scale: b → E|r|."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 16
    rr, cc = torch.meshgrid(torch.arange(n) - n / 2, torch.arange(n) - n / 2, indexing="ij")
    disk = ((rr**2 + cc**2) < 25).float() + 0.01
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[4:12, 4:12] = True

    def batch(size):
        low = torch.arange(size) % 2 == 0  # alternate kinds
        dose = torch.where(low, 20.0, 20000.0)[:, None, None, None]
        counts = torch.poisson(disk * dose / disk.sum(), generator=g)
        scale = torch.where(low, 0.3, 0.03)[:, None, None, None]
        noise = torch.distributions.Laplace(0.0, 1.0).sample((size, 1, n, n))
        return counts.sqrt(), noise * scale, low

    net = create_model("compact", n_px=n, out_px=n, dropout=0.0, sigma_head=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(150):
        x, target, _ = batch(32)
        out = net(x)
        loss = masked_l1(out[:, :1], target, mask) + laplace_nll(out[:, :1], out[:, 1:2], target, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, _, low = batch(64)
    with torch.no_grad():
        sigma = sigma_from_log_scale(net.eval()(x)[:, 1])[:, mask].mean(dim=1)
    ratio = float(sigma[low].mean() / sigma[~low].mean())
    # The truth: √2·0.3 = 0.42 against √2·0.03 = 0.042 rad, a ratio of 10 (measured after 150 steps: 0.421
    # and 0.045 rad, 9.4); a head that ignored its input would give 1.
    assert ratio > 3, (ratio, float(sigma[low].mean()), float(sigma[~low].mean()))
    assert float(sigma[low].mean()) == pytest.approx(2 ** 0.5 * 0.3, rel=0.5)


def test_reconstruct_writes_the_heads_sigma_map_the_same_in_any_chunks(head_model, scan):
    model, _ = head_model
    whole = reconstruct(scan.amplitude, scan.positions, model, sigma_head=True, sigma_scale=1.0, progress=False)
    chunked = reconstruct(scan.amplitude, scan.positions, model, sigma_head=True, sigma_scale=1.0, chunk_size=50,
                          progress=False)
    assert whole.uncertainty.shape == whole.phase.shape
    finite = np.isfinite(whole.uncertainty)
    assert finite.mean() > 0.9 and np.all(whole.uncertainty[finite] > 0)
    np.testing.assert_allclose(chunked.uncertainty, whole.uncertainty, rtol=1e-5)
    np.testing.assert_allclose(chunked.phase, whole.phase, atol=1e-5)
    assert whole.processing["uncertainty"]["method"] == "σ head"
    # σ is the blend of the head's patches (offsets zero): inside the patches' range, whatever the stitcher.
    from deepphase.reconstruction.predict import predict_patches

    _, patches = predict_patches(model, scan.amplitude, sigma=True)
    inside = patches[:, output_mask(model.probe, model.geometry)]
    assert inside.min() - 1e-6 <= np.nanmin(whole.uncertainty) <= np.nanmax(whole.uncertainty) <= inside.max() + 1e-6
    exact = reconstruct(scan.amplitude, scan.positions, model, stitching="least-squares", sigma_head=True,
                        sigma_scale=1.0, progress=False)
    np.testing.assert_allclose(exact.uncertainty, whole.uncertainty, rtol=1e-5)
    # The phase is the one a reconstruction without σ gives: σ costs no extra pass and changes nothing.
    plain = reconstruct(scan.amplitude, scan.positions, model, progress=False)
    np.testing.assert_allclose(plain.phase, whole.phase, atol=1e-5)
    # Another engine runs the same two-channel network.
    fast = reconstruct(scan.amplitude, scan.positions, model, sigma_head=True, sigma_scale=1.0,
                       engine="channels-last", progress=False)
    np.testing.assert_allclose(fast.uncertainty, whole.uncertainty, rtol=1e-4)


def test_the_heads_factor_is_fitted_on_its_corpus_and_applied(head_model, scan, tmp_path):
    import shutil

    from deepphase.reconstruction.uncertainty import fit_sigma_scale, save_sigma_scale, sigma_scale_at

    model, folder = head_model
    result = fit_sigma_scale(model, n_scans=2, side=8, seed=5, method="head")
    assert result["method"] == "σ head" and result["sigma_scale"] > 0
    assert result["within_2sigma_scaled"] > 0.6827  # k·σ covers 68 % by construction, ±2k·σ more
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    save_sigma_scale(copy, result)
    meta = json.loads((copy / "model.json").read_text())
    assert meta["uncertainty_head"]["sigma_scale"] == result["sigma_scale"] and "uncertainty" not in meta
    calibrated = load_model(copy)
    raw = reconstruct(scan.amplitude, scan.positions, calibrated, sigma_head=True, sigma_scale=1.0, progress=False)
    fitted = reconstruct(scan.amplitude, scan.positions, calibrated, sigma_head=True, progress=False)
    factor, _ = sigma_scale_at(calibrated, fitted.processing["electrons_per_pattern"], method="head")
    np.testing.assert_allclose(fitted.uncertainty, factor * raw.uncertainty, rtol=1e-5)
    assert fitted.processing["uncertainty"]["sigma_scale"] == pytest.approx(factor)


def test_head_uncertainty_from_a_model_without_a_head_is_refused(scan):
    with pytest.raises(DeepPhaseError, match="uncertainty: 'head' needs a model trained with a σ head"):
        reconstruct(scan.amplitude, scan.positions, "unet-small", sigma_head=True, progress=False)
    with pytest.raises(DeepPhaseError, match="choose one"):
        reconstruct(scan.amplitude, scan.positions, "unet-small", sigma_head=True, uncertainty_samples=2, progress=False)


def test_cli_uncertainty_head(head_model, scan, tmp_path, capsys):
    from deepphase.cli import main

    _, folder = head_model
    np.save(tmp_path / "amplitude.npy", scan.amplitude)
    np.save(tmp_path / "positions.npy", scan.positions)
    common = ["reconstruct", str(tmp_path / "amplitude.npy"), "--positions", str(tmp_path / "positions.npy")]
    assert main(common + ["--model", str(folder), "--uncertainty", "head", "--out", str(tmp_path / "r")]) == 0
    phase, sigma = np.load(tmp_path / "r" / "phase.npy"), np.load(tmp_path / "r" / "uncertainty.npy")
    meta = json.loads((tmp_path / "r" / "metadata.json").read_text())
    assert sigma.shape == phase.shape and meta["processing"]["uncertainty"]["method"] == "σ head"
    # The packaged default carries a (detached) σ head; unet-small has none and is refused.
    assert main(common + ["--uncertainty", "head", "--out", str(tmp_path / "d")]) == 0
    default_sigma = np.load(tmp_path / "d" / "uncertainty.npy")
    assert default_sigma.shape == np.load(tmp_path / "d" / "phase.npy").shape and np.nanmin(default_sigma) > 0
    capsys.readouterr()
    assert main(common + ["--model", "unet-small", "--uncertainty", "head", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "uncertainty" in err and "--sigma-head" in err and "Traceback" not in err
    assert not (tmp_path / "r2" / "phase.npy").exists()
    assert main(common + ["--uncertainty", "heads", "--out", str(tmp_path / "r3")]) == 2
