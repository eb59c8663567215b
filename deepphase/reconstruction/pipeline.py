"""From diffraction amplitudes and scan positions to a stitched phase image, and its output files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.io import check_dtype, check_patterns, count_quantum, sample_patterns
from ..errors import OutputExistsError, ShapeError, ValueRangeError
from ..io_utils import atomic_path, save_json, save_npy, save_png
from ..models.modelfile import PhaseModel, check_compatible, load_model
from ..physics.geometry import output_mask
from ..physics.scan import check_spacing, validate_positions
from ..runtime import package_versions, resolve_device
from ..wording import in_callers_terms, in_callers_words, note_to_caller
from .deblur import deblur_blend, deconvolve_source, electrons_per_pattern, resolve_deblur, source_regularisation
from .predict import check_sigma_head, precision_used, predict_patches
from .stitching import METHODS, PairwiseStitcher, stitch

# The stitchers that blend boxes on an upsampled canvas and bin it (the blur deblur_blend undoes); the
# seed's stitching is kept as the seed had it.
DEBLURRED_STITCHERS = ("pairwise", "least-squares")
OUTPUT_FILES = ("phase.npy", "phase.tif", "phase.emd", "phase.png", "uncertainty.npy", "metadata.json")
#: What :func:`~deepphase.reconstruction.from_file.reconstruct_file` writes beside them when there is something to
#: show; metadata.json's ``figures`` names those a run made, and :func:`write_outputs` removes an earlier run's others.
FIGURES = ("calibration.png", "rotation.png", "probe_estimate.npy", "probe_check.png", "step.png")


@dataclass
class Reconstruction:
    """A stitched phase image (radians, arbitrary constant offset) on the real-space pixel grid.

    Attributes
    ----------
    phase : (rows, cols) float32
        The image over the scanned area's bounding box; NaN where no probe reached (the corners of a rotated
        scan). ``phase[0, 0]`` is object pixel ``origin_px`` in the frame of the scan positions:
        :meth:`region` cuts the same area out of another image (a truth, a reference) to compare.
    origin_px : (int, int)
    full : float32
        The same image on the object grid from pixel (0, 0), as large as the stitcher's canvas (NaN where no
        probe reached).
    timings : dict
        Seconds: ``checks_s`` (the scan checks), ``engine_setup_s``, ``setup_s``, ``predict_s``, ``stitch_s`` and
        ``total_s`` (of this call, from its start: a model it loads and the checks included, a model loaded
        before it not), and ``patterns_per_second`` (scan positions per second of prediction; with dropout samples
        or an ensemble also ``predictions_per_second``, every draw counted). From
        :func:`~deepphase.reconstruction.from_file.reconstruct_file`: ``checks_s`` its rotation, step and probe
        checks, ``total_s`` the whole run once the file is open (calibration, checks, reconstruction; the
        outputs' writing excluded).
    model_info : dict
        Which model made it (:meth:`~deepphase.models.modelfile.PhaseModel.record`).
    processing : dict
        What was done: stitching, plane removed, dose and deblurring and why, precision, device, engine, input,
        uncertainty method and factor, source division, resumption.
    uncertainty : (rows, cols) float32 or None
        Per-pixel standard deviation (rad) on the grid of ``phase``, when asked for.
    metadata : dict
        What the checks found, as metadata.json holds it: from :func:`reconstruct` (``checks``), ``scan_checks``
        and ``notes``; from :func:`~deepphase.reconstruction.from_file.reconstruct_file`, what it found in and about
        the file (scan, calibration, rotation and probe checks). Empty without checks.
    notes : list of str
        What the user should check (the checks' notes, as warned).
    """

    phase: np.ndarray
    origin_px: tuple[int, int]
    full: np.ndarray
    timings: dict = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)
    processing: dict = field(default_factory=dict)
    uncertainty: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def region(self, image: np.ndarray) -> np.ndarray:
        """The part of ``image`` (on the object grid of the scan positions, e.g. the truth of a simulation) that
        ``phase`` covers: ``image[r0 : r0 + rows, c0 : c0 + cols]`` with ``(r0, c0) = origin_px``."""
        image = np.asarray(image)
        (r0, c0), (rows, cols) = self.origin_px, self.phase.shape
        if image.ndim != 2 or image.shape[0] < r0 + rows or image.shape[1] < c0 + cols:
            raise ShapeError(f"image: shape {image.shape} does not reach the reconstruction's pixels "
                             f"{r0}..{r0 + rows - 1} × {c0}..{c0 + cols - 1} (origin_px {self.origin_px}); expected "
                             "an image on the object grid of the scan positions")
        return image[r0 : r0 + rows, c0 : c0 + cols]

    def __repr__(self) -> str:
        return (f"Reconstruction(phase {self.phase.shape[0]}×{self.phase.shape[1]} rad, origin_px {self.origin_px}, "
                f"model {self.model_info.get('name')!r}, stitching {self.processing.get('stitching')!r}"
                + (", with uncertainty" if self.uncertainty is not None else "") + ")")


def crop_to_coverage(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The bounding box of the finite pixels, and its top-left corner."""
    finite = np.isfinite(image)
    if not finite.any():
        raise ShapeError("reconstruction: no pixel was covered by any probe position")
    rows, cols = np.flatnonzero(finite.any(axis=1)), np.flatnonzero(finite.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return image[r0:r1, c0:c1], (int(r0), int(c0))


def subtract_plane(image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Remove the least-squares plane (tilt) of the finite pixels, keeping the mean.

    Returns the image and the removed slopes (rad per pixel along rows and columns).
    """
    rows, cols = np.nonzero(np.isfinite(image))
    if len(rows) < 3:
        return image, (0.0, 0.0)
    values = image[rows, cols].astype(np.float64)
    design = np.stack([rows - rows.mean(), cols - cols.mean(), np.ones(len(rows))], axis=1)
    (g_r, g_c, _), *_ = np.linalg.lstsq(design, values, rcond=None)
    rr, cc = np.indices(image.shape)
    return image - (g_r * (rr - rows.mean()) + g_c * (cc - cols.mean())), (float(g_r), float(g_c))


class _Rows:
    """Positions ``start … stop − 1`` of a sliceable (N, n, n) array, read only when sliced."""

    def __init__(self, array, start: int, stop: int):
        self.array, self.start, self.stop = array, start, stop
        self.first_frame = start  # read by predict_patches to name a bad frame by its index in the scan
        self.shape = (stop - start, *tuple(array.shape[1:]))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("_Rows supports contiguous slices only")
        a, b, _ = index.indices(self.shape[0])
        return self.array[self.start + a : self.start + b]


class _PatchStore:
    """Holds every patch, for the stitchers that need them all at once ("least-squares", "seed").

    In memory, or in a memory-mapped .npy file inside a checkpoint folder (so that ``resume`` finds them).
    """

    def __init__(self, n: int, out_px: int, path: Path | None = None, resume: bool = False):
        shape = (n, out_px, out_px)
        if path is None:
            self.patches = np.empty(shape, dtype=np.float32)
        elif resume:
            try:
                self.patches = np.load(path, mmap_mode="r+")
            except (OSError, ValueError) as exc:
                raise ValueRangeError(f"resume: the saved patches {path} cannot be read ({exc}); pass --overwrite "
                                      "to start again") from exc
            if self.patches.shape != shape or self.patches.dtype != np.float32:
                raise ValueRangeError(f"resume: the saved patches {path} are {self.patches.shape}, expected {shape}; "
                                      "pass --overwrite to start again")
        else:  # a fresh run: whatever an earlier, unfinished run left there is replaced
            self.patches = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        self.done = np.zeros(n, dtype=bool)

    def reduce(self, patches, start: int):
        """What :meth:`add` takes: the patches themselves (this store keeps them whole)."""
        return patches

    def add(self, patches, start: int) -> None:
        self.add_reductions(patches, start)

    def add_reductions(self, patches, start: int) -> None:
        self.patches[start : start + len(patches)] = patches
        self.done[start : start + len(patches)] = True

    def state(self) -> dict:
        if isinstance(self.patches, np.memmap):
            self.patches.flush()
        return {"done": self.done}

    def load_state(self, state) -> None:
        self.done = np.asarray(state["done"], dtype=bool)


# A checkpoint is written at most this often (seconds): each holds ~0.1 kB per position, so writing it
# after every chunk would cost more than the chunk on a large scan.
CHECKPOINT_EVERY_S = 60.0
CHECKPOINT_FORMAT = "deepphase-partial/1"


class InterruptedReconstruction(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during :func:`reconstruct`; ``done`` patterns are saved in the checkpoint, if any."""

    def __init__(self, done: int, total: int, checkpoint: Path | None):
        self.done, self.total, self.checkpoint = done, total, checkpoint
        where = (f"; the progress is saved in {str(checkpoint)!r}: run the same command with --resume to continue"
                 if checkpoint is not None else "")
        super().__init__(f"interrupted after {done:,} of {total:,} patterns{where}")


def _checkpoint_files(folder: Path) -> tuple[Path, Path]:
    return folder / "progress.json", folder / "state.npz"


def read_checkpoint(folder: str | Path) -> dict | None:
    """The progress record of a checkpoint folder (``done``, ``total``, ``fingerprint``), or None if there is none."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"out: {str(folder)!r} is a file where reconstruct keeps its progress; remove it")
    progress, _ = _checkpoint_files(folder)
    if not progress.exists():
        return None
    import json

    try:
        record = json.loads(progress.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueRangeError(f"resume: the saved progress {str(progress)!r} is damaged ({exc}); pass --overwrite to "
                              "start again") from exc
    if not isinstance(record, dict) or not {"done", "total"} <= set(record):
        raise ValueRangeError(f"resume: the saved progress {str(progress)!r} is damaged; pass --overwrite to start again")
    return record


def _claim_checkpoint(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a checkpoint that is a file, or one holding an unfinished run's progress unless it is resumed or
    ``overwrite`` is asked (a fresh run then replaces it)."""
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"checkpoint: {str(folder)!r} is a file; expected a folder for the progress of the run")
    if resume:
        return
    try:
        record = read_checkpoint(folder)
    except ValueRangeError:  # damaged progress: not worth keeping, yet not removed unasked
        if overwrite:
            return
        raise
    if record is not None and record["done"] < record["total"] and not overwrite:  # (a finished run's: replaced)
        raise OutputExistsError(
            f"checkpoint: {str(folder)!r} holds an interrupted reconstruction ({record['done']:,} of "
            f"{record['total']:,} patterns done); pass --resume to continue it or --overwrite to start again")


def _save_checkpoint(folder: Path, fingerprint: dict, done: int, total: int, accumulators) -> None:
    arrays = {}
    for k, acc in enumerate(accumulators):
        arrays.update({f"{k}/{name}": value for name, value in acc.state().items()})
    progress, state = _checkpoint_files(folder)
    with atomic_path(state, ".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # uncompressed: written often, read once
    # progress.json last: it names a complete state.npz.
    save_json(progress, {"format": CHECKPOINT_FORMAT, "done": done, "total": total, "fingerprint": fingerprint})


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block is done (on POSIX, in the main thread); they arrive after it."""
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


#: What a resume's fingerprint entries are, in the command's words.
_RESUME_WORDS = {
    "chunk_size": "--chunk-size", "batch_size": "--batch-size", "stitching": "--stitching", "precision": "--precision",
    "device": "--device", "input": "--input", "dataset": "--dataset", "uncertainty_samples": "--uncertainty",
    "uncertainty": "--uncertainty", "patterns_flipped": "--flip-patterns", "ensemble_sha256": "--ensemble",
    "model": "--model", "model_arch": "--model", "model_sha256": "--model (its weights)",
    "data": "the data file's path", "data_bytes": "the data file (its size changed since)",
    "data_mtime_ns": "the data file (modified since)", "calibrated": "the calibration",
    "calibration_sha256": "the calibration (as measured, or --gain, --semi-angle, --energy, ...)",
    "n_patterns": "the number of patterns", "pattern_shape": "the patterns' shape",
    "positions_sha256": "the scan positions (--positions, --scan-shape, --step, --rotation, --fastest)",
}
#: Those whose values are what to give again.
_RESUME_VALUES = {"chunk_size", "batch_size", "stitching", "precision", "device", "input", "dataset",
                  "uncertainty_samples", "n_patterns"}


def _load_checkpoint(folder: Path, fingerprint: dict, accumulators) -> int:
    record = read_checkpoint(folder)
    if record is None:
        raise ValueRangeError(f"resume: {folder} holds no interrupted reconstruction to continue")
    if record.get("format") != CHECKPOINT_FORMAT or record.get("fingerprint") != fingerprint:
        theirs = record.get("fingerprint") or {}
        changed = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
        said = []
        for key in changed:  # in the options' words, with the value to give where it is one (the scale audit, s41)
            words = _RESUME_WORDS.get(key, key)
            if key in _RESUME_VALUES and key in theirs:
                then, now = (("none" if v in (None, 0) and key in ("dataset", "uncertainty_samples") else v)
                             for v in (theirs[key], fingerprint.get(key)))
                words = f"{words} {then} then, {now} now"
            if words not in said:
                said.append(words)
        raise ValueRangeError(
            f"resume: the interrupted reconstruction in {folder} was made with other settings or data "
            f"({'; '.join(said) or 'an earlier version of its record'}); run it with the same ones, or pass --overwrite "
            "to start again"
        )
    _, state = _checkpoint_files(folder)
    try:
        with np.load(state, allow_pickle=False) as saved:
            for k, acc in enumerate(accumulators):
                acc.load_state({name.split("/", 1)[1]: saved[name] for name in saved.files if name.startswith(f"{k}/")})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # cut short or overwritten
        raise ValueRangeError(f"resume: the saved state {str(state)!r} is damaged ({exc}); pass --overwrite to start "
                              "again") from exc
    # The state itself says how far it got: every accumulator must hold exactly the patterns 0 … done − 1.
    done = int(np.argmin(accumulators[0].done)) if not accumulators[0].done.all() else len(accumulators[0].done)
    for acc in accumulators:
        if acc.done[:done].sum() != done or acc.done[done:].any():
            raise ValueRangeError(f"resume: the saved progress in {folder} is inconsistent; pass --overwrite to "
                                  "start again")
    return done


#: Patterns read and predicted at a time by default: memory stays bounded by it.
CHUNK_SIZE = 16384


@in_callers_words(data="amplitudes", calibrate="deepphase.calibrate", step="the positions' step",
                  **{"flip-patterns": "deepphase.physics.flip_patterns(amplitudes)"})
def reconstruct(
    amplitudes,
    positions,
    model: PhaseModel | str | Path | None = None,
    stitching: str = "pairwise",
    remove_plane: bool = True,
    batch_size: int = 512,
    device: str = "auto",
    progress: bool | None = None,
    sampling: float | None = None,
    precision: str = "auto",
    uncertainty_samples: int = 0,
    chunk_size: int = CHUNK_SIZE,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    fingerprint: dict | None = None,
    sigma_scale: float | None = None,
    ensemble=(),
    engine: str = "auto",
    deblur: bool | str = "auto",
    sigma_head: bool = False,
    uncertainty: int | str | None = None,
    checks: bool = True,
) -> Reconstruction:
    """Predict a phase patch for every pattern and stitch them into one image, chunk by chunk.

    The patterns are read, predicted and reduced ``chunk_size`` at a time: with the pairwise stitcher
    (the default) only small per-position reductions are kept (see
    :class:`~deepphase.reconstruction.stitching.PairwiseStitcher`), so memory is bounded by the chunk
    plus ~0.2 kB a position (227 bytes measured, RESULTS §9), and a file larger than memory can be reconstructed. The other stitchers
    need every patch (4 kB a position): in memory, or memory-mapped in the checkpoint folder.

    Parameters
    ----------
    amplitudes : array-like (N, n, n)
        Diffraction amplitudes (square roots of the counts); any sliceable array (memmap, h5py, a lazy
        view of a detector file).
    positions : (N, 2) array
        Top-left corners of the probe windows in real-space pixels (row, col).
    model : PhaseModel, a packaged model's name (``"default"``, ``"neighbourhood"``, ...), a model folder, or None
        for the packaged default.
    batch_size : patterns per forward pass (default 512).
    device : "auto" (default: the first CUDA GPU if there is one, else the CPU), "cpu" or "cuda[:N]".
    progress : a progress bar (tqdm) over the patterns: None (default) shows one where the output is a terminal.
    stitching : "pairwise" (default, fast, streams), "least-squares" (exact canvas least squares) or "seed"
        (the original iterative method); see :mod:`deepphase.reconstruction.stitching`.
    remove_plane : subtract the best-fit plane from the stitched image (default). Overlaps between
        patches do not constrain a global tilt: it comes only from the tilts of the patches, and a
        small systematic tilt of the network's patches adds up over the scan (the seed's stitching
        hides it by never converging at large scales). Set False to keep the tilt as predicted.
    deblur : divide out the blur that blending sub-pixel patches onto the object grid adds
        (:mod:`deepphase.reconstruction.deblur`). It restores the contrast of atomic detail (10–25 %
        otherwise) and amplifies the noise at the finest scale: ``"auto"`` (default) deblurs unless the
        patterns are counts below 10⁴ electrons per pattern; True or False force it. The seed's
        stitching is never deblurred (it reproduces the seed's method).
    sampling : real-space pixel size of the data in Å, if known: checked against the model's where the model
        records one (the packaged models do not: they are made for a probe sampled in pixels), recorded in
        ``processing`` and used by :func:`write_outputs` for the files' scale.
    precision : network arithmetic: "auto" (bfloat16 on a GPU, float32 on a CPU), "float32", "bfloat16"
        or "float16".
    uncertainty_samples : 0 (default) or at least 2 (1 is refused): also estimate a per-pixel standard deviation
        by Monte Carlo dropout:
        that many extra predictions of each chunk with the dropout layers active, each stitched like the
        main one; the spread of the stitched images (each with its mean removed, the offset being
        arbitrary) is the uncertainty. The data are read once; the network runs that many extra times.
    chunk_size : patterns read and predicted at a time.
    checkpoint : a folder for the progress of an interrupted run (written at most every
        ``CHECKPOINT_EVERY_S`` seconds, on Ctrl-C/SIGTERM and after the last chunk).
    resume : continue from the progress in ``checkpoint`` (which must exist and match ``fingerprint``).
    overwrite : start afresh in a ``checkpoint`` that holds an interrupted run's progress (refused otherwise, so
        that it is not lost unasked).
    fingerprint : what identifies the run for ``resume`` (the data file, settings); the pipeline adds the
        model, the positions and its own settings.
    sigma_scale : factor applied to the spread (default: for dropout, the one fitted for the model and
        stored in its model.json by :func:`deepphase.reconstruction.uncertainty.fit_sigma_scale`; else 1).
    ensemble : other models (PhaseModel or folders) for the same probe and grid: every chunk is also
        predicted by each, the image is the mean of all the members' stitched images (``model``
        included) and the uncertainty their spread. Not combined with ``uncertainty_samples``.
    engine : how the network runs (:mod:`deepphase.reconstruction.engines`): "auto" (default: on a CPU
        channels-last, ~1.3× eager, or ONNX Runtime, ~2.1×, when it is installed and the scan has ≥ 16,384
        patterns or the model's export is already cached, :func:`~deepphase.reconstruction.engines.resolve_engine`;
        eager on a GPU), "eager", "channels-last", "compile", "cuda-graphs" (CUDA only) or "onnx"
        (CPU, float32). Every
        engine computes the same function to ~1e-6 rad. Monte Carlo dropout samples always run eagerly.
    sigma_head : the uncertainty from the model's σ head (a model trained with ``deepphase train
        --sigma-head``), in the same forward pass as the phase: its standard deviation patches are blended
        onto the image grid as the pairwise stitcher blends the phase, offsets zero (whatever
        ``stitching``), and multiplied by the factor fitted for the head (:func:`~deepphase.reconstruction.
        uncertainty.fit_sigma_scale` with ``method="head"``), or by ``sigma_scale``. Not combined with
        ``uncertainty_samples`` or ``ensemble``.
    uncertainty : the same choice in one argument, as :func:`~deepphase.reconstruction.from_file.reconstruct_file`
        and ``--uncertainty`` take it: a number of dropout samples (``uncertainty_samples``) or ``"head"``
        (``sigma_head``).
    checks : before the network runs, check the scan against the model on positions that form a raster of at
        least 16 × 16 (:func:`~deepphase.reconstruction.checks.check_scan`, ~1–2 s): its rotation and handedness,
        the data's probe and the step. What they find is in the result's ``metadata``, and a clear disagreement (the
        positions in (col, row) order, turned, mirrored or in Å) is a note (a :class:`DeepPhaseNote` warning, kept
        in ``notes``). :func:`~deepphase.reconstruction.from_file.reconstruct_file` runs them itself.

    Returns
    -------
    Reconstruction
        The stitched image (``phase``, NaN where no probe reached; ``origin_px`` places it on the positions' grid)
        with what made it (``model_info``, ``processing``, ``timings``), the uncertainty map if asked for, and what
        the checks found (``metadata``, ``notes``). :func:`write_outputs` writes it.

    Raises
    ------
    InterruptedReconstruction
        On Ctrl-C (KeyboardInterrupt), after saving the progress to ``checkpoint`` if given.
    """
    t_call = time.perf_counter()
    if uncertainty is not None:
        if uncertainty_samples or sigma_head:
            raise ValueRangeError("uncertainty: give it, or uncertainty_samples / sigma_head, not both")
        uncertainty_samples, sigma_head = uncertainty_method(uncertainty)
    if sigma_scale is not None and not (np.isfinite(sigma_scale) and sigma_scale > 0):
        raise ValueRangeError(f"sigma_scale: expected a positive factor on the spread, got {sigma_scale!r}")
    if sampling is not None and not (np.isfinite(sampling) and sampling > 0):
        raise ValueRangeError(f"sampling: expected a positive pixel size in Å, got {sampling!r}")
    if uncertainty_samples and int(uncertainty_samples) < 2:  # before any prediction is spent
        raise ValueRangeError(f"uncertainty_samples: expected at least 2 samples, got {uncertainty_samples}")
    if int(chunk_size) < 1:
        raise ValueRangeError(f"chunk_size: expected a positive number of patterns, got {chunk_size}")
    if resume and checkpoint is None:
        raise ValueRangeError("resume: needs the checkpoint folder of the interrupted run")
    if checkpoint is not None:
        _claim_checkpoint(Path(checkpoint), resume, overwrite)
    if stitching not in METHODS:
        raise ValueRangeError(f"stitching: expected one of {', '.join(repr(m) for m in METHODS)}, got {stitching!r}")
    if uncertainty_samples and len(ensemble):
        raise ValueRangeError("uncertainty: give Monte Carlo dropout samples or an ensemble of models, not both")
    if sigma_head and (uncertainty_samples or len(ensemble)):
        raise ValueRangeError("uncertainty: the σ head's uncertainty is one method, Monte Carlo dropout samples or "
                              "an ensemble another; choose one")
    if not isinstance(model, PhaseModel):
        model = load_model(model)
    if sigma_head:
        check_sigma_head(model)
    if isinstance(ensemble, (str, Path, PhaseModel)):
        ensemble = (ensemble,)  # one further model, named alone (not its name's letters)
    members = [m if isinstance(m, PhaseModel) else load_model(m) for m in ensemble]
    if isinstance(amplitudes, (list, tuple)):
        amplitudes = np.asarray(amplitudes)
    elif isinstance(amplitudes, torch.Tensor):
        amplitudes = amplitudes.detach().cpu().numpy()
    shape = getattr(amplitudes, "shape", None)
    if shape is not None and len(shape) == 4:
        raise ShapeError(f"amplitudes: a {shape[0]}×{shape[1]} scan of patterns as a 4-D array; expected (N, k, k) "
                         f"frames: pass amplitudes.reshape(-1, {shape[2]}, {shape[3]}) with raster_positions(("
                         f"{shape[0]}, {shape[1]}), step, fastest='col') (C order: the scan column fastest)")
    if shape is None or len(shape) != 3:
        raise ShapeError(f"amplitudes: expected an array of shape (N, k, k), got "
                         f"{'shape ' + str(shape) if shape is not None else type(amplitudes).__name__}")
    if shape[0] == 0:
        raise ShapeError("amplitudes: no diffraction patterns (N = 0)")
    if getattr(amplitudes, "dtype", None) is not None:
        check_dtype(amplitudes)
    for m in [model, *members]:
        check_compatible(m, tuple(shape[1:]), sampling)
    for m in members:
        if m.geometry != model.geometry or not np.array_equal(m.probe, model.probe):
            raise ValueRangeError(f"ensemble: model {str(m.folder or m.name)!r} was made for another probe or "
                                  f"geometry than {str(model.folder or model.name)!r}; an ensemble needs the same ones")
    digests = [_weights_digest(m) for m in [model, *members]]  # (the ensemble's check and the resume's fingerprint)
    if members:  # (a member with the model's own weights spreads nothing: its σ map came out 0 everywhere)
        seen = {}
        for m, digest in zip([model, *members], digests):
            first = seen.setdefault(digest, m)
            if first is not m:
                raise ValueRangeError(
                    f"ensemble: model {m.name!r} has the same weights as {first.name!r} (the model itself, or a copy), "
                    "and an ensemble's spread comes from networks trained apart (another --seed); drop it or give "
                    "another model")
    if engine == "onnx" and precision not in ("auto", "float32"):
        raise ValueRangeError(f"engine: 'onnx' runs in float32; precision {precision!r} needs another engine")
    positions = validate_positions(positions, shape[0])
    check_spacing(positions, model.geometry)
    n, chunk_size = int(shape[0]), int(chunk_size)
    dose_info = dose_settings(deblur, stitching, amplitudes, model)
    notes = []
    if (dose_info["dose_note"] or "").startswith(("the patterns are whole numbers", GAIN_NOTE_START)):
        # (said at once, in a notebook too)
        notes.append(dose_info["dose_note"])
        note_to_caller(dose_info["dose_note"])
    scan_checks = {}
    t_checks = time.perf_counter()
    if checks:  # (after the arguments are checked: a call refused says nothing else)
        from .checks import check_scan

        with np.errstate(all="ignore"):  # (NaN/Inf frames: the prediction names the frame)
            scan_checks = check_scan(amplitudes, positions, model)
        for text in scan_checks.pop("notes"):
            notes.append(in_callers_terms(text))
            note_to_caller(text)
    t_checks = time.perf_counter() - t_checks
    neighbours = None
    if model.in_channels > 1:  # a neighbourhood model: each position's 3×3 frames, found once per scan
        from .neighbourhood import neighbour_indices

        neighbours = neighbour_indices(positions, model.neighbourhood["step_px"],
                                       size=int(round(model.in_channels ** 0.5)))
    # What predicts each accumulator's patches: (network, dropout seed base or None).
    plan = ([(model, None)] + [(model, k) for k in range(1, 1 + int(uncertainty_samples or 0))]
            + [(m, None) for m in members])
    draws = len(plan)
    dev = resolve_device(device)
    from .engines import exported_onnx, prepare_network, resolve_engine

    model.network.eval()
    requested, engine = engine, resolve_engine(engine, dev, n, precision, network=model,
                                               pattern_shape=(model.in_channels, *shape[1:]))
    t_engine = time.perf_counter()
    runners = {}
    for m in [model, *members]:
        if m.in_channels != model.in_channels:
            raise ValueRangeError(f"ensemble: model {m.name!r} takes {m.in_channels} input channels, "
                                  f"{model.name!r} {model.in_channels}; an ensemble needs the same input")
        if engine != "eager":
            m.network.eval()
            if requested == "auto" and engine == "onnx":  # export now: if this model does not, fall back quietly
                runners[id(m)] = exported_onnx(m, dev, (m.in_channels, *shape[1:]))
                if runners[id(m)] is None:
                    engine = "channels-last"
                    runners = {id(k): prepare_network(k, engine, dev) for k in [model, *members]}
                    break
            else:
                runners[id(m)] = prepare_network(m, engine, dev)  # once: compiling/exporting is slow
    t_engine = time.perf_counter() - t_engine
    mask = output_mask(model.probe, model.geometry)
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    accumulators = make_accumulators(stitching, positions, mask, model.geometry, draws, folder, resume, sigma_head)
    on_device = reduce_on_device(dev, stitching)
    fingerprint = {**(fingerprint or {}), "n_patterns": n, "pattern_shape": list(shape[1:]),
                   "positions_sha256": hashlib.sha256(np.ascontiguousarray(positions).tobytes()).hexdigest(),
                   "model": model.name, "model_arch": model.arch, "model_sha256": digests[0],
                   "stitching": stitching, "uncertainty_samples": draws - 1, "chunk_size": chunk_size,
                   "precision": precision, "device": str(dev),
                   "ensemble_sha256": digests[1:],
                   **({"uncertainty": "σ head"} if sigma_head else {})}
    # (the engine is left out: every engine computes the same function, so a run may resume with another)
    done = resumed_from = _load_checkpoint(folder, fingerprint, accumulators) if resume else 0
    empty: list[int] = []  # positions whose own pattern is zero everywhere (read by this run)
    t_setup = time.perf_counter() - t0
    t_predict = t_reduce = 0.0
    last_save = time.perf_counter()
    try:
        # (with several draws, the bar counts predictions, whole ones: it showed "2236.0/2304", the scale audit)
        with tqdm(total=n * len(plan), initial=done * len(plan), unit="pattern", leave=False,
                  desc="reconstructing" + (f" ({len(plan)} predictions each)" if len(plan) > 1 else ""),
                  disable=None if progress is None else not progress) as bar:
            for start in range(done, n, chunk_size):
                stop = min(start + chunk_size, n)
                # The frames this chunk reads: its own, and for a neighbourhood model the halo around them.
                lo, hi = (start, stop) if neighbours is None else (int(neighbours[start:stop].min()),
                                                                    int(neighbours[start:stop].max()) + 1)
                rows = _Rows(amplitudes, lo, hi)
                # Read once, predicted once per draw: the main prediction, then dropout samples or members.
                if draws > 1:  # read once for all draws (the frames are checked here, by their scan index)
                    rows = np.asarray(rows[0 : hi - lo], dtype=np.float32)
                    check_patterns(rows, lo)
                chunk_neighbours = None if neighbours is None else neighbours[start:stop] - lo
                reduced, sigmas = [], None
                chunk_empty: list[int] = []
                for k, ((network, sample), acc) in enumerate(zip(plan, accumulators)):
                    t = time.perf_counter()
                    patches = predict_patches(network, rows, batch_size=batch_size, device=dev, progress=False,
                                              precision=precision, start=start - lo, stop=stop - lo,
                                              neighbours=chunk_neighbours,
                                              runner=runners.get(id(network)) if sample is None else None,
                                              mc_dropout_seed=None if sample is None else sample * 1_000_003 + start,
                                              sigma=sigma_head and k == 0, on_device=on_device,
                                              on_batch=bar.update, empty=chunk_empty if k == 0 else None)
                    if sigma_head and k == 0:  # the σ patches of the same pass: the last accumulator's
                        patches, sigmas = patches
                    if on_device and dev.type == "cuda":  # asynchronous kernels: wait, so the timings split honestly
                        torch.cuda.synchronize(dev)
                    t_predict += time.perf_counter() - t
                    t = time.perf_counter()
                    reduced.append(acc.reduce(patches, start))
                    t_reduce += time.perf_counter() - t
                if sigmas is not None:
                    t = time.perf_counter()
                    reduced.append(accumulators[-1].reduce(sigmas, start, remove_mean=False))
                    t_reduce += time.perf_counter() - t
                # Every draw's chunk goes in, or none: an interrupt here would leave a checkpoint that
                # holds some draws of the chunk and not others.
                with _signals_deferred():
                    for acc, part in zip(accumulators, reduced):
                        acc.add_reductions(part, start)
                    done = stop
                    empty += [lo + i for i in chunk_empty]
                bar.n = done * len(plan)
                bar.refresh()
                if folder is not None and time.perf_counter() - last_save > CHECKPOINT_EVERY_S and done < n:
                    with _signals_deferred():
                        _save_checkpoint(folder, fingerprint, done, n, accumulators)
                    last_save = time.perf_counter()
    except KeyboardInterrupt as exc:
        saved = folder is not None and done > resumed_from
        if saved:
            with _signals_deferred():
                _save_checkpoint(folder, fingerprint, done, n, accumulators)
        saved = saved or (folder is not None and resumed_from > 0)
        raise InterruptedReconstruction(done, n, folder if saved else None) from exc
    if folder is not None:
        with _signals_deferred():
            _save_checkpoint(folder, fingerprint, done, n, accumulators)
    if empty and more_empty_than_chance(len(empty), n - resumed_from, dose_info["electrons_per_pattern"]):
        notes.append(in_callers_terms(text := empty_patterns_note(empty, n - resumed_from)))
        note_to_caller(text)
    t1 = time.perf_counter()
    full, slopes, phase, origin, spread, uncertainty = finish(accumulators, positions, mask, model, stitching,
                                                              remove_plane, members, sigma_scale,
                                                              dose_info["deblurred"], dose_info["electrons_per_pattern"],
                                                              sigma_head)
    t2 = time.perf_counter()
    timings = {"checks_s": round(t_checks, 3), "engine_setup_s": round(t_engine, 3), "setup_s": round(t_setup, 3),
               "predict_s": round(t_predict, 3), "stitch_s": round(t_reduce + t2 - t1, 3),
               "total_s": round(t2 - t_call, 3),
               # positions, whatever the draws (it counted predictions: "1219 patterns/s" for 406 with --uncertainty
               # 2, the figures audit, s41)
               "patterns_per_second": round((n - resumed_from) / max(t_predict, 1e-9), 1),
               **({"predictions_per_second": round((n - resumed_from) * draws / max(t_predict, 1e-9), 1)}
                  if draws > 1 else {})}
    rec = Reconstruction(phase.astype(np.float32), origin, full.astype(np.float32), timings,
                         model.record(),
                         {"stitching": stitching, "plane_removed": remove_plane,
                          **dose_info,
                          "removed_slope_rad_per_px": list(slopes), "precision": precision_used(precision, dev),
                          "device": str(dev),
                          "engine": engine if requested == engine else f"{engine} ({requested})", "input": (f"{model.in_channels} patterns: the 3×3 neighbourhood"
                                                      if neighbours is not None else "one pattern"),
                          # (what was reconstructed: from Python, metadata.json said nothing of it, the outputs audit)
                          "patterns": n, "pattern_shape": list(shape[1:]),
                          "positions_sha256": fingerprint["positions_sha256"],
                          "chunk_size": chunk_size, "resumed_from_pattern": resumed_from or None,
                          **({"empty_patterns": {"count": len(empty), "first": empty[:100]}} if empty else {}),
                          "patches_reduced_on": str(dev) if on_device else "cpu",
                          **({"ensemble": [model.name] + [m.name for m in members]} if members else {}),
                          "uncertainty": uncertainty, "pixel_size_angstrom": sampling},
                         spread)
    rec.metadata, rec.notes = ({"scan_checks": scan_checks, "notes": notes} if checks else {}), notes
    return rec


def more_empty_than_chance(count: int, read: int, dose: float | None) -> bool:
    """Whether ``count`` patterns zero everywhere among ``read`` are more than counting noise makes: at ``dose``
    electrons per pattern a pattern holds none with the probability exp(−dose) (at 5 e/pattern ~440 of 65,536, which
    were said to be frames never written: the review, s41). Without a dose (data not counted) any is."""
    if dose is None or not np.isfinite(dose):
        return count > 0
    expected = read * float(np.exp(-dose))
    return count > expected + 5 * np.sqrt(expected) + 0.5


def empty_patterns_note(empty: list[int], read: int) -> str:
    """A note on the positions whose pattern is zero everywhere (``empty``, frame numbers) among ``read`` patterns."""
    shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
    return (f"{len(empty):,} of the {read:,} patterns read are zero everywhere (frame{'s' * (len(empty) > 1)} "
            f"{shown}): frames never written (an acquisition stopped or still writing into a pre-allocated file, "
            "chunks missing from a zarr store) or dropped by the detector? The network has nothing to predict there, "
            "and the image is wrong around those positions (metadata.json lists the first 100 under "
            "processing.empty_patterns)")


def uncertainty_method(uncertainty) -> tuple[int, bool]:
    """``uncertainty`` (a number of dropout samples, "head" or None) as (dropout samples, σ head)."""
    if uncertainty is None:
        return 0, False
    if uncertainty == "head":
        return 0, True
    if isinstance(uncertainty, (int, np.integer)) and not isinstance(uncertainty, bool) and uncertainty >= 2:
        return int(uncertainty), False
    raise ValueRangeError(f"uncertainty: expected a number of dropout samples (≥ 2), 'head' or None, got "
                          f"{uncertainty!r}")


def with_source_divided_out(rec: Reconstruction, source_size_px: float, regularisation: float | None = None) -> Reconstruction:
    """``rec`` with a Gaussian source's blur divided out of its image (:func:`~.deblur.deconvolve_source`).

    A network trained on coherent patterns reconstructs the object seen through the source's jitter
    (benchmarks/RESULTS.md §38); given the source's size, this sharpens it back, using the dose the
    reconstruction read to choose the Wiener λ unless ``regularisation`` gives it. The uncertainty map, if
    any, stays that of the image before.
    """
    if not source_size_px:
        return rec
    dose = rec.processing.get("electrons_per_pattern")
    lam = source_regularisation(dose) if regularisation is None else regularisation
    full = deconvolve_source(rec.full, source_size_px, regularisation=lam).astype(np.float32)
    r0, c0 = rec.origin_px
    phase = full[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]]
    processing = {**rec.processing, "source_deconvolved": {
        "source_size_px": float(source_size_px),
        "wiener_regularisation": float(lam),
        "note": "the blur of a Gaussian source of this standard deviation divided out of the image (Wiener filter); "
                "the uncertainty map is the image's before"}}
    return replace(rec, phase=phase, full=full, processing=processing)


def reduce_on_device(device: torch.device, stitching: str) -> bool:
    """Whether patches are reduced for the stitcher where the network made them, not on the host.

    On a GPU, for the pairwise stitcher: its reductions (~0.12 kB a patch at the reference step) cross
    to the host instead of the patches (4 kB), and the products and binning run on the GPU. The other
    stitchers need every patch on the host. On a CPU both are the same place.
    """
    return device.type == "cuda" and stitching == "pairwise"


def dose_settings(deblur, stitching: str, amplitudes, model: PhaseModel) -> dict:
    """What the data's dose decides, for ``finish`` and metadata.json; shared with the cluster path.

    Returns ``electrons_per_pattern`` (None unless the patterns are whole counts), ``deblurred`` and
    ``deblur_reason``, and ``dose_note`` when the dose lies outside what the model was trained on.
    """
    dose = electrons_per_pattern(amplitudes)
    if dose == 0:
        raise ValueRangeError("data: the patterns read hold no counts (zero everywhere); expected diffraction "
                              "patterns")
    if stitching in DEBLURRED_STITCHERS:
        on, why = resolve_deblur(deblur, dose)
    elif deblur is True:  # (asked for and not done, said only in metadata.json: the outputs audit, s40)
        raise ValueRangeError(f"deblur: the {stitching!r} stitching is never deblurred (it reproduces the seed's "
                              "method); drop --deblur, or stitch with 'pairwise' or 'least-squares'")
    else:
        on, why = False, f"never for the {stitching!r} stitching"
    return {"electrons_per_pattern": None if dose is None else round(dose, 1), "deblurred": on,
            "deblur_reason": why, "dose_note": counts_note(amplitudes) or dose_note(model, dose)}


def dose_note(model: PhaseModel, dose: float | None) -> str | None:
    """A line for the user when the data's dose is far outside the model's training doses (else None)."""
    trained = model.info.get("dose")
    if dose is None or trained is None:
        return None
    lo, hi = (trained, trained) if np.isscalar(trained) else (min(trained), max(trained))
    if lo / 3 <= dose <= hi * 3:  # a factor 3 beyond the range: the network degrades gracefully nearby
        return None
    where = f"{lo:,.0f}–{hi:,.0f}" if hi > lo else f"{lo:,.0f}"
    return (f"the patterns hold {dose:,.0f} electrons on average, outside the {where} electrons per pattern "
            f"model {model.name!r} was trained on; expect it to degrade (deepphase train --dose MIN MAX makes "
            "a model for your dose)")


def counts_note(amplitudes, samples: int = 16) -> str | None:
    """A line when the "amplitudes" are counts: whole numbers above 1 (as square roots of counts are not), or whole
    multiples of one step, counts in a detector's units (×1.7 read as amplitudes gave 0.927 against 0.978, without
    a word: the outputs audit, s40)."""
    _, block = sample_patterns(amplitudes, samples)
    step = count_quantum(block)
    if step is None:
        return None
    if step == 1.0:
        return COUNTS_NOTE
    return (f"{GAIN_NOTE_START} {step:.4g}, as counts in a detector's units are (a gain of {step:.4g} "
            f"per electron?): reconstruct takes √counts, so pass np.sqrt(data / {step:.4g}) (or read the file with "
            f"--input counts --gain {step:.4g})")


#: How :func:`counts_note` begins for counts in a detector's units (the file's path says it in its own terms).
GAIN_NOTE_START = "the patterns are whole multiples of"
#: What :func:`counts_note` says (for arrays; :func:`~deepphase.reconstruction.from_file.reconstruct_file` says it
#: for a file's reader).
COUNTS_NOTE = ("the patterns are whole numbers, as counts are: reconstruct takes √counts, so pass np.sqrt(counts) "
               "(or deepphase.data.io.AmplitudeView(counts, 'counts'), which takes the roots a batch at a time, for "
               "data larger than memory)")


def make_accumulators(stitching: str, positions, mask, geometry, draws: int, folder: Path | None = None,
                      resume: bool = False, sigma_head: bool = False) -> list:
    """One accumulator per draw: a streaming :class:`PairwiseStitcher`, or a store of whole patches
    (memory-mapped in ``folder`` if given) for the stitchers that need them all.

    ``sigma_head``: one more at the end, a :class:`PairwiseStitcher` for the σ head's patches whatever
    the stitching (σ needs no offsets, only the blend, which it makes from small reductions).
    """
    if stitching == "pairwise":
        first = PairwiseStitcher(positions, mask, geometry)
        accumulators = [first] + [first.empty_copy() for _ in range(draws - 1)]  # the draws share the geometry
    else:
        accumulators = [_PatchStore(len(positions), geometry.output_px,
                                    folder / f"patches-{k}.npy" if folder else None, resume=resume)
                        for k in range(draws)]
    if sigma_head:
        accumulators.append(accumulators[0].empty_copy() if stitching == "pairwise"
                            else PairwiseStitcher(positions, mask, geometry))
    return accumulators


def finish(accumulators, positions, mask, model: PhaseModel, stitching: str, remove_plane: bool, members=(),
           sigma_scale: float | None = None, deblur: bool = True, dose: float | None = None, sigma_head: bool = False):
    """The steps after the last chunk, shared with the cluster path: stitch every draw, deblur it (not
    the seed's stitching), remove the plane, average an ensemble, crop, and turn the spread of the
    draws into σ (with the model's factor for ``dose`` electrons per pattern, if known).

    ``sigma_head``: the last accumulator holds the σ head's patches; σ is their blend (offsets zero, not
    deblurred: the deblurring undoes the blend's blur of the phase's detail, and σ has none to restore),
    times the head's factor.

    Returns ``(full, slopes, phase, origin, sigma, uncertainty record for metadata.json or None)``.
    """
    sigma_acc = None
    if sigma_head:
        accumulators, sigma_acc = accumulators[:-1], accumulators[-1]
    images = []
    for acc in accumulators:
        image = acc.image() if isinstance(acc, PairwiseStitcher) else stitch(acc.patches, positions, mask,
                                                                             model.geometry, method=stitching)
        if deblur and stitching in DEBLURRED_STITCHERS:
            image = deblur_blend(image, positions, model.geometry)
        images.append(subtract_plane(image) if remove_plane else (image, (0.0, 0.0)))
    if members:  # the ensemble's mean (each member's arbitrary offset removed first)
        with np.errstate(invalid="ignore"):  # NaN where no probe reached: the same in every member
            mean = np.mean(np.stack([image - np.nanmean(image) for image, _ in images]), axis=0)
        images = [(mean, images[0][1])] + images
    full, slopes = images[0]
    phase, origin = crop_to_coverage(full)
    if sigma_acc is not None:
        r0, c0 = origin
        spread = sigma_acc.image(offsets=False)[r0 : r0 + phase.shape[0], c0 : c0 + phase.shape[1]].astype(np.float32)
    else:
        spread = uncertainty_map(images, origin, phase.shape)
    if spread is None:
        return full, slopes, phase, origin, None, None
    scale_source = "given"
    if sigma_scale is None:
        from .uncertainty import sigma_scale_at

        sigma_scale, scale_source = (1.0, None) if members else sigma_scale_at(
            model, dose, method="head" if sigma_head else "dropout")
        scale_source = scale_source if sigma_scale != 1.0 else None
    spread *= np.float32(sigma_scale)
    if sigma_head:
        record = {"method": "σ head", "samples": 0, "sigma_scale": float(sigma_scale), "calibrated": bool(scale_source),
                  "note": "σ = sigma_scale × the blend of the network's predicted σ = √2·b (Laplace scale b) "
                          "patches, from the phase's own forward pass"
                          + (f" (factor {scale_source})" if scale_source else " (not calibrated)")}
    else:
        record = {"method": "ensemble" if members else "Monte Carlo dropout",
                  "samples": len(members) + 1 if members else len(accumulators) - 1,
                  "sigma_scale": float(sigma_scale), "calibrated": bool(scale_source),
                  "note": "σ = sigma_scale × the spread of the samples"
                          + (f" (factor {scale_source})" if scale_source else " (not calibrated)")}
    if not scale_source and not members:  # (the raw spread is far too small: it covered 7 % for 68 % on a test)
        note_to_caller(f"the uncertainty is not calibrated: model {model.name!r} has no fitted factor for "
                       f"{'its σ head' if sigma_head else 'Monte Carlo dropout'}, and the raw spread is usually far too "
                       "small; `deepphase calibrate-uncertainty --model FOLDER` fits one")
    return full, slopes, phase, origin, spread, record


def uncertainty_map(images: list, origin, shape) -> np.ndarray | None:
    """Per-pixel standard deviation of the samples ``images[1:]`` (dropout draws or ensemble members; each
    an (image, slopes) pair), each with its mean removed; ``images[0]`` is the image they qualify."""
    if len(images) < 2:
        return None
    samples = np.stack([image - np.nanmean(image) for image, _ in images[1:]])
    r0, c0 = origin
    return np.std(samples, axis=0)[r0 : r0 + shape[0], c0 : c0 + shape[1]].astype(np.float32)


def _weights_digest(model: PhaseModel) -> str:
    """SHA-256 of the network's weights (what makes two models the same for ``resume``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def earlier_outputs(out_dir: str | Path) -> set[str]:
    """The files of :data:`OUTPUT_FILES` and :data:`FIGURES` that an earlier run's metadata.json in ``out_dir`` names
    as its own (none where there is no such record)."""
    try:
        meta = json.loads((Path(out_dir) / "metadata.json").read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(meta, dict) or meta.get("phase_file") != "phase.npy":
        return set()
    names = {"metadata.json", "phase.npy", "phase.tif", "phase.emd", "phase.png"}  # (every run writes these)
    names |= {"uncertainty.npy"} if meta.get("uncertainty_file") else set()
    names |= set(meta.get("figures") or ()) & set(FIGURES)
    return names & {*OUTPUT_FILES, *FIGURES}


def check_output_folder(out_dir: str | Path, overwrite: bool = False, own: frozenset = frozenset()) -> Path:
    """Refuse to overwrite earlier results unless asked, and files of deepphase's output names that no earlier
    run made (named in no metadata.json there; ``own``: this run's, made already) even then: --overwrite once
    replaced a scan saved as phase.npy in --out, and removed a positions file named uncertainty.npy that the run
    had read (the outputs audit, s40). Returns the folder (created if needed)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"out: {str(out_dir)!r} exists and is not a folder")
    existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"out: {str(out_dir)!r} already holds {', '.join(existing)}; choose another folder or pass --overwrite"
        )
    if overwrite:
        claimed = earlier_outputs(out_dir) | set(own)
        foreign = [name for name in (*OUTPUT_FILES, *FIGURES) if (out_dir / name).exists() and name not in claimed]
        if foreign:
            these = "they are" if len(foreign) > 1 else "it is"
            raise OutputExistsError(
                f"out: {str(out_dir)!r} holds {', '.join(foreign)}, which no earlier reconstruction there wrote (no "
                f"metadata.json there names {'them' if len(foreign) > 1 else 'it'}), and {these} not replaced even "
                "with --overwrite, which replaces a run's own outputs only; move "
                f"{'them' if len(foreign) > 1 else 'it'} or choose another folder")
    return out_dir


@in_callers_words(out="out_dir")
def write_outputs(rec: Reconstruction, out_dir: str | Path, metadata: dict | None = None,
                  sampling: float | None = None, overwrite: bool = False, *, replacing=()) -> dict:
    """Write phase.npy, phase.tif, phase.emd, phase.png, uncertainty.npy (if ``rec`` has one) and metadata.json;
    each file appears complete or not at all.

    The files are made in a temporary folder inside ``out_dir`` and moved into place, metadata.json
    last, so an interrupted run never leaves a half-written set that looks finished.

    Parameters
    ----------
    rec : Reconstruction
        What :func:`reconstruct` (or :func:`~deepphase.reconstruction.from_file.reconstruct_file`) returned.
    out_dir : str or Path
        The folder to write into (made if missing).
    metadata : dict, optional
        Added to metadata.json last (its keys win; a ``"title"`` titles the PNG). Default: the result's own,
        ``rec.metadata`` (what its checks found).
    sampling : float, optional
        The pixel size in Å: the TIFF's, the EMD's and the scale bar's. Default: the one ``rec`` was made with.
    overwrite : bool
        Replace earlier results in ``out_dir`` (refused otherwise); an earlier run's output this one does not make
        (an uncertainty map; a figure of :data:`FIGURES` that ``metadata["figures"]`` does not name) is removed. A
        file of those names that no earlier run's metadata.json there names is not replaced even so.
    replacing : iterable of str
        Names of such files the caller knows as its own (an earlier run of its whose record it removed), which
        ``overwrite`` may replace.

    Returns
    -------
    dict
        The metadata written to metadata.json.
    """
    if not isinstance(rec, Reconstruction):
        raise ValueRangeError(f"rec: expected the Reconstruction that reconstruct returns, got {type(rec).__name__}")
    metadata = rec.metadata if metadata is None else metadata
    sampling = rec.processing.get("pixel_size_angstrom") if sampling is None else sampling
    if not isinstance(metadata, dict):
        raise ValueRangeError(f"metadata: expected a dict of what to record beside the image, got "
                              f"{type(metadata).__name__}")
    if sampling is not None and not (isinstance(sampling, (int, float, np.integer, np.floating))
                                     and not isinstance(sampling, bool) and np.isfinite(sampling) and sampling > 0):
        raise ValueRangeError(f"sampling: expected a positive pixel size in Å, got {sampling!r}")
    figures = set(metadata.get("figures") or ())  # (made by this run, beside the image)
    out_dir = check_output_folder(out_dir, overwrite, frozenset(figures) | frozenset(replacing))
    stale = [name for name in FIGURES if name not in figures and (out_dir / name).exists()]
    if stale and not overwrite:  # an earlier run's, which would contradict this run's metadata
        raise OutputExistsError(f"out: {str(out_dir)!r} already holds {', '.join(stale)}; choose another folder or "
                                "pass --overwrite")
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _write_outputs(rec, out_dir, metadata, sampling, stale)
    except BaseException:
        if made and not any(out_dir.iterdir()):  # (a folder this call made, left as it found it: absent)
            out_dir.rmdir()
        raise


def _write_outputs(rec: Reconstruction, out_dir: Path, metadata: dict, sampling: float | None, stale) -> dict:
    staging = Path(tempfile.mkdtemp(prefix=".deepphase-", dir=out_dir))
    try:
        save_npy(staging / "phase.npy", rec.phase)
        write_tiff(staging / "phase.tif", rec.phase, sampling)
        write_emd(staging / "phase.emd", rec.phase, sampling, rec.origin_px, rec.uncertainty)
        # (titled "reconstruction" alone before: which data, which model, the figures audit, s41)
        title = metadata.get("title") or (f"{Path(str(metadata['data'])).name}, model {rec.model_info.get('name')!r}"
                                          if metadata.get("data") else None)
        plot_phase(rec.phase, staging / "phase.png", sampling=sampling, title=title,
                   uncertainty=rec.uncertainty, uncertainty_source=uncertainty_source(rec.processing.get("uncertainty")))
        if rec.uncertainty is not None:
            save_npy(staging / "uncertainty.npy", rec.uncertainty)
        meta = {
            "package_version": __version__,
            "versions": package_versions(),
            "phase_file": "phase.npy",
            "other_formats": {"phase.tif": "32-bit float TIFF (ImageJ), pixel size in Å if known",
                              "phase.emd": "EMD 1.0 (HDF5, emdfile's layout) with dimension vectors in Å or pixels"},
            "phase_units": "rad (arbitrary constant offset)",
            **({"uncertainty_file": "uncertainty.npy", "uncertainty_units": "rad (one standard deviation)"}
               if rec.uncertainty is not None else {}),
            "origin_px": list(rec.origin_px),
            "shape": list(rec.phase.shape),
            "pixel_size_angstrom": sampling,
            "timings": rec.timings,
            "model": rec.model_info,
            "processing": rec.processing,
            **metadata,
        }
        save_json(staging / "metadata.json", meta)
        # An earlier run's metadata.json goes first: else an interruption among the moves below leaves this run's
        # image beside a record of the other that says it is complete (the failure audit, 6 of 6 tries).
        (out_dir / "metadata.json").unlink(missing_ok=True)
        for name in OUTPUT_FILES:  # metadata.json last: a folder with it is complete
            if (staging / name).exists():
                os.replace(staging / name, out_dir / name)
            elif (out_dir / name).exists():  # (overwrite) an earlier run's file this one does not make
                os.remove(out_dir / name)
        for name in stale:  # (overwrite) an earlier run's figure, after the metadata that no longer names it
            os.remove(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def write_tiff(path: Path, phase: np.ndarray, sampling: float | None = None) -> None:
    """A 32-bit float TIFF in ImageJ's layout, with the pixel size (Å) where it is known."""
    import tifffile

    kwargs = {}
    if sampling:
        kwargs = {"resolution": (1.0 / sampling, 1.0 / sampling), "metadata": {"unit": "Angstrom"}}
    with atomic_path(path, ".tif") as tmp:
        tifffile.imwrite(tmp, np.asarray(phase, dtype=np.float32), imagej=True, **kwargs)


def write_emd(path: Path, phase: np.ndarray, sampling: float | None, origin_px, uncertainty=None) -> None:
    """EMD 1.0 (HDF5) as emdfile (py4DSTEM's) writes an Array: ``/deepphase/phase`` holding ``data`` (rad) and
    ``dim0``/``dim1`` (row, col) in Å (``"A"``, py4DSTEM's spelling) or pixels; ``/deepphase/uncertainty`` alike.

    The dimension vectors are (start, start + step), emdfile's form of a linear axis, and start at the object pixel
    of ``phase[0, 0]`` (``origin_px``), so positions in the file are in the frame of the scan positions. Numbered
    from 0, as emdfile numbers them: rosettasciio (HyperSpy) reads such a file the right way round, where it
    transposes one numbered from 1 (the NCEM layout, written in Fortran order). Readable by emdfile/py4DSTEM,
    rosettasciio/HyperSpy and h5py.
    """
    import uuid

    import h5py

    from .. import __version__
    step, unit = (float(sampling), "A") if sampling else (1.0, "pixels")
    with atomic_path(path, ".emd") as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"emd_group_type": "file", "version_major": 1, "version_minor": 0, "UUID": str(uuid.uuid4()),
                        "authoring_program": f"deepphase {__version__}", "authoring_user": ""})
        root = f.create_group("deepphase")
        root.attrs.update({"emd_group_type": "root", "python_class": "Root"})
        for name, image in (("phase", phase), ("uncertainty", uncertainty)):
            if image is None:
                continue
            group = root.create_group(name)
            group.attrs.update({"emd_group_type": "array", "python_class": "Array"})
            data = group.create_dataset("data", data=np.asarray(image, dtype=np.float32))
            data.attrs["units"] = "rad"
            if name == "phase":
                data.attrs["note"] = "arbitrary constant offset"
            for axis, (label, start) in enumerate((("row", origin_px[0]), ("col", origin_px[1]))):
                dim = group.create_dataset(f"dim{axis}", data=np.array([start, start + 1.0]) * step)
                dim.attrs.update({"name": label, "units": unit})


def uncertainty_source(record: dict | None) -> str | None:
    """What a σ map is, in a few words for its figure (from ``processing["uncertainty"]``)."""
    if not record:
        return None
    factor = record.get("sigma_scale", 1.0)
    calibrated = record.get("calibrated", "not calibrated" not in record.get("note", ""))  # (older records: the note)
    how = {"σ head": "σ head", "ensemble": f"spread of {record.get('samples')} models",
           "Monte Carlo dropout": f"{record.get('samples')} dropout samples"}.get(record.get("method"), record.get("method"))
    return f"{how} × {factor:.3g}" + ("" if calibrated else ", not calibrated")


def plot_phase(phase: np.ndarray, path: Path, sampling: float | None = None, title: str | None = None,
               truth: np.ndarray | None = None, uncertainty: np.ndarray | None = None,
               uncertainty_source: str | None = None) -> None:
    """A PNG of the phase with a colour bar (rad) and a scale bar (Å if the sampling is known, else pixels); beside
    it the truth and the uncertainty map (σ, rad), where given (uncertainty.npy had no figure: outputs audit, s40).

    The reconstruction and the truth share one colour range (each had its own: equal colours were different phases,
    the figures audit, s41), from the 0.5th to the 99.5th percentile, so that a few edge pixels do not flatten the
    rest; σ runs from 0 to its 99th percentile, titled with ``uncertainty_source`` (what it is)."""
    from matplotlib import patheffects
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    from ..io_utils import new_figure

    centred = [image - np.nanmean(image) for image in (phase, truth) if image is not None]
    phase_range, sigma_range = colour_ranges(centred, uncertainty)
    panels = ([("reconstruction", centred[0], "magma", "phase (rad, mean removed)", phase_range)]
              + ([("truth", centred[1], "magma", "phase (rad, mean removed)", phase_range)] if truth is not None else [])
              + ([("uncertainty" + (f" ({uncertainty_source})" if uncertainty_source else ""), uncertainty, "viridis",
                   "σ (rad, one standard deviation)", sigma_range)] if uncertainty is not None else []))
    fig, axes = new_figure(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (label, image, cmap, unit_label, limits) in zip(axes[0], panels):
        im = ax.imshow(image, cmap=cmap, interpolation="nearest", **limits)
        ax.set_title(label if title is None or len(panels) > 1 else title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        # (a colour bar the image's own height, also for a wide scan, whose image is shorter than its axes box)
        fig.colorbar(im, cax=make_axes_locatable(ax).append_axes("right", size="5%", pad=0.08), label=unit_label,
                     extend=_extend(image, limits))
        length_px, unit = _scale_bar(image.shape[1], sampling)
        r, c = image.shape[0] * 0.92, image.shape[1] * 0.05
        # outlined in black: readable on the white of NaN corners (a turned scan's) as on the colour map
        outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
        ax.plot([c, c + length_px], [r, r], color="white", lw=3, solid_capstyle="butt",
                path_effects=[patheffects.withStroke(linewidth=5, foreground="black")])
        ax.text(c + length_px / 2, r - image.shape[0] * 0.03, unit, color="white", ha="center", va="bottom", fontsize=9,
                path_effects=outline)
    if title and len(panels) > 1:
        fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def colour_ranges(phases: list, uncertainty: np.ndarray | None) -> tuple[dict, dict]:
    """``vmin``/``vmax`` shared by the (mean-removed) phase images: their 0.5th to 99.5th percentile together; and of
    σ: 0 to its 99th percentile ({} without one)."""
    values = np.concatenate([image[np.isfinite(image)] for image in phases])
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    phase_range = {"vmin": float(lo), "vmax": float(hi if hi > lo else lo + 1e-6)}
    sigma_range = {}
    if uncertainty is not None and np.isfinite(uncertainty).any():
        top = float(np.nanpercentile(uncertainty, 99))
        sigma_range = {"vmin": 0.0, "vmax": top if top > 0 else float(np.nanmax(uncertainty)) or 1e-6}
    return phase_range, sigma_range


def _extend(image: np.ndarray, limits: dict) -> str:
    """A colour bar's arrows: which ends of the colour range some pixels lie beyond."""
    finite = image[np.isfinite(image)]
    below = bool(limits) and finite.size and finite.min() < limits["vmin"]
    above = bool(limits) and finite.size and finite.max() > limits["vmax"]
    return {(True, True): "both", (True, False): "min", (False, True): "max"}.get((bool(below), bool(above)), "neither")


def _scale_bar(width_px: int, sampling: float | None) -> tuple[float, str]:
    target = width_px / 5
    if sampling:
        length_a = target * sampling
        nice = _nice(length_a)
        return nice / sampling, f"{nice:g} Å"
    nice = _nice(target)
    return nice, f"{nice:g} px"


def _nice(x: float) -> float:
    exp = 10 ** np.floor(np.log10(x))
    for m in (5, 2, 1):
        if m * exp <= x:
            return float(m * exp)
    return float(exp)
