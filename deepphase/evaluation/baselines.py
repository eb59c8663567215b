"""Classical baselines from the same 4D-STEM data: differential phase contrast (DPC) from the centre of
mass (CoM) of each diffraction pattern, and its integral (iDPC).

Physics, in the Fourier convention of DESIGN.md (``Ψ = fftshift(fft2(ifftshift(ψ)))`` on an n×n grid of
real-space pixel ``dx``, detector pixel ``1 / (n·dx)``): a phase ramp ``φ = 2π (s·r) / n`` (``r`` in pixels)
moves the pattern by ``s`` detector pixels. For a phase object that varies slowly across the probe, the CoM
shift of the pattern is therefore

    CoM [detector px] = n / (2π) · ∇φ [rad per real-space pixel],

averaged over the probe intensity ``|P|²`` (exactly, for a pure-phase object, up to the CoM of the probe's
own pattern, which is a constant). Multiplying by the scan step in real-space pixels gives the phase
difference per scan step, and integrating that over the scan grid gives the phase in radians on the scan
grid, at the probe centres (``position + n//2``), up to a constant.
"""

from __future__ import annotations

import numpy as np

from ..data.calibration import centre_of_mass
from ..errors import ShapeError, ValueRangeError


def center_of_mass(patterns) -> np.ndarray:
    """Centre of mass of each diffraction pattern relative to the pattern centre.

    Parameters
    ----------
    patterns : (..., k_row, k_col) array
        Intensities (counts, not amplitudes), e.g. (N, k, k) or (scan_row, scan_col, k, k).

    Returns
    -------
    (..., 2) array
        (row, col) CoM in detector pixels, relative to index ``(k_row // 2, k_col // 2)`` (the zero
        frequency, DESIGN.md). Positive means towards larger indices.

    Raises
    ------
    ShapeError
        If ``patterns`` has fewer than two dimensions.
    ValueRangeError
        If it holds NaN/Inf, or a pattern whose total intensity is not positive.
    """
    p = np.asarray(patterns, dtype=np.float64)
    if p.ndim < 2 or min(p.shape[-2:]) < 2:
        raise ShapeError(f"patterns: expected an array of shape (..., k_row, k_col), got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueRangeError("patterns: contain NaN or Inf")
    total = p.sum(axis=(-2, -1))
    if not np.all(total > 0):
        raise ValueRangeError(
            f"patterns: {int(np.sum(~(total > 0)))} pattern(s) have a total intensity ≤ 0; expected positive counts"
        )
    return centre_of_mass(p)


def _frames_to_grid(values: np.ndarray, scan_shape, fastest: str) -> np.ndarray:
    """(N, ...) values in frame order → (rows, cols, ...) on the scan grid (see ``raster_positions``)."""
    rows, cols = (int(s) for s in scan_shape)
    if len(values) != rows * cols:
        raise ShapeError(f"scan_shape: {rows}×{cols} = {rows * cols} positions do not match the {len(values)} patterns")
    if fastest == "row":
        return np.swapaxes(values.reshape(cols, rows, *values.shape[1:]), 0, 1)
    if fastest == "col":
        return values.reshape(rows, cols, *values.shape[1:])
    raise ValueRangeError(f"fastest: expected 'row' or 'col', got {fastest!r}")


def dpc_images(com, scan_shape=None, rotation_deg: float = 0.0, fastest: str = "row") -> np.ndarray:
    """The two DPC images: the CoM components along the scan row and scan column axes.

    Parameters
    ----------
    com : (N, 2) or (scan_row, scan_col, 2) array
        (row, col) CoM shifts in detector pixels, e.g. from :func:`center_of_mass`.
    scan_shape : (int, int), optional
        Scan rows and columns; needed for (N, 2) input.
    rotation_deg : float
        Rotation of the scan axes against the detector (= real-space grid) axes, counter-clockwise, as in
        :func:`deepphase.physics.raster_positions`: a step along the scan rows moves the probe by
        ``(cos θ, sin θ)`` in (row, col), a step along the scan columns by ``(−sin θ, cos θ)``.
    fastest : {"row", "col"}
        Frame order of (N, 2) input, as in ``raster_positions`` (the reference data: ``"row"``).

    Returns
    -------
    (2, scan_row, scan_col) array
        ``[0]``: CoM component along the scan row axis, ``[1]``: along the scan column axis (detector px).
    """
    com = np.asarray(com, dtype=np.float64)
    if com.ndim == 2 and com.shape[1] == 2:
        if scan_shape is None:
            raise ShapeError("scan_shape: needed to arrange (N, 2) CoM values on the scan grid")
        com = _frames_to_grid(com, scan_shape, fastest)
    elif not (com.ndim == 3 and com.shape[2] == 2):
        raise ShapeError(f"com: expected shape (N, 2) or (scan_row, scan_col, 2), got {com.shape}")
    elif scan_shape is not None and tuple(int(s) for s in scan_shape) != com.shape[:2]:
        raise ShapeError(f"scan_shape: {tuple(scan_shape)} differs from the CoM grid {com.shape[:2]}")
    t = np.deg2rad(rotation_deg)
    along_rows = np.cos(t) * com[..., 0] + np.sin(t) * com[..., 1]
    along_cols = -np.sin(t) * com[..., 0] + np.cos(t) * com[..., 1]
    return np.stack([along_rows, along_cols])


def integrate_gradient(grad_row, grad_col, step=1.0) -> np.ndarray:
    """The function whose gradient is (``grad_row``, ``grad_col``), sampled on a regular grid.

    Parameters
    ----------
    grad_row, grad_col : (H, W) arrays
        Derivatives along the rows (axis 0) and along the columns (axis 1) — the order of
        ``numpy.gradient`` — in units of the result per unit of ``step``.
    step : float or (float, float)
        Grid spacing (row, col). With gradients per sample (e.g. phase per scan step), 1.

    Returns
    -------
    (H, W) array
        The integral, its mean set to zero (the constant is not determined).

    Notes
    -----
    Least-squares integration: minimise ``Σ (φ[i+1] − φ[i] − step·(g[i] + g[i+1])/2)²`` over both axes
    (trapezoidal differences), whose normal equations are the discrete Poisson equation with Neumann
    (mirror) boundaries. It is solved in Fourier space with the DCT-II, which is the FFT of the grid
    mirrored at its edges: this is Fourier integration of the mirror-padded gradient field, with the
    derivative of the finite difference. Mirroring makes the field periodic without the jumps that plain
    FFT integration would wrap around from one edge to the other (a linear ramp is recovered exactly,
    and no edge artefacts appear), and the finite-difference kernel has no singular Nyquist term.
    """
    from scipy.fft import dctn, idctn

    gr = np.asarray(grad_row, dtype=np.float64)
    gc = np.asarray(grad_col, dtype=np.float64)
    if gr.ndim != 2 or gr.shape != gc.shape:
        raise ShapeError(f"grad_row, grad_col: expected two 2-D arrays of one shape, got {gr.shape} and {gc.shape}")
    if not (np.all(np.isfinite(gr)) and np.all(np.isfinite(gc))):
        raise ValueRangeError("grad_row, grad_col: contain NaN or Inf")
    step_r, step_c = (float(step), float(step)) if np.isscalar(step) else (float(step[0]), float(step[1]))
    if not (np.isfinite(step_r) and np.isfinite(step_c) and step_r > 0 and step_c > 0):
        raise ValueRangeError(f"step: expected a positive grid spacing, got {step!r}")
    h, w = gr.shape
    # Target differences between neighbours, then the right-hand side Dᵀt (zero flux through the edges).
    tr = step_r * 0.5 * (gr[1:] + gr[:-1])
    tc = step_c * 0.5 * (gc[:, 1:] + gc[:, :-1])
    rhs = np.zeros((h, w))
    rhs[1:] += tr
    rhs[:-1] -= tr
    rhs[:, 1:] += tc
    rhs[:, :-1] -= tc
    # DᵀD is the Neumann Laplacian, diagonal in the DCT-II basis with eigenvalues 2 − 2 cos(π k / n).
    lam = (2 - 2 * np.cos(np.pi * np.arange(h) / h))[:, None] + (2 - 2 * np.cos(np.pi * np.arange(w) / w))[None, :]
    lam[0, 0] = 1.0
    spectrum = dctn(rhs, type=2, norm="ortho") / lam
    spectrum[0, 0] = 0.0
    phase = idctn(spectrum, type=2, norm="ortho")
    return phase - phase.mean()


def idpc_phase(
    intensities,
    scan_shape=None,
    step_px=1.0,
    rotation_deg: float = 0.0,
    fastest: str = "row",
    com_reference="mean",
) -> np.ndarray:
    """Integrated DPC: the phase (rad) on the scan grid from the CoM of each diffraction pattern.

    Parameters
    ----------
    intensities : (scan_row, scan_col, k, k) or (N, k, k) array
        Diffraction intensities (counts; square an amplitude such as ``sqrt(counts)`` first).
    scan_shape : (int, int), optional
        Scan rows and columns; needed for (N, k, k) input.
    step_px : float or (float, float)
        Scan step (along scan rows, along scan columns) in real-space pixels of the grid whose
        reciprocal pixel is one detector pixel, ``dx = 1 / (k · dk)`` — the probe's grid in this package
        (DESIGN.md scan positions). From a step in Å and a detector sampling ``dk`` (1/Å per pixel):
        ``step_px = step_Å · k · dk``.
    rotation_deg : float
        Rotation of the scan axes against the detector axes (see :func:`dpc_images`).
    fastest : {"row", "col"}
        Frame order of (N, k, k) input (see :func:`deepphase.physics.raster_positions`).
    com_reference : "mean", None or (2,) array
        CoM (detector px) that means "no deflection", subtracted from every pattern: ``"mean"`` the
        scan's mean CoM (robust to descan and to the probe pattern's own asymmetry, but a uniform
        phase ramp over the field is not recovered), ``None`` the pattern centre ``k//2``, or a measured
        value such as ``center_of_mass(vacuum_pattern)``.

    Returns
    -------
    (scan_row, scan_col) array
        Phase in radians at the probe centres (``position + k//2`` on the object grid), mean zero: the
        constant offset is arbitrary. It is the object phase smoothed by the probe intensity ``|P|²``.

    Notes
    -----
    Gradient along the detector axes in rad per real-space pixel: ``2π · CoM / k`` (shift theorem in the
    DESIGN.md convention); times the step, it is the phase difference per scan step, which
    :func:`integrate_gradient` integrates.
    """
    p = np.asarray(intensities)
    if p.ndim not in (3, 4) or p.shape[-1] != p.shape[-2]:
        raise ShapeError(
            f"intensities: expected shape (scan_row, scan_col, k, k) or (N, k, k) with square patterns, got {p.shape}"
        )
    if p.ndim == 3 and scan_shape is None:
        raise ShapeError("scan_shape: needed for intensities of shape (N, k, k)")
    com = center_of_mass(p)
    if isinstance(com_reference, str):
        if com_reference != "mean":
            raise ValueRangeError(f"com_reference: expected 'mean', None or a (row, col) pair, got {com_reference!r}")
        com = com - com.reshape(-1, 2).mean(axis=0)
    elif com_reference is not None:
        ref = np.asarray(com_reference, dtype=np.float64)
        if ref.shape != (2,):
            raise ShapeError(f"com_reference: expected a (row, col) pair, got shape {ref.shape}")
        com = com - ref
    k = p.shape[-1]
    step_r, step_c = (float(step_px),) * 2 if np.isscalar(step_px) else (float(step_px[0]), float(step_px[1]))
    if not (np.isfinite(step_r) and np.isfinite(step_c) and step_r > 0 and step_c > 0):
        raise ValueRangeError(f"step_px: expected a positive scan step in pixels, got {step_px!r}")
    along_rows, along_cols = dpc_images(com, scan_shape, rotation_deg, fastest) * (2 * np.pi / k)
    return integrate_gradient(along_rows * step_r, along_cols * step_c)
