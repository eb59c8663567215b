"""The checks of a raster scan against the model, before the network runs.

A scan the model was not made for gives a poor image without an error, so each is measured on the central
positions and said as a note when the data clearly disagree: the scan rotation and the detector's handedness
(the DPC curl criterion, :mod:`deepphase.data.calibration`, with the model's probe telling half a turn), the
data's probe and the scan step (the weak-phase transfer with the model's probe, :mod:`deepphase.data.aberrations`).
:func:`~deepphase.reconstruction.from_file.reconstruct_file` runs them on a file's scan, :func:`check_scan` on
arrays (for :func:`~deepphase.reconstruction.pipeline.reconstruct`).
"""

from __future__ import annotations

import time

import numpy as np

from ..data.aberrations import POSITIONS_STEP_REMEDY
from ..errors import DeepPhaseError, ShapeError, ValueRangeError

#: How a rotation note ends for positions given as arrays, which have no rotation to set or find.
POSITIONS_ROTATION_REMEDY = ("; check the positions: their rotation (raster_positions(..., rotation_deg=)), which scan "
                             "axis runs fastest (fastest=) and their (row, col) order")


def raster_of(scan_info: dict, positions) -> dict | None:
    """The raster the scan was made on: from the scan shape and step (given or the file's), or found in
    positions (:func:`deepphase.physics.scan.raster_from_positions`); None for positions that are not one."""
    if "scan_shape" in scan_info:
        return {key: scan_info[key] for key in ("scan_shape", "step_px", "rotation_deg", "fastest")}
    if "raster_from_positions" not in scan_info:
        from ..physics.scan import raster_from_positions

        scan_info["raster_from_positions"] = raster_from_positions(positions) if positions is not None else None
    return scan_info["raster_from_positions"]


def sense(amplitudes, model, raster: dict) -> dict:
    """The scan's sense as the model's probe tells it, at ``raster``'s rotation and half a turn from it
    (:func:`deepphase.data.aberrations.scan_sense`), or why it was not asked."""
    from ..data.aberrations import PROBE_CHECK_MIN_PX, scan_sense

    if min(raster["scan_shape"]) < PROBE_CHECK_MIN_PX:
        return {"skipped": f"fewer than {PROBE_CHECK_MIN_PX} positions a side"}
    try:
        return scan_sense(amplitudes, tuple(raster["scan_shape"]), model.probe, raster["step_px"],
                          raster["rotation_deg"], raster["fastest"])
    except (ValueRangeError, ShapeError) as exc:  # NaN/Inf (the reconstruction names the frame), a coarse step
        return {"skipped": str(exc)}


#: How many patterns, spread over the scan, the checks of the patterns themselves read (:func:`bad_pixel_note`,
#: :func:`detector_axes_first_note`, and the kind when the data do not say it).
PATTERN_SAMPLE = 256


#: How the detector-axes-first note ends for a file, and for arrays.
AXES_FIRST_FILE_REMEDY = "Save it as (rows, cols, ky, kx): np.save(path, np.transpose(a, (2, 3, 0, 1)))"
AXES_FIRST_ARRAYS_REMEDY = "Pass the patterns as np.transpose(a, (2, 3, 0, 1)).reshape(-1, ky, kx)"


def detector_axes_first_note(block: np.ndarray, remedy: str = AXES_FIRST_FILE_REMEDY) -> str | None:
    """A note for "patterns" that are scan images: a 4-D array stored detector axes first, (ky, kx, rows, cols),
    read as (rows, cols, ky, kx). In 4D-STEM the beam's current is steady, so the patterns' totals hardly vary,
    while their mean has the bright-field disc's contrast; read the other way round, each of the two is the other's
    (the totals of one layout are the mean pattern of the other), so the totals vary far more than the mean.
    ``block``: patterns spread over the scan (:data:`PATTERN_SAMPLE`), counts or amplitudes.

    The simulated scans of RESULTS §45: totals' spread 0.006 against the mean's 1.9–4.2 read right, the reverse
    read detector axes first; the note asks for a spread of the totals above 0.5 and 3× the mean's."""
    if len(block) < 64 or not np.all(np.isfinite(block)):
        return None  # (too few to tell; NaN/Inf: the reconstruction names the frame)
    totals, mean = block.sum(axis=(1, 2)), block.mean(axis=0)
    if totals.mean() <= 0 or mean.mean() <= 0:
        return None
    spread_totals, spread_mean = totals.std() / totals.mean(), mean.std() / mean.mean()
    if spread_totals <= 0.5 or spread_totals <= 3 * spread_mean:
        return None
    return (f"the patterns look like scan images: their totals vary by {spread_totals:.2g} (standard deviation over "
            f"mean) from pattern to pattern, their mean by only {spread_mean:.2g} across its pixels, the other way "
            "round from diffraction patterns under a steady beam; is the array stored detector axes first, (ky, kx, "
            "rows, cols)? " + remedy)


def _finite_counts(block: np.ndarray, kind: str) -> np.ndarray | None:
    """The sampled patterns as counts, or None where any is not finite."""
    counts = block if kind == "counts" else np.square(block)
    return counts if np.all(np.isfinite(counts)) else None


#: Patterns whose bright pixels (over half the highest value) read that highest value this often, over at least
#: :data:`SATURATED_MIN_PIXELS` detector pixels, are noted as clipped: on a 12×12 simulated scan (disk mean 149
#: counts) clipping at 150 left 32 % of them there and the image as it was (correlation 0.995 with the unclipped
#: one's); at 100, 90 % and 0.72; at 63, 94 % and 0.51 (s40). Poisson counts reach their maximum at one pixel or two.
SATURATED_SHARE = 0.5
SATURATED_MIN_PIXELS = 8


def saturation_note(block: np.ndarray, kind: str) -> str | None:
    """A note when the detector looks saturated: most bright pixels of ``block`` (patterns spread over the scan, as
    read) hold exactly the same highest value, at many detector pixels (one stuck pixel is a hot pixel's matter).
    Counts under 8 at the top are left alone: a 1- or 2-bit counter's patterns are all at their top."""
    counts = _finite_counts(block, kind)
    if counts is None or not counts.size:
        return None
    top = float(counts.max())
    if top < 8:
        return None
    at_top, bright = counts == top, counts > top / 2
    share = at_top.sum() / max(int(bright.sum()), 1)
    if share < SATURATED_SHARE or int(at_top.any(axis=0).sum()) < SATURATED_MIN_PIXELS:
        return None
    return (f"{share:.0%} of the patterns' bright pixels read exactly their highest value, {top:g} counts: is the "
            "detector saturated? Counts clipped flatten the disk's contrast, which the network reads as the "
            "specimen's (simulated, clipped at two thirds of the disk's mean count: correlation 0.72; at 0.43 of it: "
            "0.51); record with fewer electrons per pattern or a deeper counter")


#: A beam energy the data record this far (a share) from the one the model's probe was made for is noted.
ENERGY_NOTE = 0.02


def energy_note(data_kev: float | None, model) -> str | None:
    """A note when the data were recorded at another beam energy than the model's probe was made for (both known):
    the wavelength sets the probe and the disk, and a 300 keV model on an 80 keV simulated scan at the same pixel
    size gave an image of correlation 0.11 with only a note on the disk's radius (the training audit, s40)."""
    model_kev = model.info.get("energy")
    if not (isinstance(data_kev, (int, float)) and isinstance(model_kev, (int, float)) and data_kev > 0
            and model_kev > 0) or abs(data_kev / model_kev - 1) <= ENERGY_NOTE:
        return None
    return (f"the data were recorded at {data_kev:g} keV, and the model's probe was made for {model_kev:g} keV: the "
            "model sees patterns of another probe (on a simulated scan, 80 keV data with a 300 keV model gave "
            "correlation 0.11); train a model for the data's probe (deepphase train --like MODEL --energy "
            f"{data_kev:g} --semi-angle MRAD --sampling Å)")


def bad_pixel_note(block: np.ndarray, kind: str) -> str | None:
    """A note naming hot or dead pixels in patterns read as they are (on the model's grid, so not calibrated, which
    masks them): :func:`~deepphase.data.calibration.bad_pixel_mask` on the mean of ``block``, patterns spread over
    the scan (:data:`PATTERN_SAMPLE`). On 30 clean simulated 32×32 scans (three probes, two specimens, 30 to 10⁶
    e/pattern) it flagged nothing; it found a hot pixel in all 30 and a dead one in 24 (not at 30 e/pattern),
    RESULTS §44."""
    from ..data.calibration import bad_pixel_mask

    counts = _finite_counts(block, kind)
    if counts is None:
        return None  # (the reconstruction names the frame)
    bad = np.argwhere(bad_pixel_mask(counts.mean(0), len(counts)))
    if not len(bad):
        return None
    where = ", ".join(f"({r}, {c})" for r, c in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    return (f"{len(bad)} detector pixel{'s' * (len(bad) > 1)} of the patterns look{'s' * (len(bad) == 1)} hot or dead "
            f"(at {where}, (row, col), against the mean of their neighbours), and patterns on the model's grid are "
            "read as they are: one hot pixel costs most of the image (correlation 0.98 → 0.25 on a simulated scan); "
            "--calibrate masks them")


#: A model-grid scan whose bright-field disk is this far (px) from the model's, or whose radius differs by this share,
#: is noted: it is read as it is unless calibrated.
DISK_OFFSET_NOTE_PX = 0.5
DISK_RADIUS_NOTE = 0.04
#: ... and one this far off (px), of the model's size, is calibrated under "auto": shifted 0.5/0.7/1.0/1.5 px, a 12×12
#: scan's image read as it was correlated 0.973/0.955/0.925/0.844 with the unshifted one's, calibrated 0.963/0.965/
#: 0.972/0.963 (s40). (A pattern mirrored about the zero frequency moves the reference probe's disk 0.64 px.)
DISK_OFFSET_CALIBRATE_PX = 1.0


def disk_offset(block: np.ndarray, kind: str, probe: np.ndarray) -> tuple[dict, dict] | None:
    """The bright-field disk of patterns on the model's grid (the mean of ``block``, patterns spread over the
    scan) and the model's, where they differ: a centre more than :data:`DISK_OFFSET_NOTE_PX` off, or a radius
    more than :data:`DISK_RADIUS_NOTE` (a fraction) off. None where they agree, or where no disk is found."""
    from ..data.calibration import find_disk, model_disk

    counts = _finite_counts(block, kind)
    if counts is None:
        return None
    try:
        disk = find_disk(counts.mean(0))
    except DeepPhaseError:
        return None  # (no disk to compare: the reconstruction's own checks speak)
    model = model_disk(probe)
    offset = np.subtract(disk["center"], model["center"])
    scale = disk["radius"] / model["radius"]
    if np.abs(offset).max() <= DISK_OFFSET_NOTE_PX and abs(scale - 1) <= DISK_RADIUS_NOTE:
        return None
    return disk, model


def off_disk_calibration(block: np.ndarray, kind: str, probe: np.ndarray, calibration: str,
                         flipped: bool = False) -> tuple[bool, str | None]:
    """Whether patterns on the model's grid, read as they are under ``calibration`` ("auto" or "off"), are to be
    calibrated for their disk, and the note that says what was found and done (``flipped``: the patterns are to be
    mirrored, and are measured so). Under "auto" a disk :data:`DISK_OFFSET_CALIBRATE_PX` or more off the model's
    centre but of its size is calibrated (the calibration moves it there, and rescales it by at most
    :data:`DISK_RADIUS_NOTE`, which leaves what a pixel of the scan step means as it was); a disk of another
    size is noted only: zooming it changes the real-space pixel, which the step given in pixels assumes."""
    from ..physics.scan import flip_patterns

    off = disk_offset(flip_patterns(block) if flipped else block, kind, probe)
    if off is None:
        return False, None
    disk, model = off
    calibrating = (calibration == "auto" and abs(disk["radius"] / model["radius"] - 1) <= DISK_RADIUS_NOTE
                   and np.abs(np.subtract(disk["center"], model["center"])).max() >= DISK_OFFSET_CALIBRATE_PX)
    return calibrating, _disk_offset_note(disk, model, calibrating)


def _disk_offset_note(disk: dict, model: dict, calibrating: bool) -> str:
    """Patterns on the model's grid read as they are with a disk 2 px down and 3 px across cost a simulated scan
    0.99 → 0.83 in correlation without a word (the calibration audit, s39)."""
    found = (f"the patterns' bright-field disk is centred at ({disk['center'][0]:.2f}, {disk['center'][1]:.2f}) with "
             f"a radius of {disk['radius']:.2f} px, the model's at ({model['center'][0]:.2f}, "
             f"{model['center'][1]:.2f}) with {model['radius']:.2f} px")
    if calibrating:
        return (found + "; the patterns are calibrated onto the model's disk (as with --calibrate; read as they are, "
                "a disk 2 px down and 3 px across cost a simulated scan 0.99 → 0.83 in correlation; "
                "--no-calibration reads them so)")
    return (found + ", and patterns on the model's grid are read as they are (a disk 2 px down and 3 px across cost "
            "a simulated scan 0.99 → 0.83 in correlation); --calibrate moves and scales them onto the model's disk")


def check_uncalibrated(n: int, **angular) -> None:
    """Angular samplings given for patterns read as they are (on the model's grid, not calibrated) would do nothing:
    they were taken without a word and not recorded (the outputs audit, s40)."""
    given = [name.replace("_", "-") for name, value in angular.items() if value is not None]
    if given:
        raise DeepPhaseError(f"{given[0]}: the patterns are on the model's {n}×{n} grid and read as they are, which "
                             f"{' and '.join('--' + g for g in given)} would not change; add --calibrate to resample "
                             f"the patterns to {'it' if len(given) == 1 else 'them'}, or drop "
                             f"{'it' if len(given) == 1 else 'them'}")


def check_rotation(amplitudes, scan_info: dict, raster: dict, model, remedy: str | None = None):
    """The raster's rotation (the default 0° included) checked by the DPC curl criterion: a note (ending in
    ``remedy``, default :data:`~deepphase.data.calibration.ROTATION_REMEDY`) when the data clearly say otherwise
    (a mirrored detector, an angle more than 12° away, or half a turn, which the model's probe is asked to
    confirm), which would make a poor image; then also what the criterion saw, for rotation.png."""
    from ..data.calibration import ROTATION_CHECK_BLOCK, ROTATION_CHECK_MIN_PX, ROTATION_REMEDY, \
        centre_of_mass_block, find_scan_rotation, on_the_given_axis, rotation_note, with_sense

    if min(raster["scan_shape"]) < ROTATION_CHECK_MIN_PX:
        return scan_info, None
    com, noise = centre_of_mass_block(amplitudes, tuple(raster["scan_shape"]), raster["fastest"],
                                      ROTATION_CHECK_BLOCK)
    given = raster["rotation_deg"]
    if not (np.all(np.isfinite(com)) and np.all(np.isfinite(noise))):
        return scan_info, None  # NaN/Inf or empty patterns: the reconstruction names the frame
    found = find_scan_rotation(com, given_deg=given, noise=noise)
    if on_the_given_axis(found, given):  # which way round: the probe's say-so, where it has one, not the skew's
        found = with_sense(found, sense(amplitudes, model, {**raster, "rotation_deg": found["rotation_deg"]}))
    note = rotation_note(found, given, remedy or ROTATION_REMEDY)
    figure = {"com": com, "noise": noise, "found": found, "given_deg": given} if note else None
    return {**scan_info, "rotation_check": {**found, "note": note}}, figure


def check_probe(amplitudes, model, view, scan_info: dict, raster: dict, semi_angle=None, energy=None):
    """The data's probe against the model's (defocus and astigmatism, :mod:`deepphase.data.aberrations`), on the
    central positions of a raster: ``probe_check`` in the metadata (with a note when they clearly differ), and
    the step checked unless it was found (a raster read from positions is told to check their scale)."""
    from ..data.aberrations import PROBE_CHECK_MIN_PX, central_counts, probe_check_from_block

    if min(raster["scan_shape"]) < PROBE_CHECK_MIN_PX:
        return scan_info
    t0 = time.perf_counter()
    try:
        check = probe_check_from_block(
            central_counts(amplitudes, tuple(raster["scan_shape"]), raster["fastest"]), model, raster["step_px"],
            raster["rotation_deg"], raster["fastest"], view.info if view is not None else None, semi_angle, energy,
            (scan_info.get("rotation_check") or {}).get("note"), check_step="step_found" not in scan_info,
            step_remedy=None if "scan_shape" in scan_info else POSITIONS_STEP_REMEDY)
    except (ValueRangeError, ShapeError) as exc:  # NaN/Inf (the reconstruction names the frame), too few frequencies
        return {**scan_info, "probe_check": {"skipped": str(exc)}}
    return {**scan_info, "probe_check": {**check, "wall_s": round(time.perf_counter() - t0, 3)}}


def fine_step_note(raster: dict | None) -> str | None:
    """A note for positions that form a raster finer than scans are made (a quarter pixel, the step search's lower
    end, :data:`~deepphase.data.aberrations.STEP_SEARCH_PX`): positions in Å on a 0.2 Å grid form one of 0.17 px,
    on which the probe and step checks find too few frequencies to say so themselves."""
    from ..data.aberrations import STEP_SEARCH_PX

    if raster is None or min(np.atleast_1d(raster["step_px"])) >= STEP_SEARCH_PX[0]:
        return None
    step = min(np.atleast_1d(raster["step_px"]))
    return (f"the positions form a raster of {step:.3g} px steps, finer than scans are made ({STEP_SEARCH_PX[0]:g} px "
            "or more of the model's real-space grid; the reference scan's: 0.87 px)" + POSITIONS_STEP_REMEDY)


def _probe_note(check: dict, model) -> str | None:
    """The probe check's note for a call with arrays: none for a probe-aware model told the data's probe (the
    user said what the network should assume), the way to tell it for one not told."""
    if not check.get("note") or not model.probe_aware:
        return check.get("note")
    if model.info.get("told_coefficients_rad_per_px2") is not None:
        return None
    return (check["note"] + "; this probe-aware model can be told the difference: "
            "deepphase.data.aberrations.told_for_scan(model, amplitudes, positions)")


def check_scan(amplitudes, positions, model) -> dict:
    """The rotation, probe and step checks of (N, n, n) amplitudes at ``positions``, as
    :func:`~deepphase.reconstruction.pipeline.reconstruct` runs them: on positions that form a raster of at least
    16 × 16 (:func:`raster_of`), else none; and amplitudes read as counts by an ``AmplitudeView``.

    Returns
    -------
    dict
        ``raster_from_positions`` (None: not a raster), ``rotation_check`` and ``probe_check`` where they ran (as
        metadata.json records them), ``notes`` (what the user should check: also patterns that look like scan
        images, :func:`detector_axes_first_note`) and ``wall_s``.
    """
    from ..data.io import looks_like_amplitudes, sample_patterns

    t0 = time.perf_counter()
    info: dict = {}
    raster = raster_of(info, positions)
    _, block = sample_patterns(getattr(amplitudes, "frames", amplitudes), PATTERN_SAMPLE)
    notes = [text] if (text := detector_axes_first_note(block, AXES_FIRST_ARRAYS_REMEDY)) else []
    if getattr(amplitudes, "kind", None) == "counts" and looks_like_amplitudes(block):  # (the same frames' sample)
        notes.append("the patterns look like amplitudes (not whole numbers, their squares are), yet "
                     "AmplitudeView(frames, 'counts') reads them as counts (its square roots go to the network); "
                     "check it: pass the amplitudes as they are, or deepphase.data.io.infer_kind(frames)")
    if raster is not None:
        info, _ = check_rotation(amplitudes, info, raster, model, POSITIONS_ROTATION_REMEDY)
        info = check_probe(amplitudes, model, None, info, raster)
        notes += [text for text in (fine_step_note(raster), (info.get("rotation_check") or {}).get("note"),
                                    _probe_note(info.get("probe_check") or {}, model),
                                    (info.get("probe_check") or {}).get("step_note")) if text]
    return {**info, "notes": notes, "wall_s": round(time.perf_counter() - t0, 3)}
