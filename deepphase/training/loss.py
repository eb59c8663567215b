"""Loss: L1 inside the illuminated mask, after removing each patch's mean inside the mask.

A constant phase does not change a diffraction pattern (|F(P·e^{i(φ+c)})| = |F(P·e^{iφ})|), so the
zero frequency of each patch cannot be recovered; the seed asked the network for the absolute phase
anyway, which only adds an irreducible error. We compare prediction and target with their means in
the mask removed, and the stitcher restores the offsets between patches. Unlike the seed's script,
every sample of the batch contributes.
"""

from __future__ import annotations

import torch

from ..models.registry import LOG_SCALE_RANGE


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


def laplace_nll(phase: torch.Tensor, log_scale: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                detach_phase: bool = True) -> torch.Tensor:
    """Negative log-likelihood of the offset-free error under a Laplace distribution of scale b per pixel.

    Per pixel ``|r|/b + log b`` (the constant log 2 dropped), averaged inside the mask over the batch,
    with ``r`` the residual after removing each patch's masked mean from ``phase`` and ``target`` (as
    :func:`masked_l1` does: the offset is not measurable, so it is no error) and ``b = exp(log_scale)``
    clamped to :data:`~deepphase.models.registry.LOG_SCALE_RANGE`. For a fixed residual the minimum over
    b is at ``b = |r|``; over many samples with the same predicted b, at the mean absolute residual, so
    b estimates the expected L1 error and the Laplace standard deviation ``√2·b`` the error's spread. The Laplace matches the L1
    loss the phase is trained with (its maximum-likelihood location is the median, as L1's).

    ``detach_phase`` (default) stops the gradient into the phase: the phase is then trained by the L1
    term alone and the NLL cannot buy a lower likelihood by down-weighting hard pixels (a large b
    shrinks their pull on the phase), which would make the phase worse where it is hardest.

    Parameters
    ----------
    phase, log_scale, target : (B, 1, h, w) or (B, h, w) tensors.
    mask : (h, w) illuminated mask.
    """
    m = mask.to(phase.dtype)
    if detach_phase:
        phase = phase.detach()
    r = remove_masked_mean(phase, mask) - remove_masked_mean(target, mask)
    log_b = log_scale.clamp(*LOG_SCALE_RANGE)
    nll = (r.abs() * torch.exp(-log_b) + log_b) * m
    return nll.sum() / (m.sum() * phase.shape[0] * (phase.shape[1] if phase.ndim == 4 else 1))

