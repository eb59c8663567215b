"""Realistic specimens from atomic models: projected phases and multislice 4D-STEM scans (``sim`` extra).

Everything physical comes from abTEM and ase: the structures from ase's builders, the projected
potentials from ``abtem.Potential`` (Lobato parametrization, infinite projection), the interaction
constant from ``abtem.core.energy.energy2sigma`` and the 4D-STEM data from abTEM's multislice. abTEM
and ase are imported inside the functions, so this module imports without them; calling a function
without them raises :class:`MissingDependencyError` with the install hint ``pip install -e ".[sim]"``.

Calibration (an assumption, not a measurement): the reference probe's bright-field disk has a radius
of 8.1 px on its 32-px detector grid. At 300 keV (λ = 0.01969 Å) with a 25 mrad semi-angle that is
``0.025 / λ = 1.270 Å⁻¹ = 8.1 · dk``, so ``dk = 0.156 Å⁻¹ = 1 / (32 · 0.2 Å)``: 0.2 Å per real-space
pixel (:data:`DEFAULT_SAMPLING`) at :data:`DEFAULT_ENERGY` = 300 keV.

Conventions: array axis 0 (row) is abTEM's x, axis 1 (col) its y; object pixel ``i`` sits at
``x = i · sampling`` Å (abTEM's grid). The beam travels along +z and enters at z = 0, so ``defocus``
(abTEM's sign: positive = underfocus) is measured from about 1 Å above the first atoms.
Note that abTEM takes energies in eV; the public functions here take keV like the rest of deepphase.

A measured probe (``multislice_scan(..., probe=...)``) replaces abTEM's probe from optics: it is
resampled exactly onto abTEM's finer grid (zero outside its window, band-limited inside the model's
detector) and shifted to each position in Fourier space. In vacuum the multislice pattern then equals
the model's ``|F(P)|²`` sampled at the pixel centres exactly, and integrated over each detector pixel
(b × b abTEM pixels) it differs from it by a few % (relative L2 for the reference probe: 2.75 % at
b = 3, 3.0 % at b = 9) at the bright-field disk's edge, as a real detector's pixels integrate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import DeepPhaseError, ShapeError, ValueRangeError
from ..io_utils import save_json, save_npy
from ..physics.forward import REFERENCE_DOSE  # (re-exported: the dose multislice_scan takes by default)
from ..physics.geometry import check_positive
from ..physics.probe import ProbeParameters, probe_from_parameters
from ..physics.scan import validate_positions
from .simulate import SimulatedScan, required_object_shape

MATERIAL_SPECIMENS = ("hbn", "twisted-hbn-bilayer", "graphene-vacancies", "mos2-vacancies", "au-on-carbon", "srtio3")
DEFAULT_ENERGY = 300.0  # keV
DEFAULT_SAMPLING = 0.2  # Å per real-space pixel (see the module docstring)

# Structures (Å). Lattice constants from the usual experimental values.
HBN_A, GRAPHENE_A, MOS2_A, MOS2_THICKNESS, SRTIO3_A = 2.504, 2.46, 3.18, 3.19, 3.905
HBN_INTERLAYER = 3.33
TWIST_DEGREES = 4.0  # moiré period a / (2 sin(θ/2)) = 35.9 Å; the same twist as the built-in "twisted-hbn"
SRTIO3_CELLS = 10  # 39 Å along [001]
CARBON_THICKNESS, CARBON_DENSITY, CARBON_MIN_DISTANCE = 20.0, 2.0, 1.2  # Å, g/cm³, Å
AU_SHELLS = 4  # ase.cluster.Icosahedron: 147 atoms, 1.7 nm vertex to vertex
_VACANCY_FRACTION = {"graphene-vacancies": ("C", 0.02), "mos2-vacancies": ("S", 0.03)}
_Z_MARGIN = 1.0  # Å of vacuum above and below the atoms
_PAD = 4.0  # Å of vacuum around a projected-phase box, so that abTEM's periodic potential does not wrap

# Multislice settings (part of the cache key).
SLICE_THICKNESS = 2.0  # Å
OVERSAMPLING = 2  # simulation pixel = sampling / 2: abTEM's 2/3 antialias limit then lies beyond the detector edge
_CACHE_FORMAT = 1


class MissingDependencyError(DeepPhaseError):
    """abTEM or ase, needed for atomic specimens and multislice, is not installed."""


def _require_sim():
    try:
        import abtem
        import ase
    except ImportError as exc:
        raise MissingDependencyError(
            f"abtem/ase: atomic specimens and multislice need the optional packages abTEM and ase, which are "
            f"missing ({exc}); install them with: pip install -e \".[sim]\" in deepphase's source folder"
        ) from exc
    return abtem, ase


# -------------------------------------------------------------------------------------------------
# Structures
# -------------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in MATERIAL_SPECIMENS:
        raise ValueRangeError(f"name: unknown specimen {name!r}; expected one of {', '.join(MATERIAL_SPECIMENS)}")


def _pair(value, what: str, integer: bool) -> tuple:
    """Two positive numbers (rows, cols) from a scalar or a pair."""
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.shape == (1,):
        arr = np.repeat(arr, 2)
    if arr.shape != (2,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ShapeError(f"{what}: expected one or two positive numbers, got {value!r}")
    if integer:
        if np.any(arr != np.round(arr)):
            raise ShapeError(f"{what}: expected whole numbers of pixels, got {value!r}")
        return int(arr[0]), int(arr[1])
    return float(arr[0]), float(arr[1])


def _tile(unit, extent, angle_deg: float, shift) -> tuple[list, np.ndarray]:
    """Tile an orthogonal unit cell over the box ``[0, Lx) × [0, Ly)``, rotated by ``angle_deg`` about z.

    The tiling is centred on the box centre (``shift`` Å moves the lattice), so two layers built with
    the same ``shift`` and different angles share their rotation centre: the moiré is centred.
    Returns symbols and positions of the atoms inside the box.
    """
    lx, ly = unit.cell.lengths()[:2]
    radius = 0.5 * np.hypot(*extent) + np.hypot(lx, ly) + np.hypot(*shift)  # covers the box at any angle
    reps = (int(np.ceil(2 * radius / lx)) + 1, int(np.ceil(2 * radius / ly)) + 1)
    big = unit.repeat((reps[0], reps[1], 1))
    xy = big.positions[:, :2] - np.array([reps[0] * lx, reps[1] * ly]) / 2 + np.asarray(shift)
    t = np.deg2rad(angle_deg)
    xy = xy @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) + np.asarray(extent) / 2
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < extent[0]) & (xy[:, 1] >= 0) & (xy[:, 1] < extent[1])
    pos = np.column_stack([xy[inside], big.positions[inside, 2]])
    return list(np.array(big.get_chemical_symbols())[inside]), pos


def _hexagonal_unit(formula: str, a: float, kind: str | None = None):
    """Orthogonal (a × a√3) cell of a 2-D hexagonal crystal, atoms centred at z = 0."""
    import abtem
    from ase.build import graphene, mx2

    cell = (mx2(formula, kind=kind, a=a, thickness=MOS2_THICKNESS, vacuum=2.0) if kind
            else graphene(formula=formula, a=a, vacuum=2.0))
    unit = abtem.orthogonalize_cell(cell)
    unit.positions[:, 2] -= unit.positions[:, 2].mean()
    return unit


def _random_carbon(extent, z_range, rng) -> np.ndarray:
    """Amorphous carbon: random positions at CARBON_DENSITY, no two closer than CARBON_MIN_DISTANCE.

    Random sequential addition in draw order (candidates too close to an accepted atom, or to an
    earlier candidate, are dropped), with cKDTree for the neighbour searches.
    """
    from scipy.spatial import cKDTree

    lo = np.array([0.0, 0.0, z_range[0]])
    hi = np.array([extent[0], extent[1], z_range[1]])
    per_a3 = CARBON_DENSITY / 12.011 * 0.60221408  # g/cm³ → atoms/Å³ (N_A · 1e-24)
    n = int(round(per_a3 * np.prod(hi - lo)))
    accepted = np.empty((0, 3))
    while len(accepted) < n:
        cand = rng.uniform(lo, hi, size=(int(1.3 * (n - len(accepted))) + 16, 3))
        if len(accepted):
            dist, _ = cKDTree(accepted).query(cand, distance_upper_bound=CARBON_MIN_DISTANCE)
            cand = cand[~np.isfinite(dist)]
        keep = np.ones(len(cand), dtype=bool)
        for i, j in cKDTree(cand).query_pairs(CARBON_MIN_DISTANCE, output_type="ndarray"):  # i < j, sorted
            if keep[i]:
                keep[j] = False
        accepted = np.vstack([accepted, cand[keep][: n - len(accepted)]])
    return accepted


def _srtio3_cell():
    from ase import Atoms

    # Perovskite, Pm-3m: Sr at the corner, Ti at the body centre, O at the face centres.
    return Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=[SRTIO3_A] * 3, pbc=True)


def material_atoms(name: str, extent_angstrom, seed: int = 0):
    """The atomic model of a specimen filling an orthogonal box of ``extent_angstrom`` (Å).

    Parameters
    ----------
    name : one of :data:`MATERIAL_SPECIMENS`.
    extent_angstrom : float or (float, float)
        Box size along x (rows) and y (cols) in Å. Atoms outside the box are removed (a finite flake,
        not a periodic cell).
    seed : int
        Seeds the in-plane orientation and position of the lattice, the vacancies, the amorphous
        carbon and the nanoparticle's orientation. The same seed and extent give the same atoms.

    Returns
    -------
    ase.Atoms
        Cell ``(Lx, Ly, Lz)``, orthogonal, ``pbc=False``; z from ``_Z_MARGIN`` Å below the first atom
        (the beam's entrance) to ``_Z_MARGIN`` Å beyond the last one.
    """
    _require_sim()
    from ase import Atoms

    _check_name(name)
    extent = _pair(extent_angstrom, "extent_angstrom", integer=False)
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0.0, 360.0)
    shift = rng.uniform(-5.0, 5.0, size=2)  # moves the lattice origin off the box centre

    if name == "hbn":
        symbols, pos = _tile(_hexagonal_unit("BN", HBN_A), extent, angle, shift)
    elif name == "twisted-hbn-bilayer":
        s1, p1 = _tile(_hexagonal_unit("BN", HBN_A), extent, angle, shift)
        # Second layer B↔N swapped (AA' stacking before the twist), HBN_INTERLAYER below the first.
        s2, p2 = _tile(_hexagonal_unit("NB", HBN_A), extent, angle + TWIST_DEGREES, shift)
        p2[:, 2] += HBN_INTERLAYER
        symbols, pos = s1 + s2, np.vstack([p1, p2])
    elif name == "graphene-vacancies":
        symbols, pos = _tile(_hexagonal_unit("C2", GRAPHENE_A), extent, angle, shift)
    elif name == "mos2-vacancies":
        symbols, pos = _tile(_hexagonal_unit("MoS2", MOS2_A, kind="2H"), extent, angle, shift)
    elif name == "srtio3":
        unit = _srtio3_cell().repeat((1, 1, SRTIO3_CELLS))
        symbols, pos = _tile(unit, extent, angle, shift)
    else:  # au-on-carbon
        from ase.cluster import Icosahedron
        from scipy.spatial.transform import Rotation

        au = Icosahedron("Au", noshells=AU_SHELLS).positions
        # A uniform random orientation: a normalised 4-D Gaussian is a uniform unit quaternion (this
        # works with every scipy, whose Rotation.random changed its seeding argument).
        au = Rotation.from_quat(rng.normal(size=4)).apply(au - au.mean(axis=0))
        au[:, :2] += np.asarray(extent) / 2 + rng.uniform(-1.0, 1.0, size=2)
        au[:, 2] -= au[:, 2].min()
        # The particle is on the beam's entrance side, the film 2 Å below its lowest atom.
        carbon = _random_carbon(extent, (au[:, 2].max() + 2.0, au[:, 2].max() + 2.0 + CARBON_THICKNESS), rng)
        inside = (au[:, 0] >= 0) & (au[:, 0] < extent[0]) & (au[:, 1] >= 0) & (au[:, 1] < extent[1])
        symbols = ["Au"] * int(inside.sum()) + ["C"] * len(carbon)
        pos = np.vstack([au[inside], carbon])

    atoms = Atoms(symbols, positions=pos)
    if name in _VACANCY_FRACTION:
        element, fraction = _VACANCY_FRACTION[name]
        candidates = np.flatnonzero(np.array(atoms.get_chemical_symbols()) == element)
        del atoms[rng.choice(candidates, size=int(round(fraction * len(candidates))), replace=False)]
    if len(atoms):
        atoms.positions[:, 2] += _Z_MARGIN - atoms.positions[:, 2].min()
    depth = (atoms.positions[:, 2].max() if len(atoms) else 0.0) + _Z_MARGIN
    atoms.set_cell([extent[0], extent[1], depth])
    atoms.pbc = False
    return atoms


# -------------------------------------------------------------------------------------------------
# Projected phase
# -------------------------------------------------------------------------------------------------


def _padded(atoms, gpts, sampling: float):
    """``atoms`` in a cell of ``gpts`` pixels of ``sampling`` Å (vacuum beyond the original box)."""
    atoms = atoms.copy()
    atoms.set_cell([gpts[0] * sampling, gpts[1] * sampling, atoms.cell[2, 2]])
    return atoms


def projected_phase(atoms, shape, sampling: float = DEFAULT_SAMPLING, energy: float = DEFAULT_ENERGY) -> np.ndarray:
    """Phase ``σ(E) · ∫V dz`` (rad) of ``atoms`` on ``shape`` pixels of ``sampling`` Å, pixel i at x = i·sampling.

    abTEM's infinite projection is computed on a periodic grid; the box is padded with ``_PAD`` Å of
    vacuum and cropped back so that atoms at one edge do not add potential at the opposite edge.
    """
    abtem, _ = _require_sim()
    from abtem.core.energy import energy2sigma

    pad = int(np.ceil(_PAD / sampling))
    gpts = (shape[0] + pad, shape[1] + pad)
    potential = abtem.Potential(_padded(atoms, gpts, sampling), gpts=gpts, projection="infinite",
                                parametrization="lobato", slice_thickness=float(atoms.cell[2, 2]))
    projected = np.asarray(potential.build(lazy=False).array, dtype=np.float64).sum(axis=0)
    return energy2sigma(energy * 1e3) * projected[: shape[0], : shape[1]]  # abTEM wants eV


def material_specimen(name: str, shape, seed: int = 0, sampling: float = DEFAULT_SAMPLING,
                      energy: float = DEFAULT_ENERGY) -> np.ndarray:
    """Projected phase (rad, float64) of a specimen in the phase-object approximation.

    Parameters
    ----------
    name : one of :data:`MATERIAL_SPECIMENS`.
    shape : int or (int, int)
        Pixels (rows, cols); the specimen box is ``shape · sampling`` Å.
    seed : int
        Seeds the structure (see :func:`material_atoms`).
    sampling : float
        Å per pixel.
    energy : float
        Beam energy in keV (sets σ).
    """
    _check_name(name)
    shape = _pair(shape, "shape", integer=True)
    check_positive(sampling=sampling, energy=energy)
    atoms = material_atoms(name, (shape[0] * sampling, shape[1] * sampling), seed)
    return projected_phase(atoms, shape, sampling, energy)


# -------------------------------------------------------------------------------------------------
# Multislice 4D-STEM
# -------------------------------------------------------------------------------------------------


def _simulation_grid(object_px: int, n_px: int) -> tuple[int, int]:
    """Simulation extent ``G = b · n_px`` pixels (b odd) holding the object and half a window of vacuum.

    abTEM's detector pixel is ``1 / (G · sampling)``, the model's ``1 / (n_px · sampling)``: summing
    b × b abTEM pixels gives one model pixel. b is odd so that the model pixel centred on zero
    frequency is the sum of a block centred on abTEM's zero frequency (an even b would shift every
    pattern by half an abTEM pixel).
    """
    b = int(np.ceil((object_px + n_px // 2) / n_px))
    b += 1 - b % 2
    return b * n_px, b


def _probe_spectrum(probe: np.ndarray, gpts: tuple[int, int], oversampling: int) -> np.ndarray:
    """Far field, in FFT order on the simulation grid, of a probe given on its own ``n × n`` window.

    The probe is taken to be negligible outside its window: it is embedded in a field of ``gpts /
    oversampling`` pixels (the model's sampling), zero around it, with probe pixel ``i`` at field
    pixel ``i``. That field is band-limited to the model's Nyquist frequency, so refining its
    sampling by ``oversampling`` is exact: its spectrum is zero-padded to ``gpts`` (its Fourier series
    evaluated on the finer grid). The scale is such that ``ifft2`` of the result is the probe's
    values at the field pixels (every ``oversampling``-th simulation pixel) and its interpolant in
    between. The field's Nyquist row/column is kept at the negative frequency (numpy's ``fftfreq``,
    as :func:`deepphase.data.simulate.simulate_scan` shifts probes).
    """
    n = probe.shape[-1]
    coarse = (gpts[0] // oversampling, gpts[1] // oversampling)
    field = np.zeros(coarse, dtype=np.complex128)
    field[:n, :n] = probe
    spectrum = np.zeros(gpts, dtype=np.complex128)
    rows = (np.fft.fftfreq(coarse[0]) * coarse[0]).round().astype(int) % gpts[0]
    cols = (np.fft.fftfreq(coarse[1]) * coarse[1]).round().astype(int) % gpts[1]
    spectrum[np.ix_(rows, cols)] = np.fft.fft2(field) * (oversampling**2)
    return spectrum


def _probe_edge_fraction(probe: np.ndarray) -> float:
    """Fraction of ``Σ|P|²`` in the outermost ring of pixels of the probe's window.

    Embedding the probe in vacuum (:func:`_probe_spectrum`) truncates whatever lies beyond its
    window; this measures how much the probe still has at the window's edge.
    """
    intensity = np.abs(probe) ** 2
    inner = intensity[1:-1, 1:-1].sum()
    return float((intensity.sum() - inner) / intensity.sum())


def _shifted_waves(spectrum: np.ndarray, shifts: np.ndarray, sim_sampling: float) -> np.ndarray:
    """The probe moved by ``shifts`` Å (B, 2): ``ifft2(spectrum · exp(-2πi k·r))``, (B, *gpts)."""
    from scipy.fft import ifft2  # faster than numpy's for a batch

    kr = np.fft.fftfreq(spectrum.shape[0], d=sim_sampling)
    kc = np.fft.fftfreq(spectrum.shape[1], d=sim_sampling)
    ramp_r = np.exp(-2j * np.pi * shifts[:, 0, None] * kr[None])
    ramp_c = np.exp(-2j * np.pi * shifts[:, 1, None] * kc[None])
    return ifft2(spectrum[None] * ramp_r[:, :, None] * ramp_c[:, None, :], overwrite_x=True)


def _coherent_intensities(name, positions, n_px, sampling, energy, semiangle, defocus, seed, shape,
                          batch_size: int, progress, probe: np.ndarray | None = None) -> np.ndarray:
    """Noise-free patterns (N, n_px, n_px) on the model's k-grid, normalised to 1 incident electron.

    ``probe`` (complex ``n_px × n_px`` at ``sampling``): the incident wave instead of abTEM's probe
    from ``semiangle`` and ``defocus`` (then unused), resampled onto the simulation grid
    (:func:`_probe_spectrum`) and moved to each position with the Fourier shift theorem.
    """
    abtem, _ = _require_sim()
    from tqdm.auto import tqdm

    (g_rows, b_rows), (g_cols, b_cols) = _simulation_grid(shape[0], n_px), _simulation_grid(shape[1], n_px)
    gpts = (g_rows * OVERSAMPLING, g_cols * OVERSAMPLING)
    sim_sampling = sampling / OVERSAMPLING
    atoms = _padded(material_atoms(name, (shape[0] * sampling, shape[1] * sampling), seed), (g_rows, g_cols), sampling)
    potential = abtem.Potential(atoms, gpts=gpts, projection="infinite", parametrization="lobato",
                                slice_thickness=SLICE_THICKNESS).build(lazy=False)
    detector = abtem.PixelatedDetector(max_angle="full")  # every k; we crop to the model's detector

    # Rows of the full (fftshifted) pattern that make up the model's pixels: model pixel j holds
    # abTEM pixels c + (j - n_px//2)·b + t, |t| <= (b-1)/2, c = zero frequency = G·OVERSAMPLING // 2.
    def block(g, b):
        start = (g * OVERSAMPLING) // 2 - (n_px // 2) * b - (b - 1) // 2
        return slice(start, start + n_px * b)

    rows, cols = block(g_rows, b_rows), block(g_cols, b_cols)
    if probe is None:
        # soft=False: the hard aperture deepphase's own probes have (probe_from_parameters), which a model trained for
        # these optics has seen; abTEM's default soft edge differs by ~4 % of the peak there (the physics audit, s40)
        optics = abtem.Probe(energy=energy * 1e3, semiangle_cutoff=semiangle, defocus=defocus, soft=False)
        centres = (positions + n_px // 2) * sampling  # probe centre (Å): window corner + n_px // 2

        def patterns_of(start, stop):
            return optics.multislice(potential, scan=abtem.CustomScan(centres[start:stop]), detectors=detector,
                                     lazy=False)
    else:
        from abtem.core.axes import PositionsAxis

        spectrum = _probe_spectrum(probe, gpts, OVERSAMPLING)
        shifts = positions * sampling  # probe pixel i at (position + i) · sampling Å, as in simulate_scan
        dtype = np.complex64 if abtem.config.get("precision") == "float32" else np.complex128

        def patterns_of(start, stop):
            waves = abtem.Waves(_shifted_waves(spectrum, shifts[start:stop], sim_sampling).astype(dtype),
                                energy=energy * 1e3, sampling=sim_sampling,  # abTEM wants eV
                                ensemble_axes_metadata=[PositionsAxis(values=tuple(
                                    (float(r), float(c)) for r, c in (positions[start:stop] + n_px // 2) * sampling))])
            return waves.multislice(potential, detectors=detector)

    out = np.empty((len(positions), n_px, n_px))
    for start in tqdm(range(0, len(positions), batch_size), desc="multislice", leave=False,
                      disable=None if progress is None else not progress):
        stop = min(start + batch_size, len(positions))
        full = np.asarray(patterns_of(start, stop).array, dtype=np.float64).reshape(stop - start, *gpts)
        out[start:stop] = full[:, rows, cols].reshape(stop - start, n_px, b_rows, n_px, b_cols).sum(axis=(2, 4))
    # Divide by the total of the incident wave's pattern (abTEM normalises its probe to unit total
    # intensity, a custom probe has its own scale): counts · dose then mean what they did before.
    if probe is None:
        vacuum = abtem.Probe(energy=energy * 1e3, semiangle_cutoff=semiangle, defocus=defocus, gpts=gpts,
                             sampling=sim_sampling, soft=False).build(lazy=False)
    else:
        vacuum = abtem.Waves(_shifted_waves(spectrum, np.zeros((1, 2)), sim_sampling)[0].astype(dtype),
                             energy=energy * 1e3, sampling=sim_sampling)
    return out / float(vacuum.diffraction_patterns(max_angle="full").array.sum())


def source_blur(intensities: np.ndarray, positions_angstrom: np.ndarray, sigma: float) -> np.ndarray:
    """Partial spatial coherence: mix patterns over the scan with a Gaussian of std ``sigma`` Å.

    A Gaussian source of finite size is an incoherent sum of probes shifted by the source's image; each
    pattern becomes the Gaussian-weighted mean of the patterns at nearby positions (weights
    renormalised at the scan's edge). On a raster this is abTEM's ``gaussian_source_size``, which only
    accepts two linear scan axes; here any positions work, provided they sample the Gaussian.
    """
    from scipy.sparse import coo_matrix
    from scipy.spatial import cKDTree

    tree = cKDTree(positions_angstrom)
    if len(positions_angstrom) > 1:
        step = np.median(tree.query(positions_angstrom, k=2)[0][:, 1])
        if step > sigma:
            raise ValueRangeError(
                f"source_size: σ = {sigma} Å is smaller than the scan's median step of {step:.3f} Å; the source is "
                f"applied by mixing patterns over the scan positions, so it needs a step of at most σ"
            )
    n = len(positions_angstrom)
    # Truncated at 5 σ, where the Gaussian has lost 4e-6 of its weight (2-D: exp(-r²/2σ²)).
    pairs = tree.sparse_distance_matrix(tree, 5 * sigma, output_type="ndarray")  # (i, j, distance) records
    pairs = pairs[pairs["i"] != pairs["j"]]  # each pattern's own weight is added once, below
    rows = np.concatenate([pairs["i"], np.arange(n)])
    cols = np.concatenate([pairs["j"], np.arange(n)])
    dist = np.concatenate([pairs["v"], np.zeros(n)])
    weights = coo_matrix((np.exp(-(dist**2) / (2 * sigma**2)), (rows, cols)), shape=(n, n)).tocsr()
    norm = np.asarray(weights.sum(axis=1)).ravel()
    flat = intensities.reshape(len(intensities), -1)
    return (weights @ flat / norm[:, None]).reshape(intensities.shape)


def _check_probe(probe, n_px: int) -> np.ndarray:
    """A custom incident probe as complex128 (n_px, n_px); warns when it is not small at its window's edge."""
    import warnings

    array = np.asarray(probe)
    if array.shape != (n_px, n_px) or not np.issubdtype(array.dtype, np.number):
        raise ShapeError(f"probe: expected a complex {n_px}×{n_px} array (n_px = {n_px}), got "
                         f"{'shape ' + str(array.shape) if np.issubdtype(array.dtype, np.number) else array.dtype}")
    array = array.astype(np.complex128)
    if not np.all(np.isfinite(array)) or not np.any(array):
        raise ValueRangeError("probe: expected finite values, not all zero")
    edge = _probe_edge_fraction(array)
    if edge > 0.01:
        warnings.warn(f"probe: {100 * edge:.1f} % of its intensity lies on the outermost pixels of its window; the "
                      "multislice takes the probe to be zero outside the window, so the patterns differ from the "
                      "model's periodic probe", stacklevel=3)
    return array


def _probe_digest(probe: np.ndarray) -> str:
    """SHA-256 of a complex128 probe's shape and bytes (for the cache key)."""
    h = hashlib.sha256(str(probe.shape).encode())
    h.update(np.ascontiguousarray(probe, dtype=np.complex128).tobytes())
    return h.hexdigest()


def multislice_scan(name: str, positions, n_px: int = 32, sampling: float = DEFAULT_SAMPLING,
                    energy: float = DEFAULT_ENERGY, semiangle: float = 25.0, defocus: float = 0.0,
                    source_size: float = 0.0, dose: float | None = None, seed: int = 0,
                    cache_dir: str | Path | None = None, batch_size: int = 128,
                    progress: bool | None = None, probe: np.ndarray | None = None) -> SimulatedScan:
    """A 4D-STEM scan of an atomic specimen simulated with abTEM's multislice.

    Parameters
    ----------
    name : one of :data:`MATERIAL_SPECIMENS`.
    positions : (N, 2) array
        Top-left corners of the probe windows in real-space pixels (DESIGN.md); the probe is centred
        at ``(position + n_px // 2) · sampling`` Å. The specimen fills the object grid
        ``required_object_shape(positions, n_px)``, with vacuum around it.
    n_px : detector pixels per side; the detector pixel is ``1 / (n_px · sampling)`` Å⁻¹ (the model's grid).
    sampling : Å per real-space pixel.
    energy : keV.  semiangle : probe convergence semi-angle, mrad.  defocus : Å, abTEM's sign.
    source_size : float
        Standard deviation in Å (abTEM's convention) of the Gaussian source image; 0 = coherent.
    dose : electrons per pattern; a pattern with nothing scattered off the detector has this many
        expected counts. None: :data:`REFERENCE_DOSE`.
    seed : seeds the structure and the Poisson noise.
    cache_dir : folder for the noise-free coherent patterns (before the source blur, so one file
        serves every dose and source size), named by the SHA-256 of the parameters that set them.
    batch_size : probe positions per multislice call (memory: ``batch_size · (G·2)²`` complex64;
        with ``probe``, complex128 while the shifted waves are built).
    probe : complex (n_px, n_px) array, optional
        A measured probe at ``sampling`` Å per pixel (e.g. :func:`deepphase.physics.reference_probe`)
        used as the incident wave instead of the optics: ``semiangle`` and ``defocus`` are then
        ignored (recorded as None). Its scale does not matter (the dose sets the counts). It is taken
        to be zero outside its window and band-limited to the model's detector, resampled exactly
        onto abTEM's grid and moved to each position with sub-pixel accuracy (Fourier shift), probe
        pixel ``i`` at ``(position + i) · sampling`` Å as in :func:`~deepphase.data.simulate.simulate_scan`.
        The fraction of ``Σ|P|²`` on the window's outermost pixels is recorded as
        ``probe_edge_fraction`` (a warning above 1 %: the truncation then matters).

    Returns
    -------
    SimulatedScan
        ``amplitude`` = sqrt(Poisson counts), float32 (N, n_px, n_px); ``truth`` = the projected phase
        (:func:`material_specimen`) on the object grid; ``parameters`` = every setting.

    Notes
    -----
    abTEM's wave grid covers the object and some vacuum, ``G = b · n_px`` pixels per side (b odd), at
    ``sampling / OVERSAMPLING`` Å; its diffraction pixels are summed b × b into the model's pixels and
    the patterns cropped to the model's detector. Intensity scattered beyond the detector is lost, as
    on a real detector (the model's periodic window folds it back instead).
    """
    abtem, _ = _require_sim()
    _check_name(name)
    check_positive(sampling=sampling, energy=energy, batch_size=batch_size)
    if not (isinstance(n_px, (int, np.integer)) and n_px >= 8):
        raise ShapeError(f"n_px: expected a whole number of detector pixels of at least 8, got {n_px!r}")
    if probe is None:
        check_positive(semiangle=semiangle)
        if not (np.isfinite(defocus)):
            raise ValueRangeError(f"defocus: expected a finite number of Å, got {defocus!r}")
    else:
        probe = _check_probe(probe, n_px)
    if not (np.isfinite(source_size) and source_size >= 0):
        raise ValueRangeError(f"source_size: expected a standard deviation >= 0 Å, got {source_size!r}")
    dose = REFERENCE_DOSE if dose is None else dose
    check_positive(dose=dose)
    if probe is None:
        # The same check, and message, as the model's probe: the aperture must fit the detector grid.
        probe_from_parameters(ProbeParameters(energy, semiangle, defocus, 0.0, int(n_px), sampling))
    positions = validate_positions(positions, len(positions))
    shape = required_object_shape(positions, n_px)

    key = {"format": _CACHE_FORMAT, "abtem": abtem.__version__, "name": name, "n_px": int(n_px),
           "sampling": float(sampling), "energy": float(energy),
           "semiangle": None if probe is not None else float(semiangle),
           "defocus": None if probe is not None else float(defocus),
           "probe_sha256": None if probe is None else _probe_digest(probe),
           "seed": int(seed), "slice_thickness": SLICE_THICKNESS,
           "oversampling": OVERSAMPLING, "parametrization": "lobato",
           "aperture": None if probe is not None else "hard",  # (abTEM's soft edge before session 40)
           "positions_sha256": hashlib.sha256(np.ascontiguousarray(positions).tobytes()).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    cache_file = None if cache_dir is None else Path(cache_dir) / f"multislice-{name}-{digest}.npy"
    intensities = None
    if cache_file is not None and cache_file.exists():
        intensities = np.load(cache_file, allow_pickle=False)
        if intensities.shape != (len(positions), n_px, n_px):  # not ours: recompute and replace
            intensities = None
    if intensities is None:
        intensities = _coherent_intensities(name, positions, n_px, sampling, energy, semiangle, defocus, seed,
                                            shape, batch_size, progress, probe=probe)
        if cache_file is not None:
            save_npy(cache_file, intensities)
            save_json(cache_file.with_suffix(".json"), key)  # what the hash stands for, for people

    if source_size > 0:
        intensities = source_blur(intensities, (positions + n_px // 2) * sampling, source_size)
    counts = np.random.default_rng(seed).poisson(np.clip(intensities, 0, None) * dose)
    truth = material_specimen(name, shape, seed=seed, sampling=sampling, energy=energy)
    parameters = {**{k: v for k, v in key.items() if k != "positions_sha256"}, "model": "multislice",
                  "source_size": float(source_size), "dose": float(dose), "noise": True,
                  "bin_factor": [_simulation_grid(s, n_px)[1] for s in shape],
                  "simulation_gpts": [_simulation_grid(s, n_px)[0] * OVERSAMPLING for s in shape],
                  "probe": "optics" if probe is None else "custom",
                  "probe_edge_fraction": None if probe is None else _probe_edge_fraction(probe),
                  "cache_file": None if cache_file is None else str(cache_file)}
    return SimulatedScan(np.sqrt(counts).astype(np.float32), positions, truth, float(dose), parameters)
