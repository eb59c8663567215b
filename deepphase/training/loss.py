"""Loss: L1 inside the illuminated mask, after removing each patch's mean inside the mask.

A constant phase does not change a diffraction pattern (|F(P·e^{i(φ+c)})| = |F(P·e^{iφ})|), so the
zero frequency of each patch cannot be recovered; the seed asked the network for the absolute phase
anyway, which only adds an irreducible error. We compare prediction and target with their means in
the mask removed, and the stitcher restores the offsets between patches. Unlike the seed's script,
every sample of the batch contributes.
"""

from __future__ import annotations

import torch


def remove_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subtract from each patch its mean inside ``mask`` (broadcast over the leading axes)."""
    m = mask.to(x.dtype)
    mean = (x * m).sum(dim=(-2, -1), keepdim=True) / m.sum()
    return x - mean


LOSSES = ("offset-free", "absolute")


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
              offset_free: bool = True) -> torch.Tensor:
    """Mean absolute phase error (rad) inside the mask over the whole batch.

    ``offset_free`` (default) removes each patch's masked mean from prediction and target first;
    ``False`` is the seed's loss on the absolute phase (kept to reproduce the seed's recipe).
    """
    m = mask.to(prediction.dtype)
    if offset_free:
        prediction, target = remove_masked_mean(prediction, mask), remove_masked_mean(target, mask)
    diff = (prediction - target).abs() * m
    return diff.sum() / (m.sum() * prediction.shape[0] * (prediction.shape[1] if prediction.ndim == 4 else 1))
