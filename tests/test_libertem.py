"""PhaseUDF: deepphase inside LiberTEM gives the pipeline's image, of the whole scan and while it runs."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("libertem")

import libertem.api as lt  # noqa: E402

from deepphase.data.io import AmplitudeView  # noqa: E402
from deepphase.errors import DeepPhaseError, ShapeError, ValueRangeError  # noqa: E402
from deepphase.physics.scan import raster_positions  # noqa: E402
from deepphase.reconstruction.libertem_udf import (  # noqa: E402
    PhaseUDF,
    calibrate_dataset,
    reconstruct_file,
    to_reconstruction,
)
from deepphase.reconstruction.pipeline import reconstruct  # noqa: E402

NAV = (10, 13)  # scan rows, scan columns: not square, so a swapped axis shows
STEP = 0.87


@pytest.fixture(scope="module")
def counts():
    """Poisson counts of a twisted-hBN raster, frames in LiberTEM's order (the column fastest)."""
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.physics import reference_probe

    positions = raster_positions(NAV, STEP, 0.0, "col")
    truth = builtin_specimen("twisted-hbn", required_object_shape(positions, 32), seed=0)
    scan = simulate_scan(truth, reference_probe(), positions, seed=0, progress=False)
    return np.square(scan.amplitude).round().astype(np.float32), positions


@pytest.fixture(scope="module")
def ctx():
    return lt.Context.make_with("inline")


def _reference(frames, positions, **kw):
    return reconstruct(AmplitudeView(frames, "counts"), positions, progress=False, engine="eager", **kw)


def _on_object_grid(buffers, name="phase"):
    """A result buffer (the scanned area, top-left at ``origin_px``) on the object grid from pixel (0, 0)."""
    box = buffers[name].data
    r0, c0 = (int(k) for k in buffers["origin_px"].data)
    image = np.full((r0 + box.shape[0], c0 + box.shape[1]), np.nan, dtype=np.float32)
    image[r0:, c0:] = box
    return image


def _assert_same_image(image, expected, atol=1e-5):
    """Equal where both are finite, NaN at the same pixels, on the larger of the two grids (NaN beyond each)."""
    shape = np.maximum(image.shape, expected.shape)
    a, b = np.full(shape, np.nan), np.full(shape, np.nan)
    a[: image.shape[0], : image.shape[1]] = image
    b[: expected.shape[0], : expected.shape[1]] = expected
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_the_udf_makes_the_pipelines_image_of_the_whole_scan(counts, ctx, tmp_path):
    frames, positions = counts
    ds = ctx.load("memory", data=frames.reshape(*NAV, 32, 32), sig_dims=2, num_partitions=3)
    udf = PhaseUDF(step_px=STEP, engine="eager")
    result = ctx.run_udf(dataset=ds, udf=udf)
    reference = _reference(frames, positions)
    _assert_same_image(_on_object_grid(result), reference.full)
    # The buffer holds the scanned area only (what a live plot shows), not the probe windows' margins.
    assert not np.isnan(result["phase"].data[[0, -1]]).all(axis=1).any()
    assert not np.isnan(result["phase"].data[:, [0, -1]]).all(axis=0).any()
    assert result["patterns"].data[0] == len(positions)
    assert result["electrons_per_pattern"].data[0] == pytest.approx(frames.sum() / len(frames))

    rec = to_reconstruction(udf, result)
    assert rec.origin_px == reference.origin_px
    np.testing.assert_allclose(rec.phase, reference.phase, rtol=0, atol=1e-5)
    assert rec.processing["deblurred"] is reference.processing["deblurred"] is True
    assert rec.processing["electrons_per_pattern"] == reference.processing["electrons_per_pattern"]
    from deepphase.reconstruction.pipeline import write_outputs

    meta = write_outputs(rec, tmp_path, {"data": "memory"})
    assert np.array_equal(np.load(tmp_path / "phase.npy"), rec.phase) and meta["processing"]["patterns"] == 130


def test_while_the_scan_runs_the_image_is_the_pipelines_image_of_the_positions_so_far(counts, ctx):
    frames, positions = counts
    ds = ctx.load("memory", data=frames.reshape(*NAV, 32, 32), sig_dims=2, num_partitions=4)
    seen = []
    result_shape = ctx.run_udf(dataset=ds, udf=PhaseUDF(step_px=STEP, engine="eager"))["phase"].data.shape
    for part in ctx.run_udf_iter(dataset=ds, udf=PhaseUDF(step_px=STEP, engine="eager", deblur=False)):
        done = int(part.damage.data.sum())
        buffers = part.buffers[0]
        assert buffers["patterns"].data[0] == done
        if done < len(positions):
            reference = _reference(frames[:done], positions[:done], deblur=False)
            assert buffers["phase"].data.shape == result_shape  # the whole scan's area from the start
            _assert_same_image(_on_object_grid(buffers), reference.full)
        seen.append(done)
    assert seen == sorted(seen) and seen[-1] == len(positions) and len(seen) == 4


def test_the_sigma_heads_uncertainty_is_the_pipelines_whole_and_while_the_scan_runs(counts, ctx):
    frames, positions = counts
    ds = ctx.load("memory", data=frames.reshape(*NAV, 32, 32), sig_dims=2, num_partitions=3)
    udf = PhaseUDF(step_px=STEP, engine="eager", uncertainty="head")
    parts = list(ctx.run_udf_iter(dataset=ds, udf=udf))
    reference = _reference(frames, positions, sigma_head=True)
    result = parts[-1].buffers[0]
    rec = to_reconstruction(udf, result)
    assert rec.uncertainty.shape == reference.uncertainty.shape and np.nanmin(rec.uncertainty) > 0
    np.testing.assert_allclose(rec.uncertainty, reference.uncertainty, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rec.phase, reference.phase, rtol=0, atol=1e-5)
    # (the factor is read at the dose: the pipeline's from a sample of the frames, the UDF's from all)
    assert rec.processing["uncertainty"]["sigma_scale"] == pytest.approx(
        reference.processing["uncertainty"]["sigma_scale"], rel=1e-4)
    assert np.array_equal(np.isnan(result["uncertainty"].data), np.isnan(result["phase"].data))
    done = int(parts[0].damage.data.sum())  # the first partition's positions alone
    early = _reference(frames[:done], positions[:done], sigma_head=True)
    sigma = _on_object_grid(parts[0].buffers[0], "uncertainty")
    (r0, c0), (rows, cols) = early.origin_px, early.uncertainty.shape
    np.testing.assert_allclose(sigma[r0 : r0 + rows, c0 : c0 + cols], early.uncertainty, rtol=1e-5, atol=1e-6)
    assert np.isnan(sigma[r0 + rows :]).all()
    with pytest.raises(ValueRangeError, match="Monte Carlo dropout and ensembles need deepphase reconstruct"):
        PhaseUDF(step_px=STEP, uncertainty=8)
    with pytest.raises(ValueRangeError, match="'head' needs a model trained with a σ head"):
        ctx.run_udf(dataset=ds, udf=PhaseUDF(model="seed", step_px=STEP, uncertainty="head"))


def test_a_roi_reconstructs_its_positions_and_row_fastest_frames_swap_the_navigation_axes(counts, ctx):
    frames, positions = counts
    roi = np.zeros(NAV, dtype=bool)
    roi[2:8, 3:11] = True
    ds = ctx.load("memory", data=frames.reshape(*NAV, 32, 32), sig_dims=2, num_partitions=2)
    result = ctx.run_udf(dataset=ds, udf=PhaseUDF(step_px=STEP, engine="eager"), roi=roi)
    keep = roi.reshape(-1)
    reference = _reference(frames[keep], positions[keep])
    _assert_same_image(_on_object_grid(result), reference.full)
    assert result["patterns"].data[0] == keep.sum()

    # The same scan recorded with the scan row varying fastest: LiberTEM sees navigation axes (column, row).
    order = np.arange(len(frames)).reshape(NAV).T.reshape(-1)
    swapped = ctx.load("memory", data=frames[order].reshape(NAV[1], NAV[0], 32, 32), sig_dims=2)
    result = ctx.run_udf(dataset=swapped, udf=PhaseUDF(step_px=STEP, fastest="row", engine="eager"))
    _assert_same_image(_on_object_grid(result), _reference(frames, positions).full)


def test_detector_patterns_are_calibrated_as_the_pipeline_calibrates_them(counts, ctx, tmp_path):
    """64×64 detector frames, the disk zoomed 1.9× and off centre, a hot pixel: calibrate_dataset measures
    what calibrate measures on the same frames, and the UDF's image is the pipeline's of the calibrated view."""
    from deepphase.data.calibration import calibrate
    from deepphase.models.modelfile import load_model

    frames, positions = counts
    rng = np.random.default_rng(0)
    zoom, size = 1.9, 64
    rows, cols = np.indices((size, size), dtype=np.float64)
    detector = np.empty((len(frames), size, size), dtype=np.uint16)
    for i, pattern in enumerate(frames):
        fine = ndimage.map_coordinates(pattern, [16 + (rows - 30.2) / zoom, 16 + (cols - 33.6) / zoom], order=1,
                                       mode="constant", cval=0.0).clip(0)
        detector[i] = rng.poisson(fine * (pattern.sum() / fine.sum()))
    detector[:, 5, 50] = 3000
    ds = ctx.load("memory", data=detector.reshape(*NAV, size, size), sig_dims=2, num_partitions=3)

    with pytest.raises(ShapeError, match=r"patterns of shape \(64, 64\).*calibrate_dataset"):
        ctx.run_udf(dataset=ds, udf=PhaseUDF(step_px=STEP))
    view = calibrate_dataset(ctx, ds, step_px=STEP, png=tmp_path / "calibration.png")
    assert view.info["masked_pixels"]["count"] == 1 and view.info["zoom"] == pytest.approx(1 / zoom, rel=0.02)
    assert (tmp_path / "calibration.png").exists()
    expected, _ = calibrate(detector, load_model(), positions)
    np.testing.assert_allclose(view.info["center_px"], expected.info["center_px"], atol=1e-9)

    result = ctx.run_udf(dataset=ds, udf=PhaseUDF(step_px=STEP, calibration=view, engine="eager"))
    reference = reconstruct(expected, positions, progress=False, engine="eager")
    _assert_same_image(_on_object_grid(result), reference.full)
    assert result["electrons_per_pattern"].data[0] == pytest.approx(expected.electrons_per_pattern, rel=0.01)

    # From a file, as reconstruct --libertem runs it: the kind read from the frames, calibrated because 64 ≠ 32.
    np.save(tmp_path / "detector.npy", detector.reshape(*NAV, size, size))
    rec, read = reconstruct_file(tmp_path / "detector.npy", step_px=STEP, engine="eager", ctx=ctx,
                                 calibration_png=tmp_path / "from-file.png")
    assert read["input"] == "counts" and read["pattern_shape"] == [size, size]
    assert read["calibration"]["zoom"] == pytest.approx(view.info["zoom"], rel=1e-9)
    assert rec.origin_px == reference.origin_px
    np.testing.assert_allclose(rec.phase, reference.phase, rtol=0, atol=1e-5)

    # The scan rotation found from the calibrated patterns (descan removed), as the CLI's pipeline finds it.
    from deepphase.data.calibration import scan_rotation_from_patterns

    found = scan_rotation_from_patterns(expected, NAV, "col")
    rec, read = reconstruct_file(tmp_path / "detector.npy", step_px=STEP, engine="eager", ctx=ctx, rotation_deg="auto",
                                 calibration_png=tmp_path / "again.png")
    assert read["rotation_found"].pop("sense") == {"skipped": "fewer than 16 positions a side"}  # (a 10×13 scan)
    assert read["rotation_found"] == found and read["rotation_deg"] == found["rotation_deg"]
    rotated = raster_positions(NAV, STEP, found["rotation_deg"], "col")
    expected.use_coords(rotated)
    reference = reconstruct(expected, rotated, progress=False, engine="eager")
    assert rec.origin_px == reference.origin_px
    np.testing.assert_allclose(rec.phase, reference.phase, rtol=0, atol=1e-5)


def test_a_mirrored_detector_is_flipped_as_the_pipeline_flips_it(counts, ctx, tmp_path):
    """Patterns mirrored in k_row: PhaseUDF(flip_patterns=True) makes the pipeline's image of them unmirrored;
    find_rotation finds the mirror, and reconstruct_file with rotation 'auto' flips them."""
    from deepphase.physics import flip_patterns
    from deepphase.reconstruction.libertem_udf import find_rotation

    frames, positions = counts
    mirrored = flip_patterns(frames)
    ds = ctx.load("memory", data=mirrored.reshape(*NAV, 32, 32), sig_dims=2, num_partitions=3)
    result = ctx.run_udf(dataset=ds, udf=PhaseUDF(step_px=STEP, flip_patterns=True, engine="eager"))
    _assert_same_image(_on_object_grid(result), _reference(frames, positions).full)
    found = find_rotation(ctx, ds, STEP)
    assert found["flip_patterns"] and abs(found["rotation_deg"]) < 5 and found["curl_ratio_other"] > 0.25
    np.save(tmp_path / "mirrored.npy", mirrored.reshape(*NAV, 32, 32))
    rec, read = reconstruct_file(tmp_path / "mirrored.npy", step_px=STEP, engine="eager", ctx=ctx, rotation_deg="auto")
    assert read["patterns_flipped"] and not read["rows_reversed"] and read["rotation_deg"] == found["rotation_deg"]
    reference = _reference(frames, raster_positions(NAV, STEP, found["rotation_deg"], "col"))
    assert rec.origin_px == reference.origin_px
    np.testing.assert_allclose(rec.phase, reference.phase, rtol=0, atol=1e-5)


def test_a_given_rotation_is_checked_as_the_pipeline_checks_it(ctx, tmp_path, capsys):
    """Mirrored patterns reconstructed at the default rotation: reconstruct_file's check finds what the pipeline's
    finds (the same centre-of-mass block, the same numbers) and says so in the same note."""
    from deepphase.cli import main
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.physics import flip_patterns, reference_probe

    positions = raster_positions((20, 20), STEP, 0.0, "col")
    truth = builtin_specimen("twisted-hbn", required_object_shape(positions, 32), seed=1)
    counts = np.square(simulate_scan(truth, reference_probe(), positions, seed=0, progress=False).amplitude).round()
    np.save(tmp_path / "mirrored.npy", flip_patterns(counts).astype(np.float32).reshape(20, 20, 32, 32))
    _, read = reconstruct_file(tmp_path / "mirrored.npy", step_px=STEP, engine="eager", ctx=ctx,
                               rotation_png=tmp_path / "rotation.png")
    check = read["rotation_check"]
    assert (tmp_path / "rotation.png").stat().st_size > 10_000 and read["rotation_png"] == str(tmp_path / "rotation.png")
    assert check["flip_patterns"] and "mirrored" in check["note"] and not read["patterns_flipped"]
    assert main(["reconstruct", str(tmp_path / "mirrored.npy"), "--step", str(STEP), "--fastest", "col",
                 "--out", str(tmp_path / "pipeline")]) == 0
    assert check["note"] in capsys.readouterr().err
    expected = json.loads((tmp_path / "pipeline" / "metadata.json").read_text())["rotation_check"]
    assert check["rotation_deg"] == expected["rotation_deg"] and check["block"] == expected["block"]
    for key in ("curl_ratio", "curl_ratio_other", "curl_ratio_given", "noise_floor"):
        assert check[key] == pytest.approx(expected[key], rel=1e-6), key


@pytest.mark.slow  # (17–25 s on 2 cores: the default run stays under 10 minutes; -m slow runs it)
def test_the_probe_is_checked_as_the_pipeline_checks_it(tmp_path, capsys):
    """A defocused probe on a rotated raster with the row fastest: reconstruct_file's probe check reads the same
    block (LiberTEM's navigation axes swapped back) and finds the pipeline's numbers; the CLI writes the estimate."""
    from deepphase.cli import main
    from deepphase.data.aberrations import add_aberrations
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.physics import reference_probe

    positions = raster_positions((20, 24), STEP, 15.0, "row")
    truth = builtin_specimen("twisted-hbn", required_object_shape(positions, 32), seed=2)
    probe = add_aberrations(reference_probe(), (-0.02, 0.0, -0.02))
    counts = np.square(simulate_scan(truth, probe, positions, seed=0, progress=False).amplitude).round()
    np.save(tmp_path / "scan.npy", counts.astype(np.float32))  # (N, 32, 32): LiberTEM needs nav_shape
    args = ["reconstruct", str(tmp_path / "scan.npy"), "--scan-shape", "20", "24", "--step", str(STEP),
            "--rotation", "15", "--fastest", "row"]
    assert main([*args, "--out", str(tmp_path / "pipeline")]) == 0
    expected = json.loads((tmp_path / "pipeline" / "metadata.json").read_text())["probe_check"]
    assert main([*args, "--libertem", "--out", str(tmp_path / "libertem")]) == 0
    assert "the data's probe differs from the model's by defocus -1.1" in capsys.readouterr().err
    check = json.loads((tmp_path / "libertem" / "metadata.json").read_text())["probe_check"]
    assert check["note"] and check["defocus_rad_per_px2"] == pytest.approx(-0.02, abs=0.002)
    assert check["block"] == expected["block"]
    np.testing.assert_allclose(check["coefficients"], expected["coefficients"], atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "libertem" / "probe_estimate.npy"),
                               np.load(tmp_path / "pipeline" / "probe_estimate.npy"), atol=1e-5)


@pytest.mark.slow  # (18–22 s on 2 cores; a sibling in the default run covers its parts, s40: the run stayed under 10 minutes)
def test_a_probe_aware_model_is_told_what_the_pipeline_tells_it(tmp_path, capsys):
    from deepphase.cli import main
    from deepphase.physics import reference_probe

    from .test_aberrations import save_scan
    from .test_probe_aware import save_aware_model

    model = save_aware_model(tmp_path / "aware", reference_probe())
    save_scan(tmp_path / "scan.npy", reference_probe(), (0.02, 0.0, 0.02), shape=(20, 20))  # row fastest
    args = ["reconstruct", str(tmp_path / "scan.npy"), "--scan-shape", "20", "20", "--step", str(STEP),
            "--fastest", "row", "--model", str(model), "--engine", "eager"]
    assert main([*args, "--out", str(tmp_path / "pipeline")]) == 0
    assert main([*args, "--libertem", "--out", str(tmp_path / "libertem")]) == 0
    metas = [json.loads((tmp_path / name / "metadata.json").read_text())["probe_aware"] for name in ("pipeline", "libertem")]
    assert metas[0]["from"] == metas[1]["from"] == "the probe check" and metas[0]["told_edge_phase_rad"] > 0.9
    np.testing.assert_allclose(metas[1]["told_coefficients_rad_per_px2"], metas[0]["told_coefficients_rad_per_px2"],
                               atol=1e-6)
    assert "the probe-aware model was told this difference" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(tmp_path / "libertem" / "phase.npy"), np.load(tmp_path / "pipeline" / "phase.npy"),
                               atol=1e-4)
    assert main([*args, "--no-probe-check", "--out", str(tmp_path / "untold")]) == 0  # (telling matters)
    assert np.abs(np.load(tmp_path / "untold" / "phase.npy") - np.load(tmp_path / "pipeline" / "phase.npy")).max() > 1e-2


@pytest.mark.slow  # (18–22 s on 2 cores; a sibling in the default run covers its parts, s40: the run stayed under 10 minutes)
def test_a_merlin_file_is_read_with_its_rows_as_the_pipeline_reads_them(counts, tmp_path, capsys):
    """LiberTEM reads a Merlin .mib's rows bottom-up against rosettasciio, the pipeline's reader: --libertem
    reverses them, so both make the same image (calibrated 64×64 frames with --rotation auto, and 32×32 frames
    used as they are); a .mib beside its .hdr opens without --scan-shape, and without it is refused in one line."""
    pytest.importorskip("rsciio")
    from deepphase.cli import main

    from .test_io_formats import write_mib

    frames, _ = counts
    detector = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)  # 64×64, each pixel a quarter of the counts
    rng = np.random.default_rng(1)
    detector = rng.binomial(detector.astype(np.int64), 0.25).astype(np.uint16)
    cases = {"detector.mib": write_mib(tmp_path / "detector.mib", detector, frames_per_trigger=NAV[1]),
             "model-grid.mib": write_mib(tmp_path / "model-grid.mib", frames.astype(np.uint16),
                                         frames_per_trigger=NAV[1])}
    for (name, path), rotation in zip(cases.items(), ("auto", "0")):
        common = [str(path), "--step", str(STEP), "--rotation", rotation, "--engine", "eager"]
        out = {}
        for how, extra in (("pipeline", []), ("libertem", ["--libertem", "--workers", "1"])):
            out[how] = tmp_path / f"{name}-{how}"
            assert main(["reconstruct", *common, *extra, "--out", str(out[how])]) == 0, capsys.readouterr().err
        meta = json.loads((out["libertem"] / "metadata.json").read_text())
        assert meta["data_info"]["libertem_dataset"] == "MIBDataSet" and meta["data_info"]["rows_reversed"]
        assert meta["data_info"]["navigation_shape"] == list(NAV) and meta["patterns_flipped"] is False
        np.testing.assert_allclose(np.load(out["libertem"] / "phase.npy"), np.load(out["pipeline"] / "phase.npy"),
                                   rtol=0, atol=1e-5, err_msg=f"{name}, rotation {rotation}")
    # The README's Python recipe (its .hdr opened; calibrate_dataset and PhaseUDF with their defaults) makes the
    # pipeline's image: the calibration tells PhaseUDF that LiberTEM reads this file's rows the other way round.
    assert main(["reconstruct", str(cases["detector.mib"]), "--step", str(STEP), "--engine", "eager",
                 "--out", str(tmp_path / "at-zero")]) == 0
    with lt.Context.make_with("inline") as inline:
        ds = inline.load("auto", path=str(tmp_path / "detector.hdr"))
        calibration = calibrate_dataset(inline, ds, step_px=STEP)
        assert calibration.info["rows_reversed"]
        udf = PhaseUDF(step_px=STEP, calibration=calibration, engine="eager")
        rec = to_reconstruction(udf, inline.run_udf(dataset=ds, udf=udf))
    np.testing.assert_allclose(rec.phase, np.load(tmp_path / "at-zero" / "phase.npy"), rtol=0, atol=1e-4)
    # A scan shape other than the .hdr's is refused before LiberTEM opens the file, as the pipeline refuses it.
    capsys.readouterr()
    assert main(["reconstruct", str(cases["detector.mib"]), "--scan-shape", str(NAV[1]), str(NAV[0]), "--step",
                 str(STEP), "--libertem", "--workers", "1", "--out", str(tmp_path / "transposed")]) == 2
    assert f"scan-shape: {NAV[1]}×{NAV[0]} differs from the {NAV[0]}×{NAV[1]} scan" in capsys.readouterr().err
    # Without its .hdr LiberTEM needs the scan shape: one line that says so (it raised a ValueError through).
    (tmp_path / "detector.hdr").unlink()
    capsys.readouterr()
    assert main(["reconstruct", str(cases["detector.mib"]), "--step", str(STEP), "--libertem", "--workers", "1",
                 "--out", str(tmp_path / "no-hdr")]) == 2
    err = capsys.readouterr().err
    assert "LiberTEM could not open" in err and "--scan-shape" in err and "Traceback" not in err


def test_a_hot_pixel_is_named_as_the_pipeline_names_it(counts, tmp_path, capsys):
    """On patterns read as they are (the model's grid, not calibrated) --libertem names a hot pixel as the pipeline
    does, in the same (row, col) of a Merlin file whose rows LiberTEM reads the other way round."""
    pytest.importorskip("rsciio")
    from deepphase.cli import main

    from .test_io_formats import write_mib

    frames = counts[0].astype(np.uint16)
    frames[:, 12, 20] = 60000
    path = write_mib(tmp_path / "hot.mib", frames, frames_per_trigger=NAV[1])
    for how, extra in (("pipeline", []), ("libertem", ["--libertem", "--workers", "1"])):
        capsys.readouterr()
        assert main(["reconstruct", str(path), "--step", str(STEP), "--engine", "eager", *extra,
                     "--out", str(tmp_path / how)]) == 0
        assert "1 detector pixel of the patterns looks hot or dead (at (12, 20)" in capsys.readouterr().err, how
        assert any("hot or dead" in text for text in
                   json.loads((tmp_path / how / "metadata.json").read_text())["notes"]), how


def test_a_disk_off_the_models_and_a_dark_level_are_noted_and_calibrated_as_the_pipeline_does(counts, ctx, tmp_path,
                                                                                                capsys):
    """Model-grid patterns whose disk sits 2 px down and 3 px across, with a dark level of 15 counts left in: the
    pipeline calibrates them and says so, and notes the dark level; --libertem did neither (the s39 note)."""
    from deepphase.cli import main

    frames, _ = counts
    moved = ndimage.shift(frames, (0, 2, 3), order=0, mode="constant") + 15  # (whole pixels: the shift is exact)
    np.save(tmp_path / "scan.npy", moved.reshape(*NAV, 32, 32))
    assert main(["reconstruct", str(tmp_path / "scan.npy"), "--step", str(STEP), "--engine", "eager",
                 "--no-probe-check", "--out", str(tmp_path / "pipeline")]) == 0
    said = capsys.readouterr().err
    rec, read = reconstruct_file(tmp_path / "scan.npy", step_px=STEP, engine="eager", probe_check=False, ctx=ctx)
    for how, notes, calibration in (
            ("pipeline", said, json.loads((tmp_path / "pipeline" / "metadata.json").read_text())["calibration"]),
            ("libertem", " ".join(read["pattern_notes"]), read["calibration"])):
        assert "the patterns are calibrated onto the model's disk" in notes, how
        assert "a detector's dark level not subtracted?" in notes, how
        assert calibration["center_px"] == pytest.approx([17.7, 19.0], abs=0.1), how
    _assert_same_image(rec.phase, np.load(tmp_path / "pipeline" / "phase.npy"), atol=1e-4)


def test_a_saturated_detector_is_noted_as_the_pipeline_notes_it(counts, ctx, tmp_path):
    frames, _ = counts
    np.save(tmp_path / "clipped.npy", np.minimum(frames, 63).reshape(*NAV, 32, 32))
    _, read = reconstruct_file(tmp_path / "clipped.npy", step_px=STEP, engine="eager", probe_check=False, ctx=ctx)
    assert any("63 counts: is the detector saturated?" in text for text in read["pattern_notes"]), read["pattern_notes"]


def test_dask_workers_in_other_processes_make_the_same_image(counts, tmp_path):
    frames, positions = counts
    path = tmp_path / "scan.npy"
    np.save(path, frames.reshape(*NAV, 32, 32))
    with lt.Context.make_with("dask", cpus=2) as ctx:
        ds = ctx.load("npy", path=str(path), sig_dims=2, num_partitions=4)
        result = ctx.run_udf(dataset=ds, udf=PhaseUDF(step_px=STEP, engine="eager"))
        image = _on_object_grid(result)
    _assert_same_image(image, _reference(frames, positions).full)


def test_bad_settings_and_data_are_refused_with_what_was_expected(counts, ctx):
    frames, _ = counts
    with pytest.raises(ValueRangeError, match="either the raster's step_px or the positions"):
        PhaseUDF()
    with pytest.raises(ValueRangeError, match="either the raster's step_px or the positions"):
        PhaseUDF(step_px=1.0, positions=np.zeros((4, 2)))
    with pytest.raises(ValueRangeError, match="kind: expected 'counts' or 'amplitude'"):
        PhaseUDF(step_px=1.0, kind="intensity")
    for options, match in (({"fastest": "column"}, "fastest: expected 'row' or 'col'"),
                           ({"engine": "tensorrt"}, "engine: expected 'auto' or one of eager"),
                           ({"precision": "fp8"}, "precision: expected one of auto"),
                           ({"step_px": -0.87}, "step_px: expected a positive raster step")):
        with pytest.raises(ValueRangeError, match=match):  # when made, not when LiberTEM runs it
            PhaseUDF(**{"step_px": 1.0, **options})
    with pytest.raises(TypeError, match="stepp_px"):  # a misspelt keyword is not kept as a parameter
        PhaseUDF(step_px=1.0, stepp_px=0.87)
    with pytest.raises(ValueRangeError, match="calibration: expected what calibrate_dataset returns"):
        PhaseUDF(step_px=1.0, calibration="calibration.json")
    ds = ctx.load("memory", data=frames.reshape(*NAV, 32, 32), sig_dims=2)
    with pytest.raises(ShapeError, match="130 diffraction patterns"):
        ctx.run_udf(dataset=ds, udf=PhaseUDF(positions=np.zeros((7, 2))))
    with pytest.raises(DeepPhaseError, match="neighbourhood of patterns, which crosses LiberTEM's partitions"):
        ctx.run_udf(dataset=ds, udf=PhaseUDF(model="neighbourhood", step_px=STEP))
    flat = ctx.load("memory", data=frames, sig_dims=2)
    with pytest.raises(ShapeError, match="a raster needs a 2D navigation shape"):
        ctx.run_udf(dataset=flat, udf=PhaseUDF(step_px=STEP))
    # The scan rotation: the frames' navigation axes swapped (fastest="row") are the scan transposed, a mirror
    # that the flip and a quarter turn undo; frames out of order have no clear minimum of the curl.
    from deepphase.reconstruction.libertem_udf import find_rotation

    ds = ctx.load("memory", data=frames.reshape(*NAV, 32, 32), sig_dims=2)
    found = find_rotation(ctx, ds, STEP, "col")
    assert abs(found["rotation_deg"]) < 5 and not found["flip_patterns"]  # the raster has none
    transposed = find_rotation(ctx, ds, STEP, "row")
    assert transposed["flip_patterns"] and abs(abs(transposed["rotation_deg"]) - 90) < 5
    shuffled = frames[np.random.default_rng(0).permutation(len(frames))]
    with pytest.raises(ValueRangeError, match=r"no clear minimum \(curl ratio 0\.[3-9]"):
        find_rotation(ctx, ctx.load("memory", data=shuffled.reshape(*NAV, 32, 32), sig_dims=2), STEP, "col")
    bad = frames.copy()
    bad[77, 3, 3] = -5
    ds = ctx.load("memory", data=bad.reshape(*NAV, 32, 32), sig_dims=2, num_partitions=2)
    with pytest.raises(ValueRangeError, match="frame 77 has negative values"):
        ctx.run_udf(dataset=ds, udf=PhaseUDF(step_px=STEP, engine="eager"))


def test_without_libertem_the_module_imports_and_the_udf_says_what_to_install():
    code = ("import sys; sys.modules['libertem'] = None\n"
            "from deepphase.reconstruction.libertem_udf import PhaseUDF\n"
            "try:\n    PhaseUDF(step_px=1.0)\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("DeepPhaseError PhaseUDF needs LiberTEM") and "pip install -e \".[libertem]\" (in deepphase's source folder)" in out


def test_cli_reconstruct_with_libertem_writes_the_pipelines_image_and_says_what_read_it(counts, tmp_path, capsys):
    from deepphase.cli import main

    frames, positions = counts
    # Flat frames recorded with the scan row varying fastest: LiberTEM is told the scan shape.
    order = np.arange(len(frames)).reshape(NAV).T.reshape(-1)
    np.save(tmp_path / "scan.npy", frames[order])
    common = ["--scan-shape", str(NAV[0]), str(NAV[1]), "--fastest", "row", "--step", str(STEP), "--engine", "eager",
              "--uncertainty", "head", "--rotation", "auto"]
    assert main(["reconstruct", str(tmp_path / "scan.npy"), *common, "--out", str(tmp_path / "pipeline")]) == 0
    capsys.readouterr()
    code = main(["reconstruct", str(tmp_path / "scan.npy"), *common, "--libertem", "--workers", "1",
                 "--out", str(tmp_path / "lt")])
    assert code == 0
    said = capsys.readouterr()
    assert "read by LiberTEM" in said.out and "NPYDataSet" in said.out and "scan rotation" in said.err
    for name in ("phase.npy", "uncertainty.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "lt" / name), np.load(tmp_path / "pipeline" / name),
                                   rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp_path / "lt" / "metadata.json").read_text())
    pipeline = json.loads((tmp_path / "pipeline" / "metadata.json").read_text())
    found, expected = meta["rotation_found"], pipeline["rotation_found"]
    assert meta["rotation_deg"] == pipeline["rotation_deg"] == found["rotation_deg"] and found["block"] == expected["block"]
    assert found["curl_ratio"] == pytest.approx(expected["curl_ratio"], rel=1e-9)
    assert meta["data_info"]["navigation_shape"] == [NAV[1], NAV[0]] and meta["scan_shape"] == list(NAV)
    assert meta["input"] == "counts" and meta["processing"]["patterns"] == len(frames)
    # Nothing the user wrote is replaced without --overwrite.
    assert main(["reconstruct", str(tmp_path / "scan.npy"), *common, "--libertem", "--out", str(tmp_path / "lt")]) == 2
    assert "already holds" in capsys.readouterr().err


def test_cli_libertem_refuses_what_it_cannot_do_and_a_missing_file(tmp_path, capsys):
    from deepphase.cli import main

    assert main(["reconstruct", str(tmp_path / "missing.k2is"), "--step", "1", "--libertem", "--out",
                 str(tmp_path / "o")]) == 2
    assert "missing.k2is' does not exist" in capsys.readouterr().err
    np.save(tmp_path / "scan.npy", np.ones((4, 32, 32), dtype=np.float32))
    # (the scale audit, s41: --chunk-size did nothing; a scan shape short of the file's frames dropped the rest, one
    # beyond them ended in LiberTEM's AssertionError, a cut .npy in five worker logs and "give --scan-shape")
    with open(tmp_path / "cut.npy", "wb") as f:
        f.write((tmp_path / "scan.npy").read_bytes()[:-100])
    for extra, said in ((["--uncertainty", "4"], "--uncertainty 4 not available with --libertem"),
                        (["--stitching", "seed"], "--stitching seed not available"),
                        (["--chunk-size", "5"], "--chunk-size not available with --libertem"),
                        (["--scan-shape", "1", "3"], "scan-shape: 1×3 = 3 positions do not match the 4 patterns"),
                        (["--scan-shape", "2", "3", "--fastest", "row"],
                         "scan-shape: 2×3 = 6 positions do not match the 4 patterns"),
                        (["--scan-shape", "2", "2", "--data", "cut.npy"], "the file is truncated: it holds"),
                        ([], "needs a 2D navigation shape")):
        data = tmp_path / ("cut.npy" if "--data" in extra else "scan.npy")
        extra = [e for e in extra if e not in ("--data", "cut.npy")]
        assert main(["reconstruct", str(data), "--step", "1", "--libertem", "--workers", "1",
                     "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err


def test_in_libertem_live_the_acquisitions_image_is_the_pipelines(counts):
    """LiberTEM-live's memory detector stands in for a camera: its own context and pipelined executor
    (worker processes), the acquisition's partitions as they arrive."""
    live = pytest.importorskip("libertem_live.api")
    frames, positions = counts
    with live.LiveContext() as ctx:
        conn = ctx.make_connection("memory").open(data=frames.reshape(*NAV, 32, 32))
        aq = ctx.make_acquisition(conn=conn)
        udf = PhaseUDF(step_px=STEP, engine="eager", uncertainty="head")
        updates = [part.buffers[0] for part in ctx.run_udf_iter(dataset=aq, udf=udf)]
    rec = to_reconstruction(udf, updates[-1])
    reference = _reference(frames, positions, sigma_head=True)
    assert rec.origin_px == reference.origin_px and updates[-1]["patterns"].data[0] == len(positions)
    np.testing.assert_allclose(rec.phase, reference.phase, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rec.uncertainty, reference.uncertainty, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Warning. 'partition' will ignore the 'mask'")  # LiberTEM's colour scale
def test_a_live_plot_starts_from_an_empty_image_and_shows_the_scan(counts, ctx):
    """LiberTEM's plots ask for the results before any partition (a dry run): an all-NaN image of the scan's
    area, which then fills."""
    import matplotlib

    matplotlib.use("Agg")
    from libertem.viz.mpl import MPLLive2DPlot

    frames, _ = counts
    ds = ctx.load("memory", data=frames.reshape(*NAV, 32, 32), sig_dims=2, num_partitions=2)
    udf = PhaseUDF(step_px=STEP, engine="eager", uncertainty="head")
    plots = [MPLLive2DPlot(ds, udf, channel="phase"), MPLLive2DPlot(ds, udf, channel="uncertainty")]
    assert all(np.isnan(plot.data).all() for plot in plots)
    for plot in plots:
        plot.display()
    result = ctx.run_udf(dataset=ds, udf=udf, plots=plots)
    assert plots[0].data.shape == result["phase"].data.shape and np.isfinite(plots[0].data).mean() > 0.9
    np.testing.assert_array_equal(plots[1].data, result["uncertainty"].data)


def test_a_wrong_step_is_noted_as_the_pipeline_notes_it(ctx, tmp_path):
    """A 1.1 px raster given as 0.87 px: LiberTEM's probe check runs the pipeline's step check on the same block."""
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.physics import reference_probe

    positions = raster_positions((32, 32), 1.1, 0.0, "col")
    truth = builtin_specimen("twisted-hbn", required_object_shape(positions, 32), seed=2)
    counts = np.square(simulate_scan(truth, reference_probe(), positions, seed=2, progress=False).amplitude).round()
    np.save(tmp_path / "scan.npy", counts.astype(np.float32).reshape(32, 32, 32, 32))
    _, read = reconstruct_file(tmp_path / "scan.npy", step_px=STEP, engine="eager", ctx=ctx)
    step = read["probe_check"]["step_check"]
    assert step["searched"] and step["step_px"] == pytest.approx(1.1, rel=0.03)
    assert "the scan step looks wrong" in read["probe_check"]["step_note"]
    _, right = reconstruct_file(tmp_path / "scan.npy", step_px=1.1, engine="eager", ctx=ctx)
    assert "step_note" not in right["probe_check"]


@pytest.mark.slow  # (17–25 s on 2 cores: the default run stays under 10 minutes; -m slow runs it)
def test_the_step_is_found_as_the_pipeline_finds_it(ctx, tmp_path):
    """Step "auto" on calibrated detector frames (48×48, the disk zoomed and off centre) of a raster at 1.1 px
    turned 15°: with the rotation given and with it found, LiberTEM's reconstruct_file reads the same block
    (the descan plane fitted in scan indices, then re-expressed at the step found) and finds the pipeline's step,
    and makes its image."""
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.physics import reference_probe
    from deepphase.reconstruction.from_file import reconstruct_file as pipeline_file

    nav, step, zoom, size = (20, 20), 1.1, 1.4, 48
    positions = raster_positions(nav, step, 15.0, "col")
    truth = builtin_specimen("twisted-hbn", required_object_shape(positions, 32), seed=3)
    frames = np.square(simulate_scan(truth, reference_probe(), positions, seed=1, progress=False).amplitude)
    rows, cols = np.indices((size, size), dtype=np.float64)
    detector = np.stack([ndimage.map_coordinates(p, [16 + (rows - 23.3) / zoom, 16 + (cols - 24.6) / zoom], order=1,
                                                 mode="constant", cval=0.0).clip(0) for p in frames])
    detector = np.random.default_rng(1).poisson(detector * (frames.sum() / detector.sum())).astype(np.uint16)
    np.save(tmp_path / "detector.npy", detector.reshape(*nav, size, size))
    for rotation in (15.0, "auto"):
        rec, read = reconstruct_file(tmp_path / "detector.npy", step_px="auto", rotation_deg=rotation, engine="eager",
                                     ctx=ctx)
        expected = pipeline_file(tmp_path / "detector.npy", step_px="auto", rotation_deg=rotation, engine="eager",
                                 progress=False, log=lambda *_: None)
        assert read["step_px"] == pytest.approx(expected.metadata["step_px"], rel=1e-6), rotation
        assert read["step_px"] == pytest.approx(step, rel=0.03)
        assert read["rotation_deg"] == pytest.approx(expected.metadata["rotation_deg"], abs=1e-9)
        assert "step_check" not in read["probe_check"]  # (a step just found is not checked again)
        assert rec.origin_px == expected.origin_px
        np.testing.assert_allclose(rec.phase, expected.phase, rtol=0, atol=1e-5)
    with pytest.raises(ValueRangeError, match="positions are given"):
        reconstruct_file(tmp_path / "detector.npy", step_px="auto", positions=positions, ctx=ctx)


def test_a_file_changed_while_libertem_reads_it_writes_no_image(tmp_path, capsys, monkeypatch):
    """The pipeline compared the file's size and time at its end; --libertem did not, and wrote an image 0.165 rad off
    from a file whose frames were zeroed while it ran (the scale audit, s41)."""
    from deepphase.cli import main
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.physics import reference_probe
    from deepphase.reconstruction import libertem_udf

    positions = raster_positions((12, 12), STEP, 0.0, "row")
    truth = builtin_specimen("twisted-hbn", required_object_shape(positions, 32), seed=2)
    counts = np.square(simulate_scan(truth, reference_probe(), positions, seed=0, progress=False).amplitude).round()
    data = tmp_path / "scan.npy"
    np.save(data, counts.astype(np.float32))
    original = libertem_udf.reconstruct_file

    def rewritten_meanwhile(*args, **kwargs):
        result = original(*args, **kwargs)
        frames = np.load(data, mmap_mode="r+")
        frames[20:40] = 0  # (the same size: the time says it)
        frames.flush()
        del frames
        return result

    monkeypatch.setattr(libertem_udf, "reconstruct_file", rewritten_meanwhile)
    args = ["reconstruct", str(data), "--scan-shape", "12", "12", "--step", str(STEP), "--fastest", "row",
            "--libertem", "--workers", "1", "--out", str(tmp_path / "rec")]
    assert main(args) == 2
    assert "changed while it was read (modified since the run began)" in capsys.readouterr().err
    assert not (tmp_path / "rec" / "phase.npy").exists()
