"""Run-time choices shared by training and reconstruction (which device, where the cache is)."""

from __future__ import annotations

import os
from pathlib import Path

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
    if dev.type not in ("cpu", "cuda"):
        raise DeepPhaseError(f"device: {device!r} is not one deepphase runs on; expected 'auto', 'cpu' or 'cuda[:N]'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeepPhaseError(f"device: {device!r} was asked for, but no CUDA GPU is available here")
    return dev


CACHE_ENV = "DEEPPHASE_CACHE_DIR"


def cache_dir() -> Path | None:
    """Where deepphase keeps what it can remake but would rather not (ONNX exports of networks in ``onnx/``,
    the evaluation's multislice simulations in ``multislice/``).

    ``$DEEPPHASE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/deepphase``, else ``~/.cache/deepphase``;
    ``None`` (no cache: everything is remade each run) when ``DEEPPHASE_CACHE_DIR=off``. Deleting the
    folder is always safe.
    """
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "deepphase"


#: The packages whose versions a result records (those installed): what computed it, and what read and wrote it.
RECORDED_PACKAGES = ("deepphase", "torch", "numpy", "scipy", "onnxruntime", "h5py", "rosettasciio", "libertem",
                     "abtem", "ase", "py4DSTEM")


def package_versions() -> dict:
    """``{package: version}`` of :data:`RECORDED_PACKAGES` that are installed, for a result's metadata."""
    import importlib.metadata as md

    out = {}
    for dist in RECORDED_PACKAGES:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
