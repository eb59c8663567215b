"""Speed and accuracy of the two stitchers on exact patches with unknown offsets and noise.

Usage: python benchmarks/bench_stitching.py [--sizes 64 256] [--repeat 3] [--noise 0.05]

For an n×n raster at the reference step, the patches are cut from a known smooth object (σ = 2 px
gaussian-filtered noise, 1 rad standard deviation) by the physical definition, their masked mean is
removed, a random constant (σ = 3 rad) is added to each and Gaussian noise on every pixel. Prints the
best wall time of each stitcher over ``--repeat`` runs, its RMSE against the truth after removing the
mean difference and its correlation, and the speed ratio, all from the same run.
"""

import argparse
import os
import platform
import time

import numpy as np
import scipy
from scipy.ndimage import gaussian_filter

import deepphase
from deepphase.evaluation.metrics import correlation, offset_rmse
from deepphase.physics.geometry import Geometry, output_mask
from deepphase.physics.probe import reference_probe
from deepphase.physics.scan import REFERENCE_STEP_PX, raster_positions
from deepphase.reconstruction.stitching import canvas_shape, stitch


def make_case(n, geometry, mask, noise, seed=0):
    """Positions, noisy patches with unknown offsets (float32, like the network's) and the truth."""
    rng = np.random.default_rng(seed)
    positions = raster_positions((n, n), REFERENCE_STEP_PX)
    rows, cols = (s // geometry.upsample for s in canvas_shape(positions, geometry))
    truth = gaussian_filter(rng.normal(size=(rows, cols)), 2.0)
    truth /= truth.std()
    centres = geometry.crop_start + (np.arange(geometry.output_px) + 0.5) / geometry.upsample
    r = np.floor(positions[:, 0, None] + centres).astype(np.int64)
    c = np.floor(positions[:, 1, None] + centres).astype(np.int64)
    patches = truth.astype(np.float32)[r[:, :, None], c[:, None, :]]
    patches -= patches[:, mask].mean(axis=1)[:, None, None]
    patches += rng.normal(scale=3.0, size=(n * n, 1, 1)).astype(np.float32)
    patches += rng.normal(scale=noise, size=patches.shape).astype(np.float32)
    return positions, patches, truth


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="raster sides")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per stitcher; the best is shown")
    parser.add_argument("--noise", type=float, default=0.05, help="noise per upsampled patch pixel, rad")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the process's CPU time (steadier on a shared machine; run with "
                             "OMP_NUM_THREADS=1 so that both stitchers use one core)")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"deepphase {deepphase.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}")
    geometry = Geometry()
    mask = output_mask(reference_probe(), geometry)
    print(f"step {REFERENCE_STEP_PX:.5f} px, reference probe mask ({int(mask.sum())} output pixels), "
          f"offsets σ = 3 rad, noise σ = {args.noise} rad, best of {args.repeat}")
    print("| patches | raster | method | time (s) | RMSE (rad) | correlation |\n|---|---|---|---|---|---|")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"clock: {args.clock}")
    for n in args.sizes:
        positions, patches, truth = make_case(n, geometry, mask, args.noise)
        times = {}
        for method in ("pairwise", "least-squares", "seed"):
            best = np.inf
            for _ in range(args.repeat):
                t0 = clock()
                image = stitch(patches, positions, mask, geometry, method=method)
                best = min(best, clock() - t0)
            times[method] = best
            reference = truth[: image.shape[0], : image.shape[1]]
            print(f"| {n * n:,} | {n}×{n} | {method} | {best:.3f} | {offset_rmse(image, reference):.4f} | "
                  f"{correlation(image, reference):.5f} |")
        for ours in ("pairwise", "least-squares"):
            print(f"| {n * n:,} | {n}×{n} | speed ratio seed / {ours} | {times['seed'] / times[ours]:.2f}× | | |")


if __name__ == "__main__":
    main()
