"""Batched prediction: diffraction amplitudes → phase patches, one batch at a time on the device.

The input may be any array-like of shape (N, n, n) that can be sliced (a NumPy array, a memory map,
an h5py dataset, a lazily calibrated view): only ``batch_size`` patterns are read and sent to the
device at once. Reading and checking the next batch happens in a background thread while the
network works on the current one (PyTorch releases the GIL inside its kernels, and file reads release
it too), so neither the disk nor the network waits for the other.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.io import check_patterns
from ..errors import ShapeError, ValueRangeError
from ..models.modelfile import PhaseModel
from ..physics.geometry import output_mask

PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def _read_batch(amplitudes, start: int, stop: int, pin: bool) -> torch.Tensor:
    batch = np.asarray(amplitudes[start:stop], dtype=np.float32)
    check_patterns(batch, start)
    x = torch.from_numpy(np.array(batch, copy=True))[:, None]  # a copy: memory-mapped input is read-only
    return x.pin_memory() if pin else x


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
) -> np.ndarray:
    """Phase patches (N, out, out) float32, each with its mean inside the illuminated mask removed.

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
    """
    n = model.geometry.n_px
    if len(getattr(amplitudes, "shape", ())) != 3 or tuple(amplitudes.shape[1:]) != (n, n):
        raise ShapeError(f"amplitudes: expected shape (N, {n}, {n}), got {getattr(amplitudes, 'shape', None)}")
    if int(batch_size) < 1:
        raise ValueRangeError(f"batch_size: expected a positive number of patterns, got {batch_size}")
    device = torch.device(device)
    cast = _autocast_dtype(precision, device)
    network = model.network.to(device).eval()
    if mc_dropout_seed is not None:
        dropouts = [m for m in network.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
        if not dropouts:
            raise ValueRangeError(f"uncertainty: the model's architecture {model.arch!r} has no dropout to sample")
        for m in dropouts:
            m.train()
        torch.manual_seed(mc_dropout_seed)
    mask = torch.as_tensor(output_mask(model.probe, model.geometry), device=device, dtype=torch.float32)
    count = amplitudes.shape[0]
    out_px = model.geometry.output_px
    patches = np.empty((count, out_px, out_px), dtype=np.float32)
    starts = list(range(0, count, batch_size))
    pin = device.type == "cuda"
    with tqdm(total=count, desc="predicting", unit="pattern", disable=None if progress is None else not progress,
              leave=False) as bar, ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(_read_batch, amplitudes, 0, batch_size, pin) if starts else None
        for i, start in enumerate(starts):
            x = pending.result().to(device, non_blocking=True)
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                pending = reader.submit(_read_batch, amplitudes, nxt, nxt + batch_size, pin)
            with torch.autocast(device.type, dtype=cast or torch.float32, enabled=cast is not None):
                y = network(x)[:, 0].float()
            y = y - (y * mask).sum(dim=(-2, -1), keepdim=True) / mask.sum()
            patches[start : start + len(x)] = y.cpu().numpy()
            bar.update(len(x))
    network.eval()
    return patches
