"""Which patterns form each position's neighbourhood: an (N, size²) index array from the scan positions.

A neighbourhood model (``in_channels = 9``, see :mod:`deepphase.data.stream`) takes, for every scan
position, the patterns one scan step away along the rows, the columns and the diagonals, in the
channel order of :func:`deepphase.data.stream.neighbourhood_offsets` (channel 4 is the position
itself). The scan geometry comes from the positions alone, not from a scan shape or frame order: the
neighbour at offset ``(dr, dc)`` is the position nearest to ``p + (dr, dc)·step``, accepted if it lies
within ``tolerance·step`` of it. So any frame order (row or column fastest, serpentine) and missing
frames work; a rotated scan or one with another step is refused with what was found.

Edges: where a neighbour does not exist (the first and last scan rows and columns, or a missing
frame) the nearest existing position stands in, as image padding by replication does: the missing
step along an axis is not taken, so a position on the left edge uses itself for its left neighbours
and its upper and lower neighbours for the upper-left and lower-left ones.
"""

from __future__ import annotations

import numpy as np

from ..data.stream import neighbourhood_offsets
from ..errors import ShapeError, ValueRangeError


def neighbour_indices(positions, step_px: float, size: int = 3, tolerance: float = 0.3,
                      step_rtol: float = 0.1) -> np.ndarray:
    """Frame indices of every position's ``size × size`` neighbourhood, (N, size²) int64.

    Parameters
    ----------
    positions : (N, 2) array
        Top-left corners of the probe windows (row, col) in real-space pixels.
    step_px : float
        The scan step the model was trained at (``model.neighbourhood["step_px"]``).
    size : int
        Positions per side of the neighbourhood (3).
    tolerance : float
        A neighbour is accepted within ``tolerance · step_px`` of where a raster puts it.
    step_rtol : float
        The data's measured step along the rows and the columns must be within this fraction of
        ``step_px``.

    Returns
    -------
    Row ``i`` holds the frame index of each channel of position ``i``; column ``size² // 2`` is ``i``.

    Raises
    ------
    ShapeError
        If the positions are not (N, 2), or too few to form a raster along both axes.
    ValueRangeError
        If the positions are not a raster along the rows and columns with about ``step_px``.
    """
    from scipy.spatial import cKDTree

    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 2 or len(positions) < 1:
        raise ShapeError(f"positions: expected an (N, 2) array of (row, col), got shape {positions.shape}")
    if not np.all(np.isfinite(positions)):
        raise ValueRangeError("positions: contain NaN or Inf")
    if not step_px > 0:
        raise ValueRangeError(f"step_px: expected a positive scan step in pixels, got {step_px}")
    offsets = neighbourhood_offsets(size)
    count = len(positions)
    own = np.arange(count)
    if size == 1:
        return own[:, None]
    tree = cKDTree(positions)
    radius = tolerance * step_px

    def lookup(shift) -> np.ndarray:
        """Index of the position at ``p + shift`` for every p, or -1 where none is within ``radius``."""
        dist, idx = tree.query(positions + shift, distance_upper_bound=radius)
        return np.where(np.isfinite(dist), idx, -1)

    # One step along each axis first: these define the raster and its edges.
    axis_steps = {}
    for axis in (0, 1):
        for sign in (-1, 1):
            shift = np.zeros(2)
            shift[axis] = sign * step_px
            axis_steps[axis, sign] = lookup(shift)
    _check_raster(positions, axis_steps, step_px, step_rtol, tree)

    def walk(start: np.ndarray, axis: int, steps: int) -> np.ndarray:
        """Move ``steps`` raster steps along ``axis`` from ``start``, staying put where no position is."""
        at = start.copy()
        for _ in range(abs(steps)):
            nxt = axis_steps[axis, int(np.sign(steps))][at]
            at = np.where(nxt >= 0, nxt, at)
        return at

    out = np.empty((count, len(offsets)), dtype=np.int64)
    for k, (dr, dc) in enumerate(offsets):
        if dr == 0 and dc == 0:
            out[:, k] = own
            continue
        if abs(dr) + abs(dc) == 1:
            direct = axis_steps[0, int(dr)] if dc == 0 else axis_steps[1, int(dc)]
        else:
            direct = lookup(np.array([dr, dc], dtype=float) * step_px)
        # Replicate at the edges: rows first, then columns (the same for a rectangular raster either way).
        fallback = walk(walk(own, 0, int(dr)), 1, int(dc))
        out[:, k] = np.where(direct >= 0, direct, fallback)
    return out


def _check_raster(positions, axis_steps, step_px, step_rtol, tree) -> None:
    """Refuse positions that are not a raster along the rows and columns with about ``step_px``."""
    count = len(positions)
    found = {}
    measured = {}
    for axis, name in ((0, "rows"), (1, "columns")):
        has = (axis_steps[axis, -1] >= 0) | (axis_steps[axis, 1] >= 0)
        found[name] = float(has.mean()) if count else 0.0
        forward = axis_steps[axis, 1]
        ok = forward >= 0
        if ok.any():
            measured[axis, name] = np.median(positions[forward[ok]] - positions[ok], axis=0)
    if count < 4 or min(found.values()) < 0.5:
        raise ValueRangeError(
            f"positions: a neighbourhood model needs a raster scan along the rows and columns with a step of "
            f"{step_px:.4g} px (the step it was trained at); {_describe(positions, tree)}, and only "
            f"{found['rows']:.0%} of the {count} positions have a neighbour one step along the rows and "
            f"{found['columns']:.0%} along the columns (expected nearly all; a scan needs at least 2 rows and "
            "2 columns, unrotated against the real-space grid)"
        )
    for (axis, name), vector in measured.items():
        expected = np.zeros(2)
        expected[axis] = step_px
        if np.linalg.norm(vector - expected) > step_rtol * step_px:
            length = float(np.linalg.norm(vector))
            angle = float(np.degrees(np.arctan2(vector[1 - axis], vector[axis])))
            raise ValueRangeError(
                f"positions: one scan step along the {name} is ({vector[0]:.4g}, {vector[1]:.4g}) px (row, col), "
                f"{length:.4g} px at {angle:.1f}° to the {name[:-1]} axis, but the neighbourhood model was trained "
                f"on a raster of ({expected[0]:.4g}, {expected[1]:.4g}) px (more than {step_rtol:.0%} of a step "
                "apart); use a model trained at this step, or rotate the positions onto the real-space axes"
            )


def _describe(positions, tree) -> str:
    """The positions' nearest-neighbour spacing and direction, in words."""
    if len(positions) < 2:
        return f"found {len(positions)} position"
    dist, idx = tree.query(positions, k=2)
    vectors = positions[idx[:, 1]] - positions
    angles = np.degrees(np.arctan2(vectors[:, 1], vectors[:, 0])) % 90.0
    angle = float(np.median(np.where(angles > 45, angles - 90, angles)))
    return (f"found a nearest-neighbour spacing of {float(np.median(dist[:, 1])):.4g} px at {angle:.1f}° to the "
            "scan axes")
