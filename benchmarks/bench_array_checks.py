"""What ``deepphase.reconstruct`` says about positions it is given as arrays, and what its checks cost (RESULTS §42).

For each specimen and dose a SIDE² raster at 0.87 px is simulated, then reconstructed from the right positions and
from positions a user gets wrong: (col, row) order, the other scan axis fastest, turned 20°, half a turn, in Å on
a 0.2 Å grid (×0.2) and at half the step (×0.5); and from the right positions with the counts read as amplitudes
the other way round (``AmplitudeView(amplitudes, "counts")``). Each row: the correlation with the truth (mapped
into the frame of the positions given: :func:`deepphase.physics.object_in_scan_frame`), whether a note was given and
which, and the checks' wall time. Then the checks' cost on a 256 × 256 raster (65,536 patterns), against the
reconstruction's.

    python benchmarks/bench_array_checks.py [--side 32] [--big 256]
"""

from __future__ import annotations

import argparse
import time
import warnings

import deepphase
from deepphase.data.io import AmplitudeView
from deepphase.data.simulate import required_object_shape
from deepphase.evaluation.harness import specimen_image
from deepphase.evaluation.metrics import correlation
from deepphase.physics import object_in_scan_frame, reference_probe
from deepphase.reconstruction.checks import check_scan

STEP = 0.87


def wrong_positions(side: int) -> dict:
    right = deepphase.raster_positions((side, side), STEP)
    return {
        "right": right,
        "(col, row) order": right[:, ::-1].copy(),
        "other axis fastest": deepphase.raster_positions((side, side), STEP, fastest="col"),
        "turned 20°": deepphase.raster_positions((side, side), STEP, rotation_deg=20.0),
        "half a turn": deepphase.raster_positions((side, side), STEP, rotation_deg=180.0),
        "in Å (×0.2)": right * 0.2,
        "half the step (×0.5)": right * 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--big", type=int, default=256, help="side of the raster whose checks are timed (0: none)")
    args = parser.parse_args()
    probe = reference_probe()
    model = deepphase.load_model()
    print(f"{'specimen':14s} {'dose':>7s} {'positions':22s} {'corr':>6s} {'checks s':>8s}  note")
    for specimen in ("twisted-hbn", "cameraman"):
        for dose in (1_000.0, 27_882.0):
            right = deepphase.raster_positions((args.side, args.side), STEP)
            truth = specimen_image(specimen, required_object_shape(right, 32), seed=1)[0]
            scan = deepphase.simulate_scan(truth, probe, right, dose=dose, seed=1, progress=False)
            cases = {name: (scan.amplitude, p) for name, p in wrong_positions(args.side).items()}
            cases["amplitudes read as counts"] = (AmplitudeView(scan.amplitude, "counts"), right)
            for name, (amplitudes, given) in cases.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", deepphase.DeepPhaseNote)
                    rec = deepphase.reconstruct(amplitudes, given, model, progress=False)
                mapped = object_in_scan_frame(truth, right, given, rec.origin_px, rec.phase.shape, 32)[0]
                said = "; ".join(n.split(":")[0][:70] for n in rec.notes) or "—"
                print(f"{specimen:14s} {dose:7.0f} {name:22s} {correlation(rec.phase, mapped):6.3f} "
                      f"{rec.metadata['scan_checks']['wall_s']:8.2f}  {said}")
    if args.big:
        positions = deepphase.raster_positions((args.big, args.big), STEP)
        truth = specimen_image("twisted-hbn", required_object_shape(positions, 32), seed=2)[0]
        scan = deepphase.simulate_scan(truth, probe, positions, dose=27_882.0, seed=2, progress=False)
        t = time.perf_counter()
        found = check_scan(scan.amplitude, positions, model)
        checks = time.perf_counter() - t
        t = time.perf_counter()
        deepphase.reconstruct(scan.amplitude, positions, model, progress=False, checks=False)
        whole = time.perf_counter() - t
        print(f"{args.big}×{args.big} raster: checks {checks:.2f} s (notes: {len(found['notes'])}), reconstruct "
              f"without them {whole:.2f} s: the checks add {100 * checks / whole:.1f} %")


if __name__ == "__main__":
    main()
