"""Run-time choices shared by training and reconstruction (which device, where the cache is)."""

from __future__ import annotations

import functools
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
    """``{package: version}`` of :data:`RECORDED_PACKAGES` that are installed, for a result's metadata, and
    ``deepphase_git_revision`` where deepphase runs from a git checkout (:func:`source_revision`)."""
    import importlib.metadata as md

    out = {}
    for dist in RECORDED_PACKAGES:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    revision = source_revision()
    if revision is not None:
        out["deepphase_git_revision"] = revision
    return out


@functools.lru_cache(maxsize=1)
def source_revision() -> str | None:
    """The git commit of the deepphase source in use, ``-dirty`` if the package's tracked files differ from it, where deepphase
    runs from a git checkout (``pip install -e``); None otherwise (an installed wheel: its version says it).

    The version alone (0.1.0 for every commit of a checkout) cannot say which code made a result (the
    evaluation audit, s41)."""
    import subprocess

    package = Path(__file__).resolve().parent
    if not (package.parent / ".git").exists():
        return None
    # The commit's hash (describe would give a tag's name once there are tags), and "-dirty" for the package's own
    # files only (a changed RESULTS.md is no other code); --no-optional-locks: reading never writes .git/index (the
    # review, s41).
    git = ["git", "--no-optional-locks", "-C", str(package.parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        changed = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", str(package)], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("-dirty" if changed.returncode == 1 else "")
