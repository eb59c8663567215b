"""Reconstruction as a LiberTEM user-defined function: detector files LiberTEM opens, and live data.

LiberTEM (https://libertem.github.io) reads many detectors' own files (Merlin, K2IS, Frms6, Gatan DM,
TVIPS, MRC, SEQ, raw, ...) and, with LiberTEM-live, the stream of a running acquisition. It splits a
scan into partitions that its workers process in parallel, and merges their results as they arrive.
:class:`PhaseUDF` runs deepphase inside that:

* on the workers, each partition's patterns go through the network and the patches are reduced as the
  pairwise stitcher needs them (:class:`~deepphase.reconstruction.stitching.PatchReducer`): the overlap
  sums at the neighbour lags, ~0.1 kB a position, and the patches' pixels binned on the object grid;
* the main node merges partitions by placing their overlap sums and adding their binned pixels (both
  are linear in the patches, so the partitions need no margin and each pattern is predicted once);
* ``get_results`` solves the offsets over the positions that have arrived and blends the image.

So ``ctx.run_udf(..., plots=True)`` and ``ctx.run_udf_iter`` show the phase growing while the scan
runs, and the image of a whole scan is the image ``deepphase reconstruct`` makes of the same patterns
with the pairwise stitcher (to float32 rounding of the network at another batch split).

Positions come from the dataset's navigation shape and a step (a raster, LiberTEM's frame order:
the last navigation axis varies fastest), or are given; a region of interest (``roi``) reconstructs
its positions only. Patterns on the model's n×n grid are used as they are (counts, or amplitudes);
a detector's larger patterns need a calibration, measured once with :func:`calibrate_dataset`.

A model with a σ head (the packaged default) also gives its uncertainty map, from the same forward pass
(``uncertainty="head"``). Not here (use ``deepphase reconstruct``): neighbourhood models (their input
crosses partitions), the "least-squares" and "seed" stitchers (they need every patch at once), Monte
Carlo dropout and ensembles.

Examples
--------
>>> import libertem.api as lt
>>> from deepphase.reconstruction.libertem_udf import PhaseUDF, to_reconstruction
>>> ctx = lt.Context()
>>> ds = ctx.load("auto", path="scan.npy", sig_dims=2)     # (256, 256, 32, 32) counts
>>> udf = PhaseUDF(step_px=0.87)                           # the packaged default model
>>> result = ctx.run_udf(dataset=ds, udf=udf, plots=True)  # a live plot of the phase
>>> phase = result["phase"].data                           # the scanned area, NaN where no probe was
>>> rec = to_reconstruction(udf, result)                   # cropped, with its metadata: write_outputs(rec, ...)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.io import check_mib_scan_shape, merlin_header, spread_indices  # (the pipeline's rules and sample)
from ..errors import DeepPhaseError, ShapeError, ValueRangeError
from ..wording import in_callers_words

if TYPE_CHECKING:
    from .pipeline import Reconstruction

LIBERTEM_EXTRA = 'pip install -e ".[libertem]" (in deepphase\'s source folder)'

try:
    from libertem.udf.base import UDF
except ImportError as _exc:  # the module imports without LiberTEM; making a PhaseUDF then says what to install
    _LIBERTEM_MISSING = _exc

    class UDF:  # noqa: D101 — a stand-in that only raises
        def __init__(self, **kwargs):
            raise DeepPhaseError(f"PhaseUDF needs LiberTEM ({_LIBERTEM_MISSING}); install it with `{LIBERTEM_EXTRA}`")
else:
    _LIBERTEM_MISSING = None

# Scans (their pairwise stitcher: neighbour graph, reducer, equations) made in this process, newest last.
_SCANS: OrderedDict = OrderedDict()
_SCANS_KEPT = 4


def scan_positions(nav_shape, step_px=None, rotation_deg: float = 0.0, fastest: str = "col", positions=None,
                   roi=None) -> np.ndarray:
    """The positions of a LiberTEM dataset's frames, in its frame order, (N, 2) in pixels (DESIGN.md).

    Parameters
    ----------
    nav_shape : the dataset's navigation shape (LiberTEM's ``dataset.shape.nav``).
    step_px : float or (float, float)
        The raster's step in real-space pixels (row, col); with a 2D navigation shape.
    rotation_deg : rotation of the scan axes against the real-space grid (see
        :func:`~deepphase.physics.scan.raster_positions`).
    fastest : {"col", "row"}
        ``"col"`` (default): the navigation axes are (scan row, scan column), the column varying fastest,
        as LiberTEM orders frames. ``"row"``: the scan row varied fastest while recording (the seed's
        data), so LiberTEM's navigation axes are (scan column, scan row).
    positions : (N, 2) array, optional
        The positions of all N frames instead of a raster (any scan).
    roi : bool array of the navigation shape, optional
        Keep the positions inside it (in frame order), as LiberTEM passes a ROI's frames.
    """
    from ..physics.scan import raster_positions, validate_positions

    nav_shape = tuple(int(s) for s in nav_shape)
    n = int(np.prod(nav_shape))
    if (positions is None) == (step_px is None):
        raise ValueRangeError("positions: give either the raster's step_px or the positions of every frame, not both")
    if positions is not None:
        positions = validate_positions(positions, n)
    else:
        if len(nav_shape) != 2:
            raise ShapeError(f"step_px: a raster needs a 2D navigation shape, the dataset has {nav_shape}; give "
                             "the scan shape when loading it (LiberTEM's nav_shape; --scan-shape ROWS COLS) or the "
                             "positions of every frame")
        if fastest not in ("col", "row"):
            raise ValueRangeError(f"fastest: expected 'col' or 'row', got {fastest!r}")
        grid = nav_shape if fastest == "col" else nav_shape[::-1]
        positions = raster_positions(grid, step_px, rotation_deg, fastest=fastest)
    if roi is not None:
        roi = np.asarray(roi, dtype=bool).reshape(-1)
        if roi.size != n:
            raise ShapeError(f"roi: expected {n} navigation positions, got {roi.size}")
        positions = positions[roi]
    return positions


def _scan(model, positions: np.ndarray):
    """The pairwise stitcher of these positions with no patches, made once per process and kept."""
    from ..physics.geometry import output_mask
    from .stitching import PairwiseStitcher

    mask = output_mask(model.probe, model.geometry)
    key = (hashlib.sha256(np.ascontiguousarray(positions).tobytes()).hexdigest(),
           hashlib.sha256(mask.tobytes()).hexdigest(), repr(model.geometry))
    if key not in _SCANS:
        template = PairwiseStitcher(positions, mask, model.geometry)
        template._equations()  # shared by every copy made from it
        _SCANS[key] = template
        while len(_SCANS) > _SCANS_KEPT:
            _SCANS.popitem(last=False)
    _SCANS.move_to_end(key)
    return _SCANS[key]


def _scan_box(scan) -> tuple[int, int, int, int]:
    """Object rows r0:r1 and columns c0:c1 that the scan's patches reach (the probe windows' margins left out).

    Mask pixel (r, c) of a patch at canvas origin o lands in object pixel ((o_r + r) // u, (o_c + c) // u).
    """
    u = scan.geometry.upsample
    rows, cols = scan.reducer.rows, scan.reducer.cols
    top, bottom = scan.origins.min(axis=0), scan.origins.max(axis=0)
    return (int((top[0] + rows.min()) // u), int((bottom[0] + rows.max()) // u) + 1,
            int((top[1] + cols.min()) // u), int((bottom[1] + cols.max()) // u) + 1)


def _load(model_name, told=None):
    from .distributed import _worker_model  # one model per process, shared with the dask workers

    return _worker_model(model_name, None if told is None else tuple(told))


class PhaseUDF(UDF):
    """The phase image of a 4D-STEM scan, predicted and stitched inside LiberTEM.

    Parameters
    ----------
    model : str or Path, optional
        A model folder or a packaged model's name (default: the packaged default). The workers load it
        themselves, so a folder must be visible to them.
    step_px : float or (float, float), optional
        The raster's step in real-space pixels; or give ``positions``.
    positions : (N, 2) array, optional
        Top-left corners of every frame's probe window, (row, col) in pixels, in frame order.
    rotation_deg, fastest : the raster's orientation and frame order (see :func:`scan_positions`).
    kind : {"counts", "amplitude"}
        What the frames hold: counts (default; the network gets their square root) or amplitudes.
    calibration : CalibratedView, optional
        From :func:`calibrate_dataset` (or :func:`deepphase.data.calibration.calibrate` with the scan
        positions as coordinates): for detector patterns that are not the model's n×n grid. Each
        partition is resampled with it (gain, bad pixels, disk centre, descan, zoom); ``kind`` is then
        what the calibration was measured with.
    flip_patterns : mirror every pattern in k_row before the network: for a detector whose rows run the other
        way against the scan (detector patterns as they are resampled, :meth:`CalibratedView.flipped`; model-grid
        ones about k = 0, :func:`deepphase.physics.flip_patterns`). :func:`find_rotation` tells whether it is
        needed.
    reverse_rows : reverse the rows of the frames as LiberTEM reads them, before anything else: LiberTEM reads
        a Merlin .mib's rows in the opposite order to rosettasciio (``deepphase reconstruct``'s reader), and
        :func:`reconstruct_file` sets this for one, so both make the same image. Default: as the calibration
        found its dataset (:func:`calibrate_dataset` records :func:`rows_reversed`), else False. (A plain
        reversal of the file's layout; ``flip_patterns`` is the physics.)
    batch_size : patterns per forward pass.
    engine, precision : as for :func:`~deepphase.reconstruction.pipeline.reconstruct` (engine "auto": on a CPU
        worker channels-last, or ONNX Runtime for scans of ≥ 16,384 patterns; eager on a GPU).
    deblur : True, False or "auto" (by the dose; see :mod:`deepphase.reconstruction.deblur`).
    remove_plane : subtract the best-fit plane (as ``reconstruct``).
    uncertainty : None, or "head": also the per-pixel σ from the model's σ head, blended as ``reconstruct
        --uncertainty head`` blends it and scaled by the factor fitted for the head.
    told : for a probe-aware model, the data's probe against its own, (a_rr, a_rc, a_cc) in rad per pixel²
        (:meth:`~deepphase.models.modelfile.PhaseModel.told`); None: its own probe.

    Results
    -------
    phase : (rows, cols) float32
        The phase (rad, arbitrary offset) on the object grid over the area the scan reaches (its pixel
        (0, 0) is object pixel ``origin_px``), NaN where no probe has been (yet): while the scan runs,
        the image of the positions that have arrived.
    origin_px : (2,) int64
        The object pixel (row, col) of ``phase[0, 0]``, in the frame of the positions.
    patterns : float64
        How many patterns the image holds.
    electrons_per_pattern : float64
        The mean counts per pattern (NaN for amplitudes).
    uncertainty : (rows, cols) float32, with ``uncertainty="head"``
        One standard deviation of the phase (rad) on the same grid; NaN where ``phase`` is.
    """

    def __init__(self, model=None, step_px=None, positions=None, rotation_deg: float = 0.0, fastest: str = "col",
                 kind: str = "counts", calibration=None, flip_patterns: bool = False, reverse_rows: bool | None = None,
                 batch_size: int = 512, engine: str = "auto", precision: str = "auto", deblur="auto",
                 remove_plane: bool = True, uncertainty=None, told=None):
        # (no **kwargs: LiberTEM makes the workers' copies from these names alone, and a misspelt one is refused)
        from .engines import ENGINES
        from .predict import PRECISIONS

        if fastest not in ("row", "col"):
            raise ValueRangeError(f"fastest: expected 'row' or 'col', got {fastest!r}")
        if engine not in ("auto", *ENGINES):
            raise ValueRangeError(f"engine: expected 'auto' or one of {', '.join(ENGINES)}, got {engine!r}")
        if precision not in PRECISIONS:
            raise ValueRangeError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        if step_px is not None and not (np.isfinite(step_px) and step_px > 0):
            raise ValueRangeError(f"step_px: expected a positive raster step in real-space pixels, got {step_px}")
        if not np.isfinite(rotation_deg):
            raise ValueRangeError(f"rotation_deg: expected an angle in degrees, got {rotation_deg}")
        if kind not in ("counts", "amplitude"):
            raise ValueRangeError(f"kind: expected 'counts' or 'amplitude', got {kind!r}")
        if int(batch_size) < 1:
            raise ValueRangeError(f"batch_size: expected a positive number of patterns, got {batch_size}")
        if uncertainty not in (None, "head"):
            raise ValueRangeError(f"uncertainty: expected None or 'head' (the model's σ head), got {uncertainty!r}; "
                                  "Monte Carlo dropout and ensembles need deepphase reconstruct")
        if deblur not in (True, False, "auto"):
            raise ValueRangeError(f"deblur: expected True, False or 'auto', got {deblur!r}")
        if (positions is None) == (step_px is None):
            raise ValueRangeError("positions: give either the raster's step_px or the positions of every frame")
        calibration = _calibration_param(calibration)
        if reverse_rows is None:  # as the calibration found the dataset (calibrate_dataset), else as read
            reverse_rows = bool(calibration is not None and calibration["info"].get("rows_reversed"))
        super().__init__(model=None if model is None else str(model), step_px=step_px,
                         positions=None if positions is None else np.asarray(positions, dtype=np.float64),
                         rotation_deg=float(rotation_deg), fastest=fastest, kind=kind, calibration=calibration,
                         flip_patterns=bool(flip_patterns), reverse_rows=bool(reverse_rows),
                         batch_size=int(batch_size), engine=engine, precision=precision, deblur=deblur,
                         remove_plane=bool(remove_plane), uncertainty=uncertainty,
                         told=None if told is None else [float(c) for c in told])

    # ---------------------------------------------------------------- set-up, on the main node and the workers
    def _model(self):
        model = _load(self.params.model, self.params.told)
        if model.in_channels > 1:
            raise DeepPhaseError(f"model: {model.name!r} takes the 3×3 neighbourhood of patterns, which crosses "
                                 "LiberTEM's partitions; use a single-pattern model here, or deepphase reconstruct")
        if self.params.uncertainty == "head":
            from .predict import check_sigma_head

            check_sigma_head(model)
        return model

    def _positions(self) -> np.ndarray:
        return scan_positions(tuple(self.meta.dataset_shape.nav), self.params.step_px, self.params.rotation_deg,
                              self.params.fastest, self.params.positions, self.meta.roi)

    def _check_patterns_fit(self, model) -> None:
        from ..models.modelfile import check_compatible

        sig = tuple(self.meta.dataset_shape.sig)
        n = model.geometry.n_px
        calibration = self.params.calibration
        if calibration is not None:
            if int(calibration["info"]["grid_px"]) != n:
                raise ShapeError(f"calibration: made for a {calibration['info']['grid_px']}-pixel grid, model "
                                 f"{model.name!r} takes {n}×{n}; measure it with this model")
            return
        if len(sig) != 2 or sig != (n, n):
            raise ShapeError(f"data: patterns of shape {sig}, model {model.name!r} takes {n}×{n}; pass "
                             "calibration=calibrate_dataset(ctx, dataset, ...) to resample detector patterns")
        check_compatible(model, sig)

    def get_backends(self):
        return (UDF.BACKEND_NUMPY, UDF.BACKEND_CUDA)  # NumPy input either way; the network runs on the GPU if given one

    def get_preferred_input_dtype(self):
        return np.float32

    def get_result_buffers(self):
        model = self._model()
        self._check_patterns_fit(model)
        scan = _scan(model, self._positions())
        n_lags = len(scan.reducer.lags)
        r0, r1, c0, c1 = _scan_box(scan)
        sigma = {} if self.params.uncertainty is None else {
            "uncertainty": self.buffer(kind="single", extra_shape=(r1 - r0, c1 - c0), dtype="float32",
                                       use="result_only"),
            "sigma_binned": self.buffer(kind="single", extra_shape=scan.shape, dtype="float64", use="private")}
        return {
            "phase": self.buffer(kind="single", extra_shape=(r1 - r0, c1 - c0), dtype="float32", use="result_only"),
            "origin_px": self.buffer(kind="single", extra_shape=(2,), dtype="int64", use="result_only"),
            "patterns": self.buffer(kind="single", dtype="float64", use="result_only"),
            "electrons_per_pattern": self.buffer(kind="single", dtype="float64", use="result_only"),
            "sums_i": self.buffer(kind="nav", extra_shape=(n_lags,), dtype="float32", use="private"),
            "sums_j": self.buffer(kind="nav", extra_shape=(n_lags,), dtype="float32", use="private"),
            "binned": self.buffer(kind="single", extra_shape=scan.shape, dtype="float64", use="private"),
            "counts": self.buffer(kind="single", dtype="float64", use="private"),
            **sigma,
        }

    def get_task_data(self):
        import torch

        from .engines import resolve_engine

        model = self._model()
        positions = self._positions()
        device = torch.device("cpu")
        if self.meta.device_class == "cuda":  # the GPU LiberTEM gave this worker
            from libertem.common.backend import get_use_cuda

            device = torch.device("cuda", get_use_cuda() or 0)
        model.network.to(device).eval()
        pattern_shape = (1, model.geometry.n_px, model.geometry.n_px)
        engine = resolve_engine(self.params.engine, device, len(positions), self.params.precision, network=model,
                                pattern_shape=pattern_shape)
        runner = _runner(model, engine, device, auto=self.params.engine == "auto")
        return {"model": model, "scan": _scan(model, positions), "device": device, "runner": runner}

    # ---------------------------------------------------------------- on the workers
    def process_partition(self, partition):
        from ..data.io import check_patterns
        from .predict import predict_patches

        task = self.task_data
        first = int(self.meta.slice.origin[0])  # index among the (ROI's) positions, in frame order
        amplitudes, counts = _network_input(np.asarray(partition), self.params.kind, self.params.calibration,
                                            task.scan.positions[first : first + len(partition)],
                                            self.params.flip_patterns, self.params.reverse_rows)
        check_patterns(amplitudes, first,
                       what="data" if self.meta.roi is None else "data (frames counted inside the roi)")
        on_device = task.device.type == "cuda"
        head = self.params.uncertainty == "head"
        patches = predict_patches(task.model, amplitudes, batch_size=self.params.batch_size, device=task.device,
                                  progress=False, precision=self.params.precision, runner=task.runner,
                                  on_device=on_device, sigma=head)
        if head:
            patches, sigmas = patches
            _add_window(self.results.sigma_binned, task.scan.reduce(sigmas, first, remove_mean=False))
        reduced = task.scan.reduce(patches, first)
        self.results.sums_i[:] = reduced["sums_i"]
        self.results.sums_j[:] = reduced["sums_j"]
        _add_window(self.results.binned, reduced)
        self.results.counts[:] += counts

    # ---------------------------------------------------------------- on the main node
    def merge(self, dest, src):
        dest.sums_i[:] = src.sums_i
        dest.sums_j[:] = src.sums_j
        dest.binned[:] += src.binned
        dest.counts[:] += src.counts
        if self.params.uncertainty is not None:
            dest.sigma_binned[:] += src.sigma_binned

    def get_results(self):
        model = self._model()
        positions = self._positions()
        template = _scan(model, positions)
        valid = self.meta.get_valid_nav_mask()
        done = np.ones(len(positions), dtype=bool) if valid is None else np.asarray(valid, dtype=bool).reshape(-1)
        n_done = int(np.count_nonzero(done))
        r0, r1, c0, c1 = _scan_box(template)
        phase = np.full(template.shape, np.nan, dtype=np.float32)
        sigma = None if self.params.uncertainty is None else np.full(template.shape, np.nan, dtype=np.float32)
        counted = self.params.kind == "counts" or self.params.calibration is not None
        dose = float(self.results.counts[0]) / n_done if n_done and counted else None
        if n_done:
            full, spread = _stitch(model, template, positions, done, self.results.sums_i, self.results.sums_j,
                                   self.results.binned, self.params, dose,
                                   None if sigma is None else self.results.sigma_binned)
            phase[: full.shape[0], : full.shape[1]] = full
            if sigma is not None:
                sigma[: spread.shape[0], : spread.shape[1]] = spread
        box = (slice(r0, r1), slice(c0, c1))
        return {"phase": phase[box], "origin_px": np.array([r0, c0], dtype=np.int64),
                "patterns": np.array([n_done], dtype=np.float64),
                "electrons_per_pattern": np.array([np.nan if dose is None else dose]),
                **({} if sigma is None else {"uncertainty": sigma[box]})}


def _calibration_param(calibration) -> dict | None:
    """A UDF's ``calibration`` parameter: what travels to the workers of a :class:`CalibratedView` (its plain
    ``info`` and ``arrays``; the view is rebuilt there around each partition), checked."""
    if calibration is None or isinstance(calibration, dict):
        return calibration
    from ..data.calibration import CalibratedView

    if not isinstance(calibration, CalibratedView):
        raise ValueRangeError("calibration: expected what calibrate_dataset returns (a CalibratedView), got "
                              f"{type(calibration).__name__}")
    return {"info": calibration.info, "arrays": calibration.arrays}


def _network_input(frames: np.ndarray, kind: str, calibration: dict | None, coords: np.ndarray, flip: bool = False,
                   reverse_rows: bool = False):
    """The network's input for ``frames`` (counts or amplitudes, their rows reversed first with ``reverse_rows``;
    detector frames resampled with ``calibration`` at scan ``coords``; mirrored in k_row with ``flip``, as the
    pipeline mirrors them), and the sum of their counts (0 for amplitudes: they have no dose to tell)."""
    if reverse_rows:
        frames = frames[:, ::-1, :]
    if calibration is not None:
        from ..data.calibration import CalibratedView

        info = calibration["info"]
        if flip:
            info = {**info, "flip_patterns": not info.get("flip_patterns", False)}
        view = CalibratedView(frames, info, calibration["arrays"], coords=coords)
        counts = view.counts(slice(0, len(frames)))
        return np.sqrt(counts), float(counts.sum(dtype=np.float64))
    from ..physics.scan import flip_patterns

    if kind == "counts":  # (the sign kept: the predictor's check names a frame with negative counts by its scan index)
        frames = np.asarray(frames, dtype=np.float32)
        amplitudes, counts = np.sign(frames) * np.sqrt(np.abs(frames)), float(np.sum(frames, dtype=np.float64))
    else:
        amplitudes, counts = np.asarray(frames, dtype=np.float32), 0.0
    return (flip_patterns(amplitudes) if flip else amplitudes), counts


class _CentreOfMassUDF(UDF):
    """Each frame's centre of mass on the model's grid (calibrated as PhaseUDF calibrates) and its counting
    noise, for the scan rotation."""

    def __init__(self, kind: str, calibration, step_px, fastest: str, flip: bool, reverse_rows: bool,
                 rotation_deg: float):
        super().__init__(kind=kind, calibration=calibration, step_px=step_px, fastest=fastest, flip=flip,
                         reverse_rows=reverse_rows, rotation_deg=rotation_deg)

    def get_result_buffers(self):
        return {"com": self.buffer(kind="nav", extra_shape=(2,), dtype="float64"),
                "noise": self.buffer(kind="nav", dtype="float64")}

    def process_partition(self, partition):
        from ..data.calibration import centre_of_mass, centre_of_mass_noise

        first = int(self.meta.slice.origin[0])
        coords = scan_positions(tuple(self.meta.dataset_shape.nav), self.params.step_px, self.params.rotation_deg,
                                self.params.fastest, roi=self.meta.roi)[first : first + len(partition)]
        amplitudes, _ = _network_input(np.asarray(partition), self.params.kind, self.params.calibration, coords,
                                       self.params.flip, self.params.reverse_rows)
        counts = np.square(amplitudes, dtype=np.float64)
        self.results.com[:] = centre_of_mass(counts)
        self.results.noise[:] = centre_of_mass_noise(counts)


class _BlockUDF(UDF):
    """Each frame's network input (calibrated, flipped and with its rows in order as PhaseUDF makes it), for the
    probe check on a block of the scan."""

    def __init__(self, kind: str, calibration, step_px, fastest: str, flip: bool, reverse_rows: bool,
                 rotation_deg: float, n_px: int):
        super().__init__(kind=kind, calibration=calibration, step_px=step_px, fastest=fastest, flip=flip,
                         reverse_rows=reverse_rows, rotation_deg=rotation_deg, n_px=n_px)

    def get_result_buffers(self):
        return {"amplitude": self.buffer(kind="nav", extra_shape=(self.params.n_px, self.params.n_px),
                                         dtype="float32")}

    def process_partition(self, partition):
        first = int(self.meta.slice.origin[0])
        coords = scan_positions(tuple(self.meta.dataset_shape.nav), self.params.step_px, self.params.rotation_deg,
                                self.params.fastest, roi=self.meta.roi)[first : first + len(partition)]
        self.results.amplitude[:], _ = _network_input(np.asarray(partition), self.params.kind, self.params.calibration,
                                                      coords, self.params.flip, self.params.reverse_rows)


def _central_roi(nav, block: int):
    br, bc = min(block, nav[0]), min(block, nav[1])
    r0, c0 = (nav[0] - br) // 2, (nav[1] - bc) // 2
    roi = np.zeros(nav, dtype=bool)
    roi[r0 : r0 + br, c0 : c0 + bc] = True
    return roi, (br, bc)


def check_probe(ctx, dataset, model, step_px, rotation_deg: float = 0.0, fastest: str = "col",
                kind: str = "counts", calibration=None, flip_patterns: bool = False, reverse_rows: bool = False,
                energy_kev: float | None = None, semi_angle: float | None = None,
                rotation_note: str | None = None, check_step: bool = True) -> dict:
    """The data's probe against the model's on the central positions of a raster in a LiberTEM dataset: what
    ``deepphase reconstruct`` measures (:func:`deepphase.data.aberrations.measure_probe_mismatch`), with the
    frames read and prepared as :class:`PhaseUDF` prepares them. Returns
    :func:`~deepphase.data.aberrations.probe_check_from_block` (its ``note`` None when the probes agree, or held back
    when ``rotation_note``, the rotation check's, contradicts the geometry, or when the step looks wrong, which
    ``check_step`` false skips: a step just found)."""
    from ..data.aberrations import probe_check_from_block

    phase_model = model if hasattr(model, "probe") else _load(model)
    counts = _central_counts(ctx, dataset, phase_model.geometry.n_px, step_px, rotation_deg, fastest, kind,
                             calibration, flip_patterns, reverse_rows)
    return probe_check_from_block(counts, phase_model, step_px, rotation_deg, fastest,
                                  calibration.info if calibration is not None else None, semi_angle, energy_kev,
                                  rotation_note, check_step)


def _central_counts(ctx, dataset, n_px: int, step_px, rotation_deg, fastest, kind, calibration, flip_patterns,
                    reverse_rows) -> np.ndarray:
    """The counts of the central positions, prepared as :class:`PhaseUDF` prepares them, on the scan grid:
    (rows, cols, n, n), as :func:`deepphase.data.aberrations.probe_mismatch_from_block` reads them."""
    from ..data.aberrations import PROBE_CHECK_BLOCK

    roi, (br, bc) = _central_roi(tuple(dataset.shape.nav), PROBE_CHECK_BLOCK)
    udf = _BlockUDF(kind, _calibration_param(calibration), step_px, fastest, bool(flip_patterns), bool(reverse_rows),
                    float(rotation_deg), n_px)
    amplitude = np.asarray(ctx.run_udf(dataset=dataset, udf=udf, roi=roi)["amplitude"].raw_data, dtype=np.float64)
    counts = np.square(amplitude).reshape(br, bc, *amplitude.shape[-2:])
    return counts.transpose(1, 0, 2, 3) if fastest == "row" else counts  # (navigation axes: scan column, scan row)


def check_sense(ctx, dataset, model, step_px, rotation_deg: float, fastest: str = "col", kind: str = "counts",
                calibration=None, flip_patterns: bool = False, reverse_rows: bool = False) -> dict:
    """The scan's sense as the model's probe tells it (:func:`deepphase.data.aberrations.sense_from_block`) on the
    central positions of a raster in a LiberTEM dataset, read as :func:`check_probe` reads them; or why not."""
    from ..data.aberrations import PROBE_CHECK_MIN_PX, sense_from_block

    phase_model = model if hasattr(model, "probe") else _load(model)
    if min(tuple(dataset.shape.nav)) < PROBE_CHECK_MIN_PX:
        return {"skipped": f"fewer than {PROBE_CHECK_MIN_PX} positions a side"}
    try:
        counts = _central_counts(ctx, dataset, phase_model.geometry.n_px, step_px, rotation_deg, fastest, kind,
                                 calibration, flip_patterns, reverse_rows)
        return sense_from_block(counts, phase_model.probe, step_px, rotation_deg, fastest)
    except (ValueRangeError, ShapeError) as exc:
        return {"skipped": str(exc)}


def find_rotation(ctx, dataset, step_px, fastest: str = "col", kind: str = "counts", calibration=None,
                  block: int = 128, handedness: str = "auto", flip_patterns: bool = False,
                  reverse_rows: bool = False) -> dict:
    """The scan rotation of a raster in a LiberTEM dataset, and the detector's handedness, by the DPC curl
    criterion on its central block.

    What ``deepphase reconstruct --rotation auto`` finds (:func:`deepphase.data.calibration.scan_rotation_from_patterns`):
    the centre of mass of the central ``block × block`` positions' patterns (calibrated with ``calibration``,
    a :class:`CalibratedView` measured at rotation 0, whose descan it removes), then
    :func:`~deepphase.data.calibration.find_scan_rotation` (``handedness`` as there, of the patterns as LiberTEM
    reads them, or of them mirrored first with ``flip_patterns``; ``reverse_rows`` as for :class:`PhaseUDF`).
    Returns its dict, with ``block``; its ``flip_patterns`` is then PhaseUDF's parameter (the two flips
    combined).
    """
    from ..data.calibration import check_scan_rotation

    found, _ = _dpc_rotation(ctx, dataset, step_px, fastest, kind, calibration, block, handedness, flip_patterns,
                             reverse_rows)
    check_scan_rotation(found)
    return found


def _dpc_rotation(ctx, dataset, step_px, fastest, kind, calibration, block, handedness, flip_patterns, reverse_rows,
                  rotation_deg: float = 0.0, given_deg: float | None = None) -> dict:
    """:func:`find_rotation` without its refusal; ``rotation_deg``: the rotation ``calibration`` was measured at
    (its descan plane's coordinates); ``given_deg`` as for :func:`~deepphase.data.calibration.find_scan_rotation`.
    Returns the dict and what :func:`~deepphase.data.calibration.plot_scan_rotation` draws (com, noise)."""
    from ..data.calibration import find_scan_rotation

    nav = tuple(dataset.shape.nav)
    if len(nav) != 2:
        raise ShapeError(f"rotation: 'auto' needs a raster with a 2D navigation shape, the dataset has {nav}")
    roi, (br, bc) = _central_roi(nav, block)
    udf = _CentreOfMassUDF(kind, _calibration_param(calibration), step_px, fastest, bool(flip_patterns),
                           bool(reverse_rows), float(rotation_deg))
    result = ctx.run_udf(dataset=dataset, udf=udf, roi=roi)
    com = np.asarray(result["com"].raw_data).reshape(br, bc, 2)
    noise = np.asarray(result["noise"].raw_data).reshape(br, bc)
    if fastest == "row":  # the navigation axes are (scan column, scan row)
        com, noise = com.transpose(1, 0, 2), noise.T
    found = find_scan_rotation(com, handedness=handedness, given_deg=given_deg, noise=noise)
    figure = {"com": com, "noise": noise, "found": dict(found), "given_deg": given_deg}  # in the frames as flipped
    found["flip_patterns"] = found["flip_patterns"] != bool(flip_patterns)
    return found, figure


def _add_window(buffer, reduced: dict) -> None:
    """Add the binned window of :meth:`PatchReducer.reduce` into an object-grid buffer at its place."""
    (r0, c0), window = reduced["window_origin"], reduced["window"]
    buffer[r0 : r0 + window.shape[0], c0 : c0 + window.shape[1]] += window


def _runner(model, engine: str, device, auto: bool):
    """The network prepared once per process: auto's ONNX export, if it fails, falls back to channels-last."""
    from .engines import exported_onnx, prepare_network

    key = (model.name, engine, str(device), auto)
    held = _RUNNERS.get(key)
    if held is None or held[0] is not model:  # the cache holds the model too: an id could be reused
        runner = None
        if auto and engine == "onnx":  # export now, as the pipeline does
            runner = exported_onnx(model, device, (1, model.geometry.n_px, model.geometry.n_px))
            engine = "onnx" if runner is not None else "channels-last"
        _RUNNERS[key] = held = (model, runner or prepare_network(model, engine, device))
    return held[1]


_RUNNERS: dict = {}  # (model name, engine, device, auto) → (model, runner), one per process


def _stitch(model, template, positions, done, sums_i, sums_j, binned, params, dose, sigma_binned=None):
    """The image of the positions in ``done`` on the object grid (from pixel (0, 0)), as ``reconstruct`` makes it,
    and with ``sigma_binned`` (the σ head's binned patches) its uncertainty on the same grid (else None)."""
    from .deblur import resolve_deblur
    from .pipeline import finish
    from .stitching import PairwiseStitcher

    if done.all():
        stitcher, used = template.empty_copy(), positions
        stitcher.load_state({"sums_i": sums_i, "sums_j": sums_j, "total": binned, "done": done})
        rows, cols = stitcher.shape
    else:  # while the scan runs: a stitcher of the positions so far, fed their columns of the overlap sums
        index = np.flatnonzero(done)
        used = positions[index]
        stitcher = PairwiseStitcher(used, template.mask, template.geometry)
        column = {tuple(lag): k for k, lag in enumerate(template.reducer.lags.tolist())}
        columns = [column[tuple(lag)] for lag in stitcher.reducer.lags.tolist()]
        rows, cols = stitcher.shape
        stitcher.load_state({"sums_i": sums_i[index][:, columns], "sums_j": sums_j[index][:, columns],
                             "total": binned[:rows, :cols], "done": np.ones(len(index), dtype=bool)})
    accumulators = [stitcher]
    if sigma_binned is not None:  # σ is blended with offsets zero: only its binned sums are needed
        sigmas = stitcher.empty_copy()
        sigmas.load_state({**stitcher.state(), "total": sigma_binned[:rows, :cols]})
        accumulators.append(sigmas)
    deblur, _ = resolve_deblur(params.deblur, dose)
    full, _, phase, (r0, c0), spread, _ = finish(accumulators, used, template.mask, model, "pairwise",
                                                 params.remove_plane, deblur=deblur, dose=dose,
                                                 sigma_head=sigma_binned is not None)
    if spread is None:
        return full, None
    spread_full = np.full(full.shape, np.nan, dtype=np.float32)
    spread_full[r0 : r0 + phase.shape[0], c0 : c0 + phase.shape[1]] = spread
    return full, spread_full


def to_reconstruction(udf: PhaseUDF, result) -> "Reconstruction":
    """A :class:`~deepphase.reconstruction.pipeline.Reconstruction` of a finished run: the phase cropped to
    the scanned area, with the model and processing recorded, for
    :func:`~deepphase.reconstruction.pipeline.write_outputs` (phase.npy, .tif, .emd, .png, metadata.json).

    ``result``: what ``ctx.run_udf(dataset=..., udf=udf)`` returned.
    """
    from .deblur import resolve_deblur
    from .pipeline import Reconstruction, crop_to_coverage, dose_note

    box = np.asarray(result["phase"].data)
    top, left = (int(k) for k in np.asarray(result["origin_px"].data).reshape(-1))
    phase = np.full((top + box.shape[0], left + box.shape[1]), np.nan, dtype=np.float32)  # from object pixel (0, 0)
    phase[top:, left:] = box
    patterns = int(np.asarray(result["patterns"].data).reshape(-1)[0])
    dose = float(np.asarray(result["electrons_per_pattern"].data).reshape(-1)[0])
    dose = None if not np.isfinite(dose) else dose
    model = _load(udf.params.model)
    cropped, origin = crop_to_coverage(phase)
    deblurred, why = resolve_deblur(udf.params.deblur, dose)
    sigma, record = None, None
    if udf.params.uncertainty == "head":
        from .uncertainty import sigma_scale_at

        (r0, c0), (rows, cols) = origin, cropped.shape
        sigma = np.asarray(result["uncertainty"].data)[r0 - top : r0 - top + rows, c0 - left : c0 - left + cols]
        scale, source = sigma_scale_at(model, dose, method="head")
        record = {"method": "σ head", "samples": 0, "sigma_scale": float(scale),
                  "note": "σ = sigma_scale × the blend of the network's predicted σ patches, from the phase's own "
                          f"forward pass ({'factor ' + source if scale != 1.0 and source else 'not calibrated'})"}
    return Reconstruction(cropped, origin, phase, {},
                          model.record(),
                          {"stitching": "pairwise", "plane_removed": udf.params.remove_plane, "deblurred": deblurred,
                           "deblur_reason": why, "electrons_per_pattern": None if dose is None else round(dose, 1),
                           "dose_note": dose_note(model, dose), "engine": udf.params.engine,
                           "precision": udf.params.precision, "patterns": patterns,
                           "calibrated": udf.params.calibration is not None, "uncertainty": record,
                           "run_by": "LiberTEM (deepphase.reconstruction.libertem_udf.PhaseUDF)"},
                          sigma)


def _pick(ctx, dataset, indices: np.ndarray) -> np.ndarray:
    """Frames ``indices`` (in frame order) of a LiberTEM dataset, (len(indices), *sig) in its dtype."""
    from libertem.udf.raw import PickUDF

    nav = tuple(dataset.shape.nav)
    roi = np.zeros(int(np.prod(nav)), dtype=bool)
    roi[indices] = True
    frames = ctx.run_udf(dataset=dataset, udf=PickUDF(), roi=roi.reshape(nav))["intensity"].data
    return np.asarray(frames).reshape(int(roi.sum()), *tuple(dataset.shape.sig))


def calibrate_dataset(ctx, dataset, model=None, step_px=None, positions=None, rotation_deg: float = 0.0,
                      fastest: str = "col", max_frames: int = 2048, png: str | Path | None = None,
                      reverse_rows: bool | None = None, **options):
    """Measure the detector calibration of a LiberTEM dataset for :class:`PhaseUDF` (``calibration=``).

    Reads ``max_frames`` patterns spread over the scan (LiberTEM's ``PickUDF``) and measures on them what
    :func:`deepphase.data.calibration.calibrate` measures (bad pixels, disk centre and radius, descan
    in the scan positions, zoom), with the same ``options`` (``kind``, ``gain``, ``mrad_per_px``,
    ``semi_angle``, ``energy``, ...); ``reverse_rows`` as for :class:`PhaseUDF` (default: :func:`rows_reversed`
    of the dataset; recorded in the view's ``info``, where PhaseUDF takes it from). Returns the calibrated view
    of the sample, whose ``info`` says what was found.
    """
    from ..data.calibration import calibrate
    from ..models.modelfile import load_model

    all_positions = scan_positions(tuple(dataset.shape.nav), step_px, rotation_deg, fastest, positions)
    pick = spread_indices(len(all_positions), max_frames)
    frames = _pick(ctx, dataset, pick)
    if reverse_rows is None:
        reverse_rows = rows_reversed(dataset)
    view, _ = calibrate(frames[:, ::-1, :] if reverse_rows else frames, load_model(model), all_positions[pick],
                        png=png, max_frames=len(pick), **options)
    view.info["rows_reversed"] = bool(reverse_rows)
    return view


def rows_reversed(dataset) -> bool:
    """Whether LiberTEM reads this dataset's frames with their rows the other way round from deepphase's own
    reader (rosettasciio): Merlin .mib files. PhaseUDF's ``reverse_rows`` for it."""
    return type(dataset).__name__ == "MIBDataSet"


def _check_npy(path: Path) -> None:
    """Refuse an .npy file NumPy would not read (cut short, not .npy, pickled objects) in its own words."""
    from ..data.io import npy_problem
    from ..errors import InputFileError

    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise InputFileError(f"data: could not read {str(path)!r} as .npy ({npy_problem(path, exc)})") from None
    del array


def _libertem_path(path, nav_shape):
    """The path LiberTEM opens: a Merlin scan's shape is in its .hdr, which LiberTEM reads only when given the
    .hdr itself, so a .mib with its .hdr beside it (as the pipeline's reader takes it) opens as the .hdr."""
    hdr = merlin_header(path) if nav_shape is None else None
    return Path(path) if hdr is None else hdr


@in_callers_words(data="path", **{"scan-shape": "nav_shape", "input": "kind", "no-calibration": ("calibration", "off"),
                                   "calibrate": ("calibration", "on")})
def reconstruct_file(path, *, model=None, step_px=None, positions=None, nav_shape=None, rotation_deg=0.0,
                     fastest: str = "col", kind: str | None = None, calibration: str = "auto",
                     calibration_options: dict | None = None, calibration_png=None, batch_size: int = 512,
                     engine: str = "auto", precision: str = "auto", deblur="auto", remove_plane: bool = True,
                     uncertainty=None, flip_patterns: bool | None = None, rotation_png=None,
                     probe_check: bool = True, workers: int | None = None, progress: bool = False, ctx=None):
    """Open a 4D-STEM file with LiberTEM and reconstruct it with :class:`PhaseUDF` on LiberTEM's executor.

    What ``deepphase reconstruct --libertem`` runs: every format LiberTEM reads (its ``"auto"`` detection).

    Parameters
    ----------
    path : the file (or the first file of a set, as LiberTEM takes it).
    nav_shape : (rows, cols) of the scan, for files that do not record it (LiberTEM's ``nav_shape``), in the
        order of ``fastest``: with ``fastest="row"`` the file's frames are read as (cols, rows).
    kind : "counts" or "amplitude"; None: inferred from 16 frames (whole numbers are counts).
    rotation_deg : the raster's rotation, or "auto": found from the patterns (:func:`find_rotation`), with
        the detector's handedness unless ``flip_patterns`` is given.
    step_px : the raster's step, or "auto": the step the weak-phase transfer with the model's probe fits best on
        the central positions (:func:`deepphase.data.aberrations.find_scan_step`, as ``deepphase reconstruct``
        finds it; at the rotation found, with ``rotation_deg="auto"``); ``step_px`` and ``step_found`` in what is
        returned.
    flip_patterns : mirror the patterns in k_row (see :class:`PhaseUDF`). None: False, or what
        ``rotation_deg="auto"`` finds. (A Merlin .mib's rows are first put in rosettasciio's order, as
        ``deepphase reconstruct`` reads them without LiberTEM: PhaseUDF's ``reverse_rows``.)
    calibration : "auto" (calibrate patterns that are not the model's n×n grid), "on" or "off".
    calibration_options : for :func:`calibrate_dataset` (``gain``, ``mrad_per_px``, ``semi_angle``, ...).
    calibration_png : where the calibration figure goes, if one is measured.
    rotation_png : where the DPC curl criterion's figure goes (:func:`~deepphase.data.calibration.plot_scan_rotation`):
        with ``rotation_deg="auto"``, or when the check of a given rotation has a note.
    probe_check : measure the data's probe against the model's on the central positions of a raster
        (:func:`check_probe`; ``probe_check`` in what is returned).
    workers : LiberTEM's local CPU workers (default: LiberTEM's default context, every core and GPU).
    ctx : a LiberTEM ``Context`` to use instead (left open).
    model, positions, fastest, batch_size, engine, precision, deblur, remove_plane, uncertainty : as for
        :class:`PhaseUDF`.

    Returns
    -------
    (Reconstruction, dict) : the reconstruction (as :func:`to_reconstruction` makes it, with wall times) and
    what was read: LiberTEM's dataset type, navigation and signal shapes, the input kind, the calibration,
    the rotation used (and, for "auto", what :func:`find_rotation` found), ``patterns_flipped`` and
    ``rows_reversed``.
    """
    import time

    import libertem
    import libertem.api as lt
    from libertem.io.dataset.base import DataSetException

    from ..data.aberrations import PROBE_CHECK_MIN_PX, check_step_raster, find_scan_step, told_to_probe_aware
    from ..data.calibration import (ROTATION_CHECK_BLOCK, ROTATION_CHECK_MIN_PX, check_scan_rotation, dark_level_note,
                                    disk_edge_note, on_the_given_axis, plot_scan_rotation, rotation_note, with_sense)
    from ..data.io import infer_kind
    from ..models.modelfile import load_model
    from .checks import PATTERN_SAMPLE, bad_pixel_note, check_uncalibrated, detector_axes_first_note, \
        off_disk_calibration, saturation_note

    if calibration not in ("auto", "on", "off"):
        raise ValueRangeError(f"calibration: expected 'auto', 'on' or 'off', got {calibration!r}")
    if not Path(path).exists():
        from ..errors import InputFileError

        raise InputFileError(f"data: {str(path)!r} does not exist")
    auto_rotation, auto_step = rotation_deg == "auto", step_px == "auto"
    if auto_rotation and positions is not None:
        raise ValueRangeError("rotation: 'auto' needs a raster (step_px), not positions")
    if auto_step and positions is not None:
        raise ValueRangeError("step: 'auto' finds a raster's step; positions are given: drop --step auto")
    if nav_shape is not None:
        check_mib_scan_shape(path, nav_shape)
    if Path(path).suffix.lower() == ".npy":  # (LiberTEM's readers each failed on a cut file, in five worker logs, and
        _check_npy(Path(path))                # then "give --scan-shape": the scale audit, s41)
    if nav_shape is not None and fastest == "row":
        nav_shape = tuple(nav_shape)[::-1]  # LiberTEM's last navigation axis is the one that varies fastest
    own = ctx is None
    if own:
        ctx = lt.Context() if workers is None else lt.Context.make_with("dask", cpus=int(workers))
    try:
        t0 = time.perf_counter()
        try:
            dataset = ctx.load("auto", path=str(_libertem_path(path, nav_shape)),
                               **({"nav_shape": tuple(nav_shape)} if nav_shape else {}))
        except (DataSetException, ValueError) as exc:  # LiberTEM's readers raise either for a file they refuse
            raise DeepPhaseError(f"data: LiberTEM could not open {str(path)!r} ({exc}); for a file that does not "
                                 "record the scan's shape give it (--scan-shape), or check the path") from exc
        nav, sig = tuple(dataset.shape.nav), tuple(dataset.shape.sig)
        in_file = getattr(getattr(dataset, "meta", None), "image_count", None)
        if nav_shape is not None and in_file is not None and int(np.prod(nav)) != int(in_file):
            # LiberTEM reads a navigation shape other than the file's frames: the first ones only (frames dropped
            # without a word), or past the end (an AssertionError in its tiling) (the scale audit, s41). As the
            # pipeline: refused.
            rows, cols = nav[::-1] if fastest == "row" else nav
            raise ShapeError(f"scan-shape: {rows}×{cols} = {rows * cols} positions do not match the {int(in_file)} "
                             f"patterns in {str(path)!r}")
        phase_model = load_model(model)
        n = phase_model.geometry.n_px
        frames = int(np.prod(nav))
        # The pipeline's checks of the patterns themselves, on the same sample (read once, in one pass).
        sample = _pick(ctx, dataset, spread_indices(frames, PATTERN_SAMPLE))
        if kind is None:
            kind = infer_kind(sample)
        sample = sample.astype(np.float64)
        pattern_notes = [text for text in (detector_axes_first_note(sample), saturation_note(sample, kind)) if text]
        view, found, check, figure, step_found = None, None, None, None, None
        # Merlin frames: LiberTEM's rows run bottom-up against rosettasciio's (the pipeline's reader).
        reverse_rows = rows_reversed(dataset)
        if auto_step:
            if len(nav) != 2:
                raise ShapeError(f"step: 'auto' needs a raster with a 2D navigation shape, the dataset has {nav}")
            check_step_raster(nav[::-1] if fastest == "row" else nav)  # (in the scan's rows × columns)
        # (with step "auto" the descan plane is fitted in scan indices, step 1, until the step is found)
        coords_step = 1.0 if auto_step else step_px
        in_units = (calibration_options or {}).get("gain", 1.0) != 1.0  # (the calibration takes the gain off)
        calibrating = calibration == "on" or (calibration == "auto" and (sig != (n, n) or in_units))
        if not calibrating:  # as the pipeline: a disk only off the model's centre is calibrated under "auto"
            calibrating, text = off_disk_calibration(sample[:, ::-1] if reverse_rows else sample, kind,
                                                     phase_model.probe, calibration, bool(flip_patterns))
            pattern_notes += [text] if text else []
        if not calibrating:
            check_uncalibrated(n, **{k: (calibration_options or {}).get(k) for k in ("mrad_per_px", "model_mrad_per_px")})
        if calibrating:
            view = calibrate_dataset(ctx, dataset, model, coords_step, positions,
                                     0.0 if auto_rotation else rotation_deg, fastest, png=calibration_png,
                                     reverse_rows=reverse_rows, kind=kind, **(calibration_options or {}))
            pattern_notes += [text for text in (dark_level_note(view.info), disk_edge_note(view.info)) if text]
        elif text := bad_pixel_note(sample[:, ::-1] if reverse_rows else sample, kind):  # (a calibration masks them)
            pattern_notes.append(text)

        def find_step(rotation: float, flipped: bool) -> float:
            """Step "auto" at ``rotation``, then the descan plane in the positions at the step found."""
            nonlocal step_found
            counts = _central_counts(ctx, dataset, n, coords_step, rotation, fastest, kind, view, flipped,
                                     reverse_rows)
            step_found = find_scan_step(counts, phase_model.probe, rotation, fastest)
            if view is not None:
                view.use_coords(scan_positions(nav, step_found["step_px"], rotation, fastest)[
                    spread_indices(frames, len(view))])
            return step_found["step_px"]

        flip = bool(flip_patterns)
        if auto_rotation:  # the descan (if calibrated) is removed first, as the pipeline does
            found, figure = _dpc_rotation(ctx, dataset, coords_step, fastest, kind, view, 128,
                                          "auto" if flip_patterns is None else "as recorded", flip, reverse_rows)
            if auto_step:  # found at the rotation the curl found (either sense fits it), in its coordinates
                if view is not None:
                    view.use_coords(scan_positions(nav, 1.0, found["rotation_deg"], fastest)[
                        spread_indices(frames, len(view))])
                step_px = find_step(found["rotation_deg"], found["flip_patterns"])
            found = with_sense(found, check_sense(ctx, dataset, phase_model, step_px, found["rotation_deg"], fastest,
                                                  kind, view, found["flip_patterns"], reverse_rows))
            check_scan_rotation(found)
            rotation_deg, flip = found["rotation_deg"], found["flip_patterns"]
            if view is not None:  # the descan plane, fitted at rotation 0, in the rotated positions
                view.use_coords(scan_positions(nav, step_px, rotation_deg, fastest)[spread_indices(frames, len(view))])
        elif auto_step:  # at the rotation given, which the check below then checks
            step_px = find_step(rotation_deg, flip)
        if not auto_rotation and positions is None and len(nav) == 2 and min(nav) >= ROTATION_CHECK_MIN_PX:
            # a given rotation, checked
            check, figure = _dpc_rotation(ctx, dataset, step_px, fastest, kind, view, ROTATION_CHECK_BLOCK, "auto",
                                          flip, reverse_rows, rotation_deg, given_deg=rotation_deg)
            if on_the_given_axis(figure["found"], rotation_deg):  # which way round: the probe's say-so, not the skew's
                sense = check_sense(ctx, dataset, phase_model, step_px, figure["found"]["rotation_deg"], fastest, kind,
                                    view, flip, reverse_rows)
                check, figure["found"] = with_sense(check, sense), with_sense(figure["found"], sense)
            check["note"] = rotation_note(figure["found"], rotation_deg)  # (its flip relative to the given one)
            figure = figure if check["note"] else None
        probe = None
        if probe_check and positions is None and len(nav) == 2 and min(nav) >= PROBE_CHECK_MIN_PX:
            try:
                probe = check_probe(ctx, dataset, phase_model, step_px, rotation_deg, fastest, kind, view, flip,
                                    reverse_rows, (calibration_options or {}).get("energy"),
                                    (calibration_options or {}).get("semi_angle"), (check or {}).get("note"),
                                    check_step=step_found is None)
            except (ValueRangeError, ShapeError) as exc:  # NaN/Inf in the block, too few frequencies: as the pipeline
                probe = {"skipped": str(exc)}
        told = None
        if phase_model.probe_aware:  # told what the probe check found, as the pipeline tells it
            told = told_to_probe_aware(phase_model, probe)
        udf = PhaseUDF(model=model, step_px=step_px, positions=positions, rotation_deg=rotation_deg,
                       fastest=fastest, kind=kind, calibration=view, flip_patterns=flip, reverse_rows=reverse_rows,
                       batch_size=batch_size, engine=engine, precision=precision, deblur=deblur,
                       remove_plane=remove_plane, uncertainty=uncertainty,
                       told=None if told is None else told["told_coefficients_rad_per_px2"])
        t1 = time.perf_counter()
        result = ctx.run_udf(dataset=dataset, udf=udf, progress=progress)
        rec = to_reconstruction(udf, result)
        t2 = time.perf_counter()
        if rotation_png is not None and figure is not None:
            plot_scan_rotation(**figure, path=rotation_png)
    finally:
        if own:
            ctx.close()
    rec.timings = {"setup_s": round(t1 - t0, 3), "predict_and_stitch_s": round(t2 - t1, 3),
                   "patterns_per_second": round(frames / max(t2 - t1, 1e-9), 1)}
    read = {"reader": f"LiberTEM {libertem.__version__}", "libertem_dataset": type(dataset).__name__,
            "navigation_shape": list(nav), "pattern_shape": list(sig), "input": kind,
            "calibration": None if view is None else view.info, "rotation_deg": rotation_deg,
            "patterns_flipped": flip, "rows_reversed": reverse_rows, "pattern_notes": pattern_notes,
            **({"rotation_check": check} if check else {}),
            "rotation_png": str(rotation_png) if rotation_png is not None and figure is not None else None,
            **({"rotation_found": found} if found is not None else {}),
            **({"probe_check": probe} if probe is not None else {}),
            **({"step_px": step_px, "step_found": step_found} if step_found is not None else {}),
            **({"probe_aware": told} if told is not None else {})}
    return rec, read
