"""From a 4D-STEM file to a phase image: everything ``deepphase reconstruct`` does, as one function.

:func:`reconstruct_file` opens the file lazily, takes the scan positions from the caller or the file,
calibrates detector patterns onto the model's grid, checks the scan rotation (or finds it) and the data's
probe against the model's, reconstructs (in this process, resumably, or on a dask cluster, or on
LiberTEM's executor) and, given an output folder, writes the image with its metadata and figures.
:func:`~deepphase.reconstruction.pipeline.reconstruct` is the step in the middle, for arrays already on the
model's grid.

What the user should read (a rotation that the data contradict, a probe that differs, repaired pixels) goes
to ``log`` as it is found, and into the result's ``notes`` and the metadata.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DeepPhaseError, DeepPhaseNote, InputFileError, OutputExistsError, PatternValueError, \
    ValueRangeError
from ..wording import in_callers_terms, in_callers_words, note_to_caller
from .checks import PATTERN_SAMPLE, bad_pixel_note, check_probe, check_rotation, detector_axes_first_note, \
    check_uncalibrated, energy_note, fine_step_note, off_disk_calibration, raster_of, saturation_note, sense

logger = logging.getLogger("deepphase")

# Where an interrupted reconstruction keeps its progress, inside the output folder.
PARTIAL_FOLDER = ".deepphase-partial"
INPUT_KINDS = ("counts", "amplitude")
#: Patterns per task on a cluster, unless ``tile_size`` says otherwise.
TILE_SIZE = 4096


@in_callers_words()
def reconstruct_file(
    data: str | Path,
    out: str | Path | None = None,
    *,
    model=None,
    dataset: str | None = None,
    positions=None,
    scan_shape=None,
    step_px: float | None = None,
    rotation_deg: float | str = 0.0,
    fastest: str | None = None,
    kind: str | None = None,
    calibration: str = "auto",
    gain: float | None = None,
    energy: float | None = None,
    semi_angle: float | None = None,
    mrad_per_px: float | None = None,
    model_mrad_per_px: float | None = None,
    probe_check: bool = True,
    flip_patterns: bool = False,
    stitching: str = "pairwise",
    source_size_px: float = 0.0,
    deblur: bool | str = "auto",
    sampling: float | None = None,
    batch_size: int = 512,
    precision: str = "auto",
    uncertainty: int | str | None = None,
    engine: str = "auto",
    ensemble=(),
    sigma_scale: float | None = None,
    device: str = "auto",
    chunk_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    tile_size: int | None = None,
    libertem: bool = False,
    progress: bool | None = None,
    log: Callable[[str, bool], None] | None = None,
    command: str | None = None,
):
    """Reconstruct the phase image of a 4D-STEM file, as ``deepphase reconstruct DATA --out OUT`` does.

    Parameters
    ----------
    data : the file: .npy (N, k, k) or (R, C, k, k), .npz from ``deepphase simulate``, HDF5/EMD 1.0, zarr, and
        with the ``files`` extra Merlin .mib, EMPAD .xml, Gatan .dm4/.dm3, .blo (:func:`~deepphase.data.io.load_scan`).
    out : a folder for phase.npy/.tif/.emd/.png, metadata.json and the figures; None writes nothing (and
        allows no ``resume``).
    model : a packaged model's name, a model folder or a :class:`~deepphase.models.modelfile.PhaseModel`
        (default: the packaged default).
    dataset : the dataset (or EMD group) inside an HDF5 or zarr file.
    positions : (N, 2) positions in real-space pixels, or a .npy file of them; else a raster from
        ``scan_shape`` (or the file's) and ``step_px`` (or the file's scan step, once calibrated), or the
        file's own positions.
    scan_shape : (rows, cols) of the raster, for (N, k, k) data that do not record it (a detector file or an
        (R, C, k, k) array records its own; one given that differs is refused).
    step_px : the raster's step in real-space pixels of the model's grid, or ``"auto"``: the step the
        weak-phase transfer with the model's probe fits best on the central positions
        (:func:`~deepphase.data.aberrations.measure_scan_step`, ~2 s; median 0.5 %, at most 3.8 % off on simulated
        rasters of 0.5–1.3 px, 3.6 % on multislice ones, RESULTS §40–41; up to ~1.4 px on a 32-pixel grid with the
        reference probe, beyond which the scan folds the frequencies the fit uses: give the step). A given step is
        checked on every raster with ``probe_check`` (~0.6 s).
    rotation_deg : the raster's rotation (degrees counter-clockwise), checked against the data's DPC curl;
        or ``"auto"``: found from the data, with the detector's handedness unless ``flip_patterns``.
    fastest : the scan axis that varies fastest between frames (default "row" for (N, k, k) data, "col"
        for (R, C, k, k) arrays).
    kind : "counts" or "amplitude" (default: read from the file, or inferred from the patterns).
    calibration : "auto" (calibrate patterns that are not the model's n×n grid), "on" or "off".
    gain, energy, semi_angle, mrad_per_px, model_mrad_per_px : for the calibration
        (:func:`~deepphase.data.calibration.calibrate`): detector units per electron, beam energy in keV
        (default: the file's), the data's convergence semi-angle in mrad, a detector and a model pixel's
        angular size in mrad.
    probe_check : measure the data's probe against the model's on the central positions of a raster.
    flip_patterns : mirror every pattern in k_row before the network (a detector whose rows run the other
        way against the scan).
    source_size_px : the source's standard deviation in real-space pixels, divided out of the image
        (:func:`~deepphase.reconstruction.pipeline.with_source_divided_out`).
    sampling : the real-space pixel size in Å (default: the calibration's, if it measures one, or the one a
        ``deepphase simulate`` file records; a given one differing from those by more than 5 % is noted).
    uncertainty : a number (≥ 2) of Monte Carlo dropout samples, or "head" (the model's σ head); None: none.
    ensemble : further models for the same probe (names, folders or loaded models): the image is their mean.
    resume : continue an interrupted run from its progress in ``out``.
    overwrite : replace an earlier result in ``out`` (the earlier run's figures this one does not remake
        are removed with it).
    workers, scheduler, tile_size : predict on a dask cluster: ``workers`` local processes or the one at
        ``scheduler``, ``tile_size`` patterns per task (default 4096; :mod:`deepphase.reconstruction.distributed`).
    libertem : open the file with LiberTEM and reconstruct on its executor
        (:func:`deepphase.reconstruction.libertem_udf.reconstruct_file`; ``workers`` are its processes).
    stitching, deblur, batch_size, precision, engine, sigma_scale, device, chunk_size, progress : as for
        :func:`~deepphase.reconstruction.pipeline.reconstruct`.
    log : called with ``(message, is_note)`` as the work proceeds; default: notes as :class:`DeepPhaseNote`
        warnings, other messages to the ``deepphase`` logger.
    command : the command line to record in the metadata (default: this call). Called from Python, errors and notes
        name these keywords, not the command's options (:mod:`deepphase.wording`).

    Returns
    -------
    Reconstruction
        With ``metadata`` (what metadata.json holds beside the reconstruction's own record: the scan, the
        calibration, the checks) and ``notes``.
    """
    if command is None:
        command = _call_record(dict(locals()))
    log = log or _warn_or_log
    if not isinstance(data, (str, Path)):
        raise ValueRangeError(f"data: expected the path of a 4D-STEM file, got {type(data).__name__}; for arrays in "
                              "memory use deepphase.reconstruct(amplitudes, positions)")
    if scan_shape is not None and not (np.ndim(scan_shape) == 1 and len(scan_shape) == 2 and all(
            isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k > 0 for k in scan_shape)):
        raise ValueRangeError(f"scan_shape: expected (rows, cols), two positive whole numbers, got {scan_shape!r}")
    if scan_shape is not None:
        scan_shape = (int(scan_shape[0]), int(scan_shape[1]))  # (an array's truth value is ambiguous further on)
    if isinstance(ensemble, (str, Path)) or hasattr(ensemble, "network"):
        ensemble = (ensemble,)  # one further model, named alone
    _check_arguments(kind=kind, calibration=calibration, gain=gain, source_size_px=source_size_px,
                     uncertainty=uncertainty, positions=positions, step_px=step_px, rotation_deg=rotation_deg,
                     fastest=fastest, ensemble=ensemble, workers=workers, scheduler=scheduler, resume=resume, out=out,
                     libertem=libertem, stitching=stitching, device=device, dataset=dataset, engine=engine,
                     chunk_size=chunk_size, tile_size=tile_size, sigma_scale=sigma_scale)
    tile_size = TILE_SIZE if tile_size is None else tile_size
    out = Path(out) if out is not None else None
    with contextlib.ExitStack() as held:
        if out is not None:
            from ..io_utils import check_writable, folder_lock, unfinished_mark
            from .pipeline import FIGURES, OUTPUT_FILES

            check_writable(out)
            held.enter_context(folder_lock(out))
            _remove_leftovers(out)
            overwrite = _claim_output_folder(out, overwrite, resume)
            held.enter_context(unfinished_mark(out, (*OUTPUT_FILES, *FIGURES, PARTIAL_FOLDER)))
        if libertem:
            return _reconstruct_with_libertem(
                data, out, model=model, positions=positions, scan_shape=scan_shape, step_px=step_px,
                rotation_deg=rotation_deg, fastest=fastest, kind=kind, calibration=calibration,
                calibration_options={k: v for k, v in (
                    ("gain", gain), ("mrad_per_px", mrad_per_px), ("model_mrad_per_px", model_mrad_per_px),
                    ("semi_angle", semi_angle), ("energy", energy)) if v is not None},
                probe_check=probe_check, flip_patterns=flip_patterns, source_size_px=source_size_px, deblur=deblur,
                sampling=sampling, batch_size=batch_size, precision=precision, uncertainty=uncertainty, engine=engine,
                workers=workers, overwrite=overwrite, progress=progress, log=log, command=command)
        from ..data.io import load_scan, scan_shape_to_read

        with load_scan(data, dataset, scan_shape_to_read(data, scan_shape)) as scan, _calibration_repairs(calibration):
            return _reconstruct_scan(
                scan, data, out, model=model, dataset=dataset, positions=positions, scan_shape=scan_shape,
                step_px=step_px, rotation_deg=rotation_deg, fastest=fastest, kind=kind, calibration=calibration,
                gain=gain, energy=energy, semi_angle=semi_angle, mrad_per_px=mrad_per_px,
                model_mrad_per_px=model_mrad_per_px, probe_check=probe_check, flip_patterns=flip_patterns,
                stitching=stitching, source_size_px=source_size_px, deblur=deblur, sampling=sampling,
                batch_size=batch_size, precision=precision, uncertainty=uncertainty, engine=engine, ensemble=ensemble,
                sigma_scale=sigma_scale, device=device, chunk_size=chunk_size, resume=resume, overwrite=overwrite,
                workers=workers, scheduler=scheduler, tile_size=tile_size, progress=progress, log=log,
                command=command)


@contextlib.contextmanager
def _calibration_repairs(calibration: str):
    """A frame refused for NaN, Inf or negative values, where the calibration did not read it, is told that it
    repairs them (patterns on the model's grid are read as they are; a dark-subtracted scan has negative counts)."""
    try:
        yield
    except PatternValueError as exc:
        if calibration == "on":
            raise
        raise PatternValueError(f"{exc}; --calibrate repairs them (NaN and Inf replaced by the local median, "
                                "negative values clipped to 0) and masks hot pixels") from exc


def _call_record(arguments: dict) -> str:
    """This call as the metadata records it: the file, the folder and the options not left at their defaults
    (arrays and models by what they are, not their contents)."""
    import inspect

    def short(value) -> str:
        if isinstance(value, np.ndarray):
            return f"<array {'×'.join(map(str, value.shape))}>"
        if hasattr(value, "network"):
            return f"<model {value.name!r}>"
        return repr(str(value) if isinstance(value, Path) else value)

    defaults = inspect.signature(reconstruct_file).parameters
    given = [f"{name}={short(value)}" for name, value in arguments.items()
             if name not in ("data", "out", "log", "command") and not (
                 isinstance(value, type(defaults[name].default)) and not isinstance(value, np.ndarray)
                 and value == defaults[name].default)]
    files = [short(arguments["data"])] + ([short(arguments["out"])] if arguments["out"] is not None else [])
    return f"deepphase.reconstruct_file({', '.join(files + given)})"


def model_reference(model, for_workers: bool = False):
    """What names ``model`` in the metadata, and for workers that load it themselves (``for_workers``): a name
    or folder as given; for a loaded model, its folder."""
    from ..models.modelfile import PhaseModel

    if not isinstance(model, PhaseModel):
        return model
    if model.folder is None:
        if for_workers:
            raise DeepPhaseError("model: workers load the model themselves, and this one was made in memory; save "
                                 "it (deepphase.models.modelfile.save_model) and pass its folder")
        return f"{model.name} (in memory)"
    return str(model.folder)


@contextlib.contextmanager
def _notes_to(note):
    """The notes :func:`~deepphase.reconstruction.pipeline.reconstruct` warns of, as this function's own notes
    (to ``log`` and the result's ``notes``); other warnings as they would be shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeepPhaseNote)
        yield
    from .pipeline import COUNTS_NOTE, GAIN_NOTE_START

    for warning in caught:
        if issubclass(warning.category, DeepPhaseNote):
            said = str(warning.message)
            if said != COUNTS_NOTE and not said.startswith(GAIN_NOTE_START):
                note(said)  # (those two are said in a file's terms by _note_dose)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _noting(notes: list, log):
    """``note(text, is_note=True)``: a note kept in ``notes`` and passed to ``log``, in the caller's words
    (:func:`~deepphase.wording.in_callers_terms`); other messages only passed."""
    def note(text: str, is_note: bool = True) -> None:
        text = in_callers_terms(text)
        if is_note:
            notes.append(text)
        log(text, is_note)
    return note


def _warn_or_log(message: str, note: bool) -> None:
    if note:
        note_to_caller(message)
    else:
        logger.info(message)


def _check_arguments(*, engine, chunk_size, kind, calibration, gain, source_size_px, uncertainty, positions, step_px,
                     rotation_deg, fastest, ensemble, workers, scheduler, resume, out, libertem, stitching, device,
                     dataset, tile_size=None, sigma_scale=None) -> None:
    """What can be refused before the file is opened (the CLI's argument types refuse most of it earlier)."""
    from .pipeline import uncertainty_method

    for name, value in (("gain", gain), ("source_size_px", source_size_px)):
        if value is not None and not _is_number(value):
            raise ValueRangeError(f"{name}: expected a number, got {value!r}")
    if kind is not None and kind not in INPUT_KINDS:
        raise ValueRangeError(f"input: expected 'counts', 'amplitude' or None (read or inferred), got {kind!r}")
    if calibration not in ("auto", "on", "off"):
        raise ValueRangeError(f"calibration: expected 'auto', 'on' or 'off', got {calibration!r}")
    if gain is not None and not (np.isfinite(gain) and gain > 0):
        raise ValueRangeError(f"gain: expected a positive number of detector units per electron, got {gain}")
    if gain is not None and gain != 1.0 and calibration == "off":  # (it was dropped without a word)
        raise DeepPhaseError(f"gain: {gain:g} detector units per electron are taken off by the calibration, and "
                             "--no-calibration reads the patterns as they are: drop one of them")
    if source_size_px is None or not (np.isfinite(source_size_px) and source_size_px >= 0):  # (before the work)
        raise ValueRangeError(f"source-size: expected the source's standard deviation ≥ 0 in real-space pixels "
                              f"(0: none), got {source_size_px}")
    uncertainty_method(uncertainty)
    if step_px is not None and step_px != "auto" and not (_is_number(step_px) and np.isfinite(step_px) and step_px > 0):
        raise ValueRangeError(f"step: expected a positive raster step in real-space pixels or 'auto', got {step_px!r}")
    if step_px == "auto" and positions is not None:
        raise DeepPhaseError("step: 'auto' finds a raster's step; positions are given: drop --step auto")
    if rotation_deg != "auto" and not (_is_number(rotation_deg) and np.isfinite(rotation_deg)):
        raise ValueRangeError(f"rotation: expected an angle in degrees or 'auto', got {rotation_deg!r}")
    if fastest not in (None, "row", "col"):
        raise ValueRangeError(f"fastest: expected 'row', 'col' or None, got {fastest!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):  # (0 became the default: the scale audit, s41)
        raise ValueRangeError(f"chunk-size: expected a positive whole number of patterns, got {chunk_size!r}")
    if libertem:
        refused = [name for name, given in (
            (f"--uncertainty {uncertainty}", uncertainty not in (None, "head")), ("--ensemble", bool(ensemble)),
            ("--resume", resume), ("--scheduler", scheduler is not None), ("--dataset", dataset is not None),
            (f"--stitching {stitching}", stitching != "pairwise"), (f"--device {device}", device != "auto"),
            ("--chunk-size", chunk_size is not None), ("--tile-size", tile_size is not None)) if given]
        if refused:  # (--chunk-size was accepted and did nothing: the scale audit, s41)
            raise DeepPhaseError(f"libertem: {', '.join(refused)} not available with --libertem (LiberTEM's workers "
                                 "read the file a partition at a time, run the pairwise stitcher's reductions and "
                                 "choose the device); drop --libertem for them")
    # (--workers with --libertem sizes LiberTEM's own executor: no dask cluster of deepphase's)
    on_cluster = (workers is not None or scheduler is not None) and not libertem
    if ensemble and on_cluster:
        raise DeepPhaseError("ensemble: not available on a cluster (--workers/--scheduler) yet; run in one process")
    if resume and on_cluster:
        raise DeepPhaseError("resume: a cluster reconstruction (--workers/--scheduler) cannot be resumed; run it again")
    eager_only = [name for name, said in ((f"--engine {engine}", engine not in ("auto", "eager")),
                                          ("--chunk-size", chunk_size is not None)) if said]
    if on_cluster and eager_only:
        raise DeepPhaseError(f"{eager_only[0].split()[0][2:]}: {' and '.join(eager_only)} "
                             "would do nothing on a cluster (--workers/--scheduler), whose workers run the network "
                             "eagerly a tile at a time (--tile-size): drop them, or drop --workers to run in one "
                             "process with them")
    if resume and out is None:
        raise ValueRangeError("resume: needs the output folder of the interrupted run")
    # (options that would do nothing are refused, as the others are: they were accepted and dropped, the docs audit)
    if tile_size is not None and not on_cluster:
        raise DeepPhaseError("tile-size: the patterns per task of a cluster (--workers/--scheduler); in one process "
                             "drop it (--chunk-size sets how many patterns are read at once)")
    if sigma_scale is not None and not uncertainty and not ensemble:
        raise DeepPhaseError("sigma-scale: a factor on the uncertainty, and none is asked for: add --uncertainty "
                             "head (or N, or --ensemble), or drop it")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _remove_leftovers(out: Path) -> None:
    """What a run killed outright (``kill -9``, a batch system's hard limit) left in ``out``, where it could not clean
    up: its staging folders and temporary files (the caller holds the folder's lock: no other run's)."""
    from ..io_utils import LOCK_FILE, remove_leftover_temporaries
    from .pipeline import FIGURES, OUTPUT_FILES

    for staging in out.glob(".deepphase-*"):
        if staging.name not in (PARTIAL_FOLDER, LOCK_FILE) and staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
    remove_leftover_temporaries(out, (*OUTPUT_FILES, *FIGURES), locked=True)
    if (out / PARTIAL_FOLDER).is_dir():
        remove_leftover_temporaries(out / PARTIAL_FOLDER, ("progress.json", "state.npz"), locked=True)


def _claim_output_folder(out: Path, overwrite: bool, resume: bool) -> bool:
    """Refuse earlier results and interrupted progress in ``out`` unless asked (``overwrite``, ``resume``);
    with ``overwrite``, damaged or unwanted progress is removed. Returns whether this run may replace what ``out``
    holds: asked to, resuming a run that was (only a run allowed to write into ``out`` leaves progress there, and one
    interrupted after its prediction has written some of its figures or image already), or after a run interrupted
    without progress to resume (its ``UNFINISHED_MARK`` is there: a --libertem run's calibration.png)."""
    from ..io_utils import UNFINISHED_MARK
    from .pipeline import FIGURES, OUTPUT_FILES, check_output_folder, earlier_outputs, read_checkpoint

    partial = out / PARTIAL_FOLDER
    interrupted = (out / UNFINISHED_MARK).exists() or partial.is_dir()
    try:
        record = read_checkpoint(partial)
    except DeepPhaseError:
        if not overwrite or not partial.is_dir():
            raise
        shutil.rmtree(partial)  # damaged progress, and a fresh start asked for
        record = None
    if resume and record is None:
        raise DeepPhaseError(f"resume: {str(out)!r} holds no interrupted reconstruction to continue")
    if interrupted and (resume or overwrite or record is None):
        # Output files an interrupted run wrote (those no complete run's metadata.json names: a file of another's
        # under those names was refused before it began) go now, so that only files no run made stay unclaimed.
        kept = earlier_outputs(out)
        for name in (*OUTPUT_FILES, *FIGURES):
            if name not in kept and (out / name).is_file():
                os.remove(out / name)
    if resume:
        return True
    if record is not None:  # (said before the files the interrupted run wrote, which --resume replaces)
        if not overwrite:
            done = (f"all {record['total']:,} patterns predicted, the image not yet written"
                    if record["done"] >= record["total"] else
                    f"{record['done']:,} of {record['total']:,} patterns done")
            raise DeepPhaseError(f"out: {str(out)!r} holds an interrupted reconstruction ({done}); pass --resume to "
                                 "continue it or --overwrite to start again")
        shutil.rmtree(partial)
    # (an interrupted run's files: it was allowed to write them, and their metadata.json never came)
    overwrite = overwrite or (out / UNFINISHED_MARK).exists()  # (io_utils.unfinished_mark)
    check_output_folder(out, overwrite)
    figures = [name for name in FIGURES if (out / name).exists()]  # (before the work, not after it)
    if figures and not overwrite:
        raise OutputExistsError(f"out: {str(out)!r} already holds {', '.join(figures)}; choose another folder or pass "
                                "--overwrite")
    return overwrite


def _data_record(data) -> dict:
    """The data as given and the file it named: where (absolute), its size and when it was last written, which
    tell a later reader whether the file beside the image is still the one it was made from."""
    import datetime

    record = {"data": str(data)}
    try:
        stat = Path(data).stat()
    except (OSError, TypeError, ValueError):
        return record
    when = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    return {**record, "data_file": {"path": str(Path(data).resolve()), "bytes": stat.st_size, "modified": when}}


#: A pixel size given beside one the data measure or record is noted when they differ by more than this share.
PIXEL_SIZE_TOLERANCE = 0.05


def _reconstruct_scan(scan, data, out: Path | None, *, model, dataset, positions, scan_shape, step_px,
                      rotation_deg, fastest, kind, calibration, gain, energy, semi_angle, mrad_per_px,
                      model_mrad_per_px, probe_check, flip_patterns, stitching, source_size_px, deblur, sampling,
                      batch_size, precision, uncertainty, engine, ensemble, sigma_scale, device, chunk_size, resume,
                      overwrite, workers, scheduler, tile_size, progress, log, command):
    """:func:`reconstruct_file` for a file opened by :func:`~deepphase.data.io.load_scan`."""
    from ..data.io import AmplitudeView, check_dtype, count_quantum, kind_of_sample, looks_like_amplitudes, sample_patterns
    from ..models.modelfile import PhaseModel, check_compatible, load_model
    from ..physics.scan import check_spacing, raster_positions
    from .pipeline import CHUNK_SIZE, GAIN_NOTE_START, reconstruct, uncertainty_method, with_source_divided_out

    t_start = time.perf_counter()
    read_from = _file_state(data)
    notes = []
    note = _noting(notes, log)

    n_frames = scan.frames.shape[0]
    truncated = scan.info.get("truncated")
    if truncated:
        if scan.scan_shape is not None:
            scan_shape = list(scan.scan_shape)
        note(f"{data} is truncated: {truncated.get('frames_in_file')} frames in the file; "
             + (f"kept the {scan.scan_shape[0]} complete scan rows" if scan.scan_shape else "kept them all"))
    model_given, model_name = model, model_reference(model)
    model = model if isinstance(model, PhaseModel) else load_model(model)
    n = model.geometry.n_px
    pattern = tuple(scan.frames.shape[1:])
    in_units = gain is not None and gain != 1.0  # (the calibration is what turns detector units into electrons)
    calibrating = calibration == "on" or (calibration == "auto" and min(pattern) >= n
                                          and (pattern != (n, n) or in_units))
    if calibrating and calibration == "auto" and pattern == (n, n):
        note(f"--gain {gain:g}: the patterns are on the model's {n}×{n} grid already, and are calibrated all the same "
             "(as with --calibrate), which turns detector units into electrons")
    if not calibrating:  # (with the pixel size a simulation's file records, unless one is given: checked later)
        check_compatible(model, pattern, None if sampling else scan.info.get("pixel_size_angstrom"))
    if text := energy_note(energy if energy is not None else scan.info.get("energy_kev"), model):
        note(text)
    if scan.scan_shape is not None and scan_shape is not None and tuple(scan_shape) != tuple(scan.scan_shape):
        raise DeepPhaseError(f"scan-shape: {scan_shape[0]}×{scan_shape[1]} given, but {data} holds "
                             f"a {scan.scan_shape[0]}×{scan.scan_shape[1]} scan; drop --scan-shape (the data's own "
                             "shape is used) or reshape the data")
    default_fastest = "col" if scan.scan_shape is not None else "row"
    step_auto = step_px == "auto"  # found from the patterns, once they are amplitudes on the model's grid
    if step_auto:
        if scan.positions is not None and scan_shape is None:
            raise DeepPhaseError(f"step: 'auto' finds a raster's step, and {data} holds the scan's positions, which "
                                 "are used as they are: drop --step auto")
        if scan_shape is None and scan.scan_shape is None:
            raise DeepPhaseError(f"step: 'auto' needs the raster's shape: {data} does not hold it, give "
                                 "--scan-shape ROWS COLS")
        step_px = None
    raster_asked = dict(positions=positions, scan_shape=scan_shape, step_px=step_px, rotation_deg=rotation_deg,
                        fastest=fastest)
    positions, scan_info = scan_positions(**raster_asked, n_frames=n_frames, file_scan_shape=scan.scan_shape,
                                          default_fastest=default_fastest)
    if positions is None and scan.positions is not None:
        if (step_px is not None or rotation_deg not in (0.0, "auto") or fastest is not None
                or (scan_shape is not None and scan.scan_shape is None)):
            raise DeepPhaseError(f"positions: {data} holds the scan's positions; --scan-shape, --step, --rotation DEG and "
                                 "--fastest would be ignored: drop them, or give --scan-shape and --step to use a "
                                 "raster instead")
        positions, scan_info = scan.positions, {"positions": "from the data file"}
    check_dtype(scan.frames)
    sample = sample_patterns(scan.frames, PATTERN_SAMPLE)  # (read once for the checks of the patterns themselves)
    if text := detector_axes_first_note(sample[1]):
        note(text)
    if text := saturation_note(sample[1], kind or scan.kind or (
            "amplitude" if looks_like_amplitudes(sample[1]) else "counts")):
        note(text)
    kind_doubt = None  # patterns read as the other kind: the rotation and probe checks then measure the wrong thing
    if kind == "counts" and looks_like_amplitudes(sample[1]):
        kind_doubt = AMPLITUDES_READ_AS_COUNTS
    elif kind == "amplitude" and (step := count_quantum(sample[1])):
        kind_doubt = COUNTS_READ_AS_AMPLITUDES if step == 1.0 else (
            f"{GAIN_NOTE_START} {step:.4g}, as counts in a detector's units are, yet --input "
            f"amplitude reads them as amplitudes (√counts); check it (--input counts --gain {step:.4g}?)")
    if not calibrating and not kind_doubt:  # (patterns read as the other kind show another disk)
        try:
            read_as = kind or scan.kind or kind_of_sample(*sample)
        except DeepPhaseError:
            read_as = None  # (neither kind: the reconstruction says so)
        moved, text = (off_disk_calibration(sample[1], read_as, model.probe, calibration, bool(flip_patterns))
                       if read_as else (False, None))
        if moved:  # model-grid patterns whose disk is off the model's
            calibrating, kind = True, read_as
        if text:
            note(text)
    if not calibrating:
        check_uncalibrated(n, mrad_per_px=mrad_per_px, model_mrad_per_px=model_mrad_per_px)
    view, calibrated = None, None
    shape = scan_shape or scan.scan_shape
    step_from_file = (calibrating and shape is not None and step_px is None
                      and isinstance(scan.info.get("scan_step_angstrom"), float))
    if positions is None and not step_from_file and not step_auto:
        if scan_shape is not None:
            raise DeepPhaseError("step: --scan-shape needs the raster's step as well (--step S, in real-space "
                                 "pixels of the model's grid)")
        raise DeepPhaseError(
            "positions: the data holds none; give --positions POS.npy or --scan-shape ROWS COLS --step S"
            + (" (the scan shape is known from the data: --step S is enough)" if scan.scan_shape else ""))
    kind = scan.kind if kind is None else kind
    coords = None
    if calibrating:
        from ..data.calibration import calibrate, dark_level_note, disk_edge_note

        if kind is None:  # detector patterns are intensities, unless they are plainly square roots of counts
            kind = "amplitude" if looks_like_amplitudes(sample[1]) else "counts"
        coords = positions if positions is not None else (
            raster_positions(tuple(shape), 1.0, 0.0 if rotation_deg == "auto" else rotation_deg,
                             fastest or default_fastest)
            if shape is not None and shape[0] * shape[1] == n_frames else None)
        view, calibrated = calibrate(
            scan.frames, model, coords, kind=kind, gain=gain or 1.0, mrad_per_px=mrad_per_px,
            model_mrad_per_px=model_mrad_per_px, semi_angle=semi_angle,
            energy=energy if energy is not None else scan.info.get("energy_kev"),
            detector_sampling=scan.info.get("detector_sampling"))
        for text in (dark_level_note(calibrated), disk_edge_note(calibrated)):
            if text:
                note(text)
        pixel = calibrated.get("real_space_sampling_angstrom")
        if positions is None and step_px is None and shape is not None and pixel and \
                isinstance(scan.info.get("scan_step_angstrom"), float):
            step_px = scan.info["scan_step_angstrom"] / pixel
            positions, scan_info = scan_positions(**{**raster_asked, "step_px": step_px}, n_frames=n_frames,
                                                  file_scan_shape=scan.scan_shape, default_fastest=default_fastest)
            scan_info["step_from"] = (f"the file's scan step {scan.info['scan_step_angstrom']:.4g} Å / the "
                                      f"calibrated pixel size {pixel:.4g} Å")
    if positions is None and not step_auto:
        # What is missing for the pixel size (λ / (n · mrad per pixel)), in the user's terms: the file may hold the
        # detector's sampling, and asking for it again misled (the formats audit, s41)
        known_energy = energy if energy is not None else scan.info.get("energy_kev")
        sampled = scan.info.get("detector_sampling") or mrad_per_px or semi_angle
        missing = ("--energy KEV (the detector's sampling is known)" if sampled and known_energy is None else
                   "--semi-angle MRAD or --mrad-per-px X" if known_energy is not None else
                   "--energy KEV with --semi-angle MRAD or --mrad-per-px X")
        raise DeepPhaseError(
            f"step: the file's scan step ({scan.info['scan_step_angstrom']:.4g} Å) cannot be turned into pixels "
            f"without the real-space pixel size; give --step S, or {missing}")
    if positions is not None:
        check_spacing(positions, model.geometry)  # before the rotation and probe checks read the patterns
    if kind_doubt:
        note(kind_doubt)
    if view is not None and coords is not None and positions is not None and coords is not positions:
        view.use_coords(positions)  # the descan plane, fitted in scan indices, in position units
    if kind is None:
        kind = kind_of_sample(*sample)
    amplitudes = view if view is not None else AmplitudeView(scan.frames, kind)
    if view is None and (text := bad_pixel_note(sample[1], kind)):  # (a calibration masks them)
        note(text)
    if flip_patterns:
        view, amplitudes = _flipped(view, amplitudes)
    rotation_figure = None  # what the DPC criterion saw, drawn once the image is written
    t_checks = time.perf_counter()
    if step_auto:
        scan_info = {"scan_shape": list(shape), "step_px": None, "fastest": fastest or default_fastest,
                     "rotation_deg": 0.0 if rotation_deg == "auto" else float(rotation_deg)}
        if rotation_deg != "auto":  # (with "auto", the step is found at the rotation found)
            positions, scan_info = _find_step(amplitudes, view, scan_info, model, note)
    if rotation_deg == "auto":
        positions, scan_info, rotation_figure = _find_rotation(amplitudes, view, scan_info, positions, model,
                                                               flip_patterns, note)
        if scan_info["rotation_found"]["flip_patterns"]:
            view, amplitudes = _flipped(view, amplitudes)
        flip_patterns = flip_patterns or scan_info["rotation_found"]["flip_patterns"]
    elif (raster := raster_of(scan_info, positions)) is not None:
        scan_info, rotation_figure = check_rotation(amplitudes, scan_info, raster, model)
        if kind_doubt:
            scan_info, rotation_figure = _held_back(scan_info, "rotation_check"), None
        if scan_info.get("rotation_check", {}).get("note"):
            note(scan_info["rotation_check"]["note"])
            if "step_found" in scan_info:
                note(_step_against_rotation(scan_info["step_px"]))
    scan_info["patterns_flipped"] = flip_patterns
    raster = raster_of(scan_info, positions)  # (with the rotation found, after rotation "auto")
    if "scan_shape" not in scan_info and (text := fine_step_note(raster)):  # (positions given: in Å?)
        note(text)
    if probe_check and raster is not None:
        scan_info = check_probe(amplitudes, model, view, scan_info, raster, semi_angle,
                                 energy or scan.info.get("energy_kev"))
        if kind_doubt:
            scan_info = _held_back(scan_info, "probe_check")
    if model.probe_aware:
        model, scan_info = _tell_probe(model, scan_info)
    t_checks = time.perf_counter() - t_checks
    # (the network is given only the pixel size the user gave, to check against the model's; the files get the
    # calibration's too)
    measured, whose = (calibrated or {}).get("real_space_sampling_angstrom"), "calibration's"
    if not measured:
        measured, whose = scan.info.get("pixel_size_angstrom"), "file's"
    beam = energy if energy is not None else scan.info.get("energy_kev")
    if not measured and calibrated is None and beam and (semi_angle or model_mrad_per_px):
        # Patterns on the model's grid, read as they are: the model grid's angular sampling is the one given, or the
        # semi-angle over the data's disk radius (the model's, if none is found), and the pixel size
        # λ / (n · sampling). Given --energy and --semi-angle, the outputs stayed in px (the figures audit, s41).
        from ..data.calibration import find_disk, model_disk
        from ..physics.probe import electron_wavelength

        radius = model_disk(model.probe)["radius"]
        try:  # the data's own disk (the model's differs by up to the 4 % a note waits for: the review, s41)
            counts = sample[1] ** 2 if (kind or scan.kind) == "amplitude" or looks_like_amplitudes(sample[1]) \
                else sample[1]
            radius = find_disk(counts.mean(axis=0))["radius"]
        except DeepPhaseError:
            pass
        per_px = model_mrad_per_px or semi_angle / radius
        measured = electron_wavelength(beam) / (model.geometry.n_px * per_px * 1e-3)
        whose = "energy and " + ("model grid's mrad per pixel" if model_mrad_per_px else "semi-angle")
    if sampling and measured and abs(sampling / measured - 1) > PIXEL_SIZE_TOLERANCE:
        note(f"the pixel size given ({sampling:.4g} Å) is not the {whose} ({measured:.4g} Å); the outputs are written "
             f"at the given one: check --pixel-size, or leave it out to use the {whose}")
    sampling_written = sampling or measured
    samples, head = uncertainty_method(uncertainty)
    partial = out / PARTIAL_FOLDER if out is not None else None
    if workers is not None or scheduler is not None:  # dask.distributed (see _reconstruct_on_cluster)
        with _notes_to(note):
            rec = _reconstruct_on_cluster(
                data, positions, model_reference(model_given, for_workers=True), kind, view, flip_patterns,
                workers=workers, scheduler=scheduler, tile_size=tile_size, dataset=dataset, scan_shape=scan_shape,
                stitching=stitching, batch_size=batch_size, device=device, sampling=sampling,
                uncertainty_samples=samples, sigma_head=head, precision=precision, sigma_scale=sigma_scale,
                deblur=deblur, progress=progress, told=model.info.get("told_coefficients_rad_per_px2"))
    else:
        if view is not None:
            view.reset_counters()  # (the rotation and probe checks read some frames already)
        try:
            with _notes_to(note):
                rec = reconstruct(amplitudes, positions, model, stitching=stitching, batch_size=batch_size,
                                  device=device, progress=progress, sampling=sampling, precision=precision,
                                  uncertainty=uncertainty, chunk_size=chunk_size or CHUNK_SIZE, checkpoint=partial,
                                  resume=resume,
                                  fingerprint=_data_fingerprint(data, dataset, kind, view, flip_patterns, batch_size),
                                  ensemble=[_tell_probe(m, scan_info)[0] if m.probe_aware else m
                                            for m in (m if isinstance(m, PhaseModel) else load_model(m)
                                                      for m in ensemble or ())],
                                  sigma_scale=sigma_scale, engine=engine, deblur=deblur, checks=False)
        except BaseException:  # an error, Ctrl-C or SIGTERM: keep the progress only if there is some
            from .pipeline import read_checkpoint

            if partial is not None and read_checkpoint(partial) is None:
                shutil.rmtree(partial, ignore_errors=True)
            raise
    read_to = _file_state(data)  # (once: a zarr store's state walks its chunk files)
    if read_to != read_from and partial is not None:
        shutil.rmtree(partial, ignore_errors=True)  # (progress on a file that is no longer there)
    _check_unchanged(data, read_from, read_to)
    rec = with_source_divided_out(rec, source_size_px)
    # The image's pixel size as written (given, else the calibration's or the file's): processing held only a given
    # one, null beside the file's 0.2 Å at the top of metadata.json (the outputs audit, s40).
    rec.processing = {**rec.processing, "pixel_size_angstrom": sampling_written,
                      "pixel_size_from": "given" if sampling else whose if measured else None}
    if source_size_px and (text := source_division_note(model)):
        note(text)
    _note_dose(rec, notes, note)
    if view is not None:
        repairs = {k: v for k, v in view.counters.items() if v and k != "most_negative_count"}
        if repairs:
            note("repaired: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in repairs.items()))
    metadata = {"command": command, **_data_record(data), "input": kind, "n_patterns": n_frames,
                "pattern_shape": list(pattern), "stitching": stitching, "model_path": str(model_name or "default (packaged)"), **scan_info,
                "data_info": scan.info, "calibration": view.report() if view is not None else None}
    if scan.truth is not None:
        metadata.update(_compared_with_truth(rec, scan, positions, n))
    written = set()
    if scan_info.get("probe_check", {}).get("step_note"):  # (before the figure that shows it: the figures audit)
        note(scan_info["probe_check"]["step_note"])
    if out is not None:
        written = _write_figures(out, view, rotation_figure, scan_info, model, model_name, note)
    elif scan_info.get("probe_check", {}).get("note"):
        note(probe_estimate_note(scan_info["probe_check"], model, model_name, None))
    if "usable frequencies" in scan_info.get("probe_check", {}).get("skipped", ""):
        note(f"the probe and step checks could not run: {scan_info['probe_check']['skipped']}")
    if scan_info.get("probe_aware", {}).get("note"):
        note(scan_info["probe_aware"]["note"])
    rec.metadata = {**metadata, "notes": notes}
    rec.notes = notes
    rec.timings = {**rec.timings, "checks_s": round(t_checks, 3), "total_s": round(time.perf_counter() - t_start, 3)}
    if out is not None:
        _write(rec, out, sampling_written, overwrite, written)
        shutil.rmtree(partial, ignore_errors=True)  # complete: the progress is no longer needed
    return rec


#: The notes on patterns read as the other kind than they look (--input given).
AMPLITUDES_READ_AS_COUNTS = ("the patterns look like amplitudes (not whole numbers, their squares are), yet --input "
                             "counts reads them as counts; check it (--input amplitude, or leave --input to find it)")
COUNTS_READ_AS_AMPLITUDES = ("the patterns are whole numbers, as counts are, yet --input amplitude reads them as "
                             "amplitudes (√counts); check it (--input counts, or leave --input to find it)")


def _held_back(scan_info: dict, check: str) -> dict:
    """``check``'s notes kept in the metadata, not said: measured on patterns read as the other kind, they are
    wrong (counts read as amplitudes: a scan "rotated 90°", or frames "in another order", RESULTS §45)."""
    found = scan_info.get(check) or {}
    held = {key: found[key] for key in ("note", "step_note") if found.get(key)}
    if not held:
        return scan_info
    return {**scan_info, check: {**found, **dict.fromkeys(held), "held_back": {
        **held, "why": "measured on patterns read as the other kind (counts or amplitudes) than they look"}}}


def _note_dose(rec, notes: list, note) -> None:
    """The pipeline's note on the dose, unless said already; its note on counts read as amplitudes (written for
    arrays) in a file's terms."""
    from .pipeline import COUNTS_NOTE, GAIN_NOTE_START

    said = rec.processing.get("dose_note")
    if said == COUNTS_NOTE:
        if COUNTS_READ_AS_AMPLITUDES not in notes:
            note(COUNTS_READ_AS_AMPLITUDES)
    elif (said or "").startswith(GAIN_NOTE_START):  # (in the file's terms: the --input note)
        if not any(text.startswith(GAIN_NOTE_START) for text in notes):
            note(said)
    elif said and said not in notes:
        note(said)


def _write(rec, out: Path, sampling, overwrite: bool, written: set) -> None:
    """The image and its metadata, naming the figures written (an earlier run's others are removed)."""
    from .pipeline import write_outputs

    rec.metadata = {**rec.metadata, "figures": sorted(written)}
    write_outputs(rec, out, rec.metadata, sampling=sampling, overwrite=overwrite)


def _write_figures(out: Path, view, rotation_figure, scan_info: dict, model, model_name, note) -> set:
    """calibration.png, rotation.png and the probe estimate, where there is something to show; returns their
    names."""
    written = set()
    out.mkdir(parents=True, exist_ok=True)
    if view is not None:
        from ..data.calibration import plot_calibration

        plot_calibration(view, out / "calibration.png")
        written.add("calibration.png")
    if scan_info.get("probe_check", {}).get("note"):
        note(probe_estimate_note(scan_info["probe_check"], model, model_name, out))
        written |= {"probe_estimate.npy", "probe_check.png"}
    if rotation_figure is not None:
        from ..data.calibration import plot_scan_rotation

        plot_scan_rotation(**rotation_figure, path=out / "rotation.png")
        note(f"what the DPC curl criterion saw: {out / 'rotation.png'}", False)
        written.add("rotation.png")
    return written | _write_step_figure(out, scan_info, note)


def _write_step_figure(out: Path, scan_info: dict, note) -> set:
    """step.png, where the step was searched for: found (step "auto") or, for a given step, noted as wrong."""
    check = scan_info.get("probe_check") or {}
    searched = scan_info.get("step_found") or (check.get("step_check") if check.get("step_note") else None)
    if not (searched and searched.get("search")):
        return set()
    from ..data.aberrations import plot_scan_step

    plot_scan_step(searched, out / "step.png")
    note(f"what the step search saw: {out / 'step.png'}", False)
    return {"step.png"}


def _compared_with_truth(rec, scan, positions, n: int) -> dict:
    """A simulation's truth against the image, in the image's frame: where the scan was reconstructed with other
    positions than it was simulated at (a rotation, step or frame order given wrong), the truth is taken through
    the same geometry first (:func:`~deepphase.physics.scan.object_in_scan_frame`), so the figure measures the
    image, not where it lies; ``truth_mapped`` then says how (a turn, a scale, a mirror, a shift) and how well an
    affine map explains the positions given (``residual_px``: beyond ``TRUTH_MAP_RESIDUAL_PX`` they are no
    affine copy of the simulation's, and neither figure means much)."""
    from ..physics.scan import object_in_scan_frame

    recorded = scan.positions if scan.positions is not None and len(scan.positions) == len(positions) else positions
    truth, mapping = object_in_scan_frame(scan.truth, recorded, positions, rec.origin_px, rec.phase.shape, n)
    if not np.isfinite(truth).any():
        return {}
    compared = {"correlation_with_truth": _pearson(rec.phase, truth)}
    matrix = np.asarray(mapping["matrix"])
    if np.allclose(matrix, np.eye(2), atol=1e-9) and np.allclose(mapping["offset_px"], 0.0, atol=1e-9):
        return compared
    mirrored = bool(np.linalg.det(matrix) < 0)
    proper = matrix @ np.diag([1.0, -1.0]) if mirrored else matrix  # (a mirror in the rows, then a turn)
    compared["truth_mapped"] = {
        "why": "the positions given differ from those the file's truth was simulated at; the truth was mapped "
               "onto the image by the least-squares affine map between them",
        "rotation_deg": float(np.degrees(np.arctan2(proper[1, 0], proper[0, 0]))), "mirrored": mirrored,
        "scale": float(np.sqrt(abs(np.linalg.det(matrix)))), "offset_px": mapping["offset_px"],
        "residual_px": mapping["residual_px"], "affine": mapping["residual_px"] <= TRUTH_MAP_RESIDUAL_PX,
        "correlation_unmapped": _pearson(rec.phase, object_in_scan_frame(
            scan.truth, positions, positions, rec.origin_px, rec.phase.shape, n)[0])}
    return compared


#: The positions given are taken for a turned, scaled, mirrored or shifted copy of the simulation's when the affine
#: map between them leaves at most this rms distance (pixels); frames in another order leave several pixels.
TRUTH_MAP_RESIDUAL_PX = 0.5


def _pearson(image: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation over the pixels finite in both (the evaluation layer's ``correlation``, which this
    layer may not import)."""
    finite = np.isfinite(image) & np.isfinite(truth)
    a, b = image[finite] - image[finite].mean(), truth[finite] - truth[finite].mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def scan_positions(positions=None, scan_shape=None, step_px=None, rotation_deg=0.0, fastest=None, *,
                   n_frames: int | None, file_scan_shape=None, default_fastest: str = "row"):
    """The scan positions asked for: given (an array or a .npy file), or a raster from ``scan_shape`` (or the
    file's) and ``step_px``; ``(None, {})`` when neither is known yet. Returns ``(positions, scan_info)``, the
    latter for the metadata (a raster's shape, step, rotation and fastest axis)."""
    from ..physics.scan import raster_positions, validate_positions

    if positions is not None:
        if scan_shape is not None or step_px is not None:
            raise DeepPhaseError("positions: give either --positions or --scan-shape/--step, not both")
        if rotation_deg not in (0.0, "auto") or fastest is not None:
            raise DeepPhaseError("positions: --rotation DEG and --fastest describe a raster, and --positions gives "
                                 "every position already; rotate the positions themselves (--rotation auto still "
                                 "checks them)")
        info = {"positions": "given"}
        if isinstance(positions, (str, Path)):
            positions, info = _read_positions(Path(positions)), {"positions_file": str(positions)}
        return validate_positions(positions, n_frames if n_frames is not None else len(positions)), info
    shape = scan_shape or file_scan_shape
    if shape is None or step_px is None:
        return None, {}
    shape = tuple(shape)
    if n_frames is not None and shape[0] * shape[1] != n_frames:
        raise DeepPhaseError(
            f"scan-shape: {shape[0]}×{shape[1]} = {shape[0] * shape[1]} positions do not match the {n_frames} patterns")
    fastest = fastest or default_fastest
    rotation = 0.0 if rotation_deg == "auto" else float(rotation_deg)  # 'auto': found later from the patterns
    return raster_positions(shape, step_px, rotation, fastest), {
        "scan_shape": list(shape), "step_px": step_px, "rotation_deg": rotation, "fastest": fastest}


def _read_positions(path: Path) -> np.ndarray:
    if not path.exists():
        raise DeepPhaseError(f"positions: file {str(path)!r} does not exist")
    if path.suffix.lower() != ".npy":
        raise DeepPhaseError(f"positions: expected an (N, 2) .npy file, got {str(path)!r} (a .npz from "
                             "deepphase simulate is the data file itself: its positions are read with it)")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        from ..data.io import npy_problem

        raise DeepPhaseError(f"positions: could not read {str(path)!r} as .npy ({npy_problem(path, exc)})") from exc


def _flipped(view, amplitudes):
    """Patterns mirrored in k_row: detector patterns as they are resampled, model-grid ones about k = 0."""
    from ..data.io import FlippedView

    if view is not None:
        view = view.flipped()
        return view, view
    return None, FlippedView(amplitudes)


def _find_rotation(amplitudes, view, scan_info: dict, positions, model, handedness_given: bool, say):
    """Rotation "auto": the scan rotation from the patterns (DPC curl criterion), then the positions; and the
    detector's handedness, unless ``handedness_given`` (``amplitudes`` are then flipped already)."""
    from ..data.calibration import centre_of_mass_block, check_scan_rotation, find_scan_rotation, with_sense
    from ..physics.scan import raster_positions

    raster = raster_of(scan_info, positions)
    if raster is None:
        raise DeepPhaseError("rotation: 'auto' needs a raster (--scan-shape and --step, a file that holds the scan "
                             "shape, or positions that form one), not positions off a regular grid")
    scan_info = {**scan_info, **raster}  # (a raster read from positions: they are made again at the angle found)
    shape, fastest = tuple(scan_info["scan_shape"]), scan_info["fastest"]
    com, noise = centre_of_mass_block(amplitudes, shape, fastest)
    found = find_scan_rotation(com, handedness="as recorded" if handedness_given else "auto", noise=noise)
    oriented = _flipped(view, amplitudes)[1] if found["flip_patterns"] else amplitudes
    if scan_info["step_px"] is None:  # step "auto": found at the rotation the curl found (either sense fits it)
        _, scan_info = _find_step(oriented, None, {**scan_info, "rotation_deg": found["rotation_deg"]}, model, say)
    found = with_sense(found, sense(oriented, model, {**scan_info, "rotation_deg": found["rotation_deg"]}))
    check_scan_rotation(found)
    positions = raster_positions(shape, scan_info["step_px"], found["rotation_deg"], fastest)
    if view is not None:
        view.use_coords(positions)  # the descan plane, re-expressed in the rotated positions
    report_rotation(found, found["flip_patterns"], say)
    figure = {"com": com, "noise": noise, "found": found}
    return positions, {**scan_info, "rotation_deg": found["rotation_deg"], "rotation_found": found}, figure


def _step_against_rotation(step_px: float) -> str:
    return (f"the step found ({step_px:.4f} px) assumes the rotation given, which the rotation check contradicts: "
            "set the rotation (or --rotation auto), then find the step again")


def _find_step(amplitudes, view, scan_info: dict, model, say):
    """Step "auto": the raster's step that the weak-phase transfer with the model's probe fits best
    (:func:`deepphase.data.aberrations.find_scan_step`), at ``scan_info``'s rotation; then the positions."""
    from ..data.aberrations import central_counts, check_step_raster, find_scan_step, step_found_message
    from ..physics.scan import check_spacing, raster_positions

    shape, fastest = tuple(scan_info["scan_shape"]), scan_info["fastest"]
    check_step_raster(shape)
    counts = central_counts(amplitudes, shape, fastest)
    found = find_scan_step(counts, model.probe, scan_info["rotation_deg"], fastest)
    say(step_found_message(found, counts.shape[:2]), False)
    positions = raster_positions(shape, found["step_px"], scan_info["rotation_deg"], fastest)
    check_spacing(positions, model.geometry)
    if view is not None:
        view.use_coords(positions)  # the descan plane, fitted in scan indices, in position units
    return positions, {**scan_info, "step_px": found["step_px"], "step_found": found}


def report_rotation(found: dict, flipped_by_search: bool, log) -> None:
    """What rotation "auto" found; and, when the search flipped the patterns, a note saying why."""
    log(f"scan rotation {found['rotation_deg']:.2f}° (DPC curl criterion on the central {found['block'][0]}×"
        f"{found['block'][1]} positions; curl ratio {found['curl_ratio']:.3f})", False)
    if flipped_by_search:
        log("the patterns are mirrored against the scan (a detector whose rows run the other way, or the scan's "
            "rows and columns swapped: check --fastest) (curl ratio "
            f"{found['curl_ratio_other']:.2f} as recorded); patterns flipped (--flip-patterns)", True)


def _tell_probe(model, scan_info: dict):
    """A probe-aware model told the difference the probe check measured (:func:`told_to_probe_aware`), and
    ``probe_aware`` for the metadata."""
    from ..data.aberrations import told_to_probe_aware

    info = told_to_probe_aware(model, scan_info.get("probe_check"))
    return model.told(info["told_coefficients_rad_per_px2"]), {**scan_info, "probe_aware": info}


def source_division_note(model) -> str | None:
    """What to say when the source is divided out of the image of a model trained with one."""
    trained_with = (model.info.get("training") or {}).get("source_size_px")
    if not trained_with:
        return None
    return (f"the model was trained on patterns with a finite source ({trained_with} px); dividing the source out of "
            "its image as well over-sharpens it (RESULTS.md §38): drop --source-size")


def probe_estimate_note(check: dict, model, model_name, out: Path | None) -> str:
    """For a probe check with a note: with an output folder, ``probe_estimate.npy`` (the model's probe with the
    difference found) and ``probe_check.png`` written there; returns the note, with what to do about it
    (nothing but look, for a probe-aware model that was told it)."""
    import shlex

    from ..data.aberrations import add_aberrations, plot_probe_mismatch, probe_difference
    from ..io_utils import save_npy
    from ..models.modelfile import load_model

    figure = f" (see {out / 'probe_check.png'})" if out is not None else ""
    if out is not None:
        save_npy(out / "probe_estimate.npy", add_aberrations(model.probe, check["coefficients"]))
        plot_probe_mismatch(check, out / "probe_check.png")
    if model.probe_aware:
        return (f"{probe_difference(check, check['model_mrad_per_px'], check['energy_kev'])}{figure}; the "
                f"probe-aware model was told this difference (trained for up to ±{model.aberration_range:g} rad)")
    like = shlex.quote(str(model_name)) if model_name else "default"
    aware = load_model("probe-aware")
    # (a model of the user's own: train --like takes its recipe, not its probe, which is given again)
    own_probe = (f" --probe {shlex.quote(str(Path(model.folder) / 'probe.npy'))}"
                 if model_name and model.folder is not None and (Path(model.folder) / "probe.npy").is_file() else "")
    other = ("reconstruct with --model probe-aware, which is told the difference (RESULTS §37)"
             if model.probe.shape == aware.probe.shape and np.allclose(model.probe, aware.probe) else
             f"train one that is told the data's probe: `deepphase train --like {like}{own_probe} --probe-aware 2 "
             "--out MODEL`")
    if out is None:
        return f"{check['note']}: {other}"
    estimate = out / "probe_estimate.npy"
    cost = " (the default's: about 7 min on 2 CPU cores)" if like == "default" else ""
    return (f"{check['note']}{figure}: {estimate} is the model's probe with that difference; `deepphase train "
            f"--like {like} --probe {shlex.quote(str(estimate))} --out MODEL` trains a model for it with the model's "
            f"recipe{cost}; or {other}")


def _file_state(data) -> tuple[int, int] | None:
    """The size and modification time of the file the patterns are read from: a run compares them at its end, as an
    HDF5 file truncated or rewritten mid-run is read without an error (a silent image of partly missing patterns,
    the failure audit, s36)."""
    try:
        stat = Path(data).stat()
    except FileNotFoundError:
        return None
    if not Path(data).is_dir():
        return stat.st_size, stat.st_mtime_ns
    # A zarr store is a folder of chunk files: its own size and time stay as they were when a chunk is rewritten or
    # removed (an image 0.165 rad off was written: the scale audit, s41). Its files' total size, and the newest time
    # of any file or folder in it (a file added or removed changes its folder's), say it instead.
    size, newest = 0, stat.st_mtime_ns
    for folder, _, files in os.walk(data):
        try:
            newest = max(newest, os.stat(folder).st_mtime_ns)
            for name in files:
                entry = os.stat(os.path.join(folder, name))
                size, newest = size + entry.st_size, max(newest, entry.st_mtime_ns)
        except FileNotFoundError:  # (removed while walked: changed, which the next state shows)
            continue
    return size, newest


def _check_unchanged(data, read_from: tuple[int, int] | None, read_to="now") -> None:
    """Refuse the image of a file that changed while it was read (``read_from``: its :func:`_file_state` then;
    ``read_to``: its state at the end, if already taken)."""
    if read_to == "now":
        read_to = _file_state(data)
    if read_to != read_from:
        raise InputFileError(
            f"data: {str(data)!r} changed while it was read ({_file_change(read_from, read_to)}); the image "
            "would mix patterns from before and after, or a truncated file's missing ones: nothing was written. "
            "Run again once the file is complete and no longer written to")


def _file_change(before: tuple[int, int], after: tuple[int, int] | None) -> str:
    if after is None:
        return "removed since the run began"
    if before[0] != after[0]:
        return f"{before[0]:,} bytes when the run began, {after[0]:,} now"
    return "modified since the run began"


def _data_fingerprint(data, dataset, kind: str, view, flip_patterns: bool, batch_size: int) -> dict:
    """What must not change between an interrupted reconstruction and its ``resume``."""
    size, mtime_ns = _file_state(data)
    # The calibration as measured and as asked for (gain, angles, energy...): it shapes the network's input.
    calibration = json.dumps(view.info, sort_keys=True, default=str) if view is not None else ""
    return {"data": str(Path(data).resolve()), "data_bytes": size, "data_mtime_ns": mtime_ns,
            "dataset": dataset, "input": kind, "calibrated": view is not None, "patterns_flipped": flip_patterns,
            "calibration_sha256": hashlib.sha256(calibration.encode()).hexdigest(), "batch_size": batch_size}


def _reconstruct_on_cluster(data, positions, model_name, kind, view, flip_patterns, *, workers, scheduler,
                            tile_size, **options):
    """The prediction spread over a dask cluster (:mod:`deepphase.reconstruction.distributed`)."""
    from .distributed import open_client, reconstruct_distributed

    transform = None
    if view is not None:
        from ..data.calibration import CalibratedView

        # The calibration measured here (with the flip, if any) travels to the workers; each applies it to the
        # frames it reads.
        transform = functools.partial(CalibratedView, info=view.info, arrays=view.arrays, coords=view.coords,
                                      what=view.what)
    elif flip_patterns:
        transform = functools.partial(_flipped_amplitudes, kind=kind)
    with open_client(workers, scheduler) as client:
        return reconstruct_distributed(data, positions, model_name, client, tile_size, kind=kind,
                                       transform=transform, **options)


def _flipped_amplitudes(frames, kind: str):
    """A cluster worker's view of model-grid frames, flipped (module level: it travels pickled)."""
    from ..data.io import AmplitudeView, FlippedView

    return FlippedView(AmplitudeView(frames, kind))


def _reconstruct_with_libertem(data, out: Path | None, *, model, positions, scan_shape, step_px, rotation_deg,
                               fastest, kind, calibration, calibration_options, probe_check, flip_patterns,
                               source_size_px, deblur, sampling, batch_size, precision, uncertainty, engine, workers,
                               overwrite, progress, log, command):
    """The file opened by LiberTEM, predicted and stitched on its executor
    (:func:`deepphase.reconstruction.libertem_udf.reconstruct_file`), then noted and written as above."""
    try:
        from .libertem_udf import LIBERTEM_EXTRA, reconstruct_file as reconstruct_with_libertem
        import libertem.api  # noqa: F401
    except ImportError as exc:
        raise DeepPhaseError(f"libertem: --libertem needs LiberTEM ({exc}); install it with `{LIBERTEM_EXTRA}`") \
            from exc
    from ..models.modelfile import load_model
    from .pipeline import with_source_divided_out

    notes = []
    note = _noting(notes, log)

    model = model_reference(model, for_workers=True)
    given_positions = None
    if positions is not None:
        given_positions, _ = scan_positions(positions, scan_shape, step_px, rotation_deg, fastest, n_frames=None)
    elif step_px is None:
        raise DeepPhaseError("step: give the raster's --step S in pixels (the scan shape comes from the file, or "
                             "--scan-shape ROWS COLS), or --positions POS.npy")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    fastest = fastest or "col"
    read_from = _file_state(data)
    rec, read = reconstruct_with_libertem(
        data, model=model, step_px=step_px if given_positions is None else None, positions=given_positions,
        nav_shape=scan_shape, rotation_deg=rotation_deg, fastest=fastest, kind=kind, calibration=calibration,
        calibration_options=calibration_options,
        calibration_png=out / "calibration.png" if out is not None else None,
        rotation_png=out / "rotation.png" if out is not None else None, batch_size=batch_size, engine=engine,
        precision=precision, deblur=deblur, workers=workers, progress=bool(progress),
        uncertainty="head" if uncertainty == "head" else None, probe_check=probe_check,
        flip_patterns=True if flip_patterns else (None if rotation_deg == "auto" else False))
    _check_unchanged(data, read_from)  # (LiberTEM's reading was not checked: the scale audit, s41)
    scan = ({"positions_file": str(positions)} if isinstance(positions, (str, Path)) else
            {"positions": "given"} if given_positions is not None else
            {"scan_shape": read["navigation_shape"] if fastest == "col" else read["navigation_shape"][::-1],
             "step_px": read.get("step_px", step_px), "rotation_deg": read["rotation_deg"], "fastest": fastest,
             **{k: read[k] for k in ("step_found", "rotation_found", "rotation_check", "probe_check", "probe_aware")
                if k in read}})
    if "step_found" in read:
        from ..data.aberrations import PROBE_CHECK_BLOCK, step_found_message

        note(step_found_message(read["step_found"], [min(k, PROBE_CHECK_BLOCK) for k in read["navigation_shape"]]),
             False)
    for text in read["pattern_notes"]:
        note(text)
    phase_model = load_model(model)
    rec = with_source_divided_out(rec, source_size_px)
    if source_size_px and (text := source_division_note(phase_model)):
        note(text)
    _note_dose(rec, notes, note)
    if "rotation_found" in read:
        report_rotation(read["rotation_found"], read["patterns_flipped"] and not flip_patterns, note)
    if (read.get("rotation_check") or {}).get("note"):
        note(read["rotation_check"]["note"])
        if "step_found" in read:
            note(_step_against_rotation(read["step_px"]))
    if read["rotation_png"]:
        note(f"what the DPC curl criterion saw: {read['rotation_png']}", False)
    if (read.get("probe_check") or {}).get("note"):
        note(probe_estimate_note(read["probe_check"], phase_model, model, out))
    if (read.get("probe_check") or {}).get("step_note"):
        note(read["probe_check"]["step_note"])
    if (read.get("probe_aware") or {}).get("note"):
        note(read["probe_aware"]["note"])
    rec.metadata = {"command": command, **_data_record(data), "input": read["input"],
                    "n_patterns": rec.processing["patterns"], "stitching": "pairwise",
                    "model_path": str(model or "default (packaged)"), **scan,
                    "patterns_flipped": read["patterns_flipped"], "data_info": read, "calibration": read["calibration"],
                    "notes": notes}
    rec.notes = notes
    if out is not None:
        written = ({"calibration.png"} if read["calibration"] is not None else set()) | (
            {"rotation.png"} if read["rotation_png"] else set()) | (
            {"probe_estimate.npy", "probe_check.png"} if (read.get("probe_check") or {}).get("note") else set()) | (
            _write_step_figure(out, scan, note))
        _write(rec, out, sampling or (read["calibration"] or {}).get("real_space_sampling_angstrom"), overwrite,
               written)
    return rec
