"""Atomic file writing: outputs appear whole or not at all.

Each writer writes to a temporary name in the destination's folder and renames it into place
(``os.replace`` is atomic on one file system), so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # (the writer's host and pid in the name: a later cleanup removes only the temporaries of processes gone)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600), and a writer may replace the file it was given (safetensors
        # does): give what was written the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # (a write's error, a full disk's: names no file)
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


_HOST = socket.gethostname().replace("/", "_")


def remove_leftover_temporaries(folder: str | Path, names, locked: bool = False) -> None:
    """Remove the temporary files :func:`atomic_path` left beside ``names`` in ``folder`` when its process was killed
    outright (``kill -9``, a batch system's hard limit), where it could not clean up. A temporary of a process still
    running on this machine, or of another machine's, is left alone (it may be a concurrent writer's) unless the
    caller holds the folder's lock (``locked``: no other writer there; a job resumed on another node)."""
    import glob
    import re

    for name in names:
        for leftover in Path(folder).glob(f".{glob.escape(name)}.*.tmp"):
            writer = re.match(rf"\.{re.escape(name)}\.(.+)-(\d+)-[^-]+\.tmp$", leftover.name)
            if not locked and writer and (writer[1] != _HOST or _process_alive(int(writer[2]))):
                continue
            leftover.unlink(missing_ok=True)


#: Held in a folder while a run writes into it (:func:`folder_lock`).
LOCK_FILE = ".deepphase-lock"
#: Set by a process that holds a folder's lock for the processes it starts (``deepphase train --nproc``'s ranks):
#: the folder, resolved.
LOCK_HELD_FOR_US = "DEEPPHASE_FOLDER_LOCK_HELD"


@contextmanager
def folder_lock(folder: str | Path, what: str = "out"):
    """Hold ``folder``'s :data:`LOCK_FILE` while a run writes into it: a second run into the same folder is refused
    (two runs shared its progress and both "succeeded", the failure audit, s36). A lock left by a process of this
    machine that is gone (``kill -9``) is taken over, also when its process number now belongs to another process
    (the lock records the process's start, where the system tells it). A folder made here and left empty is
    removed again."""
    import time

    from .errors import OutputExistsError

    folder = Path(folder)
    if os.environ.get(LOCK_HELD_FOR_US) == str(folder.resolve()):
        yield  # (the process that started this one holds it)
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    host = _HOST
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and holder[1] == host and not _process_alive(holder[0], holder[2]):
                lock.unlink(missing_ok=True)  # (its process is gone: the lock is stale)
                continue
            said = (f"process {holder[0]} on {holder[1]}, since {time.ctime(lock.stat().st_mtime)}"
                    if holder is not None else "a lock of an unknown kind")
            raise OutputExistsError(f"{what}: another deepphase run is writing into {str(folder)!r} ({said}); wait "
                                    f"for it to finish or choose another folder (if no run is going, remove "
                                    f"{str(lock)!r})") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {host} {_process_start(os.getpid()) or ''}".rstrip() + "\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _lock_holder(lock: Path) -> tuple[int, str, str | None] | None:
    """The pid, host and process start (None if not recorded) a lock file names."""
    try:
        pid, host, *start = lock.read_text().split()
        if len(start) > 1:
            return None
        return int(pid), host, (start[0] if start else None)
    except (OSError, ValueError):  # (being written this instant, or not ours)
        return None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started, in the kernel's clock ticks since boot (Linux), or None where it cannot be
    read: with the pid it names one process, where a pid alone is reused once its process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]  # (field 22; the name before ")" may hold spaces)
    except (OSError, ValueError, IndexError):
        return None


def _process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this machine runs, and, if ``start`` is given (:func:`_process_start`), is the
    process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process)
        pass
    if start is not None:
        now = _process_start(pid)
        return now is None or now == start
    return True


#: Marks a folder from a run's claim until its set is complete: what a run interrupted there (or killed) wrote, the
#: next run may replace (it was allowed to write it, and its record never came).
UNFINISHED_MARK = ".deepphase-unfinished"


@contextmanager
def unfinished_mark(folder: Path, names):
    """Hold ``folder``'s :data:`UNFINISHED_MARK` through the block; left behind if the block fails after writing any of
    ``names`` (the files, or folders, of the set)."""
    mark = Path(folder) / UNFINISHED_MARK
    mark.touch()
    try:
        yield
    except BaseException:
        if not any((Path(folder) / name).exists() for name in names):
            mark.unlink(missing_ok=True)  # (nothing written: nothing to replace)
        raise
    mark.unlink(missing_ok=True)


def check_writable(path: str | Path, what: str = "out", folder: bool = True) -> Path:
    """Refuse an output path that cannot be written, before any work is spent on it.

    ``folder``: ``path`` is a folder to write into (made later if missing), else a file to write. The nearest
    folder that exists is tried with a temporary file: permissions, read-only mounts and a file standing where a
    folder must be are all found here rather than after the work.
    """
    from .errors import OutputExistsError

    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputExistsError(f"{what}: {str(path)!r} exists and is not a folder; expected a folder to write into")
    if not folder and path.is_dir():
        raise OutputExistsError(f"{what}: {str(path)!r} is a folder; expected a file name")
    existing = path if folder else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputExistsError(f"{what}: cannot write {str(path)!r}: {str(existing)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise OutputExistsError(f"{what}: cannot write into {str(existing)!r} ({exc.strerror or exc}); choose a "
                                "folder you can write to") from None
    return path


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path, ".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def new_figure(nrows: int = 1, ncols: int = 1, figsize=None, **subplots):
    """A figure and its axes made without pyplot: no backend is chosen or switched, so a notebook's inline plots
    keep working after deepphase has drawn its PNGs. ``subplots``: as for ``Figure.subplots``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplots)


def save_png(fig, path: str | Path, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG, written atomically; a pyplot figure is closed."""
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot (a benchmark's): let it go
        import matplotlib.pyplot as plt

        plt.close(fig)


def save_json(path: str | Path, obj) -> None:
    """JSON as the standard has it: NaN and ±Inf (not JSON; other readers refuse the file) are written as null."""
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(_standard(obj), indent=2, default=_json_default, allow_nan=False) + "\n")


def _standard(obj):
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _standard(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_standard(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return _standard(obj.tolist())
    return obj


def save_npz(path: str | Path, **arrays) -> None:
    with atomic_path(path, ".npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
