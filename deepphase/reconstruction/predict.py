"""Batched prediction: diffraction amplitudes → phase patches, one batch at a time on the device.

The input may be any array-like of shape (N, n, n) that can be sliced (a NumPy array, a memory map,
an h5py dataset, a lazily calibrated view): only ``batch_size`` patterns are read and sent to the
device at once. Reading and checking the next batch happens in a background thread while the
network works on the current one (PyTorch releases the GIL inside its kernels, and file reads release
it too), so neither the disk nor the network waits for the other.

Chunks: ``start`` and ``stop`` predict only the positions ``start .. stop-1`` of the scan, so a
caller can go chunk by chunk through a lazy input. A neighbourhood model (``model.in_channels = 9``)
takes each position's 3×3 neighbourhood of patterns (see :mod:`.neighbourhood`); give it
``neighbours``, the (N, 9) index array of :func:`.neighbourhood.neighbour_indices` for the whole scan
or the chunk's rows of it (or the (N, 2) positions, from which it is built, once per call). The
neighbours of a chunk's positions
may lie anywhere in ``amplitudes``; they are read as a few contiguous slices around the chunk, so
lazy inputs that can only be sliced work too.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.io import check_patterns
from ..errors import ShapeError, ValueRangeError
from ..models.modelfile import PhaseModel
from ..models.registry import has_sigma_head, sigma_from_log_scale
from ..physics.geometry import output_mask

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


# Frames between two needed ones that are read anyway rather than starting a new slice.
_GAP = 64


def _read_batch(amplitudes, start: int, stop: int, pin: bool, neighbours: np.ndarray | None = None,
                base: int = 0, empty: list | None = None) -> torch.Tensor:
    """Patterns of positions ``start .. stop-1``: (B, 1, n, n), or (B, C, n, n) gathered by ``neighbours``.

    Row ``i`` of ``neighbours`` belongs to position ``base + i``. ``empty``: a list the positions (numbered as
    ``start``) whose own pattern is zero everywhere are added to.
    """
    # A view of part of a scan (the pipeline's chunk) says where it starts, so errors name the scan's frame.
    first = getattr(amplitudes, "first_frame", 0)
    if neighbours is None:
        batch = np.asarray(amplitudes[start:stop], dtype=np.float32)
        check_patterns(batch, first + start)
        own = batch
        x = torch.from_numpy(np.array(batch, copy=True))[:, None]  # a copy: memory-mapped input is read-only
    else:
        gathered = _gather(amplitudes, neighbours[start - base : stop - base], first)
        own = gathered[:, gathered.shape[1] // 2]  # (the centre channel: the position's own pattern)
        x = torch.from_numpy(gathered)
    if empty is not None:
        empty.extend((start + np.flatnonzero(~own.reshape(len(own), -1).any(axis=1))).tolist())
    return x.pin_memory() if pin else x


def _gather(amplitudes, index: np.ndarray, first: int = 0) -> np.ndarray:
    """``amplitudes[index]`` for an integer array ``index`` (B, C), read as contiguous slices, float32.

    ``first``: the scan frame of ``amplitudes[0]``, for error messages."""
    wanted = np.unique(index)
    breaks = np.flatnonzero(np.diff(wanted) > _GAP) + 1
    blocks, read = [], []
    for run in np.split(wanted, breaks):
        lo, hi = int(run[0]), int(run[-1]) + 1
        block = np.asarray(amplitudes[lo:hi], dtype=np.float32)
        check_patterns(block, first + lo)
        blocks.append(block)
        read.append(np.arange(lo, hi))
    frames = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    return np.ascontiguousarray(frames[np.searchsorted(np.concatenate(read), index)])


def _resolve_neighbours(model: PhaseModel, neighbours, count: int, start: int, stop: int) -> tuple[np.ndarray | None, int]:
    """The index array a multi-pattern model needs and the position of its first row.

    (None, 0) for a single-pattern model; (N, C) rows from position 0, or (stop - start, C) rows from
    ``start`` when the caller gave only the chunk's.
    """
    channels = model.in_channels
    if channels == 1:
        return None, 0  # single-pattern input: neighbours (or positions) are accepted and not needed
    step = (model.neighbourhood or {}).get("step_px")
    if neighbours is None:
        raise ValueRangeError(
            f"neighbours: model {model.name!r} takes a {int(round(channels ** 0.5))}×{int(round(channels ** 0.5))} "
            f"neighbourhood of patterns per position (trained at a scan step of {step} px); pass the scan "
            "positions (N, 2) or neighbour_indices(positions, ...) (N, 9) as neighbours"
        )
    neighbours = np.asarray(neighbours)
    if neighbours.ndim == 2 and neighbours.shape == (count, 2):
        from .neighbourhood import neighbour_indices

        return neighbour_indices(neighbours, step, size=int(round(channels ** 0.5))), 0
    rows = {count: 0, stop - start: start}
    if neighbours.ndim != 2 or neighbours.shape[1] != channels or neighbours.shape[0] not in rows or not (
            np.issubdtype(neighbours.dtype, np.integer)):
        raise ShapeError(
            f"neighbours: expected the positions ({count}, 2), or an integer index array with {channels} columns and "
            f"a row per pattern ({count}) or per predicted position ({stop - start}), got {neighbours.dtype} of "
            f"shape {neighbours.shape}"
        )
    if neighbours.size and (neighbours.min() < 0 or neighbours.max() >= count):
        raise ValueRangeError(
            f"neighbours: indices must lie in 0..{count - 1} (the patterns), found {neighbours.min()}..{neighbours.max()}"
        )
    return neighbours.astype(np.int64, copy=False), rows[neighbours.shape[0]]


def check_sigma_head(model: PhaseModel) -> None:
    """Refuse σ-head uncertainty from a model without the head, saying what to do instead."""
    if not has_sigma_head(model.network):
        raise ValueRangeError(f"uncertainty: 'head' needs a model trained with a σ head (deepphase train --sigma-head); "
                              f"model {model.name!r} has none: use Monte Carlo dropout instead (--uncertainty N, its "
                              "factor fitted by 'deepphase calibrate-uncertainty --method dropout')")


def precision_used(precision: str, device) -> str:
    """What ``precision`` runs as on ``device``: "float32", "bfloat16" or "float16" ("auto" resolved and said)."""
    cast = _autocast_dtype(precision, torch.device(device))
    used = "float32" if cast is None else str(cast).removeprefix("torch.")
    return used if precision == used else f"{used} ({precision})"


def _autocast_dtype(precision: str, device: torch.device):
    if precision not in PRECISIONS:
        raise ValueRangeError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        # Half precision only where it is fast and its rounding (~0.4 % for bf16) is far below the
        # network's own error; CPUs without bf16 units run it slower than float32.
        return torch.bfloat16 if device.type == "cuda" else None
    return None if precision == "float32" else getattr(torch, precision)


@torch.inference_mode()
def predict_patches(
    model: PhaseModel,
    amplitudes,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    precision: str = "auto",
    mc_dropout_seed: int | None = None,
    start: int = 0,
    stop: int | None = None,
    neighbours=None,
    runner=None,
    sigma: bool = False,
    on_device: bool = False,
    on_batch=None,
    empty: list | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Phase patches (stop - start, out, out) float32, each with its mean inside the illuminated mask removed.

    Parameters
    ----------
    model : PhaseModel
    amplitudes : array-like (N, n, n)
        Square roots of the counts (the network's input).
    batch_size : patterns per forward pass.
    device : where the network runs.
    progress : show a progress bar (None: only on a terminal).
    precision : "auto" (bfloat16 on a GPU, float32 on a CPU), "float32", "bfloat16" or "float16".
    mc_dropout_seed : if given, the network's dropout layers stay active (Monte Carlo dropout, batch
        normalisation still in inference mode) and draw from this seed: one sample of the predictive
        distribution per call.
    start, stop : predict positions ``start .. stop-1`` only (default: all N); the patches of a chunk
        equal the same rows of a prediction of the whole scan.
    neighbours : for a neighbourhood model (``model.in_channels > 1``), the (N, 9) frame indices of each
        position's neighbourhood (:func:`deepphase.reconstruction.neighbourhood.neighbour_indices`,
        computed once per scan), or only the chunk's rows of it, (stop - start, 9), or the (N, 2) scan
        positions to compute it from. The indices point into ``amplitudes``: a caller that holds only
        frames ``lo .. hi-1`` of a scan (a chunk and its halo) passes those frames, ``start - lo``,
        ``stop - lo`` and the chunk's rows minus ``lo``. Ignored by a single-pattern model, so a caller
        may always pass it.
    runner : the network prepared by :func:`deepphase.reconstruction.engines.prepare_network` (channels-last,
        compiled, ONNX Runtime) on ``device``, called instead of ``model.network``; prepare it once and
        pass it to every chunk. Not with ``mc_dropout_seed`` (the samples need the network itself).
    sigma : also return the σ head's per-pixel standard deviation patches (√2·b of its Laplace scale b,
        rad; nothing removed), from the same forward pass: ``(patches, sigma_patches)``. Only for a model
        trained with a σ head (``deepphase train --sigma-head``).
    on_device : return float32 torch tensors left on ``device`` instead of NumPy arrays: on a GPU the
        patches then never cross to the host, and :meth:`~deepphase.reconstruction.stitching.PairwiseStitcher.reduce`
        reduces them there (the pipeline does this on CUDA).
    on_batch : called with the number of patterns after each forward pass (a caller's own progress bar).
    empty : a list to which the positions (numbered as ``start``) whose own pattern is zero everywhere are added:
        a frame never written (a pre-allocated HDF5 dataset, a zarr store missing a chunk file, a dropped frame)
        gives the network nothing to predict from.
    """
    n = model.geometry.n_px
    if len(getattr(amplitudes, "shape", ())) != 3 or tuple(amplitudes.shape[1:]) != (n, n):
        raise ShapeError(f"amplitudes: expected shape (N, {n}, {n}), got {getattr(amplitudes, 'shape', None)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueRangeError(f"batch_size: expected a positive whole number of patterns, got {batch_size!r}")
    batch_size = int(batch_size)
    total = amplitudes.shape[0]
    stop = total if stop is None else int(stop)
    start = int(start)
    if not 0 <= start <= stop <= total:
        raise ValueRangeError(f"start, stop: expected 0 <= start <= stop <= {total} (the patterns), got {start}, {stop}")
    if sigma:
        check_sigma_head(model)
    index, base = _resolve_neighbours(model, neighbours, total, start, stop)
    device = torch.device(device)
    cast = _autocast_dtype(precision, device)
    network = model.network.to(device).eval()
    if runner is not None and mc_dropout_seed is not None:
        raise ValueRangeError("runner: Monte Carlo dropout samples run the network itself; pass no runner")
    run = runner if runner is not None else network
    if mc_dropout_seed is not None:
        dropouts = [m for m in network.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
        if not dropouts:
            raise ValueRangeError(f"uncertainty: the model's architecture {model.arch!r} has no dropout to sample")
        for m in dropouts:
            m.train()
        torch.manual_seed(mc_dropout_seed)
    mask = torch.as_tensor(output_mask(model.probe, model.geometry), device=device, dtype=torch.float32)
    count = stop - start
    out_px = model.geometry.output_px
    if on_device:
        patches = torch.empty((count, out_px, out_px), dtype=torch.float32, device=device)
    else:
        patches = np.empty((count, out_px, out_px), dtype=np.float32)
    sigmas = (torch.empty_like(patches) if on_device else np.empty_like(patches)) if sigma else None
    host = (lambda t: t) if on_device else (lambda t: t.cpu().numpy())
    starts = list(range(start, stop, batch_size))
    pin = device.type == "cuda"

    def read(first: int):
        return reader.submit(_read_batch, amplitudes, first, min(first + batch_size, stop), pin, index, base, empty)

    with tqdm(total=count, desc="predicting", unit="pattern", disable=None if progress is None else not progress,
              leave=False) as bar, ThreadPoolExecutor(max_workers=1) as reader:
        pending = read(starts[0]) if starts else None
        for i, first in enumerate(starts):
            x = pending.result().to(device, non_blocking=True)
            if i + 1 < len(starts):
                pending = read(starts[i + 1])
            with torch.autocast(device.type, dtype=cast or torch.float32, enabled=cast is not None):
                out = run(x)
            y = out[:, 0].float()
            y = y - (y * mask).sum(dim=(-2, -1), keepdim=True) / mask.sum()
            patches[first - start : first - start + len(x)] = host(y)
            if sigma:
                sigmas[first - start : first - start + len(x)] = host(sigma_from_log_scale(out[:, 1].float()))
            bar.update(len(x))
            if on_batch is not None:
                on_batch(len(x))
    network.eval()
    return (patches, sigmas) if sigma else patches
