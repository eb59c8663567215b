"""The data's probe against the model's: the weak-phase transfer, the fit of defocus and astigmatism, the units,
rasters found in position lists, and what reconstruct and train --like do with them."""

import json
import re

import numpy as np
import pytest

from deepphase.cli import main
from deepphase.data.aberrations import (add_aberrations, defocus_angstrom, measure_probe_mismatch,
                                        probe_mismatch_note, scan_spectrum, weak_phase_transfer)
from deepphase.data.calibration import model_disk
from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.data.specimens import twisted_hbn
from deepphase.physics import (ProbeParameters, electron_wavelength, probe_from_parameters, raster_from_positions,
                               raster_positions)

STEP = 0.87


def far(probe):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(probe)))


def test_added_aberrations_keep_the_intensity_and_are_abtem_defocus_in_its_units():
    optics = dict(energy=300.0, semiangle_cutoff=25.0, n_px=32, sampling=0.2)
    focused = probe_from_parameters(ProbeParameters(**optics))
    defocused = probe_from_parameters(ProbeParameters(**optics, defocus=30.0))
    mrad_per_px = 1e3 * electron_wavelength(300.0) / (32 * 0.2)
    a = 30.0 * np.pi * (mrad_per_px * 1e-3) ** 2 / electron_wavelength(300.0)  # Δf = a λ / (π s²), inverted
    assert defocus_angstrom(a, mrad_per_px, 300.0) == pytest.approx(30.0)
    ours = add_aberrations(focused, (a, 0.0, a))
    assert np.sum(np.abs(ours) ** 2) == pytest.approx(np.sum(np.abs(focused) ** 2))  # Parseval
    assert np.abs(ours - defocused).max() < 1e-9 * np.abs(defocused).max() + 1e-12
    with pytest.raises(Exception, match="three finite numbers"):
        add_aberrations(focused, (a, np.nan, a))


def test_a_weak_cosine_scatters_into_the_trotters_of_the_weak_phase_transfer(probe):
    """G(q, g) of a noise-free scan over a 0.01 rad cosine is the transfer T(q, g) up to one complex factor."""
    shape = (32, 32)
    positions = raster_positions(shape, 1.0, 0.0, "row")
    rows, cols = np.indices(required_object_shape(positions, 32), dtype=np.float64)
    frequency = np.array([3 / 32, 5 / 32])  # cycles per pixel: a whole number of periods over the scan
    phase = 0.01 * np.cos(2 * np.pi * (frequency[0] * rows + frequency[1] * cols))
    amplitudes = simulate_scan(phase, probe, positions, noise=False, progress=False).amplitude
    spectrum, g, _ = scan_spectrum(amplitudes, shape, 1.0, n_frequencies=1)
    assert np.allclose(np.abs(g[0]), 32 * frequency)  # the strongest frequency is the cosine's
    transfer = weak_phase_transfer(far(probe), g)[0]
    overlap = np.abs(np.vdot(transfer, spectrum[0])) ** 2 / (np.vdot(transfer, transfer).real
                                                              * np.vdot(spectrum[0], spectrum[0]).real)
    assert overlap > 0.999
    wrong = weak_phase_transfer(far(probe), -g)[0]  # the other sign of g: the trotters swapped
    assert np.abs(np.vdot(wrong, spectrum[0])) ** 2 / (np.vdot(wrong, wrong).real
                                                       * np.vdot(spectrum[0], spectrum[0]).real) < 0.9


@pytest.mark.parametrize("coefficients, rotation, fastest, dose", [
    ((0.0, 0.0, 0.0), 0.0, "row", 1000.0),
    ((0.02, 0.0, 0.02), 30.0, "col", 1000.0),  # defocus, 1.2 rad at the disk's edge
    ((-0.015, 0.006, -0.005), -70.0, "row", 27882.0),  # defocus and astigmatism
])
def test_the_fit_finds_the_defocus_and_astigmatism_put_in(probe, coefficients, rotation, fastest, dose):
    shape = (24, 24)
    positions = raster_positions(shape, STEP, rotation, fastest)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=4)
    amplitudes = simulate_scan(truth, add_aberrations(probe, coefficients), positions, dose=dose, seed=2,
                               progress=False).amplitude
    found = measure_probe_mismatch(amplitudes, shape, probe, STEP, rotation, fastest)
    radius2 = model_disk(probe)["radius"] ** 2
    assert np.abs(np.subtract(found["coefficients"], coefficients)).max() * radius2 < 0.1  # rad at the edge
    assert found["uncertainty_rad"] < 0.1 and found["block"] == [24, 24]
    note = probe_mismatch_note(found)
    assert (note is None) == (coefficients == (0.0, 0.0, 0.0))
    if note:
        assert "defocus -" in note if coefficients[0] < 0 else "defocus +" in note


def test_the_fit_tells_the_defocus_in_angstrom_from_the_optics():
    optics = dict(energy=300.0, semiangle_cutoff=25.0, n_px=32, sampling=0.2)
    model_probe = probe_from_parameters(ProbeParameters(**optics))
    data_probe = probe_from_parameters(ProbeParameters(**optics, defocus=-25.0))  # overfocus
    shape = (24, 24)
    positions = raster_positions(shape, STEP)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=1)
    amplitudes = simulate_scan(truth, data_probe, positions, dose=27882.0, seed=1, progress=False).amplitude
    found = measure_probe_mismatch(amplitudes, shape, model_probe, STEP)
    mrad_per_px = 1e3 * electron_wavelength(300.0) / (32 * 0.2)
    assert defocus_angstrom(found["defocus_rad_per_px2"], mrad_per_px, 300.0) == pytest.approx(-25.0, abs=2.0)
    assert found["astigmatism_rad_per_px2"] * found["disk_radius_px"] ** 2 < 0.05
    assert "about -2" in probe_mismatch_note(found, mrad_per_px, 300.0)  # Å, overfocus negative


@pytest.mark.parametrize("shape, step, rotation, fastest", [((5, 7), 0.87, 0.0, "row"), ((6, 4), (0.8, 0.9), 30.0, "col"),
                                                            ((3, 3), 1.0, -120.0, "row")])
def test_rasters_are_found_in_position_lists(shape, step, rotation, fastest):
    positions = raster_positions(shape, step, rotation, fastest)
    found = raster_from_positions(positions + 3.5)  # (an offset does not matter)
    assert found["scan_shape"] == list(shape)
    again = raster_positions(found["scan_shape"], found["step_px"], found["rotation_deg"], found["fastest"])
    assert np.abs(again - positions).max() < 1e-9


def test_jittered_serpentine_and_single_line_scans_are_not_rasters(rng):
    positions = raster_positions((6, 6), 0.87)
    assert raster_from_positions(positions + rng.normal(0, 0.05, positions.shape)) is None
    serpentine = positions.reshape(6, 6, 2).copy()
    serpentine[1::2] = serpentine[1::2, ::-1]
    assert raster_from_positions(serpentine.reshape(-1, 2)) is None
    assert raster_from_positions(raster_positions((1, 9), 0.87)) is None


def save_scan(path, probe, coefficients, shape=(24, 24), dose=27882.0):
    positions = raster_positions(shape, STEP)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=3)
    scan = simulate_scan(truth, add_aberrations(probe, coefficients), positions, dose=dose, seed=3, progress=False)
    np.save(path, np.square(scan.amplitude).round().astype(np.float32))  # counts
    np.save(path.with_name("positions.npy"), positions)


def test_cli_notes_a_defocused_probe_and_writes_the_probe_it_implies(probe, tmp_path, capsys):
    save_scan(tmp_path / "scan.npy", probe, (0.02, 0.0, 0.02))
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--scan-shape", "24", "24", "--step", "0.87",
                 "--energy", "300", "--semi-angle", "25", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "the data's probe differs from the model's by defocus +1.1" in err and "train --like default" in err
    assert "reconstruct with --model probe-aware" in err  # packaged, for the default's probe
    # 25 mrad over the reference disk's 7.61 px: a = 0.02 rad/px² is Δf = a λ / (π s²) = +11.6 Å
    assert re.search(r"about \+1[12] Å of defocus", err)
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["probe_check"]["note"] and meta["probe_check"]["edge_phase_rad"] == pytest.approx(1.16, abs=0.1)
    estimate = np.load(tmp_path / "out" / "probe_estimate.npy")
    expected = add_aberrations(probe, meta["probe_check"]["coefficients"])
    assert np.allclose(estimate, expected)
    assert np.abs(np.angle(far(estimate) * np.conj(far(add_aberrations(probe, (0.02, 0.0, 0.02)))))[
        np.abs(far(probe)) > 0.5 * np.abs(far(probe)).max()]).max() < 0.15  # the probe put in, to 0.15 rad
    # the same positions from a file: found to be a raster, checked alike
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--positions", str(tmp_path / "positions.npy"),
                 "--out", str(tmp_path / "from-file")]) == 0
    meta = json.loads((tmp_path / "from-file" / "metadata.json").read_text())
    assert meta["raster_from_positions"]["scan_shape"] == [24, 24] and meta["probe_check"]["note"]
    # an estimate already there is not replaced unasked
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "probe_estimate.npy").write_bytes(b"mine")
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--scan-shape", "24", "24", "--step", "0.87",
                 "--out", str(tmp_path / "again")]) == 2
    assert "probe_estimate.npy" in capsys.readouterr().err
    assert (tmp_path / "again" / "probe_estimate.npy").read_bytes() == b"mine"


def test_cli_is_quiet_for_the_model_s_own_probe_and_skips_the_check_when_asked(probe, tmp_path, capsys):
    save_scan(tmp_path / "scan.npy", probe, (0.0, 0.0, 0.0))
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--scan-shape", "24", "24", "--step", "0.87",
                 "--out", str(tmp_path / "out")]) == 0
    assert "probe differs" not in capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["probe_check"]["note"] is None and meta["probe_check"]["edge_phase_rad"] < 0.2
    assert not (tmp_path / "out" / "probe_estimate.npy").exists()
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--scan-shape", "24", "24", "--step", "0.87",
                 "--no-probe-check", "--out", str(tmp_path / "unchecked")]) == 0
    assert "probe_check" not in json.loads((tmp_path / "unchecked" / "metadata.json").read_text())
    # a raster too coarse for the check (a 6 px step: few frequencies inside the disk's diameter) is reconstructed
    # with the check skipped, and why
    positions = raster_positions((16, 16), 6.0)
    scan = simulate_scan(twisted_hbn(required_object_shape(positions, 32), seed=3), probe, positions, seed=3,
                         progress=False)
    np.save(tmp_path / "coarse.npy", np.square(scan.amplitude).round().astype(np.float32))
    assert main(["reconstruct", str(tmp_path / "coarse.npy"), "--scan-shape", "16", "16", "--step", "6",
                 "--out", str(tmp_path / "coarse")]) == 0
    assert "usable frequencies" in json.loads((tmp_path / "coarse" / "metadata.json").read_text())["probe_check"][
        "skipped"]
    assert "note: the probe and step checks could not run" in capsys.readouterr().err  # (said, not only recorded)


def test_train_like_takes_the_recorded_recipe_and_the_options_given_win(tmp_path, probe, capsys):
    np.save(tmp_path / "probe.npy", add_aberrations(probe, (0.01, 0.0, 0.01)))
    assert main(["train", "--like", "default", "--probe", str(tmp_path / "probe.npy"), "--epochs", "1",
                 "--steps-per-epoch", "2", "--val-size", "8", "--out", str(tmp_path / "model")]) == 0
    record = json.loads((tmp_path / "model" / "model.json").read_text())["training"]
    assert record["arch"] == "compact" and record["corpus"]["lattice_spacing"] == [2.5, 16.0]  # the default's
    assert record["sigma_head"] == "detached" and record["dose"] == [10.0, 1000000.0]
    assert record["epochs"] == 1 and record["steps_per_epoch"] == 2  # given here
    assert "--like" not in record["command"] and "--probe " + str(tmp_path / "probe.npy") in record["command"]
    assert main(["train", "--like", str(tmp_path / "nowhere"), "--out", str(tmp_path / "other")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_train_init_from_starts_from_a_model_s_weights_of_the_same_architecture(tmp_path, probe, capsys):
    from deepphase.models.modelfile import load_model

    np.save(tmp_path / "probe.npy", add_aberrations(probe, (0.01, 0.0, 0.01)))
    common = ["train", "--like", "default", "--probe", str(tmp_path / "probe.npy"), "--epochs", "1",
              "--steps-per-epoch", "1", "--val-size", "8"]
    assert main([*common, "--init-from", "default", "--out", str(tmp_path / "warm")]) == 0
    assert main([*common, "--out", str(tmp_path / "cold")]) == 0
    default = load_model("default").network.state_dict()

    def distance(folder):  # relative distance of all weights from the default's
        state = load_model(folder).network.state_dict()
        return np.sqrt(sum(float(((state[k].float() - default[k].float()) ** 2).sum()) for k in default)
                       / sum(float((default[k].float() ** 2).sum()) for k in default))

    assert distance(tmp_path / "warm") < 0.01 < 0.5 < distance(tmp_path / "cold")  # one warm-up step moves little
    assert json.loads((tmp_path / "warm" / "model.json").read_text())["training"]["init_from"] == "default"
    assert main(["train", "--arch", "unet-small", "--init-from", "default", "--epochs", "1", "--steps-per-epoch", "1",
                 "--out", str(tmp_path / "mismatch")]) == 2
    assert "is a compact network" in capsys.readouterr().err


def test_a_defocus_spread_gives_each_training_pattern_a_probe_defocused_as_add_aberrations_does(probe):
    import torch

    from deepphase.data.phase_objects import CorpusConfig
    from deepphase.data.stream import TrainingStream
    from deepphase.errors import ValueRangeError
    from deepphase.physics.geometry import Geometry

    radius2 = model_disk(probe)["radius"] ** 2
    stream = TrainingStream(probe, Geometry(), CorpusConfig(), 27882.0, defocus_spread=1.1)
    edges = torch.tensor([0.9, -0.4, 0.0])
    for edge, got in zip(edges.tolist(), stream.defocused_probes(edges).numpy()):
        expected = add_aberrations(probe, (edge / radius2, 0.0, edge / radius2))
        assert np.abs(got - expected).max() < 1e-6 * np.abs(expected).max()
    # a batch draws one defocus per pattern within the spread and simulates with those probes
    drawn = []
    original = stream.defocused_probes
    stream.defocused_probes = lambda edge: drawn.append(edge) or original(edge)
    batch = stream.batch(64, torch.Generator().manual_seed(3))
    assert batch.amplitude.shape == (64, 1, 32, 32) and drawn[0].shape == (64,)
    assert drawn[0].abs().max() <= 1.1 and drawn[0].min() < -0.5 and drawn[0].max() > 0.5
    with pytest.raises(ValueRangeError, match="single patterns"):
        TrainingStream(probe, Geometry(), CorpusConfig(), 27882.0, neighbourhood=3, defocus_spread=1.0)


def test_a_scan_geometry_the_rotation_check_contradicts_holds_back_the_probe_note(probe, tmp_path, capsys):
    """The model's own probe, the scan rotated a quarter turn against the detector but given as 0°: the transfer
    then looks like a large defocus; the rotation note is what is said, the probe's is kept in metadata only."""
    positions = raster_positions((32, 32), STEP, 90.0)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=3)
    counts = np.square(simulate_scan(truth, probe, positions, seed=3, progress=False).amplitude).round()
    np.save(tmp_path / "scan.npy", counts.astype(np.float32))
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--scan-shape", "32", "32", "--step", "0.87",
                 "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "the DPC curl criterion finds the scan rotated" in err and "probe differs" not in err
    check = json.loads((tmp_path / "out" / "metadata.json").read_text())["probe_check"]
    assert check["note"] is None and "held back" in check["held_back"] and check["edge_phase_rad"] > 0.4
    assert not (tmp_path / "out" / "probe_estimate.npy").exists()
    # with --rotation auto the geometry is found, and the probe agrees
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--scan-shape", "32", "32", "--step", "0.87",
                 "--rotation", "auto", "--out", str(tmp_path / "auto")]) == 0
    check = json.loads((tmp_path / "auto" / "metadata.json").read_text())["probe_check"]
    assert check["note"] is None and "held_back" not in check and check["edge_phase_rad"] < 0.2


def test_a_fit_of_counting_noise_gives_no_note(probe):
    """A specimen too weak for its dose (twisted hBN at 2 % of its phase, 30 e/pattern): the spectrum is noise, the
    fit lands far out with a small scatter between the halves, and only the share explained tells it apart."""
    from deepphase.data.aberrations import MIN_EXPLAINED

    positions = raster_positions((24, 24), STEP)
    truth = 0.02 * twisted_hbn(required_object_shape(positions, 32), seed=0)
    amplitudes = simulate_scan(truth, probe, positions, dose=30, seed=0, progress=False).amplitude
    found = measure_probe_mismatch(amplitudes, (24, 24), probe, STEP)
    assert found["explained"] < MIN_EXPLAINED and found["edge_phase_rad"] > 3 * max(found["uncertainty_rad"], 0.4)
    assert probe_mismatch_note(found) is None
    assert probe_mismatch_note({**found, "explained": 0.05}) is not None  # (the same fit with a signal: noted)


def test_init_from_a_model_made_before_the_linear_gate_starts_the_gate_at_zero(tmp_path, capsys):
    # The packaged neighbourhood model predates the gate: fine-tuning it builds the gated network, which
    # starts as the model (gate zero: gain 1).
    import torch

    from deepphase.models import create_model
    from deepphase.models.modelfile import load_model
    from deepphase.physics.geometry import Geometry
    from deepphase.training.loop import TrainConfig, _initialise_from

    old = load_model("neighbourhood")
    assert "linear_gate" not in old.arch_config
    config = TrainConfig(arch="compact", neighbourhood=3, sigma_head="detached", init_from="neighbourhood")
    arch_config = config.arch_config(Geometry())
    assert arch_config["linear_gate"]
    network = create_model("compact", **arch_config)
    said = []
    _initialise_from(network, config, arch_config, said.append)
    assert said == ["starting from the weights of neighbourhood (linear_gate: new layers from zero)"]
    x = torch.rand(4, 9, 32, 32) * 30
    with torch.no_grad():
        assert torch.allclose(network.eval()(x), old.network.eval()(x), atol=1e-5)
    assert main(["train", "--like", "neighbourhood", "--init-from", "neighbourhood", "--epochs", "1",
                 "--steps-per-epoch", "1", "--val-size", "8", "--out", str(tmp_path / "warm")]) == 0
    capsys.readouterr()


@pytest.fixture(scope="module")
def blurred_scans(probe):
    """Twisted hBN through a 1 px source, 32×32 positions given as 0°, scanned at 0° and at half a turn: the
    divergence's skew points the wrong way on both (the honeycomb's first orders only survive the source)."""
    scans = {}
    for true in (0.0, 180.0):
        positions = raster_positions((32, 32), STEP, true)
        truth = twisted_hbn(required_object_shape(positions, 32), seed=0)
        scans[true] = simulate_scan(truth, probe, positions, seed=0, source_size_px=1.0, progress=False).amplitude
    return scans


def test_the_probe_tells_which_way_round_a_scan_runs_where_the_specimen_s_contrast_cannot(probe, blurred_scans):
    from deepphase.data.aberrations import scan_sense
    from deepphase.data.calibration import scan_rotation_from_patterns

    for true, amplitude in blurred_scans.items():
        skew_found = scan_rotation_from_patterns(amplitude, (32, 32), "row", given_deg=0.0)["rotation_deg"]
        assert abs(abs(skew_found - true) - 180.0) < 5.0  # the skew's sense is the wrong one
        sense = scan_sense(amplitude, (32, 32), probe, STEP, 0.0, "row")
        assert sense["decided"] and sense["half_turn"] == (true == 180.0), sense
        assert abs(sense["rotation_deg"] - (0.0 if true == 0.0 else 180.0)) < 1e-9
        assert max(sense["explained"]) > 1.5 * min(sense["explained"])
    # An aberration-free probe is its own conjugate: half a turn is the negated phase, exactly; nothing tells it.
    plain = probe_from_parameters(ProbeParameters(300, 25.0, 0, 0, 32, 0.2))
    positions = raster_positions((24, 24), STEP)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=1)
    amplitude = simulate_scan(truth, plain, positions, seed=1, noise=False, progress=False).amplitude
    sense = scan_sense(amplitude, (24, 24), plain, STEP, 0.0, "row")
    assert not sense["decided"] and sense["explained"][0] == pytest.approx(sense["explained"][1], rel=0.05)


@pytest.mark.slow  # (17–25 s on 2 cores: the default run stays under 10 minutes; -m slow runs it)
def test_the_cli_takes_the_scan_s_sense_from_the_probe(blurred_scans, tmp_path, capsys):
    for true, amplitude in blurred_scans.items():
        np.save(tmp_path / f"scan{true:.0f}.npy", amplitude)
        common = ["reconstruct", str(tmp_path / f"scan{true:.0f}.npy"), "--scan-shape", "32", "32", "--step", "0.87"]
        assert main([*common, "--out", str(tmp_path / f"given{true:.0f}")]) == 0
        err = capsys.readouterr().err
        check = json.loads((tmp_path / f"given{true:.0f}" / "metadata.json").read_text())["rotation_check"]
        assert check["sense"]["decided"]
        if true == 0.0:  # the skew alone said half a turn (the bug this guards against): nothing to say
            assert "half a turn" not in err and check["note"] is None
        else:
            assert "half a turn away" in err and "the probe's fit explains" in err
        assert main([*common, "--rotation", "auto", "--out", str(tmp_path / f"auto{true:.0f}")]) == 0
        found = json.loads((tmp_path / f"auto{true:.0f}" / "metadata.json").read_text())["rotation_found"]
        assert abs((found["rotation_deg"] - true + 180.0) % 360.0 - 180.0) < 5.0, found


@pytest.fixture(scope="module")
def coarser_scan(probe, tmp_path_factory):
    """Twisted hBN on a 40×40 raster at 1.1 px, rotated 20° (the row fastest), as amplitudes in a .npy."""
    positions = raster_positions((40, 40), 1.1, 20.0, "row")
    truth = twisted_hbn(required_object_shape(positions, 32), seed=7)
    scan = simulate_scan(truth, probe, positions, seed=7, progress=False)
    path = tmp_path_factory.mktemp("step") / "scan.npy"
    np.save(path, scan.amplitude)
    return path, scan, truth


def test_the_scan_step_is_found_from_the_patterns_and_a_wrong_one_noticed(probe, coarser_scan):
    from deepphase.data.aberrations import check_scan_step, measure_scan_step, step_note

    _, scan, _ = coarser_scan
    found = measure_scan_step(scan.amplitude, (40, 40), probe, 20.0, "row")
    assert found["decided"] and found["step_px"] == pytest.approx(1.1, rel=0.02)
    grid = found["search"]
    assert grid["steps_px"][int(np.argmax(grid["explained"]))] == pytest.approx(1.1, rel=0.15)  # one peak, there
    wrong = check_scan_step(scan.amplitude, (40, 40), probe, 0.87, 20.0, "row")
    assert wrong["searched"] and wrong["step_px"] == pytest.approx(1.1, rel=0.02)
    assert wrong["explained"] > 1.1 * wrong["explained_given"]
    assert re.search(r"fit a raster step of 1\.(09|10|11)\d* px better than the 0.87 px given", step_note(wrong))
    assert step_note(check_scan_step(scan.amplitude, (40, 40), probe, 1.1, 20.0, "row")) is None


def test_cli_finds_the_step_with_the_rotation_and_notes_a_step_given_wrongly(coarser_scan, tmp_path, capsys):
    import deepphase
    from deepphase.evaluation.metrics import correlation

    path, _, truth = coarser_scan
    raster = ["reconstruct", str(path), "--scan-shape", "40", "40"]
    assert main([*raster, "--step", "auto", "--rotation", "auto", "--out", str(tmp_path / "auto")]) == 0
    err = capsys.readouterr().err
    assert "scan step 1.0" in err and "what the step search saw" in err
    assert (tmp_path / "auto" / "step.png").stat().st_size > 10_000  # the share against the step, drawn
    meta = json.loads((tmp_path / "auto" / "metadata.json").read_text())
    assert meta["step_px"] == pytest.approx(1.1, rel=0.02) and meta["step_found"]["decided"]
    assert meta["rotation_deg"] == pytest.approx(20.0, abs=2.0)
    told = deepphase.reconstruct_file(path, scan_shape=(40, 40), step_px=1.1, rotation_deg=20.0, progress=False)
    found = np.load(tmp_path / "auto" / "phase.npy")
    r0, c0 = meta["origin_px"]
    assert correlation(found, truth[r0 : r0 + found.shape[0], c0 : c0 + found.shape[1]]) > \
        correlation(told.phase, told.region(truth)) - 0.02
    assert main([*raster, "--step", "0.87", "--rotation", "20", "--out", str(tmp_path / "wrong")]) == 0
    assert re.search(r"the scan step looks wrong: the patterns fit a raster step of 1\.(09|10|11)",
                     capsys.readouterr().err)
    assert json.loads((tmp_path / "wrong" / "metadata.json").read_text())["probe_check"]["step_note"]
    assert (tmp_path / "wrong" / "step.png").exists()  # the search a wrong step set off, drawn too
    assert main([*raster, "--step", "1.1", "--rotation", "20", "--out", str(tmp_path / "wrong"), "--overwrite"]) == 0
    assert not (tmp_path / "wrong" / "step.png").exists()  # right: nothing searched, the old figure removed
    assert main([*raster[:2], "--positions", str(tmp_path / "p.npy"), "--step", "auto", "--out",
                 str(tmp_path / "x")]) == 2
    assert main([*raster, "--step", "fast", "--out", str(tmp_path / "x")]) == 2
    assert "a positive number of pixels or 'auto'" in capsys.readouterr().err


def test_step_auto_refuses_patterns_that_do_not_tell_the_step(probe, tmp_path, capsys):
    """Vacuum (counting noise only): no clear peak over the steps searched, so no step is made up."""
    from deepphase.data.aberrations import measure_scan_step

    intensity = np.abs(far(probe)) ** 2
    counts = np.random.default_rng(5).poisson(1000 * intensity / intensity.sum(), size=(24 * 24, 32, 32))
    found = measure_scan_step(np.sqrt(counts), (24, 24), probe, 0.0, "row")
    assert not found["decided"]
    np.save(tmp_path / "vacuum.npy", counts.astype(np.float32))
    assert main(["reconstruct", str(tmp_path / "vacuum.npy"), "--scan-shape", "24", "24", "--step", "auto",
                 "--out", str(tmp_path / "out")]) == 2
    assert "the patterns do not tell the scan's step" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_step_note_names_a_probe_difference_only_where_it_is_one():
    """"a wrong step shows up as a probe difference (0.06 rad …)" read as a finding below the probe note's own
    threshold (the figures audit, s41)."""
    from deepphase.data.aberrations import MISMATCH_NOTE_RAD, step_note

    found = {"given_step_px": 0.87, "step_px": 1.005, "decided": True, "explained": 0.79, "explained_given": 0.73,
             "edge_phase_rad": 0.04}
    for at_given, said in ((0.06, False), (MISMATCH_NOTE_RAD + 0.1, True)):
        text = step_note({**found, "edge_phase_given_rad": at_given})
        assert text.startswith("the scan step looks wrong") and ("probe difference" in text) is said
