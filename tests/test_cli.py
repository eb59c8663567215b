"""The command line end to end on tiny data, and its answers to bad input."""

import json
import os

import h5py
import numpy as np
import pytest

from deepphase.cli import main
from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.data.specimens import twisted_hbn
from deepphase.physics import raster_positions


@pytest.fixture(scope="module")
def tiny_scan(probe, tmp_path_factory):
    """A 12×12 raster at the seed's step and dose, as (N, 32, 32) amplitudes with positions and truth."""
    folder = tmp_path_factory.mktemp("scan")
    positions = raster_positions((12, 12), 0.87, fastest="row")
    truth = twisted_hbn(required_object_shape(positions, 32))
    scan = simulate_scan(truth, probe, positions, seed=1, progress=False)
    np.save(folder / "amplitude.npy", scan.amplitude)
    np.save(folder / "counts.npy", np.round(scan.amplitude.astype(np.float64) ** 2))
    np.save(folder / "positions.npy", positions)
    return folder, scan


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def reconstruct_tiny(tiny_scan, out, capsys, *options):
    """``deepphase reconstruct`` of the tiny scan's amplitudes and positions into ``out``."""
    folder, _ = tiny_scan
    return run(["reconstruct", folder / "amplitude.npy", "--positions", folder / "positions.npy", *options,
                "--out", out], capsys)


def test_simulate_then_reconstruct_round_trip(tmp_path, capsys):
    data = tmp_path / "scan.npz"
    code, out, err = run(["simulate", "--scan-shape", 10, 10, "--out", data], capsys)
    assert code == 0, err
    with np.load(data) as f:
        assert f["amplitude"].shape == (100, 32, 32) and f["positions"].shape == (100, 2)
        params = json.loads(str(f["parameters"]))
    assert params["dose_electrons_per_pattern"] == pytest.approx(27882, abs=1)
    code, out, err = run(["reconstruct", data, "--out", tmp_path / "rec"], capsys)
    assert code == 0, err
    phase = np.load(tmp_path / "rec" / "phase.npy")
    meta = json.loads((tmp_path / "rec" / "metadata.json").read_text())
    assert phase.dtype == np.float32 and phase.ndim == 2 and np.isfinite(phase).all()
    assert meta["n_patterns"] == 100 and meta["input"] == "amplitude" and "correlation_with_truth" in meta
    assert (tmp_path / "rec" / "phase.png").stat().st_size > 1000
    assert not [p for p in (tmp_path / "rec").iterdir() if p.name.startswith(".")]  # no staging left behind


def test_the_pixel_size_a_simulation_records_reaches_the_outputs_and_a_different_one_given_is_noted(tmp_path, capsys,
                                                                                                    monkeypatch):
    """``simulate --sampling`` with a probe file was dropped without a word and the outputs were in pixels; now
    the .npz records it, reconstruct writes the files at it, and a --pixel-size that differs is noted. ``train
    --sampling`` with a probe file records it in the model, which then refuses a scan recorded at another (the file's
    pixel size was never compared with the model's)."""
    data = tmp_path / "scan.npz"
    assert run(["simulate", "--scan-shape", 10, 10, "--sampling", 0.2, "--out", data], capsys)[0] == 0
    code, _, err = run(["reconstruct", data, "--out", tmp_path / "own"], capsys)
    assert code == 0 and "pixel size" not in err, err
    meta = json.loads((tmp_path / "own" / "metadata.json").read_text())
    assert meta["pixel_size_angstrom"] == meta["processing"]["pixel_size_angstrom"] == 0.2  # (processing said null)
    assert meta["processing"]["pixel_size_from"] == "file's"
    assert meta["data_file"]["path"] == str(data.resolve()) and meta["data_file"]["bytes"] == data.stat().st_size
    code, _, err = run(["reconstruct", data, "--pixel-size", 0.5, "--out", tmp_path / "given"], capsys)
    assert code == 0 and "the pixel size given (0.5 Å) is not the file's (0.2 Å)" in err
    assert json.loads((tmp_path / "given" / "metadata.json").read_text())["pixel_size_angstrom"] == 0.5
    # a model for a probe file with its pixel size records it, and refuses a scan recorded at another
    import shutil

    from deepphase.models.modelfile import load_model
    from deepphase.training import loop

    recorded = {}

    def trained(probe, out, config, *args, probe_info=None, **kwargs):
        recorded.update(probe_info)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", trained)
    run(["train", "--probe", "reference", "--sampling", 0.25, "--out", tmp_path / "model"], capsys)
    assert recorded["sampling"] == 0.25
    shutil.copytree(load_model("default").folder, tmp_path / "at-0.25")
    record = json.loads((tmp_path / "at-0.25" / "model.json").read_text())
    (tmp_path / "at-0.25" / "model.json").write_text(json.dumps({**record, "sampling": 0.25}))
    code, _, err = run(["reconstruct", data, "--model", tmp_path / "at-0.25", "--out", tmp_path / "other"], capsys)
    assert code == 2 and "made for a real-space sampling of 0.25 Å/pixel, but the data has 0.2 Å/pixel" in err


def test_the_truth_is_compared_through_the_positions_given(tmp_path, capsys):
    """A scan simulated 12° turned, reconstructed as an unturned raster: the image is the specimen turned, so
    the truth is taken through the same geometry before the correlation (high), and the metadata say how
    (12°, and the unmapped figure, near zero)."""
    data = tmp_path / "scan.npz"
    assert run(["simulate", "--scan-shape", 24, 24, "--step", 0.87, "--rotation", 12, "--out", data], capsys)[0] == 0
    code, out, err = run(["reconstruct", data, "--scan-shape", 24, 24, "--step", 0.87, "--out", tmp_path / "rec"],
                         capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "rec" / "metadata.json").read_text())
    mapped = meta["truth_mapped"]
    assert mapped["rotation_deg"] == pytest.approx(12.0, abs=1e-6) and mapped["scale"] == pytest.approx(1.0)
    assert meta["correlation_with_truth"] > 0.85 and abs(mapped["correlation_unmapped"]) < 0.4
    assert "the truth taken through the positions given: turned 12.0°" in out
    code, out, err = run(["reconstruct", data, "--out", tmp_path / "own"], capsys)  # the file's own positions
    assert code == 0 and "truth_mapped" not in json.loads((tmp_path / "own" / "metadata.json").read_text())
    # Rows and columns swapped (the wrong --fastest): a mirror, which is said, not passed off as a turn.
    code, out, err = run(["reconstruct", data, "--scan-shape", 24, 24, "--step", 0.87, "--rotation", 12, "--fastest",
                          "col", "--out", tmp_path / "swapped"], capsys)
    mapped = json.loads((tmp_path / "swapped" / "metadata.json").read_text())["truth_mapped"]
    assert code == 0 and mapped["mirrored"] and mapped["affine"] and "mirrored, turned" in out


@pytest.mark.parametrize("layout", ["npy-amplitude", "npy-counts", "hdf5-4d"])
def test_reconstruct_reads_files_and_infers_counts_or_amplitudes(layout, tiny_scan, tmp_path, capsys):
    folder, scan = tiny_scan
    if layout == "npy-amplitude":
        args = [folder / "amplitude.npy", "--positions", folder / "positions.npy"]
        expected = "amplitude"
    elif layout == "npy-counts":
        args = [folder / "counts.npy", "--scan-shape", 12, 12, "--step", 0.87]
        expected = "counts"
    else:
        # (scan_row, scan_col, k, k): frame [i, j] is at (i·step, j·step).
        order = np.lexsort((scan.positions[:, 1], scan.positions[:, 0]))
        with h5py.File(tmp_path / "scan.h5", "w") as f:
            f["data/counts"] = np.round(scan.amplitude[order].astype(np.float64) ** 2).reshape(12, 12, 32, 32)
        args = [tmp_path / "scan.h5", "--dataset", "data/counts", "--step", 0.87]
        expected = "counts"
    code, out, err = run(["reconstruct", *args, "--out", tmp_path / "rec"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "rec" / "metadata.json").read_text())
    assert meta["input"] == expected
    phase = np.load(tmp_path / "rec" / "phase.npy")
    r0, c0 = meta["origin_px"]
    truth = scan.truth[r0 : r0 + phase.shape[0], c0 : c0 + phase.shape[1]]
    assert np.corrcoef(phase.ravel(), truth.ravel())[0, 1] > 0.5


def bad_inputs(folder, tmp_path):
    amp = np.load(folder / "amplitude.npy")
    nan = amp.copy()
    nan[7, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    neg = amp.copy()
    neg[5, 0, 0] = -1
    np.save(tmp_path / "neg.npy", neg)
    np.save(tmp_path / "complex.npy", amp.astype(np.complex64))
    np.save(tmp_path / "wrongshape.npy", amp[:, :16, :16])
    np.save(tmp_path / "flat.npy", amp[0])
    np.save(tmp_path / "pos_short.npy", np.zeros((5, 2)))
    (tmp_path / "garbage.npy").write_bytes(b"not an npy file")
    np.save(tmp_path / "nonsquare.npy", amp[:, :, :30])
    np.save(tmp_path / "zeros.npy", np.zeros_like(amp))
    np.save(tmp_path / "grid.npy", amp.reshape(12, 12, 32, 32))
    positions = np.load(folder / "positions.npy")
    for name, scaled in (("in_metres", positions * 2e-11), ("one_point", np.zeros_like(positions)),
                         ("far_apart", positions * 100)):
        np.save(tmp_path / f"{name}.npy", scaled)
    with h5py.File(tmp_path / "groups.h5", "w") as f:
        f["scan/frames"] = amp
        f["scan/other"] = amp[:3]
    pos = ["--positions", folder / "positions.npy"]
    return {
        "missing file": (["reconstruct", tmp_path / "nope.npy", *pos], "does not exist"),
        "unreadable file": (["reconstruct", tmp_path / "garbage.npy", *pos], "could not read"),
        "NaN values": (["reconstruct", tmp_path / "nan.npy", *pos],
                       "frame 7 contains NaN or Inf values; --calibrate repairs them"),
        "negative values": (["reconstruct", tmp_path / "neg.npy", *pos],
                            "frame 5 has negative values (min -1); expected counts or amplitudes ≥ 0; --calibrate "
                            "repairs them"),
        "complex dtype": (["reconstruct", tmp_path / "complex.npy", *pos], "dtype"),
        "wrong pattern size": (["reconstruct", tmp_path / "wrongshape.npy", *pos], "16×16"),
        "2-D data": (["reconstruct", tmp_path / "flat.npy", *pos], "shape"),
        "positions do not match": (["reconstruct", folder / "amplitude.npy", "--positions", tmp_path / "pos_short.npy"],
                                   "5 positions do not match the 144"),
        "scan shape does not match": (["reconstruct", folder / "amplitude.npy", "--scan-shape", 10, 10, "--step", 1],
                                      "do not match the 144"),
        "no positions": (["reconstruct", folder / "amplitude.npy"], "--positions"),
        "missing model": (["reconstruct", folder / "amplitude.npy", *pos, "--model", tmp_path / "nomodel"], "not a folder"),
        "negative source size": (["reconstruct", folder / "amplitude.npy", *pos, "--source-size", -1], "source-size"),
        "non-square patterns": (["reconstruct", tmp_path / "nonsquare.npy", *pos], "32×30"),
        "all-zero patterns": (["reconstruct", tmp_path / "zeros.npy", *pos], "hold no counts"),
        "scan shape against the array's": (["reconstruct", tmp_path / "grid.npy", "--scan-shape", 6, 24, "--step", 0.87],
                                           "holds a 12×12 scan"),
        "scan shape without a step": (["reconstruct", folder / "amplitude.npy", "--scan-shape", 12, 12], "--step S"),
        "positions in metres": (["reconstruct", folder / "amplitude.npy", "--positions", tmp_path / "in_metres.npy"],
                                "Å, nm or metres"),
        "positions at one point": (["reconstruct", folder / "amplitude.npy", "--positions", tmp_path / "one_point.npy"],
                                   "the same point"),
        "positions far apart": (["reconstruct", folder / "amplitude.npy", "--positions", tmp_path / "far_apart.npy"],
                                "no two patches overlap"),
        "an HDF5 group that is not EMD": (["reconstruct", tmp_path / "groups.h5", "--dataset", "/scan", *pos],
                                          "'/scan/frames'"),
    }


@pytest.mark.parametrize("case", ["missing file", "unreadable file", "NaN values", "negative values", "complex dtype",
                                  "wrong pattern size", "2-D data", "positions do not match",
                                  "scan shape does not match", "no positions", "missing model", "negative source size",
                                  "non-square patterns", "all-zero patterns", "scan shape against the array's",
                                  "scan shape without a step", "positions in metres", "positions at one point",
                                  "positions far apart", "an HDF5 group that is not EMD"])
def test_bad_input_gives_one_clear_line_and_no_output(case, tiny_scan, tmp_path, capsys):
    folder, _ = tiny_scan
    args, expected = bad_inputs(folder, tmp_path)[case]
    code, out, err = run([*args, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_simulate_keeps_a_npy_object_s_radians_and_scales_an_image_file(tmp_path, capsys):
    from skimage.io import imsave

    phase = np.random.default_rng(0).uniform(-2.0, 3.0, (60, 60))
    np.save(tmp_path / "object.npy", phase)
    imsave(tmp_path / "object.png", (np.linspace(0, 255, 60 * 60).reshape(60, 60)).astype(np.uint8))
    for source, options, span in (("object.npy", [], (-2.0, 3.0)), ("object.npy", ["--phase-max", 0.5], (0.0, 0.5)),
                                  ("object.png", [], (0.0, 1.0))):
        assert run(["simulate", "--object", tmp_path / source, *options, "--scan-shape", 8, 8, "--out",
                    tmp_path / "s.npz", "--overwrite"], capsys)[0] == 0
        truth = np.load(tmp_path / "s.npz")["truth"]
        assert (truth.min(), truth.max()) == pytest.approx(span, abs=0.01), source
    code, _, err = run(["simulate", "--phase-max", 2, "--scan-shape", 8, 8, "--out", tmp_path / "b.npz"], capsys)
    assert code == 2 and "built-in specimens have their own phase" in err


def test_an_overwrite_leaves_no_file_of_the_earlier_run_it_did_not_remake(tiny_scan, tmp_path, capsys):
    folder, _ = tiny_scan
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "notes.txt").write_text("mine")
    args = ["reconstruct", folder / "amplitude.npy", "--positions", folder / "positions.npy", "--out", tmp_path / "rec"]
    code, out, _ = run([*args, "--uncertainty", "head"], capsys)
    assert code == 0 and "; σ in uncertainty.npy (σ head × 1.17)" in out  # (not said: the figures audit, s41)

    def made_by_the_earlier_run(name):
        (tmp_path / "rec" / name).write_bytes(b"an earlier run's figure")
        meta = json.loads((tmp_path / "rec" / "metadata.json").read_text())
        (tmp_path / "rec" / "metadata.json").write_text(json.dumps({**meta, "figures": [name]}))

    made_by_the_earlier_run("rotation.png")
    assert (tmp_path / "rec" / "uncertainty.npy").exists()
    assert run([*args, "--overwrite"], capsys)[0] == 0
    assert not (tmp_path / "rec" / "uncertainty.npy").exists() and not (tmp_path / "rec" / "rotation.png").exists()
    assert json.loads((tmp_path / "rec" / "metadata.json").read_text()).get("uncertainty_file") is None
    assert (tmp_path / "rec" / "notes.txt").read_text() == "mine"  # not ours: kept
    # From Python: write_outputs refuses an earlier run's figure unasked, and removes it with overwrite=True
    import deepphase

    rec = deepphase.reconstruct(np.load(folder / "amplitude.npy"), np.load(folder / "positions.npy"), progress=False)
    made_by_the_earlier_run("probe_check.png")
    (tmp_path / "figure-only").mkdir()
    (tmp_path / "figure-only" / "probe_check.png").write_bytes(b"a user's figure")
    with pytest.raises(deepphase.DeepPhaseError, match=r"already holds probe_check\.png; .*overwrite=True"):
        deepphase.write_outputs(rec, tmp_path / "figure-only")
    # A file of an output's name that no run made (no metadata.json names it) stays, even with overwrite=True.
    with pytest.raises(deepphase.DeepPhaseError, match=r"holds probe_check\.png, which no earlier reconstruction "
                                                       r"there wrote .* move it or choose another folder"):
        deepphase.write_outputs(rec, tmp_path / "figure-only", overwrite=True)
    assert (tmp_path / "figure-only" / "probe_check.png").read_bytes() == b"a user's figure"
    written = deepphase.write_outputs(rec, tmp_path / "rec", overwrite=True)
    assert not (tmp_path / "rec" / "probe_check.png").exists() and "figures" not in written
    assert (tmp_path / "rec" / "notes.txt").read_text() == "mine"
    # Interrupted among its moves, an overwrite leaves no metadata.json that would call a mixed set complete.
    import os

    from deepphase.reconstruction import pipeline

    def interrupted(source, target):
        if str(target) == str(tmp_path / "rec" / "phase.tif"):  # (its move into place, not its staged write)
            raise KeyboardInterrupt
        os.rename(source, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline.os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            deepphase.write_outputs(rec, tmp_path / "rec", overwrite=True)
    assert (tmp_path / "rec" / "phase.npy").exists() and not (tmp_path / "rec" / "metadata.json").exists()


def test_overwrite_never_replaces_a_file_no_run_made_the_scan_or_positions_read_included(tiny_scan, tmp_path,
                                                                                          capsys):
    """--overwrite replaced a scan saved as phase.npy in --out with the image, and removed the positions file named
    uncertainty.npy that the run had just read (the outputs audit, s40)."""
    folder, _ = tiny_scan
    for name, data, positions in (("phase.npy", "phase.npy", "positions.npy"),
                                  ("uncertainty.npy", "scan.npy", "uncertainty.npy")):
        out = tmp_path / name
        out.mkdir()
        np.save(out / data, np.load(folder / "amplitude.npy"))
        np.save(out / positions, np.load(folder / "positions.npy"))
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        code, _, err = run(["reconstruct", out / data, "--positions", out / positions, "--out", out, "--overwrite"],
                           capsys)
        assert code == 2 and f"holds {name}, which no earlier reconstruction there wrote" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_interrupted_while_writing_resumes_from_its_saved_prediction(tiny_scan, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the prediction, among the moves into place, leaves phase.npy without metadata.json beside the
    saved progress: the interrupt said nothing of --resume, and --resume was refused for the run's own phase.npy
    (or calibration.png), so only --overwrite, redoing the prediction, got the image (the failure audit, s36)."""
    import os

    from deepphase.reconstruction import pipeline

    code, _, _ = reconstruct_tiny(tiny_scan, tmp_path / "whole", capsys)
    assert code == 0

    def interrupted(source, target):
        if str(target) == str(tmp_path / "rec" / "phase.tif"):
            raise KeyboardInterrupt
        os.rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.os, "replace", interrupted)
        code, _, err = reconstruct_tiny(tiny_scan, tmp_path / "rec", capsys)
    assert code == 130 and "the same command with --resume continues from it" in err, err
    assert (tmp_path / "rec" / "phase.npy").exists() and not (tmp_path / "rec" / "metadata.json").exists()
    (tmp_path / "rec" / "calibration.png").write_bytes(b"a figure the interrupted run wrote")
    code, _, err = reconstruct_tiny(tiny_scan, tmp_path / "rec", capsys)
    assert code == 2 and "(all 144 patterns predicted, the image not yet written); pass --resume" in err, err
    code, printed, err = reconstruct_tiny(tiny_scan, tmp_path / "rec", capsys, "--resume")
    assert code == 0 and "(144 patterns, all predicted before the interruption, stitching" in printed, printed + err
    np.testing.assert_array_equal(np.load(tmp_path / "rec" / "phase.npy"), np.load(tmp_path / "whole" / "phase.npy"))
    assert json.loads((tmp_path / "rec" / "metadata.json").read_text())["shape"] == list(
        np.load(tmp_path / "whole" / "phase.npy").shape)
    assert not (tmp_path / "rec" / "calibration.png").exists()  # not this run's figure: removed with its record
    assert not (tmp_path / "rec" / ".deepphase-partial").exists()


def test_a_full_disk_is_one_line_naming_the_file_and_what_to_do(tiny_scan, tmp_path, capsys, monkeypatch):
    """A write's ENOSPC names no file: it was a traceback (reconstruct, simulate; train's SafetensorError). Now the
    file, the reason and what to do, with --resume where progress is saved; no temporary file is left."""
    import errno

    from deepphase import io_utils
    from deepphase.models import modelfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_utils.np, "save", full)
    code, _, err = reconstruct_tiny(tiny_scan, tmp_path / "rec", capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "phase.npy': No space left on device; free some space and run the same command again with --resume" in err
    assert not [p for p in (tmp_path / "rec").rglob("*") if p.suffix == ".tmp" or p.name.startswith(".deepphase-")
                and p.name not in (".deepphase-partial", ".deepphase-unfinished")]
    monkeypatch.undo()
    monkeypatch.setattr(modelfile, "safetensors_bytes", lambda *a, **k: full())
    with pytest.raises(OSError, match="model.safetensors"):
        modelfile.save_model(modelfile.load_model("default"), tmp_path / "model")
    assert not list((tmp_path / "model").glob(".*.tmp"))


def test_a_file_rewritten_while_it_is_read_writes_no_image(tiny_scan, tmp_path, capsys, monkeypatch):
    """An HDF5 file truncated mid-run was read without an error: rc 0 and an image correlating 0.46 with the true
    one (the failure audit, s36). The file's size and time are compared at the end of the prediction."""
    import os

    import h5py

    from deepphase.reconstruction import pipeline

    folder, _ = tiny_scan
    data = tmp_path / "scan.h5"
    with h5py.File(data, "w") as f:
        f["frames"] = np.load(folder / "amplitude.npy")
    predicted = pipeline.reconstruct

    def rewritten_meanwhile(*args, **kwargs):
        rec = predicted(*args, **kwargs)
        with open(data, "r+b") as f:  # (an acquisition still writing: the file grows)
            f.seek(0, os.SEEK_END)
            f.write(b"\0" * 4096)
        return rec

    monkeypatch.setattr(pipeline, "reconstruct", rewritten_meanwhile)
    args = ["reconstruct", data, "--dataset", "frames", "--positions", folder / "positions.npy", "--out"]
    code, _, err = run([*args, tmp_path / "rec"], capsys)
    size = os.path.getsize(data)
    assert code == 2 and f"changed while it was read ({size - 4096:,} bytes when the run began, {size:,} now)" in err
    assert not (tmp_path / "rec").exists()  # no image, no progress (on a file no longer there)
    monkeypatch.undo()
    assert run([*args, tmp_path / "rec"], capsys)[0] == 0


def test_a_lock_whose_process_number_now_names_another_process_is_stale(tmp_path):
    """A run killed outright left its lock; its pid, reused by a later process (a container restarted with the
    same pids), made the lock look held for ever. The lock records when its process started."""
    from deepphase.errors import OutputExistsError
    from deepphase.io_utils import _HOST, LOCK_FILE, _process_start, folder_lock

    start = _process_start(os.getpid())
    if start is None:
        pytest.skip("no /proc: a process's start cannot be read here")
    lock = tmp_path / LOCK_FILE
    lock.write_text(f"{os.getpid()} {_HOST} {start}\n")  # (this very process: held)
    with pytest.raises(OutputExistsError, match="another deepphase run"), folder_lock(tmp_path):
        pass
    lock.write_text(f"{os.getpid()} {_HOST} {int(start) - 1}\n")  # (the pid's earlier owner: gone)
    with folder_lock(tmp_path):
        assert lock.read_text().split() == [str(os.getpid()), _HOST, start]
    assert not lock.exists()


def test_a_folder_being_written_is_refused_and_a_killed_runs_leftovers_are_cleaned(tiny_scan, tmp_path, capsys):
    """Two runs into one folder both "succeeded" sharing its progress; a run killed outright (kill -9) left its
    lock, staging folder and temporary files, which no later run removed (the failure audit, s36)."""
    import socket
    import subprocess
    import sys

    out = tmp_path / "rec"
    out.mkdir()
    (out / ".deepphase-lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # (a live process's)
    code, _, err = reconstruct_tiny(tiny_scan, out, capsys)
    assert code == 2 and f"another deepphase run is writing into {str(out)!r} (process {os.getpid()} on" in err, err
    assert not (out / "phase.npy").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".deepphase-lock").write_text(f"{gone.stdout.strip()} {socket.gethostname()}\n")  # (a killed run's)
    (out / ".deepphase-k1ll3d").mkdir()
    (out / ".deepphase-k1ll3d" / "phase.npy").write_bytes(b"staged")
    (out / ".phase.png.x1y2z3.png.tmp").write_bytes(b"half a figure")
    (out / ".phase.npy.another-node-4242-a1b2c3.tmp").write_bytes(b"a job killed on another node")
    (out / "notes.txt").write_text("mine")
    code, _, err = reconstruct_tiny(tiny_scan, out, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "notes.txt").read_text() == "mine" and (out / "metadata.json").exists()
    # A run interrupted with no progress to resume (--libertem writes calibration.png before its prediction) marks
    # the folder unfinished: its files do not block the next run, as figures of unknown origin do.
    (out / "metadata.json").unlink()
    (out / "calibration.png").write_bytes(b"an interrupted run's")
    assert reconstruct_tiny(tiny_scan, out, capsys)[0] == 2
    (out / ".deepphase-unfinished").touch()
    code, _, err = reconstruct_tiny(tiny_scan, out, capsys)
    assert code == 0 and not (out / "calibration.png").exists() and not (out / ".deepphase-unfinished").exists(), err


@pytest.mark.parametrize("options, expected", [
    (["--pixel-size", "-0.2"], "argument --pixel-size: expected a positive number, got '-0.2'"),
    (["--step", "inf"], "argument --step: expected a positive number of pixels or 'auto', got 'inf'"),
    (["--rotation", "nan"], "argument --rotation: expected an angle in degrees or 'auto', got 'nan'"),
    (["--uncertainty", "0"], "at least 2 dropout samples"),
    (["--sigma-scale", "-2"], "argument --sigma-scale: expected a positive number"),
    (["--batch-size", "0"], "argument --batch-size: expected a positive whole number, got '0'"),
])
def test_impossible_numbers_are_refused_in_one_line_before_any_work(options, expected, tiny_scan, tmp_path, capsys):
    folder, _ = tiny_scan
    code, out, err = run(["reconstruct", folder / "amplitude.npy", "--scan-shape", 12, 12, *options,
                          *([] if "--step" in options else ["--step", 0.87]), "--out", tmp_path / "out"], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, out, expected", [
    (["train", "--epochs", "1"], "a-file", "exists and is not a folder"),
    (["reconstruct", "DATA", "--scan-shape", "12", "12", "--step", "0.87"], "a-file/sub", "is a file, not a folder"),
    (["export-onnx"], ".", "is a folder; expected a file name"),
])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(command, out, expected, tiny_scan, tmp_path,
                                                                     capsys):
    folder, _ = tiny_scan
    (tmp_path / "a-file").write_text("mine")
    command = [str(folder / "amplitude.npy") if c == "DATA" else c for c in command]
    code, _, err = run([*command, "--out", tmp_path / out], capsys)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert (tmp_path / "a-file").read_text() == "mine"


def test_a_failed_reconstruction_leaves_no_empty_output_folder(tiny_scan, tmp_path, capsys):
    folder, _ = tiny_scan
    amplitude = np.load(folder / "amplitude.npy")
    amplitude[100, 3, 3] = np.nan  # found only when that frame is read
    np.save(tmp_path / "late-nan.npy", amplitude)
    code, _, err = run(["reconstruct", tmp_path / "late-nan.npy", "--positions", folder / "positions.npy",
                        "--no-probe-check", "--rotation", "0", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "frame 100" in err, err
    assert not (tmp_path / "out").exists()


def test_model_for_another_grid_is_refused(tiny_scan, tmp_path, capsys):
    from deepphase.models.modelfile import load_model, save_model
    from deepphase.physics import Geometry

    from deepphase.models import create_model

    model = load_model()
    model.geometry = Geometry(n_px=64)
    model.probe = np.pad(model.probe, 16)  # (a model folder is whole: its probe and network on its own grid)
    model.arch_config = {**model.arch_config, "n_px": 64}
    model.network = create_model(model.arch, **model.arch_config)
    save_model(model, tmp_path / "m64")
    folder, _ = tiny_scan
    code, out, err = run(["reconstruct", folder / "amplitude.npy", "--positions", folder / "positions.npy",
                          "--model", tmp_path / "m64", "--out", tmp_path / "out"], capsys)
    assert code == 2 and "made for 64×64" in err and "32×32" in err


def test_existing_results_are_not_overwritten_unasked(tiny_scan, tmp_path, capsys):
    folder, _ = tiny_scan
    args = ["reconstruct", folder / "amplitude.npy", "--positions", folder / "positions.npy", "--out", tmp_path / "rec"]
    assert run(args, capsys)[0] == 0
    before = (tmp_path / "rec" / "phase.npy").read_bytes()
    code, out, err = run(args, capsys)
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "rec" / "phase.npy").read_bytes() == before
    assert run([*args, "--overwrite"], capsys)[0] == 0


def test_every_command_has_help(capsys):
    for command in ("train", "simulate", "reconstruct", "demo", "export-onnx"):
        assert main([command, "--help"]) == 0
        assert "usage: deepphase " + command in capsys.readouterr().out


def test_every_option_says_what_it_does_and_offers_only_what_its_command_takes(capsys):
    import argparse

    from deepphase.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [f"{name} {a.option_strings[-1]}" for name, sub in commands.items() for a in sub._actions
              if a.option_strings and not a.help]
    assert silent == []
    simulate = {a.dest: a for a in commands["simulate"]._actions}
    assert "auto" not in simulate["rotation"].help and "default 64 64" in simulate["scan_shape"].help
    assert main(["simulate", "--rotation", "auto", "--out", "x.npz"]) == 2
    assert "--rotation: expected an angle in degrees, got 'auto'" in capsys.readouterr().err


def test_the_parser_is_built_without_torch_and_train_still_lists_and_checks_architectures(capsys, monkeypatch):
    import subprocess
    import sys

    from deepphase.models import list_models

    # A fresh interpreter (this one has torch already): building the parser, as every command and --help
    # does, must not import it (~1.7 s of every `deepphase --help` before).
    probe = "import sys; from deepphase.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    monkeypatch.setenv("COLUMNS", "400")  # help lines unwrapped
    assert main(["train", "--help"]) == 0
    assert f"architecture: {', '.join(list_models())} (default unet-small)" in capsys.readouterr().out
    assert main(["train", "--energy", "300", "--out", "m", "--arch", "no-such-net"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no-such-net'" in err and "'compact'" in err and len(err.strip().splitlines()) == 1


def test_export_onnx_writes_the_networks_function_and_never_replaces_a_file_unasked(tiny_scan, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    import torch

    from deepphase.models.modelfile import load_model

    out = tmp_path / "default.onnx"
    code, stdout, _ = run(["export-onnx", "--out", out], capsys)
    assert code == 0 and "input 'x': (batch, 1, 32, 32)" in stdout and "output 'y': (batch, 2, 32, 32)" in stdout
    x = np.ascontiguousarray(tiny_scan[1].amplitude[:5, None], dtype=np.float32)
    with torch.inference_mode():
        expected = load_model().network(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    assert got.shape == expected.shape and float(np.abs(got - expected).max()) < 1e-4
    # How to get σ from the second channel, as said (it was not: the figures audit, s41)
    from deepphase.models.registry import sigma_from_log_scale

    assert "σ = √2·exp(clip(y[:, 1], -9.2, 2)) rad" in stdout
    np.testing.assert_allclose(np.sqrt(2) * np.exp(np.clip(got[:, 1], -9.2, 2)),
                               sigma_from_log_scale(torch.from_numpy(got[:, 1])).numpy(), rtol=1e-6)
    out.write_bytes(b"the user's file")
    code, _, err = run(["export-onnx", "--out", out], capsys)
    assert code == 2 and "exists; choose another name or pass --overwrite" in err
    assert out.read_bytes() == b"the user's file"
    assert run(["export-onnx", "--out", out, "--overwrite"], capsys)[0] == 0 and out.stat().st_size > 10**6


def test_export_onnx_without_onnxruntime_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else
                        real_find_spec(name, *a))
    code, _, err = run(["export-onnx", "--out", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "needs onnxruntime, which is not installed: pip install -e '.[onnx]' (in deepphase's source folder)" in err
    assert not (tmp_path / "m.onnx").exists()
    code, _, err = run(["export-onnx", "--out", tmp_path / "m.txt"], capsys)  # (it wrote ONNX under any name)
    assert code == 2 and "expected a file name ending in .onnx" in err and not (tmp_path / "m.txt").exists()


def test_train_refuses_incomplete_optics(tmp_path, capsys):
    code, out, err = run(["train", "--energy", 300, "--out", tmp_path / "m"], capsys)
    assert code == 2 and "--semi-angle" in err and "--sampling" in err


def test_reconstruct_writes_an_uncertainty_map_on_request(tiny_scan, tmp_path, capsys):
    out = tmp_path / "rec"
    code, _, err = reconstruct_tiny(tiny_scan, out, capsys, "--uncertainty", 3)
    assert code == 0, err
    phase, sigma = np.load(out / "phase.npy"), np.load(out / "uncertainty.npy")
    meta = json.loads((out / "metadata.json").read_text())
    assert sigma.shape == phase.shape and np.all(sigma[np.isfinite(sigma)] >= 0) and np.nanmax(sigma) > 0
    assert meta["uncertainty_file"] == "uncertainty.npy"
    from deepphase.models.modelfile import load_model

    record = meta["processing"]["uncertainty"]
    assert (record["method"], record["samples"]) == ("Monte Carlo dropout", 3)
    # The packaged model's factor for the data's dose (the tiny scan's counts: 27,882 e/pattern) is applied
    # and recorded.
    from deepphase.reconstruction.uncertainty import sigma_scale_at

    dose = meta["processing"]["electrons_per_pattern"]
    assert 25_000 < dose < 31_000 and "e/pattern" in record["note"]
    assert record["sigma_scale"] == pytest.approx(sigma_scale_at(load_model(), dose)[0])
    code, _, err = reconstruct_tiny(tiny_scan, tmp_path / "rec1", capsys, "--uncertainty", 1)
    assert code == 2 and "at least 2 dropout samples" in err


def test_a_model_for_my_own_microscope_trains_and_reconstructs(tmp_path, capsys):
    optics = ["--energy", 300, "--semi-angle", 20, "--defocus", 30, "--sampling", 0.25]
    code, _, err = run(["train", *optics, "--arch", "compact", "--epochs", 1, "--steps-per-epoch", 3,
                        "--batch-size", 4, "--val-size", 8, "--dose", 5000, "--out", tmp_path / "m"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["probe"]["source"] == "parameters" and meta["probe"]["energy"] == 300
    assert meta["sampling"] == 0.25 and meta["training"]["dose"] == 5000
    code, _, err = run(["simulate", *optics, "--scan-shape", 8, 8, "--dose", 5000, "--out", tmp_path / "s.npz"], capsys)
    assert code == 0, err
    code, out, err = run(["reconstruct", tmp_path / "s.npz", "--model", tmp_path / "m", "--pixel-size", 0.25,
                          "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    assert np.isfinite(np.load(tmp_path / "r" / "phase.npy")).any()
    # The same model refuses data of another real-space sampling.
    code, _, err = run(["reconstruct", tmp_path / "s.npz", "--model", tmp_path / "m", "--pixel-size", 0.4,
                        "--out", tmp_path / "r2"], capsys)
    assert code == 2 and "0.25" in err and "0.4" in err


def test_outputs_have_ordinary_file_permissions(tiny_scan, tmp_path, capsys):
    import os
    import stat

    code, _, err = reconstruct_tiny(tiny_scan, tmp_path / "rec", capsys)
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    for name in ("phase.npy", "phase.png", "metadata.json"):
        assert stat.S_IMODE((tmp_path / "rec" / name).stat().st_mode) == 0o666 & ~umask


def test_phase_is_also_written_as_tiff_and_emd_with_the_pixel_size(tiny_scan, tmp_path, capsys):
    import tifffile

    out = tmp_path / "rec"
    code, _, err = reconstruct_tiny(tiny_scan, out, capsys, "--pixel-size", 0.2)
    assert code == 0, err
    phase = np.load(out / "phase.npy")
    meta = json.loads((out / "metadata.json").read_text())
    with tifffile.TiffFile(out / "phase.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), phase)
        x_resolution = tif.pages[0].tags["XResolution"].value
        assert x_resolution[0] / x_resolution[1] == pytest.approx(1 / 0.2, rel=1e-4)
        assert tif.imagej_metadata["unit"] == "Angstrom"
    with h5py.File(out / "phase.emd", "r") as f:
        group = f["deepphase/phase"]
        assert f.attrs["emd_group_type"] == "file" and group.attrs["emd_group_type"] == "array"
        np.testing.assert_array_equal(group["data"][()], phase)
        assert group["dim0"].attrs["units"] == "A" and group["dim0"].attrs["name"] == "row"
        assert group["dim0"][0] == pytest.approx(0.2 * meta["origin_px"][0])
        assert group["dim1"][1] - group["dim1"][0] == pytest.approx(0.2)


@pytest.mark.parametrize("shape", [(24, 40)])
def test_phase_emd_opens_the_right_way_round_in_hyperspy_and_py4dstem(shape, tmp_path):
    """rosettasciio (HyperSpy's reader) transposes an EMD array whose dimensions are numbered from 1 (the NCEM
    layout): phase.emd opened there was the image mirrored about its diagonal, a twist of the other sense.
    Now both readers give phase.npy's values, rows as rows, with the pixel size and origin on each axis."""
    from deepphase.reconstruction.pipeline import write_emd

    phase = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    sigma = np.abs(phase) + 0.1
    write_emd(tmp_path / "phase.emd", phase, 0.2, (15.0, 3.0), sigma)
    rsciio_emd = pytest.importorskip("rsciio.emd")
    signals = rsciio_emd.file_reader(str(tmp_path / "phase.emd"))
    read = {s["metadata"]["General"]["title"]: s for s in signals}
    for name, image in (("phase", phase), ("uncertainty", sigma)):
        np.testing.assert_array_equal(read[name]["data"], image)
        rows, cols = read[name]["axes"]
        assert (rows["name"], rows["size"], cols["name"], cols["size"]) == ("row", shape[0], "col", shape[1])
        assert rows["offset"] == pytest.approx(3.0) and cols["offset"] == pytest.approx(0.6)
        assert rows["scale"] == pytest.approx(0.2) and cols["scale"] == pytest.approx(0.2)
    emdfile = pytest.importorskip("emdfile")
    array = emdfile.read(str(tmp_path / "phase.emd"), emdpath="deepphase/phase")
    np.testing.assert_array_equal(array.data, phase)
    assert array.dims[0][:2] == pytest.approx([3.0, 3.2]) and array.dim_units[0] == "A"


def test_the_blend_is_deblurred_unless_asked_not_to(tiny_scan, tmp_path, capsys):
    images = {}
    for name, options in (("sharp", []), ("box", ["--deblur", "off"])):  # the tiny scan: 27,882 e/pattern
        code, out, err = reconstruct_tiny(tiny_scan, tmp_path / name, capsys, *options)
        assert code == 0, err
        meta = json.loads((tmp_path / name / "metadata.json").read_text())
        assert json.dumps(meta).count('"deblurred": ' + ("true" if name == "sharp" else "false")) == 1
        images[name] = np.load(tmp_path / name / "phase.npy")
    # same grid, more contrast at the finest scale when deblurred
    assert images["sharp"].shape == images["box"].shape
    assert np.std(np.diff(images["sharp"], axis=1)) > np.std(np.diff(images["box"], axis=1))


def test_a_dose_far_from_the_models_training_dose_is_pointed_out(probe, tmp_path, capsys):
    positions = raster_positions((12, 12), 0.87, fastest="row")
    truth = twisted_hbn(required_object_shape(positions, 32))
    scan = simulate_scan(truth, probe, positions, dose=30.0, seed=1, progress=False)
    np.save(tmp_path / "counts.npy", np.round(scan.amplitude.astype(np.float64) ** 2))
    np.save(tmp_path / "positions.npy", positions)
    for model, note in (("seed", True), ("default", False)):  # trained at 27,882 only / at 10–10⁶
        out_dir = tmp_path / model
        code, out, err = run(["reconstruct", tmp_path / "counts.npy", "--positions", tmp_path / "positions.npy",
                              "--model", model, "--out", out_dir], capsys)
        assert code == 0, err
        assert ("electrons on average, outside the 27,882 electrons per pattern model" in err) is note
        meta = json.loads((out_dir / "metadata.json").read_text())
        assert json.dumps(meta).count('"deblurred": false') == 1  # counted data at 30 e/pattern: not deblurred
        assert 25 < meta["processing"]["electrons_per_pattern"] < 35


def test_counts_and_amplitudes_are_told_apart_and_the_ambiguous_refused():
    """Whole numbers are counts, to float32 precision (float32 squares of float32 amplitudes are off by ~1e-7 of
    their value: they were read as amplitudes and squared again); square roots of whole numbers are amplitudes;
    anything else is refused with what to pass."""
    from deepphase.data.io import infer_kind
    from deepphase.errors import DeepPhaseError

    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.uniform(0, 3e4, size=(40, 32, 32))).astype(np.float32)
    amplitudes = np.sqrt(counts, dtype=np.float32)
    assert infer_kind(counts) == "counts" and infer_kind(counts.astype(np.uint16)) == "counts"
    squares = np.square(amplitudes)
    assert not np.array_equal(squares, counts)  # rounding: not whole numbers to 1e-6 absolute
    assert infer_kind(squares) == "counts"
    assert infer_kind(amplitudes) == "amplitude"
    with pytest.raises(DeepPhaseError, match="cannot tell whether the patterns are counts or amplitudes"):
        infer_kind(amplitudes * 1.37)


def test_counts_read_as_amplitudes_are_noted_in_the_commands_words(tiny_scan, tmp_path, capsys):
    """Counts forced through --input amplitude: the note names the option to check (the arrays API's note names
    AmplitudeView, which a command-line user never sees), and a call from Python is told its keyword."""
    import warnings

    import deepphase
    from deepphase.errors import DeepPhaseNote

    folder, _ = tiny_scan
    args = ["reconstruct", folder / "counts.npy", "--positions", folder / "positions.npy", "--input", "amplitude"]
    code, out, err = run([*args, "--out", tmp_path / "cli"], capsys)
    assert code == 0 and "yet --input amplitude reads them as amplitudes" in err and "AmplitudeView" not in err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deepphase.reconstruct_file(folder / "counts.npy", positions=folder / "positions.npy", kind="amplitude",
                                   progress=False)
    said = [str(w.message) for w in caught if issubclass(w.category, DeepPhaseNote)]
    assert any("yet kind='amplitude' reads them" in text and "(kind='counts'," in text for text in said), said


def test_simulate_removes_a_killed_simulates_temporary_but_not_a_running_ones(tmp_path, capsys):
    """A simulate killed outright left its half-written `.s.npz.*.tmp` for good (the failure audit, s36); a cleanup
    must not remove the temporary of a simulate still writing the same file (another process, another host)."""
    import subprocess
    import sys

    from deepphase import io_utils

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".s.npz.{io_utils._HOST}-{gone.stdout.strip()}-k1ll3d.tmp"
    running = tmp_path / f".s.npz.{io_utils._HOST}-{os.getpid()}-runn1ng.tmp"
    elsewhere = tmp_path / f".s.npz.another-host-{gone.stdout.strip()}-3lsewh.tmp"
    for path in (killed, running, elsewhere):
        path.write_bytes(b"half a scan")
    assert run(["simulate", "--scan-shape", 10, 10, "--out", tmp_path / "s.npz"], capsys)[0] == 0
    assert not killed.exists() and running.exists() and elsewhere.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s.npz", running.name, elsewhere.name])


def test_a_gain_on_patterns_of_the_models_grid_is_taken_off(tiny_scan, tmp_path, capsys):
    """--gain was dropped without a word on patterns already on the model's 32×32 grid (only the calibration took
    it off): the dose, and what it decides (deblurring, the dose notes), were the gain's times too many (the docs
    audit, s39). They are now calibrated; with --no-calibration the gain is refused."""
    folder, _ = tiny_scan
    counts = np.load(folder / "counts.npy")
    np.save(tmp_path / "adu.npy", 5.0 * counts)
    common = ["--positions", folder / "positions.npy", "--no-probe-check"]
    assert run(["reconstruct", folder / "counts.npy", *common, "--out", tmp_path / "electrons"], capsys)[0] == 0
    code, _, err = run(["reconstruct", tmp_path / "adu.npy", *common, "--gain", 5, "--out", tmp_path / "adu"], capsys)
    assert code == 0 and "--gain 5: the patterns are on the model's 32×32 grid already" in err, err
    dose = [json.loads((tmp_path / name / "metadata.json").read_text())["processing"]["electrons_per_pattern"]
            for name in ("electrons", "adu")]
    assert dose[1] == pytest.approx(dose[0], rel=1e-3) and dose[0] == pytest.approx(counts.sum((1, 2)).mean(), rel=1e-3)
    code, _, err = run(["reconstruct", tmp_path / "adu.npy", *common, "--gain", 5, "--no-calibration", "--out",
                        tmp_path / "off"], capsys)
    assert code == 2 and "gain: 5 detector units per electron are taken off by the calibration" in err, err


@pytest.mark.parametrize("options, said", [
    (["--tile-size", 100], "tile-size: the patterns per task of a cluster (--workers/--scheduler)"),
    (["--sigma-scale", 2], "sigma-scale: a factor on the uncertainty, and none is asked for"),
])
def test_options_that_would_do_nothing_are_refused(options, said, tiny_scan, tmp_path, capsys):
    """--tile-size without a cluster and --sigma-scale without an uncertainty were accepted and dropped without a
    word, where other options that would do nothing are refused (the docs audit, s39)."""
    code, _, err = reconstruct_tiny(tiny_scan, tmp_path / "rec", capsys, *options)
    assert code == 2 and said in err, err
    assert not (tmp_path / "rec").exists()


def test_a_disk_off_the_models_on_its_grid_is_calibrated_and_one_of_another_size_is_noted(tiny_scan, tmp_path,
                                                                                          capsys):
    """Patterns on the model's 32×32 grid were read as they are: a disk 2 px down and 3 px across cost the image
    0.99 → 0.83 without a word (the calibration audit, s39). Under the default they are calibrated now, with a note
    (--no-calibration reads them as they are, noted); a disk of another size is noted (zooming it would change
    what the scan step in pixels means); the scan as simulated is neither."""
    from scipy import ndimage

    folder, _ = tiny_scan
    counts = np.load(folder / "counts.npy")
    np.save(tmp_path / "moved.npy", np.round(ndimage.shift(counts, (0, 2, 3), order=1).clip(0)))
    np.save(tmp_path / "wider.npy", np.round(ndimage.zoom(counts, (1, 1.1, 1.1), order=1)[:, 1:33, 1:33].clip(0)))
    said = "the patterns' bright-field disk is centred at"
    common = ["--positions", folder / "positions.npy", "--no-probe-check"]
    images = {}
    for data, *options in ((folder / "counts.npy",), (tmp_path / "moved.npy",),
                           (tmp_path / "moved.npy", "--no-calibration"), (tmp_path / "wider.npy",)):
        out = tmp_path / f"{data.stem}{len(options)}"
        code, _, err = run(["reconstruct", data, *common, *options, "--out", out], capsys)
        assert code == 0, err
        images[out.name] = np.load(out / "phase.npy").ravel()
        calibrated = json.loads((out / "metadata.json").read_text())["calibration"] is not None
        if out.name == "counts0":
            assert said not in err and not calibrated
        elif out.name == "moved0":
            assert "(17.67, 19.00) with a radius of 7.60 px" in err and calibrated
            assert "the patterns are calibrated onto the model's disk (as with --calibrate" in err
        else:
            assert "--calibrate moves and scales them onto the model's disk" in err and not calibrated, err
    assert "with a radius of 8.3" in err
    similar = {name: np.corrcoef(images["counts0"], image)[0, 1] for name, image in images.items()}
    assert similar["moved0"] > 0.95 and similar["moved1"] < 0.6, similar  # (0.972 and 0.323 when written)


def test_a_saturated_detector_is_noted_and_a_hot_pixel_or_plain_counts_are_not(tiny_scan, tmp_path, capsys):
    """Counts clipped at 63 (a 6-bit counter; the disk's mean is ~150) cost the image 0.99 → 0.51 and passed
    unnoticed (the calibration audit, s39)."""
    folder, _ = tiny_scan
    counts = np.load(folder / "counts.npy")
    hot = counts.copy()
    hot[:, 12, 20] = 60000  # one stuck pixel: the bad-pixel note's
    said = "bright pixels read exactly their highest value, 63 counts: is the detector saturated?"
    for name, data, noted in (("clipped", np.minimum(counts, 63), True), ("plain", counts, False), ("hot", hot, False)):
        np.save(tmp_path / f"{name}.npy", data)
        code, _, err = run(["reconstruct", tmp_path / f"{name}.npy", "--positions", folder / "positions.npy",
                            "--no-probe-check", "--out", tmp_path / f"out-{name}"], capsys)
        assert code == 0 and ("is the detector saturated?" in err) == noted, (name, err)
    assert "hot or dead" in err
    np.save(tmp_path / "clipped-amplitude.npy", np.sqrt(np.minimum(counts, 63)).astype(np.float32))
    code, _, err = run(["reconstruct", tmp_path / "clipped-amplitude.npy", "--positions", folder / "positions.npy",
                        "--no-probe-check", "--out", tmp_path / "out-clipped-amplitude"], capsys)
    assert code == 0 and said in err, err  # (the square roots of counts: told in counts)


def test_like_leaves_out_a_recorded_commands_own_options_written_short(tmp_path, capsys):
    """argparse takes any unambiguous prefix: a model trained with `--ov` recorded it, and `train --like` took it
    over and replaced a model in its --out without --overwrite (the training audit, s40)."""
    from deepphase.cli import _NOT_LIKE, _without, build_parser

    train = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[
        "train"]
    known = [option for option in train._option_string_actions if option.startswith("--")]
    recorded = ["--arch", "compact", "--ov", "--ou", "m", "--resu", "--ener", "300", "--semi=20", "--epochs", "3",
                "--s", "1"]  # (--s: ambiguous, as argparse found it: left as it is)
    assert _without(recorded, _NOT_LIKE, known) == ["--arch", "compact", "--epochs", "3", "--s", "1"]
    # Through the command: a model whose record says --ov, and a folder holding a model of the user's.
    from deepphase.models.modelfile import load_model, save_model

    model = load_model("default")
    model.info["training"] = {"command": f"deepphase train --arch compact --ov --ou {tmp_path / 'x'}"}
    save_model(model, tmp_path / "recorded")
    save_model(model, tmp_path / "precious")
    before = (tmp_path / "precious" / "model.safetensors").read_bytes()
    assert main(["train", "--like", str(tmp_path / "recorded"), "--out", str(tmp_path / "precious")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "precious" / "model.safetensors").read_bytes() == before


def test_a_factor_or_an_export_into_a_model_folder_a_training_holds_is_refused(tmp_path, capsys):
    """A training rewrites model.json and removes model.onnx as it saves each epoch: calibrate-uncertainty and
    export-onnx into its folder reported success, and their results were gone an epoch later (the training audit,
    s40). They take the folder's lock, as a second training does."""
    from deepphase.io_utils import folder_lock
    from deepphase.models.modelfile import load_model, save_model

    save_model(load_model("default"), tmp_path / "m")
    before = (tmp_path / "m" / "model.json").read_bytes()
    with folder_lock(tmp_path / "m"):  # (a training's)
        for command in (["calibrate-uncertainty", "--model", tmp_path / "m", "--scans", 1, "--side", 8],
                        ["export-onnx", "--out", tmp_path / "m" / "model.onnx"]):
            code, _, err = run(command, capsys)
            assert code == 2 and "another deepphase run is writing into" in err, err
    assert (tmp_path / "m" / "model.json").read_bytes() == before and not (tmp_path / "m" / "model.onnx").exists()


def test_a_scan_shape_a_file_with_positions_would_ignore_is_refused(tmp_path, capsys):
    """--scan-shape was dropped without a word for a file holding its positions, where --step, --rotation and
    --fastest are refused (the outputs audit, s40)."""
    assert run(["simulate", "--scan-shape", "4", "4", "--out", tmp_path / "s.npz"], capsys)[0] == 0
    code, _, err = run(["reconstruct", tmp_path / "s.npz", "--scan-shape", "2", "8", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "holds the scan's positions; --scan-shape, --step" in err, err
    assert not (tmp_path / "r").exists()


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path, capsys, monkeypatch):
    """`train --out ''` trained into the current folder (Path('') is '.'): the training audit, s40."""
    monkeypatch.chdir(tmp_path)
    for command in (["train", "--out", ""], ["reconstruct", "", "--out", "r"], ["simulate", "--out", ""]):
        code, _, err = run(command, capsys)
        assert code == 2 and "expected a path, got an empty one" in err, (command, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, said", [
    (["--mrad-per-px", "1.5"], "mrad-per-px: the patterns are on the model's 32×32 grid and read as they are"),
    (["--deblur", "on", "--stitching", "seed"], "deblur: the 'seed' stitching is never deblurred"),
])
def test_settings_model_grid_patterns_or_the_seeds_stitching_would_not_use_are_refused(options, said, tiny_scan,
                                                                                       tmp_path, capsys):
    """Both were taken without a word; the image was the same (the outputs audit, s40)."""
    code, _, err = reconstruct_tiny(tiny_scan, tmp_path / "rec", capsys, *options)
    assert code == 2 and said in err, err
    assert not (tmp_path / "rec").exists()


@pytest.mark.parametrize("options, said", [
    (["--out", "m.safetensors"], "out: the model folder to write"),  # (made a folder of that name)
    (["--out", "m", "--rank-data", "per-rank"], "rank-data: how several processes share the batches"),  # (ignored)
])
def test_train_options_that_would_mislead_are_refused_before_any_work(options, said, tmp_path, capsys, monkeypatch):
    """The training audit, s40: both were taken without a word."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["train", *options], capsys)
    assert code == 2 and said in err, err
    assert list(tmp_path.iterdir()) == []


def test_data_recorded_at_another_beam_energy_than_the_models_probe_is_noted(tmp_path, capsys):
    """A 300 keV model on an 80 keV scan at the same pixel size gave an image of correlation 0.11, with only a
    note on the disk's radius (and 8 of its edge pixels called hot): the training audit, s40."""
    from deepphase.models.modelfile import load_model, save_model

    model = load_model("default")
    model.info = {**model.info, "energy": 300.0}
    save_model(model, tmp_path / "m300")
    for kev in (80, 300):
        data = tmp_path / f"s{kev}.npz"
        assert run(["simulate", "--energy", kev, "--semi-angle", 20, "--sampling", 0.2, "--scan-shape", 8, 8,
                    "--out", data], capsys)[0] == 0
        code, _, err = run(["reconstruct", data, "--model", tmp_path / "m300", "--out", tmp_path / f"r{kev}"], capsys)
        assert code == 0 and ("the data were recorded at 80 keV, and the model's probe was made for 300 keV"
                              in err) == (kev == 80), err
        assert "hot or dead" not in err


def test_a_spherical_aberration_too_small_to_matter_is_noted_as_a_likely_unit_slip(tmp_path, capsys):
    """--cs takes Å: 1.2 (meant as mm) was taken as 1.2 Å without a word (the physics audit, s40)."""
    common = ["simulate", "--energy", 300, "--semi-angle", 20, "--sampling", 0.2, "--scan-shape", 4, 4]
    for cs, noted in ((1.2, True), (1.2e7, False), (0, False)):
        code, _, err = run([*common, "--cs", cs, "--out", tmp_path / f"cs{cs}.npz"], capsys)
        assert code == 0 and ("1.2 mm is --cs 1.2e+07" in err) == noted, err


def test_models_lists_the_packaged_models_and_a_folder(tmp_path, capsys):
    import json
    import shutil

    from deepphase.models.modelfile import load_model, packaged_model_path, packaged_models

    code, out, _ = run(["models"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["model", "arch", "parameters"]
    listed = {line.split()[0]: line for line in lines[1:] if line.strip() and not line.startswith("all for")}
    assert set(listed) == set(packaged_models())
    default = load_model("default")
    assert f"{sum(p.numel() for p in default.network.parameters()):,}" in listed["default"]
    assert "10–1,000,000" in listed["default"] and "σ head" in listed["default"]
    assert "3×3 neighbourhood" in listed["neighbourhood"] and "probe-aware" in listed["probe-aware"]
    shutil.copytree(packaged_model_path("seed"), tmp_path / "mine")
    code, out, _ = run(["models", tmp_path / "mine", "--json"], capsys)
    (record,) = json.loads(out)
    assert code == 0 and record["name"] == "mine" and record["arch"] == "seed-unet"
    assert record["weights_sha256"] == json.loads((tmp_path / "mine" / "model.json").read_text())["weights_sha256"]
    assert record["dose_e_per_pattern"] == pytest.approx(27881.8) and record["corpus"] == {"natural": 1.0}


def test_inspect_says_what_a_file_holds_and_draws_its_virtual_image_the_right_way_round(tiny_scan, tmp_path, capsys):
    import json

    folder, scan = tiny_scan
    counts = np.round(scan.amplitude.astype(np.float64) ** 2)  # 12×12 positions, the row varying fastest
    counts = np.broadcast_to(counts.mean(axis=0), counts.shape)  # one pattern, brighter frame by frame: the image's
    scale = 1 + np.arange(len(counts)) / len(counts)           # gradient shows the order
    np.save(tmp_path / "frames.npy", np.round(counts * scale[:, None, None]).astype(np.float32))  # (counts)
    code, out, _ = run(["inspect", tmp_path / "frames.npy", "--scan-shape", "12", "12", "--json"], capsys)
    summary = json.loads(out)
    assert code == 0 and summary["patterns"] == 144 and summary["scan_shape"] == [12, 12]
    assert summary["fastest"] == "row" and summary["values"]["kind"] == "counts"
    assert summary["disk"]["radius_px"] == pytest.approx(7.6, abs=0.1) and summary["model"]["on_its_grid"]
    from deepphase.data.inspection import inspect_scan

    _, arrays = inspect_scan(tmp_path / "frames.npy", scan_shape=(12, 12), progress=False)
    image = arrays["virtual_bright_field"]
    # Frame k is position (k % 12, k // 12) (rows fastest): brightness grows down a column, then across the columns.
    assert image.shape == (12, 12) and np.all(np.diff(image[:, 0]) > 0) and np.all(np.diff(image[0]) > 0)
    assert image[11, 0] < image[0, 1]
    code, out, _ = run(["inspect", tmp_path / "frames.npy", "--scan-shape", "12", "12", "--figure",
                        tmp_path / "look.png"], capsys)
    assert code == 0 and "reconstruct: used as they are" in out and (tmp_path / "look.png").stat().st_size > 10_000
    assert run(["inspect", tmp_path / "frames.npy", "--scan-shape", "12", "12", "--figure", tmp_path / "look.png"],
               capsys)[0] == 2  # (not replaced unasked)
    code, _, err = run(["inspect", tmp_path / "frames.npy", "--scan-shape", "10", "12"], capsys)
    assert code == 2 and "10×12 = 120 positions do not match the 144 patterns" in err
    # Told as reconstruct decides: a disk 2 px off the model's is calibrated; a 4-D file's own scan is not overruled
    shifted = np.roll(np.round(counts), 2, axis=1).reshape(12, 12, 32, 32)
    np.save(tmp_path / "off.npy", shifted.astype(np.float32))
    code, out, _ = run(["inspect", tmp_path / "off.npy"], capsys)
    assert code == 0 and "reconstruct: calibrated: the disk is off the model's" in out
    code, _, err = run(["inspect", tmp_path / "off.npy", "--scan-shape", "6", "24"], capsys)
    assert code == 2 and "6×24 given, but the file's scan is 12×12" in err


def test_a_files_step_without_the_pixel_size_asks_only_for_what_is_missing(tmp_path, capsys):
    """The file records its scan step in Å and its detector sampling in Å⁻¹, not the energy: "--energy KEV with
    --semi-angle MRAD or --mrad-per-px X" asked for what the file holds (the formats audit, s41)."""
    from .test_io_formats import write_emd

    rows, cols = np.indices((64, 64))
    disk = 100.0 * (np.hypot(rows - 31.5, cols - 32.2) < 14)
    frames = np.random.default_rng(0).poisson(np.broadcast_to(disk, (4, 5, 64, 64))).astype(np.uint16)
    path = write_emd(tmp_path / "scan.emd", frames)
    code, _, err = run(["reconstruct", path, "--out", tmp_path / "r"], capsys)
    assert code == 2 and err.rstrip().endswith("give --step S, or --energy KEV (the detector's sampling is known)")


def test_patterns_on_the_models_grid_get_a_pixel_size_from_the_energy_and_semi_angle(tiny_scan, tmp_path, capsys):
    """--energy 300 --semi-angle 25 on the model's grid left the outputs in px, although --energy's help promises the
    pixel size (the figures audit, s41): λ / (n · semi-angle / the disk's radius)."""
    from deepphase.data.calibration import model_disk
    from deepphase.physics import reference_probe
    from deepphase.physics.probe import electron_wavelength

    folder, _ = tiny_scan
    args = ["reconstruct", folder / "amplitude.npy", "--positions", folder / "positions.npy", "--energy", "300",
            "--semi-angle", "25", "--out", tmp_path / "r"]
    assert run(args, capsys)[0] == 0
    processing = json.loads((tmp_path / "r" / "metadata.json").read_text())["processing"]
    from deepphase.data.calibration import find_disk

    radius = find_disk((np.load(folder / "amplitude.npy").astype(np.float64) ** 2).mean(axis=0))["radius"]  # the data's
    assert radius == pytest.approx(model_disk(reference_probe())["radius"], rel=0.01)
    expected = electron_wavelength(300) / (32 * 25e-3 / radius)
    assert processing["pixel_size_angstrom"] == pytest.approx(expected, rel=1e-6)
    assert processing["pixel_size_from"] == "energy and semi-angle"
