"""What a probe unlike the model's costs, and how well the probe check measures the difference.

Usage: python benchmarks/bench_probe_mismatch.py [--scan 48] [--parts quality accuracy multislice cost]
       [--cache DIR] [--folder DIR]

1. quality: the packaged default on simulated twisted-hBN and cameraman rasters (SCAN×SCAN, step 0.87 px) whose
   probe is the reference probe with a defocus or astigmatism added (Δχ at the bright-field disk's edge, rad),
   at 27,882 and 1,000 e/pattern: correlation with the truth.
2. accuracy: ``measure_probe_mismatch`` on scans with random Δχ (defocus and astigmatism up to 1.7 rad at the
   edge) at 27,882, 1,000 and 100 e/pattern, 24×24 and 64×64 positions: the error of the edge phase found, the
   uncertainty it reports, and its wall time; and how often a matched probe would be noted (false alarms).
3. multislice (abTEM): the check on 40×40 scans simulated by multislice through each of deepphase's atomic
   specimens with the reference probe, as is and with 0.6 rad of defocus added, at 27,882 e/pattern.
4. cost: ``deepphase reconstruct`` of bench_auto_engine's 256×256 scan file (made once in FOLDER) with the check
   and with ``--no-probe-check``, alternately, three times each: the wall time of the command and of the check.
5. aware: the packaged default against a probe-aware model (``--aware-model``, default the packaged
   ``probe-aware``) told nothing and told what the probe check measures on the scan (as ``reconstruct`` tells it),
   on part 1's rasters with defocus and astigmatism from 0 to beyond its training range; then on the 64×64 abTEM
   multislice scans of the thick specimens (SrTiO₃, Au on carbon; cached in CACHE), whose depth reads as a defocus.
6. aware-cost: ``deepphase reconstruct`` of part 4's 256×256 scan with ``--model default`` and ``--model
   probe-aware``, alternately, three times each: the wall time of the command and the network's patterns per second.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_auto_engine import machine_line, scan_file  # noqa: E402

STEP = 0.87


def quality(scan: int) -> None:
    from deepphase.data.aberrations import add_aberrations
    from deepphase.data.calibration import model_disk
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.evaluation.metrics import correlation
    from deepphase.physics import raster_positions, reference_probe
    from deepphase.reconstruction.pipeline import reconstruct

    probe = reference_probe()
    radius2 = model_disk(probe)["radius"] ** 2
    positions = raster_positions((scan, scan), STEP)
    print(f"1. quality: {scan}×{scan} positions, the packaged default; Δχ at the disk edge (r = {radius2 ** 0.5:.2f} px)")
    cases = [("matched", (0, 0, 0))]
    for edge in (0.3, 0.6, 1.1, 2.2):
        a = edge / radius2
        cases += [(f"defocus {edge:+.1f}", (a, 0, a)), (f"defocus {-edge:+.1f}", (-a, 0, -a))]
    for edge in (0.6, 1.1):
        a = edge / radius2
        cases.append((f"astigmatism {edge:.1f}", (a, 0, -a)))
    print("| Δχ at the edge (rad) | " + " | ".join(f"{s} {d:,.0f} e" for s in ("twisted-hbn", "cameraman")
                                                  for d in (27882, 1000)) + " |")
    print("|---|" + "---|" * 4)
    truths = {s: builtin_specimen(s, required_object_shape(positions, 32), seed=1) for s in ("twisted-hbn", "cameraman")}
    for label, coefficients in cases:
        row = []
        for name, truth in truths.items():
            for dose in (27882.0, 1000.0):
                amplitudes = simulate_scan(truth, add_aberrations(probe, coefficients), positions, dose=dose, seed=1,
                                           progress=False).amplitude
                rec = reconstruct(amplitudes, positions, progress=False, checks=False)
                r0, c0 = rec.origin_px
                row.append(correlation(rec.phase, truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]]))
        print(f"| {label} | " + " | ".join(f"{c:.3f}" for c in row) + " |", flush=True)


def accuracy() -> None:
    from deepphase.data.aberrations import add_aberrations, measure_probe_mismatch, probe_mismatch_note
    from deepphase.data.calibration import model_disk
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.physics import raster_positions, reference_probe

    probe = reference_probe()
    radius2 = model_disk(probe)["radius"] ** 2
    rng = np.random.default_rng(0)
    print("\n2. accuracy: random Δχ (defocus and astigmatism up to 1.7 rad at the edge), twisted hBN and cameraman;"
          " 8 scans per row, 4 of them with a matched probe")
    print("| positions | e/pattern | median / largest error of the edge phase (rad) | median / largest uncertainty "
          "reported | matched probes noted | mismatched (≥ 0.6 rad) noted | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    for scan in (24, 64):
        positions = raster_positions((scan, scan), STEP)
        shape = required_object_shape(positions, 32)
        for dose in (27882.0, 1000.0, 100.0):
            errors, reported, false_alarms, found_alarms, n_mismatched, times = [], [], 0, 0, 0, []
            for i in range(8):
                name = ("twisted-hbn", "cameraman")[i % 2]
                truth = builtin_specimen(name, shape, seed=10 + i)
                matched = i < 4
                if matched:
                    coefficients = np.zeros(3)
                else:
                    defocus, astig, angle = rng.uniform(-1.2, 1.2), rng.uniform(0, 0.5), rng.uniform(0, np.pi)
                    defocus = np.sign(defocus) * max(abs(defocus), 0.6)
                    d, s = defocus / radius2, astig / radius2
                    coefficients = np.array([d + s * np.cos(2 * angle), s * np.sin(2 * angle), d - s * np.cos(2 * angle)])
                amplitudes = simulate_scan(truth, add_aberrations(probe, coefficients), positions, dose=dose, seed=i,
                                           progress=False).amplitude
                t0 = time.perf_counter()
                found = measure_probe_mismatch(amplitudes, (scan, scan), probe, STEP)
                times.append(time.perf_counter() - t0)
                delta = np.asarray(found["coefficients"]) - coefficients
                a_rr, a_rc, a_cc = delta
                errors.append((abs(a_rr + a_cc) / 2 + np.hypot((a_rr - a_cc) / 2, a_rc)) * radius2)
                reported.append(found["uncertainty_rad"])
                noted = probe_mismatch_note(found) is not None
                false_alarms += matched and noted
                found_alarms += (not matched) and noted
                n_mismatched += not matched
            print(f"| {scan}×{scan} | {dose:,.0f} | {np.median(errors):.3f} / {np.max(errors):.3f} | "
                  f"{np.median(reported):.3f} / {np.max(reported):.3f} | {false_alarms} of 4 | {found_alarms} of "
                  f"{n_mismatched} | {np.median(times):.2f} |", flush=True)


def multislice(cache: Path) -> None:
    from deepphase.data.aberrations import add_aberrations, measure_probe_mismatch, probe_mismatch_note
    from deepphase.data.calibration import model_disk
    from deepphase.data.materials import MATERIAL_SPECIMENS, multislice_scan
    from deepphase.physics import raster_positions, reference_probe

    probe = reference_probe()
    radius2 = model_disk(probe)["radius"] ** 2
    positions = raster_positions((40, 40), STEP, 25.0, "col")
    print("\n3. multislice (abTEM), 40×40 positions at rotation 25°, 27,882 e/pattern: Δχ found (edge phase, rad)")
    print("| specimen | put in 0: found ± reported, noted | put in +0.6 rad defocus: found ± reported, noted |")
    print("|---|---|---|")
    for name in MATERIAL_SPECIMENS:
        row = []
        for edge in (0.0, 0.6):
            a = edge / radius2
            amplitudes = multislice_scan(name, positions, probe=add_aberrations(probe, (a, 0, a)), dose=27882.0, seed=0,
                                         cache_dir=cache, progress=False).amplitude
            found = measure_probe_mismatch(amplitudes, (40, 40), probe, STEP, 25.0, "col")
            signed = found["defocus_rad_per_px2"] * radius2
            row.append(f"{signed:+.2f} (edge {found['edge_phase_rad']:.2f}) ± {found['uncertainty_rad']:.2f}, "
                       f"{'noted' if probe_mismatch_note(found) else 'not noted'}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


def _correlation(amplitudes, positions, model, truth) -> float:
    from deepphase.evaluation.metrics import correlation
    from deepphase.reconstruction.pipeline import reconstruct

    rec = reconstruct(amplitudes, positions, model, progress=False, checks=False)
    r0, c0 = rec.origin_px
    return correlation(rec.phase, truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]])


def aware(scan: int, model_name: str, cache: Path) -> None:
    from deepphase.data.aberrations import add_aberrations, measure_probe_mismatch, told_to_probe_aware
    from deepphase.data.calibration import model_disk
    from deepphase.data.materials import multislice_scan
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.models.modelfile import load_model
    from deepphase.physics import raster_positions, reference_probe

    default, model = load_model("default"), load_model(model_name)
    probe = reference_probe()
    radius2 = model_disk(probe)["radius"] ** 2
    print(f"\n5. aware: {scan}×{scan} positions; {model_name} (trained for ±{model.aberration_range:g} rad of defocus, "
          "half of it of astigmatism) told nothing / told the probe check's finding; correlation with the truth")
    cases = [("0", (0, 0, 0))]
    for edge in (0.6, 1.1, 1.6, 2.0, 2.5):
        cases += [(f"defocus {edge:+.1f}", (edge, 0, edge)), (f"defocus {-edge:+.1f}", (-edge, 0, -edge))]
    cases += [("astigmatism 0.5", (0.5, 0, -0.5)), ("astigmatism 1.0", (1.0, 0, -1.0)),
              ("defocus +1.0, astigmatism 0.5 at 45°", (1.0, 0.5, 1.0))]
    doses = (27882.0, 1000.0)
    print("| Δχ at the edge (rad) | " + " | ".join(f"{s} {d:,.0f} e: default / untold / told" for s in
                                                  ("twisted-hbn", "cameraman") for d in doses) + " | found (rad) |")
    print("|---|" + "---|" * 5)
    positions = raster_positions((scan, scan), STEP)
    truths = {s: builtin_specimen(s, required_object_shape(positions, 32), seed=1) for s in ("twisted-hbn", "cameraman")}
    for label, edges in cases:
        row, found_edges = [], []
        for name, truth in truths.items():
            for dose in doses:
                amplitudes = simulate_scan(truth, add_aberrations(probe, np.array(edges, float) / radius2), positions,
                                           dose=dose, seed=1, progress=False).amplitude
                found = measure_probe_mismatch(amplitudes, (scan, scan), probe, STEP)
                told = model.told(told_to_probe_aware(model, found)["told_coefficients_rad_per_px2"])
                row.append(" / ".join(f"{_correlation(amplitudes, positions, m, truth):.3f}"
                                      for m in (default, model, told)))
                found_edges.append(found["edge_phase_rad"])
        print(f"| {label} | " + " | ".join(row) + f" | {min(found_edges):.2f}–{max(found_edges):.2f} |", flush=True)
    print("\n| multislice, 64×64 positions, 27,882 e | found (rad at the edge) | default | untold | told |")
    print("|---|---|---|---|---|")
    positions = raster_positions((64, 64), STEP)
    for name in ("srtio3", "au-on-carbon"):
        ms = multislice_scan(name, positions, probe=probe, dose=27882.0, seed=1, cache_dir=cache, progress=False)
        found = measure_probe_mismatch(ms.amplitude, (64, 64), probe, STEP)
        told = model.told(told_to_probe_aware(model, found)["told_coefficients_rad_per_px2"])
        print(f"| {name} | {found['defocus_rad_per_px2'] * radius2:+.2f} (edge {found['edge_phase_rad']:.2f}) | "
              + " | ".join(f"{_correlation(ms.amplitude, positions, m, ms.truth):.3f}" for m in (default, model, told))
              + " |", flush=True)


def cost(folder: Path) -> None:
    path = scan_file(folder, 256, 256)
    print("\n4. cost on the 256×256 scan (65,536 patterns), `deepphase reconstruct FILE --scan-shape 256 256 --step 0.87`")
    print("| run | with the check: command (s), check (s) | --no-probe-check: command (s) |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(3):
            row = []
            for extra in ([], ["--no-probe-check"]):
                out = Path(tmp) / f"out-{run}-{len(extra)}"
                t0 = time.perf_counter()
                subprocess.run(["deepphase", "reconstruct", str(path), "--scan-shape", "256", "256", "--step",
                                str(STEP), "--out", str(out), *extra], check=True, capture_output=True)
                wall = time.perf_counter() - t0
                check = json.loads((out / "metadata.json").read_text()).get("probe_check")
                row.append(f"{wall:.1f}" + (f", {check['wall_s']:.2f} (edge {check['edge_phase_rad']:.2f} rad, note: "
                                            f"{check['note'] is not None})" if check else ""))
            print(f"| {run + 1} | " + " | ".join(row) + " |", flush=True)


def aware_cost(folder: Path) -> None:
    path = scan_file(folder, 256, 256)
    print("\n6. aware-cost on the 256×256 scan (65,536 patterns), `deepphase reconstruct FILE --scan-shape 256 256 "
          "--step 0.87 --model M`")
    print("| run | default: command (s), network (patterns/s) | probe-aware: command (s), network (patterns/s) | ratio |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(3):
            row, walls = [], []
            for model in ("default", "probe-aware"):
                out = Path(tmp) / f"out-{run}-{model}"
                t0 = time.perf_counter()
                subprocess.run(["deepphase", "reconstruct", str(path), "--scan-shape", "256", "256", "--step",
                                str(STEP), "--model", model, "--out", str(out)], check=True, capture_output=True)
                walls.append(time.perf_counter() - t0)
                timings = json.loads((out / "metadata.json").read_text())["timings"]
                row.append(f"{walls[-1]:.1f}, {timings['patterns_per_second']:,.0f}")
            print(f"| {run + 1} | " + " | ".join(row) + f" | {walls[1] / walls[0]:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=int, default=48, help="positions per side of part 1's rasters")
    parser.add_argument("--parts", nargs="+", default=["quality", "accuracy"],
                        choices=["quality", "accuracy", "multislice", "cost", "aware", "aware-cost"])
    parser.add_argument("--aware-model", default="probe-aware", help="the probe-aware model of part 5")
    parser.add_argument("--cache", type=Path, default=Path("bench-probe-mismatch-cache"),
                        help="abTEM's noise-free patterns for parts 3 and 5, kept between runs")
    parser.add_argument("--folder", type=Path, default=Path("bench-auto-engine"),
                        help="where bench_auto_engine's 256×256 scan file is (made if missing), for parts 4 and 6")
    args = parser.parse_args()
    print(machine_line())
    if "quality" in args.parts:
        quality(args.scan)
    if "accuracy" in args.parts:
        accuracy()
    if "multislice" in args.parts:
        multislice(args.cache)
    if "cost" in args.parts:
        cost(args.folder)
    if "aware" in args.parts:
        aware(args.scan, args.aware_model, args.cache)
    if "aware-cost" in args.parts:
        aware_cost(args.folder)


if __name__ == "__main__":
    main()
