"""The raster's step from the patterns: how close ``--step auto`` comes, and whether a wrong ``--step`` is noticed
(RESULTS §40).

For each case a raster of SIDE² positions is simulated at a true step, rotated 20°, and (a) the step is found
(:func:`deepphase.data.aberrations.measure_scan_step`, what ``--step auto`` runs) and (b) the step given as
0.87 px (the reference scan's) is checked (:func:`deepphase.data.aberrations.check_scan_step`, what every
reconstruct of a raster runs, and :func:`~deepphase.data.aberrations.step_note`: a note or none). Cases:
twisted hBN, hBN and a photograph; the reference probe and the same 0.8 rad out of focus; true steps 0.5, 0.87
and 1.3 px; 1,000 and 27,882 electrons per pattern. Prints one row per case and a summary.

    python benchmarks/bench_scan_step.py [--side 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from deepphase.data.aberrations import add_aberrations, check_scan_step, measure_scan_step, step_note
from deepphase.data.calibration import model_disk
from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.evaluation.harness import specimen_image
from deepphase.physics import raster_positions, reference_probe

GIVEN = 0.87
ROTATION = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--specimens", nargs="+", default=["twisted-hbn", "hbn", "cameraman"])
    args = parser.parse_args()
    reference = reference_probe()
    edge = 0.8 / model_disk(reference)["radius"] ** 2
    probes = {"reference": reference, "reference +0.8 rad": add_aberrations(reference, (edge, 0, edge))}
    print("| specimen | data's probe | e/pattern | true step px | found px | error | time s | given 0.87: "
          "explained (given / −5 % / +5 %) | searched | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    errors, right, wrong, missed, times, check_times = [], 0, 0, 0, [], {True: [], False: []}
    for specimen in args.specimens:
        for probe_name, data_probe in probes.items():
            for dose in (1000.0, 27882.0):
                for true in (0.5, GIVEN, 1.3):
                    positions = raster_positions((args.side, args.side), true, ROTATION, "row")
                    image, _ = specimen_image(specimen, required_object_shape(positions, 32), seed=1)
                    scan = simulate_scan(image, data_probe, positions, dose=dose, seed=1, progress=False)
                    t0 = time.perf_counter()
                    found = measure_scan_step(scan.amplitude, (args.side, args.side), reference, ROTATION, "row")
                    t1 = time.perf_counter()
                    check = check_scan_step(scan.amplitude, (args.side, args.side), reference, GIVEN, ROTATION, "row")
                    t2 = time.perf_counter()
                    note = step_note(check)
                    times.append(t1 - t0)
                    check_times[true == GIVEN].append(t2 - t1)
                    error = found["step_px"] / true - 1
                    errors.append(error)
                    if true == GIVEN:
                        wrong += note is not None
                    else:
                        right += note is not None
                        missed += note is None
                    shares = " / ".join(f"{x:.3f}" for x in check["explained_near_given"])
                    print(f"| {specimen} | {probe_name} | {dose:,.0f} | {true} | {found['step_px']:.4f} | "
                          f"{100 * error:+.1f} % | {t1 - t0:.1f} | {shares} | "
                          f"{check['searched']} | {'yes' if note else '—'} |", flush=True)
    errors = np.abs(errors)
    print(f"\n--step auto: |error| median {100 * np.median(errors):.1f} %, largest {100 * errors.max():.1f} % over "
          f"{len(errors)} cases; within 2 %: {int(np.sum(errors <= 0.02))}, within 5 %: {int(np.sum(errors <= 0.05))}; "
          f"{np.median(times):.1f} s a search (median)")
    print(f"the check of a 0.87 px step: a note in {right} of {right + missed} scans made at another step, in {wrong} "
          f"of {len(errors) - right - missed} made at 0.87 px; a check takes {np.median(check_times[True]):.2f} s "
          f"(median; {max(check_times[True]):.2f} s at most) where the step is right, "
          f"{np.median(check_times[False]):.1f} s where it is not (the search)")


if __name__ == "__main__":
    main()
