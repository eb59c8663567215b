"""Electron probes: the reference probe, probes from .npy files, and probes from optics parameters.

Units follow abTEM: energy in keV, angles in mrad, lengths in Å. The probe is a complex array on an
``n × n`` real-space grid whose far field (see :mod:`deepphase.physics.forward`) is the bright-field
disk on the detector.

Sampling relations (one place, tested):

* reciprocal sampling ``dk = 1 / (n · dx)`` in 1/Å, for ``n`` pixels of ``dx`` Å,
* scattering angle per detector pixel ``λ · dk`` in rad (``1000 · λ · dk`` mrad),
* hence ``dx = λ / (n · mrad_per_px / 1000)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import InputFileError, ShapeError, ValueRangeError
from .geometry import check_positive

REFERENCE_PROBE = "reference"

# CODATA constants for the relativistic electron wavelength.
_H = 6.62607015e-34  # J s
_M0 = 9.1093837015e-31  # kg
_E = 1.602176634e-19  # C
_C = 299792458.0  # m / s


#: Beam energies (keV) an electron microscope uses, with room: a value outside is taken for a unit mistake (300,000
#: is 300 keV given in eV) rather than silently turned into a pixel size 10⁴× off.
ENERGY_RANGE_KEV = (1.0, 5000.0)


def electron_wavelength(energy_kev: float) -> float:
    """Relativistic electron wavelength in Å for an accelerating voltage given in keV."""
    lo, hi = ENERGY_RANGE_KEV
    try:
        value = float(energy_kev) if not isinstance(energy_kev, (str, bytes, bool)) else np.nan
    except (TypeError, ValueError):
        value = np.nan
    if not lo <= value <= hi:
        hint = f" (in eV? {value:g} eV is {value / 1e3:g} keV)" if value > hi else ""
        raise ValueRangeError(f"energy: expected the beam energy in keV ({lo:g}–{hi:g}), got {energy_kev!r}{hint}")
    energy_kev = value
    v = energy_kev * 1e3
    p = np.sqrt(2 * _M0 * _E * v * (1 + _E * v / (2 * _M0 * _C**2)))
    return float(_H / p * 1e10)


def reciprocal_sampling(n_px: int, sampling: float) -> float:
    """Reciprocal-space pixel size ``1 / (n · dx)`` in 1/Å of an ``n``-pixel grid of ``dx`` Å."""
    return 1.0 / (n_px * sampling)


def angular_sampling(n_px: int, sampling: float, energy_kev: float) -> float:
    """Scattering angle per detector pixel in mrad for real-space sampling ``dx`` Å on ``n`` pixels."""
    check_positive(n_px=(n_px, "pixels"), sampling=(sampling, "Å"))
    return 1e3 * electron_wavelength(energy_kev) * reciprocal_sampling(n_px, sampling)


def real_space_sampling(n_px: int, mrad_per_px: float, energy_kev: float) -> float:
    """Real-space pixel size in Å that gives ``mrad_per_px`` on an ``n``-pixel detector grid."""
    check_positive(n_px=(n_px, "pixels"), mrad_per_px=(mrad_per_px, "mrad"))
    return electron_wavelength(energy_kev) / (n_px * mrad_per_px * 1e-3)


@dataclass(frozen=True)
class ProbeParameters:
    """Optics that define a probe; stored in model files so a probe can be rebuilt and compared.

    ``defocus`` follows abTEM's sign: positive defocus is underfocus (``C10 = -defocus``).
    """

    energy: float  # keV
    semiangle_cutoff: float  # mrad
    defocus: float = 0.0  # Å
    Cs: float = 0.0  # Å (C30)
    n_px: int = 32
    sampling: float = 0.2  # Å per real-space pixel


def probe_from_parameters(params: ProbeParameters) -> np.ndarray:
    """Build a probe from a circular aperture and the aberration function.

    ``χ(α) = 2π/λ · (½ C10 α² + ¼ C30 α⁴)`` with ``α = λ k`` and ``C10 = -defocus``; the probe's far
    field is ``A(k) · exp(-i χ)``. The probe is normalised to ``Σ|P|² = 1``: the dose, not the probe,
    sets the counts.
    """
    n = int(params.n_px)
    if n < 8:
        raise ShapeError(f"n_px: expected a grid of at least 8 pixels, got {n}")
    if not params.sampling > 0:
        raise ValueRangeError(f"sampling: expected a positive pixel size in Å, got {params.sampling!r}")
    if not params.semiangle_cutoff > 0:
        raise ValueRangeError(
            f"semiangle_cutoff: expected a positive convergence semi-angle in mrad, got {params.semiangle_cutoff!r}"
        )
    lam = electron_wavelength(params.energy)
    dk = reciprocal_sampling(n, params.sampling)
    k = (np.arange(n) - n // 2) * dk
    kr, kc = np.meshgrid(k, k, indexing="ij")
    alpha = lam * np.hypot(kr, kc)  # rad
    cutoff = params.semiangle_cutoff * 1e-3
    if cutoff >= lam * dk * (n // 2):
        raise ValueRangeError(
            f"semiangle_cutoff: {params.semiangle_cutoff} mrad does not fit the detector grid, whose edge is at "
            f"{1e3 * lam * dk * (n // 2):.2f} mrad; use a finer real-space sampling than {params.sampling} Å"
        )
    aperture = (alpha <= cutoff).astype(float)
    chi = 2 * np.pi / lam * (0.5 * (-params.defocus) * alpha**2 + 0.25 * params.Cs * alpha**4)
    far_field = aperture * np.exp(-1j * chi)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(far_field)))
    return probe / np.sqrt(np.sum(np.abs(probe) ** 2))


def reference_probe() -> np.ndarray:
    """The complex 32×32 probe of the original experiment (Phys. Rev. Lett. 130, 016101).

    Its scale is the one the original training used: a pure-phase object gives about 27,882
    expected electrons per pattern.
    """
    with resources.files("deepphase._resources").joinpath("reference_probe.npy").open("rb") as f:
        return np.load(f, allow_pickle=False)


def load_probe(probe: str | Path | np.ndarray | None = REFERENCE_PROBE) -> np.ndarray:
    """Return a complex square probe from ``"reference"``, a path to an .npy file, or an array."""
    if probe is None or (isinstance(probe, str) and probe == REFERENCE_PROBE):
        return reference_probe()
    if isinstance(probe, (str, Path)):
        path = Path(probe)
        if not path.exists():
            raise InputFileError(f"probe: file {str(path)!r} does not exist (expected an .npy file or 'reference')")
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:  # numpy raises several types for a bad file
            from ..data.io import npy_problem

            raise InputFileError(f"probe: could not read {str(path)!r} as .npy ({npy_problem(path, exc)})") from exc
        if isinstance(array, np.lib.npyio.NpzFile):  # a simulate .npz carries its probe
            with array:
                if "probe" not in array.files:
                    raise InputFileError(f"probe: {str(path)!r} is an .npz without a 'probe' array (it holds "
                                         f"{', '.join(array.files)}); expected an .npy file of the complex probe")
                array = array["probe"]
    else:
        array = np.asarray(probe)
    return validate_probe(array)


def validate_probe(probe: np.ndarray) -> np.ndarray:
    """Check a probe array and return it as complex128."""
    if probe.ndim != 2 or probe.shape[0] != probe.shape[1]:
        raise ShapeError(f"probe: expected a square 2-D complex array, got shape {probe.shape}")
    if not (np.issubdtype(probe.dtype, np.complexfloating) or np.issubdtype(probe.dtype, np.floating)):
        raise ShapeError(f"probe: expected a complex or real floating-point array, got dtype {probe.dtype}")
    if not np.all(np.isfinite(probe)):
        raise ValueRangeError("probe: contains NaN or Inf values")
    if not np.any(probe != 0):
        raise ValueRangeError("probe: is zero everywhere")
    return probe.astype(np.complex128)


def shift_probe(probe: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """Translate a probe by a sub-pixel ``(row, col)`` shift with the Fourier shift theorem."""
    if np.shape(shift) != (2,):
        raise ShapeError(f"shift: expected a (row, col) pair of pixels, got {shift!r}")
    n = probe.shape[-1]
    k = np.fft.fftfreq(n)
    ramp = np.exp(-2j * np.pi * (k[:, None] * shift[0] + k[None, :] * shift[1]))
    return np.fft.ifft2(np.fft.fft2(probe) * ramp)
