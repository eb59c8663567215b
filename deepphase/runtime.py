"""Run-time choices shared by training and reconstruction (which device)."""

from __future__ import annotations

import torch

from .errors import DeepPhaseError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' → the first CUDA GPU if there is one, else the CPU; refuse a GPU that is not there."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise DeepPhaseError(f"device: {device!r} is not a torch device (expected 'auto', 'cpu' or 'cuda[:N]')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeepPhaseError(f"device: {device!r} was asked for, but no CUDA GPU is available here")
    return dev
