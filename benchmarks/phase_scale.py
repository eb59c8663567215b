"""Where the phase comes out too small: the blend, the network, or the noise.

Prints correlation and fitted scale (truth ≈ scale · reconstruction, 1 is right) on the evaluation
harness's phase-object specimens (48×48 positions at the reference step, the harness's region) for

* ``perfect``: patches that a perfect network would return (the truth at each patch pixel's sub-pixel
  coordinate, cubic-spline interpolated), stitched with and without deblurring: what the blend alone does;
* ``network``: the model's patches at the given doses, with and without deblurring (plane removed, as
  ``deepphase reconstruct`` does);
* ``noise-free``: the model on noise-free patterns, on the specimen and on the specimen ×3: whether a
  weak object is shrunk by the network itself (not by the noise).

    python benchmarks/phase_scale.py perfect
    python benchmarks/phase_scale.py network --doses 30 300 3000 27882
    python benchmarks/phase_scale.py noise-free [--model FOLDER]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.ndimage import shift as subpixel_shift

import deepphase.evaluation.harness as H
from deepphase.data.simulate import required_object_shape, simulate_scan
from deepphase.evaluation import metrics
from deepphase.models.modelfile import load_model
from deepphase.physics.geometry import crop_window, output_mask, upsample_nearest
from deepphase.physics.scan import raster_positions
from deepphase.reconstruction.deblur import deblur_blend
from deepphase.reconstruction.pipeline import reconstruct, subtract_plane
from deepphase.reconstruction.predict import predict_patches
from deepphase.reconstruction.stitching import PairwiseStitcher

SPECIMENS = ["hbn", "mos2-vacancies", "twisted-hbn", "cameraman"]


def _figures(image, truth, pixel_size, n_px):
    phase = np.full(truth.shape, np.nan)
    h, w = min(image.shape[0], phase.shape[0]), min(image.shape[1], phase.shape[1])
    phase[:h, :w] = image[:h, :w]
    region = H._evaluation_region([phase], n_px)
    f = metrics.evaluate(np.where(region, phase, np.nan), np.where(region, truth, np.nan), pixel_size=pixel_size)
    return f"corr {f['correlation']:.4f} scale {f['scale']:.3f}"


def _perfect_patches(truth, positions, geometry):
    corner = np.floor(positions).astype(int)
    patches = []
    for (r, c), frac in zip(corner, positions - corner):
        window = truth[r : r + geometry.n_px + 1, c : c + geometry.n_px + 1]
        window = subpixel_shift(window, -frac, order=3, mode="nearest")[: geometry.n_px, : geometry.n_px]
        patches.append(upsample_nearest(crop_window(window, geometry), geometry.upsample))
    return np.asarray(patches, dtype=np.float32)


def blend(model, doses, perfect: bool) -> None:
    probe, geometry = model.probe, model.geometry
    mask = output_mask(probe, geometry)
    for case in H.make_cases(SPECIMENS, doses, probe, scan_shape=(48, 48)):
        s = case.scan
        patches = _perfect_patches(s.truth, s.positions, geometry) if perfect else predict_patches(
            model, s.amplitude, progress=False)
        stitcher = PairwiseStitcher(s.positions, mask, geometry)
        stitcher.add(patches)
        box = stitcher.image()
        sharp = deblur_blend(box, s.positions, geometry)
        if not perfect:
            box, sharp = subtract_plane(box)[0], subtract_plane(sharp)[0]
        print(f"{case.label:16s} {case.dose:7.0f} | blend: {_figures(box, s.truth, case.pixel_size, geometry.n_px)}"
              f" | deblurred: {_figures(sharp, s.truth, case.pixel_size, geometry.n_px)}", flush=True)


def noise_free(model) -> None:
    positions = raster_positions((48, 48), H.REFERENCE_STEP_PX, fastest="row")
    shape = required_object_shape(positions, model.probe.shape[-1])
    for name in SPECIMENS[:3]:
        truth, pixel_size = H.specimen_image(name, shape)
        for gain in (1.0, 3.0):
            for noise, dose in ((False, 27882.0), (True, 27882.0), (True, 1e6)):
                s = simulate_scan(truth * gain, model.probe, positions, dose=dose, noise=noise, progress=False)
                rec = reconstruct(s.amplitude, positions, model, progress=False, checks=False)
                label = "noise-free" if not noise else f"{dose:,.0f} e"
                print(f"{name:16s} ×{gain:.0f} {label:12s} {_figures(rec.full, truth * gain, pixel_size, 32)}",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["perfect", "network", "noise-free"])
    parser.add_argument("--doses", type=float, nargs="+", default=[27882.0])
    parser.add_argument("--model", default=None, help="model folder (default: the packaged default)")
    args = parser.parse_args()
    model = load_model(args.model)
    if args.what == "noise-free":
        noise_free(model)
    else:
        blend(model, args.doses, perfect=args.what == "perfect")


if __name__ == "__main__":
    main()
