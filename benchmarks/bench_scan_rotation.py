"""What a wrong scan rotation or a mirrored detector costs, what the DPC curl criterion sees, and what checking
a given rotation costs.

Usage: python benchmarks/bench_scan_rotation.py [--scan 64] [--doses 27882 2000 300 100] [--folder DIR]
       [--multislice [--cache DIR]]

1. Image quality against the rotation's error: a simulated twisted-hBN raster (SCAN×SCAN positions, step
   0.87 px, rotation 0, 27,882 e/pattern) reconstructed with positions rotated by the error; the correlation
   with the truth mapped through the same rotation (central two thirds of the image), and with the patterns
   mirrored in k_row (a detector of the other handedness) at the right angle.
2. The curl ratio (mean squared curl over its median across angles) against the angle's error, as recorded
   and with the patterns mirrored, at each dose, raw and with the counting noise's floor taken off; and what
   ``scan_rotation_from_patterns`` (``--rotation auto``) finds at each dose, mirrored too, and whether it
   trusts it (``rotation_is_clear``), against frames in random order.
3. The check of a given rotation (``deepphase reconstruct`` without ``--rotation auto``) on bench_auto_engine's
   256×256 scan file (made once in FOLDER): its wall time, three times.
4. With ``--multislice`` (abTEM): the same criterion on 40×40 scans at rotation 25° simulated by multislice
   (the reference probe) through each of deepphase's atomic specimens, thin and thick, at 27,882 and 1,000
   e/pattern: the angle, handedness, ratio, skew and quarters found, as recorded and mirrored.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_auto_engine import machine_line, scan_file  # noqa: E402  (the same 256×256 scan file)

STEP = 0.87


def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def quality_against_error(amplitudes, truth, shape, errors) -> None:
    """Correlation of the image made with positions rotated by each error with the truth seen the same way."""
    from deepphase.physics import flip_patterns, raster_positions
    from deepphase.reconstruction.pipeline import reconstruct

    def score(error, patterns):
        rotated = raster_positions(shape, STEP, 0.0, "col") @ _rotation(error).T
        shift = rotated.min(axis=0)
        rec = reconstruct(patterns, rotated - shift, progress=False, checks=False)
        rows, cols = np.indices(rec.phase.shape, dtype=np.float64)
        # image pixel x is object pixel R(−error)·(x − 16 + shift) + 16 (the window's centre follows its corner)
        x = np.stack([rows + rec.origin_px[0] - 16 + shift[0], cols + rec.origin_px[1] - 16 + shift[1]], -1)
        source = x @ _rotation(error)
        seen = ndimage.map_coordinates(truth, [source[..., 0] + 16, source[..., 1] + 16], order=1, cval=np.nan)
        h, w = rec.phase.shape
        inside = np.isfinite(seen) & np.isfinite(rec.phase)
        inside[: h // 6], inside[h - h // 6 :], inside[:, : w // 6], inside[:, w - w // 6 :] = False, False, False, False
        return np.corrcoef(rec.phase[inside], seen[inside])[0, 1]

    print("rotation error (deg)   correlation with the truth")
    for error in errors:
        print(f"{error:>20g}   {score(error, amplitudes):.3f}")
    print(f"{'mirrored, 0':>20}   {score(0.0, flip_patterns(amplitudes)):.3f}")


def curl_against_error(amplitudes, shape, dose, errors) -> None:
    from deepphase.data.calibration import (_curl, centre_of_mass, centre_of_mass_noise, rotation_is_clear,
                                            scan_rotation_from_patterns)
    from deepphase.physics import flip_patterns

    counts = np.square(amplitudes, dtype=np.float64)
    com = centre_of_mass(counts).reshape(*shape, 2)
    com -= com.mean(axis=(0, 1))
    floor = float(np.mean(centre_of_mass_noise(counts).reshape(shape)[1:-1, 1:-1]))
    for name, field in (("as recorded", com), ("mirrored", com * [-1.0, 1.0])):
        median = np.median(_curl(field, np.arange(0.0, 180.0, 1.0)))
        raw = ", ".join(f"{e:g}° {_curl(field, [e])[0] / median:.3f}" for e in errors)
        less = ", ".join(f"{(_curl(field, [e])[0] - floor) / (median - floor):.3f}" for e in errors)
        print(f"{dose:>8,.0f} e/pattern, {name}: curl ratio {raw}; noise floor ({floor / median:.2f}) taken off: {less}")
    shuffled = amplitudes[np.random.default_rng(0).permutation(len(amplitudes))]
    for name, patterns in (("as recorded", amplitudes), ("mirrored", flip_patterns(amplitudes)),
                           ("frames shuffled", shuffled)):
        found = scan_rotation_from_patterns(patterns, shape, "col")
        print(f"{'':>20}{name}: found {found['rotation_deg']:.2f}°, flip {found['flip_patterns']}, curl ratio "
              f"{found['curl_ratio']:.3f}, quarters {', '.join(f'{a:.1f}' for a in found.get('quarters', []))}; "
              f"trusted: {rotation_is_clear(found)}")


def check_time(folder: Path) -> None:
    from deepphase.data.calibration import ROTATION_CHECK_BLOCK, rotation_note, scan_rotation_from_patterns
    from deepphase.data.io import AmplitudeView, load_scan

    data = load_scan(scan_file(folder, 256, 256))
    view = AmplitudeView(data.frames, "amplitude")
    for _ in range(3):
        t = time.perf_counter()
        found = scan_rotation_from_patterns(view, (256, 256), "row", block=ROTATION_CHECK_BLOCK, given_deg=0.0)
        note = rotation_note(found, 0.0)
        print(f"check of the given rotation on the 256×256 scan ({ROTATION_CHECK_BLOCK}² positions): "
              f"{time.perf_counter() - t:.3f} s; found {found['rotation_deg']:.2f}°, curl ratio "
              f"{found['curl_ratio']:.3f}, note: {note}")
    data.close()


def multislice_specimens(cache: Path) -> None:
    from deepphase.data.calibration import rotation_is_clear, rotation_note, scan_rotation_from_patterns
    from deepphase.data.materials import MATERIAL_SPECIMENS, multislice_scan
    from deepphase.physics import flip_patterns, raster_positions, reference_probe

    positions = raster_positions((40, 40), STEP, 25.0, "col")
    print("multislice (abTEM), 40×40 positions at rotation 25°, the reference probe")
    for name in MATERIAL_SPECIMENS:
        for dose in (27882.0, 1000.0):
            amplitudes = multislice_scan(name, positions, probe=reference_probe(), dose=dose, seed=0, cache_dir=cache,
                                         progress=False).amplitude
            found = scan_rotation_from_patterns(amplitudes, (40, 40), "col", given_deg=0.0)
            mirrored = scan_rotation_from_patterns(flip_patterns(amplitudes), (40, 40), "col")
            print(f"{name:>20} {dose:>7,.0f} e: {found['rotation_deg']:6.2f}°, ratio {found['curl_ratio']:.3f}, "
                  f"floor {found['noise_floor']:.2f}, skew {found['divergence_skew']:.2f}, quarters "
                  f"{', '.join(f'{a:.1f}' for a in found['quarters'])}, trusted {rotation_is_clear(found)}, "
                  f"0° given noted {rotation_note(found, 0.0) is not None} | mirrored: {mirrored['rotation_deg']:.2f}°, "
                  f"flip {mirrored['flip_patterns']}, trusted {rotation_is_clear(mirrored)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=int, default=64, help="positions per side of the simulated raster")
    parser.add_argument("--doses", type=float, nargs="+", default=[27882.0, 2000.0, 300.0, 100.0])
    parser.add_argument("--folder", type=Path, default=Path("bench-auto-engine"),
                        help="where bench_auto_engine's 256×256 scan file is (made if missing)")
    parser.add_argument("--multislice", action="store_true", help="also the abTEM multislice specimens (part 4)")
    parser.add_argument("--cache", type=Path, default=Path("bench-scan-rotation-cache"),
                        help="abTEM's noise-free patterns, kept between runs")
    args = parser.parse_args()
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import twisted_hbn
    from deepphase.physics import raster_positions, reference_probe

    print(machine_line())
    shape = (args.scan, args.scan)
    positions = raster_positions(shape, STEP, 0.0, "col")
    truth = twisted_hbn(required_object_shape(positions, 32), seed=2)
    for i, dose in enumerate(args.doses):
        amplitudes = simulate_scan(truth, reference_probe(), positions, dose=dose, seed=0, progress=False).amplitude
        if i == 0:
            print(f"{args.scan}×{args.scan} positions, {dose:,.0f} e/pattern")
            quality_against_error(amplitudes, truth, shape, (0, 5, 10, 20, 30, 45, 90, 170, 180, 190))
        curl_against_error(amplitudes, shape, dose, (0, 5, 10, 20, 45, 90))
    check_time(args.folder)
    if args.multislice:
        multislice_specimens(args.cache)


if __name__ == "__main__":
    main()
