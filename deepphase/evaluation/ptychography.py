"""Single-slice ptychography with py4DSTEM as a baseline for the evaluation harness.

py4DSTEM (0.14.x) is an optional dependency and pins ``numpy<2``: install it into a separate environment
(``python -m venv --system-site-packages ...`` and ``pip install py4DSTEM`` there). It is imported only
inside the functions here.

Geometry, as read from py4DSTEM's code (``process/phase``) and checked by ``tests/test_ptychography.py``:

* ``SingleslicePtychography`` keeps the probe and the exit waves *corner-centred*: an object patch is
  ``object[round(x) + fftfreq(n)·n, round(y) + fftfreq(n)·n]`` and the probe, moved by the fractional part
  of the position with a Fourier phase ramp ``exp(-2πi k·dx)``, has its origin at index 0. The scan
  position is therefore the probe *centre*, which in our convention (DESIGN.md, ``fftshift`` puts the
  probe origin at index ``n // 2``) is ``position + n // 2`` object pixels. Our probe enters as
  ``ifftshift(probe)``; a probe array given as ``initial_probe_guess`` is used as is (no rescaling), so
  it is scaled here to the mean total counts of the patterns.
* The far field is ``fft2`` of the corner-centred exit wave, and ``preprocess`` moves each pattern by
  ``-force_com_shifts`` (spline shift with ``grid-wrap``; an integer shift is exact). Our patterns have the
  zero frequency at ``(n // 2, n // 2)``, so ``force_com_shifts=(n // 2, n // 2)`` turns them into
  ``fft2(ifftshift(ψ))``: the same forward model as ours, ``|F(P·O)|²``.
* Positions are given in Å (``initial_scan_positions``) and become pixels by dividing by the real-space
  sampling ``λ / (n · angular sampling)``; with ``force_reciprocal_sampling = 1 / (n · 1 Å)`` that is
  1 Å per pixel whatever the energy, so Å and our real-space pixels coincide (only the probe, not the
  energy or a semi-angle, shapes the model: no aberrations are given and the probe is not built).
* ``force_com_rotation=0`` and ``force_com_transpose=False`` skip the rotation and transpose fit (the
  positions are not rotated); ``center_positions_in_fov=False`` stops the positions being moved to the
  centre of the object array; ``object_padding_px=(0, 0)`` and an ``initial_object_guess`` of our object's
  shape make py4DSTEM's object array *our* object grid, pixel for pixel (the padding is added to the
  positions; the offset actually applied is read back and checked).
* ``ptycho.object`` is the complex transmission on that array (``object_type="complex"``) or the phase
  itself (``"potential"``); the scanned area is py4DSTEM's own ``_object_fov_mask`` (summed probe
  intensity, blurred by a 1-pixel Gaussian, above 0.25 of its maximum).

The phase has an arbitrary constant offset.
"""

from __future__ import annotations

import inspect
import time
import warnings

import numpy as np

from ..errors import DeepPhaseError, ShapeError, ValueRangeError

INSTALL_HINT = ("pip install py4DSTEM (needs numpy<2: in a separate environment, then point "
                "DEEPPHASE_PTYCHO_PYTHON at its python)")

#: Settings used unless overridden (every one is recorded in the notes).
DEFAULT_SETTINGS = {
    "reconstruction_method": "gradient-descent",
    "step_size": 0.5,
    "max_batch_size": 256,  # mini-batches, shuffled with np.random.seed(seed_random); None: one batch
    "normalization_min": 1.0,
    "pure_phase_object": False,
    "fix_probe": True,  # our probe is the exact one the data were made with
    "fix_positions": True,
    "fix_potential_baseline": False,
    "seed_random": 0,
    "object_type": "complex",
    "energy_kev": 300.0,  # nominal: with a given probe and no aberrations it does not enter the model
    "sampling": 1.0,  # Å declared per real-space pixel
}

_OWN_KEYS = ("object_type", "energy_kev", "sampling")
_MANAGED_KEYS = ("num_iter", "progress_bar", "reset", "device", "store_iterations")


class MissingDependencyError(DeepPhaseError):
    """An optional package needed for this function is not installed."""


def _import_py4dstem():
    try:
        import py4DSTEM
        from py4DSTEM.process.phase import SingleslicePtychography
    except ImportError as exc:
        raise MissingDependencyError(
            f"py4DSTEM: could not import it ({exc}); expected an installed py4DSTEM: {INSTALL_HINT}"
        ) from exc
    return py4DSTEM, SingleslicePtychography


def py4dstem_available() -> bool:
    try:
        _import_py4dstem()
    except MissingDependencyError:
        return False
    return True


def _validate(amplitudes, positions, probe, object_shape):
    amplitudes = np.asarray(amplitudes)
    if amplitudes.ndim != 3 or amplitudes.shape[1] != amplitudes.shape[2]:
        raise ShapeError(f"amplitudes: expected an (N, n, n) stack of square patterns, got shape {amplitudes.shape}")
    if not np.issubdtype(amplitudes.dtype, np.floating) and not np.issubdtype(amplitudes.dtype, np.integer):
        raise ShapeError(f"amplitudes: expected real numbers (sqrt of counts), got dtype {amplitudes.dtype}")
    amplitudes = amplitudes.astype(np.float64)
    if not np.all(np.isfinite(amplitudes)) or amplitudes.min() < 0:
        raise ValueRangeError("amplitudes: expected finite, non-negative values (the square root of the counts)")
    n = amplitudes.shape[-1]
    probe = np.asarray(probe)
    if probe.shape != (n, n):
        raise ShapeError(f"probe: expected a complex ({n}, {n}) probe to match the patterns, got shape {probe.shape}")
    if not np.all(np.isfinite(probe)) or not np.any(probe):
        raise ValueRangeError("probe: expected finite values, not all zero")
    from ..physics.scan import validate_positions

    positions = validate_positions(positions, len(amplitudes))
    try:
        object_shape = tuple(int(s) for s in object_shape)
    except (TypeError, ValueError):
        raise ShapeError(f"object_shape: expected (rows, cols), got {object_shape!r}") from None
    if len(object_shape) != 2:
        raise ShapeError(f"object_shape: expected (rows, cols), got {object_shape!r}")
    # py4DSTEM reads object[round(centre) - n//2 : round(centre) + n - n//2] and wraps around beyond the edge.
    top = np.round(positions + n // 2).max(axis=0) + (n - n // 2)
    if top[0] > object_shape[0] or top[1] > object_shape[1]:
        raise ShapeError(
            f"object_shape: the probe windows reach row {int(top[0])}, column {int(top[1])}; expected an object "
            f"of at least that size, got {object_shape[0]}×{object_shape[1]}"
        )
    if float(np.sum(amplitudes**2)) <= 0:
        raise ValueRangeError("amplitudes: every pattern is empty")
    return amplitudes, positions, probe.astype(np.complex128), object_shape


def _split_settings(settings, reconstruct):
    merged = dict(DEFAULT_SETTINGS)
    merged.update(settings)
    known = set(inspect.signature(reconstruct).parameters) - {"self"}
    rec_kwargs = {}
    for key, value in merged.items():
        if key in _OWN_KEYS:
            continue
        if key in _MANAGED_KEYS or key not in known:
            allowed = sorted((known - set(_MANAGED_KEYS)) | set(_OWN_KEYS))
            raise ValueRangeError(
                f"settings: {key!r} is not a setting this function passes on; expected one of {', '.join(allowed)}"
            )
        rec_kwargs[key] = value
    if merged["object_type"] not in ("complex", "potential"):
        raise ValueRangeError(f"object_type: expected 'complex' or 'potential', got {merged['object_type']!r}")
    for key in ("energy_kev", "sampling"):
        if not (np.isfinite(merged[key]) and merged[key] > 0):
            raise ValueRangeError(f"{key}: expected a positive number, got {merged[key]!r}")
    return merged, rec_kwargs


def ptychography_phase(amplitudes, positions, probe, object_shape, num_iter: int = 16, **settings):
    """Phase of a pure-phase object by py4DSTEM's single-slice ptychography, on our object grid.

    Parameters
    ----------
    amplitudes : (N, n, n) array
        ``sqrt(counts)`` of each pattern, zero frequency at ``(n // 2, n // 2)`` (DESIGN.md).
    positions : (N, 2) array
        Top-left corners (row, col) of the probe windows on the object grid, in real-space pixels; the
        probe centre is ``position + n // 2``. Any order (the frame order of ``amplitudes``).
    probe : complex (n, n) array
        The probe on the real-space pixel grid (origin at ``n // 2``); kept fixed by default. Its scale
        does not matter: it is scaled to the mean total counts of the patterns.
    object_shape : (rows, cols)
        Our object grid; it must hold every probe window.
    num_iter : int
        Iterations of py4DSTEM's ``reconstruct``.
    **settings
        Overrides of :data:`DEFAULT_SETTINGS`, and any other keyword of
        ``SingleslicePtychography.reconstruct`` (e.g. ``q_lowpass``, ``tv_denoise_weight``).

    Returns
    -------
    phase : (rows, cols) float64 array
        Radians, up to a constant; NaN outside the scanned area (py4DSTEM's field-of-view mask).
        ``object_type="complex"`` gives ``angle(transmission)``, wrapped to (-π, π].
    notes : dict
        py4DSTEM version, every setting used, the final error and the timings.
    """
    py4DSTEM, SingleslicePtychography = _import_py4dstem()
    if int(num_iter) != num_iter or num_iter < 1:
        raise ValueRangeError(f"num_iter: expected a positive integer, got {num_iter!r}")
    num_iter = int(num_iter)
    amplitudes, positions, probe, object_shape = _validate(amplitudes, positions, probe, object_shape)
    merged, rec_kwargs = _split_settings(settings, SingleslicePtychography.reconstruct)
    n = amplitudes.shape[-1]
    sampling = float(merged["sampling"])

    t0 = time.perf_counter()
    intensities = (amplitudes**2).astype(np.float32)
    # One scan row of N frames: the frame order is the order of `positions`.
    datacube = py4DSTEM.DataCube(data=intensities.reshape(1, len(intensities), n, n))
    centres_px = positions + n // 2
    corner_probe = np.fft.ifftshift(probe)
    mean_counts = float(intensities.sum(axis=(1, 2), dtype=np.float64).mean())
    corner_probe = corner_probe * np.sqrt(mean_counts / np.sum(np.abs(np.fft.fft2(corner_probe)) ** 2))
    initial_object = (np.zeros if merged["object_type"] == "potential" else np.ones)(
        object_shape, dtype=np.float32 if merged["object_type"] == "potential" else np.complex64
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # py4DSTEM warns about every forced setting
        ptycho = SingleslicePtychography(
            energy=float(merged["energy_kev"]) * 1e3,  # py4DSTEM takes eV
            datacube=datacube,
            initial_probe_guess=corner_probe.astype(np.complex64),
            initial_object_guess=initial_object,
            initial_scan_positions=centres_px * sampling,  # Å, probe centres
            object_padding_px=(0, 0),
            object_type=merged["object_type"],
            verbose=False,
            device="cpu",
        )
        ptycho.preprocess(
            force_com_rotation=0.0,
            force_com_transpose=False,
            force_com_shifts=(n // 2, n // 2),
            force_scan_sampling=sampling,
            force_reciprocal_sampling=1.0 / (n * sampling),
            center_positions_in_fov=False,
            plot_center_of_mass=False,
            plot_rotation=False,
            plot_probe_overlaps=False,
        )
        t_pre = time.perf_counter()
        if not np.allclose(ptycho.sampling, (sampling, sampling), rtol=1e-5):
            raise DeepPhaseError(f"py4DSTEM: real-space sampling came out as {ptycho.sampling}; expected {sampling} Å")
        offset = np.asarray(ptycho._positions_px, dtype=np.float64) - centres_px
        if tuple(ptycho._object.shape) != object_shape or np.abs(offset).max() > 1e-3:
            raise DeepPhaseError(
                f"py4DSTEM: its object array {tuple(ptycho._object.shape)} and positions (offset up to "
                f"{np.abs(offset).max():.3g} px) do not lie on the object grid {object_shape}; expected them to "
                f"coincide (py4DSTEM {py4DSTEM.__version__} may place them differently)"
            )
        rng_state = np.random.get_state()  # py4DSTEM seeds and shuffles with the global numpy RNG
        try:
            ptycho.reconstruct(num_iter=num_iter, progress_bar=False, reset=True, **rec_kwargs)
        finally:
            np.random.set_state(rng_state)
    t_rec = time.perf_counter()

    obj = np.asarray(ptycho.object)
    phase = obj.astype(np.float64) if merged["object_type"] == "potential" else np.angle(obj).astype(np.float64)
    fov = np.asarray(ptycho._object_fov_mask, dtype=bool)
    phase = np.where(fov, phase, np.nan)
    notes = {
        "package": "py4DSTEM",
        "py4DSTEM_version": py4DSTEM.__version__,
        "class": "SingleslicePtychography",
        "num_iter": num_iter,
        **{k: v for k, v in merged.items()},
        "probe": "given, corner-centred with ifftshift, scaled to the mean counts per pattern",
        "preprocess": {"force_com_rotation": 0.0, "force_com_transpose": False, "force_com_shifts": [n // 2, n // 2],
                       "force_reciprocal_sampling": 1.0 / (n * sampling), "center_positions_in_fov": False,
                       "object_padding_px": [0, 0]},
        "positions": "probe centres = position + n//2, in Å at the declared sampling",
        "scanned_area": "py4DSTEM object_fov_mask (blurred probe overlap > 0.25 max)",
        "final_error": float(ptycho.error),
        "seconds_preprocess": round(t_pre - t0, 3),
        "seconds_reconstruct": round(t_rec - t_pre, 3),
    }
    return phase, notes


# py4DSTEM pins numpy<2 while abTEM needs numpy>=2, so the harness can run py4DSTEM in another Python
# environment: this variable names that environment's interpreter.
PYTHON_ENV_VAR = "DEEPPHASE_PTYCHO_PYTHON"


def external_python() -> str | None:
    """The interpreter named by ``DEEPPHASE_PTYCHO_PYTHON``, if set (it must have py4DSTEM and deepphase)."""
    import os

    value = os.environ.get(PYTHON_ENV_VAR)
    return value or None


def ptychography_phase_external(python: str, amplitudes, positions, probe, object_shape, num_iter: int = 16,
                                **settings):
    """:func:`ptychography_phase` run by another interpreter (``python -m deepphase.evaluation.ptychography``).

    The arrays travel through a temporary .npz (no pickle); the notes come back as JSON.
    """
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="deepphase-ptycho-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, amplitudes=np.asarray(amplitudes, dtype=np.float32), positions=np.asarray(positions),
                 probe=np.asarray(probe), object_shape=np.asarray(object_shape),
                 settings=np.array(json.dumps({"num_iter": num_iter, **settings})))
        done = subprocess.run([python, "-m", "deepphase.evaluation.ptychography", str(src), str(dst)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise MissingDependencyError(
                f"{PYTHON_ENV_VAR}: {python!r} could not run the ptychography ({last}); expected an interpreter "
                f"with py4DSTEM and deepphase installed"
            )
        with np.load(dst, allow_pickle=False) as out:
            return out["phase"], json.loads(str(out["notes"]))


def ptychography_method(num_iter: int = 16, **settings):
    """A harness method ``fn(case, probe) -> MethodResult`` running :func:`ptychography_phase`.

    In this interpreter if py4DSTEM imports, else in the one named by ``DEEPPHASE_PTYCHO_PYTHON``. The time
    reported is preprocessing plus reconstruction (not the import of py4DSTEM or the transfer).
    """
    from .harness import MethodResult

    def run(case, probe) -> MethodResult:
        args = (case.scan.amplitude, case.scan.positions, probe, case.scan.truth.shape)
        python = None if py4dstem_available() else external_python()
        if python is None:
            phase, notes = ptychography_phase(*args, num_iter=num_iter, **settings)
        else:
            phase, notes = ptychography_phase_external(python, *args, num_iter=num_iter, **settings)
        return MethodResult(phase, notes["seconds_preprocess"] + notes["seconds_reconstruct"], notes)

    return run


def _main(argv=None) -> int:
    """``python -m deepphase.evaluation.ptychography IN.npz OUT.npz`` (used by the external runner)."""
    import json

    src, dst = (argv if argv is not None else sys.argv[1:])[:2]
    with np.load(src, allow_pickle=False) as f:
        settings = json.loads(str(f["settings"]))
        phase, notes = ptychography_phase(f["amplitudes"], f["positions"], f["probe"],
                                          tuple(int(v) for v in f["object_shape"]), **settings)
    with open(dst, "wb") as out:
        np.savez(out, phase=phase, notes=np.array(json.dumps(notes, default=str)))
    return 0


def register_ptychography_method(name: str = "ptychography", num_iter: int = 16, **settings):
    """Make the py4DSTEM baseline available to the harness under ``name`` (not done on import)."""
    from .harness import register_method

    fn = ptychography_method(num_iter=num_iter, **settings)
    return register_method(name, f"py4DSTEM single-slice ptychography, known fixed probe, {num_iter} iterations")(fn)


if __name__ == "__main__":
    import sys

    sys.exit(_main())
