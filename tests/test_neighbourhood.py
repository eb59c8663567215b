"""Neighbourhood input: the 3×3 patterns around each position as 9 channels (issue 6, item 2)."""

import json

import numpy as np
import pytest
import torch

from deepphase.data.phase_objects import CorpusConfig, random_phase_objects
from deepphase.data.simulate import simulate_scan
from deepphase.data.stream import TrainingStream, neighbourhood_offsets
from deepphase.errors import DeepPhaseError, InputFileError, ShapeError, ValueRangeError
from deepphase.models import create_model, flops_per_pattern
from deepphase.models.modelfile import load_model
from deepphase.physics import Geometry
from deepphase.physics.forward import diffraction_intensity
from deepphase.physics.scan import REFERENCE_STEP_PX, raster_positions
from deepphase.reconstruction.neighbourhood import neighbour_indices
from deepphase.reconstruction.predict import predict_patches
from deepphase.training.loop import TrainConfig, train

SMOOTH = CorpusConfig(mix={"smooth": 1.0}, phase_range=(0.5, 1.0))


def _raster_index(rows, cols):
    """Frame index of scan (row, col) for a row-fastest raster (the reference order)."""
    return lambda r, c: c * rows + r


def test_offsets_put_the_centre_in_channel_4():
    offsets = neighbourhood_offsets(3)
    assert offsets.shape == (9, 2) and tuple(offsets[4]) == (0, 0)
    assert tuple(offsets[1]) == (-1, 0) and tuple(offsets[5]) == (0, 1) and tuple(offsets[8]) == (1, 1)
    with pytest.raises(ValueRangeError, match="odd"):
        neighbourhood_offsets(2)


@pytest.mark.parametrize("fastest", ["row", "col"])
def test_neighbour_indices_on_a_raster_replicate_at_the_edges(fastest):
    rows, cols, step = 4, 5, 0.87
    pos = raster_positions((rows, cols), step, fastest=fastest)
    nb = neighbour_indices(pos, step)
    assert nb.shape == (rows * cols, 9)
    np.testing.assert_array_equal(nb[:, 4], np.arange(rows * cols))
    frame = {(int(round(p[0] / step)), int(round(p[1] / step))): i for i, p in enumerate(pos)}
    for (r, c), i in frame.items():
        for k, (dr, dc) in enumerate(neighbourhood_offsets(3)):
            # Replication: a step off the scan is not taken (the nearest existing position).
            expected = frame[min(max(r + dr, 0), rows - 1), min(max(c + dc, 0), cols - 1)]
            assert nb[i, k] == expected, (r, c, dr, dc)


def test_neighbour_indices_fill_a_missing_frame_with_the_nearest_position():
    step = REFERENCE_STEP_PX
    pos = raster_positions((5, 5), step)
    index = _raster_index(5, 5)
    keep = np.ones(len(pos), bool)
    keep[index(2, 2)] = False  # a dropped frame in the middle
    kept = np.flatnonzero(keep)
    nb = neighbour_indices(pos[keep], step)
    where = {int(j): i for i, j in enumerate(kept)}
    left = where[index(2, 1)]
    # Its right neighbour is missing: it stands in for itself; up and down-right come from the raster.
    assert nb[left, 5] == left
    assert nb[left, 2] == where[index(1, 2)] and nb[left, 8] == where[index(3, 2)]


@pytest.mark.parametrize("positions, match", [
    (raster_positions((6, 6), REFERENCE_STEP_PX, rotation_deg=30), "only 0% of the 36 positions"),
    (raster_positions((6, 6), REFERENCE_STEP_PX, rotation_deg=10), "10.0° to the row axis"),
    (raster_positions((6, 6), 1.0), r"\(1, 0\) px"),
    (np.random.default_rng(0).uniform(0, 5, (40, 2)), "nearest-neighbour spacing"),
    (raster_positions((1, 12), REFERENCE_STEP_PX), "at least 2 rows and 2 columns"),
])
def test_neighbour_indices_refuse_what_is_not_a_raster_of_the_step(positions, match):
    with pytest.raises(ValueRangeError, match=match):
        neighbour_indices(positions, REFERENCE_STEP_PX)


def test_stream_centre_channel_is_the_single_pattern_simulation(probe):
    stream = TrainingStream(probe, Geometry(), SMOOTH, 27882.0, neighbourhood=3)
    assert stream.margin == 1 and stream.channels == 9
    objects = random_phase_objects(3, 32 + 2 * stream.margin, torch.Generator().manual_seed(0), SMOOTH)
    intensity = stream.noise_free_intensity(objects)
    single = TrainingStream(probe, Geometry(), SMOOTH, 27882.0)
    assert single.margin == 0
    centre = diffraction_intensity(single.probe, objects[:, 1:33, 1:33])
    torch.testing.assert_close(intensity[:, 4], centre)


def test_stream_neighbour_channel_is_the_centre_pattern_of_the_shifted_object(probe):
    stream = TrainingStream(probe, Geometry(), SMOOTH, 27882.0, neighbourhood=3, step_px=1.0)
    objects = random_phase_objects(2, 34, torch.Generator().manual_seed(1), SMOOTH)
    intensity = stream.noise_free_intensity(objects)
    for k, (dr, dc) in enumerate(neighbourhood_offsets(3)):
        shifted = torch.roll(objects, shifts=(-int(dr), -int(dc)), dims=(-2, -1))  # the object moved by one step
        torch.testing.assert_close(intensity[:, k], stream.noise_free_intensity(shifted)[:, 4], rtol=1e-4, atol=1e-3)


def test_stream_sub_pixel_neighbours_match_the_scan_simulator(probe):
    """At 0.87 px the channels are what simulate_scan gives at the neighbouring scan positions."""
    step = REFERENCE_STEP_PX
    stream = TrainingStream(probe, Geometry(), SMOOTH, float(np.sum(np.abs(probe) ** 2) * 32 * 32),
                            neighbourhood=3, step_px=step)
    obj = random_phase_objects(1, 34, torch.Generator().manual_seed(2), SMOOTH)
    channels = stream.noise_free_intensity(obj)[0].double()
    big = np.pad(obj[0].double().numpy(), ((0, 1), (0, 1)))  # simulate_scan wants one spare pixel
    positions = 1.0 + neighbourhood_offsets(3) * step
    scan = simulate_scan(big, probe, positions, noise=False, progress=False)
    expected = torch.as_tensor(scan.amplitude.astype(np.float64)) ** 2
    torch.testing.assert_close(channels, expected, rtol=2e-3, atol=2e-2)


def test_stream_batch_has_nine_noisy_channels_and_the_centre_target(probe):
    stream = TrainingStream(probe, Geometry(), SMOOTH, (1000.0, 1e5), neighbourhood=3)
    batch = stream.batch(4, torch.Generator().manual_seed(0))
    assert batch.amplitude.shape == (4, 9, 32, 32) and batch.target.shape == (4, 1, 32, 32)
    torch.testing.assert_close(batch.target[:, 0, ::4, ::4], batch.phase[:, 12:20, 12:20])
    counts = batch.amplitude.square()
    torch.testing.assert_close(counts, counts.round())
    # The 9 patterns of a sample share a dose; the samples do not.
    totals = counts.sum((-2, -1))
    assert float((totals.std(1) / totals.mean(1)).max()) < 0.2
    assert float(totals[:, 4].max() / totals[:, 4].min()) > 1.5


def test_the_centre_pattern_is_the_pattern_of_the_target_phase(probe):
    """Channel 4 is the diffraction of the phase the target is cut from (a window one pixel off changes it by
    ~15 %); at 10¹² electrons the counting noise is 10⁻⁶."""
    stream = TrainingStream(probe, Geometry(), SMOOTH, 1e12, neighbourhood=3)
    batch = stream.batch(2, torch.Generator().manual_seed(0))
    counts = batch.amplitude[:, 4].double() ** 2
    expected = diffraction_intensity(torch.as_tensor(probe), batch.phase.double())
    relative = (counts / counts.sum((-2, -1), keepdim=True) - expected / expected.sum((-2, -1), keepdim=True)).abs()
    assert float(relative.sum((-2, -1)).max()) < 1e-3


def test_single_pattern_stream_is_unchanged(probe):
    """neighbourhood=1 draws exactly what the stream always drew (resumed runs continue exactly)."""
    gen = torch.Generator().manual_seed(5)
    batch = TrainingStream(probe, Geometry(), SMOOTH, 27882.0).batch(2, gen)
    gen = torch.Generator().manual_seed(5)
    phase = random_phase_objects(2, 32, gen, SMOOTH)
    torch.testing.assert_close(batch.phase, phase)


@pytest.mark.parametrize("arch", ["compact", "unet-small"])
def test_architectures_take_nine_channels(arch):
    net = create_model(arch, in_channels=9).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 9, 32, 32)).shape == (2, 1, 32, 32)
    assert flops_per_pattern(net) > flops_per_pattern(create_model(arch))


@pytest.fixture(scope="module")
def tiny_models(probe, tmp_path_factory):
    """A 9-channel compact model and a single-pattern one, each trained a few steps."""
    out = {}
    for size in (3, 1):
        folder = tmp_path_factory.mktemp(f"nbh{size}")
        config = TrainConfig(arch="compact", epochs=1, steps_per_epoch=3, batch_size=4, val_size=8, corpus=SMOOTH,
                             device="cpu", dose=(1000.0, 1e5), neighbourhood=size)
        model, history = train(probe, folder, config, log=lambda *_: None, progress=False)
        assert np.isfinite(history[-1]["val_loss"])
        out[size] = folder
    return out


def _scan(probe, shape=(6, 7)):
    pos = raster_positions(shape, REFERENCE_STEP_PX)
    rng = np.random.default_rng(0)
    amplitudes = np.sqrt(rng.poisson(3.0, (len(pos), 32, 32))).astype(np.float32)
    return amplitudes, pos


def test_nine_channel_model_file_records_its_neighbourhood(tiny_models):
    meta = json.loads((tiny_models[3] / "model.json").read_text())
    assert meta["arch_config"]["in_channels"] == 9
    assert meta["neighbourhood"]["size"] == 3 and meta["neighbourhood"]["step_px"] == pytest.approx(REFERENCE_STEP_PX)
    model = load_model(tiny_models[3])
    assert model.in_channels == 9 and model.neighbourhood["step_px"] == pytest.approx(REFERENCE_STEP_PX)
    single = json.loads((tiny_models[1] / "model.json").read_text())
    assert "in_channels" not in single["arch_config"] and "neighbourhood" not in single
    assert "neighbourhood" not in single["training"]  # single-pattern runs keep their old record
    assert load_model(tiny_models[1]).in_channels == 1 and load_model(tiny_models[1]).neighbourhood is None


def test_nine_channel_model_file_without_its_step_is_refused(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_models[3], folder)
    meta = json.loads((folder / "model.json").read_text())
    del meta["neighbourhood"]
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(InputFileError, match="9 input channels"):
        load_model(folder)


def test_packaged_models_still_load_as_single_pattern():
    from deepphase.models.modelfile import packaged_models

    assert "neighbourhood" in packaged_models()
    for name in packaged_models():
        if name == "neighbourhood":
            continue
        model = load_model(name)
        assert model.in_channels == 1 and model.neighbourhood is None


def test_predict_chunks_equal_the_whole_prediction(probe, tiny_models):
    model = load_model(tiny_models[3])
    amplitudes, pos = _scan(probe)
    nb = neighbour_indices(pos, model.neighbourhood["step_px"])
    whole = predict_patches(model, amplitudes, batch_size=16, neighbours=nb, progress=False)
    assert whole.shape == (len(pos), 32, 32)
    np.testing.assert_allclose(predict_patches(model, amplitudes, batch_size=16, neighbours=pos, progress=False),
                               whole, atol=1e-6)  # positions give the same neighbourhood
    parts = [predict_patches(model, amplitudes, batch_size=5, neighbours=nb, start=a, stop=b, progress=False)
             for a, b in ((0, 13), (13, 14), (14, 42))]
    assert [len(p) for p in parts] == [13, 1, 28]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5)
    # A chunk and its halo only, with the chunk's rows of the index array (what a streaming caller holds).
    start, stop = 20, 30
    lo, hi = nb[start:stop].min(), nb[start:stop].max() + 1
    halo = predict_patches(model, amplitudes[lo:hi], start=start - lo, stop=stop - lo, neighbours=nb[start:stop] - lo)
    np.testing.assert_allclose(halo, whole[start:stop], atol=1e-5)
    # The neighbourhood matters: other neighbours give other patches.
    alone = predict_patches(model, amplitudes, neighbours=np.repeat(np.arange(len(pos))[:, None], 9, 1), progress=False)
    assert np.abs(alone - whole).max() > 1e-4
    # An empty chunk is fine.
    assert predict_patches(model, amplitudes, neighbours=nb, start=7, stop=7).shape == (0, 32, 32)


def test_predict_chunks_single_pattern(probe, tiny_models):
    model = load_model(tiny_models[1])
    amplitudes, pos = _scan(probe)
    whole = predict_patches(model, amplitudes, progress=False)
    part = predict_patches(model, amplitudes, start=10, stop=30, batch_size=7, neighbours=pos, progress=False)
    np.testing.assert_allclose(part, whole[10:30], atol=1e-5)


def test_predict_refuses_a_neighbourhood_model_without_neighbours(probe, tiny_models):
    model = load_model(tiny_models[3])
    amplitudes, pos = _scan(probe)
    with pytest.raises(ValueRangeError, match="neighbourhood of patterns"):
        predict_patches(model, amplitudes)
    with pytest.raises(ShapeError, match="9 columns"):
        predict_patches(model, amplitudes, neighbours=np.zeros((len(pos), 4), int))
    with pytest.raises(ValueRangeError, match="indices must lie"):
        predict_patches(model, amplitudes, neighbours=np.full((len(pos), 9), len(pos)))
    with pytest.raises(ValueRangeError, match="start, stop"):
        predict_patches(model, amplitudes, neighbours=pos, start=5, stop=3)
    with pytest.raises(ValueRangeError, match="scan step along the rows"):
        predict_patches(model, amplitudes, neighbours=raster_positions((6, 7), 1.0))


def test_harness_reconstructs_with_the_neighbourhood(probe, tiny_models):
    from deepphase.evaluation import harness

    case = next(harness.make_cases(["cameraman"], [1e4], probe, scan_shape=(12, 12)))
    result = harness.network_method(tiny_models[3])(case, probe)
    assert result.phase.shape == case.scan.truth.shape and np.isfinite(result.phase).sum() > 100


def test_training_refuses_a_neighbourhood_for_an_architecture_without_channels(probe, tmp_path):
    from deepphase.models import registry

    name = "test-one-channel-only"
    registry.register_model(name)(lambda n_px=32, out_px=32: torch.nn.Conv2d(1, 1, 1))
    try:
        config = TrainConfig(arch=name, epochs=1, steps_per_epoch=1, batch_size=2, val_size=2, device="cpu",
                             neighbourhood=3)
        with pytest.raises(DeepPhaseError, match="does not take"):
            train(probe, tmp_path / "m", config, log=lambda *_: None, progress=False)
    finally:
        del registry._REGISTRY[name]  # the other tests see the real architectures only


def test_reconstruct_streams_a_neighbourhood_model_in_chunks(probe, tiny_models):
    """Chunks read their halo of frames: any chunk size gives the image of one chunk."""
    from .conftest import unchecked_reconstruct as reconstruct

    amplitudes, pos = _scan(probe, (9, 11))
    whole = reconstruct(amplitudes, pos, str(tiny_models[3]), chunk_size=10_000, progress=False)
    chunked = reconstruct(amplitudes, pos, str(tiny_models[3]), chunk_size=13, batch_size=5, progress=False)
    np.testing.assert_allclose(chunked.phase, whole.phase, atol=1e-5)
    assert whole.processing["input"].startswith("9 patterns")


def test_packaged_neighbourhood_model_reconstructs_a_raster_at_its_step(probe):
    from deepphase.data.simulate import simulate_scan
    from deepphase.data.specimens import twisted_hbn
    from deepphase.evaluation.metrics import correlation
    from deepphase.models.modelfile import load_model
    from .conftest import unchecked_reconstruct as reconstruct

    model = load_model("neighbourhood")
    assert model.in_channels == 9 and model.neighbourhood["step_px"] == pytest.approx(REFERENCE_STEP_PX)
    pos = raster_positions((24, 24), REFERENCE_STEP_PX)
    truth = twisted_hbn((60, 60), seed=1)
    scan = simulate_scan(truth, probe, pos, seed=0)
    rec = reconstruct(scan.amplitude, pos, model, progress=False)
    r0, c0 = rec.origin_px
    assert correlation(rec.phase, truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]]) > 0.9
