"""Which way round a scan runs (half a turn): the divergence's skew against the probe's fit (RESULTS §39).

For each case a raster is simulated at 0° or at 180° (the patterns then inverted against the scan) and the
sense is asked of (a) the DPC divergence's skew (:func:`deepphase.data.calibration.find_scan_rotation`) and (b)
the model probe's weak-phase fit at both senses (:func:`deepphase.data.aberrations.scan_sense`). Prints one row
per case: which sense each finds, the skew, the two explained shares and their ratio.

    python benchmarks/bench_scan_sense.py [--side 48] [--seeds 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from deepphase.data.aberrations import add_aberrations, scan_sense
from deepphase.data.calibration import scan_rotation_from_patterns
from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.evaluation.harness import specimen_image
from deepphase.physics import raster_positions, reference_probe
from deepphase.physics.probe import ProbeParameters, probe_from_parameters


def turned(angle: float) -> bool:
    return abs((angle + 180.0) % 360.0 - 180.0) > 90.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    reference = reference_probe()
    # An aberration-free probe of about the reference's disk (its own conjugate: nothing tells the sense).
    symmetric = probe_from_parameters(ProbeParameters(300, 25.0, 0, 0, 32, 0.2))
    probes = {"reference": reference, "reference +0.8 rad": add_aberrations(reference, (0.8 / 56, 0, 0.8 / 56)),
              "aberration-free": symmetric}
    print("| specimen | probe | source σ px | e/pattern | true | skew says | skew | probe says | explained (0° / 180°) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    tally = {"skew": [0, 0], "probe": [0, 0, 0]}
    t0 = time.perf_counter()
    for specimen in ("twisted-hbn-bilayer", "hbn", "mos2-vacancies", "cameraman"):
        for probe_name, probe in probes.items():
            for sigma in (0.0, 1.0, 1.5):
                for dose in (1_000.0, 27_882.0):
                    if probe_name != "reference" and (sigma == 1.5 or dose == 1_000.0):
                        continue
                    for seed in range(args.seeds):
                        true = 180.0 * (seed % 2)
                        positions = raster_positions((args.side, args.side), 0.87, rotation_deg=true)
                        truth, _ = specimen_image(specimen, required_object_shape(positions, 32), seed=seed)
                        scan = simulate_scan(truth, probe, positions, dose=dose,
                                             seed=seed, source_size_px=sigma, progress=False)
                        shape = (args.side, args.side)
                        found = scan_rotation_from_patterns(scan.amplitude, shape, "row", given_deg=0.0)
                        sense = scan_sense(scan.amplitude, shape, reference, 0.87, 0.0, "row")
                        skew_right = turned(found["rotation_deg"]) == bool(true)
                        tally["skew"][0 if skew_right else 1] += 1
                        probe_says = ("undecided" if not sense["decided"] else
                                      ("180°" if sense["half_turn"] else "0°"))
                        right = sense["decided"] and sense["half_turn"] == bool(true)
                        tally["probe"][0 if right else (2 if not sense["decided"] else 1)] += 1
                        e0, e1 = sense["explained"]
                        print(f"| {specimen} | {probe_name} | {sigma:g} | {dose:,.0f} | {true:.0f}° | "
                              f"{'180°' if turned(found['rotation_deg']) else '0°'}{'' if skew_right else ' ✗'} | "
                              f"{found['divergence_skew']:+.2f} | {probe_says}{' ✗' if sense['decided'] and not right else ''} | "
                              f"{e0:.3f} / {e1:.3f} | {max(e0, e1) / max(min(e0, e1), 1e-12):.2f} |", flush=True)
    print(f"\nskew: {tally['skew'][0]} right, {tally['skew'][1]} wrong; probe: {tally['probe'][0]} right, "
          f"{tally['probe'][1]} wrong, {tally['probe'][2]} undecided ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
