"""Batched prediction: diffraction amplitudes → phase patches, one batch at a time on the device.

The input may be any array-like of shape (N, n, n) that can be sliced (a NumPy array, a memory map,
an h5py dataset): only ``batch_size`` patterns are read and sent to the device at once.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.io import check_patterns
from ..errors import ShapeError
from ..models.modelfile import PhaseModel
from ..physics.geometry import output_mask


@torch.inference_mode()
def predict_patches(
    model: PhaseModel,
    amplitudes,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
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
    """
    n = model.geometry.n_px
    if len(getattr(amplitudes, "shape", ())) != 3 or tuple(amplitudes.shape[1:]) != (n, n):
        raise ShapeError(f"amplitudes: expected shape (N, {n}, {n}), got {getattr(amplitudes, 'shape', None)}")
    network = model.network.to(device).eval()
    mask = torch.as_tensor(output_mask(model.probe, model.geometry), device=device, dtype=torch.float32)
    count = amplitudes.shape[0]
    out_px = model.geometry.output_px
    patches = np.empty((count, out_px, out_px), dtype=np.float32)
    with tqdm(total=count, desc="predicting", unit="pattern", disable=None if progress is None else not progress,
              leave=False) as bar:
        for start in range(0, count, batch_size):
            batch = np.asarray(amplitudes[start : start + batch_size], dtype=np.float32)
            check_patterns(batch, start)
            x = torch.tensor(batch, device=device)[:, None]  # a copy: memory-mapped input is read-only
            y = network(x)[:, 0]
            y = y - (y * mask).sum(dim=(-2, -1), keepdim=True) / mask.sum()
            patches[start : start + len(batch)] = y.float().cpu().numpy()
            bar.update(len(batch))
    return patches
