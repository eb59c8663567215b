"""Scan positions: (row, col) of each probe window's top-left corner, in real-space pixels.

This is the seed's convention (DESIGN.md). A raster is described by its shape, its step, an optional
rotation of the scan axes against the detector/real-space axes, and which scan axis varies fastest
in the order the frames were recorded.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError, ValueRangeError
from ..wording import in_callers_words

# The reference experiment: 256×256 positions, this step in pixels, the row varying fastest.
REFERENCE_STEP_PX = 0.86995916


@in_callers_words(**{"scan-shape": "shape", "step": "step"})
def raster_positions(
    shape: tuple[int, int],
    step_px: float | tuple[float, float],
    rotation_deg: float = 0.0,
    fastest: str = "row",
    origin: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Positions of a raster scan, in frame order, shape (rows·cols, 2).

    Parameters
    ----------
    shape : (int, int)
        Number of scan rows and scan columns.
    step_px : float or (float, float)
        Step between positions in real-space pixels (row step, column step).
    rotation_deg : float
        Rotation of the scan axes against the real-space grid, counter-clockwise, in degrees.
    fastest : {"row", "col"}
        Which scan coordinate changes between consecutive frames. The seed's data has ``"row"``;
        a C-ordered (scan_row, scan_col, k, k) array flattened to frames has ``"col"``.
    origin : (float, float)
        Smallest row and column coordinate of the scan: the positions are shifted so that their minimum
        lies here (the first frame's position only for an unrotated scan).

    Returns
    -------
    positions : (rows·cols, 2) float64
        The top-left corner of each frame's probe window, (row, col) in real-space pixels, in frame order.
    """
    if not (np.ndim(shape) == 1 and len(shape) == 2 and all(
            isinstance(s, (int, float, np.integer, np.floating)) and not isinstance(s, bool) and s >= 1
            and float(s) == int(s) for s in shape)):
        raise ShapeError(f"shape: expected (rows, cols), two positive whole numbers, got {shape!r}")
    rows, cols = (int(s) for s in shape)
    try:
        step_r, step_c = (float(step_px), float(step_px)) if np.ndim(step_px) == 0 else (float(step_px[0]), float(step_px[1]))
        assert np.ndim(step_px) in (0, 1) and np.size(step_px) in (1, 2)
        # (a string converts, but is no number: the API takes numbers, as the command line's parser makes them)
        assert not any(isinstance(s, (str, bytes)) for s in np.atleast_1d(np.asarray(step_px, dtype=object)))
    except (TypeError, ValueError, IndexError, AssertionError):
        raise ValueRangeError(f"step_px: expected a step in pixels, or (row step, column step), got {step_px!r}") from None
    if not (np.isfinite(step_r) and np.isfinite(step_c) and step_r > 0 and step_c > 0):
        raise ValueRangeError(f"step_px: expected a positive step in pixels, got {step_px!r}")
    if not isinstance(rotation_deg, (int, float, np.integer, np.floating)) or not np.isfinite(rotation_deg):
        raise ValueRangeError(f"rotation_deg: expected an angle in degrees, got {rotation_deg!r} (a rotation found from "
                              "the data: deepphase.reconstruct_file(..., rotation_deg='auto'))")
    if fastest not in ("row", "col"):
        raise ValueRangeError(f"fastest: expected 'row' or 'col', got {fastest!r}")
    if fastest == "row":
        c_idx, r_idx = np.meshgrid(np.arange(cols), np.arange(rows), indexing="ij")
    else:
        r_idx, c_idx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r = r_idx.ravel() * step_r
    c = c_idx.ravel() * step_c
    theta = np.deg2rad(rotation_deg)
    rr = np.cos(theta) * r - np.sin(theta) * c
    cc = np.sin(theta) * r + np.cos(theta) * c
    positions = np.stack([rr, cc], axis=1)
    positions -= positions.min(axis=0)
    return positions + np.asarray(origin, dtype=float)


def validate_positions(positions, n_frames: int) -> np.ndarray:
    """Check an (N, 2) array of scan positions against the number of frames."""
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ShapeError(f"positions: expected an array of shape (N, 2) with (row, col), got shape {positions.shape}")
    if not np.issubdtype(positions.dtype, np.number):
        raise ShapeError(f"positions: expected numbers, got dtype {positions.dtype}")
    if positions.shape[0] == 0:
        raise ShapeError("positions: no scan positions (an empty (0, 2) array)")
    if positions.shape[0] != n_frames:
        raise ShapeError(
            f"positions: {positions.shape[0]} positions do not match the {n_frames} diffraction patterns"
        )
    if not np.all(np.isfinite(positions)):
        raise ValueRangeError("positions: contain NaN or Inf")
    if positions.min() < 0:
        raise ValueRangeError(
            f"positions: expected non-negative top-left corners in pixels, found a minimum of {positions.min():.3f}"
        )
    return positions.astype(np.float64)


#: Neighbouring positions closer than this (pixels) are not a scan in pixels: positions in Å, nm or metres.
MIN_SPACING_PX = 0.05


def neighbour_spacing(positions: np.ndarray, sample: int = 4096) -> float:
    """The median distance (pixels) from a position to its nearest neighbour, over up to ``sample`` positions."""
    from scipy.spatial import cKDTree

    positions = np.asarray(positions, dtype=np.float64)
    if len(positions) < 2:
        return float("inf")
    which = np.unique(np.linspace(0, len(positions) - 1, min(len(positions), sample)).round().astype(np.int64))
    distances, _ = cKDTree(positions).query(positions[which], k=2)
    return float(np.median(distances[:, 1]))


def check_spacing(positions: np.ndarray, geometry) -> None:
    """Refuse positions that cannot be a scan in the model grid's pixels: all at one place, neighbours a tiny
    fraction of a pixel apart (positions in Å, nm or metres), or so far apart that no two predicted windows
    (``geometry.crop_px`` pixels) overlap, which leaves the stitcher nothing to relate the patches by."""
    if len(positions) < 2:
        return
    if np.ptp(positions, axis=0).max() == 0:
        raise ValueRangeError(f"positions: all {len(positions)} positions are the same point; expected a scan")
    spacing = neighbour_spacing(positions)
    where = "expected positions in real-space pixels of the model's grid (the reference scan's step is 0.87 px)"
    if spacing < MIN_SPACING_PX:
        raise ValueRangeError(f"positions: neighbouring positions are {spacing:.3g} px apart (median); {where}: were "
                              "they given in Å, nm or metres? Divide by the pixel size")
    if spacing >= geometry.crop_px:
        raise ValueRangeError(f"positions: neighbouring positions are {spacing:.3g} px apart (median), farther than "
                              f"the {geometry.crop_px} px each pattern's phase is predicted over, so no two patches "
                              f"overlap and they cannot be stitched; {where}")


def raster_from_positions(positions, tolerance_px: float = 1e-3) -> dict | None:
    """The raster behind a list of scan positions, if they are one: the parameters of :func:`raster_positions`.

    Parameters
    ----------
    positions : (N, 2) array of (row, col) positions in frame order.
    tolerance_px : largest distance, in pixels, of a position from the raster's.

    Returns
    -------
    ``{"scan_shape": [rows, cols], "step_px": [row step, col step], "rotation_deg": θ, "fastest": "row" | "col"}``
    such that ``raster_positions(r["scan_shape"], r["step_px"], r["rotation_deg"], r["fastest"])`` gives
    ``positions`` less their minimum; None when the positions are not a raster of at least 2×2 with
    perpendicular axes in the convention's sense (e.g. measured positions with jitter, a serpentine or spiral
    scan).
    """
    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or len(p) < 4 or not np.all(np.isfinite(p)):
        return None
    first = p[1] - p[0]
    if np.hypot(*first) <= tolerance_px:
        return None
    off_line = np.flatnonzero(np.abs(np.diff(p, axis=0) - first).max(axis=1) > tolerance_px)
    fast = int(off_line[0]) + 1 if len(off_line) else len(p)
    if fast < 2 or len(p) % fast or len(p) // fast < 2:
        return None
    slow = len(p) // fast
    across = p[fast] - p[0]
    k = np.arange(len(p))
    lattice = p[0] + (k % fast)[:, None] * first + (k // fast)[:, None] * across
    if np.abs(lattice - p).max() > tolerance_px:
        return None
    # raster_positions: a step along the scan rows is step_r·(cos θ, sin θ), along the columns step_c·(−sin θ, cos θ).
    for fastest, along_rows, along_cols, shape in (("row", first, across, (fast, slow)),
                                                   ("col", across, first, (slow, fast))):
        theta = np.arctan2(along_rows[1], along_rows[0])
        step_r, step_c = float(np.hypot(*along_rows)), float(np.hypot(*along_cols))
        if np.abs(along_cols - step_c * np.array([-np.sin(theta), np.cos(theta)])).max() * max(shape) <= tolerance_px:
            return {"scan_shape": [int(shape[0]), int(shape[1])], "step_px": [step_r, step_c],
                    "rotation_deg": float(np.degrees(theta)), "fastest": fastest}
    return None


def object_in_scan_frame(image: np.ndarray, image_positions, scan_positions, origin_px, shape, window_px: int
                         ) -> tuple[np.ndarray, dict]:
    """An object image resampled onto the pixels of a reconstruction made with other scan positions.

    A reconstruction places each patch at the position it was given, so a wrong rotation, step or offset of
    the scan gives the specimen turned, scaled or moved in the image, not lost: comparing that image pixel
    by pixel with the object (a simulation's truth) says nothing of its quality. The least-squares affine map
    from the positions given to the positions the patterns were recorded at (``image_positions``, the
    object's frame) takes the object into the reconstruction's frame. It is fitted on the windows' centres,
    so each patch's own content (which the detector records unturned) lines up at its centre.

    Parameters
    ----------
    image : (H, W) object, e.g. the phase a scan was simulated from.
    image_positions : (N, 2) positions the frames were recorded at, in ``image``'s pixels.
    scan_positions : (N, 2) positions the reconstruction was made with, in the same frame order.
    origin_px : (row, col) of the reconstruction's pixel (0, 0) in the frame of ``scan_positions``.
    shape : (rows, cols) of the reconstruction.
    window_px : width of a probe window (the pattern's n).

    Returns
    -------
    ``(resampled, info)``: ``resampled`` has ``shape``, NaN where the map falls outside ``image``; ``info`` holds
    ``matrix`` (2×2), ``offset_px`` and ``residual_px`` (rms distance of the recorded positions from the mapped
    ones: large when the positions given are not a turned, scaled and shifted copy of the recorded ones, e.g.
    frames in another order). Identical positions give the plain crop and the identity.
    """
    recorded = np.asarray(image_positions, dtype=np.float64)
    given = np.asarray(scan_positions, dtype=np.float64)
    if recorded.shape != given.shape or recorded.ndim != 2 or recorded.shape[1] != 2:
        raise ShapeError(f"positions: the recorded ({recorded.shape}) and the given ({given.shape}) positions "
                         "must both be (N, 2) for the same N frames")
    image = np.asarray(image, dtype=np.float64)
    rows, cols = int(shape[0]), int(shape[1])
    r0, c0 = int(round(origin_px[0])), int(round(origin_px[1]))
    if np.allclose(recorded, given, rtol=0.0, atol=1e-6):
        crop = np.full((rows, cols), np.nan)
        part = image[max(r0, 0):r0 + rows, max(c0, 0):c0 + cols]
        crop[max(-r0, 0):max(-r0, 0) + part.shape[0], max(-c0, 0):max(-c0, 0) + part.shape[1]] = part
        return crop, {"matrix": np.eye(2).tolist(), "offset_px": [0.0, 0.0], "residual_px": 0.0}
    centre = (window_px - 1) / 2.0
    design = np.column_stack([given + centre, np.ones(len(given))])
    solution, *_ = np.linalg.lstsq(design, recorded + centre, rcond=None)
    matrix, offset = solution[:2].T, solution[2]
    residual = float(np.sqrt(np.mean(np.sum((design @ solution - recorded - centre) ** 2, axis=1))))
    from scipy.ndimage import map_coordinates

    grid = np.stack(np.meshgrid(np.arange(rows) + r0, np.arange(cols) + c0, indexing="ij")).reshape(2, -1)
    where = matrix @ grid + offset[:, None]
    # Cubic: within 0.003 of a quintic spline's correlation on the scans of RESULTS §43, where linear interpolation's
    # blur moved it by up to 0.015 (a smoothed truth flatters a smooth reconstruction, and wrongs a sharp one).
    resampled = map_coordinates(image, where, order=3, mode="constant", cval=np.nan).reshape(rows, cols)
    return resampled, {"matrix": matrix.tolist(), "offset_px": offset.tolist(), "residual_px": residual}


def flip_patterns(patterns: np.ndarray) -> np.ndarray:
    """Diffraction patterns mirrored in k_row (k_row → −k_row), for a detector of the other handedness.

    A rotation of the scan against the detector is absorbed by the positions (``rotation_deg``); a mirror is
    not: a detector read with its rows in the opposite sense to the scan's (a camera mounted or a reader
    storing rows the other way) records |F(ψ)|(−k_row, k_col), the pattern of the mirrored exit wave, and
    every patch comes out mirrored about its own probe position. Flipping the patterns undoes it. The mirror
    is about the zero frequency at index n//2 (DESIGN.md): row i goes to row (2·(n//2) − i) mod n ((n − i) mod n
    for even n, n − 1 − i for odd), so a centred pattern stays centred. :func:`deepphase.data.calibration.find_scan_rotation` tells which handedness a
    scan has.

    Parameters
    ----------
    patterns : array (..., n, n)
        Diffraction amplitudes or intensities on the model's grid (any leading axes).

    Returns
    -------
    array of the same shape and dtype.
    """
    patterns = np.asarray(patterns)
    if patterns.ndim < 2:
        raise ShapeError(f"patterns: expected an array (..., n, n), got shape {patterns.shape}")
    n = patterns.shape[-2]
    return np.roll(patterns[..., ::-1, :], 2 * (n // 2) - (n - 1), axis=-2)
