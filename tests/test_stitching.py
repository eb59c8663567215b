"""Stitching: both stitchers against exact patches cut from a known object.

The patches are cut from the truth by the physical definition (patch pixel ``j`` of a probe window at
``position`` samples the object pixel that holds ``position + crop_start + (j + ½)/upsample``), not by
the module's own placement functions, so a misplaced patch or a shifted output grid shows up here.
"""

import warnings

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from deepphase.errors import DeepPhaseError, ShapeError, ValueRangeError
from deepphase.evaluation.metrics import correlation, offset_rmse
from deepphase.physics.geometry import Geometry, crop_window, output_mask, upsample_nearest
from deepphase.physics.probe import reference_probe
from deepphase.physics.scan import raster_positions
from deepphase.reconstruction.stitching import (
    canvas_shape,
    patch_origins,
    stitch,
    stitch_seed,
)

GEOMETRY = Geometry()
STEP = 0.87
# The scan starts away from 0 so that the output has an uncovered border and a real offset to get right.
ORIGIN = (10.3, 20.6)
NOISE = 0.05  # rad per upsampled patch pixel
METHODS = ["least-squares", "seed"]


def smooth_truth(shape, rng, sigma=2.0):
    """Gaussian-filtered white noise scaled to 1 rad standard deviation."""
    truth = gaussian_filter(rng.normal(size=shape), sigma)
    return truth / truth.std()


def cut_patches(truth, positions, geometry):
    """The exact network output for every position: nearest-upsampled object pixels, by definition."""
    u, out = geometry.upsample, geometry.output_px
    centres = geometry.crop_start + (np.arange(out) + 0.5) / u
    rows = np.floor(positions[:, 0, None] + centres).astype(int)
    cols = np.floor(positions[:, 1, None] + centres).astype(int)
    return truth[rows[:, :, None], cols[:, None, :]]


def lose_zero_frequency(patches, mask, rng, offset_scale=3.0, noise=0.0):
    """What the stitcher gets: masked mean removed, an unknown constant per patch, optional noise."""
    patches = patches - patches[:, mask].mean(axis=1)[:, None, None]
    patches = patches + offset_scale * rng.normal(size=(len(patches), 1, 1))
    if noise:
        patches = patches + noise * rng.normal(size=patches.shape)
    return patches


def covered_pixels(shape, positions, mask, geometry):
    """Object pixels that some patch's mask reaches, from the physical definition (one loop, small N)."""
    u = geometry.upsample
    centres = geometry.crop_start + (np.arange(geometry.output_px) + 0.5) / u
    mask_rows, mask_cols = np.nonzero(mask)
    covered = np.zeros(shape, dtype=bool)
    for r, c in positions:
        covered[np.floor(r + centres[mask_rows]).astype(int), np.floor(c + centres[mask_cols]).astype(int)] = True
    return covered


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(7)
    mask = output_mask(reference_probe(), GEOMETRY)
    positions = raster_positions((30, 30), STEP, origin=ORIGIN)
    truth = smooth_truth((120, 120), rng)
    exact = cut_patches(truth, positions, GEOMETRY)
    clean = lose_zero_frequency(exact, mask, rng)
    noisy = lose_zero_frequency(exact, mask, rng, noise=NOISE)
    return {"mask": mask, "positions": positions, "truth": truth, "clean": clean, "noisy": noisy}


def on_truth_grid(image, truth):
    """The truth cut to the image's extent (both start at object pixel (0, 0))."""
    assert image.shape[0] <= truth.shape[0] and image.shape[1] <= truth.shape[1]
    return truth[: image.shape[0], : image.shape[1]]


# ------------------------------------------------------------------------------------------ placement
def test_patch_origins_round_halves_up_and_the_canvas_holds_every_patch(scene):
    positions = np.array([[0.0, 0.0], [1.1, 2.125], [0.125, 3.0]])
    # 4·(0 + 12) = 48; 4·13.1 = 52.4 → 52; 4·14.125 = 56.5 → 57 (half up); 4·12.125 = 48.5 → 49; 4·15 = 60
    assert patch_origins(positions, GEOMETRY).tolist() == [[48, 48], [52, 57], [49, 60]]
    # ceil(max) = (2, 3) → 4·(2 + 12 + 8) = 88, 4·(3 + 12 + 8) = 92
    assert canvas_shape(positions, GEOMETRY) == (88, 92)
    origins = patch_origins(scene["positions"], GEOMETRY)
    shape = canvas_shape(scene["positions"], GEOMETRY)
    assert origins.dtype.kind == "i" and origins.min() >= 0
    assert np.all(origins + GEOMETRY.output_px <= np.array(shape))
    assert shape[0] % GEOMETRY.upsample == 0 and shape[1] % GEOMETRY.upsample == 0


@pytest.mark.parametrize("method", METHODS)
def test_image_is_on_the_object_grid_and_nan_exactly_where_no_mask_reached(scene, method):
    image = stitch(scene["clean"], scene["positions"], scene["mask"], GEOMETRY, method=method)
    shape = canvas_shape(scene["positions"], GEOMETRY)
    assert image.shape == (shape[0] // GEOMETRY.upsample, shape[1] // GEOMETRY.upsample)
    covered = covered_pixels(image.shape, scene["positions"], scene["mask"], GEOMETRY)
    assert covered.sum() > 600 and (~covered).sum() > 600  # both parts are substantial
    np.testing.assert_array_equal(np.isnan(image), ~covered)


@pytest.mark.parametrize("method", METHODS)
def test_output_is_not_shifted_against_the_truth(scene, method):
    image = stitch(scene["clean"], scene["positions"], scene["mask"], GEOMETRY, method=method)
    valid = np.flatnonzero(np.isfinite(image).ravel())
    rows, cols = np.unravel_index(valid, image.shape)
    scores = {}
    for dr in range(-2, 3):
        for dc in range(-2, 3):
            shifted = scene["truth"][rows + dr, cols + dc]
            scores[dr, dc] = np.corrcoef(image.ravel()[valid], shifted)[0, 1]
    best = max(scores, key=scores.get)
    assert best == (0, 0), f"best correlation at shift {best}: {scores[best]:.4f} vs {scores[0, 0]:.4f} at (0, 0)"


# ------------------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("method, tolerance", [("least-squares", 1e-7), ("pairwise", 1e-5)])
def test_noise_free_truth_is_recovered_exactly(scene, method, tolerance):
    # The patches are exact samples of the truth, so both problems have the truth (plus one constant)
    # as an exact solution: only the solver's tolerance is left (pairwise works in float32).
    image = stitch(scene["clean"], scene["positions"], scene["mask"], GEOMETRY, method=method)
    truth = on_truth_grid(image, scene["truth"])
    assert offset_rmse(image, truth) < tolerance
    assert correlation(image, truth) > 0.999999


def test_seed_method_converges_to_the_truth_and_is_rough_at_its_defaults(scene):
    # Run long enough, the seed's update has the truth as its fixed point: the implementation is right.
    converged = stitch_seed(scene["clean"], scene["positions"], scene["mask"], GEOMETRY, alpha=0.5, passes=100)
    truth = on_truth_grid(converged, scene["truth"])
    assert offset_rmse(converged, truth) < 0.01
    assert correlation(converged, truth) > 0.9999
    # At its defaults (α = 0.1, 3 passes) every window keeps its mean, and the large scales have not
    # diffused in yet: measured correlation 0.82, RMSE 0.6 rad for this 1-rad, σ = 2 px object. The
    # bounds pin that behaviour (a broken update gives ≈ 0 correlation) without claiming more.
    default = stitch_seed(scene["clean"], scene["positions"], scene["mask"], GEOMETRY)
    assert correlation(default, truth) > 0.7
    assert offset_rmse(default, truth) < 0.75


@pytest.mark.parametrize("method", ["least-squares", "pairwise"])
def test_noisy_patches_ours_are_accurate_and_beat_the_seed(scene, method):
    ls = stitch(scene["noisy"], scene["positions"], scene["mask"], GEOMETRY, method=method)
    seed = stitch(scene["noisy"], scene["positions"], scene["mask"], GEOMETRY, method="seed")
    truth = on_truth_grid(ls, scene["truth"])
    # Each object pixel averages 16 upsampled pixels × ~12 overlapping patches ≈ 190 samples of
    # σ = 0.05 rad noise, σ/√190 ≈ 0.004 rad; the offsets, each estimated from ~144 noisy overlaps,
    # add a spatially correlated error of similar size (measured total ≈ 0.007 rad). 0.02 rad leaves
    # room for that and still fails for a one-pixel misplacement (≈ 0.34 rad for this object).
    rmse_ls = offset_rmse(ls, truth)
    assert rmse_ls < 0.02
    assert correlation(ls, truth) > 0.999
    assert rmse_ls <= offset_rmse(seed, truth)
    assert correlation(ls, truth) >= correlation(seed, truth)


@pytest.mark.parametrize("method", METHODS)
def test_a_constant_added_to_every_patch_changes_nothing(scene, method):
    before = stitch(scene["noisy"], scene["positions"], scene["mask"], GEOMETRY, method=method)
    after = stitch(scene["noisy"] + 7.3, scene["positions"], scene["mask"], GEOMETRY, method=method)
    np.testing.assert_array_equal(np.isnan(after), np.isnan(before))
    np.testing.assert_allclose(after, before, atol=1e-5 if method == "pairwise" else 1e-9, equal_nan=True)


# pairwise: float32 sums and a CG stopped at a 1e-5 relative residual (measured differences ≤ 2e-5 rad).
@pytest.mark.parametrize("method, tolerance", [("least-squares", 1e-8), ("pairwise", 1e-4)])
def test_ours_do_not_depend_on_the_order_of_the_patches(scene, method, tolerance):
    # The gauge pins one patch per group, chosen by index; the result must not depend on which.
    order = np.random.default_rng(3).permutation(len(scene["positions"]))
    image = stitch(scene["noisy"], scene["positions"], scene["mask"], GEOMETRY, method=method)
    shuffled = stitch(scene["noisy"][order], scene["positions"][order], scene["mask"], GEOMETRY, method=method)
    np.testing.assert_allclose(shuffled, image, atol=tolerance, equal_nan=True)


def test_seed_order_follows_its_seed(scene):
    args = (scene["noisy"], scene["positions"], scene["mask"], GEOMETRY)
    np.testing.assert_array_equal(stitch_seed(*args, seed=1), stitch_seed(*args, seed=1))
    assert not np.allclose(stitch_seed(*args, seed=1), stitch_seed(*args, seed=2), equal_nan=True)


def test_default_method_is_pairwise(scene):
    args = (scene["noisy"], scene["positions"], scene["mask"], GEOMETRY)
    np.testing.assert_array_equal(stitch(*args), stitch(*args, method="pairwise"))


def test_probe_intensity_weights_keep_exact_recovery(scene):
    probe = reference_probe()
    weights = upsample_nearest(crop_window(np.abs(probe) ** 2, GEOMETRY), GEOMETRY.upsample)
    args = (scene["positions"], scene["mask"], GEOMETRY)
    clean = stitch(scene["clean"], *args, method="least-squares", weights=weights)
    truth = on_truth_grid(clean, scene["truth"])
    assert offset_rmse(clean, truth) < 1e-7
    noisy = stitch(scene["noisy"], *args, method="least-squares", weights=weights)
    assert offset_rmse(noisy, truth) < 0.02
    np.testing.assert_array_equal(np.isnan(noisy), np.isnan(clean))


@pytest.mark.parametrize("method, tolerance", [("least-squares", 1e-7), ("pairwise", 1e-5)])
def test_disconnected_groups_are_each_recovered_without_nan(method, tolerance):
    rng = np.random.default_rng(11)
    mask = output_mask(reference_probe(), GEOMETRY)
    groups = [raster_positions((8, 8), STEP), raster_positions((6, 9), STEP, origin=(40.0, 45.0)),
              np.array([[80.0, 5.0]])]  # two rasters far apart and a lone patch
    positions = np.concatenate(groups)
    truth = smooth_truth((130, 130), rng)
    patches = lose_zero_frequency(cut_patches(truth, positions, GEOMETRY), mask, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from the solver or from NaN arithmetic
        image = stitch(patches, positions, mask, GEOMETRY, method=method)
    covered = covered_pixels(image.shape, positions, mask, GEOMETRY)
    np.testing.assert_array_equal(np.isfinite(image), covered)
    truth = on_truth_grid(image, truth)
    # Each group has its own arbitrary constant, so compare group by group.
    for group in groups:
        region = covered_pixels(image.shape, group, mask, GEOMETRY)
        assert offset_rmse(np.where(region, image, np.nan), truth) < tolerance


# ---------------------------------------------------------------------------------------- bad input
def _bad_cases(scene):
    p, pos, mask = scene["clean"], scene["positions"], scene["mask"]
    with_nan, with_inf = p.copy(), p.copy()
    with_nan[3, 12, 12] = np.nan  # inside the mask (values outside it are never read)
    with_inf[5, 20, 20] = np.inf
    return {
        "patches wrong side": ((p[:, :, :31], pos, mask), {}, ShapeError, "patches", "(900, 32, 31)"),
        "patches 2-D": ((p[0], pos, mask), {}, ShapeError, "patches", "(32, 32)"),
        "positions 3 columns": ((p, np.zeros((900, 3)), mask), {}, ShapeError, "positions", "(900, 3)"),
        "positions count": ((p, pos[:-1], mask), {}, ShapeError, "positions", "899"),
        "positions negative": ((p, pos - 20.0, mask), {}, ValueRangeError, "positions", "non-negative"),
        "patches NaN": ((with_nan, pos, mask), {}, ValueRangeError, "patches", "1 NaN or Inf"),
        "patches Inf": ((with_inf, pos, mask), {}, ValueRangeError, "patches", "1 NaN or Inf"),
        "mask shape": ((p, pos, mask[:8, :8]), {}, ShapeError, "mask", "(8, 8)"),
        "mask empty": ((p, pos, np.zeros_like(mask)), {}, ValueRangeError, "mask", "empty"),
        "unknown method": ((p, pos, mask), {"method": "fourier"}, ValueRangeError, "method", "'fourier'"),
        "seed alpha": ((p, pos, mask), {"method": "seed", "alpha": 0.0}, ValueRangeError, "alpha", "got 0.0"),
        "weights shape": ((p, pos, mask), {"method": "least-squares", "weights": np.ones((8, 8))}, ShapeError, "weights", "(8, 8)"),
        "weights zero in mask": ((p, pos, mask), {"method": "least-squares", "weights": np.where(mask, 0.0, 1.0)}, ValueRangeError,
                                 "weights", "inside the mask"),
        "weights negative": ((p, pos, mask), {"method": "least-squares", "weights": -np.ones((32, 32))}, ValueRangeError, "weights",
                             "minimum of -1"),
    }


CASES = ["patches wrong side", "patches 2-D", "positions 3 columns", "positions count", "positions negative",
         "patches NaN", "patches Inf", "mask shape", "mask empty", "unknown method", "seed alpha",
         "weights shape", "weights zero in mask", "weights negative"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_a_clear_deepphase_error(scene, case):
    args, kw, error, argument, found = _bad_cases(scene)[case]
    with pytest.raises(error) as info:
        stitch(*args, GEOMETRY, **kw)
    assert isinstance(info.value, DeepPhaseError)
    message = str(info.value)
    assert message.startswith(f"{argument}:"), message
    assert found in message, message


# ------------------------------------------------------------------------- pairwise: raster fast paths
def _kd_tree_stitcher(positions, mask, monkeypatch):
    """A PairwiseStitcher that takes the general path (KD-tree search, two-level solver) for any scan."""
    import deepphase.reconstruction.stitching as stitching

    with monkeypatch.context() as patched:
        patched.setattr(stitching, "_scan_lattice", lambda positions: None)
        return stitching.PairwiseStitcher(positions, mask, GEOMETRY)


def _pair_set(stitcher):
    return {(int(i), int(j), int(l)) for (i, j), l in zip(stitcher.pairs, stitcher.which)}


SCANS = {
    "reference raster, row fastest": lambda: raster_positions((20, 23), STEP, origin=ORIGIN),
    "column fastest": lambda: raster_positions((20, 23), STEP, fastest="col"),
    "unequal steps": lambda: raster_positions((17, 21), (0.6, 1.3)),
    "rotated 17°": lambda: raster_positions((18, 18), STEP, rotation_deg=17.0),
    "one scan line": lambda: raster_positions((1, 40), STEP),
    "one scan column": lambda: raster_positions((40, 1), STEP),
    "rows too far apart to overlap": lambda: raster_positions((6, 30), (5.0, STEP)),
    "two positions": lambda: np.array([[0.0, 0.0], [0.0, 0.5]]),
    # Two positions along the fast axis: the steps (0, 1) and (1, −1) are one diagonal of the Laplacian
    # (SciPy's "offset array contains duplicate values" before: the evaluation audit, s41)
    "two wide, row fastest": lambda: raster_positions((2, 20), STEP),
    "two wide, column fastest": lambda: raster_positions((20, 2), STEP, fastest="col"),
}


@pytest.mark.parametrize("scan", list(SCANS))
def test_raster_neighbour_search_finds_the_kd_tree_pairs(scan, monkeypatch):
    from deepphase.reconstruction.stitching import PairwiseStitcher, _scan_lattice

    positions = SCANS[scan]()
    mask = output_mask(reference_probe(), GEOMETRY)
    assert _scan_lattice(positions) is not None  # each of these is a lattice: the fast path is taken
    fast = PairwiseStitcher(positions, mask, GEOMETRY)
    general = _kd_tree_stitcher(positions, mask, monkeypatch)
    np.testing.assert_array_equal(fast.reducer.lags, general.reducer.lags)
    assert _pair_set(fast) == _pair_set(general)
    assert np.all(fast.pairs[:, 0] < fast.pairs[:, 1])


def test_irregular_positions_are_not_taken_for_a_lattice():
    from deepphase.reconstruction.stitching import _scan_lattice

    positions = raster_positions((10, 10), STEP)
    assert _scan_lattice(positions) is not None
    jittered = positions + np.random.default_rng(0).normal(scale=0.05, size=positions.shape) + 1.0
    assert _scan_lattice(jittered) is None
    assert _scan_lattice(positions[np.random.default_rng(1).permutation(len(positions))]) is None
    assert _scan_lattice(positions[:-3]) is None  # an unfinished last row


def test_lattice_solver_is_used_for_a_connected_raster_only():
    from deepphase.reconstruction.stitching import PairwiseStitcher

    mask = output_mask(reference_probe(), GEOMETRY)
    assert PairwiseStitcher(raster_positions((20, 23), STEP), mask, GEOMETRY)._lattice is not None
    # Rows 5 px apart do not overlap: several groups, each with its own constant (general solver)
    assert PairwiseStitcher(raster_positions((6, 30), (5.0, STEP)), mask, GEOMETRY)._lattice is None


@pytest.mark.parametrize("scan", ["reference raster, row fastest", "column fastest", "unequal steps", "rotated 17°",
                                  "rows too far apart to overlap", "two wide, row fastest", "two wide, column fastest"])
def test_raster_fast_paths_give_the_general_paths_image(scan, monkeypatch):
    from deepphase.reconstruction.stitching import PairwiseStitcher

    rng = np.random.default_rng(5)
    positions = SCANS[scan]() + 2.0
    mask = output_mask(reference_probe(), GEOMETRY)
    truth = smooth_truth(tuple(int(s) for s in positions.max(axis=0) + 24), rng)
    patches = lose_zero_frequency(cut_patches(truth, positions, GEOMETRY), mask, rng, noise=NOISE)
    fast = PairwiseStitcher(positions, mask, GEOMETRY)
    fast.add(patches)
    general = _kd_tree_stitcher(positions, mask, monkeypatch)
    general.add(patches)
    # Both solve to a relative residual of 1e-5, by different iterations (measured: ≤ 2e-5 rad apart)
    np.testing.assert_allclose(fast.image(), general.image(), atol=1e-4, equal_nan=True)


def test_empty_copy_stitches_another_scan_of_the_same_geometry_independently(scene):
    from deepphase.reconstruction.stitching import PairwiseStitcher

    args = (scene["positions"], scene["mask"], GEOMETRY)
    template = PairwiseStitcher(*args)
    first, second = template.empty_copy(), template.empty_copy()
    first.add(scene["noisy"])
    second.add(scene["clean"])
    assert template.n_done == 0 and first.n_done == second.n_done == len(scene["positions"])
    np.testing.assert_array_equal(first.image(), stitch(scene["noisy"], *args))
    np.testing.assert_array_equal(second.image(), stitch(scene["clean"], *args))
    np.testing.assert_array_equal(first.image(), stitch(scene["noisy"], *args))  # unchanged by the other


@pytest.mark.parametrize("patch_type", ["numpy", "torch"])
@pytest.mark.parametrize("mask_kind", ["reference (fills its box)", "a disc (gathered pixel by pixel)"])
def test_reductions_are_the_sums_they_stand_for(mask_kind, patch_type):
    """Overlap sums and the binned image window against their definitions, in float64, pixel by pixel.

    ``torch``: the patches as a tensor, reduced with torch on its device (the GPU path, here on the CPU).
    """
    from deepphase.reconstruction.stitching import PairwiseStitcher

    rng = np.random.default_rng(9)
    if mask_kind.startswith("reference"):
        mask = output_mask(reference_probe(), GEOMETRY)
    else:
        r, c = np.mgrid[:32, :32] - 15.5
        mask = r**2 + c**2 < 7.2**2
    positions = raster_positions((7, 9), STEP, origin=(0.3, 1.1))
    patches = (rng.normal(size=(len(positions), 32, 32)) + 5.0).astype(np.float32)
    stitcher = PairwiseStitcher(positions, mask, GEOMETRY)
    if patch_type == "torch":
        torch = pytest.importorskip("torch")
        reduced = stitcher.reducer.reduce(torch.from_numpy(patches), stitcher.origins)
    else:
        reduced = stitcher.reducer.reduce(patches, stitcher.origins)
    for name in ("sums_i", "sums_j", "window"):
        assert isinstance(reduced[name], np.ndarray)
    rows, cols = np.nonzero(mask)
    q = patches[:, rows, cols].astype(np.float64)
    q -= q.mean(axis=1, keepdims=True)
    # sums_i[k, l]: patch k over the pixels that a patch at lag l from it covers (and sums_j from the other side)
    for l, (dr, dc) in enumerate(stitcher.reducer.lags):
        inside_i = mask[np.clip(rows - dr, 0, 31), np.clip(cols - dc, 0, 31)] & (rows - dr >= 0) & (rows - dr < 32) \
            & (cols - dc >= 0) & (cols - dc < 32)
        inside_j = mask[np.clip(rows + dr, 0, 31), np.clip(cols + dc, 0, 31)] & (rows + dr >= 0) & (rows + dr < 32) \
            & (cols + dc >= 0) & (cols + dc < 32)
        # float32: the mean of values around 5 is off by ~1e-7 · 5, summed over ~100 pixels
        np.testing.assert_allclose(reduced["sums_i"][:, l], q[:, inside_i].sum(axis=1), atol=2e-4)
        np.testing.assert_allclose(reduced["sums_j"][:, l], q[:, inside_j].sum(axis=1), atol=2e-4)
    # window: each used pixel added to the object pixel that holds its centre
    u = GEOMETRY.upsample
    centres = GEOMETRY.crop_start + (np.arange(32) + 0.5) / u
    expected = np.zeros(stitcher.shape)
    for k, (pr, pc) in enumerate(positions):
        np.add.at(expected, (np.floor(pr + centres[rows]).astype(int), np.floor(pc + centres[cols]).astype(int)), q[k])
    (r0, c0), window = reduced["window_origin"], reduced["window"]
    placed = np.zeros_like(expected)
    placed[r0 : r0 + window.shape[0], c0 : c0 + window.shape[1]] = window
    np.testing.assert_allclose(placed, expected, atol=2e-4)


@pytest.mark.parametrize("patch_type", ["numpy", "torch"])
def test_a_nan_in_a_gathered_mask_is_refused_by_count(patch_type):
    from deepphase.reconstruction.stitching import PairwiseStitcher

    r, c = np.mgrid[:32, :32] - 15.5
    mask = r**2 + c**2 < 7.2**2
    positions = raster_positions((5, 5), STEP)
    patches = np.zeros((len(positions), 32, 32), dtype=np.float32)
    patches[3, 16, 16], patches[4, 15, 14], patches[4, 0, 0] = np.nan, np.inf, np.nan  # (0, 0) is outside the mask
    if patch_type == "torch":
        patches = pytest.importorskip("torch").from_numpy(patches)
    with pytest.raises(ValueRangeError, match="found 2 NaN or Inf values inside the mask"):
        PairwiseStitcher(positions, mask, GEOMETRY).add(patches)


def test_tensor_patches_added_in_chunks_give_the_numpy_image(scene):
    """The device path (torch tensors, reduced where they are) against NumPy, chunk by chunk, for the
    phase (means removed) and for σ-like patches (blended as they are)."""
    torch = pytest.importorskip("torch")
    from deepphase.reconstruction.stitching import PairwiseStitcher

    args = (scene["positions"], scene["mask"], GEOMETRY)
    template = PairwiseStitcher(*args)
    for remove_mean in (True, False):
        host, device = template.empty_copy(), template.empty_copy()
        host.add(scene["noisy"], remove_mean=remove_mean)
        for start in range(0, len(scene["positions"]), 256):
            part = torch.from_numpy(np.ascontiguousarray(scene["noisy"][start : start + 256], dtype=np.float32))
            device.add(part, start, remove_mean=remove_mean)
        expected, got = host.image(offsets=remove_mean), device.image(offsets=remove_mean)
        assert np.array_equal(np.isnan(expected), np.isnan(got))
        # float32 sums in another order: ~1e-7 of the values (a few rad here)
        np.testing.assert_allclose(got, expected, atol=2e-5, equal_nan=True)
    with pytest.raises(ShapeError, match=r"expected a float tensor of shape \(N, 32, 32\)"):
        template.empty_copy().add(torch.zeros((4, 16, 16)))
    # A stitcher sent to dask workers leaves the tensors made for this device behind and still works there.
    import pickle

    copied = pickle.loads(pickle.dumps(template.empty_copy()))
    assert "_on_device" in template.reducer.__dict__ and "_on_device" not in copied.reducer.__dict__
    copied.add(torch.from_numpy(np.ascontiguousarray(scene["noisy"], dtype=np.float32)))
    np.testing.assert_allclose(copied.image(), stitch(scene["noisy"], *args),
                               atol=2e-5, equal_nan=True)


@pytest.mark.parametrize("step", [0.87, 1.0])
def test_a_mask_that_reaches_the_crop_edge_is_stitched_to_the_far_edge_of_the_scan(step):
    # A patch at the scan's last row and column whose mask touches the crop's edge bins into the
    # image's last pixel; its window of bins must end there too (it once reached one pixel past).
    c = GEOMETRY.crop_px
    r, q = np.indices((c, c)) - (c - 1) / 2
    mask = upsample_nearest(r**2 + q**2 <= (c / 2) ** 2, GEOMETRY.upsample)
    rng = np.random.default_rng(3)
    positions = raster_positions((20, 20), step)
    truth = smooth_truth((40, 40), rng)
    clean = lose_zero_frequency(cut_patches(truth, positions, GEOMETRY), mask, rng)
    for method in ("pairwise", "least-squares"):
        image = stitch(clean, positions, mask, GEOMETRY, method=method)
        assert offset_rmse(image, on_truth_grid(image, truth)) < 1e-5
