"""What a finite source and a detector's blur cost: the packaged models on partially coherent, blurred data.

Usage: python benchmarks/bench_instrument.py [--scan 48] [--parts quality focal deconvolve] [--models default ...]

quality: simulated twisted-hBN and cameraman rasters (SCAN×SCAN, step 0.87 px) with the reference probe, a Gaussian
effective source of σ = 0 … 2 real-space px (FWHM 0 … 0.94 Å at 0.2 Å/px) and a Gaussian detector point spread of
σ = 0 … 1.5 detector px, at 27,882 and 1,000 e/pattern. For each model: correlation with the truth, and with the
truth blurred by the source (what a perfect coherent reconstruction of the blurred data would at best reach); and
what the probe check finds (edge phase, rad, and whether it would note it).

focal: the same rasters with an incoherent Gaussian spread of focus (chromatic: Cc·ΔE/E) of σ = 0.5 … 2 rad at the
bright-field disk's edge (about 1 nm per rad at 300 kV and 25 mrad): each model's correlation with the truth and
what the probe check finds.

deconvolve: each model's image, then with the source's blur divided out (``reconstruct --source-size``: Wiener λ by
the dose), and the first model's with other λ, on scans like quality's but of other specimen and noise seeds (2,
not the 1 the λ were first chosen on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_auto_engine import machine_line  # noqa: E402

STEP = 0.87
SOURCES = (0.0, 0.5, 1.0, 1.5, 2.0)
PSFS = (0.5, 1.0, 1.5)


def _scores(amplitudes, positions, references: list, loaded: dict) -> list[list[float]]:
    """Each model's correlation with each reference image (object grid); a probe-aware model is told what the
    probe check finds, as reconstruct tells it."""
    from deepphase.data.aberrations import told_for_scan
    from deepphase.evaluation.metrics import correlation
    from deepphase.reconstruction.pipeline import reconstruct

    out = []
    for model in loaded.values():
        if model.probe_aware:
            model, _ = told_for_scan(model, amplitudes, positions)
        rec = reconstruct(amplitudes, positions, model, progress=False, checks=False)
        r0, c0 = rec.origin_px
        window = (slice(r0, r0 + rec.phase.shape[0]), slice(c0, c0 + rec.phase.shape[1]))
        out.append([correlation(rec.phase, reference[window]) for reference in references])
    return out


def focal(scan: int, models: list[str]) -> None:
    from deepphase.data.aberrations import measure_probe_mismatch, probe_mismatch_note
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.models.modelfile import load_model
    from deepphase.physics import raster_positions, reference_probe

    probe = reference_probe()
    positions = raster_positions((scan, scan), STEP)
    shape = required_object_shape(positions, 32)
    loaded = {name: load_model(name) for name in models}
    print(f"\nfocal: {scan}×{scan} positions, step {STEP} px, seed 1; correlation with the truth")
    print("| specimen | e/pattern | focal spread σ (rad at the edge) | " + " | ".join(models)
          + " | probe check: edge phase (rad), noted |")
    print("|---|---|---|" + "---|" * (len(models) + 1))
    for name in ("twisted-hbn", "cameraman"):
        truth = builtin_specimen(name, shape, seed=1)
        for dose in (27882.0, 1000.0):
            for spread in (0.0, 0.5, 1.0, 1.5, 2.0):
                amplitudes = simulate_scan(truth, probe, positions, dose=dose, seed=1, progress=False,
                                           focal_spread_rad=spread).amplitude
                cells = _scores(amplitudes, positions, [truth], loaded)
                found = measure_probe_mismatch(amplitudes, (scan, scan), probe, STEP)
                noted = "noted" if probe_mismatch_note(found) else "—"
                print(f"| {name} | {dose:,.0f} | {spread:g} | " + " | ".join(f"{c:.3f}" for c, in cells)
                      + f" | {found['edge_phase_rad']:+.2f}, {noted} |", flush=True)


def quality(scan: int, models: list[str]) -> None:
    from scipy.ndimage import gaussian_filter

    from deepphase.data.aberrations import measure_probe_mismatch, probe_mismatch_note
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.models.modelfile import load_model
    from deepphase.physics import raster_positions, reference_probe

    probe = reference_probe()
    positions = raster_positions((scan, scan), STEP)
    shape = required_object_shape(positions, 32)
    loaded = {name: load_model(name) for name in models}
    cases = [(s, 0.0) for s in SOURCES] + [(0.0, p) for p in PSFS] + [(1.0, 1.0)]
    print(f"quality: {scan}×{scan} positions, step {STEP} px; correlation with the truth (with the source-blurred truth)")
    print("| specimen | e/pattern | source σ (px) | detector PSF σ (px) | " + " | ".join(models)
          + " | probe check: edge phase (rad), noted |")
    print("|---|---|---|---|" + "---|" * (len(models) + 1))
    for name in ("twisted-hbn", "cameraman"):
        truth = builtin_specimen(name, shape, seed=1)
        for dose in (27882.0, 1000.0):
            for source, psf in cases:
                amplitudes = simulate_scan(truth, probe, positions, dose=dose, seed=1, progress=False,
                                           source_size_px=source, detector_psf_px=psf).amplitude
                blurred = gaussian_filter(truth, source) if source else truth
                cells = [f"{c:.3f} ({b:.3f})" for c, b in _scores(amplitudes, positions, [truth, blurred], loaded)]
                found = measure_probe_mismatch(amplitudes, (scan, scan), probe, STEP)
                noted = "noted" if probe_mismatch_note(found) else "—"
                print(f"| {name} | {dose:,.0f} | {source:g} | {psf:g} | " + " | ".join(cells)
                      + f" | {found['edge_phase_rad']:+.2f}, {noted} |", flush=True)


def deconvolve(scan: int, models: list[str]) -> None:
    from deepphase.data.aberrations import told_for_scan
    from deepphase.data.simulate import required_object_shape, simulate_scan
    from deepphase.data.specimens import builtin_specimen
    from deepphase.evaluation.metrics import correlation
    from deepphase.models.modelfile import load_model
    from deepphase.physics import raster_positions, reference_probe
    from deepphase.reconstruction.pipeline import reconstruct, with_source_divided_out

    probe = reference_probe()
    positions = raster_positions((scan, scan), STEP)
    shape = required_object_shape(positions, 32)
    loaded = {name: load_model(name) for name in models}
    grid = (0.003, 0.01, 0.03, 0.1)
    first = models[0]
    print(f"\ndeconvolve: {scan}×{scan} positions, seed 2; correlation with the truth: each model as made / with the "
          f"source divided out (λ by the dose), and {first}'s with λ = " + ", ".join(f"{v:g}" for v in grid))
    print("| specimen | e/pattern | source σ (px) | " + " | ".join(models) + " | " + " | ".join(f"λ {v:g}" for v in grid) + " |")
    print("|---|---|---|" + "---|" * (len(models) + len(grid)))
    for name in ("twisted-hbn", "cameraman"):
        truth = builtin_specimen(name, shape, seed=2)
        for dose in (27882.0, 1000.0):
            for source in (0.5, 1.0, 1.5):
                amplitudes = simulate_scan(truth, probe, positions, dose=dose, seed=2, progress=False,
                                           source_size_px=source).amplitude
                cells, lams = [], []
                for model_name, model in loaded.items():
                    if model.probe_aware:
                        model, _ = told_for_scan(model, amplitudes, positions)
                    rec = reconstruct(amplitudes, positions, model, progress=False, checks=False)
                    r0, c0 = rec.origin_px
                    window = truth[r0 : r0 + rec.phase.shape[0], c0 : c0 + rec.phase.shape[1]]
                    cells.append(f"{correlation(rec.phase, window):.3f} / "
                                 f"{correlation(with_source_divided_out(rec, source).phase, window):.3f}")
                    if model_name == first:
                        lams = [correlation(with_source_divided_out(rec, source, lam).phase, window) for lam in grid]
                print(f"| {name} | {dose:,.0f} | {source:g} | " + " | ".join(cells) + " | "
                      + " | ".join(f"{c:.3f}" for c in lams) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=int, default=48)
    parser.add_argument("--parts", nargs="+", default=["quality"], choices=["quality", "focal", "deconvolve"])
    parser.add_argument("--models", nargs="+", default=["default", "neighbourhood", "seed-unet"])
    args = parser.parse_args()
    print(machine_line())
    if "quality" in args.parts:
        quality(args.scan, args.models)
    if "focal" in args.parts:
        focal(args.scan, args.models)
    if "deconvolve" in args.parts:
        deconvolve(args.scan, args.models)


if __name__ == "__main__":
    main()
