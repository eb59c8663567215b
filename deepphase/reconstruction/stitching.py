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

Three stitchers:

* :func:`stitch_pairwise` — the default: every patch's offset from the mean differences of overlapping
  neighbours (a graph Laplacian), then a blend on the object grid. It needs only small per-patch
  reductions (:class:`PatchReducer`), so :class:`PairwiseStitcher` can take the patches chunk by chunk,
  or sum the reductions of tiles made on other machines, and never holds the patches. Raster scans
  (any lattice of positions, in either frame order) take a faster path for the neighbour search and
  the offsets than other positions, with the same result;
* :func:`stitch_least_squares` — the exact least squares over the upsampled canvas and all offsets;
* :func:`stitch_seed` — the original iterative blending (Phys. Rev. Lett. 130, 016101), for comparison.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import scipy.sparse as sp
from scipy.fft import dctn, idctn
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import LinearOperator, cg, splu
from scipy.spatial import cKDTree

from ..errors import ShapeError, ValueRangeError
from ..physics.geometry import Geometry, bin_image

METHODS = ("pairwise", "least-squares", "seed")

# Relative residual ‖M c − b‖ / ‖b‖ at which the offsets count as solved. The offsets enter the image
# directly, so this leaves solver errors many orders of magnitude below any physical error.
_CG_RTOL = 1e-10
_CG_MAXITER = 1000
# The pairwise stitcher's offsets are means over ~10² pixels of noisy patches; a relative residual of
# 1e-5 leaves solver errors far below that noise (measured: the RMSE against the truth does not change
# in the fourth digit from 1e-10 to 1e-5).
_PAIRWISE_RTOL = 1e-5
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
    top = np.ceil([positions[:, 0].max(), positions[:, 1].max()]).astype(np.int64)
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


def _masked_values(patches: np.ndarray, rows: np.ndarray, cols: np.ndarray, dtype=np.float64) -> np.ndarray:
    """The used pixels of every patch, shape (N, K), in the order of ``rows, cols`` (row-major)."""
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    if len(rows) == (r1 - r0) * (c1 - c0):  # the mask fills its bounding box: a slice, no gather
        return patches[:, r0:r1, c0:c1].reshape(patches.shape[0], -1).astype(dtype)
    flat = patches.reshape(patches.shape[0], -1)
    # np.take along one axis of the flattened patches is several times faster than indexing the
    # (N, out, out) array with two index arrays.
    return np.take(flat, rows * patches.shape[2] + cols, axis=1).astype(dtype)


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


def _is_tensor(x) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch for NumPy callers."""
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


# ------------------------------------------------------------------------------------------- checks
def _check_placement(positions, mask, geometry: Geometry):
    """Validate positions, mask and geometry without any patches (for the streaming stitcher)."""
    if not isinstance(geometry, Geometry):
        raise ShapeError(f"geometry: expected a deepphase Geometry, got {type(geometry).__name__}")
    out = geometry.output_px
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] != 2 or positions.shape[0] < 1:
        raise ShapeError(f"positions: expected an array of shape (N, 2) with (row, col), got shape {positions.shape}")
    if not (np.issubdtype(positions.dtype, np.floating) or np.issubdtype(positions.dtype, np.integer)):
        raise ShapeError(f"positions: expected numbers, got dtype {positions.dtype}")
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
    return positions, mask


def _check_inputs(patches, positions, mask, geometry: Geometry, check_finite: bool = True):
    """Validate the common arguments; return (patches, positions as float64, mask as bool).

    ``check_finite=False`` leaves the NaN/Inf check to the caller (see :func:`_check_finite`), which can
    do it in one pass over the masked values it extracts anyway.
    """
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
    n = patches.shape[0]

    positions, mask = _check_placement(positions, mask, geometry)
    if positions.shape[0] != n:
        raise ShapeError(f"positions: expected one position per patch ({n}), got {positions.shape[0]}")
    if not check_finite:
        return patches, positions, mask
    # Only pixels inside the mask are used, so only they must be finite (a view, no copy).
    rows, cols = np.nonzero(mask)
    used = patches[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    finite = np.isfinite(used) | ~mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    if not finite.all():
        raise ValueRangeError(
            f"patches: expected finite phases, found {int(finite.size - np.count_nonzero(finite))} NaN or Inf values "
            "inside the mask"
        )
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
    """Stitch by solving for every patch's unknown offset jointly with the canvas (exact; slower than pairwise).

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
    laplacian = (sp.diags(np.full(overlap.shape[0], float(patch_weight))) - overlap).tocsr()
    return _solve_laplacian(laplacian, b, positions, geometry, rows, cols)


def _solve_laplacian(laplacian, b, positions, geometry, rows, cols, rtol: float = _CG_RTOL) -> np.ndarray:
    """Solve ``L c = b`` for a graph Laplacian ``L`` (one free constant per connected group).

    The first patch of each group is pinned by doubling its diagonal entry (see :func:`_solve_offsets`),
    the system is solved by preconditioned CG, and each group's offsets are shifted to mean 0.
    """
    n = laplacian.shape[0]
    n_groups, group = connected_components(laplacian, directed=False)
    diagonal = laplacian.diagonal()
    pinned = np.zeros(n)
    first = np.unique(group, return_index=True)[1]
    pinned[first] = np.where(diagonal[first] > 0, diagonal[first], 1.0)
    M = (laplacian + sp.diags(pinned)).tocsr()
    c = np.zeros(n)
    if np.any(b):
        c = _pcg(M, b, _aggregates(positions, group, geometry, rows, cols), rtol)
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


def _pcg(M, b, aggregate, rtol: float = _CG_RTOL) -> np.ndarray:
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

    c, info = cg(M, b, rtol=rtol, atol=0.0, maxiter=_CG_MAXITER, M=LinearOperator(M.shape, matvec=apply))
    if info != 0:
        warnings.warn(f"stitching: the offsets did not converge to {rtol:g} in {_CG_MAXITER} "
                      "conjugate-gradient iterations; the image may show seams", RuntimeWarning, stacklevel=4)
    return c


# ------------------------------------------------------------------------------------ pairwise (fast)
# Patches per matrix product in PatchReducer.reduce: a block this size (0.6 MB of float32 at 144 used
# pixels) is still in the cache when it is multiplied after being gathered (measured at 65,536 patches:
# 256 to 2048 are equally fast, 1.2× faster than gathering all patches first).
_REDUCE_BLOCK = 1024
# Positions within this many pixels of a lattice count as one (raster_positions is exact to ~1e-13 px).
_LATTICE_TOL = 1e-6
# A lattice whose neighbours lie more than this many index steps apart is searched by the KD-tree.
_LATTICE_MAX_STEPS = 64


def _scan_lattice(positions: np.ndarray):
    """The lattice of a raster scan, or None for positions that are not one.

    Returns ``(slow, fast, a, b)`` such that ``positions[s·fast + f] = positions[0] + s·a + f·b`` for
    ``s < slow``, ``f < fast`` within ``_LATTICE_TOL`` pixels: any raster in either frame order, at any
    steps and rotation. ``fast`` is where the step between consecutive frames first changes.
    """
    n = len(positions)
    if n < 2:
        return None
    b = positions[1] - positions[0]
    off = np.abs(np.diff(positions[:, 0]) - b[0]) > _LATTICE_TOL
    off |= np.abs(np.diff(positions[:, 1]) - b[1]) > _LATTICE_TOL
    fast = int(np.argmax(off)) + 1 if off.any() else n
    if n % fast:
        return None
    slow = n // fast
    a = positions[fast] - positions[0] if slow > 1 else np.zeros(2)
    for axis in (0, 1):
        model = positions[0, axis] + np.add.outer(np.arange(slow) * a[axis], np.arange(fast) * b[axis])
        if np.abs(model - positions[:, axis].reshape(slow, fast)).max() > _LATTICE_TOL:
            return None
    return slow, fast, a, b


def _lattice_pairs(origins: np.ndarray, lattice, radius: float, upsample: int):
    """Neighbour pairs of a lattice scan by index arithmetic: the pairs ``cKDTree.query_pairs`` finds.

    Returns ``(pairs, lag, steps, per_step)``: the pairs ``(i, j)``, ``i < j``, whose canvas origins lie
    within ``radius``, grouped by index step and ordered by ``i`` within a step; their canvas lags
    ``origin_j − origin_i`` as (rows, cols); the index steps ``(ds, df)`` that hold pairs,
    ``j − i = ds·fast + df``; and the number of pairs at each step. None where the lattice is
    degenerate or its neighbours lie too many index steps apart (the KD-tree is then the better search).
    """
    slow, fast, a, b = lattice
    gram = upsample**2 * np.array([[a @ a, a @ b], [a @ b, b @ b]])
    smallest = gram[1, 1] if slow == 1 else np.linalg.eigvalsh(gram)[0]
    if not smallest > 1e-12 * max(gram.max(), 1.0):
        return None
    # Rounding moves an origin by at most ½ canvas pixel per axis and the lattice fit allows
    # _LATTICE_TOL, so origins (ds, df) index steps apart lie at least u·|ds·a + df·b| − √2 − ε apart:
    # steps further than radius + √2 + ε hold no pairs.
    reach = radius + np.sqrt(2.0) + 4 * upsample * _LATTICE_TOL
    bound = int(np.floor(reach / np.sqrt(smallest)))
    ds_max, df_max = min(bound, slow - 1), min(bound, fast - 1)
    if (ds_max + 1) * (2 * df_max + 1) > 100 * _LATTICE_MAX_STEPS:
        return None
    ds, df = (g.ravel() for g in np.meshgrid(np.arange(ds_max + 1), np.arange(-df_max, df_max + 1), indexing="ij"))
    near = upsample * np.hypot(*(ds[:, None] * a + df[:, None] * b).T) <= reach
    candidates = np.stack([ds, df], axis=1)[near & ((ds > 0) | (df > 0))]
    if len(candidates) > _LATTICE_MAX_STEPS:
        return None
    candidates = candidates[np.argsort(candidates[:, 0] * fast + candidates[:, 1], kind="stable")]
    # Along the flat frame index, step (ds, df) pairs frame k with k + ds·fast + df: a difference of two
    # slices, where frames whose f + df leaves the row are not pairs. int32 halves the memory traffic
    # where squared lags cannot overflow it.
    dtype = np.int32 if origins.max() < 2**15 else np.int64
    row, col = origins[:, 0].astype(dtype), origins[:, 1].astype(dtype)
    f_index = np.arange(len(origins)) % fast
    first, second, lag_rows, lag_cols, steps = [], [], [], [], []
    for s_step, f_step in candidates.tolist():
        delta = s_step * fast + f_step
        lag_r, lag_c = row[delta:] - row[:-delta], col[delta:] - col[:-delta]
        near = lag_r * lag_r + lag_c * lag_c <= radius * radius
        if f_step > 0:
            near &= f_index[:-delta] < fast - f_step
        elif f_step < 0:
            near &= f_index[:-delta] >= -f_step
        index = np.flatnonzero(near)
        if len(index):
            first.append(index)
            second.append(index + delta)
            lag_rows.append(lag_r[index])
            lag_cols.append(lag_c[index])
            steps.append((s_step, f_step))
    per_step = np.array([len(f) for f in first], dtype=np.int64)
    pairs = np.empty((int(per_step.sum()), 2), dtype=np.int64)
    if len(pairs):
        pairs[:, 0] = np.concatenate(first)
        pairs[:, 1] = np.concatenate(second)
        lag = (np.concatenate(lag_rows), np.concatenate(lag_cols))
    else:
        lag = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    return pairs, lag, np.array(steps, dtype=np.int64).reshape(-1, 2), per_step


class _LatticeSolver:
    """``L c = b`` for the neighbour Laplacian of a connected lattice scan: CG with a DCT preconditioner.

    On a raster the Laplacian is one stencil (a weight at each index step) repeated over the
    ``slow × fast`` index grid, with free edges; only the rounding of the canvas origins makes the
    weights vary a little from place to place. Its constant-coefficient version, each step at its mean
    weight ``w̄_t``, is a 2-D Poisson-like operator that the 2-D DCT-II diagonalises (exactly for the
    steps along the axes, up to edge terms for diagonal and longer steps) with eigenvalues
    ``Σ_t w̄_t (2 − 2 cos(ds_t θ_s + df_t θ_f))``. Its pseudo-inverse, two DCTs, preconditions CG on
    the singular system; the constant, its null space, is projected out. 8 iterations reach a relative
    residual of 1e-5 at 65,536 positions (the two-level preconditioner of :func:`_pcg` needs 13 and a
    sparse LU of the coarse problem).

    Built from the geometry only (the weights are overlap pixel counts), so one instance serves every
    set of patches of the scan.

    Parameters
    ----------
    slow, fast : int
        The index grid: position ``k = s·fast + f``.
    steps : (T, 2) int array
        Index steps ``(ds, df)`` of the pairs, each ``ds·fast + df > 0``.
    bounds : (T + 1,) int array
        The pairs of step ``t`` are ``bounds[t] … bounds[t + 1] − 1``.
    first : (P,) int array
        Each pair's first position ``i`` (the second is ``i + ds·fast + df``).
    weight : (P,) float array
        Each pair's weight (overlap pixels).
    """

    def __init__(self, slow, fast, steps, bounds, first, weight):
        n = slow * fast
        self.shape, self.first, self.bounds = (slow, fast), first, bounds
        self.delta = steps[:, 0] * fast + steps[:, 1]
        # Banded: one diagonal at ±δ_t per step (DIA holds entry (k − offset, k) in column k), so the
        # matrix is assembled step by step from the pairs, without a sort.
        # Two steps can share an offset δ: with 2 positions along the fast axis, (0, 1) and (1, −1) are both
        # δ = 1 (their pairs are different entries of one diagonal); SciPy refuses repeated offsets, so
        # each distinct δ gets one diagonal.
        offsets, diagonal = np.unique(self.delta, return_inverse=True)
        n_diagonals = len(offsets)
        data = np.zeros((2 * n_diagonals + 1, n))
        for t, d in enumerate(self.delta):
            at, w = first[bounds[t] : bounds[t + 1]], weight[bounds[t] : bounds[t + 1]]
            data[n_diagonals + 1 + diagonal[t], at + d] -= w  # entry (k, k + δ)
            data[n_diagonals - 1 - diagonal[t], at] -= w  # entry (k + δ, k)
        data[n_diagonals] = -data.sum(axis=0)  # symmetric: a row's sum is its column's
        self.laplacian = sp.dia_matrix((data, np.concatenate([-offsets[::-1], [0], offsets])), shape=(n, n))
        mean_weight = np.array([weight[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]) / (
            (slow - np.abs(steps[:, 0])) * (fast - np.abs(steps[:, 1])))
        theta_s, theta_f = np.pi * np.arange(slow) / slow, np.pi * np.arange(fast) / fast
        eigenvalues = np.zeros((slow, fast))
        for (ds, df), w in zip(steps, mean_weight):
            # 2 − 2 cos(x + y) from outer products along each axis (no cosine of the whole grid)
            eigenvalues += 2 * w
            eigenvalues -= 2 * w * (np.multiply.outer(np.cos(ds * theta_s), np.cos(df * theta_f))
                                    - np.multiply.outer(np.sin(ds * theta_s), np.sin(df * theta_f)))
        eigenvalues[0, 0] = np.inf  # the constant: projected out
        # float32 halves the cost of the DCTs; a preconditioner needs no more digits (CG checks the residual
        # in float64).
        self.inverse = (1.0 / eigenvalues).astype(np.float32)

    def _precondition(self, r):
        spectrum = dctn(r.reshape(self.shape).astype(np.float32), norm="ortho", overwrite_x=True)
        spectrum *= self.inverse
        return idctn(spectrum, norm="ortho", overwrite_x=True).ravel().astype(np.float64)

    def solve(self, difference, rtol: float) -> np.ndarray:
        """Offsets, mean 0, from each pair's ``difference = w·d`` (in the order of the pairs)."""
        n = self.shape[0] * self.shape[1]
        # b = Σ_pairs w d (e_j − e_i); within a step no position occurs twice, so no np.add.at is needed
        b = np.zeros(n)
        for t, d in enumerate(self.delta):
            at, wd = self.first[self.bounds[t] : self.bounds[t + 1]], difference[self.bounds[t] : self.bounds[t + 1]]
            b[at] -= wd
            b[at + d] += wd
        b -= b.mean()  # L's range; b has zero sum up to rounding
        target = rtol * np.linalg.norm(b)
        c = np.zeros(n)
        if not target > 0:
            return c
        r = b
        z = self._precondition(r)
        p = z.copy()
        rz = r @ z
        for _ in range(_CG_MAXITER):
            lp = self.laplacian @ p
            alpha = rz / (p @ lp)
            c += alpha * p
            r -= alpha * lp
            if np.linalg.norm(r) <= target:
                break
            z = self._precondition(r)
            rz, rz_old = r @ z, rz
            p *= rz / rz_old
            p += z
        else:
            warnings.warn(f"stitching: the offsets did not converge to {rtol:g} in {_CG_MAXITER} "
                          "conjugate-gradient iterations; the image may show seams", RuntimeWarning, stacklevel=4)
        return c - c.mean()


class PatchReducer:
    """What the pairwise stitcher needs from each patch, for patches at any positions (small, picklable).

    A patch is reduced to its overlap sums at each neighbour lag (``2 × n_lags`` numbers: its sum over
    the part of its mask that a neighbour at that lag would cover, as the first and as the second of
    the pair) and to its pixels binned on the object grid. Both are linear in the patch, so the
    reductions of any split of the scan (chunks read one after another, tiles on several workers) add
    up to those of the whole: this is what lets the stitcher stream and distribute.

    Parameters
    ----------
    mask : (out, out) bool array
    geometry : Geometry
    lags : (L, 2) int array
        Canvas lags ``origin_j − origin_i`` of the neighbour pairs (see :class:`PairwiseStitcher`).
    """

    def __init__(self, mask: np.ndarray, geometry: Geometry, lags: np.ndarray):
        self.geometry = geometry
        mask = np.asarray(mask, dtype=bool)
        self.rows, self.cols = np.nonzero(mask)
        self.lags = np.asarray(lags, dtype=np.int64).reshape(-1, 2)
        rows, cols = self.rows, self.cols

        def covered(dr, dc):
            """Whether mask pixel k, moved by (dr, dc), is still inside the mask."""
            r, c = rows + dr, cols + dc
            inside = (r >= 0) & (r < mask.shape[0]) & (c >= 0) & (c < mask.shape[1])
            hit = np.zeros(len(rows), dtype=np.float32)
            hit[inside] = mask[r[inside], c[inside]]
            return hit

        # in_i[k, l]: 1 where mask pixel k of patch i is also covered by patch j at lag l (in_j: the same
        # pixels seen from patch j).
        self.in_i = np.zeros((len(rows), len(self.lags)), dtype=np.float32)
        self.in_j = np.zeros((len(rows), len(self.lags)), dtype=np.float32)
        for l, (dr, dc) in enumerate(self.lags):
            self.in_i[:, l] = covered(-dr, -dc)
            self.in_j[:, l] = covered(dr, dc)
        self.overlap_px = self.in_i.sum(axis=0)
        # Binning on the object grid: a patch whose origin has sub-pixel phase (fr, fc) puts mask pixel
        # k into bin ((r + fr) // u, (c + fc) // u) of a small window; one matrix per phase.
        u = geometry.upsample
        self.span = ((rows.max() + u - 1) // u + 1, (cols.max() + u - 1) // u + 1)
        self.binning, self.bin_counts, self.bin_used = [], [], []
        for pid in range(u * u):
            fr, fc = divmod(pid, u)
            bins = ((rows + fr) // u) * self.span[1] + (cols + fc) // u
            matrix = np.zeros((len(rows), self.span[0] * self.span[1]), dtype=np.float32)
            matrix[np.arange(len(rows)), bins] = 1.0
            used = np.flatnonzero(matrix.sum(axis=0))
            self.binning.append(matrix[:, used])
            self.bin_counts.append(matrix.sum(axis=0)[used])
            self.bin_used.append(used)
        # Rows and columns of bins each phase reaches: a window sized by ``span`` alone would reach one
        # bin past the image for a patch at the scan's far edge whose mask touches the crop's edge.
        self.extent = np.array([[used.max() // self.span[1] + 1, (used % self.span[1]).max() + 1]
                                for used in self.bin_used], dtype=np.int64)
        # One matrix product per patch gives all of its reductions: the overlap sums at every lag, as
        # the first and as the second of a pair, and its binned pixels for its own sub-pixel phase.
        self.weights = [np.ascontiguousarray(np.concatenate([self.in_i, self.in_j, m], axis=1)) for m in self.binning]
        # A mask that fills its bounding box is read as a slice of each patch, not gathered pixel by pixel.
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        self.box = (int(r0), int(r1), int(c0), int(c1)) if len(rows) == (r1 - r0) * (c1 - c0) else None

    def _refuse_non_finite(self, patches):
        bad = int(np.count_nonzero(~np.isfinite(_masked_values(patches, self.rows, self.cols, np.float32))))
        raise ValueRangeError(f"patches: expected finite phases, found {bad} NaN or Inf values inside the mask")

    def bin_targets(self, origins: np.ndarray, pid: int, width: int) -> np.ndarray:
        """Flat object-grid index of each used bin, (len(origins), n_bins), for origins of phase ``pid``."""
        used = self.bin_used[pid]
        base = origins // self.geometry.upsample
        return np.add.outer(base[:, 0] * width + base[:, 1], (used // self.span[1]) * width + used % self.span[1])

    def _layout(self, origins):
        """Where the reductions of patches at ``origins`` land: the binned window's top-left object pixel
        and shape, the origins relative to it, and the patches grouped by sub-pixel phase (``order``,
        with group ``pid`` at ``order[bounds[pid]:bounds[pid + 1]]``, frame order kept within a group)."""
        origins = np.asarray(origins)
        u = self.geometry.upsample
        base = origins // u
        top = np.array([base[:, 0].min(), base[:, 1].min()])
        phase_id = (origins[:, 0] % u) * u + origins[:, 1] % u
        shape = (base + self.extent[phase_id]).max(axis=0) - top
        # A stable sort keeps the frame order within a phase, so each block reads nearby patches
        # (on small integers NumPy's stable sort is a radix sort).
        order = np.argsort(phase_id.astype(np.uint8 if u * u <= 256 else np.int64), kind="stable")
        bounds = np.searchsorted(phase_id[order], np.arange(u * u + 1))
        return top, shape, origins - u * top, order, bounds

    def reduce(self, patches: np.ndarray, origins: np.ndarray, remove_mean: bool = True) -> dict:
        """Reductions of patches at canvas ``origins``: overlap sums and a binned window of the image.

        ``remove_mean=False`` keeps each patch's mean (see below) in its reductions: for per-pixel
        quantities that have no arbitrary offset and are blended with offsets zero, such as a σ head's
        standard deviations (their float32 sums are then exact to ~1e-7 of the values, not of the
        differences).

        Returns a dict with ``sums_i``, ``sums_j`` (n, L) float32, and ``window`` (rows, cols) float64
        holding the binned sums of the patches' pixels (offsets not yet added), whose top-left is
        object pixel ``window_origin``.

        The patches are read once, in blocks of one sub-pixel phase (which share a binning matrix);
        each block's used pixels, their mean removed in float32, are multiplied by that phase's
        ``weights``, which yields every reduction of the block in one product.

        ``patches`` may also be a torch tensor, on the device where the network made it (a GPU): the
        products and the binning then run there and only the reductions come back to the host (0.12 kB
        a patch at the reference step, 2 × 14 float32 overlap sums and its share of the window, instead
        of the 4 kB patch). The result is the same to float32 rounding.
        """
        if _is_tensor(patches):
            return self._reduce_tensor(patches, origins, remove_mean)
        patches = np.asarray(patches)
        n, n_lags, u = len(patches), len(self.lags), self.geometry.upsample
        top, shape, local, order, bounds = self._layout(origins)
        window = np.zeros(int(shape[0] * shape[1]))
        flat = None if self.box is not None else patches.reshape(n, -1)
        pixels = self.rows * patches.shape[-1] + self.cols
        # The products land in phase order; one gather at the end puts the sums back in frame order
        # (2× faster than scattering every block's rows).
        sorted_i = np.empty((n, n_lags), dtype=np.float32)
        sorted_j = np.empty((n, n_lags), dtype=np.float32)
        # NaN and Inf are refused below, once for all pixels: no warnings on the way
        with np.errstate(invalid="ignore", over="ignore"):
            for pid in range(u * u):
                lo, hi = int(bounds[pid]), int(bounds[pid + 1])
                if lo == hi:
                    continue
                weights = self.weights[pid]
                binned = np.empty((hi - lo, weights.shape[1] - 2 * n_lags), dtype=np.float32)
                for start in range(lo, hi, _REDUCE_BLOCK):
                    stop = min(start + _REDUCE_BLOCK, hi)
                    members = order[start:stop]
                    if self.box is not None:
                        r0, r1, c0, c1 = self.box
                        q = patches[members, r0:r1, c0:c1].reshape(len(members), -1)
                    else:
                        q = flat[members[:, None], pixels]
                    q = q.astype(np.float32, copy=False)
                    # Sums in float32 lose digits in proportion to the values summed, and a BLAS kernel
                    # rounds a row differently depending on the number of rows in the product: sums of
                    # patches that carry a large constant would differ in their last digits between
                    # chunkings. Removing each patch's mean first keeps the sums small (einsum: a fixed
                    # summation order per row, 2.5× faster than ndarray.mean). What rounding leaves of the
                    # mean is a constant of the patch, which its offset absorbs.
                    if remove_mean:
                        q -= (np.einsum("pk->p", q) / np.float32(q.shape[1]))[:, None]
                    product = q @ weights
                    sorted_i[start:stop] = product[:, :n_lags]
                    sorted_j[start:stop] = product[:, n_lags : 2 * n_lags]
                    binned[start - lo : stop - lo] = product[:, 2 * n_lags :]
                target = self.bin_targets(local[order[lo:hi]], pid, int(shape[1]))
                window += np.bincount(target.ravel(), binned.ravel().astype(np.float64), minlength=window.size)
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)
        # A NaN or Inf pixel makes its patch's sum, hence its mean and every reduction of it, NaN or
        # ±Inf, binned values included: one check covers all pixels.
        if not np.isfinite(window).all():
            self._refuse_non_finite(patches)
        return {"sums_i": np.take(sorted_i, inverse, axis=0), "sums_j": np.take(sorted_j, inverse, axis=0),
                "window": window.reshape(int(shape[0]), int(shape[1])), "window_origin": top}

    def __getstate__(self):
        # Sent to dask workers: without the tensors made for a device here (rebuilt on first use there).
        return {k: v for k, v in self.__dict__.items() if k != "_on_device"}

    def _device_constants(self, device):
        """The weights and the bins' offsets in the window, as tensors on ``device`` (made once per device)."""
        import torch

        key = str(device)
        cache = self.__dict__.setdefault("_on_device", {})
        if key not in cache:
            cache[key] = {
                "weights": [torch.from_numpy(w).to(device) for w in self.weights],
                "pixels": torch.from_numpy(self.rows * self.geometry.output_px + self.cols).to(device),
                "bin_row": [torch.from_numpy(used // self.span[1]).to(device) for used in self.bin_used],
                "bin_col": [torch.from_numpy(used % self.span[1]).to(device) for used in self.bin_used],
            }
        return cache[key]

    def _reduce_tensor(self, patches, origins, remove_mean: bool) -> dict:
        """:meth:`reduce` of a torch tensor of patches, computed on its device."""
        import torch

        device, n, n_lags = patches.device, patches.shape[0], len(self.lags)
        top, shape, local, order, bounds = self._layout(origins)
        const = self._device_constants(device)
        if self.box is not None:
            r0, r1, c0, c1 = self.box
            q = patches[:, r0:r1, c0:c1].reshape(n, -1)
        else:
            q = patches.reshape(n, -1).index_select(1, const["pixels"])
        q = q.float()
        if remove_mean:  # see reduce(): small sums round alike in any chunking
            q = q - q.mean(dim=1, keepdim=True)
        u, width = self.geometry.upsample, int(shape[1])
        base = torch.from_numpy(local // u).to(device)
        order_t = torch.from_numpy(order).to(device)
        sums_i = torch.empty((n, n_lags), dtype=torch.float32, device=device)
        sums_j = torch.empty((n, n_lags), dtype=torch.float32, device=device)
        window = torch.zeros(int(shape[0]) * width, dtype=torch.float64, device=device)
        for pid in range(u * u):
            lo, hi = int(bounds[pid]), int(bounds[pid + 1])
            if lo == hi:
                continue
            members = order_t[lo:hi]
            product = q.index_select(0, members) @ const["weights"][pid]
            sums_i[members] = product[:, :n_lags]
            sums_j[members] = product[:, n_lags : 2 * n_lags]
            # bin_targets() on the device: each patch's window bins, from its object-grid corner
            corner = base.index_select(0, members)
            target = ((corner[:, :1] + const["bin_row"][pid]) * width + corner[:, 1:] + const["bin_col"][pid])
            window.index_add_(0, target.reshape(-1), product[:, 2 * n_lags :].reshape(-1).double())
        if not bool(torch.isfinite(window).all()):
            bad = int((~torch.isfinite(patches.reshape(n, -1).index_select(1, const["pixels"]))).sum())
            raise ValueRangeError(f"patches: expected finite phases, found {bad} NaN or Inf values inside the mask")
        return {"sums_i": sums_i.cpu().numpy(), "sums_j": sums_j.cpu().numpy(),
                "window": window.cpu().numpy().reshape(int(shape[0]), width), "window_origin": top}


class PairwiseStitcher:
    """The pairwise stitcher, fed patches chunk by chunk: memory grows with the scan by ~0.5 kB a position.

    Holding every predicted patch costs 4 kB a position (and a copy inside the solve); this keeps only
    each patch's overlap sums at the neighbour lags, the binned image sums, and the neighbour graph,
    so a scan larger than memory can be predicted and stitched in chunks. The image is the one
    :func:`stitch_pairwise` makes from all the patches at once (the same arithmetic, summed in another
    order). For many scans of one geometry, make one and stitch each scan in an :meth:`empty_copy`.

    Parameters
    ----------
    positions : (N, 2) array
        Top-left corners of all the probe windows of the scan, (row, col) in real-space pixels.
    mask, geometry, radius
        As in :func:`stitch_pairwise`.

    Examples
    --------
    >>> stitcher = PairwiseStitcher(positions, mask, geometry)
    >>> for start in range(0, len(positions), 4096):
    ...     stitcher.add(predict(start, start + 4096), start)
    >>> image = stitcher.image()
    """

    def __init__(self, positions, mask, geometry: Geometry, radius: float | None = None):
        positions, mask = _check_placement(positions, mask, geometry)
        self.positions, self.mask, self.geometry = positions, mask, geometry
        rows, cols = np.nonzero(mask)
        self.origins = patch_origins(positions, geometry)
        extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        radius = 0.5 * extent if radius is None else float(radius)
        if not radius > 0:
            raise ValueRangeError(f"radius: expected a positive distance in canvas pixels, got {radius}")
        # A raster's neighbours lie a few index steps apart and are found by index arithmetic (9× faster
        # than the KD-tree at 65,536 positions); any other scan goes to the KD-tree. Both find the same pairs.
        lattice = _scan_lattice(positions)
        found = None if lattice is None else _lattice_pairs(self.origins, lattice, radius, geometry.upsample)
        if found is None:
            pairs = cKDTree(self.origins).query_pairs(radius, output_type="ndarray").astype(np.int64)
            lag = (self.origins[pairs[:, 1], 0] - self.origins[pairs[:, 0], 0],
                   self.origins[pairs[:, 1], 1] - self.origins[pairs[:, 0], 1])
        else:
            pairs, lag = found[:2]
        lags = np.zeros((0, 2), dtype=np.int64)
        which = np.zeros(0, dtype=np.int64)
        if len(pairs):
            # Lags are small integers: index them through a table instead of sorting the pairs.
            span = int(np.ceil(radius)) + 1
            code = (lag[0] + span) * (2 * span + 1) + (lag[1] + span)
            present = np.flatnonzero(np.bincount(code, minlength=(2 * span + 1) ** 2))
            table = np.zeros((2 * span + 1) ** 2, dtype=np.int64)
            table[present] = np.arange(len(present))
            which = table[code]
            lags = np.stack([present // (2 * span + 1) - span, present % (2 * span + 1) - span], axis=1)
        self.reducer = PatchReducer(mask, geometry, lags)
        keep = self.reducer.overlap_px[which] > 0  # a lag whose masks do not meet couples nothing
        self.pairs, self.which = (pairs, which) if keep.all() else (pairs[keep], which[keep])
        # The lattice solver needs one connected group: all index neighbours along both axes coupling
        # is a cheap sufficient test (any other scan goes to the general solver).
        self._lattice = None
        if found is not None and len(self.pairs):
            slow, fast = lattice[:2]
            steps, count = found[2], found[3]
            if not keep.all():
                count = np.bincount(np.repeat(np.arange(len(steps)), count)[keep], minlength=len(steps))
            index = {(int(ds), int(df)): t for t, (ds, df) in enumerate(steps)}
            if all(count[index[axis]] == full if axis in index else full == 0
                   for axis, full in (((0, 1), slow * (fast - 1)), ((1, 0), (slow - 1) * fast))):
                self._lattice = (slow, fast, steps, count)
        # What the offsets' equations and the blend need from the geometry alone, made on first use and
        # shared with every empty_copy.
        self._shared = {}
        n = len(positions)
        self.shape = tuple(s // geometry.upsample for s in canvas_shape(positions, geometry))
        self.sums_i = np.zeros((n, len(lags)), dtype=np.float32)
        self.sums_j = np.zeros((n, len(lags)), dtype=np.float32)
        self.total = np.zeros(self.shape)
        self.done = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return len(self.positions)

    def empty_copy(self) -> "PairwiseStitcher":
        """A stitcher for the same scan with no patches added, sharing this one's geometry-only parts.

        The neighbour graph, the reducer, the offsets' equations and solver, and the coverage of the
        image depend on the positions, mask and geometry only. A session that stitches many scans of
        one geometry (or several dropout draws of one scan) makes them once and copies: at 65,536
        raster positions that saves about a fifth of a fresh stitcher's time (benchmarks/RESULTS.md,
        section 3). The copies never change what they share.

        Examples
        --------
        >>> template = PairwiseStitcher(positions, mask, geometry)
        >>> for patches in scans:
        ...     stitcher = template.empty_copy()
        ...     stitcher.add(patches)
        ...     images.append(stitcher.image())
        """
        self._equations()  # made here, so that every copy shares it
        other = copy.copy(self)
        n, n_lags = len(self), len(self.reducer.lags)
        other.sums_i = np.zeros((n, n_lags), dtype=np.float32)
        other.sums_j = np.zeros((n, n_lags), dtype=np.float32)
        other.total = np.zeros(self.shape)
        other.done = np.zeros(n, dtype=bool)
        return other

    @property
    def n_done(self) -> int:
        """How many patches have been added."""
        return int(np.count_nonzero(self.done))

    def add(self, patches, start: int = 0, remove_mean: bool = True) -> None:
        """Add the patches of positions ``start … start + len(patches) − 1``."""
        self.add_reductions(self.reduce(patches, start, remove_mean), start)

    def reduce(self, patches, start: int = 0, remove_mean: bool = True) -> dict:
        """The reductions of the patches of positions ``start …`` (checked), not yet added.

        ``remove_mean=False``: for patches blended with ``image(offsets=False)`` (see :meth:`PatchReducer.reduce`).
        ``patches`` may be a torch tensor on a GPU: reduced there (see :meth:`PatchReducer.reduce`).
        """
        tensor = _is_tensor(patches)
        patches = patches if tensor else np.asarray(patches)
        stop = int(start) + (patches.shape[0] if patches.ndim == 3 else 0)
        if not 0 <= start < stop <= len(self):
            raise ShapeError(f"patches: expected patches for positions within 0…{len(self) - 1}, got "
                             f"{patches.shape[0] if patches.ndim == 3 else 'no'} patches from position {start}")
        if tensor:
            out = self.geometry.output_px
            if tuple(patches.shape[1:]) != (out, out) or not patches.is_floating_point():
                raise ShapeError(f"patches: expected a float tensor of shape (N, {out}, {out}), got {patches.dtype} "
                                 f"of shape {tuple(patches.shape)}")
        else:
            _check_inputs(patches, self.positions[start:stop], self.mask, self.geometry, check_finite=False)
        return self.reducer.reduce(patches, self.origins[start:stop], remove_mean)

    def add_reductions(self, reduced: dict, start: int) -> None:
        """Add what :meth:`PatchReducer.reduce` made of the patches of positions ``start …`` (e.g. on a worker).

        The reductions of all positions at once are taken over, not copied: do not change their arrays
        afterwards.
        """
        stop = start + len(reduced["sums_i"])
        if self.done[start:stop].any():
            first = start + int(np.argmax(self.done[start:stop]))
            raise ValueRangeError(f"patches: position {first} was already added; each patch is added once")
        whole = start == 0 and stop == len(self)
        for name in ("sums_i", "sums_j"):
            value, held = reduced[name], getattr(self, name)
            if whole and isinstance(value, np.ndarray) and value.dtype == held.dtype and value.shape == held.shape:
                setattr(self, name, value)  # 2 × 3.7 MB not copied at 65,536 positions
            else:
                held[start:stop] = value
        (r0, c0), window = reduced["window_origin"], reduced["window"]
        self.total[r0 : r0 + window.shape[0], c0 : c0 + window.shape[1]] += window
        self.done[start:stop] = True

    def state(self) -> dict:
        """The accumulated arrays (for a checkpoint: ``np.savez``, no pickle)."""
        return {"sums_i": self.sums_i, "sums_j": self.sums_j, "total": self.total, "done": self.done}

    def load_state(self, state) -> None:
        """Restore what :meth:`state` returned (for the same positions, mask and geometry)."""
        for name in ("sums_i", "sums_j", "total", "done"):
            value = np.asarray(state[name])
            if value.shape != getattr(self, name).shape:
                raise ShapeError(f"state: {name} has shape {value.shape}, expected {getattr(self, name).shape} "
                                 "(a checkpoint of another scan or model?)")
            setattr(self, name, value.astype(getattr(self, name).dtype))

    def _equations(self):
        """Flat indices of each pair's overlap sums, the pairs' weights and, on a lattice, its solver."""
        if "system" not in self._shared:
            n_lags = len(self.reducer.lags)
            i, j = self.pairs[:, 0], self.pairs[:, 1]
            weight = self.reducer.overlap_px[self.which].astype(np.float64)
            solver = None
            if self._lattice is not None:
                slow, fast, steps, count = self._lattice
                solver = _LatticeSolver(slow, fast, steps, np.concatenate([[0], np.cumsum(count)]), i, weight)
            self._shared["system"] = (i * n_lags + self.which, j * n_lags + self.which, weight, solver)
        return self._shared["system"]

    def offsets(self) -> np.ndarray:
        """Every patch's offset: the least-squares agreement of all neighbour pairs' overlaps."""
        n = len(self)
        if not len(self.pairs):
            return np.zeros(n)
        i, j = self.pairs[:, 0], self.pairs[:, 1]
        flat_i, flat_j, weight, solver = self._equations()
        # w·d, with d = mean over the overlap of (q_i − q_j): the difference of the two overlap sums
        difference = np.take(self.sums_i, flat_i).astype(np.float64) - np.take(self.sums_j, flat_j)
        if solver is not None:
            return solver.solve(difference, rtol=_PAIRWISE_RTOL)
        # Σ w (c_j − c_i − d)² → L c = b with b_j += w d, b_i −= w d.
        b = np.bincount(j, difference, minlength=n) - np.bincount(i, difference, minlength=n)
        if not np.any(b):
            return np.zeros(n)
        laplacian = sp.csr_matrix((np.concatenate([-weight, -weight]), (np.concatenate([i, j]), np.concatenate([j, i]))),
                                  shape=(n, n))
        laplacian = laplacian + sp.diags(-np.asarray(laplacian.sum(axis=1)).ravel())
        return _solve_laplacian(laplacian.tocsr(), b, self.positions, self.geometry, self.reducer.rows,
                                self.reducer.cols, rtol=_PAIRWISE_RTOL)

    def image(self, offsets: bool = True) -> np.ndarray:
        """The stitched phase on the object grid (radians, arbitrary offset per group), NaN where no mask reached.

        ``offsets=False`` blends the patches as they are (every offset zero): for per-pixel quantities
        that have no arbitrary offset, such as a σ head's standard deviation patches, reduced with
        ``remove_mean=False``.
        """
        missing = len(self) - self.n_done
        if missing:
            first = int(np.argmin(self.done))
            raise ValueRangeError(f"patches: {missing} of {len(self)} positions have no patch yet (the first: "
                                  f"position {first}); add them all before asking for the image")
        c = self.offsets() if offsets else np.zeros(len(self))
        total = self.total.ravel().copy()
        hits = np.zeros_like(total) if "hits" not in self._shared else None
        u = self.geometry.upsample
        phase_id = (self.origins[:, 0] % u) * u + self.origins[:, 1] % u
        order = np.argsort(phase_id.astype(np.uint8 if u * u <= 256 else np.int64), kind="stable")
        bounds = np.searchsorted(phase_id[order], np.arange(u * u + 1))
        for pid in range(u * u):
            members = order[bounds[pid] : bounds[pid + 1]]
            if not len(members):
                continue
            counts = self.reducer.bin_counts[pid]
            target = self.reducer.bin_targets(self.origins[members], pid, self.shape[1])
            total += np.bincount(target.ravel(), np.multiply.outer(c[members], counts).ravel(), minlength=total.size)
            if hits is not None:  # the coverage depends on the geometry only: counted once
                hits += np.bincount(target.ravel(), np.broadcast_to(counts, target.shape).ravel(), minlength=total.size)
        if hits is not None:
            self._shared["hits"] = hits
        hits = self._shared["hits"]
        with np.errstate(invalid="ignore", divide="ignore"):
            image = np.where(hits > 0, total / hits, np.nan)
        return image.reshape(self.shape)


def stitch_pairwise(patches, positions, mask, geometry: Geometry, radius: float | None = None) -> np.ndarray:
    """Stitch from the mean differences of overlapping neighbours (fast; the default).

    1. For every pair of patches whose canvas origins lie within ``radius`` canvas pixels (default: half
       the mask's extent, i.e. the nearest neighbours of a raster, diagonals included), the offset
       difference that makes them agree on their overlap is ``d_ij = mean_overlap(q_i − q_j)``. On a
       raster the pairs are found by index arithmetic (a few index steps), elsewhere by a KD-tree. All
       overlap sums come from matrix products of the patches with the (few) overlap masks of the
       distinct canvas lags, not from the pixels pair by pair.
    2. The offsets minimise ``Σ n_ij (c_j − c_i − d_ij)²`` with ``n_ij`` the overlap's pixel count: a
       graph Laplacian on the patches (about 9 entries a row). On a connected raster it is solved by
       CG preconditioned with the DCT of its mean stencil (:class:`_LatticeSolver`, 8 iterations),
       otherwise like :func:`stitch_least_squares`.
    3. The patches plus offsets are averaged on the object grid directly: each patch is binned by a
       small matrix chosen by its origin's sub-pixel phase (in the same product as its overlap sums),
       so only ``N × (bins per patch)`` values are scattered instead of ``N × (mask pixels)``.

    Consistent patches (cut from one image, any offsets) are recovered exactly, like the full least
    squares; with noise, only nearest-neighbour overlaps inform the offsets, which costs a little
    accuracy at the largest scales (see benchmarks/RESULTS.md, section 3) and is 13× faster than the
    full least squares and the seed's loop at 65,536 raster positions. The same computation, fed chunk
    by chunk for scans larger than memory, is :class:`PairwiseStitcher`.

    Parameters
    ----------
    patches, positions, mask, geometry
        As in :func:`stitch_least_squares`.
    radius : float, optional
        Largest distance between two canvas origins that counts as neighbours, in canvas pixels.

    Returns
    -------
    2-D float64 array on the object grid (radians, arbitrary offset per group), NaN where no mask reached.
    """
    patches, positions, mask = _check_inputs(patches, positions, mask, geometry, check_finite=False)
    stitcher = PairwiseStitcher(positions, mask, geometry, radius)
    stitcher.add_reductions(stitcher.reducer.reduce(patches, stitcher.origins), 0)
    return stitcher.image()


# ----------------------------------------------------------------------------------------- dispatch
def stitch(patches, positions, mask, geometry: Geometry, method: str = "pairwise", **kw) -> np.ndarray:
    """Stitch phase patches into one image with the named method.

    Parameters
    ----------
    patches, positions, mask, geometry
        As in :func:`stitch_least_squares`.
    method : {"pairwise", "least-squares", "seed"}
        ``"pairwise"`` (default, :func:`stitch_pairwise`), ``"least-squares"``
        (:func:`stitch_least_squares`) or ``"seed"`` (the original iterative method, :func:`stitch_seed`).
    **kw
        Passed on to the method (``radius`` for pairwise; ``weights`` for least squares; ``alpha``,
        ``passes``, ``seed`` for the seed's method).

    Returns
    -------
    2-D float64 array on the object grid (radians, arbitrary offset), NaN where no mask reached.
    """
    functions = {"pairwise": stitch_pairwise, "least-squares": stitch_least_squares, "seed": stitch_seed}
    if method not in functions:
        raise ValueRangeError(f"method: expected one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    return functions[method](patches, positions, mask, geometry, **kw)
