"""Bad input to train, demo, evaluate and the Python API: refused in one line, saying what was wrong and what
was expected, before any work, and nothing of the user's replaced."""

import numpy as np
import pytest

from deepphase.cli import main
from deepphase.errors import DeepPhaseError
from deepphase.physics import raster_positions, reference_probe

TINY = ["--arch", "compact", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--val-size", "8"]


def refused(argv, capsys, expected):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train") / "base"
    assert main([*(["train"] + TINY), "--out", str(folder)]) == 0
    return folder


def test_a_training_resumes_only_from_a_sound_checkpoint_for_its_own_probe(trained, tmp_path, capsys):
    import shutil

    more = ["train", *TINY[:2], "--epochs", "2", *TINY[4:], "--resume"]
    shutil.copytree(trained, tmp_path / "cut")
    (tmp_path / "cut" / "checkpoint.safetensors").write_bytes(b"")
    refused([*more, "--out", tmp_path / "cut"], capsys, "is not a readable training checkpoint")
    shutil.copytree(trained, tmp_path / "other")
    np.save(tmp_path / "conjugate.npy", np.conj(reference_probe()))
    refused([*more, "--probe", tmp_path / "conjugate.npy", "--out", tmp_path / "other"], capsys,
            "was started for another probe")
    shutil.copytree(trained, tmp_path / "done")
    refused(["train", *TINY, "--resume", "--out", tmp_path / "done"], capsys, "has trained 1 epochs already")
    refused(["train", *TINY[:6], "--batch-size", 6, *TINY[8:], "--epochs", 2, "--resume", "--out", tmp_path / "done"],
            capsys, "--batch-size: 4 then, 6 now")


def test_a_resume_needs_only_resume_and_keeps_what_started_the_training(trained, tmp_path, capsys):
    import json

    tuned = tmp_path / "tuned"
    assert main(["train", *map(str, TINY), "--init-from", str(trained), "--out", str(tuned)]) == 0
    assert "a flat phase's" in capsys.readouterr().out  # (the figure the validation loss is read against)
    (tuned / ".model.safetensors.x1y2.tmp").write_bytes(b"left by a kill -9")
    refused(["train", *TINY, "--resume", "--overwrite", "--out", tuned], capsys, "give one of them")
    more = ["train", *TINY[:2], "--epochs", "2", *TINY[4:], "--resume", "--out", str(tuned)]
    assert main(more) == 0  # without repeating --init-from
    record = json.loads((tuned / "model.json").read_text())
    training = record["training"]
    assert training["init_from"] == str(trained) and training["epochs_done"] == 2
    assert len(training["commands"]) == 2 and "--init-from" in training["commands"][0]
    assert training["command"] == training["commands"][1] and "--resume" in training["command"]
    assert record["validation_loss"] > 0 and record["validation_loss_flat_phase"] > 0
    assert not list(tuned.glob(".*.tmp"))


def test_train_replaces_no_file_of_the_users_and_refuses_useless_probes(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.safetensors").write_text("mine")
    refused(["train", *TINY, "--out", tmp_path / "mine"], capsys, "holds model.safetensors")
    assert (tmp_path / "mine" / "model.safetensors").read_text() == "mine"
    refused(["train", *TINY, "--energy", 300, "--semi-angle", 48, "--sampling", 0.2, "--out", tmp_path / "narrow"],
            capsys, "lights only 1 pixel")
    refused(["train", *TINY, "--device", "mps", "--out", tmp_path / "mps"], capsys, "expected 'auto', 'cpu' or 'cuda")
    np.savez(tmp_path / "scan.npz", amplitude=np.zeros((1, 32, 32)))
    refused(["train", *TINY, "--probe", tmp_path / "scan.npz", "--out", tmp_path / "npz"], capsys,
            "an .npz without a 'probe' array")
    assert not (tmp_path / "narrow").exists() and not (tmp_path / "npz").exists()
    # options that would do nothing
    refused(["train", *TINY, "--defocus", 50, "--out", tmp_path / "f"], capsys, "--defocus builds a probe from optics")
    refused(["train", *TINY, "--sigma-weight", 0.5, "--out", tmp_path / "f"], capsys, "it needs --sigma-head")
    refused(["train", *TINY, "--neighbourhood-step", 1.2, "--out", tmp_path / "f"], capsys, "needs --neighbourhood 3")


def test_train_refusals_name_its_options_and_python_callers_fields(tmp_path, capsys):
    from deepphase.data.phase_objects import CorpusConfig
    from deepphase.training.loop import TrainConfig, train

    for argv, expected in ((["--batch-size", 1], "batch-size: expected at least 2"),
                           (["--init-from", tmp_path / "none"], "init-from: '"),
                           (["--phase-range", 2, 1], "phase-range: expected 0 < MIN ≤ MAX"),
                           (["--lattice-spacing", 0.5, 2], "lattice-spacing: expected 1 ≤ MIN"),
                           (["--energy", 300, "--semi-angle", 20, "--sampling", 0.2, "--grid", 12],
                            "grid: the networks halve the pattern grid three times, so it must be a multiple of 8")):
        err = refused(["train", *TINY, *argv, "--out", tmp_path / "t"], capsys, expected)
        assert "_" not in err.split(":")[2], err  # (no Python field named)
        assert not (tmp_path / "t").exists()
    with pytest.raises(DeepPhaseError, match="^batch_size: expected a positive whole number"):
        TrainConfig(batch_size=0)
    with pytest.raises(DeepPhaseError, match="^phase_range: expected"):
        CorpusConfig(phase_range=(2.0, 1.0))
    with pytest.raises(DeepPhaseError, match="^config.batch_size: expected at least 2"):
        train(reference_probe(), tmp_path / "t", TrainConfig(batch_size=1), progress=False)
    with pytest.raises(DeepPhaseError, match="^config.init_from: '"):
        train(reference_probe(), tmp_path / "t", TrainConfig(init_from=str(tmp_path / "none")), progress=False)


def test_demo_and_evaluate_refuse_before_the_work(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "truth.npy").write_text("mine")
    refused(["demo", "--out", tmp_path / "d"], capsys, "holds truth.npy, which the demo would replace")
    assert (tmp_path / "d" / "truth.npy").read_text() == "mine"
    refused(["evaluate", "--methods", "idpc", "--specimens", "cameraman", "--doses", 1000, "--scan-shape", 24, 24,
             "--forward", "multislice", "--out", tmp_path / "e"], capsys, "no case to run")
    refused(["evaluate", "--methods", "idpc", "--sigma-scale", 2, "--out", tmp_path / "e"], capsys, "needs --ensemble")
    refused(["evaluate", "--methods", "idpc", "--forward", "phase-object", "--divide-source", "--out", tmp_path / "e"],
            capsys, "no case has a finite source to divide out")
    # (after the first method had run, in Python's words: the figures audit, s41)
    from deepphase.evaluation import harness

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation ran")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "run_evaluation", no_work)
        refused(["evaluate", "--methods", "deepphase", "--specimens", "cameraman", "--scan-shape", 12, 12, "--out",
                 tmp_path / "e"], capsys, "scan-shape: the scanned area every method covers is only 2×2 pixels")


def test_an_earlier_uncertainty_fit_is_replaced_only_when_asked(tmp_path, capsys):
    import shutil

    from deepphase.models.modelfile import packaged_model_path

    shutil.copytree(packaged_model_path("default"), tmp_path / "mine")
    before = (tmp_path / "mine" / "model.json").read_bytes()
    refused(["calibrate-uncertainty", "--model", tmp_path / "mine"], capsys,
            "already holds a fitted factor for the σ head")
    assert (tmp_path / "mine" / "model.json").read_bytes() == before


def test_the_python_api_refuses_what_it_cannot_use(tmp_path):
    from deepphase.data.calibration import calibrate
    from deepphase.data.simulate import simulate_scan
    from deepphase.models.modelfile import load_model, packaged_model_path
    from deepphase.physics.forward import MAX_DOSE
    from deepphase.training.loop import TrainConfig

    positions = raster_positions((4, 4), 0.87)
    phase = np.zeros((40, 40))
    with pytest.raises(DeepPhaseError, match="complex values"):
        simulate_scan(phase * 1j, reference_probe(), positions, progress=False)
    with pytest.raises(DeepPhaseError, match="at most 1e\\+12 electrons"):
        simulate_scan(phase, reference_probe(), positions, dose=10 * MAX_DOSE, progress=False)
    with pytest.raises(DeepPhaseError, match="kind: expected 'counts' or 'amplitude', got 'amplitudes'"):
        calibrate(np.ones((4, 64, 64)), "default", kind="amplitudes")
    from deepphase import reconstruct

    amplitudes = simulate_scan(phase, reference_probe(), positions, progress=False).amplitude
    import warnings

    for value, said in ((np.inf, "frame 3 contains NaN or Inf values"), (-1.0, "frame 3 has negative values")):
        bad = amplitudes.copy()
        bad[3, 5, 5] = value
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # (NumPy's "invalid value in subtract" came first)
            with pytest.raises(DeepPhaseError, match=said):
                reconstruct(bad, positions, progress=False)
    from deepphase import reconstruct_file

    for size in (0, 2.5):  # (0 became the default 16,384: the scale audit, s41)
        with pytest.raises(DeepPhaseError, match="^chunk_size: expected a positive whole number"):
            reconstruct_file(tmp_path / "scan.npy", chunk_size=size)
    for size in (2.5, 0, True):  # (2.5: "'float' object cannot be interpreted as an integer" from range())
        with pytest.raises(DeepPhaseError, match="^batch_size: expected a positive whole number"):
            reconstruct(amplitudes, positions, batch_size=size, progress=False, checks=False)
    for bad in ({"steps_per_epoch": 0}, {"val_size": 0}, {"lr": -1.0}, {"dose": (1000.0, 10.0)}):
        with pytest.raises(DeepPhaseError, match=next(iter(bad))):
            TrainConfig(**bad)
    import json
    import shutil

    shutil.copytree(packaged_model_path("seed-unet"), tmp_path / "m")
    np.save(tmp_path / "m" / "probe.npy", np.ones(5))
    with pytest.raises(DeepPhaseError, match="is not a finite 32×32 probe"):
        load_model(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    (tmp_path / "m" / "model.json").write_text(json.dumps({**meta, "probe_file": "../probe.npy"}))
    with pytest.raises(DeepPhaseError, match="expected a file name in the model folder"):
        load_model(tmp_path / "m")


def test_like_takes_a_recipe_without_the_model_it_was_started_from(tmp_path, capsys):
    # the packaged probe-aware model was fine-tuned from a folder on the machine that trained it
    assert main(["train", "--like", "probe-aware", *TINY[2:], "--out", str(tmp_path / "aware")]) == 0
    err = capsys.readouterr().err
    assert "--probe-aware 2.0" in err and "--init-from" not in err


def test_a_folder_named_like_a_packaged_model_is_said_to_hide_it(tmp_path, monkeypatch):
    """``train --out default`` then ``reconstruct --model default`` used the local folder without a word (correlation
    −0.02 where the packaged default gave 0.84); the folder is still used, and said to hide the packaged model."""
    import shutil
    import warnings

    from deepphase.errors import DeepPhaseNote
    from deepphase.models.modelfile import load_model

    shutil.copytree(load_model("seed-unet").folder, tmp_path / "default")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(DeepPhaseNote, match=r"'default' is the folder .* which hides the packaged model"):
        assert load_model("default").arch == "seed-unet"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeepPhaseNote)
        load_model("./default")  # named by a path: meant, nothing said


@pytest.mark.parametrize("edit, said", [({"dose": "high"}, "has dose 'high'"),
                                        ({"sampling": "0.2 A"}, "has sampling '0.2 A'"),
                                        ({"uncertainty": {"sigma_scale": "big"}}, "uncertainty.sigma_scale 'big'")])
def test_a_hand_edited_record_with_values_of_the_wrong_kind_is_refused_when_it_loads(edit, said, tmp_path):
    import json
    import shutil

    from deepphase.errors import InputFileError
    from deepphase.models.modelfile import load_model

    shutil.copytree(load_model("default").folder, tmp_path / "m")
    record = json.loads((tmp_path / "m" / "model.json").read_text())
    (tmp_path / "m" / "model.json").write_text(json.dumps({**record, **edit}))
    with pytest.raises(InputFileError, match=said):
        load_model(tmp_path / "m")
