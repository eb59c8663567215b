"""Stitching: from one predicted phase patch per probe position to one phase image.

Each patch is the network's ``output_px × output_px`` prediction of the central ``crop_px × crop_px``
real-space pixels of its probe window, upsampled ``upsample``× (nearest). Its zero frequency is lost:
its mean inside the illuminated mask is unknown, so neighbouring patches differ by unknown constants.
Only the pixels inside the mask are used.

Placement (shared by every stitcher, :func:`patch_origins` and :func:`canvas_shape`):

* a scan position ``(row, col)`` is the top-left corner of the probe window in real-space pixels;
  the patch covers object rows ``row + crop_start … row + crop_start + crop_px`` (likewise columns);
* the patches are assembled on a canvas ``upsample``× finer than the object grid; a patch's top-left
  canvas pixel is ``round(upsample · (position + crop_start))``, rounding halves up;
* the canvas is binned ``upsample``× back to the object grid, so that ``image[r, c]`` is object pixel
  ``(r, c)`` in the frame of the positions. Pixels that no mask reached are NaN.

The result is a phase in radians with an arbitrary constant offset; groups of patches that do not
overlap one another each get their own.

Two stitchers:

* :func:`stitch_seed` — the original iterative blending (Phys. Rev. Lett. 130, 016101);
* :func:`stitch_least_squares` — the default: the offsets of all patches are found jointly by a
  sparse least-squares problem, solved to a tight tolerance.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import LinearOperator, cg, splu

from ..errors import ShapeError, ValueRangeError
from ..physics.geometry import Geometry, bin_image

METHODS = ("least-squares", "seed")

# Relative residual ‖M c − b‖ / ‖b‖ at which the offsets count as solved. The offsets enter the image
# directly, so this leaves solver errors many orders of magnitude below any physical error.
_CG_RTOL = 1e-10
_CG_MAXITER = 1000
# Damping of the Jacobi smoother in the two-level preconditioner. D⁻¹M of a graph Laplacian has its
# eigenvalues in [0, 2] (Gershgorin: M is weakly diagonally dominant), so ω = 2/3 keeps the smoother
# convergent (ω·λ ≤ 4/3 < 2), which makes the symmetric two-level preconditioner positive definite.
_JACOBI_OMEGA = 2.0 / 3.0


# ----------------------------------------------------------------------------------------- placement
def patch_origins(positions, geometry: Geometry) -> np.ndarray:
    """Top-left canvas pixel of every patch.

    Parameters
    ----------
    positions : (N, 2) array of float
        Top-left corners of the probe windows, (row, col) in real-space pixels.
    geometry : Geometry
        Supplies ``crop_start`` and the upsampling factor of the canvas.

    Returns
    -------
    (N, 2) int64 array
        ``round(upsample · (position + crop_start))``. Halves round up (``floor(x + 0.5)``), not to the
        nearest even integer as ``np.rint`` does: that way patch pixel ``j`` always lands on the canvas
        pixel that holds its centre, ``position + crop_start + (j + ½)/upsample`` in object pixels.
    """
    positions = np.asarray(positions, dtype=np.float64)
    u = geometry.upsample
    return np.floor(u * (positions + geometry.crop_start) + 0.5).astype(np.int64)


def canvas_shape(positions, geometry: Geometry) -> tuple[int, int]:
    """Shape of the upsampled canvas that holds every patch of these positions.

    ``upsample · (ceil(max position) + crop_start + crop_px)`` per axis. No extra margin is needed:
    ``upsample · (ceil(p) + crop_start)`` is an integer not below ``upsample · (p + crop_start)``, hence
    not below its rounding, and a patch is ``upsample · crop_px`` canvas pixels wide. The size is a
    multiple of ``upsample``, so binning trims nothing and the image starts at object pixel (0, 0).
    """
    positions = np.asarray(positions, dtype=np.float64)
    top = np.ceil(positions.max(axis=0)).astype(np.int64)
    u = geometry.upsample
    return tuple(int(u * (t + geometry.crop_start + geometry.crop_px)) for t in top)


def _canvas_indices(positions, mask_rows, mask_cols, geometry):
    """Flat canvas index of every used patch pixel, shape (N, K), and the canvas shape.

    Each row is increasing because the mask pixels come in row-major order and a patch row is
    narrower than the canvas; the sparse matrix below relies on that.
    """
    origins = patch_origins(positions, geometry)
    shape = canvas_shape(positions, geometry)
    index = (origins[:, 0, None] + mask_rows) * shape[1] + (origins[:, 1, None] + mask_cols)
    return index, shape


def _masked_values(patches: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The used pixels of every patch as float64, shape (N, K), in the order of ``rows, cols``."""
    flat = patches.reshape(patches.shape[0], -1)
    # np.take along one axis of the flattened patches is several times faster than indexing the
    # (N, out, out) array with two index arrays.
    return np.take(flat, rows * patches.shape[2] + cols, axis=1).astype(np.float64)


def _to_image(canvas: np.ndarray, covered: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Bin the canvas to the object grid, averaging only covered canvas pixels; NaN where none is.

    Patches sit at sub-pixel offsets, so an edge pixel of the image may be only partly covered;
    averaging in the uncovered zeros would pull it towards 0, an arbitrary value.
    """
    u = geometry.upsample
    total = bin_image(np.where(covered, canvas, 0.0), u)
    count = bin_image(covered.astype(np.float64), u)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


# ------------------------------------------------------------------------------------------- checks
def _check_inputs(patches, positions, mask, geometry: Geometry):
    """Validate the common arguments; return (patches, positions as float64, mask as bool)."""
    if not isinstance(geometry, Geometry):
        raise ShapeError(f"geometry: expected a deepphase Geometry, got {type(geometry).__name__}")
    out = geometry.output_px
    patches = np.asarray(patches)
    if patches.ndim != 3 or patches.shape[1:] != (out, out):
        raise ShapeError(
            f"patches: expected an array of shape (N, {out}, {out}) (crop_px={geometry.crop_px} × "
            f"upsample={geometry.upsample}), got shape {patches.shape}"
        )
    if patches.shape[0] < 1:
        raise ShapeError("patches: expected at least one patch, got an empty array")
    if not np.issubdtype(patches.dtype, np.floating) and not np.issubdtype(patches.dtype, np.integer):
        raise ShapeError(f"patches: expected real numbers, got dtype {patches.dtype}")
    finite = np.isfinite(patches)
    if not finite.all():
        raise ValueRangeError(
            f"patches: expected finite phases, found {int(finite.size - np.count_nonzero(finite))} NaN or Inf values"
        )
    n = patches.shape[0]

    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ShapeError(f"positions: expected an array of shape (N, 2) with (row, col), got shape {positions.shape}")
    if not (np.issubdtype(positions.dtype, np.floating) or np.issubdtype(positions.dtype, np.integer)):
        raise ShapeError(f"positions: expected numbers, got dtype {positions.dtype}")
    if positions.shape[0] != n:
        raise ShapeError(f"positions: expected one position per patch ({n}), got {positions.shape[0]}")
    positions = positions.astype(np.float64)
    if not np.all(np.isfinite(positions)):
        raise ValueRangeError("positions: expected finite pixel coordinates, found NaN or Inf")
    if positions.min() < 0:
        raise ValueRangeError(
            f"positions: expected non-negative top-left corners in pixels, found a minimum of {positions.min():.3f}"
        )

    mask = np.asarray(mask)
    if mask.shape != (out, out):
        raise ShapeError(f"mask: expected the {out}×{out} output mask of this geometry, got shape {mask.shape}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueRangeError("mask: expected a boolean (or 0/1) array, found other values")
        mask = mask.astype(bool)
    if not mask.any():
        raise ValueRangeError("mask: expected at least one illuminated pixel, got an empty mask")
    return patches, positions, mask


# ------------------------------------------------------------------------------------- seed's method
def stitch_seed(patches, positions, mask, geometry: Geometry, alpha: float = 0.1, passes: int = 3,
                seed: int = 0) -> np.ndarray:
    """The seed's iterative stitching (Phys. Rev. Lett. 130, 016101), kept for comparison.

    Starting from a zero canvas ``a``, every pass visits all patches in a random order and blends
    patch ``b`` (its mean inside the mask removed) into its window::

        a ← a + α · (b − a + mean_mask(a)) · mask

    The update has zero mean inside the mask, so each window keeps its current mean and takes the
    patch's shape; the large-scale phase has to diffuse in over many overlapping updates.

    Parameters
    ----------
    patches : (N, out, out) array
        Predicted phase patches (radians), ``out = geometry.output_px``.
    positions : (N, 2) array
        Top-left corners of the probe windows, (row, col) in real-space pixels, non-negative.
    mask : (out, out) bool array
        The illuminated mask on the output grid (:func:`deepphase.physics.geometry.output_mask`).
    geometry : Geometry
    alpha : float
        Blending rate, in (0, 1].
    passes : int
        Number of passes over all patches.
    seed : int
        Seed of the random visiting order (``np.random.default_rng(seed).permutation`` per pass).

    Returns
    -------
    2-D float64 array
        The phase on the object grid (radians, arbitrary offset), NaN where no mask reached.
    """
    patches, positions, mask = _check_inputs(patches, positions, mask, geometry)
    if not 0 < alpha <= 1:
        raise ValueRangeError(f"alpha: expected a blending rate in (0, 1], got {alpha}")
    if int(passes) != passes or passes < 1:
        raise ValueRangeError(f"passes: expected a positive integer, got {passes}")
    rows, cols = np.nonzero(mask)
    index, shape = _canvas_indices(positions, rows, cols, geometry)
    values = _masked_values(patches, rows, cols)
    values -= values.mean(axis=1, keepdims=True)

    canvas = np.zeros(shape[0] * shape[1])
    rng = np.random.default_rng(seed)
    inv_k = 1.0 / rows.size
    # The updates depend on each other (a window reads what the previous patch wrote), so this loop
    # is sequential by nature; flat index arrays keep each step to one gather and one scatter.
    for _ in range(int(passes)):
        for i in rng.permutation(len(values)):
            ix = index[i]
            window = canvas[ix]
            canvas[ix] = window + alpha * (values[i] - window + window.sum() * inv_k)
    covered = np.bincount(index.ravel(), minlength=canvas.size) > 0
    return _to_image(canvas.reshape(shape), covered.reshape(shape), geometry)


# ----------------------------------------------------------------------------------- least squares
def stitch_least_squares(patches, positions, mask, geometry: Geometry, weights=None) -> np.ndarray:
    """Stitch by solving for every patch's unknown offset jointly (the default stitcher).

    With ``q_i`` the patches, ``A[p, i]`` the weight of canvas pixel ``p`` in patch ``i`` (the mask, or
    ``weights`` inside the mask) and one unknown offset ``c_i`` per patch, minimise::

        Σ_i Σ_p A[p, i] · (x_p − q_i(p) − c_i)²

    over the canvas ``x`` and the offsets ``c``. For fixed ``c`` the best canvas is the weighted mean
    ``x = (S + A c) / W`` with ``S = Σ_i A[:, i] q_i`` and coverage ``W = A·1``. Putting it back
    leaves ``M c = b`` with the graph Laplacian ``M = diag(Aᵀ1) − Aᵀ diag(1/W) A`` and
    ``b_i = Σ_p A[p, i] S_p / W_p − Σ_p A[p, i] q_i(p)``.

    ``M`` is singular: one constant per group of mutually overlapping patches is free. Each group is
    found (connected components of ``M``), one patch per group is pinned to 0 (by doubling its
    diagonal entry, which keeps the matrix's structure), and the system is solved by conjugate
    gradients with a two-level preconditioner (Jacobi smoothing plus an exact solve on aggregates of
    nearby patches), which needs about 15 iterations whatever the scan size, where plain or
    Jacobi-preconditioned CG needs hundreds. Finally each group's offsets are shifted to mean 0.

    Parameters
    ----------
    patches : (N, out, out) array
        Predicted phase patches (radians), ``out = geometry.output_px``.
    positions : (N, 2) array
        Top-left corners of the probe windows, (row, col) in real-space pixels, non-negative.
    mask : (out, out) bool array
        The illuminated mask on the output grid (:func:`deepphase.physics.geometry.output_mask`).
    geometry : Geometry
    weights : (out, out) array, optional
        Non-negative weight of each output pixel (e.g. the probe intensity), used inside the mask
        instead of 1. Pixels of weight 0 are left out, as if outside the mask.

    Returns
    -------
    2-D float64 array
        The phase on the object grid (radians, arbitrary offset per group of overlapping patches),
        NaN where no mask reached.

    Notes
    -----
    The solution honours the patches' shapes at every scale, so a bias that all patches share (for
    instance the same small tilt) adds up across the scan into a large-scale ramp. The seed's method,
    stopped after a few passes, does not carry large scales that far and hides such a bias.
    """
    patches, positions, mask = _check_inputs(patches, positions, mask, geometry)
    if weights is None:
        pixel_weight = mask.astype(np.float64)
    else:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != mask.shape:
            raise ShapeError(
                f"weights: expected a {mask.shape[0]}×{mask.shape[1]} map like the mask, got shape {weights.shape}"
            )
        if not np.all(np.isfinite(weights)):
            raise ValueRangeError("weights: expected finite, non-negative values, found NaN or Inf")
        if weights.min() < 0:
            raise ValueRangeError(f"weights: expected non-negative values, found a minimum of {weights.min():g}")
        pixel_weight = np.where(mask, weights, 0.0)
        if not pixel_weight.any():
            raise ValueRangeError("weights: expected a positive weight somewhere inside the mask, got none")
    rows, cols = np.nonzero(pixel_weight > 0)
    w = pixel_weight[rows, cols]
    n = patches.shape[0]
    index, shape = _canvas_indices(positions, rows, cols, geometry)
    n_canvas = shape[0] * shape[1]

    # Removing each patch's (weighted) mean changes nothing in exact arithmetic (c_i absorbs it) but
    # makes the result independent of any constant the patches carry, to the last bit.
    q = _masked_values(patches, rows, cols)
    q -= np.einsum("ik,k->i", q, w)[:, None] / w.sum()
    wq = q * w

    flat = index.ravel()
    tiled_w = np.tile(w, n)
    coverage = np.bincount(flat, tiled_w, minlength=n_canvas)
    S = np.bincount(flat, wq.ravel(), minlength=n_canvas)
    covered = coverage > 0
    inv_cov = np.divide(1.0, coverage, out=np.zeros_like(coverage), where=covered)

    # Aᵀ diag(1/W) A = BᵀB with B = diag(W^-½) A, symmetric by construction. B (canvas pixels ×
    # patches) is built directly in CSC form: column i holds patch i's pixels, the same number for
    # every patch and already sorted (see _canvas_indices), so no COO sort and no A are needed.
    B = sp.csc_matrix((tiled_w * np.sqrt(inv_cov[flat]), flat, np.arange(0, flat.size + 1, w.size)),
                      shape=(n_canvas, n))
    overlap = (B.T @ B.tocsr()).tocsr()
    b = np.einsum("ik,k->i", (S * inv_cov)[index], w) - wq.sum(axis=1)

    c = _solve_offsets(overlap, w.sum(), b, positions, geometry, rows, cols)
    x = (S + np.bincount(flat, (c[:, None] * w).ravel(), minlength=n_canvas)) * inv_cov
    return _to_image(x.reshape(shape), covered.reshape(shape), geometry)


def _solve_offsets(overlap, patch_weight, b, positions, geometry, rows, cols) -> np.ndarray:
    """Solve ``M c = b`` for ``M = patch_weight·I − overlap``, a Laplacian with one free constant per group.

    The gauge is fixed by pinning the first patch of every group of overlapping patches (a connected
    component of ``overlap``): its diagonal entry is doubled. Summing a group's equations gives
    ``1ᵀM c = 0 = 1ᵀb`` for the Laplacian part, so the extra term forces ``c_pin = 0`` and the rest of
    the solution is exactly the Laplacian's; the matrix becomes positive definite (a Dirichlet
    condition), so CG converges, and it needs no row or column removed. A group of one patch has
    ``b_i = 0`` and gets ``c_i = 0``.
    """
    n = overlap.shape[0]
    n_groups, group = connected_components(overlap, directed=False)
    pinned = np.zeros(n)
    pinned[np.unique(group, return_index=True)[1]] = patch_weight
    M = (sp.diags(patch_weight + pinned) - overlap).tocsr()
    c = np.zeros(n)
    if np.any(b):
        c = _pcg(M, b, _aggregates(positions, group, geometry, rows, cols))
    # The pin is arbitrary; mean 0 per group makes the result independent of which patch was pinned.
    c -= (np.bincount(group, c, minlength=n_groups) / np.bincount(group, minlength=n_groups))[group]
    return c


def _aggregates(positions, group, geometry, rows, cols) -> np.ndarray:
    """Coarse-level aggregates: patches of one group whose positions fall in one square bin.

    The bin is the used mask's extent in real-space pixels, the range over which patches couple, so
    an aggregate is a cluster of strongly overlapping patches and the coarse problem is a coarse
    Laplacian on the same domain. Aggregates never mix groups, so the coarse problem keeps each
    group's pin and stays positive definite.
    """
    extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) / geometry.upsample
    cell = np.floor(positions / max(extent, 1.0)).astype(np.int64)
    n_cells = cell.max(axis=0) + 1
    key = (group * n_cells[0] + cell[:, 0]) * n_cells[1] + cell[:, 1]
    return np.unique(key, return_inverse=True)[1].ravel()


def _pcg(M, b, aggregate) -> np.ndarray:
    """CG on the positive-definite ``M`` with a symmetric two-level preconditioner.

    One application: Jacobi pre-smoothing, an exact solve of the aggregated (coarse) problem
    ``PᵀMP`` for the residual, Jacobi post-smoothing. The coarse solve removes the smooth error that
    Jacobi cannot, so the iteration count stays flat as the scan grows.
    """
    n = M.shape[0]
    P = sp.csr_matrix((np.ones(n), (np.arange(n), aggregate)), shape=(n, aggregate.max() + 1))
    PT = P.T.tocsr()
    coarse = splu((PT @ M @ P).tocsc(), permc_spec="MMD_AT_PLUS_A")
    smooth = _JACOBI_OMEGA / M.diagonal()

    def apply(r):
        x = smooth * r
        x += P @ coarse.solve(PT @ (r - M @ x))
        return x + smooth * (r - M @ x)

    c, info = cg(M, b, rtol=_CG_RTOL, atol=0.0, maxiter=_CG_MAXITER, M=LinearOperator(M.shape, matvec=apply))
    if info != 0:
        warnings.warn(f"stitching: the offsets did not converge to {_CG_RTOL:g} in {_CG_MAXITER} "
                      "conjugate-gradient iterations; the image may show seams", RuntimeWarning, stacklevel=4)
    return c


# ----------------------------------------------------------------------------------------- dispatch
def stitch(patches, positions, mask, geometry: Geometry, method: str = "least-squares", **kw) -> np.ndarray:
    """Stitch phase patches into one image with the named method.

    Parameters
    ----------
    patches, positions, mask, geometry
        As in :func:`stitch_least_squares`.
    method : {"least-squares", "seed"}
        ``"least-squares"`` (default, :func:`stitch_least_squares`) or ``"seed"`` (the original
        iterative method, :func:`stitch_seed`).
    **kw
        Passed on to the method (``weights`` for least squares; ``alpha``, ``passes``, ``seed`` for
        the seed's method).

    Returns
    -------
    2-D float64 array on the object grid (radians, arbitrary offset), NaN where no mask reached.
    """
    functions = {"least-squares": stitch_least_squares, "seed": stitch_seed}
    if method not in functions:
        raise ValueRangeError(f"method: expected one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    return functions[method](patches, positions, mask, geometry, **kw)
