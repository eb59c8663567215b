"""Reading 4D-STEM data for reconstruction: .npy (memory-mapped), our simulate .npz, and HDF5.

Data arrive as (N, k_row, k_col) frames with positions beside them, or as a
(scan_row, scan_col, k_row, k_col) array. Nothing is loaded whole that need not be: .npy is
memory-mapped and HDF5 datasets are read a batch at a time by the predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError, ShapeError, ValueRangeError

INPUT_KINDS = ("auto", "counts", "amplitude")


@dataclass
class ScanData:
    frames: object  # array-like (N, n, n): numpy, memmap or h5py dataset
    scan_shape: tuple[int, int] | None  # from a 4-D array
    kind: str | None  # "counts", "amplitude" or None (unknown)
    positions: np.ndarray | None = None
    truth: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    _handle: object = None  # an open h5py file, kept alive while frames are read

    def close(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _frames_from_array(array, source: str):
    if array.ndim == 4:
        r, c = array.shape[:2]
        return array.reshape(r * c, *array.shape[2:]) if isinstance(array, np.ndarray) else _Flat4D(array), (r, c)
    if array.ndim == 3:
        return array, None
    raise ShapeError(
        f"data: {source} has shape {array.shape}; expected (N, k, k) patterns or (scan_rows, scan_cols, k, k)"
    )


class _Flat4D:
    """A (R, C, k, k) h5py dataset seen as (R·C, k, k) frames, read a slice at a time."""

    def __init__(self, dataset):
        self.dataset = dataset
        r, c = dataset.shape[:2]
        self.shape = (r * c, *dataset.shape[2:])
        self.dtype = dataset.dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError("only slices are supported")
        start, stop, _ = index.indices(self.shape[0])
        cols = self.dataset.shape[1]
        rows = self.dataset[start // cols : (stop - 1) // cols + 1]
        flat = rows.reshape(-1, *self.shape[1:])
        offset = start - (start // cols) * cols
        return flat[offset : offset + stop - start]


def load_scan(path: str | Path, dataset: str | None = None) -> ScanData:
    """Open a 4D-STEM file: ``.npy``, the ``.npz`` written by ``deepphase simulate``, or HDF5 (``dataset`` path)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"data: file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise InputFileError(f"data: could not read {str(path)!r} as .npy ({exc})") from exc
        frames, scan_shape = _frames_from_array(array, str(path))
        return ScanData(frames, scan_shape, None, info={"format": "npy"})
    if suffix == ".npz":
        try:
            archive = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputFileError(f"data: could not read {str(path)!r} as .npz ({exc})") from exc
        for key, kind in (("amplitude", "amplitude"), ("counts", "counts")):
            if key in archive.files:
                frames, scan_shape = _frames_from_array(archive[key], f"{path}:{key}")
                positions = archive["positions"] if "positions" in archive.files else None
                truth = archive["truth"] if "truth" in archive.files else None
                return ScanData(frames, scan_shape, kind, positions, truth, {"format": "npz"})
        raise InputFileError(
            f"data: {str(path)!r} holds {archive.files}; expected an 'amplitude' or 'counts' array (as 'deepphase simulate' writes)"
        )
    if suffix in (".h5", ".hdf5", ".hdf", ".emd"):
        import h5py

        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise InputFileError(f"data: could not open {str(path)!r} as HDF5 ({exc})") from exc
        if dataset is None:
            found = []
            handle.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim in (3, 4) else None)
            if len(found) != 1:
                handle.close()
                raise InputFileError(
                    f"data: {str(path)!r} has {len(found)} 3-D/4-D datasets ({', '.join(found) or 'none'}); "
                    "name one with --dataset"
                )
            dataset = found[0]
        if dataset not in handle or not isinstance(handle[dataset], h5py.Dataset):
            handle.close()
            raise InputFileError(f"data: {str(path)!r} has no dataset {dataset!r}")
        ds = handle[dataset]
        if not np.issubdtype(ds.dtype, np.number) or np.issubdtype(ds.dtype, np.complexfloating):
            handle.close()
            raise ShapeError(f"data: dataset {dataset!r} has dtype {ds.dtype}; expected real numbers")
        frames, scan_shape = _frames_from_array(ds, f"{path}:{dataset}")
        return ScanData(frames, scan_shape, None, info={"format": "hdf5", "dataset": dataset}, _handle=handle)
    raise InputFileError(f"data: unknown file type {suffix!r} of {str(path)!r}; expected .npy, .npz or .h5/.hdf5")


def check_dtype(frames) -> None:
    dtype = np.dtype(frames.dtype)
    if dtype == np.bool_ or not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise ShapeError(f"data: expected real numeric diffraction patterns, got dtype {dtype}")


def infer_kind(frames, sample: int = 256) -> str:
    """Tell counts from amplitudes in data that does not say which.

    Counting detectors record integers; the square root of integer counts squares back to integers.
    Anything else is ambiguous and the user must say (``--input``) rather than have us guess.
    """
    check_dtype(frames)
    idx = np.unique(np.linspace(0, len(frames) - 1, min(sample, len(frames))).astype(int))
    block = np.concatenate([np.asarray(frames[int(i) : int(i) + 1], dtype=np.float64) for i in idx])
    for i, frame in zip(idx, block):
        check_patterns(frame[None], int(i))
    if np.all(np.abs(block - np.round(block)) < 1e-6):
        return "counts"
    squared = block**2
    if np.all(np.abs(squared - np.round(squared)) < 1e-3 * np.maximum(1, squared)):
        return "amplitude"
    raise ValueRangeError(
        "data: cannot tell whether the patterns are counts or amplitudes (values are neither integers nor square "
        "roots of integers); pass --input counts or --input amplitude"
    )


def check_patterns(batch: np.ndarray, first_index: int, what: str = "data") -> None:
    """Refuse NaN, Inf and negative values, naming the first bad frame."""
    finite = np.isfinite(batch).reshape(len(batch), -1).all(axis=1)
    if not finite.all():
        frame = first_index + int(np.argmin(finite))
        raise ValueRangeError(f"{what}: frame {frame} contains NaN or Inf values")
    negative = (batch < 0).reshape(len(batch), -1).any(axis=1)
    if negative.any():
        frame = first_index + int(np.argmax(negative))
        raise ValueRangeError(
            f"{what}: frame {frame} has negative values (min {batch[frame - first_index].min():.3g}); "
            "expected counts or amplitudes ≥ 0"
        )


class AmplitudeView:
    """Frames seen as diffraction amplitudes: sqrt of counts, or the amplitudes themselves."""

    def __init__(self, frames, kind: str):
        self.frames, self.kind = frames, kind
        self.shape = tuple(frames.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        batch = np.asarray(self.frames[index], dtype=np.float32)
        if self.kind == "counts":
            # Keep the sign so that the predictor's check names the frame with negative counts.
            return np.sign(batch) * np.sqrt(np.abs(batch))
        return batch
