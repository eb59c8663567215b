"""Reconstruction chunk by chunk: the streaming stitcher, bounded memory, interruption and --resume."""

import tracemalloc

import numpy as np
import pytest

from deepphase.errors import OutputExistsError, ShapeError, ValueRangeError
from deepphase.physics import raster_positions
from deepphase.physics.geometry import Geometry, output_mask
from deepphase.reconstruction.pipeline import InterruptedReconstruction, read_checkpoint
from deepphase.reconstruction.stitching import PairwiseStitcher, PatchReducer, stitch_pairwise

from .conftest import unchecked_reconstruct as reconstruct


@pytest.fixture(scope="module")
def patches_case(probe):
    """Noisy patches of a smooth object with unknown offsets, on a 30×30 raster at the reference step."""
    geometry = Geometry()
    mask = output_mask(probe, geometry)
    rng = np.random.default_rng(1)
    positions = raster_positions((30, 30), 0.86995916)
    patches = rng.normal(scale=0.05, size=(len(positions), 32, 32)).astype(np.float32)
    patches += rng.normal(scale=3.0, size=(len(positions), 1, 1)).astype(np.float32)
    return patches, positions, mask, geometry


def test_streamed_in_any_chunks_and_order_equals_all_at_once(patches_case):
    patches, positions, mask, geometry = patches_case
    whole = stitch_pairwise(patches, positions, mask, geometry)
    stitcher = PairwiseStitcher(positions, mask, geometry)
    bounds = [0, 7, 300, 301, 650, len(positions)]
    for a, b in reversed(list(zip(bounds[:-1], bounds[1:]))):  # last chunk first
        stitcher.add(patches[a:b], a)
    np.testing.assert_allclose(stitcher.image(), whole, atol=1e-9, equal_nan=True)


def test_reductions_of_two_workers_add_up_to_the_whole(patches_case):
    """What the cluster does: each part reduced separately (its own reducer object), summed by the client."""
    patches, positions, mask, geometry = patches_case
    whole = stitch_pairwise(patches, positions, mask, geometry)
    client = PairwiseStitcher(positions, mask, geometry)
    for a, b in ((0, 450), (450, len(positions))):
        import pickle  # the reducer travels to the workers: it must survive pickling (dask does this)

        reducer = pickle.loads(pickle.dumps(client.reducer))
        client.add_reductions(reducer.reduce(patches[a:b], client.origins[a:b]), a)
    np.testing.assert_allclose(client.image(), whole, atol=1e-9, equal_nan=True)


def test_stitcher_refuses_missing_and_repeated_patches(patches_case):
    patches, positions, mask, geometry = patches_case
    stitcher = PairwiseStitcher(positions, mask, geometry)
    stitcher.add(patches[:100], 0)
    with pytest.raises(ValueRangeError, match="position 50 was already added"):
        stitcher.add(patches[50:60], 50)
    with pytest.raises(ValueRangeError, match="800 of 900 positions have no patch yet .*position 100"):
        stitcher.image()
    with pytest.raises(ShapeError, match="within 0…899"):
        stitcher.add(patches[:10], 895)


def test_state_round_trip_continues_exactly(patches_case):
    patches, positions, mask, geometry = patches_case
    first = PairwiseStitcher(positions, mask, geometry)
    first.add(patches[:400], 0)
    second = PairwiseStitcher(positions, mask, geometry)
    second.load_state({k: v.copy() for k, v in first.state().items()})
    second.add(patches[400:], 400)
    np.testing.assert_allclose(second.image(), stitch_pairwise(patches, positions, mask, geometry), atol=1e-9,
                               equal_nan=True)
    other = PairwiseStitcher(positions[:100], mask, geometry)
    with pytest.raises(ShapeError, match="another scan"):
        other.load_state(first.state())


@pytest.fixture(scope="module")
def scan(probe):
    from deepphase.data.simulate import simulate_scan
    from deepphase.data.specimens import twisted_hbn

    positions = raster_positions((24, 24), 0.86995916)
    return simulate_scan(twisted_hbn((60, 60), seed=2), probe, positions, seed=0)


def test_chunk_size_does_not_change_the_image(scan):
    one = reconstruct(scan.amplitude, scan.positions, chunk_size=100_000, progress=False)
    many = reconstruct(scan.amplitude, scan.positions, chunk_size=97, progress=False)
    np.testing.assert_allclose(many.phase, one.phase, atol=1e-5)


@pytest.mark.parametrize("uncertainty", ["none", "σ head", "dropout"])
def test_patches_reduced_on_the_device_give_the_host_image(scan, monkeypatch, uncertainty):
    """On a GPU the pipeline keeps the patches there and reduces them with torch; forced here on the CPU."""
    import deepphase.reconstruction.pipeline as pipeline

    options = {"none": {}, "σ head": {"sigma_head": True}, "dropout": {"uncertainty_samples": 2}}[uncertainty]
    host = reconstruct(scan.amplitude, scan.positions, chunk_size=200, progress=False, **options)
    monkeypatch.setattr(pipeline, "reduce_on_device", lambda device, stitching: stitching == "pairwise")
    calls = []
    tensor_reduce = PatchReducer._reduce_tensor
    monkeypatch.setattr(PatchReducer, "_reduce_tensor", lambda self, *a: calls.append(1) or tensor_reduce(self, *a))
    device = reconstruct(scan.amplitude, scan.positions, chunk_size=200, progress=False, **options)
    chunks = -(-len(scan.positions) // 200)
    assert len(calls) == chunks * {"none": 1, "σ head": 2, "dropout": 3}[uncertainty]  # every draw, σ too
    np.testing.assert_allclose(device.phase, host.phase, atol=1e-5)
    if uncertainty != "none":
        np.testing.assert_allclose(device.uncertainty, host.uncertainty, rtol=1e-4, atol=1e-6)
    # the other stitchers need every patch on the host, whatever the device
    assert not pipeline.reduce_on_device(__import__("torch").device("cuda"), "least-squares")


class _StopAfter:
    """An amplitude array that raises KeyboardInterrupt (Ctrl-C) on its ``reads``-th read of a chunk.

    Reads of single frames pass (the dose is sampled from a few frames before the chunks are read).
    """

    def __init__(self, array, reads):
        self.array, self.reads, self.shape = array, reads, array.shape

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        if not (isinstance(index, slice) and len(range(*index.indices(len(self.array)))) == 1):
            self.reads -= 1
            if self.reads < 0:
                raise KeyboardInterrupt
        return self.array[index]


@pytest.mark.parametrize("stitching", ["pairwise", "least-squares"])
def test_interrupted_reconstruction_resumes_to_the_same_image(scan, tmp_path, stitching):
    whole = reconstruct(scan.amplitude, scan.positions, stitching=stitching, progress=False)
    folder = tmp_path / "partial"
    with pytest.raises(InterruptedReconstruction, match="interrupted after 200 of 576 patterns.*run the same call with resume=True"):
        reconstruct(_StopAfter(scan.amplitude, 2), scan.positions, checks=False, stitching=stitching, chunk_size=100,
                    batch_size=100, checkpoint=folder, fingerprint={"data": "x"}, progress=False)
    assert read_checkpoint(folder)["done"] == 200
    resumed = reconstruct(scan.amplitude, scan.positions, stitching=stitching, chunk_size=100, checkpoint=folder,
                          resume=True, fingerprint={"data": "x"}, progress=False)
    assert resumed.processing["resumed_from_pattern"] == 200
    np.testing.assert_allclose(resumed.phase, whole.phase, atol=1e-5)


def test_resume_refuses_other_settings_or_no_checkpoint(scan, tmp_path):
    folder = tmp_path / "partial"
    with pytest.raises(InterruptedReconstruction):
        reconstruct(_StopAfter(scan.amplitude, 1), scan.positions, checks=False, chunk_size=100, batch_size=100, checkpoint=folder,
                    fingerprint={"data": "x"}, progress=False)
    # The option and its value then (internal keys before: "different: chunk_size", "data_mtime_ns", the scale audit)
    with pytest.raises(ValueRangeError, match=r"other settings or data \(chunk_size=100 then, 50 now\)"):
        reconstruct(scan.amplitude, scan.positions, chunk_size=50, checkpoint=folder, resume=True,
                    fingerprint={"data": "x"}, progress=False)
    with pytest.raises(ValueRangeError, match="holds no interrupted reconstruction"):
        reconstruct(scan.amplitude, scan.positions, checkpoint=tmp_path / "none", resume=True, progress=False)
    # damaged progress: said so, with the way out (a zip error or a JSON error went through before)
    state = folder / "state.npz"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueRangeError, match="saved state .* is damaged.*overwrite=True"):
        reconstruct(scan.amplitude, scan.positions, chunk_size=100, checkpoint=folder, resume=True,
                    fingerprint={"data": "x"}, progress=False)
    (folder / "progress.json").write_text('{"done": 1')
    with pytest.raises(ValueRangeError, match="saved progress .* is damaged.*--overwrite"):
        read_checkpoint(folder)


def test_memory_held_per_position_is_far_below_a_patch(probe):
    """Peak NumPy memory (traced) of the streaming reconstruction grows by well under a patch per position.

    A patch is 32×32 float32 = 4 kB; holding all of them (what the stitcher used to need) would grow the
    peak by at least that. The input is generated chunk by chunk, so only the pipeline is measured.
    """

    class Generated:
        def __init__(self, n):
            self.shape = (n, 32, 32)

        def __len__(self):
            return self.shape[0]

        def __getitem__(self, index):
            a, b, _ = index.indices(self.shape[0])
            return np.sqrt(np.random.default_rng(a).poisson(np.abs(np.fft.fft2(probe)) ** 2, size=(b - a, 32, 32)))

    peaks = {}
    for side in (32, 64):
        positions = raster_positions((side, side), 0.86995916)
        tracemalloc.start()
        # (the checks read a bounded central block, at most 64 × 64 patterns, whatever the scan: left out here)
        reconstruct(Generated(side * side), positions, chunk_size=256, batch_size=256, progress=False, checks=False)
        peaks[side * side] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    per_position = (peaks[4096] - peaks[1024]) / (4096 - 1024)
    print(f"peak traced memory: {peaks}; {per_position:.0f} bytes per extra position")
    assert per_position < 1500


@pytest.mark.parametrize("samples", [0, 2])
def test_a_bad_frame_is_named_by_its_index_in_the_scan_not_in_its_chunk(scan, samples):
    amplitudes = scan.amplitude.copy()
    amplitudes[333, 4, 4] = np.nan
    with pytest.raises(ValueRangeError, match="frame 333 "):
        reconstruct(amplitudes, scan.positions, chunk_size=100, uncertainty_samples=samples, progress=False)


@pytest.mark.parametrize("raster", ["positions file", "scan shape"])
def test_cli_leaves_no_partial_folder_after_an_error_before_any_checkpoint(scan, tmp_path, capsys, raster):
    """(The rotation and probe checks, which read the scan's centre first, leave the bad frame to the reconstruction,
    which names it.)"""
    from deepphase.cli import main

    amplitudes = scan.amplitude.copy()
    amplitudes[333, 4, 4] = np.nan
    np.save(tmp_path / "scan.npy", amplitudes)
    np.save(tmp_path / "pos.npy", scan.positions)
    where = (["--positions", str(tmp_path / "pos.npy")] if raster == "positions file"
             else ["--scan-shape", "24", "24", "--step", "0.86995916"])
    assert main(["reconstruct", str(tmp_path / "scan.npy"), *where, "--input",
                 "amplitude", "--chunk-size", "100", "--out", str(tmp_path / "out")]) == 2
    assert "frame 333" in capsys.readouterr().err
    assert not (tmp_path / "out" / ".deepphase-partial").exists()


def test_an_interrupt_during_a_dropout_draw_leaves_a_checkpoint_that_resumes(scan, tmp_path):
    """With several draws per chunk, every draw's share of a chunk goes in together or not at all."""
    import deepphase.reconstruction.pipeline as pipeline

    whole = reconstruct(scan.amplitude, scan.positions, uncertainty_samples=2, chunk_size=100, progress=False)
    calls = {"n": 0}
    real = pipeline.predict_patches

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the second draw of the second chunk
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    folder = tmp_path / "partial"
    pipeline.predict_patches = interrupting
    try:
        with pytest.raises(InterruptedReconstruction, match="after 100 of 576"):
            reconstruct(scan.amplitude, scan.positions, uncertainty_samples=2, chunk_size=100, checkpoint=folder,
                        progress=False)
    finally:
        pipeline.predict_patches = real
    resumed = reconstruct(scan.amplitude, scan.positions, uncertainty_samples=2, chunk_size=100, checkpoint=folder,
                          resume=True, progress=False)
    np.testing.assert_allclose(resumed.phase, whole.phase, atol=1e-5)
    np.testing.assert_allclose(resumed.uncertainty, whole.uncertainty, atol=1e-5)


def test_a_fresh_run_refuses_an_interrupted_runs_progress_unless_asked(scan, tmp_path):
    """Progress in the checkpoint is not replaced unasked: a fresh run into it is refused (in the call's words),
    ``overwrite=True`` starts again, and a file where the folder should be is named."""
    folder = tmp_path / "partial"
    with pytest.raises(InterruptedReconstruction):
        reconstruct(_StopAfter(scan.amplitude, 1), scan.positions, checks=False, chunk_size=100, batch_size=100, checkpoint=folder,
                    progress=False)
    with pytest.raises(OutputExistsError, match=r"checkpoint: .* holds an interrupted reconstruction \(100 of 576 "
                                                r"patterns done\); pass resume=True to continue it or overwrite=True"):
        reconstruct(scan.amplitude, scan.positions, checkpoint=folder, progress=False)
    assert read_checkpoint(folder)["done"] == 100
    fresh = reconstruct(scan.amplitude, scan.positions, checkpoint=folder, overwrite=True, progress=False)
    assert np.isfinite(fresh.phase).any() and read_checkpoint(folder)["done"] == 576
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputExistsError, match="checkpoint: .* is a file; expected a folder"):
        reconstruct(scan.amplitude, scan.positions, checkpoint=tmp_path / "file", progress=False)
    assert (tmp_path / "file").read_text() == "mine"


def test_an_interrupt_before_anything_was_saved_says_so_and_leaves_no_stale_patches(scan, tmp_path):
    folder = tmp_path / "partial"
    with pytest.raises(InterruptedReconstruction) as caught:
        reconstruct(_StopAfter(scan.amplitude, 0), scan.positions, checks=False, stitching="least-squares", chunk_size=100,
                    batch_size=100, checkpoint=folder, progress=False)
    assert "resume" not in str(caught.value)
    # A later, different run into the same folder starts afresh instead of reopening the old patch file.
    other = reconstruct(scan.amplitude[:400], scan.positions[:400], stitching="least-squares", chunk_size=100,
                        checkpoint=folder, progress=False)
    assert np.isfinite(other.phase).any()
