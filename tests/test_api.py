"""The Python API as a notebook uses it: entry points, the result's record, files closed, plots left alone."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

import deepphase
from deepphase.data.io import AmplitudeView
from deepphase.data.simulate import required_object_shape
from deepphase.data.specimens import twisted_hbn
from deepphase.errors import ShapeError
from deepphase.evaluation.metrics import correlation


def test_the_main_entry_points_are_found_on_the_package_without_importing_torch_first():
    probe = "import sys, deepphase; print('torch' in sys.modules, callable(deepphase.reconstruct), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]  # loaded on first use
    for name in deepphase.__all__:
        assert getattr(deepphase, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'reconstrut'"):
        deepphase.reconstrut  # noqa: B018


def test_a_result_says_which_model_made_it_and_cuts_the_truth_to_its_own_area(probe, tmp_path):
    positions = deepphase.raster_positions((24, 24), 0.87, rotation_deg=30)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=1)
    scan = deepphase.simulate_scan(truth, probe, positions, seed=1, progress=False)
    rec = deepphase.reconstruct(scan.amplitude, positions, "probe-aware", progress=False)
    assert rec.model_info["name"] == "probe-aware" and rec.model_info["arch"] == "compact"
    assert rec.model_info["folder"].endswith("probe-aware")
    r0, c0 = rec.origin_px
    np.testing.assert_array_equal(rec.region(truth), truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]])
    finite = np.isfinite(rec.phase)  # a rotated scan leaves corners no probe reached
    assert not finite.all() and correlation(rec.phase[finite], rec.region(truth)[finite]) > 0.9
    assert repr(rec).startswith("Reconstruction(phase ") and "'probe-aware'" in repr(rec) and len(repr(rec)) < 200
    with pytest.raises(ShapeError, match="does not reach"):
        rec.region(truth[:10, :10])
    assert deepphase.load_model("default", device="auto").name == "default"


def test_scan_data_closes_its_file_and_says_its_frame_order(tmp_path, probe):
    positions = deepphase.raster_positions((6, 5), 0.87, fastest="col")
    scan = deepphase.simulate_scan(twisted_hbn(required_object_shape(positions, 32)), probe, positions, progress=False)
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f["data/frames"] = scan.amplitude.reshape(6, 5, 32, 32)
    with deepphase.load_scan(tmp_path / "scan.h5") as data:
        assert data.scan_shape == (6, 5) and data.fastest == "col"
        np.testing.assert_array_equal(data.frames[0:30], scan.amplitude)  # frame order = the "col" raster's
    with h5py.File(tmp_path / "scan.h5", "a") as f:  # closed: it opens for writing again
        f["data/more"] = np.zeros(3)


def test_drawing_the_outputs_leaves_the_users_matplotlib_backend_alone(tmp_path, probe):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # stands for a notebook's inline backend, which "Agg" used to replace
    try:
        positions = deepphase.raster_positions((16, 16), 0.87)
        scan = deepphase.simulate_scan(twisted_hbn(required_object_shape(positions, 32)), probe, positions,
                                       progress=False)
        rec = deepphase.reconstruct(AmplitudeView(scan.amplitude, "amplitude"), positions, progress=False)
        deepphase.write_outputs(rec, tmp_path / "out", {"title": "a test"})
        assert (tmp_path / "out" / "phase.png").stat().st_size > 5_000
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)


def test_counts_given_where_amplitudes_belong_are_warned_about(probe):
    positions = deepphase.raster_positions((16, 16), 0.87)
    scan = deepphase.simulate_scan(twisted_hbn(required_object_shape(positions, 32)), probe, positions, progress=False)
    counts = np.round(scan.amplitude.astype(np.float64) ** 2)
    with pytest.warns(UserWarning, match=r"whole numbers, as counts are: .*pass np.sqrt\(counts\)"):
        deepphase.reconstruct(counts, positions, progress=False)
    rec = deepphase.reconstruct(AmplitudeView(counts, "counts"), positions, progress=False)
    assert rec.processing["dose_note"] is None


def test_reconstruct_file_makes_what_the_command_makes_and_tells_what_to_check(probe, tmp_path, capsys):
    from deepphase.cli import main
    from deepphase.wording import in_api_words
    from deepphase.errors import DeepPhaseNote

    positions = deepphase.raster_positions((24, 24), 0.87, rotation_deg=30)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=2)
    np.save(tmp_path / "scan.npy", deepphase.simulate_scan(truth, probe, positions, seed=2, progress=False).amplitude)
    raster = {"scan_shape": (24, 24), "step_px": 0.87}

    with pytest.warns(DeepPhaseNote, match="rotated 30"):  # given 0°: the data say otherwise
        told = deepphase.reconstruct_file(tmp_path / "scan.npy", **raster, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.npy"]  # no folder given: nothing written
    assert told.notes and "rotated 30" in told.notes[0]
    # (told in the call's words, recorded in the check's)
    assert "rotation_deg='auto' uses what it finds" in told.notes[0] and "--" not in told.notes[0]
    assert in_api_words(told.metadata["rotation_check"]["note"]) == told.notes[0]

    messages = []
    rec = deepphase.reconstruct_file(tmp_path / "scan.npy", tmp_path / "api", **raster, rotation_deg=30,
                                     progress=False, log=lambda text, is_note: messages.append((text, is_note)))
    assert not rec.notes and not [m for m in messages if m[1]]
    as_array = deepphase.reconstruct_file(tmp_path / "scan.npy", scan_shape=np.array([24, 24]), step_px=0.87,
                                          rotation_deg=30, progress=False)  # (a ValueError on its truth value)
    np.testing.assert_array_equal(as_array.phase, rec.phase)
    assert correlation(rec.phase, rec.region(truth)) > correlation(told.phase, told.region(truth)) + 0.2
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--scan-shape", "24", "24", "--step", "0.87",
                 "--rotation", "30", "--out", str(tmp_path / "cli")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "api" / "phase.npy"), np.load(tmp_path / "cli" / "phase.npy"))
    api, cli = (json.loads((tmp_path / name / "metadata.json").read_text()) for name in ("api", "cli"))
    assert api["command"].startswith("deepphase.reconstruct_file(") and cli["command"].startswith("deepphase ")
    assert "scan_shape=(24, 24), step_px=0.87, rotation_deg=30" in api["command"]  # the options given, no others
    assert "log=" not in api["command"] and "engine=" not in api["command"]
    for meta in (api, cli):
        del meta["probe_check"]["wall_s"]
    different = {key for key in api.keys() | cli.keys() if api.get(key) != cli.get(key)}
    assert different <= {"command", "timings", "processing"}, different
    assert api["scan_shape"] == [24, 24] and api["rotation_deg"] == 30 and api["notes"] == []
    # the run's time includes its checks (it was the network's and the stitcher's alone), and says what computed it
    import torch

    timings = api["timings"]
    assert timings["checks_s"] > 0
    assert timings["total_s"] >= timings["checks_s"] + timings["predict_s"] + timings["stitch_s"]
    assert api["versions"]["torch"] == torch.__version__ and api["versions"]["deepphase"] == deepphase.__version__
    # From a git checkout, which commit (the version is 0.1.0 for all of them: the evaluation audit, s41)
    root = Path(deepphase.__file__).resolve().parent.parent
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        revision = api["versions"]["deepphase_git_revision"]
        assert head.startswith(revision.removesuffix("-dirty")) and len(revision.removesuffix("-dirty")) >= 12


def test_reconstruct_file_refuses_what_it_cannot_do_before_reading_the_file(tmp_path):
    from deepphase.errors import DeepPhaseError

    missing = tmp_path / "nothing-here.npy"
    for options, match in (({"kind": "intensity"}, "^kind: expected 'counts', 'amplitude'"),
                           ({"calibration": True}, "calibration: expected 'auto', 'on' or 'off'"),
                           ({"step_px": -1.0}, "^step_px: expected a positive"),
                           ({"uncertainty": 2.5}, "uncertainty: expected a number of dropout samples"),
                           ({"resume": True}, "resume: needs the output folder"),
                           ({"fastest": "column"}, "fastest: expected 'row', 'col'"),
                           ({"scan_shape": 32}, "scan_shape: expected \\(rows, cols\\)"),
                           ({"scan_shape": "32 32"}, "scan_shape: expected \\(rows, cols\\)"),
                           ({"gain": "2"}, "gain: expected a number"),
                           ({"step_px": True}, "^step_px: expected a positive raster step"),
                           ({"step_px": "auto", "positions": np.zeros((4, 2))}, "positions are given: drop step_px")):
        with pytest.raises(DeepPhaseError, match=match):
            deepphase.reconstruct_file(missing, **options)
    with pytest.raises(DeepPhaseError) as refused:  # the command's words, in the call's
        deepphase.reconstruct_file(missing, libertem=True, engine="eager", stitching="least-squares")
    assert str(refused.value) == ("libertem: stitching='least-squares' not available with libertem=True (LiberTEM's "
                                  "workers read the file a partition at a time, run the pairwise stitcher's "
                                  "reductions and choose the device); drop libertem=True for them")
    with pytest.raises(DeepPhaseError, match="for arrays in memory use deepphase.reconstruct"):
        deepphase.reconstruct_file(np.zeros((4, 32, 32)))
    assert not list(tmp_path.iterdir())


def test_reconstruct_takes_the_uncertainty_as_reconstruct_file_and_the_command_do(probe):
    from deepphase.errors import ValueRangeError

    positions = deepphase.raster_positions((8, 8), 0.87)
    scan = deepphase.simulate_scan(twisted_hbn(required_object_shape(positions, 32)), probe, positions, progress=False)
    head = deepphase.reconstruct(scan.amplitude, positions, uncertainty="head", progress=False)
    same = deepphase.reconstruct(scan.amplitude, positions, sigma_head=True, progress=False)
    np.testing.assert_array_equal(head.uncertainty, same.uncertainty)
    assert deepphase.reconstruct(scan.amplitude, positions, uncertainty=2, progress=False).processing[
        "uncertainty"]["method"].startswith("Monte Carlo dropout")
    for wrong, match in ((1, "at least 2|≥ 2"), ("dropout", "'head' or None"), (True, "'head' or None")):
        with pytest.raises(ValueRangeError, match=match):
            deepphase.reconstruct(scan.amplitude, positions, uncertainty=wrong, progress=False)
    with pytest.raises(ValueRangeError, match="not both"):
        deepphase.reconstruct(scan.amplitude, positions, uncertainty="head", uncertainty_samples=4, progress=False)


def test_the_commands_messages_are_put_in_the_calls_words():
    """in_api_words: an option with a placeholder, a choice or a number becomes its keyword with that value, a
    switch its keyword = True (or what it sets), ``--scan-shape ROWS COLS`` a tuple; other commands' options and
    words after an option that are not its value are left alone."""
    from deepphase.wording import in_api_words

    for said, meant in (
            ("give --scan-shape ROWS COLS --step S", "give scan_shape=(ROWS, COLS) step_px=S"),
            ("drop --step auto", "drop step_px='auto'"),
            ("(--input amplitude, or leave --input to find it)", "(kind='amplitude', or leave kind to find it)"),
            ("use --engine cuda-graphs or --device cuda", "use engine='cuda-graphs' or device='cuda'"),
            ("pass --overwrite to start again", "pass overwrite=True to start again"),
            ("run the same command with --resume", "run the same call with resume=True"),
            ("--no-probe-check skips it, --no-calibration too", "probe_check=False skips it, calibration='off' too"),
            ("give the angle (--rotation DEG) or --rotation 12.5", "give the angle (rotation_deg=DEG) or rotation_deg=12.5"),
            ("--step in pixels", "step_px in pixels"),
            ("deepphase train --probe-aware --dose MIN MAX", "deepphase train --probe-aware --dose MIN MAX"),
            ("`deepphase train --like '/tmp/my m' --out MODEL` or --step auto",
             "`deepphase train --like '/tmp/my m' --out MODEL` or step_px='auto'"),
            ("saved in '/tmp/a --resume b/--out': --resume", "saved in '/tmp/a --resume b/--out': resume=True"),
            ("a--step", "a--step")):
        assert in_api_words(said) == meant, said


def test_every_entry_point_called_from_python_names_its_own_keywords_and_the_command_its_options(probe, tmp_path,
                                                                                                capsys):
    """The same message reaches Python in the called function's keywords (an outer entry point's words win over
    an inner one's), and the command line in its options."""
    from deepphase.cli import main
    from deepphase.training.loop import TRAIN_KEYWORDS
    from deepphase.wording import in_api_words

    positions = deepphase.raster_positions((8, 8), 0.87)
    scan = deepphase.simulate_scan(np.zeros(required_object_shape(positions, 32)), probe, positions, dose=1e4,
                                   seed=0, progress=False)
    rec = deepphase.reconstruct(scan.amplitude, positions, progress=False)
    out = tmp_path / "out"
    deepphase.write_outputs(rec, out, {})
    with pytest.raises(deepphase.DeepPhaseError, match=r"out_dir: .* already holds .*pass overwrite=True$"):
        deepphase.write_outputs(rec, out, {})
    with pytest.raises(deepphase.DeepPhaseError, match=r"\(deepphase\.calibrate finds the bright-field disk"):
        deepphase.reconstruct(np.ones((64, 48, 48), np.float32), positions, progress=False)
    with pytest.raises(deepphase.DeepPhaseError, match=r"^amplitudes: frame 3 contains NaN"):
        bad = scan.amplitude.copy()
        bad[3, 0, 0] = np.nan
        deepphase.reconstruct(bad, positions, progress=False)
    with pytest.raises(deepphase.DeepPhaseError, match=r"^shape: expected \(rows, cols\)"):
        deepphase.raster_positions(32, 0.87)
    assert in_api_words("give --epochs more than that; lower --lr, or --overwrite", TRAIN_KEYWORDS | {
        "overwrite": ("overwrite", True)}) == "give config.epochs more than that; lower config.lr, or overwrite=True"
    np.save(tmp_path / "scan.npy", scan.amplitude.reshape(8, 8, 32, 32) ** 2)
    # the command: its options, whoever raised the error inside it
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--out", str(out), "--step", "0.87", "--input",
                 "counts"]) == 2
    assert "already holds phase.npy, phase.tif, phase.emd, phase.png, metadata.json; choose another folder or pass " \
           "--overwrite" in capsys.readouterr().err
    assert main(["train", "--like", str(tmp_path / "none"), "--out", str(tmp_path / "m")]) == 2  # (before the work)
    assert "error: model: " in capsys.readouterr().err
    with pytest.raises(deepphase.DeepPhaseError, match=r"pass overwrite=True"):  # reconstruct_file's, not reconstruct's
        deepphase.reconstruct_file(tmp_path / "scan.npy", out, step_px=0.87)


def test_reconstruct_checks_the_positions_it_is_given_and_says_what_is_wrong_with_them(probe, tmp_path):
    """Positions in (col, row) order, turned or in Å gave a poor image without a word; the checks that
    reconstruct_file runs on a file now run on arrays: a note each (a DeepPhaseNote warning, kept in ``notes``,
    the findings in ``metadata``, written by write_outputs), none for the right positions."""
    positions = deepphase.raster_positions((24, 24), 0.87)
    truth = twisted_hbn(required_object_shape(positions, 32), seed=1)
    scan = deepphase.simulate_scan(truth, probe, positions, dose=1e4, seed=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", deepphase.DeepPhaseNote)  # the right positions: not a word
        right = deepphase.reconstruct(scan.amplitude, positions, progress=False)
    assert right.notes == [] and right.metadata["scan_checks"]["rotation_check"]["note"] is None
    assert "skipped" not in right.metadata["scan_checks"]["probe_check"]["step_check"]  # (the step checked too)
    from deepphase.physics import flip_patterns

    for amplitudes, wrong, said in (
            (scan.amplitude, positions[:, ::-1], "rotated 90.*mirrored.*check the positions: their rotation"),
            (scan.amplitude, deepphase.raster_positions((24, 24), 0.87, rotation_deg=180), "half a turn away"),
            (scan.amplitude, positions * 0.2, r"a raster of 0\.174 px steps, finer than scans are made.*check the "
                                              r"positions' scale"),
            (scan.amplitude, positions * 0.5, r"fit a raster step of 0\.8.* px better than the 0\.435 px given.*check "
                                              r"the positions' scale"),
            (flip_patterns(scan.amplitude), positions, r"mirrored .*\(deepphase\.physics\.flip_patterns\(amplitudes\); "
                                                        r"or the scan's rows and columns swapped: check fastest first")):
        with pytest.warns(deepphase.DeepPhaseNote, match=said):
            rec = deepphase.reconstruct(amplitudes, wrong, progress=False)
        assert len(rec.notes) == 1 and "--" not in rec.notes[0], rec.notes
    written = deepphase.write_outputs(rec, tmp_path / "out")
    assert written["notes"] == rec.notes and "probe_check" in written["scan_checks"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", deepphase.DeepPhaseNote)
        unchecked = deepphase.reconstruct(scan.amplitude, positions * 0.2, progress=False, checks=False)
    assert unchecked.metadata == {} and unchecked.notes == []
    with pytest.warns(deepphase.DeepPhaseNote, match=r"look like amplitudes.*pass the amplitudes as they are"):
        deepphase.reconstruct(AmplitudeView(scan.amplitude[:64], "counts"), positions[:64], progress=False)


def test_common_slips_from_python_are_named_not_raised_as_python_errors(probe, tmp_path, monkeypatch):
    """What a notebook user gets wrong (audit of session 33): each a DeepPhaseError naming the argument and what
    was expected, or done as meant (one name where a list was expected)."""
    from deepphase.evaluation.harness import evaluate
    from deepphase.physics.probe import electron_wavelength
    from deepphase.training.loop import train

    slips = [
        (lambda: electron_wavelength(300_000), r"energy: expected the beam energy in keV .*in eV\? 300000 eV is 300 keV"),
        (lambda: AmplitudeView(np.ones((2, 4, 4)), "count"), "kind: expected 'counts' or 'amplitude', got 'count'"),
        (lambda: deepphase.load_model(object()), "path: expected a packaged model's name"),
        (lambda: deepphase.simulate_scan(np.zeros((40, 40)), probe, np.zeros((1, 2)), seed=None),
         "seed: expected a whole number"),
        (lambda: evaluate(methods="mine", out_dir=tmp_path / "e"), r"methods: unknown mine;.*register_method"),
        (lambda: train(probe, tmp_path / "m", {"epochs": 1}), "config: expected a TrainConfig, got dict"),
        (lambda: deepphase.raster_positions((4, 4), 0.87, rotation_deg="auto"), "rotation_deg: expected an angle"),
    ]
    h5 = tmp_path / "frames.h5"
    with h5py.File(h5, "w") as f:
        f["frames"] = np.ones((4, 8, 8), np.float32)
    slips.append((lambda: deepphase.load_scan(h5, scan_shape=(2, 2)), r"scan_shape: \.h5 files give their own"))
    for call, said in slips:
        with pytest.raises(deepphase.DeepPhaseError, match=said):
            call()
    (tmp_path / "seed").mkdir()  # a folder of the user's, named as a packaged model
    monkeypatch.chdir(tmp_path)
    with pytest.raises(deepphase.DeepPhaseError, match="has no model.json.*hides the packaged model 'seed'"):
        deepphase.load_model("seed")
    positions = deepphase.raster_positions((6, 6), 0.87)
    scan = deepphase.simulate_scan(np.zeros(required_object_shape(positions, 32)), probe, positions, dose=1e4,
                                   progress=False)
    rec = deepphase.reconstruct(scan.amplitude, positions, ensemble="unet-small", progress=False)  # one, named
    assert rec.processing["ensemble"] == ["default", "unet-small"]
    for metadata, sampling, said in (([1], None, "metadata: expected a dict"), (None, -1.0, "sampling: expected a positive")):
        with pytest.raises(deepphase.DeepPhaseError, match=said):
            deepphase.write_outputs(rec, tmp_path / "never", metadata, sampling=sampling)
    assert not (tmp_path / "never").exists()


def test_every_public_function_documents_its_parameters_and_what_it_returns_numpy_style():
    """deepphase.reconstruct had no Returns section, write_outputs no Parameters (the outputs audit, s40)."""
    import inspect

    import deepphase

    functions = {name: getattr(deepphase, name) for name in deepphase.__all__
                 if inspect.isfunction(getattr(deepphase, name))}
    assert {"reconstruct", "reconstruct_file", "write_outputs", "load_model", "simulate_scan"} <= set(functions)
    lacking = {name: [part for part in ("Parameters\n----------", "Returns\n-------")
                      if part not in inspect.getdoc(function)] for name, function in functions.items()}
    assert {name: parts for name, parts in lacking.items() if parts} == {}


def test_the_figures_show_the_uncertainty_map_and_the_montage_has_its_scales(tmp_path, monkeypatch, probe):
    """uncertainty.npy had no figure, and the montage's difference panels had no colour bar to read them in rad
    (the outputs audit, s40)."""
    import deepphase
    from deepphase.evaluation import harness
    from deepphase.reconstruction import pipeline

    drawn = {}
    monkeypatch.setattr(pipeline, "save_png", lambda fig, path, **_: drawn.setdefault(Path(path).name, fig))
    monkeypatch.setattr(harness, "save_png", lambda fig, path, **_: drawn.setdefault(Path(path).name, fig))
    positions = deepphase.raster_positions((6, 6), 0.87)
    scan = deepphase.simulate_scan(np.zeros(required_object_shape(positions, 32)), probe, positions, dose=1e4,
                                   progress=False)
    rec = deepphase.reconstruct(scan.amplitude, positions, uncertainty="head", progress=False)
    deepphase.write_outputs(rec, tmp_path / "rec")
    labels = [ax.get_ylabel() for ax in drawn["phase.png"].axes]
    assert "σ (rad, one standard deviation)" in labels and "phase (rad, mean removed)" in labels
    truth = np.random.default_rng(0).normal(size=(8, 8))
    images = {("flat", 1e4, "truth"): truth, ("flat", 1e4, "a"): truth + 0.1, ("flat", 1e4, "b"): 2 * truth}
    harness._montage(images, ["flat"], 1e4, ["a", "b"], tmp_path / "montage.png")
    labels = [ax.get_ylabel() for ax in drawn["montage.png"].axes]
    assert labels.count("phase (rad)") == 1 and labels.count("difference (rad)") == 1


def test_counts_in_a_detectors_units_read_as_amplitudes_are_noted(probe, tmp_path, capsys):
    """Counts × 1.7 as float32 passed as amplitudes gave 0.927 against 0.978, with no word from Python and only a
    disk note from the command (the outputs audit, s40). Square roots of counts are no multiples of one step."""
    from deepphase.cli import main

    positions = deepphase.raster_positions((8, 8), 0.87)
    scan = deepphase.simulate_scan(twisted_hbn(required_object_shape(positions, 32), seed=1), probe, positions,
                                   seed=1, progress=False)
    gained = (np.square(scan.amplitude.astype(np.float64)).round() * 1.7).astype(np.float32)
    said = "the patterns are whole multiples of 1.7, as counts in a detector's units are"
    for data, noted in ((gained, True), (scan.amplitude, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            deepphase.reconstruct(data, positions, progress=False)
        assert any(said in str(w.message) for w in caught) == noted
    np.save(tmp_path / "gained.npy", gained.reshape(8, 8, 32, 32))
    common = ["reconstruct", str(tmp_path / "gained.npy"), "--step", "0.87", "--no-probe-check"]
    assert main([*common, "--input", "amplitude", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert err.count(said) == 1 and "--input counts --gain 1.7?" in err
    assert main([*common, "--out", str(tmp_path / "b")]) == 2
    assert "(they are whole multiples of 1.7, as counts in a detector's units are: --input counts --gain 1.7?)" in \
        capsys.readouterr().err


def test_count_quantum_finds_a_gain_and_nothing_in_amplitudes_or_resampled_counts(probe, tmp_path, capsys):
    """Resampled (calibrated) patterns, whose smallest value is tiny, were taken for multiples of it: a false note on
    every calibrated run (the claims audit, s40)."""
    from deepphase.cli import main
    from deepphase.data.io import count_quantum

    rng = np.random.default_rng(0)
    for mean in (5, 150, 3000):
        counts = rng.poisson(mean, (16, 32, 32)).astype(np.float64)
        assert count_quantum(counts) == 1.0
        # counts with float32 rounding are counts ("a gain of 1 per electron?" before: the evaluation audit, s41)
        assert count_quantum((counts * 1.00001).astype(np.float32)) == 1.0
        assert count_quantum((counts * 1.7).astype(np.float32)) == pytest.approx(1.7, rel=1e-6)
        assert count_quantum(np.sqrt(counts).astype(np.float32)) is None
        assert count_quantum((counts * 1.7 + rng.normal(0, 0.01, counts.shape)).astype(np.float32)) is None
    assert main(["simulate", "--scan-shape", "8", "8", "--out", str(tmp_path / "s.npz")]) == 0
    capsys.readouterr()
    assert main(["reconstruct", str(tmp_path / "s.npz"), "--calibrate", "--no-probe-check",
                 "--out", str(tmp_path / "r")]) == 0
    assert "whole multiples" not in capsys.readouterr().err


def test_what_python_writes_records_what_was_reconstructed(probe, tmp_path):
    """metadata.json written from Python held no word of the patterns or positions (the outputs audit, s40)."""
    import hashlib

    positions = deepphase.raster_positions((5, 6), 0.87)
    scan = deepphase.simulate_scan(np.zeros(required_object_shape(positions, 32)), probe, positions, dose=1e4,
                                   progress=False)
    rec = deepphase.reconstruct(scan.amplitude, positions, progress=False)
    written = deepphase.write_outputs(rec, tmp_path / "rec")["processing"]
    assert written["patterns"] == 30 and written["pattern_shape"] == [32, 32]
    assert written["positions_sha256"] == hashlib.sha256(np.ascontiguousarray(positions).tobytes()).hexdigest()


def test_the_phase_figure_shares_one_colour_range_and_says_what_sigma_is():
    """The demo's reconstruction and truth each had their own colour range (cameraman: −0.50…0.75 against −0.45…0.50
    rad: equal colours were different phases), one edge pixel of σ flattened the rest of its map, and the σ panel
    did not say whether it was a σ head, dropout or an ensemble's spread (the figures audit, s41)."""
    from deepphase.reconstruction.pipeline import colour_ranges, uncertainty_source

    rng = np.random.default_rng(0)
    phase, truth = rng.normal(0, 0.3, (40, 40)), rng.normal(0, 0.1, (40, 40))
    sigma = np.full((40, 40), 0.03)
    sigma[0, 0] = 0.3  # an edge pixel
    shared, sigma_range = colour_ranges([phase, truth], sigma)
    assert shared["vmin"] == pytest.approx(np.percentile(np.r_[phase.ravel(), truth.ravel()], 0.5))
    assert shared["vmax"] > 3 * truth.std()  # (the truth's own range would be a third as wide)
    assert sigma_range == {"vmin": 0.0, "vmax": pytest.approx(0.03)}
    assert uncertainty_source({"method": "σ head", "sigma_scale": 1.1734, "calibrated": True}) == "σ head × 1.17"
    assert uncertainty_source({"method": "σ head", "sigma_scale": 1.0, "calibrated": False}) == \
        "σ head × 1, not calibrated"
    assert uncertainty_source({"method": "ensemble", "samples": 2, "sigma_scale": 1.0, "note": "... (not calibrated)"}) \
        == "spread of 2 models × 1, not calibrated"
