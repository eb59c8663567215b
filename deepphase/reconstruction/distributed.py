"""Reconstruction on a dask.distributed cluster: each worker predicts and reduces its tile, one global solve.

The scan is cut into tiles of consecutive positions (``tile_size`` patterns each). Every tile is one
task: the worker opens the file itself (path and index range travel, not arrays), reads its patterns,
predicts their patches with the model it loaded from the model folder (once per worker process) and
reduces them as the pairwise stitcher needs them (each patch's overlap sums at the neighbour lags and
its pixels binned on the object grid; :class:`~deepphase.reconstruction.stitching.PatchReducer`): about
0.1 kB a position travels back instead of a 4 kB patch. The client adds the tiles' reductions and
makes the image with the same global offset solve as
:func:`deepphase.reconstruction.pipeline.reconstruct`, so the image is the single-process image (up
to float32 rounding of the network, which may differ between batch sizes).

The reductions are linear in the patches and a pair of neighbours in two tiles gets each half from
its own tile, so the tiles need no margin: each pattern is predicted exactly once. The stitchers that
need every patch ("least-squares", "seed") get whole patches back instead.

Any dask.distributed cluster works: :class:`distributed.LocalCluster` (``deepphase reconstruct
--workers N``), a running scheduler (``--scheduler ADDRESS``), or dask-jobqueue's ``SLURMCluster`` for a
batch system. The workers must see the data file and the model folder (a shared file system).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from ..data.io import AmplitudeView, check_patterns, infer_kind, load_scan, scan_shape_to_read
from ..errors import DeepPhaseError, ShapeError, ValueRangeError
from ..models.modelfile import check_compatible, load_model
from ..physics.scan import validate_positions
from ..physics.geometry import output_mask
from .pipeline import (Reconstruction, dose_settings, empty_patterns_note, finish, make_accumulators,
                       more_empty_than_chance, reconstruct)
from .stitching import METHODS

DASK_EXTRA = 'pip install -e ".[distributed]" (in deepphase\'s source folder)'


def _require_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise DeepPhaseError(f"workers: distributed reconstruction needs dask.distributed ({exc}); install it with "
                             f"`{DASK_EXTRA}`") from exc
    return distributed


@contextlib.contextmanager
def open_client(workers: int | None = None, scheduler: str | None = None, **cluster_options):
    """A dask client: on a LocalCluster of ``workers`` processes (one thread each), or on ``scheduler``.

    The LocalCluster (if any) is shut down on exit; a scheduler given by address is left running.
    """
    distributed = _require_distributed()
    if (workers is None) == (scheduler is None):
        raise DeepPhaseError("workers: give either a number of local workers or a scheduler address, not both")
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except OSError as exc:
            raise DeepPhaseError(f"scheduler: could not connect to {scheduler!r} ({exc})") from exc
        with client:
            yield client
        return
    if int(workers) < 1:
        raise ValueRangeError(f"workers: expected a positive number of worker processes, got {workers}")
    options = {"n_workers": int(workers), "threads_per_worker": 1, "processes": True, **cluster_options}
    # dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536; any fixed value turns off glibc's
    # dynamic mmap threshold, so every large tensor is a fresh mmap, and PyTorch's CPU inference
    # takes ~30 % longer (measured: 2.8 → 3.7 s for 1024 patterns). Leave the variable unset here;
    # set it the same way in the dask configuration of other clusters.
    import dask

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        with _deaf_to_ctrl_c():
            cluster = distributed.LocalCluster(**options)
        with cluster, distributed.Client(cluster) as client:
            # (register_plugin since distributed 2023.9; register_worker_plugin before it)
            register = getattr(client, "register_plugin", None) or client.register_worker_plugin
            from ._quiet_workers import QuietCancellations

            register(QuietCancellations(), name="deepphase-quiet-cancellations")
            yield client


def _tile_result(future, start: int, tile_size: int, n: int):
    """A tile's reductions; a worker's own error is re-raised here as it was, the loss of the workers that ran it is
    said in one line (it was dask's traceback: FutureCancelledError when every worker was killed, the audit, s36)."""
    from concurrent.futures import CancelledError  # (distributed's FutureCancelledError is one)

    from distributed.scheduler import KilledWorker

    try:
        return future.result()
    except (CancelledError, KilledWorker) as exc:
        why = ("the workers that took it were killed, each time (out of memory, or a crash in the reading or the "
               "network)" if isinstance(exc, KilledWorker) else "the cluster lost it (every worker gone?)")
        raise DeepPhaseError(f"workers: patterns {start:,}…{min(start + tile_size, n) - 1:,} were not predicted: "
                             f"{why}; run again, with fewer --workers or a smaller --tile-size if memory is short, or "
                             "in one process (without --workers) to see the error") from exc


@contextlib.contextmanager
def _deaf_to_ctrl_c():
    """Start the local workers with Ctrl-C ignored: a terminal sends it to every process of its group, and each
    worker printed its own KeyboardInterrupt traceback beside the command's one line (the failure audit, s36). An
    ignored signal stays ignored in a spawned process, and Python then installs no handler of its own; the client
    still takes Ctrl-C and closes the cluster. (A Ctrl-C in the second or two the workers take to start is lost.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@functools.lru_cache(maxsize=4)
def _worker_model(model_path: str | None, told: tuple | None = None):
    """The model, loaded once per worker process; a probe-aware one ``told`` the data's probe (coefficients,
    :meth:`~deepphase.models.modelfile.PhaseModel.told`)."""
    model = load_model(model_path)
    return model if told is None else model.told(told)


def _worker_device(device: str):
    """The worker's device; with several GPUs visible and none named, one chosen by the worker's name."""
    import torch

    from ..runtime import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker

            name = get_worker().name
        except (ImportError, ValueError):
            name = 0
        index = name if isinstance(name, int) else zlib.crc32(str(name).encode())
        dev = torch.device("cuda", index % torch.cuda.device_count())
    return dev


def _open(path, dataset, scan_shape):
    if Path(path).suffix.lower() == ".npz":
        state = Path(path).stat()
        return _open_npz(str(path), state.st_size, state.st_mtime_ns)
    return load_scan(path, dataset, scan_shape_to_read(path, scan_shape))


@functools.lru_cache(maxsize=1)
def _open_npz(path: str, size: int, mtime_ns: int):
    """An .npz archive, which NumPy decompresses whole to read one array: once per worker process and file state, not
    once per tile (every tile read the whole scan: 393 against 547 patterns/s for 4,096 patterns in 64 tiles, and
    the cost grows with the square of the scan; the scale audit, s41)."""
    return load_scan(path)


def predict_tile(path: str, start: int, stop: int, model_path: str | None, dataset: str | None = None,
                 kind: str = "amplitude", transform=None, batch_size: int = 512, device: str = "auto",
                 precision: str = "auto", scan_shape=None, reducer=None, origins=None, draws: int = 1,
                 neighbours=None, sigma_head: bool = False, told: tuple | None = None) -> list:
    """Patches, or their reductions, of patterns ``start:stop`` of a file: one task, run on a worker.

    Returns one item per draw (the prediction, then ``draws − 1`` Monte Carlo dropout samples): the
    patches (stop − start, out, out), or, with a ``reducer`` (and the tile's canvas ``origins``), what
    :meth:`~deepphase.reconstruction.stitching.PatchReducer.reduce` makes of them.

    ``transform``, if given, is a picklable callable ``frames -> array-like of amplitudes`` applied to the
    opened file's frames instead of the plain counts/amplitude view (e.g. a detector calibration).
    ``neighbours``: for a neighbourhood model, the tile's rows of the scan's (N, 9) neighbour indices; the
    worker then also reads the halo of frames they point to.
    The last item is always ``{"empty": [...]}``: the patterns of the tile that are zero everywhere (frames never
    written), as the single-process pipeline counts them.
    ``sigma_head``: one more item before it, the σ head's patches of the first draw's forward pass (or
    their reductions).
    ``told``: what a probe-aware model is told (:meth:`~deepphase.models.modelfile.PhaseModel.told`).
    """
    from .predict import predict_patches

    model = _worker_model(model_path, told)
    data = _open(path, dataset, scan_shape)
    try:
        view = transform(data.frames) if transform is not None else AmplitudeView(data.frames, kind)
        lo, hi = (start, stop) if neighbours is None else (int(neighbours.min()), int(neighbours.max()) + 1)
        tile = np.asarray(view[lo:hi], dtype=np.float32)
    finally:
        data.close()
    check_patterns(tile, lo)  # names the pattern by its index in the whole scan
    own = tile[start - lo : stop - lo]
    empty = (start + np.flatnonzero(~own.reshape(len(own), -1).any(axis=1))).tolist()
    out, sigmas = [], None
    dev = _worker_device(device)
    for k in range(int(draws)):
        # The same seeds as the single-process pipeline's chunks only if tiles and chunks coincide.
        patches = predict_patches(model, tile, batch_size=batch_size, device=dev, progress=False,
                                  start=start - lo, stop=stop - lo,
                                  neighbours=None if neighbours is None else neighbours - lo,
                                  precision=precision, mc_dropout_seed=None if k == 0 else k * 1_000_003 + start,
                                  sigma=sigma_head and k == 0,
                                  on_device=reducer is not None and dev.type == "cuda")  # reduced on the GPU
        if sigma_head and k == 0:
            patches, sigmas = patches
        out.append(reducer.reduce(patches, origins) if reducer is not None else patches)
    if sigmas is not None:
        out.append(reducer.reduce(sigmas, origins, remove_mean=False) if reducer is not None else sigmas)
    return [*out, {"empty": empty}]


def reconstruct_distributed(
    path: str | Path,
    positions,
    model_path: str | Path | None = None,
    client=None,
    tile_size: int = 4096,
    *,
    dataset: str | None = None,
    scan_shape: tuple[int, int] | None = None,
    kind: str | None = None,
    transform=None,
    stitching: str | None = None,
    remove_plane: bool = True,
    batch_size: int = 512,
    device: str = "auto",
    precision: str = "auto",
    sampling: float | None = None,
    progress: bool | None = None,
    uncertainty_samples: int = 0,
    sigma_scale: float | None = None,
    deblur: bool | str = "auto",
    sigma_head: bool = False,
    told=None,
) -> Reconstruction:
    """:func:`~deepphase.reconstruction.pipeline.reconstruct` of a file, spread over a dask cluster.

    Parameters
    ----------
    path : the scan file (any format :func:`deepphase.data.io.load_scan` reads), visible to the workers.
    positions : (N, 2) array of top-left corners (row, col) in real-space pixels.
    model_path : model folder (visible to the workers), or None for the packaged default.
    client : a ``distributed.Client``.
    tile_size : patterns per task.
    dataset : dataset inside an HDF5/zarr file.
    scan_shape : the scan shape, for files that do not record it (as for ``load_scan``).
    kind : "counts" or "amplitude" (default: what the file says, else inferred from its values).
    transform : optional picklable ``frames -> amplitudes`` applied on the workers (then ``kind`` is unused).
    stitching, remove_plane, batch_size, device, precision, sampling, uncertainty_samples, sigma_scale, deblur,
    sigma_head : as for ``reconstruct`` (``stitching=None``: its default). ``device`` is each worker's.
    told : for a probe-aware model, the data's probe against its own (a_rr, a_rc, a_cc), as
        :meth:`~deepphase.models.modelfile.PhaseModel.told` takes them; None: its own probe.

    Returns
    -------
    Reconstruction, with ``timings`` holding the wall times of the distributed prediction and of
    the final solve, and ``processing`` the number of workers and tiles.
    """
    _require_distributed()
    if client is None:
        raise DeepPhaseError("client: expected a distributed.Client (see open_client)")
    if int(tile_size) < 1:
        raise ValueRangeError(f"tile_size: expected a positive number of patterns per task, got {tile_size}")
    if uncertainty_samples and int(uncertainty_samples) < 2:
        raise ValueRangeError(f"uncertainty_samples: expected at least 2 samples, got {uncertainty_samples}")
    if sigma_head and uncertainty_samples:
        raise ValueRangeError("uncertainty: the σ head's uncertainty is one method, Monte Carlo dropout samples "
                              "another; choose one")
    tile_size = int(tile_size)
    if stitching is None:
        stitching = inspect.signature(reconstruct).parameters["stitching"].default
    if stitching not in METHODS:
        raise ValueRangeError(f"stitching: expected one of {', '.join(repr(m) for m in METHODS)}, got {stitching!r}")
    path = Path(path).resolve()
    if model_path is not None:  # a folder travels as an absolute path; a packaged model's name as it is
        model_path = str(Path(model_path).resolve()) if Path(model_path).exists() else str(model_path)
    model = load_model(model_path)
    if told is not None:  # (refuses a model that is not probe-aware here rather than on a worker)
        told = tuple(float(c) for c in told)
        model = model.told(told)
    if sigma_head:
        from .predict import check_sigma_head

        check_sigma_head(model)
    data = _open(path, dataset, scan_shape)
    try:
        shape = tuple(data.frames.shape)
        if kind is None and transform is None:
            kind = data.kind or infer_kind(data.frames)
        view = transform(data.frames) if transform is not None else AmplitudeView(data.frames, kind)
        shape = tuple(view.shape)
        if len(shape) == 3:  # the dose decides "auto" deblurring: read here, once, from a sample of frames
            dose_info = dose_settings(deblur, stitching, view, model)
    finally:
        data.close()
    if len(shape) != 3:
        raise ShapeError(f"data: expected (N, k, k) patterns, got shape {shape}")
    check_compatible(model, shape[1:], sampling)
    positions = validate_positions(positions, shape[0])
    neighbours = None
    if model.in_channels > 1:  # each task gets its rows of the neighbour indices and reads their halo
        from .neighbourhood import neighbour_indices

        neighbours = neighbour_indices(positions, model.neighbourhood["step_px"],
                                       size=int(round(model.in_channels ** 0.5)))
    n, draws = shape[0], 1 + int(uncertainty_samples or 0)
    mask = output_mask(model.probe, model.geometry)

    t0 = time.perf_counter()
    accumulators = make_accumulators(stitching, positions, mask, model.geometry, draws, sigma_head=sigma_head)
    reducer, origins = None, None
    if stitching == "pairwise":
        reducer = client.scatter(accumulators[0].reducer, broadcast=True)  # one copy per worker, not per task
        origins = accumulators[0].origins
    starts = range(0, n, tile_size)
    futures = [client.submit(predict_tile, str(path), s, min(s + tile_size, n), model_path, dataset, kind, transform,
                             batch_size, device, precision, scan_shape, reducer,
                             None if origins is None else origins[s : s + tile_size], draws,
                             None if neighbours is None else neighbours[s : s + tile_size], sigma_head, told,
                             pure=False)
               for s in starts]
    first = {f.key: s for s, f in zip(starts, futures)}
    empty: list[int] = []
    from distributed import as_completed
    from tqdm.auto import tqdm

    try:
        with tqdm(total=n, desc="predicting", unit="pattern", leave=False,
                  disable=None if progress is None else not progress) as bar:
            for future in as_completed(futures):
                start = first[future.key]
                *parts, found = _tile_result(future, start, tile_size, n)
                empty += found["empty"]
                for k, (acc, part) in enumerate(zip(accumulators, parts)):
                    if sigma_head and k == draws and reducer is None:  # σ patches: the σ stitcher reduces them
                        part = acc.reduce(part, start, remove_mean=False)
                    acc.add_reductions(part, start)
                bar.update(min(start + tile_size, n) - start)
                future.release()  # the tile's result is summed in: free it on the worker
    finally:
        client.cancel([f for f in futures if not f.done()])
    t1 = time.perf_counter()
    empty.sort()
    if empty and more_empty_than_chance(len(empty), n, dose_info["electrons_per_pattern"]):  # (as the pipeline)
        from ..wording import note_to_caller

        note_to_caller(empty_patterns_note(empty, n))

    full, slopes, phase, origin, spread, uncertainty = finish(accumulators, positions, mask, model, stitching,
                                                              remove_plane, sigma_scale=sigma_scale,
                                                              deblur=dose_info["deblurred"],
                                                              dose=dose_info["electrons_per_pattern"],
                                                              sigma_head=sigma_head)
    t2 = time.perf_counter()
    n_workers = len(client.nthreads())
    timings = {"predict_s": round(t1 - t0, 3), "stitch_s": round(t2 - t1, 3),
               "patterns_per_second": round(n / max(t1 - t0, 1e-9), 1),
               **({"predictions_per_second": round(n * draws / max(t1 - t0, 1e-9), 1)} if draws > 1 else {})}
    return Reconstruction(phase.astype(np.float32), origin, full.astype(np.float32), timings,
                          model.record(),
                          {"stitching": stitching, "plane_removed": remove_plane,
                           **dose_info,
                           "removed_slope_rad_per_px": list(slopes), "precision": precision,
                           "device": f"{device} (on each worker)",
                           "uncertainty": uncertainty,
                           **({"empty_patterns": {"count": len(empty), "first": empty[:100]}} if empty else {}),
                           "distributed": {"workers": n_workers, "tiles": len(futures), "tile_size": tile_size,
                                           "returned": "reductions" if reducer is not None else "patches"}},
                          spread)
